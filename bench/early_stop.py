"""Calibrate the early-stopping policy (kleinstyle.contract.early_stop) against an independent ground truth.

Each synthetic run has a noise-free truth: the style, adherence, leakage and held-out loss of every checkpoint,
drawn per seed from one of three families whose shape is known in advance:
- peak-then-decline: the style rises to a peak somewhere in the first 20-55% of the run, then the LoRA overfits:
  the style falls back and leakage rises (a rank-128 LoRA on a small board);
- saturating: the style rises and levels off (time constant 8-25% of the run);
- late bloomer: the style barely moves for most of the run, then rises in the last 30-50% of it.

The true best checkpoint is read off the truth alone, never from `decide()`: the true objective J of each
checkpoint (the policy's definition of a good LoRA: style, minus 0.5 x the relative adherence drop, minus the
leakage rise; `true_objective`) is computed from the noise-free values, and every checkpoint whose true J is within
`TIE` (0.005, an explicit tolerance) of the best true J is a true best (`true_best`). A saturating run has several:
past the knee nothing measurable is gained. A noisy run's pick counts as within one evaluation interval when it is
at most `checkpointEvery` steps from the nearest true best.

The harness adds probe noise (a fixed offset per probe, as the same prompt and seed give at every checkpoint, plus
independent noise per render, both of standard deviation `noise` for the style and half that for adherence and
leakage), optionally a held-out loss with relative jitter per checkpoint, then plays the run as the runtime does:
evaluate each planned checkpoint in order, apply the policy with the plan's settings, stop when it says so.

For each family x setting it reports the share of runs picked within one interval of a true best, the median and
worst distance (in intervals), the share of the true gain over the base model the pick kept, and the steps saved
against training every planned step. Two tables: probe noise 0.01-0.05 x 8 and 16 probes with nothing held out;
then held-out-loss jitter 0-0.05 at noise 0.03 and 8 probes, with the held-out loss guard active.

The run is the plan of a board of `--images` references (default 7: 1500 steps, a checkpoint every 100, the
cosine midpoint 750 too). Deterministic per seed; a few seconds per hundred seeds; never a timed test.

    python bench/early_stop.py [--seeds 200] [--images 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kleinstyle.contract.early_stop import (
    ADHERENCE_WEIGHT,
    LEAKAGE_WEIGHT,
    ProbeScores,
    StoppingSettings,
    decide,
)
from kleinstyle.contract.plan import TrainingPlan, plan_training

TIE = 0.005  # true J this close to the best true J is a true best too (a tie: nothing measurable to choose)
GOAL = 0.90  # the share of runs that should pick within one evaluation interval of a true best
NOISES = (0.01, 0.02, 0.03, 0.05)
PROBE_COUNTS = (8, 16)
JITTERS = (0.0, 0.01, 0.02, 0.03, 0.05)
JITTER_NOISE, JITTER_PROBES = 0.03, 8

BASE_STYLE, BASE_ADHERENCE, BASE_LEAKAGE, BASE_LOSS = 0.50, 0.30, 0.20, 1.0


@dataclass(frozen=True)
class Truth:
    """The noise-free scores of one checkpoint (step 0: the base model)."""

    style: float
    adherence: float = BASE_ADHERENCE  # a CLIP-like cosine of render and prompt
    leakage: float = BASE_LEAKAGE
    validation: float = BASE_LOSS  # held-out flow-matching loss


Curve = Callable[[int], Truth]


def peak_then_decline(rng: random.Random, total: int) -> Curve:
    peak = rng.uniform(0.20, 0.55) * total
    gain = rng.uniform(0.06, 0.15)
    fall = rng.uniform(0.4, 1.0) * gain / (total - peak)  # per step past the peak: back to 0-60% of the gain at the end

    def curve(step: int) -> Truth:
        rise = gain * (1 - (1 - min(step, peak) / peak) ** 2)  # a smooth rise that is flat at the peak
        past = max(0.0, step - peak)
        return Truth(
            style=BASE_STYLE + rise - fall * past * 0.6,
            leakage=BASE_LEAKAGE + fall * past * 0.4,
            validation=BASE_LOSS - 0.03 * rise / gain + 0.12 * past / total,
        )

    return curve


def saturating(rng: random.Random, total: int) -> Curve:
    tau = rng.uniform(0.08, 0.25) * total
    gain = rng.uniform(0.06, 0.15)

    def curve(step: int) -> Truth:
        rise = gain * (1 - math.exp(-step / tau))
        return Truth(style=BASE_STYLE + rise, validation=BASE_LOSS - 0.03 * rise / gain)

    return curve


def late_bloomer(rng: random.Random, total: int) -> Curve:
    centre = rng.uniform(0.55, 0.75) * total
    width = rng.uniform(0.04, 0.08) * total
    gain = rng.uniform(0.06, 0.15)
    early = rng.uniform(0.0, 0.2) * gain  # what it learns before it blooms

    def curve(step: int) -> Truth:
        bloom = (gain - early) * (1 / (1 + math.exp(-(step - centre) / width)) - 1 / (1 + math.exp(centre / width)))
        rise = early * min(1.0, step / (0.2 * total)) + bloom
        return Truth(style=BASE_STYLE + rise, validation=BASE_LOSS - 0.03 * rise / gain)

    return curve


FAMILIES: dict[str, Callable[[random.Random, int], Curve]] = {
    "peak-then-decline": peak_then_decline,
    "saturating": saturating,
    "late bloomer": late_bloomer,
}


def true_objective(truth: Truth, base: Truth) -> float:
    """J of noise-free scores: the policy's objective, written out here from its weights."""
    drop = max(0.0, (base.adherence - truth.adherence) / base.adherence)
    return truth.style - ADHERENCE_WEIGHT * drop - LEAKAGE_WEIGHT * max(0.0, truth.leakage - base.leakage)


