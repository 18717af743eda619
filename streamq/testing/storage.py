"""Repos on disk: content-addressed objects, immutable JSON commits, and refs rewritten atomically under a lock.

Layout under the root, per repo `repos/{type}s/{namespace}/{name}/`:
`repo.json` (visibility), `refs.json` (branches, tags, PR refs), `commits/{id}.json` (a full tree snapshot each),
`objects/{sha256[:2]}/{sha256[2:]}` (file contents, regular and LFS alike) and `tmp/` (uploads in flight).
Everything a later hub on the same root needs is on disk; nothing lives only in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import HubError, revision_not_found

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"

_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_REF_NAME = re.compile(r"[A-Za-z0-9._/-]{1,200}")

# The .gitattributes the Hub puts in every new repo's initial commit: it decides which files preupload sends to LFS.
_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)


def now_iso() -> str:
    """Timestamps the way the Hub writes them (milliseconds, UTC, `Z`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a file's `oid` and regular files' `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def check_repo_id(repo_id: str) -> None:
    """Only `namespace/name` ids: they map to two directory levels and must never escape the root."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_SEGMENT.fullmatch(part) and ".." not in part for part in parts):
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")


def check_path(path: str) -> None:
    """Reject paths git cannot hold, or that would look like another file (`a//b`, `./a`)."""
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or parts[0] == ".git" or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")


@dataclass(frozen=True)
class Entry:
    """A file of a tree. Its content is the object `sha256`; `oid` is its git blob id (of the pointer, for LFS)."""

    sha256: str
    size: int
    lfs: bool
    oid: str

    @classmethod
    def regular(cls, data: bytes) -> Entry:
        return cls(hashlib.sha256(data).hexdigest(), len(data), False, git_blob_oid(data))

    @classmethod
    def large(cls, sha256: str, size: int) -> Entry:
        return cls(sha256, size, True, git_blob_oid(lfs_pointer(sha256, size)))

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, Entry] = field(hash=False, compare=False)

    def under(self, folder: str) -> dict[str, Entry]:
        """Files at or below `folder` ("" is the whole tree): what a folder is, since git has no empty folders."""
        if not folder:
            return self.tree
        prefix = folder.rstrip("/") + "/"
        return {path: entry for path, entry in self.tree.items() if path == folder or path.startswith(prefix)}


@dataclass(frozen=True)
class Put:
    path: str
    entry: Entry


@dataclass(frozen=True)
class Delete:
    path: str
    folder: bool = False


Operation = Put | Delete


