// Decode attention: seq_q new tokens per sequence against a KV cache, split-KV.
//
// Grid: (row_blocks x num_splits, heads_kv, batch). A block owns one KV head of one sequence,
// one split of its keys and ROWS = 16 of the KV head's seq_q x group query rows (GQA: the
// query heads of a KV head share every K/V tile, so K/V is read once per KV head; more than 16
// rows take neighbouring blocks, which stream the same tiles at the same time through L2).
//
// Tensor-core path (f16, bf16), per block:
//   Q rows + K/V tile 0 (cp.async, 16-byte chunks, each key row through the layout's map)
//   for each tile of 64 keys of the split (causal: up to the block's last visible key):
//     [tile t+1 loads into the other buffer]
//     (rolling cache) rotate the K tile (and, once, Q) in shared memory to their positions
//     warp w: S = Q K[16w..16w+16)^T (mma m16n8k16; Q's fragments stay in registers from
//     tile 0 on), mask, online softmax, O_w += P V
//   merge the 4 warps' (m, l, O) through shared memory, normalise, store the row (o and lse,
//   or the split's partial in the workspace).
// f32 path: the same structure on CUDA cores, exact to f32 rounding.
// decode_combine: per output row, O = sum_s exp(lse_s - max) O_s / sum_s exp(lse_s - max).
// decode_append: copies the new tokens' K/V rows into their cache rows, 16 bytes a thread.
//
// History: v1 (this file), written without a GPU at hand: not yet measured or tuned.
#include "common.cuh"
#include "decode.h"
#include <climits>
#include "decode.cuh"

