"""Interrupted runs resume: finished shards are not redone, and the output is the same as one clean run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import streamq
from streamq import iter_requantize, stream_requantize
from tiny_models import OUT_SHARD, fail_on_nth_shard, load_tensors, make_model


def _files(path: Path) -> dict[str, bytes]:
    """Every output file but the manifest (it holds timestamps); the model card names its own directory."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes().replace(str(path.resolve()).encode(), b"<out>")
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "streamq_manifest.json"
    }


def test_failure_after_some_shards_then_resume_matches_clean_run(tmp_path: Path, monkeypatch) -> None:
    src = make_model(tmp_path / "src")
    stream_requantize(src, tmp_path / "clean", progress=False, max_shard_size=OUT_SHARD)

    calls = fail_on_nth_shard(monkeypatch, 3)
    with pytest.raises(OSError, match="injected"):
        stream_requantize(src, tmp_path / "out", progress=False, max_shard_size=OUT_SHARD)
    manifest = json.loads((tmp_path / "out" / "streamq_manifest.json").read_text())
    assert manifest["status"] == "in_progress" and len(manifest["shards"]) == 2
    assert not (tmp_path / "out" / "config.json").exists()

    calls.clear()
    result = stream_requantize(src, tmp_path / "out", progress=False, max_shard_size=OUT_SHARD)
    shards = sorted(p.name for p in (tmp_path / "clean").glob("*.safetensors"))
    assert calls == shards[2:]  # the two finished shards are not made again
    assert result.shards_skipped == 2
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_iterator_closed_midway_resumes(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    run = iter_requantize(src, tmp_path / "out", progress=False, max_shard_size=OUT_SHARD)
    first = next(run)
    assert first.index == 1 and not first.skipped and first.committed
    run.close()  # like a process that stops between shards
    published = json.loads((tmp_path / "out" / "streamq_manifest.json").read_text())["shards"]
    assert first.name in published
    records = list(iter_requantize(src, tmp_path / "out", progress=False, max_shard_size=OUT_SHARD))
    assert {r.name for r in records if r.skipped} == set(published)
    assert len(published) < len(records) and [r.index for r in records] == sorted(r.index for r in records)
    assert len(load_tensors(tmp_path / "out")) > 0


def test_second_run_on_finished_output_is_a_no_op(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    stream_requantize(src, tmp_path / "out", progress=False)
    before = _files(tmp_path / "out")
    result = stream_requantize(src, tmp_path / "out", progress=False)
    assert result.shards_skipped == result.shards
    assert _files(tmp_path / "out") == before


def test_other_settings_against_existing_output(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    stream_requantize(src, tmp_path / "out", progress=False)
    with pytest.raises(streamq.ManifestMismatchError, match="overwrite"):
        stream_requantize(src, tmp_path / "out", quant_type="fp4", progress=False)
    stream_requantize(src, tmp_path / "out", quant_type="fp4", overwrite=True, progress=False)
    manifest = json.loads((tmp_path / "out" / "streamq_manifest.json").read_text())
    assert manifest["settings"]["quant_type"] == "fp4" and manifest["status"] == "done"
    assert any(k.endswith("bitsandbytes__fp4") for k in load_tensors(tmp_path / "out"))


def test_second_concurrent_run_on_a_local_output_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    first = iter_requantize(src, tmp_path / "out", progress=False)
    next(first)  # the first run holds the output
    with pytest.raises(streamq.ConcurrentRunError, match="another streamq run is using the work dir"):
        stream_requantize(src, tmp_path / "out", progress=False)  # the output's work folder is held
    with pytest.raises(streamq.ConcurrentRunError, match="another streamq run is writing"):
        stream_requantize(src, tmp_path / "out", progress=False, work_dir=tmp_path / "elsewhere")  # the output is locked
    list(first)  # and finishes undisturbed
    assert json.loads((tmp_path / "out" / "streamq_manifest.json").read_text())["status"] == "done"


def test_resume_refuses_to_mix_quantization_devices(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    run = iter_requantize(src, tmp_path / "out", progress=False, device="cpu")
    next(run)
    run.close()
    manifest_path = tmp_path / "out" / "streamq_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["device"] = "cuda"  # as if the first part ran on a GPU machine
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(streamq.ManifestMismatchError, match="quantization device 'cuda'"):
        stream_requantize(src, tmp_path / "out", progress=False, device="cpu")


def test_local_output_is_claimed_before_its_first_shard_lands(tmp_path: Path, monkeypatch) -> None:
    """A run that dies while placing its first shard (or half-way through writing the manifest) leaves
    a directory the next run recognises as its own and finishes, not one it calls foreign."""
    from streamq.publish import LocalSink

    src, out = make_model(tmp_path / "src"), tmp_path / "out"
    real_place = LocalSink._place

    def die_after_placing(self, local, name, keep_source=False):
        real_place(self, local, name, keep_source)
        raise KeyboardInterrupt  # as if killed before the manifest listing this shard was written

    monkeypatch.setattr(LocalSink, "_place", die_after_placing)
    with pytest.raises(KeyboardInterrupt):
        stream_requantize(src, out, progress=False)
    assert json.loads((out / "streamq_manifest.json").read_text())["shards"] == {}
    monkeypatch.undo()
    stream_requantize(src, out, progress=False)

    died_writing_manifest = tmp_path / "out2"
    died_writing_manifest.mkdir()
    (died_writing_manifest / "streamq_manifest.json.partial").write_text('{"sour')
    stream_requantize(src, died_writing_manifest, progress=False)

    clean = tmp_path / "clean"
    stream_requantize(src, clean, progress=False)
    assert _files(out) == _files(clean)
    assert _files(died_writing_manifest) == _files(clean)
