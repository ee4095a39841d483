"""`kleinstyle operator` logs: one line per record on stderr, JSON or text, naming the object a line is about."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import kopf
import pytest
import yaml
from kleinstyle.devcluster import DevCluster, admission
from kleinstyle.devcluster.demo import dev_config
from kleinstyle.devcluster.operator_thread import OperatorThread
from kleinstyle.operator import crdgen, logs

from tests.support.operator_args import operator_args

from .test_operator_e2e import BOARD, NS


def log_one(fmt: str, about: dict | None = None, error: Exception | None = None) -> str:
    """What one record writes: through a kopf per-object logger about `about`, with `error`'s traceback if any."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.FORMATTERS[fmt]())
    logging.getLogger().addHandler(handler)
    try:
        logger = logging.getLogger("kleinstyle.test")
        target = kopf.ObjectLogger(body=about, settings=kopf.OperatorSettings()) if about else logger
        if error is None:
            target.warning("reconcile failed: %s", "it broke")
        else:
            try:
                raise error
            except Exception:
                target.exception("reconcile failed: %s", "it broke")
    finally:
        logging.getLogger().removeHandler(handler)
    return stream.getvalue()


BODY = {"apiVersion": "kleinstyle.dev/v1alpha1", "kind": "StyleLoRA", "metadata": {"namespace": NS, "name": "x"}}


def test_json_is_one_object_per_line_naming_the_object_with_the_traceback():
    text = log_one("json", BODY, KeyError("gpu-a100"))
    assert text.count("\n") == 1  # the traceback too stays on the one line
    line = json.loads(text)
    assert line["level"] == "ERROR" and line["logger"] == "kopf.objects"  # kopf's per-object logger, not ours
    assert line["message"] == "reconcile failed: it broke"
    assert (line["namespace"], line["kind"], line["name"]) == (NS, "StyleLoRA", "x")
    assert line["time"].endswith("Z") and "KeyError: 'gpu-a100'" in line["exception"]


def test_json_without_an_object_has_no_object_fields():
    line = json.loads(log_one("json"))
    assert set(line) == {"time", "level", "logger", "message"}


def test_text_names_the_object_before_the_message():
    first, *traceback = log_one("text", BODY, KeyError("gpu-a100")).splitlines()
    assert first.endswith(f" ERROR kopf.objects [{NS}/StyleLoRA/x]: reconcile failed: it broke")
    assert traceback[0].startswith("Traceback") and traceback[-1] == "KeyError: 'gpu-a100'"


def logged(level: str, records: list[tuple[str, int, str]]) -> list[str]:
    """The messages `setup(level)` writes of `records` (logger, level, message); the root logger restored after."""
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    earlier, stream = io.StringIO(), io.StringIO()
    try:
        logs.setup("DEBUG", "text", earlier)  # replaced by the next call: nothing reaches it
        logs.setup(level, "json", stream)
        for name, at, message in records:
            logging.getLogger(name).log(at, message)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert earlier.getvalue() == ""
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def test_setup_sets_the_level_and_keeps_kopfs_routine_successes_for_debugging():
    records = [
        ("kopf.objects", logging.INFO, "Handler 'wake_jobs' succeeded."),
        ("kleinstyle.operator.handlers", logging.DEBUG, "detail"),
        ("kleinstyle.operator.handlers", logging.INFO, "created Job x"),
        ("kopf.objects", logging.ERROR, "Handler 'cleanup' failed permanently"),
    ]
    assert logged("INFO", records) == ["created Job x", "Handler 'cleanup' failed permanently"]
    assert logged("ERROR", records) == ["Handler 'cleanup' failed permanently"]
    assert logged("DEBUG", records) == [message for _, _, message in records]


def test_level_and_format_come_from_flags_else_the_environment(monkeypatch: pytest.MonkeyPatch):
    args = operator_args(["operator"], monkeypatch)
    assert (args.log_level, args.log_format) == ("INFO", "json")
    monkeypatch.setenv(logs.LEVEL_ENV, "debug")
    monkeypatch.setenv(logs.FORMAT_ENV, "TEXT")
    args = operator_args(["operator"], monkeypatch)
    assert (args.log_level, args.log_format) == ("DEBUG", "text")
    args = operator_args(["operator", "--log-level", "error", "--log-format", "json"], monkeypatch)
    assert (args.log_level, args.log_format) == ("ERROR", "json")


def test_a_bad_level_in_the_environment_is_refused_as_a_bad_flag(monkeypatch, capsys):
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")
    with pytest.raises(SystemExit) as exited:
        operator_args(["operator"], monkeypatch)
    assert exited.value.code == 2
    assert f"'loud' (or ${logs.LEVEL_ENV}) is not one of DEBUG" in capsys.readouterr().err


@pytest.mark.emulator
async def test_kleinstyle_operator_logs_json_lines_about_each_object(tmp_path: Path):
    """The real command in its own process against the embedded cluster: every stderr line is a JSON object, kopf's
    and kleinstyle's, and the child it creates is logged naming the StyleBoard."""
    config = tmp_path / "operator.yaml"
    config.write_text(yaml.safe_dump(dev_config(tmp_path).model_dump(mode="json")))
    crds = list(crdgen.build_crds().values())
    async with DevCluster(tmp_path, crds=crds, admit=admission.admit, run_jobs=False, namespace=NS) as cluster:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig_path)}
        argv = ["operator", "-n", NS, "--config", str(config), "--liveness", "", "--log-format", "json"]
        operator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kleinstyle.cli.main", *argv, env=env, stderr=subprocess.PIPE
        )
        try:
            await cluster.apply([BOARD])
            await cluster.wait_for(lambda: cluster.emulator.list("jobs", NS), timeout=60)
        finally:
            operator.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(operator.communicate(), timeout=60)
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["logger"].startswith("kopf.") for line in lines)
    assert not any(line["message"].startswith("Handler 'wake_") for line in lines)  # one per watch event: DEBUG
    created = [line for line in lines if line["message"].startswith("created Job ")]
    assert [(line["namespace"], line["kind"], line["name"]) for line in created] == [(NS, "StyleBoard", "bd9")]


async def test_a_crashed_embedded_operator_is_logged_at_once(caplog: pytest.LogCaptureFixture):
    async def crash(stop: asyncio.Event) -> None:
        raise RuntimeError("cannot start")

    thread = OperatorThread(crash)
    await asyncio.to_thread(thread.start)
    with pytest.raises(RuntimeError):
        await thread.exited()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert [str(r.exc_info[1]) for r in errors] == ["cannot start"]
