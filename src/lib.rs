//! # attnkit
//!
//! CUDA kernels for efficient Transformers, with a CPU path that computes the same functions
//! when no GPU is present. Every call takes a [`Device`] and borrowed buffers ([`Buf`],
//! [`BufMut`]) that live where it runs; bad input is a typed [`Error`] naming the argument.
//!
//! The families:
//! - [`flash`]: FlashAttention forward (fixed and varlen batches, GQA, causal) and its variants
//!   (windows, sinks, block-sparse masks, entropy-invariant scale, sink logits, relu², entropy),
//!   and its backward;
//! - [`decode`]: KV-cache decode (split-KV, paged and StreamingLLM rolling caches);
//! - [`lightning`]: Lightning Attention-2 linear attention, forward and backward;
//! - [`monarch`]: Monarch matrices (fused multiply, transpose, backward, projection, layer);
//! - [`selftest`]: the runtime's own check;
//! - `candle` (feature `candle`): flash attention, decode with KV caches, Lightning and the
//!   Monarch layer as candle ops and a candle `Module`, under candle-flash-attn's names (candle
//!   CPU tensors; CUDA tensors with the `candle-cuda` feature).
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
//! ## Errors, limits and buffer lengths
//!
//! Every public function checks its arguments before it computes a size from them, allocates
//! or launches; a bad one is an [`Error`] naming the argument ([`Error::arg`]), never a panic.
//! Size helpers that return a plain number (`o_len`, `lse_len`, `Strides::contiguous`, ...)
//! saturate at `usize::MAX` instead of wrapping, so a buffer sized from them is refused by
//! the call rather than accepted too short.
//!
//! **One buffer-length rule, every family:** a buffer must hold at least the elements the
//! call reads or writes (for a strided tensor: up to its last reached element); a longer one
//! is accepted, and its tail is neither read nor written. One element fewer is an error.
//!
//! **Offsets and tables have one source of truth.** Calls that take per-sequence tables both
//! as host slices in the problem (for the checks and the launch sizes) and as buffers (what a
//! kernel reads: `cu_seqlens`, `cache_seqlens`, block tables, ring offsets) check on the CPU
//! that the buffers hold what the problem says (an error otherwise). On a GPU the device
//! buffers are not copied back to be compared (that would cost a round trip per step); the
//! kernels re-check every index they read from them, so a stale table can leave outputs
//! wrong but never reads or writes outside the buffers.
//!
//! **Limits** (larger is a typed error), each where the kernels' 32-bit index arithmetic or a
//! CUDA grid dimension needs it; element offsets themselves are 64-bit everywhere (tested past
//! 2^31 elements in `tests/offsets64.rs`):
//!
//! | family | limit |
//! |---|---|
//! | [`flash`] | sequence lengths, packed totals, window sides and sinks at most [`flash::MAX_LEN`] (2^30); batch and heads at most [`flash::MAX_GRID`] (65535); block-mask layouts at most [`flash::MAX_MASK_BLOCKS`] blocks |
//! | [`decode`] | at most [`decode::MAX_BATCH`] sequences, [`decode::MAX_HEADS`] query heads, [`decode::MAX_CAPACITY`] keys per sequence, [`decode::MAX_SEQ_Q`] new tokens, [`decode::MAX_SPLITS`] splits |
//! | [`lightning`] | at most [`lightning::MAX_HEADS`] heads on a GPU, [`lightning::MAX_HOST_HEADS`] on the CPU |
//! | [`monarch`] | host-side tables and dense matrices at most [`monarch::MAX_HOST_ELEMENTS`] elements |
//!
//! Floats: NaN is an error wherever a scale, decay or logit is taken; infinities only where a
//! meaning is documented (a `-inf` learned sink logit is "no sink"). Values that live in
//! device buffers (learned sink logits on a GPU) are not read back to be checked: there a NaN
//! gives NaN rows, as the family's docs say.
//!
//! Layout of the crate: `kernels/<family>.cu` (+ `<family>.h`, the params struct mirrored into
//! Rust by bindgen) and `src/<family>/` (API and checks, CPU path, CUDA launcher) per kernel
//! family; [`Device`] and the private `cuda` module hold the runtime they share.
#![deny(missing_docs)]

mod buffer;
#[cfg(feature = "candle")]
pub mod candle;
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
