//! Lightning Attention-2 on candle tensors.

use candle_core::{Layout, Shape, Tensor};

use super::place::{Op, Operand, Place, Side, Table, custom_op3, f32_table, same_place};
use super::{CandleElement, wrap};
use crate::Error;
use crate::lightning::{self, Config, Decode, Forward, Seqs};

/// Lightning Attention-2 (causal linear attention with per-head decay, by the block split):
/// `o_t = scale * sum_{s <= t} lambda_h^(t - s) (q_t . k_s) v_s` with
/// `lambda_h = exp(-decay[h])` (`None`: no decay; see [`lightning::decay_slopes`]), or with
/// `causal = false` the non-causal `scale * Q (K^T V)` (no decay). `q`, `k`:
/// `[batch, seq, heads, d]`, `v`: `[batch, seq, heads, e]`, `d` and `e` in {64, 128}; returns
/// `[batch, seq, heads, e]` in `q`'s dtype. Non-contiguous inputs are made contiguous first
/// (the family reads packed rows). States in and out: [`lightning_attn_with_state`]; one
/// token at a time: [`lightning_decode_step`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 0.1, (1, 100, 4, 64), &Device::Cpu)?;
/// let slopes = attnkit::lightning::decay_slopes(4, 1.0)?;
/// let o = attnkit::candle::lightning_attn(&q, &q, &q, Some(&slopes), 0.125, true)?;
/// assert_eq!(o.dims(), &[1, 100, 4, 64]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn lightning_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decay: Option<&[f32]>,
    scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    same_place(q, k, v)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = LightningAttn {
        decay: decay.map(<[f32]>::to_vec),
        scale,
        causal,
        initial: None,
        final_state: None,
    };
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// Causal [`lightning_attn`] with the recurrent state in and out, for chunked prefill: the
/// state `S = sum_s lambda^(T-1-s) k_s^T v_s` (f32 `[batch, heads, d, e]`) before the chunk
/// (`None`: zero) and after it. Feeding the returned state to the next chunk gives what one
/// call over both chunks gives.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::randn(0f32, 0.1, (1, 40, 2, 64), &Device::Cpu)?;
/// let decay = [0.1f32, 0.2];
/// let (_, s) = attnkit::candle::lightning_attn_with_state(&x.narrow(1, 0, 25)?, &x.narrow(1, 0, 25)?, &x.narrow(1, 0, 25)?, Some(&decay), 0.1, None)?;
/// let tail = x.narrow(1, 25, 15)?;
/// let (o2, _) = attnkit::candle::lightning_attn_with_state(&tail, &tail, &tail, Some(&decay), 0.1, Some(&s))?;
/// let whole = attnkit::candle::lightning_attn(&x, &x, &x, Some(&decay), 0.1, true)?;
/// let diff = (whole.narrow(1, 25, 15)? - o2)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5, "{diff}");
/// assert_eq!(s.dims(), &[1, 2, 64, 64]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn lightning_attn_with_state(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decay: Option<&[f32]>,
    scale: f32,
    initial_state: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    same_place(q, k, v)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = LightningAttn {
        decay: decay.map(<[f32]>::to_vec),
        scale,
        causal: true,
        initial: initial_state
            .map(|s| state_table("initial_state", s))
            .transpose()?,
        final_state: Some(Side::default()),
    };
    let o = q.apply_op3_no_bwd(&k, &v, &op)?;
    let state = op.final_state.as_ref().map(|s| s.take(1));
    Ok((o, one(state)?))
}

/// One decode step of causal Lightning attention: the new token's `q`, `k` (`[batch, 1,
/// heads, d]`) and `v` (`[batch, 1, heads, e]`) against the state (f32 `[batch, heads, d,
/// e]`); returns the output (`[batch, 1, heads, e]`) and the updated state
/// `S' = lambda S + k^T v`. Steps after [`lightning_attn_with_state`] continue the sequence.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let q = Tensor::ones((1, 1, 1, 64), DType::F32, &Device::Cpu)?;
/// let s = Tensor::zeros((1, 1, 64, 64), DType::F32, &Device::Cpu)?;
/// let (o, s2) = attnkit::candle::lightning_decode_step(&q, &q, &q, Some(&[0.5]), 1.0, &s)?;
/// // From a zero state: o = (q . k) v = 64 per column, and S' = k^T v (all ones).
/// assert_eq!(o.flatten_all()?.to_vec1::<f32>()?[0], 64.0);
/// assert_eq!(s2.sum_all()?.to_scalar::<f32>()?, 64.0 * 64.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn lightning_decode_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decay: Option<&[f32]>,
    scale: f32,
    state: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    same_place(q, k, v)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = LightningStep {
        decay: decay.map(<[f32]>::to_vec),
        scale,
        state: state_table("state", state)?,
        updated: Side::default(),
    };
    let o = q.apply_op3_no_bwd(&k, &v, &op)?;
    Ok((o, one(Some(op.updated.take(1)))?))
}

/// A state tensor (f32, `[batch, heads, d, e]`) as a table, with its dims.
fn state_table(arg: &'static str, t: &Tensor) -> candle_core::Result<(Table<f32>, [usize; 4])> {
    let dims: [usize; 4] = t.dims().try_into().map_err(|_| {
        wrap(Error::Shape {
            arg,
            detail: format!("dims {:?}; expected [batch, heads, d, e]", t.dims()),
        })
    })?;
    Ok((f32_table(arg, t)?, dims))
}

/// The one state an op left.
fn one(taken: Option<candle_core::Result<Vec<Tensor>>>) -> candle_core::Result<Tensor> {
    match taken.transpose()?.and_then(|v| v.into_iter().next()) {
        Some(t) => Ok(t),
        None => Err(candle_core::Error::Msg(
            "attnkit: the op left no state".into(),
        )),
    }
}

