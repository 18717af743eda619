"""One conversion as the web app runs it: options, work directory, disk budget, and live progress.

Nothing here imports gradio: the page (`page.py`) only renders what `RunProgress` reports. The run
itself is `iter_requantize` on a thread of its own, because one step of it (a whole shard) can take
minutes and the page wants to show the phase, the bytes and the speed meanwhile.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import constants
from tqdm import tqdm

from ..errors import StreamqError
from ..gguf import GgufPlan
from ..location import HubRepo, parse_location
from ..budget import bytes_in
from ..pipeline import RequantizeResult, ShardRecord, iter_requantize, plan_requantize
from ..plan import Plan
from ..report import gguf_plan_summary, plan_summary
from ..surface import using
from ..workdir import ROOT_ENV, default_root, folder_for

logger = logging.getLogger("streamq.app")

# GGUF on the page: "gguf-" and llama.cpp's type name (the library's bf16 and GGUF's BF16 are different outputs).
# The page offers the usual types of settings.GGUF_TYPES; the library and the CLI take all of them.
GGUF_PREFIX = "gguf-"
PAGE_GGUF_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")
# The quant types the page offers, in order: name -> (label, whether bitsandbytes' double_quant and
# compute_dtype apply). Another output format is one more entry.
QUANT_TYPES: dict[str, tuple[str, bool]] = {
    "nf4": ("NF4 (bitsandbytes)", True),
    "fp4": ("FP4 (bitsandbytes)", True),
    "int4": ("int4 (compressed-tensors W4A16)", False),
    "bf16": ("bf16 (dequantize an FP8 or MXFP4 model)", False),
    **{f"{GGUF_PREFIX}{name}": (f"GGUF {name.upper()}", False) for name in PAGE_GGUF_TYPES},
}


def gguf_type(quant_type: str) -> str | None:
    """llama.cpp's type name of a page quant type ("gguf-q4_k_m" -> "q4_k_m"); None for a safetensors one."""
    return quant_type.removeprefix(GGUF_PREFIX) if quant_type.startswith(GGUF_PREFIX) else None

# Disk rule: two input shards plus one output shard keep the download busy all the time (README,
# Guarantees: Disk); the run never takes more than this share of the work disk's free space.
FREE_DISK_SHARE = 0.8

_one_run = threading.Lock()  # one conversion per process; the gradio queue also runs them one at a time


@dataclass(frozen=True)
class Conversion:
    """What the page or the API asked for (`output` may be empty for a plan). `token` None: HF_TOKEN or the
    saved login, as in huggingface_hub."""

    source: str
    output: str
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    private: bool = False
    group_size: int | None = None  # int4 only; None: the format's default
    overwrite: bool = False
    token: str | None = field(default=None, repr=False)  # never printed, logged or stored
    endpoint: str | None = None
    cluster: str | None = None  # the server's Ray cluster (`streamq app --cluster`), for the formats it runs

    def __post_init__(self) -> None:
        """Hub repos only: a page anyone may open must not read or write the server's own files."""
        for what, value in (("source", self.source), ("output", self.output)):
            if what == "output" and not value:
                continue  # a plan needs no output
            if not isinstance(parse_location(value, allow_revision=what == "source"), HubRepo):
                raise ValueError(f"the {what} must be a Hub repo id (org/name), not a local path: {value!r}")

    def options(self) -> dict[str, Any]:
        """Keyword options for `plan_requantize`/`iter_requantize` (bitsandbytes' own only where they apply)."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        options: dict[str, Any] = {"quant_type": self.quant_type, "token": self.token, "endpoint": self.endpoint}
        if gguf_type(self.quant_type):
            return options | {"format": "gguf", "quant_type": gguf_type(self.quant_type)}
        if QUANT_TYPES[self.quant_type][1]:
            options |= {"double_quant": self.double_quant, "compute_dtype": self.compute_dtype}
        if self.quant_type == "int4" and self.group_size is not None:
            options["blocksize"] = self.group_size
        return options


def one_line(message: str) -> str:
    """A message as one line: a few come in several (transformers' when llama.cpp's converter finds no tokenizer)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def plan_conversion(conversion: Conversion) -> dict[str, Any]:
    """`streamq plan` as data: shards, what is quantized, sizes, disk needed."""
    return summarize(plan_requantize(conversion.source, **conversion.options()))


def summarize(plan: Plan | GgufPlan) -> dict[str, Any]:
    """A plan as data, for either format (a GGUF summary says `"format": "gguf"`)."""
    return gguf_plan_summary(plan, downloads=True) if isinstance(plan, GgufPlan) else plan_summary(plan, downloads=True)


def default_output(source: str, quant_type: str, user: str | None) -> str:
    """`<user>/<model>-<quant type>`, the name bnb-my-repo gives, or gguf-my-repo's `<user>/<model>-Q4_K_M-GGUF`."""
    name = source.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    suffix = f"{gguf_type(quant_type).upper()}-GGUF" if gguf_type(quant_type) else quant_type
    return f"{user}/{name}-{suffix}" if user and name else ""


