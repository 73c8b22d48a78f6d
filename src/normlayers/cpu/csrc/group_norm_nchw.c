/* Group Normalization (Wu & He, 2018, eq. 1) of contiguous (N, C, HW) input with an optional fused activation,
 * forward and backward:
 *     y = act(z),  z = (x − μ)·r·γ_c + β_c,  r = 1/sqrt(σ² + eps),
 * μ, σ² the mean and biased variance of each (sample, group)'s C/G·HW values, which lie contiguous in memory.
 *
 * Forward, per (sample, group): the statistics from blocks of NL_BLOCK values, each read twice while it sits in L1
 * (its mean, then the sum and the squares of its deviations: the corrected two-pass form) and merged in fp64 by the
 * pairwise update (both from Chan, Golub & LeVeque, 1983, "Algorithms for computing the sample variance": no
 * cancellation whatever the offset), then one pass that writes act((x − μ)·scale_c + β_c) while the group is still in
 * L2. ATen's forward plus an eager activation takes one more read and write of the output; ATen's x·scale + shift
 * also rounds at the scale of μ·r, the centred form here does not.
 * Backward, per (sample, group): one read of (dy, x) for the per-(sample, channel) sums Σg and Σg·(x − μ), with
 * g = dy·act'(z) recomputed from x and the saved statistics, then one pass writing
 *     dx = r·γ_c·g − r²·E[γg·(x − μ)]·(x − μ) − r·E[γg]
 * (the means over the group). dweight and dbias are the sums over the samples of the per-(sample, channel) sums, added
 * in a fixed order: deterministic. */
#include "common.h"

#include "activations.h"

/* Below this many values a call runs on one thread: waking a second cost more than its share of the work (1×32×2×2
 * backward: 4.7 µs on one thread, 27 µs on two, the second core shared with other jobs). ATen's GRAIN_SIZE. */
#define PARALLEL_MIN 32768

/* How far ahead (in elements) the statistics' first read and the output pass's stores prefetch. The statistics read
 * each block twice, the second from L1: with the first read's lines asked for into L1 256 elements ahead, the read
 * from memory does not stall at each block's end; the output's lines are asked for ownership as far ahead. Measured
 * on a Sapphire Rapids core (fp32, no activation, one thread, the kernel alone against ATen's forward): 2×320×32×32
 * 0.99 -> 0.93, 1×512×64×64 1.02-1.09 -> 0.91, 8×1280×8×8 0.89-0.94 -> 0.87-0.94. None on AMD Zen cores
 * (NL_PREFETCH_STREAMS, common.h): on a Zen 4 core the whole fp32 inference call at 1×512×64×64 took 1.18 and 1.15×
 * F.group_norm's time with them, 1.02 and 1.00× without (one and two threads, normlayers-bench, two runs each). */
#define PREFETCH_AHEAD (NL_PREFETCH_STREAMS ? 256 : 0)

/* (as integers: the elements ahead may lie past the array, where a prefetch is harmless but a pointer is undefined) */
static inline const void* element_at(const void* p, int bf16, int64_t j) {
    return (const void*)((uintptr_t)p + (uintptr_t)(j * (bf16 ? 2 : 4)));
}

