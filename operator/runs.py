"""What each kind runs: its dependencies, its RunSpec and how a finished run's result becomes status.

Pure functions of (spec, dependencies, operator config). The RunSpec's hash names the run, so everything that
changes what a run computes (the spec, a dependency's output) starts a new run, and nothing else does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from kleinstyle.contract.aitoolkit import aitoolkit_config
from kleinstyle.contract.early_stop import Decision, StoppingSettings, decide_reported
from kleinstyle.contract.plan import TrainingPlan, plan_training
from kleinstyle.contract.prompt_policy import LoraStyle, decide_prompt_mode
from kleinstyle.contract.runspec import (
    PROVIDER_KEY_ENV,
    EvaluationSpec,
    FetchPolicy,
    FuseSpec,
    GenerateSpec,
    ImageInput,
    LoraInput,
    Owner,
    PrepareSpec,
    RunSpec,
    TrainSpec,
)
from kleinstyle.contract.style_profile import StyleProfile

from .api import BY_KIND, Kind
from .api.common import API_VERSION, Scheduling
from .api.generationjob import GenerationJobSpec, LoRAReference
from .api.lorafusion import LoRAFusionSpec
from .api.styleboard import StyleBoardSpec
from .api.stylelora import StyleLoRASpec
from .children import REFERENCES_MOUNT, Run, SecretEnv
from .config import OperatorConfig


@dataclass(frozen=True)
class Dependency:
    kind: str
    name: str
    # The status field that must be set once the dependency has Succeeded.
    output: str


class NotReady(Exception):
    """A dependency is missing or not Succeeded; the owner waits (a condition, not an error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---- artifact locations -----------------------------------------------------------------------------------------


def artifact_location(cfg: OperatorConfig, owner: Owner, run_hash: str) -> tuple[str, str]:
    """(path or URI the pod writes to, URI a user reads) for one run: {ns}/{kind}/{name}/{uid}/{hash}."""
    rel = f"{owner.namespace}/{owner.kind.lower()}/{owner.name}/{owner.uid}/{run_hash[:10]}"
    if cfg.artifacts.uri:
        uri = f"{cfg.artifacts.uri.rstrip('/')}/{rel}"
        return uri, uri
    return f"{cfg.artifacts.mountPath}/{rel}", f"pvc://{cfg.artifacts.claimName}/{rel}"


def pod_path(cfg: OperatorConfig, display_uri: str) -> str:
    """Map an artifact URI from status (pvc://CLAIM/...) back to where a pod sees it."""
    prefix = f"pvc://{cfg.artifacts.claimName}/"
    if display_uri.startswith(prefix):
        return f"{cfg.artifacts.mountPath}/{display_uri[len(prefix) :]}"
    return display_uri


def model_path(cfg: OperatorConfig, model_name: str) -> str:
    return f"{cfg.modelCacheMountPath}/{cfg.modelDirs[model_name]}"


# ---- per kind ---------------------------------------------------------------------------------------------------


def _owner(kind: Kind, body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(kind=kind.kind, plural=kind.plural, namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def _image_input(source: str, caption: str | None) -> tuple[ImageInput, str | None]:
    """pvc://CLAIM/PATH becomes the path where the prepare pod mounts that claim."""
    if source.startswith("pvc://"):
        claim, _, path = source[len("pvc://") :].partition("/")
        return ImageInput(source=f"{REFERENCES_MOUNT}/{claim}/{path}", caption=caption, label=source), claim
    return ImageInput(source=source, caption=caption), None


# storageSecret key -> the env var the prepare step reads it from (runtime/fetch.py SOURCE_CREDENTIAL_ENV).
SOURCE_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "KLEINSTYLE_SOURCE_AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "KLEINSTYLE_SOURCE_AWS_SECRET_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": "KLEINSTYLE_SOURCE_GOOGLE_CREDENTIALS_JSON",
}
PROVIDER_URL_ENV = {"gemini": "KLEINSTYLE_GEMINI_BASE_URL", "openrouter": "KLEINSTYLE_OPENROUTER_BASE_URL"}


def _prepare(kind: Kind, body: Mapping, spec: StyleBoardSpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    images, claims = [], []
    for image in spec.images:
        item, claim = _image_input(image.source, image.caption)
        images.append(item)
        if claim and claim not in claims:
            claims.append(claim)
    work = PrepareSpec(
        trigger_word=spec.triggerWord,
        images=tuple(images),
        captioning_provider=spec.captioning.provider,
        captioning_model=spec.captioning.model,
        given_captions=spec.captioning.givenCaptions,
        fetch=FetchPolicy(
            allowed_cidrs=tuple(cfg.fetchAllowedCIDRs), max_bytes=cfg.fetchMaxBytes, max_pixels=cfg.fetchMaxPixels
        ),
    )
    secrets: list[SecretEnv] = []
    key = spec.captioning.apiKeySecret
    if key and spec.captioning.provider in PROVIDER_KEY_ENV:
        # Optional: without the key, prepare uses the given captions and says so in a warning.
        secrets.append(SecretEnv(PROVIDER_KEY_ENV[spec.captioning.provider], key.name, key.key, optional=True))
    if spec.storageSecret:
        # Under their own names: the artifact store's credentials (standard AWS_* names) must never read sources.
        for key, env in SOURCE_SECRET_KEYS.items():
            secrets.append(SecretEnv(env, spec.storageSecret, key, optional=True))
    return _with_provider_url(
        _run(kind, body, work, cfg, "prepare", None, secrets, claims), spec.captioning.provider, cfg
    )


def _with_provider_url(run: Run, provider: str, cfg: OperatorConfig) -> Run:
    """The run with the admin's endpoint override for a text provider (textProviderURLs), if any."""
    endpoint = cfg.textProviderURLs.get(provider)  # type: ignore[call-overload]
    return replace(run, extra_env={PROVIDER_URL_ENV[provider]: endpoint}) if endpoint else run


def _train(kind: Kind, body: Mapping, spec: StyleLoRASpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    board = deps[("StyleBoard", spec.boardRef.name)]
    status = board.get("status", {})
    images = int(status.get("imagesAccepted") or 0)
    backend = cfg.defaultBackend if spec.backend == "auto" else spec.backend
    spec_dict = {**spec.model_dump(mode="json", exclude_none=True), "backend": backend}
    plan = plan_training(images, spec_dict, cfg.trainingLimits.model_dump())
    work = TrainSpec(
        dataset_uri=pod_path(cfg, status["datasetURI"]),
        trigger_word=board["spec"]["triggerWord"],
        image_count=images,
        backend=backend,
        model=spec.model.name,
        model_path=model_path(cfg, spec.model.name),
        plan=plan,
        evaluation=_evaluation(cfg, plan) if plan.early_stopping else None,
        style_profile=status.get("styleProfile") if isinstance(status.get("styleProfile"), dict) else None,
    )
    run = _run(kind, body, work, cfg, "train", spec.scheduling)
    if backend != "ai-toolkit":
        return run
    config = aitoolkit_config(
        work.plan,
        name=run.owner.name,
        dataset_dir=work.dataset_uri,
        training_folder=f"{run.runspec.output_uri}/aitoolkit",
        trigger_word=work.trigger_word,
        model=work.model,
        model_path=work.model_path,
    )
    return replace(run, files={"aitoolkit.yaml": yaml.safe_dump(config, sort_keys=False)})


def _evaluation(cfg: OperatorConfig, plan: TrainingPlan) -> EvaluationSpec:
    """The operator's probe settings, the probe size held to the plan's training resolution."""
    ev = cfg.checkpointEvaluation
    size = min(ev.size, int(plan.resolution.value) // 16 * 16)
    embedder = f"{cfg.modelCacheMountPath}/{ev.embedderDir}" if ev.embedderDir else None
    return EvaluationSpec(
        prompts=ev.prompts, seeds=ev.seeds, size=size, steps=ev.steps, guidance=ev.guidance, embedder_path=embedder
    )


def _lora_inputs(refs: list[LoRAReference], deps: Mapping, cfg: OperatorConfig) -> tuple[LoraInput, ...]:
    return tuple(
        LoraInput(
            uri=pod_path(cfg, deps[(ref.kind, ref.name)]["status"]["loraURI"]),
            weight=ref.weight,
            label=f"{ref.kind}/{ref.name}",
        )
        for ref in refs
    )


def lora_style(ref: LoRAReference, obj: Mapping[str, Any]) -> LoraStyle:
    """What a LoRA's status tells generation: its trigger words and whether its plan keeps the text pipeline.

    A StyleLoRA: `triggerWord` and `plan.textPipeline` (with the variant's reason); a LoRAFusion: `triggerWords` and
    `textPipeline` where its status has them (unknown otherwise, which `auto` reads as off)."""
    status = obj.get("status") or {}
    label = f"{ref.kind} {ref.name}"
    if ref.kind == "StyleLoRA":
        plan = status.get("plan") or {}
        words = [status.get("triggerWord")]
        keeps, reason = plan.get("textPipeline"), str(plan.get("variantReason") or "")
    else:
        words = status.get("triggerWords") or []
        keeps, reason = status.get("textPipeline"), ""
    triggers = tuple(w for w in words if isinstance(w, str) and w)
    return LoraStyle(label, triggers, keeps if isinstance(keeps, bool) else None, reason)


def style_profile(refs: list[LoRAReference], deps: Mapping) -> dict[str, Any] | None:
    """The L1 STYLE_PROFILE the reformulation uses: the first LoRA's `status.styleProfile` (a StyleLoRA carries its
    board's; a fusion its first source's). None: prompts stay raw with a warning."""
    for ref in refs:
        profile = (deps[(ref.kind, ref.name)].get("status") or {}).get("styleProfile")
        if isinstance(profile, dict):
            return profile
    return None


def capped_render(spec: GenerationJobSpec, cfg: OperatorConfig) -> tuple[int, int, int, list[str]]:
    """(width, height, steps) within the operator's generationLimits, and a warning for each cap applied."""
    limits = cfg.generationLimits
    width, height, steps, warnings = spec.width, spec.height, spec.steps, []
    if limits.maxSide and max(width, height) > limits.maxSide:
        scale = limits.maxSide / max(width, height)
        width, height = (max(64, int(side * scale) // 16 * 16) for side in (spec.width, spec.height))
        warnings.append(
            f"size capped at {width}x{height} (asked {spec.width}x{spec.height}) by the operator's generationLimits"
        )
    if limits.maxSteps and steps > limits.maxSteps:
        steps = limits.maxSteps
        warnings.append(f"steps capped at {steps} (asked {spec.steps}) by the operator's generationLimits")
    return width, height, steps, warnings


def _generate(kind: Kind, body: Mapping, spec: GenerationJobSpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    styles = [lora_style(ref, deps[(ref.kind, ref.name)]) for ref in spec.loras]
    mode, reason = decide_prompt_mode(spec.textPipeline, styles)
    width, height, steps, warnings = capped_render(spec, cfg)
    if spec.textPipeline == "on":
        off = [style.label for style in styles if style.text_pipeline is False]
        warnings += [f"textPipeline is on although the training plan of {label} turns it off" for label in off]
    work = GenerateSpec(
        model_path=model_path(cfg, spec.model.name),
        loras=_lora_inputs(spec.loras, deps, cfg),
        prompts=tuple(spec.prompts),
        negative_prompt=spec.negativePrompt,
        prompt_mode=mode,
        prompt_mode_reason=reason,
        trigger_words=tuple(dict.fromkeys(word for style in styles for word in style.trigger_words)),
        style_profile=style_profile(spec.loras, deps) if mode == "reformulate" else None,
        reformulation_provider=spec.reformulation.provider,
        reformulation_model=spec.reformulation.model,
        width=width,
        height=height,
        steps=steps,
        guidance=spec.guidance,
        seeds=tuple(spec.seed + i for i in range(spec.count)),
        warnings=tuple(warnings),
    )
    secrets = []
    key = spec.reformulation.apiKeySecret
    if mode == "reformulate" and key:  # optional: without it the runtime falls back to raw prompts and says so
        secrets.append(SecretEnv(PROVIDER_KEY_ENV[spec.reformulation.provider], key.name, key.key, optional=True))
    run = _run(kind, body, work, cfg, "generate", spec.scheduling, secrets)
    return _with_provider_url(run, spec.reformulation.provider, cfg) if mode == "reformulate" else run


def _fuse(kind: Kind, body: Mapping, spec: LoRAFusionSpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    used = [ref for ref in spec.sources if ref.weight != 0]
    styles = [lora_style(ref, deps[(ref.kind, ref.name)]) for ref in used]
    keeps = [style.text_pipeline for style in styles]
    work = FuseSpec(
        sources=_lora_inputs(spec.sources, deps, cfg),
        method=spec.method,
        rank=spec.rank,
        energy=spec.energy,
        selection=spec.selection or "hard",
        trigger_words=tuple(dict.fromkeys(word for style in styles for word in style.trigger_words)),
        text_pipeline=None if None in keeps else all(keeps),
        style_profile=style_profile(used, deps),
    )
    return _run(kind, body, work, cfg, "fuse", spec.scheduling)


def _fusion_style_status(run: Run) -> tuple[dict[str, Any], list[str]]:
    """What a GenerationJob reads of a fusion (`lora_style`, `style_profile`), known once the run is planned."""
    work: FuseSpec = run.runspec.work
    status = {"triggerWords": list(work.trigger_words), "textPipeline": work.text_pipeline}
    return {**status, "styleProfile": work.style_profile}, []


def _run(
    kind: Kind,
    body: Mapping,
    work: Any,
    cfg: OperatorConfig,
    step: str,
    scheduling: Scheduling | None,
    secrets: list[SecretEnv] | None = None,
    claims: list[str] | None = None,
) -> Run:
    owner = _owner(kind, body)
    provisional = RunSpec(owner=owner, output_uri="", output_display_uri="", work=work)
    run_hash = provisional.content_hash()
    output, display = artifact_location(cfg, owner, run_hash)
    runspec = provisional.model_copy(update={"output_uri": output, "output_display_uri": display})
    secrets = list(secrets or [])
    if cfg.artifacts.uri and cfg.artifacts.credentialsSecret:
        for env in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON"):
            secrets.append(SecretEnv(env, cfg.artifacts.credentialsSecret, env, optional=True))
    return Run(
        runspec=runspec,
        step=step,
        run_hash=run_hash,
        owner_api_version=API_VERSION,
        gpus=scheduling.gpus if scheduling else 0,
        node_pool=scheduling.nodePool if scheduling else None,
        queue_name=scheduling.queueName if scheduling else None,
        priority_class=scheduling.priorityClassName if scheduling else None,
        secret_env=tuple(secrets),
        reference_claims=tuple(claims or ()),
    )


# ---- status of a run before and after it ----


def _plan_status(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The plan's key values for `kubectl get -o yaml`, and its warnings for the Warning condition."""
    plan: TrainingPlan = run.runspec.work.plan
    values = plan.values()
    from_spec = sorted(name for name, item in plan if getattr(item, "source", None) == "spec")
    summary = {
        "variant": plan.variant,
        "variantReason": plan.variant_reason,
        "rank": values["rank"],
        "alpha": values["alpha"],
        "optimizer": values["optimizer"],
        "learningRate": values["learning_rate"],
        "steps": values["steps"],
        "stepsReason": plan.steps.reason,
        "checkpointEvery": values["checkpoint_every"],
        "captionDropout": values["caption_dropout"],
        "resolution": values["resolution"],
        "targetBlocks": values["target_blocks"],
        "earlyStopping": plan.early_stopping,
        "mode": plan.mode,
        **({"contentStage": plan.content_stage.value} if plan.content_stage else {}),
        "textPipeline": values["text_pipeline"],
        "fromSpec": from_spec,
        "hash": plan.plan_hash(),
    }
    work = run.runspec.work
    fields = {"plan": summary, "totalSteps": values["steps"], "triggerWord": work.trigger_word}
    fields["styleProfile"] = work.style_profile
    return fields, list(plan.warnings)


def _render_status(run: Run) -> tuple[dict[str, Any], list[str]]:
    """A GenerationJob's settings as the run renders them, known before its Job starts, and the operator's warnings."""
    work: GenerateSpec = run.runspec.work
    render = {
        "width": work.width,
        "height": work.height,
        "steps": work.steps,
        "guidance": work.guidance,
        "textPipeline": "on" if work.prompt_mode == "reformulate" else "off",
        "textPipelineReason": work.prompt_mode_reason,
        "triggerWords": list(work.trigger_words),
    }
    return {"render": render, "imagesTotal": len(work.image_files())}, list(work.warnings)


# ---- results ----------------------------------------------------------------------------------------------------


def _board_result(result: Mapping[str, Any], run: Run) -> dict[str, Any]:
    rejected = [{"source": r["source"], "reason": r["reason"]} for r in result.get("rejected", [])]
    duplicates = [
        {"source": d["source"], "similarTo": d["resembles"], "distance": int(d["distance"])}
        for d in result.get("duplicates", [])
    ]
    return {
        "imagesAccepted": len(result.get("accepted", [])),
        "imagesRejected": len(rejected),
        "rejected": rejected,
        "duplicates": duplicates,
        "datasetURI": f"{run.runspec.output_display_uri}/dataset" if result.get("accepted") else None,
        **_text_status(result),
    }


def _text_status(result: Mapping[str, Any]) -> dict[str, Any]:
    """Captions, the STYLE_PROFILE and token usage as status shows them; anything malformed is left out (the pod
    wrote it), never allowed to break the status patch."""
    captions = [
        {
            "file": str(a.get("file", "")),
            "source": str(a.get("source", "")),
            "caption": str(a.get("caption", "")),
            "origin": a.get("caption_origin") if a.get("caption_origin") in CAPTION_ORIGINS else "given",
            "note": str(a.get("caption_note") or "") or None,
            "styleWords": [str(w) for w in a.get("style_words") or []],
        }
        for a in result.get("accepted", [])
        if isinstance(a, Mapping)
    ]
    profile = None
    if isinstance(result.get("style_profile"), Mapping):
        with contextlib.suppress(ValueError):
            profile = StyleProfile.model_validate(result["style_profile"]).document()
    usage = result.get("token_usage")
    token_usage = None
    if isinstance(usage, Mapping):
        token_usage = {
            "provider": str(usage.get("provider", "")),
            "model": str(usage.get("model", "")),
            **{camel: int(usage.get(snake) or 0) for snake, camel in TOKEN_FIELDS.items()},
        }
    return {
        "captioning": str(result.get("captioning") or "") or None,
        "captions": captions,
        "styleProfile": profile,
        "styleProfileImages": [str(f) for f in result.get("style_profile_images") or []] if profile else [],
        "tokenUsage": token_usage,
    }


CAPTION_ORIGINS = ("given", "generated", "regenerated", "cleaned", "trigger-only")
TOKEN_FIELDS = {
    "calls": "calls",
    "cached_calls": "cachedCalls",
    "prompt_tokens": "promptTokens",
    "output_tokens": "outputTokens",
    "total_tokens": "totalTokens",
}


def _checkpoint_status(items: Any, decision: Decision | None = None) -> list[dict[str, Any]]:
    """Checkpoints as status shows them, with their scores when the run evaluates them; URIs the pod reports are
    shown as given but never used by the operator."""
    judged = {j.step: j for j in decision.judged} if decision else {}
    out = []
    for item in items or []:
        if isinstance(item, Mapping) and isinstance(item.get("step"), int):
            loss = item.get("loss")
            entry = {
                "step": item["step"],
                "uri": str(item.get("uri") or ""),
                "loss": float(loss) if isinstance(loss, int | float) else None,
            }
            if (j := judged.get(item["step"])) is not None:
                entry["score"] = j.score
                if j.why_not:
                    entry["ineligible"] = j.why_not
            out.append(entry)
    return out


def _decision(reported: Mapping[str, Any], run: Run) -> Decision | None:
    """The early-stopping policy on the scores a run reports: the same pure function the runtime applies."""
    evaluation = reported.get("evaluation")
    if not isinstance(evaluation, Mapping):
        return None
    try:
        return decide_reported(dict(evaluation), StoppingSettings.from_plan(run.runspec.work.plan))
    except (KeyError, TypeError, ValueError):  # scores a pod reported malformed: shown without them
        return None


def _scored(reported: Mapping[str, Any], run: Run) -> dict[str, Any]:
    decision = _decision(reported, run)
    fields: dict[str, Any] = {"checkpoints": _checkpoint_status(reported.get("checkpoints"), decision)}
    if decision is not None:
        fields["bestCheckpoint"] = decision.best_step
        fields["earlyStopping"] = decision.reason
    return fields


def _eta(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float) or seconds < 0:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def lora_progress_status(progress: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """A StyleLoRA's live status from its run's `status.progress.progress` (step, total, loss, ETA, checkpoints
    with their scores, the best one so far)."""
    step, total = progress.get("step"), progress.get("totalSteps")
    fields: dict[str, Any] = {}
    if isinstance(step, int):
        fields["step"] = step
        if isinstance(total, int) and total > 0:
            fields["totalSteps"] = total
            fields["progressText"] = f"{step}/{total} ({100 * step // total}%)"
            if progress.get("stage") in ("content", "style"):  # two-step mode: the steps count per stage
                fields["progressText"] = f"{progress['stage']} stage {fields['progressText']}"
    if isinstance(progress.get("loss"), int | float):
        fields["loss"] = float(progress["loss"])
    if (eta := _eta(progress.get("etaSeconds"))) is not None:
        fields["eta"] = eta
    if "checkpoints" in progress:
        fields.update(_scored(progress, run))
    return fields


def _lora_result(result: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The trained LoRA: where it is comes from the RunSpec, never from the pod."""
    steps, total = result.get("steps"), result.get("total_steps")
    fields: dict[str, Any] = {
        "loraURI": f"{run.runspec.output_display_uri}/lora.safetensors",
        "stopReason": result.get("stop_reason"),
        "eta": None,
        **_scored(result, run),
    }
    if isinstance(steps, int):
        fields["step"] = steps
        total = total if isinstance(total, int) and total > 0 else None
        if total:
            fields["totalSteps"] = total
            fields["progressText"] = f"{steps}/{total} ({100 * steps // total}%)"
    if isinstance(result.get("final_loss"), int | float):
        fields["loss"] = float(result["final_loss"])
    if isinstance(result.get("lora_step"), int):
        fields["loraStep"] = result["lora_step"]
    return fields


def generation_progress_status(progress: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """A GenerationJob's live status from its run's progress: images done of total."""
    done, total = progress.get("imagesDone"), progress.get("imagesTotal")
    if not isinstance(done, int) or not isinstance(total, int) or total < 1:
        return {}
    return {"imagesDone": done, "progressText": f"{done}/{total} images"}


def _generation_result(result: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """Images and prompts of a finished generation. URIs come from the RunSpec (the order and names are
    `GenerateSpec.image_files`); from the pod only the texts and timings, each taken when its type fits."""
    work: GenerateSpec = run.runspec.work
    base = run.runspec.output_display_uri
    seconds = {
        item.get("index"): item.get("seconds")
        for item in result.get("images") or []
        if isinstance(item, Mapping) and isinstance(item.get("seconds"), int | float)
    }
    images = [
        {"uri": f"{base}/images/{name}.png", "promptIndex": p + 1, "seed": seed, "seconds": seconds.get(i + 1)}
        for i, (p, seed, name) in enumerate(work.image_files())
    ]
    used, reformulated = result.get("prompts_used") or [], result.get("reformulated") or []
    prompts = [
        {
            "index": i + 1,
            "promptUsed": used[i] if i < len(used) and isinstance(used[i], str) else prompt,
            "reformulated": i < len(reformulated) and reformulated[i] is True,
        }
        for i, prompt in enumerate(work.prompts)
    ]
    total = len(images)
    return {
        "images": images,
        "prompts": prompts,
        "contactSheetURI": f"{base}/contact_sheet.png",
        "imagesDone": total,
        "progressText": f"{total}/{total} images",
    }


def _fusion_result(result: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The fused LoRA: where it is comes from the RunSpec; rank, energy and duration from the run."""

    def number(key: str) -> float | None:
        value = result.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    rank = result.get("rank")
    return {
        "loraURI": f"{run.runspec.output_display_uri}/lora.safetensors",
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        "energyKept": number("energy_kept"),
        "durationSeconds": number("duration_seconds"),
    }


@dataclass(frozen=True)
class KindRun:
    """How one kind runs: the spec model, its dependencies, its Run and its result's status fields."""

    kind: Kind
    step: str
    dependencies: Callable[[Any], list[Dependency]]
    build: Callable[[Kind, Mapping, Any, Mapping, OperatorConfig], Run]
    result_status: Callable[[Mapping[str, Any], Run], dict[str, Any]] | None = None
    # Result fields, rewritten on every reconcile from the current run's result or emptied.
    cleared_fields: Mapping[str, Any] = field(default_factory=dict)
    # Fields reset only when a new run starts (e.g. a request the user made of the run before).
    new_run_fields: Mapping[str, Any] = field(default_factory=dict)
    # Status fields (and warnings) known as soon as the run is planned, before any Job runs.
    run_status: Callable[[Run], tuple[dict[str, Any], list[str]]] | None = None
    # Which issue brings this step's runtime, for the condition shown while the runtime lacks it.
    arrives_with: str = ""
    # Status fields from a running run's `status.progress.progress` (the runHash matching), e.g. step and ETA.
    progress_status: Callable[[Mapping[str, Any], Run], dict[str, Any]] | None = None


def _lora_deps(refs: list[LoRAReference]) -> list[Dependency]:
    return [Dependency(ref.kind, ref.name, "loraURI") for ref in refs]


KIND_RUNS: dict[str, KindRun] = {
    "StyleBoard": KindRun(
        BY_KIND["StyleBoard"],
        "prepare",
        lambda s: [],
        _prepare,
        _board_result,
        cleared_fields={
            "imagesAccepted": None,
            "imagesRejected": None,
            "rejected": [],
            "duplicates": [],
            "datasetURI": None,
            "captioning": None,
            "captions": [],
            "styleProfile": None,
            "styleProfileImages": [],
            "tokenUsage": None,
        },
    ),
    "StyleLoRA": KindRun(
        BY_KIND["StyleLoRA"],
        "train",
        lambda s: [Dependency("StyleBoard", s.boardRef.name, "datasetURI")],
        _train,
        _lora_result,
        cleared_fields={
            "step": None,
            "progressText": None,
            "loss": None,
            "eta": None,
            "checkpoints": [],
            "bestCheckpoint": None,
            "loraStep": None,
            "earlyStopping": None,
            "loraURI": None,
            "stopReason": None,
        },
        new_run_fields={"stopRequest": None},  # a stop asked of an earlier run is not one for this run
        run_status=_plan_status,
        arrives_with="training (issue #3)",
        progress_status=lora_progress_status,
    ),
    "GenerationJob": KindRun(
        BY_KIND["GenerationJob"],
        "generate",
        lambda s: _lora_deps(s.loras),
        _generate,
        _generation_result,
        cleared_fields={
            "imagesDone": None,
            "progressText": None,
            "images": [],
            "prompts": [],
            "contactSheetURI": None,
        },
        run_status=_render_status,
        arrives_with="generation (issue #5)",
        progress_status=generation_progress_status,
    ),
    "LoRAFusion": KindRun(
        BY_KIND["LoRAFusion"],
        "fuse",
        lambda s: _lora_deps(s.sources),
        _fuse,
        _fusion_result,
        cleared_fields={"loraURI": None, "rank": None, "energyKept": None, "durationSeconds": None},
        run_status=_fusion_style_status,
        arrives_with="fusion (issue #6)",
    ),
}


def check_dependencies(deps: list[Dependency], observed: Mapping[tuple[str, str], Mapping | None]) -> None:
    """Raise NotReady naming the first dependency that is missing or has not Succeeded."""
    for dep in deps:
        obj = observed.get((dep.kind, dep.name))
        if obj is None:
            raise NotReady(f"{dep.kind}NotFound", f"{dep.kind} {dep.name} does not exist in this namespace")
        status = obj.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase == "Failed":
            raise NotReady(f"{dep.kind}Failed", f"{dep.kind} {dep.name} failed: {status.get('message', '')}".strip())
        current = status.get("observedGeneration") == (obj.get("metadata") or {}).get("generation")
        if phase != "Succeeded" or not status.get(dep.output) or not current:
            raise NotReady(f"{dep.kind}NotReady", f"waiting for {dep.kind} {dep.name} (now {phase})")
