//! Lightning Attention-2: the block split (CPU and, where there is one, GPU) against the f64
//! token-by-token recurrence, on fresh random inputs with poisoned outputs; chunked prefill +
//! decode against one pass; varlen against separate runs; the backward pass against finite
//! differences of the oracle; bad input as typed errors.

mod common;

use attnkit::lightning::{self, Backward, Config, Decode, Forward, Seqs, oracle};
use attnkit::{Bf16, Device, Element, Error, F16};
use common::*;
use rand::{Rng, rngs::StdRng};

/// One forward problem: sequences, heads, dims, decay, scale, form, initial state.
#[derive(Clone, Debug)]
struct Case {
    lens: Vec<usize>,
    /// Pass the sequences as `Seqs::Dense` (all `lens` equal) rather than varlen.
    dense: bool,
    heads: usize,
    d: usize,
    e: usize,
    decay: Option<Vec<f32>>,
    scale: f32,
    causal: bool,
    init: bool,
}

impl Case {
    fn causal(lens: &[usize], heads: usize, d: usize, e: usize, decay: Option<Vec<f32>>) -> Case {
        Case {
            lens: lens.to_vec(),
            dense: lens.iter().all(|&l| l == lens[0]),
            heads,
            d,
            e,
            decay,
            scale: 0.125,
            causal: true,
            init: false,
        }
    }
    fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
    fn cfg(&self) -> Config<'_> {
        Config {
            heads: self.heads,
            d: self.d,
            e: self.e,
            decay: self.decay.as_deref(),
            scale: self.scale,
            causal: self.causal,
        }
    }
    fn cu(&self) -> Vec<i32> {
        let mut cu = vec![0i32];
        for &l in &self.lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        cu
    }
    /// Dense when all lengths are equal, varlen over `cu` (this case's offsets) otherwise.
    fn seqs<'a>(&self, cu: attnkit::Buf<'a, i32>) -> Seqs<'a> {
        if self.dense {
            Seqs::Dense {
                batch: self.lens.len(),
                seq: self.lens[0],
            }
        } else {
            Seqs::Varlen {
                cu_seqlens: cu,
                max_seqlen: self.max_len(),
            }
        }
    }
    fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }
    fn state_len(&self) -> usize {
        self.lens.len() * self.heads * self.d * self.e
    }
}

/// Outputs and the state after the call.
type OutAndState<T> = (Vec<T>, Vec<f32>);

struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    init: Option<Vec<f32>>,
}

fn inputs<T: Element>(rng: &mut StdRng, c: &Case) -> Inputs<T> {
    let n = c.tokens() * c.heads;
    Inputs {
        q: random(rng, n * c.d),
        k: random(rng, n * c.d),
        v: random(rng, n * c.e),
        init: c.init.then(|| random::<f32>(rng, c.state_len())),
    }
}

fn wide<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn oracle_of<T: Element>(c: &Case, x: &Inputs<T>) -> oracle::Out {
    let decay: Option<Vec<f64>> = c
        .decay
        .as_ref()
        .map(|s| s.iter().map(|&v| v as f64).collect());
    oracle::forward(
        &c.lens,
        c.heads,
        c.d,
        c.e,
        &wide(&x.q),
        &wide(&x.k),
        &wide(&x.v),
        decay.as_deref(),
        c.scale as f64,
        c.causal,
        x.init.as_ref().map(|s| wide(s)).as_deref(),
    )
}

/// Rounds to T and back: the least error any implementation storing T outputs has.
fn round_to<T: Element>(x: f64) -> f64 {
    T::from_f32(x as f32).to_f32() as f64
}

/// `max|got - want| <= factor * max|round_T(want) - want| + 5e-5 * max|want|`: relative to
/// the rounding a naive computation in T cannot avoid, plus f32 accumulation over long sums.
fn assert_lp<T: Element>(what: &str, got: &[f32], want: &[f64], factor: f64) {
    let max_ref = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let naive = want
        .iter()
        .fold(0.0f64, |m, &w| m.max((round_to::<T>(w) - w).abs()));
    let tol = factor * naive + 5e-5 * max_ref + 1e-30;
    assert_close(what, got, want, tol, 0.0);
}

/// Runs forward on the CPU with `threads` threads; returns (o, final state).
fn cpu_forward<T: Element>(threads: usize, c: &Case, x: &Inputs<T>) -> (Vec<T>, Vec<f32>) {
    let dev = Device::cpu_with_threads(threads).unwrap();
    let cu = c.cu();
    let seqs = if c.dense {
        Seqs::Dense {
            batch: c.lens.len(),
            seq: c.lens[0],
        }
    } else {
        Seqs::Varlen {
            cu_seqlens: (&cu).into(),
            max_seqlen: c.max_len(),
        }
    };
    let cfg = c.cfg();
    let mut o = poisoned::<T>(c.tokens() * c.heads * c.e);
    let mut fin = poisoned::<f32>(c.state_len());
    let mut ws = poisoned::<f32>(lightning::workspace_len(&dev, &cfg, &seqs).unwrap());
    lightning::forward(
        &dev,
        &cfg,
        &seqs,
        Forward {
            q: (&x.q).into(),
            k: (&x.k).into(),
            v: (&x.v).into(),
            o: (&mut o).into(),
            initial_state: x.init.as_ref().map(|s| s.into()),
            final_state: c.causal.then_some((&mut fin).into()),
            workspace: (&mut ws).into(),
        },
    )
    .unwrap();
    (o, fin)
}

fn check_forward<T: Element>(
    rng: &mut StdRng,
    c: &Case,
    backend: &str,
    factor: f64,
    run: &dyn Fn(&Case, &Inputs<T>) -> OutAndState<T>,
) {
    let x = inputs::<T>(rng, c);
    let want = oracle_of(c, &x);
    let (o, fin) = run(c, &x);
    let what = format!(
        "{backend} {} lens={:?} h={} d={} e={} decay={:?} init={} causal={}",
        T::DTYPE,
        &c.lens[..c.lens.len().min(4)],
        c.heads,
        c.d,
        c.e,
        c.decay.as_ref().map(|s| s[0]),
        c.init,
        c.causal
    );
    assert_lp::<T>(&format!("{what}: o"), &to_f32(&o), &want.o, factor);
    if c.causal {
        let what = format!("{what}: final state");
        if backend == "gpu" && T::DTYPE != attnkit::DType::F32 {
            // The GPU accumulates the state in f32 but rounds the decayed key rows to T before
            // the tensor-core product K^T V: T's rounding, not f32's.
            assert_lp::<T>(&what, &fin, &want.final_state, factor);
        } else {
            // The CPU keeps the state f32 throughout: tolerance of f32 accumulation only.
            assert_lp::<f32>(&what, &fin, &want.final_state, 2.0);
        }
    }
}

/// The shapes every backend is checked on: sequence lengths around the block (64) and
/// split boundaries, decay none / small / large (lambda^64 underflows to 0 in f32), mixed
/// head dims, initial state, varlen.
fn cases() -> Vec<Case> {
    let small = Some(vec![0.01, 0.2]);
    let mut v = vec![
        Case::causal(&[1], 2, 64, 64, small.clone()),
        Case::causal(&[63], 2, 64, 128, small.clone()),
        Case::causal(&[65, 65], 2, 128, 64, Some(vec![0.0, 0.05])),
        Case::causal(&[1000], 2, 64, 64, small.clone()),
        Case::causal(&[4097], 1, 64, 64, None),
        Case::causal(&[200], 2, 128, 128, Some(vec![50.0, 100.0])),
        // s so large that -s * log2(e) overflows f32: lambda = 0, never 0 * inf = NaN.
        Case::causal(&[70], 1, 64, 64, Some(vec![f32::MAX])),
        Case::causal(&[130, 1, 0, 257, 64], 2, 64, 64, small.clone()),
    ];
    let mut init = Case::causal(&[150, 150], 2, 64, 128, small.clone());
    init.init = true;
    v.push(init);
    let mut nc = Case::causal(&[129], 2, 128, 64, None);
    nc.causal = false;
    v.push(nc);
    v
}

