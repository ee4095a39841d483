"""The RunSpec's hash names a run (its Job, ConfigMap, artifact folder and reports): it covers what the run computes
and nothing else, and it is the same for the same spec however it travels; what a run reads (`input_uris`) and where
it may read it from (`check_inputs`), rule by rule. The operator-made specs' recorded hashes are in
tests/operator/test_runspec_hash.py and the refusals a pod makes in tests/runtime/test_input_scope.py."""

from __future__ import annotations

import json
import re

import pytest
from kleinstyle.contract.layout import RUN_ID_LENGTH
from kleinstyle.contract.runspec import FuseSpec, GenerateSpec, LoraInput, Owner, RunSpec

from tests.support.runs import train_spec

OWNER = Owner(kind="LoRAFusion", plural="lorafusions", namespace="team-a", name="mix", uid="uid-9")
OUTPUT = "/artifacts/team-a/lorafusion/mix/uid-9/0123456789"
INK = "/artifacts/team-a/stylelora/ink/uid-1/aaaaaaaaaa/lora.safetensors"
BD9 = "/artifacts/team-a/stylelora/bd9/uid-2/bbbbbbbbbb/lora.safetensors"


def fusion(**work: object) -> RunSpec:
    fields = {"sources": (LoraInput(uri=INK, weight=0.7), LoraInput(uri=BD9, weight=0.3)), "method": "svd", "rank": 16}
    return RunSpec(
        owner=OWNER, output_uri=OUTPUT, output_display_uri="pvc://artifacts/x", work=FuseSpec(**{**fields, **work})
    )


def generation(*loras: str, root: str = "/artifacts") -> RunSpec:
    owner = Owner(kind="GenerationJob", plural="generationjobs", namespace="team-a", name="g", uid="uid-3")
    work = GenerateSpec(model_path="/models/klein", loras=tuple(LoraInput(uri=u) for u in loras), prompts=("a fox",))
    return RunSpec(owner=owner, output_uri=f"{root}/team-a/generationjob/g/uid-3/0123456789", output_display_uri="x",
                   work=work)  # fmt: skip


# ---- the hash -------------------------------------------------------------------------------------------------------


def test_a_hand_written_spec_hashes_as_it_always_did() -> None:
    """A new hash re-runs every resource once: a change here must be deliberate and said in the README."""
    assert fusion().content_hash() == "924c9e995b6ab0f80229ac583c888d70a3ee437b49fee7ccb7ebc81a61033d65"


def test_the_owner_and_where_the_run_writes_are_not_hashed() -> None:
    spec = fusion()
    moved = spec.model_copy(
        update={
            "owner": OWNER.model_copy(update={"uid": "uid-other", "name": "other"}),
            "output_uri": "s3://bucket/elsewhere",
            "output_display_uri": "s3://bucket/elsewhere",
        }
    )
    assert moved.content_hash() == spec.content_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"rank": 32},
        {"method": "concat"},
        {"energy": 0.9},
        {"selection": "soft"},
        {"sources": (LoraInput(uri=INK, weight=0.7), LoraInput(uri=BD9, weight=0.4))},
        {"sources": (LoraInput(uri=BD9, weight=0.3), LoraInput(uri=INK, weight=0.7))},  # order is part of the work
        {"trigger_words": ("ink",)},
    ],
)
def test_any_change_to_the_work_is_a_new_run(change: dict[str, object]) -> None:
    assert fusion(**change).content_hash() != fusion().content_hash()


def test_the_hash_survives_the_configmap_round_trip() -> None:
    """The operator hashes the spec it writes; the pod hashes the one it reads back (reports carry it as runHash)."""
    for spec in (fusion(), train_spec(), generation(INK)):
        read_back = RunSpec.from_json(spec.to_json())
        assert read_back == spec
        assert read_back.content_hash() == spec.content_hash()
        reordered = RunSpec.model_validate(dict(reversed(json.loads(spec.to_json()).items())))
        assert reordered.content_hash() == spec.content_hash()


