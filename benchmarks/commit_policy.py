"""What the commit budget does for a model of N shards: commits made, shards per commit, and how much a
crash can cost, computed from `streamq.commits.CommitBudget` itself (the policy HubSink follows).

Worst case throughout: the whole run falls within one hour (no commit ages out of the budget). A crash
costs the shards uploaded but not committed (none when the resumed run has the killed run's work_dir:
they are committed from the upload journal; up to a batch less one on a fresh disk), plus the shards
in flight, which no policy saves: the one downloading and quantizing and the one uploading.

    python benchmarks/commit_policy.py --shards 163 --json benchmarks/results/commit_policy_163.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from streamq.commits import DEFAULT_COMMITS_PER_HOUR, CommitBudget

IN_FLIGHT = 2  # with the default disk budget: one shard converting, the previous one uploading


class FrozenClock:
    def __call__(self) -> float:
        return 0.0


def run(shards: int, per_hour: int, earlier_commits: int, claimed: bool) -> list[int]:
    """Shards per commit, the final commit (config, index, the last shard) last."""
    budget = CommitBudget(per_hour, [-1.0] * earlier_commits, clock=FrozenClock())
    sizes, pending = [], 0
    for done in range(1, shards + 1):
        pending += 1
        if budget.commit_now(pending, shards - done, claimed):
            sizes.append(pending)
            budget.record()
            pending, claimed = 0, True
    return sizes + [pending]


def scenario(shards: int, per_hour: int) -> dict[str, Any]:
    fresh = run(shards, per_hour, 1, claimed=False)  # the repo's creation commit counts
    half = len(fresh) // 2
    committed = sum(fresh[:half])
    resumed = run(shards - committed, per_hour, 1 + half, claimed=True)  # crash after half the commits
    largest = max(fresh[:-1] or [0])
    return {
        "shards": shards, "commits_per_hour": per_hour,
        "commits": len(fresh), "shards_per_commit": fresh,
        "redone_after_a_crash_with_work_dir_kept": f"at most {IN_FLIGHT} (in flight)",
        "redone_after_a_crash_on_a_fresh_disk": f"at most {largest - 1 + IN_FLIGHT} ({largest - 1} uploaded, not committed, + {IN_FLIGHT} in flight)",
        "crash_after_half_the_commits": {
            "shards_committed": committed, "resumed_run_commits": len(resumed), "resumed_shards_per_commit": resumed,
            "commits_in_the_hour": 1 + half + len(resumed),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[13, 163, 400])
    parser.add_argument("--commits-per-hour", type=int, default=DEFAULT_COMMITS_PER_HOUR)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [scenario(n, args.commits_per_hour) for n in args.shards]
    for r in results:
        crash = r["crash_after_half_the_commits"]
        print(f"{r['shards']} shards: {r['commits']} commits (largest batch {max(r['shards_per_commit'])}); "
              f"a crash redoes {r['redone_after_a_crash_with_work_dir_kept']} with the work_dir kept, "
              f"{r['redone_after_a_crash_on_a_fresh_disk']} on a fresh disk; after a crash half-way the resumed run "
              f"makes {crash['resumed_run_commits']} commits ({crash['commits_in_the_hour']} in the hour)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
