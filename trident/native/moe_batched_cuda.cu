// The routed experts of an MoE layer for T > 1 tokens with int4 experts (trident/moe/quant.py: uint8 gate_up
// [E, 2I, H/2] and down [E, H, I/2], two codes a byte along K stored q + 8, float32 scales [E, 2I, groups] and
// [E, H, groups] in groups of a multiple of 128 along K, or one per row), grouped by expert so that each expert's
// weight rows are read once per step and multiplied against all of that expert's (token, slot) pairs on the tensor
// cores (8-bit integer mma: unsigned int4 codes x signed int8 activations, int32 sums). The batched sibling of
// moe_gemv_cuda.cu (one token, dp4a), in three launches after the routing alignment:
//
//   xq          = quantize(x)                                      [T, H]     (moeb_quantize_kernel)
//   act[r, i]   = act(gate_e . xq[t]) * (up_e . xq[t]),  aq = quantize(act)   (moeb_gate_up_kernel)
//   out_pairs[p, h] = weights[p] * (down_e[h] . aq[r])                        (moeb_down_kernel)
//
// for every pair p = t k + slot at its sorted row r of trident/kernels/moe_align.py's layout (trident/moe/align.py:
// pairs sorted by expert, each expert's run padded to whole blocks of BLOCK_M rows; sorted_pairs, block_experts,
// num_blocks). The caller (trident/native/moe_batched_cuda.py) then sums out_pairs over k (moe_experts.py's
// sum_over_k: slot order, float32).
//
//  * Activations: one int8 stage per block of KBLOCK = 128 elements, s = max|x| / 127, q = rint(x / s) (the rule of
//    gemv_cuda.cu's int4 activations with 128-element blocks: one mma chain of 128 products shares one weight scale
//    and one activation scale). A quantized row of k elements in global memory: codes [k] bytes, each 8 elements'
//    even ones then their odd ones (the order int4 codes unpack to), then the blocks' scales (float) and code sums
//    (int) [k / 128] each (qrow_bytes(k) in all). The zero point 8 comes off a block's integer sum as -8 x the
//    block's code sum (the mma's accumulator starts there).
//  * The tensor-core tile (mma.m16n8k32, u8 x s8 -> s32) puts weights on M and sorted rows on N ("swapped": 16 weight
//    rows x 8 pairs), so a row block of BLOCK_M = 8 rows is one mma column tile. A warp step is 128 elements of K:
//    the lane of quad position tig (lane % 4) and group g (lane / 4) loads the 16 bytes of 32-element block
//    4 step + tig of weight rows g and g + 8 (one 16-byte load a row: a quad reads 64 contiguous bytes), and the
//    step's four mmas j = 0..3 take word j of each lane's 16 bytes: the low nibbles as A's k = 4 tig + 0..3, the
//    high ones as k = 16 + 4 tig + 0..3 (the activation words 2j, 2j + 1 of the same block are B's fragment, read
//    from shared memory). The four mmas chain in int32 (one scale pair for the 128 products), then the sum is scaled
//    by (weight group scale x activation block scale) into float32 accumulators.
//  * A warp streams ITEMs: two 16-row tiles (gate|up: gate rows i..i+15 and up rows I+i..; down: 32 adjacent output
//    rows) over all of K, DEPTH steps of loads in flight (registers, a ring), across items without a break. Steps
//    are loaded two at a time, row by row, so that a quad reads 128 contiguous bytes of a row in adjacent requests:
//    one 64-byte request a row and step left each DRAM page half read (H200, one Qwen3-30B-A3B layer at 64 tokens:
//    gate|up 90 -> 66 us, 2.3 -> 3.1 TB/s). The first steps are requested before the PDL wait (the weights and the
//    layout do not depend on the kernel just before).
//  * moeb_gate_up_kernel: a block takes row block b and GU_ROWS intermediate rows (a multiple of 128: whole
//    activation blocks of I); act(gate) * up, float32, is rounded once to the activation dtype into a shared tile
//    [BLOCK_M, GU_ROWS] that the block then quantizes into the intermediate's rows at the block's sorted rows.
//  * moeb_down_kernel: a block takes row block b and DOWN_ROWS output rows; each pair's values times its routing
//    weight (float32) are rounded once at out_pairs row p.
//
// Padding rows of a block (sorted_pairs -1) are staged as zeros and never written. Nothing is read back on the host;
// every launch takes the caller's stream (CUDA-graph capturable). Requirements (checked by the caller): int4 codes,
// H and I multiples of 128, groups of a power-of-two multiple of 128 elements (or one per row), everything contiguous
// and 16-byte aligned, the layout from align_routing with block_m = tq_moeb_block_m(), and these launches in the
// order align_routing, quantize, gate|up, down (the product kernels read the layout before their PDL wait: it comes
// from the kernel before the one just before them). sm_80 or newer (integer mma).

