"""The chart's alerts through Prometheus' own rule engine: promtool (Debian's, fetched by `make controlplane`) checks
the rule groups of the rendered PrometheusRule and runs the unit tests in promtool/, which feed each alert series
that must fire it, with its labels and annotations, and series that must not (below its threshold, shorter than its
`for:`, another outcome). test_monitoring.py only parses the expressions; this evaluates them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kleinstyle.devcluster.prometheus import VERSION, find_prometheus

from .test_chart import only, render

UNIT_TESTS = sorted((Path(__file__).parent / "promtool").glob("*.yaml"))
RULES_ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}}


@pytest.fixture(scope="module")
def promtool() -> Path:
    bin_dir = find_prometheus()
    if bin_dir is None:
        pytest.skip(f"no promtool: `make controlplane` fetches Prometheus {VERSION} (hack/prometheus/fetch.sh)")
    return bin_dir / "promtool"


def unit_test_folder(chart: Any, folder: Path, values: dict[str, Any]) -> Path:
    """`folder` holding rules.yaml, the rule groups of the PrometheusRule rendered with `values` (what the Prometheus
    Operator hands Prometheus), and a copy of each unit test, which names rules.yaml."""
    rule = only(render(chart, values), "PrometheusRule")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}), encoding="utf-8")
    for test in UNIT_TESTS:
        (folder / test.name).write_text(test.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def run(promtool: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], cwd=folder, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rendered_rules(chart: Any, promtool: Path, tmp_path: Path) -> None:
    folder = unit_test_folder(chart, tmp_path, RULES_ENABLED)
    checked = run(promtool, folder, "check", "rules", "rules.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout


def test_each_alert_fires_on_what_should_fire_it_and_on_nothing_else(
    chart: Any, promtool: Path, tmp_path: Path
) -> None:
    folder = unit_test_folder(chart, tmp_path, RULES_ENABLED)
    tested = run(promtool, folder, "test", "rules", *(t.name for t in UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr

    # Every alert the chart ships has a case where it fires and one where it stays silent.
    rules = yaml.safe_load((folder / "rules.yaml").read_text(encoding="utf-8"))
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    cases = [
        case
        for test in UNIT_TESTS
        for group in yaml.safe_load(test.read_text(encoding="utf-8"))["tests"]
        for case in group["alert_rule_test"]
    ]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts


def test_a_changed_threshold_fails_the_unit_tests(chart: Any, promtool: Path, tmp_path: Path) -> None:
    """The unit tests can fail: with failedRunsPerHour 1, one Failed run no longer fires KleinstyleRunsFailing."""
    values = {"metrics": {"prometheusRule": {"enabled": True, "failedRunsPerHour": 1}}}
    folder = unit_test_folder(chart, tmp_path, values)
    tested = run(promtool, folder, "test", "rules", "runs_failing.yaml")
    assert tested.returncode != 0
    assert "alertname: KleinstyleRunsFailing, time: 1h30m" in tested.stdout + tested.stderr
