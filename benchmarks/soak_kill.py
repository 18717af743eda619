"""Issue 3: SIGKILL a real `streamq requantize` at random moments, again and again, until a run finishes,
then check that the result is byte for byte what one uninterrupted run makes, and count what each kill cost.

A small Llama (~316 MB, saved by transformers in 3 files of ~105 MB: `--shard-size`) is served by streamq's
loopback Hub emulator in this process, downloads throttled so that a run lasts a while. streamq streams it
tensor by tensor into output shards cut at `--max-shard-size` (10MB: 10 output shards, which do not line
up with the 3 source files; the same value for every run). One clean run to `me/ref` gives the reference
and the timing (its first request after the ~3-5 s of interpreter start-up, the commit of each output
shard, its end), and a second run on the finished reference, which has nothing to do, times the fixed part
of a run. Then `streamq requantize` to `me/out` is started in a subprocess and SIGKILLed after a random
(seeded) delay between that first request and the expected commit of the third output shard it makes
(`--kill-anywhere`: up to the expected end of the run), so kills land before, during and after
publishing, all along the run, until a run exits 0 (after `--kills` kills, the next run is left alone).
Every file of both repos is then compared (the manifest without its timestamps, README.md with the repo
name normalised), and `streamq.verify_output` must pass.

What a kill costs, counted for the run after it:

- output shards made again: shards whose name was recorded as done or pending, in the output's committed
  manifest or in the upload journal of the killed run's work_dir (`uploaded-not-committed.json`), at any
  kill so far, that a later run starts to convert again. A shard being converted shows up in the run's
  `work_dir/out` (its `.partial`, then the finished file until it is uploaded), which is polled every
  10 ms. Shards an earlier run started and never recorded (in flight at a kill) are counted apart:
  remaking them is the expected cost (one in flight at several kills is counted at each). The manifest
  history (every commit of `me/out`) cross-checks it: a shard whose entry was recorded twice with
  different `finished_at` was made again.
- source bytes downloaded again: the bytes of the source's LFS objects the emulator sent that an earlier
  run of the soak (or this one) had already received. The emulator's response writer is wrapped (in this process only)
  to note each response's first byte offset (from its Range) and how many bytes went out, so each run's
  downloads are byte intervals of each file; header reads (bounded Ranges: huggingface_hub's first
  100,001 bytes, streamq's 8) are counted apart. Cross-check: the soak's downloads in all minus one copy
  of the source equals the sum of the runs' bytes downloaded again, and the emulator's own count
  (`hub.requests.sent`) minus 100,001 + 8 bytes per file per run is the same figure where every run read
  all its headers.

    python benchmarks/soak_kill.py                        # up to 20 kills, seed 0, 15 MB/s, work_dir kept
    python benchmarks/soak_kill.py --kills 8 --fresh-work-dir --json out.json
    python benchmarks/soak_kill.py --kills 60 --seed 3 --bandwidth-mbps 0 --kill-anywhere

`--fresh-work-dir` gives every run a new work_dir (the upload journal of the killed run is gone, as on a
fresh disk). `--json FILE` writes the per-kill figures. (The comparison with the fixed commit spacing of an
older streamq, `--streamq-root`/`--min-commit-interval`, was for source-file shards; its results stay in
the git history and in `benchmarks/results/soak_kill_*interval36*.json`.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_DISABLE_XET"] = "1"  # read at import: the emulator speaks git-LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError  # noqa: E402

from streamq import plan_requantize, verify_output  # noqa: E402
from streamq.journal import JOURNAL_NAME  # noqa: E402
from streamq.location import HubRepo  # noqa: E402
from streamq.manifest import MANIFEST_NAME  # noqa: E402
from streamq.testing import Fault, LocalHub  # noqa: E402
from streamq.testing.protocol import HubHandler  # noqa: E402
from streamq.workdir import folder_for  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE, REFERENCE, OUTPUT = "org/model", "me/ref", "me/out"
TOKEN = "hf_soak"
WINDOW_SHARDS = 3  # a run is killed before it can make more than about this many output shards
EXTRA_ATTEMPTS = 5  # runs that may fail by themselves (not killed) before the soak gives up
FINAL_RUN_TIMEOUT = 600.0
POLL_S = 0.01
HF_HEADER_READ = 100_001  # huggingface_hub's get_safetensors_metadata reads bytes 0-100000 of each file
STREAMQ_HEADER_READ = 8  # and streamq reads the header's length
TIMESTAMP_KEYS = {"created_at", "updated_at", "finished_at"}
SOURCE_OBJECT = re.compile(rf"^/storage/[^/]+/model/{SOURCE}/(?P<oid>[0-9a-f]{{64}})$")
BOUNDED_RANGE = re.compile(r"^bytes=\d+-\d+$")
CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/\d+$")


def commit_path(repo: str) -> re.Pattern[str]:
    return re.compile(rf"^/api/models/{repo}/commit/")


# ---------------------------------------------------------------- model and hub


def build_model(dest: Path, seed: int, shard_size: str) -> int:
    """A random small Llama saved by transformers; returns the number of source files."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest, max_shard_size=shard_size)
    return len(list(dest.glob("*.safetensors")))


