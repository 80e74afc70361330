//! The backward pass (`flash::backward`, `flash::backward_varlen`): against the f64 oracle's
//! analytic gradients (themselves checked against finite differences of the oracle's
//! forward) on fresh random inputs with poisoned outputs, at sizes that are not tile
//! multiples, for every option and GQA ratio; bits identical across runs and thread counts;
//! bad input as typed errors.

use super::*;
use attnkit::flash::oracle::{self, HostExtras};
use attnkit::flash::{
    BackwardIo, BlockMask, Extras, GradStrides, Relu2Norm, Score, Strides, VarlenAttention,
};
use rand::Rng;

/// The inputs and options of one case.
struct Case {
    a: Attention,
    sinks: Option<Vec<f32>>,
    alibi: Option<Vec<f32>>,
    mask: Option<(Vec<u8>, usize, usize)>,
    /// The gradients' own strides and buffer lengths (dq, dk, dv); None: the inputs'.
    grad: Option<(GradStrides, [usize; 3])>,
}

impl Case {
    fn new(a: Attention) -> Self {
        Case {
            a,
            sinks: None,
            alibi: None,
            mask: None,
            grad: None,
        }
    }

    fn host(&self) -> HostExtras<'_> {
        HostExtras {
            sink_logits: self.sinks.as_deref(),
            alibi_slopes: self.alibi.as_deref(),
            block_mask: self.mask.as_ref().map(|(m, bq, bk)| (&m[..], *bq, *bk)),
        }
    }

    fn extras(&self) -> Extras<'_> {
        Extras {
            sink_logits: self.sinks.as_ref().map(|s| s.into()),
            alibi_slopes: self.alibi.as_ref().map(|s| s.into()),
            entropy: None,
            block_mask: self.mask.as_ref().map(|(m, bq, bk)| BlockMask {
                mask: m.into(),
                block_q: *bq,
                block_k: *bk,
            }),
        }
    }
}

/// The gradients the CPU backward writes (poisoned beforehand) for `c` on inputs q, k, v and
/// upstream gradient d_o, after the CPU forward made o and the LSE.
struct Got<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    d_sink: Vec<f32>,
}

fn run_backward<T: Element>(
    dev: &Device,
    c: &Case,
    (q, k, v): (&[T], &[T], &[T]),
    d_o: &[T],
) -> attnkit::Result<Got<T>> {
    let a = &c.a;
    let (mut o, mut lse) = (poisoned::<T>(a.o_len()), vec![f32::NAN; a.lse_len()]);
    flash::forward_with(
        &Device::cpu(),
        a,
        q.into(),
        k.into(),
        v.into(),
        (&mut o).into(),
        (&mut lse).into(),
        c.extras(),
    )?;
    let [nq, nk, nv] = c.grad.map_or([q.len(), k.len(), v.len()], |(_, n)| n);
    let grad_strides = c.grad.map(|(g, _)| g);
    let mut g = Got {
        dq: poisoned::<T>(nq),
        dk: poisoned::<T>(nk),
        dv: poisoned::<T>(nv),
        d_sink: vec![f32::NAN; a.heads_q],
    };
    let mut ws = vec![f32::NAN; flash::backward_workspace_len(dev, a)];
    #[cfg(feature = "cuda")]
    if let Some(st) = dev.stream() {
        let up = |x: &[T]| st.clone_htod(x).unwrap();
        let upf = |x: &[f32]| st.clone_htod(x).unwrap();
        let (qd, kd, vd, od, gd) = (up(q), up(k), up(v), up(&o), up(d_o));
        let ld = upf(&lse);
        let (mut dqd, mut dkd, mut dvd) = (up(&g.dq), up(&g.dk), up(&g.dv));
        let (mut dsd, mut wsd) = (upf(&g.d_sink), upf(&ws));
        let sinks = c.sinks.as_ref().map(|x| upf(x));
        let alibi = c.alibi.as_ref().map(|x| upf(x));
        let mask = c
            .mask
            .as_ref()
            .map(|(m, bq, bk)| (st.clone_htod(m).unwrap(), *bq, *bk));
        let extras = Extras {
            sink_logits: sinks.as_ref().map(|x| x.into()),
            alibi_slopes: alibi.as_ref().map(|x| x.into()),
            entropy: None,
            block_mask: mask.as_ref().map(|(m, bq, bk)| BlockMask {
                mask: m.into(),
                block_q: *bq,
                block_k: *bk,
            }),
        };
        flash::backward(
            dev,
            a,
            BackwardIo {
                q: (&qd).into(),
                k: (&kd).into(),
                v: (&vd).into(),
                o: (&od).into(),
                d_o: (&gd).into(),
                lse: (&ld).into(),
                dq: (&mut dqd).into(),
                dk: (&mut dkd).into(),
                dv: (&mut dvd).into(),
                grad_strides,
                d_sink_logits: c.sinks.as_ref().map(|_| (&mut dsd).into()),
                workspace: (&mut wsd).into(),
            },
            extras,
        )?;
        g.dq = st.clone_dtoh(&dqd).unwrap();
        g.dk = st.clone_dtoh(&dkd).unwrap();
        g.dv = st.clone_dtoh(&dvd).unwrap();
        g.d_sink = st.clone_dtoh(&dsd).unwrap();
        return Ok(g);
    }
    flash::backward(
        dev,
        a,
        BackwardIo {
            q: q.into(),
            k: k.into(),
            v: v.into(),
            o: (&o).into(),
            d_o: d_o.into(),
            lse: (&lse).into(),
            dq: (&mut g.dq).into(),
            dk: (&mut g.dk).into(),
            dv: (&mut g.dv).into(),
            grad_strides,
            d_sink_logits: c.sinks.as_ref().map(|_| (&mut g.d_sink).into()),
            workspace: (&mut ws).into(),
        },
        c.extras(),
    )?;
    Ok(g)
}

