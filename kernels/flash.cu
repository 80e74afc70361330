// FlashAttention forward: O = softmax(scale Q K^T + mask) V and the row log-sum-exp, one query
// tile per thread block, never materialising the score matrix. The variants of the source
// documents are parameters of the same kernel, not copies of it: sliding windows and
// StreamingLLM sinks (whole key tiles outside them are never visited), block-sparse masks
// (skipped blocks are never loaded), the entropy-invariant scale (log_512 of the keys a row
// sees), a learned per-head sink logit, relu^2 scores (GAU), per-row entropy, and the logit
// transforms of Gemma 2 and ALiBi models (soft-capping, linear position biases).
//
// Tensor-core path (f16, bf16), per block of BM = 16 * MT * WARPS query rows (each warp owns
// MT m16 row tiles, and each K/V fragment it reads serves all of them):
//   load Q tile, K and V of the first visible key tile (cp.async) ...... shared, swizzled
//   for each key tile j the tile's rows can see (Visibility::next_tile):
//     wait for K_j, V_j; one barrier (K and V are double-buffered)
//     [the next visible tile's K and V load into the other buffers, overlapping all below]
//     S = Q K_j^T          mma.sync m16n8k16, f32 accumulators, each warp its 16 MT rows
//     scores in the exp2 domain (scale * log2 e folded in) or relu^2; per-key masking only
//     in tiles not wholly visible; online softmax
//     O = O * exp2(m_old - m_new) + P V_j   (P re-packed from S's accumulators, no smem trip)
//   finish(): sink logit, O /= l, LSE, entropy; O staged through the warp's own Q rows.
// f32 path: the same algorithm on CUDA cores, exact to f32 rounding.
//
// History: v1 FA2's sm80 structure, written without a GPU at hand; v2 per-row swizzle, ftz
// exp2, the variants as parameters; v3 32 rows a warp (d <= 128), double-buffered K/V with one
// barrier a tile, block-mask scans split over a warp (docs/perf-structure.md). Not yet
// measured or tuned on a GPU.
#include "common.cuh"
#include "flash.h"

#include <type_traits>