/* Mean and biased variance of the n values at p (offset off), in fp64. */
static inline __attribute__((always_inline)) void moments(const void* p, int bf16, int64_t off, int64_t n,
                                                          double* mean_out, double* var_out) {
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t start = 0; start < n; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < n ? start + NL_BLOCK : n;
        /* four accumulators: the additions' latency hidden (two were a third slower here) */
        vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int64_t j = start;
        for (; j + 4 * NL_VL <= end; j += 4 * NL_VL) {
            if (PREFETCH_AHEAD)
                for (int q = 0; q < 4; ++q)
                    __builtin_prefetch(element_at(p, bf16, off + j + PREFETCH_AHEAD + q * NL_VL), 0, 3);
            s0 += nl_load(p, bf16, off + j);
            s1 += nl_load(p, bf16, off + j + NL_VL);
            s2 += nl_load(p, bf16, off + j + 2 * NL_VL);
            s3 += nl_load(p, bf16, off + j + 3 * NL_VL);
        }
        for (; j + NL_VL <= end; j += NL_VL) s0 += nl_load(p, bf16, off + j);
        float s = nl_hsum((s0 + s1) + (s2 + s3));
        for (; j < end; ++j) s += nl_load1(p, bf16, off + j);
        const float block = (float)(end - start);
        const float block_mean = s / block; /* off by the rounding of s (a large offset's ulps): corrected below */
        const vf mean_v = nl_splat(block_mean);
        vf d0s = {0}, d1s = {0}, d2s = {0}, d3s = {0};
        s0 = s1 = s2 = s3 = (vf){0};
        j = start;
        for (; j + 4 * NL_VL <= end; j += 4 * NL_VL) {
            const vf d0 = nl_load(p, bf16, off + j) - mean_v, d1 = nl_load(p, bf16, off + j + NL_VL) - mean_v;
            const vf d2 = nl_load(p, bf16, off + j + 2 * NL_VL) - mean_v;
            const vf d3 = nl_load(p, bf16, off + j + 3 * NL_VL) - mean_v;
            d0s += d0;
            d1s += d1;
            d2s += d2;
            d3s += d3;
            s0 += d0 * d0;
            s1 += d1 * d1;
            s2 += d2 * d2;
            s3 += d3 * d3;
        }
        for (; j + NL_VL <= end; j += NL_VL) {
            const vf d = nl_load(p, bf16, off + j) - mean_v;
            d0s += d;
            s0 += d * d;
        }
        float dsum = nl_hsum((d0s + d1s) + (d2s + d3s)), q = nl_hsum((s0 + s1) + (s2 + s3));
        for (; j < end; ++j) {
            const float d = nl_load1(p, bf16, off + j) - block_mean;
            dsum += d;
            q += d * d;
        }
        /* the corrected two-pass moments of the block (Chan, Golub & LeVeque, 1983): its mean block_mean +
         * Σd/n and its squares Σd² − (Σd)²/n, then their pairwise update of (count, mean, m2) by them */
        const double correction = (double)dsum / block, block_m2 = (double)q - (double)dsum * correction;
        const double total = count + block, delta = (double)block_mean + correction - mean;
        mean += delta * (block / total);
        m2 += block_m2 + delta * delta * (count * block / total);
        count = total;
    }
    *mean_out = mean;
    *var_out = m2 / count;
}

static inline __attribute__((always_inline)) void forward_group(
        const void* x, int x_bf16, const void* w, const void* b, int p_bf16, void* y, float* mean_out,
        float* rstd_out, int64_t ng, int64_t G, int64_t channels, int64_t HW, float eps, int act, int prefetch) {
    const int64_t off = ng * channels * HW;
    /* After an activation the output pass is compute-bound: the next group's input is asked for from memory
     * meanwhile (its statistics then read it from L2). Without one it only competes with the stores (measured: 5-10%
     * slower then; and in the backward). */
    const char* next = prefetch && act != ACT_NONE ? (const char*)x + (off + channels * HW) * (x_bf16 ? 2 : 4) : NULL;
    double mean64, var64;
    moments(x, x_bf16, off, channels * HW, &mean64, &var64);
    const float mean = (float)mean64, rstd = 1.0f / sqrtf((float)var64 + eps);
    if (mean_out) {
        mean_out[ng] = mean;
        rstd_out[ng] = rstd;
    }
    const int64_t c0 = (ng % G) * channels;
    const vf mean_v = nl_splat(mean);
    for (int64_t c = 0; c < channels; ++c) {
        const float scale = w ? rstd * nl_load1(w, p_bf16, c0 + c) : rstd;
        const float shift = b ? nl_load1(b, p_bf16, c0 + c) : 0.f;
        const vf scale_v = nl_splat(scale), shift_v = nl_splat(shift);
        const int64_t row = off + c * HW;
        int64_t j = 0;
        for (; j + NL_VL <= HW; j += NL_VL) {
            if (next) __builtin_prefetch(next + (c * HW + j) * (x_bf16 ? 2 : 4), 0, 2);
            if (PREFETCH_AHEAD) __builtin_prefetch(element_at(y, x_bf16, row + j + PREFETCH_AHEAD), 1, 2);
            nl_store(y, x_bf16, row + j, act_vf((nl_load(x, x_bf16, row + j) - mean_v) * scale_v + shift_v, act));
        }
        for (; j < HW; ++j)
            nl_store1(y, x_bf16, row + j, act1((nl_load1(x, x_bf16, row + j) - mean) * scale + shift, act));
    }
}

/* LOOP(XB, PB, ACT) with the dtype flags and the activation as constants: one specialized loop per combination. */
#define NL_DISPATCH_ACT(LOOP, XB, PB, act)                  \
    do {                                                    \
        if ((act) == ACT_SILU) LOOP(XB, PB, ACT_SILU);      \
        else if ((act) == ACT_RELU) LOOP(XB, PB, ACT_RELU); \
        else LOOP(XB, PB, ACT_NONE);                        \
    } while (0)