def test_the_run_id_is_the_hash_prefix() -> None:
    spec = fusion()
    assert re.fullmatch(r"[0-9a-f]{64}", spec.content_hash())
    assert spec.run_id() == spec.content_hash()[:RUN_ID_LENGTH]
    assert len(spec.run_id()) == RUN_ID_LENGTH == 10


# ---- the inputs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "inputs"),
    [
        (train_spec(), [("dataset_uri", "/artifacts/team-a/styleboard/b/uid-2/0123456789/dataset")]),
        (generation(INK, BD9), [("loras[0].uri", INK), ("loras[1].uri", BD9)]),
        (generation(), []),
        (fusion(), [("sources[0].uri", INK), ("sources[1].uri", BD9)]),
    ],
    ids=["train", "generate", "generate-without-loras", "fuse"],
)
def test_input_uris_name_each_field_a_run_reads(spec: RunSpec, inputs: list[tuple[str, str]]) -> None:
    assert spec.input_uris() == inputs


NS_VOLUME = "/artifacts/team-a"


@pytest.mark.parametrize(
    ("root", "uri", "refusal"),
    [
        # inside the namespace folder of the output's store: any kind, any owner of the namespace
        ("/artifacts", f"{NS_VOLUME}/lorafusion/m/uid-5/cccccccccc/lora.safetensors", None),
        ("memory://store", "memory://store/team-a/stylelora/a/uid-1/aaaaaaaaaa/lora.safetensors", None),
        ("gs://bucket/p", "gs://bucket/p/team-a/stylelora/a/uid-1/aaaaaaaaaa/lora.safetensors", None),
        # not a plain path
        ("/artifacts", f"{NS_VOLUME}/stylelora\\..\\..\\team-b/lora.safetensors", "is not a plain path"),
        ("/artifacts", f"{NS_VOLUME}/x::team-b/lora.safetensors", "is not a plain path"),
        ("s3://bucket", "s3://bucket/team-a/../team-b/stylelora/lora.safetensors", "is not a plain path"),
        ("s3://bucket", "s3://bucket/team-a/./stylelora/lora.safetensors", "is not a plain path"),
        # another scheme than the object stores
        ("s3://bucket", "hdfs://bucket/team-a/stylelora/lora.safetensors", "uses hdfs://"),
        ("s3://bucket", "S3://bucket/team-a/stylelora/lora.safetensors", "uses S3://"),
        # the same namespace folder of another store
        (
            "gs://bucket/p",
            "s3://bucket/p/team-a/stylelora/lora.safetensors",
            "outside this namespace's artifact folder",
        ),
        ("memory://store", "/store/team-a/stylelora/lora.safetensors", "outside this namespace's artifact folder"),
        # the namespace folder itself is no input
        ("/artifacts", NS_VOLUME, "outside this namespace's artifact folder"),
    ],
)
def test_check_inputs_rules(root: str, uri: str, refusal: str | None) -> None:
    spec = generation(uri, root=root)
    if refusal is None:
        spec.check_inputs()
    else:
        with pytest.raises(ValueError, match=r"^loras\[0\]\.uri ") as refused:
            spec.check_inputs()
        assert refusal in str(refused.value)


@pytest.mark.parametrize(
    "output",
    [
        "/artifacts/team-b/generationjob/g/uid-3/0123456789",  # another namespace's folder
        "/artifacts/team-a/generationjob/g/uid-other/0123456789",  # another owner's
        "/team-a/generationjob/g/uid-3/0123456789",  # no store root above the namespace
        "0123456789",
    ],
)
def test_an_output_off_its_owners_layout_places_no_input(output: str) -> None:
    spec = generation(INK).model_copy(update={"output_uri": output})
    with pytest.raises(ValueError, match=r"^output_uri .* does not follow the artifact layout"):
        spec.check_inputs()
