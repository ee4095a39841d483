"""A run's pod as both sides read it (kleinstyle.contract.pod): what its exit codes mean, which stop annotation
asks a stop of which run, and where a pod path is on this machine. The Job's podFailurePolicy built from the codes
is tested in tests/operator/test_job_failure_policy.py; reading the annotation through the API in
tests/runtime/test_stop_annotation.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from kleinstyle.contract.pod import (
    EXIT_BAD_SPEC,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_VOLUME_FULL,
    FAILURE_REASONS,
    NEVER_RETRIED,
    ROOTFS_ENV,
    SERVICE_ACCOUNT_CA,
    SERVICE_ACCOUNT_TOKEN,
    STOP_ANNOTATION,
    STOP_REASON_LIMIT,
    command,
    failure_reason,
    local_path,
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


# --- pod paths on this machine ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {ROOTFS_ENV: ""}], ids=["unset", "empty"])
def test_a_pod_path_is_itself_in_a_real_container(env: dict[str, str]) -> None:
    assert local_path("/etc/kleinstyle/operator.yaml", env) == Path("/etc/kleinstyle/operator.yaml")
    assert local_path(SERVICE_ACCOUNT_TOKEN, env) == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def test_a_pod_path_lies_under_the_rootfs_of_a_pod_run_as_a_process(tmp_path: Path) -> None:
    env = {ROOTFS_ENV: str(tmp_path)}
    assert local_path("/etc/kleinstyle/operator.yaml", env) == tmp_path / "etc/kleinstyle/operator.yaml"
    assert local_path(SERVICE_ACCOUNT_CA, env) == tmp_path / "var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert local_path(Path("/artifacts/run"), env) == tmp_path / "artifacts/run"


def test_a_relative_path_is_left_as_it_is(tmp_path: Path) -> None:
    """Relative to the process's working directory, which the kubelet puts in the pod already."""
    assert local_path("dataset/001.png", {ROOTFS_ENV: str(tmp_path)}) == Path("dataset/001.png")


def test_the_process_environment_is_read_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROOTFS_ENV, str(tmp_path))
    assert local_path("/models") == tmp_path / "models"
    monkeypatch.delenv(ROOTFS_ENV)
    assert local_path("/models") == Path("/models")


def test_the_runtime_opens_pod_paths_through_the_contracts_mapping() -> None:
    """One mapping for both sides: the runtime's `local_path` is the contract's, not a copy."""
    from kleinstyle.runtime import paths

    assert paths.local_path is local_path
