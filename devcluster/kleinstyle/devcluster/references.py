"""Reference images for the demo, drawn in one made-up style ("bd9"): a dusk gradient, flat shapes with dark
outlines, and paper grain. Eight subjects match the captions in examples/styleboard.yaml; a thumbnail (too small)
and an exact copy show the prepare step's rejections."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

SIZE = 768
INK = (34, 28, 48)
SKY_TOP, SKY_BOTTOM = (38, 70, 96), (236, 140, 88)
LAND, WATER, WARM, PALE = (58, 92, 74), (44, 96, 122), (232, 96, 64), (246, 222, 170)

Draw = ImageDraw.ImageDraw


def _hills(d: Draw) -> None:
    d.ellipse((-200, 470, 460, 1000), fill=LAND, outline=INK, width=6)
    d.ellipse((260, 520, 980, 1100), fill=(74, 110, 84), outline=INK, width=6)


def _water(d: Draw, top: int = 520) -> None:
    d.rectangle((0, top, SIZE, SIZE), fill=WATER, outline=INK, width=6)


def sun_hills(d: Draw) -> None:
    d.ellipse((290, 160, 480, 350), fill=WARM, outline=INK, width=6)
    _hills(d)


def towers_lake(d: Draw) -> None:
    for i, h in enumerate((330, 420, 280)):
        x = 180 + i * 140
        d.rectangle((x, 520 - h, x + 90, 520), fill=PALE, outline=INK, width=6)
    _water(d)


def boat_moon(d: Draw) -> None:
    d.ellipse((430, 90, 660, 320), fill=PALE, outline=INK, width=6)
    _water(d, 480)
    d.polygon([(240, 560), (480, 560), (440, 620), (280, 620)], fill=WARM, outline=INK, width=6)
    d.line((360, 560, 360, 420), fill=INK, width=6)


def trees_road(d: Draw) -> None:
    d.rectangle((0, 500, SIZE, SIZE), fill=LAND, outline=INK, width=6)
    d.polygon([(330, 500), (438, 500), (640, SIZE), (130, SIZE)], fill=PALE, outline=INK, width=6)
    for x in (70, 180, 560, 670):
        d.polygon([(x, 300), (x - 50, 500), (x + 50, 500)], fill=(40, 80, 60), outline=INK, width=6)


def house_hill(d: Draw) -> None:
    _hills(d)
    d.rectangle((180, 400, 340, 540), fill=PALE, outline=INK, width=6)
    d.polygon([(160, 400), (260, 300), (360, 400)], fill=WARM, outline=INK, width=6)


def bird_field(d: Draw) -> None:
    d.rectangle((0, 560, SIZE, SIZE), fill=(120, 130, 70), outline=INK, width=6)
    d.line((300, 260, 380, 300, 460, 250), fill=INK, width=12, joint="curve")


def mountains_river(d: Draw) -> None:
    d.polygon([(-40, 620), (220, 200), (420, 620)], fill=(90, 96, 120), outline=INK, width=6)
    d.polygon([(340, 620), (560, 250), (820, 620)], fill=(110, 104, 130), outline=INK, width=6)
    d.polygon([(330, SIZE), (380, 620), (420, 620), (470, SIZE)], fill=WATER, outline=INK, width=6)
    d.rectangle((0, 620, 330, SIZE), fill=LAND)
    d.rectangle((470, 620, SIZE, SIZE), fill=LAND)


def lighthouse_shore(d: Draw) -> None:
    _water(d, 560)
    d.polygon([(0, 600), (300, 520), (420, 640), (0, SIZE)], fill=(96, 84, 90), outline=INK, width=6)
    d.polygon([(170, 540), (200, 250), (260, 250), (290, 540)], fill=PALE, outline=INK, width=6)
    d.rectangle((190, 200, 270, 250), fill=WARM, outline=INK, width=6)


SUBJECTS: tuple[Callable[[Draw], None], ...] = (
    sun_hills,
    towers_lake,
    boat_moon,
    trees_road,
    house_hill,
    bird_field,
    mountains_river,
    lighthouse_shore,
)


def draw(subject: Callable[[Draw], None], seed: int) -> Image.Image:
    sky = Image.linear_gradient("L").resize((SIZE, SIZE))
    image = ImageOps.colorize(sky, SKY_TOP, SKY_BOTTOM)
    subject(ImageDraw.Draw(image))
    rng = random.Random(seed)
    grain = Image.effect_noise((SIZE, SIZE), 24).convert("RGB")
    return Image.blend(image, grain, 0.06 + rng.random() * 0.02)


def write_references(folder: Path) -> list[Path]:
    """ref-01..ref-08.png, thumbnail.png (256 px) and ref-01-copy.png; existing files are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, subject in enumerate(SUBJECTS, start=1):
        path = folder / f"ref-{i:02d}.png"
        if not path.exists():
            draw(subject, i).save(path, compress_level=1)
        paths.append(path)
    thumbnail = folder / "thumbnail.png"
    if not thumbnail.exists():
        draw(sun_hills, 99).resize((256, 256)).save(thumbnail, compress_level=1)
    copy = folder / "ref-01-copy.png"
    if not copy.exists():
        shutil.copyfile(paths[0], copy)
    return [*paths, thumbnail, copy]
