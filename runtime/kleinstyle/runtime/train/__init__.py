"""The StyleLoRA train step: pick the backend, run it, judge its checkpoints, publish the LoRA.

One module per job, so that each backend only trains and everything they must agree on is written once:
    backend.py      the interface a backend implements (`prepare`, `train`) and what it leaves (`Trained`)
    builtin.py      klein's own trainer, in-process          aitoolkit.py   ai-toolkit, as a subprocess
    judge.py        scores checkpoints, applies the early-stopping policy (`contract.early_stop`)
    reporter.py     progress to status, and whether the run must stop
    publish.py      which checkpoint becomes the LoRA, and publishing it
    settings.py     the plan as the builtin trainer's settings, held-out references, the dataset folder
    cli.py          `kleinstyle train --model DIR --data DIR` on one machine

Output under the run's `output_uri` (a path on the artifact volume):
    work/                       the builtin backend's checkpoints (work/checkpoints/step_NNNNNN/) and the localised
                                ai-toolkit config; work/evaluation/ the probe scores per checkpoint (the cache a
                                restarted pod reads)
    aitoolkit/NAME/             ai-toolkit's own training folder (set by the operator in aitoolkit.yaml)
                                both on the volume, so a restarted pod resumes
    lora.safetensors            the published LoRA (copied atomically: staged name, then rename)
    lora.json                   its sidecar: step, loss, plan hash, backend, versions, RunSpec hash
Policy:
- Progress (`contract.reports.TrainProgress`) goes to `status.progress` at most every `step.REPORT_INTERVAL_S`
  seconds, and at once at each checkpoint.
- With early stopping on (the plan) and an `evaluation` in the RunSpec, every checkpoint is scored and the best
  checkpoint, not the last, becomes the LoRA.
- A stop request (the owner's `kleinstyle.dev/stop` annotation naming this run, polled every `step.STOP_POLL_S`
  seconds) ends training at the next step; the best checkpoint (the latest one without evaluation) becomes the LoRA
  and the run succeeds with stop_reason "stop requested" (": " and the user's reason, when one was given).
- SIGTERM (preemption) exits 1: the Job's next pod resumes from the last checkpoint.
- Input that can never succeed (no dataset, no model directory, a target naming no layer, an object-store output
  for ai-toolkit) exits 2, which the Job's podFailurePolicy turns into an immediate failure.
"""

from __future__ import annotations

from kleinstyle.contract.runspec import RunSpec

from ..errors import BadInput
from ..step import Outcome, Reporter, run_step
from .aitoolkit import AIToolkitBackend
from .backend import Backend
from .builtin import BuiltinBackend
from .judge import Judge, judged
from .publish import promote
from .reporter import TrainReporter
from .settings import train_spec


def backend_for(spec: RunSpec, reporter: TrainReporter) -> Backend:
    """The backend the RunSpec names."""
    work = train_spec(spec)
    if work.plan.mode == "two-step" and work.backend != "builtin":
        raise BadInput("mode two-step trains on the builtin backend: set backend: builtin")
    if work.backend == "builtin":
        return BuiltinBackend(spec, reporter)
    return AIToolkitBackend(spec, reporter)


def run_train(spec: RunSpec, reporter: TrainReporter) -> Outcome:
    """Pick the backend, run it with its checkpoints judged (when the plan says so), publish what it ends with."""
    backend = backend_for(spec, reporter)
    ended = backend.prepare()
    if ended is not None:
        return ended
    judge = Judge(spec, reporter, backend.work_dir) if judged(train_spec(spec)) else None
    try:
        trained = backend.train(judge)
    finally:
        if judge is not None:
            judge.close()
    if isinstance(trained, Outcome):
        return trained
    return promote(spec, reporter, trained, judge)


def work(spec: RunSpec, reporter: Reporter) -> Outcome:
    """The train step in its pod (step.py runs it)."""
    train = train_spec(spec)
    total = int(train.plan.steps.value)
    training = TrainReporter(reporter, total)
    training.send("Running", f"starting {train.backend} training: {total} steps")
    return run_train(spec, training)


def main(spec_path: str) -> int:
    """`kleinstyle train --spec RUNSPEC`: the StyleLoRA's pod; returns its exit code."""
    return run_step(spec_path, "train", work)
