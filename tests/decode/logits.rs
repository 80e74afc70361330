//! The logit options, Gemma 2's softcap and ALiBi, each and together, against the f64 oracle
//! (which applies them from their definitions), on the CPU and the GPU; and their bad values.

use super::*;

/// ALiBi slopes for `heads` heads, Press et al.'s `2^(-8 (h + 1) / heads)`, the last one 0 (a
/// head without bias): rows of one block carry slopes up to a hundred times apart.
fn alibi_slopes(heads: usize) -> Vec<f32> {
    (0..heads)
        .map(|h| {
            if h + 1 == heads {
                0.0
            } else {
                (-8.0 * (h + 1) as f32 / heads as f32).exp2()
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Opts {
    Softcap,
    Alibi,
    Both,
}

/// The softcap of these tests: `scale * q·k` of uniform [-1, 1) inputs at d 64 and scale 0.5
/// spreads to about ±7, so the cap bends most logits.
const CAP: f32 = 4.0;

/// One problem per case (see `CASES`), checked against the oracle; then the same outputs
/// checked against the oracle of the problem without each option, which must refuse them: an
/// implementation that ignored an option could not pass.
fn logit_options<T: Element>(test: &str) {
    // (options, causal, splits, window, (heads_q, heads_kv, seq_q), sinks): each option alone
    // and together, causal and not, one split and several, with and without a window. GQA
    // groups 3 and 16 put rows of different query heads in one block, and in one thread's two
    // mma rows (g and g + 8: 8 is no multiple of 3; group 16 spans the block's 16 rows).
    type Case = (
        Opts,
        bool,
        usize,
        Option<usize>,
        (usize, usize, usize),
        bool,
    );
    const CASES: [Case; 8] = [
        (Opts::Softcap, true, 1, None, (6, 2, 3), false),
        (Opts::Softcap, false, 3, Some(40), (16, 1, 2), false),
        (Opts::Alibi, true, 3, None, (6, 2, 3), false),
        (Opts::Alibi, false, 1, Some(40), (16, 1, 2), false),
        (Opts::Alibi, false, 3, None, (6, 2, 3), false),
        (Opts::Both, true, 3, Some(40), (6, 2, 3), true),
        (Opts::Both, false, 3, None, (16, 1, 2), false),
        (Opts::Both, true, 1, None, (16, 1, 2), false),
    ];
    let mut rng = rng(test);
    for dev in devices(test) {
        // Lengths past a tile and a split; 1, below seq_q (negative query positions: the
        // non-causal rows still see key 0, and ALiBi measures from those positions); 0.
        let lens = [400, 1, 0, 77];
        let (cap, d) = (416, 64);
        for (opts, causal, splits, window, (hq, hk, sq), with_sinks) in CASES {
            let mut p = Decode::new(&lens, sq, hq, hk, d, Layout::Contiguous { capacity: cap })
                .causal(causal)
                .window(window)
                .splits(splits)
                .scale(0.5);
            if opts != Opts::Alibi {
                p = p.softcap(CAP);
            }
            let slopes = alibi_slopes(hq);
            let sinks: Vec<f32> = (0..hq).map(|h| h as f32 * 0.5 - 1.0).collect();
            let heads = Heads {
                alibi: (opts != Opts::Softcap).then_some(&slopes[..]),
                sinks: with_sinks.then_some(&sinks[..]),
            };
            let n_kv = lens.len() * cap * hk * d;
            let q = random::<T>(&mut rng, p.o_len());
            let (k, v) = (random::<T>(&mut rng, n_kv), random::<T>(&mut rng, n_kv));
            let (o, lse) = run_with(&dev, &p, heads, &q, &k, &v).unwrap();
            let what = format!(
                "{} {} {opts:?} causal={causal} splits={splits} window={window:?} h=({hq}, {hk}) \
                 sq={sq} sinks={with_sinks}",
                dev.name(),
                T::DTYPE
            );
            let keys = contiguous_keys(&p, &k, &v);
            check_with(&what, &p, heads, &q, &keys, &o, &lse);
            // Each option matters here: without it the oracle refuses these outputs.
            let mut without = Vec::new();
            if p.softcap.is_some() {
                let mut no_cap = p.clone();
                no_cap.softcap = None;
                without.push(("softcap", no_cap, heads));
            }
            if heads.alibi.is_some() {
                let no_alibi = Heads {
                    alibi: None,
                    ..heads
                };
                without.push(("alibi", p.clone(), no_alibi));
            }
            for (name, pw, hw) in without {
                let (err, bound, _, bad) = check_errors(&what, &pw, hw, &q, &keys, &o, &lse);
                assert!(
                    err > bound && bad > 0,
                    "{what}: the outputs pass without {name} (O {err:e} vs {bound:e}, {bad} LSEs)"
                );
            }
        }
    }
}

#[test]
fn softcap_and_alibi_each_and_together_f32() {
    logit_options::<f32>("softcap_and_alibi_each_and_together_f32");
}

#[test]
fn softcap_and_alibi_each_and_together_bf16() {
    logit_options::<Bf16>("softcap_and_alibi_each_and_together_bf16");
}

/// ALiBi's positions: query `i` sits at `cache_seqlens[b] - seq_q + i`, also when that is
/// negative (a cache shorter than the new tokens, non-causal): one key, so O is that key's
/// value and the LSE its logit, `scale q·k - slope |pos - 0|`, row by row; and a softcap
/// bounds every logit by the cap.
#[test]
fn alibi_measures_from_each_tokens_position_and_softcap_bounds_logits() {
    let test = "alibi_measures_from_each_tokens_position_and_softcap_bounds_logits";
    let mut rng = rng(test);
    for dev in devices(test) {
        let (sq, hq, d) = (3, 2, 64);
        let lens = [1];
        let p = Decode::new(&lens, sq, hq, 1, d, Layout::Contiguous { capacity: 8 })
            .causal(false)
            .scale(2.0)
            .softcap(0.5);
        let slopes = [0.75f32, 0.25];
        let heads = Heads {
            alibi: Some(&slopes),
            sinks: None,
        };
        let q = random::<f32>(&mut rng, p.o_len());
        let kv = random::<f32>(&mut rng, 8 * d);
        let (o, lse) = run_with(&dev, &p, heads, &q, &kv, &kv).unwrap();
        for i in 0..sq {
            for h in 0..hq {
                let qr = &q[(i * hq + h) * d..][..d];
                let dot: f64 = qr.iter().zip(&kv[..d]).map(|(a, b)| (a * b) as f64).sum();
                let pos = lens[0] as f64 - sq as f64 + i as f64;
                let want = 0.5 * (2.0 * dot / 0.5).tanh() - slopes[h] as f64 * pos.abs();
                let got = lse[h * sq + i] as f64;
                assert!(
                    (got - want).abs() < 1e-5,
                    "{} i={i} h={h}: lse {got}, want {want}",
                    dev.name()
                );
                let or = &o[(i * hq + h) * d..][..d];
                assert!(
                    or.iter().zip(&kv[..d]).all(|(a, b)| (a - b).abs() < 1e-6),
                    "{} i={i} h={h}: o is not key 0's value",
                    dev.name()
                );
            }
        }
    }
}

/// Bad softcaps (0, negative, NaN, ±inf, subnormal, one whose exp2-domain value overflows)
/// and ALiBi slopes of the wrong length are typed errors naming them everywhere; NaN,
/// infinite and overflowing slopes on the CPU (where the host reads them).
#[test]
fn bad_softcaps_and_alibi_slopes_are_typed_errors() {
    for dev in devices("bad_softcaps_and_alibi_slopes_are_typed_errors") {
        let lens = [20, 3];
        let p = Decode::new(&lens, 2, 4, 2, 64, Layout::Contiguous { capacity: 32 });
        let q = vec![0.5f32; p.o_len()];
        let kv = vec![0.5f32; 2 * 32 * 2 * 64];
        for c in [
            0.0,
            -0.0,
            -1.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
        ] {
            expect_err(run(&dev, &p.clone().softcap(c), &q, &kv, &kv), "softcap");
        }
        // Small and large caps that fit are fine.
        for c in [1e-3, 50.0, 1e30] {
            run(&dev, &p.clone().softcap(c), &q, &kv, &kv).unwrap();
        }
        let with = |slopes: &[f32]| {
            let heads = Heads {
                alibi: Some(slopes),
                sinks: None,
            };
            run_with(&dev, &p, heads, &q, &kv, &kv)
        };
        expect_err(with(&[0.5; 3]), "alibi_slopes");
        expect_err(with(&[0.5; 5]), "alibi_slopes");
        expect_err(with(&[]), "alibi_slopes");
        // Zero and negative slopes are legal (if odd) biases.
        with(&[0.0, -0.5, 1e-3, 8.0]).unwrap();
        if !dev.is_cuda() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e37, -1e37] {
                expect_err(with(&[0.5, bad, 0.5, 0.5]), "alibi_slopes");
            }
        }
    }
}
