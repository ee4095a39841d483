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
from kleinstyle.contract.early_stop import StoppingSettings, Verdict, decide_reported
from kleinstyle.contract.layout import AITOOLKIT_DIR, CHECKPOINT_GALLERY, DATASET_DIR, LORA_FILE, lora_files
from kleinstyle.contract.plan import TrainingPlan, plan_training
from kleinstyle.contract.pod import AITOOLKIT_CONFIG_FILE, STOP_ANNOTATION, STOP_REQUESTED, parse_stop
from kleinstyle.contract.proxies import on_proxies
from kleinstyle.contract.reports import CheckpointReport, EvaluationReport, TrainProgress, TrainResult
from kleinstyle.contract.runspec import EvaluationSettings, EvaluationSpec, TrainSpec

from ..api import BY_KIND
from ..api.styleboard import StyleBoardSpec, StyleBoardStatus
from ..api.stylelora import (
    Checkpoint,
    ContentStage,
    LoraFile,
    PlanSummary,
    ScoreProxy,
    StyleLoRAOutcome,
    StyleLoRASpec,
    StyleLoRAStatus,
)
from ..children import Run
from ..config import OperatorConfig
from .base import Dependencies, Dependency, KindRuns, build_run, dependency_path, model_path, work_of


class StyleLoRARuns(KindRuns[StyleLoRASpec, TrainSpec, TrainProgress, TrainResult, StyleLoRAStatus]):
    kind = BY_KIND["StyleLoRA"]
    step = "train"
    outcome = StyleLoRAOutcome
    status_type = StyleLoRAStatus
    work_type = TrainSpec

    def dependencies(self, spec: StyleLoRASpec) -> list[Dependency]:
        return [Dependency("StyleBoard", spec.board_ref.name, DATASET_DIR)]

    def build(self, body: Mapping[str, Any], spec: StyleLoRASpec, deps: Dependencies, cfg: OperatorConfig) -> Run:
        board = deps[("StyleBoard", spec.board_ref.name)] or {}
        status = StyleBoardStatus.read(board.get("status"))
        images = status.images_accepted or 0
        backend = cfg.default_backend if spec.backend == "auto" else spec.backend
        spec_dict = {**spec.model_dump(mode="json", exclude_none=True), "backend": backend}
        plan = plan_training(images, spec_dict, cfg.training_limits.model_dump())
        work = TrainSpec(
            dataset_uri=dependency_path(cfg, "StyleBoard", board, DATASET_DIR),
            trigger_word=StyleBoardSpec.model_validate(board["spec"]).trigger_word,
            image_count=images,
            backend=backend,
            model=spec.model.name,
            model_path=model_path(cfg, spec.model.name),
            plan=plan,
            evaluation=evaluation(cfg, plan) if plan.early_stopping else None,
            style_profile=status.style_profile.document() if status.style_profile else None,
            lora_formats=tuple(spec.output.lora_formats),
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

    def planned(self, run: Run) -> tuple[StyleLoRAStatus, list[str]]:
        work = self.work(run)
        status = StyleLoRAStatus(
            plan=plan_summary(work.plan),
            total_steps=work.plan.steps.value,
            trigger_word=work.trigger_word,
            style_profile=work.style_profile,
        )
        return status, [*work.plan.warnings, *proxy_warning(work.evaluation)]

    def live(self, progress: TrainProgress, run: Run) -> StyleLoRAStatus:
        status = scored(progress.checkpoints, progress.evaluation, run)
        status.step = progress.step
        if progress.total_steps > 0:
            text = steps_text(progress.step, progress.total_steps)
            status.progress_text = f"{progress.stage} stage {text}" if progress.stage else text
            status.total_steps = progress.total_steps  # a two-step run's stages each count their own steps
        if progress.loss is not None:
            status.loss = progress.loss
        if (eta := eta_text(progress.eta_seconds)) is not None:
            status.eta = eta
        return status

    def result(self, result: TrainResult, run: Run) -> StyleLoRAStatus:
        status = scored(result.checkpoints, result.evaluation, run)
        # Where the LoRA is comes from the RunSpec, never from the pod; step 0: the base model won, no LoRA.
        status.lora_uri = f"{run.runspec.output_display_uri}/{LORA_FILE}" if result.lora_step > 0 else None
        folder, formats = run.runspec.output_display_uri, self.work(run).lora_formats
        published = [LoraFile(format=fmt, uri=f"{folder}/{name}") for fmt, name in lora_files(formats).items()]
        status.lora_files = published if result.lora_step > 0 else None
        status.stop_reason = result.stop_reason
        status.eta = None
        status.step = result.steps
        status.lora_step = result.lora_step
        if result.total_steps > 0:
            status.progress_text = steps_text(result.steps, result.total_steps)
            status.total_steps = result.total_steps
        if result.final_loss is not None:
            status.loss = result.final_loss
        return status

    def requested(self, body: Mapping[str, Any], run: Run) -> tuple[StyleLoRAStatus, list[str]]:
        """The stop the user asked of the current run (its `kleinstyle.dev/stop` annotation), as status shows it:
        `stopRequest`, output only (the trainer reads the annotation itself), and a warning for an annotation that
        names no run, which stops nothing. One naming an earlier run is that run's: it says nothing of this one."""
        value = ((body.get("metadata") or {}).get("annotations") or {}).get(STOP_ANNOTATION)
        if not isinstance(value, str):
            return StyleLoRAStatus(), []
        run_id = run.runspec.run_id()
        parsed = parse_stop(value)
        if parsed is None:
            return StyleLoRAStatus(), [
                f"metadata.annotations[{STOP_ANNOTATION}] stops nothing: its value must begin with the id of the run "
                f'to stop (status.runHash), e.g. {STOP_ANNOTATION}="{run_id}: enough"'
            ]
        return StyleLoRAStatus(stop_request=parsed[1] or STOP_REQUESTED) if parsed[
            0
        ] == run_id else StyleLoRAStatus(), []


def evaluation(cfg: OperatorConfig, plan: TrainingPlan) -> EvaluationSpec:
    """The operator's probe settings, the probe size held to the plan's training resolution."""
    ev = cfg.checkpoint_evaluation
    size = min(ev.size, int(plan.resolution.value) // 16 * 16)
    settings = EvaluationSettings.model_validate(ev.model_dump(include=set(EvaluationSettings.model_fields)))

    def cached(name: str | None) -> str | None:
        return f"{cfg.model_cache_mount_path}/{name}" if name else None

    return EvaluationSpec(
        **{**settings.model_dump(), "size": size},
        embedder_path=cached(ev.embedder_dir),
        style_embedder_path=cached(ev.style_embedder_dir),
        text_model_path=cached(ev.text_model_dir),
    )


EVALUATION_MODELS = (  # the chart's checkpointEvaluation key, the score it measures, what is missing without it
    ("styleEmbedderDir", "style", "style_embedder_path"),
    ("textModelDir", "adherence", "text_model_path"),
    ("embedderDir", "leakage", "embedder_path"),
)


def proxy_warning(evaluation: EvaluationSpec | None) -> list[str]:
    """The warning of a run whose checkpoints will be scored by stand-ins: the models the operator's configuration
    names none for (a model named but not in the cache, only the pod can tell: it reports `scoreProxies`)."""
    if evaluation is None:
        return []
    unset = [(key, score) for key, score, field in EVALUATION_MODELS if getattr(evaluation, field) is None]
    if not unset:
        return []
    named = ", ".join(f"{score} (checkpointEvaluation.{key})" for key, score in unset)
    return [
        f"no model configured for {named}: those checkpoint scores will be proxies, so early stopping will not "
        "stop the run or pick a checkpoint; the last checkpoint becomes the LoRA"
    ]


def plan_summary(plan: TrainingPlan) -> PlanSummary:
    """The plan's key values for `kubectl get -o yaml`: each setting, and which ones the spec set."""
    values = plan.values()
    summary = PlanSummary(
        variant=plan.variant,
        variant_reason=plan.variant_reason,
        rank=values["rank"],
        alpha=values["alpha"],
        optimizer=values["optimizer"],
        learning_rate=values["learning_rate"],
        steps=values["steps"],
        steps_reason=plan.steps.reason,
        checkpoint_every=values["checkpoint_every"],
        caption_dropout=values["caption_dropout"],
        resolution=values["resolution"],
        target_blocks=values["target_blocks"],
        early_stopping=plan.early_stopping,
        mode=plan.mode,
        text_pipeline=values["text_pipeline"],
        from_spec=sorted(name for name, item in plan if getattr(item, "source", None) == "spec"),
        hash=plan.plan_hash(),
    )
    if plan.content_stage:  # set only in two-step mode: a field set to None would be written as null
        summary.content_stage = ContentStage.model_validate(plan.content_stage.value)
    return summary


def steps_text(step: int, total: int) -> str:
    return f"{step}/{total} ({100 * step // total}%)"


def eta_text(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def verdict_of(evaluation: EvaluationReport | None, run: Run) -> Verdict | None:
    """The early-stopping policy on the scores a run reports: the same pure function the runtime applies."""
    work = work_of(run, TrainSpec)
    try:
        return decide_reported(evaluation, StoppingSettings.from_plan(work.plan))
    except ValueError:  # scores a pod reported inconsistent (probe counts differ): shown without them
        return None


def scored(checkpoints: list[CheckpointReport], evaluation: EvaluationReport | None, run: Run) -> StyleLoRAStatus:
    """Checkpoints as status shows them, with their scores and the policy's verdict when the run evaluates them.
    URIs the pod reports are shown as given but never used by the operator."""
    verdict = verdict_of(evaluation, run)
    if verdict is not None and evaluation is not None:
        verdict = on_proxies(verdict, evaluation.proxies)  # as the runtime acts on it
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
            entry.validation_loss = held_out[item.step]
        shown.append(entry)
    status = StyleLoRAStatus(checkpoints=shown)
    if verdict is not None:
        status.best_checkpoint = verdict.best_step
        status.early_stopping = verdict.reason
        status.base_score = verdict.base_score
    if evaluation is not None and evaluation.proxies:
        status.score_proxies = [ScoreProxy(score=k, measured_by=v) for k, v in sorted(evaluation.proxies.items())]
    if evaluation is not None:  # the runtime publishes the sheet with the base model's scores
        status.checkpoint_gallery_uri = f"{run.runspec.output_display_uri}/{CHECKPOINT_GALLERY}"
    return status
