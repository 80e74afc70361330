//! Flash attention on candle tensors: fixed-length and varlen, under candle-flash-attn's names.

use candle_core::{Layout, Shape, Tensor};

use super::place::{
    Op, Operand, Place, Side, Table, custom_op3, f32_table, index_table, opt_tab, opt_table,
    same_place,
};
use super::{CandleElement, wrap};
use crate::Error;
use crate::flash::{
    self, Attention, BlockMask, DeviceOffsets, Extras, Options, Strides, VarlenAttention,
};

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

/// [`FlashExtras`] as the op keeps them (host copies of CPU tensors, CUDA tensors as they are).
#[derive(Clone, Debug, Default)]
struct ExtraTables {
    alibi: Option<Table<f32>>,
    sinks: Option<Table<f32>>,
    mask: Option<(Table<u8>, usize, usize)>,
    entropy: bool,
}

impl ExtraTables {
    fn read(x: &FlashExtras<'_>) -> candle_core::Result<ExtraTables> {
        Ok(ExtraTables {
            alibi: x
                .alibi_slopes
                .map(|t| f32_table("alibi_slopes", t))
                .transpose()?,
            sinks: x
                .sink_logits
                .map(|t| f32_table("sink_logits", t))
                .transpose()?,
            mask: match x.block_mask {
                Some((t, bq, bk)) => Some((super::place::u8_table("block_mask", t)?, bq, bk)),
                None => None,
            },
            entropy: x.entropy,
        })
    }

    /// Runs `call` with these extras where `place` reads them; an entropy output of
    /// `rows` is made when asked for and returned.
    fn with<P: Place>(
        &self,
        place: &P,
        rows: usize,
        call: impl FnOnce(Extras<'_>) -> Result<(), Error>,
    ) -> Result<Option<P::Out<f32>>, Error> {
        let alibi = opt_table(place, "alibi_slopes", self.alibi.as_ref())?;
        let sinks = opt_table(place, "sink_logits", self.sinks.as_ref())?;
        let mask = opt_table(place, "block_mask", self.mask.as_ref().map(|m| &m.0))?;
        let mut ent = self
            .entropy
            .then(|| place.output::<f32>(rows))
            .transpose()?;
        let block_mask = match (&mask, &self.mask) {
            (Some(m), Some((_, block_q, block_k))) => Some(BlockMask {
                mask: P::tab(m)?,
                block_q: *block_q,
                block_k: *block_k,
            }),
            _ => None,
        };
        call(Extras {
            sink_logits: opt_tab::<P, f32>(&sinks)?,
            alibi_slopes: opt_tab::<P, f32>(&alibi)?,
            entropy: ent.as_mut().map(|e| P::out_mut(e)).transpose()?,
            block_mask,
        })?;
        Ok(ent)
    }
}

/// The output with the side outputs an op left (LSE, then entropy if asked for).
fn with_side(o: Tensor, side: &Side, entropy: bool) -> candle_core::Result<FlashOutput> {
    let mut v = side.take(1 + usize::from(entropy))?.into_iter();
    let lse = v.next();
    match lse {
        Some(lse) => Ok(FlashOutput {
            o,
            lse,
            entropy: v.next(),
        }),
        None => Err(candle_core::Error::Msg(
            "attnkit: the op left no LSE".into(),
        )),
    }
}

/// Options of candle-flash-attn's plain forms: a scale, and causal or not.
fn plain(softmax_scale: f32, causal: bool) -> Options {
    Options {
        causal,
        scale: Some(softmax_scale),
        ..Options::default()
    }
}

/// Options of candle-flash-attn's windowed forms.
fn windowed(softmax_scale: f32, left: Option<usize>, right: Option<usize>) -> Options {
    Options {
        scale: Some(softmax_scale),
        window_left: left,
        window_right: right,
        ..Options::default()
    }
}

/// Extras of candle-flash-attn's ALiBi forms.
fn alibi(slopes: &Tensor) -> FlashExtras<'_> {
    FlashExtras {
        alibi_slopes: Some(slopes),
        ..Default::default()
    }
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
    let opts = plain(softmax_scale, causal);
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
    let opts = windowed(softmax_scale, window_size_left, window_size_right);
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
    q.apply_op3_no_bwd(k, v, &FlashAttn::new(opts, ExtraTables::default()))
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
    let op = FlashAttn::new(opts, ExtraTables::read(extras)?);
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    with_side(o, &op.side, extras.entropy)
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
    let opts = plain(softmax_scale, causal);
    let x = alibi(alibi_slopes);
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
    let opts = windowed(softmax_scale, window_size_left, window_size_right);
    let x = alibi(alibi_slopes);
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
    let opts = plain(softmax_scale, causal);
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
    let opts = windowed(softmax_scale, window_size_left, window_size_right);
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
    let op = VarlenAttn {
        opts: *opts,
        cu_q: offsets("seqlens_q", seqlens_q, "max_seqlen_q", max_seqlen_q)?,
        cu_k: offsets("seqlens_k", seqlens_k, "max_seqlen_k", max_seqlen_k)?,
        max: (max_seqlen_q, max_seqlen_k),
        extras: ExtraTables::read(extras)?,
        side: Side::default(),
    };
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    with_side(o, &op.side, extras.entropy)
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
    let opts = plain(softmax_scale, causal);
    let x = alibi(alibi_slopes);
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
    let opts = windowed(softmax_scale, window_size_left, window_size_right);
    let x = alibi(alibi_slopes);
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

/// A `[batch + 1]` offsets tensor: on the CPU (u32, i32 or i64) read to the host as i32 with
/// its maximum checked (`max` must be at least the longest sequence); on a CUDA device (u32 or
/// i32) left there, the kernels skipping a sequence longer than `max`.
fn offsets(
    arg: &'static str,
    t: &Tensor,
    max_arg: &'static str,
    max: usize,
) -> candle_core::Result<Table<i32>> {
    if t.rank() != 1 {
        return Err(wrap(Error::Shape {
            arg,
            detail: format!("dims {:?}; expected [batch + 1]", t.dims()),
        }));
    }
    let table = index_table(arg, t)?;
    // Lengths are checked (sorted, from 0) by flash itself; the maximum only needs them here.
    if let Some(cu) = table.host() {
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
    }
    Ok(table)
}

/// The varlen candle op: options, offsets (with the declared maxima) and extras; shapes
/// from the layouts.
struct VarlenAttn {
    opts: Options,
    cu_q: Table<i32>,
    cu_k: Table<i32>,
    max: (usize, usize),
    extras: ExtraTables,
    side: Side,
}

impl Op for VarlenAttn {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (q, lq): Operand<'_, T>,
        (k, lk): Operand<'_, T>,
        (v, lv): Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let (qd, qs) = operand::<3>("q", lq)?;
        let (kd, ks) = operand::<3>("k", lk)?;
        let (vd, vs) = operand::<3>("v", lv)?;
        let [total_q, heads_q, d] = qd;
        let [total_k, heads_kv, _] = kd;
        let shapes = format!("q {qd:?}, k {kd:?}, v {vd:?}");
        let last = |cu: &Table<i32>, total: usize| {
            cu.host()
                .map_or(total, |cu| cu.last().map_or(0, |&x| x.max(0) as usize))
        };
        agree(
            &[
                ("q", total_q, last(&self.cu_q, total_q)),
                ("k", total_k, last(&self.cu_k, total_k)),
                ("seqlens_k", self.cu_k.len(), self.cu_q.len()),
                ("k", kd[2], d),
                ("v", vd[0], total_k),
                ("v", vd[1], heads_kv),
                ("v", vd[2], d),
            ],
            &shapes,
        )?;
        let mut a = match (self.cu_q.host(), self.cu_k.host()) {
            (Some(cq), Some(ck)) => VarlenAttention::new(cq, ck, heads_q, heads_kv, d),
            _ => VarlenAttention::with_device_offsets(
                DeviceOffsets {
                    batch: self.cu_q.len().saturating_sub(1),
                    total_q,
                    total_k,
                    max_seqlen_q: self.max.0,
                    max_seqlen_k: self.max.1,
                },
                heads_q,
                heads_kv,
                d,
            ),
        };
        a.opts = self.opts;
        a.q_strides = qs;
        a.k_strides = ks;
        a.v_strides = vs;
        let rows = a.lse_len();
        let (cu_q, cu_k) = (
            place.table("seqlens_q", &self.cu_q)?,
            place.table("seqlens_k", &self.cu_k)?,
        );
        let mut o = place.output::<T>(a.o_len())?;
        let mut lse = place.output::<f32>(rows)?;
        let ent = self.extras.with(place, rows, |extras| {
            flash::forward_varlen_with(
                place.device(),
                &a,
                q,
                k,
                v,
                P::tab(&cu_q)?,
                P::tab(&cu_k)?,
                P::out_mut(&mut o)?,
                P::out_mut(&mut lse)?,
                extras,
            )
        })?;
        let shape = Shape::from((heads_q, total_q));
        let mut side = vec![place.tensor::<f32>(lse, shape.clone())];
        side.extend(ent.map(|e| place.tensor::<f32>(e, shape)));
        self.side.put(side);
        Ok((o, Shape::from(qd.to_vec())))
    }
}

