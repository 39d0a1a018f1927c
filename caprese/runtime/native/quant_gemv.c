/* Matrix-vector products over caprese's quantized weights (caprese/model/quantization.py, THE format), batch 1.
 *
 * Why: a decode step streams every weight once, so int4 / int8 weights cut the bytes a step reads by 8x / 4x
 * against fp32; what the kernel must not do is give that back in instructions. The weights are read in their
 * stored bytes (QuantizedTensor.packed(): int8 two's complement, or int4 two per byte, element 2j in the low
 * nibble), decoded in registers to fp32 and multiplied with fp32 activations (FMA). The activations are NOT
 * quantized: the result is the float64 product with dequantize(W) up to fp32 rounding, the graphs' value
 * (DequantizeLinear -> MatMul), so the native backend can give ONNX Runtime's tokens on the same engine.
 * Engines exported with --int8-activations state int8-activation arithmetic instead: int8_activations.c (int4).
 *
 * Two shapes, for the two orientations of the format's plan:
 *   rows-dot   W stored [out, in], blocks along `in` (q/k/v/o/gate/up/LM head):
 *              y[i] = sum_c x[c] * w[row_i, c]                      for i in [r0, r1)
 *   rows-axpy  W stored [F, D], blocks along D (down):
 *              y[c] += sum_{i in [r0, r1), h[i] != 0} h[i] * w[row_i, c]   for c in [0, D)
 *              rows whose coefficient is 0 are not read at all (CATS skips whole quantized rows)
 * row_i = idx[i] when idx is given (GRIFFIN's kept neurons, per prompt), else i; [r0, r1) is a thread-pool
 * chunk. In rows-axpy h is indexed like y of rows-dot (by i, not by row_i): compact for GRIFFIN, the full
 * activation vector for CATS.
 *
 * Arithmetic: per block, the codes times x are summed in fp32 (codes are exact in fp32), the block sum is
 * multiplied by the block's scale and added to the row's sum (rows-dot); rows-axpy adds (h[i] * scale) * code.
 * fp16 scales are widened exactly (F16C, or bit manipulation in the scalar build).
 *
 * Vector layout: an int4 byte holds elements 2j (low nibble) and 2j + 1 (high). The AVX-512 body widens 16
 * bytes (32 elements) to 16 int32 lanes and looks the low nibbles (even elements) and the high nibbles (odd
 * elements) up in a 16-float table (vpermps); the AVX2 body (8 bytes, 8 lanes) sign-extends them with shifts.
 * Rather than re-interleave the weights, x is de-interleaved once per call (rows-dot) and the partial y is kept
 * de-interleaved and interleaved once at the end (rows-axpy); the *_prepared entry points let a thread pool do
 * that once per vector instead of once per chunk. Columns are processed in tiles of QG_TILE (a multiple of
 * every block and vector group), so the per-call buffers live on the stack (~18 KiB). Four rows at a time share
 * each x / y load (rows-dot: two, for rows of QG_PAIR_BYTES or more); rows are prefetched ahead by index, codes
 * and every line of their scales. Speed: docs/performance.md (2026-12-06, 2026-12-07).
 *
 * ISA: built like decode_step.c by caprese/runtime/native/library.py (avx512 | avx2 | scalar); caprese_isa()
 * says which code paths this build runs. Self-contained, so decode_step.c can `#include` it later (define
 * CAPRESE_QGEMV_EMBEDDED there to drop this file's own layout table and ISA name; its names are qg_ / QG_ /
 * caprese_q*, plus the V* vector macros).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* One quantized matrix, as QuantizedTensor stores it. */
typedef struct {
    const uint8_t *codes; /* [rows, cols * bits / 8] row-major (int8 codes, or int4 pairs: 2j low, 2j+1 high) */
    const void *scales;   /* [rows, cols / block]: fp16 bits (uint16) or fp32 */
    int64_t rows, cols;
    int64_t block;        /* elements per scale: 32 | 64 | 128, or cols (block size ROW: one scale per row) */
    int32_t bits;         /* 4 | 8 */
    int32_t scale_fp32;   /* 0: fp16 scales, 1: fp32 */
    int64_t layout;       /* QG_ROWS, or QG_R16: codes and scales repacked in groups of 16 rows (int8_activations.c,
                           * caprese_qx_pack_r16), read by the int8-activation rows-dot only */
} QMat;
#define QG_ROWS 0
#define QG_R16 1

#define QG_TILE 4096 /* columns per tile: a multiple of 128 and of every vector group */
/* Rows are prefetched whole (the tile's columns) about this many bytes ahead of the rows being read: the kernel
 * consumes bytes faster than the hardware prefetcher fetches them. Measured on a Zen 4 VM, one thread, weights
 * streaming from DRAM: int8 rows-dot 5.4 -> 16.4 GB/s, int8 rows-axpy 5.8 -> 16, int4 7.8 -> 9.0 (its compute
 * bound); prefetcht1 (locality 2): with prefetcht0 int8 rows-dot stayed at 8 GB/s. By row, not by address, so
 * GRIFFIN's gathered rows and CATS' skipped rows fetch only the rows that will be read. */
#define QG_PF_BYTES 8192

/* Every cache line of [p, p + len) (a range that does not start on a line touches one more line than len / 64). */
static inline void qg_prefetch(const uint8_t *p, int64_t len) {
    for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < (uintptr_t)(p + len); a += 64)
        __builtin_prefetch((const void *)a, 0, 2);
}

