"""The conversion: walk the stream of stored tensors, convert each logical tensor as its last part
arrives, and write it at once into its output shard.

Memory holds about one tensor: a weight is mapped from the window while it is quantized, a tensor kept
as it is goes from the window to the output file inside the kernel, a cast is done in pieces, and only
the parts that arrive before their weight's last part (scales, for a quantized source) are copied out
of the window to wait for it. Output shards the manifest already lists are skipped, their bytes only
released.
"""

from __future__ import annotations

import ctypes
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import DiskBudget
from .converters import Stats
from .layout import Layout, OutputShard, Position, Stored
from .plan import STORED_DTYPES, Plan, stored_tensor
from .quantize import quantize_weight
from .targets import FLOAT_CODES, TensorInfo, TensorRule
from .window import TensorBytes
from .write import SafetensorsWriter, WrittenShard

CAST_CHUNK = 1 << 24  # elements cast at a time, for a kept tensor written in another dtype


def _spend_torchs_read_only_buffer_warning() -> None:
    """Mapped tensors are read-only and only read. torch warns once per process that it cannot keep
    writes out of a read-only buffer, which tells a user nothing: spend it here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_torchs_read_only_buffer_warning()


@dataclass(frozen=True)
class Made:
    """An output shard written to work_dir, and what its manifest entry needs."""

    index: int
    shard: OutputShard
    written: WrittenShard
    stats: Counter = field(default_factory=Counter)


def convert_stream(
    plan: Plan, layout: Layout, source: TensorBytes, todo: set[int], start: Position, out_dir: Path, device: str,
    budget: DiskBudget,
) -> Iterator[Made]:
    """Make the output shards whose indices are in `todo`, reading the stream from `start`; yield each
    one as soon as it is finalized (in output order)."""
    writers: dict[int, SafetensorsWriter] = {}
    stats: dict[int, Counter] = {}
    held: dict[str, bytearray] = {}
    left = set(todo)
    try:
        for stored in layout.order:
            if not left:
                break
            if stored.position < start:
                continue
            if any(layout.owner[k] in left for k in layout.waiting.get(stored.key, ())):
                held[stored.key] = source.read(stored)
            for item in layout.last_part.get(stored.key, ()):
                if layout.owner[item] not in left:
                    continue
                index = layout.owner[item]
                output = layout.outputs[index]
                if index not in writers:
                    budget.reserve("output", output.expected_size)
                    writers[index] = SafetensorsWriter(out_dir / output.name, output.header_reserve)
                    stats[index] = Counter()
                _convert_item(plan, layout, source, item, held, writers[index], device, stats[index])
                if item == output.items[-1]:
                    written = writers.pop(index).finalize()
                    left.discard(index)
                    _return_freed_memory()
                    yield Made(index, output, written, stats.pop(index))
            source.release(Position(stored.file, stored.end))
    finally:
        for writer in writers.values():
            writer.abort()


def _convert_item(
    plan: Plan, layout: Layout, source: TensorBytes, item: str, held: dict[str, bytearray], writer: SafetensorsWriter,
    device: str, stats: Stats,
) -> None:
    rule = plan.rules[item]
    stored = {key: plan.stored_at[key] for key in layout.parts[item]}
    if rule.action == "keep" and item not in plan.logical:
        _keep(source, stored[item], plan.stored_info[item], rule, writer)
        return
    with _tensor(plan, source, item, stored, held) as tensor:  # nothing below keeps a view of it
        tensor = _cast(tensor, rule)
        if rule.action == "keep":
            writer.add(rule.out_key, tensor)
            return
        weight = tensor.T if rule.transpose else tensor
        for suffix, value in quantize_weight(weight.contiguous(), plan.settings, device, stats).items():
            writer.add(f"{rule.out_key}{suffix}", value)


def _keep(source: TensorBytes, stored: Stored, info: TensorInfo, rule: TensorRule, writer: SafetensorsWriter) -> None:
    """A tensor written as stored: copied inside the kernel, or cast piece by piece."""
    dtype, shape = STORED_DTYPES[info.dtype], tuple(info.shape)
    target = getattr(torch, rule.dtype) if rule.dtype is not None else dtype
    if target == dtype:
        with source.located(stored) as (fd, offset):
            writer.add_from_file(rule.out_key, dtype, shape, fd, offset)
        return
    with source.mapped(stored) as view:
        flat = stored_tensor(view, info).reshape(-1)
        chunks = (flat[i:i + CAST_CHUNK].to(target) for i in range(0, flat.numel(), CAST_CHUNK))
        writer.add_chunks(rule.out_key, target, shape, chunks)
        del flat


@contextmanager
def _tensor(plan: Plan, source: TensorBytes, item: str, stored: dict[str, Stored], held: dict[str, bytearray]) -> Iterator[torch.Tensor]:
    """The logical tensor in full precision: mapped from the window, or dequantized from its parts."""
    with ExitStack() as stack:
        parts = {}
        for key, where in stored.items():
            view = held.pop(key) if key in held else stack.enter_context(source.mapped(where))
            parts[key] = stored_tensor(view, plan.stored_info[key])
        if item not in plan.logical:
            yield parts[item]
            return
        assert plan.dequantizer is not None
        logical = plan.logical[item]
        yield plan.dequantizer.dequantize(logical, parts, getattr(torch, FLOAT_CODES[logical.info.dtype])).contiguous()


def _cast(tensor: torch.Tensor, rule: TensorRule) -> torch.Tensor:
    return tensor if rule.dtype is None else tensor.to(getattr(torch, rule.dtype))


def _return_freed_memory() -> None:
    """Give freed tensors' memory back to the OS. glibc keeps freed blocks below its mmap threshold (which
    rises as large tensors are freed) in per-thread arenas, so without a trim the process keeps more
    than it uses."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere nothing to do
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()
