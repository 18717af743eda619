"""Fast CPU 4-bit (NF4/FP4) quantization, byte-identical to bitsandbytes on CPU.

bitsandbytes (0.50) quantizes on CPU with its torch "default" 4-bit op (fp32 math: absmax per
block, multiply by 1/absmax, bucketize against the code's midpoints, pack two nibbles) and, for
double quant, its native 8-bit blockwise op over the absmax (absmax per 256-block, then a
65536-entry lookup table into the dynamic map). That is many passes over memory with big fp32
temporaries. Here the same arithmetic runs as one fused pass of C (`quant4.c`, over block ranges, on
all cores) that reads bf16/fp16/fp32 directly. `quantize_4bit` checks itself against the installed
bitsandbytes once per setting and falls back to it whenever it cannot promise identical bytes, or
when the compiled library is missing (its build failed: setup.py records why).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import numpy as np
import torch
from bitsandbytes.functional import QuantState

logger = logging.getLogger(__name__)
BUILD_RECORD = "_quant4_build_error.txt"  # written by setup.py when the build fails


def _load_library() -> ctypes.CDLL | None:
    """The compiled `quant4.c` (built by setuptools as an optional extension, loaded with ctypes, which
    releases the GIL during each call), or None where it was not built."""
    spec = importlib.util.find_spec(f"{__package__}._quant4")
    if spec is None or spec.origin is None:
        logger.warning("streamq's CPU kernel is not built: %s; bitsandbytes quantizes instead, much slower. "
                       "Reinstall streamq (pip install) where a C compiler (gcc or clang) works", not_built_reason())
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        logger.warning("streamq's CPU kernel %s does not load (%s); using bitsandbytes", spec.origin, exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in _KERNEL_NAMES.values():
        getattr(lib, name).argtypes = [p, i64, i64, i64, i64, p, p, ctypes.c_int32, p, p]
        getattr(lib, name).restype = None
    lib.quantize_nested.argtypes = [p, i64, ctypes.c_float, p, p, p]
    lib.quantize_nested.restype = None
    lib.quant4_has_avx512.restype = ctypes.c_int
    ctypes.c_int.in_dll(lib, "quant4_use_avx512").value = lib.quant4_has_avx512()
    return lib


def not_built_reason(record: Path = Path(__file__).with_name(BUILD_RECORD)) -> str:
    """Why the kernel is missing, as setup.py recorded it; no record means no build was attempted."""
    if record.is_file():
        return f"{record.read_text().strip()} when streamq was installed"
    return "no build of it was attempted for this copy of streamq (imported from a source tree, as through PYTHONPATH, or from a wheel without it)"


_KERNEL_NAMES = {  # (dtype, sorted code) -> kernel in quant4.c
    (dtype, sorted_code): f"quantize_{name}{'_sorted' if sorted_code else ''}"
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"))
    for sorted_code in (False, True)
}
_LIB = _load_library()
AVAILABLE = _LIB is not None
AVX512 = AVAILABLE and bool(ctypes.c_int.in_dll(_LIB, "quant4_use_avx512").value)  # whole blocks take the 16-lane path

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb.functional.quantize_4bit accepts
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NESTED_BLOCKSIZE = 256  # bnb quantizes the absmax of double quant in blocks of 256
_JOB_WEIGHTS = 1 << 20  # weights per job handed to a thread: a few ms of one core


def supports(weight: torch.Tensor, quant_type: str, blocksize: int) -> bool:
    """Whether `quantize_4bit` runs the C kernel for this weight (else it calls bitsandbytes)."""
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
    kernel = getattr(_LIB, _KERNEL_NAMES[weight.dtype, bool((steps == 1).all())])
    _in_parallel(
        lambda first, last: kernel(weight.data_ptr(), n, first, last, blocksize, bounds.ctypes.data, steps.ctypes.data,
                                   top, packed.data_ptr(), absmax.data_ptr()),
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
    lut = _dynamic_lut(dynamic.numpy().tobytes())
    _LIB.quantize_nested(absmax.data_ptr(), absmax.numel(), offset.item(), lut.ctypes.data, qabsmax.data_ptr(),
                         nested_absmax.data_ptr())
    state2 = QuantState(absmax=nested_absmax, code=dynamic.clone(), blocksize=_NESTED_BLOCKSIZE, dtype=torch.float32)
    return packed, QuantState(
        absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code,
        quant_type=quant_type, offset=offset, state2=state2,
    )


def _in_parallel(run: Callable[[int, int], None], blocks: int, step: int) -> None:
    """Run `run(first, last)` over ranges of `step` blocks, on all cores.

    Threads of our own (ctypes releases the GIL during each call) rather than OpenMP parallel loops:
    under OpenMP (an earlier numba kernel's `prange`), a core that finished its static share spun at
    the barrier while the download and hashing threads needed it, and the kernel took several times its
    CPU time on a busy 2-core VM. Here an idle worker just takes the next range, and a waiting one sleeps.
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
    for a while after each parallel op, CPU that a small VM's download and hashing threads need.
    A new thread runs with torch's thread count; same bits."""
    with ThreadPoolExecutor(1, "streamq-mean") as thread:
        return thread.submit(values.mean).result()


@functools.cache
def _code_table(quant_type: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(bounds, steps, top) such that the 4-bit index of x is `top - sum(steps[k] for x <= bounds[k])`.

    bnb computes `order[bucketize(x, bounds)]` with bounds the midpoints of the sorted code and
    order its argsort (identity for NF4). bucketize(x) counts the bounds b with not b >= x (ties
    go down, NaN lands in the top bucket), and since that set is a prefix of the sorted bounds the
    order lookup telescopes into the sum above, branch-free and NaN-correct.
    """
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)  # the same calls as bnb's _get_4bit_quantize_bounds
    bounds = ((code[order[:-1]] + code[order[1:]]) / 2).numpy().astype(np.float32)
    order = order.numpy()
    return bounds, np.diff(order).astype(np.int32), int(order[15])


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
