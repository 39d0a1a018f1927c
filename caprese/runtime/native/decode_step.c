/* One fp32 decode step (batch 1) of a caprese engine, on CPU threads: the whole model in ONE OpenMP parallel
 * region, so a step pays 5 thread barriers per layer instead of one thread-pool dispatch per graph node.
 *
 * Why it exists: at batch 1 a decode step is a chain of matrix-vector products that must stream every weight
 * once. ONNX Runtime's MatMul (MLAS) does that at the machine's streaming bandwidth on large matrices, but a
 * step is ~10 nodes per layer, each a separate parallel dispatch, and the per-prompt GRIFFIN matrices arrive
 * as graph inputs that MLAS cannot pre-pack. Here every product is one pass over the weight rows (each thread
 * streams its own contiguous stretch of rows; the readers add the threads' partial sums), and everything
 * between two products is recomputed by each thread on its own copy of the residual stream (a few hundred
 * floats) instead of waiting for one thread.
 *
 * Semantics are those of the engine's decode graph (caprese/export/onnx_graph.py): RMSNorm (Gemma 2's
 * pre-added 1 + w weights and its post-attention / pre- and post-FFN norms), fused QKV (+ bias), optional
 * per-head q/k RMSNorm, rotary (rotate-half, cos/sin tables [max_seq, head_dim / 2]), the in-place KV write,
 * GQA attention with sliding window and soft-cap (the slots split between the threads, the shares merged),
 * o projection, gated FFN (dense, GRIFFIN's folded [Ŵ_g, Ŵ_1, L] / [Ŵ_2 ; R], CATS' threshold with an
 * optional bypass), LM head with the final soft-cap.
 * CATS: the up projection (kept transposed) and the down projection are read only for the neurons whose
 * activation passes the threshold.
 * Screened head (`next` given, for greedy and top-k steps): the LM head is first read as an int8 copy with a
 * per-row scale and a per-row error bound; only the rows whose upper bound reaches the k-th largest lower bound
 * (1-10 of 49152 on SmolLM2 for k = 1) are recomputed from the fp32 head, so the k largest fp32 logits are
 * exact while the head costs a quarter of its bytes (the bound: caprese/runtime/native/screened_head.py).
 * Layout of every matrix: math layout [in, out], row-major; the LM head is [vocab, hidden] (the embedding).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define CAPRESE_NATIVE_ABI 3
#define HEAD_TOPK_MAX 256 /* largest k of a screened top-k step */

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
} Layer;

typedef struct {
    int64_t abi, num_layers, hidden, num_heads, num_kv_heads, head_dim, vocab, capacity;
    int64_t max_ff;          /* max over layers of n_ff + rank */
    int64_t threads;         /* OpenMP threads of a step (the scratch holds one partial sum per thread) */
    int64_t activation;      /* 0 silu, 1 gelu (tanh), 2 gelu (erf) */
    int64_t gemma;           /* Gemma 2 norm placement + embedding scale */
    float eps, final_softcap, embed_scale;
    const float *embed;      /* [vocab, hidden] */
    const float *lm_head;    /* [vocab, hidden] */
    const float *final_norm;
    const float *rope_cos, *rope_sin; /* [max_seq, head_dim / 2] */
    const Layer *layers;
    float *logits;           /* [vocab] */
    float *scratch;          /* caprese_scratch_floats(m) floats: the threads' partial sums and attention shares */
    const int8_t *head_q;    /* [vocab, hidden] int8 copy of the LM head, or NULL (no screened greedy steps) */
    const float *head_scale; /* [vocab]: row v of the head ~ head_scale[v] * head_q[v] */
    const float *head_bound; /* [vocab]: |h.w_v - head_scale[v] * h.head_q[v]| <= |h|_2 * head_bound[v] in fp32 */
} Model;

int64_t caprese_native_abi(void) { return CAPRESE_NATIVE_ABI; }

int64_t caprese_head_topk_max(void) { return HEAD_TOPK_MAX; }

