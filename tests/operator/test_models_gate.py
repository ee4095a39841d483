"""The models gate: runs that read the model cache wait for the namespace's `kleinstyle models pull` Job.

Pure: the gate reads the pull Job and its pods as the API serves them (the Job controller's conditions, the kubelet's
termination message); reconcile holds a train or generate run before its Job is created, and only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json

import pytest
from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.indexes import CHILD_KINDS, children_index, objects_index
from kleinstyle.operator.kinds import KIND_RUNS
from kleinstyle.operator.models_gate import last_summary, models_gate, read_summary
from kleinstyle.operator.observe import observe
from kleinstyle.operator.pulls import follow, refresh
from kleinstyle.operator.reconcile import Observed, reconcile
from kleinstyle.operator.wakers import Wakers
from kleinstyle.runtime.models.cli import _summary
from kleinstyle.runtime.models.manifest import MANIFEST, select
from kubernetes.client.exceptions import ApiException

from tests.operator.test_reconcile import (
    CFG,
    NOW,
    board,
    generation,
    job_of,
    lora,
    ready_board,
    trained_lora,
    with_status,
)
from tests.support.records import completed_job, records

NS = "team-a"
PULL_JOB = "kleinstyle-models-pull-1a2b3c4d"
PULL_UID = "uid-pull"
# What `kleinstyle models pull --summary /dev/termination-log` leaves when the Hub refuses the gated base model after
# the evaluation models went in: one line of JSON, keys sorted.
FAILED_SUMMARY = (
    json.dumps(
        {
            "complete": {"clip": "clip-vit-large-patch14", "dinov2": "dinov2-base"},
            "error": "klein-base-9b: the Hub refused black-forest-labs/FLUX.2-klein-base-9B (403): accept the licence",
            "missing": {"csd": "CSD-ViT-L", "klein-base-9b": "FLUX.2-klein-base-9B"},
        },
        sort_keys=True,
    )
    + "\n"
)


def pull_job(*conditions: str, name: str = PULL_JOB, uid: str = PULL_UID, created: str = "2026-11-26T11:00:00Z"):
    status: dict = {"conditions": [{"type": c, "status": "True", "reason": reason} for c, reason in conditions]}
    if not conditions:
        status = {"active": 1}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "creationTimestamp": created,
            "labels": {"app.kubernetes.io/component": "models-pull"},
        },
        "status": status,
    }


RUNNING = pull_job()
FAILED = pull_job(("FailureTarget", "BackoffLimitExceeded"), ("Failed", "BackoffLimitExceeded"))
COMPLETE = pull_job(("SuccessCriteriaMet", "CompletionsReached"), ("Complete", "CompletionsReached"))


def pull_pod(terminated: str | None = None, last: str | None = None, job_uid: str = PULL_UID) -> dict:
    """The pull Job's pod as the kubelet reports it: ended with `terminated`'s message, or running after an attempt
    that ended with `last`'s."""
    container: dict = {"name": "pull", "state": {"running": {}}}
    if terminated is not None:
        message = {"exitCode": 1, "reason": "Error", "message": terminated, "finishedAt": "2026-11-26T11:40:00Z"}
        container["state"] = {"terminated": message}
    if last is not None:
        message = {"exitCode": 1, "reason": "Error", "message": last, "finishedAt": "2026-11-26T11:20:00Z"}
        container["lastState"] = {"terminated": message}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{PULL_JOB}-x7k2p",
            "namespace": NS,
            "uid": "uid-pull-pod",
            "labels": {
                "app.kubernetes.io/component": "models-pull",
                "batch.kubernetes.io/controller-uid": job_uid,
                "batch.kubernetes.io/job-name": PULL_JOB,
            },
            "ownerReferences": [{"kind": "Job", "name": PULL_JOB, "uid": job_uid, "controller": True}],
        },
        "status": {"containerStatuses": [container]},
    }


def run(body: dict, pulls=(), pull_pods=(), children=(), deps=None, cfg: OperatorConfig = CFG):
    deps = deps if deps is not None else {("StyleBoard", "bd9"): ready_board()}
    observed = Observed(
        body=body,
        dependencies=deps,
        children=list(children),
        dependency_jobs=records(deps),
        models_pulls=list(pulls),
        models_pull_pods=list(pull_pods),
    )
    return reconcile(observed, cfg, NOW)


def condition(decision, type_: str) -> dict | None:
    return next((c for c in decision.status.get("conditions", []) if c["type"] == type_), None)


# --- the gate alone -----------------------------------------------------------------------------------------------


def test_no_pull_job_is_no_gate():
    assert models_gate([], []) is None


