"""Shared fixtures: an emulator serving one ad-hoc custom kind, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kleinstyle.devcluster import Emulator, KubeClient


def crd(kind: str = "Widget", plural: str = "widgets", group: str = "example.dev") -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": ["wd"]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
            ],
        },
    }


def widget(name: str, spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": "default", **meta},
        "spec": spec if spec is not None else {"size": 1},
    }


@pytest.fixture
def widget_crd() -> dict[str, Any]:
    return crd()


@pytest.fixture
def new_widget() -> Callable[..., dict[str, Any]]:
    return widget


@pytest.fixture
async def api() -> AsyncIterator[Emulator]:
    async with Emulator([crd()]) as emulator:
        yield emulator


@pytest.fixture
async def client(api: Emulator) -> AsyncIterator[KubeClient]:
    async with KubeClient(api.url, api.kinds) as http:
        yield http
