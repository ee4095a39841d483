"""Kubernetes-style conditions, merged so that lastTransitionTime moves only when a condition's status does.

Ours are `api.common.Condition` (the status model's); `condition` and `true_condition` read the conditions of any
object as the API serves it (a Job's, a Workload's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .api.common import Condition, ConditionStatus


def cond(type_: str, status: ConditionStatus, reason: str, message: str = "") -> Condition:
    """A condition as a reconcile decides it; `merge_conditions` gives it the time it last changed."""
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time="")


def merge_conditions(
    old: Sequence[Condition], new: Sequence[Condition], now: str, generation: int | None
) -> list[Condition]:
    """Old conditions updated by `new` (by type); types not in `new` are kept as they were."""
    previous = {c.type: c for c in old}
    merged = dict(previous)
    for change in new:
        before = previous.get(change.type)
        since = now  # a new condition, or one whose status changed; else the time it last changed
        if before is not None and before.status == change.status and before.last_transition_time:
            since = before.last_transition_time
        update: dict[str, Any] = {"last_transition_time": since}
        if generation is not None:
            update["observed_generation"] = generation
        merged[change.type] = change.model_copy(update=update)
    return list(merged.values())


def condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_` in an object's `status.conditions` (a Job's, a Workload's), or None."""
    conditions: list[Mapping[str, Any]] = ((obj or {}).get("status") or {}).get("conditions") or []
    for item in conditions:
        if item.get("type") == type_:
            return item
    return None


def true_condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_` when it is True, or None."""
    found = condition(obj, type_)
    return found if found is not None and found.get("status") == "True" else None
