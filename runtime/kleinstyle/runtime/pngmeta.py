"""Generated images as PNG files that carry their own provenance in text chunks.

Each field (prompt, prompt used, seed, LoRAs and weights, model, size, steps, guidance, ...) is an iTXt chunk of its
own, readable in any image viewer or `exiftool`, strings as written and everything else as JSON; the `kleinstyle`
chunk holds the whole record as one JSON document, which `read_png_metadata` returns unchanged. iTXt is UTF-8, so
prompts in any script survive.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngImageFile, PngInfo

from .images import PNG_COMPRESS_LEVEL

RECORD_KEY = "kleinstyle"


def png_with_metadata(image: Image.Image, metadata: Mapping[str, Any]) -> bytes:
    """The PNG bytes of `image` with `metadata` in text chunks (JSON-serialisable values)."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    info.add_itxt(RECORD_KEY, json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_png_metadata(source: bytes | str | Path) -> dict[str, Any]:
    """The record `png_with_metadata` wrote; KeyError when the PNG carries none."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        if not isinstance(image, PngImageFile):  # no PNG, no record
            raise KeyError(RECORD_KEY)
        image.load()  # text chunks after the image data are read with it
        record: dict[str, Any] = json.loads(image.text[RECORD_KEY])
        return record