def push(hub: LocalHub, src: Path) -> dict[str, tuple[str, int]]:
    """Upload the source repo; returns LFS oid -> (file name, size), to read the served bytes by file."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(SOURCE)
    api.upload_folder(repo_id=SOURCE, folder_path=src)
    siblings = api.model_info(SOURCE, files_metadata=True).siblings or []
    return {s.lfs.sha256: (s.rfilename, s.size) for s in siblings if s.lfs and s.rfilename.endswith(".safetensors")}


def throttle_downloads(hub: LocalHub, mbps: float) -> None:
    """Storage bytes at `mbps` MB/s per connection, so that a run lasts long enough to be killed in the middle of things."""
    if mbps > 0:
        chunk = 64 * 1024
        hub.faults.add(Fault.throttle(chunk, chunk / (mbps * 1e6), method="GET", path=r"^/storage/", times=None))


@dataclass
class Span:
    """One response body for a source object: where in the file it started, how many bytes went out."""

    oid: str
    first: int
    sent: int = 0
    header: bool = False  # a bounded Range (a header read), not a download


class ServedBytes:
    """The byte intervals of the source's LFS objects that the emulator sent, response by response.

    Wraps the emulator's `HubHandler._prepare` (in this process: the emulator runs here) so that the chunk
    iterator of each source-object response counts the chunks `_transmit` wrote: a chunk is counted when
    the next one is asked for, or when the body ends, i.e. after it was written and added to
    `hub.requests.sent`; so the spans' total is the emulator's own count for those paths."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[Span] = []
        self._original = HubHandler._prepare

    def install(self) -> None:
        original, spans, lock = self._original, self.spans, self._lock

        def _prepare(handler: HubHandler, response: Any, fault: Any) -> Any:
            status, headers, chunks = original(handler, response, fault)
            match = SOURCE_OBJECT.match(handler.path.partition("?")[0])
            if match is None or handler.command != "GET" or status not in (200, 206):
                return status, headers, chunks
            content_range = CONTENT_RANGE.match(headers.get("Content-Range", ""))
            span = Span(match["oid"], int(content_range[1]) if content_range else 0,
                        header=bool(BOUNDED_RANGE.match((handler.headers.get("Range") or "").strip())))
            with lock:
                spans.append(span)

            def counted() -> Any:
                for chunk in chunks:
                    yield chunk
                    span.sent += len(chunk)

            return status, headers, counted()

        HubHandler._prepare = _prepare  # type: ignore[method-assign]

    def uninstall(self) -> None:
        HubHandler._prepare = self._original  # type: ignore[method-assign]

    def mark(self) -> int:
        with self._lock:
            return len(self.spans)

    def since(self, mark: int, until: int | None = None) -> list[Span]:
        with self._lock:
            return list(self.spans[mark:until])


