"""The StyleBoard prepare step: fetch, validate, dedupe and caption the reference images, and write the dataset.

Output, published all at once under the run's `output_uri` (see artifacts.py):
    dataset/001.png, dataset/001.txt, ...   RGB PNGs with a caption file beside each (ai-toolkit's layout)
    report.json                             accepted, rejected, duplicates, warnings (the PrepareResult)
    metadata.json, _SUCCESS                 the sidecar and the completeness marker
Policy, decided here:
- One bad image is a rejection with a reason, never a crash; a run with no usable image fails.
- Exact duplicates (same pixels) are rejected, naming the first copy. Near duplicates (dHash distance up to
  `near_duplicate_distance`) are kept and listed with a warning: at that distance dHash also matches deliberate
  variations of one composition, which a user may well want; a copy only weighs its picture more in training.
- Images are taken in the order given until `max_images` are accepted; later ones are not even fetched.
- A caption always starts with the trigger word: a user caption without it gets `"{trigger}. "` in front, and an
  image without a caption gets the trigger word alone (automatic captioning arrives with issue #4).
- A retried Job whose run already published its output reports that output again instead of redoing the work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from .artifacts import ArtifactDir, artifact_metadata, join_uri, published_metadata, read_json
from .fetch import FetchError, fetch
from .images import ImageRejected, ValidImage, hamming, validate_image
from .paths import local_path
from .report import api_target, report_progress, write_termination_message
from .spec import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK, PrepareSpec, RunSpec

log = logging.getLogger(__name__)

STEP = "prepare"
REPORT_FILE = "report.json"
DATASET_DIR = "dataset"


class AcceptedImage(BaseModel):
    source: str
    file: str = Field(description="File name inside the dataset folder, e.g. 001.png; the caption is 001.txt.")
    width: int
    height: int
    sha256: str = Field(description="SHA-256 of the dataset PNG.")
    caption: str


class Rejection(BaseModel):
    source: str
    reason: str
    # A fetch failure may pass on a retry (a 503, a timeout); a bad or duplicate image never will.
    retryable: bool = False


class Duplicate(BaseModel):
    """An image that repeats an earlier one: `exact` ones are rejected, `near` ones are kept."""

    kind: Literal["exact", "near"]
    source: str
    resembles: str = Field(description="Source of the earlier, accepted image it repeats.")
    resembles_file: str
    file: str | None = Field(default=None, description="Dataset file of this image; None when it was rejected.")
    distance: int = Field(description="Hamming distance of the 64-bit difference hashes; 0 for an exact copy.")


class PrepareResult(BaseModel):
    """What prepare did; written as report.json and sent as `status.progress.result`."""

    succeeded: bool
    message: str
    accepted: list[AcceptedImage] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)
    duplicates: list[Duplicate] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    dataset_uri: str | None = None
    dataset_display_uri: str | None = None


# --- policy (pure) ---------------------------------------------------------------------------------------------


def starts_with_trigger(caption: str, trigger: str) -> bool:
    """Whether `caption` opens with the trigger word as a whole word ("sks, a cat" yes; "sksx" no)."""
    if not caption.startswith(trigger):
        return False
    rest = caption[len(trigger) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def caption_for(trigger: str, caption: str | None) -> tuple[str, bool]:
    """The caption file's text and whether it fell back to the trigger word alone (no caption given)."""
    text = " ".join((caption or "").split())  # one line: ai-toolkit reads the whole file as the caption
    if not text:
        return trigger, True
    if starts_with_trigger(text, trigger):
        return text, False
    return f"{trigger}. {text}", False


@dataclass(frozen=True)
class KeptImage:
    source: str
    file: str
    sha256: str
    dhash: int


def find_duplicate(
    source: str, image: ValidImage, kept: Sequence[KeptImage], max_distance: int, file: str | None = None
) -> Duplicate | None:
    """The first kept image that `image` repeats exactly, else the closest near copy within `max_distance`."""
    for other in kept:
        if other.sha256 == image.sha256:
            return Duplicate(kind="exact", source=source, resembles=other.source, resembles_file=other.file, distance=0)
    near = [(hamming(image.dhash, other.dhash), index) for index, other in enumerate(kept)]
    near = [pair for pair in near if pair[0] <= max_distance]
    if not near:
        return None
    distance, index = min(near)
    other = kept[index]
    return Duplicate(
        kind="near", source=source, resembles=other.source, resembles_file=other.file, file=file, distance=distance
    )


