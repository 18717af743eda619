"""Sinks: where output shards are published, together with the manifest that records them.

Both sinks keep the same promise: a shard is visible in the output exactly when the manifest beside
it says so, and config.json plus the index only appear in the final step, so an unfinished output
never looks like a loadable model. A shard made from a source file whose sha256 has not checked out
yet is uploaded (a local output holds it as `<name>.unverified`) and listed as pending, and only
joins the output when `promote` is called for it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

from . import hub
from .budget import disk_full_is_clear
from .commits import DEFAULT_COMMITS_PER_HOUR, HOUR, CommitBudget
from .errors import ConcurrentRunError, OutputNotWritableError, StreamqError
from .journal import UploadJournal, identity
from .manifest import MANIFEST_NAME, Manifest, ShardEntry
from .retry import retrying, transient_delay
from .stall import SpeedHistory, WatchedReader

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

    def add_shard(self, local: Path, name: str, manifest: Manifest, remaining: int = 0) -> bool:
        """Take ownership of `local` (moved or deleted), listed in `manifest.shards` or `.pending`; True
        when it is recorded already. `remaining`: shards of this run still to come; the last shard (0)
        may wait to be committed with the final files."""
        ...

    def promote(self, names: list[str], manifest: Manifest) -> None:
        """Pending shards whose source files checked out (now in `manifest.shards`) join the output."""
        ...

    def discard(self, names: list[str], manifest: Manifest) -> None:
        """Pending shards made from a file that failed its check (gone from `manifest`): drop them and record it."""
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

    UNVERIFIED = ".unverified"

    def read_manifest(self, scratch: Path) -> Manifest | None:
        path = self.root / MANIFEST_NAME
        if not path.exists():
            return None
        manifest = Manifest.from_json(path.read_text())
        for name, entry in list(manifest.pending.items()):  # kept only if its file is all there
            held = self.root / (name + self.UNVERIFIED)
            if not held.is_file() or held.stat().st_size != entry.output_size:
                del manifest.pending[name]
        return manifest

    def existing_files(self) -> list[str]:
        return sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file() and p.name != self.LOCK_NAME
        )

    def clear(self) -> None:
        for name in self.existing_files():
            (self.root / name).unlink()

    def add_shard(self, local: Path, name: str, manifest: Manifest, remaining: int = 0) -> bool:
        with disk_full_is_clear(self.root):
            if not (self.root / MANIFEST_NAME).exists():  # claim the output first: a shard is never found without one
                before = dataclasses.replace(
                    manifest, shards={k: v for k, v in manifest.shards.items() if k != name},
                    pending={k: v for k, v in manifest.pending.items() if k != name},
                )
                self._write(MANIFEST_NAME, before.to_json().encode())
            self._place(local, name if name in manifest.shards else name + self.UNVERIFIED)
            self._write(MANIFEST_NAME, manifest.to_json().encode())
        return True

    def promote(self, names: list[str], manifest: Manifest) -> None:
        with disk_full_is_clear(self.root):
            for name in names:
                os.replace(self.root / (name + self.UNVERIFIED), self.root / name)
            self._write(MANIFEST_NAME, manifest.to_json().encode())

    def discard(self, names: list[str], manifest: Manifest) -> None:
        for name in names:
            (self.root / (name + self.UNVERIFIED)).unlink(missing_ok=True)
        self._write(MANIFEST_NAME, manifest.to_json().encode())

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
    the uploaded shards together with the manifest, within a budget of `commits_per_hour` commits in any
    rolling hour (the Hub limits them): one commit per shard when the budget allows, else even batches.

    A shard made from a source file still being checked is uploaded the same way but committed only
    as a line of the manifest's pending list (a resumed run takes it up from there, once the Hub
    confirms the object); it joins a commit as a file once `promote` is called for it.

    Shards uploaded but not yet in any commit are listed in `journal` (a file in work_dir), for a run
    that resumes with the same work_dir to commit them instead of converting them again (see `journal.py`).
    """

    def __init__(
        self, api: HfApi, repo_id: str, *, private: bool, commits_per_hour: int = DEFAULT_COMMITS_PER_HOUR,
        branch: str | None = None, create_pr: bool = False, journal: Path | None = None,
    ) -> None:
        self.budget = CommitBudget(commits_per_hour)  # checked before anything is created
        self.api = api
        self.repo_id = repo_id
        self.create_pr = create_pr
        # A pull request is staged on a branch (which resumes like any output), then opened at the end.
        self.branch = output_branch(branch, create_pr)
        branch = self.branch
        self._ready: list[CommitOperationAdd] = []  # uploaded, for the next commit
        self._waiting: dict[str, CommitOperationAdd] = {}  # uploaded, pending their source files' check
        self._unrecorded = 0  # shards uploaded since the last commit
        self._delete_after_commit: dict[str, Path] = {}  # regular (non-LFS) uploads, read at commit time
        self._journal = UploadJournal(journal) if journal is not None else None
        self._claimed = False  # whether the output holds a manifest: until then, a shard is committed at once
        self._taken_up: set[str] = set()  # shards committed from the journal, not uploaded by this run
        self._uploads = SpeedHistory()  # what this output's uploads have recently done, to see one trickle
        with hub.writing(repo_id):
            url = retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"creating {repo_id}")
            if branch is not None:
                retrying(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), f"creating branch {branch}")
        # Every commit names this as its parent, so a concurrent writer makes it fail instead of mixing.
        self._head = self._current_head()
        self.budget.note_earlier(self._commit_times(time.time()))
        self.location = str(url) if branch is None else f"{url} (branch {branch})"

    def _commit_times(self, now: float) -> list[float]:
        """When the output branch's commits of the last hour were made (they count against the budget)."""
        with hub.reading(self.repo_id):
            commits = retrying(lambda: self.api.list_repo_commits(self.repo_id, revision=self.branch), f"history of {self.repo_id}")
        return [t for t in (c.created_at.timestamp() for c in commits) if t > now - HOUR]

    def read_manifest(self, scratch: Path) -> Manifest | None:
        """The manifest of the head this run builds on, plus the shards an earlier run of the same job
        uploaded without committing them (they are committed with this run's next commit). Pending
        shards whose objects the Hub no longer holds are dropped (made again)."""
        try:
            text = self._read_manifest_text(self._head, scratch)  # the commit this run's first commit builds on
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        manifest = Manifest.from_json(text)
        self._claimed = True
        self._take_up_uploads(manifest)
        return manifest

    def _ident(self, manifest: Manifest) -> dict:
        return identity(f"{self.repo_id}@{self.branch or 'main'}", manifest)

    def _take_up_uploads(self, manifest: Manifest) -> None:
        """Add to `manifest` the journal's shards (as pending: the scheduler promotes those whose source
        files checked out), and keep only pending shards whose LFS objects the Hub still holds: those
        bytes were checked against their sha256 when they were uploaded, and the entry ties that sha256
        to this job's source files. Shards whose object is gone are converted again."""
        found: dict[str, ShardEntry] = {}
        if self._journal is not None:
            journal, progress = self._journal.entries(self._ident(manifest))
            found = {n: e for n, e in journal.items() if n not in manifest.shards and n not in manifest.pending}
            if found:  # the journal's progress is later than the manifest's
                manifest.verified.update(progress.get("verified", {}))
                manifest.checkpoints.update({f: p for f, p in progress.get("checkpoints", {}).items() if f not in manifest.verified})
        candidates = {**manifest.pending, **found}
        if not candidates:
            return
        stored = self._objects_on_hub([(e.output_sha256, e.output_size) for e in candidates.values()])
        missing = {n for n, e in candidates.items() if e.output_sha256 not in stored}
        for name in sorted(candidates.keys() - missing):
            manifest.pending[name] = candidates[name]
            self._waiting[name] = _uploaded(name, candidates[name])
        for name in missing:
            manifest.pending.pop(name, None)
        self._taken_up.update(found.keys() - missing)
        self._unrecorded += len(found.keys() - missing)
        if missing:
            logger.warning("%d shard(s) an earlier run uploaded are no longer on the Hub; converting them again", len(missing))
            if self._journal is not None:
                self._journal_call(self._journal.forget, self._ident(manifest), missing)
        if len(found) > len(missing & found.keys()):
            logger.info("%d shard(s) uploaded by an earlier run are taken up instead of converted again", len(found) - len(missing & found.keys()))

    def _objects_on_hub(self, objects: list[tuple[str, int]]) -> set[str]:
        """The sha256s among `objects` that the Hub stores for this repo: the LFS batch API answers an
        upload request for a stored object without an upload action (what preupload relies on too)."""
        infos = [UploadInfo(sha256=bytes.fromhex(sha), size=size, sample=b"") for sha, size in objects]

        def ask() -> set[str]:
            answer = post_lfs_batch_info(
                upload_infos=infos, token=self.api.token, repo_type="model", repo_id=self.repo_id,
                revision=quote(self.branch or "main", safe=""), endpoint=self.api.endpoint,
            )
            return {obj["oid"] for obj in answer[0] if not obj.get("actions")}

        with hub.writing(self.repo_id):
            return retrying(ask, f"checking uploads to {self.repo_id}")

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
        self._ready.clear()  # uploads taken up from the journal belong to the output being discarded
        self._waiting.clear()
        self._unrecorded = 0
        if self._journal is not None:
            self._journal_call(self._journal.clear)
        deletions = [CommitOperationDelete(path) for path in self.existing_files()]
        if deletions:
            self._commit(deletions, "streamq: start over")

    def add_shard(self, local: Path, name: str, manifest: Manifest, remaining: int = 0) -> bool:
        """Upload the shard's bytes now; commit it with the manifest now or with a later shard, as the
        commit budget allows (`remaining`: shards of this run still to come). The last one waits for the
        final files: one commit fewer at the end of a run, where nothing overlaps it.

        The local file is deleted as soon as its bytes are on the Hub, so batching commits costs no disk.
        """
        entry = manifest.shards.get(name) or manifest.pending[name]
        op = upload_shard(self.api, self.repo_id, self.branch, local, name, entry.output_sha256, self._uploads)
        if not getattr(op, "_is_uploaded", False):  # a regular upload is read at commit time
            self._delete_after_commit[name] = local
        return self._add(op, name, manifest, remaining)

    def add_uploaded(self, name: str, manifest: Manifest, remaining: int = 0) -> bool:
        """As `add_shard`, for a shard whose bytes another machine uploaded (a cluster job)."""
        entry = manifest.shards.get(name) or manifest.pending[name]
        return self._add(_uploaded(name, entry), name, manifest, remaining)

    def _add(self, op: CommitOperationAdd, name: str, manifest: Manifest, remaining: int) -> bool:
        if getattr(op, "_is_uploaded", False) and self._journal is not None:  # LFS: the commit only needs its sha256 from now on
            progress = {"verified": manifest.verified, "checkpoints": manifest.checkpoints}
            self._journal_call(self._journal.record, self._ident(manifest), name, manifest.shards.get(name) or manifest.pending[name], progress)
        self._ready = [o for o in self._ready if o.path_in_repo != name]  # a shard made again replaces its upload
        self._waiting.pop(name, None)
        if name in manifest.shards:
            self._ready.append(op)
        else:
            self._waiting[name] = op
        self._taken_up.discard(name)
        self._unrecorded += 1
        if not self.budget.commit_now(self._unrecorded, remaining, self._claimed):
            if remaining:
                logger.info("%s uploaded; committing it with a later shard, within %d commits per hour", name, self.budget.per_hour)
            return False
        self._commit_pending(manifest, f"streamq: add {name}" if self._unrecorded == 1 else f"streamq: add {self._unrecorded} shards")
        return True

    def promote(self, names: list[str], manifest: Manifest) -> None:
        """Their files join the next commit (a pending shard of an earlier run, by its stored object)."""
        for name in names:
            self._ready.append(self._waiting.pop(name, None) or _uploaded(name, manifest.shards[name]))

    def discard(self, names: list[str], manifest: Manifest) -> None:
        """Forget their uploads (the objects stay unreferenced, as the Hub keeps any upload) and commit
        the manifest without them at once, so that no later run takes them up."""
        for name in names:
            self._waiting.pop(name, None)
        if self._journal is not None:
            self._journal_call(self._journal.forget, self._ident(manifest), set(names))
        self._commit_pending(manifest, f"streamq: drop {len(names)} shard(s) made from a file that failed its sha256 check")

    def finalize(self, files: dict[str, Payload], manifest: Manifest) -> None:
        self._ready.extend(CommitOperationAdd(name, payload if isinstance(payload, bytes) else str(payload)) for name, payload in files.items())
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
        """Commit the shards ready to join the output with the manifest (which lists the pending ones)."""
        manifest_json = manifest.to_json().encode()
        ops = [*self._ready, CommitOperationAdd(MANIFEST_NAME, manifest_json)]
        self._commit(ops, message, manifest_json)
        self._claimed = True
        if self._journal is not None:
            recorded = {o.path_in_repo for o in self._ready} | set(manifest.pending)
            self._journal_call(self._journal.forget, self._ident(manifest), recorded)
        for op in self._ready:
            if (path := self._delete_after_commit.pop(op.path_in_repo, None)) is not None:
                path.unlink(missing_ok=True)
        self._ready.clear()
        self._unrecorded = 0

    def _journal_call(self, call: Callable[..., None], *args: object) -> None:
        """The journal saves work after a crash; failing to write it (a full disk) costs only that."""
        try:
            call(*args)
        except OSError as exc:
            logger.warning("cannot update the upload journal (%s); a resumed run may convert those shards again", exc)

    def _commit(self, ops: list, message: str, manifest_json: bytes | None = None) -> None:
        """Commit on top of the head this run last saw; retried, and a lost response is recognised.
        Waits while the commit budget is spent (only the final commits can find it so)."""

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

        self.budget.wait_for_one()
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
            taken_up = [o.path_in_repo for o in ops if isinstance(o, CommitOperationAdd) and o.path_in_repo in self._taken_up]
            if taken_up and isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code == 400:
                if self._journal is not None:  # the Hub no longer has what it said it had: never try those again
                    self._journal_call(self._journal.clear)
                raise OutputNotWritableError(
                    f"the Hub refused to commit {len(taken_up)} shard(s) an earlier run uploaded ({cause.server_message or exc}); "
                    "run again: they will be converted again"
                ) from cause
            raise
        finally:
            self.budget.record()  # a failed attempt may have landed: count it

    def _landed(self, manifest_json: bytes | None) -> str | None:
        """The new head if it is this very commit (its manifest is byte for byte ours), else None."""
        head = self._current_head()
        if head == self._head or manifest_json is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            return head if self._read_manifest_text(head, Path(scratch)).encode() == manifest_json else None


