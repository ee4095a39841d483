"""The StyleLoRA train step: run the plan on a backend, report progress, honour stop requests, publish the LoRA.

Output under the run's `output_uri` (a path on the artifact volume):
    work/                       the builtin backend's checkpoints (work/checkpoints/step_NNNNNN/) and the localised
                                ai-toolkit config
    aitoolkit/NAME/             ai-toolkit's own training folder (set by the operator in aitoolkit.yaml)
                                both on the volume, so a restarted pod resumes
    lora.safetensors            the published LoRA (copied atomically: staged name, then rename)
    lora.json                   its sidecar: step, loss, plan hash, backend, versions, RunSpec hash
    work/evaluation/            probe scores per checkpoint (the evaluation cache a restarted pod reads)
Policy, decided here:
- Progress (`contract.reports.TrainProgress`) goes to `status.progress` at most every `step.REPORT_INTERVAL_S`
  seconds, and at once at each checkpoint.
- With early stopping on (the plan) and an `evaluation` in the RunSpec, every checkpoint is scored by rendered
  probes and the pure policy in `contract.early_stop` decides the best checkpoint and when to stop; the best checkpoint,
  not the last, becomes the LoRA.
- A stop request (the owner's `kleinstyle.dev/stop` annotation naming this run, polled every `step.STOP_POLL_S`
  seconds) ends training at the next step; the best checkpoint (the latest one without evaluation) becomes the LoRA
  and the run succeeds with stop_reason "stop requested" (": " and the user's reason, when one was given).
- SIGTERM (preemption) saves a checkpoint (builtin) and exits 1: the Job's next pod resumes from it.
- With an object store (s3://, gs://) as the artifact store the builtin backend trains in local scratch and mirrors
  each checkpoint to `work/checkpoints/` there (kleinstyle.runtime.checkpoint_mirror); ai-toolkit needs the volume.
- Input that can never succeed (no dataset, no model directory, a target naming no layer, an object-store output
  for ai-toolkit) exits 2, which the Job's podFailurePolicy turns into an immediate failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from kleinstyle.contract.early_stop import Decision, StoppingSettings, decide_reported
from kleinstyle.contract.layout import CHECKPOINT_GALLERY, LORA_FILE, LORA_SIDECAR, WORK_DIR
from kleinstyle.contract.plan import TrainingPlan
from kleinstyle.contract.pod import AITOOLKIT_CONFIG_PATH, EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK
from kleinstyle.contract.reports import CheckpointReport, EvaluationReport, State, TrainProgress, TrainResult
from kleinstyle.contract.runspec import RunSpec, TrainSpec

from .artifacts import join_uri, write_bytes_atomic, write_json_atomic
from .errors import BadInput
from .paths import is_object_store, is_remote, local_path
from .step import Outcome, Reporter, run_step, run_work

log = logging.getLogger(__name__)

CONTENT_LORA = LORA_FILE  # two-step mode: the content stage's LoRA, in work/content/
STOP_REQUESTED = "stop requested"


# --- plan -> builtin settings (pure) ---------------------------------------------------------------------------

BFL_TO_DIFFUSERS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def diffusers_prefix(block: str) -> str:
    """A BFL/ai-toolkit block name (`single_blocks.3`) as the diffusers module prefix (`single_transformer_blocks.3.`);
    the trailing dot keeps block 1 from also matching 10-19."""
    kind, _, index = block.partition(".")
    if kind not in BFL_TO_DIFFUSERS or not index.isdigit():
        raise BadInput(f"block {block!r} is not a klein block name (double_blocks.N or single_blocks.N)")
    return f"{BFL_TO_DIFFUSERS[kind]}.{int(index)}."


def builtin_target(plan: TrainingPlan) -> str | tuple[str, ...]:
    """ "all", "single" and "double" stay names (they fit any klein size); custom blocks become diffusers prefixes."""
    target = plan.target_blocks.value
    if target in ("all", "single", "double"):
        return target
    if not plan.blocks:
        raise BadInput("targetBlocks is custom but no blocks are listed")
    return tuple(diffusers_prefix(block) for block in plan.blocks)


def held_out_count(work: TrainSpec) -> int:
    """References the run leaves out of training: the plan's, when checkpoints are evaluated (the held-out loss
    is part of the evaluation), else none."""
    return int(work.plan.validation_images.value) if work.evaluation is not None and work.plan.early_stopping else 0


def train_settings(plan: TrainingPlan, validation_images: int = 0) -> Any:
    """The builtin trainer's TrainSettings for `plan` (imports torch), leaving `validation_images` out."""
    from .klein.lora_train import TrainSettings

    v = plan.values()
    return TrainSettings(
        rank=int(v["rank"]),
        alpha=float(v["alpha"]),
        learning_rate=float(v["learning_rate"]),
        weight_decay=float(v["weight_decay"]),
        optimizer=v["optimizer"],
        steps=int(v["steps"]),
        scheduler=v["scheduler"],
        caption_dropout=float(v["caption_dropout"]),
        resolution=int(v["resolution"]),
        target=builtin_target(plan),
        checkpoint_every=int(v["checkpoint_every"]),
        checkpoint_steps=tuple(plan.checkpoint_steps),
        seed=int(v["seed"]),
        compile_blocks=True,  # on CUDA only
        fp8_base=bool(v["fp8_base"]),
        validation_images=validation_images,
    )


