"""The builtin backend: klein's own diffusers + peft trainer (kleinstyle.runtime.klein.lora_train), in-process.

It trains into `work/` on the artifact volume, or, with an object store as the artifact store, in local scratch
whose checkpoints a CheckpointMirror uploads (and a restarted pod downloads first); SIGTERM (preemption) saves a
checkpoint and exits 1, so the Job's next pod resumes from it. Two-step mode (plan.py) trains a content LoRA on
trigger-less captions first, then the style LoRA on top of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from kleinstyle.contract.layout import LORA_FILE, WORK_DIR
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_FAILED
from kleinstyle.contract.runspec import RunSpec

from ..artifacts import join_uri
from ..errors import BadInput
from ..paths import is_remote, local_path
from ..step import Outcome
from .backend import Trained
from .judge import Judge
from .reporter import TrainReporter
from .settings import dataset_folder, held_out_count, scratch, train_settings, train_spec

if TYPE_CHECKING:
    from ..checkpoint_mirror import CheckpointMirror
    from ..klein.lora_train import StepInfo, TrainSettings

CONTENT_LORA = LORA_FILE  # two-step mode: the content stage's LoRA, in work/content/


class BuiltinBackend:
    """A training run on the builtin trainer."""

    def __init__(self, spec: RunSpec, reporter: TrainReporter) -> None:
        self.spec = spec
        self.reporter = reporter
        self.work = train_spec(spec)
        # On the artifact volume, or in scratch for an object store (mirrored there).
        remote = is_remote(spec.output_uri)
        self.work_dir = scratch(spec) / WORK_DIR if remote else local_path(join_uri(spec.output_uri, WORK_DIR))
        self.mirror: CheckpointMirror | None = None
        self.cfg: TrainSettings | None = None

    def prepare(self) -> Outcome | None:
        work = self.work
        # The cheap checks first, before torch is imported (seconds) for nothing.
        if not (local_path(work.model_path) / "model_index.json").is_file():
            raise BadInput(
                f"no diffusers pipeline at {work.model_path} (model_index.json missing): fill the model cache"
            )
        try:
            cfg = train_settings(work.plan, held_out_count(work))
        except ValueError as exc:
            raise BadInput(f"the plan cannot be trained: {exc}") from exc
        self._check_input(cfg.target)
        if is_remote(self.spec.output_uri):
            from ..checkpoint_mirror import CheckpointMirror

            self.mirror = CheckpointMirror(join_uri(self.spec.output_uri, WORK_DIR), self.work_dir)
            self.mirror.restore()
        if work.plan.mode == "two-step":
            content = self._content_stage(cfg)
            if not isinstance(content, Path):
                return content
            digest = hashlib.sha256(content.read_bytes()).hexdigest()
            cfg = dataclasses.replace(cfg, base_lora=str(content), base_lora_digest=digest)
            self.reporter.stage, self.reporter.total, self.reporter.step = "style", cfg.steps, 0
        self.cfg = cfg
        return None

    def train(self, judge: Judge | None) -> Trained | Outcome:
        from ..klein import checkpoints as ckpt
        from ..klein.lora_train import ResumeError, train_lora

        spec, reporter, work_dir, mirror, cfg = self.spec, self.reporter, self.work_dir, self.mirror, self.cfg
        assert cfg is not None, "prepare() first"

        def on_grid(step: int) -> bool:
            """Planned checkpoints only: one saved on a stop or SIGTERM is promotable, not an evaluation, so when a
            run stops never depends on when it was preempted."""
            return cfg.is_checkpoint(step)

        def loss_at(step: int) -> float | None:
            loss = ckpt.read_metadata(ckpt.checkpoint_path(work_dir, step)).get("loss")
            return None if loss is None else float(loss)

        # A restarted pod reports the checkpoints of the pods before it from the start, not only its own (their
        # scores come from the evaluation cache).
        for path in ckpt.list_checkpoints(work_dir):
            step = int(path.name.split("_")[-1])
            reporter.add_checkpoint(step, self._display(path), loss_at(step))
            reporter.step = max(reporter.step, step)
            if judge is not None and on_grid(step):
                judge.judge(step, path / ckpt.LORA_FILE)

        def on_checkpoint(step: int, path: Path, loss: float) -> None:
            if mirror is not None:
                mirror.upload(path)  # before anything reports it: a reported checkpoint is one a new pod resumes from
            if judge is not None and on_grid(step):
                judge.judge(step, path / ckpt.LORA_FILE)
            reporter.on_checkpoint(step, self._display(path), loss)

        try:
            result = train_lora(
                local_path(self.work.model_path),
                dataset_folder(spec),
                work_dir,
                cfg,
                on_checkpoint=on_checkpoint,
                should_stop=reporter.should_stop,
                on_step=self._on_step,
                handle_sigterm=True,
            )
        except ResumeError as exc:  # the work folder holds another plan's checkpoints: a retry cannot fix that
            raise BadInput(str(exc)) from exc
        reporter.step = result.steps_done
        reporter.loss = result.final_loss
        if result.stopped_early and not reporter.stop_requested:
            message = f"interrupted at step {result.steps_done} of {result.total_steps} (SIGTERM); the next pod resumes"
            return Outcome(EXIT_FAILED, message, resumes=True)
        return Trained(
            total=result.total_steps,
            steps=result.steps_done,
            checkpoints={int(path.name.split("_")[-1]): path / ckpt.LORA_FILE for path in result.checkpoints},
            final=result.lora_path,
            final_loss=result.final_loss,
            stopped=result.stopped_early,
            loss_at=loss_at,
            nothing_saved="stop requested before the first step: there is no checkpoint to promote",
        )

    def _on_step(self, info: StepInfo) -> None:
        self.reporter.on_step(info.step, info.total, info.loss, info.lr, info.seconds)

    def _display(self, path: Path) -> str:
        return join_uri(self.spec.output_display_uri, WORK_DIR, str(path.relative_to(self.work_dir)))

    def _check_input(self, target: str | tuple[str, ...]) -> None:
        from ..klein.dataset import DatasetError, read_dataset
        from ..klein.encode import ModelDirError, check_model_dir
        from ..klein.lora_train import lora_targets

        try:
            check_model_dir(local_path(self.work.model_path))
            read_dataset(dataset_folder(self.spec))
            lora_targets(local_path(self.work.model_path), target)
        except (ModelDirError, DatasetError, ValueError) as exc:
            raise BadInput(str(exc)) from exc

    def _content_stage(self, style: TrainSettings) -> Path | Outcome:
        """Two-step mode's first stage (plan.py): a content LoRA on trigger-less captions, in work/content/. Returns
        its LoRA file, or the run's outcome when the stage did not finish (SIGTERM: resume; a stop request: no LoRA
        yet)."""
        from ..klein.lora_train import train_lora

        work, reporter, mirror = self.work, self.reporter, self.mirror
        assert work.plan.content_stage is not None
        content_lora = self.work_dir / "content" / CONTENT_LORA
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
        result = train_lora(
            local_path(work.model_path),
            dataset_folder(self.spec),
            self.work_dir / "content",
            cfg,
            should_stop=reporter.should_stop,
            on_step=self._on_step,
            handle_sigterm=True,
        )
        if result.lora_path is not None:
            if mirror is not None:
                mirror.upload_file(result.lora_path, f"content/{CONTENT_LORA}")
            return result.lora_path
        if reporter.stop_requested:
            return Outcome(
                EXIT_BAD_SPEC, "stop requested during the content stage: there is no style LoRA to promote yet"
            )
        message = f"interrupted in the content stage at step {result.steps_done} (SIGTERM); the next pod resumes"
        return Outcome(EXIT_FAILED, message, resumes=True)
