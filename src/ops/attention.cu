// Fused attention over [slots; tokens] keys for bf16 on tensor cores (mma.sync m16n8k16,
// sm_80 and later): the flash-attention-2 schedule, written for eabfit's mask.
//
// Query i (token position p = past + i) sees key kk when kk < slots (the EAB slot), or, for
// token j = kk - slots: j <= p, p - j < window and not (hide_first and j == 0). Keys are
// (B, KV, S, HD) with S = slots + past + T; queries of head h read KV head h / (H / KV).
//
// Forward: one CTA of 4 warps per (64 queries, batch * head); each warp owns 16 query rows,
// keeps its Q fragments in registers and walks 64-key tiles with an online softmax. It writes
// the output (B, T, H, HD) and the row log-sum-exp in base 2, lse2 = m + log2(l), (B, H, T).
//
// Backward: one CTA per (64 keys, batch * KV head); each warp owns 16 keys and accumulates
// their dK and dV over every query of every head of the group (no atomics for them), walking
// query tiles of BR rows: S^T = K Q^T, P^T = exp2(S^T * scale_log2 - lse2), dV += P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and dQ += dS K into an f32 buffer
// with atomics (already multiplied by the softmax scale).
//
// Fragment layouts are the PTX ISA's for m16n8k16 (g = lane / 4, c = lane % 4): A holds
// (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..); B holds (k 2c..2c+1, n g) and
// (k 2c+8.., n g); C holds (g, 2c..2c+1) and (g+8, 2c..2c+1).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm4(uint32_t *r, const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm4t(uint32_t *r, const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// 16-byte async copy global -> shared; src_bytes 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp16(bf16 *dst, const bf16 *src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Rows r0..r0+ROWS of a (rows, HD) matrix with row stride `stride` into smem with row stride LD.
template <int ROWS, int HD, int LD>
__device__ __forceinline__ void load_rows(bf16 *s, const bf16 *g, long long stride, int r0,
                                          int n_rows) {
    constexpr int CH = HD / 8; // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CH; c += blockDim.x) {
        int r = c / CH, col = (c % CH) * 8;
        bool ok = r0 + r < n_rows;
        const bf16 *src = g + (ok ? (long long)(r0 + r) * stride + col : 0);
        cp16(s + r * LD + col, src, ok);
    }
}

struct Mask {
    int slots, past, window, hide_first;
    __device__ __forceinline__ bool visible(int kk, int p) const {
        if (kk < slots) return true;
        int j = kk - slots;
        return j <= p && p - j < window && !(hide_first && j == 0);
    }
};

