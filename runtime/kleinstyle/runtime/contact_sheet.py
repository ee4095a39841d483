"""A contact sheet: every image of a job in one labelled grid, since people would rather look than read.

A header names what was rendered (model, LoRAs and weights, size, steps, guidance); each cell holds an image scaled
up or down to fit a square thumbnail and, under it, its number, prompt, seed and time, then the prompt actually
rendered, wrapped to a few lines. One row per prompt when the job has several seeds per prompt, else a near-square
grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

THUMB = 256
MARGIN = 16
FONT_SIZE = 13
LINE = FONT_SIZE + 4
CAPTION_LINES = 3
BACKGROUND, INK, FAINT = (250, 250, 248), (20, 20, 20), (110, 110, 110)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Cell:
    image: Image.Image
    title: str
    caption: str


def grid_columns(count: int, per_prompt: int) -> int:
    """Columns for `count` images of `per_prompt` seeds each: a row per prompt, or near square for one seed."""
    if per_prompt > 1:
        return min(per_prompt, 8)
    return max(1, math.ceil(math.sqrt(count)))


def contact_sheet(
    cells: Sequence[Cell], *, columns: int, header: Sequence[str] = (), thumb: int = THUMB
) -> tuple[Image.Image, list[Box]]:
    """The sheet, and where each cell's thumbnail landed (left, top, right, bottom), in the order of `cells`."""
    if not cells:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default(size=FONT_SIZE)
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns)
    cell_w, cell_h = thumb, thumb + LINE * (1 + CAPTION_LINES) + 4
    top = MARGIN + LINE * len(header) + (MARGIN // 2 if header else 0)
    width = MARGIN + columns * (cell_w + MARGIN)
    sheet = Image.new("RGB", (width, top + rows * (cell_h + MARGIN)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, line in enumerate(header):
        draw.text((MARGIN, MARGIN + index * LINE), _fit(line, font, width - 2 * MARGIN), font=font, fill=INK)
    boxes = []
    for index, cell in enumerate(cells):
        x = MARGIN + (index % columns) * (cell_w + MARGIN)
        y = top + (index // columns) * (cell_h + MARGIN)
        picture = ImageOps.contain(cell.image.convert("RGB"), (thumb, thumb), Image.Resampling.LANCZOS)
        left, upper = x + (thumb - picture.width) // 2, y + (thumb - picture.height) // 2
        sheet.paste(picture, (left, upper))
        boxes.append((left, upper, left + picture.width, upper + picture.height))
        draw.text((x, y + thumb + 4), _fit(cell.title, font, cell_w), font=font, fill=INK)
        for line_no, line in enumerate(_wrap(cell.caption, font, cell_w, CAPTION_LINES), start=1):
            draw.text((x, y + thumb + 4 + line_no * LINE), line, font=font, fill=FAINT)
    return sheet, boxes


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, lines: int) -> list[str]:
    """Greedy word wrap to at most `lines` lines; the last one ends in "..." when text is left over."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        out.append(_fit(line, font, width))
    if words and out:
        out[-1] = _fit(out[-1] + " " + " ".join(words), font, width)
    return out
