"""`kleinstyle models pull` against a loopback Hub (tests/support/hub_server.py) driven by the real huggingface_hub
client: the manifest's repositories at their pinned commits, serving tiny random models in the real layouts (a
klein pipeline, CSD's published checkpoint, CLIP, DINOv2), with transfers cut mid-way and a file whose bytes do not
match its checksum. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kleinstyle.cli.main import main
from kleinstyle.runtime.models.manifest import MANIFEST, RECORD_DIR, ModelSource
from kleinstyle.runtime.models.pull import LOCK, STAGING, PullError, pull

from tests.support.hub_server import LoopbackHub, loopback_hub
from tests.support.tiny_csd import HEADS, write_csd_checkpoint

TOKEN = "hf_loopback_token"
# huggingface_hub writes a transfer in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes from the last whole one; the
# tiny files here are smaller, so the tests use 1 KiB chunks and cut transfers at whole chunks.
CHUNK = 1024
SOURCES = {source.name: source for source in MANIFEST}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each manifest repository's files, tiny and random, written once for the module."""
    from kleinstyle.runtime.klein.tiny import write_tiny_klein
    from kleinstyle.runtime.klein.tiny_evaluators import write_tiny_clip, write_tiny_dinov2

    root = tmp_path_factory.mktemp("hub")
    klein = write_tiny_klein(root / "klein")
    (klein / "flux-2-klein-base-9b.safetensors").write_bytes(b"\0" * 4096)  # the BFL file, taken only when asked
    (klein / "README.md").write_text("tiny klein\n")
    clip = write_tiny_clip(root / "clip")
    (clip / "pytorch_model.bin").write_bytes(b"\0" * 2048)  # the same weights in another format: never taken
    dinov2 = write_tiny_dinov2(root / "dinov2")
    csd = root / "csd"
    write_csd_checkpoint(csd / "pytorch_model.bin")
    (csd / "README.md").write_text("tiny CSD\n")
    return {"klein-base-9b": klein, "clip": clip, "dinov2": dinov2, "csd": csd}


