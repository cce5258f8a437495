// The routed experts of an MoE layer for T > 1 tokens with int4 experts (trident/moe/quant.py: uint8 gate_up
// [E, 2I, H/2] and down [E, H, I/2], two codes a byte along K stored q + 8, float32 scales [E, 2I, H/G] and
// [E, H, I/G]), grouped by expert so that each expert's weight rows are read once per step and multiplied against
// all of that expert's (token, slot) pairs, with the GPU's 8-bit integer dot products (dp4a). The batched sibling of
// moe_gemv_cuda.cu (one token), in three launches after the routing alignment:
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
//  * Activations are quantized as gemv_cuda.cu quantizes them for int4 codes: one int8 stage per block of 32,
//    s = max|x| / 127 (dp4a_common.cuh's quantize_chunk, the same function), stored in the order the codes unpack
//    to, with each block's sum of codes (zero point 8 comes off a block's dp4a sum as -8 x that sum, never
//    subtracted from the codes). A quantized row of k elements lives in global memory as codes [k] bytes, then
//    s1, the plain sums and the code sums [k / 32] each (qrow_bytes(k) apart: quantize_chunk writes it through an
//    XStages that points there). moeb_quantize_kernel writes the T hidden rows once; moeb_gate_up_kernel writes the
//    intermediate rows itself (below), so the down kernel needs no quantizing launch of its own.
//  * A block of either product kernel takes one row block b of the layout (its BLOCK_M sorted rows, one expert
//    e = block_experts[b]; -1, or b >= num_blocks: it returns at once) and a chunk of the output rows. It copies its
//    real rows' quantized activations (sorted_pairs >= 0; padding rows are skipped everywhere) into shared memory,
//    each 16-byte half of a 32-element block placed so that the lanes of a warp reading consecutive blocks read
//    consecutive 16 bytes (unit_of: no bank conflicts). Then warps stream the expert's weight rows: a lane reads 16
//    bytes of codes (32 int4: one activation block, inside one scale group), unpacks them once to int8 (w &
//    0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F) and multiplies them by dp4a against each real row of the block, adding
//    sum x (group scale x activation block scale) to a float32 sum per (weight row, pair). The codes of a warp's
//    next step are loaded while this one is multiplied (dp4a_common.cuh's walk_steps), and the first step is
//    requested before the PDL wait (the weights and the layout do not depend on the kernel just before).
//  * moeb_gate_up_kernel: GU_ROWS intermediate rows a block; a warp takes gate row i and up row I + i (a step:
//    GU_UNROLL chunks of each row per lane, 32 lanes a row). A row's 2 BLOCK_M sums are reduced over the warp by a
//    reduce-scatter (each lane ends with one of them), and act(gate) * up, float32, is rounded once to the
//    activation dtype into a shared tile [BLOCK_M, GU_ROWS]; the block then quantizes the tile (whole blocks of 32
//    along I: GU_ROWS is a multiple of 32) into the intermediate's quantized rows at the block's sorted rows.
//  * moeb_down_kernel: DOWN_BLOCK_ROWS output rows a block; groups of DOWN_LANES lanes take DOWN_R rows each (H
//    rows are short: Qwen3-30B-A3B's I = 768 is 24 chunks, 3 a lane), DOWN_UNROLL chunks a lane and row per step.
//    The sums are reduce-scattered over each lane group and each lane writes its pairs' values times their routing
//    weights (float32), rounded once, at out_pairs row p.
//
// Unmeasured: no timing of these kernels exists yet (trident/kernels/bench_moe_experts.py times them beside the
// Triton kernels); BLOCK_M, GU_ROWS, DOWN_* are first choices, not a sweep's. Nothing is read back on the host, every
// launch takes the caller's stream (CUDA-graph capturable). Requirements (checked by the caller): int4 codes, H and I
// multiples of 32, groups of a power-of-two number of 32-element blocks (or per channel), everything contiguous and
// 16-byte aligned, the layout from align_routing with block_m = tq_moeb_block_m(), and these launches in the order
// align_routing, quantize, gate|up, down (the product kernels read the layout before their PDL wait: it comes from
// the kernel before the one just before them).

#include "dp4a_common.cuh"

