// Next-token cross-entropy of one row of bf16 logits (f32 arithmetic), and its gradient: one
// block per row of V logits, two passes over it. With lse the row's log-sum-exp,
//   nll[row] = lse - x[target],   dlogits[row, j] = scale (exp(x_j - lse) - [j == target]).
// The first pass keeps a running max and sum of exponentials; the second writes the gradient.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#include "lse.cuh"

extern "C" __global__ void eab_ce_rows_bf16(const bf16 *__restrict__ x,
                                            const unsigned int *__restrict__ targets,
                                            float *__restrict__ nll, bf16 *__restrict__ dlogits,
                                            int v, float scale) {
    __shared__ float red[2][32];
    const long long row = blockIdx.x;
    const bf16 *xr = x + row * v;
    const unsigned int target = targets[row];
    float m = -INFINITY, l = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float a = __bfloat162float(xr[j]);
        if (a > m) { l = l * __expf(m - a) + 1.f; m = a; } else { l += __expf(a - m); }
    }
    for (int off = 16; off > 0; off >>= 1)
        lse_merge(m, l, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, l, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) { red[0][warp] = m; red[1][warp] = l; }
    __syncthreads();
    m = -INFINITY; l = 0.f;
    for (int w = 0; w < nw; w++) lse_merge(m, l, red[0][w], red[1][w]);
    const float lse = m + __logf(l);
    if (threadIdx.x == 0) nll[row] = lse - __bfloat162float(xr[target]);
    if (!dlogits) return;
    bf16 *dr = dlogits + row * v;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = __expf(__bfloat162float(xr[j]) - lse);
        dr[j] = __float2bfloat16(scale * (p - (j == (int)target ? 1.f : 0.f)));
    }
}