/// A state's dims must be `[batch, heads, d, e]` of the problem.
fn check_state(arg: &'static str, got: [usize; 4], want: [usize; 4]) -> Result<(), Error> {
    if got != want {
        return Err(Error::Shape {
            arg,
            detail: format!("dims {got:?}; the problem's state is {want:?}"),
        });
    }
    Ok(())
}

/// The candle op: the options (and, with states, the initial one and a slot for the final
/// one); shapes from the (contiguous) layouts.
struct LightningAttn {
    decay: Option<Vec<f32>>,
    scale: f32,
    causal: bool,
    initial: Option<(Table<f32>, [usize; 4])>,
    final_state: Option<Side>,
}

/// The decode-step op: the options, the state before the step and a slot for the one after.
struct LightningStep {
    decay: Option<Vec<f32>>,
    scale: f32,
    state: (Table<f32>, [usize; 4]),
    updated: Side,
}

impl Op for LightningStep {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (q, lq): Operand<'_, T>,
        (k, lk): Operand<'_, T>,
        (v, lv): Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let [batch, seq, heads, d, e] = operands(lq, lk, lv)?;
        if seq != 1 {
            return Err(Error::Shape {
                arg: "q",
                detail: format!(
                    "dims {:?}; a decode step takes one token per sequence",
                    lq.dims()
                ),
            });
        }
        check_state("state", self.state.1, [batch, heads, d, e])?;
        let cfg = Config {
            heads,
            d,
            e,
            decay: self.decay.as_deref(),
            scale: self.scale,
            causal: true,
        };
        let mut state = place.state("state", &self.state.0)?;
        let mut o = place.output::<T>(batch.saturating_mul(heads).saturating_mul(e))?;
        lightning::decode(
            place.device(),
            &cfg,
            batch,
            Decode {
                q,
                k,
                v,
                o: P::out_mut(&mut o)?,
                state: P::out_mut(&mut state)?,
            },
        )?;
        let shape = Shape::from(self.state.1.to_vec());
        self.updated.put(vec![place.tensor::<f32>(state, shape)]);
        Ok((o, Shape::from(vec![batch, 1, heads, e])))
    }
}

custom_op3!(LightningStep, "attnkit-lightning-decode");

/// `[batch, seq, heads, dim]` of a contiguous operand.
fn dims(arg: &'static str, l: &Layout) -> Result<[usize; 4], Error> {
    let d: [usize; 4] = l.dims().try_into().map_err(|_| Error::Shape {
        arg,
        detail: format!(
            "dims {:?}; expected [batch, seq, heads, head_dim]",
            l.dims()
        ),
    })?;
    if !l.is_contiguous() {
        return Err(Error::Stride {
            arg,
            detail: format!("strides {:?}; the op takes contiguous rows", l.stride()),
        });
    }
    Ok(d)
}

/// `[batch, seq, heads, d, e]` of contiguous q, k (as q) and v (as q but its last).
fn operands(lq: &Layout, lk: &Layout, lv: &Layout) -> Result<[usize; 5], Error> {
    let (qd, kd, vd) = (dims("q", lq)?, dims("k", lk)?, dims("v", lv)?);
    if kd != qd || vd[..3] != qd[..3] {
        return Err(Error::Shape {
            arg: if kd != qd { "k" } else { "v" },
            detail: format!("q {qd:?}, k {kd:?}, v {vd:?}: k as q, v as q but its last"),
        });
    }
    let [batch, seq, heads, d] = qd;
    Ok([batch, seq, heads, d, vd[3]])
}

impl Op for LightningAttn {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (q, lq): Operand<'_, T>,
        (k, lk): Operand<'_, T>,
        (v, lv): Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let [batch, seq, heads, d, e] = operands(lq, lk, lv)?;
        let cfg = Config {
            heads,
            d,
            e,
            decay: self.decay.as_deref(),
            scale: self.scale,
            causal: self.causal,
        };
        let seqs = Seqs::Dense { batch, seq };
        let dev = place.device();
        let mut ws = place.output::<f32>(lightning::workspace_len(dev, &cfg, &seqs)?)?;
        let rows = batch.saturating_mul(seq).saturating_mul(heads);
        let mut o = place.output::<T>(rows.saturating_mul(e))?;
        let state_dims = [batch, heads, d, e];
        let initial = match &self.initial {
            Some((t, got)) => {
                check_state("initial_state", *got, state_dims)?;
                Some(place.table("initial_state", t)?)
            }
            None => None,
        };
        let mut fin = match self.final_state {
            Some(_) => {
                let n = state_dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
                let n = n.ok_or_else(|| Error::Shape {
                    arg: "q",
                    detail: format!("the state {state_dims:?} overflows usize"),
                })?;
                Some(place.output::<f32>(n)?)
            }
            None => None,
        };
        lightning::forward(
            dev,
            &cfg,
            &seqs,
            Forward {
                q,
                k,
                v,
                o: P::out_mut(&mut o)?,
                initial_state: initial.as_ref().map(|s| P::tab(s)).transpose()?,
                final_state: fin.as_mut().map(|s| P::out_mut(s)).transpose()?,
                workspace: P::out_mut(&mut ws)?,
            },
        )?;
        if let (Some(side), Some(fin)) = (&self.final_state, fin) {
            let shape = Shape::from(state_dims.to_vec());
            side.put(vec![place.tensor::<f32>(fin, shape)]);
        }
        Ok((o, Shape::from(vec![batch, seq, heads, e])))
    }
}

custom_op3!(LightningAttn, "attnkit-lightning");