@pytest.mark.parametrize(
    ("job", "hold", "reason"),
    [(RUNNING, True, "ModelsPulling"), (FAILED, True, "ModelsPullFailed"), (COMPLETE, False, "ModelsPulled")],
)
def test_the_gate_follows_the_pull_jobs_conditions(job, hold, reason):
    gate = models_gate([job], [])
    assert gate is not None and (gate.hold, gate.reason, gate.job) == (hold, reason, PULL_JOB)


def test_the_newest_pull_job_decides():
    old_failed = pull_job(("Failed", "DeadlineExceeded"), name="old", uid="u-old", created="2026-11-20T00:00:00Z")
    newer_complete = pull_job(("Complete", "CompletionsReached"), name="new", uid="u-new")
    assert models_gate([newer_complete, old_failed], []).hold is False
    old_complete = pull_job(("Complete", "CompletionsReached"), name="old", uid="u-old", created="2026-11-20T00:00:00Z")
    newer_running = pull_job(name="new", uid="u-new")
    gate = models_gate([old_complete, newer_running], [])
    assert (gate.hold, gate.job) == (True, "new")


def test_the_runtimes_summary_reads_as_written(tmp_path):
    """The shape `kleinstyle models pull --summary` writes is the shape the gate reads."""
    path = tmp_path / "termination-log"
    chosen = select(MANIFEST)
    complete = tuple(s.name for s in chosen if s.name != "csd")
    _summary(str(path), chosen, complete, "csd: checksum mismatch")
    summary = read_summary(path.read_text())
    assert summary is not None and summary.missing == {"csd": "CSD-ViT-L"}
    assert summary.error == "csd: checksum mismatch" and "csd" not in summary.complete


@pytest.mark.parametrize("message", [None, "", "Traceback (most recent call last):", "[1, 2]", '{"complete": 1}'])
def test_a_termination_message_that_is_no_summary_reads_as_none(message):
    assert read_summary(message) is None


def test_the_latest_attempts_summary_counts():
    earlier = FAILED_SUMMARY.replace("403", "503")
    pod = pull_pod(terminated=FAILED_SUMMARY, last=earlier)
    assert "403" in (last_summary([pod]).error or "")


# --- reconcile: who is held, and how it reads ---------------------------------------------------------------------


def test_without_a_pull_job_a_lora_starts_as_before():
    decision = run(lora())
    assert job_of(decision) and decision.status["phase"] == "Pending"
    assert condition(decision, "ModelsReady") is None


def test_a_running_pull_holds_a_lora_before_its_job():
    decision = run(lora(), pulls=[RUNNING], pull_pods=[pull_pod()])
    assert (decision.create, decision.delete) == ([], [])
    assert (decision.status["phase"], condition(decision, "Ready")["reason"]) == ("Waiting", "ModelsPulling")
    models = condition(decision, "ModelsReady")
    assert (models["status"], models["reason"]) == ("False", "ModelsPulling")
    assert f"models-pull Job {PULL_JOB}" in models["message"]
    assert condition(decision, "Reconciling")["status"] == "True"
    assert condition(decision, "Stalled")["status"] == "False"
    assert [(e.type, e.reason) for e in decision.events] == [("Normal", "ModelsPulling")]
    # Nothing of a run is recorded while held.
    assert "runHash" not in decision.status and "jobName" not in decision.status


def test_a_failed_pull_holds_and_names_the_missing_model_folders():
    decision = run(lora(), pulls=[FAILED], pull_pods=[pull_pod(terminated=FAILED_SUMMARY)])
    assert decision.create == [] and decision.status["phase"] == "Waiting"
    models = condition(decision, "ModelsReady")
    assert (models["status"], models["reason"]) == ("False", "ModelsPullFailed")
    message = models["message"]
    assert f"models-pull Job {PULL_JOB} failed (BackoffLimitExceeded)" in message
    assert "csd (CSD-ViT-L/)" in message and "klein-base-9b (FLUX.2-klein-base-9B/)" in message
    assert "clip-vit-large-patch14" not in message  # complete: not named as missing
    assert "the Hub refused black-forest-labs/FLUX.2-klein-base-9B (403)" in message
    assert decision.status["message"] == message
    assert condition(decision, "Stalled")["status"] == "True"  # it does not mend itself
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "ModelsPullFailed")]


def test_a_failed_pull_whose_pod_is_gone_says_so():
    decision = run(lora(), pulls=[FAILED])
    message = condition(decision, "ModelsReady")["message"]
    assert "failed (BackoffLimitExceeded)" in message and "left no summary" in message


def test_a_retrying_pull_names_what_its_failed_attempt_missed():
    decision = run(lora(), pulls=[RUNNING], pull_pods=[pull_pod(last=FAILED_SUMMARY)])
    message = condition(decision, "ModelsReady")["message"]
    assert condition(decision, "ModelsReady")["reason"] == "ModelsPulling"
    assert "an attempt failed, missing csd (CSD-ViT-L/), klein-base-9b (FLUX.2-klein-base-9B/)" in message