#[test]
fn forward_cpu_f32_matches_recurrence_oracle() {
    let mut rng = rng("forward_cpu_f32_matches_recurrence_oracle");
    for c in cases() {
        // 1 thread: one split per sequence; 5: the plan splits sequences into many.
        for threads in [1, 5] {
            check_forward::<f32>(&mut rng, &c, &format!("cpu{threads}"), 2.0, &|c, x| {
                cpu_forward(threads, c, x)
            });
        }
    }
}

#[test]
fn forward_cpu_low_precision_matches_recurrence_oracle() {
    let mut rng = rng("forward_cpu_low_precision_matches_recurrence_oracle");
    for c in cases().into_iter().filter(|c| c.tokens() < 2000) {
        check_forward::<Bf16>(&mut rng, &c, "cpu", 2.0, &|c, x| cpu_forward(3, c, x));
        check_forward::<F16>(&mut rng, &c, "cpu", 2.0, &|c, x| cpu_forward(3, c, x));
    }
}

#[test]
fn a_wrong_decay_fails_the_comparison() {
    // The harness must be able to fail: the same inputs with a decay off by 1% are caught.
    let mut rng = rng("a_wrong_decay_fails_the_comparison");
    let c = Case::causal(&[300], 1, 64, 64, Some(vec![0.01]));
    let x = inputs::<f32>(&mut rng, &c);
    let mut wrong = c.clone();
    wrong.decay = Some(vec![0.0101]);
    let want = oracle_of(&wrong, &x);
    let (o, _) = cpu_forward(2, &c, &x);
    let r = std::panic::catch_unwind(|| assert_lp::<f32>("off", &to_f32(&o), &want.o, 2.0));
    assert!(r.is_err(), "a 1% decay error went unnoticed");
}

#[test]
fn large_decay_underflows_to_zero_without_nan() {
    // lambda = exp(-100): lambda^B is 0 in f32; each output is the current token's own term.
    let mut rng = rng("large_decay_underflows_to_zero_without_nan");
    let mut c = Case::causal(&[130], 1, 64, 64, Some(vec![100.0]));
    c.init = true;
    let x = inputs::<f32>(&mut rng, &c);
    let (o, fin) = cpu_forward(2, &c, &x);
    assert!(o.iter().chain(&fin).all(|v| v.is_finite()));
    for t in [0, 64, 129] {
        let (qt, kt, vt) = (
            &x.q[t * 64..][..64],
            &x.k[t * 64..][..64],
            &x.v[t * 64..][..64],
        );
        let qk: f64 = qt.iter().zip(kt).map(|(a, b)| (a * b) as f64).sum();
        for j in 0..64 {
            let want = 0.125 * qk * vt[j] as f64;
            assert!((o[t * 64 + j] as f64 - want).abs() < 1e-5, "t={t} j={j}");
        }
    }
}

/// Prefill of `split` tokens, then the rest token by token through `decode`, against one
/// forward pass over everything.
fn chunked_then_decode<T: Element>(threads: usize, factor: f64) {
    let mut rng = rng("chunked_prefill_then_decode");
    let (total, split, heads, d, e) = (80, 67, 2, 64, 128);
    let c = Case::causal(&[total, total], heads, d, e, Some(vec![0.03, 0.3]));
    let x = inputs::<T>(&mut rng, &c);
    let want = oracle_of(&c, &x);
    let dev = Device::cpu_with_threads(threads).unwrap();
    let cfg = c.cfg();
    let batch = 2;
    // Prefill: the first `split` tokens of each sequence, packed as varlen from both.
    let row_qk = heads * d;
    let row_v = heads * e;
    let take = |src: &[T], row: usize, from: usize, to: usize| -> Vec<T> {
        (0..batch)
            .flat_map(|b| src[(b * total + from) * row..(b * total + to) * row].to_vec())
            .collect()
    };
    let seqs = Seqs::Dense { batch, seq: split };
    let mut state = poisoned::<f32>(c.state_len());
    let mut o_pre = poisoned::<T>(batch * split * row_v);
    let mut ws = poisoned::<f32>(lightning::workspace_len(&dev, &cfg, &seqs).unwrap());
    let (q1, k1, v1) = (
        take(&x.q, row_qk, 0, split),
        take(&x.k, row_qk, 0, split),
        take(&x.v, row_v, 0, split),
    );
    lightning::forward(
        &dev,
        &cfg,
        &seqs,
        Forward {
            q: (&q1).into(),
            k: (&k1).into(),
            v: (&v1).into(),
            o: (&mut o_pre).into(),
            initial_state: None,
            final_state: Some((&mut state).into()),
            workspace: (&mut ws).into(),
        },
    )
    .unwrap();
    let mut got = vec![0.0f32; want.o.len()];
    for b in 0..batch {
        for t in 0..split {
            let dst = &mut got[(b * total + t) * row_v..][..row_v];
            dst.copy_from_slice(&to_f32(&o_pre[(b * split + t) * row_v..][..row_v]));
        }
    }
    for t in split..total {
        let (qt, kt, vt) = (
            take(&x.q, row_qk, t, t + 1),
            take(&x.k, row_qk, t, t + 1),
            take(&x.v, row_v, t, t + 1),
        );
        let mut ot = poisoned::<T>(batch * row_v);
        lightning::decode(
            &dev,
            &cfg,
            batch,
            Decode {
                q: (&qt).into(),
                k: (&kt).into(),
                v: (&vt).into(),
                o: (&mut ot).into(),
                state: (&mut state).into(),
            },
        )
        .unwrap();
        for b in 0..batch {
            got[(b * total + t) * row_v..][..row_v]
                .copy_from_slice(&to_f32(&ot[b * row_v..][..row_v]));
        }
    }
    assert_lp::<T>("prefill + decode: o", &got, &want.o, factor);
    assert_lp::<f32>("prefill + decode: state", &state, &want.final_state, 2.0);
}

#[test]
fn chunked_prefill_then_decode_equals_one_pass() {
    chunked_then_decode::<f32>(2, 2.0);
    chunked_then_decode::<Bf16>(3, 2.0);
}

#[test]
fn prefill_in_two_chunks_equals_one_pass() {
    // forward(first part) -> final state -> forward(second part, initial state).
    let mut rng = rng("prefill_in_two_chunks_equals_one_pass");
    let c = Case::causal(&[300], 2, 64, 64, Some(vec![0.02, 0.001]));
    let x = inputs::<f32>(&mut rng, &c);
    let want = oracle_of(&c, &x);
    let row = 2 * 64;
    let cut = 129;
    let part = |lens: &[usize], a: usize, b: usize, init: Option<Vec<f32>>| {
        let pc = Case {
            init: init.is_some(),
            ..Case::causal(lens, 2, 64, 64, c.decay.clone())
        };
        let px = Inputs {
            q: x.q[a * row..b * row].to_vec(),
            k: x.k[a * row..b * row].to_vec(),
            v: x.v[a * row..b * row].to_vec(),
            init,
        };
        cpu_forward(2, &pc, &px)
    };
    let (o1, s1) = part(&[cut], 0, cut, None);
    let (o2, s2) = part(&[300 - cut], cut, 300, Some(s1));
    let got: Vec<f32> = o1.iter().chain(&o2).copied().collect();
    assert_lp::<f32>("two chunks: o", &got, &want.o, 2.0);
    assert_lp::<f32>("two chunks: state", &s2, &want.final_state, 2.0);
}

