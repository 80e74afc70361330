//! Decode attention on candle tensors: new tokens against a contiguous or paged KV cache.

use candle_core::{Layout, Shape, Tensor};

use super::flash::operand;
use super::{CpuOp, host_f32, host_i32, same_place, tail, wrap};
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
    let opts = KvCacheOptions {
        softmax_scale: Some(softmax_scale),
        causal,
        ..KvCacheOptions::default()
    };
    flash_attn_with_kvcache_with(q, k_cache, v_cache, cache_seqlens, &opts)
}

/// The keyword arguments of FlashAttention's `flash_attn_with_kvcache` that
/// [`flash_attn_with_kvcache_with`] takes (tensors read on the host).
///
/// ```
/// let o = attnkit::candle::KvCacheOptions { causal: true, softcap: Some(50.0), ..Default::default() };
/// assert!(o.block_table.is_none() && o.softmax_scale.is_none());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct KvCacheOptions<'a> {
    /// Softmax scale; `None`: `1 / sqrt(d)`.
    pub softmax_scale: Option<f32>,
    /// Bottom-right causal mask among the new tokens.
    pub causal: bool,
    /// Sliding window: a new token at position `t` sees keys `j >= t - window_left`.
    pub window_left: Option<usize>,
    /// Logit soft-capping ([`Decode::softcap`]).
    pub softcap: Option<f32>,
    /// ALiBi slopes, f32 `[heads_q]` ([`Tables::alibi_slopes`]).
    pub alibi_slopes: Option<&'a Tensor>,
    /// Learned per-head sink logits, f32 `[heads_q]` ([`Tables::sink_logits`]).
    pub sink_logits: Option<&'a Tensor>,
    /// A paged cache's block table, `[batch, pages_per_seq]` u32/i32/i64: the caches are then
    /// `[num_pages, page_size, heads_kv, d]` (or head-major `[num_pages, heads_kv, page_size,
    /// d]` passed as a transposed view), page size a multiple of 8.
    pub block_table: Option<&'a Tensor>,
}

/// [`flash_attn_with_kvcache`] with [`KvCacheOptions`]: a paged cache through its block
/// table, a sliding window, soft-capping, ALiBi and learned sink logits.
///
/// ```
/// use attnkit::candle::KvCacheOptions;
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1.0, (2, 1, 4, 64), &Device::Cpu)?;
/// // 6 pages of 16 tokens; sequence 0 uses pages 4 and 1, sequence 1 page 0.
/// let pages = Tensor::randn(0f32, 1.0, (6, 16, 2, 64), &Device::Cpu)?;
/// let table = Tensor::new(&[[4u32, 1], [0, 0]], &Device::Cpu)?;
/// let lens = Tensor::new(&[20u32, 9], &Device::Cpu)?;
/// let opts = KvCacheOptions { causal: true, block_table: Some(&table), softcap: Some(30.0), ..Default::default() };
/// let o = attnkit::candle::flash_attn_with_kvcache_with(&q, &pages, &pages, &lens, &opts)?;
/// assert_eq!(o.dims(), &[2, 1, 4, 64]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn flash_attn_with_kvcache_with(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_seqlens: &Tensor,
    opts: &KvCacheOptions<'_>,
) -> candle_core::Result<Tensor> {
    same_place(q, k_cache, v_cache)?;
    let lens = host_i32("cache_seqlens", cache_seqlens)?;
    let table = match opts.block_table {
        Some(t) => {
            let &[_, cols] = t.dims() else {
                return Err(wrap(Error::Shape {
                    arg: "block_table",
                    detail: format!("dims {:?}; expected [batch, pages_per_seq]", t.dims()),
                }));
            };
            Some((host_i32("block_table", &t.flatten_all()?)?, cols))
        }
        None => None,
    };
    let op = DecodeAttn {
        lens,
        scale: opts.softmax_scale,
        causal: opts.causal,
        window_left: opts.window_left,
        softcap: opts.softcap,
        alibi: opts
            .alibi_slopes
            .map(|t| host_f32("alibi_slopes", t))
            .transpose()?,
        sinks: opts
            .sink_logits
            .map(|t| host_f32("sink_logits", t))
            .transpose()?,
        table,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// The candle op: the host lengths, tables and options; shapes from the layouts.
struct DecodeAttn {
    lens: Vec<i32>,
    scale: Option<f32>,
    causal: bool,
    window_left: Option<usize>,
    softcap: Option<f32>,
    alibi: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    /// A paged cache's block table (row-major) and its columns.
    table: Option<(Vec<i32>, usize)>,
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
        let paged = self.table.is_some();
        if kd != vd || (!paged && kd[0] != batch) || kd[3] != d || self.lens.len() != batch {
            return Err(Error::Shape {
                arg: if self.lens.len() != batch {
                    "cache_seqlens"
                } else {
                    "k_cache"
                },
                detail: format!(
                    "q {qd:?}, k_cache {kd:?}, v_cache {vd:?}, {} lengths: the caches must \
                     agree with each other and with q's batch (unless paged) and head_dim",
                    self.lens.len()
                ),
            });
        }
        let layout = match &self.table {
            Some((table, cols)) => decode::Layout::Paged {
                page_size: kd[1],
                num_pages: kd[0],
                block_table: Some(table),
                pages_per_seq: *cols,
            },
            None => decode::Layout::Contiguous { capacity: kd[1] },
        };
        let mut p = Decode::new(&self.lens, seq_q, heads_q, kd[2], d, layout);
        p.causal = self.causal;
        p.scale = self.scale;
        p.window_left = self.window_left;
        p.softcap = self.softcap;
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
            Tables {
                alibi_slopes: self.alibi.as_ref().map(|s| s.into()),
                sink_logits: self.sinks.as_ref().map(|s| s.into()),
                ..Tables::host(&p)
            },
            (&mut ws).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )?;
        Ok((o, Shape::from(qd.to_vec())))
    }
}

super::cpu_custom_op3!(DecodeAttn, "attnkit-decode");
