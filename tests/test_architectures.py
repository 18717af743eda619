"""Every architecture transformers can quantize, byte for byte (GitHub issue 6).

For each tiny random checkpoint in arch_cases.CASES: the same key set, the same bytes for every
tensor and the same config.json as transformers' own `from_pretrained(load_in_4bit)` +
`save_pretrained`, and the same outputs once streamq's checkpoint is loaded back. Each case is
converted once per session; the two tests read the same conversion.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import streamq
from arch_cases import CASES, ArchCase, Conversion, convert, make_checkpoint
from streamq import stream_requantize
from tiny_models import byte_mismatches, load_tensors, make_model

_conversions: dict[str, Conversion] = {}


def _case_id(case: ArchCase) -> str:
    return re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")


@pytest.fixture(scope="module")
def arch_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arch")


def _converted(case: ArchCase, work: Path) -> Conversion:
    if case.name not in _conversions:
        _conversions[case.name] = convert(case, work / _case_id(case))
    return _conversions[case.name]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_checkpoint_and_config_match_transformers(case: ArchCase, arch_work: Path) -> None:
    conversion = _converted(case, arch_work)
    assert conversion.checkpoint_differences() == {
        "only in transformers' save": [],
        "only in streamq's output": [],
        "different bytes": [],
    }
    ours, ref = conversion.configs()
    assert ours["quantization_config"] == ref["quantization_config"]
    assert ours == ref


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.outputs_xfail)) if c.outputs_xfail else c for c in CASES],
    ids=_case_id,
)
def test_outputs_match_transformers(case: ArchCase, arch_work: Path) -> None:
    ours, ref = _converted(case, arch_work).outputs()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["t5 with tied copies of the embedding", "gemma2 tied in config, lm_head stored with other values"])
def test_tied_weights_stored_twice_are_compared_from_a_hub_source(
    tmp_path: Path, arch_work: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whether transformers ties a pair stored twice depends on values: streamq reads them from the Hub too."""
    from huggingface_hub import HfApi

    from streamq.testing import LocalHub

    caplog.set_level(logging.INFO, logger="streamq.plan")
    conversion = _converted(next(c for c in CASES if c.name == name), arch_work)
    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/model")
        api.upload_folder(repo_id="org/model", folder_path=conversion.src)
        stream_requantize("org/model", tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert "to compare tied weights" in caplog.text
    assert byte_mismatches(load_tensors(tmp_path / "out"), load_tensors(conversion.ref)) == []


def test_base_checkpoint_into_untied_head_is_refused(tmp_path: Path) -> None:
    """A LlamaModel checkpoint loaded as LlamaForCausalLM lacks lm_head: transformers would make it up at random."""
    src = make_model(tmp_path / "src", "llama")
    tensors = {k.removeprefix("model."): v for k, v in load_tensors(src).items() if k != "lm_head.weight"}
    for old in src.glob("model*.safetensors*"):
        old.unlink()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((src / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(streamq.UnsupportedModelError, match=r"lacks 1 parameter\(s\).*lm_head.weight"):
        stream_requantize(src, tmp_path / "out", progress=False)


def test_quantized_layers_split_from_one_tensor_are_refused(tmp_path: Path) -> None:
    """transformers splits nomic-bert's Wqkv into q/k/v Linear4bit, then saves their packed pieces merged: unloadable."""
    case = next(c for c in CASES if c.name.startswith("nomic-bert"))
    src = make_checkpoint(replace(case, skip_modules=None), tmp_path / "src")
    with pytest.raises(streamq.UnsupportedModelError, match=r"Wqkv.*skip_modules=\['self_attn.k_proj', 'self_attn.q_proj', 'self_attn.v_proj'\]"):
        stream_requantize(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "field,quantization_config,named",
    [
        ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}, "gptq"),
        ("quantization_config", {"quant_method": "awq", "bits": 4}, "awq"),
        ("quantization_config", {"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
        ("quantization_config", {"quant_method": "compressed-tensors", "format": "float-quantized"}, "compressed-tensors"),
        ("compression_config", {"quant_method": "compressed-tensors", "format": "pack-quantized"}, "compressed-tensors"),
        ("quantization_config", {"bits": 4, "group_size": 128}, "unknown method; its keys: bits, group_size"),
    ],
)
def test_already_quantized_config_is_refused_naming_what_it_found(
    tmp_path: Path, field: str, quantization_config: dict, named: str
) -> None:
    src = make_model(tmp_path / "src", "llama", max_shard_size="50GB")
    config = json.loads((src / "config.json").read_text())
    config[field] = quantization_config
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(streamq.AlreadyQuantizedError, match=rf"already quantized \({re.escape(named)}\) according to {field}"):
        stream_requantize(src, tmp_path / "out", progress=False)
