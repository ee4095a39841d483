"""StyleLoRA: train a style LoRA on a StyleBoard's dataset."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from kleinstyle.contract.runspec import DEFAULT_LORA_FORMATS, LoraFormat
from pydantic import ConfigDict, Field, field_validator

from .common import (
    ARTIFACT_POLICY_DESCRIPTION,
    ArtifactPolicy,
    CommonStatus,
    Model,
    ModelSelection,
    ObjectReference,
    Scheduling,
    StatusModel,
    cel,
)

Variant = Literal["auto", "GEM+A", "GEM+B", "B_r128", "GEM+D"]

BlockName = Annotated[str, Field(pattern=r"^(double|single)_blocks\.[0-9]{1,2}$", max_length=20)]


class TrainingSettings(Model):
    """Explicit training settings. Each one set here overrides the policy; unset ones come from the policy."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.targetBlocks == 'custom' ? has(self.blocks) : !has(self.blocks)",
                    "blocks must be set exactly when targetBlocks is custom",
                    ".blocks",
                ),
            ]
        },
    )

    rank: Literal[16, 32, 64, 128] | None = Field(default=None, description="LoRA rank: 16, 32, 64 or 128.")
    alpha: int | None = Field(
        default=None, ge=1, le=256, description="LoRA alpha (the builtin backend; ai-toolkit uses alpha = rank)."
    )
    optimizer: Literal["adafactor", "adamw8bit", "adamw"] | None = Field(
        default=None, description="Optimizer: adafactor (policy default), adamw8bit or adamw."
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=0.01, description="Learning rate, greater than 0 and at most 0.01 (policy: 1e-4)."
    )
    weight_decay: float | None = Field(default=None, ge=0, le=1, description="Weight decay (policy: 1e-4).")
    steps: int | None = Field(
        default=None, ge=100, le=10000, description="Training steps, 100 to 10000; unset uses the policy's formula."
    )
    caption_dropout: float | None = Field(
        default=None, ge=0, le=1, description="Probability, 0 to 1, of dropping a whole caption (policy: 0.05)."
    )
    resolution: int | None = Field(
        default=None, ge=256, le=2048, multiple_of=64, description="Training resolution in pixels (policy: 1024)."
    )
    scheduler: Literal["cosine", "constant", "linear"] | None = Field(
        default=None, description="Learning-rate schedule (policy: cosine)."
    )
    target_blocks: Literal["all", "single", "double", "custom"] = Field(
        default="all",
        description="Which transformer blocks get LoRA layers: all, single (single-stream, style-leaning), "
        "double, or custom (list them in blocks).",
    )
    blocks: list[BlockName] | None = Field(
        default=None,
        description="With targetBlocks custom: block names such as single_blocks.4 or double_blocks.7.",
        min_length=1,
        max_length=32,
    )
    checkpoint_every: int | None = Field(
        default=None, ge=50, le=5000, description="Steps between checkpoints (each one is evaluated)."
    )
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Random seed for a reproducible run.")
    fp8_base: bool | None = Field(
        default=None,
        description="Keep the frozen base weights in float8 (Hopper GPUs: about half the weight memory, fp8 matmuls); "
        "ai-toolkit: its quantize option. Unset: bf16, as the reference runs trained.",
    )
    timestep_bias: Literal["balanced", "style", "content"] | None = Field(
        default=None,
        description="Which noise levels training favours, as ai-toolkit's content_or_style: balanced (policy), style "
        "(low noise: texture, brushwork, colour detail; ai-toolkit's 'Low Noise') or content (high noise: layout "
        "and composition; 'High Noise').",
    )
    noise_offset: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="ai-toolkit's noise_offset, 0 to 1: a random per-channel offset added to the noise, so the LoRA "
        "can move overall brightness and colour (very dark or light styles; small values such as 0.05). Policy: 0.",
    )
    flip_horizontal: bool | None = Field(
        default=None,
        description="Also train on the mirror image of every reference (ai-toolkit's flip_x; each epoch twice as "
        "long). Policy: off, since mirrored text and handedness would be learned as the style.",
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the LoRA weights with this decay, between 0 and 1 "
        "(ai-toolkit's ema_config: its default 0.999, its UI's 0.99); checkpoints and the published LoRA hold the "
        "average. Unset: no EMA.",
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in the backward pass: less GPU memory, slower steps. Unset: the "
        "backend's default (builtin off, ai-toolkit on).",
    )


