//! CUDA launcher of the Monarch family: plans the tiling ([`super::tiles::plan`]) from the
//! device's shared-memory limit, checks placement and alignment, fills `MonarchParams` and
//! launches one fused kernel.

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUdevice_attribute as A;

use super::tiles::{self, Kernel};
use super::{Mode, Rows, Weights};
use crate::buffer::{Buf, BufMut};
use crate::cuda::{CudaDevice, DevPtrs, params as c};
use crate::dtype::{DType, Element};
use crate::error::{DriverContext, Error, Result};

/// `y = M x + bias` (or `M^T x + bias`) on the GPU; shapes, lengths and strides already
/// checked by the caller.
pub(super) fn product<T: Element>(
    dev: &CudaDevice,
    w: &Weights<'_, T>,
    x: &Buf<'_, T>,
    x_rows: Rows,
    y: &mut BufMut<'_, T>,
    y_rows: Rows,
    mode: Mode,
) -> Result<()> {
    let transpose = mode == Mode::Transpose;
    let shape = w.shape;
    let ([k, q, p], [l, s, r]) = (shape.w1_dims(), shape.w2_dims());
    let smem_limit = dev
        .stream
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .driver("shared memory limit")?
        .max(0) as usize;
    let even = x_rows.row_stride % 2 == 0;
    let plan = tiles::plan(shape, T::DTYPE, even, smem_limit, transpose).ok_or_else(|| {
        let (arg, per_block) = if transpose { ("w1", q) } else { ("w2", r) };
        Error::Unsupported {
            arg,
            detail: format!(
                "one block's intermediate ({per_block} values per token) does not fit in the \
                 GPU's {smem_limit} bytes of shared memory per block"
            ),
        }
    })?;
    let blocks = if transpose { k } else { l };
    let ctas = x_rows
        .tokens
        .div_ceil(plan.block_tokens)
        .checked_mul(blocks / plan.group)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or_else(|| Error::Shape {
            arg: "x",
            detail: format!("{} tokens need more than 2^31 CTAs", x_rows.tokens),
        })?;
    let (name, threads, align) = match plan.kernel {
        // The mma kernel reads x, w1 and w2 as 32-bit pairs.
        Kernel::Mma { mt: 1 } => ("monarch_forward_mma1", c::ATTNKIT_MONARCH_MMA_THREADS, 4),
        Kernel::Mma { mt: 2 } => ("monarch_forward_mma2", c::ATTNKIT_MONARCH_MMA_THREADS, 4),
        Kernel::Mma { .. } => ("monarch_forward_mma4", c::ATTNKIT_MONARCH_MMA_THREADS, 4),
        Kernel::Simt => (
            "monarch_product_simt",
            c::ATTNKIT_MONARCH_SIMT_THREADS,
            std::mem::align_of::<T>(),
        ),
    };
    let elem = std::mem::align_of::<T>();
    let xv = dev.view("x", x)?;
    let w1v = dev.view("w1", &w.w1)?;
    let w2v = dev.view("w2", &w.w2)?;
    let bv = match &w.bias {
        Some(b) => Some(dev.view("bias", b)?),
        None => None,
    };
    let yv = dev.view_mut("y", y)?;
    let mut ptrs = DevPtrs::default();
    let bias = match bv {
        Some(b) => ptrs.read("bias", b, &dev.stream, elem)? as *const _,
        None => std::ptr::null(),
    };
    let params = c::MonarchParams {
        x: ptrs.read("x", xv, &dev.stream, align)? as *const _,
        w1: ptrs.read("w1", w1v, &dev.stream, align)? as *const _,
        w2: ptrs.read("w2", w2v, &dev.stream, align)? as *const _,
        bias,
        y: ptrs.write("y", yv, &dev.stream, elem)? as *mut _,
        tokens: x_rows.tokens as i64,
        x_row_stride: x_rows.row_stride as i64,
        y_row_stride: y_rows.row_stride as i64,
        // Every size below is at most i32::MAX (MonarchShape's invariant, widths <= n_in/n_out).
        x_cols: x_rows.width as i32,
        y_cols: y_rows.width as i32,
        k: k as i32,
        q: q as i32,
        p: p as i32,
        l: l as i32,
        s: s as i32,
        r: r as i32,
        dtype: (match T::DTYPE {
            DType::F32 => c::ATTNKIT_DTYPE_F32,
            DType::F16 => c::ATTNKIT_DTYPE_F16,
            DType::Bf16 => c::ATTNKIT_DTYPE_BF16,
        }) as i32,
        group: plan.group as i32,
        block_tokens: plan.block_tokens as i32,
        h_stride: plan.h_stride as i32,
        transpose: transpose as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: plan.smem_bytes as u32,
    };
    // SAFETY: x holds (tokens-1)*x_row_stride + x_cols elements, y (tokens-1)*y_row_stride +
    // y_cols, w1/w2 their full shapes and bias y_cols (checked by the caller); the kernel reads
    // and writes no more, its shared memory is what the plan sized, and every pointer comes
    // from a guard alive until after the launch.
    unsafe { dev.launch("monarch", name, cfg, &params) }?;
    drop(ptrs);
    Ok(())
}