#ifndef MOEB_BLOCK_M
#define MOEB_BLOCK_M 8  // sorted rows per row block (align_routing's block_m); unmeasured
#endif
#define BM MOEB_BLOCK_M
#ifndef GU_ROWS
#define GU_ROWS 64  // intermediate rows a gate|up block takes (a multiple of 32); unmeasured
#endif
#ifndef GU_UNROLL
#define GU_UNROLL 2  // 16-byte chunks per lane and row in a gate|up step (H = 2048: a row pair in one step)
#endif
#ifndef DOWN_BLOCK_ROWS
#define DOWN_BLOCK_ROWS 128  // output rows a down block takes; unmeasured
#endif
#define DOWN_LANES 8  // lanes that share a down row
#define DOWN_R 2      // down rows a lane group multiplies at a time (adjacent rows)
#ifndef DOWN_UNROLL
#define DOWN_UNROLL 3  // 16-byte chunks per lane and row in a down step (I = 768: 24 chunks, one step)
#endif
#define DOWN_ITEM_ROWS ((32 / DOWN_LANES) * DOWN_R)  // output rows a warp takes at a time

static_assert(stages_of<4>() == 1, "the batched kernels multiply int4 codes with one activation stage");
static_assert(BM >= 1 && BM <= 16 && (BM & (BM - 1)) == 0, "BLOCK_M: a power of two up to 16 (2 BLOCK_M sums a warp)");
static_assert(GU_ROWS % 32 == 0 && GU_ROWS <= 1024, "a gate|up block's rows: whole blocks of 32 of the intermediate");
static_assert(DOWN_BLOCK_ROWS % DOWN_ITEM_ROWS == 0 && 32 % DOWN_ITEM_ROWS == 0,
              "a down block's rows: whole warp items, which never straddle H (a multiple of 32)");
static_assert((DOWN_LANES & (DOWN_LANES - 1)) == 0 && DOWN_LANES <= 32, "lane groups: a power of two");

// Bytes of one quantized activation row of k elements in global memory: codes [k], then s1, the plain block sums
// and the code sums [k / 32] each (4 bytes), rounded up to 16.
__host__ __device__ __forceinline__ size_t qrow_bytes(int k) {
    return ((size_t)k + 12 * (size_t)(k / ABLOCK) + 15) & ~(size_t)15;
}

// The XStages through which quantize_chunk writes a quantized row at `row` (one stage: no q2, s2 or qsum2).
__device__ __forceinline__ XStages qrow_stages(uint8_t* row, int k) {
    const int blocks = k / ABLOCK;
    float* s1 = reinterpret_cast<float*>(row + k);
    return {reinterpret_cast<uint32_t*>(row), nullptr, s1, nullptr, s1 + blocks,
            reinterpret_cast<int*>(s1 + 2 * blocks), nullptr};
}

// Shared memory of a block's staged rows of k elements: BLOCK_M rows of codes, 2 x 16 bytes per block of 32 with the
// blocks padded to a multiple of 32 (unit_of's layout), then the blocks' scales and code sums [BLOCK_M, k / 32].
__host__ __device__ __forceinline__ int padded_blocks(int k) { return (k / ABLOCK + 31) & ~31; }
__host__ __device__ __forceinline__ size_t staged_bytes(int k) {
    return (size_t)BM * (32 * (size_t)padded_blocks(k) + 8 * (size_t)(k / ABLOCK));
}

// The 16-byte unit of a staged row that holds half `half` (its words 0-3 or 4-7) of block `blk`: the first halves
// of 32 consecutive blocks, then their second halves, so that a warp's lanes reading consecutive blocks read
// consecutive units.
__device__ __forceinline__ int unit_of(int blk, int half) { return ((blk >> 5) << 6) + (half << 5) + (blk & 31); }

struct Staged {
    const uint4* codes;  // [BM][units]
    const float* scales;  // [BM][blocks]
    const int* qsums;     // [BM][blocks]
    int units;
    int blocks;
};

__device__ __forceinline__ Staged staged_rows(const uint8_t* smem, int k) {
    const int units = 2 * padded_blocks(k), blocks = k / ABLOCK;
    const uint4* codes = reinterpret_cast<const uint4*>(smem);
    const float* scales = reinterpret_cast<const float*>(codes + BM * units);
    return {codes, scales, reinterpret_cast<const int*>(scales + BM * blocks), units, blocks};
}

