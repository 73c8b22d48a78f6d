/* Shared helpers of normlayers' compiled CPU kernels (docs/backend.md, "Compiled CPU kernels").
 *
 * Portable C11 with GCC/Clang vector extensions: compiled with -march=native they become the host's widest vectors
 * (AVX-512 here, AVX2 or NEON elsewhere), with no intrinsics to port. Tensors arrive as raw pointers of contiguous
 * memory; fp32 and bf16 data are read through the same vf loads (bf16 widened to fp32 exactly) and written rounded
 * once, to nearest even, as ATen rounds (where the CPU has AVX512-BF16, by its conversion instruction, which also
 * turns fp32 subnormals, below 1.2e-38, into zeros). Statistics are fp32 values summed in fp32 vector lanes over blocks of
 * NL_BLOCK elements, the block sums added in fp64, so a long row loses no more than a block's worth of rounding. */
#ifndef NORMLAYERS_COMMON_H
#define NORMLAYERS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Whether the kernels issue software prefetches ahead of their sequential streams: not on AMD Zen cores (GCC's
 * __znverN__ under -march=native), whose hardware prefetchers keep such streams ahead by themselves, so that there the
 * instructions only cost (on a Zen 4 core, which GCC 12 calls znver3: group_norm_nchw.c's forward 1.15-1.18× eager's
 * time with them, 1.00-1.02× without; row_norms.c's LayerNorm backward at 1576×768, kernel alone, 0.73-0.76× ATen's
 * without them, 0.82-0.91× with). */
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || defined(__znver4__) || defined(__znver5__)
#define NL_PREFETCH_STREAMS 0
#else
#define NL_PREFETCH_STREAMS 1
#endif

#define NL_VL 16
#define NL_BLOCK 1024
typedef float vf __attribute__((vector_size(NL_VL * sizeof(float))));
typedef uint32_t vu __attribute__((vector_size(NL_VL * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(NL_VL * sizeof(uint16_t))));
typedef int32_t vi __attribute__((vector_size(NL_VL * sizeof(int32_t))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
_Static_assert(NL_VL == 16, "nl_hsum's tree is written for 16 lanes");

static inline vf nl_splat(float v) { return v - (vf){0}; }

/* The sum of the lanes as a tree of halves: 4 dependent additions where a loop over the lanes chains 16 (that chain
 * took as long as a short row's sums themselves). */
static inline float nl_hsum(vf v) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    /* register shuffles: a vector stored whole and read back by halves stalls store forwarding */
    const vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
    vf8 h, h2;
    memcpy(&h, &v, sizeof h);
    memcpy(&h2, (const char*)&v + sizeof h, sizeof h2);
    h += h2;
    vf4 q, q2;
    memcpy(&q, &h, sizeof q);
    memcpy(&q2, (const char*)&h + sizeof q, sizeof q2);
    q += q2;
#endif
    return (q[0] + q[2]) + (q[1] + q[3]);
}

static inline float nl_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t nl_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u >> 16) | 0x40); /* a NaN stays a (quiet) NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* NL_VL values at element offset j of fp32 (bf16 = 0) or bf16 (bf16 = 1) memory, as fp32. (AVX-512 widens bf16 in
 * one instruction, vpmovzxwd, where GCC's generic conversion takes two 256-bit halves: about 1.7x the bf16 time.) */
static inline vf nl_load(const void* p, int bf16, int64_t j) {
    vf v;
    if (bf16) {
#if defined(__AVX512F__)
        __m256i h;
        memcpy(&h, (const uint16_t*)p + j, sizeof h);
        const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#else
        vh h;
        memcpy(&h, (const uint16_t*)p + j, sizeof h);
        const vu u = __builtin_convertvector(h, vu) << 16;
#endif
        memcpy(&v, &u, sizeof v);
    } else {
        memcpy(&v, (const float*)p + j, sizeof v);
    }
    return v;
}

static inline float nl_load1(const void* p, int bf16, int64_t j) {
    return bf16 ? nl_bf16_to_f32(((const uint16_t*)p)[j]) : ((const float*)p)[j];
}

static inline void nl_store(void* p, int bf16, int64_t j, vf v) {
    if (bf16) {
#if defined(__AVX512BF16__)
        /* round to nearest even and a NaN kept quiet in one instruction (fp32 subnormals become zeros) */
        __m512 f;
        memcpy(&f, &v, sizeof f);
        const __m256bh h = _mm512_cvtneps_pbh(f);
#else
        vu u;
        memcpy(&u, &v, sizeof u);
        vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        vu quiet = (u >> 16) | 0x40u;
        vu is_nan = (vu)(v != v); /* all ones in a NaN's lane */
        vh h = __builtin_convertvector((quiet & is_nan) | (rounded & ~is_nan), vh);
#endif
        memcpy((uint16_t*)p + j, &h, sizeof h);
    } else {
        memcpy((float*)p + j, &v, sizeof v);
    }
}

static inline void nl_store1(void* p, int bf16, int64_t j, float v) {
    if (bf16)
        ((uint16_t*)p)[j] = nl_f32_to_bf16(v);
    else
        ((float*)p)[j] = v;
}

/* Statistics over blocks of a row. */
static const vi NL_LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* v with its lanes below NL_VL − rem zeroed: the last rem values of a row read by a load that ends at its end (the
 * others were counted by the vector loop), instead of a scalar tail. */
static inline vf nl_last_lanes(vf v, int64_t rem) {
    const vi keep = NL_LANE >= (vi){0} + (int32_t)(NL_VL - rem);
    return (vf)((vi)v & keep);
}

/* Σ (x − shift) and Σ (x − shift)² over the values [start, end) at x + off, fp32 lanes. A plane of at least NL_VL
 * values (len) ends with a vector load that overlaps the loop's last one (nl_last_lanes), a shorter one is read
 * value by value. */
static inline __attribute__((always_inline)) void nl_shifted_sums(const void* x, const int bf16, int64_t off,
                                                                  int64_t start, int64_t end, int64_t len, float shift,
                                                                  float* d_out, float* q_out) {
    const vf shift_v = nl_splat(shift);
    vf d0 = {0}, d1 = {0}, q0 = {0}, q1 = {0};
    int64_t j = start;
    for (; j + 2 * NL_VL <= end; j += 2 * NL_VL) {
        const vf u = nl_load(x, bf16, off + j) - shift_v, v = nl_load(x, bf16, off + j + NL_VL) - shift_v;
        d0 += u;
        d1 += v;
        q0 += u * u;
        q1 += v * v;
    }
    if (j + NL_VL <= end) {
        const vf u = nl_load(x, bf16, off + j) - shift_v;
        d0 += u;
        q0 += u * u;
        j += NL_VL;
    }
    const int vector_tail = j < end && len >= NL_VL;
    if (vector_tail) {
        const vf v = nl_last_lanes(nl_load(x, bf16, off + end - NL_VL) - shift_v, end - j);
        d1 += v;
        q1 += v * v;
    }
    float d = nl_hsum(d0 + d1), q = nl_hsum(q0 + q1);
    if (!vector_tail)
        for (; j < end; ++j) {
            const float v = nl_load1(x, bf16, off + j) - shift;
            d += v;
            q += v * v;
        }
    *d_out = d;
    *q_out = q;
}

/* The [lo, hi) share of n items for thread t of nt. */
static inline int64_t nl_share(int64_t n, int t, int nt) { return n * t / nt; }

#endif
