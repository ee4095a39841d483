"""`kleinstyle fuse` both ways: files on the command line, and a LoRAFusion Job's RunSpec in a pod filesystem.

The fused files load into the tiny klein with diffusers' `load_lora_weights` and change what it renders; the Job
publishes whole (pod path or object store), reports its result, and exits 2 on input no retry can fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from kleinstyle.cli.main import main as cli
from kleinstyle.contract.runspec import FuseSpec, LoraInput, Owner, RunSpec
from kleinstyle.runtime import fuse
from kleinstyle.runtime.klein.arch import block_linear_shapes
from kleinstyle.runtime.klein.lora_io import read_lora
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

TINY = {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "mlp_ratio": 3.0}
SHAPES = block_linear_shapes(**TINY)
OWNER = Owner(kind="LoRAFusion", plural="lorafusions", namespace="team-a", name="mix", uid="uid-9")
OWNER_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/lorafusions/mix"
OUTPUT = "/artifacts/team-a/lorafusion/mix/uid-9/abc"
DISPLAY = "pvc://kleinstyle-artifacts/team-a/lorafusion/mix/uid-9/abc"
SPEC_PATH = "/etc/kleinstyle/runspec.json"


def write_lora(path: Path, seed: int, rank: int = 4, modules=None, dtype=torch.float32) -> Path:
    """A random artifact-format LoRA for the tiny klein, small enough to leave its renders finite."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules or SHAPES:
        rows, cols = SHAPES[module]
        state[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) / cols**0.5).to(dtype)
        state[f"transformer.{module}.lora_B.weight"] = (0.2 * torch.randn(rows, rank, generator=g)).to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt", "kleinstyle.base": "flux2-klein"})
    return path


def dense(path: Path) -> dict[str, np.ndarray]:
    return {m: f.delta() for m, f in read_lora(path).layers.items()}


# ---- the command line -------------------------------------------------------------------------------------------


def test_fused_loras_load_into_the_tiny_klein_and_change_what_it_renders(
    tiny_klein: Path, tmp_path: Path, capsys, render_tiny
):
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2)
    base = render_tiny(tiny_klein, None)
    for method, extra in (("svd", ["--rank", "4"]), ("concat", []), ("klora", ["--selection", "soft"])):
        out = tmp_path / f"{method}.safetensors"
        assert cli(["fuse", "--method", method, *extra, "-o", str(out), str(a), f"{b}:0.5"]) == 0
        assert f"fused 2 LoRAs ({method}" in capsys.readouterr().out
        image = render_tiny(tiny_klein, out)
        assert np.isfinite(image).all() and np.abs(image - base).max() > 1e-3, method
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing half-written


def test_the_command_line_fuses_exactly_and_records_how(tmp_path: Path, capsys):
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2, rank=6)
    out = tmp_path / "sum.safetensors"
    assert cli(["fuse", "--method", "svd", "--rank", "10", "--layers", "-o", str(out), str(a), f"{b}:-0.5"]) == 0
    printed = capsys.readouterr().out
    assert "rank 10, energy kept 100.00%" in printed and "single_transformer_blocks.1.attn.to_out" in printed
    da, db, fused = dense(a), dense(b), dense(out)
    for module in SHAPES:
        expected = da[module] - 0.5 * db[module]
        assert np.linalg.norm(fused[module] - expected) / np.linalg.norm(expected) < 1e-5
    header = read_lora(out).metadata
    record = json.loads(header["kleinstyle.fusion"])
    assert header["kleinstyle.format"] == "klein-diffusers-v1" and header["kleinstyle.base"] == "flux2-klein"
    assert (record["method"], record["rank"], len(record["per_layer"])) == ("svd", 10, len(SHAPES))
    assert [s["weight"] for s in record["sources"]] == [1.0, -0.5]


