"""The prepare step with a captioning provider on loopback: captions, the style check, the profile, token usage,
and what a provider outage, a refused key and a restart do to the run."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kleinstyle.contract.runspec import ImageInput, Owner, PrepareSpec, RunSpec
from kleinstyle.runtime.prepare import main, run_prepare
from kleinstyle.runtime.text.retry import RetryPolicy
from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import ModelRequest, ModelServer

OWNER = Owner(kind="StyleBoard", plural="styleboards", namespace="team-a", name="ink", uid="uid-1")
OUTPUT = "/artifacts/team-a/styleboard/ink/uid-1/run1"
FAST = RetryPolicy(attempts=2, base_s=0.001, cap_s=0.002, deadline_s=10)
PROFILE_DOC = {
    "MUST_APPLY": {"COLOR": "ink blue on cream", "TEXTURE": "rough paper", "LIGHTING": "flat", "MOOD": "calm"},
    "ENRICH": {"SIGNATURE_ELEMENTS": "red seal", "WARDROBE_LANGUAGE": "none", "ENVIRONMENT": "hills", "CAMERA": "none"},
    "PROMPT_SUFFIX_MUST": "ink blue on cream, rough paper",
    "PROMPT_SUFFIX_ENRICH": "a red seal",
}  # fmt: skip


def board(rootfs: Path, picture: Callable[..., Image.Image], encode: Callable[..., bytes], *captions: str | None,
          **work: Any) -> RunSpec:  # fmt: skip
    images = []
    for i, caption in enumerate(captions, start=1):
        path = rootfs / f"boards/ref-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(picture(i * 7, (96, 80))))
        images.append(ImageInput(source=f"/boards/ref-{i}.png", caption=caption))
    return RunSpec(
        owner=OWNER,
        output_uri=OUTPUT,
        output_display_uri=f"pvc://artifacts/{OUTPUT}",
        work=PrepareSpec(trigger_word="ink", images=tuple(images), min_short_side=64, captioning_provider="gemini",
                         **work),
    )  # fmt: skip


@pytest.fixture
def provider(gemini_server: ModelServer, monkeypatch: pytest.MonkeyPatch) -> ModelServer:
    for name, value in gemini_server.env.items():
        monkeypatch.setenv(name, value)

    def respond(request: ModelRequest):
        if request.schema_name == "style_profile":
            return gemini_server.answer(PROFILE_DOC)
        return gemini_server.answer({"caption": "a hill with a single tree"})

    gemini_server.respond = respond
    return gemini_server


def test_images_without_captions_are_captioned_and_the_profile_extracted(
    rootfs: Path, provider: ModelServer, picture, encode
) -> None:
    spec = board(rootfs, picture, encode, None, "a watercolor boat, pastel palette", None)
    result = run_prepare(spec, retry=FAST)

    assert result.succeeded
    dataset = rootfs / OUTPUT.lstrip("/") / "dataset"
    assert (dataset / "001.txt").read_text() == "ink. a hill with a single tree\n"
    assert (dataset / "002.txt").read_text() == "ink. a watercolor boat, pastel palette\n"  # the user's, kept
    origins = [(a.file, a.caption_origin, a.style_words) for a in result.accepted]
    assert origins == [
        ("001.png", "generated", []),
        ("002.png", "given", ["watercolor", "pastel", "palette"]),
        ("003.png", "generated", []),
    ]
    assert any("002.png (describes style: watercolor, pastel, palette)" in w for w in result.warnings)
    assert result.captioning == "2 generated, 1 given by gemini (gemini-2.5-pro)"
    assert result.style_profile is not None and result.style_profile.document() == PROFILE_DOC
    assert result.style_profile_images == ["001.png", "002.png", "003.png"]
    assert result.token_usage is not None
    assert (result.token_usage.calls, result.token_usage.total_tokens) == (3, 360)
    report = json.loads((rootfs / OUTPUT.lstrip("/") / "report.json").read_text())
    assert report["style_profile"] == PROFILE_DOC


def test_given_captions_naming_the_trigger_word_are_flagged(rootfs: Path, picture, encode) -> None:
    """The trigger word "ink" in a caption's text ties the style token to ink bottles: listed like style words."""
    spec = board(rootfs, picture, encode, "an ink bottle on a desk", "a boat on a lake")
    result = run_prepare(spec, retry=FAST)  # no key: the given captions are used

    assert [(a.caption, a.style_words) for a in result.accepted] == [
        ("ink. an ink bottle on a desk", ["ink"]),
        ("ink. a boat on a lake", []),
    ]
    assert result.accepted[0].caption_note == "names the trigger word ink in its text"
    (warning,) = [w for w in result.warnings if "trigger word" in w]
    assert warning.startswith("1 given caption names the trigger word 'ink' in its text as well as in front: 001.png;")
    assert not any("how the image looks" in w for w in result.warnings)


