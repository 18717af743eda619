"""ResumableSha256 gives hashlib's digests, and a saved state resumes, in this process or a new one."""

from __future__ import annotations

import array
import hashlib
import json
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamq import sha256
from streamq.sha256 import ResumableSha256, resumable

ROOT = Path(__file__).resolve().parent.parent
needs_libcrypto = pytest.mark.skipif(not resumable(), reason="libcrypto's SHA256_* are not usable here")
# Around the 64-byte block and its 55/56-byte padding edge, and longer.
LENGTHS = [0, 1, 2, 31, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4095, 4096, 65543, 1_000_003]


@pytest.fixture(params=["libcrypto", "hashlib"])
def backend(request, monkeypatch) -> str:
    """Each test on both paths: libcrypto's (where usable) and the hashlib fallback, forced."""
    if request.param == "libcrypto" and not resumable():
        pytest.skip("libcrypto's SHA256_* are not usable here")
    if request.param == "hashlib":
        monkeypatch.setattr(sha256, "_lib", None)
        assert not resumable()
    return request.param


def _pieces(data: bytes, rng: random.Random) -> list[bytes | bytearray | memoryview]:
    """data cut at random points (empty pieces included), as bytes, bytearray or a memoryview into a larger buffer."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(12)))
    out: list[bytes | bytearray | memoryview] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)]):
        kind = rng.randrange(3)
        if kind == 0:
            out.append(data[start:end])
        elif kind == 1:
            out.append(bytearray(data[start:end]))
        else:
            out.append(memoryview(bytearray(data))[start:end])
    return out


def test_equals_hashlib_on_many_lengths_fed_in_random_pieces(backend: str) -> None:
    rng = random.Random(1)
    for length in LENGTHS + [rng.randrange(300_000) for _ in range(30)]:
        data = rng.randbytes(length)
        h = ResumableSha256()
        for piece in _pieces(data, rng):
            h.update(piece)
        assert h.hexdigest() == hashlib.sha256(data).hexdigest(), length
        assert h.nbytes == length


def test_hexdigest_and_copy_midway_leave_the_hash_going_on(backend: str) -> None:
    rng = random.Random(2)
    data = rng.randbytes(10_000)
    h = ResumableSha256()
    done = 0
    for piece in _pieces(data, rng) + [data[:77]]:
        h.update(piece)
        done += len(piece)
        expected = data[:done] if done <= len(data) else data + data[: done - len(data)]
        before = h.state()
        assert h.hexdigest() == hashlib.sha256(expected).hexdigest()
        assert h.state() == before  # the digest did not finalize the context itself
        twin = h.copy()
        twin.update(b"only the copy")
        assert twin.nbytes == h.nbytes + 13
        assert twin.hexdigest() == hashlib.sha256(expected + b"only the copy").hexdigest()
    assert h.hexdigest() == hashlib.sha256(data + data[:77]).hexdigest()


@needs_libcrypto
def test_state_restores_at_every_offset_around_a_block() -> None:
    data = random.Random(3).randbytes(300)
    for split in range(len(data) + 1):
        first = ResumableSha256()
        first.update(data[:split])
        state = first.state()
        assert isinstance(state, str) and len(state) == 224
        resumed = ResumableSha256(json.loads(json.dumps(state)))
        assert resumed.nbytes == split
        resumed.update(data[split:])
        assert resumed.hexdigest() == hashlib.sha256(data).hexdigest(), split


@needs_libcrypto
def test_state_restores_in_a_new_process(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(3_000_017)
    split = 1_234_567
    h = ResumableSha256()
    h.update(data[:split])
    (tmp_path / "state.json").write_text(json.dumps({"sha256_state": h.state()}))
    (tmp_path / "rest.bin").write_bytes(data[split:])
    child = (
        "import json, sys; from pathlib import Path; from streamq.sha256 import ResumableSha256\n"
        "d = Path(sys.argv[1]); h = ResumableSha256(json.loads((d / 'state.json').read_text())['sha256_state'])\n"
        "n = h.nbytes; h.update((d / 'rest.bin').read_bytes()); print(n, h.nbytes, h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(split), str(len(data)), hashlib.sha256(data).hexdigest()]


@needs_libcrypto
def test_bad_states_are_rejected() -> None:
    h = ResumableSha256()
    h.update(b"x" * 100)
    good = h.state()
    ResumableSha256(good)
    with pytest.raises(ValueError, match="not a hex string"):
        ResumableSha256("zz" * 112)
    with pytest.raises(ValueError, match="not a hex string"):
        ResumableSha256(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has 111 bytes"):
        ResumableSha256(good[:-2])
    with pytest.raises(ValueError, match="has 113 bytes"):
        ResumableSha256(good + "00")
    raw = bytearray.fromhex(good)
    for offset in (108, 104, 32):  # md_len, num, Nl
        bad = bytearray(raw)
        bad[offset] ^= 1
        with pytest.raises(ValueError, match="not a SHA256_CTX"):
            ResumableSha256(bad.hex())


def test_fallback_saves_no_state_and_refuses_one(monkeypatch) -> None:
    saved = ResumableSha256().state() if resumable() else "00" * 112
    monkeypatch.setattr(sha256, "_lib", None)
    h = ResumableSha256()
    h.update(b"abc")
    assert h.state() is None
    assert h.hexdigest() == hashlib.sha256(b"abc").hexdigest() and h.nbytes == 3
    with pytest.raises(ValueError, match="hash from the start"):
        ResumableSha256(saved)


def test_update_takes_memoryviews_of_mmaps_and_other_buffers(backend: str, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(1_000_000)
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    with open(path, "r+b") as f:
        for access in (mmap.ACCESS_READ, mmap.ACCESS_WRITE, mmap.ACCESS_COPY):  # read-only one included
            with mmap.mmap(f.fileno(), 0, access=access) as m:
                h = ResumableSha256()
                view = memoryview(m)
                for start in range(0, len(data), 300_001):
                    h.update(view[start : start + 300_001])
                h.update(m)
                view.release()
                assert h.hexdigest() == hashlib.sha256(data + data).hexdigest()
    numbers = array.array("I", range(1000))  # itemsize 4: the byte length counts
    h = ResumableSha256()
    h.update(memoryview(numbers)[10:])
    assert h.nbytes == 990 * 4
    assert h.hexdigest() == hashlib.sha256(numbers[10:].tobytes()).hexdigest()
    with pytest.raises(TypeError):
        h.update("text")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        h.update(memoryview(data)[::2])
    assert h.nbytes == 990 * 4


@needs_libcrypto
def test_byte_count_carries_past_2_32_bits() -> None:
    """Nl counts bits modulo 2**32 and carries into Nh at 512 MiB; a state saved on either side resumes."""
    zeros = memoryview(bytes(64 << 20))
    total = (1 << 29) + 100
    reference, h = hashlib.sha256(), ResumableSha256()
    for _ in range(7):
        reference.update(zeros)
        h.update(zeros)
    h.update(zeros[: (64 << 20) - 10])  # 10 bytes short of 2**32 bits
    before = ResumableSha256(h.state())
    assert before.nbytes == (1 << 29) - 10
    for resumed in (h, before):
        resumed.update(zeros[:110])
        assert resumed.nbytes == total
        raw = bytes.fromhex(resumed.state())
        assert raw[36:40] == (1).to_bytes(4, sys.byteorder)  # Nh
    reference.update(zeros[: (64 << 20) - 10])
    reference.update(zeros[:110])
    assert h.hexdigest() == before.hexdigest() == ResumableSha256(h.state()).hexdigest() == reference.hexdigest()


@needs_libcrypto
def test_update_lets_other_threads_run() -> None:
    """ctypes drops the GIL during SHA256_Update: a Python loop keeps running while a large piece is hashed."""
    data = bytes(256 << 20)
    h = ResumableSha256()
    worker = threading.Thread(target=h.update, args=(data,))
    gaps, last = [], time.perf_counter()
    start = last
    worker.start()
    while worker.is_alive():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    took = time.perf_counter() - start
    worker.join()
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert took > 0.02 and max(gaps) < took / 2, (took, max(gaps))