#if defined(__AVX512F__)
#define QG_VL 16
typedef __m512 qg_vf;
#define VZERO() _mm512_setzero_ps()
#define VSET1(a) _mm512_set1_ps(a)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSUM(v) _mm512_reduce_add_ps(v)
static inline qg_vf qg_i8(const uint8_t *p) { /* 16 int8 codes -> 16 floats */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* 16 bytes -> elements 0,2,..30 / 1,..31: vpermps looks the float of each lane's low 4 bits up in a 16-entry
 * table (nibble n -> (n ^ 8) - 8), so a nibble costs one permute instead of shifts and a conversion. */
static inline void qg_i4(const uint8_t *p, qg_vf *even, qg_vf *odd) {
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = _mm512_permutexvar_ps(v, lut);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define QG_VL 8
typedef __m256 qg_vf;
#define VZERO() _mm256_setzero_ps()
#define VSET1(a) _mm256_set1_ps(a)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline qg_vf qg_i8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline void qg_i4(const uint8_t *p, qg_vf *even, qg_vf *odd) { /* 8 bytes -> elements 0,2,..14 / 1,..15 */
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); /* sign-extended bytes */
    *even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
    *odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4)); /* the high nibble is the byte's signed top half */
}
#else
#define QG_VL 0 /* scalar build: natural element order, one row at a time */
#endif

#if QG_VL
#define QG_G4 (2 * QG_VL) /* elements per int4 vector group (QG_VL bytes) */
#define QG_G8 QG_VL       /* elements per int8 vector group */
/* The scalar tails fused explicitly: left to the compiler (-ffp-contract=fast), the 4-row and 1-row bodies
 * could round differently, and a row's result would depend on the chunk it was computed in. */
#define QG_MADD(a, b, c) __builtin_fmaf(a, b, c)
#else
#define QG_MADD(a, b, c) ((a) * (b) + (c)) /* one row at a time: a single body (no FMA on the baseline target) */
#endif

static inline float qg_half(uint16_t h) { /* fp16 bits -> float, exact */
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        float f = ldexpf((float)m, -24); /* zero or subnormal: m * 2^-24, exact */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* Scale i of the matrix (row * blocks per row + block); f32s is a compile-time constant in the kernels'
 * specialized bodies (see QG_SPECIALIZE). */
static inline float qg_scale(const void *scales, const int f32s, int64_t i) {
    return f32s ? ((const float *)scales)[i] : qg_half(((const uint16_t *)scales)[i]);
}

/* n fp16 scales -> floats, converted 16 / 8 at a time (one vcvtph2ps) where the build can: a scalar conversion
 * and broadcast per block and row cost 15 % of int4 rows-dot (measured, Zen 4). */
static inline __attribute__((always_inline)) void qg_halves_times(const uint16_t *src, int64_t n, float coef,
                                                                  float *dst) { /* dst = coef * the floats */
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + j))),
                                                _mm512_set1_ps(coef)));
#endif
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))),
                                                _mm256_set1_ps(coef)));
#endif
    for (; j < n; j++) dst[j] = coef * qg_half(src[j]);
}
static inline void qg_halves(const uint16_t *src, int64_t n, float *dst) { qg_halves_times(src, n, 1.0f, dst); }

/* What the rows of one column tile [c0, c1) share: row bytes, blocks per row, the tile's first block and count. */
typedef struct {
    int64_t rb, nb, b0, nbt;
} QgTile;

static inline QgTile qg_tile(const QMat *w, const int bits, int64_t c0, int64_t c1) {
    const QgTile t = {w->cols * bits / 8, w->cols / w->block, c0 / w->block, (c1 - 1) / w->block - c0 / w->block + 1};
    return t;
}

/* One row's codes in the tile (`off`, `len` bytes) and ALL of its scales' lines. Fetching only the first line of
 * the scales (enough for short rows, whose scales share lines with the next rows') left long rows' later scale
 * lines to demand misses: one thread streamed [576 x 1536] int4 at 23 GB/s, [288 x 3072] at 13 (tools/
 * bench_quant_gemv.py, Zen 4; docs/performance.md). */
static inline void qg_prefetch_row(const QMat *w, const QgTile *t, int64_t row, int64_t off, int64_t len,
                                   int64_t sbytes) {
    qg_prefetch(w->codes + row * t->rb + off, len);
    qg_prefetch((const uint8_t *)w->scales + (row * t->nb + t->b0) * sbytes, t->nbt * sbytes);
}

/* The fp32 scales of one row's blocks in the tile: in place (fp32 scales) or converted into buf (fp16). */
static inline const float *qg_row_scales(const QMat *w, const int f32s, int64_t row, const QgTile *t, float *buf) {
    if (f32s) return (const float *)w->scales + row * t->nb + t->b0;
    qg_halves((const uint16_t *)w->scales + row * t->nb + t->b0, t->nbt, buf);
    return buf;
}
#define QG_TILE_BLOCKS (QG_TILE / 32)

/* The kernels' bodies are always_inline functions of (bits, fp32 scales) that each entry point calls with
 * constants, so every format gets its own compiled loop without a branch per block. */
#define QG_SPECIALIZE(w, CALL)                                                                               \
    do {                                                                                                     \
        if ((w)->bits == 4 && !(w)->scale_fp32) CALL(4, 0);                                                  \
        else if ((w)->bits == 4) CALL(4, 1);                                                                 \
        else if (!(w)->scale_fp32) CALL(8, 0);                                                               \
        else CALL(8, 1);                                                                                     \
    } while (0)