namespace {

constexpr float LN2 = 0.6931471805599453f;
constexpr float LOG2E = 1.4426950408889634f;

// Where one (sequence, head) lives, resolved once per block.
struct Seq {
    int seq_q, seq_k;                   // rows and keys of this sequence
    int64_t q_off, k_off, v_off, o_off; // element offsets of row 0 for this head
    int64_t lse_off;                    // offset of row 0 in lse (and entropy)
    bool valid;
};

__device__ __forceinline__ Seq locate(const FlashParams& p, int b, int h) {
    Seq s;
    const int hk = h / (p.heads_q / p.heads_kv);
    s.valid = true;
    if (p.cu_seqlens_q != nullptr) {
        const int q0 = p.cu_seqlens_q[b], q1 = p.cu_seqlens_q[b + 1];
        const int k0 = p.cu_seqlens_k[b], k1 = p.cu_seqlens_k[b + 1];
        // The host validated its copy (or has none: device-only offsets); the device copy is
        // re-checked so a stale one can never send a read or write out of bounds. A sequence
        // longer than the maxima (p.seq_q, p.seq_k) would need tiles the grid lacks and block
        // mask columns past the mask's rows: it is skipped, its rows left unwritten.
        s.valid = 0 <= q0 && q0 <= q1 && q1 <= p.total_q && 0 <= k0 && k0 <= k1 && k1 <= p.total_k &&
                  q1 - q0 <= p.seq_q && k1 - k0 <= p.seq_k;
        s.seq_q = q1 - q0;
        s.seq_k = k1 - k0;
        s.q_off = (int64_t)q0 * p.q_row_stride + h * p.q_head_stride;
        s.k_off = (int64_t)k0 * p.k_row_stride + hk * p.k_head_stride;
        s.v_off = (int64_t)k0 * p.v_row_stride + hk * p.v_head_stride;
        s.o_off = (int64_t)q0 * p.o_row_stride + h * p.o_head_stride;
        s.lse_off = h * p.lse_head_stride + q0;
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

// Which keys a row sees: the window [lo(i), hi(i)] (bottom-right aligned, causal folded into
// window_right), the sinks [0, n_sink) up to hi(i), and the block mask. lo and hi never
// decrease with i, so a query tile [m0, m1) sees keys within [lo(m0), hi(m1 - 1)] and the sinks.
// (The host bounds seq_q, seq_k, the totals, windows and sinks by MAX_LEN = 2^30, so
// i + diag + right <= seq_k - 1 + 2^30 < 2^31: none of this overflows int.)
struct Visibility {
    int seq_k, diag, left, right, n_sink;
    const uint8_t* mask;
    int block_q, block_k, mask_cols;

    __device__ __forceinline__ Visibility(const FlashParams& p, const Seq& s)
        : seq_k(s.seq_k), diag(s.seq_k - s.seq_q), left(p.window_left), right(p.window_right),
          n_sink(min(p.n_sink, s.seq_k)), mask(p.block_mask), block_q(p.block_q), block_k(p.block_k),
          mask_cols(p.mask_cols) {}

    __device__ __forceinline__ int lo(int i) const { return left < 0 ? 0 : max(0, i + diag - left); }
    __device__ __forceinline__ int hi(int i) const {
        return right < 0 ? seq_k - 1 : min(seq_k - 1, i + diag + right);
    }
    // Row i's block-mask row (decoded once per row, not per key), or NULL without a mask.
    __device__ __forceinline__ const uint8_t* mask_row(int i) const {
        return mask == nullptr ? nullptr : mask + (int64_t)(i / block_q) * mask_cols;
    }
    // Does row i see key j? `mrow` is mask_row(i): a caller visiting many keys of one row
    // decodes it once. The mask is read only for keys inside the window.
    __device__ __forceinline__ bool visible(int i, int j, const uint8_t* mrow) const {
        const int h = hi(i);
        return j <= h && (j >= lo(i) || j < n_sink) && (mrow == nullptr || mrow[j / block_k] != 0);
    }
    __device__ __forceinline__ bool visible(int i, int j) const { return visible(i, j, mask_row(i)); }
    // Keys row i sees (without the block mask, which the host rules out where this is used).
    __device__ __forceinline__ int count(int i) const {
        const int l = lo(i), h = hi(i);
        return max(0, h - l + 1) + max(0, min(n_sink, min(l, h + 1)));
    }
    // Does key tile [n0, n0 + BN) hold a key some row of [m0, m1) sees? A warp collective
    // (so is next_tile): every lane of the warp calls it with the same arguments (1-D blocks),
    // and the block-mask entries under the tile are split across the lanes (a 128 x 64 tile
    // over 1 x 1 blocks is 8192 entries: 256 a lane).
    __device__ __forceinline__ bool warp_tile_needed(int m0, int m1, int n0, int BN) const {
        const int n1 = min(n0 + BN, seq_k);
        const int h = hi(m1 - 1);
        const bool in_window = n0 <= h && n1 - 1 >= lo(m0);
        const bool in_sinks = n0 < min(n_sink, h + 1);
        if (!in_window && !in_sinks) return false;
        if (mask == nullptr) return true;
        const int qb0 = m0 / block_q, kb0 = n0 / block_k;
        const int cols = (n1 - 1) / block_k - kb0 + 1;
        const int entries = ((m1 - 1) / block_q - qb0 + 1) * cols;
        bool found = false;
        for (int e = threadIdx.x % 32; e < entries && !found; e += 32)
            found = mask[(int64_t)(qb0 + e / cols) * mask_cols + kb0 + e % cols] != 0;
        return __any_sync(0xffffffffu, found);
    }
    // Is every (row, key) of the tile visible (so no per-element mask is needed)?
    __device__ __forceinline__ bool tile_full(int m0, int m1, int n0, int BN) const {
        return mask == nullptr && n0 + BN <= seq_k && lo(m1 - 1) <= n0 && hi(m0) >= n0 + BN - 1;
    }
    // The first key tile at or after j that rows [m0, m1) need; past the last: a value > last.
    __device__ __forceinline__ int next_tile(int j, int m0, int m1, int BN) const {
        const int last = hi(m1 - 1) / BN;
        // Tiles between the sinks and the window are skipped without looking at them.
        if (j * BN >= n_sink) j = max(j, lo(m0) / BN);
        while (j <= last && !warp_tile_needed(m0, m1, j * BN, BN)) ++j;
        return j;
    }
    __device__ __forceinline__ int last_tile(int m1, int BN) const { return hi(m1 - 1) < 0 ? -1 : hi(m1 - 1) / BN; }
};

// Per-row constants: the exp2-domain scale (entropy scale: log_512(visible keys) times it)
// and, for relu^2, 1/n.
__device__ __forceinline__ void row_constants(const FlashParams& p, const Visibility& vis, const Seq& s, int row,
                                              float& scale_log2, float& scale, float& inv_n) {
    scale_log2 = p.scale_log2;
    scale = p.scale;
    const int n = p.entropy_scale || p.relu2_by_visible ? vis.count(row) : s.seq_k;
    if (p.entropy_scale) {
        const float f = log2f((float)n) * (1.f / 9.f);  // log_512(n) = log2(n) / 9
        scale_log2 *= f;
        scale *= f;
    }
    inv_n = n > 0 ? 1.f / (float)n : 0.f;
}

// The end of a row: folds in the sink logit, normalises, and returns (via refs) the factor O
// is multiplied by, the LSE and the entropy. m, es are in the exp2 domain (scores times
// scale * log2 e); l and es are the row's full sums. For relu^2 (no softmax) O is already
// normalised and LSE is 0.
__device__ __forceinline__ void finish_row(const FlashParams& p, int h, bool relu2, float m, float l, float es,
                                           float& o_factor, float& lse, float& entropy) {
    if (relu2) {
        o_factor = 1.f;
        lse = 0.f;
        entropy = 0.f;
        return;
    }
    if (p.sink_logits != nullptr) {
        const float sink = p.sink_logits[h] * LOG2E;
        if (isnan(sink)) {  // no meaning (the CPU path rejects it): NaN everywhere, not a -inf LSE
            o_factor = lse = entropy = NAN;
            return;
        }
        if (sink == INFINITY) {  // all weight on the sink, which has no value vector
            o_factor = 0.f;
            lse = INFINITY;
            entropy = 0.f;
            return;
        }
        const float mf = fmaxf(m, sink);
        if (mf != -INFINITY) {
            const float a = exp2f(m - mf);  // 0 when the row saw no key
            const float ps = exp2f(sink - mf);
            l = l * a + ps;
            es = es * a + (ps > 0.f ? ps * sink : 0.f);
            o_factor = a / l;
            m = mf;
        } else {
            o_factor = 0.f;
        }
    } else {
        o_factor = l > 0.f ? 1.f / l : 0.f;
    }
    if (l > 0.f) {
        lse = (m + log2f(l)) * LN2;
        entropy = (m + log2f(l) - es / l) * LN2;
    } else {
        lse = -INFINITY;
        entropy = 0.f;
    }
}

// relu^2 weights enter the P V mma rounded to T, and f16 overflows at 65504 where O may still
// be representable. Each row's weights are divided by a power of two (`scale`, only growing,
// folded into O's factor at the end) that keeps them at most 2^15: exact, as scaling by a
// power of two changes no rounding (except of weights 2^-24 below the row's largest, which
// may go subnormal). `inv` is 1 / scale.
template <int NT_N, int NT_D>
__device__ __forceinline__ void relu2_rescale(float (&sc)[NT_N][4], float (&o)[NT_D][4], float (&scale)[2],
                                              float (&inv)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = 0.f;
#pragma unroll
        for (int n = 0; n < NT_N; ++n) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
        mx = quad_max(mx);  // the four threads of the row agree on its scale
        if (mx * inv[r] > 32768.f) {
            // The power of two above mx (exponent field + 1), at most 2^126 so 1/scale is normal.
            const int e = min(((__float_as_int(mx) >> 23) & 0xff) + 1, 253);
            const float inv_new = __int_as_float((254 - e) << 23);
            const float f = scale[r] * inv_new;  // old / new: a power of two, exact
#pragma unroll
            for (int d = 0; d < NT_D; ++d) {
                o[d][2 * r] *= f;
                o[d][2 * r + 1] *= f;
            }
            scale[r] = __int_as_float(e << 23);
            inv[r] = inv_new;
        }
#pragma unroll
        for (int n = 0; n < NT_N; ++n) {
            sc[n][2 * r] *= inv[r];
            sc[n][2 * r + 1] *= inv[r];
        }
    }
}

// Copies rows [row0, row0 + ROWS) (those below `limit`; the rest zero-filled) of a
// [rows, D] tile with row stride `stride` into swizzled shared memory, 16 bytes per cp.async
// (the D / 8 real chunks of each row; a row's padding is never touched). Where the threads
// cover whole rows, each copies one chunk column through one pointer it bumps by a fixed step
// (few live registers, however often the sweep is unrolled).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t stride, int row0, int limit) {
    using Tile = HeadRows<D>;
    constexpr int CPR = D / 8, CHUNKS = ROWS * CPR;
    if constexpr (THREADS % CPR == 0) {
        constexpr int RS = THREADS / CPR;  // rows per sweep
        const int r = threadIdx.x / CPR, c = threadIdx.x % CPR;
        const T* src = base + (int64_t)(row0 + r) * stride + c * 8;
        const int64_t step = RS * stride;
#pragma unroll
        for (int i = 0; i < (ROWS + RS - 1) / RS; ++i) {
            if (ROWS % RS != 0 && r + i * RS >= ROWS) break;
            const bool valid = row0 + r + i * RS < limit;
            cp_async_16(smem + Tile::offset(r + i * RS, c), valid ? src : base, valid);
            src += step;
        }
    } else {
#pragma unroll
        for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i) {
            const int idx = threadIdx.x + i * THREADS;
            if (CHUNKS % THREADS != 0 && idx >= CHUNKS) break;  // head dims 80, 112: a partial sweep
            const int r = idx / CPR, c = idx % CPR;
            const bool valid = row0 + r < limit;
            const T* src = valid ? base + (int64_t)(row0 + r) * stride + c * 8 : base;
            cp_async_16(smem + Tile::offset(r, c), src, valid);
        }
    }
}

