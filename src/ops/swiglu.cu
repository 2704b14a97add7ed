// SwiGLU a = silu(g) * u for bf16, f32 arithmetic, two elements per thread (n even):
//   s = sigmoid(g),  du = dy silu(g),  dg = dy u s (1 + g (1 - s)).

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void eab_swiglu_fwd_bf16(const bf16 *__restrict__ g,
                                               const bf16 *__restrict__ u,
                                               bf16 *__restrict__ a, long long n) {
    const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(g);
    const __nv_bfloat162 *u2 = reinterpret_cast<const __nv_bfloat162 *>(u);
    __nv_bfloat162 *a2 = reinterpret_cast<__nv_bfloat162 *>(a);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n / 2;
         i += (long long)gridDim.x * blockDim.x) {
        float2 gv = __bfloat1622float2(g2[i]), uv = __bfloat1622float2(u2[i]);
        a2[i] = __floats2bfloat162_rn(gv.x / (1.f + __expf(-gv.x)) * uv.x,
                                      gv.y / (1.f + __expf(-gv.y)) * uv.y);
    }
}

extern "C" __global__ void eab_swiglu_bwd_bf16(const bf16 *__restrict__ g,
                                               const bf16 *__restrict__ u,
                                               const bf16 *__restrict__ dy,
                                               bf16 *__restrict__ dg, bf16 *__restrict__ du,
                                               long long n) {
    const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(g);
    const __nv_bfloat162 *u2 = reinterpret_cast<const __nv_bfloat162 *>(u);
    const __nv_bfloat162 *d2 = reinterpret_cast<const __nv_bfloat162 *>(dy);
    __nv_bfloat162 *dg2 = reinterpret_cast<__nv_bfloat162 *>(dg);
    __nv_bfloat162 *du2 = reinterpret_cast<__nv_bfloat162 *>(du);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n / 2;
         i += (long long)gridDim.x * blockDim.x) {
        float2 gv = __bfloat1622float2(g2[i]), uv = __bfloat1622float2(u2[i]),
               dv = __bfloat1622float2(d2[i]);
        float s0 = 1.f / (1.f + __expf(-gv.x)), s1 = 1.f / (1.f + __expf(-gv.y));
        du2[i] = __floats2bfloat162_rn(dv.x * gv.x * s0, dv.y * gv.y * s1);
        dg2[i] = __floats2bfloat162_rn(dv.x * uv.x * s0 * (1.f + gv.x * (1.f - s0)),
                                       dv.y * uv.y * s1 * (1.f + gv.y * (1.f - s1)));
    }
}
