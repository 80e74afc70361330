//! Flash attention on candle tensors: fixed-length and varlen, under candle-flash-attn's names.

use std::sync::Mutex;

use candle_core::{Layout, Shape, Tensor};

use super::{CpuOp, host_i32, same_place, tail, wrap};
use crate::dtype::Element;
use crate::flash::{self, Attention, Options, Strides, VarlenAttention};
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
    same_place(q, k, v)?;
    q.apply_op3_no_bwd(k, v, &FlashAttn::new(opts))
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
    same_place(q, k, v)?;
    let op = FlashAttn::new(opts);
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    let taken = op.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some((lse, shape)) = taken else {
        return Err(candle_core::Error::Msg(
            "attnkit: the op left no LSE".into(),
        ));
    };
    Ok((o, Tensor::from_vec(lse, shape, q.device())?))
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
    same_place(q, k, v)?;
    let cu_q = offsets("seqlens_q", seqlens_q, "max_seqlen_q", max_seqlen_q)?;
    let cu_k = offsets("seqlens_k", seqlens_k, "max_seqlen_k", max_seqlen_k)?;
    q.apply_op3_no_bwd(
        k,
        v,
        &VarlenAttn {
            opts: *opts,
            cu_q,
            cu_k,
        },
    )
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

/// The varlen candle op: options and host offsets; shapes from the layouts.
struct VarlenAttn {
    opts: Options,
    cu_q: Vec<i32>,
    cu_k: Vec<i32>,
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
        flash::forward_varlen(
            &Device::cpu(),
            &a,
            tail("q", q, qo)?.into(),
            tail("k", k, ko)?.into(),
            tail("v", v, vo)?.into(),
            self.cu_q[..].into(),
            self.cu_k[..].into(),
            (&mut o).into(),
            (&mut lse).into(),
        )?;
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(VarlenAttn, "attnkit-flash-attn-varlen");

/// The candle op: the options; the shapes come from the tensors' layouts.
struct FlashAttn {
    opts: Options,
    /// Where `cpu_fwd` leaves the LSE (`[batch, heads_q, seq_q]`) and its shape, for
    /// [`flash_attn_with_lse`] (a candle op has one output).
    lse: Mutex<Option<(Vec<f32>, Shape)>>,
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
    fn new(opts: &Options) -> FlashAttn {
        FlashAttn {
            opts: *opts,
            lse: Mutex::new(None),
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
        flash::forward(
            &Device::cpu(),
            &a,
            tail("q", q, qo)?.into(),
            tail("k", k, ko)?.into(),
            tail("v", v, vo)?.into(),
            (&mut o).into(),
            (&mut lse).into(),
        )?;
        let mut slot = self.lse.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((lse, Shape::from((batch, heads_q, seq_q))));
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(FlashAttn, "attnkit-flash-attn");
