"""kill -9 at each named point of the pipeline, run again, and get the output of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamq import stream_requantize
from tiny_models import OUT_SHARD, header_reads, make_model, work_folder

RUNNER = Path(__file__).with_name("crash_runner.py")
# Each case runs the CLI twice in fresh processes (~15 s): the everyday command (-m "not slow") keeps one
# local and one Hub point, CI runs them all.
slow = pytest.mark.slow


def run_cli(*args: str, die_at: str | None = None, nth: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), die_at or "before-download", str(nth if die_at else 10**9), "--", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def output_files(path: Path) -> dict[str, bytes]:
    """Every output file but the manifest (timestamps) and the lock; the card names its own directory."""
    return {
        p.relative_to(path).as_posix(): p.read_bytes().replace(str(path.resolve()).encode(), b"<out>")
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in ("streamq_manifest.json", ".streamq.lock")
    }


@pytest.fixture(scope="module")
def model_and_clean_output(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("crash")
    src = make_model(root / "src")
    stream_requantize(src, root / "clean", progress=False, max_shard_size=OUT_SHARD)
    return src, output_files(root / "clean")


@pytest.mark.parametrize(
    "point,nth",
    [
        pytest.param("before-local-read", 3, marks=slow),
        ("during-quantize", 5),
        pytest.param("after-write", 2, marks=slow),
        pytest.param("before-local-publish", 4, marks=slow),
        pytest.param("after-local-publish", 1, marks=slow),
        pytest.param("during-local-finalize", 3, marks=slow),
    ],
)
def test_kill_9_then_rerun_local(tmp_path: Path, model_and_clean_output, point: str, nth: int) -> None:
    src, clean = model_and_clean_output
    out, work = tmp_path / "out", tmp_path / "work"
    killed = run_cli("requantize", str(src), str(out), "--work-dir", str(work), "--max-shard-size", OUT_SHARD, die_at=point, nth=nth)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "model.safetensors.index.json").exists() or point == "during-local-finalize"

    done = run_cli("requantize", str(src), str(out), "--work-dir", str(work), "--max-shard-size", OUT_SHARD, "--json")
    assert done.returncode == 0, done.stderr
    assert output_files(out) == clean
    assert not work.exists() or not any(work.iterdir())  # the finished run removed its work folder


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """A model on an emulated Hub that outlives the killed clients, with a clean reference conversion."""
    from huggingface_hub import HfApi

    from streamq.testing import LocalHub

    root = tmp_path_factory.mktemp("hubcrash")
    src = make_model(root / "src")
    with LocalHub(root / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=src)
        stream_requantize("org/model", "me/clean", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
        yield hub, api, download_files(api, "me/clean", root / "clean")


def download_files(api, repo_id: str, dest: Path) -> dict[str, bytes]:
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(repo_id, endpoint=api.endpoint, local_dir=dest))
    return {
        name: data.replace(repo_id.encode(), b"<repo>")
        for name, data in output_files(path).items()
        if not name.startswith(".cache/")
    }


HUB_POINTS = [
    pytest.param("before-download", 3, marks=slow),
    pytest.param("after-download", 2, marks=slow),
    pytest.param("during-quantize", 9, marks=slow),
    pytest.param("after-write", 4, marks=slow),
    pytest.param("during-upload", 2, marks=slow),
    ("between-upload-and-commit", 3),
    pytest.param("after-commit", 2, marks=slow),
    pytest.param("during-final-commit", 1, marks=slow),
]


@pytest.mark.parametrize("point,nth", HUB_POINTS)
def test_kill_9_then_rerun_hub(tmp_path: Path, hub_model, point: str, nth: int) -> None:
    import json

    hub, api, clean = hub_model
    repo = f"me/{point}"
    args = ("requantize", "org/model", repo, "--endpoint", hub.endpoint, "--work-dir", str(tmp_path / "work"), "--max-shard-size", OUT_SHARD)
    killed = run_cli(*args, die_at=point, nth=nth, env={"HF_HUB_DISABLE_XET": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    files = api.list_repo_files(repo) if api.repo_exists(repo) else []
    assert "config.json" not in files  # never looks finished after a crash
    committed = set()
    if "streamq_manifest.json" in files:
        manifest = api.hf_hub_download(repo, "streamq_manifest.json", local_dir=tmp_path / "m")
        recorded = json.loads(Path(manifest).read_text())
        committed = set(recorded["shards"]) | set(recorded["pending"])

    journal = work_folder(tmp_path / "work") / "uploaded-not-committed.json"  # uploaded, not committed: taken up, not redone
    journaled = set(json.loads(journal.read_text())["shards"]) - committed if journal.exists() else set()

    hub.requests.clear()
    done = run_cli(*args, env={"HF_HUB_DISABLE_XET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    # the source is streamed once at most (from the last hash checkpoint a recorded shard left; in files
    # this small that can be a first file's start: what a kill costs in a large file is measured in
    # test_any_shard_size.py)
    sizes = {s.rfilename: s.size for s in api.model_info("org/model", files_metadata=True).siblings if s.rfilename.endswith(".safetensors")}
    streamed = hub.requests.sent(r"^/storage/") - header_reads(sizes.values())
    assert 0 <= streamed <= sum(sizes.values())
    if point == "between-upload-and-commit":
        assert journaled  # the shard whose commit the kill prevented
    assert download_files(api, repo, tmp_path / "out") == clean
