// One AdamW update of an f32 tensor in one pass (the composite takes about ten kernels, each a
// full pass over the parameter): reads p, g, m, v and writes p', m', v' into one buffer
// [p'; m'; v'] of 3n floats. g is f32.
//   m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,
//   p' = p (1 - lr wd) - lr (m' / c1) / (sqrt(v' / c2) + eps).

extern "C" __global__ void eab_adamw_f32(const float *__restrict__ p, const float *__restrict__ g,
                                         const float *__restrict__ m, const float *__restrict__ v,
                                         float *__restrict__ out, long long n, float lr,
                                         float b1, float b2, float c1, float c2, float eps,
                                         float decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        const float update = (mi / c1) / (sqrtf(vi / c2) + eps);
        out[i] = p[i] * (1.f - lr * decay) - lr * update;
        out[n + i] = mi;
        out[2 * n + i] = vi;
    }
}
