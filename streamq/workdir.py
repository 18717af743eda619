"""The work directory: where a run keeps the source's bytes and the output shards in flight.

Each output gets a folder of its own, named after it, under one root: the `work_dir` given, else
`STREAMQ_WORK_DIR`, else the temp dir's `streamq/`. So the same command run again after a crash finds
it (its upload journal: shards uploaded but not committed), two outputs never share one, and nothing
else in a directory the user names is touched. A run holds its folder's lock while it runs. What a run
writes there is removed when it ends: the folder itself when it finished, all but the journal when it
failed. A run killed outright (`kill -9`) removes nothing, so every run also clears the bulk of the
folders under its root whose lock is free (their runs are dead); a source's bytes or an output shard
left by a dead run are never trusted anyway.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO

from .errors import ConcurrentRunError, OutputNotWritableError
from .journal import JOURNAL_NAME, UploadJournal
from .location import LocalDir, Location
from .surface import remedy

ROOT_ENV = "STREAMQ_WORK_DIR"
LOCK_NAME = ".streamq-work.lock"
# Remade by every run and never trusted from an earlier one: the window of the source's bytes, output
# shards, carried-over files, the source's model card, the meta model's config, the output's manifest,
# and an upload journal's next version that a killed run was writing (the journal is replaced by it whole).
SCRATCH = ("in", "out", "extra", "card", "meta", "meta-out", f"{JOURNAL_NAME}.partial")


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or _temp_root()).expanduser()


def _temp_root() -> Path:
    return Path(tempfile.gettempdir()) / "streamq"


def folder_for(root: Path, output: Location, endpoint: str, branch: str | None = None) -> Path:
    """`root/<output's name>-<hash of where it is>`: one folder per output, found again by the same command."""
    if isinstance(output, LocalDir):
        name, key = output.path.name, str(output.path.resolve())
    else:
        name, key = output.repo_id, f"{endpoint.rstrip('/')}/{output.repo_id}" + (f"@{branch}" if branch else "")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "--", name)[-80:].strip("-.")
    return root / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class WorkDir:
    """An output's work folder, held by this run: `open` it, use `path`, `close(finished=...)` it."""

    def __init__(self, path: Path, lock: IO[bytes]) -> None:
        self.path, self._lock = path, lock

    @classmethod
    def open(cls, path: Path) -> WorkDir:
        """`path` (a `folder_for` the output), writable, locked, with no scratch left; dead runs' bulk
        under the same root cleared first."""
        _clear_dead(path.parent)
        while True:
            try:
                path.mkdir(parents=True, exist_ok=True)
                lock = open(path / LOCK_NAME, "a+b")  # noqa: SIM115 (held for the run)
            except FileNotFoundError:
                continue  # another run's clean-up removed the folder or the root between our mkdir and our open
            except OSError as exc:
                raise OutputNotWritableError(f"cannot write to the work dir {path.parent}: {exc.strerror or exc}; {remedy('writable_work_dir')}") from exc
            if not _try_lock(lock):
                lock.close()
                raise ConcurrentRunError(f"another streamq run is using the work dir {path}; let it finish, or {remedy('other_work_dir')}")
            if os.fstat(lock.fileno()).st_nlink:
                break
            lock.close()  # another run's clean-up removed this folder as dead between our open and our lock
        _remove(path, SCRATCH)
        return cls(path, lock)

    def close(self, *, finished: bool) -> None:
        """Remove what this run wrote: the folder once finished, else all but the upload journal."""
        _remove(self.path, SCRATCH + ((JOURNAL_NAME,) if finished else ()))
        if finished or _only_lock_left(self.path):
            _remove(self.path, (JOURNAL_NAME,))  # one that lists no shard
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            _rmdir(self.path)
            if self.path.parent == _temp_root():
                _rmdir(self.path.parent)  # streamq's own, in the temp dir: removed with its last folder
        self._lock.close()


def _clear_dead(root: Path) -> None:
    """The scratch of work folders whose run is dead (their lock is free; a folder without one is not
    streamq's); a folder left with nothing to resume is removed."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        lock_path = folder / LOCK_NAME
        try:
            lock = open(lock_path, "r+b")  # noqa: SIM115 (a folder without one is not a work folder, or is being made)
        except OSError:
            continue
        with lock:
            if not _try_lock(lock):
                continue  # a live run
            _remove(folder, SCRATCH)
            if _only_lock_left(folder):
                _remove(folder, (JOURNAL_NAME,))  # one that lists no shard
                lock_path.unlink(missing_ok=True)
                _rmdir(folder)


def _try_lock(lock: IO[bytes]) -> bool:
    """Take the lock without waiting; the OS releases it when its holder exits, even by kill -9."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _only_lock_left(folder: Path) -> bool:
    """Nothing in `folder` worth keeping: at most the lock and an upload journal listing no shard."""
    names = {p.name for p in folder.iterdir()} - {LOCK_NAME}
    if names == {JOURNAL_NAME}:
        return not UploadJournal(folder / JOURNAL_NAME).holds_shards()
    return not names


def _remove(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        (folder / f"{name}.partial").unlink(missing_ok=True)


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # something else was put there: leave it