def work_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where conversions keep their partial downloads between restarts: the given directory, else
    STREAMQ_WORK_DIR, else a Space's persistent storage (/data) when it is mounted, else the temp dir."""
    chosen = explicit or os.environ.get(ROOT_ENV)
    if chosen:
        return Path(chosen).expanduser()
    data = Path("/data")
    if data.is_dir() and os.access(data, os.W_OK):
        return data / "streamq"
    return default_root()


def choose_disk_budget(summary: dict[str, Any], free: int) -> int | None:
    """The run's default budget (two output shards, the largest tensor and the read-ahead), or
    FREE_DISK_SHARE of the free space if that is less; None (the run's own check, which names the
    shortfall) when even that share is below the least the model needs."""
    cap = int(free * FREE_DISK_SHARE)
    if summary["disk_needed_bytes"] <= cap:
        return summary["disk_needed_bytes"]
    return cap if cap >= summary["disk_least_bytes"] else None


@dataclass
class Snapshot:
    """What the page shows while a run goes on, and after it ends."""

    phase: str
    shards_done: int
    shards_total: int
    shards_skipped: int
    bytes_done: int
    bytes_total: int
    work_dir_bytes: int
    disk_budget: int | None
    elapsed: float
    speed: float  # input bytes per second converted by this run (shards done earlier do not count)
    finished: bool
    result: RequantizeResult | None
    error: str | None


class RunProgress:
    """Runs one conversion on a thread of its own; `snapshot()` tells where it is, at any time."""

    def __init__(self, conversion: Conversion, root: Path) -> None:
        self.conversion, self.root = conversion, root
        self.work_dir = folder_for(root, parse_location(conversion.output), conversion.endpoint or constants.ENDPOINT)  # the run's, measured
        self.disk_budget: int | None = None
        self.bar: tqdm | None = None
        self.records: list[ShardRecord] = []
        self.result: RequantizeResult | None = None
        self.error: str | None = None
        self.waiting = False  # for an earlier run of this process (its page was closed) to end
        self._started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamq-app-run", daemon=True)

    def start(self) -> RunProgress:
        self._thread.start()
        return self

    def wait(self, timeout: float) -> bool:
        """Whether the run has ended, waiting at most `timeout` seconds."""
        return self._done.wait(timeout)

    def _run(self) -> None:
        try:
            if not _one_run.acquire(blocking=False):
                self.waiting = True
                _one_run.acquire()
            try:
                self.waiting, self._started = False, time.monotonic()  # the run's own clock starts with it
                with using("page"):  # messages name the page's controls
                    run = iter_requantize(
                        self.conversion.source, self.conversion.output, **self.conversion.options(),
                        private=self.conversion.private, overwrite=self.conversion.overwrite, work_dir=self.root,
                        disk_budget=self._choose_budget, progress=True, tqdm_class=_bar_class(self),
                        cluster=None if gguf_type(self.conversion.quant_type) else self.conversion.cluster,  # GGUF runs on the server
                    )
                    while True:
                        try:
                            self.records.append(next(run))
                        except StopIteration as done:
                            self.result = done.value
                            break
            finally:
                _one_run.release()
        except (StreamqError, ValueError) as exc:
            self.error = one_line(str(exc))
        except Exception as exc:  # a crash: one line on the page, its traceback once in the server's log
            logger.exception("the conversion crashed")
            self.error = f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            self._done.set()

    def _choose_budget(self, plan: Plan | GgufPlan) -> int | None:
        """The disk budget, from the run's own plan: the model is planned once, so the page's clock and the
        result's `elapsed` time the same run (a plan of the page's own first made the page's the longer)."""
        self.disk_budget = choose_disk_budget(summarize(plan), shutil.disk_usage(self.work_dir).free)
        return self.disk_budget

    def snapshot(self) -> Snapshot:
        bar, records = self.bar, list(self.records)
        done = [r for r in records if not r.skipped]
        # a finished run shows the result's own `elapsed`, the number the API returns
        elapsed = self.result.elapsed if self.result is not None else time.monotonic() - self._started
        phase = "planning (reading the model's config and headers)"
        if bar is not None:
            phase = " - ".join(p for p in (bar.desc, bar.postfix) if p) or phase
        if self.waiting:
            phase = "waiting for the run before this one to end"
        if self.error:
            phase = "failed"
        elif self.result is not None:
            phase = "done"
        total = records[0].total if records else 0
        return Snapshot(
            phase=phase,
            shards_done=len(records),
            shards_total=self.result.shards if self.result else total,
            shards_skipped=sum(1 for r in records if r.skipped),
            bytes_done=int(bar.n) if bar is not None else 0,
            bytes_total=int(bar.total or 0) if bar is not None else 0,
            work_dir_bytes=bytes_in(self.work_dir),
            disk_budget=self.disk_budget,
            elapsed=elapsed,
            speed=sum(r.input_bytes for r in done) / elapsed if elapsed > 0 else 0.0,
            finished=self._done.is_set(),
            result=self.result,
            error=self.error,
        )


def _bar_class(progress: RunProgress) -> type[tqdm]:
    """A tqdm that draws nothing and hands itself to `progress`, which reads its phase and counters."""

    class PageBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            progress.bar = self

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            return True

    return PageBar
