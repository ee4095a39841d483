"""`kleinstyle caption | style-profile | reformulate` against a loopback provider, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from kleinstyle.cli.main import main
from PIL import Image

if TYPE_CHECKING:
    from tests.conftest import ModelRequest, ModelServer

PROFILE_DOC = {
    "MUST_APPLY": {"COLOR": "ink blue on cream", "TEXTURE": "paper", "LIGHTING": "flat", "MOOD": "calm"},
    "ENRICH": {"SIGNATURE_ELEMENTS": "none", "WARDROBE_LANGUAGE": "none", "ENVIRONMENT": "hills", "CAMERA": "none"},
    "PROMPT_SUFFIX_MUST": "ink blue on cream paper, flat calm light",
    "PROMPT_SUFFIX_ENRICH": "rolling hills",
}


@pytest.fixture
def board(tmp_path: Path) -> Path:
    folder = tmp_path / "board"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (300, 200), (i * 80, 40, 200 - i * 50)).save(folder / f"ref-{i}.png")
    (folder / "notes.md").write_text("not an image")
    return folder


def serve(server: ModelServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def respond(request: ModelRequest):
        if request.schema_name == "caption":
            return server.answer({"caption": "a hill with a single tree"})
        if request.schema_name == "style_profile":
            return server.answer(PROFILE_DOC)
        words = "bd9style. A man walks over the hills with a dog. " * 12 + PROFILE_DOC["PROMPT_SUFFIX_MUST"]
        return server.answer({"prompt": words})

    server.respond = respond


def test_caption_writes_a_txt_beside_each_image(
    gemini_server: ModelServer, board: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    serve(gemini_server, monkeypatch, tmp_path)
    (board / "ref-2.txt").write_text("a moody hill\n")  # the user's own: kept, flagged

    assert main(["caption", str(board), "--trigger", "bd9style"]) == 0

    assert (board / "ref-0.txt").read_text() == "bd9style. a hill with a single tree\n"
    assert (board / "ref-2.txt").read_text() == "a moody hill\n"
    out = capsys.readouterr()
    assert "ref-2.txt (given): bd9style. a moody hill  [describes style: moody]" in out.out
    assert "gemini (gemini-2.5-pro): 2 calls" in out.err

    # Again, every image into another folder: the two answers already given come from the cache.
    assert main(["caption", str(board), "--trigger", "bd9style", "--overwrite", "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ref-0.txt", "ref-1.txt", "ref-2.txt"]
    assert "1 calls, 2 answers from the cache" in capsys.readouterr().err
    assert len(gemini_server.calls("caption")) == 3


def test_style_profile_then_reformulate(
    openrouter_server: ModelServer, board: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    serve(openrouter_server, monkeypatch, tmp_path)
    profile = tmp_path / "profile.json"

    assert main(["style-profile", str(board), "-o", str(profile), "--provider", "openrouter"]) == 0
    assert json.loads(profile.read_text()) == PROFILE_DOC
    assert openrouter_server.calls("style_profile")[0].image_count == 3

    args = ["reformulate", "--profile", str(profile), "--trigger", "bd9style", "--provider", "openrouter"]
    assert main([*args, "a man walking a dog", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # the first line is style-profile's
    assert result["origin"] == "reformulated" and result["prompt"].endswith(PROFILE_DOC["PROMPT_SUFFIX_MUST"])


def test_commands_fail_clearly_without_a_key_or_images(tmp_path: Path, board: Path, capsys) -> None:
    assert main(["caption", str(board), "--trigger", "bd9style"]) == 2
    assert "no API key for gemini: set GEMINI_API_KEY or GOOGLE_API_KEY" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["style-profile", str(empty), "-o", str(tmp_path / "p.json")]) == 2
    assert "no png, jpg or webp images there" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"MUST_APPLY": {}}')
    assert main(["reformulate", "--profile", str(tmp_path / "bad.json"), "a man"]) == 2
    assert "cannot read the profile" in capsys.readouterr().err


def test_a_provider_outage_exits_1_naming_the_image(
    gemini_server: ModelServer, board: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    serve(gemini_server, monkeypatch, tmp_path)
    gemini_server.respond = lambda request: gemini_server.error(400, "Request contains an invalid argument.")
    assert main(["caption", str(board), "--trigger", "bd9style", "--workers", "1"]) == 2
    assert "ref-0.png: FAILED: gemini refused the request: HTTP 400" in capsys.readouterr().err
