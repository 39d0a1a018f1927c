/* int4 products with int8 activations: what an engine exported with --int8-activations computes. rows-dot here;
 * GRIFFIN's down (rows-axpy) at the end of the file, with its coefficients in 16 bits (the default) or int8.
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
    int32_t *ncb;     /* [cols / xb]: per block, -8 * the sum of its codes (the r16 rows-dot's start) */
    float *sxb;       /* [cols / xb]: per block, s_x */
    int64_t cols;
} QgX;

/* Bytes of the buffer a QgX of `cols` columns lives in (64-byte aligned parts). */
int64_t caprese_qx_bytes(int64_t cols) { return 2 * (cols / 2 + 64) + 4 * 4 * (cols / 8 + 16) + 64; }

/* Whether w can be multiplied with int8 activations: int4, cols % 32 == 0, blocks of 32 / 64 / 128 or one per row. */
int caprese_qx_fits(const QMat *w) {
    return w->bits == 4 && w->cols % 32 == 0 && (w->block == 32 || w->block == 64 || w->block == 128 ||
                                                 w->block == w->cols);
}

static inline int64_t qx_block(const QMat *w) { return w->block == 64 || w->block == 128 ? w->block : 32; }

#if defined(__AVX2__)
/* max |x[0 .. n)| for n a multiple of 16 */
static inline float qx_abs_max(const float *x, int64_t n) {
#if defined(__AVX512F__)
    __m512 m = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
    return _mm512_reduce_max_ps(m);
#else
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (int64_t c = 0; c < n; c += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + c), abs));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
}

/* The int8 codes of x[0 .. 16) * inv (|x * inv| <= 127), in order. */
static inline __m128i qx_codes16(const float *x, float inv) {
#if defined(__AVX512F__)
    return _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv))));
#else
    const __m256 v = _mm256_set1_ps(inv);
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), v));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), v));
    const __m128i w0 = _mm_packs_epi32(_mm256_castsi256_si128(q0), _mm256_extracti128_si256(q0, 1));
    const __m128i w1 = _mm_packs_epi32(_mm256_castsi256_si128(q1), _mm256_extracti128_si256(q1, 1));
    return _mm_packs_epi16(w0, w1);
#endif
}
#endif

/* xq over buf (caprese_qx_bytes(n) bytes): x[0 .. n) quantized in blocks of xb (n a multiple of xb). */
static void qx_quantize_n(int64_t xb, const float *x, int64_t n, void *buf, QgX *xq) {
    uint8_t *b = (uint8_t *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    xq->xe = (int8_t *)b;
    xq->xo = xq->xe + (n / 2 + 63) / 64 * 64;
    xq->corr = (int32_t *)(xq->xo + (n / 2 + 63) / 64 * 64);
    xq->sxl = (float *)(xq->corr + (n / 8 + 15) / 16 * 16);
    xq->ncb = (int32_t *)(xq->sxl + (n / 8 + 15) / 16 * 16);
    xq->sxb = (float *)(xq->ncb + (n / 8 + 15) / 16 * 16);
    xq->cols = n;
#if defined(__AVX2__)
    /* 16 elements at a time (the generic loop below took ~1 us for 576 elements, 3 or 4 such per layer): codes by
     * vcvtps2dq in the default rounding mode (to nearest, half to even, as nearbyintf), their bytes split into the
     * even / odd elements by one shuffle, each lane's sum of codes by psadbw. */
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t c0 = 0; c0 < n; c0 += xb) {
        const float m = qx_abs_max(x + c0, xb), inv = m > 0.0f ? 127.0f / m : 0.0f, sx = m / 127.0f;
        for (int64_t c = c0; c < c0 + xb; c += 16) {
            const __m128i a = qx_codes16(x + c, inv), b = _mm_shuffle_epi8(a, split);
            _mm_storel_epi64((__m128i *)(xq->xe + c / 2), b);
            _mm_storel_epi64((__m128i *)(xq->xo + c / 2), _mm_unpackhi_epi64(b, b));
            /* each half of a holds the 8 codes of one lane: their sum is that of (code + 128) less 1024 */
            const __m128i sad = _mm_sad_epu8(_mm_xor_si128(a, _mm_set1_epi8((char)0x80)), _mm_setzero_si128());
            xq->corr[c / 8] = 8 * (_mm_cvtsi128_si32(sad) - 1024);
            xq->corr[c / 8 + 1] = 8 * (_mm_extract_epi32(sad, 2) - 1024);
            xq->sxl[c / 8] = xq->sxl[c / 8 + 1] = sx;
        }
        int32_t t = 0;
        for (int64_t l = c0 / 8; l < (c0 + xb) / 8; l++) t += xq->corr[l];
        xq->ncb[c0 / xb] = -t;
        xq->sxb[c0 / xb] = sx;
    }
#else
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
        int32_t t = 0;
        for (int64_t l = c0 / 8; l < (c0 + xb) / 8; l++) t += xq->corr[l];
        xq->ncb[c0 / xb] = -t;
        xq->sxb[c0 / xb] = sx;
    }
#endif
}

/* xq over buf (caprese_qx_bytes(w->cols) bytes): x quantized for w (see the definition at the top). */
void caprese_qx_quantize(const QMat *w, const float *x, void *buf, QgX *xq) {
    qx_quantize_n(qx_block(w), x, w->cols, buf, xq);
}

/* Per 32-bit lane (4 weight bytes = 8 elements): a + sum of (code_w + 8) * code_x, for 16 / 8 / 4 lanes (a = -corr
 * takes the offset out in the accumulator's start, one instruction per row and step fewer). Without VNNI, the two
 * vpmaddubsw results are added in 16 bits before the one vpmaddwd: each is a sum of two products of at most
 * 15 * 128, so their sum (<= 7680 in magnitude) fits, and the int32 lane sums are the same. */
#if defined(__AVX512BW__)
static inline __m512i qx_d512(__m512i v, __m512i xe, __m512i xo, __m512i a) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x88));
    const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a, lo, xe), hi, xo);
#else
    const __m512i one = _mm512_set1_epi16(1);
    return _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xe),
                                                                  _mm512_maddubs_epi16(hi, xo)), one));
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
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe),
                                                                  _mm256_maddubs_epi16(hi, xo)), one));
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
    return _mm_add_epi32(a, _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(lo, xe), _mm_maddubs_epi16(hi, xo)),
                                           one));
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
#else /* the AVX2 build's 128-column step: one, two or four blocks; its 64-column step: one or two */
    if (f32s) {
        if (n == 4) return _mm_loadu_ps((const float *)sp + i);
        if (n == 2) return _mm_castpd_ps(_mm_load_sd((const double *)((const float *)sp + i)));
        return _mm_load_ss((const float *)sp + i);
    }
    uint64_t u; /* fixed-size loads: a memcpy of 2 * n bytes became a byte loop, and a store-forwarding stall */
    if (n == 4) {
        memcpy(&u, (const uint16_t *)sp + i, 8);
    } else if (n == 2) {
        uint32_t w;
        memcpy(&w, (const uint16_t *)sp + i, 4);
        u = w;
    } else {
        uint16_t h;
        memcpy(&h, (const uint16_t *)sp + i, 2);
        u = h;
    }
#if defined(__F16C__)
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)u));
#else
    return _mm_setr_ps(qg_half((uint16_t)u), qg_half((uint16_t)(u >> 16)), qg_half((uint16_t)(u >> 32)),
                       qg_half((uint16_t)(u >> 48)));
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
#if !defined(__AVX512BW__)
    /* 128 columns a step: a row's scales of both halves in one load and conversion (two instructions fewer per
     * row and step than two 64-column steps) */
    const __m256i lidx8h = _mm256_srl_epi32(_mm256_setr_epi32(64, 72, 80, 88, 96, 104, 112, 120),
                                            _mm_cvtsi32_si128(sh));
    const int n128 = blk >= 128 ? 1 : (int)(128 / blk);
    for (; c + 128 <= c1; c += 128) {
        const __m256i xe0 = _mm256_loadu_si256((const __m256i *)(q->xe + c / 2));
        const __m256i xo0 = _mm256_loadu_si256((const __m256i *)(q->xo + c / 2));
        const __m256i xe1 = _mm256_loadu_si256((const __m256i *)(q->xe + c / 2 + 32));
        const __m256i xo1 = _mm256_loadu_si256((const __m256i *)(q->xo + c / 2 + 32));
        const __m256i nc0 = _mm256_sub_epi32(_mm256_setzero_si256(),
                                             _mm256_loadu_si256((const __m256i *)(q->corr + c / 8)));
        const __m256i nc1 = _mm256_sub_epi32(_mm256_setzero_si256(),
                                             _mm256_loadu_si256((const __m256i *)(q->corr + c / 8 + 8)));
        const __m256 sx0 = _mm256_loadu_ps(q->sxl + c / 8), sx1 = _mm256_loadu_ps(q->sxl + c / 8 + 8);
        const int64_t sb = (c - c0) >> sh;
        for (int k = 0; k < nr; k++) {
            const __m256i d0 = qx_d256(_mm256_loadu_si256((const __m256i *)(p[k] + c / 2)), xe0, xo0, nc0);
            const __m256i d1 = qx_d256(_mm256_loadu_si256((const __m256i *)(p[k] + c / 2 + 32)), xe1, xo1, nc1);
            const __m256 s4 = _mm256_castps128_ps256(qx_scales(sp[k], f32s, sb, n128));
            acc8[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(_mm256_permutevar8x32_ps(s4, lidx8), sx0),
                                      acc8[k]);
            acc8[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(_mm256_permutevar8x32_ps(s4, lidx8h), sx1),
                                      acc8[k]);
        }
    }
