// Named device helpers of the decode family: where a sequence's keys live, shared-memory row
// layouts, on-the-fly RoPE, and the store of one output row (final or partial).
#pragma once

#include "common.cuh"
#include "decode.h"

namespace decode {

constexpr float LN2 = 0.6931471805599453f;

// A sequence as a block sees it: its key count and ring offset, re-checked against the host's
// limits so that a stale device copy can never send a load out of bounds.
struct SeqView {
    int len;
    int ring;
    bool valid;
};

__device__ __forceinline__ SeqView locate_seq(const DecodeParams& p, int b) {
    SeqView s;
    s.len = p.cache_seqlens[b];
    s.ring = p.ring_offsets != nullptr ? p.ring_offsets[b] : 0;
    // The splits cover num_splits * keys_per_split keys (sized by the host's max_len): a longer
    // device length (a stale table) would leave its tail unread, so it reads as empty instead.
    const int64_t covered = (int64_t)p.num_splits * p.keys_per_split;
    s.valid = 0 <= s.len && s.len <= p.capacity && s.len <= covered &&
              (p.window == 0 || (0 <= s.ring && s.ring < p.window));
    return s;
}

// Whether every page of sequence b's first len keys is a real page, decided by the whole block
// (a stride of the entries a thread, then a block vote): a stale entry then empties the whole
// sequence in every split alike, instead of zero-filling some rows of it. Costs one read of
// the sequence's table row per block (L2-served, 4 bytes per page of keys) and two barriers.
// Every thread of the block must call it; len must already be within the capacity. (A warp
// vote and a shared flag rather than __syncthreads_or: the PTX emulator has no bar.red.)
__device__ __forceinline__ bool pages_valid(const DecodeParams& p, int b, int len) {
    if (p.block_table == nullptr) return true;
    __shared__ int any_bad;
    if (threadIdx.x == 0) any_bad = 0;
    __syncthreads();
    bool bad = false;
    const int pages = (len + p.page_size - 1) / p.page_size;
    const int32_t* row = p.block_table + (int64_t)b * p.pages_per_seq;
    for (int i = threadIdx.x; i < pages; i += blockDim.x) {
        const int page = row[i];
        bad |= page < 0 || page >= p.num_pages;
    }
    if (__any_sync(0xffffffffu, bad) && threadIdx.x % 32 == 0) atomicOr(&any_bad, 1);
    __syncthreads();
    return any_bad == 0;
}
// Element offset of logical key j's row (head 0) in a cache with these strides, or -1 when
// the block table names a page that does not exist: append skips the row; attention has emptied
// such a sequence already (pages_valid), and the check stays as the last guard of every load.
__device__ __forceinline__ int64_t key_row(const DecodeParams& p, int b, int ring, int j, int64_t outer_stride,
                                           int64_t row_stride) {
    int64_t outer = b, row = j;
    if (p.block_table != nullptr) {
        const int page = p.block_table[(int64_t)b * p.pages_per_seq + j / p.page_size];
        if (page < 0 || page >= p.num_pages) return -1;
        outer = page;
        row = j % p.page_size;
    } else if (p.window > 0 && j >= p.n_sink) {
        row = p.n_sink + ((int64_t)j - p.n_sink + ring) % p.window;
    }
    return outer * outer_stride + row * row_stride;
}

// Shared-memory rows of D elements of T in 16-byte chunks. 2-byte types use the swizzled
// layout ldmatrix wants, rows padded to 64 bytes (HeadRows: d 80 and 112 take 192- and
// 256-byte rows; only the D / 8 real chunks are ever touched); f32 rows are padded by 16 bytes
// (conflict-free row-parallel reads). The host sizes shared memory by the same pitches.
template <typename T, int D> struct SmemRows {
    static constexpr int ELEMS = 16 / sizeof(T);  // elements per chunk
    static constexpr int CHUNKS = D / ELEMS;      // real chunks per row
    static constexpr int PITCH = sizeof(T) == 2 ? head_row_bytes<D>() : (D + 4) * 4;  // bytes per row
    static_assert(D % 16 == 0, "whole k16 slices and 16-byte chunks");
    __device__ static __forceinline__ uint32_t chunk(int row, int c) {
        if constexpr (sizeof(T) == 2) {
            return HeadRows<D>::offset(row, c);
        } else {
            return (uint32_t)(row * PITCH + c * 16);
        }
    }
    __device__ static __forceinline__ uint32_t elem(int row, int col) {
        return chunk(row, col / ELEMS) + (col % ELEMS) * sizeof(T);
    }
};

// Starts the copy of keys [j0, j0 + ROWS) of sequence b (those below `end`; the rest
// zero-filled) of one head (`base` already points at it) into shared rows, 16 bytes per
// cp.async, each row found through the layout's key map.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_keys(uint32_t smem, const T* base, const DecodeParams& p, int b, int ring,
                                          int j0, int end, int64_t outer_stride, int64_t row_stride) {
    using R = SmemRows<T, D>;
    for (int idx = threadIdx.x; idx < ROWS * R::CHUNKS; idx += THREADS) {
        const int r = idx / R::CHUNKS, c = idx % R::CHUNKS;
        const int64_t off = j0 + r < end ? key_row(p, b, ring, j0 + r, outer_stride, row_stride) : -1;
        const bool valid = off >= 0;
        cp_async_16(smem + R::chunk(r, c), valid ? base + off + c * R::ELEMS : base, valid);
    }
}

