"""The one channel between a cluster run's jobs and its driver: a small Ray actor that jobs post what
they did to (a job started, an output shard uploaded, a source file checked), as they do it, and the
driver takes it from. Only these few-hundred-byte messages travel through Ray; tensor bytes never do.
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
    """A source file that a job read whole, whose sha256 matched the Hub's."""

    job: int
    file: int


@dataclass(frozen=True)
class Started:
    """A job began on a node (again, if Ray runs it again after its node was lost)."""

    job: int
    node: str


@dataclass(frozen=True)
class Finished:
    """A job's end on its node: the most its work folder held, of its disk budget, and the worker process's peak RSS."""

    job: int
    peak_disk: int
    disk_budget: int
    peak_rss: int


Message = Made | Checked | Started | Finished


@ray.remote(num_cpus=0, max_restarts=0)
class Board:
    def __init__(self) -> None:
        self._messages: list[Message] = []

    def post(self, message: Message) -> None:
        self._messages.append(message)

    def take(self) -> list[Message]:
        messages, self._messages = self._messages, []
        return messages


def start_board() -> Any:
    """A board on the cluster's head node, which lives as long as the cluster does."""
    return Board.options(resources={"node:__internal_head__": 0.001}).remote()
