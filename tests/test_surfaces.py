"""A message that says what to do names the controls of the surface the user is on: the Python API, the CLI
or the web page, also when it is raised in one of the run's own threads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import HfApi

import streamq
from streamq import stream_requantize
from streamq.app.run import Conversion, RunProgress
from streamq.cli import main
from streamq.testing import Fault, LocalHub
from tiny_models import make_model

SPELLINGS = {"api": "pass overwrite=True", "cli": "pass --overwrite", "page": "tick “Overwrite an existing output”"}


@pytest.fixture()
def hub(tmp_path: Path):
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=make_model(tmp_path / "src"))
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, progress=False)  # an NF4 output
        yield hub


def others(surface: str) -> re.Pattern[str]:
    """Any other surface's spelling of the overwrite control."""
    marks = {"api": "overwrite=True", "cli": "--overwrite", "page": "tick “Overwrite"}
    return re.compile("|".join(re.escape(v) for k, v in marks.items() if k != surface))


def page_error(hub: LocalHub, tmp_path: Path, **conversion) -> str | None:
    run = RunProgress(Conversion("org/model", "me/out", endpoint=hub.endpoint, **conversion), tmp_path / "page-work").start()
    assert run.wait(120)
    return run.snapshot().error


def test_other_settings_against_an_output_name_each_surfaces_control(tmp_path: Path, hub: LocalHub, capsys) -> None:
    with pytest.raises(streamq.ManifestMismatchError) as api:
        stream_requantize("org/model", "me/out", endpoint=hub.endpoint, quant_type="fp4", progress=False)
    assert SPELLINGS["api"] in str(api.value) and not others("api").search(str(api.value))

    assert main(["requantize", "org/model", "me/out", "--endpoint", hub.endpoint, "--quant-type", "fp4"]) == 1
    cli = capsys.readouterr().err
    assert SPELLINGS["cli"] in cli and not others("cli").search(cli)

    page = page_error(hub, tmp_path, quant_type="fp4")
    assert page is not None and SPELLINGS["page"] in page and not others("page").search(page)
    # and the page has that control: ticked, the run starts over with the new settings
    assert page_error(hub, tmp_path, quant_type="fp4", overwrite=True) is None
    assert streamq.verify_output("me/out", endpoint=hub.endpoint).ok


def test_a_message_from_the_publish_thread_names_the_clis_controls(tmp_path: Path, hub: LocalHub, capsys) -> None:
    """The upload of an output shard, refused (403), fails in the run's publish thread."""
    hub.faults.add(Fault.status(403, method="PUT", path=r"^/storage/.*/me/other/", times=None))
    assert main(["requantize", "org/model", "me/other", "--endpoint", hub.endpoint]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot write to me/other (HTTP 403)" in err and "--token" in err and "token=" not in err, err
    assert len(err.splitlines()) == 1