static inline float qg_code(const uint8_t *row, int bits, int64_t c) { /* element c of a row, as a float */
    if (bits == 8) return (float)(int8_t)row[c];
    const int nib = (row[c >> 1] >> ((c & 1) * 4)) & 0xf;
    return (float)((nib ^ 8) - 8);
}

/* The block segments of the column tile [c0, c1): block b covers [max(c0, b*block), min(c1, (b+1)*block)). */
#define QG_SEGMENTS(w, c0, c1, b, s, e)                                                                      \
    for (int64_t b = (c0) / (w)->block, s = (c0), e = 0;                                                     \
         s < (c1) && ((e = ((b + 1) * (w)->block < (c1) ? (b + 1) * (w)->block : (c1))), 1); b++, s = e)

/* bacc[k] += the int4 codes of rows p[k] times xp over the whole vector groups of [c, e) (xp from column c0);
 * returns the first column not taken. */
#if QG_VL
static inline __attribute__((always_inline)) int64_t qg_i4_groups(const uint8_t *const *p, const int nr,
                                                                  const float *restrict xp, int64_t c0, int64_t c,
                                                                  int64_t e, qg_vf *bacc) {
    for (; c + QG_G4 <= e; c += QG_G4) {
        const qg_vf xe = VLOAD(xp + (c - c0)), xo = VLOAD(xp + (c - c0) + QG_VL);
        for (int k = 0; k < nr; k++) {
            qg_vf ev, od;
            qg_i4(p[k] + (c >> 1), &ev, &od);
            bacc[k] = VFMA(ev, xe, bacc[k]);
            bacc[k] = VFMA(od, xo, bacc[k]);
        }
    }
    return c;
}
#endif

/* out[k] = sum_{c in [c0, c1)} x[c] * w[rows[k], c] for nr (1..4) rows; xp = x[c0..c1), de-interleaved per int4
 * group in the SIMD builds. */
static inline __attribute__((always_inline)) void qg_dot_tile(const QMat *w, const int bits, const int f32s,
                                                              const QgTile *t, const int64_t *rows, const int nr,
                                                              const float *restrict xp, int64_t c0, int64_t c1,
                                                              float *out) {
    const uint8_t *p[4];
    const float *sp[4];
    float scf[4][QG_TILE_BLOCKS];
    for (int k = 0; k < nr; k++) {
        p[k] = w->codes + rows[k] * t->rb;
        sp[k] = qg_row_scales(w, f32s, rows[k], t, scf[k]);
    }
    float tail[4] = {0, 0, 0, 0};
#if QG_VL
    qg_vf acc[4];
    for (int k = 0; k < nr; k++) acc[k] = VZERO();
    if (bits == 4 && w->block % QG_G4 == 0 && (c1 - c0) % QG_G4 == 0) {
        /* whole vector groups in every block: the loop below without its scalar part (a serial chain of scalar
         * FMAs per block, ~25 % of the time at block 32). The same vector products in the same order. */
        for (int64_t c = c0, b = 0; c < c1; b++) {
            const int64_t e = (t->b0 + b + 1) * w->block < c1 ? (t->b0 + b + 1) * w->block : c1;
            qg_vf bacc[4];
            for (int k = 0; k < nr; k++) bacc[k] = VZERO();
            c = qg_i4_groups(p, nr, xp, c0, c, e, bacc);
            for (int k = 0; k < nr; k++) acc[k] = VFMA(bacc[k], VSET1(sp[k][b]), acc[k]);
        }
        for (int k = 0; k < nr; k++) out[k] = VSUM(acc[k]) + tail[k];
        return;
    }
#endif
    QG_SEGMENTS(w, c0, c1, b, s, e) {
        int64_t c = s;
        float ts[4] = {0, 0, 0, 0};
#if QG_VL
        qg_vf bacc[4];
        for (int k = 0; k < nr; k++) bacc[k] = VZERO();
        if (bits == 4) {
            c = qg_i4_groups(p, nr, xp, c0, c, e, bacc);
        } else {
            for (; c + QG_G8 <= e; c += QG_G8) {
                const qg_vf xv = VLOAD(xp + (c - c0));
                for (int k = 0; k < nr; k++) bacc[k] = VFMA(qg_i8(p[k] + c), xv, bacc[k]);
            }
        }
#endif
        for (; c < e; c++) /* the scalar build, and a ROW block's last elements past the last whole group */
            for (int k = 0; k < nr; k++) ts[k] = QG_MADD(qg_code(p[k], bits, c), xp[c - c0], ts[k]);
        for (int k = 0; k < nr; k++) {
            const float sc = sp[k][b - t->b0];
#if QG_VL
            acc[k] = VFMA(bacc[k], VSET1(sc), acc[k]);
#endif
            tail[k] = QG_MADD(ts[k], sc, tail[k]);
        }
    }
    for (int k = 0; k < nr; k++) {
#if QG_VL
        out[k] = VSUM(acc[k]) + tail[k];
#else
        out[k] = tail[k];
#endif
    }
}

