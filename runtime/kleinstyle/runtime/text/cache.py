"""Answers kept by content hash, so a restarted or retried step never pays for the same answer twice.

One JSON file per answer, `{key}.json`, written atomically (artifacts.write_json_atomic): a crash leaves the old
entry or the new one, never half of one. The key hashes everything that decides the answer: provider, model, the
prompt's version and text, the images' hashes and the schema. An entry that does not read back is ignored (and
replaced by the next answer), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from ..artifacts import join_uri, read_json, write_json_atomic

log = logging.getLogger(__name__)


def cache_key(*parts: Any) -> str:
    """A stable SHA-256 over JSON-serialisable parts."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """A folder (a pod path or an fsspec URI) of cached answers; `None` as the folder keeps nothing."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri

    def _entry(self, key: str) -> str:
        assert self.uri is not None
        return join_uri(self.uri, f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        if self.uri is None:
            return None
        try:
            entry = read_json(self._entry(key))
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable cache entry %s: %s", key, exc)
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.uri is None:
            return
        try:
            write_json_atomic(self._entry(key), {**entry, "key": key})
        except OSError as exc:  # a cache that cannot be written costs money on a retry, not the run
            log.warning("could not cache answer %s: %s", key, exc)
