"""The shards a run uploaded to the Hub but has not committed yet, kept in work_dir for the next run.

With commits batched, a crash can leave shards whose bytes are on the Hub (an LFS object is only
stored once its sha256 and size checked out) but that no commit references. A run that reuses the
work_dir finds them here and commits them instead of downloading and quantizing them again. An
entry is only written after its upload returned, is only used for the same output, source,
revision, settings, device and streamq version, and only once the Hub confirms it still holds the
object (see `HubSink`); the file is replaced atomically, so a crash leaves the old or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .manifest import Manifest, ShardEntry

logger = logging.getLogger(__name__)

JOURNAL_NAME = "uploaded-not-committed.json"


def identity(output: str, manifest: Manifest) -> dict[str, Any]:
    """What must be equal for an uploaded shard to belong to a run: where it goes, and how it was made."""
    return {
        "output": output, "source": manifest.source, "source_revision": manifest.source_revision,
        "settings": manifest.settings, "device": manifest.device, "streamq_version": manifest.streamq_version,
    }


class UploadJournal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, ident: dict[str, Any]) -> tuple[dict[str, ShardEntry], dict[str, Any]]:
        """The journal's shards, and the source files' progress at their time (`verified`: files whose
        sha256 checked out; `checkpoints`: hash states of files still being checked), if it was written
        for `ident`; nothing if not, or if it is unreadable."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("identity") != ident:
                return {}, {}
            return {name: ShardEntry(**entry) for name, entry in data["shards"].items()}, dict(data.get("progress", {}))
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.warning("ignoring the upload journal %s (%s)", self.path, exc)
            return {}, {}

    def record(self, ident: dict[str, Any], name: str, entry: ShardEntry, progress: dict[str, Any]) -> None:
        """Add a shard whose upload has returned (a journal of another run is replaced)."""
        shards, _ = self.entries(ident)
        shards[name] = entry
        self._write(ident, shards, progress)

    def forget(self, ident: dict[str, Any], names: set[str]) -> None:
        """Drop shards that are committed (or not to be trusted)."""
        shards, progress = self.entries(ident)
        if names & shards.keys():
            self._write(ident, {n: e for n, e in shards.items() if n not in names}, progress)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def holds_shards(self) -> bool:
        """Whether it lists any shard, for whichever run: a work folder without one has nothing to resume."""
        try:
            return bool(json.loads(self.path.read_text()).get("shards"))
        except (OSError, ValueError, AttributeError):
            return False

    def _write(self, ident: dict[str, Any], shards: dict[str, ShardEntry], progress: dict[str, Any]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        data = json.dumps({"identity": ident, "shards": {n: asdict(e) for n, e in shards.items()}, "progress": progress}, indent=1, sort_keys=True)
        with open(partial, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)
