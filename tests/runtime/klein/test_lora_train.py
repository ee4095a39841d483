"""The builtin Klein LoRA trainer on the tiny random pipeline: it learns, checkpoints, resumes, and what it
publishes loads into a fresh pipeline."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from kleinstyle.runtime.klein.batches import seeded_generator
from kleinstyle.runtime.klein.dataset import DatasetError, read_dataset, training_size
from kleinstyle.runtime.klein.encode import ModelDirError, encode_dataset
from kleinstyle.runtime.klein.lora_train import (
    ResumeError,
    StepInfo,
    TrainResult,
    TrainSettings,
    add_lora,
    flow_matching_loss,
    merge_lora,
    train_lora,
)
from safetensors import safe_open
from safetensors.torch import load_file

# Small and fast, but with alpha != rank (so the baked scale is exercised) and float32 files (exact comparisons).
QUICK = TrainSettings(
    rank=4,
    alpha=8.0,
    learning_rate=1e-2,
    optimizer="adamw",
    steps=6,
    checkpoint_every=2,
    resolution=64,
    caption_dropout=0.0,
    seed=3,
    save_dtype="float32",
)


class Killed(Exception):
    """Stands in for the pod dying mid-step."""


@pytest.fixture(scope="module")
def reference(tiny_klein: Path, two_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """One uninterrupted QUICK run, shared by the tests that inspect its output."""
    output = tmp_path_factory.mktemp("reference")
    seen: list[tuple[int, Path, float]] = []
    result = train_lora(tiny_klein, two_images, output, QUICK, on_checkpoint=lambda *a: seen.append(a))
    assert [(step, path.name) for step, path, _ in seen] == [(2, "step_000002"), (4, "step_000004"), (6, "step_000006")]
    return output, result


def _adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "training_state.pt", weights_only=True)["adapter"]


# --- learning ------------------------------------------------------------------------------------------------


def test_loss_falls_on_a_fixed_batch(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, steps=30, checkpoint_every=30, scheduler="constant", optimizer="adafactor", seed=1)
    result = train_lora(tiny_klein, two_images, tmp_path, cfg)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.95 * first, result.losses

    # The same fall, measured without sampling noise: fixed noise and timesteps on the training latents, base model
    # versus base model + the published LoRA (so this also checks the file carries what was trained).
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    encoded = encode(tiny_klein, two_images, resolution=64, max_sequence_length=512)
    before = _stable_loss(pipe.transformer, encoded)
    pipe.load_lora_weights(result.lora_path)
    after = _stable_loss(pipe.transformer, encoded)
    assert after < 0.9 * before, (before, after)


@torch.no_grad()
def _stable_loss(transformer: torch.nn.Module, encoded) -> float:
    generator = seeded_generator(0, "validation")
    total = []
    for index, latents in enumerate(encoded.latents):
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(latents.shape, generator=generator)
            loss = flow_matching_loss(transformer, latents, encoded.captions[index], noise, torch.tensor([sigma]))
            total.append(float(loss))
    return float(np.mean(total))


def encode(model: Path, folder: Path, *, resolution: int, max_sequence_length: int):
    """The dataset in `folder` encoded on the CPU as the trainer encodes it (buckets of 32 px)."""
    return encode_dataset(
        model,
        read_dataset(folder),
        resolution=resolution,
        bucket_multiple=32,
        max_sequence_length=max_sequence_length,
        layers=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


# --- checkpoints and the published LoRA --------------------------------------------------------------------


def test_checkpoints_at_the_planned_steps(reference: tuple[Path, TrainResult]) -> None:
    output, result = reference
    assert [p.name for p in result.checkpoints] == ["step_000002", "step_000004", "step_000006"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == [p.name for p in result.checkpoints]
    assert (result.steps_done, result.stopped_early, len(result.losses)) == (6, False, 6)
    assert result.final_loss == result.losses[-1]
    for checkpoint in result.checkpoints:
        assert {p.name for p in checkpoint.iterdir()} == {"lora.safetensors", "training_state.pt", "metadata.json"}
        meta = json.loads((checkpoint / "metadata.json").read_text())
        step = int(checkpoint.name.removeprefix("step_"))
        assert meta["step"] == step and meta["total_steps"] == 6
        assert meta["loss"] == pytest.approx(result.losses[step - 1])
        assert meta["settings"] == QUICK.as_dict()
        assert meta["text_encoder_layers"] == [1, 2, 3]
        assert {"torch", "diffusers", "peft", "transformers"} <= meta["versions"].keys()
    assert (output / "lora.safetensors").read_bytes() == (result.checkpoints[-1] / "lora.safetensors").read_bytes()
    assert result.lora_path == output / "lora.safetensors"


def test_published_lora_is_diffusers_keys_with_alpha_baked_in(reference: tuple[Path, TrainResult]) -> None:
    output, result = reference
    published = load_file(output / "lora.safetensors")
    raw = _adapter(result.checkpoints[-1])
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in published)
    assert len(published) == 2 * (2 * 12 + 2 * 2)
    # Trained: one lora_A per fused q/k/v (to_q's, shared by to_k and to_v; add_q_proj's by add_k/add_v).
    assert len(raw) == len(published) - 2 * 2 * 2
    for block in ("transformer.transformer_blocks.0.attn.", "transformer.transformer_blocks.1.attn."):
        for q, k, v in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
            down = published[f"{block}{q}.lora_A.weight"]
            assert torch.equal(published[f"{block}{k}.lora_A.weight"], down)
            assert torch.equal(published[f"{block}{v}.lora_A.weight"], down)
            assert not torch.equal(published[f"{block}{k}.lora_B.weight"], published[f"{block}{v}.lora_B.weight"])
    scale = QUICK.lora_alpha / QUICK.rank
    for name, tensor in raw.items():
        key = "transformer." + name.replace(".default.weight", ".weight")
        expected = tensor * scale if ".lora_B." in name else tensor
        torch.testing.assert_close(published[key], expected)
    with safe_open(output / "lora.safetensors", "pt") as handle:
        header = handle.metadata()
    assert header["kleinstyle.format"] == "klein-diffusers-v1" and header["kleinstyle.alpha_baked"] == "8.0"


def test_final_lora_loads_into_a_fresh_pipeline_and_changes_its_output(
    tiny_klein: Path, reference: tuple[Path, TrainResult], render_tiny
) -> None:
    output, _ = reference
    base = render_tiny(tiny_klein, None)
    styled = render_tiny(tiny_klein, output / "lora.safetensors")
    assert styled.shape == base.shape
    assert np.abs(styled - base).mean() > 1e-3
    np.testing.assert_array_equal(render_tiny(tiny_klein, output / "lora.safetensors"), styled)


# --- stop, kill, resume --------------------------------------------------------------------------------------


def test_stopped_run_resumes_to_the_same_weights(
    tiny_klein: Path, two_images: Path, tmp_path: Path, reference: tuple[Path, TrainResult]
) -> None:
    _, uninterrupted = reference
    polls: list[int] = []

    def stop_after_three() -> bool:
        polls.append(1)
        return len(polls) > 3  # polled before each step: steps 1-3 run, then the stop

    first = train_lora(tiny_klein, two_images, tmp_path, QUICK, should_stop=stop_after_three)
    assert first.stopped_early and first.steps_done == 3 and first.lora_path is None
    assert [p.name for p in first.checkpoints] == ["step_000002", "step_000003"]
    assert not (tmp_path / "lora.safetensors").exists()

    second = train_lora(tiny_klein, two_images, tmp_path, QUICK)
    assert second.resumed_from == 3 and not second.stopped_early and second.steps_done == 6
    _assert_same_run(second, uninterrupted, tmp_path)


def test_killed_run_resumes_from_its_latest_complete_checkpoint(
    tiny_klein: Path, two_images: Path, tmp_path: Path, reference: tuple[Path, TrainResult]
) -> None:
    _, uninterrupted = reference

    def die_at_five(info: StepInfo) -> None:
        if info.step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_lora(tiny_klein, two_images, tmp_path, QUICK, on_step=die_at_five)
    # A half-written checkpoint from the moment of death must be ignored and cleaned up.
    (tmp_path / "checkpoints" / ".step_000006.tmp-dead").mkdir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".step_000006.tmp-dead",
        "step_000002",
        "step_000004",
    ]

    resumed = train_lora(tiny_klein, two_images, tmp_path, QUICK)
    assert resumed.resumed_from == 4
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())
    _assert_same_run(resumed, uninterrupted, tmp_path)


def _assert_same_run(resumed: TrainResult, uninterrupted: TrainResult, output: Path) -> None:
    expected, actual = _adapter(uninterrupted.checkpoints[-1]), _adapter(resumed.checkpoints[-1])
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    published = load_file(output / "lora.safetensors")
    reference = load_file(uninterrupted.lora_path)
    for key, tensor in reference.items():
        torch.testing.assert_close(published[key], tensor, rtol=1e-5, atol=1e-7)


def test_a_finished_run_is_not_trained_again(
    tiny_klein: Path, two_images: Path, reference: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    output, uninterrupted = reference
    copy = shutil.copytree(output, tmp_path / "copy")
    (copy / "lora.safetensors").unlink()  # killed after the last checkpoint, before publishing
    again = train_lora(tiny_klein, two_images, copy, QUICK)
    assert again.steps_done == 6 and again.losses == uninterrupted.losses and again.resumed_from == 6
    assert (copy / "lora.safetensors").read_bytes() == (output / "lora.safetensors").read_bytes()


def test_resume_refuses_other_settings_or_data(
    tiny_klein: Path,
    two_images: Path,
    reference: tuple[Path, TrainResult],
    tmp_path: Path,
    dataset: Callable[..., Path],
    captions: tuple[str, ...],
) -> None:
    output, _ = reference
    copy = shutil.copytree(output, tmp_path / "copy")
    with pytest.raises(ResumeError, match="learning_rate"):
        train_lora(tiny_klein, two_images, copy, replace(QUICK, learning_rate=1e-3))
    other = dataset(["tokstyle. something else", captions[1]])
    with pytest.raises(ResumeError, match="other data"):
        train_lora(tiny_klein, other, copy, QUICK)
    # Settings that change neither arithmetic nor draws may differ.
    again = train_lora(tiny_klein, two_images, copy, replace(QUICK, checkpoint_every=3))
    assert again.steps_done == 6


def test_sigterm_saves_a_checkpoint_and_stops(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)

    def terminate_at_two(info: StepInfo) -> None:
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train_lora(
        tiny_klein,
        two_images,
        tmp_path,
        replace(QUICK, checkpoint_every=5),
        on_step=terminate_at_two,
        handle_sigterm=True,
    )
    assert result.stopped_early and result.steps_done == 2
    assert [p.name for p in result.checkpoints] == ["step_000002"]
    assert signal.getsignal(signal.SIGTERM) is before


# --- plan semantics --------------------------------------------------------------------------------------------


def test_full_caption_dropout_trains_only_on_the_empty_prompt(
    tiny_klein: Path, dataset: Callable[..., Path], tmp_path: Path, captions: tuple[str, ...]
) -> None:
    """With dropout 1.0 the captions, trigger word included, never reach the model: a dataset with other captions
    (or none at all) trains the very same weights. With dropout 0 they do matter."""
    captioned = dataset(list(captions[:2]), name="captioned")
    recaptioned = dataset(["other words entirely", "bd9style. a dog"], name="recaptioned")
    uncaptioned = dataset([None, None], name="uncaptioned")
    cfg = replace(QUICK, steps=2, checkpoint_every=2)

    def lora(data: Path, dropout: float) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{data.name}-{dropout}"
        return load_file(train_lora(tiny_klein, data, out, replace(cfg, caption_dropout=dropout)).lora_path)

    dropped = lora(captioned, 1.0)
    for other in (lora(recaptioned, 1.0), lora(uncaptioned, 1.0)):
        assert all(torch.equal(dropped[k], other[k]) for k in dropped)
    kept, kept_other = lora(captioned, 0.0), lora(recaptioned, 0.0)
    assert not all(torch.equal(kept[k], kept_other[k]) for k in kept)


def test_single_target_trains_only_single_stream_blocks(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, steps=1, checkpoint_every=1, target="single")
    result = train_lora(tiny_klein, two_images, tmp_path, cfg)
    keys = load_file(result.lora_path).keys()
    assert len(keys) == 2 * 2 * 2
    assert all(k.startswith("transformer.single_transformer_blocks.") for k in keys)
    meta = json.loads((result.checkpoints[-1] / "metadata.json").read_text())
    assert all(name.startswith("single_transformer_blocks.") for name in meta["lora"]["target_modules"])


def test_aspect_ratio_buckets_batch_within_a_bucket(
    tiny_klein: Path, dataset: Callable[..., Path], captions: tuple[str, ...]
) -> None:
    folder = dataset(list(captions), sizes=[(64, 64), (60, 120), (70, 70)])
    encoded = encode(tiny_klein, folder, resolution=64, max_sequence_length=64)
    assert encoded.buckets == {(64, 64): [0, 2], (32, 96): [1]}  # 60x120 is never upscaled to 32x128
    # latents: 4 channels x 2x2 patches, sides / 16 (VAE 8x, then 2x2 patchify)
    assert encoded.latents[0].shape == (1, 16, 4, 4) and encoded.latents[1].shape == (1, 16, 6, 2)
    assert encoded.captions[0].shape == (1, 64, 96) and encoded.empty.shape == (1, 64, 96)


def test_bad_inputs_fail_before_any_work(
    tiny_klein: Path, two_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_encoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad input must be refused before the encoders load")

    monkeypatch.setattr("kleinstyle.runtime.klein.lora_train.encode_dataset", no_encoding)
    with pytest.raises(ModelDirError, match=r"model_index\.json"):
        train_lora(tmp_path / "no-model", two_images, tmp_path / "out", QUICK)
    with pytest.raises(DatasetError, match="no images"):
        train_lora(tiny_klein, tmp_path, tmp_path / "out", QUICK)
    with pytest.raises(ValueError, match="match no LoRA-targetable"):
        train_lora(tiny_klein, two_images, tmp_path / "out", replace(QUICK, target=("single_blocks.0.",)))
    assert not (tmp_path / "out" / "checkpoints").exists()


# --- two-step building blocks ------------------------------------------------------------------------------------


def test_merging_a_lora_into_the_base_renders_like_loading_it(
    tiny_klein: Path, reference: tuple[Path, TrainResult], render_tiny
) -> None:
    output, _ = reference
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    assert merge_lora(pipe.transformer, output / "lora.safetensors") > 0
    loaded = render_tiny(tiny_klein, output / "lora.safetensors")
    np.testing.assert_allclose(render_tiny.sample(pipe), loaded, atol=2e-4)


def test_merging_a_lora_for_other_layers_is_refused(tiny_klein: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    transformer = Flux2KleinPipeline.from_pretrained(tiny_klein).transformer
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"transformer.blocks.99.attn.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2)}, bad
    )
    with pytest.raises(ValueError, match=r"blocks\.99"):
        merge_lora(transformer, bad)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("tokstyle. a red house", "a red house"),
        ("tokstyle, a cat", "a cat"),
        ("tokstyle a tree", "a tree"),
        ("a dog, tokstyle", "a dog, tokstyle"),
        ("tokstyle", ""),
    ],
)
def test_strip_trigger(caption: str, expected: str) -> None:
    from kleinstyle.runtime.text.captions import without_trigger

    assert without_trigger(caption, "tokstyle") == expected


# --- fp8 base weights --------------------------------------------------------------------------------------------


def test_fp8_base_layers_pass_gradients_like_the_linear_they_replace() -> None:
    from kleinstyle.runtime.klein.fp8 import Float8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = Float8Linear(linear)
    x = torch.randn(5, 64, requires_grad=True)
    x8 = x.detach().clone().requires_grad_(True)
    (linear(x) ** 2).sum().backward()
    (fp8(x8) ** 2).sum().backward()
    assert x8.grad is not None and fp8.weight.grad is None  # the base stays frozen
    cosine = torch.nn.functional.cosine_similarity(x.grad.flatten(), x8.grad.flatten(), dim=0)
    assert cosine > 0.99


def test_fp8_base_training_learns_like_bf16_base(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, steps=20, checkpoint_every=20, scheduler="constant", optimizer="adafactor", seed=1)
    plain = train_lora(tiny_klein, two_images, tmp_path / "plain", cfg)
    fp8 = train_lora(tiny_klein, two_images, tmp_path / "fp8", replace(cfg, fp8_base=True))
    assert np.mean(fp8.losses[-5:]) < 0.95 * np.mean(fp8.losses[:5]), fp8.losses
    a, b = load_file(plain.lora_path), load_file(fp8.lora_path)
    assert a.keys() == b.keys()
    # The same direction of learning, within fp8's rounding of the base (about 3% per weight on e4m3).
    cosines = [float(torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0)) for k in a]
    assert np.mean(cosines) > 0.9 and min(cosines) > 0.5, cosines


# --- the recipe as ai-toolkit trains it: init, q/k/v capacity, bucket sizes, the planned checkpoints -------------


def test_lora_a_starts_kaiming_uniform_and_q_k_v_share_it(tiny_klein: Path) -> None:
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein, subfolder="transformer")
    targets = add_lora(transformer, replace(QUICK, rank=16))
    modules = dict(transformer.named_modules())
    for name in targets:
        down = modules[name].lora_A["default"].weight
        fan_in = down.shape[1]
        # peft's default (ai-toolkit's too): uniform on +-1/sqrt(fan_in), std 1/sqrt(3 fan_in); never gaussian 1/r.
        down = down.detach()
        assert float(down.abs().max()) <= fan_in**-0.5
        assert float(down.std()) == pytest.approx((3 * fan_in) ** -0.5, rel=0.2)
        assert float(modules[name].lora_B["default"].weight.detach().abs().max()) == 0.0
    attn = transformer.transformer_blocks[0].attn
    assert attn.to_k.lora_A["default"].weight is attn.to_q.lora_A["default"].weight
    assert attn.add_v_proj.lora_A["default"].weight is attn.add_q_proj.lora_A["default"].weight
    assert attn.to_out[0].lora_A["default"].weight is not attn.to_q.lora_A["default"].weight
    # One trainable A per fused qkv: the optimizer sees 4 fewer matrices per double block than there are targets.
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets) - 4 * len(transformer.transformer_blocks)


@pytest.mark.parametrize(
    ("size", "trained"),
    [
        ((512, 512), (512, 512)),  # smaller than the resolution: its own size, never upscaled
        ((600, 400), (576, 384)),
        ((3000, 2000), (1248, 832)),  # larger: downscaled to about 1024^2 at 3:2
        ((1024, 1024), (1024, 1024)),
        ((4000, 500), (1920, 480)),  # 8:1 is cropped to 4:1
        ((500, 2000), (480, 1920)),
    ],
)
def test_an_image_trains_at_its_bucket_and_never_above_its_own_size(size, trained) -> None:
    width, height = training_size(size, 1024, 32)
    assert (width, height) == trained
    assert width <= size[0] and height <= size[1] and width % 32 == 0 and height % 32 == 0


def test_a_small_reference_is_encoded_at_its_own_size(tiny_klein: Path, dataset) -> None:
    folder = dataset(["tok. a square", "tok. a wide one"], sizes=[(96, 96), (400, 300)])
    encoded = encode(tiny_klein, folder, resolution=1024, max_sequence_length=32)
    assert sorted(encoded.buckets) == [(96, 96), (352, 288)]  # not (1024, 1024) and (1184, 864)
    assert tuple(encoded.latents[0].shape[-2:]) == (96 // 16, 96 // 16)


def test_the_planned_extra_checkpoint_is_written(tiny_klein: Path, two_images: Path, tmp_path: Path) -> None:
    cfg = replace(QUICK, steps=6, checkpoint_every=4, checkpoint_steps=(3,))
    result = train_lora(tiny_klein, two_images, tmp_path / "out", cfg)
    assert [p.name for p in result.checkpoints] == ["step_000003", "step_000004", "step_000006"]
