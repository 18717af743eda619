"""Sinks: where output shards are published, together with the manifest that records them.

Both sinks keep the same promise: a shard is visible in the output exactly when the manifest beside
it says so, and config.json plus the index only appear in the final step, so an unfinished output
never looks like a loadable model.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from . import hub
from .budget import disk_full_is_clear
from .errors import ConcurrentRunError, OutputNotWritableError, StreamqError
from .manifest import MANIFEST_NAME, Manifest
from .retry import retrying, transient_delay

logger = logging.getLogger(__name__)

# A file to publish: its bytes, or a local path to take them from.
Payload = bytes | Path


def output_branch(branch: str | None, create_pr: bool) -> str | None:
    """The branch a Hub output is written to: the given one; for a pull request, a staging branch."""
    return branch or ("streamq-4bit" if create_pr else None)


class Sink(Protocol):
    location: str  # URL or path shown to the user

    def read_manifest(self, scratch: Path) -> Manifest | None: ...

    def existing_files(self) -> list[str]: ...

    def clear(self) -> None: ...

    def add_shard(self, local: Path, name: str, manifest: Manifest, last: bool = False) -> bool:
        """Take ownership of `local` (moved or deleted); True when it is committed already. The `last`
        shard may wait to be committed with the final files."""
        ...

    def finalize(self, files: dict[str, Payload], manifest: Manifest) -> None: ...

    def close(self) -> None: ...


class LocalSink:
    """An output directory; shards are moved in, the manifest is replaced atomically after each."""

    LOCK_NAME = ".streamq.lock"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.location = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / self.LOCK_NAME, "a+b")  # noqa: SIM115 (held for the run)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot write to {self.root}: {exc.strerror or exc}; choose another output") from exc
        try:  # released by the OS when this process ends, even by kill -9
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            raise ConcurrentRunError(f"another streamq run is writing {self.root}; let it finish, or stop it and run again") from exc
        ours = (self.root / MANIFEST_NAME).exists()  # else only the manifest's own first write can be streamq's
        for stale in self.root.rglob("*.partial"):  # what a killed run was writing (under this same lock)
            if ours or stale.name == f"{MANIFEST_NAME}.partial":
                stale.unlink()

    def close(self) -> None:
        """Release the lock (also released when the process ends)."""
        self._lock.close()

    def read_manifest(self, scratch: Path) -> Manifest | None:
        path = self.root / MANIFEST_NAME
        return Manifest.from_json(path.read_text()) if path.exists() else None

    def existing_files(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file() and p.name != self.LOCK_NAME
        )

    def clear(self) -> None:
        for name in self.existing_files():
            (self.root / name).unlink()

    def add_shard(self, local: Path, name: str, manifest: Manifest, last: bool = False) -> bool:
        with disk_full_is_clear(self.root):
            if not (self.root / MANIFEST_NAME).exists():  # claim the output first: a shard is never found without one
                before = dataclasses.replace(manifest, shards={k: v for k, v in manifest.shards.items() if k != name})
                self._write(MANIFEST_NAME, before.to_json().encode())
            self._place(local, name)
            self._write(MANIFEST_NAME, manifest.to_json().encode())
        return True

    def finalize(self, files: dict[str, Payload], manifest: Manifest) -> None:
        with disk_full_is_clear(self.root):
            for name, payload in files.items():  # the caller orders config.json and the index last
                if isinstance(payload, Path):
                    self._place(payload, name, keep_source=True)
                else:
                    self._write(name, payload)
            self._write(MANIFEST_NAME, manifest.to_json().encode())

    def _place(self, local: Path, name: str, keep_source: bool = False) -> None:
        with self._replacing(name) as partial:
            if keep_source:
                shutil.copyfile(local, partial)
            else:
                shutil.move(local, partial)  # a rename when work_dir is on the same filesystem

    def _write(self, name: str, data: bytes) -> None:
        with self._replacing(name) as partial:
            partial.write_bytes(data)

    @contextmanager
    def _replacing(self, name: str) -> Iterator[Path]:
        """A `.partial` file to fill, renamed over `name` once complete; removed if filling it fails
        (a full disk leaves nothing half-written behind)."""
        dest = self.root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        try:
            yield partial
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)


class HubSink:
    """A Hub repo. Shard bytes are uploaded as soon as they exist (`preupload_lfs_files`); commits carry
    the uploaded shards together with the manifest, at most one per `min_commit_interval` seconds,
    because the Hub limits commits per hour."""

    def __init__(
        self, api: HfApi, repo_id: str, *, private: bool, min_commit_interval: float, branch: str | None = None, create_pr: bool = False
    ) -> None:
        self.api = api
        self.repo_id = repo_id
        self.create_pr = create_pr
        # A pull request is staged on a branch (which resumes like any output), then opened at the end.
        self.branch = output_branch(branch, create_pr)
        branch = self.branch
        self.min_commit_interval = min_commit_interval
        self._pending: list[CommitOperationAdd] = []
        self._delete_after_commit: list[Path] = []
        self._last_commit = float("-inf")
        with hub.writing(repo_id):
            url = retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"creating {repo_id}")
            if branch is not None:
                retrying(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), f"creating branch {branch}")
        # Every commit names this as its parent, so a concurrent writer makes it fail instead of mixing.
        self._head = self._current_head()
        self.location = str(url) if branch is None else f"{url} (branch {branch})"

    def read_manifest(self, scratch: Path) -> Manifest | None:
        try:
            text = self._read_manifest_text(self._head, scratch)  # the commit this run's first commit builds on
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        return Manifest.from_json(text)

    def _read_manifest_text(self, revision: str | None, scratch: Path) -> str:
        def download() -> str:
            return hf_hub_download(
                self.repo_id, MANIFEST_NAME, revision=revision, local_dir=scratch, endpoint=self.api.endpoint, token=self.api.token
            )

        with hub.reading(self.repo_id):
            return Path(retrying(download, f"reading the manifest of {self.repo_id}")).read_text()

    def _current_head(self) -> str:
        with hub.reading(self.repo_id):
            return retrying(lambda: self.api.model_info(self.repo_id, revision=self.branch).sha, f"info of {self.repo_id}")

    def existing_files(self) -> list[str]:
        with hub.reading(self.repo_id):
            files = retrying(lambda: self.api.list_repo_files(self.repo_id, revision=self.branch), f"listing {self.repo_id}")
        return sorted(f for f in files if f != ".gitattributes")

    def clear(self) -> None:
        deletions = [CommitOperationDelete(path) for path in self.existing_files()]
        if deletions:
            self._commit(deletions, "streamq: start over")

    def add_shard(self, local: Path, name: str, manifest: Manifest, last: bool = False) -> bool:
        """Upload the shard's bytes now; commit it with the manifest now or with a later shard (the last
        one with the final files: one commit fewer at the end of a run, where nothing overlaps it).

        The local file is deleted as soon as its bytes are on the Hub, so batching commits costs no disk.
        """
        op = CommitOperationAdd(name, str(local))
        op.upload_info.sha256 = bytes.fromhex(manifest.shards[name].output_sha256)  # hashed once, when written
        with hub.writing(self.repo_id):
            self.api.preupload_lfs_files(self.repo_id, [op], revision=self.branch)
        if getattr(op, "_is_uploaded", False):  # LFS: the commit only needs its sha256 from now on
            local.unlink()
        else:  # a regular upload is read at commit time
            self._delete_after_commit.append(local)
        self._pending.append(op)
        if last:
            return False
        if time.monotonic() - self._last_commit < self.min_commit_interval:
            logger.info("%s uploaded; committing it with a later shard to respect the Hub's commit rate", name)
            return False
        self._commit_pending(manifest, f"streamq: add {', '.join(o.path_in_repo for o in self._pending)}")
        return True

    def finalize(self, files: dict[str, Payload], manifest: Manifest) -> None:
        self._pending.extend(CommitOperationAdd(name, payload if isinstance(payload, bytes) else str(payload)) for name, payload in files.items())
        if not self.create_pr:
            self._commit_pending(manifest, "streamq: finish 4-bit conversion (config, index, model card)")
            return
        manifest.status = "in_progress"  # the branch is complete; done once the pull request is open
        self._commit_pending(manifest, "streamq: finish 4-bit conversion on the staging branch")
        self._open_pull_request(manifest)

    def _open_pull_request(self, manifest: Manifest) -> None:
        """One commit on a new pull request against main, copying every file of the staging branch
        (LFS files by reference: no bytes are uploaded again)."""
        staged = self._head
        copies = [CommitOperationCopy(name, name, src_revision=staged) for name in self.existing_files() if name != MANIFEST_NAME]
        with hub.writing(self.repo_id):
            info = retrying(
                lambda: self.api.create_commit(
                    self.repo_id, copies, commit_message=f"4-bit ({manifest.settings['quant_type']}) conversion by streamq",
                    commit_description=f"Converted from {manifest.source} at {manifest.source_revision}; staged on branch `{self.branch}`.",
                    create_pr=True,
                ),
                f"opening a pull request on {self.repo_id}",
            )
        manifest.status = "done"
        manifest.pull_request = info.pr_url
        self._commit([CommitOperationAdd(MANIFEST_NAME, manifest.to_json().encode())], "streamq: record the pull request")
        self.location = info.pr_url or self.location

    def close(self) -> None:
        """Nothing to release: the Hub side is guarded by `parent_commit`."""

    def _commit_pending(self, manifest: Manifest, message: str) -> None:
        manifest_json = manifest.to_json().encode()
        ops = [*self._pending, CommitOperationAdd(MANIFEST_NAME, manifest_json)]
        self._commit(ops, message, manifest_json)
        for path in self._delete_after_commit:
            path.unlink(missing_ok=True)
        self._delete_after_commit.clear()
        self._pending.clear()

    def _commit(self, ops: list, message: str, manifest_json: bytes | None = None) -> None:
        """Commit on top of the head this run last saw; retried, and a lost response is recognised."""

        def attempt() -> str:
            try:
                return self.api.create_commit(
                    self.repo_id, ops, commit_message=message, revision=self.branch, parent_commit=self._head
                ).oid
            except Exception as exc:
                if transient_delay(exc, 0) is not None and (landed := self._landed(manifest_json)) is not None:
                    logger.info("the commit landed although its response was lost")
                    return landed
                raise

        try:
            with hub.writing(self.repo_id):
                self._head = retrying(attempt, f"commit to {self.repo_id}")
        except StreamqError as exc:
            cause = exc.__cause__
            if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code == 412:
                raise ConcurrentRunError(
                    f"{self.repo_id} changed while this run was writing it: another run (or person) is publishing "
                    "to it. Let that one finish, then run again to resume; nothing published is lost"
                ) from cause
            raise
        self._last_commit = time.monotonic()

    def _landed(self, manifest_json: bytes | None) -> str | None:
        """The new head if it is this very commit (its manifest is byte for byte ours), else None."""
        head = self._current_head()
        if head == self._head or manifest_json is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            return head if self._read_manifest_text(head, Path(scratch)).encode() == manifest_json else None
