/* y = x W^T on the CPU with W as affine int4 / int8 codes and x quantized per block of 32 into two int8 stages: the
 * products are 8-bit integer dot products (AVX-512 VNNI, AVX-VNNI or AVX2, else plain C), scaled per block in
 * float32.
 *
 * The weight, per output row n and input group g (group_size a multiple of 32, or the whole row):
 *     w[n, k] = scale[n, g] * q[n, k] + offset[n, g]
 * The activations, per row m and block b of 32, in two int8 stages: x1 = round(x / d) with d = max|x| / 127, then
 * the remainder x2 = round((x - d x1) / (d / 256)) (clamped to +-127), so that x = (d / 256) (256 x1 + x2) within
 * d / 512 (about 1 / 65,000 of the block's largest element, where one stage would leave 1 / 254); and the exact
 * float sum of x over each weight group (for the offsets). Then, with integer dot products,
 *     y[m, n] = sum_b scale[n, g(b)] (d[m, b] / 256) (256 (q . x1)_b + (q . x2)_b) + sum_g offset[n, g] xsum[m, g].
 * (llama.cpp's Q8 activations are the first stage alone: one stage moves a small model's logits enough to flip
 * greedy near-ties against a float reference; the second costs one more dot product per block.)
 *
 * Layout. K is cut into pairs of blocks (64 elements; the last pair padded with zeros). Within a pair, elements are
 * stored in "lane order": position p holds element (p / 8) * 4 + p % 4 of block (p / 4) % 2, so that each group
 * of 4 consecutive bytes belongs to one block, alternately the pair's first and second. An integer dot product
 * instruction sums 4 byte products per 32-bit lane, hence its lanes alternate between the two blocks and one
 * vector of [s0 d0, s1 d1, s0 d0, ...] scales a whole pair. The activations are quantized into the same order.
 * - int4 codes (0..15): 32 bytes per pair, byte j holding position j (low nibble) and position j + 32 (high).
 * - int8 codes (-128..127): 64 bytes per pair, in lane order.
 * - scales: float16 per block [n, 2 * pairs] (a group's scale repeated over its blocks; padding 0);
 *   offsets: float16 per group [n, groups] or none. float16 is GGUF's own precision for Q4_0 / Q4_1 / Q8_0.
 * Natural order (`natural`, int8 codes only): the codes as stored, row-major [n, k] (k a multiple of 64, n of
 * TQ_ROWS: the same geometry as the packed layout), with no copy. The activations are then quantized in element
 * order with one d per pair (its 64 elements' largest), so that a pair's two blocks share d as they share the
 * weight scale (group sizes multiples of 64): every lane is scaled alike, whichever block its bytes belong to, and
 * the products above are the same sums in another order. The pair's d rounds the smaller block a little more
 * coarsely (two stages: still within 1 / 65,000 of the pair's largest element).
 *
 * Threads: OpenMP over tasks of output rows, in the process's one OpenMP runtime (torch's libgomp, already loaded,
 * satisfies this library's libgomp.so.1), as many as the caller passes (torch.get_num_threads()). */

#define _GNU_SOURCE /* syscall(), for the tile registers' permission */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tq_bf16.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TQ_NO_ZMM)
#define TQ_ZMM 1
#else
#define TQ_YMM 1
#endif
#endif

#ifdef _OPENMP
#include <omp.h>
static inline int omp_default_threads(void) { return omp_get_max_threads(); }
#else
static inline int omp_default_threads(void) { return 1; }
#endif

#define TQ_BLOCK 32
#define TQ_PAIR 64
#define TQ_ROWS_PER_TASK 16
#define TQ_MROWS 4 /* activation rows that share one unpacking of the weights (batched decode, AVX-512 path) */

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        float f = (float)man * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Lane-order position, within its pair, of element i (0..31) of the pair's block `half` (0 or 1). */
static inline int lane_position(int half, int i) { return (i / 4) * 8 + half * 4 + i % 4; }

/* Quantize rows of x [rows, k] (float32 or bfloat16) into the two stages xq [rows, 2, kp] (lane order, kp = 64 *
 * pairs, padding zero), d [rows, 2 * pairs] holding each block's d / 256 (padding zero) and, when xsum is not NULL,
 * the group sums xsum [rows, groups]. Rounding: to nearest, ties to even, in float32 (the remainder fused). natural:
 * element order and one d per pair (the header's natural order; k a multiple of 64). */
#if defined(TQ_ZMM)
static inline float block_amax(__m512 v0, __m512 v1) {
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
}

/* One block of 32 activations (float32, in v0 / v1) in two stages with d = amax / 127 (the block's largest |x|, or
 * its pair's in natural order), as quantize_rows' scalar code computes them (the same products, roundings and fused
 * remainder; only the plain sum is added in a tree): q1 / q2 the 32 codes in element order, *dd = d / 256, *sum. */
static inline void quantize_block16x2(__m512 v0, __m512 v1, float amax, __m256i *q1, __m256i *q2, float *dd,
                                      float *sum) {
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    const float step = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f, inv2 = inv * 256.0f;
    *dd = step / 256.0f;
    const __m512 vs = _mm512_set1_ps(step), vi = _mm512_set1_ps(inv), vi2 = _mm512_set1_ps(inv2);
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 c1a = _mm512_roundscale_ps(_mm512_mul_ps(v0, vi), nearest);
    const __m512 c1b = _mm512_roundscale_ps(_mm512_mul_ps(v1, vi), nearest);
    __m512 c2a = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_fnmadd_ps(c1a, vs, v0), vi2), nearest);
    __m512 c2b = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_fnmadd_ps(c1b, vs, v1), vi2), nearest);
    c2a = _mm512_min_ps(_mm512_max_ps(c2a, lo), hi);
    c2b = _mm512_min_ps(_mm512_max_ps(c2b, lo), hi);
    *q1 = _mm256_set_m128i(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c1b)), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c1a)));
    *q2 = _mm256_set_m128i(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c2b)), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c2a)));
}

