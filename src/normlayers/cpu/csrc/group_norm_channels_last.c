/* GroupNorm (Wu & He, 2018, eq. 1) of channels-last input with a fused activation, forward and backward:
 *     y = act(z),  z = (x − μ)·r·γ_c + β_c,  r = 1/sqrt(σ² + eps),  μ, σ² over each (sample, group)'s C/G·P values,
 * of an (N, P, C) contiguous array (P the spatial positions, the channels innermost), fp32 or bf16 in memory.
 *
 * Forward: one read pass for the statistics and one output pass. The statistics are two-pass per block of GN_RUN
 * positions while the block sits in cache (the block's group means, then the squared deviations from them and their
 * residual sums), the blocks combined in fp64 by the law of total variance: never E[x²] − E[x]², so a group whose
 * mean is large against its spread keeps its accuracy. The mean is kept in fp64 and taken off in two fp32 parts
 * (its fp32 rounding, then the rest), so no term of the size of the mean is rounded. The output pass walks the same
 * blocks backwards, finding the last ones read still in cache.
 *
 * Backward: one read pass of (dy, x) for the per-(sample, channel) sums Σg and Σg·x̂ (g = dy·act'(z), z recomputed
 * from x and the saved statistics), in fp32 runs of GN_RUN positions added in fp64 in a fixed order (deterministic
 * whatever the thread count, no atomics), then one dx pass of GroupNorm's closed form dx = r·γ·g + K·(x − μ) + L,
 * K = −r²·E[γ·g·x̂], L = −r·E[γ·g] per (sample, group); dγ = Σ_n Σg·x̂, dβ = Σ_n Σg. Five passes of the input's size
 * against the eight of ATen's activation backward plus its group-norm backward. */
#include <stdlib.h>

#include "common.h"

#define GN_RUN 128 /* positions per block: fp32 runs of at most 128 additions per channel */

enum { ACT_NONE = 0, ACT_SILU = 1, ACT_RELU = 2 };

typedef int32_t vi __attribute__((vector_size(NL_VL * sizeof(int32_t))));

static inline vf select_vf(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x, Cephes' expf polynomial (about 1 ulp), NaN kept; x clamped to [−87.3, 88.3] (0 and inf are not reached: the
 * callers divide by 1 + e^x, where the clamp changes no result beyond 1e-36). */
static inline vf exp_vf(vf x) {
    x = select_vf(x > 88.3f, nl_splat(88.3f), x);
    x = select_vf(x < -87.3f, nl_splat(-87.3f), x);
    const vf fx = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(fx, vi);
    n += (vi)(__builtin_convertvector(n, vf) > fx); /* truncation to floor: −1 where it rounded up */
    const vf nf = __builtin_convertvector(n, vf);
    x = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    const vf p = ((((((1.9875691500e-4f * x + 1.3981999507e-3f) * x + 8.3334519073e-3f) * x + 4.1665795894e-2f) * x
                    + 1.6666665459e-1f) * x + 5.0000001201e-1f) * x * x + x + 1.0f);
    const vu scale = (vu)(n + 127) << 23;
    vf two_n;
    memcpy(&two_n, &scale, sizeof two_n);
    return p * two_n;
}

static inline __attribute__((always_inline)) vf activation(vf z, int act) {
    if (act == ACT_SILU) return z / (1.0f + exp_vf(-z));
    if (act == ACT_RELU) return select_vf(z < 0.0f, nl_splat(0.0f), z); /* NaN kept */
    return z;
}

/* dy·act'(z): SiLU's s·(1 + z·(1 − s)), s = sigmoid(z) (torch's silu_backward); ReLU's dy where z > 0 or NaN. */
static inline __attribute__((always_inline)) vf activation_grad(vf dy, vf z, int act) {
    if (act == ACT_SILU) {
        const vf s = 1.0f / (1.0f + exp_vf(-z));
        return dy * (s * (1.0f + z * (1.0f - s)));
    }
    if (act == ACT_RELU) return select_vf(z <= 0.0f, nl_splat(0.0f), dy);
    return dy;
}

/* NL_VL values at element offset j, only the first `count` of them from memory (the rest 0): a row's last part. */
static inline vf load_part(const void* p, int bf16, int64_t j, int64_t count) {
    float part[NL_VL] = {0};
    for (int64_t i = 0; i < count; ++i) part[i] = nl_load1(p, bf16, j + i);
    vf v;
    memcpy(&v, part, sizeof v);
    return v;
}

