/* One fp32 decode step (batch 1) of a caprese engine on CPU threads that may be descheduled at any moment.
 *
 * Why it exists: at batch 1 a decode step is a chain of matrix-vector products that must stream every weight
 * once. ONNX Runtime's MatMul streams at the machine's bandwidth, but a step is ~10 graph nodes per layer, each
 * a thread-pool dispatch, and GRIFFIN's per-prompt matrices arrive as graph inputs that it cannot pre-pack.
 *
 * Why it is built this way: on an edge device other programs share the cores. A step that is one OpenMP region
 * with a barrier after every product waits, at every barrier, for whichever thread the OS descheduled (measured:
 * 3-8x slower than ONNX Runtime next to two busy processes on 2 cores). Here a step is a chain of *phases*, each
 * cut into chunks whose size depends only on the model's shapes:
 *   A  QKV product, chunks of rows (partial sums)      B  per query head: attention + its o-projection rows
 *   C  gate/up(/L) product, chunks of rows             D  per block of neurons: activation + down rows (CATS:
 *   H  LM head, chunks of rows (full, or the int8        threshold, then up/down rows of the passing neurons)
 *      screen and then the fp32 recomputation)
 * (Quantized layers: whole-output chunks of QKV, attention per KV head and part of the slots, o, gate/up(/L), then
 * down; GRIFFIN's gate/up, activation and down in one phase of neuron chunks, stage_q_ffn, and so a dense FFN with
 * int8 activations in the r16 layout, stage_q_ffn_dense; runtime README "Quantized engines".)
 * The calling thread (the leader) publishes a phase; it and the pool's helper threads each take chunks from the
 * front of their own range of it (so that, at equal speed, each streams its own contiguous stretch of every
 * matrix, as a static split does) and, once that is empty, from the back of another's; a thread computes a chunk
 * into its own result area and commits it with one compare-and-swap. The leader then sums the committed parts
 * in chunk order and does the small serial work (K/V write, residual, norms) before the next phase. Nobody waits
 * for a thread that is not running: a chunk that has been held for twice the usual chunk time is computed again
 * by whoever is waiting (first commit wins, the late copy is dropped), helpers spin briefly and then sleep on a
 * futex, a helper that falls behind skips to the current phase, and the leader never waits for helpers at the
 * end of a step. Per layer that is 4 phases where the OpenMP version had 5 barriers that every thread had to
 * reach. Measured (2 vCPUs, AMD EPYC Zen 4, docs/performance.md, 2026-12-05): as fast as that version on idle
 * cores (within 1-5 %), 0.67-0.80x ONNX Runtime's step next to 1-4 busy processes where it was 0.9-1.2x with
 * tails of 100-650 ms.
 * Every chunk's arithmetic is fixed by its index, and parts are summed in chunk order, so logits are the same
 * bits whatever the thread count and whoever ran each chunk.
 *
 * Semantics are those of the engine's decode graph (caprese/export/onnx_graph.py): RMSNorm (Gemma 2's
 * pre-added 1 + w weights and its post-attention / pre- and post-FFN norms), fused QKV (+ bias), optional
 * per-head q/k RMSNorm, rotary (rotate-half, cos/sin tables [max_seq, head_dim / 2]), the in-place KV write,
 * GQA attention with sliding window and soft-cap, o projection, gated FFN (dense, GRIFFIN's folded
 * [W_g, W_1, L] / [W_2 ; R], CATS' threshold with an optional bypass), LM head with the final soft-cap.
 * Screened head (`next` given, for greedy and top-k steps): the LM head is first read as an int8 copy with a
 * per-row scale and error bound; only the rows whose upper bound reaches the k-th largest lower bound are
 * recomputed from the fp32 head, so the k largest fp32 logits are exact (caprese/runtime/native/screened_head.py).
 * Layout of every matrix: math layout [in, out], row-major; the LM head is [vocab, hidden] (the embedding).
 * ISA: the int8 head rows use AVX-512 or AVX2 intrinsics where the build targets them (caprese_isa()); all the
 * rest is portable C that the compiler vectorizes (`omp simd`, -fopenmp-simd) or not (the scalar build).
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define CAPRESE_QGEMV_EMBEDDED /* quant_gemv.c: QMat, caprese_q_rows_dot / caprese_q_rows_axpy */
#include "quant_gemv.c"

#define HEAD_TOPK_MAX 256 /* largest k of a screened top-k step */
#define MAX_THREADS 64

typedef struct {
    const float *w;   /* [rows, ld] */
    int64_t ld;       /* row stride in floats */
    int64_t cols;     /* columns used: 0 .. cols - 1 */
} Mat;

typedef struct {
    const float *input_norm, *post_attn_norm, *pre_ffn_norm, *post_ffn_norm; /* the last two: Gemma 2 only */
    const float *q_norm, *k_norm;                                         /* per-head norms, or NULL */
    Mat qkv; const float *qkv_bias;
    Mat o; const float *o_bias;
    Mat gu1, gu2;            /* outputs appended: [gate n_ff | up n_ff | bypass L rank]; gu2.w may be NULL */
    const float *gu_bias;    /* [2 n_ff + rank] or NULL */
    Mat down; const float *down_bias; /* down: [n_ff + rank, hidden] */
    int64_t n_ff, rank;
    const float *cats_tau;   /* CATS layers: threshold on |act(gate)|; NULL otherwise */
    float *k_cache, *v_cache; /* [kv_heads, capacity, head_dim] */
    int64_t window;          /* sliding window (keys slot - window + 1 .. slot), 0 = none */
    float scale, softcap;    /* attention scale; soft-cap 0 = none */
    Mat up_t;                /* CATS layers: the up projection transposed, [n_ff, hidden] (gu1 then holds only the
                              * gate columns, gu2 the bypass L): up and down rows are read for passing neurons only */
    const float *up_bias;    /* CATS layers with MLP biases: [n_ff] */
    /* Quantized weights (quant_gemv.c's QMat, [out, in] rows with blocks along the inputs unless said):
     * q_attn: qkv and o are q_qkv [nqkv, hidden] and q_o [hidden, heads * head_dim] (qkv / o unused).
     * q_ffn: the FFN's matrices are q_gate / q_up [n_ff, hidden] (GRIFFIN: the kept neurons' rows), the bypass L
     * a float [hidden, rank] in gu2 and R a float [rank, hidden] in down; q_down is [n_ff, hidden] (rows-axpy,
     * down_rows = 1: GRIFFIN / CATS) or [hidden, n_ff] (rows-dot, down_rows = 0: dense on target onnxruntime).
     * CATS (cats_tau set): q_up rows are read for the neurons that pass only. */
    int64_t q_attn, q_ffn, down_rows;
    QMat q_qkv, q_o, q_gate, q_up, q_down;
    int64_t bypass_f16;      /* q_ffn: the bypass L (gu2) and R (down) hold fp16 values (--fp16-bypass) */
    const uint8_t *down_quads; /* GRIFFIN on int8 activations, AVX-512: q_down's codes repacked per prompt
                                * (caprese_qa_pack_quads), read instead of q_down.codes; or NULL */
    const void *l_t;         /* q_ffn with a bypass: L transposed [rank, hidden] in its dtype (fp32, or fp16 under
                              * bypass_f16; a copy made at load), read instead of gu2: a chunk of L's outputs is
                              * then contiguous rows, not a few bytes of each row */
    int64_t l_ld;            /* elements from one row of l_t to the next: 2 hidden where row r of R (down, the same
                              * ld) follows row r of L^T, so that a chunk's bypass is one stream (bypass_rows) */
} Layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, vocab, capacity;
    int64_t max_ff;          /* max over layers of n_ff + rank */
    int64_t activation;      /* 0 silu, 1 gelu (tanh), 2 gelu (erf) */
    int64_t gemma;           /* Gemma 2 norm placement + embedding scale */
    float eps, final_softcap, embed_scale;
    const float *embed;      /* [vocab, hidden] */
    const float *lm_head;    /* [vocab, hidden] */
    const float *final_norm;
    const float *rope_cos, *rope_sin; /* [max_seq, head_dim / 2] */
    const Layer *layers;
    float *logits;           /* [vocab] */
    const int8_t *head_q;    /* [vocab, hidden] int8 copy of the LM head, or NULL (no screened steps) */
    const float *head_scale; /* [vocab]: row v of the head ~ head_scale[v] * head_q[v] */
    const float *head_bound; /* [vocab]: |h.w_v - head_scale[v] * h.head_q[v]| <= |h|_2 * head_bound[v] in fp32 */
    int64_t q_head;          /* the LM head is quantized: q_lm_head [vocab, hidden] (lm_head unused, never screened) */
    QMat q_lm_head;
    int64_t int8_act;        /* the engine's quantized products take int8 activations (int8_activations.c): int4
                              * rows-dot over x rounded once per product by the leader, GRIFFIN's down rows-axpy
                              * with h rounded to 16 bits per group of 32 rows; 2: that down in int8 too (opt-in);
                              * other formats fp32 */
    int64_t kv_f16;          /* the KV cache holds fp16 (k_cache / v_cache point at uint16 rows; --kv-dtype fp16):
                              * ONNX Runtime's fp16 GroupQueryAttention's numbers: q, k, v rounded to fp16, q and k
                              * rotated in fp32 (fp16-rounded cos / sin: the backend's tables) and rounded again,
                              * attention in fp32, its output rounded to fp16 */
    int64_t k_tiles;         /* 1 while K is held in tiles of 16 slots, [head_dim][16] fp16 each, in the bytes of
                              * those 16 rows (kv_f16, AVX-512 builds, capacity % 16 == 0): q.K then runs over
                              * broadcast q elements without horizontal sums. The backend tiles the cache in place
                              * after ONNX Runtime's prefill writes rows (caprese_kv_tiles) and turns it back before
                              * ONNX Runtime reads it. V stays in rows. */
} Model;

/* ------------------------------------------------------------------ the structs' layout, for the ctypes mirror */
typedef struct {
    const char *type, *field; /* field "" = the struct itself */
    int64_t offset, size;
} LayoutField;

#define FIELD(T, f) {#T, #f, (int64_t)offsetof(T, f), (int64_t)sizeof(((T *)0)->f)}
#define STRUCT(T) {#T, "", 0, (int64_t)sizeof(T)}
static const LayoutField LAYOUT[] = {
    STRUCT(Mat), FIELD(Mat, w), FIELD(Mat, ld), FIELD(Mat, cols),
    STRUCT(QMat), FIELD(QMat, codes), FIELD(QMat, scales), FIELD(QMat, rows), FIELD(QMat, cols), FIELD(QMat, block),
    FIELD(QMat, bits), FIELD(QMat, scale_fp32), FIELD(QMat, layout),
    STRUCT(Layer), FIELD(Layer, input_norm), FIELD(Layer, post_attn_norm), FIELD(Layer, pre_ffn_norm),
    FIELD(Layer, post_ffn_norm), FIELD(Layer, q_norm), FIELD(Layer, k_norm), FIELD(Layer, qkv),
    FIELD(Layer, qkv_bias), FIELD(Layer, o), FIELD(Layer, o_bias), FIELD(Layer, gu1), FIELD(Layer, gu2),
    FIELD(Layer, gu_bias), FIELD(Layer, down), FIELD(Layer, down_bias), FIELD(Layer, n_ff), FIELD(Layer, rank),
    FIELD(Layer, cats_tau), FIELD(Layer, k_cache), FIELD(Layer, v_cache), FIELD(Layer, window),
    FIELD(Layer, scale), FIELD(Layer, softcap), FIELD(Layer, up_t), FIELD(Layer, up_bias), FIELD(Layer, q_attn),
    FIELD(Layer, q_ffn), FIELD(Layer, down_rows), FIELD(Layer, q_qkv), FIELD(Layer, q_o), FIELD(Layer, q_gate),
    FIELD(Layer, q_up), FIELD(Layer, q_down), FIELD(Layer, bypass_f16), FIELD(Layer, down_quads),
    FIELD(Layer, l_t), FIELD(Layer, l_ld),
    STRUCT(Model), FIELD(Model, num_layers), FIELD(Model, hidden), FIELD(Model, num_heads),
    FIELD(Model, num_kv_heads), FIELD(Model, head_dim), FIELD(Model, vocab), FIELD(Model, capacity),
    FIELD(Model, max_ff), FIELD(Model, activation), FIELD(Model, gemma), FIELD(Model, eps),
    FIELD(Model, final_softcap), FIELD(Model, embed_scale), FIELD(Model, embed), FIELD(Model, lm_head),
    FIELD(Model, final_norm), FIELD(Model, rope_cos), FIELD(Model, rope_sin), FIELD(Model, layers),
    FIELD(Model, logits), FIELD(Model, head_q), FIELD(Model, head_scale), FIELD(Model, head_bound),
    FIELD(Model, q_head), FIELD(Model, q_lm_head), FIELD(Model, int8_act), FIELD(Model, kv_f16),
    FIELD(Model, k_tiles),
    {NULL, NULL, 0, 0}};

/* Every struct ctypes mirrors, with each field's offset and size as this compiler laid them out. */
const LayoutField *caprese_layout_info(void) { return LAYOUT; }

int64_t caprese_head_topk_max(void) { return HEAD_TOPK_MAX; }

const char *caprese_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* ------------------------------------------------------------------ math shared by the stages */
static void rms_norm(const float *x, const float *w, float *y, int64_t n, float eps) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / (double)n + eps));
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* exp without a libm call, so the activation loops vectorize: Cody-Waite reduction by ln 2 and a degree-7
 * Taylor polynomial on |f| <= ln2 / 2 (truncation < 1e-8 relative); inputs clamped to [-87, 88]. */
static inline float exp_vec(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.4426950408889634f + 0.5f);
    const float f = (x - n * 0.693145751953125f) - n * 1.4286068203094172e-06f;
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f + f * (8.3333338e-3f +
                    f * (1.3888889e-3f + f * 1.9841270e-4f))))));
    const union { int32_t i; float f; } scale = {((int32_t)n + 127) << 23}; /* 2^n (a memcpy here: no SIMD) */
    return p * scale.f;
}

/* z[j] = act(gate[j]) (CATS: zeroed where |act| <= tau) * up[j] (up == NULL: no product), j < n. */
static void gated(int64_t kind, const float *gate, const float *up, const float *tau, float *z, int64_t n) {
    if (kind == 0) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) z[j] = gate[j] / (1.0f + exp_vec(-gate[j]));
    } else if (kind == 1) { /* tanh(y) = 1 - 2 / (1 + e^2y) */
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            const float x = gate[j], y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            z[j] = 0.5f * x * (2.0f - 2.0f / (1.0f + exp_vec(2.0f * y)));
        }
    } else {
        for (int64_t j = 0; j < n; j++) z[j] = 0.5f * gate[j] * (1.0f + erff(gate[j] * 0.7071067811865476f));
    }
    if (tau) {
        const float t = *tau;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) z[j] = fabsf(z[j]) > t ? z[j] : 0.0f;
    }
    if (up) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) z[j] *= up[j];
    }
}

/* yt[0:w) += a[0] p[0] + .. + a[3] p[3] (nr = 4; the terms in this order) or a[0] p[0] (nr = 1): the row loop of
 * gemv_rows. */
static inline __attribute__((always_inline)) void add_rows(float *restrict yt, int64_t w, const float *a,
                                                           const float *const *p, const int nr) {
    if (nr == 4) {
        const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
        const float *restrict w0 = p[0], *restrict w1 = p[1], *restrict w2 = p[2], *restrict w3 = p[3];
#pragma omp simd
        for (int64_t j = 0; j < w; j++) yt[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
    } else {
        const float a0 = a[0];
        const float *restrict w0 = p[0];
#pragma omp simd
        for (int64_t j = 0; j < w; j++) yt[j] += a0 * w0[j];
    }
}

/* y[0:n) += x[0] W[0] + .. + x[nr - 1] W[nr - 1] (nr <= 4 fp16 rows, ld halves apart), each element's terms in row
 * order: each 16 (AVX-512) or 8 (F16C) halves converted in registers, four rows added to a vector of y before it is
 * stored (a row at a time loaded and stored y per row); other builds convert one half at a time. */
static inline __attribute__((always_inline)) void f16_add_rows(float *restrict y, int64_t n, const uint16_t *W,
                                                               int64_t ld, const float *x, const int nr,
                                                               const uint8_t *pf, const uint8_t *pfe) {
    (void)pf, (void)pfe; /* pf: lines requested along the loop, up to pfe (or NULL) */
    int64_t j = 0;
    if (nr == 4) {
        const uint16_t *w0 = W, *w1 = w0 + ld, *w2 = w1 + ld, *w3 = w2 + ld;
#if defined(__AVX512F__)
        const __m512 x0 = _mm512_set1_ps(x[0]), x1 = _mm512_set1_ps(x[1]), x2 = _mm512_set1_ps(x[2]),
                     x3 = _mm512_set1_ps(x[3]);
#define F16_ROW(v, wr, xv) v = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + j))), xv, v)
        for (; j + 16 <= n; j += 16) {
            if (pf && pf + j * 8 < pfe) {
                __builtin_prefetch(pf + j * 8, 0, 2);
                __builtin_prefetch(pf + j * 8 + 64, 0, 2);
            }
            __m512 v = _mm512_loadu_ps(y + j);
            F16_ROW(v, w0, x0); F16_ROW(v, w1, x1); F16_ROW(v, w2, x2); F16_ROW(v, w3, x3);
            _mm512_storeu_ps(y + j, v);
        }
#undef F16_ROW
#elif defined(__F16C__) && defined(__FMA__)
        const __m256 x0 = _mm256_set1_ps(x[0]), x1 = _mm256_set1_ps(x[1]), x2 = _mm256_set1_ps(x[2]),
                     x3 = _mm256_set1_ps(x[3]);
#define F16_ROW(v, wr, xv) v = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr + j))), xv, v)
        for (; j + 8 <= n; j += 8) {
            if (pf && pf + j * 8 < pfe) __builtin_prefetch(pf + j * 8, 0, 2);
            __m256 v = _mm256_loadu_ps(y + j);
            F16_ROW(v, w0, x0); F16_ROW(v, w1, x1); F16_ROW(v, w2, x2); F16_ROW(v, w3, x3);
            _mm256_storeu_ps(y + j, v);
        }
#undef F16_ROW
#endif
    }
    for (int r = 0; r < nr; r++) { /* the columns left (all of them for a group of under four rows) */
        const uint16_t *wr = W + r * ld;
        int64_t k = j;
#if defined(__AVX512F__)
        const __m512 xv = _mm512_set1_ps(x[r]);
        for (; k + 16 <= n; k += 16)
            _mm512_storeu_ps(y + k, _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + k))), xv,
                                                    _mm512_loadu_ps(y + k)));
#elif defined(__F16C__) && defined(__FMA__)
        const __m256 xv = _mm256_set1_ps(x[r]);
        for (; k + 8 <= n; k += 8)
            _mm256_storeu_ps(y + k, _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr + k))), xv,
                                                    _mm256_loadu_ps(y + k)));
#endif
        for (; k < n; k++) y[k] += x[r] * qg_half(wr[k]);
    }
}

/* Rows requested ahead of the four being read by the fp16 bypass's loops (as many bytes in flight as the fp32
 * loops' four rows ahead). */
#define F16_AHEAD 8

/* y[0:n) = sum over rows r in [i0, i1) of x[r] * W[r, 0:n) (n = a->cols) for a quantized FFN's bypass R [rank,
 * hidden] stored fp16 (--fp16-bypass), rows in order, four at a time (f16_add_rows), F16_AHEAD rows requested ahead. */
