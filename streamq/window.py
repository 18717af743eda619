"""The source's bytes between the download and the converter: a read-ahead window on disk, or the files in place.

The download writes each file's bytes, in order, into segment files in work_dir, cut at tensor
boundaries so that every tensor lies in one segment and can be mapped from it; the converter reads
tensors from them and releases the stream behind it, which deletes the segments it has passed. The
window holds what the disk budget's window pool allows: the download waits for room, the converter
waits for bytes. A whole source file is never on disk, however large it is.

A local source needs no window: `InPlace` gives the same reads straight from its files.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .budget import DiskBudget
from .layout import Position, Stored

SEGMENT = 64 << 20  # a segment gathers whole tensors up to this size; a larger tensor is a segment alone
_NOWHERE = Position(1 << 62, 0)  # past every byte: nothing more is kept


class TensorBytes(Protocol):
    """Where the converter reads stored tensors from, in stream order."""

    def mapped(self, stored: Stored) -> AbstractContextManager[memoryview]: ...

    def read(self, stored: Stored) -> bytearray: ...

    def located(self, stored: Stored) -> AbstractContextManager[tuple[int, int]]: ...

    def release(self, upto: Position) -> None: ...


class WindowFailed(Exception):
    """The download ended without the bytes a reader waits for; the download's own error says why."""


class Cancelled(Exception):
    """The run is stopping: the download ends at its next write."""


@dataclass
class _Segment:
    file: int
    start: int
    end: int
    path: Path
    fd: int = -1
    written: int = 0  # bytes written, from `start`


