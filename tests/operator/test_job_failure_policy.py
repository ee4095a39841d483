"""Which pod failures the Job retries: a full artifacts volume, like bad input, fails the Job at once (a retry would
redo the work up to the same full volume), and its exit code reads as a status reason."""

from __future__ import annotations

import pytest
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, EXIT_VOLUME_FULL, failure_reason
from kleinstyle.operator.children import build_job
from kleinstyle.operator.config import OperatorConfig

from tests.support.runs import train_run


def fails_job_at_once(exit_code: int) -> bool:
    """Whether the Job's podFailurePolicy fails the whole Job when the container exits with `exit_code`."""
    run = train_run()
    rules = build_job(run, OperatorConfig())["spec"]["podFailurePolicy"]["rules"]
    for rule in rules:
        codes = rule.get("onExitCodes")
        if codes and codes["containerName"] == run.step and codes["operator"] == "In" and exit_code in codes["values"]:
            return rule["action"] == "FailJob"
    return False


@pytest.mark.parametrize(
    ("code", "at_once"), [(EXIT_BAD_SPEC, True), (EXIT_VOLUME_FULL, True), (EXIT_FAILED, False), (137, False)]
)
def test_bad_input_and_a_full_volume_fail_the_job_at_once_anything_else_retries(code: int, at_once: bool) -> None:
    assert fails_job_at_once(code) is at_once


@pytest.mark.parametrize(
    ("code", "reason"),
    [(EXIT_VOLUME_FULL, "VolumeFull"), (EXIT_BAD_SPEC, "BadInput"), (EXIT_FAILED, None), (EXIT_OK, None), (None, None)],
)
def test_exit_codes_read_as_status_reasons(code: int | None, reason: str | None) -> None:
    assert failure_reason(code) == reason