static void gemv_rows_f16(const float *restrict x, const Mat *a, int64_t i0, int64_t i1, float *restrict y) {
    const uint16_t *W = (const uint16_t *)(const void *)a->w;
    const int64_t n = a->cols, ld = a->ld;
    for (int64_t j = 0; j < n; j++) y[j] = 0.0f;
    for (int64_t r = i0; r < i0 + F16_AHEAD && r < i1; r++) qg_prefetch((const uint8_t *)(W + r * ld), n * 2);
    for (int64_t i = i0; i < i1; i += 4) {
        for (int64_t r = i + F16_AHEAD; r < i + F16_AHEAD + 4 && r < i1; r++)
            qg_prefetch((const uint8_t *)(W + r * ld), n * 2);
        f16_add_rows(y, n, W + i * ld, ld, x + i, i1 - i < 4 ? (int)(i1 - i) : 4, NULL, NULL);
    }
}

/* y[0:n] = sum over rows r of x[r] * W[r, 0:n], for r = i in [i0, i1) (rows == NULL) or r = rows[i] (the
 * listed rows only: the others have x[r] == 0, CATS' thresholded neurons). Rows in order, four at a time, the
 * columns in tiles of 2048 so the partial sum stays in L1. */
#define TILE 2048
static void gemv_rows(const float *restrict x, const Mat *a, const int32_t *rows, int64_t i0, int64_t i1,
                      float *restrict y) {
    const int64_t ld = a->ld, n = a->cols;
    for (int64_t c0 = 0; c0 < n; c0 += TILE) {
        const int64_t w = (c0 + TILE < n ? c0 + TILE : n) - c0;
        const float *restrict W = a->w + c0;
        float *restrict yt = y + c0;
        for (int64_t j = 0; j < w; j++) yt[j] = 0.0f;
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4) {
            float xa[4];
            const float *p[4];
            for (int k = 0; k < 4; k++) {
                const int64_t r = rows ? rows[i + k] : i + k;
                xa[k] = x[r];
                p[k] = W + r * ld;
            }
            add_rows(yt, w, xa, p, 4);
        }
        for (; i < i1; i++) {
            const int64_t r = rows ? rows[i] : i;
            const float *p = W + r * ld;
            add_rows(yt, w, x + r, &p, 1);
        }
    }
}

static void rope(float *v, const float *cos, const float *sin, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        float a = v[j], b = v[j + half];
        v[j] = a * cos[j] - b * sin[j];
        v[j + half] = b * cos[j] + a * sin[j];
    }
}

/* float -> fp16 bits, rounded to nearest even (F16C's vcvtps2ph, and ONNX Runtime's Cast), in portable C */
static inline uint16_t f16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff;
    uint32_t mant = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    const int32_t e = (int32_t)exp - 112; /* the fp16 exponent field */
    if (e >= 0x1f) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) { /* an fp16 subnormal, or zero */
        if (e < -10) return (uint16_t)sign;
        mant |= 0x800000;
        const uint32_t shift = (uint32_t)(14 - e), mid = 1u << (shift - 1), rem = mant & ((1u << shift) - 1);
        uint32_t h = mant >> shift;
        if (rem > mid || (rem == mid && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (uint32_t)e << 10 | mant >> 13;
    const uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* a carry moves into the exponent, as it should */
    return (uint16_t)(sign | h);
}

/* dst[j] = src[j] rounded to fp16 bits, n values */
static void to_f16(const float *src, uint16_t *dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) dst[j] = f16_bits(src[j]);
}

/* v[j] = v[j] rounded to fp16 (and back), n values */
static void round_f16(float *v, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(v + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; j < n; j++) v[j] = qg_half(f16_bits(v[j]));
}

/* d[k] = w_k . h for four fp32 head rows. Every head logit, of the full head and of a screened head's
 * candidates (called with one row four times), comes from this one compiled body, so a row's logit has the same
 * bits on both paths and sampling from a screened top-k gives the full head's tokens. */
__attribute__((noinline)) static void dot4_f32(const float *w0, const float *w1, const float *w2, const float *w3,
                                               const float *restrict h, int64_t n, float d[4]) {
    f32_dot_group(w0, w1, w2, w3, h, n, 4, d);
}

static float head_row(const Model *m, const float *h, int64_t v) { /* one exact logit, soft-capped */
    const float *w = m->lm_head + v * m->hidden;
    float d[4];
    dot4_f32(w, w, w, w, h, m->hidden, d);
    return m->final_softcap > 0.0f ? tanhf(d[0] / m->final_softcap) * m->final_softcap : d[0];
}

/* d[k] = q_k . h for the four consecutive int8 rows q .. q + 3n. The loads run 32 KiB ahead with software
 * prefetch: the int8 rows are consumed 4x faster per byte than fp32 ones, and without it the stream stalls at
 * about half the DRAM bandwidth (measured: 28 MB read in 2.0 ms without, 1.15 ms with, 2 threads, AVX-512). The
 * AVX2 body widens 8 bytes per row and step (vpmovsxbd + vcvtdq2ps + FMA, as the AVX-512 one does with 16):
 * GCC's own vectorization of the plain loop widens through shuffles and read the int8 head slower than the
 * fp32 one on an AVX2-only EPYC. */
#define HEAD_PREFETCH 32768
static void dot4_i8(const int8_t *restrict q, const float *restrict h, int64_t n, float d[4]) {
    int64_t j = 0;
    float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 16 <= n; j += 16) {
        __builtin_prefetch(q + HEAD_PREFETCH + 4 * j, 0, 3);
        const __m512 hv = _mm512_loadu_ps(h + j);
#define I8(r) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + (r) * n + j))))
        a0 = _mm512_fmadd_ps(I8(0), hv, a0);
        a1 = _mm512_fmadd_ps(I8(1), hv, a1);
        a2 = _mm512_fmadd_ps(I8(2), hv, a2);
        a3 = _mm512_fmadd_ps(I8(3), hv, a3);
#undef I8
    }
    d0 = _mm512_reduce_add_ps(a0); d1 = _mm512_reduce_add_ps(a1);
    d2 = _mm512_reduce_add_ps(a2); d3 = _mm512_reduce_add_ps(a3);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 8 <= n; j += 8) {
        if (!(j & 8)) __builtin_prefetch(q + HEAD_PREFETCH + 4 * j, 0, 3); /* one line per 64 bytes read */
        const __m256 hv = _mm256_loadu_ps(h + j);
#define I8(r) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + (r) * n + j))))
        a0 = _mm256_fmadd_ps(I8(0), hv, a0);
        a1 = _mm256_fmadd_ps(I8(1), hv, a1);
        a2 = _mm256_fmadd_ps(I8(2), hv, a2);
        a3 = _mm256_fmadd_ps(I8(3), hv, a3);
#undef I8
    }
    float s[4][8];
    _mm256_storeu_ps(s[0], a0); _mm256_storeu_ps(s[1], a1); _mm256_storeu_ps(s[2], a2); _mm256_storeu_ps(s[3], a3);
    for (int k = 0; k < 8; k++) { d0 += s[0][k]; d1 += s[1][k]; d2 += s[2][k]; d3 += s[3][k]; }
#else
    for (int64_t c = 0; c < 4 * n; c += 64) __builtin_prefetch(q + HEAD_PREFETCH + c, 0, 3);
#endif
    for (; j < n; j++) {
        d0 += (float)q[j] * h[j];
        d1 += (float)q[n + j] * h[j];
        d2 += (float)q[2 * n + j] * h[j];
        d3 += (float)q[3 * n + j] * h[j];
    }
    d[0] = d0; d[1] = d1; d[2] = d2; d[3] = d3;
}

/* heap[0..k) is a min-heap of the k largest values seen: offer x. */
static void heap_offer(float *heap, int64_t k, float x) {
    if (!(x > heap[0])) return;
    int64_t i = 0;
    for (;;) { /* sift the new value down from the root */
        int64_t c = 2 * i + 1;
        if (c >= k) break;
        if (c + 1 < k && heap[c + 1] < heap[c]) c++;
        if (!(heap[c] < x)) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = x;
}

/* The k-th largest of a[0..n) (k <= n; a is reordered). Quickselect. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const float pivot = a[(lo + hi) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { const float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j; else if (want >= i) lo = i; else break;
    }
    return a[want];
}

/* ------------------------------------------------------------------ the context: pool, scratch, phases */
enum { PH_QKV, PH_ATTN, PH_GATE_UP, PH_DOWN, PH_HEAD_FULL, PH_HEAD_SCREEN, PH_HEAD_PICK, PH_QDOT, PH_QATT, PH_QDOWN,
       PH_QFFN, PH_QFFN_DENSE, PH_KINDS };
enum { J_QKV, J_O, J_GU, J_DOWN, J_HEAD }; /* what a PH_QDOT phase computes */
#define PROF_LABELS (PH_KINDS + 5) /* the profile's rows: a phase kind, or PH_KINDS + job for PH_QDOT */

/* Bytes of one row of a quantized matrix: its codes and its scales. */
static int64_t qmat_row_bytes(const QMat *w) {
    return w->cols * w->bits / 8 + (w->cols / w->block) * (w->scale_fp32 ? 4 : 2);
}

/* Chunk sizes: rows of the QKV and gate/up products (each chunk's part is as wide as the product, so few
 * chunks), rows of the down product (parts [hidden] wide), rows of the LM head. */
#define CHUNKS_WIDE 8
#define HEAD_ROWS 512
#define DOWN_BYTES 65536 /* rows of the down product per chunk: about this many floats */
#define ATT_BLOCK 256  /* attention slots scored at a time (online softmax across blocks) */

typedef struct {  /* what a phase computes; every thread copies it before running a chunk of it */
    int kind, p;      /* p: the epoch's parity (which results / states it writes) */
    int64_t layer, n_chunks, rows, stride; /* rows per chunk; stride: floats of one chunk's result */
    int64_t prev_n, prev_stride; /* the previous phase's (whose results this one reads, at parity p ^ 1) */
    int64_t slot, topk;
    float hn, floor_;  /* screened head: |h|_2 rounded up, the k-th largest lower bound */
    int64_t t0;        /* when it was published (ns): a chunk claimed but not started yet counts from then */
    int64_t n;         /* the rows (outputs, heads, neurons) the phase covers: chunk i has [i rows, (i + 1) rows) */
    int job;           /* PH_QDOT: J_QKV ... */
    int64_t split, rows2; /* split > 0: rows per chunk over [0, split), then rows2 per chunk (chunk_span) */
    int64_t cost, cost2;  /* split > 0: bytes a row reads before / after it, where they differ: the threads' first
                           * ranges then split the bytes, not the chunk count (phase_ranges) */
} Phase;

/* Rows [*r0, *r1) of chunk i. A quantized FFN's bypass (L's columns, R's rows: fp32) costs several times a
 * quantized row, so its chunks take fewer (ph->rows2): one heavy chunk at the end would be a thread's alone. */
static void chunk_span(const Phase *ph, int64_t i, int64_t *r0, int64_t *r1) {
    const int64_t na = ph->split ? (ph->split + ph->rows - 1) / ph->rows : ph->n_chunks;
    const int64_t end = ph->split ? ph->split : ph->n;
    if (i < na) {
        *r0 = i * ph->rows;
        *r1 = *r0 + ph->rows < end ? *r0 + ph->rows : end;
    } else {
        *r0 = ph->split + (i - na) * ph->rows2;
        *r1 = *r0 + ph->rows2 < ph->n ? *r0 + ph->rows2 : ph->n;
    }
}

/* Chunk i of a phase over a quantized FFN's F neurons then its bypass (PH_QDOWN, PH_QFFN): neurons [*j0, *j1),
 * its FFN neurons [*j0, *a1) and its bypass neurons [*b0, *j1) (either range may be empty). */
static void neuron_span(const Phase *ph, int64_t i, int64_t F, int64_t *j0, int64_t *j1, int64_t *a1, int64_t *b0) {
    chunk_span(ph, i, j0, j1);
    *a1 = *j1 < F ? *j1 : F;
    *b0 = *j0 > F ? *j0 : F;
}

typedef struct { /* x rounded to int8 (QgX over buf), valid for x == src and matrices of q.cols columns in blocks
                  * of xb. The first line is what the leader writes for every product; the second changes rarely */
    _Alignas(64) QgX q;
    const float *src;
    _Alignas(64) int64_t xb;
    void *buf;
} XqSlot;
static __thread int chunk_parity; /* the parity of the phase this thread runs a chunk of (q_dot's xq first) */

typedef struct Ctx Ctx;
typedef struct { /* a thread of the pool, and what it did (written by that thread only: no shared lines) */
    _Alignas(64) Ctx *c;
    int tid;
    pthread_t th;
    int64_t committed, dropped, reruns;
    int64_t stall_every, stall_us, stall_count; /* tests: this thread sleeps inside every stall_every-th chunk */
} Worker;

typedef struct { /* one chunk, on its own cache line; tagged with the epoch, so a new phase resets nothing */
    _Alignas(64) _Atomic uint64_t state; /* epoch << 8 | 0x80 | tid: committed in that epoch by that thread */
    _Atomic int64_t started;             /* when its latest execution started (ns) */
    _Atomic uint64_t runs;               /* epoch << 8 | executions started in that epoch */
} Slot;

struct Ctx {
    const Model *m;
    int threads;                 /* the leader + threads - 1 helpers */
    Phase phase[2];              /* by epoch parity: a phase's consumers read the previous one's results */
    Slot *slots[2];              /* by epoch parity: the chunks of that phase */
    int64_t max_chunks;          /* slots of each parity */
    /* written by the leader once per phase, read by every helper */
    _Alignas(64) _Atomic uint64_t epoch; /* phase number: helpers follow it */
    _Atomic uint32_t futex_word; /* the low bits of epoch, for futex waits */
    _Atomic int active;          /* threads asked to work (1 .. threads) */
    _Atomic int shutdown;
    struct { _Alignas(64) _Atomic uint64_t w; } range[MAX_THREADS]; /* per thread: its chunks, packed by pack() */
    _Alignas(64) _Atomic int sleepers, busy;
    float *res[MAX_THREADS][2];  /* per thread and parity: the results of the chunks it committed */
    int64_t res_floats;          /* floats of one res area */
    float *tmp[MAX_THREADS];     /* per thread: its own scratch (activations, scores, a chunk's z) */
    int64_t tmp_floats;
    float *x, *h, *y, *t, *kv;   /* leader: residual stream; the normed input every thread reads; scratch */
    float *sel;                  /* leader: the screened head's lower bounds gathered from the chunks */
    float *qkv, *att, *gu, *z;   /* quantized layers, gathered by the leader: QKV outputs, attention outputs of
                                  * every head, gate/up(/L) outputs, the FFN's activations (+ bypass) */
    XqSlot xqs[2];               /* int8-activation engines: the leader's x rounded to int8 for the next product(s),
                                  * by the parity of the phase it was made for (see quantize_for) */
    _Alignas(64) int64_t ema_ns[PH_KINDS]; /* typical chunk time per kind (the wait before a chunk is run again) */
    int64_t ns_wait, n_phases;   /* leader: time spent waiting for other threads' chunks; phases run */
    int64_t prof_ns[PROF_LABELS], prof_n[PROF_LABELS]; /* leader: wall ns and count of phases, per label */
    int64_t step_ns, steps;      /* leader: wall ns and count of decode steps */
    int64_t spin_ns;             /* how long an idle helper spins before it sleeps */
    int fused_ffn;               /* a quantized FFN as one phase where it can (stage_q_ffn, stage_q_ffn_dense; the
                                  * default), else gate/up, then down */
    Worker workers[MAX_THREADS];
};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wait(_Atomic uint32_t *w, uint32_t v) {
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *w) {
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE_PRIVATE, MAX_THREADS, NULL, NULL, 0);
}

static inline int winner_of(uint64_t s) { return (int)(s & 0x7f); }

/* Chunk i of epoch e is committed (or the phase has moved on). */
static inline int settled(uint64_t s, uint64_t e) { return (s >> 8) >= e; }

/* Count one more execution of chunk i in epoch e, if fewer than `most` were started (most 0: always). */
static int count_run(Slot *sl, uint64_t e, uint64_t most) {
    uint64_t r = atomic_load_explicit(&sl->runs, memory_order_relaxed);
    for (;;) {
        const uint64_t n = (r >> 8) == e ? (r & 0xff) : 0;
        if (most && n >= most) return 0;
        if (atomic_compare_exchange_weak_explicit(&sl->runs, &r, e << 8 | (n + 1), memory_order_relaxed,
                                                  memory_order_relaxed))
            return 1;
    }
}

/* The committed result of chunk i of the phase with parity p (its floats at stride `stride`). */
static inline const float *result(const Ctx *c, int p, int64_t i, int64_t stride) {
    const uint64_t s = atomic_load_explicit(&c->slots[p][i].state, memory_order_acquire);
    return c->res[winner_of(s)][p] + i * stride;
}

/* out[0:n] = sum over the chunks of phase parity p of their result[off:off + n] (+ bias[0:n]), in chunk order. */
static void sum_parts(const Ctx *c, int p, int64_t n_chunks, int64_t stride, int64_t off, int64_t n,
                      const float *bias, float *out) {
    const float *p0 = result(c, p, 0, stride) + off;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) out[j] = p0[j] + (bias ? bias[j] : 0.0f);
    for (int64_t k = 1; k < n_chunks; k++) {
        const float *pk = result(c, p, k, stride) + off;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] += pk[j];
    }
}

/* ------------------------------------------------------------------ stages: one chunk of each phase kind */
/* A: rows [r0, r1) of the QKV product of the normed input: a partial sum over all nqkv outputs. */
static void stage_qkv(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Layer *L = c->m->layers + ph->layer;
    const int64_t r0 = i * ph->rows, r1 = r0 + ph->rows < c->m->hidden ? r0 + ph->rows : c->m->hidden;
    gemv_rows(c->h, &L->qkv, NULL, r0, r1, out);
}

/* The new slot's K (normed, rotated) and V of every KV head, from their sums over phase A's parts in c->kv
 * ([k heads | v heads], bias added), into the cache (leader). */
static void stage_kv_write(Ctx *c, int64_t li, int64_t slot) {
    const Model *m = c->m;
    const Layer *L = m->layers + li;
    const int64_t hd = m->head_dim, Hkv = m->num_kv_heads, half = hd / 2;
    for (int64_t kv = 0; kv < Hkv; kv++) {
        const float *k = c->kv + kv * hd, *v = c->kv + (Hkv + kv) * hd;
        const int64_t row = (kv * m->capacity + slot) * hd;
        /* an fp16 cache (Model.kv_f16): k rounded, rotated (in c->t), rounded again into its row; v rounded */
        float *kd = m->kv_f16 ? c->t : L->k_cache + row;
        if (L->k_norm) rms_norm(k, L->k_norm, kd, hd, m->eps); else memcpy(kd, k, sizeof(float) * hd);
        if (m->kv_f16) round_f16(kd, hd);
        rope(kd, m->rope_cos + slot * half, m->rope_sin + slot * half, half);
        if (m->kv_f16) {
            if (m->k_tiles) { /* the slot's lane of its tile */
                uint16_t k16[hd];
                to_f16(kd, k16, hd);
                uint16_t *tile =
                    (uint16_t *)L->k_cache + (kv * m->capacity + (slot & ~(int64_t)15)) * hd + (slot & 15);
                for (int64_t j = 0; j < hd; j++) tile[16 * j] = k16[j];
            } else {
                to_f16(kd, (uint16_t *)L->k_cache + row, hd);
            }
            to_f16(v, (uint16_t *)L->v_cache + row, hd);
        } else {
            memcpy(L->v_cache + row, v, sizeof(float) * hd);
        }
    }
}

