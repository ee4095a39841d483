"""report_progress() against a loopback stand-in for the API server; write_termination_message()."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kleinstyle.contract.runspec import Owner
from kleinstyle.runtime.report import report_progress, write_termination_message

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi

OWNER = Owner(kind="StyleBoard", plural="styleboards", namespace="team-a", name="watercolor", uid="uid-1")
STATUS_PATH = "/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/styleboards/watercolor/status"
PROGRESS = {"step": "prepare", "state": "Running", "message": "fetching 3 images", "result": None}


def test_patches_status_progress_as_a_merge_patch(kube_api: KubeApi) -> None:
    kube_api.serve_status(STATUS_PATH)
    assert report_progress(OWNER, PROGRESS) is True
    (patch,) = kube_api.patches
    assert patch.path == STATUS_PATH
    assert patch.headers["Content-Type"] == "application/merge-patch+json"
    assert "Authorization" not in patch.headers
    assert patch.json() == {"status": {"progress": PROGRESS}}


def test_in_cluster_uses_the_service_account(in_cluster_api: KubeApi) -> None:
    in_cluster_api.serve_status(STATUS_PATH)
    assert report_progress(OWNER, PROGRESS) is True
    (patch,) = in_cluster_api.patches
    assert patch.headers["Authorization"] == "Bearer sa-token"
    assert patch.json() == {"status": {"progress": PROGRESS}}


def test_without_any_api_it_only_logs(rootfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert report_progress(OWNER, PROGRESS) is False
    assert "no Kubernetes API configured" in caplog.text


def test_retries_server_errors_then_succeeds(kube_api: KubeApi) -> None:
    kube_api.serve_status(STATUS_PATH)
    kube_api.statuses = [500, 503]
    assert report_progress(OWNER, PROGRESS, backoff_s=0.01) is True
    assert len(kube_api.patches) == 3


def test_gives_up_after_bounded_retries_without_raising(kube_api: KubeApi) -> None:
    kube_api.serve_status(STATUS_PATH)
    kube_api.statuses = [500] * 10
    assert report_progress(OWNER, PROGRESS, attempts=3, backoff_s=0.01) is False
    assert len(kube_api.patches) == 3


def test_does_not_retry_what_retrying_cannot_fix(kube_api: KubeApi) -> None:
    kube_api.serve_status(STATUS_PATH)
    kube_api.statuses = [403]
    assert report_progress(OWNER, PROGRESS, backoff_s=0.01) is False
    assert len(kube_api.patches) == 1


def test_unreachable_api_does_not_raise(rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("KLEINSTYLE_KUBE_API", f"http://127.0.0.1:{port}")
    assert report_progress(OWNER, PROGRESS, backoff_s=0.01) is False


def test_termination_message_is_written_when_the_folder_exists(rootfs: Path) -> None:
    assert write_termination_message("no folder yet") is False
    assert not (rootfs / "dev").exists()
    (rootfs / "dev").mkdir()
    assert write_termination_message("prepared 3 images") is True
    assert (rootfs / "dev/termination-log").read_text() == "prepared 3 images"


def test_termination_message_is_cut_at_4096_bytes_on_a_character_boundary(rootfs: Path) -> None:
    (rootfs / "dev").mkdir()
    write_termination_message("a" + "é" * 3000)  # 6001 bytes; a cut at 4096 would split an "é"
    written = (rootfs / "dev/termination-log").read_bytes()
    assert len(written) == 4095
    assert written.decode("utf-8") == "a" + "é" * 2047


def test_a_number_json_cannot_carry_is_reported_as_null():
    import json

    from kleinstyle.runtime.report import progress_patch

    patch = progress_patch({"progress": {"loss": float("nan"), "checkpoints": [{"score": float("inf"), "step": 2}]}})
    assert patch == {"status": {"progress": {"progress": {"loss": None, "checkpoints": [{"score": None, "step": 2}]}}}}
    json.dumps(patch, allow_nan=False)  # what httpx does with it


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386, as the API server applies a pod's report: a null removes its key; lists are replaced whole."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def test_every_report_reads_back_after_the_merge_patch_drops_its_nulls() -> None:
    """A field that may be None needs a default: the merge patch that carries a report deletes nulls."""
    from kleinstyle.contract.reports import (
        EvaluationReport,
        FuseReport,
        FuseResult,
        GenerateProgress,
        GenerateReport,
        GenerateResult,
        ImageTiming,
        PrepareReport,
        PrepareResult,
        ProbeScoresReport,
        TrainProgress,
        TrainReport,
        TrainResult,
        read_report,
    )

    scores = ProbeScoresReport(step=0, style=[0.5, None], adherence=[1.0, 1.0], leakage=[0.2, 0.2])
    evaluation = EvaluationReport(baseline=scores)
    reports = [
        PrepareReport(run_hash="r", state="Failed", result=PrepareResult(succeeded=False, message="no images")),
        TrainReport(
            run_hash="r", state="Running", progress=TrainProgress(step=1, total_steps=9, evaluation=evaluation)
        ),
        TrainReport(
            run_hash="r",
            state="Succeeded",
            progress=TrainProgress(),
            result=TrainResult(steps=9, lora_step=0, total_steps=9, best_checkpoint=0, evaluation=evaluation),
        ),
        GenerateReport(
            run_hash="r",
            state="Succeeded",
            progress=GenerateProgress(images_done=1, images_total=1),
            result=GenerateResult(images=[ImageTiming(index=1, reused=True)]),
        ),
        FuseReport(
            run_hash="r",
            state="Succeeded",
            result=FuseResult(method="svd", rank=8, energy_kept=1.0, layers=2, duration_seconds=0.1),
        ),
    ]
    for report in reports:
        sent = report.model_dump(mode="json")
        assert read_report(merge_patch({}, sent)) == report, report.step
