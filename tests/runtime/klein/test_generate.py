"""The klein sampler on the tiny random pipeline: it renders what diffusers' pipeline renders, deterministically; LoRAs
change the output and compose as their weighted sum; every bad input is named before any model loads."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from kleinstyle.runtime.klein.encode import ModelDirError, check_components
from kleinstyle.runtime.klein.fp8 import Float8Linear, to_fp8
from kleinstyle.runtime.klein.generate import (
    PromptTooLong,
    RenderOptions,
    Sampler,
    SizeError,
    check_prompt_lengths,
    check_size,
    encode_prompts,
    load_sampler,
    model_defaults,
    size_multiple,
)
from kleinstyle.runtime.klein.lora_check import LoraFit, LoraMismatch, check_lora, transformer_skeleton
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS
from safetensors.torch import load_file, save_file

PROMPT = "tokstyle. a red house by a lake"
SIZE = {"width": 64, "height": 64, "steps": 2, "guidance": 4.0}
CPU = RenderOptions(device="cpu")


@pytest.fixture(scope="module")
def embeds(tiny_klein: Path) -> tuple[torch.Tensor, torch.Tensor]:
    (prompt,), negative = encode_prompts(tiny_klein, [PROMPT], "", torch.device("cpu"))
    return prompt, negative


@pytest.fixture(scope="module")
def skeleton(tiny_klein: Path) -> torch.nn.Module:
    return transformer_skeleton(tiny_klein)


def render(sampler: Sampler, embeds: tuple[torch.Tensor, torch.Tensor], seed: int = 0, **overrides) -> np.ndarray:
    settings = {**SIZE, **overrides}
    return np.asarray(sampler.render(*embeds, seed=seed, **settings)).astype(np.int16)


def sampler_with(model: Path, skeleton, loras: list[tuple[Path, float]], **options) -> Sampler:
    fits = [(check_lora(path, skeleton), weight) for path, weight in loras]
    return load_sampler(model, fits, RenderOptions(device="cpu", **options))


# --- the sampler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched-cfg", "two-passes"])
def test_the_sampler_renders_what_the_diffusers_pipeline_renders(tiny_klein: Path, embeds, batch_cfg: bool) -> None:
    ours = render(
        load_sampler(tiny_klein, [], RenderOptions(device="cpu", batch_cfg=batch_cfg)), embeds, seed=3, height=96
    )
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt=PROMPT,
        width=64,
        height=96,
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        text_encoder_out_layers=TINY_TEXT_ENCODER_LAYERS,
    ).images[0]
    assert ours.shape == (96, 64, 3)
    assert np.abs(ours - np.asarray(reference).astype(np.int16)).max() <= 1
    assert ours.std() > 5  # a picture, not a flat field


def test_same_seed_same_pixels_other_seed_other_pixels(tiny_klein: Path, embeds) -> None:
    sampler = load_sampler(tiny_klein, [], CPU)
    first = render(sampler, embeds, seed=7)
    np.testing.assert_array_equal(first, render(sampler, embeds, seed=7))
    np.testing.assert_array_equal(first, render(load_sampler(tiny_klein, [], CPU), embeds, seed=7))
    assert np.abs(first - render(sampler, embeds, seed=8)).mean() > 1


def test_guidance_one_is_a_single_pass_without_the_negative(tiny_klein: Path, embeds) -> None:
    sampler = load_sampler(tiny_klein, [], CPU)
    other_negative = (embeds[0], torch.randn_like(embeds[1]))
    np.testing.assert_array_equal(render(sampler, embeds, guidance=1.0), render(sampler, other_negative, guidance=1.0))
    assert np.abs(render(sampler, embeds) - render(sampler, other_negative)).mean() > 1


# --- LoRAs -------------------------------------------------------------------------------------------------------


def test_a_lora_changes_the_output_and_weight_zero_does_not(tiny_klein: Path, skeleton, embeds, random_lora) -> None:
    base = render(load_sampler(tiny_klein, [], CPU), embeds)
    styled = render(sampler_with(tiny_klein, skeleton, [(random_lora(1), 1.0)]), embeds)
    assert np.abs(styled - base).mean() > 2
    np.testing.assert_array_equal(render(sampler_with(tiny_klein, skeleton, [(random_lora(1), 0.0)]), embeds), base)


def concatenated(first: Path, second: Path, weights: tuple[float, float], target: Path) -> Path:
    """One LoRA equal to first x w1 + second x w2: A stacked, B side by side with the weights folded in."""
    a, b = load_file(first), load_file(second)
    out = {}
    for key in a:
        if key.endswith("lora_A.weight"):
            out[key] = torch.cat([a[key], b[key]], dim=0)
        else:
            out[key] = torch.cat([weights[0] * a[key], weights[1] * b[key]], dim=1)
    save_file(out, target)
    return target


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "adapters"])
def test_two_loras_compose_as_their_weighted_sum(
    tiny_klein: Path, skeleton, embeds, random_lora, tmp_path: Path, fuse: bool
) -> None:
    one, two = random_lora(1), random_lora(2)
    both = render(sampler_with(tiny_klein, skeleton, [(one, 0.7), (two, -0.4)], fuse_loras=fuse), embeds)
    merged = concatenated(one, two, (0.7, -0.4), tmp_path / "sum.safetensors")
    assert check_lora(merged, skeleton).rank == 8
    np.testing.assert_allclose(both, render(sampler_with(tiny_klein, skeleton, [(merged, 1.0)]), embeds), atol=2)
    alone = render(sampler_with(tiny_klein, skeleton, [(one, 0.7)]), embeds)
    assert np.abs(both - alone).mean() > 1  # the second LoRA counts


def bfl_keys(path: Path, target: Path) -> Path:
    """The same LoRA under ai-toolkit/BFL names (`diffusion_model.single_blocks.N.linear1`, ...), for the layers
    whose names map one to one; the double blocks' fused qkv keep their diffusers names out of it."""
    names = {
        "attn.to_qkv_mlp_proj": ("single_transformer_blocks", "single_blocks", "linear1"),
        "attn.to_out": ("single_transformer_blocks", "single_blocks", "linear2"),
        "ff.linear_in": ("transformer_blocks", "double_blocks", "img_mlp.0"),
        "ff.linear_out": ("transformer_blocks", "double_blocks", "img_mlp.2"),
        "attn.to_out.0": ("transformer_blocks", "double_blocks", "img_attn.proj"),
    }
    out = {}
    for key, tensor in load_file(path).items():
        module, side = key.removeprefix("transformer.").rsplit(".lora_", 1)
        kind, index, linear = module.split(".", 2)
        if linear in names and names[linear][0] == kind:
            _, bfl_kind, bfl_linear = names[linear]
            out[f"diffusion_model.{bfl_kind}.{index}.{bfl_linear}.lora_{side}"] = tensor
    save_file(out, target)
    return target


