"""Prometheus metrics of the operator (served on the port the chart's Service and ServiceMonitor scrape).

Usage is recorded on the transitions `usage` finds between the status before and after a reconcile, so counters
count each fact once per operator process; the names are documented in the README (Metrics) and used by the chart's
dashboard and alerts (checked by tests/chart).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from . import usage
from .api import BY_KIND
from .api.common import CommonStatus
from .api.styleboard import StyleBoardStatus
from .indexes import CHILD_KINDS

# No `*_created` series beside each counter and histogram: twice the series for a timestamp nobody queries.
disable_created_metrics()
REGISTRY = CollectorRegistry()
MINUTES_TO_DAYS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)

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
GPU_SECONDS = Counter(
    "kleinstyle_gpu_seconds_total",
    "GPU-seconds the runs' pods held (GPUs x seconds running), by namespace, kind and node pool.",
    ["namespace", "kind", "node_pool"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "kleinstyle_queue_wait_seconds",
    "Time from a Job's creation (or its last eviction) to its start: the wait for Kueue's admission and a node.",
    ["namespace", "kind"],
    buckets=(1, *MINUTES_TO_DAYS),
    registry=REGISTRY,
)
QUEUED_SINCE = Gauge(
    "kleinstyle_queued_since_timestamp_seconds",
    "Unix time since when a resource's Job has waited in Kueue's queue (absent when it does not wait).",
    ["namespace", "kind", "name"],
    registry=REGISTRY,
)
RUNS = Counter(
    "kleinstyle_runs_total",
    "Runs finished, by namespace, kind and outcome.",
    ["namespace", "kind", "outcome"],
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "kleinstyle_run_duration_seconds",
    "Time a finished run's pods ran (from the Job's start to its completion), by kind and outcome.",
    ["kind", "outcome"],
    buckets=MINUTES_TO_DAYS,
    registry=REGISTRY,
)
TRAINING = {
    field: Gauge(f"kleinstyle_training_{field}", help_text, ["namespace", "name"], registry=REGISTRY)
    for field, help_text in (
        ("step", "Current step of a StyleLoRA that is training."),
        ("total_steps", "Planned steps of a StyleLoRA that is training."),
        ("loss", "Latest training loss of a StyleLoRA that is training."),
        ("eta_seconds", "Estimated seconds left for a StyleLoRA that is training."),
    )
}
CHECKPOINTS_SCORED = Counter(
    "kleinstyle_checkpoints_scored_total", "Checkpoints scored for early stopping.", ["namespace"], registry=REGISTRY
)
EARLY_STOPS = Counter(
    "kleinstyle_early_stops_total",
    "StyleLoRA runs that ended before their planned steps, by reason (no_improvement, guards, stop_requested).",
    ["namespace", "reason"],
    registry=REGISTRY,
)
IMAGES_RENDERED = Counter(
    "kleinstyle_images_rendered_total", "Images GenerationJobs rendered.", ["namespace"], registry=REGISTRY
)
FUSION_SECONDS = Histogram(
    "kleinstyle_fusion_seconds",
    "Time a LoRAFusion took, reading and writing included.",
    ["namespace"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
TEXT_TOKENS = Counter(
    "kleinstyle_text_tokens_total",
    "Tokens the text provider (Gemini, OpenRouter) spent, by kind, provider, model and direction (prompt, output).",
    ["kind", "provider", "model", "direction"],
    registry=REGISTRY,
)


OUTCOMES = ("Succeeded", "Failed")  # a finished run's (reconcile.TERMINAL)
EARLY_STOP_CAUSES = ("no_improvement", "guards", "stop_requested")  # early_stop.stop_cause's, "completed" aside


def _zero_what_every_kind_has() -> None:
    """The series whose labels are known at start, at 0. Prometheus' increase() and rate() see a counter's step only
    from a sample before it: a series that first appears at 1 hides its first event, so the first reconcile error
    (or run, below) would never reach an alert or a panel."""
    for kind in BY_KIND:
        for outcome in ("ok", "error"):
            RECONCILES.labels(kind, outcome)
        RECONCILE_SECONDS.labels(kind)
        for child in CHILD_KINDS:
            CHILDREN_CREATED.labels(kind, child)
        for outcome in OUTCOMES:
            RUN_SECONDS.labels(kind, outcome)


_zero_what_every_kind_has()


def zero_what_a_namespace_counts(change: usage.Change) -> None:
    """The namespace's series of its kind at 0 from its first reconcile there, and a Job's GPU series from when the
    Job is seen (see _zero_what_every_kind_has): the first Failed run in a namespace is an increase, and fires
    KleinstyleRunsFailing."""
    ns, kind = change.namespace, change.kind
    for outcome in OUTCOMES:
        RUNS.labels(ns, kind, outcome)
    QUEUE_WAIT.labels(ns, kind)
    for job in change.jobs.values():
        gpus, pool = usage.gpus_of(job)
        if gpus:
            GPU_SECONDS.labels(ns, kind, pool)
    if kind == "StyleLoRA":
        CHECKPOINTS_SCORED.labels(ns)
        for cause in EARLY_STOP_CAUSES:
            EARLY_STOPS.labels(ns, cause)
    elif kind == "GenerationJob":
        IMAGES_RENDERED.labels(ns)
    elif kind == "LoRAFusion":
        FUSION_SECONDS.labels(ns)


def set_phase(namespace: str, kind: str, name: str, phase: str | None) -> None:
    for candidate in PHASES:
        PHASE.labels(namespace, kind, name, candidate).set(1 if candidate == phase else 0)


def forget(namespace: str, kind: str, name: str) -> None:
    """Drop the per-resource series of a deleted resource."""
    for candidate in PHASES:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, kind, name, candidate)
    with contextlib.suppress(KeyError):
        QUEUED_SINCE.remove(namespace, kind, name)
    if kind == "StyleLoRA":
        for gauge in TRAINING.values():
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)


def record(change: usage.Change) -> tuple[float, str] | None:
    """Everything a reconcile's status change adds to the metrics; the GPU-seconds it counted (and their node pool),
    which the log keeps too: a tenant's bill is read against it."""
    ns, kind = change.namespace, change.kind
    zero_what_a_namespace_counts(change)
    set_phase(ns, kind, change.name, change.after.phase)
    count_tokens(kind, change.before, change.after)
    if (gpu := usage.gpu_seconds(change)) is not None:
        GPU_SECONDS.labels(ns, kind, gpu[1]).inc(gpu[0])
    if (waited := usage.queue_wait(change)) is not None:
        QUEUE_WAIT.labels(ns, kind).observe(waited)
    if (since := usage.queued_since(change)) is not None:
        QUEUED_SINCE.labels(ns, kind, change.name).set(since)
    else:
        with contextlib.suppress(KeyError):
            QUEUED_SINCE.remove(ns, kind, change.name)
    if (done := usage.finished_run(change)) is not None:
        RUNS.labels(ns, kind, done[0]).inc()
        if done[1] is not None:
            RUN_SECONDS.labels(kind, done[0]).observe(done[1])
    if scored := usage.checkpoints_scored(change):
        CHECKPOINTS_SCORED.labels(ns).inc(scored)
    if (cause := usage.early_stop(change)) is not None:
        EARLY_STOPS.labels(ns, cause).inc()
    if rendered := usage.images_rendered(change):
        IMAGES_RENDERED.labels(ns).inc(rendered)
    if (seconds := usage.fusion_seconds(change)) is not None:
        FUSION_SECONDS.labels(ns).observe(seconds)
    if kind == "StyleLoRA":
        values = usage.training(change) or {}
        for field, gauge in TRAINING.items():
            if field in values:
                gauge.labels(ns, change.name).set(values[field])
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(ns, change.name)
    return gpu


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


def count_tokens(kind: str, old_status: CommonStatus, new_status: CommonStatus) -> None:
    """Add a run's token usage once, when its `tokenUsage` first appears in status (a new run's replaces the old
    one's, and is counted in turn); reconciles that rewrite the same value add nothing."""
    usage = new_status.token_usage if isinstance(new_status, StyleBoardStatus) else None
    before = old_status.token_usage if isinstance(old_status, StyleBoardStatus) else None
    if usage is None or usage == before:
        return
    for direction, value in (("prompt", usage.prompt_tokens), ("output", usage.output_tokens)):
        if value > 0:
            TEXT_TOKENS.labels(kind, usage.provider, usage.model, direction).inc(value)
