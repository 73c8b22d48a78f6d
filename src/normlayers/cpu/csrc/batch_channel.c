/* Batch-Channel Normalization (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
 * Standardization", arXiv 1903.10520, Sec. 4) of contiguous NCHW x: a batch norm u = a_c·(x − μ_c) + β_c, then a group
 * norm of u with one affine value per group. Both stages follow from the mean m and biased variance v of each
 * (sample, channel) plane (normlayers/cpu/batch_channel.py derives the algebra), so the forward reads x once for the
 * plane moments and once more to write y = A_nc·(x − m_nc) + B_nc, where F.batch_norm then F.group_norm take four
 * passes and a fresh u; the backward reads x and dy once for Σ dy and Σ dy·(x − m) per plane and once more to write
 * dx = P·dy + Q·(x − m) + S. With constant batch-stage statistics (eval) each (sample, group) block needs only its
 * own planes, so the forward runs block by block: its second read hits L1/L2. Channels-last (NHWC) x has passes of
 * its own (sample by sample, NL_VL channels a vector) around the same (N, C) algebra.
 *
 * Plane moments are accurate (plane_moments): blocks of NL_BLOCK values, each summed about a value near its mean
 * (Σd and Σd², M2 = Σd² − (Σd)²/n; again about its mean, from L1, where that value was not near enough), the blocks
 * combined in fp64 (Chan, Golub and LeVeque, 1979). The (N, C) algebra runs in fp64; the passes over memory in fp32
 * lanes, bf16 values widened exactly and the outputs rounded once.
 *
 * Parameters and running statistics: fp32 or bf16 (bit i of `small_bf16` set: the i-th of bn_weight, bn_bias, weight,
 * bias, running_mean, running_var is bf16), contiguous, any of them NULL. */
#include <stdlib.h>

#include "common.h"

enum { BN_WEIGHT, BN_BIAS, WEIGHT, BIAS, RUNNING_MEAN, RUNNING_VAR };
enum { MODE_FROZEN, MODE_BATCH, MODE_ESTIMATE }; /* batch stage: given statistics, the batch's, EstBN's updated ones */

static inline double small_at(const void* p, int small_bf16, int which, int64_t i, double absent) {
    return p ? (double)nl_load1(p, (small_bf16 >> which) & 1, i) : absent;
}


/* The mean and biased variance of len values at x + off, fp64 (inv_last: 1 / the values of the last summation block,
 * the caller's, so that a short plane's few values pay no division). Each block of NL_BLOCK values is read once for
 * its sums about k, the mean of its first NL_VL values: M2 = Σd² − (Σd)²/n, whose rounding is at most about twice
 * that of the sums about the block's own mean while (mean − k)² ≤ M2/n (Σd² = M2 + n·(mean − k)² ≤ 2·M2), and k is
 * near the mean but for a sorted or trended plane; where it is not, the block (in L1) is summed again about its
 * mean. The blocks are combined in fp64 (Chan, Golub and LeVeque, 1979). */
static inline __attribute__((always_inline)) void plane_moments(const void* x, const int bf16, int64_t off,
                                                                int64_t len, double inv_last, double* mean_out,
                                                                double* var_out) {
    double mean = 0.0, m2 = 0.0;
    for (int64_t start = 0; start < len; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < len ? start + NL_BLOCK : len, count = end - start;
        const double inv_count = end == len ? inv_last : 1.0 / NL_BLOCK;
        float shift;
        if (count >= NL_VL) {
            shift = nl_hsum(nl_load(x, bf16, off + start)) * (1.0f / NL_VL);
        } else {
            shift = 0.0f;
            for (int64_t j = start; j < end; ++j) shift += nl_load1(x, bf16, off + j);
            shift *= (float)inv_count;
        }
        float d, q;
        nl_shifted_sums(x, bf16, off, start, end, len, shift, &d, &q);
        double block_m2 = (double)q - (double)d * (double)d * inv_count;
        if (!(2.0 * (double)d * (double)d * inv_count <= (double)q)) { /* (mean − k)² > M2/n, or a NaN: again */
            shift += (float)((double)d * inv_count);
            nl_shifted_sums(x, bf16, off, start, end, len, shift, &d, &q);
            block_m2 = (double)q - (double)d * (double)d * inv_count;
        }
        const double block_mean = (double)shift + (double)d * inv_count;
        if (start == 0) {
            mean = block_mean;
            m2 = block_m2;
        } else {
            const double delta = block_mean - mean, total = (double)end;
            mean += delta * (double)count / total;
            m2 += block_m2 + delta * delta * (double)start * (double)count / total;
        }
    }
    *mean_out = mean;
    /* rounding may leave a constant plane's M2 a hair below 0; a NaN stays */
    *var_out = (m2 > 0.0 ? m2 : 0.0 * m2) / (double)len;
}

/* 1 / the values of the last summation block of a plane of len values, for plane_moments. */
static inline double last_block_reciprocal(int64_t len) {
    return 1.0 / (double)(len % NL_BLOCK ? len % NL_BLOCK : NL_BLOCK);
}

