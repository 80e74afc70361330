//! Fuzz targets of `attnkit::lightning` (see main.rs for the harness): forward (dense and
//! varlen), decode, backward, workspace_len, decay_slopes and layer_factor, with random and
//! hostile sizes, head dims, decays, scales, offsets and buffer lengths. Every `Ok` must have
//! written every output element it owns and left each buffer's tail (past what the call
//! writes) as poisoned as it was.

use crate::common::{poisoned, random};
use crate::{Outcome, float, huge, run, size};
use attnkit::lightning::{self, Backward, Config, Decode, Forward, Seqs};
use attnkit::{Bf16, Device, Element, F16};
use rand::{Rng, rngs::StdRng};

/// Most elements one fuzz buffer may have: sizes past it get short buffers (an error is due).
const CAP: usize = 1 << 20;

/// A buffer length for a call that needs `need` elements (None: the size overflowed): mostly
/// exact, sometimes longer (the tail must stay untouched), shorter or empty; a short one
/// when `need` is past what a test may allocate.
fn len_for(rng: &mut StdRng, need: Option<usize>) -> usize {
    match need {
        Some(n) if !huge(n) && n <= CAP => match rng.random_range(0..100) {
            0..85 => n,
            85..94 => n + rng.random_range(1..4),
            94..98 => n.saturating_sub(1),
            _ => rng.random_range(0..=n + 1),
        },
        _ => rng.random_range(0..64),
    }
}

/// Random input of a length drawn by [`len_for`].
fn input<T: Element>(rng: &mut StdRng, need: Option<usize>) -> Vec<T> {
    let n = len_for(rng, need);
    random(rng, n)
}

/// A poisoned output of a length drawn by [`len_for`].
fn output<T: Element>(rng: &mut StdRng, need: Option<usize>) -> Vec<T> {
    let n = len_for(rng, need);
    poisoned(n)
}

fn prod(xs: &[usize]) -> Option<usize> {
    xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x))
}

/// A head dim: mostly supported (64, 128), sometimes not.
fn dim(rng: &mut StdRng) -> usize {
    match rng.random_range(0..10) {
        0..6 => 64,
        6..8 => 128,
        8 => [0, 1, 32, 63, 65, 256][rng.random_range(0..6)],
        _ => size(rng, 200),
    }
}

/// A random config; `decay` is the storage its decay borrows.
fn config<'a>(rng: &mut StdRng, decay: &'a mut Vec<f32>) -> Config<'a> {
    let heads = if rng.random_bool(0.9) {
        rng.random_range(1..=2)
    } else {
        size(rng, 3)
    };
    let causal = rng.random_bool(0.8);
    let with_decay = rng.random_bool(if causal { 0.7 } else { 0.1 });
    if with_decay {
        let n = match rng.random_range(0..10) {
            0 => rng.random_range(0..4),
            _ if heads <= 8 => heads,
            _ => 2,
        };
        decay.extend((0..n).map(|_| float(rng, 0.0, 1.0)));
    }
    Config {
        heads,
        d: dim(rng),
        e: dim(rng),
        decay: with_decay.then_some(&decay[..]),
        scale: float(rng, 0.01, 1.0),
        causal,
    }
}

/// Random sequences: dense (`cu` unused) or varlen offsets, valid or broken.
fn sequences(rng: &mut StdRng, cu: &mut Vec<i32>) -> (bool, usize, usize, usize) {
    if rng.random_bool(0.5) {
        let batch = size(rng, 3);
        let seq = size(rng, 40);
        return (true, batch, seq, 0);
    }
    let n = rng.random_range(0..4);
    cu.push(0);
    for _ in 0..n {
        let len = rng.random_range(0..40);
        let last = cu[cu.len() - 1];
        cu.push(last + len);
    }
    match rng.random_range(0..12) {
        0 => cu[0] = 1,
        1 if cu.len() > 2 => cu.swap(1, 2),
        2 => cu.push(-5),
        3 => cu.clear(),
        _ => {}
    }
    let longest = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0).max(0) as usize;
    let max_seqlen = match rng.random_range(0..10) {
        0 => size(rng, 40),
        1 => longest.saturating_sub(1),
        _ => longest,
    };
    (false, 0, 0, max_seqlen)
}

fn seqs_of<'a>(dense: bool, batch: usize, seq: usize, max: usize, cu: &'a [i32]) -> Seqs<'a> {
    if dense {
        Seqs::Dense { batch, seq }
    } else {
        Seqs::Varlen {
            cu_seqlens: cu.into(),
            max_seqlen: max,
        }
    }
}

/// `(n_seqs, tokens)` the call should see, when the sequences look sane (None otherwise: the
/// buffers are then sized at random).
fn counts(dense: bool, batch: usize, seq: usize, cu: &[i32]) -> Option<(usize, usize)> {
    if dense {
        return Some((batch, batch.checked_mul(seq)?));
    }
    let last = *cu.last()?;
    (cu.len() >= 2 && last >= 0).then(|| (cu.len() - 1, last as usize))
}

