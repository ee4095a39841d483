"""The interface every kind implements, and what their runs share: dependencies, artifact locations, the Run.

A kind's module answers five questions, each a pure function of (spec, dependencies, operator config) or of what
its run reported: what it waits for, what it runs (a RunSpec, as a `Run`), what status says before its Job starts,
while it runs, and once it has finished. `reconcile` asks them in that order and owns everything else (children,
phases, conditions, events). The RunSpec's hash names the run, so everything that changes what a run computes (the
spec, a dependency's output) starts a new run, and nothing else does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, Literal, TypeVar

from kleinstyle.contract.layout import RUN_ID_LENGTH, run_folder
from kleinstyle.contract.pod import PROVIDER_URL_ENV, Step
from kleinstyle.contract.reports import StepProgress, StepResult
from kleinstyle.contract.runspec import FuseSpec, GenerateSpec, Owner, PrepareSpec, RunSpec, StepSpec, TrainSpec
from pydantic import BaseModel

from ..api import BY_KIND, Kind
from ..api.common import API_VERSION, CommonStatus, RunInput, Scheduling
from ..children import GPU_STEPS, InvalidSpec, Run, SecretEnv
from ..conditions import true_condition
from ..config import OperatorConfig
from ..kueue import PRIORITY_LABEL
from ..naming import RUN_HASH

Dependencies = Mapping[tuple[str, str], Mapping[str, Any] | None]
# The Jobs of each dependency (every Job labelled with its uid), from the operator's own index.
DependencyJobs = Mapping[tuple[str, str], Sequence[Mapping[str, Any]]]
# A run id as the operator writes it (hex, RUN_ID_LENGTH at most): anything else in a status names no run of ours.
LABEL_VALUE_MAX = 63  # characters in a label value (Kubernetes' validation)
RUN_ID = re.compile(rf"[0-9a-f]{{1,{RUN_ID_LENGTH}}}")


@dataclass(frozen=True)
class Dependency:
    kind: str
    name: str
    # What the run consumes, inside the dependency's run folder (contract.layout): its place is derived from the
    # dependency's uid and run, never read from its status.
    artifact: str


class NotReady(Exception):
    """A dependency is missing or not Succeeded; the owner waits (a condition, not an error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def job_complete(job: Mapping[str, Any]) -> bool:
    return bool(true_condition(job, "Complete") or true_condition(job, "SuccessCriteriaMet"))


def controlled_by(child: Mapping[str, Any], uid: str) -> bool:
    """Whether `child`'s one controller is the object with `uid` (what the operator sets on every child)."""
    controllers = [r.get("uid") for r in child["metadata"].get("ownerReferences") or [] if r.get("controller")]
    return controllers == [uid]


def status_of(obj: Mapping[str, Any]) -> CommonStatus:
    """`obj`'s status as its kind's model reads it (`CommonStatus.read`: what does not validate is left out)."""
    kind = BY_KIND.get(str(obj.get("kind")))
    return (kind.status if kind else CommonStatus).read(obj.get("status"))


def status_run_id(obj: Mapping[str, Any]) -> str | None:
    """The run id `obj`'s status names, when it is one the operator could have written (hex, short); else None."""
    run_id = CommonStatus.read(obj.get("status")).run_hash
    return run_id if run_id is not None and RUN_ID.fullmatch(run_id) else None


def recorded_run(obj: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]], *, complete: bool = True) -> str | None:
    """The id of `obj`'s current run when the operator holds a record of it: a Job it created for `obj` (controlled
    by it, labelled with that run) that completed (`complete`) or at least ended. None otherwise.

    Status is output, never input: anyone who may patch an object's status could write any phase, run or URI
    there. A status is believed only where a Job of the operator's own agrees with it, and nothing is ever located
    through it: where a run's artifacts are follows from the object's uid and run id (`dependency_path`)."""
    run_id = status_run_id(obj)
    if run_id is None:
        return None
    uid = obj["metadata"].get("uid") or ""
    for job in jobs:
        if (job["metadata"].get("labels") or {}).get(RUN_HASH) != run_id or not controlled_by(job, uid):
            continue
        if job_complete(job) or (not complete and true_condition(job, "Failed")):
            return run_id
    return None


def dependency_path(cfg: OperatorConfig, kind: str, obj: Mapping[str, Any], artifact: str) -> str:
    """Where a pod reads `artifact` of the dependency `obj`'s recorded run: its run folder, from its uid and run id
    (`layout.run_folder`), under the namespace's own prefix of the artifact store."""
    run_id = status_run_id(obj)
    if run_id is None:
        raise ValueError(f"{kind} {obj['metadata'].get('name')} has no run of record")
    output, _ = artifact_location(cfg, owner_of(BY_KIND[kind], obj), run_id)
    return f"{output}/{artifact}"


