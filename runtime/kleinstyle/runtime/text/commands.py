"""`kleinstyle caption`, `kleinstyle style-profile` and `kleinstyle reformulate`: the text pipeline on one machine.

Exit codes as for the steps: 0 done, 1 a failure a retry may fix (the provider unavailable; answers so far are
cached), 2 bad input (no images, no key, a refused key or model, an unreadable profile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_OK

from ..artifacts import write_bytes_atomic
from ..images import ImageRejected, validate_image
from .cache import AnswerCache
from .captions import Caption, CaptionTask, check_given, generate_captions
from .client import TextClient
from .providers import DEFAULT_MODELS, ImagePart, NoApiKey, ProviderRefused, TextError, make_provider

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 64 * 1024 * 1024


def add_provider_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=sorted(DEFAULT_MODELS), default="gemini", help="text provider")
    p.add_argument("--model", help="model name (default: gemini-2.5-pro, google/gemini-3-flash-preview)")
    p.add_argument("--cache", help="answer cache folder (default: $XDG_CACHE_HOME/kleinstyle/text)")
    p.add_argument("--no-cache", action="store_true", help="ask the provider even for answers already cached")


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "kleinstyle" / "text")


def _client(args: argparse.Namespace) -> TextClient:
    provider = make_provider(args.provider, args.model)
    return TextClient(provider, AnswerCache(None if args.no_cache else args.cache or default_cache()))


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_part(path: Path) -> ImagePart:
    return _load(path)[0]


def _load(path: Path) -> tuple[ImagePart, int]:
    """The image as a provider gets it, and its difference hash; ImageRejected when it is not a usable image."""
    valid = validate_image(path.read_bytes(), max_pixels=MAX_PIXELS, min_short_side=1)
    return ImagePart.from_image_bytes(valid.png), valid.dhash


def _usage_line(client: TextClient) -> str:
    u = client.ledger.summary()
    return (
        f"{client.label}: {u.calls} calls, {u.cached_calls} answers from the cache, "
        f"{u.prompt_tokens} prompt + {u.output_tokens} output = {u.total_tokens} tokens"
    )


# --- caption -----------------------------------------------------------------------------------------------------


def caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of images (png, jpg, webp)")
    p.add_argument("--trigger", required=True, help="trigger word that starts every caption, e.g. bd9style")
    p.add_argument("-o", "--output", help="write the NAME.txt files here instead of beside the images")
    p.add_argument("--overwrite", action="store_true", help="caption images that already have a NAME.txt too")
    p.add_argument("--workers", type=int, default=4, help="images captioned at the same time")
    add_provider_args(p)


def caption(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir() or not (paths := _images(folder)):
        return _fail(f"{folder}: no png, jpg or webp images there", EXIT_BAD_SPEC)
    out = Path(args.output) if args.output else folder
    try:
        client = _client(args)
    except NoApiKey as exc:
        return _fail(str(exc), EXIT_BAD_SPEC)
    results: dict[str, Caption | TextError] = {}
    tasks = []
    for path in paths:
        existing = out / f"{path.stem}.txt"
        if existing.is_file() and not args.overwrite:
            results[path.name] = check_given(existing.read_text(encoding="utf-8"), args.trigger)
        else:
            tasks.append(CaptionTask(path.name, partial(_image_part, path)))
    try:
        answers = generate_captions(client, tasks, args.trigger, workers=args.workers)
    except ImageRejected as exc:
        return _fail(f"not a usable image: {exc}", EXIT_BAD_SPEC)
    results.update(zip((t.name for t in tasks), answers, strict=True))
    failed = 0
    for path in paths:
        result = results[path.name]
        if isinstance(result, TextError):
            failed += 1
            print(f"{path.name}: FAILED: {result}", file=sys.stderr)
            continue
        if result.origin != "given":
            write_bytes_atomic(str(out / f"{path.stem}.txt"), (result.text + "\n").encode("utf-8"))
        note = f"  [{result.note}]" if result.note else ""
        print(f"{path.stem}.txt ({result.origin}): {result.text}{note}")
    print(_usage_line(client), file=sys.stderr)
    refused = any(isinstance(r, ProviderRefused) for r in results.values())
    return EXIT_OK if not failed else EXIT_BAD_SPEC if refused else EXIT_FAILED


# --- style-profile -------------------------------------------------------------------------------------------------


def style_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of reference images; more than 10: a diverse subset of 10 is used")
    p.add_argument("-o", "--output", required=True, help="where to write profile.json")
    add_provider_args(p)


def style_profile(args: argparse.Namespace) -> int:
    from .profile import diverse_subset, extract_profile

    folder = Path(args.folder)
    if not folder.is_dir() or not (paths := _images(folder)):
        return _fail(f"{folder}: no png, jpg or webp images there", EXIT_BAD_SPEC)
    try:
        client = _client(args)
        loaded = [_load(path) for path in paths]
    except NoApiKey as exc:
        return _fail(str(exc), EXIT_BAD_SPEC)
    except ImageRejected as exc:
        return _fail(f"not a usable image: {exc}", EXIT_BAD_SPEC)
    chosen = diverse_subset([dhash for _, dhash in loaded])
    try:
        profile = extract_profile(client, [loaded[i][0] for i in chosen])
    except TextError as exc:
        return _fail(f"no style profile: {exc}", EXIT_FAILED if exc.retryable else EXIT_BAD_SPEC)
    write_bytes_atomic(args.output, (json.dumps(profile.document(), indent=2, ensure_ascii=False) + "\n").encode())
    print(f"wrote {args.output} from {', '.join(paths[i].name for i in chosen)}")
    print(_usage_line(client), file=sys.stderr)
    return EXIT_OK


# --- reformulate -------------------------------------------------------------------------------------------------


def reformulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user's prompt")
    p.add_argument("--profile", required=True, help="profile.json from `kleinstyle style-profile`")
    p.add_argument("--trigger", help="trigger word the prompt must start with")
    p.add_argument("--json", action="store_true", help="print the whole result (origin, words, problems) as JSON")
    add_provider_args(p)


def reformulate(args: argparse.Namespace) -> int:
    from kleinstyle.contract.style_profile import StyleProfile
    from pydantic import ValidationError

    from .reformulate import reformulate as run

    try:
        profile = StyleProfile.model_validate_json(Path(args.profile).read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        return _fail(f"cannot read the profile {args.profile}: {exc}", EXIT_BAD_SPEC)
    try:
        client = _client(args)
        result = run(client, profile, args.prompt, args.trigger)
    except NoApiKey as exc:
        return _fail(str(exc), EXIT_BAD_SPEC)
    except TextError as exc:
        return _fail(f"no reformulation: {exc}", EXIT_FAILED if exc.retryable else EXIT_BAD_SPEC)
    print(result.model_dump_json(indent=2) if args.json else result.prompt)
    for problem in result.problems:
        print(f"warning ({result.origin}): {problem}", file=sys.stderr)
    print(_usage_line(client), file=sys.stderr)
    return EXIT_OK
