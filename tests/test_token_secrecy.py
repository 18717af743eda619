"""The token never appears in output: not in logs, CLI output, errors, the manifest or the model card."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from streamq import stream_requantize
from streamq.cli import main
from streamq.testing import Fault, LocalHub
from tiny_models import make_model

SENTINEL = "hf_SENTINELtoken0123456789abcdefXYZ"


def test_sentinel_token_is_never_written_anywhere(tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    import streamq.retry

    monkeypatch.setattr(streamq.retry, "BASE_DELAY", 0.01)
    caplog.set_level(logging.DEBUG)
    tokens = {SENTINEL: {"write": ["*"]}, "hf_other": {"read": ["*"]}}
    with LocalHub(tmp_path / "hub", tokens=tokens) as hub:
        api = HfApi(endpoint=hub.endpoint, token=SENTINEL)
        api.create_repo("org/model", private=True)
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src"))
        hub.faults.add(Fault.status(503, method="POST", path=r"/commit/", times=2))  # retries log warnings

        # a successful run, through the CLI, with -vv logging
        assert main(["-vv", "requantize", "org/model", "me/out", "--endpoint", hub.endpoint, "--token", SENTINEL, "--json"]) == 0
        # failures: a permanent commit error, a missing repo, a write without rights
        hub.faults.add(Fault.status(500, method="POST", path=r"/commit/", times=None))
        errors = []
        for src, dst, token in (("org/model", "me/out2", SENTINEL), ("org/missing", "me/out3", SENTINEL), ("org/model", "me/x", "hf_other")):
            with pytest.raises(streamq.StreamqError) as info:
                stream_requantize(src, dst, endpoint=hub.endpoint, token=token, progress=False)
            errors.append(info.value)
        hub.faults.clear()
        assert main(["requantize", "org/model", "me/out2", "--endpoint", hub.endpoint, "--token", "hf_wrong_" + SENTINEL[3:]]) == 1
        out = Path(snapshot_download("me/out", endpoint=hub.endpoint, token=SENTINEL, local_dir=tmp_path / "dl"))

    captured = capsys.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "logs": caplog.text}
    texts |= {f"error {i}": f"{e!s} {e.__cause__!s}" for i, e in enumerate(errors)}
    texts |= {f"file {p.name}": p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()}
    assert "streamq_manifest.json" in {name.removeprefix("file ") for name in texts}
    for where, text in texts.items():
        assert SENTINEL not in text and SENTINEL[3:] not in text, f"token leaked in {where}"
