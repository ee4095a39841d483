"""The StyleLoRA train step: run the plan on a backend, report progress, honour stop requests, publish the LoRA.

Output under the run's `output_uri` (a path on the artifact volume):
    work/                       the builtin backend's checkpoints (work/checkpoints/step_NNNNNN/) and the localised
                                ai-toolkit config
    aitoolkit/NAME/             ai-toolkit's own training folder (set by the operator in aitoolkit.yaml)
                                both on the volume, so a restarted pod resumes
    lora.safetensors            the published LoRA (copied atomically: staged name, then rename)
    lora.json                   its sidecar: step, loss, plan hash, backend, versions, RunSpec hash
Policy, decided here:
- Progress goes to `status.progress` at most every `REPORT_INTERVAL_S` seconds, and at once at each checkpoint.
- A stop request (`status.stopRequest` of the owner, polled every `STOP_POLL_S` seconds) ends training at the
  next step; the latest checkpoint becomes the LoRA and the run succeeds with stop_reason "stop requested".
- SIGTERM (preemption) saves a checkpoint (builtin) and exits 1: the Job's next pod resumes from it.
- Input that can never succeed (no dataset, no model directory, a target naming no layer, an object-store output
  for the builtin backend) exits 2, which the Job's podFailurePolicy turns into an immediate failure.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .artifacts import join_uri, write_json_atomic
from .paths import is_object_store, local_path
from .plan import TrainingPlan
from .report import api_target, read_owner, report_progress, write_termination_message
from .spec import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, RunSpec, TrainSpec

log = logging.getLogger(__name__)

STEP = "train"
WORK_DIR = "work"
LORA_FILE = "lora.safetensors"
LORA_SIDECAR = "lora.json"
AITOOLKIT_CONFIG = "/etc/kleinstyle/aitoolkit.yaml"
REPORT_INTERVAL_S = 2.0
STOP_POLL_S = 5.0
STOP_READ_TIMEOUT_S = 2.0
STOP_REQUESTED = "stop requested"


class BadInput(ValueError):
    """Input this run can never succeed on; exit 2."""


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


def train_settings(plan: TrainingPlan) -> Any:
    """The builtin trainer's TrainSettings for `plan` (imports torch)."""
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
        seed=int(v["seed"]),
        compile_blocks=True,  # on CUDA only
    )


# --- progress and stop requests --------------------------------------------------------------------------------


class Reporter:
    """Throttled progress reports to the owner, and the stop-request poll."""

    def __init__(
        self,
        spec: RunSpec,
        total: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        report_interval: float | None = None,
        stop_poll: float | None = None,
    ) -> None:
        self.spec = spec
        self.total = total
        self.clock = clock
        self.report_interval = REPORT_INTERVAL_S if report_interval is None else report_interval
        self.stop_poll = STOP_POLL_S if stop_poll is None else stop_poll
        self.checkpoints: list[dict[str, Any]] = []
        self.step = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.seconds_per_step: float | None = None
        self._last_report = float("-inf")
        self._last_poll = float("-inf")
        self._last_step_time: float | None = None
        self.stop_requested = False

    def progress(self) -> dict[str, Any]:
        eta = None
        if self.seconds_per_step is not None:
            eta = round(self.seconds_per_step * max(0, self.total - self.step), 1)
        return {
            "step": self.step,
            "totalSteps": self.total,
            "loss": self.loss,
            "lr": self.lr,
            "secondsPerStep": None if self.seconds_per_step is None else round(self.seconds_per_step, 4),
            "etaSeconds": eta,
            "checkpoints": list(self.checkpoints),
        }

    def send(self, state: str, message: str, result: dict[str, Any] | None = None) -> bool:
        self._last_report = self.clock()
        body = {
            "step": STEP,
            "runHash": self.spec.run_id(),
            "state": state,
            "message": message,
            "progress": self.progress(),
            "result": result,
        }
        return report_progress(self.spec.owner, body)

    def on_step(self, step: int, total: int, loss: float | None, lr: float | None, seconds: float | None) -> None:
        now = self.clock()
        if seconds is None and self._last_step_time is not None and step > self.step:
            seconds = (now - self._last_step_time) / (step - self.step)
        self._last_step_time = now
        self.step, self.total = step, total or self.total
        self.loss = self.loss if loss is None else float(loss)
        self.lr = self.lr if lr is None else float(lr)
        if seconds is not None:  # a moving average: the first steps (compilation, caches) are slow
            sps = self.seconds_per_step
            self.seconds_per_step = seconds if sps is None else 0.8 * sps + 0.2 * seconds
        if now - self._last_report >= self.report_interval:
            self.send("Running", f"step {self.step}/{self.total}")

    def on_checkpoint(self, step: int, uri: str, loss: float | None) -> None:
        self.checkpoints = [c for c in self.checkpoints if c["step"] != step]
        self.checkpoints.append({"step": step, "uri": uri, "loss": loss})
        self.checkpoints.sort(key=lambda c: c["step"])
        self.send("Running", f"step {self.step}/{self.total}; checkpoint at step {step}")

    def should_stop(self) -> bool:
        if self.stop_requested:
            return True
        now = self.clock()
        if now - self._last_poll < self.stop_poll:
            return False
        self._last_poll = now
        # Polled from inside the training loop: a slow API may cost a step a little, never a long stall.
        owner = read_owner(self.spec.owner, timeout_s=STOP_READ_TIMEOUT_S)
        status = (owner or {}).get("status") or {}
        request = status.get("stopRequest")
        # The operator clears stopRequest in the same write that moves runHash to a new run, so a request is this
        # run's only while runHash names it: a stop left from an earlier run never stops this one.
        if request and status.get("runHash") == self.spec.run_id():
            log.info("stop requested: %s", request)
            self.stop_requested = True
        return self.stop_requested