// Starts the copy of this block's query rows: row r is row rb * ROWS + r of the KV head's
// seq_q x group rows, i.e. token (row / group), query head hk * group + row % group.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_queries(uint32_t smem, const DecodeParams& p, int b, int hk, int rb) {
    using R = SmemRows<T, D>;
    const int group = p.heads_q / p.heads_kv, rows = p.seq_q * group;
    const T* q = static_cast<const T*>(p.q) + (int64_t)b * p.q_batch_stride;
    for (int idx = threadIdx.x; idx < ROWS * R::CHUNKS; idx += THREADS) {
        const int r = idx / R::CHUNKS, c = idx % R::CHUNKS;
        const int row = rb * ROWS + r;
        const bool valid = row < rows;
        const T* src = q;
        if (valid) {
            src = q + (int64_t)(row / group) * p.q_row_stride + (int64_t)(hk * group + row % group) * p.q_head_stride +
                  c * R::ELEMS;
        }
        cp_async_16(smem + R::chunk(r, c), src, valid);
    }
}

// RoPE frequencies theta^(-2c/D), once per block (the host passes log2 theta).
template <int D, int THREADS>
__device__ __forceinline__ void rope_frequencies(float* inv_freq, float log2_theta) {
    for (int c = threadIdx.x; c < D / 2; c += THREADS) inv_freq[c] = exp2f(-(2.f * c / D) * log2_theta);
}

// sin and cos of a RoPE angle: Cody-Waite reduction by 2 pi (pi in two f32 parts, exact for
// |angle| < 2^20 or so) and the SFU's __sincosf on [-pi, pi] (absolute error about 2^-21).
// sincosf's slow path for large arguments would put a local array on the stack.
__device__ __forceinline__ void rope_sincos(float angle, float* sn, float* cs) {
    const float k = rintf(angle * 0.15915494309189535f);  // angle / (2 pi)
    float r = fmaf(-k, 6.28318548202514648f, angle);        // 2 pi rounded to f32
    r = fmaf(-k, -1.7484556000744883e-7f, r);               // 2 pi - that
    __sincosf(r, sn, cs);
}

