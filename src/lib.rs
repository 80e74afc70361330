//! # attnkit
//!
//! CUDA kernels for efficient Transformers, with a CPU path that computes the same functions
//! when no GPU is present. Every call takes a [`Device`] and borrowed buffers ([`Buf`],
//! [`BufMut`]) that live where it runs; bad input is a typed [`Error`] naming the argument.
//!
//! ```
//! use attnkit::{selftest, Device};
//! let dev = Device::cpu();
//! let x = vec![1.0f32, 2.0, 3.0];
//! let mut y = vec![f32::NAN; 3];
//! selftest::scale(&dev, (&x).into(), 1, 3.0, 0.0, (&mut y).into())?;
//! assert_eq!(y, [3.0, 6.0, 9.0]);
//! # Ok::<(), attnkit::Error>(())
//! ```
//!
//! Layout of the crate: `kernels/<family>.cu` (+ `<family>.h`, the params struct mirrored into
//! Rust by bindgen) and `src/<family>/` (API and checks, CPU path, CUDA launcher) per kernel
//! family; [`Device`] and the private `cuda` module hold the runtime they share.
#![deny(missing_docs)]

mod buffer;
mod cpu;
#[cfg(attnkit_cuda)]
mod cuda;
pub mod decode;
mod device;
pub mod dtype;
mod error;
pub mod flash;
pub mod lightning;
pub mod monarch;
pub mod selftest;
pub mod timing;

pub use buffer::{Buf, BufMut};
pub use device::{Device, build_info};
pub use dtype::{Bf16, DType, Element, F16};
pub use error::{Error, Result};

/// The README's examples are doctests: a newcomer's first code must compile.
#[cfg(all(doctest, feature = "cuda"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Re-export of the cudarc version attnkit is built against, for callers who bring buffers
/// and streams.
#[cfg(feature = "cuda")]
pub use cudarc;
