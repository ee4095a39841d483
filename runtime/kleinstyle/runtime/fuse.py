"""The LoRAFusion step and `kleinstyle fuse`: read LoRAs, check that they fit, fuse them, publish the result whole.

Two ways in, one code path (`fuse_files`):
- `kleinstyle fuse --method svd --rank 32 -o OUT.safetensors A.safetensors[:WEIGHT] ...` on one machine: the result
  goes to OUT atomically (a temporary sibling, fsync, rename) and a summary to stdout;
- `kleinstyle fuse --spec RUNSPEC.json` in a LoRAFusion's Job: sources and settings from the RunSpec, the result
  published under the run's `output_uri` (a pod path or an object store) as `lora.safetensors` with its sidecar
  `lora.json`, `metadata.json` and the `_SUCCESS` marker, all at once (runtime.artifacts); the result then goes to
  the owner's `status.progress`, from which the operator fills loraURI, rank, energyKept and durationSeconds.
The fused file is the artifact format (`klein-diffusers-v1`, runtime.klein.lora_format); its safetensors metadata
records the method, the inputs and the rank and energy kept of every layer.
Exit codes: 0 fused; 2 input that can never fuse (a missing or unreadable file, an unknown key, LoRAs that do not
fit together, settings that contradict each other); 1 anything a retry may fix.
Heavy imports (torch, the RunSpec models, the HTTP client) happen inside the functions that need them, so that the
command line spends its time fusing.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kleinstyle.contract.layout import LORA_FILE, LORA_SIDECAR
from kleinstyle.contract.pod import EXIT_BAD_SPEC, EXIT_OK

from .errors import BadInput

if TYPE_CHECKING:
    from kleinstyle.contract.runspec import RunSpec

    from .klein.lora_fuse import Fused, FusedLayer, Selection
    from .klein.lora_io import LoraFile
    from .step import Outcome, Reporter

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # --dtype -> safetensors


@dataclass(frozen=True)
class Input:
    uri: str  # a local path, a pod path or an fsspec URI (s3://, gs://)
    weight: float = 1.0


def parse_input(text: str) -> Input:
    """`PATH[:WEIGHT]`: the part after the last colon is a weight when it reads as a number (so s3://... works)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Input(path, float(tail))
        except ValueError:
            pass
    return Input(text)


# ---- the work ---------------------------------------------------------------------------------------------------


def open_lora(uri: str, scratch: Path, index: int) -> LoraFile:
    """Read one input: a path as is (a pod path through the local rootfs), an object-store URI copied to `scratch`
    (artifacts, and the RunSpec models it imports, only then: they take longer to import than a fusion's reading)."""
    from .klein.lora_io import LoraFormatError, read_lora
    from .klein.tensorfile import TensorFileError
    from .paths import is_remote, local_path

    try:
        if is_remote(uri):
            from .artifacts import local_copy

            path = local_copy(uri, scratch, f"{index}-{PurePosixPath(uri).name}")
        else:
            path = local_path(uri)
        return read_lora(path, label=uri)
    except FileNotFoundError as exc:
        raise BadInput(f"{uri}: no such LoRA file") from exc
    except IsADirectoryError as exc:
        raise BadInput(f"{uri}: is a directory, not a LoRA file") from exc
    except (LoraFormatError, TensorFileError) as exc:
        raise BadInput(str(exc)) from exc


def fuse_files(
    inputs: Sequence[Input],
    target: Path,
    method: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    selection: Selection = "hard",
    dtype: str | None = None,
    scratch: Path,
) -> tuple[Fused, dict[str, Any]]:
    """Read and fuse `inputs` into the safetensors file `target`, each layer written as soon as it is done (the
    writing overlaps the arithmetic) and the file renamed into place whole; (result, summary). BadInput for
    anything a retry cannot fix."""
    from .klein.lora_format import COMPONENT_PREFIX
    from .klein.lora_fuse import FusionError, Source, WeightsCancel, fuse
    from .klein.lora_io import IncompatibleLoras
    from .klein.tensorfile import SafetensorsWriter

    started = time.perf_counter()
    if len(inputs) < 2:
        raise BadInput(f"fusion needs at least two LoRAs, got {len(inputs)}")
    if not target.parent.is_dir():
        raise BadInput(f"{target}: folder {target.parent} does not exist")
    loras = [open_lora(item.uri, scratch, index) for index, item in enumerate(inputs)]
    sources = [Source(lora, item.weight) for lora, item in zip(loras, inputs, strict=True)]
    with SafetensorsWriter(target, _header_room(loras, inputs)) as writer:

        def write(module: str, layer: FusedLayer) -> None:
            writer.add(f"{COMPONENT_PREFIX}{module}.lora_A.weight", layer.factors.A)
            writer.add(f"{COMPONENT_PREFIX}{module}.lora_B.weight", layer.factors.B)

        try:
            fused = fuse(
                sources,
                method,
                rank=rank,
                energy=energy,
                selection=selection,
                dtype=DTYPES[dtype] if dtype else None,
                on_layer=write,
            )
        except WeightsCancel as exc:
            where = "spec.sources[].weight of the LoRAFusion, or PATH:WEIGHT for kleinstyle fuse"
            raise BadInput(f"{exc}; change the weights ({where})") from exc
        except (IncompatibleLoras, FusionError) as exc:
            raise BadInput(str(exc)) from exc
        summary = describe(fused, loras, inputs, time.perf_counter() - started)
        writer.commit(header(summary, fused, loras))
    return fused, summary


def _header_room(loras: Sequence[LoraFile], inputs: Sequence[Input]) -> int:
    """A generous guess of the fused file's header size (tensor entries and the fusion record)."""
    modules = {module for lora in loras for module in lora.layers}
    names = sum(len(module) for module in modules)
    return 4096 + 2 * names + 360 * len(modules) + 2 * sum(len(item.uri) + 64 for item in inputs)


def describe(fused: Fused, loras: Sequence[LoraFile], inputs: Sequence[Input], seconds: float) -> dict[str, Any]:
    """What the result is, for the file's metadata, the sidecar and status (JSON-able)."""
    layers = fused.layers
    shares = sorted(layer.energy_kept for layer in layers.values())
    return {
        "method": fused.method,
        "selection": fused.selection,
        "rank": fused.rank,
        "energy_kept": fused.energy_kept,
        "energy_kept_per_layer": {"min": shares[0], "median": shares[len(shares) // 2], "max": shares[-1]},
        "layers": len(layers),
        "base": fused.base,
        "duration_seconds": round(seconds, 3),
        "sources": [
            {"uri": item.uri, "weight": item.weight, "format": lora.format, "rank": lora.max_rank}
            for item, lora in zip(inputs, loras, strict=True)
        ],
        "warnings": _warnings(fused),
    }


def layer_table(fused: Fused) -> dict[str, dict[str, float | int]]:
    return {
        module: {"rank": layer.factors.rank, "energy_kept": round(layer.energy_kept, 6)}
        for module, layer in fused.layers.items()
    }


def _warnings(fused: Fused) -> list[str]:
    if not fused.partial:
        return []
    module, missing = next(iter(fused.partial.items()))
    return [
        f"{len(fused.partial)} of {len(fused.layers)} layers are updated by only some inputs (e.g. {module}, "
        f"absent from {', '.join(missing)}): the others leave them unchanged there"
    ]


def header(summary: dict[str, Any], fused: Fused, loras: Sequence[LoraFile]) -> dict[str, str]:
    """The fused file's safetensors metadata: the artifact format's keys plus what made it."""
    from .klein.lora_format import FORMAT_NAME

    bases = {lora.metadata.get("kleinstyle.base") for lora in loras}
    return {
        "format": "pt",
        "kleinstyle.format": FORMAT_NAME,
        "kleinstyle.rank": str(fused.rank),
        "kleinstyle.base": (bases.pop() if len(bases) == 1 and None not in bases else None) or fused.base or "",
        "kleinstyle.fusion": json.dumps({**summary, "per_layer": layer_table(fused)}, sort_keys=True),
    }


# ---- command line -----------------------------------------------------------------------------------------------


def main_cli(
    inputs: Sequence[str],
    output: str,
    method: str,
    *,
    rank: int | None,
    energy: float | None,
    selection: Selection,
    dtype: str | None,
    per_layer: bool,
) -> int:
    """`kleinstyle fuse` with files named on the command line."""
    started = time.perf_counter()
    items = [parse_input(text) for text in inputs]
    try:
        with tempfile.TemporaryDirectory(prefix="kleinstyle-fuse-") as scratch:
            fused, summary = fuse_files(
                items,
                Path(output),
                method,
                rank=rank,
                energy=energy,
                selection=selection,
                dtype=dtype,
                scratch=Path(scratch),
            )
    except BadInput as exc:
        print(f"kleinstyle fuse: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    seconds = time.perf_counter() - started
    spread = summary["energy_kept_per_layer"]
    print(
        f"fused {len(items)} LoRAs ({method}{f', {selection} selection' if method == 'klora' else ''}) into "
        f"{output}: {summary['layers']} layers, rank {fused.rank}, energy kept {100 * fused.energy_kept:.2f}% "
        f"(per layer {100 * spread['min']:.2f}% to {100 * spread['max']:.2f}%), {seconds:.2f} s"
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if per_layer:
        for module, row in layer_table(fused).items():
            print(f"  {module:<52} rank {row['rank']:>4}  energy kept {100 * row['energy_kept']:7.3f}%")
    return EXIT_OK


# ---- the Job step -----------------------------------------------------------------------------------------------


def work(spec: RunSpec, reporter: Reporter) -> Outcome:
    """The fusion step in its pod (step.py runs it): the RunSpec's sources into its output folder."""
    from kleinstyle.contract.reports import FuseResult
    from kleinstyle.contract.runspec import FuseSpec

    from .artifacts import artifact_dir, artifact_metadata, join_uri, published_metadata, read_json
    from .step import Outcome

    fusion = spec.work
    assert isinstance(fusion, FuseSpec)
    lora_uri = join_uri(spec.output_display_uri, LORA_FILE)
    if published_metadata(spec.output_uri, spec.content_hash()):  # a retry after the result was published
        summary = read_json(join_uri(spec.output_uri, LORA_SIDECAR)) or {}
        result = FuseResult.model_validate({**summary, "lora_file": lora_uri})
        return Outcome(EXIT_OK, f"already fused: {lora_uri}", result)
    started = time.perf_counter()
    items = [Input(source.uri, source.weight) for source in fusion.sources]
    reporter.send("Running", f"fusing {len(items)} LoRAs ({fusion.method})")
    inputs = [{"uri": s.uri, "weight": s.weight} for s in fusion.sources]
    with (
        tempfile.TemporaryDirectory(prefix="kleinstyle-fuse-") as scratch,
        artifact_dir(spec.output_uri, artifact_metadata(spec, inputs)) as out,
    ):
        fused, summary = fuse_files(
            items,
            out.file_path(LORA_FILE),
            fusion.method,
            rank=fusion.rank,
            energy=fusion.energy,
            selection=fusion.selection,
            scratch=Path(scratch),
        )
        summary["duration_seconds"] = round(time.perf_counter() - started, 3)
        out.write_json(LORA_SIDECAR, {**summary, "uri": lora_uri, "per_layer": layer_table(fused)})
    message = (
        f"fused {len(items)} LoRAs ({fusion.method}) into rank {fused.rank}, "
        f"{100 * fused.energy_kept:.1f}% of the energy kept, in {summary['duration_seconds']:.1f} s: {lora_uri}"
    )
    return Outcome(EXIT_OK, message, FuseResult.model_validate({**summary, "lora_file": lora_uri}))


def main(spec_path: str) -> int:
    """`kleinstyle fuse --spec RUNSPEC`: the LoRAFusion's pod; returns its exit code."""
    from .step import run_step

    return run_step(spec_path, "fuse", work)
