//! Decode attention against the f64 oracle, on the CPU and (where present) the GPU: every
//! dtype, head dim and GQA ratio; cache lengths 0, 1, odd and very unequal in one batch; split
//! counts 1 to 64 agreeing; paged and contiguous caches agreeing; append; a StreamingLLM
//! rolling cache driven for 10x its capacity; typed errors for bad input. `logits.rs`: the
//! softcap and ALiBi; `layouts.rs`: head dims 80/112/192, page sizes 8/32, server cache
//! layouts through strides; `device_tables.rs`: device-only lengths and tables, and stale ones.
//!
//! Tolerance: f32 is tight; f16/bf16 use FlashAttention's rule, relative to a naive
//! computation in the same precision: `max|out - ref| <= 2 * max|naive_lp - ref| + 1e-3`.

mod common;
#[path = "decode/device_tables.rs"]
mod device_tables;
#[path = "decode/layouts.rs"]
mod layouts;
#[path = "decode/logits.rs"]
mod logits;

use attnkit::decode::{
    self, Decode, HEAD_DIMS, Layout, RollingCache, Rope, RopeStyle, SeqLens, Tables, oracle,
};
use attnkit::{Bf16, DType, Device, Element, F16};
use common::*;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The index arrays a call's `Tables` hold, as host slices (uploaded for a GPU): a problem's
/// own host copies ([`Idx::of`]), or those of a device-only problem.
#[derive(Clone, Copy, Debug)]
struct Idx<'a> {
    lens: &'a [i32],
    block_table: Option<&'a [i32]>,
    ring_offsets: Option<&'a [i32]>,
}

impl<'a> Idx<'a> {
    fn of(p: &Decode<'a>) -> Self {
        let lens = match p.cache_seqlens {
            SeqLens::Host(l) => l,
            SeqLens::Device { .. } => &[],
        };
        let (block_table, ring_offsets) = match &p.layout {
            Layout::Paged { block_table, .. } => (Some(block_table.unwrap_or(&[])), None),
            Layout::Rolling { ring_offsets, .. } => (None, Some(ring_offsets.unwrap_or(&[]))),
            Layout::Contiguous { .. } => (None, None),
        };
        Idx {
            lens,
            block_table,
            ring_offsets,
        }
    }

    fn host(&self) -> Tables<'a> {
        Tables {
            cache_seqlens: self.lens.into(),
            block_table: self.block_table.map(|b| b.into()),
            ring_offsets: self.ring_offsets.map(|b| b.into()),
            sink_logits: None,
            alibi_slopes: None,
        }
    }
}

/// Device copies of a problem's index arrays.
#[cfg(feature = "cuda")]
struct DeviceTables {
    lens: attnkit::cudarc::driver::CudaSlice<i32>,
    block_table: Option<attnkit::cudarc::driver::CudaSlice<i32>>,
    ring_offsets: Option<attnkit::cudarc::driver::CudaSlice<i32>>,
    sink_logits: Option<attnkit::cudarc::driver::CudaSlice<f32>>,
    alibi_slopes: Option<attnkit::cudarc::driver::CudaSlice<f32>>,
}

#[cfg(feature = "cuda")]
impl DeviceTables {
    fn new(s: &std::sync::Arc<attnkit::cudarc::driver::CudaStream>, idx: Idx<'_>) -> Self {
        DeviceTables {
            lens: s.clone_htod(idx.lens).unwrap(),
            block_table: idx.block_table.map(|b| s.clone_htod(b).unwrap()),
            ring_offsets: idx.ring_offsets.map(|r| s.clone_htod(r).unwrap()),
            sink_logits: None,
            alibi_slopes: None,
        }
    }

    fn tables(&self) -> Tables<'_> {
        Tables {
            cache_seqlens: (&self.lens).into(),
            block_table: self.block_table.as_ref().map(|b| b.into()),
            ring_offsets: self.ring_offsets.as_ref().map(|b| b.into()),
            sink_logits: self.sink_logits.as_ref().map(|b| b.into()),
            alibi_slopes: self.alibi_slopes.as_ref().map(|b| b.into()),
        }
    }
}

/// Runs `forward` on `dev` with poisoned outputs (and a poisoned workspace); uploads to and
/// downloads from the GPU when it is one.
fn run<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    run_with_sinks(dev, p, q, k, v, None)
}

/// [`run`] with learned sink logits (`[heads_q]`).
fn run_with_sinks<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    sinks: Option<&[f32]>,
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    let heads = Heads {
        sinks,
        ..Default::default()
    };
    run_with(dev, p, heads, q, k, v)
}

/// The per-head tables a run passes besides the layout's (`[heads_q]` each).
#[derive(Clone, Copy, Default)]
struct Heads<'a> {
    sinks: Option<&'a [f32]>,
    alibi: Option<&'a [f32]>,
}

/// [`run`] with per-head tables.
fn run_with<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    heads: Heads<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    run_idx(dev, p, Idx::of(p), heads, q, k, v)
}

/// [`run_with`] with the given index arrays in the call's `Tables`.
fn run_idx<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    idx: Idx<'_>,
    heads: Heads<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    let Heads { sinks, alibi } = heads;
    let mut o = poisoned::<T>(p.o_len());
    let mut lse = vec![f32::NAN; p.lse_len()];
    let mut ws = vec![f32::NAN; p.workspace_len(dev)];
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let up = |x: &[T]| s.clone_htod(x).unwrap();
        let (qd, kd, vd) = (up(q), up(k), up(v));
        let mut dt = DeviceTables::new(s, idx);
        dt.sink_logits = sinks.map(|x| s.clone_htod(x).unwrap());
        dt.alibi_slopes = alibi.map(|x| s.clone_htod(x).unwrap());
        let tables = dt.tables();
        let mut od = s.clone_htod(&o).unwrap();
        let mut ld = s.clone_htod(&lse).unwrap();
        let mut wd = s.clone_htod(&ws).unwrap();
        decode::forward(
            dev,
            p,
            (&qd).into(),
            (&kd).into(),
            (&vd).into(),
            tables,
            (&mut wd).into(),
            (&mut od).into(),
            (&mut ld).into(),
        )?;
        return Ok((s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap()));
    }
    let mut tables = idx.host();
    tables.sink_logits = sinks.map(|x| x.into());
    tables.alibi_slopes = alibi.map(|x| x.into());
    decode::forward(
        dev,
        p,
        q.into(),
        k.into(),
        v.into(),
        tables,
        (&mut ws).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )?;
    Ok((o, lse))
}

/// Runs `append` on `dev`, updating the host caches `k`, `v`.
fn run_append<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    kn: &[T],
    vn: &[T],
    k: &mut Vec<T>,
    v: &mut Vec<T>,
) -> attnkit::Result<()> {
    run_append_idx(dev, p, Idx::of(p), kn, vn, k, v)
}

/// [`run_append`] with the given index arrays in the call's `Tables`.
fn run_append_idx<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    idx: Idx<'_>,
    kn: &[T],
    vn: &[T],
    k: &mut Vec<T>,
    v: &mut Vec<T>,
) -> attnkit::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let (knd, vnd) = (s.clone_htod(kn).unwrap(), s.clone_htod(vn).unwrap());
        let dt = DeviceTables::new(s, idx);
        let tables = dt.tables();
        let (mut kd, mut vd) = (s.clone_htod(k).unwrap(), s.clone_htod(v).unwrap());
        decode::append(
            dev,
            p,
            (&knd).into(),
            (&vnd).into(),
            tables,
            (&mut kd).into(),
            (&mut vd).into(),
        )?;
        *k = s.clone_dtoh(&kd).unwrap();
        *v = s.clone_dtoh(&vd).unwrap();
        return Ok(());
    }
    decode::append(dev, p, kn.into(), vn.into(), idx.host(), k.into(), v.into())
}