# --- publishing --------------------------------------------------------------------------------------------------


def _atomic_copy(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    try:
        shutil.copyfile(source, staging)
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def publish_lora(spec: RunSpec, source: Path, info: dict[str, Any]) -> str:
    """Copy `source` to `{output_uri}/lora.safetensors` with its sidecar; return the display URI."""
    from .artifacts import kleinstyle_version

    work = spec.work
    assert isinstance(work, TrainSpec)
    out = local_path(spec.output_uri)
    out.mkdir(parents=True, exist_ok=True)
    sidecar = {
        "step": STEP,
        "runspec_hash": spec.content_hash(),
        "plan_hash": work.plan.plan_hash(),
        "backend": work.backend,
        "model": work.model,
        "trigger_word": work.trigger_word,
        "owner": spec.owner.model_dump(mode="json"),
        "uri": join_uri(spec.output_display_uri, LORA_FILE),
        "format": "diffusers LoRA (transformer.*.lora_A/lora_B), alpha baked into lora_B",
        "kleinstyle_version": kleinstyle_version(),
        **info,
    }
    _atomic_copy(source, out / LORA_FILE)
    write_json_atomic(join_uri(spec.output_uri, LORA_SIDECAR), sidecar)
    return sidecar["uri"]


def _display(spec: RunSpec, work_dir: Path, path: Path) -> str:
    return join_uri(spec.output_display_uri, WORK_DIR, str(path.relative_to(work_dir)))


# --- backends ----------------------------------------------------------------------------------------------------


def _check_builtin_input(work: TrainSpec, target: str | tuple[str, ...]) -> None:
    from .klein.dataset import DatasetError, read_dataset
    from .klein.encode import ModelDirError, check_model_dir
    from .klein.lora_train import lora_targets

    try:
        check_model_dir(local_path(work.model_path))
        read_dataset(local_path(work.dataset_uri))
        lora_targets(local_path(work.model_path), target)
    except (ModelDirError, DatasetError, ValueError) as exc:
        raise BadInput(str(exc)) from exc


def run_builtin(spec: RunSpec, reporter: Reporter) -> tuple[int, str, dict[str, Any] | None]:
    """(exit code, message, result) of a builtin training run."""
    from .klein.lora_train import ResumeError, StepInfo, train_lora

    work = spec.work
    assert isinstance(work, TrainSpec)
    if is_object_store(spec.output_uri):
        raise BadInput("the builtin backend needs the artifact volume (a PVC), not an object store, for its work")
    # The cheap checks first, before torch is imported (seconds) for nothing.
    if not (local_path(work.model_path) / "model_index.json").is_file():
        raise BadInput(f"no diffusers pipeline at {work.model_path} (model_index.json missing): fill the model cache")
    try:
        cfg = train_settings(work.plan)
    except ValueError as exc:
        raise BadInput(f"the plan cannot be trained: {exc}") from exc
    _check_builtin_input(work, cfg.target)
    work_dir = local_path(join_uri(spec.output_uri, WORK_DIR))

    from .klein import checkpoints as ckpt

    # A restarted pod reports the checkpoints of the pods before it from the start, not only its own.
    for path in ckpt.list_checkpoints(work_dir):
        step = int(path.name.split("_")[-1])
        loss = ckpt.read_metadata(path).get("loss")
        reporter.checkpoints.append({"step": step, "uri": _display(spec, work_dir, path), "loss": loss})
        reporter.step = max(reporter.step, step)

    def on_step(info: StepInfo) -> None:
        reporter.on_step(info.step, info.total, info.loss, info.lr, info.seconds)

    def on_checkpoint(step: int, path: Path, loss: float) -> None:
        reporter.on_checkpoint(step, _display(spec, work_dir, path), loss)

    try:
        result = train_lora(
            local_path(work.model_path),
            local_path(work.dataset_uri),
            work_dir,
            cfg,
            on_checkpoint=on_checkpoint,
            should_stop=reporter.should_stop,
            on_step=on_step,
            handle_sigterm=True,
        )
    except ResumeError as exc:  # the work folder holds another plan's checkpoints: a retry cannot fix that
        raise BadInput(str(exc)) from exc
    reporter.checkpoints.sort(key=lambda c: c["step"])
    reporter.step = result.steps_done
    reporter.loss = result.final_loss
    if result.stopped_early and not reporter.stop_requested:
        message = f"interrupted at step {result.steps_done} of {result.total_steps} (SIGTERM); the next pod resumes"
        reporter.send("Running", message)
        return EXIT_FAILED, message, None
    if result.stopped_early:
        if not result.checkpoints:
            return EXIT_BAD_SPEC, "stop requested before the first step: there is no checkpoint to promote", None
        source, stop_reason = result.checkpoints[-1] / ckpt.LORA_FILE, STOP_REQUESTED
        step = int(result.checkpoints[-1].name.split("_")[-1])
        loss = ckpt.read_metadata(result.checkpoints[-1]).get("loss")
    else:
        assert result.lora_path is not None
        source, stop_reason, step, loss = result.lora_path, "completed", result.steps_done, result.final_loss
    return _finish(spec, reporter, source, step, result.total_steps, loss, stop_reason, "builtin")


def _finish(
    spec: RunSpec,
    reporter: Reporter,
    source: Path,
    step: int,
    total: int,
    loss: float | None,
    stop_reason: str,
    backend: str,
) -> tuple[int, str, dict[str, Any]]:
    from .artifacts import kleinstyle_version

    lora_uri = publish_lora(
        spec,
        source,
        {"trained_steps": step, "total_steps": total, "loss": loss, "versions": {"kleinstyle": kleinstyle_version()}},
    )
    result = {
        "lora_file": lora_uri,
        "steps": step,
        "total_steps": total,
        "final_loss": loss,
        "checkpoints": list(reporter.checkpoints),
        "stopped_early": stop_reason != "completed",
        "stop_reason": stop_reason,
    }
    if stop_reason == "completed":
        message = f"trained {step} steps (loss {_fmt(loss)}); LoRA at {lora_uri}"
    else:
        message = f"{stop_reason} at step {reporter.step}: promoted the checkpoint of step {step} to {lora_uri}"
    return EXIT_OK, message, result


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4g}"


