/* Parameters of the self-test kernel family (kernels/selftest.cu).
 *
 * This header is plain C: nvcc compiles it into the kernels and bindgen turns it into the Rust
 * mirror (src/cuda.rs includes the generated file), so host and device share one layout.
 * Conventions for every family header: strides and sizes are int64_t element counts, device
 * pointers are `void*` (the element type is a separate field), no bool (not every bit pattern
 * of a byte is a valid bool, and the layout test fills every byte). */
#ifndef ATTNKIT_SELFTEST_H
#define ATTNKIT_SELFTEST_H

#include <stdint.h>

/* Element type codes, shared by every family. */
#define ATTNKIT_DTYPE_F32 0
#define ATTNKIT_DTYPE_F16 1
#define ATTNKIT_DTYPE_BF16 2

/* y[i] = alpha * x[i * x_stride] + beta, for i in [0, n). The fields of mixed widths
 * (int8, uint16, double) are there on purpose: they exercise the layout rules bindgen and nvcc
 * must agree on. */
typedef struct SelftestParams {
    const void* x;    /* input: n elements, x_stride apart (elements) */
    void* y;          /* output: n contiguous elements */
    int64_t n;        /* number of elements */
    int64_t x_stride; /* stride of x (elements), >= 1 */
    float alpha;      /* scale */
    int32_t dtype;    /* ATTNKIT_DTYPE_* of x and y */
    double beta;      /* offset, rounded to f32 on the device */
    uint16_t tag;     /* unused by the kernel: layout test only */
    int8_t small;     /* unused by the kernel: layout test only */
} SelftestParams;

#endif