#include "dp4a_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "moe_batched_cuda.cu multiplies on the tensor cores' integer mma: sm_80 or newer"
#endif

#ifndef MOEB_BLOCK_M
#define MOEB_BLOCK_M 8  // sorted rows per row block (align_routing's block_m): mma column tiles of 8
#endif
#define BM MOEB_BLOCK_M
#define NTILES (BM / 8)
#define KBLOCK 128  // elements per activation scale and per warp step
#ifndef GU_ROWS
#define GU_ROWS 128  // intermediate rows a gate|up block takes (a multiple of 128: whole activation blocks)
#endif
#ifndef DOWN_ROWS
#define DOWN_ROWS 512  // output rows a down block takes (a multiple of 32: whole items); 256: +6% at 64 tokens
#endif
#ifndef DEPTH
#define DEPTH 2  // warp steps whose loads are in flight (a ring of registers); 4: +5% at 8-128 tokens (H200)
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 2  // blocks a multiprocessor holds at once (__launch_bounds__)
#endif

static_assert(BM == 8 || BM == 16 || BM == 32, "BLOCK_M: 8, 16 or 32 (whole mma column tiles)");
static_assert(GU_ROWS % KBLOCK == 0 && GU_ROWS <= 512, "gate|up rows: whole activation blocks of the intermediate");
static_assert(DOWN_ROWS % 32 == 0, "down rows: whole items of 32");
static_assert(DEPTH >= 2 && DEPTH <= 8 && DEPTH % 2 == 0, "DEPTH: 2, 4, 6 or 8 steps in flight (loaded in pairs)");

// Bytes of one quantized activation row of k elements in global memory: codes [k], then the block scales and code
// sums [k / 128] each (4 bytes), rounded up to 16.
__host__ __device__ __forceinline__ size_t qrow_bytes(int k) {
    return ((size_t)k + 8 * (size_t)(k / KBLOCK) + 15) & ~(size_t)15;
}

// Shared memory of a block's staged rows of k elements: BLOCK_M rows of codes, k + 16 bytes apart (the quads of a
// warp reading one block of 32 of rows g and g + 1 hit different banks), then the scales and code sums
// [BLOCK_M, k / 128].
__host__ __device__ __forceinline__ int staged_stride(int k) { return k + 16; }
__host__ __device__ __forceinline__ size_t staged_bytes(int k) {
    return (size_t)BM * staged_stride(k) + 8 * (size_t)BM * (k / KBLOCK);
}

// Quantize 8 values (chunk c of a row of k elements: 16 consecutive threads, an aligned half warp, share a block of
// 128) into a global quantized row; every lane of the warp takes the shuffles, `active` ones write.
__device__ __forceinline__ void quantize8(const float (&v)[8], int c, bool active, uint8_t* row, int k) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) m = fmaxf(m, fabsf(v[i]));
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float inv = m > 0.f ? 127.f / m : 0.f;
    int a[8], sum = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        a[i] = quantize_code(v[i], inv);
        sum += a[i];
    }
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (active) {
        uint32_t* codes = reinterpret_cast<uint32_t*>(row);
        codes[2 * c] = pack4(a[0], a[2], a[4], a[6]);
        codes[2 * c + 1] = pack4(a[1], a[3], a[5], a[7]);
        if ((c & 15) == 0) {
            float* scales = reinterpret_cast<float*>(row + k);
            scales[c / 16] = m / 127.f;
            reinterpret_cast<int*>(scales + k / KBLOCK)[c / 16] = sum;
        }
    }
}

