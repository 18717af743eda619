"""One shard's whole job: fetch it, quantize it, write the output shard, free the input.

Self-contained on purpose (a source, a shard plan and the run plan in; an output file and a manifest
entry out), so shards can later be spread over several machines. The pipeline calls the two halves
separately so that the next download can overlap this shard's quantization.
"""

from __future__ import annotations

from pathlib import Path

from .fetch import Fetched, Source
from .manifest import ShardEntry, now
from .plan import Plan, ShardPlan
from .quantize import quantize_shard
from .write import write_shard


def convert_shard(source: Source, shard: ShardPlan, plan: Plan, work_dir: Path, device: str) -> tuple[Path, ShardEntry]:
    """Fetch, quantize and write one shard; return the output file (in `work_dir/out`) and its entry."""
    return convert_fetched(source.fetch(shard.name, work_dir), shard, plan, work_dir, device)


def convert_fetched(fetched: Fetched, shard: ShardPlan, plan: Plan, work_dir: Path, device: str) -> tuple[Path, ShardEntry]:
    """Quantize an already fetched shard, write the output, and delete the input if streamq downloaded it."""
    try:
        tensors = quantize_shard(fetched.path, shard.name, shard.keys, plan.rules, plan.settings, device)
        written = write_shard(tensors, work_dir / "out" / shard.name)
        del tensors
    finally:
        if fetched.temporary:
            fetched.path.unlink(missing_ok=True)
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
