"""A tensor's bytes in a llama-quantize type: the intermediate's values (bf16) widened to f32, as
llama-quantize reads them, then llama.cpp's own quantizer (`ggml_quantize_chunk` of libggml-base). Rows
are independent, so they are quantized in chunks on several threads, as llama-quantize does."""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .llama_cpp import converter, libraries

ROWS_PER_TASK = 512


def to_f32(data: np.ndarray, qtype: int) -> np.ndarray:
    """The f32 values of F32/F16/BF16 bytes, exactly (ggml's bf16 -> f32 is a shift)."""
    _, gguf = converter()
    t = gguf.GGMLQuantizationType
    raw = data.reshape(-1).view(np.uint8)
    if qtype == t.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if qtype == t.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == t.F32:
        return raw.view(np.float32)
    raise ValueError(f"cannot widen ggml type {qtype} to f32")


def quantize_rows(values: np.ndarray, n_per_row: int, qtype: int) -> np.ndarray:
    """llama.cpp's quantization of f32 rows of `n_per_row` values into `qtype` (no importance matrix)."""
    _, gguf = converter()
    ggml, _ = libraries()
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    rows = values.size // n_per_row
    row_bytes = n_per_row // block * type_size
    out = np.empty(rows * row_bytes, dtype=np.uint8)
    fn = ggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    src, dst = values.ctypes.data, out.ctypes.data

    def run(first: int) -> None:
        n = min(ROWS_PER_TASK, rows - first)
        # ggml_quantize_chunk takes `start` as an element index into src and writes at the same row of dst
        fn(qtype, src, dst, first * n_per_row, n, n_per_row, None)

    starts = range(0, rows, ROWS_PER_TASK)
    if len(starts) == 1:
        run(0)
    else:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(run, starts))
    return out
