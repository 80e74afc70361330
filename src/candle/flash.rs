//! Flash attention on candle tensors: fixed-length and varlen, under candle-flash-attn's names.

use std::sync::Mutex;

use candle_core::{Layout, Shape, Tensor};

use super::{CpuOp, host_f32, host_i32, host_u8, same_place, tail, wrap};
use crate::dtype::Element;
use crate::flash::{self, Attention, BlockMask, Extras, Options, Strides, VarlenAttention};
use crate::{Device, Error};

/// The optional inputs and outputs of [`flash_attn_with_extras`] and
/// [`flash_attn_varlen_with_extras`] (attnkit's [`flash::Extras`] as candle tensors, read on
/// the host): f32 `[heads_q]` ALiBi slopes and learned sink logits, a u8 block mask, and
/// whether to return the per-row entropy.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let x = attnkit::candle::FlashExtras { alibi_slopes: Some(&slopes), entropy: true, ..Default::default() };
/// assert!(x.sink_logits.is_none());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashExtras<'a> {
    /// ALiBi slopes, f32 `[heads_q]` ([`flash::Extras::alibi_slopes`]).
    pub alibi_slopes: Option<&'a Tensor>,
    /// Learned per-head sink logits, f32 `[heads_q]` ([`flash::Extras::sink_logits`]).
    pub sink_logits: Option<&'a Tensor>,
    /// A block-sparse mask ([`BlockMask`]): a u8 tensor of `[rows, cols]` blocks (any shape
    /// with that many elements, row-major) and its `(block_q, block_k)`.
    pub block_mask: Option<(&'a Tensor, usize, usize)>,
    /// Also return the per-row entropy of the attention distribution.
    pub entropy: bool,
}

/// What [`flash_attn_with_extras`] and [`flash_attn_varlen_with_extras`] return.
#[derive(Clone, Debug)]
pub struct FlashOutput {
    /// The attention output, in q's shape and dtype.
    pub o: Tensor,
    /// Per-row log-sum-exp, f32: `[batch, heads_q, seq_q]` (varlen: `[heads_q, total_q]`).
    pub lse: Tensor,
    /// Per-row entropy in the LSE's shape, when asked for.
    pub entropy: Option<Tensor>,
}

/// Host copies of [`FlashExtras`].
#[derive(Clone, Debug, Default)]
struct HostExtras {
    alibi: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    mask: Option<(Vec<u8>, usize, usize)>,
    entropy: bool,
}

impl HostExtras {
    fn read(x: &FlashExtras<'_>) -> candle_core::Result<HostExtras> {
        Ok(HostExtras {
            alibi: x
                .alibi_slopes
                .map(|t| host_f32("alibi_slopes", t))
                .transpose()?,
            sinks: x
                .sink_logits
                .map(|t| host_f32("sink_logits", t))
                .transpose()?,
            mask: match x.block_mask {
                Some((t, bq, bk)) => Some((host_u8("block_mask", t)?, bq, bk)),
                None => None,
            },
            entropy: x.entropy,
        })
    }

    fn extras<'a>(&'a self, entropy: &'a mut [f32]) -> Extras<'a> {
        Extras {
            sink_logits: self.sinks.as_ref().map(|s| s.into()),
            alibi_slopes: self.alibi.as_ref().map(|s| s.into()),
            entropy: self.entropy.then(|| entropy.into()),
            block_mask: self.mask.as_ref().map(|(m, bq, bk)| BlockMask {
                mask: m.into(),
                block_q: *bq,
                block_k: *bk,
            }),
        }
    }
}

/// Where an op's `cpu_fwd` leaves its side outputs (a candle op has one output): the LSE, the
/// entropy if asked for, and their shape.
type SideOutputs = Mutex<Option<(Vec<f32>, Option<Vec<f32>>, Shape)>>;

/// Takes an op's side outputs as tensors on `dev`.
fn side_outputs(
    o: Tensor,
    slot: &SideOutputs,
    dev: &candle_core::Device,
) -> candle_core::Result<FlashOutput> {
    let taken = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some((lse, entropy, shape)) = taken else {
        return Err(candle_core::Error::Msg(
            "attnkit: the op left no LSE".into(),
        ));
    };
    let entropy = entropy
        .map(|e| Tensor::from_vec(e, shape.clone(), dev))
        .transpose()?;
    Ok(FlashOutput {
        o,
        lse: Tensor::from_vec(lse, shape, dev)?,
        entropy,
    })
}

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
    same_place(q, k, v)?;
    q.apply_op3_no_bwd(k, v, &FlashAttn::new(opts, HostExtras::default()))
}

