"""The operator's one request before kopf starts (is Kueue installed?) outlasts an API server that is restarting or
shedding load, as kopf's own requests do; bench/chaos.py found an operator started during an API server restart
exiting 1 on its first 500 instead, and, at the default size, on a 403 from an API server just restarted whose RBAC
authorizer had not synced (discovery is open to every authenticated client). What cannot mend by waiting (401, bad
credentials) still fails at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import urllib3
from kleinstyle.operator import kueue
from kleinstyle.operator.main import workload_version
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.unit


class FlakyKube:
    """A Kube whose first answers are `failures` (raised in turn), then discovery with Kueue's Workload API."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def request(self, method: str, path: str, body: Any = None, query: Any = None) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if path == f"/apis/{kueue.GROUP}":
            return {"versions": [{"version": kueue.VERSIONS[0]}]}
        return {"resources": [{"name": "workloads"}]}


def version(kube: FlakyKube) -> str | None:
    return asyncio.run(workload_version(kube, backoff=(0.0,) * 4))  # type: ignore[arg-type]


def test_transient_refusals_and_lost_connections_are_waited_out() -> None:
    flaky = FlakyKube(
        ApiException(status=500, reason="Internal Server Error"),
        ApiException(status=429, reason="Too Many Requests"),
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()),
        ApiException(status=403, reason="Forbidden"),
    )
    assert version(flaky) == kueue.VERSIONS[0]
    assert flaky.calls == 6  # four refused, then the group and its version


def test_a_refusal_that_waiting_cannot_mend_fails_at_once_and_so_does_one_past_the_backoff() -> None:
    unauthorized = FlakyKube(ApiException(status=401, reason="Unauthorized"))
    with pytest.raises(ApiException):
        version(unauthorized)
    assert unauthorized.calls == 1
    down = FlakyKube(*(ApiException(status=500, reason="Internal Server Error") for _ in range(5)))
    with pytest.raises(ApiException):
        version(down)
    assert down.calls == 5


def test_kueue_absent_is_no_error() -> None:
    assert version(FlakyKube(ApiException(status=404, reason="Not Found"))) is None