/* The statistics the forward keeps for its backward, fp64, in one buffer of bcn_workspace_size(n, c, groups) values:
 * per plane (P = N·C) the mean, biased variance and u_dev = mu_nc − M_ng (mu_nc = a_c·(m_nc − μ_c) + β_c, the plane
 * mean of u; M_ng its group's mean); per channel the batch stage's μ_c, σ²_c, scale_c = 1/sqrt(σ²_c + bn_eps) and
 * a_c = γ_c·scale_c; per (sample, group) block R = 1/sqrt(V_ng + eps) and w_g·R. */
typedef struct {
    double *plane_mean, *plane_var, *u_dev, *batch_mean, *batch_var, *scale, *a, *rstd, *w_rstd;
} Stats;

int64_t bcn_workspace_size(int64_t n, int64_t c, int64_t groups) { return 3 * n * c + 4 * c + 2 * n * groups; }

static Stats stats_at(double* ws, int64_t n, int64_t c, int64_t groups) {
    const int64_t planes = n * c;
    Stats st = {ws, ws + planes, ws + 2 * planes, ws + 3 * planes, ws + 3 * planes + c, ws + 3 * planes + 2 * c,
                ws + 3 * planes + 3 * c, ws + 3 * planes + 4 * c, ws + 3 * planes + 4 * c + n * groups};
    return st;
}

/* Channels [lo, hi) of the batch stage: the batch's μ_c and σ²_c (law of total variance over the N planes: no
 * cancellation) with the running update of F.batch_norm (MODE_BATCH: momentum, unbiased variance) or of EstBN
 * (MODE_ESTIMATE: rate `momentum`, the variance centred at the old mean estimate, then the updated estimates, as
 * stored, normalize), or the given running statistics (MODE_FROZEN); then scale_c and a_c. */
static void channel_stage(int64_t lo, int64_t hi, int64_t n, int64_t c, int64_t hw, int mode, double momentum,
                          double bn_eps, const void* bn_weight, void* running_mean, void* running_var, int small_bf16,
                          Stats st) {
    const int mean_bf16 = (small_bf16 >> RUNNING_MEAN) & 1, var_bf16 = (small_bf16 >> RUNNING_VAR) & 1;
    for (int64_t ch = lo; ch < hi; ++ch) {
        double mean, var;
        if (mode == MODE_FROZEN) {
            mean = nl_load1(running_mean, mean_bf16, ch);
            var = nl_load1(running_var, var_bf16, ch);
        } else {
            double total = 0.0, spread = 0.0;
            for (int64_t s = 0; s < n; ++s) total += st.plane_mean[s * c + ch];
            mean = total / (double)n;
            for (int64_t s = 0; s < n; ++s) {
                const double d = st.plane_mean[s * c + ch] - mean;
                spread += st.plane_var[s * c + ch] + d * d;
            }
            var = spread / (double)n;
            if (running_mean && mode == MODE_BATCH) {
                const double count = (double)(n * hw);
                nl_store1(running_mean, mean_bf16, ch,
                          (float)((1.0 - momentum) * nl_load1(running_mean, mean_bf16, ch) + momentum * mean));
                nl_store1(running_var, var_bf16, ch, (float)((1.0 - momentum) * nl_load1(running_var, var_bf16, ch) +
                                                             momentum * var * count / (count - 1.0)));
            } else if (mode == MODE_ESTIMATE) {
                const double old_mean = nl_load1(running_mean, mean_bf16, ch), d = mean - old_mean;
                nl_store1(running_mean, mean_bf16, ch, (float)((1.0 - momentum) * old_mean + momentum * mean));
                nl_store1(running_var, var_bf16, ch, (float)((1.0 - momentum) * nl_load1(running_var, var_bf16, ch) +
                                                             momentum * (var + d * d)));
                mean = nl_load1(running_mean, mean_bf16, ch);
                var = nl_load1(running_var, var_bf16, ch);
            }
        }
        st.batch_mean[ch] = mean;
        st.batch_var[ch] = var;
        st.scale[ch] = 1.0 / sqrt(var + bn_eps);
        st.a[ch] = small_at(bn_weight, small_bf16, BN_WEIGHT, ch, 1.0) * st.scale[ch];
    }
}

/* y = A·(x − m) + B over the len values at x + off, fp32 arithmetic, rounded once; the last vector of a plane of at
 * least NL_VL values ends at its end (rewriting a few of the previous one's values, with the same bits). */
static inline __attribute__((always_inline)) void plane_affine(const void* x, const int bf16, void* y, int64_t off,
                                                               int64_t len, float m, float scale, float shift) {
    const vf m_v = nl_splat(m), a_v = nl_splat(scale), b_v = nl_splat(shift);
    if (len < NL_VL) {
        for (int64_t j = off; j < off + len; ++j) nl_store1(y, bf16, j, (nl_load1(x, bf16, j) - m) * scale + shift);
        return;
    }
    for (int64_t j = 0; j < len; j += NL_VL) {
        const int64_t at = off + (j + NL_VL <= len ? j : len - NL_VL);
        nl_store(y, bf16, at, (nl_load(x, bf16, at) - m_v) * a_v + b_v);
    }
}

