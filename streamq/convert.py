"""One shard's job: quantize it as it arrives, free the input, write the output shard.

Self-contained on purpose (the arriving bytes, a shard plan and the run plan in; an output file and
what its manifest entry needs out), so shards can later be spread over several machines. The scheduler downloads in
another thread and hands over the shard's `Arrival` and a way to wait for the finished download.
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .arrival import Arrival, ArrivalFailed
from .fetch import Fetched, file_sha256
from .manifest import ShardEntry, now
from .plan import Plan, ShardPlan
from .quantize import quantize_shard
from .write import WrittenShard, write_shard


@dataclass(frozen=True)
class Converted:
    """A shard's output file, and what its manifest entry needs from the input."""

    shard: ShardPlan
    input_sha256: str
    written: WrittenShard
    stats: Counter = field(default_factory=Counter)  # what the converter counted for this shard

    @property
    def path(self) -> Path:
        return self.written.path

    def output_sha256(self) -> str:
        """The output file's sha256, which its upload needs first. The scheduler takes it beside the
        uploads while they run (on the quantizer's thread it left the kernel idle; on the publish
        thread, in line with the uploads, it made publishing the slowest stage), at once when nothing
        uploads."""
        return file_sha256(self.written.path)

    def entry(self, output_sha256: str) -> ShardEntry:
        """The manifest entry, given `output_sha256()`."""
        return ShardEntry(
            input_name=self.shard.name,
            input_sha256=self.input_sha256,
            input_size=self.shard.size,
            output_name=self.shard.name,
            output_size=self.written.size,
            output_sha256=output_sha256,
            tensor_bytes=self.written.tensor_bytes,
            keys=self.written.keys,
            finished_at=now(),
            stats=dict(self.stats),
        )


def convert_arriving(
    arrival: Arrival, fetched: Callable[[], Fetched], shard: ShardPlan, plan: Plan, work_dir: Path, device: str,
    make_room: Callable[[], None] = lambda: None,
) -> Converted:
    """Quantize a shard while it downloads, then wait for the download's check and write the output.

    `fetched()` blocks until the download is complete and its sha256 verified (raising its error if it
    failed): nothing is written from bytes that failed the check. Once quantized, every output tensor
    is in memory, so the input (if streamq downloaded it) is deleted before the output is written, and
    `make_room` is called in between: the scheduler trades the input's disk space for the output's
    there, so the next download need not wait for the write.
    """
    try:
        try:
            stats: Counter = Counter()
            tensors = quantize_shard(arrival, shard, plan, device, stats)
        except ArrivalFailed:
            fetched()  # raises the download's own error
            raise
        done = fetched()
    finally:
        arrival.close()  # an open descriptor would keep a deleted input's space in use
    if done.temporary:
        done.path.unlink(missing_ok=True)
    make_room()
    written = write_shard(tensors, work_dir / "out" / shard.name)
    del tensors
    _return_freed_memory()
    return Converted(shard, done.sha256, written, stats)


def _return_freed_memory() -> None:
    """Give the freed output tensors' memory back to the OS. glibc keeps freed blocks below its mmap
    threshold (which rises as large tensors are freed) in per-thread arenas, so without a trim the
    process keeps more after each shard than it uses."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere nothing to do
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()
