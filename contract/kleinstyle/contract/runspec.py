"""The RunSpec: the one JSON document a Job reads (docs/runspec.md).

The operator writes it into a ConfigMap; the runtime reads it from the mounted file (`pod.RUNSPEC_PATH`). The runtime
never reads a custom resource's spec. Its hash names the run: what changes it starts a new run, nothing else does.
Paths in a RunSpec are as the pod sees them (a volume mount such as /artifacts/...) or object-store URIs
(s3://, gs://).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .layout import RUN_ID_LENGTH, namespace_folder
from .plan import TrainingPlan

RUNSPEC_VERSION: Final = "kleinstyle.dev/runspec-v1"
# Schemes an input may have besides none (a pod path): object stores, and memory:// (fsspec's in-process store, the
# tests' stand-in for one). Never http(s), file:// or anything else fsspec would open.
STORE_SCHEMES = ("s3://", "gs://", "memory://")

# A published LoRA's key names (layout.LORA_FORMATS): diffusers' (`transformer.*`) or BFL's (`diffusion_model.*`).
LoraFormat = Literal["diffusers", "bfl"]
DEFAULT_LORA_FORMATS: Final[tuple[LoraFormat, ...]] = ("diffusers",)


class _Frozen(BaseModel):
    # Python names are snake_case; a camelCase wire name (apiVersion) is the field's alias, read and written.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


class Owner(_Frozen):
    """The custom resource a run belongs to; the runtime reports progress to it."""

    api_version: str = Field(default="kleinstyle.dev/v1alpha1", alias="apiVersion")
    kind: str
    plural: str
    namespace: str
    name: str
    uid: str


class ImageInput(_Frozen):
    """One reference image: an https/s3/gs URI or a path in the pod (a mounted volume)."""

    source: str
    caption: str | None = None
    # The source as the user wrote it (pvc://CLAIM/PATH for a mounted path), for reports and status.
    label: str | None = None

    @property
    def shown(self) -> str:
        return self.label or self.source


class FetchPolicy(_Frozen):
    """Limits on what `prepare` may download; set by the cluster admin in the operator's configuration."""

    allowed_cidrs: tuple[str, ...] = ()
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    timeout_s: float = 30.0


class PrepareSpec(_Frozen):
    step: Literal["prepare"] = "prepare"
    trigger_word: str
    images: tuple[ImageInput, ...]
    captioning_provider: Literal["gemini", "openrouter", "none"] = "none"
    captioning_model: str | None = None
    # "use": a caption written in the spec is used as written (checked for style words); "fallback": it is used
    # only where the provider cannot caption (no key, or no usable answer), the provider captions the rest.
    given_captions: Literal["use", "fallback"] = "use"
    min_short_side: int = 512
    max_images: int = 50
    # Near-duplicate threshold on a 64-bit difference hash (Hamming distance).
    near_duplicate_distance: int = 6
    fetch: FetchPolicy = FetchPolicy()


class LoraInput(_Frozen):
    uri: str
    weight: float = 1.0
    trigger_word: str | None = None
    # What the user calls it (StyleLoRA/bd9-lora), for metadata and contact sheets.
    label: str | None = None

    @property
    def shown(self) -> str:
        return self.label or self.uri


class EvaluationSettings(_Frozen):
    """How checkpoints are probed for early stopping: `prompts` probe prompts x `seeds` rendered per checkpoint at
    `size` px with `steps` steps and CFG `guidance` (kleinstyle.runtime.klein.evaluate). The bounds hold for the admin's
    configuration (`checkpointEvaluation`) and for every RunSpec alike."""

    prompts: int = Field(default=4, ge=1, le=4)
    seeds: int = Field(default=2, ge=1, le=8)
    size: int = Field(default=512, ge=32, le=1024, multiple_of=16)
    steps: int = Field(default=20, ge=1, le=100)
    guidance: float = Field(default=4.0, ge=1.0, le=20.0)


class EvaluationSpec(EvaluationSettings):
    """The settings, with the model directories the scores use (kleinstyle.runtime.klein.evaluate); None: the offline
    stand-in. `embedder_path`: an image encoder (DINOv2, SigLIP vision) for leakage; `style_embedder_path`: CSD for
    style; `text_model_path`: CLIP or SigLIP (text and vision towers) for adherence."""

    embedder_path: str | None = None
    style_embedder_path: str | None = None
    text_model_path: str | None = None


class TrainSpec(_Frozen):
    step: Literal["train"] = "train"
    dataset_uri: str
    trigger_word: str
    image_count: int
    backend: Literal["ai-toolkit", "builtin"]
    model: str = "klein-base-9b"
    model_path: str
    # Every training setting (and the mode: standard or two-step), with where it came from (kleinstyle.contract.plan).
    plan: TrainingPlan
    # How checkpoints are scored for early stopping; None when the plan turns early stopping off.
    evaluation: EvaluationSpec | None = None
    # The board's L1 STYLE_PROFILE (None without one): training ignores it; it travels with the LoRA (its sidecar and
    # the StyleLoRA's status) to the GenerationJobs that reformulate prompts for it.
    style_profile: dict[str, Any] | None = None
    # The formats the LoRA is published in (runtime.klein.lora_format): the first as layout.LORA_FILE, each other
    # beside it (layout.lora_files). Left out of the JSON at its default, so the hash of every RunSpec written before
    # the option existed is unchanged (tests/operator/test_runspec_hash.py).
    lora_formats: tuple[LoraFormat, ...] = Field(
        default=DEFAULT_LORA_FORMATS, min_length=1, max_length=2, exclude_if=lambda v: v == DEFAULT_LORA_FORMATS
    )

    @field_validator("lora_formats")
    @classmethod
    def _once_each(cls, formats: tuple[LoraFormat, ...]) -> tuple[LoraFormat, ...]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"each format at most once: {list(formats)}")
        return formats