def test_fallback_mode_captions_every_image_and_keeps_given_ones_without_a_key(
    rootfs: Path, gemini_server: ModelServer, monkeypatch: pytest.MonkeyPatch, picture, encode
) -> None:
    spec = board(rootfs, picture, encode, "a boat on a lake", None, given_captions="fallback")
    result = run_prepare(spec, retry=FAST)  # no key in the environment
    assert [(a.caption, a.caption_origin) for a in result.accepted] == [
        ("ink. a boat on a lake", "given"),
        ("ink", "trigger-only"),
    ]
    assert result.captioning == (
        "1 given, 1 trigger-only: no captioning provider (no API key for gemini: set GEMINI_API_KEY or GOOGLE_API_KEY)"
    )
    assert result.style_profile is None and result.token_usage is None and gemini_server.requests == []

    for name, value in gemini_server.env.items():
        monkeypatch.setenv(name, value)
    gemini_server.respond = lambda request: (
        gemini_server.answer(PROFILE_DOC)
        if request.schema_name == "style_profile"
        else gemini_server.answer({"caption": "a sailing boat moored at a jetty"})
    )
    spec = board(rootfs, picture, encode, "a boat on a lake", None, given_captions="fallback", max_images=49)
    result = run_prepare(spec, retry=FAST)  # with the key, the provider captions both
    assert [a.caption_origin for a in result.accepted] == ["generated", "generated"]


def test_a_provider_outage_fails_retryably_and_the_retry_pays_only_for_the_rest(
    rootfs: Path, provider: ModelServer, picture, encode
) -> None:
    spec = board(rootfs, picture, encode, None, None, None)
    answered: list[str] = []

    def flaky(request: ModelRequest):
        if request.schema_name == "caption" and len(answered) >= 2:
            return provider.error(503, "The model is overloaded.")
        answered.append(request.schema_name)
        return provider.answer({"caption": "a hill with a single tree"})

    provider.respond = flaky
    spec_path = rootfs / "etc/runspec.json"
    spec_path.parent.mkdir(parents=True)
    spec_path.write_text(spec.to_json())
    (rootfs / "dev").mkdir()

    assert main("/etc/runspec.json", retry=FAST) == 1
    message = (rootfs / "dev/termination-log").read_text()
    # Captions are asked concurrently: whichever image's request came third is the one that failed.
    assert re.search(r"captioning failed: no caption for 1 images \(00[1-3]\.png\)", message) and "503" in message
    assert not (rootfs / OUTPUT.lstrip("/") / "_SUCCESS").exists()  # nothing half-published

    calls_before = len(provider.requests)
    provider.respond = lambda request: (
        provider.answer(PROFILE_DOC)
        if request.schema_name == "style_profile"
        else provider.answer({"caption": "a hill with a single tree"})
    )
    result = run_prepare(spec, retry=FAST)
    assert result.succeeded
    new_calls = provider.requests[calls_before:]
    assert [r.schema_name for r in new_calls] == ["caption", "style_profile"]  # two captions came from the cache
    assert result.token_usage is not None and result.token_usage.cached_calls == 2


def test_a_refused_key_fails_at_once_with_exit_2(
    rootfs: Path, provider: ModelServer, monkeypatch: pytest.MonkeyPatch, picture, encode
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "revoked")
    spec = board(rootfs, picture, encode, None)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/runspec.json").write_text(spec.to_json())
    (rootfs / "dev").mkdir()
    assert main("/etc/runspec.json", retry=FAST) == 2
    assert "gemini refused the request: HTTP 403" in (rootfs / "dev/termination-log").read_text()


def test_an_unusable_answer_falls_back_and_says_so(rootfs: Path, provider: ModelServer, picture, encode) -> None:
    provider.respond = lambda request: provider.blocked()
    spec = board(rootfs, picture, encode, None, "a boat on a lake", given_captions="fallback")
    result = run_prepare(spec, retry=FAST)
    assert result.succeeded
    assert [(a.caption, a.caption_origin) for a in result.accepted] == [
        ("ink", "trigger-only"),
        ("ink. a boat on a lake", "given"),
    ]
    assert "blocked it" in result.accepted[0].caption_note
    assert any("gave no usable caption for 001.png, 002.png" in w for w in result.warnings)
    assert result.style_profile is None and "no style profile" in " ".join(result.warnings)