/* Attention is read by KV head: the G query heads that share one (GQA) are scored and summed in one pass over
 * its keys and values, so each K / V row is read from memory once per step, not G times. */
#if defined(__AVX512F__) /* the build's vector width (generic vectors wider than the registers compile badly) */
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 4
#endif
typedef float vfw __attribute__((vector_size(VW * 4)));
typedef float vfwu __attribute__((vector_size(VW * 4), aligned(4))); /* an unaligned load / store of VW floats */

/* K / V rows in their cache's dtype (f16: Model.kv_f16, a compile-time constant where it is used): element e of
 * a cache area, one VW-vector or one value of it, widened to fp32 */
#define KV_BYTES(f16) ((f16) ? 2 : 4) /* bytes of one cached value */
#define KV_AT(base, e, f16) ((const void *)((const char *)(base) + KV_BYTES(f16) * (e)))
static inline __attribute__((always_inline)) vfw kv_vec(const void *p, const int f16) {
    if (!f16) return *(const vfwu *)p;
#if VW == 16
    return (vfw)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif VW == 8 && defined(__F16C__)
    return (vfw)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    vfw r;
    for (int k = 0; k < VW; k++) r[k] = qg_half(((const uint16_t *)p)[k]);
    return r;
#endif
}
static inline __attribute__((always_inline)) float kv_val(const void *p, int64_t j, const int f16) {
    return f16 ? qg_half(((const uint16_t *)p)[j]) : ((const float *)p)[j];
}

#if VW >= 8
/* The tiles of dot16 / dot8: a[s] = VW partial sums of q . K[s] for VW key rows of hd floats (whole vectors of q),
 * and the products past the last whole vector added to r[s]. */
static inline __attribute__((always_inline)) void tile_partials(const float *q, const void *K, int64_t hd, vfw *a,
                                                                const int f16) {
    const int64_t hv = hd & ~(int64_t)(VW - 1);
    for (int s = 0; s < VW; s++) a[s] = (vfw){0};
    for (int64_t j = 0; j < hv; j += VW) {
        const vfw qv = *(const vfwu *)(q + j);
        for (int s = 0; s < VW; s++) a[s] += qv * kv_vec(KV_AT(K, s * hd + j, f16), f16);
    }
}

static inline __attribute__((always_inline)) vfw tile_tail(const float *q, const void *K, int64_t hd, vfw r,
                                                           const int f16) {
    for (int64_t j = hd & ~(int64_t)(VW - 1); j < hd; j++) /* head_dim not a multiple of VW */
        for (int s = 0; s < VW; s++) r[s] += q[j] * kv_val(K, s * hd + j, f16);
    return r;
}
#endif

#if VW == 16
/* d[s] = q . K[s] for 16 key rows of hd floats: one vector of partial sums per row, then a transposing tree of
 * shuffles adds the 16 vectors into one (46 vector operations for 16 dot products, not a horizontal sum each). */
static inline __attribute__((always_inline)) vfw dot16(const float *q, const void *K, int64_t hd, const int f16) {
    vfw a[16];
    tile_partials(q, K, hd, a, f16);
    vfw b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* [row 2i: 8 partial sums | row 2i + 1: 8] */
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                       30, 31);
    for (int i = 0; i < 4; i++) /* 4 each: rows 4i, 4i + 2, 4i + 1, 4i + 3 */
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                                       26, 27) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                                       30, 31);
    for (int i = 0; i < 2; i++) /* 2 each: rows 8i + 0, 4, 2, 6, 1, 5, 3, 7 */
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13,
                                       28, 29) +
               __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                                       30, 31);
    const vfw e = /* rows in bit-reversed order */
        __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
        __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    return tile_tail(q, K, hd, __builtin_shufflevector(e, e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15),
                     f16);
}
#endif

#if VW == 16
/* Scores of 8 key rows for nh (2 or 3) queries at once, for fp16 keys: each key vector widened once for all of
 * them (dot16 widens it once per query, and the conversions cost as much as the products). Row by row the same
 * products and the same order of additions as dot16's tree, so the same bits. hd % 16 == 0. Its tree is dot16's
 * first three levels written again: dot16 calling a shared 8-row helper twice ran 8% slower (fp32 cache). */
static inline __attribute__((always_inline)) void dot8_heads(const float *q, const void *K, int64_t hd, const int nh,
                                                             const int f16, float *out) {
    vfw a[3][8];
    for (int t = 0; t < nh; t++)
        for (int r = 0; r < 8; r++) a[t][r] = (vfw){0};
    for (int64_t j = 0; j < hd; j += 16)
        for (int r = 0; r < 8; r++) {
            const vfw k = kv_vec(KV_AT(K, r * hd + j, f16), f16);
            for (int t = 0; t < nh; t++) a[t][r] += *(const vfwu *)(q + t * hd + j) * k;
        }
    for (int t = 0; t < nh; t++) {
        const vfw *x = a[t];
        vfw b[4], c[2];
        for (int i = 0; i < 4; i++)
            b[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                           23) +
                   __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                           29, 30, 31);
        for (int i = 0; i < 2; i++)
            c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                                           26, 27) +
                   __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                                           30, 31);
        const vfw d = __builtin_shufflevector(c[0], c[1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
                      __builtin_shufflevector(c[0], c[1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        const vfw e = d + __builtin_shufflevector(d, d, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
        typedef float v8f __attribute__((vector_size(32), aligned(4)));
        *(v8f *)(out + t * ATT_BLOCK) = __builtin_shufflevector(e, e, 0, 8, 4, 12, 2, 10, 6, 14);
    }
}
#endif

#if VW == 8
/* d[s] = q . K[s] for 8 key rows (the AVX2 build): dot16's transposing tree at 8 lanes (22 operations for 8 dot
 * products where a horizontal sum per row took ~6 each). */
static inline __attribute__((always_inline)) vfw dot8(const float *q, const void *K, int64_t hd, const int f16) {
    vfw a[8];
    tile_partials(q, K, hd, a, f16);
    vfw b[4], c[2];
    for (int i = 0; i < 4; i++) /* [row 2i: 4 partial sums | row 2i + 1: 4] */
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++) /* 2 each: rows 4i, 4i + 2, 4i + 1, 4i + 3 */
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    const vfw d = /* rows 0, 4, 2, 6, 1, 5, 3, 7 */
        __builtin_shufflevector(c[0], c[1], 0, 8, 2, 10, 4, 12, 6, 14) +
        __builtin_shufflevector(c[0], c[1], 1, 9, 3, 11, 5, 13, 7, 15);
    return tile_tail(q, K, hd, __builtin_shufflevector(d, d, 0, 4, 2, 6, 1, 5, 3, 7), f16);
}
#endif

static inline __attribute__((always_inline)) float dot_row(const float *q, const void *k, int64_t hd, const int f16) {
    float d = 0.0f;
    if (f16) { /* whole vectors widened at once, then the rest one by one */
        vfw a = {0};
        int64_t j = 0;
        for (; j + VW <= hd; j += VW) a += *(const vfwu *)(q + j) * kv_vec(KV_AT(k, j, 1), 1);
        for (int t = 0; t < VW; t++) d += a[t];
        for (; j < hd; j++) d += q[j] * kv_val(k, j, 1);
        return d;
    }
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < hd; j++) d += q[j] * ((const float *)k)[j];
    return d;
}

/* Each of nk queries' n raw scores (sc[t * ATT_BLOCK ..]) scaled (soft-capped), their maxima into mx[t]. */
static inline __attribute__((always_inline)) void score_finish(const Layer *L, float *sc, int64_t n, int nk,
                                                                float *mx) {
    for (int t = 0; t < nk; t++) {
        float *st = sc + t * ATT_BLOCK;
        const float scale = L->scale, cap = L->softcap;
        if (cap > 0.0f) {
            for (int64_t r = 0; r < n; r++) st[r] = tanhf(st[r] * scale / cap) * cap;
        } else {
#pragma omp simd
            for (int64_t r = 0; r < n; r++) st[r] *= scale;
        }
        float m = mx[t];
#pragma omp simd reduction(max : m)
        for (int64_t r = 0; r < n; r++) m = st[r] > m ? st[r] : m;
        mx[t] = m;
    }
}

/* sc[t * ATT_BLOCK + s] = score of query t (of nk, q[t * hd ..]) against key row s < n of K (scaled, soft-capped);
 * their maxima into mx[t]. AVX-512: 16 rows at a time (dot16), AVX2: 2 x 8 (dot8), every query's scores of a tile
 * before the next tile, so the nk queries after the first read its rows from L1 (a 256-slot block's rows do not
 * fit it: query by query, each re-read them from L2; the attention 10-15% faster, docs/performance.md); else, and
 * the last n % 16, one by one. pk (or NULL): npk key rows requested along, one per row scored (attend_group). */
static inline __attribute__((always_inline)) void score_rows(const Layer *L, const float *q, const void *K, int64_t hd,
                                                             int64_t n, int nk, float *sc, float *mx, const void *pk,
                                                             int64_t npk, const int f16) {
    const int64_t rb = hd * KV_BYTES(f16); /* bytes of a row */
    int64_t s = 0;
#if VW >= 8
    for (; s + 16 <= n; s += 16) {
        if (pk && s < npk)
            qg_prefetch((const uint8_t *)KV_AT(pk, s * hd, f16), ((s + 16 < npk ? s + 16 : npk) - s) * rb);
#if VW == 16
        if (f16 && nk > 1 && hd % 16 == 0) { /* fp16 keys: queries 3 or 2 at a time (4 = 2 + 2) */
            for (int t = 0; t < nk; t += nk == 4 ? 2 : 3)
                for (int64_t h8 = s; h8 < s + 16; h8 += 8) {
                    if (nk == 3) dot8_heads(q, KV_AT(K, h8 * hd, f16), hd, 3, f16, sc + h8);
                    else dot8_heads(q + t * hd, KV_AT(K, h8 * hd, f16), hd, 2, f16, sc + t * ATT_BLOCK + h8);
                }
            continue;
        }
#endif
        for (int t = 0; t < nk; t++) {
#if VW == 16
            *(vfwu *)(sc + t * ATT_BLOCK + s) = dot16(q + t * hd, KV_AT(K, s * hd, f16), hd, f16);
#else
            *(vfwu *)(sc + t * ATT_BLOCK + s) = dot8(q + t * hd, KV_AT(K, s * hd, f16), hd, f16);
            *(vfwu *)(sc + t * ATT_BLOCK + s + 8) = dot8(q + t * hd, KV_AT(K, (s + 8) * hd, f16), hd, f16);
#endif
        }
    }
#endif
    if (pk && s < npk) qg_prefetch((const uint8_t *)KV_AT(pk, s * hd, f16), (npk - s) * rb);
    for (int t = 0; t < nk; t++)
        for (int64_t r = s; r < n; r++) sc[t * ATT_BLOCK + r] = dot_row(q + t * hd, KV_AT(K, r * hd, f16), hd, f16);
    score_finish(L, sc, n, nk, mx);
}

#if VW == 16
/* out[t] = the scores of query t (q + t * hd) against the 16 keys of tile kt ([hd][16] fp16, Model.k_tiles): one
 * widened key vector per element for every query, two sums per query (even / odd elements) for independent
 * chains. hd even. */
static inline __attribute__((always_inline)) void tile_scores(const float *q, const uint16_t *kt, int64_t hd,
                                                              const int nk, __m512 *out) {
    __m512 a[4], b[4];
    for (int t = 0; t < nk; t++) a[t] = b[t] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 2) {
        const __m512 k0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kt + 16 * d)));
        const __m512 k1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kt + 16 * d + 16)));
        for (int t = 0; t < nk; t++) {
            a[t] = _mm512_fmadd_ps(_mm512_set1_ps(q[t * hd + d]), k0, a[t]);
            b[t] = _mm512_fmadd_ps(_mm512_set1_ps(q[t * hd + d + 1]), k1, b[t]);
        }
    }
    for (int t = 0; t < nk; t++) out[t] = _mm512_add_ps(a[t], b[t]);
}

/* score_rows over a K in tiles: slots [b0, b0 + n) of KV head area Kh (tiles from its slot 0), the tiles at the
 * ends scored whole and stored masked. pk / npk as score_rows' (slot-ordered bytes: a tile's are its rows'). */
static void score_tiles(const Layer *L, const float *q, const uint16_t *Kh, int64_t hd, int64_t b0, int64_t n,
                        int nk, float *sc, float *mx, const uint16_t *pk, int64_t npk) {
    for (int64_t t0 = b0 & ~(int64_t)15; t0 < b0 + n; t0 += 16) {
        const int64_t s = t0 - b0, lo = s < 0 ? -s : 0, hi = s + 16 > n ? n - s : 16; /* lanes [lo, hi) are ours */
        if (pk && s + 16 > 0 && s < npk)
            qg_prefetch((const uint8_t *)(pk + (s + lo) * hd), ((s + 16 < npk ? s + 16 : npk) - s - lo) * hd * 2);
        __m512 r[4];
        switch (nk) {
        case 1: tile_scores(q, Kh + t0 * hd, hd, 1, r); break;
        case 2: tile_scores(q, Kh + t0 * hd, hd, 2, r); break;
        case 3: tile_scores(q, Kh + t0 * hd, hd, 3, r); break;
        default: tile_scores(q, Kh + t0 * hd, hd, 4, r); break;
        }
        const __mmask16 mk = (__mmask16)((0xFFFFu >> (16 - hi)) & (0xFFFFu << lo));
        for (int t = 0; t < nk; t++) _mm512_mask_storeu_ps(sc + t * ATT_BLOCK + s, mk, r[t]);
    }
    score_finish(L, sc, n, nk, mx);
}
#endif

/* o_k[0:hd] += sum over rows s < n of p_k[s] * V[s] for nk <= 4 queries (p_k = p + k * ATT_BLOCK, o_k = o + k *
 * ostride): 4 VW columns at a time on AVX-512 (4 nk sums), then 2 VW (2 nk), the sums kept in registers across the
 * rows (independent chains). pv (or NULL): npv value rows requested along, one per row added (attend_group). */
static inline __attribute__((always_inline)) void add_values(const float *p, const void *V, int64_t hd, int64_t n,
                                                             int nk, float *o, int64_t ostride, const void *pv,
                                                             int64_t npv, const int f16) {
    const float *p0 = p, *p1 = p + ATT_BLOCK, *p2 = p + 2 * ATT_BLOCK, *p3 = p + 3 * ATT_BLOCK;
    int64_t j = 0;
#if VW == 16
    /* AVX-512: 64 columns at a time, each value vector loaded into a register once for all nk queries (the
     * compiler had folded the loads into the FMAs, loading every vector nk times: load-bound); the same sums */
    for (; j + 4 * VW <= hd; j += 4 * VW) {
        const int64_t npf = j == 0 && pv ? npv : 0; /* the next chunk's value rows, one per row added */
        vfw a[4][4];
        for (int t = 0; t < 4; t++)
            for (int u = 0; u < 4; u++) a[t][u] = t < nk ? *(vfwu *)(o + t * ostride + j + u * VW) : (vfw){0};
        for (int64_t s = 0; s < n; s++) {
            if (s < npf) qg_prefetch((const uint8_t *)KV_AT(pv, s * hd, f16), hd * KV_BYTES(f16));
            vfw v[4];
            for (int u = 0; u < 4; u++) v[u] = kv_vec(KV_AT(V, s * hd + j + u * VW, f16), f16);
            __asm__("" : "+v"(v[0]), "+v"(v[1]), "+v"(v[2]), "+v"(v[3]));
            for (int t = 0; t < nk; t++) {
                const float pt = p[t * ATT_BLOCK + s];
                for (int u = 0; u < 4; u++) a[t][u] += pt * v[u];
            }
        }
        for (int t = 0; t < nk; t++)
            for (int u = 0; u < 4; u++) *(vfwu *)(o + t * ostride + j + u * VW) = a[t][u];
    }
#endif
    for (; j + 2 * VW <= hd; j += 2 * VW) {
        const int64_t npf = j == 0 && pv ? npv : 0; /* the next chunk's value rows, one per row added */
        float *o0 = o + j, *o1 = o0 + ostride, *o2 = o1 + ostride, *o3 = o2 + ostride;
        vfw a0 = *(vfwu *)o0, b0 = *(vfwu *)(o0 + VW), a1 = {0}, b1 = {0}, a2 = {0}, b2 = {0}, a3 = {0}, b3 = {0};
        if (nk > 1) a1 = *(vfwu *)o1, b1 = *(vfwu *)(o1 + VW);
        if (nk > 2) a2 = *(vfwu *)o2, b2 = *(vfwu *)(o2 + VW);
        if (nk > 3) a3 = *(vfwu *)o3, b3 = *(vfwu *)(o3 + VW);
        for (int64_t s = 0; s < n; s++) {
            if (s < npf) qg_prefetch((const uint8_t *)KV_AT(pv, s * hd, f16), hd * KV_BYTES(f16));
            vfw v = kv_vec(KV_AT(V, s * hd + j, f16), f16), w = kv_vec(KV_AT(V, s * hd + j + VW, f16), f16);
#if VW >= 8
            __asm__("" : "+x"(v), "+x"(w)); /* in registers: one load each (see above) */
#endif
            a0 += p0[s] * v, b0 += p0[s] * w;
            if (nk > 1) a1 += p1[s] * v, b1 += p1[s] * w;
            if (nk > 2) a2 += p2[s] * v, b2 += p2[s] * w;
            if (nk > 3) a3 += p3[s] * v, b3 += p3[s] * w;
        }
        *(vfwu *)o0 = a0, *(vfwu *)(o0 + VW) = b0;
        if (nk > 1) *(vfwu *)o1 = a1, *(vfwu *)(o1 + VW) = b1;
        if (nk > 2) *(vfwu *)o2 = a2, *(vfwu *)(o2 + VW) = b2;
        if (nk > 3) *(vfwu *)o3 = a3, *(vfwu *)(o3 + VW) = b3;
    }
    for (; j < hd; j++) /* head_dim not a multiple of 2 VW */
        for (int t = 0; t < nk; t++) {
            float a = o[t * ostride + j];
            for (int64_t s = 0; s < n; s++) a += p[t * ATT_BLOCK + s] * kv_val(V, s * hd + j, f16);
            o[t * ostride + j] = a;
        }
}

/* Slots [0, slots) of every layer's K (rounded up to whole tiles) from rows into 16-slot tiles (to_tiles = 1) or
 * back, in place (Model.k_tiles: the backend tiles the cache after ONNX Runtime's prefill writes rows, and turns
 * it back into rows before ONNX Runtime reads it). 0, or -1 where m's cache cannot hold tiles. */
int caprese_kv_tiles(const Model *m, int64_t slots, int64_t to_tiles) {
#if VW == 16
    const int64_t hd = m->head_dim;
    if (!m->kv_f16 || m->capacity % 16 || hd < 2 || slots < 0 || slots > m->capacity) return -1;
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(16 * hd));
    if (!tmp) return -1;
    for (int64_t li = 0; li < m->num_layers; li++)
        for (int64_t kv = 0; kv < m->num_kv_heads; kv++)
            for (int64_t t0 = 0; t0 < slots; t0 += 16) {
                uint16_t *b = (uint16_t *)m->layers[li].k_cache + (kv * m->capacity + t0) * hd;
                for (int64_t r = 0; r < 16; r++)
                    for (int64_t j = 0; j < hd; j++) {
                        if (to_tiles) tmp[16 * j + r] = b[r * hd + j];
                        else tmp[r * hd + j] = b[16 * j + r];
                    }
                memcpy(b, tmp, sizeof(uint16_t) * (size_t)(16 * hd));
            }
    free(tmp);
    return 0;
