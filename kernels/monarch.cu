// The Monarch family: y = M x + bias, M = P L P^T R (fly's blockdiag_butterfly_multiply), both
// block-diagonal products and the permutation between them in ONE launch. The intermediate h
// never goes to HBM: a CTA owns a tile of tokens and a group of output blocks j0..j0+G, builds
// the G*r columns of h those blocks read (m = rr*l + j) in shared memory, then computes their
// outputs from it.
//
// Tiling the intermediate. A token's whole h row (k*q values) rarely fits next to a useful
// number of tokens (n = 4096, 64 tokens: 512 KB), so it is tiled by output block: the columns
// of h that output block j reads (h[rr*l + j], rr < r) are read by no other output block, so
// the groups partition h and every value of h is computed exactly once; what a smaller group
// costs is re-reading x (once per group) and smaller weight reuse (a group's weights are read
// once per token tile). The host (src/monarch/tiles.rs) picks the group G and the token tile
// from the shared-memory budget and that traffic estimate: many small blocks take large
// groups (x read once or twice), few large blocks take G = 1 (one block's r values per token).
//
// Two kernels, same structure:
// - monarch_forward_mma{1,2,4}: bf16/f16 on tensor cores (mma.sync m16n8k16, f32 accumulate),
//   16*MT tokens per CTA, 4 warps. Stage 1: each warp takes 16-column tiles of the group's h
//   (the host guarantees a tile never straddles two input blocks), A = x rows from global, B =
//   the w1 rows of those columns, K = p; the f32 sums are rounded to T and stored block-major
//   in shared memory. Stage 2: each warp takes 16-output tiles of one block j, A = h from
//   shared memory, B = w2 rows, K = r; epilogue adds the bias and stores y[t*l + j].
//   Needs p, r, s multiples of 16.
// - monarch_forward_simt: any shape, any dtype (the f32 path), h in f32 shared memory (rounded
//   to T first, as the mma path sees it), one thread per intermediate column then per output,
//   up to 8 tokens per CTA.
//
// History: v1 (this file) loads mma fragments straight from global memory (weights and x tiles
// are L2-resident and each is used by MT m-tiles or both n8 halves); it has not run on a GPU.
#include "common.cuh"
#include "monarch.cuh"

extern __shared__ __align__(16) unsigned char monarch_smem[];

namespace monarch {

template <typename T, int MT>
__device__ __forceinline__ void forward_mma(const MonarchParams& p) {
    constexpr int BM = 16 * MT;
    T* hs = reinterpret_cast<T*>(monarch_smem);  // h: [BM][h_stride], block-major columns
    const T* x = static_cast<const T*>(p.x);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    const int groups = p.l / p.group;
    const int64_t tok0 = static_cast<int64_t>(blockIdx.x / groups) * BM;
    const int j0 = static_cast<int>(blockIdx.x % groups) * p.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, tq = lane % 4;
    const int nwarps = blockDim.x / 32;
    const int G = p.group, width = G * p.r;

    // This lane's A rows: g and g + 8 of every m16 tile; null past the last token.
    const T* xrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t tok = tok0 + mt * 16 + g + 8 * h;
            xrow[mt][h] = tok < p.tokens ? x + tok * p.x_row_stride : nullptr;
        }
    }

    // Stage 1: h[:, z0..z0+16) = x_i . w1[rows m(z)]^T, K = p.
    for (int tile = warp; tile < width / 16; tile += nwarps) {
        const int z0 = tile * 16;
        const int xcol0 = (mid_index(z0, G, p.l, j0) / p.q) * p.p;  // input block i, same for the tile
        const T* wrow[2];
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
            // Row i*q + c of w1 for column m = i*q + c is row m: w1 + m*p.
            wrow[sub] = w1 + static_cast<int64_t>(mid_index(z0 + sub * 8 + g, G, p.l, j0)) * p.p;
        }
        float acc[MT][2][4] = {};
        for (int kk = 0; kk < p.p; kk += 16) {
            uint32_t b[2][2];
            load_b(wrow, kk + 2 * tq, b);
            const int col = xcol0 + kk + 2 * tq;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const uint32_t a[4] = {
                    load_pair(xrow[mt][0], col, p.x_cols), load_pair(xrow[mt][1], col, p.x_cols),
                    load_pair(xrow[mt][0], col + 8, p.x_cols),
                    load_pair(xrow[mt][1], col + 8, p.x_cols)};
                mma_16x16<T>(acc[mt], a, b);
            }
        }
        // h rounded to T (the next stage's tensor-core operand), block-major on chip.
        for_each_acc<MT>(acc, lane, [&](int row, int col, float v) {
            hs[row * p.h_stride + onchip_column(z0 + col, G, p.r)] = from_f32<T>(v);
        });
    }
    __syncthreads();

    // Stage 2: y[:, t*l + j] for t in t0..t0+16 = h_j . w2[j][t0..]^T, K = r.
    const int ttiles = p.s / 16;
    for (int tile = warp; tile < G * ttiles; tile += nwarps) {
        const int jl = tile / ttiles, t0 = (tile % ttiles) * 16, j = j0 + jl;
        const T* wrow[2];
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
            wrow[sub] = w2 + (static_cast<int64_t>(j) * p.s + t0 + sub * 8 + g) * p.r;
        }
        const T* hrow[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) hrow[mt][h] = hs + (mt * 16 + g + 8 * h) * p.h_stride + jl * p.r;
        }
        float acc[MT][2][4] = {};
        for (int kk = 0; kk < p.r; kk += 16) {
            uint32_t b[2][2];
            load_b(wrow, kk + 2 * tq, b);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int k = kk + 2 * tq;
                const uint32_t a[4] = {pair(hrow[mt][0] + k), pair(hrow[mt][1] + k),
                                       pair(hrow[mt][0] + k + 8), pair(hrow[mt][1] + k + 8)};
                mma_16x16<T>(acc[mt], a, b);
            }
        }
        // Output t = t0 + col of block j is column t*l + j of y: the permutation P.
        for_each_acc<MT>(acc, lane, [&](int row, int col, float v) {
            const int64_t tok = tok0 + row;
            const int o = (t0 + col) * p.l + j;
            if (tok < p.tokens && o < p.y_cols) {
                y[tok * p.y_row_stride + o] = from_f32<T>(v + (bias ? to_f32(bias[o]) : 0.0f));
            }
        });
    }
}

