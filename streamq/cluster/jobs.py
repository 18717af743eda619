"""A cluster run's jobs: consecutive output shards, the byte ranges of the source they read, and the
source files whose sha256 each one checks.

A job reads the span of the stream its output shards are made from. A source file's sha256 needs every
byte of it in order, so each file that must be checked is checked by one job, the one that reads most
of it, which reads the rest of it too; a file that two jobs share costs that rest a second time. The
cuts between jobs are placed where that costs least, near even shares of the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..download import Checkpoint, Read
from ..layout import Layout, source_bytes
from ..plan import Plan

CUT_SLACK = 0.25  # a cut may move this share of a job's size away from the even split, to a cheaper place


@dataclass(frozen=True)
class JobContext:
    """What every job of a run shares besides the plan: where to read and write, and how."""

    endpoint: str
    token: str | None
    source: str
    revision: str  # the commit the driver planned from
    output: str
    branch: str | None
    device: str
    disk_budget: int | None
    version: str  # the driver's streamq: every node must run the same
    threads: int  # torch's thread count on the driver: NF4's double-quant offset is a float32 mean whose last bits depend on it


@dataclass(frozen=True)
class Job:
    index: int
    outputs: tuple[int, ...]  # indices of the layout's output shards, in stream order
    checks: tuple[int, ...]  # source files (indices) whose sha256 this job checks


def spans(plan: Plan, outputs: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Per source file, the byte range [start, end) the output shards' stored tensors lie in."""
    layout = _layout(plan)
    found: dict[int, tuple[int, int]] = {}
    for index in outputs:
        for item in layout.outputs[index].items:
            for part in layout.parts[item]:
                s = plan.stored_at[part]
                lo, hi = found.get(s.file, (s.start, s.end))
                found[s.file] = (min(lo, s.start), max(hi, s.end))
    return found


def job_reads(plan: Plan, outputs: Iterable[int], checks: Iterable[int]) -> list[Read]:
    """What a job downloads: each checked file whole, from its first byte; of the others, the span its
    output shards need, by one ranged read."""
    reads = {f: Read(f, Checkpoint(0, None)) for f in checks}
    for f, (start, end) in spans(plan, outputs).items():
        if f not in reads:
            reads[f] = Read(f, Checkpoint(start, None), end, check=False)
    return [reads[f] for f in sorted(reads)]


def split_jobs(plan: Plan, todo: list[int], unchecked: set[int], count: int) -> list[Job]:
    """Cut `todo` (output indices, in order) into at most `count` jobs of about even input, and give each
    file of `unchecked` (source file indices) to the job that reads most of it; a file no job reads
    (it only holds tensors of shards waiting for its check) gets a job of its own."""
    weights = [source_bytes(_layout(plan), plan.stored_at, i) for i in todo]
    cuts = _cuts(plan, todo, weights, max(1, min(count, len(todo))))
    groups = [tuple(todo[a:b]) for a, b in zip([0, *cuts], [*cuts, len(todo)]) if b > a]
    shares = [spans(plan, g) for g in groups]
    checks: list[list[int]] = [[] for _ in groups]
    alone: list[int] = []
    for f in sorted(unchecked):
        read = [(end - start, j) for j, share in enumerate(shares) if f in share for start, end in [share[f]]]
        if read:
            checks[max(read)[1]].append(f)
        else:
            alone.append(f)
    jobs = [Job(j, g, tuple(c)) for j, (g, c) in enumerate(zip(groups, checks))]
    return jobs + [Job(len(jobs) + k, (), (f,)) for k, f in enumerate(alone)]


def downloaded_bytes(plan: Plan, jobs: list[Job]) -> int:
    """Bytes all jobs download together (one machine downloads every file once, whole)."""
    return sum(
        (plan.shards[r.file].size if r.end is None else r.end) - r.start.offset
        for job in jobs for r in job_reads(plan, job.outputs, job.checks)
    )


def _layout(plan: Plan) -> Layout:
    assert plan.layout is not None
    return plan.layout


def _cuts(plan: Plan, todo: list[int], weights: list[int], count: int) -> list[int]:
    """Positions in `todo` to cut before: near each even share of the input, where the file the cut
    falls in is shared most cheaply (the smaller side of it is read twice)."""
    total = sum(weights)
    before = [0]
    for w in weights:
        before.append(before[-1] + w)
    cuts: list[int] = []
    for j in range(1, count):
        lo = cuts[-1] + 1 if cuts else 1
        if lo >= len(todo):
            break
        ideal, slack = total * j / count, total / count * CUT_SLACK
        candidates = range(lo, len(todo))
        near = [k for k in candidates if abs(before[k] - ideal) <= slack] or [min(candidates, key=lambda k: abs(before[k] - ideal))]
        cuts.append(min(near, key=lambda k: (_shared(plan, todo[k]), abs(before[k] - ideal))))
    return cuts


def _shared(plan: Plan, index: int) -> int:
    """What cutting before output `index` costs: the smaller side of the file its first byte lies in."""
    start = _layout(plan).outputs[index].start
    return min(start.offset, plan.shards[start.file].size - start.offset)
