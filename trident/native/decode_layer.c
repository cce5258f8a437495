/* One decoder layer of a Llama-form model for a decode step on the CPU, in one call: the norms, the projections
 * (qmatmul.c's integer dot products), the per-head query / key norms, the rotation, the KV-cache write, attention
 * over the paged cache, the gated MLP and both residual adds, for a few sequences' one new token each.
 *
 * Its torch reference is the general forward (and trident/engine/cpu_decode.py's step), which the tests compare
 * it with: the same operations in float32 (the torch path rounds to the model's dtype between them) with the
 * activations quantized in two int8 stages per block of 32 before each projection, as qmatmul.c does.
 *
 * The residual stream is the state between layers: layer l reads residual r, computes
 *     x = norm_in(r); r += o(attention(x)); r += down(act(gate(norm_post(r))) * up(norm_post(r)))
 * which is the Hugging Face layer with its residual adds (the torch path fuses each add into the next norm).
 * The cache is TorchAttention's layout, [kv_heads, slots, head_dim] per layer, in float32, bfloat16 or int8 codes
 * with a float32 scale per (kv head, slot) (trident/quant/kv.py: --kv-cache-dtype int8); a token at position t of a
 * sequence lives in slot block_table[t / block_size] * block_size + t % block_size. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tq_bf16.h"

int tq_matmul(const void *x, int x_bf16, int rows, int k, int bits, int natural, const uint8_t *codes,
              const uint16_t *scales, const uint16_t *offsets, int group_size, int n, const float *bias, void *y,
              int y_bf16, int n_out, void *workspace, int threads);
long tq_workspace_bytes(int rows, int k, int group_size);

typedef struct {
    int bits, natural, k, n, n_out, group_size; /* natural: int8 codes as stored (qmatmul.c's natural order) */
    const uint8_t *codes;
    const uint16_t *scales, *offsets;
    const float *bias;
} tq_weight;

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter;
    int activation; /* 0 silu, 1 gelu (tanh approximation), 2 gelu (erf) */
    int unit_offset, window, cache_format; /* cache_format: 0 float32, 1 bfloat16, 2 int8 codes with scales */
    float eps, head_eps, scale;
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* float32; q_norm / k_norm NULL without head norms */
    const float *inv_freq;                                  /* [head_dim / 2] */
    tq_weight qkv, o, gate_up, down;
    void *key_cache, *value_cache;
    float *key_scale, *value_scale; /* int8 caches: one scale per (kv head, slot), trident/quant/kv.py's format */
    long slots;
} tq_layer;

typedef struct {
    int rows, max_blocks, block_size, max_context, threads; /* threads: OpenMP threads (as tq_matmul's) */
    const int32_t *positions;    /* [rows]: the new token's position (its context is position + 1 tokens) */
    const int32_t *block_tables; /* [rows, max_blocks] */
    float *residual;             /* [rows, hidden], read and updated */
    void *workspace;
} tq_step;

#define TQ_LANES 16 /* partial sums per reduction: independent lanes the compiler can keep in one vector */
#define TQ_MAX_GROUP 64      /* query heads per kv head the layer takes */
#define TQ_MAX_HEAD_DIM 1024 /* head_dim the layer takes */

/* Dot product of float32 q with a float32 row (n a multiple of TQ_LANES, else a scalar tail). */
static inline float dot_f32(const float *q, const float *k, int n) {
    float acc[TQ_LANES] = {0};
    int i = 0;
    for (; i + TQ_LANES <= n; i += TQ_LANES)
        for (int j = 0; j < TQ_LANES; j++) acc[j] += q[i + j] * k[i + j];
    float total = 0.0f;
    for (int j = 0; j < TQ_LANES; j++) total += acc[j];
    for (; i < n; i++) total += q[i] * k[i];
    return total;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define TQ_VEC_MAX_HEAD_DIM 256 /* head_dim (a multiple of 16) up to which scores take the vector path */

/* out[u] = q . k_u for n <= 16 float32 rows k_u = k + u * D (D a multiple of 16): each row summed in 16 lanes, then
 * the 16 rows' lanes added in one transposing tree, 16 scores at a time, instead of one serial reduction each. */
static inline __m512 dot16_rows(const float *q, const float *k, int n, int D) {
    __m512 a[16];
    for (int u = 0; u < 16; u++) a[u] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 16) {
        const __m512 qc = _mm512_loadu_ps(q + c);
        for (int u = 0; u < n; u++) a[u] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k + (long)u * D + c), a[u]);
    }
    __m512 b[8], c[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of rows 2i, 2i + 1 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: the lane's 4-element sums of rows 4i .. 4i + 3 */
        const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
    const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xdd)); /* lane u: row u */
}
#endif

