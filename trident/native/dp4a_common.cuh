// Shared by trident's CUDA integer kernels (gemv_cuda.cu, moe_gemv_cuda.cu): one row of 16-bit activations
// quantized into shared memory as two int8 stages per block of 32 (one for int4 codes), and a warp's pipeline step
// of 16-byte code chunks multiplied against them with dp4a. gemv_cuda.cu's header comment describes the scheme.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define WARPS 8  // warps per block of the MoE kernels (gemv_cuda.cu's blocks have GEMV_WARPS)
#define THREADS (WARPS * 32)
#define ABLOCK 32
#ifndef ROWS
#define ROWS 2    // rows a warp multiplies at a time (each activation word read from shared memory serves both)
#endif
#ifndef UNROLL
#define UNROLL 4  // 16-byte chunks per lane and row in one pipeline step
#endif
#ifndef INT4_STAGES
#define INT4_STAGES 1  // activation stages multiplied with int4 codes (1: s1 q1 alone)
#endif

// The activation stages a product with BITS-bit codes multiplies: two for int8 codes (the activations' rounding
// stays ~100x below the weights'), one for int4 (llama.cpp's q8_1 activations: the second stage doubled the dp4a
// work for a rounding ~30x below the codes'; on an H200 Llama-3-8B int4 decodes 406 -> 448 tok/s, and the
// default model's int4-g64 perplexity moves +0.45% in a float32 CPU emulation, docs/benchmarks.md).
template <int BITS> __host__ __device__ constexpr int stages_of() { return BITS == 4 ? INT4_STAGES : 2; }

#define INT4_ZERO_POINT 8  // int4 codes are stored q + 8 (trident/quant/rtn.py's INT4_ZERO_POINT)

