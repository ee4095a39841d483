"""What a training backend does for the step, and what it leaves behind.

A backend only trains: it checks the input it alone needs, runs its trainer, reports steps and checkpoints and has
each checkpoint judged as it appears. Which checkpoint becomes the LoRA, and publishing it, are the step's
(`publish.promote`), the same for every backend, so ai-toolkit and the builtin trainer cannot drift apart there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..step import Outcome
from .judge import Judge


@dataclass(frozen=True)
class Trained:
    """A backend's training as it ended (stopped or completed; an interrupted or failed one is an `Outcome`)."""

    total: int  # the planned steps
    steps: int  # the steps trained
    checkpoints: Mapping[int, Path]  # each promotable checkpoint's LoRA file, by step
    final: Path | None  # the last step's LoRA when training completed, else None
    final_loss: float | None
    stopped: bool  # ended early: the user's stop request or early stopping
    loss_at: Callable[[int], float | None]  # the loss a checkpoint was saved with
    nothing_saved: str  # why a stop before the first checkpoint leaves nothing to promote


class Backend(Protocol):
    """One trainer behind the train step (ai-toolkit runs one folder per model behind a base class the same way)."""

    work_dir: Path  # the run's work folder on this machine (the evaluation cache lives there too)

    def prepare(self) -> Outcome | None:
        """Check the input and set up, before the judge loads its models: raise `BadInput` for input that can never
        succeed; an outcome when the run ends here (two-step mode's content stage interrupted or stopped)."""
        ...

    def train(self, judge: Judge | None) -> Trained | Outcome:
        """Train, reporting progress and having each planned checkpoint judged; an outcome when the run ends
        without one to promote (SIGTERM, a trainer failure)."""
        ...
