"""A cluster run's driver: it splits the plan into jobs, has Ray run them on the cluster's nodes, and
records and commits what they post, with the same manifest, commit budget and upload journal as a run
on one machine. Ray schedules the jobs and runs a job again elsewhere when its node is lost.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import ray
from tqdm.auto import tqdm

from ..download import ChecksumMismatch
from ..errors import StreamqError
from ..manifest import Manifest
from ..plan import Plan
from ..publish import HubSink
from ..report import human_size
from ..record import Record, ShardRecord, Written
from .board import Checked, Finished, Made, Message, Started, start_board
from .jobs import Job, downloaded_bytes, split_jobs
from .worker import JobContext, run_job

logger = logging.getLogger(__name__)

JOBS_PER_NODE = 2  # enough to even out jobs of unequal speed, few enough that shared files cost little
MAX_RETRIES = 3  # new starts of a job whose node (or worker process) is lost, before the run gives up
POLL_SECONDS = 0.5

_remote_job = ray.remote(run_job)


class ClusterScheduler:
    """Makes and publishes the output shards still to do on a Ray cluster; `close()` stops its jobs."""

    def __init__(self, address: str, plan: Plan, manifest: Manifest, sink: HubSink, context: JobContext, bar: tqdm) -> None:
        self.address, self.plan, self.manifest, self.sink, self.context, self.bar = address, plan, manifest, sink, context, bar
        self.record = Record(plan, manifest, sink, set(manifest.verified))
        self._connected = False
        self._tasks: dict[Any, tuple[Job, int]] = {}  # running -> its job and how many times it has been started
        self._board: Any = None
        self._plan: Any = None
        self._options: dict[str, Any] = {}
        self._nodes: dict[int, str] = {}  # job -> the node it last started on
        self._finished: set[int] = set()

    def input_bytes(self, index: int) -> int:
        return self.record.input_bytes(index)

    def run(self, todo: list[int]) -> Iterator[ShardRecord]:
        """Yield a record per output shard of `todo` as the driver commits or batches it (in the order
        jobs finish them)."""
        self.record.promote_ready()  # pending shards of an earlier run whose files were checked since
        layout = self.plan.layout
        assert layout is not None
        file_index = {s.name: i for i, s in enumerate(self.plan.shards)}
        needed = {f for i in todo for f in layout.outputs[i].files} | {f for e in self.manifest.pending.values() for f in e.inputs}
        unchecked = {file_index[f] for f in needed if f not in self.record.checked}
        if not todo and not unchecked:
            return
        nodes = self._connect()
        jobs = split_jobs(self.plan, todo, unchecked, JOBS_PER_NODE * len(nodes))
        logger.info(
            "%d jobs on %d nodes; they download %s in all, for %s of source files",
            len(jobs), len(nodes), human_size(downloaded_bytes(self.plan, jobs)), human_size(sum(s.size for s in self.plan.shards)),
        )
        self._board = start_board()
        self._plan = ray.put(self.plan)  # the headers' plan, once for all jobs
        self._options = {
            "num_cpus": min(n["Resources"]["CPU"] for n in nodes), "num_gpus": 1 if self.context.device == "cuda" else 0,
            "max_retries": 0,  # a job whose node is lost is started again by `run`, without what it already published
        }
        for job in jobs:
            self._start(job, 1)
        self.bar.set_description(f"{len(jobs)} jobs on {len(nodes)} nodes")
        while self._tasks:
            finished, _ = ray.wait(list(self._tasks), num_returns=len(self._tasks), timeout=POLL_SECONDS)
            yield from self._take(ray.get(self._board.take.remote()))
            for task in finished:
                job, starts = self._tasks.pop(task)
                try:
                    posted = ray.get(task)
                except ray.exceptions.RayTaskError as exc:  # the job raised: the run ends with its error
                    yield from self._take(ray.get(self._board.take.remote()))
                    raise self._error(exc) from exc
                except ray.exceptions.RayError as exc:  # its node or worker process was lost
                    self._again(job, starts, exc)
                    continue
                yield from self._take(posted)

    def _start(self, job: Job, starts: int) -> None:
        self._tasks[_remote_job.options(**self._options).remote(job, self._plan, self.context, self._board)] = (job, starts)

    def _again(self, job: Job, starts: int, exc: Exception) -> None:
        """Start a job whose node was lost once more, on whichever node Ray finds, for what it has not published."""
        outputs = tuple(i for i in job.outputs if self.plan.outputs[i].name not in self.record.recorded)
        checks = tuple(f for f in job.checks if self.plan.shards[f].name not in self.record.checked)
        node = self._nodes.get(job.index, "?")
        if starts > MAX_RETRIES:
            raise StreamqError(f"job {job.index} lost its node {starts} times (last {node}: {type(exc).__name__}); run again to resume with what the other jobs published")
        logger.warning(
            "job %d lost its node %s (%s); it runs again on another node, for the %d of its %d shards not published yet",
            job.index, node, type(exc).__name__, len(outputs), len(job.outputs),
        )
        self._start(replace(job, outputs=outputs, checks=checks), starts + 1)

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

    def _take(self, messages: list[Message]) -> Iterator[ShardRecord]:
        """Record what the jobs posted (a finished job's return repeats its posts: each is taken once)."""
        for message in messages:
            if isinstance(message, Started):
                logger.info("job %d started on node %s", message.job, message.node)
                self._nodes[message.job] = message.node
            elif isinstance(message, Finished):
                if message.job not in self._finished:  # a finished job's return repeats it
                    self._finished.add(message.job)
                    logger.info(
                        "job %d done on node %s: its work folder held at most %s of its %s budget; the worker's peak RSS %s",
                        message.job, self._nodes.get(message.job, "?"), human_size(message.peak_disk), human_size(message.disk_budget),
                        human_size(message.peak_rss), extra={"job_end": message},
                    )
            elif isinstance(message, Checked):
                name = self.plan.shards[message.file].name
                if name not in self.record.checked:
                    self.record.promote(name)
            elif self.plan.outputs[message.index].name not in self.record.recorded and self.record.refused(message.index) is None:
                yield self._add(message)

    def _add(self, made: Made) -> ShardRecord:
        name = self.plan.outputs[made.index].name
        self.bar.set_postfix_str(f"publishing {name}")
        written = Written(made.size, made.sha256, made.tensor_bytes, made.keys, Counter(made.stats))
        record = self.record.add(made.index, written, lambda remaining: self.sink.add_uploaded(name, self.manifest, remaining))
        self.bar.update(record.input_bytes)
        return record

    def _error(self, exc: ray.exceptions.RayTaskError) -> Exception:
        """What a failed job ends the run with: its own error (one line), or a line that names the job."""
        cause = exc.cause
        if isinstance(cause, ChecksumMismatch):
            self.record.discard(self.plan.shards[cause.file].name)
            return self.record.dropped(str(cause))
        if isinstance(cause, StreamqError):
            return cause
        text = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        return StreamqError(f"a job failed on the cluster: {type(cause).__name__}: {text}; run again to resume")

    def close(self) -> None:
        """Stop the jobs still running (what they published is recorded already) and leave the cluster."""
        for task in self._tasks:
            ray.cancel(task, force=True)
        if self._board is not None:
            ray.kill(self._board)
        if self._connected:
            ray.shutdown()