// The group of a `block`-element block of K (default 32: int4 codes' 16-byte chunk): its index within the row shifted
// right by log2(blocks per group) (per channel, by 31: always 0). Groups of a power-of-two number of blocks, or one
// per row; -1 otherwise (trident/native/operands.py's groups_fit, on the host side).
static inline int group_shift_of(int k, int num_groups, int block = ABLOCK) {
    if (num_groups < 1 || k % num_groups) return -1;
    const int group_size = k / num_groups;
    const int blocks = group_size / block;
    if (num_groups == 1) return 31;
    if (group_size % block || (blocks & (blocks - 1))) return -1;
    return __builtin_ctz(blocks);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// The gated MLP's activations (act(gate) * up), by the numbers the wrappers pass: silu, gelu with the tanh
// approximation, gelu (erf).
#define ACT_SILU 0
#define ACT_GELU_TANH 1
#define ACT_GELU 2

__device__ __forceinline__ float activate(float g, int activation) {
    if (activation == ACT_SILU) return g / (1.f + expf(-g));
    if (activation == ACT_GELU_TANH) {
        const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
        return 0.5f * g * (1.f + tanhf(inner));
    }
    return 0.5f * g * (1.f + erff(g * 0.7071067811865476f));
}

__device__ __forceinline__ int quantize_code(float v, float inv) {
    float q = rintf(__fmul_rn(v, inv));
    return (int)fminf(fmaxf(q, -127.f), 127.f);
}

__device__ __forceinline__ uint32_t pack4(int a, int b, int c, int d) {
    return (uint32_t)(a & 0xFF) | ((uint32_t)(b & 0xFF) << 8) | ((uint32_t)(c & 0xFF) << 16) |
           ((uint32_t)(d & 0xFF) << 24);
}

// Where a block keeps its quantized activation row of k elements in shared memory: q1, q2 (k bytes each: the two
// stages' codes, in the order the weight codes unpack to), then per block of 32 the stages' scales s1, s2, the
// plain sum bsum, and for int4 codes the sums of each stage's codes, qsum1 and qsum2 (integers: what a zero point
// takes off a block's dp4a sum; activation_smem_bytes(k) in all).
struct XStages {
    uint32_t* q1;
    uint32_t* q2;
    float* s1;
    float* s2;
    float* bsum;
    int* qsum1;
    int* qsum2;
};

__device__ __forceinline__ XStages x_stages(uint8_t* smem, int k) {
    float* s1 = reinterpret_cast<float*>(smem + 2 * k);
    int* qsum1 = reinterpret_cast<int*>(s1 + 3 * (k / ABLOCK));
    return {reinterpret_cast<uint32_t*>(smem), reinterpret_cast<uint32_t*>(smem + k), s1, s1 + k / ABLOCK,
            s1 + 2 * (k / ABLOCK), qsum1, qsum1 + k / ABLOCK};
}

// How a weight's affine offsets (w = scale q + offset per group, trident/quant/affine.py) enter a product:
//  OFFSETS_NONE        none (symmetric int8, or int4 codes without an offset);
//  OFFSETS_ZERO_POINT  every offset is -zero_point x scale (symmetric int4 stored as q + 8; GGUF Q4_0): the dp4a
//                      sum of a block starts at -zero_point x the sum of the activation codes (qsum1), so the
//                      offsets are neither read nor multiplied;
//  OFFSETS_PER_GROUP   offset[row, group] read with the scales, one per chunk, times the block's plain sum of x.
#define OFFSETS_NONE 0
#define OFFSETS_ZERO_POINT 1
#define OFFSETS_PER_GROUP 2

// Quantize 8 elements of x (chunk c of K / 8; 4 threads, an aligned quad, share a block of 32) into shared memory:
// q1, q2 [K] bytes (int4 order: even elements of each 8, then odd), s1, s2 and the plain sum of each block (and
// for int4 the codes' sums).
template <int BITS, typename T>
__device__ __forceinline__ void quantize_chunk(uint4 raw, int c, bool active, const XStages& xs) {
    float v[8];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = active ? to_float(e[i]) : 0.f;
    float m = 0.f, sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        m = fmaxf(m, fabsf(v[i]));
        sum += v[i];
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const float scale1 = m / 127.f;
    const float inv1 = m > 0.f ? 127.f / m : 0.f;
    constexpr bool two = stages_of<BITS>() == 2;
    int a[8], b[8];
    float r[8];
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        a[i] = quantize_code(v[i], inv1);
        r[i] = __fsub_rn(v[i], __fmul_rn(scale1, (float)a[i]));
        m2 = fmaxf(m2, fabsf(r[i]));
    }
    float scale2 = 0.f;
    if (two) {  // the remainder's stage
        m2 = fmaxf(m2, __shfl_xor_sync(0xffffffffu, m2, 1));
        m2 = fmaxf(m2, __shfl_xor_sync(0xffffffffu, m2, 2));
        scale2 = m2 / 127.f;
        const float inv2 = m2 > 0.f ? 127.f / m2 : 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) b[i] = quantize_code(r[i], inv2);
    }
    if (active) {
        // the order the codes unpack to: int4 each 8 elements' even ones, then their odd ones; int8 as they come
        constexpr int o[8] = {0, BITS == 4 ? 2 : 1, BITS == 4 ? 4 : 2, BITS == 4 ? 6 : 3,
                              BITS == 4 ? 1 : 4, BITS == 4 ? 3 : 5, BITS == 4 ? 5 : 6, 7};
        xs.q1[2 * c] = pack4(a[o[0]], a[o[1]], a[o[2]], a[o[3]]);
        xs.q1[2 * c + 1] = pack4(a[o[4]], a[o[5]], a[o[6]], a[o[7]]);
        if (two) {
            xs.q2[2 * c] = pack4(b[o[0]], b[o[1]], b[o[2]], b[o[3]]);
            xs.q2[2 * c + 1] = pack4(b[o[4]], b[o[5]], b[o[6]], b[o[7]]);
        }
        if ((c & 3) == 0) {
            xs.s1[c / 4] = scale1;
            if (two) xs.s2[c / 4] = scale2;
            xs.bsum[c / 4] = sum;
        }
    }
    if (BITS == 4) {  // the codes' block sums, for a zero point (every lane takes the shuffles)
        int sum1 = 0, sum2 = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            sum1 += a[i];
            if (two) sum2 += b[i];
        }
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
        if (two) {
            sum2 += __shfl_xor_sync(0xffffffffu, sum2, 1);
            sum2 += __shfl_xor_sync(0xffffffffu, sum2, 2);
        }
        if (active && (c & 3) == 0) {
            xs.qsum1[c / 4] = sum1;
            if (two) xs.qsum2[c / 4] = sum2;
        }
    }
}

