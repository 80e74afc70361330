//! Fuzz targets of `attnkit::flash` (see main.rs for the harness).
//!
//! Problems are small (a few dozen rows, four heads) so a case takes well under a
//! millisecond; sizes from `size` are sometimes hostile, and then the buffers passed are short
//! (nothing is allocated from a hostile size here) and the call must refuse the problem.

use super::{Outcome, float, huge, run, size, written};
use crate::common::{poisoned, random};
use attnkit::flash::{
    self, Attention, BlockMask, Extras, HEAD_DIMS, Options, Relu2Norm, Score, Strides,
    VarlenAttention,
};
use attnkit::{Bf16, Device, Element, F16};
use rand::{Rng, rngs::StdRng};

/// The most elements a case allocates for one buffer; a larger need gets a short buffer.
const MAX_ALLOC: usize = 1 << 18;

fn head_dim(rng: &mut StdRng) -> usize {
    if rng.random_bool(0.9) {
        HEAD_DIMS[rng.random_range(0..HEAD_DIMS.len())]
    } else {
        size(rng, 300)
    }
}

/// A scale: finite ones clamped to ±1e4 so that scores (inputs in [-1, 1), d <= 256) and
/// their relu² squares stay finite in f32, as the docs require; NaN and ±inf come through.
fn scale(rng: &mut StdRng) -> f32 {
    let s = float(rng, 0.01, 2.0);
    if s.is_finite() { s.clamp(-1e4, 1e4) } else { s }
}

fn options(rng: &mut StdRng) -> Options {
    let bound = |rng: &mut StdRng| rng.random_bool(0.4).then(|| size(rng, 40));
    Options {
        causal: rng.random_bool(0.4),
        scale: rng.random_bool(0.4).then(|| scale(rng)),
        window_left: bound(rng),
        window_right: bound(rng),
        sinks: if rng.random_bool(0.3) {
            size(rng, 8)
        } else {
            0
        },
        score: match rng.random_range(0..10) {
            0 => Score::Relu2(Relu2Norm::SeqLen),
            1 => Score::Relu2(Relu2Norm::Visible),
            _ => Score::Softmax,
        },
        entropy_scale: rng.random_bool(0.1),
        softcap: rng.random_bool(0.15).then(|| float(rng, 0.5, 50.0)),
    }
}

/// Strides of a `[batch, rows, heads, d]` tensor: mostly contiguous, sometimes padded,
/// interleaved, random or with a non-unit dim stride.
fn strides(rng: &mut StdRng, rows: usize, heads: usize, d: usize) -> Strides {
    let c = Strides::contiguous(rows, heads, d);
    match rng.random_range(0..10) {
        0..6 => c,
        6 | 7 => {
            let head = d.saturating_add(8 * rng.random_range(0..3));
            let row = heads
                .saturating_mul(head)
                .saturating_add(8 * rng.random_range(0..3));
            Strides {
                batch: rows
                    .saturating_mul(row)
                    .saturating_add(rng.random_range(0..9)),
                row,
                head,
                dim: 1,
            }
        }
        8 => Strides {
            batch: size(rng, 4000),
            row: size(rng, 600),
            head: size(rng, 300),
            dim: 1,
        },
        _ => Strides {
            dim: rng.random_range(0..3),
            ..c
        },
    }
}

/// One past the largest element offset of the tensor, or None past usize.
fn reach(s: &Strides, dims: [usize; 4]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    [(dims[0], s.batch), (dims[1], s.row), (dims[2], s.head)]
        .iter()
        .try_fold(dims[3], |acc, &(n, st)| {
            acc.checked_add((n - 1).checked_mul(st)?)
        })
}

/// A buffer length for a need: exact, longer, or one short; short when the need is hostile.
fn length(rng: &mut StdRng, need: Option<usize>) -> usize {
    match need {
        Some(n) if n <= MAX_ALLOC => match rng.random_range(0..10) {
            0 => n.saturating_sub(1),
            1 => n + rng.random_range(1..40),
            _ => n,
        },
        _ => 64,
    }
}

/// Every element a strided tensor covers is written (no NaN poison left).
fn written_strided<T: Element>(o: &[T], s: &Strides, dims: [usize; 4]) -> bool {
    (0..dims[0]).all(|b| {
        (0..dims[1]).all(|r| {
            (0..dims[2]).all(|h| {
                let off = b * s.batch + r * s.row + h * s.head;
                written(&o[off..off + dims[3]])
            })
        })
    })
}

/// Random extras for a problem: (sink logits, ALiBi slopes, entropy length, block mask (mask,
/// bq, bk)).
struct HostExtras {
    sinks: Option<Vec<f32>>,
    alibi: Option<Vec<f32>>,
    entropy: Option<usize>,
    mask: Option<(Vec<u8>, usize, usize)>,
}