/// [`decode::append_one`] of one cache (the host copy in and out), on `dev`.
fn run_append_one<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    which: decode::Cache,
    new: &[T],
    cache: &mut Vec<T>,
) -> attnkit::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let nd = s.clone_htod(new).unwrap();
        let dt = DeviceTables::new(s, Idx::of(p));
        let mut cd = s.clone_htod(cache).unwrap();
        decode::append_one(dev, p, which, (&nd).into(), dt.tables(), (&mut cd).into())?;
        *cache = s.clone_dtoh(&cd).unwrap();
        return Ok(());
    }
    let idx = Idx::of(p);
    decode::append_one(dev, p, which, new.into(), idx.host(), cache.into())
}

/// The kernels' RoPE angle and rotation in f32 (f32 frequency and product, the SFU's sin and
/// cos, two f32 products): at most `ROPE_F32_ERR * (pos + 1) * (|x_a| + |x_b|)` off the exact
/// rotation of a pair. The angle's relative error is about 12 * 2^-24 (log2 theta, exp2, the
/// product), the angle at most `pos`, sin and cos 2^-21.4 off: about 2^-20 (pos + 1); this
/// bound takes twice that.
const ROPE_F32_ERR: f64 = 1.0 / (1u64 << 19) as f64;

/// The naive computation in T's precision for one sequence (arguments as
/// [`oracle::sequence`]): f32 scores from T inputs (rotated in f64, rounded to T, as a kernel
/// that rotates a tile in place holds them), P rounded to T, f32 sums, O rounded to T.
/// Returns O `[seq_q, heads_q, d]`, LSE `[heads_q, seq_q]` (the oracle's layouts) and, per
/// LSE row, how far the kernel's LSE may be from this one by rounding alone (`lse_slack`):
///
/// The kernel rotates q and k in f32 (within [`ROPE_F32_ERR`] of the exact rotation) and
/// rounds them to T, as this naive computation does from the exact rotation. Where the f32
/// error can cross a rounding boundary of T, the two pick neighbouring T values: element c
/// of q may differ by `dq_c` (the gap to the other candidate; 0 where no boundary is within
/// reach), likewise k. A score then differs by at most
/// `|scale| (sum_c dq_c |k_c| + |q_c| dk_c + dq_c dk_c)`, plus both sides' f32 dot products
/// (`2 d 2^-24 |scale| sum_c |q_c| |k_c|`), and an LSE (1-Lipschitz in the scores) by at most
/// the largest such score difference among the keys the row sees. So the bound follows the
/// rounding actually at hand instead of a worst case, and a wrong rotation (scores off by
/// O(|q||k|)) stays far outside it.
///
/// The logit options of `x` are applied in f32 after the score, as the kernels do: the
/// softcap (1-Lipschitz, so the bound above holds through it, plus the tensor-core tanh's
/// absolute error, 2^-21 c, taken twice), the ALiBi bias (the same f32 arithmetic on both
/// sides), the window (the keys a row sees) and the sink logit.
#[allow(clippy::too_many_arguments)]
fn naive_lp<T: Element>(
    seq_q: usize,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    scale: f32,
    causal: bool,
    rope: Option<Rope>,
    x: &oracle::Logits<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let len = k.len() / (heads_kv * d);
    let group = heads_q / heads_kv;
    let round = |e: f64| T::from_f32(e as f32).to_f32();
    // (the rounded rotated vector, per element the most the kernel's rounding may differ)
    let lp = |x: &[T], pos: usize| -> (Vec<f32>, Vec<f64>) {
        // The oracle's rotation, then T's rounding.
        let x: Vec<f64> = x.iter().map(|e| e.to_f32() as f64).collect();
        let mut w = x.clone();
        let mut reach = vec![0.0f64; d];
        if let Some(r) = rope {
            oracle::rotate(&mut w, r, pos);
            for c in 0..d / 2 {
                let (a, b) = r.pair(c, d);
                let e = ROPE_F32_ERR * (pos + 1) as f64 * (x[a].abs() + x[b].abs());
                (reach[a], reach[b]) = (e, e);
            }
        }
        let vals: Vec<f32> = w.iter().map(|&e| round(e)).collect();
        let gaps = w
            .iter()
            .zip(&reach)
            .zip(&vals)
            .map(|((&e, &r), &n)| {
                let (lo, hi) = (round(e - r) as f64, round(e + r) as f64);
                (lo - n as f64).abs().max((hi - n as f64).abs())
            })
            .collect();
        (vals, gaps)
    };
    let mut out = vec![0.0; seq_q * heads_q * d];
    let mut lse = vec![f64::NEG_INFINITY; seq_q * heads_q];
    let mut slack = vec![0.0f64; seq_q * heads_q];
    for i in 0..seq_q {
        let pos = (len + i).saturating_sub(seq_q);
        let seen = if causal {
            (len + i + 1).saturating_sub(seq_q).min(len)
        } else {
            len
        };
        let start = x.window_left.map_or(0, |w| pos.saturating_sub(w)).min(seen);
        let alibi_pos = len as i64 - seq_q as i64 + i as i64;
        for h in 0..heads_q {
            let hk = h / group;
            let (qv, dq) = lp(&q[(i * heads_q + h) * d..][..d], pos);
            let mut row_slack = x.softcap.map_or(0.0, |c| c as f64 / (1u64 << 20) as f64);
            let s: Vec<f32> = (start..seen)
                .map(|j| {
                    let (kv, dk) = lp(&k[(j * heads_kv + hk) * d..][..d], j);
                    let (mut flip, mut mag) = (0.0f64, 0.0f64);
                    for c in 0..d {
                        let (qa, ka) = (qv[c].abs() as f64, kv[c].abs() as f64);
                        flip += dq[c] * ka + qa * dk[c] + dq[c] * dk[c];
                        mag += (qa + dq[c]) * (ka + dk[c]);
                    }
                    let dot_err = 2.0 * d as f64 * f32::EPSILON as f64 / 2.0 * mag;
                    row_slack = row_slack.max(scale.abs() as f64 * (flip + dot_err));
                    let mut s = qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                    if let Some(c) = x.softcap {
                        s = c * (s / c).tanh();
                    }
                    if let Some(sl) = x.alibi_slopes {
                        s -= sl[h] * (alibi_pos - j as i64).abs() as f32;
                    }
                    s
                })
                .collect();
            let sink = x.sink_logits.map(|sl| sl[h]);
            if sink == Some(f32::INFINITY) {
                lse[h * seq_q + i] = f64::INFINITY;
                continue;
            }
            let mx = s
                .iter()
                .copied()
                .fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
            if mx == f32::NEG_INFINITY {
                continue;
            }
            slack[h * seq_q + i] = row_slack;
            let pr: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
            let l: f32 = pr.iter().sum::<f32>() + sink.map_or(0.0, |sk| (sk - mx).exp());
            lse[h * seq_q + i] = (mx + l.ln()) as f64;
            for c in 0..d {
                let acc: f32 = pr
                    .iter()
                    .zip(start..)
                    .map(|(pj, j)| {
                        T::from_f32(*pj).to_f32() * v[(j * heads_kv + hk) * d + c].to_f32()
                    })
                    .sum();
                out[(i * heads_q + h) * d + c] = T::from_f32(acc / l).to_f32() as f64;
            }
        }
    }
    (out, lse, slack)
}