def check_dependencies(deps: list[Dependency], observed: Dependencies, jobs: DependencyJobs) -> None:
    """Raise NotReady naming the first dependency that is missing, has not Succeeded, or whose success the
    operator has no record of (its status says so, but no Job of the operator's completed that run)."""
    for dep in deps:
        obj = observed.get((dep.kind, dep.name))
        if obj is None:
            raise NotReady(f"{dep.kind}NotFound", f"{dep.kind} {dep.name} does not exist in this namespace")
        status = status_of(obj)
        phase = status.phase or "Pending"
        if phase == "Failed":
            raise NotReady(f"{dep.kind}Failed", f"{dep.kind} {dep.name} failed: {status.message or ''}".strip())
        current = status.observed_generation == (obj.get("metadata") or {}).get("generation")
        if phase != "Succeeded" or not current:
            raise NotReady(f"{dep.kind}NotReady", f"waiting for {dep.kind} {dep.name} (now {phase})")
        if not status.output():  # finished without what is needed of it (a LoRA the base model beat)
            warning = status.condition("Warning")
            why = warning.message if warning and warning.status == "True" else status.message or ""
            output = status.output_name()
            raise NotReady(
                f"{dep.kind}Without{output[0].upper()}{output[1:]}",
                f"{dep.kind} {dep.name} succeeded without a {output}: {why}".strip(),
            )
        if recorded_run(obj, jobs.get((dep.kind, dep.name), ())) is None:
            raise NotReady(
                f"{dep.kind}Unrecorded",
                f"{dep.kind} {dep.name} says it succeeded (run {status.run_hash!s:.20}), but no Job this "
                "operator ran for it completed that run: a status is not taken as input",
            )


def find_cycle(
    start: tuple[str, str], dependencies_of: Callable[[tuple[str, str]], list[Dependency]]
) -> list[tuple[str, str]] | None:
    """The first dependency cycle through `start` ([start, ..., start]), or None. `dependencies_of` answers for any
    object in the namespace (an empty list for one that is missing or invalid)."""
    path: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def visit(node: tuple[str, str]) -> list[tuple[str, str]] | None:
        if node == start and path:
            return [*path, start]
        if node in seen:
            return None
        seen.add(node)
        path.append(node)
        for dep in dependencies_of(node):
            if (found := visit((dep.kind, dep.name))) is not None:
                return found
        path.pop()
        return None

    return visit(start)


def inputs(deps: list[Dependency], observed: Dependencies) -> list[RunInput]:
    """What a run is built from: each dependency's kind, name and run (its runHash), for `status.inputs`."""
    return [
        RunInput(
            kind=dep.kind,
            name=dep.name,
            run_hash=CommonStatus.read((observed.get((dep.kind, dep.name)) or {}).get("status")).run_hash or "",
        )
        for dep in deps
    ]


def changed_inputs(recorded: Sequence[RunInput], observed: Dependencies) -> list[str]:
    """Which of the inputs a finished run recorded have changed since: retrained, re-prepared or deleted."""
    changed = []
    for item in recorded:
        obj = observed.get((item.kind, item.name))
        if obj is None:
            changed.append(f"{item.kind} {item.name} was deleted")
            continue
        now = CommonStatus.read(obj.get("status")).run_hash or ""
        if now != item.run_hash:
            changed.append(f"{item.kind} {item.name} has a new run ({item.run_hash} -> {now or 'none yet'})")
    return changed


SpecT = TypeVar("SpecT", bound=BaseModel)
WorkT = TypeVar("WorkT", bound=PrepareSpec | TrainSpec | GenerateSpec | FuseSpec)
ProgressT = TypeVar("ProgressT", bound=StepProgress | None)
ResultT = TypeVar("ResultT", bound=StepResult)
StatusT = TypeVar("StatusT", bound=CommonStatus)


def work_of(run: Run, work_type: type[WorkT]) -> WorkT:
    """The run's step spec as the step it runs: every Run of a kind is built for, or checked to be, its step."""
    work = run.runspec.work
    if not isinstance(work, work_type):
        raise TypeError(f"run {run.name} runs {work.step}, not a {work_type.__name__}")
    return work


