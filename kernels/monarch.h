/* Parameters of the Monarch kernel family (kernels/monarch.cu): y = M x + bias with
 * M = P L P^T R in fly's rectangular form, w1: [k, q, p], w2: [l, s, r], l*r == k*q:
 *   h[i*q + c] = sum_pp w1[i][c][pp] * x[i*p + pp]
 *   y[t*l + j] = sum_rr w2[j][t][rr] * h[rr*l + j]
 * One CTA computes a tile of block_tokens tokens for a group of `group` consecutive output
 * blocks j in [j0, j0 + group): it builds the part of h those blocks read (the columns
 * m = rr*l + j) on chip, then their outputs. CTA b: token tile b / (l / group), group
 * b % (l / group). The transpose (simt kernel) mirrors it: groups of w1 blocks i, the
 * intermediate g[m] = sum_t w2[j][t][rr] x[t*l + j] for m in [i0*q, (i0 + group)*q). Plain C, mirrored into Rust by bindgen (see selftest.h for the rules). */
#ifndef ATTNKIT_MONARCH_H
#define ATTNKIT_MONARCH_H

#include <stdint.h>

#include "selftest.h" /* ATTNKIT_DTYPE_* */

typedef struct MonarchParams {
    const void* x;        /* [tokens, x_cols], row stride x_row_stride (elements); columns
                             x_cols..k*p are read as zero (the layer's padding) */
    const void* w1;       /* [k, q, p], contiguous */
    const void* w2;       /* [l, s, r], contiguous */
    const void* bias;     /* [y_cols], or NULL for none */
    void* y;              /* [tokens, y_cols], row stride y_row_stride (elements); output
                             columns y_cols..l*s are computed and dropped */
    int64_t tokens;       /* rows of x and y */
    int64_t x_row_stride; /* elements between rows of x (>= x_cols; a multiple of 8 on the mma path) */
    int64_t y_row_stride; /* elements between rows of y (>= y_cols) */
    int32_t x_cols;       /* columns of x present (<= k*p) */
    int32_t y_cols;       /* columns of y written (<= l*s) */
    int32_t k;            /* blocks of w1 */
    int32_t q;            /* rows per w1 block (outputs of stage 1 per block) */
    int32_t p;            /* columns per w1 block (inputs per block) */
    int32_t l;            /* blocks of w2 */
    int32_t s;            /* rows per w2 block (outputs per block) */
    int32_t r;            /* columns per w2 block (intermediate values per block) */
    int32_t dtype;        /* ATTNKIT_DTYPE_* of x, w1, w2, bias and y */
    int32_t group;        /* output blocks per CTA; divides l */
    int32_t block_tokens; /* tokens per CTA: 16 * MT on the mma path, <= 8 on the simt path */
    int32_t h_stride;     /* elements between the on-chip intermediate's token rows
                             (>= group * r; T on the mma path, f32 on the simt path) */
    int32_t transpose;    /* 0: y = M x + bias; 1: y = M^T x + bias (simt kernel only): x is
                             [tokens, l*s], y [tokens, k*p], the groups run over w1's k blocks
                             (group divides k) and the intermediate is group * q wide */
    /* Backward only (monarch_backward_mid, monarch_backward_weights and their _mma forms); x,
     * w1, w2, tokens, x_row_stride, x_cols = k*p and the dimensions as above; bias unused, y
     * unused but by monarch_backward_weights_mma (dx, below). */
    const void* dy;        /* [tokens, l*s], row stride dy_row_stride (elements) */
    void* dw1;             /* f32 [k, q, p] */
    void* dw2;             /* f32 [l, s, r] */
    void* dbias;           /* f32 [l*s], or NULL */
    void* workspace;       /* f32 [2][tokens][k*q]: h, then dh */
    int64_t dy_row_stride; /* elements between rows of dy (>= l*s) */
} MonarchParams;

/* Most tokens per CTA of the simt kernel (its per-thread accumulators). */
#define ATTNKIT_MONARCH_SIMT_TOKENS 8
/* Shared memory of one warp's operand staging in monarch_forward_mma{MT}, after h: two
 * buffers of A (16*MT rows) and two of B (16 rows), 32 two-byte elements a row. The host sizes
 * the launch as 16*MT*h_stride*2 + warps * this. */
#define ATTNKIT_MONARCH_STAGE_BYTES(mt) (2 * (16 * (mt) + 16) * 64)
/* Threads per CTA of the two kernels. */
#define ATTNKIT_MONARCH_MMA_THREADS 256
#define ATTNKIT_MONARCH_SIMT_THREADS 256
/* The tensor-core backward kernels (bf16/f16): CTAs of this many threads, each computing one
 * TILE x TILE tile of one product, tiles(a, b) = ceil(a / TILE) * ceil(b / TILE) of them for
 * an [a x b] product. monarch_backward_mid_mma: k * tiles(tokens, q) CTAs for h (block i's
 * [tokens x q]), then l * tiles(tokens, r) for dh. monarch_backward_weights_mma:
 * ceil(l*s / THREADS) for dbias when present, then l * tiles(s, r) for dw2, k * tiles(q, p)
 * for dw1 and k * tiles(tokens, p) for dx (into y: y_row_stride its row stride,
 * y_cols = k*p). */
#define ATTNKIT_MONARCH_GRAD_THREADS 128
#define ATTNKIT_MONARCH_GRAD_TILE 64
/* Its dynamic shared memory: two buffers of two 32-token x TILE operand tiles, 2-byte elements. */
#define ATTNKIT_MONARCH_GRAD_SMEM (2 * 2 * 32 * ATTNKIT_MONARCH_GRAD_TILE * 2)

#endif