/// Contiguous `[seq_q, heads_q, d]` rows of sequence `b` of q (read through its strides).
fn q_rows<T: Element>(p: &Decode<'_>, q: &[T], b: usize) -> Vec<T> {
    let (s, d) = (&p.q_strides, p.head_dim);
    (0..p.seq_q * p.heads_q)
        .flat_map(|r| {
            let off = b * s.batch + (r / p.heads_q) * s.row + (r % p.heads_q) * s.head;
            q[off..off + d].to_vec()
        })
        .collect()
}

/// Compares o (contiguous) and lse of a run with the oracle, sequence by sequence.
/// `keys(b)` gives sequence b's logical K and V (contiguous `[len, heads_kv, d]`).
fn check<T: Element>(
    what: &str,
    p: &Decode<'_>,
    q: &[T],
    keys: &dyn Fn(usize) -> (Vec<T>, Vec<T>),
    o: &[T],
    lse: &[f32],
) {
    check_with(what, p, Heads::default(), q, keys, o, lse)
}

/// [`check`] of a run with per-head tables (the oracle applies them from their definitions).
fn check_with<T: Element>(
    what: &str,
    p: &Decode<'_>,
    heads: Heads<'_>,
    q: &[T],
    keys: &dyn Fn(usize) -> (Vec<T>, Vec<T>),
    o: &[T],
    lse: &[f32],
) {
    let (err, bound, first_bad, lse_bad) = check_errors(what, p, heads, q, keys, o, lse);
    assert!(
        err <= bound,
        "{what}: max |o - ref| = {err:e} > {bound:e} (first at b, index, got, want = {first_bad:?})"
    );
    assert_eq!(lse_bad, 0, "{what}: {lse_bad} LSE values off");
}

type FirstBad = Option<(usize, usize, f64, f64)>;

/// [`check`]'s measurements: the largest O error, its bound, where it was, and how many LSE
/// values are out of their tolerance. LSE tolerance: `2e-4 (1 + |lse|)` for the f32 softmax
/// and, where q and k are rounded after RoPE (or the layout has none but T is not f32),
/// the naive same-precision LSE's own distance to the oracle plus [`naive_lp`]'s slack for
/// the kernel's rounding.
fn check_errors<T: Element>(
    what: &str,
    p: &Decode<'_>,
    heads: Heads<'_>,
    q: &[T],
    keys: &dyn Fn(usize) -> (Vec<T>, Vec<T>),
    o: &[T],
    lse: &[f32],
) -> (f64, f64, FirstBad, usize) {
    let (sq, hq, d) = (p.seq_q, p.heads_q, p.head_dim);
    let rope = match &p.layout {
        Layout::Rolling { rope, .. } => Some(*rope),
        _ => None,
    };
    let (mut err, mut lp_err) = (0.0f64, 0.0f64);
    let mut first_bad = None;
    let mut lse_bad = 0;
    let x = oracle::Logits {
        window_left: p.window_left,
        softcap: p.softcap,
        alibi_slopes: heads.alibi,
        sink_logits: heads.sinks,
    };
    for b in 0..p.batch() {
        let (k, v) = keys(b);
        let qb = q_rows(p, q, b);
        let args = (sq, hq, p.heads_kv, d, p.softmax_scale(), p.causal, rope);
        let (want, want_lse) = oracle::sequence_with(
            args.0, args.1, args.2, args.3, args.4, args.5, args.6, &x, &qb, &k, &v,
        );
        // Per LSE row, what rounding allows beyond the f32 softmax's 2e-4 (1 + |lse|).
        let mut lse_round = vec![0.0f64; want_lse.len()];
        if T::DTYPE != DType::F32 || rope.is_some() {
            // naive_lp models the same options (window, softcap, ALiBi, sinks): its bound is
            // that of the problem at hand.
            let (lp, lp_lse, slack) = naive_lp(
                args.0, args.1, args.2, args.3, args.4, args.5, args.6, &x, &qb, &k, &v,
            );
            // The LSE too sees Q and K rounded to T (after RoPE), as the tensor cores do:
            // the naive rounding's own error, and how far the kernel's may differ from it.
            for (r, ((x, w), s)) in lse_round
                .iter_mut()
                .zip(lp_lse.iter().zip(&want_lse).zip(&slack))
            {
                if w.is_finite() {
                    *r = (x - w).abs() + s;
                }
            }
            lp_err = lp
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(lp_err, f64::max);
        }
        let base = b * sq * hq * d;
        for (idx, w) in want.iter().enumerate() {
            let g = o[base + idx].to_f32() as f64;
            let e = (g - w).abs();
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > err {
                err = e;
                first_bad = Some((b, idx, g, *w));
            }
        }
        for (idx, &wl) in want_lse.iter().enumerate() {
            let gl = lse[b * hq * sq + idx] as f64;
            let ok = if wl.is_infinite() {
                gl == wl
            } else {
                (gl - wl).abs() <= 2e-4 * (1.0 + wl.abs()) + lse_round[idx]
            };
            if !ok {
                if lse_bad < 5 {
                    eprintln!(
                        "{what}: lse mismatch at b={b} [h,i]={idx}: got {gl}, want {wl} \
                         (rounding allows {:e})",
                        lse_round[idx]
                    );
                }
                lse_bad += 1;
            }
        }
    }
    let bound = if T::DTYPE == DType::F32 {
        // RoPE angles: the GPU computes them in f32 (a relative error of 2^-24 * position).
        if rope.is_some() { 1e-4 } else { 2e-5 }
    } else {
        2.0 * lp_err + 1e-3
    };
    (err, bound, first_bad, lse_bad)
}

/// Keys of a contiguous cache, through the oracle's own reader.
fn contiguous_keys<'a, T: Element>(
    p: &'a Decode<'a>,
    k: &'a [T],
    v: &'a [T],
) -> impl Fn(usize) -> (Vec<T>, Vec<T>) + 'a {
    move |b| {
        (
            oracle::gather(p, &p.k_strides, k, b),
            oracle::gather(p, &p.v_strides, v, b),
        )
    }
}

fn contiguous_case<T: Element>(
    rng: &mut StdRng,
    dev: &Device,
    lens: &[i32],
    seq_q: usize,
    heads: (usize, usize),
    d: usize,
    splits: Option<usize>,
) {
    let cap = (*lens.iter().max().unwrap() as usize).max(1) + 3;
    let mut p = Decode::new(
        lens,
        seq_q,
        heads.0,
        heads.1,
        d,
        Layout::Contiguous { capacity: cap },
    );
    p.num_splits = splits;
    let n_kv = lens.len() * cap * heads.1 * d;
    let (q, k, v) = (
        random::<T>(rng, p.o_len()),
        random::<T>(rng, n_kv),
        random::<T>(rng, n_kv),
    );
    let (o, lse) = run(dev, &p, &q, &k, &v).unwrap();
    let what = format!(
        "{} {} lens={lens:?} sq={seq_q} h={heads:?} d={d} splits={splits:?}",
        dev.name(),
        T::DTYPE
    );
    check(&what, &p, &q, &contiguous_keys(&p, &k, &v), &o, &lse);
}

fn every_dim_and_gqa_ratio<T: Element>(test: &str) {
    let mut rng = rng(test);
    for dev in devices(test) {
        for d in HEAD_DIMS {
            // GQA ratios 1, 4, 8 with two KV heads (a wrong head map cannot pass by luck);
            // lengths 0, 1, odd, and very unequal in one batch.
            for (ratio, seq_q, lens) in [
                (1, 1, &[0, 1, 77, 1000][..]),
                (4, 3, &[130, 2, 0][..]),
                (8, 16, &[5, 300][..]),
            ] {
                contiguous_case::<T>(&mut rng, &dev, lens, seq_q, (2 * ratio, 2), d, Some(3));
            }
        }
    }
}

