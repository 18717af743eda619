/* 4-bit (NF4/FP4) blockwise quantization, bit for bit what bitsandbytes 0.50 computes on CPU.
 *
 * A plain C library (no Python API), loaded with ctypes by cpu.py, which releases the GIL for the
 * call: a process loads it in microseconds, where numba spent 0.5-1 s loading its compiler before
 * the first shard could start. One pass per block reads the 16- or 32-bit words directly and fuses
 * absmax, scaling, the code search and packing. IEEE semantics are needed throughout (NaN compares
 * false, denormals kept): build without -ffast-math, with -ffp-contract=off.
 */

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTORIZED
#endif
#define INLINE static inline __attribute__((always_inline))

enum { BF16 = 0, FP16 = 1, FP32 = 2 };
#define MAX_BLOCKSIZE 4096
#define NESTED_BLOCKSIZE 256
static const float TINY = 1e-38f; /* bnb clamps absmax to this before taking 1/absmax */

INLINE float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* fp16 -> fp32, exact, branch-free so that it vectorizes: the exponent is rebiased, inf/NaN get the top
 * exponent, and a subnormal half is renormalized by one float subtraction (exact, denormals not flushed). */
INLINE float from_half(uint32_t h) {
    uint32_t o = (h & 0x7fffu) << 13, exponent = o & 0x0f800000u;
    uint32_t top = 0u - (exponent == 0x0f800000u), low = 0u - (exponent == 0);
    o += ((uint32_t)(127 - 15) << 23) + (((uint32_t)(128 - 16) << 23) & top) + ((1u << 23) & low);
    float f = from_bits(o) - from_bits((113u << 23) & low);
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return from_bits(bits | (h & 0x8000u) << 16);
}

INLINE uint32_t word(const void *src, int kind, int64_t i) {
    if (kind == FP32) return ((const uint32_t *)src)[i];
    return ((const uint16_t *)src)[i];
}

INLINE float load(int kind, uint32_t w) {
    if (kind == BF16) return from_bits(w << 16);
    if (kind == FP16) return from_half(w);
    return from_bits(w);
}

/* Largest |x| of words[start, stop) as raw bits: sign-cleared float bits order like the values, and
 * every NaN sorts above inf, so a block with NaN yields a NaN absmax (the caller then lets bnb do it). */
INLINE uint32_t max_abs_word(const void *src, int kind, int64_t start, int64_t stop) {
    uint32_t mask = kind == FP32 ? 0x7fffffffu : 0x7fffu, m = 0;
    for (int64_t i = start; i < stop; i++) {
        uint32_t w = word(src, kind, i) & mask;
        m = w > m ? w : m;
    }
    return m;
}

INLINE float clamp_tiny(float x) { return x < TINY ? TINY : x; } /* NaN passes through */

/* The 4-bit index of a scaled value: top - sum(steps[k] for x <= bounds[k]) (see cpu._code_table);
 * for a sorted code (NF4) every step is 1 and the masks go. */
INLINE int32_t code(float x, const float *b, const int32_t *s, int32_t top, int sorted) {
    int32_t c = top;
#pragma GCC unroll 15
    for (int k = 0; k < 15; k++) c -= sorted ? (x <= b[k]) : (x <= b[k]) * s[k];
    return c;
}

INLINE void pack(const int32_t *codes, int64_t count, uint8_t *packed) {
    for (int64_t j = 0; j < count / 2; j++) packed[j] = (uint8_t)(codes[2 * j] << 4 | codes[2 * j + 1]);
}

/* Blocks first..last-1: absmax, x * (1/absmax), index, pack; a partial last block the way bnb does
 * it (it stores the clamped absmax, divides instead of multiplying by the reciprocal, and pads an odd
 * count with a scaled zero). */
