"""Where a run's artifacts are (kleinstyle.contract.layout), spelled once for the operator and the runtime: an
owner's folder, a run's folder, the namespace folder its inputs must lie in, a generated image's file."""

from __future__ import annotations

import pytest
from kleinstyle.contract.layout import (
    IMAGES_DIR,
    RUN_ID_LENGTH,
    image_file,
    namespace_folder,
    owner_folder,
    run_folder,
)
from kleinstyle.contract.runspec import GenerateSpec, Owner

LORA = Owner(kind="StyleLoRA", plural="styleloras", namespace="team-a", name="bd9-lora", uid="uid-1")
HASH = "0123456789abcdef" * 4


def test_an_owners_folder_is_namespace_kind_in_lower_case_name_uid() -> None:
    assert owner_folder(LORA) == "team-a/stylelora/bd9-lora/uid-1"


def test_a_recreated_owner_of_the_same_name_gets_a_folder_of_its_own() -> None:
    assert owner_folder(LORA) != owner_folder(LORA.model_copy(update={"uid": "uid-2"}))


@pytest.mark.parametrize("run_hash", [HASH, HASH[:RUN_ID_LENGTH]])
def test_a_runs_folder_is_named_by_the_run_id_whether_given_the_hash_or_the_id(run_hash: str) -> None:
    assert run_folder(LORA, run_hash) == "team-a/stylelora/bd9-lora/uid-1/0123456789"


@pytest.mark.parametrize(
    ("output_uri", "folder"),
    [
        ("/artifacts/team-a/stylelora/bd9-lora/uid-1/0123456789", "/artifacts/team-a"),
        ("/artifacts/team-a/stylelora/bd9-lora/uid-1/0123456789/", "/artifacts/team-a"),
        ("s3://bucket/kleinstyle/team-a/stylelora/bd9-lora/uid-1/0123456789", "s3://bucket/kleinstyle/team-a"),
        ("gs://bucket/team-a/stylelora/bd9-lora/uid-1/0123456789", "gs://bucket/team-a"),
        # not this owner's run folder: nothing can be said to lie beside it
        ("/artifacts/team-a/stylelora/bd9-lora/uid-1", None),  # the owner's folder, no run
        ("/artifacts/team-b/stylelora/bd9-lora/uid-1/0123456789", None),
        ("/artifacts/team-a/styleboard/bd9-lora/uid-1/0123456789", None),
        ("/artifacts/team-a/stylelora/other/uid-1/0123456789", None),
        ("/artifacts/team-a/stylelora/bd9-lora/uid-2/0123456789", None),
        ("/team-a/stylelora/bd9-lora/uid-1/0123456789", None),  # no store root above the namespace
        ("", None),
    ],
)
def test_the_namespace_folder_of_a_runs_output(output_uri: str, folder: str | None) -> None:
    assert namespace_folder(output_uri, LORA) == folder


def test_a_run_folder_the_layout_gives_lies_in_its_namespace_folder() -> None:
    assert namespace_folder(f"s3://bucket/p/{run_folder(LORA, HASH)}", LORA) == "s3://bucket/p/team-a"


def test_each_generated_image_has_its_own_png_in_render_order() -> None:
    work = GenerateSpec(model_path="/models/klein", loras=(), prompts=("a fox", "a hen"), seeds=(7, 3))
    files = [image_file(name) for _, _, name in work.image_files()]
    assert files == [
        f"{IMAGES_DIR}/001_p01_seed7.png",
        f"{IMAGES_DIR}/002_p01_seed3.png",
        f"{IMAGES_DIR}/003_p02_seed7.png",
        f"{IMAGES_DIR}/004_p02_seed3.png",
    ]
