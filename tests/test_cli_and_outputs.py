"""What a user sees: carried files, model card, plan, verify, status and the CLI around them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import streamq
from streamq import plan_requantize, read_status, stream_requantize, verify_output
from streamq.cli import main
from tiny_models import OUT_SHARD, make_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("out")
    src = make_model(root / "src")
    stream_requantize(src, root / "out", progress=False, max_shard_size=OUT_SHARD)
    return src, root / "out"


def test_non_weight_files_carried_unchanged_and_weights_not(converted) -> None:
    src, out = converted
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert (out / "nested" / "notes.txt").read_bytes() == (src / "nested" / "notes.txt").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(names) > 1 and names == [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]


def test_model_card_metadata_settings_and_original_text(converted) -> None:
    from huggingface_hub import ModelCard

    _, out = converted
    card = ModelCard((out / "README.md").read_text())
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"  # carried from the source card
    assert {"bitsandbytes", "4-bit", "nf4"} <= set(card.data.tags)
    assert "| quant_type | `nf4` |" in card.text and "Original card text." in card.text
    assert f'from_pretrained("{out.resolve()}")' in card.text


def test_plan_reads_headers_and_predicts_sizes(converted) -> None:
    src, out = converted
    plan = plan_requantize(src, max_shard_size=OUT_SHARD)
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert [o.name for o in plan.outputs] == sorted(manifest["shards"])
    for output in plan.outputs:
        actual = manifest["shards"][output.name]["output_size"]
        assert actual <= output.expected_size <= actual * 1.2 + 4096
    quantized = {k for k, r in plan.rules.items() if r.action == "quantize"}
    assert "model.layers.0.self_attn.q_proj.weight" in quantized and "lm_head.weight" not in quantized


def test_verify_accepts_a_good_output_and_loads_it(converted) -> None:
    _, out = converted
    report = verify_output(out, load=True)
    assert report.ok, report.problems
    assert report.loaded is True and report.checked_files == len(list(out.glob("*.safetensors")))


def test_verify_finds_a_tampered_shard(tmp_path: Path, converted) -> None:
    import shutil

    _, out = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted(copy.glob("*.safetensors"))[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_output(copy)
    assert not report.ok and any(victim.name in p and "sha256" in p for p in report.problems)
    assert main(["verify", str(copy)]) == 3


def test_status_and_cli_json(converted, capsys) -> None:
    _, out = converted
    manifest = read_status(out)
    assert manifest.status == "done" and len(manifest.shards) == len(list(out.glob("*.safetensors")))
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "done"
    assert main(["plan", str(out.parent / "src"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"]["quantize"] > 0 and summary["compression_ratio"] > 1
    assert main(["requantize", str(out.parent / "src"), str(out), "--dry-run"]) == 0
    assert "disk needed in work_dir" in capsys.readouterr().out


def test_cli_requantize_runs_and_reports(tmp_path: Path, converted, capsys) -> None:
    src, _ = converted
    assert main(["requantize", str(src), str(tmp_path / "cli-out"), "--quant-type", "fp4", "--max-shard-size", OUT_SHARD, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shards"] == len(list((tmp_path / "cli-out").glob("*.safetensors"))) > 1 and result["ratio"] > 1
    assert read_status(tmp_path / "cli-out").settings["quant_type"] == "fp4"


def test_a_cli_run_prints_its_summary_and_nothing_else(tmp_path: Path, converted) -> None:
    """In a fresh process, as a user runs it: no library noise on stderr (bitsandbytes warns at import on some CPUs)."""
    src, _ = converted
    run = subprocess.run(
        [sys.executable, "-m", "streamq", "requantize", str(src), str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "shards" in run.stdout and "quantized" in run.stdout


def test_help_shows_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "streamq requantize" in capsys.readouterr().out


def test_status_of_a_non_streamq_directory(tmp_path: Path) -> None:
    with pytest.raises(streamq.StreamqError, match="not written by streamq"):
        read_status(tmp_path)


def test_a_finished_output_run_again_converts_nothing_and_says_so(converted, capsys) -> None:
    src, out = converted
    assert main(["requantize", str(src), str(out), "--max-shard-size", OUT_SHARD, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "already done" in printed and "(0.0 MB/s of input converted by this run)" in printed


def test_status_shows_only_the_settings_of_the_output_format() -> None:
    from streamq.manifest import Manifest
    from streamq.report import format_status

    settings = {"quant_type": "int4", "blocksize": 32, "double_quant": True, "compute_dtype": "bfloat16", "skip_modules": None}
    int4 = format_status(Manifest("org/model", None, settings, "cpu", "0.1.0"))
    assert "blocksize" in int4 and "double_quant" not in int4 and "compute_dtype" not in int4
    nf4 = format_status(Manifest("org/model", None, {**settings, "quant_type": "nf4"}, "cpu", "0.1.0"))
    assert "double_quant" in nf4 and "compute_dtype" in nf4
