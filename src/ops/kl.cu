// KL(teacher || student) of one row of logits, and its gradient, for bf16 logits (f32
// arithmetic): one block per row of V logits. With a = s / tau, b = t / tau,
//   log p_s = a - lse(a),  log p_t = b - lse(b),
//   kl[row] = sum_j p_t (log p_t - log p_s),   dlogits[row, j] = scale (p_s - p_t).
// Two passes over the row: running max and sum of exponentials for both, then the sums and
// the gradient.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#include "lse.cuh"

extern "C" __global__ void eab_kl_rows_bf16(const bf16 *__restrict__ s,
                                            const bf16 *__restrict__ t,
                                            float *__restrict__ kl, bf16 *__restrict__ dlogits,
                                            int v, float inv_tau, float scale) {
    __shared__ float red[4][32];
    const long long row = blockIdx.x;
    const bf16 *sr = s + row * v, *tr = t + row * v;
    float ms = -INFINITY, ls = 0.f, mt = -INFINITY, lt = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float a = __bfloat162float(sr[j]) * inv_tau, b = __bfloat162float(tr[j]) * inv_tau;
        if (a > ms) { ls = ls * __expf(ms - a) + 1.f; ms = a; } else { ls += __expf(a - ms); }
        if (b > mt) { lt = lt * __expf(mt - b) + 1.f; mt = b; } else { lt += __expf(b - mt); }
    }
    for (int off = 16; off > 0; off >>= 1) {
        lse_merge(ms, ls, __shfl_xor_sync(0xffffffff, ms, off), __shfl_xor_sync(0xffffffff, ls, off));
        lse_merge(mt, lt, __shfl_xor_sync(0xffffffff, mt, off), __shfl_xor_sync(0xffffffff, lt, off));
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) { red[0][warp] = ms; red[1][warp] = ls; red[2][warp] = mt; red[3][warp] = lt; }
    __syncthreads();
    ms = -INFINITY; ls = 0.f; mt = -INFINITY; lt = 0.f;
    for (int w = 0; w < nw; w++) {
        lse_merge(ms, ls, red[0][w], red[1][w]);
        lse_merge(mt, lt, red[2][w], red[3][w]);
    }
    const float lse_s = ms + __logf(ls), lse_t = mt + __logf(lt);
    float acc = 0.f;
    bf16 *dr = dlogits ? dlogits + row * v : nullptr;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float lps = __bfloat162float(sr[j]) * inv_tau - lse_s;
        float lpt = __bfloat162float(tr[j]) * inv_tau - lse_t;
        float pt = __expf(lpt);
        acc += pt * (lpt - lps);
        if (dr) dr[j] = __float2bfloat16(scale * (__expf(lps) - pt));
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    __syncthreads();
    if (lane == 0) red[0][warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < nw; w++) total += red[0][w];
        kl[row] = total;
    }
}
