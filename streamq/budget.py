"""A disk budget for work_dir, shared by the download, quantize and upload threads.

Every file streamq writes to work_dir is first reserved here (its exact input size, or its expected
output size) and released once deleted, so overlapping stages never hold more than the budget.

Inputs are reserved ahead, in shard order, by the download thread; outputs by the quantizer, for the
oldest downloaded shard. Read-ahead may never take the space that shard's output will need, or the
quantizer would wait for an input that waits for the quantizer: an input is granted only while the
inputs held plus the largest pending output still fit (outputs already written always drain, since
publishing needs no space).
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InsufficientDiskError


class BudgetClosed(Exception):
    """The run is stopping; a waiting stage gives up instead of blocking shutdown."""


class DiskBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # every reserved byte, inputs and outputs
        self.peak = 0
        self._inputs = 0  # bytes of inputs held (downloading, waiting or being quantized)
        self._pending_outputs: deque[int] = deque()  # expected outputs of shards whose input is reserved
        self._closed = False
        self._cond = threading.Condition()

    def reserve_input(self, size: int, output_size: int) -> None:
        """Block until a shard's input fits, leaving room for the output of every shard not yet quantized."""
        self._check(size + output_size)
        with self._cond:
            self._wait(lambda: self.used + size <= self.limit
                       and self._inputs + size + max([output_size, *self._pending_outputs]) <= self.limit)
            self._inputs += size
            self._pending_outputs.append(output_size)
            self._grant(size)

    def reserve_output(self, size: int) -> None:
        """Block until the output of the oldest reserved input fits (publishing frees space without needing any)."""
        self._check(size)
        with self._cond:
            self._wait(lambda: self.used + size <= self.limit)
            self._pending_outputs.popleft()
            self._grant(size)

    def release_input(self, size: int) -> None:
        with self._cond:
            self._inputs -= size
            self._release(size)

    def release_output(self, size: int) -> None:
        with self._cond:
            self._release(size)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _check(self, size: int) -> None:
        if size > self.limit:
            raise ValueError(f"one shard needs {size} bytes, more than the disk budget of {self.limit} bytes")

    def _wait(self, fits: Callable[[], bool]) -> None:
        while not fits() and not self._closed:
            self._cond.wait()
        if self._closed:
            raise BudgetClosed

    def _grant(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _release(self, size: int) -> None:
        self.used -= size
        self._cond.notify_all()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from Python, or the same error reported as text by safetensors' Rust writer."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


@contextmanager
def disk_full_is_clear(where: Path) -> Iterator[None]:
    """Turn a full disk into an error that says so; what was half-written is never published."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise InsufficientDiskError(
                f"the disk holding {where} is full; nothing half-written was published. "
                "Free some space (or use a larger work_dir) and run again to resume"
            ) from exc
        raise


def bytes_in(folder: Path) -> int:
    """Bytes of the files under `folder` (one may be renamed while we look: a download finishing)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total
