//! candle adapter (feature `candle`): attnkit's flash attention as candle ops and its Monarch
//! layer as a candle [`Module`](candle_core::Module), on candle tensors with no copy.
//!
//! The attention entry points keep candle-flash-attn's names and argument order
//! ([`flash_attn`], [`flash_attn_windowed`], [`flash_attn_varlen`],
//! [`flash_attn_varlen_windowed`]), so switching is an import; [`flash_attn_with`] and
//! [`flash_attn_varlen_with`] take every option of [`flash::Options`](crate::flash::Options)
//! (sinks, relu², the entropy-invariant scale, soft-capping, ...), [`flash_attn_with_lse`]
//! returns the log-sum-exp too, and [`flash_attn_with_extras`] /
//! [`flash_attn_varlen_with_extras`] take ALiBi slopes, learned sink logits and block masks
//! ([`FlashExtras`]) and return the LSE and entropy. The ALiBi forms keep candle-flash-attn's
//! names too ([`flash_attn_alibi`], [`flash_attn_alibi_windowed`], [`flash_attn_varlen_alibi`],
//! [`flash_attn_varlen_alibi_windowed`]). Tensors are `[batch, seq, heads, head_dim]` (packed `[total_tokens, heads,
//! head_dim]` for varlen) as candle-flash-attn takes them, in f32, f16 or bf16, with any
//! strides whose last one is 1 (a transposed or narrowed view needs no copy: the strides go to
//! the kernel as they are). K and V may have fewer heads than Q (GQA/MQA).
//! [`flash_attn_with_kvcache`] runs decode steps against a contiguous KV cache
//! ([`flash_attn_with_kvcache_with`]: paged and StreamingLLM rolling caches, windows,
//! soft-capping, ALiBi, sink logits) and [`kv_cache_append`] writes the new tokens' keys and
//! values into it in place, [`lightning_attn`] runs Lightning Attention-2
//! ([`lightning_attn_with_state`] with states in and out for chunked prefill,
//! [`lightning_decode_step`] one token at a time), and [`MonarchModule`] wraps a
//! [`MonarchLinear`](crate::monarch::MonarchLinear).
//!
//! What runs: candle CPU tensors run attnkit's CPU path (candle's own flash-attn has none).
//! With the `candle-cuda` feature (which turns on candle-core's `cuda`), candle CUDA tensors
//! run attnkit's kernels on candle's buffers, enqueued on candle's own stream, with the
//! operands' strides taken from candle's layouts (no copy of a transposed view). The small
//! tables (offsets, lengths, block tables, ring offsets, slopes, states) may be CPU tensors
//! (read and checked on the host) or CUDA tensors (u32/i32/f32, left on the device and copied
//! device to device: a server's step then makes no host round trip, the kernels re-checking
//! every index). One body per op serves both places, so the CPU tests below prove the
//! checks and set-up the CUDA path runs; the CUDA tests (`tests/candle.rs`, `on_cuda`) run
//! wherever candle finds a GPU. **The CUDA path has not run on a GPU yet.**
//!
//! Bad input (a wrong dtype, rank or device, mixed devices, a non-unit last stride, shapes
//! that do not agree) is a candle error naming the argument, never a panic: attnkit's own
//! [`Error`] is carried inside it ([`candle_core::Error::Wrapped`]).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! // batch 1, 10 positions, 4 query heads sharing 2 KV heads, head_dim 32.
//! let q = Tensor::randn(0f32, 1.0, (1, 10, 4, 32), &Device::Cpu)?;
//! let kv = Tensor::randn(0f32, 1.0, (1, 10, 2, 32), &Device::Cpu)?;
//! let o = attnkit::candle::flash_attn(&q, &kv, &kv, 32f32.powf(-0.5), true)?;
//! assert_eq!(o.dims(), &[1, 10, 4, 32]);
//! # Ok::<(), candle_core::Error>(())
//! ```

#[cfg(feature = "candle-cuda")]
mod cuda;
mod decode;
mod flash;
mod lightning;
mod monarch;
mod place;