fn extras(
    rng: &mut StdRng,
    heads_q: usize,
    lse_need: Option<usize>,
    seq: (usize, usize),
) -> HostExtras {
    let per_head = |rng: &mut StdRng, p: f64, lo: f32, hi: f32| {
        rng.random_bool(p).then(|| {
            let n = if rng.random_bool(0.9) && heads_q <= 64 {
                heads_q
            } else {
                rng.random_range(0..6)
            };
            (0..n).map(|_| float(rng, lo, hi)).collect::<Vec<f32>>()
        })
    };
    let sinks = per_head(rng, 0.3, -3.0, 3.0);
    let alibi = per_head(rng, 0.2, 0.0, 1.0);
    let entropy = rng.random_bool(0.3).then(|| length(rng, lse_need));
    let mask = rng.random_bool(0.25).then(|| {
        let (bq, bk) = (size(rng, 40), size(rng, 40));
        let blocks = (bq > 0 && bk > 0)
            .then(|| seq.0.div_ceil(bq).checked_mul(seq.1.div_ceil(bk)))
            .flatten();
        let n = length(rng, blocks);
        let m = (0..n).map(|_| rng.random_bool(0.6) as u8).collect();
        (m, bq, bk)
    });
    HostExtras {
        sinks,
        alibi,
        entropy,
        mask,
    }
}

impl HostExtras {
    fn as_extras<'a>(&'a self, entropy: &'a mut [f32]) -> Extras<'a> {
        Extras {
            sink_logits: self.sinks.as_ref().map(|s| s.into()),
            alibi_slopes: self.alibi.as_ref().map(|s| s.into()),
            entropy: self.entropy.map(|_| entropy.into()),
            block_mask: self.mask.as_ref().map(|(m, bq, bk)| BlockMask {
                mask: m.into(),
                block_q: *bq,
                block_k: *bk,
            }),
        }
    }
}

/// A fixed-length problem, run with or without extras; Ok must write o, lse (and entropy).
fn fixed_case<T: Element>(rng: &mut StdRng, with_extras: bool) -> Outcome {
    let (batch, seq_q, seq_k) = (size(rng, 3), size(rng, 48), size(rng, 48));
    let heads_kv = size(rng, 3);
    let heads_q = if rng.random_bool(0.8) {
        heads_kv.saturating_mul(rng.random_range(1..3))
    } else {
        size(rng, 4)
    };
    let d = head_dim(rng);
    let mut a = Attention::new(batch, seq_q, seq_k, heads_q, heads_kv, d);
    a.opts = options(rng);
    a.q_strides = strides(rng, seq_q, heads_q, d);
    a.k_strides = strides(rng, seq_k, heads_kv, d);
    a.v_strides = strides(rng, seq_k, heads_kv, d);
    a.o_strides = strides(rng, seq_q, heads_q, d);
    let (qd, kd) = ([batch, seq_q, heads_q, d], [batch, seq_k, heads_kv, d]);
    let hostile = [batch, seq_q, seq_k, heads_q, heads_kv, d]
        .into_iter()
        .any(huge);
    let (q, k, v) = (
        {
            let n = length(rng, reach(&a.q_strides, qd));
            random::<T>(rng, n)
        },
        {
            let n = length(rng, reach(&a.k_strides, kd));
            random::<T>(rng, n)
        },
        {
            let n = length(rng, reach(&a.v_strides, kd));
            random::<T>(rng, n)
        },
    );
    let mut o = {
        let n = length(rng, reach(&a.o_strides, qd));
        poisoned::<T>(n)
    };
    let lse_need = batch
        .checked_mul(heads_q)
        .and_then(|n| n.checked_mul(seq_q));
    let lse_len = length(rng, lse_need);
    let mut lse = vec![f32::NAN; lse_len];
    let x = if with_extras {
        extras(rng, heads_q, lse_need, (seq_q, seq_k))
    } else {
        HostExtras {
            sinks: None,
            alibi: None,
            entropy: None,
            mask: None,
        }
    };
    let mut ent = vec![f32::NAN; x.entropy.unwrap_or(0)];
    let r = flash::forward_with(
        &Device::cpu(),
        &a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        (&mut o).into(),
        (&mut lse).into(),
        x.as_extras(&mut ent),
    );
    if r.is_ok() {
        assert!(!hostile, "accepted a hostile size: {a:?}");
        let need = lse_need.unwrap_or(0);
        assert!(
            written_strided(&o, &a.o_strides, qd),
            "o not fully written: {a:?}"
        );
        assert!(written(&lse[..need]), "lse not fully written: {a:?}");
        if x.entropy.is_some() {
            assert!(written(&ent[..need]), "entropy not fully written: {a:?}");
        }
    } else {
        assert!(untouched(&o, &lse, &ent), "written on error: {a:?}");
    }
    r
}

