// RMSNorm backward for bf16 rows, f32 arithmetic: one block per row of d elements (d even),
//   r = 1 / sqrt(mean(x^2) + eps),  g = dy * w,  dx = r g - x r^3 mean(g x).
// The forward is candle's fused kernel; nothing but x is kept for this.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n ? scratch[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    return v;
}

extern "C" __global__ void eab_rmsnorm_bwd_bf16(const bf16 *__restrict__ x,
                                                const bf16 *__restrict__ w,
                                                const bf16 *__restrict__ dy,
                                                bf16 *__restrict__ dx, int d, float eps) {
    __shared__ float scratch[2][32];
    const long long row = blockIdx.x;
    const __nv_bfloat162 *xr = reinterpret_cast<const __nv_bfloat162 *>(x + row * d);
    const __nv_bfloat162 *dr = reinterpret_cast<const __nv_bfloat162 *>(dy + row * d);
    const __nv_bfloat162 *wr = reinterpret_cast<const __nv_bfloat162 *>(w);
    __nv_bfloat162 *out = reinterpret_cast<__nv_bfloat162 *>(dx + row * d);
    const int half = d / 2;
    float sxx = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float2 xv = __bfloat1622float2(xr[i]), dv = __bfloat1622float2(dr[i]),
               wv = __bfloat1622float2(wr[i]);
        sxx += xv.x * xv.x + xv.y * xv.y;
        sgx += dv.x * wv.x * xv.x + dv.y * wv.y * xv.y;
    }
    sxx = block_sum(sxx, scratch[0]);
    sgx = block_sum(sgx, scratch[1]);
    const float r = rsqrtf(sxx / d + eps);
    const float c = r * r * r * sgx / d;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float2 xv = __bfloat1622float2(xr[i]), dv = __bfloat1622float2(dr[i]),
               wv = __bfloat1622float2(wr[i]);
        out[i] = __floats2bfloat162_rn(r * dv.x * wv.x - xv.x * c, r * dv.y * wv.y - xv.y * c);
    }
}

// dw of RMSNorm, sum over rows of dy * x * rinv(row), for bf16 x and dy into an f32 dw that
// starts at zero: a block takes DW_ROWS rows, finds their rinv (one warp a row), then each
// thread sums its columns over those rows and adds the partial sum to dw atomically.
#define DW_ROWS 32
extern "C" __global__ void eab_rmsnorm_dw_bf16(const bf16 *__restrict__ x,
                                               const bf16 *__restrict__ dy,
                                               float *__restrict__ dw, long long rows, int d,
                                               float eps) {
    __shared__ float rinv[DW_ROWS];
    const long long r0 = (long long)blockIdx.x * DW_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int i = warp; i < DW_ROWS; i += nw) {
        float ss = 0.f;
        if (r0 + i < rows) {
            const bf16 *xr = x + (r0 + i) * d;
            for (int c = lane; c < d; c += 32) {
                float v = __bfloat162float(xr[c]);
                ss += v * v;
            }
        }
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
        if (lane == 0) rinv[i] = rsqrtf(ss / d + eps);
    }
    __syncthreads();
    const int n = (int)min((long long)DW_ROWS, rows - r0);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int i = 0; i < n; i++) {
            const long long at = (r0 + i) * d + c;
            acc += __bfloat162float(dy[at]) * __bfloat162float(x[at]) * rinv[i];
        }
        atomicAdd(dw + c, acc);
    }
}