// xq [T] quantized rows of x [T, k]: one block a token.
template <typename T>
__global__ void __launch_bounds__(THREADS) moeb_quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ xq,
                                                                int k) {
    wait_for_previous_grid();  // x comes from the kernels before
    const int t = blockIdx.x, chunks = k / 8;
    uint8_t* row = xq + (size_t)t * qrow_bytes(k);
    for (int base = 0; base < chunks; base += THREADS) {  // uniform: whole warps take the shuffles
        const int c = base + threadIdx.x;
        const bool active = c < chunks;
        const uint4 raw = active ? *reinterpret_cast<const uint4*>(x + (size_t)t * k + 8 * (size_t)c)
                                 : make_uint4(0, 0, 0, 0);
        const T* e = reinterpret_cast<const T*>(&raw);
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = to_float(e[i]);
        quantize8(v, c, active, row, k);
    }
}

// The block's sorted rows: the pair of each (shared), and a bit mask of the real ones (-1: padding).
__device__ __forceinline__ unsigned load_block_pairs(const int* __restrict__ sorted_pairs, int b, int* pairs) {
    if (threadIdx.x < BM) pairs[threadIdx.x] = __ldcg(sorted_pairs + b * BM + threadIdx.x);
    __syncthreads();
    unsigned real = 0;
#pragma unroll
    for (int m = 0; m < BM; m++) real |= (pairs[m] >= 0 ? 1u : 0u) << m;
    return real;
}

struct Staged {
    const uint8_t* codes;  // [BM][stride]
    const float* scales;   // [BM][blocks]
    const int* qsums;      // [BM][blocks]
    int stride;
    int blocks;
};

// Copy the block's real rows (bit m of `real`) of k elements into shared memory, zeros for padding rows, a warp a
// row; row_of(m): the global quantized row of staged row m (written by the kernel before: read from L2, .cg).
template <typename RowOf>
__device__ __forceinline__ Staged stage_rows(uint8_t* smem, int k, unsigned real, RowOf row_of) {
    const int stride = staged_stride(k), blocks = k / KBLOCK, row_units = k / 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* scales = reinterpret_cast<float*>(smem + (size_t)BM * stride);
    int* qsums = reinterpret_cast<int*>(scales + BM * blocks);
    for (int m = warp; m < BM; m += WARPS) {
        const bool r = (real >> m) & 1;
        const uint8_t* row = r ? row_of(m) : nullptr;
        uint4* to = reinterpret_cast<uint4*>(smem + (size_t)m * stride);
#pragma unroll 4
        for (int j = lane; j < row_units; j += 32) {
            to[j] = r ? __ldcg(reinterpret_cast<const uint4*>(row) + j) : make_uint4(0, 0, 0, 0);
        }
        for (int blk = lane; blk < blocks; blk += 32) {
            const float* s = reinterpret_cast<const float*>(row + k);
            scales[m * blocks + blk] = r ? __ldcg(s + blk) : 0.f;
            qsums[m * blocks + blk] = r ? __ldcg(reinterpret_cast<const int*>(s + blocks) + blk) : 0;
        }
    }
    __syncthreads();
    return {smem, scales, qsums, stride, blocks};
}

// D += A B on the tensor cores: A 16 x 32 unsigned 8-bit (row), B 32 x 8 signed 8-bit (column), D 16 x 8 int32.
__device__ __forceinline__ void mma_u8s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One step's loads: 16 bytes of each of the item's four rows (tile 0 rows g, g + 8, tile 1 rows g, g + 8) and their
// group scales.
struct StepLoad {
    uint4 w[4];
    float s[4];
};

// A warp's item for this lane: its first weight row's start (codes, scales); the item's four rows lie RowOffsets
// from it (the same for every item of a kernel).
struct ItemRows {
    const uint8_t* codes;
    const float* scales;
};

struct RowOffsets {
    int codes[4];   // bytes
    int scales[4];  // floats
};