# --- progress and stop requests --------------------------------------------------------------------------------


class TrainReporter:
    """A training run's progress as its reports show it (`contract.reports.TrainProgress`), sent through the step
    harness's Reporter, and whether and why the run must stop: early stopping, or the user's stop request."""

    def __init__(self, reporter: TrainReporter, total: int) -> None:
        self.reporter = reporter
        self.total = total
        self.checkpoints: list[CheckpointReport] = []
        self.step = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.seconds_per_step: float | None = None
        self._last_step_time: float | None = None
        self.stop_reason: str | None = None  # set once the run must stop at its next step
        self.stage: Literal["content", "style"] | None = None  # two-step mode: "content", then "style"
        self.warnings: list[str] = []  # for the result, hence the StyleLoRA's Warning condition
        # Probe scores of the base model and of each checkpoint (early_stop.decide_reported reads them).
        self.evaluation: EvaluationReport | None = None
        reporter.progress = self.progress  # every report shows the progress as it is then

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def progress(self) -> TrainProgress:
        eta = None
        if self.seconds_per_step is not None:
            eta = round(self.seconds_per_step * max(0, self.total - self.step), 1)
        return TrainProgress(
            step=self.step,
            totalSteps=self.total,
            loss=self.loss,
            lr=self.lr,
            secondsPerStep=None if self.seconds_per_step is None else round(self.seconds_per_step, 4),
            etaSeconds=eta,
            checkpoints=list(self.checkpoints),
            evaluation=self.evaluation,
            stage=self.stage,
        )

    def send(self, state: State, message: str) -> bool:
        return self.reporter.send(state, message)

    def on_step(self, step: int, total: int, loss: float | None, lr: float | None, seconds: float | None) -> None:
        now = self.reporter.clock()
        if seconds is None and self._last_step_time is not None and step > self.step:
            seconds = (now - self._last_step_time) / (step - self.step)
        self._last_step_time = now
        self.step, self.total = step, total or self.total
        self.loss = self.loss if loss is None else float(loss)
        self.lr = self.lr if lr is None else float(lr)
        if seconds is not None:  # a moving average: the first steps (compilation, caches) are slow
            sps = self.seconds_per_step
            self.seconds_per_step = seconds if sps is None else 0.8 * sps + 0.2 * seconds
        self.reporter.tick(f"step {self.step}/{self.total}")

    def add_checkpoint(self, step: int, uri: str, loss: float | None) -> None:
        self.checkpoints = sorted(
            [c for c in self.checkpoints if c.step != step] + [CheckpointReport(step=step, uri=uri, loss=loss)],
            key=lambda c: c.step,
        )

    def on_checkpoint(self, step: int, uri: str, loss: float | None) -> None:
        self.add_checkpoint(step, uri, loss)
        self.send("Running", f"step {self.step}/{self.total}; checkpoint at step {step}")

    def loss_at(self, step: int) -> float | None:
        return next((c.loss for c in self.checkpoints if c.step == step), None)

    def request_stop(self, reason: str) -> None:
        """Stop at the next step for `reason` (early stopping)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self) -> bool:
        if self.stop_reason is None and (reason := self.reporter.stop_request()) is not None:
            self.stop_reason = f"{STOP_REQUESTED}: {reason}" if reason else STOP_REQUESTED
        return self.stop_requested


# --- checkpoint evaluation ------------------------------------------------------------------------------------


class Judge:
    """Scores each checkpoint (kleinstyle.runtime.klein.evaluate) and applies the early-stopping policy
    (kleinstyle.contract.early_stop): the scores go into progress, a stop decision stops training at the next step, the
    best checkpoint is the one promoted to the LoRA (none when the base model beats them all), and the probe
    renders of every step are published as one contact sheet (`layout.CHECKPOINT_GALLERY`) after each evaluation."""

    def __init__(self, spec: RunSpec, reporter: TrainReporter, work_dir: Path) -> None:
        from .klein.dataset import held_out, read_dataset
        from .klein.evaluate import CSDStyleEmbedder, Evaluator, TextImageScorer, VisionModelEmbedder
        from .klein.lora_train import compute_dtype, default_device

        work = spec.work
        assert isinstance(work, TrainSpec) and work.evaluation is not None
        self.spec = spec
        self.reporter = reporter
        self.settings = StoppingSettings.from_plan(work.plan)
        device = default_device()
        evaluation = work.evaluation
        models = {
            "embedderDir": (evaluation.embedder_path, VisionModelEmbedder),
            "styleEmbedderDir": (evaluation.style_embedder_path, CSDStyleEmbedder),
            "textModelDir": (evaluation.text_model_path, TextImageScorer),
        }
        loaded: dict[str, Any] = {}
        for key, (path, load) in models.items():
            if path is None:
                continue
            if not (local_path(path) / "config.json").is_file():
                raise BadInput(f"checkpointEvaluation.{key}: no model at {path} (no config.json)")
            try:
                loaded[key] = load(local_path(path), device=device)
            except (OSError, ValueError) as exc:
                raise BadInput(f"checkpointEvaluation.{key}: {path} cannot be loaded: {exc}") from exc
        training, validation = held_out(read_dataset(dataset_folder(spec)), held_out_count(work))
        self.evaluator = Evaluator(
            local_path(work.model_path),
            [sample.image for sample in training],
            work.trigger_word,
            evaluation,
            cache_dir=work_dir / "evaluation",
            text_encoder_layers=train_settings(work.plan).text_encoder_layers,
            content=loaded.get("embedderDir"),
            style=loaded.get("styleEmbedderDir"),
            adherence=loaded.get("textModelDir"),
            held_out=validation,
            resolution=int(work.plan.resolution.value),
            device=device,
            dtype=compute_dtype(device),
        )
        baseline = self.evaluator.score(0, None)
        reporter.evaluation = EvaluationReport(baseline=baseline.to_report())
        self.decision: Decision | None = None
        self.publish_gallery()

    def judge(self, step: int, lora_file: Path) -> None:
        """Score the checkpoint of `step`; ask the run to stop when the policy says so."""
        scores = self.evaluator.score(step, lora_file)
        evaluation = self.reporter.evaluation
        assert evaluation is not None
        evaluation.checkpoints = [c for c in evaluation.checkpoints if c.step != step] + [scores.to_report()]
        self.decision = decide_reported(evaluation, self.settings)
        assert self.decision is not None
        log.info(
            "checkpoint %d scored %.4f (base %.4f); best %s; %s",
            step,
            self.decision.score_of(step),
            self.decision.base_score,
            self.decision.best_step,
            self.decision.reason,
        )
        self.publish_gallery()
        if self.decision.stop:
            self.reporter.request_stop(f"early stopping: {self.decision.reason}")

    def publish_gallery(self) -> None:
        import io

        sheet = self.evaluator.gallery(self.decision)
        if sheet is None:  # no probe renders kept (scores from an older cache)
            return
        buffer = io.BytesIO()
        sheet.save(buffer, "PNG")
        write_bytes_atomic(join_uri(self.spec.output_uri, CHECKPOINT_GALLERY), buffer.getvalue())

    def best_step(self) -> int | None:
        """The checkpoint to promote: None when none passed the guards (the latest one is, with a warning), 0 when
        the base model beats every eligible one (nothing is, with a warning)."""
        decision = self.decision
        if decision is not None and decision.best_step is None and decision.judged:
            reasons = "; ".join(sorted({j.why_not for j in decision.judged if j.why_not}))
            self.reporter.warnings.append(
                f"no checkpoint passed the early-stopping guards ({reasons}): the latest one became the LoRA; "
                "look at it before using it"
            )
        if decision is not None and decision.best_step == 0:
            top = max((j.score for j in decision.judged if j.eligible), default=float("nan"))
            self.reporter.warnings.append(
                f"every checkpoint scored below the base model (best J {top:.4f}, base {decision.base_score:.4f}): "
                f"no LoRA was published; see {CHECKPOINT_GALLERY} in the run's artifacts. Train longer or on more "
                "references, or set earlyStopping.enabled: false to publish the last checkpoint regardless"
            )
        elif decision is not None and decision.best_step and decision.base_score is not None:
            best = decision.score_of(decision.best_step)
            if best is not None and best <= decision.base_score:
                self.reporter.warnings.append(
                    f"the best checkpoint (step {decision.best_step}, J {best:.4f}) does not score above the base "
                    f"model ({decision.base_score:.4f}) beyond the probes' noise: it may have learned little of the "
                    f"style; see {CHECKPOINT_GALLERY} before using it"
                )
        return decision.best_step if decision else None

    def close(self) -> None:
        self.evaluator.close()


# --- publishing --------------------------------------------------------------------------------------------------


def publish_lora(spec: RunSpec, source: Path, info: dict[str, Any]) -> str:
    """Copy `source` to `{output_uri}/lora.safetensors` with its sidecar; return the display URI."""
    from .artifacts import kleinstyle_version

    work = spec.work
    assert isinstance(work, TrainSpec)
    sidecar = {
        "step": "train",
        "runspec_hash": spec.content_hash(),
        "plan_hash": work.plan.plan_hash(),
        "backend": work.backend,
        "model": work.model,
        "trigger_word": work.trigger_word,
        "style_profile": work.style_profile,
        "owner": spec.owner.model_dump(mode="json"),
        "uri": join_uri(spec.output_display_uri, LORA_FILE),
        "format": "diffusers LoRA (transformer.*.lora_A/lora_B), alpha baked into lora_B",
        "kleinstyle_version": kleinstyle_version(),
        **info,
    }
    write_bytes_atomic(join_uri(spec.output_uri, LORA_FILE), source.read_bytes())  # one PUT or temp + rename
    write_json_atomic(join_uri(spec.output_uri, LORA_SIDECAR), sidecar)
    return sidecar["uri"]


def _display(spec: RunSpec, work_dir: Path, path: Path) -> str:
    return join_uri(spec.output_display_uri, WORK_DIR, str(path.relative_to(work_dir)))


# --- backends ----------------------------------------------------------------------------------------------------


def scratch(spec: RunSpec) -> Path:
    """This run's folder in the pod's scratch (/tmp, an emptyDir): the owner's uid keeps two resources with the same
    RunSpec apart where pods share a /tmp (the embedded cluster)."""
    return Path(tempfile.gettempdir()) / "kleinstyle" / f"{spec.owner.uid}-{spec.run_id()}"


def dataset_folder(spec: RunSpec) -> Path:
    """The board's dataset as a folder: on the artifact volume, or downloaded once into scratch from an object
    store (the trainer lists and re-reads it, which object stores do slowly)."""
    work = spec.work
    assert isinstance(work, TrainSpec)
    if not is_remote(work.dataset_uri):
        return local_path(work.dataset_uri)
    target = scratch(spec) / "dataset"
    if not (target / ".complete").is_file():
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(work.dataset_uri)
        shutil.rmtree(target, ignore_errors=True)
        fs.get(root.rstrip("/") + "/", str(target) + "/", recursive=True)
        (target / ".complete").write_text(work.dataset_uri)
    return target


def _without_held_out(spec: RunSpec, folder: Path, work_dir: Path) -> Path:
    """The dataset ai-toolkit trains on: `folder` itself, or, when the plan holds references out for the
    validation loss, a folder of links to the others (ai-toolkit trains on whatever its folder holds)."""
    from .klein.dataset import held_out, read_dataset

    work = spec.work
    assert isinstance(work, TrainSpec)
    count = held_out_count(work)
    if count == 0:
        return folder
    training, _ = held_out(read_dataset(folder), count)
    target = work_dir / "dataset-train"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for sample in training:
        for path in (sample.image, sample.image.with_suffix(".txt")):
            if path.is_file():
                (target / path.name).symlink_to(path.resolve())
    return target


def _check_builtin_input(spec: RunSpec, target: str | tuple[str, ...]) -> None:
    from .klein.dataset import DatasetError, read_dataset
    from .klein.encode import ModelDirError, check_model_dir
    from .klein.lora_train import lora_targets

    work = spec.work
    assert isinstance(work, TrainSpec)
    try:
        check_model_dir(local_path(work.model_path))
        read_dataset(dataset_folder(spec))
        lora_targets(local_path(work.model_path), target)
    except (ModelDirError, DatasetError, ValueError) as exc:
        raise BadInput(str(exc)) from exc


def _content_stage(spec: RunSpec, style: Any, reporter: TrainReporter, work_dir: Path, mirror: Any) -> Path | Outcome:
    """Two-step mode's first stage (plan.py): a content LoRA on trigger-less captions, in work/content/. Returns its
    LoRA file, or the run's outcome when the stage did not finish (SIGTERM: resume; a stop request: no LoRA yet)."""
    from .klein.lora_train import StepInfo, train_lora

    work = spec.work
    assert isinstance(work, TrainSpec) and work.plan.content_stage is not None
    content_lora = work_dir / "content" / CONTENT_LORA
    if mirror is not None and mirror.download(f"content/{CONTENT_LORA}", content_lora):
        return content_lora  # an earlier pod finished the stage: the style stage resumes on the very same LoRA
    stage = work.plan.content_stage.value
    cfg = dataclasses.replace(
        style,
        rank=int(stage["rank"]),
        alpha=None,
        steps=int(stage["steps"]),
        checkpoint_every=max(1, int(stage["steps"]) // 4),
        checkpoint_steps=(),
        strip_trigger=work.trigger_word,
    )
    reporter.stage, reporter.total = "content", cfg.steps

    def on_step(info: StepInfo) -> None:
        reporter.on_step(info.step, info.total, info.loss, info.lr, info.seconds)

    result = train_lora(
        local_path(work.model_path),
        dataset_folder(spec),
        work_dir / "content",
        cfg,
        should_stop=reporter.should_stop,
        on_step=on_step,
        handle_sigterm=True,
    )
    if result.lora_path is not None:
        if mirror is not None:
            mirror.upload_file(result.lora_path, f"content/{CONTENT_LORA}")
        return result.lora_path
    if reporter.stop_requested:
        return Outcome(EXIT_BAD_SPEC, "stop requested during the content stage: there is no style LoRA to promote yet")
    message = f"interrupted in the content stage at step {result.steps_done} (SIGTERM); the next pod resumes"
    return Outcome(EXIT_FAILED, message, resumes=True)


def _work_folder(spec: RunSpec) -> tuple[Path, Any]:
    """The builtin trainer's folder: on the artifact volume, or, for an object store, local scratch whose
    checkpoints a CheckpointMirror uploads (and a restarted pod downloads first)."""
    if not is_remote(spec.output_uri):
        return local_path(join_uri(spec.output_uri, WORK_DIR)), None
    from .checkpoint_mirror import CheckpointMirror

    work_dir = scratch(spec) / WORK_DIR
    mirror = CheckpointMirror(join_uri(spec.output_uri, WORK_DIR), work_dir)
    mirror.restore()
    return work_dir, mirror


def run_builtin(spec: RunSpec, reporter: TrainReporter) -> Outcome:
    """A training run on the builtin backend (kleinstyle.runtime.klein.lora_train)."""
    from .klein.lora_train import ResumeError, StepInfo, train_lora

    work = spec.work
    assert isinstance(work, TrainSpec)
    # The cheap checks first, before torch is imported (seconds) for nothing.
    if not (local_path(work.model_path) / "model_index.json").is_file():
        raise BadInput(f"no diffusers pipeline at {work.model_path} (model_index.json missing): fill the model cache")
    try:
        cfg = train_settings(work.plan, held_out_count(work))
    except ValueError as exc:
        raise BadInput(f"the plan cannot be trained: {exc}") from exc
    _check_builtin_input(spec, cfg.target)
    work_dir, mirror = _work_folder(spec)
    if work.plan.mode == "two-step":
        content = _content_stage(spec, cfg, reporter, work_dir, mirror)
        if not isinstance(content, Path):
            return content
        digest = hashlib.sha256(content.read_bytes()).hexdigest()
        cfg = dataclasses.replace(cfg, base_lora=str(content), base_lora_digest=digest)
        reporter.stage, reporter.total, reporter.step = "style", cfg.steps, 0

    from .klein import checkpoints as ckpt

    judge = Judge(spec, reporter, work_dir) if work.evaluation is not None and work.plan.early_stopping else None

    def on_grid(step: int) -> bool:
        """Planned checkpoints only: one saved on a stop or SIGTERM is promotable, not an evaluation, so when a run
        stops never depends on when it was preempted."""
        return cfg.is_checkpoint(step)

    # A restarted pod reports the checkpoints of the pods before it from the start, not only its own (their
    # scores come from the evaluation cache).
    for path in ckpt.list_checkpoints(work_dir):
        step = int(path.name.split("_")[-1])
        loss = ckpt.read_metadata(path).get("loss")
        reporter.add_checkpoint(step, _display(spec, work_dir, path), loss)
        reporter.step = max(reporter.step, step)
        if judge is not None and on_grid(step):
            judge.judge(step, path / ckpt.LORA_FILE)

    def on_step(info: StepInfo) -> None:
        reporter.on_step(info.step, info.total, info.loss, info.lr, info.seconds)

    def on_checkpoint(step: int, path: Path, loss: float) -> None:
        if mirror is not None:
            mirror.upload(path)  # before anything reports it: a reported checkpoint is one a new pod can resume from
        if judge is not None and on_grid(step):
            judge.judge(step, path / ckpt.LORA_FILE)
        reporter.on_checkpoint(step, _display(spec, work_dir, path), loss)

    try:
        result = train_lora(
            local_path(work.model_path),
            dataset_folder(spec),
            work_dir,
            cfg,
            on_checkpoint=on_checkpoint,
            should_stop=reporter.should_stop,
            on_step=on_step,
            handle_sigterm=True,
        )
    except ResumeError as exc:  # the work folder holds another plan's checkpoints: a retry cannot fix that
        raise BadInput(str(exc)) from exc
    finally:
        if judge is not None:
            judge.close()
    reporter.step = result.steps_done
    reporter.loss = result.final_loss
    if result.stopped_early and not reporter.stop_requested:
        message = f"interrupted at step {result.steps_done} of {result.total_steps} (SIGTERM); the next pod resumes"
        return Outcome(EXIT_FAILED, message, resumes=True)
    if result.stopped_early and not result.checkpoints:
        return Outcome(EXIT_BAD_SPEC, "stop requested before the first step: there is no checkpoint to promote")
    stop_reason = (reporter.stop_reason or STOP_REQUESTED) if result.stopped_early else "completed"
    best = judge.best_step() if judge is not None else None
    if best == 0:
        return _unpromoted(reporter, result.total_steps, stop_reason)
    if best is not None:
        chosen = ckpt.checkpoint_path(work_dir, best)
    elif result.stopped_early:
        chosen = result.checkpoints[-1]
    else:
        assert result.lora_path is not None
        return _finish(
            spec,
            reporter,
            result.lora_path,
            result.steps_done,
            result.total_steps,
            result.final_loss,
            stop_reason,
            "builtin",
        )
    step = int(chosen.name.split("_")[-1])
    loss = ckpt.read_metadata(chosen).get("loss")
    return _finish(
        spec, reporter, chosen / ckpt.LORA_FILE, step, result.total_steps, loss, stop_reason, "builtin", best
    )


def _finish(
    spec: RunSpec,
    reporter: TrainReporter,
    source: Path,
    step: int,
    total: int,
    loss: float | None,
    stop_reason: str,
    backend: str,
    best: int | None = None,
) -> Outcome:
    from .artifacts import kleinstyle_version

    lora_uri = publish_lora(
        spec,
        source,
        {"trained_steps": step, "total_steps": total, "loss": loss, "versions": {"kleinstyle": kleinstyle_version()}},
    )
    result = TrainResult(
        lora_file=lora_uri,
        steps=max(reporter.step, step),  # trained; the LoRA is the checkpoint of lora_step
        lora_step=step,
        total_steps=total,
        final_loss=loss,
        checkpoints=list(reporter.checkpoints),
        stopped_early=stop_reason != "completed",
        stop_reason=stop_reason,
        best_checkpoint=best,
        warnings=list(reporter.warnings),
        evaluation=reporter.evaluation,
    )
    if stop_reason == "completed" and step == total:
        message = f"trained {step} steps (loss {_fmt(loss)}); LoRA at {lora_uri}"
    elif stop_reason == "completed":
        message = f"trained {total} steps; the best checkpoint, step {step}, is the LoRA at {lora_uri}"
    else:
        message = f"{stop_reason} at step {reporter.step}: promoted the checkpoint of step {step} to {lora_uri}"
    return Outcome(EXIT_OK, message, result)


def _unpromoted(reporter: TrainReporter, total: int, stop_reason: str) -> Outcome:
    """The base model beat every checkpoint: nothing is published, and the result says so (a Warning in status)."""
    result = TrainResult(
        lora_file=None,
        steps=reporter.step,
        lora_step=0,
        total_steps=total,
        checkpoints=list(reporter.checkpoints),
        stopped_early=stop_reason != "completed",
        stop_reason=stop_reason,
        best_checkpoint=0,
        warnings=list(reporter.warnings),
        evaluation=reporter.evaluation,
    )
    return Outcome(EXIT_OK, f"{stop_reason} at step {reporter.step}: no checkpoint beat the base model", result)


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def run_aitoolkit(spec: RunSpec, reporter: TrainReporter) -> Outcome:
    """A training run on ai-toolkit (aitoolkit_run.py launches it and reads its progress and checkpoints)."""
    import yaml

    from . import aitoolkit_run

    if is_object_store(spec.output_uri):
        raise BadInput("ai-toolkit trains into a folder on the artifact volume (a PVC), not an object store")
    source = local_path(AITOOLKIT_CONFIG_PATH)
    if not source.is_file():
        raise BadInput(f"the ai-toolkit config {AITOOLKIT_CONFIG_PATH} is missing from the run's ConfigMap")
    config = yaml.safe_load(source.read_text())
    process = config["config"]["process"][0]
    name = config["config"]["name"]
    training_folder = local_path(process["training_folder"])
    # ai-toolkit reads pod paths; under a local rootfs they must point where this machine keeps them.
    process["training_folder"] = str(training_folder)
    if str(process["model"].get("name_or_path", "")).startswith("/"):
        process["model"]["name_or_path"] = str(local_path(process["model"]["name_or_path"]))
    work_dir = local_path(join_uri(spec.output_uri, WORK_DIR))
    work_dir.mkdir(parents=True, exist_ok=True)
    for dataset in process.get("datasets") or []:
        dataset["folder_path"] = str(_without_held_out(spec, local_path(dataset["folder_path"]), work_dir))
    training_folder.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "aitoolkit.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")  # rewritten by every pod
    seen: set[int] = set()
    work = spec.work
    assert isinstance(work, TrainSpec)
    # Scoring shares the GPU with ai-toolkit (one more bf16 transformer: ~18 GB on klein 9B).
    judge = Judge(spec, reporter, work_dir) if work.evaluation is not None and work.plan.early_stopping else None
    paths: dict[int, Path] = {}

    def on_progress(progress: aitoolkit_run.Progress) -> None:
        for step, path in aitoolkit_run.checkpoints(training_folder, name):
            if step not in seen and aitoolkit_run.is_complete(path):
                seen.add(step)
                paths[step] = path
                uri = join_uri(spec.output_display_uri, str(path.relative_to(local_path(spec.output_uri))))
                if judge is not None:
                    judge.judge(step, path)
                reporter.add_checkpoint(step, uri, reporter.loss)
        reporter.on_step(progress.step, progress.total, progress.loss, progress.lr, None)

    total = int(process["train"]["steps"])
    final = training_folder / name / f"{name}.safetensors"
    for path in aitoolkit_run.discard_incomplete(training_folder, name):
        log.warning("deleted %s: cut off by a killed save; ai-toolkit resumes from the one before", path.name)
    try:
        if aitoolkit_run.is_complete(final):  # an earlier pod of this run finished training but not its report
            log.info("ai-toolkit already finished this run; publishing from %s", final.parent)
            on_progress(aitoolkit_run.Progress(total, total))
            outcome = aitoolkit_run.RunOutcome(exit_code=0, stopped=False, last=None, failure=None)
        else:
            outcome = aitoolkit_run.launch(config_path, on_progress=on_progress, should_stop=reporter.should_stop)
            on_progress(outcome.last or aitoolkit_run.Progress(reporter.step, total))  # the last checkpoints
        if judge is not None and total not in paths and aitoolkit_run.is_complete(final):
            paths[total] = final  # ai-toolkit saves no step checkpoint at the end: its final file is that step's
            judge.judge(total, final)
    finally:
        if judge is not None:
            judge.close()
    last_loss = outcome.last.loss if outcome.last else None
    best = judge.best_step() if judge is not None else None
    if outcome.stopped:
        if not paths:
            return Outcome(EXIT_BAD_SPEC, "stop requested before ai-toolkit saved a checkpoint: nothing to promote")
        step = best if best is not None else max(paths)  # else the newest complete checkpoint
        loss = reporter.loss_at(step)
        reason = reporter.stop_reason or STOP_REQUESTED
        return _finish(spec, reporter, paths[step], step, total, loss, reason, "ai-toolkit", best)
    if outcome.failure is not None:
        reason, message = outcome.failure
        code = EXIT_BAD_SPEC if reason in ("ModelMissing", "BadDataset") else EXIT_FAILED
        return Outcome(code, f"{reason}: {message} (ai-toolkit exit code {outcome.exit_code})")
    if not aitoolkit_run.is_complete(final):
        return Outcome(EXIT_FAILED, f"ai-toolkit finished without a complete {final.name}")
    if best is not None and best in paths and best != total:
        loss = reporter.loss_at(best)
        return _finish(spec, reporter, paths[best], best, total, loss, "completed", "ai-toolkit", best)
    return _finish(spec, reporter, final, total, total, last_loss, "completed", "ai-toolkit", best)


