"""The training options ai-toolkit users reach for, in the builtin trainer (docs/training-options.md): timestep bias
(ai-toolkit's content_or_style), noise offset, horizontal flip, EMA of the LoRA weights and gradient checkpointing;
and the sign of the velocity the trainer regresses, pinned against diffusers' own sampler."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.models.transformers import transformer_flux2
from kleinstyle.contract.plan import plan_training
from kleinstyle.runtime.klein.batches import seeded_generator
from kleinstyle.runtime.klein.dataset import read_dataset, with_mirror_images
from kleinstyle.runtime.klein.encode import encode_dataset
from kleinstyle.runtime.klein.lora_train import (
    TrainSettings,
    add_lora,
    draw_noise,
    flow_matching_loss,
    sample_sigmas,
    train_lora,
)
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS
from kleinstyle.runtime.train.settings import train_settings
from PIL import Image, ImageOps
from safetensors.torch import load_file

from .test_lora_train import QUICK as LORA_QUICK

QUICK = replace(LORA_QUICK, steps=4, checkpoint_every=1, seed=5)  # a checkpoint every step


def _state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "training_state.pt", weights_only=True)


# --- the velocity sign ------------------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Stands in for the transformer: returns a free prediction (so the loss's gradient reveals the target it
    regresses) and records what the trainer fed it."""

    def __init__(self, packed_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.prediction = torch.nn.Parameter(torch.zeros(packed_shape))
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, *, hidden_states: torch.Tensor, timestep: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        self.seen = {"hidden_states": hidden_states.detach(), "timestep": timestep.detach()}
        return (self.prediction,)


@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.9])
def test_velocity_sign_one_euler_step_of_the_target_lands_on_the_clean_latents(tiny_klein: Path, sigma: float) -> None:
    """What the loss regresses, stepped by diffusers' FlowMatchEulerDiscreteScheduler (Flux2KleinPipeline's sampler)
    from the noise level the transformer was shown down to 0, must give back the clean latents. A flipped target
    (latents - noise) lands at x0 + 2 sigma (x0 - noise) instead, and fails."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 8, 4, 4), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    embeds = torch.randn((1, 5, 16), generator=generator)
    packed = Flux2KleinPipeline._pack_latents(latents)
    oracle = Oracle(tuple(packed.shape))

    loss = flow_matching_loss(oracle, latents, embeds, noise, torch.tensor([sigma]))
    loss.backward()
    assert oracle.prediction.grad is not None
    # loss = mean((p - target)^2): at p = 0 its gradient is -2 target / N.
    target = -oracle.prediction.grad * packed.numel() / 2

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_klein, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[sigma], mu=0.0)  # mu 0: the dynamic shift leaves sigma as it is
    timestep = scheduler.timesteps[0]
    # The trainer's noisy input is the scheduler's own noising at that timestep, and the transformer sees
    # timestep / 1000 = sigma, as the pipeline passes it (pipeline_flux2_klein.py: `timestep=timestep / 1000`).
    torch.testing.assert_close(
        oracle.seen["hidden_states"],
        Flux2KleinPipeline._pack_latents(scheduler.scale_noise(latents, timestep[None], noise)),
    )
    torch.testing.assert_close(oracle.seen["timestep"], (timestep / 1000)[None])

    stepped = scheduler.step(target, timestep, oracle.seen["hidden_states"], return_dict=False)[0]
    torch.testing.assert_close(stepped, packed, rtol=1e-5, atol=1e-5)


def test_the_pipeline_shows_the_transformer_its_sigma_as_the_trainer_does(tiny_klein: Path) -> None:
    """Training passes `timestep = sigma`; generation must pass the same scale, or the velocity is learned for
    noise levels the sampler never asks about."""
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True
    )
    pipe(
        prompt="tokstyle. a red house",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        text_encoder_out_layers=TINY_TEXT_ENCODER_LAYERS,
        output_type="latent",
    )
    assert seen and seen == pytest.approx([float(s) for s in pipe.scheduler.sigmas[: len(seen)]], rel=1e-3)


# --- timestep bias (content_or_style) ----------------------------------------------------------------------------


def _logit_normal_cdf(x: float) -> float:
    """P(sigmoid(z) <= x) for a standard normal z: the distribution of ai-toolkit's sigmoid timestep grid."""
    return 0.5 * (1 + math.erf(math.log(x / (1 - x)) / math.sqrt(2)))


