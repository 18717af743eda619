"""The progress record that makes a run resumable, stored in the output repo itself.

It is committed together with each output shard, so whatever the Hub (or output directory) holds
is always described exactly by the manifest next to it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import ManifestMismatchError

MANIFEST_NAME = "streamq_manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardEntry:
    """One published output shard, and the input it came from."""

    input_name: str
    input_sha256: str
    input_size: int
    output_name: str
    output_size: int
    output_sha256: str
    tensor_bytes: int  # sum of tensor sizes, what model.safetensors.index.json calls total_size
    keys: list[str]
    status: str = "done"
    finished_at: str = ""
    stats: dict[str, int] = field(default_factory=dict)  # what the converter counted, e.g. grid-exact groups


@dataclass
class Manifest:
    source: str
    source_revision: str | None
    settings: dict[str, Any]
    device: str
    streamq_version: str
    status: str = "in_progress"  # becomes "done" in the final commit, with config and index
    shards: dict[str, ShardEntry] = field(default_factory=dict)
    pull_request: str | None = None  # with create_pr: the pull request the result was opened as
    format: int = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: now())
    updated_at: str = ""

    def to_json(self) -> str:
        self.updated_at = now()
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"{MANIFEST_NAME} has format {data.get('format')!r}, this streamq reads format {FORMAT_VERSION}; "
                "use the streamq version that wrote it, or start over with overwrite=True"
            )
        shards = {name: ShardEntry(**entry) for name, entry in data.pop("shards").items()}
        return cls(**data, shards=shards)

    def check_compatible(self, other: Manifest) -> None:
        """Refuse to mix outputs of different sources, revisions, settings or devices in one repo."""
        for label, mine, theirs in (
            ("source", self.source, other.source),
            ("source revision", self.source_revision, other.source_revision),
            ("settings", self.settings, other.settings),
            ("quantization device", self.device, other.device),
        ):
            if mine != theirs:
                raise ManifestMismatchError(
                    f"the output already holds a run with {label} {mine!r}, but this run has {theirs!r}. "
                    "Run again with the same arguments to finish it, or pass overwrite=True (--overwrite) to start over."
                )


def stats_total(entries: Iterable[ShardEntry]) -> Counter:
    """The converter's counts (e.g. grid-exact groups) summed over published shards, resumed ones included."""
    total: Counter = Counter()
    for entry in entries:
        total.update(entry.stats)
    return total


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
