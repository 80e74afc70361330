//! FlashAttention forward against the f64 oracle, on the CPU and (where present) the GPU.
//!
//! Tolerance: f32 is tight; f16/bf16 use FlashAttention's rule, relative to a naive
//! computation in the same precision: `max|out - ref| <= 2 * max|naive_lp - ref| + 1e-3`.

#[path = "flash/backward.rs"]
mod backward;
mod common;

use attnkit::flash::oracle::HostExtras;
use attnkit::flash::{
    self, Attention, BlockMask, DeviceOffsets, Extras, HEAD_DIMS, Offsets, Relu2Norm, Score,
    Strides, VarlenAttention, oracle,
};
use attnkit::{Bf16, DType, Device, Element, Error, F16};
use common::*;
use rand::rngs::StdRng;

/// Runs `forward` on `dev` (uploading to and downloading from the GPU when it is one), with
/// outputs poisoned with NaN beforehand. `o_len` lets a strided o be larger than the problem.
fn run<T: Element>(
    dev: &Device,
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    o_len: usize,
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    let mut o = poisoned::<T>(o_len);
    let mut lse = vec![f32::NAN; a.lse_len()];
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let (qd, kd, vd) = (
            s.clone_htod(q).unwrap(),
            s.clone_htod(k).unwrap(),
            s.clone_htod(v).unwrap(),
        );
        let mut od = s.clone_htod(&o).unwrap();
        let mut ld = s.clone_htod(&lse).unwrap();
        flash::forward(
            dev,
            a,
            (&qd).into(),
            (&kd).into(),
            (&vd).into(),
            (&mut od).into(),
            (&mut ld).into(),
        )?;
        return Ok((s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap()));
    }
    flash::forward(
        dev,
        a,
        q.into(),
        k.into(),
        v.into(),
        (&mut o).into(),
        (&mut lse).into(),
    )?;
    Ok((o, lse))
}

/// Inputs for a contiguous problem, uniform in [-1, 1) times `amp` (a larger amp makes the
/// softmax peakier and the exponent range wider).
fn inputs<T: Element>(rng: &mut StdRng, a: &Attention, amp: f32) -> (Vec<T>, Vec<T>, Vec<T>) {
    let nq = a.batch * a.seq_q * a.heads_q * a.head_dim;
    let nk = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    let scaled = |v: Vec<T>| {
        v.into_iter()
            .map(|x| T::from_f32(x.to_f32() * amp))
            .collect::<Vec<T>>()
    };
    (scaled(random(rng, nq)), random(rng, nk), random(rng, nk))
}

/// The naive computation in T's precision: f32 scores and softmax from T inputs, P rounded to
/// T (as the tensor cores take it), f32 sums, O rounded to T. Defines the low-precision
/// tolerance.
fn naive_lp_row<T: Element>(
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    h: usize,
    i: usize,
) -> Vec<f64> {
    let d = a.head_dim;
    let hk = h / (a.heads_q / a.heads_kv);
    let at = |s: &Strides, x: &[T], r: usize, hh: usize, c: usize| {
        x[b * s.batch + r * s.row + hh * s.head + c].to_f32()
    };
    let diag = a.seq_k as i64 - a.seq_q as i64;
    let qi: Vec<f32> = (0..d).map(|c| at(&a.q_strides, q, i, h, c)).collect();
    let scale = a.softmax_scale();
    let s: Vec<f32> = (0..a.seq_k)
        .map(|j| {
            if a.opts.causal && j as i64 > i as i64 + diag {
                f32::NEG_INFINITY
            } else {
                qi.iter()
                    .enumerate()
                    .map(|(c, qc)| qc * at(&a.k_strides, k, j, hk, c))
                    .sum::<f32>()
                    * scale
            }
        })
        .collect();
    let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if mx == f32::NEG_INFINITY {
        return vec![0.0; d];
    }
    let p: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
    let l: f32 = p.iter().sum();
    // Keys outer, channels inner (V read row by row); each channel sums its keys in order, as
    // the column walk did, so the rounding is the same.
    let mut acc = vec![0.0f32; d];
    for (j, pj) in p.iter().enumerate() {
        let pj = T::from_f32(*pj).to_f32();
        for (c, a_c) in acc.iter_mut().enumerate() {
            *a_c += pj * at(&a.v_strides, v, j, hk, c);
        }
    }
    acc.iter()
        .map(|x| T::from_f32(x / l).to_f32() as f64)
        .collect()
}

/// Query rows to check against the oracle: all of them up to 1200 rows, else a spread sample
/// (the oracle is O(seq_k) per row in f64).
fn rows_to_check(seq_q: usize) -> Vec<usize> {
    if seq_q <= 1200 {
        return (0..seq_q).collect();
    }
    let mut r: Vec<usize> = (0..64)
        .chain(seq_q - 64..seq_q)
        .chain((64..seq_q - 64).step_by(97))
        .collect();
    r.sort_unstable();
    r
}

/// Compares one run against the oracle, with the tolerance of T. `o` is read through
/// `a.o_strides`.
fn check<T: Element>(what: &str, a: &Attention, q: &[T], k: &[T], v: &[T], o: &[T], lse: &[f32]) {
    let d = a.head_dim;
    let (mut err, mut lp_err, mut lse_bad) = (0.0f64, 0.0f64, 0usize);
    let mut first_bad = None;
    for b in 0..a.batch {
        for h in 0..a.heads_q {
            for i in rows_to_check(a.seq_q) {
                let (want, want_lse) = oracle::attention_row(a, q, k, v, b, h, i);
                let s = &a.o_strides;
                let got: Vec<f64> = (0..d)
                    .map(|c| o[b * s.batch + i * s.row + h * s.head + c].to_f32() as f64)
                    .collect();
                for c in 0..d {
                    // NaN (a poisoned element never written) counts as infinitely wrong.
                    let e = (got[c] - want[c]).abs();
                    let e = if e.is_nan() { f64::INFINITY } else { e };
                    if e > err {
                        err = e;
                        first_bad.get_or_insert((b, h, i, c, got[c], want[c]));
                    }
                }
                if T::DTYPE != DType::F32 {
                    let lp = naive_lp_row(a, q, k, v, b, h, i);
                    lp_err = lp
                        .iter()
                        .zip(&want)
                        .map(|(x, y)| (x - y).abs())
                        .fold(lp_err, f64::max);
                }
                let gl = lse[(b * a.heads_q + h) * a.seq_q + i] as f64;
                let ok = if want_lse == f64::NEG_INFINITY {
                    gl == f64::NEG_INFINITY
                } else {
                    (gl - want_lse).abs() <= 2e-4 * (1.0 + want_lse.abs())
                };
                if !ok {
                    if lse_bad < 5 {
                        eprintln!(
                            "{what}: lse mismatch at b={b} h={h} row={i}: got {gl}, want {want_lse}"
                        );
                    }
                    lse_bad += 1;
                }
            }
        }
    }
    let bound = if T::DTYPE == DType::F32 {
        // f32 rounds each logit s to |s| * 2^-24, which moves its weight by that relatively:
        // the bound grows with the largest logit the inputs allow (scale * max|q| * max|k| * d bounds
        // it; sqrt(d) for random signs). Peaky cases (scale 3, |x| <= 4) reach |s| ~ 400.
        let amax = |x: &[T]| x.iter().fold(0f32, |m, y| m.max(y.to_f32().abs()));
        let s_max = a.softmax_scale().abs() * amax(q) * amax(k) * (a.head_dim as f32).sqrt() * 3.0;
        2e-5 * (s_max / 100.0).max(1.0) as f64
    } else {
        2.0 * lp_err + 1e-3
    };
    assert!(
        err <= bound,
        "{what}: max |o - ref| = {err:e} > bound {bound:e} (first at b,h,row,col,got,want = {first_bad:?})"
    );
    assert_eq!(lse_bad, 0, "{what}: {lse_bad} LSE values off");
}

