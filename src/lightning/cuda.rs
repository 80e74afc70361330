//! CUDA launcher of the Lightning family (kernel in progress).

use super::{Config, Decode, Forward, Plan, Resolved, Seqs};
use crate::cuda::CudaDevice;
use crate::dtype::Element;
use crate::error::{Error, Result};

pub(super) fn forward<T: Element>(
    _dev: &CudaDevice,
    _cfg: &Config<'_>,
    _seqs: &Seqs<'_>,
    _r: &Resolved,
    _plan: Plan,
    _log2_decay: &[f32],
    _io: Forward<'_, T>,
) -> Result<()> {
    Err(Error::Unsupported {
        arg: "dev",
        detail: "the Lightning GPU kernel is not built yet".into(),
    })
}

pub(super) fn decode<T: Element>(
    _dev: &CudaDevice,
    _cfg: &Config<'_>,
    _batch: usize,
    _log2_decay: &[f32],
    _io: Decode<'_, T>,
) -> Result<()> {
    Err(Error::Unsupported {
        arg: "dev",
        detail: "the Lightning GPU kernel is not built yet".into(),
    })
}
