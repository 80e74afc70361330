//! Decode attention on candle tensors: new tokens against a contiguous, paged or rolling KV
//! cache, and the in-place append of their keys and values.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Shape, Tensor};

use super::flash::operand;
use super::place::{
    Cpu, Op, Operand, Place, Table, custom_op3, f32_table, index_table, opt_tab, opt_table,
    runs_on, same_place, tail,
};
use super::{CandleElement, wrap};
use crate::decode::{self, Cache, Decode, RollingCache, Tables};
use crate::{Bf16, Device, Error, F16};

/// FlashAttention's `flash_attn_with_kvcache` on a contiguous cache: `q`
/// `[batch, seq_q, heads_q, d]` (1 to [`decode::MAX_SEQ_Q`] new tokens) against `k_cache`,
/// `v_cache` `[batch, capacity, heads_kv, d]`, where sequence `b` holds `cache_seqlens[b]`
/// keys, the new tokens' among them (the last `seq_q`, written by [`kv_cache_append`]).
/// `cache_seqlens`: `[batch]`; a CPU tensor (u32, i32 or i64) is read on the host and
/// checked, a CUDA one (u32 or i32) stays on the device, the kernels re-checking every length
/// (a server's step then copies nothing to the host). The block table and ring offsets of
/// [`KvCacheOptions`] follow the same rule. `causal`: bottom-right, among the new tokens. Returns
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
    /// A paged cache's block table, `[batch, pages_per_seq]`: the caches are then
    /// `[num_pages, page_size, heads_kv, d]` (or head-major `[num_pages, heads_kv, page_size,
    /// d]` passed as a transposed view), page size a multiple of 8.
    pub block_table: Option<&'a Tensor>,
    /// A StreamingLLM rolling cache (`[batch, n_sink + window, heads_kv, d]` caches holding
    /// keys before RoPE): its bookkeeping, and its ring offsets `[batch]`
    /// ([`RollingCache::ring_offsets`] as a tensor). Not with `block_table`.
    pub rolling: Option<(&'a RollingCache, &'a Tensor)>,
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
    let op = DecodeAttn {
        cache: CacheTables::read(cache_seqlens, opts)?,
        scale: opts.softmax_scale,
        causal: opts.causal,
        window_left: opts.window_left,
        softcap: opts.softcap,
        alibi: opts
            .alibi_slopes
            .map(|t| f32_table("alibi_slopes", t))
            .transpose()?,
        sinks: opts
            .sink_logits
            .map(|t| f32_table("sink_logits", t))
            .transpose()?,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// Writes the new tokens' keys and values into the caches in place, as
/// [`decode::append`]: token `i` of sequence `b` becomes logical key
/// `cache_seqlens[b] - seq_q + i` (the lengths *after* the append, as
/// [`flash_attn_with_kvcache_with`] takes them). `k_new`, `v_new`: `[batch, seq_q, heads_kv,
/// d]`, 1 to [`decode::MAX_SEQ_Q`] tokens (a prefill writes a contiguous cache with candle's
/// `slice_set`); the caches, lengths, block table and rolling layout as for
/// [`flash_attn_with_kvcache_with`] (its other options are not read). On CUDA tensors nothing
/// goes through the host when the tables are CUDA tensors too.
///
/// ```
/// use attnkit::candle::{kv_cache_append, KvCacheOptions};
/// use candle_core::{DType, Device, Tensor};
/// let k = Tensor::zeros((1, 8, 1, 64), DType::F32, &Device::Cpu)?;
/// let v = Tensor::zeros((1, 8, 1, 64), DType::F32, &Device::Cpu)?;
/// let new = Tensor::ones((1, 1, 1, 64), DType::F32, &Device::Cpu)?;
/// let lens = Tensor::new(&[3u32], &Device::Cpu)?;
/// kv_cache_append(&k, &v, &new, &new, &lens, &KvCacheOptions::default())?;
/// // Token 0 of the step is logical key 3 - 1 = 2.
/// assert_eq!(k.sum_all()?.to_scalar::<f32>()?, 64.0);
/// assert_eq!(v.narrow(1, 2, 1)?.sum_all()?.to_scalar::<f32>()?, 64.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn kv_cache_append(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    cache_seqlens: &Tensor,
    opts: &KvCacheOptions<'_>,
) -> candle_core::Result<()> {
    runs_on("k_cache", k_cache.device())?;
    for (arg, t) in [("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)] {
        if !t.device().same_device(k_cache.device()) {
            return Err(wrap(Error::Placement {
                arg,
                expected: "k_cache's device",
                found: if t.device().is_cpu() {
                    "the CPU"
                } else {
                    "another device"
                },
            }));
        }
        if t.dtype() != k_cache.dtype() {
            return Err(wrap(Error::Unsupported {
                arg,
                detail: format!(
                    "dtype {:?} next to k_cache's {:?}",
                    t.dtype(),
                    k_cache.dtype()
                ),
            }));
        }
    }
    let cache = CacheTables::read(cache_seqlens, opts)?;
    // candle lends one mutable tensor per in-place op: the keys, then the values.
    let (k_new, v_new) = (k_new.contiguous()?, v_new.contiguous()?);
    k_cache.inplace_op2(
        &k_new,
        &AppendOp {
            cache: &cache,
            which: Cache::Keys,
        },
    )?;
    v_cache.inplace_op2(
        &v_new,
        &AppendOp {
            cache: &cache,
            which: Cache::Values,
        },
    )
}

/// Where a cache's rows are: its lengths and, for paged or rolling caches, their tables.
pub(super) struct CacheTables {
    lens: Table<i32>,
    kind: Kind,
}

enum Kind {
    Contiguous,
    /// The block table (row-major) and its columns.
    Paged(Table<i32>, usize),
    /// The rolling cache's layout (without host offsets) and its ring offsets.
    Rolling(decode::Layout<'static>, Table<i32>),
}

impl CacheTables {
    fn read(cache_seqlens: &Tensor, opts: &KvCacheOptions<'_>) -> candle_core::Result<Self> {
        if cache_seqlens.rank() != 1 {
            return Err(wrap(Error::Shape {
                arg: "cache_seqlens",
                detail: format!("dims {:?}; expected [batch]", cache_seqlens.dims()),
            }));
        }
        let kind = match (opts.block_table, opts.rolling) {
            (Some(_), Some(_)) => {
                return Err(wrap(Error::Unsupported {
                    arg: "rolling",
                    detail: "a rolling cache with a block table: one layout at a time".into(),
                }));
            }
            (Some(t), None) => {
                let &[_, cols] = t.dims() else {
                    return Err(wrap(Error::Shape {
                        arg: "block_table",
                        detail: format!("dims {:?}; expected [batch, pages_per_seq]", t.dims()),
                    }));
                };
                Kind::Paged(index_table("block_table", t)?, cols)
            }
            (None, Some((c, offsets))) => {
                if offsets.rank() != 1 {
                    return Err(wrap(Error::Shape {
                        arg: "ring_offsets",
                        detail: format!("dims {:?}; expected [batch]", offsets.dims()),
                    }));
                }
                Kind::Rolling(c.device_layout(), index_table("ring_offsets", offsets)?)
            }
            (None, None) => Kind::Contiguous,
        };
        Ok(CacheTables {
            lens: index_table("cache_seqlens", cache_seqlens)?,
            kind,
        })
    }

    /// The problem of `seq_q` tokens of `heads_q` heads per sequence against caches of dims
    /// `kd`: with host lengths when there are (checked), else only their bound.
    fn problem(&self, seq_q: usize, heads_q: usize, kd: [usize; 4]) -> Decode<'_> {
        let (layout, max_len) = match &self.kind {
            Kind::Contiguous => (decode::Layout::Contiguous { capacity: kd[1] }, kd[1]),
            Kind::Paged(table, cols) => (
                decode::Layout::Paged {
                    page_size: kd[1],
                    num_pages: kd[0],
                    block_table: table.host(),
                    pages_per_seq: *cols,
                },
                kd[1].saturating_mul(*cols),
            ),
            Kind::Rolling(layout, offsets) => {
                let mut layout = layout.clone();
                if let decode::Layout::Rolling { ring_offsets, .. } = &mut layout {
                    *ring_offsets = offsets.host();
                }
                (layout, kd[1])
            }
        };
        match self.lens.host() {
            Some(lens) => Decode::new(lens, seq_q, heads_q, kd[2], kd[3], layout),
            None => {
                let batch = self.lens.len();
                Decode::with_device_tables(batch, max_len, seq_q, heads_q, kd[2], kd[3], layout)
            }
        }
    }

    /// The tables where `place` reads them.
    fn place<P: Place>(&self, place: &P) -> Result<PlacedTables<P>, Error> {
        let (table, ring) = match &self.kind {
            Kind::Contiguous => (None, None),
            Kind::Paged(t, _) => (Some(place.table("block_table", t)?), None),
            Kind::Rolling(_, t) => (None, Some(place.table("ring_offsets", t)?)),
        };
        Ok(PlacedTables {
            lens: place.table("cache_seqlens", &self.lens)?,
            table,
            ring,
        })
    }

    /// A cache of dims `kd` holds `batch` sequences (a paged one: pages) and, rolling, its
    /// `n_sink + window` slots: a narrowed view that holds fewer is refused here, since the
    /// storage past the view would pass the buffer checks.
    fn check_dims(&self, arg: &'static str, kd: [usize; 4], batch: usize) -> Result<(), Error> {
        let slots = match &self.kind {
            Kind::Rolling(decode::Layout::Rolling { n_sink, window, .. }, _) => {
                Some(n_sink.saturating_add(*window))
            }
            _ => None,
        };
        let paged = matches!(self.kind, Kind::Paged(..));
        if (!paged && kd[0] != batch) || slots.is_some_and(|n| n != kd[1]) {
            return Err(Error::Shape {
                arg,
                detail: format!(
                    "dims {kd:?}: {batch} sequences{}",
                    slots.map_or(String::new(), |n| format!(" of {n} rolling slots"))
                ),
            });
        }
        Ok(())
    }
}

/// [`CacheTables`] where a call reads them.
struct PlacedTables<P: Place> {
    lens: P::Tab<i32>,
    table: Option<P::Tab<i32>>,
    ring: Option<P::Tab<i32>>,
}

impl<P: Place> PlacedTables<P> {
    /// The call's tables, with the extras' slopes and sink logits.
    fn tables<'a>(
        &'a self,
        alibi: &'a Option<P::Tab<f32>>,
        sinks: &'a Option<P::Tab<f32>>,
    ) -> Result<Tables<'a>, Error> {
        Ok(Tables {
            cache_seqlens: P::tab(&self.lens)?,
            block_table: opt_tab::<P, i32>(&self.table)?,
            ring_offsets: opt_tab::<P, i32>(&self.ring)?,
            alibi_slopes: opt_tab::<P, f32>(alibi)?,
            sink_logits: opt_tab::<P, f32>(sinks)?,
        })
    }
}

