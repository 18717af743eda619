"""How many Hub commits a run may make, and how many uploaded shards each one carries.

The Hub limits commits per repo per hour (a 429 quoting 128 has been reported), so a run spends a
budget of `per_hour` commits in any rolling hour, counting the repo's own commits of that hour (a
restarted run does not overspend what the killed one used). Within it, a shard is committed as soon
as it is uploaded whenever the budget allows, because every uncommitted shard is work a crash may
cost; only a model with more shards than the budget batches, evenly: each commit carries at least
ceil(shards left / commits left) shards, and one commit is kept for the final files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

HOUR = 3600.0
DEFAULT_COMMITS_PER_HOUR = 100  # below the 128 the Hub has been seen to enforce, leaving room for others


class CommitBudget:
    """Commit times of the last hour (wall clock, seconds since the epoch), and what they leave."""

    def __init__(
        self, per_hour: int, earlier: Iterable[float] = (), clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_hour < 1:
            raise ValueError(f"commits_per_hour must be at least 1, got {per_hour}")
        self.per_hour = per_hour
        self._clock, self._sleep = clock, sleep
        self._times = sorted(earlier)

    def note_earlier(self, times: Iterable[float]) -> None:
        """Count commits made before this run (the output repo's history)."""
        self._times = sorted([*self._times, *times])

    def _recent(self) -> list[float]:
        cutoff = self._clock() - HOUR
        self._times = [t for t in self._times if t > cutoff]
        return self._times

    def left(self) -> int:
        """Commits that may still be made in the rolling hour ending now."""
        return max(0, self.per_hour - len(self._recent()))

    def record(self) -> None:
        self._times.append(self._clock())

    def batch_size(self, uncommitted: int) -> int | None:
        """Shards a commit made now should carry at least, with `uncommitted` shards (uploaded or still to
        come, the last one excluded: it goes with the final files) left to commit before the final commit;
        None when no commit may be made now but the reserved final one."""
        spare = self.left() - 1
        if spare < 1:
            return None
        return max(1, math.ceil(uncommitted / spare))

    def commit_now(self, pending: int, remaining: int, claimed: bool) -> bool:
        """Whether to commit the `pending` uploaded shards now, with `remaining` shards still to come.

        The last shard waits for the final files (one commit fewer at the end of a run). Until the output
        holds a manifest (`claimed`), a shard is committed at once if one commit besides the final one is
        left: from then on a resumed run can find what this one uploaded."""
        if remaining == 0:
            return False
        if not claimed:
            return self.left() > 1
        batch = self.batch_size(pending + remaining - 1)
        return batch is not None and pending >= batch

    def wait_for_one(self) -> None:
        """Block until a commit may be made (the final one, when the budget is spent: an hour at most)."""
        while self.left() < 1:
            wait = self._recent()[0] + HOUR - self._clock() + 1.0
            logger.warning("commit budget of %d per hour spent; waiting %.0f s for the final commit", self.per_hour, wait)
            self._sleep(max(wait, 1.0))
