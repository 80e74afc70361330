//! # attnkit
//!
//! CUDA kernels for efficient Transformers, with a CPU path that computes the same functions
//! when no GPU is present. Every call takes a [`Device`] and borrowed buffers ([`Buf`],
//! [`BufMut`]) that live where it runs; bad input is a typed [`Error`] naming the argument.
//!
//! The families:
//! - [`flash`]: FlashAttention forward (fixed and varlen batches, GQA, causal) and its variants
//!   (windows, sinks, block-sparse masks, entropy-invariant scale, sink logits, relu², entropy);
//! - [`decode`]: KV-cache decode (split-KV, paged and StreamingLLM rolling caches);
//! - [`lightning`]: Lightning Attention-2 linear attention, forward and backward;
//! - [`monarch`]: Monarch matrices (fused multiply, transpose, backward, projection, layer);
//! - [`selftest`]: the runtime's own check.
//!
//! ```
//! use attnkit::{flash::{self, Attention}, Device};
//! let a = Attention::new(1, 4, 4, 1, 1, 32).causal(true);
//! let x = vec![0.5f32; a.o_len()];
//! let (mut o, mut lse) = (vec![f32::NAN; a.o_len()], vec![f32::NAN; a.lse_len()]);
//! flash::forward(&Device::cpu(), &a, (&x).into(), (&x).into(), (&x).into(), (&mut o).into(), (&mut lse).into())?;
//! assert!((o[0] - 0.5).abs() < 1e-6); // every row averages equal values
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

#[cfg(feature = "cuda")]
pub use buffer::RawBuf;
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
