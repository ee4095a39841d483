"""The pure reconcile: phases, children, spec changes, dependencies, events. Table-driven where it reads best."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from kleinstyle.contract.plan import plan_training
from kleinstyle.contract.reports import FuseReport, GenerateReport, PrepareReport, PrepareResult, TrainReport
from kleinstyle.operator.config import OperatorConfig, Resources
from kleinstyle.operator.kinds.stylelora import plan_summary
from kleinstyle.operator.naming import RUN_HASH
from kleinstyle.operator.reconcile import Observed, reconcile

from tests.support.profiles import PROFILE
from tests.support.records import records

NOW = "2026-11-26T12:00:00Z"
LATER = "2026-11-26T12:05:00Z"
CFG = OperatorConfig()


def board(generation: int = 1, **spec) -> dict:
    body = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleBoard",
        "metadata": {"name": "bd9", "namespace": "team-a", "uid": "uid-board", "generation": generation},
        "spec": {
            "triggerWord": "bd9style",
            "images": [{"source": "pvc://refs/bd9/01.png", "caption": "a sun"}, {"source": "https://x.test/2.png"}],
            "captioning": {"provider": "gemini", "apiKeySecret": {"name": "gemini", "key": "GEMINI_API_KEY"}},
        },
    }
    body["spec"].update(spec)
    return body


def lora(**spec) -> dict:
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleLoRA",
        "metadata": {"name": "bd9-lora", "namespace": "team-a", "uid": "uid-lora", "generation": 1},
        "spec": {"boardRef": {"name": "bd9"}, **spec},
    }


def ready_board() -> dict:
    body = board()
    body["status"] = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "runHash": "abc",
        "datasetURI": "pvc://kleinstyle-artifacts/team-a/styleboard/bd9/uid-board/abc/dataset",
        "imagesAccepted": 12,
    }
    return body


def step(body: dict, children=(), pods=(), deps=None, now: str = NOW):
    deps = deps or {}
    observed = Observed(
        body=body, dependencies=deps, children=list(children), pods=list(pods), dependency_jobs=records(deps)
    )
    return reconcile(observed, CFG, now)


def with_status(body: dict, decision) -> dict:
    body = copy.deepcopy(body)
    body["status"] = {**body.get("status", {}), **decision.status}
    return body


def report(decision, model, **fields) -> dict:
    """A `status.progress` for the run of `decision`, built with the contract's report model as the runtime does."""
    return model(runHash=decision.status["runHash"], **fields).model_dump(mode="json")


def accepted(*sources: str) -> list[dict]:
    return [
        {"source": s, "file": f"{i:03d}.png", "width": 512, "height": 512, "sha256": "0" * 64, "caption": "bd9style"}
        for i, s in enumerate(sources, start=1)
    ]


def job_of(decision) -> dict:
    return next(c for c in decision.create if c["kind"] == "Job")


def test_new_board_creates_its_run_and_waits_for_the_job():
    decision = step(board())
    assert [c["kind"] for c in decision.create] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    assert decision.status["phase"] == "Pending"
    assert decision.status["jobName"] == job_of(decision)["metadata"]["name"]
    assert decision.status["artifactURI"].startswith("pvc://kleinstyle-artifacts/team-a/styleboard/bd9/uid-board/")
    assert [e.reason for e in decision.events] == ["JobCreated"]


def test_child_names_are_deterministic_and_existing_children_are_adopted():
    first, second = step(board()), step(board())
    assert [c["metadata"]["name"] for c in first.create] == [c["metadata"]["name"] for c in second.create]
    again = step(with_status(board(), first), children=first.create)
    assert again.create == [] and again.delete == []
    assert again.events == []  # no transition, no event


