/* Parameters of the FlashAttention forward family (kernels/flash.cu).
 *
 * O = softmax(scale * Q K^T + mask) V, and LSE = log(sum(exp(scale * Q K^T + mask))) per row;
 * or, with ATTNKIT_FLASH_SCORE_RELU2, O = (relu(scale * Q K^T)^2 / n) V (GAU / FLASH).
 * Plain C, mirrored into Rust by bindgen (see kernels/selftest.h for the conventions).
 *
 * Fixed-length batches: row r of batch b, head h of q is at
 *   q + b * q_batch_stride + r * q_row_stride + h * q_head_stride   (elements)
 * Variable-length batches (cu_seqlens_q != NULL): sequences are packed along the row axis;
 * sequence b holds rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) and the batch strides are unused.
 * The last dimension (head_dim) is always contiguous. */
#ifndef ATTNKIT_FLASH_H
#define ATTNKIT_FLASH_H

#include <stdint.h>

/* Tile shapes, one source for host and device: query rows per block = 16 * ROW_TILES * WARPS
 * (each warp owns ROW_TILES m16 row tiles, and every K/V fragment it loads from shared memory
 * serves all of them), keys per tile = BLOCK_N; K and V are double-buffered (one barrier per
 * key tile). Shared rows of 2-byte elements are padded up to 64 bytes (HeadRows in
 * common.cuh: head dims 80 and 112). Why:
 * - d <= 128: FlashAttention-2's sm80 shape, 128 query rows with 4 warps of 32 rows (each K/V
 *   byte read from shared memory feeds twice the FLOPs of 16-row warps); 64 keys a tile up to
 *   d = 64, 32 above (O is D floats a thread and S BLOCK_N: 64 keys at d = 128 would pass 255
 *   registers; at 32, d = 128 takes 252 on sm_80 and 249 on sm_90a without spills, so no
 *   headroom is left there).
 * - d = 192, 256: O alone is 96 / 128 floats a thread with 16 rows a warp, so one row tile per
 *   warp (32 rows would not fit in registers); 8 warps x 32 keys (192), 4 warps x 32 keys (256).
 * Not yet tuned on a GPU. */
#define ATTNKIT_FLASH_WARPS_SMALL_D 4      /* head_dim <= 128 */
#define ATTNKIT_FLASH_ROW_TILES_SMALL_D 2
#define ATTNKIT_FLASH_BLOCK_N_SMALL_D 64   /* head_dim <= 64 */
#define ATTNKIT_FLASH_BLOCK_N_MID_D 32     /* 64 < head_dim <= 128 */
#define ATTNKIT_FLASH_WARPS_D256 4
#define ATTNKIT_FLASH_BLOCK_N_D256 32
#define ATTNKIT_FLASH_WARPS_D192 8
#define ATTNKIT_FLASH_BLOCK_N_D192 32
/* The f32 path (CUDA cores, exact): 16 query rows, 32 keys a tile, 128 threads. */
#define ATTNKIT_FLASH_F32_BLOCK_M 16
#define ATTNKIT_FLASH_F32_BLOCK_N 32
#define ATTNKIT_FLASH_F32_THREADS 128

typedef struct FlashParams {
    const void* q;              /* [batch, seq_q, heads_q, head_dim] (or packed [total_q, ...]) */
    const void* k;              /* [batch, seq_k, heads_kv, head_dim] */
    const void* v;              /* [batch, seq_k, heads_kv, head_dim] */
    void* o;                    /* [batch, seq_q, heads_q, head_dim], dtype of q */
    float* lse;                 /* f32: [batch, heads_q, seq_q], or [heads_q, total_q] if varlen */
    const int32_t* cu_seqlens_q; /* [batch + 1] row offsets of packed sequences, or NULL */
    const int32_t* cu_seqlens_k; /* [batch + 1], NULL exactly when cu_seqlens_q is */
    int64_t q_batch_stride, q_row_stride, q_head_stride; /* elements */
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t lse_batch_stride, lse_head_stride; /* lse[b * batch + h * head + row] */
    int32_t batch;     /* sequences */
    int32_t seq_q;     /* rows per sequence (fixed); the longest sequence (varlen) */
    int32_t seq_k;     /* keys per sequence (fixed); unused when varlen */
    int32_t total_q;   /* varlen: rows in the packed q (cu_seqlens_q[batch]); bounds check */
    int32_t total_k;   /* varlen: rows in the packed k/v; bounds check */
    int32_t heads_q;   /* query heads */
    int32_t heads_kv;  /* key/value heads; heads_q % heads_kv == 0 (GQA/MQA) */
    int32_t head_dim;  /* 32, 64, 80, 96, 112, 128, 192 or 256 */
    /* Visibility of key j to row i, with diag = seq_k - seq_q (bottom-right alignment):
     *   j <= i + diag + window_right                       (causal: window_right = 0)
     *   and (j >= i + diag - window_left or j < n_sink)    (StreamingLLM sinks)
     *   and block_mask[(i / block_q) * mask_cols + j / block_k] != 0 (if block_mask) */
    int32_t window_left;   /* -1: unbounded */
    int32_t window_right;  /* -1: unbounded */
    int32_t n_sink;        /* keys [0, n_sink) are exempt from the left window bound */
    int32_t block_q;       /* query rows per block-mask row */
    int32_t block_k;       /* keys per block-mask column */
    int32_t mask_cols;     /* block-mask columns: ceil(longest seq_k / block_k) */
    const uint8_t* block_mask; /* [mask rows, mask_cols] row-major, nonzero = attend; or NULL */
    const float* sink_logits;  /* [heads_q] learned per-head sink logit (natural units), or NULL */
    const float* alibi_slopes; /* [heads_q] ALiBi: logit -= slope * |i + diag - j|, or NULL */
    float* entropy;        /* like lse: per-row entropy of the attention distribution, or NULL */
    int32_t score;         /* ATTNKIT_FLASH_SCORE_SOFTMAX or ATTNKIT_FLASH_SCORE_RELU2 */
    int32_t entropy_scale; /* 1: a row's scale is log_512(its visible keys) * scale */
    int32_t relu2_by_visible; /* relu2: divide by the row's visible keys (1) or by seq_k (0) */
    float scale;           /* the softmax (or relu2) scale */
    float scale_log2;      /* scale * log2(e): softmax scores go through exp2 */
    float softcap;         /* 0: none; else logit = softcap * tanh(scale q.k / softcap) (before
                              ALiBi; the sink logit is not capped) */
} FlashParams;

