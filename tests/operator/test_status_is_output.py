"""Status is output, never input; runs survive their dependencies (docs/threat-model.md), through the pure reconcile.

A tenant who may patch the status subresource can write any phase, run id or URI there. These tests play that
tenant: each forged status must change nothing a pod reads or opens. And a run that has started goes on, with what
it was started with, when a dependency is deleted, re-created or retrained, or the operator's limits change.
"""

from __future__ import annotations

import copy
import json

import pytest
from kleinstyle.contract.reports import TrainReport
from kleinstyle.contract.runspec import RunSpec
from kleinstyle.operator.config import TrainingLimits
from kleinstyle.operator.reconcile import failed_reconcile, reconcile

from tests.support.records import completed_job, observed

from .test_dependencies import conditions
from .test_reconcile import (
    CFG,
    NOW,
    _job,
    board,
    generate_work,
    generation,
    lora,
    ready_board,
    report,
    trained_lora,
    with_status,
)


def phantom(**status) -> dict:
    """A StyleLoRA whose board does not exist and that never ran, its status patched by its tenant."""
    body = lora(boardRef={"name": "no-such-board"})
    body["metadata"].update(name="phantom", uid="uid-phantom")
    body["status"] = {"phase": "Succeeded", "observedGeneration": 1, "runHash": "abc", **status}
    return body


TEAM_A_LORA = "pvc://kleinstyle-artifacts/team-a/stylelora/bd9-lora/uid-a/0123456789/lora.safetensors"


def test_a_forged_succeeded_lora_feeds_no_generation():
    forged = phantom(loraURI=TEAM_A_LORA)
    deps = {("StyleLoRA", "bd9-lora"): forged}
    decision = reconcile(observed(body=generation(), dependencies=deps, dependency_jobs={}), CFG, NOW)
    assert decision.status["phase"] == "Waiting" and decision.create == []
    ready = conditions(decision.status)["DependenciesReady"]
    assert ready["reason"] == "StyleLoRAUnrecorded"
    assert "no Job this operator ran for it completed that run" in ready["message"]
    # A Job that did not complete (still running, or failed) is no record of a success either.
    for state in ("Failed", "Suspended"):
        jobs = {("StyleLoRA", "bd9-lora"): [completed_job(forged, condition=state)]}
        waiting = reconcile(observed(body=generation(), dependencies=deps, dependency_jobs=jobs), CFG, NOW)
        assert waiting.status["phase"] == "Waiting" and waiting.create == []


def test_the_forged_lora_itself_is_not_kept_as_succeeded():
    decision = reconcile(observed(body=phantom(loraURI=TEAM_A_LORA)), CFG, NOW)
    assert decision.status["phase"] == "Waiting"
    assert conditions(decision.status)["Ready"]["reason"] == "StyleBoardNotFound"


def test_where_a_lora_is_comes_from_its_uid_and_run_never_its_status():
    for forged_uri in (TEAM_A_LORA, "http://127.0.0.1:8444/secret", "s3://other-bucket/x", "/models/secret"):
        dep = trained_lora(runHash="abc", loraURI=forged_uri)
        work = generate_work(
            reconcile(observed(body=generation(), dependencies={("StyleLoRA", "bd9-lora"): dep}), CFG, NOW)
        )
        assert [item["uri"] for item in work["loras"]] == [
            "/artifacts/team-a/stylelora/bd9-lora/uid/abc/lora.safetensors"
        ]


def test_a_run_id_that_is_no_run_of_ours_is_not_followed():
    for run_hash in ("../../team-b/stylelora/x/uid/abc", "ABC", "0123456789a", "", 7):
        dep = trained_lora(runHash=run_hash)
        jobs = {("StyleLoRA", "bd9-lora"): [completed_job({**dep, "status": {"runHash": str(run_hash)}})]}
        decision = reconcile(
            observed(body=generation(), dependencies={("StyleLoRA", "bd9-lora"): dep}, dependency_jobs=jobs), CFG, NOW
        )
        assert decision.status["phase"] == "Waiting" and decision.create == [], run_hash


def test_a_job_someone_else_controls_is_no_record():
    dep = trained_lora(runHash="abc")
    job = completed_job(dep)
    job["metadata"]["ownerReferences"][0]["uid"] = "uid-of-another-object"
    deps = {("StyleLoRA", "bd9-lora"): dep}
    decision = reconcile(
        observed(body=generation(), dependencies=deps, dependency_jobs={("StyleLoRA", "bd9-lora"): [job]}), CFG, NOW
    )
    assert decision.status["phase"] == "Waiting"


