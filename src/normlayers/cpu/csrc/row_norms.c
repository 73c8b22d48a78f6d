/* LayerNorm over the last dim of M contiguous rows of width N (Ba et al., 2016):
 *     y = (x − mean)·rstd·w + b,  rstd = 1/sqrt(var + eps),  var the biased variance,
 * the statistics in fp32 from two passes over the row while it sits in L1 (the mean, then the centred squares), the
 * output in one more: one read of x from memory and one write of y, where ATen's kernel takes more. The check the
 * Python side needs (every rstd positive and finite, else the scaled path: docs/reliability.md) is counted here, so
 * it costs no pass and no call. */
#include "common.h"

#include <stdlib.h>

/* rows per fp32 block of the weight and bias gradients' column sums (then added in fp64) */
#define ROW_BLOCK 64

/* Σ (x − shift) and Σ (x − shift)² over a row, in blocks of NL_BLOCK, the block sums added in fp64. */
static inline __attribute__((always_inline)) void row_moments(const void* x, int x_bf16, int64_t off, int64_t N,
                                                              float shift, double* shifted, double* squares) {
    *shifted = *squares = 0.0;
    for (int64_t start = 0; start < N; start += NL_BLOCK) {
        float d, q;
        nl_shifted_sums(x, x_bf16, off, start, start + NL_BLOCK < N ? start + NL_BLOCK : N, N, shift, &d, &q);
        *shifted += d;
        *squares += q;
    }
}

/* h = x + residual over a row, added in fp32 and rounded once to the rows' dtype (ATen's add). */
static inline __attribute__((always_inline)) void residual_row(const void* x, const void* residual, void* h,
                                                               int x_bf16, int64_t off, int64_t N) {
    int64_t j = 0;
    for (; j + NL_VL <= N; j += NL_VL)
        nl_store(h, x_bf16, off + j, nl_load(x, x_bf16, off + j) + nl_load(residual, x_bf16, off + j));
    for (; j < N; ++j)
        nl_store1(h, x_bf16, off + j, nl_load1(x, x_bf16, off + j) + nl_load1(residual, x_bf16, off + j));
}

/* One row of LayerNorm, or with rms of RMSNorm (Zhang & Sennrich, 2019: y = x·rstd·w, rstd = 1/sqrt(mean(x²) + eps),
 * no mean taken off). */
static inline __attribute__((always_inline)) int row_norm_row(
        const void* x, int x_bf16, const float* w, const float* b, void* y, int64_t row, int64_t N, float eps,
        int rms, float* mean_out, float* rstd_out) {
    const int64_t off = row * N;
    /* One read for both moments, of x − k with k the mean of the row's first values (near the row's mean for any
     * but a sorted row): var = E[(x−k)²] − (E[x] − k)², whose rounding error is E[(x−k)²]·ε·(terms), so while
     * (E[x] − k)² ≤ var it is at most twice the centred form's. Otherwise a second, centred pass (in L1). */
    const int64_t head = N < NL_VL ? N : NL_VL;
    float k = 0.0f;
    for (int64_t j = 0; j < head && !rms; ++j) k += nl_load1(x, x_bf16, off + j);
    k /= (float)head;
    double shifted, squares;
    row_moments(x, x_bf16, off, N, k, &shifted, &squares);
    const double offset = rms ? 0.0 : shifted / (double)N;
    double var = squares / (double)N - offset * offset; /* RMSNorm: the mean of the squares */
    const float mean = (float)(k + offset);
    if (!rms && !(offset * offset <= var)) { /* also a NaN */
        row_moments(x, x_bf16, off, N, mean, &shifted, &squares);
        var = squares / (double)N;
    }
    const float rstd = 1.0f / sqrtf((float)var + eps);
    if (mean_out) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
    /* y = ((x − mean) − rounding)·rstd·w + b: x − mean is exact for values within 2× of the mean, and the fp32 mean's
     * rounding (of the size of mean·2⁻²⁴) comes off, so a row far from zero loses nothing; ATen's x·rstd − mean·rstd
     * keeps the rounding of two terms of the size of mean·rstd (docs/reliability.md, "Inputs offset from zero") */
    const float rounding = (float)((double)mean - (k + offset));
    const vf mean_v = nl_splat(mean), rounding_v = nl_splat(rounding), rstd_v = nl_splat(rstd);
    int64_t j = 0;
    for (; j + NL_VL <= N; j += NL_VL) {
        /* the next row's line at this column: ATen's kernel waits for each row's first lines, this one ~4% less
         * (measured on a Sapphire Rapids core; not on Zen: NL_PREFETCH_STREAMS) */
        if (NL_PREFETCH_STREAMS) __builtin_prefetch((const char*)x + (off + N + j) * (x_bf16 ? 2 : 4));
        vf v = (nl_load(x, x_bf16, off + j) - mean_v - rounding_v) * rstd_v;
        if (w) v *= nl_load(w, 0, j);
        if (b) v += nl_load(b, 0, j);
        nl_store(y, x_bf16, off + j, v);
    }
    for (; j < N; ++j) {
        float v = (nl_load1(x, x_bf16, off + j) - mean - rounding) * rstd;
        if (w) v *= w[j];
        if (b) v += b[j];
        nl_store1(y, x_bf16, off + j, v);
    }
    return !(rstd > 0.0f && rstd < INFINITY);
}

