"""Label and field selectors as the API server reads them (`?labelSelector=a=b,c in (x,y),!d`).

kmock ignores selectors, and the operator lists its children by label, so the emulator filters lists and watches
itself. A malformed selector is the client's error (HTTP 400), as on a real server, and so is a field selector on a
field the kind's registry does not index (`FIELD_LABELS`): a real server refuses `status.phase` on a ConfigMap, and
an emulator that filtered on any field would let such a list pass here and fail on a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_REQUIREMENT = re.compile(
    r"""^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9][A-Za-z0-9_./-]*)\s*
    (?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)
      |\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)
    )?\s*$""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=" and "notin" match absent keys too


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `( )` of a set-based requirement."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse equality-based and set-based requirements; raise ValueError on anything else."""
    requirements = []
    for part in _split_top_level(text or ""):
        match = _REQUIREMENT.match(part)
        if match is None:
            raise ValueError(f"unable to parse requirement: {part.strip()!r}")
        key = match["key"]
        if match["neg"]:
            if match["op"] or match["setop"]:
                raise ValueError(f"unable to parse requirement: {part.strip()!r}")
            requirements.append(Requirement(key, "!exists"))
        elif match["op"]:
            requirements.append(Requirement(key, "!=" if match["op"] == "!=" else "=", frozenset({match["value"]})))
        elif match["setop"]:
            values = frozenset(value.strip() for value in match["values"].split(",") if value.strip())
            requirements.append(Requirement(key, match["setop"], values))
        else:
            requirements.append(Requirement(key, "exists"))
    return requirements


def labels_match(requirements: list[Requirement], obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(requirement.matches(labels) for requirement in requirements)


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """`metadata.name=x,status.phase!=Failed` -> [(path, op, value)]; only equality operators exist for fields."""
    selectors = []
    for part in _split_top_level(text or ""):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if match is None:
            raise ValueError(f"invalid field selector: {part.strip()!r}")
        path, op, value = match.groups()
        selectors.append((path, "!=" if op == "!=" else "=", value))
    return selectors


def fields_match(selectors: list[tuple[str, str, str]], obj: Mapping[str, Any]) -> bool:
    for path, op, expected in selectors:
        value: Any = obj
        for step in path.split("."):
            value = value.get(step) if isinstance(value, Mapping) else None
        actual = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if (actual == expected) != (op == "="):
            return False
    return True


_POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.podIPs",
    "status.nominatedNodeName",
)
_REGARDING = ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
_EVENT_FIELDS = (*(f"involvedObject.{f}" for f in _REGARDING), "reason", "reportingComponent", "source", "type")
_META = ("metadata.name", "metadata.namespace")
# (group, plural) -> the field labels its registry converts (Kubernetes 1.37's pkg/apis/*/v1/conversion.go), each
# to the stored object's path, and how it words a refusal; other built-in kinds take metadata.name and
# metadata.namespace only (runtime.DefaultMetaV1FieldSelectorConversion).
FIELD_LABELS: dict[tuple[str, str], tuple[dict[str, str], str]] = {
    ("", "pods"): ({f: f for f in (*_META, *_POD_FIELDS)} | {"spec.host": "spec.nodeName"}, "unsupported"),
    ("", "nodes"): ({f: f for f in ("metadata.name", "spec.unschedulable")}, "unsupported"),
    ("", "events"): ({f: f for f in (*_META, *_EVENT_FIELDS)}, "unsupported"),
    ("", "namespaces"): ({f: f for f in ("metadata.name", "status.phase")}, "unsupported"),
    ("", "secrets"): ({f: f for f in (*_META, "type")}, "unsupported"),
    ("", "services"): ({f: f for f in (*_META, "spec.clusterIP", "spec.type")}, "unsupported"),
    ("", "replicationcontrollers"): ({f: f for f in (*_META, "status.replicas")}, "unsupported"),
    # events.k8s.io's names for the core Event's fields, which are what is stored
    ("events.k8s.io", "events"): (
        {f: f for f in (*_META, "reason", "type")}
        | {f"regarding.{f}": f"involvedObject.{f}" for f in _REGARDING}
        | {"reportingController": "reportingComponent"},
        "unsupported",
    ),
    ("batch", "jobs"): ({f: f for f in (*_META, "status.successful")}, "Job"),
}


def convert_field_selector(
    selectors: list[tuple[str, str, str]],
    resource: tuple[str, str],
    *,
    custom: bool,
    namespaced: bool,
    selectable: tuple[str, ...] = (),
) -> list[tuple[str, str, str]]:
    """`selectors` with each label as the stored object's path; ValueError, in the API server's words, for a
    label the kind does not index. `resource` is (group, plural); a custom kind indexes metadata.name,
    metadata.namespace where it is namespaced, and its CRD's `selectableFields`."""
    if custom:
        known = {"metadata.name": "metadata.name"} | (
            {"metadata.namespace": "metadata.namespace"} if namespaced else {}
        )
        known |= {field: field for field in selectable}
        refusal = "unsupported"
    else:
        known, refusal = FIELD_LABELS.get(resource, ({f: f for f in _META}, "meta"))
    converted = []
    for label, op, value in selectors:
        if label not in known:
            if refusal == "meta":
                raise ValueError(f'"{label}" is not a known field selector: only "metadata.name", "metadata.namespace"')
            if refusal == "unsupported":
                raise ValueError(f"field label not supported: {label}")
            raise ValueError(f'field label "{label}" not supported for {refusal}')
        converted.append((known[label], op, value))
    return converted