def test_an_unknown_node_pool_fails_at_once_naming_the_field():
    body = lora(scheduling={"nodePool": "a100"})
    decision = reconcile(observed(body=body, dependencies={("StyleBoard", "bd9"): ready_board()}), CFG, NOW)
    assert decision.status["phase"] == "Failed" and decision.create == []
    ready = conditions(decision.status)["Ready"]
    assert ready["reason"] == "InvalidSpec"
    assert ready["message"] == "spec.scheduling.nodePool: 'a100' is not a node pool of this operator (known: h200)"
    assert conditions(decision.status)["Stalled"]["status"] == "True"
    assert [e.type for e in decision.events] == ["Warning"]


# ---- runs survive their dependencies ------------------------------------------------------------------------------


def started_lora(cfg=CFG):
    """A StyleLoRA whose train Job is running, as the operator left it."""
    deps = {("StyleBoard", "bd9"): ready_board()}
    first = reconcile(observed(body=lora(), dependencies=deps), cfg, NOW)
    children = [*first.create[:-1], _job(first, active=1)]
    body = with_status(lora(), first)
    running = reconcile(observed(body=body, dependencies=deps, children=children), cfg, NOW)
    assert running.status["phase"] == "Running"
    return with_status(body, running), children, first


def test_a_running_lora_trains_on_when_its_board_is_deleted():
    body, children, first = started_lora()
    decision = reconcile(observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=children), CFG, NOW)
    assert decision.status["phase"] == "Running" and decision.status["runHash"] == first.status["runHash"]
    assert decision.create == [] and decision.delete == []  # its Job, RunSpec and RBAC stay
    source = conditions(decision.status)["SourcesCurrent"]
    assert (source["status"], source["reason"]) == ("False", "SourceChanged")
    assert "StyleBoard bd9 was deleted" in source["message"]
    assert decision.events == []  # Running before, Running now: no Event

    # Reconciled again and again: still no Event (a status without a run once differed from one with, each time).
    body = with_status(body, decision)
    for _ in range(3):
        again = reconcile(observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=children), CFG, NOW)
        assert again.events == []

    # The Job completes: the result reaches status, the LoRA where the RunSpec says.
    result = {"lora_step": 30, "steps": 30, "total_steps": 30, "checkpoints": []}
    body["status"]["progress"] = report(first, TrainReport, state="Succeeded", result=result)
    done_job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    done = reconcile(
        observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=[*children[:-1], done_job]), CFG, NOW
    )
    assert done.status["phase"] == "Succeeded"
    assert done.status["loraURI"] == f"{first.status['artifactURI']}/lora.safetensors"
    assert {c["kind"] for c in done.delete} == {"ServiceAccount", "Role", "RoleBinding"}  # the run is over

    # The board re-created with equal content (a new uid, so a new dataset path): the finished run is kept.
    body = with_status(body, done)
    recreated = ready_board()
    recreated["metadata"]["uid"] = "uid-board-2"
    recreated["status"]["runHash"] = "def"
    kept = reconcile(
        observed(body=body, dependencies={("StyleBoard", "bd9"): recreated}, children=[*children[3:-1], done_job]),
        CFG,
        NOW,
    )
    assert kept.create == [] and kept.delete == []
    assert kept.status["phase"] == "Succeeded" and "runHash" not in kept.status  # the run id it had stays


def test_a_running_lora_is_not_restarted_by_a_retrained_board_or_new_training_limits():
    body, children, first = started_lora()
    retrained = ready_board()
    retrained["status"]["runHash"] = "def"
    capped = CFG.model_copy(update={"training_limits": TrainingLimits(maxSteps=100)})
    for cfg, deps in ((CFG, {("StyleBoard", "bd9"): retrained}), (capped, {("StyleBoard", "bd9"): ready_board()})):
        decision = reconcile(observed(body=body, dependencies=deps, children=children), cfg, NOW)
        assert decision.create == [] and decision.delete == []
        assert decision.status["runHash"] == first.status["runHash"]
        assert decision.status["totalSteps"] == first.status["totalSteps"]  # the plan it started with
    # A new run (an edited spec) takes the new limits.
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    rerun = reconcile(
        observed(body=edited, dependencies={("StyleBoard", "bd9"): ready_board()}, children=children), capped, NOW
    )
    assert rerun.status["totalSteps"] == 100 and rerun.status["runHash"] != first.status["runHash"]
    assert {c["kind"] for c in rerun.delete} == {"ConfigMap", "Job"}


