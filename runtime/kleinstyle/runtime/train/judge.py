"""The checkpoint judge: scores each checkpoint by rendered probes and applies the early-stopping policy.

Apart from the backends because the policy is the same whoever trained the checkpoint: the scores go into
progress, a stop decision stops training at the next step, and the best checkpoint, not the last, is the one
promoted to the LoRA (none when the base model beats them all). The decision itself is the pure
`contract.early_stop`, which status shows too.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kleinstyle.contract.early_stop import StoppingSettings, Verdict, decide_reported
from kleinstyle.contract.layout import CHECKPOINT_GALLERY
from kleinstyle.contract.proxies import on_proxies
from kleinstyle.contract.reports import EvaluationReport
from kleinstyle.contract.runspec import RunSpec, TrainSpec

from ..artifacts import join_uri, write_bytes_atomic
from ..errors import BadInput
from ..paths import local_path
from .reporter import TrainReporter
from .settings import dataset_folder, held_out_count, train_settings, train_spec

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from ..klein.evaluate import Evaluator

log = logging.getLogger(__name__)
Model = TypeVar("Model")


def judged(work: TrainSpec) -> bool:
    """Whether the run's checkpoints are scored: early stopping on (the plan) and an `evaluation` in the RunSpec."""
    return work.evaluation is not None and work.plan.early_stopping


def _load(
    path: str | None, key: str, load: Callable[..., Model], device: torch.device, missing: dict[str, str], score: str
) -> Model | None:
    """The evaluation model at `path` (the RunSpec's `checkpointEvaluation.{key}`). None, with why in `missing`
    under `score`, when none is named or the folder holds none (not provisioned yet): the score is then a proxy.
    A model there that cannot be loaded is bad input (a retry finds the same folder)."""
    if path is None:
        missing[score] = f"checkpointEvaluation.{key} is not set"
        return None
    if not (local_path(path) / "config.json").is_file():
        missing[score] = f"no model at {path} (checkpointEvaluation.{key}): the model cache holds none there"
        return None
    try:
        return load(local_path(path), device=device)
    except (OSError, ValueError) as exc:
        raise BadInput(f"checkpointEvaluation.{key}: {path} cannot be loaded: {exc}") from exc


class Judge:
    """Scores each checkpoint (kleinstyle.runtime.klein.evaluate) and applies the early-stopping policy
    (kleinstyle.contract.early_stop); the probe renders of every step are published as one contact sheet
    (`layout.CHECKPOINT_GALLERY`) after each evaluation."""

    def __init__(self, spec: RunSpec, reporter: TrainReporter, work_dir: Path) -> None:
        from ..klein.dataset import held_out, read_dataset
        from ..klein.evaluate import CSDStyleEmbedder, Evaluator, TextImageScorer, VisionModelEmbedder
        from ..klein.lora_train import compute_dtype, default_device

        work = train_spec(spec)
        evaluation = work.evaluation
        assert evaluation is not None
        self.spec = spec
        self.reporter = reporter
        self.settings = StoppingSettings.from_plan(work.plan)
        device = default_device()
        missing: dict[str, str] = {}
        content = _load(evaluation.embedder_path, "embedderDir", VisionModelEmbedder, device, missing, "leakage")
        style = _load(evaluation.style_embedder_path, "styleEmbedderDir", CSDStyleEmbedder, device, missing, "style")
        adherence = _load(evaluation.text_model_path, "textModelDir", TextImageScorer, device, missing, "adherence")
        training, validation = held_out(read_dataset(dataset_folder(spec)), held_out_count(work))
        self.evaluator: Evaluator = Evaluator(
            local_path(work.model_path),
            [sample.image for sample in training],
            work.trigger_word,
            evaluation,
            cache_dir=work_dir / "evaluation",
            text_encoder_layers=train_settings(work.plan).text_encoder_layers,
            content=content,
            style=style,
            adherence=adherence,
            held_out=validation,
            resolution=int(work.plan.resolution.value),
            device=device,
            dtype=compute_dtype(device),
        )
        self.proxies = {score: f"{self.evaluator.stand_ins[score]}: {why}" for score, why in missing.items()}
        if self.proxies:
            reporter.warnings.append(
                "checkpoint scores are proxies, so the run did not stop early and the last checkpoint became the "
                "LoRA: " + "; ".join(f"{score} by {how}" for score, how in sorted(self.proxies.items()))
            )
            log.warning("checkpoint scores are proxies: %s", self.proxies)
        baseline = self.evaluator.score(0, None)
        reporter.evaluation = EvaluationReport(baseline=baseline.to_report(), proxies=self.proxies)
        self.decision: Verdict | None = None
        self.publish_gallery()

    def judge(self, step: int, lora_file: Path) -> None:
        """Score the checkpoint of `step`; ask the run to stop when the policy says so."""
        scores = self.evaluator.score(step, lora_file)
        evaluation = self.reporter.evaluation
        assert evaluation is not None
        evaluation.checkpoints = [c for c in evaluation.checkpoints if c.step != step] + [scores.to_report()]
        decided = decide_reported(evaluation, self.settings)
        assert decided is not None
        decision = self.decision = on_proxies(decided, self.proxies)  # proxies stop nothing and pick nothing
        log.info(
            "checkpoint %d scored %.4f (base %.4f); best %s; %s",
            step,
            decision.score_of(step),
            decision.base_score,
            decision.best_step,
            decision.reason,
        )
        self.publish_gallery()
        if decision.stop:
            self.reporter.request_stop(f"early stopping: {decision.reason}")

    def publish_gallery(self) -> None:
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
        if self.proxies:
            return None  # the last checkpoint: its warning was given when the proxies were found
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
