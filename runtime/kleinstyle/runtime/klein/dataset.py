"""Reading an ai-toolkit style dataset folder and assigning aspect-ratio buckets.

Layout (what `prepare` writes and ai-toolkit reads): `NNN.png` (or .jpg/.jpeg/.webp) next to `NNN.txt` holding
its caption, trigger word included. Buckets keep each image near `resolution`^2 pixels at its own aspect ratio,
instead of square-cropping away composition that a style LoRA should learn from, and never above the image's own
pixels: an image smaller than the resolution trains at its own size, as ai-toolkit does (it only downscales into
buckets). An upscaled reference would teach the LoRA its interpolation softness as part of the style.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Widest aspect ratio a bucket may have; wider images are centre-cropped to it (prepare warns of that, and rejects
# images that would lose more than half: runtime.prepare.aspect_check).
MAX_ASPECT = 4.0


class DatasetError(ValueError):
    """The dataset folder cannot be trained on (missing, empty, unreadable); the message says why."""


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    # Trained as its mirror image (left-right): the flip augmentation's copy (`with_mirror_images`).
    mirrored: bool = False


def read_dataset(directory: str | Path) -> list[Sample]:
    """Samples sorted by file name, so that the order (and so every seeded choice) is stable across runs.

    A missing caption file means an empty caption (trained like a dropped caption), with a warning.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    samples = []
    for image in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            log.warning("no caption file for %s; training it with an empty caption", image.name)
            caption = ""
        samples.append(Sample(image=image, caption=caption))
    if not samples:
        raise DatasetError(f"dataset folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def with_mirror_images(samples: list[Sample]) -> list[Sample]:
    """The samples, then a mirrored copy of each: ai-toolkit's `flip_x` (toolkit/data_loader.py at 27a03a91 appends
    a flipped copy of every file item, so an epoch sees each image and its mirror once, with the same caption). The
    image is mirrored when it is read, before it is resized and cropped into its bucket, as there."""
    return [*samples, *(Sample(image=s.image, caption=s.caption, mirrored=True) for s in samples)]


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """All (width, height) buckets: sides multiples of `multiple`, area at most `resolution`^2, aspect <= 4:1.

    For each width the height is the largest multiple that keeps the area within budget, as in kohya's and
    ai-toolkit's bucketing.
    """
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {multiple}")
    area = resolution * resolution
    buckets = set()
    for width in range(multiple, 2 * resolution + 1, multiple):
        height = (area // width) // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= MAX_ASPECT:
            buckets.add((width, height))
    return sorted(buckets)


def training_size(size: tuple[int, int], resolution: int, multiple: int) -> tuple[int, int]:
    """The (width, height) an image of `size` trains at: the bucket closest to its aspect ratio among those of at
    most `resolution`^2 pixels (fewer when the image has fewer) with neither side above the image's, so it is only
    ever downscaled, then centre-cropped to the bucket; sides are multiples of `multiple`, aspect at most 4:1."""
    width, height = size
    budget = max(multiple, min(resolution, math.isqrt(width * height) // multiple * multiple)) ** 2
    buckets = []
    for side in range(multiple, max(width, multiple) + 1, multiple):
        other = min(budget // side, height, int(side * MAX_ASPECT)) // multiple * multiple
        if other >= multiple and max(side / other, other / side) <= MAX_ASPECT:
            buckets.append((side, other))
    return assign_bucket(size, buckets) if buckets else (multiple, multiple)


def held_out(samples: list[Sample], count: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples): `count` references spread evenly over the sorted dataset, so the
    validation set is the same on every pod and for both backends."""
    if count <= 0:
        return samples, []
    if count >= len(samples):
        raise DatasetError(f"cannot hold out {count} of {len(samples)} references and still train")
    picks = {int((k + 0.5) * len(samples) / count) for k in range(count)}
    return [s for i, s in enumerate(samples) if i not in picks], [s for i, s in enumerate(samples) if i in picks]


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to `size`'s (in log space, so 2:1 and 1:2 are equally far from
    1:1); ties go to the larger area."""
    width, height = size
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
