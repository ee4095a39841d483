"""Prometheus metrics of the operator (served on the port the chart's Service and ServiceMonitor scrape)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

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
TEXT_TOKENS = Counter(
    "kleinstyle_text_tokens_total",
    "Tokens the text provider (Gemini, OpenRouter) spent, by kind, provider, model and direction (prompt, output).",
    ["kind", "provider", "model", "direction"],
    registry=REGISTRY,
)


def set_phase(namespace: str, kind: str, name: str, phase: str | None) -> None:
    for candidate in PHASES:
        PHASE.labels(namespace, kind, name, candidate).set(1 if candidate == phase else 0)


def forget(namespace: str, kind: str, name: str) -> None:
    for candidate in PHASES:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, kind, name, candidate)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


def count_tokens(kind: str, old_status: Mapping[str, Any], new_status: Mapping[str, Any]) -> None:
    """Add a run's token usage once, when its `tokenUsage` first appears in status (a new run's replaces the old
    one's, and is counted in turn); reconciles that rewrite the same value add nothing."""
    usage = new_status.get("tokenUsage")
    if not isinstance(usage, Mapping) or usage == old_status.get("tokenUsage"):
        return
    for direction, field in (("prompt", "promptTokens"), ("output", "outputTokens")):
        value = usage.get(field)
        if isinstance(value, int) and value > 0:
            TEXT_TOKENS.labels(kind, str(usage.get("provider")), str(usage.get("model")), direction).inc(value)
