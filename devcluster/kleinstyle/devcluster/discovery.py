"""Discovery documents as a real API server writes them, from the kinds the dev cluster serves.

kmock's scaffold names the core group version `/v1` (kubectl then finds no ConfigMaps or Secrets and reads
metrics.k8s.io's pods instead of the core ones) and gives subresources their resource's short names (every `kubectl
get sl` warns that `sl` could also mean `styleloras/status`). Here: `groupVersion: v1` for the core group, groups in
the API server's priority order (built-in groups first, then custom groups), subresources without short names and
with their own verbs, CRD categories, and a server version of the Kubernetes the dev cluster stands for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .resources import ResourceKind

SERVER_VERSION = {
    "major": "1",
    "minor": "37",
    "gitVersion": "v1.37.0-devcluster",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-12-01T00:00:00Z",
    "goVersion": "go1.26.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}
# Verbs of subresources, as a real server lists them (the rest: get).
SUBRESOURCE_VERBS = {
    "status": ["get", "patch", "update"],
    "scale": ["get", "patch", "update"],
    "finalize": ["update"],
    "binding": ["create"],
    "eviction": ["create"],
    "token": ["create"],
    "exec": ["create", "get"],
    "attach": ["create", "get"],
    "portforward": ["create", "get"],
    "proxy": ["create", "delete", "get", "patch", "update"],
    "ephemeralcontainers": ["get", "patch", "update"],
    "resize": ["get", "patch", "update"],
}
SUBRESOURCE_KINDS = {
    "scale": "Scale",
    "binding": "Binding",
    "eviction": "Eviction",
    "token": "TokenRequest",
    "exec": "PodExecOptions",
    "attach": "PodAttachOptions",
    "portforward": "PodPortForwardOptions",
}


def is_discovery_path(path: str) -> bool:
    parts = [p for p in path.split("/") if p]
    return (parts[:1] == ["api"] and len(parts) <= 2) or (parts[:1] == ["apis"] and len(parts) <= 3)


def _groups(kinds: Iterable[ResourceKind]) -> dict[str, list[str]]:
    """Group -> served versions, built-in groups first in the server's order, then custom ones."""
    ordered = sorted(kinds, key=lambda k: k.custom)  # stable: the registry keeps the built-in order
    groups: dict[str, list[str]] = {}
    for kind in ordered:
        versions = groups.setdefault(kind.group, [])
        if kind.version not in versions:
            versions.append(kind.version)
    return groups


def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


def _resources(kinds: Iterable[ResourceKind]) -> list[dict[str, Any]]:
    out = []
    for kind in kinds:
        entry: dict[str, Any] = {
            "name": kind.plural,
            "singularName": kind.singular,
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": sorted(kind.verbs),
        }
        if kind.shortnames:
            entry["shortNames"] = sorted(kind.shortnames)
        if kind.categories:
            entry["categories"] = sorted(kind.categories)
        out.append(entry)
        for sub in sorted(kind.subresources):
            out.append(
                {
                    "name": f"{kind.plural}/{sub}",
                    "singularName": "",
                    "namespaced": kind.namespaced,
                    "kind": f"{kind.kind}ProxyOptions" if sub == "proxy" else SUBRESOURCE_KINDS.get(sub, kind.kind),
                    "verbs": SUBRESOURCE_VERBS.get(sub, ["get"]),
                }
            )
    return out


def document(path: str, kinds: list[ResourceKind]) -> dict[str, Any] | None:
    """The discovery document at `path` (`/api`, `/api/v1`, `/apis`, `/apis/G`, `/apis/G/V`); None: not served."""
    parts = [p for p in path.split("/") if p]
    groups = _groups(kinds)
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": groups.get("", ["v1"])}
    if parts == ["apis"]:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [_group_doc(g, v) for g, v in groups.items() if g],
        }
    if parts[0] == "apis" and len(parts) == 2:
        return (
            {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(parts[1], groups[parts[1]])}
            if parts[1] in groups
            else None
        )
    group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
    served = [k for k in kinds if k.group == group and k.version == version]
    if not served:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": _resources(served),
    }
