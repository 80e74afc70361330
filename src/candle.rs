//! candle adapter (feature `candle`): attnkit's flash attention as a candle op, so a candle
//! model calls it on candle tensors with no copy.
//!
//! The entry points keep candle-flash-attn's names and argument order ([`flash_attn`],
//! [`flash_attn_windowed`]), so switching is an import; [`flash_attn_with`] takes every
//! option of [`flash::Options`] (sinks, relu², the entropy-invariant scale, ...). Tensors are
//! `[batch, seq, heads, head_dim]` as candle-flash-attn takes them, in f32, f16 or bf16, with
//! any strides whose last one is 1 (a transposed or narrowed view needs no copy: the strides
//! go to the kernel as they are). K and V may have fewer heads than Q (GQA/MQA).
//!
//! What runs: candle CPU tensors run attnkit's CPU path (candle's own flash-attn has none).
//! CUDA tensors are not supported yet by this adapter (a candle error says so); the CUDA path
//! is tracked by issue 14 and needs candle's own CUDA build.
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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::dtype::{Bf16, Element, F16, cast_slice};
use crate::flash::{self, Attention, Options, Strides};
use crate::{Device, Error};

/// Scaled dot-product attention, candle-flash-attn's `flash_attn`: `softmax(scale q k^T) v`,
/// causal (bottom-right aligned) when asked. `q`: `[batch, seq_q, heads_q, d]`; `k`, `v`:
/// `[batch, seq_k, heads_kv, d]`. Returns `[batch, seq_q, heads_q, d]` in `q`'s dtype.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::ones((2, 3, 1, 64), candle_core::DType::F32, &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn(&q, &q, &q, 0.125, false)?;
/// // Equal scores: each output is the mean of the values, all ones.
/// assert!((o.sum_all()?.to_scalar::<f32>()? - (2 * 3 * 64) as f32).abs() < 1e-3);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let opts = Options {
        causal,
        scale: Some(softmax_scale),
        ..Options::default()
    };
    flash_attn_with(q, k, v, &opts)
}

/// candle-flash-attn's `flash_attn_windowed`: keys `j` with
/// `i + diag - left <= j <= i + diag + right` (`diag = seq_k - seq_q`; `None`: unbounded on
/// that side), so `window_size_right = Some(0)` is the causal mask, as there.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (1, 16, 2, 64), &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_windowed(&q, &q, &q, 0.125, Some(4), Some(0))?;
/// assert_eq!(o.dims(), q.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> candle_core::Result<Tensor> {
    let opts = Options {
        scale: Some(softmax_scale),
        window_left: window_size_left,
        window_right: window_size_right,
        ..Options::default()
    };
    flash_attn_with(q, k, v, &opts)
}

/// Attention with every option of [`flash::Options`] (`scale: None` is `1 / sqrt(d)`).
///
/// ```
/// use attnkit::flash::Options;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (1, 64, 2, 32), &Device::Cpu)?;
/// // StreamingLLM: a 16-key causal window plus 4 sink keys.
/// let opts = Options { causal: true, window_left: Some(15), sinks: 4, ..Options::default() };
/// let o = attnkit::candle::flash_attn_with(&q, &q, &q, &opts)?;
/// assert_eq!(o.dims(), q.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &Options,
) -> candle_core::Result<Tensor> {
    if !q.device().is_cpu() {
        return Err(wrap(Error::Unsupported {
            arg: "q",
            detail: format!(
                "a tensor on {:?}: attnkit::candle runs candle CPU tensors so far",
                q.device()
            ),
        }));
    }
    for (arg, t) in [("k", k), ("v", v)] {
        if !t.device().same_device(q.device()) {
            return Err(wrap(Error::Placement {
                arg,
                expected: "the CPU (where q is)",
                found: if t.device().is_cuda() {
                    "a CUDA device"
                } else {
                    "another device"
                },
            }));
        }
        if t.dtype() != q.dtype() {
            return Err(wrap(Error::Unsupported {
                arg,
                detail: format!(
                    "dtype {:?} next to q's {:?}: all three the same",
                    t.dtype(),
                    q.dtype()
                ),
            }));
        }
    }
    q.apply_op3_no_bwd(k, v, &FlashAttn { opts: *opts })
}

/// The candle op: the options; the shapes come from the tensors' layouts.
struct FlashAttn {
    opts: Options,
}