#else
    (void)m, (void)slots, (void)to_tiles;
    return -1; /* AVX2 and scalar builds read K in rows */
#endif
}

/* The keys and values of slots [s0, s1) of KV head kvh into L2, all requested at once. A chunk's rows are short
 * streams (~16 KB each of K and V) that the hardware prefetchers do not ramp up on, so asked 16 rows ahead they
 * were read at half the weights' rate (docs/performance.md). */
static void prefetch_kv_rows(const Model *m, const Layer *L, int64_t kvh, int64_t s0, int64_t s1) {
    const int64_t hd = m->head_dim, f16 = m->kv_f16, rb = hd * KV_BYTES(f16);
    const int64_t k0 = m->k_tiles ? s0 & ~(int64_t)15 : s0, k1 = m->k_tiles ? (s1 + 15) & ~(int64_t)15 : s1;
    qg_prefetch((const uint8_t *)KV_AT(L->k_cache, (kvh * m->capacity + k0) * hd, f16), (k1 - k0) * rb);
    qg_prefetch((const uint8_t *)KV_AT(L->v_cache, (kvh * m->capacity + s0) * hd, f16), (s1 - s0) * rb);
}

/* Query heads h0 .. h0 + g - 1 of layer L at `slot`, all of one KV head: their q (raw: the QKV product's outputs of
 * those heads, bias added) normed and rotated into q[g * hd]; attention over slots [s0, s1) of their KV head (scores
 * a block at a time into sc[g * ATT_BLOCK], merged by their running max and sum), left unnormalized: head k's
 * o + k * ostride gets [sum_s e^(score_s - m) v_s (hd floats), m, sum_s e^(score_s - m)]. raw may alias sc.
 * nkvh >= 0: slots [ns0, ns1) of KV head nkvh (the next chunk) are requested a row at a time as this chunk's rows
 * are read (a key row per key scored, a value row per value added): their memory time overlaps this chunk's
 * arithmetic, where one burst of requests first stalled the core until most of them had come back (docs/
 * performance.md: the attention phase 0.91x on two threads, 0.80x at 1,024 tokens). */
static inline __attribute__((always_inline)) void attend_group_kv(const Ctx *c, const Layer *L, int64_t slot,
                                                                  int64_t h0, int64_t g, int64_t s0, int64_t s1,
                                                                  const float *raw, float *q, float *sc, float *o,
                                                                  int64_t ostride, int64_t nkvh, int64_t ns0,
                                                                  int64_t ns1, const int f16) {
    const Model *m = c->m;
    const int64_t hd = m->head_dim, half = hd / 2, kvh = h0 / (m->num_heads / m->num_kv_heads);
    for (int64_t k = 0; k < g; k++) {
        float *qk = q + k * hd;
        if (L->q_norm) rms_norm(raw + k * hd, L->q_norm, qk, hd, m->eps);
        else memcpy(qk, raw + k * hd, sizeof(float) * hd);
        if (f16) round_f16(qk, hd); /* an fp16 cache: q as ONNX Runtime's fp16 attention takes it (Model.kv_f16) */
        rope(qk, m->rope_cos + slot * half, m->rope_sin + slot * half, half);
        if (f16) round_f16(qk, hd);
        float *ok = o + k * ostride;
        for (int64_t j = 0; j < hd; j++) ok[j] = 0.0f;
        ok[hd] = -INFINITY;
        ok[hd + 1] = 0.0f;
    }
    const void *K = KV_AT(L->k_cache, kvh * m->capacity * hd, f16), *V = KV_AT(L->v_cache, kvh * m->capacity * hd, f16);
    prefetch_kv_rows(m, L, kvh, s0, s1);
    for (int64_t b0 = s0; b0 < s1; b0 += ATT_BLOCK) {
        const int64_t n = b0 + ATT_BLOCK <= s1 ? ATT_BLOCK : s1 - b0;
        /* the next chunk's rows, requested as this block's are read (the same count, from its matching slot) */
        const int64_t nb0 = ns0 + (b0 - s0), np = nkvh < 0 || nb0 >= ns1 ? 0 : (ns1 - nb0 < n ? ns1 - nb0 : n);
        const void *pk = np ? KV_AT(L->k_cache, (nkvh * m->capacity + nb0) * hd, f16) : NULL;
        const void *pv = np ? KV_AT(L->v_cache, (nkvh * m->capacity + nb0) * hd, f16) : NULL;
        for (int64_t k0 = 0; k0 < g; k0 += 4) {
            const int nk = g - k0 < 4 ? (int)(g - k0) : 4;
            float bm[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
            float *sk = sc + k0 * ATT_BLOCK, *qk = q + k0 * hd, *ok = o + k0 * ostride;
#if VW == 16
            if (f16 && m->k_tiles)
                score_tiles(L, qk, (const uint16_t *)K, hd, b0, n, nk, sk, bm, (const uint16_t *)pk, np);
            else
#endif
                score_rows(L, qk, KV_AT(K, b0 * hd, f16), hd, n, nk, sk, bm, pk, np, f16);
            for (int t = 0; t < nk; t++) { /* e^(score - new max); the sums so far rescaled to the new max */
                float *ot = ok + t * ostride, *st = sk + t * ATT_BLOCK;
                const float mx = ot[hd], nm = bm[t] > mx ? bm[t] : mx, corr = mx == -INFINITY ? 0.0f : expf(mx - nm);
                float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                for (int64_t s = 0; s < n; s++) {
                    st[s] = exp_vec(st[s] - nm);
                    sum += st[s];
                }
                ot[hd] = nm;
                ot[hd + 1] = ot[hd + 1] * corr + sum;
                if (corr != 1.0f)
                    for (int64_t j = 0; j < hd; j++) ot[j] *= corr;
            }
            switch (nk) {
            case 1: add_values(sk, KV_AT(V, b0 * hd, f16), hd, n, 1, ok, ostride, pv, np, f16); break;
            case 2: add_values(sk, KV_AT(V, b0 * hd, f16), hd, n, 2, ok, ostride, pv, np, f16); break;
            case 3: add_values(sk, KV_AT(V, b0 * hd, f16), hd, n, 3, ok, ostride, pv, np, f16); break;
            default: add_values(sk, KV_AT(V, b0 * hd, f16), hd, n, 4, ok, ostride, pv, np, f16); break;
            }
            pk = pv = NULL; /* once per block */
        }
    }
    if (nkvh >= 0 && ns1 - ns0 > s1 - s0) prefetch_kv_rows(m, L, nkvh, ns0 + (s1 - s0), ns1);
}

static void attend_group(const Ctx *c, const Layer *L, int64_t slot, int64_t h0, int64_t g, int64_t s0, int64_t s1,
                         const float *raw, float *q, float *sc, float *o, int64_t ostride, int64_t nkvh, int64_t ns0,
                         int64_t ns1) {
    if (c->m->kv_f16) attend_group_kv(c, L, slot, h0, g, s0, s1, raw, q, sc, o, ostride, nkvh, ns0, ns1, 1);
    else attend_group_kv(c, L, slot, h0, g, s0, s1, raw, q, sc, o, ostride, nkvh, ns0, ns1, 0);
}

/* The first slot query heads attend at `slot` (Gemma 2's sliding window starts later). */
static int64_t first_slot(const Layer *L, int64_t slot) {
    return (L->window > 0 && slot - L->window + 1 > 0) ? slot - L->window + 1 : 0;
}

/* B: query head i: its q from phase A's parts, its attention (attend_group), then its rows of the o projection: a
 * partial sum over the hidden outputs. */
static void stage_attention(const Ctx *c, const Phase *ph, int64_t i, float *out, float *tmp) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int64_t hd = m->head_dim;
    float *q = tmp, *o = q + hd, *sc = o + hd + 2;
    sum_parts(c, ph->p ^ 1, ph->prev_n, ph->prev_stride, i * hd, hd, L->qkv_bias ? L->qkv_bias + i * hd : NULL, sc);
    attend_group(c, L, ph->slot, i, 1, first_slot(L, ph->slot), ph->slot + 1, sc, q, sc, o, hd + 2, -1, 0, 0);
    const float inv = 1.0f / o[hd + 1];
    for (int64_t j = 0; j < hd; j++) o[j] *= inv;
    if (m->kv_f16) round_f16(o, hd); /* ONNX Runtime's fp16 attention output (Model.kv_f16) */
    const Mat rows = {L->o.w + i * hd * L->o.ld, L->o.ld, L->o.cols}; /* this head's rows of o */
    gemv_rows(o, &rows, NULL, 0, hd, out);
}

/* Slots [*s0, *s1) of chunk i of a quantized attention phase over slots [lo, lo + len) in S parts per KV head. */
static void att_part(int64_t i, int64_t S, int64_t lo, int64_t len, int64_t *s0, int64_t *s1) {
    *s0 = lo + len * (i % S) / S;
    *s1 = lo + len * (i % S + 1) / S;
}

/* B, quantized o: chunk i = KV head i / S, slots part i % S of S (ph->n = KV heads x S): the unnormalized
 * attention of that KV head's query heads over the part (attend_group), for reduce_attention to merge; the o
 * projection is a phase of its own (a quantized row spans every head's inputs). The next chunk's rows are
 * requested as this one's are read: with threads of equal speed it is this thread's next. */
static void stage_q_attention(const Ctx *c, const Phase *ph, int64_t i, float *out, float *tmp) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int64_t hd = m->head_dim, g = m->num_heads / m->num_kv_heads, S = ph->n / m->num_kv_heads;
    const int64_t kvh = i / S, lo = first_slot(L, ph->slot), len = ph->slot + 1 - lo;
    int64_t s0, s1, ns0 = 0, ns1 = 0, nkvh = -1;
    if (i + 1 < ph->n) {
        att_part(i + 1, S, lo, len, &ns0, &ns1);
        nkvh = (i + 1) / S;
    }
    att_part(i, S, lo, len, &s0, &s1);
    attend_group(c, L, ph->slot, kvh * g, g, s0, s1, c->qkv + kvh * g * hd, tmp, tmp + g * hd, out, hd + 2, nkvh, ns0,
                 ns1);
}

/* Leader, before a phase of quantized products of w-shaped matrices over x: on an int8-activation engine, x
 * rounded to int8 once for every chunk (int4 weights only; other formats keep fp32 activations), into the buffer
 * of that phase's parity (the other may still serve a product of the phase before: CATS' up rows). */
static void quantize_for(Ctx *c, const QMat *w, const float *x) {
    const int p = (int)((atomic_load_explicit(&c->epoch, memory_order_relaxed) + 1) & 1);
    XqSlot *s = &c->xqs[p], *o = &c->xqs[p ^ 1];
    s->src = NULL;
    if (o->src == x) o->src = NULL; /* x has changed since */
    if (!c->m->int8_act || !caprese_qx_fits(w)) return;
    caprese_qx_quantize(w, x, s->buf, &s->q);
    s->src = x;
    if (s->xb != qx_block(w)) s->xb = qx_block(w);
}

/* y[r] for r in [r0, r1) (rows idx[r] when given) of w times x: int8 activations where the leader prepared them. */
static void q_dot(const Ctx *c, const QMat *w, const float *x, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    for (int k = 0; k < 2; k++) {
        const XqSlot *s = &c->xqs[chunk_parity ^ k];
        if (s->src == x && s->q.cols == w->cols && s->xb == qx_block(w) && caprese_qx_fits(w)) {
            caprese_q_rows_dot_qx(w, &s->q, idx, r0, r1, y);
            return;
        }
    }
    caprese_q_rows_dot(w, x, idx, r0, r1, y);
}

/* y[0 .. nr) = w[r] . x for nr <= 4 fp16 rows (ld halves apart) of cols: each 16 (AVX-512) or 8 (F16C) halves
 * converted and multiplied in registers, the rows' accumulators interleaved; a row's sum in the same order whichever
 * group it is in. Other builds convert one half at a time. */
static inline __attribute__((always_inline)) void f16_dot_group(const uint16_t *w, int64_t ld, int64_t cols,
                                                                const float *restrict x, const int nr, float *y,
                                                                const uint8_t *pf, const uint8_t *pfe) {
    (void)pf, (void)pfe; /* pf: lines requested along the loop, up to pfe (or NULL) */
    const uint16_t *wr[4];
    for (int r = 0; r < 4; r++) wr[r] = w + (r < nr ? r : 0) * ld; /* rows past nr: row 0 again, unused */
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; j + 16 <= cols; j += 16) {
        if (pf && pf + j * 8 < pfe) {
            __builtin_prefetch(pf + j * 8, 0, 2);
            __builtin_prefetch(pf + j * 8 + 64, 0, 2);
        }
        const __m512 xv = _mm512_loadu_ps(x + j);
        for (int r = 0; r < 4; r++)
            a[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr[r] + j))), xv, a[r]);
    }
    for (int r = 0; r < 4; r++) d[r] = _mm512_reduce_add_ps(a[r]);
#elif defined(__F16C__) && defined(__FMA__)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; j + 8 <= cols; j += 8) {
        if (pf && pf + j * 8 < pfe) __builtin_prefetch(pf + j * 8, 0, 2);
        const __m256 xv = _mm256_loadu_ps(x + j);
        for (int r = 0; r < 4; r++)
            a[r] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[r] + j))), xv, a[r]);
    }
    for (int r = 0; r < 4; r++) {
        float l[8];
        _mm256_storeu_ps(l, a[r]);
        for (int k = 0; k < 8; k++) d[r] += l[k];
    }
#endif
    for (int r = 0; r < nr; r++) {
        float e = d[r];
        for (int64_t k = j; k < cols; k++) e += qg_half(wr[r][k]) * x[k];
        y[r] = e;
    }
}

/* y[i] = w[i] . x for i in [r0, r1), w [rows, cols] fp16, ld halves from row to row: four rows at a time
 * (f16_dot_group), F16_AHEAD rows requested ahead (their cols halves only: R's rows between are not read here). */
static void f16_rows_dot(const uint16_t *w, int64_t ld, int64_t cols, const float *restrict x, int64_t r0,
                         int64_t r1, float *y) {
    for (int64_t r = r0; r < r0 + F16_AHEAD && r < r1; r++) qg_prefetch((const uint8_t *)(w + r * ld), cols * 2);
    for (int64_t i = r0; i < r1; i += 4) {
        for (int64_t r = i + F16_AHEAD; r < i + F16_AHEAD + 4 && r < r1; r++)
            qg_prefetch((const uint8_t *)(w + r * ld), cols * 2);
        f16_dot_group(w + i * ld, ld, cols, x, r1 - i < 4 ? (int)(r1 - i) : 4, y + i, NULL, NULL);
    }
}

/* y[0 .. k1 - k0) = outputs [k0, k1) of a quantized FFN's bypass x L: rows of L transposed (fp32, or fp16). */
static void bypass_l(const Ctx *c, const Layer *L, int64_t k0, int64_t k1, float *y) {
    const int64_t D = c->m->hidden;
    if (L->bypass_f16) f16_rows_dot(L->l_t, L->l_ld, D, c->h, k0, k1, y - k0);
    else caprese_f32_rows_dot(L->l_t, L->l_ld, D, c->h, NULL, k0, k1, y - k0);
}

/* The bypass rows [r0, r1) of a fused FFN chunk (stage_q_ffn) in one pass: four rows' z = x L (into z[0 ..)), then
 * their R rows added into out (overwritten). Row r of R follows row r of L^T (l_ld = down.ld = 2 hidden), so the
 * chunk reads one stream where L^T's and R's rows were two, each started cold (docs/performance.md). bypass_l's
 * and bypass_r's products in their order: the same bits as the two-phase path. */
static void bypass_rows(const Ctx *c, const Layer *L, int64_t r0, int64_t r1, float *z, float *out) {
    const int64_t D = c->m->hidden, ld = L->l_ld, es = L->bypass_f16 ? 2 : 4;
    const uint8_t *base = (const uint8_t *)L->l_t; /* row r of L^T at base + r ld es, of R at + D es */
    const int ahead = L->bypass_f16 ? F16_AHEAD : 4; /* rows, as bypass_l's */
    memset(out, 0, sizeof(float) * D);
    qg_prefetch(base + r0 * ld * es, (r1 - r0 < ahead ? r1 - r0 : ahead) * ld * es);
    for (int64_t i = r0; i < r1; i += 4) {
        const int nr = r1 - i < 4 ? (int)(r1 - i) : 4;
        /* The four rows `ahead` later are requested along the way, a few lines per step of the loops below: as
         * one burst per group they stalled the group's own loads (docs/performance.md, 2026-12-07 evening). */
        const int64_t pa = i + ahead;
        const uint8_t *pf = pa < r1 ? base + pa * ld * es : NULL;
        const uint8_t *pfe = pf ? base + (pa + 4 < r1 ? pa + 4 : r1) * ld * es : NULL;
        float *zi = z + (i - r0);
        if (L->bypass_f16) {
            const uint16_t *w = (const uint16_t *)L->l_t + i * ld;
#if !defined(__AVX512F__) && !(defined(__F16C__) && defined(__FMA__))
            if (pf) qg_prefetch(pf, pfe - pf); /* these builds' loops request nothing */
            pf = pfe = NULL;
#endif
            /* the dot's loop requests the first 8 D bytes of those rows, the add's loop the next 8 D */
            f16_dot_group(w, ld, D, c->h, nr, zi, pf, pfe);
            f16_add_rows(out, D, w + D, ld, zi, nr, pf ? pf + 8 * D : NULL, pfe);
            continue;
        }
        const float *w = (const float *)L->l_t + i * ld;
        if (pf) { /* a quarter (8 D of 32 D bytes) before the dot, the rest 24 bytes a column of the add's pieces */
            qg_prefetch(pf, 8 * D < pfe - pf ? 8 * D : pfe - pf);
            pf += 8 * D;
        }
        if (nr == 4) f32_dot_group(w, w + ld, w + 2 * ld, w + 3 * ld, c->h, D, 4, zi);
        else
            for (int r = 0; r < nr; r++) f32_dot_group(w + r * ld, NULL, NULL, NULL, c->h, D, 1, zi + r);
        const int64_t piece = pf ? 64 : TILE; /* columns: each its own element sums, so the bits of gemv_rows' tiles */
        for (int64_t c0 = 0; c0 < D; c0 += piece) {
            const int64_t wd = (c0 + piece < D ? c0 + piece : D) - c0;
            if (pf && pf < pfe) {
                qg_prefetch(pf, 24 * wd < pfe - pf ? 24 * wd : pfe - pf);
                pf += 24 * wd;
            }
            const float *p[4] = {w + D + c0, w + ld + D + c0, w + 2 * ld + D + c0, w + 3 * ld + D + c0};
            if (nr == 4) add_rows(out + c0, wd, zi, p, 4);
            else
                for (int r = 0; r < nr; r++) add_rows(out + c0, wd, zi + r, p + r, 1);
        }
    }
}

/* out[0 .. hidden) = sum over bypass rows r in [r0, r1) of zb[r] * R[r] (R fp32 or fp16): overwrites out. */
static void bypass_r(const Layer *L, const float *zb, int64_t r0, int64_t r1, float *out) {
    if (L->bypass_f16)
        gemv_rows_f16(zb, &L->down, r0, r1, out);
    else
        gemv_rows(zb, &L->down, NULL, r0, r1, out);
}

