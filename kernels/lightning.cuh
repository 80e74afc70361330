// Named device operations of the Lightning family: warp-level 16x8x16 products on shared
// memory tiles (tensor cores for 16-bit types, the same fragment layout in f32 FMAs for f32),
// tile loads and paired stores. The kernels in lightning.cu read as the paper's algorithm.
#pragma once

#include "common.cuh"

namespace lightning {

// The f32 path's 16x8x16 step, in the mma accumulator layout (lane holds rows g and g+8,
// columns 2t and 2t+1, g = lane/4, t = lane%4): C += A (16 x 16) * B (16 x 8) in FMAs (f32
// accuracy, no tensor cores), A(r, k) = a[r*a_rs + k*a_ks], B(k, n) = b[k*b_ks + n*b_ns].
__device__ __forceinline__ void fma_16x8x16(float (&c)[4], const float* a, int a_rs, int a_ks, const float* b,
                                            int b_ks, int b_ns) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
        const float x0 = a[g * a_rs + k * a_ks], x1 = a[(g + 8) * a_rs + k * a_ks];
        const float y0 = b[k * b_ks + 2 * t * b_ns], y1 = b[k * b_ks + (2 * t + 1) * b_ns];
        c[0] = fmaf(x0, y0, c[0]);
        c[1] = fmaf(x0, y1, c[1]);
        c[2] = fmaf(x1, y0, c[2]);
        c[3] = fmaf(x1, y1, c[3]);
    }
}

// acc[j] += A (16 x 16) * B_j (16 x 8, columns 8j..8j+7 of B) for j < min(NT, jmax), one warp,
// operands in shared memory: A(r, k) at a[r*lda + k], or a[k*lda + r] when A_KMAJOR; B(k, n)
// at b[k*ldb + n] when B_KMAJOR, else b[n*ldb + k]. 16-bit types: A's fragment is one
// ldmatrix.x4 (.trans when k-major) serving every j, B's two n8 tiles a time one more
// (.trans when k-major: the mma wants k along a fragment's pair); rows must start 16-byte
// aligned, and a pitch of an odd number of 16-byte units keeps the 8 rows of each matrix on
// distinct banks (the tiles' 16-byte padding). f32: the same products in FMAs.
template <bool A_KMAJOR, bool B_KMAJOR, int NT, typename T>
__device__ __forceinline__ void warp_mma_16xn(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb,
                                              int jmax = NT) {
    static_assert(NT % 2 == 0, "B in pairs of n8 tiles");
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (j < jmax) {
                fma_16x8x16(acc[j], a, A_KMAJOR ? 1 : lda, A_KMAJOR ? lda : 1, B_KMAJOR ? b + 8 * j : b + 8 * j * ldb,
                            B_KMAJOR ? ldb : 1, B_KMAJOR ? 1 : ldb);
            }
        }
    } else {
        const int lane = threadIdx.x & 31, lo = lane & 7, b3 = (lane >> 3) & 1, b4 = lane >> 4;
        uint32_t af[4];
        // Matrices (m0, k0), (m0 + 8, k0), (m0, k0 + 8), (m0 + 8, k0 + 8).
        if (A_KMAJOR) ldmatrix_x4_trans(af, smem_addr(a + (lo + 8 * b4) * lda + 8 * b3));
        else ldmatrix_x4(af, smem_addr(a + (lo + 8 * b3) * lda + 8 * b4));
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
            if (2 * n2 < jmax) {
                // Matrices (k0, n0), (k0 + 8, n0), (k0, n0 + 8), (k0 + 8, n0 + 8) of this pair.
                uint32_t bf[4];
                if (B_KMAJOR) ldmatrix_x4_trans(bf, smem_addr(b + (lo + 8 * b3) * ldb + 16 * n2 + 8 * b4));
                else ldmatrix_x4(bf, smem_addr(b + (16 * n2 + lo + 8 * b4) * ldb + 8 * b3));
                mma_16816<T>(acc[2 * n2], af, bf[0], bf[1]);
                if (2 * n2 + 1 < jmax) mma_16816<T>(acc[2 * n2 + 1], af, bf[2], bf[3]);
            }
        }
    }
}

// Two adjacent outputs (an accumulator pair) rounded to T in one store.
__device__ __forceinline__ void store2(float* dst, float x, float y) {
    *reinterpret_cast<float2*>(dst) = make_float2(x, y);
}
__device__ __forceinline__ void store2(__nv_bfloat16* dst, float x, float y) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x, y);
}
__device__ __forceinline__ void store2(__half* dst, float x, float y) {
    *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x, y);
}

}  // namespace lightning
