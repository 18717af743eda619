"""A connection that keeps delivering a few bytes now and then is given up and the transfer resumed on a
fresh one; a connection that is slow but steady is left alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

import streamq.stall as stall
from streamq import stream_requantize, verify_output
from streamq.fetch import HubSource
from streamq.testing import Fault, LocalHub
from tiny_models import make_model


@pytest.fixture()
def quick_judgement(monkeypatch) -> None:
    """The same rules on a shorter clock: windows of 0.2 s, slow for 0.6 s (the floor stays 1 MB/s)."""
    monkeypatch.setattr(stall, "WINDOW_SECONDS", 0.2)
    monkeypatch.setattr(stall, "STALL_SECONDS", 0.6)


@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


def push(hub: LocalHub, src: Path) -> HfApi:
    api = HfApi(endpoint=hub.endpoint, token="hf_test")
    api.create_repo("org/model")
    api.upload_folder(repo_id="org/model", folder_path=src)
    return api


def files(hub: LocalHub, repo_id: str, dest: Path) -> dict[str, bytes]:
    path = Path(snapshot_download(repo_id, endpoint=hub.endpoint, local_dir=dest))
    return {
        p.relative_to(path).as_posix(): p.read_bytes().replace(repo_id.encode(), b"<repo>")
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".cache" not in p.parts and p.name != "streamq_manifest.json"
    }


def gets_of(hub: LocalHub, oid: str) -> list[int | None]:
    return [r.status for r in hub.requests if r.method == "GET" and r.path.endswith(f"/{oid}")]


def test_a_trickling_download_is_resumed_by_range_on_a_fresh_connection(
    tmp_path: Path, hub: LocalHub, quick_judgement, monkeypatch, caplog
) -> None:
    api = push(hub, make_model(tmp_path / "src"))
    stream_requantize("org/model", "me/clean", endpoint=hub.endpoint, progress=False)
    target = "model-00003-of-00007.safetensors"
    oid = next(s.lfs.sha256 for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename == target)
    # 8 kB at full speed, then 128 bytes every 0.1 s: the remaining ~30 kB would take 25 s; no read ever times out
    trickle = Fault.trickle(8192, 128, 0.1, method="GET", path=rf"^/storage/.*/{oid}$", times=1)
    real_stream = HubSource.stream

    def stream(self, path, sink):  # armed for the download, not the header reads of the plan
        if path == target and trickle not in list(hub.faults):
            hub.faults.add(trickle)
        return real_stream(self, path, sink)

    monkeypatch.setattr(HubSource, "stream", stream)
    hub.requests.clear()
    with caplog.at_level(logging.WARNING, logger="streamq"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)

    assert trickle.fired == 1
    # the plan's two header reads (Ranges), the trickling download, then the rest by Range on another connection
    assert gets_of(hub, oid) == [206, 206, 200, 206]
    assert "giving up this connection" in caplog.text
    assert files(hub, "me/out", tmp_path / "o") == files(hub, "me/clean", tmp_path / "c")
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_a_steadily_slow_download_is_not_given_up(tmp_path: Path, hub: LocalHub, quick_judgement, monkeypatch, caplog) -> None:
    """About 40 kB/s on every connection, far below the 1 MB/s floor: slow, but not slow for this link."""
    src = make_model(tmp_path / "src")
    api = push(hub, src)
    windows = []
    real_note = stall.SpeedHistory.note
    monkeypatch.setattr(stall.SpeedHistory, "note", lambda self, now, rate: windows.append(rate) or real_note(self, now, rate))
    hub.faults.add(Fault.throttle(2048, 0.05, method="GET", path=r"^/storage/", times=None))
    hub.requests.clear()
    with caplog.at_level(logging.WARNING, logger="streamq"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)

    assert len(windows) >= 10 and max(windows) < stall.FLOOR_BYTES_PER_S  # it was judged, all below the floor
    assert "giving up this connection" not in caplog.text
    oids = {s.lfs.sha256 for s in api.model_info("org/model", files_metadata=True).siblings if s.lfs}
    full = sum(gets_of(hub, oid).count(200) for oid in oids)
    assert full == len(list(src.glob("*.safetensors")))  # each shard downloaded once, in one piece
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def big_shard_model(dest: Path) -> Path:
    """One shard of ~34 MB (a 32 MB embedding, kept as is): an upload that outlasts the socket buffers."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16384, hidden_size=1024, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(dest, max_shard_size="1GB")
    return dest


def test_a_trickling_upload_is_sent_again_on_a_fresh_connection(tmp_path: Path, hub: LocalHub, monkeypatch, caplog) -> None:
    """Uploads are judged by how fast huggingface_hub reads the file it sends: the socket takes the bytes
    in bursts as its buffers drain. On loopback the fast part lasts a fraction of a second, hence windows
    of 0.05 s here (0.3 s slow), so that it spans several of them and sets the reference."""
    monkeypatch.setattr(stall, "WINDOW_SECONDS", 0.05)
    monkeypatch.setattr(stall, "STALL_SECONDS", 0.3)
    push(hub, big_shard_model(tmp_path / "src"))
    # the first upload of the output shard: 24 MB at full speed, then 16 kB every 0.1 s (10 more minutes)
    trickle = hub.faults.add(Fault.trickle(24 << 20, 16384, 0.1, method="PUT", path=r"^/storage/.*/me/out/", times=1))
    with caplog.at_level(logging.WARNING):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)

    assert trickle.fired == 1
    assert "giving up this connection" in caplog.text
    # given up, then sent again whole on a fresh connection (a PUT cannot resume); the emulator is still
    # draining the abandoned one's buffered bytes at the trickle's pace, so it may not be in the log yet
    puts = [r.status for r in hub.requests if r.method == "PUT" and "/me/out/" in r.path]
    assert [status for status in puts if status is not None] == [200]
    assert verify_output("me/out", endpoint=hub.endpoint).ok
