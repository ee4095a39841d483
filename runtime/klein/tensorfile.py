"""safetensors files without copies: tensors read as views of a memory map, written straight from their memory.

`safetensors.torch.load_file` copies every tensor out of the file and `save_file` serialises into a buffer first;
for LoRA fusion, where a 9B model's three inputs are half a gigabyte and the arithmetic is a fraction of a second,
those copies are a large part of the time. The format is simple (an 8-byte little-endian header length, a JSON
header of dtype, shape and byte range per tensor plus optional string metadata, then the raw bytes), so reading a
file here is parsing the header and viewing the map: pages load on first touch and stay shared with the page cache.
Written files are byte-compatible with the safetensors library (tested both ways).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..paths import fsync_path

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class TensorFileError(ValueError):
    """Not a readable safetensors file; the message names the file and what is wrong."""


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; the tensors are read-only views of a memory map of the file."""
    path = Path(path)
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise TensorFileError(f"{path}: not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(MAX_HEADER, size - 8):
            raise TensorFileError(f"{path}: not a safetensors file (header length {length} for a {size}-byte file)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise TensorFileError(f"{path}: the safetensors header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise TensorFileError(f"{path}: the safetensors header is not a JSON object")
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + length else None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
    start = 8 + length
    tensors = {name: _view(path, name, entry, data, start, size) for name, entry in header.items()}
    return tensors, dict(metadata)


def _view(path: Path, name: str, entry: object, data: mmap.mmap | None, start: int, size: int) -> torch.Tensor:
    if not isinstance(entry, dict):
        raise TensorFileError(f"{path}: {name}: header entry is not an object")
    dtype = DTYPES.get(str(entry.get("dtype")))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise TensorFileError(f"{path}: {name}: unsupported dtype {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TensorFileError(f"{path}: {name}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"{path}: {name}: bad data_offsets {offsets!r}")
    begin, end = offsets
    count = 1
    for dim in shape:
        count *= dim
    if not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
        raise TensorFileError(f"{path}: {name}: byte range {offsets} does not hold a {shape} {entry['dtype']} tensor")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    assert data is not None
    offset = start + begin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": the views are read-only by design
        if offset % dtype.itemsize:  # a writer that did not align its tensors: copy this one
            raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=offset).clone()
            return raw.view(dtype).view(shape)
        return torch.frombuffer(data, dtype=dtype, count=count, offset=offset).view(shape)


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (in their order) to `path` whole or not at all: a temporary sibling, fsync, then a rename."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in NAMES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype}")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned, as the safetensors library does
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        with temporary.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for tensor in tensors.values():
                if tensor.numel():
                    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                    handle.write(flat.view(torch.uint8).numpy().data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(path.parent)
