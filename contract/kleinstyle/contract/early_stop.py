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
copies its references), a held-out loss more than `max_validation_rise` above the base model's (it fits references
it did not see worse than no LoRA at all: memorisation), or a score that is not a number. Probes are paired across
checkpoints (same prompt, same seed), so differences are judged against the standard error of paired differences.
- best: the earliest eligible checkpoint whose J is within one paired standard error of the top one; an earlier
  checkpoint is preferred when the data cannot tell them apart, since it has seen fewer steps to overfit with. The
  base model is a candidate too: a checkpoint whose J is below the base model's by more than one paired standard
  error (and more than `min_effect`) is worse than no LoRA, and when every eligible checkpoint is, best is step 0:
  nothing is promoted. One the probes cannot tell from the base model is promoted, and the runtime warns that it
  may have learned little.
- stop: after `warmup_steps`, when the smoothed J has not beaten its best by one standard error for `patience`
  evaluations in a row, or when two evaluations in a row are ineligible (the guards failed twice).

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


@dataclass(frozen=True)
class StoppingSettings:
    enabled: bool = True
    patience: int = 3
    warmup_steps: int = 0
    max_adherence_drop: float = 0.25  # a fraction of the base model's text agreement
    max_leakage_rise: float = 0.25  # in similarity (cosine) over the base model's
    max_validation_rise: float = 0.05  # a fraction of the base model's held-out loss
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
    """J per probe."""
    if len(scores.style) != len(baseline.style):
        raise ValueError(f"checkpoint {scores.step} has {len(scores.style)} probes, the baseline {len(baseline.style)}")
    return tuple(
        s - ADHERENCE_WEIGHT * relative_drop(a, ab) - LEAKAGE_WEIGHT * max(0.0, lk - lb)
        for s, a, ab, lk, lb in zip(
            scores.style, scores.adherence, baseline.adherence, scores.leakage, baseline.leakage, strict=True
        )
    )


def _eligibility(scores: ProbeScores, baseline: ProbeScores, settings: StoppingSettings) -> str:
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
    held_out, base_held_out = scores.validation_loss, baseline.validation_loss
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
    for c in ordered:
        why_not = _eligibility(c, baseline, settings)
        score = _mean(per_probe[c.step]) if not why_not.startswith("a score is not") else -math.inf
        judged.append(Judged(c.step, round(score, 6), not why_not, why_not))
    eligible = [j for j in judged if j.eligible]
    best = None
    if eligible:
        top = max(eligible, key=lambda j: (j.score, -j.step))
        base_probes = probe_objective(baseline, baseline)
        best = 0  # the base model, unless a checkpoint is not clearly worse than it
        for j in eligible:  # ascending steps: the first within one paired standard error of the top wins
            margin = paired_standard_error(per_probe[top.step], per_probe[j.step])
            noise = max(paired_standard_error(per_probe[j.step], base_probes), settings.min_effect)
            below_base = base_score - j.score > noise
            if top.score - j.score <= margin and not below_base:
                best = j.step
                break
    stop, reason = _stop(ordered, judged, per_probe, settings)
    return Verdict(best, stop, reason, tuple(judged), base_score)


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
        if c.step < settings.warmup_steps:
            continue  # the warm-up neither stops the run nor uses up its patience
        if failed >= 2:
            return True, f"step {c.step}: two evaluations in a row {GUARDS_FAILED} ({j.why_not})"
        stale += 1
        if stale >= settings.patience:
            return True, f"step {c.step}: {NO_IMPROVEMENT} beyond one standard error for {stale} evaluations"
    return False, "still improving" if stale == 0 else f"{stale} evaluation(s) without improvement"
