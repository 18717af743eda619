"""Write safetensors shards tensor by tensor, so memory holds one tensor, never a whole output shard.

safetensors has no streaming writer, so this writes its format itself. Data is written before the header is
known, so the header gets space reserved up front and is written last, padded with spaces as the spec allows.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .budget import is_disk_full
from .errors import StreamqError

log = logging.getLogger(__name__)

# safetensors' dtype codes in the order of its Dtype enum: save_file lays tensors out by descending rank, then name.
_CODES = {
    getattr(torch, name): code
    for name, code in [
        ("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e8m0fnu", "F8_E8M0"), ("int16", "I16"), ("uint16", "U16"), ("float16", "F16"), ("bfloat16", "BF16"),
        ("int32", "I32"), ("uint32", "U32"), ("float32", "F32"), ("float64", "F64"), ("int64", "I64"), ("uint64", "U64"),
    ]
    if hasattr(torch, name)
}
_RANK = {dtype: i for i, dtype in enumerate(_CODES)}
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # use pread/pwrite instead
_CHUNK = 16 << 20  # bytes per pread/pwrite when copy_file_range can't be used


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    size: int  # file bytes
    tensor_bytes: int  # what model.safetensors.index.json's total_size sums
    keys: list[str]  # sorted


def _header(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    """Compact JSON like safetensors' own, `__metadata__` first; the caller pads it."""
    head = {"__metadata__": metadata, **entries} if metadata else entries
    return json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def header_reserve(entries: Iterable[tuple[str, int]], metadata: dict[str, str] | None = None) -> int:
    """An upper bound of the header for tensors (key, ndim): every number at its 20-digit maximum, multiple of 8."""
    widest = {"dtype": "F8_E4M3", "data_offsets": [10**19, 10**19]}
    entry = lambda key, ndim: len(_header({}, {key: {**widest, "shape": [10**19] * ndim}})) - 1  # noqa: E731  ',' not '{}'
    head = _header({"format": "pt"} if metadata is None else metadata, {})
    return _round8(len(head) + sum(entry(key, ndim) for key, ndim in entries))


def _copy(src: int, src_off: int, dst: int, dst_off: int, n: int) -> None:
    """Copy in the kernel (copy_file_range, a reflink on some filesystems), else in bounded pread/pwrite pieces."""
    use_range = hasattr(os, "copy_file_range")
    while n > 0:
        if use_range:
            try:
                done = os.copy_file_range(src, dst, n, src_off, dst_off)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                use_range = False
                continue
        else:
            done = os.pwrite(dst, os.pread(src, min(n, _CHUNK), src_off), dst_off)
        if done == 0:
            raise ValueError(f"the source file ends {n} bytes before the tensor does (offset {src_off})")
        src_off, dst_off, n = src_off + done, dst_off + done, n - done


class SafetensorsWriter:
    """One safetensors file written tensor by tensor to `path.partial`, renamed to `path` by finalize()."""

    def __init__(self, path: Path, header_reserve: int, metadata: dict[str, str] | None = None) -> None:
        self.path, self.reserve = Path(path), header_reserve
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._entries: dict[str, dict] = {}
        self._data = 0  # bytes of tensor data written; the next tensor starts here
        self._fd: int | None = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._finalized = False

    @property
    def data_bytes(self) -> int:
        return self._data

    def _begin(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, int]:
        """Check before writing; returns (file offset, nbytes). Bytes count only once _end records the entry."""
        if self._fd is None:
            raise ValueError(f"{self.partial.name}: the writer was already finalized or aborted")
        if key in self._entries or key == "__metadata__":
            raise ValueError(f"duplicate (or reserved) tensor key {key!r}")
        if dtype not in _CODES:
            raise ValueError(f"{key}: safetensors has no dtype code for {dtype}")
        return 8 + self.reserve + self._data, math.prod(int(d) for d in shape) * dtype.itemsize

    def _end(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> None:
        span = [self._data, self._data + nbytes]
        self._entries[key] = {"dtype": _CODES[dtype], "shape": [int(d) for d in shape], "data_offsets": span}
        self._data += nbytes

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write a CPU tensor's bytes now; nothing of it is kept."""
        self.add_chunks(key, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_chunks(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]) -> None:
        """A tensor made piece by piece (e.g. cast in slices): its bytes as consecutive chunks, in order."""
        at, nbytes = self._begin(key, dtype, shape)
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"{key}: a {chunk.dtype} chunk for a {dtype} tensor")
            view = memoryview(chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            if written + len(view) > nbytes:
                raise ValueError(f"{key}: chunks hold more than the {nbytes} bytes of shape {list(shape)}")
            while view:
                done = os.pwrite(self._fd, view, at + written)
                view, written = view[done:], written + done
        if written != nbytes:
            raise ValueError(f"{key}: chunks hold {written} bytes, shape {list(shape)} needs {nbytes}")
        self._end(key, dtype, shape, nbytes)

    def add_from_file(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], fd: int, offset: int) -> None:
        """A tensor already on disk in another file (an unchanged input tensor), copied without passing through Python."""
        at, nbytes = self._begin(key, dtype, shape)
        _copy(fd, offset, self._fd, at, nbytes)
        self._end(key, dtype, shape, nbytes)

    def finalize(self) -> WrittenShard:
        """Write the header into its reserved space, fsync, and rename to the final name atomically."""
        if self._fd is None:
            raise ValueError(f"{self.partial.name}: the writer was already finalized or aborted")
        try:
            header = _header(self.metadata, self._entries)
            os.ftruncate(self._fd, 8 + self.reserve + self._data)  # drop bytes of a tensor whose chunks were refused
            if len(header) > self.reserve:
                self._grow_header(_round8(len(header)))
            os.pwrite(self._fd, struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "), 0)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self.partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._finalized = True
        return WrittenShard(self.path, 8 + self.reserve + self._data, self._data, sorted(self._entries))

    def _grow_header(self, reserve: int) -> None:
        """The caller reserved too little: move the data into a second file, behind a header space that fits."""
        log.warning("%s: header needs %d bytes but %d were reserved; copying the data once to make room",
                    self.path.name, reserve, self.reserve)
        moved = self.partial.with_name(self.partial.name + ".grow")
        fd = os.open(moved, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _copy(self._fd, 8 + self.reserve, fd, 8 + reserve, self._data)
            os.replace(moved, self.partial)
        except BaseException:
            os.close(fd)
            moved.unlink(missing_ok=True)
            raise
        os.close(self._fd)
        self._fd, self.reserve = fd, reserve

    def abort(self) -> None:
        """Close and remove the partial file; safe to call twice, and a finalized file is left alone."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._finalized:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()  # nothing once finalized; otherwise (an exception, or no finalize) the partial file goes


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> WrittenShard:
    """Save with transformers' `{"format": "pt"}` metadata, laid out as save_file lays it (byte for byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(tensors, key=lambda k: (-_RANK.get(tensors[k].dtype, 0), k))
    entries, start = {}, 0
    for key in order:  # the exact header, so the file is no larger than save_file's
        t = tensors[key]
        code = _CODES.get(t.dtype, "?")
        entries[key] = {"dtype": code, "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}
        start += t.nbytes
    try:
        with SafetensorsWriter(path, _round8(len(_header({"format": "pt"}, entries)))) as writer:
            for key in order:
                writer.add(key, tensors[key])
            return writer.finalize()
    except OSError as exc:
        if is_disk_full(exc):
            raise
        raise StreamqError(f"cannot write {path.name} in {path.parent}: {exc}; check the work_dir") from exc
