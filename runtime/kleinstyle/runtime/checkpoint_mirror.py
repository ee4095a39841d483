"""Builtin-trainer checkpoints on an object store (s3://, gs://): train in local scratch, mirror every checkpoint.

The trainer works in a local folder (the pod's /tmp emptyDir) because it renames folders and fsyncs, which object
stores cannot do. Each checkpoint it completes is uploaded file by file (one PUT each, so each object is whole),
then a `_COMPLETE` marker: a checkpoint without its marker is one a killed pod was still uploading and is ignored.
A restarted pod on a fresh node downloads the newest complete checkpoint before training, so it resumes (optimizer,
scheduler and RNG state included) as it would from the artifact volume, and a finished two-step content stage's
LoRA, so the style stage resumes on the same merged base. What it does not restore: the scores of the checkpoints
before the newest (early stopping starts its patience again from there, and can promote only checkpoints from the
newest on). The remote folder is checked against the prefix the namespace's Secret is scoped to before anything is
opened there (artifact_scope.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .artifact_scope import check_uri
from .artifacts import join_uri, read_bytes, write_bytes_atomic
from .klein import checkpoints as ckpt

log = logging.getLogger(__name__)

MARKER = "_COMPLETE"


class CheckpointMirror:
    """Checkpoints of `local_dir` (a trainer's output folder) mirrored under `remote_uri` (the run's work folder)."""

    def __init__(self, remote_uri: str, local_dir: Path) -> None:
        check_uri(remote_uri)  # every URI below is inside it
        self.remote_uri = remote_uri
        self.local_dir = local_dir

    def _remote(self, checkpoint: Path, name: str = "") -> str:
        base = join_uri(self.remote_uri, ckpt.CHECKPOINTS, checkpoint.name)
        return join_uri(base, name) if name else base

    def upload(self, checkpoint: Path) -> str:
        """Upload one complete local checkpoint, marker last; returns its remote URI."""
        for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
            write_bytes_atomic(self._remote(checkpoint, path.name), path.read_bytes())
        write_bytes_atomic(self._remote(checkpoint, MARKER), b"")
        return self._remote(checkpoint)

    def upload_file(self, path: Path, relative: str) -> None:
        """One more file of the run's work (the two-step content LoRA) under the remote work folder."""
        write_bytes_atomic(join_uri(self.remote_uri, relative), path.read_bytes())

    def download(self, relative: str, target: Path) -> bool:
        """The remote work file `relative` into `target` (written whole, then renamed); False when there is none."""
        data = read_bytes(join_uri(self.remote_uri, relative))
        if data is None:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-restore")
        staging.write_bytes(data)
        staging.rename(target)
        return True

    def remote_steps(self) -> list[int]:
        """Steps of the complete checkpoints in the store, oldest first."""
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(join_uri(self.remote_uri, ckpt.CHECKPOINTS))
        if not fs.exists(root):
            return []
        steps = []
        for entry in fs.ls(root, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step_") and fs.exists(f"{str(entry).rstrip('/')}/{MARKER}"):
                steps.append(int(name.removeprefix("step_")))
        return sorted(steps)

    def restore(self) -> int | None:
        """Download the newest complete checkpoint the local folder lacks; returns its step (None: nothing)."""
        steps = self.remote_steps()
        if not steps:
            return None
        step = steps[-1]
        target = ckpt.checkpoint_path(self.local_dir, step)
        if target in ckpt.list_checkpoints(self.local_dir):
            return step
        staging = target.with_name(f".{target.name}.tmp-restore")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in ckpt.REQUIRED_FILES:
            data = read_bytes(self._remote(target, name))
            if data is None:
                raise FileNotFoundError(f"{self._remote(target, name)} is missing although its checkpoint is marked")
            (staging / name).write_bytes(data)
        staging.rename(target)
        log.info("restored checkpoint %d from %s", step, self._remote(target))
        return step
