"""llama.cpp's converter run on headers alone: the GGUF's metadata and tensor list before any weight arrives.

The converter reads a checkpoint through `ModelBase.index_tensors`, a map from checkpoint name to a loader,
and in its (default) lazy mode every transform (renames, permutes, expert stacking, FP8 dequantizing) is
recorded on meta tensors and only run when a tensor is written. streamq gives it loaders of its own, with
the dtype and shape from the safetensors headers, so the converter plans the whole file from headers, and
each GGUF tensor is computed later, when the source tensors it reads (found by walking its recorded
graph) have arrived.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedModelError
from .llama_cpp import LLAMA_CPP_COMMIT, converter

# --outtype of the converter, as llama.cpp's convert_hf_to_gguf.py maps it
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass
class GgufTensor:
    """One tensor of the converter's file: what its header entry says, and how to compute its bytes."""

    name: str
    qtype: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (the GGUF header lists it reversed)
    nbytes: int
    data: Any  # the converter's lazy array (bytes once quantized); None once written
    parts: tuple[str, ...]  # the checkpoint tensors it is computed from


@dataclass
class ConvertedModel:
    arch: str
    kv: dict[str, Any]  # key -> gguf.GGUFValue, in the converter's order
    tensors: list[GgufTensor]  # in the converter's order
    alignment: int


class _Leaf:
    """The function of a lazy leaf: `read` gives the checkpoint tensor once the stream has it."""

    def __init__(self, read: Callable[[str], torch.Tensor]) -> None:
        self.read = read

    def __call__(self, key: str) -> torch.Tensor:
        return self.read(key)


def mmproj_architecture(model_dir: Path) -> tuple[str | None, bool]:
    """The architecture `convert_hf_to_gguf.py --mmproj` would convert (the vision_config's own first, as the
    converter looks), and whether it writes a projector for it (MMPROJ_MODEL_MAP)."""
    conversion, _ = converter()
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    try:
        arch = conversion.get_model_architecture(hparams, conversion.ModelType.MMPROJ)
    except ValueError:
        return None, False
    return arch, arch in conversion.MMPROJ_MODEL_MAP


def convert_model(
    model_dir: Path, leaves: dict[str, tuple[torch.dtype, tuple[int, ...]]], outtype: str, read: Callable[[str], torch.Tensor],
    *, mmproj: bool = False,
) -> ConvertedModel:
    """Run the converter's planning on `model_dir` (config, tokenizer, README: the small files, in a folder
    named as the checkpoint's directory would be, since llama.cpp names the model after it). `leaves`: every
    checkpoint tensor in the order the converter indexes them (files sorted by name, names sorted in a file).
    `mmproj`: the multimodal projector (`--mmproj`) instead of the text model."""
    conversion, gguf = converter()
    lazy_tensor = conversion.LazyTorchTensor
    leaf = _Leaf(read)

    def index_tensors(self: Any, remote_hf_model_id: str | None = None) -> dict[str, Callable[[], Any]]:
        tensors = {}
        for key, (dtype, shape) in leaves.items():
            def load(key: str = key, dtype: torch.dtype = dtype, shape: tuple[int, ...] = shape) -> Any:
                return lazy_tensor(meta=lazy_tensor.meta_with_dtype_and_shape(dtype, shape), args=(key,), func=leaf)
            if item := self.filter_tensors((key, load)):
                tensors[item[0]] = item[1]
        return tensors

    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.MMPROJ if mmproj else conversion.ModelType.TEXT)
    try:
        model_class = conversion.get_model_class(arch, mmproj=mmproj)
    except NotImplementedError as exc:
        what = "its vision/audio projector (--mmproj) cannot be written" if mmproj else "GGUF cannot be written for it"
        raise UnsupportedModelError(f"llama.cpp's converter (llama.cpp {LLAMA_CPP_COMMIT}) does not support {arch}; {what}") from exc
    streamed = type(model_class.__name__, (model_class,), {"model_arch": model_class.model_arch, "index_tensors": index_tensors})
    ftype = getattr(gguf.LlamaFileType, OUTTYPES[outtype])
    with torch.inference_mode(), _quiet(conversion.logger), _quiet(logging.getLogger("gguf")):
        model = streamed(model_dir, ftype, model_dir / "unused.gguf")
        model.prepare_tensors()
        model.prepare_metadata(vocab_only=False)  # also the vocab (TextModel.prepare_metadata), or the image/audio settings (MmprojModel)
    writer = model.gguf_writer
    [kv], [infos] = writer.kv_data, writer.tensors
    tensors = [GgufTensor(name, int(ti.dtype), tuple(int(d) for d in ti.shape), int(ti.nbytes), ti.tensor, tuple(_reads(ti.tensor, leaf)))
               for name, ti in infos.items()]
    return ConvertedModel(gguf.MODEL_ARCH_NAMES[model.model_arch], dict(kv), tensors, writer.data_alignment)


def _reads(data: Any, leaf: _Leaf) -> Iterator[str]:
    """The checkpoint tensors a lazy array's recorded graph reads, in the order it first reaches them."""
    seen: set[int] = set()
    found: dict[str, None] = {}
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, (list, tuple)):
            stack.extend(reversed(node))
            continue
        if id(node) in seen or not hasattr(node, "_args"):
            continue
        seen.add(id(node))
        if node._func is leaf:
            found[node._args[0]] = None
            continue
        stack.extend(reversed(node._args))
        stack.extend(v for v in node._kwargs.values() if hasattr(v, "_args"))
    return iter(found)


def materialize(tensor: GgufTensor) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Run a tensor's recorded graph (its leaves read through `read`): (the converter's bytes, None), or, for a
    tensor the converter rounds to bf16, (None, the f32 values it rounds), which are exact where the source
    is finer than bf16 (e.g. int4 codes times their scales); the caller rounds them, in pieces."""
    _, gguf = converter()
    data = tensor.data
    tensor.data = None
    if isinstance(data, gguf.LazyBase) and data._func == gguf.quants.BF16._Quant__quantize_array:
        values = np.ascontiguousarray(gguf.LazyNumpyTensor.to_eager(data._args[0]), dtype=np.float32)
        if values.size * 2 != tensor.nbytes:
            raise AssertionError(f"{tensor.name}: the converter made {values.size} values, its header says {tensor.nbytes} bytes of bf16")
        return None, values
    array = gguf.LazyNumpyTensor.to_eager(data) if isinstance(data, gguf.LazyBase) else np.asarray(data)
    if array.nbytes != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: the converter made {array.nbytes} bytes, its header says {tensor.nbytes}")
    return array, None


@contextlib.contextmanager
def _quiet(log: logging.Logger) -> Iterator[None]:
    """The converter logs every tensor, and notes such as a key set twice: only its errors unless streamq is asked to say more."""
    level = log.level
    if not logging.getLogger("streamq").isEnabledFor(logging.DEBUG):
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