def test_job_is_restricted_and_reads_its_runspec():
    job = job_of(step(board()))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kleinstyle", "prepare", "--spec", "/etc/kleinstyle/runspec.json"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    key_env = next(e for e in container["env"] if e["name"] == "GEMINI_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "gemini", "key": "GEMINI_API_KEY", "optional": True}
    assert not any("value" in e and "KEY" in e["name"] for e in container["env"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/kleinstyle", "/tmp", "/artifacts/team-a/styleboard/bd9/uid-board", "/references/refs"} <= mounts
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # prepare is CPU work
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-board"


def test_job_pods_have_cpu_limits_so_a_limits_quota_admits_them():
    """A namespace ResourceQuota on limits.cpu refuses a pod without a CPU limit: every Job sets one, the request
    unless the operator's configuration raises it."""
    container = job_of(step(board()))["spec"]["template"]["spec"]["containers"][0]
    quantities = {"cpu": "2", "memory": "4Gi"}
    assert container["resources"] == {"requests": quantities, "limits": quantities}
    bursting = CFG.model_copy(update={"cpu_resources": Resources(cpu="2", memory="4Gi", cpuLimit="6")})
    decision = reconcile(Observed(body=board()), bursting, NOW)
    container = job_of(decision)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "6", "memory": "4Gi"}


def test_runspec_maps_pvc_sources_to_their_mount():
    cm = next(c for c in step(board()).create if c["kind"] == "ConfigMap")
    images = json.loads(cm["data"]["runspec.json"])["work"]["images"]
    assert images[0] == {"source": "/references/refs/bd9/01.png", "caption": "a sun", "label": "pvc://refs/bd9/01.png"}
    assert images[1] == {"source": "https://x.test/2.png", "caption": None, "label": None}


def _job(decision, **status) -> dict:
    job = copy.deepcopy(job_of(decision))
    job["status"] = status
    return job


@pytest.mark.parametrize(
    ("job_status", "spec_extra", "phase", "reason"),
    [
        ({}, {}, "Pending", "JobCreated"),
        ({"active": 1, "startTime": NOW}, {}, "Running", "JobRunning"),
        ({"failed": 1}, {}, "Running", "JobRetrying"),
        (
            {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
            {},
            "Failed",
            "BackoffLimitExceeded",
        ),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, {}, "Running", "AwaitingResult"),
        ({}, {"suspend": True}, "Pending", "Queued"),
    ],
)
def test_phase_follows_the_job(job_status, spec_extra, phase, reason):
    first = step(board())
    job = _job(first, **job_status)
    job["spec"].update(spec_extra)
    children = [*[c for c in first.create if c["kind"] != "Job"], job]
    decision = step(with_status(board(), first), children=children)
    assert decision.status["phase"] == phase
    ready = next(c for c in decision.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == reason


def kstatus(status: dict) -> tuple[str, str, str]:
    """(Ready, Reconciling, Stalled) statuses, each checked to carry the observed generation."""
    conds = {c["type"]: c for c in status["conditions"]}
    assert all(
        conds[t]["observedGeneration"] == status["observedGeneration"] for t in ("Ready", "Reconciling", "Stalled")
    )
    return conds["Ready"]["status"], conds["Reconciling"]["status"], conds["Stalled"]["status"]


@pytest.mark.parametrize(
    ("job_status", "suspend", "expected"),
    [
        ({}, False, ("False", "True", "False")),  # Pending
        ({}, True, ("False", "True", "False")),  # Queued by Kueue
        ({"active": 1}, False, ("False", "True", "False")),  # Running
        (
            {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]},
            False,
            ("False", "False", "True"),
        ),
    ],
)
def test_conditions_flux_argo_and_kubectl_wait_read_on_every_phase(job_status, suspend, expected):
    first = step(board())
    job = _job(first, **job_status)
    job["spec"]["suspend"] = suspend
    status = step(with_status(board(), first), children=[*first.create[:-1], job]).status
    assert kstatus(status) == expected


def test_kstatus_conditions_when_waiting_succeeded_or_stalled():
    missing = step(lora()).status  # its board does not exist (yet: GitOps may be creating it)
    assert missing["phase"] == "Waiting" and kstatus(missing) == ("False", "True", "False")
    failed_board = {**board(), "status": {"phase": "Failed", "observedGeneration": 1, "message": "no images"}}
    stalled = step(lora(), deps={("StyleBoard", "bd9"): failed_board}).status
    assert kstatus(stalled) == ("False", "False", "True")  # it cannot progress until the board is fixed
    first = step(board())
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    body = with_status(board(), first)
    result = PrepareResult(succeeded=True, message="ok", accepted=accepted("a"))
    body["status"]["progress"] = report(first, PrepareReport, state="Succeeded", result=result)
    assert kstatus(step(body, children=[*first.create[:-1], job]).status) == ("True", "False", "False")
    planted = copy.deepcopy(next(c for c in first.create if c["kind"] == "ConfigMap"))
    planted["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    conflict = step(with_status(board(), first), children=[planted]).status
    assert conflict["phase"] == "Pending" and kstatus(conflict) == ("False", "False", "True")


def test_failed_job_names_the_pods_reason():
    first = step(board())
    job = _job(first, failed=3, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    pod = {
        "metadata": {"name": "bd9-prepare-x-abcde", "labels": {"job-name": job["metadata"]["name"]}},
        "status": {
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "fetching\nno image was accepted",
                            "finishedAt": NOW,
                        }
                    }
                }
            ]
        },
    }
    decision = step(with_status(board(), first), children=[*first.create[:-1], job], pods=[pod])
    assert decision.status["phase"] == "Failed"
    assert "pod bd9-prepare-x-abcde: Error (exit code 1): no image was accepted" in decision.status["message"]
    assert [e.type for e in decision.events] == ["Warning"]


