/* Activations fused into the GroupNorm kernels (group_norm_nchw.c, group_norm_channels_last.c), forward and
 * backward, on fp32 vectors: SiLU (Elfwing et al., 2018) and ReLU, as torch's silu, relu and their backwards. */
#ifndef NORMLAYERS_ACTIVATIONS_H
#define NORMLAYERS_ACTIVATIONS_H

#include "common.h"

enum { ACT_NONE = 0, ACT_SILU = 1, ACT_RELU = 2 };

static inline vf select_vf(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x: x = n·ln 2 + r, |r| ≤ ln 2 / 2, e^r from the degree-6 polynomial of Cephes' expf (Moshier, 1984), times 2^n:
 * within 2 ulp. AVX-512 scales by 2^n in one instruction (0 below −104, inf above 88.7, a NaN kept); elsewhere x is
 * clamped to [−87.3, 88] first (a NaN becomes a finite value there: callers multiply by x, which keeps it). */
static inline vf exp_vf(vf x) {
#if defined(__AVX512F__) && NL_VL == 16
    const vf n = (vf)_mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
#else
    const vf lo = nl_splat(-87.3f), hi = nl_splat(88.0f);
    x = select_vf(x > lo, x, lo);
    x = select_vf(x < hi, x, hi);
    const vf magic = nl_splat(12582912.0f); /* 1.5·2^23: adding and subtracting it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
#endif
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = nl_splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
#if defined(__AVX512F__) && NL_VL == 16
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
#endif
}

/* 1/d for d ≥ 1: AVX-512's 14-bit estimate and a Newton step (within an ulp or two; a division takes 3-5× as long),
 * else a division. */
static inline vf reciprocal_vf(vf d) {
#if defined(__AVX512F__) && NL_VL == 16
    const vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r + r * (1.0f - d * r);
#else
    return 1.0f / d;
#endif
}

/* 1/(1 + e^−z), with z held at −87 and above: there e^−z stays finite (the estimate's Newton step turns 1/inf into a
 * NaN), and below it σ(z) < 1.7e-38 anyway; a NaN z gives σ(−87), and the callers' factor z keeps the NaN. */
static inline vf sigmoid_vf(vf z) {
    const vf held = select_vf(z > -87.0f, z, nl_splat(-87.0f));
    return reciprocal_vf(1.0f + exp_vf(-held));
}

/* act(z) */
static inline __attribute__((always_inline)) vf act_vf(vf z, int act) {
    if (act == ACT_SILU) return z * sigmoid_vf(z);
    if (act == ACT_RELU) return (vf)(~(vi)(z < 0.0f) & (vi)z); /* a NaN stays NaN, as torch's relu */
    return z;
}

/* dy·act'(z) */
static inline __attribute__((always_inline)) vf act_grad_vf(vf z, vf dy, int act) {
    if (act == ACT_SILU) {
        const vf s = sigmoid_vf(z);
        return dy * (s * (1.0f + z * (1.0f - s)));
    }
    if (act == ACT_RELU) return (vf)(~(vi)(z <= 0.0f) & (vi)dy); /* threshold_backward's: zero where z <= 0 */
    return dy;
}

/* The scalar tails go through lane 0 of the vector forms: the same values as the vector body. */
static inline __attribute__((always_inline)) float act1(float z, int act) { return act_vf(nl_splat(z), act)[0]; }

static inline __attribute__((always_inline)) float act_grad1(float z, float dy, int act) {
    return act_grad_vf(nl_splat(z), nl_splat(dy), act)[0];
}

#endif
