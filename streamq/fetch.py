"""Sources: where the input model is read from.

A source lists its files, reads small files and safetensors headers (with each tensor's byte range)
without downloading weights, fetches a small file whole, and streams a weight file from any offset
(`HubSource.stream`, by HTTP Range) into a sink; a local source is read in place instead.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff, http_stream_backoff
from huggingface_hub.utils._runtime import is_xet_available
from huggingface_hub.errors import EntryNotFoundError, NotASafetensorsRepoError, SafetensorsParsingError

from . import hub
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
class FileHeader:
    """A safetensors file's tensors and where each one's bytes are (absolute offsets in the file)."""

    tensors: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]
    data_start: int  # 8 + the header's length


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

    def headers(self, filenames: list[str]) -> dict[str, FileHeader]: ...

    def fetch(self, path: str, work_dir: Path) -> Fetched: ...

    def read_range(self, path: str, start: int, end: int) -> bytes: ...


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_header(path: Path, name: str) -> FileHeader:
    """Tensor names, dtypes, shapes and byte ranges of a local safetensors file, from its header alone
    (safetensors' `safe_open` maps the whole file, which a 50 GB file on a small VM cannot afford); the
    plan checks that the header describes the file's bytes exactly."""
    try:
        with open(path, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
            if length > min(_MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"its header claims {length} bytes")
            header = json.loads(raw.read(length))
        header.pop("__metadata__", None)
        tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
        offsets = {k: (8 + length + v["data_offsets"][0], 8 + length + v["data_offsets"][1]) for k, v in header.items()}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise CorruptShardError(f"{name}: not a valid safetensors file ({exc}); re-upload or re-save it") from exc
    return FileHeader(tensors, offsets, 8 + length)


_MAX_HEADER = 100_000_000  # what safetensors itself accepts


class _PartialFile:
    """A partial download of a small file: bytes are appended (after what an earlier attempt left in it)
    and hashed as they come. `restart` drops everything (a server that ignored Range)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        f.seek(0)
        while block := f.read(1 << 24):
            self._sha.update(block)

    @property
    def size(self) -> int:
        return self._f.tell()

    def append(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)

    def restart(self) -> None:
        self._sha = hashlib.sha256()
        self._f.seek(0)
        self._f.truncate()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


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


class Sink(Protocol):
    """Where a download's bytes go: `size` bytes of the file are in; `restart`: the bytes that follow
    are the file from its start again (a server that ignored Range)."""

    @property
    def size(self) -> int: ...

    def append(self, data: bytes) -> None: ...

    def restart(self) -> None: ...


def _append_body(url: str, headers: dict[str, str], f: Sink, watch: StallWatch, end: int | None = None) -> None:
    """Append the body of `url` from byte `f.size` on (a Range request) to `f`, up to `end` if given.

    The same request as huggingface_hub's `http_get` (its session, headers, timeout and status
    retries), but each piece goes to `f` as it comes off the socket: `http_get` first re-chunks the
    body into 10 MiB pieces through a BytesIO, which cost more CPU than the transfer itself. A stream that breaks
    is resumed by the caller's `retrying`, from what reached the file; so is one that trickles
    (`TransferStalled`, from `watch`), on a fresh connection: leaving the stream closes this one.
    """
    start = f.size
    watch.restart(start)
    ranged = {**headers, "Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else headers
    with http_stream_backoff(
        "GET", url, headers=ranged, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, retry_on_exceptions=(),
        retry_on_status_codes=(408, 429),
    ) as response:
        hf_raise_for_status(response)
        if (start or end is not None) and response.status_code == 200:  # the server ignored Range: this is the whole file
            f.restart()
            watch.restart(0)
        for chunk in response.iter_bytes():
            f.append(chunk if end is None else chunk[: end - f.size])
            watch.update(f.size)
            if end is not None and f.size >= end:
                break


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

    def headers(self, filenames: list[str]) -> dict[str, FileHeader]:
        return {name: read_header(self.root / name, name) for name in filenames}

    def read_range(self, path: str, start: int, end: int) -> bytes:
        with open(self.root / path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def path(self, name: str) -> Path:
        """Where a weight file is, to be read in place."""
        return self.root / name

    def fetch(self, path: str, work_dir: Path) -> Fetched:
        local = self.root / path
        return Fetched(local, file_sha256(local), temporary=False)


class HubSource:
    """A Hub repo pinned to the commit its revision pointed at when the run started."""

    def __init__(self, api: HfApi, repo_id: str, revision: str | None) -> None:
        _read_sockets_in_larger_pieces()
        self.api = api
        self.repo_id = repo_id
        self.name = repo_id
        self._speeds = SpeedHistory(resumable=True)  # what this source's downloads have recently done, to see one trickle
        with hub.reading(repo_id if revision is None else f"{repo_id}@{revision}"):
            info = retrying(lambda: api.model_info(repo_id, revision=revision, files_metadata=True), f"info of {repo_id}")
        self.revision = info.sha
        self._files = {
            s.rfilename: SourceFile(s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []
        }

    def files(self) -> dict[str, SourceFile]:
        return dict(self._files)

    def _url(self, path: str) -> str:
        return hf_hub_url(self.repo_id, path, revision=self.revision, endpoint=self.api.endpoint)

    def _download(self, path: str, dest: Path) -> str | None:
        """Download a whole file to `dest` through a partial file that outlives failures and is resumed
        by Range, within this run (bounded retries) and across runs that reuse the work_dir. Files the
        Hub stores in Xet go through `hf_xet` when it is installed, as huggingface_hub itself does.
        Returns the sha256 when it was taken from the bytes as they arrived, else None."""
        url, headers = self._url(path), build_hf_headers(token=self.api.token, library_name="streamq")
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
                return None
            with open(partial, "a+b") as raw:
                if raw.tell() > (meta.size or 0):  # not a prefix of this file: start over
                    raw.truncate(0)
                f = _PartialFile(raw)
                if f.size < (meta.size or 0):
                    _append_body(meta.location, headers, f, StallWatch(self._speeds, f"download of {path}"))
                return f.hexdigest()

        with hub.reading(self.repo_id):
            digest = retrying(attempt, f"download of {path}", progress=lambda: _size(partial))
        os.replace(partial, dest)
        return digest

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file, by one Range request (retried)."""
        if end <= start:
            return b""
        url, headers = self._url(path), build_hf_headers(token=self.api.token, library_name="streamq")

        def attempt() -> bytes:
            location = get_hf_file_metadata(url, token=self.api.token, endpoint=self.api.endpoint).location
            response = http_backoff("GET", location, headers={**headers, "Range": f"bytes={start}-{end - 1}"}, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(response)
            body = response.content
            return body[start:end] if response.status_code == 200 else body

        with hub.reading(self.repo_id):
            return retrying(attempt, f"reading {path}")

    def stream(self, path: str, sink: Sink, end: int | None = None) -> None:
        """Send the file's bytes from `sink.size` to `end` (default: its end) into `sink`, by Range
        requests: a broken or trickling connection resumes where the sink stands, on a fresh one
        (bounded retries)."""
        url, headers = self._url(path), build_hf_headers(token=self.api.token, library_name="streamq")

        def attempt() -> None:
            meta = get_hf_file_metadata(url, token=self.api.token, endpoint=self.api.endpoint)
            stop = (meta.size or 0) if end is None else end
            if sink.size < stop:
                _append_body(meta.location, headers, sink, StallWatch(self._speeds, f"download of {path}"), None if end is None else stop)

        try:
            with hub.reading(self.repo_id):
                retrying(attempt, f"download of {path}", progress=lambda: sink.size)
        except EntryNotFoundError as exc:
            raise SourceNotFoundError(f"{self.repo_id}: {path} is listed but cannot be downloaded") from exc

    def read_text(self, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(tmp) / Path(path).name
            self._download(path, dest)
            return dest.read_text(encoding="utf-8")

    def copy_to(self, path: str, dest: Path) -> Path:
        self._download(path, dest)
        return dest

    def headers(self, filenames: list[str]) -> dict[str, FileHeader]:
        """Read over a few connections at once: one round trip per shard, one after another, was most of
        the time a run spent before its first download."""
        with ThreadPoolExecutor(min(8, max(1, len(filenames))), "streamq-header") as pool:
            return dict(zip(filenames, pool.map(self._header, filenames)))

    def _header(self, name: str) -> FileHeader:
        try:
            with hub.reading(self.repo_id):
                meta = retrying(
                    lambda: self.api.parse_safetensors_file_metadata(self.repo_id, name, revision=self.revision),
                    f"header of {name}",
                )
        except (SafetensorsParsingError, NotASafetensorsRepoError) as exc:
            raise CorruptShardError(f"{name}: cannot read its safetensors header ({exc})") from exc
        (length,) = struct.unpack("<Q", self.read_range(name, 0, 8))  # huggingface_hub parses the header, but keeps no length
        start = 8 + length
        return FileHeader(
            {k: TensorInfo(t.dtype, tuple(t.shape)) for k, t in meta.tensors.items()},
            {k: (start + t.data_offsets[0], start + t.data_offsets[1]) for k, t in meta.tensors.items()},
            start,
        )

    def fetch(self, path: str, work_dir: Path) -> Fetched:
        """Download one whole file into `work_dir` (not the shared cache, so deleting it frees the disk),
        checked against the Hub's sha256: a mismatch is downloaded once more, never handed on."""
        expected = self._files.get(path, SourceFile(0, None)).sha256
        for attempt in range(2):
            try:
                local = work_dir / "in" / path
                digest = self._download(path, local) or file_sha256(local)
            except EntryNotFoundError as exc:
                raise SourceNotFoundError(f"{self.repo_id}: {path} is listed but cannot be downloaded") from exc
            if expected is None or digest == expected:
                return Fetched(local, digest, temporary=True)
            local.unlink()
            logger.warning("%s: sha256 %s does not match the Hub's %s (attempt %d)", path, digest, expected, attempt + 1)
        raise CorruptShardError(
            f"{path}: downloaded bytes have sha256 {digest}, but the Hub lists {expected}. "
            "Run again later; if it persists, the file on the Hub is damaged"
        )


def open_source(location: HubRepo | LocalDir, api: HfApi) -> Source:
    if isinstance(location, HubRepo):
        hub.require_online(location.repo_id)
        return HubSource(api, location.repo_id, location.revision)
    return LocalSource(location.path)
