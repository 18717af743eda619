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
    """The same rules on a shorter clock: windows of 0.2 s, slow for 0.4 s (downloads) or 0.6 s (uploads);
    the floor stays 1 MB/s."""
    monkeypatch.setattr(stall, "WINDOW_SECONDS", 0.2)
    monkeypatch.setattr(stall, "DOWNLOAD_STALL_SECONDS", 0.4)
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

    def stream(self, path, sink, end=None):  # armed for the download, not the header reads of the plan
        if path == target and trickle not in list(hub.faults):
            hub.faults.add(trickle)
        return real_stream(self, path, sink, end)

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


def oids_in_order(api: HfApi) -> list[str]:
    """The source's weight files' LFS oids, in the order the run streams them."""
    infos = {s.rfilename: s.lfs.sha256 for s in api.model_info("org/model", files_metadata=True).siblings if s.lfs}
    return [infos[name] for name in sorted(infos) if name.endswith(".safetensors")]


def arm_on_first_download(monkeypatch, hub: LocalHub, *faults: Fault) -> None:
    """Add `faults` when the run's first download starts: the plan's header reads are not affected."""
    real_stream = HubSource.stream

    def stream(self, path, sink, end=None):
        if not any(f in list(hub.faults) for f in faults):
            for fault in faults:
                hub.faults.add(fault)
        return real_stream(self, path, sink, end)

    monkeypatch.setattr(HubSource, "stream", stream)


@pytest.fixture()
def small_link(monkeypatch) -> Fault:
    """A link scaled down with the files: every download moves about 60 kB/s (a 30 kB file spans two windows,
    so fast connections are measured), and the floor is 20 kB/s. A trickle is 1.3 kB/s."""
    monkeypatch.setattr(stall, "FLOOR_BYTES_PER_S", 20_000.0)
    return Fault.throttle(2048, 0.033, method="GET", path=r"^/storage/", times=None)


def trickle_of(oid: str) -> Fault:
    """A connection that delivers 256 bytes, then 64 bytes every 0.05 s (a 30 kB file would take ~25 s)."""
    return Fault.trickle(256, 64, 0.05, method="GET", path=rf"^/storage/.*/{oid}$", times=1)


def test_a_download_trickling_from_its_first_bytes_gets_one_fresh_connection(
    tmp_path: Path, hub: LocalHub, quick_judgement, small_link, monkeypatch, caplog
) -> None:
    """The run's very first download connection trickles: no faster connection has been seen, so it is compared
    with the floor, given up once, and the fresh connection finishes the file at the link's speed."""
    api = push(hub, make_model(tmp_path / "src"))
    stream_requantize("org/model", "me/clean", endpoint=hub.endpoint, progress=False)
    first = oids_in_order(api)[0]
    trickle = trickle_of(first)
    arm_on_first_download(monkeypatch, hub, trickle, small_link)
    hub.requests.clear()
    with caplog.at_level(logging.WARNING, logger="streamq"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)

    assert trickle.fired == 1
    assert caplog.text.count("giving up this connection") == 1
    assert "no connection has been faster lately; giving up this connection, to learn" in caplog.text
    assert gets_of(hub, first) == [206, 206, 200, 206]  # header reads, the trickle, the rest by Range
    assert files(hub, "me/out", tmp_path / "o") == files(hub, "me/clean", tmp_path / "c")


def test_some_trickling_connections_each_get_a_fresh_one(
    tmp_path: Path, hub: LocalHub, quick_judgement, small_link, monkeypatch, caplog
) -> None:
    """The proxy of the field report: some download connections (here the 1st, 3rd and 5th files') trickle after
    their first bytes. The first is given up as a probe, the later ones against the speed the fresh ones showed."""
    api = push(hub, make_model(tmp_path / "src"))
    oids = oids_in_order(api)
    trickles = [trickle_of(oids[i]) for i in (0, 2, 4)]
    arm_on_first_download(monkeypatch, hub, *trickles, small_link)
    hub.requests.clear()
    with caplog.at_level(logging.WARNING, logger="streamq"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)

    assert [t.fired for t in trickles] == [1, 1, 1]
    assert caplog.text.count("giving up this connection, to learn") == 1  # the probe
    assert caplog.text.count("recently; giving up this connection") == 2  # judged against the fresh connections
    for i in (0, 2, 4):
        assert gets_of(hub, oids[i]) == [206, 206, 200, 206]
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_a_steadily_slow_download_is_not_churned(tmp_path: Path, hub: LocalHub, quick_judgement, monkeypatch, caplog) -> None:
    """About 40 kB/s on every connection, far below the 1 MB/s floor: the first connection is given up once
    to learn the link's speed; the fresh one is as slow, so the link is slow, and no other is given up."""
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
    assert caplog.text.count("giving up this connection") == 1  # the one probe
    oids = oids_in_order(api)
    gets = [gets_of(hub, oid)[2:] for oid in oids]  # after the plan's two header reads
    assert gets.count([200]) == len(oids) - 1 and gets.count([200, 206]) == 1  # one file resumed once, every other in one piece
    assert len(oids) == len(list(src.glob("*.safetensors")))
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


def test_a_link_below_the_floor_gets_a_fresh_connection_once_a_minute_and_an_upload_none() -> None:
    """The rule on a fake clock, at the real constants: a download at 40 kB/s with no faster reference is given
    up after DOWNLOAD_STALL_SECONDS; the next one, as slow, is followed until PROBE_SECONDS have passed since
    (then one more fresh connection). An upload as slow, which would start over, is never given up for it."""
    now = [0.0]

    def connection(history: stall.SpeedHistory, seconds: float) -> float | None:
        """Move 40 kB/s for `seconds` (one update per second); when it was given up, or None."""
        watch = stall.StallWatch(history, "transfer", clock=lambda: now[0])
        watch.restart(0)
        for second in range(1, int(seconds) + 1):
            now[0] += 1.0
            try:
                watch.update(40_000 * second)
            except stall.TransferStalled:
                return float(second)
        return None

    downloads = stall.SpeedHistory(resumable=True)
    assert connection(downloads, 600) == stall.DOWNLOAD_STALL_SECONDS  # two windows below the floor, nothing faster seen
    # the next: judged again once a minute has passed since (its window then closes 5 s later)
    assert connection(downloads, 600) == stall.PROBE_SECONDS + stall.WINDOW_SECONDS
    assert connection(stall.SpeedHistory(), 3600) is None  # an upload