#endif
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

/* ==================================================================== rows-dot over groups of 16 rows (r16)
 * Why: at a few hundred columns the row-major kernel above is compute-bound near 40 GB/s per Zen 4 core: per 128
 * columns of a row it splits the nibbles, runs two vpdpbusd, then widens the scales, converts and multiplies
 * per 8-column lane, and each row ends in a horizontal sum. Two cores on two CCDs read 64-80 GB/s from DRAM.
 * Layout (caprese_qx_pack_r16, in place: a group keeps its bytes): rows in groups of 16; a group's codes are
 * cols / 8 chunks of 64 bytes, chunk k holding bytes [4k, 4k + 4) (columns 8k .. 8k + 7) of each of its 16 rows
 * (32-bit lane r = row r), every nibble made unsigned (XOR 0x88: code + 8); its scales [blocks][16 rows]. One
 * vpdpbusd then multiplies 8 columns of 16 rows by the same 4 activation bytes (a broadcast), a block's integer
 * sums build up in the lanes, and a block costs one conversion and one FMA for 16 rows, no horizontal sum. The
 * high nibbles are used as 16 * (code + 8) (an AND, no shift): their sum is shifted back once per block, exactly.
 * Definition (every build; tests/test_native_quant_gemv.py recomputes it):
 *   y[i] = f after, for x's blocks b in order (xb columns, qx_block): t = sum_{c in b} code_w[i, c] * code_x[c]
 *   (exact), f = fp32 fma(fp32(t), fp32(s_w[i, b] * s_x[b]), f) (the scalar build: a product, then a sum); a row
 *   block's one scale for every b.
 * Measured (tools/bench_quant_gemv.py, docs/performance.md): 1.4-2x the row-major kernel's rate on
 * cache-resident weights (AVX-512 and AVX2). */
#define QX_R16_PF 8192 /* bytes prefetched ahead of the chunk being read (one stream: a group follows the last) */

int caprese_qx_r16_fits(const QMat *w) { return caprese_qx_fits(w) && w->rows > 0 && w->rows % 16 == 0; }

/* Whether this build's rows-dot is faster over the r16 layout than over rows (the decode step repacks then):
 * the AVX-512 and AVX2 builds (measured: 1.4-2x on cache-resident weights, both); not the scalar one. */
int caprese_qx_r16_preferred(void) {
#if defined(__AVX512BW__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* One group of 16 rows from one layout into the other (to_r16: rows -> r16, else back): codes of rb bytes a row
 * (XOR 0x88 both ways: its own inverse) and nsb scales of ssz bytes a row. */
static void qx_r16_regroup(int64_t rb, int64_t nsb, int64_t ssz, const uint8_t *ci, const uint8_t *si, uint8_t *co,
                           uint8_t *so, const int to_r16) {
    for (int64_t k = 0; k < rb / 4; k++)
        for (int r = 0; r < 16; r++)
            for (int b = 0; b < 4; b++) {
                const int64_t in_rows = r * rb + 4 * k + b, in_r16 = k * 64 + r * 4 + b;
                co[to_r16 ? in_r16 : in_rows] = ci[to_r16 ? in_rows : in_r16] ^ 0x88;
            }
    for (int64_t u = 0; u < nsb; u++)
        for (int r = 0; r < 16; r++) {
            const int64_t in_rows = (r * nsb + u) * ssz, in_r16 = (u * 16 + r) * ssz;
            memcpy(so + (to_r16 ? in_r16 : in_rows), si + (to_r16 ? in_rows : in_r16), (size_t)ssz);
        }
}

/* w's codes and scales (caprese_qx_r16_fits(w), layout rows) rewritten in place in the r16 layout. The caller
 * sets w->layout. 0, or -1 (does not fit), -2 (out of memory). */
int caprese_qx_pack_r16(const QMat *w) {
    if (!caprese_qx_r16_fits(w) || w->layout != QG_ROWS) return -1;
    const int64_t rb = w->cols / 2, nsb = w->cols / w->block, ssz = w->scale_fp32 ? 4 : 2;
    uint8_t *tmp = malloc((size_t)(16 * rb + 16 * nsb * ssz));
    if (!tmp) return -2;
    uint8_t *codes = (uint8_t *)w->codes, *scales = (uint8_t *)w->scales, *ts = tmp + 16 * rb;
    for (int64_t g = 0; g < w->rows / 16; g++) { /* a group keeps its bytes: copied out, then regrouped back */
        uint8_t *c = codes + g * 16 * rb, *s = scales + g * 16 * nsb * ssz;
        memcpy(tmp, c, (size_t)(16 * rb));
        memcpy(ts, s, (size_t)(16 * nsb * ssz));
        qx_r16_regroup(rb, nsb, ssz, tmp, ts, c, s, 1);
    }
    free(tmp);
    return 0;
}

/* Group g of w (r16 layout) back in rows: its 16 rows' codes into codes [16, cols / 2] and scales into scales
 * [16, blocks] (the rows layout's bytes), for the fp32-activation kernels (caprese_q_rows_dot on an r16 matrix). */
static void qx_r16_unpack_group(const QMat *w, int64_t g, uint8_t *codes, uint8_t *scales) {
    const int64_t rb = w->cols / 2, nsb = w->cols / w->block, ssz = w->scale_fp32 ? 4 : 2;
    qx_r16_regroup(rb, nsb, ssz, w->codes + g * 16 * rb, (const uint8_t *)w->scales + g * 16 * nsb * ssz, codes,
                   scales, 0);
}

/* out[0 .. 16) = the 16 rows of group g (r16 layout) times q, over x's blocks [u0, u0 + nu) (q holds those blocks
 * only, from its start); codes are requested pf bytes ahead. */
static inline __attribute__((always_inline)) void qx_r16_group(const QMat *w, const int f32s, const QgX *q,
                                                               int64_t g, int64_t u0, int64_t nu, int64_t pf,
                                                               float *out) {
    const int64_t xb = qx_block(w), cpu = xb / 8, gb = 8 * w->cols; /* group bytes */
    const int row_block = w->block == w->cols;
    const uint8_t *p = w->codes + g * gb + u0 * cpu * 64;
    const int64_t gsb = 16 * (row_block ? 1 : w->cols / xb) * (f32s ? 4 : 2); /* a group's scale bytes */
    const uint8_t *sp = (const uint8_t *)w->scales + g * gsb + (row_block ? 0 : u0 * 16 * (f32s ? 4 : 2));
    const int32_t *xe = (const int32_t *)q->xe, *xo = (const int32_t *)q->xo; /* 4 codes (8 columns) a chunk */
    const int64_t ssb = (row_block ? 16 : 16 * nu) * (f32s ? 4 : 2); /* the scale bytes read here */
    for (int64_t k = 0; k < ssb; k += 64) __builtin_prefetch(sp + 2 * gsb + k, 0, 2); /* the group after next's */
#if defined(__AVX512BW__)
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
#if defined(__AVX512VNNI__)
    const __m512i hi4 = _mm512_set1_epi8((char)0xf0);
#else
    const __m512i one = _mm512_set1_epi16(1);
#endif
    __m512 f = _mm512_setzero_ps(), sw = _mm512_setzero_ps();
    for (int64_t u = 0; u < nu; u++) {
        if (u == 0 || !row_block)
            sw = f32s ? _mm512_loadu_ps((const float *)sp + (row_block ? 0 : 16 * u))
                      : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)sp + 16 * u)));
        __m512i lo = _mm512_set1_epi32(q->ncb[u]);
#if defined(__AVX512VNNI__)
        __m512i hi = _mm512_setzero_si512();
        for (int64_t k = u * cpu; k < (u + 1) * cpu; k++) {
            __builtin_prefetch(p + k * 64 + pf, 0, 2);
            const __m512i v = _mm512_loadu_si512(p + k * 64);
            lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(v, lo4), _mm512_set1_epi32(xe[k]));
            hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(v, hi4), _mm512_set1_epi32(xo[k]));
        }
        lo = _mm512_add_epi32(lo, _mm512_srai_epi32(hi, 4));
#else /* pair sums of vpmaddubsw <= 2 * 15 * 127 each, four chunks' of both nibbles <= 30480: int16 */
        for (int64_t k0 = u * cpu; k0 < (u + 1) * cpu; k0 += 4) {
            __m512i s16 = _mm512_setzero_si512();
            for (int64_t k = k0; k < k0 + 4; k++) {
                __builtin_prefetch(p + k * 64 + pf, 0, 2);
                const __m512i v = _mm512_loadu_si512(p + k * 64);
                s16 = _mm512_add_epi16(s16, _mm512_add_epi16(
                    _mm512_maddubs_epi16(_mm512_and_si512(v, lo4), _mm512_set1_epi32(xe[k])),
                    _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(v, 4), lo4), _mm512_set1_epi32(xo[k]))));
            }
            lo = _mm512_add_epi32(lo, _mm512_madd_epi16(s16, one));
        }
