/* int4 rows-dot with int8 activations: what an engine exported with --int8-activations computes.
 *
 * Why: int4 rows-dot with fp32 activations is compute-bound (each nibble is looked up as a float and multiplied by
 * one FMA: ~7 elements per cycle on Zen 4, well under the memory's rate), so int4 weights did not run faster than
 * ONNX Runtime GenAI's int4 models, whose MatMulNBits multiplies at accuracy_level 4: activations rounded to int8
 * per block, integer dot products. Such an engine (caprese-export --int8-activations, recorded as the recipe's
 * accuracy_level 4) states that arithmetic, so the kernel may use it too: AVX-512 VNNI's vpdpbusd does 64
 * byte products per instruction (AVX2: vpmaddubsw + vpmaddwd).
 *
 * Definition (tests/test_native_quant_gemv.py recomputes it in float64):
 *   x is cut into blocks of xb = the weight's block when it is 64 or 128 elements long, else 32 (blocks of 32, or
 *   one scale per row of another length);
 *   per block: m = max |x|, s_x = m / 127 (fp32), code_x = round_half_even(x * (127 / m)) (fp32 product), 0 if m = 0;
 *   y[i] = sum over 8-element lanes l: fp32(sum_{c in l} code_w[i, c] * code_x[c]) * (s_w[i, block(l)] * s_x[block(l)])
 * The integer sums are exact; only the per-lane scaling and the final sum round. The error against the graphs'
 * fp32 arithmetic is the activation rounding: at most sum_b s_x[b] / 2 * sum_{c in b} |w_hat[i, c]|.
 *
 * Layout: the int4 byte j holds elements 2j (low nibble) and 2j + 1 (high), so x's codes are kept de-interleaved
 * (xe[j] = code_x[2j], xo[j] = code_x[2j + 1]): one byte load of the weights then pairs with one load of xe and
 * one of xo, and 32-bit lane l of either product covers elements 8l .. 8l + 7. The nibbles are made unsigned
 * (XOR 0x88: code + 8 in [0, 15], vpdpbusd's unsigned operand) and 8 * sum(code_x) per lane is taken out after.
 * x is quantized once per product by the decode step's leader (caprese_qx_quantize) and read by every chunk.
 * Included by quant_gemv.c (QMat, QG_TILE, qg_tile, qg_row_scales, qg_prefetch, QG_PF_BYTES).
 */

typedef struct {
    int8_t *xe, *xo;  /* [cols / 2] */
    int32_t *corr;    /* [cols / 8]: per lane, 8 * the sum of its 8 codes */
    float *sxl;       /* [cols / 8]: per lane, its block's s_x */
    int64_t cols;
} QgX;

/* Bytes of the buffer a QgX of `cols` columns lives in (64-byte aligned parts). */
int64_t caprese_qx_bytes(int64_t cols) { return 2 * (cols / 2 + 64) + 2 * 4 * (cols / 8 + 16) + 64; }

/* Whether w can be multiplied with int8 activations: int4, cols % 32 == 0, blocks of 32 / 64 / 128 or one per row. */
int caprese_qx_fits(const QMat *w) {
    return w->bits == 4 && w->cols % 32 == 0 && (w->block == 32 || w->block == 64 || w->block == 128 ||
                                                 w->block == w->cols);
}

static inline int64_t qx_block(const QMat *w) { return w->block == 64 || w->block == 128 ? w->block : 32; }