template <typename T, int D, int WARPS, int MT, int BN, bool RELU2>
__device__ __forceinline__ void flash_fwd_tc(const FlashParams& p) {
    constexpr int WM = 16 * MT;    // query rows per warp: MT m16 row tiles share each K/V fragment
    constexpr int BM = WM * WARPS;
    constexpr int THREADS = 32 * WARPS;
    constexpr int NT_N = BN / 8;  // n8 tiles of S per row tile
    constexpr int NT_D = D / 8;   // n8 tiles of O
    using Tile = HeadRows<D>;
    constexpr int ROW = head_row_bytes<D>();
    static_assert(D % 16 == 0 && BN % 16 == 0, "head dim and key tile must be multiples of 16");

    // sQ, then K and V double-buffered (a tile's buffers are its visit's parity), then each
    // row's constants (kept out of registers: they are 3 floats per row, 6 MT a thread).
    unsigned char* smem = dynamic_smem();
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK0 = sQ + BM * ROW;
    const uint32_t sV0 = sK0 + 2 * BN * ROW;
    float3* row_const = reinterpret_cast<float3*>(smem + BM * ROW + 4 * BN * ROW);

    const int tile = gridDim.x - 1 - blockIdx.x;  // heaviest (causal: last) tiles first
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int m0 = tile * BM;
    if (!s.valid || m0 >= s.seq_q) return;
    const int m1 = min(m0 + BM, s.seq_q);
    const T* q = static_cast<const T*>(p.q) + s.q_off;
    const T* k = static_cast<const T*>(p.k) + s.k_off;
    const T* v = static_cast<const T*>(p.v) + s.v_off;
    T* o_ptr = static_cast<T*>(p.o) + s.o_off;
    const Visibility vis(p, s);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const bool track = p.entropy != nullptr;
    const LogitShape shape(p.softcap);
    const float slope = alibi_slope_log2(p.alibi_slopes, h);
    // The row of (row tile mt, half r) this thread holds.
    auto row_of = [&](int mt, int r) { return m0 + warp * WM + mt * 16 + g + r * 8; };

    // Per-row constants (exp2-domain scale, scale, relu^2's 1/n), one thread per row; the
    // first barrier of the loop publishes them.
    for (int i = threadIdx.x; i < BM; i += THREADS) {
        float3 c;
        row_constants(p, vis, s, m0 + i, c.x, c.y, c.z);
        row_const[i] = c;
    }

    float o[MT][NT_D][4];
    float m[MT][2], l[MT][2], es[MT][2];
    float pscale[MT][2], pinv[MT][2];  // relu^2 only: see relu2_rescale
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        zero_frags(o[mt]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m[mt][r] = -INFINITY;
            l[mt][r] = es[mt][r] = 0.f;
            pscale[mt][r] = pinv[mt][r] = 1.f;
        }
    }

    // One barrier per key tile: at the top of visit i, K_i and V_i have landed for every
    // thread and every warp has finished visit i - 1, whose buffers then take tile i + 1's
    // copy, which overlaps both of visit i's products.
    const int last = vis.last_tile(m1, BN);
    int j = vis.next_tile(0, m0, m1, BN), buf = 0;
    // The tile after j, looked up a visit ahead (a block-mask scan is a chain of global loads:
    // it runs while the products do, not between the barrier and the next copy).
    int jn = j <= last ? vis.next_tile(j + 1, m0, m1, BN) : last + 1;
    if (j <= last) {
        load_tile<T, D, BM, THREADS>(sQ, q, p.q_row_stride, m0, s.seq_q);
        load_tile<T, D, BN, THREADS>(sK0, k, p.k_row_stride, j * BN, s.seq_k);
        load_tile<T, D, BN, THREADS>(sV0, v, p.v_row_stride, j * BN, s.seq_k);
        cp_async_commit();
    }
    while (j <= last) {
        cp_async_wait<0>();
        __syncthreads();
        if (jn <= last) {
            load_tile<T, D, BN, THREADS>(sK0 + (buf ^ 1) * BN * ROW, k, p.k_row_stride, jn * BN, s.seq_k);
            load_tile<T, D, BN, THREADS>(sV0 + (buf ^ 1) * BN * ROW, v, p.v_row_stride, jn * BN, s.seq_k);
            cp_async_commit();
        }

        // S = Q K_j^T for this warp's WM rows.
        float sc[MT][NT_N][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) zero_frags(sc[mt]);
        mma_rowtiles_by_rows<T, D, NT_N, MT>(sc, sQ, warp * WM, sK0 + buf * BN * ROW, 0, lane);
        const int jnn = jn <= last ? vis.next_tile(jn + 1, m0, m1, BN) : last + 1;

        // Scores: exp2-domain for the softmax, relu^2 / n for GAU. The tile's kind is decided
        // once: per-key visibility only where the tile is not wholly visible.
        const int n0 = j * BN;
        const bool need_mask = !vis.tile_full(m0, m1, n0, BN);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float3 rc[2] = {row_const[row_of(mt, 0) - m0], row_const[row_of(mt, 1) - m0]};
#pragma unroll
            for (int n = 0; n < NT_N; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const int key = n0 + n * 8 + 2 * t + (e & 1);
                    const int row = row_of(mt, r);
                    float x;
                    if (RELU2) {
                        const float y = fmaxf(sc[mt][n][e] * rc[r].y, 0.f);
                        x = y * y * rc[r].z;
                    } else {
                        x = shape.operator()<false>(sc[mt][n][e] * rc[r].x, slope, row + vis.diag - key);
                    }
                    sc[mt][n][e] = x;
                }
            }
            // Per-key visibility only where the tile is not wholly visible. Rows past the
            // sequence are never written; skipping them also keeps the block-mask lookup
            // inside the mask.
            if (need_mask) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int row = row_of(mt, r);
                    const uint8_t* mrow = row < s.seq_q ? vis.mask_row(row) : nullptr;
#pragma unroll
                    for (int n = 0; n < NT_N; ++n) {
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int key = n0 + n * 8 + 2 * t + c;
                            if (row >= s.seq_q || key >= s.seq_k || !vis.visible(row, key, mrow))
                                sc[mt][n][2 * r + c] = RELU2 ? 0.f : -INFINITY;
                        }
                    }
                }
            }
            if (RELU2) relu2_rescale<NT_N, NT_D>(sc[mt], o[mt], pscale[mt], pinv[mt]);
            else online_softmax_mma<NT_N, NT_D>(sc[mt], o[mt], m[mt], l[mt], es[mt], track);
        }

        // O += P V_j: P's accumulator layout is the A-operand layout of the next mma.
        mma_accs_by_rows<T, D, NT_N, MT>(o, sc, sV0 + buf * BN * ROW, 0, lane);
        buf ^= 1;
        j = jn;
        jn = jnn;
    }

    // Epilogue: finish each row, write LSE (and entropy), stage O through this warp's own Q
    // rows (no other warp reads them), then 16-byte coalesced stores.
    unsigned char* stage = smem;
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float factor[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float lr = quad_sum(l[mt][r]), er = quad_sum(es[mt][r]);
            float lse, ent;
            finish_row(p, h, RELU2, m[mt][r], lr, er, factor[r], lse, ent);
            if (RELU2) factor[r] = pscale[mt][r];
            const int row = row_of(mt, r);
            if (t == 0 && row < s.seq_q) {
                p.lse[s.lse_off + row] = lse;
                if (track) p.entropy[s.lse_off + row] = ent;
            }
        }
#pragma unroll
        for (int d = 0; d < NT_D; ++d) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t packed = pack2<T>(o[mt][d][2 * r] * factor[r], o[mt][d][2 * r + 1] * factor[r]);
                const int row = warp * WM + mt * 16 + g + r * 8;
                *reinterpret_cast<uint32_t*>(stage + Tile::offset(row, d) + t * 4) = packed;
            }
        }
    }
    __syncwarp();
    constexpr int CPR = D / 8;  // real chunks per row