#define NL_DISPATCH(LOOP, x_bf16, p_bf16, act)                      \
    do {                                                            \
        if ((x_bf16) && (p_bf16)) NL_DISPATCH_ACT(LOOP, 1, 1, act); \
        else if (x_bf16) NL_DISPATCH_ACT(LOOP, 1, 0, act);          \
        else if (p_bf16) NL_DISPATCH_ACT(LOOP, 0, 1, act);          \
        else NL_DISPATCH_ACT(LOOP, 0, 0, act);                      \
    } while (0)

/* x and y: fp32 (x_bf16 = 0) or bf16 (1), N·C·HW contiguous values; w and b (either may be NULL): C values, fp32
 * (p_bf16 = 0) or bf16 (1); mean and rstd: N·G fp32 values, written unless NULL. act: ACT_*. */
void group_norm_nchw_fwd(const void* x, int x_bf16, const void* w, const void* b, int p_bf16, void* y, float* mean,
                         float* rstd, int64_t N, int64_t C, int64_t HW, int64_t G, float eps, int act, int threads) {
    const int64_t groups = N * G, channels = C / G;
#pragma omp parallel num_threads(threads) if (threads > 1 && groups > 1 && N * C * HW >= PARALLEL_MIN)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = nl_share(groups, t, nt), hi = nl_share(groups, t + 1, nt);
#define NL_FORWARD(XB, PB, ACT)       \
    for (int64_t i = lo; i < hi; ++i) \
    forward_group(x, XB, w, b, PB, y, mean, rstd, i, G, channels, HW, eps, ACT, i + 1 < hi)
        NL_DISPATCH(NL_FORWARD, x_bf16, p_bf16, act);
#undef NL_FORWARD
    }
}

/* g = dy·act'(z) at element j of a row, z = (x − μ)·scale + shift recomputed (d = x − μ returned too) */
static inline __attribute__((always_inline)) vf grad_at(const void* dy, const void* x, int bf16, int64_t j, vf mean,
                                                        vf scale, vf shift, int act, vf* d) {
    *d = nl_load(x, bf16, j) - mean;
    return act_grad_vf(*d * scale + shift, nl_load(dy, bf16, j), act);
}

/* Σg and Σg·(x − μ) over the HW values of a row, in fp32 lanes over blocks of NL_BLOCK, the blocks added in fp64;
 * with kept (fp32), g is stored there too. */
static inline __attribute__((always_inline)) void row_sums(const void* dy, const void* x, int bf16, int64_t row,
                                                           int64_t HW, float mean, float scale, float shift, int act,
                                                           float* kept, double* g_sum, double* gx_sum) {
    const vf mean_v = nl_splat(mean), scale_v = nl_splat(scale), shift_v = nl_splat(shift);
    double sg = 0.0, sgx = 0.0;
    for (int64_t start = 0; start < HW; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < HW ? start + NL_BLOCK : HW;
        vf a0 = {0}, a1 = {0}, ax0 = {0}, ax1 = {0}; /* two of each: the additions' latency hidden */
        int64_t j = start;
        for (; j + 2 * NL_VL <= end; j += 2 * NL_VL) {
            vf d0, d1;
            const vf g0 = grad_at(dy, x, bf16, row + j, mean_v, scale_v, shift_v, act, &d0);
            const vf g1 = grad_at(dy, x, bf16, row + j + NL_VL, mean_v, scale_v, shift_v, act, &d1);
            if (kept) {
                nl_store(kept, 0, row + j, g0);
                nl_store(kept, 0, row + j + NL_VL, g1);
            }
            a0 += g0;
            a1 += g1;
            ax0 += g0 * d0;
            ax1 += g1 * d1;
        }
        for (; j + NL_VL <= end; j += NL_VL) {
            vf d0;
            const vf g0 = grad_at(dy, x, bf16, row + j, mean_v, scale_v, shift_v, act, &d0);
            if (kept) nl_store(kept, 0, row + j, g0);
            a0 += g0;
            ax0 += g0 * d0;
        }
        float s = nl_hsum(a0 + a1), sx = nl_hsum(ax0 + ax1);
        for (; j < end; ++j) {
            const float d = nl_load1(x, bf16, row + j) - mean;
            const float g = act_grad1(d * scale + shift, nl_load1(dy, bf16, row + j), act);
            if (kept) kept[row + j] = g;
            s += g;
            sx += g * d;
        }
        sg += s;
        sgx += sx;
    }
    *g_sum = sg;
    *gx_sum = sgx;
}

