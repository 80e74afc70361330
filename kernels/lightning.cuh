// Named device operations of the Lightning family: warp-level 16x8x16 products on shared
// memory tiles (tensor cores for 16-bit types, the same fragment layout in f32 FMAs for f32),
// tile loads and paired stores. The kernels in lightning.cu read as the paper's algorithm.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace lightning {

__device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }

// Two 16-bit values in one register, the lower index in the low half (mma's operand order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
    return (uint32_t)bits(lo) | ((uint32_t)bits(hi) << 16);
}

// C (16 x 8, f32, the mma accumulator fragment: lane holds rows g and g+8, columns 2t and
// 2t+1, g = lane/4, t = lane%4) += A (16 x 16) * B (16 x 8), operands in shared memory at any
// strides: A(r, k) = a[r*a_rs + k*a_ks], B(k, n) = b[k*b_ks + n*b_ns]. One warp, all lanes.
template <typename T>
__device__ __forceinline__ void warp_mma_16x8x16(float (&c)[4], const T* a, int a_rs, int a_ks,
                                                 const T* b, int b_ks, int b_ns) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto A = [&](int r, int k) { return a[r * a_rs + k * a_ks]; };
    auto B = [&](int k, int n) { return b[k * b_ks + n * b_ns]; };
    const uint32_t a0 = pack2(A(g, 2 * t), A(g, 2 * t + 1));
    const uint32_t a1 = pack2(A(g + 8, 2 * t), A(g + 8, 2 * t + 1));
    const uint32_t a2 = pack2(A(g, 2 * t + 8), A(g, 2 * t + 9));
    const uint32_t a3 = pack2(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9));
    const uint32_t b0 = pack2(B(2 * t, g), B(2 * t + 1, g));
    const uint32_t b1 = pack2(B(2 * t + 8, g), B(2 * t + 9, g));
    const uint32_t frag[4] = {a0, a1, a2, a3};
    mma_16816<T>(c, frag, b0, b1);
}

// The f32 path: the same fragment, in FMAs (f32 accuracy, no tensor cores).
template <>
__device__ __forceinline__ void warp_mma_16x8x16<float>(float (&c)[4], const float* a, int a_rs,
                                                        int a_ks, const float* b, int b_ks,
                                                        int b_ns) {
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