/* xq over buf (caprese_qx_bytes(w->cols) bytes): x quantized for w (see the definition at the top). */
void caprese_qx_quantize(const QMat *w, const float *x, void *buf, QgX *xq) {
    const int64_t n = w->cols, xb = qx_block(w);
    uint8_t *b = (uint8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    xq->xe = (int8_t *)b;
    xq->xo = xq->xe + (n / 2 + 63) / 64 * 64;
    xq->corr = (int32_t *)(xq->xo + (n / 2 + 63) / 64 * 64);
    xq->sxl = (float *)(xq->corr + (n / 8 + 15) / 16 * 16);
    xq->cols = n;
    for (int64_t c0 = 0; c0 < n; c0 += xb) {
        float m = 0.0f;
#pragma omp simd reduction(max : m)
        for (int64_t c = c0; c < c0 + xb; c++) m = fabsf(x[c]) > m ? fabsf(x[c]) : m;
        const float inv = m > 0.0f ? 127.0f / m : 0.0f, sx = m / 127.0f;
        int32_t q[128];
#pragma omp simd
        for (int64_t c = 0; c < xb; c++) q[c] = (int32_t)nearbyintf(x[c0 + c] * inv); /* round half to even */
        for (int64_t j = 0; j < xb / 2; j++) {
            xq->xe[c0 / 2 + j] = (int8_t)q[2 * j];
            xq->xo[c0 / 2 + j] = (int8_t)q[2 * j + 1];
        }
        for (int64_t l = 0; l < xb / 8; l++) {
            int32_t s = 0;
            for (int j = 0; j < 8; j++) s += q[8 * l + j];
            xq->corr[c0 / 8 + l] = 8 * s;
            xq->sxl[c0 / 8 + l] = sx;
        }
    }
}

/* Per 32-bit lane (4 weight bytes = 8 elements): a + sum of (code_w + 8) * code_x, for 16 / 8 / 4 lanes (a = -corr
 * takes the offset out in the accumulator's start, one instruction per row and step fewer). */
#if defined(__AVX512BW__)
static inline __m512i qx_d512(__m512i v, __m512i xe, __m512i xo, __m512i a) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x88));
    const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a, lo, xe), hi, xo);
#else
    const __m512i one = _mm512_set1_epi16(1);
    return _mm512_add_epi32(a, _mm512_add_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(lo, xe), one),
                                                _mm512_madd_epi16(_mm512_maddubs_epi16(hi, xo), one)));
#endif
}
#endif
#if defined(__AVX2__)
static inline __m256i qx_d256(__m256i v, __m256i xe, __m256i xo, __m256i a) {
    const __m256i nib = _mm256_set1_epi8(0x0f);
    v = _mm256_xor_si256(v, _mm256_set1_epi8((char)0x88));
    const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(a, lo, xe), hi, xo);
#else
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_add_epi32(a, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xe), one),
                                                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xo), one)));
#endif
}
static inline __m128i qx_d128(__m128i v, __m128i xe, __m128i xo, __m128i a) {
    const __m128i nib = _mm_set1_epi8(0x0f);
    v = _mm_xor_si128(v, _mm_set1_epi8((char)0x88));
    const __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm_dpbusd_epi32(_mm_dpbusd_epi32(a, lo, xe), hi, xo);
#else
    const __m128i one = _mm_set1_epi16(1);
    return _mm_add_epi32(a, _mm_add_epi32(_mm_madd_epi16(_mm_maddubs_epi16(lo, xe), one),
                                          _mm_madd_epi16(_mm_maddubs_epi16(hi, xo), one)));
#endif
}
#endif

/* The 32-element step (4 lanes), for the scalar build and the SIMD builds' tails: d[l] = sum code_w * code_x. */
static inline void qx_lanes32(const uint8_t *p, const int8_t *xe, const int8_t *xo, const int32_t *corr, int32_t d[4]) {
#if defined(__AVX2__)
    _mm_storeu_si128((__m128i *)d, qx_d128(_mm_loadu_si128((const __m128i *)p), _mm_loadu_si128((const __m128i *)xe),
                                           _mm_loadu_si128((const __m128i *)xo),
                                           _mm_sub_epi32(_mm_setzero_si128(), _mm_loadu_si128((const __m128i *)corr))));
#else
    (void)corr;
    for (int l = 0; l < 4; l++) {
        int32_t s = 0;
        for (int j = 4 * l; j < 4 * l + 4; j++)
            s += (((p[j] & 15) ^ 8) - 8) * xe[j] + (((p[j] >> 4) ^ 8) - 8) * xo[j];
        d[l] = s;
    }
#endif
}

