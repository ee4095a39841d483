"""Isolation by construction: a Job's pod sees, of the artifact volume, its own run's folder (read-write) and its
inputs' run folders (read-only), each at the path the RunSpec names; nothing of another namespace, and no pvc://
source may name the operator's own claims."""

from __future__ import annotations

import pytest
from kleinstyle.contract.layout import run_folder
from kleinstyle.contract.runspec import FuseSpec, GenerateSpec, LoraInput, Owner, RunSpec, StepSpec, TrainSpec
from kleinstyle.operator.children import InvalidSpec, Run, build_children
from kleinstyle.operator.config import ArtifactStore, OperatorConfig
from kleinstyle.operator.reconcile import Observed, reconcile

from tests.support.runs import train_work

CFG = OperatorConfig()
NS = "team-a"
BOARD_RUN = "/artifacts/team-a/styleboard/bd9/uid-board/0123456789"
LORA_RUN = "/artifacts/team-a/stylelora/bd9-lora/uid-lora/abcdef0123"
INK_RUN = "/artifacts/team-a/lorafusion/ink/uid-ink/fedcba9876"
PLURALS = {"StyleBoard": "styleboards", "StyleLoRA": "styleloras", "GenerationJob": "generationjobs"}


def run_of(kind: str, work: StepSpec, namespace: str = NS, cfg: OperatorConfig = CFG) -> Run:
    """The Run of `work` for a `kind` named `mine`, writing where the operator puts its runs."""
    owner = Owner(kind=kind, plural=PLURALS.get(kind, "lorafusions"), namespace=namespace, name="mine", uid="uid-1")
    provisional = RunSpec(owner=owner, output_uri="", output_display_uri="", work=work)
    run_hash = provisional.content_hash()
    output = f"{cfg.artifacts.uri or cfg.artifacts.mount_path}/{run_folder(owner, run_hash)}"
    spec = provisional.model_copy(update={"output_uri": output, "output_display_uri": output})
    return Run(runspec=spec, step=work.step, run_hash=run_hash, owner_api_version="kleinstyle.dev/v1alpha1")


def artifact_mounts(run: Run, cfg: OperatorConfig = CFG) -> dict[str, tuple[str, bool]]:
    """mountPath -> (subPath, readOnly) of every mount of the artifact claim in the run's Job."""
    job = next(c for c in build_children(run, cfg) if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]: (m["subPath"], m["readOnly"])
        for m in pod["containers"][0]["volumeMounts"]
        if claims.get(m["name"]) == CFG.artifacts.claim_name
    }


def own(run: Run) -> str:
    return run.runspec.output_uri


def relative(path: str) -> str:
    return path.removeprefix("/artifacts/")


def generate(*uris: str) -> GenerateSpec:
    return GenerateSpec(model_path="/models/klein", loras=tuple(LoraInput(uri=u) for u in uris), prompts=("a fox",))


def train(dataset: str) -> TrainSpec:
    return train_work(dataset)


def test_a_generation_mounts_its_run_read_write_and_each_lora_run_read_only():
    run = run_of("GenerationJob", generate(f"{LORA_RUN}/lora.safetensors", f"{INK_RUN}/lora.safetensors"))
    assert artifact_mounts(run) == {
        own(run): (relative(own(run)), False),
        LORA_RUN: (relative(LORA_RUN), True),
        INK_RUN: (relative(INK_RUN), True),
    }


def test_a_lora_training_mounts_its_run_and_its_boards_dataset_run():
    run = run_of("StyleLoRA", train(f"{BOARD_RUN}/dataset"))
    assert artifact_mounts(run) == {own(run): (relative(own(run)), False), BOARD_RUN: (relative(BOARD_RUN), True)}


def test_a_fusion_mounts_its_owners_folder_it_publishes_into_and_its_sources_runs():
    """fuse (like prepare) publishes its run folder whole, by a rename in the owner's folder."""
    run = run_of("LoRAFusion", FuseSpec(sources=(LoraInput(uri=f"{LORA_RUN}/lora.safetensors"),), method="concat"))
    owner = own(run).rsplit("/", 1)[0]
    assert owner == "/artifacts/team-a/lorafusion/mine/uid-1"
    assert artifact_mounts(run) == {owner: (relative(owner), False), LORA_RUN: (relative(LORA_RUN), True)}


def test_a_lora_used_twice_is_mounted_once():
    run = run_of("GenerationJob", generate(f"{LORA_RUN}/lora.safetensors", f"{LORA_RUN}/lora.safetensors"))
    assert list(artifact_mounts(run)) == [own(run), LORA_RUN]


