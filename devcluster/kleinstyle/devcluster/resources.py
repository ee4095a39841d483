"""Which kinds the dev cluster serves: the built-in ones kmock bundles, plus custom kinds from CRD documents.

Objects are stored per (group, plural), whatever version a request names, the way a real API server keeps one
storage version: a CRD with several served versions reads and writes the same objects (no conversion webhooks).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import kmock

CRD_GROUP = "apiextensions.k8s.io"
CRD_PLURAL = "customresourcedefinitions"
# Groups in kmock's bundled discovery (taken from a K3s cluster) that K3s' add-ons serve, not kube-apiserver:
# metrics-server's and Traefik's Gateway API. A real control plane has neither.
K3S_ADDON_GROUPS = frozenset({"metrics.k8s.io", "gateway.networking.k8s.io"})
# Kinds stored as another: events.k8s.io Events are the core Events in another shape (kleinstyle.devcluster.builtin).
STORAGE_ALIASES = {("events.k8s.io", "events"): ("", "events")}
ALL_VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"})


@dataclass(frozen=True)
class ResourceKind:
    """One served group/version/plural and what the API machinery needs to know about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str] = frozenset()
    singular: str = ""
    shortnames: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    verbs: frozenset[str] = ALL_VERBS
    custom: bool = False  # defined by a CRD: admission applies to it
    storage_key: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        key = (self.group, self.plural)
        object.__setattr__(self, "storage_key", STORAGE_ALIASES.get(key, key))

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified(self) -> str:
        """`jobs.batch` style name, as real error messages print it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def builtin_kinds() -> list[ResourceKind]:
    """The built-in kinds of a recent Kubernetes (kmock's bundled discovery data, from a K3s cluster)."""
    return list(_bundled_kinds())


@functools.cache
def _bundled_kinds() -> tuple[ResourceKind, ...]:
    bundled = kmock.ResourcesArray()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kmock reads its data with a deprecated importlib call
        bundled.load_bundled()
    kinds: list[ResourceKind] = []
    for ref in bundled:
        info = bundled[ref]
        if not info.kind or "list" not in info.verbs or ref.plural is None or ref.group in K3S_ADDON_GROUPS:
            continue
        kinds.append(
            ResourceKind(
                group=ref.group or "",
                version=ref.version or "v1",
                plural=ref.plural,
                kind=info.kind,
                namespaced=bool(info.namespaced),
                subresources=frozenset(info.subresources),
                singular=info.singular or info.kind.lower(),
                shortnames=frozenset(info.shortnames),
                categories=frozenset(info.categories),
                verbs=frozenset(info.verbs),
            )
        )
    return tuple(kinds)


def kinds_from_crd(crd: Mapping[str, Any]) -> list[ResourceKind]:
    """The served versions of an `apiextensions.k8s.io/v1` CustomResourceDefinition document."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not group or not plural or not kind:
        raise ValueError("a CRD needs spec.group, spec.names.plural and spec.names.kind")
    kinds = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or spec.get("subresources") or {}
        kinds.append(
            ResourceKind(
                group=group,
                version=version["name"],
                plural=plural,
                kind=kind,
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                subresources=frozenset(name for name in ("status", "scale") if name in subresources),
                singular=names.get("singular") or kind.lower(),
                shortnames=frozenset(names.get("shortNames") or ()),
                categories=frozenset(names.get("categories") or ()),
                custom=True,
            )
        )
    if not kinds:
        raise ValueError(f"CRD {plural}.{group} serves no version")
    return kinds


class KindRegistry:
    """Looks kinds up the ways requests and people name them: by URL parts, apiVersion+kind, or a short name."""

    def __init__(self, kinds: Iterable[ResourceKind] = ()) -> None:
        self._by_gvp: dict[tuple[str, str, str], ResourceKind] = {}
        self.revision = 0  # bumped on every change, so discovery knows when to refresh
        for kind in kinds:
            self.add(kind)

    def add(self, kind: ResourceKind) -> None:
        self._by_gvp[(kind.group, kind.version, kind.plural)] = kind
        self.revision += 1

    def remove(self, kind: ResourceKind) -> None:
        self._by_gvp.pop((kind.group, kind.version, kind.plural), None)
        self.revision += 1

    def __iter__(self) -> Iterator[ResourceKind]:
        return iter(list(self._by_gvp.values()))

    def get(self, group: str, version: str, plural: str) -> ResourceKind | None:
        return self._by_gvp.get((group, version, plural))

    def for_object(self, api_version: str, kind: str) -> ResourceKind | None:
        group, _, version = api_version.rpartition("/")
        for candidate in self._by_gvp.values():
            if candidate.group == group and candidate.version == version and candidate.kind == kind:
                return candidate
        return None

    def find(self, name: str) -> ResourceKind:
        """Resolve `jobs`, `Job`, `job`, `batch/v1/jobs`, `jobs.batch` or `styleboards.kleinstyle.dev`.

        Custom kinds win over built-ins of the same name, then the core and batch groups over look-alikes such as
        events.k8s.io's events.
        """
        group: str | None = None
        version: str | None = None
        word = name
        if "/" in name:
            parts = name.split("/")
            if len(parts) == 3:
                group, version, word = parts
            elif len(parts) == 2:
                version, word = parts
                group = ""
        elif "." in name:
            word, group = name.split(".", 1)
        lowered = word.lower()
        matches = [
            kind
            for kind in self._by_gvp.values()
            if (group is None or kind.group == group)
            and (version is None or kind.version == version)
            and lowered in {kind.plural, kind.singular, kind.kind.lower(), *kind.shortnames}
        ]
        if not matches:
            raise KeyError(f"the server doesn't have a resource type {name!r}")
        matches.sort(key=lambda kind: (not kind.custom, kind.group not in ("", "batch"), kind.group))
        return matches[0]