// Copy the block's real rows (bit m of `real`) of k elements into shared memory (staged_rows' layout); row_of(m):
// the global quantized row of staged row m (written by the kernel before: read from L2, .cg, as this
// multiprocessor's L1 may hold an older layer's).
template <typename RowOf>
__device__ __forceinline__ void stage_rows(uint8_t* smem, int k, unsigned real, RowOf row_of) {
    const int units = 2 * padded_blocks(k), blocks = k / ABLOCK, row_units = k / 16;
    uint4* codes = reinterpret_cast<uint4*>(smem);
    float* scales = reinterpret_cast<float*>(codes + BM * units);
    int* qsums = reinterpret_cast<int*>(scales + BM * blocks);
    for (int idx = threadIdx.x; idx < BM * row_units; idx += THREADS) {
        const int m = idx / row_units, j = idx - m * row_units;
        if ((real >> m) & 1) {
            codes[m * units + unit_of(j >> 1, j & 1)] = __ldcg(reinterpret_cast<const uint4*>(row_of(m)) + j);
        }
    }
    for (int idx = threadIdx.x; idx < BM * blocks; idx += THREADS) {
        const int m = idx / blocks, blk = idx - m * blocks;
        if ((real >> m) & 1) {
            const float* s1 = reinterpret_cast<const float*>(row_of(m) + k);
            scales[idx] = __ldcg(s1 + blk);
            qsums[idx] = __ldcg(reinterpret_cast<const int*>(s1 + 2 * blocks) + blk);
        }
    }
}

// A step's codes and group scales of R weight rows (row_codes[r], row_scales[r]: the rows' starts): chunks
// c = base + lane_in_row + lanes u (u < U) of `chunks`; zero codes and scales past the row.
template <int R, int U>
__device__ __forceinline__ void load_rows(Step<4, R, U>& s, const uint8_t* const (&row_codes)[R],
                                          const float* const (&row_scales)[R], int base, int lane_in_row, int lanes,
                                          int chunks, int group_shift) {
    const bool whole = base + lanes * U <= chunks;  // every chunk inside the rows: loads without predicates
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int c = base + lanes * u + lane_in_row;
        const bool in = whole || c < chunks;
#pragma unroll
        for (int r = 0; r < R; r++) {
            s.w[r][u] = in ? __ldcs(reinterpret_cast<const uint4*>(row_codes[r]) + c) : make_uint4(0, 0, 0, 0);
            s.scale[r][u] = in ? __ldg(row_scales[r] + (c >> group_shift)) : 0.f;
        }
    }
}

// Multiply a step (R weight rows, U chunks a lane) into acc[m R + r] for every real staged row m: each 16-byte
// chunk is unpacked once and multiplied (dp4a) against each real row's activation block, the sum starting at
// -8 x the block's code sum (zero point 8), then scaled by (group scale x activation block scale).
template <int R, int U>
__device__ __forceinline__ void multiply_step(const Step<4, R, U>& s, float (&acc)[BM * R], const Staged& a,
                                              unsigned real, int base, int lane_in_row, int lanes, int chunks) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        // past the row: chunk 0's activations (finite), multiplied by the zero scales load_rows gave it
        const int c = base + lanes * u + lane_in_row;
        const int ch = c < chunks ? c : 0;
        const int unit = unit_of(ch, 0);
        uint32_t lo[R][4], hi[R][4];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const uint32_t w[4] = {s.w[r][u].x, s.w[r][u].y, s.w[r][u].z, s.w[r][u].w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                lo[r][j] = w[j] & 0x0F0F0F0Fu;  // elements 8j, 8j + 2, 8j + 4, 8j + 6
                hi[r][j] = (w[j] >> 4) & 0x0F0F0F0Fu;  // elements 8j + 1, ..., 8j + 7
            }
        }
#pragma unroll
        for (int m = 0; m < BM; m++) {
            if (!((real >> m) & 1)) continue;  // a padding row (uniform over the block)
            const uint4 ea = a.codes[m * a.units + unit];
            const uint4 eb = a.codes[m * a.units + unit + 32];
            const uint32_t e[8] = {ea.x, ea.y, ea.z, ea.w, eb.x, eb.y, eb.z, eb.w};
            const float xs = a.scales[m * a.blocks + ch];
            const int start = -INT4_ZERO_POINT * a.qsums[m * a.blocks + ch];
#pragma unroll
            for (int r = 0; r < R; r++) {
                int dot = start;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    dot = __dp4a((int)lo[r][j], (int)e[2 * j], dot);
                    dot = __dp4a((int)hi[r][j], (int)e[2 * j + 1], dot);
                }
                acc[m * R + r] = fmaf(s.scale[r][u] * xs, (float)dot, acc[m * R + r]);
            }
        }
    }
}

