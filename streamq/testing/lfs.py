"""Large files: the git-LFS batch and verify endpoints, and the signed storage URLs their bytes go through.

Uploads are checked against the sha256 and size they were announced with before they enter the store, so a
commit can only ever reference complete objects.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import HubError
from .protocol import Request, Response
from .storage import Repo, RepoStore
from .urls import Urls

Authorize = Callable[[Request, str | None, str, bool], Repo]
Route = tuple[str, str, Callable[..., Response]]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_TYPE = "application/vnd.git-lfs+json"
_GIT_REPO = r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo_id>[^/]+/[^/]+?)\.git/info/lfs/objects"
_STORAGE = (
    r"/storage/(?P<sig>[0-9a-f]{32})/(?P<kind>model|dataset|space)/(?P<repo_id>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})"
)


class LfsEndpoints:
    """`authorize(request, kind, repo_id, pull_request)` returns the repo if the caller may upload to it."""

    def __init__(self, store: RepoStore, urls: Urls, authorize: Authorize, multipart_chunk_size: int | None) -> None:
        self.store = store
        self.urls = urls
        self.authorize = authorize
        self.multipart_chunk_size = multipart_chunk_size

    def routes(self) -> list[Route]:
        return [
            ("POST", _GIT_REPO + r"/batch", self.batch),
            ("POST", _GIT_REPO + r"/verify", self.verify),
            ("GET", _STORAGE, self.download),
            ("PUT", _STORAGE + r"/(?P<size>\d+)", self.upload),
            ("PUT", _STORAGE + r"/(?P<size>\d+)/(?P<part>\d+)", self.upload_part),
            ("POST", _STORAGE + r"/(?P<size>\d+)/complete", self.complete_upload),
        ]

    def download_url(self, repo: Repo, sha256: str) -> str:
        return self.urls.storage_url("GET", repo, sha256)

    def batch(self, request: Request, kind: str | None, repo_id: str) -> Response:
        """git-lfs batch API. No `ref` means the upload is for a pull request, which needs only read access."""
        payload = request.json()
        repo = self.authorize(request, kind, repo_id, not payload.get("ref"))
        if payload.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' operation is supported")
        chunk_size = self.multipart_chunk_size if "multipart" in payload.get("transfers", ["basic"]) else None
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and _SHA256.fullmatch(oid) and isinstance(size, int) and size >= 0):
                objects.append({"oid": str(oid), "size": 0, "error": {"code": 422, "message": "Invalid oid or size"}})
            elif repo.has_object(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: already stored, the client skips it
            else:
                verify = {"href": f"{self.urls.repo(repo)}.git/info/lfs/objects/verify"}
                actions = {"upload": self._upload_action(repo, oid, size, chunk_size), "verify": verify}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        body = {"transfer": "multipart" if chunk_size else "basic", "objects": objects, "hash_algo": "sha256"}
        return Response.json(body, content_type=_CONTENT_TYPE)

    def _upload_action(self, repo: Repo, oid: str, size: int, chunk_size: int | None) -> dict[str, Any]:
        """Basic: one PUT. Multipart (if enabled, for large objects): a PUT per `chunk_size` part, then a POST.

        The client takes multipart from the `chunk_size` header alone; without it, it always uploads in one PUT.
        """
        if chunk_size is None or size <= chunk_size:
            return {"href": self.urls.storage_url("PUT", repo, oid, str(size))}
        header = {"chunk_size": str(chunk_size)}
        for n in range(1, -(-size // chunk_size) + 1):
            header[str(n)] = self.urls.storage_url("PUT", repo, oid, str(size), str(n))
        return {"href": self.urls.storage_url("POST", repo, oid, str(size), "complete"), "header": header}

    def verify(self, request: Request, kind: str | None, repo_id: str) -> Response:
        repo = self.authorize(request, kind, repo_id, True)
        payload = request.json()
        if not repo.has_object(str(payload.get("oid")), payload.get("size")):
            raise HubError(404, "Object not found or size mismatch")
        return Response.json({"success": True}, content_type=_CONTENT_TYPE)

    def download(self, request: Request, sig: str, kind: str, repo_id: str, oid: str) -> Response:
        repo = self._signed(sig, "GET", kind, repo_id, oid)
        if not repo.has_object(oid):
            raise HubError(404, "The specified key does not exist.")
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'}
        return Response(200, headers, file=repo.object_path(oid))

    def upload(self, request: Request, sig: str, kind: str, repo_id: str, oid: str, size: str) -> Response:
        repo = self._signed(sig, "PUT", kind, repo_id, oid, size)
        tmp = repo.tmp_file()
        try:
            digest, md5, length = _receive(request, tmp)
            if (digest, length) != (oid, int(size)):
                raise HubError(400, f"Uploaded content does not match: sha256 {digest}, {length} bytes")
            repo.adopt(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        return Response(200, {"ETag": f'"{md5}"'})

    def upload_part(
        self, request: Request, sig: str, kind: str, repo_id: str, oid: str, size: str, part: str
    ) -> Response:
        repo = self._signed(sig, "PUT", kind, repo_id, oid, size, part)
        tmp = repo.tmp_file()
        try:
            _, md5, _ = _receive(request, tmp)
            tmp.replace(_part_path(repo, oid, part))
        finally:
            tmp.unlink(missing_ok=True)
        return Response(200, {"ETag": f'"{md5}"'})  # the client sends these back in the completion request

    def complete_upload(self, request: Request, sig: str, kind: str, repo_id: str, oid: str, size: str) -> Response:
        repo = self._signed(sig, "POST", kind, repo_id, oid, size, "complete")
        parts = request.json().get("parts") or []
        numbers = [str(part.get("partNumber")) for part in parts]
        if numbers != [str(n) for n in range(1, len(parts) + 1)]:
            raise HubError(400, "Parts must be numbered 1..N in order")
        tmp = repo.tmp_file()
        sha, length = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as out:
                for number, part in zip(numbers, parts):
                    stored = _part_path(repo, oid, number)
                    data = stored.read_bytes() if stored.exists() else b""
                    if not data or hashlib.md5(data).hexdigest() != str(part.get("etag")).strip('"'):
                        raise HubError(400, f"Part {number} is missing or its etag does not match")
                    out.write(data)
                    sha.update(data)
                    length += len(data)
            if (sha.hexdigest(), length) != (oid, int(size)):
                raise HubError(400, "Assembled parts do not match the object's sha256 and size")
            repo.adopt(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        for number in numbers:
            _part_path(repo, oid, number).unlink(missing_ok=True)
        return Response.json({"success": True})

    def _signed(self, sig: str, verb: str, kind: str, repo_id: str, oid: str, *rest: str) -> Repo:
        """Storage requests prove themselves by their URL alone: no token, no repo visibility check."""
        repo = self.store.get(kind, repo_id)
        if repo is None or not hmac.compare_digest(sig, self.urls.sign(verb, kind, repo_id, oid, *rest)):
            raise HubError(403, "Signature does not match")
        return repo


def _receive(request: Request, target: Path) -> tuple[str, str, int]:
    """Stream the request body to `target`; returns its sha256, md5 (the part etag, as on S3) and length."""
    sha, md5, length = hashlib.sha256(), hashlib.md5(), 0
    with target.open("wb") as out:
        for chunk in iter(request.body.read, b""):
            out.write(chunk)
            sha.update(chunk)
            md5.update(chunk)
            length += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), length


def _part_path(repo: Repo, oid: str, part: str) -> Path:
    return repo.path / "tmp" / f"{oid}.part{int(part)}"