/* Block (sample s, group g) of the group stage, from the plane moments: R and w_g·R into st, and the output's affine
 * coefficients of each of its cg planes, y = scale·(x − m) + shift (A = w_g·R·a_c, B = w_g·R·u_dev + b_g), with m the
 * fp32 plane mean and the rounding m − pm taken off in the shift; into m, scale and shift at 0..cg−1. */
static void block_coefficients(int64_t s, int64_t g, int64_t c, int64_t cg, int64_t groups, const void* bn_bias,
                               const void* weight, const void* bias, int small_bf16, double eps, Stats st, float* m,
                               float* scale, float* shift) {
    const int64_t c0 = g * cg, p0 = s * c + c0, block = s * groups + g;
    double total = 0.0;
    for (int64_t k = 0; k < cg; ++k) {
        const int64_t ch = c0 + k;
        st.u_dev[p0 + k] = st.a[ch] * (st.plane_mean[p0 + k] - st.batch_mean[ch]) +
                           small_at(bn_bias, small_bf16, BN_BIAS, ch, 0.0);
        total += st.u_dev[p0 + k];
    }
    const double group_mean = total / (double)cg;
    double spread = 0.0;
    for (int64_t k = 0; k < cg; ++k) {
        const int64_t ch = c0 + k;
        st.u_dev[p0 + k] -= group_mean;
        spread += st.a[ch] * st.a[ch] * st.plane_var[p0 + k] + st.u_dev[p0 + k] * st.u_dev[p0 + k];
    }
    const double rstd = 1.0 / sqrt(spread / (double)cg + eps);
    const double w_rstd = small_at(weight, small_bf16, WEIGHT, g, 1.0) * rstd;
    const double b = small_at(bias, small_bf16, BIAS, g, 0.0);
    st.rstd[block] = rstd;
    st.w_rstd[block] = w_rstd;
    for (int64_t k = 0; k < cg; ++k) {
        const int64_t p = p0 + k;
        const double a = w_rstd * st.a[c0 + k];
        m[k] = (float)st.plane_mean[p];
        scale[k] = (float)a;
        shift[k] = (float)(w_rstd * st.u_dev[p] + b - a * (st.plane_mean[p] - (double)m[k]));
    }
}

/* NCHW block (s, g): with `moments` first its plane moments (eval: the block's planes are all it reads), then its
 * coefficients (coef: 3·cg floats of scratch) and output planes. */
static inline __attribute__((always_inline)) void block_output(
        const void* x, const int bf16, void* y, int64_t s, int64_t g, int64_t c, int64_t cg, int64_t hw,
        int64_t groups, int moments, const void* bn_bias, const void* weight, const void* bias, int small_bf16,
        double eps, Stats st, float* coef) {
    const int64_t p0 = s * c + g * cg;
    if (moments) {
        const double inv_last = last_block_reciprocal(hw);
        for (int64_t p = p0; p < p0 + cg; ++p)
            plane_moments(x, bf16, p * hw, hw, inv_last, &st.plane_mean[p], &st.plane_var[p]);
    }
    float *m = coef, *scale = coef + cg, *shift = coef + 2 * cg;
    block_coefficients(s, g, c, cg, groups, bn_bias, weight, bias, small_bf16, eps, st, m, scale, shift);
    for (int64_t k = 0; k < cg; ++k) plane_affine(x, bf16, y, (p0 + k) * hw, hw, m[k], scale[k], shift[k]);
}

/* Channels-last (NHWC) rows: sample s is hw rows of c channels, a vector of NL_VL channels at a time (the last
 * c mod NL_VL one by one). Each channel's sums run down its column, one value a row, so rows are summed in blocks of
 * NHWC_ROWS (not NL_BLOCK) before the fp64 combination: a column's fp32 sum then has as few terms as a plane's lane. */
#define NHWC_ROWS 64

/* The plane moments of NHWC sample s (its c channels over its hw rows) into st, as plane_moments for a plane: each
 * block of rows summed about the mean of its first NL_VL rows, again about its mean (that channel's column alone)
 * where that was not near, the blocks combined in fp64. acc: 3·c floats of scratch. */