namespace {

using namespace decode;

// The split's keys [lo, hi), and `end`: past it no row of this block sees a key (causal).
struct KeyRange {
    int lo, hi, end, first;  // first: the position of query token 0 (len - seq_q)
};

__device__ __forceinline__ KeyRange key_range(const DecodeParams& p, const SeqView& s, int split, int rb, int rows_per_block) {
    KeyRange k;
    const int64_t lo = (int64_t)split * p.keys_per_split;
    k.lo = (int)min(lo, (int64_t)s.len);
    k.hi = (int)min(lo + p.keys_per_split, (int64_t)s.len);
    k.first = s.len - p.seq_q;
    k.end = k.hi;
    if (p.causal) {
        const int group = p.heads_q / p.heads_kv;
        const int last_row = min((rb + 1) * rows_per_block, p.seq_q * group) - 1;
        k.end = max(k.lo, min(k.hi, k.first + last_row / group + 1));
    }
    if (p.window_left >= 0) {
        // Sliding window: the block's first token sees the fewest old keys; tiles left of its
        // window are never loaded.
        const int first_token = rb * rows_per_block / (p.heads_q / p.heads_kv);
        k.lo = max(k.lo, min(k.first + first_token - p.window_left, k.end));
    }
    return k;
}


template <typename T, int D>
__device__ __forceinline__ void decode_tc(const DecodeParams& p) {
    constexpr int ROWS = ATTNKIT_DECODE_ROWS, WARPS = ATTNKIT_DECODE_WARPS, BN = ATTNKIT_DECODE_BLOCK_N;
    constexpr int THREADS = 32 * WARPS, KW = BN / WARPS;  // keys per warp per tile
    constexpr int NT_D = D / 8;
    static_assert(ROWS == 16 && KW == 16, "one m16 row tile, one k16 slice of keys per warp");
    using R = SmemRows<T, D>;
    constexpr int TILE = BN * R::PITCH;  // bytes of one K (or V) tile

    unsigned char* smem = dynamic_smem();
    unsigned char* q_tile = smem;
    unsigned char* kv_tiles = smem + ROWS * R::PITCH;  // K0, V0, K1, V1
    float* inv_freq = reinterpret_cast<float*>(kv_tiles + 4 * TILE);

    const int rb = blockIdx.x % p.row_blocks, split = blockIdx.x / p.row_blocks;
    const int hk = blockIdx.y, b = blockIdx.z;
    SeqView s = locate_seq(p, b);
    // s.valid is the same for the whole block (one sequence): the vote inside is uniform.
    if (s.valid) s.valid = pages_valid(p, b, s.len);
    // A device table that fails the re-check (stale against the checked host copy) reads as
    // an empty cache: the rows still get their defined O = 0, LSE = -inf, and every split
    // writes its partial, so the combine never reads unwritten workspace.
    if (!s.valid) s.len = s.ring = 0;
    const KeyRange kr = key_range(p, s, split, rb, ROWS);
    const int group = p.heads_q / p.heads_kv;
    const int n_tiles = (kr.end - kr.lo + BN - 1) / BN;
    const T* k = static_cast<const T*>(p.k) + (int64_t)hk * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v) + (int64_t)hk * p.v_head_stride;
    const bool rope = p.rope_style != ATTNKIT_ROPE_NONE;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    float o[NT_D][4];
    zero_frags(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    auto load_tile = [&](int tile, int stage) {
        const uint32_t dst = smem_addr(kv_tiles + 2 * stage * TILE);
        const int j0 = kr.lo + tile * BN;
        load_keys<T, D, BN, THREADS>(dst, k, p, b, s.ring, j0, kr.end, p.k_batch_stride, p.k_row_stride);
        load_keys<T, D, BN, THREADS>(dst + TILE, v, p, b, s.ring, j0, kr.end, p.v_batch_stride, p.v_row_stride);
    };
    if (n_tiles > 0) {
        load_queries<T, D, ROWS, THREADS>(smem_addr(q_tile), p, b, hk, rb);
        load_tile(0, 0);
        cp_async_commit();
        if (rope) rope_frequencies<D, THREADS>(inv_freq, p.rope_log2_theta);
    }
    // The thread's two rows (g, g + 8): their tokens' positions and (GQA: rows of one block
    // belong to different query heads) their ALiBi slopes; the softcap, one for all.
    int token_pos[2];
    float slope[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = rb * ROWS + g + r * 8;
        token_pos[r] = kr.first + row / group;
        slope[r] = alibi_slope_log2(p.alibi_slopes, hk * group + row % group);
    }
    const LogitShape shape(p.softcap);
    // ldmatrix row addresses of this lane (mma_16816's fragment layout).
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
    const int kb_row = (lane & 7) + (lane >> 4) * 8, kb_chunk = (lane >> 3) & 1;
    const int vb_row = (lane & 7) + ((lane >> 3) & 1) * 8, vb_chunk = lane >> 4;
    // Q's A fragments, read from shared memory once (after tile 0's RoPE rotation) and kept in
    // registers for every tile: the K and V fragments are all a tile reads.
    uint32_t qa[D / 16][4];

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile & 1;
        const bool more = tile + 1 < n_tiles;
        if (more) {
            load_tile(tile + 1, stage ^ 1);  // that buffer was released by the last iteration's barrier
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        unsigned char* k_tile = kv_tiles + 2 * stage * TILE;
        unsigned char* v_tile = k_tile + TILE;
        const int j0 = kr.lo + tile * BN;
        if (rope) {
            if (tile == 0) {
                rotate_rows<T, D, THREADS>(q_tile, ROWS, inv_freq, p.rope_style,
                                           [&](int r) { return max(kr.first + (rb * ROWS + r) / group, 0); });
            }
            rotate_rows<T, D, THREADS>(k_tile, BN, inv_freq, p.rope_style, [&](int r) { return j0 + r; });
            __syncthreads();
        }

        if (tile == 0) {
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) ldmatrix_x4(qa[kc], smem_addr(q_tile) + R::chunk(a_row, kc * 2 + a_chunk));
        }

        // S = Q K^T over this warp's 16 keys.
        float sc[2][4];
        zero_frags(sc);
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            uint32_t bk[4];
            ldmatrix_x4(bk, smem_addr(k_tile) + R::chunk(warp * KW + kb_row, kc * 2 + kb_chunk));
            mma_16816<T>(sc[0], qa[kc], bk[0], bk[1]);
            mma_16816<T>(sc[1], qa[kc], bk[2], bk[3]);
        }
        // Into the exp2 domain, through the softcap and ALiBi; mask keys past the split and
        // (causal) right of each row's diagonal. Rows past the block's real rows see zeros and
        // are never stored.
        // The visible keys of the thread's two rows, [key_lo, key_hi] (window, causal, split).
        int key_lo[2], key_hi[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            key_hi[r] = p.causal ? min(kr.hi - 1, token_pos[r]) : kr.hi - 1;
            key_lo[r] = p.window_left >= 0 ? token_pos[r] - p.window_left : INT_MIN;
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + warp * KW + n * 8 + 2 * t + (e & 1);
                const bool masked = key > key_hi[e >> 1] || key < key_lo[e >> 1];
                const float x = shape.operator()<false>(sc[n][e] * p.scale_log2, slope[e >> 1], token_pos[e >> 1] - key);
                sc[n][e] = masked ? -INFINITY : x;
            }
        }
        online_softmax_mma<2, NT_D>(sc, o, m, l);

        // O += P V: P's accumulator layout is the A operand of the next mma.
        uint32_t pa[4];
        pa[0] = pack2<T>(sc[0][0], sc[0][1]);
        pa[1] = pack2<T>(sc[0][2], sc[0][3]);
        pa[2] = pack2<T>(sc[1][0], sc[1][1]);
        pa[3] = pack2<T>(sc[1][2], sc[1][3]);
