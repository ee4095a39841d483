"""L1, style extraction: 1-10 reference images become a STYLE_PROFILE (the reference document's structure).

MUST_APPLY holds what every generation must carry (colour with its mood, texture, lighting, mood); ENRICH what to
add when the scene allows (signature elements, wardrobe language, environment, camera); PROMPT_SUFFIX_MUST is
appended to every prompt and PROMPT_SUFFIX_ENRICH when the scene is compatible. The profile is asked for as
structured output and validated; its field names are the document's, in the answer, in profile.json and in the
StyleBoard's status alike. Every field is bounded, so a profile is at most about 8 KiB and always fits the status.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class _Section(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


def _text(description: str, max_length: int = 800) -> dict[str, Any]:
    """Field bounds of one profile text: 8 fields of 800 and 2 of 400 characters keep a profile under 8 KiB."""
    return {"min_length": 2, "max_length": max_length, "description": description}


class MustApply(_Section):
    """Non-negotiable visual elements: every generation carries them."""

    color: str = Field(alias="COLOR", **_text("The exact palette, its saturation, and the mood the colours carry."))
    texture: str = Field(alias="TEXTURE", **_text("Fabric, surface and material quality."))
    lighting: str = Field(alias="LIGHTING", **_text("Quality, direction and colour temperature of the light."))
    mood: str = Field(alias="MOOD", **_text("Emotional tone and atmosphere."))


class Enrich(_Section):
    """Elements added when compatible with the user's content."""

    signature_elements: str = Field(
        alias="SIGNATURE_ELEMENTS", **_text("Distinctive recurring props or devices; kept in every generation.")
    )
    wardrobe_language: str = Field(alias="WARDROBE_LANGUAGE", **_text("Specific fabrics, silhouettes and accessories."))
    environment: str = Field(alias="ENVIRONMENT", **_text("Characteristic settings."))
    camera: str = Field(alias="CAMERA", **_text("Film stock, lens choice, depth of field."))


class StyleProfile(_Section):
    """The STYLE_PROFILE of a board (the reference document's L1 output)."""

    must_apply: MustApply = Field(alias="MUST_APPLY", description="Non-negotiable visual elements.")
    enrich: Enrich = Field(alias="ENRICH", description="Elements added when compatible with the user's content.")
    prompt_suffix_must: str = Field(
        alias="PROMPT_SUFFIX_MUST", **_text("Appended to every prompt: MUST_APPLY as one phrase.", 400)
    )
    prompt_suffix_enrich: str = Field(
        alias="PROMPT_SUFFIX_ENRICH", **_text("Appended when the scene is compatible: ENRICH as one phrase.", 400)
    )

    def document(self) -> dict[str, object]:
        """The profile under the document's names (MUST_APPLY, ...), as profile.json and status hold it."""
        return self.model_dump(mode="json", by_alias=True)


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