def test_success_copies_the_result_of_this_run_only():
    first = step(board())
    run_hash = first.status["runHash"]
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    result = PrepareResult(
        succeeded=True,
        message="prepared 2 images",
        accepted=accepted("a", "b"),
        rejected=[{"source": "pvc://refs/bd9/c.png", "reason": "short side 256 px is below 512 px"}],
        duplicates=[{"kind": "near", "source": "b", "resembles": "a", "resembles_file": "000.png", "distance": 3}],
        warnings=["captions fell back to the trigger word for 1 image"],
        dataset_display_uri="pvc://kleinstyle-artifacts/x/dataset",
    )
    body = with_status(board(), first)
    body["status"]["progress"] = {**report(first, PrepareReport, state="Succeeded", result=result), "runHash": "other"}
    assert step(body, children=[*first.create[:-1], job]).status["phase"] == "Running"
    body["status"]["progress"] = report(first, PrepareReport, state="Succeeded", result=result)
    assert run_hash == body["status"]["progress"]["runHash"]
    decision = step(body, children=[*first.create[:-1], job])
    assert decision.status["phase"] == "Succeeded"
    assert decision.status["imagesAccepted"] == 2 and decision.status["imagesRejected"] == 1
    assert decision.status["rejected"] == [
        {"source": "pvc://refs/bd9/c.png", "reason": "short side 256 px is below 512 px"}
    ]
    assert decision.status["duplicates"] == [{"source": "b", "similarTo": "a", "distance": 3}]
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    assert warning["status"] == "True" and "trigger word" in warning["message"]


def test_spec_change_starts_a_new_run_and_deletes_the_old_one():
    first = step(board())
    body = with_status(board(generation=2, triggerWord="newstyle"), first)
    decision = step(body, children=first.create)
    created = {(c["kind"], c["metadata"]["name"]) for c in decision.create}
    deleted = {(c["kind"], c["metadata"]["name"]) for c in decision.delete}
    assert {k for k, _ in created} == {"ConfigMap", "Job"}  # RBAC is per owner and stays
    assert {k for k, _ in deleted} == {"ConfigMap", "Job"}
    assert created.isdisjoint(deleted)
    assert all(c["metadata"]["labels"][RUN_HASH] == decision.status["runHash"] for c in decision.create)
    assert decision.status["observedGeneration"] == 2
    assert "Superseded" in [e.reason for e in decision.events]


@pytest.mark.parametrize(
    ("dep", "reason"),
    [
        (None, "StyleBoardNotFound"),
        ({**board(), "status": {"phase": "Running", "observedGeneration": 1}}, "StyleBoardNotReady"),
        (
            {**board(), "status": {"phase": "Failed", "message": "no image", "observedGeneration": 1}},
            "StyleBoardFailed",
        ),
        ({**ready_board(), "metadata": {**board()["metadata"], "generation": 2}}, "StyleBoardNotReady"),
    ],
)
def test_lora_waits_for_its_board(dep, reason):
    decision = step(lora(), deps={("StyleBoard", "bd9"): dep})
    assert decision.status["phase"] == "Waiting"
    assert decision.create == []
    cond = next(c for c in decision.status["conditions"] if c["type"] == "DependenciesReady")
    assert (cond["status"], cond["reason"]) == ("False", reason)
    assert "bd9" in cond["message"]