static inline void load_block(const void *x, int x_bf16, size_t base, __m512 *v0, __m512 *v1) {
    if (x_bf16) {
        const uint16_t *h = (const uint16_t *)x + base;
        *v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
        *v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + 16))), 16));
    } else {
        *v0 = _mm512_loadu_ps((const float *)x + base);
        *v1 = _mm512_loadu_ps((const float *)x + base + 16);
    }
}
#endif

static void quantize_rows(const void *x, int x_bf16, int rows, int k, int kp, int group_size, int natural,
                          int8_t *xq, float *d, float *xsum, int threads) {
    const int blocks = k / TQ_BLOCK, padded = kp / TQ_BLOCK, groups = k / group_size, per_group = group_size / TQ_BLOCK;
#pragma omp parallel for schedule(static) if (rows >= 4) num_threads(threads > 0 ? threads : omp_default_threads())
    for (int m = 0; m < rows; m++) {
        float buf[2][TQ_BLOCK];
        int8_t q1[TQ_BLOCK], q2[TQ_BLOCK];
#if defined(TQ_ZMM)
        { /* whole pairs on 16 lanes: the pair's two blocks interleaved dword by dword (lane order) */
            int8_t *xm = xq + (size_t)m * 2 * kp;
            float *dm = d + (size_t)m * padded;
            const __m512i interleave = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            for (int p = 0; p < padded / 2; p++) {
                __m256i a1[2], a2[2];
                const __m512 zero = _mm512_setzero_ps();
                __m512 v[2][2] = {{zero, zero}, {zero, zero}};
                float amax[2] = {0.0f, 0.0f};
                for (int h = 0; h < 2 && 2 * p + h < blocks; h++) {
                    load_block(x, x_bf16, (size_t)m * k + (size_t)(2 * p + h) * TQ_BLOCK, &v[h][0], &v[h][1]);
                    amax[h] = block_amax(v[h][0], v[h][1]);
                }
                if (natural) amax[0] = amax[1] = fmaxf(amax[0], amax[1]);
                for (int h = 0; h < 2; h++) {
                    const int b = 2 * p + h;
                    if (b >= blocks) { /* the odd block of a padded pair */
                        a1[h] = a2[h] = _mm256_setzero_si256();
                        dm[b] = 0.0f;
                        continue;
                    }
                    float sum;
                    quantize_block16x2(v[h][0], v[h][1], amax[h], &a1[h], &a2[h], &dm[b], &sum);
                    if (xsum) {
                        float *g = &xsum[(size_t)m * groups + b / per_group];
                        if (b % per_group == 0) *g = 0.0f;
                        *g += sum;
                    }
                }
                const __m512i order = natural ? _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                                              : interleave;
                _mm512_storeu_si512(xm + (size_t)p * TQ_PAIR,
                                    _mm512_permutex2var_epi32(_mm512_castsi256_si512(a1[0]), order,
                                                              _mm512_castsi256_si512(a1[1])));
                _mm512_storeu_si512(xm + kp + (size_t)p * TQ_PAIR,
                                    _mm512_permutex2var_epi32(_mm512_castsi256_si512(a2[0]), order,
                                                              _mm512_castsi256_si512(a2[1])));
            }
            continue;
        }
#endif
        int8_t *xm = xq + (size_t)m * 2 * kp;
        float *dm = d + (size_t)m * padded;
        for (int p = 0; p < padded / 2; p++) { /* as the vector path: a pair's blocks read, then quantized */
            int8_t *pair = xm + (size_t)p * TQ_PAIR;
            float amax[2] = {0.0f, 0.0f}, sum[2] = {0.0f, 0.0f};
            for (int h = 0; h < 2 && 2 * p + h < blocks; h++) {
                const size_t base = (size_t)m * k + (size_t)(2 * p + h) * TQ_BLOCK;
                if (x_bf16)
                    for (int j = 0; j < TQ_BLOCK; j++) buf[h][j] = bf16_to_float(((const uint16_t *)x)[base + j]);
                else
                    memcpy(buf[h], (const float *)x + base, sizeof buf[h]);
                for (int j = 0; j < TQ_BLOCK; j++) {
                    sum[h] += buf[h][j];
                    amax[h] = fmaxf(amax[h], fabsf(buf[h][j]));
                }
            }
            if (natural) amax[0] = amax[1] = fmaxf(amax[0], amax[1]);
            for (int h = 0; h < 2; h++) {
                const int b = 2 * p + h;
                if (b >= blocks) { /* the odd block of a padded pair */
                    dm[b] = 0.0f;
                    for (int i = 0; i < TQ_BLOCK; i++) pair[lane_position(h, i)] = pair[kp + lane_position(h, i)] = 0;
                    continue;
                }
                const float step = amax[h] / 127.0f, inv = amax[h] > 0.0f ? 127.0f / amax[h] : 0.0f,
                            inv2 = inv * 256.0f;
                dm[b] = step / 256.0f;
                for (int j = 0; j < TQ_BLOCK; j++) {
                    const float c1 = nearbyintf(buf[h][j] * inv);
                    const float c2 = nearbyintf(fmaf(-c1, step, buf[h][j]) * inv2);
                    q1[j] = (int8_t)c1;
                    q2[j] = (int8_t)(c2 > 127.0f ? 127.0f : c2 < -127.0f ? -127.0f : c2);
                }
                for (int c = 0; c < TQ_BLOCK / 4; c++) {
                    const int at = natural ? h * TQ_BLOCK + 4 * c : lane_position(h, 4 * c);
                    memcpy(pair + at, q1 + 4 * c, 4);
                    memcpy(pair + kp + at, q2 + 4 * c, 4);
                }
                if (xsum) {
                    float *g = &xsum[(size_t)m * groups + b / per_group];
                    if (b % per_group == 0) *g = 0.0f;
                    *g += sum[h];
                }
            }
        }
    }
}