// Rotates `rows` shared rows in place, row r to position pos_of(r). The angle is an f32
// product (relative error about 2^-24 * position).
template <typename T, int D, int THREADS, typename Pos>
__device__ __forceinline__ void rotate_rows(unsigned char* tile, int rows, const float* inv_freq, int style,
                                            Pos pos_of) {
    using R = SmemRows<T, D>;
    for (int idx = threadIdx.x; idx < rows * (D / 2); idx += THREADS) {
        const int r = idx / (D / 2), c = idx % (D / 2);
        const int a = style == ATTNKIT_ROPE_NEOX ? c : 2 * c;
        const int bcol = style == ATTNKIT_ROPE_NEOX ? c + D / 2 : 2 * c + 1;
        float sn, cs;
        rope_sincos((float)pos_of(r) * inv_freq[c], &sn, &cs);
        T* pa = reinterpret_cast<T*>(tile + R::elem(r, a));
        T* pb = reinterpret_cast<T*>(tile + R::elem(r, bcol));
        const float xa = to_f32(*pa), xb = to_f32(*pb);
        *pa = from_f32<T>(xa * cs - xb * sn);
        *pb = from_f32<T>(xb * cs + xa * sn);
    }
}

// Where one output row of a block goes: the final o and lse with one split, else the split's
// slot in the workspace.
struct OutRow {
    bool valid;
    int head;         // query head of the row (for its sink logit)
    int64_t o_off;    // element offset in o (one split) or ws_o
    int64_t lse_off;  // offset in lse or ws_lse
};

__device__ __forceinline__ OutRow out_row(const DecodeParams& p, int b, int hk, int split, int row) {
    OutRow r;
    const int group = p.heads_q / p.heads_kv;
    r.valid = row < p.seq_q * group;
    const int i = row / group, h = hk * group + row % group;
    r.head = h;
    const int64_t lrow = ((int64_t)b * p.heads_q + h) * p.seq_q + i;
    if (p.num_splits == 1) {
        r.o_off = (int64_t)b * p.o_batch_stride + (int64_t)i * p.o_row_stride + (int64_t)h * p.o_head_stride;
        r.lse_off = lrow;
    } else {
        const int64_t slot = (int64_t)split * p.batch * p.heads_q * p.seq_q + lrow;
        r.o_off = slot * p.head_dim;
        r.lse_off = slot;
    }
    return r;
}

// Stores a row's value `x` (already normalised) at column c, and its LSE.
template <typename T>
__device__ __forceinline__ void store_out(const DecodeParams& p, const OutRow& r, int c, float x) {
    if (p.num_splits == 1) {
        static_cast<T*>(p.o)[r.o_off + c] = from_f32<T>(x);
    } else {
        p.ws_o[r.o_off + c] = x;
    }
}
__device__ __forceinline__ void store_lse(const DecodeParams& p, const OutRow& r, float lse) {
    (p.num_splits == 1 ? p.lse : p.ws_lse)[r.lse_off] = lse;
}

// Folds head h's learned sink logit (gpt-oss) into a finished row: the softmax gains a logit
// with no value vector, so LSE becomes logaddexp(LSE, sink) and the normalised O shrinks by
// exp(LSE - LSE'). Returns that factor (1 without sink logits). Called once per row, where the
// row is final: the single-split store or the combine.
__device__ __forceinline__ float fold_sink(const DecodeParams& p, int h, float& lse) {
    if (p.sink_logits == nullptr) return 1.f;
    const float s = p.sink_logits[h];
    if (s == INFINITY) {  // all weight on the sink
        lse = INFINITY;
        return 0.f;
    }
    if (lse == -INFINITY || s == -INFINITY) {  // nothing to share the weight with
        const float f = lse == -INFINITY ? 0.f : 1.f;
        lse = fmaxf(lse, s);
        return f;
    }
    const float mx = fmaxf(lse, s);
    const float folded = mx + logf(expf(lse - mx) + expf(s - mx));
    const float f = expf(lse - folded);
    lse = folded;
    return f;
}

// LSE (natural log) of a row from its exp2-domain max m and sum l; -inf for a row that saw
// no key.
__device__ __forceinline__ float row_lse(float m, float l) { return l > 0.f ? (m + log2f(l)) * LN2 : -INFINITY; }

}  // namespace decode
