/* 4-bit (NF4/FP4) blockwise quantization, bit for bit what bitsandbytes 0.50 computes on CPU.
 *
 * A plain C library (no Python API), loaded with ctypes by cpu.py, which releases the GIL for the
 * call: a process loads it in microseconds, where numba spent 0.5-1 s loading its compiler before
 * the first shard could start. One pass per block reads the 16- or 32-bit words directly and fuses
 * absmax, scaling, the code search and packing. IEEE semantics are needed throughout (NaN compares
 * false, denormals kept): build without -ffast-math, with -ffp-contract=off.
 *
 * On CPUs with AVX-512 (x86-64-v4) whole blocks go through a 16-lane path instead, chosen at run time:
 * the same loads and multiply, and the index found by a binary search over the 15 bounds (4 in-register
 * table lookups in place of 15 comparisons), faster there. Elsewhere the 16-lane code would be
 * split into narrower registers and run slower than the loop it replaces, so it is only built for v4.
 */

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define HAVE_V4 1 /* GCC on x86-64: target clones, and the AVX-512 path below */
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

/* The partial last block (if blocks first..last-1 reach it), the way bnb does it: it stores the clamped
 * absmax, divides instead of multiplying by the reciprocal, and pads an odd count with a scaled zero. */
INLINE void quantize_tail(const void *src, int kind, int sorted, int64_t n, int64_t first, int64_t last,
                          int64_t blocksize, const float *b, const int32_t *s, int32_t top, uint8_t *packed,
                          float *absmax) {
    int64_t full = n / blocksize, start = full * blocksize;
    if (full < first || full >= last || start >= n) return;
    int32_t codes[MAX_BLOCKSIZE + 2];
    float amax = clamp_tiny(load(kind, max_abs_word(src, kind, start, n)));
    absmax[full] = amax;
    int64_t rem = n - start;
    for (int64_t i = 0; i < rem; i++) codes[i] = code(load(kind, word(src, kind, start + i)) / amax, b, s, top, sorted);
    codes[rem] = code(0.0f, b, s, top, sorted);
    pack(codes, rem + 1, packed + start / 2);
}

INLINE int64_t full_blocks_before(int64_t n, int64_t blocksize, int64_t last) {
    return n / blocksize < last ? n / blocksize : last;
}

/* Stores block `block`'s absmax and returns the scale its weights are multiplied by. */
INLINE float block_scale(const void *src, int kind, int64_t block, int64_t blocksize, float *absmax) {
    int64_t start = block * blocksize;
    float amax = load(kind, max_abs_word(src, kind, start, start + blocksize));
    absmax[block] = amax;
    return 1.0f / clamp_tiny(amax);
}

/* Blocks first..last-1: absmax, x * (1/absmax), index, pack. */
INLINE void quantize_blocks(const void *src, int kind, int sorted, int64_t n, int64_t first, int64_t last,
                            int64_t blocksize, const float *bounds, const int32_t *steps, int32_t top,
                            uint8_t *packed, float *absmax) {
    float b[15];
    int32_t s[15];
    for (int k = 0; k < 15; k++) b[k] = bounds[k], s[k] = steps[k];
    int32_t codes[MAX_BLOCKSIZE];
    for (int64_t block = first; block < full_blocks_before(n, blocksize, last); block++) {
        int64_t start = block * blocksize;
        float scale = block_scale(src, kind, block, blocksize, absmax);
        for (int64_t i = 0; i < blocksize; i++)
            codes[i] = code(load(kind, word(src, kind, start + i)) * scale, b, s, top, sorted);
        pack(codes, blocksize, packed + start / 2);
    }
    quantize_tail(src, kind, sorted, n, first, last, blocksize, b, s, top, packed, absmax);
}

#ifdef HAVE_V4
#define V4 __attribute__((target("arch=x86-64-v4")))
#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef uint8_t vb __attribute__((vector_size(LANES)));

/* 16 weights as floats: `load`, lane by lane (fp16 with the same branch-free arithmetic as from_half). */
V4 INLINE vf vload(const void *src, int kind, int64_t i) {
    vu w;
    if (kind == FP32) {
        memcpy(&w, (const uint32_t *)src + i, sizeof w);
        return (vf)w;
    }
    vh h;
    memcpy(&h, (const uint16_t *)src + i, sizeof h);
    w = __builtin_convertvector(h, vu);
    if (kind == BF16) return (vf)(w << 16);
    vu o = (w & 0x7fffu) << 13, exponent = o & 0x0f800000u;
    vu top = (vu)(exponent == 0x0f800000u), low = (vu)(exponent == 0u);
    o += ((uint32_t)(127 - 15) << 23) + (((uint32_t)(128 - 16) << 23) & top) + ((1u << 23) & low);
    vf f = (vf)o - (vf)((113u << 23) & low);
    return (vf)((vu)f | (w & 0x8000u) << 16);
}

