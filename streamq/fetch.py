"""Sources: where the input model is read from, one whole shard at a time.

A source lists its files, reads small files and safetensors headers without downloading weights, and
fetches one shard into the work directory. The pipeline only talks to the `Source` protocol, so a
source that reads tensors by HTTP range can replace whole-file downloads without touching the rest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff
from huggingface_hub.utils._runtime import is_xet_available
from huggingface_hub.errors import EntryNotFoundError, NotASafetensorsRepoError, SafetensorsParsingError
from safetensors import SafetensorError, safe_open

from . import hub
from .arrival import Arrival, Cancelled
from .errors import CorruptShardError, SourceNotFoundError
from .location import HubRepo, LocalDir
from .retry import retrying
from .stall import SpeedHistory, StallWatch
from .targets import TensorInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    size: int
    sha256: str | None  # known up front for Hub LFS files


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    temporary: bool  # True when streamq downloaded it and must delete it


class Source(Protocol):
    name: str  # what the user passed, for messages and the manifest
    revision: str | None  # the resolved commit, None for a local directory

    def files(self) -> dict[str, SourceFile]: ...

    def read_text(self, path: str) -> str: ...

    def copy_to(self, path: str, dest: Path) -> Path: ...

    def headers(self, filenames: list[str]) -> dict[str, dict[str, TensorInfo]]: ...

    def fetch(self, path: str, work_dir: Path, arrival: Arrival | None = None) -> Fetched: ...


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_header(path: Path, name: str) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a local safetensors file (safetensors validates the layout)."""
    try:
        with safe_open(path, "pt") as f:
            return {k: TensorInfo(f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CorruptShardError(f"{name}: not a valid safetensors file ({exc}); re-upload or re-save it") from exc


class _PartialFile:
    """The partial download: bytes are appended (after what an earlier attempt left in it), hashed,
    and reported to `arrival` (if any) so that the shard can be quantized while it downloads.

    Socket reads are gathered into 4 MiB batches before they are written, hashed and reported: once per
    64 KiB socket read, that bookkeeping cost a 2-core VM as much CPU as the transfer itself. The
    hashing runs in a thread of its own (hashlib releases the GIL), fed through a short queue, so the
    download loop only reads the socket and writes the file. Use it as a context manager: leaving
    writes what arrived (a broken stream resumes from there) and stops the hashing thread.
    """

    BLOCK = 4 << 20

    def __init__(self, f: BinaryIO, arrival: Arrival | None) -> None:
        self._f = f
        self._arrival = arrival
        self._sha = hashlib.sha256()
        self._valid = True
        self._pending: list[bytes] = []
        self._pending_size = 0
        f.seek(0)
        while block := f.read(1 << 24):
            self._sha.update(block)
        self._blocks: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=4)
        self._hasher = threading.Thread(target=self._hash, name="streamq-sha256", daemon=True)
        self._hasher.start()
        if arrival is not None:
            arrival.begin(f.fileno(), f.tell())

    def _hash(self) -> None:
        while (pieces := self._blocks.get()) is not None:
            for piece in pieces:
                self._sha.update(piece)

    def __enter__(self) -> _PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._write_pending()
        finally:
            self._stop()

    def _stop(self) -> None:
        if self._hasher.is_alive():
            self._blocks.put(None)
            self._hasher.join()

    @property
    def size(self) -> int:
        return self._f.tell() + self._pending_size

    def append(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.BLOCK:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        pieces, self._pending = self._pending, []
        self._pending_size = 0
        self._blocks.put(pieces)
        for piece in pieces:  # written as they came: joining them first was one more copy of every byte
            self._f.write(piece)
        if self._arrival is not None:
            self._f.flush()
            self._arrival.advance(self._f.tell())

    def restart(self) -> None:
        """Drop everything: the bytes that follow are the file from its start. The arrival starts a new
        generation, and the digest is dropped (`hexdigest()` is None) so the caller hashes the file."""
        self._pending.clear()
        self._pending_size = 0
        self._valid = False
        if self._arrival is not None:
            self._arrival.reset()
        self._f.seek(0)
        self._f.truncate()

    def hexdigest(self) -> str | None:
        self._write_pending()
        self._stop()
        return self._sha.hexdigest() if self._valid else None


_SOCKET_READ = 1 << 20


def _read_sockets_in_larger_pieces() -> None:
    """Let httpcore read up to 1 MiB per socket read instead of 64 KiB.

    Each read passes through httpcore, h11 and httpx in Python, so at 64 KiB that bookkeeping took a
    good part of a small VM's core at download speed (HISTORY.md has the figures). A read returns
    whatever has arrived, so a larger one never waits longer. httpcore has no setting for it, only this
    class constant (in `httpcore` under huggingface_hub 1.x, `httpcore2` under 2.x); it is raised for
    the process, and an httpcore without it is left alone.
    """
    for name in ("httpcore2._sync.http11", "httpcore._sync.http11"):
        try:
            connection = importlib.import_module(name).HTTP11Connection
        except (ImportError, AttributeError):
            continue
        if isinstance(getattr(connection, "READ_NUM_BYTES", None), int) and connection.READ_NUM_BYTES < _SOCKET_READ:
            connection.READ_NUM_BYTES = _SOCKET_READ


def _append_body(url: str, headers: dict[str, str], f: _PartialFile, watch: StallWatch) -> None:
    """Append the body of `url` from byte `f.size` on (a Range request) to `f`.

    The same request as huggingface_hub's `http_get` (its session, headers, timeout and status
    retries), but each piece goes to `f` as it comes off the socket: `http_get` first re-chunks the
    body into 10 MiB pieces through a BytesIO, which cost more CPU than the transfer itself. A stream that breaks
    is resumed by the caller's `retrying`, from what reached the file; so is one that trickles
    (`TransferStalled`, from `watch`), on a fresh connection: leaving the stream closes this one.
    """
    start = f.size
    watch.restart(start)
    ranged = {**headers, "Range": f"bytes={start}-"} if start else headers
    with http_stream_backoff(
        "GET", url, headers=ranged, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, retry_on_exceptions=(),
        retry_on_status_codes=(408, 429),
    ) as response:
        hf_raise_for_status(response)
        if start and response.status_code == 200:  # the server ignored Range: this is the whole file
            f.restart()
            watch.restart(0)
        for chunk in response.iter_bytes():
            f.append(chunk)
            watch.update(f.size)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class LocalSource:
    """A model directory on this machine; shards are read in place, never copied or deleted."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise SourceNotFoundError(f"source directory {root} does not exist")
        self.root = root.resolve()
        self.name = str(self.root)
        self.revision = None

    def files(self) -> dict[str, SourceFile]:
        found = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not rel.startswith((".git/", ".cache/")):
                found[rel] = SourceFile(path.stat().st_size, None)
        return found

    def read_text(self, path: str) -> str:
        return (self.root / path).read_text(encoding="utf-8")

    def copy_to(self, path: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / path, dest)
        return dest

    def headers(self, filenames: list[str]) -> dict[str, dict[str, TensorInfo]]:
        return {name: read_header(self.root / name, name) for name in filenames}

    def fetch(self, path: str, work_dir: Path, arrival: Arrival | None = None) -> Fetched:
        local = self.root / path
        if arrival is not None:
            arrival.begin_file(local)
        return Fetched(local, file_sha256(local), temporary=False)


class HubSource:
    """A Hub repo pinned to the commit its revision pointed at when the run started."""

    def __init__(self, api: HfApi, repo_id: str, revision: str | None) -> None:
        _read_sockets_in_larger_pieces()
        self.api = api
        self.repo_id = repo_id
        self.name = repo_id
        self._speeds = SpeedHistory()  # what this source's downloads have recently done, to see one trickle
        with hub.reading(repo_id if revision is None else f"{repo_id}@{revision}"):
            info = retrying(lambda: api.model_info(repo_id, revision=revision, files_metadata=True), f"info of {repo_id}")
        self.revision = info.sha
        self._files = {
            s.rfilename: SourceFile(s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []
        }

    def files(self) -> dict[str, SourceFile]:
        return dict(self._files)

    def _download(self, path: str, dest: Path, arrival: Arrival | None = None) -> str | None:
        """Download `path` to `dest` through a partial file that outlives failures and is resumed by Range,
        within this run (bounded retries) and across runs that reuse the work_dir. Files the Hub stores in
        Xet go through `hf_xet` when it is installed, as huggingface_hub itself does.

        Progress is reported to `arrival`. Returns the sha256 when it could be taken from the bytes as they
        arrived (saving a second pass over the shard), else None.

        A whole download that a killed run left in `dest` is taken up as the partial file: it is complete,
        so nothing is fetched, and it is checked against the Hub's sha256 like any other."""
        url = hf_hub_url(self.repo_id, path, revision=self.revision, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.api.token, library_name="streamq")
        partial = dest.with_name(f"{dest.name}.{self.revision}.incomplete")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and not partial.exists():
            os.replace(dest, partial)

        def attempt() -> str | None:
            meta = get_hf_file_metadata(url, token=self.api.token, endpoint=self.api.endpoint)
            if meta.xet_file_data is not None and is_xet_available():  # Xet has its own chunked, resumable transfer
                if not (partial.is_file() and partial.stat().st_size == meta.size):
                    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
                        got = hf_hub_download(self.repo_id, path, revision=self.revision, local_dir=scratch, endpoint=self.api.endpoint, token=self.api.token)
                        os.replace(got, partial)
                if arrival is not None:
                    arrival.begin_file(partial)
                return None
            with open(partial, "a+b") as raw:
                if raw.tell() > (meta.size or 0):  # not a prefix of this file: start over
                    if arrival is not None:
                        arrival.reset()
                    raw.truncate(0)
                with _PartialFile(raw, arrival) as f:
                    if f.size < (meta.size or 0):
                        _append_body(meta.location, headers, f, StallWatch(self._speeds, f"download of {path}"))
                    return f.hexdigest()

        try:
            with hub.reading(self.repo_id):
                digest = retrying(attempt, f"download of {path}", progress=lambda: _size(partial))
        except Cancelled:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)
        return digest

    def read_text(self, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / Path(path).name
            self._download(path, dest)
            return dest.read_text(encoding="utf-8")

    def copy_to(self, path: str, dest: Path) -> Path:
        self._download(path, dest)
        return dest

    def headers(self, filenames: list[str]) -> dict[str, dict[str, TensorInfo]]:
        """Read over a few connections at once: one round trip per shard, one after another, was most of
        the time a run spent before its first download."""
        with ThreadPoolExecutor(min(8, max(1, len(filenames))), "streamq-header") as pool:
            return dict(zip(filenames, pool.map(self._header, filenames)))

    def _header(self, name: str) -> dict[str, TensorInfo]:
        try:
            with hub.reading(self.repo_id):
                meta = retrying(
                    lambda: self.api.parse_safetensors_file_metadata(self.repo_id, name, revision=self.revision),
                    f"header of {name}",
                )
        except (SafetensorsParsingError, NotASafetensorsRepoError) as exc:
            raise CorruptShardError(f"{name}: cannot read its safetensors header ({exc})") from exc
        return {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in meta.tensors.items()}

    def fetch(self, path: str, work_dir: Path, arrival: Arrival | None = None) -> Fetched:
        """Download exactly one file into `work_dir` (not the shared cache, so deleting it frees the disk),
        reporting its bytes to `arrival` as they come.

        Its sha256 is checked against the Hub's LFS metadata; a mismatch is downloaded once more, and
        never handed on to be quantized.
        """
        expected = self._files.get(path, SourceFile(0, None)).sha256
        for attempt in range(2):
            try:
                local = work_dir / "in" / path
                digest = self._download(path, local, arrival) or file_sha256(local)
            except EntryNotFoundError as exc:
                raise SourceNotFoundError(f"{self.repo_id}: {path} is listed but cannot be downloaded") from exc
            if expected is None or digest == expected:
                return Fetched(local, digest, temporary=True)
            local.unlink()
            logger.warning("%s: sha256 %s does not match the Hub's %s (attempt %d)", path, digest, expected, attempt + 1)
        raise CorruptShardError(
            f"{path}: downloaded bytes have sha256 {digest}, but the Hub lists {expected}; nothing was converted. "
            "Run again later; if it persists, the file on the Hub is damaged"
        )


def open_source(location: HubRepo | LocalDir, api: HfApi) -> Source:
    if isinstance(location, HubRepo):
        hub.require_online(location.repo_id)
        return HubSource(api, location.repo_id, location.revision)
    return LocalSource(location.path)
