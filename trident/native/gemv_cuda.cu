// y = x W^T (+ b) for ONE row of 16-bit activations x and a weight-only int4 / int8 affine weight W [N, K]
// (trident/quant/affine.py: int8 codes [N, K], or int4 codes two per byte [N, K/2] with the even element in the
// low nibble; float32 scales [N, K/G] and optional float32 offsets [N, K/G]), with the GPU's 8-bit integer dot
// products (dp4a) instead of converting codes to floats.
//
// Batch-1 decode is bound by reading W. Triton's tensor-core kernels spend their time moving the converted codes
// through shared memory into the tensor cores' operand layout (int4 at 0.7-1.2 TB/s, int8 at 1.8-3.2 on an H200);
// here every lane reads its own 16 bytes of codes straight into registers and multiplies them as they are:
//
//  * The activations are quantized once per block (CTA), into shared memory, the way the CPU kernel
//    (qmatmul.c) does: per block of 32 elements, two int8 stages, a value and its remainder,
//        x ~ s1 q1 + s2 q2,   s1 = max|x| / 127,   s2 = max|x - s1 q1| / 127,
//    about 16 bits of x (an error of at most ~1/65,000 of the block's largest element); with int4 codes the first
//    stage alone (at most 1/254 of it: dp4a_common.cuh's stages_of says why). Stored in the order the
//    codes unpack to: for int4, each 8 elements' 4 even ones, then their 4 odd ones (a 32-bit word of codes masked
//    with 0x0F0F0F0F gives the even elements' codes, shifted by 4 the odd ones').
//  * A lane takes 16 bytes of codes of a row (32 int4 or 16 int8 elements: one activation block, or half of
//    one), multiplies them with the stages by dp4a (exact, int32), and adds
//        scale[row, group] * (s1 * I1 + s2 * I2)       (int4: scale[row, group] * s1 * I1)
//    to its float32 sum. Offsets: symmetric int4 (stored q + 8, offsets -8 s; GGUF Q4_0) passes its zero point
//    instead, and I1 starts at -8 x the block's sum of activation codes (no offsets read); other offsets
//    (asymmetric codes) are read with the scales and add offset[row, group] times the block's sum of x, chunk by
//    chunk (dp4a_common.cuh's OFFSETS_*). Reading them once per row at its end instead, out of the pipeline, put a
//    memory round trip in every int4 row: Llama-3-8B's int4 layer 52.6 -> 41.1 us (docs/benchmarks.md).
//  * A warp owns ROWS rows at a time and walks them in pipeline steps of UNROLL 16-byte chunks per lane and row:
//    the codes (scales, offsets) of the next step are loaded while this one is multiplied, so each lane keeps
//    ROWS x UNROLL 16-byte loads in flight. Where rows in pairs would leave a last partial round of pairs (which
//    costs a whole round), one row in steps of ROWS x UNROLL chunks can take fewer steps (tq_gemv_rows_for). Warps take row groups grid-stride over a grid of what the GPU keeps
//    resident, so x is quantized once per resident block.
//  * Programmatic dependent launch (Hopper): the codes of a warp's first step are requested before the kernel
//    waits for the one before it (griddepcontrol.wait; the weight does not depend on that kernel), then x is
//    read and quantized, and the next kernel may launch at once.
//  * A decoder layer's norm and gated activation can come along (tq_gemv_normed): x is quantized as
//    RMSNorm(x + residual) * w, and a fused gate|up weight's warps take (gate row i, up row n + i) pairs and write
//    act(gate) * up, so the layer's norms and its MLP activation need no launches of their own.
//  Measured on an H200 (Llama-3-8B projections, CUDA-graph replays): int4 group 128 at 1.9-3.8 TB/s of codes and
//  scales against Triton's 0.7-1.2; int8 at 2.4-3.7 TB/s against 1.8-3.2 (docs/benchmarks.md).
//
// Requirements (checked by the caller, trident/native/gemv_cuda.py): K a multiple of 32, the group size a
// multiple of 32 (or K, per channel), x and the codes 16-byte aligned, everything contiguous.

#include "dp4a_common.cuh"

#ifndef GEMV_WARPS
#define GEMV_WARPS 16  // warps per block, one block per multiprocessor: x is quantized once per multiprocessor
#endif
#define GEMV_THREADS (GEMV_WARPS * 32)
#ifndef GEMV_ONE_ROW
#define GEMV_ONE_ROW 1  // 0: rows always in groups of ROWS (tq_gemv_rows_for), for A/B runs of the choice
#endif

// Row r of row group rg: rg R + r (a missing row repeats the last, never stored), or with GATED (R = 2) the pair
// gate row rg, up row n + rg of a fused gate|up weight of 2n rows.
template <bool GATED, int R>
__device__ __forceinline__ int row_of(int rg, int r, int n) {
    return GATED ? rg + r * n : min(rg * R + r, n - 1);
}

