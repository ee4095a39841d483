"""GenerationJob: render prompts in the style of one or more LoRAs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .common import (
    ARTIFACT_POLICY_DESCRIPTION,
    DNS1123_SUBDOMAIN,
    NO_CROSS_NAMESPACE,
    ArtifactPolicy,
    CommonStatus,
    Model,
    ModelSelection,
    Scheduling,
    SecretKeySelector,
    cel,
)

Prompt = Annotated[str, Field(min_length=1, max_length=4000)]

MAX_SEED = 2**32 - 1
# Image i renders with seed + i, so the last seed, not only the first, must fit the renderer's 32-bit generator.
LAST_SEED_RULE = f"spec.seed + spec.count - 1 must be at most {MAX_SEED}: image i of a prompt renders with seed + i"


class LoRAReference(Model):
    """A trained (StyleLoRA) or fused (LoRAFusion) LoRA in this namespace, with its weight."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"x-kubernetes-validations": [NO_CROSS_NAMESPACE]})

    kind: Literal["StyleLoRA", "LoRAFusion"] = Field(default="StyleLoRA", description="StyleLoRA or LoRAFusion.")
    name: str = Field(description="Name of the referenced object.", max_length=253, pattern=DNS1123_SUBDOMAIN)
    namespace: str | None = Field(
        default=None,
        description="Must be omitted: references stay within the referring object's namespace.",
        max_length=63,
    )
    weight: float = Field(default=1.0, ge=-2, le=2, description="LoRA scale, -2 to 2 (1.0 = as trained).")


class Reformulation(Model):
    """Where the L2 prompt reformulation runs when the text pipeline is on (it needs the provider's API key)."""

    provider: Literal["gemini", "openrouter"] = Field(
        default="gemini", description="gemini (Google Gemini API) or openrouter (OpenAI-compatible API)."
    )
    model: str | None = Field(default=None, description="Model name; empty: the provider's default.", max_length=128)
    apiKeySecret: SecretKeySelector | None = Field(
        default=None,
        description="Secret key holding the provider's API key (an env var in the pod, never logged). Without it "
        "prompts are used raw, with the trigger words, and a Warning condition says so.",
    )


class GenerationJobSpec(Model):
    """Prompts to render with FLUX.2 [klein] and the given LoRAs."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "x-kubernetes-validations": [cel(f"self.seed + self.count - 1 <= {MAX_SEED}", LAST_SEED_RULE, ".seed")]
        },
    )

    loras: list[LoRAReference] = Field(
        description="LoRAs to apply, 1 to 8; each must be Succeeded first, and named once.",
        min_length=1,
        max_length=8,
        # server-side apply merges the list by (kind, name)
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["kind", "name"]},
    )
    prompts: list[Prompt] = Field(description="Prompts to render, 1 to 64.", min_length=1, max_length=64)
    negativePrompt: str = Field(default="", max_length=4000, description="Negative prompt for real CFG.")
    textPipeline: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Gemini prompt reformulation: auto (policy: off for boards of 1-3 images), on, or off. "
        "Off, prompts are used as written with the LoRAs' trigger words in front.",
    )
    reformulation: Reformulation = Field(
        default_factory=Reformulation, description="Provider and API key of the prompt reformulation."
    )
    width: int = Field(default=2048, ge=256, le=2048, multiple_of=16, description="Width: 256-2048, multiple of 16.")
    height: int = Field(default=2048, ge=256, le=2048, multiple_of=16, description="Height: 256-2048, multiple of 16.")
    steps: int = Field(default=50, ge=1, le=200, description="Inference steps, 1 to 200 (Base models: 50).")
    guidance: float = Field(default=4.0, ge=0, le=30, description="CFG guidance scale (Base models: 4.0).")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed + i.")
    count: int = Field(default=1, ge=1, le=16, description="Images per prompt, 1 to 16.")
    model: ModelSelection = Field(default_factory=ModelSelection, description="Base model.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Queue, priority and node pool.")
    artifactPolicy: ArtifactPolicy = Field(default="Retain", description=ARTIFACT_POLICY_DESCRIPTION)

    @model_validator(mode="after")
    def _last_seed_fits(self) -> GenerationJobSpec:
        """The CRD's CEL rule, again for a spec that reached the operator without it (an older CRD): refused as an
        invalid spec rather than rendered with seeds the renderer cannot take."""
        if self.seed + self.count - 1 > MAX_SEED:
            raise ValueError(LAST_SEED_RULE)
        return self


class GeneratedImage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    uri: str = Field(description="Where the PNG is (its text chunks and a .json beside it hold the full record).")
    promptIndex: int = Field(description="Which prompt (1-based; see prompts for the text actually rendered).")
    seed: int = Field(description="Seed of this image.")
    seconds: float | None = Field(default=None, description="Render time (empty: rendered by an earlier pod).")


class GeneratedPrompt(BaseModel):
    model_config = ConfigDict(extra="ignore")

    index: int = Field(description="Position in spec.prompts, 1-based.")
    promptUsed: str = Field(description="The prompt actually rendered: reformulated, or with the trigger words.")
    reformulated: bool = Field(description="Whether the text pipeline reformulated it.")


class RenderSettings(BaseModel):
    """What the run renders, after the text-pipeline policy and the operator's generationLimits."""

    model_config = ConfigDict(extra="ignore")

    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    steps: int = Field(description="Inference steps.")
    guidance: float = Field(description="CFG guidance scale.")
    textPipeline: Literal["on", "off"] = Field(description="Whether prompts are reformulated.")
    textPipelineReason: str = Field(description="Why (the spec, or the LoRAs' training plans under auto).")
    triggerWords: list[str] = Field(default_factory=list, description="Trigger words put in front of prompts.")


class GenerationJobOutcome(BaseModel):
    """What the current run reports: rewritten from its progress and result on every reconcile, emptied otherwise."""

    imagesDone: int | None = Field(default=None, description="Images rendered so far.")
    progressText: str | None = Field(default=None, description="done/total images, for kubectl get.")
    images: list[GeneratedImage] = Field(
        default_factory=list,
        description="Rendered images, in prompt-seed order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uri"]},
    )
    prompts: list[GeneratedPrompt] = Field(default_factory=list, description="The prompt each image rendered with.")
    contactSheetURI: str | None = Field(default=None, description="A labelled grid of all images.")


class GenerationJobPlanned(BaseModel):
    """Known as soon as the run is planned, before any Job runs."""

    imagesTotal: int | None = Field(default=None, description="Images to render (prompts x count).")
    render: RenderSettings | None = Field(default=None, description="What the run renders, and why.")


class GenerationJobStatus(GenerationJobOutcome, GenerationJobPlanned, CommonStatus):
    """Observed state of a GenerationJob."""
