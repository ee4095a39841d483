"""safetensors files without copies and without torch: tensors read as numpy views of a memory map, written
straight from their memory, tensor by tensor.

LoRA fusion is a few GFLOPs of small matrix products on half a gigabyte of inputs for klein 9B: loading the files
with `safetensors.torch` copies every tensor, and importing torch alone takes longer than the fusion. The format is
simple (an 8-byte little-endian header length, a JSON header of dtype, shape and byte range per tensor plus optional
string metadata, then the raw bytes), so reading a file is parsing the header and viewing the map with numpy: pages
load on first touch and stay shared with the page cache. numpy has no bfloat16, so a tensor travels as `Stored`:
the raw array (bfloat16 as its uint16 bit patterns) and its safetensors dtype, converted to float32 where it is
used and back, rounding to nearest even, when it is written. Files are byte-compatible with the safetensors
library (tested both ways); `Stored.to_torch` and `Stored.from_torch` cross over to torch (a copy only where the
bytes are a read-only map).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..paths import fsync_path

if TYPE_CHECKING:
    import torch

# safetensors dtype -> the numpy dtype its bytes are viewed as
NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
WRITEBACK_EVERY = 32 << 20  # a streamed file starts this much of its data on its way to disk at a time


class TensorFileError(ValueError):
    """Not a readable safetensors file; the message names the file and what is wrong."""


class Stored(NamedTuple):
    """A tensor as safetensors stores it: its bytes as a numpy array and its safetensors dtype name."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def rows(self, start: int, stop: int) -> Stored:
        """Rows start:stop, a view."""
        return Stored(self.data[start:stop], self.dtype)

    def float32(self, out: np.ndarray | None = None) -> np.ndarray:
        """The values as float32, written into `out` (a float32 array or view of this shape) when given; without
        `out`, F32 data is returned as is (a view) and other dtypes converted (bfloat16: its bits moved up)."""
        if self.dtype not in FLOATS:
            raise TypeError(f"a {self.dtype} tensor has no float value")
        if out is None:
            if self.dtype == "F32":
                return np.asarray(self.data)
            out = np.empty(self.data.shape, np.float32)
        if self.dtype == "BF16":
            np.left_shift(self.data, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, self.data, casting="unsafe")
        return out

    @classmethod
    def from_float32(cls, values: np.ndarray, dtype: str) -> Stored:
        """`values` stored as `dtype`; bfloat16 rounds to nearest even like torch (and NaN stays NaN)."""
        values = _contiguous(values, np.float32)
        if dtype == "BF16":
            bits = values.view(np.uint32)
            rounded = bits >> 16
            rounded &= 1
            rounded += 0x7FFF
            rounded += bits  # cannot wrap: the largest finite float32 plus 0x8000 is still below 2**32
            high = np.empty(values.shape, np.uint16)
            high[...] = rounded.view(np.uint16)[..., 1::2] if values.ndim else rounded >> 16  # little-endian halves
            if np.isnan(values.max(initial=0.0)):  # one pass; NaN would round to infinity: keep it a quiet NaN
                nan = np.isnan(values)
                high[nan] = (bits[nan] >> 16) | 0x40
            return cls(high, dtype)
        if dtype not in FLOATS:
            raise TypeError(f"cannot store float values as {dtype}")
        return cls(values.astype(NUMPY[dtype], copy=False), dtype)

    def to_torch(self) -> torch.Tensor:
        """A torch tensor of the same values (copied out of a read-only map: torch tensors are writable)."""
        import torch

        data = self.data if self.data.flags.writeable else self.data.copy()
        tensor = torch.from_numpy(_contiguous(data, data.dtype))
        return tensor.view(torch.bfloat16) if self.dtype == "BF16" else tensor

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> Stored:
        import torch

        names = {
            torch.float64: "F64",
            torch.float32: "F32",
            torch.float16: "F16",
            torch.bfloat16: "BF16",
            torch.int64: "I64",
            torch.int32: "I32",
            torch.int16: "I16",
            torch.int8: "I8",
            torch.uint8: "U8",
            torch.bool: "BOOL",
        }
        if tensor.dtype not in names:
            raise TypeError(f"no safetensors dtype for {tensor.dtype}")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype == torch.bfloat16:
            return cls(tensor.view(torch.int16).numpy().view(np.uint16), "BF16")
        return cls(tensor.numpy(), names[tensor.dtype])


def _contiguous(array: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """`array` as a C-contiguous `dtype` array, without a copy when it is one (0-d arrays stay 0-d)."""
    array = np.asarray(array, dtype=dtype)
    return array if array.flags.c_contiguous else array.copy(order="C")


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Stored], dict[str, str]]:
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
        data = _map(handle.fileno()) if size > 8 + length else None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
    start = 8 + length
    tensors = {name: _view(path, name, entry, data, start, size) for name, entry in header.items()}
    return tensors, dict(metadata)


def _map(fd: int) -> mmap.mmap:
    """A read-only map of the whole file, its page-table entries filled at once where the system allows it (one
    call instead of a page fault per 4 KiB on first touch; the data itself comes from the page cache either way)."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def _view(path: Path, name: str, entry: object, data: mmap.mmap | None, start: int, size: int) -> Stored:
    if not isinstance(entry, dict):
        raise TensorFileError(f"{path}: {name}: header entry is not an object")
    dtype = str(entry.get("dtype"))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype not in NUMPY:
        raise TensorFileError(f"{path}: {name}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TensorFileError(f"{path}: {name}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"{path}: {name}: bad data_offsets {offsets!r}")
    begin, end = offsets
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= size - start or end - begin != count * NUMPY[dtype].itemsize:
        raise TensorFileError(f"{path}: {name}: byte range {offsets} does not hold a {shape} {dtype} tensor")
    if count == 0:
        return Stored(np.empty(shape, NUMPY[dtype]), dtype)
    assert data is not None
    # numpy reads unaligned data too (a writer that did not align its tensors costs speed, not correctness)
    array = np.frombuffer(data, dtype=NUMPY[dtype], count=count, offset=start + begin)
    return Stored(array.reshape(shape), dtype)


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
        self._flushed = 0  # data bytes whose writeback has been started

    def add(self, name: str, tensor: Stored) -> None:
        if tensor.dtype not in NUMPY:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype}")
        if name in self.entries:
            raise ValueError(f"{name}: written twice")
        data = _contiguous(tensor.data, NUMPY[tensor.dtype])
        if data.size:
            self._handle.write(data.data)
        self.entries[name] = {
            "dtype": tensor.dtype,
            "shape": list(data.shape),
            "data_offsets": [self.size, self.size + data.nbytes],
        }
        self.size += data.nbytes
        if self.size - self._flushed >= WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
            self._handle.flush()  # start writing back what is written (the final fsync then waits for less)
            start = 8 + self.reserve + self._flushed
            os.posix_fadvise(self._handle.fileno(), start, self.size - self._flushed, os.POSIX_FADV_DONTNEED)
            self._flushed = self.size

    def commit(self, metadata: Mapping[str, str] | None = None) -> None:
        entries = dict(sorted(self.entries.items()))  # the data is in arrival order; list it by name
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


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Stored], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` whole or not at all: a temporary sibling, fsync, then a rename."""
    offset = 0
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, tensor in tensors.items():
        nbytes = tensor.data.nbytes
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    with SafetensorsWriter(path, len(json.dumps(header, separators=(",", ":")))) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.commit(metadata)
