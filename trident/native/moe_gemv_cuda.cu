// The routed experts of an MoE layer for ONE token, with int8 or int4 experts (trident/moe/quant.py: codes int8
// gate_up [E, 2I, H] and down [E, H, I] with float32 scales [E, 2I] and [E, H], one per expert and output row; or
// int4 two a byte, uint8 [E, 2I, H/2] and [E, H, I/2], stored q + 8, with float32 scales [E, 2I, H/G] and
// [E, H, I/G], one per expert, output row and group of G inputs), in two launches and with the GPU's 8-bit integer
// dot products (dp4a), as gemv_cuda.cu multiplies one row of a Linear:
//
//   act[j, i] = act(gate_e . x) * (up_e . x)                 e = expert_ids[j], j < k, i < I   (moe_gate_up_kernel)
//   y[h]      = sum_j weights[j] * (down_e[h] . act[j])                                    (moe_down_kernel)
//
// At one token the Triton kernels (trident/kernels/moe_experts.py) run four launches (routing alignment, gate|up,
// down, the sum over k) with 16-row tensor-core tiles of which one row is used; here:
//
//  * moe_gate_up_kernel quantizes x once per block into two int8 stages per block of 32 (dp4a_common.cuh) and gives
//    each warp (gate row i, up row I + i) of a chosen expert: the pair's two rows are one pipeline step of both
//    rows' 16-byte chunks, and the warp's lane 0 writes act(gate) * up (float32, one rounding to T).
//  * moe_down_kernel reads act [k, I] as one activation row of k I elements (quantized the same way) and each output
//    row h as the k experts' down rows h laid end to end: chunk c of the row belongs to expert j = c / (I / 16),
//    whose row scale times the routing weight multiplies that chunk's integer sums. The sum over k is the row's own
//    sum: no partial outputs, no atomics, one rounding to T.
//  * int4 codes (BITS 4) take the activations' one-stage quantization and zero point 8 of gemv_cuda.cu (a 16-byte
//    chunk is 32 elements, one activation block, inside one group: groups are a power-of-two number of blocks); a
//    chunk's scale is read with its codes (row, group), times the routing weight in moe_down_kernel.
//
// Neither reads anything back on the host: the expert ids and weights come from the router's kernel on the GPU
// (read after the PDL wait), so a decode step stays capturable in a CUDA graph. Requirements (checked by the caller,
// trident/native/moe_gemv_cuda.py): H and I multiples of 32, k <= MAX_TOP_K, everything contiguous and 16-byte
// aligned, expert ids int64 in [0, E); int4 groups of a power-of-two number of 32-element blocks (or per channel).

#include "dp4a_common.cuh"

#define MAX_TOP_K 32
#ifndef DOWN_ROWS
#define DOWN_ROWS ROWS  // output rows a warp of moe_down_kernel multiplies at a time
#endif
#ifndef DOWN_UNROLL
#define DOWN_UNROLL UNROLL  // its 16-byte chunks per lane and row in one pipeline step
#endif
// Bytes of codes per row of k elements.
template <int BITS>
__host__ __device__ __forceinline__ int row_bytes_of(int k) { return BITS == 4 ? k / 2 : k; }

// The two rows of pair p (gate row i and up row I + i of expert ids[p / I]): their 16-byte chunks base + 32 u + lane,
// and each chunk's scale (int8: the row's; int4: its group's, chunk >> group_shift of the row's num_groups).
template <int BITS, int U>
__device__ __forceinline__ void load_pair(Step<BITS, 2, U>& s, const uint8_t* __restrict__ codes,
                                          const float* __restrict__ scales, const int64_t* __restrict__ ids, int p,
                                          int inter, int hidden, int base, int lane, int num_groups, int group_shift) {
    const int row_bytes = row_bytes_of<BITS>(hidden);
    const int chunks = row_bytes / 16;
    const size_t e = (size_t)__ldg(ids + p / inter);
    const int i = p % inter;
    const size_t rows[2] = {e * 2 * inter + i, e * 2 * inter + inter + i};
    const bool whole = base + 32 * U <= chunks;  // every chunk inside the rows: loads without predicates
    float row_scale[2];
    const float* row_scales[2];
    const uint4* row_codes[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {  // int8 per channel: one scale a row; addresses once a step
        row_scales[r] = scales + rows[r] * num_groups;
        row_scale[r] = BITS == 8 ? __ldg(row_scales[r]) : 0.f;
        row_codes[r] = reinterpret_cast<const uint4*>(codes + rows[r] * row_bytes) + base + lane;
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int ch = base + u * 32 + lane;
        const bool in = whole || ch < chunks;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            s.w[r][u] = in ? __ldcs(row_codes[r] + 32 * u) : make_uint4(0, 0, 0, 0);
            s.scale[r][u] = !in ? 0.f : BITS == 8 ? row_scale[r] : __ldg(row_scales[r] + (ch >> group_shift));
        }
    }
}

