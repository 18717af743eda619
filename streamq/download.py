"""The download: byte ranges of the source's weight files, in order, into the window.

A range that checks its file passes every byte through its sha256, from the file's first byte or from
a hash state saved at a planned offset by an earlier run (see `sha256.py`), to the file's end, so a
file of any size is checked against the Hub's sha256 without being on disk whole. The hash state is
saved where each output shard starts, so a run that resumes at a shard downloads from there, not from
the start of its file. The hashing runs on a thread of its own beside the socket reads and the window
writes. A range that does not check its file (a cluster job's share of a file another job checks) is
read by one Range request and not hashed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CorruptShardError
from .fetch import HubSource
from .layout import Position
from .sha256 import ResumableSha256
from .window import Window

logger = logging.getLogger(__name__)


class ChecksumMismatch(CorruptShardError):
    """A source file's bytes did not match the Hub's sha256."""

    def __init__(self, message: str, file: int) -> None:
        super().__init__(message)
        self.file = file

    def __reduce__(self) -> tuple:  # pickled with its file: how a cluster job's mismatch reaches the driver
        return (ChecksumMismatch, (str(self), self.file))


@dataclass(frozen=True)
class InputFile:
    name: str
    size: int
    sha256: str  # what the Hub lists


@dataclass(frozen=True)
class Checkpoint:
    """A file's hash after its first `offset` bytes (state None: this machine cannot save one)."""

    offset: int
    state: str | None


@dataclass(frozen=True)
class Read:
    """Bytes [start.offset, end) of file `file` (end None: to the file's end); `check`: hash them,
    from `start`'s state, and compare the whole file's sha256 (needs end None)."""

    file: int
    start: Checkpoint
    end: int | None = None
    check: bool = True


class FileFeed:
    """One file's bytes as `HubSource.stream` delivers them: gathered into 4 MiB batches (once per socket
    read, the bookkeeping cost a 2-core VM as much CPU as the transfer), written to the window, and
    hashed on a thread of its own, with the hash state saved at `marks`."""

    BLOCK = 4 << 20

    def __init__(
        self, window: Window, file: int, start: Checkpoint, marks: list[int], saved: Callable[[int, Checkpoint], None], check: bool = True,
    ) -> None:
        self._window, self._file, self._check = window, file, check
        self._position = start.offset  # the next byte the window and the hash take
        self._received = start.offset  # where the response stands (0 again after a server ignored Range)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._sha = ResumableSha256(start.state)
        self._marks = sorted(m for m in marks if m > start.offset)
        self._saved = saved
        self._blocks: queue.Queue[tuple[int, list[bytes]] | None] = queue.Queue(maxsize=4)
        self._hasher = threading.Thread(target=self._hash, name="streamq-sha256", daemon=True)
        if check:
            self._hasher.start()

    @property
    def size(self) -> int:
        return self._received + self._pending_size

    def append(self, data: bytes) -> None:
        skip = self._position - self.size  # bytes a restarted response sends again
        if skip >= len(data):
            self._received += len(data)
            return
        if skip > 0:
            self._received += skip
            data = data[skip:]
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.BLOCK:
            self._flush()

    def restart(self) -> None:
        """The response starts over at byte 0: what comes before `_position` again is skipped."""
        self._flush()
        self._received = 0

    def _flush(self) -> None:
        if not self._pending:
            return
        pieces, self._pending = self._pending, []
        if self._check:
            self._blocks.put((self._position, pieces))
        for piece in pieces:
            self._window.write(self._file, self._position, memoryview(piece))
            self._position += len(piece)
        self._received = self._position
        self._pending_size = 0

    def _hash(self) -> None:
        while (block := self._blocks.get()) is not None:
            at, pieces = block
            for piece in pieces:
                view = memoryview(piece)
                while self._marks and self._marks[0] <= at + len(view):
                    cut = self._marks.pop(0) - at
                    self._sha.update(view[:cut])
                    at, view = at + cut, view[cut:]
                    self._saved(self._file, Checkpoint(at, self._sha.state()))
                self._sha.update(view)
                at += len(view)

    def close(self) -> str:
        """The sha256 of the whole file (once every byte has come)."""
        self._flush()
        self._stop_hashing()
        return self._sha.hexdigest()

    def abandon(self) -> None:
        self._pending.clear()
        self._stop_hashing()

    def _stop_hashing(self) -> None:
        if self._check:
            self._blocks.put(None)
            self._hasher.join()


def download(
    source: HubSource, files: list[InputFile], reads: list[Read], marks: Callable[[int, int], list[int]],
    window: Window, saved: Callable[[int, Checkpoint], None], checked: Callable[[int], None],
) -> None:
    """Download `reads`, in order. `checked(file)` is called once a checked file's sha256 matches the
    Hub's; a mismatch raises."""
    for read in reads:
        info = files[read.file]
        window.begin_file(read.file)
        feed = FileFeed(window, read.file, read.start, marks(read.file, info.size) if read.check else [], saved, read.check)
        try:
            source.stream(info.name, feed, read.end)
        except BaseException:
            feed.abandon()
            raise
        digest = feed.close()
        if not read.check:
            continue
        if digest != info.sha256:
            raise ChecksumMismatch(f"{info.name}: the downloaded bytes have sha256 {digest}, but the Hub lists {info.sha256}", read.file)
        logger.info("%s: sha256 checked over all %d bytes", info.name, info.size)
        checked(read.file)


def resume_point(start: Position, checkpoint: Checkpoint | None) -> Checkpoint:
    """Where the download of `start.file` begins: at a saved hash state at or before `start`, else at 0."""
    if checkpoint is None or checkpoint.state is None or checkpoint.offset > start.offset:
        return Checkpoint(0, None)
    try:
        if ResumableSha256(checkpoint.state).nbytes != checkpoint.offset:
            return Checkpoint(0, None)
    except ValueError:
        return Checkpoint(0, None)
    return checkpoint
