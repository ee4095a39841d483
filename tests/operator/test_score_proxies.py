"""Checkpoint scores measured by stand-ins (no evaluation model): status says so in words before the run starts
(the operator's configuration names no model) and while it runs (the pod found none), and shows no pick or stop."""

from __future__ import annotations

from kleinstyle.contract.reports import TrainReport
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.reconcile import Observed, reconcile

from tests.support.records import records

from .test_reconcile import NOW, _job, lora, ready_board, report, with_status

DEPS = {("StyleBoard", "bd9"): ready_board()}
MODELS = {"styleEmbedderDir": "csd", "textModelDir": "clip", "embedderDir": "dinov2"}
PEAK = [  # style scores that peak at step 100 and fall: a pick at 100, a stop, on real scores
    {"step": step, "style": [s, s], "adherence": [0.3, 0.3], "leakage": [0.2, 0.2]}
    for step, s in ((100, 0.7), (200, 0.5), (300, 0.4), (400, 0.3))
]
BASELINE = {"step": 0, "style": [0.3, 0.3], "adherence": [0.3, 0.3], "leakage": [0.2, 0.2]}


def config(**evaluation: str) -> OperatorConfig:
    """The operator's configuration naming only the evaluation models given (none: no model configured)."""
    unset = dict.fromkeys(MODELS)
    return OperatorConfig.model_validate({"checkpointEvaluation": {**unset, **evaluation}})


def reconciled(body: dict, cfg: OperatorConfig, children=()) -> dict:
    observed = Observed(body=body, dependencies=DEPS, children=list(children), dependency_jobs=records(DEPS))
    return reconcile(observed, cfg, NOW).status


def warning(status: dict) -> str:
    return next((c["message"] for c in status["conditions"] if c["type"] == "Warning" and c["status"] == "True"), "")


def test_a_configuration_naming_no_evaluation_model_warns_before_the_run_starts() -> None:
    status = reconciled(lora(), config(styleEmbedderDir="csd"))
    said = warning(status)
    assert "adherence (checkpointEvaluation.textModelDir), leakage (checkpointEvaluation.embedderDir)" in said
    assert "proxies" in said and "early stopping will not stop the run" in said
    assert "style (" not in said  # the one named is no proxy
    assert "proxies" not in warning(reconciled(lora(), config(**MODELS)))
    assert "proxies" not in warning(reconciled(lora(earlyStopping={"enabled": False}), config()))  # nothing scored


def _with_scores(cfg: OperatorConfig, proxies: dict[str, str]) -> dict:
    first = reconcile(Observed(body=lora(), dependencies=DEPS, dependency_jobs=records(DEPS)), cfg, NOW)
    body = with_status(lora(), first)
    checkpoints = [{"step": c["step"], "uri": f"pvc://x/step_{c['step']:06d}"} for c in PEAK]
    evaluation = {"baseline": BASELINE, "checkpoints": PEAK, "proxies": proxies}
    live = {"step": 400, "totalSteps": 1000, "checkpoints": checkpoints, "evaluation": evaluation}
    body["status"]["progress"] = report(first, TrainReport, state="Running", progress=live)
    children = [*first.create[:-1], _job(first, active=1)]
    return reconciled(body, cfg, children)


def test_proxy_scores_a_pod_reports_are_shown_as_proxies_and_pick_nothing() -> None:
    measured = _with_scores(config(**MODELS), {})
    assert measured["bestCheckpoint"] == 100 and measured.get("scoreProxies") is None
    proxied = _with_scores(config(**MODELS), {"style": "colour moments: no model at /models/csd"})
    assert proxied["scoreProxies"] == [{"score": "style", "measuredBy": "colour moments: no model at /models/csd"}]
    assert proxied.get("bestCheckpoint") is None
    assert proxied["earlyStopping"].startswith("off: the scores for style are proxies")
    assert [c["score"] for c in proxied["checkpoints"]] == [c["score"] for c in measured["checkpoints"]]  # shown