#endif
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(sw, _mm512_set1_ps(q->sxb[u])), f);
    }
    _mm512_storeu_ps(out, f);
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__) /* rows 0-7 and 8-15: the chunk's two halves */
    const __m256i lo4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi16(1);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps(), sw0 = f0, sw1 = f0;
    for (int64_t u = 0; u < nu; u++) {
        if (u == 0 || !row_block) {
            const int64_t o = row_block ? 0 : 16 * u;
            sw0 = f32s ? _mm256_loadu_ps((const float *)sp + o)
                       : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)sp + o)));
            sw1 = f32s ? _mm256_loadu_ps((const float *)sp + o + 8)
                       : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)sp + o + 8)));
        }
        __m256i a0 = _mm256_set1_epi32(q->ncb[u]), a1 = a0;
        for (int64_t k0 = u * cpu; k0 < (u + 1) * cpu; k0 += 4) { /* int16 sums of four chunks, as above */
            __m256i s0 = _mm256_setzero_si256(), s1 = s0;
            for (int64_t k = k0; k < k0 + 4; k++) {
                __builtin_prefetch(p + k * 64 + pf, 0, 2);
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(p + k * 64));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(p + k * 64 + 32));
                const __m256i e = _mm256_set1_epi32(xe[k]), o = _mm256_set1_epi32(xo[k]);
                s0 = _mm256_add_epi16(s0, _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(v0, lo4), e),
                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), lo4), o)));
                s1 = _mm256_add_epi16(s1, _mm256_add_epi16(
                    _mm256_maddubs_epi16(_mm256_and_si256(v1, lo4), e),
                    _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), lo4), o)));
            }
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(s0, one));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(s1, one));
        }
        const __m256 sx = _mm256_set1_ps(q->sxb[u]);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(sw0, sx), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(sw1, sx), f1);
    }
    _mm256_storeu_ps(out, f0);
    _mm256_storeu_ps(out + 8, f1);
#else
    const int8_t *xeb = (const int8_t *)xe, *xob = (const int8_t *)xo;
    for (int r = 0; r < 16; r++) {
        float f = 0.0f;
        for (int64_t u = 0; u < nu; u++) {
            int32_t t = q->ncb[u];
            for (int64_t k = u * cpu; k < (u + 1) * cpu; k++)
                for (int b = 0; b < 4; b++) {
                    const uint8_t v = p[k * 64 + r * 4 + b];
                    t += (v & 15) * xeb[4 * k + b] + (v >> 4) * xob[4 * k + b];
                }
            f = QG_MADD((float)t, qg_scale(sp, f32s, row_block ? r : 16 * u + r) * q->sxb[u], f);
        }
        out[r] = f;
    }
#endif
}

/* y[i] for i in [r0, r1) (rows idx[i] when given: one group per row, for tests) over the r16 layout. */
static inline __attribute__((always_inline)) void qx_r16_range(const QMat *w, const int f32s, const QgX *q,
                                                               const int64_t *idx, int64_t r0, int64_t r1,
                                                               float *y) {
    float tmp[16] __attribute__((aligned(64)));
    if (idx) {
        for (int64_t i = r0; i < r1; i++) {
            qx_r16_group(w, f32s, q, idx[i] / 16, 0, w->cols / qx_block(w), QX_R16_PF, tmp);
            y[i] = tmp[idx[i] % 16];
        }
        return;
    }
    const int64_t gb = 8 * w->cols, end = (r1 + 15) / 16 * gb;
    for (int64_t k = r0 / 16 * gb; k < r0 / 16 * gb + QX_R16_PF && k < end; k += 64) /* the stream's start */
        __builtin_prefetch(w->codes + k, 0, 2);
    for (int64_t i = r0; i < r1;) {
        const int64_t g = i / 16, e = 16 * g + 16 < r1 ? 16 * g + 16 : r1;
        if (i == 16 * g && e == 16 * g + 16) {
            qx_r16_group(w, f32s, q, g, 0, w->cols / qx_block(w), QX_R16_PF, y + i);
        } else { /* a range that cuts a group: the whole group, then its rows in the range */
            qx_r16_group(w, f32s, q, g, 0, w->cols / qx_block(w), QX_R16_PF, tmp);
            memcpy(y + i, tmp + (i - 16 * g), sizeof(float) * (size_t)(e - i));
        }
        i = e;
    }
}

static void qx_r16_rows(const QMat *w, const QgX *q, const int64_t *idx, int64_t r0, int64_t r1, float *y) {
    if (w->scale_fp32) qx_r16_range(w, 1, q, idx, r0, r1, y);
    else qx_r16_range(w, 0, q, idx, r0, r1, y);
}

/* y[i] for i in [r0, r1) (r0, r1 multiples of 16) over columns [c0, c1) of w (r16 layout; c0, c1 multiples of
 * x's block qx_block(w)), q holding x[c0 .. c1) quantized in w's blocks (qx_quantize_n): the decode step's down
 * product per neuron chunk of a dense FFN, a partial sum. The same definition as over all columns, on those blocks;
 * each group's columns are a run of its 64-byte chunks, the same run of the group after next requested ahead. */
void caprese_q_rows_dot_qx_cols(const QMat *w, const QgX *q, int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                float *y) {
    const int64_t xb = qx_block(w), u0 = c0 / xb, nu = (c1 - c0) / xb, pf = 2 * 8 * w->cols;
    for (int64_t g = r0 / 16; g < r1 / 16; g++) {
        if (w->scale_fp32) qx_r16_group(w, 1, q, g, u0, nu, pf, y + 16 * g);
        else qx_r16_group(w, 0, q, g, u0, nu, pf, y + 16 * g);
    }
}

/* ==================================================================== rows-axpy with int8 activations
 * GRIFFIN's down product, stored [F, D] with blocks along D (the kept neurons' whole rows):
 *   y[c] += sum_i h[i] * s_w[row_i, block(c)] * code_w[row_i, c]
 * In fp32 each element costs a nibble-to-float conversion and an FMA (~10 GB/s per Zen 4 core, half of what the
 * int8 rows-dot streams). With int8 activations it is integer dot products, as rows-dot's:
 *   rows [r0, r1) of a call in groups of QA_GROUP from r0 (the last one shorter); per group g and column block b:
 *     a[i] = fp32(h[i] * s_w[row_i, b]);  m = max |a| over the group;  s_a = m / 127,  alpha[i] =
 *     round_half_even(a[i] * (127 / m)) (fp32 products; 0 if m = 0)
 *   y[c] += sum over groups, in order: fp32(sum_{i in g} alpha[i] * code_w[row_i, c]) * s_a(g, block(c))
 * The integer sums are exact; each group's term is one FMA into the call's fp32 partial, added to y at the end.
 * Against the fp32 definition the error is the activations' rounding: at most sum_g s_a / 2 * sum_i |code_w|.
 *
 * vpdpbusd multiplies 4 consecutive bytes of one operand with 4 of the other, so the weights of 4 ROWS of one
 * column must share a 32-bit lane: 4 rows' 64-byte pieces (128 columns) are split into nibbles (made unsigned:
 * XOR 0x88, code + 8, the 8 * sum(alpha) taken out in the accumulator's start) and interleaved in registers by
 * in-lane byte / word unpacks. Lane l (128 bits) of the results then holds the columns [32 l, 32 l + 32) of the
 * piece, one block of 32 (or a part of a 64 / 128 / row block): the activations' operand is 4 alphas (4 rows)
 * per lane, its block's. The accumulators hold the columns in that unpacked order; the call puts them back.
 * AVX2: 64 columns per piece (2 lanes), vpmaddubsw + vpmaddwd. The scalar build computes the same sums. */
#define QA_GROUP 32
/* 16-bit coefficients ("wide", caprese_q_rows_axpy_qw): alpha in [-QA_WIDE, QA_WIDE] is split as 256 hi + lo, both
 * int8 (lo in [-128, 127], hi in [-127, 127]), and the same unpacked codes take vpdpbusd with each: the integer
 * sum 256 sum(code hi) + sum(code lo) is exact. 127 * 256: the largest level whose hi stays in int8. */
#define QA_WIDE 32512.0f
#if defined(__AVX512BW__)
#define QA_LANES 4
#elif defined(__AVX2__)
#define QA_LANES 2
#else
#define QA_LANES 0
#endif
#define QA_CW (QA_LANES ? 32 * QA_LANES : 32) /* columns per piece */

/* Whether w can take int8-activation rows-axpy: int4, columns a multiple of 32, blocks of 32 / 64 / 128 or a row. */
int caprese_qa_fits(const QMat *w) {
    return w->bits == 4 && w->cols % 32 == 0 &&
           (w->block == 32 || w->block == 64 || w->block == 128 || w->block == w->cols);
}

/* One group's activations over the tile's blocks [b0, b0 + nbt): alpha32[s * QA_BP + b] = the 4 alphas of rows
 * 4s .. 4s + 3 (bytes, rows past the group 0), sa[b] = s_a, nc[b] = -8 * sum of alpha (the unsigned codes' offset).
 * Vectorized over the blocks (a per-element conversion of the scales cost as much as the products). */
#define QA_BP (QG_TILE_BLOCKS + 4) /* + 4: a piece's 4-lane loads may read past the tile's last block */
/* Zero the 4 blocks past a tile's n: the pad the pieces' 4-lane loads may read (nsub row quads). */
static inline void qa_zero_pad(int64_t n, int nsub, uint32_t *alpha32, uint32_t *alo32, float *sa, int32_t *nc) {
    for (int j = 0; j < 4; j++) {
        sa[n + j] = 0.0f;
        nc[n + j] = 0;
        for (int s = 0; s < nsub; s++) alpha32[s * QA_BP + n + j] = alo32[s * QA_BP + n + j] = 0;
    }
}
#if QA_LANES
/* 16 blocks' bytes of 4 rows -> dst[b] = the 4 rows' bytes of block b (row 4s + k in byte k). SSE2: the quads
 * layout's packing below uses it in the AVX2 builds too. */
