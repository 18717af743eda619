"""Fast CPU 4-bit (NF4/FP4) quantization, byte-identical to bitsandbytes on CPU.

bitsandbytes (0.50) quantizes on CPU with its torch "default" 4-bit op (fp32 math: absmax per
block, multiply by 1/absmax, bucketize against the code's midpoints, pack two nibbles) and, for
double quant, its native 8-bit blockwise op over the absmax (absmax per 256-block, then a
65536-entry lookup table into the dynamic map). That is many passes over memory with big fp32
temporaries. Here the same arithmetic runs as one fused numba pass (over block ranges, on all cores) that reads
bf16/fp16/fp32 directly. `quantize_4bit` checks itself against the installed bitsandbytes once per
setting and falls back to it whenever it cannot promise identical bytes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bitsandbytes
import bitsandbytes.functional as bnbf
import numpy as np
import torch
from bitsandbytes.functional import QuantState

try:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # callers check AVAILABLE (or supports()) and let bitsandbytes do the work
    AVAILABLE = False
else:
    AVAILABLE = True

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb.functional.quantize_4bit accepts
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NESTED_BLOCKSIZE = 256  # bnb quantizes the absmax of double quant in blocks of 256
_TINY = np.float32(1e-38)  # bnb clamps absmax to this before taking 1/absmax
_JOB_WEIGHTS = 1 << 20  # weights per job handed to a thread (~2 ms of one core)


def supports(weight: torch.Tensor, quant_type: str, blocksize: int) -> bool:
    """Whether `quantize_4bit` runs the numba kernel for this weight (else it calls bitsandbytes)."""
    return (
        AVAILABLE
        and weight.device.type == "cpu"
        and weight.dtype in DTYPES
        and weight.is_contiguous()
        and weight.numel() > 0
        and quant_type in QUANT_TYPES
        and blocksize in BLOCKSIZES
    )


def quantize_4bit(
    weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """Same result as `bnb.functional.quantize_4bit(weight, ..., quant_storage=torch.uint8)` on CPU, faster."""
    if supports(weight, quant_type, blocksize) and _agrees_with_bnb(
        weight.dtype, quant_type, blocksize, compress_statistics
    ):
        result = _quantize(weight, quant_type, blocksize, compress_statistics)
        if result is not None:
            return result
    return _bnb_quantize_4bit(weight, quant_type, blocksize, compress_statistics)


def _bnb_quantize_4bit(
    weight: torch.Tensor, quant_type: str, blocksize: int, compress_statistics: bool
) -> tuple[torch.Tensor, QuantState]:
    return bnbf.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type,
        quant_storage=torch.uint8,
    )


def _quantize(
    weight: torch.Tensor, quant_type: str, blocksize: int, compress_statistics: bool
) -> tuple[torch.Tensor, QuantState] | None:
    """The kernel's result, or None when a block's absmax is NaN.

    A NaN absmax carries NaN payload bits that depend on torch's internal conversion and reduction
    paths (fp16 NaN widens differently in its scalar and vector loops), so bitsandbytes has to
    produce those itself; the packed codes would match either way.
    """
    n = weight.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    bounds, steps, top = _code_table(quant_type)
    kernel = _KERNELS[weight.dtype, all(step == 1 for step in steps)]
    words, out = _words(weight), packed.numpy().reshape(-1)
    _in_parallel(
        lambda first, last: kernel(words, first, last, blocksize, bounds, steps, top, out, absmax.numpy()),
        absmax.numel(), max(1, _JOB_WEIGHTS // blocksize),
    )
    if np.isnan(absmax.numpy()).any():  # numpy: one thread (torch's would leave its idle workers spinning)
        return None

    code = bnbf.get_4bit_type(quant_type, device="cpu")
    if not compress_statistics:
        return packed, QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    offset = _mean(absmax)
    dynamic = _dynamic_map()
    qabsmax = torch.empty(absmax.shape, dtype=torch.uint8)
    nested_absmax = torch.empty(-(-absmax.numel() // _NESTED_BLOCKSIZE), dtype=torch.float32)
    _quantize_nested(absmax.numpy(), np.float32(offset.item()), _dynamic_lut(dynamic.numpy().tobytes()),
                     qabsmax.numpy(), nested_absmax.numpy())
    state2 = QuantState(absmax=nested_absmax, code=dynamic.clone(), blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
    return packed, QuantState(
        absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
        quant_type=quant_type, offset=offset, state2=state2,
    )


def _in_parallel(run: Callable[[int, int], None], blocks: int, step: int) -> None:
    """Run `run(first, last)` over ranges of `step` blocks, on all cores.

    Threads of our own (the kernel releases the GIL) rather than numba's parallel loops: under
    OpenMP, a core that finished its static share spun at the barrier while the download and
    hashing threads needed it, and the kernel took 4x its CPU time on a busy 2-core VM. Here an
    idle worker just takes the next range, and a waiting one sleeps.
    """
    ranges = [(first, min(first + step, blocks)) for first in range(0, blocks, step)]
    if len(ranges) == 1:
        run(*ranges[0])
        return
    for future in [_pool().submit(run, first, last) for first, last in ranges]:
        future.result()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), "streamq-kernel")


def _mean(values: torch.Tensor) -> torch.Tensor:
    """`values.mean()` as bnb computes it (torch's parallel reduction, whose bits depend on the thread
    count), but on a thread that ends right after: the OpenMP workers of a thread that lives on spin
    for ~10 ms after each parallel op, CPU that a 2-core VM's download and hashing threads need (4
    CPU-seconds over a 4.5 GB model). A new thread runs with torch's thread count; same bits."""
    with ThreadPoolExecutor(1, "streamq-mean") as thread:
        return thread.submit(values.mean).result()


