//! Lightning Attention-2 on candle tensors.

use candle_core::{Layout, Shape, Tensor};

use super::{CpuOp, same_place, tail};
use crate::dtype::Element;
use crate::lightning::{self, Config, Forward, Seqs};
use crate::{Device, Error};

/// Lightning Attention-2 (causal linear attention with per-head decay, by the block split):
/// `o_t = scale * sum_{s <= t} lambda_h^(t - s) (q_t . k_s) v_s` with
/// `lambda_h = exp(-decay[h])` (`None`: no decay; see [`lightning::decay_slopes`]), or with
/// `causal = false` the non-causal `scale * Q (K^T V)` (no decay). `q`, `k`:
/// `[batch, seq, heads, d]`, `v`: `[batch, seq, heads, e]`, `d` and `e` in {64, 128}; returns
/// `[batch, seq, heads, e]` in `q`'s dtype. Non-contiguous inputs are made contiguous first
/// (the family reads packed rows). No states in or out here: [`lightning::forward`] has them.
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
    };
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// The candle op: the options; shapes from the (contiguous) layouts.
struct LightningAttn {
    decay: Option<Vec<f32>>,
    scale: f32,
    causal: bool,
}

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

impl CpuOp for LightningAttn {
    fn run<T: Element>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> Result<(Vec<T>, Shape), Error> {
        let (qd, kd, vd) = (dims("q", lq)?, dims("k", lk)?, dims("v", lv)?);
        let [batch, seq, heads, d] = qd;
        let e = vd[3];
        if kd != qd || vd[..3] != qd[..3] {
            return Err(Error::Shape {
                arg: if kd != qd { "k" } else { "v" },
                detail: format!("q {qd:?}, k {kd:?}, v {vd:?}: k as q, v as q but its last"),
            });
        }
        let cfg = Config {
            heads,
            d,
            e,
            decay: self.decay.as_deref(),
            scale: self.scale,
            causal: self.causal,
        };
        let seqs = Seqs::Dense { batch, seq };
        let dev = Device::cpu();
        let mut ws = vec![0f32; lightning::workspace_len(&dev, &cfg, &seqs)?];
        let rows = batch.saturating_mul(seq).saturating_mul(heads);
        let mut o = vec![T::default(); rows.saturating_mul(e)];
        lightning::forward(
            &dev,
            &cfg,
            &seqs,
            Forward {
                q: tail("q", q, lq.start_offset())?.into(),
                k: tail("k", k, lk.start_offset())?.into(),
                v: tail("v", v, lv.start_offset())?.into(),
                o: (&mut o).into(),
                initial_state: None,
                final_state: None,
                workspace: (&mut ws).into(),
            },
        )?;
        Ok((o, Shape::from(vec![batch, seq, heads, e])))
    }
}

super::cpu_custom_op3!(LightningAttn, "attnkit-lightning");
