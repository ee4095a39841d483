"""A run's pod as both sides read it (kleinstyle.contract.pod): what its exit codes mean and which stop annotation
asks a stop of which run. The Job's podFailurePolicy built from the codes is tested in
tests/operator/test_job_failure_policy.py; reading the annotation through the API in
tests/runtime/test_stop_annotation.py."""

from __future__ import annotations

import pytest
from kleinstyle.contract.pod import (
    EXIT_BAD_SPEC,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_VOLUME_FULL,
    FAILURE_REASONS,
    NEVER_RETRIED,
    STOP_ANNOTATION,
    STOP_REASON_LIMIT,
    command,
    failure_reason,
    parse_stop,
    stop_request,
)

RUN = "0123456789"
FULL_HASH = RUN + "abcdef" * 9


def test_exactly_the_codes_never_retried_have_a_status_reason() -> None:
    """A code the Job fails at once on must say why in status; one it retries must not read as final."""
    assert set(FAILURE_REASONS) == set(NEVER_RETRIED) == {EXIT_BAD_SPEC, EXIT_VOLUME_FULL}
    assert len(set(FAILURE_REASONS.values())) == len(FAILURE_REASONS)
    assert all(failure_reason(code) is None for code in (EXIT_OK, EXIT_FAILED, 137, 143, -9))


@pytest.mark.parametrize("step", ["prepare", "train", "generate", "fuse"])
def test_every_step_reads_its_runspec_from_the_mounted_file(step: str) -> None:
    assert command(step) == ["kleinstyle", step, "--spec", "/etc/kleinstyle/runspec.json"]


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        (None, None),
        ({}, None),
        ({"kleinstyle.dev/other": f"{RUN}: enough"}, None),
        ({STOP_ANNOTATION: f"{RUN}: enough"}, "enough"),
        ({STOP_ANNOTATION: RUN}, ""),  # a stop without a reason is still a stop
        ({STOP_ANNOTATION: f"{RUN}   it\tlooks\n done "}, "it looks done"),
        ({STOP_ANNOTATION: "9876543210: enough"}, None),  # another run's
        ({STOP_ANNOTATION: f"{RUN.upper()}A: enough"}, None),
        ({STOP_ANNOTATION: "enough"}, None),
    ],
)
def test_stop_request_answers_only_for_the_run_it_names(annotations: dict[str, str] | None, reason: str | None) -> None:
    assert stop_request(annotations, RUN) == reason


def test_a_run_known_by_its_full_hash_is_stopped_by_its_run_id() -> None:
    assert stop_request({STOP_ANNOTATION: f"{RUN}: enough"}, FULL_HASH) == "enough"


def test_a_value_that_is_not_text_asks_nothing() -> None:
    assert stop_request({STOP_ANNOTATION: 123}, RUN) is None  # type: ignore[dict-item]


def test_parse_stop_keeps_the_reason_to_its_limit_after_collapsing_space() -> None:
    parsed = parse_stop(f"{RUN}: " + "ab  " * STOP_REASON_LIMIT)
    assert parsed is not None
    run, reason = parsed
    assert run == RUN
    assert len(reason) == STOP_REASON_LIMIT
    assert "  " not in reason