INLINE void quantize_blocks(const void *src, int kind, int sorted, int64_t n, int64_t first, int64_t last,
                            int64_t blocksize, const float *bounds, const int32_t *steps, int32_t top,
                            uint8_t *packed, float *absmax) {
    float b[15];
    int32_t s[15];
    for (int k = 0; k < 15; k++) b[k] = bounds[k], s[k] = steps[k];
    int32_t codes[MAX_BLOCKSIZE + 2];
    int64_t full = n / blocksize < last ? n / blocksize : last;
    for (int64_t block = first; block < full; block++) {
        int64_t start = block * blocksize;
        float amax = load(kind, max_abs_word(src, kind, start, start + blocksize));
        absmax[block] = amax;
        float scale = 1.0f / clamp_tiny(amax);
        for (int64_t i = 0; i < blocksize; i++)
            codes[i] = code(load(kind, word(src, kind, start + i)) * scale, b, s, top, sorted);
        pack(codes, blocksize, packed + start / 2);
    }
    int64_t start = full * blocksize;
    if (full < last && start < n) {
        float amax = clamp_tiny(load(kind, max_abs_word(src, kind, start, n)));
        absmax[full] = amax;
        int64_t rem = n - start;
        for (int64_t i = 0; i < rem; i++)
            codes[i] = code(load(kind, word(src, kind, start + i)) / amax, b, s, top, sorted);
        codes[rem] = code(0.0f, b, s, top, sorted);
        pack(codes, rem + 1, packed + start / 2);
    }
}

#define KERNEL(name, kind, sorted)                                                                        \
    VECTORIZED void name(const void *src, int64_t n, int64_t first, int64_t last, int64_t blocksize,       \
                         const float *bounds, const int32_t *steps, int32_t top, uint8_t *packed,         \
                         float *absmax) {                                                                 \
        quantize_blocks(src, kind, sorted, n, first, last, blocksize, bounds, steps, top, packed, absmax); \
    }

KERNEL(quantize_bf16, BF16, 0)
KERNEL(quantize_fp16, FP16, 0)
KERNEL(quantize_fp32, FP32, 0)
KERNEL(quantize_bf16_sorted, BF16, 1)
KERNEL(quantize_fp16_sorted, FP16, 1)
KERNEL(quantize_fp32_sorted, FP32, 1)

/* bnb's norm_to_lut_index: (uint16)(int)fmaf((clamp(v, -1, 1) + 1) * 0.5, 65535, 0.5). The product
 * and sum are exact in double (at most 42 significant bits), so one rounding to float equals the fused
 * multiply-add; a NaN converts to INT_MIN in bnb, whose low 16 bits are 0. */
INLINE int32_t lut_index(float v) {
    if (v != v) return 0;
    v = v > 1.0f ? 1.0f : v;
    v = v < -1.0f ? -1.0f : v;
    float t = (v + 1.0f) * 0.5f;
    return (int32_t)(float)((double)t * 65535.0 + 0.5);
}

/* bnb's native 8-bit blockwise quantization of (values - offset) in blocks of 256, for double quant
 * (1/64 of the work of the weight itself: one thread). */
void quantize_nested(const float *values, int64_t n, float offset, const uint8_t *lut, uint8_t *codes,
                     float *absmax) {
    for (int64_t block = 0; block * NESTED_BLOCKSIZE < n; block++) {
        int64_t start = block * NESTED_BLOCKSIZE;
        int64_t stop = start + NESTED_BLOCKSIZE < n ? start + NESTED_BLOCKSIZE : n;
        float amax = 0.0f;
        for (int64_t i = start; i < stop; i++) {
            float a = __builtin_fabsf(values[i] - offset);
            if (a > amax) amax = a; /* NaN never wins, as with std::max in bnb's C++ */
        }
        absmax[block] = amax;
        if (amax == 0) {
            memset(codes + start, 0, (size_t)(stop - start));
            continue;
        }
        float inv = 1.0f / amax;
        for (int64_t i = start; i < stop; i++) codes[i] = lut[lut_index((values[i] - offset) * inv)];
    }
}
