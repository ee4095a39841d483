"""L1, style extraction: 1-10 reference images become a STYLE_PROFILE (`kleinstyle.contract.style_profile`).

The profile is asked for as structured output and validated against the contract's model, whose bounds keep it
under about 8 KiB.
"""

from __future__ import annotations

from collections.abc import Sequence

from kleinstyle.contract.style_profile import StyleProfile

from ..images import hamming
from .client import TextClient
from .providers import ImagePart, Prompt, answer_schema

PROFILE_PROMPT_VERSION = "style-profile-v1"
MAX_REFERENCES = 10
PROFILE_SYSTEM = """\
You are an art director who extracts a reusable visual style from reference images, for an image model that will
apply the style to any subject. Describe the style shared by the references, not their subjects.

MUST_APPLY is non-negotiable, in concrete visual terms an image model understands:
- COLOR: the exact palette (name the colours) with its saturation and contrast and the mood the colours carry;
  say explicitly how saturated it is, so later mood words cannot flatten it.
- TEXTURE: fabric, surface and material quality, grain, brushwork or finish.
- LIGHTING: quality, direction and colour temperature of the light.
- MOOD: the emotional tone and atmosphere.
ENRICH is added when the scene allows:
- SIGNATURE_ELEMENTS: distinctive recurring props or devices (floating objects, surreal devices, motifs).
- WARDROBE_LANGUAGE: specific fabrics, silhouettes and accessories, usable for any gender.
- ENVIRONMENT: the characteristic settings a generic location should become.
- CAMERA: film stock, lens choice, framing and depth of field.
PROMPT_SUFFIX_MUST: one comma-separated phrase of 15 to 40 words that carries MUST_APPLY, appended to every prompt.
PROMPT_SUFFIX_ENRICH: one comma-separated phrase of 10 to 30 words that carries ENRICH.
Each field is one to three sentences. Write "none" for an ENRICH field the references do not show."""
PROFILE_REQUEST = "Extract the style profile of these {count} reference images."


def diverse_subset(hashes: Sequence[int], limit: int = MAX_REFERENCES) -> list[int]:
    """Indexes of at most `limit` images that differ most from each other, in their original order.

    Farthest-point sampling on the 64-bit difference hashes prepare already computes: start from the first image,
    then add the image farthest (Hamming) from everything chosen so far; ties go to the earlier image. Cheap,
    deterministic, and it keeps one of each group of look-alikes before a second of any group.
    """
    if len(hashes) <= limit:
        return list(range(len(hashes)))
    chosen = [0]
    nearest = [hamming(hashes[0], h) for h in hashes]
    while len(chosen) < limit:
        best = max(range(len(hashes)), key=lambda i: (nearest[i], -i))
        chosen.append(best)
        nearest = [min(d, hamming(hashes[best], h)) for d, h in zip(nearest, hashes, strict=True)]
    return sorted(chosen)


def profile_prompt(images: Sequence[ImagePart]) -> Prompt:
    return Prompt(
        system=PROFILE_SYSTEM,
        text=PROFILE_REQUEST.format(count=len(images)),
        schema=answer_schema(StyleProfile),
        schema_name="style_profile",
        images=tuple(images),
        temperature=0.4,
    )


def extract_profile(client: TextClient, images: Sequence[ImagePart], what: str = "style profile") -> StyleProfile:
    """The STYLE_PROFILE of 1-10 references (choose them with `diverse_subset`); raises TextError on failure."""
    if not 1 <= len(images) <= MAX_REFERENCES:
        raise ValueError(f"a style profile takes 1 to {MAX_REFERENCES} references, not {len(images)}")
    return client.ask("style-profile", PROFILE_PROMPT_VERSION, profile_prompt(images), StyleProfile, what)
