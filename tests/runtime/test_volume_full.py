"""A full volume is told apart from other failures: ENOSPC and EDQUOT however deep in an exception's chain, and
torch's writer, whose error carries no errno. /dev/full answers every write with ENOSPC, as a full volume does."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from kleinstyle.contract.pod import EXIT_FAILED, EXIT_VOLUME_FULL
from kleinstyle.contract.runspec import Owner, PrepareSpec, RunSpec
from kleinstyle.runtime.errors import volume_full
from kleinstyle.runtime.step import Outcome, Reporter, run_work

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(not FULL.is_char_device(), reason="/dev/full (Linux) answers writes with ENOSPC")


def write_to_full_device() -> None:
    with FULL.open("wb", buffering=0) as handle:
        handle.write(b"x" * 4096)


def test_a_write_to_a_full_device_is_a_full_volume_naming_the_file() -> None:
    with pytest.raises(OSError) as raised, FULL.open("wb", buffering=0) as handle:
        try:
            handle.write(b"x")
        except OSError as exc:
            exc.filename = "/artifacts/team-a/x/lora.safetensors"  # what open() records when it fails itself
            raise
    assert volume_full(raised.value) == (
        "the artifacts volume is full (No space left on device) while writing /artifacts/team-a/x/lora.safetensors: "
        "free space or grow the claim; checkpoints already saved are kept and the next run resumes from them"
    )


def test_a_full_volume_deep_in_the_chain_is_found() -> None:
    try:
        try:
            write_to_full_device()
        except OSError as exc:
            raise RuntimeError("saving the checkpoint failed") from exc
    except RuntimeError as wrapped:
        assert (volume_full(wrapped) or "").startswith("the artifacts volume is full (No space left on device)")
    try:
        try:
            write_to_full_device()
        except OSError:
            raise ValueError("cleaning up after the failed write failed too")  # noqa: B904  (a context, no cause)
    except ValueError as handled:
        assert (volume_full(handled) or "").startswith("the artifacts volume is full (No space left on device)")


def test_a_quota_is_a_full_volume_too() -> None:
    assert "(Disk quota exceeded)" in (volume_full(OSError(errno.EDQUOT, "Disk quota exceeded")) or "")


def test_torchs_failed_write_is_a_full_volume() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError) as raised:
        torch.save({"w": torch.zeros(1000)}, str(FULL))  # torch's own writer, straight to the device
    message = volume_full(raised.value)
    assert message is not None and message.startswith("the artifacts volume is full (No space left on device")


@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EIO, "Input/output error"), RuntimeError("CUDA out of memory"), ValueError("bad"), MemoryError()],
)
def test_other_failures_are_not(exc: BaseException) -> None:
    assert volume_full(exc) is None


def spec() -> RunSpec:
    owner = Owner(kind="StyleBoard", plural="styleboards", namespace="team-a", name="b", uid="u")
    return RunSpec(owner=owner, output_uri="/o", output_display_uri="/o", work=PrepareSpec(trigger_word="t", images=()))


def test_the_harness_exits_3_on_a_full_volume_and_1_on_anything_else() -> None:
    def full(spec: RunSpec, reporter: Reporter) -> Outcome:
        write_to_full_device()
        raise AssertionError("unreachable")

    def crash(spec: RunSpec, reporter: Reporter) -> Outcome:
        raise OSError(errno.EIO, "Input/output error")

    outcome = run_work(spec(), full, Reporter(spec()))
    assert outcome.code == EXIT_VOLUME_FULL and "free space or grow the claim" in outcome.message
    assert run_work(spec(), crash, Reporter(spec())).code == EXIT_FAILED
