"""The work directory: where the default one lives, what a finished, failed or killed run leaves there, and
that a rerun finds it."""

from __future__ import annotations

import json
import os
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from streamq import stream_requantize, verify_output
from streamq.errors import ConcurrentRunError
from streamq.manifest import Manifest
from streamq.testing import LocalHub
from streamq.location import parse_location
from streamq.workdir import LOCK_NAME, SCRATCH, WorkDir, default_root, folder_for
from tiny_models import OUT_SHARD, fail_on_nth_shard, make_model

RUNNER = Path(__file__).with_name("crash_runner.py")


@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src"))
        yield hub


def run_cli(*args: str, die_at: str | None = None, nth: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), die_at or "before-download", str(nth if die_at else 10**9), "--", *args]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def everything_in(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_the_default_work_root_is_streamq_work_dir_else_the_temp_dirs_which_a_finished_run_removes(
    tmp_path: Path, hub: LocalHub, work_root: Path, monkeypatch
) -> None:
    assert default_root() == work_root
    monkeypatch.delenv("STREAMQ_WORK_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert default_root() == tmp_path / "tmp" / "streamq"
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    assert everything_in(tmp_path / "tmp") == []  # not even an empty streamq/


def test_a_finished_run_leaves_nothing_behind(tmp_path: Path, hub: LocalHub, work_root: Path) -> None:
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    assert everything_in(work_root) == []  # the output's folder is gone

    given = tmp_path / "given"
    given.mkdir()
    stream_requantize("org/model", "me/out2", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, work_dir=given)
    assert everything_in(given) == []  # the directory the user named is kept, as it was
    assert verify_output("me/out2", endpoint=hub.endpoint).ok


def test_a_failed_run_removes_its_scratch_and_keeps_only_what_a_rerun_uses(tmp_path: Path, hub: LocalHub, work_root: Path, monkeypatch) -> None:
    """Batched commits (commits_per_hour=4): when the 4th output shard fails, shards 2-3 are uploaded but not
    committed; the journal listing them is all that stays, and the rerun, which finds it, does not upload them again."""
    fail_on_nth_shard(monkeypatch, 4)
    hub.requests.clear()
    with pytest.raises(OSError):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, commits_per_hour=4, max_shard_size=OUT_SHARD)
    [folder] = work_root.iterdir()
    assert folder.name.startswith("me--out-")
    assert sorted(p.name for p in folder.iterdir()) == sorted([LOCK_NAME, "uploaded-not-committed.json"])
    monkeypatch.undo()  # the failure injected above, and the test's own root: put the root back
    monkeypatch.setenv("STREAMQ_WORK_DIR", str(work_root))

    uploaded = hub.requests.count("PUT")
    hub.requests.clear()
    stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, commits_per_hour=4, max_shard_size=OUT_SHARD)
    assert hub.requests.count("PUT") == 7 - uploaded  # the journal's shards were committed, not sent again
    assert everything_in(work_root) == []
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_kill_9_with_the_default_work_dir_then_the_same_command_finds_it(tmp_path: Path, hub: LocalHub, work_root: Path) -> None:
    """Batched commits: the killed run's shards uploaded since the last commit are journaled in the default
    folder; the same command, with no --work-dir, finds the journal and commits them instead of sending them again."""
    args = ("requantize", "org/model", "me/out", "--endpoint", hub.endpoint, "--max-shard-size", OUT_SHARD, "--commits-per-hour", "4")
    killed = run_cli(*args, die_at="after-write", nth=5)  # the 5th output shard written: 2-4 uploaded, not committed
    assert killed.returncode == -9, killed.stderr
    [folder] = work_root.iterdir()
    journal = json.loads((folder / "uploaded-not-committed.json").read_text())["shards"]
    assert journal and {"out", "in"} & {p.name for p in folder.iterdir()}  # resumable state, and the dead run's bulk
    committed = Manifest.from_json(Path(hf_hub_download("me/out", "streamq_manifest.json", endpoint=hub.endpoint, local_dir=tmp_path / "m")).read_text())
    known = set(committed.shards) | set(committed.pending) | set(journal)
    held = hub.objects("me/out")
    assert {entry["output_sha256"] for entry in journal.values()} <= held

    hub.requests.clear()
    done = run_cli(*args, "--json")
    assert done.returncode == 0, done.stderr
    final = Manifest.from_json(Path(hf_hub_download("me/out", "streamq_manifest.json", endpoint=hub.endpoint, local_dir=tmp_path / "m2")).read_text())
    assert len(final.shards) == 7 and known <= set(final.shards)
    # Besides the journal's shards, the killed run may have finished uploading one it had no time to journal: the
    # Hub holds it and huggingface_hub's LFS batch skips it. Only shards the Hub does not hold are sent.
    missing = {name for name, entry in final.shards.items() if entry.output_sha256 not in held}
    assert not missing & known
    assert hub.requests.count("PUT") == len(missing)  # the journal's shards were committed, not sent again
    assert everything_in(work_root) == []
    assert verify_output("me/out", endpoint=hub.endpoint).ok


def test_a_later_run_of_another_output_clears_a_dead_runs_bulk(tmp_path: Path, hub: LocalHub, work_root: Path) -> None:
    killed = run_cli("requantize", "org/model", "me/dead", "--endpoint", hub.endpoint, "--max-shard-size", OUT_SHARD, die_at="during-quantize", nth=5)
    assert killed.returncode == -9, killed.stderr
    [dead] = work_root.iterdir()
    assert any((dead / name).exists() for name in ("in", "out"))

    stream_requantize("org/model", "me/other", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    # the dead run's bulk is gone; its folder stays only if its journal lists a shard uploaded and not committed
    left = everything_in(work_root)
    journal = dead / "uploaded-not-committed.json"
    if journal.exists() and json.loads(journal.read_text())["shards"]:
        assert left == sorted([dead.name, f"{dead.name}/{LOCK_NAME}", f"{dead.name}/{journal.name}"])
    else:
        assert left == []


def test_a_journal_write_cut_by_a_kill_is_cleared_with_the_dead_runs_bulk(hub: LocalHub, work_root: Path) -> None:
    """kill -9 while the journal's next version is written leaves its `.partial` (the journal itself is
    replaced only by a whole one): never trusted, so cleared like the rest of a dead run's bulk."""
    dead = folder_for(work_root, parse_location("me/dead"), hub.endpoint)
    dead.mkdir(parents=True)
    (dead / LOCK_NAME).touch()  # no process holds it: a dead run's
    (dead / "uploaded-not-committed.json.partial").write_text('{"identity": {}, "shards": {"model-00001')
    stream_requantize("org/model", "me/other", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD)
    assert everything_in(work_root) == []


def test_a_live_runs_folder_is_neither_shared_nor_cleared_and_a_users_files_are_not_touched(tmp_path: Path, hub: LocalHub) -> None:
    given = tmp_path / "scratch"
    (given / "out").mkdir(parents=True)
    (given / "out" / "mine.txt").write_text("the user's own")  # a directory the user names may hold anything
    live = WorkDir.open(folder_for(given, parse_location("me/out"), hub.endpoint))  # as a running run holds it
    (live.path / "in").mkdir()
    (live.path / "in" / "segment").write_bytes(b"x" * 100)
    with pytest.raises(ConcurrentRunError, match="another streamq run is using the work dir .*me--out-.*; let it finish"):
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, work_dir=given)
    assert (live.path / "in" / "segment").exists()

    other = WorkDir.open(given / "a-live-output")  # while another output's run clears dead folders
    (other.path / "out").mkdir()
    stream_requantize("org/model", "me/other", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, work_dir=given)
    assert (other.path / "out").exists() and (live.path / "in" / "segment").exists()
    other.close(finished=True)
    live.close(finished=False)
    assert everything_in(given) == ["out", "out/mine.txt"]


def test_scratch_names_cover_what_a_run_writes(tmp_path: Path, hub: LocalHub) -> None:
    """Everything a run puts in its work folder is either scratch, the lock or the journal: sampled during a run."""
    seen: set[str] = set()
    import streamq.schedule as schedule

    real = schedule.Scheduler.run

    def run(self, todo):
        for record in real(self, todo):
            seen.update(p.name for p in self.work.iterdir())
            yield record

    mp = pytest.MonkeyPatch()
    mp.setattr(schedule.Scheduler, "run", run)
    try:
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False, max_shard_size=OUT_SHARD, commits_per_hour=4)
    finally:
        mp.undo()
    assert seen and seen <= set(SCRATCH) | {LOCK_NAME, "uploaded-not-committed.json", "uploaded-not-committed.json.partial"}