int64_t caprese_scratch_floats(const Model *m) {
    int64_t qkv = (m->num_heads + 2 * m->num_kv_heads) * m->head_dim;
    return m->threads * (qkv + m->hidden + 2 * m->max_ff + m->hidden + m->num_heads * (2 + m->head_dim) + 3 +
                         HEAD_TOPK_MAX);
}

static void rms_norm(const float *x, const float *w, float *y, int64_t n, float eps) {
    double ss = 0.0;
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
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
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

/* y[0:n] = sum over rows r of x[r] * W[r, 0:n], for r = i in [i0, i1) (rows == NULL) or r = rows[i] (the
 * listed rows only: the others have x[r] == 0, CATS' thresholded neurons). Rows in order, four at a time, the
 * columns in tiles of 2048 so the partial sum stays in L1. The threads split the rows (one contiguous stretch of
 * the matrix each: the most regular read there is) and whoever reads y sums the threads' parts. */
#define TILE 2048
static void gemv_part(const float *restrict x, const Mat *a, const int32_t *rows, int64_t i0, int64_t i1,
                      float *restrict y) {
    const int64_t ld = a->ld, n = a->cols;
    for (int64_t c0 = 0; c0 < n; c0 += TILE) {
        const int64_t w = (c0 + TILE < n ? c0 + TILE : n) - c0;
        const float *restrict W = a->w + c0;
        float *restrict yt = y + c0;
        for (int64_t j = 0; j < w; j++) yt[j] = 0.0f;
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4) {
            const int64_t r0 = rows ? rows[i] : i, r1 = rows ? rows[i + 1] : i + 1;
            const int64_t r2 = rows ? rows[i + 2] : i + 2, r3 = rows ? rows[i + 3] : i + 3;
            const float a0 = x[r0], a1 = x[r1], a2 = x[r2], a3 = x[r3];
            const float *restrict w0 = W + r0 * ld, *restrict w1 = W + r1 * ld, *restrict w2 = W + r2 * ld,
                        *restrict w3 = W + r3 * ld;
#pragma omp simd
            for (int64_t j = 0; j < w; j++) yt[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
        for (; i < i1; i++) {
            const int64_t r0 = rows ? rows[i] : i;
            const float a0 = x[r0];
            const float *restrict w0 = W + r0 * ld;
#pragma omp simd
            for (int64_t j = 0; j < w; j++) yt[j] += a0 * w0[j];
        }
    }
}

/* out[0:n] = sum of the nt partial sums parts[t * stride + off + 0:n] (+ bias[off:off + n]). */
static void gather(const float *parts, int nt, int64_t stride, int64_t off, int64_t n, const float *bias,
                   float *out) {
    const float *p0 = parts + off;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) out[j] = p0[j] + (bias ? bias[off + j] : 0.0f);
    for (int t = 1; t < nt; t++) {
        const float *pt = parts + t * stride + off;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) out[j] += pt[j];
    }
}

static void rope(float *v, const float *cos, const float *sin, int64_t half) {
    for (int64_t j = 0; j < half; j++) {
        float a = v[j], b = v[j + half];
        v[j] = a * cos[j] - b * sin[j];
        v[j + half] = b * cos[j] + a * sin[j];
    }
}

/* This thread's share of the attention of kv head `kvh`'s query group (q: group × head_dim, rotated) over the
 * cache slots [s0, s1): per query head the running max m, the sum l of exp(score - m) and the unnormalised
 * output o = Σ exp(score - m) · v (the readers merge the threads' shares). K and V rows are read once for the
 * whole group. sc: group × (s1 - s0) floats. */
