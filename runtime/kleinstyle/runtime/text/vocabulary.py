"""The style-descriptor check: which words in a caption describe how an image looks rather than what it shows.

The caption rule (docs/policy.md#captions): a caption says WHAT is depicted, never HOW it looks, because whatever a
caption names is tied to text tokens instead of being absorbed into the LoRA. The vocabulary below is curated for
precision over recall: a false hit makes the provider re-ask and the cleaner cut words out of a good caption, so
plain colour names ("a white horse", the document's own correct example) and words that are usually content
("shadow", "light" in "a light on the porch") are deliberately absent. What is listed are palette and colour
treatment words, lighting set-ups, moods, media, textures, camera and film terms, art movements and rendering words.
Pure functions; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

# Category -> phrases. A phrase matches as whole words, case-insensitively; a space also matches a hyphen, so
# "depth of field" and "film grain" and "low-key" all match as written or hyphenated.
STYLE_VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour and palette": (
        "palette", "colour palette", "color palette", "colour scheme", "color scheme", "colour grading",
        "color grading", "colour graded", "color graded", "tones", "toned", "hues", "pastel", "pastels",
        "pastel colours", "pastel colors", "monochrome", "monochromatic", "duotone", "sepia", "muted", "saturated",
        "desaturated", "oversaturated", "vibrant", "vivid colours", "vivid colors", "colourful", "colorful",
        "warm tones", "cool tones", "earth tones", "earthy tones", "neon colours", "neon colors", "high contrast",
        "low contrast", "black and white photo", "black and white photograph", "in black and white", "teal and orange",
    ),
    "lighting": (
        "lighting", "backlit", "backlighting", "rim light", "rim lighting", "soft light", "hard light",
        "golden hour", "blue hour", "chiaroscuro", "low key", "high key", "volumetric light", "volumetric lighting",
        "god rays", "studio lighting", "cinematic lighting", "dramatic lighting", "moody lighting", "natural light",
        "ambient light", "diffused light", "harsh light", "lens flare",
    ),
    "mood": (
        "moody", "atmospheric", "atmosphere", "melancholic", "melancholy", "dreamy", "dreamlike", "ethereal",
        "whimsical", "serene", "eerie", "haunting", "nostalgic", "romantic", "mysterious", "ominous", "gloomy",
        "playful mood", "somber", "sombre", "tranquil", "brooding", "evocative", "mood",
    ),
    "medium": (
        "watercolour", "watercolor", "watercolours", "watercolors", "watercolour painting", "watercolor painting",
        "gouache", "gouache painting", "ink painting", "pastel drawing", "oil painting", "acrylic painting",
        "ink drawing", "ink wash", "charcoal drawing", "pencil sketch", "pencil drawing", "linocut",
        "woodcut", "etching", "lithograph", "screen print", "digital painting", "digital art", "illustration",
        "illustrated", "cartoon", "anime", "manga style", "comic style", "collage", "photography",
    ),
    "texture": (
        "grainy", "film grain", "noise texture", "textured", "texture", "brushstrokes", "brush strokes",
        "brushwork", "impasto", "matte", "glossy", "paper texture", "canvas texture", "halftone", "crosshatching",
        "cross hatching", "stippling", "smooth shading", "soft focus",
    ),
    "camera and film": (
        "bokeh", "depth of field", "shallow depth of field", "shallow focus", "wide angle", "telephoto",
        "fisheye", "macro shot", "long exposure", "35mm", "50mm", "85mm", "35mm film", "medium format", "analog",
        "analogue", "polaroid", "kodak", "portra", "ektachrome", "kodachrome", "fujifilm", "cinestill", "film still",
        "film photography", "motion blur", "vignette", "vignetting", "dslr",
    ),
    "art movement": (
        "impressionist", "impressionism", "expressionist", "expressionism", "art nouveau", "art deco", "baroque",
        "rococo", "cubist", "cubism", "surreal", "surrealist", "surrealism", "pop art", "minimalist", "minimalism",
        "ukiyo e", "bauhaus", "renaissance style", "pre raphaelite", "romanticism", "vaporwave", "synthwave",
        "cyberpunk aesthetic", "noir", "film noir", "gothic style", "brutalist", "avant garde", "editorial",
    ),
    "rendering": (
        "render", "rendered", "rendering", "3d render", "cgi", "octane", "unreal engine", "ray traced",
        "photorealistic", "photorealism", "hyperrealistic", "hyperrealism", "hyper detailed", "highly detailed",
        "ultra detailed", "intricate detail", "cel shaded", "cel shading", "low poly", "isometric", "flat design",
        "vector art", "pixel art", "stylized", "stylised", "aesthetic", "cinematic", "8k", "4k", "hdr",
        "masterpiece", "best quality", "trending on artstation", "artstation",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class StyleTerm:
    """One style descriptor found in a text: the words as written and the vocabulary category."""

    text: str
    category: str
    start: int
    end: int


TRIGGER_CATEGORY = "trigger word"


@cache
def _pattern(extra: tuple[str, ...] = ()) -> re.Pattern[str]:
    """One alternation over the whole vocabulary and `extra`, longest phrases first so "film grain" wins over
    "grain"."""
    phrases = sorted({p for items in STYLE_VOCABULARY.values() for p in items} | set(extra), key=len, reverse=True)
    alternatives = "|".join(r"[\s-]+".join(map(re.escape, phrase.split())) for phrase in phrases)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


@cache
def _category_of(extra: tuple[str, ...] = ()) -> dict[str, str]:
    vocabulary = {phrase: category for category, items in STYLE_VOCABULARY.items() for phrase in items}
    return vocabulary | {_normal(phrase): TRIGGER_CATEGORY for phrase in extra}


def _normal(text: str) -> str:
    return " ".join(re.split(r"[\s-]+", text.lower()))


def style_terms(text: str, triggers: tuple[str, ...] = ()) -> list[StyleTerm]:
    """Every style descriptor in `text`, in order of appearance (overlaps resolved to the longest phrase).
    `triggers` count as descriptors too (category "trigger word"): in a caption's text, after the trigger word in
    front, a trigger word ties the style token to whatever it names there."""
    categories = _category_of(triggers)
    return [
        StyleTerm(match.group(0), categories[_normal(match.group(0))], match.start(), match.end())
        for match in _pattern(triggers).finditer(text)
    ]


def style_words(text: str, triggers: tuple[str, ...] = ()) -> list[str]:
    """The distinct style descriptors of `text` (and `triggers` in it) as written (lower case), for messages and
    status."""
    seen: dict[str, None] = {}
    for term in style_terms(text, triggers):
        seen.setdefault(term.text.lower(), None)
    return list(seen)


# Words a cleaned clause may lose its head to: what is left dangling at a clause's end after a cut.
_DANGLING = frozenset(
    {
        "a", "an", "the", "and", "or", "with", "in", "under", "of", "by", "at", "on", "from", "into", "through",
        "its", "their", "his", "her", "this", "that",
        "bathed", "washed", "drenched", "lit", "illuminated", "rendered", "depicted", "shown", "captured", "done",
    }
)  # fmt: skip
_FILLER = _DANGLING | {"very", "slightly", "soft", "softly", "deep", "rich", "bright", "dark", "warm", "cool"}


_ORPHANED_OF = re.compile(r"\b(?:a|an|the)\s+of\s+", re.IGNORECASE)


def _bare(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def clean_caption(text: str, triggers: tuple[str, ...] = ()) -> str:
    """`text` without its style descriptors (and `triggers`): clauses made only of style words go, other clauses
    lose just the descriptors, and words left dangling at a clause's end ("under", "with a") go with them.

    The last resort after a re-ask failed; the result keeps every content word of the original.
    """
    pattern = _pattern(triggers)
    clauses = re.split(r"(\s*[,;]\s*|\.\s+|\s+-\s+)", text.strip())
    kept: list[str] = []
    for index in range(0, len(clauses), 2):
        clause = clauses[index]
        separator = clauses[index + 1] if index + 1 < len(clauses) else ""
        if pattern.search(clause):
            while pattern.search(clause):  # a cut can join words into a new phrase ("soft golden-hour light")
                clause = pattern.sub(" ", clause)
            clause = _ORPHANED_OF.sub("", clause)  # "a watercolor painting of a fox" -> "a fox"
            words = clause.split()
            while words and (_bare(words[-1]) in _DANGLING or not _bare(words[-1])):
                words.pop()
            if all(_bare(w) in _FILLER or not _bare(w) for w in words):
                continue  # nothing but style (and filler) in this clause
            clause = " ".join(words)
        if clause.strip():
            kept.append(clause.strip() + separator)
    result = "".join(kept).strip()
    return re.sub(r"[\s,;]+$", "", result).strip()