fn f32s<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// The CPU backward against the oracle's gradients, each within `atol + rtol |want|` where
/// `atol` is `tol` times the gradient's largest magnitude.
fn matches_oracle<T: Element>(dev: &Device, what: &str, rng: &mut StdRng, c: &Case, tol: f64) {
    let a = &c.a;
    let (q, k, v) = inputs::<T>(rng, a, 1.0);
    let d_o = random::<T>(rng, a.o_len());
    let g = run_backward(dev, c, (&q, &k, &v), &d_o).unwrap();
    let what = format!("{} {what}", dev.name());
    let want = oracle::backward(a, &q, &k, &v, &d_o, &c.host());
    for (name, got, w) in [
        ("dq", f32s(&g.dq), &want.dq),
        ("dk", f32s(&g.dk), &want.dk),
        ("dv", f32s(&g.dv), &want.dv),
    ] {
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
        assert_close(
            &format!("{what} {} {name}", T::DTYPE),
            &got,
            w,
            tol * scale,
            tol,
        );
    }
    if c.sinks.is_some() {
        let scale = want
            .d_sink_logits
            .iter()
            .fold(0f64, |m, x| m.max(x.abs()))
            .max(1e-3);
        assert_close(
            &format!("{what} d_sink_logits"),
            &g.d_sink,
            &want.d_sink_logits,
            tol * scale,
            tol,
        );
    }
}

/// Every option of the forward, at sizes that are not tile multiples, GQA ratios 1, 4, 8.
fn cases(rng: &mut StdRng) -> Vec<(&'static str, Case)> {
    let mut v = vec![
        ("plain", Case::new(Attention::new(2, 37, 53, 4, 4, 64))),
        (
            "causal gqa4",
            Case::new(Attention::new(1, 70, 70, 8, 2, 64).causal(true)),
        ),
        (
            "causal mqa8 seq_q < seq_k",
            Case::new(Attention::new(1, 19, 83, 8, 1, 32).causal(true)),
        ),
        (
            "causal seq_q > seq_k (empty rows)",
            Case::new(Attention::new(1, 90, 30, 2, 1, 64).causal(true)),
        ),
        (
            "window and sinks",
            Case::new(
                Attention::new(1, 100, 130, 2, 2, 64)
                    .causal(true)
                    .window(Some(20), Some(0))
                    .sinks(3),
            ),
        ),
        (
            "two-sided window",
            Case::new(Attention::new(1, 77, 77, 2, 1, 128).window(Some(9), Some(5))),
        ),
        (
            "entropy-invariant scale",
            Case::new(
                Attention::new(1, 65, 65, 2, 2, 64)
                    .causal(true)
                    .entropy_invariant_scale(true),
            ),
        ),
        (
            "relu2 seqlen",
            Case::new(Attention::new(1, 40, 50, 2, 2, 64).score(Score::Relu2(Relu2Norm::SeqLen))),
        ),
        (
            "relu2 visible causal",
            Case::new(
                Attention::new(1, 66, 66, 4, 2, 64)
                    .causal(true)
                    .score(Score::Relu2(Relu2Norm::Visible)),
            ),
        ),
    ];
    let mut sc = Case::new(
        Attention::new(1, 45, 71, 4, 2, 64)
            .causal(true)
            .softcap(1.5),
    );
    sc.alibi = Some(vec![0.25, 0.0, 0.125, 0.5]);
    v.push(("softcap and alibi", sc));
    let mut sk = Case::new(Attention::new(2, 33, 41, 4, 1, 64).causal(true));
    sk.sinks = Some((0..4).map(|_| rng.random_range(-1.0f32..2.0)).collect());
    v.push(("learned sink logits", sk));
    let mut bm = Case::new(Attention::new(1, 96, 96, 2, 2, 64).causal(true));
    let layout = BlockMask::local_layout(96usize.div_ceil(16), 96usize.div_ceil(16), 2).unwrap();
    bm.mask = Some((layout, 16, 16));
    v.push(("block mask", bm));
    v
}

