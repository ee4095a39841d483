"""Checkpoint evaluation on the tiny klein: probes render deterministically, each score comes from the model it
names (CSD for style, a text-image model for adherence, an image encoder for leakage, or the offline stand-ins),
a held-out loss is measured, and every step's probes land in one gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kleinstyle.contract.early_stop import Judged, ProbeScores, Verdict
from kleinstyle.runtime.klein.arch import lora_linear_names
from kleinstyle.runtime.klein.dataset import read_dataset
from kleinstyle.runtime.klein.evaluate import (
    CSD_PROJECTION,
    CSDStyleEmbedder,
    EvaluationSpec,
    Evaluator,
    PixelStatsEmbedder,
    TextImageScorer,
    VisionModelEmbedder,
)
from kleinstyle.runtime.klein.tiny import TINY_TEXT_ENCODER_LAYERS
from kleinstyle.runtime.klein.tiny_evaluators import write_tiny_clip, write_tiny_csd, write_tiny_dinov2
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


def make_evaluator(model: Path, references: Path, cache: Path, **kwargs) -> Evaluator:
    images = sorted(references.glob("*.png"))
    return Evaluator(
        model, images, "tokstyle", SMALL, cache_dir=cache, text_encoder_layers=TINY_TEXT_ENCODER_LAYERS, **kwargs
    )


@pytest.fixture
def evaluator(tiny_klein: Path, two_images: Path, tmp_path: Path) -> Evaluator:
    return make_evaluator(tiny_klein, two_images, tmp_path / "eval")


def test_without_a_text_model_adherence_is_not_measured(evaluator: Evaluator) -> None:
    base = evaluator.score(0, None)
    assert len(base.style) == SMALL.prompts * SMALL.seeds
    assert base.adherence == (1.0,) * 4 and base.validation_loss is None
    assert all(-1.0 <= v <= 1.0 for v in base.style + base.leakage)


def test_a_lora_that_changes_the_picture_is_not_scored_as_lost_adherence(
    evaluator: Evaluator, tiny_klein: Path, two_images: Path, tmp_path: Path
) -> None:
    strong = _random_lora(tiny_klein, tmp_path / "strong.safetensors", scale=0.5)
    base = evaluator.score(0, None)
    before = [np.asarray(im) for im in evaluator.render()]
    first = evaluator.score(100, strong)
    assert first.style != base.style  # the LoRA changed what is drawn...
    assert first.adherence == base.adherence  # ...which is the point of a style LoRA, not a drop in adherence
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
    assert a != b and isinstance(a, ProbeScores)


def test_the_held_out_loss_is_deterministic_and_follows_the_lora(
    tiny_klein: Path, two_images: Path, tmp_path: Path
) -> None:
    held_out = read_dataset(two_images)[:1]
    first = make_evaluator(tiny_klein, two_images, tmp_path / "a", held_out=held_out, resolution=64)
    second = make_evaluator(tiny_klein, two_images, tmp_path / "b", held_out=held_out, resolution=64)
    base = first.score(0, None)
    assert base.validation_loss is not None and base.validation_loss > 0
    assert second.score(0, None).validation_loss == base.validation_loss  # fixed noise levels, fixed noise
    strong = _random_lora(tiny_klein, tmp_path / "strong.safetensors", scale=0.5)
    assert first.score(100, strong).validation_loss != base.validation_loss


def test_the_gallery_has_a_row_per_evaluated_step(evaluator: Evaluator, tiny_klein: Path, tmp_path: Path) -> None:
    evaluator.score(0, None)
    one = evaluator.gallery(None)
    evaluator.score(100, _random_lora(tiny_klein, tmp_path / "l.safetensors", scale=0.3))
    decision = Verdict(100, False, "still improving", (Judged(100, 0.93, True),), base_score=0.92)
    two = evaluator.gallery(decision)
    assert two.width == one.width and two.height > one.height  # one more row of 4 probes
    assert sorted(p.name for p in (evaluator.cache_dir / "step_000100").iterdir()) == [
        f"probe_{i:02d}.png" for i in range(SMALL.prompts * SMALL.seeds)
    ]


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


PICTURES = [Image.linear_gradient("L").convert("RGB"), Image.radial_gradient("L").convert("RGB")]


def test_a_vision_model_directory_gives_leakage_content_from_the_processors_crop(tmp_path: Path) -> None:
    """The real-encoder path: a (tiny, random) DINOv2 saved in the transformers layout, loaded from its folder. Its
    processor crops 48 px while the config says 32: the patch count follows the crop (6 x 6, not 4 x 4)."""
    content = VisionModelEmbedder(write_tiny_dinov2(tmp_path / "dino", crop=48)).content(PICTURES)
    assert content.shape == (2, 36 * 32)
    assert torch.allclose(content.norm(dim=1), torch.ones(2))
    assert float(content[0] @ content[1]) < 0.999  # different pictures, different content


def test_a_text_image_model_scores_adherence_by_the_prompt(tmp_path: Path) -> None:
    scorer = TextImageScorer(write_tiny_clip(tmp_path / "clip"))
    scores = scorer.adherence([PICTURES[0], PICTURES[0]], ["a fox in the snow", "a bowl of fruit"])
    assert scores.shape == (2,) and all(-1.0 <= float(v) <= 1.0 for v in scores)
    assert float(scores[0]) != float(scores[1])  # the same picture agrees differently with different texts
    again = scorer.adherence([PICTURES[0]], ["a fox in the snow"])
    assert float(again[0]) == pytest.approx(float(scores[0]), abs=1e-6)


def test_csd_style_comes_from_the_vision_tower_and_its_style_projection(tmp_path: Path) -> None:
    folder = write_tiny_csd(tmp_path / "csd")
    style = CSDStyleEmbedder(folder).style(PICTURES)
    assert style.shape == (2, 24) and torch.allclose(style.norm(dim=1), torch.ones(2))
    assert float(style[0] @ style[1]) < 0.999
    (folder / CSD_PROJECTION).unlink()
    with pytest.raises(FileNotFoundError, match=CSD_PROJECTION):
        CSDStyleEmbedder(folder)