static inline __attribute__((always_inline)) void backward_group(
        const void* dy, const void* x, int bf16, const void* w, const void* b, int p_bf16, const float* mean_in,
        const float* rstd_in, void* dx, double* sums, int64_t ng, int64_t G, int64_t channels, int64_t HW, int act) {
    const int64_t off = ng * channels * HW, c0 = (ng % G) * channels;
    const float mean = mean_in[ng], rstd = rstd_in[ng];
    /* fp32 dx after an activation holds g between the passes: the second reads it instead of taking act' again */
    float* kept = dx && act != ACT_NONE && !bf16 ? (float*)dx : NULL;
    double* group_sums = sums + 2 * ng * channels; /* (Σg, r·Σg·(x − μ)) per channel */
    double mean_g = 0.0, mean_gx = 0.0;            /* Σ γ·Σg, Σ γ·r·Σg·(x − μ), then their means */
    for (int64_t c = 0; c < channels; ++c) {
        const float gamma = w ? nl_load1(w, p_bf16, c0 + c) : 1.0f, shift = b ? nl_load1(b, p_bf16, c0 + c) : 0.f;
        double sg, sgx;
        row_sums(dy, x, bf16, off + c * HW, HW, mean, rstd * gamma, shift, act, kept, &sg, &sgx);
        sgx *= rstd;
        group_sums[2 * c] = sg;
        group_sums[2 * c + 1] = sgx;
        mean_g += gamma * sg;
        mean_gx += gamma * sgx;
    }
    if (!dx) return;
    const double count = (double)(channels * HW);
    mean_g /= count;
    mean_gx /= count;
    const float x_coef = (float)(-(double)rstd * rstd * mean_gx), constant = (float)(-(double)rstd * mean_g);
    const vf mean_v = nl_splat(mean), x_coef_v = nl_splat(x_coef), constant_v = nl_splat(constant);
    for (int64_t c = 0; c < channels; ++c) {
        const float gamma = w ? nl_load1(w, p_bf16, c0 + c) : 1.0f, shift = b ? nl_load1(b, p_bf16, c0 + c) : 0.f;
        const float scale = rstd * gamma;
        const vf scale_v = nl_splat(scale), shift_v = nl_splat(shift);
        const int64_t row = off + c * HW;
        int64_t j = 0;
        for (; j + NL_VL <= HW; j += NL_VL) {
            vf d, g;
            if (kept) {
                d = nl_load(x, 0, row + j) - mean_v;
                g = nl_load(kept, 0, row + j);
            } else {
                g = grad_at(dy, x, bf16, row + j, mean_v, scale_v, shift_v, act, &d);
            }
            nl_store(dx, bf16, row + j, g * scale_v + (d * x_coef_v + constant_v));
        }
        for (; j < HW; ++j) {
            const float d = nl_load1(x, bf16, row + j) - mean;
            const float g = kept ? kept[row + j] : act_grad1(d * scale + shift, nl_load1(dy, bf16, row + j), act);
            nl_store1(dx, bf16, row + j, g * scale + (d * x_coef + constant));
        }
    }
}

/* dy, x and dx: fp32 (bf16 = 0) or bf16 (1), N·C·HW contiguous values; w, b as the forward's; mean, rstd: the
 * forward's N·G values. dx (NULL: not computed), dweight and dbias (C fp32 values each; NULL: not computed). sums:
 * 2·N·C fp64 values of scratch. */
void group_norm_nchw_bwd(const void* dy, const void* x, int bf16, const void* w, const void* b, int p_bf16,
                         const float* mean, const float* rstd, void* dx, float* dweight, float* dbias, double* sums,
                         int64_t N, int64_t C, int64_t HW, int64_t G, int act, int threads) {
    const int64_t groups = N * G, channels = C / G;
#pragma omp parallel num_threads(threads) if (threads > 1 && groups > 1 && N * C * HW >= PARALLEL_MIN)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = nl_share(groups, t, nt), hi = nl_share(groups, t + 1, nt);
#define NL_BACKWARD(XB, PB, ACT)      \
    for (int64_t i = lo; i < hi; ++i) \
    backward_group(dy, x, XB, w, b, PB, mean, rstd, dx, sums, i, G, channels, HW, ACT)
        NL_DISPATCH(NL_BACKWARD, bf16, p_bf16, act);
#undef NL_BACKWARD
        if (dweight || dbias) {
#pragma omp barrier
            const int64_t c_lo = nl_share(C, t, nt), c_hi = nl_share(C, t + 1, nt);
            for (int64_t c = c_lo; c < c_hi; ++c) {
                double sg = 0.0, sgx = 0.0;
                for (int64_t n = 0; n < N; ++n) {
                    sg += sums[2 * (n * C + c)];
                    sgx += sums[2 * (n * C + c) + 1];
                }
                if (dweight) dweight[c] = (float)sgx;
                if (dbias) dbias[c] = (float)sg;
            }
        }
    }
}
