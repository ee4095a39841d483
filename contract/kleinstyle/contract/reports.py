"""What a run reports back: typed progress and results for every step, and the envelope they travel in.

A pod writes one `Report` into its owner's `status.progress` (a JSON merge patch; the Job's ServiceAccount may
patch nothing else of use), over and over while it runs and once more at the end. The runtime builds reports with
these models and the operator reads them with the same models: a report that does not validate is a Warning in
status, never a crash, and never a half-read result.

Reports travel as JSON merge patches, which drop every null: a field that may be None must have a default, or the
report would not read back (tests/runtime/test_report.py checks every model). The field names are the wire format
since v0.1 (progress in camelCase, results in snake_case) and kept as they were, so a pod of the previous
release still reports to a new operator; in Python every field is snake_case, and a camelCase wire name is its
alias (models read either, and write the wire name). Models ignore fields they do not know, for the
same reason the other way round. Nothing here is trusted for a location: the operator derives every URI it shows
from the RunSpec (docs/runspec.md), never from a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .style_profile import StyleProfile

State = Literal["Running", "Succeeded", "Failed"]
CaptionOrigin = Literal["given", "generated", "regenerated", "cleaned", "trigger-only"]


class _Reported(BaseModel):
    """Lenient on read (a newer pod may send more), typed on every field it knows."""

    model_config = ConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


# --- prepare (StyleBoard) ----------------------------------------------------------------------------------------


class AcceptedImage(_Reported):
    source: str
    file: str = Field(description="File name inside the dataset folder, e.g. 001.png; the caption is 001.txt.")
    width: int
    height: int
    sha256: str = Field(description="SHA-256 of the dataset PNG.")
    caption: str
    caption_origin: CaptionOrigin = "given"
    caption_note: str = ""
    style_words: list[str] = Field(default_factory=list, description="Style descriptors the caption check found.")


class Rejection(_Reported):
    source: str
    reason: str
    # A fetch failure may pass on a retry (a 503, a timeout); a bad or duplicate image never will.
    retryable: bool = False


class Duplicate(_Reported):
    """An image that repeats an earlier one: `exact` ones are rejected, `near` ones are kept."""

    kind: Literal["exact", "near"]
    source: str
    resembles: str = Field(description="Source of the earlier, accepted image it repeats.")
    resembles_file: str
    file: str | None = Field(default=None, description="Dataset file of this image; None when it was rejected.")
    distance: int = Field(description="Hamming distance of the 64-bit difference hashes; 0 for an exact copy.")


class TokenUsage(_Reported):
    """Tokens a step spent at its text provider: calls paid for, answers served from the cache, and the tokens of
    the paid calls."""

    provider: str
    model: str
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    by_purpose: dict[str, int] = Field(default_factory=dict, description="Total tokens per purpose (caption, ...).")


class PrepareResult(_Reported):
    """What prepare did; written as report.json beside the dataset and sent as the report's result."""

    succeeded: bool
    message: str
    accepted: list[AcceptedImage] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    duplicates: list[Duplicate] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    dataset_uri: str | None = None
    dataset_display_uri: str | None = None
    captioning: str = Field(default="", description="How the captions were obtained, in one line.")
    style_profile: StyleProfile | None = Field(default=None, description="The L1 STYLE_PROFILE.")
    style_profile_images: list[str] = Field(default_factory=list, description="Dataset files the profile saw.")
    style_profile_error: str | None = None
    token_usage: TokenUsage | None = None


# --- train (StyleLoRA) -------------------------------------------------------------------------------------------


class CheckpointReport(_Reported):
    step: int
    uri: str = ""  # shown as reported; the operator never reads a file from it
    loss: float | None = None


class ProbeScoresReport(_Reported):
    """One checkpoint's probe scores in a fixed probe order (`early_stop.ProbeScores`); null: not a number."""

    step: int
    style: list[float | None]
    adherence: list[float | None]
    leakage: list[float | None]
    validation_loss: float | None = None  # held-out flow-matching loss (None: no held-out references)


class EvaluationReport(_Reported):
    """The base model's scores (step 0) and each evaluated checkpoint's: what the early-stopping policy reads."""

    baseline: ProbeScoresReport
    checkpoints: list[ProbeScoresReport] = Field(default_factory=list)
    # Scores measured by a stand-in because their model is missing: score name (style, adherence, leakage) -> what
    # stood in and why. Non-empty: the scores are proxies, and the run does not stop early on them.
    proxies: dict[str, str] = Field(default_factory=dict)


