"""The GGUF conversion: walk the stream of source tensors, compute each GGUF tensor when the last source
tensor it reads arrives, and write its bytes at their place in their file, whose header was written first.

A file is finalized when all its tensors are written; since llama-quantize orders tensors by layer and the
stream follows the source's files, several files may be open at once (the plan's output pool counts them).
Source tensors that arrive before the last one a GGUF tensor needs (e.g. all but one of a layer's experts,
which llama.cpp stacks) are copied out of the window to wait, as the converter itself buffers them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..budget import DiskBudget
from ..convert import Made, _return_freed_memory
from ..layout import Layout, Position
from ..plan import stored_tensor
from ..window import TensorBytes
from ..write import WrittenShard
from .header import FilePlan
from .llama_cpp import GGML_BF16 as BF16, GGML_Q4_0 as Q4_0, converter
from .model import materialize
from .plan import GgufPlan
from .qat import keep_grid
from .quantize import quantize_rows, to_f32


PIECE = 64 << 20  # bytes of f32 values rounded and quantized at a time


class GgufFileWriter:
    """One GGUF file written to `path.partial`: the header at once, each tensor's data at its offset, renamed by finalize()."""

    def __init__(self, path: Path, plan: FilePlan) -> None:
        self.path, self.plan = path, plan
        self.partial = path.with_name(path.name + ".partial")
        self._offsets = {t.name: (offset, t.nbytes) for t, offset in zip(plan.tensors, plan.offsets)}
        self._left = set(self._offsets)
        self._fd: int | None = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, plan.header, 0)
        os.ftruncate(self._fd, plan.size)  # padding and data not yet written read as zeros, as llama.cpp pads

    @property
    def done(self) -> bool:
        return not self._left

    def write(self, name: str, data: np.ndarray) -> None:
        offset, nbytes = self._offsets[name]
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if len(view) != nbytes:
            raise AssertionError(f"{name}: {len(view)} bytes computed, the header says {nbytes}")
        assert self._fd is not None
        written = 0
        while written < nbytes:
            written += os.pwrite(self._fd, view[written:], offset + written)
        self._left.discard(name)

    def finalize(self) -> WrittenShard:
        if self._left or self._fd is None:
            raise AssertionError(f"{self.path.name}: {len(self._left)} tensor(s) not written")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.partial, self.path)
        return WrittenShard(self.path, self.plan.size, sum(t.nbytes for t in self.plan.tensors), sorted(self._offsets))

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.partial.unlink(missing_ok=True)


def gguf_stream(
    plan: GgufPlan, layout: Layout, source: TensorBytes, todo: set[int], start: Position, out_dir: Path, device: str, budget: DiskBudget,
) -> Iterator[Made]:
    """Make the GGUF files whose indices are in `todo`, reading the stream from `start`; yield each when finalized."""
    writers: dict[int, GgufFileWriter] = {}
    stats: dict[int, Counter] = {}
    left = set(todo)
    tensors = plan.tensors
    users = {key: {i for i in items if layout.owner[i] in left} for key, items in layout.waiting.items()}
    held: dict[str, bytearray] = {}

    def writer(index: int) -> GgufFileWriter:
        if index not in writers:
            budget.reserve("output", layout.outputs[index].expected_size)
            writers[index] = GgufFileWriter(out_dir / layout.outputs[index].name, plan.out_files[index])
            stats[index] = Counter()
            for item in layout.outputs[index].items:
                if not layout.parts[item]:  # computed from config alone (e.g. rope factors)
                    writers[index].write(item, _compute(plan, tensors[item], {}, stats[index]))
        return writers[index]

    try:
        for stored in layout.order:
            if not left:
                break
            if stored.position < start:
                continue
            if users.get(stored.key):
                held[stored.key] = source.read(stored)
            completes = [item for item in layout.last_part.get(stored.key, ()) if layout.owner[item] in left]
            with ExitStack() as stack:
                arrived = held.get(stored.key) if completes else None
                if completes and arrived is None:
                    # mapped from the window, not copied, where the converter's first step makes a new tensor
                    # (it widens what is not F16/F32), so nothing writes into it or keeps it
                    copy = plan.stored_info[stored.key].dtype in ("F16", "F32")
                    arrived = source.read(stored) if copy else stack.enter_context(source.mapped(stored))
                for item in completes:
                    index = layout.owner[item]
                    inputs = {key: held[key] if key in held else arrived for key in layout.parts[item]}
                    out = writer(index)
                    out.write(item, _compute(plan, tensors[item], {k: stored_tensor(b, plan.stored_info[k]) for k, b in inputs.items()}, stats[index]))
                    del inputs
                    for key in layout.parts[item]:
                        waiting = users.get(key)
                        if waiting is not None:
                            waiting.discard(item)
                            if not waiting:
                                held.pop(key, None)
                    if out.done:
                        written = writers.pop(index).finalize()
                        left.discard(index)
                        _return_freed_memory()
                        yield Made(index, layout.outputs[index], written, stats.pop(index))
                del arrived
            source.release(Position(stored.file, stored.end))
    finally:
        for open_writer in writers.values():
            open_writer.abort()


def _compute(plan: GgufPlan, tensor, inputs: dict, stats: Counter) -> np.ndarray:
    """The tensor's bytes as llama.cpp writes them: the converter's, then llama-quantize's type if it differs;
    in Q4_0, groups on a QAT grid keep it (qat.py). After the converter's f32 values, rows go in pieces, so
    memory holds the values and the output, not every intermediate of the whole tensor."""
    plan.feed.tensors = inputs
    try:
        data, values = materialize(tensor)
    finally:
        plan.feed.tensors = {}
    target = plan.written[tensor.name]
    if values is None:
        if target.qtype == tensor.qtype:
            return data
        values, data = to_f32(data, tensor.qtype), None
    n = tensor.shape[-1]
    rows = values.reshape(-1, n)
    out = np.empty(target.nbytes, dtype=np.uint8).reshape(len(rows), -1)
    step = max(1, PIECE // (4 * n))
    for first in range(0, len(rows), step):
        piece = rows[first:first + step]
        if target.qtype == BF16:
            out[first:first + step] = bf16(piece).reshape(len(piece), -1)
            continue
        # the intermediate file's bf16, what llama-quantize reads (the converter's own rounding)
        read = to_f32(bf16(piece), BF16) if tensor.qtype == BF16 else piece
        quantized = quantize_rows(read, n, target.qtype)
        if target.qtype == Q4_0:
            quantized = keep_grid(piece, quantized, stats)
        out[first:first + step] = quantized.reshape(len(piece), -1)
    return out.reshape(-1)


def bf16(values: np.ndarray) -> np.ndarray:
    _, gguf = converter()
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
