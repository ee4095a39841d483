"""The early-stopping policy: which checkpoint is best, whether it beats the base model, and whether to stop now
(pure; no torch).

Loss is a poor guide for klein style LoRAs (flat loss while the style still improves: docs/facts.md), so every
checkpoint is judged by rendered probes, fixed content prompts x seeds, each scored three ways
(kleinstyle.runtime.klein.evaluate), step 0 (the base model, rendered the same way) being the baseline:
- style: similarity of the render to the references in a style embedding (CSD, or colour and texture statistics);
- adherence: agreement of the render with its prompt's text (a CLIP/SigLIP text tower). It is judged against the
  base model's agreement on the same probe, never against the base model's picture: the LoRA is meant to change
  the picture, and a drift away from the base render is the style, not lost adherence;
- leakage: similarity of the render's content to its nearest training image (a LoRA that copies its references).
A checkpoint also gets a held-out validation loss (flow-matching loss at fixed noise levels and noise on references
left out of training) when the board has enough references to leave some out.

Per probe, J = style - ADHERENCE_WEIGHT * relative adherence drop below the base - LEAKAGE_WEIGHT * leakage rise
over the base. The base model's own J is its style score. Guards make a checkpoint ineligible: a mean adherence
drop over `max_adherence_drop` (it stopped drawing the prompts), a mean leakage rise over `max_leakage_rise` (it
copies its references), a held-out loss more than `max_validation_rise` above the base model's at this evaluation
and the previous one (it fits references it did not see worse than no LoRA at all: memorisation; one evaluation
over the limit is as likely the loss's jitter), or a score that is not a number. The penalties are hinged on the
probes' mean, not per probe (see `probe_objective`). Probes are paired across
checkpoints (same prompt, same seed), so differences are judged against the standard error of paired differences.
- best: among the eligible checkpoints whose J is within one paired standard error of the top one (those the
  probes cannot tell from it), the one whose neighbourhood (its J averaged with its eligible neighbours', one each
  side) is highest: a score trajectory is smooth and its noise is not, so the neighbours say where the real top
  is. (Preferring the earliest of them, as this policy once did, picked 1-4 intervals before the true best on
  saturating runs: bench/early_stop.py.) The base model is a candidate too: a checkpoint whose J is below the base
  model's by more than one paired standard error (and more than `min_effect`) is worse than no LoRA, and when every
  one the probes cannot tell from the top is, best is step 0: nothing is promoted. One the probes cannot tell from
  the base model is promoted, and the runtime warns that it may have learned little.
- stop: after `warmup_steps`, when the smoothed J has stayed more than DECLINE_MARGIN paired standard errors below
  its best for `patience` evaluations in a row (a decline: a plateau never stops a run, since a late bloomer rises
  after one), or when two evaluations in a row are ineligible (the guards failed twice).

The runtime applies this at each evaluation (no API round trip between a checkpoint and the decision) and the
operator applies the same function to the reported scores for status, so both always agree. bench/early_stop.py
calibrates it on synthetic score trajectories; docs/policy.md#early-stopping says why each rule is there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .reports import EvaluationReport, ProbeScoresReport

if TYPE_CHECKING:
    from .plan import TrainingPlan

ADHERENCE_WEIGHT = 0.5
LEAKAGE_WEIGHT = 1.0
SMOOTHING_WINDOW = 2  # smoothed J: the mean J of the last this-many eligible evaluations (one noisy render is no peak)
# Stop only on a decline: the smoothed J this many paired standard errors below its best, `patience` times in a row.
# A plateau is no evidence that the run is done (a late bloomer rises after one: bench/early_stop.py).
DECLINE_MARGIN = 1.5


@dataclass(frozen=True)
class StoppingSettings:
    enabled: bool = True
    patience: int = 2  # evaluations in a row clearly below the best (bench/early_stop.py: 3 saved less, no better pick)
    warmup_steps: int = 0
    max_adherence_drop: float = 0.25  # a fraction of the base model's text agreement
    max_leakage_rise: float = 0.25  # in similarity (cosine) over the base model's
    # A fraction of the base model's held-out loss, at two evaluations in a row: 5% at one misfired under 3% jitter.
    max_validation_rise: float = 0.10
    # Below the base model means below by more than this too: a few probes can make a paired standard error tiny,
    # and a difference of 1e-4 in a cosine is no evidence that a LoRA is worse than none.
    min_effect: float = 0.005

    @classmethod
    def from_plan(cls, plan: TrainingPlan) -> StoppingSettings:
        return cls(enabled=plan.early_stopping, patience=plan.patience, warmup_steps=plan.warmup_steps)


@dataclass(frozen=True)
class ProbeScores:
    """One checkpoint's scores, one entry per probe in a fixed probe order (step 0: the base model)."""

    step: int
    style: tuple[float, ...]
    adherence: tuple[float, ...]
    leakage: tuple[float, ...]
    validation_loss: float | None = None  # held-out flow-matching loss; None without held-out references

    def __post_init__(self) -> None:
        if not (len(self.style) == len(self.adherence) == len(self.leakage)) or not self.style:
            raise ValueError(f"checkpoint {self.step}: every score needs one value per probe, and at least one probe")

    @classmethod
    def from_report(cls, report: ProbeScoresReport) -> ProbeScores:
        """From a report: a score JSON could not carry (NaN, sent as null) comes back as NaN, hence ineligible."""

        def floats(values: list[float | None]) -> tuple[float, ...]:
            return tuple(math.nan if v is None else float(v) for v in values)

        validation = report.validation_loss
        return cls(
            report.step,
            floats(report.style),
            floats(report.adherence),
            floats(report.leakage),
            None if validation is None else float(validation),
        )

    def to_report(self) -> ProbeScoresReport:
        """For a report; a NaN score goes as null (JSON has no NaN)."""

        def finite(values: tuple[float, ...]) -> list[float | None]:
            return [v if math.isfinite(v) else None for v in values]

        validation = self.validation_loss
        return ProbeScoresReport(
            step=self.step,
            style=finite(self.style),
            adherence=finite(self.adherence),
            leakage=finite(self.leakage),
            validation_loss=None if validation is None or not math.isfinite(validation) else validation,
        )