// act [k, I] (T) = act(gate) * up for every chosen expert; warps take pairs (j, i) grid-stride.
template <int BITS, typename T, int U>
__global__ void __launch_bounds__(THREADS, 2) moe_gate_up_kernel(const T* __restrict__ x,
                                                                 const int64_t* __restrict__ ids,
                                                                 const uint8_t* __restrict__ codes,
                                                                 const float* __restrict__ scales,
                                                                 T* __restrict__ act, int top_k, int inter,
                                                                 int hidden, int activation, int num_groups,
                                                                 int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    const XStages xs = x_stages(smem, hidden);

    const int lane = threadIdx.x & 31;
    const int chunks = row_bytes_of<BITS>(hidden) / 16;
    const int pairs = top_k * inter;
    const int stride = gridDim.x * WARPS;
    const int first = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int steps_per_pair = (chunks + 32 * U - 1) / (32 * U);
    const int my_pairs = first < pairs ? (pairs - first + stride - 1) / stride : 0;
    const int steps = my_pairs * steps_per_pair;

    wait_for_previous_grid();  // the expert ids and x come from the kernels before
    Step<BITS, 2, U> cur;
    if (steps > 0) load_pair(cur, codes, scales, ids, first, inter, hidden, 0, lane, num_groups, group_shift);
    quantize_x<BITS>(x, hidden, xs);
    __syncthreads();

    constexpr int OFF = BITS == 4 ? OFFSETS_ZERO_POINT : OFFSETS_NONE;
    float acc[2] = {0.f, 0.f};
    walk_steps<U>(
        cur, steps, first, stride, steps_per_pair,
        [&](Step<BITS, 2, U>& s, int p, int base) {
            load_pair(s, codes, scales, ids, p, inter, hidden, base, lane, num_groups, group_shift);
        },
        [&](const Step<BITS, 2, U>& s, int base) {
            compute_step<BITS, 2, U, OFF>(s, acc, xs, base, lane, chunks, INT4_ZERO_POINT);
        },
        [&](int p) {  // the pair is done
            warp_sum(acc);
            if (lane == 0) act[p] = from_float<T>(activate(acc[0], activation) * acc[1]);
            acc[0] = acc[1] = 0.f;
        });
}

// A pipeline step of moe_down_kernel: the codes of rows h = rg R + r (each the k chosen experts' rows h end to end:
// chunk c belongs to expert c / (I / 16)), and the R k products (row scale of expert j's row h) x (routing weight j),
// one per lane and slot r k + j (slots beyond 32 in the second register). The chunk scales are gathered from those by
// warp shuffles when the step is multiplied: one 4-byte load per lane and step instead of one per chunk.
// int4 (BITS 4): each chunk's scale (its expert's row h, its group) times the routing weight is loaded with its codes
// instead, straight into s.scale (slot_scale unused).
template <int BITS, int R, int U>
struct DownStep {
    Step<BITS, R, U> s;
    float slot_scale[(MAX_TOP_K * R + 31) / 32];
};

template <int BITS, int R, int U>
__device__ __forceinline__ void load_down(DownStep<BITS, R, U>& d, const uint8_t* __restrict__ codes,
                                          const float* __restrict__ scales, const int* ids, const float* weights,
                                          int top_k, int rg, int hidden, int inter, int chunks, int base, int lane,
                                          int num_groups, int group_shift) {
    const int row_bytes = row_bytes_of<BITS>(inter);
    const int per_expert = row_bytes / 16;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int ch = base + u * 32 + lane;
        const int j = min(ch / per_expert, top_k - 1);  // past the row: a chunk of the last expert (never used)
        const int within = ch - j * per_expert;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int h = min(rg * R + r, hidden - 1);  // a missing row repeats the last (never stored)
            const size_t row = (size_t)ids[j] * hidden + h;
            d.s.w[r][u] = ch < chunks
                ? __ldcs(reinterpret_cast<const uint4*>(codes + row * row_bytes) + within)
                : make_uint4(0, 0, 0, 0);
            if (BITS == 4) {
                d.s.scale[r][u] = ch < chunks ? __ldg(scales + row * num_groups + (within >> group_shift)) * weights[j]
                                              : 0.f;
            }
        }
    }
    if constexpr (BITS == 8) {
#pragma unroll
        for (int q = 0; q < (MAX_TOP_K * R + 31) / 32; q++) {
            const int slot = q * 32 + lane;
            const int r = slot / top_k, j = slot - r * top_k;
            const int h = min(rg * R + r, hidden - 1);
            d.slot_scale[q] = r < R ? __ldg(scales + (size_t)ids[j] * hidden + h) * weights[j] : 0.f;
        }
    }
}

