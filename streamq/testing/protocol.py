"""HTTP/1.1 on the wire: request bodies, Range, keep-alive, the request log, and the faults that act on the wire.

The Hub endpoints themselves live in `api.py`; this module only knows how to read a request and write a
`Response`, so a fault can break a connection at an exact byte without the endpoints knowing about it.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import EllipsisType
from typing import Any, BinaryIO, NamedTuple, Protocol
from urllib.parse import parse_qs

from .errors import HubError
from .faults import Fault, FaultSet

log = logging.getLogger("streamq.testing")

_CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class ConnectionDropped(Exception):
    """The connection is to be reset: by a fault, or because the client's request stream broke off."""


class Body:
    """A request body, read once as it arrives (by Content-Length or chunked), cut short by a `limit` if set."""

    def __init__(self, rfile: BinaryIO, headers: Message, limit: int | None = None, trickle: Fault | None = None) -> None:
        self._rfile = rfile
        self._trickle = trickle
        self._chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        try:
            self._remaining = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        except ValueError:
            raise ConnectionDropped from None  # not HTTP: nothing sensible to answer
        self._chunk_left = 0
        self._done = not self._chunked and self._remaining == 0
        self._limit = limit
        self.received = 0

    def read(self, size: int = _CHUNK) -> bytes:
        """The next bytes of the body, b"" at its end."""
        if self._done:
            return b""
        if self._chunked and self._chunk_left == 0 and not self._next_chunk():
            return b""
        want = min(size, self._chunk_left if self._chunked else self._remaining)
        if self._limit is not None:
            want = min(want, self._limit - self.received)
            if want <= 0:
                raise ConnectionDropped
        if self._trickle is not None and self.received >= self._trickle.after_bytes:
            time.sleep(self._trickle.seconds)
            want = min(want, self._trickle.chunk_size)
        try:
            data = self._rfile.read(want)
        except OSError:
            raise ConnectionDropped from None
        if not data:
            raise ConnectionDropped  # the client went away mid-body
        self.received += len(data)
        if self._chunked:
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self._rfile.readline()  # the CRLF closing the chunk
        else:
            self._remaining -= len(data)
            self._done = self._remaining == 0
        return data

    def _next_chunk(self) -> bool:
        try:
            size = int(self._rfile.readline(1024).split(b";")[0].strip(), 16)
        except ValueError:
            raise ConnectionDropped from None  # not HTTP: nothing sensible to answer
        if size == 0:
            while self._rfile.readline(1024).strip():
                pass  # trailers
            self._done = True
            return False
        self._chunk_left = size
        return True

    def read_all(self) -> bytes:
        return b"".join(iter(self.read, b""))

    def drain(self) -> None:
        """Read what is left, so the next request on this keep-alive connection starts where it should."""
        for _ in iter(self.read, b""):
            pass