#pragma unroll
    for (int i = 0; i < (WM * CPR + 31) / 32; ++i) {
        const int idx = lane + i * 32;
        if (idx < WM * CPR) {
            const int r = idx / CPR, c = idx % CPR;
            const int row = m0 + warp * WM + r;
            if (row < s.seq_q) {
                *reinterpret_cast<uint4*>(o_ptr + (int64_t)row * p.o_row_stride + c * 8) =
                    *reinterpret_cast<const uint4*>(stage + Tile::offset(warp * WM + r, c));
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
    const int m1 = min(m0 + BM, s.seq_q);
    const float* q = static_cast<const float*>(p.q) + s.q_off;
    const float* k = static_cast<const float*>(p.k) + s.k_off;
    const float* v = static_cast<const float*>(p.v) + s.v_off;
    float* o_ptr = static_cast<float*>(p.o) + s.o_off;
    const Visibility vis(p, s);
    const bool relu2 = p.score == ATTNKIT_FLASH_SCORE_RELU2;
    const bool track = p.entropy != nullptr;
    const LogitShape shape(p.softcap);
    const float slope = alibi_slope_log2(p.alibi_slopes, h);
    const int row = threadIdx.x / 8, sub = threadIdx.x % 8;
    const int grow = m0 + row;
    float rs_log2, rs, inv_n;
    row_constants(p, vis, s, grow, rs_log2, rs, inv_n);

    for (int i = threadIdx.x; i < BM * D; i += THREADS) {
        const int r = i / D, c = i % D;
        sQ[r * QP + c] = m0 + r < s.seq_q ? q[(int64_t)(m0 + r) * p.q_row_stride + c] : 0.f;
    }
    float acc[D / 8];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f, es = 0.f;

    const int last = vis.last_tile(m1, BN);
    for (int j = vis.next_tile(0, m0, m1, BN); j <= last; j = vis.next_tile(j + 1, m0, m1, BN)) {
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
            const bool vis_ok = grow < s.seq_q && n0 + key < s.seq_k && vis.visible(grow, n0 + key);
            float x;
            if (relu2) {
                const float y = fmaxf(dot * rs, 0.f);
                x = vis_ok ? y * y * inv_n : 0.f;
            } else {
                x = vis_ok ? shape.operator()<true>(dot * rs_log2, slope, grow + vis.diag - (n0 + key)) : -INFINITY;
            }
            sc[u] = x;
            mx = fmaxf(mx, x);
        }
        float alpha = 1.f;
        if (relu2) {
#pragma unroll
            for (int u = 0; u < BN / 8; ++u) sP[row * PP + sub + 8 * u] = sc[u];
        } else {
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_new = fmaxf(m, mx);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;
            alpha = exp2f(m - m_use);
            float sum = 0.f, ps = 0.f;
#pragma unroll
            for (int u = 0; u < BN / 8; ++u) {
                const float pr = exp2f(sc[u] - m_use);
                sum += pr;
                if (track && pr > 0.f) ps += pr * sc[u];
                sP[row * PP + sub + 8 * u] = pr;
            }
            l = l * alpha + sum;
            es = es * alpha + ps;
            m = m_new;
        }
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
    for (int off = 1; off < 8; off <<= 1) {
        l += __shfl_xor_sync(0xffffffffu, l, off);
        es += __shfl_xor_sync(0xffffffffu, es, off);
    }
    float factor, lse, ent;
    finish_row(p, h, relu2, m, l, es, factor, lse, ent);
    if (grow < s.seq_q) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o_ptr[(int64_t)grow * p.o_row_stride + sub + 8 * i] = acc[i] * factor;
        if (sub == 0) {
            p.lse[s.lse_off + grow] = lse;
            if (track) p.entropy[s.lse_off + grow] = ent;
        }
    }
}


// ---- Backward (CUDA cores, f32 arithmetic; see flash.h) ----

// A score's weight and its gradient through the logit, for (row i with constants rs_log2, rs,
// inv_n, lse, D) and key j with dot = q.k and dp = dO.v: (w, g) with w = P (softmax) or
// relu(x)^2 / n, and g = dL/d(q.k) (the row's scale, the softcap's derivative folded in).
struct BwdRow {
    float rs_log2, rs, inv_n, lse_log2, delta;
    bool dead;  // softmax row with an infinite LSE (saw nothing, or an infinite sink)
};

__device__ __forceinline__ BwdRow bwd_row(const FlashBwdParams& bp, const Visibility& vis, const Seq& s, int row) {
    const FlashParams& p = bp.fwd;
    BwdRow r;
    row_constants(p, vis, s, row, r.rs_log2, r.rs, r.inv_n);
    const float lse = p.lse[s.lse_off + row];
    r.lse_log2 = lse * LOG2E;
    r.delta = bp.delta[s.lse_off + row];
    // A row that saw nothing (-inf) or an infinite sink (+inf) has P = 0; a NaN stays NaN.
    r.dead = p.score != ATTNKIT_FLASH_SCORE_RELU2 && isinf(lse);
    return r;
}

// RELU2 is the score (a template parameter where the caller has one per block).
template <bool RELU2>
__device__ __forceinline__ void bwd_score(const LogitShape& shape, float slope, const BwdRow& r, bool visible, int dist,
                                          float dot, float dp, float& w, float& g) {
    if (!visible || r.dead) {
        w = 0.f;
        g = 0.f;
        return;
    }
    if (RELU2) {
        const float y = fmaxf(dot * r.rs, 0.f);
        w = y * y * r.inv_n;
        g = 2.f * y * r.inv_n * dp * r.rs;
        return;
    }
    float x = dot * r.rs_log2, dcap = 1.f;
    if (shape.capped) {
        // The forward's exact cap (soft_cap<true>), with tanh kept for its derivative.
        const float th = tanhf(x * shape.inv_cap);
        x = shape.cap * th;
        dcap = (1.f - th) * (1.f + th);
    }
    const float pr = exp2f(fmaf(-slope, (float)abs(dist), x) - r.lse_log2);
    w = pr;
    g = pr * (dp - r.delta) * dcap * r.rs;
}

// Row i's term of d sink_logits[h], -p_sink D (0 without learned sinks or for a dead row),
// kept per row so that flash_bwd_dsink sums them in one order.
__device__ __forceinline__ void bwd_sink_term(const FlashBwdParams& bp, const Seq& s, int h, int i, float delta) {
    const FlashParams& p = bp.fwd;
    if (bp.sink_terms == nullptr) return;
    const float lse = p.lse[s.lse_off + i];
    bp.sink_terms[s.lse_off + i] = p.sink_logits != nullptr && isfinite(lse) ? -expf(p.sink_logits[h] - lse) * delta : 0.f;
}

// Element offset of row 0 of (sequence b, head h) in a gradient of strides (bs, rs, hs): the
// sequence's packed row offset when varlen (`keys`: in the keys' offsets).
__device__ __forceinline__ int64_t grad_base(const FlashParams& p, bool keys, int b, int h, int64_t bs, int64_t rs,
                                             int64_t hs) {
    if (p.cu_seqlens_q != nullptr) return (int64_t)(keys ? p.cu_seqlens_k[b] : p.cu_seqlens_q[b]) * rs + h * hs;
    return b * bs + h * hs;
}
__device__ __forceinline__ int64_t dq_base(const FlashBwdParams& bp, int b, int h) {
    return grad_base(bp.fwd, false, b, h, bp.dq_batch_stride, bp.dq_row_stride, bp.dq_head_stride);
}
__device__ __forceinline__ int64_t dk_base(const FlashBwdParams& bp, int b, int h) {
    return grad_base(bp.fwd, true, b, h, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride);
}
__device__ __forceinline__ int64_t dv_base(const FlashBwdParams& bp, int b, int h) {
    return grad_base(bp.fwd, true, b, h, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride);
}

// Zeroes every element of dq, dk and dv (their strides; gaps untouched) before the other
// kernels write the rows they own: rows of no sequence (past cu_seqlens[batch]) or of one a
// stale table makes the kernels skip read as zero, never as what the buffer held.
template <typename T>
__device__ __forceinline__ void flash_bwd_zero(const FlashBwdParams& bp) {
    const FlashParams& p = bp.fwd;
    const bool varlen = p.cu_seqlens_q != nullptr;
    const int64_t rows_q = varlen ? p.total_q : (int64_t)p.batch * p.seq_q;
    const int64_t rows_k = varlen ? p.total_k : (int64_t)p.batch * p.seq_k;
    const int64_t nq = rows_q * p.heads_q * p.head_dim, nk = rows_k * p.heads_kv * p.head_dim;
    const T zero = from_f32<T>(0.f);
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < nq + nk; e += (int64_t)gridDim.x * blockDim.x) {
        const bool is_q = e < nq;
        const int64_t x = is_q ? e : e - nq;
        const int heads = is_q ? p.heads_q : p.heads_kv, seq = is_q ? p.seq_q : p.seq_k;
        const int c = (int)(x % p.head_dim);
        const int h = (int)((x / p.head_dim) % heads);
        const int64_t row = x / ((int64_t)p.head_dim * heads);
        const int64_t b = varlen ? 0 : row / seq, r = varlen ? row : row % seq;
        if (is_q) {
            static_cast<T*>(bp.dq)[b * bp.dq_batch_stride + r * bp.dq_row_stride + h * bp.dq_head_stride + c] = zero;
        } else {
            const int64_t ko = b * bp.dk_batch_stride + r * bp.dk_row_stride + h * bp.dk_head_stride + c;
            const int64_t vo = b * bp.dv_batch_stride + r * bp.dv_row_stride + h * bp.dv_head_stride + c;
            static_cast<T*>(bp.dk)[ko] = zero;
            static_cast<T*>(bp.dv)[vo] = zero;
        }
    }
}

