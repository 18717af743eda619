"""Give up a connection that has all but stopped moving, so that the transfer resumes on a fresh one.

A read timeout only fires when nothing arrives at all; a connection that a proxy left delivering a few
kB every few seconds never times out, and a shard over it takes hours. Download managers drop such a
connection and resume by Range on a new one; streamq does the same. A transfer is slow while a window's
throughput is below `FLOOR_BYTES_PER_S` and also either
- below `SLOW_FRACTION` of the best recent window of its kind (this source's downloads, this output's
  uploads), or
- for a download, no window has reached the floor in the last `MEMORY_SECONDS`, and no download was given
  up for that reason in the last `PROBE_SECONDS`: a connection that trickles from its first bytes has
  no faster one to be compared with, so a fresh one is tried, to learn what the link does. If it is
  faster, it is the reference from then on; if it is as slow, the link is slow, and is left alone
  (another fresh connection a minute later costs a download one request: it resumes by Range).
  An upload given up starts over, so a slow one is never given up for being slow alone.
Slow for `DOWNLOAD_STALL_SECONDS` or `STALL_SECONDS` (uploads), the transfer fails with `TransferStalled`,
which the callers retry as a network error. The module constants are read at each check, so tests can
shorten them.
"""

from __future__ import annotations

import importlib
import io
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

# Throughput is measured over windows this long: long enough that a socket buffer filling at the start
# of a connection, or a TCP burst, does not read as the link's speed.
WINDOW_SECONDS = 5.0
# Slow this long in a row before an upload's connection is given up: far longer than a congestion dip, a
# retransmission timeout or a pause of the server, so a connection that recovers by itself is kept; a PUT
# given up is sent again whole.
STALL_SECONDS = 30.0
# A download given up resumes by Range on a fresh connection, which costs one request: two windows.
DOWNLOAD_STALL_SECONDS = 10.0
# Slow means below a tenth of the best recent window: ordinary variation of a link (other traffic,
# disk waits) stays well above it, while a trickling connection is hundreds of times below.
SLOW_FRACTION = 0.1
# A window moving at least this much is never slow, whatever came before: that is a slow link, not a
# trickle (a 5 GB shard still arrives in under an hour and a half), and a fresh connection would not
# reliably do better. A link that is slower than this all along is not slow *relative to itself*.
FLOOR_BYTES_PER_S = 1_000_000.0
# The best window of the last ten minutes is the reference: recent enough to describe the link as it
# is now, long enough to span the connections before a trickling one.
MEMORY_SECONDS = 600.0
# A download link with no window above the floor gets a fresh connection to learn its speed at most
# this often: if that one happened to trickle too, the next try is a minute away, and a link slow all
# along gets one reconnection a minute, not one per window.
PROBE_SECONDS = 60.0


def _timeout_base() -> type[Exception]:
    """The timeout error of the httpx that huggingface_hub uses: its `http_backoff` retries that class on
    a fresh connection (uploads), and streamq's `retrying` treats it as a network error (downloads)."""
    http = importlib.import_module("huggingface_hub.utils._http")
    for name in ("httpx2", "httpx"):
        module = getattr(http, name, None)
        if module is not None and hasattr(module, "TimeoutException"):
            return module.TimeoutException
    return TimeoutError


class TransferStalled(_timeout_base()):  # type: ignore[misc]
    """A connection that keeps delivering, but far below what this link has recently done."""


class SpeedHistory:
    """Recent window throughputs of one kind of transfer, shared by its connections (thread-safe).
    `resumable`: a connection given up loses nothing (downloads, by Range), so one may be given up to probe."""

    def __init__(self, resumable: bool = False) -> None:
        self.resumable = resumable
        self._lock = threading.Lock()
        self._rates: deque[tuple[float, float]] = deque()  # (time, bytes/s), times increasing
        self._probed: float | None = None  # when a download was last given up to learn the link's speed

    def note(self, now: float, rate: float) -> float:
        """Record a window's rate; return the best of the last `MEMORY_SECONDS`."""
        with self._lock:
            self._rates.append((now, rate))
            while self._rates and self._rates[0][0] < now - MEMORY_SECONDS:
                self._rates.popleft()
            return max(r for _, r in self._rates)

    def may_probe(self, now: float) -> bool:
        with self._lock:
            return self._may_probe(now)

    def probe(self, now: float) -> bool:
        """Claim the fresh connection allowed per `PROBE_SECONDS` to learn the link's speed."""
        with self._lock:
            if not self._may_probe(now):
                return False
            self._probed = now
            return True

    def _may_probe(self, now: float) -> bool:
        return self.resumable and (self._probed is None or now - self._probed >= PROBE_SECONDS)


class StallWatch:
    """Watches one connection: call `update` with the bytes moved so far, after each read or write.

    Time is cut into consecutive windows of at least `WINDOW_SECONDS`, each closed by the first update
    after it is due, so each byte counts in exactly one window (a burst at the start included) and a
    connection whose reads come far apart is judged over the whole gap."""

    def __init__(self, history: SpeedHistory, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._history, self._what, self._clock = history, what, clock
        self._window: tuple[float, int] | None = None  # (start, bytes moved at the start)
        self._slow_since: float | None = None

    def restart(self, moved: int) -> None:
        """A new connection starts, with `moved` bytes already done (its wait for a first byte counts)."""
        self._window = (self._clock(), moved)
        self._slow_since = None

    def update(self, moved: int) -> None:
        now = self._clock()
        if self._window is None:
            self._window = (now, moved)
            return
        start, start_bytes = self._window
        if now - start < WINDOW_SECONDS:
            return
        rate = (moved - start_bytes) / (now - start)
        self._window = (now, moved)
        best = self._history.note(now, rate)
        unknown_link = best < FLOOR_BYTES_PER_S and self._history.may_probe(now)
        if rate >= FLOOR_BYTES_PER_S or not (rate < SLOW_FRACTION * best or unknown_link):
            self._slow_since = None
            return
        self._slow_since = start if self._slow_since is None else self._slow_since
        slow_for = now - self._slow_since
        if slow_for < (DOWNLOAD_STALL_SECONDS if self._history.resumable else STALL_SECONDS):
            return
        if rate < SLOW_FRACTION * best:
            raise TransferStalled(f"{self._what}: {_speed(rate)} for {slow_for:.0f} s against {_speed(best)} recently; giving up this connection")
        if self._history.probe(now):
            raise TransferStalled(
                f"{self._what}: {_speed(rate)} for {slow_for:.0f} s, and no connection has been faster lately; giving up this "
                "connection, to learn from a fresh one whether the link itself is this slow"
            )


def _speed(rate: float) -> str:
    return f"{rate / 1e6:.1f} MB/s" if rate >= 1e6 else f"{rate / 1e3:.1f} kB/s"


class WatchedReader(io.BufferedReader):
    """A file that huggingface_hub uploads from: each read is a piece the connection has taken, so the
    time between reads is the upload's speed. A seek to the start (huggingface_hub's retry, on a fresh
    connection) starts a new watch."""

    def __init__(self, path: Path, history: SpeedHistory, what: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._watch = StallWatch(history, what)
        self._start = 0

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = super().seek(offset, whence)
        self._start = position
        self._watch.restart(0)
        return position

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._watch.update(self.tell() - self._start)
        return data
