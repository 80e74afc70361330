//! Decode attention on candle tensors: new tokens against a contiguous KV cache.

use candle_core::{Layout, Shape, Tensor};

use super::flash::operand;
use super::{CpuOp, host_i32, same_place, tail};
use crate::decode::{self, Decode, Tables};
use crate::dtype::Element;
use crate::{Device, Error};

/// FlashAttention's `flash_attn_with_kvcache` on a contiguous cache: `q`
/// `[batch, seq_q, heads_q, d]` (1 to [`decode::MAX_SEQ_Q`] new tokens) against `k_cache`,
/// `v_cache` `[batch, capacity, heads_kv, d]`, where sequence `b` holds `cache_seqlens[b]`
/// keys, the new tokens' among them (the last `seq_q`). `cache_seqlens`: `[batch]` u32, i32
/// or i64, read on the host. `causal`: bottom-right, among the new tokens. Returns
/// `[batch, seq_q, heads_q, d]`. Head dims: [`decode::HEAD_DIMS`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (2, 1, 8, 64), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1.0, (2, 100, 2, 64), &Device::Cpu)?;
/// let lens = Tensor::new(&[37u32, 100], &Device::Cpu)?;
/// let o = attnkit::candle::flash_attn_with_kvcache(&q, &k, &k, &lens, 0.125, true)?;
/// assert_eq!(o.dims(), &[2, 1, 8, 64]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_with_kvcache(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_seqlens: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> candle_core::Result<Tensor> {
    same_place(q, k_cache, v_cache)?;
    let lens = host_i32("cache_seqlens", cache_seqlens)?;
    let op = DecodeAttn {
        lens,
        scale: softmax_scale,
        causal,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// The candle op: the host lengths and options; shapes from the layouts.
struct DecodeAttn {
    lens: Vec<i32>,
    scale: f32,
    causal: bool,
}

impl CpuOp for DecodeAttn {
    fn run<T: Element>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> Result<(Vec<T>, Shape), Error> {
        let (qd, qs, qo) = operand::<4>("q", lq)?;
        let (kd, ks, ko) = operand::<4>("k_cache", lk)?;
        let (vd, vs, vo) = operand::<4>("v_cache", lv)?;
        let [batch, seq_q, heads_q, d] = qd;
        if kd != vd || kd[0] != batch || kd[3] != d || self.lens.len() != batch {
            return Err(Error::Shape {
                arg: if self.lens.len() != batch {
                    "cache_seqlens"
                } else {
                    "k_cache"
                },
                detail: format!(
                    "q {qd:?}, k_cache {kd:?}, v_cache {vd:?}, {} lengths: the caches must \
                     agree with each other and with q's batch and head_dim",
                    self.lens.len()
                ),
            });
        }
        let layout = decode::Layout::Contiguous { capacity: kd[1] };
        let mut p = Decode::new(&self.lens, seq_q, heads_q, kd[2], d, layout);
        p.causal = self.causal;
        p.scale = Some(self.scale);
        p.q_strides = qs;
        p.k_strides = ks;
        p.v_strides = vs;
        let dev = Device::cpu();
        let mut ws = vec![0f32; p.checked_workspace_len(&dev)?];
        let mut o = vec![T::default(); p.o_len()];
        let mut lse = vec![0f32; p.lse_len()];
        decode::forward(
            &dev,
            &p,
            tail("q", q, qo)?.into(),
            tail("k_cache", k, ko)?.into(),
            tail("v_cache", v, vo)?.into(),
            Tables::host(&p),
            (&mut ws).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )?;
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(DecodeAttn, "attnkit-decode");
