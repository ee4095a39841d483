"""Fill the model cache from a Hugging Face Hub (or a mirror speaking its API) with the manifest's models.

For each model: the Hub's file listing at the pinned commit (its answer must be that commit), the files the entry
takes, their total size against a bound and the disk's free space before a byte is fetched; then each file through
huggingface_hub (get_hf_file_metadata, http_get) into a staging folder inside the cache (same filesystem), resuming
a cut transfer with a Range request, in the same run (http_get's retries) or the next one (the `PATH.part` left in
staging is continued from its size). Not `hf_hub_download`: it deletes a partial file when a transfer fails, so a
pod evicted 30 GB into the base model would start over. Every file is verified before it counts: an LFS
file's sha256 against the Hub's ETag (the sha256 of its content) and listing, a plain file's git blob sha1 against
its ETag. A file that fails is deleted and the pull stops naming it. Only when every file of a model is verified (and
converted, for CSD) are they renamed into the model's folder, and a record of the model written last
(`.kleinstyle-models/NAME.json`): a folder holds a model exactly when its record is there. A pull that finds a
matching record and its files skips the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..artifacts import write_file_atomic
from .manifest import RECORD_DIR, ModelSource, check_manifest

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MAX_BYTES = 100 * 1024**3  # the defaults (klein diffusers ~35 GB, CSD 2.4, CLIP 1.7, DINOv2 0.35) and margin
STAGING = ".kleinstyle-staging"
LOCK = ".kleinstyle-pull.lock"  # one pull at a time per cache: two would write the same staging files
_CHUNK = 8 * 1024 * 1024


class PullError(RuntimeError):
    """A model could not be pulled; the message names the model (and the file) and why. `complete`: the models of
    the pull that were complete before it stopped (installed by it or found so)."""

    complete: tuple[str, ...] = ()


class ChecksumError(PullError):
    """A downloaded file's content is not what the Hub says it is."""


class SizeLimitError(PullError):
    """The models to pull exceed the size bound or the disk's free space."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the sha256 of the content
    blob_id: str | None  # the git blob sha1 (of the pointer, for LFS files)


@dataclass
class Plan:
    source: ModelSource
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Pulled:
    name: str
    folder: Path
    files: tuple[str, ...]
    size: int
    skipped: bool  # already complete at this revision


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file's content, which the Hub sends as the ETag of a file not stored in LFS."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(cache: Path, source: ModelSource) -> Path:
    return cache / source.folder / RECORD_DIR / f"{source.name}.json"


def is_complete(cache: Path, source: ModelSource) -> bool:
    """The model's record is there, for this repository and commit, and every file it lists has its size."""
    try:
        record = json.loads(record_path(cache, source).read_text())
    except (OSError, ValueError):
        return False
    if record.get("repo_id") != source.repo_id or record.get("revision") != source.revision:
        return False
    folder = cache / source.folder
    files: dict[str, Any] = record.get("files", {})
    return bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == meta.get("size") for name, meta in files.items()
    )


