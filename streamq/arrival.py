"""How much of a shard is on disk while it downloads, so its tensors can be quantized as they arrive.

The fetch thread reports each attempt's file and its growing length; the quantizer waits for the byte
range it needs and reads it through a descriptor of its own. An attempt that can change bytes already
reported (a server ignoring Range truncates and rewrites; a shard failing its sha256 check is
downloaded again into a new file) starts a new generation, and a reader that sees the generation
change reads the shard again from the start. The sha256 check at the end covers every byte the last
generation reported, so what was quantized is what was verified.

A reader may also map a range (`mapped`) instead of copying it; a rewrite then waits until no
mapping is in use, since touching a mapped page of a truncated file kills the process (SIGBUS).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ArrivalFailed(Exception):
    """The download ended without the file: the fetch's own exception says why."""


class Restarted(Exception):
    """Bytes a reader already used may have changed: it must read the shard again from the start."""


class Cancelled(Exception):
    """Nobody wants these bytes any more: the download stops and deletes what it wrote."""


class Arrival:
    """The bytes of one file as they arrive; readers block in `read` until their range is in."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fds: list[int] = []  # every attempt's descriptor, closed together by `close`
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._have = 0
        self._generation = 0
        self._failed = False
        self._finished = False
        self._closed = False
        self._cancelled = False
        self._mappings = 0  # ranges mapped by readers right now

    def begin(self, fd: int, have: int) -> None:
        """An attempt writes `fd` (readable; borrowed: it is duplicated), whose first `have` bytes are final."""
        stat = os.fstat(fd)
        with self._cond:
            if self._closed:  # the reader gave up; the download goes on for a later run to reuse
                return
            inode = (stat.st_dev, stat.st_ino)
            if inode != self._inode or have < self._have:
                self._generation += 1
            self._fds.append(os.dup(fd))
            self._fd, self._inode, self._have, self._failed = self._fds[-1], inode, have, False
            self._cond.notify_all()

    def begin_file(self, path: Path) -> None:
        """A file that is already complete (read in place, or downloaded in one piece): all of it is in."""
        fd = os.open(path, os.O_RDONLY)
        try:
            self.begin(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def advance(self, have: int) -> None:
        """The first `have` bytes of the current attempt's file are written (flushed to the OS); raises
        `Cancelled` once `cancel` was called, which stops the download."""
        with self._cond:
            if self._cancelled:
                raise Cancelled()
            self._have = have
            self._cond.notify_all()

    def reset(self) -> None:
        """Bytes already reported are about to change: call before the file is rewound or truncated.
        Waits until no reader uses a mapping of the file."""
        with self._cond:
            self._cond.wait_for(lambda: self._mappings == 0)
            self._generation += 1
            self._have = 0

    def finish(self) -> None:
        """The download is complete (and checked): no more bytes will come."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """Stop the download at its next write (see `advance`)."""
        with self._cond:
            self._cancelled = True

    def fail(self) -> None:
        """The download gave up; waiting readers raise `ArrivalFailed`."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def started(self) -> int:
        """Wait for the first attempt to begin; return its generation."""
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._fd is not None)
            if self._fd is None:
                raise ArrivalFailed()
            return self._generation

    def _wait_for(self, offset: int, size: int, generation: int) -> int:
        """Block until [offset, offset + size) of `generation` is in; the descriptor to read it from."""
        self._cond.wait_for(
            lambda: self._failed or self._finished or self._generation != generation or self._have >= offset + size
        )
        self._check(generation)
        if self._have < offset + size:
            raise EOFError(f"the file ends at byte {self._have}")
        assert self._fd is not None
        return self._fd

    @contextmanager
    def mapped(self, offset: int, size: int, generation: int) -> Iterator[memoryview]:
        """Bytes [offset, offset + size) of generation `generation`, once they are in, mapped rather
        than copied (a copy costs about as much CPU as quantizing the bytes); use them inside
        the `with` only. The pages are unmapped when the last view of them goes.

        The mapping is read-only and shares the page cache: nothing is copied, and the file must not be
        truncated while it is in use, which `reset` sees to."""
        with self._cond:
            fd = self._wait_for(offset, size, generation)
            self._mappings += 1
        try:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # page tables filled in one call
            mapping = mmap.mmap(fd, offset + size - start, flags=flags, prot=mmap.PROT_READ, offset=start)
            yield memoryview(mapping)[offset - start:]
        finally:
            with self._cond:
                self._mappings -= 1
                self._cond.notify_all()

    def read(self, offset: int, size: int, generation: int) -> memoryview:
        """Bytes [offset, offset + size) of generation `generation`, once they are in, in memory of their own."""
        with self._cond:
            fd = self._wait_for(offset, size, generation)
        view = memoryview(bytearray(size))
        done = 0
        while done < size:  # pread returns at most ~2 GiB at a time
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
        with self._cond:
            self._check(generation)  # unchanged after the read: nothing was rewritten under it
        if done < size:
            raise Restarted()  # shorter than reported: only a rewrite in progress does that
        return view

    def _check(self, generation: int) -> None:
        if self._generation != generation:
            raise Restarted()
        if self._failed:
            raise ArrivalFailed()

    def close(self) -> None:
        """Close the descriptors, so deleting the file frees its space."""
        with self._cond:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            self._fd = None
            self._closed = True
