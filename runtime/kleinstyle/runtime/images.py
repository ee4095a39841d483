"""Turn fetched bytes into a training image, or a reason it cannot be one.

Pure functions over bytes. Only PNG, JPEG and WEBP decoders are ever asked to open the data (a smaller attack
surface than Pillow's every format), the pixel count is checked from the header before anything is decoded
(decompression bombs), and the result is an upright RGB PNG: EXIF orientation applied, transparency flattened onto
white, metadata dropped, so training sees what the user saw and nothing else.

Duplicates: SHA-256 of that PNG finds exact copies (same pixels, whatever the container), and a 64-bit difference
hash (dHash) finds near copies (re-encodes, resizes, small edits) by Hamming distance.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Fast, and the dataset is read a handful of times; level 9 costs seconds per large image for a few percent.
PNG_COMPRESS_LEVEL = 4
_pillow_limit_lock = threading.Lock()


class ImageRejected(Exception):
    """Bytes that are not a usable training image; the message is short and meant for the user."""


@dataclass(frozen=True)
class ValidImage:
    """A validated image ready for the dataset."""

    png: bytes
    width: int
    height: int
    source_format: str
    sha256: str
    dhash: int


def validate_image(data: bytes, *, max_pixels: int, min_short_side: int) -> ValidImage:
    """Validate `data` and convert it to an upright RGB PNG; raises ImageRejected with the reason."""
    with _pillow_pixel_limit(max_pixels), warnings.catch_warnings():
        # Pillow warns between its limit and twice it, and raises above; our own check below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected(f"{width}x{height} is {width * height} pixels; the limit is {max_pixels}")
        try:
            image.verify()  # structural checks (PNG CRCs); leaves the object unusable, so open again
            image = _open(data)
            image.load()
        except ImageRejected:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
            raise ImageRejected(f"damaged {image.format or 'image'} file: {exc}") from None
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF: better refused than trained on sideways
        raise ImageRejected(f"damaged EXIF orientation data: {exc}") from None
    width, height = upright.size
    if min(width, height) < min_short_side:
        raise ImageRejected(f"{width}x{height} is too small; the short side must be at least {min_short_side} pixels")
    rgb = to_rgb(upright)
    buffer = io.BytesIO()
    rgb.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    png = buffer.getvalue()
    return ValidImage(
        png=png,
        width=width,
        height=height,
        source_format=str(image.format),
        sha256=hashlib.sha256(png).hexdigest(),
        dhash=dhash(rgb),
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (dropping alpha would expose arbitrary hidden colours)."""
    if image.mode.startswith("I"):  # 16-bit greyscale PNG: scale to 8 bits (a plain convert clips it to white)
        image = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: a bit per horizontally adjacent pair of a 9x8 greyscale thumbnail (left > right)."""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS, reducing_gap=3.0)
    pixels = small.tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            left, right = pixels[row * 9 + col], pixels[row * 9 + col + 1]
            bits = (bits << 1) | (left > right)
    return bits


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejected("far more pixels than the limit (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageRejected("not a PNG, JPEG or WEBP image") from None
    except Exception as exc:
        raise ImageRejected(f"cannot read image header: {exc}") from None


@contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Align Pillow's own bomb guard with the policy while we decode (it is process-wide, hence the lock)."""
    with _pillow_limit_lock:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous
