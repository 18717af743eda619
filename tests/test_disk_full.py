"""Disk limits: a pre-check that refuses a work_dir too small, and a disk that fills anyway mid-run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import streamq
from streamq import stream_requantize
from tiny_models import OUT_SHARD, header_reads, load_tensors, make_model


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


def test_a_hub_run_on_a_disk_below_its_budget_is_refused_before_the_first_byte(tmp_path: Path, tiny_fs: Path) -> None:
    from huggingface_hub import HfApi

    from streamq.testing import LocalHub

    src = make_model(tmp_path / "src")
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=src)
        hub.requests.clear()
        with pytest.raises(streamq.InsufficientDiskError, match=r"needs 1\.\d+ GB \(the disk budget\) but has 0\.00 GB free"):
            stream_requantize("org/model", "me/out", endpoint=hub.endpoint, work_dir=tiny_fs / "work", progress=False)
        headers = header_reads(p.stat().st_size for p in src.glob("*.safetensors"))
        assert hub.requests.sent(r"^/storage/") == headers  # the plan's header reads, not one byte of a tensor
        assert not api.repo_exists("me/out")
    assert [p for p in (tiny_fs / "work").rglob("*") if p.is_file() and p.parent.name == "in"] == []


def test_disk_that_fills_mid_run_then_resume(tmp_path: Path, tiny_fs: Path, monkeypatch) -> None:
    src = make_model(tmp_path / "src")
    stream_requantize(src, tmp_path / "clean", progress=False, max_shard_size=OUT_SHARD)
    out = tiny_fs / "out"

    import streamq.convert as convert

    real, calls = convert.SafetensorsWriter, []

    class FillingTheDisk(real):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # another process takes the rest of the disk
                with open(tiny_fs / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                            f.flush()
                    except OSError:
                        pass
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(convert, "SafetensorsWriter", FillingTheDisk)
    with pytest.raises(streamq.InsufficientDiskError, match="is full; nothing half-written was published"):
        stream_requantize(src, out, work_dir=tmp_path / "work", progress=False, max_shard_size=OUT_SHARD)
    assert not (out / "config.json").exists() and not list(out.glob("*.partial"))

    (tiny_fs / "filler").unlink()
    monkeypatch.setattr(convert, "SafetensorsWriter", real)
    result = stream_requantize(src, out, work_dir=tmp_path / "work", progress=False, max_shard_size=OUT_SHARD)
    assert result.shards_skipped >= 1
    assert load_tensors(out).keys() == load_tensors(tmp_path / "clean").keys()
    assert all(
        (out / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "clean").glob("*.safetensors")
    )