def caption_warning(work: PrepareSpec, fallbacks: int, total: int) -> str | None:
    if not fallbacks:
        return None
    count, their = (f"{fallbacks} of {total} images have", "their") if total > 1 else ("The image has", "its")
    why = (
        f"captioning with {work.captioning_provider} is not available yet (it arrives with issue #4)"
        if work.captioning_provider != "none"
        else "add captions to the board, or wait for Gemini captioning (issue #4)"
    )
    return f"{count} no caption, so the trigger word '{work.trigger_word}' alone is used as {their} caption; {why}."


def summary(result: PrepareResult) -> str:
    if not result.accepted:
        first = f" (first: {result.rejected[0].source}: {result.rejected[0].reason})" if result.rejected else ""
        return f"no usable images: all {len(result.rejected)} were rejected{first}"
    near = sum(1 for d in result.duplicates if d.kind == "near")
    extras = [f"{len(result.rejected)} rejected"] + ([f"{near} near duplicates"] if near else [])
    return f"prepared {len(result.accepted)} images ({', '.join(extras)}) into {result.dataset_display_uri}"


# --- the step --------------------------------------------------------------------------------------------------


def run_prepare(spec: RunSpec) -> PrepareResult:
    """Build the dataset for `spec`; an unusable board gives `succeeded=False`, an I/O failure raises.

    Nothing is visible at `output_uri` unless the whole output was written.
    """
    work = spec.work
    if not isinstance(work, PrepareSpec):
        raise ValueError(f"prepare cannot run a {work.step} RunSpec")
    if not work.trigger_word.strip():
        return PrepareResult(succeeded=False, message="the trigger word is empty")
    runspec_hash = spec.content_hash()
    if published_metadata(spec.output_uri, runspec_hash) is not None:
        stored = read_json(join_uri(spec.output_uri, REPORT_FILE))
        if stored is not None:
            log.info("%s already holds this run's output; reporting it again", spec.output_uri)
            return PrepareResult.model_validate(stored)

    dataset_uri = join_uri(spec.output_uri, DATASET_DIR)
    result = PrepareResult(
        succeeded=False,
        message="",
        dataset_uri=dataset_uri,
        dataset_display_uri=join_uri(spec.output_display_uri, DATASET_DIR),
    )
    out = ArtifactDir(spec.output_uri, artifact_metadata(spec, inputs=work.model_dump(mode="json")))
    try:
        kept, fallbacks, over_limit = _build_dataset(work, out, result)
        if over_limit:
            result.warnings.append(
                f"{over_limit} images after the first {work.max_images} accepted were not used (max_images)."
            )
        if warning := caption_warning(work, fallbacks, len(kept)):
            result.warnings.append(warning)
        result.succeeded = bool(result.accepted)
        result.message = summary(result)
        if not result.succeeded:
            result.dataset_uri = result.dataset_display_uri = None
            return result
        out.write_json(REPORT_FILE, result.model_dump(mode="json"))
        if not out.commit():
            # Another attempt of this very run published first; report what is there, not what we built.
            stored = read_json(join_uri(spec.output_uri, REPORT_FILE))
            if stored is not None:
                return PrepareResult.model_validate(stored)
        return result
    finally:
        out.discard()


