"""A sha256 whose state can be saved, so that hashing a 50 GB file resumes after a crash instead of restarting.

hashlib's state cannot be exported. OpenSSL's low-level SHA256_Init/Update/Final (deprecated in 3.0, still
exported) work on sha.h's public 112-byte SHA256_CTX, which can be copied and restored; ctypes calls them at
OpenSSL's speed and releases the GIL meanwhile. Where they are missing or answer wrongly, hashlib is used and
state() returns None: the caller then hashes from the start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
import sys
import threading
from types import SimpleNamespace

_CTX = ctypes.c_char * 112  # sha.h: unsigned int h[8], Nl, Nh, data[16], num, md_len
_LAYOUT = struct.Struct("8I2I16I2I")  # native byte order: a state restores only on the machine type that saved it
_P = ctypes.c_void_p


class _PyBuffer(ctypes.Structure):  # CPython's Py_buffer: any contiguous buffer, read-only ones too, in place
    _fields_ = [("buf", _P), ("obj", _P), ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int), ("format", _P), ("shape", _P),
                ("strides", _P), ("suboffsets", _P), ("internal", _P)]


def _load() -> SimpleNamespace | None:
    """libcrypto's SHA256_* and CPython's buffer calls; None where one is missing or disagrees with hashlib."""
    try:  # [] makes new function objects: ctypes.pythonapi's shared ones keep their own argtypes
        get, release = ctypes.pythonapi["PyObject_GetBuffer"], ctypes.pythonapi["PyBuffer_Release"]
    except AttributeError:  # not CPython
        return None
    get.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    release.argtypes, release.restype = (ctypes.POINTER(_PyBuffer),), None
    try:
        import _hashlib  # the libcrypto Python itself uses: dlsym on this handle searches its dependencies

        paths = [getattr(_hashlib, "__file__", None)]
    except ImportError:
        paths = []
    if sys.platform != "darwin":  # macOS's unversioned /usr/lib/libcrypto.dylib aborts the process when loaded
        paths.append(ctypes.util.find_library("crypto"))
    for path in filter(None, paths):
        try:
            lib = ctypes.CDLL(path)
            init, update, final = lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final
        except (OSError, AttributeError):
            continue
        init.argtypes, update.argtypes, final.argtypes = (_P,), (_P, _P, ctypes.c_size_t), (_P, _P)
        ctx, out, sample = _CTX(), (ctypes.c_char * 32)(), bytes(range(256)) * 5
        init(ctx)
        update(ctx, sample[:100], 100)
        fields = _LAYOUT.unpack(ctx.raw)
        if fields[8:10] != (800, 0) or fields[-2:] != (36, 32):  # Nl, Nh, num, md_len not where sha.h has them
            continue
        ctx = _CTX.from_buffer_copy(ctx.raw)  # a restored state goes on
        update(ctx, sample[100:], len(sample) - 100)
        final(out, ctx)
        if out.raw == hashlib.sha256(sample).digest():
            return SimpleNamespace(init=init, update=update, final=final, get=get, release=release)
    return None


_lib = _load()


def resumable() -> bool:
    """Whether libcrypto's SHA256_* are usable here, so that state() can be saved."""
    return _lib is not None


class ResumableSha256:
    """sha256 with hashlib's update/hexdigest/copy, plus state(), which ResumableSha256(state) resumes from."""

    def __init__(self, state: str | None = None) -> None:
        """state: what .state() returned earlier, or None for a fresh hash."""
        self._lock, self._n = threading.Lock(), 0  # the lock: two updates at once would corrupt the C context
        self._h, self._ctx = (hashlib.sha256(), None) if _lib is None else (None, _CTX())
        if state is None:
            if self._ctx is not None:
                _lib.init(self._ctx)
            return
        if self._ctx is None:
            raise ValueError("cannot restore a sha256 state: libcrypto's SHA256_* are unavailable; hash from the start")
        try:
            raw = bytes.fromhex(state)
        except (TypeError, ValueError):
            raise ValueError(f"sha256 state is not a hex string: {str(state)[:40]!r}") from None
        if len(raw) != len(self._ctx):
            raise ValueError(f"sha256 state has {len(raw)} bytes, not {len(self._ctx)}")
        fields = _LAYOUT.unpack(raw)  # md_len must be 32, Nl count whole bytes, num the bytes past the last block
        if fields[-1] != 32 or fields[8] % 8 or fields[-2] != fields[8] // 8 % 64:
            raise ValueError("sha256 state is not a SHA256_CTX of this machine type (byte count or digest size wrong)")
        ctypes.memmove(self._ctx, raw, len(raw))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash any C-contiguous buffer in place, GIL released; a call costs ~2 us, so feed pieces of 64 KiB+."""
        if self._ctx is None:
            with self._lock:
                self._h.update(data)
                self._n += memoryview(data).nbytes
            return
        view = _PyBuffer()
        _lib.get(data, ctypes.byref(view), 0)  # PyBUF_SIMPLE: raises for str or a non-contiguous view, like hashlib
        try:
            with self._lock:
                _lib.update(self._ctx, view.buf, view.len)
        finally:
            _lib.release(ctypes.byref(view))

    @property
    def nbytes(self) -> int:
        """Bytes hashed so far (the context counts bits, in Nl and Nh)."""
        if self._ctx is None:
            return self._n
        nl, nh = struct.unpack_from("2I", self._ctx, 32)
        return (nh << 32 | nl) // 8

    def state(self) -> str | None:
        """Hex of the context, JSON-safe, for ResumableSha256(state); None where it cannot be saved."""
        with self._lock:
            return None if self._ctx is None else self._ctx.raw.hex()

    def hexdigest(self) -> str:
        """The digest of everything so far; hashing can go on (final runs on a copy)."""
        if self._ctx is None:
            return self._h.hexdigest()
        with self._lock:
            ctx, out = _CTX.from_buffer_copy(self._ctx), (ctypes.c_char * 32)()
        _lib.final(out, ctx)
        return out.raw.hex()

    def copy(self) -> ResumableSha256:
        """An independent hash of the same bytes."""
        other = ResumableSha256.__new__(ResumableSha256)
        with self._lock:
            other._lock, other._n, other._h = threading.Lock(), self._n, None if self._h is None else self._h.copy()
            other._ctx = None if self._ctx is None else _CTX.from_buffer_copy(self._ctx)
        return other
