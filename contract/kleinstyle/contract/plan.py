"""The TrainingPlan: the training policy of docs/policy.md as one pure function.

`plan_training(images, spec)` turns the number of accepted references and a StyleLoRA spec into every training
setting, records for each whether it came from the policy or from the spec, and says why. No torch: the operator
computes the plan and the runtime executes it.

Sources are the empirical write-up the product automates ("the document"; docs/policy.md says what it holds) and
the verified facts in docs/facts.md, which correct it for klein (block names, no conv layers, alpha ignored by
ai-toolkit). Decisions where the document is silent or
contradicts itself:

- Variant by board size. The matrix names 1-3 (B_r128), 5-7 (GEM+B), 10-15 (GEM+A) and 30+ (any). 4 references
  fall between "Gemini hurts 1-3" and "Gemini helps 5+": we take GEM+D, the document's own small-dataset variant,
  which keeps the text pipeline (93% win rate); the plan warns. 8-9 and 16-29 take GEM+A: the gotchas say "prefer
  rank32 unless dataset is 30+" and rank 128 on fewer than 10 images overfits; 30+ takes GEM+A (best overall).
- GEM+D's settings are not given; we read "small dataset variant" as GEM+A with caption dropout 0.1 (the top of the
  document's 0.05-0.1 range, which makes the style less dependent on the few captions).
- Steps. The formulas (rank 32: max(500, 30 N); rank 128: max(500, 20 N)) floor at 500 for small boards, while the
  convergence table saw later sweet spots there (7 refs: 1500 at both ranks; 5 refs: 1000 at rank 32). We plan the
  larger of formula and observed sweet spot for the board's size regime: too few steps can never be recovered,
  too many cost only the time until early stopping picks the best checkpoint. Ranks 16 and 64, for which the
  document has no formula, use rank 32's and the midpoint (25 N).
- Two-step mode (ConsisLoRA): the document gives rank 16 for 1500 steps (content) then rank 16 for 2000 steps
  (style, on top of the content LoRA). The content stage trains on the captions without the trigger word, so it
  absorbs what the images depict; its LoRA is merged into the frozen base for the style stage, which trains with the
  trigger word and learns the residual, the style; only the style LoRA is published. The builtin backend runs it
  (ai-toolkit has no stage-on-a-merged-LoRA mode): a two-step plan for ai-toolkit is refused.
- Checkpoints: every ~10% of the run in multiples of 50 (at most 250, every 100 for rank 128 on under 10 images
  so the ~500-step peak is seen), plus the cosine midpoint, which the document says to check explicitly; the
  builtin trainer saves exactly `checkpoint_steps`, ai-toolkit every `checkpoint_every` (it has no list).
- Rank on q/k/v: ai-toolkit trains klein's double blocks with one rank-r LoRA on each fused qkv projection; the
  builtin backend does the same on diffusers' separate to_q/to_k/to_v (and add_q/k/v) by sharing one lora_A among
  the three, so a rank means the same capacity on both backends and the document's rank findings, made on
  ai-toolkit, carry over (separate LoRAs would hold up to 3r directions there, with 1.5x the parameters).
- Held-out references: with early stopping and at least 10 references, about one in ten is left out of training,
  and each checkpoint's flow-matching loss on them (fixed noise levels, fixed noise) is reported and guards against
  memorisation (docs/policy.md#early-stopping). A board of 5-9 holds out nothing: one reference is a fifth to a
  ninth of its data, one image's loss jitters most, and in bench/early_stop.py the guard never improved a pick,
  while the old guard (5% at one evaluation) cost late bloomers 17 points of picks within one interval at 3%
  jitter and 31 at 5%. There the probes guard alone: the leakage penalty and guard, and the decline of J.
- The training options ai-toolkit users reach for (docs/training-options.md): timestep bias (ai-toolkit's
  `content_or_style`), noise offset, horizontal flip, EMA of the LoRA weights, gradient checkpointing. Each
  defaults to what the reference runs trained with, which is ai-toolkit's own default (the config never set them):
  balanced, 0, off, off (the write-up calls its EMA variant unstable), and each backend's own checkpointing. At
  their defaults they are left out of the plan's JSON, so no RunSpec hash written before they existed changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Variant = Literal["GEM+A", "GEM+B", "B_r128", "GEM+D"]
Source = Literal["policy", "variant", "spec"]

# Klein 9B: 8 double-stream and 24 single-stream blocks (docs/facts.md#klein-in-diffusers; not FLUX.1's "20-29, 30-57").
KLEIN_BLOCKS = {"klein-base-9b": (8, 24), "klein-base-4b": (5, 20)}

VARIANTS: dict[str, dict[str, Any]] = {
    "GEM+A": {"rank": 32, "optimizer": "adafactor", "text_pipeline": True},
    "GEM+B": {"rank": 128, "optimizer": "adamw8bit", "text_pipeline": True},
    "B_r128": {"rank": 128, "optimizer": "adamw8bit", "text_pipeline": False},
    "GEM+D": {"rank": 32, "optimizer": "adafactor", "text_pipeline": True, "caption_dropout": 0.1},
}
DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "caption_dropout": 0.05,
    "resolution": 1024,
    "scheduler": "cosine",
    "noise_scheduler": "flowmatch",
    "target_blocks": "all",
    "fp8_base": False,  # bf16 base weights, as the document trained
}
# Observed sweet spots (the document's convergence table), by size regime: rows for 5, 7 and 31 references.
SWEET_SPOTS: dict[str, dict[int, int]] = {"small": {32: 1000, 128: 500}, "medium": {32: 1500, 128: 1500}}
STEPS_PER_IMAGE = {16: 30, 32: 30, 64: 25, 128: 20}
# The document's ConsisLoRA recipe: a content LoRA, then the style LoRA on top of it.
TWO_STEP = {"content_rank": 16, "content_steps": 1500, "style_rank": 16, "style_steps": 2000}


class Planned(BaseModel):
    """One planned value and where it came from."""

    model_config = ConfigDict(frozen=True)

    value: Any
    source: Source
    reason: str = ""


TimestepBias = Literal["balanced", "style", "content"]

# The options' policy defaults. A plan holding exactly these leaves them out of its JSON (see the module docstring).
OPTION_DEFAULTS: dict[str, Planned] = {
    "timestep_bias": Planned(
        value="balanced",
        source="policy",
        reason="balanced: ai-toolkit's default content_or_style, which the reference runs trained with",
    ),
    "noise_offset": Planned(value=0.0, source="policy", reason="none: ai-toolkit's default, as the reference runs"),
    "flip_horizontal": Planned(
        value=False, source="policy", reason="off: mirrored copies teach a mirrored layout (text, handedness)"
    ),
    "ema_decay": Planned(value=None, source="policy", reason="no EMA: the write-up found its EMA variant unstable"),
    # None: each backend's own default (builtin off: 44 GiB and 0.53 s/step for klein 9B on an H200 without it, 20 GiB
    # and 0.73 s/step with it, README's benchmark; ai-toolkit on).
    "gradient_checkpointing": Planned(
        value=None, source="policy", reason="the backend's default: builtin off (faster), ai-toolkit on (its default)"
    ),
}


def _option(name: str) -> Any:
    """A plan field for one training option: its policy default, left out of the JSON while it holds it."""
    default = OPTION_DEFAULTS[name]
    return Field(default=default, exclude_if=lambda v: v == default)


class TrainingPlan(BaseModel):
    """Every setting of one training run, with its provenance, the checkpoints to evaluate and the warnings."""

    model_config = ConfigDict(frozen=True)

    images: int
    variant: Variant
    variant_source: Source
    variant_reason: str
    rank: Planned
    alpha: Planned
    optimizer: Planned
    learning_rate: Planned
    weight_decay: Planned
    steps: Planned
    caption_dropout: Planned
    resolution: Planned
    scheduler: Planned
    noise_scheduler: Planned
    fp8_base: Planned
    target_blocks: Planned
    blocks: tuple[str, ...] = Field(description="BFL/ai-toolkit block names that get LoRA layers.")
    checkpoint_every: Planned
    checkpoint_steps: tuple[int, ...]
    # References left out of training for the held-out validation loss (0: none); chosen evenly by the runtime.
    validation_images: Planned = Planned(value=0, source="policy", reason="no held-out references")
    mode: Literal["standard", "two-step"] = "standard"
    # Two-step mode: the content stage's rank and steps, trained before the style stage this plan describes.
    content_stage: Planned | None = None
    early_stopping: bool
    patience: int
    warmup_steps: int
    text_pipeline: Planned
    seed: int
    warnings: tuple[str, ...] = ()
    # The training options ai-toolkit users reach for (docs/training-options.md); each out of the JSON at its default.
    # Which timesteps training favours: balanced, style (low noise: detail, texture) or content (high noise: layout).
    timestep_bias: Planned = _option("timestep_bias")
    # Per-sample, per-channel offset added to the noise: noise + offset * N(0, 1) of shape (batch, channels, 1, 1).
    noise_offset: Planned = _option("noise_offset")
    # Train on every reference and on its mirror image (ai-toolkit's flip_x: the dataset doubled).
    flip_horizontal: Planned = _option("flip_horizontal")
    # Decay of an exponential moving average of the LoRA weights, which checkpoints and the LoRA hold (None: no EMA).
    ema_decay: Planned = _option("ema_decay")
    # Recompute activations in the backward pass (less memory, slower); None: the backend's default.
    gradient_checkpointing: Planned = _option("gradient_checkpointing")

    def values(self) -> dict[str, Any]:
        """The settings alone, without provenance."""
        return {k: v.value if isinstance(v, Planned) else v for k, v in self}

    def plan_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def variant_for(images: int) -> tuple[Variant, str]:
    """The dataset-size matrix, with the gaps decided (see the module docstring)."""
    if images <= 3:
        return "B_r128", f"{images} references: rank 128 without the text pipeline (Gemini hurts 1-3 references)"
    if images == 4:
        return "GEM+D", "4 references: the small-dataset variant GEM+D (between the matrix's 1-3 and 5-7 rows)"
    if images <= 7:
        return "GEM+B", f"{images} references: GEM+B (Gemini + rank 128), the matrix's choice for 5-7"
    return "GEM+A", f"{images} references: GEM+A (Gemini + rank 32), best overall for 8 or more"


def text_pipeline_for(variant: Variant, images: int) -> Planned:
    """Whether generation runs the Gemini text pipeline (L2 reformulation with the board's STYLE_PROFILE): the one
    place this is decided; a GenerationJob's `textPipeline: on|off` overrides it (`prompt_policy.decide_prompt_mode`).

    Off for 1-3 references: the document found the pipeline breaks them (the model cannot tell style signal from
    content noise, and more text adds to the noise). On for 5 and more, where it helps. 4 references: on. The
    document's critical finding draws its line between "breaks 1-3" and "helps 5+"; 4 sits on the helping side of
    the only mechanism it gives (too few references to separate style from content), its small-dataset variant
    GEM+D (which we plan for 4) keeps the pipeline with a 93% win rate, and the text it adds at generation is
    bounded by the MUST/ENRICH structure. The plan warns at 4, naming `textPipeline: off` as the way out. A variant
    without the pipeline (B_r128) keeps it off at any size.
    """
    if images <= 3:
        return Planned(
            value=False,
            source="policy",
            reason=f"off: {images} references (the document: Gemini breaks 1-3 reference boards)",
        )
    if not VARIANTS[variant]["text_pipeline"]:
        return Planned(value=False, source="variant", reason=f"off: the {variant} recipe has no text pipeline")
    return Planned(value=True, source="policy", reason="off for 1-3 references (Gemini hurts them), on otherwise")


QKV_NOTE = "one rank-r LoRA per fused q/k/v projection (lora_A shared by q, k and v), as ai-toolkit trains klein"
MIN_IMAGES_TO_HOLD_OUT = 10
PATIENCE = 2  # evaluations in a row clearly below the best before a run stops (bench/early_stop.py)


def held_out(images: int, early_stopping: bool) -> Planned:
    """How many references the held-out validation loss leaves out of training: about one in ten, from 10
    references and only when checkpoints are evaluated. Under 10 every reference trains: one held out is a fifth to
    a ninth of the board, and its loss jitters too much to guard anything (see the module docstring)."""
    if not early_stopping:
        return Planned(value=0, source="policy", reason="early stopping is off: no held-out validation loss")
    if images < MIN_IMAGES_TO_HOLD_OUT:
        return Planned(
            value=0,
            source="policy",
            reason=f"{images} references: under {MIN_IMAGES_TO_HOLD_OUT} all train; the probes guard alone",
        )
    count = max(1, round(images / 10))
    return Planned(value=count, source="policy", reason=f"{count} of {images} references held out (one in ten)")


def regime(images: int) -> str | None:
    if images <= 5:
        return "small"
    if images <= 9:
        return "medium"
    return None


def planned_steps(rank: int, images: int) -> tuple[int, str]:
    per_image = STEPS_PER_IMAGE[rank]
    formula = max(500, per_image * images)
    why = f"max(500, {per_image} x {images} images) = {formula}"
    size = regime(images)
    observed = SWEET_SPOTS[size].get(min(SWEET_SPOTS[size], key=lambda r: abs(r - rank))) if size else None
    if observed and observed > formula:
        return observed, f"{why}, raised to {observed}: the sweet spot observed on {size} boards; early stopping trims"
    return formula, why


def checkpoint_interval(steps: int, rank: int, images: int) -> int:
    if rank >= 128 and images < 10:
        return 100
    return min(250, max(50, round(steps / 10 / 50) * 50))


def checkpoint_steps(steps: int, every: int, scheduler: str) -> tuple[int, ...]:
    """Every `every` steps, the last step, and the cosine midpoint (the document: check ~500-600 explicitly)."""
    marks = set(range(every, steps + 1, every)) | {steps}
    if scheduler == "cosine":
        marks.add(max(every, round(steps / 2 / 50) * 50))
    return tuple(sorted(m for m in marks if 0 < m <= steps))


def block_names(target: str, custom: list[str] | None, model: str) -> tuple[str, ...]:
    double, single = KLEIN_BLOCKS[model]
    if target == "custom":
        return tuple(custom or ())
    names: list[str] = []
    if target in ("all", "double"):
        names += [f"double_blocks.{i}" for i in range(double)]
    if target in ("all", "single"):
        names += [f"single_blocks.{i}" for i in range(single)]
    return tuple(names)


def _capped(item: Planned, cap: int | None, what: str) -> Planned:
    """`item` held to the operator's cap (its trainingLimits), the cap recorded as the reason."""
    if cap is None or item.value <= cap:
        return item
    why = f"capped at {cap} by the operator's trainingLimits ({what} {item.value}: {item.reason or item.source})"
    return Planned(value=cap, source="policy", reason=why)


def _content_stage(max_steps: int | None) -> Planned:
    steps = TWO_STEP["content_steps"] if max_steps is None else min(TWO_STEP["content_steps"], max_steps)
    why = "two-step (ConsisLoRA): the content stage, captions without the trigger word"
    if steps < TWO_STEP["content_steps"]:
        why += f"; capped at {max_steps} by the operator's trainingLimits"
    return Planned(value={"rank": TWO_STEP["content_rank"], "steps": steps}, source="policy", reason=why)


def plan_training(images: int, spec: dict[str, Any], limits: Mapping[str, Any] | None = None) -> TrainingPlan:
    """The plan for a board of `images` accepted references and a StyleLoRA `spec` (the admitted, camelCase dict).

    `limits` (the operator's trainingLimits: maxSteps, maxResolution, None for no cap) bound steps and resolution
    whatever the policy or the spec says; a capped run checkpoints about every third of its steps.
    """
    limits = limits or {}
    if images < 1:
        raise ValueError("the board has no accepted images: nothing to train on")
    training = spec.get("training") or {}
    stopping = spec.get("earlyStopping") or {}
    model = (spec.get("model") or {}).get("name", "klein-base-9b")
    warnings: list[str] = []

    if spec.get("variant", "auto") == "auto":
        variant, variant_reason = variant_for(images)
        variant_source: Source = "policy"
    else:
        variant, variant_reason, variant_source = spec["variant"], "set in the spec", "spec"
    recipe = {**DEFAULTS, **VARIANTS[variant]}

    def pick(field: str, key: str) -> Planned:
        """The spec's value when set, else the variant's, else the document's default."""
        if training.get(field) is not None:
            return Planned(value=training[field], source="spec", reason="set in spec.training")
        if key in VARIANTS[variant]:
            return Planned(value=recipe[key], source="variant", reason=f"the {variant} recipe")
        return Planned(value=recipe[key], source="policy", reason="the document's training configuration")

    two_step = spec.get("mode") == "two-step"
    if two_step and spec.get("backend") == "ai-toolkit":
        raise ValueError("mode two-step trains on the builtin backend: set backend: builtin")
    rank = pick("rank", "rank")
    if two_step and rank.source != "spec":
        rank = Planned(value=TWO_STEP["style_rank"], source="policy", reason="two-step (ConsisLoRA): the style stage")
    rank = rank.model_copy(update={"reason": f"{rank.reason}; {QKV_NOTE}"})
    alpha = (
        Planned(value=training["alpha"], source="spec", reason="set in spec.training")
        if training.get("alpha") is not None
        else Planned(value=rank.value, source="policy", reason="alpha = rank (scale 1.0), as ai-toolkit uses for klein")
    )
    scheduler = pick("scheduler", "scheduler")
    if training.get("steps") is not None:
        steps = Planned(value=training["steps"], source="spec", reason="set in spec.training")
    elif two_step:
        steps = Planned(value=TWO_STEP["style_steps"], source="policy", reason="two-step (ConsisLoRA): the style stage")
    else:
        value, why = planned_steps(rank.value, images)
        steps = Planned(value=value, source="policy", reason=why)
    uncapped_steps = steps.value
    steps = _capped(steps, limits.get("maxSteps"), "planned")
    checkpoint_every = (
        Planned(value=training["checkpointEvery"], source="spec", reason="set in spec.training")
        if training.get("checkpointEvery") is not None
        else Planned(
            value=checkpoint_interval(steps.value, rank.value, images),
            source="policy",
            reason="about 10% of the run; 100 for rank 128 under 10 images",
        )
    )
    if (
        steps.value < uncapped_steps
        and checkpoint_every.source == "policy"
        and checkpoint_every.value > steps.value // 2
    ):
        checkpoint_every = Planned(
            value=max(1, steps.value // 3), source="policy", reason="a third of the run capped by trainingLimits"
        )
    if steps.value < uncapped_steps:
        warnings.append(f"steps capped at {steps.value} (planned {uncapped_steps}) by the operator's trainingLimits")
    resolution = _capped(pick("resolution", "resolution"), limits.get("maxResolution"), "planned")
    if resolution.source == "policy" and "capped" in resolution.reason:
        warnings.append(f"resolution capped at {resolution.value} px by the operator's trainingLimits")
    target = training.get("targetBlocks") or "all"
    target_blocks = Planned(
        value=target,
        source="spec" if training.get("targetBlocks") not in (None, "all") else "policy",
        reason="all blocks: the document's winning runs trained every block",
    )
    early = bool(stopping.get("enabled", True))
    text_pipeline = text_pipeline_for(variant, images)

    if images <= 2:
        warnings.append(f"{images} references: nothing works reliably with 2 or fewer; add references if you can")
    elif images == 4:
        warnings.append("4 references sit between the document's regimes; if generations drift, set textPipeline: off")
    if rank.value >= 128 and images < 10:
        warnings.append(
            f"rank {rank.value} on {images} references overfits after ~500 steps: checkpoints every "
            f"{checkpoint_every.value} steps; early stopping {'picks the best' if early else 'is OFF: enable it'}"
        )
    if spec.get("backend") == "ai-toolkit" and alpha.source == "spec" and alpha.value != rank.value:
        warnings.append("ai-toolkit ignores alpha for klein (alpha = rank); the builtin backend honours it")
    if variant_source == "spec" and variant == "B_r128" and images > 3:
        warnings.append("B_r128 turns the text pipeline off; it is meant for 1-3 references")

    def option(field: str, name: str) -> Planned:
        """The spec's value when set, else the option's policy default."""
        if training.get(field) is not None:
            return Planned(value=training[field], source="spec", reason="set in spec.training")
        return OPTION_DEFAULTS[name]

    options = {
        "timestep_bias": option("timestepBias", "timestep_bias"),
        "noise_offset": option("noiseOffset", "noise_offset"),
        "flip_horizontal": option("flipHorizontal", "flip_horizontal"),
        "ema_decay": option("emaDecay", "ema_decay"),
        "gradient_checkpointing": option("gradientCheckpointing", "gradient_checkpointing"),
    }
    if options["timestep_bias"].value not in ("balanced", "style", "content"):
        raise ValueError(f"timestepBias must be balanced, style or content, not {options['timestep_bias'].value!r}")
    if not 0.0 <= float(options["noise_offset"].value) <= 1.0:
        raise ValueError(f"noiseOffset must be within [0, 1], not {options['noise_offset'].value}")
    ema = options["ema_decay"].value
    if ema is not None and not 0.0 < float(ema) < 1.0:
        raise ValueError(f"emaDecay must be between 0 and 1 (exclusive), not {ema}")
    if ema is not None:
        warnings.append(
            "emaDecay: the write-up found its EMA variant unstable; checkpoints and the LoRA hold the averaged weights"
        )
        if spec.get("backend") == "ai-toolkit":
            warnings.append(
                "ai-toolkit keeps no EMA state in its checkpoints: a resumed run restarts the average from the saved "
                "(averaged) weights and trains on from them; the builtin backend resumes it exactly"
            )

    warmup = stopping.get("warmupSteps")
    if warmup is None:
        warmup = min(steps.value // 3, 300) if rank.value >= 128 and images < 10 else steps.value // 3
    return TrainingPlan(
        images=images,
        variant=variant,
        variant_source=variant_source,
        variant_reason=variant_reason,
        rank=rank,
        alpha=alpha,
        optimizer=pick("optimizer", "optimizer"),
        learning_rate=pick("learningRate", "learning_rate"),
        weight_decay=pick("weightDecay", "weight_decay"),
        steps=steps,
        caption_dropout=pick("captionDropout", "caption_dropout"),
        resolution=resolution,
        scheduler=scheduler,
        noise_scheduler=Planned(value="flowmatch", source="policy", reason="klein is a flow-matching model"),
        fp8_base=pick("fp8Base", "fp8_base"),
        target_blocks=target_blocks,
        blocks=block_names(target, training.get("blocks"), model),
        checkpoint_every=checkpoint_every,
        checkpoint_steps=checkpoint_steps(steps.value, checkpoint_every.value, scheduler.value),
        validation_images=held_out(images, early),
        mode="two-step" if two_step else "standard",
        content_stage=_content_stage(limits.get("maxSteps")) if two_step else None,
        early_stopping=early,
        patience=int(stopping.get("patience", PATIENCE)),
        warmup_steps=int(warmup),
        text_pipeline=text_pipeline,
        seed=int(training.get("seed") or 0),
        warnings=tuple(warnings),
        timestep_bias=options["timestep_bias"],
        noise_offset=options["noise_offset"],
        flip_horizontal=options["flip_horizontal"],
        ema_decay=options["ema_decay"],
        gradient_checkpointing=options["gradient_checkpointing"],
    )