static inline __attribute__((always_inline)) void sample_moments_nhwc(const void* x, const int bf16, int64_t s,
                                                                      int64_t c, int64_t hw, Stats st, float* acc) {
    const int64_t base = s * hw * c, vc = c - c % NL_VL;
    float *shift = acc, *d = acc + c, *q = acc + 2 * c;
    double *mean = st.plane_mean + s * c, *m2 = st.plane_var + s * c; /* M2 until the end */
    for (int64_t start = 0; start < hw; start += NHWC_ROWS) {
        const int64_t end = start + NHWC_ROWS < hw ? start + NHWC_ROWS : hw, count = end - start;
        const int64_t head = count < NL_VL ? count : NL_VL;
        const double inv_count = 1.0 / (double)count;
        int64_t ch = 0;
        for (; ch < vc; ch += NL_VL) { /* a column of NL_VL channels at a time, its sums in registers */
            vf sh = {0};
            for (int64_t r = start; r < start + head; ++r) sh += nl_load(x, bf16, base + r * c + ch);
            sh *= nl_splat(1.0f / (float)head);
            vf d0 = {0}, d1 = {0}, q0 = {0}, q1 = {0};
            int64_t r = start;
            for (; r + 1 < end; r += 2) {
                const vf u = nl_load(x, bf16, base + r * c + ch) - sh;
                const vf v = nl_load(x, bf16, base + (r + 1) * c + ch) - sh;
                d0 += u;
                d1 += v;
                q0 += u * u;
                q1 += v * v;
            }
            if (r < end) {
                const vf u = nl_load(x, bf16, base + r * c + ch) - sh;
                d0 += u;
                q0 += u * u;
            }
            d0 += d1;
            q0 += q1;
            memcpy(shift + ch, &sh, sizeof sh);
            memcpy(d + ch, &d0, sizeof d0);
            memcpy(q + ch, &q0, sizeof q0);
        }
        for (; ch < c; ++ch) {
            float sh = 0.0f, dd = 0.0f, qq = 0.0f;
            for (int64_t r = start; r < start + head; ++r) sh += nl_load1(x, bf16, base + r * c + ch);
            sh *= 1.0f / (float)head;
            for (int64_t r = start; r < end; ++r) {
                const float v = nl_load1(x, bf16, base + r * c + ch) - sh;
                dd += v;
                qq += v * v;
            }
            shift[ch] = sh;
            d[ch] = dd;
            q[ch] = qq;
        }
        for (int64_t ch = 0; ch < c; ++ch) {
            float sh = shift[ch], dd = d[ch], qq = q[ch];
            if (!(2.0 * (double)dd * (double)dd * inv_count <= (double)qq)) { /* as plane_moments */
                sh += (float)((double)dd * inv_count);
                dd = qq = 0.0f;
                for (int64_t r = start; r < end; ++r) {
                    const float v = nl_load1(x, bf16, base + r * c + ch) - sh;
                    dd += v;
                    qq += v * v;
                }
            }
            const double block_mean = (double)sh + (double)dd * inv_count;
            const double block_m2 = (double)qq - (double)dd * (double)dd * inv_count;
            if (start == 0) {
                mean[ch] = block_mean;
                m2[ch] = block_m2;
            } else {
                const double delta = block_mean - mean[ch], total = (double)end;
                mean[ch] += delta * (double)count / total;
                m2[ch] += block_m2 + delta * delta * (double)start * (double)count / total;
            }
        }
    }
    for (int64_t ch = 0; ch < c; ++ch) m2[ch] = (m2[ch] > 0.0 ? m2[ch] : 0.0 * m2[ch]) / (double)hw;
}

/* NHWC sample s: with `moments` first its moments, then every group's coefficients and the sample's output rows.
 * coef: 3·c floats of scratch. */
static inline __attribute__((always_inline)) void sample_output_nhwc(
        const void* x, const int bf16, void* y, int64_t s, int64_t c, int64_t hw, int64_t groups, int moments,
        const void* bn_bias, const void* weight, const void* bias, int small_bf16, double eps, Stats st, float* acc,
        float* coef) {
    if (moments) sample_moments_nhwc(x, bf16, s, c, hw, st, acc);
    const int64_t cg = c / groups, base = s * hw * c, vc = c - c % NL_VL;
    float *m = coef, *scale = coef + c, *shift = coef + 2 * c;
    for (int64_t g = 0; g < groups; ++g)
        block_coefficients(s, g, c, cg, groups, bn_bias, weight, bias, small_bf16, eps, st, m + g * cg,
                           scale + g * cg, shift + g * cg);
    for (int64_t r = 0; r < hw; ++r) {
        const int64_t row = base + r * c;
        int64_t ch = 0;
        for (; ch < vc; ch += NL_VL)
            nl_store(y, bf16, row + ch,
                         (nl_load(x, bf16, row + ch) - nl_load(m, 0, ch)) * nl_load(scale, 0, ch) +
                             nl_load(shift, 0, ch));
        for (; ch < c; ++ch)
            nl_store1(y, bf16, row + ch, (nl_load1(x, bf16, row + ch) - m[ch]) * scale[ch] + shift[ch]);
    }
}

/* One thread's share of the forward (bf16: a constant where it is inlined, so each dtype gets its own loops);
 * scratch: this thread's 6·c floats. NCHW work is shared by planes and (sample, group) blocks, NHWC by samples. */
static inline __attribute__((always_inline)) void forward_share(
        const void* x, const int bf16, int channels_last, void* y, int64_t n, int64_t c, int64_t hw, int64_t groups,
        const void* bn_weight, const void* bn_bias, const void* weight, const void* bias, void* running_mean,
        void* running_var, int small_bf16, int mode, double momentum, double eps, double bn_eps, Stats st,
        float* scratch, int t, int nt) {
    const int64_t slo = nl_share(n, t, nt), shi = nl_share(n, t + 1, nt);
    if (mode != MODE_FROZEN) {
        if (channels_last) {
            for (int64_t s = slo; s < shi; ++s) sample_moments_nhwc(x, bf16, s, c, hw, st, scratch);
        } else {
            const double inv_last = last_block_reciprocal(hw);
            for (int64_t p = nl_share(n * c, t, nt); p < nl_share(n * c, t + 1, nt); ++p)
                plane_moments(x, bf16, p * hw, hw, inv_last, &st.plane_mean[p], &st.plane_var[p]);
        }
#pragma omp barrier
    }
    channel_stage(nl_share(c, t, nt), nl_share(c, t + 1, nt), n, c, hw, mode, momentum, bn_eps, bn_weight,
                  running_mean, running_var, small_bf16, st);
#pragma omp barrier
    if (channels_last) {
        for (int64_t s = slo; s < shi; ++s)
            sample_output_nhwc(x, bf16, y, s, c, hw, groups, mode == MODE_FROZEN, bn_bias, weight, bias, small_bf16,
                               eps, st, scratch, scratch + 3 * c);
    } else {
        for (int64_t b = nl_share(n * groups, t, nt); b < nl_share(n * groups, t + 1, nt); ++b)
            block_output(x, bf16, y, b / groups, b % groups, c, c / groups, hw, groups, mode == MODE_FROZEN, bn_bias,
                         weight, bias, small_bf16, eps, st, scratch);
    }
}