def pull(
    sources: Sequence[ModelSource],
    cache_dir: str | Path,
    *,
    endpoint: str = DEFAULT_ENDPOINT,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    log: Callable[[str], None] = lambda line: None,
) -> list[Pulled]:
    """Pull `sources` into `cache_dir` (see the module); the models already there at their commit are skipped."""
    check_manifest(sources)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache / LOCK):
        return _pull(sources, cache, endpoint=endpoint, token=token, max_bytes=max_bytes, log=log)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PullError(f"{path}: another pull of this model cache is running; wait for it") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pull(
    sources: Sequence[ModelSource],
    cache: Path,
    *,
    endpoint: str,
    token: str | None,
    max_bytes: int,
    log: Callable[[str], None],
) -> list[Pulled]:
    done: list[Pulled] = []
    plans: list[Plan] = []
    for source in sources:
        if is_complete(cache, source):
            log(f"{source.name}: complete at {source.revision[:12]} in {source.folder}/")
            files = tuple(json.loads(record_path(cache, source).read_text())["files"])
            done.append(Pulled(source.name, cache / source.folder, files, 0, skipped=True))
        else:
            try:
                plans.append(_plan(source, endpoint=endpoint, token=token))
            except PullError as exc:
                exc.complete = tuple(p.name for p in done)
                raise
    total = sum(plan.size for plan in plans)
    if total > max_bytes:
        sizes = ", ".join(f"{plan.source.name} {plan.size}" for plan in plans)
        raise SizeLimitError(f"the models to pull hold {total} bytes ({sizes}), over the bound of {max_bytes} bytes")
    staged = sum(_staged_bytes(cache / STAGING / plan.source.name) for plan in plans)
    free = shutil.disk_usage(cache).free
    if total - staged > free:
        raise SizeLimitError(f"{cache}: {free} bytes free, the pull needs {total - staged} more")
    try:
        for plan in plans:
            done.append(_pull_one(plan, cache, endpoint=endpoint, token=token, log=log))
    except PullError as exc:
        exc.complete = tuple(p.name for p in done)
        raise
    return done


def _hub_error(source: ModelSource, what: str, exc: Exception) -> PullError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{source.name} ({source.repo_id}@{source.revision[:12]}): {what}"
    if isinstance(exc, GatedRepoError):
        return PullError(
            f"{where}: the repository is gated: give a token (--token-file or HF_TOKEN) of an account "
            "that accepted its licence on the Hub"
        )
    if isinstance(exc, RevisionNotFoundError):
        return PullError(f"{where}: the Hub has no commit {source.revision} (the manifest's pinned revision)")
    if isinstance(exc, RepositoryNotFoundError):
        return PullError(f"{where}: no such repository, or it needs a token this pull does not have")
    if isinstance(exc, RemoteEntryNotFoundError):
        return PullError(f"{where}: not in the repository at that commit")
    if isinstance(exc, HfHubHTTPError):
        return PullError(f"{where}: the Hub answered {exc}")
    return PullError(f"{where}: {exc}")


def _plan(source: ModelSource, *, endpoint: str, token: str | None) -> Plan:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token or False)  # False: never a token stored on this machine
    try:
        info = api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
    except Exception as exc:
        raise _hub_error(source, "listing its files", exc) from exc
    if info.sha != source.revision:
        raise PullError(f"{source.name}: the Hub answered commit {info.sha} for the pinned {source.revision}")
    siblings = {s.rfilename: s for s in info.siblings or []}
    plan = Plan(source)
    for path in source.wanted(siblings):
        sibling = siblings[path]
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        if size is None:
            raise PullError(f"{source.name}: the Hub's listing gives no size for {path}")
        plan.files.append(RemoteFile(path, int(size), lfs.sha256 if lfs is not None else None, sibling.blob_id))
    if not plan.files:
        raise PullError(
            f"{source.name}: no file of {source.repo_id}@{source.revision[:12]} matches {', '.join(source.files)}"
        )
    return plan


def _staged_bytes(staging: Path) -> int:
    if not staging.is_dir():
        return 0
    return sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def _forget(staging: Path, path: str) -> None:
    """Delete a staged file that failed (and its partial download), so the next pull fetches it anew."""
    (staging / path).unlink(missing_ok=True)
    (staging / f"{path}.part").unlink(missing_ok=True)


def _verify(source: ModelSource, remote: RemoteFile, local: Path) -> None:
    expected = remote.sha256 if remote.sha256 is not None else remote.blob_id
    actual = sha256_file(local) if remote.sha256 is not None else git_blob_sha1(local)
    kind = "sha256" if remote.sha256 is not None else "git sha1"
    if actual != expected or local.stat().st_size != remote.size:
        raise ChecksumError(
            f"{source.name}: {remote.path}: {kind} {actual} ({local.stat().st_size} bytes) is not the Hub's "
            f"{expected} ({remote.size} bytes); the file was deleted, nothing was installed"
        )


