"""Which models fill the model cache: each one's Hub repository at a pinned commit, the files taken from it, the
folder it goes to inside the cache, its licence, and what the runtime uses it for (docs/models.md says why each).

Plain data, importable without torch or huggingface_hub: the chart's pull Job, `kleinstyle models pull` and the
docs read the same table. A revision is always a full commit hash, never a branch: the bytes behind a branch move,
the bytes behind a commit do not, and the pull checks that the Hub answers with that very commit.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

COMMIT = re.compile(r"[0-9a-f]{40}")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
CONVERSIONS = ("csd",)
# Where a pull records what it put in a folder (one JSON per model): the folder holds that model, complete and
# verified, exactly when its record is there. Written last, after every file is in place.
RECORD_DIR = ".kleinstyle-models"


class ManifestError(ValueError):
    """A manifest entry breaks a rule; the message names the entry, the field and the rule."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # what `--only` and the docs call it
    repo_id: str  # owner/name on the Hub
    revision: str  # the full commit hash the files are taken at
    folder: str  # the folder inside the model cache (one path component)
    files: tuple[str, ...]  # fnmatch patterns of the repository paths to take (huggingface_hub's allow_patterns)
    licence: str
    use: str  # what the runtime reads it for
    convert: str | None = None  # "csd": the published checkpoint, rewritten into the evaluator's layout
    default: bool = True  # pulled without --only; False: only when named
    gated: bool = False  # the Hub wants a token of an account that accepted the licence

    def wanted(self, paths: Iterable[str]) -> list[str]:
        """The repository paths this entry takes, sorted."""
        return sorted(p for p in paths if any(fnmatch.fnmatch(p, pattern) for pattern in self.files))


KLEIN_PARTS = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "transformer/*", "vae/*")

MANIFEST: tuple[ModelSource, ...] = (
    ModelSource(
        name="klein-base-9b",
        repo_id="black-forest-labs/FLUX.2-klein-base-9B",
        revision="17c3b160520b7dd44665dbf0b9ed9dd30c15cd06",
        folder="FLUX.2-klein-base-9B",
        files=KLEIN_PARTS,
        licence="FLUX Non-Commercial License (gated: accept it on the Hub with the account of the token)",
        use="the base model the LoRAs train on and generation renders with (diffusers layout, builtin backend)",
        gated=True,
    ),
    ModelSource(
        name="klein-base-9b-bfl",
        repo_id="black-forest-labs/FLUX.2-klein-base-9B",
        revision="17c3b160520b7dd44665dbf0b9ed9dd30c15cd06",
        folder="FLUX.2-klein-base-9B",
        files=("flux-2-klein-base-9b.safetensors",),
        licence="FLUX Non-Commercial License (gated: accept it on the Hub with the account of the token)",
        use="the single-file BFL transformer ai-toolkit reads beside the diffusers folder (docs/facts.md#ai-toolkit)",
        default=False,
        gated=True,
    ),
    ModelSource(
        name="csd",
        repo_id="tomg-group-umd/CSD-ViT-L",
        revision="5bc26a6fb0487f3f00a2a7313135103a005b1b67",
        folder="CSD-ViT-L",
        files=("pytorch_model.bin",),
        licence="CC-BY-4.0 (the model card; the code repository is MIT)",
        use="style score: Contrastive Style Descriptors (arXiv 2404.01292), converted to a CLIP vision tower "
        "and csd_style_projection.safetensors",
        convert="csd",
    ),
    ModelSource(
        name="clip",
        repo_id="openai/clip-vit-large-patch14",
        revision="32bd64288804d66eefd0ccbe215aa642df71cc41",
        folder="clip-vit-large-patch14",
        files=("*.json", "merges.txt", "model.safetensors"),
        licence="MIT (OpenAI CLIP)",
        use="adherence score: CLIP ViT-L/14 image-text cosine (CLIPScore, arXiv 2104.08718)",
    ),
    ModelSource(
        name="dinov2",
        repo_id="facebook/dinov2-base",
        revision="f9e44c814b77203eaa57a6bdbbd535f21ede1415",
        folder="dinov2-base",
        files=("config.json", "preprocessor_config.json", "model.safetensors"),
        licence="Apache-2.0",
        use="leakage score: DINOv2 ViT-B/14 patch tokens (arXiv 2304.07193)",
    ),
)


def check_manifest(sources: Sequence[ModelSource]) -> None:
    """Refuse an entry that breaks a rule, naming it, its field and the rule."""
    names: set[str] = set()
    for source in sources:
        where = f"model {source.name!r}"
        if not FOLDER.fullmatch(source.name):
            raise ManifestError(f"{where}: name must be letters, digits, '.', '_' or '-'")
        if source.name in names:
            raise ManifestError(f"{where}: name must be unique in the manifest")
        names.add(source.name)
        if not REPO_ID.fullmatch(source.repo_id):
            raise ManifestError(f"{where}: repo_id {source.repo_id!r} must be owner/name")
        if not COMMIT.fullmatch(source.revision):
            raise ManifestError(
                f"{where}: revision {source.revision!r} must be a full 40-hex commit hash (never a branch or tag)"
            )
        if not FOLDER.fullmatch(source.folder) or source.folder in (".", ".."):
            raise ManifestError(f"{where}: folder {source.folder!r} must be one path component inside the cache")
        if not source.files or any(not p or p.startswith("/") or ".." in p.split("/") for p in source.files):
            raise ManifestError(f"{where}: files must be relative patterns inside the repository")
        if source.convert is not None and source.convert not in CONVERSIONS:
            raise ManifestError(f"{where}: convert {source.convert!r} must be one of {', '.join(CONVERSIONS)}")


def select(sources: Sequence[ModelSource], only: Sequence[str] = ()) -> list[ModelSource]:
    """The entries to pull: the named ones (in manifest order), or every default one."""
    if not only:
        return [s for s in sources if s.default]
    known = {s.name for s in sources}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ManifestError(f"--only {', '.join(unknown)}: not in the manifest (known: {', '.join(sorted(known))})")
    return [s for s in sources if s.name in only]