def test_ai_toolkit_keys_render_like_diffusers_keys(tiny_klein: Path, skeleton, embeds, random_lora, tmp_path) -> None:
    aitoolkit = bfl_keys(random_lora(1), tmp_path / "aitoolkit.safetensors")
    fit = check_lora(aitoolkit, skeleton)
    kept = {k.removeprefix("transformer.") for k in fit.state_dict}
    diffusers = tmp_path / "diffusers.safetensors"
    save_file({k: v for k, v in load_file(random_lora(1)).items() if k.removeprefix("transformer.") in kept}, diffusers)
    assert fit.layers == 2 * 2 + 2 * 3  # 2 single blocks x 2 linears, 2 double blocks x 3
    np.testing.assert_array_equal(
        render(sampler_with(tiny_klein, skeleton, [(aitoolkit, 1.0)]), embeds),
        render(sampler_with(tiny_klein, skeleton, [(diffusers, 1.0)]), embeds),
    )


def edited(path: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = load_file(path)
    change(state)
    save_file(state, target)
    return target


Q_A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
Q_B = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
Q_LAYER = "transformer_blocks.0.attn.to_q"


def _flux1_width(state: dict) -> None:
    state[Q_A] = torch.zeros(4, 3072)  # FLUX.1's hidden size: a LoRA for another base model


def _unknown_block(state: dict) -> None:
    state[Q_A.replace("blocks.0", "blocks.9")] = state.pop(Q_A)


def _bare_keys(state: dict) -> None:
    for key in list(state):
        state[key.removeprefix("transformer.")] = state.pop(key)


def _no_b(state: dict) -> None:
    del state[Q_B]


def _other_rank(state: dict) -> None:
    state[Q_B] = torch.zeros(state[Q_B].shape[0], 2)


def _wide_output(state: dict) -> None:
    state[Q_B] = torch.zeros(48, 4)


def _not_a_linear(state: dict) -> None:
    state["transformer.transformer_blocks.0.attn.lora_A.weight"] = torch.zeros(4, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_flux1_width, f"{Q_A} has shape [4, 3072]: it takes 3072 inputs where {Q_LAYER} takes 32"),
        (_unknown_block, "has no layer named transformer_blocks.9.attn.to_q"),
        (_bare_keys, "is not for the transformer (no 'transformer.' prefix)"),
        (_no_b, "layer transformer_blocks.0.attn.to_q has no lora_B weight"),
        (_other_rank, "lora_A has rank 4 but lora_B rank 2"),
        (_wide_output, "it gives 48 outputs where transformer_blocks.0.attn.to_q gives 32"),
        (_not_a_linear, "no Linear layer (it is a Flux2Attention) named transformer_blocks.0.attn"),
    ],
)
def test_a_lora_that_does_not_fit_names_the_first_misfit(
    skeleton, random_lora, tmp_path: Path, change: Callable, message: str
) -> None:
    bad = edited(random_lora(1), tmp_path / "bad.safetensors", change)
    with pytest.raises(LoraMismatch) as refused:
        check_lora(bad, skeleton)
    assert message in str(refused.value)
    assert str(bad) in str(refused.value)