template <int HD>
__device__ void fwd(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                    const bf16 *__restrict__ v, bf16 *__restrict__ o, float *__restrict__ lse,
                    int H, int KV, int T, int S, Mask mk, float scale_log2) {
    constexpr int BR = 64, BC = 64, LD = HD + 8;
    __shared__ __align__(16) bf16 sk[BC * LD];
    __shared__ __align__(16) bf16 sv[BC * LD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int i0 = blockIdx.x * BR, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int kvh = h / (H / KV);
    const bf16 *qp = q + ((long long)b * H + h) * T * HD;
    const bf16 *kp = k + ((long long)b * KV + kvh) * S * HD;
    const bf16 *vp = v + ((long long)b * KV + kvh) * S * HD;

    // Q tile through sk into registers.
    load_rows<BR, HD, LD>(sk, qp, HD, i0, T);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++)
        ldsm4(qf[ks], sk + (warp * 16 + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);
    __syncthreads();

    float acc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const int p[2] = {mk.past + row[0], mk.past + row[1]};
    const int p_lo = mk.past + i0, p_hi = mk.past + min(i0 + BR, T) - 1;
    const int k_end = min(S, mk.slots + p_hi + 1);
    // First token key any query of this tile may see (the window's start).
    const int tok_lo = mk.window < (1 << 30) ? max(0, p_lo - mk.window + 1) : 0;

    for (int k0 = 0; k0 < k_end; k0 += BC) {
        if (k0 >= mk.slots && k0 + BC <= mk.slots + tok_lo) continue;
        load_rows<BC, HD, LD>(sk, kp, HD, k0, S);
        cp_commit();
        load_rows<BC, HD, LD>(sv, vp, HD, k0, S);
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        float s[BC / 8][4];
#pragma unroll
        for (int n = 0; n < BC / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
            for (int n2 = 0; n2 < BC / 16; n2++) {
                uint32_t bfr[4];
                ldsm4(bfr, sk + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 +
                               ((lane >> 3) & 1) * 8);
                mma(s[2 * n2], qf[ks], bfr[0], bfr[1]);
                mma(s[2 * n2 + 1], qf[ks], bfr[2], bfr[3]);
            }
        }

        // Every key of the tile visible to every row: no per-element mask.
        const bool full = k0 + BC <= S && k0 + BC <= mk.slots + p_lo + 1 &&
                          k0 >= mk.slots + max(0, p_hi - mk.window + 1) &&
                          !(mk.hide_first && k0 <= mk.slots && mk.slots < k0 + BC);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = NEG_INF;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int kk = k0 + n * 8 + 2 * c + e;
                    float x = s[n][2 * r + e] * scale_log2;
                    if (!full && !(kk < S && row[r] < T && mk.visible(kk, p[r]))) x = NEG_INF;
                    s[n][2 * r + e] = x;
                    mx = fmaxf(mx, x);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            float m_new = fmaxf(m[r], mx);
            float base = m_new == NEG_INF ? 0.f : m_new;
            float alpha = exp2f(m[r] - base);
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float pe = exp2f(s[n][2 * r + e] - base);
                    s[n][2 * r + e] = pe;
                    sum += pe;
                }
            }
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                acc[n][2 * r] *= alpha;
                acc[n][2 * r + 1] *= alpha;
            }
        }

        cp_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
            uint32_t a[4] = {pack(s[2 * kk][0], s[2 * kk][1]), pack(s[2 * kk][2], s[2 * kk][3]),
                             pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n2 = 0; n2 < HD / 16; n2++) {
                uint32_t bfr[4];
                ldsm4t(bfr, sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n2 * 16 +
                                (lane >> 4) * 8);
                mma(acc[2 * n2], a, bfr[0], bfr[1]);
                mma(acc[2 * n2 + 1], a, bfr[2], bfr[3]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        float lt = l[r];
        lt += __shfl_xor_sync(0xffffffff, lt, 1);
        lt += __shfl_xor_sync(0xffffffff, lt, 2);
        if (row[r] >= T) continue;
        float inv = lt > 0.f ? 1.f / lt : 0.f;
        bf16 *op = o + (((long long)b * T + row[r]) * H + h) * HD;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *reinterpret_cast<__nv_bfloat162 *>(op + n * 8 + 2 * c) =
                __floats2bfloat162_rn(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
        }
        if (c == 0)
            lse[((long long)b * H + h) * T + row[r]] =
                lt > 0.f ? m[r] + log2f(lt) : __int_as_float(0x7f800000);
    }
}

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d]: one warp per row.
template <int HD>
__device__ void delta_rows(const bf16 *__restrict__ o, const bf16 *__restrict__ d_o,
                           float *__restrict__ delta, int B, int H, int T) {
    long long r = (long long)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= (long long)B * T * H) return;
    const bf16 *a = o + r * HD, *d = d_o + r * HD;
    float sum = 0.f;
    for (int i = lane; i < HD; i += 32) sum += __bfloat162float(a[i]) * __bfloat162float(d[i]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
    if (lane == 0) {
        long long bi = r / H; // b * T + i
        int h = r % H;
        long long b = bi / T, i = bi % T;
        delta[(b * H + h) * T + i] = sum;
    }
}