class EarlyStopping(Model):
    """Stop at the best checkpoint instead of the last one."""

    enabled: bool = Field(default=True, description="Evaluate checkpoints and stop when they stop improving.")
    patience: int = Field(
        default=2, ge=1, le=20, description="Evaluations in a row clearly below the best before stopping."
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, le=10000, description="No stop before this step; unset: a third of the planned steps."
    )


class LoRAOutput(Model):
    """How the trained LoRA is published."""

    lora_formats: list[LoraFormat] = Field(
        default=list(DEFAULT_LORA_FORMATS),
        min_length=1,
        max_length=2,
        description="Key names of the published LoRA file(s): diffusers (transformer.*, diffusers and ComfyUI load "
        "it) or bfl (diffusion_model.*, as ai-toolkit writes and ComfyUI's checkpoints name the weights; ComfyUI, "
        "ai-toolkit and other BFL-based tools). The first is status.loraURI (lora.safetensors), the file "
        "GenerationJobs and LoRAFusions use (they read both); a second is published beside it "
        "(lora.FORMAT.safetensors), listed with the first in status.loraFiles.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @field_validator("lora_formats")
    @classmethod
    def _once_each(cls, formats: list[LoraFormat]) -> list[LoraFormat]:
        if len(set(formats)) != len(formats):  # the API server refuses it too (a list of type set)
            raise ValueError(f"each format at most once: {formats}")
        return formats


class StyleLoRASpec(Model):
    """A style LoRA trained on a StyleBoard's dataset."""

    board_ref: ObjectReference = Field(description="The StyleBoard whose dataset is used; it must become Ready.")
    variant: Variant = Field(
        default="auto",
        description="Training recipe: auto picks from the dataset size (the reference matrix); GEM+A (rank 32, "
        "adafactor), GEM+B (rank 128, adamw8bit), B_r128 (rank 128, no text pipeline), GEM+D (small datasets).",
    )
    training: TrainingSettings | None = Field(default=None, description="Explicit settings overriding the variant.")
    mode: Literal["standard", "two-step"] = Field(
        default="standard",
        description="standard, or two-step (a content LoRA first, then the style LoRA on top: ConsisLoRA).",
    )
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping, description="Early stopping.")
    backend: Literal["auto", "ai-toolkit", "builtin"] = Field(
        default="auto", description="Trainer: ai-toolkit, builtin (diffusers + peft), or auto (operator's default)."
    )
    model: ModelSelection = Field(default_factory=ModelSelection, description="Base model.")
    scheduling: Scheduling = Field(default_factory=Scheduling, description="Queue, priority and node pool.")
    artifact_policy: ArtifactPolicy = Field(default="Retain", description=ARTIFACT_POLICY_DESCRIPTION)
    output: LoRAOutput = Field(default_factory=LoRAOutput, description="How the LoRA is published: its formats.")


class Checkpoint(StatusModel):
    step: int = Field(description="Training step of the checkpoint.")
    validation_loss: float | None = Field(
        default=None, description="Flow-matching loss on the references held out of training (fixed noise)."
    )
    uri: str = Field(description="Where the checkpoint is.")
    score: float | None = Field(
        default=None,
        description="Evaluation score J: probe style minus adherence and leakage penalties (higher is better).",
    )
    ineligible: str | None = Field(default=None, description="Why the early-stopping guards rule it out, if they do.")
    loss: float | None = Field(default=None, description="Training loss at the checkpoint.")


class LoraFile(StatusModel):
    format: LoraFormat = Field(description="Its key names: diffusers (transformer.*) or bfl (diffusion_model.*).")
    uri: str = Field(description="Where the file is.")


class ScoreProxy(StatusModel):
    score: Literal["style", "adherence", "leakage"] = Field(description="The score measured by a stand-in.")
    measured_by: str = Field(description="What measured it instead of its model, and why the model is missing.")


