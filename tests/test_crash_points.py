"""kill -9 at each named point of the pipeline, run again, and get the output of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamq import stream_requantize
from tiny_models import make_model

RUNNER = Path(__file__).with_name("crash_runner.py")


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
    stream_requantize(src, root / "clean", progress=False)
    return src, output_files(root / "clean")


@pytest.mark.parametrize(
    "point,nth",
    [
        ("before-local-read", 3),
        ("during-quantize", 5),
        ("after-write", 2),
        ("before-local-publish", 4),
        ("after-local-publish", 1),
        ("during-local-finalize", 3),
    ],
)
def test_kill_9_then_rerun_local(tmp_path: Path, model_and_clean_output, point: str, nth: int) -> None:
    src, clean = model_and_clean_output
    out, work = tmp_path / "out", tmp_path / "work"
    killed = run_cli("requantize", str(src), str(out), "--work-dir", str(work), die_at=point, nth=nth)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "model.safetensors.index.json").exists() or point == "during-local-finalize"

    done = run_cli("requantize", str(src), str(out), "--work-dir", str(work), "--json")
    assert done.returncode == 0, done.stderr
    assert output_files(out) == clean
    assert not list((work / "out").glob("*")) if (work / "out").exists() else True