def _expected_cdf(bias: str, x: float, n: int = 1000) -> float:
    """P(s <= x) under ai-toolkit's scheme, exactly. The grid holds n draws of F sorted descending; `content` takes
    index floor(n u^3), `style` floor(n (1 - u^3)) (clamped to n - 1). The value at index i is the (n - i)-th smallest
    draw, which is <= x exactly when at least n - i of the n draws are: a binomial tail in F(x). `balanced` draws F
    directly. (F(x)^(1/3) for style, 1 - (1 - F(x))^(1/3) for content is the large-n limit, off by up to 0.03 at the
    ends.)"""
    p = _logit_normal_cdf(x)
    if bias == "balanced":
        return p
    log_pmf = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        for k in range(n + 1)
    ]
    tail = [0.0] * (n + 2)  # tail[k] = P(Binomial(n, p) >= k)
    for k in range(n, -1, -1):
        tail[k] = tail[k + 1] + math.exp(log_pmf[k])

    def index_probability(i: int) -> float:
        """P(index = i): u^3 in [i/n, (i+1)/n) for content, 1 - u^3 there for style."""
        low, high = (i / n, (i + 1) / n) if bias == "content" else (1 - (i + 1) / n, 1 - i / n)
        return high ** (1 / 3) - low ** (1 / 3)

    return sum(index_probability(i) * tail[n - i] for i in range(n))


@pytest.mark.parametrize("bias", ["balanced", "style", "content"])
def test_timestep_bias_follows_ai_toolkits_distribution(bias: str) -> None:
    draws = torch.cat(
        [sample_sigmas(4, seeded_generator(11, "bias-test", i), bias=bias) for i in range(4000)]  # type: ignore[arg-type]
    )
    assert draws.min() > 0 and draws.max() < 1
    grid = [i / 50 for i in range(1, 50)]
    gap = max(
        abs(float((draws <= x).float().mean()) - _expected_cdf(bias, x)) for x in grid
    )  # a Kolmogorov-Smirnov distance on a grid, 16000 draws
    assert gap < 0.02, gap
    # And so, plainly: style trains mostly at low noise, content at high noise.
    median = float(draws.median())
    assert {"balanced": 0.45 < median < 0.55, "style": 0.2 < median < 0.28, "content": 0.72 < median < 0.8}[bias], (
        median
    )


def test_timestep_bias_on_the_uniform_grid_indexes_ai_toolkits_linear_timesteps() -> None:
    style = torch.cat(
        [sample_sigmas(1, seeded_generator(2, "u", i), sampling="uniform", bias="style") for i in range(3000)]
    )
    # linspace(1000, 1, 1000)[floor(1000 (1 - u^3))] / 1000 ~ 1 - (1 - u^3) = u^3: P(s <= x) = x^(1/3).
    for x in (0.05, 0.2, 0.5, 0.8):
        assert abs(float((style <= x).float().mean()) - x ** (1 / 3)) < 0.03