/// The candle op: the cache's tables and the options; shapes from the layouts.
struct DecodeAttn {
    cache: CacheTables,
    scale: Option<f32>,
    causal: bool,
    window_left: Option<usize>,
    softcap: Option<f32>,
    alibi: Option<Table<f32>>,
    sinks: Option<Table<f32>>,
}

impl Op for DecodeAttn {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (q, lq): Operand<'_, T>,
        (k, lk): Operand<'_, T>,
        (v, lv): Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let (qd, qs) = operand::<4>("q", lq)?;
        let (kd, ks) = operand::<4>("k_cache", lk)?;
        let (vd, vs) = operand::<4>("v_cache", lv)?;
        let [batch, seq_q, heads_q, d] = qd;
        let n = self.cache.lens.len();
        if kd != vd || kd[3] != d || n != batch {
            return Err(Error::Shape {
                arg: if n != batch {
                    "cache_seqlens"
                } else {
                    "k_cache"
                },
                detail: format!(
                    "q {qd:?}, k_cache {kd:?}, v_cache {vd:?}, {n} lengths: the caches must \
                     agree with each other and with q's batch and head_dim"
                ),
            });
        }
        self.cache.check_dims("k_cache", kd, batch)?;
        let mut p = self.cache.problem(seq_q, heads_q, kd);
        p.causal = self.causal;
        p.scale = self.scale;
        p.window_left = self.window_left;
        p.softcap = self.softcap;
        p.q_strides = qs;
        p.k_strides = ks;
        p.v_strides = vs;
        let dev = place.device();
        let placed = self.cache.place(place)?;
        let alibi = opt_table(place, "alibi_slopes", self.alibi.as_ref())?;
        let sinks = opt_table(place, "sink_logits", self.sinks.as_ref())?;
        let mut ws = place.output::<f32>(p.checked_workspace_len(dev)?)?;
        let mut o = place.output::<T>(p.o_len())?;
        let mut lse = place.output::<f32>(p.lse_len())?;
        decode::forward(
            dev,
            &p,
            q,
            k,
            v,
            placed.tables(&alibi, &sinks)?,
            P::out_mut(&mut ws)?,
            P::out_mut(&mut o)?,
            P::out_mut(&mut lse)?,
        )?;
        Ok((o, Shape::from(qd.to_vec())))
    }
}

