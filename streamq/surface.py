"""Which surface the user is on (the Python API, the CLI, the web page), so that a message tells them what
to do with that surface's own controls: `overwrite=True`, `--overwrite`, or the page's box.

The CLI and the page enter theirs with `using`; a thread a run starts takes its starter's (`adopt`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

Surface = Literal["api", "cli", "page"]

_current: ContextVar[Surface] = ContextVar("streamq_surface", default="api")

# What to do, by surface. The page has no work_dir, disk_budget or max_shard_size of its own (the server's
# `streamq app --work-dir` decides the disk) and never runs a model's own code.
_REMEDIES: dict[str, dict[Surface, str]] = {
    "overwrite": {"api": "pass overwrite=True", "cli": "pass --overwrite", "page": "tick “Overwrite an existing output”"},
    "log_in": {
        "api": "log in (HF_TOKEN, `hf auth login`, or token=)",
        "cli": "log in (HF_TOKEN, `hf auth login`, or --token)",
        "page": "log in (the page's Log in button; a script passes oauth_token=)",
    },
    "trust_remote_code": {
        "api": "pass trust_remote_code=True",
        "cli": "pass --trust-remote-code",
        "page": "convert it with `streamq requantize --trust-remote-code` (the page never runs a model's code)",
    },
    "less_disk": {
        "api": "lower disk_budget or max_shard_size, or pass a work_dir on a larger disk",
        "cli": "lower --disk-budget or --max-shard-size, or pass a --work-dir on a larger disk",
        "page": "start the page with a `streamq app --work-dir` on a larger disk",
    },
    "more_budget": {
        "api": "raise disk_budget, or lower max_shard_size",
        "cli": "raise --disk-budget, or lower --max-shard-size",
        "page": "start the page with a `streamq app --work-dir` on a larger disk",
    },
    "writable_work_dir": {
        "api": "pass a writable work_dir",
        "cli": "pass a writable --work-dir",
        "page": "start the page with a writable `streamq app --work-dir` (or STREAMQ_WORK_DIR)",
    },
    "other_work_dir": {
        "api": "pass another work_dir",
        "cli": "pass another --work-dir",
        "page": "wait: the other run holds the server's work directory for this output",
    },
    "drop_bnb_options": {
        "api": "drop double_quant and compute_dtype",
        "cli": "drop --no-double-quant and --compute-dtype",
        "page": "leave double quant and compute dtype as they are",
    },
}


def remedy(name: str) -> str:
    """What the user does, in the words of the surface they are on."""
    return _REMEDIES[name][_current.get()]


def current() -> Surface:
    return _current.get()


@contextmanager
def using(surface: Surface) -> Iterator[None]:
    token = _current.set(surface)
    try:
        yield
    finally:
        _current.reset(token)


def adopt(surface: Surface) -> None:
    """A worker thread's initializer: messages it raises speak to the surface that started the run."""
    _current.set(surface)
