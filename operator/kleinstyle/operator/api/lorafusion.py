"""LoRAFusion: fuse several LoRAs into one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from .common import ARTIFACT_POLICY_DESCRIPTION, ArtifactPolicy, CommonStatus, Model, Scheduling, StatusModel, cel
from .generationjob import LoRAReference


class LoRAFusionSpec(Model):
    """Fuse 2-8 LoRAs, weighted, into one LoRA."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!(has(self.rank) && has(self.energy))", "set rank or energy, not both", ".energy"),
                cel(
                    "self.method != 'concat' || (!has(self.rank) && !has(self.energy))",
                    "concat keeps every rank exactly: rank and energy apply to svd and klora only",
                    ".method",
                ),
                cel("!has(self.selection) || self.method == 'klora'", "selection applies to klora only", ".selection"),
                cel(
                    "self.method != 'klora' || self.sources.all(s, !has(s.weight) || s.weight >= 0.0)",
                    "klora weights are priorities: they must not be negative",
                    ".sources",
                ),
            ]
        },
    )

    sources: list[LoRAReference] = Field(
        description="LoRAs to fuse, 2 to 8, with weights; each named once.",
        min_length=2,
        max_length=8,
        # server-side apply merges the list by (kind, name)
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["kind", "name"]},
    )
    method: Literal["concat", "svd", "klora"] = Field(
        default="svd",
        description="concat (exact, rank = sum of ranks), svd (exact low-rank truncation), klora (K-LoRA selection).",
    )
    rank: int | None = Field(default=None, ge=1, le=1024, description="Target rank for svd/klora.")
    energy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Alternative to rank: per layer, keep the smallest rank holding this fraction of the energy.",
    )
    selection: Literal["hard", "soft"] | None = Field(
        default=None,
        description=(
            "klora only: hard (default) gives each layer to the LoRA that stands out most there, at full strength; "
            "soft mixes the LoRAs in each layer by their share of the scores. Weights are priorities."
        ),
    )
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Queue, priority and node pool.")
    artifact_policy: ArtifactPolicy = Field(default="Retain", description=ARTIFACT_POLICY_DESCRIPTION)


class LoRAFusionOutcome(StatusModel):
    """What the current run reports: rewritten from its result on every reconcile, emptied otherwise."""

    lora_uri: str | None = Field(default=None, description="The fused LoRA.")
    rank: int | None = Field(default=None, description="Rank of the fused LoRA (the largest over its layers).")
    energy_kept: float | None = Field(
        default=None, description="Fraction of the fused update's energy (squared Frobenius norm) the LoRA keeps."
    )
    duration_seconds: float | None = Field(
        default=None, description="Time the fusion took, reading and writing included."
    )


class LoRAFusionPlanned(StatusModel):
    """What GenerationJobs read of the fused LoRA: known from its sources as soon as the run is planned."""

    trigger_words: list[str] = Field(
        default_factory=list, description="The sources' trigger words; GenerationJobs put them in prompts."
    )
    text_pipeline: bool | None = Field(
        default=None, description="Whether every source's training plan keeps the text pipeline (unset: unknown)."
    )
    style_profile: dict[str, Any] | None = Field(
        default=None,
        description="The first source's L1 STYLE_PROFILE; GenerationJobs reformulate with it.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class LoRAFusionStatus(LoRAFusionOutcome, LoRAFusionPlanned, CommonStatus):
    """Observed state of a LoRAFusion."""

    output_field = "lora_uri"
