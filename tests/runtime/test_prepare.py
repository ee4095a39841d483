"""The prepare step end to end on a pod filesystem under a temp dir, plus its pure caption and duplicate rules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kleinstyle.contract.pod import EXIT_VOLUME_FULL
from kleinstyle.contract.runspec import ImageInput, Owner, PrepareSpec, RunSpec
from kleinstyle.runtime import artifacts
from kleinstyle.runtime.prepare import aspect_check, caption_for, main, run_prepare
from kleinstyle.runtime.text.captions import starts_with_trigger
from PIL import Image

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

Picture = Callable[..., Image.Image]
Encode = Callable[..., bytes]

OWNER = Owner(kind="StyleBoard", plural="styleboards", namespace="team-a", name="watercolor", uid="uid-1")
STATUS_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/styleboards/watercolor/status"
OUTPUT = "/artifacts/team-a/styleboard/watercolor/uid-1/run1"
DISPLAY = "pvc://kleinstyle-artifacts/team-a/styleboard/watercolor/uid-1/run1"
SPEC_PATH = "/etc/kleinstyle/runspec.json"
TRIGGER = "wtrclr"


def board(*images: ImageInput | tuple[str, str | None], **work: Any) -> RunSpec:
    inputs = tuple(i if isinstance(i, ImageInput) else ImageInput(source=i[0], caption=i[1]) for i in images)
    return RunSpec(
        owner=OWNER,
        output_uri=OUTPUT,
        output_display_uri=DISPLAY,
        work=PrepareSpec(trigger_word=TRIGGER, images=inputs, min_short_side=64, **work),
    )


def put(rootfs: Path, pod_path: str, data: bytes) -> str:
    path = rootfs / pod_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return pod_path


def write_spec(rootfs: Path, spec: RunSpec) -> str:
    put(rootfs, SPEC_PATH, spec.to_json().encode())
    return SPEC_PATH


def output_dir(rootfs: Path) -> Path:
    return rootfs / OUTPUT.lstrip("/")


# --- pure rules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "expected", "fell_back"),
    [
        (None, "wtrclr", True),
        ("   ", "wtrclr", True),
        ("wtrclr, a lighthouse on a cliff", "wtrclr, a lighthouse on a cliff", False),
        ("wtrclr", "wtrclr", False),
        ("a harbour at dusk", "wtrclr. a harbour at dusk", False),
        ("wtrclrs of a harbour", "wtrclr. wtrclrs of a harbour", False),  # not the word itself
        ("a harbour\nat  dusk ", "wtrclr. a harbour at dusk", False),  # one line for ai-toolkit
    ],
)
def test_caption_for(caption: str | None, expected: str, fell_back: bool) -> None:
    assert caption_for(TRIGGER, caption) == (expected, fell_back)
    assert starts_with_trigger(expected, TRIGGER)


@pytest.mark.parametrize("size", [(131000, 512), (512, 131000)])
def test_a_panorama_cropped_to_a_sliver_is_rejected_naming_the_ratio_and_the_limit(size: tuple[int, int]) -> None:
    refused, warning = aspect_check(*size)
    assert warning is None
    assert refused is not None and refused.startswith(
        f"{size[0]}x{size[1]} is 255.9:1 and training crops to at most 4:1, which would keep only 1.6% of it"
    )


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((2048, 512), (None, None)),  # exactly the widest bucket
        ((1024, 1024), (None, None)),
        ((600, 100), (None, "600x100 is 6.0:1 and training crops to at most 4:1: 33% of it (the ends) is not trained")),
        ((100, 800), (None, "100x800 is 8.0:1 and training crops to at most 4:1: 50% of it (the ends) is not trained")),
    ],
)
def test_aspect_ratios_up_to_the_buckets_pass_and_a_little_wider_warn(
    size: tuple[int, int], expected: tuple[str | None, str | None]
) -> None:
    refused, warning = aspect_check(*size)
    assert refused is None
    assert (warning or "").startswith(expected[1] or "") and (warning is None) == (expected[1] is None)


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.fixture
def dev_termination_log(rootfs: Path) -> Path:
    (rootfs / "dev").mkdir()
    return rootfs / "dev/termination-log"


def test_prepare_end_to_end(
    rootfs: Path, kube_api: KubeApi, dev_termination_log: Path, picture: Picture, encode: Encode
) -> None:
    kube_api.serve_status(STATUS_PATH)
    lighthouse = encode(picture(1, (120, 100)))
    spec = board(
        (put(rootfs, "/boards/lighthouse.png", lighthouse), "wtrclr, a lighthouse on a cliff"),
        (put(rootfs, "/boards/harbour.jpg", encode(picture(2, (160, 90)), "JPEG", quality=95)), "a harbour at dusk"),
        (put(rootfs, "/boards/lighthouse-copy.png", lighthouse), "the same file again"),
        (put(rootfs, "/boards/harbour-bright.png", encode(picture(2, (160, 90), brightness=10))), None),
        (put(rootfs, "/boards/thumbnail.png", encode(picture(3, (60, 40)))), None),
        (put(rootfs, "/boards/notes.png", b"these are notes, not a picture"), None),
        ("/boards/missing.png", None),
        ("http://example.com/a.png", None),
    )

    assert main(write_spec(rootfs, spec)) == 0

    out = output_dir(rootfs)
    dataset = out / "dataset"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "001.png",
        "001.txt",
        "002.png",
        "002.txt",
        "003.png",
        "003.txt",
    ]
    assert (dataset / "001.txt").read_text() == "wtrclr, a lighthouse on a cliff\n"
    assert (dataset / "002.txt").read_text() == "wtrclr. a harbour at dusk\n"
    assert (dataset / "003.txt").read_text() == "wtrclr\n"
    with Image.open(dataset / "002.png") as harbour:
        assert (harbour.format, harbour.mode, harbour.size) == ("PNG", "RGB", (160, 90))

    report = json.loads((out / "report.json").read_text())
    assert report["succeeded"] is True
    assert [a["source"] for a in report["accepted"]] == [
        "/boards/lighthouse.png",
        "/boards/harbour.jpg",
        "/boards/harbour-bright.png",
    ]
    assert [a["file"] for a in report["accepted"]] == ["001.png", "002.png", "003.png"]
    assert report["accepted"][0]["caption"] == "wtrclr, a lighthouse on a cliff"
    assert (report["accepted"][1]["width"], report["accepted"][1]["height"]) == (160, 90)
    rejected = {r["source"]: r["reason"] for r in report["rejected"]}
    assert rejected == {
        "/boards/lighthouse-copy.png": "exact duplicate of /boards/lighthouse.png",
        "/boards/thumbnail.png": "60x40 is too small; the short side must be at least 64 pixels",
        "/boards/notes.png": "not a PNG, JPEG or WEBP image",
        "/boards/missing.png": "not found or not a readable regular file",
        "http://example.com/a.png": "plain http:// is not allowed; use https://",
    }
    kinds = {(d["kind"], d["source"], d["resembles"]) for d in report["duplicates"]}
    assert kinds == {
        ("exact", "/boards/lighthouse-copy.png", "/boards/lighthouse.png"),
        ("near", "/boards/harbour-bright.png", "/boards/harbour.jpg"),
    }
    warnings = " | ".join(report["warnings"])
    assert "1 image has only the trigger word 'wtrclr' as caption: 003.png (captioning.provider is none)" in warnings
    assert report["captioning"] == "2 given, 1 trigger-only: no captioning provider (captioning.provider is none)"
    assert "003.png (/boards/harbour-bright.png) looks like a near copy of 002.png" in warnings
    assert report["dataset_uri"] == f"{OUTPUT}/dataset"
    assert report["dataset_display_uri"] == f"{DISPLAY}/dataset"

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["step"] == "prepare"
    assert metadata["runspec_hash"] == spec.content_hash()
    assert metadata["inputs"]["images"][0]["source"] == "/boards/lighthouse.png"
    assert {"kleinstyle_version", "created"} <= metadata.keys()

    running, finished = (p.json()["status"]["progress"] for p in kube_api.patches)  # type: ignore[index]
    assert running["state"] == "Running"
    assert finished["state"] == "Succeeded"
    assert running["runHash"] == finished["runHash"] == spec.run_id()
    assert finished["result"] == report
    assert finished["message"] == report["message"]
    assert report["message"].startswith("prepared 3 images (5 rejected, 1 near duplicates) into pvc://")
    assert dev_termination_log.read_text() == report["message"]


def test_no_usable_image_fails_and_writes_nothing(
    rootfs: Path, kube_api: KubeApi, dev_termination_log: Path, picture: Picture, encode: Encode
) -> None:
    kube_api.serve_status(STATUS_PATH)
    spec = board(
        (put(rootfs, "/boards/tiny.png", encode(picture(1, (32, 32)))), None),
        ("/boards/missing.png", None),
    )
    assert main(write_spec(rootfs, spec)) == 1
    assert not output_dir(rootfs).exists()
    assert list(output_dir(rootfs).parent.iterdir()) == []
    finished = kube_api.patches[-1].json()["status"]["progress"]  # type: ignore[index]
    assert finished["state"] == "Failed"
    assert finished["message"].startswith("no usable images: all 2 were rejected (first: /boards/tiny.png: 32x32")
    assert finished["result"]["dataset_uri"] is None
    assert dev_termination_log.read_text() == finished["message"]


def test_a_board_that_can_never_succeed_exits_2_so_the_job_does_not_retry(
    rootfs: Path, kube_api: KubeApi, picture: Picture, encode: Encode
) -> None:
    kube_api.serve_status(STATUS_PATH)
    tiny = put(rootfs, "/boards/tiny.png", encode(picture(1, (32, 32))))
    assert main(write_spec(rootfs, board((tiny, None)))) == 2  # the podFailurePolicy's FailJob exit code
    # A fetch failure might pass on a retry (a missing file: see the test above): that run exits 1. An address the
    # fetch policy refuses never will: the cloud metadata service, the pod's own loopback.
    refused = board(("https://169.254.169.254/latest/meta-data/a.png", None), ("https://[::1]:8443/b.png", None))
    assert main(write_spec(rootfs, refused)) == 2
    finished = kube_api.patches[-1].json()["status"]["progress"]  # type: ignore[index]
    assert [r["retryable"] for r in finished["result"]["rejected"]] == [False, False]
    assert "link-local" in finished["result"]["rejected"][0]["reason"]


def test_a_failure_midway_leaves_no_partial_output(
    rootfs: Path,
    kube_api: KubeApi,
    dev_termination_log: Path,
    picture: Picture,
    encode: Encode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube_api.serve_status(STATUS_PATH)
    spec = board(*((put(rootfs, f"/boards/{i}.png", encode(picture(i))), None) for i in range(4)))
    original = artifacts.ArtifactDir.write_bytes
    writes: list[str] = []

    def failing(self: artifacts.ArtifactDir, name: str, data: bytes) -> None:
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        writes.append(name)
        original(self, name, data)

    monkeypatch.setattr(artifacts.ArtifactDir, "write_bytes", failing)
    assert main(write_spec(rootfs, spec)) == EXIT_VOLUME_FULL  # a full volume: never retried into the same wall
    assert len(writes) == 3  # it really did fail midway
    assert not output_dir(rootfs).exists()
    assert list(output_dir(rootfs).parent.iterdir()) == []  # no staging folder either
    finished = kube_api.patches[-1].json()["status"]["progress"]  # type: ignore[index]
    assert finished["state"] == "Failed"
    assert "No space left on device" in finished["message"]
    assert "No space left on device" in dev_termination_log.read_text()


def test_max_images_caps_in_order_without_fetching_the_rest(rootfs: Path, picture: Picture, encode: Encode) -> None:
    spec = board(
        (put(rootfs, "/boards/a.png", encode(picture(1))), None),
        (put(rootfs, "/boards/b.png", encode(picture(2))), None),
        ("/boards/never-fetched.png", None),  # missing: a fetch would say so
        max_images=2,
    )
    result = run_prepare(spec)
    assert result.succeeded
    assert [a.source for a in result.accepted] == ["/boards/a.png", "/boards/b.png"]
    assert [(r.source, r.reason) for r in result.rejected] == [
        ("/boards/never-fetched.png", "over the limit of 2 images")
    ]
    assert any("max_images" in w for w in result.warnings)


def test_extreme_aspect_ratios_are_rejected_or_kept_with_a_warning(
    rootfs: Path, picture: Picture, encode: Encode
) -> None:
    spec = board(
        (put(rootfs, "/boards/panorama.png", encode(picture(1, (64 * 40, 64)))), None),
        (put(rootfs, "/boards/wide.png", encode(picture(2, (64 * 6, 64)))), None),
        (put(rootfs, "/boards/plain.png", encode(picture(3))), None),
    )
    result = run_prepare(spec)

    assert [a.source for a in result.accepted] == ["/boards/wide.png", "/boards/plain.png"]
    ((source, reason),) = [(r.source, r.reason) for r in result.rejected]
    assert source == "/boards/panorama.png"
    assert reason.startswith("2560x64 is 40.0:1 and training crops to at most 4:1, which would keep only 10.0%")
    assert "001.png (/boards/wide.png) 384x64 is 6.0:1 and training crops to at most 4:1: 33% of it" in "".join(
        result.warnings
    )


def test_a_retried_run_reports_the_published_output_again(rootfs: Path, picture: Picture, encode: Encode) -> None:
    spec = board((put(rootfs, "/boards/a.png", encode(picture(1))), "wtrclr, a field"))
    first = run_prepare(spec)
    published = (output_dir(rootfs) / "metadata.json").read_text()
    (rootfs / "boards/a.png").unlink()  # a second fetch would now fail
    again = run_prepare(spec)
    assert again == first
    assert (output_dir(rootfs) / "metadata.json").read_text() == published


def test_a_changed_spec_at_the_same_place_replaces_the_output(rootfs: Path, picture: Picture, encode: Encode) -> None:
    source = put(rootfs, "/boards/a.png", encode(picture(1)))
    run_prepare(board((source, "a field")))
    run_prepare(board((source, "a meadow")))
    assert (output_dir(rootfs) / "dataset/001.txt").read_text() == "wtrclr. a meadow\n"
    assert list(output_dir(rootfs).parent.iterdir()) == [output_dir(rootfs)]


def test_object_store_output(rootfs: Path, picture: Picture, encode: Encode, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setattr(MemoryFileSystem, "store", {})
    monkeypatch.setattr(MemoryFileSystem, "pseudo_dirs", [""])
    source = put(rootfs, "/boards/a.png", encode(picture(1)))
    spec = board((source, None)).model_copy(update={"output_uri": "memory://bucket/run-1"})
    result = run_prepare(spec)
    assert result.dataset_uri == "memory://bucket/run-1/dataset"
    fs = MemoryFileSystem()
    assert fs.cat_file("/bucket/run-1/dataset/001.txt") == b"wtrclr\n"
    assert json.loads(fs.cat_file("/bucket/run-1/report.json"))["accepted"][0]["source"] == source
    assert fs.exists("/bucket/run-1/_SUCCESS")


def test_a_spec_that_cannot_be_read_exits_2(rootfs: Path, dev_termination_log: Path) -> None:
    put(rootfs, SPEC_PATH, b'{"apiVersion": "kleinstyle.dev/runspec-v1"}')
    assert main(SPEC_PATH) == 2
    assert dev_termination_log.read_text().startswith(f"cannot read the RunSpec {SPEC_PATH}")
    assert main("/etc/kleinstyle/absent.json") == 2
