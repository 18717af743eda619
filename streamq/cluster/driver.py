"""A cluster run's driver: it splits the plan into jobs, has Ray run them on the cluster's nodes, and
records and commits what they post, with the same manifest, commit budget and upload journal as a run
on one machine. Ray schedules the jobs and runs a job again elsewhere when its node is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ray
from tqdm.auto import tqdm

from ..errors import StreamqError
from ..manifest import Manifest
from ..plan import Plan
from ..publish import HubSink
from ..report import human_size
from ..record import Record, ShardRecord, Written
from .board import Checked, Made, start_board
from .jobs import downloaded_bytes, split_jobs
from .worker import JobContext, run_job

logger = logging.getLogger(__name__)

JOBS_PER_NODE = 2  # enough to even out jobs of unequal speed, few enough that shared files cost little
MAX_RETRIES = 3  # runs of a job whose node (or worker process) is lost, before the run gives up
POLL_SECONDS = 0.5

_remote_job = ray.remote(run_job)


class ClusterScheduler:
    """Makes and publishes the output shards still to do on a Ray cluster; `close()` stops its jobs."""

    def __init__(self, address: str, plan: Plan, manifest: Manifest, sink: HubSink, context: JobContext, bar: tqdm) -> None:
        self.address, self.plan, self.manifest, self.sink, self.context, self.bar = address, plan, manifest, sink, context, bar
        self.record = Record(plan, manifest, sink, set(manifest.verified))
        self._connected = False
        self._tasks: dict[Any, int] = {}
        self._board: Any = None
        self._failed_file: str | None = None

    def input_bytes(self, index: int) -> int:
        return self.record.input_bytes(index)

    def run(self, todo: list[int]) -> Iterator[ShardRecord]:
        """Yield a record per output shard of `todo` as the driver commits or batches it (in the order
        jobs finish them)."""
        self.record.promote_ready()  # pending shards of an earlier run whose files were checked since
        layout = self.plan.layout
        assert layout is not None
        names = [s.name for s in self.plan.shards]
        sizes = [s.size for s in self.plan.shards]
        needed = {f for i in todo for f in layout.outputs[i].files} | {f for e in self.manifest.pending.values() for f in e.inputs}
        unchecked = {names.index(f) for f in needed if f not in self.record.checked}
        if not todo and not unchecked:
            return
        nodes = self._connect()
        jobs = split_jobs(layout, sizes, todo, unchecked, JOBS_PER_NODE * len(nodes))
        logger.info(
            "%d jobs on %d nodes; they download %s in all, for %s of source files",
            len(jobs), len(nodes), human_size(downloaded_bytes(layout, sizes, jobs)), human_size(sum(sizes)),
        )
        checked = {i for i, name in enumerate(names) if name in self.record.checked}
        self._board = start_board({i for i in range(len(layout.outputs)) if i not in todo}, checked)
        plan = ray.put(self.plan)  # the headers' plan, once for all jobs
        options = {
            "num_cpus": min(n["Resources"]["CPU"] for n in nodes), "num_gpus": 1 if self.context.device == "cuda" else 0,
            "max_retries": MAX_RETRIES, "retry_exceptions": False,
        }
        self._tasks = {_remote_job.options(**options).remote(job, plan, self.context, self._board): job.index for job in jobs}
        self.bar.set_description(f"{len(jobs)} jobs on {len(nodes)} nodes")
        running = list(self._tasks)
        while running:
            finished, running = ray.wait(running, num_returns=len(running), timeout=POLL_SECONDS)
            yield from self._take()
            for task in finished:
                try:
                    ray.get(task)
                except Exception as exc:
                    yield from self._take()  # what the job did before it failed (a file that failed its check drops its shards)
                    raise self._error(exc, self._tasks[task]) from exc
        yield from self._take()

    def _connect(self) -> list[dict[str, Any]]:
        """The cluster's alive nodes that can run a job."""
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise StreamqError(f"cannot reach the Ray cluster at {self.address} ({exc}); start it (ray start --head) or pass its address") from exc
            self._connected = True
        resource = "GPU" if self.context.device == "cuda" else "CPU"
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource, 0) >= 1]
        if not nodes:
            raise StreamqError(f"the Ray cluster at {self.address} has no node with a {resource}; add worker nodes, or run without cluster")
        return nodes

    def _take(self) -> Iterator[ShardRecord]:
        """Record what the jobs posted since the last look."""
        for message in ray.get(self._board.take.remote()):
            name = self.plan.shards[message.file].name if isinstance(message, Checked) else None
            if isinstance(message, Checked) and message.ok:
                self.record.promote(name)
            elif isinstance(message, Checked):
                self._failed_file = message.message
                self.record.discard(name)
            elif isinstance(message, Made) and self.record.refused(message.index) is None:
                yield self._add(message)

    def _add(self, made: Made) -> ShardRecord:
        name = self.plan.outputs[made.index].name
        self.bar.set_postfix_str(f"publishing {name}")
        written = Written(made.size, made.sha256, made.tensor_bytes, made.keys, made.stats)
        record = self.record.add(made.index, written, lambda remaining: self.sink.add_uploaded(name, self.manifest, remaining))
        self.bar.update(record.input_bytes)
        return record

    def _error(self, exc: Exception, job: int) -> StreamqError:
        """The one line a failed job ends the run with."""
        cause = getattr(exc, "cause", None)
        if self._failed_file is not None:
            return self.record.dropped(self._failed_file)
        if isinstance(cause, StreamqError):
            return type(cause)(str(cause))
        if isinstance(exc, (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.OwnerDiedError)):
            return StreamqError(f"job {job} lost its node {MAX_RETRIES + 1} times; run again to resume with what the other jobs published")
        what = cause if cause is not None else exc
        return StreamqError(f"job {job} failed on the cluster: {type(what).__name__}: {str(what).splitlines()[0] if str(what) else ''}; run again to resume")

    def close(self) -> None:
        """Stop the jobs still running (what they published is recorded already) and leave the cluster."""
        for task in self._tasks:
            ray.cancel(task, force=True)
        if self._board is not None:
            ray.kill(self._board)
        if self._connected:
            ray.shutdown()
