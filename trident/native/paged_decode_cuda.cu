// Paged-attention decode over an 8-bit KV cache (int8 or fp8 e4m3 codes with one float32 scale per token and kv
// head, trident/quant/kv.py): one query token per sequence attends its cached context through the block table.
// The Triton kernel (trident/kernels/paged_decode.py) runs these caches at the time of the bfloat16 bytes, not half
// of it: its tensor-core products take the converted codes through shared memory into their operand layout (8.3 M
// shared loads per layer of the nano workload, 12-18% of warps active, docs/benchmarks.md). Here each lane reads
// the codes it multiplies into registers and converts them there straight into the tensor cores' operand layout
// (mma.sync m16n8k16, float16 operands, float32 sums):
//
//  * A block (CTA) takes one (sequence, kv head, split) and the kv head's query heads (up to 16; a larger group is
//    cut into blocks of 16). Its warps take the context in tiles of 16 tokens. Blocks go out sequence by sequence
//    in row order, and the engine orders its decode rows longest context first (StepPlan.longest_decodes_first),
//    so the last wave of blocks holds the short contexts.
//  * Each warp streams its tiles through a ring of DECODE_STAGES shared-memory stages with asynchronous copies
//    (cp.async: the next tiles' keys, values and scales are in flight while this one is multiplied, without
//    holding registers); the page of each of its next 32 tiles is read once into a lane of its own, so no copy
//    waits on the block table. Rows are stored with their 16-byte chunks XOR-swizzled by the row, so the lanes'
//    reads below meet distinct banks. A tile that one page holds whole (the usual case) costs one address
//    computation and unpredicated copies; predicates are for a context's first and last tiles.
//  * The kernel is bound by instruction issue rather than by memory (Nsight Compute: ~0.5 instructions issued per
//    scheduler and cycle at 75% of the DRAM bandwidth), so the per-tile instruction count is what sets its speed.
//  * Scores: a dot product does not care in which order it meets the dims, so each lane reads D / 4 contiguous
//    bytes of a key (tokens g and g + 8 of the tile) and k-step s of the product takes the lane's word s; the
//    queries are laid out in the same order, once. With at most 8 heads per kv head the product is S^T = K Q^T:
//    the keys are the A operand (rows = the tile's 16 tokens, none wasted), the queries the B operand (columns =
//    heads); with 16 heads it is S = Q K^T (queries as A, rows = heads; keys as B).
//  * Output O^T = V^T P^T: the probabilities are the B operand (rows = tokens, columns = heads). Out of S = Q K^T
//    they are already in its layout; out of S^T they are two 8 x 8 fragments (tokens g, g + 8 by heads 2 t4,
//    2 t4 + 1) that movmatrix transposes into it. The values are the A operand, which wants two consecutive tokens
//    at one dim in a register: each lane reads D / 8 contiguous bytes (dims) of the four tokens it multiplies and
//    pairs their bytes by byte permutes. A group of up to 8 heads fills the 8 columns.
//  * Codes become float16 without an integer-to-float conversion: an int8 code c, biased to c + 128, under the
//    float16 exponent of 1024 by a byte permute (keys) or one three-input logic instruction (values) is the
//    float16 1152 + c (exact); the 1152 * sum(q) this adds to the scores and the 1152 * sum(p) it adds to the
//    output are taken back off in float32 (the Triton kernel's F16_CODES_NOTE). fp8 pairs go through the
//    hardware's e4m3x2 -> f16x2 conversion (exact). Queries and probabilities times value scales are rounded to
//    float16, as in the Triton kernel.
//  * An online softmax in the log2 domain per head (exp2 by the hardware's approximation, subnormal results
//    flushed to zero); the output is rescaled only when a warp sees a new maximum. The key scale multiplies the
//    score, the value scale the probability. At the end the warps combine through shared memory; a split writes
//    its partial output and log-sum-exp (the Triton reduce kernel combines the splits, as for the Triton decode).
//  Measured on an H200 (one Qwen3-0.6B layer, 188 sequences of mean context 858): int8 92 us, 3.7 TB/s of codes
//  and scales, against Triton's 182 us (docs/benchmarks.md).
//
// Requirements (checked by trident/native/paged_decode_cuda.py): D 64 or 128; at most 16 query heads per kv head or
// a multiple of 16; a power-of-two block size; 16-bit queries and outputs with unit stride over D and 16-byte
// aligned rows; caches [num_blocks, kv_heads, block_size, D] with unit stride over D and 16-byte aligned rows;
// scales [num_blocks, kv_heads, block_size]; int64 block tables, context lengths and query rows. Never reads a
// slot beyond a sequence's context (its scale may be anything, NaN included).

#include <cuda_fp8.h>
#include <math_constants.h>

