"""A StyleLoRA that asks for LoRA formats gets each one: a tiny builtin run publishes `lora.safetensors` in the first
format listed and the other beside it, both the same update, both listed in the sidecar; the default publishes the
trainer's file as before, and the RunSpec of a default spec keeps the hash it had before formats could be chosen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from kleinstyle.contract.plan import plan_training
from kleinstyle.contract.runspec import RunSpec, TrainSpec
from kleinstyle.runtime import train
from kleinstyle.runtime.klein.lora_format import BFL_FORMAT_NAME, FORMAT_NAME
from kleinstyle.runtime.klein.lora_io import read_lora
from kleinstyle.runtime.klein.tensorfile import read_safetensors
from pydantic import ValidationError
from safetensors.torch import load_file

from .test_train_step import DISPLAY, output, progress_reports, runspec, serve_owner

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi


def with_formats(rootfs: Path, spec_path: str, formats: list[str]) -> None:
    path = rootfs / spec_path.lstrip("/")
    spec = RunSpec.from_json(path.read_text())
    work = spec.work.model_copy(update={"lora_formats": tuple(formats)})
    path.write_text(spec.model_copy(update={"work": work}).to_json())


def test_a_tiny_run_publishes_bfl_first_and_diffusers_beside_it(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path
) -> None:
    serve_owner(kube_api)
    spec_path = runspec(rootfs, tiny_klein, two_images)
    with_formats(rootfs, spec_path, ["bfl", "diffusers"])
    assert train.main(spec_path) == 0

    out = output(rootfs)
    bfl, diffusers = out / "lora.safetensors", out / "lora.diffusers.safetensors"
    assert all(k.startswith("diffusion_model.") for k in load_file(bfl))
    assert read_safetensors(bfl)[1]["kleinstyle.format"] == BFL_FORMAT_NAME
    # the diffusers file is the checkpoint as trained, byte for byte
    assert diffusers.read_bytes() == (out / "work/checkpoints/step_000006/lora.safetensors").read_bytes()
    mine, theirs = read_lora(bfl), read_lora(diffusers)
    assert set(mine.layers) == set(theirs.layers)
    for module, factors in theirs.layers.items():
        assert torch.allclose(torch.from_numpy(mine.layers[module].delta()), torch.from_numpy(factors.delta()))

    sidecar = json.loads((out / "lora.json").read_text())
    assert sidecar["uri"] == f"{DISPLAY}/lora.safetensors" and sidecar["format"].startswith("BFL LoRA")
    assert sidecar["lora_files"] == [
        {"format": BFL_FORMAT_NAME, "option": "bfl", "uri": f"{DISPLAY}/lora.safetensors"},
        {"format": FORMAT_NAME, "option": "diffusers", "uri": f"{DISPLAY}/lora.diffusers.safetensors"},
    ]
    assert progress_reports(kube_api)[-1]["result"]["lora_file"] == f"{DISPLAY}/lora.safetensors"


def test_the_default_is_diffusers_alone_and_leaves_the_runspec_json_as_it_was(
    rootfs: Path, kube_api: KubeApi, tiny_klein: Path, two_images: Path
) -> None:
    spec_path = runspec(rootfs, tiny_klein, two_images)
    text = (rootfs / spec_path.lstrip("/")).read_text()
    assert "lora_formats" not in text  # so every RunSpec hash from before the option is unchanged
    spec = RunSpec.from_json(text)
    assert isinstance(spec.work, TrainSpec) and spec.work.lora_formats == ("diffusers",)
    with_formats(rootfs, spec_path, ["diffusers", "bfl"])
    changed = RunSpec.from_json((rootfs / spec_path.lstrip("/")).read_text())
    assert changed.content_hash() != spec.content_hash()  # asking for another format is another run

    serve_owner(kube_api)
    with_formats(rootfs, spec_path, ["diffusers"])
    assert train.main(spec_path) == 0
    out = output(rootfs)
    assert sorted(p.name for p in out.glob("lora*")) == ["lora.json", "lora.safetensors"]
    sidecar = json.loads((out / "lora.json").read_text())
    assert sidecar["lora_files"] == [{"format": FORMAT_NAME, "option": "diffusers", "uri": sidecar["uri"]}]


@pytest.mark.parametrize("formats", [(), ("bfl", "bfl"), ("comfy",), ("diffusers", "bfl", "diffusers")])
def test_formats_are_one_or_two_known_names_each_once(formats: tuple[str, ...]) -> None:
    plan = plan_training(2, {})
    base = {"dataset_uri": "/d", "trigger_word": "t", "image_count": 2, "backend": "builtin", "model_path": "/m"}
    assert TrainSpec.model_validate({**base, "plan": plan, "lora_formats": ["bfl"]}).lora_formats == ("bfl",)
    with pytest.raises(ValidationError, match="lora_formats"):
        TrainSpec.model_validate({**base, "plan": plan, "lora_formats": list(formats)})
