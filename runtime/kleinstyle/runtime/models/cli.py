"""`kleinstyle models pull|list`: fill a model cache folder from the Hub (or a mirror), or show the manifest.

The token comes from a file (`--token-file`, a mounted Secret) or the HF_TOKEN environment variable (a Secret's
key), never from an argument: arguments show in `ps` and in the Job's spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .manifest import MANIFEST, ManifestError, ModelSource, select
from .pull import DEFAULT_ENDPOINT, DEFAULT_MAX_BYTES


def models_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = sub.add_parser("pull", help="download, verify and install the manifest's models into DIR")
    pull.add_argument("directory", metavar="DIR", help="the model cache (the model-cache volume's mount)")
    pull.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="pull this model only (repeatable; see `list`)"
    )
    pull.add_argument("--endpoint", help=f"the Hub or a mirror of its API (default: HF_ENDPOINT or {DEFAULT_ENDPOINT})")
    pull.add_argument("--token-file", metavar="PATH", help="file holding the Hub token (default: HF_TOKEN, if set)")
    pull.add_argument(
        "--summary",
        metavar="PATH",
        help="also write a one-line JSON summary there: the models complete and missing, the error (a Job's "
        "/dev/termination-log, which the operator reads from the pod's status)",
    )
    pull.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"refuse a pull above this (default {DEFAULT_MAX_BYTES})",
    )
    sub.add_parser("list", help="the manifest: names, repositories, pinned commits, folders, licences")


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {args.token_file}: cannot be read ({exc.strerror})") from exc
        if not token:
            raise ValueError(f"--token-file {args.token_file}: is empty")
        return token
    return os.environ.get("HF_TOKEN", "").strip() or None


def _endpoint(args: argparse.Namespace) -> str:
    endpoint = (args.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"--endpoint {endpoint!r}: must be an http(s) URL of a Hub (or mirror), e.g. {DEFAULT_ENDPOINT}"
        )
    return endpoint


def models(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        for source in MANIFEST:
            note = "" if source.default else " (only with --only)"
            print(f"{source.name}{note}: {source.repo_id}@{source.revision} -> {source.folder}/")
            print(f"  {source.use}; licence: {source.licence}")
        return 0
    from .pull import PullError, pull

    if args.max_bytes < 1:
        print(f"kleinstyle models pull: --max-bytes {args.max_bytes}: must be at least 1", file=sys.stderr)
        return 2
    try:
        chosen = select(MANIFEST, args.only)
        endpoint, token = _endpoint(args), _token(args)
    except (ManifestError, ValueError) as exc:
        print(f"kleinstyle models pull: {exc}", file=sys.stderr)
        return 2
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()  # one line per file below instead of bars redrawn into a Job's log

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        installed = pull(chosen, args.directory, endpoint=endpoint, token=token, max_bytes=args.max_bytes, log=log)
    except PullError as exc:
        print(f"kleinstyle models pull: {exc}", file=sys.stderr)
        _summary(args.summary, chosen, exc.complete, str(exc))
        return 1
    _summary(args.summary, chosen, tuple(model.name for model in installed), None)
    for model in installed:
        print(model.folder)  # one line per model: where the runtime finds it
    return 0


def _summary(path: str | None, chosen: list[ModelSource], complete: tuple[str, ...], error: str | None) -> None:
    """What the pull left: {"complete": {name: folder}, "missing": {name: folder}, "error": ...}, kept under the
    4096 bytes Kubernetes keeps of a termination message."""
    if not path:
        return
    document: dict[str, object] = {
        "complete": {s.name: s.folder for s in chosen if s.name in complete},
        "missing": {s.name: s.folder for s in chosen if s.name not in complete},
    }
    if error is not None:
        document["error"] = error[:2048]
    Path(path).write_text(json.dumps(document, sort_keys=True) + "\n")
