"""streamq with one of its costs taken out, to measure what that cost is: never a way to run it.

Used by `bench_pipeline.py`'s `unchecked` scenario, in that scenario's own process only, the way
`timeline.py` patches stage functions: nothing in streamq is changed for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _MatchesAny(str):
    """A digest equal to whatever it is compared with: the check passes without the hash."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


class _NoHash:
    """Stands in for streamq.sha256.ResumableSha256: takes the bytes, hashes none, saves no state."""

    def __init__(self, state: str | None = None) -> None:
        self.nbytes = 0

    def update(self, data: Any) -> None:
        self.nbytes += len(data)

    def state(self) -> None:
        return None

    def hexdigest(self) -> str:
        return _MatchesAny("unchecked")


@contextmanager
def input_check_removed() -> Iterator[None]:
    """Source files stream as usual (their hashing thread still takes every block) but are not hashed,
    and each passes its check: what the check of every input byte costs. No hash state is saved, so a
    run under it cannot resume mid-file."""
    import streamq.download as download

    saved = download.ResumableSha256
    download.ResumableSha256 = _NoHash
    try:
        yield
    finally:
        download.ResumableSha256 = saved