#[test]
fn varlen_equals_separate_runs() {
    let mut rng = rng("varlen_equals_separate_runs");
    let lens = [70usize, 1, 0, 200, 64];
    let mut c = Case::causal(&lens, 2, 64, 128, Some(vec![0.05, 0.5]));
    c.init = true;
    let x = inputs::<f32>(&mut rng, &c);
    let (o, fin) = cpu_forward(3, &c, &x);
    let (rq, rv, st) = (2 * 64, 2 * 128, 2 * 64 * 128);
    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        let one = Case {
            init: true,
            ..Case::causal(&[len], 2, 64, 128, c.decay.clone())
        };
        let xi = Inputs {
            q: x.q[start * rq..(start + len) * rq].to_vec(),
            k: x.k[start * rq..(start + len) * rq].to_vec(),
            v: x.v[start * rq..(start + len) * rq * 2].to_vec(),
            init: Some(x.init.as_ref().unwrap()[i * st..(i + 1) * st].to_vec()),
        };
        let xi = Inputs {
            v: x.v[start * rv..(start + len) * rv].to_vec(),
            ..xi
        };
        let (oi, fi) = cpu_forward(1, &one, &xi);
        let want_o: Vec<f64> = oi.iter().map(|&v| v as f64).collect();
        let want_s: Vec<f64> = fi.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("varlen seq {i}: o"),
            &o[start * rv..(start + len) * rv],
            &want_o,
            1e-4,
            1e-4,
        );
        assert_close(
            &format!("varlen seq {i}: state"),
            &fin[i * st..(i + 1) * st],
            &want_s,
            1e-4,
            1e-4,
        );
        start += len;
    }
}

/// The decode step alone against the oracle, every dtype.
fn check_decode<T: Element>(
    rng: &mut StdRng,
    dev: &Device,
    run: &dyn Fn(&Decode0<T>) -> OutAndState<T>,
) {
    for (batch, heads, d, e) in [(1, 1, 64, 64), (3, 2, 128, 64), (2, 3, 64, 128)] {
        let decay: Vec<f32> = (0..heads).map(|h| 0.1 * h as f32).collect();
        let inp = Decode0 {
            batch,
            heads,
            d,
            e,
            decay: decay.clone(),
            q: random(rng, batch * heads * d),
            k: random(rng, batch * heads * d),
            v: random(rng, batch * heads * e),
            state: random(rng, batch * heads * d * e),
        };
        let mut s64 = wide(&inp.state);
        let dec64: Vec<f64> = decay.iter().map(|&v| v as f64).collect();
        let want_o = oracle::decode(
            batch,
            heads,
            d,
            e,
            &wide(&inp.q),
            &wide(&inp.k),
            &wide(&inp.v),
            Some(&dec64),
            0.5,
            &mut s64,
        );
        let (o, s) = run(&inp);
        let what = format!(
            "decode {} on {} b={batch} h={heads} d={d} e={e}",
            T::DTYPE,
            dev.name()
        );
        assert_lp::<T>(&format!("{what}: o"), &to_f32(&o), &want_o, 2.0);
        assert_lp::<f32>(&format!("{what}: state"), &s, &s64, 2.0);
    }
}

struct Decode0<T> {
    batch: usize,
    heads: usize,
    d: usize,
    e: usize,
    decay: Vec<f32>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    state: Vec<f32>,
}

fn cpu_decode<T: Element>(x: &Decode0<T>) -> (Vec<T>, Vec<f32>) {
    let cfg = Config {
        heads: x.heads,
        d: x.d,
        e: x.e,
        decay: Some(&x.decay),
        scale: 0.5,
        causal: true,
    };
    let mut o = poisoned::<T>(x.batch * x.heads * x.e);
    let mut s = x.state.clone();
    lightning::decode(
        &Device::cpu_with_threads(2).unwrap(),
        &cfg,
        x.batch,
        Decode {
            q: (&x.q).into(),
            k: (&x.k).into(),
            v: (&x.v).into(),
            o: (&mut o).into(),
            state: (&mut s).into(),
        },
    )
    .unwrap();
    (o, s)
}

#[test]
fn decode_cpu_matches_oracle_all_dtypes() {
    let mut rng = rng("decode_cpu_matches_oracle_all_dtypes");
    let dev = Device::cpu();
    check_decode::<f32>(&mut rng, &dev, &cpu_decode);
    check_decode::<Bf16>(&mut rng, &dev, &cpu_decode);
    check_decode::<F16>(&mut rng, &dev, &cpu_decode);
}

