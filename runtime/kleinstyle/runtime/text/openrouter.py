"""OpenRouter's OpenAI-compatible chat completions over httpx (no SDK): one `POST /chat/completions` per `send`.

Images travel as data URLs; the answer is constrained with `response_format: json_schema` in strict mode. OpenRouter
reports an upstream failure either as an HTTP status or as an `error` object inside a 200 body; a content filter
shows as `finish_reason: content_filter` (the upstream's own reason in `native_finish_reason`).
"""

from __future__ import annotations

import base64
from typing import Any

import httpx

from .providers import Answer, Prompt, ProviderRefused, Usage
from .retry import Transient, parse_retry_after

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
RETRY_CODES = frozenset({408, 429, 500, 502, 503, 504})
BLOCKING_FINISH = frozenset({"content_filter"})


class OpenRouterProvider:
    name = "openrouter"

    def __init__(self, api_key: str, model: str, *, base_url: str | None = None, timeout_s: float = 180.0) -> None:
        self.model = model
        self._url = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/chat/completions"
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(30.0, timeout_s)),
            headers={"Authorization": f"Bearer {api_key}", "X-Title": "kleinstyle"},
        )

    def send(self, prompt: Prompt) -> Answer:
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt.text}]
        for image in prompt.images:
            url = f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}],
            "temperature": prompt.temperature,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": prompt.schema_name, "strict": True, "schema": dict(prompt.schema)},
            },
        }
        try:
            response = self._client.post(self._url, json=body)
        except httpx.TimeoutException as exc:
            raise Transient(f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise Transient(f"connection failed ({type(exc).__name__}: {exc})") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if not response.is_success or error:
            raise _classified(response, error)
        if not isinstance(payload, dict):
            raise Transient(f"unreadable response (HTTP {response.status_code}, not JSON)")
        return _answer(payload)


def _classified(response: httpx.Response, error: Any) -> Exception:
    code = response.status_code
    message = ""
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        if response.is_success and isinstance(error.get("code"), int):
            code = error["code"]  # an upstream failure reported inside a 200
    summary = f"HTTP {code}: {message or response.text[:200]}"
    if code in RETRY_CODES:
        return Transient(summary, parse_retry_after(response.headers))
    hint = " (check the API key)" if code in (401, 403) else " (check the model name)" if code == 404 else ""
    return ProviderRefused(f"openrouter refused the request: {summary}{hint}")


def _answer(payload: dict[str, Any]) -> Answer:
    raw = payload.get("usage") or {}
    usage = Usage(
        int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0), int(raw.get("total_tokens") or 0)
    )
    choices = payload.get("choices") or []
    if not choices:
        return Answer(None, usage, "", blocked="no choices in the answer")
    choice = choices[0]
    if isinstance(choice.get("error"), dict):
        raise Transient(f"upstream error: {choice['error'].get('message', choice['error'])}")
    finish = str(choice.get("finish_reason") or "")
    message = choice.get("message") or {}
    text = message.get("content")
    if isinstance(text, list):  # some upstreams answer with content parts
        text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
    if finish in BLOCKING_FINISH:
        native = choice.get("native_finish_reason") or finish
        return Answer(text or None, usage, finish, blocked=f"answer stopped: {native}")
    if message.get("refusal"):
        return Answer(None, usage, finish, blocked=f"refused: {message['refusal']}")
    return Answer(text or None, usage, finish)