#[test]
fn f32_every_head_dim_and_gqa_ratio() {
    every_dim_and_gqa_ratio::<f32>("f32_every_head_dim_and_gqa_ratio");
}

#[test]
fn f16_every_head_dim_and_gqa_ratio() {
    every_dim_and_gqa_ratio::<F16>("f16_every_head_dim_and_gqa_ratio");
}

#[test]
fn bf16_every_head_dim_and_gqa_ratio() {
    every_dim_and_gqa_ratio::<Bf16>("bf16_every_head_dim_and_gqa_ratio");
}

#[test]
fn non_causal_heuristic_splits_and_custom_scale() {
    let mut rng = rng("non_causal_heuristic_splits_and_custom_scale");
    for dev in devices("non_causal_heuristic_splits_and_custom_scale") {
        let lens = [2000, 3, 700];
        let mut p = Decode::new(&lens, 4, 8, 2, 128, Layout::Contiguous { capacity: 2048 })
            .causal(false)
            .scale(0.3);
        p.q_strides.row = 8 * 128 + 64; // padded q rows
        p.q_strides.batch = 4 * p.q_strides.row;
        let q = random::<Bf16>(&mut rng, 3 * p.q_strides.batch);
        let n_kv = 3 * 2048 * 2 * 128;
        let (k, v) = (
            random::<Bf16>(&mut rng, n_kv),
            random::<Bf16>(&mut rng, n_kv),
        );
        eprintln!("heuristic: {} splits on {}", p.splits_for(&dev), dev.name());
        let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
        check(
            "non-causal bf16",
            &p,
            &q,
            &contiguous_keys(&p, &k, &v),
            &o,
            &lse,
        );
    }
}

#[test]
fn split_counts_1_to_64_agree() {
    let mut rng = rng("split_counts_1_to_64_agree");
    for dev in devices("split_counts_1_to_64_agree") {
        // Lengths that are not multiples of a split's 64-key granule, and one of 0.
        let lens = [4000, 1, 2333, 0];
        let cap = 4096;
        let base = Decode::new(&lens, 2, 4, 1, 64, Layout::Contiguous { capacity: cap });
        let n_kv = lens.len() * cap * 64;
        let q = random::<f32>(&mut rng, base.o_len());
        let (k, v) = (random::<f32>(&mut rng, n_kv), random::<f32>(&mut rng, n_kv));
        let (o1, lse1) = run(&dev, &base.clone().splits(1), &q, &k, &v).unwrap();
        check(
            "splits=1",
            &base,
            &q,
            &contiguous_keys(&base, &k, &v),
            &o1,
            &lse1,
        );
        for splits in 2..=64 {
            let p = base.clone().splits(splits);
            let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
            for (i, (a, b)) in o.iter().zip(&o1).enumerate() {
                assert!((a - b).abs() <= 2e-6, "splits={splits}: o[{i}] {a} vs {b}");
            }
            for (i, (a, b)) in lse.iter().zip(&lse1).enumerate() {
                let same = a == b || (a - b).abs() <= 2e-6 * (1.0 + b.abs());
                assert!(same, "splits={splits}: lse[{i}] {a} vs {b}");
            }
        }
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // (b, h, i) index three layouts at once
fn learned_sink_logits_one_split_and_many() {
    let mut rng = rng("learned_sink_logits_one_split_and_many");
    let sinks = [0.3f32, f32::NEG_INFINITY, f32::INFINITY, 2.0];
    for dev in devices("learned_sink_logits_one_split_and_many") {
        // Lengths 0 (a row with only the sink) and ones that are not split multiples.
        let lens = [700, 0, 129];
        let cap = 768;
        for splits in [1, 5] {
            let p = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: cap })
                .splits(splits);
            let n_kv = lens.len() * cap * 2 * 64;
            let q = random::<f32>(&mut rng, p.o_len());
            let (k, v) = (random::<f32>(&mut rng, n_kv), random::<f32>(&mut rng, n_kv));
            let (o0, lse0) = run(&dev, &p, &q, &k, &v).unwrap();
            check("no sinks", &p, &q, &contiguous_keys(&p, &k, &v), &o0, &lse0);
            let (o, lse) = run_with_sinks(&dev, &p, &q, &k, &v, Some(&sinks)).unwrap();
            // The definition: the softmax over the keys and the sink, in f64, from the run
            // without sinks: LSE' = logaddexp(LSE, s), O' = O exp(LSE - LSE').
            for b in 0..lens.len() {
                for h in 0..4 {
                    for i in 0..2 {
                        let r = (b * 4 + h) * 2 + i;
                        let (l0, s) = (lse0[r] as f64, sinks[h] as f64);
                        let (want_lse, f) = if s == f64::INFINITY {
                            (f64::INFINITY, 0.0)
                        } else if l0 == f64::NEG_INFINITY || s == f64::NEG_INFINITY {
                            (l0.max(s), if l0 == f64::NEG_INFINITY { 0.0 } else { 1.0 })
                        } else {
                            let m = l0.max(s);
                            let l = m + ((l0 - m).exp() + (s - m).exp()).ln();
                            (l, (l0 - l).exp())
                        };
                        let got = lse[r] as f64;
                        let ok = if want_lse.is_infinite() {
                            got == want_lse
                        } else {
                            (got - want_lse).abs() <= 1e-5 * (1.0 + want_lse.abs())
                        };
                        assert!(
                            ok,
                            "splits={splits} b={b} h={h} i={i}: lse {got} want {want_lse}"
                        );
                        let off = ((b * 2 + i) * 4 + h) * 64;
                        for c in 0..64 {
                            let want = o0[off + c] as f64 * f;
                            assert!(
                                (o[off + c] as f64 - want).abs() <= 1e-5,
                                "splits={splits} b={b} h={h} i={i} c={c}: o {} want {want}",
                                o[off + c]
                            );
                        }
                    }
                }
            }
        }
        // The wrong number of logits is a typed error naming them.
        let p = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: cap });
        let z = vec![0f32; lens.len() * cap * 2 * 64];
        let e = run_with_sinks(&dev, &p, &z[..p.o_len()], &z, &z, Some(&sinks[..3])).unwrap_err();
        assert_eq!(e.arg(), Some("sink_logits"), "{e}");
    }
}

#[test]
fn sliding_window_with_sink_logits_like_gpt_oss() {
    let mut rng = rng("sliding_window_with_sink_logits_like_gpt_oss");
    for dev in devices("sliding_window_with_sink_logits_like_gpt_oss") {
        // Lengths below, at and past the window; not multiples of a tile or a split.
        let lens = [700, 3, 129, 0];
        let cap = 768;
        for (window, splits) in [(0usize, 1usize), (50, 1), (50, 5), (127, 3), (5000, 2)] {
            let p = Decode::new(&lens, 3, 4, 2, 64, Layout::Contiguous { capacity: cap })
                .window(Some(window))
                .splits(splits);
            let n_kv = lens.len() * cap * 2 * 64;
            let q = random::<f32>(&mut rng, p.o_len());
            let (k, v) = (random::<f32>(&mut rng, n_kv), random::<f32>(&mut rng, n_kv));
            let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
            let what = format!("window {window} splits {splits}");
            check(&what, &p, &q, &contiguous_keys(&p, &k, &v), &o, &lse);
            // The window with learned sinks (gpt-oss's sliding layers) runs too: the sink
            // folding itself is checked against its definition in the test above.
            let sinks = [0.5f32, -1.0, 2.0, 0.0];
            let (o2, lse2) = run_with_sinks(&dev, &p, &q, &k, &v, Some(&sinks)).unwrap();
            assert!(
                o2.iter().all(|x| x.is_finite()) && lse2.iter().all(|x| !x.is_nan()),
                "{what}"
            );
        }
        // A rolling cache is its own window.
        let rc = RollingCache::new(
            1,
            4,
            60,
            Rope {
                style: RopeStyle::NeoX,
                theta: 10000.0,
            },
        )
        .unwrap();
        let offs = rc.ring_offsets();
        let lens = rc.cache_seqlens();
        let p = Decode::new(&lens, 1, 1, 1, 64, rc.layout(&offs)).window(Some(10));
        let z = vec![0f32; 64 * 64];
        assert_eq!(
            run(&dev, &p, &z[..64], &z, &z).unwrap_err().arg(),
            Some("window_left")
        );
    }
}

