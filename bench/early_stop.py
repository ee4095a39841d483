"""Calibrate the early-stopping policy (kleinstyle.contract.early_stop) on synthetic score trajectories.

Each trajectory gives the true (noise-free) style, adherence, leakage and held-out loss of a run's checkpoints; the
harness adds probe noise (a fixed offset per probe, as the same prompt and seed give at every checkpoint, plus
independent noise per render), then plays the run as the runtime does: evaluate each checkpoint in order, apply
the policy, stop when it says so. Over many noise seeds it reports the ideal pick, the policy's median pick, the
share of runs picking within one checkpoint interval of the ideal, the worst distance, where runs stopped and the
steps early stopping saved. The median pick must be within one interval of the ideal on every trajectory (the
exit status says so); no policy can be that close on every noisy run, and the table shows how often this one is.

The ideal pick is the earliest checkpoint whose true score J is within the measurement's resolution of the best
true J (one standard error of a paired difference of two checkpoints' means: sigma * sqrt(2 / probes)), or the
base model (0) when every eligible checkpoint's true J is below the base model's by more than that resolution: the
best any policy could do with these probes.

    python bench/early_stop.py [--seeds 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kleinstyle.contract.early_stop import ProbeScores, StoppingSettings, decide, probe_objective

INTERVAL = 100
TOTAL = 1500
PROBES = 8  # the default checkpointEvaluation: 4 prompts x 2 seeds
SETTINGS = StoppingSettings(patience=3, warmup_steps=TOTAL // 3)  # the plan's defaults for a 1500-step run


@dataclass(frozen=True)
class Truth:
    style: float
    adherence: float = 0.30  # a CLIP-like cosine of render and prompt
    leakage: float = 0.20
    validation: float | None = 1.0


@dataclass(frozen=True)
class Trajectory:
    name: str
    truth: Callable[[int], Truth]  # step -> true scores (step 0: the base model)
    noise: float = 0.01  # per-render standard deviation of the style score


def saturating(step: int) -> Truth:
    return Truth(style=0.50 + 0.10 * (1 - math.exp(-step / 300)), validation=1.0 - 0.03 * (1 - math.exp(-step / 300)))


def drifting(step: int) -> Truth:
    # The render moves away from the base model's picture at every evaluation (the style) while its agreement
    # with the prompt's text stays where the base model's is: style +0.02 per evaluation, nothing lost.
    return Truth(style=0.50 + 0.02 * step / INTERVAL, validation=1.0 - 0.002 * step / INTERVAL)


def memorising(step: int) -> Truth:
    late = max(0, step - 900) / INTERVAL
    return Truth(
        style=0.50 + 0.08 * (1 - math.exp(-step / 250)) + 0.005 * late,
        leakage=0.20 + 0.06 * late,
        validation=0.98 + 0.02 * late,
    )


def plateau(step: int) -> Truth:
    return Truth(style=0.50 + 0.05 * min(1.0, step / 300))


def worse(step: int) -> Truth:
    return Truth(style=0.50 - 0.04 * min(1.0, step / 400), adherence=0.30 - 0.02 * min(1.0, step / 400))


TRAJECTORIES = (
    Trajectory("saturating style", saturating),
    Trajectory("style rising, picture drifting from the base", drifting),
    Trajectory("late memorisation", memorising),
    Trajectory("noisy plateau", plateau, noise=0.03),
    Trajectory("a LoRA worse than the base", worse),
)


def observe(trajectory: Trajectory, step: int, offsets: list[float], rng: random.Random) -> ProbeScores:
    truth = trajectory.truth(step)

    def probes(mean: float, scale: float) -> tuple[float, ...]:
        return tuple(mean + scale * (o + rng.gauss(0.0, 1.0)) for o in offsets)

    return ProbeScores(
        step,
        probes(truth.style, trajectory.noise),
        probes(truth.adherence, trajectory.noise / 2),
        probes(truth.leakage, trajectory.noise / 2),
        truth.validation,
    )


def ideal(trajectory: Trajectory) -> int:
    """The best pick the probes allow (see the module docstring)."""
    exact = [ProbeScores(s, *(((getattr(trajectory.truth(s), k),) * PROBES) for k in ("style", "adherence", "leakage")),
                         trajectory.truth(s).validation) for s in range(0, TOTAL + 1, INTERVAL)]  # fmt: skip
    base, checkpoints = exact[0], exact[1:]
    decision = decide(base, checkpoints, StoppingSettings(enabled=False))
    eligible = [j for j in decision.judged if j.eligible]
    base_score = sum(probe_objective(base, base)) / PROBES
    resolution = trajectory.noise * math.sqrt(2 / PROBES)
    candidates = [j for j in eligible if j.score >= base_score - resolution]
    if not candidates:
        return 0
    top = max(j.score for j in candidates)
    return min(j.step for j in candidates if j.score >= top - resolution)


@dataclass
class Row:
    trajectory: str
    ideal: int
    median_pick: float
    within_one: float  # share of seeds picking within one checkpoint interval of the ideal
    worst_distance: float  # in checkpoint intervals, over all seeds
    mean_stop: float
    mean_steps_saved: float


def play(trajectory: Trajectory, seed: int) -> tuple[int, int]:
    """(pick, last evaluated step) of one noisy run."""
    rng = random.Random(seed)
    offsets = [rng.gauss(0.0, 1.0) for _ in range(PROBES)]  # the same probe, the same bias at every checkpoint
    base = observe(trajectory, 0, offsets, rng)
    seen: list[ProbeScores] = []
    for step in range(INTERVAL, TOTAL + 1, INTERVAL):
        seen.append(observe(trajectory, step, offsets, rng))
        decision = decide(base, seen, SETTINGS)
        if decision.stop:
            break
    best = decision.best_step
    return (seen[-1].step if best is None else best), seen[-1].step


def calibrate(seeds: int) -> list[Row]:
    rows = []
    for trajectory in TRAJECTORIES:
        target = ideal(trajectory)
        runs = [play(trajectory, seed) for seed in range(seeds)]
        picks = [pick for pick, _ in runs]
        stops = [stop for _, stop in runs]
        distances = [abs(pick - target) / INTERVAL for pick in picks]
        rows.append(
            Row(
                trajectory=trajectory.name,
                ideal=target,
                median_pick=statistics.median(picks),
                within_one=sum(d <= 1 for d in distances) / len(distances),
                worst_distance=max(distances),
                mean_stop=sum(stops) / len(stops),
                mean_steps_saved=TOTAL - sum(stops) / len(stops),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="noise seeds per trajectory")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = calibrate(args.seeds)
    print(f"{TOTAL} steps, a checkpoint every {INTERVAL}, {PROBES} probes, patience {SETTINGS.patience}, "
          f"warm-up {SETTINGS.warmup_steps}; {args.seeds} noise seeds per trajectory\n")  # fmt: skip
    print("| trajectory | ideal | median pick | within one interval | worst (intervals) | mean stop | steps saved |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row.trajectory} | {row.ideal} | {row.median_pick:.0f} | {100 * row.within_one:.0f}% "
            f"| {row.worst_distance:.0f} | {row.mean_stop:.0f} | {row.mean_steps_saved:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if any(abs(row.median_pick - row.ideal) > INTERVAL for row in rows):
        print("\nthe policy's median pick is more than one checkpoint interval from the ideal", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