#[test]
fn backward_f32_matches_the_oracle_for_every_option() {
    let test = "backward_f32_oracle";
    let mut rng = rng(test);
    for dev in devices(test) {
        for (what, c) in cases(&mut rng) {
            matches_oracle::<f32>(&dev, what, &mut rng, &c, 2e-4);
        }
    }
}

#[test]
fn backward_bf16_and_f16_match_the_oracle() {
    let test = "backward_low_precision_oracle";
    let mut rng = rng(test);
    for dev in devices(test) {
        for (what, c) in cases(&mut rng) {
            // Inputs and gradients are rounded to the type (2^-8 and 2^-11 relative); the
            // tiles compute in f32, P and dS enter the tensor cores rounded to the type.
            matches_oracle::<Bf16>(&dev, what, &mut rng, &c, 1.6e-2);
            matches_oracle::<F16>(&dev, what, &mut rng, &c, 2e-3);
        }
    }
}

#[test]
fn backward_every_head_dim_matches_the_oracle() {
    // Not tile multiples, and long enough that the tensor-core kernels meet fully visible
    // tiles (no per-element mask) beside partial ones, several stages of each sweep.
    let test = "backward_head_dims";
    let mut rng = rng(test);
    for dev in devices(test) {
        for d in HEAD_DIMS {
            let plain = Case::new(Attention::new(1, 100, 140, 2, 1, d));
            let causal = Case::new(Attention::new(1, 81, 81, 2, 2, d).causal(true));
            for (what, c) in [("plain gqa2", &plain), ("causal", &causal)] {
                let what = format!("{what} d{d}");
                matches_oracle::<Bf16>(&dev, &what, &mut rng, c, 1.6e-2);
                matches_oracle::<F16>(&dev, &what, &mut rng, c, 2e-3);
            }
        }
    }
}

/// The gradients written in strides of their own: the same bits as in the inputs' strides,
/// the gaps between rows left as they were.
fn own_grad_strides<T: Element>(dev: &Device, rng: &mut StdRng) {
    let (b, sq, sk, hq, hk, d) = (2, 37, 45, 4, 2, 64);
    let a = Attention::new(b, sq, sk, hq, hk, d).causal(true);
    let (q, k, v) = inputs::<T>(rng, &a, 1.0);
    let d_o = random::<T>(rng, a.o_len());
    let plain = run_backward(dev, &Case::new(a.clone()), (&q, &k, &v), &d_o).unwrap();
    // dq rows padded by 8 elements; dk rows with room for two; dv heads padded by 16 (each
    // its own, so that a gradient written in another's strides shows).
    let dq_s = Strides {
        batch: sq * (hq * d + 8),
        row: hq * d + 8,
        head: d,
        dim: 1,
    };
    let kv_s = Strides {
        batch: sk * 2 * hk * d,
        row: 2 * hk * d,
        head: d,
        dim: 1,
    };
    let dv_s = Strides {
        batch: sk * hk * (d + 16),
        row: hk * (d + 16),
        head: d + 16,
        dim: 1,
    };
    let mut c = Case::new(a);
    let lens = [b * dq_s.batch, b * kv_s.batch, b * dv_s.batch];
    c.grad = Some((
        GradStrides {
            dq: dq_s,
            dk: kv_s,
            dv: dv_s,
        },
        lens,
    ));
    let got = run_backward(dev, &c, (&q, &k, &v), &d_o).unwrap();
    let what = format!("{} {}", dev.name(), T::DTYPE);
    for (name, got, want, s, rows, heads) in [
        ("dq", &got.dq, &plain.dq, dq_s, sq, hq),
        ("dk", &got.dk, &plain.dk, kv_s, sk, hk),
        ("dv", &got.dv, &plain.dv, dv_s, sk, hk),
    ] {
        let mut written = vec![false; got.len()];
        for bi in 0..b {
            for r in 0..rows {
                for h in 0..heads {
                    let at = bi * s.batch + r * s.row + h * s.head;
                    let from = ((bi * rows + r) * heads + h) * d;
                    for c in 0..d {
                        written[at + c] = true;
                        assert_eq!(
                            got[at + c].to_f32().to_bits(),
                            want[from + c].to_f32().to_bits(),
                            "{what} {name} ({bi}, {r}, {h}, {c})"
                        );
                    }
                }
            }
        }
        let gaps_kept = got
            .iter()
            .zip(&written)
            .all(|(x, &w)| w || x.to_f32().is_nan());
        assert!(gaps_kept, "{what} {name}: a gap was written");
    }
    // A dk one element short of its strides' reach; on a GPU, f16/bf16 dq rows off 16 bytes.
    let full = c.grad.unwrap();
    let reach = (b - 1) * kv_s.batch + (sk - 1) * kv_s.row + hk * d;
    c.grad = Some((full.0, [lens[0], reach - 1, lens[2]]));
    let e = run_backward(dev, &c, (&q, &k, &v), &d_o)
        .err()
        .expect("a short dk accepted");
    assert_eq!(e.arg(), Some("dk"), "{what}: {e}");
    let mut odd = full.0;
    odd.dq.row = hq * d + 4;
    odd.dq.batch = sq * odd.dq.row;
    c.grad = Some((odd, lens));
    let r = run_backward(dev, &c, (&q, &k, &v), &d_o);
    if dev.is_cuda() && T::DTYPE != attnkit::DType::F32 {
        assert_eq!(r.err().and_then(|e| e.arg()), Some("dq"), "{what}");
    } else {
        assert!(r.is_ok(), "{what}: {:?}", r.err());
    }
}