def test_lora_with_a_ready_board_creates_its_train_job():
    decision = step(lora(), deps={("StyleBoard", "bd9"): ready_board()})
    assert [c["kind"] for c in decision.create] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Job"]
    cm = next(c for c in decision.create if c["kind"] == "ConfigMap")
    runspec = cm["data"]["runspec.json"]
    assert '"/artifacts/team-a/styleboard/bd9/uid-board/abc/dataset"' in runspec
    assert '"image_count": 12' in runspec
    assert decision.status["phase"] == "Pending"
    assert job_of(decision)["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["kleinstyle", "train"]
    # The plan is visible before any training: 12 references -> GEM+A, rank 32, max(500, 30 x 12) steps.
    plan = decision.status["plan"]
    assert (plan["variant"], plan["rank"], plan["steps"], plan["fromSpec"]) == ("GEM+A", 32, 500, [])
    assert decision.status["totalSteps"] == 500
    # The operator's default backend is ai-toolkit: its config travels beside the RunSpec.
    config = yaml.safe_load(cm["data"]["aitoolkit.yaml"])
    process = config["config"]["process"][0]
    assert process["network"]["linear"] == 32 and process["train"]["steps"] == 500
    assert process["datasets"][0]["folder_path"] == "/artifacts/team-a/styleboard/bd9/uid-board/abc/dataset"
    assert process["model"]["name_or_path"] == "/models/FLUX.2-klein-base-9B"


def _running_lora(**fields) -> tuple[dict, object, dict]:
    """A StyleLoRA whose Job runs (or ran) and whose status carries a train report of `fields` for the current run."""
    deps = {("StyleBoard", "bd9"): ready_board()}
    first = step(lora(), deps=deps)
    body = with_status(lora(), first)
    body["status"]["progress"] = report(first, TrainReport, **fields)
    return body, first, deps


def test_a_running_lora_shows_its_progress():
    checkpoints = [{"step": 50, "uri": "pvc://x/work/checkpoints/step_000050", "loss": 0.4}]
    live = {"step": 120, "totalSteps": 500, "loss": 0.31, "etaSeconds": 3725, "checkpoints": checkpoints}
    body, first, deps = _running_lora(state="Running", progress=live)
    job = _job(first, active=1)
    decision = step(body, children=[*first.create[:-1], job], deps=deps)
    status = decision.status
    assert status["phase"] == "Running"
    assert (status["step"], status["totalSteps"], status["progressText"]) == (120, 500, "120/500 (24%)")
    assert (status["loss"], status["eta"]) == (0.31, "1h02m")
    assert status["checkpoints"] == [{"step": 50, "uri": "pvc://x/work/checkpoints/step_000050", "loss": 0.4}]
    assert status.get("loraURI") is None

    # Progress of another run (an older spec) is never shown as this run's.
    body["status"]["progress"]["runHash"] = "0000000000"
    assert step(body, children=[*first.create[:-1], job], deps=deps).status.get("progressText") is None


def test_a_finished_lora_points_at_its_run_and_says_why_it_stopped():
    result = {
        "lora_file": "pvc://somewhere/else/lora.safetensors",  # never trusted
        "lora_step": 200,
        "steps": 200,
        "total_steps": 500,
        "final_loss": 0.25,
        "checkpoints": [{"step": 100, "uri": "pvc://x/a", "loss": 0.3}, {"step": 200, "uri": "pvc://x/b"}],
        "stopped_early": True,
        "stop_reason": "stop requested",
    }
    body, first, deps = _running_lora(state="Succeeded", result=result, progress={"step": 230})
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    status = step(body, children=[*first.create[:-1], job], deps=deps).status
    assert status["phase"] == "Succeeded"
    assert status["loraURI"] == f"{first.status['artifactURI']}/lora.safetensors"
    assert (status["step"], status["progressText"], status["loss"]) == (200, "200/500 (40%)", 0.25)
    assert status["stopReason"] == "stop requested" and status["eta"] is None
    assert [c["step"] for c in status["checkpoints"]] == [100, 200] and status["checkpoints"][1]["loss"] is None


def test_training_limits_cap_the_plan():
    from kleinstyle.operator.config import TrainingLimits

    capped = CFG.model_copy(update={"training_limits": TrainingLimits(maxSteps=30, maxResolution=128)})
    body = lora(training={"steps": 2000, "resolution": 1024})
    deps = {("StyleBoard", "bd9"): ready_board()}
    decision = reconcile(Observed(body=body, dependencies=deps, dependency_jobs=records(deps)), capped, NOW)
    plan = decision.status["plan"]
    assert (plan["steps"], plan["resolution"], decision.status["totalSteps"]) == (30, 128, 30)
    assert "capped at 30 by the operator's trainingLimits" in plan["stepsReason"]
    assert plan["checkpointEvery"] == 10
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    assert "capped" in warning["message"]


def test_lora_plan_warnings_become_a_condition():
    small = ready_board()
    small["status"]["imagesAccepted"] = 2
    decision = step(lora(), deps={("StyleBoard", "bd9"): small})
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    assert warning["status"] == "True" and "nothing works reliably" in warning["message"]
    assert decision.status["plan"]["textPipeline"] is False


def test_conditions_keep_their_transition_time_while_unchanged():
    first = step(board(), now=NOW)
    again = step(with_status(board(), first), children=first.create, now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in again.status["conditions"]}
    assert times["DependenciesReady"] == NOW


def test_gpu_job_gets_the_pool_and_kueue_labels():
    from kleinstyle.operator.children import build_job
    from kleinstyle.operator.kinds import KIND_RUNS

    body = lora(scheduling={"queueName": "team-a", "priorityClassName": "low", "gpus": 2})
    kind_run = KIND_RUNS["StyleLoRA"]
    spec = kind_run.kind.spec.model_validate(body["spec"])
    run = kind_run.build(body, spec, {("StyleBoard", "bd9"): ready_board()}, CFG)
    job = build_job(run, CFG)
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "low"
    assert job["spec"]["suspend"] is True
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "priorityClassName" not in pod  # Kueue's priority class applies instead


def test_a_planted_configmap_is_never_adopted():
    first = step(board())
    planted = copy.deepcopy(next(c for c in first.create if c["kind"] == "ConfigMap"))
    planted["data"]["runspec.json"] = planted["data"]["runspec.json"].replace('"allowed_cidrs": []', '"x": 1')
    children = [*[c for c in first.create if c["kind"] not in ("ConfigMap", "Job")], planted]
    decision = step(with_status(board(), first), children=children)
    assert decision.create == []  # above all, no Job on top of a RunSpec the operator did not write
    assert decision.status["phase"] == "Pending"
    cond = next(c for c in decision.status["conditions"] if c["type"] == "JobCreated")
    assert cond["reason"] == "ChildConflict" and "did not write" in cond["message"]

    stranger = copy.deepcopy(next(c for c in first.create if c["kind"] == "ConfigMap"))
    stranger["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    decision = step(with_status(board(), first), children=[*children[:-1], stranger])
    assert decision.create == [] and "not controlled by this object" in decision.status["message"]


def test_a_failed_run_still_lists_its_rejected_images():
    first = step(board())
    job = _job(first, failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    body = with_status(board(), first)
    rejected = [{"source": "pvc://refs/bd9/01.png", "reason": "too small"}]
    result = PrepareResult(succeeded=False, message="no usable images", rejected=rejected)
    body["status"]["progress"] = report(first, PrepareReport, state="Failed", result=result)
    decision = step(body, children=[*first.create[:-1], job])
    assert decision.status["phase"] == "Failed"
    assert decision.status["rejected"] == rejected and decision.status["datasetURI"] is None


def test_a_new_run_clears_the_previous_runs_results():
    body = with_status(board(generation=2, triggerWord="other"), step(board()))
    body["status"].update(imagesAccepted=8, datasetURI="pvc://old/dataset", rejected=[{"source": "a", "reason": "b"}])
    decision = step(body)
    assert decision.status["imagesAccepted"] is None and decision.status["datasetURI"] is None
    assert decision.status["rejected"] == []


def test_the_dataset_location_comes_from_the_runspec_not_the_pod():
    first = step(board())
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    body = with_status(board(), first)
    result = PrepareResult(
        succeeded=True, message="ok", accepted=accepted("a"), dataset_display_uri="pvc://another-tenant/dataset"
    )
    body["status"]["progress"] = report(first, PrepareReport, state="Succeeded", result=result)
    decision = step(body, children=[*first.create[:-1], job])
    assert decision.status["datasetURI"] == first.status["artifactURI"] + "/dataset"


def test_a_new_training_run_clears_an_earlier_stop_request():
    body = lora()
    body["status"] = {"runHash": "an-earlier-run", "stopRequest": "enough", "loraURI": "pvc://old/lora.safetensors"}
    decision = step(body, deps={("StyleBoard", "bd9"): ready_board()})
    assert decision.status["stopRequest"] is None and decision.status["loraURI"] is None
    assert decision.status["runHash"] != "an-earlier-run"


def test_result_fields_written_by_a_pod_do_not_stand():
    first = step(board())
    job = _job(first, active=1, startTime=NOW)
    body = with_status(board(), first)
    body["status"]["datasetURI"] = "pvc://another-tenant/dataset"  # patched in by the run's ServiceAccount
    decision = step(body, children=[*first.create[:-1], job])
    assert decision.status["phase"] == "Running" and decision.status["datasetURI"] is None


def test_a_stop_request_written_into_status_does_not_stand():
    """Status is output: a stop is asked by the kleinstyle.dev/stop annotation, and a stopRequest patched into status
    (by the run's ServiceAccount or a tenant) is rewritten from what the operator read."""
    checkpoints = [{"step": 50, "uri": "pvc://x/work/checkpoints/step_000050", "loss": 0.4}]
    body, first, deps = _running_lora(state="Running", progress={"step": 60, "checkpoints": checkpoints})
    body["status"]["stopRequest"] = "enough"
    decision = step(body, children=[*first.create[:-1], _job(first, active=1)], deps=deps)
    assert decision.status["stopRequest"] is None


def test_a_finished_run_takes_away_its_service_accounts_rights():
    first = step(board())
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    body = with_status(board(), first)
    result = PrepareResult(succeeded=True, message="ok", accepted=accepted("a"))
    body["status"]["progress"] = report(first, PrepareReport, state="Succeeded", result=result)
    decision = step(body, children=[*first.create[:-1], job])
    assert decision.status["phase"] == "Succeeded"
    assert sorted(c["kind"] for c in decision.delete) == ["Role", "RoleBinding", "ServiceAccount"]
    assert decision.create == []


# --- GenerationJob -------------------------------------------------------------------------------------------------


def generation(**spec) -> dict:
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "GenerationJob",
        "metadata": {"name": "samples", "namespace": "team-a", "uid": "uid-gen", "generation": 1},
        "spec": {"loras": [{"name": "bd9-lora"}], "prompts": ["a fox", "a red house"], **spec},
    }


def planned(keeps_text: bool) -> dict:
    """`status.plan` of a LoRA trained on 3 references, its text pipeline as given."""
    summary = plan_summary(plan_training(3, {"boardRef": {"name": "bd9"}}, {}))
    return summary.model_copy(update={"text_pipeline": keeps_text}).model_dump(mode="json")


def trained_lora(name: str = "bd9-lora", trigger: str = "bd9style", keeps_text: bool = True, **status) -> dict:
    body = lora()
    body["metadata"].update(name=name, uid="uid")
    body["status"] = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "runHash": "abc",
        "loraURI": f"pvc://kleinstyle-artifacts/team-a/stylelora/{name}/uid/abc/lora.safetensors",
        "triggerWord": trigger,
        "plan": planned(keeps_text),
        **status,
    }
    return body


def generate_work(decision) -> dict:
    cm = next(c for c in decision.create if c["kind"] == "ConfigMap")
    return json.loads(cm["data"]["runspec.json"])["work"]


def test_a_generation_job_renders_with_its_loras_trigger_words_and_weights():
    deps = {
        ("StyleLoRA", "bd9-lora"): trained_lora(),
        ("StyleLoRA", "ink"): trained_lora("ink", "inkstyle"),
    }
    body = generation(loras=[{"name": "bd9-lora", "weight": 0.8}, {"name": "ink", "weight": 0.5}], count=2, seed=7)
    decision = step(body, deps=deps)
    work = generate_work(decision)
    assert [(x["uri"], x["weight"], x["label"]) for x in work["loras"]] == [
        ("/artifacts/team-a/stylelora/bd9-lora/uid/abc/lora.safetensors", 0.8, "StyleLoRA/bd9-lora"),
        ("/artifacts/team-a/stylelora/ink/uid/abc/lora.safetensors", 0.5, "StyleLoRA/ink"),
    ]
    assert work["trigger_words"] == ["bd9style", "inkstyle"] and work["seeds"] == [7, 8]
    assert (work["width"], work["height"], work["steps"], work["guidance"]) == (2048, 2048, 50, 4.0)
    assert work["model_path"] == "/models/FLUX.2-klein-base-9B"
    job = job_of(decision)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["kleinstyle", "generate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert decision.status["imagesTotal"] == 4 and decision.status["phase"] == "Pending"


@pytest.mark.parametrize(
    ("setting", "keeps_text", "mode", "shown", "reason"),
    [
        ("auto", True, "reformulate", "on", "every LoRA's training plan keeps the text pipeline"),
        ("auto", False, "raw", "off", "the training plan of StyleLoRA bd9-lora turns the text pipeline off (3 refer"),
        ("off", True, "raw", "off", "off in the spec"),
        ("on", False, "reformulate", "on", "on in the spec"),
    ],
)
def test_the_text_pipeline_follows_the_loras_training_plans(setting, keeps_text, mode, shown, reason):
    deps = {("StyleLoRA", "bd9-lora"): trained_lora(keeps_text=keeps_text)}
    decision = step(generation(textPipeline=setting), deps=deps)
    work = generate_work(decision)
    assert work["prompt_mode"] == mode and reason in work["prompt_mode_reason"]
    render = decision.status["render"]
    assert render["textPipeline"] == shown and reason in render["textPipelineReason"]
    assert render["triggerWords"] == ["bd9style"]
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    overruled = setting == "on" and not keeps_text
    assert (warning["status"] == "True") == overruled
    if overruled:
        assert "textPipeline is on although the training plan of StyleLoRA bd9-lora turns it off" in warning["message"]


def test_the_api_key_reaches_the_pod_only_when_prompts_are_reformulated():
    key = {"reformulation": {"apiKeySecret": {"name": "gemini", "key": "GEMINI_API_KEY"}}}
    for keeps_text, expected in [(True, ["GEMINI_API_KEY"]), (False, [])]:
        deps = {("StyleLoRA", "bd9-lora"): trained_lora(keeps_text=keeps_text)}
        env = job_of(step(generation(**key), deps=deps))["spec"]["template"]["spec"]["containers"][0]["env"]
        secret = [e for e in env if "secretKeyRef" in e.get("valueFrom", {})]
        assert [e["name"] for e in secret] == expected
        if secret:
            ref = secret[0]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "gemini", "key": "GEMINI_API_KEY", "optional": True}


def test_generation_limits_cap_size_and_steps_and_say_so():
    from kleinstyle.operator.config import GenerationLimits

    capped = CFG.model_copy(update={"generation_limits": GenerationLimits(maxSide=128, maxSteps=8)})
    body = generation(width=2048, height=1024, steps=50)
    deps = {("StyleLoRA", "bd9-lora"): trained_lora()}
    decision = reconcile(Observed(body=body, dependencies=deps, dependency_jobs=records(deps)), capped, NOW)
    render = decision.status["render"]
    assert (render["width"], render["height"], render["steps"]) == (128, 64, 8)
    warning = next(c for c in decision.status["conditions"] if c["type"] == "Warning")
    assert "size capped at 128x64 (asked 2048x1024)" in warning["message"]
    assert "steps capped at 8 (asked 50)" in warning["message"]
    assert step(body, deps=deps).status["render"]["width"] == 2048  # no limits: as asked


def test_a_generation_job_waits_for_its_loras():
    running = trained_lora()
    running["status"]["phase"] = "Running"
    decision = step(generation(), deps={("StyleLoRA", "bd9-lora"): running})
    assert (decision.status["phase"], decision.create) == ("Waiting", [])
    assert "waiting for StyleLoRA bd9-lora (now Running)" in decision.status["message"]


def test_a_running_generation_shows_images_done():
    deps = {("StyleLoRA", "bd9-lora"): trained_lora()}
    first = step(generation(), deps=deps)
    body = with_status(generation(), first)
    progress = {"imagesDone": 1, "imagesTotal": 2}
    body["status"]["progress"] = report(first, GenerateReport, state="Running", progress=progress)
    status = step(body, children=[*first.create[:-1], _job(first, active=1)], deps=deps).status
    assert (status["phase"], status["imagesDone"], status["progressText"]) == ("Running", 1, "1/2 images")
    assert status["images"] == [] and status["contactSheetURI"] is None


def test_finished_generation_lists_each_image_from_the_runspec_with_the_prompt_used():
    deps = {("StyleLoRA", "bd9-lora"): trained_lora()}
    first = step(generation(count=2, seed=3), deps=deps)
    result = {
        "images": [{"index": i, "seconds": 1.5 * i, "reused": False} for i in (1, 2, 3)] + [{"index": 4}],
        "prompts_used": ["bd9style. a fox, in dusk light"],  # a short list: the rest are shown as written
        "reformulated": [True],
        "warnings": ["prompt 2: reformulation failed (quota); the raw prompt was used"],
        "files": ["pvc://elsewhere/evil.png"],  # never read: locations come from the RunSpec
    }
    body = with_status(generation(count=2, seed=3), first)
    body["status"]["progress"] = report(first, GenerateReport, state="Succeeded", result=result)
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    status = step(body, children=[*first.create[:-1], job], deps=deps).status
    base = first.status["artifactURI"]
    assert status["phase"] == "Succeeded"
    assert status["images"] == [
        {"uri": f"{base}/images/001_p01_seed3.png", "promptIndex": 1, "seed": 3, "seconds": 1.5},
        {"uri": f"{base}/images/002_p01_seed4.png", "promptIndex": 1, "seed": 4, "seconds": 3.0},
        {"uri": f"{base}/images/003_p02_seed3.png", "promptIndex": 2, "seed": 3, "seconds": 4.5},
        {"uri": f"{base}/images/004_p02_seed4.png", "promptIndex": 2, "seed": 4, "seconds": None},
    ]
    assert status["prompts"] == [
        {"index": 1, "promptUsed": "bd9style. a fox, in dusk light", "reformulated": True},
        {"index": 2, "promptUsed": "a red house", "reformulated": False},
    ]
    assert status["contactSheetURI"] == f"{base}/contact_sheet.png"
    assert (status["imagesDone"], status["imagesTotal"], status["progressText"]) == (4, 4, "4/4 images")
    warning = next(c for c in status["conditions"] if c["type"] == "Warning")
    assert "reformulation failed" in warning["message"]


def test_a_trained_lora_shows_its_trigger_word():
    decision = step(lora(), deps={("StyleBoard", "bd9"): ready_board()})
    assert decision.status["triggerWord"] == "bd9style"


def test_the_boards_style_profile_travels_with_the_lora_to_the_generation():
    """L1 lands in the board's status; the StyleLoRA carries it (RunSpec and status), a GenerationJob that
    reformulates takes it from there, and one that does not leaves it out of its RunSpec."""
    profile = PROFILE
    board_body = ready_board()
    board_body["status"]["styleProfile"] = profile
    trained = step(lora(), deps={("StyleBoard", "bd9"): board_body})
    assert trained.status["styleProfile"] == profile
    cm = next(c for c in trained.create if c["kind"] == "ConfigMap")
    assert json.loads(cm["data"]["runspec.json"])["work"]["style_profile"] == profile

    deps = {("StyleLoRA", "bd9-lora"): trained_lora(styleProfile=profile)}
    assert generate_work(step(generation(), deps=deps))["style_profile"] == profile
    assert generate_work(step(generation(textPipeline="off"), deps=deps))["style_profile"] is None


# ---- LoRAFusion ---------------------------------------------------------------------------------------------------


def fusion(**spec) -> dict:
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "LoRAFusion",
        "metadata": {"name": "mix", "namespace": "team-a", "uid": "uid-mix", "generation": 1},
        "spec": {"sources": [{"name": "ink"}, {"name": "oil", "weight": 0.5}], "method": "klora", **spec},
    }


