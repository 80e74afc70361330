/* Parameters of the decode family (kernels/decode.cu): seq_q new tokens per sequence against a
 * KV cache, split-KV with an LSE combine, and the in-place append of the new tokens' K/V.
 *
 * Every cache layout is read through one map from a logical key j of sequence b (0 = oldest
 * kept) to a row: contiguous: (b, j); paged: (block_table[b * pages_per_seq + j / page_size],
 * j % page_size); rolling: (b, j < n_sink ? j : n_sink + (j - n_sink + ring_offsets[b]) % window).
 * Row r of "page" P, head h of k is at k + P * k_batch_stride + r * k_row_stride +
 * h * k_head_stride (elements); the last dimension is contiguous.
 * Plain C, mirrored into Rust by bindgen (see kernels/selftest.h for the conventions). */
#ifndef ATTNKIT_DECODE_H
#define ATTNKIT_DECODE_H

#include <stdint.h>

/* Tile shapes, one source for host and device.
 * Tensor-core path (f16, bf16): 4 warps; a block owns ROWS = 16 query rows (one m16 tile: the
 * seq_q x group rows of one KV head, more rows take more blocks) and streams BLOCK_N = 64 keys
 * a tile, double-buffered; each warp takes 16 of the tile's keys (so all four tensor-core
 * pipes work on a decode step's few rows) and the warps' partial softmax states are merged
 * once at the end. Why: decode is memory-bound; 4 warps x 64 keys keeps 2 tiles (32 KiB at
 * d = 128) in flight per block and 3 blocks fit an SM. Not yet tuned on a GPU.
 * f32 path (CUDA cores, exact): the same 16 rows, 32 keys a tile, 128 threads. */
#define ATTNKIT_DECODE_ROWS 16
#define ATTNKIT_DECODE_WARPS 4
#define ATTNKIT_DECODE_BLOCK_N 64
#define ATTNKIT_DECODE_F32_BLOCK_N 32
/* The combine kernel: one warp per output row, 4 rows per block. */
#define ATTNKIT_DECODE_COMBINE_WARPS 4
/* The append kernel: threads per block (16 bytes each). */
#define ATTNKIT_DECODE_APPEND_THREADS 256

/* rope_style */
#define ATTNKIT_ROPE_NONE 0
#define ATTNKIT_ROPE_NEOX 1        /* element c pairs with c + head_dim / 2 */
#define ATTNKIT_ROPE_INTERLEAVED 2 /* element 2c pairs with 2c + 1 */

typedef struct DecodeParams {
    const void* q;        /* [batch, seq_q, heads_q, head_dim] */
    void* k;              /* cache, see above; read by attention, written by append */
    void* v;              /* cache, like k */
    const void* k_new;    /* append: contiguous [batch, seq_q, heads_kv, head_dim] */
    const void* v_new;    /* append: like k_new */
    void* o;              /* [batch, seq_q, heads_q, head_dim], dtype of q */
    float* lse;           /* f32 [batch, heads_q, seq_q], contiguous */
    float* ws_o;          /* f32 [num_splits, batch, heads_q, seq_q, head_dim] partial outputs
                             (normalised), used when num_splits > 1 */
    float* ws_lse;        /* f32 [num_splits, batch, heads_q, seq_q] partial LSEs */
    const int32_t* cache_seqlens; /* [batch]: keys per sequence, the new tokens' included */
    const int32_t* block_table;   /* [batch, pages_per_seq] (paged), else NULL */
    const int32_t* ring_offsets;  /* [batch] (rolling), else NULL */
    const float* sink_logits;     /* [heads_q] learned per-head sink logits (natural units), or NULL */
    const float* alibi_slopes;    /* [heads_q] ALiBi slopes (natural units), or NULL: query i of
                                     sequence b at position cache_seqlens[b] - seq_q + i, key j,
                                     head h: logit -= alibi_slopes[h] * |position - j| */
    int64_t q_batch_stride, q_row_stride, q_head_stride; /* elements */
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride; /* batch: per sequence, or per page */
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int32_t batch;          /* sequences */
    int32_t seq_q;          /* new tokens per sequence, 1..16 */
    int32_t heads_q;        /* query heads */
    int32_t heads_kv;       /* key/value heads; heads_q % heads_kv == 0 */
    int32_t head_dim;       /* 64, 80, 112, 128, 192 or 256 */
    int32_t causal;         /* 1: query i sees keys j <= i + cache_seqlens[b] - seq_q */
    int32_t window_left;    /* -1: unbounded; else query i sees keys j >= i + cache_seqlens[b] - seq_q - window_left */
    int32_t num_splits;     /* key splits per sequence, 1..64 */
    int32_t keys_per_split; /* split s covers keys [s * keys_per_split, (s+1) * keys_per_split),
                               a multiple of BLOCK_N; a cache_seqlens[b] past num_splits *
                               keys_per_split (device-only tables gone stale) reads as empty */
    int32_t row_blocks;     /* blocks per (split, KV head): ceil(seq_q * group / ROWS) */
    int32_t capacity;       /* keys a sequence may hold (device re-check of cache_seqlens) */
    int32_t page_size;      /* paged: tokens per page (a multiple of 8); else 0 */
    int32_t pages_per_seq;  /* paged: columns of block_table */
    int32_t num_pages;      /* paged: pages in k and v (device re-check of block_table) */
    int32_t n_sink;         /* rolling: sink slots */
    int32_t window;         /* rolling: ring slots; 0 when not rolling */
    int32_t rope_style;     /* ATTNKIT_ROPE_*: applied to q and k with logical positions */
    float rope_log2_theta;  /* log2 of the RoPE base */
    float scale_log2;       /* softmax scale * log2(e): scores go through exp2 */
    float softcap;          /* 0: none; else c > 0 (natural units): logit = c * tanh(scale * q.k / c),
                               before the ALiBi term (Gemma 2) */
} DecodeParams;

#endif
