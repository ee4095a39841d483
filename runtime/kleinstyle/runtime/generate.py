"""The GenerationJob step, and `kleinstyle generate` on one machine: prompts x seeds -> PNGs, sidecars, a contact sheet.

Output under the run's folder (the RunSpec's `output_uri`, or `-o DIR`):
    images/NNN_pPP_seedS.png    one per prompt and seed; PNG text chunks hold the prompt, the prompt used, seed,
                                LoRAs and weights, model, size, steps and guidance (`pngmeta`)
    images/NNN_pPP_seedS.json   the same record as a sidecar, written after the PNG: an image is done when it exists
    contact_sheet.png           every image in one labelled grid
    generation.json             the whole job: settings, every image, timings, warnings (written last)
Policy, decided here:
- Bad input exits 2 before any model loads: an empty or over-long prompt, a LoRA for another base model (the first
  key or shape that does not fit is named), a missing or incomplete model directory, a size the model cannot
  render. The Job's podFailurePolicy fails at once on it.
- Each image is written atomically as soon as it is rendered; a retried pod of the same RunSpec keeps the images
  already there and renders the rest (a preempted job of 64 images loses at most one).
- The prompt of each image follows the RunSpec's prompt mode (`prompts.prompts_to_render`): raw prompts with the
  trigger words, or the L2 reformulation with a fallback to raw that the result's warnings (and so the status) name.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kleinstyle.contract.layout import CONTACT_SHEET, GENERATION_SUMMARY, IMAGES_DIR, TEXT_CACHE, image_file
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_OK
from kleinstyle.contract.prompt_policy import with_triggers
from kleinstyle.contract.reports import GenerateProgress, GenerateResult, ImageTiming
from kleinstyle.contract.runspec import GenerateSpec, LoraInput, RunSpec
from PIL import Image

from .artifacts import (
    join_uri,
    kleinstyle_version,
    local_copy,
    read_bytes,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from .contact_sheet import Cell, contact_sheet, grid_columns
from .errors import BadInput
from .paths import local_path
from .pngmeta import png_with_metadata
from .prompts import PromptUsed, Reformulator, load_reformulator, prompts_to_render
from .step import Outcome, Reporter, run_step

if TYPE_CHECKING:  # torch is imported only when a job renders
    from .klein.generate import RenderOptions

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000  # the GenerationJob schema's bound, kept by the CLI too


@dataclass
class Rendered:
    """What a job did: the prompts it rendered, per-image seconds (None: kept from an earlier pod), warnings."""

    prompts: list[PromptUsed]
    seconds: list[float | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # URIs of the PNGs, in render order
    contact_sheet: str = ""
    seconds_total: float = 0.0

    def prompts_for_images(self, work: GenerateSpec) -> list[str]:
        return [self.prompts[p].used for p, _, _ in work.image_files()]

    def result(self) -> GenerateResult:
        """The run's result as reported to the owner: small, with no locations (the operator derives those)."""
        return GenerateResult(
            images=[ImageTiming(index=i + 1, seconds=s, reused=s is None) for i, s in enumerate(self.seconds)],
            prompts_used=[p.used for p in self.prompts],
            reformulated=[p.reformulated for p in self.prompts],
            warnings=list(self.warnings),
            seconds_total=round(self.seconds_total, 2),
        )


def work_hash(work: GenerateSpec) -> str:
    """What identifies the job's images: a retry keeps only images carrying this hash."""
    return hashlib.sha256(work.model_dump_json().encode()).hexdigest()[:16]


# --- input checks (before any model loads) -----------------------------------------------------------------------


