"""The StyleBoard prepare step: fetch, validate, dedupe and caption the reference images, and write the dataset.

Output, published all at once under the run's `output_uri` (`contract.layout`, artifacts.py):
    dataset/001.png, dataset/001.txt, ...   RGB PNGs with a caption file beside each (ai-toolkit's layout)
    report.json                             accepted, rejected, duplicates, warnings (`contract.reports.PrepareResult`)
    metadata.json, _SUCCESS                 the sidecar and the completeness marker
Policy, decided here:
- One bad image is a rejection with a reason, never a crash; a run with no usable image fails.
- Exact duplicates (same pixels) are rejected, naming the first copy. Near duplicates (dHash distance up to
  `near_duplicate_distance`) are kept and listed with a warning: at that distance dHash also matches deliberate
  variations of one composition, which a user may well want; a copy only weighs its picture more in training.
- Images are taken in the order given until `max_images` are accepted; later ones are not even fetched.
- Training buckets stop at 4:1 (`klein.dataset.MAX_ASPECT`); a wider image is centre-cropped to it. An image that
  would lose some of itself is kept with a warning saying how much; one that would lose more than half is rejected
  with its ratio and the limit (`aspect_check`).
- A caption always starts with the trigger word (`"{trigger}. "` is put in front when missing) and says what the
  image depicts, never how it looks (text/captions.py). With a provider and its key, images without a caption (or
  every image, with `given_captions: fallback`) are captioned by the provider; a caption the user wrote is kept and
  flagged when it describes style. Without a key, given captions are used and the trigger word alone stands in for
  the rest, and `captioning` says so. An image the provider gives no usable answer for (blocked, malformed twice)
  falls back the same way with a warning; a provider that stays unavailable after bounded retries fails the step
  with exit 1, naming the images (answers already given are cached beside the run folders, so the retried Job
  pays only for the rest); a refused key or model fails it with exit 2.
- After the captions, the L1 STYLE_PROFILE is extracted from up to 10 references (a diverse subset of larger
  boards) whenever a provider is available: whether generation uses it is the TrainingPlan's text-pipeline
  decision (`contract.plan`), so a small board still has one for a GenerationJob that asks for the pipeline.
- A retried Job whose run already published its output reports that output again instead of redoing the work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from kleinstyle.contract.layout import DATASET_DIR, PREPARE_REPORT, TEXT_CACHE
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK
from kleinstyle.contract.reports import AcceptedImage, Duplicate, PrepareResult, Rejection
from kleinstyle.contract.runspec import PrepareSpec, RunSpec

from .artifacts import ArtifactDir, artifact_metadata, join_uri, published_metadata, read_json
from .fetch import FetchError, fetch
from .images import ImageRejected, ValidImage, hamming, validate_image
from .klein.dataset import MAX_ASPECT
from .step import Outcome, Reporter, run_step
from .text.captions import (
    Caption,
    CaptionTask,
    check_given,
    generate_captions,
    with_trigger,
)
from .text.client import TextClient
from .text.providers import AnswerRejected, ImagePart, NoApiKey, ProviderRefused, ProviderUnavailable, make_provider
from .text.retry import RetryPolicy

log = logging.getLogger(__name__)

# --- policy (pure) ---------------------------------------------------------------------------------------------


def caption_for(trigger: str, caption: str | None) -> tuple[str, bool]:
    """The caption file's text and whether it fell back to the trigger word alone (no caption given)."""
    text = " ".join((caption or "").split())
    return with_trigger(text, trigger), not text


CaptionSource = Literal["given", "provider", "none"]


def caption_source(given: str | None, mode: str, has_provider: bool) -> CaptionSource:
    """Where an image's caption comes from: its given caption, the provider, or nowhere (the trigger word)."""
    if given and given.strip() and (mode == "use" or not has_provider):
        return "given"
    return "provider" if has_provider else "none"


# The least of an image that training may keep after cropping it to MAX_ASPECT; below this it is rejected.
MIN_KEPT_BY_CROP = 0.5


def aspect_check(width: int, height: int) -> tuple[str | None, str | None]:
    """(why the image is rejected, what a warning should say) for its aspect ratio; (None, None) when it fits.

    Buckets (ours and ai-toolkit's) stop at MAX_ASPECT, so a wider image trains on its centre only. A style LoRA
    learns from the whole composition: a reference a little wider loses its ends, which the user should hear of;
    a panorama cropped to a sliver would train on a part nobody chose, so it is refused, naming the ratio and the
    limit, for the user to crop or split it and so choose what the LoRA sees.
    """
    aspect = max(width / height, height / width)
    if aspect <= MAX_ASPECT * (1 + 1e-9):
        return None, None
    kept = MAX_ASPECT / aspect
    ratio = f"{width}x{height} is {aspect:.1f}:1 and training crops to at most {MAX_ASPECT:g}:1"
    if kept < MIN_KEPT_BY_CROP:
        return (
            f"{ratio}, which would keep only {100 * kept:.1f}% of it (the centre); crop it or split it into images of "
            f"at most {MAX_ASPECT:g}:1",
            None,
        )
    return None, f"{ratio}: {100 * (1 - kept):.0f}% of it (the ends) is not trained on; crop it to choose what stays"


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


