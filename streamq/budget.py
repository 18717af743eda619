"""A disk budget for work_dir, shared by the download, quantize and upload threads.

Every file streamq writes to work_dir is first reserved here (its exact input size, or its expected
output size) and released once deleted, so overlapping stages never hold more than the budget.
"""

from __future__ import annotations

import threading


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
