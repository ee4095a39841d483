"""Kueue's view in status, from Workloads shaped as Kueue writes them: why a run waits, where it was admitted, how
often it was evicted, and the default LocalQueue."""

from __future__ import annotations

import copy

from kleinstyle.operator.config import OperatorConfig
from kleinstyle.operator.reconcile import reconcile

from tests.support.records import observed

from .test_reconcile import CFG, NOW, board, job_of, lora, ready_board, with_status

DEPS = {("StyleBoard", "bd9"): ready_board()}
NO_QUOTA = (
    "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor h200, "
    "1 more needed"
)


def cond(type_: str, status: str, reason: str, message: str = "", at: str = "2026-12-06T10:00:00Z") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


def workload(job: dict, *conditions: dict, admission: dict | None = None) -> dict:
    status: dict = {"conditions": list(conditions)}
    if admission:
        status["admission"] = admission
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": f"job-{job['metadata']['name']}-1a2b3", "labels": {"kueue.x-k8s.io/job-uid": "job-uid"}},
        "spec": {"queueName": "team-a-gpu"},
        "status": status,
    }


ADMISSION = {
    "clusterQueue": "h200-cq",
    "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": "h200", "cpu": "default"}, "count": 1}],
}


def queued_lora(cfg: OperatorConfig = CFG):
    body = lora(scheduling={"queueName": "team-a-gpu"})
    first = reconcile(observed(body=body, dependencies=DEPS), cfg, NOW)
    job = copy.deepcopy(job_of(first))
    job["metadata"]["uid"] = "job-uid"
    return with_status(body, first), job


def observe(body: dict, job: dict, wl: dict | None, **job_status) -> dict:
    job = copy.deepcopy(job)
    job["status"] = job_status
    children = [job]
    workloads = {"job-uid": wl} if wl else {}
    decision = reconcile(observed(body=body, dependencies=DEPS, children=children, workloads=workloads), CFG, NOW)
    return decision.status


def after(body: dict, status: dict) -> dict:
    """`body` once `status` is written."""
    body = copy.deepcopy(body)
    body["status"] = {**body.get("status", {}), **status}
    return body


