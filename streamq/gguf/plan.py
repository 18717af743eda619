"""Plan a GGUF run from the source's small files and safetensors headers: llama.cpp's converter on header-only
tensors (model.py), llama-quantize's per-tensor types (mixture.py), then the output files and their headers
(header.py), and the stream: which source tensors each GGUF tensor reads, and so when it can be written.

A plan holds one or more converted models, each with its files (`GgufFiles`): the text model, and for a
multimodal model whose vision/audio the converter supports, the projector `convert_hf_to_gguf.py --mmproj`
writes, which llama.cpp's multimodal tools load beside it (`--mmproj`). Both are written from one stream.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedModelError
from ..fetch import Source
from ..inventory import INDEX_NAME, WEIGHT_FILE, FileDecision
from ..layout import Layout, OutputShard, Position, Stored, largest_pair
from ..manifest import MANIFEST_NAME
from ..plan import STORED_DTYPES, ShardPlan, _stored, _weight_files, stored_tensor
from ..settings import GGUF_CONVERTER_TYPES, QuantSettings
from ..targets import TensorInfo
from .header import FilePlan, TensorEntry, file_plan, split_files
from .llama_cpp import LLAMA_CPP_COMMIT, converter, libraries
from .mixture import llama_ftype, quantized_types
from .model import ConvertedModel, GgufTensor, convert_model, mmproj_architecture

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
SMALL_FILE = 64 << 20  # files the converter may read (config, tokenizer, chat template, README) are staged up to this size
INTERMEDIATE = "bf16"  # llama.cpp's tools/quantize/README.md converts to bf16 before llama-quantize
# The projector's type where the model's is llama-quantize's: llama-quantize does not take projector files, and
# llama.cpp's guide (docs/multimodal/gemma3.md) and ggml-org's multimodal GGUF repos ship it as f16 beside a
# Q4_K_M model. Where the converter writes the model's type itself (bf16, f16, q8_0), the projector gets it too,
# as `convert_hf_to_gguf.py --outtype T --mmproj` does.
MMPROJ_OUTTYPE = "f16"


SMALL_TENSOR = 4096  # bytes: a tensor the converter reads while planning (e.g. an int4 weight's shape) is read at once


class Feed:
    """The source tensors the stream has made available, read by the converter's lazy leaves. While planning,
    the converter may need a small tensor's values (a compressed-tensors weight's `weight_shape`): `small`
    reads it from the source directly."""

    def __init__(self, small: Callable[[str], torch.Tensor | None]) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.small = small
        self.read_while_planning: set[str] = set()

    def read(self, key: str) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors[key]
        found = self.small(key)
        if found is None:
            raise AssertionError(f"the converter read {key}, which the stream has not provided")
        self.read_while_planning.add(key)
        return found


@dataclass
class GgufFiles:
    """One model llama.cpp's converter writes from the source, and its files: the text model ("model"), or the
    multimodal projector ("mmproj") that llama.cpp's tools load with `--mmproj`."""

    role: str
    quant_type: str  # the files' type, as llama.cpp names it (q4_k_m, f16, ...)
    model: ConvertedModel
    written: dict[str, TensorEntry]  # every tensor as the files hold it
    files: list[FilePlan]
    made_by: str  # llama.cpp's commands that write these files

    def type_counts(self) -> dict[str, int]:
        """Tensors per ggml type, e.g. {"Q4_K": 25, "Q6_K": 5, "F32": 9}."""
        names = converter()[1].GGMLQuantizationType
        counts: dict[str, int] = {}
        for entry in self.written.values():
            counts[names(entry.qtype).name] = counts.get(names(entry.qtype).name, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class GgufPlan:
    """What `Plan` is for safetensors outputs, for a GGUF output: the scheduler and pipeline read the same names."""

    source: str
    revision: str | None
    settings: QuantSettings
    config: dict[str, Any]
    shards: list[ShardPlan]
    sizes: dict[str, int]
    files: dict[str, FileDecision]
    sets: list[GgufFiles]  # the text model first, then its --mmproj projector where there is one
    feed: Feed
    stored_info: dict[str, TensorInfo]
    stored_at: dict[str, Stored] = field(default_factory=dict)
    layout: Layout | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def model(self) -> ConvertedModel:
        """The text model."""
        return self.sets[0].model

    @property
    def mmproj(self) -> GgufFiles | None:
        return next((s for s in self.sets if s.role == "mmproj"), None)

    @property
    def out_files(self) -> list[FilePlan]:
        """Every output file: the model's, then the projector's."""
        return [f for s in self.sets for f in s.files]

    @cached_property
    def written(self) -> dict[str, TensorEntry]:
        """Every output tensor as the files hold it (llama.cpp's projector names, v./mm./a., are not the model's)."""
        return {name: e for s in self.sets for name, e in s.written.items()}

    @cached_property
    def tensors(self) -> dict[str, GgufTensor]:
        """Every output tensor as the converter computes it."""
        return {t.name: t for s in self.sets for t in s.model.tensors}

    @property
    def extra_files(self) -> list[str]:
        return []

    @property
    def left_out(self) -> dict[str, str]:
        return {name: d.reason for name, d in self.files.items() if d.action == "leave_out"}

    @property
    def carried_bytes(self) -> int:
        return 0

    @property
    def input_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def outputs(self) -> list[OutputShard]:
        assert self.layout is not None
        return self.layout.outputs

    def largest_tensor(self) -> int:
        return max((s.end - s.start for s in self.stored_at.values()), default=0)

    def output_pair(self) -> int:
        """Output files are written where their tensors' data goes, so several may be open at once (llama-quantize
        orders tensors by layer, the stream by source file): the most open at once, plus one being uploaded."""
        assert self.layout is not None
        return _most_open(self.layout) + largest_pair(o.expected_size for o in self.outputs) // 2

    def tensor_counts(self) -> tuple[int, int]:
        """(quantized, kept as they are) output tensors."""
        kept = {int(converter()[1].GGMLQuantizationType[name]) for name in ("F32", "F16", "BF16")}
        quantized = sum(1 for e in self.written.values() if e.qtype not in kept)
        return quantized, len(self.written) - quantized

    def type_counts(self) -> dict[str, int]:
        """The text model's tensors per ggml type, e.g. {"Q4_K": 25, "Q6_K": 5, "F32": 9}."""
        return self.sets[0].type_counts()


def build_gguf_plan(source: Source, settings: QuantSettings, meta_dir: Path) -> GgufPlan:
    files = source.files()
    if "config.json" not in files:
        raise UnsupportedModelError(f"{source.name} has no config.json; streamq converts transformers model repos")
    qtype = settings.quant_type
    if qtype not in GGUF_CONVERTER_TYPES:
        libraries()  # llama.cpp's quantizer is needed: said before anything is planned
    shard_names, index = _weight_files(source, files)
    headers = source.headers(shard_names)
    stored = _stored(shard_names, headers, files)
    for name in shard_names:
        for key, info in headers[name].tensors.items():
            if info.dtype not in STORED_DTYPES and info.dtype != "F8_E8M0" and info.dtype != "U8":
                raise UnsupportedModelError(f"{name}: tensor {key} has dtype {info.dtype}, which llama.cpp's converter does not read")
    model_dir = _stage_small_files(source, files, meta_dir, shard_names)
    leaves = {key: (_torch_dtype(info), tuple(info.shape)) for name in sorted(shard_names) for key, info in sorted(headers[name].tensors.items())}
    def small(key: str) -> torch.Tensor | None:
        where = stored.get(key)
        if where is None or where.end - where.start > SMALL_TENSOR:
            return None
        info = headers[shard_names[where.file]].tensors[key]
        return stored_tensor(bytearray(source.read_range(shard_names[where.file], where.start, where.end)), info)

    feed = Feed(small)
    name = PurePosixPath(source.name.rstrip("/")).name
    sets = [_text_files(model_dir, leaves, feed, qtype, name, settings.max_shard_size, meta_dir)]
    read = {p for t in sets[0].model.tensors for p in t.parts} | feed.read_while_planning
    no_mmproj = None
    if set(stored) - read:  # tensors the text model does not read: a vision or audio tower, or MTP layers
        mmproj, no_mmproj = _mmproj_files(model_dir, leaves, feed, qtype, name)
        sets += [mmproj] if mmproj is not None else []
    names = [t.name for s in sets for t in s.model.tensors]
    if len(set(names)) != len(names):
        raise AssertionError("llama.cpp's model and projector files name a tensor alike; streamq keys tensors by name")
    config = json.loads(source.read_text("config.json"))
    shards = [ShardPlan(name, files[name].size, files[name].sha256, tuple(headers[name].tensors)) for name in shard_names]
    plan = GgufPlan(
        source.name, source.revision, settings, config, shards, {n: f.size for n, f in files.items()},
        _decisions(files, shard_names), sets, feed,
        {key: info for name in shard_names for key, info in headers[name].tensors.items()}, stored,
    )
    plan.layout = _layout(shard_names, stored, plan.out_files, {t.name: t.parts for t in plan.tensors.values()})
    unread = sorted(set(stored) - {p for t in plan.tensors.values() for p in t.parts} - feed.read_while_planning)
    if unread:
        plan.warnings.append(_left_out_warning(unread, config, no_mmproj))
    return plan


def _text_files(model_dir: Path, leaves: dict, feed: Feed, qtype: str, name: str, max_size: int, work: Path) -> GgufFiles:
    """The text model: the converter's file in `qtype`, or its bf16 intermediate then llama-quantize's."""
    outtype = qtype if qtype in GGUF_CONVERTER_TYPES else INTERMEDIATE
    model = convert_model(model_dir, leaves, outtype, feed.read)
    entries = [TensorEntry(t.name, t.qtype, t.shape, t.nbytes) for t in model.tensors]
    kv = model.kv
    made_by = f"`convert_hf_to_gguf.py --outtype {qtype}`"
    if qtype not in GGUF_CONVERTER_TYPES:
        entries, kv = _quantized(model, entries, qtype, work)
        made_by = f"`convert_hf_to_gguf.py --outtype {INTERMEDIATE}` followed by `llama-quantize ... {qtype.upper()}`"
    files = split_files(f"{name}-{qtype.upper()}", kv, entries, model.alignment, max_size)
    return GgufFiles("model", qtype, model, {e.name: e for e in entries}, files, made_by)


def _mmproj_files(model_dir: Path, leaves: dict, feed: Feed, qtype: str, name: str) -> tuple[GgufFiles | None, str | None]:
    """The projector `convert_hf_to_gguf.py --mmproj` writes, named as it names it by default (`mmproj-<model
    folder>-<TYPE>.gguf`, which `llama-cli -hf` finds beside the model), in one file: llama.cpp's projector
    loader (clip) reads no split files. Else None, and why, in words, where there is no projector to write."""
    arch, supported = mmproj_architecture(model_dir)
    if not supported:
        return None, f"llama.cpp's converter (llama.cpp {LLAMA_CPP_COMMIT}) writes no --mmproj projector for {arch or 'this architecture'}"
    outtype = qtype if qtype in GGUF_CONVERTER_TYPES else MMPROJ_OUTTYPE
    try:
        model = convert_model(model_dir, leaves, outtype, feed.read, mmproj=True)
    except (UnsupportedModelError, NotImplementedError, ValueError, KeyError, AssertionError) as exc:  # the converter's own refusals
        return None, f"llama.cpp's converter did not write {arch}'s --mmproj projector ({type(exc).__name__}: {exc})"
    if not model.tensors:
        return None, f"llama.cpp's converter found no projector tensors for {arch}"
    entries = [TensorEntry(t.name, t.qtype, t.shape, t.nbytes) for t in model.tensors]
    files = [file_plan(f"mmproj-{name}-{outtype.upper()}.gguf", model.kv, entries, model.alignment)]
    return GgufFiles("mmproj", outtype, model, {e.name: e for e in entries}, files, f"`convert_hf_to_gguf.py --mmproj --outtype {outtype}`"), None


def _left_out_warning(unread: list[str], config: dict[str, Any], no_mmproj: str | None) -> str:
    """Says which source tensors the converter does not write, and why where it is known: layers past
    num_hidden_layers are multi-token-prediction layers (DeepSeek-V3's num_nextn_predict_layers), which it
    drops; the others are vision or audio towers whose --mmproj projector is not written (`no_mmproj` says
    why), or, where it is, tensors neither the model nor the projector reads."""
    layers = config.get("num_hidden_layers")
    mtp = [k for k in unread if isinstance(layers, int) and (m := _LAYER.match(k)) and int(m.group(1)) >= layers]
    reasons = [f"{len(mtp)} in multi-token-prediction layers past num_hidden_layers, which it drops"] if mtp else []
    if len(mtp) < len(unread):
        reasons.append(f"vision or audio towers: {no_mmproj}" if no_mmproj else "read by neither the model nor its --mmproj projector")
    example = next((k for k in unread if k not in mtp), unread[0])
    return f"llama.cpp's converter leaves out {len(unread)} source tensor(s), e.g. {example} ({'; '.join(reasons)})"


def _quantized(model: ConvertedModel, entries: list[TensorEntry], qtype: str, work: Path) -> tuple[list[TensorEntry], dict[str, Any]]:
    """llama-quantize's file from the converter's intermediate: its types and order, and its metadata (the
    intermediate's, with the quantization version and file type set again, which moves them last)."""
    _, gguf = converter()
    _, llama_cpp = libraries()
    intermediate = file_plan("intermediate.gguf", model.kv, entries, model.alignment)
    by_name = {e.name: e for e in entries}
    out = []
    for name, type_name in quantized_types(intermediate, qtype, work):
        source = by_name[name]
        target = int(gguf.GGMLQuantizationType[type_name.upper()])
        if target == source.qtype:
            out.append(source)
            continue
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(target)]
        out.append(TensorEntry(name, target, source.shape, int(np.prod(source.shape)) // block * type_size))
    kv = {k: v for k, v in model.kv.items() if k not in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE)}
    kv[gguf.Keys.General.QUANTIZATION_VERSION] = gguf.GGUFValue(gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    kv[gguf.Keys.General.FILE_TYPE] = gguf.GGUFValue(llama_ftype(llama_cpp, qtype), gguf.GGUFValueType.UINT32)
    return out, kv


def _torch_dtype(info: TensorInfo) -> torch.dtype:
    if info.dtype == "F8_E8M0":
        return getattr(torch, "float8_e8m0fnu", torch.uint8)
    return STORED_DTYPES[info.dtype]


def _stage_small_files(source: Source, files: dict[str, Any], meta_dir: Path, shard_names: list[str]) -> Path:
    """The folder the converter reads: named as the source (llama.cpp names the model after its folder), holding
    every small top-level file but the weights (config, tokenizer, chat template, the README it reads metadata from)."""
    folder = meta_dir / PurePosixPath(source.name.rstrip("/")).name
    folder.mkdir(parents=True, exist_ok=True)
    for name, info in files.items():
        if "/" in name or name in shard_names or WEIGHT_FILE.search(name) or info.size > SMALL_FILE or name == MANIFEST_NAME:
            continue
        source.copy_to(name, folder / name)
    if INDEX_NAME in files:
        source.copy_to(INDEX_NAME, folder / INDEX_NAME)
    return folder


def _decisions(files: dict[str, Any], shard_names: list[str]) -> dict[str, FileDecision]:
    """A GGUF holds the model's config, tokenizer and chat template in its metadata: nothing else is carried."""
    decisions = {}
    for name in sorted(files):
        if name in shard_names:
            decisions[name] = FileDecision("convert", "converted to GGUF")
        elif name == "README.md":
            decisions[name] = FileDecision("rewrite", "becomes the model card (the source card's text is kept in it)")
        elif "/" not in name and not WEIGHT_FILE.search(name) and files[name].size <= SMALL_FILE:
            decisions[name] = FileDecision("leave_out", "read by llama.cpp's converter into the GGUF's metadata where it uses it")
        else:
            decisions[name] = FileDecision("leave_out", "not part of llama.cpp's GGUF")
    return decisions


def _layout(names: list[str], stored: dict[str, Stored], out_files: list[FilePlan], parts: dict[str, tuple[str, ...]]) -> Layout:
    """The stream for GGUF: a tensor is computed when the last source tensor it reads arrives; a file is done when all its tensors are."""
    order = sorted(stored.values(), key=lambda s: (s.file, s.start, s.end, s.key))
    rank = {s.key: i for i, s in enumerate(order)}
    last_part: dict[str, tuple[str, ...]] = {}
    waiting: dict[str, tuple[str, ...]] = {}
    for item, reads in parts.items():
        if not reads:
            continue
        completing = max(reads, key=rank.__getitem__)
        last_part[completing] = (*last_part.get(completing, ()), item)
        for part in reads:
            if part != completing:
                waiting[part] = (*waiting.get(part, ()), item)
    outputs, owner = [], {}
    for index, plan in enumerate(out_files):
        items = tuple(e.name for e in plan.tensors)
        reads = [stored[p] for item in items for p in parts[item]]
        outputs.append(OutputShard(
            name=plan.name, items=items, expected_size=plan.size, header_reserve=len(plan.header),
            files=tuple(names[f] for f in sorted({p.file for p in reads})),
            start=min((p.position for p in reads), default=Position(0, 0)),
        ))
        owner.update({item: index for item in items})
    return Layout(outputs, order, dict(parts), last_part, waiting, owner)


def _most_open(layout: Layout) -> int:
    """The most bytes of output files open at once, walking the stream: a file opens with its first tensor
    computed and closes with its last."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for step, stored in enumerate(layout.order):
        for item in layout.last_part.get(stored.key, ()):
            index = layout.owner[item]
            first.setdefault(index, step)
            last[index] = step
    events = sorted([(s, 0, i) for i, s in first.items()] + [(s, 1, i) for i, s in last.items()])
    size = most = 0
    for _, closing, index in events:
        size += -layout.outputs[index].expected_size if closing else layout.outputs[index].expected_size
        most = max(most, size)
    return most
