// Between a projection's GEMM layout (B*T, n*hd) and the attention layout (B, n, S, hd),
// S = slots + T, bf16, with the rotate-half rotary embedding folded in (cos, sin: (T, hd/2)):
//   split: y[i] = x[i] cos - x[i+h] sin,  y[i+h] = x[i+h] cos + x[i] sin   (h = hd/2),
//          and row 0 of each head is the slot (n, hd) when slots = 1;
//   merge: the inverse rotation (sin -> -sin) of rows slots..S, back to (B*T, n*hd).
// Before the rotation split adds a bias (n*hd) when has_bias, and its _norm form RMS-normalises
// each head's row, x * w / sqrt(mean(x^2) + eps) (w: (hd)); merge's _norm form then runs that
// norm's backward from the pre-norm rows u (B*T, n*hd):
//   dx = r (dy w - u r^2 mean(dy w u)),  r = 1 / sqrt(mean(u^2) + eps).
// One thread per two rotation pairs (four elements, as two bf16x2); hd % 4 == 0. Thread r-major
// order follows the GEMM layout, so reads (split) and writes (merge) there are linear. The _norm
// forms give each head row one warp, which reduces over it with shuffles.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

__device__ __forceinline__ void rotate(float2 &a, float2 &b, float2 c, float2 s) {
    float2 ra = make_float2(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y);
    float2 rb = make_float2(b.x * c.x + a.x * s.x, b.y * c.y + a.y * s.y);
    a = ra;
    b = rb;
}

// The two bf16x2 of pair j of one head row: elements 2j, 2j+1 and their rotate-half partners
// hd/2 on, plus those of `bias_row` when given.
__device__ __forceinline__ void load_raw(const bf16 *row, const bf16 *bias_row, int j, int q,
                                         float2 &a, float2 &b) {
    const bf162 *src = reinterpret_cast<const bf162 *>(row);
    a = __bfloat1622float2(src[j]);
    b = __bfloat1622float2(src[j + q]);
    if (bias_row) {
        const bf162 *bs = reinterpret_cast<const bf162 *>(bias_row);
        float2 ba = __bfloat1622float2(bs[j]), bb = __bfloat1622float2(bs[j + q]);
        a = make_float2(a.x + ba.x, a.y + ba.y);
        b = make_float2(b.x + bb.x, b.y + bb.y);
    }
}

// Rotates pair j by position ti's angles (rope: 0 none, 1 forward, -1 inverse).
__device__ __forceinline__ void rope_pair(int j, int q, const bf16 *cos_t, const bf16 *sin_t,
                                          int ti, int rope, float2 &a, float2 &b) {
    if (!rope) return;
    const long long at = (long long)ti * (2 * q);
    float2 c = __bfloat1622float2(reinterpret_cast<const bf162 *>(cos_t + at)[j]);
    float2 s = __bfloat1622float2(reinterpret_cast<const bf162 *>(sin_t + at)[j]);
    if (rope < 0) s = make_float2(-s.x, -s.y);
    rotate(a, b, c, s);
}

__device__ __forceinline__ void store_pair(bf16 *row, int j, int q, float2 a, float2 b) {
    bf162 *dst = reinterpret_cast<bf162 *>(row);
    dst[j] = __float22bfloat162_rn(a);
    dst[j + q] = __float22bfloat162_rn(b);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Slot element pairs k of `extra` = b * n * hd/2: bf16x2 j of head `head` in batch `bi`.
__device__ __forceinline__ void copy_slot(const bf16 *slot, bf16 *y, long long k, int n, int hd,
                                          int s_len) {
    int j = k % (hd / 2);
    long long r = k / (hd / 2);
    int head = r % n, bi = r / n;
    const bf162 *src = reinterpret_cast<const bf162 *>(slot + (long long)head * hd);
    bf162 *dst = reinterpret_cast<bf162 *>(y + ((long long)bi * n + head) * s_len * hd);
    dst[j] = src[j];
}

extern "C" __global__ void eab_heads_split_bf16(const bf16 *__restrict__ x,
                                                const bf16 *__restrict__ cos_t,
                                                const bf16 *__restrict__ sin_t,
                                                const bf16 *__restrict__ slot,
                                                const bf16 *__restrict__ bias, bf16 *__restrict__ y,
                                                int b, int t, int n, int hd, int slots, int rope,
                                                int has_bias) {
    const int q = hd / 4;
    const int s_len = slots + t;
    const long long main = (long long)b * t * n * q;
    const long long extra = slots ? (long long)b * n * (hd / 2) : 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < main + extra;
         i += (long long)gridDim.x * blockDim.x) {
        if (i >= main) {
            copy_slot(slot, y, i - main, n, hd, s_len);
            continue;
        }
        int j = i % q;                // pair index / 2 within the half head
        long long r = i / q;          // ((bi * t) + ti) * n + head: the input row of one head
        int head = r % n;
        long long bt = r / n;
        int ti = bt % t, bi = bt / t;
        float2 a, c2;
        load_raw(x + r * hd, has_bias ? bias + (long long)head * hd : nullptr, j, q, a, c2);
        rope_pair(j, q, cos_t, sin_t, ti, rope, a, c2);
        store_pair(y + (((long long)bi * n + head) * s_len + slots + ti) * hd, j, q, a, c2);
    }
}