def test_an_edited_spec_with_its_board_gone_leaves_the_old_run_going_until_it_can_be_planned():
    body, children, first = started_lora()
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    decision = reconcile(observed(body=edited, dependencies={("StyleBoard", "bd9"): None}, children=children), CFG, NOW)
    assert decision.status["phase"] == "Waiting" and decision.create == [] and decision.delete == []
    assert f"Job {first.status['jobName']}, started for an earlier spec, goes on" in decision.status["message"]
    # The board back, the edit planning the same run: the run is adopted, not started again.
    back = reconcile(
        observed(
            body=with_status(edited, decision), dependencies={("StyleBoard", "bd9"): ready_board()}, children=children
        ),
        CFG,
        NOW,
    )
    assert back.create == [] and back.delete == [] and back.status["runHash"] == first.status["runHash"]
    assert back.status["phase"] == "Running"
    # An edit that plans another run supersedes it, once it can be planned.
    edited["spec"]["training"] = {"rank": 64}
    other = reconcile(
        observed(
            body=with_status(edited, decision), dependencies={("StyleBoard", "bd9"): ready_board()}, children=children
        ),
        CFG,
        NOW,
    )
    assert {c["kind"] for c in other.delete} == {"ConfigMap", "Job"} and other.status["runHash"] != first.status[
        "runHash"
    ]


def tampered(children: list[dict], edit) -> list[dict]:
    """`children` with the RunSpec in the run's ConfigMap changed by `edit` (as a tenant may)."""
    children = copy.deepcopy(children)
    configmap = next(c for c in children if c["kind"] == "ConfigMap")
    runspec = json.loads(configmap["data"]["runspec.json"])
    edit(runspec)
    configmap["data"]["runspec.json"] = json.dumps(runspec)
    return children


def test_an_edited_runspec_configmap_is_no_record_of_the_run():
    body, children, _ = started_lora()

    def elsewhere(runspec: dict) -> None:
        runspec["work"]["dataset_uri"] = "/artifacts/team-b/styleboard/x/uid/abc/dataset"

    decision = reconcile(
        observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=tampered(children, elsewhere)),
        CFG,
        NOW,
    )
    # Not the operator's run any more: nothing goes on with it, nothing is made from it.
    assert decision.status["phase"] == "Waiting" and decision.create == []


def test_a_runspec_moved_to_another_namespace_and_relabelled_makes_nothing_there():
    """A tenant rewrites its run's RunSpec to be another namespace's object's run and relabels the Job to match:
    the Job's name (which no one can change) still names the run the operator made, so it is no record."""
    body, children, _ = started_lora()

    def victims(runspec: dict) -> None:
        runspec["owner"].update(namespace="team-z", name="victim")
        runspec["output_uri"] = runspec["output_uri"].replace(
            "/team-a/stylelora/bd9-lora/", "/team-z/stylelora/victim/"
        )
        runspec["work"]["dataset_uri"] = "/artifacts/team-z/styleboard/b/uid-z/0123456789/dataset"

    forged = tampered(children, victims)
    configmap = next(c for c in forged if c["kind"] == "ConfigMap")
    run_id = RunSpec.from_json(configmap["data"]["runspec.json"]).run_id()
    for child in forged:
        child["metadata"]["labels"]["kleinstyle.dev/run-hash"] = run_id
    decision = reconcile(observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=forged), CFG, NOW)
    assert decision.status["phase"] == "Waiting" and decision.create == []
    made = reconcile(
        observed(body=body, dependencies={("StyleBoard", "bd9"): ready_board()}, children=forged), CFG, NOW
    )
    assert all(c["metadata"]["namespace"] == "team-a" for c in made.create)


def test_a_failed_reconcile_keeps_a_finished_run_finished():
    body, children, first = started_lora()
    result = {"lora_step": 30, "steps": 30, "total_steps": 30, "checkpoints": []}
    body["status"]["progress"] = report(first, TrainReport, state="Succeeded", result=result)
    done_job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    deps = {("StyleBoard", "bd9"): ready_board()}
    done = reconcile(observed(body=body, dependencies=deps, children=[*children[:-1], done_job]), CFG, NOW)
    body = with_status(body, done)
    failed = with_status(body, failed_reconcile(body, "ApiError", "the Kubernetes API refused a request: 500", NOW))
    assert failed["status"]["phase"] == "Succeeded" and failed["status"]["runHash"] == first.status["runHash"]
    assert conditions(failed["status"])["ReconcileError"]["status"] == "True"
    # Its board gone meanwhile: still kept as it ended, and the error condition cleared.
    kept = reconcile(
        observed(body=failed, dependencies={("StyleBoard", "bd9"): None}, children=[*children[3:-1], done_job]),
        CFG,
        NOW,
    )
    assert kept.delete == [] and kept.status["phase"] == "Succeeded"
    assert conditions(kept.status)["ReconcileError"]["status"] == "False"


