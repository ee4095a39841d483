"""A complete STYLE_PROFILE (the L1 answer), as the text pipeline returns it, for tests that carry one along."""

from __future__ import annotations

from typing import Any

PROFILE: dict[str, Any] = {
    "MUST_APPLY": {"COLOR": "red and white", "TEXTURE": "matte paper", "LIGHTING": "soft daylight", "MOOD": "calm"},
    "ENRICH": {
        "SIGNATURE_ELEMENTS": "floating lanterns",
        "WARDROBE_LANGUAGE": "linen",
        "ENVIRONMENT": "a quiet harbour",
        "CAMERA": "35 mm film",
    },
    "PROMPT_SUFFIX_MUST": "red and white palette, matte paper texture, soft daylight, calm mood",
    "PROMPT_SUFFIX_ENRICH": "floating lanterns, quiet harbour, 35 mm film",
}
