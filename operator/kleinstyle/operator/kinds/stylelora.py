"""StyleLoRA: a board's dataset -> a `train` run (GPU) -> the best checkpoint as the LoRA.

YAML -> `build`: the TrainingPlan (`contract.plan`, the reference policy, capped by the operator's trainingLimits)
from the board's accepted images and the spec, the probe settings for early stopping, the board's STYLE_PROFILE to
carry along, and for ai-toolkit its job config beside the RunSpec -> Job `kleinstyle train` (runtime.train) ->
`TrainProgress` while it trains (`live`: step, loss, ETA, checkpoints with their scores) -> `TrainResult` (`result`:
the LoRA's URI from the RunSpec, why it stopped). The early-stopping verdict in status is the same pure function
(`contract.early_stop`) the runtime applies, run on the scores the run reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml
from kleinstyle.contract.aitoolkit import aitoolkit_config
from kleinstyle.contract.early_stop import Decision, StoppingSettings, decide_reported
from kleinstyle.contract.layout import AITOOLKIT_DIR, CHECKPOINT_GALLERY, DATASET_DIR, LORA_FILE
from kleinstyle.contract.plan import TrainingPlan, plan_training
from kleinstyle.contract.pod import AITOOLKIT_CONFIG_FILE, STOP_ANNOTATION, STOP_REQUESTED, parse_stop
from kleinstyle.contract.reports import CheckpointReport, EvaluationReport, TrainProgress, TrainResult
from kleinstyle.contract.runspec import EvaluationSpec, TrainSpec

from ..api import BY_KIND
from ..api.stylelora import Checkpoint, StyleLoRAOutcome, StyleLoRAPlanned, StyleLoRASpec
from ..children import Run
from ..config import OperatorConfig
from .base import (
    Dependencies,
    Dependency,
    Fields,
    KindRuns,
    build_run,
    dependency_path,
    model_path,
    status_fields,
    work_of,
)


class StyleLoRARuns(KindRuns[StyleLoRASpec, TrainSpec, TrainProgress, TrainResult]):
    kind = BY_KIND["StyleLoRA"]
    step = "train"
    outcome = StyleLoRAOutcome
    work_type = TrainSpec

    def dependencies(self, spec: StyleLoRASpec) -> list[Dependency]:
        return [Dependency("StyleBoard", spec.boardRef.name, "datasetURI", DATASET_DIR)]

    def build(self, body: Mapping[str, Any], spec: StyleLoRASpec, deps: Dependencies, cfg: OperatorConfig) -> Run:
        board = deps[("StyleBoard", spec.boardRef.name)] or {}
        status = board.get("status") or {}
        images = int(status.get("imagesAccepted") or 0)
        backend = cfg.defaultBackend if spec.backend == "auto" else spec.backend
        spec_dict = {**spec.model_dump(mode="json", exclude_none=True), "backend": backend}
        plan = plan_training(images, spec_dict, cfg.trainingLimits.model_dump())
        work = TrainSpec(
            dataset_uri=dependency_path(cfg, "StyleBoard", board, DATASET_DIR),
            trigger_word=board["spec"]["triggerWord"],
            image_count=images,
            backend=backend,
            model=spec.model.name,
            model_path=model_path(cfg, spec.model.name),
            plan=plan,
            evaluation=evaluation(cfg, plan) if plan.early_stopping else None,
            style_profile=status.get("styleProfile") if isinstance(status.get("styleProfile"), dict) else None,
        )
        run = build_run(self.kind, body, work, cfg, spec.scheduling)
        if backend != "ai-toolkit":
            return run
        config = aitoolkit_config(
            work.plan,
            name=run.owner.name,
            dataset_dir=work.dataset_uri,
            training_folder=f"{run.runspec.output_uri}/{AITOOLKIT_DIR}",
            trigger_word=work.trigger_word,
            model=work.model,
            model_path=work.model_path,
        )
        return replace(run, files={AITOOLKIT_CONFIG_FILE: yaml.safe_dump(config, sort_keys=False)})

    def planned(self, run: Run) -> tuple[Fields, list[str]]:
        work = self.work(run)
        fields = StyleLoRAPlanned(
            plan=plan_summary(work.plan),
            totalSteps=work.plan.steps.value,
            triggerWord=work.trigger_word,
            styleProfile=work.style_profile,
        )
        return status_fields(fields), list(work.plan.warnings)

    def live(self, progress: TrainProgress, run: Run) -> Fields:
        fields = StyleLoRAOutcome(step=progress.step)
        if progress.total_steps > 0:
            text = steps_text(progress.step, progress.total_steps)
            fields.progressText = f"{progress.stage} stage {text}" if progress.stage else text
        if progress.loss is not None:
            fields.loss = progress.loss
        if (eta := eta_text(progress.eta_seconds)) is not None:
            fields.eta = eta
        out = status_fields(fields)
        if progress.total_steps > 0:
            out["totalSteps"] = progress.total_steps  # a two-step run's stages each count their own steps
        return {**out, **scored(progress.checkpoints, progress.evaluation, run)}

    def result(self, result: TrainResult, run: Run) -> Fields:
        fields = StyleLoRAOutcome(
            # Where the LoRA is comes from the RunSpec, never from the pod; step 0: the base model won, no LoRA.
            loraURI=f"{run.runspec.output_display_uri}/{LORA_FILE}" if result.lora_step > 0 else None,
            stopReason=result.stop_reason,
            eta=None,
            step=result.steps,
            loraStep=result.lora_step,
        )
        if result.total_steps > 0:
            fields.progressText = steps_text(result.steps, result.total_steps)
        if result.final_loss is not None:
            fields.loss = result.final_loss
        out = status_fields(fields)
        if result.total_steps > 0:
            out["totalSteps"] = result.total_steps
        return {**out, **scored(result.checkpoints, result.evaluation, run)}

    def requested(self, body: Mapping[str, Any], run: Run) -> tuple[Fields, list[str]]:
        """The stop the user asked of the current run (its `kleinstyle.dev/stop` annotation), as status shows it:
        `stopRequest`, output only (the trainer reads the annotation itself), and a warning for an annotation that
        names no run, which stops nothing. One naming an earlier run is that run's: it says nothing of this one."""
        value = ((body.get("metadata") or {}).get("annotations") or {}).get(STOP_ANNOTATION)
        if not isinstance(value, str):
            return {}, []
        run_id = run.runspec.run_id()
        parsed = parse_stop(value)
        if parsed is None:
            return {}, [
                f"metadata.annotations[{STOP_ANNOTATION}] stops nothing: its value must begin with the id of the run "
                f'to stop (status.runHash), e.g. {STOP_ANNOTATION}="{run_id}: enough"'
            ]
        return ({"stopRequest": parsed[1] or STOP_REQUESTED}, []) if parsed[0] == run_id else ({}, [])


