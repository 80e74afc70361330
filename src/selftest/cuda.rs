//! CUDA launcher of the self-test family.

use cudarc::driver::LaunchConfig;

use crate::buffer::{Buf, BufMut};
use crate::cuda::{CudaDevice, DevPtrs, params::SelftestParams};
use crate::dtype::{DType, Element};
use crate::error::Result;

pub(super) fn scale<T: Element>(
    dev: &CudaDevice,
    x: &Buf<'_, T>,
    x_stride: usize,
    alpha: f32,
    beta: f64,
    y: &mut BufMut<'_, T>,
) -> Result<()> {
    let n = y.len();
    let xv = dev.view("x", x)?;
    let yv = dev.view_mut("y", y)?;
    let mut ptrs = DevPtrs::default();
    let align = std::mem::align_of::<T>();
    let p = SelftestParams {
        x: ptrs.read("x", xv, &dev.stream, align)? as *const _,
        y: ptrs.write("y", yv, &dev.stream, align)? as *mut _,
        n: n as i64,
        x_stride: x_stride as i64,
        alpha,
        dtype: dtype_code(T::DTYPE),
        beta,
        tag: 0,
        small: 0,
    };
    // Enough blocks to fill the GPU a few times; the kernel's grid-stride loop covers any n.
    let blocks = (n.div_ceil(256) as u32).min(dev.sm_count * 8).max(1);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds (n-1)*x_stride+1 elements and y holds n (checked by the caller); both
    // pointers come from guards alive until after the launch.
    unsafe { dev.launch("selftest", "selftest_scale", cfg, &p) }?;
    drop(ptrs);
    Ok(())
}

/// The `ATTNKIT_DTYPE_*` code of a dtype.
pub(crate) fn dtype_code(d: DType) -> i32 {
    use crate::cuda::params as c;
    (match d {
        DType::F32 => c::ATTNKIT_DTYPE_F32,
        DType::F16 => c::ATTNKIT_DTYPE_F16,
        DType::Bf16 => c::ATTNKIT_DTYPE_BF16,
    }) as i32
}
