"""Disk limits: a pre-check that refuses a work_dir too small, and a disk that fills anyway mid-run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import streamq
from streamq import stream_requantize
from tiny_models import load_tensors, make_model


@pytest.fixture()
def tiny_fs(tmp_path: Path):
    """A real 1 MB filesystem (tmpfs); skipped where mounting is not allowed."""
    mount = tmp_path / "tinyfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_pre_check_names_needed_and_free_space(tmp_path: Path, tiny_fs: Path) -> None:
    (tiny_fs / "filler").write_bytes(b"\0" * (1024 * 1024 - 3 * 4096))  # leave 12 kB
    src = make_model(tmp_path / "src")
    with pytest.raises(streamq.InsufficientDiskError, match=r"needs .* GB .* but has .* GB free"):
        stream_requantize(src, tiny_fs / "out", work_dir=tiny_fs / "work", progress=False)
    assert not (tiny_fs / "out" / "config.json").exists()


def test_disk_that_fills_mid_run_then_resume(tmp_path: Path, tiny_fs: Path, monkeypatch) -> None:
    src = make_model(tmp_path / "src")
    stream_requantize(src, tmp_path / "clean", progress=False)
    out = tiny_fs / "out"

    import streamq.schedule as schedule

    real, calls = schedule.convert_arriving, []

    def fill_disk_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # another process takes the rest of the disk
            with open(tiny_fs / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
                except OSError:
                    pass
        return real(*args, **kwargs)

    monkeypatch.setattr(schedule, "convert_arriving", fill_disk_on_third_shard)
    with pytest.raises(streamq.InsufficientDiskError, match="is full; nothing half-written was published"):
        stream_requantize(src, out, work_dir=tmp_path / "work", progress=False)
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))

    (tiny_fs / "filler").unlink()
    monkeypatch.setattr(schedule, "convert_arriving", real)
    result = stream_requantize(src, out, work_dir=tmp_path / "work", progress=False)
    assert result.shards_skipped >= 1
    assert load_tensors(out).keys() == load_tensors(tmp_path / "clean").keys()
    assert all(
        (out / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "clean").glob("*.safetensors")
    )
