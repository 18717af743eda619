"""Q4_0 that keeps a QAT grid: a group of 32 weights trained on a Q4_0-style grid (w = bf16(s * q), q in
[-8, 7], one scale s per group) is written with its own scale and integers, where llama.cpp's Q4_0 would
recompute the scale (d = max / -8) and move most weights off the grid.

A group is kept only where llama.cpp's own block does not already give back the source weights and a
grid is found that does: a bf16 scale s, exact as Q4_0's f16 `d`, such that every weight comes back: a
bf16 weight rounds back to itself (bf16(d * q) == w), a finer one (a compressed-tensors int4 source's
codes times their scales, as the converter dequantizes them) equals d * q exactly, so such a source's
codes and scales are written as they are. Every other group keeps llama.cpp's bytes, so a checkpoint that
is not on a grid gets llama.cpp's file byte for byte.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK = 32  # Q4_0's block
BLOCK_BYTES = 2 + QK // 2  # f16 d, then 16 bytes of nibbles
CHUNK = 1 << 16  # groups searched at once, to bound memory
ULPS = (0, -1, 1, -2, 2)  # bf16 neighbours of max / q tried as the scale (max itself was rounded)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round f32 to bf16 (to nearest, ties to even), as the top 16 bits."""
    u = values.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return q.astype(np.float32) * d


def keep_grid(values: np.ndarray, blocks: np.ndarray, stats: Counter) -> np.ndarray:
    """`values`: f32 weights (exact widenings of bf16); `blocks`: llama.cpp's Q4_0 bytes of them. Returns
    the bytes with every grid group's own scale and integers. Counts groups, those llama.cpp's block already
    gives back exactly, and those kept from their grid here."""
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK)
    out = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, BLOCK_BYTES).copy()
    stats["q4_0_groups"] += len(x)
    starts = range(0, len(x), CHUNK)
    with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:  # numpy lets go of the GIL
        for counted in pool.map(lambda start: _keep_chunk(x[start:start + CHUNK], out[start:start + CHUNK]), starts):
            stats.update(counted)
    return out.reshape(-1)


def _gives_back(deq: np.ndarray, x: np.ndarray, bits: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Per group: every weight comes back (bf16 ones after rounding to bf16, finer ones exactly)."""
    return np.where(coarse, _bf16_bits(deq) == bits, deq == x).all(axis=1)


def _keep_chunk(x: np.ndarray, out: np.ndarray) -> Counter:
    stats: Counter = Counter()
    # a Q4_0 block holds at most 16 values: a group with more never comes back, from llama.cpp's block or a grid
    ordered = np.sort(x, axis=1)
    few = np.flatnonzero(1 + (ordered[:, 1:] != ordered[:, :-1]).sum(axis=1) <= 16)
    if not len(few):
        return stats
    xs = x[few]
    bits = _bf16_bits(xs)
    coarse = _bf16(bits) == xs  # a bf16 value
    naive_exact = _gives_back(_dequantize(out[few]), xs, bits, coarse)
    stats["q4_0_groups_exact_as_llama_cpp"] += int(naive_exact.sum())
    todo = few[~naive_exact]
    if not len(todo):
        return stats
    xs, wb, cs = xs[~naive_exact], bits[~naive_exact], coarse[~naive_exact]
    peak = xs[np.arange(len(xs)), np.abs(xs).argmax(axis=1)]
    found = np.zeros(len(xs), dtype=bool)
    scale = np.zeros(len(xs), dtype=np.float32)
    codes = np.zeros(xs.shape, dtype=np.int8)
    for q_peak in (8, 7, 6, 5, 4, 3, 2, 1):
        # the peak's integer: -q_peak for a negative peak, +q_peak (at most 7) for a positive one
        signed = np.where(peak < 0, -q_peak, q_peak).astype(np.float32)
        usable = (peak != 0) & ~((peak > 0) & (q_peak == 8))
        for ulp in ULPS:
            left = ~found & usable
            if not left.any():
                break
            base = _bf16_bits((peak / signed).astype(np.float32)).astype(np.int32) + ulp
            s = _bf16(np.clip(base, 1, 0x7F7F).astype(np.uint16))
            exact_f16 = (s.astype(np.float16).astype(np.float32) == s) & (s > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.rint(xs / s[:, None])
            in_range = ((q >= -8) & (q <= 7)).all(axis=1)
            back = (np.clip(q, -8, 7) * s[:, None]).astype(np.float32)
            match = left & exact_f16 & in_range & _gives_back(back, xs, wb, cs)
            found |= match
            scale[match] = s[match]
            codes[match] = q[match].astype(np.int8)
    kept = todo[found]
    stats["q4_0_groups_kept_from_grid"] += len(kept)
    if len(kept):
        nib = (codes[found] + 8).astype(np.uint8)
        out[kept, :2] = scale[found].astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[kept, 2:] = nib[:, :QK // 2] | (nib[:, QK // 2:] << 4)
    return stats


def grid_line(stats: dict[str, int]) -> str | None:
    """What the run kept, in words (the summary and the model card), or None where no Q4_0 group was written."""
    groups = stats.get("q4_0_groups", 0)
    if not groups:
        return None
    naive, kept = stats.get("q4_0_groups_exact_as_llama_cpp", 0), stats.get("q4_0_groups_kept_from_grid", 0)
    return (f"{naive + kept} of {groups} Q4_0 groups give back the source weights exactly: {naive} as llama.cpp's own "
            f"Q4_0 writes them, and {kept} kept on their trained grid (own scale and integers) where llama.cpp's "
            f"would have moved them ({naive / groups:.2%} exact with llama.cpp's Q4_0 alone, {(naive + kept) / groups:.2%} here)")