#include <type_traits>

#include "dp4a_common.cuh"

#ifndef DECODE_WARPS
#define DECODE_WARPS 4  // warps per block
#endif
#ifndef DECODE_MIN_BLOCKS
#define DECODE_MIN_BLOCKS 3  // blocks per multiprocessor the register allocation must allow (groups of <= 8 heads)
#endif
#define DECODE_THREADS (DECODE_WARPS * 32)
#define TILE 16         // tokens a warp takes at a time
#ifndef DECODE_STAGES
#define DECODE_STAGES 3  // tiles of a warp in shared memory: the copies of the next STAGES - 1 are in flight
#endif
#define MAX_ROWS 16     // query heads per block (the rows of the products)
#define INT8_MAGIC 1152.f

struct DecodeArgs {
    const void* q;
    const uint8_t* k_cache;
    const uint8_t* v_cache;
    const float* k_scale;
    const float* v_scale;
    const int64_t* block_tables;
    const int64_t* context_lens;
    const int64_t* token_indices;
    void* out;
    float* partial_out;  // [batch, num_heads, num_splits, D] float32 (num_splits > 1)
    float* partial_lse;  // [batch, num_heads, num_splits], log2 domain, -inf when empty
    int64_t stride_qt, stride_qh, stride_ot, stride_oh, stride_bt;
    int64_t stride_cb, stride_ch, stride_cs, stride_sb, stride_sh;
    float scale_in, scale_out;  // trident/kernels/paged_common.py's score_factors (log2(e) folded in)
    int softcap;                // 1: scores soft-capped (scale_out * tanh(raw * scale_in))
    int window;                 // sliding window (0: none)
    int block_shift;            // log2(block size)
    int num_heads, group, num_splits;
};

// d += a b for one m16n8k16 tile (float16 operands, float32 sums).
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float2 unpack_half2(uint32_t v) {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

// Two 8-bit codes, the low bytes of the 16-bit halves of `pair`, as a float16 pair (int8 codes c: 1152 + c).
template <bool FP8>
__device__ __forceinline__ uint32_t codes_half2(uint32_t pair) {
    if constexpr (FP8) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)__byte_perm(pair, 0, 0x20), __NV_E4M3);
        return *reinterpret_cast<const uint32_t*>(&h);
    } else {
        // each half: 0x64 over c + 128, the float16 1024 + (c + 128): (pair & 0x00FF00FF) ^ 0x64806480 as one
        // three-input logic instruction (written as two, the compiler emits two)
        uint32_t h;
        asm("lop3.b32 %0, %1, 0x00FF00FF, 0x64806480, 0x6A;" : "=r"(h) : "r"(pair));
        return h;
    }
}

// A 32-bit word of codes as two float16 pairs: bytes 0, 1 and bytes 2, 3.
template <bool FP8>
__device__ __forceinline__ void word_half2(uint32_t w, uint32_t& lo, uint32_t& hi) {
    if constexpr (FP8) {
        const __half2_raw a = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w & 0xFFFFu), __NV_E4M3);
        const __half2_raw b = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w >> 16), __NV_E4M3);
        lo = *reinterpret_cast<const uint32_t*>(&a);
        hi = *reinterpret_cast<const uint32_t*>(&b);
    } else {
        const uint32_t biased = w ^ 0x80808080u;
        lo = __byte_perm(biased, 0x64646464u, 0x4140);  // [byte 0, 0x64, byte 1, 0x64]
        hi = __byte_perm(biased, 0x64646464u, 0x4342);
    }
}

template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    } else {
        return __half22float2(*reinterpret_cast<const __half2*>(p));
    }
}

// Raw scores (times the key scales) into the log2 domain (score_factors in trident/kernels/paged_common.py):
// scale_out tanh(raw scale_in) when soft-capped, else raw scale_in. The branch is uniform over the warp: one a
// tile, not one a score.
__device__ __forceinline__ void finish_scores(float (&v)[4], float scale_in, float scale_out, int softcap) {
    if (softcap) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float x = v[i] * scale_in;  // tanh(x) = 1 - 2 / (exp(2x) + 1), exact limits at both ends
            v[i] = (1.f - 2.f / (__expf(2.f * x) + 1.f)) * scale_out;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) v[i] *= scale_in;
    }
}

// exp2(a - b) where either may be -inf (an empty state): 0 unless a is finite.
// 2^x by the hardware's approximation (about 2 ulp; results below 2^-126, subnormal, flushed to 0: a probability
// that small is nothing beside the row's maximum, whose probability is 1), without exp2f's subnormal handling.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float rescale(float a, float b) { return a == -CUDART_INF_F ? 0.f : fast_exp2(a - b); }