/* sum_g offsets[g] * xsum[g] over a row's groups (offsets float16). */
static inline float offset_term(const uint16_t *offsets, const float *xsum, int groups) {
    float total = 0.0f;
    int g = 0;
#if defined(TQ_ZMM) || defined(TQ_YMM)
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(offsets + g))),
                              _mm256_loadu_ps(xsum + g), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    total = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
#endif
    for (; g < groups; g++) total += half_to_float(offsets[g]) * xsum[g];
    return total;
}

#define TQ_ROWS 4 /* weight rows computed together: independent accumulators, each activation load shared */

#if defined(TQ_ZMM)
/* out[i] = sum over pairs of the scaled block products of weight row i (of TQ_ROWS) and one activation row (its
 * two stages xq and xq + kp). */
static void rows_dot(int bits, const uint8_t *codes, size_t row_bytes, const uint16_t *scales, int pairs, int kp,
                     const int8_t *xq, const float *d, float out[TQ_ROWS]) {
    __m512 acc[TQ_ROWS];
    for (int i = 0; i < TQ_ROWS; i++) acc[i] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (int p = 0; p < pairs; p++) {
        const __m512i x1 = _mm512_loadu_si512(xq + (size_t)p * TQ_PAIR), x2 = _mm512_loadu_si512(xq + kp + (size_t)p * TQ_PAIR);
        double dd;
        memcpy(&dd, d + 2 * p, 8);
        const __m512 dv = _mm512_castpd_ps(_mm512_set1_pd(dd)); /* d0 d1 d0 d1 ... */
        /* int8: (q + 128) . x - 128 sum(x), the unsigned-times-signed product the instruction has */
        const __m512i bias = bits == 8 ? _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, flip, x1), 8), flip, x2)
                                       : zero;
        for (int i = 0; i < TQ_ROWS; i++) {
            const uint8_t *c = codes + i * row_bytes;
            __m512i w;
            if (bits == 4) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * (TQ_PAIR / 2)));
                w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                       _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
            } else {
                w = _mm512_xor_si512(_mm512_loadu_si512(c + (size_t)p * TQ_PAIR), flip);
            }
            __m512i dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, w, x1), 8), w, x2);
            dot = _mm512_sub_epi32(dot, bias);
            int32_t sp;
            memcpy(&sp, scales + i * (size_t)(2 * pairs) + 2 * p, 4);
            const __m512 sv = _mm512_cvtph_ps(_mm256_set1_epi32(sp)); /* s0 s1 s0 s1 ... */
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, dv), acc[i]);
        }
    }
    for (int i = 0; i < TQ_ROWS; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

/* rows_dot for TQ_MROWS activation rows at once (row mm at xq + mm * x_stride, its units at d + mm * d_stride):
 * each weight block is unpacked once for all of them. out[mm][i]. */
static void rows_dot_m(int bits, const uint8_t *codes, size_t row_bytes, const uint16_t *scales, int pairs, int kp,
                       const int8_t *xq, size_t x_stride, const float *d, size_t d_stride,
                       float out[TQ_MROWS][TQ_ROWS]) {
    __m512 acc[TQ_MROWS][TQ_ROWS];
    for (int mm = 0; mm < TQ_MROWS; mm++)
        for (int i = 0; i < TQ_ROWS; i++) acc[mm][i] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (int p = 0; p < pairs; p++) {
        __m512i w[TQ_ROWS];
        __m512 sv[TQ_ROWS];
        for (int i = 0; i < TQ_ROWS; i++) {
            const uint8_t *c = codes + i * row_bytes;
            if (bits == 4) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * (TQ_PAIR / 2)));
                w[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                          _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
            } else {
                w[i] = _mm512_xor_si512(_mm512_loadu_si512(c + (size_t)p * TQ_PAIR), flip);
            }
            int32_t sp;
            memcpy(&sp, scales + i * (size_t)(2 * pairs) + 2 * p, 4);
            sv[i] = _mm512_cvtph_ps(_mm256_set1_epi32(sp));
        }
        for (int mm = 0; mm < TQ_MROWS; mm++) {
            const int8_t *xp = xq + mm * x_stride + (size_t)p * TQ_PAIR;
            const __m512i x1 = _mm512_loadu_si512(xp), x2 = _mm512_loadu_si512(xp + kp);
            double dd;
            memcpy(&dd, d + mm * d_stride + 2 * p, 8);
            const __m512 dv = _mm512_castpd_ps(_mm512_set1_pd(dd));
            const __m512i bias = bits == 8 ? _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, flip, x1), 8),
                                                                 flip, x2)
                                           : zero;
            for (int i = 0; i < TQ_ROWS; i++) {
                __m512i dot = _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(zero, w[i], x1), 8), w[i], x2);
                dot = _mm512_sub_epi32(dot, bias);
                acc[mm][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv[i], dv), acc[mm][i]);
            }
        }
    }
    for (int mm = 0; mm < TQ_MROWS; mm++)
        for (int i = 0; i < TQ_ROWS; i++) out[mm][i] = _mm512_reduce_add_ps(acc[mm][i]);
}
#elif defined(TQ_YMM)
/* Sum of products of 32 unsigned bytes u and 32 signed bytes s into 8 int32 lanes of acc. */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    /* u is an int4 code (<= 15) or |int8| (<= 128): the pairs of products stay within int16 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

static void rows_dot(int bits, const uint8_t *codes, size_t row_bytes, const uint16_t *scales, int pairs, int kp,
                     const int8_t *xq, const float *d, float out[TQ_ROWS]) {
    __m256 acc[TQ_ROWS];
    for (int i = 0; i < TQ_ROWS; i++) acc[i] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int p = 0; p < pairs; p++) {
        const int8_t *xp = xq + (size_t)p * TQ_PAIR;
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)xp), a1 = _mm256_loadu_si256((const __m256i *)(xp + 32));
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(xp + kp)),
                      b1 = _mm256_loadu_si256((const __m256i *)(xp + kp + 32));
        double dd;
        memcpy(&dd, d + 2 * p, 8);
        const __m256 dv = _mm256_castpd_ps(_mm256_set1_pd(dd)); /* d0 d1 d0 d1 ... */
        for (int i = 0; i < TQ_ROWS; i++) {
            const uint8_t *c = codes + i * row_bytes;
            __m256i dot;
            if (bits == 4) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * (TQ_PAIR / 2)));
                __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                dot = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo, a0), hi, a1);
                dot = dot_u8s8(dot_u8s8(_mm256_slli_epi32(dot, 8), lo, b0), hi, b1);
            } else { /* |w| (x signed as w) */
                __m256i w0 = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * TQ_PAIR));
                __m256i w1 = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * TQ_PAIR + 32));
                __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
                dot = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), u0, _mm256_sign_epi8(a0, w0)), u1, _mm256_sign_epi8(a1, w1));
                dot = dot_u8s8(dot_u8s8(_mm256_slli_epi32(dot, 8), u0, _mm256_sign_epi8(b0, w0)), u1,
                               _mm256_sign_epi8(b1, w1));
            }
            int32_t sp;
            memcpy(&sp, scales + i * (size_t)(2 * pairs) + 2 * p, 4);
            const __m256 sv = _mm256_cvtph_ps(_mm_set1_epi32(sp)); /* s0 s1 s0 s1 ... */
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sv, dv), acc[i]);
        }
    }
    for (int i = 0; i < TQ_ROWS; i++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[i] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
}
#else
static void rows_dot(int bits, const uint8_t *codes, size_t row_bytes, const uint16_t *scales, int pairs, int kp,
                     const int8_t *xq, const float *d, float out[TQ_ROWS]) {
    for (int i = 0; i < TQ_ROWS; i++) {
        const uint8_t *c = codes + i * row_bytes;
        const uint16_t *s = scales + i * (size_t)(2 * pairs);
        float total = 0.0f;
        for (int p = 0; p < pairs; p++) {
            int32_t dot[2] = {0, 0};
            const int8_t *xp = xq + (size_t)p * TQ_PAIR;
            for (int pos = 0; pos < TQ_PAIR; pos++) {
                int32_t code;
                if (bits == 4) {
                    uint8_t byte = c[(size_t)p * (TQ_PAIR / 2) + pos % 32];
                    code = pos < 32 ? (byte & 15) : (byte >> 4);
                } else {
                    code = (int8_t)c[(size_t)p * TQ_PAIR + pos];
                }
                dot[(pos / 4) % 2] += code * (256 * xp[pos] + xp[kp + pos]);
            }
            total += half_to_float(s[2 * p]) * d[2 * p] * (float)dot[0] +
                     half_to_float(s[2 * p + 1]) * d[2 * p + 1] * (float)dot[1];
        }
        out[i] = total;
    }
}
#endif