#[test]
fn gradients_in_strides_of_their_own() {
    let test = "backward_grad_strides";
    let mut rng = rng(test);
    for dev in devices(test) {
        own_grad_strides::<f32>(&dev, &mut rng);
        own_grad_strides::<Bf16>(&dev, &mut rng);
    }
}

#[test]
fn f16_relu2_weights_past_f16_s_range_give_finite_gradients() {
    // relu(q.k / 8)^2 = 288^2 = 82944 > 65504 = f16::MAX, while o = 0.25 w and the gradients
    // fit: weights rounded to f16 on their way into a product would make dv infinite.
    let test = "backward_f16_relu2_range";
    let mut rng = rng(test);
    for dev in devices(test) {
        let c = Case::new(Attention::new(1, 3, 1, 1, 1, 64).score(Score::Relu2(Relu2Norm::SeqLen)));
        let big = vec![F16::from_f32(6.0); 3 * 64];
        let (q, k, v) = (&big[..], &big[..64], vec![F16::from_f32(0.25); 64]);
        let d_o: Vec<F16> = (0..3 * 64)
            .map(|_| F16::from_f32(rng.random_range(0.5f32..1.5) * 1e-4))
            .collect();
        let g = run_backward(&dev, &c, (q, k, &v), &d_o).unwrap();
        let want = oracle::backward(&c.a, q, k, &v, &d_o, &c.host());
        for (name, got, w) in [
            ("dq", f32s(&g.dq), &want.dq),
            ("dk", f32s(&g.dk), &want.dk),
            ("dv", f32s(&g.dv), &want.dv),
        ] {
            let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert_close(
                &format!("{} {name}", dev.name()),
                &got,
                w,
                2e-3 * scale,
                2e-3,
            );
        }
    }
}

#[test]
fn oracle_gradients_equal_finite_differences_of_the_oracle_forward() {
    // Inputs on a 2^-10 grid and a step of 2^-7: q +- h is exact in f32.
    let mut rng = rng("backward_finite_differences");
    let grid = |rng: &mut StdRng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random_range(-1024i32..1024) as f32) / 1024.0)
            .collect()
    };
    let h = 1.0 / 128.0;
    let mut cases = vec![
        Case::new(Attention::new(1, 3, 5, 2, 1, 32).causal(true).softcap(0.8)),
        Case::new(
            Attention::new(1, 4, 4, 1, 1, 32)
                .score(Score::Relu2(Relu2Norm::Visible))
                .causal(true),
        ),
        Case::new(
            Attention::new(1, 3, 6, 1, 1, 32)
                .window(Some(2), Some(1))
                .sinks(1)
                .entropy_invariant_scale(true),
        ),
    ];
    cases[0].alibi = Some(vec![0.3, 0.1]);
    cases[0].sinks = Some(vec![0.25, -0.5]);
    for c in &cases {
        let a = &c.a;
        let nk = a.seq_k * a.heads_kv * a.head_dim;
        let (mut q, mut k, mut v) = (
            grid(&mut rng, a.o_len()),
            grid(&mut rng, nk),
            grid(&mut rng, nk),
        );
        let d_o = grid(&mut rng, a.o_len());
        let loss = |q: &[f32], k: &[f32], v: &[f32], sinks: Option<&[f32]>| {
            let x = HostExtras {
                sink_logits: sinks,
                ..c.host()
            };
            let mut l = 0.0;
            for hq in 0..a.heads_q {
                for i in 0..a.seq_q {
                    let r = oracle::attention_row_with(a, q, k, v, &x, 0, hq, i);
                    let off = (i * a.heads_q + hq) * a.head_dim;
                    l +=
                        r.o.iter()
                            .zip(&d_o[off..])
                            .map(|(o, g)| o * *g as f64)
                            .sum::<f64>();
                }
            }
            l
        };
        let g = oracle::backward(a, &q, &k, &v, &d_o, &c.host());
        let fd = |x: &mut Vec<f32>, i: usize, f: &dyn Fn(&[f32]) -> f64| {
            let x0 = x[i];
            x[i] = x0 + h;
            let up = f(x);
            x[i] = x0 - h;
            let down = f(x);
            x[i] = x0;
            (up - down) / (2.0 * h as f64)
        };
        let close = |what: &str, i: usize, got: f64, want: f64| {
            assert!(
                (got - want).abs() <= 2e-3 * (1.0 + want.abs()),
                "{:?} {what}[{i}]: analytic {got}, finite differences {want}",
                a.opts
            );
        };
        for i in (0..q.len()).step_by(7) {
            let (k2, v2) = (k.clone(), v.clone());
            let want = fd(&mut q, i, &|q| loss(q, &k2, &v2, c.sinks.as_deref()));
            close("dq", i, g.dq[i], want);
        }
        for i in (0..k.len()).step_by(5) {
            let (q2, v2) = (q.clone(), v.clone());
            let want = fd(&mut k, i, &|k| loss(&q2, k, &v2, c.sinks.as_deref()));
            close("dk", i, g.dk[i], want);
            let (q2, k2) = (q.clone(), k.clone());
            let want = fd(&mut v, i, &|v| loss(&q2, &k2, v, c.sinks.as_deref()));
            close("dv", i, g.dv[i], want);
        }
        if let Some(s) = &c.sinks {
            for hh in 0..s.len() {
                let mut s = s.clone();
                let (q2, k2, v2) = (q.clone(), k.clone(), v.clone());
                let want = fd(&mut s, hh, &|s| loss(&q2, &k2, &v2, Some(s)));
                close("d_sink_logits", hh, g.d_sink_logits[hh], want);
            }
        }
    }
}

