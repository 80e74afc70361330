// The self-test family: the smallest kernel that exercises the whole pipeline (build,
// embedding, module loading, the parameter mirror, launch, every dtype). Device::best() loads
// this module to prove the embedded code runs on the GPU it found.
#include "common.cuh"
#include "selftest.h"

template <typename T>
__device__ void scale(const SelftestParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const float beta = static_cast<float>(p.beta);
    // Grid-stride loop: any n runs with any grid.
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < p.n;
         i += (int64_t)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(p.alpha * to_f32(x[i * p.x_stride]) + beta);
    }
}

extern "C" __global__ void selftest_scale(const __grid_constant__ SelftestParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: scale<float>(p); break;
        case ATTNKIT_DTYPE_F16: scale<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: scale<__nv_bfloat16>(p); break;
        default: break;  // the host validates dtype before launch
    }
}

ATTNKIT_DEFINE_PARAMS_ECHO(SelftestParams)
