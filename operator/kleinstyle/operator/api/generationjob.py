"""GenerationJob: render prompts in the style of one or more LoRAs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

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
    StatusModel,
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
    api_key_secret: SecretKeySelector | None = Field(
        default=None,
        description="Secret key holding the provider's API key (an env var in the pod, never logged). Without it "
        "prompts are used raw, with the trigger words, and a Warning condition says so.",
    )


class GenerationJobSpec(Model):
    """Prompts to render with FLUX.2 [klein] and the given LoRAs."""

    model_config = ConfigDict(
        extra="forbid",
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
    negative_prompt: str = Field(default="", max_length=4000, description="Negative prompt for real CFG.")
    text_pipeline: Literal["auto", "on", "off"] = Field(
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
    artifact_policy: ArtifactPolicy = Field(default="Retain", description=ARTIFACT_POLICY_DESCRIPTION)

    @model_validator(mode="after")
    def _last_seed_fits(self) -> GenerationJobSpec:
        """The CRD's CEL rule, again for a spec that reached the operator without it (an older CRD): refused as an
        invalid spec rather than rendered with seeds the renderer cannot take."""
        if self.seed + self.count - 1 > MAX_SEED:
            raise ValueError(LAST_SEED_RULE)
        return self


class GeneratedImage(StatusModel):
    uri: str = Field(description="Where the PNG is (its text chunks and a .json beside it hold the full record).")
    prompt_index: int = Field(description="Which prompt (1-based; see prompts for the text actually rendered).")
    seed: int = Field(description="Seed of this image.")
    seconds: float | None = Field(default=None, description="Render time (empty: rendered by an earlier pod).")


class GeneratedPrompt(StatusModel):
    index: int = Field(description="Position in spec.prompts, 1-based.")
    prompt_used: str = Field(description="The prompt actually rendered: reformulated, or with the trigger words.")
    reformulated: bool = Field(description="Whether the text pipeline reformulated it.")


class RenderSettings(StatusModel):
    """What the run renders, after the text-pipeline policy and the operator's generationLimits."""

    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    steps: int = Field(description="Inference steps.")
    guidance: float = Field(description="CFG guidance scale.")
    text_pipeline: Literal["on", "off"] = Field(description="Whether prompts are reformulated.")
    text_pipeline_reason: str = Field(description="Why (the spec, or the LoRAs' training plans under auto).")
    trigger_words: list[str] = Field(default_factory=list, description="Trigger words put in front of prompts.")


class GenerationJobOutcome(StatusModel):
    """What the current run reports: rewritten from its progress and result on every reconcile, emptied otherwise."""

    images_done: int | None = Field(default=None, description="Images rendered so far.")
    progress_text: str | None = Field(default=None, description="done/total images, for kubectl get.")
    images: list[GeneratedImage] = Field(
        default_factory=list,
        description="Rendered images, in prompt-seed order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uri"]},
    )
    prompts: list[GeneratedPrompt] = Field(default_factory=list, description="The prompt each image rendered with.")
    contact_sheet_uri: str | None = Field(default=None, description="A labelled grid of all images.")


class GenerationJobPlanned(StatusModel):
    """Known as soon as the run is planned, before any Job runs."""

    images_total: int | None = Field(default=None, description="Images to render (prompts x count).")
    render: RenderSettings | None = Field(default=None, description="What the run renders, and why.")


class GenerationJobStatus(GenerationJobOutcome, GenerationJobPlanned, CommonStatus):
    """Observed state of a GenerationJob."""