/// Nothing was written (the docs: every argument is checked first).
fn untouched<T: Element>(o: &[T], lse: &[f32], ent: &[f32]) -> bool {
    o.iter().all(|x| x.to_f32().is_nan()) && lse.iter().chain(ent).all(|x| x.is_nan())
}

/// Random varlen offsets: mostly valid, sometimes not starting at 0, decreasing, or near i32.
fn offsets(rng: &mut StdRng, n: usize) -> Vec<i32> {
    let mut cu = vec![0i32];
    for _ in 0..n {
        let step = match rng.random_range(0..40) {
            0 => -rng.random_range(1..5),
            1 => i32::MAX / 2,
            _ => rng.random_range(0..20),
        };
        cu.push(cu.last().copied().unwrap_or(0).saturating_add(step));
    }
    if rng.random_range(0..40) == 0 {
        cu[0] = 1;
    }
    cu
}

/// A buffer copy of offsets: the same (mostly), stale, or of another length.
fn offset_buffer(rng: &mut StdRng, cu: &[i32]) -> Vec<i32> {
    let mut b = cu.to_vec();
    match rng.random_range(0..20) {
        0 if b.len() > 1 => b[1] = b[1].wrapping_add(1),
        1 => b.push(0),
        _ => {}
    }
    b
}

fn varlen_case<T: Element>(rng: &mut StdRng, with_extras: bool) -> Outcome {
    let batch = rng.random_range(0..5);
    let cq = offsets(rng, batch);
    let ck = if rng.random_bool(0.95) {
        offsets(rng, batch)
    } else {
        {
            let n = rng.random_range(0..5);
            offsets(rng, n)
        }
    };
    let heads_kv = size(rng, 3);
    let heads_q = heads_kv.saturating_mul(rng.random_range(1..3));
    let d = head_dim(rng);
    let mut a = VarlenAttention::new(&cq, &ck, heads_q, heads_kv, d);
    a.opts = options(rng);
    let tq = a.total_q();
    let tk = ck.last().map_or(0, |&x| x.max(0) as usize);
    a.q_strides = strides(rng, 0, heads_q, d);
    a.k_strides = strides(rng, 0, heads_kv, d);
    a.v_strides = strides(rng, 0, heads_kv, d);
    a.o_strides = strides(rng, 0, heads_q, d);
    let (qd, kd) = ([1, tq, heads_q, d], [1, tk, heads_kv, d]);
    let (q, k, v) = (
        {
            let n = length(rng, reach(&a.q_strides, qd));
            random::<T>(rng, n)
        },
        {
            let n = length(rng, reach(&a.k_strides, kd));
            random::<T>(rng, n)
        },
        {
            let n = length(rng, reach(&a.v_strides, kd));
            random::<T>(rng, n)
        },
    );
    let mut o = {
        let n = length(rng, reach(&a.o_strides, qd));
        poisoned::<T>(n)
    };
    let lse_need = heads_q.checked_mul(tq);
    let lse_len = length(rng, lse_need);
    let mut lse = vec![f32::NAN; lse_len];
    let longest = |cu: &[i32]| cu.windows(2).map(|w| (w[1] - w[0]).max(0) as usize).max();
    let seq = (longest(&cq).unwrap_or(0), longest(&ck).unwrap_or(0));
    let x = if with_extras {
        extras(rng, heads_q, lse_need, seq)
    } else {
        HostExtras {
            sinks: None,
            alibi: None,
            entropy: None,
            mask: None,
        }
    };
    let mut ent = vec![f32::NAN; x.entropy.unwrap_or(0)];
    let (bq, bk) = (offset_buffer(rng, &cq), offset_buffer(rng, &ck));
    let r = flash::forward_varlen_with(
        &Device::cpu(),
        &a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        bq[..].into(),
        bk[..].into(),
        (&mut o).into(),
        (&mut lse).into(),
        x.as_extras(&mut ent),
    );
    if r.is_ok() {
        assert!(bq == cq && bk == ck, "stale offset buffers accepted");
        assert!(
            ![tq, tk, heads_q, d].into_iter().any(huge),
            "hostile size accepted"
        );
        let need = lse_need.unwrap_or(0);
        assert!(
            written_strided(&o, &a.o_strides, qd),
            "o not fully written: {a:?}"
        );
        assert!(written(&lse[..need]), "lse not fully written: {a:?}");
        if x.entropy.is_some() {
            assert!(written(&ent[..need]), "entropy not fully written: {a:?}");
        }
    } else {
        assert!(untouched(&o, &lse, &ent), "written on error: {a:?}");
    }
    r
}