static inline void qa_store_quads(uint32_t *dst, const __m128i *q8) {
    const __m128i t01l = _mm_unpacklo_epi8(q8[0], q8[1]), t01h = _mm_unpackhi_epi8(q8[0], q8[1]);
    const __m128i t23l = _mm_unpacklo_epi8(q8[2], q8[3]), t23h = _mm_unpackhi_epi8(q8[2], q8[3]);
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(t01l, t23l));
    _mm_storeu_si128((__m128i *)(dst + 4), _mm_unpackhi_epi16(t01l, t23l));
    _mm_storeu_si128((__m128i *)(dst + 8), _mm_unpacklo_epi16(t01h, t23h));
    _mm_storeu_si128((__m128i *)(dst + 12), _mm_unpackhi_epi16(t01h, t23h));
}
#endif
#if QA_LANES == 4
/* AVX-512: 16 blocks at a time, masked; the generic loops below spent as long as the products themselves. */
static inline __attribute__((always_inline)) void qa_quantize(const QMat *w, const int f32s, const int wide,
                                                               const QgTile *t, const float *h, const int64_t *rows,
                                                               int nr, uint32_t *alpha32, uint32_t *alo32, float *sa,
                                                               int32_t *nc) {
    float a[QA_GROUP][QG_TILE_BLOCKS] __attribute__((aligned(64)));
    const int64_t n = t->nbt;
    const int nsub = (nr + 3) / 4;
    const float levels = wide ? QA_WIDE : 127.0f;
    for (int64_t b = 0; b < n; b += 16) {
        const __mmask16 mask = n - b >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - b)) - 1);
        __m512 m = _mm512_setzero_ps();
        for (int r = 0; r < nr; r++) {
            const int64_t at = rows[r] * t->nb + t->b0 + b;
            const __m512 sw = f32s ? _mm512_maskz_loadu_ps(mask, (const float *)w->scales + at)
                                   : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)w->scales + at));
            const __m512 av = _mm512_mul_ps(sw, _mm512_set1_ps(h[r]));
            _mm512_store_ps(a[r] + b, av);
            m = _mm512_max_ps(m, _mm512_abs_ps(av));
        }
        const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(levels), m);
        _mm512_storeu_ps(sa + b, _mm512_div_ps(m, _mm512_set1_ps(levels)));
        __m512i sum = _mm512_setzero_si512();
        for (int s = 0; s < nsub; s++) { /* row 4s + k's byte into byte k of each block's lane: shifts and masks */
            __m512i q4 = _mm512_setzero_si512(), l4 = q4;
            for (int k = 0; k < 4; k++) {
                const int r = 4 * s + k;
                /* the default rounding mode: to nearest, half to even, as nearbyintf */
                const __m512i q = r < nr ? _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(a[r] + b), inv))
                                         : _mm512_setzero_si512();
                sum = _mm512_add_epi32(sum, q);
                const __m512i byte_k = _mm512_set1_epi32((int)(0xffu << (8 * k)));
                if (wide) { /* q = 256 hi + lo, lo in [-128, 127] */
                    const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
                    const __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
                    q4 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(hi, 8 * k), byte_k, q4, 0xEA); /* (A & B) | C */
                    l4 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(lo, 8 * k), byte_k, l4, 0xEA);
                } else {
                    q4 = _mm512_ternarylogic_epi32(_mm512_slli_epi32(q, 8 * k), byte_k, q4, 0xEA);
                }
            }
            _mm512_mask_storeu_epi32(alpha32 + s * QA_BP + b, mask, q4);
            if (wide) _mm512_mask_storeu_epi32(alo32 + s * QA_BP + b, mask, l4);
        }
        _mm512_storeu_si512(nc + b, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-8)));
    }
    qa_zero_pad(n, nsub, alpha32, alo32, sa, nc);
}
#else
static inline __attribute__((always_inline)) void qa_quantize(const QMat *w, const int f32s, const int wide,
                                                               const QgTile *t, const float *h, const int64_t *rows,
                                                               int nr, uint32_t *alpha32, uint32_t *alo32, float *sa,
                                                               int32_t *nc) {
    const float levels = wide ? QA_WIDE : 127.0f;
    float a[QA_GROUP][QG_TILE_BLOCKS], m[QG_TILE_BLOCKS], inv[QG_TILE_BLOCKS];
    int32_t q[QA_GROUP][QG_TILE_BLOCKS];
    const int64_t n = t->nbt;
    for (int r = 0; r < nr; r++) {
        const float *s = qg_row_scales(w, f32s, rows[r], t, a[r]);
        const float hr = h[r];
#pragma omp simd
        for (int64_t b = 0; b < n; b++) a[r][b] = hr * s[b];
    }
#pragma omp simd
    for (int64_t b = 0; b < n; b++) m[b] = 0.0f;
    for (int r = 0; r < nr; r++)
#pragma omp simd
        for (int64_t b = 0; b < n; b++) m[b] = fabsf(a[r][b]) > m[b] ? fabsf(a[r][b]) : m[b];
#pragma omp simd
    for (int64_t b = 0; b < n; b++) {
        inv[b] = m[b] > 0.0f ? levels / m[b] : 0.0f;
        sa[b] = m[b] / levels;
        nc[b] = 0;
    }
    for (int r = 0; r < QA_GROUP; r++)
#pragma omp simd
        for (int64_t b = 0; b < n; b++) q[r][b] = r < nr ? (int32_t)nearbyintf(a[r][b] * inv[b]) : 0;
    for (int s = 0; s < QA_GROUP / 4; s++)
#pragma omp simd
        for (int64_t b = 0; b < n; b++) {
            int32_t hi[4], lo[4];
            for (int k = 0; k < 4; k++) { /* wide: q = 256 hi + lo, lo in [-128, 127] */
                const int32_t v = q[4 * s + k][b];
                hi[k] = wide ? (v + 128) >> 8 : v;
                lo[k] = wide ? v - hi[k] * 256 : 0;
            }
            alpha32[s * QA_BP + b] = ((uint32_t)hi[0] & 255u) | ((uint32_t)hi[1] & 255u) << 8 |
                                     ((uint32_t)hi[2] & 255u) << 16 | ((uint32_t)hi[3] & 255u) << 24;
            alo32[s * QA_BP + b] = ((uint32_t)lo[0] & 255u) | ((uint32_t)lo[1] & 255u) << 8 |
                                   ((uint32_t)lo[2] & 255u) << 16 | ((uint32_t)lo[3] & 255u) << 24;
            nc[b] -= 8 * (q[4 * s][b] + q[4 * s + 1][b] + q[4 * s + 2][b] + q[4 * s + 3][b]);
        }
    qa_zero_pad(n, QA_GROUP / 4, alpha32, alo32, sa, nc);
}
#endif

/* y[c0 .. c1) += yp in natural order. A piece's column j = 32 l + 8 k + 2 m + odd (l: lane) sits in vector
 * 4 odd + k, element 4 l + m (the piece's byte 16 l + 4 k + m): interleaving vectors k and 4 + k gives lane l's
 * columns 8 k .. 8 k + 7, a 4 x 4 transpose of lanes (AVX2: 2 x 2) puts them in order. */
static void qa_finish(const float *yp, int64_t c0, int64_t c1, float *y) {
#if QA_LANES == 4
    for (int64_t c = c0; c < c1; c += QA_CW) {
        const float *q = yp + (c - c0);
        __m512 lo[4], hi[4];
        for (int k = 0; k < 4; k++) {
            const __m512 e = _mm512_loadu_ps(q + 16 * k), o = _mm512_loadu_ps(q + 16 * (4 + k));
            lo[k] = _mm512_unpacklo_ps(e, o); /* lane l: columns 32 l + 8 k + 0..3 */
            hi[k] = _mm512_unpackhi_ps(e, o); /* 32 l + 8 k + 4..7 */
        }
        for (int half = 0; half < 2; half++) {
            const int k = 2 * half;
            const __m512 t0 = _mm512_shuffle_f32x4(lo[k], hi[k], 0x44), t1 = _mm512_shuffle_f32x4(lo[k], hi[k], 0xee);
            const __m512 t2 = _mm512_shuffle_f32x4(lo[k + 1], hi[k + 1], 0x44);
            const __m512 t3 = _mm512_shuffle_f32x4(lo[k + 1], hi[k + 1], 0xee);
            const __m512 r[4] = {_mm512_shuffle_f32x4(t0, t2, 0x88), _mm512_shuffle_f32x4(t0, t2, 0xdd),
                                 _mm512_shuffle_f32x4(t1, t3, 0x88), _mm512_shuffle_f32x4(t1, t3, 0xdd)};
            for (int l = 0; l < 4; l++) {
                float *d = y + c + 32 * l + 16 * half;
                if (c + 32 * l + 16 * half < c1) _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), r[l]));
            }
        }
    }
#elif QA_LANES == 2
    for (int64_t c = c0; c < c1; c += QA_CW) {
        const float *q = yp + (c - c0);
        for (int k = 0; k < 4; k++) {
            const __m256 e = _mm256_loadu_ps(q + 8 * k), o = _mm256_loadu_ps(q + 8 * (4 + k));
            const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o);
            float *d0 = y + c + 8 * k, *d1 = y + c + 32 + 8 * k;
            _mm256_storeu_ps(d0, _mm256_add_ps(_mm256_loadu_ps(d0), _mm256_permute2f128_ps(lo, hi, 0x20)));
            if (c + 32 < c1) _mm256_storeu_ps(d1, _mm256_add_ps(_mm256_loadu_ps(d1), _mm256_permute2f128_ps(lo, hi, 0x31)));
        }
    }