#[test]
fn decay_slopes_follow_the_formula() {
    let s = lightning::decay_slopes(16, 0.5).unwrap();
    for (h, &v) in s.iter().enumerate() {
        let want = 0.5 * 2f64.powf(-8.0 * (h + 1) as f64 / 16.0);
        assert!(
            (v as f64 - want).abs() < 1e-7 * want.max(1e-3),
            "h={h}: {v} vs {want}"
        );
    }
    assert!(s.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(
        lightning::decay_slopes(0, 1.0).unwrap_err().arg(),
        Some("heads")
    );
    assert_eq!(
        lightning::decay_slopes(4, -1.0).unwrap_err().arg(),
        Some("layer_factor")
    );
    assert_eq!(lightning::layer_factor(0, 1).unwrap(), 1.0);
    let last = lightning::layer_factor(9, 10).unwrap();
    assert!((last - 1e-5).abs() < 1e-9);
}

// ---------------------------------------------------------------- backward

/// `L = sum w_o . o + sum w_s . final_state` through the oracle, for finite differences.
fn loss(c: &Case, q: &[f64], k: &[f64], v: &[f64], init: &[f64], w_o: &[f64], w_s: &[f64]) -> f64 {
    let decay: Option<Vec<f64>> = c
        .decay
        .as_ref()
        .map(|s| s.iter().map(|&v| v as f64).collect());
    let out = oracle::forward(
        &c.lens,
        c.heads,
        c.d,
        c.e,
        q,
        k,
        v,
        decay.as_deref(),
        c.scale as f64,
        c.causal,
        c.causal.then_some(init),
    );
    let a: f64 = out.o.iter().zip(w_o).map(|(x, w)| x * w).sum();
    let b: f64 = out.final_state.iter().zip(w_s).map(|(x, w)| x * w).sum();
    a + b
}

/// dq, dk, dv and d(initial state) (empty unless causal), widened to f32.
type Grads = [Vec<f32>; 4];

/// One backward problem: the forward inputs, the output gradient and (causal) dS_final.
struct BwdInputs<T> {
    x: Inputs<T>,
    d_o: Vec<T>,
    d_fin: Option<Vec<f32>>,
}

fn bwd_inputs<T: Element>(rng: &mut StdRng, c: &Case) -> BwdInputs<T> {
    let x = inputs::<T>(rng, c);
    let d_o = random(rng, c.tokens() * c.heads * c.e);
    let d_fin = c.causal.then(|| random::<f32>(rng, c.state_len()));
    BwdInputs { x, d_o, d_fin }
}

/// The backward on the CPU with `threads` threads, outputs and workspace poisoned.
fn cpu_backward<T: Element>(threads: usize, c: &Case, b: &BwdInputs<T>) -> Grads {
    let dev = Device::cpu_with_threads(threads).unwrap();
    let cfg = c.cfg();
    let cu = c.cu();
    let seqs = c.seqs((&cu).into());
    let (mut dq, mut dk) = (poisoned::<T>(b.x.q.len()), poisoned::<T>(b.x.k.len()));
    let mut dv = poisoned::<T>(b.x.v.len());
    let mut di = poisoned::<f32>(c.state_len());
    let mut ws = poisoned::<f32>(lightning::workspace_len(&dev, &cfg, &seqs).unwrap());
    lightning::backward(
        &dev,
        &cfg,
        &seqs,
        Backward {
            q: (&b.x.q).into(),
            k: (&b.x.k).into(),
            v: (&b.x.v).into(),
            d_o: (&b.d_o).into(),
            initial_state: b.x.init.as_ref().map(|s| s.into()),
            d_final_state: b.d_fin.as_ref().map(|s| s.into()),
            dq: (&mut dq).into(),
            dk: (&mut dk).into(),
            dv: (&mut dv).into(),
            d_initial_state: c.causal.then_some((&mut di).into()),
            workspace: (&mut ws).into(),
        },
    )
    .unwrap();
    let di = if c.causal { di } else { Vec::new() };
    [to_f32(&dq), to_f32(&dk), to_f32(&dv), di]
}

/// Compares `run`'s gradients with central differences of the f64 oracle on sampled entries.
fn check_backward(c: &Case, run: &dyn Fn(&Case, &BwdInputs<f32>) -> Grads) {
    let mut rng = rng("backward_matches_finite_differences");
    let b = bwd_inputs::<f32>(&mut rng, c);
    let init = b.x.init.clone().unwrap_or_else(|| vec![0.0; c.state_len()]);
    let w_s = b.d_fin.clone().unwrap_or_else(|| vec![0.0; c.state_len()]);
    let [dq, dk, dv, di] = run(c, &b);
    let (q, k, v, s0) = (wide(&b.x.q), wide(&b.x.k), wide(&b.x.v), wide(&init));
    let (wo, wsd) = (wide(&b.d_o), wide(&w_s));
    // Central differences in f64 on sampled entries of each input (the loss is linear in
    // each argument separately, so the difference is exact up to rounding).
    let h = 1e-3;
    let mut names: Vec<(&str, &[f32], usize)> =
        vec![("dq", &dq, 0), ("dk", &dk, 1), ("dv", &dv, 2)];
    if c.causal {
        names.push(("d_init", &di, 3));
    }
    for (name, got, which) in names {
        let len = [q.len(), k.len(), v.len(), s0.len()][which];
        let picks: Vec<usize> = (0..24).map(|_| rng.random_range(0..len)).collect();
        let mut want = Vec::new();
        let mut gots = Vec::new();
        for &i in &picks {
            let fd = |delta: f64| {
                let (mut q, mut k, mut v, mut s) = (q.clone(), k.clone(), v.clone(), s0.clone());
                [&mut q, &mut k, &mut v, &mut s][which][i] += delta;
                loss(c, &q, &k, &v, &s, &wo, &wsd)
            };
            want.push((fd(h) - fd(-h)) / (2.0 * h));
            gots.push(got[i]);
        }
        let max = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
        assert_close(
            &format!("backward {name} {c:?}"),
            &gots,
            &want,
            1e-4 * max,
            1e-4,
        );
    }
}

#[test]
fn backward_matches_finite_differences_of_the_oracle() {
    for (c, threads) in fd_cases().into_iter().zip([4, 1, 3]) {
        check_backward(&c, &|c, b| cpu_backward(threads, c, b));
    }
}

/// Finite-difference cases: varlen with an empty sequence, mixed dims, initial state and
/// dS_final; a decay so large that lambda^64 underflows; the non-causal form.
fn fd_cases() -> Vec<Case> {
    let mut c = Case::causal(&[70, 3, 0, 130], 2, 64, 128, Some(vec![0.05, 0.0]));
    c.init = true;
    let mut nc = Case::causal(&[40, 70], 1, 64, 64, None);
    nc.causal = false;
    vec![c, Case::causal(&[90], 1, 128, 64, Some(vec![30.0])), nc]
}

#[test]
fn backward_low_precision_tracks_f32() {
    // bf16 in and out, f32 inside: the gradients stay within bf16 rounding of the f32 ones.
    let mut rng = rng("backward_low_precision_tracks_f32");
    let c = Case::causal(&[100], 1, 64, 64, Some(vec![0.02]));
    let x = inputs::<Bf16>(&mut rng, &c);
    let d_o: Vec<Bf16> = random(&mut rng, x.v.len());
    let run = |q: &[f32], k: &[f32], v: &[f32], g: &[f32]| {
        let dev = Device::cpu_with_threads(2).unwrap();
        let seqs = Seqs::Dense { batch: 1, seq: 100 };
        let cfg = c.cfg();
        let mut ws = vec![0.0; lightning::workspace_len(&dev, &cfg, &seqs).unwrap()];
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; q.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; v.len()],
        );
        lightning::backward(
            &dev,
            &cfg,
            &seqs,
            Backward {
                q: q.into(),
                k: k.into(),
                v: v.into(),
                d_o: g.into(),
                initial_state: None,
                d_final_state: None,
                dq: (&mut dq).into(),
                dk: (&mut dk).into(),
                dv: (&mut dv).into(),
                d_initial_state: None,
                workspace: (&mut ws).into(),
            },
        )
        .unwrap();
        [dq, dk, dv]
    };
    let want = run(&to_f32(&x.q), &to_f32(&x.k), &to_f32(&x.v), &to_f32(&d_o));
    let dev = Device::cpu();
    let seqs = Seqs::Dense { batch: 1, seq: 100 };
    let cfg = c.cfg();
    let mut ws = vec![0.0; lightning::workspace_len(&dev, &cfg, &seqs).unwrap()];
    let (mut dq, mut dk, mut dv) = (
        poisoned::<Bf16>(x.q.len()),
        poisoned::<Bf16>(x.k.len()),
        poisoned::<Bf16>(x.v.len()),
    );
    lightning::backward(
        &dev,
        &cfg,
        &seqs,
        Backward {
            q: (&x.q).into(),
            k: (&x.k).into(),
            v: (&x.v).into(),
            d_o: (&d_o).into(),
            initial_state: None,
            d_final_state: None,
            dq: (&mut dq).into(),
            dk: (&mut dk).into(),
            dv: (&mut dv).into(),
            d_initial_state: None,
            workspace: (&mut ws).into(),
        },
    )
    .unwrap();
    for (name, got, w) in [
        ("dq", &dq, &want[0]),
        ("dk", &dk, &want[1]),
        ("dv", &dv, &want[2]),
    ] {
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        assert_lp::<Bf16>(name, &to_f32(got), &w64, 2.0);
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_a_typed_error_naming_the_argument() {
    let dev = Device::cpu();
    let (t, h, d, e) = (10, 2, 64, 64);
    let q = vec![0.0f32; t * h * d];
    let v = vec![0.0f32; t * h * e];
    let mut o = vec![7.0f32; t * h * e];
    let good_state = vec![0.0f32; h * d * e];
    let mut ws = vec![0.0f32; 1 << 20];
    let decay = [0.1f32, 0.2];
    let cfg = Config {
        heads: h,
        d,
        e,
        decay: Some(&decay),
        scale: 1.0,
        causal: true,
    };
    let dense = Seqs::Dense { batch: 1, seq: t };
    let call = |cfg: &Config,
                seqs: &Seqs,
                q: &[f32],
                v: &[f32],
                init: Option<&[f32]>,
                ws: &mut [f32],
                o: &mut [f32]| {
        lightning::forward(
            &dev,
            cfg,
            seqs,
            Forward {
                q: q.into(),
                k: q.into(),
                v: v.into(),
                o: o.into(),
                initial_state: init.map(|s| s.into()),
                final_state: None,
                workspace: ws.into(),
            },
        )
        .unwrap_err()
    };
    let neg = [0.1f32, -0.5];
    let e1 = call(
        &Config {
            decay: Some(&neg),
            ..cfg
        },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Value { arg: "decay", .. }), "{e1}");
    let nan = [0.1f32, f32::NAN];
    let e1 = call(
        &Config {
            decay: Some(&nan),
            ..cfg
        },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Value { arg: "decay", .. }), "{e1}");
    let e1 = call(
        &Config {
            decay: Some(&decay[..1]),
            ..cfg
        },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Shape { arg: "decay", .. }), "{e1}");
    // v sized for e = 64 while the config says 128: mismatched d/e. (The other way round, v
    // is merely longer than the call reads, which the length rule accepts.)
    let e1 = call(
        &Config { e: 128, ..cfg },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Shape { arg: "v", .. }), "{e1}");
    let e1 = call(
        &cfg,
        &dense,
        &q,
        &v,
        Some(&good_state[1..]),
        &mut ws,
        &mut o,
    );
    assert!(
        matches!(
            e1,
            Error::Shape {
                arg: "initial_state",
                ..
            }
        ),
        "{e1}"
    );
    for bad in [32, 96, 256, 0] {
        let e1 = call(
            &Config { d: bad, ..cfg },
            &dense,
            &q,
            &v,
            None,
            &mut ws,
            &mut o,
        );
        assert!(matches!(e1, Error::Unsupported { arg: "d", .. }), "{e1}");
        let e1 = call(
            &Config { e: bad, ..cfg },
            &dense,
            &q,
            &v,
            None,
            &mut ws,
            &mut o,
        );
        assert!(matches!(e1, Error::Unsupported { arg: "e", .. }), "{e1}");
    }
    let e1 = call(
        &Config {
            scale: f32::INFINITY,
            ..cfg
        },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Value { arg: "scale", .. }), "{e1}");
    let e1 = call(
        &Config { heads: 0, ..cfg },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert_eq!(e1.arg(), Some("heads"), "{e1}");
    let e1 = call(
        &Config {
            causal: false,
            ..cfg
        },
        &dense,
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(
        matches!(e1, Error::Unsupported { arg: "decay", .. }),
        "{e1}"
    );
    let nc = Config {
        causal: false,
        decay: None,
        ..cfg
    };
    let e1 = call(&nc, &dense, &q, &v, Some(&good_state), &mut ws, &mut o);
    assert!(
        matches!(
            e1,
            Error::Unsupported {
                arg: "initial_state",
                ..
            }
        ),
        "{e1}"
    );
    let e1 = call(
        &cfg,
        &Seqs::Dense {
            batch: 1,
            seq: t + 1,
        },
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Shape { arg: "q", .. }), "{e1}");
    let e1 = call(
        &cfg,
        &Seqs::Dense { batch: 0, seq: t },
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert_eq!(e1.arg(), Some("batch"), "{e1}");
    let e1 = call(
        &cfg,
        &Seqs::Dense {
            batch: usize::MAX,
            seq: 3,
        },
        &q,
        &v,
        None,
        &mut ws,
        &mut o,
    );
    assert!(matches!(e1, Error::Shape { .. }), "{e1}");
    let e1 = call(&cfg, &dense, &q, &v, None, &mut [0.0; 3], &mut o);
    assert!(
        matches!(
            e1,
            Error::Shape {
                arg: "workspace",
                ..
            }
        ),
        "{e1}"
    );
    for cu in [vec![0, 4, 3, 10], vec![1, 10], vec![0], vec![0, 10, 10]] {
        let seqs = Seqs::Varlen {
            cu_seqlens: (&cu).into(),
            max_seqlen: 9,
        };
        let e1 = call(&cfg, &seqs, &q, &v, None, &mut ws, &mut o);
        assert_eq!(e1.arg(), Some("cu_seqlens"), "{cu:?}: {e1}");
    }
    // A max_seqlen no i32 offset can reach (it sizes the split plan): typed, no overflow.
    let cu = vec![0, 10];
    let huge = Seqs::Varlen {
        cu_seqlens: (&cu).into(),
        max_seqlen: usize::MAX,
    };
    let e1 = call(&cfg, &huge, &q, &v, None, &mut ws, &mut o);
    assert_eq!(e1.arg(), Some("max_seqlen"), "{e1}");
    assert_eq!(
        lightning::workspace_len(&dev, &cfg, &huge)
            .unwrap_err()
            .arg(),
        Some("max_seqlen")
    );
    // Nothing was written on error.
    assert!(o.iter().all(|&x| x == 7.0));
    // Decode: state of the wrong shape, non-causal.
    let mut st = vec![0.0f32; h * d * e - 1];
    let mut o1 = vec![0.0f32; h * e];
    let e1 = lightning::decode(
        &dev,
        &cfg,
        1,
        Decode {
            q: (&q[..h * d]).into(),
            k: (&q[..h * d]).into(),
            v: (&v[..h * e]).into(),
            o: (&mut o1).into(),
            state: (&mut st).into(),
        },
    )
    .unwrap_err();
    assert!(matches!(e1, Error::Shape { arg: "state", .. }), "{e1}");
}

/// Issue 13: sizes nobody could allocate are typed errors before anything is allocated.
/// Before the checks were reordered, `heads = 2^40` aborted the process (a 4 TiB per-head
/// table), `heads = usize::MAX` panicked ("capacity overflow"), `workspace_len` of a
/// `seq = usize::MAX` overflowed, `batch = 0` sized a workspace of 0, and a dense batch of
/// 2^40 empty sequences built a 16 TiB table of spans before the workspace was checked.
#[test]
fn hostile_sizes_are_typed_errors_before_any_allocation() {
    let dev = Device::cpu();
    let cfg = Config {
        heads: 1,
        d: 64,
        e: 64,
        decay: None,
        scale: 1.0,
        causal: true,
    };
    let one = Seqs::Dense { batch: 1, seq: 1 };
    for heads in [1usize << 40, usize::MAX, lightning::MAX_HOST_HEADS + 1] {
        let c = Config { heads, ..cfg };
        let e = lightning::workspace_len(&dev, &c, &one).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "heads", .. }), "{e}");
        assert_eq!(
            lightning::decay_slopes(heads, 1.0).unwrap_err().arg(),
            Some("heads")
        );
    }
    for seqs in [
        Seqs::Dense {
            batch: 1,
            seq: usize::MAX,
        },
        Seqs::Dense {
            batch: 1,
            seq: usize::MAX - 62,
        },
        Seqs::Dense {
            batch: usize::MAX,
            seq: 1,
        },
        Seqs::Dense { batch: 0, seq: 10 },
    ] {
        let e = lightning::workspace_len(&dev, &cfg, &seqs).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{seqs:?}: {e}");
    }
    let empty: Vec<i32> = vec![0];
    let e = lightning::workspace_len(
        &dev,
        &cfg,
        &Seqs::Varlen {
            cu_seqlens: (&empty).into(),
            max_seqlen: 1,
        },
    )
    .unwrap_err();
    assert_eq!(e.arg(), Some("cu_seqlens"), "{e}");
    // 2^40 empty sequences: no token buffer bounds the count, the workspace must.
    let (x, mut o, mut ws) = (Vec::<f32>::new(), Vec::<f32>::new(), vec![0.0f32; 64 * 64]);
    let e = lightning::forward(
        &dev,
        &cfg,
        &Seqs::Dense {
            batch: 1 << 40,
            seq: 0,
        },
        Forward {
            q: (&x).into(),
            k: (&x).into(),
            v: (&x).into(),
            o: (&mut o).into(),
            initial_state: None,
            final_state: None,
            workspace: (&mut ws).into(),
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "workspace",
                ..
            }
        ),
        "{e}"
    );
    // Decode: 2^40 sequences against a one-sequence state.
    let mut st = vec![0.0f32; 64 * 64];
    let e = lightning::decode(
        &dev,
        &cfg,
        1 << 40,
        Decode {
            q: (&x).into(),
            k: (&x).into(),
            v: (&x).into(),
            o: (&mut o).into(),
            state: (&mut st).into(),
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

/// Issue 13 item 4: NaN or infinite scales and decays are Value errors naming them; a decay
/// of 0 is defined (no decay: the same as `decay: None`).
#[test]
fn nan_and_infinite_scales_and_decays_are_value_errors_zero_decay_is_none() {
    let dev = Device::cpu();
    let (t, h) = (70, 2);
    let mut rng = rng("lightning zero decay");
    let q: Vec<f32> = random(&mut rng, t * h * 64);
    let k: Vec<f32> = random(&mut rng, t * h * 64);
    let v: Vec<f32> = random(&mut rng, t * h * 64);
    let seqs = Seqs::Dense { batch: 1, seq: t };
    let run = |cfg: &Config| -> attnkit::Result<Vec<f32>> {
        let mut o = poisoned::<f32>(t * h * 64);
        let mut ws = vec![
            0.0f32;
            lightning::workspace_len(&dev, &Config { heads: h, ..*cfg }, &seqs)
                .unwrap_or(0)
        ];
        lightning::forward(
            &dev,
            cfg,
            &seqs,
            Forward {
                q: (&q).into(),
                k: (&k).into(),
                v: (&v).into(),
                o: (&mut o).into(),
                initial_state: None,
                final_state: None,
                workspace: (&mut ws).into(),
            },
        )?;
        Ok(o)
    };
    let cfg = Config {
        heads: h,
        d: 64,
        e: 64,
        decay: None,
        scale: 0.25,
        causal: true,
    };
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e = run(&Config { scale, ..cfg }).unwrap_err();
        assert!(
            matches!(e, Error::Value { arg: "scale", .. }),
            "{scale}: {e}"
        );
    }
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-30] {
        let decay = [0.1, bad];
        let e = run(&Config {
            decay: Some(&decay),
            ..cfg
        })
        .unwrap_err();
        assert!(matches!(e, Error::Value { arg: "decay", .. }), "{bad}: {e}");
    }
    let none = run(&cfg).unwrap();
    let zero = run(&Config {
        decay: Some(&[0.0, 0.0]),
        ..cfg
    })
    .unwrap();
    assert!(written(&zero));
    assert_eq!(none, zero, "s = 0 must mean no decay");
    for f in [f32::NAN, f32::INFINITY, -1.0] {
        assert_eq!(
            lightning::decay_slopes(4, f).unwrap_err().arg(),
            Some("layer_factor")
        );
    }
}