custom_op3!(VarlenAttn, "attnkit-flash-attn-varlen");

/// The candle op: the options and extras; the shapes come from the tensors' layouts.
struct FlashAttn {
    opts: Options,
    extras: ExtraTables,
    /// The LSE (`[batch, heads_q, seq_q]`) and entropy, for [`flash_attn_with_extras`].
    side: Side,
}

/// An operand's sizes and strides from its candle layout: `[batch, seq, heads, d]` (`R` = 4)
/// or packed `[tokens, heads, d]` (`R` = 3, for varlen); the last stride must be 1.
pub(super) fn operand<const R: usize>(
    arg: &'static str,
    l: &Layout,
) -> Result<([usize; R], Strides), Error> {
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
    Ok((dims, strides))
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
    fn new(opts: &Options, extras: ExtraTables) -> FlashAttn {
        FlashAttn {
            opts: *opts,
            extras,
            side: Side::default(),
        }
    }
}

impl Op for FlashAttn {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (q, lq): Operand<'_, T>,
        (k, lk): Operand<'_, T>,
        (v, lv): Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let (qd, qs) = operand::<4>("q", lq)?;
        let (kd, ks) = operand::<4>("k", lk)?;
        let (vd, vs) = operand::<4>("v", lv)?;
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
        let rows = a.lse_len();
        let mut o = place.output::<T>(a.o_len())?;
        let mut lse = place.output::<f32>(rows)?;
        let ent = self.extras.with(place, rows, |extras| {
            flash::forward_with(
                place.device(),
                &a,
                q,
                k,
                v,
                P::out_mut(&mut o)?,
                P::out_mut(&mut lse)?,
                extras,
            )
        })?;
        let shape = Shape::from((batch, heads_q, seq_q));
        let mut side = vec![place.tensor::<f32>(lse, shape.clone())];
        side.extend(ent.map(|e| place.tensor::<f32>(e, shape)));
        self.side.put(side);
        Ok((o, Shape::from(qd.to_vec())))
    }
}

custom_op3!(FlashAttn, "attnkit-flash-attn");