fn case<T: Element>(rng: &mut StdRng, dev: &Device, a: &Attention, amp: f32) {
    let (q, k, v) = inputs::<T>(rng, a, amp);
    let (o, lse) = run(dev, a, &q, &k, &v, a.o_len()).unwrap();
    let what = format!(
        "{} {} b={} sq={} sk={} hq={} hkv={} d={} causal={}",
        dev.name(),
        T::DTYPE,
        a.batch,
        a.seq_q,
        a.seq_k,
        a.heads_q,
        a.heads_kv,
        a.head_dim,
        a.opts.causal
    );
    check(&what, a, &q, &k, &v, &o, &lse);
}

fn every_dim_mask_gqa<T: Element>(test: &str) {
    let mut rng = rng(test);
    for dev in devices(test) {
        for d in HEAD_DIMS {
            for causal in [false, true] {
                // Two KV heads, so a wrong query-head -> KV-head map cannot pass by luck.
                for (batch, ratio, sq, sk) in [(2, 1, 67, 131), (1, 4, 131, 67), (1, 8, 77, 77)] {
                    let a = Attention::new(batch, sq, sk, 2 * ratio, 2, d).causal(causal);
                    case::<T>(&mut rng, &dev, &a, 1.0);
                }
            }
        }
    }
}

#[test]
fn f32_every_head_dim_mask_and_gqa_ratio() {
    every_dim_mask_gqa::<f32>("f32_every_head_dim_mask_and_gqa_ratio");
}

#[test]
fn f16_every_head_dim_mask_and_gqa_ratio() {
    every_dim_mask_gqa::<F16>("f16_every_head_dim_mask_and_gqa_ratio");
}

#[test]
fn bf16_every_head_dim_mask_and_gqa_ratio() {
    every_dim_mask_gqa::<Bf16>("bf16_every_head_dim_mask_and_gqa_ratio");
}

#[test]
fn sequence_lengths_that_are_not_tile_multiples() {
    let mut rng = rng("sequence_lengths_that_are_not_tile_multiples");
    for dev in devices("sequence_lengths_that_are_not_tile_multiples") {
        for n in [1, 17, 127, 1000, 4097] {
            // The emulator runs 4097 keys for the last 129 query rows only (minutes otherwise).
            let sq = if dev.is_emulated() && n > 1000 {
                129
            } else {
                n
            };
            for causal in [false, true] {
                case::<Bf16>(
                    &mut rng,
                    &dev,
                    &Attention::new(1, sq, n, 2, 1, 64).causal(causal),
                    1.0,
                );
            }
        }
        case::<f32>(
            &mut rng,
            &dev,
            &Attention::new(1, 1000, 1000, 1, 1, 128).causal(true),
            1.0,
        );
    }
}

#[test]
fn seq_q_and_seq_k_differ_both_ways_and_empty_rows() {
    let mut rng = rng("seq_q_and_seq_k_differ_both_ways_and_empty_rows");
    for dev in devices("seq_q_and_seq_k_differ_both_ways_and_empty_rows") {
        for (sq, sk) in [(1, 1000), (1000, 1), (17, 4097), (4097, 17), (300, 257)] {
            for causal in [false, true] {
                // Causal with seq_q > seq_k: the first seq_q - seq_k rows see no key (O = 0,
                // LSE = -inf), which `check` verifies through the oracle.
                case::<F16>(
                    &mut rng,
                    &dev,
                    &Attention::new(1, sq, sk, 4, 2, 128).causal(causal),
                    1.0,
                );
            }
        }
    }
}

#[test]
fn peaky_softmax_and_custom_scale() {
    let mut rng = rng("peaky_softmax_and_custom_scale");
    for dev in devices("peaky_softmax_and_custom_scale") {
        // Large scores: the running max changes often and exp2 arguments span a wide range.
        case::<f32>(
            &mut rng,
            &dev,
            &Attention::new(1, 200, 333, 2, 2, 64).scale(3.0),
            4.0,
        );
        case::<Bf16>(
            &mut rng,
            &dev,
            &Attention::new(1, 200, 333, 2, 2, 64)
                .causal(true)
                .scale(3.0),
            4.0,
        );
        case::<F16>(
            &mut rng,
            &dev,
            &Attention::new(1, 65, 65, 1, 1, 32).scale(0.0),
            1.0,
        );
    }
}

#[test]
fn strided_inputs_and_output_gaps_untouched() {
    let mut rng = rng("strided_inputs_and_output_gaps_untouched");
    for dev in devices("strided_inputs_and_output_gaps_untouched") {
        // q, k, v interleaved in one packed qkv buffer [b, s, 3, h, d]; o with padded rows.
        let (b, s, h, d) = (2, 129, 2, 64);
        let qkv: Vec<Bf16> = random(&mut rng, b * s * 3 * h * d);
        let st = || Strides {
            batch: s * 3 * h * d,
            row: 3 * h * d,
            head: d,
            dim: 1,
        };
        let mut a = Attention::new(b, s, s, h, h, d).causal(true);
        a.q_strides = st();
        a.k_strides = st();
        a.v_strides = st();
        a.o_strides = Strides {
            batch: s * (h * d + 8),
            row: h * d + 8,
            head: d,
            dim: 1,
        };
        let o_len = b * s * (h * d + 8);
        let (q, k, v) = (&qkv[..], &qkv[h * d..], &qkv[2 * h * d..]);
        let (o, lse) = run(&dev, &a, q, k, v, o_len).unwrap();
        check("strided bf16", &a, q, k, v, &o, &lse);
        // The 8-element gap after each row was never written.
        for row in 0..b * s {
            let gap = &o[row * (h * d + 8) + h * d..(row + 1) * (h * d + 8)];
            assert!(
                gap.iter().all(|x| x.to_f32().is_nan()),
                "row {row}: gap written"
            );
        }
    }
}

#[test]
fn long_sequence_16k() {
    let mut rng = rng("long_sequence_16k");
    for dev in devices("long_sequence_16k") {
        // The emulator keeps the 16k keys but only the last 257 query rows (bottom-right
        // causal: each still walks about 16k keys); the full square takes it minutes.
        let sq = if dev.is_emulated() { 257 } else { 16384 };
        case::<Bf16>(
            &mut rng,
            &dev,
            &Attention::new(1, sq, 16384, 1, 1, 64).causal(true),
            1.0,
        );
    }
}

/// Runs varlen on `dev`; returns (o, lse).
fn run_varlen<T: Element>(
    dev: &Device,
    a: &VarlenAttention<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    let Offsets::Host { q: cu_q, k: cu_k } = a.offsets else {
        panic!("host offsets expected");
    };
    run_varlen_with(dev, a, (cu_q, cu_k), q, k, v)
}

/// [`run_varlen`] with the offsets buffers given apart from the problem (which may have
/// device-only offsets).
fn run_varlen_with<T: Element>(
    dev: &Device,
    a: &VarlenAttention<'_>,
    (cu_q, cu_k): (&[i32], &[i32]),
    q: &[T],
    k: &[T],
    v: &[T],
) -> attnkit::Result<(Vec<T>, Vec<f32>)> {
    let mut o = poisoned::<T>(a.o_len());
    let mut lse = vec![f32::NAN; a.lse_len()];
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let (qd, kd, vd) = (
            s.clone_htod(q).unwrap(),
            s.clone_htod(k).unwrap(),
            s.clone_htod(v).unwrap(),
        );
        let (cq, ck) = (s.clone_htod(cu_q).unwrap(), s.clone_htod(cu_k).unwrap());
        let mut od = s.clone_htod(&o).unwrap();
        let mut ld = s.clone_htod(&lse).unwrap();
        flash::forward_varlen(
            dev,
            a,
            (&qd).into(),
            (&kd).into(),
            (&vd).into(),
            (&cq).into(),
            (&ck).into(),
            (&mut od).into(),
            (&mut ld).into(),
        )?;
        return Ok((s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap()));
    }
    flash::forward_varlen(
        dev,
        a,
        q.into(),
        k.into(),
        v.into(),
        cu_q.into(),
        cu_k.into(),
        (&mut o).into(),
        (&mut lse).into(),
    )?;
    Ok((o, lse))
}

