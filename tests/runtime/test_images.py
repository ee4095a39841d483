"""validate_image(), dhash(), hamming(): images generated in-process with Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import pytest
from kleinstyle.runtime.images import ImageRejected, dhash, hamming, validate_image
from PIL import Image

Picture = Callable[..., Image.Image]
Encode = Callable[..., bytes]
LIMITS = {"max_pixels": 64 * 1024 * 1024, "min_short_side": 64}


def rejection(data: bytes, **limits: int) -> str:
    with pytest.raises(ImageRejected) as caught:
        validate_image(data, **{**LIMITS, **limits})
    return str(caught.value)


def png_claiming(width: int, height: int, encode: Encode) -> bytes:
    """A real 1x1 PNG whose header (IHDR, with a valid CRC) claims `width` x `height`."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepts_the_three_formats_as_rgb_png(fmt: str, picture: Picture, encode: Encode) -> None:
    result = validate_image(encode(picture(1), fmt), **LIMITS)
    assert (result.width, result.height, result.source_format) == (96, 80, fmt)
    with Image.open(io.BytesIO(result.png)) as out:
        assert (out.format, out.mode, out.size) == ("PNG", "RGB", (96, 80))


def test_rejects_what_is_not_an_accepted_image(picture: Picture, encode: Encode) -> None:
    assert rejection(b"certainly not an image") == "not a PNG, JPEG or WEBP image"
    assert rejection(encode(picture(1), "GIF")) == "not a PNG, JPEG or WEBP image"
    assert rejection(encode(picture(1), "BMP")) == "not a PNG, JPEG or WEBP image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_rejects_truncated_files(fmt: str, picture: Picture, encode: Encode) -> None:
    data = encode(picture(1, (200, 200)), fmt)
    assert rejection(data[: len(data) // 2]).startswith(f"damaged {fmt} file")


def test_rejects_a_corrupted_png_body(picture: Picture, encode: Encode) -> None:
    data = bytearray(encode(picture(1)))
    data[-30] ^= 0xFF  # inside the image data: the chunk CRC no longer matches
    assert rejection(bytes(data)).startswith("damaged PNG file")


def test_rejects_small_images_by_short_side(picture: Picture, encode: Encode) -> None:
    reason = rejection(encode(picture(1, (600, 500))), min_short_side=512)
    assert reason == "600x500 is too small; the short side must be at least 512 pixels"
    assert validate_image(encode(picture(1, (512, 900))), max_pixels=10**8, min_short_side=512).width == 512


def test_pixel_limit_is_checked_from_the_header(picture: Picture, encode: Encode) -> None:
    assert rejection(encode(picture(1, (700, 700))), max_pixels=400_000) == (
        "700x700 is 490000 pixels; the limit is 400000"
    )
    # Decoding these would need gigabytes; the header alone must decide.
    assert rejection(png_claiming(30_000, 30_000, encode), max_pixels=1_000_000) == (
        "far more pixels than the limit (decompression bomb guard)"
    )
    assert rejection(png_claiming(1500, 1000, encode), max_pixels=1_000_000) == (
        "1500x1000 is 1500000 pixels; the limit is 1000000"
    )


def test_pillow_global_limit_is_left_as_it_was(picture: Picture, encode: Encode) -> None:
    before = Image.MAX_IMAGE_PIXELS
    rejection(png_claiming(30_000, 30_000, encode), max_pixels=1_000_000)
    validate_image(encode(picture(1)), **LIMITS)
    assert before == Image.MAX_IMAGE_PIXELS


def test_exif_orientation_is_applied(encode: Encode) -> None:
    stored = Image.new("RGB", (160, 120), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 80, 120))  # stored left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    result = validate_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert (result.width, result.height) == (120, 160)
    with Image.open(io.BytesIO(result.png)) as out:
        top, bottom = out.getpixel((60, 10)), out.getpixel((60, 150))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_transparency_is_flattened_onto_white(encode: Encode) -> None:
    image = Image.new("RGBA", (80, 80), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 0, 255), (0, 0, 40, 80))
    result = validate_image(encode(image), **LIMITS)
    with Image.open(io.BytesIO(result.png)) as out:
        assert out.getpixel((70, 40)) == (255, 255, 255)
        assert out.getpixel((10, 40)) == (0, 0, 0)


def test_exact_duplicates_share_a_sha256_whatever_the_container(picture: Picture, encode: Encode) -> None:
    as_png = validate_image(encode(picture(3)), **LIMITS)
    as_webp = validate_image(encode(picture(3), "WEBP", lossless=True), **LIMITS)
    other = validate_image(encode(picture(4)), **LIMITS)
    assert as_png.sha256 == as_webp.sha256 != other.sha256


def test_dhash_distance_separates_near_copies_from_different_pictures(picture: Picture, encode: Encode) -> None:
    original = validate_image(encode(picture(5, (320, 240))), **LIMITS)
    brighter = validate_image(encode(picture(5, (320, 240), brightness=12)), **LIMITS)
    recompressed = validate_image(encode(picture(5, (320, 240)), "JPEG", quality=70), **LIMITS)
    resized = validate_image(encode(picture(5, (320, 240)).resize((256, 192))), **LIMITS)
    for near in (brighter, recompressed, resized):
        assert hamming(original.dhash, near.dhash) <= 6
    for seed in range(10, 20):
        different = validate_image(encode(picture(seed, (320, 240))), **LIMITS)
        assert hamming(original.dhash, different.dhash) > 6


def test_dhash_is_64_bits_of_left_right_gradients() -> None:
    rising = Image.linear_gradient("L").rotate(90).resize((90, 80))  # dark left, bright right
    falling = rising.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert dhash(falling) == 2**64 - 1
    assert dhash(rising) == 0
    assert hamming(dhash(falling), dhash(rising)) == 64


def _palette_with_transparent_index() -> Image.Image:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (64, 64), 90), "PNG", (90, 90, 90)),
        (Image.new("I;16", (64, 64), 40000), "PNG", (155, 155, 155)),  # 16-bit scaled, not clipped to white
        (Image.new("LA", (64, 64), (0, 0)), "PNG", (255, 255, 255)),
        (_palette_with_transparent_index(), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    ],
    ids=["L", "I;16", "LA", "P+transparency", "CMYK"],
)
def test_colour_modes_become_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int], encode: Encode) -> None:
    result = validate_image(encode(image, fmt), **LIMITS)
    with Image.open(io.BytesIO(result.png)) as out:
        assert out.mode == "RGB"
        assert all(abs(a - b) <= 2 for a, b in zip(out.getpixel((32, 32)), expected, strict=True))