// D = rowsum(dO * O): thread per (row, head, sequence) of a 128-row tile.
template <typename T>
__device__ __forceinline__ void flash_bwd_delta(const FlashBwdParams& bp) {
    const FlashParams& p = bp.fwd;
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (!s.valid || row >= s.seq_q) return;
    const T* o = static_cast<const T*>(p.o) + s.o_off + (int64_t)row * p.o_row_stride;
    const T* g = static_cast<const T*>(bp.d_o) + s.o_off + (int64_t)row * p.o_row_stride;
    float acc = 0.f;
    for (int c = 0; c < p.head_dim; ++c) acc = fmaf(to_f32(o[c]), to_f32(g[c]), acc);
    bp.delta[s.lse_off + row] = acc;
}

// dK, dV of one key tile: thread (key = tid / 8, sub = tid % 8) owns channels sub + 8 i of
// its key's dK and dV rows; query rows come ROWS at a time through shared memory.
template <typename T, int D>
__device__ __forceinline__ void flash_bwd_dkdv(const FlashBwdParams& bp) {
    constexpr int BN = ATTNKIT_FLASH_BWD_BLOCK_N, ROWS = ATTNKIT_FLASH_BWD_ROWS, THREADS = ATTNKIT_FLASH_BWD_THREADS;
    static_assert(BN * 8 == THREADS, "8 threads per key");
    const FlashParams& p = bp.fwd;
    float* sQ = reinterpret_cast<float*>(dynamic_smem());  // [ROWS][D]
    float* sG = sQ + ROWS * D;                               // [ROWS][D]: dO
    const int hk = blockIdx.y, b = blockIdx.z;
    const int group = p.heads_q / p.heads_kv;
    const Seq s0 = locate(p, b, hk * group);
    const int n0 = blockIdx.x * BN;
    if (!s0.valid || n0 >= s0.seq_k) return;
    const int key = threadIdx.x / 8, sub = threadIdx.x % 8;
    const int j = n0 + key;
    const bool key_in = j < s0.seq_k;
    float kr[D / 8], vr[D / 8], dk[D / 8], dv[D / 8];
    const T* k = static_cast<const T*>(p.k) + s0.k_off + (int64_t)j * p.k_row_stride;
    const T* v = static_cast<const T*>(p.v) + s0.v_off + (int64_t)j * p.v_row_stride;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        kr[i] = key_in ? to_f32(k[sub + 8 * i]) : 0.f;
        vr[i] = key_in ? to_f32(v[sub + 8 * i]) : 0.f;
        dk[i] = 0.f;
        dv[i] = 0.f;
    }
    const Visibility vis(p, s0);
    const LogitShape shape(p.softcap);
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const Seq s = locate(p, b, h);
        const float slope = alibi_slope_log2(p.alibi_slopes, h);
        const T* q = static_cast<const T*>(p.q) + s.q_off;
        const T* g = static_cast<const T*>(bp.d_o) + s.o_off;
        for (int m0 = 0; m0 < s.seq_q; m0 += ROWS) {
            const int m1 = min(m0 + ROWS, s.seq_q);
            if (!vis.warp_tile_needed(m0, m1, n0, BN)) continue;
            __syncthreads();  // the previous rows consumed
            for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
                const int r = e / D, c = e % D;
                const bool in = m0 + r < m1;
                sQ[e] = in ? to_f32(q[(int64_t)(m0 + r) * p.q_row_stride + c]) : 0.f;
                sG[e] = in ? to_f32(g[(int64_t)(m0 + r) * p.o_row_stride + c]) : 0.f;
            }
            __syncthreads();
            for (int r = 0; r < m1 - m0; ++r) {
                const int i = m0 + r;
                float dot = 0.f, dp = 0.f;
#pragma unroll
                for (int c = 0; c < D / 8; ++c) {
                    dot = fmaf(sQ[r * D + sub + 8 * c], kr[c], dot);
                    dp = fmaf(sG[r * D + sub + 8 * c], vr[c], dp);
                }
#pragma unroll
                for (int off = 1; off < 8; off <<= 1) {
                    dot += __shfl_xor_sync(0xffffffffu, dot, off);
                    dp += __shfl_xor_sync(0xffffffffu, dp, off);
                }
                const BwdRow row = bwd_row(bp, vis, s, i);
                float w, gr;
                const bool seen = key_in && vis.visible(i, j);
                if (p.score == ATTNKIT_FLASH_SCORE_RELU2) bwd_score<true>(shape, slope, row, seen, i + vis.diag - j, dot, dp, w, gr);
                else bwd_score<false>(shape, slope, row, seen, i + vis.diag - j, dot, dp, w, gr);
#pragma unroll
                for (int c = 0; c < D / 8; ++c) {
                    dv[c] = fmaf(w, sG[r * D + sub + 8 * c], dv[c]);
                    dk[c] = fmaf(gr, sQ[r * D + sub + 8 * c], dk[c]);
                }
            }
        }
    }
    if (!key_in) return;
    T* dkp = static_cast<T*>(bp.dk) + dk_base(bp, b, hk) + (int64_t)j * bp.dk_row_stride;
    T* dvp = static_cast<T*>(bp.dv) + dv_base(bp, b, hk) + (int64_t)j * bp.dv_row_stride;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
        dkp[sub + 8 * c] = from_f32<T>(dk[c]);
        dvp[sub + 8 * c] = from_f32<T>(dv[c]);
    }
}

