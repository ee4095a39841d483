"""Server-side printing: the `Table` a real API server answers when kubectl asks `as=Table`.

kubectl's columns come from the server, not from kubectl: a custom kind's are its CRD's `additionalPrinterColumns`
(evaluated here, dates shown as ages the way the server shows them), a built-in kind's are the server's printers
(a few common ones here, Name and Age for the rest). Without it `kubectl get stylelora` printed NAME and AGE only.
Watches get one-row tables, as a real server streams them.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .resources import ResourceKind

Cell = Callable[[Mapping[str, Any]], Any]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept and "g=meta.k8s.io" in accept


def human_duration(seconds: float) -> str:
    """Kubernetes' HumanDuration: 75s, 5m2s, 3h10m, 2d4h, 40d, 3y12d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d" if hours % 24 == 0 else f"{days}d{hours % 24}h"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return f"{days // 365}y{days % 365}d"
    return f"{days // 365}y"


def _time(timestamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def age(timestamp: Any) -> str:
    if not isinstance(timestamp, str) or not timestamp:
        return "<unknown>"
    try:
        then = _time(timestamp)
    except ValueError:
        return "<invalid>"
    return human_duration((datetime.datetime.now(datetime.UTC) - then).total_seconds())


def json_path(obj: Any, path: str) -> Any:
    """A printer column's jsonPath (`.status.phase`, `.spec.items[0].name`); None where it leads nowhere."""
    value = obj
    for part in path.strip(".").replace("]", "").replace("[", ".").split("."):
        if not part:
            continue
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        elif isinstance(value, Mapping):
            value = value.get(part)
        else:
            return None
    return value


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    cell: Cell
    priority: int = 0
    format: str = ""
    description: str = ""

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


NAME = Column("Name", "string", lambda o: _meta(o).get("name", ""), format="name", description="Name of the object")
AGE = Column("Age", "string", lambda o: age(_meta(o).get("creationTimestamp")), description="Time since creation")


def _pod_status(pod: Mapping[str, Any]) -> str:
    status = pod.get("status") or {}
    if _meta(pod).get("deletionTimestamp"):
        return "Terminating"
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        for key in ("waiting", "terminated"):
            if (state.get(key) or {}).get("reason"):
                return state[key]["reason"]
    return status.get("phase") or "Pending"


def _pod_ready(pod: Mapping[str, Any]) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or []) or len(statuses)
    return f"{sum(bool(c.get('ready')) for c in statuses)}/{total}"


def _job_status(job: Mapping[str, Any]) -> str:
    conditions = {c.get("type"): c.get("status") for c in (job.get("status") or {}).get("conditions") or []}
    for kind, shown in (("Complete", "Complete"), ("Failed", "Failed"), ("Suspended", "Suspended")):
        if conditions.get(kind) == "True":
            return shown
    return "Running"


def _job_duration(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    start = status.get("startTime")
    if not start:
        return ""
    end = status.get("completionTime")
    if not end:
        return age(start)
    return human_duration((_time(end) - _time(start)).total_seconds())


def _event_object(event: Mapping[str, Any]) -> str:
    target = event.get("involvedObject") or event.get("regarding") or {}
    return f"{str(target.get('kind', '')).lower()}/{target.get('name', '')}"


def _last_seen(event: Mapping[str, Any]) -> str:
    for key in ("lastTimestamp", "deprecatedLastTimestamp", "eventTime", "firstTimestamp"):
        if event.get(key):
            return age(event[key])
    return age(_meta(event).get("creationTimestamp"))


BUILTIN: dict[str, list[Column]] = {
    "pods": [
        NAME,
        Column("Ready", "string", _pod_ready),
        Column("Status", "string", _pod_status),
        Column(
            "Restarts",
            "integer",
            lambda p: sum(c.get("restartCount", 0) for c in (p.get("status") or {}).get("containerStatuses") or []),
        ),
        AGE,
    ],
    "jobs.batch": [
        NAME,
        Column("Status", "string", _job_status),
        Column(
            "Completions",
            "string",
            lambda j: f"{(j.get('status') or {}).get('succeeded', 0)}/{(j.get('spec') or {}).get('completions', 1)}",
        ),
        Column("Duration", "string", _job_duration),
        AGE,
    ],
    "secrets": [
        NAME,
        Column("Type", "string", lambda s: s.get("type", "Opaque")),
        Column("Data", "integer", lambda s: len(s.get("data") or {})),
        AGE,
    ],
    "configmaps": [
        NAME,
        Column("Data", "integer", lambda c: len(c.get("data") or {}) + len(c.get("binaryData") or {})),
        AGE,
    ],
    "namespaces": [NAME, Column("Status", "string", lambda n: (n.get("status") or {}).get("phase", "Active")), AGE],
}
EVENT_COLUMNS = [
    Column("Last Seen", "string", _last_seen),
    Column("Type", "string", lambda e: e.get("type", "")),
    Column("Reason", "string", lambda e: e.get("reason", "")),
    Column("Object", "string", _event_object),
    Column("Message", "string", lambda e: e.get("message") or e.get("note") or ""),
]
BUILTIN["events"] = BUILTIN["events.events.k8s.io"] = EVENT_COLUMNS


def _printer_cell(column: Mapping[str, Any]) -> Cell:
    path, kind = column.get("jsonPath", ""), column.get("type")

    def cell(obj: Mapping[str, Any]) -> Any:
        value = json_path(obj, path)
        return (age(value) if value else "<unknown>") if kind == "date" else value

    return cell


def columns(kind: ResourceKind, crd: Mapping[str, Any] | None) -> list[Column]:
    if crd is None:
        return BUILTIN.get(kind.qualified, [NAME, AGE])
    for version in (crd.get("spec") or {}).get("versions") or []:
        if version.get("name") == kind.version and version.get("additionalPrinterColumns"):
            printed = [
                Column(
                    c["name"],
                    "string" if c.get("type") == "date" else c.get("type", "string"),
                    _printer_cell(c),
                    priority=int(c.get("priority", 0)),
                    format=c.get("format", ""),
                    description=c.get("description", ""),
                )
                for c in version["additionalPrinterColumns"]
            ]
            return [NAME, *printed]
    return [NAME, AGE]


def _row(obj: Mapping[str, Any], cols: list[Column], include: str) -> dict[str, Any]:
    row: dict[str, Any] = {"cells": [c.cell(obj) for c in cols]}
    if include == "Object":
        row["object"] = obj
    elif include != "None":
        row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": _meta(obj)}
    return row


def table(
    kind: ResourceKind, crd: Mapping[str, Any] | None, payload: Mapping[str, Any], include: str
) -> dict[str, Any]:
    """A list or a single object as a Table."""
    cols = columns(kind, crd)
    is_list = payload.get("kind", "").endswith("List") and "items" in payload
    objects = (payload.get("items") or []) if is_list else [payload]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": _meta(payload).get("resourceVersion", "")},
        "columnDefinitions": [c.definition() for c in cols],
        "rows": [_row(o, cols, include) for o in objects],
    }


async def table_events(
    kind: ResourceKind, crd: Mapping[str, Any] | None, events: AsyncIterator[Any], include: str
) -> AsyncIterator[Any]:
    """A watch whose objects are one-row Tables (bookmarks and errors pass as they are)."""
    async for event in events:
        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
            event = {**event, "object": table(kind, crd, event["object"], include)}
        yield event