#else
    for (int64_t c = c0; c < c1; c++) y[c] += yp[c - c0];
#endif
}

/* The piece's vector operations at the build's width: 512 bits (4 lanes, a piece's bytes loaded under a mask) or
 * 256 (2 lanes; `part` says whether only the first 32 columns exist). */
#if QA_LANES == 4
typedef __m512i qa_vi;
typedef __mmask64 qa_part;
#define QA_SET8(b) _mm512_set1_epi8(b)
#define QA_XOR(a, b) _mm512_xor_si512(a, b)
#define QA_AND(a, b) _mm512_and_si512(a, b)
#define QA_SRL16(a, n) _mm512_srli_epi16(a, n)
#define QA_UNPLO8(a, b) _mm512_unpacklo_epi8(a, b)
#define QA_UNPHI8(a, b) _mm512_unpackhi_epi8(a, b)
#define QA_UNPLO16(a, b) _mm512_unpacklo_epi16(a, b)
#define QA_UNPHI16(a, b) _mm512_unpackhi_epi16(a, b)
#define QA_ADD32(a, b) _mm512_add_epi32(a, b)
#define QA_SLL32(a, n) _mm512_slli_epi32(a, n)
typedef __m512 qa_vf;
static inline qa_vi qa_load(const uint8_t *p, qa_part mask) { return _mm512_maskz_loadu_epi8(mask, p); }
static inline qa_part qa_part_of(int64_t cols_left) { /* the piece's bytes of each row */
    return cols_left >= 128 ? ~(__mmask64)0 : (((__mmask64)1 << (cols_left / 2)) - 1);
}
static inline qa_vi qa_bidx(int sh) { /* element e lies in lane e / 4: that lane's block, from the piece's first */
    return _mm512_srl_epi32(_mm512_setr_epi32(0, 0, 0, 0, 32, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 96),
                            _mm_cvtsi32_si128(sh));
}
static inline qa_vi qa_lanes_i(qa_vi bidx, const void *p) { /* 4 int32 at p, each lane its block's */
    return _mm512_permutexvar_epi32(bidx, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p)));
}
static inline qa_vf qa_lanes_f(qa_vi bidx, const float *p) {
    return _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}
static inline void qa_flush(float *q, qa_vi acc, qa_vf sv) { /* q += float(acc) * sv */
    _mm512_storeu_ps(q, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, _mm512_loadu_ps(q)));
}
static inline __attribute__((always_inline)) qa_vi qa_dp(qa_vi acc, qa_vi codes, qa_vi act) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, codes, act);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, act), _mm512_set1_epi16(1)));
#endif
}
#elif QA_LANES == 2
typedef __m256i qa_vi;
typedef int qa_part; /* 1: the first 32 columns only */
#define QA_SET8(b) _mm256_set1_epi8(b)
#define QA_XOR(a, b) _mm256_xor_si256(a, b)
#define QA_AND(a, b) _mm256_and_si256(a, b)
#define QA_SRL16(a, n) _mm256_srli_epi16(a, n)
#define QA_UNPLO8(a, b) _mm256_unpacklo_epi8(a, b)
#define QA_UNPHI8(a, b) _mm256_unpackhi_epi8(a, b)
#define QA_UNPLO16(a, b) _mm256_unpacklo_epi16(a, b)
#define QA_UNPHI16(a, b) _mm256_unpackhi_epi16(a, b)
#define QA_ADD32(a, b) _mm256_add_epi32(a, b)
#define QA_SLL32(a, n) _mm256_slli_epi32(a, n)
typedef __m256 qa_vf;
static inline qa_vi qa_load(const uint8_t *p, qa_part half) {
    return half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_si256((const __m256i *)p);
}
static inline qa_part qa_part_of(int64_t cols_left) { return cols_left < 64; }
static inline qa_vi qa_bidx(int sh) {
    return _mm256_srl_epi32(_mm256_setr_epi32(0, 0, 0, 0, 32, 32, 32, 32), _mm_cvtsi32_si128(sh));
}
static inline qa_vi qa_lanes_i(qa_vi bidx, const void *p) {
    return _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)), bidx);
}
static inline qa_vf qa_lanes_f(qa_vi bidx, const float *p) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), bidx);
}
static inline void qa_flush(float *q, qa_vi acc, qa_vf sv) {
    _mm256_storeu_ps(q, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), sv, _mm256_loadu_ps(q)));
}
static inline __attribute__((always_inline)) qa_vi qa_dp(qa_vi acc, qa_vi codes, qa_vi act) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, codes, act);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, act), _mm256_set1_epi16(1)));
#endif
}
#endif

#if QA_LANES
/* The 8 accumulators of one piece (even columns 0..3, odd 4..7) += 4 rows' codes times act (4 alphas per lane). */
static inline __attribute__((always_inline)) void qa_piece(const uint8_t *const *p, int64_t off, qa_part part,
                                                           const int wide, qa_vi act, qa_vi *acc, qa_vi act_lo,
                                                           qa_vi *acc_lo) {
    const qa_vi nib = QA_SET8(0x0f), x88 = QA_SET8((char)0x88);
    qa_vi lo[4], hi[4];
    for (int r = 0; r < 4; r++) {
        const qa_vi v = QA_XOR(qa_load(p[r] + off, part), x88);
        lo[r] = QA_AND(v, nib);
        hi[r] = QA_AND(QA_SRL16(v, 4), nib);
    }
    for (int odd = 0; odd < 2; odd++) {
        const qa_vi *u = odd ? hi : lo;
        const qa_vi t01l = QA_UNPLO8(u[0], u[1]), t01h = QA_UNPHI8(u[0], u[1]);
        const qa_vi t23l = QA_UNPLO8(u[2], u[3]), t23h = QA_UNPHI8(u[2], u[3]);
        const qa_vi v[4] = {QA_UNPLO16(t01l, t23l), QA_UNPHI16(t01l, t23l), QA_UNPLO16(t01h, t23h),
                            QA_UNPHI16(t01h, t23h)};
        for (int k = 0; k < 4; k++) {
            acc[4 * odd + k] = qa_dp(acc[4 * odd + k], v[k], act);
            if (wide) acc_lo[4 * odd + k] = qa_dp(acc_lo[4 * odd + k], v[k], act_lo);
        }
    }
}
#endif

/* One group (rows[0 .. nr), nr <= QA_GROUP) over the column tile [c0, c1): yp (the tile's fp32 partial, in the
 * pieces' unpacked order) += its term. */
static inline __attribute__((always_inline)) void qa_group(const QMat *w, const int f32s, const int wide,
                                                           const QgTile *t, const float *h, const int64_t *rows,
                                                           int nr, const uint8_t *const *pn, int64_t c0, int64_t c1,
                                                           float *yp) {
    uint32_t alpha32[QA_GROUP / 4 * QA_BP], alo32[QA_GROUP / 4 * QA_BP];
    float sa[QA_BP];
    int32_t nc[QA_BP];
    qa_quantize(w, f32s, wide, t, h, rows, nr, alpha32, alo32, sa, nc);
    const uint8_t *p[QA_GROUP];
    for (int r = 0; r < QA_GROUP; r++) p[r] = w->codes + rows[r < nr ? r : 0] * t->rb; /* pad rows: alpha 0 */
    const int row_block = w->block == w->cols;
    const int sh = row_block ? 62 : __builtin_ctzll((unsigned long long)w->block);
#if QA_LANES
    const int nsub = (nr + 3) / 4;
    const qa_vi bidx = qa_bidx(sh);
    for (int64_t c = c0; c < c1; c += QA_CW) {
        const int64_t cb = (c - c0) >> sh; /* the piece's first block, from the tile's */
        const qa_part part = qa_part_of(c1 - c);
        qa_vi acc[8], alo[8]; /* wide: the sum is 256 acc + alo, the offset in alo */
        const qa_vi start = qa_lanes_i(bidx, nc + cb);
        for (int k = 0; k < 8; k++) {
            acc[k] = wide ? QA_XOR(start, start) : start;
            alo[k] = start;
        }
        for (int s = 0; s < nsub; s++) {
            qa_piece(p + 4 * s, (c >> 1), part, wide, qa_lanes_i(bidx, alpha32 + s * QA_BP + cb), acc,
                     wide ? qa_lanes_i(bidx, alo32 + s * QA_BP + cb) : start, alo);
            for (int k = 0; k < 4; k++) __builtin_prefetch(pn[4 * s + k] + (c >> 1), 0, 2); /* the next group's */
        }
        const qa_vf sv = qa_lanes_f(bidx, sa + cb);
        for (int k = 0; k < 8; k++)
            qa_flush(yp + (c - c0) + 4 * QA_LANES * k, wide ? QA_ADD32(QA_SLL32(acc[k], 8), alo[k]) : acc[k], sv);
    }
#else
    (void)pn;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t b = (c - c0) >> sh;
        int32_t d = nc[b];
        for (int r = 0; r < nr; r++) {
            const int code = ((p[r][c >> 1] >> ((c & 1) * 4)) & 15) ^ 8; /* code + 8, as the SIMD builds */
            const int sh = 8 * (r & 3);
            d += code * (int8_t)(alpha32[(r >> 2) * QA_BP + b] >> sh) * (wide ? 256 : 1);
            if (wide) d += code * (int8_t)(alo32[(r >> 2) * QA_BP + b] >> sh);
        }
        yp[c - c0] = QG_MADD((float)d, sa[b], yp[c - c0]);
    }
