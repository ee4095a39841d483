"""Which checkpoint becomes the LoRA, and publishing it: the same for every backend.

The judge's best checkpoint when checkpoints were scored (none when the base model beat them all), else the latest
one of a stopped run, else the last step's LoRA. It is copied to `{output_uri}/lora.safetensors` atomically (staged
name, then rename, or one PUT) with its sidecar `lora.json`, and the result says why the run ended.

Formats (`TrainSpec.lora_formats`, runtime.klein.lora_format): by default the trainer's file is published as it is
(the builtin backend writes `klein-diffusers-v1`). A spec that names formats gets each one exactly: the first as
`lora.safetensors`, any other beside it (`layout.lora_files`, e.g. `lora.bfl.safetensors`), a file already in the
format copied byte for byte, any other converted. The sidecar lists every file with its format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from kleinstyle.contract.layout import LORA_SIDECAR, lora_files
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_OK, STOP_REQUESTED
from kleinstyle.contract.reports import TrainResult
from kleinstyle.contract.runspec import DEFAULT_LORA_FORMATS, RunSpec

from ..artifacts import join_uri, kleinstyle_version, write_bytes_atomic, write_json_atomic
from ..klein.lora_format import FORMATS, export_lora
from ..step import Outcome
from .backend import Trained
from .judge import Judge
from .reporter import TrainReporter
from .settings import train_spec

COMPLETED = "completed"  # the stop_reason of a run that trained all its planned steps
# What each format is, in words, for the sidecar.
FORMAT_WORDS = {
    "diffusers": "diffusers LoRA (transformer.*.lora_A/lora_B), alpha baked into lora_B",
    "bfl": "BFL LoRA (diffusion_model.*.lora_A/lora_B, as ai-toolkit and ComfyUI name them), alpha baked into lora_B",
}


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
    """Publish `source` as `{output_uri}/lora.safetensors` (and any other format the spec asks for beside it) with
    its sidecar; return the display URI of lora.safetensors."""
    work = train_spec(spec)
    files = lora_files(work.lora_formats)
    uris = {fmt: join_uri(spec.output_display_uri, name) for fmt, name in files.items()}
    first = work.lora_formats[0]
    sidecar = {
        "step": "train",
        "runspec_hash": spec.content_hash(),
        "plan_hash": work.plan.plan_hash(),
        "backend": work.backend,
        "model": work.model,
        "trigger_word": work.trigger_word,
        "style_profile": work.style_profile,
        "owner": spec.owner.model_dump(mode="json"),
        "uri": uris[first],
        "format": FORMAT_WORDS[first],
        "lora_files": [{"format": FORMATS[fmt], "option": fmt, "uri": uris[fmt]} for fmt in files],
        "kleinstyle_version": kleinstyle_version(),
        **info,
    }
    if work.lora_formats == DEFAULT_LORA_FORMATS:  # as the trainer wrote it, as before formats could be chosen
        write_bytes_atomic(join_uri(spec.output_uri, files[first]), source.read_bytes())  # one PUT or temp + rename
    else:
        with tempfile.TemporaryDirectory(prefix="kleinstyle-lora-") as scratch:
            for fmt in reversed(work.lora_formats):  # lora.safetensors last: what a reader of status finds is whole
                staged = Path(scratch) / files[fmt]
                export_lora(source, staged, fmt)
                write_bytes_atomic(join_uri(spec.output_uri, files[fmt]), staged.read_bytes())
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