extern "C" __global__ void eab_heads_split_norm_bf16(
    const bf16 *__restrict__ x, const bf16 *__restrict__ cos_t, const bf16 *__restrict__ sin_t,
    const bf16 *__restrict__ slot, const bf16 *__restrict__ bias, const bf16 *__restrict__ w,
    bf16 *__restrict__ y, int b, int t, int n, int hd, int slots, int rope, int has_bias,
    float eps) {
    const int q = hd / 4;
    const int s_len = slots + t;
    const long long rows = (long long)b * t * n;
    const long long extra = slots ? (long long)b * n * (hd / 2) : 0;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = tid; k < extra; k += stride) copy_slot(slot, y, k, n, hd, s_len);
    const int lane = threadIdx.x & 31;
    // Whole warps stride over the rows, so every lane of a warp takes part in its shuffles.
    for (long long r = tid >> 5; r < rows; r += stride >> 5) {
        int head = r % n;
        long long bt = r / n;
        int ti = bt % t, bi = bt / t;
        const bf16 *brow = has_bias ? bias + (long long)head * hd : nullptr;
        float ss = 0.f;
        for (int j = lane; j < q; j += 32) {
            float2 a, c2;
            load_raw(x + r * hd, brow, j, q, a, c2);
            ss += a.x * a.x + a.y * a.y + c2.x * c2.x + c2.y * c2.y;
        }
        const float inv = rsqrtf(warp_sum(ss) / hd + eps);
        bf16 *out = y + (((long long)bi * n + head) * s_len + slots + ti) * hd;
        for (int j = lane; j < q; j += 32) {
            float2 a, c2, wa, wb;
            load_raw(x + r * hd, brow, j, q, a, c2);
            load_raw(w, nullptr, j, q, wa, wb);
            a = make_float2(a.x * inv * wa.x, a.y * inv * wa.y);
            c2 = make_float2(c2.x * inv * wb.x, c2.y * inv * wb.y);
            rope_pair(j, q, cos_t, sin_t, ti, rope, a, c2);
            store_pair(out, j, q, a, c2);
        }
    }
}

extern "C" __global__ void eab_heads_merge_bf16(const bf16 *__restrict__ g,
                                                const bf16 *__restrict__ cos_t,
                                                const bf16 *__restrict__ sin_t,
                                                bf16 *__restrict__ y, int b, int t, int n, int hd,
                                                int slots, int rope) {
    const int q = hd / 4;
    const int s_len = slots + t;
    const long long main = (long long)b * t * n * q;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < main;
         i += (long long)gridDim.x * blockDim.x) {
        int j = i % q;
        long long r = i / q;  // output row of one head: ((bi * t) + ti) * n + head
        int head = r % n;
        long long bt = r / n;
        int ti = bt % t, bi = bt / t;
        float2 a, c2;
        load_raw(g + (((long long)bi * n + head) * s_len + slots + ti) * hd, nullptr, j, q, a,
                 c2);
        rope_pair(j, q, cos_t, sin_t, ti, rope, a, c2);
        store_pair(y + r * hd, j, q, a, c2);
    }
}

extern "C" __global__ void eab_heads_merge_norm_bf16(
    const bf16 *__restrict__ g, const bf16 *__restrict__ cos_t, const bf16 *__restrict__ sin_t,
    const bf16 *__restrict__ u, const bf16 *__restrict__ w, bf16 *__restrict__ y, int b, int t,
    int n, int hd, int slots, int rope, float eps) {
    const int q = hd / 4;
    const int s_len = slots + t;
    const long long rows = (long long)b * t * n;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;
    for (long long r = tid >> 5; r < rows; r += stride >> 5) {
        int head = r % n;
        long long bt = r / n;
        int ti = bt % t, bi = bt / t;
        const bf16 *grow = g + (((long long)bi * n + head) * s_len + slots + ti) * hd;
        const bf16 *urow = u + r * hd;
        float ss = 0.f, dot = 0.f;
        for (int j = lane; j < q; j += 32) {
            float2 ga, gb, ua, ub, wa, wb;
            load_raw(grow, nullptr, j, q, ga, gb);
            rope_pair(j, q, cos_t, sin_t, ti, rope, ga, gb);
            load_raw(urow, nullptr, j, q, ua, ub);
            load_raw(w, nullptr, j, q, wa, wb);
            ss += ua.x * ua.x + ua.y * ua.y + ub.x * ub.x + ub.y * ub.y;
            dot += ga.x * wa.x * ua.x + ga.y * wa.y * ua.y + gb.x * wb.x * ub.x +
                   gb.y * wb.y * ub.y;
        }
        const float inv = rsqrtf(warp_sum(ss) / hd + eps);
        const float k = inv * inv * warp_sum(dot) / hd;
        for (int j = lane; j < q; j += 32) {
            float2 ga, gb, ua, ub, wa, wb;
            load_raw(grow, nullptr, j, q, ga, gb);
            rope_pair(j, q, cos_t, sin_t, ti, rope, ga, gb);
            load_raw(urow, nullptr, j, q, ua, ub);
            load_raw(w, nullptr, j, q, wa, wb);
            float2 da = make_float2(inv * (ga.x * wa.x - ua.x * k), inv * (ga.y * wa.y - ua.y * k));
            float2 db = make_float2(inv * (gb.x * wb.x - ub.x * k), inv * (gb.y * wb.y - ub.y * k));
            store_pair(y + r * hd, j, q, da, db);
        }
    }
}
