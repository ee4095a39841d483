"""Reconcile as a pure function: (resource, observed world, config) -> (children to create or delete, status, events).

The phase machine, in one place:

    Waiting    a dependency is missing, failed or not Succeeded yet (condition DependenciesReady=False), or the
               namespace's models-pull Job has not completed and the run reads the model cache (ModelsReady=False)
    Pending    the run's Job is not running yet: just created, or queued (suspended by Kueue)
    Running    the Job has an active pod
    Succeeded  the Job completed; the run's result is copied into status
    Failed     the Job failed; the message carries the pod's reason (exit code, termination message)

Spec changes: a run is keyed by the hash of its RunSpec. When the spec changes, a new run is planned from the spec,
the dependencies as they are now and the operator's configuration; when its hash differs, a new ConfigMap and Job
are created under new names and the children of older runs are deleted, running or not. A finished run is never
silently kept for a spec it does not match.

Runs survive their dependencies: a run started for the current generation of the spec goes on (and a finished one
stays) when a dependency is deleted, re-created or retrained, or the operator's configuration changes; status says
so (`SourcesCurrent=False`) and only an edit of the spec starts another run. Which run is current is read from the
operator's own records (the Job annotated with the generation, the RunSpec beside it), never from status, which
anyone with rights on the status subresource could write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kleinstyle.contract.pod import RUNSPEC_FILE, failure_reason
from kleinstyle.contract.reports import Report, read_report, reported_run
from kleinstyle.contract.runspec import RunSpec
from pydantic import ValidationError

from . import kueue
from . import pods as pods_
from .api.common import API_VERSION, CommonStatus, Condition, Phase, QueueStatus, RunInput, field_errors
from .children import InvalidSpec, Run, build_children
from .conditions import cond, merge_conditions, true_condition
from .config import OperatorConfig
from .kinds import KIND_RUNS, KindRuns, NotReady, changed_inputs, check_dependencies, inputs
from .kinds.base import (
    Dependencies,
    DependencyJobs,
    artifact_location,
    controlled_by,
    job_complete,
    owner_of,
    recorded_run,
    status_of,
)
from .models_gate import CONDITION as MODELS_READY
from .models_gate import NO_PULL, Gate, models_gate, mounts_model_cache
from .naming import GENERATION, RUN_HASH, run_name

StatusT = TypeVar("StatusT", bound=CommonStatus)
RUN_CHILD_KINDS = ("Job", "ConfigMap")
RUNNER_KINDS = ("ServiceAccount", "Role", "RoleBinding")
TERMINAL = ("Succeeded", "Failed")
ERROR_CONDITION = "ReconcileError"  # True while the operator's last reconcile of the object failed


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the handler read from the API for one reconcile."""

    body: Mapping[str, Any]
    dependencies: Mapping[tuple[str, str], Mapping[str, Any] | None] = field(default_factory=dict)
    # Every child labelled with the owner's uid (ConfigMaps, Jobs, ServiceAccount, Role, RoleBinding).
    children: Sequence[Mapping[str, Any]] = ()
    # Pods of the current run's Job, for the failure reason.
    pods: Sequence[Mapping[str, Any]] = ()
    # Kueue's Workloads of the owner's Jobs, by the Job's uid (empty where Kueue is not installed).
    workloads: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The uids of the Jobs Kueue's Workloads in the namespace were made for, by the Job's name (a deleted Job's too).
    job_workloads: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # A dependency cycle through this object ([self, ..., self]), found by following references in the namespace.
    cycle: Sequence[tuple[str, str]] = ()
    # Each dependency's Jobs (the operator's record of what ran for it), by (kind, name).
    dependency_jobs: DependencyJobs = field(default_factory=dict)
    # The namespace's models-pull Jobs (the chart's `kleinstyle models pull`) and their pods: models_gate. None: not
    # listed yet (the operator just started, or nothing in the namespace waited on them until now).
    models_pulls: Sequence[Mapping[str, Any]] | None = ()
    models_pull_pods: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class Decision:
    """What one reconcile does: children to create and delete, the status (serialised once, by alias: what the
    status patch is computed from), Events, and Jobs to re-record."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # Existing children whose annotations to merge (a Job re-recorded for the spec's current generation).
    annotate: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def job_failed(job: Mapping[str, Any]) -> bool:
    return true_condition(job, "Failed") is not None


def job_phase(
    job: Mapping[str, Any] | None,
    name: str,
    pods: Sequence[Mapping[str, Any]],
    workload: Mapping[str, Any] | None = None,
    queue: QueueStatus | None = None,
) -> tuple[Phase, str, str]:
    """(phase, reason, message) of the run whose Job is `name`, from the Job (None: being created now), its pods and
    its Kueue Workload. A Job created this moment and one that has no pod yet read alike, so creating it writes
    status once, not twice."""
    if job is None:
        return "Pending", "JobCreated", f"Job {name} is waiting for a pod"
    status = job.get("status") or {}
    if job_complete(job):
        return "Succeeded", "JobComplete", f"Job {name} completed"
    failed = true_condition(job, "Failed")
    if failed:
        last = pods_.last_failure(pods)
        detail = (pods_.failure_text(last) if last else None) or failed.get("message") or "no reason given"
        # The runtime's exit code says what no retry mends (BadInput, VolumeFull); else the Job's own reason.
        reason = failure_reason(last[1].get("exitCode") if last else None) or failed.get("reason") or "JobFailed"
        return "Failed", reason, f"Job {name} failed ({failed.get('reason')}): {detail}"
    if (job.get("spec") or {}).get("suspend"):
        queue_name = (job["metadata"].get("labels") or {}).get(kueue.QUEUE_LABEL, "")
        return "Pending", *kueue.suspended_phase(name, queue_name, workload, queue)
    if status.get("active"):
        # A Pending pod counts as active: the run runs only once a pod does. Where the watch has brought no pod of
        # the Job yet, the Job's word stands.
        current = pods_.of_job(pods, name)
        if current and (stuck := pods_.waiting(current[0])) is not None:
            return "Pending", *stuck
        if current and pods_.starting(current[0]):
            return "Pending", "PodStarting", f"Job {name}'s pod {current[0]['metadata']['name']} is starting"
        return "Running", "JobRunning", f"Job {name} is running"
    if status.get("failed"):
        return "Running", "JobRetrying", f"Job {name} is retrying after {status['failed']} failed pod(s)"
    return "Pending", "JobCreated", f"Job {name} is waiting for a pod"


def merged(status: StatusT, *parts: CommonStatus) -> StatusT:
    """`status` with the fields each of `parts` set (in order, a later one winning), still only those set."""
    for part in parts:
        status = status.model_copy(update={name: getattr(part, name) for name in part.model_fields_set})
    return status


def reconcile(observed: Observed, cfg: OperatorConfig, now: str) -> Decision:
    body = observed.body
    kind_run = KIND_RUNS[body["kind"]]
    old_status = status_of(body)

    def finish(phase: Phase, reason: str, message: str, conds: list[Condition], fields: CommonStatus) -> Decision:
        return _decided(body, now, phase, reason, message, conds, fields)

    def invalid(message: str) -> Decision:
        return finish(
            "Failed", "InvalidSpec", message, [cond("Ready", "False", "InvalidSpec", message)], CommonStatus()
        )

    try:
        spec = kind_run.kind.spec.model_validate(body.get("spec") or {})
    except ValidationError as exc:  # The CRD schema normally refuses this at apply time.
        return invalid("; ".join(field_errors(exc)))

    deps = kind_run.dependencies(spec)
    if observed.cycle:
        chain = " -> ".join(f"{kind} {name}" for kind, name in observed.cycle)
        message = f"dependency cycle {chain}: it never resolves; remove one of these references"
        conds = [
            cond("DependenciesReady", "False", "DependencyCycle", message),
            cond("Ready", "False", "DependencyCycle", message),
            cond("Warning", "True", "DependencyCycle", message),
        ]
        return finish("Waiting", "DependencyCycle", message, conds, CommonStatus())
    if finished(body) and recorded_run(body, jobs_of(observed.children), complete=False):
        return kept(body, observed, now)

    run = run_in_flight(body, observed.children, cfg)
    pinned = run is not None
    try:
        if run is not None:
            # Started for this generation of the spec: it goes on with what it was started with, whatever its
            # dependencies or the operator's configuration (trainingLimits, say) do since.
            source = sources_condition(old_status.inputs, observed.dependencies, "goes on with")
            status = kind_run.status_type(inputs=old_status.inputs or inputs(deps, observed.dependencies))
        else:
            check_dependencies(deps, observed.dependencies, observed.dependency_jobs)
            run = kind_run.build(body, spec, observed.dependencies, cfg)
            source = cond("SourcesCurrent", "True", "Unchanged", "every input is the run this one uses")
            status = kind_run.status_type(inputs=inputs(deps, observed.dependencies))
        desired = build_children(run, cfg)
    except NotReady as wait:
        missing = (
            [f"{wait.message} (yet): nothing runs until it is created"] if wait.reason.endswith("NotFound") else []
        )
        conds = [
            cond("DependenciesReady", "False", wait.reason, wait.message),
            cond("Ready", "False", wait.reason, wait.message),
            warning_condition(missing),
        ]
        return _without_run(finish("Waiting", wait.reason, wait.message + earlier_run(observed), conds, CommonStatus()))
    except InvalidSpec as exc:
        return _without_run(invalid(str(exc) + earlier_run(observed)))

    short_hash = run.runspec.run_id()
    by_key = {_key(child): child for child in observed.children}
    models: list[Condition] = []
    new_job = next((c for c in desired if c["kind"] == "Job"), {})
    if not pinned and ("Job", run.name) not in by_key and mounts_model_cache(new_job, cfg.model_cache_claim):
        # Not started yet, and its pod would read the model cache: it waits for the namespace's pull, if any.
        if observed.models_pulls is None:
            return Decision()  # not known yet: nothing done, nothing written; the listing wakes it in a moment
        gate = models_gate(observed.models_pulls, observed.models_pull_pods)
        if gate is not None and gate.hold:
            return _held(body, observed, gate, now)
        if gate is not None:
            models = [cond(MODELS_READY, "True", gate.reason, gate.message)]
        elif old_status.condition(MODELS_READY) is not None:
            models = [cond(MODELS_READY, "True", NO_PULL, "no models-pull Job in the namespace")]
    # A run rebuilt from its records is never started again: only its runner's RBAC may be made anew.
    create = [c for c in desired if _key(c) not in by_key and (not pinned or c["kind"] in RUNNER_KINDS)]
    delete = superseded(observed.children, keep=short_hash)
    job = by_key.get(("Job", run.name))

    status.run_hash = short_hash
    status.job_name = run.name
    status.artifact_uri = run.runspec.output_display_uri
    # Result fields are rewritten on every reconcile, from this run's result or empty: a value left by an older
    # run, or written by a pod (RBAC cannot narrow its status patch to `progress`), never stands.
    conds = [cond("DependenciesReady", "True", "Ready", "all dependencies are Succeeded"), source, *models]
    planned, warnings = kind_run.planned(run)
    asked, unheeded = kind_run.requested(body, run)
    status = merged(status, kind_run.cleared(), planned, asked)
    warnings += unheeded

    conflict = next((why for d in desired if (why := foreign_child(d, by_key.get(_key(d))))), None)
    if conflict:
        conds += [
            cond("JobCreated", "False", "ChildConflict", conflict),
            cond("Ready", "False", "ChildConflict", conflict),
        ]
        decision = finish("Pending", "ChildConflict", conflict, conds, status)
        return Decision(delete=delete, status=decision.status, events=decision.events)  # create nothing

    workload = observed.workloads.get(job["metadata"].get("uid", "")) if job else None
    status.queue = kueue.queue_status(workload, old_status.queue) if workload else None
    lingering = [] if job else list(observed.job_workloads.get(run.name, ()))
    if lingering:
        # The Job was deleted (by hand, say) and its Workload is not gone yet: Kueue would take it for the Workload
        # of a Job made again under the name, and that Job would stay suspended for ever. Its removal wakes us.
        create = [c for c in create if c["kind"] != "Job"]
    # A Job created by this decision reads as it is created (suspended for Kueue, say): its first status is final.
    created_job = next((c for c in create if c["kind"] == "Job"), None)
    phase, reason, message = job_phase(job or created_job, run.name, observed.pods, workload, status.queue)
    if lingering:
        reason = "OldWorkloadLingers"
        message = f"Job {run.name} is made again once Kueue's Workload of the Job of that name that was deleted is gone"
    job_status = (job or {}).get("status") or {}
    # The run started when its pod started running (GPU time and the queue wait count from there), not when its Job
    # was created: known from the pods alone, so it is set once, when the watch brings a running pod.
    status.start_time = pods_.started(pods_.of_job(observed.pods, run.name))
    if status.start_time is None and phase in TERMINAL:
        # Ended before the watch brought its pod (a short run): the Job's own start, rather than no time at all.
        status.start_time = job_status.get("startTime")
    status.completion_time = job_status.get("completionTime")
    conds.append(
        cond("JobCreated", "False", reason, message)
        if lingering
        else cond("JobCreated", "True", "Created", f"Job {run.name}")
    )
    report, problem = current_report(old_status.progress, kind_run, short_hash)
    if problem:
        warnings.append(problem)
    if report is not None and report.progress is not None:
        status = merged(status, kind_run.live(report.progress, run))  # live step, loss, ETA; a result overrides
    result = report.result if report is not None else None
    if result is not None and phase in TERMINAL:
        # Counts and reasons come from the run; where the artifacts are comes from the RunSpec, never the pod.
        status = merged(status, kind_run.result(result, run))
        warnings += result.warnings
    elif phase == "Succeeded":
        phase, reason, message = "Running", "AwaitingResult", f"Job {run.name} completed; waiting for its result"
    conds.append(warning_condition(warnings))
    conds.append(cond("Ready", "True" if phase == "Succeeded" else "False", reason, message))
    if phase in TERMINAL:
        # The run is over: its ServiceAccount may no longer write this object's status (a new run makes another).
        create = [c for c in create if c["kind"] not in RUNNER_KINDS]
        delete += [dict(c) for c in observed.children if c["kind"] in RUNNER_KINDS]
    decision = finish(phase, reason, message, conds, status)
    events = list(decision.events)
    if delete and any(c["kind"] == "Job" for c in delete):
        events.append(Event("Normal", "Superseded", f"spec changed: replacing the run with run {short_hash}"))
    # An edited spec that plans the same run keeps it: its Job is recorded for this generation, so it goes on when
    # a dependency goes later.
    generation = str(body["metadata"].get("generation"))
    annotate = []
    if job is not None and (job["metadata"].get("annotations") or {}).get(GENERATION) != generation:
        annotate.append((dict(job), {GENERATION: generation}))
    return Decision(create=create, delete=delete, status=decision.status, events=events, annotate=annotate)


def _held(body: Mapping[str, Any], observed: Observed, gate: Gate, now: str) -> Decision:
    """Waiting for the namespace's models-pull Job (`ModelsReady=False`): nothing is created, nothing deleted (as
    while a dependency is not ready). An Event says so each time the reason changes (pulling, failed)."""
    message = gate.message + earlier_run(observed)
    conds = [
        cond("DependenciesReady", "True", "Ready", "all dependencies are Succeeded"),
        cond(MODELS_READY, "False", gate.reason, message),
        cond("Ready", "False", gate.reason, message),
    ]
    decision = _decided(body, now, "Waiting", gate.reason, message, conds, CommonStatus())
    before = status_of(body).condition(MODELS_READY)
    events = [e for e in decision.events if e.reason != gate.reason]
    if before is None or before.status != "False" or before.reason != gate.reason:
        events.append(Event("Warning" if gate.failed else "Normal", gate.reason, f"Waiting: {message}"))
    return Decision(status=decision.status, events=events)


def _without_run(decision: Decision) -> Decision:
    """`decision` for an object whose spec cannot be planned now: nothing is created, and nothing deleted either. A
    run an earlier spec started goes on (its GPU work is not thrown away on a guess) until a new plan supersedes it
    or, the same run, adopts it."""
    return Decision(status=decision.status, events=decision.events)


def earlier_run(observed: Observed) -> str:
    """What status says of a run an earlier spec started that is still going (its Job has not ended)."""
    going = [j["metadata"]["name"] for j in jobs_of(observed.children) if not job_complete(j) and not job_failed(j)]
    return f"; Job {going[0]}, started for an earlier spec, goes on until the new spec can be planned" if going else ""


def settled(body: Mapping[str, Any]) -> bool:
    """Succeeded or Failed for the current generation: nothing to do until the spec changes."""
    status = CommonStatus.read(body.get("status"))
    return status.phase in TERMINAL and status.observed_generation == body["metadata"].get("generation")


def finished(body: Mapping[str, Any]) -> bool:
    """Settled with a run (not refused before one): it is kept as it is, whatever its inputs do since."""
    return settled(body) and bool(CommonStatus.read(body.get("status")).run_hash)


def kept(body: Mapping[str, Any], observed: Observed, now: str) -> Decision:
    """A finished run stays as it ended; `SourcesCurrent` says whether an input (a LoRA, a board) has a new run
    since, because a retrained LoRA does not re-render the images already made with the old one (edit the spec to
    run again). What is left of the run's children besides its Job and RunSpec goes."""
    status = CommonStatus.read(body.get("status"))
    source = sources_condition(status.inputs, observed.dependencies, "used")
    ready = status.condition("Ready")
    phase, reason = status.phase or "Pending", ready.reason if ready else ""
    fields = CommonStatus()
    if (workload := _run_workload(body, observed, status.run_hash)) is not None:
        # Kueue marks a Workload Finished after its Job has ended, so after the run's final status: its last word.
        fields.queue = kueue.queue_status(workload, status.queue)
    decision = _decided(body, now, phase, reason, status.message or "", [source], fields)
    before = status.condition("SourcesCurrent")
    changed = source.status == "False" and (before is None or before.status != "False")
    events = [Event("Normal", "SourceChanged", source.message)] if changed else []
    delete = [c for c in superseded(observed.children, keep=status.run_hash) if c["kind"] in RUN_CHILD_KINDS]
    delete += [dict(child) for child in observed.children if child["kind"] in RUNNER_KINDS]
    return Decision(delete=delete, status=decision.status, events=events)