#if defined(__AVX512F__)
/* e^x on 16 lanes: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact product), e^r by its Taylor series
 * to r^7 (relative error < 1e-8, below float32's 6e-8 spacing), times 2^n by vscalefps (which also gives 0 and inf
 * past float32's range). Within 2 float32 units of expf on [-87, 88] (tests/native compare the layer against
 * float64). */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* v[i] = e^(v[i] - shift) for i < n; returns their sum. */
static float exp_shifted(float *v, int n, float shift) {
    float total = 0.0f;
    int i = 0;
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v + i), _mm512_set1_ps(shift)));
        _mm512_storeu_ps(v + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; i < n; i++) total += (v[i] = expf(v[i] - shift));
    return total;
}

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up, i < n. */
static void silu_mul(const float *gate, const float *up, int n, float *out) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 sig = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(sig, _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static void rms_norm(const float *x, const float *weight, int n, float eps, int unit_offset, float *out) {
    const float ss = dot_f32(x, x, n);
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * (unit_offset ? 1.0f + weight[i] : weight[i]);
}

/* Cached rows [n, D] of one kv head from element `at` (a multiple of D; slot at / D) as float32 into out: bf16 widened,
 * int8 codes times their row's scale (trident/quant/kv.py's dequantize_kv), float32 copied. */
static inline void widen_rows(const tq_layer *L, const void *cache, const float *scales, long at, int n, int D,
                              float *out) {
    if (L->cache_format == 1) {
        const uint16_t *src = (const uint16_t *)cache + at;
        for (long i = 0; i < (long)n * D; i++) out[i] = bf16_to_float(src[i]);
    } else if (L->cache_format == 2) {
        const int8_t *src = (const int8_t *)cache + at;
        for (int u = 0; u < n; u++) {
            const float sc = scales[at / D + u];
            for (int i = 0; i < D; i++) out[(long)u * D + i] = (float)src[(long)u * D + i] * sc;
        }
    } else {
        memcpy(out, (const float *)cache + at, sizeof(float) * (size_t)n * D);
    }
}

/* n cached rows from element `at` as float32: the cache itself when it holds float32, else widened into buf. */
static inline const float *cached_rows(const tq_layer *L, const void *cache, const float *scales, long at, int n,
                                       int D, float *buf) {
    if (L->cache_format == 0) return (const float *)cache + at;
    widen_rows(L, cache, scales, at, n, D, buf);
    return buf;
}

/* The tokens t .. t + run - 1 (run > 0) that share t's block (and come before `context`), and the cache element of
 * the first of them for kv head base `head_base` (in slots). */
static inline int block_run(const tq_step *S, const int32_t *table, long head_base, int t, int context, int D,
                            long *at) {
    const int in_block = t % S->block_size;
    *at = (head_base + (long)table[t / S->block_size] * S->block_size + in_block) * D;
    return S->block_size - in_block < context - t ? S->block_size - in_block : context - t;
}

/* One kv head's new key or value row into its cache slot (element `at`), in the cache's format: int8 as
 * trident/quant/kv.py's quantize_kv (s = absmax / 127, q = clamp(floor(x / s + 0.5), +-127); a zero row: s = 0). */
static inline void store_row(const tq_layer *L, void *cache, float *scales, long at, const float *x, int D) {
    if (L->cache_format == 1) {
        uint16_t *dst = (uint16_t *)cache + at;
        for (int i = 0; i < D; i++) dst[i] = float_to_bf16(x[i]);
    } else if (L->cache_format == 2) {
        float amax = 0.0f;
        for (int i = 0; i < D; i++) amax = fmaxf(amax, fabsf(x[i]));
        const float sc = amax / 127.0f, div = sc > 0.0f ? sc : 1.0f;
        int8_t *dst = (int8_t *)cache + at;
        for (int i = 0; i < D; i++) {
            const float q = floorf(x[i] / div + 0.5f);
            dst[i] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
        }
        scales[at / D] = sc;
    } else {
        memcpy((float *)cache + at, x, sizeof(float) * (size_t)D);
    }
}

/* cos and sin of position * inv_freq[i] (i < head_dim / 2): one table per token, shared by all its heads. */
static void rotation(int head_dim, const float *inv_freq, int position, float *cs) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float angle = (float)position * inv_freq[i];
        cs[i] = cosf(angle), cs[half + i] = sinf(angle);
    }
}