# --- the step ----------------------------------------------------------------------------------------------------


def run_train(spec: RunSpec, reporter: TrainReporter) -> Outcome:
    work = spec.work
    assert isinstance(work, TrainSpec)
    if work.plan.mode == "two-step" and work.backend != "builtin":
        raise BadInput("mode two-step trains on the builtin backend: set backend: builtin")
    if work.backend == "builtin":
        return run_builtin(spec, reporter)
    return run_aitoolkit(spec, reporter)


def work(spec: RunSpec, reporter: Reporter) -> Outcome:
    """The train step in its pod (step.py runs it)."""
    assert isinstance(spec.work, TrainSpec)
    total = int(spec.work.plan.steps.value)
    training = TrainReporter(reporter, total)
    training.send("Running", f"starting {spec.work.backend} training: {total} steps")
    return run_train(spec, training)


def main(spec_path: str) -> int:
    """`kleinstyle train --spec RUNSPEC`: the StyleLoRA's pod; returns its exit code."""
    return run_step(spec_path, "train", work)


# --- `kleinstyle train --model DIR --data DIR ...` on one machine ------------------------------------------------


def cli_spec(args: Any) -> RunSpec:
    """The RunSpec of a one-machine run: the reference policy's plan for the folder's images and the flags given,
    on the builtin backend, writing under `-o` (the same code as a StyleLoRA's Job, without the API)."""
    from kleinstyle.contract.plan import plan_training
    from kleinstyle.contract.runspec import EvaluationSpec, Owner

    from .klein.dataset import DatasetError, read_dataset

    if not (Path(args.model) / "model_index.json").is_file():
        raise BadInput(f"--model {args.model}: no diffusers pipeline there (model_index.json missing)")
    try:
        images = len(read_dataset(args.data))
    except DatasetError as exc:
        raise BadInput(f"--data: {exc}") from exc
    given = {"rank": args.rank, "steps": args.steps, "resolution": args.resolution, "checkpointEvery": args.every}
    spec = {
        "backend": "builtin",
        "training": {key: value for key, value in given.items() if value is not None},
        "earlyStopping": {"enabled": args.evaluate},
    }
    try:
        plan = plan_training(images, spec)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    output = str(Path(args.output).resolve())
    work = TrainSpec(
        dataset_uri=str(Path(args.data).resolve()),
        trigger_word=args.trigger,
        image_count=images,
        backend="builtin",
        model_path=str(Path(args.model).resolve()),
        plan=plan,
        evaluation=EvaluationSpec() if args.evaluate else None,
    )
    owner = Owner(kind="StyleLoRA", plural="styleloras", namespace="local", name=Path(output).name, uid="local")
    return RunSpec(owner=owner, output_uri=output, output_display_uri=output, work=work)