@pytest.fixture
def hub(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    """The manifest's repositories under their real names and pinned commits; klein gated behind TOKEN."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    # CSD's real head count is width / 64; the tiny checkpoint's width 32 needs it said.
    from kleinstyle.runtime.models import csd

    real = csd.convert_csd
    monkeypatch.setattr(csd, "convert_csd", lambda checkpoint, out, heads=None: real(checkpoint, out, heads=HEADS))
    with loopback_hub() as served:
        for name, folder in repos.items():
            source = SOURCES[name]
            served.add_repo(source.repo_id, folder, commit=source.revision, token=TOKEN if source.gated else None)
        yield served


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret" / "token"
    path.parent.mkdir()
    path.write_text(TOKEN + "\n")
    return path


def _pull(hub: LoopbackHub, cache: Path, *args: str) -> int:
    return main(["models", "pull", "--endpoint", hub.url, *args, str(cache)])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_pull_installs_every_default_model_where_the_runtime_reads_it(
    hub: LoopbackHub, repos: dict[str, Path], token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--token-file", str(token_file)) == 0
    assert (cache / LOCK).is_file()  # one pull at a time; left empty
    assert sorted(p.name for p in cache.iterdir() if p.name != LOCK) == [
        "CSD-ViT-L",
        "FLUX.2-klein-base-9B",
        "clip-vit-large-patch14",
        "dinov2-base",
    ]
    # klein: the diffusers parts byte for byte; not the BFL file (--only klein-base-9b-bfl), not the README.
    klein = _tree(cache / "FLUX.2-klein-base-9B")
    expected = {k: v for k, v in _tree(repos["klein-base-9b"]).items() if not k.endswith((".md", "b.safetensors"))}
    assert {k: v for k, v in klein.items() if not k.startswith(RECORD_DIR)} == expected
    assert "pytorch_model.bin" not in _tree(cache / "clip-vit-large-patch14")
    assert not [p for _, p, _ in hub.requests if "clip-vit-large-patch14/resolve/" in p and p.endswith(".bin")]
    assert not (cache / STAGING).exists()
    record = json.loads((cache / "CSD-ViT-L" / RECORD_DIR / "csd.json").read_text())
    assert record["revision"] == SOURCES["csd"].revision and record["converted"] == "csd"
    assert set(record["files"]) == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "csd_style_projection.safetensors",
    }

    # The evaluator loads each score's model from the folder the pull wrote.
    from kleinstyle.runtime.klein.evaluate import CSDStyleEmbedder, TextImageScorer, VisionModelEmbedder
    from PIL import Image

    images = [Image.new("RGB", (64, 48), (10, 120, 200))]
    assert CSDStyleEmbedder(cache / "CSD-ViT-L").style(images).shape[0] == 1
    assert TextImageScorer(cache / "clip-vit-large-patch14").adherence(images, ["a blue picture"]).shape == (1,)
    assert VisionModelEmbedder(cache / "dinov2-base").content(images).shape[0] == 1

    # A second pull finds every model complete at its commit and fetches nothing.
    fetched = len(hub.requests)
    assert _pull(hub, cache, "--token-file", str(token_file)) == 0
    assert len(hub.requests) == fetched
    assert "complete at" in capsys.readouterr().err


def test_a_cut_transfer_resumes_with_a_range_request(
    hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub waits a second between retries
    weights = (SOURCES["dinov2"].repo_id, "model.safetensors")
    size = len(hub.repos[weights[0]].files[weights[1]].data)
    third = size // 3 // CHUNK * CHUNK
    hub.cut(*weights, third, third)  # two cuts, each after a third of the file
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--only", "dinov2") == 0
    assert hub.gets("/model.safetensors") == [None, f"bytes={third}-", f"bytes={2 * third}-"]
    assert (cache / "dinov2-base" / "model.safetensors").read_bytes() == hub.repos[weights[0]].files[weights[1]].data


def test_a_pull_cut_off_resumes_in_the_next_run(
    hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub waits a second between retries
    weights = (SOURCES["dinov2"].repo_id, "model.safetensors")
    size = len(hub.repos[weights[0]].files[weights[1]].data)
    half = size // 2 // CHUNK * CHUNK
    hub.cut(*weights, half, *[0] * 10)  # half, then nothing: the client gives up after 5 retries without progress
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--only", "dinov2") == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert not (cache / "dinov2-base" / "model.safetensors").exists()  # nothing half-written where the runtime reads
    assert not (cache / "dinov2-base" / RECORD_DIR).exists()
    hub.heal()
    assert _pull(hub, cache, "--only", "dinov2") == 0
    assert hub.gets("/model.safetensors")[-1] == f"bytes={half}-"  # the next run asked for the rest only
    assert (cache / "dinov2-base" / "model.safetensors").read_bytes() == hub.repos[weights[0]].files[weights[1]].data


@pytest.mark.parametrize(("path", "kind"), [("model.safetensors", "sha256"), ("config.json", "git sha1")])
def test_a_wrong_checksum_fails_naming_the_file_and_installs_nothing(
    hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, kind: str
) -> None:
    hub.corrupt(SOURCES["dinov2"].repo_id, path)
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--only", "dinov2") == 1
    err = capsys.readouterr().err
    assert f"dinov2: {path}: {kind}" in err and "nothing was installed" in err
    assert not (cache / "dinov2-base").exists()
    staged = cache / STAGING / "dinov2"
    assert not (staged / path).exists() and not (staged / f"{path}.part").exists()  # not kept to resume from
    hub.heal()
    assert _pull(hub, cache, "--only", "dinov2") == 0
    assert (cache / "dinov2-base" / RECORD_DIR / "dinov2.json").is_file()


def test_a_gated_model_without_a_token_says_how_to_give_one(
    hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _pull(hub, tmp_path / "models", "--only", "klein-base-9b") == 1
    err = capsys.readouterr().err
    assert "klein-base-9b" in err and "gated" in err and "--token-file" in err
    assert not (tmp_path / "models" / "FLUX.2-klein-base-9B").exists()


def test_the_token_comes_from_hf_token_too(hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _pull(hub, tmp_path / "models", "--only", "klein-base-9b-bfl") == 0
    assert (tmp_path / "models" / "FLUX.2-klein-base-9B" / "flux-2-klein-base-9b.safetensors").stat().st_size == 4096


def test_the_size_bound_is_checked_before_any_download(
    hub: LoopbackHub, token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _pull(hub, tmp_path / "models", "--token-file", str(token_file), "--max-bytes", "1000") == 1
    assert "over the bound of 1000 bytes" in capsys.readouterr().err
    assert not [path for method, path, _ in hub.requests if "/resolve/" in path]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint", "ftp://mirror.internal"], "--endpoint 'ftp://mirror.internal': must be an http(s) URL"),
        (["--only", "sd15"], "--only sd15: not in the manifest"),
        (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token: cannot be read"),
        (["--max-bytes", "0"], "--max-bytes 0: must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["models", "pull", *args, str(tmp_path / "models")]) == 2
    assert message in capsys.readouterr().err


def test_a_revision_the_hub_does_not_have_is_named(hub: LoopbackHub, tmp_path: Path) -> None:
    moved = ModelSource(
        name="dinov2",
        repo_id=SOURCES["dinov2"].repo_id,
        revision="0" * 40,
        folder="dinov2-base",
        files=("config.json",),
        licence="Apache-2.0",
        use="test",
    )
    with pytest.raises(PullError, match=f"no commit {'0' * 40}"):
        pull([moved], tmp_path / "models", endpoint=hub.url)


def test_a_pull_replacing_an_older_revision_drops_its_record_first(hub: LoopbackHub, tmp_path: Path) -> None:
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--only", "dinov2") == 0
    record = cache / "dinov2-base" / RECORD_DIR / "dinov2.json"
    old = json.loads(record.read_text())
    record.write_text(json.dumps({**old, "revision": "1" * 40}))  # as left by an older manifest
    assert _pull(hub, cache, "--only", "dinov2") == 0
    assert json.loads(record.read_text())["revision"] == SOURCES["dinov2"].revision


def test_lfs_files_behind_a_cdn_redirect_are_fetched_without_the_token(
    hub: LoopbackHub, token_file: Path, tmp_path: Path
) -> None:
    """The Hub answers an LFS file with a 302 to a signed CDN URL: the pull follows it, verifies the file by the
    redirect's X-Linked-Etag, and never sends the token off the Hub."""
    hub.cdn = True
    weights = (SOURCES["klein-base-9b-bfl"].repo_id, "flux-2-klein-base-9b.safetensors")
    hub.cut(*weights, CHUNK)  # and the CDN transfer is resumed like any other
    cache = tmp_path / "models"
    assert _pull(hub, cache, "--only", "klein-base-9b-bfl", "--token-file", str(token_file)) == 0
    assert hub.cdn_authorized == [False, False]
    assert hub.gets("/flux-2-klein-base-9b.safetensors")[-1] == f"bytes={CHUNK}-"
    installed = cache / "FLUX.2-klein-base-9B" / "flux-2-klein-base-9b.safetensors"
    assert installed.read_bytes() == hub.repos[weights[0]].files[weights[1]].data


def test_the_endpoint_comes_from_hf_endpoint_too(
    hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert main(["models", "pull", "--only", "dinov2", str(tmp_path / "models")]) == 0
    assert (tmp_path / "models" / "dinov2-base" / RECORD_DIR / "dinov2.json").is_file()


def test_one_pull_at_a_time_per_cache(hub: LoopbackHub, tmp_path: Path) -> None:
    import fcntl

    cache = tmp_path / "models"
    cache.mkdir()
    with (cache / LOCK).open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another pod's pull of the same claim
        with pytest.raises(PullError, match="another pull of this model cache is running"):
            pull([SOURCES["dinov2"]], cache, endpoint=hub.url)
    assert not [path for _, path, _ in hub.requests]
    assert pull([SOURCES["dinov2"]], cache, endpoint=hub.url)[0].name == "dinov2"


def test_the_summary_names_what_is_complete_and_what_is_missing(
    hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chart's Job writes it to its termination log: the operator reads which models are missing from the pod."""
    cache, summary = tmp_path / "models", tmp_path / "termination-log"
    hub.corrupt(SOURCES["dinov2"].repo_id, "model.safetensors")
    assert _pull(hub, cache, "--only", "clip", "--only", "dinov2", "--summary", str(summary)) == 1
    written = json.loads(summary.read_text())
    assert written["complete"] == {"clip": "clip-vit-large-patch14"}
    assert written["missing"] == {"dinov2": "dinov2-base"}
    assert written["error"].startswith("dinov2: model.safetensors: sha256")
    hub.heal()
    assert _pull(hub, cache, "--only", "clip", "--only", "dinov2", "--summary", str(summary)) == 0
    assert json.loads(summary.read_text()) == {
        "complete": {"clip": "clip-vit-large-patch14", "dinov2": "dinov2-base"},
        "missing": {},
    }