#endif
}

/* rows-axpy with int8 activations (the definition above): y[c] += ... for i in [r0, r1) (row_i = idx[i] or i;
 * h indexed by i); caprese_qa_fits(w) must hold. Rows past r1 (up to h_end, idx NULL) are prefetched for the
 * caller's next chunk. */
static inline __attribute__((always_inline)) void qa_rows_axpy(const QMat *w, const int f32s, const int wide,
                                                               const float *h, const int64_t *idx, int64_t r0,
                                                               int64_t r1, int64_t h_end, float *y) {
    float yp[QG_TILE + QA_CW] __attribute__((aligned(64)));
    int64_t rows[QA_GROUP];
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE) {
        const int64_t c1 = c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols;
        const QgTile t = qg_tile(w, 4, c0, c1);
        const int64_t off = c0 / 2, len = (c1 - c0) / 2, pf_end = idx || h_end < r1 ? r1 : h_end;
        memset(yp, 0, sizeof(float) * (size_t)(c1 - c0 + QA_CW));
        /* Rows are read piece by piece across a group, a pattern the hardware prefetcher does not follow: the
         * first group's rows at once, then each group's pieces fetch the next group's same pieces (past r1: the
         * rows the caller's next chunk usually has), and its scales */
        for (int64_t j = r0; j < r0 + QA_GROUP && j < pf_end; j++) {
            qg_prefetch_row(w, &t, idx ? idx[j] : j, off, len, f32s ? 4 : 2);
        }
        for (int64_t g = r0; g < r1; g += QA_GROUP) {
            const int nr = (int)(r1 - g < QA_GROUP ? r1 - g : QA_GROUP);
            const uint8_t *pn[QA_GROUP];
            for (int r = 0; r < nr; r++) rows[r] = idx ? idx[g + r] : g + r;
            for (int r = 0; r < QA_GROUP; r++) {
                const int64_t j = g + QA_GROUP + r < pf_end ? g + QA_GROUP + r : g; /* past the end: a row read now */
                pn[r] = w->codes + (idx ? idx[j] : j) * t.rb;
                if (j != g)
                    qg_prefetch((const uint8_t *)w->scales + ((idx ? idx[j] : j) * t.nb + t.b0) * (f32s ? 4 : 2),
                                t.nbt * (f32s ? 4 : 2));
            }
            qa_group(w, f32s, wide, &t, h + g, rows, nr, pn, c0, c1, yp);
        }
        qa_finish(yp, c0, c1, y);
    }
}

void caprese_q_rows_axpy_qa(const QMat *w, const float *h, const int64_t *idx, int64_t r0, int64_t r1,
                            int64_t h_end, float *y) {
    if (w->scale_fp32) qa_rows_axpy(w, 1, 0, h, idx, r0, r1, h_end, y);
    else qa_rows_axpy(w, 0, 0, h, idx, r0, r1, h_end, y);
}

/* The same with 16-bit coefficients (alpha in [-QA_WIDE, QA_WIDE]; caprese_qa_fits(w) must hold): GRIFFIN's down
 * on --int8-activations engines. */
void caprese_q_rows_axpy_qw(const QMat *w, const float *h, const int64_t *idx, int64_t r0, int64_t r1,
                            int64_t h_end, float *y) {
    if (w->scale_fp32) qa_rows_axpy(w, 1, 1, h, idx, r0, r1, h_end, y);
    else qa_rows_axpy(w, 0, 1, h, idx, r0, r1, h_end, y);
}

/* GRIFFIN's down in a layout of its own ("quads"; AVX-512 and AVX2 builds): its kept rows are gathered per prompt,
 * so the backend repacks them once per prompt and every decode step skips the nibble interleaving above (16 of a
 * piece's 50 vector operations), bit for bit the same sums. Row quad s (rows 4s .. 4s + 3), 32-column block j: 64
 * bytes at ((s * cols / 32) + j) * 64; byte 4i + k holds row 4s + k's unsigned codes (code + 8) of columns 32j + i
 * (low nibble) and 32j + 16 + i (high), i < 16; rows past the last are code 0. The quads' scales follow
 * (qa_quantize_lanes reads them). */
#if QA_LANES
int caprese_qa_quads(void) { return 1; }

/* The codes' bytes; the quads' scales follow (qa_quantize_lanes): quad s's at s * (cols / block) * 4 elements,
 * [block][its 4 rows] in w's scale dtype (rows past the last: 0), at the offset its rows' have in w->scales. */
static int64_t qa_codes_bytes(const QMat *w) { return (w->rows + 3) / 4 * (w->cols / 32) * 64; }
static int64_t qa_lane_scales_bytes(const QMat *w) {
    return (w->rows + 3) / 4 * 4 * (w->cols / w->block) * (w->scale_fp32 ? 4 : 2);
}
int64_t caprese_qa_quads_bytes(const QMat *w) { return qa_codes_bytes(w) + qa_lane_scales_bytes(w); }

/* w's codes (caprese_qa_fits(w)) into dst (caprese_qa_quads_bytes(w) bytes), as above; then its scales by quad. */
void caprese_qa_pack_quads(const QMat *w, uint8_t *dst) {
    const int64_t rb = w->cols / 2, nb = w->cols / 32;
    const int64_t nbk = w->cols / w->block, es = w->scale_fp32 ? 4 : 2;
    uint8_t *ls = dst + qa_codes_bytes(w);
    for (int64_t s = 0; s < (w->rows + 3) / 4; s++)
        for (int64_t b = 0; b < nbk; b++)
            for (int k = 0; k < 4; k++) {
                uint8_t *to = ls + ((s * nbk + b) * 4 + k) * es;
                if (4 * s + k < w->rows) memcpy(to, (const uint8_t *)w->scales + ((4 * s + k) * nbk + b) * es, es);
                else memset(to, 0, es);
            }
    const __m128i nib = _mm_set1_epi8(0x0f), x88 = _mm_set1_epi8((char)0x88);
    for (int64_t s = 0; s < (w->rows + 3) / 4; s++)
        for (int64_t j = 0; j < nb; j++) {
            __m128i e[4];
            for (int k = 0; k < 4; k++) {
                if (4 * s + k >= w->rows) {
                    e[k] = x88;
                    continue;
                }
                const __m128i v = _mm_loadu_si128((const __m128i *)(w->codes + (4 * s + k) * rb + 16 * j));
                const __m128i ev = _mm_and_si128(v, nib), od = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                const __m128i c0 = _mm_unpacklo_epi8(ev, od), c1 = _mm_unpackhi_epi8(ev, od); /* columns 0-15, 16-31 */
                e[k] = _mm_xor_si128(_mm_or_si128(c0, _mm_slli_epi16(c1, 4)), x88);
            }
            qa_store_quads((uint32_t *)(dst + (s * nb + j) * 64), e);
        }
}

#if QA_LANES == 4
/* nsb (1 .. 4) 32-column blocks from column c of one group (nsub quads at q, the group's first): yp (natural
 * order) += its term; alphas and sums as qa_group's. The same bytes of the next group (at q + ahead; 0: none)
 * are fetched meanwhile: a step's other phases leave the hardware prefetchers nothing to go on. */
static inline __attribute__((always_inline)) void qa_quads_piece(const uint8_t *q, int64_t ahead, int64_t nb,
                                                                 int64_t c, int nsb,
                                                                 int nsub, const int wide, const int sh,
                                                                 const int64_t cb0, const uint32_t *alpha32,
                                                                 const uint32_t *alo32, const float *sa,
                                                                 const int32_t *nc, float *yp) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    __m512i acc[8], alo[8];
    int64_t cb[4];
    for (int u = 0; u < nsb; u++) {
        cb[u] = cb0 + ((32 * u) >> sh);
        const __m512i start = _mm512_set1_epi32(nc[cb[u]]);
        acc[2 * u] = acc[2 * u + 1] = wide ? _mm512_setzero_si512() : start;
        alo[2 * u] = alo[2 * u + 1] = start;
    }
    for (int s = 0; s < nsub; s++) {
        const uint8_t *p = q + (s * nb + c / 32) * 64;
        if (ahead)
            for (int u = 0; u < nsb; u++) __builtin_prefetch(p + ahead + 64 * u, 0, 2);
        for (int u = 0; u < nsb; u++) {
            const __m512i v = _mm512_loadu_si512(p + 64 * u);
            const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            const __m512i a = _mm512_set1_epi32((int)alpha32[s * QA_BP + cb[u]]);
            acc[2 * u] = qa_dp(acc[2 * u], lo, a);
            acc[2 * u + 1] = qa_dp(acc[2 * u + 1], hi, a);
            if (wide) {
                const __m512i b = _mm512_set1_epi32((int)alo32[s * QA_BP + cb[u]]);
                alo[2 * u] = qa_dp(alo[2 * u], lo, b);
                alo[2 * u + 1] = qa_dp(alo[2 * u + 1], hi, b);
            }
        }
    }
    for (int u = 0; u < nsb; u++) {
        const __m512 sv = _mm512_set1_ps(sa[cb[u]]);
        for (int k = 0; k < 2; k++)
            qa_flush(yp + 32 * u + 16 * k, wide ? QA_ADD32(QA_SLL32(acc[2 * u + k], 8), alo[2 * u + k]) : acc[2 * u + k],
                     sv);
    }
}