def _run_workload(body: Mapping[str, Any], observed: Observed, run_hash: str | None) -> Mapping[str, Any] | None:
    """The Workload Kueue keeps for the Job of the run `run_hash` of `body`, where there is one."""
    for job in jobs_of(observed.children):
        labels = job["metadata"].get("labels") or {}
        if labels.get(RUN_HASH) == run_hash and controlled_by(job, body["metadata"].get("uid") or ""):
            return observed.workloads.get(job["metadata"].get("uid", ""))
    return None


def sources_condition(recorded: Sequence[RunInput], dependencies: Dependencies, verb: str) -> Condition:
    """`SourcesCurrent`: whether each input a run recorded (`status.inputs`) is still the run it `verb` (a LoRA
    retrained, a board re-prepared, or either deleted since). Shown, never acted on: the run keeps what it had."""
    changed = changed_inputs(recorded, dependencies)
    if changed:
        message = "; ".join(changed) + f": this run {verb} the earlier one; edit the spec to run again with the new"
        return cond("SourcesCurrent", "False", "SourceChanged", message)
    return cond("SourcesCurrent", "True", "Unchanged", "every input is still the run this one uses")


def jobs_of(children: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [child for child in children if child["kind"] == "Job"]


def superseded(children: Sequence[Mapping[str, Any]], keep: str | None) -> list[dict[str, Any]]:
    """The children to delete when the run `keep` (a run id; None: no run) is the object's only run: every other
    run's Job and RunSpec, and with no run at all the runner's RBAC too."""
    gone = []
    for child in children:
        run_id = (child["metadata"].get("labels") or {}).get(RUN_HASH)
        if (child["kind"] in RUN_CHILD_KINDS and run_id != keep) or (keep is None and child["kind"] in RUNNER_KINDS):
            gone.append(dict(child))
    return gone


def run_in_flight(body: Mapping[str, Any], children: Sequence[Mapping[str, Any]], cfg: OperatorConfig) -> Run | None:
    """The run this generation of the object's spec started, rebuilt from the operator's own records: its Job
    (annotated with the generation) and the RunSpec ConfigMap of the same name, whose content must be this object's
    run of its kind's step, hash to that name and write where the layout puts that run. A ConfigMap edited, or a
    label changed, since the operator wrote them is no record. None when there is none (a new spec, a first run) or
    the records do not agree: then the run is planned anew from the spec.

    A Job from before Jobs were annotated counts for the generation its status was written for, when it is the run
    status names (the one time status picks a record: among the object's own Jobs, never what they read)."""
    kind_run = KIND_RUNS[body["kind"]]
    meta, status = body["metadata"], CommonStatus.read(body.get("status"))
    owner = owner_of(kind_run.kind, body)
    generation = str(meta.get("generation"))
    by_key = {_key(child): child for child in children}
    legacy = (status.run_hash or "") if str(status.observed_generation) == generation else ""
    for job in sorted(jobs_of(children), key=lambda j: j["metadata"].get("creationTimestamp") or "", reverse=True):
        name = job["metadata"]["name"]
        recorded_for = (job["metadata"].get("annotations") or {}).get(GENERATION)
        if recorded_for is None and legacy and name == run_name(owner.name, kind_run.step, legacy):
            recorded_for = generation
        configmap = by_key.get(("ConfigMap", name))
        if recorded_for != generation or configmap is None or not controlled_by(job, owner.uid):
            continue
        data = configmap.get("data") or {}
        try:
            runspec = RunSpec.from_json(data.get(RUNSPEC_FILE) or "")
        except ValueError:
            continue
        run_hash = runspec.content_hash()
        if (
            runspec.owner != owner
            or runspec.work.step != kind_run.step
            or name != run_name(owner.name, kind_run.step, run_hash)
            or runspec.output_uri != artifact_location(cfg, owner, run_hash)[0]
            or not controlled_by(configmap, owner.uid)
        ):
            continue
        files = {key: text for key, text in data.items() if key != RUNSPEC_FILE}
        return Run(
            runspec=runspec,
            step=kind_run.step,
            run_hash=run_hash,
            owner_api_version=API_VERSION,
            files=files,
            generation=meta.get("generation"),
        )
    return None


def current_report(
    progress: Mapping[str, Any] | None, kind_run: KindRuns[Any, Any, Any, Any, Any], run_id: str
) -> tuple[Report | None, str]:
    """(the current run's report or None, a warning when the report there is malformed). A report about another
    run (an older one, or none yet) is no report; a malformed one is shown as a warning and read as none."""
    if progress is None or reported_run(progress) != run_id:
        return None, ""
    try:
        report = read_report(progress)
    except ValidationError as exc:
        # Paths start with the union's tag (the step) for a known step: left out, they read as in status.progress.
        tagged = exc.errors()[0]["loc"][:1] == (progress.get("step"),)
        problems = field_errors(exc, prefix="", skip=1 if tagged else 0)[:3]
        return None, f"the run's report in status.progress is malformed and was ignored ({'; '.join(problems)})"
    if report.step != kind_run.step:
        return None, f"status.progress holds a {report.step} report; a {kind_run.kind.kind} runs {kind_run.step}"
    return report, ""


# Reasons that need someone to act (a change of spec, a deleted stranger, a dependency fixed), so the resource will
# not progress by itself: kstatus' Stalled.
STALLED_REASONS = frozenset({"InvalidSpec", "ChildConflict", "DependencyCycle"})


def progress_conditions(phase: Phase, reason: str, message: str) -> list[Condition]:
    """kstatus' `Reconciling` and `Stalled` (Flux, Argo CD and `kubectl wait` read them): Stalled when the
    resource failed or cannot progress without a change (a failed dependency included), Reconciling while it is
    on its way (waiting, queued, running), neither when it succeeded."""
    stalled = phase == "Failed" or reason in STALLED_REASONS or (phase == "Waiting" and reason.endswith("Failed"))
    reconciling = not stalled and phase != "Succeeded"
    return [
        cond("Reconciling", "True", reason, message) if reconciling else cond("Reconciling", "False", phase),
        cond("Stalled", "True", reason, message) if stalled else cond("Stalled", "False", phase),
    ]


def _decided(
    body: Mapping[str, Any],
    now: str,
    phase: Phase,
    reason: str,
    message: str,
    conds: list[Condition],
    fields: CommonStatus,
) -> Decision:
    """The decision's status, serialised once (by alias, only the fields set): `fields` with the phase, its message,
    the generation it answers and the conditions merged into the old ones."""
    old = status_of(body)
    generation = body["metadata"].get("generation")
    conds = [*conds, *progress_conditions(phase, reason, message)]
    if (error := old.condition(ERROR_CONDITION)) is not None and error.status == "True":
        conds.append(cond(ERROR_CONDITION, "False", "Reconciled", "the last reconcile succeeded"))
    status = fields.model_copy()
    status.phase = phase
    status.message = message
    status.observed_generation = generation
    status.conditions = merge_conditions(old.conditions, conds, now, generation)
    return Decision(status=serialised(status), events=_transition_events(old, status, reason))


def serialised(status: CommonStatus) -> dict[str, Any]:
    """A status as the status patch writes it: wire names, and only the fields a reconcile set (None: removed)."""
    return status.model_dump(mode="json", exclude_unset=True)


def failed_reconcile(body: Mapping[str, Any], reason: str, message: str, now: str) -> Decision:
    """A reconcile that raised (ReconcileError) or that the API refused (ApiError), in a `ReconcileError` condition
    of its own. An object with a phase keeps it and the rest of its status: a finished run must never read as one to
    plan again because a request failed. One without a phase yet reads Pending, blocked by that error. The next
    reconcile that succeeds turns the condition False."""
    status = CommonStatus.read(body.get("status"))
    error = cond(ERROR_CONDITION, "True", reason, message)
    if not status.phase:
        decision = blocked(body, reason, message, now)
        generation = body["metadata"].get("generation")
        before = CommonStatus.read(decision.status).conditions
        conds = merge_conditions(before, [error], now, generation)
        return Decision(
            status={**decision.status, **serialised(CommonStatus(conditions=conds))}, events=decision.events
        )
    conds = merge_conditions(status.conditions, [error], now, status.observed_generation)
    return Decision(status=serialised(CommonStatus(conditions=conds)))


def blocked(body: Mapping[str, Any], reason: str, message: str, now: str) -> Decision:
    """Pending with `reason` (ChildConflict, ApiError): the run cannot start until someone acts; retried at resync."""
    conds = [cond("JobCreated", "False", reason, message), cond("Ready", "False", reason, message)]
    return _decided(body, now, "Pending", reason, message, conds, CommonStatus())


def foreign_child(desired: Mapping[str, Any], existing: Mapping[str, Any] | None) -> str | None:
    """Why an existing object under a child's name is not that child (None when it is, or when there is none).

    Names are predictable, so anyone who may create objects in the namespace could plant one first; adopting it
    would run their RunSpec (their fetch policy, their output path) under the operator's authority.
    """
    if existing is None:
        return None
    kind, name = _key(desired)
    owner_uid = desired["metadata"]["ownerReferences"][0]["uid"]
    controllers = [r for r in existing["metadata"].get("ownerReferences") or [] if r.get("controller")]
    if [r.get("uid") for r in controllers] != [owner_uid]:
        return f"{kind} {name} already exists and is not controlled by this object: delete it or rename this one"
    if kind == "ConfigMap" and existing.get("data") != desired.get("data"):
        return f"ConfigMap {name} exists with a RunSpec this operator did not write: delete it to let the run start"
    return None


def warning_condition(warnings: Sequence[str]) -> Condition:
    if warnings:
        return cond("Warning", "True", "RunWarnings", "; ".join(warnings))
    return cond("Warning", "False", "NoWarnings", "")


def _transition_events(old: CommonStatus, new: CommonStatus, reason: str) -> list[Event]:
    # A status without a run (Waiting) leaves the run id it had: only a new run id is a new run. A pod stuck
    # (unschedulable, its image unpullable) is a transition of its own, told once, though the phase stays Pending.
    run_hash = new.run_hash if "run_hash" in new.model_fields_set else old.run_hash
    ready = old.condition("Ready")
    stuck = reason in pods_.STUCK_REASONS and (ready is None or ready.reason != reason)
    if old.phase == new.phase and old.run_hash == run_hash and not stuck:
        return []
    warn = new.phase == "Failed" or reason in STALLED_REASONS or reason.endswith("NotFound") or stuck
    return [Event("Warning" if warn else "Normal", reason, f"{new.phase}: {new.message}")]