/* x[c0..c1) into xp, each whole int4 vector group de-interleaved (even elements, then odd). */
static void qg_prepare_x(const QMat *w, const float *x, int64_t c0, int64_t c1, float *xp) {
    int64_t c = c0;
#if QG_VL
    if (w->bits == 4)
        for (; c + QG_G4 <= c1; c += QG_G4)
            for (int j = 0; j < QG_VL; j++) {
                xp[c - c0 + j] = x[c + 2 * j];
                xp[c - c0 + QG_VL + j] = x[c + 2 * j + 1];
            }
#else
    (void)w;
#endif
    for (; c < c1; c++) xp[c - c0] = x[c];
}

#include "int8_activations.c" /* QgX, qx_dot_tile: int4 rows-dot with int8 activations */

/* Rows [*i, r1) of qg_dot_range in tiles of nr rows (4 or 2), while a whole tile is left. */
static inline __attribute__((always_inline)) void qg_dot_tiles(const QMat *w, const int bits, const int f32s,
                                                               const QgTile *t, const void *xp, int64_t c0,
                                                               int64_t c1, const int64_t *idx, int64_t *i,
                                                               int64_t r1, int64_t ahead, int64_t pf_end, float *y,
                                                               int add, const int i8, const int nr) {
    const int64_t off = c0 * bits / 8, len = (c1 - c0) * bits / 8, sbytes = f32s ? 4 : 2;
    float out[4];
    for (; *i + nr <= r1; *i += nr) {
        int64_t rows[4];
        for (int k = 0; k < nr; k++) rows[k] = idx ? idx[*i + k] : *i + k;
        for (int64_t j = *i + ahead; j < *i + ahead + nr && j < pf_end; j++)
            qg_prefetch_row(w, t, idx ? idx[j] : j, off, len, sbytes);
        if (i8) qx_dot_tile(w, f32s, t, rows, nr, (const QgX *)xp, c0, c1, out);
        else qg_dot_tile(w, bits, f32s, t, rows, nr, (const float *)xp, c0, c1, out);
        for (int k = 0; k < nr; k++) y[*i + k] = add ? y[*i + k] + out[k] : out[k];
    }
}

/* Rows of at least this many bytes (in the tile) are read two at a time, shorter ones four at a time: four long
 * rows read in lockstep streamed slower than two. Measured on a Zen 4 VM, int4, all scale lines prefetched in
 * both, pairs over quads on 1 / 2 threads: rows of 768-1536 bytes 1.31-1.44x / 1.03-1.25x, 384-512 bytes
 * 1.01-1.02x / 0.96-1.04x, 288 bytes 0.92x / 0.99x (docs/performance.md). Probably four long sequential
 * streams at once are more than the hardware prefetchers track beside the software prefetches. */
#define QG_PAIR_BYTES 384

/* y[i] (= or +=, `add`) sum_{c in [c0, c1)} x[c] * w[row_i, c] for i in [r0, r1); xp = x[c0..c1) prepared, or
 * (i8) the QgX of all of x (int4 weights, int8 activations: int8_activations.c). */
static inline __attribute__((always_inline)) void qg_dot_range(const QMat *w, const int bits, const int f32s,
                                                               const void *xp, int64_t c0, int64_t c1,
                                                               const int64_t *idx, int64_t r0, int64_t r1,
                                                               float *y, int add, const int i8) {
    int64_t i = r0;
    float out[4];
    const QgTile t = qg_tile(w, bits, c0, c1);
    const int64_t off = c0 * bits / 8, len = (c1 - c0) * bits / 8, sbytes = f32s ? 4 : 2;
    int64_t ahead = QG_PF_BYTES / (len > 0 ? len : 1);
    ahead = ahead < 4 ? 4 : ahead > 64 ? 64 : ahead;
    /* the stream's start at once (a chunk's first rows would otherwise miss one after another), and on past r1
     * into the rows this thread's next chunk usually has */
    const int64_t pf_end = idx ? r1 : w->rows;
    for (int64_t j = r0; j < r0 + ahead && j < pf_end; j++)
        qg_prefetch_row(w, &t, idx ? idx[j] : j, off, len, sbytes);
#if QG_VL
    if (len >= QG_PAIR_BYTES) qg_dot_tiles(w, bits, f32s, &t, xp, c0, c1, idx, &i, r1, ahead, pf_end, y, add, i8, 2);
    else qg_dot_tiles(w, bits, f32s, &t, xp, c0, c1, idx, &i, r1, ahead, pf_end, y, add, i8, 4);
#endif
    for (; i < r1; i++) {
        const int64_t row = idx ? idx[i] : i;
        if (i + ahead < pf_end) qg_prefetch_row(w, &t, idx ? idx[i + ahead] : i + ahead, off, len, sbytes);
        if (i8) qx_dot_tile(w, f32s, &t, &row, 1, (const QgX *)xp, c0, c1, out);
        else qg_dot_tile(w, bits, f32s, &t, &row, 1, (const float *)xp, c0, c1, out);
        y[i] = add ? y[i] + out[0] : out[0];
    }
}

static inline __attribute__((always_inline)) void qg_rows_dot(const QMat *w, const int bits, const int f32s,
                                                              const float *x, const int64_t *idx, int64_t r0,
                                                              int64_t r1, float *y) {
    float xp[QG_TILE] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE) {
        const int64_t c1 = c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols;
        qg_prepare_x(w, x, c0, c1, xp);
        qg_dot_range(w, bits, f32s, xp, c0, c1, idx, r0, r1, y, c0 != 0, 0);
    }
}