#[test]
fn backward_bits_are_identical_across_runs_and_thread_counts() {
    let mut rng = rng("backward_determinism");
    let mut c = Case::new(
        Attention::new(2, 150, 170, 8, 2, 64)
            .causal(true)
            .sinks(2)
            .window(Some(60), None),
    );
    c.sinks = Some(vec![0.1; 8]);
    let (q, k, v) = inputs::<Bf16>(&mut rng, &c.a, 1.0);
    let d_o = random::<Bf16>(&mut rng, c.a.o_len());
    let bits = |g: &Got<Bf16>| {
        let mut b: Vec<u32> = [&g.dq, &g.dk, &g.dv]
            .iter()
            .flat_map(|x| x.iter().map(|v| v.to_f32().to_bits()))
            .collect();
        b.extend(g.d_sink.iter().map(|x| x.to_bits()));
        b
    };
    let one = Device::cpu_with_threads(1).unwrap();
    let first = bits(&run_backward(&Device::cpu(), &c, (&q, &k, &v), &d_o).unwrap());
    let again = bits(&run_backward(&Device::cpu(), &c, (&q, &k, &v), &d_o).unwrap());
    let single = bits(&run_backward(&one, &c, (&q, &k, &v), &d_o).unwrap());
    assert!(
        first == again && first == single,
        "backward bits differ between runs"
    );
}

/// `flash::backward_varlen` on the GPU when there is one, else on the CPU (the CPU path is the
/// library's too): (dq, dk, dv), poisoned beforehand.
#[allow(clippy::type_complexity)]
fn varlen_grads<T: Element>(
    a: &VarlenAttention<'_>,
    (cu_q, cu_k): (&[i32], &[i32]),
    (q, k, v, o, d_o): (&[T], &[T], &[T], &[T], &[T]),
    lse: &[f32],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (mut dq, mut dk, mut dv) = (
        poisoned::<T>(q.len()),
        poisoned::<T>(k.len()),
        poisoned::<T>(v.len()),
    );
    let cpu = Device::cpu();
    let mut ws = vec![f32::NAN; flash::varlen_backward_workspace_len(&cpu, a)];
    let gpu = gpu("backward_varlen");
    #[cfg(feature = "cuda")]
    if let Some(st) = gpu.as_ref().and_then(|g| g.stream()) {
        let up = |x: &[T]| st.clone_htod(x).unwrap();
        let (cqd, ckd) = (st.clone_htod(cu_q).unwrap(), st.clone_htod(cu_k).unwrap());
        let (qd, kd, vd, od, gd) = (up(q), up(k), up(v), up(o), up(d_o));
        let ld = st.clone_htod(lse).unwrap();
        let (mut dqd, mut dkd, mut dvd) = (up(&dq), up(&dk), up(&dv));
        let mut wsd = st.clone_htod(&ws).unwrap();
        flash::backward_varlen(
            gpu.as_ref().unwrap(),
            a,
            (&cqd).into(),
            (&ckd).into(),
            BackwardIo {
                q: (&qd).into(),
                k: (&kd).into(),
                v: (&vd).into(),
                o: (&od).into(),
                d_o: (&gd).into(),
                lse: (&ld).into(),
                dq: (&mut dqd).into(),
                dk: (&mut dkd).into(),
                dv: (&mut dvd).into(),
                grad_strides: None,
                d_sink_logits: None,
                workspace: (&mut wsd).into(),
            },
            Extras::default(),
        )
        .unwrap();
        return (
            st.clone_dtoh(&dqd).unwrap(),
            st.clone_dtoh(&dkd).unwrap(),
            st.clone_dtoh(&dvd).unwrap(),
        );
    }
    let _ = gpu;
    flash::backward_varlen(
        &cpu,
        a,
        cu_q.into(),
        cu_k.into(),
        BackwardIo {
            q: q.into(),
            k: k.into(),
            v: v.into(),
            o: o.into(),
            d_o: d_o.into(),
            lse: lse.into(),
            dq: (&mut dq).into(),
            dk: (&mut dk).into(),
            dv: (&mut dv).into(),
            grad_strides: None,
            d_sink_logits: None,
            workspace: (&mut ws).into(),
        },
        Extras::default(),
    )
    .unwrap();
    (dq, dk, dv)
}