/// Scatters a contiguous cache `[batch, cap, hk, d]` into `pages` of `page_size` rows under a
/// random block table; returns (paged k, paged v, block table, pages per sequence).
fn paginate<T: Element>(
    rng: &mut StdRng,
    k: &[T],
    v: &[T],
    batch: usize,
    cap: usize,
    row: usize,
    page_size: usize,
) -> (Vec<T>, Vec<T>, Vec<i32>, usize) {
    let per = cap.div_ceil(page_size);
    let n_pages = batch * per + 3; // spare pages that nobody uses
    let mut ids: Vec<i32> = (0..n_pages as i32).collect();
    ids.shuffle(rng);
    let table: Vec<i32> = ids[..batch * per].to_vec();
    let mut pk = poisoned::<T>(n_pages * page_size * row);
    let mut pv = poisoned::<T>(n_pages * page_size * row);
    for b in 0..batch {
        for j in 0..cap {
            let page = table[b * per + j / page_size] as usize;
            let dst = (page * page_size + j % page_size) * row;
            let src = (b * cap + j) * row;
            pk[dst..dst + row].copy_from_slice(&k[src..src + row]);
            pv[dst..dst + row].copy_from_slice(&v[src..src + row]);
        }
    }
    (pk, pv, table, per)
}

#[test]
fn paged_and_contiguous_caches_agree() {
    let mut rng = rng("paged_and_contiguous_caches_agree");
    for dev in devices("paged_and_contiguous_caches_agree") {
        // 8 and 32: vLLM's other block sizes (a 64-key tile spans 8 or 2 pages); 48: pages
        // that tiles and splits start inside.
        for page_size in [8, 16, 32, 48, 256] {
            // Lengths that are not page multiples; cap a multiple of no page size.
            let lens = [1, 517, 0, 100];
            let (cap, hk, d) = (520, 2, 128);
            let cont =
                Decode::new(&lens, 2, 8, hk, d, Layout::Contiguous { capacity: cap }).splits(2);
            let n_kv = lens.len() * cap * hk * d;
            let q = random::<Bf16>(&mut rng, cont.o_len());
            let (k, v) = (
                random::<Bf16>(&mut rng, n_kv),
                random::<Bf16>(&mut rng, n_kv),
            );
            let (pk, pv, table, per) =
                paginate(&mut rng, &k, &v, lens.len(), cap, hk * d, page_size);
            let layout = Layout::Paged {
                page_size,
                num_pages: pk.len() / (page_size * hk * d),
                block_table: Some(&table),
                pages_per_seq: per,
            };
            let paged = Decode::new(&lens, 2, 8, hk, d, layout).splits(2);
            let (oc, lc) = run(&dev, &cont, &q, &k, &v).unwrap();
            let (op, lp) = run(&dev, &paged, &q, &pk, &pv).unwrap();
            let what = format!("{} paged page_size={page_size}", dev.name());
            check(
                &what,
                &paged,
                &q,
                &contiguous_keys(&paged, &pk, &pv),
                &op,
                &lp,
            );
            // The same arithmetic on the same keys: bit-identical results.
            assert!(
                oc.iter()
                    .zip(&op)
                    .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()),
                "{what}: o differs from the contiguous cache's"
            );
            assert!(
                lc.iter().zip(&lp).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: lse differs"
            );
        }
    }
}

#[test]
fn append_fills_contiguous_and_paged_caches_in_place() {
    let mut rng = rng("append_fills_contiguous_and_paged_caches_in_place");
    for dev in devices("append_fills_contiguous_and_paged_caches_in_place") {
        let (batch, hk, hq, d, cap, page) = (3, 2, 4, 64, 64, 16);
        let row = hk * d;
        let per = cap / page;
        let table: Vec<i32> = (0..(batch * per) as i32).rev().collect();
        let mut ck = poisoned::<F16>(batch * cap * row);
        let mut cv = poisoned::<F16>(batch * cap * row);
        let mut pk = poisoned::<F16>(batch * cap * row);
        let mut pv = poisoned::<F16>(batch * cap * row);
        // The stream of all tokens, to check against.
        let mut hist_k = vec![Vec::new(); batch];
        let mut hist_v = vec![Vec::new(); batch];
        let mut lens = vec![0i32; batch];
        for step in 0..12 {
            let seq_q = rng.random_range(1..=5usize);
            // Sequences grow at different rates: only sequence 0 gets all steps' tokens, the
            // rest stop once full.
            if lens.iter().any(|&l| l as usize + seq_q > cap) {
                break;
            }
            lens.iter_mut().for_each(|l| *l += seq_q as i32);
            let cont = Decode::new(
                &lens,
                seq_q,
                hq,
                hk,
                d,
                Layout::Contiguous { capacity: cap },
            );
            let paged_layout = Layout::Paged {
                page_size: page,
                num_pages: batch * per,
                block_table: Some(&table),
                pages_per_seq: per,
            };
            let paged = Decode::new(&lens, seq_q, hq, hk, d, paged_layout);
            let kn = random::<F16>(&mut rng, cont.new_kv_len());
            let vn = random::<F16>(&mut rng, cont.new_kv_len());
            for b in 0..batch {
                hist_k[b].extend_from_slice(&kn[b * seq_q * row..(b + 1) * seq_q * row]);
                hist_v[b].extend_from_slice(&vn[b * seq_q * row..(b + 1) * seq_q * row]);
            }
            run_append(&dev, &cont, &kn, &vn, &mut ck, &mut cv).unwrap();
            run_append(&dev, &paged, &kn, &vn, &mut pk, &mut pv).unwrap();
            let q = random::<F16>(&mut rng, cont.o_len());
            let keys = |b: usize| (hist_k[b].clone(), hist_v[b].clone());
            for (name, p, k, v) in [("contiguous", &cont, &ck, &cv), ("paged", &paged, &pk, &pv)] {
                let (o, lse) = run(&dev, p, &q, k, v).unwrap();
                check(
                    &format!("{} append {name} step {step}", dev.name()),
                    p,
                    &q,
                    &keys,
                    &o,
                    &lse,
                );
            }
        }
        // Rows past every sequence's length were never written.
        for b in 0..batch {
            let tail = &ck[(b * cap + lens[b] as usize) * row..(b + 1) * cap * row];
            assert!(
                tail.iter().all(|x| x.to_f32().is_nan()),
                "written past the length"
            );
        }
    }
}