#pragma unroll
        for (int d2 = 0; d2 < NT_D / 2; ++d2) {
            uint32_t bv[4];
            ldmatrix_x4_trans(bv, smem_addr(v_tile) + R::chunk(warp * KW + vb_row, d2 * 2 + vb_chunk));
            mma_16816<T>(o[2 * d2], pa, bv[0], bv[1]);
            mma_16816<T>(o[2 * d2 + 1], pa, bv[2], bv[3]);
        }
        __syncthreads();  // every warp is done with this stage: the next iteration may refill it
    }

    // Merge the warps' states through shared memory (the K/V buffers are free now):
    // sM, sL [WARPS][ROWS], sO [WARPS][ROWS][D], all f32.
    float* sM = reinterpret_cast<float*>(kv_tiles);
    float* sL = sM + WARPS * ROWS;
    float* sO = sL + WARPS * ROWS;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        if (t == 0) {
            sM[warp * ROWS + g + 8 * r] = m[r];
            sL[warp * ROWS + g + 8 * r] = l[r];
        }
#pragma unroll
        for (int d = 0; d < NT_D; ++d) {
            float* dst = sO + (warp * ROWS + g + 8 * r) * D + d * 8 + 2 * t;
            dst[0] = o[d][2 * r];
            dst[1] = o[d][2 * r + 1];
        }
    }
    __syncthreads();
    constexpr int PER_ROW = THREADS / ROWS;  // 8 threads share a row
    const int row = threadIdx.x / PER_ROW, part = threadIdx.x % PER_ROW;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sM[w * ROWS + row]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float wgt[WARPS], total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        wgt[w] = fast_exp2(sM[w * ROWS + row] - base);  // exp2(-inf) = 0: a warp that saw no key
        total += wgt[w] * sL[w * ROWS + row];
    }
    const OutRow out = out_row(p, b, hk, split, rb * ROWS + row);
    if (!out.valid) return;
    float lse = row_lse(mx, total);
    // One split: this row is final here, so the sink logit is folded in now (else: combine).
    const float inv = (total > 0.f ? 1.f / total : 0.f) * (p.num_splits == 1 ? fold_sink(p, out.head, lse) : 1.f);
    for (int c = part; c < D; c += PER_ROW) {
        float x = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) x += wgt[w] * sO[(w * ROWS + row) * D + c];
        store_out<T>(p, out, c, x * inv);
    }
    if (part == 0) store_lse(p, out, lse);
}

