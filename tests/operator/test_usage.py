"""The facts metrics count, from status transitions: GPU-seconds per stretch a pod ran (preemption included),
queue wait, finished runs, checkpoints scored, early stops, images, fusion time, training gauges; each once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kleinstyle.operator.usage import (
    Change,
    checkpoints_scored,
    early_stop,
    finished_run,
    fusion_seconds,
    gpu_seconds,
    images_rendered,
    queue_wait,
    queued_since,
    training,
)

T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(gpus: int = 2, pool: str = "h200", created: float = 0) -> dict:
    limits = {"memory": "120Gi", **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {
        "metadata": {"name": "j1", "creationTimestamp": at(created), "labels": {"kleinstyle.dev/node-pool": pool}},
        "spec": {"template": {"spec": {"containers": [{"resources": {"limits": limits}}]}}},
    }


def status(phase: str, reason: str = "", run: str = "r1", **fields) -> dict:
    return {
        "phase": phase,
        "runHash": run,
        "jobName": "j1",
        "conditions": [{"type": "Ready", "status": "False", "reason": reason, "lastTransitionTime": at(0)}],
        **fields,
    }


def change(before: dict, after: dict, now: float = 1000, kind: str = "StyleLoRA", the_job: dict | None = None):
    return Change.of(kind, "team-a", "x", before, after, {"j1": the_job or job()}, T0 + timedelta(seconds=now))


def test_gpu_seconds_of_a_run_are_counted_once_when_it_ends():
    running = status("Running", "JobRunning", startTime=at(100))
    done = status("Succeeded", "JobComplete", startTime=at(100), completionTime=at(400))
    assert gpu_seconds(change(running, running)) is None  # still running: nothing yet
    assert gpu_seconds(change(running, done)) == (600.0, "h200")  # 2 GPUs x 300 s
    assert gpu_seconds(change(done, done)) is None  # reconciled again: not counted twice
    # Started and finished between two reconciles: still counted.
    assert gpu_seconds(change(status("Pending", "JobCreated"), done)) == (600.0, "h200")
    # A CPU run holds no GPU.
    assert gpu_seconds(change(running, done, the_job=job(gpus=0))) is None


def test_a_preempted_run_counts_each_stretch_it_ran_and_not_the_wait_between():
    running = status("Running", "JobRunning", startTime=at(100))
    queue = {"workload": "w1", "state": "Evicted", "requeueCount": 1, "lastEvictionTime": at(250)}
    preempted = status("Pending", "Preempted", startTime=at(100), queue=queue)
    assert gpu_seconds(change(running, preempted, now=260)) == (300.0, "h200")  # 100 -> 250, 2 GPUs
    resumed = status("Running", "JobRunning", startTime=at(900), queue={**queue, "state": "Admitted"})
    assert gpu_seconds(change(preempted, resumed, now=910)) is None  # the wait in the queue is no GPU time
    done = status("Succeeded", "JobComplete", startTime=at(900), completionTime=at(1000))
    assert gpu_seconds(change(resumed, done)) == (200.0, "h200")
    # The readmitted Job waited from its eviction, not from its creation.
    assert queue_wait(change(preempted, resumed)) == 650.0


def test_a_replaced_run_counts_until_now():
    running = status("Running", "JobRunning", startTime=at(100))
    replaced = status("Pending", "JobCreated", run="r2")
    assert gpu_seconds(change(running, replaced, now=160)) == (120.0, "h200")


def test_queue_wait_and_queued_since():
    queued = status("Pending", "Queued")
    assert queued_since(change(queued, queued, the_job=job(created=5))) == (T0 + timedelta(seconds=5)).timestamp()
    started = status("Running", "JobRunning", startTime=at(605))
    assert queue_wait(change(queued, started, the_job=job(created=5))) == 600.0
    assert queue_wait(change(started, started, the_job=job(created=5))) is None  # once
    assert queued_since(change(queued, started)) is None


def test_finished_runs_and_why_loras_stopped_early():
    running = status("Running", "JobRunning", startTime=at(0))
    plateau = "early stopping: step 400: no improvement beyond one standard error for 3 evaluations"
    done = status("Succeeded", "JobComplete", startTime=at(0), completionTime=at(90), stopReason=plateau)
    assert finished_run(change(running, done)) == ("Succeeded", 90.0)
    assert finished_run(change(done, done)) is None
    assert early_stop(change(running, done)) == "no_improvement"
    guards = "early stopping: step 300: two evaluations in a row failed the guards (leakage)"
    assert early_stop(change(running, {**done, "stopReason": guards})) == "guards"
    assert early_stop(change(running, {**done, "stopReason": "stop requested"})) == "stop_requested"
    assert early_stop(change(running, {**done, "stopReason": "completed"})) is None
    failed = status("Failed", "BackoffLimitExceeded", startTime=at(0))
    assert finished_run(change(running, failed, now=30)) == ("Failed", 30.0)
    invalid = {"phase": "Failed", "conditions": [{"type": "Ready", "reason": "InvalidSpec"}]}
    assert finished_run(change({"phase": "Waiting"}, invalid)) is None  # refused before any run: nothing to count


def test_checkpoints_images_fusion_and_training_are_counted_as_they_arrive():
    one = status(
        "Running", "JobRunning", checkpoints=[{"step": 50, "uri": "c", "score": 0.1}, {"step": 100, "uri": "c"}]
    )
    two = status(
        "Running",
        "JobRunning",
        checkpoints=[{"step": 50, "uri": "c", "score": 0.1}, {"step": 100, "uri": "c", "score": 0.2}],
    )
    assert checkpoints_scored(change(status("Pending"), one)) == 1
    assert checkpoints_scored(change(one, two)) == 1 and checkpoints_scored(change(two, two)) == 0
    assert checkpoints_scored(change(two, {**two, "runHash": "r2"})) == 2  # a new run's are new
    two, five = status("Running", imagesDone=2), status("Running", imagesDone=5)
    assert images_rendered(change(two, five, kind="GenerationJob")) == 3
    assert images_rendered(change(five, five, kind="GenerationJob")) == 0
    fused = status("Succeeded", durationSeconds=12.5)
    assert fusion_seconds(change(status("Running"), fused, kind="LoRAFusion")) == 12.5
    assert fusion_seconds(change(fused, fused, kind="LoRAFusion")) is None
    progress = {"step": "train", "runHash": "r1", "state": "Running", "progress": {"etaSeconds": 120.0}}
    live = status("Running", "JobRunning", step=40, totalSteps=100, loss=0.25, progress=progress)
    assert training(change(live, live)) == {"step": 40, "total_steps": 100, "loss": 0.25, "eta_seconds": 120.0}
    assert training(change(live, {**live, "phase": "Succeeded"})) is None
