"""Tiny checkpoints that llama.cpp's converter accepts, for the GGUF reference (issue 27).

`make_checkpoint(path, family)` writes, deterministically (same bytes for the same arguments):
  - a random model saved by transformers (safetensors, sharded, config.json);
  - a real tokenizer: a small SentencePiece-style BPE (byte fallback) trained with `tokenizers` on a fixed
    text, saved as tokenizer.json + tokenizer_config.json (with a chat template), and, for the families whose
    converter reads it, the same vocabulary as a SentencePiece `tokenizer.model`.

Why two tokenizer files: llama.cpp's converter picks the vocabulary reader per architecture.
  - Llama (`LlamaModel.set_vocab`): tokenizer.model if present, else tokenizer.json through
    `gguf.LlamaHfVocab` (a BPE with byte_fallback and a Sequence decoder), else the GPT-2 BPE path.
  - Gemma 4 (`Gemma4Model.set_vocab`): always tokenizer.json through `gguf.LlamaHfVocab`.
  - Gemma 3, Qwen3: tokenizer.model if present, else the GPT-2 BPE path, which hashes the tokenization of a
    fixed text and refuses any tokenizer whose hash it does not list (`get_vocab_base_pre`: "BPE
    pre-tokenizer was not recognized"): a freshly trained vocabulary can never be listed, so these families
    get tokenizer.model (real Qwen3 checkpoints have none and take the GPT-2 path: `qwen2_vocab` below).
  - Qwen3-MoE (`Qwen2MoeModel`, `TextModel.set_vocab`): the GPT-2 path only, so it needs a real, listed
    tokenizer: Qwen2's, rebuilt from llama.cpp's models/ggml-vocab-qwen2.gguf (`qwen2_vocab`).
  - DeepSeek-V3 (`DeepseekV2Model`): the GPT-2 path too; `make_deepseek_fp8_checkpoint` gives it GPT-2's
    tokenizer, rebuilt from models/ggml-vocab-gpt-2.gguf (50,257 tokens, a third of Qwen2's), and block-FP8
    weights as DeepSeek ships them.

Shapes: every matrix's row (ne[0], the input features) is a multiple of 256, so the K-quants (blocks of 256)
apply as llama-quantize's mixtures ask; with rows that are not, llama-quantize falls back per tensor
(src/llama-quant.cpp `tensor_type_fallback`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if the row is
not a multiple of 32 either; the output/tied embedding goes to Q8_0 instead of Q6_K). `SHAPE_FALLBACK` gives
the 64-wide shape of the other test fixtures, to exercise that fallback on purpose.

Runs in streamq's test venv and in the GGUF reference venv alike (torch, transformers, tokenizers).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import torch

# A fixed training text: the tokenizer (and so the vocab size) depends only on it.
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A model is a file of tensors; a tensor is a table of numbers with a name and a shape.",
    "Streaming a model means reading each tensor as it arrives and writing it out at once.",
    "Quantization maps each group of weights to a few bits and one scale per group.",
    "llama.cpp reads GGUF files: a header of keys and values, tensor infos, then aligned data.",
    "Hello world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.",
    "user: write a short poem about the sea. model: the sea is wide, the sea is deep, the waves roll in.",
    "Ünïcödé text, emoji 🙂 and CJK 你好 fall back to bytes when no merge covers them.",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
TRAIN_VOCAB = 200  # merges + alphabet the trainer may produce on top of SPECIAL + BYTES
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# K-quant friendly: hidden 256, heads * head_dim = 256, intermediate 512, expert intermediate 256.
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
SHAPE_FALLBACK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _gemma4(shape: dict[str, Any], moe: bool) -> dict[str, Any]:
    """Gemma 4 text (as tests/int4_cases.py): sliding + global layers, k=v attention on the global ones."""
    n = shape["num_hidden_layers"]
    extra = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=shape["hidden_size"]) if moe else {}
    return shape | dict(
        # global_head_dim must differ from head_dim: transformers 5.25 saves it only in per_layer_config, and
        # only where it differs; the converter then finds no global head dim (AssertionError in gemma.py).
        global_head_dim=2 * shape["head_dim"], sliding_window=16, max_position_embeddings=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        attention_k_eq_v=True, num_global_key_value_heads=1, hidden_size_per_layer_input=0, tie_word_embeddings=True,
    ) | extra


def family_config(family: str, vocab_size: int, shape: dict[str, Any] = SHAPE) -> Any:
    """The transformers config of a tiny `family` model with `vocab_size` tokens."""
    import transformers

    common = dict(vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=shape["hidden_size"])
    configs = {
        "llama": ("LlamaConfig", shape | dict(tie_word_embeddings=False)),
        "qwen3": ("Qwen3Config", shape | dict(tie_word_embeddings=False)),
        "qwen3_moe": ("Qwen3MoeConfig", shape | moe | dict(tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])),
        "gemma3": ("Gemma3TextConfig", shape | dict(tie_word_embeddings=True, sliding_window=16)),
        "gemma4": ("Gemma4TextConfig", _gemma4(shape, moe=False)),
        "gemma4_moe": ("Gemma4TextConfig", _gemma4(shape, moe=True)),
    }
    name, fields = configs[family]
    fields = fields | common
    if family.startswith("gemma4"):
        fields["vocab_size_per_layer_input"] = vocab_size
    return getattr(transformers, name)(**fields)


FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma3", "gemma4", "gemma4_moe")
# Which tokenizer files each family's converter path needs (module docstring).
WANTS_SPM = {"qwen3", "gemma3"}
NEEDS_QWEN2_VOCAB = {"qwen3_moe"}


# --- the tokenizer --------------------------------------------------------------------------------------

def _trained_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """Train a SentencePiece-style BPE on CORPUS: (its tokens in id order, its merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=TRAIN_VOCAB, min_frequency=2, show_progress=False, special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return [t for t, _ in vocab], merges  # type: ignore[return-value]


def build_tokenizer() -> tuple[str, list[str]]:
    """The tokenizer.json text (Llama-2 HF layout: specials, 256 byte tokens, then the BPE) and its tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    trained, merges = _trained_vocab()
    tokens = SPECIAL + BYTES + [t for t in trained if t not in SPECIAL and t not in BYTES]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok.to_str(pretty=True), tokens


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(num: int, wire: int, payload: bytes) -> bytes:
    return _pb_varint(num << 3 | wire) + payload


def _pb_bytes(num: int, data: bytes) -> bytes:
    return _pb_field(num, 2, _pb_varint(len(data)) + data)


def sentencepiece_model(tokens: list[str], add_dummy_prefix: bool = True) -> bytes:
    """The same vocabulary as a SentencePiece BPE ModelProto (sentencepiece_model.proto), written by hand so
    that building fixtures needs no sentencepiece/protobuf: pieces (piece, score, type), trainer_spec
    (model_type BPE, vocab_size, byte_fallback, unk/bos/eos/pad ids) and an identity normalizer_spec.
    Scores: 0 for special and byte pieces, -i for the i-th BPE piece (earlier merges win, as in sentencepiece)."""
    normal, unknown, control, byte = 1, 2, 3, 6
    out = bytearray()
    for i, t in enumerate(tokens):
        kind = unknown if t == "<unk>" else control if t in SPECIAL else byte if t in BYTES else normal
        score = 0.0 if kind != normal else -float(i)
        piece = _pb_bytes(1, t.encode()) + _pb_field(2, 5, struct.pack("<f", score)) + _pb_field(3, 0, _pb_varint(kind))
        out += _pb_bytes(1, piece)
    trainer = (_pb_field(3, 0, _pb_varint(2)) + _pb_field(4, 0, _pb_varint(len(tokens))) + _pb_field(35, 0, _pb_varint(1))
               + _pb_field(40, 0, _pb_varint(0)) + _pb_field(41, 0, _pb_varint(1)) + _pb_field(42, 0, _pb_varint(2))
               + _pb_field(43, 0, _pb_varint(3)))
    normalizer = (_pb_bytes(1, b"identity") + _pb_field(3, 0, _pb_varint(int(add_dummy_prefix)))
                  + _pb_field(4, 0, _pb_varint(0)) + _pb_field(5, 0, _pb_varint(1)))
    out += _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)
    return bytes(out)


def tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE, "model_max_length": 128, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(path: Path, spm: bool) -> int:
    """Write the tokenizer files into `path`; returns the vocab size."""
    text, tokens = build_tokenizer()
    (path / "tokenizer.json").write_text(text)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n")
    if spm:
        (path / "tokenizer.model").write_bytes(sentencepiece_model(tokens))
    return len(tokens)


# --- a real GPT-2-style vocabulary: Qwen2's, from llama.cpp's own test vocab --------------------------
#
# Qwen2MoeModel (so Qwen3-MoE) has no SentencePiece path: its vocabulary always goes through the GPT-2 BPE path
# and its pre-tokenizer hash, which only a real tokenizer passes. llama.cpp ships one for its tokenizer tests:
# models/ggml-vocab-qwen2.gguf (vocab only: tokens, token types, merges). QWEN2_TOKENIZER rebuilds Qwen2's
# tokenizer.json from it (byte-level BPE, Qwen2's split regex), which the converter recognises as "qwen2".
# The price: 151,646 tokens, so the embedding is 151,646 x hidden (78 MB in bf16 at hidden 256).

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_gguf_vocab(path: Path) -> dict[str, Any]:
    """The KV pairs of a tensor-less GGUF file (llama.cpp's ggml-vocab-*.gguf), read without the gguf package."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8", errors="surrogatepass")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = take("I"), take("Q")
            return [value(inner) for _ in range(n)]
        return take(scalar[kind])

    assert data[:4] == b"GGUF"
    pos = 4
    _version, _tensors, n_kv = take("I"), take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("I"))
    return kv


def llama_cpp_vocab(reference_python: str, name: str) -> Path:
    """models/ggml-vocab-NAME.gguf in the GGUF reference venv's llama.cpp sources."""
    venv = Path(reference_python).parent.parent
    return next(venv.glob(f"src/llama_cpp_python-*/vendor/llama.cpp/models/ggml-vocab-{name}.gguf"))


def qwen2_vocab_file(reference_python: str) -> Path:
    """models/ggml-vocab-qwen2.gguf in the GGUF reference venv's llama.cpp sources."""
    return llama_cpp_vocab(reference_python, "qwen2")


def gpt2_vocab_file(reference_python: str) -> Path:
    """models/ggml-vocab-gpt-2.gguf in the GGUF reference venv's llama.cpp sources."""
    return llama_cpp_vocab(reference_python, "gpt-2")


def _bpe_from_vocab(vocab_file: Path) -> tuple[Any, list[tuple[int, str]]]:
    """A BPE tokenizer of a llama.cpp vocab file's normal tokens and merges, and its control tokens (id, text)."""
    from tokenizers import Tokenizer, models

    kv = read_gguf_vocab(vocab_file)
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 1}
    control = [(i, t) for i, (t, k) in enumerate(zip(tokens, types)) if k == 3]
    return Tokenizer(models.BPE(vocab=normal, merges=[tuple(m.split(" ", 1)) for m in merges], byte_fallback=False)), control


