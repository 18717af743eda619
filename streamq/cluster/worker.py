"""A cluster job, run as a Ray task on a worker node: it downloads its byte ranges of the source from
the Hub, converts them on the node, and uploads its output shards' bytes to the Hub from the node, as a
run on one machine does, within the same disk budget. It posts each uploaded shard and each checked
source file to the board; the driver records and commits them.
"""

from __future__ import annotations

import contextvars
import resource
from contextlib import ExitStack
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch

from .. import __version__
from ..budget import DiskBudget, disk_full_is_clear, pools
from ..convert import Made as MadeShard
from ..convert import convert_stream
from ..download import InputFile, download
from ..errors import InsufficientDiskError, StreamqError
from ..fetch import HubSource, file_sha256
from ..hub import make_api
from ..layout import Position
from ..plan import Plan
from ..publish import upload_shard
from ..stall import SpeedHistory
from ..window import Window, WindowFailed
from ..workdir import default_root
from .board import Checked, Finished, Made, Message, Started
from .jobs import Job, JobContext, job_reads


def run_job(job: Job, plan: Plan, context: JobContext, board: Any) -> list[Message]:
    """Make and upload the job's output shards, check its files, posting each as it is done; returns
    all it posted (a post may still be on its way when the driver sees the job end).

    Nothing here waits on Ray (`ray.get`): Ray lends a waiting task's CPUs to another task, which would
    put two jobs, and twice the disk and memory, on one node."""
    node = ray.get_runtime_context().get_node_id()[:8]
    if context.version != __version__:
        raise StreamqError(f"node {node} runs streamq {__version__} but the driver runs {context.version}; install the same version on every node")
    board.post.remote(Started(job.index, node))
    torch.set_num_threads(context.threads)  # the bytes a run on the driver's machine writes (Ray gives a task one thread per CPU)
    posted: list[Message] = []
    outputs, checks = list(job.outputs), list(job.checks)
    layout = plan.layout
    assert layout is not None
    files = [InputFile(s.name, s.size, s.sha256 or "") for s in plan.shards]
    sizes = [f.size for f in files]
    reads = job_reads(plan, outputs, checks)
    window_pool, output_pool = pools(plan.largest_tensor(), plan.output_pair(), True, context.disk_budget)
    root = default_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if window_pool + output_pool > free:
        raise InsufficientDiskError(
            f"node {node}: {root} needs {(window_pool + output_pool) / 1e9:.2f} GB for a job but has {free / 1e9:.2f} GB free; "
            "free some space there, or set STREAMQ_WORK_DIR on the nodes to a larger disk"
        )
    work = Path(tempfile.mkdtemp(prefix=f"job{job.index}-", dir=root))
    (work / "out").mkdir()
    budget = DiskBudget(window_pool, output_pool)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stack.callback(budget.close)
        api = make_api(context.token, context.endpoint)
        source = HubSource(api, context.source, context.revision)
        floor = min((layout.outputs[i].start for i in outputs), default=Position(1 << 62, 0))
        window = Window(work / "in", budget, layout.order, sizes, floor)
        failure: list[BaseException] = []

        def post(message: Message) -> None:
            posted.append(message)
            board.post.remote(message)

        def fetch() -> None:
            try:
                download(source, files, reads, lambda file, size: [], window, lambda file, point: None, lambda file: post(Checked(job.index, file)))
            except BaseException as exc:
                failure.append(exc)
                window.fail(exc)

        downloader = threading.Thread(target=contextvars.copy_context().run, args=(fetch,), name="streamq-download", daemon=True)
        downloader.start()
        stack.callback(downloader.join)
        stack.callback(window.cancel)  # a failed job stops its download before waiting for it
        history = SpeedHistory()
        uploads: list[Future[None]] = []

        def publish(shard: MadeShard) -> None:
            try:
                sha = file_sha256(shard.written.path)
                upload_shard(api, context.output, context.branch, shard.written.path, shard.shard.name, sha, history)
                post(Made(job.index, shard.index, shard.written.size, sha, shard.written.tensor_bytes, shard.written.keys, dict(shard.stats)))
            finally:
                budget.release("output", shard.shard.expected_size)

        with ThreadPoolExecutor(1, "streamq-publish") as publisher, disk_full_is_clear(work):
            try:
                if outputs:
                    for shard in convert_stream(plan, layout, window, set(outputs), floor, work / "out", context.device, budget):
                        uploads.append(publisher.submit(publish, shard))
                        for done in [u for u in uploads if u.done()]:
                            done.result()
            except WindowFailed:
                downloader.join()
                raise failure[0] from None
            window.stop_keeping()  # the rest of a checked file is read for its sha256 alone
            downloader.join()
            if failure:
                raise failure[0]
            for upload in uploads:
                upload.result()
        post(Finished(job.index, budget.peak, budget.limit, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
        return posted