fn rolling<T: Element>(test: &str, style: RopeStyle) {
    let mut rng = rng(test);
    for dev in devices(test) {
        let (batch, hq, hk, d) = (2, 4, 1, 64);
        let (n_sink, window) = (4, 60);
        let rope = Rope {
            style,
            theta: 10000.0,
        };
        let mut cache = RollingCache::new(batch, n_sink, window, rope).unwrap();
        let cap = cache.capacity();
        let row = hk * d;
        let mut k = poisoned::<T>(batch * cap * row);
        let mut v = poisoned::<T>(batch * cap * row);
        let mut hist_k: Vec<Vec<T>> = vec![Vec::new(); batch];
        let mut hist_v: Vec<Vec<T>> = vec![Vec::new(); batch];
        let mut step = 0;
        while cache.seen(0) < 10 * cap as u64 {
            let seq_q = rng.random_range(1..=4usize);
            cache.advance(seq_q).unwrap();
            let (lens, offs) = (cache.cache_seqlens(), cache.ring_offsets());
            let p = Decode::new(&lens, seq_q, hq, hk, d, cache.layout(&offs)).splits(1 + step % 3);
            let kn = random::<T>(&mut rng, p.new_kv_len());
            let vn = random::<T>(&mut rng, p.new_kv_len());
            for b in 0..batch {
                hist_k[b].extend_from_slice(&kn[b * seq_q * row..(b + 1) * seq_q * row]);
                hist_v[b].extend_from_slice(&vn[b * seq_q * row..(b + 1) * seq_q * row]);
            }
            run_append(&dev, &p, &kn, &vn, &mut k, &mut v).unwrap();
            // Check every few steps (and every step around the first wrap-around).
            if step % 7 == 0 || (cap as u64..cap as u64 + 8).contains(&cache.seen(0)) {
                let q = random::<T>(&mut rng, p.o_len());
                let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
                // The oracle reads the tokens the cache should have kept, from the stream,
                // at positions 0.. in kept order.
                let keys = |b: usize| {
                    let pick = |h: &Vec<T>| -> Vec<T> {
                        cache
                            .kept(b)
                            .iter()
                            .flat_map(|&t| h[t as usize * row..(t as usize + 1) * row].to_vec())
                            .collect()
                    };
                    (pick(&hist_k[b]), pick(&hist_v[b]))
                };
                let what = format!(
                    "{} rolling {style:?} {} seen {}",
                    dev.name(),
                    T::DTYPE,
                    cache.seen(0)
                );
                check(&what, &p, &q, &keys, &o, &lse);
            }
            step += 1;
        }
    }
}

#[test]
fn rolling_cache_for_10x_capacity_neox_f32() {
    rolling::<f32>("rolling_cache_for_10x_capacity_neox_f32", RopeStyle::NeoX);
}

#[test]
fn rolling_cache_for_10x_capacity_interleaved_bf16() {
    rolling::<Bf16>(
        "rolling_cache_for_10x_capacity_interleaved_bf16",
        RopeStyle::Interleaved,
    );
}

fn expect_err<T>(r: attnkit::Result<T>, arg: &str) {
    match r {
        Err(e) => assert_eq!(e.arg(), Some(arg), "wrong argument named: {e}"),
        Ok(_) => panic!("expected an error naming `{arg}`"),
    }
}

#[test]
fn bad_input_is_a_typed_error_naming_the_argument() {
    for dev in devices("bad_input_is_a_typed_error_naming_the_argument") {
        let lens = [20, 3];
        let cap = 32;
        let p = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: cap });
        let q = vec![0.5f32; p.o_len()];
        let kv = vec![0.5f32; 2 * cap * 2 * 64];
        let f = |p: &Decode<'_>, q: &[f32], k: &[f32]| run(&dev, p, q, k, &kv);
        expect_err(f(&p, &q[1..], &kv), "q");
        expect_err(f(&p, &q, &kv[1..]), "k_cache");
        expect_err(run(&dev, &p, &q, &kv, &kv[1..]), "v_cache");
        expect_err(
            f(
                &Decode::new(&[33, 3], 2, 4, 2, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "cache_seqlens",
        );
        expect_err(
            f(
                &Decode::new(&[-1, 3], 2, 4, 2, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "cache_seqlens",
        );
        expect_err(
            f(
                &Decode::new(&[], 2, 4, 2, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "cache_seqlens",
        );
        expect_err(
            f(
                &Decode::new(&lens, 17, 4, 2, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "seq_q",
        );
        expect_err(
            f(
                &Decode::new(&lens, 0, 4, 2, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "seq_q",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 3, 64, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "heads_kv",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 96, Layout::Contiguous { capacity: cap }),
                &q,
                &kv,
            ),
            "head_dim",
        );
        expect_err(f(&p.clone().scale(f32::INFINITY), &q, &kv), "scale");
        expect_err(f(&p.clone().splits(0), &q, &kv), "num_splits");
        expect_err(f(&p.clone().splits(65), &q, &kv), "num_splits");
        let mut overlap = p.clone();
        overlap.o_strides.head = 0;
        expect_err(f(&overlap, &q, &kv), "o");
        let mut strided = p.clone();
        strided.k_strides.dim = 2;
        expect_err(f(&strided, &q, &kv), "k_cache");
        // Too small a workspace (keys enough for both its splits).
        let long = [300, 3];
        let split = Decode::new(&long, 2, 4, 2, 64, Layout::Contiguous { capacity: 320 }).splits(2);
        let kv_long = vec![0.5f32; 2 * 320 * 2 * 64];
        let mut ws = vec![0f32; split.workspace_len(&dev) - 1];
        let mut o = vec![0f32; p.o_len()];
        let mut lse = vec![0f32; p.lse_len()];
        if !dev.is_cuda() {
            let r = decode::forward(
                &dev,
                &split,
                (&q).into(),
                (&kv_long).into(),
                (&kv_long).into(),
                Tables::host(&split),
                (&mut ws).into(),
                (&mut o).into(),
                (&mut lse).into(),
            );
            expect_err(r, "workspace");
        }
        // Paged: page size, block table entries out of range, table of the wrong size.
        let paged = |ps: usize, table: &'static [i32], pages: usize| Layout::Paged {
            page_size: ps,
            num_pages: pages,
            block_table: Some(table),
            pages_per_seq: 2,
        };
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, paged(12, &[0, 1, 2, 3], 4)),
                &q,
                &kv,
            ),
            "page_size",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, paged(16, &[0, 4, 2, 3], 4)),
                &q,
                &kv,
            ),
            "block_table",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, paged(16, &[0, -1, 2, 3], 4)),
                &q,
                &kv,
            ),
            "block_table",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, paged(16, &[0, 1, 2], 4)),
                &q,
                &kv,
            ),
            "block_table",
        );
        // An entry past a sequence's pages is never read: -1 there is fine.
        f(
            &Decode::new(&lens, 2, 4, 2, 64, paged(16, &[0, 1, 2, -1], 4)),
            &q,
            &kv,
        )
        .unwrap();
        // Rolling: ring offset of a ring that is not full, or past the window.
        let rope = Rope {
            style: RopeStyle::NeoX,
            theta: 1e4,
        };
        let rolling = |offs: &'static [i32], theta: f32| Layout::Rolling {
            n_sink: 2,
            window: 30,
            ring_offsets: Some(offs),
            rope: Rope { theta, ..rope },
        };
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, rolling(&[1, 0], 1e4)),
                &q,
                &kv,
            ),
            "ring_offsets",
        );
        expect_err(
            f(
                &Decode::new(&[32, 3], 2, 4, 2, 64, rolling(&[30, 0], 1e4)),
                &q,
                &kv,
            ),
            "ring_offsets",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, rolling(&[0], 1e4)),
                &q,
                &kv,
            ),
            "ring_offsets",
        );
        expect_err(
            f(
                &Decode::new(&lens, 2, 4, 2, 64, rolling(&[0, 0], 0.5)),
                &q,
                &kv,
            ),
            "rope",
        );
        assert!(
            RollingCache::new(1, 2, 3, rope)
                .unwrap()
                .advance(4)
                .is_err()
        );
    }
}

