"""The progress record that makes a run resumable, stored in the output repo itself.

It is committed together with each output shard, so whatever the Hub (or output directory) holds
is always described exactly by the manifest next to it. An output shard made from a source file whose
sha256 is still being taken is uploaded but not committed: the manifest lists it as pending, with the
hash state a resumed run continues from, and it joins the output once every file it came from checked out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import ManifestMismatchError
from .surface import remedy

MANIFEST_NAME = "streamq_manifest.json"
FORMAT_VERSION = 2


@dataclass
class ShardEntry:
    """One output shard, and the source files it was made from."""

    output_name: str
    output_size: int
    output_sha256: str
    tensor_bytes: int  # sum of tensor sizes, what model.safetensors.index.json calls total_size
    keys: list[str]
    inputs: dict[str, str | None]  # source file -> its sha256 on the Hub (None for a local file)
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
    shards: dict[str, ShardEntry] = field(default_factory=dict)  # published: their source files checked out
    pending: dict[str, ShardEntry] = field(default_factory=dict)  # uploaded, waiting for a source file's sha256
    verified: dict[str, str] = field(default_factory=dict)  # source file -> sha256, checked over all its bytes
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # source file -> {"offset", "state"} of its hash
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
                f"use the streamq version that wrote it, or {remedy('overwrite')} to start over"
            )
        shards = {name: ShardEntry(**entry) for name, entry in data.pop("shards").items()}
        pending = {name: ShardEntry(**entry) for name, entry in data.pop("pending").items()}
        return cls(**data, shards=shards, pending=pending)

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
                    f"Run again with the same arguments to finish it, or {remedy('overwrite')} to start over."
                )


def stats_total(entries: Iterable[ShardEntry]) -> Counter:
    """The converter's counts (e.g. grid-exact groups) summed over published shards, resumed ones included."""
    total: Counter = Counter()
    for entry in entries:
        total.update(entry.stats)
    return total


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