/// f32 mostly, some f16 and bf16.
fn by_dtype(rng: &mut StdRng, f: [fn(&mut StdRng, bool) -> Outcome; 3], extras: bool) -> Outcome {
    match rng.random_range(0..10) {
        0 => f[1](rng, extras),
        1 => f[2](rng, extras),
        _ => f[0](rng, extras),
    }
}

const FIXED: [fn(&mut StdRng, bool) -> Outcome; 3] =
    [fixed_case::<f32>, fixed_case::<F16>, fixed_case::<Bf16>];
const VARLEN: [fn(&mut StdRng, bool) -> Outcome; 3] =
    [varlen_case::<f32>, varlen_case::<F16>, varlen_case::<Bf16>];

#[test]
fn fuzz_forward() {
    run("flash::forward", 2000, |rng| by_dtype(rng, FIXED, false));
}

#[test]
fn fuzz_forward_with() {
    run("flash::forward_with", 2000, |rng| {
        by_dtype(rng, FIXED, true)
    });
}

#[test]
fn fuzz_forward_varlen() {
    run("flash::forward_varlen", 2000, |rng| {
        by_dtype(rng, VARLEN, false)
    });
}

#[test]
fn fuzz_forward_varlen_with() {
    run("flash::forward_varlen_with", 2000, |rng| {
        by_dtype(rng, VARLEN, true)
    });
}

/// The helpers never panic (they saturate), and agree with checked arithmetic where it fits.
#[test]
fn fuzz_helpers() {
    run("flash helpers", 5000, |rng| {
        let s: [usize; 6] = std::array::from_fn(|_| size(rng, 100));
        let bound = |rng: &mut StdRng| rng.random_bool(0.5).then(|| size(rng, 100));
        let st = Strides::contiguous(s[0], s[1], s[2]);
        assert_eq!(st.row, s[1].saturating_mul(s[2]));
        let a = Attention::new(s[0], s[1], s[2], s[3], s[4], s[5])
            .causal(rng.random_bool(0.5))
            .window(bound(rng), bound(rng))
            .sinks(size(rng, 10));
        let o = [s[0], s[1], s[3], s[5]]
            .iter()
            .try_fold(1usize, |x, &n| x.checked_mul(n))
            .unwrap_or(usize::MAX);
        assert_eq!(a.o_len(), o);
        let _ = (a.lse_len(), a.softmax_scale());
        let f = a.flops();
        assert!(f >= 0.0 && !f.is_nan(), "flops {f}");
        let n = rng.random_range(0..4);
        let cu = offsets(rng, n);
        let va = VarlenAttention::new(&cu, &cu, s[3], s[4], s[5]);
        let _ = (va.total_q(), va.o_len(), va.lse_len(), va.softmax_scale());
        // Reach both sides of the harness: a helper "fails" when the problem is one forward
        // would refuse by its sizes alone.
        if [s[0], s[1], s[2], s[3], s[4]].contains(&0) || s.iter().any(|&n| huge(n)) {
            Err(attnkit::Error::Shape {
                arg: "sizes",
                detail: "a problem forward refuses".into(),
            })
        } else {
            Ok(())
        }
    });
}

/// The layouts return an error (never allocate) past their limit, and the documented pattern
/// otherwise.
#[test]
fn fuzz_block_mask_layouts() {
    run("flash::BlockMask layouts", 3000, |rng| {
        let (rows, cols, w) = (size(rng, 40), size(rng, 40), size(rng, 5));
        // Between the test's own limit and the library's, the layout would really allocate.
        if rows
            .checked_mul(cols)
            .is_some_and(|n| n > MAX_ALLOC && n <= flash::MAX_MASK_BLOCKS)
        {
            return Ok(());
        }
        let (m, keep): (_, Box<dyn Fn(usize, usize) -> bool>) = if rng.random_bool(0.5) {
            (
                BlockMask::local_layout(rows, cols, w)?,
                Box::new(move |qb, kb| kb <= qb && qb - kb < w),
            )
        } else {
            (
                BlockMask::strided_layout(rows, cols, w)?,
                Box::new(move |qb, kb| kb <= qb && (qb - kb) % w == 0),
            )
        };
        assert_eq!(m.len(), rows * cols);
        for (i, &x) in m.iter().enumerate() {
            assert_eq!(
                x != 0,
                keep(i / cols, i % cols),
                "block {i} of {rows}x{cols}"
            );
        }
        Ok(())
    });
}