def run_aitoolkit(spec: RunSpec, reporter: Reporter) -> tuple[int, str, dict[str, Any] | None]:
    import yaml

    from . import aitoolkit_run

    if is_object_store(spec.output_uri):
        raise BadInput("ai-toolkit trains into a folder on the artifact volume (a PVC), not an object store")
    source = local_path(AITOOLKIT_CONFIG)
    if not source.is_file():
        raise BadInput(f"the ai-toolkit config {AITOOLKIT_CONFIG} is missing from the run's ConfigMap")
    config = yaml.safe_load(source.read_text())
    process = config["config"]["process"][0]
    name = config["config"]["name"]
    training_folder = local_path(process["training_folder"])
    # ai-toolkit reads pod paths; under a local rootfs they must point where this machine keeps them.
    process["training_folder"] = str(training_folder)
    for dataset in process.get("datasets") or []:
        dataset["folder_path"] = str(local_path(dataset["folder_path"]))
    if str(process["model"].get("name_or_path", "")).startswith("/"):
        process["model"]["name_or_path"] = str(local_path(process["model"]["name_or_path"]))
    work_dir = local_path(join_uri(spec.output_uri, WORK_DIR))
    work_dir.mkdir(parents=True, exist_ok=True)
    training_folder.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "aitoolkit.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")  # rewritten by every pod
    seen: set[int] = set()

    def on_progress(progress: aitoolkit_run.Progress) -> None:
        for step, path in aitoolkit_run.checkpoints(training_folder, name):
            if step not in seen:
                seen.add(step)
                uri = join_uri(spec.output_display_uri, str(path.relative_to(local_path(spec.output_uri))))
                reporter.checkpoints.append({"step": step, "uri": uri, "loss": reporter.loss})
        reporter.on_step(progress.step, progress.total, progress.loss, progress.lr, None)

    total = int(process["train"]["steps"])
    final = training_folder / name / f"{name}.safetensors"
    if aitoolkit_run.is_complete(final):  # an earlier pod of this run finished training but not its report
        log.info("ai-toolkit already finished this run; publishing %s", final)
        return _finish(spec, reporter, final, total, total, None, "completed", "ai-toolkit")
    outcome = aitoolkit_run.launch(config_path, on_progress=on_progress, should_stop=reporter.should_stop)
    found = [
        (step, path)
        for step, path in aitoolkit_run.checkpoints(training_folder, name)
        if aitoolkit_run.is_complete(path)
    ]
    for step, path in found:
        if step not in seen:
            uri = join_uri(spec.output_display_uri, str(path.relative_to(local_path(spec.output_uri))))
            reporter.checkpoints.append({"step": step, "uri": uri, "loss": None})
    reporter.checkpoints.sort(key=lambda c: c["step"])
    last_loss = outcome.last.loss if outcome.last else None
    if outcome.stopped:
        if not found:
            return EXIT_BAD_SPEC, "stop requested before ai-toolkit saved a checkpoint: nothing to promote", None
        step, path = found[-1]  # the newest complete checkpoint; its loss is the one reported at that step
        loss = next((c["loss"] for c in reporter.checkpoints if c["step"] == step), None)
        return _finish(spec, reporter, path, step, total, loss, STOP_REQUESTED, "ai-toolkit")
    if outcome.failure is not None:
        reason, message = outcome.failure
        code = EXIT_BAD_SPEC if reason in ("ModelMissing", "BadDataset") else EXIT_FAILED
        return code, f"{reason}: {message} (ai-toolkit exit code {outcome.exit_code})", None
    if not aitoolkit_run.is_complete(final):
        return EXIT_FAILED, f"ai-toolkit finished without a complete {final.name}", None
    return _finish(spec, reporter, final, total, total, last_loss, "completed", "ai-toolkit")


