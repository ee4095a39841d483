"""A training run's progress as status shows it, and whether it must stop.

Kept apart from the backends so that both report the same `contract.reports.TrainProgress` the same way: every
report the harness sends (at most every `step.REPORT_INTERVAL_S`, at once at a checkpoint) shows the progress as it
is then, and a stop asked for (early stopping, or the user's `kleinstyle.dev/stop` annotation) ends the run at its
next step whichever backend trains it.
"""

from __future__ import annotations

from typing import Literal

from kleinstyle.contract.pod import STOP_REQUESTED
from kleinstyle.contract.reports import CheckpointReport, EvaluationReport, State, TrainProgress

from ..step import Reporter


class TrainReporter:
    """A training run's progress (`contract.reports.TrainProgress`), sent through the step harness's `Reporter`,
    and whether and why the run must stop: early stopping, or the user's stop request."""

    def __init__(self, reporter: Reporter, total: int) -> None:
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
        # The harness's hook for progress built at each report (`Reporter.progress` may be a function).
        reporter.progress = self.progress

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def progress(self) -> TrainProgress:
        eta = None
        if self.seconds_per_step is not None:
            eta = round(self.seconds_per_step * max(0, self.total - self.step), 1)
        return TrainProgress(
            step=self.step,
            total_steps=self.total,
            loss=self.loss,
            lr=self.lr,
            seconds_per_step=None if self.seconds_per_step is None else round(self.seconds_per_step, 4),
            eta_seconds=eta,
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