def test_mixed_formats_fuse_like_their_diffusers_equivalents(tmp_path: Path):
    a = write_lora(tmp_path / "a.safetensors", 1)
    state = load_file(a)
    kohya = {}
    for key, tensor in state.items():
        module = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        if not module.startswith("single_transformer_blocks."):
            continue  # keep it short: single blocks only, so the result also shows a partial-coverage warning
        index, linear = (
            module.split(".")[1],
            {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}[module.split(".", 2)[2]],
        )
        name = f"lora_unet_single_blocks_{index}_{linear}"
        kohya[f"{name}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(8.0)  # rank 4: scale 2
    save_file(kohya, tmp_path / "kohya.safetensors")
    out = tmp_path / "mix.safetensors"
    assert cli(["fuse", "--method", "concat", "-o", str(out), str(a), str(tmp_path / "kohya.safetensors")]) == 0
    fused, da = dense(out), dense(a)
    for module in SHAPES:
        factor = 3.0 if module.startswith("single_") else 1.0
        assert np.allclose(fused[module], factor * da[module], atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "concat", "--rank", "4"], "concat keeps every rank"),
        (["--method", "klora"], "must not be negative"),
        (["--method", "svd", "--energy", "1.5"], "energy must be in (0, 1]"),
    ],
)
def test_contradicting_settings_exit_2_with_a_reason(tmp_path: Path, capsys, args: list[str], message: str):
    a, b = write_lora(tmp_path / "a.safetensors", 1), write_lora(tmp_path / "b.safetensors", 2)
    assert cli(["fuse", *args, "-o", str(tmp_path / "out.safetensors"), str(a), f"{b}:-1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_loras_that_do_not_fit_are_refused_naming_the_key(tmp_path: Path, capsys):
    a = write_lora(tmp_path / "a.safetensors", 1)
    state = load_file(a)
    state["transformer.transformer_blocks.1.ff.linear_out.lora_A.weight"] = torch.zeros(4, 97)
    save_file(state, tmp_path / "other.safetensors")
    assert cli(["fuse", "-o", str(tmp_path / "out.safetensors"), str(a), str(tmp_path / "other.safetensors")]) == 2
    printed = capsys.readouterr().err
    assert "other.safetensors: transformer.transformer_blocks.1.ff.linear_out.lora_A.weight" in printed
    assert cli(["fuse", "-o", str(tmp_path / "out.safetensors"), str(a), str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such LoRA file" in capsys.readouterr().err


def test_weights_that_cancel_exit_2_naming_the_weights(tmp_path: Path, capsys):
    """The same LoRA at +1 and -1 fuses to all zeros: refused, never written as a LoRA that keeps 100% energy."""
    a = write_lora(tmp_path / "a.safetensors", 1)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    for method in ("svd", "concat"):
        assert cli(["fuse", "--method", method, "-o", str(tmp_path / "out.safetensors"), str(a), f"{copy}:-1"]) == 2
        printed = capsys.readouterr()
        assert "the weights cancel" in printed.err and f"{copy} -1" in printed.err and "spec.sources" in printed.err
        assert "energy kept" not in printed.out
        assert not (tmp_path / "out.safetensors").exists()


def test_parse_input_reads_a_weight_only_after_the_last_colon():
    assert fuse.parse_input("a.safetensors") == fuse.Input("a.safetensors", 1.0)
    assert fuse.parse_input("a.safetensors:0.25") == fuse.Input("a.safetensors", 0.25)
    assert fuse.parse_input("s3://bucket/a.safetensors") == fuse.Input("s3://bucket/a.safetensors", 1.0)
    assert fuse.parse_input("s3://bucket/a.safetensors:-1") == fuse.Input("s3://bucket/a.safetensors", -1.0)


# ---- the Job ----------------------------------------------------------------------------------------------------


def write_spec(rootfs: Path, sources: list[tuple[str, float]], output: str = OUTPUT, **settings) -> str:
    work = FuseSpec(sources=tuple(LoraInput(uri=u, weight=w) for u, w in sources), **settings)
    spec = RunSpec(owner=OWNER, output_uri=output, output_display_uri=DISPLAY, work=work)
    path = rootfs / SPEC_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    (rootfs / "dev").mkdir(exist_ok=True)
    return SPEC_PATH


def test_the_job_publishes_the_fused_lora_whole_and_reports_it(rootfs: Path, kube_api: KubeApi):
    kube_api.serve_status(OWNER_PATH + "/status")
    write_lora(rootfs / "artifacts/team-a/a/lora.safetensors", 1)
    single = [m for m in SHAPES if m.startswith("single_")]
    write_lora(rootfs / "artifacts/team-a/b/lora.safetensors", 2, modules=single)
    sources = [("/artifacts/team-a/a/lora.safetensors", 1.0), ("/artifacts/team-a/b/lora.safetensors", 0.5)]
    spec = write_spec(rootfs, sources, method="svd", rank=3)
    assert cli(["fuse", "--spec", spec]) == 0
    out = rootfs / OUTPUT.lstrip("/")
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "lora.json", "lora.safetensors", "metadata.json"]
    sidecar = json.loads((out / "lora.json").read_text())
    assert sidecar["uri"] == f"{DISPLAY}/lora.safetensors" and sidecar["rank"] == 3
    assert read_lora(out / "lora.safetensors").max_rank == 3 and len(read_lora(out / "lora.safetensors").layers) == len(
        SHAPES
    )
    reports = [p.json()["status"]["progress"] for p in kube_api.patches]  # type: ignore[index]
    assert [r["state"] for r in reports] == ["Running", "Succeeded"]
    result = reports[-1]["result"]
    assert result["lora_file"] == f"{DISPLAY}/lora.safetensors" and result["rank"] == 3
    assert 0 < result["energy_kept"] <= 1 and result["duration_seconds"] > 0
    assert "only some inputs" in result["warnings"][0]
    assert reports[-1]["runHash"] == RunSpec.from_json((rootfs / spec.lstrip("/")).read_text()).run_id()
    # A retry of the same run finds the published result and reports it again without fusing anew.
    before = (out / "lora.safetensors").stat().st_mtime_ns
    assert cli(["fuse", "--spec", spec]) == 0
    assert (out / "lora.safetensors").stat().st_mtime_ns == before
    assert kube_api.patches[-1].json()["status"]["progress"]["result"]["rank"] == 3  # type: ignore[index]


def test_the_job_reads_and_writes_an_object_store(rootfs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(MemoryFileSystem, "store", {})
    monkeypatch.setattr(MemoryFileSystem, "pseudo_dirs", [""])
    store = MemoryFileSystem()
    for name, seed in (("a", 1), ("b", 2)):
        store.pipe_file(
            f"/bucket/team-a/{name}/lora.safetensors", write_lora(tmp_path / f"{name}.safetensors", seed).read_bytes()
        )
    sources = [(f"memory://bucket/team-a/{name}/lora.safetensors", 1.0) for name in ("a", "b")]
    out = "/bucket/team-a/lorafusion/mix/uid-9/abc"
    spec = write_spec(rootfs, sources, output=f"memory:/{out}", method="klora")
    assert cli(["fuse", "--spec", spec]) == 0
    assert store.exists(f"{out}/_SUCCESS") and store.exists(f"{out}/lora.json")
    (tmp_path / "fused.safetensors").write_bytes(store.cat_file(f"{out}/lora.safetensors"))
    fused, da, db = (
        dense(tmp_path / "fused.safetensors"),
        dense(tmp_path / "a.safetensors"),
        dense(tmp_path / "b.safetensors"),
    )
    for module in SHAPES:  # hard selection: every layer is exactly one of the two
        assert min(np.linalg.norm(fused[module] - d[module]) / np.linalg.norm(d[module]) for d in (da, db)) < 1e-5


def test_a_job_whose_sources_do_not_fit_fails_at_once_with_exit_2(rootfs: Path, kube_api: KubeApi):
    kube_api.serve_status(OWNER_PATH + "/status")
    write_lora(rootfs / "artifacts/team-a/a/lora.safetensors", 1)
    sources = [("/artifacts/team-a/a/lora.safetensors", 1.0), ("/artifacts/team-a/gone/lora.safetensors", 1.0)]
    spec = write_spec(rootfs, sources, method="svd")
    assert cli(["fuse", "--spec", spec]) == 2
    message = (rootfs / "dev/termination-log").read_text()
    assert message == "bad input: /artifacts/team-a/gone/lora.safetensors: no such LoRA file"
    assert kube_api.patches[-1].json()["status"]["progress"]["state"] == "Failed"  # type: ignore[index]
    assert not (rootfs / OUTPUT.lstrip("/")).exists()


def test_a_job_whose_weights_cancel_fails_at_once_with_exit_2(rootfs: Path, kube_api: KubeApi):
    kube_api.serve_status(OWNER_PATH + "/status")
    sources = [
        (f"/artifacts/team-a/stylelora/{name}/lora.safetensors", weight) for name, weight in (("a", 0.5), ("b", -0.5))
    ]
    for uri, _ in sources:
        write_lora(rootfs / uri.lstrip("/"), 1)  # the same content twice
    assert cli(["fuse", "--spec", write_spec(rootfs, sources, method="svd")]) == 2
    message = (rootfs / "dev/termination-log").read_text()
    assert message.startswith("bad input: the weights cancel") and "spec.sources" in message
    assert kube_api.patches[-1].json()["status"]["progress"]["state"] == "Failed"  # type: ignore[index]
    assert not (rootfs / OUTPUT.lstrip("/")).exists()
