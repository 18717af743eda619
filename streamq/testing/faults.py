"""Switchable network and server faults, for tests of what a client survives and what it surfaces.

A fault matches requests by method and a regex searched in the raw request path (no query string; revisions
appear URL-quoted, e.g. `refs%2Fpr%2F1`). It fires `times` times, or, with `probability`, on each matching
request with that chance from the set's seeded RNG. At most one fault acts on a request: the first that fires.

When each kind acts:
- instead of handling the request, so nothing is applied: `status` (an error answer, with `Retry-After` if
  given) and `reset_upload` (a TCP reset after reading `after_bytes` of the request body, at once if it has none);
- before handling it: `delay` waits `seconds`, then the request is handled normally;
- while the response body is sent, so the request was applied: `reset` (a TCP reset after `after_bytes` of the
  body: a download cut, or a commit whose answer is lost), `truncate` (`Content-Length` promises the whole body,
  the connection closes cleanly after `after_bytes`) and `throttle` (`chunk_size` pieces, `seconds` apart).
- while the body that carries the data moves (the request body of a PUT or POST, else the response body):
  `trickle` (the first `after_bytes` at full speed, then `chunk_size` bytes every `seconds`: a connection that
  never breaks, and never times out, but has all but stopped, as some proxies leave one).

Large files are served from storage URLs (`/storage/...`), not from `/resolve/`, which only redirects to them:
aim download faults at the path the bytes come from.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["status", "delay", "reset_upload", "reset", "truncate", "throttle", "trickle"]


@dataclass(eq=False)
class Fault:
    """One injected fault; build it with the class methods, e.g. `Fault.status(503, path=r"/resolve/", times=2)`.

    Every constructor takes `method` (None: any), `path` (regex, searched), `times` (None: unlimited) and
    `probability` (None: always, while `times` lasts). `fired` counts how often it acted.
    """

    kind: FaultKind
    method: str | None = None
    path: str = ""
    times: int | None = 1
    probability: float | None = None
    status_code: int = 0
    retry_after: int | None = None
    after_bytes: int = 0
    seconds: float = 0.0
    chunk_size: int = 0
    fired: int = 0
    _pattern: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path)
        if self.method is not None:
            self.method = self.method.upper()

    @classmethod
    def status(cls, code: int, *, retry_after: int | None = None, **where: Any) -> Fault:
        """Answer `code` (e.g. 500, 502, 503) with an error body, without handling the request."""
        return cls("status", status_code=code, retry_after=retry_after, **where)

    @classmethod
    def rate_limit(cls, retry_after: int = 0, **where: Any) -> Fault:
        """429 Too Many Requests with `Retry-After: retry_after` (the client waits it plus one second)."""
        return cls.status(429, retry_after=retry_after, **where)

    @classmethod
    def commit_fails(cls, **where: Any) -> Fault:
        """The commit endpoint answers 500 and applies nothing, e.g. after the LFS uploads went through."""
        return cls.status(500, **{"method": "POST", "path": r"/commit/", **where})

    @classmethod
    def delay(cls, seconds: float, **where: Any) -> Fault:
        """Wait before handling the request (then handle it normally): a slow server or a stalled connection."""
        return cls("delay", seconds=seconds, **where)

    @classmethod
    def reset_upload(cls, after_bytes: int = 0, **where: Any) -> Fault:
        """Reset the connection after reading `after_bytes` of the request body; the request is not applied."""
        return cls("reset_upload", after_bytes=after_bytes, **where)

    @classmethod
    def reset(cls, after_bytes: int = 0, **where: Any) -> Fault:
        """Reset the connection after `after_bytes` of the response body: mid-download, or a lost response."""
        return cls("reset", after_bytes=after_bytes, **where)

    @classmethod
    def truncate(cls, after_bytes: int, **where: Any) -> Fault:
        """Close the connection after `after_bytes` of a body whose `Content-Length` promised more."""
        return cls("truncate", after_bytes=after_bytes, **where)

    @classmethod
    def throttle(cls, chunk_size: int, seconds: float, **where: Any) -> Fault:
        """Send the response body in `chunk_size` pieces with `seconds` between them."""
        return cls("throttle", chunk_size=chunk_size, seconds=seconds, **where)

    @classmethod
    def trickle(cls, after_bytes: int, chunk_size: int, seconds: float, **where: Any) -> Fault:
        """After `after_bytes` at full speed, move `chunk_size` bytes every `seconds`: of the request body for a
        PUT or POST (an upload), else of the response body (a download)."""
        return cls("trickle", after_bytes=after_bytes, chunk_size=chunk_size, seconds=seconds, **where)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and self._pattern.search(path) is not None

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times


class FaultSet:
    """The faults a hub applies; safe to change from a test while requests are in flight."""

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._rng = random.Random(seed)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def seed(self, seed: int) -> None:
        """Restart the RNG behind probabilistic faults, to replay the same sequence of firings."""
        with self._lock:
            self._rng.seed(seed)

    def __iter__(self) -> Iterator[Fault]:
        with self._lock:
            return iter(list(self._faults))

    def take(self, method: str, path: str) -> Fault | None:
        """The fault that acts on this request, counted as fired; None if none does."""
        with self._lock:
            for fault in self._faults:
                if fault.spent or not fault.matches(method, path):
                    continue
                if fault.probability is not None and self._rng.random() >= fault.probability:
                    continue
                fault.fired += 1
                return fault
        return None
