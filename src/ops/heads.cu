// Between a projection's GEMM layout (B*T, n*hd) and the attention layout (B, n, S, hd),
// S = slots + T, bf16, with the rotate-half rotary embedding folded in (cos, sin: (T, hd/2)):
//   split: y[i] = x[i] cos - x[i+h] sin,  y[i+h] = x[i+h] cos + x[i] sin   (h = hd/2),
//          and row 0 of each head is the slot (n, hd) when slots = 1;
//   merge: the inverse rotation (sin -> -sin) of rows slots..S, back to (B*T, n*hd).
// One thread per two rotation pairs (four elements, as two bf16x2); hd % 4 == 0. Thread r-major
// order follows the GEMM layout, so reads (split) and writes (merge) there are linear.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

__device__ __forceinline__ void rotate(float2 &a, float2 &b, float2 c, float2 s) {
    float2 ra = make_float2(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y);
    float2 rb = make_float2(b.x * c.x + a.x * s.x, b.y * c.y + a.y * s.y);
    a = ra;
    b = rb;
}

// The two bf16x2 of pair j of one head row (elements 2j, 2j+1 and their rotate-half partners
// hd/2 on), rotated by position ti's angles (rope: 0 none, 1 forward, -1 inverse).
__device__ __forceinline__ void load_pair(const bf16 *row, int j, int q, const bf16 *cos_t,
                                          const bf16 *sin_t, int ti, int rope, float2 &a,
                                          float2 &b) {
    const bf162 *src = reinterpret_cast<const bf162 *>(row);
    a = __bfloat1622float2(src[j]);
    b = __bfloat1622float2(src[j + q]);
    if (rope) {
        const long long at = (long long)ti * (2 * q);
        float2 c = __bfloat1622float2(reinterpret_cast<const bf162 *>(cos_t + at)[j]);
        float2 s = __bfloat1622float2(reinterpret_cast<const bf162 *>(sin_t + at)[j]);
        if (rope < 0) s = make_float2(-s.x, -s.y);
        rotate(a, b, c, s);
    }
}

__device__ __forceinline__ void store_pair(bf16 *row, int j, int q, float2 a, float2 b) {
    bf162 *dst = reinterpret_cast<bf162 *>(row);
    dst[j] = __float22bfloat162_rn(a);
    dst[j + q] = __float22bfloat162_rn(b);
}

extern "C" __global__ void eab_heads_split_bf16(const bf16 *__restrict__ x,
                                                const bf16 *__restrict__ cos_t,
                                                const bf16 *__restrict__ sin_t,
                                                const bf16 *__restrict__ slot, bf16 *__restrict__ y,
                                                int b, int t, int n, int hd, int slots, int rope) {
    const int q = hd / 4;
    const int s_len = slots + t;
    const long long main = (long long)b * t * n * q;
    const long long extra = slots ? (long long)b * n * (hd / 2) : 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < main + extra;
         i += (long long)gridDim.x * blockDim.x) {
        if (i >= main) {  // slot rows: bf16x2 j of head `head` in batch `bi`
            long long k = i - main;
            int j = k % (hd / 2);
            long long r = k / (hd / 2);
            int head = r % n, bi = r / n;
            const bf162 *src = reinterpret_cast<const bf162 *>(slot + (long long)head * hd);
            bf162 *dst = reinterpret_cast<bf162 *>(y + ((long long)bi * n + head) * s_len * hd);
            dst[j] = src[j];
            continue;
        }
        int j = i % q;                // pair index / 2 within the half head
        long long r = i / q;          // ((bi * t) + ti) * n + head: the input row of one head
        int head = r % n;
        long long bt = r / n;
        int ti = bt % t, bi = bt / t;
        float2 a, c2;
        load_pair(x + r * hd, j, q, cos_t, sin_t, ti, rope, a, c2);
        store_pair(y + (((long long)bi * n + head) * s_len + slots + ti) * hd, j, q, a, c2);
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
        load_pair(g + (((long long)bi * n + head) * s_len + slots + ti) * hd, j, q, cos_t, sin_t,
                  ti, rope, a, c2);
        store_pair(y + r * hd, j, q, a, c2);
    }
}
