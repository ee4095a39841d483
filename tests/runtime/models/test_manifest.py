"""The model manifest (kleinstyle.runtime.models.manifest): pinned commits, folders the runtime reads, and rules
whose errors name the entry, the field and the rule."""

from __future__ import annotations

import dataclasses

import pytest
from kleinstyle.runtime.models.manifest import MANIFEST, ManifestError, check_manifest, select

SOURCES = {source.name: source for source in MANIFEST}


def test_the_manifest_keeps_its_own_rules() -> None:
    check_manifest(MANIFEST)


def test_default_pull_is_the_base_model_and_every_evaluation_model() -> None:
    assert [s.name for s in select(MANIFEST)] == ["klein-base-9b", "csd", "clip", "dinov2"]
    assert [s.name for s in select(MANIFEST, ["klein-base-9b-bfl"])] == ["klein-base-9b-bfl"]


def test_klein_lands_where_the_operator_looks_for_it() -> None:
    """OperatorConfig.model_dirs' default names the folder of spec.model.name klein-base-9b."""
    config = pytest.importorskip("kleinstyle.operator.config", reason="the operator extra")
    OperatorConfig = config.OperatorConfig

    assert OperatorConfig().model_dirs["klein-base-9b"] == SOURCES["klein-base-9b"].folder
    # ai-toolkit reads the BFL file inside the same folder (docs/facts.md#ai-toolkit).
    assert SOURCES["klein-base-9b-bfl"].folder == SOURCES["klein-base-9b"].folder


def test_entries_take_only_the_files_the_runtime_reads() -> None:
    clip = [
        "README.md",
        "config.json",
        "flax_model.msgpack",
        "merges.txt",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "tokenizer.json",
        "vocab.json",
    ]
    assert SOURCES["clip"].wanted(clip) == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer.json",
        "vocab.json",
    ]
    klein = ["model_index.json", "transformer/config.json", "flux-2-klein-base-9b.safetensors", "README.md"]
    assert SOURCES["klein-base-9b"].wanted(klein) == ["model_index.json", "transformer/config.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"revision": "main"}, "model 'clip': revision 'main' must be a full 40-hex commit hash"),
        ({"revision": "32bd642"}, "must be a full 40-hex commit hash"),
        ({"repo_id": "clip-vit-large-patch14"}, "repo_id 'clip-vit-large-patch14' must be owner/name"),
        ({"folder": "../etc"}, "folder '../etc' must be one path component"),
        ({"files": ("../secret",)}, "files must be relative patterns"),
        ({"convert": "onnx"}, "convert 'onnx' must be one of csd"),
    ],
)
def test_a_broken_entry_is_refused_naming_field_and_rule(change: dict[str, object], message: str) -> None:
    broken = dataclasses.replace(SOURCES["clip"], **change)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_manifest([broken])


def test_names_are_unique_and_only_names_known_ones() -> None:
    with pytest.raises(ManifestError, match="name must be unique"):
        check_manifest([SOURCES["clip"], SOURCES["clip"]])
    with pytest.raises(ManifestError, match="--only sd15: not in the manifest"):
        select(MANIFEST, ["sd15"])
