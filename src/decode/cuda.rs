//! CUDA launcher of the decode kernels (not yet written: the GPU path reports Unsupported).

use super::{Problem, Tables};
use crate::buffer::{Buf, BufMut};
use crate::cuda::CudaDevice;
use crate::dtype::Element;
use crate::error::{Error, Result};

fn missing() -> Error {
    Error::Unsupported {
        arg: "dev",
        detail: "the decode CUDA kernels are not built yet".into(),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    _dev: &CudaDevice,
    _p: &Problem<'_>,
    _q: &Buf<'_, T>,
    _k: &Buf<'_, T>,
    _v: &Buf<'_, T>,
    _tables: &Tables<'_>,
    _ws: &mut BufMut<'_, f32>,
    _o: &mut BufMut<'_, T>,
    _lse: &mut BufMut<'_, f32>,
) -> Result<()> {
    Err(missing())
}

pub(super) fn append<T: Element>(
    _dev: &CudaDevice,
    _p: &Problem<'_>,
    _k_new: &Buf<'_, T>,
    _v_new: &Buf<'_, T>,
    _tables: &Tables<'_>,
    _k: &mut BufMut<'_, T>,
    _v: &mut BufMut<'_, T>,
) -> Result<()> {
    Err(missing())
}