custom_op3!(DecodeAttn, "attnkit-decode");

/// The in-place append of one cache's new rows (candle lends one mutable tensor per op).
pub(super) struct AppendOp<'a> {
    cache: &'a CacheTables,
    which: Cache,
}

impl AppendOp<'_> {
    /// The argument names of this op's cache and its new rows.
    pub(super) fn args(&self) -> (&'static str, &'static str) {
        match self.which {
            Cache::Keys => ("k_cache", "k_new"),
            Cache::Values => ("v_cache", "v_new"),
        }
    }

    pub(super) fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        (cache, lc): (crate::BufMut<'_, T>, &Layout),
        (new, ln): Operand<'_, T>,
    ) -> Result<(), Error> {
        let (cache_arg, new_arg) = self.args();
        let (kd, ks) = operand::<4>(cache_arg, lc)?;
        let nd: [usize; 4] = ln.dims().try_into().map_err(|_| Error::Shape {
            arg: new_arg,
            detail: format!("dims {:?}; expected [batch, seq_q, heads_kv, d]", ln.dims()),
        })?;
        let [batch, seq_q, heads_kv, d] = nd;
        let n = self.cache.lens.len();
        if heads_kv != kd[2] || d != kd[3] || n != batch {
            return Err(Error::Shape {
                arg: if n != batch { "cache_seqlens" } else { new_arg },
                detail: format!(
                    "{new_arg} {nd:?}, {cache_arg} {kd:?}, {n} lengths: heads and head_dim as \
                     the cache's, one length per sequence"
                ),
            });
        }
        self.cache.check_dims(cache_arg, kd, batch)?;
        let mut p = self.cache.problem(seq_q, heads_kv, kd);
        p.k_strides = ks;
        p.v_strides = ks;
        let placed = self.cache.place(place)?;
        decode::append_one(
            place.device(),
            &p,
            self.which,
            new,
            placed.tables(&None, &None)?,
            cache,
        )
    }
}

