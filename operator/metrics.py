"""Prometheus metrics of the operator (served on the port the chart's Service and ServiceMonitor scrape)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "kleinstyle_reconciles_total", "Reconciles by kind and outcome.", ["kind", "outcome"], registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "kleinstyle_reconcile_seconds", "Time spent in one reconcile, API calls included.", ["kind"], registry=REGISTRY
)
CHILDREN_CREATED = Counter(
    "kleinstyle_children_created_total",
    "Children created, by owner kind and child kind.",
    ["kind", "child"],
    registry=REGISTRY,
)
PHASE = Gauge(
    "kleinstyle_resource_phase",
    "1 for the phase each resource is in (by namespace, kind, name).",
    ["namespace", "kind", "name", "phase"],
    registry=REGISTRY,
)
PHASES = ("Pending", "Waiting", "Running", "Succeeded", "Failed")


def set_phase(namespace: str, kind: str, name: str, phase: str | None) -> None:
    for candidate in PHASES:
        PHASE.labels(namespace, kind, name, candidate).set(1 if candidate == phase else 0)


def forget(namespace: str, kind: str, name: str) -> None:
    for candidate in PHASES:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, kind, name, candidate)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