def caption_warnings(trigger: str, accepted: Sequence[AcceptedImage]) -> list[str]:
    """One warning per kind of caption trouble, naming the images."""

    def named(items: list[AcceptedImage], detail: bool = True) -> str:
        return ", ".join(f"{a.file} ({a.caption_note})" if detail and a.caption_note else a.file for a in items)

    given = [a for a in accepted if a.caption_origin == "given"]
    styled = [a for a in given if set(a.style_words) - {trigger.lower()}]
    repeating = [a for a in given if trigger.lower() in a.style_words]
    cleaned = [a for a in accepted if a.caption_origin == "cleaned"]
    bare = [a for a in accepted if a.caption_origin == "trigger-only"]
    warnings = []
    if styled:
        warnings.append(
            f"{_count(styled, 'given caption describes', 'given captions describe')} how the image looks, not what "
            f"it shows: {named(styled)}; the LoRA learns less of the style from them"
        )
    if repeating:
        warnings.append(
            f"{_count(repeating, 'given caption names', 'given captions name')} the trigger word '{trigger}' in its "
            f"text as well as in front: {named(repeating, detail=False)}; the trigger word then also stands for what "
            "it names there, not only the style"
        )
    if cleaned:
        warnings.append(
            f"{_count(cleaned, 'provider caption', 'provider captions')} still described style when asked again and "
            f"lost those words: {named(cleaned)}"
        )
    if bare:
        has = _count(bare, "image has", "images have")
        warnings.append(f"{has} only the trigger word '{trigger}' as caption: {named(bare)}")
    return warnings


