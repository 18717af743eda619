"""streamq with one of its costs taken out, to measure what that cost is: never a way to run it.

Used by `bench_pipeline.py`'s `unchecked` scenario, in that scenario's own process only, the way
`timeline.py` patches stage functions: nothing in streamq is changed for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def input_check_removed() -> Iterator[None]:
    """Downloads keep their path (written piece by piece, reported as they arrive) but are not hashed,
    and the Hub's listed sha256 is taken as theirs: what the check of every input byte costs."""
    import streamq.fetch as fetch

    def discard(self: Any) -> None:  # the hashing thread: take the pieces, hash none
        while self._blocks.get() is not None:
            pass

    def unchecked(self: Any, path: str, work_dir: Path, arrival: Any = None) -> Any:
        local = work_dir / "in" / path
        self._download(path, local, arrival)
        return fetch.Fetched(local, self._files[path].sha256 or "", temporary=True)

    saved = fetch._PartialFile._hash, fetch.HubSource.fetch
    fetch._PartialFile._hash, fetch.HubSource.fetch = discard, unchecked
    try:
        yield
    finally:
        fetch._PartialFile._hash, fetch.HubSource.fetch = saved