template <int BITS, int OFF, bool GATED, int R, int U>
__device__ __forceinline__ void load_step(Step<BITS, R, U>& s, const uint8_t* __restrict__ codes,
                                          const float* __restrict__ scales, const float* __restrict__ offsets, int rg,
                                          int base, int lane, int n, int row_bytes, int chunks, int num_groups,
                                          int group_shift) {
    const uint4* row_codes[R];
    const float* row_scales[R];
    const float* row_offsets[R];
#pragma unroll
    for (int r = 0; r < R; r++) {  // the rows' addresses once a step, not once a chunk
        const size_t row = (size_t)row_of<GATED, R>(rg, r, n);
        row_codes[r] = reinterpret_cast<const uint4*>(codes + row * row_bytes) + base + lane;
        row_scales[r] = scales + row * num_groups;
        row_offsets[r] = OFF == OFFSETS_PER_GROUP ? offsets + row * num_groups : nullptr;
    }
    // a whole step inside the rows (every step of a row whose chunks are a multiple of 32 U): no predicates
    const bool whole = base + 32 * U <= chunks;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int ch = base + u * 32 + lane;
        const int group = (BITS == 4 ? ch : ch / 2) >> group_shift;
        const bool in = whole || ch < chunks;
#pragma unroll
        for (int r = 0; r < R; r++) {
            s.w[r][u] = in ? __ldcs(row_codes[r] + 32 * u) : make_uint4(0, 0, 0, 0);
            s.scale[r][u] = in ? __ldg(row_scales[r] + group) : 0.f;
            if (OFF == OFFSETS_PER_GROUP) {  // int8: the block's first chunk adds its offset
                s.offset[r][u] = in && !(BITS == 8 && (ch & 1)) ? __ldg(row_offsets[r] + group) : 0.f;
            }
        }
    }
}

// A warp's work is a list of steps: its row groups (of R rows) rg = first, first + stride, ..., each cut into
// steps of 32 U chunks. The codes of step t + 1 are loaded while step t is multiplied; those of the first step
// are requested before the kernel waits for the one before it and quantizes x (the weight does not depend on it).
// The norm (NORM): x is a decoder layer's sublayer output, quantized as RMSNorm(x + residual) * norm_weight
// (quantize_x_normed), block 0 writing the new residual stream. GATED (R = 2, with NORM): W is a fused gate|up
// weight of 2n rows and y [n] = act(gate . h) * (up . h), each warp taking the pair (gate row i, up row n + i).
struct NormArgs {
    const void* residual;     // [k] or null (the first layer: the stream is x)
    const void* weight;       // [k]
    void* residual_out;       // [k], written with x + residual (unused when residual is null)
    float eps;
    int activation;           // GATED: ACT_SILU, ACT_GELU_TANH or ACT_GELU
};

