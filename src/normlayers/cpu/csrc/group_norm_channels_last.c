/* GroupNorm (Wu & He, 2018, eq. 1) of channels-last input with a fused activation, forward and backward:
 *     y = act(z),  z = (x − μ)·r·γ_c + β_c,  r = 1/sqrt(σ² + eps),  μ, σ² over each (sample, group)'s C/G·P values,
 * of an (N, P, C) contiguous array (P the spatial positions, the channels innermost), fp32 or bf16 in memory.
 *
 * Forward: one read pass for the statistics and one output pass. The statistics are two-pass per channel over each
 * block of GN_RUN positions while it sits in cache (the channel's block mean, then the squared deviations from it and
 * their residual sum), the channels and blocks of a group combined in fp64 by the law of total variance: never
 * E[x²] − E[x]², so a group whose mean is large against its spread keeps its accuracy. The mean is kept in fp64: its
 * fp32 rounding is taken off x and the rest enters through the shift (channel_coefficients), so no term of the size of
 * the mean is rounded. The statistics walk the blocks forwards, the order the hardware prefetchers stream, and the
 * output pass backwards, starting with the blocks read last, still in cache (blocks shared out, inputs out of cache,
 * 1×512×64×64 on a Zen 4 core, one thread: the statistics' first read alone took 1.10-1.28× its time walking the
 * blocks backwards, the whole forward 1.01-1.05× this order's with the statistics backwards and the output forwards;
 * the same within the noise at 2×320×32×32 and at two threads); where samples are small a thread reads, finalizes and
 * writes one whole sample after another (whole_samples). The statistics' first read of a block walks it row after
 * row (rows_sums), in address order; its second read, from cache, and the passes over blocks in cache walk it in
 * tiles of up to TILE·16 channels, whose accumulators and coefficients stay in registers; blocks not in cache are
 * walked row after row (rows_output, rows_backward).
 *
 * Backward: one read pass of (dy, x) for the per-(sample, channel) sums Σg and Σg·x̂ (g = dy·act'(z), z recomputed
 * from x and the saved statistics), in fp32 runs of GN_RUN positions added in fp64 in a fixed order (deterministic
 * whatever the thread count, no atomics), then one dx pass of GroupNorm's closed form dx = r·γ·g + K·(x − μ) + L,
 * K = −r²·E[γ·g·x̂], L = −r·E[γ·g] per (sample, group); dγ = Σ_n Σg·x̂, dβ = Σ_n Σg. Five passes of the input's size
 * against the eight of ATen's activation backward plus its group-norm backward. */
#include <stdlib.h>
#include <unistd.h>

#include "activations.h"
#include "common.h"

#define GN_RUN 128 /* positions per block: fp32 runs of at most 128 additions per channel */
#define TILE 4     /* vectors of channels per tile (WITH_TILE has a case for each count up to it) */
#define ROWS_AT_ONCE 4 /* rows_sums' and (whole samples) rows_output's rows per step: per-channel values loaded once */

/* NL_VL values at element offset j, only the first `count` of them from memory (the rest 0): a row's last part. */
static __attribute__((noinline)) vf load_part(const void* p, int bf16, int64_t j, int64_t count) {
    float part[NL_VL] = {0};
    for (int64_t i = 0; i < count; ++i) part[i] = nl_load1(p, bf16, j + i);
    vf v;
    memcpy(&v, part, sizeof v);
    return v;
}

static __attribute__((noinline)) void store_part(void* p, int bf16, int64_t j, int64_t count, vf v) {
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

/* How far ahead a tile walk prefetches: about PREFETCH_BYTES, at least PREFETCH_ROWS rows. A tile's rows are C·4
 * bytes apart, beyond the hardware prefetchers' reach (their strides stop at 2 KiB or at a page) where C is large;
 * measured at 1×512×64×64 under autograd (inputs out of cache), 24 KiB ahead took 10% off both kernels against 6
 * rows. */
#define PREFETCH_ROWS 6
#define PREFETCH_BYTES 24576

/* (as integers: the rows ahead may lie past the array, where a prefetch is harmless but a pointer is undefined) */
static inline void prefetch_at(const void* p, int bf16, int64_t j) {
    __builtin_prefetch((const void*)((uintptr_t)p + (uintptr_t)(j * (bf16 ? 2 : 4))));
}

/* an output's line, fetched for writing ahead of its store */
static inline void prefetch_for_store(void* p, int bf16, int64_t j) {
    __builtin_prefetch((const void*)((uintptr_t)p + (uintptr_t)(j * (bf16 ? 2 : 4))), 1);
}

static inline vf vec_at(const float* a, int64_t j) {
    vf v;
    memcpy(&v, a + j, sizeof v);
    return v;
}

static inline void set_vec(float* a, int64_t j, vf v) { memcpy(a + j, &v, sizeof v); }

static inline int64_t padded(int64_t c) { return (c + NL_VL - 1) / NL_VL * NL_VL; }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Runs the statements for each vector of a row of C channels, with its first channel j and its lanes (16, fewer in a
 * row's last vector): the whole vectors in a loop of their own, where the lanes are a constant and the partial
 * loads and stores (function calls) drop out, so no vector is spilled around them; then the partial one. */
#define FOR_EACH_VECTOR(C, ...)                                                     \
    do {                                                                            \
        int64_t j = 0;                                                              \
        for (; j + NL_VL <= (C); j += NL_VL) {                                      \
            const int64_t lanes = NL_VL;                                            \
            __VA_ARGS__                                                             \
        }                                                                           \
        if (j < (C)) {                                                              \
            const int64_t lanes = (C) - j;                                          \
            __VA_ARGS__                                                             \
        }                                                                           \
    } while (0)

/* Where the blocks are: (sample, block) in order, GN_RUN positions each (the last of a sample shorter), each row of C
 * channels walked in tiles of TILE vectors (the last tile of `last_tile` vectors, its last vector of `last_lanes`). */
typedef struct {
    int64_t P, C, G, blocks_per_sample, tiles, last_tile, last_lanes, ahead;
} Layout;

static Layout layout(int64_t P, int64_t C, int64_t G) {
    const int64_t vectors = (C + NL_VL - 1) / NL_VL, tiles = (vectors + TILE - 1) / TILE;
    const int64_t rows_ahead = PREFETCH_BYTES / (4 * C) > PREFETCH_ROWS ? PREFETCH_BYTES / (4 * C) : PREFETCH_ROWS;
    return (Layout){P, C, G, (P + GN_RUN - 1) / GN_RUN, tiles, vectors - TILE * (tiles - 1),
                    C - NL_VL * (vectors - 1), rows_ahead * C};
}

static inline void block_rows(const Layout* L, int64_t k, int64_t* n, int64_t* p0, int64_t* p1) {
    *n = k / L->blocks_per_sample;
    *p0 = k % L->blocks_per_sample * GN_RUN;
    *p1 = min64(*p0 + GN_RUN, L->P);
}

/* Calls `call` with NQ, the tile's vector count, and PARTIAL, whether its last vector is a row's partial last one, as
 * constants: its loops unroll, its accumulators stay in registers, and only a partial tile pays for a row's end. */
#define WITH_TILE(L, tile, call)                                                      \
    do {                                                                              \
        const int last_tile_ = (tile) == (L)->tiles - 1;                              \
        const int64_t vectors_ = last_tile_ ? (L)->last_tile : TILE;                  \
        if (last_tile_ && (L)->last_lanes < NL_VL) {                                  \
            enum { PARTIAL = 1 };                                                     \
            WITH_VECTORS_(vectors_, call);                                            \
        } else {                                                                      \
            enum { PARTIAL = 0 };                                                     \
            WITH_VECTORS_(vectors_, call);                                            \
        }                                                                             \
    } while (0)
#define WITH_VECTORS_(vectors, call)                              \
    switch (vectors) {                                            \
    case 1: { enum { NQ = 1 }; call; } break;                     \
    case 2: { enum { NQ = 2 }; call; } break;                     \
    case 3: { enum { NQ = 3 }; call; } break;                     \
    default: { enum { NQ = TILE }; call; } break;                 \
    }

/* Calls `call` with BF16 and ACT as constants, so each of the six variants is compiled on its own. */
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

/* The lanes of a tile's vector q: 16, or fewer in a partial tile's last vector. */
static inline int64_t tile_lanes(const Layout* L, int partial, int q, int nq) {
    return partial && q == nq - 1 ? L->last_lanes : NL_VL;
}

/* Per channel of tile `tile` over rows [p0, p1) at `base`, from `sums` (rows_sums' per-channel sums of the block,
 * which may be `m2` itself: each tile reads its own before writing them): the block mean (fp64) and the sum of
 * squared deviations from it, a second read of the tile (from cache) with the residual sum of the deviations
 * correcting both. */
static inline __attribute__((always_inline)) void tile_moments(
        const void* x, int bf16, const Layout* L, int64_t base, int64_t p0, int64_t p1, int64_t tile, int nq,
        int partial, const float* sums, double* mean, float* m2) {
    const int64_t C = L->C, j0 = tile * TILE * NL_VL;
    vf s[TILE], m[TILE], s1[TILE] = {0}, s2[TILE] = {0};
    for (int q = 0; q < nq; ++q) s[q] = vec_at(sums, j0 + q * NL_VL);
    const float inverse = 1.0f / (float)(p1 - p0);
    for (int q = 0; q < nq; ++q) m[q] = s[q] * inverse;
    for (int64_t p = p0; p < p1; ++p)
        for (int q = 0; q < nq; ++q) {
            const vf d = load_at(x, bf16, base + p * C + j0 + q * NL_VL, tile_lanes(L, partial, q, nq)) - m[q];
            s1[q] += d;
            s2[q] += d * d; /* lanes past C: 0 − 0 */
        }
    for (int q = 0; q < nq; ++q) {
        set_vec(m2, j0 + q * NL_VL, s2[q] - s1[q] * s1[q] * inverse);
        for (int i = 0; i < NL_VL; ++i) mean[j0 + q * NL_VL + i] = (double)m[q][i] + (double)s1[q][i] * inverse;
    }
}

/* The statistics' first read of rows [p0, p1), walked row after row in address order: each channel's sum in `sums`,
 * ROWS_AT_ONCE rows per load and store of the sums (the same additions in the same order as a row at a time: the same
 * bits). The tile walk that follows (tile_moments) finds the block in L2. Measured on a Zen 4 core, one thread
 * (inputs out of cache at 1×512×64×64): the statistics pass took 0.55-0.75× the time of a tile walk reading the block
 * twice; four rows per step took the inference call to 0.87-1.01× the time of one row per step (six runs; calls
 * through normlayers.functional.group_norm, rounds in random order); and in whole samples, where the tile walk read
 * both times, this walk took 0.96-0.99× its time at 2×320×32×32, 8×1280×8×8 and 4×256×16×16, 0.94× at
 * 2×512×24×24. */
static inline __attribute__((always_inline)) void sum_rows(const void* x, int bf16, int64_t at, int64_t C,
                                                           int64_t lanes, int rows, float* sums) {
    vf s = vec_at(sums, 0);
    for (int r = 0; r < rows; ++r, at += C) s += load_at(x, bf16, at, lanes);
    set_vec(sums, 0, s);
}

static inline __attribute__((always_inline)) void rows_sums(const void* x, int bf16, const Layout* L, int64_t base,
                                                            int64_t p0, int64_t p1, float* sums) {
    const int64_t C = L->C;
    memset(sums, 0, sizeof(float) * padded(C));
    int64_t p = p0;
    for (; p + ROWS_AT_ONCE <= p1; p += ROWS_AT_ONCE)
        FOR_EACH_VECTOR(C, sum_rows(x, bf16, base + p * C + j, C, lanes, ROWS_AT_ONCE, sums + j););
    for (; p < p1; ++p) FOR_EACH_VECTOR(C, sum_rows(x, bf16, base + p * C + j, C, lanes, 1, sums + j););
}

static inline __attribute__((always_inline)) void tile_output(
        const void* x, void* y, int bf16, const Layout* L, int64_t base, int64_t p0, int64_t p1, int64_t tile, int nq,
        int partial, const float* mean_hi, const float* scale, const float* shift, int act) {
    const int64_t C = L->C, j0 = tile * TILE * NL_VL;
    vf hi[TILE], a[TILE], b[TILE];
    for (int q = 0; q < nq; ++q) {
        hi[q] = vec_at(mean_hi, j0 + q * NL_VL);
        a[q] = vec_at(scale, j0 + q * NL_VL);
        b[q] = vec_at(shift, j0 + q * NL_VL);
    }
    for (int64_t p = p0; p < p1; ++p)
        for (int q = 0; q < nq; ++q) {
            const int64_t at = base + p * C + j0 + q * NL_VL, lanes = tile_lanes(L, partial, q, nq);
            prefetch_at(x, bf16, at + L->ahead);
            prefetch_for_store(y, bf16, at + L->ahead);
            const vf d = load_at(x, bf16, at, lanes) - hi[q];
            store_at(y, bf16, at, lanes, act_vf(d * a[q] + b[q], act));
        }
}

/* The output pass of rows [p0, p1) walked row after row, every channel of a row before the next: memory in address
 * order, which the hardware prefetchers follow, for blocks that are no longer in cache (shared blocks, a row per step;
 * whole samples larger than L2, `rows` = ROWS_AT_ONCE per load of the coefficients). There the tile walk's rows C·4
 * bytes apart cost: at 1×512×64×64 on a Zen 4 core its output pass alone took about 3× a copy of the same bytes; in
 * whole samples beyond L2 it took 1.04-1.28× the time of this walk (a row per step) at 2×512×32×32, 4×512×32×32,
 * 2×512×24×24 and 2×256×40×40 (rows 1 or 2 KiB apart), though 0.94-0.99× at 2×320×32×32. In cache the tile walk is
 * faster (its coefficients stay in registers; this loop loads three per vector): 0.84-0.97× its time at 8×1280×8×8
 * and 4×256×16×16. Four rows per step (inference calls, one thread, rounds in random order) took 0.93-1.00× a row per
 * step's time in whole samples at 2×320×32×32 and 2×512×32×32, but 1.04-1.06× with shared blocks at 1×512×64×64. */
static inline __attribute__((always_inline)) void output_rows(const void* x, void* y, int bf16, int64_t at, int64_t C,
                                                              int64_t lanes, int rows, vf hi, vf a, vf b, int act) {
    for (int r = 0; r < rows; ++r, at += C)
        store_at(y, bf16, at, lanes, act_vf((load_at(x, bf16, at, lanes) - hi) * a + b, act));
}

static inline __attribute__((always_inline)) void rows_output(const void* x, void* y, int bf16, const Layout* L,
                                                              int64_t base, int64_t p0, int64_t p1,
                                                              const float* mean_hi, const float* scale,
                                                              const float* shift, int act, int rows) {
    const int64_t C = L->C;
    int64_t p = p0;
    for (; p + rows <= p1; p += rows)
        FOR_EACH_VECTOR(C, output_rows(x, y, bf16, base + p * C + j, C, lanes, rows, vec_at(mean_hi, j),
                                       vec_at(scale, j), vec_at(shift, j), act););
    for (; p < p1; ++p)
        FOR_EACH_VECTOR(C, output_rows(x, y, bf16, base + p * C + j, C, lanes, 1, vec_at(mean_hi, j),
                                       vec_at(scale, j), vec_at(shift, j), act););
}

/* The core's L2 in bytes (glibc's sysconf, asked once), or 2 MiB where the system does not say. */
static int64_t l2_bytes(void) {
    static int64_t bytes; /* (atomic: calls from two Python threads may ask at once) */
    int64_t known = __atomic_load_n(&bytes, __ATOMIC_RELAXED);
    if (!known) {
        long reported = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
        reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        known = reported > 0 ? (int64_t)reported : (int64_t)2 << 20;
        __atomic_store_n(&bytes, known, __ATOMIC_RELAXED);
    }
    return known;
}

/* Whole samples per thread, each read, finalized and written before the next (no barriers; the passes after the
 * first find the sample in cache), where every thread gets a sample (and the samples split evenly or are many) and a
 * sample's `footprint` bytes (what its passes read and write) are at most `l2_multiple` times the core's L2 (the
 * second pass walks the sample backwards, its last blocks read first): four times in the forward, in the backward
 * twice on one thread and four times on several; else the blocks of all samples are shared out, with barriers
 * between the passes. The results do not depend on it (the same blocks, summed in the same order). Measured at
 * 2×320×32×32 (2.6 MB of forward footprint, 3.9 MB backward), the kernels alone: on a Sapphire Rapids core (2 MiB of
 * L2), one thread, the forward took 0.30 ms with shared blocks, 0.26 ms with whole samples; on a Zen 4 core (1 MiB),
 * one thread, shared blocks took 0.82-0.95× the whole samples' time forward and 0.70-0.76× backward; on two Zen 4
 * cores, where shared blocks wait at two barriers, whole samples took the inference call from 0.92-1.12× eager's time
 * to 0.82-0.95× and the training step from 0.51-0.84× to 0.50-0.79× (lower in four runs of five; calls through
 * normlayers.functional.group_norm, rounds in random order, one process each). With the statistics' first read and
 * the output beyond L2 walked in rows (rows_sums, rows_output), the forward on one thread took whole samples up to
 * four L2s too: at 2×320×32×32 the shared blocks took 1.06-1.14× its time (four runs); the backward's first pass reads
 * two arrays in tiles, and there whole samples took 1.25× the shared blocks' time (one run). */
static int whole_samples(int64_t N, int64_t footprint, int threads, int l2_multiple) {
    return N > 1 && N >= threads && (N % threads == 0 || N >= 4 * threads) && footprint <= l2_multiple * l2_bytes();
}

/* A thread's blocks [lo, hi) and (sample, group)s [groups_lo, groups_hi) in one round: sample `round` in whole-sample
 * mode, else its share of everything. */
typedef struct {
    int64_t lo, hi, groups_lo, groups_hi, samples_lo, samples_hi;
} Share;

static Share shares(const Layout* L, int64_t N, int per_sample, int64_t round, int t, int nt) {
    if (per_sample)
        return (Share){round * L->blocks_per_sample, (round + 1) * L->blocks_per_sample, round * L->G,
                       (round + 1) * L->G, round, round + 1};
    const int64_t blocks = N * L->blocks_per_sample;
    return (Share){nl_share(blocks, t, nt), nl_share(blocks, t + 1, nt), nl_share(N * L->G, t, nt),
                   nl_share(N * L->G, t + 1, nt), nl_share(N, t, nt), nl_share(N, t + 1, nt)};
}

/* Runs `call` for every tile of the thread's blocks in `share`, forwards or (backwards = 1: the blocks read last are
 * still in cache) backwards, with the block's sample n, rows [p0, p1) and index k. */
#define FOR_EACH_TILE(L, share, backwards, call)                                              \
    for (int64_t step_ = 0; step_ < (share).hi - (share).lo; ++step_) {                       \
        const int64_t k = (backwards) ? (share).hi - 1 - step_ : (share).lo + step_;          \
        int64_t n, p0, p1;                                                                    \
        block_rows(L, k, &n, &p0, &p1);                                                       \
        for (int64_t tile = 0; tile < (L)->tiles; ++tile) call;                               \
    }

/* Runs `call` for every block of the thread's `share`, forwards or (backwards = 1) backwards, with the block's
 * sample n, rows [p0, p1) and index k. */
#define FOR_EACH_BLOCK(share, backwards, call)                                        \
    for (int64_t step_ = 0; step_ < (share).hi - (share).lo; ++step_) {              \
        const int64_t k = (backwards) ? (share).hi - 1 - step_ : (share).lo + step_; \
        int64_t n, p0, p1;                                                           \
        block_rows(&L, k, &n, &p0, &p1);                                             \
        call;                                                                        \
    }

/* A thread's rounds [first, end): its samples in whole-sample mode, else one (its share of all the blocks). */
static inline void rounds(int per_sample, int64_t N, int t, int nt, int64_t* first, int64_t* end) {
    *first = per_sample ? nl_share(N, t, nt) : 0;
    *end = per_sample ? nl_share(N, t + 1, nt) : 1;
}

/* Per (sample, channel): the mean's fp32 rounding hi, the group's scale a = r·γ_c and the shift β_c − (μ − hi)·a
 * (fp32), so that z = (x − μ)·a + β_c = (x − hi)·a + shift: x − hi is exact near the mean (Sterbenz) and the mean's
 * remainder μ − hi, below half an ulp of μ, enters through the shift, so no term of the size of μ is rounded. */
static void channel_coefficients(const Layout* L, int64_t n, int64_t g, double mean, double r, const float* w,
                                 const float* b, float* mean_hi, float* scale, float* shift) {
    const int64_t D = L->C / L->G, Cp = padded(L->C);
    const float hi = (float)mean;
    const double lo = mean - hi;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const double a = w ? r * w[c] : r;
        mean_hi[n * Cp + c] = hi;
        scale[n * Cp + c] = (float)a;
        shift[n * Cp + c] = (float)((b ? b[c] : 0.0) - lo * a);
    }
}

/* The mean and variance of (sample, group)s [lo, hi) of one sample from its blocks' per-channel means and sums of
 * squared deviations, by the law of total variance: first per channel over the blocks in order (the channels side by
 * side, in vector lanes), then over the group's channels in order, in fp64. `scratch`: 2·C doubles. A group at a time,
 * each group's sums one chain of dependent additions over its blocks and channels, the step from the blocks' sums to
 * the coefficients took 27.6K cycles per call at 2×320×32×32 on a Zen 4 core (7% of the forward; one thread, input in
 * cache) and 78K at 1×512×64×64; this way 9.8K and 24K. */
static void group_moments(const Layout* L, const double* block_means, const float* block_m2, int64_t lo, int64_t hi,
                          double* scratch, double* mean, double* var) {
    const int64_t D = L->C / L->G, Cp = padded(L->C), B = L->blocks_per_sample, n = lo / L->G;
    const int64_t c0 = lo % L->G * D, c1 = c0 + (hi - lo) * D, count = L->P * D;
    double *total = scratch, *m2 = scratch + L->C;
    const double* means = block_means + Cp * n * B;
    const float* m2s = block_m2 + Cp * n * B;
    for (int64_t c = c0; c < c1; ++c) total[c] = m2[c] = 0.0;
    int64_t sample, p0, p1;
    for (int64_t k = 0; k < B; ++k) {
        block_rows(L, n * B + k, &sample, &p0, &p1);
        for (int64_t c = c0; c < c1; ++c) total[c] += (double)(p1 - p0) * means[Cp * k + c];
    }
    for (int64_t i = lo; i < hi; ++i) {
        const int64_t first = c0 + (i - lo) * D;
        double sum = 0.0;
        for (int64_t c = first; c < first + D; ++c) sum += total[c];
        mean[i - lo] = sum / (double)count;
        for (int64_t c = first; c < first + D; ++c) total[c] = mean[i - lo]; /* (the group's mean, per channel) */
    }
    for (int64_t k = 0; k < B; ++k) {
        block_rows(L, n * B + k, &sample, &p0, &p1);
        for (int64_t c = c0; c < c1; ++c) {
            const double delta = means[Cp * k + c] - total[c];
            m2[c] += m2s[Cp * k + c] + (double)(p1 - p0) * delta * delta;
        }
    }
    for (int64_t i = lo; i < hi; ++i) {
        const int64_t first = c0 + (i - lo) * D;
        double sum = 0.0;
        for (int64_t c = first; c < first + D; ++c) sum += m2[c];
        var[i - lo] = sum > 0.0 ? sum / (double)count : sum == sum ? 0.0 : sum; /* NaN kept */
    }
}

/* x, y: (N, P, C) contiguous, fp32 (bf16 = 0) or bf16 (1); w, b: C fp32 values or NULL; mean, rstd: (N, G) fp64
 * out, or NULL (not kept). act: 0 none, 1 SiLU, 2 ReLU. Returns 0, or −1 where scratch memory could not be
 * allocated (nothing written). */
int group_norm_cl_fwd(const void* x, void* y, int bf16, const float* w, const float* b, double* mean, double* rstd,
                      int64_t N, int64_t P, int64_t C, int64_t G, double eps, int act, int threads) {
    const Layout L = layout(P, C, G);
    const int64_t blocks = N * L.blocks_per_sample, Cp = padded(C);
    double* block_means = malloc(sizeof(double) * Cp * blocks);
    float* block_m2 = malloc(sizeof(float) * Cp * blocks);
    float* coefficients = calloc(3 * N * Cp, sizeof(float));
    double* combine_scratch = malloc(sizeof(double) * 4 * Cp * threads);
    if (!block_means || !block_m2 || !coefficients || !combine_scratch) {
        free(block_means);
        free(block_m2);
        free(coefficients);
        free(combine_scratch);
        return -1;
    }
    float *mean_hi = coefficients, *scale = mean_hi + N * Cp, *shift = scale + N * Cp;
    const int64_t sample_bytes = P * C * (bf16 ? 2 : 4);
    const int per_sample = whole_samples(N, 2 * sample_bytes, threads, 4);
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t first, end;
        rounds(per_sample, N, t, nt, &first, &end);
        for (int64_t round = first; round < end; ++round) {
            const Share share = shares(&L, N, per_sample, round, t, nt);
            FOR_EACH_BLOCK(share, 0, WITH_CONSTANT_FLAGS(bf16, ACT_NONE, {
                rows_sums(x, BF16, &L, n * P * C, p0, p1, block_m2 + Cp * k);
                for (int64_t tile = 0; tile < L.tiles; ++tile)
                    WITH_TILE(&L, tile, tile_moments(x, BF16, &L, n * P * C, p0, p1, tile, NQ, PARTIAL,
                                                     block_m2 + Cp * k, block_means + Cp * k, block_m2 + Cp * k));
            }));
            if (!per_sample) {
#pragma omp barrier
            }
            for (int64_t lo = share.groups_lo; lo < share.groups_hi;) { /* sample by sample */
                const int64_t hi = min64((lo / G + 1) * G, share.groups_hi);
                double* mu = combine_scratch + 4 * Cp * t; /* (G ≤ C: G means, G variances, 2·C scratch) */
                double* var = mu + G;
                group_moments(&L, block_means, block_m2, lo, hi, mu + 2 * G, mu, var);
                for (int64_t i = lo; i < hi; ++i) {
                    const double r = 1.0 / sqrt(var[i - lo] + eps);
                    if (mean) {
                        mean[i] = mu[i - lo];
                        rstd[i] = r;
                    }
                    channel_coefficients(&L, i / G, i % G, mu[i - lo], r, w, b, mean_hi, scale, shift);
                }
                lo = hi;
            }
            if (!per_sample) {
#pragma omp barrier
            }
            if (per_sample && sample_bytes <= l2_bytes()) {
                FOR_EACH_TILE(&L, share, 1, WITH_CONSTANT_FLAGS(bf16, act, WITH_TILE(&L, tile, tile_output(
                    x, y, BF16, &L, n * P * C, p0, p1, tile, NQ, PARTIAL, mean_hi + n * Cp, scale + n * Cp,
                    shift + n * Cp, ACT))));
            } else if (per_sample) {
                FOR_EACH_BLOCK(share, 1, WITH_CONSTANT_FLAGS(bf16, act, rows_output(
                    x, y, BF16, &L, n * P * C, p0, p1, mean_hi + n * Cp, scale + n * Cp, shift + n * Cp, ACT,
                    ROWS_AT_ONCE)));
            } else {
                FOR_EACH_BLOCK(share, 1, WITH_CONSTANT_FLAGS(bf16, act, rows_output(
                    x, y, BF16, &L, n * P * C, p0, p1, mean_hi + n * Cp, scale + n * Cp, shift + n * Cp, ACT, 1)));
            }
        }
    }
    free(block_means);
    free(block_m2);
    free(coefficients);
    free(combine_scratch);
    return 0;
}

/* One backward pass over tile `tile` of rows [p0, p1), g = dy·act'(z) with z = (x − hi)·a + shift recomputed from x
 * (channel_coefficients): the sums pass (input_grad = 0) puts Σg and Σg·(x − hi) per channel (fp32 runs) into sums at
 * j0 and Cp + j0 (x̂ = (x − hi − (μ − hi))·r is formed from them in fp64); the dx pass (1) writes
 * dx = r·γ·g + K·(x − hi) + L', L' = L − (μ − hi)·K. */
static inline __attribute__((always_inline)) void tile_backward(
        const void* dy, const void* x, void* dx, int bf16, const Layout* L, int64_t base, int64_t p0, int64_t p1,
        int64_t tile, int nq, int partial, const float* mean_hi, const float* scale, const float* shift,
        const float* x_scale, const float* constant, int act, int input_grad, float* sums) {
    const int64_t C = L->C, Cp = padded(C), j0 = tile * TILE * NL_VL;
    vf hi[TILE], a[TILE], b[TILE], k[TILE], l[TILE], g_sum[TILE] = {0}, g_d_sum[TILE] = {0};
    for (int q = 0; q < nq; ++q) {
        hi[q] = vec_at(mean_hi, j0 + q * NL_VL);
        a[q] = vec_at(scale, j0 + q * NL_VL);
        b[q] = vec_at(shift, j0 + q * NL_VL);
        if (input_grad) {
            k[q] = vec_at(x_scale, j0 + q * NL_VL);
            l[q] = vec_at(constant, j0 + q * NL_VL);
        }
    }
    for (int64_t p = p0; p < p1; ++p)
        for (int q = 0; q < nq; ++q) {
            const int64_t at = base + p * C + j0 + q * NL_VL, lanes = tile_lanes(L, partial, q, nq);
            prefetch_at(x, bf16, at + L->ahead);
            prefetch_at(dy, bf16, at + L->ahead);
            if (input_grad) prefetch_for_store(dx, bf16, at + L->ahead);
            const vf d = load_at(x, bf16, at, lanes) - hi[q];
            const vf g = act_grad_vf(d * a[q] + b[q], load_at(dy, bf16, at, lanes), act);
            if (input_grad) {
                store_at(dx, bf16, at, lanes, g * a[q] + d * k[q] + l[q]);
            } else {
                g_sum[q] += g;
                g_d_sum[q] += g * d;
            }
        }
    if (!input_grad)
        for (int q = 0; q < nq; ++q) {
            set_vec(sums, j0 + q * NL_VL, g_sum[q]);
            set_vec(sums, Cp + j0 + q * NL_VL, g_d_sum[q]);
        }
}

/* tile_backward's passes over rows [p0, p1) walked row after row (as rows_output, for blocks not in cache), the sums
 * (input_grad = 0) accumulated in sums[0, Cp) and sums[Cp, 2·Cp) in the tile walk's order and arithmetic (the same
 * bits). At 1×512×64×64 on a Zen 4 core (inputs out of cache, one thread) the backward took 0.77-0.91× ATen's with
 * this walk (FOR_EACH_VECTOR's loops; 1.00-1.33× where one loop took the partial vector too), 1.35-1.74× with the
 * tile walk. */
static inline __attribute__((always_inline)) void rows_backward(
        const void* dy, const void* x, void* dx, int bf16, const Layout* L, int64_t base, int64_t p0, int64_t p1,
        const float* mean_hi, const float* scale, const float* shift, const float* x_scale, const float* constant,
        int act, int input_grad, float* sums) {
    const int64_t C = L->C, Cp = padded(C);
    if (!input_grad) memset(sums, 0, sizeof(float) * 2 * Cp);
    for (int64_t p = p0; p < p1; ++p)
        FOR_EACH_VECTOR(C, {
            const int64_t at = base + p * C + j;
            const vf d = load_at(x, bf16, at, lanes) - vec_at(mean_hi, j);
            const vf a = vec_at(scale, j), g = act_grad_vf(d * a + vec_at(shift, j), load_at(dy, bf16, at, lanes), act);
            if (input_grad) {
                store_at(dx, bf16, at, lanes, g * a + d * vec_at(x_scale, j) + vec_at(constant, j));
            } else {
                set_vec(sums, j, vec_at(sums, j) + g);
                set_vec(sums, Cp + j, vec_at(sums, Cp + j) + g * d);
            }
        });
}

/* dy, x, dx (NULL: not wanted): (N, P, C) contiguous, fp32 or bf16; w, b: C fp32 values or NULL; mean, rstd: the
 * forward's (N, G) fp64 statistics; dweight, dbias (NULL: not wanted): C fp32 values out. Returns 0, or −1 where
 * scratch memory could not be allocated (nothing written). */
int group_norm_cl_bwd(const void* dy, const void* x, void* dx, int bf16, const float* w, const float* b,
                      const double* mean, const double* rstd, float* dweight, float* dbias, int64_t N, int64_t P,
                      int64_t C, int64_t G, int act, int threads) {
    const Layout L = layout(P, C, G);
    const int64_t blocks = N * L.blocks_per_sample, Cp = padded(C), D = C / G;
    float* block_sums = malloc(sizeof(float) * 2 * Cp * blocks);
    double* channel_sums = malloc(sizeof(double) * 2 * N * Cp);
    float* coefficients = calloc(5 * N * Cp, sizeof(float));
    if (!block_sums || !channel_sums || !coefficients) {
        free(block_sums);
        free(channel_sums);
        free(coefficients);
        return -1;
    }
    float *mean_hi = coefficients, *scale = mean_hi + N * Cp, *shift = scale + N * Cp, *x_scale = shift + N * Cp;
    float* constant = x_scale + N * Cp;
    for (int64_t i = 0; i < N * G; ++i) {
        const int64_t n = i / G, g = i % G;
        channel_coefficients(&L, n, g, mean[i], rstd[i], w, b, mean_hi, scale, shift);
    }
    const int per_sample = whole_samples(N, P * C * (bf16 ? 2 : 4) * 3, threads, threads > 1 ? 4 : 2);
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 1)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t first, end;
        rounds(per_sample, N, t, nt, &first, &end);
        for (int64_t round = first; round < end; ++round) {
            const Share share = shares(&L, N, per_sample, round, t, nt);
            if (per_sample) {
                FOR_EACH_TILE(&L, share, 0, WITH_CONSTANT_FLAGS(bf16, act, WITH_TILE(&L, tile, tile_backward(
                    dy, x, NULL, BF16, &L, n * P * C, p0, p1, tile, NQ, PARTIAL, mean_hi + n * Cp, scale + n * Cp,
                    shift + n * Cp, NULL, NULL, ACT, 0, block_sums + 2 * Cp * k))));
            } else {
                FOR_EACH_BLOCK(share, 0, WITH_CONSTANT_FLAGS(bf16, act, rows_backward(
                    dy, x, NULL, BF16, &L, n * P * C, p0, p1, mean_hi + n * Cp, scale + n * Cp, shift + n * Cp, NULL,
                    NULL, ACT, 0, block_sums + 2 * Cp * k)));
            }
            if (!per_sample) {
#pragma omp barrier
            }
            /* per (sample, channel): the blocks' sums in order, in fp64, the channels side by side in vector lanes
             * (a channel at a time, its block sums a strided chain: 195K cycles per call at 1×512×64×64 on a Zen 4
             * core against 34K, and 190K against 18K at 8×1280×8×8, where that was 27% of the backward); then
             * Σg·x̂ = r·(Σg·(x − hi) − (μ − hi)·Σg) */
            for (int64_t n = share.samples_lo; n < share.samples_hi; ++n) {
                double *g_sum = channel_sums + 2 * n * Cp, *g_d_sum = g_sum + Cp;
                for (int64_t c = 0; c < C; ++c) g_sum[c] = g_d_sum[c] = 0.0;
                for (int64_t k = 0; k < L.blocks_per_sample; ++k) {
                    const float* s = block_sums + 2 * Cp * (n * L.blocks_per_sample + k);
                    for (int64_t c = 0; c < C; ++c) {
                        g_sum[c] += s[c];
                        g_d_sum[c] += s[Cp + c];
                    }
                }
                for (int64_t g = 0; g < G; ++g) {
                    const double r = rstd[n * G + g], lo = mean[n * G + g] - (float)mean[n * G + g];
                    for (int64_t c = g * D; c < (g + 1) * D; ++c) g_d_sum[c] = r * (g_d_sum[c] - lo * g_sum[c]);
                }
            }
            if (!per_sample) {
#pragma omp barrier
            }
            for (int64_t i = share.groups_lo; i < share.groups_hi; ++i) {
                const int64_t n = i / G, g = i % G;
                double mean_g = 0.0, mean_g_xhat = 0.0; /* E[γ·g], E[γ·g·x̂] over the group */
                for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                    const double gamma = w ? w[c] : 1.0;
                    mean_g += gamma * channel_sums[2 * n * Cp + c];
                    mean_g_xhat += gamma * channel_sums[2 * n * Cp + Cp + c];
                }
                mean_g /= (double)(P * D);
                mean_g_xhat /= (double)(P * D);
                const double r = rstd[i], x_coefficient = -r * r * mean_g_xhat;
                const double lo = mean[i] - (float)mean[i]; /* (x − μ)·K = (x − hi)·K − lo·K */
                for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                    x_scale[n * Cp + c] = (float)x_coefficient;
                    constant[n * Cp + c] = (float)(-r * mean_g - lo * x_coefficient);
                }
            }
            if (!per_sample) {
#pragma omp barrier
            }
            if (dx && per_sample) {
                FOR_EACH_TILE(&L, share, 1, WITH_CONSTANT_FLAGS(bf16, act, WITH_TILE(&L, tile, tile_backward(
                    dy, x, dx, BF16, &L, n * P * C, p0, p1, tile, NQ, PARTIAL, mean_hi + n * Cp, scale + n * Cp,
                    shift + n * Cp, x_scale + n * Cp, constant + n * Cp, ACT, 1, NULL))));
            } else if (dx) {
                FOR_EACH_BLOCK(share, 1, WITH_CONSTANT_FLAGS(bf16, act, rows_backward(
                    dy, x, dx, BF16, &L, n * P * C, p0, p1, mean_hi + n * Cp, scale + n * Cp, shift + n * Cp,
                    x_scale + n * Cp, constant + n * Cp, ACT, 1, NULL)));
            }
        }
    }
    for (int64_t c = 0; c < C; ++c) { /* dγ, dβ: the samples' sums in order */
        double g_sum = 0.0, g_xhat_sum = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            g_sum += channel_sums[2 * n * Cp + c];
            g_xhat_sum += channel_sums[2 * n * Cp + Cp + c];
        }
        if (dbias) dbias[c] = (float)g_sum;
        if (dweight) dweight[c] = (float)g_xhat_sum;
    }
    free(block_sums);
    free(channel_sums);
    free(coefficients);
    return 0;
}
