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

// Eight contiguous elements at a 16-byte aligned address as a chunk of T.
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
            if ((reinterpret_cast<uintptr_t>(at) & 15) == 0) return vector_chunk<T>(at);
        }
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            v[e] = row < rows && e0 + e < elems
                       ? to_f32(base[row * row_stride + (e0 + e) * (UNIT ? 1 : elem_stride)])
                       : 0.f;
        }
        return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                          pack2<T>(v[6], v[7]));
    }
};

// A tile of a product's operand in shared memory, 32 of the contraction by up to 64 of the
// free index, swizzled so that chunk stores and the ldmatrix reads of eight consecutive rows
// are conflict-free. K_MAJOR: [32 k][64] (rows of 128 bytes, an operand contiguous along its
// free index); otherwise [64][32 k] (rows of 64 bytes, an operand contiguous along k).
template <bool K_MAJOR> struct OperandTile {
    static constexpr int ROWS = K_MAJOR ? 32 : 64, ROW_CHUNKS = K_MAJOR ? 8 : 4;
    using Tile = SwizzledTile<ROW_CHUNKS * 16>;
    // This lane's ldmatrix cursor for A fragments (the free index m; in mma_16816's order
    // (m0, k0), (m0 + 8, k0), (m0, k0 + 8), (m0 + 8, k0 + 8)) or, A = false, for pairs of B
    // fragments ((k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8)), the warp's 32 free
    // indices starting at w * 32.
    template <bool A>
    __device__ static __forceinline__ typename Tile::Cursor cursor(uint32_t tile, int w, int lane) {
        const int lo = lane & 7, b3 = (lane >> 3) & 1, b4 = lane >> 4;
        if (K_MAJOR) return typename Tile::Cursor(tile, lo + (A ? b4 : b3) * 8, w * 4 + (A ? b3 : b4));
        return typename Tile::Cursor(tile, w * 32 + lo + (A ? b3 : b4) * 8, A ? b4 : b3);
    }
    // The fragments at k16 step kc of the 16-wide slice `sub` of the warp's 32 (.trans when
    // k-major: the mma wants the free index in rows).
    __device__ static __forceinline__ void frag(uint32_t (&f)[4], const typename Tile::Cursor& c, int kc, int sub) {
        if (K_MAJOR) ldmatrix_x4_trans(f, c.at(kc * 16, sub * 2));
        else ldmatrix_x4(f, c.at(sub * 16, kc * 2));
    }
};

// Where a product's tile goes: element (row, col) at base[row * row_stride + col * col_stride]
// for row < rows, col < cols (gemm_tile's ROUND rounds the f32 sum to T first: h and dh, as
// the forward pass and the CPU path round them).
template <typename O> struct StridedOut {
    O* base;
    int64_t row_stride;
    int64_t col_stride;
    int64_t rows;
    int64_t cols;
};

}  // namespace monarch
