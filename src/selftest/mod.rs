//! The self-test family: the smallest kernel through the whole pipeline, and the check that
//! the host and device agree on every parameter struct's layout.
//!
//! [`scale`] computes `y[i] = alpha * x[i * x_stride] + beta` on either backend; the tour and
//! the tests use it to prove that kernels build, load and launch on the GPU found.
//! [`check_params_layout`] sends each family's params struct, every field a distinct value,
//! through an echo kernel and compares the bytes that come back.

#[cfg(attnkit_cuda)]
mod cuda;

use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// `y[i] = alpha * x[i * x_stride] + beta` for every `i < y.len()`, rounded to `T`.
///
/// `x` must hold at least `(y.len() - 1) * x_stride + 1` elements. Both buffers must live where
/// `dev` runs.
///
/// ```
/// use attnkit::{selftest, Device};
/// let x = vec![1.0f32, 9.0, 2.0, 9.0, 3.0];
/// let mut y = vec![0.0f32; 3];
/// selftest::scale(&Device::cpu(), (&x).into(), 2, 2.0, 0.5, (&mut y).into()).unwrap();
/// assert_eq!(y, [2.5, 4.5, 6.5]);
/// ```
pub fn scale<T: Element>(
    dev: &Device,
    x: Buf<'_, T>,
    x_stride: usize,
    alpha: f32,
    beta: f64,
    mut y: BufMut<'_, T>,
) -> Result<()> {
    let n = y.len();
    if x_stride == 0 {
        return Err(Error::Stride {
            arg: "x_stride",
            detail: "must be at least 1".into(),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let need = (n - 1)
        .checked_mul(x_stride)
        .and_then(|v| v.checked_add(1))
        .ok_or_else(|| Error::Stride {
            arg: "x_stride",
            detail: format!("{x_stride} overflows"),
        })?;
    if x.len() < need {
        return Err(Error::Shape {
            arg: "x",
            detail: format!(
                "holds {} elements, {n} outputs at stride {x_stride} need {need}",
                x.len()
            ),
        });
    }
    if i64::try_from(need).is_err() {
        return Err(Error::Shape {
            arg: "x",
            detail: format!("{need} elements exceed i64"),
        });
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            let x = x.host("x")?;
            let y = crate::cpu::DisjointSlice::new(y.host_mut("y")?);
            let beta = beta as f32;
            const CHUNK: usize = 1 << 16;
            crate::cpu::par_for(*threads, n.div_ceil(CHUNK), |c| {
                let start = c * CHUNK;
                // SAFETY: chunk c owns elements [c*CHUNK, (c+1)*CHUNK) alone.
                let out = unsafe { y.range_mut(start, CHUNK.min(n - start)) };
                for (j, o) in out.iter_mut().enumerate() {
                    *o = T::from_f32(alpha * x[(start + j) * x_stride].to_f32() + beta);
                }
            });
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::scale(c, &x, x_stride, alpha, beta, &mut y),
    }
}

/// One family's parameter-layout check: the struct went to the device and came back intact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutCheck {
    /// The kernel family (`kernels/<family>.h`).
    pub family: &'static str,
    /// Size of its params struct in bytes.
    pub size: usize,
    /// Every byte came back as sent.
    pub ok: bool,
}

/// Checks every family's params struct against the device's view of it (GPU only).
///
/// Each 4-byte word of the struct gets a distinct value; an echo kernel in the family's own
/// module copies the struct it received back, and every byte is compared. A field that
/// bindgen's mirror and nvcc lay out differently, or two swapped fields, fail it.
///
/// ```
/// let dev = attnkit::Device::best();
/// match attnkit::selftest::check_params_layout(&dev) {
///     Ok(checks) => assert!(checks.iter().all(|c| c.ok)),
///     Err(e) => assert!(!dev.is_cuda(), "{e}"),
/// }
/// ```
pub fn check_params_layout(dev: &Device) -> Result<Vec<LayoutCheck>> {
    match &dev.backend {
        Backend::Cpu { .. } => Err(Error::Unsupported {
            arg: "dev",
            detail: "the parameter layout check runs on a CUDA device".into(),
        }),
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => crate::cuda::PARAMS_LAYOUTS
            .iter()
            .map(|(family, size, check)| {
                Ok(LayoutCheck {
                    family,
                    size: *size,
                    ok: check(c)?,
                })
            })
            .collect(),
    }
}
