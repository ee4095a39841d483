"""A pod opens only inputs in its own namespace's folder of the artifact store: a URI planted in a dependency's
status (an http:// URL on the node's loopback, another tenant's file) is refused, naming the field, before any
request is sent or any byte read; the pure rule (`RunSpec.check_inputs`) for volumes and object stores alike."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kleinstyle.contract.pod import EXIT_BAD_SPEC
from kleinstyle.contract.runspec import FuseSpec, GenerateSpec, LoraInput, Owner, PrepareSpec, RunSpec
from kleinstyle.runtime import fuse, generate, train

from tests.support.runs import train_work

if TYPE_CHECKING:
    from tests.runtime.conftest import KubeApi, LoopbackServer

SPEC_PATH = "/etc/kleinstyle/runspec.json"
SECRET = b"TOP-SECRET-BYTES of team-b"


def owner(kind: str) -> Owner:
    return Owner(kind=kind, plural=f"{kind.lower()}s", namespace="team-a", name="x", uid="uid-1")


def output(kind: str, root: str = "/artifacts") -> str:
    return f"{root}/team-a/{kind.lower()}/x/uid-1/0123456789"


def train_spec(dataset: str, root: str = "/artifacts") -> RunSpec:
    work = train_work(dataset)
    return RunSpec(owner=owner("StyleLoRA"), output_uri=output("StyleLoRA", root), output_display_uri="x", work=work)


def generate_spec(*uris: str, root: str = "/artifacts") -> RunSpec:
    work = GenerateSpec(model_path="/models/tiny", loras=tuple(LoraInput(uri=u) for u in uris), prompts=("a fox",))
    kind = "GenerationJob"
    return RunSpec(owner=owner(kind), output_uri=output(kind, root), output_display_uri="x", work=work)


def fuse_spec(*uris: str, root: str = "/artifacts") -> RunSpec:
    work = FuseSpec(sources=tuple(LoraInput(uri=u) for u in uris), method="svd", rank=4)
    kind = "LoRAFusion"
    return RunSpec(owner=owner(kind), output_uri=output(kind, root), output_display_uri="x", work=work)


# ---- the rule -----------------------------------------------------------------------------------------------------

MINE = "/artifacts/team-a/stylelora/a/uid-7/0123456789/lora.safetensors"


@pytest.mark.parametrize(
    "uri",
    [
        MINE,
        "/artifacts/team-a/lorafusion/mix/uid-8/0123456789/lora.safetensors",
    ],
)
def test_inputs_in_the_namespace_folder_of_the_volume_pass(uri: str) -> None:
    generate_spec(MINE, uri).check_inputs()
    fuse_spec(MINE, uri).check_inputs()


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://127.0.0.1:8444/secret", "uses http://"),
        ("https://example.com/lora.safetensors", "uses https://"),
        ("file:///artifacts/team-a/stylelora/a/lora.safetensors", "uses file://"),
        ("/artifacts/team-b/stylelora/a/uid-7/0123456789/lora.safetensors", "outside this namespace's artifact folder"),
        ("/artifacts/team-a/../team-b/stylelora/a/lora.safetensors", "not a plain path"),
        ("/artifacts/team-a/./x/lora.safetensors", "not a plain path"),
        ("/artifacts/team-ab/stylelora/a/lora.safetensors", "outside this namespace's artifact folder"),
        ("/models/flux1.safetensors", "outside this namespace's artifact folder"),
        ("/etc/kleinstyle/runspec.json", "outside this namespace's artifact folder"),
        ("team-a/stylelora/a/lora.safetensors", "outside this namespace's artifact folder"),
        ("s3://bucket/team-a/lora.safetensors", "outside this namespace's artifact folder"),
    ],
)
def test_inputs_elsewhere_are_refused_naming_the_field(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^loras\[1\]\.uri ") as refused:
        generate_spec(MINE, uri).check_inputs()
    assert why in str(refused.value)
    with pytest.raises(ValueError, match=r"^sources\[1\]\.uri "):
        fuse_spec(MINE, uri).check_inputs()
    with pytest.raises(ValueError, match=r"^dataset_uri "):
        train_spec(uri).check_inputs()


@pytest.mark.parametrize(
    ("uri", "inside"),
    [
        ("s3://bucket/kleinstyle/team-a/styleboard/b/uid-3/0123456789/dataset", True),
        ("s3://bucket/kleinstyle/team-b/styleboard/b/uid-3/0123456789/dataset", False),  # another namespace
        ("s3://bucket/other/team-a/styleboard/b/uid-3/0123456789/dataset", False),  # another prefix
        ("s3://other-bucket/kleinstyle/team-a/styleboard/dataset", False),  # another bucket
        ("gs://bucket/kleinstyle/team-a/styleboard/dataset", False),  # another store
        ("/artifacts/team-a/styleboard/b/uid-3/0123456789/dataset", False),  # a volume the pod may not even have
        ("s3://bucket/kleinstyle/team-a/x::http://127.0.0.1/secret", False),  # an fsspec chain
    ],
)
def test_on_an_object_store_the_same_bucket_prefix_and_namespace(uri: str, inside: bool) -> None:
    spec = train_spec(uri, root="s3://bucket/kleinstyle")
    if inside:
        spec.check_inputs()
    else:
        with pytest.raises(ValueError, match=r"^dataset_uri "):
            spec.check_inputs()


def test_an_output_off_the_layout_places_no_input() -> None:
    spec = train_spec(MINE).model_copy(update={"output_uri": "/artifacts/somewhere"})
    with pytest.raises(ValueError, match=r"^output_uri '/artifacts/somewhere' does not follow the artifact layout"):
        spec.check_inputs()


def test_prepare_has_no_artifact_inputs() -> None:
    work = PrepareSpec(trigger_word="t", images=())
    spec = RunSpec(owner=owner("StyleBoard"), output_uri=output("StyleBoard"), output_display_uri="x", work=work)
    assert spec.input_uris() == []


# ---- the pods -----------------------------------------------------------------------------------------------------


def write(rootfs: Path, spec: RunSpec) -> str:
    path = rootfs / SPEC_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_json())
    (rootfs / "dev").mkdir(exist_ok=True)
    return SPEC_PATH


STEPS = {
    "generate": (generate.main, generate_spec, "loras[0].uri"),
    "fuse": (fuse.main, fuse_spec, "sources[0].uri"),
    "train": (train.main, lambda uri, *_: train_spec(uri), "dataset_uri"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_loopback_url_is_refused_before_any_request(
    rootfs: Path, kube_api: KubeApi, https_server: LoopbackServer, step: str
) -> None:
    main, make, field = STEPS[step]
    https_server.respond("/secret", body=SECRET)
    kube_api.serve_status("/apis/kleinstyle.dev/v1alpha1/namespaces/team-a/" + f"{make(MINE).owner.plural}/x/status")
    secret_url = https_server.url("/secret")
    assert main(write(rootfs, make(secret_url, MINE))) == EXIT_BAD_SPEC
    assert https_server.requests == []  # not even a TLS handshake's request
    message = (rootfs / "dev/termination-log").read_text()
    assert message.startswith(f"bad input: {field} '{secret_url}' uses https://")
    reported = kube_api.patches[-1].json()["status"]["progress"]  # type: ignore[index]
    assert reported["state"] == "Failed" and reported["message"] == message


@pytest.mark.parametrize("step", sorted(STEPS))
def test_another_namespaces_file_is_refused_unread(rootfs: Path, kube_api: KubeApi, step: str) -> None:
    main, make, field = STEPS[step]
    theirs = "/artifacts/team-b/stylelora/a/uid-9/0123456789/lora.safetensors"
    planted = rootfs / theirs.lstrip("/")
    planted.parent.mkdir(parents=True)
    planted.write_bytes(SECRET)
    assert main(write(rootfs, make(theirs, MINE))) == EXIT_BAD_SPEC
    message = (rootfs / "dev/termination-log").read_text()
    assert message == f"bad input: {field} '{theirs}' is outside this namespace's artifact folder /artifacts/team-a"
    assert b"SECRET" not in message.encode()