def _write_with_control(path: Path, tok: Any, control: list[tuple[int, str]]) -> None:
    """Add the control tokens at their ids (they follow the normal ones) and write tokenizer.json."""
    from tokenizers import AddedToken

    for i, text in control:
        assert tok.get_vocab_size(with_added_tokens=True) == i, (i, text)
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True))


def write_qwen2_tokenizer(path: Path, vocab_file: Path) -> int:
    """Qwen2's tokenizer.json + tokenizer_config.json, rebuilt from `vocab_file`; returns the vocab size."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    tok, control = _bpe_from_vocab(vocab_file)  # control: <|endoftext|>, <|im_start|>, <|im_end|>
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    _write_with_control(path, tok, control)
    config = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": QWEN2_CHAT_TEMPLATE,
        "model_max_length": 131072, "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


def write_gpt2_tokenizer(path: Path, vocab_file: Path, chat_template: str | None = None) -> int:
    """GPT-2's tokenizer.json + tokenizer_config.json, rebuilt from llama.cpp's models/ggml-vocab-gpt-2.gguf
    (byte-level BPE with GPT-2's own split regex, <|endoftext|> as bos/eos): the smallest tokenizer the GPT-2
    path recognises (50,257 tokens; "gpt-2", and all 47 cases of ggml-vocab-gpt-2.gguf.inp give the ids in
    .out). Returns the vocab size."""
    from tokenizers import decoders, pre_tokenizers, processors

    tok, control = _bpe_from_vocab(vocab_file)  # control: <|endoftext|>
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    _write_with_control(path, tok, control)
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 1024, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    } | ({"chat_template": chat_template} if chat_template else {})
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


# --- the checkpoint -------------------------------------------------------------------------------------

def make_checkpoint(path: Path, family: str, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    max_shard_size: str = "2MB", shape: dict[str, Any] = SHAPE, qwen2_vocab: Path | None = None,
                    qat_group: int | None = None) -> Path:
    """A tiny `family` checkpoint llama.cpp's converter accepts: random weights saved by transformers
    (sharded), config.json, generation_config.json and the tokenizer files. Same arguments, same bytes.
    With `qwen2_vocab` (qwen2_vocab_file(...)), the tokenizer is Qwen2's real one instead of the trained one
    (tied embeddings then, to keep one 151,646-row matrix); qwen3_moe needs it (see above). With `qat_group`,
    every matrix (embeddings and experts too) is put on a Q4_0-style grid first, as a QAT checkpoint saves
    it: w = bf16(s * q), q in [-8, 7], one bf16 scale per group of `qat_group` inputs (int4_cases.on_grid)."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    if family in NEEDS_QWEN2_VOCAB and qwen2_vocab is None:
        raise ValueError(f"{family}: llama.cpp's converter takes only a known GPT-2-style tokenizer here (qwen2_vocab=...)")
    if qwen2_vocab is not None:
        vocab_size = write_qwen2_tokenizer(path, qwen2_vocab)
    else:
        vocab_size = write_tokenizer(path, spm=family in WANTS_SPM)
    config = family_config(family, vocab_size, shape)
    if qwen2_vocab is not None:
        config.tie_word_embeddings = True
        config.bos_token_id, config.eos_token_id, config.pad_token_id = None, vocab_size - 1, vocab_size - 3
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # transformers initialises norms to 1 (or 0 for Gemma's 1+w): make them random too
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.randn(param.shape, dtype=torch.float32).mul_(0.1).add_(1.0).to(dtype))
        if qat_group is not None:
            from int4_cases import on_grid

            generator = torch.Generator().manual_seed(seed + 1)
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.copy_(on_grid(param.shape, qat_group, dtype, generator))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


