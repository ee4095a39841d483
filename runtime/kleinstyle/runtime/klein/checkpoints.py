"""Checkpoint folders of the builtin trainer: written whole or not at all, found again after a restart.

`{output_dir}/checkpoints/step_{step:06d}/` holds
- `lora.safetensors`: the LoRA at that step in the published format (`lora_format`), ready to evaluate or promote;
- `training_state.pt`: what resuming needs: the raw adapter weights (alpha not folded in), optimizer and
  learning-rate scheduler state, RNG states, the loss history and the step;
- `metadata.json`: step, loss, settings, library versions (the artifact sidecar).

A folder is staged as `.step_NNNNNN.tmp-<random>` beside its final name and renamed into place after every file
is synced, so a preempted pod never leaves a checkpoint that looks complete but is not. Staging folders left by a
killed run are removed when the next run starts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..paths import fsync_path

CHECKPOINTS = "checkpoints"
LORA_FILE = "lora.safetensors"
STATE_FILE = "training_state.pt"
METADATA_FILE = "metadata.json"
_NAME = re.compile(r"^step_(\d{6,})$")
REQUIRED_FILES = (LORA_FILE, STATE_FILE, METADATA_FILE)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and all((child / f).is_file() for f in REQUIRED_FILES):
            found.append((int(match[1]), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_staging(output_dir: str | Path) -> None:
    """Delete half-written checkpoint folders a killed run left behind."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".") and ".tmp-" in child.name:
                shutil.rmtree(child, ignore_errors=True)


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    lora: Mapping[str, torch.Tensor],
    lora_header: Mapping[str, str],
    training_state: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> Path:
    """Publish checkpoint `step` atomically and return its folder (an older folder of the same step is replaced)."""
    final = checkpoint_path(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{secrets.token_hex(6)}")
    staging.mkdir()
    try:
        save_file(dict(lora), str(staging / LORA_FILE), metadata={"format": "pt", **lora_header})
        torch.save(dict(training_state), staging / STATE_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        for name in REQUIRED_FILES:
            fsync_path(staging / name)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def read_metadata(checkpoint: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = json.loads((checkpoint / METADATA_FILE).read_text())
    return metadata


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """The resume state; `weights_only` because a checkpoint folder may sit on a shared volume."""
    state: dict[str, Any] = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    return state


def publish_copy(source: Path, target: Path) -> Path:
    """Copy a file to `target` atomically (staged sibling, then rename)."""
    staging = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
    try:
        shutil.copyfile(source, staging)
        fsync_path(staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("kleinstyle", "torch", "diffusers", "peft", "transformers", "safetensors"):
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions
