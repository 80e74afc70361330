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
//   16*MT tokens per CTA, 8 warps (a 130 KB tile leaves one CTA per SM: 8 warps hide more
//   latency than 4; mt = 4 takes 115 registers per thread on sm_80, no spills). Stage 1: each warp
//   takes 16-column tiles of the group's h (the host guarantees a tile never straddles two
//   input blocks), A = x rows, B = the w1 rows of those columns, K = p, both copied by
//   cp.async into the warp's own double buffer 32 of K a step ahead (WarpStage) and read by
//   ldmatrix; the f32 sums are rounded to T and stored block-major in shared memory. Stage 2:
//   each warp takes 16-output tiles of one block j, A = h by ldmatrix from shared memory,
//   B = w2 rows staged as in stage 1, K = r; epilogue adds the bias and stores y[t*l + j].
//   Needs p, r, s multiples of 16, x rows 16-byte aligned (stride a multiple of 8, aligned
//   base) and 16-byte aligned weights; the host sends anything else to the simt kernel.
// - monarch_product_simt: any shape, any dtype (the f32 path), h in f32 shared memory (rounded
//   to T first, as the mma path sees it), one thread per intermediate column then per output,
//   up to 8 tokens per CTA. It also runs the transpose product M^T x (dx of the backward
//   pass): groups of w1 blocks i, the intermediate g = blockdiag(w2)^T x for the columns
//   i*q.. those blocks read, then y[i*p + pp] = w1[i][:, pp] . g_i.
//
// Backward, bf16/f16: two launches of tensor-core tiles (gemm_tile: 64 x 64, the contraction
// in steps of 32 through shared memory): monarch_backward_mid_mma recomputes h and computes
// dh into the caller's workspace, monarch_backward_weights_mma then dw2, dw1 and dx (from dh,
// the transpose's first stage) and dbias. f32: monarch_backward_mid and
// monarch_backward_weights on CUDA cores (each entry sums the tokens in order, as the CPU
// path), then the transpose product for dx.
//
// History: v1 loaded the forward's mma fragments straight from global memory (4-byte loads,
// x and the weights L2-resident); v2 (this file) stages them per warp with cp.async and reads
// them by ldmatrix (h too). Neither has run on a GPU.
#include "common.cuh"
#include "monarch.cuh"

extern __shared__ __align__(128) unsigned char monarch_smem[];

namespace monarch {

// A warp's private operand staging of the forward kernel: two buffers of A (BM rows) and two of
// B (16 rows), 32 of the contraction each, in OperandTile<false>'s [rows][32 k] layout, after
// h in shared memory (ATTNKIT_MONARCH_STAGE_BYTES per warp). Chunks are copied with cp.async a
// step ahead: `copy` issues one step's chunks and commits them as one group.
template <int MT> struct WarpStage {
    static constexpr int BM = 16 * MT, A_BYTES = BM * 64, B_BYTES = 16 * 64;
    static_assert(2 * (A_BYTES + B_BYTES) == ATTNKIT_MONARCH_STAGE_BYTES(MT), "the host's staging size");
    using Tile = OperandTile<false>::Tile;
    uint32_t base;
    __device__ __forceinline__ uint32_t a(int buf) const { return base + buf * A_BYTES; }
    __device__ __forceinline__ uint32_t b(int buf) const { return base + 2 * A_BYTES + buf * B_BYTES; }
    // Copies the ROWS x 4 chunks of a tile at dst, the lanes taking chunk c = lane % 4 of row
    // lane / 4 + 8u: chunk(u, c, src) sets the source and returns its bytes (16, fewer for a
    // partial chunk, 0 for a zero-filled one).
    template <int ROWS, typename F>
    __device__ static __forceinline__ void copy_rows(uint32_t dst, int lane, F chunk) {
#pragma unroll
        for (int u = 0; u < ROWS / 8; ++u) {
            const int row = lane / 4 + 8 * u, c = lane % 4;
            const void* src;
            const int bytes = chunk(u, c, src);
            cp_async_16_zfill(dst + Tile::offset(row, c), src, bytes);
        }
    }
};

// acc[mt][n8] += A B over one staged step of stage 1: A rows mt*16.. of `a_tile`, B the 16
// columns of `b_tile`, `ksteps` (1 or 2) k16 steps (2 unless K ends half way through).
template <typename T, int MT>
__device__ __forceinline__ void mma_step(float (&acc)[MT][2][4], uint32_t a_tile, uint32_t b_tile, int ksteps,
                                         int lane) {
    const auto ca = OperandTile<false>::cursor<true>(a_tile, 0, lane);
    const auto cb = OperandTile<false>::cursor<false>(b_tile, 0, lane);
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
        if (kc < ksteps) {
            uint32_t bf[4];
            OperandTile<false>::frag(bf, cb, kc, 0);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t af[4];
                OperandTile<false>::frag(af, ca, kc, mt);
                mma_16816<T>(acc[mt][0], af, bf[0], bf[1]);
                mma_16816<T>(acc[mt][1], af, bf[2], bf[3]);
            }
        }
    }
}

template <typename T, int MT>
__device__ __forceinline__ void forward_mma(const MonarchParams& p) {
    constexpr int BM = 16 * MT;
    using Stage = WarpStage<MT>;
    T* hs = reinterpret_cast<T*>(monarch_smem);  // h: [BM][h_stride], block-major columns
    const T* x = static_cast<const T*>(p.x);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    const int groups = p.l / p.group;
    const int64_t tok0 = static_cast<int64_t>(blockIdx.x / groups) * BM;
    const int j0 = static_cast<int>(blockIdx.x % groups) * p.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c4 = lane % 4;  // c4: copy chunk
    const int nwarps = blockDim.x / 32;
    const int G = p.group, width = G * p.r;
    // h takes BM * h_stride * 2 bytes, a multiple of 256 (h_stride is a multiple of 8): the
    // staging after it starts 128-byte aligned.
    const Stage st{smem_addr(monarch_smem + BM * p.h_stride * 2 + warp * ATTNKIT_MONARCH_STAGE_BYTES(MT))};

    // Stage 1: h[:, z0..z0+16) = x_i . w1[rows m(z)]^T, K = p, 32 a step through the warp's
    // staging (x rows past the last token and columns past x_cols arrive as zeros). This
    // lane's x rows (lane / 4 + 8u of the token tile; null past the last token), every tile's.
    const int steps1 = (p.p + 31) / 32;
    const T* xrow[BM / 8];
#pragma unroll
    for (int u = 0; u < BM / 8; ++u) {
        const int64_t tok = tok0 + lane / 4 + 8 * u;
        xrow[u] = tok < p.tokens ? x + tok * p.x_row_stride : nullptr;
    }
    for (int tile = warp; tile < width / 16; tile += nwarps) {
        const int z0 = tile * 16;
        const int xcol0 = (mid_index(z0, G, p.l, j0) / p.q) * p.p;  // input block i, same for the tile
        // This lane's two w1 rows of the B tile (rows lane / 4 and lane / 4 + 8; row m of w1 is
        // column m of h).
        const T* wrow[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            wrow[u] = w1 + static_cast<int64_t>(mid_index(z0 + lane / 4 + 8 * u, G, p.l, j0)) * p.p;
        }
        auto copy = [&](int s) {
            const int k0 = s * 32, buf = s & 1;
            const int col = xcol0 + k0 + 8 * c4, in = k0 + 8 * c4 < p.p;
            const int xbytes = in ? max(0, min(16, (p.x_cols - col) * 2)) : 0;
            Stage::template copy_rows<BM>(st.a(buf), lane, [&](int u, int, const void*& src) {
                const int bytes = xrow[u] ? xbytes : 0;
                src = bytes > 0 ? xrow[u] + col : x;
                return bytes;
            });
            Stage::template copy_rows<16>(st.b(buf), lane, [&](int u, int, const void*& src) {
                src = in ? wrow[u] + k0 + 8 * c4 : w1;
                return in ? 16 : 0;
            });
            cp_async_commit();
        };
        float acc[MT][2][4] = {};
        copy(0);
        for (int s = 0; s < steps1; ++s) {
            if (s + 1 < steps1) {
                copy(s + 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncwarp();  // every lane's chunks of step s have landed
            mma_step<T, MT>(acc, st.a(s & 1), st.b(s & 1), min(2, (p.p - s * 32) / 16), lane);
            __syncwarp();  // read before step s + 2 refills the buffer
        }
        // h rounded to T (the next stage's tensor-core operand), block-major on chip.
        for_each_acc<MT>(acc, lane, [&](int row, int col, float v) {
            hs[row * p.h_stride + onchip_column(z0 + col, G, p.r)] = from_f32<T>(v);
        });
    }
    __syncthreads();

    // Stage 2: y[:, t*l + j] for t in t0..t0+16 = h_j . w2[j][t0..]^T, K = r: A straight from h
    // by ldmatrix (rows h_stride apart, an odd number of 16-byte units: conflict-free), B
    // staged as in stage 1.
    const int ttiles = p.s / 16, steps2 = (p.r + 31) / 32;
    for (int tile = warp; tile < G * ttiles; tile += nwarps) {
        const int jl = tile / ttiles, t0 = (tile % ttiles) * 16, j = j0 + jl;
        const T* wrow[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) wrow[u] = w2 + (static_cast<int64_t>(j) * p.s + t0 + lane / 4 + 8 * u) * p.r;
        auto copy = [&](int s) {
            const int k0 = s * 32;
            const bool in = k0 + 8 * c4 < p.r;
            Stage::template copy_rows<16>(st.b(s & 1), lane, [&](int u, int, const void*& src) {
                src = in ? wrow[u] + k0 + 8 * c4 : w2;
                return in ? 16 : 0;
            });
            cp_async_commit();
        };
        // This lane's ldmatrix row of h: (mt*16 +) (lane & 7) + 8 * bit 3, 8 columns in at bit 4.
        const uint32_t hrow = smem_addr(hs + ((lane & 7) + ((lane >> 3) & 1) * 8) * p.h_stride + jl * p.r + (lane >> 4) * 8);
        float acc[MT][2][4] = {};
        copy(0);
        for (int s = 0; s < steps2; ++s) {
            if (s + 1 < steps2) {
                copy(s + 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncwarp();
            const auto cb = OperandTile<false>::cursor<false>(st.b(s & 1), 0, lane);
            const int ksteps = min(2, (p.r - s * 32) / 16);
#pragma unroll
            for (int kc = 0; kc < 2; ++kc) {
                if (kc < ksteps) {
                    uint32_t bf[4];
                    OperandTile<false>::frag(bf, cb, kc, 0);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        uint32_t af[4];
                        ldmatrix_x4(af, hrow + (mt * 16 * p.h_stride + s * 32 + kc * 16) * 2);
                        mma_16816<T>(acc[mt][0], af, bf[0], bf[1]);
                        mma_16816<T>(acc[mt][1], af, bf[2], bf[3]);
                    }
                }
            }
            __syncwarp();
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

// acc[b] += sum_e w[e*w_step] * src[b*src_rows + col0 + e*col_step] for the nt tokens of a
// tile, e < len, stopping at column col_limit (columns past it read as zero): the one loop of
// both simt stages, forward and transpose.
template <int NT, typename T, typename S>
__device__ __forceinline__ void dot_tokens(float (&acc)[NT], const T* w, int w_step, const S* src,
                                           int64_t src_rows, int col0, int col_step, int len,
                                           int col_limit, int nt) {
    for (int e = 0; e < len; ++e) {
        const int col = col0 + e * col_step;
        if (col >= col_limit) break;  // columns grow with e
        const float wv = to_f32(w[static_cast<int64_t>(e) * w_step]);
#pragma unroll
        for (int b = 0; b < NT; ++b) {
            if (b < nt) acc[b] += wv * to_f32(src[b * src_rows + col]);
        }
    }
}

// Forward (p.transpose == 0) or transpose product on CUDA cores: any shape, any dtype.
template <typename T>
__device__ __forceinline__ void product_simt(const MonarchParams& p) {
    constexpr int NT = ATTNKIT_MONARCH_SIMT_TOKENS;
    float* hs = reinterpret_cast<float*>(monarch_smem);  // [bm][h_stride] f32
    const T* x = static_cast<const T*>(p.x);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    const bool tr = p.transpose != 0;
    const int G = p.group;
    const int groups = (tr ? p.k : p.l) / G;
    const int bm = p.block_tokens;
    const int64_t tok0 = static_cast<int64_t>(blockIdx.x / groups) * bm;
    const int b0 = static_cast<int>(blockIdx.x % groups) * G;  // first output block (j or i)
    // Tokens of this tile that exist (bm <= NT, checked by the host).
    const int nt = static_cast<int>(min(static_cast<int64_t>(bm), p.tokens - tok0));
    const T* xt = x + tok0 * p.x_row_stride;

    // Stage 1: one thread per intermediate column z, all tokens of the tile at once; the value
    // is rounded to T, as the mma path and the CPU path round it.
    const int width = G * (tr ? p.q : p.r);
    for (int z = threadIdx.x; z < width; z += blockDim.x) {
        float acc[NT] = {};
        if (!tr) {
            // h[m] = w1 row m . x[i*p ..], m = rr*l + j; stored block-major.
            const int m = mid_index(z, G, p.l, b0);
            dot_tokens<NT>(acc, w1 + static_cast<int64_t>(m) * p.p, 1, xt, p.x_row_stride,
                           (m / p.q) * p.p, 1, p.p, p.x_cols, nt);
        } else {
            // g[m] = sum_t w2[j][t][rr] x[t*l + j], m = i0*q + z = rr*l + j; stored as z.
            const int m = b0 * p.q + z, j = m % p.l, rr = m / p.l;
            dot_tokens<NT>(acc, w2 + static_cast<int64_t>(j) * p.s * p.r + rr, p.r, xt,
                           p.x_row_stride, j, p.l, p.s, p.x_cols, nt);
        }
        const int col = tr ? z : onchip_column(z, G, p.r);
#pragma unroll
        for (int b = 0; b < NT; ++b) {
            if (b < nt) hs[b * p.h_stride + col] = to_f32(from_f32<T>(acc[b]));
        }
    }
    __syncthreads();

    // Stage 2: one thread per output (block b0 + bl, row e of the block).
    const int per_block = tr ? p.p : p.s;
    for (int o = threadIdx.x; o < G * per_block; o += blockDim.x) {
        const int bl = o / per_block, e = o % per_block, blk = b0 + bl;
        // Forward: y[t*l + j] = w2[j][t] . h_j; transpose: y[i*p + pp] = w1[i][:, pp] . g_i.
        const int col = tr ? blk * p.p + e : e * p.l + blk;
        if (col >= p.y_cols) continue;
        float acc[NT] = {};
        if (!tr) {
            dot_tokens<NT>(acc, w2 + (static_cast<int64_t>(blk) * p.s + e) * p.r, 1, hs,
                           p.h_stride, bl * p.r, 1, p.r, width, nt);
        } else {
            dot_tokens<NT>(acc, w1 + static_cast<int64_t>(blk) * p.q * p.p + e, p.p, hs,
                           p.h_stride, bl * p.q, 1, p.q, width, nt);
        }
        const float add = bias ? to_f32(bias[col]) : 0.0f;
#pragma unroll
        for (int b = 0; b < NT; ++b) {
            if (b < nt) y[(tok0 + b) * p.y_row_stride + col] = from_f32<T>(acc[b] + add);
        }
    }
}

// Backward, step 1: for every (token, m), h[m] = w1 row m . x[i*p ..] and
// dh[m] = sum_t w2[j][t][rr] dy[t*l + j] (m = rr*l + j), both rounded to T as the forward pass
// rounds h; f32 into the workspace. One thread per value, grid-stride.
template <typename T>
__device__ __forceinline__ void backward_mid(const MonarchParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const int64_t n_mid = static_cast<int64_t>(p.k) * p.q;
    const int64_t total = p.tokens * n_mid;
    float* h = static_cast<float*>(p.workspace);
    float* dh = h + total;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t tok = e / n_mid;
        const int m = static_cast<int>(e % n_mid), j = m % p.l, rr = m / p.l;
        float acc[1] = {0.0f};
        dot_tokens<1>(acc, w1 + static_cast<int64_t>(m) * p.p, 1, x + tok * p.x_row_stride, 0,
                      (m / p.q) * p.p, 1, p.p, p.x_cols, 1);
        h[e] = to_f32(from_f32<T>(acc[0]));
        float grad[1] = {0.0f};
        dot_tokens<1>(grad, w2 + static_cast<int64_t>(j) * p.s * p.r + rr, p.r,
                      dy + tok * p.dy_row_stride, 0, j, p.l, p.s, p.l * p.s, 1);
        dh[e] = to_f32(from_f32<T>(grad[0]));
    }
}

// sum over tokens of dy[tok][o], in token order (dbias).
template <typename T>
__device__ __forceinline__ float column_sum(const T* dy, int64_t row_stride, int64_t tokens, int64_t o) {
    float acc = 0.0f;
    for (int64_t tok = 0; tok < tokens; ++tok) acc += to_f32(dy[tok * row_stride + o]);
    return acc;
}

// Backward, step 2: one thread per weight-gradient entry, summing over tokens in order (the
// CPU path's order): dw2[j][t][rr] = sum dy[t*l + j] h[rr*l + j], then
// dw1[i][c][pp] = sum dh[i*q + c] x[i*p + pp], then dbias[o] = sum dy[o].
template <typename T>
__device__ __forceinline__ void backward_weights(const MonarchParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    const int64_t n_mid = static_cast<int64_t>(p.k) * p.q;
    const float* h = static_cast<const float*>(p.workspace);
    const float* dh = h + p.tokens * n_mid;
    const int64_t n_w2 = static_cast<int64_t>(p.l) * p.s * p.r;
    const int64_t n_w1 = static_cast<int64_t>(p.k) * p.q * p.p;
    const int64_t n_b = p.dbias ? static_cast<int64_t>(p.l) * p.s : 0;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         e < n_w2 + n_w1 + n_b; e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float acc = 0.0f;
        if (e < n_w2) {
            const int j = static_cast<int>(e / (static_cast<int64_t>(p.s) * p.r));
            const int t = static_cast<int>((e / p.r) % p.s), rr = static_cast<int>(e % p.r);
            const int col = t * p.l + j, m = rr * p.l + j;
            for (int64_t tok = 0; tok < p.tokens; ++tok) {
                acc += to_f32(dy[tok * p.dy_row_stride + col]) * h[tok * n_mid + m];
            }
            static_cast<float*>(p.dw2)[e] = acc;
        } else if (e < n_w2 + n_w1) {
            const int64_t e1 = e - n_w2;
            const int i = static_cast<int>(e1 / (static_cast<int64_t>(p.q) * p.p));
            const int c = static_cast<int>((e1 / p.p) % p.q), pp = static_cast<int>(e1 % p.p);
            const int m = i * p.q + c, col = i * p.p + pp;
            for (int64_t tok = 0; tok < p.tokens; ++tok) {
                acc += dh[tok * n_mid + m] * to_f32(x[tok * p.x_row_stride + col]);
            }
            static_cast<float*>(p.dw1)[e1] = acc;
        } else {
            const int64_t o = e - n_w2 - n_w1;
            static_cast<float*>(p.dbias)[o] = column_sum(dy, p.dy_row_stride, p.tokens, o);
        }
    }
}

// Stages one operand of gemm_tile through registers into an OperandTile: global loads (with
// the conversion to T a gather or the f32 workspace needs) a step ahead, then 16-byte stores.
template <bool K_MAJOR> struct GemmStage : OperandTile<K_MAJOR> {
    using O = OperandTile<K_MAJOR>;
    static constexpr int CHUNKS = O::ROWS * O::ROW_CHUNKS / ATTNKIT_MONARCH_GRAD_THREADS;  // per thread
    uint4 r[CHUNKS];
    // Loads the chunks of the step at contraction offset k0 into registers.
    template <typename T, typename S, bool U>
    __device__ __forceinline__ void fetch(const Strided<S, U>& op, int64_t k0, int tid) {
#pragma unroll
        for (int u = 0; u < CHUNKS; ++u) {
            const int id = tid + u * ATTNKIT_MONARCH_GRAD_THREADS, row = id / O::ROW_CHUNKS, c = id % O::ROW_CHUNKS;
            r[u] = K_MAJOR ? op.template chunk<T>(k0 + row, 8 * c) : op.template chunk<T>(row, k0 + 8 * c);
        }
    }
    __device__ __forceinline__ void store(unsigned char* tile, int tid) const {
#pragma unroll
        for (int u = 0; u < CHUNKS; ++u) {
            const int id = tid + u * ATTNKIT_MONARCH_GRAD_THREADS;
            *reinterpret_cast<uint4*>(tile + O::Tile::offset(id / O::ROW_CHUNKS, id % O::ROW_CHUNKS)) = r[u];
        }
    }
};

// out = A B on tensor cores for one 64 x 64 tile, A: [64 x K] (a(m, k)), B: [K x 64] (b(k, n)),
// the contraction K in steps of 32 (KA / KB: whether A / B are staged k-major, see Strided):
// four warps of 32 x 32 (each B fragment serves two row tiles), both operands staged as T in
// two swizzled buffers; one barrier a step: the step's chunks are stored, the barrier, then
// the next step's global loads are issued into registers before this step's mma, so they
// overlap it; a buffer is rewritten only two steps later, after every warp has passed the
// barrier between. Sums in f32 (the order differs from the CUDA-core kernels').
template <typename T, bool KA, bool KB, bool ROUND, typename SA, bool UA, typename SB, bool UB, typename O>
__device__ __forceinline__ void gemm_tile(const Strided<SA, UA>& a, const Strided<SB, UB>& b, int64_t K,
                                          const StridedOut<O>& out) {
    constexpr int BK = 32, TILE_BYTES = 32 * 64 * 2;
    static_assert(ATTNKIT_MONARCH_GRAD_TILE == 64 && ATTNKIT_MONARCH_GRAD_THREADS == 128, "four warps of 32 x 32");
    static_assert(ATTNKIT_MONARCH_GRAD_SMEM == 2 * 2 * TILE_BYTES, "the host's shared-memory size");
    // [buffer][A, B] (dynamic shared memory: the host asks for ATTNKIT_MONARCH_GRAD_SMEM).
    auto stage = reinterpret_cast<unsigned char(*)[2][TILE_BYTES]>(monarch_smem);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = warp >> 1, wn = warp & 1;
    GemmStage<KA> sa;
    GemmStage<KB> sb;
    float acc[2][4][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) zero_frags(acc[mt]);
    const int64_t steps = (K + BK - 1) / BK;
    sa.template fetch<T>(a, 0, tid);
    sb.template fetch<T>(b, 0, tid);
    for (int64_t kt = 0; kt < steps; ++kt) {
        unsigned char* ta = stage[kt & 1][0];
        unsigned char* tb = stage[kt & 1][1];
        sa.store(ta, tid);
        sb.store(tb, tid);
        __syncthreads();
        if (kt + 1 < steps) {
            sa.template fetch<T>(a, (kt + 1) * BK, tid);
            sb.template fetch<T>(b, (kt + 1) * BK, tid);
        }
        const auto ca = OperandTile<KA>::template cursor<true>(smem_addr(ta), wm, lane);
        const auto cb = OperandTile<KB>::template cursor<false>(smem_addr(tb), wn, lane);
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
            uint32_t af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) OperandTile<KA>::frag(af[mt], ca, kc, mt);
#pragma unroll
            for (int n2 = 0; n2 < 2; ++n2) {
                uint32_t bf[4];
                OperandTile<KB>::frag(bf, cb, kc, n2);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_16816<T>(acc[mt][2 * n2], af[mt], bf[0], bf[1]);
                    mma_16816<T>(acc[mt][2 * n2 + 1], af[mt], bf[2], bf[3]);
                }
            }
        }
    }
    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = wm * 32 + mt * 16 + g + (e >= 2 ? 8 : 0);
                const int col = wn * 32 + nt * 8 + 2 * tq + (e & 1);
                if (row < out.rows && col < out.cols) {
                    const float v = ROUND ? to_f32(from_f32<T>(acc[mt][nt][e])) : acc[mt][nt][e];
                    out.base[row * out.row_stride + col * out.col_stride] = from_f32<O>(v);
                }
            }
        }
    }
}

// Which tile of a [rows x cols] product of 64 x 64 tiles CTA-relative index `t` is.
struct TileAt {
    int64_t row0, col0;
    __device__ __forceinline__ TileAt(int64_t t, int64_t cols) {
        const int64_t tn = (cols + ATTNKIT_MONARCH_GRAD_TILE - 1) / ATTNKIT_MONARCH_GRAD_TILE;
        row0 = t / tn * ATTNKIT_MONARCH_GRAD_TILE;
        col0 = t % tn * ATTNKIT_MONARCH_GRAD_TILE;
    }
};
__device__ __forceinline__ int64_t tiles_of(int64_t rows, int64_t cols) {
    constexpr int T = ATTNKIT_MONARCH_GRAD_TILE;
    return (rows + T - 1) / T * ((cols + T - 1) / T);
}

// Backward, step 1 on tensor cores (bf16/f16): h_i = X_i W1_i^T ([tokens x q] per w1 block i,
// K = p) and dh_j = dY_j W2_j ([tokens x r] per w2 block j, dY_j[tok][t] = dy[tok][t*l + j],
// K = s, stored at h columns rr*l + j), both rounded to T into the f32 workspace: the h tiles
// of every i, then the dh tiles of every j (grid as monarch.h states).
template <typename T>
__device__ __forceinline__ void backward_mid_mma(const MonarchParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    const T* w1 = static_cast<const T*>(p.w1);
    const T* w2 = static_cast<const T*>(p.w2);
    const int64_t n_mid = static_cast<int64_t>(p.k) * p.q, T_ = p.tokens;
    float* h = static_cast<float*>(p.workspace);
    float* dh = h + T_ * n_mid;
    const int64_t per_h = tiles_of(T_, p.q), n_h = p.k * per_h;
    const int64_t cta = blockIdx.x;
    if (cta < n_h) {
        const int64_t i = cta / per_h;
        const TileAt t(cta % per_h, p.q);
        const int64_t xcol = i * p.p;
        // a(tok, pp) = x[tok][i*p + pp], contiguous along k; b(pp, c) = w1[i][c][pp], too.
        const Strided<T, true> a{x + t.row0 * p.x_row_stride + xcol, p.x_row_stride, 1, T_ - t.row0,
                           max(int64_t{0}, min(int64_t{p.p}, p.x_cols - xcol))};
        const Strided<T, true> b{w1 + (i * p.q + t.col0) * p.p, p.p, 1, p.q - t.col0, p.p};
        const StridedOut<float> o{h + t.row0 * n_mid + i * p.q + t.col0, n_mid, 1, T_ - t.row0, p.q - t.col0};
        gemm_tile<T, false, false, true>(a, b, p.p, o);
    } else {
        const int64_t per_dh = tiles_of(T_, p.r), rest = cta - n_h;
        const int64_t j = rest / per_dh;
        if (j >= p.l) return;
        const TileAt t(rest % per_dh, p.r);
        // a(tok, t) = dy[tok][t*l + j] (strided both ways); b(t, rr) = w2[j][t][rr], contiguous
        // along the free index rr: staged k-major.
        const Strided<T, false> a{dy + t.row0 * p.dy_row_stride + j, p.dy_row_stride, p.l, T_ - t.row0, p.s};
        const Strided<T, true> b{w2 + j * p.s * p.r + t.col0, p.r, 1, p.s, p.r - t.col0};
        const StridedOut<float> o{dh + t.row0 * n_mid + t.col0 * p.l + j, n_mid, p.l, T_ - t.row0, p.r - t.col0};
        gemm_tile<T, false, true, true>(a, b, p.s, o);
    }
}

