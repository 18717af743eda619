"""`LocalHub`: the emulator as a context manager, serving on a free loopback port from a background thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from .api import HubApp
from .auth import Access
from .faults import FaultSet
from .protocol import HubServer, RequestLog
from .storage import Repo, RepoStore
from .urls import Urls

# Storage URLs use the other name of the loopback address, so the client sees a different origin (like a CDN).
_OTHER_LOOPBACK_NAME = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}


class LocalHub:
    """A Hugging Face Hub emulator over HTTP, storing repos under `root` (a restarted hub sees the same repos).

    `tokens` turns authorization on; see `auth.Access` for its format. Without it, any token and none may do
    everything. `multipart_chunk_size` makes LFS uploads larger than it use the multipart protocol.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Mapping[str, Mapping[str, object]] | None = None,
        storage_host: str | None = None,
        multipart_chunk_size: int | None = None,
    ) -> None:
        self.root = Path(root)
        self._store = RepoStore(self.root)
        self.faults = FaultSet()
        self.requests = RequestLog()
        self._host, self._port = host, port
        self._storage_host = storage_host
        self._access = Access(tokens)
        self._multipart_chunk_size = multipart_chunk_size
        self._server: HubServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""  # "http://127.0.0.1:PORT" once started: pass it as `endpoint=` to the client
        self.storage_endpoint = ""

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        server = HubServer((self._host, self._port), self.faults, self.requests)
        port = server.server_address[1]
        api_host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        storage_host = self._storage_host or _OTHER_LOOPBACK_NAME.get(api_host, api_host)
        self.endpoint = f"http://{api_host}:{port}"
        self.storage_endpoint = f"http://{storage_host}:{port}"
        urls = Urls(self.endpoint, self.storage_endpoint, os.urandom(32))
        server.app = HubApp(self._store, self._access, urls, self._multipart_chunk_size)  # URLs need the bound port
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        """Hide the repo from callers whose token cannot read it (enforced when `tokens` are configured)."""
        self._repo(repo_type, repo_id).update_meta(private=private)

    def set_gated(self, repo_id: str, gated: bool = True, *, repo_type: str = "model") -> None:
        """Keep the repo's files from tokens not granted its terms (enforced when `tokens` are configured)."""
        self._repo(repo_type, repo_id).update_meta(gated="manual" if gated else False)

    def objects(self, repo_id: str, *, repo_type: str = "model") -> set[str]:
        """The sha256 of every object the repo stores, committed or not (an upload is stored once it checked out)."""
        return self._repo(repo_type, repo_id).objects()

    def drop_object(self, repo_id: str, sha256: str, *, repo_type: str = "model") -> None:
        """Delete a stored object, as the Hub may garbage-collect an upload that no commit references."""
        self._repo(repo_type, repo_id).object_path(sha256).unlink()

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} under {self.root}")
        return repo