template <int BITS, int OFF, bool NORM, bool GATED, typename T, int R, int U>
__global__ void __launch_bounds__(GEMV_THREADS, 16 / GEMV_WARPS)
    gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                const float* __restrict__ offsets, int zero_point, const T* __restrict__ bias, T* __restrict__ y,
                int n, int k, int num_groups, int group_shift, NormArgs norm) {
    extern __shared__ __align__(16) uint8_t smem[];
    const XStages xs = x_stages(smem, k);

    const int lane = threadIdx.x & 31;
    const int row_bytes = BITS == 4 ? k / 2 : k;
    const int chunks = row_bytes / 16;  // 16-byte chunks per row
    static_assert(!GATED || (NORM && R == 2), "a gated product is a pair of rows after the norm");
    const int row_groups = GATED ? n : (n + R - 1) / R;
    const int stride = gridDim.x * GEMV_WARPS;
    const int first = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const int steps_per_group = (chunks + 32 * U - 1) / (32 * U);
    const int my_groups = first < row_groups ? (row_groups - first + stride - 1) / stride : 0;
    const int steps = my_groups * steps_per_group;

    Step<BITS, R, U> cur;
    if (steps > 0) {
        load_step<BITS, OFF, GATED>(cur, codes, scales, offsets, first, 0, lane, n, row_bytes, chunks, num_groups,
                                    group_shift);
    }

    wait_for_previous_grid();
    if (NORM) {
        quantize_x_normed<BITS, T, GEMV_THREADS>(
            x, reinterpret_cast<const T*>(norm.residual), reinterpret_cast<const T*>(norm.weight), norm.eps, k, xs,
            blockIdx.x == 0 ? reinterpret_cast<T*>(norm.residual_out) : nullptr);
    } else {
        quantize_x<BITS, T, GEMV_THREADS>(x, k, xs);
    }
    __syncthreads();

    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    auto load = [&](Step<BITS, R, U>& s, int rg, int base) {
        load_step<BITS, OFF, GATED>(s, codes, scales, offsets, rg, base, lane, n, row_bytes, chunks, num_groups,
                                    group_shift);
    };
    auto multiply = [&](const Step<BITS, R, U>& s, int base) {
        compute_step<BITS, R, U, OFF>(s, acc, xs, base, lane, chunks, zero_point);
    };
    auto finish = [&](int rg) {  // the row group is done
        int rows[R];
#pragma unroll
        for (int r = 0; r < R; r++) rows[r] = row_of<GATED, R>(rg, r, n);
        warp_sum(acc);
        if (GATED) {
            if (lane == 0) {
                float gate = acc[0], up = acc[1];
                if (bias != nullptr) {
                    gate += to_float(bias[rows[0]]);
                    up += to_float(bias[rows[1]]);
                }
                y[rg] = from_float<T>(activate(gate, norm.activation) * up);
            }
        } else {
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int row = rg * R + r;
                if (lane == 0 && row < n) {
                    y[row] = from_float<T>(bias != nullptr ? acc[r] + to_float(bias[row]) : acc[r]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
    };
    walk_steps<U>(cur, steps, first, stride, steps_per_group, load, multiply, finish);
}

template <int BITS, int OFF, bool NORM, bool GATED, typename T, int R, int U>
static int launch(const void* x, const void* codes, const float* scales, const float* offsets, int zero_point,
                  const void* bias, void* y, int n, int k, int group_size, int grid, int pdl, cudaStream_t stream,
                  NormArgs norm) {
    // a chunk's scale column: its block of 32 shifted right by log2(blocks per group); per channel, by 31 (always 0)
    const int blocks_per_group = group_size / ABLOCK;
    if (group_size % ABLOCK || (group_size != k && (blocks_per_group & (blocks_per_group - 1)))) {
        return (int)cudaErrorInvalidValue;  // groups of a power-of-two number of blocks, or one per row
    }
    const int group_shift = group_size == k ? 31 : __builtin_ctz(blocks_per_group);
    return launch_kernel(gemv_kernel<BITS, OFF, NORM, GATED, T, R, U>, grid, GEMV_THREADS,
                         activation_smem_bytes(k), pdl, stream, reinterpret_cast<const T*>(x),
                         reinterpret_cast<const uint8_t*>(codes), scales, offsets, zero_point,
                         reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(y), n, k, k / group_size, group_shift,
                         norm);
}

#define ARGS x, codes, scales, offsets, zero_point, bias, y, n, k, group_size, grid, pdl, stream, norm
template <typename T, bool NORM, bool GATED, int R, int U>
static int dispatch_format(int bits, const void* x, const void* codes, const float* scales, const float* offsets,
                           int zero_point, const void* bias, void* y, int n, int k, int group_size, int grid, int pdl,
                           cudaStream_t stream, NormArgs norm) {
    if (bits == 4) {
        if (zero_point != 0) return launch<4, OFFSETS_ZERO_POINT, NORM, GATED, T, R, U>(ARGS);
        return offsets != nullptr ? launch<4, OFFSETS_PER_GROUP, NORM, GATED, T, R, U>(ARGS)
                                  : launch<4, OFFSETS_NONE, NORM, GATED, T, R, U>(ARGS);
    }
    return offsets != nullptr ? launch<8, OFFSETS_PER_GROUP, NORM, GATED, T, R, U>(ARGS)
                              : launch<8, OFFSETS_NONE, NORM, GATED, T, R, U>(ARGS);
}

// rows: what tq_gemv_rows_for chose (a gated warp always multiplies its (gate, up) pair): ROWS rows in steps of
// UNROLL chunks, or one row in steps of 2 UNROLL (the same bytes in flight per warp).
template <typename T, bool NORM, bool GATED>
static int dispatch(int bits, int rows, const void* x, const void* codes, const float* scales, const float* offsets,
                    int zero_point, const void* bias, void* y, int n, int k, int group_size, int grid, int pdl,
                    cudaStream_t stream, NormArgs norm) {
    if constexpr (GATED) {
        return dispatch_format<T, NORM, GATED, 2, UNROLL>(bits, ARGS);
    } else {
        if (rows == 1) return dispatch_format<T, NORM, GATED, 1, 2 * UNROLL>(bits, ARGS);
        if (rows == ROWS) return dispatch_format<T, NORM, GATED, ROWS, UNROLL>(bits, ARGS);
        return (int)cudaErrorInvalidValue;
    }
}

template <bool NORM, bool GATED>
static int dispatch_dtype(int dtype, int bits, int rows, const void* x, const void* codes, const float* scales,
                          const float* offsets, int zero_point, const void* bias, void* y, int n, int k,
                          int group_size, int grid, int pdl, void* stream, NormArgs norm) {
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if ((zero_point != 0 && (bits != 4 || offsets != nullptr)) || zero_point < 0 || zero_point > 15) {
        return (int)cudaErrorInvalidValue;  // a zero point replaces the offsets, for int4 codes
    }
    if (dtype == 0) {
        return dispatch<__nv_bfloat16, NORM, GATED>(bits, rows, x, codes, scales, offsets, zero_point, bias, y, n, k,
                                                    group_size, grid, pdl, s, norm);
    }
    return dispatch<__half, NORM, GATED>(bits, rows, x, codes, scales, offsets, zero_point, bias, y, n, k, group_size,
                                         grid, pdl, s, norm);
}

// Pipeline steps of the busiest warp when `warps` resident warps take row groups of r rows in steps of u chunks per
// lane: a last partial round of row groups costs as much as a whole one (docs/benchmarks.md, session 13).
static int busiest_warp_steps(int n, int chunks, int warps, int r, int u) {
    const int row_groups = (n + r - 1) / r;
    return (row_groups + warps - 1) / warps * ((chunks + 32 * u - 1) / (32 * u));
}

extern "C" {

// The rows a warp multiplies at a time in an n x k product with bits-bit codes over `warps` resident warps: ROWS
// (each activation word read from shared memory serves them all), or 1 with steps of twice the chunks (the same
// bytes in flight) where the busiest warp then walks fewer steps. On an H200 (docs/benchmarks.md, session 15): int8
// 6144 x 4096 9.28 -> 8.78 us, 2048 x 4096 5.73 -> 4.76; where the steps tie, ROWS (one row was not faster).
// Non-gated products only; the caller sizes the grid for ceil(n / rows) row groups and passes rows to tq_gemv.
int tq_gemv_rows_for(int bits, int n, int k, int warps) {
    if (!GEMV_ONE_ROW || (bits != 4 && bits != 8)) return ROWS;
    const int chunks = (bits == 4 ? k / 2 : k) / 16;
    return busiest_warp_steps(n, chunks, warps, 1, 2 * UNROLL) < busiest_warp_steps(n, chunks, warps, ROWS, UNROLL)
               ? 1 : ROWS;
}
// The threads of a block: the caller sizes the grid.
int tq_gemv_threads(void) { return GEMV_THREADS; }
int tq_gemv_norm_max_k(void) { return NORM_TURNS * 8 * GEMV_THREADS; }
// The activation stages multiplied with bits-bit codes (dp4a_common.cuh's stages_of).
int tq_gemv_stages(int bits) { return bits == 4 ? stages_of<4>() : stages_of<8>(); }

// y [n] = x [k] W^T (+ bias): dtype 0 bfloat16, 1 float16 (x, bias, y); bits 4 or 8; rows per warp from
// tq_gemv_rows_for (1 or ROWS); offsets may be null, bias may be null. zero_point (int4 codes, offsets null): every
// offset is -zero_point x its scale (0: none). Returns the CUDA error code of the launch (0: launched).
int tq_gemv(int dtype, int bits, int rows, const void* x, const void* codes, const float* scales,
            const float* offsets, int zero_point, const void* bias, void* y, int n, int k, int group_size, int grid,
            int pdl, void* stream) {
    return dispatch_dtype<false, false>(dtype, bits, rows, x, codes, scales, offsets, zero_point, bias, y, n, k,
                                        group_size, grid, pdl, stream, NormArgs{nullptr, nullptr, nullptr, 0.f, 0});
}

// tq_gemv of h = RMSNorm(x + residual) * norm_weight instead of x (Llama's norm; residual may be null), writing
// x + residual to residual_out. k <= tq_gemv_norm_max_k(). activation >= 0 (ACT_*): W has 2n rows, gate then up,
// and y [n] = act(gate . h) * (up . h) (+ their biases), a pair of rows per warp (rows is ignored); activation -1:
// W has n rows, rows per warp from tq_gemv_rows_for.
int tq_gemv_normed(int dtype, int bits, int rows, const void* x, const void* residual, const void* norm_weight,
                   float eps, void* residual_out, const void* codes, const float* scales, const float* offsets,
                   int zero_point, const void* bias, void* y, int n, int k, int group_size, int activation, int grid,
                   int pdl, void* stream) {
    if (k > tq_gemv_norm_max_k() || activation > ACT_GELU) return (int)cudaErrorInvalidValue;
    const NormArgs norm{residual, norm_weight, residual_out, eps, activation};
    if (activation >= 0) {
        return dispatch_dtype<true, true>(dtype, bits, 2, x, codes, scales, offsets, zero_point, bias, y, n, k,
                                          group_size, grid, pdl, stream, norm);
    }
    return dispatch_dtype<true, false>(dtype, bits, rows, x, codes, scales, offsets, zero_point, bias, y, n, k,
                                       group_size, grid, pdl, stream, norm);
}

}  // extern "C"