def true_best(curve: Curve, steps: Sequence[int], tie: float = TIE) -> tuple[int, ...]:
    """Every step (0: the base model) whose true J is within `tie` of the best true J: the ground truth."""
    base = curve(0)
    objective = {step: true_objective(curve(step), base) for step in (0, *steps)}
    top = max(objective.values())
    return tuple(step for step, j in objective.items() if j >= top - tie)


def distance(pick: int | None, best: Sequence[int], interval: int) -> float:
    """How many evaluation intervals `pick` is from the nearest true best (inf: nothing picked)."""
    return math.inf if pick is None else min(abs(pick - b) for b in best) / interval


@dataclass(frozen=True)
class Setting:
    noise: float
    probes: int
    jitter: float | None  # relative jitter of the held-out loss; None: nothing held out


def observe(
    truth: Truth, step: int, setting: Setting, offsets: list[float], rng: random.Random, jitter: random.Random
) -> ProbeScores:
    def probes(mean: float, scale: float) -> tuple[float, ...]:
        return tuple(mean + scale * (o + rng.gauss(0.0, 1.0)) for o in offsets)

    validation = None
    if setting.jitter is not None:
        validation = truth.validation * (1 + setting.jitter * jitter.gauss(0.0, 1.0))
    return ProbeScores(
        step,
        probes(truth.style, setting.noise),
        probes(truth.adherence, setting.noise / 2),
        probes(truth.leakage, setting.noise / 2),
        validation,
    )


@dataclass(frozen=True)
class Run:
    pick: int | None
    stop: int  # the last evaluated step
    distance: float  # in intervals, to the nearest true best
    kept: float  # the share of the true gain over the base model the pick kept (1: a true best)


def play(family: str, setting: Setting, seed: int, plan: TrainingPlan, settings: StoppingSettings) -> Run:
    """One noisy run of `family`'s seed-th trajectory, played as the runtime plays it."""
    steps = plan.checkpoint_steps
    curve = FAMILIES[family](random.Random(f"{family}/{seed}"), plan.steps.value)  # the same shape in every setting
    rng = random.Random(f"{family}/{setting.noise}/{setting.probes}/{seed}")  # the same noise whatever the jitter
    jitter = random.Random(f"{family}/{setting.jitter}/{seed}")
    offsets = [rng.gauss(0.0, 1.0) for _ in range(setting.probes)]  # the same probe, the same bias at every step
    base = observe(curve(0), 0, setting, offsets, rng, jitter)
    seen: list[ProbeScores] = []
    verdict = None
    for step in steps:
        seen.append(observe(curve(step), step, setting, offsets, rng, jitter))
        verdict = decide(base, seen, settings)
        if verdict.stop:
            break
    assert verdict is not None
    pick = verdict.best_step
    truth0 = curve(0)
    objective = {s: true_objective(curve(s), truth0) for s in (0, *steps)}
    gain = max(objective.values()) - objective[0]
    kept = 0.0 if pick is None else (objective[pick] - objective[0]) / gain if gain > 0 else 1.0
    return Run(pick, seen[-1].step, distance(pick, true_best(curve, steps), plan.checkpoint_every.value), kept)