def _words(weight: torch.Tensor) -> np.ndarray:
    """The weight's raw bits as unsigned integers, without a copy (the kernels decode them)."""
    flat = weight.detach().reshape(-1)
    if weight.dtype == torch.float32:
        return flat.view(torch.int32).numpy().view(np.uint32)
    return flat.view(torch.int16).numpy().view(np.uint16)


@functools.cache
def _code_table(quant_type: str) -> tuple[tuple[np.float32, ...], tuple[np.int32, ...], np.int32]:
    """(bounds, steps, top) such that the 4-bit index of x is `top - sum(steps[k] for x <= bounds[k])`.

    bnb computes `order[bucketize(x, bounds)]` with bounds the midpoints of the sorted code and
    order its argsort (identity for NF4). bucketize(x) counts the bounds b with not b >= x (ties
    go down, NaN lands in the top bucket), and since that set is a prefix of the sorted bounds the
    order lookup telescopes into the sum above, branch-free and NaN-correct.
    """
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)  # the same calls as bnb's _get_4bit_quantize_bounds
    bounds = ((code[order[:-1]] + code[order[1:]]) / 2).numpy()
    order = order.numpy()
    return tuple(bounds), tuple(np.int32(order[k + 1] - order[k]) for k in range(15)), np.int32(order[15])


def _dynamic_map() -> torch.Tensor:
    """The 8-bit dynamic code bnb's quantize_blockwise uses for the nested absmax (its own cached copy)."""
    if "dynamic" not in bnbf.name2qmap:
        bnbf.name2qmap["dynamic"] = bnbf.create_dynamic_map().to("cpu")
    return bnbf.name2qmap["dynamic"].cpu()  # bnb moves its cached copy to the GPU once it quantizes there


@functools.lru_cache(maxsize=4)
def _dynamic_lut(code_bytes: bytes) -> np.ndarray:
    """bnb's native build_quantize_lut: for i in 0..65535 the number of code midpoints below -1 + 2i/65535."""
    code = np.frombuffer(code_bytes, dtype=np.float32)
    midpoints = (code[:-1] + code[1:]) * np.float32(0.5)
    values = np.arange(0, 2 * 65536, 2).astype(np.float32) / np.float32(65535) - np.float32(1)
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


@functools.cache
def _agrees_with_bnb(dtype: torch.dtype, quant_type: str, blocksize: int, compress_statistics: bool) -> bool:
    """Compare with the installed bitsandbytes once per setting, so a bnb release that changes its
    arithmetic makes us fall back instead of writing different bytes."""
    probe = _probe(dtype, blocksize)
    ours = _quantize(probe, quant_type, blocksize, compress_statistics)
    theirs = _bnb_quantize_4bit(probe, quant_type, blocksize, compress_statistics)
    agree = ours is not None and same_bytes(ours, theirs)
    if not agree:
        logger.warning("CPU 4-bit kernel differs from bitsandbytes %s for %s/%s/blocksize %d/double quant %s; "
                       "using bitsandbytes", bitsandbytes.__version__, dtype, quant_type, blocksize,
                       compress_statistics)
    return agree