static void rotate(float *v, int head_dim, const float *cs) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float c = cs[i], s = cs[half + i], x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c - x2 * s;
        v[i + half] = x2 * c + x1 * s;
    }
}

static inline float activation(int kind, float g) {
    if (kind == 0) return g / (1.0f + expf(-g));
    if (kind == 1) return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
}

static long matmul_workspace(const tq_weight *w, int rows) { return tq_workspace_bytes(rows, w->k, w->group_size); }

static int project(const tq_weight *w, const float *x, int rows, float *y, void *workspace, int threads) {
    return tq_matmul(x, 0, rows, w->k, w->bits, w->natural, w->codes, w->scales, w->offsets, w->group_size, w->n, w->bias, y, 0,
                     w->n_out, workspace, threads);
}

static inline long round64(long bytes) { return (bytes + 63) & ~63L; }

/* Workspace bytes tq_decode_layer needs for `rows` sequences of at most `max_context` tokens. */
long tq_layer_workspace_bytes(const tq_layer *L, int rows, int max_context) {
    const long qkv = (long)(L->heads + 2 * L->kv_heads) * L->head_dim;
    const long wide = L->hidden > L->inter ? L->hidden : L->inter;
    long floats = round64(rows * wide) + round64(rows * qkv) + round64(rows * (long)L->heads * L->head_dim) +
                  round64(rows * 2L * L->inter) + round64(rows * (long)L->hidden) +
                  round64((long)rows * L->heads * max_context);
    long mm = matmul_workspace(&L->qkv, rows);
    const tq_weight *others[3] = {&L->o, &L->gate_up, &L->down};
    for (int i = 0; i < 3; i++) {
        long b = matmul_workspace(others[i], rows);
        if (b > mm) mm = b;
    }
    return floats * 4 + round64(mm) + 64;
}