fn written(v: &[f32]) -> bool {
    v.iter().all(|x| !x.is_nan())
}

/// Issue 13 item 5, the crate's one length rule: every buffer may be longer than the call
/// reads or writes (its tail untouched: poisoned, still NaN afterwards, and the results those
/// of exact buffers), and one element short is a Shape error naming it. Lightning used to
/// refuse one extra element.
#[test]
fn longer_buffers_are_accepted_tails_untouched_shorter_are_errors() {
    let dev = Device::cpu();
    let (t, h, d, e) = (67, 2, 64, 64);
    let mut rng = rng("lightning length rule");
    let decay = [0.05f32, 0.3];
    let cfg = Config {
        heads: h,
        d,
        e,
        decay: Some(&decay),
        scale: 0.125,
        causal: true,
    };
    let seqs = Seqs::Dense { batch: 1, seq: t };
    let (qk, vo, st) = (t * h * d, t * h * e, h * d * e);
    let ws_len = lightning::workspace_len(&dev, &cfg, &seqs).unwrap();
    // Inputs with a NaN tail: a read of it would poison the results.
    let input = |rng: &mut StdRng, n: usize, extra: usize| {
        let mut x: Vec<f32> = random(rng, n);
        x.extend(std::iter::repeat_n(f32::NAN, extra));
        x
    };
    let tail_nan = |x: &[f32], n: usize| x[n..].iter().all(|v| v.is_nan());
    let q = input(&mut rng, qk, 1);
    let k = input(&mut rng, qk, 1);
    let v = input(&mut rng, vo, 1);
    let s0 = input(&mut rng, st, 1);
    let fwd = |extra: usize, short: Option<&str>| -> attnkit::Result<(Vec<f32>, Vec<f32>)> {
        let n = |arg: &str, len: usize| {
            if short == Some(arg) {
                len - 1
            } else {
                len + extra
            }
        };
        let mut o = poisoned::<f32>(n("o", vo));
        let mut fin = poisoned::<f32>(n("final_state", st));
        let mut ws = poisoned::<f32>(n("workspace", ws_len));
        lightning::forward(
            &dev,
            &cfg,
            &seqs,
            Forward {
                q: (&q[..n("q", qk)]).into(),
                k: (&k[..n("k", qk)]).into(),
                v: (&v[..n("v", vo)]).into(),
                o: (&mut o).into(),
                initial_state: Some((&s0[..n("initial_state", st)]).into()),
                final_state: Some((&mut fin).into()),
                workspace: (&mut ws).into(),
            },
        )?;
        assert!(tail_nan(&o, vo) && tail_nan(&fin, st) && tail_nan(&ws, ws_len));
        Ok((o, fin))
    };
    let (o0, f0) = fwd(0, None).unwrap();
    assert!(written(&o0) && written(&f0));
    let (o1, f1) = fwd(1, None).unwrap();
    assert_eq!((&o0[..], &f0[..]), (&o1[..vo], &f1[..st]));
    for arg in [
        "q",
        "k",
        "v",
        "o",
        "initial_state",
        "final_state",
        "workspace",
    ] {
        let err = fwd(0, Some(arg)).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.arg() == Some(arg),
            "{arg}: {err}"
        );
    }

    // Decode: one token per sequence, 3 sequences.
    let b = 3;
    let dec = |extra: usize, short: Option<&str>| -> attnkit::Result<(Vec<f32>, Vec<f32>)> {
        let n = |arg: &str, len: usize| {
            if short == Some(arg) {
                len - 1
            } else {
                len + extra
            }
        };
        let mut o = poisoned::<f32>(n("o", b * h * e));
        let mut s: Vec<f32> = s0[..st].repeat(b);
        s.resize(n("state", b * st), f32::NAN);
        lightning::decode(
            &dev,
            &cfg,
            b,
            Decode {
                q: (&q[..n("q", b * h * d)]).into(),
                k: (&k[..n("k", b * h * d)]).into(),
                v: (&v[..n("v", b * h * e)]).into(),
                o: (&mut o).into(),
                state: (&mut s).into(),
            },
        )?;
        assert!(tail_nan(&o, b * h * e) && tail_nan(&s, b * st));
        Ok((o, s))
    };
    let (o0, s0d) = dec(0, None).unwrap();
    let (o1, s1d) = dec(1, None).unwrap();
    assert!(written(&o0));
    assert_eq!((&o0[..], &s0d[..]), (&o1[..b * h * e], &s1d[..b * st]));
    for arg in ["q", "k", "v", "o", "state"] {
        let err = dec(0, Some(arg)).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.arg() == Some(arg),
            "{arg}: {err}"
        );
    }

    // Backward.
    let g = input(&mut rng, vo, 1);
    let dfin = input(&mut rng, st, 1);
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);
    let bwd = |extra: usize, short: Option<&str>| -> attnkit::Result<Grads> {
        let n = |arg: &str, len: usize| {
            if short == Some(arg) {
                len - 1
            } else {
                len + extra
            }
        };
        let mut dq = poisoned::<f32>(n("dq", qk));
        let mut dk = poisoned::<f32>(n("dk", qk));
        let mut dv = poisoned::<f32>(n("dv", vo));
        let mut di = poisoned::<f32>(n("d_initial_state", st));
        let mut ws = poisoned::<f32>(n("workspace", ws_len));
        lightning::backward(
            &dev,
            &cfg,
            &seqs,
            Backward {
                q: (&q[..n("q", qk)]).into(),
                k: (&k[..n("k", qk)]).into(),
                v: (&v[..n("v", vo)]).into(),
                d_o: (&g[..n("d_o", vo)]).into(),
                initial_state: Some((&s0[..n("initial_state", st)]).into()),
                d_final_state: Some((&dfin[..n("d_final_state", st)]).into()),
                dq: (&mut dq).into(),
                dk: (&mut dk).into(),
                dv: (&mut dv).into(),
                d_initial_state: Some((&mut di).into()),
                workspace: (&mut ws).into(),
            },
        )?;
        assert!(tail_nan(&dq, qk) && tail_nan(&dk, qk) && tail_nan(&dv, vo));
        assert!(tail_nan(&di, st) && tail_nan(&ws, ws_len));
        Ok((dq, dk, dv, di))
    };
    let g0 = bwd(0, None).unwrap();
    let g1 = bwd(1, None).unwrap();
    assert!(written(&g0.0) && written(&g0.1) && written(&g0.2) && written(&g0.3));
    assert_eq!(g0.0, g1.0[..qk]);
    assert_eq!(g0.1, g1.1[..qk]);
    assert_eq!(g0.2, g1.2[..vo]);
    assert_eq!(g0.3, g1.3[..st]);
    for arg in [
        "q",
        "k",
        "v",
        "d_o",
        "initial_state",
        "d_final_state",
        "dq",
        "dk",
        "dv",
        "d_initial_state",
        "workspace",
    ] {
        let err = bwd(0, Some(arg)).unwrap_err();
        assert!(
            matches!(err, Error::Shape { .. }) && err.arg() == Some(arg),
            "{arg}: {err}"
        );
    }
}