/// [`flash_attn_with`] with [`FlashExtras`]: ALiBi slopes, learned sink logits, a block mask,
/// and the LSE and (if asked) entropy returned beside the output.
///
/// ```
/// use attnkit::candle::FlashExtras;
/// use attnkit::flash::Options;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::zeros((1, 4, 1, 32), candle_core::DType::F32, &Device::Cpu)?;
/// let sink = Tensor::new(&[0f32], &Device::Cpu)?;
/// let x = FlashExtras { sink_logits: Some(&sink), entropy: true, ..Default::default() };
/// let out = attnkit::candle::flash_attn_with_extras(&q, &q, &q, &Options::default(), &x)?;
/// // Four keys and the sink, all logit 0: lse = ln 5, entropy ln 5.
/// let e: Vec<f32> = out.entropy.expect("asked for").flatten_all()?.to_vec1()?;
/// assert!(e.iter().all(|x| (x - 5f32.ln()).abs() < 1e-5));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_with_extras(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &Options,
    extras: &FlashExtras<'_>,
) -> candle_core::Result<FlashOutput> {
    same_place(q, k, v)?;
    let op = FlashAttn::new(opts, HostExtras::read(extras)?);
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    side_outputs(o, &op.side, q.device())
}

/// candle-flash-attn's `flash_attn_alibi`: [`flash_attn`] with ALiBi slopes (f32
/// `[heads_q]`): head `h`'s logits gain `-slope[h] * |i + seq_k - seq_q - j|`. (With
/// `causal`, FlashAttention adds `slope * (j - i - diag)` instead, which differs by a
/// constant per row: the same output, but attnkit's LSE is that of the logits as defined here.)
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (1, 8, 2, 64), &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_alibi(&q, &q, &q, &slopes, 0.125, true)?;
/// assert_eq!(o.dims(), q.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let opts = Options {
        causal,
        scale: Some(softmax_scale),
        ..Options::default()
    };
    let x = FlashExtras {
        alibi_slopes: Some(alibi_slopes),
        ..Default::default()
    };
    Ok(flash_attn_with_extras(q, k, v, &opts, &x)?.o)
}

/// candle-flash-attn's `flash_attn_alibi_windowed`: [`flash_attn_alibi`] with the window of
/// [`flash_attn_windowed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (1, 8, 1, 32), &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.1f32], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_alibi_windowed(&q, &q, &q, &slopes, 0.2, Some(3), Some(0))?;
/// assert_eq!(o.dims(), q.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
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
    let x = FlashExtras {
        alibi_slopes: Some(alibi_slopes),
        ..Default::default()
    };
    Ok(flash_attn_with_extras(q, k, v, &opts, &x)?.o)
}

/// [`flash_attn_with`] that also returns the per-row log-sum-exp of the scaled scores (f32,
/// `[batch, heads_q, seq_q]`; `-inf` for a row that sees no key), as FlashAttention's
/// `softmax_lse`: what a caller needs to merge attention computed in pieces.
///
/// ```
/// use attnkit::flash::Options;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::zeros((1, 4, 1, 32), candle_core::DType::F32, &Device::Cpu)?;
/// let (o, lse) = attnkit::candle::flash_attn_with_lse(&q, &q, &q, &Options::default())?;
/// // Four equal scores of 0: lse = ln 4 on every row.
/// let l: Vec<f32> = lse.flatten_all()?.to_vec1()?;
/// assert!(l.iter().all(|x| (x - 4f32.ln()).abs() < 1e-6));
/// assert_eq!((o.dims(), lse.dims()), (&[1, 4, 1, 32][..], &[1, 1, 4][..]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &Options,
) -> candle_core::Result<(Tensor, Tensor)> {
    let out = flash_attn_with_extras(q, k, v, opts, &FlashExtras::default())?;
    Ok((out.o, out.lse))
}

/// candle-flash-attn's `flash_attn_varlen`: packed sequences (continuous batching). `q`:
/// `[total_q, heads_q, d]`, `k`, `v`: `[total_k, heads_kv, d]`; `seqlens_q`, `seqlens_k`: the
/// `[batch + 1]` offsets from 0 (u32 as there, or i32/i64), read on the host; `max_seqlen_*`
/// must be at least each longest sequence (an error naming it otherwise: a GPU sizes its grid
/// by them). Returns `[total_q, heads_q, d]`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (7, 2, 32), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_varlen(&q, &q, &q, &cu, &cu, 4, 4, 0.2, true)?;
/// assert_eq!(o.dims(), &[7, 2, 32]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let opts = Options {
        causal,
        scale: Some(softmax_scale),
        ..Options::default()
    };
    flash_attn_varlen_with(
        q,
        k,
        v,
        (seqlens_q, max_seqlen_q),
        (seqlens_k, max_seqlen_k),
        &opts,
    )
}

/// candle-flash-attn's `flash_attn_varlen_windowed`: [`flash_attn_varlen`] with the window of
/// [`flash_attn_windowed`], per sequence.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (9, 1, 64), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 9], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_varlen_windowed(&q, &q, &q, &cu, &cu, 9, 9, 0.1, Some(2), Some(0))?;
/// assert_eq!(o.dims(), &[9, 1, 64]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
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
    flash_attn_varlen_with(
        q,
        k,
        v,
        (seqlens_q, max_seqlen_q),
        (seqlens_k, max_seqlen_k),
        &opts,
    )
}

/// Varlen attention with every option of [`flash::Options`]; the offsets come with their
/// maxima, `(seqlens, max_seqlen)`.
///
/// ```
/// use attnkit::flash::Options;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (12, 2, 32), &Device::Cpu)?;
/// let cu = Tensor::new(&[0i64, 5, 5, 12], &Device::Cpu)?; // an empty sequence too
/// let opts = Options { causal: true, sinks: 1, window_left: Some(3), ..Options::default() };
/// let o = attnkit::candle::flash_attn_varlen_with(&q, &q, &q, (&cu, 7), (&cu, 7), &opts)?;
/// assert_eq!(o.dims(), &[12, 2, 32]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_varlen_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (seqlens_q, max_seqlen_q): (&Tensor, usize),
    (seqlens_k, max_seqlen_k): (&Tensor, usize),
    opts: &Options,
) -> candle_core::Result<Tensor> {
    let out = flash_attn_varlen_with_extras(
        q,
        k,
        v,
        (seqlens_q, max_seqlen_q),
        (seqlens_k, max_seqlen_k),
        opts,
        &FlashExtras::default(),
    )?;
    Ok(out.o)
}

/// [`flash_attn_varlen_with`] with [`FlashExtras`] (a block mask is indexed from each
/// sequence's first row and key); the LSE and entropy are `[heads_q, total_q]`.
///
/// ```
/// use attnkit::{candle::FlashExtras, flash::Options};
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (12, 2, 32), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 5, 12], &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.0], &Device::Cpu)?;
/// let x = FlashExtras { alibi_slopes: Some(&slopes), ..Default::default() };
/// let opts = Options { causal: true, softcap: Some(30.0), ..Options::default() };
/// let out = attnkit::candle::flash_attn_varlen_with_extras(&q, &q, &q, (&cu, 7), (&cu, 7), &opts, &x)?;
/// assert_eq!((out.o.dims(), out.lse.dims()), (&[12, 2, 32][..], &[2, 12][..]));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_varlen_with_extras(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (seqlens_q, max_seqlen_q): (&Tensor, usize),
    (seqlens_k, max_seqlen_k): (&Tensor, usize),
    opts: &Options,
    extras: &FlashExtras<'_>,
) -> candle_core::Result<FlashOutput> {
    same_place(q, k, v)?;
    let cu_q = offsets("seqlens_q", seqlens_q, "max_seqlen_q", max_seqlen_q)?;
    let cu_k = offsets("seqlens_k", seqlens_k, "max_seqlen_k", max_seqlen_k)?;
    let op = VarlenAttn {
        opts: *opts,
        cu_q,
        cu_k,
        extras: HostExtras::read(extras)?,
        side: Mutex::new(None),
    };
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    side_outputs(o, &op.side, q.device())
}