def test_a_pod_of_another_job_is_not_this_pulls_summary():
    decision = run(lora(), pulls=[FAILED], pull_pods=[pull_pod(terminated=FAILED_SUMMARY, job_uid="uid-other")])
    assert "left no summary" in condition(decision, "ModelsReady")["message"]


def test_the_same_hold_posts_no_second_event():
    first = run(lora(), pulls=[RUNNING])
    again = run(with_status(lora(), first), pulls=[RUNNING])
    assert again.events == [] and again.create == []


def test_a_held_lora_starts_once_the_pull_completes():
    held = with_status(lora(), run(lora(), pulls=[RUNNING]))
    decision = run(held, pulls=[COMPLETE])
    assert job_of(decision) and decision.status["phase"] == "Pending"
    models = condition(decision, "ModelsReady")
    assert (models["status"], models["reason"]) == ("True", "ModelsPulled")


def test_a_held_lora_starts_when_the_pull_job_is_deleted():
    held = with_status(lora(), run(lora(), pulls=[FAILED]))
    decision = run(held)
    assert job_of(decision)
    assert (condition(decision, "ModelsReady")["status"], condition(decision, "ModelsReady")["reason"]) == (
        "True",
        "NoModelsPull",
    )


def test_a_run_already_started_is_not_held():
    """A pull (re)started after a run's Job was created changes nothing for that run."""
    started = run(lora())
    body = with_status(lora(), started)
    job = copy.deepcopy(job_of(started))
    job["metadata"]["uid"] = "uid-train-job"
    job["status"] = {"active": 1}
    children = [*(c for c in started.create if c["kind"] != "Job"), job]
    for pulls in ([RUNNING], [FAILED]):
        decision = run(body, pulls=pulls, pull_pods=[pull_pod(terminated=FAILED_SUMMARY)], children=children)
        assert decision.status["phase"] == "Running" and decision.create == [] and decision.delete == []
        assert condition(decision, "ModelsReady") is None


def test_a_generation_job_is_held_too():
    deps = {("StyleLoRA", "bd9-lora"): trained_lora()}
    decision = run(generation(), pulls=[FAILED], pull_pods=[pull_pod(terminated=FAILED_SUMMARY)], deps=deps)
    assert (decision.status["phase"], decision.create) == ("Waiting", [])
    assert "klein-base-9b (FLUX.2-klein-base-9B/)" in condition(decision, "ModelsReady")["message"]


def test_steps_that_do_not_read_the_model_cache_are_not_held():
    decision = run(board(), pulls=[RUNNING], deps={})
    assert job_of(decision) and condition(decision, "ModelsReady") is None
    volumes = job_of(decision)["spec"]["template"]["spec"]["volumes"]
    assert CFG.model_cache_claim not in json.dumps(volumes)


def test_a_waiting_dependency_is_told_before_the_models():
    waiting = board()
    waiting["status"] = {"phase": "Running", "observedGeneration": 1}
    decision = run(lora(), pulls=[RUNNING], deps={("StyleBoard", "bd9"): waiting})
    assert condition(decision, "DependenciesReady")["status"] == "False"
    assert condition(decision, "ModelsReady") is None


def test_status_does_not_open_the_gate():
    """A forged `ModelsReady=True` (or phase) in the resource's status is no pull: the Job decides."""
    body = lora()
    body["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "ModelsReady", "status": "True", "reason": "ModelsPulled", "message": ""}],
    }
    decision = run(body, pulls=[RUNNING])
    assert decision.create == [] and condition(decision, "ModelsReady")["status"] == "False"


# --- observe and the listing: what reaches the reconcile ----------------------------------------------------------


def _indexes() -> dict:
    indexes: dict = {children_index(kind): {} for kind in CHILD_KINDS}
    indexes.update({objects_index(kind): {} for kind in KIND_RUNS})
    indexes[objects_index("StyleBoard")] = {(NS, "bd9"): [ready_board()]}
    indexes[children_index("Job")] = {"uid-board": [completed_job(ready_board())]}  # the board's record
    return indexes


def test_before_the_namespace_is_listed_nothing_is_done():
    """A run that would read the model cache waits for the first listing of its namespace's pull Jobs: no Job, no
    status, no Event; it asks for the listing, which wakes it."""
    wakers = Wakers()
    seen = observe(lora(), _indexes(), wakers)
    assert seen.models_pulls is None and "uid-lora" in wakers.waiting_models[NS] and wakers.pulls_wanted.is_set()
    decision = reconcile(seen, CFG, NOW)
    assert (decision.create, decision.status, decision.events) == ([], {}, [])


