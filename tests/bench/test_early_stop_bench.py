"""bench/early_stop.py's ground truth is the noise-free trajectory, never the policy it calibrates; and on a few
settings at a reduced seed count the plan's defaults still pick within one evaluation interval of a true best."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kleinstyle.contract.early_stop import StoppingSettings
from kleinstyle.contract.plan import plan_training

BENCH = Path(__file__).resolve().parents[2] / "bench" / "early_stop.py"
STEPS = tuple(range(100, 1501, 100))


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """bench/early_stop.py as a module (a script, not a package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("bench_early_stop", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def no_policy(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ground truth must hold without the policy: any call of decide() fails the test."""

    def refuse(*_: Any) -> None:
        raise AssertionError("the ground truth called decide()")

    monkeypatch.setattr(bench, "decide", refuse)


def test_the_true_best_of_a_peak_then_decline_is_the_peak(bench: ModuleType, no_policy: None) -> None:
    def peak(step: int) -> Any:
        return bench.Truth(style=0.5 + 0.1 * min(step, 500) / 500 - 0.2 * max(0, step - 500) / 1000)

    assert bench.true_best(peak, STEPS) == (500,)
    assert bench.true_best(peak, STEPS, tie=0.025) == (400, 500, 600)  # the tolerance is explicit


def test_a_saturating_run_ties_everything_past_its_knee(bench: ModuleType, no_policy: None) -> None:
    def saturating(step: int) -> Any:
        return bench.Truth(style=0.5 + 0.1 * min(1.0, step / 600))

    assert bench.true_best(saturating, STEPS) == tuple(range(600, 1501, 100))
    assert bench.distance(500, bench.true_best(saturating, STEPS), 100) == 1.0
    assert bench.distance(300, bench.true_best(saturating, STEPS), 100) == 3.0
    assert bench.distance(None, (600,), 100) == float("inf")


def test_leakage_and_lost_adherence_count_against_the_truth(bench: ModuleType, no_policy: None) -> None:
    def copies(step: int) -> Any:  # the style keeps rising, but from 800 it copies its references
        return bench.Truth(style=0.5 + 0.01 * step / 100, leakage=0.2 + 0.03 * max(0, step - 800) / 100)

    def forgets(step: int) -> Any:  # from 600 it stops drawing the prompts
        return bench.Truth(style=0.5 + 0.01 * step / 100, adherence=0.3 - 0.03 * max(0, step - 600) / 100)

    assert bench.true_best(copies, STEPS) == (800,)
    assert bench.true_best(forgets, STEPS) == (600,)


def test_a_lora_worse_than_the_base_has_the_base_for_its_true_best(bench: ModuleType, no_policy: None) -> None:
    assert bench.true_best(lambda step: bench.Truth(style=0.5 - 0.02 * step / 100), STEPS) == (0,)


def test_every_family_is_drawn_the_same_for_a_seed_and_has_a_true_best(bench: ModuleType, no_policy: None) -> None:
    import random

    for family, draw in bench.FAMILIES.items():
        for seed in range(20):
            first = draw(random.Random(f"{family}/{seed}"), 1500)
            again = draw(random.Random(f"{family}/{seed}"), 1500)
            assert [first(s) for s in STEPS] == [again(s) for s in STEPS]
            best = bench.true_best(first, STEPS)
            assert best and 0 not in best, (family, seed)  # every family's LoRA beats the base model
            if family == "late bloomer":
                assert min(best) >= 900, (family, seed)


@pytest.mark.parametrize(
    ("family", "noise"), [("peak-then-decline", 0.02), ("saturating", 0.03), ("late bloomer", 0.03)]
)
def test_the_plans_defaults_pick_within_one_interval(bench: ModuleType, family: str, noise: float) -> None:
    # 60 seeds of one setting each (well under a second); the full table: python bench/early_stop.py.
    plan = plan_training(7, {})
    row = bench.row(family, bench.Setting(noise, 8, None), 60, plan, StoppingSettings.from_plan(plan))
    assert row.within_one >= bench.GOAL, row