/* An fp32 copy of N bf16 parameters (NULL stays NULL), or the parameters themselves when they are fp32. */
static const float* fp32_params(const void* p, int p_bf16, int64_t N, float** owned) {
    *owned = NULL;
    if (!p || !p_bf16) return (const float*)p;
    *owned = malloc((size_t)N * sizeof(float));
    if (*owned)
        for (int64_t j = 0; j < N; ++j) (*owned)[j] = nl_bf16_to_f32(((const uint16_t*)p)[j]);
    return *owned;
}

/* LayerNorm (rms = 0) or RMSNorm (rms = 1; its mean is written as 0) of the M rows of width N of x, or with a residual
 * of h = x + residual, written to h first (the row is then normalized from L1). x, residual, h and y: fp32
 * (x_bf16 = 0) or bf16 (1); residual and h NULL, or both given; w and b (either may be NULL): fp32 (p_bf16 = 0) or
 * bf16 (1); mean and rstd: M fp32 values, or both NULL (inference). Returns how many rows have an rstd that is not
 * positive and finite (0: all trusted), or -1 where memory for the bf16 parameters' fp32 copy was not available. */
int64_t row_norm_fwd(const void* x, const void* residual, void* h, int x_bf16, const void* w, const void* b,
                     int p_bf16, void* y, float* mean, float* rstd, int64_t M, int64_t N, float eps, int rms,
                     int threads) {
    float *w_owned, *b_owned;
    const float* wf = fp32_params(w, p_bf16, N, &w_owned);
    const float* bf = fp32_params(b, p_bf16, N, &b_owned);
    int64_t bad = 0;
    if ((w && !wf) || (b && !bf)) {
        bad = -1;
    } else {
#pragma omp parallel num_threads(threads) reduction(+ : bad) if (threads > 1 && M > 1)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t lo = nl_share(M, t, nt), hi = nl_share(M, t + 1, nt);
#define ROW_NORM_ROWS(XB, RMS)                                                                         \
    for (int64_t i = lo; i < hi; ++i) {                                                                \
        if (residual) residual_row(x, residual, h, XB, i * N, N);                                       \
        bad += row_norm_row(residual ? h : x, XB, wf, bf, y, i, N, eps, RMS, mean, rstd);               \
    }
            if (x_bf16 && rms)
                ROW_NORM_ROWS(1, 1)
            else if (x_bf16)
                ROW_NORM_ROWS(1, 0)
            else if (rms)
                ROW_NORM_ROWS(0, 1)
            else
                ROW_NORM_ROWS(0, 0)
#undef ROW_NORM_ROWS
        }
    }
    free(w_owned);
    free(b_owned);
    return bad;
}

/* The LayerNorm backward of the rows [lo, hi) with fp32 statistics (x̂ = (x − mean)·rstd, gw = dy·w, n = N):
 *     dx = rstd·(gw − mean(gw) − x̂·mean(gw·x̂)),   dw += Σ_rows dy·x̂,   db += Σ_rows dy,
 * one read of the row from memory (the second pass finds it in L1), dw and db summed into this thread's column
 * accumulators: fp32 over a block of rows, then into fp64, so the sums over many rows lose no more than a block's
 * rounding and the result does not depend on the thread count beyond that. */