#[test]
fn varlen_batches_match_the_oracle_per_sequence() {
    let mut rng = rng("varlen_batches_match_the_oracle_per_sequence");
    // Very different lengths; an empty sequence; a sequence with rows but no keys.
    let cu_q = [0i32, 1, 1, 301, 318, 1318, 1321];
    let cu_k = [0i32, 7, 7, 900, 901, 1901, 1901];
    let (hq, hk, d) = (4, 2, 64);
    for dev in devices("varlen_batches_match_the_oracle_per_sequence") {
        for causal in [false, true] {
            let a = VarlenAttention::new(&cu_q, &cu_k, hq, hk, d).causal(causal);
            let tq = *cu_q.last().unwrap() as usize;
            let tk = *cu_k.last().unwrap() as usize;
            let q: Vec<Bf16> = random(&mut rng, tq * hq * d);
            let k: Vec<Bf16> = random(&mut rng, tk * hk * d);
            let v: Vec<Bf16> = random(&mut rng, tk * hk * d);
            let (o, lse) = run_varlen(&dev, &a, &q, &k, &v).unwrap();
            for bi in 0..cu_q.len() - 1 {
                let (q0, q1) = (cu_q[bi] as usize, cu_q[bi + 1] as usize);
                let (k0, k1) = (cu_k[bi] as usize, cu_k[bi + 1] as usize);
                if q1 == q0 {
                    continue;
                }
                // Sequence bi as a batch-1 problem over the same packed buffers.
                let one = Attention::new(1, q1 - q0, (k1 - k0).max(1), hq, hk, d).causal(causal);
                let qs = &q[q0 * hq * d..];
                let os = &o[q0 * hq * d..];
                let what = format!("{} varlen seq {bi} causal={causal}", dev.name());
                if k1 == k0 {
                    // No keys at all: every row is empty.
                    assert!(
                        os[..(q1 - q0) * hq * d].iter().all(|x| x.to_f32() == 0.0),
                        "{what}: O not 0"
                    );
                    for h in 0..hq {
                        assert!(
                            lse[h * tq + q0..h * tq + q1]
                                .iter()
                                .all(|x| *x == f32::NEG_INFINITY),
                            "{what}: LSE"
                        );
                    }
                    continue;
                }
                let lse_seq: Vec<f32> = (0..hq)
                    .flat_map(|h| lse[h * tq + q0..h * tq + q1].to_vec())
                    .collect();
                check(
                    &what,
                    &one,
                    qs,
                    &k[k0 * hk * d..],
                    &v[k0 * hk * d..],
                    os,
                    &lse_seq,
                );
            }
        }
    }
}

/// Device-only offsets (no host copy; the sizes from the caller) give the bits of host ones;
/// tables that break the declared sizes are typed errors on the CPU and skipped sequences
/// (rows left unwritten, nothing out of bounds) on a GPU.
#[test]
fn device_only_offsets_match_host_ones_and_stale_tables_stay_in_bounds() {
    let mut rng = rng("device_only_offsets_match_host_ones_and_stale_tables_stay_in_bounds");
    let cu_q = [0i32, 70, 70, 200, 201];
    let cu_k = [0i32, 90, 91, 300, 333];
    let (hq, hk, d) = (4, 2, 64);
    let dims = DeviceOffsets {
        batch: 4,
        total_q: 201,
        total_k: 333,
        max_seqlen_q: 130,
        max_seqlen_k: 209,
    };
    let q: Vec<Bf16> = random(&mut rng, 201 * hq * d);
    let k: Vec<Bf16> = random(&mut rng, 333 * hk * d);
    let v: Vec<Bf16> = random(&mut rng, 333 * hk * d);
    for dev in devices("device_only_offsets_match_host_ones_and_stale_tables_stay_in_bounds") {
        let host = VarlenAttention::new(&cu_q, &cu_k, hq, hk, d).causal(true);
        let device = VarlenAttention::with_device_offsets(dims, hq, hk, d).causal(true);
        let want = run_varlen(&dev, &host, &q, &k, &v).unwrap();
        let got = run_varlen_with(&dev, &device, (&cu_q, &cu_k), &q, &k, &v).unwrap();
        let bits = |x: &[Bf16]| x.iter().map(|y| y.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.0), bits(&want.0), "{}: o", dev.name());
        assert_eq!(got.1.len(), want.1.len());
        assert!(
            got.1
                .iter()
                .zip(&want.1)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // A table whose sequence 2 outgrew the declared maxima (a stale table), and one whose
        // last sequence ends past the declared total.
        let too_long = [0i32, 10, 10, 200, 201];
        let past_end = [0i32, 70, 70, 200, 260];
        // (table, what, rows left unwritten, rows equal to the host-offset result)
        type Rows = std::ops::Range<usize>;
        let cases: [(&[i32], &str, Rows, Rows); 2] = [
            (&too_long, "longer than max_seqlen_q", 10..200, 200..201),
            (&past_end, "past total_q", 200..201, 0..200),
        ];
        for (bad_q, what, skipped, same) in cases {
            let r = run_varlen_with(&dev, &device, (bad_q, &cu_k), &q, &k, &v);
            if !dev.is_cuda() {
                match r {
                    Err(e) => assert_eq!(e.arg(), Some("cu_seqlens_q"), "{what}: {e}"),
                    Ok(_) => panic!("{what}: accepted on the CPU"),
                }
                continue;
            }
            let (o, _) = r.unwrap();
            let row = |x: &[Bf16], r: usize| bits(&x[r * hq * d..(r + 1) * hq * d]);
            for r in skipped {
                assert!(
                    row(&o, r).iter().all(|b| f32::from_bits(*b).is_nan()),
                    "{what}: row {r} written"
                );
            }
            for r in same {
                assert_eq!(row(&o, r), row(&want.0, r), "{what}: row {r} differs");
            }
        }
    }
}

fn expect_err(r: attnkit::Result<(Vec<f32>, Vec<f32>)>, arg: &str) {
    match r {
        Err(e) => assert_eq!(e.arg(), Some(arg), "wrong argument named: {e}"),
        Ok(_) => panic!("expected an error naming `{arg}`"),
    }
}