#[test]
fn appending_past_capacity_is_an_error_and_writes_nothing() {
    for dev in devices("appending_past_capacity_is_an_error_and_writes_nothing") {
        let cap = 32;
        let new = vec![1.0f32; 2 * 3 * 64];
        let mut k = vec![f32::NAN; 2 * cap * 64];
        let mut v = vec![f32::NAN; 2 * cap * 64];
        let over = Decode::new(&[33, 3], 3, 1, 1, 64, Layout::Contiguous { capacity: cap });
        expect_err(
            run_append(&dev, &over, &new, &new, &mut k, &mut v),
            "cache_seqlens",
        );
        // A length below the new tokens' count cannot hold them.
        let under = Decode::new(&[2, 3], 3, 1, 1, 64, Layout::Contiguous { capacity: cap });
        expect_err(
            run_append(&dev, &under, &new, &new, &mut k, &mut v),
            "cache_seqlens",
        );
        let table = [0, 5];
        let paged = Decode::new(
            &[20, 3],
            3,
            1,
            1,
            64,
            Layout::Paged {
                page_size: 16,
                num_pages: 4,
                block_table: Some(&table[..]),
                pages_per_seq: 1,
            },
        );
        expect_err(
            run_append(&dev, &paged, &new, &new, &mut k, &mut v),
            "cache_seqlens",
        );
        let paged = Decode::new(
            &[15, 3],
            3,
            1,
            1,
            64,
            Layout::Paged {
                page_size: 16,
                num_pages: 4,
                block_table: Some(&table[..]),
                pages_per_seq: 1,
            },
        );
        expect_err(
            run_append(&dev, &paged, &new, &new, &mut k, &mut v),
            "block_table",
        );
        expect_err(
            run_append(
                &dev,
                &Decode::new(&[4, 3], 3, 1, 1, 64, Layout::Contiguous { capacity: cap }),
                &new[1..],
                &new,
                &mut k,
                &mut v,
            ),
            "k_new",
        );
        assert!(
            k.iter().chain(&v).all(|x| x.is_nan()),
            "a failed append wrote"
        );
    }
}

#[test]
fn heuristic_splits_stay_in_range_and_fill_the_machine() {
    for batch in [1, 2, 8, 64] {
        for len in [0, 1, 4096, 32768, 131072] {
            let s = decode::num_splits(batch, 8, 1, len, 132);
            assert!((1..=decode::MAX_SPLITS).contains(&s));
            if len >= 32768 && batch * 8 < 132 {
                assert!(
                    batch * 8 * s >= 132,
                    "b={batch} len={len}: {s} splits leave SMs idle"
                );
            }
        }
    }
    assert_eq!(decode::num_splits(64, 8, 1, 131072, 132), 1);
}

/// Issue 13, item 1: the size helpers users call to size buffers saturate instead of
/// panicking (overflow checks are on in tests), and the call rejects such a problem.
#[test]
fn size_helpers_saturate_and_calls_reject_the_problem() {
    let dev = Device::cpu();
    let huge = Layout::Contiguous {
        capacity: usize::MAX,
    };
    let p = Decode::new(&[1], 16, usize::MAX, 1, 256, huge);
    assert_eq!(p.o_len(), usize::MAX);
    assert_eq!(p.lse_len(), usize::MAX);
    assert_eq!(p.capacity(), usize::MAX);
    let _ = (p.new_kv_len(), p.workspace_len(&dev), p.splits_for(&dev));
    let _ = p.keys_per_split(0);
    let r = Rope {
        style: RopeStyle::NeoX,
        theta: 1e4,
    };
    let rolling = Layout::Rolling {
        n_sink: usize::MAX,
        window: usize::MAX,
        ring_offsets: Some(&[0]),
        rope: r,
    };
    assert_eq!(
        Decode::new(&[1], 1, 1, 1, 64, rolling).capacity(),
        usize::MAX
    );
    let m = usize::MAX;
    assert!((1..=decode::MAX_SPLITS).contains(&decode::num_splits(m, m, m, m, m)));
    assert_eq!(decode::workspace_len(m, m, m, m, m), usize::MAX);
    let z = vec![0f32; 64];
    let mut o = vec![0f32; 64];
    let mut l = vec![0f32; 1];
    let mut ws = vec![0f32; 1];
    let e = decode::forward(
        &dev,
        &p,
        (&z).into(),
        (&z).into(),
        (&z).into(),
        Tables::host(&p),
        (&mut ws).into(),
        (&mut o).into(),
        (&mut l).into(),
    )
    .unwrap_err();
    assert_eq!(e.arg(), Some("heads_q"), "{e}");
}

/// Issue 13, item 7: a cache longer than MAX_CAPACITY is refused (the kernels' int32 key
/// indices run a tile past the last key), even where the buffers would allow it.
#[test]
fn caches_past_max_capacity_are_refused() {
    let dev = Device::cpu();
    let cap = decode::MAX_CAPACITY + 1;
    let mut p = Decode::new(&[5], 1, 1, 1, 64, Layout::Contiguous { capacity: cap });
    // Every key row at one place: the buffers are small, the capacity is not.
    p.k_strides.row = 0;
    p.v_strides.row = 0;
    let z = vec![0.5f32; 64];
    expect_err(run(&dev, &p, &z, &z, &z), "capacity");
    p.layout = Layout::Contiguous {
        capacity: decode::MAX_CAPACITY,
    };
    run(&dev, &p, &z, &z, &z).unwrap();
}

/// Issue 13, item 2: RollingCache::new validates `batch` against MAX_BATCH before it
/// allocates per sequence.
#[test]
fn rolling_cache_batch_is_bounded_before_allocating() {
    let r = Rope {
        style: RopeStyle::NeoX,
        theta: 1e4,
    };
    for batch in [usize::MAX, decode::MAX_BATCH + 1] {
        expect_err(RollingCache::new(batch, 4, 60, r), "batch");
    }
    assert!(RollingCache::new(decode::MAX_BATCH, 4, 60, r).is_ok());
    expect_err(RollingCache::new(1, decode::MAX_CAPACITY, 1, r), "window");
}

