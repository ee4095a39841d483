"""The chart's Grafana dashboard and PrometheusRule: rendered, read back through Grafana's own dashboard models and
the PrometheusRule schema, every PromQL expression parsed with Prometheus' grammar, and every metric it names one
the operator exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

promql = pytest.importorskip("promql_parser")
grafana = pytest.importorskip("grafana_foundation_sdk.models.dashboard")

from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from kleinstyle.operator.metrics import REGISTRY  # noqa: E402

from .test_chart import CHART, helm, only, render  # noqa: E402

DASHBOARD = CHART / "files" / "grafana-dashboard.json"
RULE_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "prometheusrule.schema.json").read_text())
ENABLED = {"metrics": {"dashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}}
# Grafana's template variables, as Grafana substitutes them before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$namespace": ".*", "$__rate_interval": "5m", "$__range": "7d", "$__interval": "1m"}


def exposed_series() -> set[str]:
    """Every series name the operator's registry can expose (a counter's _total, a histogram's _bucket, ...)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {f"{m.name}{s}" for m in REGISTRY.collect() for s in suffixes.get(m.type, ("",))}


def selectors(node: Any) -> set[str]:
    """The metric names a parsed PromQL expression selects."""
    names = {node.name} if type(node).__name__ == "VectorSelector" and node.name else set()
    for attribute in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, str | int | float):
            names |= selectors(child)
    for child in getattr(node, "args", None) or []:
        names |= selectors(child)
    return names


def parse(expr: str) -> set[str]:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return selectors(promql.parse(expr))


def kept(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Paths of what we wrote that did not survive the round trip through Grafana's models."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path]
        return [p for key, value in ours.items() for p in kept(value, theirs.get(key), f"{path}.{key}")]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [path]
        return [p for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for p in kept(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [path]


def test_the_dashboard_reads_back_through_grafanas_models_unchanged():
    data = json.loads(DASHBOARD.read_text())
    model = grafana.Dashboard.from_json(data)
    assert kept(data, json.loads(json.dumps(model, cls=JSONEncoder))) == []
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in data["panels"]}) == len(data["panels"])
    assert all(p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])


def test_every_dashboard_query_parses_and_names_exposed_metrics():
    data = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in data["templating"]["list"] if v["type"] == "query"]
    exposed, used = exposed_series(), set()
    for query in queries:
        names = parse(re.sub(r"^label_values\((\w+), \w+\)$", r"\1", query))
        assert names, query
        assert names <= exposed, f"{query}: {names - exposed} is not a metric the operator exposes"
        used |= names
    # The dashboard answers the platform team's questions: GPU-hours per namespace, queue waits, runs, training.
    assert {"kleinstyle_gpu_seconds_total", "kleinstyle_queue_wait_seconds_bucket", "kleinstyle_runs_total"} <= used
    assert {"kleinstyle_training_loss", "kleinstyle_early_stops_total", "kleinstyle_fusion_seconds_bucket"} <= used


def test_the_dashboard_renders_as_a_configmap_for_grafanas_sidecar(chart):
    docs = render(chart, ENABLED)
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kleinstyle.json"]) == json.loads(DASHBOARD.read_text())
    assert not [d for d in render(chart) if d["metadata"]["name"].endswith("-dashboard")]  # off by default


def test_the_alerts_are_a_valid_prometheus_rule_on_exposed_metrics(chart):
    values = {
        "metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "queueStuckSeconds": 7200}}
    }
    rule = only(render(chart, values), "PrometheusRule")
    jsonschema.validate(rule, RULE_SCHEMA)
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {"KleinstyleRunsFailing", "KleinstyleQueueStuck", "KleinstyleReconcileErrors"}
    for alert in alerts.values():
        assert parse(alert["expr"]) <= exposed_series(), alert["expr"]
        assert "{{ $labels." in alert["annotations"]["summary"]  # Helm left Prometheus' templates alone
    assert alerts["KleinstyleQueueStuck"]["expr"].endswith("> 7200")
    with pytest.raises(helm.HelmError, match="metricsPort"):
        render(chart, {"config": {"metricsPort": 0}, **ENABLED})


def test_a_broken_expression_or_unknown_metric_would_be_caught():
    with pytest.raises(ValueError):
        parse("sum(rate(kleinstyle_runs_total[5m])")
    assert not parse("rate(kleinstyle_gpu_second_total[5m])") <= exposed_series()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "metadata": {"name": "x", "namespace": "y"},
                "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up", "for": "ten minutes"}]}]},
            },
            RULE_SCHEMA,
        )