/* Thread t of nt's share of the forward, in x's dtype. */
static void forward_thread(const void* x, int x_bf16, int channels_last, void* y, int64_t n, int64_t c, int64_t hw,
                           int64_t groups, const void* bn_weight, const void* bn_bias, const void* weight,
                           const void* bias, void* running_mean, void* running_var, int small_bf16, int mode,
                           double momentum, double eps, double bn_eps, Stats st, float* scratch, int t, int nt) {
    float* mine = scratch + (size_t)t * 6 * (size_t)c;
    if (x_bf16)
        forward_share(x, 1, channels_last, y, n, c, hw, groups, bn_weight, bn_bias, weight, bias, running_mean,
                      running_var, small_bf16, mode, momentum, eps, bn_eps, st, mine, t, nt);
    else
        forward_share(x, 0, channels_last, y, n, c, hw, groups, bn_weight, bn_bias, weight, bias, running_mean,
                      running_var, small_bf16, mode, momentum, eps, bn_eps, st, mine, t, nt);
}

/* The forward of NCHW (channels_last = 0) or NHWC (1) contiguous x: y (x's layout and dtype) and the statistics in
 * ws; with MODE_BATCH/MODE_ESTIMATE the running statistics (if any) updated in place. One thread runs outside a
 * parallel region (its barriers are then no-ops): opening even a one-thread team costs a few microseconds, the whole
 * kernel's time at small sizes. Returns 0, or -1 where the scratch memory could not be allocated. */
int bcn_forward(const void* x, int x_bf16, int channels_last, void* y, int64_t n, int64_t c, int64_t hw,
                int64_t groups, const void* bn_weight, const void* bn_bias, const void* weight, const void* bias,
                void* running_mean, void* running_var, int small_bf16, int mode, double momentum, double eps,
                double bn_eps, double* ws, int threads) {
    const Stats st = stats_at(ws, n, c, groups);
    const int team = threads > 1 ? threads : 1;
    float* scratch = malloc(sizeof(float) * 6 * (size_t)c * (size_t)team);
    if (!scratch) return -1;
    if (team == 1) {
        forward_thread(x, x_bf16, channels_last, y, n, c, hw, groups, bn_weight, bn_bias, weight, bias, running_mean,
                       running_var, small_bf16, mode, momentum, eps, bn_eps, st, scratch, 0, 1);
    } else {
#pragma omp parallel num_threads(team)
        forward_thread(x, x_bf16, channels_last, y, n, c, hw, groups, bn_weight, bn_bias, weight, bias, running_mean,
                       running_var, small_bf16, mode, momentum, eps, bn_eps, st, scratch, omp_get_thread_num(),
                       omp_get_num_threads());
    }
    free(scratch);
    return 0;
}

/* Σ dy and Σ dy·(x − m) over the len values of a plane (fp32 lanes per block, fp64 across blocks; the tail as in
 * plane_moments). */
