"""Running ai-toolkit: launch `python run.py CONFIG`, read its progress, find its checkpoints, name its failures.

ai-toolkit reports progress only as a tqdm line (`name:  12%|..| 360/3000 [.., lr: 1.0e-04 loss: 3.456e-01]`, redrawn
with carriage returns) and saves `{training_folder}/{name}/{name}_{step:09d}.safetensors`; it resumes by itself from the
newest checkpoint in that folder, and it has no SIGTERM handler (docs/facts.md#ai-toolkit). This module turns those
conventions into events; it does not import ai-toolkit, which lives in its own virtualenv in the runtime image.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_PROGRESS = re.compile(r"(?P<step>\d+)/(?P<total>\d+)\s*\[(?P<rest>[^\]]*)\]")
_LR = re.compile(r"lr:\s*(?P<lr>[-+0-9.eE]+)")
_LOSS = re.compile(r"loss:\s*(?P<loss>[-+0-9.eE]+|nan|inf)")
_CHECKPOINT = re.compile(r"_(?P<step>\d{9})\.safetensors$")

# (pattern in ai-toolkit's output, reason, message for the user); the first match names a failure.
FAILURES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"CUDA out of memory|OutOfMemoryError|out of memory", re.I),
        "OutOfMemory",
        "the GPU ran out of memory: lower the resolution or rank, or enable low_vram/quantize",
    ),
    (
        # The hub's answers, offline (LocalEntryNotFoundError) or not, and safetensors opening a folder that
        # lacks the BFL single file (seen with ai-toolkit 27a03a91: docs/facts.md#ai-toolkit).
        re.compile(
            r"Repository Not Found|is not a local folder|not a valid model|No such file or directory: .*model"
            r"|LocalEntryNotFoundError|No such device \(os error 19\)",
            re.I,
        ),
        "ModelMissing",
        "the base model was not found: check the model cache volume and the model path",
    ),
    (
        re.compile(r"no images found|dataset is empty|No such file or directory: .*dataset", re.I),
        "BadDataset",
        "ai-toolkit could not read the dataset",
    ),
)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None


def parse_progress(line: str) -> Progress | None:
    """The last tqdm progress record on `line` (tqdm redraws with \\r, so one line may hold several)."""
    found = None
    for match in _PROGRESS.finditer(line):
        rest = match.group("rest")
        lr, loss = _LR.search(rest), _LOSS.search(rest)
        found = Progress(
            step=int(match.group("step")),
            total=int(match.group("total")),
            loss=float(loss.group("loss")) if loss else None,
            lr=float(lr.group("lr")) if lr else None,
        )
    return found


def checkpoints(training_folder: str | Path, name: str) -> list[tuple[int, Path]]:
    """ai-toolkit's step checkpoints of run `name`, oldest first (the final `{name}.safetensors` is not one)."""
    folder = Path(training_folder) / name
    found = []
    for path in folder.glob(f"{name}_*.safetensors"):
        if match := _CHECKPOINT.search(path.name):
            found.append((int(match.group("step")), path))
    return sorted(found)


def is_complete(path: str | Path) -> bool:
    """Whether a .safetensors file is whole: its header parses and the file is exactly as long as the header says.

    ai-toolkit writes checkpoints under their final name and cannot be stopped gracefully, so a checkpoint cut off
    mid-save looks like any other; promoting one would publish a broken LoRA.
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            handle.seek(0, os.SEEK_END)
            length = handle.tell()
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return bool(ends) and length == 8 + size + max(ends)


def discard_incomplete(training_folder: str | Path, name: str) -> list[Path]:
    """Delete checkpoint files of run `name` that a killed save left cut off (the final file included), and return
    them. ai-toolkit resumes from its newest file and fails on every restart when that one is cut off ("invalid
    header length"), so a pod killed mid-save would otherwise never train again."""
    folder = Path(training_folder) / name
    broken = [path for path in folder.glob(f"{name}*.safetensors") if not is_complete(path)]
    for path in broken:
        path.unlink()
    return broken


TOOLKIT_MISSING = "AIToolkitMissing"


def classify_failure(output_tail: str) -> tuple[str, str]:
    for pattern, reason, message in FAILURES:
        if pattern.search(output_tail):
            return reason, message
    return "TrainerFailed", "ai-toolkit exited with an error; see the pod log"


def _records(stream: IO[bytes]) -> Iterator[str]:
    """Lines of a child's output, split on \\n and \\r (tqdm), decoded leniently."""
    buffer = b""
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        buffer += chunk
        *complete, buffer = re.split(rb"[\r\n]", buffer)
        for raw in complete:
            if raw:
                yield raw.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    stopped: bool
    last: Progress | None
    failure: tuple[str, str] | None


def launch(
    config_path: str | Path,
    *,
    toolkit_dir: str | Path | None = None,
    python: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: IO[str] | None = None,
) -> RunOutcome:
    """Run ai-toolkit on `config_path` until it exits or `should_stop()` (checked on every output record) says so.

    On a stop request the process group gets SIGINT, then SIGKILL: ai-toolkit saves nothing on signals, so the
    caller promotes a checkpoint it already has. The runtime image sets AI_TOOLKIT_DIR and AI_TOOLKIT_PYTHON.
    """
    toolkit_dir = Path(toolkit_dir or os.environ.get("AI_TOOLKIT_DIR", "/opt/ai-toolkit"))
    python = python or os.environ.get("AI_TOOLKIT_PYTHON", sys.executable)
    if not (toolkit_dir / "run.py").is_file():  # a runtime image built where GitHub was out of reach
        message = (
            f"no ai-toolkit at {toolkit_dir} (this runtime image was built without it: label "
            "io.kleinstyle.ai-toolkit=absent); use backend builtin, or an image built where GitHub answers"
        )
        return RunOutcome(exit_code=127, stopped=False, last=None, failure=(TOOLKIT_MISSING, message))
    process = subprocess.Popen(
        [python, str(toolkit_dir / "run.py"), str(config_path)],
        cwd=toolkit_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    last: Progress | None = None
    tail: list[str] = []  # the last records, where a failure names itself
    stopped = False
    assert process.stdout is not None
    try:
        for record in _records(process.stdout):
            if log is not None:
                print(record, file=log, flush=True)
            tail = [*tail[-199:], record]
            if (progress := parse_progress(record)) is not None:
                last = progress
                if on_progress is not None:
                    on_progress(progress)
            if should_stop is not None and should_stop():
                stopped = True
                _stop(process)
                break
    except BaseException:
        _stop(process)  # it runs in its own session: never leave it training (and holding the GPU) behind us
        raise
    exit_code = process.wait()
    failure = None if exit_code == 0 or stopped else classify_failure("\n".join(tail))
    return RunOutcome(exit_code=exit_code, stopped=stopped, last=last, failure=failure)


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