/// Varlen with empty sequences (keys without rows, rows without keys) against the oracle per
/// sequence, each gradient within `tol` of its largest magnitude (and `tol` relative).
fn varlen_case<T: Element>(rng: &mut StdRng, tol: f64) {
    let (hq, hkv, d) = (4, 2, 64);
    let (cu_q, cu_k) = ([0i32, 17, 17, 60, 61], [0i32, 30, 31, 31, 100]);
    let a = VarlenAttention::new(&cu_q, &cu_k, hq, hkv, d)
        .causal(true)
        .window(Some(25), None);
    let (tq, tk) = (61usize, 100usize);
    let q = random::<T>(rng, tq * hq * d);
    let k = random::<T>(rng, tk * hkv * d);
    let v = random::<T>(rng, tk * hkv * d);
    let d_o = random::<T>(rng, tq * hq * d);
    let (mut o, mut lse) = (poisoned::<T>(a.o_len()), vec![f32::NAN; a.lse_len()]);
    flash::forward_varlen(
        &Device::cpu(),
        &a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        cu_q[..].into(),
        cu_k[..].into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
    .unwrap();
    let (dq, dk, dv) = varlen_grads(&a, (&cu_q, &cu_k), (&q, &k, &v, &o, &d_o), &lse);
    let (dq, dk, dv) = (f32s(&dq), f32s(&dk), f32s(&dv));
    let t = T::DTYPE;
    for s in 0..4 {
        let (q0, q1) = (cu_q[s] as usize, cu_q[s + 1] as usize);
        let (k0, k1) = (cu_k[s] as usize, cu_k[s + 1] as usize);
        let one = Attention::new(1, q1 - q0, k1 - k0, hq, hkv, d)
            .causal(true)
            .window(Some(25), None);
        // Rows [r0, r1) of a packed tensor of `w` elements a row.
        fn rows<X: Clone>(x: &[X], r0: usize, r1: usize, w: usize) -> Vec<X> {
            x[r0 * w..r1 * w].to_vec()
        }
        if q1 == q0 {
            continue;
        }
        let want = oracle::backward(
            &one,
            &rows(&q, q0, q1, hq * d),
            &rows(&k, k0, k1, hkv * d),
            &rows(&v, k0, k1, hkv * d),
            &rows(&d_o, q0, q1, hq * d),
            &HostExtras::default(),
        );
        for (name, got, w) in [
            ("dq", rows(&dq, q0, q1, hq * d), &want.dq),
            ("dk", rows(&dk, k0, k1, hkv * d), &want.dk),
            ("dv", rows(&dv, k0, k1, hkv * d), &want.dv),
        ] {
            let scale = w.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-3);
            assert_close(&format!("{t} seq {s} {name}"), &got, w, tol * scale, tol);
        }
    }
    // Keys of a sequence with no query rows get zero gradients, not the poison.
    assert!(dk[30 * hkv * d..31 * hkv * d].iter().all(|&x| x == 0.0));

    // Device-only offsets (here host buffers) with totals past the last sequence: the rows of
    // no sequence read as zero, the others as above.
    let (xq, xk) = (3usize, 2usize);
    let big = VarlenAttention::with_device_offsets(
        flash::DeviceOffsets {
            batch: 4,
            total_q: tq + xq,
            total_k: tk + xk,
            max_seqlen_q: 43,
            max_seqlen_k: 69,
        },
        hq,
        hkv,
        d,
    )
    .causal(true)
    .window(Some(25), None);
    let pad = |x: &[T], extra: usize| {
        let mut y = x.to_vec();
        y.extend(std::iter::repeat_n(T::from_f32(0.25), extra));
        y
    };
    let (q2, k2, v2) = (
        pad(&q, xq * hq * d),
        pad(&k, xk * hkv * d),
        pad(&v, xk * hkv * d),
    );
    let (o2, g2) = (pad(&o, xq * hq * d), pad(&d_o, xq * hq * d));
    // The LSE is [heads_q, total_q]: each head's rows move to the longer stride.
    let mut lse2 = vec![0f32; big.lse_len()];
    for h in 0..hq {
        lse2[h * (tq + xq)..][..tq].copy_from_slice(&lse[h * tq..][..tq]);
    }
    let (mut dq2, mut dk2, mut dv2) = (
        poisoned::<T>(q2.len()),
        poisoned::<T>(k2.len()),
        poisoned::<T>(v2.len()),
    );
    let cpu = Device::cpu();
    let mut ws2 = vec![f32::NAN; flash::varlen_backward_workspace_len(&cpu, &big)];
    flash::backward_varlen(
        &cpu,
        &big,
        cu_q[..].into(),
        cu_k[..].into(),
        BackwardIo {
            q: (&q2).into(),
            k: (&k2).into(),
            v: (&v2).into(),
            o: (&o2).into(),
            d_o: (&g2).into(),
            lse: (&lse2).into(),
            dq: (&mut dq2).into(),
            dk: (&mut dk2).into(),
            dv: (&mut dv2).into(),
            grad_strides: None,
            d_sink_logits: None,
            workspace: (&mut ws2).into(),
        },
        Extras::default(),
    )
    .unwrap();
    let (dq2, dk2, dv2) = (f32s(&dq2), f32s(&dk2), f32s(&dv2));
    assert!(dq2[tq * hq * d..].iter().all(|&x| x == 0.0), "dq tail");
    assert!(
        dk2[tk * hkv * d..]
            .iter()
            .chain(&dv2[tk * hkv * d..])
            .all(|&x| x == 0.0),
        "dk/dv tail"
    );
    assert!(dq2[..tq * hq * d].iter().all(|x| x.is_finite()), "dq rows");
}

