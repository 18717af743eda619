"""A disk budget for work_dir, shared by the download, quantize and upload threads.

Every file streamq writes to work_dir is first reserved here (its exact input size, or its expected
output size) and released once deleted, so overlapping stages never hold more than the budget.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InsufficientDiskError


class BudgetClosed(Exception):
    """The run is stopping; a waiting stage gives up instead of blocking shutdown."""


class DiskBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._closed = False
        self._cond = threading.Condition()

    def reserve(self, size: int) -> None:
        """Block until `size` more bytes fit under the limit."""
        if size > self.limit:
            raise ValueError(f"one file of {size} bytes exceeds the disk budget of {self.limit} bytes")
        with self._cond:
            while self.used + size > self.limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise BudgetClosed
            self.used += size
            self.peak = max(self.peak, self.used)

    def release(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
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