# --- the step ----------------------------------------------------------------------------------------------------


def run_train(spec: RunSpec, reporter: Reporter) -> tuple[int, str, dict[str, Any] | None]:
    work = spec.work
    if not isinstance(work, TrainSpec):
        raise BadInput(f"train cannot run a {work.step} RunSpec")
    if work.mode != "standard":
        raise BadInput(f"mode {work.mode!r} is not supported yet; use mode: standard")
    if work.backend == "builtin":
        return run_builtin(spec, reporter)
    return run_aitoolkit(spec, reporter)


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = RunSpec.from_json(local_path(spec_path).read_text(encoding="utf-8"))
    except Exception as exc:
        message = f"cannot read the RunSpec at {spec_path}: {exc}"
        log.error(message)
        write_termination_message(message)
        return EXIT_BAD_SPEC
    total = int(spec.work.plan.steps.value) if isinstance(spec.work, TrainSpec) else 0
    reporter = Reporter(spec, total)
    reporter.send("Running", f"starting {getattr(spec.work, 'backend', '')} training: {total} steps")
    try:
        code, message, result = run_train(spec, reporter)
    except BadInput as exc:
        code, message, result = EXIT_BAD_SPEC, f"bad input: {exc}", None
    except Exception as exc:
        log.exception("training failed")
        code, message, result = EXIT_FAILED, f"training failed: {type(exc).__name__}: {exc}", None
    log.info("%s", message)
    if code == EXIT_OK:
        if not reporter.send("Succeeded", message, result) and api_target() is not None:
            message = "the result could not be reported to the Kubernetes API"
            write_termination_message(message)
            return EXIT_FAILED  # the retry finds the finished checkpoints and reports again
    elif result is None and "SIGTERM" not in message:
        reporter.send("Failed", message)
    write_termination_message(message)
    return code