/* The scales of blocks i .. i + n - 1 (n <= 4) of one row (sp: its first scale in the tile) in the first n lanes,
 * read without touching scale i + n: a row's last step may end the scale array. Loaded in registers per step:
 * converted into a stack buffer per row and read back, they cost a store-forwarding stall per row. */
#if defined(__AVX2__)
static inline __m128 qx_scales(const void *sp, const int f32s, int64_t i, int n) {
#if defined(__AVX512VL__) && defined(__AVX512BW__)
    const __mmask8 m = (__mmask8)((1u << n) - 1);
    if (f32s) return _mm_maskz_loadu_ps(m, (const float *)sp + i);
    return _mm_cvtph_ps(_mm_maskz_loadu_epi16(m, (const uint16_t *)sp + i));
#else /* the AVX2 build's 64-column step: one or two blocks */
    if (f32s) {
        if (n == 2) return _mm_castpd_ps(_mm_load_sd((const double *)((const float *)sp + i)));
        return _mm_load_ss((const float *)sp + i);
    }
    uint32_t u; /* fixed-size loads: a memcpy of 2 * n bytes became a byte loop, and a store-forwarding stall */
    if (n == 2) {
        memcpy(&u, (const uint16_t *)sp + i, 4);
    } else {
        uint16_t h;
        memcpy(&h, (const uint16_t *)sp + i, 2);
        u = h;
    }
#if defined(__F16C__)
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)u));
#else
    return _mm_setr_ps(qg_half((uint16_t)u), qg_half((uint16_t)(u >> 16)), 0.0f, 0.0f);
#endif
#endif
}

/* [sum a0, sum a1, sum a2, sum a3]: four rows' sums in one shuffle tree (four separate reductions were ~15 % of a
 * 576-column row). */
static inline __m128 qx_hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 c01 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a1, 0x20), _mm256_permute2f128_ps(a0, a1, 0x31));
    const __m256 c23 = _mm256_add_ps(_mm256_permute2f128_ps(a2, a3, 0x20), _mm256_permute2f128_ps(a2, a3, 0x31));
    __m256 d = _mm256_hadd_ps(c01, c23); /* [a0 a0 a2 a2 | a1 a1 a3 a3] (pair sums) */
    d = _mm256_hadd_ps(d, d);            /* [a0 a2 a0 a2 | a1 a3 a1 a3] */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}
#endif

/* out[k] = y of rows[k] (k < nr <= 4) over the column tile [c0, c1) (multiples of 128 but the last c1). */
static inline __attribute__((always_inline)) void qx_dot_tile(const QMat *w, const int f32s, const QgTile *t,
                                                              const int64_t *rows, const int nr, const QgX *q,
                                                              int64_t c0, int64_t c1, float *out) {
    const uint8_t *p[4];
    const void *sp[4];
    const int row_block = w->block == w->cols;
    const int64_t blk = row_block ? c1 - c0 + 128 : w->block; /* ROW: every lane of the tile reads scale 0 */
    const int sh = row_block ? 62 : __builtin_ctzll((unsigned long long)blk); /* c / blk as a shift (32 / 64 / 128) */
    for (int k = 0; k < nr; k++) {
        p[k] = w->codes + rows[k] * t->rb;
        sp[k] = (const uint8_t *)w->scales + (rows[k] * t->nb + t->b0) * (f32s ? 4 : 2);
    }
    float tail[4] = {0, 0, 0, 0};
    int64_t c = c0;
#if defined(__AVX512BW__)
    /* lane l (8 columns) of a 128-column step reads the step's scale (8 l) >> sh, of n512 = 128 / blk (or 1) */
    const __m512i lidx = _mm512_srl_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104,
                                                            112, 120), _mm_cvtsi32_si128(sh));
    const int n512 = blk >= 128 ? 1 : (int)(128 / blk);
    __m512 acc[4];
    for (int k = 0; k < nr; k++) acc[k] = _mm512_setzero_ps();
    for (; c + 128 <= c1; c += 128) {
        const __m512i xe = _mm512_loadu_si512(q->xe + c / 2), xo = _mm512_loadu_si512(q->xo + c / 2);
        const __m512i ncorr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(q->corr + c / 8));
        const __m512 sx = _mm512_loadu_ps(q->sxl + c / 8);
        const int64_t sb = (c - c0) >> sh;
        for (int k = 0; k < nr; k++) {
            const __m512i d = qx_d512(_mm512_loadu_si512(p[k] + c / 2), xe, xo, ncorr);
            const __m512 sw = _mm512_permutexvar_ps(lidx, _mm512_castps128_ps512(qx_scales(sp[k], f32s, sb, n512)));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, sx), acc[k]);
        }
    }