@dataclass
class Request:
    method: str  # HEAD is answered as GET without the body
    path: str  # raw (still URL-quoted), without the query string
    query: dict[str, list[str]]
    headers: Message
    body: Body

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true")

    @property
    def token(self) -> str | None:
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        return value.strip() or None

    def json(self) -> Any:
        try:
            return json.loads(self.body.read_all() or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # sent from disk instead of `body`, honouring Range

    @classmethod
    def json(cls, data: Any, status: int = 200, content_type: str = "application/json") -> Response:
        return cls(status, {"Content-Type": content_type}, json.dumps(data).encode())

    @classmethod
    def error(cls, err: HubError, **extra: Any) -> Response:
        """`X-Error-Code` is what the client maps to its exception types; the message goes in both places."""
        response = cls.json({"error": err.message, **extra}, err.status)
        response.headers.update(err.headers)
        response.headers["X-Error-Message"] = _header_safe(err.message)
        if err.code:
            response.headers["X-Error-Code"] = err.code
        return response


def _header_safe(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", " ", text)[:1000]


class RequestRecord(NamedTuple):
    method: str
    path: str  # raw, no query string
    status: int | None  # None when the connection was dropped before a status was sent


class RequestLog:
    """What the hub answered, in order of completion, without headers (so without tokens).

    For assertions like "the shard was not downloaded again": `hub.requests.count("GET", r"^/storage/")`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._sent: dict[str, int] = {}  # response body bytes written, by path

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def add_sent(self, path: str, size: int) -> None:
        with self._lock:
            self._sent[path] = self._sent.get(path, 0) + size

    def sent(self, path: str = "") -> int:
        """Response body bytes written for paths matching the regex `path` (what a client downloaded)."""
        pattern = re.compile(path)
        with self._lock:
            return sum(size for p, size in self._sent.items() if pattern.search(p))

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._sent.clear()

    def __iter__(self) -> Iterator[RequestRecord]:
        with self._lock:
            return iter(list(self._records))

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def count(self, method: str | None = None, path: str = "", status: int | None | EllipsisType = ...) -> int:
        """Requests with this method (None: any) whose path matches the regex `path`, with `status` if given
        (None: the connection was dropped before a status was sent)."""
        pattern = re.compile(path)
        return sum(
            1
            for record in self
            if (method is None or record.method == method)
            and pattern.search(record.path)
            and (status is ... or record.status == status)
        )


class App(Protocol):
    def handle(self, request: Request) -> Response: ...


class HubServer(ThreadingHTTPServer):
    """One thread per connection; remembers open connections so `stop()` does not wait on idle keep-alives."""

    daemon_threads = True
    request_queue_size = 64

    app: App  # set by the owner once the bound port is known

    def __init__(self, address: tuple[str, int], faults: FaultSet, requests: RequestLog) -> None:
        self.faults = faults
        self.requests = requests
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, HubHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response carries an exact Content-Length
    # Headers and body go out in separate writes: with Nagle's algorithm a small body then waited for the
    # client's delayed ACK, tens of ms per response.
    disable_nagle_algorithm = True
    server: HubServer

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet by default: requests are in `hub.requests`; debug logging shows them without headers."""
        log.debug("%s %s", self.address_string(), format % args)

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        fault = self.server.faults.take(self.command, path)
        logged = False
        try:
            status, headers, chunks = self._prepare(self._respond(path, query, fault), fault)
            # Logged before the answer goes out, so a client that has its answer always finds it in the log.
            self.server.requests.append(RequestRecord(self.command, path, status))
            logged = True
            self._transmit(status, headers, chunks, fault, path)
        except ConnectionDropped:
            self._reset()
        except OSError:
            self.close_connection = True  # the client hung up while we were answering
        finally:
            if not logged:
                self.server.requests.append(RequestRecord(self.command, path, None))

    def _respond(self, path: str, query: str, fault: Fault | None) -> Response:
        limit = fault.after_bytes if fault is not None and fault.kind == "reset_upload" else None
        trickle = fault if fault is not None and fault.kind == "trickle" and self.command in ("PUT", "POST") else None
        body = Body(self.rfile, self.headers, limit, trickle)
        if fault is not None:
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "reset_upload":
                body.drain()
                raise ConnectionDropped
            elif fault.kind == "status":
                body.drain()
                return _injected(fault)
        method = "GET" if self.command == "HEAD" else self.command
        request = Request(method, path, parse_qs(query, keep_blank_values=True), self.headers, body)
        try:
            response = self.server.app.handle(request)
        except HubError as err:
            response = Response.error(err)
        except ConnectionDropped:
            raise
        except Exception:
            log.exception("Hub emulator failed on %s %s", self.command, path)
            response = Response.error(HubError(500, "Internal error in the Hub emulator"))
        body.drain()
        return response

    def _prepare(self, response: Response, fault: Fault | None) -> tuple[int, dict[str, str], Iterator[bytes]]:
        """Status, headers and body chunks to send: file bodies honour Range, every body gets its length."""
        status, headers = response.status, dict(response.headers)
        chunk_size = fault.chunk_size if fault is not None and fault.kind == "throttle" else _CHUNK
        if response.file is None or status != 200:
            body = response.body
            headers["Content-Length"] = str(len(body))
            return status, headers, (body[i : i + chunk_size] for i in range(0, len(body), chunk_size))
        size = response.file.stat().st_size
        headers["Accept-Ranges"] = "bytes"
        try:
            span = byte_range(self.headers.get("Range"), size)
        except HubError as err:
            error = Response.error(err)
            headers = {**error.headers, "Content-Range": f"bytes */{size}", "Content-Length": str(len(error.body))}
            return err.status, headers, iter([error.body])
        first, last = span or (0, size - 1)
        if span is not None:
            status, headers["Content-Range"] = 206, f"bytes {first}-{last}/{size}"
        headers["Content-Length"] = str(last - first + 1)
        return status, headers, _file_chunks(response.file, first, last - first + 1, chunk_size)

    def _transmit(self, status: int, headers: dict[str, str], chunks: Iterator[bytes], fault: Fault | None, path: str) -> None:
        """Send the answer; `reset`, `truncate`, `throttle` and (for downloads) `trickle` faults act on its body here."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            chunks = iter(())
        cut = fault.after_bytes if fault is not None and fault.kind in ("reset", "truncate") else None
        sent = 0
        for chunk in chunks:
            if cut is not None and sent + len(chunk) >= cut:
                self.wfile.write(chunk[: cut - sent])
                break
            if fault is not None and fault.kind == "throttle" and sent:
                time.sleep(fault.seconds)
            if fault is not None and fault.kind == "trickle" and self.command not in ("PUT", "POST"):
                self._trickle(chunk, sent, fault)
            else:
                self.wfile.write(chunk)
            sent += len(chunk)
            self.server.requests.add_sent(path, len(chunk))
        if cut is None:
            return
        if fault is not None and fault.kind == "reset":
            raise ConnectionDropped
        self.close_connection = True  # truncate: a clean close, the body just ends early

    def _trickle(self, chunk: bytes, sent: int, fault: Fault) -> None:
        """Write `chunk` (at body offset `sent`): at full speed up to the fault's `after_bytes`, then in its
        `chunk_size` pieces, `seconds` apart."""
        fast = max(0, min(len(chunk), fault.after_bytes - sent))
        self.wfile.write(chunk[:fast])
        for i in range(fast, len(chunk), fault.chunk_size):
            self.wfile.flush()
            time.sleep(fault.seconds)
            self.wfile.write(chunk[i : i + fault.chunk_size])

    def _reset(self) -> None:
        """Close with SO_LINGER 0, which sends a TCP RST: what a crashed proxy or a dropped link looks like."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the socket only really closes once its file objects are closed too
            self.connection.close()
        except OSError:
            pass


def _injected(fault: Fault) -> Response:
    response = Response.error(HubError(fault.status_code, f"Injected fault: HTTP {fault.status_code}"))
    if fault.retry_after is not None:
        response.headers["Retry-After"] = str(fault.retry_after)
    return response


def _file_chunks(path: Path, first: int, length: int, chunk_size: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(first)
        while length > 0:
            data = file.read(min(chunk_size, length))
            if not data:
                return
            length -= len(data)
            yield data


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes a single `Range` asks for, clamped to the file; None for the whole file.

    Unsatisfiable ranges (starting at or past the end) raise 416; several ranges or bad syntax are ignored,
    which RFC 9110 allows, and give the whole file.
    """
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise HubError(416, "Requested range not satisfiable")
        return max(size - suffix, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise HubError(416, "Requested range not satisfiable")
    return start, min(int(last), size - 1) if last else size - 1