/* A quantized product's chunk: outputs [o0, o1) of the phase's job, each a whole row dot product (no partial
 * sums), into out[0 ..). */
static void stage_q_dot(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Model *m = c->m;
    const Layer *L = ph->layer >= 0 ? m->layers + ph->layer : NULL;
    int64_t o0, o1;
    chunk_span(ph, i, &o0, &o1);
    float *y = out - o0; /* the kernels write y[r] for r in [r0, r1) */
    switch (ph->job) {
    case J_QKV: q_dot(c, &L->q_qkv, c->h, NULL, o0, o1, y); break;
    case J_O: q_dot(c, &L->q_o, c->att, NULL, o0, o1, y); break;
    case J_DOWN: q_dot(c, &L->q_down, c->z, NULL, o0, o1, y); break;
    case J_HEAD: {
        q_dot(c, &m->q_lm_head, c->h, NULL, o0, o1, y);
        const float cap = m->final_softcap;
        if (cap > 0.0f)
            for (int64_t v = 0; v < o1 - o0; v++) out[v] = tanhf(out[v] / cap) * cap;
        break;
    }
    case J_GU: { /* outputs [gate n_ff | up n_ff | L rank]; CATS: [gate n_ff | L rank] (up rows in phase D) */
        const int64_t F = L->n_ff, nq = L->cats_tau ? F : 2 * F;
        const int64_t g1 = o1 < F ? o1 : F;
        if (g1 > o0) q_dot(c, &L->q_gate, c->h, NULL, o0, g1, y);
        const int64_t u0 = o0 > F ? o0 : F, u1 = o1 < nq ? o1 : nq;
        if (u1 > u0) q_dot(c, &L->q_up, c->h, NULL, u0 - F, u1 - F, y + F);
        const int64_t b0 = o0 > nq ? o0 : nq;
        if (o1 > b0) /* the bypass x L: its outputs [b0 - nq, o1 - nq) */
            bypass_l(c, L, b0 - nq, o1 - nq, out + (b0 - o0));
        break;
    }
    }
}

/* GRIFFIN's down rows over their coefficients zr[j] for rows [j0, j1) (rows-axpy into out): the product an
 * engine's arithmetic asks for (int8 activations: 16-bit or int8 coefficients, the quads layout where repacked;
 * else fp32). zr is defined on [j0, h_end): fp32 reads it ahead to skip zero rows; the others prefetch rows
 * up to h_end. */
static void griffin_down(const Ctx *c, const Layer *L, const float *zr, int64_t j0, int64_t j1, int64_t h_end,
                         float *out) {
    const int act = (int)c->m->int8_act;
    if (act && L->down_quads && caprese_qa_fits(&L->q_down)) /* j0: a multiple of 16 */
        caprese_q_rows_axpy_quads(&L->q_down, L->down_quads, act == 1, zr, j0, j1, h_end, out);
    else if (act == 2 && caprese_qa_fits(&L->q_down))
        caprese_q_rows_axpy_qa(&L->q_down, zr, NULL, j0, j1, h_end, out);
    else if (act == 1 && caprese_qa_fits(&L->q_down)) /* 16-bit coefficients (int8_activations.c) */
        caprese_q_rows_axpy_qw(&L->q_down, zr, NULL, j0, j1, h_end, out);
    else
        caprese_q_rows_axpy_ahead(&L->q_down, zr, j0, j1, h_end, out);
}

/* D, quantized down stored [n_ff, hidden] (GRIFFIN / CATS): neurons [j0, j1) of n_ff + rank, z from c->z
 * (gathered and activated by the leader), times their down rows (rows-axpy: a row whose z is 0 is not read):
 * a partial sum over the hidden outputs. CATS: the up row of each neuron that passed its threshold is read
 * first (z *= its up product), the others not at all. out[hidden] gets the count of bytes not read. */
static void stage_q_down(const Ctx *c, const Phase *ph, int64_t i, float *out, float *tmp) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int64_t D = m->hidden, F = L->n_ff;
    int64_t j0, j1, a1, b0;
    neuron_span(ph, i, F, &j0, &j1, &a1, &b0);
    const float *z = c->z;
    int64_t unread = 0;
    if (j1 > b0) /* the bypass rows of R: overwrites out */
        bypass_r(L, z + F, b0 - F, j1 - F, out);
    else
        memset(out, 0, sizeof(float) * D);
    if (a1 > j0) {
        if (L->cats_tau) {
            float *zc = tmp, *u = tmp + m->max_ff;
            int64_t *idx = (int64_t *)(u + m->max_ff), np = 0;
            for (int64_t j = j0; j < a1; j++) {
                zc[j - j0] = z[j];
                if (z[j] != 0.0f) idx[np++] = j;
            }
            q_dot(c, &L->q_up, c->h, idx, 0, np, u);
            for (int64_t t = 0; t < np; t++)
                zc[idx[t] - j0] *= u[t] + (L->up_bias ? L->up_bias[idx[t]] : 0.0f);
            const int64_t nz = (a1 - j0) - np;
            unread = nz * (qmat_row_bytes(&L->q_up) + qmat_row_bytes(&L->q_down));
            caprese_q_rows_axpy(&L->q_down, zc - j0, NULL, j0, a1, out);
        } else { /* GRIFFIN's rows */
            griffin_down(c, L, z, j0, a1, F, out);
        }
    }
    memcpy(out + D, &unread, sizeof unread);
}

/* z[0 .. j1 - j0) = act(gate) * up of neurons [j0, j1) of a quantized FFN on h (their gate and up rows, + bias); u:
 * scratch of as many floats. A chunk of an FFN phase (stage_q_ffn, stage_q_ffn_dense) needs nothing else of the
 * other chunks for it. */
static void gated_neurons(const Ctx *c, const Layer *L, int64_t j0, int64_t j1, float *z, float *u) {
    const int64_t F = L->n_ff;
    q_dot(c, &L->q_gate, c->h, NULL, j0, j1, z - j0);
    q_dot(c, &L->q_up, c->h, NULL, j0, j1, u - j0);
    if (L->gu_bias)
        for (int64_t j = j0; j < j1; j++) {
            z[j - j0] += L->gu_bias[j];
            u[j - j0] += L->gu_bias[F + j];
        }
    gated(c->m->activation, z, u, NULL, z, j1 - j0);
}

/* A GRIFFIN layer's FFN as ONE phase: its gate / up are whole rows per neuron, so a chunk of neurons needs nothing
 * from the others (one barrier and the leader's activation pass fewer per layer than gate/up, then down). Chunk i
 * = neurons [j0, j1) of k + rank (q_ffn_phase): kept neurons: their gate and up rows, z = act(gate) * up, then
 * their down rows; bypass neurons: z = x L (L's columns), then their R rows. out: a partial sum over the hidden
 * outputs, PH_QDOWN's bit for bit (the same products, activation and chunk spans). */
static void stage_q_ffn(const Ctx *c, const Phase *ph, int64_t i, float *out, float *tmp) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int64_t D = m->hidden, F = L->n_ff;
    int64_t j0, j1, a1, b0;
    neuron_span(ph, i, F, &j0, &j1, &a1, &b0);
    float *z = tmp, *u = tmp + (j1 - j0); /* z[j - j0] for the chunk's neurons */
    if (j1 > b0) { /* bypass neurons b0 - F .. j1 - F: x L, then their R rows (overwrites out) */
        bypass_rows(c, L, b0 - F, j1 - F, z + (b0 - j0), out);
    } else {
        memset(out, 0, sizeof(float) * D);
    }
    if (a1 > j0) {
        gated_neurons(c, L, j0, a1, z, u);
        /* fp32 reads coefficients ahead of the chunk: the next chunk's are not computed here (the int8 products
         * only request the rows up to h_end; griffin_down takes fp32 where they do not fit) */
        const int int8_down = m->int8_act && caprese_qa_fits(&L->q_down);
        griffin_down(c, L, z - j0, j0, a1, int8_down ? F : a1, out);
    }
    const int64_t unread = 0;
    memcpy(out + D, &unread, sizeof unread);
}

/* Neurons per chunk of a dense FFN as one phase (stage_q_ffn_dense): a multiple of every int8-activation block
 * (32, 64, 128), and not a function of the thread count, so the partial sums' bits are not either. Each chunk
 * costs its own streams and partial sum: SmolLM2's 1536 neurons in 2 chunks gave 0.96x the two phases' step (40
 * rounds), in 6 chunks of 256 1.03x (docs/performance.md). */
#define FFN_NEURONS 768

/* Whether dense layer L's FFN runs as one phase (stage_q_ffn_dense): int8 activations, no bypass and no CATS, down
 * stored [hidden, n_ff] in the r16 layout (its columns per neuron chunk: caprese_q_rows_dot_qx_cols), and a chunk
 * for each of the pool's threads (else some would idle through the phase; the two phases split by thread). */
static int q_ffn_dense_fits(const Ctx *c, const Layer *L) {
    const QMat *d = &L->q_down;
    return c->fused_ffn && c->m->int8_act && !L->down_rows && !L->cats_tau && L->rank == 0 &&
           d->layout == QG_R16 && caprese_qx_fits(d) && c->threads <= (L->n_ff + FFN_NEURONS - 1) / FFN_NEURONS;
}

/* A dense quantized FFN as ONE phase (q_ffn_dense_fits): chunk i = neurons [j0, j1) (FFN_NEURONS): their gate and up
 * rows, z = act(gate) * up rounded to int8 in down's blocks (those of the whole z: chunks hold whole blocks), then
 * down's columns [j0, j1): a partial sum over the hidden outputs. One phase and no serial activation pass a layer
 * fewer than gate/up, the leader's activation, then down. */
static void stage_q_ffn_dense(const Ctx *c, const Phase *ph, int64_t i, float *out, float *tmp) {
    const Layer *L = c->m->layers + ph->layer;
    int64_t j0, j1;
    chunk_span(ph, i, &j0, &j1);
    const int64_t n = j1 - j0;
    float *z = tmp, *u = tmp + n, *xqb = u + n;
    gated_neurons(c, L, j0, j1, z, u);
    QgX xq;
    qx_quantize_n(qx_block(&L->q_down), z, n, xqb, &xq);
    caprese_q_rows_dot_qx_cols(&L->q_down, &xq, j0, j1, 0, c->m->hidden, out);
}

/* C: rows [r0, r1) of the gate/up(/L) product: a partial sum over [gu1 cols | gu2 cols]. */
static void stage_gate_up(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Layer *L = c->m->layers + ph->layer;
    const int64_t r0 = i * ph->rows, r1 = r0 + ph->rows < c->m->hidden ? r0 + ph->rows : c->m->hidden;
    gemv_rows(c->h, &L->gu1, NULL, r0, r1, out);
    if (L->gu2.w) gemv_rows(c->h, &L->gu2, NULL, r0, r1, out + L->gu1.cols);
}

/* D (dense and GRIFFIN): neurons [j0, j1) of n_ff + rank: z = act(gate) * up (the bypass: x L), from phase C's
 * parts, times their down rows: a partial sum over the hidden outputs. */
static void stage_ffn_down(const Ctx *c, const Phase *ph, int64_t i, float *out, float *z) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int pg = ph->p ^ 1;
    const int64_t F = L->n_ff, n = F + L->rank, j0 = i * ph->rows, j1 = j0 + ph->rows < n ? j0 + ph->rows : n;
    const int64_t a1 = j1 < F ? j1 : F, b0 = j0 > F ? j0 : F;
    if (a1 > j0) { /* gate and up of the FFN's neurons */
        float *up = z + m->max_ff;
        sum_parts(c, pg, ph->prev_n, ph->prev_stride, j0, a1 - j0, L->gu_bias ? L->gu_bias + j0 : NULL, z + j0);
        sum_parts(c, pg, ph->prev_n, ph->prev_stride, F + j0, a1 - j0, L->gu_bias ? L->gu_bias + F + j0 : NULL, up);
        gated(m->activation, z + j0, up, NULL, z + j0, a1 - j0);
    }
    if (j1 > b0) /* bypass j: output F + j of [gate | up | L] */
        sum_parts(c, pg, ph->prev_n, ph->prev_stride, F + b0, j1 - b0, L->gu_bias ? L->gu_bias + F + b0 : NULL, z + b0);
    gemv_rows(z, &L->down, NULL, j0, j1, out);
}

/* D (CATS): neurons [j0, j1): the gate thresholded; the up row (transposed) and the down row read only for the
 * neurons that pass; the bypass rows as in stage_ffn_down. out[hidden] gets the count of bytes not read. */
static void stage_cats_down(const Ctx *c, const Phase *ph, int64_t i, float *out, float *z, int32_t *rows) {
    const Model *m = c->m;
    const Layer *L = m->layers + ph->layer;
    const int pg = ph->p ^ 1;
    const int64_t D = m->hidden, F = L->n_ff, n = F + L->rank, j0 = i * ph->rows;
    const int64_t j1 = j0 + ph->rows < n ? j0 + ph->rows : n, a1 = j1 < F ? j1 : F, b0 = j0 > F ? j0 : F;
    const float *restrict h = c->h; /* a local pointer: read through c inside the simd loop, GCC gathers */
    int64_t nrows = 0;
    if (a1 > j0) { /* gu1 is [gate F | L rank]: the gate of neuron j is output j */
        sum_parts(c, pg, ph->prev_n, ph->prev_stride, j0, a1 - j0, L->gu_bias ? L->gu_bias + j0 : NULL, z + j0);
        gated(m->activation, z + j0, NULL, L->cats_tau, z + j0, a1 - j0);
    }
    for (int64_t j = j0; j < a1; j++) {
        if (z[j] == 0.0f) continue;
        const float *w = L->up_t.w + j * L->up_t.ld;
        float u = L->up_bias ? L->up_bias[j] : 0.0f;
#pragma omp simd reduction(+ : u)
        for (int64_t k = 0; k < D; k++) u += w[k] * h[k];
        z[j] *= u;
        rows[nrows++] = (int32_t)j;
    }
    const int64_t unread = 2 * ((a1 > j0 ? a1 - j0 : 0) - nrows) * D * (int64_t)sizeof(float);
    if (j1 > b0) sum_parts(c, pg, ph->prev_n, ph->prev_stride, b0, j1 - b0, NULL, z + b0); /* bypass j: output j */
    for (int64_t j = b0; j < j1; j++) rows[nrows++] = (int32_t)j;
    gemv_rows(z, &L->down, rows, 0, nrows, out);
    memcpy(out + D, &unread, sizeof unread);
}

/* H, full head: logits of rows [v0, v1) (soft-capped). */
static void stage_head_full(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Model *m = c->m;
    const int64_t D = m->hidden, v0 = i * ph->rows, v1 = v0 + ph->rows < m->vocab ? v0 + ph->rows : m->vocab;
    float d[4];
    int64_t v = v0;
    for (; v + 4 <= v1; v += 4) {
        const float *w0 = m->lm_head + v * D;
        dot4_f32(w0, w0 + D, w0 + 2 * D, w0 + 3 * D, c->h, D, d);
        for (int k = 0; k < 4; k++) out[v - v0 + k] = d[k];
    }
    for (; v < v1; v++) {
        const float *w = m->lm_head + v * D;
        dot4_f32(w, w, w, w, c->h, D, d);
        out[v - v0] = d[0];
    }
    const float cap = m->final_softcap;
    if (cap > 0.0f)
        for (v = 0; v < v1 - v0; v++) out[v] = tanhf(out[v] / cap) * cap;
}

/* H, screened head, pass 1: a[v] = scale[v] * (q[v] . h) for rows [v0, v1) into out[0 ..), and the k largest
 * lower bounds a[v] - |h| bound[v] of these rows into out[rows ..] (-inf where fewer). */
static void stage_head_screen(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Model *m = c->m;
    const int64_t D = m->hidden, v0 = i * ph->rows, v1 = v0 + ph->rows < m->vocab ? v0 + ph->rows : m->vocab;
    const int64_t k = ph->topk;
    const float *restrict h = c->h;
    float *heap = out + ph->rows, d[4];
    for (int64_t j = 0; j < k; j++) heap[j] = -INFINITY;
    for (int64_t v = v0; v < v1; v += 4) {
        const int64_t k_n = v1 - v < 4 ? v1 - v : 4;
        if (k_n == 4) {
            dot4_i8(m->head_q + v * D, h, D, d);
        } else { /* the last rows, one at a time */
            for (int64_t r = 0; r < k_n; r++) {
                const int8_t *q = m->head_q + (v + r) * D;
                float t = 0.0f;
                for (int64_t j = 0; j < D; j++) t += (float)q[j] * h[j];
                d[r] = t;
            }
        }
        for (int64_t r = 0; r < k_n; r++) {
            const float a = m->head_scale[v + r] * d[r];
            out[v + r - v0] = a;
            heap_offer(heap, k, a - ph->hn * m->head_bound[v + r]);
        }
    }
}

/* H, screened head, pass 2: rows [v0, v1) whose upper bound reaches the floor get their exact logit, the others
 * -inf; out[rows ..] = the best logit, its row, how many rows were recomputed. */
static void stage_head_pick(const Ctx *c, const Phase *ph, int64_t i, float *out) {
    const Model *m = c->m;
    const int64_t v0 = i * ph->rows, v1 = v0 + ph->rows < m->vocab ? v0 + ph->rows : m->vocab;
    const float *a = result(c, ph->p ^ 1, i, ph->prev_stride);
    float best = -INFINITY;
    int64_t arg = -1, cand = 0;
    for (int64_t v = v0; v < v1; v++) {
        if (!(a[v - v0] + ph->hn * m->head_bound[v] >= ph->floor_)) {
            out[v - v0] = -INFINITY;
            continue;
        }
        const float d = head_row(m, c->h, v);
        out[v - v0] = d;
        cand++;
        if (d > best) { best = d; arg = v; }
    }
    out[ph->rows] = best;
    memcpy(out + ph->rows + 1, &arg, sizeof arg);
    memcpy(out + ph->rows + 3, &cand, sizeof cand);
}

/* ------------------------------------------------------------------ running chunks */
static void run_chunk(Ctx *c, const Phase *ph, int64_t i, float *out, int tid) {
    float *tmp = c->tmp[tid];
    chunk_parity = ph->p;
    switch (ph->kind) {
    case PH_QKV: stage_qkv(c, ph, i, out); break;
    case PH_ATTN: stage_attention(c, ph, i, out, tmp); break;
    case PH_GATE_UP: stage_gate_up(c, ph, i, out); break;
    case PH_DOWN:
        if (c->m->layers[ph->layer].up_t.w)
            stage_cats_down(c, ph, i, out, tmp, (int32_t *)(tmp + 2 * c->m->max_ff));
        else
            stage_ffn_down(c, ph, i, out, tmp);
        break;
    case PH_HEAD_FULL: stage_head_full(c, ph, i, out); break;
    case PH_HEAD_SCREEN: stage_head_screen(c, ph, i, out); break;
    case PH_HEAD_PICK: stage_head_pick(c, ph, i, out); break;
    case PH_QDOT: stage_q_dot(c, ph, i, out); break;
    case PH_QATT: stage_q_attention(c, ph, i, out, tmp); break;
    case PH_QDOWN: stage_q_down(c, ph, i, out, tmp); break;
    case PH_QFFN: stage_q_ffn(c, ph, i, out, tmp); break;
    case PH_QFFN_DENSE: stage_q_ffn_dense(c, ph, i, out, tmp); break;
    }
}

/* Run chunk i of phase epoch e (copied into *ph) and commit it unless someone committed it first.
 * 1 = this thread's result was committed. */