#endif
#if defined(__AVX2__) /* the AVX2 build's loop; in the AVX-512 build, a last 64 columns (576 = 4 x 128 + 64) */
    const __m256i lidx8 = _mm256_srl_epi32(_mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56), _mm_cvtsi32_si128(sh));
    const int n256 = blk >= 64 ? 1 : 2;
    __m256 acc8[4];
    for (int k = 0; k < nr; k++) acc8[k] = _mm256_setzero_ps();
    for (; c + 64 <= c1; c += 64) {
        const __m256i xe = _mm256_loadu_si256((const __m256i *)(q->xe + c / 2));
        const __m256i xo = _mm256_loadu_si256((const __m256i *)(q->xo + c / 2));
        const __m256i ncorr = _mm256_sub_epi32(_mm256_setzero_si256(),
                                               _mm256_loadu_si256((const __m256i *)(q->corr + c / 8)));
        const __m256 sx = _mm256_loadu_ps(q->sxl + c / 8);
        const int64_t sb = (c - c0) >> sh;
        for (int k = 0; k < nr; k++) {
            const __m256i d = qx_d256(_mm256_loadu_si256((const __m256i *)(p[k] + c / 2)), xe, xo, ncorr);
            const __m256 sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(qx_scales(sp[k], f32s, sb, n256)),
                                                       lidx8);
            acc8[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sw, sx), acc8[k]);
        }
    }
#if defined(__AVX512BW__)
    for (int k = 0; k < nr; k++) /* one 256-bit sum per row: the 512-bit halves and the 64-column step */
        acc8[k] = _mm256_add_ps(acc8[k], _mm256_add_ps(_mm512_castps512_ps256(acc[k]),
                                                       _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                                           _mm512_castps_pd(acc[k]), 1))));
#endif
#endif
    for (; c < c1; c += 32) { /* the last 32 / 64 / 96 columns (all of them in the scalar build) */
        for (int k = 0; k < nr; k++) {
            int32_t d[4];
            qx_lanes32(p[k] + c / 2, q->xe + c / 2, q->xo + c / 2, q->corr + c / 8, d);
            for (int l = 0; l < 4; l++) {
                const int64_t b = (c - c0 + 8 * l) >> sh;
                tail[k] = QG_MADD((float)d[l], qg_scale(sp[k], f32s, b) * q->sxl[c / 8 + l], tail[k]);
            }
        }
    }
#if defined(__AVX2__)
    if (nr == 4) {
        _mm_storeu_ps(out, _mm_add_ps(qx_hsum4(acc8[0], acc8[1], acc8[2], acc8[3]), _mm_loadu_ps(tail)));
        return;
    }
    for (int k = 0; k < nr; k++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc8[k]), _mm256_extractf128_ps(acc8[k], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        out[k] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) + tail[k];
    }
#else
    for (int k = 0; k < nr; k++) out[k] = tail[k];
#endif
}