def test_observe_brings_the_namespaces_listed_pull():
    wakers = Wakers()
    wakers.pulls[NS] = ([FAILED], [pull_pod(terminated=FAILED_SUMMARY)])
    decision = reconcile(observe(lora(), _indexes(), wakers), CFG, NOW)
    assert "csd (CSD-ViT-L/)" in condition(decision, "ModelsReady")["message"]
    # A board's prepare never reads the model cache: it does not wait, and nothing is listed for it.
    board_wakers = Wakers()
    assert job_of(reconcile(observe(board(), _indexes(), board_wakers), CFG, NOW))
    assert not board_wakers.waiting_models[NS] and not board_wakers.pulls_wanted.is_set()


def test_a_finished_run_stops_waiting():
    wakers = Wakers()
    observe(lora(), _indexes(), wakers)
    done = lora()
    done["status"] = {"phase": "Succeeded", "observedGeneration": 1, "runHash": "abc"}
    observe(done, _indexes(), wakers)
    assert wakers.waiting_models[NS] == set()


class FakeKube:
    """The two listings `pulls` makes, answered from what the test puts here."""

    def __init__(self, jobs=(), pods=(), error: Exception | None = None):
        self.jobs, self.pods, self.error, self.calls = list(jobs), list(pods), error, []

    async def list(self, kind: str, namespace: str, label_selector: str) -> list[dict]:
        self.calls.append((kind, namespace, label_selector))
        if self.error is not None:
            raise self.error
        return copy.deepcopy(self.jobs if kind == "Job" else self.pods)


def _versioned(obj: dict, version: str) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = version
    return obj


async def test_the_listing_wakes_the_waiting_runs_when_the_pull_changes():
    wakers = Wakers()
    wakers.waiting_models[NS].add("uid-lora")
    woken = wakers.event("uid-lora")
    kube = FakeKube([_versioned(RUNNING, "1")], [_versioned(pull_pod(), "1")])
    await refresh(kube, wakers, NS)
    assert woken.is_set() and kube.calls == [
        ("Job", NS, "app.kubernetes.io/component=models-pull"),
        ("Pod", NS, "app.kubernetes.io/component=models-pull"),
    ]
    woken.clear()
    await refresh(kube, wakers, NS)  # nothing changed: nobody woken
    assert not woken.is_set()
    kube.jobs = [_versioned(COMPLETE, "2")]
    await refresh(kube, wakers, NS)
    assert woken.is_set() and models_gate(*wakers.pulls[NS]).hold is False


async def test_a_pod_deleted_while_its_job_stays_is_kept():
    wakers = Wakers()
    wakers.waiting_models[NS].add("uid-lora")
    kube = FakeKube([_versioned(RUNNING, "1")], [_versioned(pull_pod(last=FAILED_SUMMARY), "1")])
    await refresh(kube, wakers, NS)
    kube.jobs, kube.pods = [_versioned(FAILED, "2")], []  # the Job controller deleted the pod of the failed Job
    await refresh(kube, wakers, NS)
    gate = models_gate(*wakers.pulls[NS])
    assert gate.reason == "ModelsPullFailed" and "csd (CSD-ViT-L/)" in gate.message
    kube.jobs = []  # the Job is gone too: so is its pod
    await refresh(kube, wakers, NS)
    assert wakers.pulls[NS] == ([], [])


async def test_a_refused_listing_counts_as_no_pull_and_a_transient_one_is_retried():
    wakers = Wakers()
    await refresh(FakeKube(error=ApiException(status=503, reason="Service Unavailable")), wakers, NS)
    assert NS not in wakers.pulls  # still unknown: the next round tries again
    await refresh(FakeKube(error=ApiException(status=403, reason="Forbidden")), wakers, NS)
    assert wakers.pulls[NS] == ([], [])  # runs are not held for ever by a missing RBAC rule


async def test_the_listing_follows_only_namespaces_where_something_waits():
    wakers = Wakers()
    wakers.waiting_models[NS].add("uid-lora")
    wakers.waiting_models["team-b"] = set()
    wakers.pulls["team-b"] = ([RUNNING], [])
    kube = FakeKube([_versioned(RUNNING, "1")])
    task = asyncio.create_task(follow(kube, wakers, interval=3600))
    try:
        for _ in range(100):
            if NS in wakers.pulls:
                break
            await asyncio.sleep(0.01)
        assert {ns for _, ns, _ in kube.calls} == {NS}
        assert "team-b" not in wakers.pulls and "team-b" not in wakers.waiting_models
        # A namespace wanted for the first time is listed at once, not at the next round.
        wakers.waiting_models["team-c"].add("uid-other")
        wakers.pulls_wanted.set()
        for _ in range(100):
            if "team-c" in wakers.pulls:
                break
            await asyncio.sleep(0.01)
        assert "team-c" in wakers.pulls
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