static int execute(Ctx *c, const Phase *ph, uint64_t e, int64_t i, int tid) {
    const int p = (int)(e & 1);
    Slot *sl = &c->slots[p][i];
    Worker *w = &c->workers[tid];
    const int64_t t0 = now_ns();
    atomic_store_explicit(&sl->started, t0, memory_order_relaxed);
    if (w->stall_every && ++w->stall_count % w->stall_every == 0)
        usleep((useconds_t)w->stall_us); /* tests: a thread descheduled in the middle of a chunk */
    run_chunk(c, ph, i, c->res[tid][p] + i * ph->stride, tid);
    uint64_t s = atomic_load_explicit(&sl->state, memory_order_acquire);
    int won = 0;
    while (!settled(s, e) && !(won = atomic_compare_exchange_weak_explicit(
               &sl->state, &s, e << 8 | 0x80 | (uint64_t)tid, memory_order_acq_rel, memory_order_acquire))) {}
    const int64_t d = now_ns() - t0;
    if (tid == 0) { /* the typical chunk time: a preempted run (over 4x) only nudges it */
        int64_t *ema = &c->ema_ns[ph->kind];
        *ema = !*ema ? d : d > 4 * *ema ? *ema + *ema / 8 : (7 * *ema + d) / 8;
    }
    *(won ? &w->committed : &w->dropped) += 1;
    return won;
}

/* Each thread's share of a phase is a range of chunks [lo, hi), packed with the low 24 bits of the epoch into
 * one word: its owner takes chunks from the front, a thread that ran out takes them from the back of another's.
 * With threads of equal speed each streams its own contiguous stretch of the matrices (no chunk changes hands);
 * a slow or absent thread's chunks go to the others one at a time. */
#define EPOCH_BITS 0xffffffull
static inline uint64_t pack(uint64_t e, uint64_t lo, uint64_t hi) { return (e & EPOCH_BITS) << 40 | lo << 20 | hi; }

/* The next chunk of epoch e for thread tid (its own first, else another's last), or -1. */
static int64_t claim(Ctx *c, uint64_t e, int tid) {
    for (int k = 0; k < c->threads; k++) {
        const int v = (tid + k) % c->threads;
        _Atomic uint64_t *r = &c->range[v].w;
        uint64_t x = atomic_load_explicit(r, memory_order_acquire);
        for (;;) {
            const uint64_t lo = (x >> 20) & 0xfffff, hi = x & 0xfffff;
            if ((x >> 40) != (e & EPOCH_BITS) || lo >= hi) break;
            const uint64_t y = k == 0 ? pack(e, lo + 1, hi) : pack(e, lo, hi - 1);
            if (atomic_compare_exchange_weak_explicit(r, &x, y, memory_order_acq_rel, memory_order_acquire))
                return (int64_t)(k == 0 ? lo : hi - 1);
        }
    }
    return -1;
}

/* Claim and run chunks of phase epoch e until none is left or the phase has moved on. */
static void claim_loop(Ctx *c, uint64_t e, int tid) {
    const Phase ph = c->phase[e & 1]; /* a copy: valid if a claim below succeeds at epoch e */
    for (int64_t i; (i = claim(c, e, tid)) >= 0;) {
        count_run(&c->slots[e & 1][i], e, 0);
        execute(c, &ph, e, i, tid);
    }
}

/* Run again every chunk of epoch e (helpers: while fewer than 3 runs started) whose execution has run for longer
 * than twice the usual chunk time: its thread is probably descheduled. Helpers pass once over the chunks; the
 * leader, which waits for each chunk, may always run it (else, with more threads than CPUs and every runner
 * descheduled, it would spin on a CPU they need). */
static int rerun_if_late(Ctx *c, const Phase *ph, uint64_t e, int64_t i, int tid) {
    Slot *sl = &c->slots[e & 1][i];
    const int64_t wait = 2 * c->ema_ns[ph->kind] + 20000;
    const int64_t started = atomic_load_explicit(&sl->started, memory_order_relaxed);
    if (now_ns() - (started > ph->t0 ? started : ph->t0) > wait && count_run(sl, e, tid == 0 ? 0 : 3)) {
        c->workers[tid].reruns++;
        execute(c, ph, e, i, tid);
        return 1;
    }
    return 0;
}

static void backup_loop(Ctx *c, uint64_t e, int tid) {
    const Phase ph = c->phase[e & 1];
    /* the copy is phase e's only if e is still the epoch after it: the leader rewrites phase[e & 1] (for e + 2)
     * only after it has published e + 1 (a seqlock's check; claim_loop's copy is checked by its claims instead) */
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&c->epoch, memory_order_relaxed) != e) return;
    for (int64_t i = 0; i < ph.n_chunks; i++)
        if (!settled(atomic_load_explicit(&c->slots[e & 1][i].state, memory_order_acquire), e))
            rerun_if_late(c, &ph, e, i, tid);
}

/* What the leader does with each committed chunk, in chunk order, as soon as it is committed: while it waits
 * for the last chunks of other threads, the parts of the first ones are already added up. */
typedef void (*Reduce)(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg);

/* Leader: wait for every chunk of epoch e in order (running late ones again) and reduce each. */
static void await_all(Ctx *c, uint64_t e, Reduce reduce, void *arg) {
    const Phase *ph = &c->phase[e & 1];
    for (int64_t i = 0; i < ph->n_chunks; i++) {
        Slot *sl = &c->slots[e & 1][i];
        while (!settled(atomic_load_explicit(&sl->state, memory_order_acquire), e))
            if (!rerun_if_late(c, ph, e, i, 0)) cpu_relax();
        if (reduce) reduce(c, ph, i, result(c, ph->p, i, ph->stride), arg);
    }
}

/* Helpers spin this long for the next phase before they sleep on a futex (a step's next phase comes within
 * microseconds, the next step within ~0.1 ms of Python); with more threads than CPUs to run them, a spinning
 * helper takes a CPU from a thread with work, so they sleep almost at once. */
#define SPIN_NS 200000
#define SPIN_NS_OVERSUBSCRIBED 2000

static void *helper_main(void *arg) {
    Worker *w = arg;
    Ctx *c = w->c;
    uint64_t seen = 0;
    while (!atomic_load(&c->shutdown)) {
        const uint32_t fw = atomic_load(&c->futex_word);
        const uint64_t e = atomic_load_explicit(&c->epoch, memory_order_acquire);
        const int active = w->tid < atomic_load_explicit(&c->active, memory_order_relaxed);
        if (e != seen && active) { /* a new phase (or a later one: the ones missed are done) */
            seen = e;
            atomic_fetch_add(&c->busy, 1);
            claim_loop(c, e, w->tid);
            backup_loop(c, e, w->tid);
            atomic_fetch_sub(&c->busy, 1);
            continue;
        }
        if (active) { /* spin a little: the next phase usually comes within microseconds */
            const int64_t t0 = now_ns();
            int spins = 0;
            while (atomic_load_explicit(&c->epoch, memory_order_acquire) == seen && !atomic_load(&c->shutdown) &&
                   (++spins < 64 || now_ns() - t0 < c->spin_ns))
                cpu_relax();
            if (atomic_load_explicit(&c->epoch, memory_order_acquire) != seen) continue;
        }
        atomic_fetch_add(&c->sleepers, 1);
        if (atomic_load(&c->epoch) == e && !atomic_load(&c->shutdown)) futex_wait(&c->futex_word, fw);
        atomic_fetch_sub(&c->sleepers, 1);
        seen = active ? seen : e;
    }
    return NULL;
}

/* Leader: make this core the owner of the lines of [p, p + n) by writing back the bytes they hold, so that its
 * next writes there do not each wait for another core's copy to be invalidated. A prefetchw does not do this: the
 * leader still holds these lines (shared since a helper read them), and a prefetch that hits does nothing. Safe
 * at any time: the same bytes, and only the leader writes these buffers. */
static void own_lines(const void *p, int64_t n) {
    volatile char *b = (volatile char *)((uintptr_t)p & ~(uintptr_t)63);
    for (; (const char *)b < (const char *)p + n; b += 64) *b = *b;
}

/* Leader, as it publishes phase ph (parity p): own the buffers it writes after this phase that helpers read
 * before it: the next product's int8 x (written before the next phase; read in the one before this), the QKV
 * outputs (written as this QKV phase's chunks are reduced; read by the last attention phase) and h (written
 * after the o product; read by the last FFN's chunks). On two vCPUs on different CCDs each such write waited
 * ~0.4 us for the other core: quantizing x took 0.72-0.92 us there against 0.29 near (docs/performance.md). */
static void own_next_inputs(Ctx *c, const Phase *ph, int p) {
    const XqSlot *nx = &c->xqs[p ^ 1];
    own_lines(nx, offsetof(XqSlot, xb)); /* its first line: q and src */
    if (nx->q.cols) own_lines(nx->buf, caprese_qx_bytes(nx->q.cols));
    const Model *m = c->m;
    if (ph->kind == PH_QDOT && ph->job == J_QKV) {
        own_lines(c->qkv, sizeof(float) * (m->num_heads + 2 * m->num_kv_heads) * m->head_dim);
        const Layer *L = m->layers + ph->layer; /* the new K / V rows (stage_kv_write): lines no core holds */
        for (int64_t kv = 0; kv < m->num_kv_heads; kv++)
            for (int64_t j = 0; j < m->head_dim; j += 64 / KV_BYTES(m->kv_f16)) { /* a line at a time */
                __builtin_prefetch(KV_AT(L->k_cache, (kv * m->capacity + ph->slot) * m->head_dim + j, m->kv_f16), 1, 3);
                __builtin_prefetch(KV_AT(L->v_cache, (kv * m->capacity + ph->slot) * m->head_dim + j, m->kv_f16), 1, 3);
            }
    }
    if (ph->kind == PH_QDOT && ph->job == J_O) own_lines(c->h, sizeof(float) * m->hidden);
}

/* The act working threads' first ranges of ph's chunks: thread k's [b[k], b[k + 1]), by chunk count, or where the
 * phase's chunks read unequal bytes (ph->cost), by bytes. The caller's range is the larger one either way: helpers
 * join a little later. GRIFFIN's FFN phase by count gave the leader ~2x the helper's bytes (its bypass chunks read
 * ~60% of a neuron chunk's), which the helper then stole a chunk at a time. */
static void phase_ranges(const Phase *ph, int act, int64_t *b) {
    const int64_t n = ph->n_chunks;
    for (int k = 0; k <= act; k++) b[k] = n - n * (act - k) / act;
    if (!ph->split || !ph->cost || act < 2) return;
    const int64_t total = ph->split * ph->cost + (ph->n - ph->split) * ph->cost2; /* the chunks cover [0, n) */
    int64_t at = 0, k = 1;
    for (int64_t i = 0; i < n && k < act; i++) { /* b[k]: the first chunk starting at or past k / act of the bytes */
        int64_t r0, r1;
        chunk_span(ph, i, &r0, &r1);
        at += (r1 - r0) * (r0 < ph->split ? ph->cost : ph->cost2);
        while (k < act && at * act >= total * k) b[k++] = i + 1;
    }
}

/* Leader: publish phase *ph as the next epoch, work on it, and return once every chunk is committed and reduced. */
static uint64_t run_phase(Ctx *c, const Phase *ph, Reduce reduce, void *arg) {
    const uint64_t e = atomic_load_explicit(&c->epoch, memory_order_relaxed) + 1;
    const int p = (int)(e & 1);
    const int64_t t = now_ns();
    c->phase[p] = *ph;
    c->phase[p].p = p;
    c->phase[p].prev_n = c->phase[p ^ 1].n_chunks;
    c->phase[p].prev_stride = c->phase[p ^ 1].stride;
    c->phase[p].t0 = t;
    const int act = atomic_load_explicit(&c->active, memory_order_relaxed);
    int64_t b[MAX_THREADS + 1];
    phase_ranges(ph, act, b);
    for (int k = 0; k < c->threads; k++) {
        const int64_t lo = k < act ? b[k] : 0, hi = k < act ? b[k + 1] : 0;
        atomic_store_explicit(&c->range[k].w, pack(e, (uint64_t)lo, (uint64_t)hi), memory_order_release);
    }
    atomic_store_explicit(&c->epoch, e, memory_order_release);
    if (atomic_load_explicit(&c->active, memory_order_relaxed) > 1) {
        atomic_store(&c->futex_word, (uint32_t)e);
        if (atomic_load(&c->sleepers) > 0) futex_wake_all(&c->futex_word);
    }
    own_next_inputs(c, ph, p);
    claim_loop(c, e, 0);
    const int64_t t2 = now_ns();
    await_all(c, e, reduce, arg);
    const int64_t t3 = now_ns();
    c->ns_wait += t3 - t2;
    c->n_phases++;
    const int lab = ph->kind == PH_QDOT ? PH_KINDS + ph->job : ph->kind;
    c->prof_ns[lab] += t3 - t;
    c->prof_n[lab]++;
    return e;
}

static Phase phase_of(int kind, int64_t layer, int64_t n, int64_t rows, int64_t stride, int64_t slot) {
    Phase ph = {kind, 0, layer, (n + rows - 1) / rows, rows, stride, 0, 0, slot, 0, 0.0f, 0.0f, 0, n, 0, 0, 0};
    return ph;
}

/* Reducers. A sum over the chunks of r[off:off + n] (+ bias), into out; unread: CATS' skipped bytes at r[at]. */
typedef struct { int64_t off, n; const float *bias; float *out; int64_t at, *unread; } Sum;

static void reduce_sum(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    (void)c; (void)ph;
    const Sum *a = arg;
    const float *src = r + a->off;
    if (i == 0) {
#pragma omp simd
        for (int64_t j = 0; j < a->n; j++) a->out[j] = src[j] + (a->bias ? a->bias[j] : 0.0f);
    } else {
#pragma omp simd
        for (int64_t j = 0; j < a->n; j++) a->out[j] += src[j];
    }
    if (a->unread) {
        int64_t u;
        memcpy(&u, r + a->at, sizeof u);
        *a->unread += u;
    }
}

/* Chunks of a phase of whole outputs (PH_QDOT, PH_QATT: ph->stride outputs per chunk): copied to dst (+ bias). */
typedef struct { float *dst; const float *bias; } Cat;

static void reduce_cat(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    (void)c;
    const Cat *a = arg;
    int64_t o0, o1;
    chunk_span(ph, i, &o0, &o1);
    const int64_t n = o1 - o0;
    float *dst = a->dst + o0;
    if (a->bias) {
#pragma omp simd
        for (int64_t j = 0; j < n; j++) dst[j] = r[j] + a->bias[o0 + j];
    } else {
        memcpy(dst, r, sizeof(float) * n);
    }
}

/* reduce_cat, and the running argmax of what it copied (a quantized head's greedy step): chunks come in order,
 * so the first of equal maxima wins. */
typedef struct { Cat cat; float best; int64_t arg; } CatMax;

static void reduce_cat_argmax(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    CatMax *a = arg;
    reduce_cat(c, ph, i, r, &a->cat);
    int64_t o0, o1;
    chunk_span(ph, i, &o0, &o1);
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < o1 - o0; j++) m = r[j] > m ? r[j] : m;
    if (m > a->best)
        for (int64_t j = 0; j < o1 - o0; j++)
            if (r[j] == m) {
                a->best = m;
                a->arg = o0 + j;
                break;
            }
}

/* Quantized attention chunks (stage_q_attention): each query head's parts, in slot order, merged by their maxima
 * into c->att (m and l of the parts so far in c->t), divided by the total sum after the last part. */
static void reduce_attention(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    (void)arg;
    const Model *m = c->m;
    const int64_t hd = m->head_dim, g = m->num_heads / m->num_kv_heads, S = ph->n / m->num_kv_heads;
    const int64_t part = i % S, h0 = i / S * g;
    for (int64_t k = 0; k < g; k++) {
        const float *rk = r + k * (hd + 2);
        float *o = c->att + (h0 + k) * hd, *ml = c->t + 2 * (h0 + k);
        if (part == 0) {
            memcpy(o, rk, sizeof(float) * hd);
            ml[0] = rk[hd];
            ml[1] = rk[hd + 1];
        } else {
            const float nm = rk[hd] > ml[0] ? rk[hd] : ml[0], a = expf(ml[0] - nm), b = expf(rk[hd] - nm);
#pragma omp simd
            for (int64_t j = 0; j < hd; j++) o[j] = o[j] * a + rk[j] * b;
            ml[0] = nm;
            ml[1] = ml[1] * a + rk[hd + 1] * b;
        }
        if (part == S - 1) {
            const float inv = 1.0f / ml[1];
            for (int64_t j = 0; j < hd; j++) o[j] *= inv;
            if (m->kv_f16) round_f16(o, hd); /* ONNX Runtime's fp16 attention output (Model.kv_f16) */
        }
    }
}

/* Head chunks: their logits into m->logits. */
static void reduce_logits(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    (void)arg;
    const int64_t v0 = i * ph->rows, n = v0 + ph->rows < c->m->vocab ? ph->rows : c->m->vocab - v0;
    memcpy(c->m->logits + v0, r, sizeof(float) * n);
}

/* Screened head, pass 1: each chunk's k largest lower bounds into c->sel. */
static void reduce_bounds(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    (void)arg;
    memcpy(c->sel + i * ph->topk, r + ph->rows, sizeof(float) * ph->topk);
}

typedef struct { float best; int64_t arg, cand; } Pick;

/* Screened head, pass 2: the logits, and the best row (in vocabulary order: the first of equal maxima wins). */
static void reduce_pick(Ctx *c, const Phase *ph, int64_t i, const float *r, void *arg) {
    Pick *a = arg;
    int64_t v, nc;
    memcpy(&v, r + ph->rows + 1, sizeof v);
    memcpy(&nc, r + ph->rows + 3, sizeof nc);
    a->cand += nc;
    if (v >= 0 && (a->arg < 0 || r[ph->rows] > a->best)) { a->best = r[ph->rows]; a->arg = v; }
    reduce_logits(c, ph, i, r, NULL);
}

static int64_t wide_rows(int64_t hidden) { return (hidden + CHUNKS_WIDE - 1) / CHUNKS_WIDE; }

/* Outputs per chunk of a quantized product of n outputs (whole rows, so any split gives the same bits): one chunk
 * per running thread, in whole groups of 16 rows (the r16 layout's). Each chunk costs a claim, a commit and its
 * results' trip to the leader, and a thread's rows streamed as one run start once. Measured on 2 vCPUs against 8
 * chunks (docs/performance.md, two 40-round A/Bs): dense 0.90x / 0.95x the step's time, GRIFFIN 0.95x / 0.97x
 * (0.93x in the far rounds of both), next to 1 or 2 busy processes within noise (0.92-1.03x); 4 chunks gave
 * 0.97-0.98x, 16 chunks 1.02-1.03x. A descheduled thread's chunk is still run again by the others after twice the
 * usual chunk time (rerun_if_late). */
static int64_t q_rows(int64_t n, int64_t parts) {
    const int64_t r = ((n + parts - 1) / parts + 15) & ~(int64_t)15;
    return r < 16 ? 16 : r;
}

/* The threads a step's quantized products are split over now. */
static int64_t q_parts(const Ctx *c) { return atomic_load_explicit(&c->active, memory_order_relaxed); }

/* Slot parts of a quantized attention phase: at least ATT_PARTS chunks (KV heads x parts) where each part keeps 32
 * slots or more. Not a function of the thread count: a step's result does not depend on it. */
#define ATT_PARTS 4
static int64_t att_parts(const Model *m, int64_t slots) {
    int64_t s = (ATT_PARTS + m->num_kv_heads - 1) / m->num_kv_heads;
    if (s > slots / 32) s = slots / 32;
    return s < 1 ? 1 : s;
}

