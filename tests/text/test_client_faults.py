"""TextClient against loopback servers speaking Gemini's REST protocol (through the real google-genai SDK) and
OpenRouter's chat completions (through httpx): the happy path, each fault, the cache and the token count."""

from __future__ import annotations

import base64
import io
import json
import time
from email.utils import formatdate
from typing import TYPE_CHECKING

import pytest
from kleinstyle.runtime.text.captions import CaptionAnswer, caption_prompt
from kleinstyle.runtime.text.providers import (
    AnswerRejected,
    ImagePart,
    NoApiKey,
    ProviderRefused,
    ProviderUnavailable,
    make_provider,
)
from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import Clients, ModelServer


def image_part(color: tuple[int, int, int] = (200, 30, 30)) -> ImagePart:
    buffer = io.BytesIO()
    Image.new("RGB", (1600, 900), color).save(buffer, "PNG")
    return ImagePart.from_image_bytes(buffer.getvalue())


def ask(client, image: ImagePart | None = None) -> str:
    return client.ask("caption", "v-test", caption_prompt(image or image_part()), CaptionAnswer, "ref-01.png").caption


def test_gemini_request_follows_the_rest_protocol(gemini_server: ModelServer, clients: Clients) -> None:
    gemini_server.script = [gemini_server.answer({"caption": "a red barn beside a field"})]
    client = clients(gemini_server, model="gemini-2.5-pro")

    assert ask(client) == "a red barn beside a field"

    (request,) = gemini_server.requests
    assert request.path == "/v1beta/models/gemini-2.5-pro:generateContent"  # api_version pinned to v1beta
    assert request.headers["x-goog-api-key"] == "test-key"
    parts = request.body["contents"][0]["parts"]
    inline = parts[0]["inlineData"]
    assert inline["mimeType" if "mimeType" in inline else "mime_type"] == "image/jpeg"
    with Image.open(io.BytesIO(base64.urlsafe_b64decode(inline["data"]))) as sent:  # the SDK's encoding
        assert max(sent.size) == 1024  # downscaled before it travels
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    schema = config["responseJsonSchema"]
    assert schema["required"] == ["caption"] and schema["additionalProperties"] is False
    assert "WHAT the image depicts" in request.body["systemInstruction"]["parts"][0]["text"]
    usage = client.ledger.summary()
    assert (usage.calls, usage.prompt_tokens, usage.output_tokens, usage.total_tokens) == (1, 100, 20, 120)


def test_openrouter_request_follows_the_chat_completions_protocol(
    openrouter_server: ModelServer, clients: Clients
) -> None:
    openrouter_server.script = [openrouter_server.answer({"caption": "a red barn beside a field"})]
    client = clients(openrouter_server)

    assert ask(client) == "a red barn beside a field"

    (request,) = openrouter_server.requests
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.body["model"] == "google/gemini-3-flash-preview"
    system, user = request.body["messages"]
    assert system["role"] == "system" and "WHAT the image depicts" in system["content"]
    image = next(p for p in user["content"] if p["type"] == "image_url")
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    fmt = request.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["caption"]["maxLength"] == 400
    assert client.ledger.summary().total_tokens == 120


def test_429_waits_as_long_as_retry_after_says(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [
        model_server.error(429, "quota", headers={"Retry-After": "2"}),
        model_server.error(429, "quota", headers={"Retry-After": formatdate(time.time() + 3, usegmt=True)}),
        model_server.answer({"caption": "a boat"}),
    ]
    client = clients(model_server)

    assert ask(client) == "a boat"
    assert len(model_server.requests) == 3
    assert clients.sleeps[0] == pytest.approx(2.0)  # the jitter (at most 0.05 s here) never shortens it
    assert 1.5 < clients.sleeps[1] <= 3.1  # an HTTP date, counted from now


def test_gemini_retry_info_in_the_error_body_is_honoured(gemini_server: ModelServer, clients: Clients) -> None:
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "4s"}
    gemini_server.script = [
        gemini_server.error(429, "Resource has been exhausted", details=[retry_info]),
        gemini_server.answer({"caption": "a boat"}),
    ]
    client = clients(gemini_server)
    assert ask(client) == "a boat"
    assert clients.sleeps == [pytest.approx(4.0)]


def test_a_server_wait_longer_than_the_bound_gives_up_at_once(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.error(429, "daily quota", headers={"Retry-After": "3600"})]
    client = clients(model_server, max_server_wait_s=60)
    with pytest.raises(ProviderUnavailable, match="asked to wait 3600 s") as failure:
        ask(client)
    assert "ref-01.png" in str(failure.value)
    assert len(model_server.requests) == 1 and clients.sleeps == []


def test_a_5xx_storm_ends_in_a_clear_retryable_error(model_server: ModelServer, clients: Clients) -> None:
    model_server.respond = lambda request: model_server.error(503, "overloaded")
    client = clients(model_server, attempts=4)
    with pytest.raises(ProviderUnavailable, match=r"ref-01\.png.*503.*gave up after 4 attempts") as failure:
        ask(client)
    assert failure.value.retryable
    assert len(model_server.requests) == 4 and len(clients.sleeps) == 3
    assert all(0 <= s <= 0.05 for s in clients.sleeps)  # full jitter under the (test-sized) cap


def test_timeouts_are_retried_and_bounded(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.reply(action="hang", delay=5)] * 2
    model_server.respond = lambda request: model_server.answer({"caption": "a boat"})
    client = clients(model_server, timeout_s=0.3)
    started = time.monotonic()
    assert ask(client) == "a boat"
    assert len(model_server.requests) == 3 and time.monotonic() - started < 4