// Quantize x [K] into shared memory, 8 elements per thread and turn, by a block of NT threads. The first X_TURNS
// turns' loads are all issued before any of them is used (K up to X_TURNS x 8 NT in one round trip); longer x goes
// on turn by turn.
#define X_TURNS 8
template <int BITS, typename T, int NT = THREADS>
__device__ void quantize_x(const T* __restrict__ x, int k, const XStages& xs) {
    const int chunks = k / 8;
    uint4 raw[X_TURNS];
#pragma unroll
    for (int i = 0; i < X_TURNS; i++) {
        const int c = i * NT + threadIdx.x;
        raw[i] = c < chunks ? *reinterpret_cast<const uint4*>(x + 8 * (size_t)c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < X_TURNS; i++) {
        if (i * NT < chunks) {  // uniform over the block: every lane of a warp takes the shuffles
            const int c = i * NT + threadIdx.x;
            quantize_chunk<BITS, T>(raw[i], c, c < chunks, xs);
        }
    }
    for (int base = X_TURNS * NT; base < chunks; base += NT) {
        const int c = base + threadIdx.x;
        const uint4 r = c < chunks ? *reinterpret_cast<const uint4*>(x + 8 * (size_t)c) : make_uint4(0, 0, 0, 0);
        quantize_chunk<BITS, T>(r, c, c < chunks, xs);
    }
}

// quantize_x for the row h = RMSNorm(x + residual) * w of a decoder layer's norm (Llama's form: the sum rounded to T,
// normalised in float32, rounded to T, times w, rounded to T: trident/kernels/rms_norm.py's arithmetic), so that the
// norm needs no launch of its own. residual null: h = RMSNorm(x) * w. residual_out non-null (one block of the
// grid): the rounded sum is written there (the new residual stream). A block of NT threads; k <= NORM_TURNS x 8 x NT.
#define NORM_TURNS 4
template <int BITS, typename T, int NT = THREADS>
__device__ void quantize_x_normed(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ w,
                                  float eps, int k, const XStages& xs, T* __restrict__ residual_out) {
    __shared__ float warp_sums[NT / 32];
    const int chunks = k / 8;
    uint4 sum[NORM_TURNS], weight[NORM_TURNS];
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_TURNS; i++) {  // every load first (the norm weight's too), then the arithmetic
        const int c = i * NT + threadIdx.x;
        sum[i] = c < chunks ? *reinterpret_cast<const uint4*>(x + 8 * (size_t)c) : make_uint4(0, 0, 0, 0);
        weight[i] = c < chunks ? __ldg(reinterpret_cast<const uint4*>(w + 8 * (size_t)c)) : make_uint4(0, 0, 0, 0);
    }
    if (residual != nullptr) {
#pragma unroll
        for (int i = 0; i < NORM_TURNS; i++) {
            const int c = i * NT + threadIdx.x;
            if (c < chunks) {
                const uint4 r = *reinterpret_cast<const uint4*>(residual + 8 * (size_t)c);
                const T* re = reinterpret_cast<const T*>(&r);
                T* se = reinterpret_cast<T*>(&sum[i]);
#pragma unroll
                for (int j = 0; j < 8; j++) se[j] = from_float<T>(to_float(se[j]) + to_float(re[j]));
                if (residual_out != nullptr) *reinterpret_cast<uint4*>(residual_out + 8 * (size_t)c) = sum[i];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < NORM_TURNS; i++) {
        const T* se = reinterpret_cast<const T*>(&sum[i]);
#pragma unroll
        for (int j = 0; j < 8; j++) squares = fmaf(to_float(se[j]), to_float(se[j]), squares);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = squares;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < NT / 32; i++) total += warp_sums[i];
    const float rstd = rsqrtf(total / (float)k + eps);
#pragma unroll
    for (int i = 0; i < NORM_TURNS; i++) {
        if (i * NT < chunks) {  // uniform over the block: every lane of a warp takes the shuffles
            const int c = i * NT + threadIdx.x;
            uint4 h = make_uint4(0, 0, 0, 0);
            if (c < chunks) {
                const T* se = reinterpret_cast<const T*>(&sum[i]);
                const T* we = reinterpret_cast<const T*>(&weight[i]);
                T* he = reinterpret_cast<T*>(&h);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    he[j] = from_float<T>(to_float(we[j]) * to_float(from_float<T>(to_float(se[j]) * rstd)));
                }
            }
            quantize_chunk<BITS, T>(h, c, c < chunks, xs);
        }
    }
}

// One pipeline step of a warp: its row group rg's 16-byte chunks base + 32 u + lane (u < U), codes and scales
// (and with OFFSETS_PER_GROUP the offsets: left unused, the compiler keeps no registers for them).
template <int BITS, int R, int U>
struct Step {
    uint4 w[R][U];
    float scale[R][U];
    float offset[R][U];
};

// Multiply a step into the warp's R sums. OFF: OFFSETS_* (zero_point with OFFSETS_ZERO_POINT, int4 codes only);
// with OFFSETS_PER_GROUP and int8 codes the odd chunk of each block of 32 carries a zero offset (the block's sum
// is added once).
template <int BITS, int R, int U, int OFF = OFFSETS_NONE>
__device__ __forceinline__ void compute_step(const Step<BITS, R, U>& s, float (&acc)[R], const XStages& xs, int base,
                                             int lane, int chunks, int zero_point = 0) {
    static_assert(OFF != OFFSETS_ZERO_POINT || BITS == 4, "a zero point goes with int4 codes");
    // Branch-free, so that the shared-memory reads of every chunk can be issued ahead of the products: a chunk past
    // the row reads chunk 0's activations (finite) and multiplies them by the zero codes and scales load_step gave it.
    const bool whole = base + 32 * U <= chunks;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int ch = whole || base + u * 32 + lane < chunks ? base + u * 32 + lane : 0;
        const int blk = BITS == 4 ? ch : ch / 2;
        const int word0 = BITS == 4 ? 8 * ch : 4 * ch;  // q words: 8 per block of 32
        const float a1 = xs.s1[blk];
        const float xsum = OFF == OFFSETS_PER_GROUP ? xs.bsum[blk] : 0.f;
        if (BITS == 4) {
            constexpr bool two = stages_of<BITS>() == 2;
            const float a2 = two ? xs.s2[blk] : 0.f;
            const int start1 = OFF == OFFSETS_ZERO_POINT ? -zero_point * xs.qsum1[blk] : 0;
            const int start2 = OFF == OFFSETS_ZERO_POINT && two ? -zero_point * xs.qsum2[blk] : 0;
            const uint4 e1a = *reinterpret_cast<const uint4*>(xs.q1 + word0);
            const uint4 e1b = *reinterpret_cast<const uint4*>(xs.q1 + word0 + 4);
            uint4 e2a = make_uint4(0, 0, 0, 0), e2b = make_uint4(0, 0, 0, 0);
            if (two) {
                e2a = *reinterpret_cast<const uint4*>(xs.q2 + word0);
                e2b = *reinterpret_cast<const uint4*>(xs.q2 + word0 + 4);
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                const uint32_t c[4] = {s.w[r][u].x, s.w[r][u].y, s.w[r][u].z, s.w[r][u].w};
                const uint32_t e1[8] = {e1a.x, e1a.y, e1a.z, e1a.w, e1b.x, e1b.y, e1b.z, e1b.w};
                const uint32_t e2[8] = {e2a.x, e2a.y, e2a.z, e2a.w, e2b.x, e2b.y, e2b.z, e2b.w};
                int i1 = start1, i2 = start2;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int lo = (int)(c[j] & 0x0F0F0F0Fu), hi = (int)((c[j] >> 4) & 0x0F0F0F0Fu);
                    i1 = __dp4a(lo, (int)e1[2 * j], i1);
                    i1 = __dp4a(hi, (int)e1[2 * j + 1], i1);
                    if (two) {
                        i2 = __dp4a(lo, (int)e2[2 * j], i2);
                        i2 = __dp4a(hi, (int)e2[2 * j + 1], i2);
                    }
                }
                acc[r] = two ? fmaf(s.scale[r][u], fmaf(a1, (float)i1, a2 * (float)i2), acc[r])
                             : fmaf(s.scale[r][u] * a1, (float)i1, acc[r]);
                if (OFF == OFFSETS_PER_GROUP) acc[r] = fmaf(s.offset[r][u], xsum, acc[r]);
            }
        } else {
            const float a2 = xs.s2[blk];
            const uint4 e1 = *reinterpret_cast<const uint4*>(xs.q1 + word0);
            const uint4 e2 = *reinterpret_cast<const uint4*>(xs.q2 + word0);
#pragma unroll
            for (int r = 0; r < R; r++) {
                int i1 = 0, i2 = 0;
                i1 = __dp4a((int)s.w[r][u].x, (int)e1.x, i1);
                i1 = __dp4a((int)s.w[r][u].y, (int)e1.y, i1);
                i1 = __dp4a((int)s.w[r][u].z, (int)e1.z, i1);
                i1 = __dp4a((int)s.w[r][u].w, (int)e1.w, i1);
                i2 = __dp4a((int)s.w[r][u].x, (int)e2.x, i2);
                i2 = __dp4a((int)s.w[r][u].y, (int)e2.y, i2);
                i2 = __dp4a((int)s.w[r][u].z, (int)e2.z, i2);
                i2 = __dp4a((int)s.w[r][u].w, (int)e2.w, i2);
                acc[r] = fmaf(s.scale[r][u], fmaf(a1, (float)i1, a2 * (float)i2), acc[r]);
                if (OFF == OFFSETS_PER_GROUP) acc[r] = fmaf(s.offset[r][u], xsum, acc[r]);
            }
        }
    }
}

