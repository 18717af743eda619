"""Command-line conventions: global options anywhere, --version, offline mode said at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import streamq
from streamq import stream_requantize
from streamq.cli import build_parser, main
from streamq.retry import transient_delay
from tiny_models import make_model


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["requantize", "a/b", "./c"], 0),
        (["-v", "requantize", "a/b", "./c"], 1),
        (["requantize", "a/b", "./c", "-v"], 1),
        (["requantize", "a/b", "./c", "-vv"], 2),
        (["plan", "a/b", "--verbose"], 1),
        (["status", "a/b", "-v"], 1),
        (["verify", "a/b", "-v"], 1),
    ],
)
def test_verbose_is_accepted_before_and_after_the_subcommand(argv: list[str], verbose: int) -> None:
    assert build_parser().parse_args(argv).verbose == verbose


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"streamq {streamq.__version__}"


def test_offline_mode_fails_at_once_with_what_to_do(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    run = subprocess.run(
        [sys.executable, "-m", "streamq", "requantize", "org/model", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "streamq: error: offline mode is on (HF_HUB_OFFLINE=1), so org/model on the Hub cannot be reached; "
        "unset HF_HUB_OFFLINE, or use local directories"
    )
    assert "retrying" not in run.stderr


def test_offline_mode_names_the_output_repo_and_local_runs_still_work(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    src = make_model(tmp_path / "src")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(streamq.StreamqError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\), so me/out on the Hub"):
        stream_requantize(src, "me/out", progress=False)
    stream_requantize(src, tmp_path / "out", progress=False)  # local to local needs no Hub
    assert (tmp_path / "out" / "config.json").exists()


def test_offline_refusals_are_not_retried() -> None:
    from huggingface_hub.errors import OfflineModeIsEnabled

    assert transient_delay(OfflineModeIsEnabled("offline"), 0) is None
    assert transient_delay(ConnectionError("reset"), 0) is not None


def test_v_logs_the_run_and_vv_also_every_http_request(tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    from streamq.testing import LocalHub

    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src"))
        env = {**os.environ, "HF_HUB_DISABLE_XET": "1"}
        runs = {
            flag: subprocess.run([sys.executable, "-m", "streamq", "requantize", "org/model", str(tmp_path / flag), "--endpoint", hub.endpoint,
                                  flag], capture_output=True, text=True, env=env, timeout=300)
            for flag in ("-v", "-vv")
        }
    assert all(run.returncode == 0 for run in runs.values())
    http = ("HTTP Request", "httpcore", "httpx")
    assert "INFO streamq" in runs["-v"].stderr and not any(h in runs["-v"].stderr for h in http)
    assert any(h in runs["-vv"].stderr for h in http)


def test_a_read_only_work_dir_and_a_missing_output_are_one_line_errors(tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(read_only)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        run = subprocess.run([sys.executable, "-m", "streamq", "requantize", str(make_model(tmp_path / "src")), str(tmp_path / "out"),
                              "--work-dir", str(read_only)], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert f"cannot write to the work dir {read_only}:" in run.stderr and "Read-only file system" in run.stderr and "--work-dir" in run.stderr
    missing = subprocess.run([sys.executable, "-m", "streamq", "verify", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr == f"streamq: error: output directory {tmp_path / 'missing'} does not exist; name the directory a run wrote\n"


def test_a_missing_int4_extra_is_said_at_once_and_creates_nothing(tmp_path: Path) -> None:
    """Without compressed-tensors: one line naming the extra, before any planning warning or output folder."""
    src, out = make_model(tmp_path / "src"), tmp_path / "out"
    code = "import sys; sys.modules['compressed_tensors'] = None; from streamq.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "requantize", str(src), str(out), "--quant-type", "int4", "--blocksize", "32"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr == "streamq: error: quant_type int4 writes with the compressed-tensors package: pip install 'streamq[int4]'\n"
    assert not out.exists()