// Two steps' loads (a of step qa of rows ra, b of step qb of rows rb), row by row: where they are consecutive steps of
// one item, a quad reads 128 contiguous bytes of a row in two adjacent requests (one 64-byte request a row and step
// left each DRAM page half read: 2.3 TB/s).
__device__ __forceinline__ void load_steps(StepLoad& a, ItemRows ra, int qa, bool take_a, StepLoad& b, ItemRows rb,
                                           int qb, bool take_b, const RowOffsets& off, int tig, int group_shift) {
    const uint8_t* ca = ra.codes + 64 * qa + 16 * tig;
    const uint8_t* cb = rb.codes + 64 * qb + 16 * tig;
    const float* sa = ra.scales + (qa >> group_shift);
    const float* sb = rb.scales + (qb >> group_shift);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        if (take_a) a.w[r] = __ldcs(reinterpret_cast<const uint4*>(ca + off.codes[r]));
        if (take_b) b.w[r] = __ldcs(reinterpret_cast<const uint4*>(cb + off.codes[r]));
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        if (take_a) a.s[r] = __ldg(sa + off.scales[r]);
        if (take_b) b.s[r] = __ldg(sb + off.scales[r]);
    }
}

// Multiply step q into acc[tile][column tile][4] (the mma's D layout: rows g, g + 8 x columns 2 tig, 2 tig + 1).
__device__ __forceinline__ void multiply_step(const StepLoad& l, float (&acc)[2][NTILES][4], const Staged& a, int q,
                                              int g, int tig) {
    uint32_t lo[4][4], hi[4][4];  // [row r][word j]
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const uint32_t w[4] = {l.w[r].x, l.w[r].y, l.w[r].z, l.w[r].w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            lo[r][j] = w[j] & 0x0F0F0F0Fu;
            hi[r][j] = (w[j] >> 4) & 0x0F0F0F0Fu;
        }
    }
#pragma unroll
    for (int n = 0; n < NTILES; n++) {
        // B: block 4 q + tig of staged row 8 n + g (32 bytes: words 2j, 2j + 1 for mma j)
        const uint8_t* brow = a.codes + (size_t)(8 * n + g) * a.stride + 32 * (4 * q + tig);
        const uint4 b_lo = *reinterpret_cast<const uint4*>(brow);
        const uint4 b_hi = *reinterpret_cast<const uint4*>(brow + 16);
        const uint32_t e[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
        const int c0 = 8 * n + 2 * tig;  // D's columns: staged rows c0, c0 + 1
        const float x0 = a.scales[c0 * a.blocks + q], x1 = a.scales[(c0 + 1) * a.blocks + q];
        const int z0 = -INT4_ZERO_POINT * a.qsums[c0 * a.blocks + q];
        const int z1 = -INT4_ZERO_POINT * a.qsums[(c0 + 1) * a.blocks + q];
#pragma unroll
        for (int t = 0; t < 2; t++) {
            int d[4] = {z0, z1, z0, z1};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                mma_u8s8(d, lo[2 * t][j], lo[2 * t + 1][j], hi[2 * t][j], hi[2 * t + 1][j], e[2 * j], e[2 * j + 1]);
            }
            acc[t][n][0] = fmaf((float)d[0], l.s[2 * t] * x0, acc[t][n][0]);
            acc[t][n][1] = fmaf((float)d[1], l.s[2 * t] * x1, acc[t][n][1]);
            acc[t][n][2] = fmaf((float)d[2], l.s[2 * t + 1] * x0, acc[t][n][2]);
            acc[t][n][3] = fmaf((float)d[3], l.s[2 * t + 1] * x1, acc[t][n][3]);
        }
    }
}

// A position in a warp's walk over its items: item = first + i stride (i < count), step q of `steps`, and the item's
// rows; advanced one step at a time (no division).
template <typename RowsOf>
struct Cursor {
    int i, q;
    ItemRows rows;

    __device__ __forceinline__ void advance(const RowsOf& rows_of, int first, int stride, int steps) {
        if (++q == steps) {
            q = 0;
            rows = rows_of(first + ++i * stride);
        }
    }
};

