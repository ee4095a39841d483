"""What each kind runs: its dependencies, its RunSpec and how a finished run's result becomes status.

Pure functions of (spec, dependencies, operator config). The RunSpec's hash names the run, so everything that
changes what a run computes (the spec, a dependency's output) starts a new run, and nothing else does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from kleinstyle.runtime.aitoolkit import aitoolkit_config
from kleinstyle.runtime.plan import TrainingPlan, plan_training
from kleinstyle.runtime.spec import (
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
PROVIDER_KEY_ENV = {"gemini": "GEMINI_API_KEY", "openrouter": "OPENROUTER_API_KEY"}


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
    return _run(kind, body, work, cfg, "prepare", None, secrets, claims)


def _train(kind: Kind, body: Mapping, spec: StyleLoRASpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    board = deps[("StyleBoard", spec.boardRef.name)]
    status = board.get("status", {})
    images = int(status.get("imagesAccepted") or 0)
    backend = cfg.defaultBackend if spec.backend == "auto" else spec.backend
    spec_dict = {**spec.model_dump(mode="json", exclude_none=True), "backend": backend}
    work = TrainSpec(
        dataset_uri=pod_path(cfg, status["datasetURI"]),
        trigger_word=board["spec"]["triggerWord"],
        image_count=images,
        backend=backend,
        model=spec.model.name,
        model_path=model_path(cfg, spec.model.name),
        mode=spec.mode,
        plan=plan_training(images, spec_dict, cfg.trainingLimits.model_dump()),
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


def _lora_inputs(refs: list[LoRAReference], deps: Mapping, cfg: OperatorConfig) -> tuple[LoraInput, ...]:
    return tuple(
        LoraInput(uri=pod_path(cfg, deps[(ref.kind, ref.name)]["status"]["loraURI"]), weight=ref.weight) for ref in refs
    )


def _generate(kind: Kind, body: Mapping, spec: GenerationJobSpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    work = GenerateSpec(
        model_path=model_path(cfg, spec.model.name),
        loras=_lora_inputs(spec.loras, deps, cfg),
        prompts=tuple(spec.prompts),
        negative_prompt=spec.negativePrompt,
        text_pipeline=spec.textPipeline,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance=spec.guidance,
        seeds=tuple(spec.seed + i for i in range(spec.count)),
        count=spec.count,
    )
    return _run(kind, body, work, cfg, "generate", spec.scheduling)


def _fuse(kind: Kind, body: Mapping, spec: LoRAFusionSpec, deps: Mapping, cfg: OperatorConfig) -> Run:
    work = FuseSpec(
        sources=_lora_inputs(spec.sources, deps, cfg),
        method=spec.method,
        rank=spec.rank,
        energy=spec.energy,
        selection=spec.selection or "hard",
    )
    return _run(kind, body, work, cfg, "fuse", spec.scheduling)


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
        "textPipeline": values["text_pipeline"],
        "fromSpec": from_spec,
        "hash": plan.plan_hash(),
    }
    return {"plan": summary, "totalSteps": values["steps"]}, list(plan.warnings)


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
    }


def _checkpoint_status(items: Any) -> list[dict[str, Any]]:
    """Checkpoints as status shows them; URIs the pod reports are shown as given but never used by the operator."""
    out = []
    for item in items or []:
        if isinstance(item, Mapping) and isinstance(item.get("step"), int):
            loss = item.get("loss")
            out.append(
                {
                    "step": item["step"],
                    "uri": str(item.get("uri") or ""),
                    "loss": float(loss) if isinstance(loss, int | float) else None,
                }
            )
    return out


def _eta(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float) or seconds < 0:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def lora_progress_status(progress: Mapping[str, Any]) -> dict[str, Any]:
    """A StyleLoRA's live status from its run's `status.progress.progress` (step, total, loss, ETA, checkpoints)."""
    step, total = progress.get("step"), progress.get("totalSteps")
    fields: dict[str, Any] = {}
    if isinstance(step, int):
        fields["step"] = step
        if isinstance(total, int) and total > 0:
            fields["totalSteps"] = total
            fields["progressText"] = f"{step}/{total} ({100 * step // total}%)"
    if isinstance(progress.get("loss"), int | float):
        fields["loss"] = float(progress["loss"])
    if (eta := _eta(progress.get("etaSeconds"))) is not None:
        fields["eta"] = eta
    if "checkpoints" in progress:
        fields["checkpoints"] = _checkpoint_status(progress.get("checkpoints"))
    return fields


def _lora_result(result: Mapping[str, Any], run: Run) -> dict[str, Any]:
    """The trained LoRA: where it is comes from the RunSpec, never from the pod."""
    steps, total = result.get("steps"), result.get("total_steps")
    fields: dict[str, Any] = {
        "loraURI": f"{run.runspec.output_display_uri}/lora.safetensors",
        "stopReason": result.get("stop_reason"),
        "checkpoints": _checkpoint_status(result.get("checkpoints")),
        "eta": None,
    }
    if isinstance(steps, int):
        fields["step"] = steps
        total = total if isinstance(total, int) and total > 0 else None
        if total:
            fields["totalSteps"] = total
            fields["progressText"] = f"{steps}/{total} ({100 * steps // total}%)"
    if isinstance(result.get("final_loss"), int | float):
        fields["loss"] = float(result["final_loss"])
    return fields


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
    progress_status: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None


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
        arrives_with="generation (issue #5)",
    ),
    "LoRAFusion": KindRun(
        BY_KIND["LoRAFusion"],
        "fuse",
        lambda s: _lora_deps(s.sources),
        _fuse,
        _fusion_result,
        cleared_fields={"loraURI": None, "rank": None, "energyKept": None, "durationSeconds": None},
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