def evaluation(cfg: OperatorConfig, plan: TrainingPlan) -> EvaluationSpec:
    """The operator's probe settings, the probe size held to the plan's training resolution."""
    ev = cfg.checkpointEvaluation
    size = min(ev.size, int(plan.resolution.value) // 16 * 16)
    settings = ev.model_dump(exclude={"embedderDir", "styleEmbedderDir", "textModelDir"})

    def cached(name: str | None) -> str | None:
        return f"{cfg.modelCacheMountPath}/{name}" if name else None

    return EvaluationSpec(
        **{**settings, "size": size},
        embedder_path=cached(ev.embedderDir),
        style_embedder_path=cached(ev.styleEmbedderDir),
        text_model_path=cached(ev.textModelDir),
    )


def plan_summary(plan: TrainingPlan) -> dict[str, Any]:
    """The plan's key values for `kubectl get -o yaml`: each setting, and which ones the spec set."""
    values = plan.values()
    from_spec = sorted(name for name, item in plan if getattr(item, "source", None) == "spec")
    return {
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


def steps_text(step: int, total: int) -> str:
    return f"{step}/{total} ({100 * step // total}%)"


def eta_text(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def decision(evaluation: EvaluationReport | None, run: Run) -> Decision | None:
    """The early-stopping policy on the scores a run reports: the same pure function the runtime applies."""
    work = work_of(run, TrainSpec)
    try:
        return decide_reported(evaluation, StoppingSettings.from_plan(work.plan))
    except ValueError:  # scores a pod reported inconsistent (probe counts differ): shown without them
        return None


def scored(checkpoints: list[CheckpointReport], evaluation: EvaluationReport | None, run: Run) -> Fields:
    """Checkpoints as status shows them, with their scores and the policy's verdict when the run evaluates them.
    URIs the pod reports are shown as given but never used by the operator."""
    verdict = decision(evaluation, run)
    judged = {j.step: j for j in verdict.judged} if verdict else {}
    held_out = {c.step: c.validation_loss for c in evaluation.checkpoints} if evaluation else {}
    shown = []
    for item in checkpoints:
        entry = Checkpoint(step=item.step, uri=item.uri, loss=item.loss)
        if (j := judged.get(item.step)) is not None:
            entry.score = j.score
            if j.why_not:
                entry.ineligible = j.why_not
        if held_out.get(item.step) is not None:
            entry.validationLoss = held_out[item.step]
        shown.append(entry)
    fields = StyleLoRAOutcome(checkpoints=shown)
    if verdict is not None:
        fields.bestCheckpoint = verdict.best_step
        fields.earlyStopping = verdict.reason
        fields.baseScore = verdict.base_score
    if evaluation is not None:  # the runtime publishes the sheet with the base model's scores
        fields.checkpointGalleryURI = f"{run.runspec.output_display_uri}/{CHECKPOINT_GALLERY}"
    return status_fields(fields)
