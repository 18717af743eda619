"""Issue 3: SIGKILL a real `streamq requantize` at random moments, again and again, until a run finishes,
then check that the result is byte for byte what one uninterrupted run makes.

A small Llama (~300 MB in ~11 shards of up to 30 MB) is served by streamq's loopback Hub emulator in this
process, downloads throttled so that a run lasts a while. One clean run to `me/ref` gives the reference and
the timing (its first request after the ~3-5 s of interpreter start-up, the commit of each shard, its end),
and a second run on the finished reference, which has nothing to do, times the fixed part of a run. Then
`streamq requantize` to `me/out` is started in a subprocess and SIGKILLed after a random (seeded) delay
between that first request and the expected commit of the third shard it converts (a resumed run takes
as long as a fresh one to commit its first), so kills land before, during and after publishing, all along
the run, until a run exits 0 (after `--kills` kills, the next run is left alone). Every file of both repos
is then compared (the manifest without its timestamps, README.md with the repo name normalised),
`streamq.verify_output` must pass, and the emulator's request log tells whether a shard was downloaded
again beyond the one in flight at each kill.

    python benchmarks/soak_kill.py                        # up to 20 kills, seed 0, 15 MB/s
    python benchmarks/soak_kill.py --kills 60 --seed 3 --bandwidth-mbps 0

Issue 20 asks how many shards a kill costs under a commit policy: `--fresh-work-dir` gives every run a
new work_dir (the upload journal and partial downloads of the killed run are gone, as on a fresh disk),
and `--streamq-root DIR --min-commit-interval 36` runs an older streamq (a `git archive` of a commit
before the commit budget) with its fixed commit spacing, for comparison under the same seed and kill
delays. `--json FILE` writes the per-kill counts.

    git archive 751d2f0 streamq | tar -x -C /tmp/streamq-old    # the fixed 36 s spacing
    python benchmarks/soak_kill.py --kills 8 --streamq-root /tmp/streamq-old --min-commit-interval 36 --json out.json
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_DISABLE_XET"] = "1"  # read at import: the emulator speaks git-LFS, not Xet
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from huggingface_hub import HfApi, snapshot_download  # noqa: E402

from streamq import verify_output  # noqa: E402
from streamq.testing import Fault, LocalHub, RequestRecord  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE, REFERENCE, OUTPUT = "org/model", "me/ref", "me/out"
TOKEN = "hf_soak"
WINDOW_SHARDS = 3  # a run is killed before it can convert more than about this many shards
EXTRA_ATTEMPTS = 5  # runs that may fail by themselves (not killed) before the soak gives up
FINAL_RUN_TIMEOUT = 600.0
TIMESTAMP_KEYS = {"created_at", "updated_at", "finished_at"}
RESOLVE = re.compile(rf"^/{SOURCE}/resolve/[^/]+/(?P<name>.+)$")
COMMIT = re.compile(rf"^/api/models/{REFERENCE}/commit/")
STORAGE_GET = re.compile(r"^/storage/[0-9a-f]+/model/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$")


# ---------------------------------------------------------------- model and hub


def build_model(dest: Path, seed: int, shard_size: str) -> int:
    """A random small Llama saved by transformers in many shards; returns the number of shards."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest, max_shard_size=shard_size)
    return len(list(dest.glob("*.safetensors")))


