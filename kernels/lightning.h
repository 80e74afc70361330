/* Parameters of the Lightning Attention-2 family (kernels/lightning.cu): block-split causal
 * linear attention with per-head decay, `o_t = scale * q_t * sum_{j<=t} lambda^(t-j) k_j^T v_j`.
 *
 * One struct serves the four forward kernels (split states, scan, outputs, decode) and the three
 * backward ones (lightning_bwd_*), which run the same block split as "sweeps" over permuted
 * operands: q, k, v, o then hold the sweep's row operand a, key operand b, value operand c and
 * output (see `sweep` and lightning.cu), d the head dim of a and b, e that of c and out. Tokens are rows of
 * a [tokens, heads, dim] tensor; sequence i is tokens [i * seq_len, (i + 1) * seq_len) (dense)
 * or [cu_seqlens[i], cu_seqlens[i + 1]) (varlen). States are f32 [n_seqs, heads, d, e],
 * contiguous. Plain C: see selftest.h for the conventions. */
#ifndef ATTNKIT_LIGHTNING_H
#define ATTNKIT_LIGHTNING_H

#include <stdint.h>

#include "selftest.h" /* ATTNKIT_DTYPE_* */

/* Most heads a call may have: the per-head decay travels in this struct. */
#define ATTNKIT_LIGHTNING_MAX_HEADS 256
/* Tokens per block (the paper's B) and state columns per thread block. */
#define ATTNKIT_LIGHTNING_BLOCK 64
#define ATTNKIT_LIGHTNING_E_TILE 64
/* Threads per thread block of the split-state and output kernels (four warps). */
#define ATTNKIT_LIGHTNING_THREADS 128
/* Threads per thread block of the scan kernel (one state element each). */
#define ATTNKIT_LIGHTNING_SCAN_THREADS 256
/* Backward sweeps (the `sweep` field; 0 in the forward kernels):
 * DQ:  a = dO, b = v, c = k, out = dq, in token order, entered by scale * lambda * S_init^T;
 * DKV: a = k, b = q, c = dO, out = dv, last token first, entered by dS_final; its scan leaves
 *      d(initial state) in final_state and the split states dK reads;
 * DK:  a = v, b = dO, c = q, out = dk, last token first, reading DKV's split states transposed. */
#define ATTNKIT_LIGHTNING_SWEEP_DQ 1
#define ATTNKIT_LIGHTNING_SWEEP_DKV 2
#define ATTNKIT_LIGHTNING_SWEEP_DK 3

typedef struct LightningParams {
    const void* q;             /* [tokens, heads, d] dtype; row (t, h) at t*q_tok + h*q_head, 16-byte aligned */
    const void* k;             /* [tokens, heads, d] dtype; row (t, h) at t*k_tok + h*k_head, 16-byte aligned */
    const void* v;             /* [tokens, heads, e] dtype; row (t, h) at t*v_tok + h*v_head, 16-byte aligned */
    void* o;                   /* [tokens, heads, e] dtype, written; row (t, h) at t*o_tok + h*o_head */
    const void* initial_state; /* f32 [n_seqs, heads, d, e] or NULL (zero); decode: unused;
                                  bwd DQ: the forward's S_init, [n_seqs, heads, e, d] here; DKV: dS_final */
    void* final_state;         /* f32 [n_seqs, heads, d, e] or NULL; decode: the state, updated in place;
                                  bwd DKV: d(initial state), written */
    void* workspace;           /* f32 [n_seqs, heads, n_splits, d, e]: split states (overwritten) */
    const void* cu_seqlens;    /* int32 [n_seqs + 1] or NULL (dense) */
    int64_t q_tok;             /* elements between tokens of q */
    int64_t q_head;            /* elements between heads of q */
    int64_t k_tok;             /* elements between tokens of k */
    int64_t k_head;            /* elements between heads of k */
    int64_t v_tok;             /* elements between tokens of v */
    int64_t v_head;            /* elements between heads of v */
    int64_t o_tok;             /* elements between tokens of o */
    int64_t o_head;            /* elements between heads of o */
    int64_t n_seqs;            /* sequences (decode: batch) */
    int64_t seq_len;           /* tokens per sequence when cu_seqlens is NULL */
    int64_t total_tokens;      /* rows of q, k, v, o (bounds for untrusted cu_seqlens) */
    int64_t split_len;         /* tokens per split, a multiple of ATTNKIT_LIGHTNING_BLOCK */
    int64_t n_splits;          /* split slots per (sequence, head) in the workspace */
    int32_t heads;             /* heads, <= ATTNKIT_LIGHTNING_MAX_HEADS */
    int32_t d;                 /* head dim of q, k: 64 or 128 */
    int32_t e;                 /* head dim of v, o: 64 or 128 */
    int32_t dtype;             /* ATTNKIT_DTYPE_* of q, k, v, o */
    int32_t causal;            /* 1: causal with decay; 0: o = scale * Q (K^T V), no decay */
    int32_t smem_bytes;        /* dynamic shared memory the host gave the launch (checked) */
    float scale;               /* multiplies every output */
    int32_t sweep;             /* ATTNKIT_LIGHTNING_SWEEP_* in lightning_bwd_*; 0 in the forward */
    float log2_decay[ATTNKIT_LIGHTNING_MAX_HEADS]; /* per head log2(lambda_h) <= 0, host-computed */
} LightningParams;

#endif