#[test]
fn varlen_backward_equals_each_sequence_alone_with_empty_ones() {
    let mut rng = rng("backward_varlen");
    varlen_case::<f32>(&mut rng, 2e-4);
    varlen_case::<Bf16>(&mut rng, 1.6e-2);
    varlen_case::<F16>(&mut rng, 2e-3);
}

#[test]
fn backward_bad_input_is_a_typed_error_naming_the_argument() {
    let a = Attention::new(1, 8, 8, 2, 1, 64).causal(true);
    let dev = Device::cpu();
    let x = vec![0.5f32; a.o_len()];
    let kv = vec![0.5f32; 8 * 64];
    let lse = vec![0f32; a.lse_len()];
    let sinks = [0.0f32, 0.0];
    let call = |ws: usize, dq: usize, d_sink: bool, sinks_in: bool, entropy: bool| {
        let (mut dq, mut dk, mut dv) = (vec![0f32; dq], vec![0f32; kv.len()], vec![0f32; kv.len()]);
        let (mut w, mut g, mut e) = (vec![0f32; ws], vec![0f32; 2], vec![0f32; a.lse_len()]);
        flash::backward(
            &dev,
            &a,
            BackwardIo {
                q: (&x).into(),
                k: (&kv).into(),
                v: (&kv).into(),
                o: (&x).into(),
                d_o: (&x).into(),
                lse: (&lse).into(),
                dq: (&mut dq).into(),
                dk: (&mut dk).into(),
                dv: (&mut dv).into(),
                grad_strides: None,
                d_sink_logits: d_sink.then(|| (&mut g).into()),
                workspace: (&mut w).into(),
            },
            Extras {
                sink_logits: sinks_in.then(|| sinks[..].into()),
                entropy: entropy.then(|| (&mut e).into()),
                ..Extras::default()
            },
        )
        .err()
        .and_then(|e| e.arg())
    };
    let full = flash::backward_workspace_len(&dev, &a);
    assert_eq!(call(full, x.len(), false, false, false), None);
    assert_eq!(
        call(full - 1, x.len(), false, false, false),
        Some("workspace")
    );
    assert_eq!(call(full, x.len() - 1, false, false, false), Some("dq"));
    assert_eq!(
        call(full, x.len(), true, false, false),
        Some("d_sink_logits")
    );
    assert_eq!(call(full, x.len(), false, false, true), Some("entropy"));
    assert_eq!(call(full, x.len(), true, true, false), None);
}