// Stream a warp's items (item = first + i stride, i < count) over `steps` steps of K each, DEPTH (even) steps of
// loads in flight across items, refilled two at a time (load_steps); rows_of(item) gives an item's ItemRows,
// finish(item, acc) takes its sums. start() requests the first DEPTH steps (before the block's PDL wait).
template <typename RowsOf>
struct Stream {
    static_assert(DEPTH % 2 == 0, "steps are loaded in pairs");
    RowsOf rows_of;
    RowOffsets off;
    int first, stride, count, steps, g, tig, group_shift;
    Cursor<RowsOf> next;  // the next step to load

    __device__ __forceinline__ int total() const { return count * steps; }
    __device__ __forceinline__ void load_pair(StepLoad& a, StepLoad& b, int s) {
        const int n = total();
        const ItemRows rows_a = next.rows;
        const int q_a = next.q;
        if (s < n) next.advance(rows_of, first, stride, steps);
        load_steps(a, rows_a, q_a, s < n, b, next.rows, next.q, s + 1 < n, off, tig, group_shift);
        if (s + 1 < n) next.advance(rows_of, first, stride, steps);
    }
    __device__ __forceinline__ void start(StepLoad (&ring)[DEPTH]) {
        next = {0, 0, rows_of(first)};
#pragma unroll
        for (int d = 0; d < DEPTH; d += 2) load_pair(ring[d], ring[d + 1], d);
    }
    template <typename Finish>
    __device__ __forceinline__ void run(StepLoad (&ring)[DEPTH], const Staged& a, Finish finish) {
        float acc[2][NTILES][4] = {};
        const int n = total();
        int item = first, q = 0;
        for (int s0 = 0; s0 < n; s0 += DEPTH) {
#pragma unroll
            for (int d = 0; d < DEPTH; d++) {
                if (s0 + d < n) {
                    multiply_step(ring[d], acc, a, q, g, tig);
                    if (++q == steps) {
                        finish(item, acc);
                        q = 0;
                        item += stride;
#pragma unroll
                        for (int t = 0; t < 2; t++)
#pragma unroll
                            for (int c = 0; c < NTILES; c++)
#pragma unroll
                                for (int v = 0; v < 4; v++) acc[t][c][v] = 0.f;
                    }
                }
                if (d % 2 == 1 && s0 + d + DEPTH - 1 < n) load_pair(ring[d - 1], ring[d], s0 + d - 1 + DEPTH);
            }
        }
    }
};