class Coverage:
    """Bytes of each source file downloaded so far in the soak (a union of intervals per file)."""

    def __init__(self) -> None:
        self._intervals: dict[str, list[tuple[int, int]]] = {}

    def add(self, oid: str, start: int, end: int) -> int:
        """Add [start, end); returns how many of those bytes were already covered."""
        if end <= start:
            return 0
        merged, overlap = [], 0
        lo, hi = start, end
        for a, b in self._intervals.get(oid, []):
            if b < lo or a > hi:
                merged.append((a, b))
                continue
            overlap += max(0, min(b, end) - max(a, start))
            lo, hi = min(lo, a), max(hi, b)
        merged.append((lo, hi))
        self._intervals[oid] = sorted(merged)
        return overlap

    def total(self) -> int:
        return sum(b - a for intervals in self._intervals.values() for a, b in intervals)


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Policy:
    """The options every run gets (the reference and each killed one), and whether work_dir is kept."""

    options: tuple[str, ...] = ()
    fresh_work_dir: bool = False

    def describe(self) -> dict[str, Any]:
        return {"options": list(self.options), "fresh_work_dir": self.fresh_work_dir}


POLICY = Policy()


def start_run(hub: LocalHub, dst: str, work: Path, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """The command a user runs, in a fresh interpreter: its JSON result to `out`, its log (-v) to `log`."""
    command = [
        sys.executable, "-m", "streamq", "requantize", SOURCE, dst, "--endpoint", hub.endpoint,
        "--work-dir", str(work), "--no-progress", "--json", "-v", *POLICY.options,
    ]
    env = {**os.environ, "HF_TOKEN": TOKEN, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(work.parent / "hf_home")}
    with out.open("wb") as stdout, log.open("wb") as stderr:  # run from the root: `python -m` puts the working directory first on sys.path
        return subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, cwd=REPO_ROOT)


@dataclass(frozen=True)
class Timing:
    """Seconds from process start, from the clean runs: to the first request, to the first output shard's
    commit, between output shard commits, to the end of a run with nothing left to do, and to the end.

    The first download starts while the run is planned, so only a commit marks when shards start to land."""

    startup: float
    first_commit: float
    per_shard: float
    fixed: float
    total: float

    def kill_delay(self, rng: random.Random, shards_left: int, anywhere: bool = False) -> float:
        """Between the first request and the expected commit of the WINDOW_SHARDS-th output shard this run
        makes; with none left, the end of a run with nothing to do, give or take one shard's time (so such
        a run may end by itself). `anywhere`: up to the expected end of the run instead."""
        if anywhere:  # before the run can end by itself
            end = 0.9 * min(self.total, self.fixed + self.per_shard * shards_left)
        elif shards_left:
            end = self.first_commit + self.per_shard * (min(shards_left, WINDOW_SHARDS) - 1)
        else:
            end = self.fixed + self.per_shard
        return rng.uniform(self.startup, max(self.startup, end))


def timed_run(hub: LocalHub, served: ServedBytes, scratch: Path, name: str, shards: int) -> dict[str, float]:
    """One uninterrupted run to the reference repo, timed by watching the hub's request log."""
    seen = len(hub.requests)
    mark = served.mark()
    started = time.monotonic()
    proc = start_run(hub, REFERENCE, scratch / "work-ref", scratch / f"{name}.json", scratch / f"{name}.log")
    marks: dict[str, float] = {}
    commits: list[float] = []
    committing = commit_path(REFERENCE)
    while proc.poll() is None:
        for record in list(hub.requests)[seen:]:
            seen += 1
            marks.setdefault("first_request", time.monotonic() - started)
            if record.method == "POST" and committing.match(record.path):
                commits.append(time.monotonic() - started)
        time.sleep(0.01)
    marks["total"] = time.monotonic() - started
    marks["first_commit"] = commits[0] if commits else marks["total"]
    # from the run's length, not from commit times, so that kills land alike whatever the commit policy
    marks["per_shard"] = (marks["total"] - marks["first_commit"]) / max(1, shards - 1)
    spans = served.since(mark)
    marks["downloaded"] = sum(s.sent for s in spans if not s.header)
    marks["header_reads"] = sum(s.sent for s in spans if s.header)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} run failed (exit {proc.returncode}):\n{(scratch / f'{name}.log').read_text()[-3000:]}")
    return marks