/// candle-flash-attn's `flash_attn_varlen_alibi`: [`flash_attn_varlen`] with ALiBi slopes
/// (see [`flash_attn_alibi`]), each sequence's distances to its own diagonal.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (7, 2, 32), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 3, 7], &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_varlen_alibi(&q, &q, &q, &slopes, &cu, &cu, 4, 4, 0.2, true)?;
/// assert_eq!(o.dims(), &[7, 2, 32]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    let opts = Options {
        causal,
        scale: Some(softmax_scale),
        ..Options::default()
    };
    let x = FlashExtras {
        alibi_slopes: Some(alibi_slopes),
        ..Default::default()
    };
    let out = flash_attn_varlen_with_extras(
        q,
        k,
        v,
        (seqlens_q, max_seqlen_q),
        (seqlens_k, max_seqlen_k),
        &opts,
        &x,
    )?;
    Ok(out.o)
}

/// candle-flash-attn's `flash_attn_varlen_alibi_windowed`: [`flash_attn_varlen_alibi`] with
/// the window of [`flash_attn_windowed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (9, 1, 64), &Device::Cpu)?;
/// let cu = Tensor::new(&[0u32, 9], &Device::Cpu)?;
/// let slopes = Tensor::new(&[0.3f32], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_varlen_alibi_windowed(&q, &q, &q, &slopes, &cu, &cu, 9, 9, 0.1, Some(2), Some(0))?;
/// assert_eq!(o.dims(), &[9, 1, 64]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
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
    let x = FlashExtras {
        alibi_slopes: Some(alibi_slopes),
        ..Default::default()
    };
    let out = flash_attn_varlen_with_extras(
        q,
        k,
        v,
        (seqlens_q, max_seqlen_q),
        (seqlens_k, max_seqlen_k),
        &opts,
        &x,
    )?;
    Ok(out.o)
}

/// A `[batch + 1]` offsets tensor (u32, i32 or i64) read to the host as i32, with its maximum
/// checked: `max` must be at least the longest sequence.
fn offsets(
    arg: &'static str,
    t: &Tensor,
    max_arg: &'static str,
    max: usize,
) -> candle_core::Result<Vec<i32>> {
    let cu = host_i32(arg, t)?;
    // Lengths are checked (sorted, from 0) by flash itself; the maximum only needs them here.
    let longest = cu
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]).max(0))
        .max()
        .unwrap_or(0);
    if (longest as usize) > max {
        return Err(wrap(Error::Value {
            arg: max_arg,
            detail: format!("{max}, but a sequence of {arg} holds {longest}"),
        }));
    }
    Ok(cu)
}

/// The varlen candle op: options, host offsets and extras; shapes from the layouts.
struct VarlenAttn {
    opts: Options,
    cu_q: Vec<i32>,
    cu_k: Vec<i32>,
    extras: HostExtras,
    side: SideOutputs,
}

