// Running log-sum-exp pairs (m, l), l the sum of exp(x - m), shared by the per-row loss
// kernels through the LM head (ce.cu, kl.cu).
#pragma once

// Merge (m2, l2) into (m, l).
__device__ __forceinline__ void lse_merge(float &m, float &l, float m2, float l2) {
    float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;
    l = l * __expf(m - mx) + l2 * __expf(m2 - mx);
    m = mx;
}
