"""Offline quickstart: a tiny model on a local Hub emulator, re-quantized Hub to Hub, loaded and run.

    python examples/quickstart.py

Everything runs on this machine: the "Hub" is streamq's loopback emulator (the real
`huggingface_hub` client talks to it over HTTP), so no account or network is needed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # the emulator speaks plain LFS, not Xet
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from streamq import stream_requantize  # noqa: E402
from streamq.testing import LocalHub  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, LocalHub(Path(tmp) / "hub") as hub:
        # 1. A small random Llama (5.8 MB), saved in shards of 1 MB and pushed to the emulated Hub as "org/tiny-llama".
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(Path(tmp) / "tiny-llama", max_shard_size="1MB")
        api = HfApi(endpoint=hub.endpoint, token="hf_demo")
        api.create_repo("org/tiny-llama")
        api.upload_folder(repo_id="org/tiny-llama", folder_path=Path(tmp) / "tiny-llama")
        print(f"source: {hub.endpoint}/org/tiny-llama ({len(api.list_repo_files('org/tiny-llama'))} files)")

        # 2. The streamq call: Hub -> Hub, tensor by tensor, into output shards of at most 500 kB (1 GB by default).
        result = stream_requantize("org/tiny-llama", "me/tiny-llama-nf4", endpoint=hub.endpoint, token="hf_demo", max_shard_size="500KB")
        print(f"streamq: {result.shards} shards, {result.bytes_in / 1e6:.1f} MB -> {result.bytes_out / 1e6:.1f} MB "
              f"({result.ratio:.2f}x) in {result.elapsed:.1f} s")

        # 3. transformers loads the 4-bit repo directly, with no quantization arguments.
        os.environ["HF_ENDPOINT"] = hub.endpoint
        path = api.snapshot_download("me/tiny-llama-nf4", local_dir=Path(tmp) / "download")
        quantized = AutoModelForCausalLM.from_pretrained(path)
        weight = quantized.model.layers[0].self_attn.q_proj.weight
        print(f"loaded: {type(quantized.model.layers[0].self_attn.q_proj).__name__}, weight {weight.dtype} {tuple(weight.shape)}")
        tokens = quantized.generate(torch.tensor([[1, 42, 7]]), max_new_tokens=8, do_sample=False)
        print(f"generated token ids: {tokens[0].tolist()}")


if __name__ == "__main__":
    main()
