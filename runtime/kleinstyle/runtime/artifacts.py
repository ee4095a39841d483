"""Write artifacts so that they appear whole or not at all.

A Job can die at any point (preemption, OOM, a node drain) and Kubernetes retries it, so a half-written dataset
must never look finished to the next step. Files are staged first and published in one step:
- a pod path (a PVC): staged in a hidden sibling folder `.NAME.tmp-<random>`, then renamed into place, one atomic
  rename on the same filesystem;
- an object store (s3://, gs://, any fsspec URL): staged locally, uploaded, and the `_SUCCESS` marker written last.
Either way an artifact directory is complete exactly when its `_SUCCESS` marker exists (`is_complete`), and it
carries a `metadata.json` sidecar (step, RunSpec hash, inputs, kleinstyle version, creation time).

A retried Job may find its directory already published: with the same RunSpec hash it is kept as is (`commit`
returns False), otherwise it is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath
from typing import Any

from kleinstyle.contract.runspec import RunSpec

from .paths import fsync_path, is_remote, local_path

METADATA_FILE = "metadata.json"
SUCCESS_MARKER = "_SUCCESS"


def kleinstyle_version() -> str:
    try:
        return importlib_metadata.version("kleinstyle")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def artifact_metadata(spec: RunSpec, inputs: object) -> dict[str, Any]:
    """The sidecar of an artifact that `spec` produced from `inputs`."""
    return {
        "step": spec.work.step,
        "runspec_hash": spec.content_hash(),
        "kleinstyle_version": kleinstyle_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "owner": spec.owner.model_dump(mode="json"),
        "uri": spec.output_display_uri,
        "inputs": inputs,
    }


def join_uri(base: str, *parts: str) -> str:
    """`base/part/...` for a pod path or a URL alike."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


class ArtifactDir:
    """A directory being written: files go to a staging folder until `commit` publishes them together."""

    def __init__(self, uri: str, metadata: Mapping[str, Any]) -> None:
        self.uri = uri.rstrip("/")
        self.metadata = dict(metadata)
        self.created: bool | None = None  # set by commit: True when published, False when an identical one existed
        if is_remote(uri):
            self._staging = Path(tempfile.mkdtemp(prefix="kleinstyle-stage-"))
        else:
            final = local_path(self.uri)
            final.parent.mkdir(parents=True, exist_ok=True)
            self._staging = final.parent / f".{final.name}.tmp-{secrets.token_hex(6)}"
            self._staging.mkdir()

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self._staging / _relative(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(path, data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: object) -> None:
        self.write_bytes(name, _json_bytes(obj))

    def file_path(self, name: str) -> Path:
        """The staged path of `name`, for a writer that streams a large file there and makes it durable itself."""
        path = self._staging / _relative(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self) -> bool:
        """Publish the staged files with the sidecar and the marker; False when an identical run's were there."""
        if self.created is not None:
            return self.created
        self.write_json(METADATA_FILE, self.metadata)
        self.write_json(SUCCESS_MARKER, {"runspec_hash": self.metadata.get("runspec_hash")})
        self.created = self._publish_remote() if is_remote(self.uri) else self._publish_local()
        return self.created

    def discard(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)

    def _publish_local(self) -> bool:
        final = local_path(self.uri)
        if _same_run(self.uri, self.metadata):
            self.discard()
            return False
        if final.exists():
            # Swap the stale directory out; the gap between the two renames is the only non-atomic moment.
            aside = final.parent / f".{final.name}.old-{secrets.token_hex(6)}"
            os.rename(final, aside)
            os.rename(self._staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                os.rename(self._staging, final)
            except OSError:
                if _same_run(self.uri, self.metadata):  # another attempt of this run published first
                    self.discard()
                    return False
                raise
        fsync_path(final.parent)
        return True

    def _publish_remote(self) -> bool:
        fs, root = _filesystem(self.uri)
        if _same_run(self.uri, self.metadata):
            self.discard()
            return False
        if fs.exists(root):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{root}/{SUCCESS_MARKER}")  # not complete any more, from this moment on
            fs.rm(root, recursive=True)
        marker = self._staging / SUCCESS_MARKER
        for path in sorted(p for p in self._staging.rglob("*") if p.is_file() and p != marker):
            fs.put_file(str(path), f"{root}/{path.relative_to(self._staging).as_posix()}")
        fs.put_file(str(marker), f"{root}/{SUCCESS_MARKER}")
        self.discard()
        return True


@contextmanager
def artifact_dir(uri: str, metadata: Mapping[str, Any]) -> Iterator[ArtifactDir]:
    """Stage a directory at `uri`; it is published when the block ends cleanly and discarded when it raises."""
    directory = ArtifactDir(uri, metadata)
    try:
        yield directory
        directory.commit()
    finally:
        directory.discard()


def write_json_atomic(uri: str, obj: object) -> None:
    """Replace one JSON file in a single step (a temporary sibling and a rename; one PUT on an object store)."""
    write_bytes_atomic(uri, _json_bytes(obj))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Replace one file in a single step (a temporary sibling and a rename; one PUT on an object store)."""
    if is_remote(uri):
        fs, path = _filesystem(uri)
        fs.pipe_file(path, data)
        return
    write_file_atomic(local_path(uri), data)


def write_file_atomic(final: Path, data: bytes) -> None:
    """Replace one local file in a single step: a durable temporary sibling, a rename, the folder fsynced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{secrets.token_hex(6)}"
    try:
        _write_durably(temporary, data)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(final.parent)


def read_json(uri: str) -> Any | None:
    """The JSON document at `uri`, or None when there is none."""
    data = read_bytes(uri)
    return None if data is None else json.loads(data)


def read_bytes(uri: str) -> bytes | None:
    """The file at `uri`, or None when there is none."""
    try:
        if is_remote(uri):
            fs, path = _filesystem(uri)
            data: bytes = fs.cat_file(path)
            return data
        return local_path(uri).read_bytes()
    except FileNotFoundError:
        return None


def is_complete(uri: str) -> bool:
    """Whether the artifact directory at `uri` was published in full."""
    return read_json(join_uri(uri, SUCCESS_MARKER)) is not None


def published_metadata(uri: str, runspec_hash: str) -> dict[str, Any] | None:
    """The sidecar of a complete artifact at `uri` made by a RunSpec with this hash, else None (lets a retry skip)."""
    if not runspec_hash or not is_complete(uri):
        return None
    existing = read_json(join_uri(uri, METADATA_FILE))
    return existing if isinstance(existing, dict) and existing.get("runspec_hash") == runspec_hash else None


def _same_run(uri: str, metadata: Mapping[str, Any]) -> bool:
    return published_metadata(uri, str(metadata.get("runspec_hash") or "")) is not None


def _filesystem(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, str(path).rstrip("/")


def _relative(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"artifact file name must be relative and stay inside the directory: {name!r}")
    return path


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def local_copy(uri: str, folder: Path, name: str) -> Path:
    """A file to open by path: a pod path as it is, an object-store URI downloaded to `folder / name` first."""
    if not is_remote(uri):
        return local_path(uri)
    fs, path = _filesystem(uri)
    folder.mkdir(parents=True, exist_ok=True)
    fs.get_file(path, str(folder / name))
    return folder / name
