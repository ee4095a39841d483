"""An API server that does not answer (its connection lost mid-request: a restart, a load balancer's timeout) is
what it is, not "an operator bug": the chaos run (bench/chaos.py) found users' status saying so, with a traceback at
ERROR in the log for each, and a reconcile whose failure report itself lost its connection ending the resource's
daemon (kopf started it again after a back-off)."""

from __future__ import annotations

import asyncio
import http.client
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kleinstyle.devcluster.demo import cluster_for
from kleinstyle.operator.daemon import report_failure
from kleinstyle.operator.kinds import KIND_RUNS
from kleinstyle.operator.wakers import Wakers

from .test_operator_e2e import BOARD, NS


def lost() -> urllib3.exceptions.ProtocolError:
    """What the kubernetes client raises when the server closes the connection before its answer."""
    return urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("Remote end closed connection without response")
    )


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")


@pytest.mark.emulator
async def test_a_lost_connection_reads_as_the_api_unreachable_not_as_an_operator_bug(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise lost()

    monkeypatch.setattr(KIND_RUNS["StyleBoard"], "build", unreachable)
    async with cluster_for(root, NS) as cluster:
        await cluster.apply([BOARD])
        board = await cluster.wait_for(
            lambda: (b := cluster.emulator.get("styleboards", NS, "bd9")).get("status") and b, timeout=60
        )
    error = next(c for c in board["status"]["conditions"] if c["type"] == "ReconcileError")
    assert error["reason"] == "ApiUnreachable", error
    assert "could not reach the Kubernetes API" in error["message"] and "operator bug" not in error["message"]
    assert ready(board)["reason"] == "ApiUnreachable"


@pytest.mark.unit
def test_a_failure_report_that_loses_its_connection_too_does_not_end_the_daemon() -> None:
    class Gone:
        async def patch_status(self, *args: object) -> Any:
            raise lost()

        async def request(self, *args: object, **kwargs: object) -> Any:
            raise lost()

    body = {"kind": "StyleBoard", "metadata": {"name": "bd9", "namespace": NS, "uid": "u1", "generation": 1}}
    delay = asyncio.run(report_failure(Gone(), body, Wakers(), "ApiUnreachable", "the API is away"))  # type: ignore[arg-type]
    assert delay > 0