// The transpose of an 8 x 8 matrix of 16-bit values held as mma fragments (lane L: row L / 4, columns 2 (L % 4) and
// 2 (L % 4) + 1 as one 32-bit register), in the same layout.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// Sum / max over the lane quad (the 4 lanes that hold one row of a product).
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Asynchronous copies global -> shared (cp.async): `bytes` (16 or 4) from `src`, or zeros where `valid` is false
// (no byte of `src` is read then).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    const int n = valid ? BYTES : 0;
    if constexpr (BYTES == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(n));
    }
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void copy_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <int BYTES>
struct Chunk;  // BYTES contiguous bytes of codes in registers
template <> struct Chunk<8> { uint32_t w[2]; };
template <> struct Chunk<16> { uint32_t w[4]; };
template <> struct Chunk<32> { uint32_t w[8]; };

// Lane layout of an m16n8k16 product: g = lane / 4 (rows g and g + 8 of A and of the result; column g of B), t4 =
// lane % 4 (columns 2 t4, 2 t4 + 1 and those + 8 of A; rows of B likewise; columns 2 t4, 2 t4 + 1 of the result).
template <int D, bool ROWS16, bool FP8, typename T>
__global__ void __launch_bounds__(DECODE_THREADS, ROWS16 ? 2 : DECODE_MIN_BLOCKS) decode_kernel(const DecodeArgs a) {
    constexpr int KS = D / 16;      // k-steps of the score product: words of a lane's key bytes
    constexpr int KB = D / 4;       // key bytes a lane loads per token (of its quad's D)
    constexpr int VB = D / 8;       // value bytes (dims) a lane loads per token
    constexpr int NT = D / 16;      // m-tiles of the output product per head tile (two dims of a lane each)
    constexpr int HALVES = ROWS16 ? 2 : 1;  // row halves a lane holds: rows g and g + 8
    constexpr int CPR = D / 16;     // 16-byte chunks per key / value row
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ float sm_m[DECODE_WARPS][MAX_ROWS], sm_l[DECODE_WARPS][MAX_ROWS], sm_p[DECODE_WARPS][MAX_ROWS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int rows = min(a.group, MAX_ROWS);  // query heads of this block
    const int chunks = a.group / rows;
    const int num_kv_heads = a.num_heads / a.group;
    int index = blockIdx.x;
    const int split = index % a.num_splits;
    index /= a.num_splits;
    const int head_block = index % (num_kv_heads * chunks);
    const int64_t seq = index / (num_kv_heads * chunks);
    const int kv_head = head_block / chunks;
    const int head0 = kv_head * a.group + (head_block % chunks) * rows;

    wait_for_previous_grid();  // the queries and the cache's newest slot come from the kernels before
    const int context = (int)a.context_lens[seq];
    const int start = a.window > 0 ? max(context - a.window, 0) : 0;
    const int per_split = ((context - start + a.num_splits - 1) / a.num_splits + TILE - 1) & ~(TILE - 1);
    const int lo = start + split * per_split;
    const int hi = min(lo + per_split, context);
    const int64_t token = a.token_indices[seq];

    // Queries in the order of the lane's key bytes: k-step s takes dims KB t4 + 4 s + {0, 1} (register 0 / 1: heads
    // g / g + 8) and KB t4 + 4 s + {2, 3} (registers 2 / 3): the A operand of S = Q K^T with 16 heads, registers 0
    // and 2 the B operand of S^T = K Q^T with at most 8. Rows past the group are zeros.
    uint32_t qa[KS][4];
    float q_sum[HALVES];  // over the float16 queries of rows g (and g + 8), for the int8 codes' magic
#pragma unroll
    for (int r = 0; r < HALVES; r++) {
        const int row = g + 8 * r;
        const T* qp = reinterpret_cast<const T*>(a.q) + token * a.stride_qt + (head0 + row) * a.stride_qh + KB * t4;
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < KS; s++) {
            float2 lo2 = make_float2(0.f, 0.f), hi2 = lo2;
            if (row < rows) {
                lo2 = load_pair<T>(qp + 4 * s);
                hi2 = load_pair<T>(qp + 4 * s + 2);
            }
            qa[s][r] = pack_half2(lo2.x, lo2.y);
            qa[s][2 + r] = pack_half2(hi2.x, hi2.y);
            const float2 l2 = unpack_half2(qa[s][r]), h2 = unpack_half2(qa[s][2 + r]);
            sum += (l2.x + l2.y) + (h2.x + h2.y);
        }
        q_sum[r] = quad_sum(sum);
    }

    // Per lane, for two heads (rows g and g + 8 of S = Q K^T with 16 heads; heads 2 t4 and 2 t4 + 1 of S^T = K Q^T
    // with at most 8): running maximum, sum of probabilities, sum of their float16 operands.
    float m[2], l[2], p_sum[2];
    // at most 8 heads: the queries' sums of heads 2 t4 + {0, 1} (those of head g are q_sum[0])
    float q_head[2];
#pragma unroll
    for (int c = 0; c < 2; c++) q_head[c] = __shfl_sync(0xffffffffu, q_sum[0], 4 * (2 * t4 + c));
    // The output, transposed (O^T = V^T P^T): acc[r][j] is the m16n8 tile of dims VB g + j (registers 0, 1) and
    // VB g + VB / 2 + j (2, 3) by heads 8 r + 2 t4 + {0, 1}.
    float acc[HALVES][NT][4];
#pragma unroll
    for (int c = 0; c < 2; c++) {
        m[c] = -CUDART_INF_F;
        l[c] = p_sum[c] = 0.f;
    }
#pragma unroll
    for (int r = 0; r < HALVES; r++) {
#pragma unroll
        for (int j = 0; j < NT; j++) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.f;
    }

    const int64_t* table = a.block_tables + seq * a.stride_bt;
    const int block_mask = (1 << a.block_shift) - 1;
    const bool page_per_tile = a.block_shift >= 4;  // tiles start at multiples of 16: one page holds a tile
    const int64_t head_offset = kv_head * a.stride_ch;
    const int64_t scale_head_offset = kv_head * a.stride_sh;

    // The warp's tiles: first + k * STRIDE. Each goes through a ring of DECODE_STAGES shared-memory stages (keys
    // [16][D], values [16][D], key and value scales [16]); row r's 16-byte chunk c is stored at chunk c ^ (r % CPR),
    // so that the lanes' reads below meet distinct banks. Lane L keeps the page of the warp's tile L (of each run of
    // 32 tiles) when a page holds whole tiles, so no copy waits on the block table.
    constexpr int STRIDE = DECODE_WARPS * TILE;
    constexpr int STAGE_BYTES = 2 * TILE * D + 2 * TILE * 4;
    uint8_t* ring = smem + warp * DECODE_STAGES * STAGE_BYTES;
    const int first = (lo & ~(TILE - 1)) + warp * TILE;
    const int num_tiles = first < hi ? (hi - first + STRIDE - 1) / STRIDE : 0;
    int64_t lane_page = 0;
    // A lane's share of a tile's copies: chunks lane + 32 i of the tile's 16 rows of CPR chunks, i.e. rows
    // lane / CPR + RPI i at chunk lane % CPR. Its offsets within a page (row 0 at the tile's first slot) and within
    // a stage are the same for every tile.
    constexpr int RPI = 32 / CPR;  // rows per copy instruction of the warp
    const int lane_row = lane / CPR, lane_part = lane % CPR;
    const int lane_offset = lane_row * (int)a.stride_cs + 16 * lane_part;
    auto stage_at = [&](int i) {  // where chunk lane + 32 i lands in a stage (swizzled by its row)
        const int row = lane_row + RPI * i;
        return row * D + 16 * (lane_part ^ (row % CPR));
    };
    auto issue = [&](int k) {  // the copies of tile k into its stage (none past the last tile), one commit group
        uint8_t* stage = ring + (k % DECODE_STAGES) * STAGE_BYTES;
        const int tile = first + k * STRIDE;
        if (k < num_tiles) {
            if (page_per_tile) {
                // One page holds the tile: its slots are rows of one contiguous run, one address computation a
                // tile (page numbers and the page stride fit in 32 bits); predicates only on a partial tile.
                if (k % 32 == 0) {
                    const int mine = tile + lane * STRIDE;
                    lane_page = mine < hi ? table[mine >> a.block_shift] : 0;
                }
                const int page = (int)__shfl_sync(0xffffffffu, lane_page, k % 32);
                const int64_t base = (int64_t)page * (int)a.stride_cb + head_offset +
                                     (tile & block_mask) * (int)a.stride_cs + lane_offset;
                const uint8_t* keys = a.k_cache + base;
                const uint8_t* values = a.v_cache + base;
                const int row_step = RPI * (int)a.stride_cs;
                const float* scales = (lane < TILE ? a.k_scale : a.v_scale) + (int64_t)page * (int)a.stride_sb +
                                      scale_head_offset + (tile & block_mask) + lane % TILE;
                auto copies = [&](auto whole_tile) {
                    constexpr bool WHOLE = decltype(whole_tile)::value;
#pragma unroll
                    for (int i = 0; i < TILE * CPR / 32; i++) {
                        const int t = tile + lane_row + RPI * i;
                        const bool valid = WHOLE || (t >= lo && t < hi);
                        copy_async<16>(stage + stage_at(i), valid ? keys + i * row_step : a.k_cache, valid);
                        copy_async<16>(stage + TILE * D + stage_at(i), valid ? values + i * row_step : a.v_cache,
                                       valid);
                    }
                    const int t = tile + lane % TILE;
                    const bool valid = WHOLE || (t >= lo && t < hi);
                    copy_async<4>(stage + 2 * TILE * D + 4 * lane, valid ? scales : a.k_scale, valid);
                };
                if (tile >= lo && tile + TILE <= hi) {  // every slot of the tile attended
                    copies(std::true_type{});
                } else {
                    copies(std::false_type{});
                }
            } else {  // pages shorter than a tile: each row through the block table
#pragma unroll
                for (int i = 0; i < TILE * CPR / 32; i++) {
                    const int t = tile + lane_row + RPI * i;
                    const bool valid = t >= lo && t < hi;
                    const int64_t pg = valid ? table[t >> a.block_shift] : 0;
                    const int64_t offset = pg * a.stride_cb + head_offset + (t & block_mask) * a.stride_cs +
                                           16 * lane_part;
                    copy_async<16>(stage + stage_at(i), a.k_cache + (valid ? offset : 0), valid);
                    copy_async<16>(stage + TILE * D + stage_at(i), a.v_cache + (valid ? offset : 0), valid);
                }
                const int row = lane % TILE, t = tile + row;
                const bool valid = t >= lo && t < hi;
                const int64_t pg = valid ? table[t >> a.block_shift] : 0;
                const float* scales = lane < TILE ? a.k_scale : a.v_scale;
                copy_async<4>(stage + 2 * TILE * D + 4 * lane,
                              scales + (valid ? pg * a.stride_sb + scale_head_offset + (t & block_mask) : 0), valid);
            }
        }
        copy_commit();
    };
#pragma unroll
    for (int k = 0; k < DECODE_STAGES - 1; k++) issue(k);

    for (int k = 0; k < num_tiles; k++) {
        copy_wait<DECODE_STAGES - 2>();  // tile k has landed (this lane's copies) ...
        __syncwarp();                     // ... and every lane's; stage (k - 1) is free again
        issue(k + DECODE_STAGES - 1);
        const uint8_t* stage = ring + (k % DECODE_STAGES) * STAGE_BYTES;
        const uint8_t* keys = stage;
        const uint8_t* values = stage + TILE * D;
        const float* key_scales = reinterpret_cast<const float*>(stage + 2 * TILE * D);
        const int tile = first + k * STRIDE;
        // keys: rows g (n-tile 0) and 8 + g (n-tile 1), bytes KB t4 ... KB t4 + KB - 1
        Chunk<KB> kc[2];
#pragma unroll
        for (int n = 0; n < 2; n++) {
            const int row = 8 * n + g;
#pragma unroll
            for (int i = 0; i < KB / 16; i++) {
                const int part = (KB / 16) * t4 + i;
                const uint4 v = *reinterpret_cast<const uint4*>(keys + row * D + 16 * (part ^ (row % CPR)));
                kc[n].w[4 * i] = v.x;
                kc[n].w[4 * i + 1] = v.y;
                kc[n].w[4 * i + 2] = v.z;
                kc[n].w[4 * i + 3] = v.w;
            }
        }
        // values: rows 2 t4 + {0, 1} and 8 + 2 t4 + {0, 1} (the output product's k index), bytes (dims) VB g ...
        // VB g + VB - 1
        Chunk<VB> vc[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = 8 * (i >> 1) + 2 * t4 + (i & 1);
            const int byte = VB * g;
            const uint8_t* src = values + row * D + 16 * ((byte / 16) ^ (row % CPR)) + byte % 16;
            if constexpr (VB == 16) {
                const uint4 v = *reinterpret_cast<const uint4*>(src);
                vc[i].w[0] = v.x;
                vc[i].w[1] = v.y;
                vc[i].w[2] = v.z;
                vc[i].w[3] = v.w;
            } else {
                const uint2 v = *reinterpret_cast<const uint2*>(src);
                vc[i].w[0] = v.x;
                vc[i].w[1] = v.y;
            }
        }

        uint32_t pb[HALVES][2];  // the probabilities times value scales: the B operand of the output product
        if constexpr (!ROWS16) {
            // At most 8 heads: S^T = K Q^T, the keys the A operand (rows: the tile's tokens g and g + 8, no rows
            // wasted), the queries the B operand (columns: heads). st[0], st[1]: token g, heads 2 t4, 2 t4 + 1;
            // st[2], st[3]: token g + 8.
            float st[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int s = 0; s < KS; s++) {
                uint32_t ka[4];
                word_half2<FP8>(kc[0].w[s], ka[0], ka[2]);
                word_half2<FP8>(kc[1].w[s], ka[1], ka[3]);
                mma16816(st, ka, qa[s][0], qa[s][2]);
            }
            float ks2[2], vs2[2];
            bool valid2[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = g + 8 * h;
                valid2[h] = tile + row >= lo && tile + row < hi;
                ks2[h] = key_scales[row];
                vs2[h] = key_scales[TILE + row];
            }
            float v[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float raw = st[i];
                if (!FP8) raw -= INT8_MAGIC * q_head[i & 1];
                v[i] = raw * ks2[i >> 1];
            }
            finish_scores(v, a.scale_in, a.scale_out, a.softcap);
#pragma unroll
            for (int i = 0; i < 4; i++) v[i] = valid2[i >> 1] ? v[i] : -CUDART_INF_F;
            // a head's maximum over the tile's tokens: its column lives in the 8 lanes of one t4
            float top[2];
            bool grew = false;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                float mx = fmaxf(m[c], fmaxf(v[c], v[2 + c]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
                top[c] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
                grew |= top[c] > m[c];
            }
            if (__any_sync(0xffffffffu, grew)) {  // rescale what was summed under the old maximum
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float alpha = rescale(m[c], top[c]);
                    l[c] *= alpha;
                    p_sum[c] *= alpha;
                    m[c] = top[c];
#pragma unroll
                    for (int j = 0; j < NT; j++) {  // the output's columns are this lane's heads
                        acc[0][j][c] *= alpha;
                        acc[0][j][2 + c] *= alpha;
                    }
                }
            }
            float pv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float e = valid2[i >> 1] ? fast_exp2(v[i] - m[i & 1]) : 0.f;
                l[i & 1] += e;
                pv[i] = e * vs2[i >> 1];
            }
            // [token g | g + 8][heads 2 t4, 2 t4 + 1] as float16 pairs: the fragments of two 8 x 8 matrices
            // (tokens x heads), transposed by movmatrix into the B operand's (tokens 2 t4, 2 t4 + 1 (+ 8), head g)
            const uint32_t p0 = pack_half2(pv[0], pv[1]), p1 = pack_half2(pv[2], pv[3]);
            if (!FP8) {
                const float2 h0 = unpack_half2(p0), h1 = unpack_half2(p1);
                p_sum[0] += h0.x + h1.x;
                p_sum[1] += h0.y + h1.y;
            }
            pb[0][0] = transpose8x8(p0);
            pb[0][1] = transpose8x8(p1);
        } else {
            // the score columns' tokens 2 t4 + {0, 1} and 8 + 2 t4 + {0, 1}: key / value scales and validity
            float ks[4], vs[4];
            bool valid[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = 8 * (i >> 1) + 2 * t4 + (i & 1);
                valid[i] = tile + row >= lo && tile + row < hi;
                ks[i] = key_scales[row];
                vs[i] = key_scales[TILE + row];
            }
            float sc[2][4];  // scores of n-tiles 0 and 1: [0], [1] row g; [2], [3] row g + 8
#pragma unroll
            for (int n = 0; n < 2; n++) {
                sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
                for (int s = 0; s < KS; s++) {
                    uint32_t b0, b1;
                    word_half2<FP8>(kc[n].w[s], b0, b1);
                    mma16816(sc[n], qa[s], b0, b1);
                }
            }
            // online softmax per row: the scores (log2 domain), the new maximum, the probabilities
            bool grew = false;
            float top[HALVES];
#pragma unroll
            for (int r = 0; r < HALVES; r++) {
                float mx = m[r];
                float v[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {  // column i: n-tile i / 2, its column 2 t4 + i % 2
                    float raw = sc[i >> 1][2 * r + (i & 1)];
                    if (!FP8) raw -= INT8_MAGIC * q_sum[r];
                    v[i] = raw * ks[i];
                }
                finish_scores(v, a.scale_in, a.scale_out, a.softcap);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    v[i] = valid[i] ? v[i] : -CUDART_INF_F;
                    sc[i >> 1][2 * r + (i & 1)] = v[i];
                    mx = fmaxf(mx, v[i]);
                }
                top[r] = quad_max(mx);
                grew |= top[r] > m[r];
            }
            if (__any_sync(0xffffffffu, grew)) {  // rescale what was summed under the old maximum
                float alpha[HALVES];
#pragma unroll
                for (int r = 0; r < HALVES; r++) {
                    alpha[r] = rescale(m[r], top[r]);
                    l[r] *= alpha[r];
                    p_sum[r] *= alpha[r];
                    m[r] = top[r];
                }
                // the output's heads are 8 r + 2 t4 + {0, 1}: their factors live in the quads of rows 2 t4, 2 t4 + 1
#pragma unroll
                for (int r = 0; r < HALVES; r++) {
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const float f = __shfl_sync(0xffffffffu, alpha[r], 4 * (2 * t4 + c));
#pragma unroll
                        for (int j = 0; j < NT; j++) {
                            acc[r][j][c] *= f;
                            acc[r][j][2 + c] *= f;
                        }
                    }
                }
            }
            // Probabilities times value scales, rounded to float16, as the B operand of the output product: head tile
            // r's register 0 holds head g + 8 r at tokens 2 t4 + {0, 1} (n-tile 0 of the scores), register 1 at tokens
            // 8 + 2 t4 + {0, 1} (n-tile 1).
#pragma unroll
            for (int r = 0; r < HALVES; r++) {
#pragma unroll
                for (int n = 0; n < 2; n++) {
                    float pv[2];
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int i = 2 * n + c;
                        const float e = valid[i] ? fast_exp2(sc[n][2 * r + c] - m[r]) : 0.f;
                        l[r] += e;
                        pv[c] = e * vs[i];
                    }
                    pb[r][n] = pack_half2(pv[0], pv[1]);
                    if (!FP8) {
                        const float2 h = unpack_half2(pb[r][n]);
                        p_sum[r] += h.x + h.y;
                    }
                }
            }
        }
        // O^T += V^T P^T: the values as the A operand, m-tile j taking dims VB g + j (rows g) and VB g + VB / 2 + j
        // (rows g + 8) of the four tokens, two tokens' bytes paired in a register by a byte permute.