static int64_t down_rows(int64_t hidden) { /* a multiple of 16 in [16, 512] */
    const int64_t r = DOWN_BYTES / hidden;
    return r < 16 ? 16 : r > 512 ? 512 : r & ~(int64_t)15;
}

/* ph extended by the bypass's `rank` rows (L's columns, R's rows), rows2 per chunk (chunk_span). */
static Phase with_bypass(Phase ph, int64_t rank, int64_t rows2) {
    if (rank) {
        ph.split = ph.n;
        ph.n += rank;
        ph.rows2 = rows2;
        ph.n_chunks += (rank + rows2 - 1) / rows2;
    }
    return ph;
}

/* A quantized FFN's gate/up(/L) phase: whole outputs [gate | up | L] (CATS: [gate | L]), `parts` chunks of
 * quantized rows, then L's columns in chunks of as many bytes (a multiple of 64 bytes of each row: whole cache
 * lines, or two chunks would read every line). */
static Phase gu_phase(const Model *m, const Layer *L, int64_t li, int64_t parts) {
    const int64_t nq = L->cats_tau ? L->n_ff : 2 * L->n_ff, rows = q_rows(nq, parts), es = L->bypass_f16 ? 2 : 4;
    int64_t cols = rows * qmat_row_bytes(&L->q_gate) / (es * m->hidden) & ~(64 / es - 1);
    cols = cols < 64 / es ? 64 / es : cols;
    Phase g = phase_of(PH_QDOT, li, nq, rows, rows > cols ? rows : cols, 0);
    g.job = J_GU;
    return with_bypass(g, L->rank, cols);
}

/* A quantized FFN's down phase with down stored [n_ff, hidden] (rows-axpy partial sums over neuron chunks):
 * down_rows quantized rows per chunk, then R's fp32 rows in chunks of as many bytes. */
static Phase q_down_phase(const Model *m, const Layer *L, int64_t li) {
    const int64_t D = m->hidden, F = L->n_ff, rows = down_rows(D);
    int64_t r2 = rows * qmat_row_bytes(&L->q_down) / ((L->bypass_f16 ? 2 : 4) * D) & ~(int64_t)3;
    r2 = r2 < 4 ? 4 : r2;
    return with_bypass(phase_of(PH_QDOWN, li, F, rows, D + 2, 0), L->rank, r2);
}

/* GRIFFIN's FFN as one phase (stage_q_ffn): the down phase's chunks, so the partial sums are the two-phase
 * path's bit for bit (smaller chunks, 64 kept neurons, ran slower: more chunks to claim; measured); the threads'
 * first ranges split its bytes (phase_ranges). */
static Phase q_ffn_phase(const Model *m, const Layer *L, int64_t li) {
    Phase ph = q_down_phase(m, L, li);
    ph.kind = PH_QFFN;
    ph.cost = qmat_row_bytes(&L->q_gate) + qmat_row_bytes(&L->q_up) + qmat_row_bytes(&L->q_down); /* a kept neuron */
    ph.cost2 = 2 * (L->bypass_f16 ? 2 : 4) * m->hidden; /* a bypass neuron: its L^T and R rows */
    return ph;
}

/* What this model's phases need of a context, in one pass over its layers: the floats of one result area (the
 * largest phase, chunks x floats per chunk), returned, and the most chunks a phase has (the slots), in *chunks. */
static int64_t phase_bounds(const Model *m, int64_t threads, int64_t *chunks) {
    const int64_t D = m->hidden, nqkv = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    const int64_t hc = (m->vocab + HEAD_ROWS - 1) / HEAD_ROWS, dr = down_rows(D);
    int64_t most = CHUNKS_WIDE * nqkv, n = hc > CHUNKS_WIDE ? hc : CHUNKS_WIDE;
    if (m->num_heads * D > most) most = m->num_heads * D;
    if (hc * (HEAD_ROWS + HEAD_TOPK_MAX) > most) most = hc * (HEAD_ROWS + HEAD_TOPK_MAX);
    const int64_t qmost = 2 * m->max_ff + 16 * threads; /* quantized products: whole outputs, chunks of q_rows */
    if (qmost > most) most = qmost;
    if (nqkv + 16 * threads > most) most = nqkv + 16 * threads;
    if (D + 16 * threads > most) most = D + 16 * threads;
    if (ATT_PARTS * m->num_heads * (m->head_dim + 2) > most) most = ATT_PARTS * m->num_heads * (m->head_dim + 2);
    if (m->num_heads > n) n = m->num_heads;
    if (ATT_PARTS * m->num_kv_heads > n) n = ATT_PARTS * m->num_kv_heads;
    if (threads > n) n = threads;
    if ((m->max_ff + dr - 1) / dr > n) n = (m->max_ff + dr - 1) / dr;
    const int64_t fc = (m->max_ff + FFN_NEURONS - 1) / FFN_NEURONS; /* PH_QFFN_DENSE */
    if (fc > n) n = fc;
    if (fc * D > most) most = fc * D;
    for (int64_t li = 0; li < m->num_layers; li++) {
        const Layer *L = m->layers + li;
        const int64_t gu = L->gu1.cols + (L->gu2.w ? L->gu2.cols : 0), dc = (L->n_ff + L->rank + dr - 1) / dr;
        if (CHUNKS_WIDE * gu > most) most = CHUNKS_WIDE * gu;
        if (dc * (D + 2) > most) most = dc * (D + 2);
        if (L->q_ffn) {
            const Phase d = q_down_phase(m, L, li), f = q_ffn_phase(m, L, li);
            for (int64_t parts = 1; parts <= threads; parts++) { /* whichever number of threads runs */
                const Phase g = gu_phase(m, L, li, parts);
                if (g.n_chunks * g.stride > most) most = g.n_chunks * g.stride;
                if (g.n_chunks > n) n = g.n_chunks;
            }
            if (d.n_chunks * d.stride > most) most = d.n_chunks * d.stride;
            if (f.n_chunks * f.stride > most) most = f.n_chunks * f.stride;
            if (d.n_chunks > n) n = d.n_chunks;
            if (f.n_chunks > n) n = f.n_chunks;
        }
    }
    *chunks = n;
    return most;
}

/* The model's layers fit the context's buffers (the shapes it was created for). */
static int fits(const Ctx *c) {
    const Model *m = c->m;
    int64_t chunks;
    if (phase_bounds(m, c->threads, &chunks) > c->res_floats || chunks > c->max_chunks) return 0;
    for (int64_t li = 0; li < m->num_layers; li++) {
        const Layer *L = m->layers + li;
        if (L->n_ff + L->rank > m->max_ff || L->gu1.cols + (L->gu2.w ? L->gu2.cols : 0) > 2 * m->max_ff) return 0;
    }
    return 1;
}

void caprese_context_free(Ctx *c) {
    if (!c) return;
    atomic_store(&c->shutdown, 1);
    atomic_fetch_add(&c->futex_word, 1);
    futex_wake_all(&c->futex_word);
    for (int t = 1; t < c->threads; t++)
        if (c->workers[t].c) pthread_join(c->workers[t].th, NULL);
    for (int t = 0; t < c->threads; t++) {
        free(c->res[t][0]); free(c->res[t][1]); free(c->tmp[t]);
    }
    free(c->slots[0]); free(c->slots[1]);
    free(c->x); free(c->h); free(c->y); free(c->t); free(c->kv); free(c->sel);
    free(c->qkv); free(c->att); free(c->gu); free(c->z); free(c->xqs[0].buf); free(c->xqs[1].buf);
    free(c);
}

/* A context for model m with `threads` threads (the caller's + threads - 1 helpers started now): every buffer a
 * step needs is allocated here, once. NULL: out of memory, or threads could not be started. */
Ctx *caprese_context_new(const Model *m, int64_t threads) {
    if (threads < 1 || threads > MAX_THREADS) return NULL;
    Ctx *c = aligned_alloc(64, (sizeof(Ctx) + 63) / 64 * 64); /* its atomics sit on their own cache lines */
    if (!c) return NULL;
    memset(c, 0, sizeof(Ctx));
    c->m = m;
    c->threads = (int)threads;
    cpu_set_t cpus;
    const int ncpu = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : (int)threads;
    c->spin_ns = threads > ncpu ? SPIN_NS_OVERSUBSCRIBED : SPIN_NS;
    c->fused_ffn = 1;
    atomic_store(&c->active, (int)threads);
    int64_t chunks;
    c->res_floats = phase_bounds(m, threads, &chunks);
    c->max_chunks = chunks;
    const int64_t D = m->hidden, hc = (m->vocab + HEAD_ROWS - 1) / HEAD_ROWS;
    /* per thread: z and up of a down chunk + CATS' row list (max_ff each), or q, o and a block of scores */
    /* quantized CATS: z, up, int64 rows; quantized attention: q and scores of a KV head's query heads */
    const int64_t g = m->num_heads / m->num_kv_heads;
    c->tmp_floats = 4 * m->max_ff + 2 * m->head_dim + ATT_BLOCK + 16 + g * (m->head_dim + ATT_BLOCK);
    const int64_t ffn = 2 * FFN_NEURONS + caprese_qx_bytes(FFN_NEURONS) / 4 + 1; /* stage_q_ffn_dense */
    if (ffn > c->tmp_floats) c->tmp_floats = ffn;
    int ok = 1;
    for (int t = 0; t < threads; t++) {
        c->res[t][0] = malloc(sizeof(float) * c->res_floats);
        c->res[t][1] = malloc(sizeof(float) * c->res_floats);
        c->tmp[t] = malloc(sizeof(float) * c->tmp_floats);
        ok &= c->res[t][0] && c->res[t][1] && c->tmp[t];
    }
    for (int p = 0; p < 2; p++) {
        c->slots[p] = aligned_alloc(64, sizeof(Slot) * chunks);
        if (c->slots[p]) memset(c->slots[p], 0, sizeof(Slot) * chunks); /* epoch 0: nothing committed */
        ok &= c->slots[p] != NULL;
    }
    c->x = malloc(sizeof(float) * D); c->h = malloc(sizeof(float) * D); c->y = malloc(sizeof(float) * D);
    int64_t tn = D > m->head_dim ? D : m->head_dim; /* + quantized attention: m and l of each head */
    c->t = malloc(sizeof(float) * (tn > 2 * m->num_heads ? tn : 2 * m->num_heads));
    c->sel = malloc(sizeof(float) * hc * HEAD_TOPK_MAX);
    c->kv = malloc(sizeof(float) * 2 * m->num_kv_heads * m->head_dim);
    const int64_t nqkv = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    c->qkv = malloc(sizeof(float) * nqkv);
    c->att = malloc(sizeof(float) * m->num_heads * m->head_dim);
    c->gu = malloc(sizeof(float) * (2 * m->max_ff + 16));
    c->z = malloc(sizeof(float) * (m->max_ff + 16));
    int64_t xq_cols = D > m->max_ff ? D : m->max_ff;
    if (m->num_heads * m->head_dim > xq_cols) xq_cols = m->num_heads * m->head_dim;
    for (int k = 0; k < 2; k++) {
        c->xqs[k].buf = aligned_alloc(64, (size_t)(caprese_qx_bytes(xq_cols) + 63) / 64 * 64);
        ok &= c->xqs[k].buf != NULL;
    }
    ok &= c->x && c->h && c->y && c->t && c->kv && c->sel && c->qkv && c->att && c->gu && c->z;
    for (int t = 1; ok && t < threads; t++) {
        c->workers[t].tid = t;
        c->workers[t].c = c;
        if (pthread_create(&c->workers[t].th, NULL, helper_main, &c->workers[t]) != 0) {
            c->workers[t].c = NULL; /* not started: not joined */
            ok = 0;
        }
    }
    if (!ok) {
        caprese_context_free(c);
        return NULL;
    }
    return c;
}

/* Threads that work on the next steps (1 .. threads); the others sleep. */
void caprese_context_set_active(Ctx *c, int64_t n) {
    atomic_store(&c->active, (int)(n < 1 ? 1 : n > c->threads ? c->threads : n));
}

/* Wait until no helper is inside a chunk (before the buffers a chunk reads are freed or moved). */
void caprese_context_quiesce(Ctx *c) {
    while (atomic_load(&c->busy) > 0) usleep(50);
}

/* out[0..6): chunks committed by the leader, by helpers; chunks run again because their thread was late;
 * executions whose result was dropped (someone committed first); ns the leader waited for other threads'
 * chunks; phases run. Since the context was created. */
void caprese_context_stats(Ctx *c, int64_t *out) {
    for (int k = 0; k < 6; k++) out[k] = 0;
    for (int t = 0; t < c->threads; t++) {
        out[t ? 1 : 0] += c->workers[t].committed;
        out[2] += c->workers[t].reruns;
        out[3] += c->workers[t].dropped;
    }
    out[4] = c->ns_wait;
    out[5] = c->n_phases;
}

/* out[0..2 * PROF_LABELS + 2): per label (phase kind, or PH_KINDS + job for a quantized product; names in
 * native_backend.PROFILE_LABELS) the leader's wall ns from publishing a phase to its last reduce, then the phases
 * run, then the decode steps' wall ns and count: what the leader did between phases is the step time minus the
 * phases'. Since the context was created or the last reset (reset != 0 zeroes them after the copy). */
int64_t caprese_context_profile(Ctx *c, int64_t *out, int64_t reset) {
    for (int k = 0; k < PROF_LABELS; k++) {
        out[k] = c->prof_ns[k];
        out[PROF_LABELS + k] = c->prof_n[k];
    }
    out[2 * PROF_LABELS] = c->step_ns;
    out[2 * PROF_LABELS + 1] = c->steps;
    if (reset) {
        memset(c->prof_ns, 0, sizeof c->prof_ns);
        memset(c->prof_n, 0, sizeof c->prof_n);
        c->step_ns = c->steps = 0;
    }
    return PROF_LABELS;
}

/* Tests: GRIFFIN's FFN as one phase (1, the default) or as the gate/up phase then the down phase (0). */
void caprese_context_set_fused_ffn(Ctx *c, int64_t on) { c->fused_ffn = on != 0; }

/* Tests: thread `tid` (0: the caller) sleeps `us` microseconds inside every `every`-th chunk it runs (0 = never). */
void caprese_context_debug_stall(Ctx *c, int64_t tid, int64_t every, int64_t us) {
    if (tid < 0 || tid >= c->threads) return;
    Worker *w = &c->workers[tid];
    w->stall_us = us;
    w->stall_count = 0;
    w->stall_every = every;
}

/* ------------------------------------------------------------------ a step */
/* The head on c->h. next == NULL: every logit. Else a screened step for the next[0] = k largest logits. */
static int run_head(Ctx *c, int64_t *next, int64_t *skipped) {
    const Model *m = c->m;
    const int64_t D = m->hidden, V = m->vocab;
    if (m->q_head) { /* a quantized head is read whole (see native_backend.py: never screened) */
        Phase ph = phase_of(PH_QDOT, -1, V, HEAD_ROWS, HEAD_ROWS, 0);
        ph.job = J_HEAD;
        quantize_for(c, &m->q_lm_head, c->h);
        CatMax cat = {{m->logits, NULL}, -INFINITY, -1};
        run_phase(c, &ph, next ? reduce_cat_argmax : reduce_cat, &cat);
        if (next) { /* greedy: the argmax (the first of equal maxima), found chunk by chunk while others ran */
            if (cat.arg < 0) return 3;
            next[0] = cat.arg;
            next[1] = V;
        }
        return 0;
    }
    if (!next) {
        const Phase ph = phase_of(PH_HEAD_FULL, 0, V, HEAD_ROWS, HEAD_ROWS, 0);
        run_phase(c, &ph, reduce_logits, NULL);
        return 0;
    }
    const int64_t k = next[0];
    double ss = 0.0;
    for (int64_t j = 0; j < D; j++) ss += (double)c->h[j] * c->h[j];
    Phase s = phase_of(PH_HEAD_SCREEN, 0, V, HEAD_ROWS, HEAD_ROWS + k, 0);
    s.topk = k;
    s.hn = (float)(sqrt(ss) * (1.0 + 1e-6)); /* |h|_2, rounded up */
    run_phase(c, &s, reduce_bounds, NULL);
    /* the k-th largest lower bound over all rows: at least k rows have a logit >= it */
    Phase pk = phase_of(PH_HEAD_PICK, 0, V, HEAD_ROWS, HEAD_ROWS + 5, 0);
    pk.hn = s.hn;
    pk.floor_ = kth_largest(c->sel, s.n_chunks * k, k);
    Pick best = {-INFINITY, -1, 0};
    run_phase(c, &pk, reduce_pick, &best);
    if (best.arg < 0) return 3;
    next[0] = best.arg;
    next[1] = best.cand;
    *skipped += V * D * (int64_t)(sizeof(float) - sizeof(int8_t)) - V * (int64_t)(2 * sizeof(float))
                - best.cand * D * (int64_t)sizeof(float);
    return 0;
}

/* The attention block of layer li: QKV, the new K/V, attention + o; x += o (Gemma 2: its norm); h = the FFN's
 * input norm of x. */
static void run_attention(Ctx *c, int64_t li, int64_t slot) {
    const Model *m = c->m;
    const Layer *L = m->layers + li;
    const int64_t D = m->hidden, nqkv = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    rms_norm(c->x, L->input_norm, c->h, D, m->eps);
    const int64_t kvo = m->num_heads * m->head_dim; /* K and V: the last 2 Hkv heads of QKV's outputs */
    if (L->q_attn) { /* whole-output chunks: QKV gathered, attention per head gathered, then the o rows */
        const int64_t parts = q_parts(c);
        Phase a = phase_of(PH_QDOT, li, nqkv, q_rows(nqkv, parts), q_rows(nqkv, parts), slot);
        a.job = J_QKV;
        quantize_for(c, &L->q_qkv, c->h);
        Cat qkv = {c->qkv, L->qkv_bias};
        run_phase(c, &a, reduce_cat, &qkv);
        const int64_t lo = first_slot(L, slot), S = att_parts(m, slot + 1 - lo), g = m->num_heads / m->num_kv_heads;
        /* The first 32 slots of each thread's first attention chunk (run_phase's ranges), requested while the
         * leader writes this slot's K / V: the attention phase then starts on rows under way (4% of the step
         * measured; all of each chunk stalled the leader for longer than it saved). Two threads' at most. */
        const int64_t act = atomic_load_explicit(&c->active, memory_order_relaxed), n = m->num_kv_heads * S;
        for (int64_t k = 0; k < act && k < 2; k++) {
            const int64_t first = n - n * (act - k) / act;
            if (first >= n) break;
            int64_t s0, s1;
            att_part(first, S, lo, slot + 1 - lo, &s0, &s1);
            prefetch_kv_rows(m, L, first / S, s0, s0 + 32 < s1 ? s0 + 32 : s1);
        }
        memcpy(c->kv, c->qkv + kvo, sizeof(float) * (nqkv - kvo));
        stage_kv_write(c, li, slot);
        const Phase b = phase_of(PH_QATT, li, m->num_kv_heads * S, 1, g * (m->head_dim + 2), slot);
        run_phase(c, &b, reduce_attention, NULL);
        Phase o = phase_of(PH_QDOT, li, D, q_rows(D, parts), q_rows(D, parts), slot);
        o.job = J_O;
        quantize_for(c, &L->q_o, c->att);
        Cat y = {c->y, L->o_bias};
        run_phase(c, &o, reduce_cat, &y);
    } else {
        Sum kv = {kvo, nqkv - kvo, L->qkv_bias ? L->qkv_bias + kvo : NULL, c->kv, 0, NULL};
        const Phase a = phase_of(PH_QKV, li, D, wide_rows(D), nqkv, slot);
        run_phase(c, &a, reduce_sum, &kv);
        stage_kv_write(c, li, slot);
        Sum o = {0, D, L->o_bias, c->y, 0, NULL};
        const Phase b = phase_of(PH_ATTN, li, m->num_heads, 1, D, slot);
        run_phase(c, &b, reduce_sum, &o);
    }
    if (m->gemma) { /* x += norm(o); h = norm(x) with the pre-FFN norm */
        rms_norm(c->y, L->post_attn_norm, c->t, D, m->eps);
        for (int64_t j = 0; j < D; j++) c->x[j] += c->t[j];
        rms_norm(c->x, L->pre_ffn_norm, c->h, D, m->eps);
    } else {
        for (int64_t j = 0; j < D; j++) c->x[j] += c->y[j];
        rms_norm(c->x, L->post_attn_norm, c->h, D, m->eps);
    }
}

