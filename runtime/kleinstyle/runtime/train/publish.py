"""Which checkpoint becomes the LoRA, and publishing it: the same for every backend.

The judge's best checkpoint when checkpoints were scored (none when the base model beat them all), else the latest
one of a stopped run, else the last step's LoRA. It is copied to `{output_uri}/lora.safetensors` atomically (staged
name, then rename, or one PUT) with its sidecar `lora.json`, and the result says why the run ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kleinstyle.contract.layout import LORA_FILE, LORA_SIDECAR
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_OK, STOP_REQUESTED
from kleinstyle.contract.reports import TrainResult
from kleinstyle.contract.runspec import RunSpec

from ..artifacts import join_uri, kleinstyle_version, write_bytes_atomic, write_json_atomic
from ..step import Outcome
from .backend import Trained
from .judge import Judge
from .reporter import TrainReporter
from .settings import train_spec

COMPLETED = "completed"  # the stop_reason of a run that trained all its planned steps


def promote(spec: RunSpec, reporter: TrainReporter, trained: Trained, judge: Judge | None) -> Outcome:
    """Publish the checkpoint the run ends with, and say so; an outcome without a LoRA when there is none."""
    if trained.stopped and not trained.checkpoints:
        return Outcome(EXIT_BAD_SPEC, trained.nothing_saved)
    stop_reason = (reporter.stop_reason or STOP_REQUESTED) if trained.stopped else COMPLETED
    best = judge.best_step() if judge is not None else None
    if best == 0:
        return _unpromoted(reporter, trained.total, stop_reason)
    if best is None and not trained.stopped:
        assert trained.final is not None
        return _finish(spec, reporter, trained.final, trained.steps, trained.total, trained.final_loss, stop_reason)
    step = best if best is not None else max(trained.checkpoints)  # else the newest complete checkpoint
    loss = trained.loss_at(step)
    return _finish(spec, reporter, trained.checkpoints[step], step, trained.total, loss, stop_reason, best)


def publish_lora(spec: RunSpec, source: Path, info: dict[str, Any]) -> str:
    """Copy `source` to `{output_uri}/lora.safetensors` with its sidecar; return the display URI."""
    work = train_spec(spec)
    uri = join_uri(spec.output_display_uri, LORA_FILE)
    sidecar = {
        "step": "train",
        "runspec_hash": spec.content_hash(),
        "plan_hash": work.plan.plan_hash(),
        "backend": work.backend,
        "model": work.model,
        "trigger_word": work.trigger_word,
        "style_profile": work.style_profile,
        "owner": spec.owner.model_dump(mode="json"),
        "uri": uri,
        "format": "diffusers LoRA (transformer.*.lora_A/lora_B), alpha baked into lora_B",
        "kleinstyle_version": kleinstyle_version(),
        **info,
    }
    write_bytes_atomic(join_uri(spec.output_uri, LORA_FILE), source.read_bytes())  # one PUT or temp + rename
    write_json_atomic(join_uri(spec.output_uri, LORA_SIDECAR), sidecar)
    return str(sidecar["uri"])


def _finish(
    spec: RunSpec,
    reporter: TrainReporter,
    source: Path,
    step: int,
    total: int,
    loss: float | None,
    stop_reason: str,
    best: int | None = None,
) -> Outcome:
    info = {"trained_steps": step, "total_steps": total, "loss": loss, "versions": {"kleinstyle": kleinstyle_version()}}
    lora_uri = publish_lora(spec, source, info)
    result = TrainResult(
        lora_file=lora_uri,
        steps=max(reporter.step, step),  # trained; the LoRA is the checkpoint of lora_step
        lora_step=step,
        total_steps=total,
        final_loss=loss,
        checkpoints=list(reporter.checkpoints),
        stopped_early=stop_reason != COMPLETED,
        stop_reason=stop_reason,
        best_checkpoint=best,
        warnings=list(reporter.warnings),
        evaluation=reporter.evaluation,
    )
    if stop_reason == COMPLETED and step == total:
        message = f"trained {step} steps (loss {_fmt(loss)}); LoRA at {lora_uri}"
    elif stop_reason == COMPLETED:
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
        stopped_early=stop_reason != COMPLETED,
        stop_reason=stop_reason,
        best_checkpoint=0,
        warnings=list(reporter.warnings),
        evaluation=reporter.evaluation,
    )
    return Outcome(EXIT_OK, f"{stop_reason} at step {reporter.step}: no checkpoint beat the base model", result)


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"