static void attend_part(const Model *m, const Layer *L, const float *q, int64_t kvh, int64_t group, int64_t s0,
                        int64_t s1, float *sc, float *pm, float *pl, float *po) {
    const int64_t hd = m->head_dim, cap = m->capacity, n = s1 - s0;
    const float *K = L->k_cache + kvh * cap * hd, *V = L->v_cache + kvh * cap * hd;
    for (int64_t s = s0; s < s1; s++) {
        const float *k = K + s * hd;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * hd;
            float d = 0.0f;
#pragma omp simd reduction(+ : d)
            for (int64_t j = 0; j < hd; j++) d += qg[j] * k[j];
            d *= L->scale;
            if (L->softcap > 0.0f) d = tanhf(d / L->softcap) * L->softcap;
            sc[g * n + (s - s0)] = d;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *row = sc + g * n, mx = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < n; i++) mx = row[i] > mx ? row[i] : mx;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) {
            row[i] = exp_vec(row[i] - mx);
            sum += row[i];
        }
        pm[g] = mx;
        pl[g] = sum;
        for (int64_t j = 0; j < hd; j++) po[g * hd + j] = 0.0f;
    }
    for (int64_t s = s0; s < s1; s++) {
        const float *v = V + s * hd;
        for (int64_t g = 0; g < group; g++) {
            const float p = sc[g * n + (s - s0)];
            float *o = po + g * hd;
#pragma omp simd
            for (int64_t j = 0; j < hd; j++) o[j] += p * v[j];
        }
    }
}

/* out[h] = the merged attention output of query head h from the nt threads' shares. */
static void attend_merge(const float *pm, const float *pl, const float *po, int nt, int64_t Hq, int64_t hd,
                         float *out) {
    for (int64_t h = 0; h < Hq; h++) {
        float mx = -INFINITY, l = 0.0f;
        for (int t = 0; t < nt; t++) mx = pm[t * Hq + h] > mx ? pm[t * Hq + h] : mx;
        float *o = out + h * hd;
        for (int64_t j = 0; j < hd; j++) o[j] = 0.0f;
        for (int t = 0; t < nt; t++) {
            if (pl[t * Hq + h] == 0.0f) continue; /* an empty share */
            const float w = expf(pm[t * Hq + h] - mx);
            const float *pt = po + (t * Hq + h) * hd;
            l += w * pl[t * Hq + h];
#pragma omp simd
            for (int64_t j = 0; j < hd; j++) o[j] += w * pt[j];
        }
        const float inv = 1.0f / l;
        for (int64_t j = 0; j < hd; j++) o[j] *= inv;
    }
}

/* This thread's stretch [*i0, *i1) of n rows. */
static void rows_of(int64_t n, int tid, int nt, int64_t *i0, int64_t *i1) {
    *i0 = n * tid / nt;
    *i1 = n * (tid + 1) / nt;
}

/* d[k] = w_k . h for four fp32 head rows. Every head logit, of the full head and of a screened head's
 * candidates (called with one row four times), comes from this one compiled body, so a row's logit has the same
 * bits on both paths and sampling from a screened top-k gives the full head's tokens. */
__attribute__((noinline)) static void dot4_f32(const float *w0, const float *w1, const float *w2, const float *w3,
                                               const float *restrict h, int64_t n, float d[4]) {
    float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t j = 0; j < n; j++) {
        d0 += w0[j] * h[j];
        d1 += w1[j] * h[j];
        d2 += w2[j] * h[j];
        d3 += w3[j] * h[j];
    }
    d[0] = d0; d[1] = d1; d[2] = d2; d[3] = d3;
}

static float head_row(const Model *m, const float *h, int64_t v) { /* one exact logit, soft-capped */
    const float *w = m->lm_head + v * m->hidden;
    float d[4];
    dot4_f32(w, w, w, w, h, m->hidden, d);
    return m->final_softcap > 0.0f ? tanhf(d[0] / m->final_softcap) * m->final_softcap : d[0];
}

