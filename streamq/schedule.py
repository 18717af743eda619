"""Run the shard jobs with overlap, within a disk budget.

A shard is quantized (main thread) while it downloads (fetch thread, running ahead in shard order as
far as the budget allows), and the previous one is published meanwhile (publish thread; each output
is hashed on a thread of its own first, so uploads follow each other without a gap, unless nothing
is uploading: then the hash is the upload's only wait and is taken at once). Every file
in work_dir is reserved in a `DiskBudget` first, so the overlap never holds more than the budget;
with the default budget of one input plus one output shard, the next download waits until this
shard's input is deleted. Publishing is strictly in order and stops at the first failure, so the
manifest never lists a shard after one that did not make it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .budget import DiskBudget, disk_full_is_clear
from .arrival import Arrival, Cancelled
from .convert import Converted, convert_arriving
from .errors import StreamqError
from .fetch import Fetched, Source
from .manifest import Manifest
from .plan import Plan, ShardPlan, expected_output_size
from .publish import Sink
from .quantize import warm_up


@dataclass(frozen=True)
class ShardRecord:
    """One shard, as published (or found already published by an earlier run)."""

    index: int
    total: int
    name: str
    input_bytes: int
    output_bytes: int
    skipped: bool  # done by an earlier run: not downloaded again
    committed: bool  # False while its bytes are uploaded but wait for a later commit
    seconds: float


def _fetch_reporting(source: Source, name: str, work: Path, arrival: Arrival) -> Fetched:
    """Fetch `name` into `work`, telling `arrival` how the download ended."""
    try:
        with disk_full_is_clear(work):
            fetched = source.fetch(name, work, arrival)
    except BaseException:
        arrival.fail()
        raise
    arrival.finish()
    return fetched


class HeadStart:
    """The first shard's download, begun while the run is still planned (reading headers and building
    the model take as long as a good part of a shard's download), on a fresh output only: a run
    that resumes may have that shard done already. The scheduler adopts it; if it is not adopted,
    `cancel` stops it and deletes what it wrote."""

    def __init__(self, source: Source, name: str, work: Path, fresh_output: Callable[[], bool]) -> None:
        self.name, self.arrival = name, Arrival()
        self._source, self._work, self._fresh_output = source, work, fresh_output
        self._decided = threading.Event()
        self._started = False
        self._thread = ThreadPoolExecutor(1, "streamq-head-start")
        self.future: Future[Fetched] = self._thread.submit(self._fetch)
        self.adopted = False
        self._cancelled = False

    def started(self) -> bool:
        """Whether it downloads (it first checks that the output is fresh)."""
        self._decided.wait()
        return self._started

    def _fetch(self) -> Fetched:
        try:
            self._started = self._fresh_output()
        finally:
            self._decided.set()
        if not self._started:
            raise Cancelled()
        return _fetch_reporting(self._source, self.name, self._work, self.arrival)

    def adopt(self) -> Arrival:
        """Take it over as the run's first download (`cancel` then only waits for it); its arrival."""
        self.adopted = True
        return self.arrival

    def cancel(self) -> None:
        """Unless adopted: stop the download and delete its file. Either way, wait for its thread."""
        if self._cancelled:
            return
        self._cancelled = True
        if not self.adopted:
            self.arrival.cancel()
        self._thread.shutdown(wait=True)
        if not self.adopted:
            self.arrival.close()
            try:
                fetched = self.future.result()
            except Exception:
                return  # cancelled (the download deleted its partial file) or failed
            if fetched.temporary:
                fetched.path.unlink(missing_ok=True)


