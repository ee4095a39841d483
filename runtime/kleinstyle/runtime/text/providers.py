"""What the text pipeline asks a model, what comes back, and which provider answers.

Two providers, one interface (`Provider.send`: one HTTP call, no retries):
- `gemini`: Gemini 2.5 Pro through google-genai, REST `POST /v1beta/models/{model}:generateContent` (gemini.py);
- `openrouter`: Gemini 3 Flash through OpenRouter's OpenAI-compatible `POST /api/v1/chat/completions`, with httpx
  (openrouter.py).
Keys come from the environment only (`GEMINI_API_KEY` or `GOOGLE_API_KEY`, `OPENROUTER_API_KEY`; pods get them from
Secrets); `KLEINSTYLE_GEMINI_BASE_URL` and `KLEINSTYLE_OPENROUTER_BASE_URL` point either at a proxy or a test server.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kleinstyle.contract.pod import PROVIDER_KEY_ENV, PROVIDER_URL_ENV
from pydantic import BaseModel

ProviderName = Literal["gemini", "openrouter"]
DEFAULT_MODELS: dict[str, str] = {"gemini": "gemini-2.5-pro", "openrouter": "google/gemini-3-flash-preview"}
# The pod's variable first (a Secret fills it); GOOGLE_API_KEY is Google's own name, for runs on one machine.
KEY_ENV: dict[str, tuple[str, ...]] = {
    "gemini": (PROVIDER_KEY_ENV["gemini"], "GOOGLE_API_KEY"),
    "openrouter": (PROVIDER_KEY_ENV["openrouter"],),
}
BASE_URL_ENV: dict[str, str] = PROVIDER_URL_ENV
DEFAULT_TIMEOUT_S = 180.0  # Gemini 2.5 Pro thinks before it answers; a caption can take a minute
# Images go to the model downscaled: the style and content read the same at this size, and ten references stay
# far below the request size limit.
API_IMAGE_SIDE = 1024
API_IMAGE_QUALITY = 90


class TextError(Exception):
    """A failure of the text pipeline; `retryable` says whether running the step again may help."""

    retryable = False


class ProviderUnavailable(TextError):
    """The provider did not answer after bounded retries (429 storm, 5xx, timeouts, reset connections)."""

    retryable = True


class ProviderRefused(TextError):
    """The provider refused the request itself (bad key, unknown model, invalid request): no retry can help."""


class AnswerRejected(TextError):
    """Every answer to one request was unusable (malformed JSON, breaking the schema, blocked for safety)."""


class NoApiKey(TextError):
    """No key for the provider in the environment."""


@dataclass(frozen=True)
class ImagePart:
    """An image as sent to a model, with the hash of the image it came from (the cache key uses that)."""

    data: bytes
    mime_type: str
    source_sha256: str

    @classmethod
    def from_image_bytes(cls, data: bytes, side: int = API_IMAGE_SIDE) -> ImagePart:
        """A JPEG of at most `side` pixels on the long side, from any image Pillow reads (a dataset PNG)."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=API_IMAGE_QUALITY)
        return cls(buffer.getvalue(), "image/jpeg", hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Prompt:
    """One request: a system instruction, user text, images, and the JSON schema the answer must follow."""

    system: str
    text: str
    schema: Mapping[str, Any]
    schema_name: str
    images: tuple[ImagePart, ...] = ()
    temperature: float = 0.4

    def with_note(self, note: str) -> Prompt:
        """The same request with a note appended (why the previous answer was rejected)."""
        return dataclasses.replace(self, text=f"{self.text}\n\n{note}")


@dataclass(frozen=True)
class Usage:
    """Tokens of one call, as the provider counted them (output includes thinking tokens: they are billed)."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
        )


@dataclass(frozen=True)
class Answer:
    """What one call returned: the text, or why there is none (`blocked`: a safety or policy refusal)."""

    text: str | None
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = ""
    blocked: str | None = None


class Provider(Protocol):
    name: str
    model: str

    def send(self, prompt: Prompt) -> Answer:
        """One call: raises retry.Transient for what a retry may fix, ProviderRefused for what it cannot."""
        ...


def answer_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema a provider constrains its answer to: references inlined, titles dropped, and every object
    closed with all properties required (what OpenRouter's strict mode demands and Gemini accepts)."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            siblings = {key: value for key, value in node.items() if key != "$ref"}  # the field's own description
            return convert({**copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]]), **siblings})
        out = {key: convert(value) for key, value in node.items() if key != "title"}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
            out["required"] = list(out["properties"])
        return out

    schema: dict[str, Any] = convert(raw)
    return schema


def api_key(provider: str, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return next((env[name].strip() for name in KEY_ENV[provider] if env.get(name, "").strip()), None)


def make_provider(
    name: str,
    model: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Provider:
    """The provider `name` with its key and endpoint from `env` (default: the process environment).

    Raises NoApiKey when the key is missing, so a caller can fall back and say why.
    """
    env = os.environ if env is None else env
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown text provider {name!r}: use one of {', '.join(DEFAULT_MODELS)}")
    key = api_key(name, env)
    if key is None:
        raise NoApiKey(f"no API key for {name}: set {' or '.join(KEY_ENV[name])}")
    base_url = env.get(BASE_URL_ENV[name], "").strip() or None
    if name == "gemini":
        from .gemini import GeminiProvider

        return GeminiProvider(key, model or DEFAULT_MODELS[name], base_url=base_url, timeout_s=timeout_s)
    from .openrouter import OpenRouterProvider

    return OpenRouterProvider(key, model or DEFAULT_MODELS[name], base_url=base_url, timeout_s=timeout_s)