def ready(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_a_queued_run_says_what_kueue_says_it_waits_for():
    body, job = queued_lora()
    status = observe(body, job, workload(job, cond("QuotaReserved", "False", "Pending", NO_QUOTA)))
    assert (status["phase"], ready(status)["reason"]) == ("Pending", "Queued")
    assert NO_QUOTA in status["message"] and "team-a-gpu" in status["message"]
    queue = status["queue"]
    assert (queue["state"], queue["localQueue"], queue["requeueCount"]) == ("Pending", "team-a-gpu", 0)
    assert queue["message"] == NO_QUOTA and queue["workload"].startswith("job-")
    # Before Kueue made its Workload, the Job's own queue label says where it waits.
    before = observe(body, job, None)
    assert ready(before)["reason"] == "Queued" and before.get("queue") is None


def test_quota_reserved_then_admitted_then_running():
    body, job = queued_lora()
    reserved = workload(
        job,
        cond("QuotaReserved", "True", "QuotaReserved"),
        cond("Admitted", "False", "UnsatisfiedChecks", "waiting for provisioning-request"),
        admission=ADMISSION,
    )
    status = observe(body, job, reserved)
    assert ready(status)["reason"] == "QuotaReserved" and "provisioning-request" in status["message"]
    admitted = workload(
        job, cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted"), admission=ADMISSION
    )
    status = observe(body, job, admitted)
    assert ready(status)["reason"] == "Admitted" and "h200-cq" in status["message"]
    assert (status["queue"]["clusterQueue"], status["queue"]["flavors"]) == ("h200-cq", ["default", "h200"])
    job["spec"]["suspend"] = False
    running = observe(body, job, admitted, active=1, startTime=NOW)
    assert running["phase"] == "Running" and running["queue"]["state"] == "Admitted"


def test_an_eviction_shows_preempted_with_its_reason_and_is_counted_once():
    body, job = queued_lora()
    message = "Preempted to accommodate a workload (UID: 42) due to prioritization in the ClusterQueue"
    evicted = workload(
        job,
        cond("QuotaReserved", "False", "Pending", "evicted"),
        cond("Admitted", "False", "NoReservation"),
        cond("Evicted", "True", "Preempted", message, at="2026-12-06T11:00:00Z"),
        cond("Preempted", "True", "InClusterQueue", message, at="2026-12-06T11:00:00Z"),
    )
    status = observe(body, job, evicted)
    assert (status["phase"], ready(status)["reason"]) == ("Pending", "Preempted")
    assert "InClusterQueue" in status["message"] and "resumes from the last checkpoint" in status["message"]
    queue = status["queue"]
    assert (queue["state"], queue["requeueCount"]) == ("Evicted", 1)
    assert queue["lastEvictionReason"] == f"Preempted (InClusterQueue): {message}"
    # Reconciled again (a resync, a restart): the same eviction is not counted twice.
    body = after(body, status)
    again = observe(body, job, evicted)
    assert again["queue"]["requeueCount"] == 1
    # Readmitted (Kueue resets Evicted), then evicted for another reason: counted, and said so.
    readmitted = workload(
        job,
        cond("QuotaReserved", "True", "QuotaReserved"),
        cond("Admitted", "True", "Admitted"),
        cond("Evicted", "False", "QuotaReserved", at="2026-12-06T11:05:00Z"),
        admission=ADMISSION,
    )
    body = after(body, observe(after(body, again), job, readmitted))
    assert body["status"]["queue"]["requeueCount"] == 1 and body["status"]["queue"]["state"] == "Admitted"
    deactivated = workload(
        job,
        cond("QuotaReserved", "False", "Pending"),
        cond("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout", at="2026-12-06T12:00:00Z"),
    )
    second = observe(body, job, deactivated)
    assert ready(second)["reason"] == "Evicted" and second["queue"]["requeueCount"] == 2
    assert second["queue"]["lastEvictionReason"] == "PodsReadyTimeout: Exceeded the PodsReady timeout"


def test_gpu_jobs_go_to_the_default_local_queue_unless_the_spec_names_one():
    cfg = CFG.model_copy(update={"default_queue_name": "default"})
    plain = reconcile(observed(body=lora(), dependencies=DEPS), cfg, NOW)
    assert job_of(plain)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    assert job_of(plain)["spec"]["suspend"] is True
    first = reconcile(observed(body=lora(scheduling={"queueName": "team-a-gpu"}), dependencies=DEPS), cfg, NOW)
    assert job_of(first)["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpu"
    prepare = reconcile(observed(body=board()), cfg, NOW)  # CPU work takes no GPU quota: not queued
    assert "kueue.x-k8s.io/queue-name" not in job_of(prepare)["metadata"]["labels"]
    # Kueue's own defaulting (a LocalQueue named default) labels and suspends the Job itself: read from the Job.
    body, job = queued_lora()
    job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "default"
    assert "queue default" in observe(body, job, None)["message"]


def test_a_priority_class_too_long_for_kueues_label_is_refused_naming_the_field():
    """Kueue reads the priority class from a label (63 characters at most): a longer name with a queue, the
    operator's default queue included (the CRD's rule sees only the spec's), is an invalid spec, not a refused Job."""
    long_name = "p" * 64
    cfg = CFG.model_copy(update={"default_queue_name": "default"})
    decision = reconcile(observed(body=lora(scheduling={"priorityClassName": long_name}), dependencies=DEPS), cfg, NOW)
    assert decision.status["phase"] == "Failed" and not decision.create
    assert decision.status["message"].startswith("spec.scheduling.priorityClassName: 'pppp")
    assert "kueue.x-k8s.io/priority-class" in decision.status["message"]
    # Without a queue it is the pod's priorityClassName, where 253 characters are fine.
    plain = reconcile(observed(body=lora(scheduling={"priorityClassName": long_name}), dependencies=DEPS), CFG, NOW)
    assert job_of(plain)["spec"]["template"]["spec"]["priorityClassName"] == long_name


def test_a_finished_run_shows_the_workload_kueue_marks_finished_after_the_job_ends():
    """Kueue marks the Workload Finished only after the Job has ended (real Kueue v0.17: tests/cluster/
    test_kueue_real.py), when the run's status is already final; the kept status still takes Kueue's last word."""
    body, job = queued_lora()
    job["spec"]["suspend"] = False
    failed = {"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    admitted = workload(
        job, cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted"), admission=ADMISSION
    )
    ended = after(body, observe(body, job, admitted, **failed))
    assert (ended["status"]["phase"], ended["status"]["queue"]["state"]) == ("Failed", "Admitted")
    finished = copy.deepcopy(admitted)
    finished["status"]["conditions"].append(cond("Finished", "True", "Failed", "Job failed: BackoffLimitExceeded"))
    kept = after(ended, observe(ended, job, finished, **failed))
    assert kept["status"]["phase"] == "Failed"
    queue = kept["status"]["queue"]
    assert (queue["state"], queue["reason"], queue["clusterQueue"]) == ("Finished", "Failed", "h200-cq")
    # A Workload Kueue has since deleted (its retention policy) leaves the last word standing.
    assert after(kept, observe(kept, job, None, **failed))["status"]["queue"]["state"] == "Finished"


def test_a_run_kueue_is_evicting_shows_preempted_while_kueue_still_holds_its_quota():
    """Real Kueue (v0.17) marks a preempted Workload Evicted and Preempted while it still holds its quota (QuotaReserved
    and Admitted stay True until the suspended Job's pods are gone): the run reads Preempted from that moment, with
    the Event to say so, not "admitted and is starting" (tests/cluster/test_kueue_real.py watched this sequence)."""
    body, job = queued_lora()
    admitted = workload(
        job, cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted"), admission=ADMISSION
    )
    job["spec"]["suspend"] = False
    body = after(body, observe(body, job, admitted, active=1, startTime=NOW))
    assert body["status"]["phase"] == "Running"
    message = "Preempted to accommodate a workload (UID: 42, JobUID: 43) due to prioritization in the ClusterQueue"
    evicting = copy.deepcopy(admitted)
    evicting["status"]["conditions"] += [
        cond("Evicted", "True", "Preempted", message, at="2026-12-06T11:00:00Z"),
        cond("Preempted", "True", "InClusterQueue", message, at="2026-12-06T11:00:00Z"),
    ]
    job["spec"]["suspend"] = True  # Kueue stopped the Job; its pod is terminating
    job["status"] = {"startTime": NOW}
    workloads = {"job-uid": evicting}
    decision = reconcile(observed(body=body, dependencies=DEPS, children=[job], workloads=workloads), CFG, NOW)
    status = decision.status
    assert (status["phase"], ready(status)["reason"]) == ("Pending", "Preempted")
    assert (status["queue"]["state"], status["queue"]["requeueCount"]) == ("Evicted", 1)
    assert [(e.reason, e.message.split(":")[0]) for e in decision.events] == [("Preempted", "Pending")]


def test_a_job_deleted_by_hand_is_made_again_only_once_kueue_has_let_go_of_its_workload():
    """Kueue matches a Job to a Workload by the Job's name: a Job made again while the deleted one's Workload lingers
    would be taken for it, and kept suspended for ever once that Workload goes."""
    body, job = queued_lora()
    name = job["metadata"]["name"]
    runner = [c for c in reconcile(observed(body=body, dependencies=DEPS), CFG, NOW).create if c["kind"] != "Job"]
    lingering = observed(body=body, dependencies=DEPS, children=runner, job_workloads={name: ["job-uid"]})
    waiting = reconcile(lingering, CFG, NOW)
    assert [c["kind"] for c in waiting.create if c["kind"] == "Job"] == []
    assert (waiting.status["phase"], ready(waiting.status)["reason"]) == ("Pending", "OldWorkloadLingers")
    created = next(c for c in waiting.status["conditions"] if c["type"] == "JobCreated")
    assert (created["status"], created["reason"]) == ("False", "OldWorkloadLingers")
    assert name in waiting.status["message"]
    # Another Job's Workload (another run, another object) holds nothing back; gone, the Job is made again.
    for job_workloads in ({f"{name}x": ["other"]}, {}):
        again = reconcile(
            observed(body=body, dependencies=DEPS, children=runner, job_workloads=job_workloads), CFG, NOW
        )
        assert [c["metadata"]["name"] for c in again.create if c["kind"] == "Job"] == [name]
    # The Job there, its own Workload (under its name too) is no reason to wait.
    mine = observed(
        body=body,
        dependencies=DEPS,
        children=[*runner, job],
        workloads={"job-uid": workload(job, cond("QuotaReserved", "False", "Pending", NO_QUOTA))},
        job_workloads={name: ["job-uid"]},
    )
    assert ready(reconcile(mine, CFG, NOW).status)["reason"] == "Queued"