template <int HD>
__device__ void bwd(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                    const bf16 *__restrict__ v, const bf16 *__restrict__ d_o,
                    const float *__restrict__ lse, const float *__restrict__ delta,
                    float *__restrict__ dq, bf16 *__restrict__ dk, bf16 *__restrict__ dv, int H,
                    int KV, int T, int S, Mask mk, float scale_log2, float scale) {
    constexpr int BC = 64, BR = HD == 128 ? 32 : 64, LD = HD + 8, LDS = BR + 8;
    // sk: the key tile (kept); sq, sdo: the query tile; V goes through sq/sdo into registers.
    __shared__ __align__(16) bf16 sk[BC * LD];
    __shared__ __align__(16) bf16 sqdo[2 * BR * LD];
    bf16 *sq = sqdo, *sdo = sqdo + BR * LD;
    __shared__ __align__(16) bf16 sds[BC * LDS];
    __shared__ float s_lse[BR], s_delta[BR];
    static_assert(2 * BR * LD >= BC * LD, "V staging does not fit");

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int k0 = blockIdx.x * BC, bkv = blockIdx.y, b = bkv / KV, kvh = bkv % KV;
    const int rep = H / KV;
    const bf16 *kp = k + ((long long)b * KV + kvh) * S * HD;
    const bf16 *vp = v + ((long long)b * KV + kvh) * S * HD;

    load_rows<BC, HD, LD>(sk, kp, HD, k0, S);
    load_rows<BC, HD, LD>(sqdo, vp, HD, k0, S);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    uint32_t vf[HD / 16][4];
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++)
        ldsm4(vf[ks], sqdo + (warp * 16 + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);
    __syncthreads();

    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[n][e] = dva[n][e] = 0.f;

    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    // Queries that may see a key of this tile: all when it holds a slot, else from the
    // position of its first token on, and (window) up to that of its last token + window - 1.
    int i_lo = 0, i_hi = T;
    if (k0 >= mk.slots) {
        i_lo = max(0, k0 - mk.slots - mk.past);
        if (mk.window < (1 << 30))
            i_hi = min(T, k0 + BC - 1 - mk.slots + mk.window - mk.past);
    }
    i_lo = i_lo / BR * BR;

    for (int hh = 0; hh < rep; hh++) {
        const int h = kvh * rep + hh;
        const bf16 *qp = q + ((long long)b * H + h) * T * HD;
        const bf16 *dop = d_o + (long long)b * T * H * HD + (long long)h * HD;
        const float *lp = lse + ((long long)b * H + h) * T;
        const float *dp = delta + ((long long)b * H + h) * T;
        float *dqp = dq + ((long long)b * H + h) * T * HD;
        for (int i0 = i_lo; i0 < i_hi; i0 += BR) {
            load_rows<BR, HD, LD>(sq, qp, HD, i0, T);
            load_rows<BR, HD, LD>(sdo, dop, (long long)H * HD, i0, T);
            cp_commit();
            for (int r = threadIdx.x; r < BR; r += blockDim.x) {
                bool ok = i0 + r < T;
                s_lse[r] = ok ? lp[i0 + r] : __int_as_float(0x7f800000);
                s_delta[r] = ok ? dp[i0 + r] : 0.f;
            }
            cp_wait<0>();
            __syncthreads();

            // S^T = K Q^T: (16 keys, BR queries) per warp.
            float st[BR / 8][4];
#pragma unroll
            for (int n = 0; n < BR / 8; n++) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) {
                uint32_t a[4];
                ldsm4(a, sk + (warp * 16 + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int n2 = 0; n2 < BR / 16; n2++) {
                    uint32_t bfr[4];
                    ldsm4(bfr, sq + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 +
                                   ((lane >> 3) & 1) * 8);
                    mma(st[2 * n2], a, bfr[0], bfr[1]);
                    mma(st[2 * n2 + 1], a, bfr[2], bfr[3]);
                }
            }
            // P^T
#pragma unroll
            for (int n = 0; n < BR / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = n * 8 + 2 * c + (e & 1), kk = key[e >> 1], i = i0 + qi;
                    bool vis = kk < S && i < T && mk.visible(kk, mk.past + i);
                    st[n][e] = vis ? exp2f(st[n][e] * scale_log2 - s_lse[qi]) : 0.f;
                }
            }
            // dV += P^T dO
#pragma unroll
            for (int kq = 0; kq < BR / 16; kq++) {
                uint32_t a[4] = {pack(st[2 * kq][0], st[2 * kq][1]),
                                 pack(st[2 * kq][2], st[2 * kq][3]),
                                 pack(st[2 * kq + 1][0], st[2 * kq + 1][1]),
                                 pack(st[2 * kq + 1][2], st[2 * kq + 1][3])};
#pragma unroll
                for (int n2 = 0; n2 < HD / 16; n2++) {
                    uint32_t bfr[4];
                    ldsm4t(bfr, sdo + (kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                    n2 * 16 + (lane >> 4) * 8);
                    mma(dva[2 * n2], a, bfr[0], bfr[1]);
                    mma(dva[2 * n2 + 1], a, bfr[2], bfr[3]);
                }
            }
            // dP^T = V dO^T, then dS^T = P^T (dP^T - delta)
            float dpt[BR / 8][4];
#pragma unroll
            for (int n = 0; n < BR / 8; n++) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < HD / 16; ks++) {
#pragma unroll
                for (int n2 = 0; n2 < BR / 16; n2++) {
                    uint32_t bfr[4];
                    ldsm4(bfr, sdo + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 +
                                   ((lane >> 3) & 1) * 8);
                    mma(dpt[2 * n2], vf[ks], bfr[0], bfr[1]);
                    mma(dpt[2 * n2 + 1], vf[ks], bfr[2], bfr[3]);
                }
            }
#pragma unroll
            for (int n = 0; n < BR / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    st[n][e] *= dpt[n][e] - s_delta[n * 8 + 2 * c + (e & 1)];
            // dK += dS^T Q; dS^T to shared memory for dQ.
#pragma unroll
            for (int kq = 0; kq < BR / 16; kq++) {
                uint32_t a[4] = {pack(st[2 * kq][0], st[2 * kq][1]),
                                 pack(st[2 * kq][2], st[2 * kq][3]),
                                 pack(st[2 * kq + 1][0], st[2 * kq + 1][1]),
                                 pack(st[2 * kq + 1][2], st[2 * kq + 1][3])};
                int r = warp * 16 + g, col = kq * 16 + 2 * c;
                *reinterpret_cast<uint32_t *>(sds + r * LDS + col) = a[0];
                *reinterpret_cast<uint32_t *>(sds + (r + 8) * LDS + col) = a[1];
                *reinterpret_cast<uint32_t *>(sds + r * LDS + col + 8) = a[2];
                *reinterpret_cast<uint32_t *>(sds + (r + 8) * LDS + col + 8) = a[3];
#pragma unroll
                for (int n2 = 0; n2 < HD / 16; n2++) {
                    uint32_t bfr[4];
                    ldsm4t(bfr, sq + (kq * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                    n2 * 16 + (lane >> 4) * 8);
                    mma(dka[2 * n2], a, bfr[0], bfr[1]);
                    mma(dka[2 * n2 + 1], a, bfr[2], bfr[3]);
                }
            }
            __syncthreads();
            // dQ (BR, HD) += dS K: warp takes one 16-query slab and a share of the columns.
            {
                constexpr int MT = BR / 16, WPM = 4 / MT, NT = HD / 8 / WPM;
                const int mt = warp % MT, nt0 = (warp / MT) * NT;
                const int q0 = mt * 16;
#pragma unroll
                for (int n2 = 0; n2 < NT / 2; n2++) {
                    float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};
                    const int ncol = (nt0 + 2 * n2) * 8;
#pragma unroll
                    for (int kk = 0; kk < BC / 16; kk++) {
                        uint32_t a[4], bfr[4];
                        ldsm4t(a, sds + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + q0 +
                                      ((lane >> 3) & 1) * 8);
                        ldsm4t(bfr, sk + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                        ncol + (lane >> 4) * 8);
                        mma(d0, a, bfr[0], bfr[1]);
                        mma(d1, a, bfr[2], bfr[3]);
                    }
                    const int ia = i0 + q0 + g, ib = ia + 8;
                    if (ia < T) {
                        float *dst = dqp + (long long)ia * HD + ncol + 2 * c;
                        atomicAdd(dst, d0[0] * scale);
                        atomicAdd(dst + 1, d0[1] * scale);
                        atomicAdd(dst + 8, d1[0] * scale);
                        atomicAdd(dst + 9, d1[1] * scale);
                    }
                    if (ib < T) {
                        float *dst = dqp + (long long)ib * HD + ncol + 2 * c;
                        atomicAdd(dst, d0[2] * scale);
                        atomicAdd(dst + 1, d0[3] * scale);
                        atomicAdd(dst + 8, d1[2] * scale);
                        atomicAdd(dst + 9, d1[3] * scale);
                    }
                }
            }
            __syncthreads();
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (key[r] >= S) continue;
        long long off = (((long long)b * KV + kvh) * S + key[r]) * HD;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int col = n * 8 + 2 * c;
            *reinterpret_cast<__nv_bfloat162 *>(dk + off + col) =
                __floats2bfloat162_rn(dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            *reinterpret_cast<__nv_bfloat162 *>(dv + off + col) =
                __floats2bfloat162_rn(dva[n][2 * r], dva[n][2 * r + 1]);
        }
    }
}

#define ENTRY(HD)                                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        eab_attn_fwd_##HD(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse,    \
                          int H, int KV, int T, int S, int slots, int past, int window,        \
                          int hide_first, float scale_log2) {                                  \
        fwd<HD>(q, k, v, o, lse, H, KV, T, S, Mask{slots, past, window, hide_first},           \
                scale_log2);                                                                   \
    }                                                                                          \
    extern "C" __global__ void eab_attn_delta_##HD(const bf16 *o, const bf16 *d_o,             \
                                                   float *delta, int B, int H, int T) {        \
        delta_rows<HD>(o, d_o, delta, B, H, T);                                                \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        eab_attn_bwd_##HD(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *d_o,        \
                          const float *lse, const float *delta, float *dq, bf16 *dk, bf16 *dv, \
                          int H, int KV, int T, int S, int slots, int past, int window,        \
                          int hide_first, float scale_log2, float scale) {                     \
        bwd<HD>(q, k, v, d_o, lse, delta, dq, dk, dv, H, KV, T, S,                             \
                Mask{slots, past, window, hide_first}, scale_log2, scale);                     \
    }

ENTRY(64)
ENTRY(128)