// aq [rows] quantized rows of act [rows, I] = act(gate_e xq[t]) * up_e xq[t] at each pair's sorted row (and act
// itself where act_out is given); blocks: row block b (fastest) x chunk of GU_ROWS intermediate rows.
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) moeb_gate_up_kernel(
    const uint8_t* __restrict__ xq, const int* __restrict__ sorted_pairs, const int* __restrict__ block_experts,
    const int* __restrict__ num_blocks, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
    uint8_t* __restrict__ aq, T* __restrict__ act_out, int row_blocks, int top_k, int inter, int hidden,
    int activation, int num_groups, int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int pairs[BM];
    __shared__ __align__(16) T tile[BM][GU_ROWS];
    const int b = blockIdx.x % row_blocks, i0 = (blockIdx.x / row_blocks) * GU_ROWS;
    // The layout (align_routing's) was complete before the quantize kernel passed its wait, which it did before
    // letting this grid launch.
    if (b >= __ldcg(num_blocks)) return;
    const int e = __ldcg(block_experts + b);
    if (e < 0) return;
    const unsigned real = load_block_pairs(sorted_pairs, b, pairs);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
    const int items = min(GU_ROWS, inter - i0) / 16;  // 16 gate rows and their 16 up rows an item
    const size_t row_bytes = hidden / 2;
    const uint8_t* expert_codes = codes + (size_t)e * 2 * inter * row_bytes;
    const float* expert_scales = scales + (size_t)e * 2 * inter * num_groups;
    auto rows_of = [=](int item) {  // gate rows i, i + 8; up rows I + i, I + i + 8
        const int i = i0 + 16 * item + g;
        return ItemRows{expert_codes + i * row_bytes, expert_scales + (size_t)i * num_groups};
    };
    const RowOffsets off{{0, 8 * (int)row_bytes, inter * (int)row_bytes, (inter + 8) * (int)row_bytes},
                         {0, 8 * num_groups, inter * num_groups, (inter + 8) * num_groups}};
    const int mine = warp < items ? (items - warp + WARPS - 1) / WARPS : 0;
    Stream<decltype(rows_of)> stream{rows_of, off, warp, WARPS, mine, hidden / KBLOCK, g, tig, group_shift, {}};
    StepLoad ring[DEPTH];
    if (mine > 0) stream.start(ring);
    wait_for_previous_grid();  // xq comes from the quantize kernel
    const Staged a = stage_rows(smem, hidden, real,
                                [&](int m) { return xq + (size_t)(pairs[m] / top_k) * qrow_bytes(hidden); });
    stream.run(ring, a, [&](int item, const float (&acc)[2][NTILES][4]) {
#pragma unroll
        for (int n = 0; n < NTILES; n++) {
#pragma unroll
            for (int v = 0; v < 4; v++) {
                const int m = 8 * n + 2 * tig + (v & 1), row = 16 * item + g + 8 * (v >> 1);
                const T out = from_float<T>(activate(acc[0][n][v], activation) * acc[1][n][v]);
                tile[m][row] = out;
                if (act_out != nullptr && ((real >> m) & 1)) {
                    act_out[(size_t)(b * BM + m) * inter + i0 + row] = out;
                }
            }
        }
    });
    __syncthreads();

    // Quantize the tile's rows into aq (chunks of 8; 16 threads, an aligned half warp, a block of 128; whole warps
    // take part in the shuffles).
    constexpr int CHUNKS = GU_ROWS / 8, TILE = BM * CHUNKS, ROUNDED = (TILE + 31) / 32 * 32;
    const int rows_here = min(GU_ROWS, inter - i0);
    const size_t aq_row = qrow_bytes(inter);
    for (int c = threadIdx.x; c < ROUNDED; c += THREADS) {
        const int m = min(c / CHUNKS, BM - 1), cc = c % CHUNKS;
        const bool active = c < TILE && ((real >> m) & 1) && 8 * cc < rows_here;
        float v[8];
        const uint4 raw = active ? *reinterpret_cast<const uint4*>(&tile[m][8 * cc]) : make_uint4(0, 0, 0, 0);
        const T* te = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = to_float(te[i]);
        quantize8(v, i0 / 8 + cc, active, aq + (size_t)(b * BM + m) * aq_row, inter);
    }
}