def training_sizes(spec: RunSpec) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(file, its size, the size it trains at) per image of the run's dataset: never above its own size."""
    from .klein.dataset import read_dataset, training_size
    from .klein.encode import load_rgb

    work = spec.work
    assert isinstance(work, TrainSpec)
    cfg = train_settings(work.plan)
    sizes = []
    for sample in read_dataset(dataset_folder(spec)):
        size = load_rgb(sample.image).size
        sizes.append((sample.image.name, size, training_size(size, cfg.resolution, cfg.bucket_multiple)))
    return sizes


def cli(args: Any) -> int:
    """Train on this machine: print each image's training size and the progress, write the LoRA and its
    checkpoints under `-o`. Exit 2 on bad input, 1 when interrupted (run it again to resume)."""
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = cli_spec(args)
        for name, size, trained in training_sizes(spec):
            note = "" if trained == size else f" (from {size[0]}x{size[1]})"
            print(f"{name}: {trained[0]}x{trained[1]}{note}")
    except BadInput as exc:
        print(f"kleinstyle train: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    shown: list[str] = []

    def show(owner: Any, report: dict[str, Any]) -> bool:
        if report["message"] != (shown[-1] if shown else None):
            shown.append(report["message"])
            print(report["message"], file=sys.stderr, flush=True)
        return True

    outcome = run_work(spec, work, Reporter(spec, send=show))
    if outcome.code != EXIT_OK:
        print(f"kleinstyle train: {outcome.message}", file=sys.stderr)
        return outcome.code
    result = outcome.result
    assert isinstance(result, TrainResult)
    print(f"LoRA: {result.lora_file}" if result.lora_file else "no LoRA: no checkpoint beat the base model")
    print(f"checkpoints: {Path(spec.output_uri) / WORK_DIR / 'checkpoints'}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