def upload_shard(api: HfApi, repo_id: str, branch: str | None, local: Path, name: str, sha256: str, history: SpeedHistory) -> CommitOperationAdd:
    """Upload an output shard's bytes as an LFS object (`preupload_lfs_files`), watched for a trickle; the
    local file is deleted once they are on the Hub. Returns the operation a commit takes it with."""
    op = CommitOperationAdd(name, str(local))
    op.upload_info.sha256 = bytes.fromhex(sha256)  # hashed once, when written
    with hub.writing(repo_id), WatchedReader(local, history, f"upload of {name}") as reader:
        op.path_or_fileobj = reader  # huggingface_hub sends the bytes it reads from here
        api.preupload_lfs_files(repo_id, [op], revision=branch)
    if getattr(op, "_is_uploaded", False):
        local.unlink()
    else:  # a regular upload is read at commit time
        op.path_or_fileobj = str(local)
    return op


def _uploaded(name: str, entry: ShardEntry) -> CommitOperationAdd:
    """A commit operation for an LFS object already on the Hub, without its bytes: the state that
    huggingface_hub's own `preupload_lfs_files` leaves an operation in (it has no public way to make
    one), so that `create_commit` sends only the pointer. The Hub refuses the commit if the object
    is missing."""
    op = CommitOperationAdd(name, b"")
    op.upload_info = UploadInfo(sha256=bytes.fromhex(entry.output_sha256), size=entry.output_size, sample=b"")
    op._upload_mode = "lfs"
    op._should_ignore = False
    op._is_uploaded = True
    return op