/// The naive backward in T's precision, as a framework computes it without a fused kernel
/// (PyTorch's rule for FlashAttention's tests): every matrix product accumulated in f32 and
/// rounded to T (S, P, dP, dS, dQ, dK, dV and D), softmax in f32. Contiguous, softmax, causal
/// or not (the options these tests give it). Returns (dq, dk, dv) as f64.
fn naive_lp_backward<T: Element>(
    a: &Attention,
    (q, k, v): (&[T], &[T], &[T]),
    d_o: &[T],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (d, sq, sk) = (a.head_dim, a.seq_q, a.seq_k);
    let r = |x: f32| T::from_f32(x).to_f32();
    let row = |x: &[T], s: usize, heads: usize, b: usize, i: usize, h: usize| -> Vec<f32> {
        let o = ((b * s + i) * heads + h) * d;
        x[o..o + d].iter().map(|v| v.to_f32()).collect()
    };
    let dotf = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
    let (mut dq, mut dk, mut dv) = (
        vec![0f64; q.len()],
        vec![0f64; k.len()],
        vec![0f64; k.len()],
    );
    // dK, dV accumulate over the group's heads and the rows in f32, then round once.
    let (mut dk32, mut dv32) = (vec![0f32; k.len()], vec![0f32; k.len()]);
    let scale = a.softmax_scale();
    let diag = sk as i64 - sq as i64;
    for b in 0..a.batch {
        for h in 0..a.heads_q {
            let hk = h / (a.heads_q / a.heads_kv);
            for i in 0..sq {
                let qi = row(q, sq, a.heads_q, b, i, h);
                let gi = row(d_o, sq, a.heads_q, b, i, h);
                let seen = |j: usize| !a.opts.causal || j as i64 <= i as i64 + diag;
                let s: Vec<f32> = (0..sk)
                    .map(|j| {
                        if seen(j) {
                            r(dotf(&qi, &row(k, sk, a.heads_kv, b, j, hk))) * scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                if mx == f32::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f32> = s.iter().map(|x| (x - mx).exp()).collect();
                let l: f32 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|x| r(x / l)).collect();
                let dp: Vec<f32> = (0..sk)
                    .map(|j| r(dotf(&gi, &row(v, sk, a.heads_kv, b, j, hk))))
                    .collect();
                let big_d = r(p.iter().zip(&dp).map(|(p, g)| p * g).sum::<f32>());
                let ds: Vec<f32> = p.iter().zip(&dp).map(|(p, g)| r(p * (g - big_d))).collect();
                let off_q = ((b * sq + i) * a.heads_q + h) * d;
                for c in 0..d {
                    let acc: f32 = (0..sk)
                        .map(|j| ds[j] * row(k, sk, a.heads_kv, b, j, hk)[c])
                        .sum();
                    dq[off_q + c] = r(acc * scale) as f64;
                }
                for j in 0..sk {
                    let off_k = ((b * sk + j) * a.heads_kv + hk) * d;
                    for c in 0..d {
                        dv32[off_k + c] += p[j] * gi[c];
                        dk32[off_k + c] += ds[j] * qi[c];
                    }
                }
            }
        }
    }
    for (i, (x, y)) in dk32.iter().zip(&dv32).enumerate() {
        dk[i] = r(x * scale) as f64;
        dv[i] = r(*y) as f64;
    }
    (dq, dk, dv)
}

/// FlashAttention's rule for f16/bf16: each gradient's max error against the f64 oracle is at
/// most twice the naive same-precision backward's, plus a small slack.
fn fa_rule<T: Element>(dev: &Device, what: &str, rng: &mut StdRng, a: Attention) {
    let c = Case::new(a);
    let (q, k, v) = inputs::<T>(rng, &c.a, 1.0);
    let d_o = random::<T>(rng, c.a.o_len());
    let g = run_backward(dev, &c, (&q, &k, &v), &d_o).unwrap();
    let want = oracle::backward(&c.a, &q, &k, &v, &d_o, &c.host());
    let (nq, nk, nv) = naive_lp_backward(&c.a, (&q, &k, &v), &d_o);
    let max_err = |got: &[f64], w: &[f64]| {
        got.iter()
            .zip(w)
            .map(|(g, w)| (g - w).abs())
            .fold(0f64, f64::max)
    };
    for (name, got, naive, w) in [
        ("dq", f32s(&g.dq), &nq, &want.dq),
        ("dk", f32s(&g.dk), &nk, &want.dk),
        ("dv", f32s(&g.dv), &nv, &want.dv),
    ] {
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let (ours, lp) = (max_err(&got, w), max_err(naive, w));
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(
            ours <= 2.0 * lp + 1e-3 * scale,
            "{} {what} {} {name}: max error {ours:e} > 2 x naive {} ({lp:e}) + slack",
            dev.name(),
            T::DTYPE,
            T::DTYPE
        );
    }
}

#[test]
fn backward_bf16_and_f16_meet_flashattention_s_rule() {
    let test = "backward_fa_rule";
    let mut rng = rng(test);
    for dev in devices(test) {
        for (what, a) in [
            ("plain", Attention::new(1, 47, 61, 2, 2, 64)),
            (
                "causal gqa4",
                Attention::new(1, 70, 70, 8, 2, 64).causal(true),
            ),
            (
                "causal d128",
                Attention::new(2, 33, 45, 2, 1, 128).causal(true),
            ),
        ] {
            fa_rule::<Bf16>(&dev, what, &mut rng, a.clone());
            fa_rule::<F16>(&dev, what, &mut rng, a);
        }
    }
}