#if defined(TQ_ZMM) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define TQ_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define TQ_AMX_MIN_ROWS 6 /* activation rows from which tq_matmul takes the tile path (measured: slower at 4, faster
                           * from 6: 1.3x at 6 rows, 1.4-1.8x at 8-16 on the default model's projections) */
#define TQ_AMX_TILE 16    /* weight rows per tile (and per task) */

/* Whether the process may use the tile registers: Linux grants them on request (arch_prctl), once per process, and
 * kills a process that uses them unasked. Set by tq_amx_init (a process capability, like the CPU's flags). */
static int amx_granted = 0;

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* The activations of every block as B tiles of the tile product: bt[(2 b + stage) * 8 * 4 * rows ..], 8 rows of
 * rows x 4 bytes (tile row kk holds, for each activation row m, elements 4 kk .. 4 kk + 3 of the block in lane
 * order, which the weight tiles use too), and dv[b * 16 + m] = d[m, b]. */
static void amx_pack_x(const int8_t *xq, const float *d, int rows, int kp, int pairs, int8_t *bt, float *dv) {
    const int blocks = 2 * pairs;
    for (int b = 0; b < blocks; b++) {
        const int p = b / 2, h = b % 2;
        for (int stage = 0; stage < 2; stage++) {
            int8_t *tile = bt + (size_t)(2 * b + stage) * 8 * 4 * rows;
            for (int m = 0; m < rows; m++) {
                const int8_t *src = xq + (size_t)m * 2 * kp + (size_t)stage * kp + (size_t)p * TQ_PAIR + 4 * h;
                for (int kk = 0; kk < 8; kk++) memcpy(tile + (size_t)kk * 4 * rows + 4 * m, src + 8 * kk, 4);
            }
        }
        for (int m = 0; m < 16; m++) dv[(size_t)b * 16 + m] = m < rows ? d[(size_t)m * 2 * pairs + b] : 0.0f;
    }
}