// f32: CUDA cores. Thread (row = tid / 8, sub = tid % 8) owns query row `row`: it scores keys
// sub, sub + 8, ... of each tile and accumulates O columns sub, sub + 8, ...; the 8 threads of
// a row are adjacent lanes and reduce with shuffles.
template <int D>
__device__ __forceinline__ void decode_f32(const DecodeParams& p) {
    constexpr int ROWS = ATTNKIT_DECODE_ROWS, BN = ATTNKIT_DECODE_F32_BLOCK_N, THREADS = 32 * ATTNKIT_DECODE_WARPS;
    static_assert(ROWS * 8 == THREADS, "8 threads per query row");
    using R = SmemRows<float, D>;
    constexpr int PITCH = R::PITCH / 4, PP = BN + 1;  // in floats
    unsigned char* smem = dynamic_smem();
    float* sQ = reinterpret_cast<float*>(smem);
    float* sK = sQ + ROWS * PITCH;
    float* sV = sK + BN * PITCH;
    float* sP = sV + BN * PITCH;
    float* inv_freq = sP + ROWS * PP;

    const int rb = blockIdx.x % p.row_blocks, split = blockIdx.x / p.row_blocks;
    const int hk = blockIdx.y, b = blockIdx.z;
    SeqView s = locate_seq(p, b);
    // s.valid is the same for the whole block (one sequence): the vote inside is uniform.
    if (s.valid) s.valid = pages_valid(p, b, s.len);
    // A device table that fails the re-check (stale against the checked host copy) reads as
    // an empty cache: the rows still get their defined O = 0, LSE = -inf, and every split
    // writes its partial, so the combine never reads unwritten workspace.
    if (!s.valid) s.len = s.ring = 0;
    const KeyRange kr = key_range(p, s, split, rb, ROWS);
    const int group = p.heads_q / p.heads_kv;
    const int n_tiles = (kr.end - kr.lo + BN - 1) / BN;
    const float* k = static_cast<const float*>(p.k) + (int64_t)hk * p.k_head_stride;
    const float* v = static_cast<const float*>(p.v) + (int64_t)hk * p.v_head_stride;
    const bool rope = p.rope_style != ATTNKIT_ROPE_NONE;
    const int row = threadIdx.x / 8, sub = threadIdx.x % 8;
    const int token = (rb * ROWS + row) / group;
    // This row's query head's ALiBi slope (GQA: the block's rows span the group's heads).
    const float slope = alibi_slope_log2(p.alibi_slopes, hk * group + (rb * ROWS + row) % group);
    const LogitShape shape(p.softcap);

    load_queries<float, D, ROWS, THREADS>(smem_addr(sQ), p, b, hk, rb);
    cp_async_commit();
    if (rope) rope_frequencies<D, THREADS>(inv_freq, p.rope_log2_theta);
    float acc[D / 8];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int j0 = kr.lo + tile * BN;
        load_keys<float, D, BN, THREADS>(smem_addr(sK), k, p, b, s.ring, j0, kr.end, p.k_batch_stride, p.k_row_stride);
        load_keys<float, D, BN, THREADS>(smem_addr(sV), v, p, b, s.ring, j0, kr.end, p.v_batch_stride, p.v_row_stride);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        if (rope) {
            if (tile == 0) {
                rotate_rows<float, D, THREADS>(smem, ROWS, inv_freq, p.rope_style,
                                               [&](int r) { return max(kr.first + (rb * ROWS + r) / group, 0); });
            }
            rotate_rows<float, D, THREADS>(reinterpret_cast<unsigned char*>(sK), BN, inv_freq, p.rope_style,
                                           [&](int r) { return j0 + r; });
            __syncthreads();
        }
        float sc[BN / 8];
        float mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < BN / 8; ++u) {
            const int key = j0 + sub + 8 * u;
            float dot = 0.f;
#pragma unroll 8
            for (int c = 0; c < D; ++c) dot = fmaf(sQ[row * PITCH + c], sK[(sub + 8 * u) * PITCH + c], dot);
            const bool masked = key >= kr.hi || (p.causal && key > kr.first + token) ||
                                (p.window_left >= 0 && key < kr.first + token - p.window_left);
            const float x = shape.operator()<true>(dot * p.scale_log2, slope, kr.first + token - key);
            sc[u] = masked ? -INFINITY : x;
            mx = fmaxf(mx, sc[u]);
        }
