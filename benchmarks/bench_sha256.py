"""Time streamq's ResumableSha256 against hashlib.sha256 on the same data, in the same run.

Both hash the same 1 GiB of random bytes in 4 MiB pieces; runs alternate (hashlib, then ResumableSha256,
--repeat times) and the best time of each counts, so load from other processes hits both alike. A second
measurement hashes two halves in two threads at once, which only beats one thread if the GIL is released
while hashing; hashlib releases it too, so its two-thread figure is what the machine's cores allow. Every
digest is checked against hashlib's.

    PYTHONPATH=. python benchmarks/bench_sha256.py --json benchmarks/results/sha256_cpu2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamq.sha256 import ResumableSha256, resumable

MAKERS: dict[str, Callable[[], object]] = {"hashlib": hashlib.sha256, "ResumableSha256": ResumableSha256}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hash_pieces(make: Callable[[], object], pieces: list[bytes]) -> str:
    h = make()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()


def timed_threads(make: Callable[[], object], pieces: list[bytes], threads: int) -> tuple[float, list[str]]:
    """Seconds to hash `pieces` split among `threads` threads, one hash each, and their digests."""
    parts = [pieces[i::threads] for i in range(threads)]
    digests: list[str] = [""] * threads

    def work(i: int) -> None:
        digests[i] = hash_pieces(make, parts[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start, digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--piece-mib", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    piece = args.piece_mib << 20
    pieces = [os.urandom(piece) for _ in range((args.size_mib << 20) // piece)]
    total = piece * len(pieces)
    expected = {n: [hash_pieces(hashlib.sha256, pieces[i::n]) for i in range(n)] for n in (1, 2)}
    best: dict[str, dict[int, float]] = {name: {1: float("inf"), 2: float("inf")} for name in MAKERS}
    for _ in range(args.repeat):
        for threads in (1, 2):
            for name, make in MAKERS.items():
                seconds, digests = timed_threads(make, pieces, threads)
                assert digests == expected[threads], (name, threads)
                best[name][threads] = min(best[name][threads], seconds)

    results = {
        name: {
            "mb_per_s": total / best[name][1] / 1e6,
            "best_s": best[name][1],
            "two_threads_mb_per_s": total / best[name][2] / 1e6,
        }
        for name in MAKERS
    }
    report = {
        "bytes": total,
        "piece_bytes": piece,
        "repeat": args.repeat,
        "ratio_resumable_to_hashlib": results["ResumableSha256"]["mb_per_s"] / results["hashlib"]["mb_per_s"],
        "results": results,
        "resumable": resumable(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