# --- Gemma 3 with its vision tower, as Google ships it (text model + --mmproj) ------------------------------
#
# Gemma3ForConditionalGeneration: the Gemma 3 text model under `language_model.model.`, a SigLIP vision tower
# under `vision_tower.vision_model.` (no pooling head: vision_use_head false) and the projector
# `multi_modal_projector.` (mm_input_projection_weight, mm_soft_emb_norm), names as google/gemma-3-4b-it's
# checkpoint has them (transformers 5 saves the tower as `vision_tower.` and the converter's Gemma3VisionModel
# reads only `vision_tower.vision_model.`). llama.cpp's converter writes the text model from it as Gemma 3
# (Gemma3Model, which skips vision_/projector. names) and, with --mmproj, the projector file (Gemma3VisionModel,
# which needs preprocessor_config.json's image_mean/image_std and reads its image_seq_length). 64 x 64 images in
# patches of 8 and 16 image tokens: a projector pooling of 2 (not Gemma 3's 4), which the converter writes.

GEMMA3_VISION = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8,
                     vision_use_head=False)
GEMMA3_IMAGE_TOKENS = 16


def make_gemma3_vision_checkpoint(path: Path, *, seed: int = 0, max_shard_size: str = "2MB") -> Path:
    """A tiny Gemma 3 with a vision tower (above). Same arguments, same bytes."""
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path, spm=True)
    text = family_config("gemma3", vocab_size, SHAPE | dict(num_hidden_layers=2))
    config = Gemma3Config(text_config=text.to_dict(), vision_config=SiglipVisionConfig(**GEMMA3_VISION).to_dict(),
                          mm_tokens_per_image=GEMMA3_IMAGE_TOKENS, boi_token_index=4, eoi_token_index=5, image_token_index=3,
                          bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.randn(param.shape, dtype=torch.float32).mul_(0.1).add_(1.0).to(torch.bfloat16))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    # Google's names (the converter's): the tower under vision_tower.vision_model.
    index_file = path / "model.safetensors.index.json"
    rename = lambda key: key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key  # noqa: E731
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({rename(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"] = dict(sorted((rename(k), v) for k, v in index["weight_map"].items()))
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    preprocessor = {
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor", "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": GEMMA3_IMAGE_TOKENS, "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": GEMMA3_VISION["image_size"], "width": GEMMA3_VISION["image_size"]},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return path


# --- DeepSeek-V3 as DeepSeek ships it: block FP8 ---------------------------------------------------------
#
# DeepseekV3ForCausalLM with MLA attention (q/kv low-rank projections, kv_b split by the converter into
# attn_k_b / attn_v_b), one dense layer then MoE (routed experts + a shared expert, sigmoid router with
# e_score_correction_bias), a multi-token-prediction layer after the last one (num_nextn_predict_layers: the
# converter drops it), and every Linear weight but the router's as DeepSeek's block FP8: `weight` F8_E4M3 and
# `weight_scale_inv` F32 of ceil(out/128) x ceil(in/128), config `quantization_config` {quant_method: fp8,
# weight_block_size: [128, 128]}. The converter dequantizes them itself (conversion/base.py `dequant_model`).
#
# Head dims as DeepSeek-V3's (qk_nope 128, qk_rope 64, v 128), with 2 heads and ranks 256: every matrix row
# is a multiple of 256 except attn_k_b's (qk_nope, 128, as in DeepSeek-V3), which llama-quantize demotes as it
# does DeepSeek-V3's (Q4_K -> Q5_0). kv_a_proj_with_mqa has 256 + 64 = 320 rows: a partial 128-block, as 576
# is in DeepSeek-V3.
# Tokenizer: GPT-2's. DeepseekV2Model.set_vocab (conversion/deepseek.py) tries the GPT-2 path, which needs a
# listed pre-tokenizer hash (DeepSeek-V3's own is listed as "deepseek-v3", but llama.cpp ships no test vocab
# for it), and otherwise takes only Kimi-K2's tiktoken vocabulary. The vocab is padded to a multiple of 128
# as DeepSeek pads its own (the converter fills [PAD] tokens). Tied embeddings (DeepSeek-V3 ties none), to
# keep one vocab-sized matrix.
# Left out, for size: the MTP layer's own vocab-sized embed_tokens and shared_head.head (DeepSeek ships them).

DEEPSEEK_LAYERS = 3  # 1 dense + 2 MoE, then the MTP layer
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def deepseek_v3_config(vocab_size: int, num_hidden_layers: int = DEEPSEEK_LAYERS) -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=num_hidden_layers, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=256, kv_lora_rank=256,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=128,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, pad_token_id=None,
    )


def make_deepseek_fp8_checkpoint(path: Path, gpt2_vocab: Path, *, seed: int = 0, max_shard_size: int = 2_000_000) -> Path:
    """A tiny DeepSeek-V3 in block FP8 (above), with GPT-2's tokenizer (`gpt2_vocab_file(...)`). Same arguments,
    same bytes. Shards of about `max_shard_size` bytes, layer by layer, the embedding last: in the converter's
    order (files by name, names sorted in a file) a vocab-sized first tensor would make llama-gguf-split
    refuse a 1 MB split (it never starts a file with a tensor over the limit, tests/test_gguf.py)."""
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from quantized_sources import BLOCK_FP8, PROJ, block_fp8_quantize

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = -(-write_gpt2_tokenizer(path, gpt2_vocab, DEEPSEEK_CHAT_TEMPLATE) // 128) * 128
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(deepseek_v3_config(vocab_size, DEEPSEEK_LAYERS + 1), dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # DeepSeek's names: transformers 5 unfuses the experts on saving
        tensors = {k: v for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(f).items()}
        config = json.loads((Path(tmp) / "config.json").read_text())
        (path / "generation_config.json").write_bytes((Path(tmp) / "generation_config.json").read_bytes())
    mtp = f"model.layers.{DEEPSEEK_LAYERS}."
    hidden = config["hidden_size"]
    tensors |= {mtp + "enorm.weight": torch.ones(hidden), mtp + "hnorm.weight": torch.ones(hidden),
                mtp + "shared_head.norm.weight": torch.ones(hidden), mtp + "eh_proj.weight": torch.randn(hidden, 2 * hidden) * 0.02}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if tensor.dim() == 1:  # norms (transformers makes them 1) and the router's bias: random
            dtype = torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16
            out[key] = torch.randn(tensor.shape, dtype=torch.float32).mul_(0.1).add_(1.0).to(dtype)
        elif PROJ.search(key):
            out[key], out[key.removesuffix("weight") + "weight_scale_inv"] = block_fp8_quantize(tensor)
        else:  # embedding, router weight: bf16, as DeepSeek ships them
            out[key] = tensor.to(torch.bfloat16)

    def rank(key: str) -> tuple[int, int]:
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        return (0, int(layer.group(1))) if layer else (1, key != "model.norm.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(out, key=rank):  # stable: a layer's tensors in transformers' order
        nbytes = out[key].numel() * out[key].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = out[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in out.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config |= {"num_hidden_layers": DEEPSEEK_LAYERS, "num_nextn_predict_layers": 1, "quantization_config": dict(BLOCK_FP8)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# --- the reference (llama.cpp in its own virtualenv) ----------------------------------------------------

HERE = Path(__file__).resolve().parent


def reference_python() -> str | None:
    """The GGUF reference virtualenv's python (tests/gguf_reference_setup.sh): $STREAMQ_GGUF_REFERENCE."""
    import os

    path = os.environ.get("STREAMQ_GGUF_REFERENCE")
    return path if path and Path(path).exists() else None


def reference_or_skip() -> str:
    """The reference venv's python for a test: skipped without it, failed with STREAMQ_REQUIRE_GGUF_REFERENCE=1 (CI)."""
    import os

    import pytest

    python = reference_python()
    if python is None:
        if os.environ.get("STREAMQ_REQUIRE_GGUF_REFERENCE") == "1":
            pytest.fail("the GGUF reference virtualenv is missing (STREAMQ_GGUF_REFERENCE; tests/gguf_reference_setup.sh builds it)")
        pytest.skip("no GGUF reference virtualenv (bash tests/gguf_reference_setup.sh DEST; STREAMQ_GGUF_REFERENCE=DEST/bin/python)")
    return python


def _in_reference(python: str, script: str, *args: str, timeout: int = 900) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, str(HERE / script), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RuntimeError(f"{script} {' '.join(args)} failed ({done.returncode}); see stderr")
    return done.stdout.strip().splitlines()[-1]


def run_reference(python: str, src: Path, out: Path, qtype: str, *options: str) -> list[Path]:
    """llama.cpp's GGUF of `src` as `qtype` (tests/gguf_reference.py; options: --split-max-tensors N, ...):
    the files written, in order."""
    return [Path(p) for p in json.loads(_in_reference(python, "gguf_reference.py", str(src), str(out), qtype, *options))]


def read_gguf(python: str, *files: Path) -> list[dict[str, Any]]:
    """gguf.GGUFReader's view of `files` (tests/gguf_inspect.py): KV keys in order, tensors in order."""
    return json.loads(_in_reference(python, "gguf_inspect.py", "read", *map(str, files)))


def gguf_logits(python: str, first_file: Path, tokens: list[int]) -> dict[str, Any]:
    """llama-cpp-python's logits for `tokens` from the model whose (first) file is `first_file`."""
    return json.loads(_in_reference(python, "gguf_inspect.py", "logits", str(first_file), ",".join(map(str, tokens))))
