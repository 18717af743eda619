"""The record of a run: which output shards are published, which wait for their source files' check,
and which are dropped with a file that failed it, kept in the manifest and told to the sink.

One thread touches it: the publish thread of a run on one machine, the driver's loop of a cluster run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CorruptShardError, StreamqError
from .layout import source_bytes
from .manifest import Manifest, ShardEntry, now
from .plan import Plan
from .publish import Sink


@dataclass(frozen=True)
class ShardRecord:
    """One output shard, as published (or found already published by an earlier run)."""

    index: int
    total: int
    name: str
    input_bytes: int  # bytes of the source's tensors it was made from
    output_bytes: int
    skipped: bool  # done by an earlier run: not made again
    committed: bool  # False while its bytes are uploaded but wait for a later commit
    seconds: float  # since the run started, when it was published


@dataclass(frozen=True)
class Written:
    """An output shard's file as written: what its manifest entry says of it."""

    size: int
    sha256: str
    tensor_bytes: int  # what model.safetensors.index.json's total_size sums
    keys: list[str]
    stats: Counter


class Record:
    def __init__(self, plan: Plan, manifest: Manifest, sink: Sink, checked: set[str]) -> None:
        """`checked`: the source files whose sha256 is known to match."""
        assert plan.layout is not None
        self.plan, self.layout, self.manifest, self.sink = plan, plan.layout, manifest, sink
        self.checked = checked
        self.failed: set[str] = set()  # source files whose sha256 did not match
        self.recorded = set(manifest.shards) | set(manifest.pending)
        self._sha = {s.name: s.sha256 or None for s in plan.shards}
        self._publish_failed = False
        self._started = time.monotonic()

    def input_bytes(self, index: int) -> int:
        return source_bytes(self.layout, self.plan.stored_at, index)

    def refused(self, index: int) -> str | None:
        """Why the shard must not be published, if it must not."""
        output = self.layout.outputs[index]
        if self._publish_failed:
            return f"{output.name} not published: an earlier shard failed"
        if self.failed.intersection(output.files):
            return f"{output.name} not published: made from a file that failed its sha256 check"
        return None

    def add(self, index: int, written: Written, put: Callable[[int], bool], before_put: Callable[[], None] = lambda: None) -> ShardRecord:
        """List the shard (published, or pending its files' check) and hand it to `put(remaining)`, which
        publishes it and says whether it is committed; a failed `put` takes the entry back out."""
        if (why := self.refused(index)) is not None:
            raise StreamqError(why)
        output = self.layout.outputs[index]
        name = output.name
        entry = ShardEntry(
            output_name=name, output_size=written.size, output_sha256=written.sha256, tensor_bytes=written.tensor_bytes,
            keys=written.keys, inputs={f: self._sha[f] for f in output.files}, finished_at=now(), stats=dict(written.stats),
        )
        ready = all(f in self.checked for f in output.files)
        (self.manifest.shards if ready else self.manifest.pending)[name] = entry
        self.recorded.add(name)
        before_put()
        remaining = sum(1 for o in self.layout.outputs if o.name not in self.recorded)
        try:
            committed = put(remaining)
        except BaseException:
            self.manifest.shards.pop(name, None)
            self.manifest.pending.pop(name, None)
            self._publish_failed = True
            raise
        total = len(self.layout.outputs)
        return ShardRecord(index + 1, total, name, self.input_bytes(index), entry.output_size, False, committed, time.monotonic() - self._started)

    def promote(self, name: str) -> None:
        """Source file `name` checked out: the shards waiting for it alone join the output."""
        self.checked.add(name)
        self.manifest.verified[name] = self._sha[name] or ""
        self.manifest.checkpoints.pop(name, None)
        self.promote_ready()

    def promote_ready(self) -> None:
        ready = sorted(n for n, e in self.manifest.pending.items() if all(f in self.checked for f in e.inputs))
        for shard in ready:
            self.manifest.shards[shard] = self.manifest.pending.pop(shard)
        if ready:
            self.sink.promote(ready, self.manifest)

    def discard(self, name: str) -> None:
        """Source file `name` failed its check: the shards made from it are dropped."""
        self.failed.add(name)
        dropped = sorted(n for n, e in self.manifest.pending.items() if name in e.inputs)
        for shard in dropped:
            del self.manifest.pending[shard]
        self.manifest.checkpoints.pop(name, None)
        self.sink.discard(dropped, self.manifest)

    def dropped(self, mismatch: str) -> CorruptShardError:
        """The error a run ends with when a source file failed its check (`mismatch` says how)."""
        return CorruptShardError(
            f"{mismatch}. The output shards made from it were uploaded but never committed, and are dropped; "
            f"{len(self.manifest.shards)} shard(s) made from files that checked out stay published. Run again: that file "
            "is downloaded again from its start, and nothing else is redone"
        )