template <typename T>
__device__ __forceinline__ void forward_simt(const MonarchParams& p) {
    constexpr int NT = ATTNKIT_MONARCH_SIMT_TOKENS;
    float* hs = reinterpret_cast<float*>(monarch_smem);  // h: [bm][h_stride] f32, block-major
    const T* x = static_cast<const T*>(p.x);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    const int groups = p.l / p.group;
    const int bm = p.block_tokens;
    const int64_t tok0 = static_cast<int64_t>(blockIdx.x / groups) * bm;
    const int j0 = static_cast<int>(blockIdx.x % groups) * p.group;
    const int G = p.group, width = G * p.r;
    // Tokens of this tile that exist (bm <= NT, checked by the host).
    const int nt = static_cast<int>(min(static_cast<int64_t>(bm), p.tokens - tok0));

    // Stage 1: one thread per intermediate column z, all tokens of the tile at once.
    for (int z = threadIdx.x; z < width; z += blockDim.x) {
        const int m = mid_index(z, G, p.l, j0);
        const int xcol0 = (m / p.q) * p.p;
        const T* wrow = w1 + static_cast<int64_t>(m) * p.p;
        const int pmax = min(p.p, p.x_cols - xcol0);  // columns past x_cols are zero
        float acc[NT] = {};
        for (int pp = 0; pp < pmax; ++pp) {
            const float w = to_f32(wrow[pp]);
#pragma unroll
            for (int b = 0; b < NT; ++b) {
                if (b < nt) acc[b] += w * to_f32(x[(tok0 + b) * p.x_row_stride + xcol0 + pp]);
            }
        }
        const int col = onchip_column(z, G, p.r);
#pragma unroll
        for (int b = 0; b < NT; ++b) {
            if (b < nt) hs[b * p.h_stride + col] = to_f32(from_f32<T>(acc[b]));
        }
    }
    __syncthreads();

    // Stage 2: one thread per output (block j0 + jl, row t).
    for (int o = threadIdx.x; o < G * p.s; o += blockDim.x) {
        const int jl = o / p.s, t = o % p.s, j = j0 + jl;
        const int col = t * p.l + j;
        if (col >= p.y_cols) continue;
        const T* wrow = w2 + (static_cast<int64_t>(j) * p.s + t) * p.r;
        const float* hcol = hs + jl * p.r;
        float acc[NT] = {};
        for (int rr = 0; rr < p.r; ++rr) {
            const float w = to_f32(wrow[rr]);
#pragma unroll
            for (int b = 0; b < NT; ++b) {
                if (b < nt) acc[b] += w * hcol[b * p.h_stride + rr];
            }
        }
        const float add = bias ? to_f32(bias[col]) : 0.0f;
#pragma unroll
        for (int b = 0; b < NT; ++b) {
            if (b < nt) y[(tok0 + b) * p.y_row_stride + col] = from_f32<T>(acc[b] + add);
        }
    }
}

template <int MT>
__device__ __forceinline__ void dispatch_mma(const MonarchParams& p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F16: forward_mma<__half, MT>(p); break;
        case ATTNKIT_DTYPE_BF16: forward_mma<__nv_bfloat16, MT>(p); break;
        default: break;  // the host sends f32 to the simt kernel
    }
}

}  // namespace monarch

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS)
    monarch_forward_mma1(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<1>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS)
    monarch_forward_mma2(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<2>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS)
    monarch_forward_mma4(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<4>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_SIMT_THREADS)
    monarch_forward_simt(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: monarch::forward_simt<float>(p); break;
        case ATTNKIT_DTYPE_F16: monarch::forward_simt<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::forward_simt<__nv_bfloat16>(p); break;
        default: break;  // the host validates dtype before launch
    }
}

ATTNKIT_DEFINE_PARAMS_ECHO(MonarchParams)
