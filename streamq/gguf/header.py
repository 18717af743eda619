"""GGUF headers, written before the data: each file's metadata, tensor infos and data offsets are known
from the plan, so a tensor's bytes can be written at their place as soon as they are computed.

The bytes are gguf-py's own serialization. Split files follow `llama-gguf-split --split`: the model's
metadata in the first file only, then `split.no`, `split.tensors.count`, `split.count` in every file (the
tool sets `split.count` twice, and ggml moves a key set again to the end), tensors cut where the next one
would pass the size limit (tensor bytes padded to the alignment, headers not counted).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .llama_cpp import converter

SPLIT_NAME = "{prefix}-{index:05d}-of-{count:05d}.gguf"  # llama.cpp's llama_split_path


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: int
    shape: tuple[int, ...]  # numpy order
    nbytes: int


@dataclass(frozen=True)
class FilePlan:
    """One GGUF file: its header bytes and where each of its tensors' data goes in it."""

    name: str
    header: bytes  # padded to the alignment: data starts right after
    tensors: tuple[TensorEntry, ...]
    offsets: tuple[int, ...]  # of each tensor's data, from the start of the file
    size: int  # the whole file, padding included


def pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def file_plan(name: str, kv: dict[str, Any], tensors: Sequence[TensorEntry], alignment: int) -> FilePlan:
    _, gguf = converter()
    writer = gguf.GGUFWriter(None, arch="")
    writer.kv_data = [dict(kv)]
    for t in tensors:
        writer.tensors[0][t.name] = gguf.TensorInfo(shape=t.shape, dtype=gguf.GGMLQuantizationType(t.qtype), nbytes=t.nbytes)
    writer.data_alignment = alignment
    out = io.BytesIO()
    writer.fout, writer.state = [out], gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    header = out.getvalue()
    header += bytes(pad(len(header), alignment) - len(header))
    offsets, at = [], len(header)
    for t in tensors:
        offsets.append(at)
        at += pad(t.nbytes, alignment)
    return FilePlan(name, header, tuple(tensors), tuple(offsets), at)


def split_files(prefix: str, kv: dict[str, Any], tensors: Sequence[TensorEntry], alignment: int, max_size: int) -> list[FilePlan]:
    """One file `<prefix>.gguf` if every tensor fits in `max_size` bytes, else llama-gguf-split's files."""
    _, gguf = converter()
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for t in tensors:
        n = pad(t.nbytes, alignment)
        if groups[-1] and size + n > max_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    if len(groups) == 1:
        return [file_plan(f"{prefix}.gguf", kv, tensors, alignment)]
    keys = gguf.Keys.Split
    files = []
    for index, group in enumerate(groups):
        split_kv = {
            keys.LLM_KV_SPLIT_NO: gguf.GGUFValue(index, gguf.GGUFValueType.UINT16),
            keys.LLM_KV_SPLIT_TENSORS_COUNT: gguf.GGUFValue(len(tensors), gguf.GGUFValueType.INT32),
            keys.LLM_KV_SPLIT_COUNT: gguf.GGUFValue(len(groups), gguf.GGUFValueType.UINT16),
        }
        name = SPLIT_NAME.format(prefix=prefix, index=index + 1, count=len(groups))
        files.append(file_plan(name, {**kv, **split_kv} if index == 0 else split_kv, group, alignment))
    return files