def _fetch(plan: Plan, remote: RemoteFile, staging: Path, *, endpoint: str, token: str | None) -> Path:
    """Download one file into `staging` (resuming `PATH.part` left by an earlier run), verify it against the Hub's
    ETag and listing, and rename it to its name there."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    # Documented as huggingface_hub.utils.build_hf_headers; the package re-exports it without `as`, which strict
    # mypy does not count as an export.
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    source = plan.source
    final, part = staging / remote.path, staging / f"{remote.path}.part"
    if final.is_file():  # verified by an earlier run that stopped at a later file; checked again all the same
        try:
            _verify(source, remote, final)
            return final
        except ChecksumError:
            _forget(staging, remote.path)
    expected = remote.sha256 if remote.sha256 is not None else remote.blob_id
    try:
        url = hf_hub_url(source.repo_id, remote.path, revision=source.revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
        if meta.commit_hash != source.revision:
            raise PullError(
                f"{source.name}: {remote.path} resolved at commit {meta.commit_hash}, not the pinned {source.revision}"
            )
        if meta.etag != expected:
            raise ChecksumError(
                f"{source.name}: {remote.path}: the Hub's ETag {meta.etag} and its listing {expected} disagree"
            )
        headers = build_hf_headers(token=token or False)
        if _origin(meta.location) != _origin(url):
            headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.is_file() and part.stat().st_size > remote.size:
            part.unlink()
        resume = part.stat().st_size if part.is_file() else 0
        with part.open("ab") as stream:
            # huggingface_hub's transfer: retries a cut connection with a Range request from the bytes it has.
            http_get(meta.location, stream, resume_size=resume, headers=headers, expected_size=remote.size)
    except PullError:
        raise
    except Exception as exc:
        raise _hub_error(source, f"downloading {remote.path}", exc) from exc
    try:
        _verify(source, remote, part)
    except ChecksumError:
        _forget(staging, remote.path)
        raise
    os.replace(part, final)
    return final


def _pull_one(plan: Plan, cache: Path, *, endpoint: str, token: str | None, log: Callable[[str], None]) -> Pulled:
    source = plan.source
    staging = cache / STAGING / source.name
    staging.mkdir(parents=True, exist_ok=True)
    log(f"{source.name}: {len(plan.files)} files, {plan.size} bytes from {source.repo_id}@{source.revision[:12]}")
    sources: dict[str, str] = {}
    for remote in plan.files:
        _fetch(plan, remote, staging, endpoint=endpoint, token=token)
        sources[remote.path] = remote.sha256 or remote.blob_id or ""
        log(f"{source.name}: {remote.path} verified ({remote.size} bytes)")
    root, products = staging, [remote.path for remote in plan.files]
    if source.convert == "csd":
        from .csd import convert_csd

        root = staging / ".converted"
        shutil.rmtree(root, ignore_errors=True)
        try:
            convert_csd(staging / plan.files[0].path, root)
        except ValueError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise PullError(f"{source.name}: converting {plan.files[0].path}: {exc}") from exc
        products = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        log(f"{source.name}: converted to the evaluator's layout ({', '.join(products)})")
    files = {name: {"size": (root / name).stat().st_size, "sha256": sha256_file(root / name)} for name in products}
    folder = cache / source.folder
    record = record_path(cache, source)
    record.unlink(missing_ok=True)  # the folder no longer holds this model as recorded until the new record
    for name in products:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / name, target)
    document = {
        "name": source.name,
        "repo_id": source.repo_id,
        "revision": source.revision,
        "licence": source.licence,
        "endpoint": endpoint,
        "converted": source.convert,
        "source_files": sources,
        "files": files,
    }
    write_file_atomic(record, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    shutil.rmtree(staging, ignore_errors=True)
    _drop_empty(cache / STAGING)
    log(f"{source.name}: installed in {source.folder}/")
    return Pulled(source.name, folder, tuple(products), plan.size, skipped=False)


def _drop_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: another model's staging is still there
        folder.rmdir()
