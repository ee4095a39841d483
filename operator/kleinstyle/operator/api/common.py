"""Pieces shared by the four resources: references, secrets, scheduling, conditions, the common status.

These pydantic models are the single source of truth for the CRDs (`make crds`): every field's description becomes
`kubectl explain` text, bounds and enums become schema, `x-kubernetes-validations` carry cross-field rules. Fields
are snake_case in Python and camelCase in YAML (`wire_name`, their alias): models read either and write the wire name,
so a spec, a status or the operator's configuration is serialised once, by alias, at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict

GROUP = "kleinstyle.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Phase = Literal["Pending", "Waiting", "Running", "Succeeded", "Failed"]

NO_CROSS_NAMESPACE: JsonDict = {
    "rule": "!has(self.__namespace__)",
    "message": "cross-namespace references are not allowed: omit namespace (the referring object's namespace is used)",
    "fieldPath": ".namespace",
    "reason": "FieldValueForbidden",
}


# Acronyms Kubernetes spells in capitals inside a camelCase name (datasetURI, textProviderURLs, fetchAllowedCIDRs).
_ACRONYMS = {"uri": "URI", "urls": "URLs", "cidrs": "CIDRs"}


def wire_name(name: str) -> str:
    """The YAML name of a snake_case field: `dataset_uri` -> `datasetURI`, `board_ref` -> `boardRef`."""
    first, *rest = name.split("_")
    return first + "".join(_ACRONYMS.get(part, part[:1].upper() + part[1:]) for part in rest)


# Every model of the API and of the operator's configuration: snake_case in Python, camelCase on the wire.
WIRE = ConfigDict(alias_generator=wire_name, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


def field_errors(exc: ValidationError, prefix: str = "spec", skip: int = 0) -> list[str]:
    """A model's validation errors as lines naming the field, the way the API server does: `spec.training.rank:
    Input should be 16, 32, 64 or 128`. `skip` drops leading path parts (a tagged union's tag)."""
    return [
        f"{'.'.join([prefix, *(str(part) for part in error['loc'][skip:])]).lstrip('.')}: {error['msg']}"
        for error in exc.errors()
    ]


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry; `field_path` points kubectl's error at the offending field."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


class Model(BaseModel):
    """Base for spec models: unknown fields are an error, as with kubectl's strict field validation."""

    model_config = ConfigDict(extra="forbid", **WIRE)


class StatusModel(BaseModel):
    """Base for status models: lenient on read (an older operator's or a pod's extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore", **WIRE)


class ObjectReference(Model):
    """A reference to another kleinstyle object in the same namespace."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"x-kubernetes-validations": [NO_CROSS_NAMESPACE]},
    )

    name: str = Field(description="Name of the referenced object.", max_length=253, pattern=DNS1123_SUBDOMAIN)
    namespace: str | None = Field(
        default=None,
        description="Must be omitted: references stay within the referring object's namespace.",
        max_length=63,
    )


class SecretKeySelector(Model):
    """A key in a Secret of the same namespace; API keys reach pods only through secretKeyRef."""

    name: str = Field(description="Name of the Secret.", max_length=253, pattern=DNS1123_SUBDOMAIN)
    key: str = Field(description="Key within the Secret.", max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class ModelSelection(Model):
    """Which FLUX.2 [klein] base model to use, loaded from the operator's model cache (never a hub)."""

    name: Literal["klein-base-9b", "klein-base-4b"] = Field(
        default="klein-base-9b",
        description="Base model: klein-base-9b (FLUX.2 [klein] Base 9B, the tested default) or klein-base-4b.",
    )


class Scheduling(Model):
    """Where and how the Job runs on a shared cluster."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.queueName) || !has(self.priorityClassName) || size(self.priorityClassName) <= 63",
                    "with queueName, priorityClassName becomes the label kueue.x-k8s.io/priority-class, whose value "
                    "may hold 63 characters at most",
                    ".priorityClassName",
                )
            ]
        }
    )

    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue name; the Job is labelled kueue.x-k8s.io/queue-name and admitted by Kueue.",
        max_length=63,
        pattern=DNS1123_LABEL,
    )
    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass (Kueue WorkloadPriorityClass when queueName is set) for the Job.",
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
    )
    node_pool: str | None = Field(
        default=None,
        description="Named node pool from the operator's configuration; empty uses the operator's default GPU pool.",
        max_length=63,
        pattern=DNS1123_LABEL,
    )
    gpus: int = Field(default=1, ge=1, le=8, description="GPUs requested (nvidia.com/gpu) for GPU work.")


ArtifactPolicy = Literal["Retain", "Delete"]

ARTIFACT_POLICY_DESCRIPTION = (
    "What happens to the artifacts when the object is deleted: Retain (default) keeps them, "
    "Delete removes them with the object."
)


ConditionStatus = Literal["True", "False", "Unknown"]


# One condition type: as a reconcile decides it (`conditions.cond`) and as status holds it, with the time it last
# changed (`conditions.merge_conditions`). Its docstring is the CRD's description.
class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Condition type, e.g. Ready, DependenciesReady, ModelsReady, JobCreated, Warning.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail, naming the field or object concerned.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The generation this condition reflects.")


class QueueStatus(StatusModel):
    """Kueue's view of the current run, mirrored from the Workload of its Job."""

    workload: str = Field(description="The Workload Kueue keeps for the Job.")
    local_queue: str | None = Field(default=None, description="The LocalQueue the Job was submitted to.")
    cluster_queue: str | None = Field(default=None, description="The ClusterQueue that admitted it.")
    flavors: list[str] = Field(default_factory=list, description="ResourceFlavors assigned on admission.")
    state: Literal["Pending", "QuotaReserved", "Admitted", "Evicted", "Finished"] = Field(
        description="Pending (waiting for quota), QuotaReserved, Admitted, Evicted (requeued) or Finished."
    )
    reason: str | None = Field(default=None, description="Reason of the Workload condition behind the state.")
    message: str | None = Field(default=None, description="Kueue's own message, e.g. why there is no quota yet.")
    requeue_count: int = Field(
        default=0, description="Times Kueue evicted and requeued this run (preemption included)."
    )
    last_eviction_time: str | None = Field(default=None, description="When it was last evicted.")
    last_eviction_reason: str | None = Field(
        default=None, description="Why, e.g. 'Preempted (InClusterQueue): Preempted to accommodate a workload ...'."
    )


class RunInput(StatusModel):
    """A dependency's run that this run was built from."""

    kind: str = Field(description="StyleBoard, StyleLoRA or LoRAFusion.")
    name: str = Field(description="Its name.")
    run_hash: str = Field(description="Its run when this run was planned.")


class CommonStatus(StatusModel):
    """Status fields every kind has; the operator owns all of them except `progress`."""

    phase: Phase | None = Field(
        default=None,
        description="Pending (no Job yet), Waiting (for a dependency), Running, Succeeded or Failed.",
    )
    message: str | None = Field(default=None, description="One line on the current phase.")
    observed_generation: int | None = Field(default=None, description="The spec generation the status reflects.")
    run_hash: str | None = Field(default=None, description="Hash of the current run's RunSpec; names its Job.")
    job_name: str | None = Field(default=None, description="The Job of the current run.")
    artifact_uri: str | None = Field(default=None, description="Where the current run writes its artifacts.")
    start_time: str | None = Field(default=None, description="When the current run's pod started running.")
    completion_time: str | None = Field(default=None, description="When the current run's Job finished.")
    inputs: list[RunInput] = Field(
        default_factory=list,
        description="The dependencies' runs this run was built from; SourcesCurrent turns False when one changes.",
    )
    queue: QueueStatus | None = Field(
        default=None, description="Kueue's view of the current run (where Kueue manages its Job)."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions (Kubernetes style).")
    progress: dict[str, Any] | None = Field(
        default=None,
        description="Written by the run itself through the Kubernetes API (step, result); free-form.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    # The field a dependent run needs once this object has Succeeded (a dataset, a LoRA); None: nothing depends on
    # this kind. What the run reads is located from the run's records, never from this field (`kinds.base`).
    output_field: ClassVar[str | None] = None

    @classmethod
    def read(cls, data: object) -> Self:
        """What a status says, as far as it reads: a field that does not validate is left out, never an error.
        Status is output: anyone with rights on the status subresource may write anything there."""
        raw = dict(data) if isinstance(data, Mapping) else {}
        while True:
            try:
                return cls.model_validate(raw)
            except ValidationError as exc:
                bad = {str(error["loc"][0]) for error in exc.errors() if error["loc"]} & raw.keys()
                if not bad:
                    return cls()
                raw = {key: value for key, value in raw.items() if key not in bad}

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def output(self) -> object:
        """The value of `output_field` (None when there is none)."""
        return getattr(self, self.output_field) if self.output_field else None

    @classmethod
    def output_name(cls) -> str:
        """`output_field` as YAML spells it (datasetURI), for messages."""
        return cls.model_fields[cls.output_field].alias or "" if cls.output_field else ""