def clean_runs(hub: LocalHub, served: ServedBytes, scratch: Path, shards: int) -> tuple[Timing, dict[str, float]]:
    """The reference output from one uninterrupted run, then a second run on it, which finds nothing to do:
    together they time the fixed part of a run and the part that grows with the shards left."""
    reference = timed_run(hub, served, scratch, "reference", shards)
    noop = timed_run(hub, served, scratch, "no-op", shards)
    total = reference["total"]
    timing = Timing(reference["first_request"], reference["first_commit"], reference["per_shard"], min(noop["total"], total), total)
    return timing, reference


# ---------------------------------------------------------------- what the output and work_dir record


def read_manifest(api: HfApi, scratch: Path, revision: str | None = None) -> dict[str, Any] | None:
    """The output's committed manifest (at `revision`, default the head), or None if there is none yet."""
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = hf_hub_download(OUTPUT, MANIFEST_NAME, revision=revision, local_dir=tmp, endpoint=api.endpoint, token=TOKEN)
            return json.loads(Path(path).read_text())
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def output_folder(api: HfApi, work: Path) -> Path:
    """The output's folder under a run's work_dir, where its journal and output shards in flight are."""
    return folder_for(work, HubRepo(OUTPUT), api.endpoint)


def read_journal(api: HfApi, work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output_folder(api, work) / JOURNAL_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}


@dataclass
class Recorded:
    """What the output and the work_dir say about the output shards at one moment."""

    shards: list[str] = field(default_factory=list)  # published (committed, source files checked)
    pending: list[str] = field(default_factory=list)  # committed in the manifest's pending list
    verified: list[str] = field(default_factory=list)  # source files whose sha256 checked out
    checkpoints: dict[str, int] = field(default_factory=dict)  # source file -> offset of its saved hash state
    status: str | None = None
    journal_shards: list[str] = field(default_factory=list)  # uploaded, not committed (work_dir's journal)
    journal_checkpoints: dict[str, int] = field(default_factory=dict)
    journal_verified: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return set(self.shards) | set(self.pending) | set(self.journal_shards)


def recorded(api: HfApi, scratch: Path, work: Path) -> Recorded:
    state = Recorded()
    manifest = read_manifest(api, scratch)
    if manifest is not None:
        state.shards, state.pending = sorted(manifest["shards"]), sorted(manifest["pending"])
        state.verified = sorted(manifest["verified"])
        state.checkpoints = {f: c["offset"] for f, c in sorted(manifest["checkpoints"].items())}
        state.status = manifest["status"]
    journal = read_journal(api, work)
    if journal is not None and "shards" in journal:
        state.journal_shards = sorted(journal["shards"])
        progress = journal.get("progress", {})
        state.journal_checkpoints = {f: c["offset"] for f, c in sorted(progress.get("checkpoints", {}).items())}
        state.journal_verified = sorted(progress.get("verified", {}))
    return state


def manifest_history(api: HfApi, scratch: Path) -> dict[str, list[str]]:
    """For each output shard, the distinct `finished_at` its manifest entry had over the output's commits
    (shards or pending), oldest first: more than one means it was recorded, then made and recorded again."""
    seen: dict[str, list[str]] = {}
    for commit in reversed(api.list_repo_commits(OUTPUT)):
        manifest = read_manifest(api, scratch, commit.commit_id)
        if manifest is None:
            continue
        for name, entry in {**manifest["pending"], **manifest["shards"]}.items():
            stamps = seen.setdefault(name, [])
            if entry["finished_at"] not in stamps:
                stamps.append(entry["finished_at"])
    return seen