/// A `[batch, seq, heads, d]` operand's sizes and strides from its candle layout.
fn operand(arg: &'static str, l: &Layout) -> Result<([usize; 4], Strides, usize), Error> {
    let dims: [usize; 4] = l.dims().try_into().map_err(|_| Error::Shape {
        arg,
        detail: format!(
            "rank {} ({:?}); expected [batch, seq, heads, head_dim]",
            l.dims().len(),
            l.dims()
        ),
    })?;
    let s = l.stride();
    if s[3] != 1 && dims[3] > 1 {
        return Err(Error::Stride {
            arg,
            detail: format!(
                "last stride {} (strides {s:?}); the head dimension must be contiguous",
                s[3]
            ),
        });
    }
    let strides = Strides {
        batch: s[0],
        row: s[1],
        head: s[2],
        dim: 1,
    };
    Ok((dims, strides, l.start_offset()))
}

impl FlashAttn {
    /// Runs attnkit's CPU path on the three operands' slices (each from its layout's start).
    fn cpu<T: Element + Copy + Default>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> Result<(Vec<T>, Shape), Error> {
        let (qd, qs, qo) = operand("q", lq)?;
        let (kd, ks, ko) = operand("k", lk)?;
        let (vd, vs, vo) = operand("v", lv)?;
        let [batch, seq_q, heads_q, d] = qd;
        let [_, seq_k, heads_kv, _] = kd;
        for (arg, got, want) in [
            ("k", kd[0], batch),
            ("k", kd[3], d),
            ("v", vd[0], batch),
            ("v", vd[1], seq_k),
            ("v", vd[2], heads_kv),
            ("v", vd[3], d),
        ] {
            if got != want {
                return Err(Error::Shape {
                    arg,
                    detail: format!(
                        "{arg} is {:?} with q {qd:?} and k {kd:?}",
                        if arg == "k" { kd } else { vd }
                    ),
                });
            }
        }
        let mut a = Attention::new(batch, seq_q, seq_k, heads_q, heads_kv, d);
        a.opts = self.opts;
        a.q_strides = qs;
        a.k_strides = ks;
        a.v_strides = vs;
        // Offsets past the end are the checks' to report (as a short buffer), not a panic.
        let mut o = vec![T::default(); a.o_len()];
        let mut lse = vec![0f32; a.lse_len()];
        flash::forward(
            &Device::cpu(),
            &a,
            tail("q", q, qo)?.into(),
            tail("k", k, ko)?.into(),
            tail("v", v, vo)?.into(),
            (&mut o).into(),
            (&mut lse).into(),
        )?;
        Ok((o, Shape::from(qd.to_vec())))
    }
}

/// The storage from a layout's start offset (one past the end is the checks' to report as a
/// short buffer; further is an error here, never a panic).
fn tail<'a, T>(arg: &'static str, s: &'a [T], off: usize) -> Result<&'a [T], Error> {
    s.get(off..).ok_or(Error::Shape {
        arg,
        detail: format!("layout starts at {off}, storage holds {}", s.len()),
    })
}

fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "attnkit-flash-attn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (o, shape) = self.cpu((q, l1), (k, l2), (v, l3)).map_err(wrap)?;
                (CpuStorage::F32(o), shape)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let (q, k, v) = (cast_slice::<_, Bf16>(q), cast_slice(k), cast_slice(v));
                let (o, shape) = self.cpu((q, l1), (k, l2), (v, l3)).map_err(wrap)?;
                (
                    CpuStorage::BF16(o.into_iter().map(|x| x.0).collect()),
                    shape,
                )
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let (q, k, v) = (cast_slice::<_, F16>(q), cast_slice(k), cast_slice(v));
                let (o, shape) = self.cpu((q, l1), (k, l2), (v, l3)).map_err(wrap)?;
                (CpuStorage::F16(o.into_iter().map(|x| x.0).collect()), shape)
            }
            _ => {
                return Err(wrap(Error::Unsupported {
                    arg: "q",
                    detail: format!(
                        "{:?} (k {:?}, v {:?}); f32, f16 or bf16, all three the same",
                        s1.dtype(),
                        s2.dtype(),
                        s3.dtype()
                    ),
                }));
            }
        };
        Ok(out)
    }
}