// The chunk scales of a loaded step (all lanes take part: warp shuffles).
template <int BITS, int R, int U>
__device__ __forceinline__ void gather_scales(DownStep<BITS, R, U>& d, int top_k, int inter, int base, int lane) {
    const int per_expert = inter / 16;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int j = min((base + u * 32 + lane) / per_expert, top_k - 1);  // past the row: any slot (unused)
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int slot = r * top_k + j;
            float v = 0.f;
#pragma unroll
            for (int q = 0; q < (MAX_TOP_K * R + 31) / 32; q++) {
                const float from = __shfl_sync(0xffffffffu, d.slot_scale[q], slot & 31);
                if (slot / 32 == q) v = from;
            }
            d.s.scale[r][u] = v;
        }
    }
}

// y [H] (T) = sum_j weights[j] down_e(act[j]); warps take row groups of R rows grid-stride.
template <int BITS, typename T, int R, int U>
__global__ void __launch_bounds__(THREADS, 2) moe_down_kernel(const T* __restrict__ act,
                                                              const int64_t* __restrict__ expert_ids,
                                                              const float* __restrict__ routing_weights,
                                                              const uint8_t* __restrict__ codes,
                                                              const float* __restrict__ scales, T* __restrict__ y,
                                                              int top_k, int inter, int hidden, int num_groups,
                                                              int group_shift) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int k = top_k * inter;  // the activation row's length
    const XStages xs = x_stages(smem, k);
    __shared__ int ids[MAX_TOP_K];
    __shared__ float weights[MAX_TOP_K];

    const int lane = threadIdx.x & 31;
    const int chunks = top_k * (row_bytes_of<BITS>(inter) / 16);
    const int row_groups = (hidden + R - 1) / R;
    const int stride = gridDim.x * WARPS;
    const int first = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int steps_per_group = (chunks + 32 * U - 1) / (32 * U);
    const int my_groups = first < row_groups ? (row_groups - first + stride - 1) / stride : 0;
    const int steps = my_groups * steps_per_group;

    // The router that wrote the ids and weights finished before moe_gate_up_kernel passed its wait, which it did
    // before letting this grid launch: they and the first step's codes are read before this grid's wait (from L2,
    // .cg: this multiprocessor's L1 may hold another layer's), overlapping moe_gate_up_kernel's tail.
    if (threadIdx.x < top_k) {
        ids[threadIdx.x] = (int)__ldcg(reinterpret_cast<const long long*>(expert_ids) + threadIdx.x);
        weights[threadIdx.x] = __ldcg(routing_weights + threadIdx.x);
    }
    __syncthreads();
    DownStep<BITS, R, U> cur;
    if (steps > 0) {
        load_down(cur, codes, scales, ids, weights, top_k, first, hidden, inter, chunks, 0, lane, num_groups,
                  group_shift);
    }
    wait_for_previous_grid();  // act comes from moe_gate_up_kernel
    quantize_x<BITS>(act, k, xs);
    __syncthreads();

    constexpr int OFF = BITS == 4 ? OFFSETS_ZERO_POINT : OFFSETS_NONE;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    walk_steps<U>(
        cur, steps, first, stride, steps_per_group,
        [&](DownStep<BITS, R, U>& d, int rg, int base) {
            load_down(d, codes, scales, ids, weights, top_k, rg, hidden, inter, chunks, base, lane, num_groups,
                      group_shift);
        },
        [&](DownStep<BITS, R, U>& d, int base) {
            if (BITS == 8) gather_scales(d, top_k, inter, base, lane);
            compute_step<BITS, R, U, OFF>(d.s, acc, xs, base, lane, chunks, INT4_ZERO_POINT);
        },
        [&](int rg) {  // the row group is done
            warp_sum(acc);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int h = rg * R + r;
                if (lane == 0 && h < hidden) y[h] = from_float<T>(acc[r]);
                acc[r] = 0.f;
            }
        });
}