def _probe(dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Weights with the awkward parts: varied block scales, a zero block, denormals, a partial last block."""
    gen = torch.Generator().manual_seed(0)
    blocks = _NESTED_BLOCKSIZE + 3  # two nested blocks, the second partial
    x = torch.randn(blocks, blocksize, generator=gen) * torch.logspace(-3, 2, blocks).unsqueeze(1)
    x[1] = 0
    x[2] = torch.finfo(dtype).tiny * torch.rand(blocksize, generator=gen)
    return torch.cat([x.reshape(-1), torch.randn(blocksize // 2 + 1, generator=gen)]).to(dtype)


def same_bytes(a: tuple[torch.Tensor, QuantState], b: tuple[torch.Tensor, QuantState]) -> bool:
    """Whether two quantize_4bit results serialize to identical bytes (packed data and every state tensor)."""
    da, db = a[1].as_dict(packed=True), b[1].as_dict(packed=True)
    return (
        _bytes_equal(a[0], b[0])
        and da.keys() == db.keys()
        and all(_bytes_equal(da[k], db[k]) for k in da)
    )


def _bytes_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
    )


if AVAILABLE:

    @intrinsic
    def _f32_from_bits(typingctx, bits):
        """Reinterpret 32 integer bits as a float32."""
        if not (isinstance(bits, types.Integer) and bits.bitwidth == 32):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _f32_from_half_bits(typingctx, bits):
        """Widen fp16 bits to float32 exactly (numba has no float16 arrays on CPU)."""
        if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
            return None

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(bits), codegen

    @njit(inline="always")
    def _load_bf16(word):
        return _f32_from_bits(np.uint32(np.uint32(word) << 16))

    @njit(inline="always")
    def _load_fp16(word):
        return _f32_from_half_bits(np.uint16(word))

    @njit(inline="always")
    def _load_fp32(word):
        return _f32_from_bits(np.uint32(word))

    @njit(inline="always")
    def _max_abs_word(words, abs_mask):
        """Largest |x| of `words` as raw bits: sign-cleared float bits order like the values, and any
        NaN sorts above inf, so a NaN block yields a NaN absmax."""
        m = words[0] & abs_mask
        for i in range(1, words.size):
            w = words[i] & abs_mask
            if w > m:
                m = w
        return m

    @njit(inline="always")
    def _clamp_tiny(x):
        """torch.clamp(x, min=1e-38): NaN passes through."""
        return _TINY if x < _TINY else x

    @njit(inline="always")
    def _code(x, b, s, top):
        """4-bit index of a scaled value; see _code_table. Spelled out so LLVM keeps the bounds in registers."""
        return (
            top
            - (x <= b[0]) * s[0] - (x <= b[1]) * s[1] - (x <= b[2]) * s[2] - (x <= b[3]) * s[3]
            - (x <= b[4]) * s[4] - (x <= b[5]) * s[5] - (x <= b[6]) * s[6] - (x <= b[7]) * s[7]
            - (x <= b[8]) * s[8] - (x <= b[9]) * s[9] - (x <= b[10]) * s[10] - (x <= b[11]) * s[11]
            - (x <= b[12]) * s[12] - (x <= b[13]) * s[13] - (x <= b[14]) * s[14]
        )

    @njit(inline="always")
    def _code_sorted(x, b, s, top):
        """`_code` for a code whose order is the identity (NF4: every step is 1): a compare and a subtract
        per bound, where the steps cost a mask each (10-15% of the kernel's time)."""
        return (
            top
            - (x <= b[0]) - (x <= b[1]) - (x <= b[2]) - (x <= b[3]) - (x <= b[4]) - (x <= b[5]) - (x <= b[6])
            - (x <= b[7]) - (x <= b[8]) - (x <= b[9]) - (x <= b[10]) - (x <= b[11]) - (x <= b[12]) - (x <= b[13])
            - (x <= b[14])
        )

    @njit(inline="always")
    def _pack(codes, count, packed):
        """Two indices per byte, the even element in the high nibble."""
        for j in range(count // 2):
            packed[j] = (codes[2 * j] << 4) | codes[2 * j + 1]

    @njit(inline="always")
    def _quantize_words(words, first, last, load, abs_mask, code, blocksize, bounds, steps, top, packed, absmax):
        """Blocks first..last-1 of `words`: absmax, x * (1/absmax), index, pack; a partial last block
        the way bnb does it.

        Each block is read through a slice of its own, indexed from 0: indexing `words[start + i]`
        left LLVM unable to prove the index non-negative, and numba's negative-index wrap-around then
        turned the vector loads into element-by-element inserts.
        """
        n = words.size
        full = min(n // blocksize, last)
        codes = np.empty(blocksize + 1, np.int32)
        for block in range(first, full):
            start = block * blocksize
            values = words[start:start + blocksize]
            amax = load(_max_abs_word(values, abs_mask))
            absmax[block] = amax
            scale = np.float32(1.0) / _clamp_tiny(amax)
            for i in range(blocksize):
                codes[i] = code(load(values[i]) * scale, bounds, steps, top)
            _pack(codes, blocksize, packed[start // 2:(start + blocksize) // 2])
        start = full * blocksize
        if full < last and start < n:
            # bnb treats the partial block apart: it stores the clamped absmax, divides instead of
            # multiplying by the reciprocal, and pads an odd count with a (scaled) zero.
            values = words[start:n]
            amax = _clamp_tiny(load(_max_abs_word(values, abs_mask)))
            absmax[full] = amax
            rem = n - start
            for i in range(rem):
                codes[i] = code(load(values[i]) / amax, bounds, steps, top)
            codes[rem] = code(np.float32(0.0), bounds, steps, top)
            _pack(codes, rem + 1, packed[start // 2:])

    # One compiled kernel per source dtype and code shape (numba caches top-level functions only).
    @njit(nogil=True, cache=True)
    def _quantize_bf16(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_bf16, np.uint16(0x7FFF), _code, blocksize, bounds, steps, top, packed, absmax)

    @njit(nogil=True, cache=True)
    def _quantize_fp16(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_fp16, np.uint16(0x7FFF), _code, blocksize, bounds, steps, top, packed, absmax)

    @njit(nogil=True, cache=True)
    def _quantize_fp32(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_fp32, np.uint32(0x7FFFFFFF), _code, blocksize, bounds, steps, top, packed, absmax)

    @njit(nogil=True, cache=True)
    def _quantize_bf16_sorted(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_bf16, np.uint16(0x7FFF), _code_sorted, blocksize, bounds, steps, top, packed, absmax)

    @njit(nogil=True, cache=True)
    def _quantize_fp16_sorted(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_fp16, np.uint16(0x7FFF), _code_sorted, blocksize, bounds, steps, top, packed, absmax)

    @njit(nogil=True, cache=True)
    def _quantize_fp32_sorted(words, first, last, blocksize, bounds, steps, top, packed, absmax):
        _quantize_words(words, first, last, _load_fp32, np.uint32(0x7FFFFFFF), _code_sorted, blocksize, bounds, steps, top, packed, absmax)

    _KERNELS = {  # (dtype, sorted code) -> kernel
        (torch.bfloat16, False): _quantize_bf16, (torch.float16, False): _quantize_fp16, (torch.float32, False): _quantize_fp32,
        (torch.bfloat16, True): _quantize_bf16_sorted, (torch.float16, True): _quantize_fp16_sorted,
        (torch.float32, True): _quantize_fp32_sorted,
    }

    @njit(inline="always")
    def _lut_index(v):
        """bnb's norm_to_lut_index: (uint16)(int)fmaf((clamp(v, -1, 1) + 1) * 0.5, 65535, 0.5).

        The product and sum are exact in float64 (at most 42 significant bits), so one rounding
        to float32 equals the fused multiply-add; a NaN converts to INT_MIN, whose low 16 bits are 0.
        """
        if v != v:
            return 0
        v = max(min(v, np.float32(1.0)), np.float32(-1.0))
        t = (v + np.float32(1.0)) * np.float32(0.5)
        return int(np.float32(np.float64(t) * 65535.0 + 0.5))

    @njit(nogil=True, cache=True)
    def _quantize_nested(values, offset, lut, codes, absmax):
        """bnb's native 8-bit blockwise quantization of (values - offset) in blocks of 256 (1/64 of
        the work of the weight itself: one thread)."""
        n = values.size
        for block in range(-(-n // _NESTED_BLOCKSIZE)):
            start = block * _NESTED_BLOCKSIZE
            stop = min(start + _NESTED_BLOCKSIZE, n)
            amax = np.float32(0.0)
            for i in range(start, stop):
                a = abs(values[i] - offset)
                if a > amax:  # NaN never wins, as with std::max in bnb's C++
                    amax = a
            absmax[block] = amax
            if amax == 0:
                codes[start:stop] = 0
                continue
            inv = np.float32(1.0) / amax
            for i in range(start, stop):
                codes[i] = lut[_lut_index((values[i] - offset) * inv)]
