// The backward of a token embedding lookup: the upstream gradient's rows summed into an f32
// table at their token ids. One thread per element (grid-stride); a token seen many times in
// the batch adds through atomics into one f32 row.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void eab_embed_bwd_bf16(const bf16 *__restrict__ g,
                                              const unsigned int *__restrict__ ids,
                                              float *__restrict__ table, long long n, int d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / d, col = i - row * d;
        atomicAdd(table + (long long)ids[row] * d + col, __bfloat162float(g[i]));
    }
}