def test_a_run_started_before_jobs_were_annotated_goes_on_for_the_generation_status_names():
    body, children, first = started_lora()
    legacy = copy.deepcopy(children)
    del legacy[-1]["metadata"]["annotations"]
    decision = reconcile(observed(body=body, dependencies={("StyleBoard", "bd9"): None}, children=legacy), CFG, NOW)
    assert decision.status["phase"] == "Running" and decision.delete == []
    assert decision.status["runHash"] == first.status["runHash"]


def test_the_board_is_read_from_its_run_folder_not_its_status():
    board_ = ready_board()
    board_["status"]["datasetURI"] = "pvc://kleinstyle-artifacts/team-b/styleboard/x/uid/abc/dataset"
    decision = reconcile(observed(body=lora(), dependencies={("StyleBoard", "bd9"): board_}), CFG, NOW)
    configmap = next(c for c in decision.create if c["kind"] == "ConfigMap")
    work = json.loads(configmap["data"]["runspec.json"])["work"]
    assert work["dataset_uri"] == "/artifacts/team-a/styleboard/bd9/uid-board/abc/dataset"


def test_a_waiting_object_posts_one_event_not_one_per_reconcile():
    body = with_status(board(), reconcile(observed(body=board()), CFG, NOW))  # it had a run once (runHash set)
    waiting_lora = lora()
    waiting_lora["status"] = {**body["status"]}
    first = reconcile(observed(body=waiting_lora, dependencies={("StyleBoard", "bd9"): None}), CFG, NOW)
    assert [e.reason for e in first.events] == ["StyleBoardNotFound"]
    again = with_status(waiting_lora, first)
    assert "runHash" in again["status"]  # a merge patch leaves the earlier run id
    for _ in range(3):
        assert reconcile(observed(body=again, dependencies={("StyleBoard", "bd9"): None}), CFG, NOW).events == []


def test_an_edit_that_plans_the_same_run_keeps_it_recorded_for_the_new_generation():
    body, children, first = started_lora()
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2  # e.g. a GitOps tool writing a default out explicitly
    deps = {("StyleBoard", "bd9"): ready_board()}
    decision = reconcile(observed(body=edited, dependencies=deps, children=children), CFG, NOW)
    assert decision.create == [] and decision.delete == []
    assert decision.status["runHash"] == first.status["runHash"]
    [(job, marks)] = decision.annotate
    assert job["metadata"]["name"] == first.status["jobName"] and marks == {"kleinstyle.dev/generation": "2"}
    # Recorded so, the run goes on when its board goes.
    job = copy.deepcopy(job)
    job["metadata"]["annotations"].update(marks)
    children = [*children[:-1], job]
    later = reconcile(
        observed(body=with_status(edited, decision), dependencies={("StyleBoard", "bd9"): None}, children=children),
        CFG,
        NOW,
    )
    assert later.status["phase"] == "Running" and later.delete == [] and later.annotate == []


def test_a_full_volume_fails_with_reason_volume_full_and_deleting_the_job_retries_the_same_run():
    body, children, first = started_lora()
    failed_job = _job(first, failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    pod = {
        "metadata": {"name": f"{first.status['jobName']}-x1"},
        "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 3, "message": "volume is full"}}}]},
    }
    deps = {("StyleBoard", "bd9"): ready_board()}
    failed = reconcile(
        observed(body=body, dependencies=deps, children=[*children[:-1], failed_job], pods=[pod]), CFG, NOW
    )
    assert failed.status["phase"] == "Failed" and conditions(failed.status)["Ready"]["reason"] == "VolumeFull"
    assert "volume is full" in failed.status["message"]
    # Kept as it ended while its Job stays; its Job deleted by hand, the same run (same name, same hash) again.
    body = with_status(body, failed)
    kept = reconcile(observed(body=body, dependencies=deps, children=[*children[3:-1], failed_job]), CFG, NOW)
    assert kept.create == [] and kept.status["phase"] == "Failed"
    again = reconcile(observed(body=body, dependencies=deps, children=children[3:-1]), CFG, NOW)
    assert [c["metadata"]["name"] for c in again.create if c["kind"] == "Job"] == [first.status["jobName"]]
    assert again.status["phase"] == "Pending" and again.status["runHash"] == first.status["runHash"]


def test_an_unknown_node_pool_fails_a_cpu_step_too_and_a_config_without_its_default_pool_is_refused():
    from kleinstyle.operator.config import OperatorConfig
    from pydantic import ValidationError

    from .test_reconcile import FUSION_DEPS, fusion

    decision = reconcile(observed(body=fusion(scheduling={"nodePool": "a100"}), dependencies=FUSION_DEPS), CFG, NOW)
    assert decision.status["phase"] == "Failed" and "spec.scheduling.nodePool" in decision.status["message"]
    with pytest.raises(ValidationError, match="defaultNodePool 'a100' is not one of nodePools"):
        OperatorConfig(defaultNodePool="a100")
