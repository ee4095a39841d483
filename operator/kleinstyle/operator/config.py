"""The operator's configuration: what a cluster admin sets once (Helm values), never a tenant's spec.

Read from a YAML/JSON file named by KLEINSTYLE_OPERATOR_CONFIG (the chart mounts one), with defaults for an H200
node pool. Fetch limits and the private-network allow-list live here so a tenant cannot open internal addresses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from kleinstyle.contract.runspec import EvaluationSettings
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .api.common import WIRE

CONFIG_ENV = "KLEINSTYLE_OPERATOR_CONFIG"


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid", **WIRE)

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


class NodePool(BaseModel):
    """Placement of GPU Jobs: nodeSelector and tolerations (Kueue may overwrite both on admission)."""

    model_config = ConfigDict(extra="forbid", **WIRE)

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


H200_POOL = NodePool(
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"},
    tolerations=[Toleration(key="nvidia.com/gpu")],
)


class Resources(BaseModel):
    """A Job container's CPU and memory: requested, and its limits (memory: the request; CPU: `cpu_limit`, else the
    request, so that a namespace ResourceQuota on limits.cpu admits the pod)."""

    model_config = ConfigDict(extra="forbid", **WIRE)

    cpu: str
    memory: str
    cpu_limit: str | None = None

    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu_limit or self.cpu, "memory": self.memory}


class ArtifactStore(BaseModel):
    """Where runs write artifacts: a PVC mounted at mountPath (default) or an object-store URI."""

    model_config = ConfigDict(extra="forbid", **WIRE)

    claim_name: str = "kleinstyle-artifacts"
    mount_path: str = "/artifacts"
    # s3://bucket/prefix or gs://bucket/prefix; when set, runs write there instead of the PVC.
    uri: str | None = None
    credentials_secret: str | None = None


class TrainingLimits(BaseModel):
    """Caps the operator applies to every StyleLoRA's plan (a shared cluster, the demo); None: no cap."""

    model_config = ConfigDict(extra="forbid", **WIRE)

    max_steps: int | None = Field(default=None, ge=1)
    max_resolution: int | None = Field(default=None, ge=64)


class CheckpointEvaluation(EvaluationSettings):
    """How training runs score their checkpoints for early stopping (probes rendered per checkpoint); the probe size
    is never above the plan's training resolution."""

    model_config = ConfigDict(extra="forbid", frozen=False, **WIRE)

    # Model directories in the model cache, by name: by default the folders `kleinstyle models pull` fills
    # (docs/models.md). None, or a folder with no model in it: the score is a proxy (contract/proxies.py).
    # An image encoder (DINOv2, SigLIP vision) for leakage (likeness to the nearest training image).
    embedder_dir: str | None = "dinov2-base"
    # CSD (a CLIP ViT-L vision tower and csd_style_projection.safetensors) for style; proxy: colour and texture.
    style_embedder_dir: str | None = "CSD-ViT-L"
    # CLIP or SigLIP (text and vision towers) for adherence (render-prompt agreement); proxy: not measured.
    text_model_dir: str | None = "clip-vit-large-patch14"


class GenerationLimits(BaseModel):
    """Caps the operator applies to every GenerationJob (a shared cluster, the demo's CPU); None: no cap.

    A larger size is scaled down to maxSide on its longer side, keeping the aspect ratio (multiples of 16, at least
    64: the smallest side the runtime renders)."""

    model_config = ConfigDict(extra="forbid", **WIRE)

    max_side: int | None = Field(default=None, ge=64)
    max_steps: int | None = Field(default=None, ge=1)
    # Images one GenerationJob renders at the most (prompts x count, up to 1024 otherwise): fewer seeds per prompt
    # first, then the first prompts only.
    max_images: int | None = Field(default=None, ge=1)


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", **WIRE)

    runtime_image: str = "ghcr.io/kleinstyle/runtime:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    default_backend: str = "ai-toolkit"
    node_pools: dict[str, NodePool] = Field(default_factory=lambda: {"h200": H200_POOL})
    default_node_pool: str = "h200"
    artifacts: ArtifactStore = Field(default_factory=ArtifactStore)
    model_cache_claim: str = "kleinstyle-models"
    model_cache_mount_path: str = "/models"
    # Model directory names inside the model cache, per spec.model.name.
    model_dirs: dict[str, str] = Field(
        default_factory=lambda: {"klein-base-9b": "FLUX.2-klein-base-9B", "klein-base-4b": "FLUX.2-klein-base-4B"}
    )
    cpu_resources: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="4Gi"))
    gpu_resources: Resources = Field(default_factory=lambda: Resources(cpu="16", memory="120Gi"))
    backoff_limit: int = 2
    active_deadline_seconds: int = 6 * 3600
    # Watches wake a resource when something it depends on changes; this slow resync is only the safety net
    # (seconds between reconciles of an unfinished resource that nothing woke).
    resync_seconds: float = 300.0
    # CIDRs that prepare may fetch from although private (an internal mirror, say). Empty: none.
    fetch_allowed_cidrs: list[str] = Field(default_factory=list)
    fetch_max_bytes: int = 50 * 1024 * 1024
    fetch_max_pixels: int = 64 * 1024 * 1024
    run_as_user: int = 1000
    # Where the operator itself sees the artifact PVC (the chart mounts it read-write); needed only to honour
    # artifactPolicy: Delete. Unset: artifacts are always kept and a Warning event says so.
    artifacts_local_path: str | None = None
    # Mirror Kueue's Workloads into status when the cluster serves them (the chart's RBAC lets it read them).
    kueue_workloads: bool = True
    # The LocalQueue GPU Jobs go to when spec.scheduling.queueName is empty (e.g. "default"); unset: none. Kueue's own
    # default LocalQueue (a LocalQueue named "default" in the namespace) works without it.
    default_queue_name: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    # Port of the Prometheus metrics endpoint; 0 disables it.
    metrics_port: int = 8080
    # Caps on training plans (steps, resolution); recorded in each plan with the reason.
    training_limits: TrainingLimits = Field(default_factory=TrainingLimits)
    checkpoint_evaluation: CheckpointEvaluation = Field(default_factory=CheckpointEvaluation)
    # Endpoint overrides of the text providers (an egress proxy, a test server), per provider: gemini, openrouter.
    # Handed to the Jobs as KLEINSTYLE_GEMINI_BASE_URL / KLEINSTYLE_OPENROUTER_BASE_URL. Empty: the public APIs.
    text_provider_urls: dict[Literal["gemini", "openrouter"], str] = Field(default_factory=dict)
    # Caps on generation (size, steps); each cap applied is a warning in the GenerationJob's status.
    generation_limits: GenerationLimits = Field(default_factory=GenerationLimits)

    @model_validator(mode="after")
    def _default_pool_exists(self) -> OperatorConfig:
        """Refused at start, not as a KeyError on every GPU run: the default pool must be one of the pools."""
        if self.default_node_pool not in self.node_pools:
            known = ", ".join(sorted(self.node_pools)) or "none"
            raise ValueError(f"defaultNodePool {self.default_node_pool!r} is not one of nodePools ({known})")
        return self


def load_config(path: str | os.PathLike[str] | None = None) -> OperatorConfig:
    """The config from `path` or $KLEINSTYLE_OPERATOR_CONFIG; defaults when neither is given."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return OperatorConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return OperatorConfig.model_validate(data)
