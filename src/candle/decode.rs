//! Decode attention on candle tensors: new tokens against a contiguous KV cache.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::flash::operand;
use super::{CpuOp, cpu_fwd_any, same_place, tail, wrap};
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
    if cache_seqlens.rank() != 1 {
        return Err(wrap(Error::Shape {
            arg: "cache_seqlens",
            detail: format!("dims {:?}; expected [batch]", cache_seqlens.dims()),
        }));
    }
    let wide: Vec<i64> = match cache_seqlens.dtype() {
        DType::U32 => cache_seqlens
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I32 => cache_seqlens
            .to_vec1::<i32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::I64 => cache_seqlens.to_vec1::<i64>()?,
        other => {
            return Err(wrap(Error::Unsupported {
                arg: "cache_seqlens",
                detail: format!("dtype {other:?}; lengths are u32, i32 or i64"),
            }));
        }
    };
    let lens = wide
        .iter()
        .map(|&x| i32::try_from(x))
        .collect::<std::result::Result<Vec<i32>, _>>()
        .map_err(|_| {
            wrap(Error::Value {
                arg: "cache_seqlens",
                detail: "a length outside i32 (the kernels' index type)".into(),
            })
        })?;
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

impl CustomOp3 for DecodeAttn {
    fn name(&self) -> &'static str {
        "attnkit-decode"
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
        cpu_fwd_any(self, (s1, l1), (s2, l2), (s3, l3))
    }
}
