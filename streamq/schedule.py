"""Run the stream with overlap, within the disk budget.

Three threads: the download (source files, in order, into the window, each checked against its sha256
as it goes), the conversion (this thread: tensors as they arrive, into output shards), and the publish
(each output shard hashed on a helper thread, then uploaded, in order). An output shard made from a
file whose check is still running is published as pending; the download's word that the file checked
out promotes it, on the publish thread, which alone touches the manifest and the sink. A file that
fails its check takes its pending shards with it, and the run ends saying so.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import surface
from .budget import DiskBudget, disk_full_is_clear
from .convert import Made, convert_stream
from .download import Checkpoint, ChecksumMismatch, InputFile, download, resume_point
from .errors import CorruptShardError, StreamqError
from .fetch import HubSource, LocalSource, Source, file_sha256
from .layout import Position
from .manifest import Manifest, ShardEntry, now
from .plan import Plan
from .publish import Sink
from .quantize import warm_up
from .window import InPlace, Window, WindowFailed


# Makes the output files of the todo indices from the stream (convert.convert_stream, gguf.stream.gguf_stream)
Stream = Callable[..., Iterator[Made]]


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


class Scheduler:
    """Makes and publishes the output shards still to do; `close()` stops the helper threads."""

    def __init__(
        self, source: Source, sink: Sink, plan: Plan, manifest: Manifest, work: Path, device: str, budget: DiskBudget, bar: tqdm,
        stream: Stream = convert_stream, warm: Callable[[Plan, str], None] = warm_up,
    ) -> None:
        self.source, self.sink, self.plan, self.manifest = source, sink, plan, manifest
        self.stream, self.warm = stream, warm
        self.work, self.device, self.budget, self.bar = work, device, budget, bar
        self.layout = plan.layout
        assert self.layout is not None
        self.files = [InputFile(s.name, s.size, s.sha256 or "") for s in plan.shards]
        self._file_index = {f.name: i for i, f in enumerate(self.files)}
        self._checked = set(manifest.verified) if isinstance(source, HubSource) else set(self._file_index)
        self._snapshots: dict[int, dict[int, Checkpoint]] = {}
        # threads speak to the user's surface (surface.py): the publisher's errors name its controls
        self._publisher = ThreadPoolExecutor(1, "streamq-publish", initializer=surface.adopt, initargs=(surface.current(),))
        self._hasher = ThreadPoolExecutor(1, "streamq-output-sha256")
        self._published: deque[Future[ShardRecord]] = deque()
        self._publish_failed = threading.Event()
        self._download_error: BaseException | None = None
        self._downloader: threading.Thread | None = None
        self._window: Window | InPlace | None = None
        self._recorded = set(manifest.shards) | set(manifest.pending)
        self._failed: set[str] = set()  # source files whose sha256 did not match
        self._started = time.monotonic()

    def input_bytes(self, index: int) -> int:
        """Bytes of the stored tensors an output shard is made from."""
        stored = self.plan.stored_at
        parts = {p for item in self.layout.outputs[index].items for p in self.layout.parts[item]}  # a GGUF tensor may share its source
        return sum(stored[p].end - stored[p].start for p in parts)

    def run(self, todo: list[int]) -> Iterator[ShardRecord]:
        """Yield a record per output shard of `todo`, in order, as each is published."""
        outputs = self.layout.outputs
        floor = min((outputs[i].start for i in todo), default=None)
        self._publisher.submit(self._promote_ready).result()  # taken up from the journal, of files an earlier run checked
        self._window = self._start_download(todo, floor)
        if todo:
            (self.work / "out").mkdir(parents=True, exist_ok=True)
            self.warm(self.plan, self.device)  # while the first bytes arrive
            self._phase(todo[0])
            with disk_full_is_clear(self.work):
                try:
                    for made in self.stream(self.plan, self.layout, self._window, set(todo), floor, self.work / "out", self.device, self.budget):
                        self._phase(min((i for i in todo if i > made.index), default=made.index))
                        yield from self._completed()
                        digest = self._hasher.submit(file_sha256, made.written.path)
                        self._published.append(self._publisher.submit(self._publish, made, digest))
                except WindowFailed:
                    self._raise_download_error()
                    raise
        if isinstance(self._window, Window):
            self._window.stop_keeping()  # the rest of the last files is downloaded for their check alone
        if self._downloader is not None:
            self._downloader.join()
            self._raise_download_error()
        while self._published:
            yield self._published.popleft().result()
        self._publisher.submit(lambda: None).result()  # promotions of the last files done
        self.bar.set_postfix_str("")

    def _phase(self, index: int) -> None:
        self.bar.set_description(f"shard {index + 1}/{len(self.layout.outputs)} download + convert")

    # The download
    def _start_download(self, todo: list[int], floor: Position | None) -> Window | InPlace:
        if isinstance(self.source, LocalSource):
            return InPlace([self.source.path(f.name) for f in self.files])
        assert isinstance(self.source, HubSource)
        index = self._file_index
        needed = [floor] if floor is not None else []
        unchecked = {f for e in self.manifest.pending.values() for f in e.inputs if f not in self._checked}
        for name in unchecked:  # pending shards wait for these files' check: hash them from their checkpoint
            point = self.manifest.checkpoints.get(name, {})
            needed.append(Position(index[name], point.get("offset", 0)))
        last = max([index[n] for n in unchecked] + [index[f] for i in todo for f in self.layout.outputs[i].files], default=-1)
        window = Window(self.work / "in", self.budget, self.layout.order, [f.size for f in self.files], floor or Position(1 << 62, 0))
        if not needed:
            return window
        start = min(needed)
        saved = self.manifest.checkpoints.get(self.files[start.file].name, {})
        begin = resume_point(start, Checkpoint(saved["offset"], saved.get("state")) if saved else None)

        def run() -> None:
            try:
                download(self.source, self.files, start.file, last, begin, self.layout.snapshot_offsets, window, self._saved, self._file_checked)
            except BaseException as exc:
                self._download_error = exc
                if isinstance(exc, ChecksumMismatch):
                    self._publisher.submit(self._discard, self.files[exc.file].name)
                window.fail(exc)

        self._downloader = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="streamq-download", daemon=True)
        self._downloader.start()
        return window

    def _saved(self, file: int, checkpoint: Checkpoint) -> None:
        self._snapshots.setdefault(file, {})[checkpoint.offset] = checkpoint

    def _file_checked(self, file: int) -> None:
        self._publisher.submit(self._promote, self.files[file].name)

    def _raise_download_error(self) -> None:
        exc = self._download_error
        if exc is None:
            return
        if isinstance(exc, ChecksumMismatch):
            self._publisher.submit(lambda: None).result()  # the pending shards are dropped first
            published = len(self.manifest.shards)
            raise CorruptShardError(
                f"{exc}. The output shards made from it were uploaded but never committed, and are dropped; "
                f"{published} shard(s) made from files that checked out stay published. Run again: that file "
                "is downloaded again from its start, and nothing else is redone"
            ) from exc
        raise exc

    # The publish thread: the only one that touches the manifest and the sink
    def _publish(self, made: Made, digest: Future[str]) -> ShardRecord:
        name = made.shard.name
        try:
            if self._publish_failed.is_set():
                raise StreamqError(f"{name} not published: an earlier shard failed")
            if self._failed.intersection(made.shard.files):
                made.written.path.unlink(missing_ok=True)
                raise StreamqError(f"{name} not published: made from a file that failed its sha256 check")
            self.bar.set_postfix_str(f"publishing {name}")
            entry = ShardEntry(
                output_name=name, output_size=made.written.size, output_sha256=digest.result(), tensor_bytes=made.written.tensor_bytes,
                keys=made.written.keys, inputs={f: self._sha(f) for f in made.shard.files}, finished_at=now(), stats=dict(made.stats),
            )
            ready = all(f in self._checked for f in made.shard.files)
            (self.manifest.shards if ready else self.manifest.pending)[name] = entry
            self._recorded.add(name)
            self._note_checkpoints()
            remaining = sum(1 for o in self.layout.outputs if o.name not in self._recorded)
            try:
                committed = self.sink.add_shard(made.written.path, name, self.manifest, remaining=remaining)
            except BaseException:
                self.manifest.shards.pop(name, None)
                self.manifest.pending.pop(name, None)
                self._publish_failed.set()
                raise
        finally:
            self.budget.release("output", made.shard.expected_size)
        size = self.input_bytes(made.index)
        self.bar.update(size)
        return ShardRecord(made.index + 1, len(self.layout.outputs), name, size, entry.output_size, False, committed, time.monotonic() - self._started)

    def _sha(self, name: str) -> str | None:
        return self.files[self._file_index[name]].sha256 or None

    def _note_checkpoints(self) -> None:
        """For each file still being checked, the latest saved hash state a resumed run can start from:
        at or before the first byte of every output shard not recorded yet."""
        for file, snapshots in list(self._snapshots.items()):
            name = self.files[file].name
            if name in self._checked or name in self._failed:
                continue
            limit = min(
                (o.start.offset for o in self.layout.outputs if o.name not in self._recorded and o.start.file == file), default=1 << 62
            )
            usable = [c for offset, c in list(snapshots.items()) if offset <= limit and c.state is not None]
            if usable:
                best = max(usable, key=lambda c: c.offset)
                self.manifest.checkpoints[name] = {"offset": best.offset, "state": best.state}

    def _promote(self, name: str) -> None:
        self._checked.add(name)
        self.manifest.verified[name] = self._sha(name) or ""
        self.manifest.checkpoints.pop(name, None)
        self._promote_ready()

    def _promote_ready(self) -> None:
        ready = sorted(n for n, e in self.manifest.pending.items() if all(f in self._checked for f in e.inputs))
        for shard in ready:
            self.manifest.shards[shard] = self.manifest.pending.pop(shard)
        if ready:
            self.sink.promote(ready, self.manifest)

    def _discard(self, name: str) -> None:
        self._failed.add(name)
        dropped = sorted(n for n, e in self.manifest.pending.items() if name in e.inputs)
        for shard in dropped:
            del self.manifest.pending[shard]
        self.manifest.checkpoints.pop(name, None)
        self.sink.discard(dropped, self.manifest)

    def _completed(self) -> Iterator[ShardRecord]:
        """Records of the shards published so far, in order; re-raises a failed publish here."""
        while self._published and self._published[0].done():
            yield self._published.popleft().result()

    def close(self) -> None:
        """Stop the download at its next write, let publishing finish what was made (in order, stopping
        at a failure), so no work is lost."""
        self.budget.close()
        if isinstance(self._window, Window):
            self._window.cancel()
        if self._downloader is not None:
            self._downloader.join()
        self._publisher.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        if self._window is not None and isinstance(self._window, InPlace):
            self._window.close()

