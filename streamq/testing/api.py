"""The Hub API `huggingface_hub` calls, with the JSON fields, headers and status codes it reads.

Repos, listings, commits, refs and `/resolve/` live here; the bytes of LFS files go through `lfs.py`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mimetypes
import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote

from .auth import INVALID_CREDENTIALS, Access, Caller, check_contribute, check_download, check_read, check_write
from .errors import HubError, entry_not_found, repo_not_found
from .lfs import LfsEndpoints
from .protocol import Request, Response
from .storage import DEFAULT_BRANCH, Commit, Delete, Entry, Operation, Put, Repo, RepoStore, check_repo_id
from .urls import Urls

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # larger files must go through LFS whatever their name
_API_REPO = r"/api/(?P<kind>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)"
_GIT_REPO = r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo_id>[^/]+/[^/]+?)"


def _repo_type(kind: str | None) -> str:
    """URL spelling (`models`, `datasets/` prefix, or none) to repo type."""
    return (kind or "model").removesuffix("s")


class HubApp:
    """Routes requests to endpoint methods; each returns a Response or raises HubError."""

    def __init__(self, store: RepoStore, access: Access, urls: Urls, multipart_chunk_size: int | None = None) -> None:
        self.store = store
        self.access = access
        self.urls = urls
        self.lfs = LfsEndpoints(store, urls, self._authorize_upload, multipart_chunk_size)
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            (method, re.compile(pattern), endpoint)
            for method, pattern, endpoint in [
                ("POST", r"/api/repos/create", self.create_repo),
                ("DELETE", r"/api/repos/delete", self.delete_repo),
                ("GET", r"/api/whoami-v2", self.whoami),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("GET", _API_REPO + r"(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
                ("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree),
                ("POST", _API_REPO + r"/paths-info/(?P<rev>[^/]+)", self.paths_info),
                ("POST", _API_REPO + r"/preupload/(?P<rev>[^/]+)", self.preupload),
                ("POST", _API_REPO + r"/commit/(?P<rev>[^/]+)", self.commit),
                ("GET", _API_REPO + r"/commits/(?P<rev>[^/]+)", self.commits),
                ("GET", _API_REPO + r"/refs", self.refs),
                ("POST", _API_REPO + r"/branch/(?P<name>[^/]+)", self.create_branch),
                ("DELETE", _API_REPO + r"/branch/(?P<name>[^/]+)", self.delete_branch),
                ("POST", _API_REPO + r"/tag/(?P<name>[^/]+)", self.create_tag),
                ("DELETE", _API_REPO + r"/tag/(?P<name>[^/]+)", self.delete_tag),
                ("GET", _GIT_REPO + r"/resolve/(?P<rev>refs/pr/\d+|[^/]+)/(?P<path>.+)", self.resolve),
                *self.lfs.routes(),
            ]
        ]

    def handle(self, request: Request) -> Response:
        for method, pattern, endpoint in self._routes:
            if method == request.method and (match := pattern.fullmatch(request.path)):
                return endpoint(request, **match.groupdict())
        raise HubError(404, f"The Hub emulator has no endpoint {request.method} {request.path}")

    # -- access -----------------------------------------------------------------------------------------------
    def _open(self, request: Request, kind: str | None, repo_id: str) -> tuple[Repo, Caller]:
        """The repo and the caller, or RepoNotFound: also for private repos the caller cannot see."""
        caller = self.access.identify(request.token)
        repo = self.store.get(_repo_type(kind), repo_id)
        if repo is None:
            raise repo_not_found(repo_id, status=401 if caller.user is None and self.access.enabled else 404)
        check_read(caller, repo.id, repo.meta()["private"])
        return repo, caller

    def _open_for_write(
        self, request: Request, kind: str | None, repo_id: str, pull_request: bool = False
    ) -> tuple[Repo, Caller]:
        """As `_open`, and the caller may write (or, for `pull_request`, open and update pull requests)."""
        repo, caller = self._open(request, kind, repo_id)
        (check_contribute if pull_request else check_write)(caller, repo.id, repo.meta()["private"])
        return repo, caller

    def _authorize_upload(self, request: Request, kind: str | None, repo_id: str, pull_request: bool) -> Repo:
        return self._open_for_write(request, kind, repo_id, pull_request)[0]

    # -- repos ------------------------------------------------------------------------------------------------
    def create_repo(self, request: Request) -> Response:
        caller = self.access.identify(request.token)
        payload = request.json()
        if not isinstance(payload.get("name"), str):
            raise HubError(400, "Missing repo 'name'")
        repo_id = f"{payload.get('organization') or caller.name}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        private = bool(payload["private"]) if "private" in payload else payload.get("visibility") == "private"
        check_repo_id(repo_id)
        check_write(caller, repo_id)
        repo = self.store.create(repo_type, repo_id, private=private)
        if repo is None:
            # `create_repo(exist_ok=True)` needs the 409 and reads `url` from this body.
            existing = self.store.get(repo_type, repo_id)
            assert existing is not None
            conflict = HubError(409, f"You already created this {repo_type} repo")
            return Response.error(conflict, url=self.urls.repo(existing))
        return Response.json({"url": self.urls.repo(repo), "name": repo_id, "id": repo_id})

    def delete_repo(self, request: Request) -> Response:
        payload = request.json()
        namespace = payload.get("organization") or self.access.identify(request.token).name
        repo_id = f"{namespace}/{payload.get('name')}"
        repo, _ = self._open_for_write(request, payload.get("type") or "model", repo_id)
        self.store.delete(repo.type, repo.id)
        return Response.json({})

    def whoami(self, request: Request) -> Response:
        caller = self.access.identify(request.token)
        if caller.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        role = "write" if caller.unrestricted or caller.write else "read"
        token_info = {"type": "access_token", "accessToken": {"displayName": "streamq-testing", "role": role}}
        user = {"type": "user", "name": caller.name, "fullname": caller.name, "orgs": [], "auth": token_info}
        return Response.json(user)

    def validate_yaml(self, request: Request) -> Response:
        """`create_commit` posts README.md here first; any card is accepted."""
        request.json()
        return Response.json({"errors": [], "warnings": []})

    def repo_info(self, request: Request, kind: str, repo_id: str, rev: str | None = None) -> Response:
        repo, _ = self._open(request, kind, repo_id)
        commit = repo.resolve(unquote(rev) if rev else DEFAULT_BRANCH)
        meta = repo.meta()
        blobs = request.flag("blobs")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.type}/{repo.id}".encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": meta["gated"],
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            # Only names unless `blobs` (files_metadata=True): code reading sizes must ask for them, as on the Hub.
            "siblings": [_sibling(path, entry, blobs) for path, entry in sorted(commit.tree.items())],
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        if expand := request.query.get("expand", []) + request.query.get("expand[]", []):
            info = {key: value for key, value in info.items() if key in {"_id", "id", *expand}}
        return Response.json(info)

    # -- listing ----------------------------------------------------------------------------------------------
    def tree(self, request: Request, kind: str, repo_id: str, rev: str, path: str | None = None) -> Response:
        repo, _ = self._open(request, kind, repo_id)
        commit = repo.resolve(unquote(rev))
        folder = unquote(path or "").strip("/")
        prefix = f"{folder}/" if folder else ""
        below = [p[len(prefix) :] for p in commit.tree if p.startswith(prefix)]
        if folder and not below:
            raise entry_not_found(folder, commit.id)
        children: set[str] = set()
        for relative in below:
            parts = relative.split("/")
            depth = len(parts) if request.flag("recursive") else 1
            children.update(prefix + "/".join(parts[: i + 1]) for i in range(min(depth, len(parts))))
        expand = request.flag("expand")
        return Response.json([self._path_info(repo, commit, child, expand) for child in sorted(children)])

    def paths_info(self, request: Request, kind: str, repo_id: str, rev: str) -> Response:
        repo, _ = self._open(request, kind, repo_id)
        commit = repo.resolve(unquote(rev))
        form = parse_qs(request.body.read_all().decode(), keep_blank_values=True)
        expand = (form.get("expand") or [""])[0].lower() == "true"
        paths = [path.strip("/") for path in form.get("paths", [])]
        found = [path for path in dict.fromkeys(paths) if path and commit.under(path)]
        return Response.json([self._path_info(repo, commit, path, expand) for path in found])

    def _path_info(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        entry = commit.tree.get(path)
        if entry is not None:
            info: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            if entry.lfs:
                info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        else:
            listing = "".join(f"{p}\0{e.oid}\n" for p, e in sorted(commit.under(path).items()))
            info = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = repo.last_change(commit, path)
            info["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return info

    def commits(self, request: Request, kind: str, repo_id: str, rev: str) -> Response:
        repo, _ = self._open(request, kind, repo_id)
        history = repo.history(repo.resolve(unquote(rev)))
        return Response.json(
            [
                {"id": c.id, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
                for c in history
            ]
        )

    def refs(self, request: Request, kind: str, repo_id: str) -> Response:
        repo, _ = self._open(request, kind, repo_id)
        refs = repo.refs()

        def listed(names: dict[Any, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": str(n), "ref": f"{prefix}{n}", "targetCommit": cid} for n, cid in sorted(names.items())]

        data = {"branches": listed(refs.heads, "refs/heads/"), "converts": [], "tags": listed(refs.tags, "refs/tags/")}
        if request.flag("include_prs"):
            data["pullRequests"] = listed(refs.prs, "refs/pr/")
        return Response.json(data)

    # -- branches and tags ------------------------------------------------------------------------------------
    def create_branch(self, request: Request, kind: str, repo_id: str, name: str) -> Response:
        repo, _ = self._open_for_write(request, kind, repo_id)
        repo.create_branch(unquote(name), request.json().get("startingPoint"))
        return Response.json({})

    def delete_branch(self, request: Request, kind: str, repo_id: str, name: str) -> Response:
        repo, _ = self._open_for_write(request, kind, repo_id)
        repo.delete_branch(unquote(name))
        return Response.json({})

    def create_tag(self, request: Request, kind: str, repo_id: str, name: str) -> Response:
        repo, _ = self._open_for_write(request, kind, repo_id)
        tag = request.json().get("tag")
        if not isinstance(tag, str):
            raise HubError(400, "Missing 'tag'")
        repo.create_tag(tag, unquote(name))
        return Response.json({})

    def delete_tag(self, request: Request, kind: str, repo_id: str, name: str) -> Response:
        repo, _ = self._open_for_write(request, kind, repo_id)
        repo.delete_tag(unquote(name))
        return Response.json({})

    # -- downloads --------------------------------------------------------------------------------------------
    def resolve(self, request: Request, kind: str | None, repo_id: str, rev: str, path: str) -> Response:
        """Regular files are served here; LFS files redirect (302) to a signed storage URL on the other origin."""
        repo, caller = self._open(request, kind, repo_id)
        meta = repo.meta()
        check_download(caller, repo.id, meta["private"], bool(meta["gated"]))
        commit = repo.resolve(unquote(rev))
        path = unquote(path)
        entry = commit.tree.get(path)
        if entry is None:
            raise entry_not_found(path, commit.id)
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers["Location"] = self.lfs.download_url(repo, entry.sha256)
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
            return Response(302, headers)
        headers["Content-Type"] = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return Response(200, headers, file=repo.object_path(entry.sha256))

    # -- uploads ----------------------------------------------------------------------------------------------
    def preupload(self, request: Request, kind: str, repo_id: str, rev: str) -> Response:
        repo, _ = self._open_for_write(request, kind, repo_id, pull_request=request.flag("create_pr"))
        commit = repo.resolve(unquote(rev))
        files = request.json().get("files")
        if not isinstance(files, list):
            raise HubError(400, "Missing 'files'")
        attributes = commit.tree.get(".gitattributes")
        patterns = _lfs_patterns(repo.object_path(attributes.sha256).read_text()) if attributes else []
        answers = []
        for item in files:
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "Each file needs 'path' and 'size'")
            lfs = size > LFS_SIZE_THRESHOLD or _tracked(path, patterns)
            # .gitignore is not evaluated (nothing is ignored). `oid` is that of the file already at `path`: the
            # client compares it with its own hash (sha256 for LFS, git blob id otherwise) to skip unchanged files.
            existing = commit.tree.get(path)
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.oid
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return Response.json({"files": answers, "commitOid": commit.id})

    def commit(self, request: Request, kind: str, repo_id: str, rev: str) -> Response:
        revision = unquote(rev)
        create_pr = request.flag("create_pr")
        pull_request = create_pr or revision.startswith("refs/pr/")
        repo, caller = self._open_for_write(request, kind, repo_id, pull_request=pull_request)
        header, operations = self._parse_commit(repo, request.body.read_all())
        commit, pr_number = repo.commit_changes(
            revision,
            operations,
            title=str(header.get("summary") or ""),
            message=str(header.get("description") or ""),
            author=caller.name,
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
        )
        repo_url = self.urls.repo(repo)
        return Response.json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{repo_url}/commit/{commit.id}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": f"{repo_url}/discussions/{pr_number}" if pr_number else None,
            }
        )

    def _parse_commit(self, repo: Repo, body: bytes) -> tuple[dict[str, Any], list[Operation]]:
        """NDJSON: a header line, then one line per added, LFS-referenced or deleted file or folder."""
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        operations: list[Operation] = []
        missing = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str):
                raise HubError(400, f"Commit operation {key!r} without a path")
            if key == "file":
                operations.append(Put(path, repo.add_bytes(_file_content(value))))
            elif key == "lfsFile":
                oid, size = str(value.get("oid")), value.get("size")
                if not repo.has_object(oid, size):
                    missing.append(path)
                else:
                    if size is None:  # copies (CommitOperationCopy) reference an object without its size
                        size = repo.object_path(oid).stat().st_size
                    operations.append(Put(path, Entry.large(oid, size)))
            elif key in ("deletedFile", "deletedFolder"):
                operations.append(Delete(path, folder=key == "deletedFolder"))
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        if missing:
            raise HubError(
                400,
                "Your push was rejected because an LFS pointer pointed to a file that does not exist. "
                f"Offending files: {', '.join(missing)}",
            )
        return lines[0].get("value") or {}, operations


def _sibling(path: str, entry: Entry, blobs: bool) -> dict[str, Any]:
    sibling: dict[str, Any] = {"rfilename": path}
    if blobs:
        sibling.update(size=entry.size, blobId=entry.oid)
        if entry.lfs:
            sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return sibling


def _lfs_patterns(gitattributes: str) -> list[str]:
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line.split()[1:]]


def _tracked(path: str, patterns: list[str]) -> bool:
    """gitattributes matching, simplified: patterns with a slash match the path, others the file name."""
    name = PurePosixPath(path).name
    return any(fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)


def _file_content(value: dict[str, Any]) -> bytes:
    content = value.get("content")
    if not isinstance(content, str):
        raise HubError(400, f"File {value.get('path')!r} has no content")
    if value.get("encoding") != "base64":
        return content.encode()
    try:
        return base64.b64decode(content, validate=True)
    except binascii.Error:
        raise HubError(400, f"File {value.get('path')!r}: content is not valid base64") from None