impl CpuOp for VarlenAttn {
    fn run<T: Element>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> Result<(Vec<T>, Shape), Error> {
        let (qd, qs, qo) = operand::<3>("q", lq)?;
        let (kd, ks, ko) = operand::<3>("k", lk)?;
        let (vd, vs, vo) = operand::<3>("v", lv)?;
        let [total_q, heads_q, d] = qd;
        let [total_k, heads_kv, _] = kd;
        let shapes = format!("q {qd:?}, k {kd:?}, v {vd:?}");
        let last = |cu: &[i32]| cu.last().map_or(0, |&x| x.max(0) as usize);
        agree(
            &[
                ("q", total_q, last(&self.cu_q)),
                ("k", total_k, last(&self.cu_k)),
                ("k", kd[2], d),
                ("v", vd[0], total_k),
                ("v", vd[1], heads_kv),
                ("v", vd[2], d),
            ],
            &shapes,
        )?;
        let mut a = VarlenAttention::new(&self.cu_q, &self.cu_k, heads_q, heads_kv, d);
        a.opts = self.opts;
        a.q_strides = qs;
        a.k_strides = ks;
        a.v_strides = vs;
        let mut o = vec![T::default(); a.o_len()];
        let mut lse = vec![0f32; a.lse_len()];
        let mut ent = vec![0f32; if self.extras.entropy { a.lse_len() } else { 0 }];
        flash::forward_varlen_with(
            &Device::cpu(),
            &a,
            tail("q", q, qo)?.into(),
            tail("k", k, ko)?.into(),
            tail("v", v, vo)?.into(),
            self.cu_q[..].into(),
            self.cu_k[..].into(),
            (&mut o).into(),
            (&mut lse).into(),
            self.extras.extras(&mut ent),
        )?;
        let entropy = self.extras.entropy.then_some(ent);
        let mut slot = self.side.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((lse, entropy, Shape::from((heads_q, a.total_q()))));
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(VarlenAttn, "attnkit-flash-attn-varlen");

/// The candle op: the options and extras; the shapes come from the tensors' layouts.
struct FlashAttn {
    opts: Options,
    extras: HostExtras,
    /// The LSE (`[batch, heads_q, seq_q]`) and entropy, for [`flash_attn_with_extras`].
    side: SideOutputs,
}

/// An operand's sizes and strides from its candle layout: `[batch, seq, heads, d]` (`R` = 4)
/// or packed `[tokens, heads, d]` (`R` = 3, for varlen); the last stride must be 1.
pub(super) fn operand<const R: usize>(
    arg: &'static str,
    l: &Layout,
) -> Result<([usize; R], Strides, usize), Error> {
    let dims: [usize; R] = l.dims().try_into().map_err(|_| Error::Shape {
        arg,
        detail: format!(
            "rank {} ({:?}); expected {}",
            l.dims().len(),
            l.dims(),
            if R == 4 {
                "[batch, seq, heads, head_dim]"
            } else {
                "[total_tokens, heads, head_dim]"
            }
        ),
    })?;
    let s = l.stride();
    if s[R - 1] != 1 && dims[R - 1] > 1 {
        return Err(Error::Stride {
            arg,
            detail: format!(
                "last stride {} (strides {s:?}); the head dimension must be contiguous",
                s[R - 1]
            ),
        });
    }
    let strides = Strides {
        // Packed varlen operands have no batch dimension (the kernels ignore it).
        batch: if R == 4 { s[0] } else { 0 },
        row: s[R - 3],
        head: s[R - 2],
        dim: 1,
    };
    Ok((dims, strides, l.start_offset()))
}

/// Sizes that must agree between q, k and v: `(arg, found, expected)` triples.
fn agree(pairs: &[(&'static str, usize, usize)], shapes: &str) -> Result<(), Error> {
    match pairs.iter().find(|(_, got, want)| got != want) {
        Some(&(arg, got, want)) => Err(Error::Shape {
            arg,
            detail: format!("a size of {arg} is {got} where {want} is needed ({shapes})"),
        }),
        None => Ok(()),
    }
}

impl FlashAttn {
    fn new(opts: &Options, extras: HostExtras) -> FlashAttn {
        FlashAttn {
            opts: *opts,
            extras,
            side: Mutex::new(None),
        }
    }
}

impl CpuOp for FlashAttn {
    fn run<T: Element>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> Result<(Vec<T>, Shape), Error> {
        let (qd, qs, qo) = operand::<4>("q", lq)?;
        let (kd, ks, ko) = operand::<4>("k", lk)?;
        let (vd, vs, vo) = operand::<4>("v", lv)?;
        let [batch, seq_q, heads_q, d] = qd;
        let [_, seq_k, heads_kv, _] = kd;
        let shapes = format!("q {qd:?}, k {kd:?}, v {vd:?}");
        agree(
            &[
                ("k", kd[0], batch),
                ("k", kd[3], d),
                ("v", vd[0], batch),
                ("v", vd[1], seq_k),
                ("v", vd[2], heads_kv),
                ("v", vd[3], d),
            ],
            &shapes,
        )?;
        let mut a = Attention::new(batch, seq_q, seq_k, heads_q, heads_kv, d);
        a.opts = self.opts;
        a.q_strides = qs;
        a.k_strides = ks;
        a.v_strides = vs;
        let mut o = vec![T::default(); a.o_len()];
        let mut lse = vec![0f32; a.lse_len()];
        let mut ent = vec![0f32; if self.extras.entropy { a.lse_len() } else { 0 }];
        flash::forward_with(
            &Device::cpu(),
            &a,
            tail("q", q, qo)?.into(),
            tail("k", k, ko)?.into(),
            tail("v", v, vo)?.into(),
            (&mut o).into(),
            (&mut lse).into(),
            self.extras.extras(&mut ent),
        )?;
        let entropy = self.extras.entropy.then_some(ent);
        let mut slot = self.side.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((lse, entropy, Shape::from((batch, heads_q, seq_q))));
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(FlashAttn, "attnkit-flash-attn");