// out_pairs [T k, H]: each pair's down_e(aq[r]) times its routing weight at row p; blocks: row block b (fastest) x
// chunk of DOWN_ROWS output rows.
template <typename T>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) moeb_down_kernel(
    const uint8_t* __restrict__ aq, const int* __restrict__ sorted_pairs, const int* __restrict__ block_experts,
    const int* __restrict__ num_blocks, const float* __restrict__ routing_weights, const uint8_t* __restrict__ codes,
    const float* __restrict__ scales, T* __restrict__ out_pairs, int row_blocks, int inter, int hidden,
    int num_groups, int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int pairs[BM];
    __shared__ float weights[BM];
    const int b = blockIdx.x % row_blocks, h0 = (blockIdx.x / row_blocks) * DOWN_ROWS;
    // The layout and the routing weights were complete before the gate|up kernel passed its wait.
    if (b >= __ldcg(num_blocks)) return;
    const int e = __ldcg(block_experts + b);
    if (e < 0) return;
    if (threadIdx.x < BM) {
        const int p = __ldcg(sorted_pairs + b * BM + threadIdx.x);
        weights[threadIdx.x] = p >= 0 ? __ldcg(routing_weights + p) : 0.f;
    }
    const unsigned real = load_block_pairs(sorted_pairs, b, pairs);  // (its __syncthreads covers weights too)

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3;
    const int items = min(DOWN_ROWS, hidden - h0) / 32;  // 32 adjacent output rows an item
    const size_t row_bytes = inter / 2;
    auto rows_of = [=](int item) {  // rows h, h + 8, h + 16, h + 24
        const size_t row = (size_t)e * hidden + h0 + 32 * item + g;
        return ItemRows{codes + row * row_bytes, scales + row * num_groups};
    };
    const int rb = (int)row_bytes;
    const RowOffsets off{{0, 8 * rb, 16 * rb, 24 * rb}, {0, 8 * num_groups, 16 * num_groups, 24 * num_groups}};
    const int mine = warp < items ? (items - warp + WARPS - 1) / WARPS : 0;
    Stream<decltype(rows_of)> stream{rows_of, off, warp, WARPS, mine, inter / KBLOCK, g, tig, group_shift, {}};
    StepLoad ring[DEPTH];
    if (mine > 0) stream.start(ring);
    wait_for_previous_grid();  // aq comes from the gate|up kernel
    const size_t aq_row = qrow_bytes(inter);
    const Staged a = stage_rows(smem, inter, real, [&](int m) { return aq + (size_t)(b * BM + m) * aq_row; });
    stream.run(ring, a, [&](int item, const float (&acc)[2][NTILES][4]) {
#pragma unroll
        for (int t = 0; t < 2; t++) {
#pragma unroll
            for (int n = 0; n < NTILES; n++) {
#pragma unroll
                for (int v = 0; v < 4; v++) {
                    const int m = 8 * n + 2 * tig + (v & 1), h = h0 + 32 * item + 16 * t + g + 8 * (v >> 1);
                    if ((real >> m) & 1) {
                        out_pairs[(size_t)pairs[m] * hidden + h] = from_float<T>(acc[t][n][v] * weights[m]);
                    }
                }
            }
        }
    });
}

template <typename T>
static int quantize(const void* x, void* xq, int tokens, int k, int pdl, cudaStream_t stream) {
    return launch_kernel(moeb_quantize_kernel<T>, tokens, THREADS, 0, pdl, stream, reinterpret_cast<const T*>(x),
                         reinterpret_cast<uint8_t*>(xq), k);
}

template <typename T>
static int gate_up(const void* xq, const int* sorted_pairs, const int* block_experts, const int* num_blocks,
                   const void* codes, const float* scales, void* aq, void* act, int row_blocks, int top_k, int inter,
                   int hidden, int activation, int num_groups, int pdl, cudaStream_t stream) {
    const int shift = group_shift_of(hidden, num_groups, KBLOCK);
    if (shift < 0) return (int)cudaErrorInvalidValue;
    const int grid = row_blocks * ((inter + GU_ROWS - 1) / GU_ROWS);
    return launch_kernel(moeb_gate_up_kernel<T>, grid, THREADS, staged_bytes(hidden), pdl, stream,
                         reinterpret_cast<const uint8_t*>(xq), sorted_pairs, block_experts, num_blocks,
                         reinterpret_cast<const uint8_t*>(codes), scales, reinterpret_cast<uint8_t*>(aq),
                         reinterpret_cast<T*>(act), row_blocks, top_k, inter, hidden, activation, num_groups, shift);
}

template <typename T>
static int down(const void* aq, const int* sorted_pairs, const int* block_experts, const int* num_blocks,
                const float* weights, const void* codes, const float* scales, void* out_pairs, int row_blocks,
                int inter, int hidden, int num_groups, int pdl, cudaStream_t stream) {
    const int shift = group_shift_of(inter, num_groups, KBLOCK);
    if (shift < 0) return (int)cudaErrorInvalidValue;
    const int grid = row_blocks * ((hidden + DOWN_ROWS - 1) / DOWN_ROWS);
    return launch_kernel(moeb_down_kernel<T>, grid, THREADS, staged_bytes(inter), pdl, stream,
                         reinterpret_cast<const uint8_t*>(aq), sorted_pairs, block_experts, num_blocks, weights,
                         reinterpret_cast<const uint8_t*>(codes), scales, reinterpret_cast<T*>(out_pairs), row_blocks,
                         inter, hidden, num_groups, shift);
}