class Window:
    def __init__(self, directory: Path, budget: DiskBudget, order: list[Stored], file_sizes: list[int], floor: Position) -> None:
        """`floor`: the converter's first byte; bytes before it are downloaded only to be hashed, never kept."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._budget = budget
        self._tensors: dict[int, list[tuple[int, int]]] = {}
        for stored in order:
            self._tensors.setdefault(stored.file, []).append((stored.start, stored.end))
        self._sizes = file_sizes
        self._floor = floor
        self._segments: list[_Segment] = []  # kept, in stream order
        self._plan: list[tuple[int, int]] = []  # the current file's segments still to open
        self._failure: BaseException | None = None
        self._cancelled = False
        self._cond = threading.Condition()

    # The download's side
    def begin_file(self, file: int) -> None:
        """The download of `file` starts (at whatever offset): plan its segments from the floor on."""
        base = self._floor.offset if file == self._floor.file else 0
        tensors = self._tensors.get(file, [])
        bounds = [max(base, tensors[0][0]) if tensors else base]  # the header was read at plan time: not kept
        most = min(SEGMENT, self._budget.limits["window"])  # never more than the pool, which holds the largest tensor
        for start, end in tensors:
            if start > bounds[-1] and end - bounds[-1] > most:  # cut before a tensor that would overflow
                bounds.append(start)
        bounds.append(self._sizes[file])
        kept = Position(file, base) >= self._floor
        with self._cond:
            self._plan = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] if kept else []

    def write(self, file: int, offset: int, data: memoryview) -> None:
        """Bytes [offset, offset + len(data)) of `file`, in order; waits for room in the window pool."""
        if self._cancelled:
            raise Cancelled()
        end = offset + len(data)
        while offset < end:
            segment = self._segment_at(file, offset)
            if segment is None:  # below the floor, or no longer kept
                return
            if offset < segment.start:
                data, offset = data[segment.start - offset:], segment.start
                continue
            piece = data[: min(end, segment.end) - offset]
            os.pwrite(segment.fd, piece, offset - segment.start)
            with self._cond:
                segment.written = offset + len(piece) - segment.start
                self._cond.notify_all()
            data, offset = data[len(piece):], offset + len(piece)

    def _segment_at(self, file: int, offset: int) -> _Segment | None:
        with self._cond:
            if self._segments and self._segments[-1].file == file and offset < self._segments[-1].end:
                return self._segments[-1]
            while self._plan and self._plan[0][1] <= offset:
                self._plan.pop(0)
            if not self._plan:
                return None
            start, end = self._plan.pop(0)
        self._budget.reserve("window", end - start)
        segment = _Segment(file, start, end, self.directory / f"{file:05d}-{start:015d}.part")
        segment.fd = os.open(segment.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        with self._cond:
            if self._floor is _NOWHERE:  # the converter is done: nothing more is kept
                self._drop(segment)
                return None
            self._segments.append(segment)
        return segment

    def fail(self, exc: BaseException) -> None:
        """The download gave up: waiting readers raise `WindowFailed` from `exc`."""
        with self._cond:
            self._failure = exc
            self._cond.notify_all()

    # The converter's side
    def _wait(self, stored: Stored) -> _Segment:
        with self._cond:
            while True:
                for segment in self._segments:
                    if segment.file == stored.file and segment.start <= stored.start and stored.end <= segment.end:
                        if segment.written >= stored.end - segment.start:
                            return segment
                        break
                if self._failure is not None:
                    raise WindowFailed(str(self._failure)) from self._failure
                self._cond.wait()

    @contextmanager
    def mapped(self, stored: Stored) -> Iterator[memoryview]:
        """The tensor's bytes, mapped from its segment (no copy) for the `with` only."""
        segment = self._wait(stored)
        with _mapping(segment.fd, stored.start - segment.start, stored.end - stored.start) as view:
            yield view

    def read(self, stored: Stored) -> bytearray:
        """The tensor's bytes in memory of their own: for a part kept until its weight's last part arrives."""
        segment = self._wait(stored)
        return _pread(segment.fd, stored.start - segment.start, stored.end - stored.start)

    @contextmanager
    def located(self, stored: Stored) -> Iterator[tuple[int, int]]:
        """A descriptor and offset holding the tensor's bytes, for a copy inside the kernel."""
        segment = self._wait(stored)
        yield segment.fd, stored.start - segment.start

    def release(self, upto: Position) -> None:
        """The converter is done with every byte before `upto`: delete the segments that end there."""
        with self._cond:
            while self._segments and Position(self._segments[0].file, self._segments[0].end) <= upto:
                self._drop(self._segments.pop(0))

    def stop_keeping(self) -> None:
        """The converter needs no more bytes: the download goes on for the hash alone."""
        with self._cond:
            self._floor = _NOWHERE
            self._plan = []
            while self._segments:
                self._drop(self._segments.pop(0))

    def cancel(self) -> None:
        """Stop: the download raises `Cancelled` at its next write, readers `WindowFailed`; segments are deleted."""
        self._cancelled = True
        self.fail(Cancelled("the run stopped"))
        self.stop_keeping()

    def _drop(self, segment: _Segment) -> None:
        os.close(segment.fd)
        segment.path.unlink(missing_ok=True)
        self._budget.release("window", segment.end - segment.start)


class InPlace:
    """A local source's files, read where they are."""

    def __init__(self, paths: list[Path]) -> None:
        self._fds = [os.open(path, os.O_RDONLY) for path in paths]

    @contextmanager
    def mapped(self, stored: Stored) -> Iterator[memoryview]:
        with _mapping(self._fds[stored.file], stored.start, stored.end - stored.start) as view:
            yield view

    def read(self, stored: Stored) -> bytearray:
        return _pread(self._fds[stored.file], stored.start, stored.end - stored.start)

    @contextmanager
    def located(self, stored: Stored) -> Iterator[tuple[int, int]]:
        yield self._fds[stored.file], stored.start

    def release(self, upto: Position) -> None:
        """Nothing to delete: the files are the user's."""

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@contextmanager
def _mapping(fd: int, offset: int, size: int) -> Iterator[memoryview]:
    """Bytes [offset, offset + size) of `fd`, mapped read-only (a copy costs about as much CPU as
    quantizing them); unmapped when the last view of them goes."""
    if size == 0:
        yield memoryview(b"")
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mapping = mmap.mmap(fd, offset + size - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    yield memoryview(mapping)[offset - start:]


def _pread(fd: int, offset: int, size: int) -> bytearray:
    buffer = bytearray(size)
    view, done = memoryview(buffer), 0
    while done < size:  # pread returns at most ~2 GiB at a time
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise WindowFailed(f"the bytes end {size - done} bytes early")
        done += got
    return buffer