def push(hub: LocalHub, src: Path) -> dict[str, str]:
    """Upload the source repo; returns LFS oid -> shard name, to read the request log by shard."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(SOURCE)
    api.upload_folder(repo_id=SOURCE, folder_path=src)
    siblings = api.model_info(SOURCE, files_metadata=True).siblings or []
    return {s.lfs.sha256: s.rfilename for s in siblings if s.lfs and s.rfilename.endswith(".safetensors")}


def throttle_downloads(hub: LocalHub, mbps: float) -> None:
    """Shard bytes at `mbps` MB/s, so that a run lasts long enough to be killed in the middle of things."""
    if mbps > 0:
        chunk = 64 * 1024
        hub.faults.add(Fault.throttle(chunk, chunk / (mbps * 1e6), method="GET", path=r"^/storage/", times=None))


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Policy:
    """Which streamq runs (this checkout, or an older one) and with which commit option."""

    root: Path = REPO_ROOT
    options: tuple[str, ...] = ()
    fresh_work_dir: bool = False

    def describe(self) -> dict[str, Any]:
        return {"streamq_root": str(self.root), "options": list(self.options), "fresh_work_dir": self.fresh_work_dir}


POLICY = Policy()


def start_run(hub: LocalHub, dst: str, work: Path, log: Path) -> subprocess.Popen[bytes]:
    """The command a user runs, in a fresh interpreter, output to `log`."""
    command = [
        sys.executable, "-m", "streamq", "requantize", SOURCE, dst, "--endpoint", hub.endpoint,
        "--work-dir", str(work), "--no-progress", *POLICY.options,
    ]
    env = {**os.environ, "HF_TOKEN": TOKEN, "PYTHONPATH": str(POLICY.root), "HF_HOME": str(work.parent / "hf_home")}
    with log.open("wb") as out:  # run from the root: `python -m` puts the working directory first on sys.path
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=POLICY.root)


@dataclass(frozen=True)
class Timing:
    """Seconds from process start, from the clean runs: to the first request, to the first shard's commit,
    between shard commits, to the end of a run with nothing left to do, and to the end.

    The first download starts while the run is planned, so only a commit marks when shards start to land."""

    startup: float
    first_commit: float
    per_shard: float
    fixed: float
    total: float

    def kill_delay(self, rng: random.Random, shards_left: int, anywhere: bool = False) -> float:
        """Between the first request and the expected commit of the WINDOW_SHARDS-th shard this run converts;
        with none left, the end of a run with nothing to do, give or take one shard's time (so such a run
        may end by itself). `anywhere`: up to the expected end of the run instead (a kill at a random
        moment of the whole run, as in issue 20)."""
        if anywhere:  # before the run can end by itself
            end = 0.9 * min(self.total, self.fixed + self.per_shard * shards_left)
        elif shards_left:
            end = self.first_commit + self.per_shard * (min(shards_left, WINDOW_SHARDS) - 1)
        else:
            end = self.fixed + self.per_shard
        return rng.uniform(self.startup, end)


def timed_run(hub: LocalHub, scratch: Path, name: str, shards: int) -> dict[str, float]:
    """One uninterrupted run to the reference repo, timed by watching the hub's request log."""
    seen = len(hub.requests)
    started = time.monotonic()
    proc = start_run(hub, REFERENCE, scratch / "work-ref", scratch / f"{name}.log")
    marks: dict[str, float] = {}
    commits: list[float] = []
    while proc.poll() is None:
        for record in list(hub.requests)[seen:]:
            seen += 1
            marks.setdefault("first_request", time.monotonic() - started)
            if record.method == "POST" and COMMIT.match(record.path):
                commits.append(time.monotonic() - started)
        time.sleep(0.01)
    marks["total"] = time.monotonic() - started
    marks["first_commit"] = commits[0] if commits else marks["total"]
    # from the run's length, not from commit times, so that kills land alike whatever the commit policy
    marks["per_shard"] = (marks["total"] - marks["first_commit"]) / max(1, shards - 1)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} run failed (exit {proc.returncode}):\n{(scratch / f'{name}.log').read_text()[-3000:]}")
    return marks


def clean_runs(hub: LocalHub, scratch: Path, shards: int) -> Timing:
    """The reference output from one uninterrupted run, then a second run on it, which finds nothing to do:
    together they time the fixed part of a run and the part that grows with the shards left."""
    reference = timed_run(hub, scratch, "reference", shards)
    noop = timed_run(hub, scratch, "no-op", shards)
    total = reference["total"]
    return Timing(reference["first_request"], reference["first_commit"], reference["per_shard"], min(noop["total"], total), total)


def shards_published(api: HfApi) -> set[str]:
    """Output shards already in the output repo (the manifest is committed with them); streamq names
    each output shard as its input shard."""
    if not api.repo_exists(OUTPUT):
        return set()
    return {f for f in api.list_repo_files(OUTPUT) if f.endswith(".safetensors")}


@dataclass
class Attempt:
    """One run of the soak: how it ended, and the requests the hub answered meanwhile."""

    number: int
    published_before: set[str]  # output shards in the output repo when it started
    seconds: float
    killed: bool
    exit_code: int
    requests: list[RequestRecord] = field(default_factory=list)


