"""One shard's whole job: fetch it, quantize it, write the output shard, free the input.

Self-contained on purpose (a source, a shard plan and the run plan in; an output file and a manifest
entry out), so shards can later be spread over several machines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .fetch import Source
from .manifest import ShardEntry, now
from .plan import Plan, ShardPlan
from .quantize import quantize_shard
from .write import write_shard


def convert_shard(
    source: Source, shard: ShardPlan, plan: Plan, work_dir: Path, device: str, phase: Callable[[str], None] = lambda _: None
) -> tuple[Path, ShardEntry]:
    """Return the written output shard (in `work_dir/out`) and its manifest entry."""
    phase("download")
    fetched = source.fetch(shard.name, work_dir)
    try:
        phase("quantize")
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