def _build_dataset(work: PrepareSpec, out: ArtifactDir, result: PrepareResult) -> tuple[list[KeptImage], int, int]:
    """Fetch, validate and stage each image in order; returns (kept images, caption fallbacks, images over the cap)."""
    kept: list[KeptImage] = []
    fallbacks = over_limit = 0
    total = len(work.images)
    for position, item in enumerate(work.images, start=1):
        if len(kept) >= work.max_images:
            over_limit += 1
            result.rejected.append(Rejection(source=item.shown, reason=f"over the limit of {work.max_images} images"))
            continue
        try:
            data = fetch(item.source, work.fetch)  # the pod path; reports use item.shown
            image = validate_image(data, max_pixels=work.fetch.max_pixels, min_short_side=work.min_short_side)
        except (FetchError, ImageRejected) as exc:
            fetching = isinstance(exc, FetchError)
            reason = exc.reason if fetching else str(exc)
            log.info("image %d/%d rejected: %s: %s", position, total, item.shown, reason)
            result.rejected.append(Rejection(source=item.shown, reason=reason, retryable=fetching))
            continue
        except Exception as exc:  # a bug or an odd input must cost one image, not the board
            log.exception("image %d/%d failed unexpectedly: %s", position, total, item.shown)
            result.rejected.append(Rejection(source=item.shown, reason=f"unexpected error: {type(exc).__name__}"))
            continue
        del data
        stem = f"{len(kept) + 1:03d}"
        duplicate = find_duplicate(item.shown, image, kept, work.near_duplicate_distance, file=f"{stem}.png")
        if duplicate is not None and duplicate.kind == "exact":
            result.duplicates.append(duplicate)
            result.rejected.append(Rejection(source=item.shown, reason=f"exact duplicate of {duplicate.resembles}"))
            continue
        caption, fell_back = caption_for(work.trigger_word, item.caption)
        fallbacks += fell_back
        out.write_bytes(f"{DATASET_DIR}/{stem}.png", image.png)
        out.write_text(f"{DATASET_DIR}/{stem}.txt", caption + "\n")
        if duplicate is not None:
            result.duplicates.append(duplicate)
            result.warnings.append(
                f"{stem}.png ({item.shown}) looks like a near copy of {duplicate.resembles_file} "
                f"({duplicate.resembles}), distance {duplicate.distance}; remove one unless both are wanted."
            )
        kept.append(KeptImage(source=item.shown, file=f"{stem}.png", sha256=image.sha256, dhash=image.dhash))
        result.accepted.append(
            AcceptedImage(
                source=item.shown,
                file=f"{stem}.png",
                width=image.width,
                height=image.height,
                sha256=image.sha256,
                caption=caption,
            )
        )
        log.info("image %d/%d accepted as %s: %s", position, total, stem, item.shown)
    return kept, fallbacks, over_limit


def main(spec_path: str) -> int:
    """Run prepare from a RunSpec file (a pod path), report to the owner, and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = RunSpec.from_json(local_path(spec_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        message = f"cannot read the RunSpec {spec_path}: {exc}"
        log.error("%s", message)
        write_termination_message(message)
        return EXIT_BAD_SPEC
    if not isinstance(spec.work, PrepareSpec):
        message = f"this is a {spec.work.step} RunSpec; `kleinstyle prepare` runs only prepare"
        log.error("%s", message)
        write_termination_message(message)
        return EXIT_BAD_SPEC

    def report(state: str, message: str, result: dict | None = None) -> bool:
        progress = {"step": STEP, "runHash": spec.run_id(), "state": state, "message": message, "result": result}
        return report_progress(spec.owner, progress)

    report("Running", f"fetching {len(spec.work.images)} images")
    try:
        result = run_prepare(spec)
    except Exception as exc:
        log.exception("prepare failed")
        message = f"prepare failed: {type(exc).__name__}: {exc}"
        report("Failed", message)
        write_termination_message(message)
        return EXIT_FAILED
    state = "Succeeded" if result.succeeded else "Failed"
    log.info("%s: %s", state, result.message)
    if not report(state, result.message, result.model_dump(mode="json")) and api_target() is not None:
        # The result reaches the operator only through status: fail so the Job retries (the retry re-reports the
        # already published dataset instead of preparing it again).
        message = "the result could not be reported to the Kubernetes API"
        write_termination_message(message)
        return EXIT_FAILED
    write_termination_message(result.message)
    if result.succeeded:
        return EXIT_OK
    # No usable image and no fetch that a retry could fix: the board itself must change, so don't retry.
    return EXIT_FAILED if any(r.retryable for r in result.rejected) else EXIT_BAD_SPEC
