"""The patch formats clients send, and the three-way patch `kubectl apply` computes.

Merge patches (RFC 7386) replace lists whole. Strategic merge patches, which kubectl and the `kubernetes` client
send for built-in kinds, are applied as merge patches with their `$` directives dropped: list elements are not
merged by key. JSON patches (RFC 6902) are exact, including the `test` operation kopf uses for optimistic locking.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonpatch
import jsonpointer

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class PatchError(ValueError):
    """The patch does not apply: a failed `test`, a missing path, or a body of the wrong shape."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, `null` deletes a key, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            continue  # strategic-merge directives ($patch, $setElementOrder/...): not modelled
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_patch(obj: dict[str, Any], patch: Any, content_type: str) -> dict[str, Any]:
    """Apply a request's patch body to a copy of `obj` according to its Content-Type."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == JSON_PATCH or isinstance(patch, list):
        if not isinstance(patch, list):
            raise PatchError("a JSON patch must be a list of operations")
        try:
            result = jsonpatch.apply_patch(copy.deepcopy(obj), patch)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            raise PatchError(str(exc)) from exc
    else:
        if not isinstance(patch, Mapping):
            raise PatchError("a merge patch must be a JSON object")
        result = merge_patch(copy.deepcopy(obj), patch)
    if not isinstance(result, dict):
        raise PatchError("the patched object is not a JSON object")
    return result


def three_way_patch(last_applied: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch `kubectl apply` sends: set what `desired` says, delete what was applied before and is gone.

    Fields that other writers added (never in a previous apply) stay untouched, which is why an operator's status
    and annotations survive a re-apply.
    """
    patch: dict[str, Any] = {}
    previous = last_applied or {}
    for key, value in desired.items():
        old = previous.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            patch[key] = three_way_patch(old, value)
        else:
            patch[key] = copy.deepcopy(value)
    for key in previous:
        if key not in desired:
            patch[key] = None
    return patch