class TrainProgress(_Reported):
    step: int = 0
    total_steps: int = Field(default=0, alias="totalSteps")
    loss: float | None = None
    lr: float | None = None
    seconds_per_step: float | None = Field(default=None, alias="secondsPerStep")
    eta_seconds: float | None = Field(default=None, alias="etaSeconds")
    checkpoints: list[CheckpointReport] = Field(default_factory=list)
    evaluation: EvaluationReport | None = None
    stage: Literal["content", "style"] | None = None  # two-step mode: the steps count per stage


class TrainResult(_Reported):
    lora_file: str | None = Field(
        default=None, description="Where the LoRA was published; None when nothing was (lora_step 0)."
    )
    steps: int = Field(description="Steps trained; the LoRA is the checkpoint of lora_step.")
    lora_step: int = Field(description="The step of the checkpoint that became the LoRA; 0: the base model won.")
    total_steps: int
    final_loss: float | None = None
    checkpoints: list[CheckpointReport] = Field(default_factory=list)
    stopped_early: bool = False
    stop_reason: str = "completed"
    best_checkpoint: int | None = None
    warnings: list[str] = Field(default_factory=list)
    evaluation: EvaluationReport | None = None


# --- generate (GenerationJob) ------------------------------------------------------------------------------------


class GenerateProgress(_Reported):
    images_done: int = Field(alias="imagesDone")
    images_total: int = Field(alias="imagesTotal")


class ImageTiming(_Reported):
    index: int = Field(description="1-based, in `GenerateSpec.image_files` order.")
    seconds: float | None = None
    reused: bool = False  # rendered by an earlier pod of this run


class GenerateResult(_Reported):
    images: list[ImageTiming] = Field(default_factory=list)
    prompts_used: list[str] = Field(default_factory=list, description="Per prompt, the text it rendered with.")
    reformulated: list[bool] = Field(default_factory=list, description="Per prompt, whether L2 reformulated it.")
    warnings: list[str] = Field(default_factory=list)
    seconds_total: float = 0.0


# --- fuse (LoRAFusion) -------------------------------------------------------------------------------------------


class FusedSource(_Reported):
    uri: str
    weight: float
    format: str
    rank: int


class FuseResult(_Reported):
    method: str
    selection: str | None = None  # klora only
    rank: int
    energy_kept: float = Field(description="Fraction of the fused update's squared Frobenius norm the LoRA keeps.")
    energy_kept_per_layer: dict[str, float] = Field(default_factory=dict, description="min, median and max.")
    layers: int
    base: str | None = None
    duration_seconds: float
    sources: list[FusedSource] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    lora_file: str = ""


# --- the envelope ------------------------------------------------------------------------------------------------


class _Envelope(_Reported):
    run_hash: str = Field(
        alias="runHash", description="The run this report is about (`RunSpec.run_id`); an older run's is ignored."
    )
    state: State
    message: str = ""


class PrepareReport(_Envelope):
    step: Literal["prepare"] = "prepare"
    progress: None = None
    result: PrepareResult | None = None


class TrainReport(_Envelope):
    step: Literal["train"] = "train"
    progress: TrainProgress | None = None
    result: TrainResult | None = None


class GenerateReport(_Envelope):
    step: Literal["generate"] = "generate"
    progress: GenerateProgress | None = None
    result: GenerateResult | None = None


class FuseReport(_Envelope):
    step: Literal["fuse"] = "fuse"
    progress: None = None
    result: FuseResult | None = None


Report = Annotated[PrepareReport | TrainReport | GenerateReport | FuseReport, Field(discriminator="step")]
StepResult = PrepareResult | TrainResult | GenerateResult | FuseResult
StepProgress = TrainProgress | GenerateProgress
REPORTS: dict[str, type[PrepareReport | TrainReport | GenerateReport | FuseReport]] = {
    "prepare": PrepareReport,
    "train": TrainReport,
    "generate": GenerateReport,
    "fuse": FuseReport,
}
_REPORT: TypeAdapter[Report] = TypeAdapter(Report)


def reported_run(data: object) -> str | None:
    """The run a report in `data` says it is about (its envelope's run id), without reading the rest of it."""
    run_id = data.get(_Envelope.model_fields["run_hash"].alias or "") if isinstance(data, Mapping) else None
    return run_id if isinstance(run_id, str) else None


def read_report(data: object) -> Report:
    """The report in a status' `progress`; raises pydantic's ValidationError (a ValueError) when it is malformed."""
    return _REPORT.validate_python(data)