#pragma unroll
        for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float m_new = fmaxf(m, mx);
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m - base);
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < BN / 8; ++u) {
            const float pr = exp2f(sc[u] - base);
            sum += pr;
            sP[row * PP + sub + 8 * u] = pr;
        }
        l = l * alpha + sum;
        m = m_new;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            float a = acc[i] * alpha;
            for (int c = 0; c < BN; ++c) a = fmaf(sP[row * PP + c], sV[c * PITCH + sub + 8 * i], a);
            acc[i] = a;
        }
        __syncthreads();  // sK, sV, sP consumed before the next tile lands
    }
    cp_async_wait<0>();  // the Q copy, when no tile ran
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    const OutRow out = out_row(p, b, hk, split, rb * ROWS + row);
    if (!out.valid) return;
    float lse = row_lse(m, l);
    const float inv = (l > 0.f ? 1.f / l : 0.f) * (p.num_splits == 1 ? fold_sink(p, out.head, lse) : 1.f);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) store_out<float>(p, out, sub + 8 * i, acc[i] * inv);
    if (sub == 0) store_lse(p, out, lse);
}

// Combine: one warp per output row (b, h, i); lane s (and s + 32) holds split s's LSE.
template <typename T>
__device__ __forceinline__ void decode_combine(const DecodeParams& p) {
    constexpr int WARPS = ATTNKIT_DECODE_COMBINE_WARPS;
    __shared__ float weights[WARPS][64];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t rows = (int64_t)p.batch * p.heads_q * p.seq_q;
    const int64_t r = (int64_t)blockIdx.x * WARPS + warp;
    if (r >= rows) return;
    const int i = (int)(r % p.seq_q), h = (int)((r / p.seq_q) % p.heads_q), b = (int)(r / ((int64_t)p.seq_q * p.heads_q));
    float l0 = lane < p.num_splits ? p.ws_lse[lane * rows + r] : -INFINITY;
    float l1 = lane + 32 < p.num_splits ? p.ws_lse[(lane + 32) * rows + r] : -INFINITY;
    float mx = fmaxf(l0, l1);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float w0 = expf(l0 - base), w1 = expf(l1 - base);
    weights[warp][lane] = w0;
    weights[warp][lane + 32] = w1;
    float total = w0 + w1;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
    __syncwarp();
    float lse = total > 0.f ? base + logf(total) : -INFINITY;
    const float inv = (total > 0.f ? 1.f / total : 0.f) * fold_sink(p, h, lse);
    T* o = static_cast<T*>(p.o) + (int64_t)b * p.o_batch_stride + (int64_t)i * p.o_row_stride + (int64_t)h * p.o_head_stride;
    for (int c = lane; c < p.head_dim; c += 32) {
        float x = 0.f;
        for (int sp = 0; sp < p.num_splits; ++sp) x += weights[warp][sp] * p.ws_o[(sp * rows + r) * p.head_dim + c];
        o[c] = from_f32<T>(x * inv);
    }
    if (lane == 0) p.lse[r] = lse;
}

