// Named device helpers of the Monarch family: the tensor-core tile op, the index maps of the
// intermediate, and guarded pair loads. kernels/monarch.cu reads like the algorithm with these.
#pragma once

#include "common.cuh"
#include "monarch.h"

namespace monarch {

// The intermediate columns a CTA builds: for its group of G output blocks starting at j0,
// column z (0 <= z < G*r) is h[m] with m = (z / G) * l + j0 + z % G, i.e. rr = z / G and
// j = j0 + z % G. Consecutive z walk m upwards, so a run of z reads one input block i = m / q.
__device__ __forceinline__ int mid_index(int z, int group, int l, int j0) {
    return (z / group) * l + j0 + z % group;
}

// Where column z lives on chip: block-major ([jl][rr]), so output block j0 + jl reads its r
// inputs h[rr*l + j] as one contiguous run.
__device__ __forceinline__ int onchip_column(int z, int group, int r) {
    return (z % group) * r + z / group;
}

// Elements (col, col + 1) of a 2-byte row as one register (low half = col), zero past
// `cols` or for a missing row. The 32-bit load needs `row + col` 4-byte aligned: col even,
// row start aligned (the host checks the base pointer and an even row stride).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* row, int col, int cols) {
    if (row == nullptr || col >= cols) return 0u;
    if (col + 1 < cols) return *reinterpret_cast<const uint32_t*>(row + col);
    return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(row + col));
}

// A pair of 2-byte elements that is always in bounds and aligned (weights, on-chip h).
template <typename T>
__device__ __forceinline__ uint32_t pair(const T* at) {
    return *reinterpret_cast<const uint32_t*>(at);
}

// The B fragments of a 16-column (two n8) tile at K offset k (= kk + 2t): each column's
// weight row is contiguous along K, so a lane's pairs are 32-bit loads.
template <typename T>
__device__ __forceinline__ void load_b(const T* const (&wrow)[2], int k, uint32_t (&b)[2][2]) {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
        b[sub][0] = pair(wrow[sub] + k);
        b[sub][1] = pair(wrow[sub] + k + 8);
    }
}

// acc[sub] += a * b[sub] for both n8 halves of a 16-column tile.
template <typename T>
__device__ __forceinline__ void mma_16x16(float (&acc)[2][4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2][2]) {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) mma_16816<T>(acc[sub], a, b[sub][0], b[sub][1]);
}

// Visits this lane's accumulators of a (16*MT) x 16 tile as f(row, col, value), row and col
// within the tile (the C fragment layout above).
template <int MT, typename F>
__device__ __forceinline__ void for_each_acc(const float (&acc)[MT][2][4], int lane, F f) {
    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                f(mt * 16 + g + (e >= 2 ? 8 : 0), sub * 8 + 2 * tq + (e & 1), acc[mt][sub][e]);
            }
        }
    }
}

// Eight contiguous elements at a 16-byte (T) or 32-byte (f32) aligned address as a chunk of T.
template <typename T> __device__ __forceinline__ uint4 vector_chunk(const T* at) {
    return *reinterpret_cast<const uint4*>(at);
}
template <typename T> __device__ __forceinline__ uint4 vector_chunk(const float* at) {
    const float4 lo = reinterpret_cast<const float4*>(at)[0], hi = reinterpret_cast<const float4*>(at)[1];
    return make_uint4(pack2<T>(lo.x, lo.y), pack2<T>(lo.z, lo.w), pack2<T>(hi.x, hi.y), pack2<T>(hi.z, hi.w));
}

// One operand of a backward product, read in place as a [rows x elems] matrix: element
// (row, e) at base[row * row_stride + e * elem_stride], zero past `rows` or `elems`. Which
// index is the contraction's depends on how the operand sits in shared memory (gemm_tile):
// an operand contiguous along its free index is staged k-major (rows = k), one contiguous along
// k (or along neither) free-index-major (elems = k), so a chunk's 8 elements are adjacent in
// memory wherever the operand allows.
// UNIT: elem_stride is 1 (then whole aligned chunks take vector loads); a compile-time choice,
// so a gathered operand's loads carry no second path.
template <typename S, bool UNIT> struct Strided {
    const S* base;
    int64_t row_stride;
    int64_t elem_stride;
    int64_t rows;
    int64_t elems;

    // Elements e0..e0+7 of row `row` as eight T packed into a 16-byte chunk (rounding is
    // exact: every source holds values already representable in T).
    template <typename T>
    __device__ __forceinline__ uint4 chunk(int64_t row, int64_t e0) const {
        // Contiguous, whole and aligned (most chunks of x, w1, w2, h and dh): vector loads.
        if (UNIT && row < rows && e0 + 8 <= elems) {
            const S* at = base + row * row_stride + e0;
            if ((reinterpret_cast<uintptr_t>(at) & (sizeof(S) * 8 - 1)) == 0) return vector_chunk<T>(at);
        }
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            v[e] = row < rows && e0 + e < elems ? to_f32(base[row * row_stride + (e0 + e) * (UNIT ? 1 : elem_stride)]) : 0.f;
        }
        return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                          pack2<T>(v[6], v[7]));
    }
};

// Where a product's tile goes: element (row, col) at base[row * row_stride + col * col_stride]
// for row < rows, col < cols; ROUND rounds the f32 sum to T first (h and dh, which the
// forward pass and the CPU path round).
template <typename O> struct StridedOut {
    O* base;
    int64_t row_stride;
    int64_t col_stride;
    int64_t rows;
    int64_t cols;
};

}  // namespace monarch