static inline __attribute__((always_inline)) void layer_norm_bwd_rows(
        const void* x, const void* dy, int bf16, const float* w, const float* mean, const float* rstd, void* dx,
        int64_t lo, int64_t hi, int64_t N, float* dw_block, float* db_block, double* dw_acc, double* db_acc) {
    for (int64_t block = lo; block < hi; block += ROW_BLOCK) {
        const int64_t block_end = block + ROW_BLOCK < hi ? block + ROW_BLOCK : hi;
        if (dw_block) memset(dw_block, 0, (size_t)N * sizeof(float));
        if (db_block) memset(db_block, 0, (size_t)N * sizeof(float));
        for (int64_t i = block; i < block_end; ++i) {
            const int64_t off = i * N;
            const float m = mean[i], r = rstd[i];
            const vf m_v = nl_splat(m), r_v = nl_splat(r);
            vf a0 = {0}, c0 = {0};
            float a = 0.f, c = 0.f;
            int64_t j = 0;
            for (; j + NL_VL <= N; j += NL_VL) {
                if (NL_PREFETCH_STREAMS) {
                    __builtin_prefetch((const char*)x + (off + N + j) * (bf16 ? 2 : 4));
                    __builtin_prefetch((const char*)dy + (off + N + j) * (bf16 ? 2 : 4));
                }
                const vf xh = (nl_load(x, bf16, off + j) - m_v) * r_v, g = nl_load(dy, bf16, off + j);
                const vf gw = w ? g * nl_load(w, 0, j) : g;
                a0 += gw * xh;
                c0 += gw;
                if (dw_block) nl_store(dw_block, 0, j, nl_load(dw_block, 0, j) + g * xh);
                if (db_block) nl_store(db_block, 0, j, nl_load(db_block, 0, j) + g);
            }
            a = nl_hsum(a0);
            c = nl_hsum(c0);
            for (; j < N; ++j) {
                const float xh = (nl_load1(x, bf16, off + j) - m) * r, g = nl_load1(dy, bf16, off + j);
                const float gw = w ? g * w[j] : g;
                a += gw * xh;
                c += gw;
                if (dw_block) dw_block[j] += g * xh;
                if (db_block) db_block[j] += g;
            }
            if (!dx) continue;
            const float a_n = a / (float)N, c_n = c / (float)N;
            const vf a_v = nl_splat(a_n), c_v = nl_splat(c_n);
            for (j = 0; j + NL_VL <= N; j += NL_VL) {
                const vf xh = (nl_load(x, bf16, off + j) - m_v) * r_v, g = nl_load(dy, bf16, off + j);
                const vf gw = w ? g * nl_load(w, 0, j) : g;
                nl_store(dx, bf16, off + j, r_v * (gw - c_v - xh * a_v));
            }
            for (; j < N; ++j) {
                const float xh = (nl_load1(x, bf16, off + j) - m) * r, g = nl_load1(dy, bf16, off + j);
                const float gw = w ? g * w[j] : g;
                nl_store1(dx, bf16, off + j, r * (gw - c_n - xh * a_n));
            }
        }
        for (int64_t j = 0; dw_block && j < N; ++j) dw_acc[j] += dw_block[j];
        for (int64_t j = 0; db_block && j < N; ++j) db_acc[j] += db_block[j];
    }
}

/* x, dy and dx (dx may be NULL): fp32 (bf16 = 0) or bf16 (1); w: fp32 or NULL; mean, rstd: M fp32 values; dw, db
 * (either may be NULL): N fp32 sums over the rows. Returns 0, or -1 where the accumulators' memory was not
 * available. */
int layer_norm_bwd(const void* x, const void* dy, int bf16, const float* w, const float* mean, const float* rstd,
                   void* dx, float* dw, float* db, int64_t M, int64_t N, int threads) {
    const int nt = threads > 1 && M > 1 ? (threads < M ? threads : (int)M) : 1;
    const int need = (dw != NULL) + (db != NULL);
    /* per thread: fp32 block sums and fp64 totals for dw and db */
    char* scratch = need ? calloc((size_t)nt * need * (size_t)N, sizeof(float) + sizeof(double)) : NULL;
    if (need && !scratch) return -1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num();
        const int64_t lo = nl_share(M, t, nt), hi = nl_share(M, t + 1, nt);
        double* acc = (double*)scratch + (size_t)t * need * N;
        float* block = (float*)((double*)scratch + (size_t)nt * need * N) + (size_t)t * need * N;
        float* dw_block = dw ? block : NULL;
        float* db_block = db ? block + (dw ? N : 0) : NULL;
        double* dw_acc = dw ? acc : NULL;
        double* db_acc = db ? acc + (dw ? N : 0) : NULL;
        if (bf16)
            layer_norm_bwd_rows(x, dy, 1, w, mean, rstd, dx, lo, hi, N, dw_block, db_block, dw_acc, db_acc);
        else
            layer_norm_bwd_rows(x, dy, 0, w, mean, rstd, dx, lo, hi, N, dw_block, db_block, dw_acc, db_acc);
    }
    for (int64_t j = 0; j < N && need; ++j) {
        double sw = 0.0, sb = 0.0;
        for (int t = 0; t < nt; ++t) {
            const double* acc = (double*)scratch + (size_t)t * need * N;
            if (dw) sw += acc[j];
            if (db) sb += acc[(dw ? N : 0) + j];
        }
        if (dw) dw[j] = (float)sw;
        if (db) db[j] = (float)sb;
    }
    free(scratch);
    return 0;
}
