"""Decide, file by file, what each file of the source repo becomes in the output.

A model repo holds more than the checkpoint streamq converts: other modules' weights (a
sentence-transformers `2_Dense/model.safetensors`), copies of the same model in other formats
(`original/*.pth`, `onnx/`, `*.gguf`, `pytorch_model.bin` beside safetensors), training state,
tokenizers and docs. Nothing may vanish silently: every file gets one decision and a reason, which
`streamq plan` prints and the model card repeats for what is left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from .manifest import MANIFEST_NAME

Action = Literal["convert", "rewrite", "carry", "leave_out"]

INDEX_NAME = "model.safetensors.index.json"

WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.onnx|\.onnx_data|\.tflite|\.mlmodel|\.npz)$")
# The same model in another framework's or runtime's format: a 4-bit repo does not carry a full-size copy.
OTHER_FORMAT_DIRS = ("original/", "onnx/", "openvino/", "coreml/", "tflite/", "gguf/", "mlx/")
OTHER_FORMAT_FILE = re.compile(
    r"^(pytorch_model.*\.bin(\.index\.json)?|tf_model.*\.h5|flax_model.*\.msgpack|model\.ckpt.*|consolidated.*\.(safetensors|pth|pt))$"
)
TRAINING_STATE = re.compile(r"^(optimizer|scheduler|rng_state.*|scaler|training_args)\.(pt|pth|bin)$")
MODEL_SHARD = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
REWRITTEN = {
    "config.json": "rewritten with the 4-bit quantization_config",
    "README.md": "becomes the model card (the source card's text is kept in it)",
    INDEX_NAME: "rewritten for the 4-bit shards",
    ".gitattributes": "the output repo has its own",
    MANIFEST_NAME: "the output's own manifest is written instead",
}


@dataclass(frozen=True)
class FileDecision:
    action: Action
    reason: str


def classify_files(
    names: list[str], shards: list[str], read_text: Callable[[str], str]
) -> dict[str, FileDecision]:
    """One decision per file of the repo. `shards` are the main checkpoint's weight files (converted);
    `read_text` reads a small file of the repo (sentence-transformers' `modules.json`)."""
    modules = _module_dirs(names, read_text)
    shard_set = set(shards)
    decisions = {}
    for name in names:
        if name in shard_set:
            decisions[name] = FileDecision("convert", "a shard of the checkpoint: quantized")
        elif name in REWRITTEN:
            decisions[name] = FileDecision("rewrite", REWRITTEN[name])
        else:
            decisions[name] = _decide_other(name, names, modules)
    return decisions


def _decide_other(name: str, names: list[str], modules: set[str]) -> FileDecision:
    path = PurePosixPath(name)
    folder = "" if str(path.parent) == "." else f"{path.parent}/"
    if folder == "" and OTHER_FORMAT_FILE.match(path.name):
        return FileDecision("leave_out", "the same model in another format: not carried into the 4-bit repo")
    if not WEIGHT_FILE.search(name):
        return FileDecision("carry", "carried unchanged")
    if name.startswith(OTHER_FORMAT_DIRS):
        return FileDecision("leave_out", f"the same model in another format ({name.split('/')[0]}/): not carried into the 4-bit repo")
    if TRAINING_STATE.match(path.name):
        return FileDecision("leave_out", "training state, not part of the model")
    if folder == "" and MODEL_SHARD.match(name):
        return FileDecision("leave_out", "a checkpoint shard the index does not list (stale): not converted")
    if path.suffix == ".gguf":
        return FileDecision("leave_out", "the same model in GGUF format: not carried into the 4-bit repo")
    if folder and path.suffix != ".safetensors" and any(n.startswith(folder) and n.endswith(".safetensors") for n in names):
        return FileDecision("leave_out", f"a copy in another format of the safetensors weights in {folder}")
    if folder and folder.rstrip("/") in modules:
        return FileDecision("carry", f"weights of the sentence-transformers module {folder.rstrip('/')}: carried unchanged (transformers does not quantize it)")
    return FileDecision("carry", "weights outside the checkpoint: carried unchanged, never opened")


def _module_dirs(names: list[str], read_text: Callable[[str], str]) -> set[str]:
    """The module folders sentence-transformers' `modules.json` lists (a missing or odd file: none)."""
    if "modules.json" not in names:
        return set()
    try:
        modules = json.loads(read_text("modules.json"))
        return {str(m["path"]).strip("/") for m in modules if isinstance(m, dict) and m.get("path")}
    except (json.JSONDecodeError, TypeError, KeyError):
        return set()
