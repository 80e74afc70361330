// Device helpers shared by every kernel family. Include this first in each kernels/<family>.cu.
#pragma once

#include <stdint.h>

// Every family's parameter header gets an echo kernel: it copies the whole struct, padding
// included, as the kernel saw it into `out`. The host fills each byte differently, launches it
// and compares, so a field that bindgen and nvcc lay out differently (or a swapped field)
// cannot hide. memcpy copies the object representation, so padding travels too.
#define ATTNKIT_DEFINE_PARAMS_ECHO(T)                                                       \
    extern "C" __global__ void echo_##T(const __grid_constant__ T p, T* out) {              \
        if (blockIdx.x == 0 && threadIdx.x == 0) memcpy(out, &p, sizeof(T));                 \
    }

// Element loads and stores as f32, for every dtype the crate supports. The kernels are
// templated on the element type and call these, so one body serves f32, f16 and bf16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// sm_80 building blocks: async copies, ldmatrix, mma.sync m16n8k16, and a swizzled shared
// memory layout. Named so that the kernels read like their algorithms.
// ---------------------------------------------------------------------------------------------

// The block's dynamic shared memory, one declaration for every kernel of a file (two
// `extern __shared__` arrays with different alignments in one file do not agree).
__device__ __forceinline__ unsigned char* dynamic_smem() {
    extern __shared__ __align__(128) unsigned char attnkit_dynamic_smem[];
    return attnkit_dynamic_smem;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1, reading only the first `src_bytes` (0..16)
// of the source and zero-filling the rest of the destination (a row's last, partial chunk).
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// The whole 16 bytes; when `valid` is false nothing is read and the destination is zero-filled
// (src-size 0): out-of-range rows become zeros, never garbage.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    cp_async_16_zfill(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory; lane i gives the address of row i % 8 of matrix
// i / 8, and register j receives matrix j in the mma fragment layout.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// The same, each matrix transposed: for B operands stored k-major (V in P V).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A B + D on tensor cores, A 16x16 (row), B 16x8 (col), f32 accumulators. Fragments:
// a[0]: (row g, k 2t..2t+1), a[1]: (g+8, 2t), a[2]: (g, 2t+8), a[3]: (g+8, 2t+8);
// b[0]: (k 2t..2t+1, col g), b[1]: (k 2t+8.., g); c[0..1]: (g, 2t..2t+1), c[2..3]: (g+8, ..),
// where g = lane / 4 and t = lane % 4.
template <typename T> __device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 rounded to T and packed into one register (lo in the low half), as mma operands and
// 4-byte stores want them.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// A shared-memory tile of rows of ROW_BYTES bytes in 16-byte chunks, each row's chunks
// XOR-permuted by the row index, so that the eight rows one ldmatrix (or a row-wise cp.async
// sweep, or the epilogue's 4-byte stores) touches at the same logical chunk land in eight
// different bank groups: conflict-free without padding, for rows of 64, 128, 192, 256 and
// 512 bytes (checked by simulation for every access pattern the kernels use). Rows of a
// multiple of 128 bytes permute within each group of 8 chunks by row; 64- and 192-byte rows
// (two rows share a 128-byte line) permute within groups of 4 by row / 2.
// (v1 XORed by the 128-byte line index instead: 2-way conflicts at 192/256-byte rows, 4-way at
// 512.)
template <int ROW_BYTES> struct SwizzledTile {
    static_assert(ROW_BYTES % 64 == 0, "rows must be whole multiples of 64 bytes");
    static constexpr int CHUNKS_PER_ROW = ROW_BYTES / 16;
    // Byte offset of 16-byte chunk `chunk` of row `row`.
    __device__ static __forceinline__ uint32_t offset(int row, int chunk) {
        const int permuted = CHUNKS_PER_ROW % 8 == 0 ? (chunk & ~7) | ((chunk ^ row) & 7)
                                                     : (chunk & ~3) | ((chunk ^ (row >> 1)) & 3);
        return (uint32_t)((row * CHUNKS_PER_ROW + permuted) * 16);
    }
    // Chunks one permutation spans.
    static constexpr int GROUP = CHUNKS_PER_ROW % 8 == 0 ? 8 : 4;
    // The addresses of an unrolled sweep: a lane's row r0 and chunk c0 (any values), then
    // offsets known at compile time, rows by a multiple of 8 and chunks by an even number. Those
    // keep the permutation's key (row % 8, or row / 2 % 4) and shift chunk c0 + 2i by whole
    // groups, so each address is one of GROUP / 2 per-lane registers plus an immediate: an
    // unrolled loop holds GROUP / 2 live addresses, not one per (row, chunk) it visits.
    struct Cursor {
        uint32_t b[GROUP / 2];
        __device__ __forceinline__ Cursor(uint32_t smem, int r0, int c0) {
#pragma unroll
            for (int i = 0; i < GROUP / 2; ++i) b[i] = smem + offset(r0, c0 + 2 * i);
        }
        // smem + offset(r0 + rows, c0 + chunks).
        __device__ __forceinline__ uint32_t at(int rows, int chunks) const {
            return b[(chunks % GROUP) / 2] + rows * ROW_BYTES + chunks / GROUP * GROUP * 16;
        }
    };
};

// The swizzled tile for rows of D two-byte elements (a head dim): rows padded up to a multiple
// of 64 bytes, so head dims 80 and 112 take 96- and 128-element rows (192 and 256 bytes, whose
// swizzle is conflict-free as above). The padding chunks are never read, written or copied:
// the kernels loop over the D / 8 real chunks only.
template <int D> using HeadRows = SwizzledTile<(D * 2 + 63) / 64 * 64>;
// Bytes of one such row in shared memory (the host sizes shared memory by the same rule).
template <int D> __host__ __device__ constexpr int head_row_bytes() { return (D * 2 + 63) / 64 * 64; }

// Clears N mma accumulator fragments.
template <int N> __device__ __forceinline__ void zero_frags(float (&a)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = 0.f;
}

// Warp-level tile products on swizzled [rows][D] tiles (HeadRows<D>), in mma_16816's
// fragment layouts, shared by the attention kernels so that each reads as its algorithm.
//
// acc[mt][n] (mt < MT, n < NT) += A_mt B^T: A_mt = rows [a0 + 16 mt, a0 + 16 mt + 16) of sA,
// B = rows [b0, b0 + 8 NT) of sB, the contraction over D. Each B fragment loaded serves all MT
// row tiles (MT = 2: 32 rows per K load, halving shared-memory traffic per FLOP). S = Q K^T and
// dP = dO V^T (query rows as A); S^T = K Q^T and dP^T = V dO^T (key rows as A).
template <typename T, int D, int NT, int MT>
__device__ __forceinline__ void mma_rowtiles_by_rows(float (&acc)[MT][NT][4], uint32_t sA, int a0, uint32_t sB, int b0,
                                                     int lane) {
    static_assert(D % 16 == 0 && NT % 2 == 0, "whole k16 steps, n16 pairs of B");
    using Cursor = typename HeadRows<D>::Cursor;
    const Cursor ca(sA, a0 + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
    const Cursor cb(sB, b0 + (lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1);
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], ca.at(16 * mt, kc * 2));
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
            uint32_t b[4];
            ldmatrix_x4(b, cb.at(n2 * 16, kc * 2));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][2 * n2], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][2 * n2 + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The same for one row tile: acc[n] += A B^T, A = rows [a0, a0 + 16) of sA.
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[NT][4], uint32_t sA, int a0, uint32_t sB, int b0,
                                                 int lane) {
    mma_rowtiles_by_rows<T, D, NT, 1>(reinterpret_cast<float(&)[1][NT][4]>(acc), sA, a0, sB, b0, lane);
}