/// Issue 13, item 3: on the CPU the Tables buffers must hold what the problem says (the GPU
/// reads the buffers, the CPU the problem's copies: they must not differ silently).
#[test]
fn cpu_tables_that_differ_from_the_problem_are_errors() {
    let dev = Device::cpu();
    let (lens, cap) = ([20, 3], 32);
    let z = vec![0.5f32; 2 * cap * 2 * 64];
    let q = vec![0.5f32; 2 * 2 * 4 * 64];
    let call = |p: &Decode<'_>, t: Tables<'_>| {
        let mut o = vec![0f32; p.o_len()];
        let mut l = vec![0f32; p.lse_len()];
        let mut ws = vec![0f32; p.workspace_len(&dev)];
        decode::forward(
            &dev,
            p,
            (&q).into(),
            (&z).into(),
            (&z).into(),
            t,
            (&mut ws).into(),
            (&mut o).into(),
            (&mut l).into(),
        )
    };
    let cont = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: cap });
    call(&cont, Tables::host(&cont)).unwrap();
    let other_lens = [21, 3];
    let mut t = Tables::host(&cont);
    t.cache_seqlens = (&other_lens[..]).into();
    expect_err(call(&cont, t), "cache_seqlens");

    let (table, other) = ([0, 1, 2, 3], [0, 3, 2, 1]);
    let paged = Decode::new(
        &lens,
        2,
        4,
        2,
        64,
        Layout::Paged {
            page_size: 16,
            num_pages: 4,
            block_table: Some(&table),
            pages_per_seq: 2,
        },
    );
    call(&paged, Tables::host(&paged)).unwrap();
    let mut t = Tables::host(&paged);
    t.block_table = Some((&other[..]).into());
    expect_err(call(&paged, t), "block_table");

    let rope = Rope {
        style: RopeStyle::NeoX,
        theta: 1e4,
    };
    let (full, offs, other) = ([32, 3], [5, 0], [6, 0]);
    let rolling = Decode::new(
        &full,
        2,
        4,
        2,
        64,
        Layout::Rolling {
            n_sink: 2,
            window: 30,
            ring_offsets: Some(&offs),
            rope,
        },
    );
    call(&rolling, Tables::host(&rolling)).unwrap();
    let mut t = Tables::host(&rolling);
    t.ring_offsets = Some((&other[..]).into());
    expect_err(call(&rolling, t), "ring_offsets");
}

/// Issue 13, item 7: an append into a page two sequences use would race on a GPU: refused,
/// naming block_table, before anything is written. Sequences that only read a shared page
/// (prefix sharing) stay legal, for append and forward.
#[test]
fn appending_into_a_shared_page_is_refused_reading_one_is_fine() {
    for dev in devices("appending_into_a_shared_page_is_refused_reading_one_is_fine") {
        // Both sequences start with page 0 (a shared 16-token prefix), then own pages.
        let table: &'static [i32] = &[0, 1, 0, 2];
        let layout = |table: &'static [i32]| Layout::Paged {
            page_size: 16,
            num_pages: 3,
            block_table: Some(table),
            pages_per_seq: 2,
        };
        let new = vec![1.0f32; 2 * 2 * 64];
        let mut k = vec![0.25f32; 3 * 16 * 64];
        let mut v = k.clone();
        // Writes keys 18, 19 (page 1) and 16, 17 (page 2): the shared page is only read.
        let ok = Decode::new(&[20, 18], 2, 1, 1, 64, layout(table));
        run_append(&dev, &ok, &new, &new, &mut k, &mut v).unwrap();
        let q = vec![0.5f32; ok.o_len()];
        run(&dev, &ok, &q, &k, &v).unwrap();
        // Sequence 1 writes keys 14, 15: into the shared page 0.
        let before = (k.clone(), v.clone());
        let bad = Decode::new(&[20, 16], 2, 1, 1, 64, layout(table));
        expect_err(
            run_append(&dev, &bad, &new, &new, &mut k, &mut v),
            "block_table",
        );
        // One page in two columns of one sequence: writing it rewrites another key.
        let twice = Decode::new(&[20, 2], 2, 1, 1, 64, layout(&[1, 1, 2, 0]));
        expect_err(
            run_append(&dev, &twice, &new, &new, &mut k, &mut v),
            "block_table",
        );
        assert!(before == (k, v), "a refused append wrote");
    }
}

/// Issue 13, item 4: NaN sink logits (CPU: the values are on the host) and scales whose
/// exp2-domain product overflows are typed errors naming the argument; ±inf sinks keep their
/// documented meaning; NaN/inf/<= 1 RoPE bases are errors.
#[test]
fn nan_sinks_bad_scales_and_rope_bases_are_typed_errors() {
    let dev = Device::cpu();
    let lens = [20, 3];
    let p = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: 32 });
    let q = vec![0.5f32; p.o_len()];
    let kv = vec![0.5f32; 2 * 32 * 2 * 64];
    let sinks = [0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    expect_err(
        run_with_sinks(&dev, &p, &q, &kv, &kv, Some(&sinks)),
        "sink_logits",
    );
    let fine = [0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY];
    run_with_sinks(&dev, &p, &q, &kv, &kv, Some(&fine)).unwrap();
    for s in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
    ] {
        expect_err(run(&dev, &p.clone().scale(s), &q, &kv, &kv), "scale");
    }
    // A negative or zero scale is a legal (if odd) softmax.
    for s in [0.0, -0.5, 1e-30] {
        run(&dev, &p.clone().scale(s), &q, &kv, &kv).unwrap();
    }
    for theta in [f32::NAN, f32::INFINITY, 1.0, 0.5, -3.0] {
        let rope = Rope {
            style: RopeStyle::NeoX,
            theta,
        };
        expect_err(RollingCache::new(1, 2, 30, rope), "rope");
        let l = Layout::Rolling {
            n_sink: 2,
            window: 30,
            ring_offsets: Some(&[0, 0]),
            rope,
        };
        expect_err(
            run(&dev, &Decode::new(&lens, 2, 4, 2, 64, l), &q, &kv, &kv),
            "rope",
        );
    }
}

/// Issue 13, item 7: the LSE tolerance with RoPE in low precision follows the rounding of the
/// rotated q and k (see [`naive_lp`]), and still fails a wrong rotation: results computed
/// (exactly, in f64) with the wrong base or the wrong pairing are refused on most rows.
#[test]
fn rope_lse_tolerance_refuses_a_wrong_rotation() {
    let mut rng = rng("rope_lse_tolerance_refuses_a_wrong_rotation");
    let dev = Device::cpu();
    let rope = Rope {
        style: RopeStyle::Interleaved,
        theta: 10000.0,
    };
    let (lens, offs) = ([3, 40, 64], [0, 0, 0]);
    let (n_sink, window, hq, hk, d, sq) = (4, 60, 4, 1, 64, 2);
    let layout = |rope| Layout::Rolling {
        n_sink,
        window,
        ring_offsets: Some(&offs),
        rope,
    };
    let p = Decode::new(&lens, sq, hq, hk, d, layout(rope));
    let cap = n_sink + window;
    let k = random::<Bf16>(&mut rng, lens.len() * cap * hk * d);
    let v = random::<Bf16>(&mut rng, k.len());
    let q = random::<Bf16>(&mut rng, p.o_len());
    let keys = contiguous_keys(&p, &k, &v);
    let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
    let (_, _, _, bad) = check_errors("right rotation", &p, Heads::default(), &q, &keys, &o, &lse);
    assert_eq!(bad, 0, "the CPU's own result fails the tolerance");
    let rows = lens.len() * hq * sq;
    for wrong in [
        Rope {
            theta: 20000.0,
            ..rope
        },
        Rope {
            style: RopeStyle::NeoX,
            ..rope
        },
    ] {
        // The exact result of the wrong rotation, as a kernel with that bug would give it.
        let pw = Decode::new(&lens, sq, hq, hk, d, layout(wrong));
        let (wo, wl) = oracle::decode(&pw, &q, &k, &v);
        let wo: Vec<Bf16> = wo.iter().map(|&x| Bf16::from_f32(x as f32)).collect();
        let wl: Vec<f32> = wl.iter().map(|&x| x as f32).collect();
        let (err, bound, _, bad) =
            check_errors("wrong rotation", &p, Heads::default(), &q, &keys, &wo, &wl);
        eprintln!("{wrong:?}: {bad} of {rows} LSE rows refused; O error {err:e} vs {bound:e}");
        assert!(
            bad * 2 > rows,
            "{wrong:?}: only {bad} of {rows} rows refused"
        );
        assert!(err > bound, "{wrong:?}: O passes");
    }
}