// dQ of one tile of BLOCK_M rows: thread (row = tid / 8, sub = tid % 8) owns channels
// sub + 8 i of its row; keys come BLOCK_N at a time through shared memory. Also each row's
// sink term -p_sink D.
template <typename T, int D>
__device__ __forceinline__ void flash_bwd_dq(const FlashBwdParams& bp) {
    constexpr int BM = ATTNKIT_FLASH_BWD_BLOCK_M, BN = ATTNKIT_FLASH_BWD_BLOCK_N, THREADS = ATTNKIT_FLASH_BWD_THREADS;
    static_assert(BM * 8 == THREADS, "8 threads per row");
    const FlashParams& p = bp.fwd;
    float* sK = reinterpret_cast<float*>(dynamic_smem());  // [BN][D]
    float* sV = sK + BN * D;                                 // [BN][D]
    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int m0 = blockIdx.x * BM;
    if (!s.valid || m0 >= s.seq_q) return;
    const int m1 = min(m0 + BM, s.seq_q);
    const int rloc = threadIdx.x / 8, sub = threadIdx.x % 8;
    const int i = m0 + rloc;
    const bool row_in = i < s.seq_q;
    const T* q = static_cast<const T*>(p.q) + s.q_off + (int64_t)i * p.q_row_stride;
    const T* g = static_cast<const T*>(bp.d_o) + s.o_off + (int64_t)i * p.o_row_stride;
    float qr[D / 8], gr[D / 8], dq[D / 8];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
        qr[c] = row_in ? to_f32(q[sub + 8 * c]) : 0.f;
        gr[c] = row_in ? to_f32(g[sub + 8 * c]) : 0.f;
        dq[c] = 0.f;
    }
    const Visibility vis(p, s);
    const LogitShape shape(p.softcap);
    const float slope = alibi_slope_log2(p.alibi_slopes, h);
    const BwdRow row = bwd_row(bp, vis, s, row_in ? i : m0);
    const T* k = static_cast<const T*>(p.k) + s.k_off;
    const T* v = static_cast<const T*>(p.v) + s.v_off;
    const int last = vis.last_tile(m1, BN);
    for (int t = vis.next_tile(0, m0, m1, BN); t <= last; t = vis.next_tile(t + 1, m0, m1, BN)) {
        const int n0 = t * BN;
        __syncthreads();  // the previous keys consumed
        for (int e = threadIdx.x; e < BN * D; e += THREADS) {
            const int r = e / D, c = e % D;
            const bool in = n0 + r < s.seq_k;
            sK[e] = in ? to_f32(k[(int64_t)(n0 + r) * p.k_row_stride + c]) : 0.f;
            sV[e] = in ? to_f32(v[(int64_t)(n0 + r) * p.v_row_stride + c]) : 0.f;
        }
        __syncthreads();
        for (int kk = 0; kk < BN; ++kk) {
            const int j = n0 + kk;
            float dot = 0.f, dp = 0.f;
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                dot = fmaf(qr[c], sK[kk * D + sub + 8 * c], dot);
                dp = fmaf(gr[c], sV[kk * D + sub + 8 * c], dp);
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) {
                dot += __shfl_xor_sync(0xffffffffu, dot, off);
                dp += __shfl_xor_sync(0xffffffffu, dp, off);
            }
            float w, gs;
            const bool seen = row_in && j < s.seq_k && vis.visible(i, j);
            if (p.score == ATTNKIT_FLASH_SCORE_RELU2) bwd_score<true>(shape, slope, row, seen, i + vis.diag - j, dot, dp, w, gs);
            else bwd_score<false>(shape, slope, row, seen, i + vis.diag - j, dot, dp, w, gs);
#pragma unroll
            for (int c = 0; c < D / 8; ++c) dq[c] = fmaf(gs, sK[kk * D + sub + 8 * c], dq[c]);
        }
    }
    if (!row_in) return;
    T* dqp = static_cast<T*>(bp.dq) + dq_base(bp, b, h) + (int64_t)i * bp.dq_row_stride;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) dqp[sub + 8 * c] = from_f32<T>(dq[c]);
    if (sub == 0) bwd_sink_term(bp, s, h, i, row.delta);
}

// ---- Backward on tensor cores (f16, bf16; see flash.h) ----

constexpr int BWD_ROW_BYTES = ATTNKIT_FLASH_BWD_TC_ROW_CONST_BYTES;
static_assert(sizeof(BwdRow) <= BWD_ROW_BYTES, "BwdRow outgrew its shared-memory slot");

// Stores the 16 x D accumulator tile a warp holds (rows row0 + g, row0 + g + 8 below `limit`)
// to global rows of stride `stride`, rounded to T, two elements per 4-byte store.
template <typename T, int D>
__device__ __forceinline__ void store_acc_rows(T* base, int64_t stride, int row0, int limit, const float (&acc)[D / 8][4],
                                               int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + r * 8;
        if (row >= limit) continue;
        T* dst = base + (int64_t)row * stride + 2 * t;
#pragma unroll
        for (int d = 0; d < D / 8; ++d)
            *reinterpret_cast<uint32_t*>(dst + d * 8) = pack2<T>(acc[d][2 * r], acc[d][2 * r + 1]);
    }
}