@pytest.mark.parametrize(
    "uri",
    [
        "/artifacts/team-b/stylelora/x/uid-x/abcdef0123/lora.safetensors",  # another namespace
        "/artifacts/team-a/../team-b/stylelora/x/uid-x/abcdef0123/lora.safetensors",  # a way out
        "/artifacts/team-a/stylelora/x/uid-x/lora.safetensors",  # not inside a run folder
        "/artifacts/team-a//stylelora/x/uid-x/abcdef0123/lora.safetensors",
        "/models/FLUX.2-klein-base-9B/lora.safetensors",  # not on the artifact volume
        "/artifacts-other/team-a/stylelora/x/uid-x/abcdef0123/lora.safetensors",
    ],
)
def test_an_input_outside_the_namespace_folder_refuses_to_build(uri: str):
    run = run_of("GenerationJob", generate(f"{LORA_RUN}/lora.safetensors", uri))
    with pytest.raises(InvalidSpec) as refused:
        build_children(run, CFG)
    assert str(refused.value).startswith(f"loras[1].uri: {uri} is not inside a run folder under /artifacts/team-a/")


def test_an_object_store_input_outside_the_namespace_refuses_to_build_and_nothing_is_mounted():
    cfg = OperatorConfig(artifacts=ArtifactStore(uri="s3://bucket/ks"))
    lora = "s3://bucket/ks/team-a/stylelora/bd9-lora/uid-lora/abcdef0123/lora.safetensors"
    assert artifact_mounts(run_of("GenerationJob", generate(lora), cfg=cfg), cfg) == {}
    foreign = "s3://bucket/ks/team-b/stylelora/x/uid-x/abcdef0123/lora.safetensors"
    with pytest.raises(InvalidSpec, match=r"loras\[0\]\.uri: s3://bucket/ks/team-b/.* under s3://bucket/ks/team-a/"):
        build_children(run_of("GenerationJob", generate(foreign), cfg=cfg), cfg)


def test_object_store_credentials_and_their_prefix_come_from_the_namespaces_secret():
    cfg = OperatorConfig(artifacts=ArtifactStore(uri="s3://bucket/ks", credentialsSecret="artifact-creds"))
    run = run_of(
        "GenerationJob", generate("s3://bucket/ks/team-a/stylelora/l/uid-l/abcdef0123/lora.safetensors"), cfg=cfg
    )
    job = next(c for c in build_children(run, cfg) if c["kind"] == "Job")
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KLEINSTYLE_ARTIFACT_SECRET"] == "artifact-creds"
    assert env["KLEINSTYLE_ARTIFACT_PREFIX"] == {
        "secretKeyRef": {"name": "artifact-creds", "key": "prefix", "optional": True}
    }
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "artifact-creds"
    plain = OperatorConfig()  # a PVC: no credentials, no prefix
    names = {
        e["name"]
        for e in build_children(run_of("StyleLoRA", train(f"{BOARD_RUN}/dataset")), plain)[-1]["spec"]["template"][
            "spec"
        ]["containers"][0]["env"]
    }
    assert not names & {"KLEINSTYLE_ARTIFACT_SECRET", "KLEINSTYLE_ARTIFACT_PREFIX", "AWS_ACCESS_KEY_ID"}


# --- StyleBoard: through the public reconcile -----------------------------------------------------------------


def board(*sources: str) -> dict:
    return {
        "apiVersion": "kleinstyle.dev/v1alpha1",
        "kind": "StyleBoard",
        "metadata": {"name": "bd9", "namespace": NS, "uid": "uid-board", "generation": 1},
        "spec": {"triggerWord": "bd9style", "images": [{"source": s} for s in sources]},
    }


def test_a_board_mounts_its_owners_folder_and_its_reference_claims_only():
    decision = reconcile(
        Observed(body=board("pvc://refs/bd9/01.png", "https://x.test/2.png")), CFG, "2026-01-01T00:00:00Z"
    )
    job = next(c for c in decision.create if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims}
    owner = "/artifacts/team-a/styleboard/bd9/uid-board"
    assert mounts == {
        owner: {"name": "artifacts", "mountPath": owner, "subPath": relative(owner), "readOnly": False},
        "/references/refs": {"name": "ref-0", "mountPath": "/references/refs", "readOnly": True},
    }
    assert claims["ref-0"] == {"claimName": "refs", "readOnly": True}


@pytest.mark.parametrize(
    ("claim", "holds"), [("kleinstyle-artifacts", "the artifacts"), ("kleinstyle-models", "the model cache")]
)
def test_a_board_source_on_the_operators_own_claims_is_refused_naming_the_field(claim: str, holds: str):
    source = f"pvc://{claim}/other-ns/styleboard/x/uid-x/0123456789/dataset/001.png"
    decision = reconcile(Observed(body=board("pvc://refs/bd9/01.png", source)), CFG, "2026-01-01T00:00:00Z")
    assert not any(c["kind"] == "Job" for c in decision.create)
    assert decision.status["phase"] == "Failed"
    ready = next(c for c in decision.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == (
        f"spec.images[1].source: {source} names the claim {claim}, which holds {holds} of kleinstyle; a pvc:// "
        "source must name a claim of your own"
    )
