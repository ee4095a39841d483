"""Debian's Prometheus server on loopback, for tests: it scrapes what the caller names and answers PromQL through its
HTTP API, so the chart's dashboard is checked against the real query engine on what the operator really exposed.

hack/prometheus/fetch.sh unpacks `prometheus` and `promtool` into the cache beside the control plane
(docs/real-cluster.md); `find_prometheus()` is None until it has.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .controlplane import cache_dir, die_with_parent, free_port
from .lifecycle import Started, terminate

VERSION = "2.42.0+ds-5+deb12u1"  # hack/prometheus/fetch.sh's pin
STAMP = ".stamp"  # written by fetch.sh last, inside the bin folder it renames into place
LOG_TAIL_LINES = 25


def find_prometheus() -> Path | None:
    """The bin folder holding `prometheus` and `promtool`, or None where fetch.sh has not run (or skipped)."""
    bin_dir = cache_dir() / "prometheus" / VERSION / "bin"
    return bin_dir if (bin_dir / STAMP).is_file() else None


class PrometheusError(RuntimeError):
    """The server did not start, or the API refused a query (the message holds its error or its log's tail)."""


Series = dict[str, Any]  # the API's {"metric": {labels}, "value": [t, "v"]} or {"metric": ..., "values": [[t, "v"]]}


class Prometheus(Started):
    """`prometheus` scraping `targets` (host:port of /metrics endpoints) every `scrape_interval`, its TSDB in a
    temporary folder; started on enter, stopped (and the folder removed) on exit."""

    root_prefix = "kleinstyle-prometheus-"

    def __init__(
        self,
        targets: Sequence[str],
        bin_dir: Path | None = None,
        *,
        scrape_interval: str = "1s",
        startup_timeout: float = 30.0,
    ) -> None:
        found = bin_dir or find_prometheus()
        if found is None:
            raise PrometheusError("Prometheus is not fetched: run `make controlplane` (hack/prometheus/fetch.sh)")
        self.bin_dir = found
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.startup_timeout = startup_timeout
        self.root = Path()
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None
        # No proxy: urllib would send even 127.0.0.1 through HTTP_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def log(self) -> Path:
        return self.root / "prometheus.log"

    def _start(self) -> None:
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": "kleinstyle", "static_configs": [{"targets": self.targets}]}],
        }
        config_file = self.root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        address = f"127.0.0.1:{free_port()}"
        self.url = f"http://{address}"
        with self.log.open("wb") as out:
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "prometheus"),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address={address}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                preexec_fn=die_with_parent,  # a killed test run leaves no server behind
            )
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited {self._process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready after {self.startup_timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with self._opener.open(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (it closes its TSDB), SIGKILL after 10 s; then the folder goes."""
        if self._process is not None:
            terminate(self._process, 10)
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- the HTTP API

    def _get(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH and return its `data`; a refused query raises with Prometheus' own error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with self._opener.open(url, timeout=30) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:  # a refused query: its JSON names the error
            raw = error.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                raise PrometheusError(f"{path} {params}: HTTP {error.code}: {raw[:200]!r}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, time: float | None = None) -> list[Series]:
        """An instant query (at `time`, Unix seconds; now when None): the result's series (a scalar as one)."""
        data = self._get("query", query=expr, **({} if time is None else {"time": str(time)}))
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Series] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        """A range query, as a Grafana time series panel sends it: every series with its [time, value] samples."""
        data = self._get("query_range", query=expr, start=str(start), end=str(end), step=str(step))
        result: list[Series] = data["result"]
        return result

    def active_targets(self) -> list[dict[str, Any]]:
        """The scrape targets with their health ("up", "down", "unknown") and last error."""
        targets: list[dict[str, Any]] = self._get("targets", state="active")["activeTargets"]
        return targets