@dataclass(frozen=True)
class Judged:
    step: int
    score: float  # mean J over probes
    eligible: bool
    why_not: str = ""


@dataclass(frozen=True)
class Verdict:
    """`best_step`: the checkpoint to promote; 0 when the base model beats every eligible checkpoint (promote
    nothing); None when no checkpoint is eligible (or none was evaluated yet)."""

    best_step: int | None
    stop: bool
    reason: str
    judged: tuple[Judged, ...] = field(default=())
    base_score: float | None = None  # the base model's J

    def score_of(self, step: int) -> float | None:
        return next((j.score for j in self.judged if j.step == step), None)


def decide_reported(evaluation: EvaluationReport | None, settings: StoppingSettings) -> Verdict | None:
    """`decide` on the scores a run reports; None without any. ValueError when their probe counts disagree."""
    if evaluation is None:
        return None
    baseline = ProbeScores.from_report(evaluation.baseline)
    return decide(baseline, [ProbeScores.from_report(c) for c in evaluation.checkpoints], settings)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def paired_standard_error(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean of the paired differences a_i - b_i (0 with one probe: no spread to measure)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return 0.0
    mean = _mean(diffs)
    return math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def relative_drop(value: float, base: float) -> float:
    """How far `value` fell below `base`, as a fraction of the base (absolute when the base is not positive)."""
    return max(0.0, (base - value) / base if base > 1e-6 else base - value)


def probe_objective(scores: ProbeScores, baseline: ProbeScores) -> tuple[float, ...]:
    """J per probe. The penalties are hinged on the mean (a mean adherence drop, a mean leakage rise), each probe
    keeping its own deviation from that mean for the paired standard errors: a hinge per probe would turn the
    noise of every render into a penalty (max(0, noise) has a positive mean), which with per-render noise 0.05
    cost a LoRA 0.04 of J that it never lost (bench/early_stop.py)."""
    if len(scores.style) != len(baseline.style):
        raise ValueError(f"checkpoint {scores.step} has {len(scores.style)} probes, the baseline {len(baseline.style)}")
    base_adherence = _mean(baseline.adherence)
    scale = base_adherence if base_adherence > 1e-6 else 1.0  # relative to the base model's mean agreement
    drops = [(ab - a) / scale for a, ab in zip(scores.adherence, baseline.adherence, strict=True)]
    rises = [lk - lb for lk, lb in zip(scores.leakage, baseline.leakage, strict=True)]
    drop, rise = _mean(drops), _mean(rises)
    return tuple(
        s - ADHERENCE_WEIGHT * (d - drop + max(0.0, drop)) - LEAKAGE_WEIGHT * (r - rise + max(0.0, rise))
        for s, d, r in zip(scores.style, drops, rises, strict=True)
    )


def _eligibility(scores: ProbeScores, held_out: float | None, baseline: ProbeScores, settings: StoppingSettings) -> str:
    values = (*scores.style, *scores.adherence, *scores.leakage)
    if not all(math.isfinite(v) for v in values) or not _finite_or_none(scores.validation_loss):
        return "a score is not a number (a blank or diverged render)"
    drop = relative_drop(_mean(scores.adherence), _mean(baseline.adherence))
    if drop > settings.max_adherence_drop:
        limit = settings.max_adherence_drop
        return f"adherence fell {drop:.0%} below the base model's (over {limit:.0%}): it stopped drawing the prompts"
    rise = _mean(scores.leakage) - _mean(baseline.leakage)
    if rise > settings.max_leakage_rise:
        return f"leakage rose {rise:.3f} > {settings.max_leakage_rise} over the base model: it copies its references"
    base_held_out = baseline.validation_loss
    if (
        held_out is not None
        and base_held_out is not None
        and held_out > base_held_out * (1 + settings.max_validation_rise)
    ):
        return (
            f"held-out loss {held_out:.4g} is over {settings.max_validation_rise:.0%} above the base model's "
            f"{base_held_out:.4g}: it memorises its references"
        )
    return ""


def _finite_or_none(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def decide(baseline: ProbeScores, checkpoints: Sequence[ProbeScores], settings: StoppingSettings) -> Verdict:
    """Best checkpoint and stop decision for the checkpoints evaluated so far (any order; one entry per step)."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    base_score = round(_mean(probe_objective(baseline, baseline)), 6)
    if not ordered:
        return Verdict(None, False, "no checkpoint evaluated yet", base_score=base_score)
    per_probe = {c.step: probe_objective(c, baseline) for c in ordered}
    judged = []
    previous: float | None = None
    for c in ordered:
        held_out = c.validation_loss
        if held_out is not None and previous is not None and math.isfinite(previous):
            held_out = min(held_out, previous)  # over the limit only when the previous evaluation was too
        previous = c.validation_loss
        why_not = _eligibility(c, held_out, baseline, settings)
        score = _mean(per_probe[c.step]) if not why_not.startswith("a score is not") else -math.inf
        judged.append(Judged(c.step, round(score, 6), not why_not, why_not))
    eligible = [j for j in judged if j.eligible]
    best = _select(eligible, per_probe, probe_objective(baseline, baseline), base_score, settings)
    stop, reason = _stop(ordered, judged, per_probe, settings)
    return Verdict(best, stop, reason, tuple(judged), base_score)


def _neighbourhood(eligible: Sequence[Judged], per_probe: dict[int, tuple[float, ...]]) -> dict[int, tuple[float, ...]]:
    """Per probe, the mean J of each eligible checkpoint and its eligible neighbours (one each side)."""
    out = {}
    for i, j in enumerate(eligible):
        window = [per_probe[w.step] for w in eligible[max(0, i - 1) : i + 2]]
        out[j.step] = tuple(sum(v) / len(v) for v in zip(*window, strict=True))
    return out


def _select(
    eligible: Sequence[Judged],
    per_probe: dict[int, tuple[float, ...]],
    base_probes: tuple[float, ...],
    base_score: float,
    settings: StoppingSettings,
) -> int | None:
    """Among the eligible checkpoints within one paired standard error of the top J (those the probes cannot tell
    from it), the one whose neighbourhood scores best; 0 when it is clearly below the base model."""
    if not eligible:
        return None
    smooth = _neighbourhood(eligible, per_probe)
    top = max(eligible, key=lambda j: (j.score, -j.step))

    def below_base(j: Judged) -> bool:
        return base_score - j.score > max(paired_standard_error(per_probe[j.step], base_probes), settings.min_effect)

    tied = [
        j
        for j in eligible
        if top.score - j.score <= paired_standard_error(per_probe[top.step], per_probe[j.step]) and not below_base(j)
    ]
    return max(tied, key=lambda j: (_mean(smooth[j.step]), -j.step)).step if tied else 0


GUARDS_FAILED = "failed the guards"
NO_IMPROVEMENT = "no improvement"


def stop_cause(stop_reason: str) -> str:
    """A run's `stopReason` as one of a few causes (a metric label): completed, guards, no_improvement,
    stop_requested (anything else a run stopped for, a request included)."""
    if stop_reason == "completed":
        return "completed"
    if GUARDS_FAILED in stop_reason:
        return "guards"
    return "no_improvement" if NO_IMPROVEMENT in stop_reason else "stop_requested"


def _stop(
    ordered: Sequence[ProbeScores],
    judged: Sequence[Judged],
    per_probe: dict[int, tuple[float, ...]],
    settings: StoppingSettings,
) -> tuple[bool, str]:
    if not settings.enabled:
        return False, "early stopping is off"
    best_smoothed: float | None = None
    best_probes: tuple[float, ...] | None = None
    stale = failed = 0
    for index, (c, j) in enumerate(zip(ordered, judged, strict=True)):
        failed = 0 if j.eligible else failed + 1
        if j.eligible:
            window = [w for w in judged[: index + 1] if w.eligible][-SMOOTHING_WINDOW:]
            smoothed = _mean([w.score for w in window])
            margin = paired_standard_error(per_probe[c.step], best_probes) if best_probes else 0.0
            if best_smoothed is None or smoothed > best_smoothed + margin:
                best_smoothed, best_probes, stale = smoothed, per_probe[c.step], 0
                continue
            if best_smoothed - smoothed <= DECLINE_MARGIN * margin:
                stale = 0  # within the noise of its best: a plateau, which may yet rise again
                continue
        if c.step < settings.warmup_steps:
            continue  # the warm-up neither stops the run nor uses up its patience
        if failed >= 2:
            return True, f"step {c.step}: two evaluations in a row {GUARDS_FAILED} ({j.why_not})"
        stale += 1
        if stale >= settings.patience:
            return True, f"step {c.step}: {NO_IMPROVEMENT}: {stale} evaluations in a row clearly below the best"
    return False, "still improving" if stale == 0 else f"{stale} evaluation(s) clearly below the best"
