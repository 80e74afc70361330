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