/* Rows r .. r + count - 1 (count <= TQ_AMX_TILE) of W against every activation row: acc[i] lane m = the scaled sum
 * for weight row r + i and activation row m, as rows_dot computes it but with each block's integer products summed
 * whole by the tile unit (tdpbusd / tdpbssd: the same exact int32 sums), then scaled in float32 once per block. */
static void amx_task(int bits, const uint8_t *codes, size_t row_bytes, const uint16_t *scales, int pairs, int r,
                     int count, int rows, const int8_t *bt, const float *dv, __m512 acc[TQ_AMX_TILE]) {
    int8_t a[2][TQ_AMX_TILE][TQ_BLOCK] __attribute__((aligned(64)));
    int32_t c1[TQ_AMX_TILE][16] __attribute__((aligned(64))), c2[TQ_AMX_TILE][16] __attribute__((aligned(64)));
    memset(a, 0, sizeof a);
    memset(c1, 0, sizeof c1);
    memset(c2, 0, sizeof c2);
    for (int i = 0; i < TQ_AMX_TILE; i++) acc[i] = _mm512_setzero_ps();
    /* a pair's 64 lane-order bytes, dwords alternating between its two blocks -> block 0's 8 dwords, then block 1's */
    const __m512i split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const size_t b_tile = (size_t)8 * 4 * rows;
    for (int p = 0; p < pairs; p++) {
        for (int i = 0; i < count; i++) {
            const uint8_t *c = codes + (size_t)(r + i) * row_bytes;
            __m512i w;
            if (bits == 4) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(c + (size_t)p * (TQ_PAIR / 2)));
                w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                       _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
            } else {
                w = _mm512_loadu_si512(c + (size_t)p * TQ_PAIR);
            }
            w = _mm512_permutexvar_epi32(split, w);
            _mm256_store_si256((__m256i *)a[0][i], _mm512_castsi512_si256(w));
            _mm256_store_si256((__m256i *)a[1][i], _mm512_extracti64x4_epi64(w, 1));
        }
        for (int h = 0; h < 2; h++) {
            const int b = 2 * p + h;
            _tile_loadd(2, a[h], TQ_BLOCK);
            _tile_loadd(3, bt + (size_t)(2 * b) * b_tile, 4 * rows);
            _tile_loadd(4, bt + (size_t)(2 * b + 1) * b_tile, 4 * rows);
            _tile_zero(0);
            _tile_zero(1);
            if (bits == 4) {
                _tile_dpbusd(0, 2, 3);
                _tile_dpbusd(1, 2, 4);
            } else {
                _tile_dpbssd(0, 2, 3);
                _tile_dpbssd(1, 2, 4);
            }
            _tile_stored(0, c1, 64);
            _tile_stored(1, c2, 64);
            const __m512 d = _mm512_load_ps(dv + (size_t)b * 16);
            for (int i = 0; i < count; i++) {
                const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c1[i]), 8),
                                                     _mm512_load_si512(c2[i]));
                const float sc = half_to_float(scales[(size_t)(r + i) * 2 * pairs + b]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(sc), d), acc[i]);
            }
        }
    }
}
#endif

/* The fewest activation rows tq_matmul gives the tile path: 0 without one in this build or while it is off. */
int tq_amx_min_rows(void) {
#if defined(TQ_AMX)
    return amx_granted ? TQ_AMX_MIN_ROWS : 0;
#else
    return 0;
#endif
}

/* Ask the kernel for the tile registers (once per process; enable 0 leaves them off, as TRIDENT_NO_AMX asks).
 * Returns 1 when tq_matmul will use them for TQ_AMX_MIN_ROWS activation rows and more. */
int tq_amx_init(int enable) {
#if defined(TQ_AMX)
    if (enable && !amx_granted) amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
    if (!enable) amx_granted = 0;
    return amx_granted;
#else
    (void)enable;
    return 0;
#endif
}

#define TQ_PREFETCH_ROWS (2 * TQ_ROWS)
/* Ask for the codes and scales of the TQ_ROWS weight rows from `row` on: the hardware prefetcher of a small VM
 * does not run far enough ahead of the streams of a matrix read from memory (measured: 2x slower in a decode step
 * than with the rows warm). */
