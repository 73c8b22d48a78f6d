/* LayerNorm over the last dim of M contiguous rows of width N (Ba et al., 2016):
 *     y = (x − mean)·rstd·w + b,  rstd = 1/sqrt(var + eps),  var the biased variance,
 * the statistics in fp32 from two passes over the row while it sits in L1 (the mean, then the centred squares), the
 * output in one more: one read of x from memory and one write of y, where ATen's kernel takes more. The check the
 * Python side needs (every rstd positive and finite, else the scaled path: docs/reliability.md) is counted here, so
 * it costs no pass and no call. */
#include "common.h"

static inline __attribute__((always_inline)) int layer_norm_row(
        const void* x, int x_bf16, const void* w, const void* b, int p_bf16, void* y, int64_t row, int64_t N,
        float eps, float* mean_out, float* rstd_out) {
    const int64_t off = row * N;
    double total = 0.0;
    for (int64_t start = 0; start < N; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < N ? start + NL_BLOCK : N;
        vf s0 = {0}, s1 = {0};
        int64_t j = start;
        for (; j + 2 * NL_VL <= end; j += 2 * NL_VL) {
            s0 += nl_load(x, x_bf16, off + j);
            s1 += nl_load(x, x_bf16, off + j + NL_VL);
        }
        float s = nl_hsum(s0 + s1);
        for (; j < end; ++j) s += nl_load1(x, x_bf16, off + j);
        total += s;
    }
    const float mean = (float)(total / (double)N);
    const vf mean_v = nl_splat(mean);
    double squares = 0.0;
    for (int64_t start = 0; start < N; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < N ? start + NL_BLOCK : N;
        vf s0 = {0}, s1 = {0};
        int64_t j = start;
        for (; j + 2 * NL_VL <= end; j += 2 * NL_VL) {
            const vf d0 = nl_load(x, x_bf16, off + j) - mean_v, d1 = nl_load(x, x_bf16, off + j + NL_VL) - mean_v;
            s0 += d0 * d0;
            s1 += d1 * d1;
        }
        float s = nl_hsum(s0 + s1);
        for (; j < end; ++j) {
            const float d = nl_load1(x, x_bf16, off + j) - mean;
            s += d * d;
        }
        squares += s;
    }
    const float rstd = 1.0f / sqrtf((float)(squares / (double)N) + eps);
    mean_out[row] = mean;
    rstd_out[row] = rstd;
    /* y = x·rstd − mean·rstd, then ·w + b: ATen's order, so fp32 results match torch's to an ulp or two */
    const float shift = -mean * rstd;
    const vf rstd_v = nl_splat(rstd), shift_v = nl_splat(shift);
    int64_t j = 0;
    for (; j + NL_VL <= N; j += NL_VL) {
        vf v = nl_load(x, x_bf16, off + j) * rstd_v + shift_v;
        if (w) v *= nl_load(w, p_bf16, j);
        if (b) v += nl_load(b, p_bf16, j);
        nl_store(y, x_bf16, off + j, v);
    }
    for (; j < N; ++j) {
        float v = nl_load1(x, x_bf16, off + j) * rstd + shift;
        if (w) v *= nl_load1(w, p_bf16, j);
        if (b) v += nl_load1(b, p_bf16, j);
        nl_store1(y, x_bf16, off + j, v);
    }
    return !(rstd > 0.0f && rstd < INFINITY);
}

/* x and y: fp32 (x_bf16 = 0) or bf16 (1); w and b (either may be NULL): fp32 (p_bf16 = 0) or bf16 (1); mean and
 * rstd: M fp32 values. Returns how many rows have an rstd that is not positive and finite (0: all trusted). */
int64_t layer_norm_fwd(const void* x, int x_bf16, const void* w, const void* b, int p_bf16, void* y,
                       float* mean, float* rstd, int64_t M, int64_t N, float eps, int threads) {
    int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad) if (threads > 1 && M > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = nl_share(M, t, nt), hi = nl_share(M, t + 1, nt);
        if (x_bf16 && p_bf16)
            for (int64_t i = lo; i < hi; ++i) bad += layer_norm_row(x, 1, w, b, 1, y, i, N, eps, mean, rstd);
        else if (x_bf16)
            for (int64_t i = lo; i < hi; ++i) bad += layer_norm_row(x, 1, w, b, 0, y, i, N, eps, mean, rstd);
        else if (p_bf16)
            for (int64_t i = lo; i < hi; ++i) bad += layer_norm_row(x, 0, w, b, 1, y, i, N, eps, mean, rstd);
        else
            for (int64_t i = lo; i < hi; ++i) bad += layer_norm_row(x, 0, w, b, 0, y, i, N, eps, mean, rstd);
    }
    return bad;
}