// Sum v over each aligned group of W lanes, scattered: lane l of a group ends with the total of v[l N / W + j] in
// v[j] (j < N / W) where N >= W, else with the total of v[l / (W / N)] in v[0] (W / N lanes hold each). O: the
// next xor offset, K: the values a lane still holds.
template <int O, int K, int N>
__device__ __forceinline__ void reduce_scatter_from(float (&v)[N], int lane) {
    if constexpr (O > 0) {
        if constexpr (K > 1) {
            constexpr int half = K / 2;
            const bool upper = (lane & O) != 0;
#pragma unroll
            for (int j = 0; j < half; j++) {  // keep one half, send the other to the partner lane
                const float send = upper ? v[j] : v[j + half];
                const float keep = upper ? v[j + half] : v[j];
                v[j] = keep + __shfl_xor_sync(0xffffffffu, send, O);
            }
            reduce_scatter_from<O / 2, half, N>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            reduce_scatter_from<O / 2, 1, N>(v, lane);
        }
    }
}

template <int W, int N>
__device__ __forceinline__ void reduce_scatter(float (&v)[N], int lane) {
    static_assert(W >= 1 && W <= 32 && (W & (W - 1)) == 0 && (N & (N - 1)) == 0, "powers of two");
    reduce_scatter_from<W / 2, N, N>(v, lane);
}

// xq [T] quantized rows of x [T, k]: one block a token.
template <typename T>
__global__ void __launch_bounds__(THREADS) moeb_quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ xq,
                                                                int k) {
    wait_for_previous_grid();  // x comes from the kernels before
    const int t = blockIdx.x;
    quantize_x<4, T>(x + (size_t)t * k, k, qrow_stages(xq + (size_t)t * qrow_bytes(k), k));
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

// aq [rows] quantized rows of act [rows, I] = act(gate_e xq[t]) * up_e xq[t] at each pair's sorted row (and act
// itself where act_out is given); blocks: row block b (fastest) x chunk of GU_ROWS intermediate rows.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) moeb_gate_up_kernel(
    const uint8_t* __restrict__ xq, const int* __restrict__ sorted_pairs, const int* __restrict__ block_experts,
    const int* __restrict__ num_blocks, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
    uint8_t* __restrict__ aq, T* __restrict__ act_out, int row_blocks, int top_k, int inter, int hidden,
    int activation, int num_groups, int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int pairs[BM];
    __shared__ __align__(16) T tile[BM][GU_ROWS];
    constexpr int U = GU_UNROLL;
    const int b = blockIdx.x % row_blocks, i0 = (blockIdx.x / row_blocks) * GU_ROWS;
    // The layout (align_routing's) was complete before the quantize kernel passed its wait, which it did before
    // letting this grid launch.
    if (b >= __ldcg(num_blocks)) return;
    const int e = __ldcg(block_experts + b);
    if (e < 0) return;
    const unsigned real = load_block_pairs(sorted_pairs, b, pairs);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = hidden / ABLOCK;  // 16-byte chunks of a row: 32 int4 codes each
    const int items = min(GU_ROWS, inter - i0);  // this block's intermediate rows
    const int steps_per_item = (chunks + 32 * U - 1) / (32 * U);
    const int my_items = warp < items ? (items - warp + WARPS - 1) / WARPS : 0;
    const int steps = my_items * steps_per_item;
    const size_t row_bytes = hidden / 2;
    const uint8_t* expert_codes = codes + (size_t)e * 2 * inter * row_bytes;
    const float* expert_scales = scales + (size_t)e * 2 * inter * num_groups;
    auto load = [&](Step<4, 2, U>& s, int item, int base) {
        const int i = i0 + item;
        const uint8_t* const row_codes[2] = {expert_codes + i * row_bytes, expert_codes + (inter + i) * row_bytes};
        const float* const row_scales[2] = {expert_scales + (size_t)i * num_groups,
                                            expert_scales + (size_t)(inter + i) * num_groups};
        load_rows<2, U>(s, row_codes, row_scales, base, lane, 32, chunks, group_shift);
    };
    Step<4, 2, U> cur;
    if (steps > 0) load(cur, warp, 0);
    wait_for_previous_grid();  // xq comes from the quantize kernel
    stage_rows(smem, hidden, real, [&](int m) { return xq + (size_t)(pairs[m] / top_k) * qrow_bytes(hidden); });
    __syncthreads();
    const Staged a = staged_rows(smem, hidden);

    // After the reduce-scatter of the 2 BM sums (index m 2 + r, r 0 gate / 1 up) lane l holds index l / SPREAD;
    // its gate and up lie SPREAD lanes apart.
    constexpr int N = 2 * BM, SPREAD = 32 / N;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; j++) acc[j] = 0.f;
    walk_steps<U>(
        cur, steps, warp, WARPS, steps_per_item, load,
        [&](const Step<4, 2, U>& s, int base) { multiply_step<2, U>(s, acc, a, real, base, lane, 32, chunks); },
        [&](int item) {  // the row pair is done
            reduce_scatter<32>(acc, lane);
            const float up = __shfl_xor_sync(0xffffffffu, acc[0], SPREAD);
            const int m = lane / (2 * SPREAD);
            if (lane % (2 * SPREAD) == 0 && ((real >> m) & 1)) {
                const T v = from_float<T>(activate(acc[0], activation) * up);
                tile[m][item] = v;
                if (act_out != nullptr) act_out[(size_t)(b * BM + m) * inter + i0 + item] = v;
            }
#pragma unroll
            for (int j = 0; j < N; j++) acc[j] = 0.f;
        });
    __syncthreads();

    // Quantize the tile's rows into aq (blocks of 32 along I: 4 threads, an aligned quad, a block; whole warps take
    // part in quantize_chunk's shuffles).
    constexpr int CHUNKS = GU_ROWS / 8, TILE = BM * CHUNKS, ROUNDED = (TILE + 31) / 32 * 32;
    const size_t aq_row = qrow_bytes(inter);
    for (int c = threadIdx.x; c < ROUNDED; c += THREADS) {
        const int m = min(c / CHUNKS, BM - 1), cc = c % CHUNKS;
        const bool active = c < TILE && ((real >> m) & 1) && i0 + 8 * cc < inter;
        const uint4 raw = active ? *reinterpret_cast<const uint4*>(&tile[m][8 * cc]) : make_uint4(0, 0, 0, 0);
        quantize_chunk<4, T>(raw, i0 / 8 + cc, active, qrow_stages(aq + (size_t)(b * BM + m) * aq_row, inter));
    }
}

