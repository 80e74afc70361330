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

// One operand of a weight-gradient product, a [tokens x cols] matrix read in place: element
// (tok, col) at base[tok * row_stride + col * col_stride], zero past `cols` or the last token.
// dy's columns of one w2 block are strided by l (column t*l + j); the others are contiguous.
template <typename S> struct TokenCols {
    const S* base;
    int64_t row_stride;
    int64_t col_stride;
    int cols;

    // Columns 8c..8c+7 of token row `tok` as eight T packed into a 16-byte chunk (rounding is
    // exact: every source holds values already representable in T).
    template <typename T>
    __device__ __forceinline__ uint4 chunk(int64_t tok, int64_t tokens, int c) const {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int col = c * 8 + e;
            v[e] = tok < tokens && col < cols ? to_f32(base[tok * row_stride + col * col_stride]) : 0.f;
        }
        return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                          pack2<T>(v[6], v[7]));
    }
};

}  // namespace monarch