static inline void prefetch_rows(int bits, const uint8_t *codes, const uint16_t *scales, size_t row_bytes, int pairs,
                                 int row) {
    (void)bits;
#if defined(TQ_ZMM) || defined(TQ_YMM)
    const char *c = (const char *)(codes + (size_t)row * row_bytes), *s = (const char *)(scales + (size_t)row * 2 * pairs);
    for (size_t off = 0; off < TQ_ROWS * row_bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
    for (size_t off = 0; off < TQ_ROWS * 2 * (size_t)pairs * 2; off += 64) _mm_prefetch(s + off, _MM_HINT_T0);
#else
    (void)codes, (void)scales, (void)row_bytes, (void)pairs, (void)row;
#endif
}

static inline void store(void *y, int y_bf16, size_t index, float v) {
    if (y_bf16)
        ((uint16_t *)y)[index] = float_to_bf16(v);
    else
        ((float *)y)[index] = v;
}

/* The activations' two stages as tq_matmul makes them (for tests): xq [rows, 2, kp] in lane order (natural: element
 * order, one d per pair), d [rows, kp / 32] (each block's d / 256), kp = 64 * ceil(k / 64). Returns kp, or -1 for a
 * k it does not take. */
int tq_quantize_activations(const void *x, int x_bf16, int rows, int k, int natural, int8_t *xq, float *d,
                            int threads) {
    if (k % TQ_BLOCK || rows < 1 || (natural && k % TQ_PAIR)) return -1;
    const int kp = (k + TQ_PAIR - 1) / TQ_PAIR * TQ_PAIR;
    quantize_rows(x, x_bf16, rows, k, kp, k, natural, xq, d, NULL, threads);
    return kp;
}

/* Bytes of one weight row's codes for k inputs. */
long tq_row_bytes(int bits, int k) {
    long pairs = (k + TQ_PAIR - 1) / TQ_PAIR;
    return bits == 4 ? pairs * (TQ_PAIR / 2) : pairs * TQ_PAIR;
}

/* Workspace bytes tq_matmul needs for rows x k activations in groups of group_size. */
long tq_workspace_bytes(int rows, int k, int group_size) {
    size_t kp = (size_t)((k + TQ_PAIR - 1) / TQ_PAIR) * TQ_PAIR;
    size_t bytes = (size_t)rows * 2 * kp + sizeof(float) * ((size_t)rows * (kp / TQ_BLOCK) + (size_t)rows * (k / group_size)) + 64;
#if defined(TQ_AMX)
    /* the tile path's activation tiles (2 stages x 8 x rows x 4 bytes per block) and block scales (16 per block) */
    bytes += (size_t)(kp / TQ_BLOCK) * (2 * 8 * 4 * (size_t)rows + 16 * sizeof(float)) + 64;
    bytes += (size_t)(k / group_size) * 16 * sizeof(float); /* the group sums, transposed */
#endif
    return (long)bytes;
}

/* y [rows, n] = x [rows, k] W^T (+ bias [n], float32), W [n, k] as described at the top (natural: int8 codes as
 * stored, k a multiple of 64, group_size of 64), n a multiple of TQ_ROWS (the packer pads). workspace:
 * tq_workspace_bytes(rows, k, group_size) bytes. threads: OpenMP threads (the caller's torch.get_num_threads(): a
 * thread other than the one that set it, such as a server's engine loop, would otherwise use OpenMP's default).
 * Returns 0, or -1 for shapes it does not take. */
int tq_matmul(const void *x, int x_bf16, int rows, int k, int bits, int natural, const uint8_t *codes,
              const uint16_t *scales, const uint16_t *offsets, int group_size, int n, const float *bias, void *y,
              int y_bf16, int n_out, void *workspace, int threads) {
    if (k % TQ_BLOCK || group_size % TQ_BLOCK || k % group_size || (bits != 4 && bits != 8) || rows < 1 ||
        n % TQ_ROWS || n_out > n || (natural && (bits != 8 || k % TQ_PAIR || group_size % TQ_PAIR)))
        return -1;
    const int pairs = (k + TQ_PAIR - 1) / TQ_PAIR, kp = pairs * TQ_PAIR, groups = k / group_size;
    float *d = (float *)workspace;
    float *xsum = d + (size_t)rows * 2 * pairs;
    int8_t *xq = (int8_t *)(xsum + (size_t)rows * groups);
    quantize_rows(x, x_bf16, rows, k, kp, group_size, natural, xq, d, offsets ? xsum : NULL, threads);
    const size_t row_bytes = (size_t)tq_row_bytes(bits, k);
    const int tasks = (n + TQ_ROWS_PER_TASK - 1) / TQ_ROWS_PER_TASK;
#if defined(TQ_AMX)
    if (amx_granted && rows >= TQ_AMX_MIN_ROWS && rows <= 16) {
        float *dv = (float *)((((uintptr_t)(xq + (size_t)rows * 2 * kp)) + 63) & ~(uintptr_t)63);
        float *xs_t = dv + (size_t)2 * pairs * 16; /* xs_t[g * 16 + m] = xsum[m, g] */
        int8_t *bt = (int8_t *)(xs_t + (size_t)groups * 16);
        amx_pack_x(xq, d, rows, kp, pairs, bt, dv);
        if (offsets)
            for (int g = 0; g < groups; g++)
                for (int m = 0; m < 16; m++) xs_t[(size_t)g * 16 + m] = m < rows ? xsum[(size_t)m * groups + g] : 0.0f;
#pragma omp parallel num_threads(threads > 0 ? threads : omp_default_threads())
        {
            tile_config cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            cfg.rows[0] = cfg.rows[1] = TQ_AMX_TILE; /* C: weight rows x activation rows (int32) */
            cfg.colsb[0] = cfg.colsb[1] = (uint16_t)(4 * rows);
            cfg.rows[2] = TQ_AMX_TILE; /* A: weight rows x one block's 32 codes */
            cfg.colsb[2] = TQ_BLOCK;
            cfg.rows[3] = cfg.rows[4] = 8; /* B: the block's 32 activations of each row, 4 per int32 column */
            cfg.colsb[3] = cfg.colsb[4] = (uint16_t)(4 * rows);
            _tile_loadconfig(&cfg);
#pragma omp for schedule(static)
            for (int t = 0; t < tasks; t++) {
                const int r = t * TQ_ROWS_PER_TASK, count = n - r < TQ_AMX_TILE ? n - r : TQ_AMX_TILE;
                __m512 acc[TQ_AMX_TILE];
                amx_task(bits, codes, row_bytes, scales, pairs, r, count, rows, bt, dv, acc);
                float lanes[TQ_AMX_TILE][16];
                for (int i = 0; i < count; i++) {
                    if (offsets) { /* + sum_g offset[row, g] xsum[m, g], for the 16 activation rows at once */
                        const uint16_t *o = offsets + (size_t)(r + i) * groups;
                        __m512 off = _mm512_setzero_ps();
                        for (int g = 0; g < groups; g++)
                            off = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(o[g])), _mm512_load_ps(xs_t + (size_t)g * 16),
                                                  off);
                        acc[i] = _mm512_add_ps(acc[i], off);
                    }
                    if (bias) acc[i] = _mm512_add_ps(acc[i], _mm512_set1_ps(bias[r + i]));
                    _mm512_storeu_ps(lanes[i], acc[i]);
                }
                for (int m = 0; m < rows; m++)
                    for (int i = 0; i < count && r + i < n_out; i++) store(y, y_bf16, (size_t)m * n_out + r + i, lanes[i][m]);
            }
            _tile_release();
        }
        return 0;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_default_threads())
    for (int t = 0; t < tasks; t++) {
        const int end = (t + 1) * TQ_ROWS_PER_TASK < n ? (t + 1) * TQ_ROWS_PER_TASK : n;
        for (int r = t * TQ_ROWS_PER_TASK; r < end; r += TQ_ROWS) {
            if (r + TQ_PREFETCH_ROWS < n) prefetch_rows(bits, codes, scales, row_bytes, pairs, r + TQ_PREFETCH_ROWS);
            const uint8_t *wr = codes + (size_t)r * row_bytes;
            const uint16_t *sr = scales + (size_t)r * 2 * pairs;
            float v[TQ_MROWS][TQ_ROWS];
            for (int m = 0; m < rows;) {
                int count = 1;
#if defined(TQ_ZMM)
                if (m + TQ_MROWS <= rows) { /* batched decode: the weights unpacked once for TQ_MROWS rows */
                    rows_dot_m(bits, wr, row_bytes, sr, pairs, kp, xq + (size_t)m * 2 * kp, (size_t)2 * kp,
                               d + (size_t)m * 2 * pairs, (size_t)2 * pairs, v);
                    count = TQ_MROWS;
                } else
#endif
                    rows_dot(bits, wr, row_bytes, sr, pairs, kp, xq + (size_t)m * 2 * kp, d + (size_t)m * 2 * pairs,
                             v[0]);
                for (int mm = 0; mm < count; mm++, m++) {
                    const float *xs = xsum + (size_t)m * groups;
                    for (int i = 0; i < TQ_ROWS && r + i < n_out; i++) {
                        float value = v[mm][i];
                        if (offsets) value += offset_term(offsets + (size_t)(r + i) * groups, xs, groups);
                        if (bias) value += bias[r + i];
                        store(y, y_bf16, (size_t)m * n_out + r + i, value);
                    }
                }
            }
        }
    }
    return 0;
}