#pragma unroll
        for (int j = 0; j < NT; j++) {
            uint32_t va[4];
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int byte = j + half * (VB / 2);
                const int word = byte >> 2;
                const uint32_t sel = (byte & 3) | ((4 + (byte & 3)) << 8);  // [token a's byte, -, token b's, -]
                va[half] = codes_half2<FP8>(__byte_perm(vc[0].w[word], vc[1].w[word], sel));
                va[2 + half] = codes_half2<FP8>(__byte_perm(vc[2].w[word], vc[3].w[word], sel));
            }
#pragma unroll
            for (int r = 0; r < HALVES; r++) mma16816(acc[r][j], va, pb[r][0], pb[r][1]);
        }
    }

    // The warps combine through shared memory (the stages' space, once every warp is done with it): per head its
    // maximum, sums and the output's dims.
    copy_wait<0>();
    __syncthreads();
    float (*sm_acc)[MAX_ROWS][D] = reinterpret_cast<float (*)[MAX_ROWS][D]>(smem);
    if constexpr (!ROWS16) {  // heads 2 t4 + c: sums over the 8 lanes of one t4 (the maximum is theirs already)
#pragma unroll
        for (int c = 0; c < 2; c++) {
#pragma unroll
            for (int off = 4; off < 32; off <<= 1) {
                l[c] += __shfl_xor_sync(0xffffffffu, l[c], off);
                p_sum[c] += __shfl_xor_sync(0xffffffffu, p_sum[c], off);
            }
            const int head = 2 * t4 + c;
            if (g == 0 && head < rows) {
                sm_m[warp][head] = m[c];
                sm_l[warp][head] = l[c];
                sm_p[warp][head] = p_sum[c];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < HALVES; r++) {
        const int row = g + 8 * r;
        if constexpr (ROWS16) {  // row g + 8 r: sums over its quad
            l[r] = quad_sum(l[r]);
            p_sum[r] = quad_sum(p_sum[r]);
            if (t4 == 0 && row < rows) {
                sm_m[warp][row] = m[r];
                sm_l[warp][row] = l[r];
                sm_p[warp][row] = p_sum[r];
            }
        }
#pragma unroll
        for (int c = 0; c < 2; c++) {
            const int head = 8 * r + 2 * t4 + c;
            if (head < rows) {
#pragma unroll
                for (int j = 0; j < NT; j++) {
                    sm_acc[warp][head][VB * g + j] = acc[r][j][c];
                    sm_acc[warp][head][VB * g + VB / 2 + j] = acc[r][j][2 + c];
                }
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * D; e += DECODE_THREADS) {
        const int h = e / D, d = e % D;
        float best = -CUDART_INF_F;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) best = fmaxf(best, sm_m[w][h]);
        float total = 0.f, value = 0.f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) {
            const float weight = rescale(sm_m[w][h], best);
            total += sm_l[w][h] * weight;
            value += (FP8 ? sm_acc[w][h][d] : sm_acc[w][h][d] - INT8_MAGIC * sm_p[w][h]) * weight;
        }
        const float o = total > 0.f ? value / total : 0.f;  // an empty split (or a padding row) gives zeros
        const int head = head0 + h;
        if (a.num_splits > 1) {
            const int64_t partial = (seq * a.num_heads + head) * a.num_splits + split;
            a.partial_out[partial * D + d] = o;
            if (d == 0) a.partial_lse[partial] = total > 0.f ? best + log2f(total) : -CUDART_INF_F;
        } else {
            reinterpret_cast<T*>(a.out)[token * a.stride_ot + head * a.stride_oh + d] = from_float<T>(o);
        }
    }
}

// Dynamic shared memory of a block: its warps' stages, or the combine's per-warp outputs if larger.
__host__ __device__ constexpr size_t decode_smem_bytes(int d) {
    const size_t stages = (size_t)DECODE_WARPS * DECODE_STAGES * (2 * TILE * d + 2 * TILE * 4);
    const size_t combine = (size_t)DECODE_WARPS * MAX_ROWS * d * 4;
    return stages > combine ? stages : combine;
}

template <int D, bool ROWS16, bool FP8, typename T>
static int launch(const DecodeArgs& a, int grid, int pdl, cudaStream_t stream) {
    return launch_kernel(decode_kernel<D, ROWS16, FP8, T>, grid, DECODE_THREADS, decode_smem_bytes(D), pdl, stream,
                         a);
}

template <int D, bool ROWS16, bool FP8>
static int dispatch_dtype(int dtype, const DecodeArgs& a, int grid, int pdl, cudaStream_t s) {
    return dtype == 0 ? launch<D, ROWS16, FP8, __nv_bfloat16>(a, grid, pdl, s)
                      : launch<D, ROWS16, FP8, __half>(a, grid, pdl, s);
}

template <int D, bool ROWS16>
static int dispatch_codes(int fp8, int dtype, const DecodeArgs& a, int grid, int pdl, cudaStream_t s) {
    return fp8 ? dispatch_dtype<D, ROWS16, true>(dtype, a, grid, pdl, s)
               : dispatch_dtype<D, ROWS16, false>(dtype, a, grid, pdl, s);
}

template <int D>
static int dispatch_rows(int rows, int fp8, int dtype, const DecodeArgs& a, int grid, int pdl, cudaStream_t s) {
    return rows > 8 ? dispatch_codes<D, true>(fp8, dtype, a, grid, pdl, s)
                    : dispatch_codes<D, false>(fp8, dtype, a, grid, pdl, s);
}

extern "C" {

// dtype: 0 bfloat16, 1 float16 (queries and output); fp8: 0 int8 codes, 1 e4m3 codes. Returns a CUDA error code
// (0: launched; -1: a head dim or query-head group this library does not take).
int tq_decode8(int dtype, int fp8, int head_dim, int batch, const void* q, const void* k_cache, const void* v_cache,
               const void* k_scale, const void* v_scale, const void* block_tables, const void* context_lens,
               const void* token_indices, void* out, void* partial_out, void* partial_lse,
               const int64_t* strides,  // qt, qh, ot, oh, bt, cb, ch, cs, sb, sh
               float scale_in, float scale_out, int softcap, int window, int block_shift, int num_heads, int group,
               int num_splits, int pdl, void* stream) {
    if (group < 1 || (group > MAX_ROWS && group % MAX_ROWS != 0) || num_heads % group != 0) return -1;
    DecodeArgs a;
    a.q = q;
    a.k_cache = static_cast<const uint8_t*>(k_cache);
    a.v_cache = static_cast<const uint8_t*>(v_cache);
    a.k_scale = static_cast<const float*>(k_scale);
    a.v_scale = static_cast<const float*>(v_scale);
    a.block_tables = static_cast<const int64_t*>(block_tables);
    a.context_lens = static_cast<const int64_t*>(context_lens);
    a.token_indices = static_cast<const int64_t*>(token_indices);
    a.out = out;
    a.partial_out = static_cast<float*>(partial_out);
    a.partial_lse = static_cast<float*>(partial_lse);
    a.stride_qt = strides[0];
    a.stride_qh = strides[1];
    a.stride_ot = strides[2];
    a.stride_oh = strides[3];
    a.stride_bt = strides[4];
    a.stride_cb = strides[5];
    a.stride_ch = strides[6];
    a.stride_cs = strides[7];
    a.stride_sb = strides[8];
    a.stride_sh = strides[9];
    a.scale_in = scale_in;
    a.scale_out = scale_out;
    a.softcap = softcap;
    a.window = window;
    a.block_shift = block_shift;
    a.num_heads = num_heads;
    a.group = group;
    a.num_splits = num_splits;
    const int rows = group < MAX_ROWS ? group : MAX_ROWS;
    const int grid = batch * (num_heads / rows) * num_splits;
    if (grid == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (head_dim == 64) return dispatch_rows<64>(rows, fp8, dtype, a, grid, pdl, s);
    if (head_dim == 128) return dispatch_rows<128>(rows, fp8, dtype, a, grid, pdl, s);
    return -1;
}

}  // extern "C"