def test_unreadable_lora_files_are_named(skeleton, tmp_path: Path) -> None:
    with pytest.raises(LoraMismatch, match="no LoRA file at"):
        check_lora(tmp_path / "missing.safetensors", skeleton)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraMismatch, match="not a readable safetensors file"):
        check_lora(garbage, skeleton)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"diffusion_model.vector_in.lora_A.weight": torch.zeros(4, 8)}, unknown)
    with pytest.raises(LoraMismatch, match=re.escape("not a FLUX.2 LoRA diffusers can read")):
        check_lora(unknown, skeleton)


def test_a_fitting_lora_reports_layers_and_rank(skeleton, random_lora) -> None:
    fit = check_lora(random_lora(1, rank=6), skeleton)
    assert isinstance(fit, LoraFit) and (fit.layers, fit.rank) == (2 * 12 + 2 * 2, 6)


# --- fp8 ---------------------------------------------------------------------------------------------------------


def test_fp8_linear_is_close_to_the_linear_it_replaces() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 10, 64)
    exact, approx = linear(x), Float8Linear(linear)(x)
    assert approx.shape == exact.shape and approx.dtype == exact.dtype
    relative = (approx - exact).norm() / exact.norm()
    assert 0 < relative < 0.05


def test_fp8_converts_every_block_linear_and_still_renders(tiny_klein: Path, skeleton, embeds, random_lora) -> None:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein, text_encoder=None, tokenizer=None, vae=None)
    assert to_fp8(pipe.transformer) == 2 * 12 + 2 * 2
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_out[0], Float8Linear)
    exact = render(sampler_with(tiny_klein, skeleton, [(random_lora(1), 1.0)]), embeds)
    fp8 = render(sampler_with(tiny_klein, skeleton, [(random_lora(1), 1.0)], fp8=True), embeds)
    assert np.abs(fp8 - exact).mean() < 0.1 * np.abs(exact - exact.mean()).mean()


# --- bad input: size, model directory, prompts -------------------------------------------------------------------


def test_sizes_the_model_renders(tiny_klein: Path) -> None:
    assert size_multiple(tiny_klein) == 16
    check_size(64, 2048, 16)
    with pytest.raises(SizeError, match=r"width 100 is not a multiple of 16 \(this model renders 96 or 112\)"):
        check_size(100, 64, 16)
    with pytest.raises(SizeError, match="height 32 is outside 64-4096"):
        check_size(64, 32, 16)


def test_defaults_follow_the_model_kind(tiny_klein: Path, tmp_path: Path) -> None:
    assert model_defaults(tiny_klein) == {"steps": 50, "guidance": 4.0}
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    index = json.loads((tiny_klein / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    assert model_defaults(distilled) == {"steps": 4, "guidance": 1.0}


def test_an_incomplete_model_directory_names_the_missing_file(tiny_klein: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=re.escape("model_index.json missing")):
        check_components(tmp_path)
    copy = Path(shutil.copytree(tiny_klein, tmp_path / "copy"))
    check_components(copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    missing = "vae/diffusion_pytorch_model.safetensors (or its index) is missing"
    with pytest.raises(ModelDirError, match=re.escape(missing)):
        check_components(copy)
    # Sharded weights, as the real 9B ships them: every shard the index names must be there.
    weights = copy / "text_encoder" / "model.safetensors"
    weights.rename(copy / "text_encoder" / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (copy / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match=re.escape("text_encoder/model-00002-of-00002.safetensors is missing")):
        check_components(copy, ("text_encoder",))


def test_a_prompt_longer_than_the_encoder_reads_is_refused(tiny_klein: Path) -> None:
    check_prompt_lengths(tiny_klein, ["a red house by a lake"])
    with pytest.raises(PromptTooLong, match=r"prompt 2 is \d+ tokens .* at most 512"):
        check_prompt_lengths(tiny_klein, ["a cat", "a red house by a lake " * 120])