// out_pairs [T k, H]: each pair's down_e(aq[r]) times its routing weight at row p; blocks: row block b (fastest) x
// chunk of DOWN_BLOCK_ROWS output rows.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) moeb_down_kernel(
    const uint8_t* __restrict__ aq, const int* __restrict__ sorted_pairs, const int* __restrict__ block_experts,
    const int* __restrict__ num_blocks, const float* __restrict__ routing_weights, const uint8_t* __restrict__ codes,
    const float* __restrict__ scales, T* __restrict__ out_pairs, int row_blocks, int inter, int hidden,
    int num_groups, int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int pairs[BM];
    __shared__ float weights[BM];
    constexpr int U = DOWN_UNROLL, R = DOWN_R, L = DOWN_LANES;
    const int b = blockIdx.x % row_blocks, h0 = (blockIdx.x / row_blocks) * DOWN_BLOCK_ROWS;
    // The layout and the routing weights were complete before the gate|up kernel passed its wait.
    if (b >= __ldcg(num_blocks)) return;
    const int e = __ldcg(block_experts + b);
    if (e < 0) return;
    if (threadIdx.x < BM) {
        const int p = __ldcg(sorted_pairs + b * BM + threadIdx.x);
        weights[threadIdx.x] = p >= 0 ? __ldcg(routing_weights + p) : 0.f;
    }
    const unsigned real = load_block_pairs(sorted_pairs, b, pairs);  // (its __syncthreads covers weights too)

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = lane / L, lane_in_row = lane % L;
    const int chunks = inter / ABLOCK;
    const int items = min(DOWN_BLOCK_ROWS, hidden - h0) / DOWN_ITEM_ROWS;
    // walk_steps counts a step as 32 U chunks; a row's lane group covers L U of them: its base is base L / 32
    const int steps_per_item = (chunks + L * U - 1) / (L * U);
    const int my_items = warp < items ? (items - warp + WARPS - 1) / WARPS : 0;
    const int steps = my_items * steps_per_item;
    const size_t row_bytes = inter / 2;
    auto row_of = [&](int item, int r) { return h0 + item * DOWN_ITEM_ROWS + group * R + r; };
    auto load = [&](Step<4, R, U>& s, int item, int base) {
        const uint8_t* row_codes[R];
        const float* row_scales[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const size_t row = (size_t)e * hidden + row_of(item, r);
            row_codes[r] = codes + row * row_bytes;
            row_scales[r] = scales + row * num_groups;
        }
        load_rows<R, U>(s, row_codes, row_scales, base / (32 / L), lane_in_row, L, chunks, group_shift);
    };
    Step<4, R, U> cur;
    if (steps > 0) load(cur, warp, 0);
    wait_for_previous_grid();  // aq comes from the gate|up kernel
    const size_t aq_row = qrow_bytes(inter);
    stage_rows(smem, inter, real, [&](int m) { return aq + (size_t)(b * BM + m) * aq_row; });
    __syncthreads();
    const Staged a = staged_rows(smem, inter);

    // After the reduce-scatter of the BM R sums (index m R + r) over a lane group, lane l of it holds indices
    // l PER + j (j < PER), or where there are fewer sums than lanes index l / SHARE in acc[0] (SHARE lanes each).
    constexpr int N = BM * R, PER = N >= L ? N / L : 1, SHARE = N >= L ? 1 : L / N;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; j++) acc[j] = 0.f;
    walk_steps<U>(
        cur, steps, warp, WARPS, steps_per_item, load,
        [&](const Step<4, R, U>& s, int base) {
            multiply_step<R, U>(s, acc, a, real, base / (32 / L), lane_in_row, L, chunks);
        },
        [&](int item) {  // the warp's DOWN_ITEM_ROWS rows are done
            reduce_scatter<L>(acc, lane);
            const bool writer = lane_in_row % SHARE == 0;
#pragma unroll
            for (int j = 0; j < PER; j++) {
                const int idx = N >= L ? lane_in_row * PER + j : lane_in_row / SHARE;
                const int m = idx / R, r = idx % R;
                if (writer && ((real >> m) & 1)) {
                    out_pairs[(size_t)pairs[m] * hidden + row_of(item, r)] = from_float<T>(acc[j] * weights[m]);
                }
            }
#pragma unroll
            for (int j = 0; j < N; j++) acc[j] = 0.f;
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
    const int shift = group_shift_of(hidden, num_groups);
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
    const int shift = group_shift_of(inter, num_groups);
    if (shift < 0) return (int)cudaErrorInvalidValue;
    const int grid = row_blocks * ((hidden + DOWN_BLOCK_ROWS - 1) / DOWN_BLOCK_ROWS);
    return launch_kernel(moeb_down_kernel<T>, grid, THREADS, staged_bytes(inter), pdl, stream,
                         reinterpret_cast<const uint8_t*>(aq), sorted_pairs, block_experts, num_blocks, weights,
                         reinterpret_cast<const uint8_t*>(codes), scales, reinterpret_cast<T*>(out_pairs), row_blocks,
                         inter, hidden, num_groups, shift);
}

static bool shapes_fit(int inter, int hidden) {
    return inter > 0 && hidden > 0 && inter % ABLOCK == 0 && hidden % ABLOCK == 0;
}

extern "C" {

int tq_moeb_block_m(void) { return BM; }
int tq_moeb_threads(void) { return THREADS; }
int tq_moeb_stages(void) { return stages_of<4>(); }
// Bytes of one quantized activation row of k elements (the buffers the Python side allocates).
long long tq_moeb_row_bytes(int k) { return (long long)qrow_bytes(k); }
// Shared memory a product kernel's block takes for activation rows of k elements (beyond its static arrays).
long long tq_moeb_staged_bytes(int k) { return (long long)staged_bytes(k); }

// xq [tokens] quantized rows (tq_moeb_row_bytes(k) apart) of x [tokens, k] (dtype 0 bfloat16, 1 float16). Returns
// the launch's CUDA error code.
int tq_moeb_quantize(int dtype, const void* x, void* xq, int tokens, int k, int pdl, void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (tokens < 1 || k <= 0 || k % ABLOCK) return (int)cudaErrorInvalidValue;
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