class StyleLoRAOutcome(StatusModel):
    """What the current run reports: rewritten from its progress and result on every reconcile, emptied otherwise."""

    step: int | None = Field(default=None, description="Current training step.")
    stop_request: str | None = Field(
        default=None,
        description="Output only: the stop the kleinstyle.dev/stop annotation asks of the current run (its reason), "
        'as the operator read it. To stop a run, annotate the StyleLoRA with kleinstyle.dev/stop="RUNHASH: '
        'reason"; nothing reads this field.',
    )
    progress_text: str | None = Field(default=None, description="step/total and percent, for kubectl get.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eta: str | None = Field(default=None, description="Estimated time left.")
    checkpoints: list[Checkpoint] = Field(default_factory=list, description="Checkpoints with their scores.")
    best_checkpoint: int | None = Field(
        default=None,
        description="Step of the best checkpoint: the earliest within one standard error of the top score and "
        "above the base model's; 0 when the base model beats every checkpoint (then no LoRA is published).",
    )
    base_score: float | None = Field(default=None, description="The base model's score J (step 0), the bar to beat.")
    checkpoint_gallery_uri: str | None = Field(
        default=None,
        description="A contact sheet of every evaluated step's probe renders, the base model first, titled with "
        "their scores: why a checkpoint won.",
    )
    early_stopping: str | None = Field(default=None, description="The early-stopping policy's latest verdict.")
    score_proxies: list[ScoreProxy] | None = Field(
        default=None,
        description="Scores measured by a stand-in because their model is missing. Set: the checkpoints' scores are "
        "proxies, and the run neither stops early nor picks a checkpoint on them.",
    )
    lora_step: int | None = Field(default=None, description="The step of the checkpoint that became the LoRA.")
    lora_uri: str | None = Field(default=None, description="The trained LoRA (the best checkpoint).")
    lora_files: list[LoraFile] | None = Field(
        default=None,
        description="Every published LoRA file, in the order of spec.output.loraFormats: the first is loraURI.",
    )
    stop_reason: str | None = Field(default=None, description="Why training ended.")


class ContentStage(StatusModel):
    """Two-step mode: the content LoRA trained first."""

    rank: int | None = Field(default=None, description="Its LoRA rank.")
    steps: int | None = Field(default=None, description="Its training steps.")


class PlanSummary(StatusModel):
    """Key values of the training plan and where they came from (each optional: read leniently, written whole)."""

    variant: str | None = Field(default=None, description="The recipe the plan follows: GEM+A, GEM+B, B_r128 or GEM+D.")
    variant_reason: str | None = Field(
        default=None, description="Why that recipe (the dataset-size matrix, or the spec)."
    )
    rank: int | None = Field(default=None, description="LoRA rank.")
    alpha: int | None = Field(default=None, description="LoRA alpha.")
    optimizer: str | None = Field(default=None, description="Optimizer.")
    learning_rate: float | None = Field(default=None, description="Learning rate.")
    steps: int | None = Field(default=None, description="Training steps.")
    steps_reason: str | None = Field(
        default=None, description="Why that many steps (the policy's formula, a cap, or the spec)."
    )
    checkpoint_every: int | None = Field(default=None, description="Steps between checkpoints.")
    caption_dropout: float | None = Field(default=None, description="Probability of dropping a whole caption.")
    resolution: int | None = Field(default=None, description="Training resolution in pixels.")
    target_blocks: str | None = Field(default=None, description="Which transformer blocks get LoRA layers.")
    early_stopping: bool | None = Field(
        default=None, description="Whether checkpoints are evaluated and training stops at the best."
    )
    mode: str | None = Field(default=None, description="standard, or two-step (a content LoRA first).")
    content_stage: ContentStage | None = Field(default=None, description="Two-step mode: the content stage.")
    text_pipeline: bool | None = Field(
        default=None, description="Whether generation reformulates prompts with the style profile."
    )
    from_spec: list[str] = Field(default_factory=list, description="The settings the spec set (the rest: policy).")
    hash: str | None = Field(default=None, description="Hash of the whole plan.")


class StyleLoRAPlanned(StatusModel):
    """Known as soon as the run is planned, before any Job runs."""

    total_steps: int | None = Field(default=None, description="Planned training steps.")
    trigger_word: str | None = Field(
        default=None, description="The trigger word the LoRA is trained with; GenerationJobs put it in prompts."
    )
    style_profile: dict[str, Any] | None = Field(
        default=None,
        description="The board's L1 STYLE_PROFILE this LoRA was trained with; GenerationJobs reformulate with it.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    plan: PlanSummary | None = Field(
        default=None, description="Key values of the training plan and where each came from (policy or spec)."
    )


class StyleLoRAStatus(StyleLoRAOutcome, StyleLoRAPlanned, CommonStatus):
    """Observed state of a StyleLoRA."""

    output_field = "lora_uri"
