"""The interface every kind implements, and what their runs share: dependencies, artifact locations, the Run.

A kind's module answers five questions, each a pure function of (spec, dependencies, operator config) or of what
its run reported: what it waits for, what it runs (a RunSpec, as a `Run`), what status says before its Job starts,
while it runs, and once it has finished. `reconcile` asks them in that order and owns everything else (children,
phases, conditions, events). The RunSpec's hash names the run, so everything that changes what a run computes (the
spec, a dependency's output) starts a new run, and nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from kleinstyle.contract.layout import run_folder
from kleinstyle.contract.pod import ARTIFACT_CREDENTIAL_ENV, PROVIDER_URL_ENV, Step
from kleinstyle.contract.reports import StepProgress, StepResult
from kleinstyle.contract.runspec import Owner, RunSpec, StepSpec
from pydantic import BaseModel

from ..api import Kind
from ..api.common import API_VERSION, Scheduling
from ..children import GPU_STEPS, Run, SecretEnv
from ..config import OperatorConfig

Dependencies = Mapping[tuple[str, str], Mapping[str, Any] | None]
Fields = dict[str, Any]


@dataclass(frozen=True)
class Dependency:
    kind: str
    name: str
    # The status field that must be set once the dependency has Succeeded.
    output: str


class NotReady(Exception):
    """A dependency is missing or not Succeeded; the owner waits (a condition, not an error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_dependencies(deps: list[Dependency], observed: Dependencies) -> None:
    """Raise NotReady naming the first dependency that is missing or has not Succeeded."""
    for dep in deps:
        obj = observed.get((dep.kind, dep.name))
        if obj is None:
            raise NotReady(f"{dep.kind}NotFound", f"{dep.kind} {dep.name} does not exist in this namespace")
        status = obj.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase == "Failed":
            raise NotReady(f"{dep.kind}Failed", f"{dep.kind} {dep.name} failed: {status.get('message', '')}".strip())
        current = status.get("observedGeneration") == (obj.get("metadata") or {}).get("generation")
        if phase != "Succeeded" or not current:
            raise NotReady(f"{dep.kind}NotReady", f"waiting for {dep.kind} {dep.name} (now {phase})")
        if not status.get(dep.output):  # finished without what is needed of it (a LoRA the base model beat)
            warning = next((c for c in status.get("conditions") or [] if c.get("type") == "Warning"), {})
            why = warning.get("message") if warning.get("status") == "True" else status.get("message") or ""
            raise NotReady(
                f"{dep.kind}Without{dep.output[0].upper()}{dep.output[1:]}",
                f"{dep.kind} {dep.name} succeeded without a {dep.output}: {why}".strip(),
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


def inputs(deps: list[Dependency], observed: Dependencies) -> list[dict[str, str]]:
    """What a run is built from: each dependency's kind, name and run (its runHash), for `status.inputs`."""
    return [
        {
            "kind": dep.kind,
            "name": dep.name,
            "runHash": str(((observed.get((dep.kind, dep.name)) or {}).get("status") or {}).get("runHash") or ""),
        }
        for dep in deps
    ]


def changed_inputs(recorded: Any, observed: Dependencies) -> list[str]:
    """Which of the inputs a finished run recorded have changed since: retrained, re-prepared or deleted."""
    changed = []
    for item in recorded if isinstance(recorded, list) else []:
        obj = observed.get((item.get("kind"), item.get("name")))
        if obj is None:
            changed.append(f"{item.get('kind')} {item.get('name')} was deleted")
            continue
        now = (obj.get("status") or {}).get("runHash") or ""
        if now != item.get("runHash"):
            changed.append(
                f"{item.get('kind')} {item.get('name')} has a new run ({item.get('runHash')} -> {now or 'none yet'})"
            )
    return changed


def status_fields(model: BaseModel) -> Fields:
    """The fields a kind set on one of its status models, as the status patch writes them."""
    return model.model_dump(mode="json", exclude_unset=True)


class KindRuns:
    """How one kind runs. Subclasses set the class attributes and implement `dependencies` and `build`; the status
    hooks default to "nothing to say"."""

    kind: ClassVar[Kind]
    step: ClassVar[Step]
    # The status fields a run's progress and result fill: rewritten on every reconcile from the current run, and
    # emptied (to this model's defaults) when there is none, so a value an older run or a pod left never stands.
    outcome: ClassVar[type[BaseModel]]
    # Fields reset only when a new run starts (a request the user made of the run before).
    new_run_fields: ClassVar[Fields] = {}

    def dependencies(self, spec: Any) -> list[Dependency]:
        return []

    def build(self, body: Mapping[str, Any], spec: Any, deps: Dependencies, cfg: OperatorConfig) -> Run:
        raise NotImplementedError

    def planned(self, run: Run) -> tuple[Fields, list[str]]:
        """Status fields (and warnings) known as soon as the run is planned, before any Job runs."""
        return {}, []

    def live(self, progress: StepProgress, run: Run) -> Fields:
        """Status fields from the running run's progress (step, ETA, images done); a result overrides them."""
        return {}

    def result(self, result: StepResult, run: Run) -> Fields:
        """Status fields from the finished run's result: counts and reasons from the pod, locations from the
        RunSpec, never from the pod."""
        return {}

    def cleared(self) -> Fields:
        return {name: field.get_default(call_default_factory=True) for name, field in self.outcome.model_fields.items()}


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
    return f"{cfg.artifacts.mountPath}/{rel}", f"pvc://{cfg.artifacts.claimName}/{rel}"


def pod_path(cfg: OperatorConfig, display_uri: str) -> str:
    """Map an artifact URI from status (pvc://CLAIM/...) back to where a pod sees it."""
    prefix = f"pvc://{cfg.artifacts.claimName}/"
    if display_uri.startswith(prefix):
        return f"{cfg.artifacts.mountPath}/{display_uri[len(prefix) :]}"
    return display_uri


def model_path(cfg: OperatorConfig, model_name: str) -> str:
    return f"{cfg.modelCacheMountPath}/{cfg.modelDirs[model_name]}"


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
    provisional = RunSpec(owner=owner, output_uri="", output_display_uri="", work=work)
    run_hash = provisional.content_hash()
    output, display = artifact_location(cfg, owner, run_hash)
    runspec = provisional.model_copy(update={"output_uri": output, "output_display_uri": display})
    secrets = list(secrets or [])
    if cfg.artifacts.uri and cfg.artifacts.credentialsSecret:
        secrets += [
            SecretEnv(env, cfg.artifacts.credentialsSecret, env, optional=True) for env in ARTIFACT_CREDENTIAL_ENV
        ]
    return Run(
        runspec=runspec,
        step=work.step,
        run_hash=run_hash,
        owner_api_version=API_VERSION,
        gpus=scheduling.gpus if scheduling else 0,
        node_pool=scheduling.nodePool if scheduling else None,
        queue_name=(scheduling.queueName if scheduling else None)
        or (cfg.defaultQueueName if work.step in GPU_STEPS else None),
        priority_class=scheduling.priorityClassName if scheduling else None,
        secret_env=tuple(secrets),
        reference_claims=tuple(claims or ()),
    )


def with_provider_url(run: Run, provider: str, cfg: OperatorConfig) -> Run:
    """The run with the admin's endpoint override for a text provider (textProviderURLs), if any."""
    endpoint = cfg.textProviderURLs.get(provider)  # type: ignore[call-overload]
    return replace(run, extra_env={PROVIDER_URL_ENV[provider]: endpoint}) if endpoint else run