static inline void store_part(void* p, int bf16, int64_t j, int64_t count, vf v) {
    for (int64_t i = 0; i < count; ++i) nl_store1(p, bf16, j + i, v[i]);
}

static inline __attribute__((always_inline)) vf load_at(const void* p, int bf16, int64_t j, int64_t count) {
    return count == NL_VL ? nl_load(p, bf16, j) : load_part(p, bf16, j, count);
}

static inline __attribute__((always_inline)) void store_at(void* p, int bf16, int64_t j, int64_t count, vf v) {
    if (count == NL_VL)
        nl_store(p, bf16, j, v);
    else
        store_part(p, bf16, j, count, v);
}

static inline vf vec_at(const float* a, int64_t j) {
    vf v;
    memcpy(&v, a + j, sizeof v);
    return v;
}

static inline void set_vec(float* a, int64_t j, vf v) { memcpy(a + j, &v, sizeof v); }

static inline int64_t padded(int64_t c) { return (c + NL_VL - 1) / NL_VL * NL_VL; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The per-channel (stride-C rows) sums of rows [p0, p1) of sample data `x` into acc (Cp lanes, zeroed first). */
static inline __attribute__((always_inline)) void column_sums(const void* x, int bf16, int64_t base, int64_t p0,
                                                              int64_t p1, int64_t C, float* acc) {
    const int64_t Cp = padded(C);
    memset(acc, 0, Cp * sizeof(float));
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = 0; j < C; j += NL_VL)
            set_vec(acc, j, vec_at(acc, j) + load_at(x, bf16, base + p * C + j, min64(NL_VL, C - j)));
}

/* One block's (mean, M2) per group of rows [p0, p1): block means, then deviations from them (two reads of the block,
 * the second from cache), the residual sum of the deviations correcting both. */
static inline __attribute__((always_inline)) void block_moments(
        const void* x, int bf16, int64_t base, int64_t p0, int64_t p1, int64_t C, int64_t G, float* acc,
        float* centre, float* acc2, double* out) {
    const int64_t Cp = padded(C), D = C / G;
    const double count = (double)((p1 - p0) * D);
    column_sums(x, bf16, base, p0, p1, C, acc);
    memset(centre, 0, Cp * sizeof(float));
    for (int64_t g = 0; g < G; ++g) {
        double s = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) s += acc[c];
        const float m = (float)(s / count);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) centre[c] = m;
    }
    memset(acc, 0, Cp * sizeof(float));
    memset(acc2, 0, Cp * sizeof(float));
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = 0; j < C; j += NL_VL) {
            const vf d = load_at(x, bf16, base + p * C + j, min64(NL_VL, C - j)) - vec_at(centre, j);
            set_vec(acc, j, vec_at(acc, j) + d);
            set_vec(acc2, j, vec_at(acc2, j) + d * d); /* padded lanes: 0 − 0 */
        }
    for (int64_t g = 0; g < G; ++g) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            s1 += acc[c];
            s2 += acc2[c];
        }
        out[2 * g] = centre[g * D] + s1 / count;
        out[2 * g + 1] = s2 - s1 * s1 / count;
    }
}

/* The blocks of all samples, (n, block) in order: thread t of nt takes blocks [lo, hi). */
typedef struct {
    int64_t P, C, G, blocks_per_sample;
} Layout;

static inline void block_rows(const Layout* L, int64_t k, int64_t* n, int64_t* p0, int64_t* p1) {
    *n = k / L->blocks_per_sample;
    *p0 = k % L->blocks_per_sample * GN_RUN;
    *p1 = min64(*p0 + GN_RUN, L->P);
}

/* Per (sample, channel): the mean's fp32 part and its remainder, and the group's scale r·γ_c (fp32). */
static void channel_coefficients(const Layout* L, int64_t n, int64_t g, double mean, double r, const float* w,
                                 float* mean_hi, float* mean_lo, float* scale) {
    const int64_t D = L->C / L->G, Cp = padded(L->C);
    const float hi = (float)mean, lo = (float)(mean - hi);
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        mean_hi[n * Cp + c] = hi;
        mean_lo[n * Cp + c] = lo;
        scale[n * Cp + c] = (float)(w ? r * w[c] : r);
    }
}