/* Put stored codes [n, k] (int4: two per byte along K, element 2j in the low nibble, as trident/quant/rtn.py packs
 * them; int8: one byte each) into the layout described at the top: out [n_padded, tq_row_bytes(bits, k)], rows
 * from n on and positions from k on zero. */
void tq_pack(int bits, const uint8_t *codes, int n, int k, int n_padded, uint8_t *out, int threads) {
    const int pairs = (k + TQ_PAIR - 1) / TQ_PAIR;
    const size_t in_row = bits == 4 ? (size_t)k / 2 : (size_t)k, out_row = (size_t)tq_row_bytes(bits, k);
    int element[TQ_PAIR]; /* the element of a pair each lane-order position holds */
    for (int pos = 0; pos < TQ_PAIR; pos++) element[pos] = ((pos / 4) % 2) * TQ_BLOCK + (pos / 8) * 4 + pos % 4;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_default_threads())
    for (int r = 0; r < n_padded; r++) {
        uint8_t *o = out + (size_t)r * out_row;
        if (r >= n) {
            memset(o, 0, out_row);
            continue;
        }
        const uint8_t *in = codes + (size_t)r * in_row;
        for (int p = 0; p < pairs; p++) {
            const int base = p * TQ_PAIR;
            for (int pos = 0; pos < (bits == 4 ? TQ_PAIR / 2 : TQ_PAIR); pos++) {
                if (bits == 4) { /* byte pos: positions pos (low nibble) and pos + 32 (high) */
                    const int lo = base + element[pos], hi = base + element[pos + TQ_PAIR / 2];
                    const uint8_t a = lo < k ? (in[lo / 2] >> (4 * (lo & 1))) & 15 : 0;
                    const uint8_t b = hi < k ? (in[hi / 2] >> (4 * (hi & 1))) & 15 : 0;
                    o[(size_t)p * (TQ_PAIR / 2) + pos] = (uint8_t)(a | (b << 4));
                } else {
                    const int e = base + element[pos];
                    o[(size_t)p * TQ_PAIR + pos] = e < k ? in[e] : 0;
                }
            }
        }
    }
}

