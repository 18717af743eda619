"""The stream and the output shards, decided from the plan's headers alone.

The unit that streams is the tensor, not the file. The source files are read as one stream, in file
order and byte order within each file; each logical tensor (a weight, with its scales for a quantized
source) is converted as soon as its last stored part has arrived. The output shards are cut from that
order at `max_shard_size` with huggingface_hub's own splitter (what transformers' `save_pretrained`
uses, so names and index are as transformers writes them), whatever the source's shard sizes. Being a
function of the headers and the settings only, a resumed run finds the same output files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from huggingface_hub import split_state_dict_into_shards_factory

from .write import header_reserve

OUTPUT_PATTERN = "model{suffix}.safetensors"
QUANTIZED_OUTPUTS = 6  # tensors bitsandbytes writes for one weight at most (int4 writes 3)
LONGEST_SUFFIX = ".quant_state.bitsandbytes__nf4"
METADATA_RESERVE = 64  # the header's {"__metadata__": {"format": "pt"}} and framing
CHECKPOINT_EVERY = 256 << 20


@dataclass(frozen=True, order=True)
class Position:
    """A byte of the stream: a file (its index in the plan's order) and an offset in it."""

    file: int
    offset: int


@dataclass(frozen=True)
class Stored:
    """One tensor as a source file stores it: where its bytes are."""

    key: str
    file: int
    start: int  # absolute offsets in the file
    end: int

    @property
    def position(self) -> Position:
        return Position(self.file, self.start)


@dataclass(frozen=True)
class OutputShard:
    """One output file: the logical tensors it holds (in stream order) and what it needs of the stream."""

    name: str
    items: tuple[str, ...]
    expected_size: int  # an upper bound of the file's bytes
    header_reserve: int
    files: tuple[str, ...]  # the source files its bytes come from: all must pass their sha256 check first
    start: Position  # its first byte in the stream: a run that resumes at this shard reads from here


@dataclass(frozen=True)
class Layout:
    outputs: list[OutputShard]
    order: list[Stored]  # every stored tensor, in stream order
    parts: dict[str, tuple[str, ...]]  # logical key -> the stored keys it is made from
    last_part: dict[str, tuple[str, ...]]  # stored key -> the logical tensors it completes
    waiting: dict[str, tuple[str, ...]]  # a stored part that arrives before its tensor's last part -> the tensors waiting for it
    owner: dict[str, int]  # logical key -> index of its output shard

    def snapshot_offsets(self, file: int, size: int) -> list[int]:
        """Where the download of `file` saves its hash state: every output shard's first byte in it (a
        resumed run starts there), and every CHECKPOINT_EVERY bytes (a resumed run that only has to
        finish checking the file starts at the last one)."""
        starts = {o.start.offset for o in self.outputs if o.start.file == file}
        return sorted(starts | set(range(CHECKPOINT_EVERY, size, CHECKPOINT_EVERY)))


def plan_layout(
    files: list[str],
    stored: dict[str, Stored],
    items: dict[str, tuple[str, ...]],
    sizes: dict[str, int],
    entries: dict[str, list[tuple[str, int]]],
    max_shard_size: int,
) -> Layout:
    """`items`: each logical tensor that produces output -> its stored parts; `sizes`: an upper bound of
    its output data; `entries`: its output tensors' (names, ndim), for the header reserve."""
    order = sorted(stored.values(), key=lambda s: (s.file, s.start, s.end, s.key))
    rank = {s.key: i for i, s in enumerate(order)}
    completing = {key: max(parts, key=rank.__getitem__) for key, parts in items.items()}  # the part a tensor waits for last
    last_part = {part: (key,) for key, part in completing.items()}
    waiting: dict[str, tuple[str, ...]] = {}
    for key, parts in items.items():
        for part in parts:
            if last_part.get(part) != (key,):
                waiting[part] = (*waiting.get(part, ()), key)
    ready = sorted(items, key=lambda key: rank[completing[key]])
    reserves = {key: header_reserve(entries[key]) for key in ready}
    split = split_state_dict_into_shards_factory(
        {key: sizes[key] + reserves[key] for key in ready},
        get_storage_size=lambda size: size,
        filename_pattern=OUTPUT_PATTERN,
        max_shard_size=max(1, max_shard_size - 8 - METADATA_RESERVE),
    )
    outputs, owner = [], {}
    for index, (name, keys) in enumerate(split.filename_to_tensors.items()):
        parts = [stored[p] for key in keys for p in items[key]]
        reserve = header_reserve(e for key in keys for e in entries[key])
        outputs.append(OutputShard(
            name=name,
            items=tuple(keys),
            expected_size=8 + reserve + sum(sizes[key] for key in keys),
            header_reserve=reserve,
            files=tuple(files[f] for f in sorted({p.file for p in parts})),
            start=min(p.position for p in parts),
        ))
        owner.update({key: index for key in keys})
    return Layout(outputs, order, dict(items), last_part, waiting, owner)


def source_bytes(layout: Layout, stored: dict[str, Stored], index: int) -> int:
    """Bytes of the stored tensors output shard `index` is made from (a GGUF tensor may share its source)."""
    parts = {p for item in layout.outputs[index].items for p in layout.parts[item]}
    return sum(stored[p].end - stored[p].start for p in parts)


def quantized_entries(out_key: str, ndim: int) -> list[tuple[str, int]]:
    """Header entries to reserve for one quantized weight, before its converter has named them."""
    return [(out_key + LONGEST_SUFFIX, ndim)] * QUANTIZED_OUTPUTS


def largest_pair(sizes: Iterable[int]) -> int:
    """The most two consecutive output shards take: one uploads while the next is written."""
    sizes = list(sizes)
    return max((a + b for a, b in zip(sizes, sizes[1:])), default=max(sizes, default=0))
