"""Gemini through google-genai: one `generateContent` call per `send`, the SDK's own retries off (retry.py retries).

The API version is pinned (SDK releases differ in their default) and the answer is constrained with
`response_json_schema`. A safety block comes back in two shapes, both turned into `Answer.blocked`: the prompt
refused (`promptFeedback.blockReason`, no candidates) or the answer stopped (`finishReason` SAFETY and kin).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import httpx
from google import genai
from google.genai import errors, types

from .providers import Answer, Prompt, ProviderRefused, Usage
from .retry import Transient, parse_duration, parse_retry_after


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


API_VERSION = "v1beta"
# The SDK sends through httpx, or through its fork httpx2 when that is installed: catch the errors of both.
_HTTP_MODULES = [httpx, *([httpx2] if (httpx2 := _optional("httpx2")) else [])]
TIMEOUTS: tuple[type[Exception], ...] = tuple(m.TimeoutException for m in _HTTP_MODULES)
TRANSPORT_ERRORS: tuple[type[Exception], ...] = tuple(m.TransportError for m in _HTTP_MODULES)
RETRY_CODES = frozenset({408, 429, 500, 502, 503, 504})
BLOCKING_FINISH = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE", "OTHER"}
)


class GeminiProvider:
    name = "gemini"

    def __init__(self, api_key: str, model: str, *, base_url: str | None = None, timeout_s: float = 180.0) -> None:
        self.model = model
        options = types.HttpOptions(api_version=API_VERSION, timeout=int(timeout_s * 1000))
        if base_url:
            options.base_url = base_url
        self._client = genai.Client(api_key=api_key, http_options=options)

    def send(self, prompt: Prompt) -> Answer:
        contents: list[Any] = [types.Part.from_bytes(data=i.data, mime_type=i.mime_type) for i in prompt.images]
        contents.append(prompt.text)
        config = types.GenerateContentConfig(
            system_instruction=prompt.system,
            response_mime_type="application/json",
            response_json_schema=dict(prompt.schema),
            temperature=prompt.temperature,
        )
        try:
            response = self._client.models.generate_content(model=self.model, contents=contents, config=config)
        except errors.APIError as exc:
            raise _classified(exc) from None
        except TIMEOUTS as exc:
            raise Transient(f"timed out ({type(exc).__name__})") from None
        except TRANSPORT_ERRORS as exc:
            raise Transient(f"connection failed ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:  # a 200 whose body is not the API's JSON (a proxy's error page, a cut stream)
            raise Transient(f"unreadable response ({exc})") from None
        return _answer(response)


def _classified(exc: errors.APIError) -> Exception:
    """429/408/5xx are worth a retry (with the server's wait); every other error is the request's fault."""
    summary = f"{exc.code} {exc.status or ''}: {exc.message or ''}".strip()
    if exc.code in RETRY_CODES:
        headers = getattr(getattr(exc, "response", None), "headers", None) or {}
        return Transient(f"HTTP {summary}", parse_retry_after(headers) or _retry_info(exc.details))
    hint = " (check the API key)" if exc.code in (401, 403) else " (check the model name)" if exc.code == 404 else ""
    return ProviderRefused(f"gemini refused the request: HTTP {summary}{hint}")


def _retry_info(details: Any) -> float | None:
    """google.rpc.RetryInfo.retryDelay from an error body, which Gemini sends with its 429s."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in error.get("details") or [] if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            return parse_duration(item.get("retryDelay"))
    return None


def _usage(response: types.GenerateContentResponse) -> Usage:
    meta = response.usage_metadata
    if meta is None:
        return Usage()
    output = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
    return Usage(meta.prompt_token_count or 0, output, meta.total_token_count or 0)


def _answer(response: types.GenerateContentResponse) -> Answer:
    usage = _usage(response)
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = getattr(feedback.block_reason, "value", str(feedback.block_reason))
        return Answer(None, usage, "BLOCKED", blocked=f"prompt blocked: {reason}")
    if not response.candidates:
        return Answer(None, usage, "", blocked="no candidates in the answer")
    candidate = response.candidates[0]
    finish = getattr(candidate.finish_reason, "value", str(candidate.finish_reason or ""))
    parts = (candidate.content.parts if candidate.content else None) or []
    text = "".join(p.text for p in parts if p.text and not p.thought)
    if finish in BLOCKING_FINISH:
        return Answer(text or None, usage, finish, blocked=f"answer stopped: {finish}")
    return Answer(text or None, usage, finish)