def test_each_bias_trains_and_the_setting_guards_resume(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    losses = {}
    for bias in ("style", "content"):
        cfg = replace(QUICK, steps=2, checkpoint_every=2, timestep_bias=bias)  # type: ignore[arg-type]
        losses[bias] = train_lora(tiny_klein, two_images, tmp_path / bias, cfg).losses
    assert losses["style"] != losses["content"]
    with pytest.raises(ValueError, match="timestep_bias"):
        replace(QUICK, timestep_bias="detail")  # type: ignore[arg-type]


# --- noise offset -----------------------------------------------------------------------------------------------


def test_noise_offset_shifts_each_sample_and_channel_by_one_normal_draw() -> None:
    shape = (2, 6, 8, 8)
    plain = draw_noise(shape, seeded_generator(0, "n"))
    offset = draw_noise(shape, seeded_generator(0, "n"), 0.1)
    shift = offset - plain  # same generator: the offset is drawn after the noise
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))
    assert shift[:, :, 0, 0].abs().min() > 0 and 0.02 < float(shift[:, :, 0, 0].std()) < 0.3
    torch.testing.assert_close(draw_noise(shape, seeded_generator(0, "n"), 1e-7), plain)  # ai-toolkit: < 1e-6 is none


# --- flip -------------------------------------------------------------------------------------------------------


def test_flip_trains_every_reference_and_its_mirror_image(
    tiny_klein: Path, two_images: Path, dataset: Any, captions: tuple[str, ...], tmp_path: Path
) -> None:
    mirrors = dataset(captions[:2], name="mirrors")
    for image in sorted(mirrors.glob("*.png")):
        ImageOps.mirror(Image.open(image)).save(image)

    def encode(samples: list) -> list[torch.Tensor]:
        encoded = encode_dataset(
            tiny_klein,
            samples,
            resolution=64,
            bucket_multiple=32,
            max_sequence_length=64,
            layers=None,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        return encoded.latents

    doubled = encode(with_mirror_images(read_dataset(two_images)))
    assert len(doubled) == 4
    for got, expected in zip(doubled, encode(read_dataset(two_images)) + encode(read_dataset(mirrors)), strict=True):
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(doubled[0], doubled[2])

    cfg = replace(QUICK, steps=2, checkpoint_every=2, flip_horizontal=True)
    result = train_lora(tiny_klein, two_images, tmp_path / "flip", cfg)
    meta = json.loads((result.checkpoints[-1] / "metadata.json").read_text())
    assert meta["dataset"]["images"] == 2 and meta["dataset"]["buckets"] == {"64x64": 4}
    assert meta["settings"]["flip_horizontal"] is True


# --- EMA --------------------------------------------------------------------------------------------------------


def _initial_lora(tiny_klein: Path, cfg: TrainSettings) -> dict[str, torch.Tensor]:
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein, subfolder="transformer")
    transformer.requires_grad_(False)
    add_lora(transformer, cfg)
    return {n: p.detach().float().clone() for n, p in transformer.named_parameters() if p.requires_grad}