def check_request(work: GenerateSpec) -> None:
    """The checks that need no model: prompts, seeds, steps, guidance."""
    if not work.prompts:
        raise BadInput("no prompts: give at least one")
    for index, prompt in enumerate(work.prompts, start=1):
        if not prompt.strip():
            raise BadInput(f"prompt {index} is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadInput(f"prompt {index} is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    if not work.seeds:
        raise BadInput("no seeds: give at least one")
    if work.steps < 1:
        raise BadInput(f"steps must be at least 1, not {work.steps}")
    if work.guidance < 0:
        raise BadInput(f"guidance must be 0 or more, not {work.guidance}")


def check_model_and_loras(work: GenerateSpec) -> list[Any]:
    """The model directory complete, the size renderable, every LoRA fitting the transformer: [(LoraFit, weight)]."""
    from .klein.encode import ModelDirError, check_components
    from .klein.generate import SizeError, check_size, size_multiple
    from .klein.lora_check import LoraMismatch, check_lora, transformer_skeleton

    model_dir = local_path(work.model_path)
    try:
        check_components(model_dir)
        check_size(work.width, work.height, size_multiple(model_dir))
        skeleton = transformer_skeleton(model_dir)
        folder = Path(tempfile.gettempdir()) / "kleinstyle-loras"  # LoRAs on an object store are fetched first
        return [
            (check_lora(local_copy(lora.uri, folder, f"{i}-{PurePosixPath(lora.uri).name}"), skeleton), lora.weight)
            for i, lora in enumerate(work.loras)
        ]
    except (ModelDirError, SizeError, LoraMismatch) as exc:
        raise BadInput(str(exc)) from exc


def final_prompts(work: GenerateSpec, reformulator: Callable[[], Reformulator]) -> tuple[list[PromptUsed], list[str]]:
    """The prompt each image renders with, and warnings; over-long raw prompts are bad input, an over-long
    reformulation falls back to the raw prompt."""
    from .klein.generate import MAX_SEQUENCE_LENGTH, PromptTooLong, check_prompt_lengths, prompt_lengths

    model_dir = local_path(work.model_path)
    raw = [with_triggers(p, work.trigger_words) for p in work.prompts]
    try:
        check_prompt_lengths(model_dir, raw)
    except PromptTooLong as exc:
        raise BadInput(str(exc)) from exc
    prompts, warnings = prompts_to_render(work.prompts, work.prompt_mode, work.trigger_words, reformulator)
    lengths = prompt_lengths(model_dir, [p.used for p in prompts])
    for index, (item, length) in enumerate(zip(prompts, lengths, strict=True)):
        if item.reformulated and length > MAX_SEQUENCE_LENGTH:
            warnings.append(f"prompt {index + 1}: the reformulation is {length} tokens, too many; used the raw prompt")
            prompts[index] = PromptUsed(item.prompt, raw[index], False)
    return prompts, warnings


# --- the job -----------------------------------------------------------------------------------------------------


def image_metadata(work: GenerateSpec, prompt: PromptUsed, prompt_index: int, seed: int, job: str) -> dict[str, Any]:
    return {
        "prompt": prompt.prompt,
        "prompt_used": prompt.used,
        "reformulated": prompt.reformulated,
        "seed": seed,
        "prompt_index": prompt_index + 1,
        "loras": [{"lora": lora.shown, "weight": lora.weight} for lora in work.loras],
        "model": work.model_path,
        "width": work.width,
        "height": work.height,
        "steps": work.steps,
        "guidance": work.guidance,
        "negative_prompt": work.negative_prompt,
        "job": job,
        "kleinstyle_version": kleinstyle_version(),
    }


def render_job(
    work: GenerateSpec,
    output_uri: str,
    *,
    reformulator: Callable[[], Reformulator] | None = None,
    options: RenderOptions | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> Rendered:
    """Render every image of `work` into `output_uri` (see the module doc); raises BadInput for bad input.

    `reformulator` builds the L2 reformulation (default: `prompts.load_reformulator`, the seam); `options` are
    `klein.generate.RenderOptions`; `on_image(done, total)` follows progress.
    """
    from .klein import generate as klein

    started = time.perf_counter()
    check_request(work)
    loras = check_model_and_loras(work)
    cache = join_uri(output_uri, TEXT_CACHE)  # a retried pod does not pay for the same reformulation twice
    prompts, warnings = final_prompts(work, reformulator or (lambda: load_reformulator(work, cache_uri=cache)))
    job = work_hash(work)
    plan = work.image_files()
    done = {name: meta for _, _, name in plan if (meta := _finished(output_uri, name, job)) is not None}
    for p, _, name in plan:  # a prompt an earlier pod already rendered keeps the text it rendered with
        if name in done:
            prompts[p] = PromptUsed(prompts[p].prompt, done[name]["prompt_used"], bool(done[name]["reformulated"]))
    rendered = Rendered(prompts=prompts, warnings=warnings)  # the runtime's own; the operator shows work.warnings
    todo = [item for item in plan if item[2] not in done]
    device = klein.default_device()
    sampler = None
    if todo:
        needed = sorted({p for p, _, _ in todo})
        embeds, negative = klein.encode_prompts(
            local_path(work.model_path), [prompts[p].used for p in needed], work.negative_prompt, device
        )
        by_prompt = dict(zip(needed, embeds, strict=True))
        sampler = klein.load_sampler(local_path(work.model_path), loras, options or klein.RenderOptions())
    thumbs: list[Image.Image] = []
    try:
        for count, (p, seed, name) in enumerate(plan, start=1):
            png_uri = join_uri(output_uri, image_file(name))
            if name in done:
                image: Image.Image = Image.open(io.BytesIO(read_bytes(png_uri) or b""))
                seconds = None
            else:
                assert sampler is not None
                tick = time.perf_counter()
                image = sampler.render(
                    by_prompt[p],
                    negative,
                    seed=seed,
                    width=work.width,
                    height=work.height,
                    steps=work.steps,
                    guidance=work.guidance,
                )
                seconds = round(time.perf_counter() - tick, 3)
                meta = {**image_metadata(work, prompts[p], p, seed, job), "seconds": seconds}
                write_bytes_atomic(png_uri, png_with_metadata(image, meta))
                write_json_atomic(join_uri(output_uri, IMAGES_DIR, f"{name}.json"), meta)
                log.info("image %d/%d (prompt %d, seed %d): %.1f s", count, len(plan), p + 1, seed, seconds)
            thumbs.append(_thumbnail(image))
            rendered.seconds.append(seconds)
            rendered.files.append(png_uri)
            if on_image:
                on_image(count, len(plan))
    finally:
        if sampler is not None:
            klein.free(sampler)
    rendered.contact_sheet = write_contact_sheet(work, rendered, thumbs, output_uri)
    rendered.seconds_total = time.perf_counter() - started
    write_json_atomic(join_uri(output_uri, GENERATION_SUMMARY), summary(work, rendered, job))
    return rendered


def _finished(output_uri: str, name: str, job: str) -> dict[str, Any] | None:
    """The sidecar of an image an earlier pod of this job completed (the PNG is written before it)."""
    meta = read_json(join_uri(output_uri, IMAGES_DIR, f"{name}.json"))
    return meta if isinstance(meta, dict) and meta.get("job") == job else None


def _thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((512, 512), Image.Resampling.LANCZOS)  # the sheet's cells are smaller; keeps memory flat
    return thumb


def sheet_header(work: GenerateSpec, prompts: Sequence[PromptUsed]) -> list[str]:
    loras = ", ".join(f"{lora.shown} x{lora.weight:g}" for lora in work.loras) or "none"
    reformulated = sum(p.reformulated for p in prompts)
    return [
        f"{work.model_path}  |  LoRAs: {loras}",
        f"{work.width}x{work.height}, {work.steps} steps, guidance {work.guidance:g}; "
        f"{reformulated} of {len(prompts)} prompts reformulated",
    ]


def write_contact_sheet(work: GenerateSpec, rendered: Rendered, thumbs: Sequence[Image.Image], output_uri: str) -> str:
    cells: list[Cell] = []
    for (p, seed, _), thumb, seconds in zip(work.image_files(), thumbs, rendered.seconds, strict=True):
        took = "" if seconds is None else f", {seconds:.1f} s"
        index = len(cells) + 1
        cells.append(Cell(thumb, f"#{index} prompt {p + 1}, seed {seed}{took}", rendered.prompts[p].used))
    columns = grid_columns(len(cells), len(work.seeds))
    sheet, _ = contact_sheet(cells, columns=columns, header=sheet_header(work, rendered.prompts))
    buffer = io.BytesIO()
    sheet.save(buffer, "PNG")
    uri = join_uri(output_uri, CONTACT_SHEET)
    write_bytes_atomic(uri, buffer.getvalue())
    return uri


def summary(work: GenerateSpec, rendered: Rendered, job: str) -> dict[str, Any]:
    images = [
        {"file": image_file(name), "prompt_index": p + 1, "seed": seed, "seconds": seconds}
        for (p, seed, name), seconds in zip(work.image_files(), rendered.seconds, strict=True)
    ]
    return {
        "step": "generate",
        "job": job,
        "spec": work.model_dump(mode="json"),
        "prompts": [{"prompt": p.prompt, "used": p.used, "reformulated": p.reformulated} for p in rendered.prompts],
        "images": images,
        "contact_sheet": CONTACT_SHEET,
        "warnings": [*work.warnings, *rendered.warnings],
        "seconds_total": round(rendered.seconds_total, 2),
        "kleinstyle_version": kleinstyle_version(),
    }


# --- the Job's entry point ---------------------------------------------------------------------------------------


def work(spec: RunSpec, reporter: Reporter, reformulator: Callable[[], Reformulator] | None = None) -> Outcome:
    """The generate step in its pod (step.py runs it); `reformulator` replaces the L2 seam (tests)."""
    job = spec.work
    assert isinstance(job, GenerateSpec)
    total = len(job.image_files())

    def on_image(done: int, count: int) -> None:
        reporter.update(
            GenerateProgress(images_done=done, images_total=count), f"image {done} of {count}", now=done == count
        )

    reporter.progress = GenerateProgress(images_done=0, images_total=total)
    reporter.send("Running", f"rendering {total} images at {job.width}x{job.height}, {job.steps} steps")
    rendered = render_job(job, spec.output_uri, reformulator=reformulator, on_image=on_image)
    message = f"rendered {total} images; contact sheet at {join_uri(spec.output_display_uri, CONTACT_SHEET)}"
    return Outcome(EXIT_OK, message, rendered.result())


def main(spec_path: str) -> int:
    """`kleinstyle generate --spec RUNSPEC`: the GenerationJob's pod; returns its exit code."""
    return run_step(spec_path, "generate", work)


# --- `kleinstyle generate --model DIR ...` on one machine --------------------------------------------------------


def parse_lora(text: str) -> tuple[str, float]:
    """PATH[:WEIGHT] -> (path, weight); a path containing ':' keeps it when the tail is not a number."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def lora_trigger(path: str) -> str | None:
    """The trigger word a kleinstyle LoRA was trained with, from its sidecar (lora.json beside lora.safetensors)."""
    sidecar = read_json(str(local_path(path).with_suffix(".json")))
    word = sidecar.get("trigger_word") if isinstance(sidecar, dict) else None
    return word if isinstance(word, str) and word else None


def cli_spec(args: Any) -> GenerateSpec:
    """The GenerateSpec of `kleinstyle generate --model ...`: the model's defaults for steps and guidance."""
    from .klein.encode import ModelDirError, check_model_dir
    from .klein.generate import model_defaults

    try:
        defaults = model_defaults(check_model_dir(args.model))
    except ModelDirError as exc:
        raise BadInput(str(exc)) from exc
    if args.count < 1:
        raise BadInput(f"--count must be at least 1, not {args.count}")
    loras = []
    for item in args.lora:
        path, weight = parse_lora(item)
        loras.append(LoraInput(uri=path, weight=weight, trigger_word=lora_trigger(path), label=path))
    triggers = [*args.trigger, *(lora.trigger_word for lora in loras if lora.trigger_word and not args.no_trigger)]
    return GenerateSpec(
        model_path=args.model,
        loras=tuple(loras),
        prompts=tuple(args.prompt),
        negative_prompt=args.negative_prompt,
        trigger_words=tuple(dict.fromkeys(triggers)),
        width=args.width,
        height=args.height,
        steps=int(defaults["steps"] if args.steps is None else args.steps),
        guidance=float(defaults["guidance"] if args.guidance is None else args.guidance),
        seeds=tuple(args.seed + i for i in range(args.count)),
    )


def cli(args: Any) -> int:
    """Render on this machine; print each image's path and the contact sheet's. Exit 2 on bad input."""
    from .klein.generate import RenderOptions

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = RenderOptions(device=args.device, fp8=args.fp8, compile=not args.no_compile, vae_tiling=args.vae_tiling)
    try:
        work = cli_spec(args)
        rendered = render_job(
            work,
            args.output,
            options=options,
            on_image=lambda done, total: print(f"image {done} of {total}", file=sys.stderr, flush=True),
        )
    except BadInput as exc:
        print(f"kleinstyle generate: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    for warning in rendered.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path, item in zip(rendered.files, rendered.prompts_for_images(work), strict=True):
        print(f"{path}  {item}")
    print(f"contact sheet: {rendered.contact_sheet}")
    return EXIT_OK
