"""One shard's whole job: fetch it, quantize it, write the output shard, free the input.

Self-contained on purpose (a source, a shard plan and the run plan in; an output file and a manifest
entry out), so shards can later be spread over several machines. The pipeline fetches ahead in
another thread and hands the fetched shard to `convert_fetched`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .fetch import Fetched, Source
from .manifest import ShardEntry, now
from .plan import Plan, ShardPlan
from .quantize import quantize_shard
from .write import write_shard


def convert_shard(source: Source, shard: ShardPlan, plan: Plan, work_dir: Path, device: str) -> tuple[Path, ShardEntry]:
    """Fetch, quantize and write one shard; return the output file (in `work_dir/out`) and its entry."""
    return convert_fetched(source.fetch(shard.name, work_dir), shard, plan, work_dir, device)


def convert_fetched(
    fetched: Fetched, shard: ShardPlan, plan: Plan, work_dir: Path, device: str, make_room: Callable[[], None] = lambda: None
) -> tuple[Path, ShardEntry]:
    """Quantize an already fetched shard and write the output.

    Once quantized, every output tensor is in memory, so the input (if streamq downloaded it) is
    deleted before the output is written, and `make_room` is called in between: the scheduler trades
    the input's disk space for the output's there, so the next download need not wait for the write.
    """
    try:
        tensors = quantize_shard(fetched.path, shard.name, shard.keys, plan.rules, plan.settings, device)
    finally:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
    make_room()
    written = write_shard(tensors, work_dir / "out" / shard.name)
    del tensors
    entry = ShardEntry(
        input_name=shard.name,
        input_sha256=fetched.sha256,
        input_size=shard.size,
        output_name=shard.name,
        output_size=written.size,
        output_sha256=written.sha256,
        tensor_bytes=written.tensor_bytes,
        keys=written.keys,
        finished_at=now(),
    )
    return written.path, entry