class GenerateSpec(_Frozen):
    """Prompts x seeds rendered with klein and LoRAs. The operator resolves every policy (text pipeline, its limits)
    before the run; `warnings` carries what it decided that the user should know (a capped size, say)."""

    step: Literal["generate"] = "generate"
    model_path: str
    loras: tuple[LoraInput, ...]
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    # raw: the prompt with the LoRAs' trigger words in front; reformulate: the L2 reformulation in the style profile.
    prompt_mode: Literal["raw", "reformulate"] = "raw"
    prompt_mode_reason: str = ""
    trigger_words: tuple[str, ...] = ()
    # The L1 STYLE_PROFILE the L2 reformulation weaves in (docs/policy.md); None: none is known, so raw prompts are
    # used.
    style_profile: dict[str, Any] | None = None
    reformulation_provider: Literal["gemini", "openrouter"] = "gemini"
    reformulation_model: str | None = None
    width: int = 2048
    height: int = 2048
    steps: int = 50
    guidance: float = 4.0
    # Every prompt is rendered once per seed.
    seeds: tuple[int, ...] = (0,)
    warnings: tuple[str, ...] = ()

    def image_files(self) -> list[tuple[int, int, str]]:
        """(prompt index, seed, file name) of every image in render order: each prompt once per seed. The runtime
        writes `images/NAME.png` and `images/NAME.json`; the operator derives the image URIs from this, never
        from what a pod reports."""
        return [
            (p, seed, f"{p * len(self.seeds) + s + 1:03d}_p{p + 1:02d}_seed{seed}")
            for p in range(len(self.prompts))
            for s, seed in enumerate(self.seeds)
        ]


class FuseSpec(_Frozen):
    step: Literal["fuse"] = "fuse"
    sources: tuple[LoraInput, ...]
    method: Literal["concat", "svd", "klora"]
    rank: int | None = None
    energy: float | None = None
    selection: Literal["hard", "soft"] = "hard"  # klora only
    # What generation needs of the fused LoRA, from its sources (weight 0 excluded): their trigger words, whether
    # every source's plan keeps the text pipeline (None: unknown), and the first source's STYLE_PROFILE.
    trigger_words: tuple[str, ...] = ()
    text_pipeline: bool | None = None
    style_profile: dict[str, Any] | None = None


StepSpec = Annotated[PrepareSpec | TrainSpec | GenerateSpec | FuseSpec, Field(discriminator="step")]


class RunSpec(_Frozen):
    """Everything one run needs. Its hash names the run's Job, so it holds no timestamps or placement."""

    api_version: Literal["kleinstyle.dev/runspec-v1"] = Field(default=RUNSPEC_VERSION, alias="apiVersion")
    owner: Owner
    # Where the run writes its artifacts: a path in the pod or an s3://, gs:// URI. Unique per run.
    output_uri: str
    # The same place as the user should read it (pvc://CLAIM/..., s3://...), for status and metadata.
    output_display_uri: str
    work: StepSpec

    def content_hash(self) -> str:
        """A stable hash of what the run computes; the owner's uid and the output path are excluded."""
        payload = self.model_dump(mode="json", exclude={"owner", "output_uri", "output_display_uri"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def run_id(self) -> str:
        """The short hash that names this run everywhere; progress reports carry it as `runHash`."""
        return self.content_hash()[:RUN_ID_LENGTH]

    def input_uris(self) -> list[tuple[str, str]]:
        """(field, URI) of every input a run reads from the artifact store: a training's dataset, the LoRAs a
        generation or a fusion uses. The operator derives them from each dependency's uid and run; the runtime
        checks them again before opening anything (`check_inputs`), so a RunSpec that says otherwise reads nothing."""
        work = self.work
        if isinstance(work, TrainSpec):
            return [("dataset_uri", work.dataset_uri)]
        if isinstance(work, GenerateSpec):
            return [(f"loras[{i}].uri", lora.uri) for i, lora in enumerate(work.loras)]
        if isinstance(work, FuseSpec):
            return [(f"sources[{i}].uri", lora.uri) for i, lora in enumerate(work.sources)]
        return []  # prepare fetches its images through its own guard (kleinstyle.runtime.fetch)

    def check_inputs(self) -> None:
        """Raise ValueError, naming the field, unless every input lies in this run's namespace folder of the
        artifact store its output goes to (`layout.namespace_folder`): the same volume path or the same bucket and
        prefix, the same namespace, no `..` segment, no other scheme. Pure: nothing is opened."""
        folder = namespace_folder(self.output_uri, self.owner)
        if folder is None:
            raise ValueError(
                f"output_uri {self.output_uri!r} does not follow the artifact layout {{namespace}}/"
                "{kind}/{name}/{uid}/{run}: its inputs cannot be placed"
            )
        for name, uri in self.input_uris():
            if problem := _outside(uri, folder):
                raise ValueError(f"{name} {uri!r} {problem}")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.model_validate_json(text)


def _outside(uri: str, folder: str) -> str | None:
    """Why `uri` does not lie in `folder`, or None when it does."""
    scheme = uri.partition("://")[0] + "://" if "://" in uri else ""
    if scheme and scheme not in STORE_SCHEMES:
        return f"uses {scheme}, which a run never reads: inputs come from the artifact store only"
    parts = uri.split("://", 1)[-1].split("/")
    if any(part in (".", "..") for part in parts) or "::" in uri or "\\" in uri:
        return "is not a plain path (., .. segments, :: chains and backslashes are refused)"
    if not uri.startswith(folder.rstrip("/") + "/"):
        return f"is outside this namespace's artifact folder {folder}"
    return None