def soak(hub: LocalHub, scratch: Path, timing: Timing, shards: int, kills: int, seed: int, anywhere: bool) -> list[Attempt]:
    """Start and kill runs until one exits 0 by itself; after `kills` kills a run is left to finish."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    rng = random.Random(seed)
    attempts: list[Attempt] = []
    while len(attempts) < kills + EXTRA_ATTEMPTS:
        published = shards_published(api)
        killing = sum(a.killed for a in attempts) < kills
        delay = timing.kill_delay(rng, shards - len(published), anywhere) if killing else FINAL_RUN_TIMEOUT
        before = len(hub.requests)
        started = time.monotonic()
        work = scratch / (f"work-out-{len(attempts) + 1}" if POLICY.fresh_work_dir else "work-out")
        proc = start_run(hub, OUTPUT, work, scratch / f"attempt-{len(attempts) + 1}.log")
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        time.sleep(0.2)  # let the hub log the request the kill cut off
        attempt = Attempt(len(attempts) + 1, published, time.monotonic() - started, proc.returncode == -9,
                          proc.returncode, list(hub.requests)[before:])
        attempts.append(attempt)
        report_attempt(attempt, scratch)
        if attempt.exit_code == 0:
            break
    return attempts


def report_attempt(attempt: Attempt, scratch: Path) -> None:
    state = "killed" if attempt.killed else f"exited {attempt.exit_code}"
    print(f"attempt {attempt.number:3d}: {state:<9} after {attempt.seconds:5.2f} s "
          f"({len(attempt.published_before)} shards published before)", flush=True)
    if not attempt.killed and attempt.exit_code != 0:
        print((scratch / f"attempt-{attempt.number}.log").read_text()[-2000:])


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class ShardGet:
    shard: str
    status: int | None  # 200: from byte 0; 206: a range (a resumed download, or a header read)
    download: bool  # False for a header read (plan), True for streamq fetching the shard


def shard_gets(requests: list[RequestRecord], shard_of: dict[str, str]) -> list[ShardGet]:
    """Storage GETs of source shards, in log order. A download is announced by a HEAD on /resolve/ (its
    metadata), a header read by a GET there (redirected to storage), which tells the two apart."""
    announced: dict[str, str] = {}
    found = []
    for record in requests:
        resolve = RESOLVE.match(record.path)
        if resolve:
            announced[resolve["name"]] = record.method
            continue
        storage = STORAGE_GET.match(record.path)
        if record.method == "GET" and storage and storage["repo"] == SOURCE and storage["oid"] in shard_of:
            shard = shard_of[storage["oid"]]
            found.append(ShardGet(shard, record.status, announced.get(shard) == "HEAD"))
    return found


@dataclass
class Downloads:
    full: int = 0  # shard downloads from byte 0
    resumed: int = 0  # downloads resumed by Range from a partial file
    beyond_in_flight: int = 0  # per kill, shards the next run downloaded again from byte 0, beyond the first
    of_published: int = 0  # shards downloaded again although already published (never needed)
    repeats: dict[int, list[str]] = field(default_factory=dict)  # attempt -> shards it downloaded again


def count_downloads(attempts: list[Attempt], shard_of: dict[str, str]) -> Downloads:
    """Whole-shard downloads, and those that repeat an earlier run's download of the same shard.

    One repeat per kill is expected: the shard in flight. streamq also remakes a shard whose output was
    still being uploaded (outputs of a dead run are never trusted), which shows up as a second one.
    """
    counts = Downloads()
    fetched: set[str] = set()
    for attempt in attempts:
        downloads = [g for g in shard_gets(attempt.requests, shard_of) if g.download]
        fresh = [g.shard for g in downloads if g.status == 200]
        again = [shard for shard in fresh if shard in fetched]
        counts.full += len(fresh)
        counts.resumed += len(downloads) - len(fresh)
        counts.beyond_in_flight += max(0, len(again) - 1)
        counts.of_published += sum(1 for shard in again if shard in attempt.published_before)
        if again:
            counts.repeats[attempt.number] = again
        fetched.update(g.shard for g in downloads)
    return counts


def normalised(name: str, data: bytes, repo_id: str) -> bytes:
    """What must match between two runs: the manifest without timestamps, the card without the repo name."""
    if name == "streamq_manifest.json":
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
    parser.add_argument("--shard-size", default="30MB", help="max_shard_size for save_pretrained (above 10 MB, "
                        "huggingface_hub's write size, so that a killed download leaves bytes to resume)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, downloads)")
    parser.add_argument("--fresh-work-dir", action="store_true", help="a new work_dir for every run (a fresh disk)")
    parser.add_argument("--commits-per-hour", type=int, help="passed to streamq (this checkout's commit budget)")
    parser.add_argument("--streamq-root", type=Path, default=REPO_ROOT, help="run the streamq package found here")
    parser.add_argument("--min-commit-interval", type=float, help="passed to an older streamq (--streamq-root)")
    parser.add_argument("--json", type=Path, help="write the counts, per kill, to this file")
    parser.add_argument("--kill-anywhere", action="store_true", help="kill at any moment of a run, not within its first shards")
    return parser.parse_args()


def main() -> int:
    global POLICY
    args = parse_args()
    options: tuple[str, ...] = ()
    if args.commits_per_hour is not None:
        options += ("--commits-per-hour", str(args.commits_per_hour))
    if args.min_commit_interval is not None:
        options += ("--min-commit-interval", str(args.min_commit_interval))
    POLICY = Policy(args.streamq_root.resolve(), options, args.fresh_work_dir)
    scratch = Path(tempfile.mkdtemp(prefix="streamq-soak-"))
    try:
        with LocalHub(scratch / "hub") as hub:
            shards = build_model(scratch / "src", args.seed, args.shard_size)
            shard_of = push(hub, scratch / "src")
            throttle_downloads(hub, args.bandwidth_mbps)
            timing = clean_runs(hub, scratch, shards)
            print(f"model: {shards} shards; clean run: first request after {timing.startup:.1f} s, first shard "
                  f"committed after {timing.first_commit:.1f} s, then one every {timing.per_shard:.1f} s, "
                  f"done after {timing.total:.1f} s; "
                  f"a run with nothing left: {timing.fixed:.1f} s")
            attempts = soak(hub, scratch, timing, shards, args.kills, args.seed, args.kill_anywhere)
            return summarize(hub, scratch, attempts, shard_of, args, timing)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def summarize(hub: LocalHub, scratch: Path, attempts: list[Attempt], shard_of: dict[str, str], args: argparse.Namespace, timing: Timing) -> int:
    """Print the verdict; 0 only if a run finished and its output matches the reference and verifies."""
    finished = attempts[-1].exit_code == 0
    kills = sum(a.killed for a in attempts)
    failures = [a.number for a in attempts if not a.killed and a.exit_code != 0]
    downloads = count_downloads(attempts, shard_of)
    print(f"\nkills survived:       {kills}")
    print(f"attempts:             {len(attempts)} (finished: {finished}; runs that failed by themselves: {failures or 'none'})")
    if not finished:
        print("result matched:       no run finished")
        return 1
    fetch = dict(endpoint=hub.endpoint, token=TOKEN)
    ref = Path(snapshot_download(REFERENCE, local_dir=scratch / "ref", **fetch))
    out = Path(snapshot_download(OUTPUT, local_dir=scratch / "out", **fetch))
    mismatches, lost = compare(ref, out)
    report = verify_output(OUTPUT, **fetch)
    print(f"result matched:       {not mismatches} ({len(list(ref.rglob('*.safetensors')))} shards compared byte for byte)"
          + "".join(f"\n  differs: {m}" for m in mismatches))
    print(f"verify_output:        {'OK' if report.ok else 'PROBLEMS'}" + "".join(f"\n  - {p}" for p in report.problems))
    print(f"bytes of data lost:   {lost}")
    print(f"shards downloaded more than once beyond the one in flight at each kill: {downloads.beyond_in_flight} "
          f"(already published: {downloads.of_published}; {downloads.full} downloads from byte 0 and "
          f"{downloads.resumed} resumed by Range, for {len(shard_of)} shards)")
    print("  downloaded again: " + "; ".join(f"attempt {n}: {', '.join(s)}" for n, s in downloads.repeats.items()))
    redone = [len(downloads.repeats.get(a.number + 1, [])) for a in attempts if a.killed]
    print(f"shards redone per kill: {redone} (mean {sum(redone) / max(1, len(redone)):.2f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "policy": POLICY.describe(), "kill_anywhere": args.kill_anywhere, "seed": args.seed, "bandwidth_mbps": args.bandwidth_mbps, "shards": len(shard_of),
            "clean_run_s": timing.total, "kills": kills, "attempts": len(attempts), "finished": finished,
            "result_matched": not mismatches, "verify_ok": report.ok,
            "redone_per_kill": redone, "redone_mean": sum(redone) / max(1, len(redone)),
            "published_before_each_attempt": [len(a.published_before) for a in attempts],
            "kill_after_s": [round(a.seconds, 2) for a in attempts if a.killed],
            "downloads_from_byte_0": downloads.full, "downloads_resumed_by_range": downloads.resumed,
        }, indent=2) + "\n")
    return 0 if not mismatches and report.ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