def trained(name: str) -> dict:
    return {
        "kind": "StyleLoRA",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid", "generation": 1},
        "status": {
            "phase": "Succeeded",
            "observedGeneration": 1,
            "runHash": "abc",
            "loraURI": f"pvc://kleinstyle-artifacts/team-a/stylelora/{name}/uid/abc/lora.safetensors",
        },
    }


FUSION_DEPS = {("StyleLoRA", "ink"): trained("ink"), ("StyleLoRA", "oil"): trained("oil")}


def test_a_fusion_with_its_sources_ready_runs_fuse_on_a_cpu():
    decision = step(fusion(selection="soft", energy=0.9), deps=FUSION_DEPS)
    job = job_of(decision)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["kleinstyle", "fuse"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    work = json.loads(next(c for c in decision.create if c["kind"] == "ConfigMap")["data"]["runspec.json"])["work"]
    assert [(s["uri"], s["weight"]) for s in work["sources"]] == [
        ("/artifacts/team-a/stylelora/ink/uid/abc/lora.safetensors", 1.0),
        ("/artifacts/team-a/stylelora/oil/uid/abc/lora.safetensors", 0.5),
    ]
    assert (work["method"], work["energy"], work["rank"], work["selection"]) == ("klora", 0.9, None, "soft")


def test_a_finished_fusion_shows_its_lora_rank_energy_and_duration():
    first = step(fusion(rank=16), deps=FUSION_DEPS)
    body = with_status(fusion(rank=16), first)
    result = {
        "lora_file": "pvc://elsewhere/lora.safetensors",  # never trusted
        "method": "klora",
        "selection": "hard",
        "layers": 28,
        "rank": 16,
        "energy_kept": 0.93,
        "duration_seconds": 1.25,
        "warnings": ["4 of 28 layers are updated by only some inputs"],
    }
    body["status"]["progress"] = report(first, FuseReport, state="Succeeded", result=result)
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    status = step(body, children=[*first.create[:-1], job], deps=FUSION_DEPS).status
    assert status["phase"] == "Succeeded"
    assert status["loraURI"] == f"{status['artifactURI']}/lora.safetensors"
    assert (status["rank"], status["energyKept"], status["durationSeconds"]) == (16, 0.93, 1.25)
    warning = next(c for c in status["conditions"] if c["type"] == "Warning")
    assert warning["status"] == "True" and "only some inputs" in warning["message"]
    # A new spec starts a new run: the old run's numbers go.
    changed = with_status(fusion(rank=8), first)
    changed["status"].update(status)
    changed["metadata"]["generation"] = 2  # the API server bumps it with the spec
    fresh = step(changed, deps=FUSION_DEPS).status
    assert (fresh["loraURI"], fresh["rank"], fresh["energyKept"], fresh["durationSeconds"]) == (None,) * 4


def test_a_fusion_tells_generation_its_sources_trigger_words_policy_and_profile():
    profile = {"PROMPT_SUFFIX_MUST": "ink wash"}
    deps = {
        ("StyleLoRA", "bd9-lora"): trained_lora(styleProfile=profile),
        ("StyleLoRA", "ink"): trained_lora("ink", "inkstyle", keeps_text=False),
        ("StyleLoRA", "unused"): trained_lora("unused", "nostyle", keeps_text=False),
    }
    fusion = {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "LoRAFusion",
        "metadata": {"name": "mix", "namespace": "team-a", "uid": "uid-mix", "generation": 1},
        "spec": {
            "sources": [
                {"name": "bd9-lora", "weight": 0.7},
                {"name": "ink", "weight": 0.3},
                {"name": "unused", "weight": 0},
            ],
            "method": "svd",
        },
    }
    status = step(fusion, deps=deps).status
    assert status["triggerWords"] == ["bd9style", "inkstyle"]  # a source at weight 0 is not in the fusion
    assert status["textPipeline"] is False and status["styleProfile"] == profile

    fused = {**fusion, "status": {**status, "phase": "Succeeded", "observedGeneration": 1, "loraURI": "pvc://a/b/c"}}
    work = generate_work(
        step(generation(loras=[{"kind": "LoRAFusion", "name": "mix"}]), deps={("LoRAFusion", "mix"): fused})
    )
    assert work["trigger_words"] == ["bd9style", "inkstyle"] and work["prompt_mode"] == "raw"


def test_job_threads_follow_the_pods_cpu_request():
    env = job_of(step(board()))["spec"]["template"]["spec"]["containers"][0]["env"]
    omp = next(e for e in env if e["name"] == "OMP_NUM_THREADS")
    assert omp["valueFrom"]["resourceFieldRef"] == {
        "resource": "requests.cpu",
        "divisor": "1",
        "containerName": "prepare",
    }


def test_a_lora_the_base_model_beat_publishes_nothing_and_its_users_say_why():
    baseline = {"step": 0, "style": [0.9, 0.9], "adherence": [1.0, 1.0], "leakage": [0.2, 0.2]}
    worse = {"step": 100, "style": [0.5, 0.5], "adherence": [1.0, 1.0], "leakage": [0.2, 0.2]}
    evaluation = {"baseline": baseline, "checkpoints": [worse]}
    result = {
        "steps": 100,
        "lora_step": 0,
        "total_steps": 100,
        "checkpoints": [{"step": 100, "uri": "pvc://x/step_000100"}],
        "best_checkpoint": 0,
        "evaluation": evaluation,
        "warnings": ["every checkpoint scored below the base model (best J 0.5000, base 0.9000): no LoRA"],
    }
    body, first, deps = _running_lora(state="Succeeded", result=result)
    job = _job(first, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    status = step(body, children=[*first.create[:-1], job], deps=deps).status
    assert status["phase"] == "Succeeded" and status["loraURI"] is None and status["loraStep"] == 0
    assert (status["bestCheckpoint"], status["baseScore"]) == (0, 0.9)
    assert status["checkpointGalleryURI"] == f"{first.status['artifactURI']}/checkpoint_gallery.png"
    # A GenerationJob on it waits, and says why instead of "waiting".
    trained = lora()
    trained["status"] = status
    waiting = step(generation(), deps={("StyleLoRA", "bd9-lora"): trained}).status
    assert waiting["phase"] == "Waiting" and waiting["conditions"][0]["reason"] == "StyleLoRAWithoutLoraURI"
    said = waiting["message"]  # the LoRA's warnings, this one among them
    assert "succeeded without a loraURI: " in said and "every checkpoint scored below the base model" in said
