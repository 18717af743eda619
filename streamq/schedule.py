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
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from . import surface
from .budget import DiskBudget, disk_full_is_clear
from .convert import Made, convert_stream
from .download import Checkpoint, ChecksumMismatch, InputFile, Read, download, resume_point
from .errors import StreamqError
from .fetch import HubSource, LocalSource, Source, file_sha256
from .layout import Position
from .manifest import Manifest
from .plan import Plan
from .publish import Sink
from .record import Record, ShardRecord, Written
from .quantize import warm_up
from .window import InPlace, Window, WindowFailed


# Makes the output files of the todo indices from the stream (convert.convert_stream, gguf.stream.gguf_stream)
Stream = Callable[..., Iterator[Made]]


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
        self.record = Record(plan, manifest, sink, set(manifest.verified) if isinstance(source, HubSource) else set(self._file_index))
        self._snapshots: dict[int, dict[int, Checkpoint]] = {}
        # threads speak to the user's surface (surface.py): the publisher's errors name its controls
        self._publisher = ThreadPoolExecutor(1, "streamq-publish", initializer=surface.adopt, initargs=(surface.current(),))
        self._hasher = ThreadPoolExecutor(1, "streamq-output-sha256")
        self._published: deque[Future[ShardRecord]] = deque()
        self._download_error: BaseException | None = None
        self._downloader: threading.Thread | None = None
        self._window: Window | InPlace | None = None

    def input_bytes(self, index: int) -> int:
        return self.record.input_bytes(index)

    def run(self, todo: list[int]) -> Iterator[ShardRecord]:
        """Yield a record per output shard of `todo`, in order, as each is published."""
        outputs = self.layout.outputs
        floor = min((outputs[i].start for i in todo), default=None)
        self._publisher.submit(self.record.promote_ready).result()  # taken up from the journal, of files an earlier run checked
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
        unchecked = {f for e in self.manifest.pending.values() for f in e.inputs if f not in self.record.checked}
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
                reads = [Read(file, begin if file == start.file else Checkpoint(0, None)) for file in range(start.file, last + 1)]
                download(self.source, self.files, reads, self.layout.snapshot_offsets, window, self._saved, self._file_checked)
            except BaseException as exc:
                self._download_error = exc
                if isinstance(exc, ChecksumMismatch):
                    self._publisher.submit(self.record.discard, self.files[exc.file].name)
                window.fail(exc)

        self._downloader = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="streamq-download", daemon=True)
        self._downloader.start()
        return window

    def _saved(self, file: int, checkpoint: Checkpoint) -> None:
        self._snapshots.setdefault(file, {})[checkpoint.offset] = checkpoint

    def _file_checked(self, file: int) -> None:
        self._publisher.submit(self.record.promote, self.files[file].name)

    def _raise_download_error(self) -> None:
        exc = self._download_error
        if exc is None:
            return
        if isinstance(exc, ChecksumMismatch):
            self._publisher.submit(lambda: None).result()  # the pending shards are dropped first
            raise self.record.dropped(str(exc)) from exc
        raise exc

    # The publish thread: the only one that touches the manifest and the sink
    def _publish(self, made: Made, digest: Future[str]) -> ShardRecord:
        name = made.shard.name
        try:
            if (why := self.record.refused(made.index)) is not None:
                made.written.path.unlink(missing_ok=True)
                raise StreamqError(why)  # before waiting for the hash of the file just removed
            self.bar.set_postfix_str(f"publishing {name}")
            written = Written(made.written.size, digest.result(), made.written.tensor_bytes, made.written.keys, made.stats)
            put = lambda remaining: self.sink.add_shard(made.written.path, name, self.manifest, remaining=remaining)  # noqa: E731
            record = self.record.add(made.index, written, put, before_put=self._note_checkpoints)
        finally:
            self.budget.release("output", made.shard.expected_size)
        self.bar.update(record.input_bytes)
        return record

    def _note_checkpoints(self) -> None:
        """For each file still being checked, the latest saved hash state a resumed run can start from:
        at or before the first byte of every output shard not recorded yet."""
        for file, snapshots in list(self._snapshots.items()):
            name = self.files[file].name
            if name in self.record.checked or name in self.record.failed:
                continue
            limit = min(
                (o.start.offset for o in self.layout.outputs if o.name not in self.record.recorded and o.start.file == file), default=1 << 62
            )
            usable = [c for offset, c in list(snapshots.items()) if offset <= limit and c.state is not None]
            if usable:
                best = max(usable, key=lambda c: c.offset)
                self.manifest.checkpoints[name] = {"offset": best.offset, "state": best.state}

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

