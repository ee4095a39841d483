"""Kubernetes-style conditions, merged so that lastTransitionTime moves only when a condition's status does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str = ""


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Condition], now: str, generation: int | None
) -> list[dict[str, Any]]:
    """Old conditions updated by `new` (by type); types not in `new` are kept as they were."""
    previous = {c["type"]: c for c in old}
    merged: dict[str, dict[str, Any]] = {t: dict(c) for t, c in previous.items()}
    for cond in new:
        before = previous.get(cond.type)
        since = now  # a new condition, or one whose status changed; else the time it last changed
        if before is not None and before.get("status") == cond.status:
            since = before.get("lastTransitionTime", now)
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        merged[cond.type] = entry
    return list(merged.values())


def condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_` in an object's `status.conditions` (a Job's, a Workload's, ours), or None."""
    conditions: list[Mapping[str, Any]] = ((obj or {}).get("status") or {}).get("conditions") or []
    for cond in conditions:
        if cond.get("type") == type_:
            return cond
    return None


def true_condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_` when it is True, or None."""
    cond = condition(obj, type_)
    return cond if cond is not None and cond.get("status") == "True" else None