/* The layer for S->rows sequences (see the top). Returns 0, or -1 for arguments it does not take. */
int tq_decode_layer(const tq_layer *L, const tq_step *S) {
    const int rows = S->rows, H = L->hidden, D = L->head_dim, heads = L->heads, kvh = L->kv_heads;
    const int qkv_width = (heads + 2 * kvh) * D, group = heads / kvh;
    if (rows < 1 || heads % kvh || D % 2 || group > TQ_MAX_GROUP || D > TQ_MAX_HEAD_DIM || L->cache_format < 0 ||
        L->cache_format > 2 || (L->cache_format == 2 && (!L->key_scale || !L->value_scale)))
        return -1;
    for (int m = 0; m < rows; m++)
        if (S->positions[m] < 0 || S->positions[m] >= S->max_context) return -1;
    const long wide = H > L->inter ? H : L->inter;
    float *x = (float *)S->workspace;
    float *qkv = x + round64(rows * wide);
    float *att = qkv + round64((long)rows * qkv_width);
    float *gu = att + round64((long)rows * heads * D);
    float *tmp = gu + round64(rows * 2L * L->inter);
    float *scores = tmp + round64((long)rows * H);
    void *mm = scores + round64((long)rows * heads * S->max_context);

    /* attention */
    for (int m = 0; m < rows; m++) rms_norm(S->residual + (long)m * H, L->input_norm, H, L->eps, L->unit_offset, x + (long)m * H);
    if (project(&L->qkv, x, rows, qkv, mm, S->threads)) return -1;
    for (int m = 0; m < rows; m++) {
        float *row = qkv + (long)m * qkv_width;
        const int pos = S->positions[m];
        float cs[TQ_MAX_HEAD_DIM];
        rotation(D, L->inv_freq, pos, cs);
        for (int h = 0; h < heads + kvh; h++) {
            float *v = row + (long)h * D;
            const float *nw = h < heads ? L->q_norm : L->k_norm;
            if (nw) rms_norm(v, nw, D, L->head_eps, L->unit_offset, v);
            rotate(v, D, cs);
        }
        const int32_t *table = S->block_tables + (long)m * S->max_blocks;
        const long slot = (long)table[pos / S->block_size] * S->block_size + pos % S->block_size;
        for (int h = 0; h < kvh; h++) {
            const float *k = row + (long)(heads + h) * D, *v = row + (long)(heads + kvh + h) * D;
            const long at = ((long)h * L->slots + slot) * D;
            store_row(L, L->key_cache, L->key_scale, at, k, D);
            store_row(L, L->value_cache, L->value_scale, at, v, D);
        }
    }
    /* attention: one task per sequence and kv head; each cached key and value row is read (and widened to float32)
     * once for the group of query heads that share it, walking the sequence's blocks */
#pragma omp parallel for collapse(2) schedule(static) num_threads(S->threads > 0 ? S->threads : 1)
    for (int m = 0; m < rows; m++) {
        for (int g = 0; g < kvh; g++) {
            const int pos = S->positions[m], context = pos + 1;
            const int start = L->window > 0 && context > L->window ? context - L->window : 0;
            const int32_t *table = S->block_tables + (long)m * S->max_blocks;
            const long head_base = (long)g * L->slots;
            float best[TQ_MAX_GROUP], total[TQ_MAX_GROUP], row[TQ_MAX_HEAD_DIM];
#if defined(__AVX512F__)
            float keys[16 * TQ_VEC_MAX_HEAD_DIM];
#endif
            for (int j = 0; j < group; j++) best[j] = -INFINITY, total[j] = 0.0f;
            for (int t = start; t < context;) {
                long at;
                const int run = block_run(S, table, head_base, t, context, D, &at);
#if defined(__AVX512F__)
                if (D % 16 == 0 && D <= TQ_VEC_MAX_HEAD_DIM) { /* 16 keys at a time */
                    for (int u0 = 0; u0 < run; u0 += 16) {
                        const int n = run - u0 < 16 ? run - u0 : 16;
                        const float *k = cached_rows(L, L->key_cache, L->key_scale, at + (long)u0 * D, n, D, keys);
                        for (int j = 0; j < group; j++) {
                            const int h = g * group + j;
                            float *s = scores + ((long)m * heads + h) * S->max_context + t + u0;
                            float lanes[16];
                            _mm512_storeu_ps(lanes, _mm512_mul_ps(dot16_rows(qkv + (long)m * qkv_width + (long)h * D, k, n, D),
                                                                  _mm512_set1_ps(L->scale)));
                            for (int u = 0; u < n; u++) {
                                s[u] = lanes[u];
                                if (s[u] > best[j]) best[j] = s[u];
                            }
                        }
                    }
                    t += run;
                    continue;
                }
#endif
                for (int u = 0; u < run; u++, t++) {
                    const float *k = cached_rows(L, L->key_cache, L->key_scale, at + (long)u * D, 1, D, row);
                    for (int j = 0; j < group; j++) {
                        const int h = g * group + j;
                        float *s = scores + ((long)m * heads + h) * S->max_context;
                        s[t] = dot_f32(qkv + (long)m * qkv_width + (long)h * D, k, D) * L->scale;
                        if (s[t] > best[j]) best[j] = s[t];
                    }
                }
            }
            for (int j = 0; j < group; j++) {
                float *s = scores + ((long)m * heads + g * group + j) * S->max_context;
                total[j] = exp_shifted(s + start, context - start, best[j]);
                float *out = att + ((long)m * heads + g * group + j) * D;
                for (int i = 0; i < D; i++) out[i] = 0.0f;
            }
            for (int t = start; t < context;) {
                long at;
                const int run = block_run(S, table, head_base, t, context, D, &at);
                for (int u = 0; u < run; u++, t++) {
                    const float *v = cached_rows(L, L->value_cache, L->value_scale, at + (long)u * D, 1, D, row);
                    for (int j = 0; j < group; j++) {
                        const int h = g * group + j;
                        const float p = scores[((long)m * heads + h) * S->max_context + t] / total[j];
                        float *out = att + ((long)m * heads + h) * D;
                        for (int i = 0; i < D; i++) out[i] += p * v[i];
                    }
                }
            }
        }
    }
    if (project(&L->o, att, rows, tmp, mm, S->threads)) return -1;
    for (long i = 0; i < (long)rows * H; i++) S->residual[i] += tmp[i];

    /* MLP */
    for (int m = 0; m < rows; m++) rms_norm(S->residual + (long)m * H, L->post_norm, H, L->eps, L->unit_offset, x + (long)m * H);
    if (project(&L->gate_up, x, rows, gu, mm, S->threads)) return -1;
    const int I = L->inter;
    for (int m = 0; m < rows; m++) {
        if (L->activation == 0) {
            silu_mul(gu + (long)m * 2 * I, gu + (long)m * 2 * I + I, I, x + (long)m * I);
            continue;
        }
        for (int i = 0; i < I; i++) x[(long)m * I + i] = activation(L->activation, gu[(long)m * 2 * I + i]) * gu[(long)m * 2 * I + I + i];
    }
    if (project(&L->down, x, rows, tmp, mm, S->threads)) return -1;
    for (long i = 0; i < (long)rows * H; i++) S->residual[i] += tmp[i];
    return 0;
}
