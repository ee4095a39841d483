"""The chart's Grafana dashboard against a real Prometheus (Debian's, fetched by `make controlplane`): Prometheus
scrapes the operator every second while a run goes on, then every query of the dashboard is sent as Grafana sends a
panel's (a range query over the run, its variables filled as Grafana fills them) and must answer with data.

tests/chart/test_monitoring.py checks that each query parses and names metrics the operator has; only a real query
engine on real scrapes shows that a panel is not empty: a series that appears only when its first event happens
hides that event from increase() and rate(), a gauge may exist only between two scrapes.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kleinstyle.devcluster.controlplane import free_port
from kleinstyle.devcluster.prometheus import VERSION, Prometheus, find_prometheus

DASHBOARD = Path(__file__).parents[2] / "charts" / "kleinstyle" / "files" / "grafana-dashboard.json"
SCRAPE_SECONDS = 1
LABEL_VALUES = re.compile(r"^label_values\((\w+), (\w+)\)$")
# Panels a run of examples/ on the real control plane cannot feed, and why: each must stay empty there (so this goes
# when the run starts feeding it); test_prometheus.py feeds it through the operator's own registry instead.
NOT_FED_BY_THE_EXAMPLES = {
    "Text tokens": "no text provider has a key in the run (examples/styleboard.yaml's Secret is not created): the "
    "board keeps its shipped captions and spends no tokens",
}


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    """Every panel's targets, in the dashboard's order."""
    return [
        Query(panel["title"], target.get("refId", ""), target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def grafana_variables(start: float, end: float, step: float, namespace: str) -> dict[str, str]:
    """What Grafana puts in place of its variables for a panel showing [start, end] at `step` with `namespace`
    picked: $__range is the time range, $__interval the step, $__rate_interval max(4 scrape intervals, step + one)."""
    return {
        "$namespace": namespace,  # a DNS label: nothing in it a regex (or Grafana) would escape
        "$__rate_interval": f"{max(4 * SCRAPE_SECONDS, step + SCRAPE_SECONDS):g}s",
        "$__range": f"{math.ceil(end - start)}s",
        "$__interval": f"{step:g}s",
    }


def fill(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $__rate_interval before any name it might contain
        expr = expr.replace(name, variables[name])
    return expr


def finite_samples(series: list[dict[str, Any]]) -> int:
    """Samples of a range query's result that a panel draws (Prometheus sends NaN for a quantile of no events)."""
    return sum(1 for s in series for _, value in s["values"] if math.isfinite(float(value)))


class ScrapedRun:
    """The operator's metrics on a free port of this machine (set in the chart's `values`), scraped by Prometheus
    from enter to exit; where Prometheus is not fetched it says so and checks nothing."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.port = free_port()
        values["config"]["metricsPort"] = self.port
        self.bin_dir = find_prometheus()
        self.prometheus: Prometheus | None = None
        self.started = 0.0

    def __enter__(self) -> ScrapedRun:
        if self.bin_dir is not None:
            self.prometheus = Prometheus([f"127.0.0.1:{self.port}"], self.bin_dir).__enter__()
        self.started = time.time()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()

    def unanswered(self, namespace: str) -> list[str]:
        """Each dashboard query that gave a panel showing the run so far nothing to draw, with why it may be; []
        where Prometheus is not fetched (`summary` says so)."""
        if self.prometheus is None:
            return []
        prometheus, start, end, step = self.prometheus, self.started, time.time(), float(SCRAPE_SECONDS)
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        missing = []
        # The namespace picker lists the run's namespace (Grafana's label_values asks for the series' labels).
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                matched = LABEL_VALUES.match(variable["query"]["query"])
                assert matched, f"${variable['name']}: {variable['query']['query']} is no label_values(METRIC, LABEL)"
                metric, label = matched.groups()
                values = {s["metric"].get(label) for s in prometheus.query_range(metric, start, end, step)}
                if namespace not in values:
                    missing.append(f"${variable['name']}: label_values({metric}, {label}) = {sorted(map(str, values))}")
        variables = grafana_variables(start, end, step, namespace)
        for query in panel_queries(dashboard):
            expr = fill(query.expr, variables)
            found = prometheus.query_range(expr, start, end, step)
            if query.panel in NOT_FED_BY_THE_EXAMPLES:
                if found:
                    missing.append(f"{query.panel}: {expr} answers now: drop it from NOT_FED_BY_THE_EXAMPLES")
            elif not finite_samples(found):
                missing.append(f"{query.panel} ({query.ref}): {expr}: {len(found)} series, no finite sample")
        if missing:
            targets = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in prometheus.active_targets()]
            missing.append(f"(scrape targets: {targets})")
        return missing

    def summary(self) -> str:
        if self.prometheus is None:
            return f"dashboard not checked: no Prometheus (`make controlplane` fetches Prometheus {VERSION})"
        unfed = ", ".join(NOT_FED_BY_THE_EXAMPLES)
        return f"dashboard: every query answered by Prometheus {VERSION} but {unfed} (test_prometheus.py feeds them)"
