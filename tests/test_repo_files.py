"""Every file of the source repo gets a decision: converted, rewritten, carried unchanged or left out (said)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download

from streamq import plan_requantize, stream_requantize
from streamq.cli import main
from streamq.inventory import classify_files
from streamq.testing import LocalHub
from tiny_models import bnb_config, make_model

MODULES = json.dumps([
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
])

CASES = {  # file -> (action, a word of its reason)
    "model-00001-of-00002.safetensors": ("convert", "shard"),
    "model-00002-of-00002.safetensors": ("convert", "shard"),
    "model.safetensors": ("leave_out", "stale"),
    "model.safetensors.index.json": ("rewrite", "rewritten"),
    "config.json": ("rewrite", "quantization_config"),
    "README.md": ("rewrite", "model card"),
    ".gitattributes": ("rewrite", "own"),
    "tokenizer.json": ("carry", "unchanged"),
    "modules.json": ("carry", "unchanged"),
    "1_Pooling/config.json": ("carry", "unchanged"),
    "2_Dense/model.safetensors": ("carry", "sentence-transformers module 2_Dense"),
    "2_Dense/pytorch_model.bin": ("leave_out", "copy in another format"),
    "pytorch_model.bin": ("leave_out", "another format"),
    "pytorch_model.bin.index.json": ("leave_out", "another format"),
    "consolidated.safetensors": ("leave_out", "another format"),
    "original/consolidated.00.pth": ("leave_out", "original/"),
    "original/params.json": ("carry", "unchanged"),
    "onnx/model.onnx": ("leave_out", "onnx/"),
    "model-Q4_K_M.gguf": ("leave_out", "GGUF"),
    "tf_model.h5": ("leave_out", "another format"),
    "optimizer.pt": ("leave_out", "training state"),
    "training_args.bin": ("leave_out", "training state"),
    "adapter_model.safetensors": ("carry", "outside the checkpoint"),
    "extra_head/weights.pt": ("carry", "never opened"),
}


def test_each_file_gets_its_decision_and_reason() -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    decisions = classify_files(sorted(CASES), shards, {"modules.json": MODULES}.__getitem__)
    wrong = {name: (d.action, d.reason) for name, d in decisions.items() if d.action != CASES[name][0] or CASES[name][1] not in d.reason}
    assert wrong == {}
    assert set(decisions) == set(CASES)


def test_module_folders_without_modules_json_are_still_carried() -> None:
    decisions = classify_files(["config.json", "model.safetensors", "2_Dense/model.safetensors"], ["model.safetensors"], lambda name: "")
    assert decisions["2_Dense/model.safetensors"].action == "carry"


def _sentence_transformer(root: Path) -> Path:
    """A tiny sentence-transformers model (BERT, mean pooling, a Dense head with its own safetensors, Normalize)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = root / "bert"
    bert.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "cat"] + [f"w{i}" for i in range(90)]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    BertModel(config).to(torch.bfloat16).save_pretrained(bert)
    BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    modules = [Transformer(str(bert)), Pooling(64), Dense(64, 32), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "st"))
    (root / "st" / "onnx").mkdir()
    (root / "st" / "onnx" / "model.onnx").write_bytes(b"\x08\x07 not a real onnx file, never read")
    return root / "st"


@pytest.fixture(scope="module")
def st_model(tmp_path_factory) -> Path:
    return _sentence_transformer(tmp_path_factory.mktemp("st"))


def test_sentence_transformer_keeps_its_dense_module_and_loads(tmp_path: Path, st_model: Path) -> None:
    """The Dense head's own weights reach the output; sentence-transformers loads it and embeds exactly as
    the model it quantizes in memory from the source."""
    from sentence_transformers import SentenceTransformer

    with LocalHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token="hf_test")
        api.create_repo("org/st")
        api.upload_folder(repo_id="org/st", folder_path=st_model)
        stream_requantize("org/st", "me/st-nf4", endpoint=hub.endpoint, token="hf_test", progress=False)
        out = Path(snapshot_download("me/st-nf4", local_dir=tmp_path / "out", endpoint=hub.endpoint, token="hf_test"))

    assert (out / "2_Dense" / "model.safetensors").read_bytes() == (st_model / "2_Dense" / "model.safetensors").read_bytes()
    assert not (out / "onnx").exists()
    card = (out / "README.md").read_text()
    assert "`onnx/model.onnx`: the same model in another format" in card
    sentences = ["hello world", "the cat"]
    ref = SentenceTransformer(str(st_model), device="cpu", model_kwargs={"quantization_config": bnb_config()})
    ours = SentenceTransformer(str(out), device="cpu")
    assert type(ours[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    assert torch.equal(ours.encode(sentences, convert_to_tensor=True), ref.encode(sentences, convert_to_tensor=True))


def test_plan_lists_every_file_with_its_reason(st_model: Path, capsys) -> None:
    assert main(["plan", str(st_model)]) == 0
    text = capsys.readouterr().out
    assert "carry     2_Dense/model.safetensors  (weights of the sentence-transformers module 2_Dense" in text
    assert "leave_out onnx/model.onnx  (the same model in another format (onnx/)" in text
    assert "convert   model.safetensors" in text
    assert "two output shards; a local source is read in place" in text


def test_left_out_files_are_listed_in_the_model_card_and_not_published(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"not opened")
    (src / "optimizer.pt").write_bytes(b"not opened")
    shutil.copy(src / "config.json", src / "original" / "params.json")
    plan = plan_requantize(src)
    assert set(plan.left_out) == {"original/consolidated.00.pth", "optimizer.pt"}
    stream_requantize(src, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert not (out / "original" / "consolidated.00.pth").exists() and not (out / "optimizer.pt").exists()
    assert (out / "original" / "params.json").read_bytes() == (src / "original" / "params.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "- `optimizer.pt`: training state, not part of the model" in card
    assert "- `original/consolidated.00.pth`: the same model in another format (original/)" in card
