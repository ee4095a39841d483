"""The early-stopping policy on hand-made score series (orderings and decisions, not magic numbers)."""

import math

import pytest
from kleinstyle.contract.early_stop import (
    ProbeScores,
    StoppingSettings,
    decide,
    paired_standard_error,
    probe_objective,
)
from kleinstyle.contract.reports import ProbeScoresReport

PROBES = 4
NOISE = (0.01, -0.01, 0.005, -0.005)  # per-probe wobble, the same at every checkpoint (paired probes)


def scores(step: int, style: float, adherence: float = 0.9, leakage: float = 0.2, jitter: float = 0.0) -> ProbeScores:
    wobble = tuple(style + n + (jitter * (i % 2)) for i, n in enumerate(NOISE))
    return ProbeScores(step, wobble, (adherence,) * PROBES, (leakage,) * PROBES)


BASE = scores(0, 0.1, adherence=1.0, leakage=0.2)


def test_best_is_the_top_when_it_is_clearly_better():
    series = [scores(100, 0.3), scores(200, 0.5), scores(300, 0.4)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert decision.best_step == 200
    assert [j.step for j in decision.judged] == [100, 200, 300]
    assert decision.score_of(200) > decision.score_of(300) > decision.score_of(100)


def test_among_checkpoints_the_probes_cannot_tell_from_the_top_the_best_neighbourhood_wins():
    # 200 is the top, but its jitter leaves 500 within one paired standard error of it, and 500's neighbours score
    # higher than 200's: on a smooth trajectory the neighbourhood says where the real top is, not one noisy peak.
    series = [scores(100, 0.40), scores(200, 0.49, jitter=0.08), scores(300, 0.42), scores(400, 0.5)]
    series += [scores(500, 0.52), scores(600, 0.51), scores(700, 0.45)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert decision.score_of(200) > decision.score_of(500) > decision.score_of(400)
    assert decision.best_step == 500
    # Outside one standard error of the top, a checkpoint is out whatever its neighbours: the top wins.
    steady = [scores(100, 0.40), scores(200, 0.60), scores(300, 0.42), scores(400, 0.5), scores(500, 0.52)]
    assert decide(BASE, [*steady, scores(600, 0.51)], StoppingSettings(patience=5)).best_step == 200


def test_a_statistical_tie_is_not_settled_for_the_earliest():
    # 200 trails 300 by less than one paired standard error; the earlier checkpoint is no longer preferred for that
    # alone (it picked 1-4 intervals early on saturating runs): 300's neighbourhood is the better one.
    series = [scores(100, 0.3), scores(200, 0.5, jitter=0.04), scores(300, 0.53)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert decision.score_of(300) > decision.score_of(200)
    assert decision.best_step == 300


def test_order_of_reports_does_not_matter():
    series = [scores(300, 0.4), scores(100, 0.3), scores(200, 0.5)]
    assert decide(BASE, series, StoppingSettings()).best_step == 200


def test_a_checkpoint_that_stops_drawing_the_prompt_is_ineligible():
    series = [scores(100, 0.3), scores(200, 0.9, adherence=0.1)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert decision.best_step == 100
    assert not decision.judged[1].eligible and "adherence" in decision.judged[1].why_not


def test_leakage_rise_is_penalised_and_guarded():
    series = [scores(100, 0.4), scores(200, 0.42, leakage=0.3), scores(300, 0.9, leakage=0.9)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert decision.score_of(200) < decision.score_of(100)  # a small rise costs more than the small style gain
    assert "leakage" in decision.judged[2].why_not
    assert decision.best_step == 100


def test_stops_after_patience_evaluations_clearly_below_the_best_past_warmup():
    # The smoothed J lags the raw one by an evaluation: it peaks at 300, then falls below it three times by 600.
    falling = [0.3, 0.5, 0.45, 0.44, 0.43, 0.42]
    series = [scores(100 * (i + 1), s) for i, s in enumerate(falling)]
    settings = StoppingSettings(patience=3, warmup_steps=0)
    assert not decide(BASE, series[:5], settings).stop
    decision = decide(BASE, series, settings)
    assert decision.stop and "no improvement" in decision.reason
    assert decision.best_step == 200


def test_a_plateau_does_not_stop_a_run_a_late_bloomer_rises_after_it():
    # Flat within the probes' noise for seven evaluations (no warm-up), then the style blooms: no stop on the way.
    flat = [scores(100 * i, 0.3, jitter=0.04 if i % 2 else -0.04) for i in range(1, 8)]
    bloom = [scores(800, 0.4), scores(900, 0.5), scores(1000, 0.55)]
    for n in range(1, len(flat) + 1):
        assert not decide(BASE, flat[:n], StoppingSettings(patience=2)).stop
    decision = decide(BASE, flat + bloom, StoppingSettings(patience=2))
    assert not decision.stop and decision.best_step == 1000


def test_the_default_patience_is_two_evaluations_clearly_below_the_best():
    series = [scores(100, 0.3), scores(200, 0.5), scores(300, 0.5), scores(400, 0.3), scores(500, 0.3)]
    assert StoppingSettings().patience == 2
    assert not decide(BASE, series[:4], StoppingSettings()).stop
    assert decide(BASE, series, StoppingSettings()).stop


def test_no_stop_during_warmup_or_when_disabled():
    series = [scores(100, 0.5), scores(200, 0.4), scores(300, 0.4), scores(400, 0.4)]
    assert decide(BASE, series, StoppingSettings(patience=2, warmup_steps=1000)).stop is False
    off = decide(BASE, series, StoppingSettings(enabled=False, patience=1))
    assert off.stop is False and off.best_step == 100


def test_guards_failing_twice_stop_the_run():
    series = [scores(100, 0.3), scores(200, 0.6, adherence=0.1), scores(300, 0.7, adherence=0.05)]
    decision = decide(BASE, series, StoppingSettings(patience=10))
    assert decision.stop and "guards" in decision.reason
    assert decision.best_step == 100


def test_steady_improvement_never_stops():
    series = [scores(100 * i, 0.1 + 0.1 * i) for i in range(1, 8)]
    decision = decide(BASE, series, StoppingSettings(patience=2))
    assert not decision.stop and decision.best_step == 700


def test_mismatched_probe_counts_are_refused():
    with pytest.raises(ValueError, match="probes"):
        decide(BASE, [ProbeScores(100, (0.1,), (0.9,), (0.2,))], StoppingSettings())
    with pytest.raises(ValueError, match="one value per probe"):
        ProbeScores(100, (0.1, 0.2), (0.9,), (0.2,))


def test_paired_standard_error():
    assert paired_standard_error([1.0], [0.0]) == 0.0
    assert paired_standard_error([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 0.0  # a constant shift has no spread
    assert paired_standard_error([1.0, 3.0], [0.0, 0.0]) == pytest.approx(1.0)


def test_round_trip_through_reports():
    s = scores(100, 0.3)
    assert ProbeScores.from_report(ProbeScoresReport.model_validate(s.to_report().model_dump(mode="json"))) == s


def test_an_ineligible_first_evaluation_sets_no_bar():
    rising = [scores(100, 0.9, adherence=0.1), scores(200, 0.35), scores(300, 0.4), scores(400, 0.45), scores(500, 0.5)]
    decision = decide(BASE, rising, StoppingSettings(patience=2))
    assert not decision.stop and decision.best_step == 500


def test_the_warmup_does_not_use_up_patience():
    series = [scores(100, 0.5), scores(200, 0.4), scores(300, 0.4), scores(400, 0.4), scores(500, 0.4)]
    assert not decide(BASE, series, StoppingSettings(patience=3, warmup_steps=450)).stop
    assert decide(BASE, series, StoppingSettings(patience=3, warmup_steps=0)).stop


def test_a_score_that_is_not_a_number_is_ineligible():
    nan = float("nan")
    series = [scores(100, 0.3), ProbeScores(200, (nan,) * 4, (0.9,) * 4, (0.2,) * 4), scores(300, 0.35)]
    decision = decide(BASE, series, StoppingSettings(patience=5))
    assert not decision.judged[1].eligible and "not a number" in decision.judged[1].why_not
    assert decision.best_step in (100, 300)


def test_a_score_reported_as_null_reads_back_as_not_a_number():
    report = {"step": 2, "style": [None, 0.5], "adherence": [0.9, 0.9], "leakage": [0.2, 0.2]}
    scores = ProbeScores.from_report(ProbeScoresReport.model_validate(report))
    assert math.isnan(scores.style[0])


def test_the_base_model_is_a_candidate_a_lora_below_it_is_not_promoted():
    strong_base = scores(0, 0.6, adherence=1.0)
    series = [scores(100, 0.3), scores(200, 0.5), scores(300, 0.55)]
    decision = decide(strong_base, series, StoppingSettings(patience=5))
    assert decision.base_score == pytest.approx(0.6)
    assert decision.best_step == 0  # every checkpoint scores below the base model: nothing to promote
    above = decide(strong_base, [*series, scores(400, 0.8)], StoppingSettings(patience=5))
    assert above.best_step == 400


def test_style_rising_while_the_picture_drifts_from_the_base_is_not_lost_adherence():
    # Each evaluation the style rises +0.02 while the render moves away from the base model's picture; the text
    # agreement (adherence) stays where the base model's is. The policy keeps the latest, and keeps training.
    base = scores(0, 0.5, adherence=0.3)
    series = [scores(100 * i, 0.5 + 0.02 * i, adherence=0.3) for i in range(1, 7)]
    decision = decide(base, series, StoppingSettings(patience=2, warmup_steps=0))
    assert decision.best_step == 600 and not decision.stop
    assert all(j.eligible for j in decision.judged)


def test_a_held_out_loss_above_the_base_models_twice_in_a_row_is_memorisation():
    base = ProbeScores(0, (0.1,) * 4, (0.9,) * 4, (0.2,) * 4, validation_loss=1.0)
    fits = ProbeScores(100, (0.4,) * 4, (0.9,) * 4, (0.2,) * 4, validation_loss=0.95)
    rising = ProbeScores(200, (0.5,) * 4, (0.9,) * 4, (0.2,) * 4, validation_loss=1.2)
    memorises = ProbeScores(300, (0.6,) * 4, (0.9,) * 4, (0.2,) * 4, validation_loss=1.25)
    decision = decide(base, [fits, rising, memorises], StoppingSettings(patience=5))
    assert decision.judged[1].eligible  # once over the limit may be the held-out loss's jitter
    assert "held-out loss 1.2 is over 10% above the base model's 1" in decision.judged[2].why_not
    assert decision.best_step == 200
    report = memorises.to_report()
    assert report.validation_loss == 1.25 and ProbeScores.from_report(report) == memorises


def test_one_jittery_held_out_loss_rules_nothing_out():
    base = ProbeScores(0, (0.1,) * 4, (0.9,) * 4, (0.2,) * 4, validation_loss=1.0)
    losses = [0.98, 1.15, 0.99, 1.12, 0.97]  # spikes over 10%, never two in a row
    series = [
        ProbeScores(100 * (i + 1), (0.3 + 0.05 * i,) * 4, (0.9,) * 4, (0.2,) * 4, v) for i, v in enumerate(losses)
    ]
    decision = decide(base, series, StoppingSettings(patience=2))
    assert all(j.eligible for j in decision.judged) and decision.best_step == 500


def test_noisy_adherence_and_leakage_cost_nothing_on_average():
    # Per-probe adherence and leakage scatter around the base model's with no mean change: no penalty, whereas a
    # hinge per probe would have charged the scatter (max(0, noise) has a positive mean).
    base = ProbeScores(0, (0.5,) * 4, (0.3,) * 4, (0.2,) * 4)
    noisy = ProbeScores(100, (0.5,) * 4, (0.33, 0.27, 0.32, 0.28), (0.23, 0.17, 0.22, 0.18))
    assert sum(probe_objective(noisy, base)) / 4 == pytest.approx(0.5)
    worse = ProbeScores(100, (0.5,) * 4, (0.27,) * 4, (0.25,) * 4)  # a real mean drop of 10% and rise of 0.05
    assert sum(probe_objective(worse, base)) / 4 == pytest.approx(0.5 - 0.5 * 0.1 - 0.05)
