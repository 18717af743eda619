"""Plan a run from the source's small files and safetensors headers, before any weight is downloaded.

One exception: a checkpoint that stores both ends of a tied weight has those two tensors read, since
transformers ties them only when their values are equal.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .converters import converter_for
from .dequantizers import Dequantizer, LogicalTensor, dequantizer_for, logical_checkpoint
from .dequantizers.base import without_quantization
from .errors import AlreadyQuantizedError, CorruptShardError, NoSafetensorsError, UnsupportedDtypeError, UnsupportedModelError
from .fetch import FileHeader, Source, SourceFile
from .inventory import INDEX_NAME, WEIGHT_FILE, FileDecision, classify_files
from .layout import Layout, Stored, largest_pair, plan_layout, quantized_entries
from .settings import QuantSettings
from .targets import TensorInfo, TensorPlan, TensorRule, plan_tensors

logger = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
TORCH_DTYPES = {  # the safetensors dtype codes streamq reads, and what they are in torch
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
STORED_DTYPES = TORCH_DTYPES | {"F8_E4M3": torch.float8_e4m3fn}  # what the stream reads: also a dequantized source's FP8


def stored_tensor(buffer: bytes | bytearray | memoryview, info: TensorInfo) -> torch.Tensor:
    """A stored tensor over its bytes, without a copy (an empty one has no buffer to view)."""
    dtype = STORED_DTYPES[info.dtype]
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape) if len(buffer) else torch.empty(info.shape, dtype=dtype)


QUANTIZED_KEY = re.compile(r"\.(absmax|quant_map|quant_state\.[\w]+|qweight|qzeros|scales|g_idx|weight_scale|weight_scale_inv|input_scale|weight_packed|SCB)$")


@dataclass(frozen=True)
class ShardPlan:
    """One source weight file, and the (logical) tensors it holds."""

    name: str
    size: int
    sha256: str | None
    keys: tuple[str, ...]


@dataclass
class Plan:
    source: str
    revision: str | None
    settings: QuantSettings
    config: dict[str, Any]
    shards: list[ShardPlan]
    tensors: TensorPlan
    tensor_info: dict[str, TensorInfo]
    sizes: dict[str, int]  # bytes of every file of the source repo
    files: dict[str, FileDecision]  # every file of the source repo, and what becomes of it
    warnings: list[str] = field(default_factory=list)
    # A quantized source: tensor_info and the shards' keys describe the dequantized (logical) checkpoint;
    # `logical` says which physical tensors each dequantized one is made from, `physical_info` is the real headers.
    dequantizer: Dequantizer | None = None
    logical: dict[str, LogicalTensor] = field(default_factory=dict)
    physical_info: dict[str, TensorInfo] | None = None
    stored_at: dict[str, Stored] = field(default_factory=dict)  # every stored tensor: its file and byte range
    layout: Layout | None = None  # the stream order and the output shards

    @property
    def stored_info(self) -> dict[str, TensorInfo]:
        """Every tensor as the source files store it (what the shard reader checks the headers against)."""
        return self.physical_info if self.physical_info is not None else self.tensor_info

    @property
    def rules(self) -> dict[str, TensorRule]:
        return self.tensors.rules

    @property
    def extra_files(self) -> list[str]:
        """Files published as they are, after the shards."""
        return [name for name, d in self.files.items() if d.action == "carry"]

    @property
    def left_out(self) -> dict[str, str]:
        """Files not carried into the output, with the reason (said in the plan and the model card)."""
        return {name: d.reason for name, d in self.files.items() if d.action == "leave_out"}

    @property
    def carried_bytes(self) -> int:
        return sum(self.sizes[name] for name in self.extra_files)

    @property
    def input_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def outputs(self) -> list:
        assert self.layout is not None
        return self.layout.outputs

    def largest_tensor(self) -> int:
        """Bytes of the largest stored tensor: the window must hold one whole."""
        return max((s.end - s.start for s in self.stored_at.values()), default=0)

    def output_pair(self) -> int:
        """Bytes the output pool needs: two consecutive output shards."""
        return largest_pair(o.expected_size for o in self.outputs)


def build_plan(source: Source, settings: QuantSettings, meta_dir: Path, *, trust_remote_code: bool = False) -> Plan:
    """Read config, index and headers; refuse inputs streamq cannot convert faithfully."""
    files = source.files()
    if "config.json" not in files:
        raise UnsupportedModelError(f"{source.name} has no config.json; streamq converts transformers model repos")
    config = json.loads(source.read_text("config.json"))
    dequantizer = dequantizer_for(source.name, config)  # refuses quantized sources it cannot dequantize exactly
    if dequantizer is not None:
        config = without_quantization(config)
    elif settings.quant_type == "bf16":
        raise UnsupportedModelError(f"{source.name} is not quantized; quant_type bf16 writes a quantized (FP8, MXFP4) source dequantized")
    shard_names, index = _weight_files(source, files)
    weight_map = index["weight_map"] if index is not None else None
    file_headers = source.headers(shard_names)
    headers = {name: file_headers[name].tensors for name in shard_names}
    stored = _stored(shard_names, file_headers, files)
    tensor_info: dict[str, TensorInfo] = {}
    shards = []
    for name in shard_names:
        keys = tuple(headers[name])
        for key in keys:
            if key in tensor_info:
                raise CorruptShardError(f"{name}: tensor {key} also appears in another shard; the checkpoint is inconsistent")
            tensor_info[key] = headers[name][key]
        if weight_map is not None:
            _check_index(name, keys, weight_map)
        shards.append(ShardPlan(name, files[name].size, files[name].sha256, keys))
    if weight_map is not None:
        listed = set(weight_map) - set(tensor_info)
        if listed:
            raise CorruptShardError(f"{INDEX_NAME} names {len(listed)} tensor(s) no shard holds, e.g. {sorted(listed)[0]}")
    physical_info, logical = None, {}
    if dequantizer is not None:
        physical_info = tensor_info
        dtype = _dequantized_dtype(source.name, config)
        if settings.quant_type == "bf16" and dtype != "bfloat16":
            raise UnsupportedModelError(f"{source.name} dequantizes to {dtype}, not bfloat16; choose quant_type nf4, fp4 or int4")
        headers, logical = logical_checkpoint(dequantizer, headers, dtype)
        tensor_info = {key: info for header in headers.values() for key, info in header.items()}
        shards = [ShardPlan(s.name, s.size, s.sha256, tuple(headers[s.name])) for s in shards]
    _check_tensors(tensor_info, headers, scales_allowed=dequantizer is not None)
    config_dir = _stage_config(source, files, meta_dir, trust_remote_code, config if dequantizer is not None else None)
    tensors = plan_tensors(
        config,
        tensor_info,
        settings,
        first_shard=headers[shard_names[0]],
        read_tensors=_tensor_reader(source, stored, shard_names, physical_info if physical_info is not None else tensor_info),
        index_metadata=index.get("metadata") if index is not None else None,
        trust_remote_code=trust_remote_code,
        model_dir=str(config_dir),
    )
    decisions = classify_files(sorted(files), shard_names, source.read_text)
    sizes = {name: f.size for name, f in files.items()}
    plan = Plan(
        source.name, source.revision, settings, config, shards, tensors, tensor_info, sizes, decisions, list(tensors.warnings),
        dequantizer, logical, physical_info, stored,
    )
    plan.layout = _layout(plan, shard_names)
    return plan


def _stored(names: list[str], headers: dict[str, FileHeader], files: dict[str, SourceFile]) -> dict[str, Stored]:
    """Where every stored tensor's bytes are. A file whose header does not describe its bytes exactly (each
    tensor's size from its dtype and shape, back to back, ending where the file ends) is refused now,
    before anything is downloaded."""
    stored = {}
    for index, name in enumerate(names):
        header, size = headers[name], files[name].size
        at = header.data_start
        for key, (start, end) in sorted(header.offsets.items(), key=lambda kv: kv[1]):
            info = header.tensors[key]
            itemsize = STORED_DTYPES[info.dtype].itemsize if info.dtype in STORED_DTYPES else None
            if itemsize is not None and end - start != _numel(info.shape) * itemsize:
                raise CorruptShardError(f"{name}: tensor {key} has {end - start} bytes, not the {info.dtype} {list(info.shape)} its header says")
            if start != at:
                raise CorruptShardError(f"{name}: its tensors' data offsets overlap or leave gaps (at {key}); the file is damaged")
            at = end
            stored[key] = Stored(key, index, start, end)
        if at != size:
            why = "is shorter than" if at > size else "is longer than"
            raise CorruptShardError(f"{name}: the file ({size} bytes) {why} its header says ({at} bytes); it is truncated or damaged")
    return stored


def _layout(plan: Plan, names: list[str]) -> Layout:
    converter = converter_for(plan.settings)
    items, sizes, entries = {}, {}, {}
    for key, rule in plan.rules.items():
        if rule.action == "drop" or key not in plan.tensor_info:
            continue
        items[key] = plan.logical[key].parts if key in plan.logical else (key,)
        info = plan.tensor_info[key]
        shape = info.shape[::-1] if rule.transpose else info.shape
        if rule.action == "keep":
            sizes[key] = _numel(info.shape) * _itemsize(rule, info)
            entries[key] = [(rule.out_key, len(info.shape))]
        else:
            sizes[key] = converter.expected_size(shape)
            entries[key] = quantized_entries(rule.out_key, len(shape))
    return plan_layout(names, plan.stored_at, items, sizes, entries, plan.settings.max_shard_size)


def _tensor_reader(source: Source, stored: dict[str, Stored], names: list[str], info: dict[str, TensorInfo]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """Read whole tensors by checkpoint key (by byte range, not their files), for the rare decision that
    depends on values, not headers. These bytes are not checked against the file's sha256: they only
    decide whether two tensors are tied, and the run itself reads and checks every byte it converts."""

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        found = {}
        for key in keys:
            where = stored[key]
            logger.info("reading %s from %s to compare tied weights", key, names[where.file])
            found[key] = stored_tensor(bytearray(source.read_range(names[where.file], where.start, where.end)), info[key])
        return found

    return read


def _dequantized_dtype(name: str, config: dict[str, Any]) -> str:
    """The dtype transformers dequantizes a quantized source to: the model dtype config.json names."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value in ("float16", "bfloat16", "float32"):
            return value
    raise UnsupportedModelError(
        f"{name} is quantized and its config.json names no dtype (float16, bfloat16 or float32), so the dtype "
        "transformers would dequantize it to is not known; add \"dtype\": \"bfloat16\" to a copy of the repo"
    )