/* caprese_q_rows_dot on a matrix in the r16 layout (int8_activations.c), which the decode step reads with int8
 * activations only: each group it needs is put back in rows first, so fp32 activations (a test switching int8
 * off) give the rows layout's results. 0, or -2 (out of memory). */
void caprese_q_rows_dot(const QMat *w, const float *x, const int64_t *idx, int64_t r0, int64_t r1, float *y);
static int qg_r16_rows_dot(const QMat *w, const float *x, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    const int64_t rb = w->cols / 2, sb = w->cols / w->block * (w->scale_fp32 ? 4 : 2);
    uint8_t *tmp = malloc((size_t)(16 * (rb + sb)));
    if (!tmp) return -2;
    QMat g16 = *w;
    g16.codes = tmp;
    g16.scales = tmp + 16 * rb;
    g16.rows = 16;
    g16.layout = QG_ROWS;
    for (int64_t i = r0, g = -1; i < r1; i++) { /* one row at a time: a slow path, not the decode step's */
        const int64_t row = idx ? idx[i] : i;
        if (row / 16 != g) qx_r16_unpack_group(w, g = row / 16, tmp, tmp + 16 * rb);
        const int64_t one = row % 16;
        caprese_q_rows_dot(&g16, x, &one, 0, 1, y + i);
    }
    free(tmp);
    return 0;
}

/* rows-dot (see the top of the file): y[i] = sum_c x[c] * w[row_i, c] for i in [r0, r1). */
void caprese_q_rows_dot(const QMat *w, const float *x, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    if (w->layout == QG_R16) {
        if (qg_r16_rows_dot(w, x, idx, r0, r1, y))
            for (int64_t i = r0; i < r1; i++) y[i] = NAN; /* out of memory: no silent result */
        return;
    }
#define QG_DOT(bits, f32s) qg_rows_dot(w, bits, f32s, x, idx, r0, r1, y)
    QG_SPECIALIZE(w, QG_DOT);
#undef QG_DOT
}

/* For the thread pool, where many chunks share one x: xp[0..cols) = x in the kernel's order (once per x), then
 * rows-dot of any chunk from it, with no per-call preparation. Same results, bit for bit. */
void caprese_q_prepare_x(const QMat *w, const float *x, float *xp) { qg_prepare_x(w, x, 0, w->cols, xp); }

void caprese_q_rows_dot_prepared(const QMat *w, const float *xp, const int64_t *idx, int64_t r0, int64_t r1,
                                 float *y) {
#define QG_DOT(bits, f32s)                                                                                   \
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE)                                                        \
        qg_dot_range(w, bits, f32s, xp + c0, c0, c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols, idx, r0, r1, \
                     y, c0 != 0, 0)
    QG_SPECIALIZE(w, QG_DOT);
#undef QG_DOT
}

/* dst[b] = coef * scale b of the row's tile blocks (the fp32 product the segment loop below forms per block), in
 * one pass: converting into a buffer and scaling it after cost the axpy 10 % (a store-forwarding stall). */
static inline void qg_row_coefs(const QMat *w, const int f32s, int64_t row, const QgTile *t, float coef,
                                float *dst) {
    const int64_t first = row * t->nb + t->b0;
    if (!f32s) {
        qg_halves_times((const uint16_t *)w->scales + first, t->nbt, coef, dst);
        return;
    }
    const float *src = (const float *)w->scales + first;
#pragma omp simd
    for (int64_t b = 0; b < t->nbt; b++) dst[b] = coef * src[b];
}

/* yp[c - c0] += sum_k coef[k] * scale(rows[k], block of c) * w[rows[k], c] over [c0, c1), yp de-interleaved. */
static inline __attribute__((always_inline)) void qg_axpy_tile(const QMat *w, const int bits, const int f32s,
                                                               const QgTile *t, const int64_t *rows,
                                                               const float *coef, const int nr, float *restrict yp,
                                                               int64_t c0, int64_t c1) {
    const uint8_t *p[4];
    for (int k = 0; k < nr; k++) p[k] = w->codes + rows[k] * t->rb;
#if QG_VL
    if (bits == 4 && w->block % QG_G4 == 0 && (c1 - c0) % QG_G4 == 0) {
        /* Every vector group lies in one block: one flat loop over the groups, each row's per-block coefficient
         * read from a table. The loop per block segment below spent ~40 % of its time on its own bookkeeping at
         * block 32 (one group per segment). Same products in the same order: same bits. */
        float ck[4][QG_TILE_BLOCKS];
        for (int k = 0; k < nr; k++) qg_row_coefs(w, f32s, rows[k], t, coef[k], ck[k]);
        int64_t b = 0, next = (t->b0 + 1) * w->block; /* the block of c (from the tile's first) and its end */
        for (int64_t c = c0; c < c1; c += QG_G4) {
            if (c >= next) {
                b++;
                next += w->block;
            }
            float *q = yp + (c - c0);
            qg_vf ye = VLOAD(q), yo = VLOAD(q + QG_VL);
            for (int k = 0; k < nr; k++) {
                qg_vf ev, od;
                const qg_vf vc = VSET1(ck[k][b]);
                qg_i4(p[k] + (c >> 1), &ev, &od);
                ye = VFMA(ev, vc, ye);
                yo = VFMA(od, vc, yo);
            }
            VSTORE(q, ye);
            VSTORE(q + QG_VL, yo);
        }
        return;
    }
#endif
    const float *sp[4];
    float scf[4][QG_TILE_BLOCKS];
    for (int k = 0; k < nr; k++) sp[k] = qg_row_scales(w, f32s, rows[k], t, scf[k]);
    QG_SEGMENTS(w, c0, c1, b, s, e) {
        float ck[4];
        for (int k = 0; k < nr; k++) ck[k] = coef[k] * sp[k][b - t->b0];
        int64_t c = s;
#if QG_VL
        qg_vf vc[4];
        for (int k = 0; k < nr; k++) vc[k] = VSET1(ck[k]);
        if (bits == 4) {
            for (; c + QG_G4 <= e; c += QG_G4) {
                float *q = yp + (c - c0);
                qg_vf ye = VLOAD(q), yo = VLOAD(q + QG_VL);
                for (int k = 0; k < nr; k++) {
                    qg_vf ev, od;
                    qg_i4(p[k] + (c >> 1), &ev, &od);
                    ye = VFMA(ev, vc[k], ye);
                    yo = VFMA(od, vc[k], yo);
                }
                VSTORE(q, ye);
                VSTORE(q + QG_VL, yo);
            }
        } else {
            for (; c + QG_G8 <= e; c += QG_G8) {
                float *q = yp + (c - c0);
                qg_vf yv = VLOAD(q);
                for (int k = 0; k < nr; k++) yv = VFMA(qg_i8(p[k] + c), vc[k], yv);
                VSTORE(q, yv);
            }
        }
#endif
        for (; c < e; c++)
            for (int k = 0; k < nr; k++) yp[c - c0] = QG_MADD(ck[k], qg_code(p[k], bits, c), yp[c - c0]);
    }
}

/* yp[c - c0] += sum_{i in [r0, r1), h[i] != 0} h[i] * w[row_i, c] over [c0, c1), yp in the kernel's order.
 * h_end >= r1: where h is defined up to (rows past r1 with h != 0 are prefetched for the caller's next chunk). */
static inline __attribute__((always_inline)) void qg_axpy_range(const QMat *w, const int bits, const int f32s,
                                                                const float *h, const int64_t *idx, int64_t r0,
                                                                int64_t r1, int64_t h_end, float *yp, int64_t c0,
                                                                int64_t c1) {
    int64_t rows[4];
    float coef[4];
    int n = 0;
    const QgTile t = qg_tile(w, bits, c0, c1);
    const int64_t off = c0 * bits / 8, len = (c1 - c0) * bits / 8;
    int64_t ahead = QG_PF_BYTES / (len > 0 ? len : 1), la = r0, queued = 0; /* prefetched rows not yet read */
    ahead = ahead < 4 ? 4 : ahead > 64 ? 64 : ahead;
    const int64_t pf_end = idx || h_end < r1 ? r1 : h_end, sbytes = f32s ? 4 : 2;
    for (int64_t i = r0; i < r1; i++) {
        if (h[i] == 0.0f) continue; /* the row is not read (nor prefetched) */
        for (; la < pf_end && queued < ahead; la++)
            if (h[la] != 0.0f && la > i) {
                qg_prefetch_row(w, &t, idx ? idx[la] : la, off, len, sbytes);
                queued++;
            }
        if (queued) queued--;
        rows[n] = idx ? idx[i] : i;
        coef[n++] = h[i];
#if QG_VL
        if (n == 4) {
            qg_axpy_tile(w, bits, f32s, &t, rows, coef, 4, yp, c0, c1);
            n = 0;
        }
#else
        qg_axpy_tile(w, bits, f32s, &t, rows, coef, 1, yp, c0, c1);
        n = 0;
#endif
    }
    for (int k = 0; k < n; k++) qg_axpy_tile(w, bits, f32s, &t, rows + k, coef + k, 1, yp, c0, c1);
}

/* y[c0..c1) += yp (in the kernel's order: int4 groups de-interleaved in the SIMD builds). */
static void qg_finish_y(const QMat *w, const float *yp, int64_t c0, int64_t c1, float *y) {
    int64_t c = c0;
#if QG_VL
    if (w->bits == 4)
        for (; c + QG_G4 <= c1; c += QG_G4)
            for (int j = 0; j < QG_VL; j++) {
                y[c + 2 * j] += yp[c - c0 + j];
                y[c + 2 * j + 1] += yp[c - c0 + QG_VL + j];
            }
#else
    (void)w;
#endif
    for (; c < c1; c++) y[c] += yp[c - c0];
}

static inline __attribute__((always_inline)) void qg_rows_axpy(const QMat *w, const int bits, const int f32s,
                                                               const float *h, const int64_t *idx, int64_t r0,
                                                               int64_t r1, int64_t h_end, float *y) {
    float yp[QG_TILE] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE) {
        const int64_t c1 = c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols;
        memset(yp, 0, (size_t)(c1 - c0) * sizeof(float));
        qg_axpy_range(w, bits, f32s, h, idx, r0, r1, h_end, yp, c0, c1);
        qg_finish_y(w, yp, c0, c1, y);
    }
}

/* rows-axpy (see the top of the file): y[c] += sum_{i in [r0, r1), h[i] != 0} h[i] * w[row_i, c]. */
void caprese_q_rows_axpy(const QMat *w, const float *h, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
#define QG_AXPY(bits, f32s) qg_rows_axpy(w, bits, f32s, h, idx, r0, r1, r1, y)
    QG_SPECIALIZE(w, QG_AXPY);
#undef QG_AXPY
}

/* The same, h defined for rows [r0, h_end) (h_end >= r1): the rows past r1 that a thread's next chunk reads are
 * prefetched as this one ends (the decode step, whose chunks of a phase are consecutive row ranges). */
void caprese_q_rows_axpy_ahead(const QMat *w, const float *h, int64_t r0, int64_t r1, int64_t h_end, float *y) {
#define QG_AXPY(bits, f32s) qg_rows_axpy(w, bits, f32s, h, NULL, r0, r1, h_end, y)
    QG_SPECIALIZE(w, QG_AXPY);
#undef QG_AXPY
}

/* For the thread pool: each chunk accumulates into its own yp[0..cols) (zeroed by the caller) in the kernel's
 * order, and the caller adds the parts together (in chunk order) and then into y once with caprese_q_finish_y.
 * Same arithmetic per part as caprese_q_rows_axpy. */
void caprese_q_rows_axpy_prepared(const QMat *w, const float *h, const int64_t *idx, int64_t r0, int64_t r1,
                                  float *yp) {
#define QG_AXPY(bits, f32s)                                                                                  \
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE)                                                        \
        qg_axpy_range(w, bits, f32s, h, idx, r0, r1, r1, yp + c0, c0, c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols)
    QG_SPECIALIZE(w, QG_AXPY);
#undef QG_AXPY
}

void caprese_q_finish_y(const QMat *w, const float *yp, float *y) { qg_finish_y(w, yp, 0, w->cols, y); }

/* The cols floats of the up to 4 rows from row i (idx[k] or k, k < r1) requested: one core streams fp32 rows
 * faster when each 4 rows' successors are on their way (tools/bench_quant_gemv.py's f32 row, one thread: 12.5-13.8
 * GB/s with the hardware prefetchers alone, 16.8-19.0 with this; docs/performance.md). */
static inline void f32_prefetch_rows(const float *w, int64_t ld, int64_t cols, const int64_t *idx, int64_t i,
                                     int64_t r1) {
    for (int64_t k = i; k < i + 4 && k < r1; k++)
        qg_prefetch((const uint8_t *)(w + (idx ? idx[k] : k) * ld), cols * 4);
}

/* y[0 .. nr) = w[k] . x (nr = 4: rows w0 .. w3, their sums in one vectorized pass; nr = 1: w0 only): the row loops
 * of caprese_f32_rows_dot, also run a group at a time by the decode step's bypass (bypass_rows), so the same bits. */
static inline __attribute__((always_inline)) void f32_dot_group(const float *w0, const float *w1, const float *w2,
                                                                const float *w3, const float *x, int64_t cols,
                                                                const int nr, float *y) {
    if (nr == 4) {
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t j = 0; j < cols; j++) {
            d0 += w0[j] * x[j];
            d1 += w1[j] * x[j];
            d2 += w2[j] * x[j];
            d3 += w3[j] * x[j];
        }
        y[0] = d0; y[1] = d1; y[2] = d2; y[3] = d3;
    } else {
        float d0 = 0.0f;
#pragma omp simd reduction(+ : d0)
        for (int64_t j = 0; j < cols; j++) d0 += w0[j] * x[j];
        y[0] = d0;
    }
}

/* The fp32 baseline of the benchmark: y[i] = w[row_i] . x for i in [r0, r1), w [rows, ld] row-major. */
void caprese_f32_rows_dot(const float *w, int64_t ld, int64_t cols, const float *x, const int64_t *idx, int64_t r0,
                          int64_t r1, float *y) {
    int64_t i = r0;
    f32_prefetch_rows(w, ld, cols, idx, r0, r1); /* the first 4 rows at once, not as the prefetchers ramp up */
    for (; i + 4 <= r1; i += 4) {
        const float *w0 = w + (idx ? idx[i] : i) * ld, *w1 = w + (idx ? idx[i + 1] : i + 1) * ld;
        const float *w2 = w + (idx ? idx[i + 2] : i + 2) * ld, *w3 = w + (idx ? idx[i + 3] : i + 3) * ld;
        f32_prefetch_rows(w, ld, cols, idx, i + 4, r1);
        f32_dot_group(w0, w1, w2, w3, x, cols, 4, y + i);
    }
    for (; i < r1; i++) {
        const float *w0 = w + (idx ? idx[i] : i) * ld;
        f32_dot_group(w0, w0, w0, w0, x, cols, 1, y + i);
    }
}

/* ----------------------------------------------------------------------- int4 weights, int8 activations */
/* rows-dot over x quantized once (caprese_qx_quantize; caprese_qx_fits(w) must hold): y[i] for i in [r0, r1). */
void caprese_q_rows_dot_qx(const QMat *w, const QgX *xq, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    if (w->layout == QG_R16) {
        qx_r16_rows(w, xq, idx, r0, r1, y);
        return;
    }
#define QX_DOT(f32s)                                                                                         \
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE)                                                        \
        qg_dot_range(w, 4, f32s, xq, c0, c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols, idx, r0, r1, y,      \
                     c0 != 0, 1)
    if (w->scale_fp32) QX_DOT(1);
    else QX_DOT(0);
#undef QX_DOT
}

/* The same on a float x, quantized by this call (tests, the benchmark). Returns -1 where !caprese_qx_fits(w),
 * -2 if out of memory. */
int caprese_q_rows_dot_int8x(const QMat *w, const float *x, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    if (!caprese_qx_fits(w)) return -1;
    void *buf = malloc((size_t)caprese_qx_bytes(w->cols));
    if (!buf) return -2;
    QgX xq;
    caprese_qx_quantize(w, x, buf, &xq);
    caprese_q_rows_dot_qx(w, &xq, idx, r0, r1, y);
    free(buf);
    return 0;
}

/* caprese_q_rows_dot_qx_cols on a float x, its columns [c0, c1) quantized by this call (tests). -1: w is not in the
 * r16 layout, or the columns or rows are not whole blocks / groups; -2: out of memory. */
int caprese_q_rows_dot_int8x_cols(const QMat *w, const float *x, int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                  float *y) {
    const int64_t xb = qx_block(w);
    if (!caprese_qx_r16_fits(w) || w->layout != QG_R16 || c0 < 0 || c1 > w->cols || c0 >= c1 || c0 % xb ||
        c1 % xb || r0 < 0 || r1 > w->rows || r0 % 16 || r1 % 16)
        return -1;
    void *buf = malloc((size_t)caprese_qx_bytes(c1 - c0));
    if (!buf) return -2;
    QgX xq;
    qx_quantize_n(xb, x + c0, c1 - c0, buf, &xq);
    caprese_q_rows_dot_qx_cols(w, &xq, c0, c1, r0, r1, y);
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------------------------------- benchmark loop */
/* op 0: rows-dot, 1: rows-axpy (h = x, length rows; y gets nthreads partials of cols each), 2: fp32 rows-dot
 * (mats[m].codes is the fp32 [rows, cols] matrix), 3: int4 rows-dot with int8 activations (x quantized per call),
 * 4: int4 rows-axpy with int8 activations (as op 1; caprese_qa_fits must hold). Runs `reps` calls
 * cycling over the n_mats copies (so the weights stream from memory as in a decode step, not from cache) on
 * nthreads threads, each its fixed share of the rows (16-row aligned), with a spinning barrier between calls.
 * Returns the seconds of the whole loop. */
typedef struct {
    int op;
    const QMat *mats;
    int64_t n_mats, reps, nthreads, t;
    const float *x;
    float *y;
    atomic_long *arrived;
} QgBench;

static void *qg_bench_thread(void *arg) {
    const QgBench *a = arg;
    for (int64_t r = 0; r < a->reps; r++) {
        const QMat *m = &a->mats[r % a->n_mats];
        const int64_t per = ((m->rows + a->nthreads - 1) / a->nthreads + 15) / 16 * 16; /* r16 groups */
        const int64_t r0 = a->t * per < m->rows ? a->t * per : m->rows;
        const int64_t r1 = r0 + per < m->rows ? r0 + per : m->rows;
        if (a->op == 0) caprese_q_rows_dot(m, a->x, NULL, r0, r1, a->y);
        else if (a->op == 1) caprese_q_rows_axpy(m, a->x, NULL, r0, r1, a->y + a->t * m->cols);
        else if (a->op == 3) caprese_q_rows_dot_int8x(m, a->x, NULL, r0, r1, a->y);
        else if (a->op == 4) caprese_q_rows_axpy_qa(m, a->x, NULL, r0, r1, r1, a->y + a->t * m->cols);
        else if (a->op == 5) caprese_q_rows_axpy_qw(m, a->x, NULL, r0, r1, r1, a->y + a->t * m->cols);
        else caprese_f32_rows_dot((const float *)(const void *)m->codes, m->cols, m->cols, a->x, NULL, r0, r1, a->y);
        if (a->nthreads > 1) { /* barrier: everyone finished call r */
            const long want = (r + 1) * a->nthreads;
            atomic_fetch_add(a->arrived, 1);
            for (int spin = 0; atomic_load(a->arrived) < want; spin++)
                if (spin > 2000) sched_yield();
        }
    }
    return NULL;
}

double caprese_q_bench(int op, const QMat *mats, int64_t n_mats, const float *x, float *y, int64_t reps,
                       int64_t nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 16) nthreads = 16;
    atomic_long arrived = 0;
    QgBench args[16];
    pthread_t tid[16];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t t = 0; t < nthreads; t++) {
        args[t] = (QgBench){op, mats, n_mats, reps, nthreads, t, x, y, &arrived};
        if (t) pthread_create(&tid[t], NULL, qg_bench_thread, &args[t]);
    }
    qg_bench_thread(&args[0]);
    for (int64_t t = 1; t < nthreads; t++) pthread_join(tid[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}

#ifndef CAPRESE_QGEMV_EMBEDDED
/* ---------------------------------------------------------------- layout of QMat for the ctypes mirror, ISA */
typedef struct {
    const char *type, *field;
    int64_t offset, size;
} LayoutField;

#define QG_FIELD(T, f) {#T, #f, (int64_t)offsetof(T, f), (int64_t)sizeof(((T *)0)->f)}
static const LayoutField QG_LAYOUT[] = {
    {"QMat", "", 0, (int64_t)sizeof(QMat)}, QG_FIELD(QMat, codes), QG_FIELD(QMat, scales), QG_FIELD(QMat, rows),
    QG_FIELD(QMat, cols), QG_FIELD(QMat, block), QG_FIELD(QMat, bits), QG_FIELD(QMat, scale_fp32),
    QG_FIELD(QMat, layout), {NULL, NULL, 0, 0}};

const LayoutField *caprese_layout_info(void) { return QG_LAYOUT; }

const char *caprese_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}
#endif