// Append: thread per 16-byte chunk of a new row (b, token i, KV head hk), to logical key
// cache_seqlens[b] - seq_q + i.
template <typename T>
__device__ __forceinline__ void decode_append(const DecodeParams& p) {
    constexpr int ELEMS = 16 / sizeof(T);
    const int chunks = p.head_dim / ELEMS;
    const int64_t total = (int64_t)p.batch * p.seq_q * p.heads_kv * chunks;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
        const int c = (int)(idx % chunks);
        const int64_t row = idx / chunks;  // (b * seq_q + i) * heads_kv + hk
        const int hk = (int)(row % p.heads_kv), i = (int)((row / p.heads_kv) % p.seq_q);
        const int b = (int)(row / ((int64_t)p.heads_kv * p.seq_q));
        const SeqView s = locate_seq(p, b);
        const int j = s.len - p.seq_q + i;
        if (!s.valid || j < 0) continue;
        const int64_t ko = key_row(p, b, s.ring, j, p.k_batch_stride, p.k_row_stride);
        const int64_t vo = key_row(p, b, s.ring, j, p.v_batch_stride, p.v_row_stride);
        if (ko < 0 || vo < 0) continue;
        const int64_t src = row * p.head_dim + c * ELEMS;
        // A null cache is not written by this call (a one-cache append).
        if (p.k != nullptr) {
            T* k = static_cast<T*>(p.k) + ko + (int64_t)hk * p.k_head_stride + c * ELEMS;
            *reinterpret_cast<uint4*>(k) = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.k_new) + src);
        }
        if (p.v != nullptr) {
            T* v = static_cast<T*>(p.v) + vo + (int64_t)hk * p.v_head_stride + c * ELEMS;
            *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.v_new) + src);
        }
    }
}

}  // namespace

#define DECODE_THREADS (32 * ATTNKIT_DECODE_WARPS)
// Up to d = 128, three blocks an SM (at most 168 registers: decode is bound by memory, and
// more resident blocks hide more of its latency); above, O and Q's fragments need more.
#define DECODE_TC(NAME, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, (D) <= 128 ? 3 : 1) NAME(const __grid_constant__ DecodeParams p) { \
        decode_tc<T, D>(p);                                                                                \
    }
DECODE_TC(decode_attn_bf16_d64, __nv_bfloat16, 64)
DECODE_TC(decode_attn_bf16_d80, __nv_bfloat16, 80)
DECODE_TC(decode_attn_bf16_d112, __nv_bfloat16, 112)
DECODE_TC(decode_attn_bf16_d128, __nv_bfloat16, 128)
DECODE_TC(decode_attn_bf16_d192, __nv_bfloat16, 192)
DECODE_TC(decode_attn_bf16_d256, __nv_bfloat16, 256)
DECODE_TC(decode_attn_f16_d64, __half, 64)
DECODE_TC(decode_attn_f16_d80, __half, 80)
DECODE_TC(decode_attn_f16_d112, __half, 112)
DECODE_TC(decode_attn_f16_d128, __half, 128)
DECODE_TC(decode_attn_f16_d192, __half, 192)
DECODE_TC(decode_attn_f16_d256, __half, 256)

#define DECODE_F32(NAME, D)                                                                                \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, 1) NAME(const __grid_constant__ DecodeParams p) { \
        decode_f32<D>(p);                                                                                  \
    }
DECODE_F32(decode_attn_f32_d64, 64)
DECODE_F32(decode_attn_f32_d80, 80)
DECODE_F32(decode_attn_f32_d112, 112)
DECODE_F32(decode_attn_f32_d128, 128)
DECODE_F32(decode_attn_f32_d192, 192)
DECODE_F32(decode_attn_f32_d256, 256)

#define DECODE_SMALL(NAME, FN, T, THREADS)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(const __grid_constant__ DecodeParams p) {   \
        FN<T>(p);                                                                                          \
    }
DECODE_SMALL(decode_combine_bf16, decode_combine, __nv_bfloat16, 32 * ATTNKIT_DECODE_COMBINE_WARPS)
DECODE_SMALL(decode_combine_f16, decode_combine, __half, 32 * ATTNKIT_DECODE_COMBINE_WARPS)
DECODE_SMALL(decode_combine_f32, decode_combine, float, 32 * ATTNKIT_DECODE_COMBINE_WARPS)
DECODE_SMALL(decode_append_bf16, decode_append, __nv_bfloat16, ATTNKIT_DECODE_APPEND_THREADS)
DECODE_SMALL(decode_append_f16, decode_append, __half, ATTNKIT_DECODE_APPEND_THREADS)
DECODE_SMALL(decode_append_f32, decode_append, float, ATTNKIT_DECODE_APPEND_THREADS)

ATTNKIT_DEFINE_PARAMS_ECHO(DecodeParams)