/// The length rule with varlen offsets: offsets ending before q's last token leave the rows
/// after them untouched; offsets past the rows q holds are an error naming `q`.
#[test]
fn varlen_offsets_short_of_the_buffers_leave_the_tail_untouched() {
    let dev = Device::cpu();
    let (h, d, e) = (1, 64, 64);
    let cfg = Config {
        heads: h,
        d,
        e,
        decay: Some(&[0.2]),
        scale: 0.5,
        causal: true,
    };
    let mut rng = rng("lightning varlen length rule");
    let rows = 10;
    let q: Vec<f32> = random(&mut rng, rows * h * d);
    let v: Vec<f32> = random(&mut rng, rows * h * e);
    let call = |cu: &[i32], o: &mut Vec<f32>| {
        let seqs = Seqs::Varlen {
            cu_seqlens: cu.into(),
            max_seqlen: 9,
        };
        let mut ws = vec![0.0f32; lightning::workspace_len(&dev, &cfg, &seqs)?];
        lightning::forward(
            &dev,
            &cfg,
            &seqs,
            Forward {
                q: (&q).into(),
                k: (&q).into(),
                v: (&v).into(),
                o: o.into(),
                initial_state: None,
                final_state: None,
                workspace: (&mut ws).into(),
            },
        )
    };
    let mut o = poisoned::<f32>(rows * h * e);
    call(&[0, 3, 7], &mut o).unwrap();
    assert!(written(&o[..7 * h * e]), "the sequences' rows are written");
    assert!(
        o[7 * h * e..].iter().all(|x| x.is_nan()),
        "rows past the offsets are untouched"
    );
    let err = call(&[0, 5, 11], &mut o).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "q", .. }), "{err}");
}

