"""Read one shard's tensors from its bytes as they arrive, each as soon as its own bytes are in.

safetensors' reader opens complete files only (it maps the file and checks its length), so the
layout is read here, as its format document describes it: an 8-byte little-endian header length, a
JSON header giving each tensor's dtype, shape and data offsets, then the data. Every entry is checked
against the header the plan read before the download, and the download's sha256 check covers the
rest. Tensors are read into memory of their own, or, for one that is used up at once (quantized),
mapped for just that long, so resident memory holds the tensors in use, never the file.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch

from .arrival import Arrival
from .errors import CorruptShardError
from .plan import STORED_DTYPES
from .targets import TensorInfo


def _spend_torchs_read_only_buffer_warning() -> None:
    """Mapped tensors are read-only (see `Arrival.mapped`) and only read. torch warns once per process
    that it cannot keep writes out of a read-only buffer, which tells a user nothing: spend it here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_torchs_read_only_buffer_warning()

_MAX_HEADER = 100_000_000  # what safetensors itself accepts


class _Entry(NamedTuple):
    start: int  # offsets into the data that follows the header
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardReader:
    """The tensors of one generation of an arriving shard (see `Arrival`), checked against `expected`."""

    def __init__(self, arrival: Arrival, name: str, size: int, expected: dict[str, TensorInfo]) -> None:
        self.arrival, self.name, self.size = arrival, name, size
        self.generation = arrival.started()
        (length,) = struct.unpack("<Q", self._read(0, 8))
        if length > min(_MAX_HEADER, size - 8):
            raise self._corrupt(f"its header claims {length} bytes")
        try:
            header = json.loads(bytes(self._read(8, length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"its header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._entries = {key: self._check_entry(key, entry, expected.get(key)) for key, entry in header.items()}
        self._check_layout()

    def _check_entry(self, key: str, entry: object, info: TensorInfo | None) -> _Entry:
        """The entry, once it matches the planned dtype and shape and spans exactly their bytes."""
        if info is None:
            raise self._corrupt(f"tensor {key} was not in its header when the run was planned")
        start, end = _offsets(entry)
        shape, dtype = tuple(info.shape), STORED_DTYPES.get(info.dtype)
        nbytes = math.prod(shape) * dtype.itemsize if dtype is not None else -1
        if not isinstance(entry, dict) or entry.get("dtype") != info.dtype or tuple(entry.get("shape", ())) != shape or end - start != nbytes:
            raise self._corrupt(f"tensor {key} is not the {info.dtype} {list(shape)} its header said when the run was planned")
        return _Entry(start, end, dtype, shape)

    def _check_layout(self) -> None:
        """Tensor data back to back, without overlaps or gaps, ending where the file ends (as safetensors requires)."""
        at = 0
        for start, end, _, _ in sorted(self._entries.values(), key=lambda e: (e.start, e.end)):
            if start != at:
                raise self._corrupt("its tensors' data offsets overlap or leave gaps")
            at = end
        if self._data_start + at != self.size:
            raise self._corrupt(f"its tensors end at byte {self._data_start + at} of {self.size}")

    def in_file_order(self, keys: tuple[str, ...], parts: Mapping[str, tuple[str, ...]] | None = None) -> list[str]:
        """`keys` in the order their bytes arrive (a header lists tensors by name, not by position); a key
        in `parts` is made from those stored tensors (a dequantized weight) and is ready when the last is in."""
        def ready_at(key: str) -> int:
            stored = parts.get(key, (key,)) if parts else (key,)
            return max(self._entries[k].start if k in self._entries else 0 for k in stored)

        return sorted(keys, key=ready_at)

    def get_tensor(self, key: str) -> torch.Tensor:
        """The tensor, read once its bytes have arrived (blocking until then)."""
        start, end, dtype, shape = self._entry(key)
        if start == end:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._read(self._data_start + start, end - start), dtype=dtype).reshape(shape)

    @contextmanager
    def mapped_tensor(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor, once its bytes have arrived, mapped from the file rather than read: for a tensor
        that is used up inside the `with` (quantized). Read instead when its bytes are not aligned to
        its elements, which safetensors files normally are."""
        start, end, dtype, shape = self._entry(key)
        offset = self._data_start + start
        if start == end or offset % dtype.itemsize:
            yield self.get_tensor(key)
            return
        with ExitStack() as mapping:
            try:
                view = mapping.enter_context(self.arrival.mapped(offset, end - start, self.generation))
            except EOFError as exc:
                raise self._eof(exc) from exc
            yield torch.frombuffer(view, dtype=dtype).reshape(shape)

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise self._corrupt(f"tensor {key} is missing from its header")
        return self._entries[key]

    def _read(self, offset: int, size: int) -> memoryview:
        try:
            return self.arrival.read(offset, size, self.generation)
        except EOFError as exc:
            raise self._eof(exc) from exc

    def _eof(self, exc: EOFError) -> CorruptShardError:
        return self._corrupt(f"{exc}, before the bytes its header lists")

    def _corrupt(self, why: str) -> CorruptShardError:
        return CorruptShardError(f"{self.name}: not a valid safetensors file ({why}); the file is corrupt or truncated")


def _offsets(entry: object) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]:
        return offsets[0], offsets[1]
    return 0, -1  # fails the size check with the message that names the tensor