// acc[mt][d] (d < COLS / 8) += W_mt B: W_mt the 16 x 8 NK weights a previous product left in
// accumulator layout (its C fragments are this mma's A fragments once rounded to T: no
// shared-memory trip), B = columns [c0, c0 + COLS) of rows [b0, b0 + 8 NK) of sB, the
// contraction over those rows (ldmatrix .trans); each B fragment serves all MT row tiles.
// O += P V; dV += P^T dO and dK += dS^T Q (over part of the head dim where the accumulators of
// all of it would not fit); dQ += dS K.
template <typename T, int D, int NK, int MT, int COLS = D>
__device__ __forceinline__ void mma_accs_by_rows(float (&acc)[MT][COLS / 8][4], const float (&w)[MT][NK][4], uint32_t sB,
                                                 int b0, int lane, int c0 = 0) {
    static_assert(NK % 2 == 0 && COLS % 16 == 0 && COLS <= D, "whole k16 steps, n16 pairs of B");
    const typename HeadRows<D>::Cursor cb(sB, b0 + (lane & 7) + ((lane >> 3) & 1) * 8, c0 / 8 + (lane >> 4));
#pragma unroll
    for (int kc = 0; kc < NK / 2; ++kc) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2<T>(w[mt][2 * kc][0], w[mt][2 * kc][1]);
            a[mt][1] = pack2<T>(w[mt][2 * kc][2], w[mt][2 * kc][3]);
            a[mt][2] = pack2<T>(w[mt][2 * kc + 1][0], w[mt][2 * kc + 1][1]);
            a[mt][3] = pack2<T>(w[mt][2 * kc + 1][2], w[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int d2 = 0; d2 < COLS / 16; ++d2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, cb.at(kc * 16, d2 * 2));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][2 * d2], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][2 * d2 + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// The same for one row tile of weights.
template <typename T, int D, int NK, int COLS = D>
__device__ __forceinline__ void mma_acc_by_rows(float (&acc)[COLS / 8][4], const float (&w)[NK][4], uint32_t sB, int b0,
                                                int lane, int c0 = 0) {
    mma_accs_by_rows<T, D, NK, 1, COLS>(reinterpret_cast<float(&)[1][COLS / 8][4]>(acc),
                                        reinterpret_cast<const float(&)[1][NK][4]>(w), sB, b0, lane, c0);
}

// 2^x on the special function unit, flushing denormals (the fast form the softmax wants;
// 2^-inf = +0). Relative error about 2^-22: for the tensor-core paths, whose P is rounded to
// 16 bits anyway; the exact f32 path keeps exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Logit soft-capping (Gemma 2): cap * tanh(x / cap), `inv_cap` = 1 / cap. The tensor-core
// paths (whose P is rounded to 16 bits) take tanh(y) = 1 - 2 / (2^(2y log2 e) + 1) through one
// ex2.approx: absolute error about 2^-21 in tanh, so 2^-21 * cap in the logit, which is what
// the softmax sees (the SFU's tanh.approx.f32, 2^-11 relative, would be a thousand times
// coarser). The exact f32 paths pass EXACT = true (tanhf). Saturates to +-cap, NaN stays NaN.
template <bool EXACT> __device__ __forceinline__ float soft_cap(float x, float cap, float inv_cap) {
    const float y = x * inv_cap;
    if (EXACT) return cap * tanhf(y);
    const float e = fast_exp2(y * 2.8853900817779268f);  // 2 log2 e; +inf for large y
    return cap * (1.f - 2.f * __frcp_rn(e + 1.f));           // rcp(+inf) = 0: tanh = 1
}

// The softmax logits' transforms shared by flash and decode, in the exp2 domain the kernels
// score in: Gemma 2's softcap (for x = log2(e) scale q.k, (c log2 e) tanh(x / (c log2 e)) is
// the capped logit c tanh(scale q.k / c) in exp2 units: one multiply fewer per score than
// capping in natural units), then ALiBi's -slope |dist| (slope in exp2 units; a slope of 0
// makes the term an exact no-op, so the score loops need no branch for it).
struct LogitShape {
    bool capped;
    float cap, inv_cap;  // c log2(e) and its inverse
    __device__ __forceinline__ explicit LogitShape(float softcap)
        : capped(softcap > 0.f), cap(softcap * 1.4426950408889634f),
          inv_cap(softcap > 0.f ? 1.f / (softcap * 1.4426950408889634f) : 0.f) {}
    template <bool EXACT>
    __device__ __forceinline__ float operator()(float x, float slope_log2, int dist) const {
        if (capped) x = soft_cap<EXACT>(x, cap, inv_cap);
        return fmaf(-slope_log2, (float)abs(dist), x);
    }
};
// Head h's ALiBi slope in exp2 units (0 without ALiBi).
__device__ __forceinline__ float alibi_slope_log2(const float* slopes, int h) {
    return slopes != nullptr ? slopes[h] * 1.4426950408889634f : 0.f;
}

// Max and sum across the four lanes of a quad (the lanes that share an mma row).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Online-softmax update for the two rows a thread holds in the mma accumulator layout
// (r = 0: row g, r = 1: row g + 8), shared by the attention kernels.
// s holds this tile's scores in the exp2 domain (masked ones -inf); on return it holds
// P = exp2(s - m_new), and o, l, es are rescaled by exp2(m_old - m_new). es accumulates
// sum(P * s) for the entropy when `track` is set.
template <int NT_N, int NT_D>
__device__ __forceinline__ void online_softmax_mma(float (&s)[NT_N][4], float (&o)[NT_D][4], float (&m)[2], float (&l)[2],
                                               float (&es)[2], bool track) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT_N; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = quad_max(mx);
        const float m_new = fmaxf(m[r], mx);
        // A row that has seen only masked keys keeps m = -inf: subtract 0 instead so that
        // exp2(-inf - -inf) never makes a NaN; its P and l stay exactly 0.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = fast_exp2(m[r] - m_use);
        float sum = 0.f, ps = 0.f;
#pragma unroll
        for (int n = 0; n < NT_N; ++n) {
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
                const float x = s[n][e];
                const float pr = fast_exp2(x - m_use);
                sum += pr;
                if (track) ps += pr > 0.f ? pr * x : 0.f;  // masked: 0 * -inf must not be NaN
                s[n][e] = pr;
            }
        }
        // l and es stay per-thread partial sums; the quad reduces them once, at the end.
        l[r] = l[r] * alpha + sum;
        es[r] = es[r] * alpha + ps;
        m[r] = m_new;
#pragma unroll
        for (int d = 0; d < NT_D; ++d) {
            o[d][2 * r] *= alpha;
            o[d][2 * r + 1] *= alpha;
        }
    }
}

// The same without the entropy sum.
template <int NT_N, int NT_D>
__device__ __forceinline__ void online_softmax_mma(float (&s)[NT_N][4], float (&o)[NT_D][4], float (&m)[2], float (&l)[2]) {
    float es[2] = {0.f, 0.f};
    online_softmax_mma<NT_N, NT_D>(s, o, m, l, es, false);
}
