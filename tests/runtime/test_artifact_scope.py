"""Object-store artifacts per tenant: a run touches only the prefix its namespace's Secret is scoped to, and that
prefix must lie in the run's own namespace folder; a refusal is exit 2 naming the Secret and the prefix, before any
request reaches the store (an in-memory fsspec store that records every call stands in for S3)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from kleinstyle.contract.pod import EXIT_BAD_SPEC
from kleinstyle.contract.runspec import GenerateSpec, LoraInput, Owner, RunSpec
from kleinstyle.runtime.artifact_scope import OutOfScope, check_runspec, check_uri
from kleinstyle.runtime.checkpoint_mirror import CheckpointMirror
from kleinstyle.runtime.step import Outcome, run_work

FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry
STORE = "s3://bucket/kleinstyle"
SECRET = "kleinstyle-artifacts-credentials"
OWNER = Owner(kind="GenerationJob", plural="generationjobs", namespace="team-a", name="samples", uid="uid-1")


class RecordingS3(MemoryFileSystem):
    """s3:// in memory; every call that would reach the store is recorded."""

    protocol = ("s3",)
    store: dict = {}  # type: ignore[type-arg]
    pseudo_dirs = [""]
    calls: list[str] = []

    def __getattribute__(self, name: str):
        if name in ("ls", "info", "exists", "cat_file", "pipe_file", "open", "_open", "put_file", "get_file", "rm"):
            RecordingS3.calls.append(name)
        return super().__getattribute__(name)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> type[RecordingS3]:
    monkeypatch.setitem(FSSPEC_REGISTRY, "s3", RecordingS3)
    monkeypatch.setattr(RecordingS3, "store", {})
    monkeypatch.setattr(RecordingS3, "calls", [])
    return RecordingS3


def scoped(prefix: str | None) -> dict[str, str]:
    env = {"KLEINSTYLE_ARTIFACT_SECRET": SECRET}
    if prefix is not None:
        env["KLEINSTYLE_ARTIFACT_PREFIX"] = prefix
    return env


def generation(lora_uri: str) -> RunSpec:
    work = GenerateSpec(model_path="/models/klein", loras=(LoraInput(uri=lora_uri),), prompts=("a fox",))
    provisional = RunSpec(owner=OWNER, output_uri="", output_display_uri="", work=work)
    output = f"{STORE}/team-a/generationjob/samples/uid-1/{provisional.run_id()}"
    return provisional.model_copy(update={"output_uri": output, "output_display_uri": output})


OWN_LORA = f"{STORE}/team-a/stylelora/bd9/uid-2/0123456789/lora.safetensors"


def test_a_run_inside_its_prefix_goes_on() -> None:
    assert check_runspec(generation(OWN_LORA), scoped(f"{STORE}/team-a/")) is not None
    assert check_runspec(generation(OWN_LORA), scoped(f"{STORE}/team-a")) is not None  # the slash is implied
    assert check_runspec(generation(OWN_LORA), {}) is None  # no Secret configured: nothing to check


@pytest.mark.parametrize(
    ("lora", "prefix", "expected"),
    [
        (  # another namespace's LoRA, with a prefix that is right
            f"{STORE}/team-b/stylelora/x/uid-9/0123456789/lora.safetensors",
            f"{STORE}/team-a/",
            f"s3://bucket/kleinstyle/team-b/stylelora/x/uid-9/0123456789/lora.safetensors is outside "
            f"s3://bucket/kleinstyle/team-a/, the prefix the artifact store's Secret {SECRET} is scoped to",
        ),
        (  # a way out of the prefix through '..'
            f"{STORE}/team-a/../team-b/stylelora/x/uid-9/0123456789/lora.safetensors",
            f"{STORE}/team-a/",
            "is outside s3://bucket/kleinstyle/team-a/",
        ),
        (  # a Secret scoped to another namespace (or the whole bucket): the operator cannot read Secrets, so here
            OWN_LORA,
            f"{STORE}/",
            f"the artifact store's Secret {SECRET} is scoped to s3://bucket/kleinstyle/, which is not inside "
            "s3://bucket/kleinstyle/team-a/, this namespace's folder of the store",
        ),
        (OWN_LORA, f"{STORE}/team-b/", "which is not inside s3://bucket/kleinstyle/team-a/"),
        (OWN_LORA, f"{STORE}/team-ab/", "which is not inside s3://bucket/kleinstyle/team-a/"),
        (  # a Secret without its prefix
            OWN_LORA,
            None,
            f"the artifact store's Secret {SECRET} in this namespace needs the key 'prefix'",
        ),
    ],
)
def test_a_run_outside_its_prefix_is_refused_naming_the_secret_and_the_prefix(
    lora: str, prefix: str | None, expected: str
) -> None:
    with pytest.raises(OutOfScope, match=expected.replace(".", r"\.")):
        check_runspec(generation(lora), scoped(prefix))


def test_the_refusal_is_exit_2_and_reaches_no_store(s3: type[RecordingS3], monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the step harness: the work opens the LoRA only after the check, which refuses first."""
    for key, value in scoped(f"{STORE}/team-a/").items():
        monkeypatch.setenv(key, value)
    spec = generation(f"{STORE}/team-b/stylelora/x/uid-9/0123456789/lora.safetensors")

    def work(spec: RunSpec, reporter: object) -> Outcome:
        check_runspec(spec)
        lora = spec.work.loras[0].uri  # type: ignore[union-attr]
        return Outcome(0, str(RecordingS3().cat_file(lora)))

    outcome = run_work(spec, work, reporter=None)  # type: ignore[arg-type]
    assert outcome.code == EXIT_BAD_SPEC
    assert f"{SECRET} is scoped to" in outcome.message
    assert s3.calls == []


def test_a_checkpoint_mirror_outside_the_prefix_opens_nothing(
    s3: type[RecordingS3], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in scoped(f"{STORE}/team-a/").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(OutOfScope, match=r"s3://bucket/kleinstyle/team-b/.* is outside s3://bucket/kleinstyle/team-a/"):
        CheckpointMirror(f"{STORE}/team-b/stylelora/x/uid-9/0123456789/work", tmp_path).restore()
    assert s3.calls == []
    mirror = CheckpointMirror(f"{STORE}/team-a/stylelora/x/uid-2/0123456789/work", tmp_path)
    assert mirror.restore() is None  # inside: it asks the store, which has nothing yet
    assert s3.calls


def test_without_a_secret_nothing_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLEINSTYLE_ARTIFACT_SECRET", raising=False)
    check_uri("s3://anywhere/at/all")