/// Every element of `v[..n]` written and `v[n..]` still poisoned (NaN).
fn written_exactly<T: Element>(v: &[T], n: usize) -> bool {
    n <= v.len() && crate::written(&v[..n]) && v[n..].iter().all(|x| x.to_f32().is_nan())
}

fn dtype_case(
    rng: &mut StdRng,
    case: fn(&mut StdRng) -> Outcome,
    f16: fn(&mut StdRng) -> Outcome,
    bf16: fn(&mut StdRng) -> Outcome,
) -> Outcome {
    match rng.random_range(0..10) {
        0 => f16(rng),
        1 => bf16(rng),
        _ => case(rng),
    }
}

fn forward_case<T: Element>(rng: &mut StdRng) -> Outcome {
    let dev = Device::cpu();
    let mut decay = Vec::new();
    let cfg = config(rng, &mut decay);
    let mut cu = Vec::new();
    let (dense, batch, seq, max) = sequences(rng, &mut cu);
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let n = counts(dense, batch, seq, &cu);
    let (qk, vo, st) = match n {
        Some((ns, t)) => (
            prod(&[t, heads, d]),
            prod(&[t, heads, e]),
            prod(&[ns, heads, d, e]),
        ),
        None => (None, None, None),
    };
    let seqs = seqs_of(dense, batch, seq, max, &cu);
    let ws_need = lightning::workspace_len(&dev, &cfg, &seqs).ok();
    let q: Vec<T> = input(rng, qk);
    let k: Vec<T> = input(rng, qk);
    let v: Vec<T> = input(rng, vo);
    let mut o = output::<T>(rng, vo);
    let init = rng.random_bool(0.3).then(|| input::<f32>(rng, st));
    let mut fin = rng.random_bool(0.4).then(|| output::<f32>(rng, st));
    let mut ws = output::<f32>(rng, ws_need);
    lightning::forward(
        &dev,
        &cfg,
        &seqs,
        Forward {
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            o: (&mut o).into(),
            initial_state: init.as_ref().map(|s| s.into()),
            final_state: fin.as_mut().map(|s| s.into()),
            workspace: (&mut ws).into(),
        },
    )?;
    let (vo, st) = (vo.unwrap_or(usize::MAX), st.unwrap_or(usize::MAX));
    assert!(
        written_exactly(&o, vo),
        "o not written exactly: {cfg:?} {seqs:?}"
    );
    if let Some(f) = &fin {
        assert!(written_exactly(f, st), "final_state not written exactly");
    }
    if let Some(need) = ws_need {
        assert!(
            ws[need..].iter().all(|x| x.is_nan()),
            "workspace tail written"
        );
    }
    Ok(())
}

#[test]
fn fuzz_forward() {
    run("lightning::forward", 3000, |rng| {
        dtype_case(
            rng,
            forward_case::<f32>,
            forward_case::<F16>,
            forward_case::<Bf16>,
        )
    });
}

fn decode_case<T: Element>(rng: &mut StdRng) -> Outcome {
    let dev = Device::cpu();
    let mut decay = Vec::new();
    let cfg = config(rng, &mut decay);
    let batch = size(rng, 4);
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let (qk, vo, st) = (
        prod(&[batch, heads, d]),
        prod(&[batch, heads, e]),
        prod(&[batch, heads, d, e]),
    );
    let q: Vec<T> = input(rng, qk);
    let k: Vec<T> = input(rng, qk);
    let v: Vec<T> = input(rng, vo);
    let mut o = output::<T>(rng, vo);
    let s_len = len_for(rng, st);
    let mut s: Vec<f32> = random(rng, s_len);
    if let Some(n) = st.filter(|&n| n < s_len) {
        s[n..].fill(f32::NAN);
    }
    lightning::decode(
        &dev,
        &cfg,
        batch,
        Decode {
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            o: (&mut o).into(),
            state: (&mut s).into(),
        },
    )?;
    let (vo, st) = (vo.unwrap_or(usize::MAX), st.unwrap_or(usize::MAX));
    assert!(
        written_exactly(&o, vo),
        "o not written exactly: {cfg:?} batch {batch}"
    );
    assert!(written_exactly(&s, st), "state not updated exactly");
    Ok(())
}

#[test]
fn fuzz_decode() {
    run("lightning::decode", 3000, |rng| {
        dtype_case(
            rng,
            decode_case::<f32>,
            decode_case::<F16>,
            decode_case::<Bf16>,
        )
    });
}