pub use decode::{
    KvCacheOptions, flash_attn_with_kvcache, flash_attn_with_kvcache_with, kv_cache_append,
};
pub use flash::{
    FlashExtras, FlashOutput, flash_attn, flash_attn_alibi, flash_attn_alibi_windowed,
    flash_attn_varlen, flash_attn_varlen_alibi, flash_attn_varlen_alibi_windowed,
    flash_attn_varlen_windowed, flash_attn_varlen_with, flash_attn_varlen_with_extras,
    flash_attn_windowed, flash_attn_with, flash_attn_with_extras, flash_attn_with_lse,
};
pub use lightning::{lightning_attn, lightning_attn_with_state, lightning_decode_step};
pub use monarch::MonarchModule;

use candle_core::{CpuStorage, DType, Tensor};

use crate::Error;
use crate::dtype::{Bf16, Element, F16, cast_slice, cast_slice_mut};

/// The element types the adapter computes in: `f32`, [`Bf16`] and [`F16`] (candle's f32,
/// bf16 and f16 storage, viewed without a copy). Sealed.
pub trait CandleElement: Element + sealed::Sealed {
    /// candle's name for this type.
    const CANDLE_DTYPE: DType;
    /// candle's own type for it in CUDA storage (`half`'s, which ours wrap).
    #[cfg(feature = "candle-cuda")]
    #[doc(hidden)]
    type Native: cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + candle_core::cuda_backend::CudaDType;
    /// The storage's elements if it holds this type.
    #[doc(hidden)]
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// The storage's elements, to write in place, if it holds this type.
    #[doc(hidden)]
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// A candle storage owning `v`.
    #[doc(hidden)]
    fn storage(v: Vec<Self>) -> CpuStorage;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for crate::Bf16 {}
    impl Sealed for crate::F16 {}
}

impl CandleElement for f32 {
    #[cfg(feature = "candle-cuda")]
    type Native = f32;
    const CANDLE_DTYPE: DType = DType::F32;
    fn slice(s: &CpuStorage) -> Option<&[f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [f32]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl CandleElement for Bf16 {
    #[cfg(feature = "candle-cuda")]
    type Native = half::bf16;
    const CANDLE_DTYPE: DType = DType::BF16;
    fn slice(s: &CpuStorage) -> Option<&[Bf16]> {
        match s {
            CpuStorage::BF16(v) => Some(cast_slice(v)),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Bf16]> {
        match s {
            CpuStorage::BF16(v) => Some(cast_slice_mut(v)),
            _ => None,
        }
    }
    fn storage(v: Vec<Bf16>) -> CpuStorage {
        CpuStorage::BF16(v.into_iter().map(|x| x.0).collect())
    }
}

impl CandleElement for F16 {
    #[cfg(feature = "candle-cuda")]
    type Native = half::f16;
    const CANDLE_DTYPE: DType = DType::F16;
    fn slice(s: &CpuStorage) -> Option<&[F16]> {
        match s {
            CpuStorage::F16(v) => Some(cast_slice(v)),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [F16]> {
        match s {
            CpuStorage::F16(v) => Some(cast_slice_mut(v)),
            _ => None,
        }
    }
    fn storage(v: Vec<F16>) -> CpuStorage {
        CpuStorage::F16(v.into_iter().map(|x| x.0).collect())
    }
}

/// A rank-1 index tensor (offsets or lengths; u32, i32 or i64) read to the host as i32, each
/// value checked to fit (the kernels' index type); errors name `arg`.
fn host_i32(arg: &'static str, t: &Tensor) -> candle_core::Result<Vec<i32>> {
    if t.rank() != 1 {
        return Err(wrap(Error::Shape {
            arg,
            detail: format!("dims {:?}; expected one dimension", t.dims()),
        }));
    }
    let wide: Vec<i64> = match t.dtype() {
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec1::<i64>()?,
        other => {
            return Err(wrap(Error::Unsupported {
                arg,
                detail: format!("dtype {other:?}; u32, i32 or i64"),
            }));
        }
    };
    wide.into_iter()
        .map(i32::try_from)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            wrap(Error::Value {
                arg,
                detail: "a value outside i32 (the kernels' index type)".into(),
            })
        })
}

/// attnkit's typed error, carried inside candle's.
fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}