@dataclass
class Refs:
    heads: dict[str, str]
    tags: dict[str, str]
    prs: dict[int, str]

    def to_json(self) -> dict[str, Any]:
        return {"heads": self.heads, "tags": self.tags, "prs": {str(n): cid for n, cid in self.prs.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Refs:
        return cls(dict(data["heads"]), dict(data["tags"]), {int(n): cid for n, cid in data["prs"].items()})


def _write_json(path: Path, data: Any) -> None:
    """Readers never see a half-written file: write aside, then rename over."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Repo:
    """One repo on disk. Reads need no lock (files are immutable or replaced atomically); ref updates take it."""

    def __init__(self, path: Path, repo_type: str, repo_id: str, lock: threading.RLock) -> None:
        self.path = path
        self.type = repo_type
        self.id = repo_id
        self.lock = lock

    # -- visibility -------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "repo.json").read_text())

    def update_meta(self, **changes: Any) -> None:
        with self.lock:
            _write_json(self.path / "repo.json", {**self.meta(), **changes})

    # -- refs and commits -------------------------------------------------------------------------------------
    def refs(self) -> Refs:
        return Refs.from_json(json.loads((self.path / "refs.json").read_text()))

    def commit(self, commit_id: str) -> Commit:
        data = json.loads((self.path / "commits" / f"{commit_id}.json").read_text())
        tree = {path: Entry(**entry) for path, entry in data.pop("tree").items()}
        return Commit(parents=tuple(data.pop("parents")), tree=tree, **data)

    def resolve(self, revision: str) -> Commit:
        """A branch, tag, `refs/heads|tags|pr/...` ref or full commit id, to its commit; RevisionNotFound else."""
        refs = self.refs()
        if match := _PR_REF.fullmatch(revision):
            commit_id = refs.prs.get(int(match[1]))
        elif revision.startswith(("refs/heads/", "refs/tags/")):
            kind, _, name = revision[5:].partition("/")
            commit_id = (refs.heads if kind == "heads" else refs.tags).get(name)
        else:
            commit_id = refs.heads.get(revision) or refs.tags.get(revision)
            is_commit = _COMMIT_ID.fullmatch(revision) and (self.path / "commits" / f"{revision}.json").exists()
            if commit_id is None and is_commit:
                commit_id = revision
        if commit_id is None:
            raise revision_not_found(revision)
        return self.commit(commit_id)

    def history(self, commit: Commit) -> Iterator[Commit]:
        """Newest first, along first parents, like `git log --first-parent`."""
        while True:
            yield commit
            if not commit.parents:
                return
            commit = self.commit(commit.parents[0])

    def last_change(self, commit: Commit, path: str) -> Commit:
        """The newest commit that changed anything at or below `path`: the Hub's `lastCommit` of an entry."""
        current = commit
        for parent in self.history(commit):
            if parent.under(path) != current.under(path):
                return current
            current = parent
        return current

    # -- objects ----------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):  # oids come from requests: never let one name a path
            raise HubError(400, f"Invalid object id {sha256!r}: expected a sha256 in hex")
        return self.path / "objects" / sha256[:2] / sha256[2:]

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        target = self.object_path(sha256)
        return target.is_file() and (size is None or target.stat().st_size == size)

    def objects(self) -> set[str]:
        return {f"{path.parent.name}{path.name}" for path in (self.path / "objects").glob("*/*")}

    def tmp_file(self) -> Path:
        """A fresh path on the objects' file system, so a finished upload is adopted by a rename."""
        return self.path / "tmp" / uuid.uuid4().hex

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move a verified upload into the store; content addressing makes a concurrent twin harmless."""
        target = self.object_path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def add_bytes(self, data: bytes) -> Entry:
        entry = Entry.regular(data)
        if not self.has_object(entry.sha256):
            tmp = self.tmp_file()
            tmp.write_bytes(data)
            self.adopt(tmp, entry.sha256)
        return entry

    # -- writes -----------------------------------------------------------------------------------------------
    def commit_changes(
        self,
        revision: str,
        operations: Sequence[Operation],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, int | None]:
        """Apply `operations` on a branch or PR ref, or open a new PR from it; returns the commit and PR number."""
        with self.lock:
            refs = self.refs()
            if create_pr:
                base = self.resolve(parent_commit or revision)
                pr_number: int | None = max(refs.prs, default=0) + 1
            else:
                pr_number = None
                heads, name = self._writable_ref(refs, revision)
                base = self.commit(heads[name])
                if parent_commit is not None and parent_commit != base.id:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = self._write_commit((base.id,), _apply(base.tree, operations), title, message, author)
            if pr_number is not None:
                refs.prs[pr_number] = commit.id
            else:
                heads[name] = commit.id
            _write_json(self.path / "refs.json", refs.to_json())
            return commit, pr_number

    def create_branch(self, name: str, start: str | None) -> None:
        with self.lock:
            refs = self.refs()
            _check_ref_name(name)
            if name in refs.heads:
                raise HubError(409, f"Reference already exists: refs/heads/{name}")
            refs.heads[name] = self.resolve(start or DEFAULT_BRANCH).id
            _write_json(self.path / "refs.json", refs.to_json())

    def delete_branch(self, name: str) -> None:
        with self.lock:
            refs = self.refs()
            if name == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            if refs.heads.pop(name, None) is None:
                raise revision_not_found(name)
            _write_json(self.path / "refs.json", refs.to_json())

    def create_tag(self, tag: str, revision: str) -> None:
        with self.lock:
            refs = self.refs()
            _check_ref_name(tag)
            if tag in refs.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            refs.tags[tag] = self.resolve(revision).id
            _write_json(self.path / "refs.json", refs.to_json())

    def delete_tag(self, tag: str) -> None:
        with self.lock:
            refs = self.refs()
            if refs.tags.pop(tag, None) is None:
                raise revision_not_found(tag)
            _write_json(self.path / "refs.json", refs.to_json())

    def _writable_ref(self, refs: Refs, revision: str) -> tuple[dict[Any, str], Any]:
        """Commits go to a branch or a PR ref; a tag or commit id has no head to move."""
        if match := _PR_REF.fullmatch(revision):
            if int(match[1]) in refs.prs:
                return refs.prs, int(match[1])
        else:
            name = revision.removeprefix("refs/heads/")
            if name in refs.heads:
                return refs.heads, name
            if name in refs.tags or _COMMIT_ID.fullmatch(name):
                raise HubError(400, f"Cannot commit to {revision!r}: it is not a branch")
        raise revision_not_found(revision)

    def _write_commit(
        self, parents: tuple[str, ...], tree: dict[str, Entry], title: str, message: str, author: str
    ) -> Commit:
        date = now_iso()
        body = {"parents": list(parents), "title": title, "message": message, "author": author, "date": date}
        files = {path: vars(entry) for path, entry in sorted(tree.items())}
        # The nonce keeps ids unique when the same change is committed twice within a millisecond.
        digest = json.dumps({**body, "tree": files, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()
        commit_id = hashlib.sha1(digest).hexdigest()
        _write_json(self.path / "commits" / f"{commit_id}.json", {**body, "id": commit_id, "tree": files})
        return Commit(commit_id, parents, title, message, author, date, tree)


def _check_ref_name(name: str) -> None:
    if not _REF_NAME.fullmatch(name) or ".." in name or name.startswith(("refs/", "/")) or name.endswith("/"):
        raise HubError(400, f"Invalid reference name: {name!r}")


def _apply(tree: dict[str, Entry], operations: Sequence[Operation]) -> dict[str, Entry]:
    """The tree after `operations`, in order; git's rules: a path is a file or a folder, never both."""
    result = dict(tree)
    for op in operations:
        check_path(op.path.rstrip("/") if isinstance(op, Delete) else op.path)
        if isinstance(op, Put):
            parents = ["/".join(op.path.split("/")[:i]) for i in range(1, op.path.count("/") + 1)]
            if any(parent in result for parent in parents) or any(p.startswith(op.path + "/") for p in result):
                raise HubError(400, f"Cannot add {op.path!r}: a file and a folder would share a path")
            result[op.path] = op.entry
        elif op.folder:
            prefix = op.path.rstrip("/") + "/"
            doomed = [path for path in result if path.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {op.path}", "EntryNotFound")
            for path in doomed:
                del result[path]
        elif result.pop(op.path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {op.path}", "EntryNotFound")
    return result


class RepoStore:
    """All repos under one root; creating and deleting repos is serialized, each repo has its own ref lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._repo_locks: dict[str, threading.RLock] = {}
        (root / "repos").mkdir(parents=True, exist_ok=True)

    def _path(self, repo_type: str, repo_id: str) -> Path:
        check_repo_id(repo_id)
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        return self.root / "repos" / f"{repo_type}s" / repo_id

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        path = self._path(repo_type, repo_id)
        if not (path / "repo.json").is_file():
            return None
        with self._lock:
            lock = self._repo_locks.setdefault(f"{repo_type}/{repo_id}", threading.RLock())
        return Repo(path, repo_type, repo_id, lock)

    def create(self, repo_type: str, repo_id: str, *, private: bool) -> Repo | None:
        """The new repo with its initial commit (the default .gitattributes), or None if it already exists."""
        path = self._path(repo_type, repo_id)
        with self._lock:
            if path.exists():
                return None
            staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            for sub in ("commits", "objects", "tmp"):
                (staging / sub).mkdir(parents=True)
            _write_json(staging / "repo.json", {"createdAt": now_iso(), "private": private, "gated": False})
            repo = Repo(staging, repo_type, repo_id, threading.RLock())
            tree = {".gitattributes": repo.add_bytes(DEFAULT_GITATTRIBUTES.encode())}
            initial = repo._write_commit((), tree, "initial commit", "", "system")
            _write_json(staging / "refs.json", Refs({DEFAULT_BRANCH: initial.id}, {}, {}).to_json())
            os.rename(staging, path)  # the repo appears whole or not at all
        return self.get(repo_type, repo_id)

    def delete(self, repo_type: str, repo_id: str) -> bool:
        path = self._path(repo_type, repo_id)
        with self._lock:
            if not path.exists():
                return False
            doomed = path.with_name(f".deleted.{path.name}.{uuid.uuid4().hex}")
            os.rename(path, doomed)
            self._repo_locks.pop(f"{repo_type}/{repo_id}", None)
        shutil.rmtree(doomed, ignore_errors=True)
        return True