fn backward_case<T: Element>(rng: &mut StdRng) -> Outcome {
    let dev = Device::cpu();
    let mut decay = Vec::new();
    let cfg = config(rng, &mut decay);
    let mut cu = Vec::new();
    let (dense, batch, seq, max) = sequences(rng, &mut cu);
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let (qk, vo, st) = match counts(dense, batch, seq, &cu) {
        Some((ns, t)) => (
            prod(&[t, heads, d]),
            prod(&[t, heads, e]),
            prod(&[ns, heads, d, e]),
        ),
        None => (None, None, None),
    };
    let seqs = seqs_of(dense, batch, seq, max, &cu);
    let ws_need = lightning::workspace_len(&dev, &cfg, &seqs).ok();
    let q: Vec<T> = input(rng, qk);
    let k: Vec<T> = input(rng, qk);
    let v: Vec<T> = input(rng, vo);
    let g: Vec<T> = input(rng, vo);
    let init = rng.random_bool(0.3).then(|| input::<f32>(rng, st));
    let d_fin = rng.random_bool(0.3).then(|| input::<f32>(rng, st));
    let mut dq = output::<T>(rng, qk);
    let mut dk = output::<T>(rng, qk);
    let mut dv = output::<T>(rng, vo);
    let mut d_init = rng.random_bool(0.4).then(|| output::<f32>(rng, st));
    let mut ws = output::<f32>(rng, ws_need);
    lightning::backward(
        &dev,
        &cfg,
        &seqs,
        Backward {
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            d_o: (&g).into(),
            initial_state: init.as_ref().map(|s| s.into()),
            d_final_state: d_fin.as_ref().map(|s| s.into()),
            dq: (&mut dq).into(),
            dk: (&mut dk).into(),
            dv: (&mut dv).into(),
            d_initial_state: d_init.as_mut().map(|s| s.into()),
            workspace: (&mut ws).into(),
        },
    )?;
    let (qk, vo, st) = (
        qk.unwrap_or(usize::MAX),
        vo.unwrap_or(usize::MAX),
        st.unwrap_or(usize::MAX),
    );
    assert!(written_exactly(&dq, qk), "dq: {cfg:?} {seqs:?}");
    assert!(written_exactly(&dk, qk), "dk: {cfg:?} {seqs:?}");
    assert!(written_exactly(&dv, vo), "dv: {cfg:?} {seqs:?}");
    if let Some(di) = &d_init {
        assert!(written_exactly(di, st), "d_initial_state");
    }
    if let Some(need) = ws_need {
        assert!(
            ws[need..].iter().all(|x| x.is_nan()),
            "workspace tail written"
        );
    }
    Ok(())
}

#[test]
fn fuzz_backward() {
    run("lightning::backward", 2000, |rng| {
        dtype_case(
            rng,
            backward_case::<f32>,
            backward_case::<F16>,
            backward_case::<Bf16>,
        )
    });
}

#[test]
fn fuzz_workspace_len() {
    let dev = Device::cpu();
    run("lightning::workspace_len", 5000, |rng| {
        let mut decay = Vec::new();
        let cfg = config(rng, &mut decay);
        let mut cu = Vec::new();
        let (dense, batch, _, max) = sequences(rng, &mut cu);
        // Any seq, hostile ones included: the plan's arithmetic must not overflow.
        let seq = size(rng, 1 << 20);
        let seqs = seqs_of(dense, batch, seq, max, &cu);
        let n = lightning::workspace_len(&dev, &cfg, &seqs)?;
        // A whole number of states, at least one per sequence and head.
        let state = cfg.heads * cfg.d * cfg.e;
        assert!(n >= state && n % state == 0, "{n} for {cfg:?} {seqs:?}");
        Ok(())
    });
}

#[test]
fn fuzz_decay_slopes() {
    run("lightning::decay_slopes", 4000, |rng| {
        let heads = size(rng, 64);
        let factor = float(rng, 0.0, 2.0);
        let s = lightning::decay_slopes(heads, factor)?;
        assert_eq!(s.len(), heads);
        assert!(
            s.iter().all(|x| x.is_finite() && *x >= 0.0),
            "{heads} {factor}"
        );
        Ok(())
    });
}

#[test]
fn fuzz_layer_factor() {
    run("lightning::layer_factor", 4000, |rng| {
        let (layer, layers) = (size(rng, 40), size(rng, 40));
        let f = lightning::layer_factor(layer, layers)?;
        assert!(f.is_finite() && f > 0.0, "{layer} of {layers}: {f}");
        Ok(())
    });
}

#[test]
fn fuzz_max_host_heads_is_the_bound() {
    // Not random: the edges of the documented head limit.
    let dev = Device::cpu();
    for (heads, ok) in [
        (lightning::MAX_HOST_HEADS, true),
        (lightning::MAX_HOST_HEADS + 1, false),
    ] {
        let cfg = Config {
            heads,
            d: 64,
            e: 64,
            decay: None,
            scale: 1.0,
            causal: true,
        };
        let r = lightning::workspace_len(&dev, &cfg, &Seqs::Dense { batch: 1, seq: 1 });
        assert_eq!(r.is_ok(), ok, "{heads}: {r:?}");
    }
}