/* The full head over this thread's rows [i0, i1): logits = W h (+ soft-cap). */
static void head_full(const Model *m, const float *h, int64_t i0, int64_t i1) {
    const int64_t D = m->hidden;
    int64_t v = i0;
    float d[4];
    for (; v + 4 <= i1; v += 4) { /* four rows at a time: four independent sums */
        const float *w0 = m->lm_head + v * D;
        dot4_f32(w0, w0 + D, w0 + 2 * D, w0 + 3 * D, h, D, d);
        for (int k = 0; k < 4; k++) m->logits[v + k] = d[k];
    }
    for (; v < i1; v++) {
        const float *w = m->lm_head + v * D;
        dot4_f32(w, w, w, w, h, D, d);
        m->logits[v] = d[0];
    }
    const float cap = m->final_softcap;
    if (cap > 0.0f)
        for (v = i0; v < i1; v++) m->logits[v] = tanhf(m->logits[v] / cap) * cap;
}

/* d[k] = q_k . h for the four consecutive int8 rows q .. q + 3n. The loads run 32 KiB ahead with software
 * prefetch: the int8 rows are consumed 4x faster per byte than fp32 ones, and without it the stream stalls at
 * about half the DRAM bandwidth (measured: 28 MB read in 2.0 ms without, 1.15 ms with, 2 threads). */
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

/* Screened head, pass 1 over this thread's rows: a[v] = scale[v] * (q[v] . h) into logits[v]; heap[0..k) gets
 * the k largest lower bounds a[v] - |h| bound[v] of these rows (-inf where fewer). */
static void head_screen(const Model *m, const float *h, float hn, int64_t i0, int64_t i1, float *heap, int64_t k) {
    const int64_t D = m->hidden;
    float d[4];
    for (int64_t i = 0; i < k; i++) heap[i] = -INFINITY;
    for (int64_t v = i0; v < i1; v += 4) {
        const int64_t k_n = i1 - v < 4 ? i1 - v : 4;
        if (k_n == 4) {
            dot4_i8(m->head_q + v * D, h, D, d);
        } else { /* the last rows of the stretch, one at a time */
            for (int64_t r = 0; r < k_n; r++) {
                const int8_t *q = m->head_q + (v + r) * D;
                float t = 0.0f;
                for (int64_t j = 0; j < D; j++) t += (float)q[j] * h[j];
                d[r] = t;
            }
        }
        for (int64_t r = 0; r < k_n; r++) {
            const float a = m->head_scale[v + r] * d[r];
            m->logits[v + r] = a;
            heap_offer(heap, k, a - hn * m->head_bound[v + r]);
        }
    }
}

/* The k-th largest of a[0..n) (k <= n; a is reordered). Quickselect: n is at most threads x HEAD_TOPK_MAX. */
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

/* One token at `slot` (= its position; batch 1, no padding): writes K/V at slot of every layer, and the weight
 * bytes this step did not read (*skipped: CATS' thresholded up / down rows, the screened head's savings).
 * next == NULL: every logit into m->logits. next != NULL (needs m->head_q): a screened step for the next[0] = k
 * largest logits (1 <= k <= min(HEAD_TOPK_MAX, vocab)): m->logits holds the exact logit of every row that may
 * be among them (those k included, ties at the k-th value too) and -inf elsewhere; next[0] = the argmax,
 * next[1] = how many rows were recomputed in fp32.
 * 0 = done, 1 = bad arguments, 2 = out of memory, 3 = no finite logit. */
