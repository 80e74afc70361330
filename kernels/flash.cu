// FlashAttention forward: O = softmax(scale Q K^T + mask) V and the row log-sum-exp, one query
// tile per thread block, never materialising the score matrix.
//
// Tensor-core path (f16, bf16), per block of BM = 16 * WARPS query rows:
//   load Q tile (cp.async) ........................................ shared, swizzled
//   for each key tile j (BN keys; causal: only tiles left of the diagonal):
//     S = Q K_j^T          mma.sync m16n8k16, f32 accumulators, each warp its 16 rows
//     [K_{j+1} load overlaps the softmax and P V]
//     mask (seq_k bound, causal), online softmax in the exp2 domain (scale * log2 e folded in)
//     O = O * exp2(m_old - m_new) + P V_j   (P re-packed from S's accumulators, no smem trip)
//     [V_{j+1} load overlaps the next S]
//   O /= l; LSE = (m + log2 l) * ln 2; O staged through the warp's own Q rows, 16-byte stores.
// f32 path: the same online softmax on CUDA cores, exact to f32 rounding.
//
// History: v1 (this file) is FA2's sm80 structure, written without a GPU at hand: not yet
// measured or tuned.
#include "common.cuh"
#include "flash.h"

namespace {

constexpr float LN2 = 0.6931471805599453f;

// Where one (sequence, head) lives, resolved once per block.
struct Seq {
    int seq_q, seq_k;     // rows and keys of this sequence
    int64_t q_off, k_off, v_off, o_off;  // element offsets of row 0 for this head
    int64_t lse_off;      // offset of row 0 in lse
    bool valid;
};

__device__ __forceinline__ Seq locate(const FlashParams& p, int b, int h) {
    Seq s;
    const int hk = h / (p.heads_q / p.heads_kv);
    int64_t q_row0 = 0, k_row0 = 0;
    s.valid = true;
    if (p.cu_seqlens_q != nullptr) {
        const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
        const int k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
        // The host validated its copy; the device copy is re-checked so a stale one can never
        // send a read or write out of bounds.
        s.valid = 0 <= q0 && q0 <= q1 && q1 <= p.total_q && 0 <= k0 && k0 <= k1 && k1 <= p.total_k;
        q_row0 = q0;
        k_row0 = k0;
        s.seq_q = q1 - q0;
        s.seq_k = k1 - k0;
        s.q_off = q_row0 * p.q_row_stride + h * p.q_head_stride;
        s.k_off = k_row0 * p.k_row_stride + hk * p.k_head_stride;
        s.v_off = k_row0 * p.v_row_stride + hk * p.v_head_stride;
        s.o_off = q_row0 * p.o_row_stride + h * p.o_head_stride;
        s.lse_off = h * p.lse_head_stride + q_row0;
    } else {
        s.seq_q = p.seq_q;
        s.seq_k = p.seq_k;
        s.q_off = b * p.q_batch_stride + h * p.q_head_stride;
        s.k_off = b * p.k_batch_stride + hk * p.k_head_stride;
        s.v_off = b * p.v_batch_stride + hk * p.v_head_stride;
        s.o_off = b * p.o_batch_stride + h * p.o_head_stride;
        s.lse_off = b * p.lse_batch_stride + h * p.lse_head_stride;
    }
    return s;
}

// Number of key tiles a query tile [m0, m0 + BM) must visit: all of them, or under the
// bottom-right causal mask only those with a key j <= last_row + (seq_k - seq_q), last_row the
// tile's last real row. (The host keeps sizes below 2^30, so none of this overflows int.)
__device__ __forceinline__ int key_tiles(const FlashParams& p, const Seq& s, int m0, int BM, int BN) {
    int end = s.seq_k;
    if (p.causal) end = min(end, min(m0 + BM, s.seq_q) + (s.seq_k - s.seq_q));
    return end > 0 ? (end + BN - 1) / BN : 0;
}

// Copies rows [row0, row0 + ROWS) (those below `limit`; the rest zero-filled) of a
// [rows, D] tile with row stride `stride` into swizzled shared memory, 16 bytes per cp.async.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t stride, int row0, int limit) {
    using Tile = SwizzledTile<D * 2>;
    constexpr int CHUNKS = ROWS * Tile::CHUNKS_PER_ROW;
    static_assert(CHUNKS % THREADS == 0, "tile chunks must divide evenly among threads");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        const int idx = threadIdx.x + i * THREADS;
        const int r = idx / Tile::CHUNKS_PER_ROW, c = idx % Tile::CHUNKS_PER_ROW;
        const bool valid = row0 + r < limit;
        const T* src = valid ? base + (int64_t)(row0 + r) * stride + c * 8 : base;
        cp_async_16(smem + Tile::offset(r, c), src, valid);
    }
}

// Online-softmax update for the two rows a thread holds (r = 0: row g, r = 1: row g + 8).
// s holds this tile's scores already multiplied by scale * log2(e); on return it holds
// P = exp2(s - m_new), and o, l are rescaled by exp2(m_old - m_new).
template <int NT_N, int NT_D>
__device__ __forceinline__ void online_softmax(float (&s)[NT_N][4], float (&o)[NT_D][4], float (&m)[2], float (&l)[2]) {
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
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT_N; ++n) {
            s[n][2 * r] = fast_exp2(s[n][2 * r] - m_use);
            s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - m_use);
            sum += s[n][2 * r] + s[n][2 * r + 1];
        }
        // l stays a per-thread partial sum; the quad reduces it once, at the end.
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
#pragma unroll
        for (int d = 0; d < NT_D; ++d) {
            o[d][2 * r] *= alpha;
            o[d][2 * r + 1] *= alpha;
        }
    }
}

template <typename T, int D, int WARPS, int BN>
__device__ __forceinline__ void flash_fwd_tc(const FlashParams& p) {
    constexpr int BM = 16 * WARPS;
    constexpr int THREADS = 32 * WARPS;
    constexpr int NT_N = BN / 8;  // n8 tiles of S per warp row tile
    constexpr int NT_D = D / 8;   // n8 tiles of O
    using Tile = SwizzledTile<D * 2>;
    static_assert(D % 32 == 0 && BN % 16 == 0, "head dim and key tile must be multiples of 16");

    unsigned char* smem = dynamic_smem();
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + BM * D * 2;
    const uint32_t sV = sK + BN * D * 2;

    const int tile = gridDim.x - 1 - blockIdx.x;  // heaviest (causal: last) tiles first
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int m0 = tile * BM;
    if (!s.valid || m0 >= s.seq_q) return;
    const T* q = static_cast<const T*>(p.q) + s.q_off;
    const T* k = static_cast<const T*>(p.k) + s.k_off;
    const T* v = static_cast<const T*>(p.v) + s.v_off;
    T* o_ptr = static_cast<T*>(p.o) + s.o_off;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int diag = s.seq_k - s.seq_q;
    const int n_tiles = key_tiles(p, s, m0, BM, BN);

    float o[NT_D][4];
#pragma unroll
    for (int d = 0; d < NT_D; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    if (n_tiles > 0) {
        load_tile<T, D, BM, THREADS>(sQ, q, p.q_row_stride, m0, s.seq_q);
        load_tile<T, D, BN, THREADS>(sK, k, p.k_row_stride, 0, s.seq_k);
        cp_async_commit();
        load_tile<T, D, BN, THREADS>(sV, v, p.v_row_stride, 0, s.seq_k);
        cp_async_commit();
    }
    // This warp's ldmatrix row addresses, fixed for the whole loop (see mma_16816's layout).
    const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;  // Q rows for A
    const int a_chunk = lane >> 4;
    const int kb_row = (lane & 7) + (lane >> 4) * 8;                   // K rows for B
    const int kb_chunk = (lane >> 3) & 1;
    const int vb_row = (lane & 7) + ((lane >> 3) & 1) * 8;             // V rows for B (trans)
    const int vb_chunk = lane >> 4;

    for (int j = 0; j < n_tiles; ++j) {
        cp_async_wait<1>();  // Q and K_j have landed (V_j may still be in flight)
        __syncthreads();

        // S = Q K_j^T for this warp's 16 rows.
        float sc[NT_N][4];
#pragma unroll
        for (int n = 0; n < NT_N; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            uint32_t a[4];
            ldmatrix_x4(a, sQ + Tile::offset(a_row, kc * 2 + a_chunk));
#pragma unroll
            for (int n2 = 0; n2 < NT_N / 2; ++n2) {
                uint32_t bk[4];
                ldmatrix_x4(bk, sK + Tile::offset(n2 * 16 + kb_row, kc * 2 + kb_chunk));
                mma_16816<T>(sc[2 * n2], a, bk[0], bk[1]);
                mma_16816<T>(sc[2 * n2 + 1], a, bk[2], bk[3]);
            }
        }
        __syncthreads();  // every warp is done with K_j: its buffer may be refilled
        const bool more = j + 1 < n_tiles;
        if (more) {
            load_tile<T, D, BN, THREADS>(sK, k, p.k_row_stride, (j + 1) * BN, s.seq_k);
            cp_async_commit();
        }

        // Scale into the exp2 domain and mask: keys past seq_k, and (causal) keys right of
        // the diagonal. Only tiles that reach past either bound pay for the mask.
        const int n0 = j * BN;
        const bool need_mask = n0 + BN > s.seq_k || (p.causal && n0 + BN - 1 > m0 + diag);
#pragma unroll
        for (int n = 0; n < NT_N; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = sc[n][e] * p.scale_log2;
                if (need_mask) {
                    const int key = n0 + n * 8 + 2 * t + (e & 1);
                    const int row = m0 + warp * 16 + g + (e >> 1) * 8;
                    if (key >= s.seq_k || (p.causal && key > row + diag)) x = -INFINITY;
                }
                sc[n][e] = x;
            }
        }
        online_softmax<NT_N, NT_D>(sc, o, m, l);

        // Wait for V_j (leaving K_{j+1} in flight if it was issued).
        if (more) cp_async_wait<1>(); else cp_async_wait<0>();
        __syncthreads();

        // O += P V_j: P's accumulator layout is the A-operand layout of the next mma.
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
            uint32_t a[4];
            a[0] = pack2<T>(sc[2 * kc][0], sc[2 * kc][1]);
            a[1] = pack2<T>(sc[2 * kc][2], sc[2 * kc][3]);
            a[2] = pack2<T>(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            a[3] = pack2<T>(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
            for (int d2 = 0; d2 < NT_D / 2; ++d2) {
                uint32_t bv[4];
                ldmatrix_x4_trans(bv, sV + Tile::offset(kc * 16 + vb_row, d2 * 2 + vb_chunk));
                mma_16816<T>(o[2 * d2], a, bv[0], bv[1]);
                mma_16816<T>(o[2 * d2 + 1], a, bv[2], bv[3]);
            }
        }
        if (more) {
            __syncthreads();  // every warp is done with V_j
            load_tile<T, D, BN, THREADS>(sV, v, p.v_row_stride, (j + 1) * BN, s.seq_k);
            cp_async_commit();
        }
    }

    // Epilogue: normalise, write LSE, stage O through this warp's own Q rows (no other warp
    // reads them any more), then 16-byte coalesced stores.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const int row = m0 + warp * 16 + g + r * 8;
        if (t == 0 && row < s.seq_q) {
            p.lse[s.lse_off + row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * LN2 : -INFINITY;
        }
    }
    __syncwarp();
    unsigned char* stage = smem;
#pragma unroll
    for (int d = 0; d < NT_D; ++d) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const uint32_t packed = pack2<T>(o[d][2 * r] * inv[r], o[d][2 * r + 1] * inv[r]);
            const int row = warp * 16 + g + r * 8;
            *reinterpret_cast<uint32_t*>(stage + Tile::offset(row, d) + t * 4) = packed;
        }
    }
    __syncwarp();
    constexpr int CPR = Tile::CHUNKS_PER_ROW;
#pragma unroll
    for (int i = 0; i < (16 * CPR + 31) / 32; ++i) {
        const int idx = lane + i * 32;
        if (idx < 16 * CPR) {
            const int r = idx / CPR, c = idx % CPR;
            const int row = m0 + warp * 16 + r;
            if (row < s.seq_q) {
                *reinterpret_cast<uint4*>(o_ptr + (int64_t)row * p.o_row_stride + c * 8) =
                    *reinterpret_cast<const uint4*>(stage + Tile::offset(warp * 16 + r, c));
            }
        }
    }
}

// f32: the same algorithm on CUDA cores. Thread (row = tid / 8, sub = tid % 8) owns row
// `row` of the 16-row tile: it scores keys sub, sub + 8, ... and accumulates O columns
// sub, sub + 8, ...; the 8 threads of a row are adjacent lanes and reduce with shuffles.
template <int D>
__device__ __forceinline__ void flash_fwd_f32(const FlashParams& p) {
    constexpr int BM = ATTNKIT_FLASH_F32_BLOCK_M, BN = ATTNKIT_FLASH_F32_BLOCK_N;
    constexpr int THREADS = ATTNKIT_FLASH_F32_THREADS;
    static_assert(BM * 8 == THREADS, "8 threads per query row");
    // Rows padded by one word: a warp covers 4 query rows (and reads 8 K rows) at once, and
    // unpadded strides that are multiples of 32 words would put them all in one bank.
    constexpr int QP = D + 1, KP = D + 1, PP = BN + 1;
    float* sQ = reinterpret_cast<float*>(dynamic_smem());
    float* sK = sQ + BM * QP;
    float* sV = sK + BN * KP;
    float* sP = sV + BN * D;

    const int tile = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int m0 = tile * BM;
    if (!s.valid || m0 >= s.seq_q) return;
    const float* q = static_cast<const float*>(p.q) + s.q_off;
    const float* k = static_cast<const float*>(p.k) + s.k_off;
    const float* v = static_cast<const float*>(p.v) + s.v_off;
    float* o_ptr = static_cast<float*>(p.o) + s.o_off;
    const int row = threadIdx.x / 8, sub = threadIdx.x % 8;
    const int grow = m0 + row;
    const int diag = s.seq_k - s.seq_q;
    const int n_tiles = key_tiles(p, s, m0, BM, BN);

    for (int i = threadIdx.x; i < BM * D; i += THREADS) {
        const int r = i / D, c = i % D;
        sQ[r * QP + c] = m0 + r < s.seq_q ? q[(int64_t)(m0 + r) * p.q_row_stride + c] : 0.f;
    }
    float acc[D / 8];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = j * BN;
        __syncthreads();  // previous tile fully consumed (and sQ written, the first time)
        for (int i = threadIdx.x; i < BN * D; i += THREADS) {
            const int r = i / D, c = i % D;
            const bool in = n0 + r < s.seq_k;
            sK[r * KP + c] = in ? k[(int64_t)(n0 + r) * p.k_row_stride + c] : 0.f;
            sV[r * D + c] = in ? v[(int64_t)(n0 + r) * p.v_row_stride + c] : 0.f;
        }
        __syncthreads();
        float sc[BN / 8];
        float mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < BN / 8; ++u) {
            const int key = sub + 8 * u;
            float dot = 0.f;
#pragma unroll 8
            for (int c = 0; c < D; ++c) dot = fmaf(sQ[row * QP + c], sK[key * KP + c], dot);
            float x = dot * p.scale_log2;
            if (n0 + key >= s.seq_k || (p.causal && n0 + key > grow + diag)) x = -INFINITY;
            sc[u] = x;
            mx = fmaxf(mx, x);
        }
#pragma unroll
        for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_new = fmaxf(m, mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m - m_use);
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < BN / 8; ++u) {
            const float pr = exp2f(sc[u] - m_use);
            sum += pr;
            sP[row * PP + sub + 8 * u] = pr;
        }
        l = l * alpha + sum;
        m = m_new;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            float a = acc[i] * alpha;
            for (int c = 0; c < BN; ++c) a = fmaf(sP[row * PP + c], sV[c * D + sub + 8 * i], a);
            acc[i] = a;
        }
        __syncwarp();
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (grow < s.seq_q) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o_ptr[(int64_t)grow * p.o_row_stride + sub + 8 * i] = acc[i] * inv;
        if (sub == 0) p.lse[s.lse_off + grow] = l > 0.f ? (m + log2f(l)) * LN2 : -INFINITY;
    }
}

}  // namespace

// One entry point per (dtype, head dim); the host picks the name and the launch shape from the
// same ATTNKIT_FLASH_* constants.
#define FLASH_TC(NAME, T, D, WARPS, BN)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 1) NAME(const __grid_constant__ FlashParams p) { \
        flash_fwd_tc<T, D, WARPS, BN>(p);                                                        \
    }
#define FLASH_TC_SMALL(NAME, T, D) FLASH_TC(NAME, T, D, ATTNKIT_FLASH_WARPS_SMALL_D, ATTNKIT_FLASH_BLOCK_N_SMALL_D)
FLASH_TC_SMALL(flash_fwd_bf16_d32, __nv_bfloat16, 32)
FLASH_TC_SMALL(flash_fwd_bf16_d64, __nv_bfloat16, 64)
FLASH_TC_SMALL(flash_fwd_bf16_d96, __nv_bfloat16, 96)
FLASH_TC_SMALL(flash_fwd_bf16_d128, __nv_bfloat16, 128)
FLASH_TC(flash_fwd_bf16_d256, __nv_bfloat16, 256, ATTNKIT_FLASH_WARPS_D256, ATTNKIT_FLASH_BLOCK_N_D256)
FLASH_TC_SMALL(flash_fwd_f16_d32, __half, 32)
FLASH_TC_SMALL(flash_fwd_f16_d64, __half, 64)
FLASH_TC_SMALL(flash_fwd_f16_d96, __half, 96)
FLASH_TC_SMALL(flash_fwd_f16_d128, __half, 128)
FLASH_TC(flash_fwd_f16_d256, __half, 256, ATTNKIT_FLASH_WARPS_D256, ATTNKIT_FLASH_BLOCK_N_D256)

#define FLASH_F32(NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(ATTNKIT_FLASH_F32_THREADS, 1) NAME(const __grid_constant__ FlashParams p) { \
        flash_fwd_f32<D>(p);                                                                      \
    }
FLASH_F32(flash_fwd_f32_d32, 32)
FLASH_F32(flash_fwd_f32_d64, 64)
FLASH_F32(flash_fwd_f32_d96, 96)
FLASH_F32(flash_fwd_f32_d128, 128)
FLASH_F32(flash_fwd_f32_d256, 256)

ATTNKIT_DEFINE_PARAMS_ECHO(FlashParams)