#else
/* AVX2: one 32-column block from column c of one group (the 64 bytes of a row quad as two halves: lanes 0-7 hold
 * columns 0-7 and 16-23, lanes 8-15 columns 8-15 and 24-31); yp (natural order, 32 floats) += its term; the next
 * group's same bytes (at q + ahead; 0: none) fetched meanwhile. cb: the block's scale index in the tile.
 * vpmaddubsw's int16 pair sums are added in 16 bits over the group's row quads and widened once (vpmaddwd) at the
 * end: a pair sum is at most 2 * 15 * 128 in magnitude, and a group has at most 8 quads (static assert below). */
_Static_assert(QA_GROUP / 4 * 2 * 15 * 128 <= 32767, "a group's int16 sums of vpmaddubsw pairs must not overflow");
static inline __attribute__((always_inline)) void qa_quads_block(const uint8_t *q, int64_t ahead, int64_t nb,
                                                                 int64_t c, int nsub, const int wide, int64_t cb,
                                                                 const uint32_t *alpha32, const uint32_t *alo32,
                                                                 const float *sa, const int32_t *nc, float *yp) {
    const __m256i nib = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi16(1), start = _mm256_set1_epi32(nc[cb]);
    __m256i acc[4], alo[4]; /* int16 sums; columns 0-7, 16-23, 8-15, 24-31 */
    for (int k = 0; k < 4; k++) acc[k] = alo[k] = _mm256_setzero_si256();
    for (int s = 0; s < nsub; s++) {
        const uint8_t *p = q + (s * nb + c / 32) * 64;
        if (ahead) __builtin_prefetch(p + ahead, 0, 2);
        const __m256i a = _mm256_set1_epi32((int)alpha32[s * QA_BP + cb]);
        const __m256i b = wide ? _mm256_set1_epi32((int)alo32[s * QA_BP + cb]) : a;
        for (int h = 0; h < 2; h++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * h));
            const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
            acc[2 * h] = _mm256_add_epi16(acc[2 * h], _mm256_maddubs_epi16(lo, a));
            acc[2 * h + 1] = _mm256_add_epi16(acc[2 * h + 1], _mm256_maddubs_epi16(hi, a));
            if (wide) {
                alo[2 * h] = _mm256_add_epi16(alo[2 * h], _mm256_maddubs_epi16(lo, b));
                alo[2 * h + 1] = _mm256_add_epi16(alo[2 * h + 1], _mm256_maddubs_epi16(hi, b));
            }
        }
    }
    const __m256 sv = _mm256_set1_ps(sa[cb]);
    for (int k = 0; k < 4; k++) {
        const __m256i a32 = _mm256_madd_epi16(acc[k], one);
        const __m256i sum = wide ? QA_ADD32(QA_ADD32(QA_SLL32(a32, 8), _mm256_madd_epi16(alo[k], one)), start)
                                 : QA_ADD32(a32, start);
        qa_flush(yp + (k & 1) * 16 + (k >> 1) * 8, sum, sv);
    }
}

#endif

/* qa_quantize over the quads' scales (caprese_qa_pack_quads): a vector is 4 blocks x 4 rows (a quad) on AVX-512, 2
 * blocks x 4 rows on AVX2, so its rounded codes are those blocks' alpha bytes for the quad at once (vpmovdb; AVX2:
 * vpshufb, then vpermd to join its two lanes' dwords; a 16-bit code's low byte is its lo), SmolLM2's 18 blocks fill
 * 18 of 20 lanes where qa_quantize's 16-block vectors filled 18 of 32, and the maxima of 16 (8) blocks are gathered
 * into one vector for the two divisions. The same products, maxima, roundings and sums as qa_quantize, so the same
 * bits (tests/test_native_quant_gemv.py). ls: the quads' scales, q0: the group's first quad, h: the group's rows'
 * activations (nr of them). */
static inline __attribute__((always_inline)) void qa_quantize_lanes(const uint8_t *ls, const int f32s,
                                                                    const int wide, const QgTile *t, const float *h,
                                                                    int64_t q0, int nr, uint32_t *alpha32,
                                                                    uint32_t *alo32, float *sa, int32_t *nc) {
    float hz[QA_GROUP] __attribute__((aligned(16)));
    const int nsub = (nr + 3) / 4;
    for (int r = 0; r < 4 * nsub; r++) hz[r] = r < nr ? h[r] : 0.0f; /* rows past the call's: no term */
    const int64_t n = t->nbt, nbk = t->nb;
#if QA_LANES == 4
    __m512 a[QA_GROUP / 4][4];
    const __m512 levels = _mm512_set1_ps(wide ? QA_WIDE : 127.0f);
    const __m512i lane4 = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
    for (int64_t b16 = 0; b16 < n; b16 += 16) { /* 16 blocks: 4 pieces of 4 blocks x 4 rows */
        const int np = (int)((n - b16 < 16 ? n - b16 : 16) + 3) / 4;
        __m512 m16 = _mm512_setzero_ps(); /* block b16 + j's maximum in lane j */
        for (int p = 0; p < np; p++) {
            const int64_t b = b16 + 4 * p;
            const int nbv = n - b < 4 ? (int)(n - b) : 4;
            const __mmask16 mask = (__mmask16)((1u << (4 * nbv)) - 1);
            __m512 m = _mm512_setzero_ps();
            for (int s = 0; s < nsub; s++) {
                const int64_t at = ((q0 + s) * nbk + t->b0 + b) * 4;
                const __m512 sw = f32s ? _mm512_maskz_loadu_ps(mask, (const float *)ls + at)
                                       : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)ls + at));
                a[s][p] = _mm512_mul_ps(sw, _mm512_broadcast_f32x4(_mm_load_ps(hz + 4 * s)));
                m = _mm512_max_ps(m, _mm512_abs_ps(a[s][p]));
            }
            m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xB1)); /* each block's 4 lanes: their maximum */
            m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4E));
            m16 = _mm512_mask_permutexvar_ps(m16, (__mmask16)(0xFu << (4 * p)), lane4, m); /* lanes 4p .. 4p + 3 */
        }
        /* one division each for 16 blocks, as qa_quantize */
        const __m512 inv16 =
            _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m16, _mm512_setzero_ps(), _CMP_GT_OQ), levels, m16);
        _mm512_storeu_ps(sa + b16, _mm512_div_ps(m16, levels)); /* past n: 0 (sa has QA_BP entries) */
        __m512i nc16 = _mm512_setzero_si512();
        for (int p = 0; p < np; p++) {
            const int64_t b = b16 + 4 * p;
            const __m512 inv = _mm512_permutexvar_ps( /* lane 4i + k: block 4p + i's */
                _mm512_add_epi32(_mm512_set1_epi32(4 * p), _mm512_srli_epi32(_mm512_set_epi32(
                    15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2)), inv16);
            __m512i sum = _mm512_setzero_si512();
            for (int s = 0; s < nsub; s++) {
                /* the default rounding mode: to nearest, half to even, as nearbyintf */
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(a[s][p], inv));
                sum = _mm512_add_epi32(sum, q);
                if (wide) { /* q = 256 hi + lo, lo in [-128, 127]: lo is q's low byte */
                    const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
                    _mm_storeu_si128((__m128i *)(alpha32 + s * QA_BP + b), _mm512_cvtepi32_epi8(hi));
                    _mm_storeu_si128((__m128i *)(alo32 + s * QA_BP + b), _mm512_cvtepi32_epi8(q));
                } else {
                    _mm_storeu_si128((__m128i *)(alpha32 + s * QA_BP + b), _mm512_cvtepi32_epi8(q));
                }
            }
            sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, (_MM_PERM_ENUM)0xB1));
            sum = _mm512_add_epi32(sum, _mm512_shuffle_epi32(sum, (_MM_PERM_ENUM)0x4E));
            nc16 = _mm512_mask_permutexvar_epi32(nc16, (__mmask16)(0xFu << (4 * p)), lane4, sum);
        }
        _mm512_storeu_si512(nc + b16, _mm512_mullo_epi32(nc16, _mm512_set1_epi32(-8)));
    }