template <int BITS, typename T>
static int gate_up(const void* x, const int64_t* ids, const void* codes, const float* scales, void* act, int top_k,
                   int inter, int hidden, int activation, int num_groups, int grid, int pdl, cudaStream_t stream) {
    const int shift = group_shift_of(hidden, num_groups);
    if (shift < 0) return (int)cudaErrorInvalidValue;
    return launch_kernel(moe_gate_up_kernel<BITS, T, UNROLL>, grid, THREADS, activation_smem_bytes(hidden), pdl,
                         stream, reinterpret_cast<const T*>(x), ids, reinterpret_cast<const uint8_t*>(codes), scales,
                         reinterpret_cast<T*>(act), top_k, inter, hidden, activation, num_groups, shift);
}

template <int BITS, typename T>
static int down(const void* act, const int64_t* ids, const float* weights, const void* codes, const float* scales,
                void* y, int top_k, int inter, int hidden, int num_groups, int grid, int pdl, cudaStream_t stream) {
    const int shift = group_shift_of(inter, num_groups);
    if (shift < 0) return (int)cudaErrorInvalidValue;
    return launch_kernel(moe_down_kernel<BITS, T, DOWN_ROWS, DOWN_UNROLL>, grid, THREADS,
                         activation_smem_bytes(top_k * inter), pdl, stream,
                         reinterpret_cast<const T*>(act), ids, weights, reinterpret_cast<const uint8_t*>(codes),
                         scales, reinterpret_cast<T*>(y), top_k, inter, hidden, num_groups, shift);
}

extern "C" {

int tq_moe_max_top_k(void) { return MAX_TOP_K; }
int tq_moe_down_rows_per_warp(void) { return DOWN_ROWS; }
int tq_moe_threads(void) { return THREADS; }

// act [k, I] = act(gate_e x) * up_e x for the k experts of expert_ids (int64 [k]): dtype 0 bfloat16, 1 float16
// (x, act); bits 8 (int8 codes, a scale per row: num_groups 1) or 4 (int4 codes, num_groups scales per row);
// activation 0 silu, 1 gelu (tanh approximation), 2 gelu (erf). Returns the launch's CUDA error code.
int tq_moe_gate_up(int dtype, int bits, const void* x, const int64_t* expert_ids, const void* codes,
                   const float* scales, void* act, int top_k, int inter, int hidden, int activation, int num_groups,
                   int grid, int pdl, void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (top_k < 1 || top_k > MAX_TOP_K || (bits != 8 && bits != 4)) return (int)cudaErrorInvalidValue;
#define GATE_UP_ARGS x, expert_ids, codes, scales, act, top_k, inter, hidden, activation, num_groups, grid, pdl, s
    if (bits == 8) {
        return dtype == 0 ? gate_up<8, __nv_bfloat16>(GATE_UP_ARGS) : gate_up<8, __half>(GATE_UP_ARGS);
    }
    return dtype == 0 ? gate_up<4, __nv_bfloat16>(GATE_UP_ARGS) : gate_up<4, __half>(GATE_UP_ARGS);
#undef GATE_UP_ARGS
}

// y [H] = sum_j weights[j] down_e(act[j]) (weights float32 [k]); bits and num_groups as tq_moe_gate_up's. Returns the
// launch's CUDA error code.
int tq_moe_down(int dtype, int bits, const void* act, const int64_t* expert_ids, const float* weights,
                const void* codes, const float* scales, void* y, int top_k, int inter, int hidden, int num_groups,
                int grid, int pdl, void* stream) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (top_k < 1 || top_k > MAX_TOP_K || (bits != 8 && bits != 4)) return (int)cudaErrorInvalidValue;
#define DOWN_ARGS act, expert_ids, weights, codes, scales, y, top_k, inter, hidden, num_groups, grid, pdl, s
    if (bits == 8) return dtype == 0 ? down<8, __nv_bfloat16>(DOWN_ARGS) : down<8, __half>(DOWN_ARGS);
    return dtype == 0 ? down<4, __nv_bfloat16>(DOWN_ARGS) : down<4, __half>(DOWN_ARGS);
#undef DOWN_ARGS
}

}  // extern "C"