static bool shapes_fit(int inter, int hidden) {
    return inter > 0 && hidden > 0 && inter % KBLOCK == 0 && hidden % KBLOCK == 0;
}

extern "C" {

int tq_moeb_block_m(void) { return BM; }
int tq_moeb_threads(void) { return THREADS; }
int tq_moeb_kblock(void) { return KBLOCK; }
// Bytes of one quantized activation row of k elements (the buffers the Python side allocates).
long long tq_moeb_row_bytes(int k) { return (long long)qrow_bytes(k); }
// Shared memory a block of either product kernel takes, at most, for H = hidden and I = inter: its staged activation
// rows and its static arrays (gate|up: the pairs and the act tile of 16-bit values; down: the pairs and weights).
long long tq_moeb_block_shared_bytes(int hidden, int inter) {
    const size_t gate_up = staged_bytes(hidden) + sizeof(int) * BM + sizeof(__nv_bfloat16) * BM * GU_ROWS;
    const size_t down = staged_bytes(inter) + (sizeof(int) + sizeof(float)) * BM;
    return (long long)(gate_up > down ? gate_up : down);
}

// xq [tokens] quantized rows (tq_moeb_row_bytes(k) apart) of x [tokens, k] (dtype 0 bfloat16, 1 float16). Returns
// the launch's CUDA error code.
int tq_moeb_quantize(int dtype, const void* x, void* xq, int tokens, int k, int pdl, void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (tokens < 1 || k <= 0 || k % KBLOCK) return (int)cudaErrorInvalidValue;
    return dtype == 0 ? quantize<__nv_bfloat16>(x, xq, tokens, k, pdl, s) : quantize<__half>(x, xq, tokens, k, pdl, s);
}

// aq [row_blocks BLOCK_M] quantized intermediate rows (tq_moeb_row_bytes(inter) apart) of act(gate_e x) * up_e x
// for each pair at its sorted row (and, act non-null, act [rows, inter] itself in the activation dtype; padding rows
// of either are left unwritten). xq: tq_moeb_quantize's rows of hidden; codes uint8 [E, 2 inter, hidden / 2],
// scales float32 [E, 2 inter, num_groups]; activation 0 silu, 1 gelu (tanh approximation), 2 gelu (erf).
int tq_moeb_gate_up(int dtype, const void* xq, const int* sorted_pairs, const int* block_experts,
                    const int* num_blocks, const void* codes, const float* scales, void* aq, void* act,
                    int row_blocks, int top_k, int inter, int hidden, int activation, int num_groups, int pdl,
                    void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (row_blocks < 1 || top_k < 1 || !shapes_fit(inter, hidden)) return (int)cudaErrorInvalidValue;
#define GATE_UP_ARGS xq, sorted_pairs, block_experts, num_blocks, codes, scales, aq, act, row_blocks, top_k, inter, \
        hidden, activation, num_groups, pdl, s
    return dtype == 0 ? gate_up<__nv_bfloat16>(GATE_UP_ARGS) : gate_up<__half>(GATE_UP_ARGS);
#undef GATE_UP_ARGS
}

// out_pairs [T k, hidden] (activation dtype): row p = weights[p] down_e(aq[r]) for each pair p at sorted row r;
// weights float32 [T k]; codes uint8 [E, hidden, inter / 2], scales float32 [E, hidden, num_groups].
int tq_moeb_down(int dtype, const void* aq, const int* sorted_pairs, const int* block_experts, const int* num_blocks,
                 const float* weights, const void* codes, const float* scales, void* out_pairs, int row_blocks,
                 int inter, int hidden, int num_groups, int pdl, void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (row_blocks < 1 || !shapes_fit(inter, hidden)) return (int)cudaErrorInvalidValue;
#define DOWN_ARGS aq, sorted_pairs, block_experts, num_blocks, weights, codes, scales, out_pairs, row_blocks, inter, \
        hidden, num_groups, pdl, s
    return dtype == 0 ? down<__nv_bfloat16>(DOWN_ARGS) : down<__half>(DOWN_ARGS);
#undef DOWN_ARGS
}

}  // extern "C"