static inline __attribute__((always_inline)) void forward_output(
        const void* x, void* y, int bf16, const Layout* L, int64_t lo, int64_t hi, const float* mean_hi,
        const float* mean_lo, const float* scale, const float* shift, int act) {
    const int64_t C = L->C, Cp = padded(C);
    for (int64_t k = hi - 1; k >= lo; --k) {
        int64_t n, p0, p1;
        block_rows(L, k, &n, &p0, &p1);
        const int64_t base = n * L->P * C;
        for (int64_t p = p0; p < p1; ++p)
            for (int64_t j = 0; j < C; j += NL_VL) {
                const int64_t count = min64(NL_VL, C - j), at = base + p * C + j;
                const vf d = load_at(x, bf16, at, count) - vec_at(mean_hi, n * Cp + j) - vec_at(mean_lo, n * Cp + j);
                store_at(y, bf16, at, count, activation(d * vec_at(scale, n * Cp + j) + vec_at(shift, j), act));
            }
    }
}

/* Calls `fn(..., bf16, ..., act)` with both flags as constants, so each of the six variants is compiled on its own. */
#define WITH_CONSTANT_FLAGS(bf16, act, call)                                       \
    do {                                                                           \
        if (bf16) {                                                                \
            if ((act) == ACT_SILU) { enum { BF16 = 1, ACT = ACT_SILU }; call; }    \
            else if ((act) == ACT_RELU) { enum { BF16 = 1, ACT = ACT_RELU }; call; } \
            else { enum { BF16 = 1, ACT = ACT_NONE }; call; }                      \
        } else {                                                                   \
            if ((act) == ACT_SILU) { enum { BF16 = 0, ACT = ACT_SILU }; call; }    \
            else if ((act) == ACT_RELU) { enum { BF16 = 0, ACT = ACT_RELU }; call; } \
            else { enum { BF16 = 0, ACT = ACT_NONE }; call; }                      \
        }                                                                          \
    } while (0)

/* x, y: (N, P, C) contiguous, fp32 (bf16 = 0) or bf16 (1); w, b: C fp32 values or NULL; mean, rstd: (N, G) fp64
 * out. act: 0 none, 1 SiLU, 2 ReLU. Returns 0, or −1 where scratch memory could not be allocated (nothing written). */
int group_norm_cl_fwd(const void* x, void* y, int bf16, const float* w, const float* b, double* mean, double* rstd,
                      int64_t N, int64_t P, int64_t C, int64_t G, double eps, int act, int threads) {
    const Layout L = {P, C, G, (P + GN_RUN - 1) / GN_RUN};
    const int64_t blocks = N * L.blocks_per_sample, Cp = padded(C), D = C / G;
    double* moments = malloc(sizeof(double) * 2 * G * blocks);
    float* coefficients = calloc((3 * N + 1 + 3 * (int64_t)threads) * Cp, sizeof(float));
    if (!moments || !coefficients) {
        free(moments);
        free(coefficients);
        return -1;
    }
    float *mean_hi = coefficients, *mean_lo = mean_hi + N * Cp, *scale = mean_lo + N * Cp, *shift = scale + N * Cp;
    float* sums = shift + Cp; /* 3 · Cp per thread */
    for (int64_t c = 0; c < C; ++c) shift[c] = b ? b[c] : 0.0f;
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = nl_share(blocks, t, nt), hi = nl_share(blocks, t + 1, nt);
        float* acc = sums + 3 * Cp * t;
        for (int64_t k = lo; k < hi; ++k) {
            int64_t n, p0, p1;
            block_rows(&L, k, &n, &p0, &p1);
            WITH_CONSTANT_FLAGS(bf16, ACT_NONE, block_moments(x, BF16, n * P * C, p0, p1, C, G, acc, acc + Cp,
                                                               acc + 2 * Cp, moments + 2 * G * k));
        }
#pragma omp barrier
        const int64_t groups_lo = nl_share(N * G, t, nt), groups_hi = nl_share(N * G, t + 1, nt);
        for (int64_t i = groups_lo; i < groups_hi; ++i) {
            const int64_t n = i / G, g = i % G;
            const double* m = moments + 2 * G * n * L.blocks_per_sample + 2 * g;
            double total = 0.0, m2 = 0.0; /* the law of total variance over the blocks, weighted by their rows */
            for (int64_t k = 0; k < L.blocks_per_sample; ++k)
                total += (double)(min64((k + 1) * GN_RUN, P) - k * GN_RUN) * m[2 * G * k];
            const double mu = total / (double)P;
            for (int64_t k = 0; k < L.blocks_per_sample; ++k) {
                const double delta = m[2 * G * k] - mu;
                m2 += m[2 * G * k + 1] + (double)((min64((k + 1) * GN_RUN, P) - k * GN_RUN) * D) * delta * delta;
            }
            const double var = m2 > 0.0 ? m2 / (double)(P * D) : m2 == m2 ? 0.0 : m2; /* NaN kept */
            const double r = 1.0 / sqrt(var + eps);
            mean[i] = mu;
            rstd[i] = r;
            channel_coefficients(&L, n, g, mu, r, w, mean_hi, mean_lo, scale);
        }
#pragma omp barrier
        WITH_CONSTANT_FLAGS(bf16, act, forward_output(x, y, BF16, &L, lo, hi, mean_hi, mean_lo, scale, shift, ACT));
    }
    free(moments);
    free(coefficients);
    return 0;
}

