"""Pure pieces of the builtin trainer: layer mapping, LoRA targets, buckets, batch plans, settings, optimizers."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from kleinstyle.runtime.klein.arch import select_lora_targets, text_encoder_layers
from kleinstyle.runtime.klein.batches import BatchPlan
from kleinstyle.runtime.klein.dataset import DatasetError, assign_bucket, bucket_sizes, read_dataset
from kleinstyle.runtime.klein.lora_train import TrainSettings
from kleinstyle.runtime.klein.optim import make_lr_scheduler, make_optimizer


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(36, (9, 18, 27)), (3, (1, 2, 3)), (4, (1, 2, 3)), (8, (2, 4, 6))],
)
def test_text_encoder_layers_follow_klein(layers: int, expected: tuple[int, int, int]) -> None:
    assert text_encoder_layers(layers) == expected


def test_text_encoder_needs_three_layers() -> None:
    with pytest.raises(ValueError, match="three"):
        text_encoder_layers(2)


@pytest.fixture(scope="module")
def transformer(tiny_klein: Path) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel.from_pretrained(tiny_klein, subfolder="transformer")


def test_named_targets(transformer: Flux2Transformer2DModel) -> None:
    single = select_lora_targets(transformer, "single")
    double = select_lora_targets(transformer, "double")
    assert single == [
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.1.attn.to_out",
    ]
    assert len(double) == 24 and all(n.startswith("transformer_blocks.") for n in double)
    assert select_lora_targets(transformer, "all") == double + single


def test_prefix_targets(transformer: Flux2Transformer2DModel) -> None:
    chosen = select_lora_targets(transformer, ["single_transformer_blocks.1.", "transformer_blocks.0.attn.to_q"])
    assert chosen == [
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.1.attn.to_out",
    ]


@pytest.mark.parametrize("bad", [["single_blocks.1."], ["single_transformer_blocks.30."], "style"])
def test_targets_that_select_nothing_are_errors(transformer: Flux2Transformer2DModel, bad: object) -> None:
    with pytest.raises(ValueError):
        select_lora_targets(transformer, bad)  # type: ignore[arg-type]


def test_buckets_keep_area_and_aspect() -> None:
    buckets = bucket_sizes(1024, 32)
    assert (1024, 1024) in buckets
    for width, height in buckets:
        assert width % 32 == 0 and height % 32 == 0
        assert width * height <= 1024 * 1024
        assert max(width / height, height / width) <= 4
    assert assign_bucket((3000, 3000), buckets) == (1024, 1024)
    wide = assign_bucket((1920, 1080), buckets)
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 16 / 9) < 0.1
    tall = assign_bucket((1080, 1920), buckets)
    assert tall[1] > tall[0] and abs(tall[1] / tall[0] - 16 / 9) < 0.1
    assert assign_bucket((64, 64), bucket_sizes(64, 32)) == (64, 64)


def test_batch_plan_is_bucket_pure_and_covers_each_epoch() -> None:
    buckets = {(64, 64): [0, 2, 4], (32, 128): [1, 3]}
    plan = BatchPlan(buckets, batch_size=2, seed=7)
    assert plan.batches_per_epoch == 3
    for epoch in range(3):
        batches = [plan.batch(epoch * 3 + i) for i in range(3)]
        assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
        for batch in batches:
            assert set(batch) <= {0, 2, 4} or set(batch) <= {1, 3}
    again = BatchPlan(buckets, batch_size=2, seed=7)
    assert [again.batch(s) for s in (8, 2, 5)] == [plan.batch(s) for s in (8, 2, 5)]


def test_read_dataset(dataset: Callable[..., Path]) -> None:
    folder = dataset(["tokstyle. a house", None])
    (folder / "notes.md").write_text("ignored")
    samples = read_dataset(folder)
    assert [s.image.name for s in samples] == ["000.png", "001.png"]
    assert [s.caption for s in samples] == ["tokstyle. a house", ""]


def test_empty_or_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        read_dataset(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, "rank"),
        ("steps", 0, "steps"),
        ("caption_dropout", 1.5, "caption_dropout"),
        ("optimizer", "sgd", "optimizer"),
        ("scheduler", "cosine_with_restarts", "scheduler"),
        ("resolution", 1000, "resolution"),
        ("bucket_multiple", 24, "bucket_multiple"),
    ],
)
def test_settings_refuse_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings(**{field: value})  # type: ignore[arg-type]


def test_settings_defaults_are_the_reference_recipe() -> None:
    cfg = TrainSettings()
    assert (cfg.rank, cfg.lora_alpha, cfg.optimizer, cfg.learning_rate, cfg.weight_decay) == (
        32,
        32.0,
        "adafactor",
        1e-4,
        1e-4,
    )
    assert (cfg.scheduler, cfg.caption_dropout, cfg.resolution, cfg.steps) == ("cosine", 0.05, 1024, 1000)
    assert TrainSettings(target=["single_transformer_blocks.3."]).target == ("single_transformer_blocks.3.",)


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(4, 4))]


def test_adafactor_runs_at_a_fixed_rate() -> None:
    optimizer, name = make_optimizer(_params(), "adafactor", lr=1e-4, weight_decay=1e-4)
    assert name == "adafactor"
    defaults = optimizer.defaults
    assert (defaults["lr"], defaults["relative_step"], defaults["scale_parameter"], defaults["warmup_init"]) == (
        1e-4,
        False,
        False,
        False,
    )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_falls_back_to_adamw_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        optimizer, name = make_optimizer(_params(), "adamw8bit", lr=1e-4, weight_decay=1e-4)
    assert name == "adamw" and type(optimizer) is torch.optim.AdamW
    assert "bitsandbytes" in caplog.text


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_span_all_steps_without_warmup(schedule: str) -> None:
    steps = 10
    optimizer, _ = make_optimizer(_params(), "adamw", lr=1.0, weight_decay=0.0)
    scheduler = make_lr_scheduler(optimizer, schedule, steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {
        "cosine": [0.5 * (1 + math.cos(math.pi * k / steps)) for k in range(steps)],
        "linear": [1 - k / steps for k in range(steps)],
        "constant": [1.0] * steps,
    }[schedule]
    assert rates == pytest.approx(expected)
