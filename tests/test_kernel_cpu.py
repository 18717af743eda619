"""The C CPU kernel must give the same bytes as bitsandbytes' own CPU quantize_4bit."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import bitsandbytes.functional as bnbf

from streamq.kernels import cpu


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SETTINGS = [(d, qt, dq) for d in DTYPES for qt in ("nf4", "fp4") for dq in (False, True)]
SHAPES = [(1,), (2,), (3,), (31,), (32,), (33,), (63,), (64,), (65,), (127,), (129,), (4097,), (7, 9), (17, 31),
          (64, 64), (3, 5, 7), (300, 33), (256, 257), (11, 4096)]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


# On a CPU with AVX-512 the kernel takes a 16-lane path for whole blocks; every test runs on both paths there.
PATHS = ["generic"] + (["avx512"] if cpu.AVX512 else [])


@pytest.fixture(autouse=True, params=PATHS)
def kernel_path(request):
    """Run the test on one of the kernel's paths (the library's switch, set back afterwards)."""
    if not cpu.AVAILABLE:
        yield request.param
        return
    switch = ctypes.c_int.in_dll(cpu._LIB, "quant4_use_avx512")
    chosen = switch.value
    switch.value = int(request.param == "avx512")
    try:
        yield request.param
    finally:
        switch.value = chosen


def test_library_is_built() -> None:
    """The install compiled quant4.c (an optional extension: a failed build would otherwise only show
    as every weight going to the slow bitsandbytes path)."""
    assert cpu.AVAILABLE, "streamq/kernels/quant4.c was not built; reinstall with a C compiler present"


def test_avx512_path_is_taken_where_the_cpu_has_it() -> None:
    """A GCC build for x86-64 has the 16-lane path, and takes it exactly where /proc/cpuinfo lists
    x86-64-v4's AVX-512 subsets (so that the tests above run it there)."""
    flags = _cpu_flags()
    if not flags or platform.machine() != "x86_64":
        pytest.skip("checked on x86-64 Linux")
    assert ctypes.c_int.in_dll(cpu._LIB, "quant4_avx512_path_built").value, "quant4.c was built without GCC's x86-64 path"
    assert cpu.AVX512 == ({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags)


def bnb_quantize(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                              quant_storage=torch.uint8)


def assert_identical(ours, theirs) -> None:
    """Packed data and every tensor of as_dict(packed=True), compared byte for byte."""
    assert ours[0].dtype == theirs[0].dtype and ours[0].shape == theirs[0].shape
    assert torch.equal(ours[0], theirs[0]), f"packed data differs at {(ours[0] != theirs[0]).nonzero()[:5].tolist()}"
    d_ours, d_theirs = ours[1].as_dict(packed=True), theirs[1].as_dict(packed=True)
    assert d_ours.keys() == d_theirs.keys()
    for key in d_ours:
        a, b = d_ours[key], d_theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), key