/* A quantized FFN on h into c->y: the gate/up(/L) outputs gathered into c->gu (whole rows per chunk); the leader
 * activates them into c->z (CATS: thresholded; the up product comes in phase D for the neurons that pass); then
 * the down product: rows-axpy partial sums over neuron chunks (down stored [n_ff, hidden]) or whole outputs
 * (stored [hidden, n_ff]). */
static void run_q_ffn(Ctx *c, int64_t li, int64_t *skipped) {
    const Model *m = c->m;
    const Layer *L = m->layers + li;
    const int64_t D = m->hidden, F = L->n_ff, r = L->rank, nq = L->cats_tau ? F : 2 * F;
    if (c->fused_ffn && L->down_rows && !L->cats_tau) { /* GRIFFIN (whole gate/up rows, down rows): one phase */
        quantize_for(c, &L->q_gate, c->h);
        Sum down = {0, D, L->down_bias, c->y, D, NULL};
        const Phase d = q_ffn_phase(m, L, li);
        run_phase(c, &d, reduce_sum, &down);
        return;
    }
    if (q_ffn_dense_fits(c, L)) { /* dense, down [hidden, n_ff] in r16: one phase over neuron chunks */
        quantize_for(c, &L->q_gate, c->h);
        Sum down = {0, D, L->down_bias, c->y, 0, NULL};
        const Phase d = phase_of(PH_QFFN_DENSE, li, F, FFN_NEURONS, D, 0);
        run_phase(c, &d, reduce_sum, &down);
        return;
    }
    const Phase g = gu_phase(m, L, li, q_parts(c));
    quantize_for(c, &L->q_gate, c->h); /* gate and up: one tensor's rows, the same columns and blocks */
    Cat gu = {c->gu, NULL};
    run_phase(c, &g, reduce_cat, &gu);
    const float *b = L->gu_bias;
    if (b)
        for (int64_t j = 0; j < nq; j++) c->gu[j] += b[j];
    if (L->cats_tau) {
        gated(m->activation, c->gu, NULL, L->cats_tau, c->z, F);
    } else {
        gated(m->activation, c->gu, c->gu + F, NULL, c->z, F);
    }
    memcpy(c->z + F, c->gu + nq, sizeof(float) * r);
    if (L->down_rows) {
        Sum down = {0, D, L->down_bias, c->y, D, L->cats_tau ? skipped : NULL};
        const Phase d = q_down_phase(m, L, li);
        run_phase(c, &d, reduce_sum, &down);
    } else {
        const int64_t rows = q_rows(D, q_parts(c));
        Phase d = phase_of(PH_QDOT, li, D, rows, rows, 0);
        d.job = J_DOWN;
        quantize_for(c, &L->q_down, c->z);
        Cat y = {c->y, L->down_bias};
        run_phase(c, &d, reduce_cat, &y);
    }
}

/* The FFN of layer li on h (dense, GRIFFIN or CATS by the layer's fields); x += its output (Gemma 2: norm). */
static void run_ffn(Ctx *c, int64_t li, int64_t *skipped) {
    const Model *m = c->m;
    const Layer *L = m->layers + li;
    const int64_t D = m->hidden, gu = L->gu1.cols + (L->gu2.w ? L->gu2.cols : 0);
    if (L->q_ffn) {
        run_q_ffn(c, li, skipped);
    } else {
        const Phase g = phase_of(PH_GATE_UP, li, D, wide_rows(D), gu, 0);
        run_phase(c, &g, NULL, NULL); /* its parts are read by phase D's chunks */
        Sum down = {0, D, L->down_bias, c->y, D, L->up_t.w ? skipped : NULL}; /* CATS: bytes not read at r[D] */
        const Phase d = phase_of(PH_DOWN, li, L->n_ff + L->rank, down_rows(D), D + 2, 0);
        run_phase(c, &d, reduce_sum, &down);
    }
    if (m->gemma) {
        rms_norm(c->y, L->post_ffn_norm, c->t, D, m->eps);
        for (int64_t j = 0; j < D; j++) c->x[j] += c->t[j];
    } else {
        for (int64_t j = 0; j < D; j++) c->x[j] += c->y[j];
    }
}

/* A step's `next` this model cannot serve: a screened k needs the int8 head copy and 1 <= k <= min(HEAD_TOPK_MAX,
 * vocab); a quantized head (never screened) serves k = 1, its argmax, only. */
static int bad_next(const Model *m, const int64_t *next) {
    if (!next) return 0;
    const int64_t k = next[0];
    if (m->q_head) return k != 1;
    return !m->head_q || k < 1 || k > HEAD_TOPK_MAX || k > m->vocab;
}

/* One token at `slot` (= its position; batch 1, no padding): writes K/V at slot of every layer, and the weight
 * bytes this step did not read (*skipped: CATS' thresholded up / down rows, the screened head's savings).
 * next == NULL: every logit into m->logits. next != NULL (needs m->head_q): a screened step for the next[0] = k
 * largest logits (1 <= k <= min(HEAD_TOPK_MAX, vocab)): m->logits holds the exact logit of every row that may
 * be among them (those k included, ties at the k-th value too) and -inf elsewhere; next[0] = the argmax,
 * next[1] = how many rows were recomputed in fp32. A quantized head (m->q_head) takes next[0] = 1 only: every
 * logit into m->logits, next[0] = the argmax, next[1] = vocab.
 * 0 = done, 1 = bad arguments, 3 = no finite logit. */
int caprese_decode_step(Ctx *c, int64_t token, int64_t slot, int64_t *skipped, int64_t *next) {
    const Model *m = c->m;
    if (token < 0 || token >= m->vocab || slot < 0 || slot >= m->capacity || !fits(c) || bad_next(m, next)) return 1;
    const int64_t D = m->hidden, t0 = now_ns();
    *skipped = 0;
    const float *e = m->embed + token * D;
    for (int64_t j = 0; j < D; j++) c->x[j] = e[j] * m->embed_scale;
    for (int64_t li = 0; li < m->num_layers; li++) {
        run_attention(c, li, slot);
        run_ffn(c, li, skipped);
    }
    rms_norm(c->x, m->final_norm, c->h, D, m->eps);
    const int rc = run_head(c, next, skipped);
    c->step_ns += now_ns() - t0;
    c->steps++;
    return rc;
}

/* ---------------------------------------------------------------- sampling (the loop of caprese_decode_n) */
typedef struct { float p; int32_t i; } Cand;

static int cand_desc(const void *a, const void *b) { /* descending probability, ties by token id */
    const Cand *x = a, *y = b;
    return x->p > y->p ? -1 : x->p < y->p ? 1 : (x->i > y->i) - (x->i < y->i);
}

/* One token from logits[0 .. n) by temperature, top-k (ties at the k-th value kept), top-p (the smallest prefix
 * by descending probability, ties by id, whose mass reaches top_p; searched among the tokens at least a fraction
 * of the largest probability, widened until their mass reaches top_p) and the uniform u in [0, 1): the definition
 * of caprese/model/sampling.py's _sample_row, probabilities in fp32 (exp_vec), sums in fp64. Scratch of n entries
 * each: c, f (floats), ix (ids). -1: no finite logit. */
static int64_t sample_logits(const float *logits, int64_t n, float temperature, int64_t top_k, double top_p, double u,
                             Cand *c, float *f, int32_t *ix) {
    int64_t m = 0;
    double total = 0.0;
    const int every = !(top_k > 0 && top_k < n); /* no top-k: every finite logit a candidate, f indexed by id */
    if (every) { /* vectorized: the scaled logits and their maximum, then the probabilities and their sum */
        float zmax = -INFINITY;
#pragma omp simd reduction(max : zmax)
        for (int64_t v = 0; v < n; v++) {
            f[v] = logits[v] / temperature;
            zmax = f[v] > zmax ? f[v] : zmax;
        }
        if (zmax == -INFINITY) return -1;
#pragma omp simd reduction(+ : total)
        for (int64_t v = 0; v < n; v++) {
            f[v] = f[v] > -INFINITY ? exp_vec(f[v] - zmax) : 0.0f;
            total += f[v];
        }
        m = n;
    } else {
        for (int64_t v = 0; v < n; v++) f[v] = logits[v] / temperature;
        const float kth = kth_largest(f, n, top_k);
        float zmax = -INFINITY;
        for (int64_t v = 0; v < n; v++) { /* the candidates in id order, their scaled logits */
            const float z = logits[v] / temperature;
            if (z >= kth && z > -INFINITY) {
                f[m] = z;
                ix[m++] = (int32_t)v;
                zmax = z > zmax ? z : zmax;
            }
        }
        if (!m) return -1;
        for (int64_t j = 0; j < m; j++) {
            f[j] = exp_vec(f[j] - zmax);
            total += f[j];
        }
    }
    int64_t keep = 0;
    if (top_p < 1.0) {
        for (double frac = 1e-4;; frac = frac > 1e-13 ? frac * 1e-3 : 0.0) {
            double mass = 0.0; /* the candidates at least frac of the largest (1), until their mass reaches top_p */
            keep = 0;
            for (int64_t j = 0; j < m; j++)
                if (f[j] >= frac && f[j] > 0.0f) {
                    c[keep].p = f[j];
                    c[keep++].i = every ? (int32_t)j : ix[j];
                    mass += f[j];
                }
            if (frac == 0.0 || mass >= top_p * total) break;
        }
        qsort(c, (size_t)keep, sizeof(Cand), cand_desc);
        double cum = 0.0;
        int64_t k = 0;
        for (; k < keep; k++) { /* keep while the mass before it is below top_p */
            const double q = c[k].p / total;
            cum += q;
            if (cum - q >= top_p) break;
        }
        keep = k;
    } else { /* every candidate, in id order: the 256-wide group the draw falls in, then the token in it */
        const double target = u * total;
        double cum = 0.0;
        int64_t j0 = 0;
        for (; j0 + 256 < m; j0 += 256) {
            double g = 0.0;
#pragma omp simd reduction(+ : g)
            for (int64_t j = j0; j < j0 + 256; j++) g += f[j];
            if (cum + g > target) break;
            cum += g;
        }
        int64_t last = j0;
        for (int64_t j = j0; j < m; j++) {
            if (f[j] <= 0.0f) continue;
            last = j;
            cum += f[j];
            if (cum > target) return every ? j : ix[j];
        }
        return every ? last : ix[last]; /* rounding left the target past the sum: the last token with mass */
    }
    double last = 0.0; /* the draw: the first kept token whose cumulative mass passes u x the kept mass */
    for (int64_t j = 0; j < keep; j++) last += c[j].p;
    const double target = u * last;
    double cum = 0.0;
    for (int64_t j = 0; j < keep; j++) {
        cum += c[j].p;
        if (cum > target) return c[j].i;
    }
    return keep ? c[keep - 1].i : -1; /* nothing kept (no finite probability): the caller's "no finite logit" */
}

/* sample_logits on its own (tests: its draws against the float64 reference). -1: no finite logit, -2: no memory. */
int64_t caprese_sample_logits(const float *logits, int64_t n, double temperature, int64_t top_k, double top_p,
                              double u) {
    Cand *c = malloc(sizeof(Cand) * (size_t)n);
    float *f = malloc(sizeof(float) * (size_t)n);
    int32_t *ix = malloc(sizeof(int32_t) * (size_t)n);
    const int64_t t = c && f && ix ? sample_logits(logits, n, (float)temperature, top_k, top_p, u, c, f, ix) : -2;
    free(c);
    free(f);
    free(ix);
    return t;
}

/* Up to n decode steps in one call (gpt-fast's decode_n_tokens): step i feeds `token` (then the previous step's
 * output) at slot + i; out[i] = its token, ns[i] = its time, skipped[i] = its unread bytes, rows[i] = the head rows
 * it recomputed in fp32. Stops after a token in eos[0 .. neos). Why: a step streams ~80 MB through the caches, and
 * the Python around each step then ran cold, ~70 µs a token (docs/performance.md); here it is paid once per call.
 * temperature 0: greedy, the argmax of a screened or quantized head (screen_k = 1, as caprese_decode_step's
 * next[0]). Else a draw from the step's logits with u[i] (sample_logits): screen_k > 0 a screened head's top-k step
 * (logits exact where the k largest can be, -inf elsewhere: top-k sampling reads no others), 0 every logit (a
 * quantized head: next[0] = 1, its argmax unused). Returns the steps run, or -(a caprese_decode_step code) at the
 * step that failed (-3: no finite logit to sample; -2: out of memory); earlier steps' outputs stand. */
int64_t caprese_decode_n(Ctx *c, int64_t token, int64_t slot, int64_t n, const int64_t *eos, int64_t neos,
                         double temperature, int64_t top_k, double top_p, int64_t screen_k, const double *u,
                         int64_t *out, int64_t *ns, int64_t *skipped, int64_t *rows) {
    const Model *m = c->m;
    const int greedy = temperature == 0.0;
    Cand *cand = greedy ? NULL : malloc(sizeof(Cand) * (size_t)m->vocab);
    float *f = greedy ? NULL : malloc(sizeof(float) * (size_t)m->vocab);
    int32_t *ix = greedy ? NULL : malloc(sizeof(int32_t) * (size_t)m->vocab);
    int64_t ran = n;
    if (!greedy && (!cand || !f || !ix)) ran = -2;
    for (int64_t i = 0; i < n && ran == n; i++) {
        int64_t next[2] = {m->q_head ? 1 : screen_k, 0};
        const int64_t t0 = now_ns();
        const int rc = caprese_decode_step(c, token, slot + i, skipped + i, next[0] ? next : NULL);
        if (rc) {
            ran = -rc;
            break;
        }
        token = greedy ? next[0]
                       : sample_logits(m->logits, m->vocab, (float)temperature, top_k, top_p, u[i], cand, f, ix);
        if (token < 0) {
            ran = -3; /* no finite logit: caprese_decode_step's code */
            break;
        }
        ns[i] = now_ns() - t0;
        out[i] = token;
        rows[i] = next[1];
        for (int64_t k = 0; k < neos; k++)
            if (eos[k] == token) ran = i + 1;
    }
    free(cand);
    free(f);
    free(ix);
    return ran;
}

/* The head alone, on the given final hidden state h (after the final norm): what a step's head costs, for the
 * load-time choice between the screened and the full head. Same arguments and codes as caprese_decode_step. */
int caprese_head_only(Ctx *c, const float *h, int64_t *next) {
    const Model *m = c->m;
    if (bad_next(m, next)) return 1;
    int64_t skipped = 0;
    memcpy(c->h, h, sizeof(float) * m->hidden);
    return run_head(c, next, &skipped);
}

/* tools/bench_attention.py: one decode step's attention of a layer on this thread, as the quantized step runs it
 * (attend_group per KV head over every slot, then each head normalized), `reps` times over the caller's rows
 * (cache-resident after the first): ns per layer. q [heads, head_dim] is taken as already rotated (the tables
 * here are the identity); k / v [kv_heads, slots, head_dim] fp32, or fp16 bits with f16 (1: K read in rows, 2: in
 * tiles, as Model.k_tiles: AVX-512 builds); out [heads, head_dim] gets the last run's outputs. Returns ns per
 * layer, or -1 for shapes (or a K layout) it does not take. */
double caprese_attention_bench(const float *q, const void *k, const void *v, int64_t heads, int64_t kv_heads,
                               int64_t head_dim, int64_t slots, int64_t f16, int64_t reps, float *out) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 2 || head_dim % 2 || slots < 1 || reps < 1)
        return -1.0;
    const int64_t g = heads / kv_heads, half = head_dim / 2;
    Model m = {0};
    Layer L = {0};
    Ctx *c = calloc(1, sizeof(Ctx));
    float *cs = malloc(sizeof(float) * (size_t)(slots * half)), *sn = calloc((size_t)(slots * half), sizeof(float));
    float *q2 = malloc(sizeof(float) * (size_t)(g * head_dim)), *sc = malloc(sizeof(float) * (size_t)(g * ATT_BLOCK));
    float *o = malloc(sizeof(float) * (size_t)(heads * (head_dim + 2)));
    double ns = -1.0;
    /* f16 2: K in tiles (Model.k_tiles), K and V copied into a cache of whole tiles */
    const int64_t cap = f16 == 2 ? (slots + 15) & ~(int64_t)15 : slots;
    uint16_t *kt = NULL, *vt = NULL;
    if (f16 == 2) {
        kt = calloc((size_t)(kv_heads * cap * head_dim), sizeof(uint16_t));
        vt = calloc((size_t)(kv_heads * cap * head_dim), sizeof(uint16_t));
        const size_t bytes = 2 * (size_t)(slots * head_dim); /* a KV head's rows */
        if (kt && vt)
            for (int64_t h = 0; h < kv_heads; h++) {
                memcpy(kt + h * cap * head_dim, (const uint16_t *)k + h * slots * head_dim, bytes);
                memcpy(vt + h * cap * head_dim, (const uint16_t *)v + h * slots * head_dim, bytes);
            }
    }
    if (c && cs && sn && q2 && sc && o && (f16 != 2 || (kt && vt))) {
        for (int64_t i = 0; i < slots * half; i++) cs[i] = 1.0f;
        m.head_dim = head_dim, m.num_heads = heads, m.num_kv_heads = kv_heads, m.capacity = cap, m.kv_f16 = f16 != 0;
        m.rope_cos = cs, m.rope_sin = sn, m.eps = 1e-6f;
        L.k_cache = (float *)(uintptr_t)(kt ? (const void *)kt : k);
        L.v_cache = (float *)(uintptr_t)(vt ? (const void *)vt : v);
        m.num_layers = 1, m.layers = &L;
        m.k_tiles = f16 == 2;
        L.scale = 1.0f / sqrtf((float)head_dim);
        c->m = &m;
        if (f16 != 2 || !caprese_kv_tiles(&m, slots, 1)) { /* else -1: no tiles in this build */
            const int64_t t0 = now_ns();
            for (int64_t r = 0; r < reps; r++)
                for (int64_t h = 0; h < kv_heads; h++)
                    attend_group(c, &L, slots - 1, h * g, g, 0, slots, q + h * g * head_dim, q2, sc,
                                 o + h * g * (head_dim + 2), head_dim + 2, -1, 0, 0);
            ns = (double)(now_ns() - t0) / (double)reps;
            for (int64_t h = 0; h < heads; h++)
                for (int64_t j = 0; j < head_dim; j++)
                    out[h * head_dim + j] = o[h * (head_dim + 2) + j] / o[h * (head_dim + 2) + head_dim + 1];
        }
    }
    free(c), free(cs), free(sn), free(q2), free(sc), free(o), free(kt), free(vt);
    return ns;
}