#else
    __m256 a[QA_GROUP / 4][4];
    const __m256 levels = _mm256_set1_ps(wide ? QA_WIDE : 127.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256i byte0 = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i join = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0); /* lane 0's dword, then lane 1's */
    for (int64_t b8 = 0; b8 < n; b8 += 8) { /* 8 blocks: 4 pieces of 2 blocks x 4 rows */
        const int np = (int)((n - b8 < 8 ? n - b8 : 8) + 1) / 2;
        __m256 m8 = _mm256_setzero_ps(); /* block b8 + j's maximum in lane j */
        for (int p = 0; p < np; p++) {
            const int64_t b = b8 + 2 * p;
            const int two = n - b >= 2;
            __m256 m = _mm256_setzero_ps();
            for (int s = 0; s < nsub; s++) {
                const int64_t at = ((q0 + s) * nbk + t->b0 + b) * 4;
                __m256 sw;
                if (f32s) {
                    const float *src = (const float *)ls + at;
                    sw = two ? _mm256_loadu_ps(src) : _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(src), 0);
                } else {
                    const uint16_t *src = (const uint16_t *)ls + at;
#if defined(__F16C__)
                    sw = _mm256_cvtph_ps(two ? _mm_loadu_si128((const __m128i *)src)
                                             : _mm_loadl_epi64((const __m128i *)src));
#else
                    float f[8] = {0};
                    for (int k = 0; k < (two ? 8 : 4); k++) f[k] = qg_half(src[k]);
                    sw = _mm256_loadu_ps(f);
#endif
                }
                a[s][p] = _mm256_mul_ps(sw, _mm256_broadcast_ps((const __m128 *)(hz + 4 * s)));
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, a[s][p]));
            }
            m = _mm256_max_ps(m, _mm256_permute_ps(m, 0xB1)); /* each block's 4 lanes: their maximum */
            m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4E));
            /* lanes 2p, 2p + 1 of m8 <- the two blocks' maxima (lanes 0 and 4) */
            const __m256 moved = _mm256_permutevar8x32_ps(m, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
            const __m256i pick = _mm256_cmpeq_epi32(_mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 1),
                                                    _mm256_set1_epi32(p));
            m8 = _mm256_blendv_ps(m8, moved, _mm256_castsi256_ps(pick));
        }
        /* one division each for 8 blocks, as qa_quantize's inv and s_a */
        const __m256 inv8 =
            _mm256_and_ps(_mm256_div_ps(levels, m8), _mm256_cmp_ps(m8, _mm256_setzero_ps(), _CMP_GT_OQ));
        _mm256_storeu_ps(sa + b8, _mm256_div_ps(m8, levels)); /* past n: 0 (sa has QA_BP entries) */
        __m256i nc8 = _mm256_setzero_si256();
        for (int p = 0; p < np; p++) {
            const int64_t b = b8 + 2 * p;
            const __m256 inv = _mm256_permutevar8x32_ps( /* lane 4i + k: block 2p + i's */
                inv8, _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1));
            __m256i sum = _mm256_setzero_si256();
            for (int s = 0; s < nsub; s++) {
                /* the default rounding mode: to nearest, half to even, as nearbyintf */
                const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(a[s][p], inv));
                sum = _mm256_add_epi32(sum, q);
                const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(q, byte0), join);
                if (wide) { /* q = 256 hi + lo, lo in [-128, 127]: lo is q's low byte */
                    const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(128)), 8);
                    const __m256i hb = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(hi, byte0), join);
                    _mm_storel_epi64((__m128i *)(alpha32 + s * QA_BP + b), _mm256_castsi256_si128(hb));
                    _mm_storel_epi64((__m128i *)(alo32 + s * QA_BP + b), _mm256_castsi256_si128(lo));
                } else {
                    _mm_storel_epi64((__m128i *)(alpha32 + s * QA_BP + b), _mm256_castsi256_si128(lo));
                }
            }
            sum = _mm256_add_epi32(sum, _mm256_shuffle_epi32(sum, 0xB1));
            sum = _mm256_add_epi32(sum, _mm256_shuffle_epi32(sum, 0x4E));
            const __m256i moved = _mm256_permutevar8x32_epi32(sum, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
            const __m256i pick = _mm256_cmpeq_epi32(_mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 1),
                                                    _mm256_set1_epi32(p));
            nc8 = _mm256_blendv_epi8(nc8, moved, pick);
        }
        _mm256_storeu_si256((__m256i *)(nc + b8), _mm256_mullo_epi32(nc8, _mm256_set1_epi32(-8)));
    }
#endif
    qa_zero_pad(n, nsub, alpha32, alo32, sa, nc);
}

#define QA_AHEAD 2 /* groups: how far ahead of the group being read the quads kernel requests bytes */

/* rows-axpy over the quads of w (caprese_qa_pack_quads) with rounded coefficients, rows [r0, r1) (r0 % 4 == 0):
 * the same groups, sums and roundings as qa_rows_axpy with idx NULL. Rows past r1 up to h_end are prefetched. */
static inline __attribute__((always_inline)) void qa_rows_axpy_quads(const QMat *w, const uint8_t *quads,
                                                                     const int f32s, const int wide, const float *h,
                                                                     int64_t r0, int64_t r1, int64_t h_end, float *y) {
    float yp[QG_TILE] __attribute__((aligned(64)));
    const int64_t nb = w->cols / 32, gbytes = QA_GROUP / 4 * nb * 64, pf_end = h_end > r1 ? h_end : r1;
    const int sh = w->block == w->cols ? 62 : __builtin_ctzll((unsigned long long)w->block);
    const int64_t sbytes = (w->cols / w->block) * (f32s ? 4 : 2); /* a row's scales */
    const uint8_t *scales = quads + qa_codes_bytes(w); /* the quads' (its rows' at the offsets they have in w's) */
    for (int64_t c0 = 0; c0 < w->cols; c0 += QG_TILE) {
        const int64_t c1 = c0 + QG_TILE < w->cols ? c0 + QG_TILE : w->cols;
        const QgTile t = qg_tile(w, 4, c0, c1);
        memset(yp, 0, sizeof(float) * (size_t)(c1 - c0));
        /* the first two groups' bytes and the first group's scales at once; then each group fetches the bytes of
         * the group after next and the next one's scales as it goes (one group ahead, the down ran ~15% slower:
         * a group's ~9 KB is less than a core's memory latency times its read rate; docs/performance.md) */
        qg_prefetch(quads + r0 / 4 * nb * 64, (r1 - r0 < QA_AHEAD * QA_GROUP ? r1 - r0 + 3 : QA_AHEAD * QA_GROUP) / 4 *
                                                  nb * 64);
        qg_prefetch(scales + r0 * sbytes, (r1 - r0 < QA_GROUP ? r1 - r0 : QA_GROUP) * sbytes);
        for (int64_t g = r0; g < r1; g += QA_GROUP) {
            const int nr = (int)(r1 - g < QA_GROUP ? r1 - g : QA_GROUP), nsub = (nr + 3) / 4;
            uint32_t alpha32[QA_GROUP / 4 * QA_BP], alo32[QA_GROUP / 4 * QA_BP];
            float sa[QA_BP];
            int32_t nc[QA_BP];
            const uint8_t *q = quads + g / 4 * nb * 64;
            const int64_t next = g + QA_GROUP < pf_end ? g + QA_GROUP : 0;
            const int64_t ahead = g + QA_AHEAD * QA_GROUP < pf_end ? QA_AHEAD * gbytes : 0;
            if (next) /* the next group's scales (its bytes: in the pieces below) */
                for (int64_t o = 0; o < (pf_end - next < QA_GROUP ? pf_end - next : QA_GROUP) * sbytes; o += 64)
                    __builtin_prefetch(scales + next * sbytes + o, 0, 2);
            qa_quantize_lanes(scales, f32s, wide, &t, h + g, g / 4, nr, alpha32, alo32, sa, nc);
            int64_t c = c0;
#if QA_LANES == 4
            for (; c + 128 <= c1; c += 128)
                qa_quads_piece(q, ahead, nb, c, 4, nsub, wide, sh, (c - c0) >> sh, alpha32, alo32, sa, nc,
                               yp + (c - c0));
            switch ((c1 - c) / 32) {
            case 3:
                qa_quads_piece(q, ahead, nb, c, 3, nsub, wide, sh, (c - c0) >> sh, alpha32, alo32, sa, nc, yp + (c - c0));
                break;
            case 2:
                qa_quads_piece(q, ahead, nb, c, 2, nsub, wide, sh, (c - c0) >> sh, alpha32, alo32, sa, nc, yp + (c - c0));
                break;
            case 1:
                qa_quads_piece(q, ahead, nb, c, 1, nsub, wide, sh, (c - c0) >> sh, alpha32, alo32, sa, nc, yp + (c - c0));
                break;
            default: break;
            }
#else
            for (; c < c1; c += 32)
                qa_quads_block(q, ahead, nb, c, nsub, wide, (c - c0) >> sh, alpha32, alo32, sa, nc, yp + (c - c0));
#endif
        }
#if QA_LANES == 4
        for (int64_t c = c0; c < c1; c += 16)
            _mm512_storeu_ps(y + c, _mm512_add_ps(_mm512_loadu_ps(y + c), _mm512_load_ps(yp + (c - c0))));
#else
        for (int64_t c = c0; c < c1; c += 8)
            _mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_loadu_ps(y + c), _mm256_load_ps(yp + (c - c0))));
#endif
    }
}

/* Entry point: wide = 1: 16-bit coefficients (caprese_q_rows_axpy_qw's), 0: int8 (caprese_q_rows_axpy_qa's). */
void caprese_q_rows_axpy_quads(const QMat *w, const uint8_t *quads, int64_t wide, const float *h, int64_t r0,
                               int64_t r1, int64_t h_end, float *y) {
    if (w->scale_fp32 && wide) qa_rows_axpy_quads(w, quads, 1, 1, h, r0, r1, h_end, y);
    else if (w->scale_fp32) qa_rows_axpy_quads(w, quads, 1, 0, h, r0, r1, h_end, y);
    else if (wide) qa_rows_axpy_quads(w, quads, 0, 1, h, r0, r1, h_end, y);
    else qa_rows_axpy_quads(w, quads, 0, 0, h, r0, r1, h_end, y);
}
#else
int caprese_qa_quads(void) { return 0; } /* the scalar build keeps the interleaving in the step */
int64_t caprese_qa_quads_bytes(const QMat *w) { (void)w; return 0; }
void caprese_qa_pack_quads(const QMat *w, uint8_t *dst) { (void)w; (void)dst; }
void caprese_q_rows_axpy_quads(const QMat *w, const uint8_t *quads, int64_t wide, const float *h, int64_t r0,
                               int64_t r1, int64_t h_end, float *y) {
    (void)quads;
    if (wide) caprese_q_rows_axpy_qw(w, h, NULL, r0, r1, h_end, y);
    else caprese_q_rows_axpy_qa(w, h, NULL, r0, r1, h_end, y);
}
#endif