static inline __attribute__((always_inline)) void plane_grad_sums(const void* x, const void* dy, const int bf16,
                                                                  int64_t off, int64_t len, float m, double* s1_out,
                                                                  double* s2_out) {
    const vf m_v = nl_splat(m);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t start = 0; start < len; start += NL_BLOCK) {
        const int64_t end = start + NL_BLOCK < len ? start + NL_BLOCK : len;
        vf a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        int64_t j = start;
        for (; j + 2 * NL_VL <= end; j += 2 * NL_VL) {
            const vf g0 = nl_load(dy, bf16, off + j), g1 = nl_load(dy, bf16, off + j + NL_VL);
            a0 += g0;
            a1 += g1;
            b0 += g0 * (nl_load(x, bf16, off + j) - m_v);
            b1 += g1 * (nl_load(x, bf16, off + j + NL_VL) - m_v);
        }
        if (j + NL_VL <= end) {
            const vf g0 = nl_load(dy, bf16, off + j);
            a0 += g0;
            b0 += g0 * (nl_load(x, bf16, off + j) - m_v);
            j += NL_VL;
        }
        const int vector_tail = j < end && len >= NL_VL;
        if (vector_tail) {
            const vf g1 = nl_last_lanes(nl_load(dy, bf16, off + end - NL_VL), end - j);
            a1 += g1;
            b1 += g1 * (nl_load(x, bf16, off + end - NL_VL) - m_v);
        }
        float sa = nl_hsum(a0 + a1), sb = nl_hsum(b0 + b1);
        if (!vector_tail)
            for (; j < end; ++j) {
                const float g = nl_load1(dy, bf16, off + j);
                sa += g;
                sb += g * (nl_load1(x, bf16, off + j) - m);
            }
        s1 += sa;
        s2 += sb;
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* dx = P·dy + Q·(x − m) + S over a plane, fp32 arithmetic, rounded once (the tail as in plane_affine). */
static inline __attribute__((always_inline)) void plane_dx(const void* x, const void* dy, void* dx, const int bf16,
                                                           int64_t off, int64_t len, float m, float dy_coef,
                                                           float x_coef, float constant) {
    const vf dy_v = nl_splat(dy_coef), x_v = nl_splat(x_coef), c_v = nl_splat(constant), m_v = nl_splat(m);
    if (len < NL_VL) {
        for (int64_t j = off; j < off + len; ++j)
            nl_store1(dx, bf16, j, nl_load1(dy, bf16, j) * dy_coef + (nl_load1(x, bf16, j) - m) * x_coef + constant);
        return;
    }
    for (int64_t j = 0; j < len; j += NL_VL) {
        const int64_t at = off + (j + NL_VL <= len ? j : len - NL_VL);
        nl_store(dx, bf16, at, nl_load(dy, bf16, at) * dy_v + (nl_load(x, bf16, at) - m_v) * x_v + c_v);
    }
}

/* The backward of bcn_forward from its statistics ws (normlayers/cpu/batch_channel.py derives it): per plane
 * s1 = Σ dy, s2 = Σ dy·(x − m); per (sample, group) block the group stage's du = w·R·dy + q·(x − m) + r; per channel
 * the batch stage's sums (batch statistics: dx = a·(du − mean(du) − x̂·mean(du·x̂)); constant ones: dx = a·du); then
 * dx = P·dy + Q·(x − m) + S in one pass. x, dy and dx share one dtype; dx and the parameter gradients (bits 0-3 of
 * small_bf16: bf16) may each be NULL. */
typedef struct {
    double *s1, *s2, *q, *r, *sum_du, *sum_du_dev, *k, *shift, *block_dyyhat, *block_dy;
} Scratch;

/* Plane p's dx = P·dy + Q·(x − m) + S: coef = {m (the fp32 plane mean), P, Q, S (the rounding of m taken off)}. */
static inline void dx_coefficients(int64_t p, int64_t c, int64_t groups, Stats st, Scratch sc, float* coef) {
    const int64_t ch = p % c, b = (p / c) * groups + ch / (c / groups);
    const double a = st.a[ch], centred = st.plane_mean[p] - st.batch_mean[ch], x_coef = a * (sc.q[p] - sc.k[ch]);
    const float m = (float)st.plane_mean[p];
    coef[0] = m;
    coef[1] = (float)(st.w_rstd[b] * a);
    coef[2] = (float)x_coef;
    coef[3] = (float)(a * (sc.r[p] - sc.shift[ch] - sc.k[ch] * centred) - x_coef * (st.plane_mean[p] - (double)m));
}

/* NHWC sample s: Σ dy and Σ dy·(x − m) of each channel's column (m its fp32 plane mean), rows in blocks of
 * NHWC_ROWS combined in fp64, into sc. acc: 3·c floats of scratch. */
static inline __attribute__((always_inline)) void sample_grad_sums_nhwc(const void* x, const void* dy, const int bf16,
                                                                        int64_t s, int64_t c, int64_t hw, Stats st,
                                                                        Scratch sc, float* acc) {
    const int64_t base = s * hw * c, vc = c - c % NL_VL;
    float *m = acc, *a1 = acc + c, *a2 = acc + 2 * c;
    for (int64_t ch = 0; ch < c; ++ch) {
        m[ch] = (float)st.plane_mean[s * c + ch];
        sc.s1[s * c + ch] = sc.s2[s * c + ch] = 0.0;
    }
    for (int64_t start = 0; start < hw; start += NHWC_ROWS) {
        const int64_t end = start + NHWC_ROWS < hw ? start + NHWC_ROWS : hw;
        int64_t ch = 0;
        for (; ch < vc; ch += NL_VL) {
            const vf m_v = nl_load(m, 0, ch);
            vf g_sum = {0}, gx_sum = {0};
            for (int64_t r = start; r < end; ++r) {
                const vf g = nl_load(dy, bf16, base + r * c + ch);
                g_sum += g;
                gx_sum += g * (nl_load(x, bf16, base + r * c + ch) - m_v);
            }
            memcpy(a1 + ch, &g_sum, sizeof g_sum);
            memcpy(a2 + ch, &gx_sum, sizeof gx_sum);
        }
        for (; ch < c; ++ch) {
            float g_sum = 0.0f, gx_sum = 0.0f;
            for (int64_t r = start; r < end; ++r) {
                const float g = nl_load1(dy, bf16, base + r * c + ch);
                g_sum += g;
                gx_sum += g * (nl_load1(x, bf16, base + r * c + ch) - m[ch]);
            }
            a1[ch] = g_sum;
            a2[ch] = gx_sum;
        }
        for (ch = 0; ch < c; ++ch) {
            sc.s1[s * c + ch] += a1[ch];
            sc.s2[s * c + ch] += a2[ch];
        }
    }
}

/* NHWC sample s: dx row by row, each channel's coefficients (dx_coefficients) from scratch: 4·c floats. */
static inline __attribute__((always_inline)) void sample_dx_nhwc(const void* x, const void* dy, void* dx,
                                                                 const int bf16, int64_t s, int64_t c, int64_t hw,
                                                                 int64_t groups, Stats st, Scratch sc, float* acc) {
    const int64_t base = s * hw * c, vc = c - c % NL_VL;
    float *m = acc, *dy_coef = acc + c, *x_coef = acc + 2 * c, *constant = acc + 3 * c;
    for (int64_t ch = 0; ch < c; ++ch) {
        float coef[4];
        dx_coefficients(s * c + ch, c, groups, st, sc, coef);
        m[ch] = coef[0];
        dy_coef[ch] = coef[1];
        x_coef[ch] = coef[2];
        constant[ch] = coef[3];
    }
    for (int64_t r = 0; r < hw; ++r) {
        const int64_t row = base + r * c;
        int64_t ch = 0;
        for (; ch < vc; ch += NL_VL)
            nl_store(dx, bf16, row + ch,
                         nl_load(dy, bf16, row + ch) * nl_load(dy_coef, 0, ch) +
                             (nl_load(x, bf16, row + ch) - nl_load(m, 0, ch)) * nl_load(x_coef, 0, ch) +
                             nl_load(constant, 0, ch));
        for (; ch < c; ++ch)
            nl_store1(dx, bf16, row + ch, nl_load1(dy, bf16, row + ch) * dy_coef[ch] +
                                              (nl_load1(x, bf16, row + ch) - m[ch]) * x_coef[ch] + constant[ch]);
    }
}

/* One thread's share of the backward (bf16 a constant where inlined; scratch: this thread's 4·c floats): NCHW work
 * shared by planes, NHWC by samples, the (N, C) algebra by blocks and channels. */
static inline __attribute__((always_inline)) void backward_share(
        const void* x, const void* dy, void* dx, const int bf16, int channels_last, int64_t n, int64_t c, int64_t hw,
        int64_t groups, int batch_stats, Stats st, Scratch sc, void* dbn_weight, void* dbn_bias, void* dweight,
        void* dbias, int small_bf16, float* scratch, int t, int nt) {
    const int64_t planes = n * c, blocks = n * groups, cg = c / groups;
    const double count = (double)(cg * hw), total = (double)(n * hw);
    const int64_t plo = nl_share(planes, t, nt), phi = nl_share(planes, t + 1, nt);
    const int64_t slo = nl_share(n, t, nt), shi = nl_share(n, t + 1, nt);
    if (channels_last) {
        for (int64_t s = slo; s < shi; ++s) sample_grad_sums_nhwc(x, dy, bf16, s, c, hw, st, sc, scratch);
    } else {
        for (int64_t p = plo; p < phi; ++p)
            plane_grad_sums(x, dy, bf16, p * hw, hw, (float)st.plane_mean[p], &sc.s1[p], &sc.s2[p]);
    }
    for (int64_t p = channels_last ? slo * c : plo; p < (channels_last ? shi * c : phi); ++p)
        /* s2 about the fp32 mean m, then about the fp64 one: Σ dy·(x − pm) = Σ dy·(x − m) − (pm − m)·Σ dy */
        sc.s2[p] -= (st.plane_mean[p] - (double)(float)st.plane_mean[p]) * sc.s1[p];
#pragma omp barrier
    for (int64_t b = nl_share(blocks, t, nt); b < nl_share(blocks, t + 1, nt); ++b) {
        const int64_t c0 = (b % groups) * cg, p0 = (b / groups) * c + c0;
        const double rstd = st.rstd[b], w_rstd = st.w_rstd[b];
        double dyyhat = 0.0, dy_sum = 0.0; /* Σ dy·ŷ and Σ dy over the block */
        for (int64_t j = 0; j < cg; ++j) {
            dyyhat += (st.a[c0 + j] * sc.s2[p0 + j] + st.u_dev[p0 + j] * sc.s1[p0 + j]) * rstd;
            dy_sum += sc.s1[p0 + j];
        }
        const double tb = w_rstd * rstd * dyyhat / count, mean_dy = w_rstd * dy_sum / count;
        for (int64_t j = 0; j < cg; ++j) {
            const int64_t p = p0 + j;
            sc.q[p] = -tb * st.a[c0 + j];
            sc.r[p] = -(mean_dy + tb * st.u_dev[p]);
            sc.sum_du[p] = w_rstd * sc.s1[p] + sc.r[p] * (double)hw;
            sc.sum_du_dev[p] = w_rstd * sc.s2[p] + sc.q[p] * st.plane_var[p] * (double)hw;
        }
        sc.block_dyyhat[b] = dyyhat;
        sc.block_dy[b] = dy_sum;
    }
#pragma omp barrier
    for (int64_t ch = nl_share(c, t, nt); ch < nl_share(c, t + 1, nt); ++ch) {
        double bias_grad = 0.0, weight_grad = 0.0; /* Σ du and Σ du·(x − μ) over the channel */
        for (int64_t s = 0; s < n; ++s) {
            const int64_t p = s * c + ch;
            bias_grad += sc.sum_du[p];
            weight_grad += sc.sum_du_dev[p] + (st.plane_mean[p] - st.batch_mean[ch]) * sc.sum_du[p];
        }
        sc.k[ch] = batch_stats ? st.scale[ch] * st.scale[ch] * weight_grad / total : 0.0;
        sc.shift[ch] = batch_stats ? bias_grad / total : 0.0;
        if (dbn_weight) nl_store1(dbn_weight, (small_bf16 >> BN_WEIGHT) & 1, ch, (float)(st.scale[ch] * weight_grad));
        if (dbn_bias) nl_store1(dbn_bias, (small_bf16 >> BN_BIAS) & 1, ch, (float)bias_grad);
    }
    if (t == 0 && (dweight || dbias))
        for (int64_t g = 0; g < groups; ++g) {
            double weight_grad = 0.0, bias_grad = 0.0;
            for (int64_t s = 0; s < n; ++s) {
                weight_grad += sc.block_dyyhat[s * groups + g];
                bias_grad += sc.block_dy[s * groups + g];
            }
            if (dweight) nl_store1(dweight, (small_bf16 >> WEIGHT) & 1, g, (float)weight_grad);
            if (dbias) nl_store1(dbias, (small_bf16 >> BIAS) & 1, g, (float)bias_grad);
        }
    if (!dx) return;
#pragma omp barrier
    if (channels_last) {
        for (int64_t s = slo; s < shi; ++s) sample_dx_nhwc(x, dy, dx, bf16, s, c, hw, groups, st, sc, scratch);
        return;
    }
    for (int64_t p = plo; p < phi; ++p) {
        float coef[4];
        dx_coefficients(p, c, groups, st, sc, coef);
        plane_dx(x, dy, dx, bf16, p * hw, hw, coef[0], coef[1], coef[2], coef[3]);
    }
}

static void backward_thread(const void* x, const void* dy, void* dx, int bf16, int channels_last, int64_t n,
                            int64_t c, int64_t hw, int64_t groups, int batch_stats, Stats st, Scratch sc,
                            void* dbn_weight, void* dbn_bias, void* dweight, void* dbias, int small_bf16,
                            float* scratch, int t, int nt) {
    float* mine = scratch + (size_t)t * 4 * (size_t)c;
    if (bf16)
        backward_share(x, dy, dx, 1, channels_last, n, c, hw, groups, batch_stats, st, sc, dbn_weight, dbn_bias,
                       dweight, dbias, small_bf16, mine, t, nt);
    else
        backward_share(x, dy, dx, 0, channels_last, n, c, hw, groups, batch_stats, st, sc, dbn_weight, dbn_bias,
                       dweight, dbias, small_bf16, mine, t, nt);
}

/* x, dy and dx: one dtype and one layout, NCHW (channels_last = 0) or NHWC (1). Returns 0, or -1 where the scratch
 * memory could not be allocated (threads: as bcn_forward's). */
int bcn_backward(const void* x, const void* dy, void* dx, int bf16, int channels_last, int64_t n, int64_t c,
                 int64_t hw, int64_t groups, int batch_stats, const double* ws, void* dbn_weight, void* dbn_bias,
                 void* dweight, void* dbias, int small_bf16, int threads) {
    const int64_t planes = n * c, blocks = n * groups;
    const int team = threads > 1 ? threads : 1;
    /* per plane s1, s2, q (the x − m coefficient of du), r (its constant), Σ du, Σ du·(x − m); per channel k and
     * shift (the batch stage's terms of dx); per block Σ dy·ŷ and Σ dy; then each thread's 4·c floats */
    const size_t doubles = (size_t)(6 * planes + 2 * c + 2 * blocks);
    double* mem = malloc(sizeof(double) * doubles + sizeof(float) * 4 * (size_t)c * (size_t)team);
    if (!mem) return -1;
    const Scratch sc = {mem, mem + planes, mem + 2 * planes, mem + 3 * planes, mem + 4 * planes, mem + 5 * planes,
                        mem + 6 * planes, mem + 6 * planes + c, mem + 6 * planes + 2 * c,
                        mem + 6 * planes + 2 * c + blocks};
    float* scratch = (float*)(mem + doubles);
    const Stats st = stats_at((double*)ws, n, c, groups);
    if (team == 1) {
        backward_thread(x, dy, dx, bf16, channels_last, n, c, hw, groups, batch_stats, st, sc, dbn_weight, dbn_bias,
                        dweight, dbias, small_bf16, scratch, 0, 1);
    } else {
#pragma omp parallel num_threads(team)
        backward_thread(x, dy, dx, bf16, channels_last, n, c, hw, groups, batch_stats, st, sc, dbn_weight, dbn_bias,
                        dweight, dbias, small_bf16, scratch, omp_get_thread_num(), omp_get_num_threads());
    }
    free(mem);
    return 0;
}