class ShardScheduler:
    """Converts and publishes the shards still to do; `close()` stops the helper threads."""

    def __init__(
        self, source: Source, sink: Sink, plan: Plan, manifest: Manifest, work: Path, device: str, budget: DiskBudget,
        downloads: bool, bar: tqdm,
    ) -> None:
        self.source, self.sink, self.plan, self.manifest = source, sink, plan, manifest
        self.work, self.device, self.budget, self.bar = work, device, budget, bar
        self.downloads = downloads
        self.numbers = {s.name: i for i, s in enumerate(plan.shards, 1)}
        self._fetcher = ThreadPoolExecutor(1, "streamq-fetch")
        self._hasher = ThreadPoolExecutor(1, "streamq-output-sha256")  # beside the uploads, not in line with them
        self._publisher = ThreadPoolExecutor(1, "streamq-publish")
        self._fetch_failed = threading.Event()
        self._publish_failed = threading.Event()
        self._published: deque[Future[ShardRecord]] = deque()
        self._arrivals: list[Arrival] = []
        self._after: dict[str, int] = {}  # shard -> shards of this run after it

    def run(self, todo: list[ShardPlan], head: HeadStart | None = None) -> Iterator[ShardRecord]:
        """Yield a record per shard of `todo`, in order, as each is published; `head`, if given, is the
        download of `todo[0]` already under way."""
        outputs = {shard.name: expected_output_size(shard, self.plan) for shard in todo}
        self._after = {shard.name: len(todo) - 1 - i for i, shard in enumerate(todo)}
        self._arrivals = [Arrival() for _ in todo]
        fetches = []
        if head is not None:  # the next download queues behind it, as behind any other
            self._arrivals[0] = head.adopt()
            fetches.append(self._fetcher.submit(self._adopt, head, todo[0], outputs[todo[0].name]))
        fetches += [  # run ahead, in order
            self._fetcher.submit(self._fetch, shard, outputs[shard.name], arrival)
            for shard, arrival in zip(todo[len(fetches):], self._arrivals[len(fetches):])
        ]
        if todo:
            warm_up(self.plan, self.device)  # while the first shard starts downloading
        for shard, fetch, arrival in zip(todo, fetches, self._arrivals):
            started = time.monotonic()
            yield from self._completed()
            self._phase(shard, "download + quantize")

            def make_room(shard: ShardPlan = shard) -> None:  # the input is deleted: its space goes to the output
                self.budget.release_input(self._input_size(shard))
                self.budget.reserve_output(outputs[shard.name])

            with disk_full_is_clear(self.work):
                converted = convert_arriving(arrival, fetch.result, shard, self.plan, self.work, self.device, make_room)
            digest = self._digest(converted)
            self._published.append(self._publisher.submit(self._publish, converted, digest, outputs[shard.name], started))
            yield from self._completed()
        while self._published:
            yield self._published.popleft().result()
        self.bar.set_postfix_str("")

    def close(self) -> None:
        """Wake a fetch waiting for space, let a running download finish and drop queued ones; shards
        already converted are still published (in order, stopping at a failure), so no work is lost."""
        self.budget.close()
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        self._publisher.shutdown(wait=True)  # waits for the hashes it still needs
        self._hasher.shutdown(wait=True)
        for arrival in self._arrivals:
            arrival.close()

    def _input_size(self, shard: ShardPlan) -> int:
        return shard.size if self.downloads else 0  # a local source is read in place

    def _phase(self, shard: ShardPlan, phase: str) -> None:
        self.bar.set_description(f"shard {self.numbers[shard.name]}/{len(self.plan.shards)} {phase}")

    def _fetch(self, shard: ShardPlan, output_size: int, arrival: Arrival) -> Fetched:
        try:
            if self._fetch_failed.is_set():
                raise StreamqError(f"{shard.name} not downloaded: an earlier download failed")
            self.budget.reserve_input(self._input_size(shard), output_size)
            return _fetch_reporting(self.source, shard.name, self.work, arrival)
        except BaseException:
            self._fetch_failed.set()
            arrival.fail()
            raise

    def _adopt(self, head: HeadStart, shard: ShardPlan, output_size: int) -> Fetched:
        """The head start's download, counted in the budget like any other (it is the first, so it fits)."""
        try:
            self.budget.reserve_input(self._input_size(shard), output_size)
            return head.future.result()
        except BaseException:
            self._fetch_failed.set()
            raise

    def _digest(self, converted: Converted) -> Future[str]:
        """The output's sha256, which its upload waits for. While earlier shards still upload, it is
        taken on the hasher thread, beside them; when nothing uploads (the first shard, or after a
        stall) the upload waits for the hash alone, so it is taken here, before the next shard's
        quantization competes with it and delays the first upload."""
        if any(not published.done() for published in self._published):
            return self._hasher.submit(converted.output_sha256)
        digest: Future[str] = Future()
        try:
            digest.set_result(converted.output_sha256())
        except Exception as exc:  # reported by the publish step, as from the hasher thread
            digest.set_exception(exc)
        return digest

    def _publish(self, converted: Converted, digest: Future[str], reserved: int, started: float) -> ShardRecord:
        shard = converted.shard
        try:
            if self._publish_failed.is_set():
                raise StreamqError(f"{shard.name} not published: an earlier shard failed")
            self.bar.set_postfix_str(f"publishing {shard.name}")
            entry = converted.entry(digest.result())
            self.manifest.shards[shard.name] = entry  # only this thread touches the manifest while shards run
            try:
                committed = self.sink.add_shard(converted.path, shard.name, self.manifest, remaining=self._after[shard.name])
            except BaseException:
                del self.manifest.shards[shard.name]
                self._publish_failed.set()
                raise
        finally:
            self.budget.release_output(reserved)
        self.bar.update(shard.size)
        number = self.numbers[shard.name]
        return ShardRecord(number, len(self.plan.shards), shard.name, shard.size, entry.output_size, False, committed, time.monotonic() - started)

    def _completed(self) -> Iterator[ShardRecord]:
        """Records of the shards published so far, in order; re-raises a failed publish here."""
        while self._published and self._published[0].done():
            yield self._published.popleft().result()
