"""One shard's job: quantize it as it arrives, free the input, write the output shard.

Self-contained on purpose (the arriving bytes, a shard plan and the run plan in; an output file and a
manifest entry out), so shards can later be spread over several machines. The scheduler downloads in
another thread and hands over the shard's `Arrival` and a way to wait for the finished download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .arrival import Arrival, ArrivalFailed
from .fetch import Fetched
from .manifest import ShardEntry, now
from .plan import Plan, ShardPlan
from .quantize import quantize_shard
from .write import write_shard


def convert_arriving(
    arrival: Arrival, fetched: Callable[[], Fetched], shard: ShardPlan, plan: Plan, work_dir: Path, device: str,
    make_room: Callable[[], None] = lambda: None,
) -> tuple[Path, ShardEntry]:
    """Quantize a shard while it downloads, then wait for the download's check and write the output.

    `fetched()` blocks until the download is complete and its sha256 verified (raising its error if it
    failed): nothing is written from bytes that failed the check. Once quantized, every output tensor
    is in memory, so the input (if streamq downloaded it) is deleted before the output is written, and
    `make_room` is called in between: the scheduler trades the input's disk space for the output's
    there, so the next download need not wait for the write.
    """
    try:
        try:
            tensors = quantize_shard(arrival, shard, plan, device)
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
    entry = ShardEntry(
        input_name=shard.name,
        input_sha256=done.sha256,
        input_size=shard.size,
        output_name=shard.name,
        output_size=written.size,
        output_sha256=written.sha256,
        tensor_bytes=written.tensor_bytes,
        keys=written.keys,
        finished_at=now(),
    )
    return written.path, entry
