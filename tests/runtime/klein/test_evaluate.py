"""Checkpoint evaluation on the tiny klein: probes render deterministically and scores move with the LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kleinstyle.contract.early_stop import ProbeScores
from kleinstyle.runtime.klein.arch import lora_linear_names
from kleinstyle.runtime.klein.evaluate import EvaluationSpec, Evaluator, PixelStatsEmbedder, VisionModelEmbedder
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS
from PIL import Image, ImageOps
from safetensors.torch import save_file

SMALL = EvaluationSpec(prompts=2, seeds=2, size=32, steps=2)


def _random_lora(model_dir: Path, path: Path, *, scale: float, seed: int = 0) -> Path:
    """A LoRA in the artifact format on every targetable linear, strong enough to change renders."""
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(model_dir / "transformer")
    modules = dict(transformer.named_modules())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name in lora_linear_names(transformer):
        linear = modules[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=generator)
        state[f"transformer.{name}.lora_B.weight"] = scale * torch.randn(linear.out_features, 4, generator=generator)
    save_file(state, path)
    return path


def make_evaluator(model: Path, references: Path, cache: Path) -> Evaluator:
    images = sorted(references.glob("*.png"))
    return Evaluator(model, images, "tokstyle", SMALL, cache_dir=cache, text_encoder_layers=TINY_TEXT_ENCODER_LAYERS)


@pytest.fixture
def evaluator(tiny_klein: Path, two_images: Path, tmp_path: Path) -> Evaluator:
    return make_evaluator(tiny_klein, two_images, tmp_path / "eval")


def test_base_model_is_its_own_adherence_baseline(evaluator: Evaluator) -> None:
    base = evaluator.score(0, None)
    assert len(base.style) == SMALL.prompts * SMALL.seeds
    assert base.adherence == pytest.approx((1.0,) * 4)
    assert all(-1.0 <= v <= 1.0 for v in base.style + base.leakage)


def test_a_lora_moves_the_scores_and_a_restart_reads_them_from_the_cache(
    evaluator: Evaluator, tiny_klein: Path, two_images: Path, tmp_path: Path
) -> None:
    strong = _random_lora(tiny_klein, tmp_path / "strong.safetensors", scale=0.5)
    before = [np.asarray(im) for im in evaluator.render()]
    first = evaluator.score(100, strong)
    assert min(first.adherence) < 0.999  # the LoRA changed what is drawn
    # The pipeline is back to the base model after scoring.
    for old, new in zip(before, evaluator.render(), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))
    restarted = make_evaluator(tiny_klein, two_images, tmp_path / "eval")
    restarted.pipe = None  # a restarted pod cannot render here: every score must come from the cache
    assert restarted.score(100, strong) == first


def test_a_different_file_at_the_same_step_is_rendered_again(
    evaluator: Evaluator, tiny_klein: Path, tmp_path: Path
) -> None:
    weak = _random_lora(tiny_klein, tmp_path / "weak.safetensors", scale=0.01, seed=1)
    strong = _random_lora(tiny_klein, tmp_path / "strong.safetensors", scale=0.5, seed=2)
    a, b = evaluator.score(100, weak), evaluator.score(100, strong)
    assert a != b
    assert sum(a.adherence) > sum(b.adherence)  # a tiny LoRA keeps the base content better
    assert isinstance(a, ProbeScores)


def test_pixel_stats_embedder_separates_style_from_content() -> None:
    embedder = PixelStatsEmbedder()
    gradient = Image.linear_gradient("L").resize((64, 64))
    warm = ImageOps.colorize(gradient, "darkred", "yellow")
    warm_mirrored = ImageOps.flip(warm)  # the gradient runs top to bottom
    cold = ImageOps.colorize(gradient, "navy", "cyan")
    style = embedder.style([warm, warm_mirrored, cold])
    content = embedder.content([warm, warm_mirrored, cold])
    # Flipping keeps the style (colours, texture) but not the layout; recolouring keeps the layout.
    assert style[0] @ style[1] > style[0] @ style[2]
    assert content[0] @ content[2] > content[0] @ content[1]
    assert torch.allclose(style.norm(dim=1), torch.ones(3)) and torch.allclose(content.norm(dim=1), torch.ones(3))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        EvaluationSpec(size=40)
    with pytest.raises(ValueError, match="prompts"):
        EvaluationSpec(prompts=0)


def test_a_vision_model_directory_plugs_in_as_the_embedder(tmp_path: Path) -> None:
    """The real-encoder path: a (tiny, random) DINOv2 saved in the transformers layout, loaded from its folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dino"
    )
    embedder = VisionModelEmbedder(tmp_path / "dino")
    pictures = [Image.linear_gradient("L").convert("RGB"), Image.radial_gradient("L").convert("RGB")]
    style, content = embedder.style(pictures), embedder.content(pictures)
    assert style.shape == (2, 32) and content.shape == (2, 16 * 32)
    assert torch.allclose(style.norm(dim=1), torch.ones(2))
    assert float(content[0] @ content[1]) < 0.999  # different pictures, different content
