/* Parameters of the FlashAttention forward family (kernels/flash.cu).
 *
 * O = softmax(scale * Q K^T + mask) V, and LSE = log(sum(exp(scale * Q K^T + mask))) per row.
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

/* Tile shapes, one source for host and device: query rows per block = 16 * WARPS (each warp
 * owns 16 rows, one m16n8k16 row tile), keys per tile = BLOCK_N.
 * Why: head dims up to 128 take FlashAttention-2's sm80 shape, 128 x 64 with 8 warps (K/V tiles
 * reused by 128 rows); 256 takes 64 x 16 with 4 warps, the largest key tile that sm_90a compiles
 * without spills (O alone is 128 floats a thread; 64 x 32 spilled 12 bytes).
 * Not yet tuned on a GPU. */
#define ATTNKIT_FLASH_WARPS_SMALL_D 8   /* head_dim <= 128 */
#define ATTNKIT_FLASH_BLOCK_N_SMALL_D 64
#define ATTNKIT_FLASH_WARPS_D256 4
#define ATTNKIT_FLASH_BLOCK_N_D256 16
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
    int32_t head_dim;  /* 32, 64, 96, 128 or 256 */
    int32_t causal;    /* 1: key j visible to row i iff j <= i + seq_k - seq_q (bottom-right) */
    float scale_log2;  /* softmax scale * log2(e): scores go through exp2 */
} FlashParams;

#endif
