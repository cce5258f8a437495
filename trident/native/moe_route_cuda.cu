// An MoE layer's router for ONE token in one launch: the logits hidden . W^T (W [E, H] of the model's dtype), then
// the arithmetic of trident/kernels/moe_route.py (scores by softmax or sigmoid, plus the score-correction bias for
// the choice, top-k with ties to the lower expert id, renormalisation, scaling) and the load statistics' atomic
// adds. At batch 1 the router took two launches (a cuBLAS matrix-vector product of 0.5 MB, ~4.9 us on an H200, then
// the routing kernel, ~3.8 us), most of it fixed costs.
//
//  * The grid is E / 8 blocks of 8 warps, a warp per expert: each lane requests its share of the expert's weight row
//    (16 bytes at a time) before the PDL wait (the weights do not depend on the kernel before), then reads x, and
//    the warp's float32 dot product (rounded to the model's dtype unless the router runs in float32, as F.linear
//    rounds) goes to logits [E] in global memory.
//  * The last block to finish (a ticket counter: atomic add after a memory fence) routes: warp 0 holds the E logits
//    (up to 8 per lane), computes the scores, picks the k experts by k rounds of a warp arg-max, writes weights, ids
//    and scores, adds the statistics, and sets the ticket back to 0 for the next call (the next kernel waits for
//    this one to finish, so no call sees another's ticket).
//
// Requirements (checked by trident/native/moe_route_cuda.py): E <= 256, k <= 32, H a multiple of 8, everything
// contiguous and 16-byte aligned; no group-limited routing.

#include "dp4a_common.cuh"

#define ROUTE_WARPS 8
#define ROUTE_PREFETCH 8     // 16-byte chunks of its weight row a lane requests before the wait
#define ROUTE_MAX_LANE_E 8   // experts per lane in the routing warp (E <= 256)

struct RouteArgs {
    float* logits;         // [E] scratch
    float* scores;         // [E]
    float* weights;        // [k]
    int64_t* ids;          // [k]
    int64_t* counts;       // [E] or null (no statistics)
    float* prob_sums;      // [E]
    const float* row_mask; // [1]
    const float* bias;     // [E] float32 or null
    unsigned int* ticket;  // [1], 0 between calls
    int num_experts, hidden, top_k, sigmoid, renormalize;
    float eps, scaling;
};

__device__ __forceinline__ void warp_argmax(float& value, int& id, float& score) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, value, off);
        const int i = __shfl_xor_sync(0xffffffffu, id, off);
        const float s = __shfl_xor_sync(0xffffffffu, score, off);
        if (v > value || (v == value && i < id)) {
            value = v;
            id = i;
            score = s;
        }
    }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

__device__ __forceinline__ float warp_total(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// acc + the dot product of 8 elements of w and x (16 bytes each).
template <typename T>
__device__ __forceinline__ float dot8(uint4 wc, uint4 xc, float acc) {
    const T* we = reinterpret_cast<const T*>(&wc);
    const T* xe = reinterpret_cast<const T*>(&xc);
#pragma unroll
    for (int j = 0; j < 8; j++) acc = fmaf(to_float(we[j]), to_float(xe[j]), acc);
    return acc;
}

// Warp 0 of the last block: scores, top-k, weights, statistics (as moe_route.py's _route_kernel).
__device__ void route_one_token(const RouteArgs& a, int lane) {
    const int e_count = a.num_experts;
    float logit[ROUTE_MAX_LANE_E], score[ROUTE_MAX_LANE_E], choice[ROUTE_MAX_LANE_E];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
        const int e = lane + 32 * i;
        logit[i] = e < e_count ? __ldcg(a.logits + e) : -INFINITY;  // written by other blocks: skip L1
        m = fmaxf(m, logit[i]);
    }
    float total = 0.f;
    if (a.sigmoid) {
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
            score[i] = lane + 32 * i < e_count ? 1.f / (1.f + expf(-logit[i])) : 0.f;
            total += score[i];
        }
        total = warp_total(total);
    } else {
        m = warp_max(m);
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
            score[i] = lane + 32 * i < e_count ? expf(logit[i] - m) : 0.f;
            total += score[i];
        }
        total = warp_total(total);
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_LANE_E; i++) score[i] = score[i] / total;
    }
#pragma unroll
    for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
        const int e = lane + 32 * i;
        if (e < e_count) {
            a.scores[e] = score[i];
            choice[i] = a.bias != nullptr ? score[i] + a.bias[e] : score[i];
        } else {
            choice[i] = -INFINITY;
        }
    }
    int my_id = 0;
    float my_score = 0.f;
    for (int j = 0; j < a.top_k; j++) {
        float best = -INFINITY, best_score = 0.f;
        int best_id = 1 << 30;
#pragma unroll
        // this lane's best (its ids ascend with i: the strict > keeps ties at the lower id)
        for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
            if (choice[i] > best) {
                best = choice[i];
                best_id = lane + 32 * i;
                best_score = score[i];
            }
        }
        warp_argmax(best, best_id, best_score);
        if (lane == j) {
            my_id = best_id;
            my_score = best_score;
        }
        if ((best_id & 31) == lane) {
#pragma unroll
            for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
                if (lane + 32 * i == best_id) choice[i] = -INFINITY;
            }
        }
    }
    float w = lane < a.top_k ? my_score : 0.f;
    if (a.renormalize) w = w / (warp_total(w) + a.eps);
    w *= a.scaling;
    if (lane < a.top_k) {
        a.weights[lane] = w;
        a.ids[lane] = my_id;
    }
    if (a.counts != nullptr && a.row_mask[0] > 0.f) {
        if (lane < a.top_k) atomicAdd(reinterpret_cast<unsigned long long*>(a.counts + my_id), 1ull);
#pragma unroll
        for (int i = 0; i < ROUTE_MAX_LANE_E; i++) {
            const int e = lane + 32 * i;
            if (e < e_count) atomicAdd(a.prob_sums + e, a.sigmoid ? score[i] / total : score[i]);
        }
    }
}

template <typename T, bool ROUND_LOGITS>
__global__ void __launch_bounds__(ROUTE_WARPS * 32) moe_route_kernel(const T* __restrict__ x,
                                                                     const T* __restrict__ w, RouteArgs a) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = min(blockIdx.x * ROUTE_WARPS + warp, a.num_experts - 1);  // a missing expert repeats the last
    const int chunks = a.hidden / 8;
    const uint4* row = reinterpret_cast<const uint4*>(w + (size_t)e * a.hidden);
    uint4 pre[ROUTE_PREFETCH];
#pragma unroll
    for (int i = 0; i < ROUTE_PREFETCH; i++) {
        const int c = lane + 32 * i;
        pre[i] = c < chunks ? __ldcs(row + c) : make_uint4(0, 0, 0, 0);
    }
    wait_for_previous_grid();  // x comes from the kernel before
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    uint4 xs[ROUTE_PREFETCH];
#pragma unroll
    for (int i = 0; i < ROUTE_PREFETCH; i++) {  // all of x's loads in flight at once (indices fixed: registers)
        const int c = lane + 32 * i;
        xs[i] = c < chunks ? __ldg(xv + c) : make_uint4(0, 0, 0, 0);
    }
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < ROUTE_PREFETCH; i++) acc = dot8<T>(pre[i], xs[i], acc);
    for (int c = lane + 32 * ROUTE_PREFETCH; c < chunks; c += 32) acc = dot8<T>(__ldcs(row + c), __ldg(xv + c), acc);
    acc = warp_total(acc);
    if (ROUND_LOGITS) acc = to_float(from_float<T>(acc));
    if (lane == 0 && blockIdx.x * ROUTE_WARPS + warp < a.num_experts) a.logits[e] = acc;

    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // this block's logits are visible before its ticket is
        last = atomicAdd(a.ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last || warp != 0) return;
    __threadfence();
    route_one_token(a, lane);
    if (lane == 0) *a.ticket = 0u;
}

template <typename T>
static int route(const void* x, const void* w, const RouteArgs& a, int round_logits, int pdl, cudaStream_t stream) {
    const int grid = (a.num_experts + ROUTE_WARPS - 1) / ROUTE_WARPS;
    const T* xt = reinterpret_cast<const T*>(x);
    const T* wt = reinterpret_cast<const T*>(w);
    const int threads = ROUTE_WARPS * 32;
    if (round_logits) return launch_kernel(moe_route_kernel<T, true>, grid, threads, 0, pdl, stream, xt, wt, a);
    return launch_kernel(moe_route_kernel<T, false>, grid, threads, 0, pdl, stream, xt, wt, a);
}

extern "C" {

int tq_moe_route_max_experts(void) { return 32 * ROUTE_MAX_LANE_E; }

// One token's routing (see the header comment): dtype 0 bfloat16, 1 float16 (x, w); round_logits 1 rounds each
// logit to that dtype (F.linear in the model's dtype), 0 keeps float32. counts null: no statistics (prob_sums and
// row_mask then unused); bias null: none. Returns the launch's CUDA error code.
int tq_moe_route(int dtype, const void* x, const void* w, const float* bias, float* logits, float* scores,
                 float* weights, int64_t* ids, int64_t* counts, float* prob_sums, const float* row_mask,
                 unsigned int* ticket, int num_experts, int hidden, int top_k, int sigmoid, int renormalize,
                 float eps, float scaling, int round_logits, int pdl, void* stream) {
    if (num_experts < 1 || num_experts > 32 * ROUTE_MAX_LANE_E || top_k < 1 || top_k > 32 || top_k > num_experts) {
        return (int)cudaErrorInvalidValue;
    }
    RouteArgs a = {logits, scores, weights, ids, counts, prob_sums, row_mask, bias, ticket,
                   num_experts, hidden, top_k, sigmoid, renormalize, eps, scaling};
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == 0) return route<__nv_bfloat16>(x, w, a, round_logits, pdl, s);
    return route<__half>(x, w, a, round_logits, pdl, s);
}

}  // extern "C"