def check(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    ours = cpu._quantize(weight, quant_type, blocksize, double_quant)
    assert ours is not None, "the kernel declined a tensor without NaN"
    assert_identical(ours, bnb_quantize(weight, quant_type, blocksize, double_quant))


@pytest.mark.parametrize("dtype,quant_type,double_quant", SETTINGS)
def test_random_shapes_and_blocksizes(dtype, quant_type, double_quant) -> None:
    gen = torch.Generator().manual_seed(len(dtype) * 7 + len(quant_type) + double_quant)
    for i, shape in enumerate(SHAPES):
        blocksize = cpu.BLOCKSIZES[i % len(cpu.BLOCKSIZES)]
        scale = 10.0 ** torch.randint(-6, 4, (), generator=gen).item()
        weight = (torch.randn(shape, generator=gen) * scale).to(DTYPES[dtype])
        check(weight, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", cpu.BLOCKSIZES)
def test_every_blocksize(blocksize) -> None:
    gen = torch.Generator().manual_seed(blocksize)
    for dtype, quant_type, double_quant in SETTINGS:
        weight = torch.randn(3 * blocksize + 5, generator=gen).to(DTYPES[dtype])
        check(weight, quant_type, blocksize, double_quant)


def special_values(dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Blocks of zeros, denormals, extreme magnitudes, signed zeros and a partial all-zero tail."""
    info = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(1)
    rand = lambda: torch.randn(blocksize, generator=gen)  # noqa: E731
    blocks = [
        torch.zeros(blocksize),
        -torch.zeros(blocksize),
        rand() * info.tiny / 8,  # denormals only (absmax below the 1e-38 clamp for fp32/bf16)
        rand() * info.tiny * 4,  # normals and denormals together
        rand().clamp(-1, 1) * info.max,  # huge: 1/absmax is itself denormal
        torch.where(rand() > 0, info.max, -info.max),
        rand() * 1e-30,
        rand() * (1e30 if dtype != torch.float16 else 1e4),
        torch.cat([torch.zeros(blocksize - 1), torch.ones(1) * info.smallest_normal]),
        rand(),
    ]
    tail = torch.zeros(blocksize // 2 + 3)
    return torch.cat(blocks + [tail]).to(dtype)


@pytest.mark.parametrize("dtype,quant_type,double_quant", SETTINGS)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_special_values(dtype, quant_type, double_quant, blocksize) -> None:
    check(special_values(DTYPES[dtype], blocksize), quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_on_bucket_bounds(quant_type) -> None:
    """Scaled values exactly on a midpoint go to the lower bucket, as torch.bucketize(right=False) does."""
    bounds = torch.tensor(cpu._code_table(quant_type)[0])
    near = torch.cat([bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.nextafter(bounds, torch.tensor(-2.0)),
                      torch.tensor([0.0, -0.0, 1.0, -1.0])])
    for absmax in (1.0, 2.0, 0.5, 3.0):  # 3.0: the reciprocal rounds, so ties shift like bnb's
        weight = torch.cat([torch.tensor([absmax]), near * absmax])
        weight = torch.cat([weight, torch.zeros(-weight.numel() % 64)])
        check(weight, quant_type, 64, False)
        check(weight[:-3], quant_type, 64, True)  # ends in a partial block: division instead of 1/absmax


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("arrangement", ["shuffled", "by magnitude"])
def test_every_16_bit_value(dtype, arrangement) -> None:
    """All 16-bit patterns but NaN (zeros, subnormals, normals, infinities), in blocks of mixed scale or
    of neighbours (whole blocks of subnormals, of infinities): the C kernel decodes each as torch does."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(DTYPES[dtype])
    values = values[~values.isnan()]
    if arrangement == "shuffled":
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(9))]
    else:
        values = values[values.float().abs().argsort(stable=True)]
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            check(values, quant_type, 64, double_quant)


@pytest.mark.parametrize("dtype,quant_type,double_quant", SETTINGS)
def test_infinities(dtype, quant_type, double_quant) -> None:
    """An inf block makes absmax inf, the double-quant offset inf and the nested values NaN: still identical."""
    weight = torch.randn(5 * 64 + 9, generator=torch.Generator().manual_seed(2))
    weight[70], weight[200], weight[-2] = float("inf"), float("-inf"), float("inf")
    check(weight.to(DTYPES[dtype]), quant_type, 64, double_quant)


@pytest.mark.parametrize("dtype,quant_type,double_quant", SETTINGS)
def test_nan_falls_back_to_bitsandbytes(dtype, quant_type, double_quant) -> None:
    """NaN absmax payload bits come from torch internals (fp16 NaN widens differently in its scalar and
    vector loops), so a tensor with NaN is handed to bitsandbytes. The codes themselves are deterministic
    (a NaN block is all top-bucket codes) and the kernel gets them right too."""
    weight = torch.randn(4 * 64 + 3, generator=torch.Generator().manual_seed(3))
    weight[5], weight[130], weight[-1] = float("nan"), float("nan"), float("nan")
    weight = weight.to(DTYPES[dtype])
    theirs = bnb_quantize(weight, quant_type, 64, double_quant)
    assert cpu._quantize(weight, quant_type, 64, double_quant) is None
    assert_identical(cpu.quantize_4bit(weight, quant_type=quant_type, blocksize=64, compress_statistics=double_quant),
                     theirs)

    packed = torch.empty_like(theirs[0]).reshape(-1)
    absmax = torch.empty(5)
    bounds, steps, top = cpu._code_table(quant_type)
    kernel = getattr(cpu._LIB, {"bf16": "quantize_bf16", "fp16": "quantize_fp16", "fp32": "quantize_fp32"}[dtype])
    kernel(weight.data_ptr(), weight.numel(), 0, 5, 64, bounds.ctypes.data, steps.ctypes.data, top, packed.data_ptr(),
           absmax.data_ptr())
    assert torch.equal(packed, theirs[0].reshape(-1))
    if not double_quant:
        assert torch.equal(absmax.isnan(), theirs[1].absmax.isnan())


def test_nested_lookup_matches_bnb_blockwise() -> None:
    """The double-quant step against bnb's native 8-bit blockwise op, across every LUT bin and its edges."""
    k = np.arange(65536, dtype=np.float64)
    centers = (2 * k / 65535 - 1).astype(np.float32)
    edges = ((2 * k[:-1] + 1) / 65535 - 1).astype(np.float32)  # where fma((v+1)/2, 65535, 0.5) reaches k+1
    values = np.concatenate([centers, edges, np.nextafter(edges, np.float32(2)), np.nextafter(edges, np.float32(-2))])
    values = np.clip(values, -1, 1)
    rows = values[: values.size // 255 * 255].reshape(-1, 255)
    blocks = np.concatenate([np.ones((rows.shape[0], 1), np.float32), rows], axis=1).reshape(-1)  # absmax 1 each
    gen = np.random.default_rng(4)
    extra = np.concatenate([gen.standard_normal(1000).astype(np.float32) * 3, np.zeros(300, np.float32),
                            np.array([np.inf, -np.inf, np.nan, 5.0], np.float32), np.zeros(256, np.float32)])
    for values in (blocks, extra, np.concatenate([blocks, extra])):
        theirs_q, theirs_state = bnbf.quantize_blockwise(torch.from_numpy(values), blocksize=256)
        codes = torch.empty(values.size, dtype=torch.uint8)
        absmax = torch.empty(-(-values.size // 256))
        dynamic = cpu._dynamic_map()
        lut = cpu._dynamic_lut(dynamic.numpy().tobytes())
        cpu._LIB.quantize_nested(values.ctypes.data, values.size, 0.0, lut.ctypes.data, codes.data_ptr(),
                                 absmax.data_ptr())
        assert torch.equal(codes, theirs_q)
        assert torch.equal(absmax.view(torch.int32), theirs_state.absmax.view(torch.int32))
        assert torch.equal(dynamic, theirs_state.code)


@pytest.mark.parametrize("dtype,quant_type", [("bf16", "nf4"), ("fp32", "fp4")])
def test_large_tensor(dtype, quant_type) -> None:
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)).to(DTYPES[dtype])
    check(weight, quant_type, 64, True)


@pytest.mark.parametrize("size,blocksize", [(2 * cpu._JOB_WEIGHTS + 37, 64), (cpu._JOB_WEIGHTS + 4096 + 5, 4096)])
def test_block_ranges_over_threads(size, blocksize) -> None:
    """A weight is quantized in ranges of blocks on several threads; the partial last block alone in
    the last range (first case) or after a full block (second) comes out as bnb's."""
    weight = torch.randn(size, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    check(weight, "nf4", blocksize, True)


def test_self_check_passes() -> None:
    """quantize_4bit only uses the kernel where its probe agrees with the installed bitsandbytes
    (the smallest and largest blocksizes here; the tests above cover the kernel at every one)."""
    for dtype, quant_type, double_quant in SETTINGS:
        for blocksize in (cpu.BLOCKSIZES[0], 64, cpu.BLOCKSIZES[-1]):
            assert cpu._agrees_with_bnb(DTYPES[dtype], quant_type, blocksize, double_quant)


def test_public_api_matches_bnb() -> None:
    weight = torch.randn(96, 130, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            assert_identical(cpu.quantize_4bit(weight, quant_type=quant_type, blocksize=128,
                                               compress_statistics=double_quant),
                             bnb_quantize(weight, quant_type, 128, double_quant))


def test_supports() -> None:
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    assert cpu.supports(weight, "nf4", 64)
    assert not cpu.supports(weight.t(), "nf4", 64)  # not contiguous
    assert not cpu.supports(weight.double(), "nf4", 64)
    assert not cpu.supports(weight, "int4", 64)
    assert not cpu.supports(weight, "nf4", 16)
    assert not cpu.supports(weight[:0], "nf4", 64)


def test_unsupported_input_falls_back() -> None:
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(7)).t()
    assert_identical(cpu.quantize_4bit(weight, quant_type="nf4", blocksize=64), bnb_quantize(weight, "nf4", 64, True))


def test_without_the_library_everything_goes_to_bnb() -> None:
    """Where quant4.c was not built the module still imports (with a warning), supports() says no and bnb does the work."""
    script = (
        "import importlib.util\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.endswith('._quant4') else find(name, *a)\n"
        "import torch\n"
        "from streamq.kernels import cpu\n"
        "w = torch.randn(64, 64, dtype=torch.bfloat16)\n"
        "assert not cpu.AVAILABLE and not cpu.supports(w, 'nf4', 64)\n"
        "packed, state = cpu.quantize_4bit(w, quant_type='fp4', blocksize=64)\n"
        "assert packed.shape == (2048, 1) and state.nested\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent,
                          capture_output=True, text=True)
    assert "CPU kernel is not built: no build of it was attempted" in done.stderr  # why it is slow, and what to do
