"""The one channel between a cluster run's jobs and its driver: a small Ray actor that jobs post what
they did to (an output shard uploaded, a source file checked) and the driver takes it from.

Only these few-hundred-byte messages travel through Ray; tensor bytes never do. The board also tells a
job that Ray runs again (its node was lost) what an earlier try already did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray


@dataclass(frozen=True)
class Made:
    """A job's output shard, uploaded to the Hub (its LFS object), waiting for the driver to record it."""

    job: int
    index: int
    size: int
    sha256: str
    tensor_bytes: int
    keys: list[str]
    stats: dict[str, int]


@dataclass(frozen=True)
class Checked:
    """A source file that a job read whole: `ok` if its sha256 matched the Hub's, else `message` says how not."""

    job: int
    file: int
    ok: bool
    message: str = ""


Message = Made | Checked


@ray.remote(num_cpus=0, max_restarts=0)
class Board:
    def __init__(self, made: set[int], checked: set[int]) -> None:
        """`made`, `checked`: what the run's manifest already holds."""
        self._messages: list[Message] = []
        self._made = set(made)
        self._checked = set(checked)

    def post(self, message: Message) -> None:
        self._messages.append(message)
        if isinstance(message, Made):
            self._made.add(message.index)
        elif message.ok:
            self._checked.add(message.file)

    def take(self) -> list[Message]:
        messages, self._messages = self._messages, []
        return messages

    def done(self) -> tuple[set[int], set[int]]:
        """Output shards uploaded and source files checked so far, by any job."""
        return set(self._made), set(self._checked)


def start_board(made: set[int], checked: set[int]) -> Any:
    """A board on the cluster's head node, which lives as long as the cluster does."""
    return Board.options(resources={"node:__internal_head__": 0.001}).remote(made, checked)