/* The index of 16 scaled weights. The bounds k with !(x <= bounds[k]) are a prefix of the sorted bounds
 * (all 15 for NaN); the branch-free binary search finds its length j, and order[j] (j itself for a sorted
 * code) equals `code`'s top - sum(steps[k] for x <= bounds[k]). */
V4 INLINE vi vcode(vf x, vf bounds, vi order, int sorted) {
    vi j = ~(x <= bounds[7]) & 8;
    j += ~(x <= __builtin_shuffle(bounds, j + 3)) & 4;
    j += ~(x <= __builtin_shuffle(bounds, j + 1)) & 2;
    j += ~(x <= __builtin_shuffle(bounds, j)) & 1;
    return sorted ? j : __builtin_shuffle(order, j);
}

V4 INLINE void quantize_blocks_v4(const void *src, int kind, int sorted, int64_t n, int64_t first, int64_t last,
                                  int64_t blocksize, const float *bounds, const int32_t *steps, int32_t top,
                                  uint8_t *packed, float *absmax) {
    static const vi EVEN = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    float b[15];
    int32_t s[15];
    vf bv = {0};
    vi order = {0};
    for (int k = 0; k < 15; k++) b[k] = bounds[k], s[k] = steps[k], bv[k] = bounds[k];
    for (int j = 15, c = top; j >= 0; j--) order[j] = c, c -= j > 0 ? s[j - 1] : 0; /* order[j] = c(x) in bucket j */
    for (int64_t block = first; block < full_blocks_before(n, blocksize, last); block++) {
        int64_t start = block * blocksize;
        float scale = block_scale(src, kind, block, blocksize, absmax);
        for (int64_t g = start; g < start + blocksize; g += 2 * LANES) { /* every blocksize is a multiple of 32 */
            vi c0 = vcode(vload(src, kind, g) * scale, bv, order, sorted);
            vi c1 = vcode(vload(src, kind, g + LANES) * scale, bv, order, sorted);
            vb two = __builtin_convertvector(__builtin_shuffle(c0, c1, EVEN) << 4 | __builtin_shuffle(c0, c1, EVEN + 1), vb);
            memcpy(packed + g / 2, &two, sizeof two);
        }
    }
    quantize_tail(src, kind, sorted, n, first, last, blocksize, b, s, top, packed, absmax);
}

#endif

/* Whether this CPU can take the AVX-512 path; cpu.py sets `quant4_use_avx512` from it when it loads the
 * library (the tests set it to 0 to check the other path on the same machine). */
int quant4_has_avx512(void) {
#ifdef HAVE_V4
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512cd");
#else
    return 0;
#endif
}

int quant4_use_avx512 = 0;

#ifdef HAVE_V4
const int quant4_avx512_path_built = 1;
#define V4_PATH(name, kind, sorted)                                                                           \
    V4 static void name##_v4(const void *src, int64_t n, int64_t first, int64_t last, int64_t blocksize,      \
                             const float *bounds, const int32_t *steps, int32_t top, uint8_t *packed,        \
                             float *absmax) {                                                                \
        quantize_blocks_v4(src, kind, sorted, n, first, last, blocksize, bounds, steps, top, packed, absmax); \
    }
#define TAKE_V4_PATH(name)                                                           \
    if (quant4_use_avx512) {                                                         \
        name##_v4(src, n, first, last, blocksize, bounds, steps, top, packed, absmax); \
        return;                                                                      \
    }
#else
const int quant4_avx512_path_built = 0;
#define V4_PATH(name, kind, sorted)
#define TAKE_V4_PATH(name)
#endif

#define KERNEL(name, kind, sorted)                                                                           \
    V4_PATH(name, kind, sorted)                                                                              \
    VECTORIZED static void name##_any(const void *src, int64_t n, int64_t first, int64_t last, int64_t blocksize, \
                                      const float *bounds, const int32_t *steps, int32_t top, uint8_t *packed, \
                                      float *absmax) {                                                       \
        quantize_blocks(src, kind, sorted, n, first, last, blocksize, bounds, steps, top, packed, absmax);    \
    }                                                                                                        \
    void name(const void *src, int64_t n, int64_t first, int64_t last, int64_t blocksize, const float *bounds, \
              const int32_t *steps, int32_t top, uint8_t *packed, float *absmax) {                           \
        TAKE_V4_PATH(name)                                                                                   \
        name##_any(src, n, first, last, blocksize, bounds, steps, top, packed, absmax);                      \
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