def _weight_files(source: Source, files: dict[str, SourceFile]) -> tuple[list[str], dict[str, Any] | None]:
    """The shard names (sorted, as transformers orders them), and the parsed index if any."""
    if INDEX_NAME in files:
        try:
            index = json.loads(source.read_text(INDEX_NAME))
            weight_map = index["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptShardError(f"{INDEX_NAME} is not a valid index ({exc})") from exc
        missing = [n for n in names if n not in files]
        if missing:
            raise CorruptShardError(f"{INDEX_NAME} names shard {missing[0]}, which is not in {source.name}")
        return names, index
    if SINGLE_NAME in files:
        return [SINGLE_NAME], None
    others = [f for f in files if WEIGHT_FILE.search(f)]
    found = f" (found: {', '.join(others[:3])})" if others else ""
    raise NoSafetensorsError(
        f"{source.name} has no safetensors weights{found}; streamq reads only safetensors, never pickle files. "
        "Convert the model to safetensors first (for example by loading and saving it with transformers)"
    )


def _check_index(name: str, keys: tuple[str, ...], weight_map: dict[str, str]) -> None:
    for key in keys:
        if weight_map.get(key) != name:
            raise CorruptShardError(
                f"{name} holds tensor {key}, but {INDEX_NAME} maps it to {weight_map.get(key)!r}; the index is inconsistent"
            )


def _check_tensors(tensor_info: dict[str, TensorInfo], headers: dict[str, dict[str, TensorInfo]], scales_allowed: bool = False) -> None:
    """`scales_allowed`: a dequantized source's leftover scales (activation or KV-cache) are dropped by planning."""
    quantized = [] if scales_allowed else [k for k in tensor_info if QUANTIZED_KEY.search(k)]
    if quantized:
        raise AlreadyQuantizedError(
            f"the checkpoint already holds quantized tensors (e.g. {quantized[0]}); start from the full-precision model"
        )
    for name, tensors in headers.items():
        for key, info in tensors.items():
            if info.dtype not in TORCH_DTYPES:
                hint = " but config.json has no quantization_config saying how to dequantize it" if info.dtype.startswith("F8") else ""
                raise UnsupportedDtypeError(
                    f"{name}: tensor {key} has dtype {info.dtype}{hint}; streamq converts F16, BF16, F32 and F64 weights"
                )


def _stage_config(
    source: Source, files: dict[str, SourceFile], meta_dir: Path, trust_remote_code: bool, config: dict[str, Any] | None = None
) -> Path:
    """Put config.json (and custom code, only if trusted) where transformers' AutoConfig can read it;
    `config`, when given, is written instead of the source's (a dequantized source's, without its quantization)."""
    meta_dir.mkdir(parents=True, exist_ok=True)
    wanted = ["config.json"] + ([f for f in files if f.endswith(".py")] if trust_remote_code else [])
    for name in wanted:
        source.copy_to(name, meta_dir / name)
    if config is not None:
        (meta_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return meta_dir


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def _itemsize(rule: TensorRule, info: TensorInfo) -> int:
    return _ITEMSIZE.get(rule.dtype or "", STORED_DTYPES[info.dtype].itemsize if info.dtype in STORED_DTYPES else 4)


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel
