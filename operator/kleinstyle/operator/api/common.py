"""Pieces shared by the four resources: references, secrets, scheduling, conditions, the common status.

These pydantic models are the single source of truth for the CRDs (`make crds`): every field's description becomes
`kubectl explain` text, bounds and enums become schema, `x-kubernetes-validations` carry cross-field rules.
"""

from __future__ import annotations

from typing import Any, Literal

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

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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

    queueName: str | None = Field(
        default=None,
        description="Kueue LocalQueue name; the Job is labelled kueue.x-k8s.io/queue-name and admitted by Kueue.",
        max_length=63,
        pattern=DNS1123_LABEL,
    )
    priorityClassName: str | None = Field(
        default=None,
        description="PriorityClass (Kueue WorkloadPriorityClass when queueName is set) for the Job.",
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
    )
    nodePool: str | None = Field(
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


class Condition(BaseModel):
    """A Kubernetes-style condition."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="Condition type, e.g. Ready, DependenciesReady, JobCreated, Warning.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail, naming the field or object concerned.")
    lastTransitionTime: str = Field(description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = Field(default=None, description="The generation this condition reflects.")


class QueueStatus(BaseModel):
    """Kueue's view of the current run, mirrored from the Workload of its Job."""

    workload: str = Field(description="The Workload Kueue keeps for the Job.")
    localQueue: str | None = Field(default=None, description="The LocalQueue the Job was submitted to.")
    clusterQueue: str | None = Field(default=None, description="The ClusterQueue that admitted it.")
    flavors: list[str] = Field(default_factory=list, description="ResourceFlavors assigned on admission.")
    state: Literal["Pending", "QuotaReserved", "Admitted", "Evicted", "Finished"] = Field(
        description="Pending (waiting for quota), QuotaReserved, Admitted, Evicted (requeued) or Finished."
    )
    reason: str | None = Field(default=None, description="Reason of the Workload condition behind the state.")
    message: str | None = Field(default=None, description="Kueue's own message, e.g. why there is no quota yet.")
    requeueCount: int = Field(default=0, description="Times Kueue evicted and requeued this run (preemption included).")
    lastEvictionTime: str | None = Field(default=None, description="When it was last evicted.")
    lastEvictionReason: str | None = Field(
        default=None, description="Why, e.g. 'Preempted (InClusterQueue): Preempted to accommodate a workload ...'."
    )


class RunInput(BaseModel):
    """A dependency's run that this run was built from."""

    kind: str = Field(description="StyleBoard, StyleLoRA or LoRAFusion.")
    name: str = Field(description="Its name.")
    runHash: str = Field(description="Its run when this run was planned.")


class CommonStatus(BaseModel):
    """Status fields every kind has; the operator owns all of them except `progress`."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(
        default=None,
        description="Pending (no Job yet), Waiting (for a dependency), Running, Succeeded or Failed.",
    )
    message: str | None = Field(default=None, description="One line on the current phase.")
    observedGeneration: int | None = Field(default=None, description="The spec generation the status reflects.")
    runHash: str | None = Field(default=None, description="Hash of the current run's RunSpec; names its Job.")
    jobName: str | None = Field(default=None, description="The Job of the current run.")
    artifactURI: str | None = Field(default=None, description="Where the current run writes its artifacts.")
    startTime: str | None = Field(default=None, description="When the current run's Job started.")
    completionTime: str | None = Field(default=None, description="When the current run's Job finished.")
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
