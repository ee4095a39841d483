"""The STYLE_PROFILE (L1's output): the structure the reference write-up gives, as a bounded pydantic model.

MUST_APPLY holds what every generation must carry (colour with its mood, texture, lighting, mood); ENRICH what to
add when the scene allows (signature elements, wardrobe language, environment, camera); PROMPT_SUFFIX_MUST is
appended to every prompt and PROMPT_SUFFIX_ENRICH when the scene is compatible. The field names are the write-up's,
in the provider's answer, in profile.json and in status alike. Every field is bounded, so a profile is at most about
8 KiB and always fits a status (docs/policy.md#the-text-pipeline).

Here, not in the runtime, because three places read it: the runtime asks for it and validates the answer, the
StyleBoard's status schema embeds it, and the operator checks a reported profile before showing it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    # The write-up's names (MUST_APPLY, ...) are the field names on the wire, in files and in status.
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True, extra="ignore", frozen=True)


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
    """The STYLE_PROFILE of a board (L1's output, in the write-up's structure: docs/policy.md)."""

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