class Converting:
    """The output shards a run starts to write, seen in its work_dir/out (`<name>.partial`, `<name>`).

    What a killed run left there is removed by the next run before it converts anything; it is told
    apart by inode and mtime, noted before the run starts."""

    def __init__(self, out_dir: Path, outputs: set[str]) -> None:
        self.out_dir, self.outputs = out_dir, outputs
        self.leftover = self._scan()
        self.names: list[str] = []  # in the order they appeared

    def _scan(self) -> dict[tuple[str, int, int], str]:
        found = {}
        try:
            with os.scandir(self.out_dir) as entries:
                for entry in entries:
                    name = entry.name.removesuffix(".grow").removesuffix(".partial")
                    if name in self.outputs:
                        try:
                            st = entry.stat()
                        except FileNotFoundError:
                            continue
                        found[(entry.name, st.st_ino, st.st_mtime_ns)] = name
        except FileNotFoundError:
            pass
        return found

    def poll(self) -> None:
        for key, name in self._scan().items():
            if key not in self.leftover and name not in self.names:
                self.names.append(name)


# ---------------------------------------------------------------- the soak


@dataclass
class Attempt:
    """One run of the soak: how it ended, what it converted and downloaded, and what was recorded around it."""

    number: int
    work: str
    delay: float | None  # the kill delay drawn (None: left to finish)
    seconds: float
    killed: bool
    exit_code: int
    before: Recorded
    after: Recorded
    converted: list[str]  # output shards it started to write
    uploads: int  # PUTs of output objects to the emulator's storage
    commits: int
    downloaded: int  # source bytes sent for its downloads (not header reads)
    header_reads: int
    sent: int  # hub.requests.sent for the source's objects over the run (downloads and header reads)
    downloaded_again: int  # of `downloaded`, bytes an earlier run of the soak (or this one) had been sent already
    made_again: list[str] = field(default_factory=list)  # converted, though recorded at an earlier kill
    in_flight_again: list[str] = field(default_factory=list)  # converted, started by an earlier run but never recorded
    taken_up: str = ""  # streamq's log line on shards taken up from the journal

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("before", "after")}
        data["seconds"] = round(self.seconds, 2)
        data["delay"] = None if self.delay is None else round(self.delay, 2)
        data["before"], data["after"] = self.before.__dict__, self.after.__dict__
        return data


