"""`kleinstyle generate` on the tiny klein: the GenerationJob step in a pod filesystem (progress to an API stand-in,
exit 2 on bad input, a retried pod keeps finished images) and the one-machine CLI; PNG metadata and the contact
sheet checked from the files."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from kleinstyle.cli.main import main as cli_main
from kleinstyle.contract.runspec import GenerateSpec, LoraInput, Owner, RunSpec
from kleinstyle.runtime import generate
from kleinstyle.runtime.contact_sheet import Cell, contact_sheet, grid_columns
from kleinstyle.runtime.pngmeta import read_png_metadata
from kleinstyle.runtime.prompts import ReformulationError
from kleinstyle.runtime.step import Reporter, conclude, run_work
from PIL import Image

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

OWNER = Owner(kind="GenerationJob", plural="generationjobs", namespace="team-a", name="samples", uid="uid-5")
OWNER_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/generationjobs/samples"
OUTPUT = "/artifacts/team-a/generationjob/samples/uid-5/abc"
LORA = "/artifacts/team-a/stylelora/tok/uid-1/0123456789/lora.safetensors"  # a StyleLoRA's, in the same namespace
DISPLAY = "pvc://kleinstyle-artifacts/team-a/generationjob/samples/uid-5/abc"
SPEC_PATH = "/etc/kleinstyle/runspec.json"
PROMPTS = ("a fox crossing a snowy street", "a red house by a lake")


def work(**changes: Any) -> GenerateSpec:
    base = {
        "model_path": "/models/tiny",
        "loras": (LoraInput(uri=LORA, weight=0.8, label="StyleLoRA/tok"),),
        "prompts": PROMPTS,
        "trigger_words": ("tokstyle",),
        "width": 80,
        "height": 64,
        "steps": 2,
        "guidance": 4.0,
        "seeds": (5, 6),
    }
    return GenerateSpec(**{**base, **changes})


@pytest.fixture
def pod(rootfs: Path, tiny_klein: Path, random_lora) -> Path:
    """The rootfs with the tiny klein at /models/tiny and a LoRA at LORA."""
    (rootfs / "models").mkdir()
    (rootfs / "models" / "tiny").symlink_to(tiny_klein, target_is_directory=True)
    (rootfs / LORA.lstrip("/")).parent.mkdir(parents=True)
    (rootfs / LORA.lstrip("/")).symlink_to(random_lora(1))
    (rootfs / "dev").mkdir()
    return rootfs


def runspec(spec: GenerateSpec) -> RunSpec:
    return RunSpec(owner=OWNER, output_uri=OUTPUT, output_display_uri=DISPLAY, work=spec)


def out(rootfs: Path) -> Path:
    return rootfs / OUTPUT.lstrip("/")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def run_generate(spec: RunSpec, reformulator=None) -> tuple[int, str, dict | None]:
    """The generate step as its pod runs it, with the L2 seam replaceable; (exit code, message, reported result)."""
    reporter = Reporter(spec)
    outcome = run_work(spec, partial(generate.work, reformulator=reformulator), reporter)
    code = conclude(outcome, reporter)
    return code, outcome.message, outcome.result.model_dump(mode="json") if outcome.result else None


def reports(kube_api: KubeApi) -> list[dict[str, Any]]:
    return [p.json()["status"]["progress"] for p in kube_api.patches]  # type: ignore[index]


# --- the step --------------------------------------------------------------------------------------------------


def test_the_step_writes_images_metadata_and_a_sheet_and_reports_them(pod: Path, kube_api: KubeApi) -> None:
    kube_api.serve_status(OWNER_PATH + "/status")
    spec = runspec(work())
    code, message, result = run_generate(spec)
    assert code == 0, message
    names = [name for _, _, name in spec.work.image_files()]
    assert names == ["001_p01_seed5", "002_p01_seed6", "003_p02_seed5", "004_p02_seed6"]
    for p, seed, name in spec.work.image_files():
        png = out(pod) / "images" / f"{name}.png"
        assert pixels(png).shape == (64, 80, 3)
        record = read_png_metadata(png)
        assert record == json.loads((out(pod) / "images" / f"{name}.json").read_text())  # chunks = sidecar
        assert (record["prompt"], record["prompt_used"], record["seed"]) == (
            PROMPTS[p],
            f"tokstyle. {PROMPTS[p]}",
            seed,
        )
        assert record["loras"] == [{"lora": "StyleLoRA/tok", "weight": 0.8}]
        assert (record["model"], record["width"], record["height"], record["steps"], record["guidance"]) == (
            "/models/tiny",
            80,
            64,
            2,
            4.0,
        )
        with Image.open(png) as image:  # every field is also a chunk of its own, for any PNG tool
            assert image.text["prompt_used"] == record["prompt_used"] and image.text["seed"] == str(seed)

    with Image.open(out(pod) / "contact_sheet.png") as sheet:
        assert sheet.width > 2 * 256 and sheet.height > 2 * 256  # 2 columns (seeds) x 2 rows (prompts)
    summary = json.loads((out(pod) / "generation.json").read_text())
    assert [i["file"] for i in summary["images"]] == [f"images/{n}.png" for n in names]

    sent = reports(kube_api)
    assert sent[0]["state"] == "Running" and sent[0]["progress"] == {"imagesDone": 0, "imagesTotal": 4}
    assert sent[-1]["state"] == "Succeeded" and sent[-1]["progress"]["imagesDone"] == 4
    assert sent[-1]["result"] == result
    assert [i["index"] for i in result["images"]] == [1, 2, 3, 4]
    assert all(i["seconds"] > 0 and not i["reused"] for i in result["images"])
    assert result["prompts_used"] == [f"tokstyle. {p}" for p in PROMPTS] and result["warnings"] == []
    assert "contact sheet at " + DISPLAY in message


def test_same_inputs_same_pixels(pod: Path) -> None:
    generate.render_job(work(seeds=(5,)), "/artifacts/one")
    generate.render_job(work(seeds=(5,)), "/artifacts/two")
    name = "001_p01_seed5.png"
    np.testing.assert_array_equal(
        pixels(pod / "artifacts/one/images" / name), pixels(pod / "artifacts/two/images" / name)
    )


def test_a_retried_pod_keeps_the_finished_images(pod: Path) -> None:
    first = generate.render_job(work(), OUTPUT)
    lost = out(pod) / "images" / "003_p02_seed5"
    lost.with_suffix(".json").unlink()  # the pod died after this PNG, before its sidecar: not finished
    before = {p.name: p.stat().st_mtime_ns for p in (out(pod) / "images").glob("*.png")}
    again = generate.render_job(work(), OUTPUT)
    assert [s is None for s in again.seconds] == [True, True, False, True]
    after = {p.name: p.stat().st_mtime_ns for p in (out(pod) / "images").glob("*.png")}
    assert [n for n in before if before[n] != after[n]] == ["003_p02_seed5.png"]
    assert all(s is not None for s in first.seconds)
    # Another job in the same folder renders everything anew.
    other = generate.render_job(work(guidance=3.0), OUTPUT)
    assert all(s is not None for s in other.seconds)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompts": ("a fox", "   ")}, "prompt 2 is empty"),
        ({"prompts": ("x" * 4001,)}, "prompt 1 is 4001 characters"),
        ({"width": 100}, "width 100 is not a multiple of 16"),
        ({"model_path": "/models/none"}, "no diffusers pipeline at"),
        ({"loras": (LoraInput(uri="/artifacts/team-a/none.safetensors"),)}, "no LoRA file at"),
        ({"prompts": ("a red house by a lake " * 120,)}, "tokens with the chat template; klein reads at most 512"),
    ],
)
def test_bad_input_exits_2_before_rendering(
    pod: Path, kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch, changes: dict, message: str
) -> None:
    kube_api.serve_status(OWNER_PATH + "/status")

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input must fail before any model loads")

    monkeypatch.setattr("kleinstyle.runtime.klein.generate.encode_prompts", no_model)
    monkeypatch.setattr("kleinstyle.runtime.klein.generate.load_sampler", no_model)
    path = pod / SPEC_PATH.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(runspec(work(**changes)).to_json())
    assert generate.main(SPEC_PATH) == 2
    termination = (pod / "dev/termination-log").read_text()
    assert termination.startswith("bad input: ") and message in termination
    assert reports(kube_api)[-1]["state"] == "Failed" and message in reports(kube_api)[-1]["message"]


def test_a_lora_for_another_model_is_named_in_the_failure(pod: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from torch import zeros

    flux1 = tmp_path / "flux1.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": zeros(4, 3072)}, flux1)
    (pod / "artifacts/team-a/flux1.safetensors").symlink_to(flux1)
    code, message, _ = run_generate(runspec(work(loras=(LoraInput(uri="/artifacts/team-a/flux1.safetensors"),))))
    assert code == 2
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight has shape [4, 3072]" in message


def test_reformulated_prompts_are_rendered_and_failures_fall_back(pod: Path) -> None:
    def reformulate(prompt: str) -> str:
        if "house" in prompt:
            raise ReformulationError("quota exceeded")
        return f"{prompt}, cinematic teal dusk"

    spec = runspec(work(prompt_mode="reformulate", seeds=(5,)))
    code, _, result = run_generate(spec, reformulator=lambda: reformulate)
    assert code == 0 and result is not None
    assert result["prompts_used"] == [f"tokstyle. {PROMPTS[0]}, cinematic teal dusk", f"tokstyle. {PROMPTS[1]}"]
    assert result["reformulated"] == [True, False]
    assert result["warnings"] == ["prompt 2: reformulation failed (quota exceeded); the raw prompt was used"]
    assert read_png_metadata(out(pod) / "images/001_p01_seed5.png")["reformulated"] is True


def test_without_a_reformulation_the_step_says_so(pod: Path) -> None:
    code, _, result = run_generate(runspec(work(prompt_mode="reformulate", seeds=(5,), prompts=PROMPTS[:1])))
    assert code == 0 and result is not None
    assert result["reformulated"] == [False] and "no style profile" in result["warnings"][0]


# --- the contact sheet -------------------------------------------------------------------------------------------


def test_the_contact_sheet_has_one_labelled_cell_per_image() -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20), (20, 220, 220)]
    cells = [Cell(Image.new("RGB", (64, 48), c), f"#{i + 1}", "a prompt " * 30) for i, c in enumerate(colours)]
    sheet, boxes = contact_sheet(cells, columns=grid_columns(5, 1), header=["model", "settings"], thumb=96)
    assert len(boxes) == 5 and len(set(boxes)) == 5
    assert grid_columns(5, 1) == 3 and grid_columns(8, 4) == 4
    for (left, top, right, bottom), colour in zip(boxes, colours, strict=True):
        assert (right - left, bottom - top) == (96, 72)  # scaled up to the cell, aspect kept
        centre = sheet.getpixel(((left + right) // 2, (top + bottom) // 2))
        assert max(abs(a - b) for a, b in zip(centre, colour, strict=True)) <= 2
    below = sheet.crop((boxes[0][0], boxes[0][3] + 2, boxes[0][2], boxes[0][3] + 40))
    assert below.convert("L").getextrema()[0] < 100  # the label is written under the picture
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([], columns=1)


# --- the one-machine CLI -----------------------------------------------------------------------------------------


def test_the_cli_renders_with_loras_and_prints_where_the_images_are(
    tiny_klein: Path, random_lora, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(random_lora(1).read_bytes())
    (tmp_path / "lora.json").write_text(json.dumps({"trigger_word": "tokstyle"}))  # the trainer's sidecar
    argv = ["generate", "--model", str(tiny_klein), "--lora", f"{lora}:0.5", "--lora", str(random_lora(2))]
    argv += ["--prompt", "a fox", "--width", "64", "--height", "64", "--steps", "2", "--count", "2"]
    assert cli_main([*argv, "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        f"{tmp_path}/out/images/001_p01_seed0.png  tokstyle. a fox",
        f"{tmp_path}/out/images/002_p01_seed1.png  tokstyle. a fox",
    ]
    assert printed[2] == f"contact sheet: {tmp_path}/out/contact_sheet.png"
    record = read_png_metadata(tmp_path / "out/images/001_p01_seed0.png")
    assert record["loras"] == [{"lora": str(lora), "weight": 0.5}, {"lora": str(random_lora(2)), "weight": 1.0}]
    assert (record["steps"], record["guidance"]) == (2, 4.0)  # guidance: the Base model's default


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "/nowhere/x.safetensors"], "no LoRA file at /nowhere/x.safetensors"),
        (["--width", "72"], "width 72 is not a multiple of 16"),
        (["--count", "0"], "--count must be at least 1"),
    ],
)
def test_the_cli_names_bad_input_and_exits_2(
    tiny_klein: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["generate", "--model", str(tiny_klein), "--prompt", "a fox", "--steps", "1", "-o", str(tmp_path)]
    assert cli_main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_cli_asks_for_what_is_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["generate", "--prompt", "a fox"]) == 2
    assert "--model, -o required" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "a", "-o", str(tmp_path / "o")]) == 2
    assert "model_index.json missing" in capsys.readouterr().err


def test_tiny_model_writes_a_pipeline_the_generator_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert cli_main(["tiny-model", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    from kleinstyle.runtime.klein.encode import check_components

    check_components(target)
    assert cli_main(["tiny-model", str(target)]) == 2
    assert "already holds a pipeline" in capsys.readouterr().err
