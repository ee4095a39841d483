"""Where a run's artifacts are: the folder layout and file names, spelled once for the operator (which shows URIs
in status and deletes an owner's folder) and the runtime (which writes there).

    {namespace}/{kind}/{name}/{uid}/                  an owner's folder (kind in lower case)
        text-cache/                                  text-provider answers, shared by the owner's runs
        {run_id}/                                    one run, named by its RunSpec hash
            metadata.json, _SUCCESS                  the sidecar, and the marker written last (complete runs)
            dataset/NNN.png, dataset/NNN.txt          StyleBoard: the prepared dataset
            report.json                              StyleBoard: what prepare did (its PrepareResult)
            lora.safetensors, lora.json              StyleLoRA, LoRAFusion: the LoRA and its sidecar
            lora.bfl.safetensors                     StyleLoRA: the LoRA in another format it asked for
            work/                                    StyleLoRA: checkpoints (work/checkpoints/step_NNNNNN/)
            checkpoint_gallery.png                   StyleLoRA: every evaluated step's probe renders
            aitoolkit/                               StyleLoRA on ai-toolkit: its training folder
            images/NAME.png, images/NAME.json        GenerationJob: the images and their records
            contact_sheet.png, generation.json       GenerationJob: the grid and the job's record
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imports nothing at run time: `kleinstyle fuse` on one machine reads these names too
    from .runspec import Owner

# Length of the RunSpec-hash prefix that names a run: its Job, ConfigMap, artifact folder and reports.
RUN_ID_LENGTH = 10

METADATA_FILE = "metadata.json"
SUCCESS_MARKER = "_SUCCESS"
TEXT_CACHE = "text-cache"
DATASET_DIR = "dataset"
PREPARE_REPORT = "report.json"
LORA_FILE = "lora.safetensors"
LORA_SIDECAR = "lora.json"
WORK_DIR = "work"
AITOOLKIT_DIR = "aitoolkit"
IMAGES_DIR = "images"
CONTACT_SHEET = "contact_sheet.png"
GENERATION_SUMMARY = "generation.json"
CHECKPOINT_GALLERY = "checkpoint_gallery.png"
# The formats a StyleLoRA's LoRA is published in (spec.output.loraFormats; runtime.klein.lora_format), default first.
LORA_FORMATS = ("diffusers", "bfl")


def owner_folder(owner: Owner) -> str:
    """An owner's folder, relative to the artifact store's root: every run of it, and what they share."""
    return f"{owner.namespace}/{owner.kind.lower()}/{owner.name}/{owner.uid}"


def run_folder(owner: Owner, run_hash: str) -> str:
    """One run's folder, relative to the artifact store's root."""
    return f"{owner_folder(owner)}/{run_hash[:RUN_ID_LENGTH]}"


def namespace_folder(output_uri: str, owner: Owner) -> str | None:
    """The folder of `owner`'s namespace in the artifact store that `output_uri` (a run's folder) lies in, e.g.
    /artifacts/team-a or s3://bucket/prefix/team-a; None when `output_uri` does not follow the layout (then nothing
    can be said to lie beside it)."""
    parent, _, run = output_uri.rstrip("/").rpartition("/")
    tail = f"/{owner_folder(owner)}"
    if not run or not parent.endswith(tail) or not parent[: -len(tail)]:
        return None
    return f"{parent[: -len(tail)]}/{owner.namespace}"


def image_file(name: str) -> str:
    """A GenerationJob's image, by the name `GenerateSpec.image_files` gives it."""
    return f"{IMAGES_DIR}/{name}.png"


def lora_files(formats: Sequence[str]) -> dict[str, str]:
    """Format -> file name of each published LoRA file: the first format listed is LORA_FILE (status.loraURI, the
    file GenerationJobs and LoRAFusions read), every other one `lora.<format>.safetensors` beside it."""
    stem, _, suffix = LORA_FILE.partition(".")
    return {fmt: LORA_FILE if i == 0 else f"{stem}.{fmt}.{suffix}" for i, fmt in enumerate(formats)}