#if defined(__clang__)
#define TQ_NO_CONTRACT
#elif defined(__GNUC__)
#define TQ_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define TQ_NO_CONTRACT
#endif
/* The 32 values from element start of a row: c * s (mode 0), (c - z) * s (1) or c * s + z (2), into w. */
TQ_NO_CONTRACT
static inline void dequantize_block(int bits, const uint8_t *c, int code_bias, float sc, float z, int mode, int start,
                                    float w[TQ_BLOCK]) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    int raw[TQ_BLOCK];
    if (bits == 4) {
        const uint8_t *b = c + start / 2;
        for (int j = 0; j < TQ_BLOCK / 2; j++) {
            raw[2 * j] = (b[j] & 15) + code_bias;
            raw[2 * j + 1] = (b[j] >> 4) + code_bias;
        }
    } else {
        const int8_t *b = (const int8_t *)c + start;
        for (int j = 0; j < TQ_BLOCK; j++) raw[j] = b[j] + code_bias;
    }
    if (mode == 1) {
        for (int j = 0; j < TQ_BLOCK; j++) {
            const float shifted = (float)raw[j] - z;
            w[j] = shifted * sc;
        }
    } else if (mode == 2) {
        for (int j = 0; j < TQ_BLOCK; j++) {
            const float scaled = (float)raw[j] * sc;
            w[j] = scaled + z;
        }
    } else {
        for (int j = 0; j < TQ_BLOCK; j++) w[j] = (float)raw[j] * sc;
    }
}

/* W [n, k] (k and the group size multiples of 32) from the codes as stored (trident/quant/rtn.py: int8 [n, k], or
 * int4 two per byte [n, k / 2] with element 2j in the low nibble), computed exactly as rtn.dequantize computes it,
 * in float32: c = code + code_bias (the format's offset: -8 for symmetric int4, +128 for asymmetric int8, else 0),
 * then per group g of row r
 *     mode 0: c * s,   mode 1: (c - z) * s,   mode 2: c * s + z   (s = scales[r, g], z = zeros[r, g]; two roundings,
 * never fused, as torch does it), stored as float32 or rounded to bfloat16 (to nearest even). For products of more
 * rows than tq_matmul takes (prefill), where torch's element-wise chain of the same arithmetic took 4x longer. */
TQ_NO_CONTRACT
void tq_dequantize(int bits, const uint8_t *codes, int code_bias, const float *scales, const float *zeros, int mode,
                   int n, int k, int groups, void *out, int out_bf16, int threads) {
    const int group_size = k / groups;
    const size_t row_bytes = bits == 4 ? (size_t)k / 2 : (size_t)k;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_default_threads())
    for (int r = 0; r < n; r++) {
        const uint8_t *c = codes + (size_t)r * row_bytes;
        int start = 0;
#if defined(TQ_ZMM) && defined(__AVX512BF16__)
        /* the same arithmetic on 16 lanes (the conversions and products are exact or rounded as in the scalar code;
         * vcvtneps2bf16 rounds to nearest even) */
        for (; start < k; start += TQ_BLOCK) {
            const size_t g = (size_t)r * groups + start / group_size;
            const __m512 sc = _mm512_set1_ps(scales[g]), z = _mm512_set1_ps(zeros ? zeros[g] : 0.0f);
            const __m512i bias = _mm512_set1_epi32(code_bias);
            __m512i raw[2];
            if (bits == 4) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(c + start / 2)), low4 = _mm_set1_epi8(0x0f);
                const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                raw[0] = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                raw[1] = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi));
            } else {
                raw[0] = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + start)));
                raw[1] = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + start + 16)));
            }
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(raw[h], bias));
                const __m512 w = mode == 1 ? _mm512_mul_ps(_mm512_sub_ps(v, z), sc)
                                 : mode == 2 ? _mm512_add_ps(_mm512_mul_ps(v, sc), z) : _mm512_mul_ps(v, sc);
                if (out_bf16)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)out + (size_t)r * k + start + 16 * h),
                                        (__m256i)_mm512_cvtneps_pbh(w));
                else
                    _mm512_storeu_ps((float *)out + (size_t)r * k + start + 16 * h, w);
            }
        }
#endif
        for (; start < k; start += TQ_BLOCK) {
            const size_t g = (size_t)r * groups + start / group_size;
            float w[TQ_BLOCK];
            dequantize_block(bits, c, code_bias, scales[g], zeros ? zeros[g] : 0.0f, mode, start, w);
            if (out_bf16) { /* float_to_bf16, written branch-free so that it vectorizes */
                uint16_t *o = (uint16_t *)out + (size_t)r * k + start;
                uint32_t u[TQ_BLOCK];
                memcpy(u, w, sizeof w);
                for (int j = 0; j < TQ_BLOCK; j++) {
                    const uint32_t rounded = (u[j] + 0x7fffu + ((u[j] >> 16) & 1u)) >> 16;
                    o[j] = (uint16_t)((u[j] & 0x7fffffffu) > 0x7f800000u ? ((u[j] >> 16) | 0x40u) : rounded);
                }
            } else {
                memcpy((float *)out + (size_t)r * k + start, w, sizeof w);
            }
        }
    }
}

/* Which integer dot product this build uses: 3 AVX-512 VNNI, 2 AVX-VNNI (256-bit), 1 AVX2, 0 plain C. */
int tq_isa(void) {
#if defined(TQ_ZMM)
    return 3;
#elif defined(TQ_YMM) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    return 2;
#elif defined(TQ_YMM)
    return 1;
#else
    return 0;
#endif
}