def test_a_hanging_provider_never_hangs_the_caller(model_server: ModelServer, clients: Clients) -> None:
    model_server.respond = lambda request: model_server.reply(action="hang", delay=5)
    client = clients(model_server, timeout_s=0.2, attempts=2)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="timed out"):
        ask(client)
    assert time.monotonic() - started < 3


def test_a_reset_connection_is_retried(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.reply(action="reset")]
    model_server.respond = lambda request: model_server.answer({"caption": "a boat"})
    client = clients(model_server)
    assert ask(client) == "a boat"
    assert len(model_server.requests) == 2


def test_a_wrong_key_is_refused_without_retries(model_server: ModelServer, clients: Clients) -> None:
    client = clients(model_server)
    client.provider = make_provider(model_server.protocol, env={**model_server.env, **wrong_key(model_server)})
    with pytest.raises(ProviderRefused, match="check the API key") as failure:
        ask(client)
    assert not failure.value.retryable and len(model_server.requests) == 1


def wrong_key(server: ModelServer) -> dict[str, str]:
    return {"GEMINI_API_KEY": "nope"} if server.protocol == "gemini" else {"OPENROUTER_API_KEY": "nope"}


def test_an_unknown_model_is_refused(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.error(404, "models/gemini-9 is not found")]
    with pytest.raises(ProviderRefused, match="check the model name"):
        ask(clients(model_server))


def test_malformed_json_is_asked_again_with_the_problem_named(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer('{"caption": "a bo'), model_server.answer({"caption": "a boat"})]
    client = clients(model_server)
    assert ask(client) == "a boat"
    first, second = model_server.requests
    assert "rejected: malformed JSON" in second.text and "rejected" not in first.text
    assert client.ledger.summary().calls == 2  # both answers were paid for


def test_a_fenced_json_answer_is_accepted(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer('```json\n{"caption": "a boat"}\n```')]
    assert ask(clients(model_server)) == "a boat"


def test_answers_breaking_the_schema_twice_are_rejected(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer({"title": "a boat"}), model_server.answer({"caption": ""})]
    with pytest.raises(AnswerRejected, match=r"ref-01\.png.*2 tries.*breaks the schema \(caption") as failure:
        ask(clients(model_server))
    assert not failure.value.retryable
    assert "breaks the schema (caption: Field required)" in model_server.requests[1].text


def test_a_safety_block_is_asked_again_then_rejected(model_server: ModelServer, clients: Clients) -> None:
    model_server.respond = lambda request: model_server.blocked()
    with pytest.raises(AnswerRejected, match="blocked it") as failure:
        ask(clients(model_server))
    assert "SAFETY" in str(failure.value)
    assert len(model_server.requests) == 2


def test_gemini_answer_stopped_for_safety(gemini_server: ModelServer, clients: Clients) -> None:
    stopped = {"candidates": [{"finishReason": "SAFETY", "index": 0}], "usageMetadata": {"promptTokenCount": 5}}
    gemini_server.script = [gemini_server.reply(body=stopped), gemini_server.answer({"caption": "a boat"})]
    assert ask(clients(gemini_server)) == "a boat"
    assert "answer stopped: SAFETY" in gemini_server.requests[1].text


def test_openrouter_upstream_error_inside_a_200_is_retried(openrouter_server: ModelServer, clients: Clients) -> None:
    upstream = openrouter_server.reply(body={"error": {"code": 502, "message": "upstream provider returned an error"}})
    openrouter_server.script = [upstream, openrouter_server.answer({"caption": "a boat"})]
    client = clients(openrouter_server)
    assert ask(client) == "a boat"
    assert len(clients.sleeps) == 1


def test_a_non_json_body_is_retried(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.reply(body=b"<html>bad gateway</html>")]
    model_server.respond = lambda request: model_server.answer({"caption": "a boat"})
    assert ask(clients(model_server)) == "a boat"


def test_cached_answers_are_free_across_restarts(model_server: ModelServer, clients: Clients) -> None:
    model_server.script = [model_server.answer({"caption": "a boat"})]
    image = image_part()
    assert ask(clients(model_server), image) == "a boat"

    restarted = clients(model_server)  # a new process: same cache folder, nothing in memory
    assert ask(restarted, image) == "a boat"
    assert len(model_server.requests) == 1
    usage = restarted.ledger.summary()
    assert (usage.calls, usage.cached_calls, usage.total_tokens) == (0, 1, 0)

    other = image_part((10, 200, 10))  # another image is another key
    model_server.script = [model_server.answer({"caption": "a field"})]
    assert ask(restarted, other) == "a field"
    assert len(model_server.requests) == 2


def test_a_damaged_cache_entry_is_asked_again(model_server: ModelServer, clients: Clients) -> None:
    from pathlib import Path

    model_server.respond = lambda request: model_server.answer({"caption": "a boat"})
    image = image_part()
    ask(clients(model_server), image)
    (entry,) = Path(clients.cache_dir).glob("*.json")
    entry.write_text(json.dumps({"key": entry.stem, "answer": {"title": "not a caption"}}))
    assert ask(clients(model_server), image) == "a boat"
    assert len(model_server.requests) == 2
    assert json.loads(entry.read_text())["answer"] == {"caption": "a boat"}


def test_no_key_is_named() -> None:
    with pytest.raises(NoApiKey, match="GEMINI_API_KEY or GOOGLE_API_KEY"):
        make_provider("gemini", env={})
    assert make_provider("gemini", env={"GOOGLE_API_KEY": "k"}).model == "gemini-2.5-pro"
    with pytest.raises(NoApiKey, match="OPENROUTER_API_KEY"):
        make_provider("openrouter", env={"GEMINI_API_KEY": "k"})
