"""The disk budget of work_dir, shared by the download, convert and publish threads.

work_dir holds two things: the read-ahead window of the source's bytes (segments the download writes
and the converter deletes behind it) and the output shards (the one being written, the one being
uploaded). Each has a pool of its own, so neither can starve the other into a deadlock: outputs
drain by publishing, which needs no space, and the window drains by converting, which needs only
output space. Every file is reserved before it is written and released once deleted, so the two
pools together never hold more than the budget.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InsufficientDiskError
from .surface import remedy


DEFAULT_READ_AHEAD = 1_000_000_000  # window bytes beyond the largest tensor: the download runs this far ahead


def pools(largest_tensor: int, output_pair: int, downloads: bool, disk_budget: int | None = None) -> tuple[int, int]:
    """The window and output pools of a run's disk budget. The output pool holds two consecutive output
    shards (one uploads while the next is written); the window the largest stored tensor whole, plus
    the read-ahead. A local source is read in place: no window."""
    if not downloads:
        return 0, output_pair
    if disk_budget is None:
        return largest_tensor + DEFAULT_READ_AHEAD, output_pair
    if disk_budget < largest_tensor + output_pair:
        raise InsufficientDiskError(
            f"disk_budget {disk_budget / 1e9:.2f} GB is below the {(largest_tensor + output_pair) / 1e9:.2f} GB this model needs "
            f"(its largest tensor, {largest_tensor / 1e9:.2f} GB, plus two output shards, {output_pair / 1e9:.2f} GB); "
            f"{remedy('more_budget')}"
        )
    return disk_budget - output_pair, output_pair


class BudgetClosed(Exception):
    """The run is stopping; a waiting stage gives up instead of blocking shutdown."""


class DiskBudget:
    """Bytes reserved in work_dir, by pool ("window" or "output"), and the peak of their sum."""

    def __init__(self, window: int, output: int) -> None:
        self.limits = {"window": window, "output": output}
        self.used = {"window": 0, "output": 0}
        self.peak = 0
        self._closed = False
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return sum(self.limits.values())

    def reserve(self, pool: str, size: int) -> None:
        """Block until `size` fits in `pool`. What is larger than the pool is granted once the pool is
        empty: the plan sized the pools for the largest tensor and output pair, so only a caller's
        estimate can be off, and waiting forever would not help."""
        with self._cond:
            while not self._closed and self.used[pool] and self.used[pool] + size > self.limits[pool]:
                self._cond.wait()
            if self._closed:
                raise BudgetClosed
            self.used[pool] += size
            self.peak = max(self.peak, sum(self.used.values()))

    def release(self, pool: str, size: int) -> None:
        with self._cond:
            self.used[pool] -= size
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


def bytes_in(folder: Path) -> int:
    """Bytes of the files under `folder` (one may be renamed while we look: a download finishing)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total