// Programmatic dependent launch (Hopper): wait until the kernel before this one has finished (its results visible),
// then let the next kernel launch. Anything issued before the wait must not depend on the previous kernel.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Shared memory for k quantized activations: q1, q2 (k bytes each), then s1, s2 and the block sums (k / 32 floats
// each), then the codes' sums qsum1, qsum2 (k / 32 ints each).
__host__ __device__ __forceinline__ size_t activation_smem_bytes(int k) {
    return 2 * (size_t)k + 5 * sizeof(float) * (size_t)(k / ABLOCK);
}

// Launch `kernel` on `stream` with `threads` threads per block, `smem` bytes of dynamic shared memory (raising the
// kernel's limit beyond 48 KB when needed) and, when `pdl`, the programmatic-stream-serialization attribute.
// Returns the CUDA error code (0: launched).
template <typename Kernel, typename... Args>
static int launch_kernel(Kernel kernel, int grid, int threads, size_t smem, int pdl, cudaStream_t stream,
                         Args... args) {
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = pdl ? 1 : 0;
    return (int)cudaLaunchKernelEx(&config, kernel, args...);
}

// A warp's R partial sums, each summed over its 32 lanes (every lane gets the totals).
template <int R>
__device__ __forceinline__ void warp_sum(float (&acc)[R]) {
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    }
}

// A warp's walk over its work items (row groups, or pairs of rows) first, first + stride, ..., each cut into
// steps_per_item pipeline steps of 32 U chunks per lane: the next step is loaded (load(step, item, base)) while this
// one is multiplied (multiply(step, base)), and finish(item) follows an item's last step. `cur` holds the first step,
// loaded by the caller (before or after its PDL wait, as its inputs allow).
template <int U, typename S, typename Load, typename Multiply, typename Finish>
__device__ __forceinline__ void walk_steps(S& cur, int steps, int first, int stride, int steps_per_item, Load load,
                                           Multiply multiply, Finish finish) {
    int item = first, part = 0;  // step t's item and its index within the item, counted (no divisions)
    for (int t = 0; t < steps; t++) {
        const bool last = part == steps_per_item - 1;
        const int next_item = last ? item + stride : item, next_part = last ? 0 : part + 1;
        S next;
        if (t + 1 < steps) load(next, next_item, next_part * 32 * U);
        multiply(cur, part * 32 * U);
        if (last) finish(item);
        if (t + 1 < steps) cur = next;
        item = next_item;
        part = next_part;
    }
}