def _count(items: Sequence[object], one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def summary(result: PrepareResult) -> str:
    if not result.accepted:
        first = f" (first: {result.rejected[0].source}: {result.rejected[0].reason})" if result.rejected else ""
        return f"no usable images: all {len(result.rejected)} were rejected{first}"
    near = sum(1 for d in result.duplicates if d.kind == "near")
    extras = [f"{len(result.rejected)} rejected"] + ([f"{near} near duplicates"] if near else [])
    return f"prepared {len(result.accepted)} images ({', '.join(extras)}) into {result.dataset_display_uri}"


# --- the step --------------------------------------------------------------------------------------------------


def text_cache_uri(spec: RunSpec) -> str:
    """Beside the owner's run folders ({...}/{uid}/text-cache): a retried Job, and a later run of a changed board,
    reuse every answer already paid for."""
    return join_uri(spec.output_uri.rstrip("/").rsplit("/", 1)[0], TEXT_CACHE)


def text_client(
    work: PrepareSpec, cache_uri: str | None, retry: RetryPolicy | None = None
) -> tuple[TextClient | None, str]:
    """The captioning provider's client, or None and why there is none (no provider, no key)."""
    from .text.cache import AnswerCache

    if work.captioning_provider == "none":
        return None, "captioning.provider is none"
    try:
        provider = make_provider(work.captioning_provider, work.captioning_model)
    except NoApiKey as exc:
        return None, str(exc)
    return TextClient(provider, AnswerCache(cache_uri), policy=retry), ""


def run_prepare(spec: RunSpec, *, retry: RetryPolicy | None = None) -> PrepareResult:
    """Build the dataset for `spec`; an unusable board gives `succeeded=False`, an I/O failure raises, and so does
    a captioning provider that stays unavailable (ProviderUnavailable) or refuses the key (ProviderRefused).

    Nothing is visible at `output_uri` unless the whole output was written. `retry` bounds provider retries.
    """
    work = spec.work
    if not isinstance(work, PrepareSpec):
        raise ValueError(f"prepare cannot run a {work.step} RunSpec")
    if not work.trigger_word.strip():
        return PrepareResult(succeeded=False, message="the trigger word is empty")
    runspec_hash = spec.content_hash()
    if published_metadata(spec.output_uri, runspec_hash) is not None:
        stored = read_json(join_uri(spec.output_uri, PREPARE_REPORT))
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
    client, why_not = text_client(work, text_cache_uri(spec), retry)
    out = ArtifactDir(spec.output_uri, artifact_metadata(spec, inputs=work.model_dump(mode="json")))
    try:
        kept, staged, over_limit = _build_dataset(work, out, result, api_images=client is not None)
        if over_limit:
            result.warnings.append(
                f"{over_limit} images after the first {work.max_images} accepted were not used (max_images)."
            )
        _caption(work, client, why_not, staged, result)
        for item, image in zip(staged, result.accepted, strict=True):
            out.write_text(f"{DATASET_DIR}/{item.stem}.txt", image.caption + "\n")
        result.warnings += caption_warnings(work.trigger_word, result.accepted)
        if client is not None and result.accepted:
            _profile(client, kept, staged, result)
            result.token_usage = client.ledger.summary()
        result.succeeded = bool(result.accepted)
        result.message = summary(result)
        if not result.succeeded:
            result.dataset_uri = result.dataset_display_uri = None
            return result
        out.write_json(PREPARE_REPORT, result.model_dump(mode="json"))
        if not out.commit():
            # Another attempt of this very run published first; report what is there, not what we built.
            stored = read_json(join_uri(spec.output_uri, PREPARE_REPORT))
            if stored is not None:
                return PrepareResult.model_validate(stored)
        return result
    finally:
        out.discard()


@dataclass(frozen=True)
class Staged:
    """An accepted image waiting for its caption: its file stem, the caption given, and the image for a provider."""

    stem: str
    given: str | None
    api_image: ImagePart | None


def _api_image(item: Staged) -> ImagePart:
    """The image a provider captions: every image is staged with one when there is a client to caption with."""
    if item.api_image is None:
        raise ValueError(f"{item.stem} was staged without an image for the captioning provider")
    return item.api_image


def _caption(
    work: PrepareSpec, client: TextClient | None, why_not: str, staged: Sequence[Staged], result: PrepareResult
) -> None:
    """Set every accepted image's caption (see the module docstring for the policy) and `result.captioning`."""
    trigger, accepted = work.trigger_word, result.accepted
    sources = [caption_source(s.given, work.given_captions, client is not None) for s in staged]
    asked = [i for i, source in enumerate(sources) if source == "provider"]
    answers: dict[int, Caption | Exception] = {}
    if client is not None and asked:
        tasks = [CaptionTask(accepted[i].file, partial(_api_image, staged[i])) for i in asked]
        answers = dict(zip(asked, generate_captions(client, tasks, trigger), strict=True))
    refused = next((a for a in answers.values() if isinstance(a, ProviderRefused)), None)
    if refused is not None:
        raise refused
    unavailable = [accepted[i].file for i, a in answers.items() if isinstance(a, ProviderUnavailable)]
    if unavailable:
        first = next(a for a in answers.values() if isinstance(a, ProviderUnavailable))
        raise ProviderUnavailable(
            f"no caption for {len(unavailable)} images ({', '.join(unavailable)}): {first}; the answers for the "
            "others are cached, a retry asks only for these"
        )
    for index, item in enumerate(staged):
        answer = answers.get(index)
        if isinstance(answer, Caption):
            caption = answer
        elif item.given and item.given.strip():
            caption = check_given(item.given, trigger)
        else:
            caption = Caption(trigger, "trigger-only", note=why_not or "no caption given")
        if isinstance(answer, AnswerRejected):
            caption = Caption(caption.text, caption.origin, caption.style_words, f"no usable answer: {answer}")
        image = accepted[index]
        image.caption, image.caption_origin = caption.text, caption.origin
        image.caption_note, image.style_words = caption.note, list(caption.style_words)
    rejected = [accepted[i].file for i, a in answers.items() if isinstance(a, AnswerRejected)]
    if rejected:
        result.warnings.append(
            f"{client.label if client else 'the provider'} gave no usable caption for {', '.join(rejected)}; "
            "the given caption or the trigger word stands in (see captions)"
        )
    result.captioning = captioning_summary(work, client, why_not, accepted)


def captioning_summary(
    work: PrepareSpec, client: TextClient | None, why_not: str, accepted: Sequence[AcceptedImage]
) -> str:
    counts: dict[str, int] = {}
    for image in accepted:
        counts[image.caption_origin] = counts.get(image.caption_origin, 0) + 1
    tally = ", ".join(f"{n} {origin}" for origin, n in counts.items())
    if client is None:
        return f"{tally}: no captioning provider ({why_not})"
    return f"{tally} by {client.label}"


def _profile(client: TextClient, kept: Sequence[KeptImage], staged: Sequence[Staged], result: PrepareResult) -> None:
    """The L1 STYLE_PROFILE from a diverse subset; an unusable answer leaves a warning, not a failed board."""
    from .text.profile import diverse_subset, extract_profile

    chosen = diverse_subset([k.dhash for k in kept])
    images = [staged[i].api_image for i in chosen]
    try:
        profile = extract_profile(client, [i for i in images if i is not None])
    except AnswerRejected as exc:
        result.style_profile_error = str(exc)
        result.warnings.append(f"no style profile: {exc}; generation will use prompts as written")
        return
    result.style_profile = profile
    result.style_profile_images = [kept[i].file for i in chosen]


def _build_dataset(
    work: PrepareSpec, out: ArtifactDir, result: PrepareResult, *, api_images: bool
) -> tuple[list[KeptImage], list[Staged], int]:
    """Fetch, validate and stage each image in order; returns (kept images, their captions to settle, images over
    the cap). `api_images`: also keep a downscaled copy of each for the captioning provider."""
    kept: list[KeptImage] = []
    staged: list[Staged] = []
    over_limit = 0
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
            reason = exc.reason if isinstance(exc, FetchError) else str(exc)
            log.info("image %d/%d rejected: %s: %s", position, total, item.shown, reason)
            retryable = isinstance(exc, FetchError) and exc.retryable
            result.rejected.append(Rejection(source=item.shown, reason=reason, retryable=retryable))
            continue
        except Exception as exc:  # a bug or an odd input must cost one image, not the board
            log.exception("image %d/%d failed unexpectedly: %s", position, total, item.shown)
            result.rejected.append(Rejection(source=item.shown, reason=f"unexpected error: {type(exc).__name__}"))
            continue
        del data
        refused, cropped = aspect_check(image.width, image.height)
        if refused:
            log.info("image %d/%d rejected: %s: %s", position, total, item.shown, refused)
            result.rejected.append(Rejection(source=item.shown, reason=refused))
            continue
        stem = f"{len(kept) + 1:03d}"
        duplicate = find_duplicate(item.shown, image, kept, work.near_duplicate_distance, file=f"{stem}.png")
        if duplicate is not None and duplicate.kind == "exact":
            result.duplicates.append(duplicate)
            result.rejected.append(Rejection(source=item.shown, reason=f"exact duplicate of {duplicate.resembles}"))
            continue
        out.write_bytes(f"{DATASET_DIR}/{stem}.png", image.png)
        staged.append(Staged(stem, item.caption, ImagePart.from_image_bytes(image.png) if api_images else None))
        if duplicate is not None:
            result.duplicates.append(duplicate)
            result.warnings.append(
                f"{stem}.png ({item.shown}) looks like a near copy of {duplicate.resembles_file} "
                f"({duplicate.resembles}), distance {duplicate.distance}; remove one unless both are wanted."
            )
        if cropped:
            result.warnings.append(f"{stem}.png ({item.shown}) {cropped}.")
        kept.append(KeptImage(source=item.shown, file=f"{stem}.png", sha256=image.sha256, dhash=image.dhash))
        result.accepted.append(
            AcceptedImage(
                source=item.shown,
                file=f"{stem}.png",
                width=image.width,
                height=image.height,
                sha256=image.sha256,
                caption=caption_for(work.trigger_word, item.caption)[0],
            )
        )
        log.info("image %d/%d accepted as %s: %s", position, total, stem, item.shown)
    return kept, staged, over_limit


def work(spec: RunSpec, reporter: Reporter, *, retry: RetryPolicy | None = None) -> Outcome:
    """The prepare step in its pod (step.py runs it). `retry` bounds the captioning provider's retries."""
    assert isinstance(spec.work, PrepareSpec)
    reporter.send("Running", f"fetching {len(spec.work.images)} images")
    try:
        result = run_prepare(spec, retry=retry)
    except (ProviderUnavailable, ProviderRefused) as exc:
        # Named, not a stack trace: which images, what the provider said, and (exit code) whether to retry.
        return Outcome(EXIT_FAILED if exc.retryable else EXIT_BAD_SPEC, f"captioning failed: {exc}")
    if result.succeeded:
        return Outcome(EXIT_OK, result.message, result)
    # No usable image and no fetch that a retry could fix: the board itself must change, so don't retry.
    code = EXIT_FAILED if any(r.retryable for r in result.rejected) else EXIT_BAD_SPEC
    return Outcome(code, result.message, result)


def main(spec_path: str, *, retry: RetryPolicy | None = None) -> int:
    """`kleinstyle prepare --spec RUNSPEC`: the StyleBoard's pod; returns its exit code."""
    return run_step(spec_path, "prepare", partial(work, retry=retry))