// ---------------------------------------------------------------- GPU

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    fn gpu_forward<T: Element>(dev: &Device, c: &Case, x: &Inputs<T>) -> (Vec<T>, Vec<f32>) {
        let s = dev.stream().unwrap();
        let cfg = c.cfg();
        let cu = s.clone_htod(&c.cu()).unwrap();
        let seqs = if c.dense {
            Seqs::Dense {
                batch: c.lens.len(),
                seq: c.lens[0],
            }
        } else {
            Seqs::Varlen {
                cu_seqlens: (&cu).into(),
                max_seqlen: c.max_len(),
            }
        };
        let (q, k, v) = (
            s.clone_htod(&x.q).unwrap(),
            s.clone_htod(&x.k).unwrap(),
            s.clone_htod(&x.v).unwrap(),
        );
        let init = x.init.as_ref().map(|i| s.clone_htod(i).unwrap());
        let mut o = s
            .clone_htod(&poisoned::<T>(c.tokens() * c.heads * c.e))
            .unwrap();
        let mut fin = s.clone_htod(&poisoned::<f32>(c.state_len())).unwrap();
        let wl = lightning::workspace_len(dev, &cfg, &seqs).unwrap();
        let mut ws = s.clone_htod(&poisoned::<f32>(wl.max(1))).unwrap();
        lightning::forward(
            dev,
            &cfg,
            &seqs,
            Forward {
                q: (&q).into(),
                k: (&k).into(),
                v: (&v).into(),
                o: (&mut o).into(),
                initial_state: init.as_ref().map(|i| i.into()),
                final_state: c.causal.then_some((&mut fin).into()),
                workspace: (&mut ws).into(),
            },
        )
        .unwrap();
        (s.clone_dtoh(&o).unwrap(), s.clone_dtoh(&fin).unwrap())
    }

    #[test]
    fn forward_gpu_matches_recurrence_oracle_all_dtypes() {
        let Some(dev) = gpu("forward_gpu_matches_recurrence_oracle_all_dtypes") else {
            return;
        };
        let mut rng = rng("forward_gpu_matches_recurrence_oracle_all_dtypes");
        for c in cases() {
            let run32 = |c: &Case, x: &Inputs<f32>| gpu_forward(&dev, c, x);
            check_forward::<f32>(&mut rng, &c, "gpu", 2.0, &run32);
            // 16-bit: scores and the state are rounded to the input type before their
            // tensor-core products (as in the paper's kernel): twice the CPU's margin.
            let runb = |c: &Case, x: &Inputs<Bf16>| gpu_forward(&dev, c, x);
            check_forward::<Bf16>(&mut rng, &c, "gpu", 4.0, &runb);
            let runh = |c: &Case, x: &Inputs<F16>| gpu_forward(&dev, c, x);
            check_forward::<F16>(&mut rng, &c, "gpu", 4.0, &runh);
        }
    }

    fn gpu_decode<T: Element>(dev: &Device, x: &Decode0<T>) -> (Vec<T>, Vec<f32>) {
        let s = dev.stream().unwrap();
        let cfg = Config {
            heads: x.heads,
            d: x.d,
            e: x.e,
            decay: Some(&x.decay),
            scale: 0.5,
            causal: true,
        };
        let (q, k, v) = (
            s.clone_htod(&x.q).unwrap(),
            s.clone_htod(&x.k).unwrap(),
            s.clone_htod(&x.v).unwrap(),
        );
        let mut o = s
            .clone_htod(&poisoned::<T>(x.batch * x.heads * x.e))
            .unwrap();
        let mut st = s.clone_htod(&x.state).unwrap();
        lightning::decode(
            dev,
            &cfg,
            x.batch,
            Decode {
                q: (&q).into(),
                k: (&k).into(),
                v: (&v).into(),
                o: (&mut o).into(),
                state: (&mut st).into(),
            },
        )
        .unwrap();
        (s.clone_dtoh(&o).unwrap(), s.clone_dtoh(&st).unwrap())
    }

    #[test]
    fn decode_gpu_matches_oracle_all_dtypes() {
        let Some(dev) = gpu("decode_gpu_matches_oracle_all_dtypes") else {
            return;
        };
        let mut rng = rng("decode_gpu_matches_oracle_all_dtypes");
        check_decode::<f32>(&mut rng, &dev, &|x| gpu_decode(&dev, x));
        check_decode::<Bf16>(&mut rng, &dev, &|x| gpu_decode(&dev, x));
        check_decode::<F16>(&mut rng, &dev, &|x| gpu_decode(&dev, x));
    }

    /// Backward shapes for the GPU: seq 1 / 63 / 65 / 1000 around the block and the splits, decay
    /// 0 / small / large, mixed dims, initial state and dS_final, varlen, non-causal.
    fn bwd_cases() -> Vec<Case> {
        let small = Some(vec![0.01, 0.2]);
        let mut v = vec![
            Case::causal(&[1], 2, 64, 64, small.clone()),
            Case::causal(&[63], 2, 64, 128, small.clone()),
            Case::causal(&[65, 65], 2, 128, 64, Some(vec![0.0, 0.05])),
            Case::causal(&[1000], 1, 64, 64, Some(vec![0.01])),
            Case::causal(&[200], 2, 128, 128, Some(vec![50.0, 100.0])),
            Case::causal(&[70], 1, 64, 64, Some(vec![f32::MAX])),
            Case::causal(&[130, 1, 0, 257, 64], 2, 64, 64, small.clone()),
        ];
        for c in &mut v[..3] {
            c.init = true;
        }
        v[6].init = true;
        let mut nc = Case::causal(&[129], 2, 128, 64, None);
        nc.causal = false;
        v.push(nc);
        v
    }

    /// The backward on the GPU, outputs and workspace poisoned; gradients back on the host.
    fn gpu_backward<T: Element>(dev: &Device, c: &Case, b: &BwdInputs<T>) -> Grads {
        let s = dev.stream().unwrap();
        let cfg = c.cfg();
        let cu = s.clone_htod(&c.cu()).unwrap();
        let seqs = c.seqs((&cu).into());
        let up = |x: &[T]| s.clone_htod(x).unwrap();
        let (q, k, v, d_o) = (up(&b.x.q), up(&b.x.k), up(&b.x.v), up(&b.d_o));
        let init = b.x.init.as_ref().map(|i| s.clone_htod(i).unwrap());
        let d_fin = b.d_fin.as_ref().map(|i| s.clone_htod(i).unwrap());
        let mut dq = up(&poisoned::<T>(b.x.q.len()));
        let mut dk = up(&poisoned::<T>(b.x.k.len()));
        let mut dv = up(&poisoned::<T>(b.x.v.len()));
        let mut di = s.clone_htod(&poisoned::<f32>(c.state_len())).unwrap();
        let wl = lightning::workspace_len(dev, &cfg, &seqs).unwrap();
        let mut ws = s.clone_htod(&poisoned::<f32>(wl.max(1))).unwrap();
        lightning::backward(
            dev,
            &cfg,
            &seqs,
            Backward {
                q: (&q).into(),
                k: (&k).into(),
                v: (&v).into(),
                d_o: (&d_o).into(),
                initial_state: init.as_ref().map(|i| i.into()),
                d_final_state: d_fin.as_ref().map(|i| i.into()),
                dq: (&mut dq).into(),
                dk: (&mut dk).into(),
                dv: (&mut dv).into(),
                d_initial_state: c.causal.then_some((&mut di).into()),
                workspace: (&mut ws).into(),
            },
        )
        .unwrap();
        let down = |x: &cudarc::driver::CudaSlice<T>| to_f32(&s.clone_dtoh(x).unwrap());
        let di = if c.causal {
            s.clone_dtoh(&di).unwrap()
        } else {
            Vec::new()
        };
        [down(&dq), down(&dk), down(&dv), di]
    }

    #[test]
    fn backward_gpu_matches_finite_differences_of_the_oracle() {
        let Some(dev) = gpu("backward_gpu_matches_finite_differences_of_the_oracle") else {
            return;
        };
        for c in fd_cases() {
            check_backward(&c, &|c, b| gpu_backward(&dev, c, b));
        }
    }

    /// The GPU's gradients in T against the CPU backward (itself checked against finite
    /// differences) run in f32 on the same T-rounded inputs.
    fn check_backward_vs_cpu<T: Element>(rng: &mut StdRng, dev: &Device, c: &Case, factor: f64) {
        let b = bwd_inputs::<T>(rng, c);
        let wide_in = BwdInputs {
            x: Inputs {
                q: to_f32(&b.x.q),
                k: to_f32(&b.x.k),
                v: to_f32(&b.x.v),
                init: b.x.init.clone(),
            },
            d_o: to_f32(&b.d_o),
            d_fin: b.d_fin.clone(),
        };
        let want = cpu_backward(2, c, &wide_in);
        let got = gpu_backward(dev, c, &b);
        let what = format!(
            "gpu backward {} lens={:?} h={} d={} e={} decay={:?} init={} causal={}",
            T::DTYPE,
            &c.lens[..c.lens.len().min(5)],
            c.heads,
            c.d,
            c.e,
            c.decay,
            c.init,
            c.causal
        );
        for (name, g, w) in ["dq", "dk", "dv", "d_init"]
            .iter()
            .zip(&got)
            .zip(&want)
            .map(|((n, g), w)| (n, g, w))
        {
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            // d_init is f32, but it sums products of T-rounded weighted operands: T's margin.
            assert_lp::<T>(&format!("{what}: {name}"), g, &w64, factor);
        }
    }

    #[test]
    fn backward_gpu_matches_cpu_all_dtypes() {
        let Some(dev) = gpu("backward_gpu_matches_cpu_all_dtypes") else {
            return;
        };
        let mut rng = rng("backward_gpu_matches_cpu_all_dtypes");
        for c in bwd_cases() {
            check_backward_vs_cpu::<f32>(&mut rng, &dev, &c, 2.0);
            // 16-bit: the weighted key rows, the scores P and the state copy are rounded to T
            // for the tensor cores (three roundings where the forward has two).
            check_backward_vs_cpu::<Bf16>(&mut rng, &dev, &c, 6.0);
            check_backward_vs_cpu::<F16>(&mut rng, &dev, &c, 6.0);
        }
    }

    #[test]
    fn host_buffers_on_a_gpu_call_are_placement_errors() {
        let Some(dev) = gpu("host_buffers_on_a_gpu_call_are_placement_errors") else {
            return;
        };
        let cfg = Config {
            heads: 1,
            d: 64,
            e: 64,
            decay: None,
            scale: 1.0,
            causal: true,
        };
        let seqs = Seqs::Dense { batch: 1, seq: 4 };
        let x = vec![0.0f32; 4 * 64];
        let mut o = x.clone();
        let mut ws = vec![0.0f32; lightning::workspace_len(&dev, &cfg, &seqs).unwrap()];
        let e = lightning::forward(
            &dev,
            &cfg,
            &seqs,
            Forward {
                q: (&x).into(),
                k: (&x).into(),
                v: (&x).into(),
                o: (&mut o).into(),
                initial_state: None,
                final_state: None,
                workspace: (&mut ws).into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::Placement { arg: "q", .. }), "{e}");
    }
}
