"""Where a pod path lives on this machine, and the file helpers the runtime's writes share.

In a cluster a path such as /artifacts/x is a volume mount and is used as is. The dev cluster runs pods as plain
processes and lays their mounts out under a per-pod folder named by KLEINSTYLE_ROOTFS (symlinks to local folders);
every file the runtime opens by pod path goes through `local_path`, the contract's mapping (the operator opens its
own pod paths through it too), so both cases share one code path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

from kleinstyle.contract.pod import GCS_CREDENTIALS_JSON_ENV
from kleinstyle.contract.pod import local_path as local_path


def is_remote(uri: str) -> bool:
    """Whether `uri` goes through fsspec (s3://, gs://, memory://...) rather than a path in the pod."""
    return "://" in uri


def is_object_store(uri: str) -> bool:
    return uri.startswith(("s3://", "gs://"))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def google_credentials_file(env: MutableMapping[str, str] | None = None) -> Path | None:
    """The artifact store's Google service-account key arrives as JSON in an env var (a Secret key): write it to a
    private file and point GOOGLE_APPLICATION_CREDENTIALS (which gcsfs reads) at it. Nothing when it is not set or
    a credentials file is already named."""
    env = os.environ if env is None else env
    data = env.get(GCS_CREDENTIALS_JSON_ENV, "").strip()
    if not data or env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return None
    path = Path(tempfile.gettempdir()) / "kleinstyle-gcs-credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(data)
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(path)
    return path