def soak(
    hub: LocalHub, served: ServedBytes, scratch: Path, timing: Timing, outputs: list[str], objects: dict[str, tuple[str, int]],
    kills: int, seed: int, anywhere: bool,
) -> list[Attempt]:
    """Start and kill runs until one exits 0 by itself; after `kills` kills a run is left to finish."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    rng = random.Random(seed)
    coverage = Coverage()
    ever_recorded: set[str] = set()  # recorded at any kill so far (manifest or journal)
    ever_started: set[str] = set()  # started by any run so far
    attempts: list[Attempt] = []
    uploading = re.compile(rf"^/storage/[^/]+/model/{OUTPUT}/")
    committing = commit_path(OUTPUT)
    while len(attempts) < kills + EXTRA_ATTEMPTS:
        number = len(attempts) + 1
        work = scratch / (f"work-out-{number}" if POLICY.fresh_work_dir else "work-out")
        before = recorded(api, scratch, work)
        killing = sum(a.killed for a in attempts) < kills
        left = len(outputs) - len(set(before.shards) | set(before.pending))
        delay = timing.kill_delay(rng, left, anywhere) if killing else None
        converting = Converting(output_folder(api, work) / "out", set(outputs))
        seen, mark = len(hub.requests), served.mark()
        sent_before = sum(hub.requests.sent(rf"/{oid}$") for oid in objects)
        started = time.monotonic()
        proc = start_run(hub, OUTPUT, work, scratch / f"attempt-{number}.json", scratch / f"attempt-{number}.log")
        deadline = started + (delay if delay is not None else FINAL_RUN_TIMEOUT)
        while proc.poll() is None and time.monotonic() < deadline:
            converting.poll()
            time.sleep(POLL_S)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        seconds = time.monotonic() - started
        converting.poll()
        time.sleep(0.5)  # let the hub finish the responses the kill cut off
        requests = list(hub.requests)[seen:]
        spans = served.since(mark)
        downloads = [s for s in spans if not s.header]
        again = sum(coverage.add(s.oid, s.first, s.first + s.sent) for s in downloads)
        log = (scratch / f"attempt-{number}.log").read_text(errors="replace")
        taken = re.search(r"\d+ shard\(s\) uploaded by an earlier run are taken up[^\n]*", log)
        attempt = Attempt(
            number, work.name, delay, seconds, proc.returncode == -9, proc.returncode, before, recorded(api, scratch, work),
            converting.names,
            uploads=sum(1 for r in requests if r.method == "PUT" and uploading.match(r.path)),
            commits=sum(1 for r in requests if r.method == "POST" and committing.match(r.path)),
            downloaded=sum(s.sent for s in downloads), header_reads=sum(s.sent for s in spans if s.header),
            sent=sum(hub.requests.sent(rf"/{oid}$") for oid in objects) - sent_before,
            downloaded_again=again, taken_up=taken[0] if taken else "",
        )
        attempt.made_again = [n for n in attempt.converted if n in ever_recorded]
        attempt.in_flight_again = [n for n in attempt.converted if n in ever_started - ever_recorded]
        ever_recorded |= attempt.after.names()
        ever_started.update(attempt.converted)
        attempts.append(attempt)
        report_attempt(attempt, scratch)
        if attempt.exit_code == 0:
            break
    return attempts


def report_attempt(attempt: Attempt, scratch: Path) -> None:
    state = "killed" if attempt.killed else f"exited {attempt.exit_code}"
    b = attempt.before
    print(f"attempt {attempt.number:3d}: {state:<9} after {attempt.seconds:5.2f} s; before it: {len(b.shards)} published, "
          f"{len(b.pending)} pending, {len(set(b.journal_shards) - set(b.shards) - set(b.pending))} journaled; "
          f"converted {len(attempt.converted)} ({len(attempt.made_again)} recorded before, {len(attempt.in_flight_again)} in flight "
          f"at the kill); source bytes downloaded {attempt.downloaded / 1e6:.1f} MB, again {attempt.downloaded_again / 1e6:.1f} MB"
          + (f"; {attempt.taken_up}" if attempt.taken_up else ""), flush=True)
    if attempt.uploads > len(attempt.converted):
        print(f"  (uploaded {attempt.uploads} output shards but was seen converting {len(attempt.converted)}: the poll missed some)")
    if not attempt.killed and attempt.exit_code != 0:
        print((scratch / f"attempt-{attempt.number}.log").read_text(errors="replace")[-3000:])


# ---------------------------------------------------------------- checks


def normalised(name: str, data: bytes, repo_id: str) -> bytes:
    """What must match between two runs: the manifest without timestamps, the card without the repo name."""
    if name == MANIFEST_NAME:
        return json.dumps(_without_timestamps(json.loads(data)), sort_keys=True).encode()
    if name == "README.md":
        return data.replace(repo_id.encode(), b"<repo>")
    return data


def _without_timestamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timestamps(v) for k, v in value.items() if k not in TIMESTAMP_KEYS}
    if isinstance(value, list):
        return [_without_timestamps(v) for v in value]
    return value


def compare(ref: Path, out: Path) -> tuple[list[str], int]:
    """Files that differ (or exist on one side only), and the reference bytes the output does not reproduce."""
    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}

    ref_files, out_files = files(ref), files(out)
    mismatches = sorted(f"{name} (only in the output)" for name in out_files - ref_files)
    lost = 0
    for name in sorted(ref_files):
        expected = normalised(name, (ref / name).read_bytes(), REFERENCE)
        if name not in out_files:
            mismatches.append(f"{name} (missing)")
            lost += len(expected)
            continue
        actual = normalised(name, (out / name).read_bytes(), OUTPUT)
        if actual != expected:
            mismatches.append(name)
            lost += _differing_bytes(expected, actual)
    return mismatches, lost


def _differing_bytes(a: bytes, b: bytes) -> int:
    import numpy as np

    n = min(len(a), len(b))
    same = np.frombuffer(a[:n], np.uint8) == np.frombuffer(b[:n], np.uint8)
    return int(n - same.sum()) + abs(len(a) - len(b))


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="most kills before a run is left to finish")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays and the model")
    parser.add_argument("--bandwidth-mbps", type=float, default=15.0, help="download throttle (0: none)")
    parser.add_argument("--shard-size", default="110MB", help="max_shard_size for the source's save_pretrained "
                        "(110MB: 3 files, each feeding several output shards)")
    parser.add_argument("--max-shard-size", default="10MB", help="streamq's --max-shard-size, for every run (10MB: 10 output shards)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, work_dirs)")
    parser.add_argument("--fresh-work-dir", action="store_true", help="a new work_dir for every run (a fresh disk)")
    parser.add_argument("--commits-per-hour", type=int, help="passed to streamq (its commit budget)")
    parser.add_argument("--json", type=Path, help="write the per-kill figures to this file")
    parser.add_argument("--kill-anywhere", action="store_true", help="kill at any moment of a run, not within its first shards")
    return parser.parse_args()


def main() -> int:
    global POLICY
    args = parse_args()
    options: tuple[str, ...] = ("--max-shard-size", args.max_shard_size)
    if args.commits_per_hour is not None:
        options += ("--commits-per-hour", str(args.commits_per_hour))
    POLICY = Policy(options, args.fresh_work_dir)
    scratch = Path(tempfile.mkdtemp(prefix="streamq-soak-"))
    served = ServedBytes()
    served.install()
    try:
        with LocalHub(scratch / "hub") as hub:
            files = build_model(scratch / "src", args.seed, args.shard_size)
            objects = push(hub, scratch / "src")
            plan = plan_requantize(SOURCE, endpoint=hub.endpoint, token=TOKEN, max_shard_size=args.max_shard_size)
            outputs = [o.name for o in plan.outputs]
            throttle_downloads(hub, args.bandwidth_mbps)
            timing, reference = clean_runs(hub, served, scratch, len(outputs))
            print(f"model: {sum(size for _, size in objects.values()) / 1e6:.1f} MB in {files} source files -> {len(outputs)} output "
                  f"shards; clean run: first request after {timing.startup:.1f} s, first shard committed after "
                  f"{timing.first_commit:.1f} s, then one every {timing.per_shard:.1f} s, done after {timing.total:.1f} s "
                  f"({reference['downloaded'] / 1e6:.1f} MB downloaded, {reference['header_reads']} bytes of header reads); "
                  f"a run with nothing left: {timing.fixed:.1f} s", flush=True)
            attempts = soak(hub, served, scratch, timing, outputs, objects, args.kills, args.seed, args.kill_anywhere)
            return summarize(hub, scratch, attempts, objects, outputs, args, timing, reference)
    finally:
        served.uninstall()
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _stats(values: list[int]) -> dict[str, float]:
    return {"mean": sum(values) / len(values) if values else 0.0, "max": max(values, default=0)}


def summarize(
    hub: LocalHub, scratch: Path, attempts: list[Attempt], objects: dict[str, tuple[str, int]], outputs: list[str],
    args: argparse.Namespace, timing: Timing, reference: dict[str, float],
) -> int:
    """Print the verdict; 0 only if a run finished and its output matches the reference and verifies."""
    finished = attempts[-1].exit_code == 0
    kills = sum(a.killed for a in attempts)
    failures = [a.number for a in attempts if not a.killed and a.exit_code != 0]
    print(f"\nkills survived:       {kills}")
    print(f"attempts:             {len(attempts)} (finished: {finished}; runs that failed by themselves: {failures or 'none'})")
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    mismatches, lost, verify_ok, problems = ["no run finished"], -1, False, []
    history: dict[str, list[str]] = {}
    if finished:
        fetch = dict(endpoint=hub.endpoint, token=TOKEN)
        ref = Path(snapshot_download(REFERENCE, local_dir=scratch / "ref", **fetch))
        out = Path(snapshot_download(OUTPUT, local_dir=scratch / "out", **fetch))
        mismatches, lost = compare(ref, out)
        report = verify_output(OUTPUT, **fetch)
        verify_ok, problems = report.ok, report.problems
        history = manifest_history(api, scratch)
        print(f"result matched:       {not mismatches} ({len(list(ref.rglob('*.safetensors')))} shards compared byte for byte)"
              + "".join(f"\n  differs: {m}" for m in mismatches))
        print(f"verify_output:        {'OK' if verify_ok else 'PROBLEMS'}" + "".join(f"\n  - {p}" for p in problems))
        print(f"bytes of data lost:   {lost}")

    # per kill: the run after it
    after_kill = [a for prev, a in zip(attempts, attempts[1:]) if prev.killed]
    made_again = [len(a.made_again) for a in after_kill]
    in_flight = [len(a.in_flight_again) for a in after_kill]
    bytes_again = [a.downloaded_again for a in after_kill]
    source_bytes = sum(size for _, size in objects.values())
    header_per_run = sum(min(size, HF_HEADER_READ) + STREAMQ_HEADER_READ for _, size in objects.values())
    downloaded = sum(a.downloaded for a in attempts)
    by_sent = sum(a.sent for a in attempts) - header_per_run * len(attempts) - source_bytes
    rerecorded = {name: stamps for name, stamps in history.items() if len(stamps) > 1}
    print(f"output shards made again per kill (recorded before it): {made_again} "
          f"(mean {_stats(made_again)['mean']:.2f}, max {_stats(made_again)['max']})")
    print(f"  in flight at the kill, made again: {in_flight} (mean {_stats(in_flight)['mean']:.2f})")
    for a in after_kill:
        if a.made_again:
            print(f"  attempt {a.number}: {', '.join(a.made_again)}")
    print(f"  manifest history: {len(rerecorded)} shard(s) recorded more than once" + "".join(f"\n    {n}: {s}" for n, s in rerecorded.items()))
    print(f"source MB downloaded again per kill: {[round(b / 1e6, 1) for b in bytes_again]} "
          f"(mean {_stats(bytes_again)['mean'] / 1e6:.1f}, max {_stats(bytes_again)['max'] / 1e6:.1f}); "
          f"in all {sum(bytes_again) / 1e6:.1f} MB beyond one copy of the source ({source_bytes / 1e6:.1f} MB)")
    print(f"  cross-checks: downloads in all - one copy = {(downloaded - source_bytes) / 1e6:.1f} MB; "
          f"emulator's count - {header_per_run} header bytes per run - one copy = {by_sent / 1e6:.1f} MB "
          f"(header reads seen: {[a.header_reads for a in attempts]})")
    ok = finished and not mismatches and verify_ok and not failures
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "policy": POLICY.describe(), "kill_anywhere": args.kill_anywhere, "seed": args.seed, "bandwidth_mbps": args.bandwidth_mbps,
            "source_shard_size": args.shard_size, "source_files": {name: size for name, size in objects.values()},
            "max_shard_size": args.max_shard_size, "output_shards": outputs,
            "clean_run": {"seconds": round(timing.total, 2), "first_request_s": round(timing.startup, 2),
                          "first_commit_s": round(timing.first_commit, 2), "per_shard_s": round(timing.per_shard, 2),
                          "noop_s": round(timing.fixed, 2), "downloaded": reference["downloaded"], "header_reads": reference["header_reads"]},
            "kills": kills, "attempts": len(attempts), "finished": finished, "failures": failures,
            "result_matched": not mismatches, "mismatches": mismatches, "bytes_lost": lost, "verify_ok": verify_ok, "verify_problems": problems,
            "per_kill": {
                "output_shards_made_again": made_again, "made_again": _stats(made_again),
                "in_flight_made_again": in_flight, "in_flight": _stats(in_flight),
                "source_bytes_downloaded_again": bytes_again, "bytes_again": _stats(bytes_again),
            },
            "source_bytes": source_bytes, "downloaded_in_all": downloaded, "downloaded_again_in_all": sum(a.downloaded_again for a in attempts),
            "sent_minus_headers_minus_source": by_sent, "header_bytes_per_run": header_per_run,
            "manifest_history_rerecorded": rerecorded,
            "attempts_detail": [a.to_json() for a in attempts],
        }, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