// dK, dV of 16 * WARPS keys, each warp its own 16 (key rows as the mma's M, so dK and dV stay
// in registers for the whole sweep), over every (head of the group, BM-row query tile) that
// can see them. Per stage (double-buffered: the next stage's Q, dO copies and row constants
// overlap this one's products):
//   S^T = K Q^T, dP^T = V dO^T; P^T, dS^T from the rows' LSE and D (bwd_score);
//   dV += P^T dO, dK += dS^T Q   (P^T, dS^T re-packed from the accumulators).
// SPLIT = 2 (head dims 192, 256): warps 2w and 2w + 1 share keys 16w..16w + 15, each holding
// dK and dV of half the head dim.
template <typename T, int D, int BM, bool RELU2, int SPLIT>
__device__ __forceinline__ void flash_bwd_dkdv_tc(const FlashBwdParams& bp) {
    constexpr int WARPS = ATTNKIT_FLASH_BWD_TC_WARPS, BN = 16 * WARPS / SPLIT, THREADS = 32 * WARPS;
    constexpr int COLS = D / SPLIT;  // the head-dim columns of dK, dV a warp holds
    constexpr int NT = BM / 8;  // n8 tiles of S^T: the stage's query rows are its columns
    constexpr int ROW = head_row_bytes<D>();
    constexpr uint32_t STAGE = 2 * BM * ROW;  // a stage's sQ and sG (dO)
    const FlashParams& p = bp.fwd;
    unsigned char* smem = dynamic_smem();
    const uint32_t sK = smem_addr(smem), sV = sK + BN * ROW, stages = sV + BN * ROW;
    unsigned char* rows_base = smem + 2 * BN * ROW + 2 * STAGE;  // [2][BM] row constants

    const int hk = blockIdx.y, b = blockIdx.z, group = p.heads_q / p.heads_kv;
    const Seq s0 = locate(p, b, hk * group);
    const int n0 = blockIdx.x * BN;
    if (!s0.valid || n0 >= s0.seq_k) return;
    const Visibility vis(p, s0);  // every head of the group has the sequence's lengths
    const LogitShape shape(p.softcap);
    const int tiles = (s0.seq_q + BM - 1) / BM, total = group * tiles;
    // Stage idx is row tile idx % tiles of head hk * group + idx / tiles; the sweep visits
    // those whose rows can see a key of this tile.
    auto next = [&](int idx) {
        for (; idx < total; ++idx) {
            const int m0 = idx % tiles * BM;
            if (vis.warp_tile_needed(m0, min(m0 + BM, s0.seq_q), n0, BN)) break;
        }
        return idx;
    };
    auto stage = [&](int idx, int buf) {
        const int h = hk * group + idx / tiles, m0 = idx % tiles * BM;
        const Seq s = locate(p, b, h);
        const uint32_t sQ = stages + buf * STAGE;
        load_tile<T, D, BM, THREADS>(sQ, static_cast<const T*>(p.q) + s.q_off, p.q_row_stride, m0, s.seq_q);
        load_tile<T, D, BM, THREADS>(sQ + BM * ROW, static_cast<const T*>(bp.d_o) + s.o_off, p.o_row_stride, m0,
                                     s.seq_q);
        cp_async_commit();
        BwdRow* rows = reinterpret_cast<BwdRow*>(rows_base + buf * BM * BWD_ROW_BYTES);
        for (int r = threadIdx.x; r < BM; r += THREADS) rows[r] = bwd_row(bp, vis, s, min(m0 + r, s.seq_q - 1));
    };

    int idx = next(0), buf = 0;
    if (idx >= total) return;  // no row sees these keys: their gradients stay flash_bwd_zero's
    load_tile<T, D, BN, THREADS>(sK, static_cast<const T*>(p.k) + s0.k_off, p.k_row_stride, n0, s0.seq_k);
    load_tile<T, D, BN, THREADS>(sV, static_cast<const T*>(p.v) + s0.v_off, p.v_row_stride, n0, s0.seq_k);
    cp_async_commit();
    stage(idx, 0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kw = warp / SPLIT, c0 = warp % SPLIT * COLS;  // this warp's keys and columns
    float dk[COLS / 8][4], dv[COLS / 8][4];
    zero_frags(dk);
    zero_frags(dv);

    while (idx < total) {
        const int nidx = next(idx + 1);
        if (nidx < total) {
            stage(nidx, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // K, V and this stage's tiles have landed, its row constants written
        const int h = hk * group + idx / tiles, m0 = idx % tiles * BM, m1 = min(m0 + BM, s0.seq_q);
        const uint32_t sQ = stages + buf * STAGE, sG = sQ + BM * ROW;
        const BwdRow* rows = reinterpret_cast<const BwdRow*>(rows_base + buf * BM * BWD_ROW_BYTES);
        float st[NT][4], dpt[NT][4];
        zero_frags(st);
        zero_frags(dpt);
        mma_rows_by_rows<T, D, NT>(st, sK, kw * 16, sQ, 0, lane);
        mma_rows_by_rows<T, D, NT>(dpt, sV, kw * 16, sG, 0, lane);
        const float slope = alibi_slope_log2(p.alibi_slopes, h);
        // Zero-filled rows past the sequence would score 0, not -inf: they are masked too.
        const bool need_mask = m1 - m0 < BM || !vis.tile_full(m0, m1, n0, BN);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + kw * 16 + g + (e >> 1) * 8;
                const int r = n * 8 + 2 * t + (e & 1), i = m0 + r;
                const bool seen = !need_mask || (i < m1 && key < s0.seq_k && vis.visible(i, key));
                float w, gr;
                bwd_score<RELU2>(shape, slope, rows[r], seen, i + vis.diag - key, st[n][e], dpt[n][e], w, gr);
                st[n][e] = w;
                dpt[n][e] = gr;
            }
        }
        mma_acc_by_rows<T, D, NT, COLS>(dv, st, sG, 0, lane, c0);
        mma_acc_by_rows<T, D, NT, COLS>(dk, dpt, sQ, 0, lane, c0);
        __syncthreads();  // every warp is done with this stage before the next refills it
        idx = nidx;
        buf ^= 1;
    }
    const int key0 = n0 + kw * 16;
    T* dkp = static_cast<T*>(bp.dk) + dk_base(bp, b, hk) + c0;
    T* dvp = static_cast<T*>(bp.dv) + dv_base(bp, b, hk) + c0;
    store_acc_rows<T, COLS>(dkp, bp.dk_row_stride, key0, s0.seq_k, dk, lane);
    store_acc_rows<T, COLS>(dvp, bp.dv_row_stride, key0, s0.seq_k, dv, lane);
}

// dQ of 16 * WARPS rows, each warp its own 16 (the forward's layout), over the key tiles of
// BN the rows can see (Visibility::next_tile, as the forward), double-buffered:
//   S = Q K^T, dP = dO V^T; dS from the row's LSE and D; dQ += dS K.
// Also each row's sink term.
template <typename T, int D, int BN, bool RELU2>
__device__ __forceinline__ void flash_bwd_dq_tc(const FlashBwdParams& bp) {
    constexpr int WARPS = ATTNKIT_FLASH_BWD_TC_WARPS, BM = 16 * WARPS, THREADS = 32 * WARPS;
    constexpr int NT = BN / 8;
    constexpr int ROW = head_row_bytes<D>();
    constexpr uint32_t STAGE = 2 * BN * ROW;  // a stage's sK and sV
    const FlashParams& p = bp.fwd;
    const uint32_t sQ = smem_addr(dynamic_smem()), sG = sQ + BM * ROW, stages = sG + BM * ROW;

    const int h = blockIdx.y, b = blockIdx.z;
    const Seq s = locate(p, b, h);
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // heaviest (causal: last) tiles first
    if (!s.valid || m0 >= s.seq_q) return;
    const int m1 = min(m0 + BM, s.seq_q);
    const Visibility vis(p, s);
    const LogitShape shape(p.softcap);
    const float slope = alibi_slope_log2(p.alibi_slopes, h);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    BwdRow row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) row[r] = bwd_row(bp, vis, s, min(m0 + warp * 16 + g + r * 8, s.seq_q - 1));
    const T* k = static_cast<const T*>(p.k) + s.k_off;
    const T* v = static_cast<const T*>(p.v) + s.v_off;
    auto stage = [&](int j, int buf) {
        const uint32_t sK = stages + buf * STAGE;
        load_tile<T, D, BN, THREADS>(sK, k, p.k_row_stride, j * BN, s.seq_k);
        load_tile<T, D, BN, THREADS>(sK + BN * ROW, v, p.v_row_stride, j * BN, s.seq_k);
        cp_async_commit();
    };
    float dq[D / 8][4];
    zero_frags(dq);

    const int last = vis.last_tile(m1, BN);
    int j = vis.next_tile(0, m0, m1, BN), buf = 0;
    if (j <= last) {
        load_tile<T, D, BM, THREADS>(sQ, static_cast<const T*>(p.q) + s.q_off, p.q_row_stride, m0, s.seq_q);
        load_tile<T, D, BM, THREADS>(sG, static_cast<const T*>(bp.d_o) + s.o_off, p.o_row_stride, m0, s.seq_q);
        stage(j, 0);  // one group with Q and dO
    }
    while (j <= last) {
        const int jn = vis.next_tile(j + 1, m0, m1, BN);
        if (jn <= last) {
            stage(jn, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // Q, dO and this stage's K, V have landed
        const uint32_t sK = stages + buf * STAGE, sV = sK + BN * ROW;
        float sc[NT][4], ds[NT][4];
        zero_frags(sc);
        zero_frags(ds);
        mma_rows_by_rows<T, D, NT>(sc, sQ, warp * 16, sK, 0, lane);
        mma_rows_by_rows<T, D, NT>(ds, sG, warp * 16, sV, 0, lane);
        const int n0 = j * BN;
        const bool need_mask = !vis.tile_full(m0, m1, n0, BN);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int i = m0 + warp * 16 + g + r * 8, key = n0 + n * 8 + 2 * t + (e & 1);
                // Rows past the sequence are never written (and keep the mask lookup inside it).
                const bool seen = !need_mask || (i < s.seq_q && key < s.seq_k && vis.visible(i, key));
                float w, gs;
                bwd_score<RELU2>(shape, slope, row[r], seen, i + vis.diag - key, sc[n][e], ds[n][e], w, gs);
                ds[n][e] = gs;
            }
        }
        mma_acc_by_rows<T, D, NT>(dq, ds, sK, 0, lane);
        __syncthreads();  // every warp is done with this stage before the next refills it
        j = jn;
        buf ^= 1;
    }
    store_acc_rows<T, D>(static_cast<T*>(bp.dq) + dq_base(bp, b, h), bp.dq_row_stride, m0 + warp * 16, s.seq_q, dq,
                         lane);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = m0 + warp * 16 + g + r * 8;
            if (i < s.seq_q) bwd_sink_term(bp, s, h, i, row[r].delta);
        }
    }
}

// d sink_logits[h]: thread 0 of block h sums the head's rows in one order (deterministic).
__device__ __forceinline__ void bwd_dsink(const FlashBwdParams& bp) {
    const FlashParams& p = bp.fwd;
    if (threadIdx.x != 0) return;
    const int h = blockIdx.x;
    double acc = 0.0;
    for (int b = 0; b < p.batch; ++b) {
        const Seq s = locate(p, b, h);
        if (!s.valid) continue;
        for (int r = 0; r < s.seq_q; ++r) acc += bp.sink_terms[s.lse_off + r];
    }
    bp.d_sink_logits[h] = (float)acc;
}

}  // namespace

// One entry point per (dtype, head dim); the host picks the name and the launch shape from the
// same ATTNKIT_FLASH_* constants. The score function is a template parameter (no runtime branch
// in the inner loop), chosen once per block.
#define FLASH_TC(NAME, T, D, WARPS, MT, BN)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 1) NAME(const __grid_constant__ FlashParams p) { \
        if (p.score == ATTNKIT_FLASH_SCORE_RELU2) flash_fwd_tc<T, D, WARPS, MT, BN, true>(p);      \
        else flash_fwd_tc<T, D, WARPS, MT, BN, false>(p);                                         \
    }
#define FLASH_TC_SMALL(NAME, T, D)                                                                  \
    FLASH_TC(NAME, T, D, ATTNKIT_FLASH_WARPS_SMALL_D, ATTNKIT_FLASH_ROW_TILES_SMALL_D,              \
             ((D) > 64 ? ATTNKIT_FLASH_BLOCK_N_MID_D : ATTNKIT_FLASH_BLOCK_N_SMALL_D))
