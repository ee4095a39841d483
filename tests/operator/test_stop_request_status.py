"""The stop a user asks by annotation, as a StyleLoRA's status shows it: output only, for the current run only, and a
warning for an annotation that names no run (it would stop nothing)."""

from __future__ import annotations

from typing import Any

from kleinstyle.contract.pod import STOP_ANNOTATION
from kleinstyle.operator.kinds.stylelora import StyleLoRARuns
from kleinstyle.operator.reconcile import serialised

from tests.support.runs import train_run


def body(annotation: str | None, status: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "l", "namespace": "team-a", "uid": "uid-1"}
    if annotation is not None:
        meta["annotations"] = {STOP_ANNOTATION: annotation, "other": "x"}
    return {"metadata": meta, "status": status or {}}


def test_a_stop_naming_the_current_run_is_shown() -> None:
    current = train_run()
    fields, warnings = StyleLoRARuns().requested(body(f"{current.runspec.run_id()}: enough"), current)
    assert (serialised(fields), warnings) == ({"stopRequest": "enough"}, [])
    fields, _ = StyleLoRARuns().requested(body(current.runspec.run_id()), current)
    assert serialised(fields) == {"stopRequest": "stop requested"}


def test_a_stop_naming_an_earlier_run_is_not_this_runs() -> None:
    earlier, current = train_run(500), train_run(600)
    fields, warnings = StyleLoRARuns().requested(body(f"{earlier.runspec.run_id()}: enough"), current)
    assert (serialised(fields), warnings) == ({}, [])


def test_a_stop_naming_no_run_warns_that_it_stops_nothing() -> None:
    current = train_run()
    fields, warnings = StyleLoRARuns().requested(body("enough"), current)
    assert serialised(fields) == {}
    assert warnings == [
        f"metadata.annotations[{STOP_ANNOTATION}] stops nothing: its value must begin with the id of the run to stop "
        f'(status.runHash), e.g. {STOP_ANNOTATION}="{current.runspec.run_id()}: enough"'
    ]


def test_status_is_never_read_for_it() -> None:
    current = train_run()
    forged = {"runHash": current.runspec.run_id(), "stopRequest": "enough"}
    fields, warnings = StyleLoRARuns().requested(body(None, forged), current)
    assert (serialised(fields), warnings) == ({}, [])
    assert (
        serialised(StyleLoRARuns().cleared())["stopRequest"] is None
    )  # every reconcile rewrites what a pod or tenant left