impl InplaceOp2 for AppendOp<'_> {
    fn name(&self) -> &'static str {
        "attnkit-kv-cache-append"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        fn go<T: CandleElement>(
            op: &AppendOp<'_>,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            let (cache_arg, new_arg) = op.args();
            let (Some(cache), Some(new)) = (T::slice_mut(s1), T::slice(s2)) else {
                return Err(wrap(Error::Unsupported {
                    arg: new_arg,
                    detail: format!("dtype next to {cache_arg}'s: the same"),
                }));
            };
            let off = l1.start_offset();
            let len = cache.len();
            let cache = cache
                .get_mut(off..)
                .ok_or_else(|| wrap(super::place::short(cache_arg, off, len)))?;
            let new = tail(new_arg, new, l2.start_offset())?;
            op.run(&Cpu(Device::cpu()), (cache.into(), l1), (new.into(), l2))
                .map_err(wrap)
        }
        match s1 {
            CpuStorage::F32(_) => go::<f32>(self, s1, l1, s2, l2),
            CpuStorage::BF16(_) => go::<Bf16>(self, s1, l1, s2, l2),
            CpuStorage::F16(_) => go::<F16>(self, s1, l1, s2, l2),
            other => Err(wrap(Error::Unsupported {
                arg: self.args().0,
                detail: format!("{:?}; f32, f16 or bf16", other.dtype()),
            })),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::append_fwd(self, s1, l1, s2, l2)
    }
}