/* Rows [p0, p1) of a sample: per channel, Σg and Σg·x̂ (fp32 runs) into sums (2·Cp), g = dy·act'(z) recomputed. */
static inline __attribute__((always_inline)) void block_grad_sums(
        const void* dy, const void* x, int bf16, int64_t base, int64_t p0, int64_t p1, int64_t C,
        const float* mean_hi, const float* mean_lo, const float* rstd, const float* scale, const float* shift,
        int act, float* sums) {
    const int64_t Cp = padded(C);
    memset(sums, 0, 2 * Cp * sizeof(float));
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = 0; j < C; j += NL_VL) {
            const int64_t count = min64(NL_VL, C - j), at = base + p * C + j;
            const vf d = load_at(x, bf16, at, count) - vec_at(mean_hi, j) - vec_at(mean_lo, j);
            const vf g = activation_grad(load_at(dy, bf16, at, count), d * vec_at(scale, j) + vec_at(shift, j), act);
            set_vec(sums, j, vec_at(sums, j) + g);
            set_vec(sums, Cp + j, vec_at(sums, Cp + j) + g * (d * vec_at(rstd, j)));
        }
}

static inline __attribute__((always_inline)) void input_grad(
        const void* dy, const void* x, void* dx, int bf16, const Layout* L, int64_t lo, int64_t hi,
        const float* mean_hi, const float* mean_lo, const float* scale, const float* shift, const float* x_scale,
        const float* constant, int act) {
    const int64_t C = L->C, Cp = padded(C);
    for (int64_t k = hi - 1; k >= lo; --k) {
        int64_t n, p0, p1;
        block_rows(L, k, &n, &p0, &p1);
        const int64_t base = n * L->P * C, c0 = n * Cp;
        for (int64_t p = p0; p < p1; ++p)
            for (int64_t j = 0; j < C; j += NL_VL) {
                const int64_t count = min64(NL_VL, C - j), at = base + p * C + j;
                const vf d = load_at(x, bf16, at, count) - vec_at(mean_hi, c0 + j) - vec_at(mean_lo, c0 + j);
                const vf g = activation_grad(load_at(dy, bf16, at, count),
                                             d * vec_at(scale, c0 + j) + vec_at(shift, j), act);
                store_at(dx, bf16, at, count,
                         g * vec_at(scale, c0 + j) + d * vec_at(x_scale, c0 + j) + vec_at(constant, c0 + j));
            }
    }
}

/* dy, x, dx (NULL: not wanted): (N, P, C) contiguous, fp32 or bf16; w, b: C fp32 values or NULL; mean, rstd: the
 * forward's (N, G) fp64 statistics; dweight, dbias (NULL: not wanted): C fp32 values out. Returns 0, or −1 where
 * scratch memory could not be allocated (nothing written). */