int caprese_decode_step(const Model *m, int64_t token, int64_t slot, int64_t *skipped, int64_t *next) {
    const int64_t topk = next ? next[0] : 0;
    if (m->abi != CAPRESE_NATIVE_ABI || token < 0 || token >= m->vocab || slot < 0 || slot >= m->capacity ||
        (next && (!m->head_q || topk < 1 || topk > HEAD_TOPK_MAX || topk > m->vocab))) return 1;
    const int64_t D = m->hidden, hd = m->head_dim, half = hd / 2, Hq = m->num_heads, Hkv = m->num_kv_heads;
    const int64_t group = Hq / Hkv, nqkv = (Hq + 2 * Hkv) * hd, GU = 2 * m->max_ff;
    const int nt_max = (int)m->threads;
    /* shared: the threads' partial sums of each product and their attention shares (nt_max parts each) */
    float *qkv_p = m->scratch, *o_p = qkv_p + nt_max * nqkv, *gu_p = o_p + nt_max * D;
    float *down_p = gu_p + nt_max * GU, *att_m = down_p + nt_max * D, *att_l = att_m + nt_max * Hq;
    float *att_o = att_l + nt_max * Hq, *head_best = att_o + nt_max * Hq * hd;
    int32_t *head_arg = (int32_t *)(head_best + nt_max), *head_cand = head_arg + nt_max; /* float-sized slots */
    float *head_lo = (float *)(head_cand + nt_max); /* the threads' k largest lower bounds, HEAD_TOPK_MAX each */
    const float *cos = m->rope_cos + slot * half, *sin = m->rope_sin + slot * half;
    int failed = 0;
    *skipped = 0;
    for (int k = 0; k < nt_max; k++) { /* as threads OpenMP did not start leave them */
        head_arg[k] = -1;
        head_cand[k] = 0;
        for (int64_t i = 0; i < topk; i++) head_lo[k * HEAD_TOPK_MAX + i] = -INFINITY;
    }

#pragma omp parallel num_threads(nt_max)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        /* per thread: residual stream x, normed h, a summed product y, FFN input z, CATS row list, scores, a head */
        float *x = malloc(sizeof(float) * D), *h = malloc(sizeof(float) * D), *y = malloc(sizeof(float) * D);
        float *g = malloc(sizeof(float) * GU), *z = malloc(sizeof(float) * m->max_ff);
        float *scores = malloc(sizeof(float) * m->capacity * group), *qh = malloc(sizeof(float) * Hq * hd);
        float *t = malloc(sizeof(float) * D), *attn = malloc(sizeof(float) * Hq * hd);
        int32_t *rows = malloc(sizeof(int32_t) * m->max_ff);
        float *lows = next ? malloc(sizeof(float) * nt_max * topk) : NULL; /* all threads' bounds, to select in */
        int ok = x && h && y && g && z && scores && qh && t && attn && rows && (lows || !next);
#pragma omp atomic
        failed += !ok;
#pragma omp barrier
        if (!failed) {
            const float *e = m->embed + token * D;
            for (int64_t j = 0; j < D; j++) x[j] = e[j] * m->embed_scale;
            int64_t i0, i1;
            for (int64_t li = 0; li < m->num_layers; li++) {
                const Layer *L = m->layers + li;
                /* attention block */
                rms_norm(x, L->input_norm, h, D, m->eps);
                rows_of(D, tid, nt, &i0, &i1);
                gemv_part(h, &L->qkv, NULL, i0, i1, qkv_p + tid * nqkv);
#pragma omp barrier
                /* attention: the slots lo .. slot are split between the threads (every query head in each
                 * share, K/V rows read once per group); the last share holds the new slot, so the thread that
                 * writes the new K/V into the cache is the only one that reads them this step */
                const int64_t lo = (L->window > 0 && slot - L->window + 1 > 0) ? slot - L->window + 1 : 0;
                const int64_t n_att = slot - lo + 1;
                const int64_t s0 = lo + n_att * tid / nt, s1 = lo + n_att * (tid + 1) / nt;
                if (tid == nt - 1)
                    for (int64_t kv = 0; kv < Hkv; kv++) { /* new K (normed, rotated) and V into the cache */
                        float *kd = L->k_cache + (kv * m->capacity + slot) * hd;
                        float *vd = L->v_cache + (kv * m->capacity + slot) * hd;
                        gather(qkv_p, nt, nqkv, (Hq + kv) * hd, hd, L->qkv_bias, t);
                        if (L->k_norm) rms_norm(t, L->k_norm, kd, hd, m->eps); else memcpy(kd, t, sizeof(float) * hd);
                        rope(kd, cos, sin, half);
                        gather(qkv_p, nt, nqkv, (Hq + Hkv + kv) * hd, hd, L->qkv_bias, vd);
                    }
                for (int64_t hq = 0; hq < Hq; hq++) { /* every query head, normed and rotated */
                    gather(qkv_p, nt, nqkv, hq * hd, hd, L->qkv_bias, t);
                    if (L->q_norm) rms_norm(t, L->q_norm, qh + hq * hd, hd, m->eps);
                    else memcpy(qh + hq * hd, t, sizeof(float) * hd);
                    rope(qh + hq * hd, cos, sin, half);
                }
                for (int64_t kv = 0; kv < Hkv; kv++) {
                    const int64_t h0 = kv * group;
                    if (s1 > s0)
                        attend_part(m, L, qh + h0 * hd, kv, group, s0, s1, scores, att_m + tid * Hq + h0,
                                    att_l + tid * Hq + h0, att_o + (tid * Hq + h0) * hd);
                    else /* an empty share (more threads than slots): nothing to merge */
                        for (int64_t g2 = 0; g2 < group; g2++) {
                            att_l[tid * Hq + h0 + g2] = 0.0f;
                            att_m[tid * Hq + h0 + g2] = -INFINITY;
                        }
                }
#pragma omp barrier
                attend_merge(att_m, att_l, att_o, nt, Hq, hd, attn);
                rows_of(Hq * hd, tid, nt, &i0, &i1);
                gemv_part(attn, &L->o, NULL, i0, i1, o_p + tid * D);
#pragma omp barrier
                gather(o_p, nt, D, 0, D, L->o_bias, y);
                if (m->gemma) { /* x += norm(o); h = norm(x) with the pre-FFN norm */
                    rms_norm(y, L->post_attn_norm, t, D, m->eps);
                    for (int64_t j = 0; j < D; j++) x[j] += t[j];
                    rms_norm(x, L->pre_ffn_norm, h, D, m->eps);
                } else {
                    for (int64_t j = 0; j < D; j++) x[j] += y[j];
                    rms_norm(x, L->post_attn_norm, h, D, m->eps);
                }
                /* FFN: gate | up | L (gu1, then gu2 appended) */
                const int64_t F = L->n_ff, r = L->rank, n1 = L->gu1.cols, n2 = L->gu2.w ? L->gu2.cols : 0;
                rows_of(D, tid, nt, &i0, &i1);
                gemv_part(h, &L->gu1, NULL, i0, i1, gu_p + tid * GU);
                if (n2) gemv_part(h, &L->gu2, NULL, i0, i1, gu_p + tid * GU + n1);
#pragma omp barrier
                /* z = [act(gate) * up | x L] over this thread's down-projection rows only: the down product
                 * splits its rows the same way, so no thread needs the others' z */
                rows_of(F + r, tid, nt, &i0, &i1);
                const int64_t a0 = i0, a1 = i1 < F ? i1 : F, b0 = i0 > F ? i0 : F;
                if (L->up_t.w) { /* CATS: gate thresholded, then up and down only for the neurons that pass */
                    int64_t nrows = 0;
                    if (a1 > a0) {
                        gather(gu_p, nt, GU, a0, a1 - a0, L->gu_bias, g + a0);
                        gated(m->activation, g + a0, NULL, L->cats_tau, z + a0, a1 - a0);
                    }
                    for (int64_t j = a0; j < a1; j++) {
                        if (z[j] == 0.0f) continue;
                        const float *w = L->up_t.w + j * L->up_t.ld;
                        float u = L->up_bias ? L->up_bias[j] : 0.0f;
#pragma omp simd reduction(+ : u)
                        for (int64_t c = 0; c < D; c++) u += w[c] * h[c];
                        z[j] *= u;
                        rows[nrows++] = (int32_t)j;
                    }
                    const int64_t unread = 2 * ((a1 > a0 ? a1 - a0 : 0) - nrows) * D * (int64_t)sizeof(float);
                    if (i1 > b0) gather(gu_p, nt, GU, b0, i1 - b0, NULL, z + b0); /* bypass j: gu[j] (after gate) */
                    for (int64_t j = b0; j < i1; j++) rows[nrows++] = (int32_t)j;
#pragma omp atomic
                    *skipped += unread;
                    gemv_part(z, &L->down, rows, 0, nrows, down_p + tid * D);
                } else {
                    if (a1 > a0) {
                        gather(gu_p, nt, GU, a0, a1 - a0, L->gu_bias, g + a0);
                        gather(gu_p, nt, GU, F + a0, a1 - a0, L->gu_bias, g + F + a0);
                        gated(m->activation, g + a0, g + F + a0, NULL, z + a0, a1 - a0);
                    }
                    if (i1 > b0) gather(gu_p, nt, GU, F + b0, i1 - b0, L->gu_bias, z + b0); /* bypass j: gu[F + j] */
                    gemv_part(z, &L->down, NULL, i0, i1, down_p + tid * D);
                }
#pragma omp barrier
                gather(down_p, nt, D, 0, D, L->down_bias, y);
                if (m->gemma) {
                    rms_norm(y, L->post_ffn_norm, t, D, m->eps);
                    for (int64_t j = 0; j < D; j++) x[j] += t[j];
                } else {
                    for (int64_t j = 0; j < D; j++) x[j] += y[j];
                }
            }
            rms_norm(x, m->final_norm, h, D, m->eps);
            rows_of(m->vocab, tid, nt, &i0, &i1);
            if (!next) {
                head_full(m, h, i0, i1);
            } else { /* screened: bounds from the int8 copy, then the fp32 rows of the candidates only */
                double ss = 0.0;
                for (int64_t j = 0; j < D; j++) ss += (double)h[j] * h[j];
                const float hn = (float)(sqrt(ss) * (1.0 + 1e-6)); /* |h|_2, rounded up */
                head_screen(m, h, hn, i0, i1, head_lo + tid * HEAD_TOPK_MAX, topk);
#pragma omp barrier
                /* the k-th largest lower bound over all rows: at least k rows have a logit >= it */
                for (int k = 0; k < nt_max; k++)
                    memcpy(lows + k * topk, head_lo + k * HEAD_TOPK_MAX, sizeof(float) * topk);
                const float floor_ = kth_largest(lows, nt_max * topk, topk);
                float best = -INFINITY;
                int32_t arg = -1, cand = 0;
                for (int64_t v = i0; v < i1; v++) {
                    if (!(m->logits[v] + hn * m->head_bound[v] >= floor_)) {
                        m->logits[v] = -INFINITY;
                        continue;
                    }
                    const float d = head_row(m, h, v);
                    m->logits[v] = d;
                    cand++;
                    if (d > best) { best = d; arg = (int32_t)v; }
                }
                head_best[tid] = best;
                head_arg[tid] = arg;
                head_cand[tid] = cand;
            }
        }
        free(x); free(h); free(y); free(g); free(z); free(scores); free(qh); free(t); free(attn); free(rows);
        free(lows);
    }
    if (failed) return 2;
    if (next) { /* the threads' rows are in vocabulary order: the first of equal maxima wins, as argmax does */
        float best = -INFINITY;
        int64_t arg = -1, cand = 0;
        for (int k = 0; k < nt_max; k++) {
            cand += head_cand[k];
            if (head_arg[k] >= 0 && (arg < 0 || head_best[k] > best)) { best = head_best[k]; arg = head_arg[k]; }
        }
        if (arg < 0) return 3;
        next[0] = arg;
        next[1] = cand;
        *skipped += m->vocab * m->hidden * (int64_t)(sizeof(float) - sizeof(int8_t))
                    - m->vocab * (int64_t)(2 * sizeof(float)) - cand * m->hidden * (int64_t)sizeof(float);
    }
    return 0;
}