/* The backward, deterministic (no atomics: every gradient element has one writer, summing in
 * a fixed order). flash_bwd_delta: D = rowsum(dO * O), one thread per row. flash_bwd_dkdv: a
 * block per (key tile, KV head, sequence) sweeps every query row of the group's heads that can
 * see the tile. flash_bwd_dq: a block per (query tile, query head, sequence) sweeps its visible
 * keys. flash_bwd_dsink: a block per query head sums its rows' sink terms in one order.
 * f32 (and f16 relu^2): CUDA cores, f32 arithmetic, 8 threads per key (dk/dv) or row (dq),
 * tiles of BWD_BLOCK_N keys and BWD_BLOCK_M rows. */
#define ATTNKIT_FLASH_BWD_BLOCK_M 16
#define ATTNKIT_FLASH_BWD_BLOCK_N 16
#define ATTNKIT_FLASH_BWD_ROWS 8       /* query rows staged in shared memory per step (dk/dv) */
#define ATTNKIT_FLASH_BWD_THREADS 128  /* 8 threads per row (dq) or key (dk/dv) */
/* f16/bf16 on tensor cores (mma m16n8k16, f32 accumulators; P and dS rounded to the dtype as
 * FlashAttention does), 4 warps, both sweeps double-buffered with cp.async:
 * - dK/dV: 16 keys a warp, holding dK and dV in registers (D floats a thread): up to
 *   d = 128, 64 keys a block; at 192 and 256 (D floats would not fit) two warps share 16
 *   keys, each the dK and dV of half the head dim (both compute the same S^T and dP^T: 1.5x
 *   the products), 32 keys a block. Query rows BWD_TC_ROWS at a time: 64 up to d = 64, 32 up
 *   to 128, 16 above (S^T and dP^T are ROWS floats a thread on top of dK, dV; 64 rows at
 *   d = 128 would pass 255 registers).
 * - dQ: 64 rows a block, 16 per warp (the forward's fragment layout), every head dim; key
 *   tiles of 64 up to d = 64, 32 up to 128, 16 at 192 and 256 (64 at d = 112, 128 and 32 at
 *   192 spilled: dQ, S and dP are D / 2 + BN floats a thread, and the unrolled ldmatrix
 *   addresses take much of the rest).
 * Not yet tuned on a GPU. */
#define ATTNKIT_FLASH_BWD_TC_WARPS 4
#define ATTNKIT_FLASH_BWD_TC_UNSPLIT_MAX_D 128 /* above: two warps per 16 keys */
#define ATTNKIT_FLASH_BWD_TC_ROWS_SMALL_D 64   /* d <= 64 */
#define ATTNKIT_FLASH_BWD_TC_ROWS 32           /* 64 < d <= 128 */
#define ATTNKIT_FLASH_BWD_TC_ROWS_LARGE_D 16   /* 192, 256 */
#define ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_SMALL_D 64 /* d <= 64 */
#define ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N 32         /* 64 < d <= 128 */
#define ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_LARGE_D 16 /* 192, 256 */
/* Shared bytes per query row's constants in a dK/dV stage (scale, LSE, D, ...). */
#define ATTNKIT_FLASH_BWD_TC_ROW_CONST_BYTES 32

typedef struct FlashBwdParams {
    FlashParams fwd;        /* the forward's problem; its o and lse are read here */
    const void* d_o;        /* dL/do, in o's strides */
    void* dq;               /* written in the dq_* strides (elements; batch unused if varlen) */
    void* dk;               /* written in the dk_* strides */
    void* dv;               /* written in the dv_* strides */
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
    float* delta;           /* the lse's layout: D = rowsum(dO * O) (written, then read) */
    float* sink_terms;      /* the lse's layout: each row's -p_sink D, or NULL */
    float* d_sink_logits;   /* [heads_q]: the sum of each head's sink terms, or NULL */
} FlashBwdParams;

#define ATTNKIT_FLASH_SCORE_SOFTMAX 0
#define ATTNKIT_FLASH_SCORE_RELU2 1

#endif