#[test]
fn bad_input_is_a_typed_error_naming_the_argument() {
    for dev in devices("bad_input_is_a_typed_error_naming_the_argument") {
        let a = Attention::new(1, 16, 16, 2, 1, 64);
        let q = vec![0.5f32; a.o_len()];
        let kv = vec![0.5f32; 16 * 64];
        expect_err(run(&dev, &a, &q[1..], &kv, &kv, a.o_len()), "q");
        expect_err(run(&dev, &a, &q, &kv[1..], &kv, a.o_len()), "k");
        expect_err(run(&dev, &a, &q, &kv, &kv[1..], a.o_len()), "v");
        expect_err(run(&dev, &a, &q, &kv, &kv, a.o_len() - 1), "o");
        expect_err(
            run(
                &dev,
                &Attention::new(1, 16, 16, 2, 1, 48),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "head_dim",
        );
        expect_err(
            run(
                &dev,
                &Attention::new(1, 16, 16, 3, 2, 64),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "heads_kv",
        );
        expect_err(
            run(
                &dev,
                &Attention::new(1, 16, 16, 2, 0, 64),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "heads_kv",
        );
        expect_err(
            run(
                &dev,
                &Attention::new(0, 16, 16, 2, 1, 64),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "batch",
        );
        expect_err(
            run(
                &dev,
                &Attention::new(1, 0, 16, 2, 1, 64),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "seq_q",
        );
        expect_err(
            run(
                &dev,
                &Attention::new(1, 16, 0, 2, 1, 64),
                &q,
                &kv,
                &kv,
                a.o_len(),
            ),
            "seq_k",
        );
        expect_err(
            run(&dev, &a.clone().scale(f32::NAN), &q, &kv, &kv, a.o_len()),
            "scale",
        );
        let mut strided = a.clone();
        strided.k_strides.dim = 2;
        expect_err(run(&dev, &strided, &q, &kv, &kv, a.o_len()), "k");
        let mut overlap = a.clone();
        overlap.o_strides.head = 0;
        expect_err(run(&dev, &overlap, &q, &kv, &kv, a.o_len()), "o");
        let mut overrun = a.clone();
        overrun.v_strides.row = usize::MAX / 2;
        expect_err(run(&dev, &overrun, &q, &kv, &kv, a.o_len()), "v");
        // Varlen offsets.
        let bad: [(&[i32], &[i32], &str); 4] = [
            (&[0, 5, 3], &[0, 4, 8], "cu_seqlens_q"),
            (&[1, 5], &[0, 4], "cu_seqlens_q"),
            (&[0, 5], &[0, 4, 8], "cu_seqlens_k"),
            (&[0, 16], &[0, 17], "k"),
        ];
        for (cq, ck, arg) in bad {
            let va = VarlenAttention::new(cq, ck, 2, 1, 64);
            expect_err(run_varlen(&dev, &va, &q, &kv, &kv), arg);
        }
    }
}

#[test]
fn nothing_is_written_on_error() {
    let a = Attention::new(1, 16, 16, 1, 1, 64);
    let q = vec![0.5f32; a.o_len()];
    let mut o = vec![f32::NAN; a.o_len()];
    let mut lse = vec![f32::NAN; a.lse_len()];
    let e = flash::forward(
        &Device::cpu(),
        &a,
        (&q).into(),
        (&q[1..]).into(),
        (&q).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "k", .. }), "{e}");
    assert!(o.iter().chain(&lse).all(|x| x.is_nan()));
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_rejects_strides_the_tensor_cores_cannot_load() {
    let Some(dev) = gpu("gpu_rejects_strides_the_tensor_cores_cannot_load") else {
        return;
    };
    let mut a = Attention::new(1, 16, 16, 1, 1, 64);
    a.q_strides.row = 68; // not a multiple of 8 bf16 elements (16 bytes)
    let q: Vec<Bf16> = vec![Bf16::from_f32(0.1); 16 * 68];
    let kv: Vec<Bf16> = vec![Bf16::from_f32(0.1); 16 * 64];
    let r = run(&dev, &a, &q, &kv, &kv, a.o_len());
    match r {
        Err(e) => assert_eq!(e.arg(), Some("q"), "{e}"),
        Ok(_) => panic!("misaligned row stride accepted"),
    }
    // A host buffer on a GPU call is a placement error naming it.
    let mut o = vec![Bf16::nan(); a.o_len()];
    let mut lse = vec![f32::NAN; a.lse_len()];
    let b = Attention::new(1, 16, 16, 1, 1, 64);
    let e = flash::forward(
        &dev,
        &b,
        (&kv).into(),
        (&kv).into(),
        (&kv).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Placement { arg: "q", .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Variants: windows, sinks, block masks, entropy scale, sink logits, relu², entropy output.
// ---------------------------------------------------------------------------------------------

/// Host data for the extras of one run.
#[derive(Clone, Default)]
struct HostX {
    sinks: Option<Vec<f32>>,
    alibi: Option<Vec<f32>>,
    mask: Option<(Vec<u8>, usize, usize)>,
    entropy: bool,
}

impl HostX {
    fn oracle(&self) -> HostExtras<'_> {
        HostExtras {
            sink_logits: self.sinks.as_deref(),
            alibi_slopes: self.alibi.as_deref(),
            block_mask: self.mask.as_ref().map(|(m, bq, bk)| (&m[..], *bq, *bk)),
        }
    }
}

/// `forward_with` on `dev`, outputs poisoned: (o, lse, entropy if asked).
fn run_with<T: Element>(
    dev: &Device,
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    x: &HostX,
) -> attnkit::Result<(Vec<T>, Vec<f32>, Vec<f32>)> {
    let mut o = poisoned::<T>(a.o_len());
    let mut lse = vec![f32::NAN; a.lse_len()];
    let mut ent = vec![f32::NAN; if x.entropy { a.lse_len() } else { 0 }];
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let (qd, kd, vd) = (
            s.clone_htod(q).unwrap(),
            s.clone_htod(k).unwrap(),
            s.clone_htod(v).unwrap(),
        );
        let (mut od, mut ld, mut ed) = (
            s.clone_htod(&o).unwrap(),
            s.clone_htod(&lse).unwrap(),
            s.clone_htod(&ent).unwrap(),
        );
        let sd = x.sinks.as_ref().map(|v| s.clone_htod(v).unwrap());
        let ad = x.alibi.as_ref().map(|v| s.clone_htod(v).unwrap());
        let md = x
            .mask
            .as_ref()
            .map(|(m, bq, bk)| (s.clone_htod(m).unwrap(), *bq, *bk));
        let extras = Extras {
            sink_logits: sd.as_ref().map(|b| b.into()),
            alibi_slopes: ad.as_ref().map(|b| b.into()),
            entropy: x.entropy.then(|| (&mut ed).into()),
            block_mask: md.as_ref().map(|(m, bq, bk)| BlockMask {
                mask: m.into(),
                block_q: *bq,
                block_k: *bk,
            }),
        };
        flash::forward_with(
            dev,
            a,
            (&qd).into(),
            (&kd).into(),
            (&vd).into(),
            (&mut od).into(),
            (&mut ld).into(),
            extras,
        )?;
        return Ok((
            s.clone_dtoh(&od).unwrap(),
            s.clone_dtoh(&ld).unwrap(),
            s.clone_dtoh(&ed).unwrap(),
        ));
    }
    let extras = Extras {
        sink_logits: x.sinks.as_ref().map(|v| v.into()),
        alibi_slopes: x.alibi.as_ref().map(|v| v.into()),
        entropy: x.entropy.then(|| (&mut ent).into()),
        block_mask: x.mask.as_ref().map(|(m, bq, bk)| BlockMask {
            mask: m.into(),
            block_q: *bq,
            block_k: *bk,
        }),
    };
    flash::forward_with(
        dev,
        a,
        q.into(),
        k.into(),
        v.into(),
        (&mut o).into(),
        (&mut lse).into(),
        extras,
    )?;
    Ok((o, lse, ent))
}

/// Checks a variant run against the oracle. f32: tight. f16/bf16: twice the output rounding,
/// plus what rounding P to T can cost (eps_T times the output scale), plus 1e-3.
#[allow(clippy::too_many_arguments)]
fn check_variant<T: Element>(
    what: &str,
    a: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    x: &HostX,
    o: &[T],
    lse: &[f32],
    ent: &[f32],
) {
    let d = a.head_dim;
    let eps = match T::DTYPE {
        DType::F32 => 0.0,
        DType::F16 => 1.0 / 1024.0,
        DType::Bf16 => 1.0 / 128.0,
    };
    let (mut err, mut round_err, mut scale) = (0.0f64, 0.0f64, 1.0f64);
    let mut first = None;
    for b in 0..a.batch {
        for h in 0..a.heads_q {
            for i in rows_to_check(a.seq_q) {
                let r = oracle::attention_row_with(a, q, k, v, &x.oracle(), b, h, i);
                let off = ((b * a.seq_q + i) * a.heads_q + h) * d;
                for c in 0..d {
                    let got = o[off + c].to_f32() as f64;
                    let e = (got - r.o[c]).abs();
                    let e = if e.is_nan() { f64::INFINITY } else { e };
                    if e > err {
                        err = e;
                        first.get_or_insert((b, h, i, c, got, r.o[c]));
                    }
                    round_err =
                        round_err.max((T::from_f32(r.o[c] as f32).to_f32() as f64 - r.o[c]).abs());
                    scale = scale.max(r.o[c].abs());
                }
                let li = (b * a.heads_q + h) * a.seq_q + i;
                let close = |got: f32, want: f64| {
                    if want.is_infinite() {
                        got as f64 == want
                    } else {
                        (got as f64 - want).abs() <= 2e-4 * (1.0 + want.abs())
                    }
                };
                assert!(
                    close(lse[li], r.lse),
                    "{what}: lse at b={b} h={h} row={i}: got {}, want {}",
                    lse[li],
                    r.lse
                );
                if x.entropy {
                    assert!(
                        close(ent[li], r.entropy),
                        "{what}: entropy at b={b} h={h} row={i}: got {}, want {}",
                        ent[li],
                        r.entropy
                    );
                }
            }
        }
    }
    let bound = if T::DTYPE == DType::F32 {
        2e-5 * scale
    } else {
        2.0 * round_err + 2.0 * eps * scale + 1e-3
    };
    assert!(
        err <= bound,
        "{what}: max |o - ref| = {err:e} > {bound:e} (first b,h,row,col,got,want = {first:?})"
    );
}

fn variant<T: Element>(rng: &mut StdRng, dev: &Device, a: &Attention, x: &HostX, label: &str) {
    let (q, k, v) = inputs::<T>(rng, a, 1.0);
    let (o, lse, ent) = run_with(dev, a, &q, &k, &v, x).unwrap();
    let what = format!(
        "{} {} {label} sq={} sk={} d={} {:?}",
        dev.name(),
        T::DTYPE,
        a.seq_q,
        a.seq_k,
        a.head_dim,
        a.opts
    );
    check_variant(&what, a, &q, &k, &v, x, &o, &lse, &ent);
}

fn windows_and_sinks<T: Element>(test: &str) {
    let mut rng = rng(test);
    for dev in devices(test) {
        for (sq, sk) in [(300, 300), (150, 333), (333, 150)] {
            let base = Attention::new(1, sq, sk, 2, 1, 64);
            let cases = [
                ("window 0", base.clone().window(Some(0), Some(0))),
                (
                    "causal window 31",
                    base.clone().causal(true).window(Some(31), None),
                ),
                ("window (64, 17)", base.clone().window(Some(64), Some(17))),
                ("window >= seq", base.clone().window(Some(1000), Some(1000))),
                (
                    "streaming: 4 sinks + window 50",
                    base.clone().causal(true).window(Some(49), Some(0)).sinks(4),
                ),
                (
                    "sinks >= seq",
                    base.clone().causal(true).window(Some(10), None).sinks(400),
                ),
                ("sinks without window", base.clone().causal(true).sinks(3)),
            ];
            for (label, a) in cases {
                variant::<T>(
                    &mut rng,
                    &dev,
                    &a,
                    &HostX {
                        entropy: true,
                        ..Default::default()
                    },
                    label,
                );
            }
        }
    }
}

#[test]
fn windows_and_sinks_f32() {
    windows_and_sinks::<f32>("windows_and_sinks_f32");
}

#[test]
fn windows_and_sinks_bf16() {
    windows_and_sinks::<Bf16>("windows_and_sinks_bf16");
}

#[test]
fn learned_sink_logits_including_infinities() {
    let mut rng = rng("learned_sink_logits_including_infinities");
    let sinks = vec![0.5f32, f32::NEG_INFINITY, f32::INFINITY, 3.0];
    for dev in devices("learned_sink_logits_including_infinities") {
        for causal in [false, true] {
            let a = Attention::new(2, 130, 77, 4, 2, 128).causal(causal);
            let x = HostX {
                sinks: Some(sinks.clone()),
                entropy: true,
                ..Default::default()
            };
            variant::<f32>(&mut rng, &dev, &a, &x, "sink logits");
            variant::<F16>(&mut rng, &dev, &a, &x, "sink logits");
        }
    }
}

#[test]
fn block_sparse_layouts_with_empty_rows() {
    let mut rng = rng("block_sparse_layouts_with_empty_rows");
    for dev in devices("block_sparse_layouts_with_empty_rows") {
        let (sq, sk): (usize, usize) = (300, 300);
        // Sparse Transformer: local (width 2) OR strided (stride 3), causal, 64-key blocks.
        let (rows, cols) = (sq.div_ceil(64), sk.div_ceil(64));
        let local = BlockMask::local_layout(rows, cols, 2).unwrap();
        let strided = BlockMask::strided_layout(rows, cols, 3).unwrap();
        let both: Vec<u8> = local.iter().zip(&strided).map(|(a, b)| a | b).collect();
        let a = Attention::new(1, sq, sk, 2, 2, 64).causal(true);
        variant::<Bf16>(
            &mut rng,
            &dev,
            &a,
            &HostX {
                mask: Some((both, 64, 64)),
                entropy: true,
                ..Default::default()
            },
            "local|strided",
        );
        // A random layout at a granularity unlike the kernels' tiles, with an empty mask row
        // (those query rows see nothing: O = 0, LSE = -inf).
        let (bq, bk) = (32, 48);
        let (rows, cols) = (sq.div_ceil(bq), sk.div_ceil(bk));
        let mut m: Vec<u8> = (0..rows * cols)
            .map(|_| rand::Rng::random_bool(&mut rng, 0.4) as u8)
            .collect();
        m[2 * cols..3 * cols].fill(0);
        for causal in [false, true] {
            let a = Attention::new(1, sq, sk, 2, 1, 64).causal(causal);
            variant::<f32>(
                &mut rng,
                &dev,
                &a,
                &HostX {
                    mask: Some((m.clone(), bq, bk)),
                    entropy: true,
                    ..Default::default()
                },
                "random blocks",
            );
        }
    }
}

#[test]
fn entropy_invariant_scale() {
    let mut rng = rng("entropy_invariant_scale");
    for dev in devices("entropy_invariant_scale") {
        for a in [
            Attention::new(1, 257, 257, 2, 1, 64)
                .causal(true)
                .entropy_invariant_scale(true),
            Attention::new(1, 100, 700, 2, 2, 128).entropy_invariant_scale(true),
            Attention::new(1, 300, 300, 1, 1, 64)
                .causal(true)
                .window(Some(40), None)
                .sinks(2)
                .entropy_invariant_scale(true),
        ] {
            variant::<f32>(
                &mut rng,
                &dev,
                &a,
                &HostX {
                    entropy: true,
                    ..Default::default()
                },
                "entropy scale",
            );
            variant::<Bf16>(&mut rng, &dev, &a, &HostX::default(), "entropy scale");
        }
    }
}

#[test]
fn relu2_attention_both_normalisations() {
    let mut rng = rng("relu2_attention_both_normalisations");
    for dev in devices("relu2_attention_both_normalisations") {
        for norm in [Relu2Norm::SeqLen, Relu2Norm::Visible] {
            for a in [
                Attention::new(1, 200, 200, 1, 1, 128).causal(true),
                Attention::new(2, 77, 150, 2, 2, 64),
                Attention::new(1, 300, 300, 1, 1, 64)
                    .causal(true)
                    .window(Some(30), None),
            ] {
                let a = a.score(Score::Relu2(norm));
                variant::<f32>(&mut rng, &dev, &a, &HostX::default(), "relu2");
                variant::<F16>(&mut rng, &dev, &a, &HostX::default(), "relu2");
            }
        }
    }
}

/// Soft-capping and ALiBi, each and together, with the masks, sinks, sink logits, entropy
/// scale and GQA they combine with. A scale of 1 makes raw scores of a few units, so a cap of
/// 2 changes most of them; slopes up to 1/2 over 300 keys make the bias dominate.
fn softcap_and_alibi<T: Element>(test: &str) {
    let mut rng = rng(test);
    for dev in devices(test) {
        for (sq, sk) in [(150, 333), (333, 150)] {
            let base = Attention::new(1, sq, sk, 4, 2, 64).scale(1.0);
            // Per head, one of them 0 (no bias) and one negative (a bias toward distance).
            let slopes = Some(vec![0.5f32, 0.0, 0.0625, -0.01]);
            let alibi = HostX {
                alibi: slopes.clone(),
                entropy: true,
                ..Default::default()
            };
            let cases = [
                ("softcap", base.clone().softcap(2.0), HostX::default()),
                (
                    "causal softcap + alibi",
                    base.clone().causal(true).softcap(2.0),
                    alibi.clone(),
                ),
                ("alibi", base.clone(), alibi.clone()),
                ("causal alibi", base.clone().causal(true), alibi.clone()),
                (
                    "streaming + softcap + alibi + sink logits",
                    base.clone()
                        .causal(true)
                        .window(Some(49), Some(0))
                        .sinks(4)
                        .softcap(3.0),
                    HostX {
                        sinks: Some(vec![0.5, f32::NEG_INFINITY, 2.0, -1.0]),
                        ..alibi.clone()
                    },
                ),
                (
                    "window (64, 17) + entropy scale + softcap",
                    base.clone()
                        .window(Some(64), Some(17))
                        .entropy_invariant_scale(true)
                        .softcap(1.5),
                    alibi.clone(),
                ),
            ];
            for (label, a, x) in cases {
                variant::<T>(&mut rng, &dev, &a, &x, label);
            }
        }
    }
}

#[test]
fn softcap_and_alibi_f32() {
    softcap_and_alibi::<f32>("softcap_and_alibi_f32");
}

#[test]
fn softcap_and_alibi_bf16() {
    softcap_and_alibi::<Bf16>("softcap_and_alibi_bf16");
}

#[test]
fn softcap_and_alibi_f16_at_the_new_head_dims() {
    let mut rng = rng("softcap_and_alibi_f16_at_the_new_head_dims");
    for dev in devices("softcap_and_alibi_f16_at_the_new_head_dims") {
        for d in [80, 112, 192] {
            let a = Attention::new(2, 77, 140, 2, 1, d)
                .causal(true)
                .scale(0.5)
                .softcap(2.0);
            let x = HostX {
                alibi: Some(vec![0.25, 0.125]),
                ..Default::default()
            };
            variant::<F16>(&mut rng, &dev, &a, &x, "softcap + alibi");
        }
    }
}

#[test]
fn variants_reject_bad_input_naming_the_argument() {
    for dev in devices("variants_reject_bad_input_naming_the_argument") {
        let a = Attention::new(1, 16, 16, 2, 1, 64);
        let q = vec![0.5f32; a.o_len()];
        let kv = vec![0.5f32; 16 * 64];
        let err = |a: &Attention, x: HostX, arg: &str| match run_with(&dev, a, &q, &kv, &kv, &x) {
            Err(e) => assert_eq!(e.arg(), Some(arg), "{e}"),
            Ok(_) => panic!("expected an error naming `{arg}`"),
        };
        let relu = a.clone().score(Score::Relu2(Relu2Norm::SeqLen));
        err(
            &a.clone().window(Some(usize::MAX), None),
            HostX::default(),
            "window_left",
        );
        err(
            &a.clone().window(None, Some(1 << 31)),
            HostX::default(),
            "window_right",
        );
        err(&a.clone().sinks(usize::MAX), HostX::default(), "sinks");
        for cap in [0.0, -1.0, f32::NAN, f32::INFINITY, f32::MAX, 1e-40] {
            err(&a.clone().softcap(cap), HostX::default(), "softcap");
        }
        err(&relu.clone().softcap(30.0), HostX::default(), "softcap");
        let slopes = |s: Vec<f32>| HostX {
            alibi: Some(s),
            ..Default::default()
        };
        err(&a, slopes(vec![0.5; 3]), "alibi_slopes");
        err(&relu, slopes(vec![0.5; 2]), "alibi_slopes");
        if !dev.is_cuda() {
            // The host reads host slopes only.
            err(&a, slopes(vec![0.5, f32::NAN]), "alibi_slopes");
            err(&a, slopes(vec![f32::INFINITY, 0.5]), "alibi_slopes");
        }
        err(
            &a,
            HostX {
                sinks: Some(vec![0.0; 3]),
                ..Default::default()
            },
            "sink_logits",
        );
        err(
            &a,
            HostX {
                mask: Some((vec![1; 3], 8, 8)),
                ..Default::default()
            },
            "block_mask",
        );
        err(
            &a,
            HostX {
                mask: Some((vec![1; 4], 0, 8)),
                ..Default::default()
            },
            "block_mask",
        );
        err(
            &relu,
            HostX {
                sinks: Some(vec![0.0; 2]),
                ..Default::default()
            },
            "sink_logits",
        );
        err(
            &relu,
            HostX {
                entropy: true,
                ..Default::default()
            },
            "entropy",
        );
        err(
            &relu.clone().entropy_invariant_scale(true),
            HostX::default(),
            "entropy_scale",
        );
        err(
            &a.clone().entropy_invariant_scale(true),
            HostX {
                mask: Some((vec![1; 4], 8, 8)),
                ..Default::default()
            },
            "block_mask",
        );
        err(
            &a.clone().score(Score::Relu2(Relu2Norm::Visible)),
            HostX {
                mask: Some((vec![1; 4], 8, 8)),
                ..Default::default()
            },
            "block_mask",
        );
        // An entropy buffer too short.
        let mut o = vec![f32::NAN; a.o_len()];
        let mut lse = vec![f32::NAN; a.lse_len()];
        let mut ent = vec![f32::NAN; 5];
        if !dev.is_cuda() {
            let x = Extras {
                entropy: Some((&mut ent).into()),
                ..Default::default()
            };
            let e = flash::forward_with(
                &dev,
                &a,
                (&q).into(),
                (&kv).into(),
                (&kv).into(),
                (&mut o).into(),
                (&mut lse).into(),
                x,
            )
            .unwrap_err();
            assert_eq!(e.arg(), Some("entropy"), "{e}");
        }
    }
}

#[test]
fn varlen_with_variants_matches_the_oracle_per_sequence() {
    let mut rng = rng("varlen_with_variants_matches_the_oracle_per_sequence");
    let cu_q = [0i32, 70, 70, 200, 201];
    let cu_k = [0i32, 90, 91, 300, 333];
    let (hq, hk, d) = (2, 1, 64);
    let (tq, tk) = (201usize, 333usize);
    let (bq, bk) = (16usize, 32usize);
    let (max_q, max_k) = (130usize, 209usize);
    let (rows, cols) = (max_q.div_ceil(bq), max_k.div_ceil(bk));
    let mask: Vec<u8> = (0..rows * cols).map(|i| ((i * 7) % 5 != 0) as u8).collect();
    let sinks = vec![0.25f32, f32::NEG_INFINITY];
    // ALiBi's distance is to each sequence's own diagonal (its seq_k - seq_q): slopes that
    // make it matter, one head without.
    let alibi = vec![0.0625f32, 0.0];
    for dev in devices("varlen_with_variants_matches_the_oracle_per_sequence") {
        for use_mask in [false, true] {
            let mut a = VarlenAttention::new(&cu_q, &cu_k, hq, hk, d)
                .causal(true)
                .window(Some(20), None)
                .sinks(2);
            if use_mask {
                a = a.softcap(0.5);
            }
            let q: Vec<f32> = random(&mut rng, tq * hq * d);
            let k: Vec<f32> = random(&mut rng, tk * hk * d);
            let v: Vec<f32> = random(&mut rng, tk * hk * d);
            let mut o = poisoned::<f32>(a.o_len());
            let mut lse = vec![f32::NAN; a.lse_len()];
            let mut ent = vec![f32::NAN; a.lse_len()];
            #[cfg(feature = "cuda")]
            if let Some(s) = dev.stream() {
                let up = |x: &[f32]| s.clone_htod(x).unwrap();
                let (qd, kd, vd, sd, ad) = (up(&q), up(&k), up(&v), up(&sinks), up(&alibi));
                let (cqd, ckd) = (s.clone_htod(&cu_q).unwrap(), s.clone_htod(&cu_k).unwrap());
                let md = s.clone_htod(&mask).unwrap();
                let (mut od, mut ld, mut ed) = (up(&o), up(&lse), up(&ent));
                let x = Extras {
                    sink_logits: Some((&sd).into()),
                    alibi_slopes: Some((&ad).into()),
                    entropy: Some((&mut ed).into()),
                    block_mask: use_mask.then(|| BlockMask {
                        mask: (&md).into(),
                        block_q: bq,
                        block_k: bk,
                    }),
                };
                flash::forward_varlen_with(
                    &dev,
                    &a,
                    (&qd).into(),
                    (&kd).into(),
                    (&vd).into(),
                    (&cqd).into(),
                    (&ckd).into(),
                    (&mut od).into(),
                    (&mut ld).into(),
                    x,
                )
                .unwrap();
                o = s.clone_dtoh(&od).unwrap();
                lse = s.clone_dtoh(&ld).unwrap();
                ent = s.clone_dtoh(&ed).unwrap();
            }
            if !dev.is_cuda() {
                let x = Extras {
                    sink_logits: Some((&sinks).into()),
                    alibi_slopes: Some((&alibi).into()),
                    entropy: Some((&mut ent).into()),
                    block_mask: use_mask.then(|| BlockMask {
                        mask: (&mask).into(),
                        block_q: bq,
                        block_k: bk,
                    }),
                };
                flash::forward_varlen_with(
                    &dev,
                    &a,
                    (&q).into(),
                    (&k).into(),
                    (&v).into(),
                    cu_q[..].into(),
                    cu_k[..].into(),
                    (&mut o).into(),
                    (&mut lse).into(),
                    x,
                )
                .unwrap();
            }
            for bi in 0..cu_q.len() - 1 {
                let (q0, q1) = (cu_q[bi] as usize, cu_q[bi + 1] as usize);
                let (k0, k1) = (cu_k[bi] as usize, cu_k[bi + 1] as usize);
                if q1 == q0 {
                    continue;
                }
                let mut one = Attention::new(1, q1 - q0, k1 - k0, hq, hk, d)
                    .causal(true)
                    .window(Some(20), None)
                    .sinks(2);
                one.opts.softcap = a.opts.softcap;
                // The sequence's own corner of the mask, re-laid with its own column count.
                let seq_cols = (k1 - k0).div_ceil(bk);
                let seq_mask: Vec<u8> = (0..(q1 - q0).div_ceil(bq) * seq_cols)
                    .map(|i| mask[(i / seq_cols) * cols + i % seq_cols])
                    .collect();
                let hx = HostX {
                    sinks: Some(sinks.clone()),
                    alibi: Some(alibi.clone()),
                    mask: use_mask.then_some((seq_mask, bq, bk)),
                    entropy: true,
                };
                let gather = |x: &[f32]| -> Vec<f32> {
                    (0..hq)
                        .flat_map(|h| x[h * tq + q0..h * tq + q1].to_vec())
                        .collect()
                };
                let what = format!("{} varlen variants seq {bi} mask={use_mask}", dev.name());
                check_variant(
                    &what,
                    &one,
                    &q[q0 * hq * d..],
                    &k[k0 * hk * d..],
                    &v[k0 * hk * d..],
                    &hx,
                    &o[q0 * hq * d..],
                    &gather(&lse),
                    &gather(&ent),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 13: sizes, limits, overlap, NaN, one source of truth for offsets, relu² overflow.
// ---------------------------------------------------------------------------------------------

/// `forward` on the CPU with buffers of the given lengths (short ones for huge problems: the
/// call must refuse the problem before it looks at them).
fn cpu_forward(a: &Attention, len: usize) -> attnkit::Result<()> {
    let x = vec![0.5f32; len];
    let (mut o, mut lse) = (vec![f32::NAN; len], vec![f32::NAN; len]);
    flash::forward(
        &Device::cpu(),
        a,
        (&x).into(),
        (&x).into(),
        (&x).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
}

#[test]
fn size_helpers_saturate_instead_of_overflowing() {
    let big = usize::MAX;
    let s = Strides::contiguous(big, big, 64);
    assert_eq!((s.batch, s.row, s.head), (big, big, 64));
    let a = Attention::new(big, big, big, big, big, 256);
    assert_eq!((a.o_len(), a.lse_len()), (big, big));
    let cu = [0, i32::MAX];
    let va = VarlenAttention::new(&cu, &cu, big, 1, 256);
    assert_eq!((va.o_len(), va.lse_len()), (big, big));
    // forward refuses them, naming a size, before forming any product.
    let e = cpu_forward(&Attention::new(1 << 40, 1 << 40, 1, 1, 1, 64), 64).unwrap_err();
    assert_eq!(e.arg(), Some("batch"), "{e}");
    let e = cpu_forward(&Attention::new(1024, 1 << 21, 1, 1, 1, 64), 64).unwrap_err();
    assert_eq!(e.arg(), Some("total_q"), "{e}");
    let e = cpu_forward(&Attention::new(1, 1, 1, 1 << 20, 1, 64), 64).unwrap_err();
    assert_eq!(e.arg(), Some("heads_q"), "{e}");
}

#[test]
fn sizes_past_max_len_are_refused_before_the_kernels_int_arithmetic_wraps() {
    // hi(0) = 0 + (seq_k - 1) + 2^30 would wrap int32 on the device.
    let a = Attention::new(1, 1, (1 << 30) + 64, 1, 1, 64).window(None, Some(1 << 30));
    let e = cpu_forward(&a, 64).unwrap_err();
    assert!(matches!(e, Error::Unsupported { arg: "seq_k", .. }), "{e}");
    let e = cpu_forward(&Attention::new(1, flash::MAX_LEN + 1, 1, 1, 1, 64), 64).unwrap_err();
    assert_eq!(e.arg(), Some("seq_q"), "{e}");
    // Exactly at the limit the size check passes: the short buffer is what is refused.
    let a = Attention::new(1, 1, flash::MAX_LEN, 1, 1, 64).window(None, Some(flash::MAX_LEN));
    let e = cpu_forward(&a, 64).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "k", .. }), "{e}");
    let cu_q = [0, 1];
    let cu_k = [0, (1 << 30) + 64];
    let va = VarlenAttention::new(&cu_q, &cu_k, 1, 1, 64);
    let x = vec![0.5f32; 64];
    let (mut o, mut lse) = (vec![f32::NAN; 64], vec![f32::NAN; 1]);
    let e = flash::forward_varlen(
        &Device::cpu(),
        &va,
        (&x).into(),
        (&x).into(),
        (&x).into(),
        cu_q[..].into(),
        cu_k[..].into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
    .unwrap_err();
    assert_eq!(e.arg(), Some("total_k"), "{e}");
}

/// The per-row sum `flops` used to walk: the definition the closed form must match.
fn flops_by_rows(a: &Attention) -> f64 {
    let mut pairs = 0u64;
    for i in 0..a.seq_q {
        for j in 0..a.seq_k {
            let diag = a.seq_k as i64 - a.seq_q as i64;
            let (i, j) = (i as i64, j as i64);
            let right = if a.opts.causal {
                Some(0)
            } else {
                a.opts.window_right.map(|r| r as i64)
            };
            let hi_ok = right.is_none_or(|r| j <= i + diag + r);
            let lo_ok = a.opts.window_left.is_none_or(|l| j >= i + diag - l as i64);
            if hi_ok && (lo_ok || j < a.opts.sinks as i64) {
                pairs += 1;
            }
        }
    }
    4.0 * (a.batch * a.heads_q * a.head_dim) as f64 * pairs as f64
}

#[test]
fn flops_closed_form_matches_the_row_sum_and_is_instant() {
    let mut rng = rng("flops_closed_form_matches_the_row_sum_and_is_instant");
    use rand::Rng;
    for _ in 0..5000 {
        let (sq, sk) = (rng.random_range(1..40), rng.random_range(1..40));
        let w = |rng: &mut StdRng| rng.random_bool(0.6).then(|| rng.random_range(0..45));
        let a = Attention::new(rng.random_range(1..3), sq, sk, 2, 1, 32)
            .causal(rng.random_bool(0.5))
            .window(w(&mut rng), w(&mut rng))
            .sinks(if rng.random_bool(0.5) {
                rng.random_range(0..45)
            } else {
                0
            });
        assert_eq!(a.flops(), flops_by_rows(&a), "{a:?}");
    }
    let t = std::time::Instant::now();
    let a = Attention::new(1, 1 << 30, 1 << 30, 1, 1, 64).causal(true);
    let n = (1u64 << 30) as f64;
    assert_eq!(a.flops(), 4.0 * 64.0 * n * (n + 1.0) / 2.0);
    let huge = Attention::new(usize::MAX, usize::MAX, usize::MAX, 1, 1, 64)
        .window(Some(usize::MAX), Some(3))
        .sinks(usize::MAX);
    assert!(huge.flops() > 0.0);
    assert!(t.elapsed().as_secs_f64() < 0.1);
}

#[test]
fn block_layouts_refuse_sizes_they_cannot_hold() {
    assert!(BlockMask::local_layout(usize::MAX, 2, 1).is_err());
    assert!(BlockMask::strided_layout(1 << 20, 1 << 20, 2).is_err());
    assert!(BlockMask::strided_layout(2, 2, 0).is_err());
    assert_eq!(BlockMask::local_layout(0, 5, 1).unwrap(), Vec::<u8>::new());
}

#[test]
fn interleaved_output_rows_are_not_an_overlap() {
    // o: rows 96 apart, 2 heads of 32 at 64 apart (the example): each row's second
    // head sits in the next row's gap. It used to be refused as "overlap".
    let mut rng = rng("interleaved_output_rows_are_not_an_overlap");
    for dev in devices("interleaved_output_rows_are_not_an_overlap") {
        let a = Attention::new(1, 20, 20, 2, 2, 32).causal(true);
        let (q, k, v) = inputs::<f32>(&mut rng, &a, 1.0);
        let (want, want_lse) = run(&dev, &a, &q, &k, &v, a.o_len()).unwrap();
        let mut b = a.clone();
        b.o_strides = Strides {
            batch: 20 * 96,
            row: 96,
            head: 64,
            dim: 1,
        };
        let (o, lse) = run(&dev, &b, &q, &k, &v, 19 * 96 + 64 + 32).unwrap();
        for r in 0..20 {
            for h in 0..2 {
                let got = &o[r * 96 + h * 64..][..32];
                assert_eq!(got, &want[(r * 2 + h) * 32..][..32], "row {r} head {h}");
            }
        }
        assert_eq!(lse, want_lse);
        // Heads 16 apart do overlap.
        b.o_strides.head = 16;
        expect_err(run(&dev, &b, &q, &k, &v, 19 * 96 + 64 + 32), "o");
    }
}

#[test]
fn nan_and_infinite_scales_and_sink_logits_are_typed_errors() {
    let a = Attention::new(1, 8, 8, 2, 1, 32);
    let q = vec![0.5f32; a.o_len()];
    let kv = vec![0.5f32; 8 * 32];
    let dev = Device::cpu();
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e38] {
        expect_err(
            run(&dev, &a.clone().scale(s), &q, &kv, &kv, a.o_len()),
            "scale",
        );
    }
    // A NaN sink logit used to give O = NaN with LSE = -inf.
    let x = HostX {
        sinks: Some(vec![0.0, f32::NAN]),
        ..Default::default()
    };
    let e = run_with(&dev, &a, &q, &kv, &kv, &x).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Value {
                arg: "sink_logits",
                ..
            }
        ),
        "{e}"
    );
    // +inf keeps its documented meaning: all weight on the sink.
    let x = HostX {
        sinks: Some(vec![f32::INFINITY, f32::NEG_INFINITY]),
        ..Default::default()
    };
    let (o, lse, _) = run_with(&dev, &a, &q, &kv, &kv, &x).unwrap();
    assert!(o[..32].iter().all(|&x| x == 0.0) && lse[0] == f32::INFINITY);
    assert!((o[32] - 0.5).abs() < 1e-6 && lse[8].is_finite());
}

#[test]
fn varlen_offset_buffers_must_match_the_problem_on_the_cpu() {
    // The problem says [0, 4, 10]; a buffer saying [0, 7, 10] used to be ignored on the CPU
    // (Ok) while a GPU would have used it.
    let cu = [0, 4, 10];
    let stale = [0, 7, 10];
    let a = VarlenAttention::new(&cu, &cu, 1, 1, 32);
    let x = vec![0.5f32; a.o_len()];
    for (bq, bk, arg) in [(&stale, &cu, "cu_seqlens_q"), (&cu, &stale, "cu_seqlens_k")] {
        let (mut o, mut lse) = (vec![f32::NAN; a.o_len()], vec![f32::NAN; a.lse_len()]);
        let e = flash::forward_varlen(
            &Device::cpu(),
            &a,
            (&x).into(),
            (&x).into(),
            (&x).into(),
            bq[..].into(),
            bk[..].into(),
            (&mut o).into(),
            (&mut lse).into(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Value { arg, .. } if arg == arg), "{e}");
        assert_eq!(e.arg(), Some(arg), "{e}");
        assert!(o.iter().all(|x| x.is_nan()), "nothing written on error");
    }
}

#[test]
fn f16_relu2_weights_beyond_f16_range_keep_a_representable_o() {
    // q = k = 16 everywhere, scale 1/2: every score is 64 * 256 / 2 = 8192, relu² = 6.7e7
    // (4.2e6 divided by 16 keys), far past f16's 65504, while O = Σ p v <= 6.7e7 * 2e-4 ≈ 1.3e4
    // is representable.
    // The GPU rounds P to f16 for the P V product: it scales each row's weights by a power of
    // two first (relu2_rescale in kernels/flash.cu); the CPU computes in f32. Both must give
    // the finite O.
    for dev in devices("f16_relu2_weights_beyond_f16_range_keep_a_representable_o") {
        for norm in [Relu2Norm::SeqLen, Relu2Norm::Visible] {
            let a = Attention::new(1, 16, 16, 1, 1, 64)
                .scale(0.5)
                .causal(norm == Relu2Norm::Visible)
                .score(Score::Relu2(norm));
            let q = vec![F16::from_f32(16.0); a.o_len()];
            let v: Vec<F16> = (0..a.o_len())
                .map(|i| F16::from_f32(1e-4 * (1 + i % 2) as f32))
                .collect();
            let (o, lse, ent) = run_with(&dev, &a, &q, &q, &v, &HostX::default()).unwrap();
            assert!(
                o.iter().all(|x| x.to_f32().is_finite()),
                "{}: O overflowed",
                dev.name()
            );
            check_variant(
                &format!("{} relu2 {norm:?}", dev.name()),
                &a,
                &q,
                &q,
                &v,
                &HostX::default(),
                &o,
                &lse,
                &ent,
            );
        }
    }
}