class KindRuns(Generic[SpecT, WorkT, ProgressT, ResultT, StatusT]):
    """How one kind runs: its spec model (`SpecT`), the step spec its runs carry (`WorkT`), what its runs report
    while they run (`ProgressT`; None for a step that reports no progress) and once finished (`ResultT`), and its
    status model (`StatusT`). Subclasses set the class attributes and implement `dependencies` and `build`; the
    status hooks return the kind's status with only the fields they know set (`reconcile` merges them and
    serialises the status once), and default to "nothing to say"."""

    kind: ClassVar[Kind]
    step: ClassVar[Step]
    # The status fields a run's progress and result fill: rewritten on every reconcile from the current run, and
    # emptied (to this model's defaults) when there is none, so a value an older run or a pod left never stands.
    outcome: ClassVar[type[BaseModel]]
    # The status model (`kind.status`, as `StatusT`) and the step spec of this kind's runs (`run.runspec.work` as
    # `WorkT`, by `work`).
    status_type: type[StatusT]
    work_type: type[WorkT]

    def work(self, run: Run) -> WorkT:
        return work_of(run, self.work_type)

    def dependencies(self, spec: SpecT) -> list[Dependency]:
        return []

    def build(self, body: Mapping[str, Any], spec: SpecT, deps: Dependencies, cfg: OperatorConfig) -> Run:
        raise NotImplementedError

    def planned(self, run: Run) -> tuple[StatusT, list[str]]:
        """Status fields (and warnings) known as soon as the run is planned, before any Job runs."""
        return self.status_type(), []

    def requested(self, body: Mapping[str, Any], run: Run) -> tuple[StatusT, list[str]]:
        """Status fields (and warnings) from what a user asked of the current run outside its spec (a stop, by
        annotation): shown, never a condition of anything the operator does."""
        return self.status_type(), []

    def live(self, progress: ProgressT, run: Run) -> StatusT:
        """Status fields from the running run's progress (step, ETA, images done); a result overrides them."""
        return self.status_type()

    def result(self, result: ResultT, run: Run) -> StatusT:
        """Status fields from the finished run's result: counts and reasons from the pod, locations from the
        RunSpec, never from the pod."""
        return self.status_type()

    def cleared(self) -> StatusT:
        """Every outcome field set to its default: the patch empties what an older run or a pod left."""
        defaults = {
            name: field.get_default(call_default_factory=True) for name, field in self.outcome.model_fields.items()
        }
        return self.status_type.model_validate(defaults)


# ---- what every kind's run is built from ----------------------------------------------------------------------


def owner_of(kind: Kind, body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(kind=kind.kind, plural=kind.plural, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def artifact_location(cfg: OperatorConfig, owner: Owner, run_hash: str) -> tuple[str, str]:
    """(path or URI the pod writes to, URI a user reads) for one run (`layout.run_folder`)."""
    rel = run_folder(owner, run_hash)
    if cfg.artifacts.uri:
        uri = f"{cfg.artifacts.uri.rstrip('/')}/{rel}"
        return uri, uri
    return f"{cfg.artifacts.mount_path}/{rel}", f"pvc://{cfg.artifacts.claim_name}/{rel}"


def model_path(cfg: OperatorConfig, model_name: str) -> str:
    return f"{cfg.model_cache_mount_path}/{cfg.model_dirs[model_name]}"


def build_run(
    kind: Kind,
    body: Mapping[str, Any],
    work: StepSpec,
    cfg: OperatorConfig,
    scheduling: Scheduling | None,
    secrets: list[SecretEnv] | None = None,
    claims: list[str] | None = None,
) -> Run:
    """The Run of `work` for the object `body`: its RunSpec (named by its hash), placement and secrets."""
    owner = owner_of(kind, body)
    pool = scheduling.node_pool if scheduling else None
    if pool is not None and pool not in cfg.node_pools:  # a CPU step too: a spec naming a pool means one
        known = ", ".join(sorted(cfg.node_pools)) or "none"
        raise InvalidSpec(f"spec.scheduling.nodePool: {pool!r} is not a node pool of this operator (known: {known})")
    queue = (scheduling.queue_name if scheduling else None) or (
        cfg.default_queue_name if work.step in GPU_STEPS else None
    )
    priority = scheduling.priority_class_name if scheduling else None
    if queue and priority and len(priority) > LABEL_VALUE_MAX:  # Kueue reads it from a label: 63 characters at most
        raise InvalidSpec(
            f"spec.scheduling.priorityClassName: {priority!r} is {len(priority)} characters; with Kueue (queue "
            f"{queue}) it becomes the label {PRIORITY_LABEL}, whose value may hold {LABEL_VALUE_MAX} at most"
        )
    provisional = RunSpec(owner=owner, output_uri="", output_display_uri="", work=work)
    run_hash = provisional.content_hash()
    output, display = artifact_location(cfg, owner, run_hash)
    runspec = provisional.model_copy(update={"output_uri": output, "output_display_uri": display})
    secrets = list(secrets or [])
    return Run(
        runspec=runspec,
        step=work.step,
        run_hash=run_hash,
        owner_api_version=API_VERSION,
        gpus=scheduling.gpus if scheduling else 0,
        node_pool=scheduling.node_pool if scheduling else None,
        queue_name=queue,
        priority_class=priority,
        secret_env=tuple(secrets),
        reference_claims=tuple(claims or ()),
        generation=body["metadata"].get("generation"),
    )


def with_provider_url(run: Run, provider: Literal["gemini", "openrouter", "none"], cfg: OperatorConfig) -> Run:
    """The run with the admin's endpoint override for a text provider (textProviderURLs), if any."""
    if provider == "none":
        return run
    endpoint = cfg.text_provider_urls.get(provider)
    return replace(run, extra_env={PROVIDER_URL_ENV[provider]: endpoint}) if endpoint else run