@dataclass
class Row:
    family: str
    noise: float
    probes: int
    jitter: float | None
    within_one: float  # share of runs picking within one evaluation interval of a true best
    median_distance: float  # in intervals
    worst_distance: float
    gain_kept: float  # mean share of the true gain over the base model kept by the pick
    steps_saved: float  # mean steps not trained, against every planned step
    steps_saved_share: float


def row(family: str, setting: Setting, seeds: int, plan: TrainingPlan, settings: StoppingSettings) -> Row:
    runs = [play(family, setting, seed, plan, settings) for seed in range(seeds)]
    distances = [r.distance for r in runs]
    total = plan.steps.value
    saved = total - statistics.fmean(r.stop for r in runs)
    return Row(
        family=family,
        noise=setting.noise,
        probes=setting.probes,
        jitter=setting.jitter,
        within_one=sum(d <= 1 for d in distances) / len(runs),
        median_distance=statistics.median(distances),
        worst_distance=max(distances),
        gain_kept=statistics.fmean(r.kept for r in runs),
        steps_saved=saved,
        steps_saved_share=saved / total,
    )


def calibrate(seeds: int, images: int = 7, settings: StoppingSettings | None = None) -> tuple[list[Row], list[Row]]:
    """(the probe-noise rows, the held-out-jitter rows) for a board of `images` with the plan's stopping settings."""
    plan = plan_training(images, {})
    settings = settings or StoppingSettings.from_plan(plan)
    noise_rows = [
        row(family, Setting(noise, probes, None), seeds, plan, settings)
        for family in FAMILIES
        for probes in PROBE_COUNTS
        for noise in NOISES
    ]
    jitter_rows = [
        row(family, Setting(JITTER_NOISE, JITTER_PROBES, jitter), seeds, plan, settings)
        for family in FAMILIES
        for jitter in JITTERS
    ]
    return noise_rows, jitter_rows


def _table(rows: list[Row], first: str) -> list[str]:
    lines = [
        f"| family | {first} | within one interval | median / worst (intervals) | gain kept | steps saved |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        setting = f"{r.noise} / {r.probes}" if first.startswith("noise") else f"{r.jitter}"
        worst = "none picked" if math.isinf(r.worst_distance) else f"{r.worst_distance:.1f}"
        lines.append(
            f"| {r.family} | {setting} | {100 * r.within_one:.0f}% | {r.median_distance:.1f} / {worst} "
            f"| {100 * r.gain_kept:.0f}% | {r.steps_saved:.0f} ({100 * r.steps_saved_share:.0f}%) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="trajectories (and noise seeds) per family and setting")
    parser.add_argument("--images", type=int, default=7, help="the board size whose plan the runs follow")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    plan = plan_training(args.images, {})
    settings = StoppingSettings.from_plan(plan)
    noise_rows, jitter_rows = calibrate(args.seeds, args.images, settings)
    print(
        f"{args.images} references: {plan.steps.value} steps, a checkpoint every {plan.checkpoint_every.value} "
        f"({len(plan.checkpoint_steps)} checkpoints), patience {settings.patience}, warm-up {settings.warmup_steps}; "
        f"{args.seeds} trajectories per family and setting; a tie is within {TIE} of the best true J\n"
    )
    print("\n".join(_table(noise_rows, "noise / probes")))
    print(f"\nheld-out loss present, probe noise {JITTER_NOISE}, {JITTER_PROBES} probes:\n")
    print("\n".join(_table(jitter_rows, "held-out jitter")))
    short = [r for r in noise_rows + jitter_rows if r.within_one < GOAL]
    if short:
        print(f"\n{len(short)} rows below {GOAL:.0%} within one interval")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in noise_rows + jitter_rows], indent=2))


if __name__ == "__main__":
    main()