int group_norm_cl_bwd(const void* dy, const void* x, void* dx, int bf16, const float* w, const float* b,
                      const double* mean, const double* rstd, float* dweight, float* dbias, int64_t N, int64_t P,
                      int64_t C, int64_t G, int act, int threads) {
    const Layout L = {P, C, G, (P + GN_RUN - 1) / GN_RUN};
    const int64_t blocks = N * L.blocks_per_sample, Cp = padded(C), D = C / G;
    float* block_sums = malloc(sizeof(float) * 2 * Cp * blocks);
    double* channel_sums = malloc(sizeof(double) * 2 * N * Cp);
    float* coefficients = calloc((6 * N + 1) * Cp, sizeof(float));
    if (!block_sums || !channel_sums || !coefficients) {
        free(block_sums);
        free(channel_sums);
        free(coefficients);
        return -1;
    }
    float *mean_hi = coefficients, *mean_lo = mean_hi + N * Cp, *rstd_c = mean_lo + N * Cp, *scale = rstd_c + N * Cp;
    float *x_scale = scale + N * Cp, *constant = x_scale + N * Cp;
    float* shift = constant + N * Cp;
    for (int64_t c = 0; c < C; ++c) shift[c] = b ? b[c] : 0.0f;
    for (int64_t i = 0; i < N * G; ++i) {
        const int64_t n = i / G, g = i % G;
        channel_coefficients(&L, n, g, mean[i], rstd[i], w, mean_hi, mean_lo, scale);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) rstd_c[n * Cp + c] = (float)rstd[i];
    }
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = nl_share(blocks, t, nt), hi = nl_share(blocks, t + 1, nt);
        for (int64_t k = lo; k < hi; ++k) {
            int64_t n, p0, p1;
            block_rows(&L, k, &n, &p0, &p1);
            WITH_CONSTANT_FLAGS(bf16, act, block_grad_sums(dy, x, BF16, n * P * C, p0, p1, C, mean_hi + n * Cp,
                                                            mean_lo + n * Cp, rstd_c + n * Cp, scale + n * Cp, shift,
                                                            ACT, block_sums + 2 * Cp * k));
        }
#pragma omp barrier
        /* per (sample, channel): the blocks' sums in order, in fp64 */
        const int64_t columns_lo = nl_share(N * C, t, nt), columns_hi = nl_share(N * C, t + 1, nt);
        for (int64_t i = columns_lo; i < columns_hi; ++i) {
            const int64_t n = i / C, c = i % C;
            const float* s = block_sums + 2 * Cp * n * L.blocks_per_sample + c;
            double g_sum = 0.0, g_xhat_sum = 0.0;
            for (int64_t k = 0; k < L.blocks_per_sample; ++k) {
                g_sum += s[2 * Cp * k];
                g_xhat_sum += s[2 * Cp * k + Cp];
            }
            channel_sums[2 * n * Cp + c] = g_sum;
            channel_sums[2 * n * Cp + Cp + c] = g_xhat_sum;
        }
#pragma omp barrier
        const int64_t groups_lo = nl_share(N * G, t, nt), groups_hi = nl_share(N * G, t + 1, nt);
        for (int64_t i = groups_lo; i < groups_hi; ++i) {
            const int64_t n = i / G, g = i % G;
            double mean_g = 0.0, mean_g_xhat = 0.0; /* E[γ·g], E[γ·g·x̂] over the group */
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                const double gamma = w ? w[c] : 1.0;
                mean_g += gamma * channel_sums[2 * n * Cp + c];
                mean_g_xhat += gamma * channel_sums[2 * n * Cp + Cp + c];
            }
            mean_g /= (double)(P * D);
            mean_g_xhat /= (double)(P * D);
            const double r = rstd[i];
            for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                x_scale[n * Cp + c] = (float)(-r * r * mean_g_xhat);
                constant[n * Cp + c] = (float)(-r * mean_g);
            }
        }
        const int64_t channels_lo = nl_share(C, t, nt), channels_hi = nl_share(C, t + 1, nt);
        for (int64_t c = channels_lo; c < channels_hi; ++c) {
            double g_sum = 0.0, g_xhat_sum = 0.0;
            for (int64_t n = 0; n < N; ++n) {
                g_sum += channel_sums[2 * n * Cp + c];
                g_xhat_sum += channel_sums[2 * n * Cp + Cp + c];
            }
            if (dbias) dbias[c] = (float)g_sum;
            if (dweight) dweight[c] = (float)g_xhat_sum;
        }
#pragma omp barrier
        if (dx)
            WITH_CONSTANT_FLAGS(bf16, act, input_grad(dy, x, dx, BF16, &L, lo, hi, mean_hi, mean_lo, scale, shift,
                                                      x_scale, constant, ACT));
    }
    free(block_sums);
    free(channel_sums);
    free(coefficients);
    return 0;
}
