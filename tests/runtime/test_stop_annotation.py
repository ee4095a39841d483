"""Stopping a run: the README's `kubectl annotate` command, read by the runtime from the owner's metadata through a
loopback API server, stops the run it names and no other; status is never read for it."""

from __future__ import annotations

import json
import re
import shlex
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kleinstyle.contract.pod import STOP_ANNOTATION, parse_stop, stop_request
from kleinstyle.contract.runspec import Owner, RunSpec
from kleinstyle.runtime.step import Reporter

from tests.support.runs import train_spec

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

README = Path(__file__).resolve().parents[2] / "README.md"
OWNER = Owner(kind="StyleLoRA", plural="styleloras", namespace="team-a", name="wc-lora", uid="uid-2")
OWNER_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/styleloras/wc-lora"
RUN_HASH = "$(kubectl get sl NAME -o jsonpath='{.status.runHash}')"


def spec(steps: int) -> RunSpec:
    return train_spec(steps, owner=OWNER)


def readme_stop_command() -> str:
    """The README's stop command, as one line."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    found = re.search(r"`(kubectl annotate sl NAME [^`]+)`", text)
    assert found, "the README shows no `kubectl annotate sl NAME ...` command"
    return found.group(1)


def annotation_set_by(command: str, run_id: str) -> tuple[str, str]:
    """(key, value) the command sets once the shell has put the run id in place of the `kubectl get` it runs."""
    assert RUN_HASH in command, "the README's command takes the run id from status.runHash"
    args = shlex.split(command.replace(RUN_HASH, run_id))
    key, _, value = next(arg for arg in args if "=" in arg).partition("=")
    return key, value


def serve_owner(kube_api: KubeApi, annotations: dict[str, str], status: dict[str, Any]) -> None:
    def handle(request: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"metadata": {"annotations": annotations}, "status": status}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    kube_api.server.routes[OWNER_PATH] = handle


def test_the_readme_command_stops_the_run_it_names_and_not_the_next(kube_api: KubeApi) -> None:
    current, next_run = spec(500), spec(600)
    assert current.run_id() != next_run.run_id()
    key, value = annotation_set_by(readme_stop_command(), current.run_id())
    assert key == STOP_ANNOTATION
    serve_owner(kube_api, {key: value}, {"runHash": current.run_id()})
    assert Reporter(current).stop_request() == "enough"
    # The spec changed: the next run's pod finds the same annotation, still naming the run before it.
    serve_owner(kube_api, {key: value}, {"runHash": next_run.run_id()})
    assert Reporter(next_run).stop_request() is None
    assert [r.method for r in kube_api.server.requests] == ["GET", "GET"]  # reads only, of the owner itself


def test_a_stop_request_in_status_is_not_one(kube_api: KubeApi) -> None:
    """Status is output: a stopRequest written there (by the run's ServiceAccount, or by a tenant holding patch on
    /status) stops nothing, even naming the current run."""
    run = spec(500)
    serve_owner(kube_api, {}, {"runHash": run.run_id(), "stopRequest": f"{run.run_id()}: enough"})
    assert Reporter(run).stop_request() is None


def test_the_api_out_of_reach_means_no_stop(rootfs: Path) -> None:
    assert Reporter(spec(500)).stop_request() is None  # no API configured: a run on one machine


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("0123456789abcdef", None),  # a longer hex string is not a run id followed by a reason
        ("0123456789", ("0123456789", "")),
        ("0123456789: enough", ("0123456789", "enough")),
        (" 0123456789 enough,\n really ", ("0123456789", "enough, really")),
        ("enough", None),
        ("0123456789x", None),
        ("", None),
    ],
)
def test_the_annotation_begins_with_the_run_id(value: str, parsed: tuple[str, str] | None) -> None:
    assert parse_stop(value) == parsed


def test_a_long_reason_is_cut() -> None:
    assert len(stop_request({STOP_ANNOTATION: "0123456789: " + "x" * 5000}, "0123456789") or "") == 200