def test_ema_checkpoints_hold_the_decayed_average_and_train_the_raw_weights_unchanged(
    tiny_klein: Path, two_images: Path, tmp_path: Path
) -> None:
    decay = 0.6
    cfg = replace(QUICK, ema_decay=decay)
    result = train_lora(tiny_klein, two_images, tmp_path / "ema", cfg)
    plain = train_lora(tiny_klein, two_images, tmp_path / "plain", QUICK)

    # ai-toolkit's update after every optimizer step, from the initial LoRA: e <- e - (1 - decay) (e - w).
    expected = _initial_lora(tiny_klein, cfg)
    for checkpoint in result.checkpoints:  # one per step
        weights = _state(checkpoint)["adapter"]
        expected = {n: e - (1 - decay) * (e - weights[n]) for n, e in expected.items()}
        ema = _state(checkpoint)["ema"]
        for name in expected:
            torch.testing.assert_close(ema[name], expected[name], rtol=1e-5, atol=1e-7)

    # The EMA only watches: the raw weights and the losses are those of the same run without it.
    assert result.losses == plain.losses
    last, last_plain = _state(result.checkpoints[-1])["adapter"], _state(plain.checkpoints[-1])["adapter"]
    for name, tensor in last_plain.items():
        torch.testing.assert_close(last[name], tensor, rtol=0, atol=0)

    # The published LoRA is the average (alpha / rank baked into lora_B), not the raw weights.
    published = load_file(tmp_path / "ema" / "lora.safetensors")
    ema = _state(result.checkpoints[-1])["ema"]
    scale = cfg.lora_alpha / cfg.rank
    checked = 0
    for name, shadow in ema.items():
        module, kind = name.split(".lora_")[0], "A" if ".lora_A." in name else "B"
        key = f"transformer.{module}.lora_{kind}.weight"
        torch.testing.assert_close(published[key], shadow * (scale if kind == "B" else 1.0), rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == len(ema)
    raw_b = next(n for n in last if ".lora_B." in n)
    assert not torch.allclose(ema[raw_b], last[raw_b])


def test_an_ema_run_resumes_to_the_same_average(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, ema_decay=0.6, checkpoint_every=4)
    uninterrupted = train_lora(tiny_klein, two_images, tmp_path / "whole", cfg)
    polls: list[int] = []

    def stop_after_two() -> bool:
        polls.append(1)
        return len(polls) > 2

    first = train_lora(tiny_klein, two_images, tmp_path / "resumed", cfg, should_stop=stop_after_two)
    assert first.stopped_early and first.steps_done == 2
    resumed = train_lora(tiny_klein, two_images, tmp_path / "resumed", cfg)
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    for key in ("ema", "adapter"):
        expected, got = _state(uninterrupted.checkpoints[-1])[key], _state(resumed.checkpoints[-1])[key]
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)
    whole, again = load_file(uninterrupted.lora_path), load_file(tmp_path / "resumed" / "lora.safetensors")
    for key, tensor in whole.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_from_before_the_options_resumes(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, steps=2, checkpoint_every=2)
    train_lora(tiny_klein, two_images, tmp_path, cfg)
    for meta_file in (tmp_path / "checkpoints").glob("*/metadata.json"):
        meta = json.loads(meta_file.read_text())
        for key in ("timestep_bias", "noise_offset", "flip_horizontal", "ema_decay"):
            del meta["settings"][key]
        meta_file.write_text(json.dumps(meta))
    assert train_lora(tiny_klein, two_images, tmp_path, cfg).resumed_from == 2


# --- gradient checkpointing -------------------------------------------------------------------------------------


def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same(
    tiny_klein: Path, two_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    forward = transformer_flux2.Flux2SingleTransformerBlock.forward

    def counted(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformer_flux2.Flux2SingleTransformerBlock, "forward", counted)
    cfg = replace(QUICK, steps=2, checkpoint_every=2)
    runs, counts = {}, {}
    for on in (False, True):
        calls["n"] = 0
        runs[on] = train_lora(tiny_klein, two_images, tmp_path / str(on), replace(cfg, gradient_checkpointing=on))
        counts[on] = calls["n"]
    assert counts[True] == 2 * counts[False] > 0  # each block runs again in the backward pass
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-6)
    with_, without = _state(runs[True].checkpoints[-1])["adapter"], _state(runs[False].checkpoints[-1])["adapter"]
    for name, tensor in without.items():
        torch.testing.assert_close(with_[name], tensor, rtol=1e-5, atol=1e-7)


# --- from the plan ----------------------------------------------------------------------------------------------


def test_the_plans_options_reach_the_builtin_trainer() -> None:
    default = train_settings(plan_training(12, {}))
    assert (default.timestep_bias, default.noise_offset, default.flip_horizontal, default.ema_decay) == (
        "balanced",
        0.0,
        False,
        None,
    )
    assert default.gradient_checkpointing is False  # the builtin default: faster, and klein 9B fits without it
    training = {
        "timestepBias": "style",
        "noiseOffset": 0.05,
        "flipHorizontal": True,
        "emaDecay": 0.999,
        "gradientCheckpointing": True,
    }
    cfg = train_settings(plan_training(12, {"training": training}))
    assert (cfg.timestep_bias, cfg.noise_offset, cfg.flip_horizontal, cfg.ema_decay, cfg.gradient_checkpointing) == (
        "style",
        0.05,
        True,
        0.999,
        True,
    )
