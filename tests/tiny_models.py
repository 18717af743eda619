"""Tiny random transformers models, and transformers' own 4-bit save of them as the reference."""

from __future__ import annotations

import glob
from pathlib import Path

import torch
from safetensors import safe_open

FAMILIES = {
    "llama": lambda: __import__("transformers").LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "gemma": lambda: __import__("transformers").Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
    ),
    # weights of 64-512 KB, above what Ray passes inline: the cluster tests' model
    "llama_wide": lambda: __import__("transformers").LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    # MLP weights of 2.2 M values, whose 34816 absmax values torch averages on several threads when it has them (in
    # float32, the bits of that mean depend on how many)
    "llama_long_mlp": lambda: __import__("transformers").LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=8704, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "qwen": lambda: __import__("transformers").Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
}


# Output shards of tiny models: small enough that a test model gives several (the default is 1GB).
OUT_SHARD = "25KB"  # the llama test model: 7 output shards, as many as its source files


def make_model(path: Path, family: str = "llama", dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "40KB", seed: int = 0) -> Path:
    """Save a random model of `family` in `dtype`, sharded so that tiny models still have several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (path / "nested").mkdir()
    (path / "nested" / "notes.txt").write_text("carried over unchanged\n")
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny test model\n\nOriginal card text.\n")
    return path


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype
    )


INPUT_IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 64]])


def reference(src: Path, out: Path, **config) -> torch.Tensor:
    """transformers' in-memory 4-bit model of `src`: save it to `out` (before any forward pass), return its logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_config(**config), device_map="cpu")
    model.save_pretrained(out)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def logits_of(path: Path | str, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(glob.glob(str(path / "*.safetensors"))):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def byte_mismatches(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose dtype, shape or raw bytes differ (or that only one side has)."""
    bad = sorted(set(ours) ^ set(ref))
    for key in sorted(set(ours) & set(ref)):
        a, b = ours[key], ref[key]
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        if not same:
            bad.append(key)
    return bad


def header_reads(sizes) -> int:
    """Bytes every run reads of the source's weight files while planning, whatever it converts:
    huggingface_hub's header read (the first 100,001 bytes of each) and streamq's 8-byte header length."""
    return sum(min(size, 100_001) + 8 for size in sizes)


_PEAK_RSS = """
import resource, sys
from streamq.cli import main
code = main(sys.argv[1:])
print("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
sys.exit(code)
"""


def peak_rss(*cli_args: str, env: dict | None = None) -> int:
    """The peak resident memory of `streamq CLI_ARGS` run in a process of its own, in bytes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cli_args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stderr.rsplit("VmHWM", 1)[1].split()[0])


def fail_on_nth_shard(monkeypatch, n: int, error: Exception | None = None) -> list[str]:
    """Make the pipeline raise `error` (OSError by default) when it starts writing its n-th output shard
    (once); returns the names of the output shards it started, so a test can check what a resumed run redid."""
    import streamq.convert as convert

    real, calls, fired = convert.SafetensorsWriter, [], []

    class Failing(real):
        def __init__(self, path, *args, **kwargs):
            calls.append(path.name)
            if len(calls) == n and not fired:
                fired.append(path.name)
                raise error or OSError("injected failure")
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(convert, "SafetensorsWriter", Failing)
    return calls


def work_folder(root: Path) -> Path:
    """The output's work folder a run made under `root` (its work_dir), or where it would be if there is none."""
    folders = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    assert len(folders) <= 1, folders
    return folders[0] if folders else root / "no-work-folder"
