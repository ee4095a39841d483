"""devcluster/prometheus.py on its own, and the dashboard panels a run of examples/ cannot feed. One Prometheus for
the module (its first scrape comes about 5 s after its start, however short the interval) scrapes two registries of
this process: a probe counter, and the operator's own metrics (kleinstyle.operator.metrics)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from kleinstyle.devcluster.controlplane import free_port
from kleinstyle.devcluster.prometheus import VERSION, Prometheus, PrometheusError, find_prometheus
from kleinstyle.operator import metrics
from kleinstyle.operator.usage import Change
from prometheus_client import CollectorRegistry, Counter, start_http_server

from . import dashboard
from .rbac import wait_for


@dataclass(frozen=True)
class Scraped:
    prometheus: Prometheus
    probe: Counter  # kleinstyle_probe_events_total{kind}
    probe_target: str


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraped]:
    bin_dir = find_prometheus()
    if bin_dir is None:
        pytest.skip(f"no Prometheus: `make controlplane` fetches Prometheus {VERSION} (hack/prometheus/fetch.sh)")
    registry = CollectorRegistry()
    probe = Counter("kleinstyle_probe_events", "Events of this test.", ["kind"], registry=registry)
    probe.labels("a")  # at 0 from the first scrape: the step to 3 is an increase
    ports = free_port(), free_port()
    servers = [
        start_http_server(port, addr="127.0.0.1", registry=served)[0]
        for port, served in zip(ports, (registry, metrics.REGISTRY), strict=True)
    ]
    try:
        with Prometheus([f"127.0.0.1:{port}" for port in ports], bin_dir) as prometheus:
            yield Scraped(prometheus, probe, f"127.0.0.1:{ports[0]}")
    finally:
        for server in servers:
            server.shutdown()


def test_prometheus_scrapes_its_targets_and_answers_queries(scraped: Scraped) -> None:
    prometheus, probe = scraped.prometheus, scraped.probe.labels("a")
    start = time.time()
    wait_for("the first scrape", lambda: prometheus.query("kleinstyle_probe_events_total"), timeout=15)
    probe.inc(3)

    def value() -> str:
        (series,) = prometheus.query("kleinstyle_probe_events_total")
        return str(series["value"][1])

    wait_for("the scrape after the increment", lambda: value() == "3", timeout=15)
    (increase,) = prometheus.query("increase(kleinstyle_probe_events_total[1m])")
    assert increase["metric"] == {"instance": scraped.probe_target, "job": "kleinstyle", "kind": "a"}
    assert float(increase["value"][1]) > 0
    (series,) = prometheus.query_range("kleinstyle_probe_events_total", start, time.time() + 1, 0.5)
    assert {v for _, v in series["values"]} == {"0", "3"}
    assert prometheus.query("1 + 1")[0]["value"][1] == "2"  # a scalar answers as one series
    with pytest.raises(PrometheusError, match=r"bad_data.*parse error"):
        prometheus.query("sum(kleinstyle_probe_events_total")
    assert [t["health"] for t in prometheus.active_targets()] == ["up", "up"]


def test_prometheus_stops_and_leaves_nothing_behind() -> None:
    bin_dir = find_prometheus()
    if bin_dir is None:
        pytest.skip(f"no Prometheus: `make controlplane` fetches Prometheus {VERSION} (hack/prometheus/fetch.sh)")
    with Prometheus([], bin_dir) as prometheus:
        assert prometheus.query("up") == []
        root, process = prometheus.root, prometheus._process
    assert process is not None and process.poll() is not None
    assert not root.exists()


def test_the_queue_and_token_panels_answer_on_the_operators_metrics_of_a_queued_run_and_a_captioned_board(
    scraped: Scraped,
) -> None:
    """What the examples run (test_examples.py) cannot show: no Kueue holds a Job there and no text provider has a
    key, so its queue panels answer 0 and its token panel nothing. Here the operator's own registry records a
    StyleLoRA whose Job Kueue holds and two StyleBoards a provider captioned, Prometheus scrapes it, and the
    dashboard's queue and token queries answer with them."""
    prometheus = scraped.prometheus
    ns, now = "queued-and-captioned", datetime.now(UTC)
    created = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    queued = {
        "phase": "Pending",
        "jobName": "j1",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Queued", "lastTransitionTime": created}],
    }
    pending_job = {"metadata": {"name": "j1", "creationTimestamp": created}}

    def captioned(board: str, tokens: int) -> Change:
        usage = {"provider": "gemini", "model": "gemini-2.5-pro", "calls": 1, "cachedCalls": 0}
        after = {
            "phase": "Succeeded",
            "tokenUsage": {**usage, "promptTokens": tokens, "outputTokens": 9, "totalTokens": tokens + 9},
        }
        return Change.of("StyleBoard", ns, board, {}, after, {}, now)

    start = time.time()
    metrics.record(Change.of("StyleLoRA", ns, "held", {}, queued, {"j1": pending_job}, now))
    metrics.record(captioned("first", 100))
    wait_for("the first scrape", lambda: prometheus.query(f'kleinstyle_resource_phase{{namespace="{ns}"}}'))
    metrics.record(captioned("second", 300))  # a step between two scrapes: rate() sees it
    tokens = 'sum(kleinstyle_text_tokens_total{provider="gemini", model="gemini-2.5-pro", direction="prompt"})'
    wait_for("the second board's tokens scraped", lambda: prometheus.query(f"{tokens} >= 400"), timeout=15)
    time.sleep(2 * dashboard.SCRAPE_SECONDS)
    end = time.time()
    variables = dashboard.grafana_variables(start, end, 1.0, ns)
    answers = {
        query.panel: prometheus.query_range(dashboard.fill(query.expr, variables), start, end, 1.0)
        for query in dashboard.panel_queries(json.loads(dashboard.DASHBOARD.read_text(encoding="utf-8")))
    }

    def peak(panel: str) -> float:
        values = [float(v) for s in answers[panel] for _, v in s["values"]]
        return max((v for v in values if math.isfinite(v)), default=math.nan)

    assert peak("Waiting in Kueue's queue now") == 1
    assert 5 * 60 <= peak("Longest wait in the queue") < 10 * 60
    for panel in dashboard.NOT_FED_BY_THE_EXAMPLES:  # "Text tokens"
        assert peak(panel) > 0, panel
