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
import shutil
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


class SafetensorsWriter:
    """A safetensors file written tensor by tensor as they become ready, in any order; whole or not at all.

    The header lists every tensor, so it is known last: space is reserved for it at the start and it is written
    at the end, padded with spaces (the format allows trailing whitespace in the header; the safetensors library
    pads the same way). A header that outgrows the reservation costs one copy of the file, never a wrong one.
    The file is written under a temporary sibling name, fsynced and renamed by `commit`; leaving the `with`
    block without committing removes it.
    """

    def __init__(self, path: str | os.PathLike[str], reserve: int = 1 << 16) -> None:
        self.path = Path(path)
        self.reserve = reserve + (-reserve % 8)  # keep the data 8-byte aligned
        self.entries: dict[str, dict[str, object]] = {}
        self.size = 0
        self._temporary = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(6)}")
        self._handle = self._temporary.open("wb")
        self._handle.seek(8 + self.reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in NAMES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype}")
        if name in self.entries:
            raise ValueError(f"{name}: written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            self._handle.write(flat.view(torch.uint8).numpy().data)
        self.entries[name] = {
            "dtype": NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def commit(self, metadata: Mapping[str, str] | None = None) -> None:
        entries = dict(sorted(self.entries.items()))  # the data is in completion order; list it by name
        header = {"__metadata__": dict(metadata), **entries} if metadata else entries
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(encoded) > self.reserve:
            self._rewrite(encoded)
        else:
            self._handle.seek(0)
            self._handle.write(struct.pack("<Q", self.reserve) + encoded + b" " * (self.reserve - len(encoded)))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._temporary, self.path)
        fsync_path(self.path.parent)

    def _rewrite(self, encoded: bytes) -> None:
        """Copy the data behind a header of its own size (the reservation was too small)."""
        encoded += b" " * (-len(encoded) % 8)
        first = self._temporary.with_name(self._temporary.name + "-data")
        self._handle.close()
        os.replace(self._temporary, first)
        try:
            with first.open("rb") as source:
                source.seek(8 + self.reserve)
                self._handle = self._temporary.open("wb")
                self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
                shutil.copyfileobj(source, self._handle, 16 << 20)
        finally:
            first.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()
        self._temporary.unlink(missing_ok=True)  # gone after a commit; removed when the block failed


def header_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """The exact header length `tensors` (in this order) and `metadata` take."""
    offset, header = 0, {"__metadata__": dict(metadata)} if metadata else {}
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": NAMES.get(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return len(json.dumps(header, separators=(",", ":")).encode("utf-8"))


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (in their order) to `path` whole or not at all: a temporary sibling, fsync, then a rename."""
    with SafetensorsWriter(path, header_size(tensors, metadata)) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.commit(metadata)
