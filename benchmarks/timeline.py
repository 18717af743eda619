"""When each stage of a run starts and ends, by thread: what a wall-time ratio alone cannot say.

Used by `bench_pipeline.py --timeline`. It wraps, in the scenario's own process, the functions that
mark streamq's stages (planning, each download, each shard's conversion, output hashing, each upload
and commit, finishing) and the `huggingface_hub` calls the raw transfer makes, and records
`(stage, detail, thread, start, end)` on `time.perf_counter()`'s clock. Nothing in streamq is changed
for it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Event = tuple[str, str, str, float, float]


def _shard_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The first argument that names a shard or a file, shortened (model-00003-of-00010 -> 3)."""
    for value in (*args, *kwargs.values()):
        name = getattr(value, "name", None) if not isinstance(value, str) else value
        if isinstance(name, str) and name.endswith(".safetensors"):
            return name.split("-")[1].lstrip("0") or "0"
        path = getattr(value, "path", None)  # a Converted
        if path is not None and str(path).endswith(".safetensors"):
            return str(path).rsplit("-", 3)[1].lstrip("0") or "0"
    return ""


@contextmanager
def recording() -> Iterator[list[Event]]:
    """Patch the stage functions for the duration; the list fills as stages end."""
    import huggingface_hub
    from huggingface_hub import HfApi

    import streamq.convert
    import streamq.pipeline
    import streamq.publish
    import streamq.schedule

    events: list[Event] = []
    targets: list[tuple[Any, str, str]] = [
        (streamq.pipeline, "build_plan", "plan"),
        (streamq.pipeline, "_open_manifest", "manifest"),
        (streamq.pipeline, "_final_files", "final files"),
        (streamq.publish.HubSink, "__init__", "output repo"),
        (streamq.publish.HubSink, "finalize", "finalize"),
        (streamq.schedule, "download", "download"),  # the download thread, all its files
        (streamq.schedule, "warm_up", "warm up"),
        (streamq.convert.SafetensorsWriter, "finalize", "shard written"),
        (streamq.schedule, "file_sha256", "out sha256"),
        (HfApi, "preupload_lfs_files", "upload"),
        (HfApi, "create_commit", "commit"),
        (huggingface_hub, "hf_hub_download", "download"),
    ]
    targets = [t for t in targets if hasattr(t[0], t[1])]  # streamq's stages change; a missing one is not timed
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]

    def timed(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ops = kwargs.get("additions") or (args[2] if stage == "upload" and len(args) > 2 else None)
                detail = _shard_of(tuple(getattr(op, "path_in_repo", op) for op in ops or ()), {}) or _shard_of(args, kwargs)
                events.append((stage, detail, threading.current_thread().name, start, time.perf_counter()))

        return wrapper

    for owner, attr, stage in targets:
        setattr(owner, attr, timed(getattr(owner, attr), stage))
    try:
        yield events
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def render(events: list[list[Any]], indent: str = "    ") -> str:
    """One line per stage, in order of start: 'start-end seconds stage shard [thread]'."""
    lines = []
    for stage, detail, thread, start, end in sorted(events, key=lambda e: e[3]):
        lines.append(f"{indent}{start:6.2f}-{end:6.2f} {end - start:5.2f}s  {stage:<12} {detail:>3}  [{thread}]")
    return "\n".join(lines)
