//! What a candle user's crate does with attnkit: hands it candle's cudarc stream and buffers.
//! It compiles only if both crates got the same cudarc (one version, one set of features).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

/// An attnkit device on the application's cudarc stream.
pub fn device_on(stream: Arc<CudaStream>) -> attnkit::Result<attnkit::Device> {
    attnkit::Device::from_stream(stream)
}

/// `y = 2 x + 1` on the application's buffers, through attnkit's kernels.
pub fn twice_plus_one(
    dev: &attnkit::Device,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> attnkit::Result<()> {
    attnkit::selftest::scale(dev, x.into(), 1, 2.0, 1.0, y.into())
}