// Backward, step 2 on tensor cores (bf16/f16, any block shape): every weight-gradient block is
// a product over tokens, dw2[j] = dY_j^T H_j ([s x r], dY_j[tok][t] = dy[tok][t*l + j],
// H_j[tok][rr] = h[tok][rr*l + j]) and dw1[i] = dH_i^T X_i ([q x p], the columns i*q.. of dh
// and i*p.. of x), and dx_i = dH_i W1_i ([tokens x p], K = q: the transpose product's second
// stage, its first being dh): 64 x 64 tiles, after the CTAs that sum dbias one thread a
// column, in the order monarch.h states.
template <typename T>
__device__ __forceinline__ void backward_weights_mma(const MonarchParams& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    const T* w1 = static_cast<const T*>(p.w1);
    const int64_t n_mid = static_cast<int64_t>(p.k) * p.q, T_ = p.tokens;
    const float* h = static_cast<const float*>(p.workspace);
    const float* dh = h + T_ * n_mid;
    const int64_t per2 = tiles_of(p.s, p.r), n2 = p.l * per2;
    const int64_t per1 = tiles_of(p.q, p.p), n1 = p.k * per1;
    const int64_t perx = tiles_of(T_, p.p), nx = p.k * perx;
    // dbias first: its CTAs stream every token of dy one thread a column, the longest runs.
    const int64_t nb = p.dbias ? (static_cast<int64_t>(p.l) * p.s + blockDim.x - 1) / blockDim.x : 0;
    if (static_cast<int64_t>(blockIdx.x) < nb) {
        const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (o < static_cast<int64_t>(p.l) * p.s) static_cast<float*>(p.dbias)[o] = column_sum(dy, p.dy_row_stride, p.tokens, o);
        return;
    }
    const int64_t cta = blockIdx.x - nb;
    if (cta < n2) {
        const int64_t j = cta / per2;
        const TileAt t(cta % per2, p.r);
        // a(t, tok) = dy[tok][t*l + j], b(tok, rr) = h[tok][rr*l + j]: k-major (tokens) both.
        const Strided<T, false> a{dy + t.row0 * p.l + j, p.dy_row_stride, p.l, T_, p.s - t.row0};
        const Strided<float, false> b{h + t.col0 * p.l + j, n_mid, p.l, T_, p.r - t.col0};
        const StridedOut<float> o{static_cast<float*>(p.dw2) + (j * p.s + t.row0) * p.r + t.col0, p.r, 1,
                                  p.s - t.row0, p.r - t.col0};
        gemm_tile<T, true, true, false>(a, b, T_, o);
    } else if (cta < n2 + n1) {
        const int64_t i = (cta - n2) / per1;
        const TileAt t((cta - n2) % per1, p.p);
        const int64_t xcol = i * p.p + t.col0;
        // a(c, tok) = dh[tok][i*q + c], b(tok, pp) = x[tok][i*p + pp]: k-major, contiguous rows.
        const Strided<float, true> a{dh + i * p.q + t.row0, n_mid, 1, T_, p.q - t.row0};
        const Strided<T, true> b{x + xcol, p.x_row_stride, 1, T_, max(int64_t{0}, min(p.p - t.col0, p.x_cols - xcol))};
        const StridedOut<float> o{static_cast<float*>(p.dw1) + (i * p.q + t.row0) * p.p + t.col0, p.p, 1,
                                  p.q - t.row0, p.p - t.col0};
        gemm_tile<T, true, true, false>(a, b, T_, o);
    } else if (cta < n2 + n1 + nx) {
        const int64_t i = (cta - n2 - n1) / perx;
        const TileAt t((cta - n2 - n1) % perx, p.p);
        // a(tok, c) = dh[tok][i*q + c], contiguous along k; b(c, pp) = w1[i][c][pp], along pp.
        const Strided<float, true> a{dh + t.row0 * n_mid + i * p.q, n_mid, 1, T_ - t.row0, p.q};
        const Strided<T, true> b{w1 + i * p.q * p.p + t.col0, p.p, 1, p.q, p.p - t.col0};
        const StridedOut<T> o{static_cast<T*>(p.y) + t.row0 * p.y_row_stride + i * p.p + t.col0, p.y_row_stride, 1,
                              T_ - t.row0, min(p.p - t.col0, p.y_cols - i * p.p - t.col0)};
        gemm_tile<T, false, true, false>(a, b, p.q, o);
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

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS, 1)
    monarch_forward_mma1(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<1>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS, 1)
    monarch_forward_mma2(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<2>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_MMA_THREADS, 1)
    monarch_forward_mma4(const __grid_constant__ MonarchParams p) {
    monarch::dispatch_mma<4>(p);
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_SIMT_THREADS)
    monarch_product_simt(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: monarch::product_simt<float>(p); break;
        case ATTNKIT_DTYPE_F16: monarch::product_simt<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::product_simt<__nv_bfloat16>(p); break;
        default: break;  // the host validates dtype before launch
    }
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_SIMT_THREADS)
    monarch_backward_mid(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: monarch::backward_mid<float>(p); break;
        case ATTNKIT_DTYPE_F16: monarch::backward_mid<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::backward_mid<__nv_bfloat16>(p); break;
        default: break;
    }
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_GRAD_THREADS)
    monarch_backward_mid_mma(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F16: monarch::backward_mid_mma<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::backward_mid_mma<__nv_bfloat16>(p); break;
        default: break;  // the host sends f32 to monarch_backward_mid
    }
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_GRAD_THREADS)
    monarch_backward_weights_mma(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F16: monarch::backward_weights_mma<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::backward_weights_mma<__nv_bfloat16>(p); break;
        default: break;  // the host sends f32 to monarch_backward_weights
    }
}

extern "C" __global__ void __launch_bounds__(ATTNKIT_MONARCH_SIMT_THREADS)
    monarch_backward_weights(const __grid_constant__ MonarchParams p) {
    switch (p.dtype) {
        case ATTNKIT_DTYPE_F32: monarch::backward_weights<float>(p); break;
        case ATTNKIT_DTYPE_F16: monarch::backward_weights<__half>(p); break;
        case ATTNKIT_DTYPE_BF16: monarch::backward_weights<__nv_bfloat16>(p); break;
        default: break;
    }
}

ATTNKIT_DEFINE_PARAMS_ECHO(MonarchParams)