FLASH_TC_SMALL(flash_fwd_bf16_d32, __nv_bfloat16, 32)
FLASH_TC_SMALL(flash_fwd_bf16_d64, __nv_bfloat16, 64)
FLASH_TC_SMALL(flash_fwd_bf16_d80, __nv_bfloat16, 80)
FLASH_TC_SMALL(flash_fwd_bf16_d96, __nv_bfloat16, 96)
FLASH_TC_SMALL(flash_fwd_bf16_d112, __nv_bfloat16, 112)
FLASH_TC_SMALL(flash_fwd_bf16_d128, __nv_bfloat16, 128)
FLASH_TC(flash_fwd_bf16_d192, __nv_bfloat16, 192, ATTNKIT_FLASH_WARPS_D192, 1, ATTNKIT_FLASH_BLOCK_N_D192)
FLASH_TC(flash_fwd_bf16_d256, __nv_bfloat16, 256, ATTNKIT_FLASH_WARPS_D256, 1, ATTNKIT_FLASH_BLOCK_N_D256)
FLASH_TC_SMALL(flash_fwd_f16_d32, __half, 32)
FLASH_TC_SMALL(flash_fwd_f16_d64, __half, 64)
FLASH_TC_SMALL(flash_fwd_f16_d80, __half, 80)
FLASH_TC_SMALL(flash_fwd_f16_d96, __half, 96)
FLASH_TC_SMALL(flash_fwd_f16_d112, __half, 112)
FLASH_TC_SMALL(flash_fwd_f16_d128, __half, 128)
FLASH_TC(flash_fwd_f16_d192, __half, 192, ATTNKIT_FLASH_WARPS_D192, 1, ATTNKIT_FLASH_BLOCK_N_D192)
FLASH_TC(flash_fwd_f16_d256, __half, 256, ATTNKIT_FLASH_WARPS_D256, 1, ATTNKIT_FLASH_BLOCK_N_D256)

#define FLASH_F32(NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(ATTNKIT_FLASH_F32_THREADS, 1) NAME(const __grid_constant__ FlashParams p) { \
        flash_fwd_f32<D>(p);                                                                      \
    }
FLASH_F32(flash_fwd_f32_d32, 32)
FLASH_F32(flash_fwd_f32_d64, 64)
FLASH_F32(flash_fwd_f32_d80, 80)
FLASH_F32(flash_fwd_f32_d96, 96)
FLASH_F32(flash_fwd_f32_d112, 112)
FLASH_F32(flash_fwd_f32_d128, 128)
FLASH_F32(flash_fwd_f32_d192, 192)
FLASH_F32(flash_fwd_f32_d256, 256)

// The backward: one entry point per (dtype, head dim) for dK/dV and dQ, one per dtype for D.
// Which implementation serves each is decided here and mirrored by the host (bwd_tiles in
// src/flash/cuda.rs): f32 and f16 relu^2 on CUDA cores; f16/bf16 on tensor cores (see
// flash.h). Both use ATTNKIT_FLASH_BWD_THREADS threads.
static_assert(ATTNKIT_FLASH_BWD_TC_WARPS * 32 == ATTNKIT_FLASH_BWD_THREADS, "one launch bound for both");
// f16 relu^2 goes to CUDA cores too: its weights relu(x)^2 / n are not bounded by 1 as P is,
// and rounded to f16 for the mma they overflow where the f32 gradients do not (the forward
// rescales them per row; the backward does not yet).
template <typename T> __device__ __forceinline__ bool bwd_on_cuda_cores(const FlashBwdParams& p) {
    return std::is_same<T, __half>::value && p.fwd.score == ATTNKIT_FLASH_SCORE_RELU2;
}
template <typename T, int D> __device__ __forceinline__ void bwd_dkdv_entry(const FlashBwdParams& p) {
    constexpr bool SPLIT = D > ATTNKIT_FLASH_BWD_TC_UNSPLIT_MAX_D;
    constexpr int ROWS = D <= 64 ? ATTNKIT_FLASH_BWD_TC_ROWS_SMALL_D
                                 : SPLIT ? ATTNKIT_FLASH_BWD_TC_ROWS_LARGE_D : ATTNKIT_FLASH_BWD_TC_ROWS;
    if constexpr (std::is_same<T, float>::value) flash_bwd_dkdv<T, D>(p);
    else if (bwd_on_cuda_cores<T>(p)) flash_bwd_dkdv<T, D>(p);
    else if (p.fwd.score == ATTNKIT_FLASH_SCORE_RELU2) flash_bwd_dkdv_tc<T, D, ROWS, true, SPLIT ? 2 : 1>(p);
    else flash_bwd_dkdv_tc<T, D, ROWS, false, SPLIT ? 2 : 1>(p);
}
template <typename T, int D> __device__ __forceinline__ void bwd_dq_entry(const FlashBwdParams& p) {
    constexpr int BN = D > 128 ? ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_LARGE_D
                               : D > 64 ? ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N : ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_SMALL_D;
    if constexpr (std::is_same<T, float>::value) flash_bwd_dq<T, D>(p);
    else if (bwd_on_cuda_cores<T>(p)) flash_bwd_dq<T, D>(p);
    else if (p.fwd.score == ATTNKIT_FLASH_SCORE_RELU2) flash_bwd_dq_tc<T, D, BN, true>(p);
    else flash_bwd_dq_tc<T, D, BN, false>(p);
}
#define FLASH_BWD(T, NAME, D)                                                                      \
    extern "C" __global__ void __launch_bounds__(ATTNKIT_FLASH_BWD_THREADS, 1)                      \
        flash_bwd_dkdv_##NAME##_d##D(const __grid_constant__ FlashBwdParams p) {                   \
        bwd_dkdv_entry<T, D>(p);                                                                  \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(ATTNKIT_FLASH_BWD_THREADS, 1)                      \
        flash_bwd_dq_##NAME##_d##D(const __grid_constant__ FlashBwdParams p) {                     \
        bwd_dq_entry<T, D>(p);                                                                    \
    }
#define FLASH_BWD_DIMS(T, NAME)                                                                    \
    FLASH_BWD(T, NAME, 32) FLASH_BWD(T, NAME, 64) FLASH_BWD(T, NAME, 80) FLASH_BWD(T, NAME, 96)    \
    FLASH_BWD(T, NAME, 112) FLASH_BWD(T, NAME, 128) FLASH_BWD(T, NAME, 192) FLASH_BWD(T, NAME, 256)
FLASH_BWD_DIMS(float, f32)
FLASH_BWD_DIMS(__half, f16)
FLASH_BWD_DIMS(__nv_bfloat16, bf16)
#define FLASH_BWD_DELTA(T, NAME)                                                                   \
    extern "C" __global__ void flash_bwd_delta_##NAME(const __grid_constant__ FlashBwdParams p) {  \
        flash_bwd_delta<T>(p);                                                                    \
    }
FLASH_BWD_DELTA(float, f32)
FLASH_BWD_DELTA(__half, f16)
FLASH_BWD_DELTA(__nv_bfloat16, bf16)
#define FLASH_BWD_ZERO(T, NAME)                                                                    \
    extern "C" __global__ void flash_bwd_zero_##NAME(const __grid_constant__ FlashBwdParams p) {   \
        flash_bwd_zero<T>(p);                                                                     \
    }
FLASH_BWD_ZERO(float, f32)
FLASH_BWD_ZERO(__half, f16)
FLASH_BWD_ZERO(__nv_bfloat16, bf16)
extern "C" __global__ void flash_bwd_dsink(const __grid_constant__ FlashBwdParams p) { bwd_dsink(p); }

ATTNKIT_DEFINE_PARAMS_ECHO(FlashParams)
ATTNKIT_DEFINE_PARAMS_ECHO(FlashBwdParams)
