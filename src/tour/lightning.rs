//! Tour of the Lightning Attention-2 family.

use std::time::Instant;

use attnkit::lightning::{self, Config, Forward, Seqs, oracle};
use attnkit::{Bf16, Device, Element, Result};

use super::Row;

/// A TransNormerLLM-style layer: bf16, 8 heads of 64, 2048 tokens, ALiBi-like decay slopes,
/// against the f64 recurrence. Rate: bytes of q, k, v and o per second.
pub fn run(dev: &Device) -> Result<Row> {
    let (seq, heads, d, e) = (2048usize, 8, 64, 64);
    let n = seq * heads * d;
    let gen_ = |salt: usize| -> Vec<Bf16> {
        (0..n)
            .map(|i| Bf16::from_f32(((i * 7919 + salt * 104729) % 1009) as f32 / 504.5 - 1.0))
            .collect()
    };
    let (q, k, v) = (gen_(1), gen_(2), gen_(3));
    let slopes = lightning::decay_slopes(heads, lightning::layer_factor(0, 24)?)?;
    let cfg = Config {
        heads,
        d,
        e,
        decay: Some(&slopes),
        scale: 1.0 / (d as f32).sqrt(),
        causal: true,
    };
    let seqs = Seqs::Dense { batch: 1, seq };
    let mut o = vec![Bf16::nan(); n];
    let ms = run_forward(dev, &cfg, &seqs, &q, &k, &v, &mut o)?;
    let wide = |x: &[Bf16]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>();
    let s64: Vec<f64> = slopes.iter().map(|&s| s as f64).collect();
    let want = oracle::forward(
        &[seq],
        heads,
        d,
        e,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        Some(&s64),
        cfg.scale as f64,
        true,
        None,
    );
    let max_err = o
        .iter()
        .zip(&want.o)
        .map(|(g, w)| (g.to_f32() as f64 - w).abs())
        .fold(0.0, f64::max);
    // What storing bf16 outputs costs at best; the kernel may lose twice that (+ f32 sums).
    let max_ref = want.o.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let rounding = want.o.iter().fold(0.0f64, |m, &w| {
        m.max((Bf16::from_f32(w as f32).to_f32() as f64 - w).abs())
    });
    // f64::max skips NaN, so non-finite outputs are looked for on their own.
    let non_finite = o.iter().any(|x| !x.to_f32().is_finite());
    if non_finite || max_err > 2.0 * rounding + 5e-5 * max_ref {
        return Err(attnkit::Error::Value {
            arg: "o",
            detail: format!(
                "max error {max_err:e} against the oracle, over twice bf16 rounding ({rounding:e}, max |o| {max_ref:e})"
            ),
        });
    }
    let bytes = 4.0 * n as f64 * 2.0;
    Ok(Row {
        family: "lightning",
        shape: format!("fwd s={seq} h={heads} d={d} bf16"),
        backend: dev.name(),
        ms,
        rate: super::rate(bytes / (ms * 1e-3), super::Per::Byte),
        rel_err: max_err / max_ref.max(f64::MIN_POSITIVE),
    })
}

/// Runs the forward on `dev` (copying to and from the GPU if it is one); the best of three
/// timings of the call alone, in ms.
fn run_forward(
    dev: &Device,
    cfg: &Config<'_>,
    seqs: &Seqs<'_>,
    q: &[Bf16],
    k: &[Bf16],
    v: &[Bf16],
    o: &mut [Bf16],
) -> Result<f64> {
    let mut best = f64::INFINITY;
    let wl = lightning::workspace_len(dev, cfg, seqs)?;
    #[cfg(feature = "cuda")]
    if let Some(stream) = dev.stream() {
        let driver = |source| attnkit::Error::Driver {
            context: "tour copy",
            source,
        };
        let (qd, kd, vd) = (
            stream.clone_htod(q).map_err(driver)?,
            stream.clone_htod(k).map_err(driver)?,
            stream.clone_htod(v).map_err(driver)?,
        );
        let mut od = stream.clone_htod(o).map_err(driver)?;
        let mut ws = stream.alloc_zeros::<f32>(wl.max(1)).map_err(driver)?;
        for _ in 0..3 {
            dev.synchronize()?;
            let t = Instant::now();
            lightning::forward(
                dev,
                cfg,
                seqs,
                Forward {
                    q: (&qd).into(),
                    k: (&kd).into(),
                    v: (&vd).into(),
                    o: (&mut od).into(),
                    initial_state: None,
                    final_state: None,
                    workspace: (&mut ws).into(),
                },
            )?;
            dev.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        stream.memcpy_dtoh(&od, o).map_err(driver)?;
        return Ok(best);
    }
    let mut ws = vec![0.0f32; wl];
    for _ in 0..3 {
        let t = Instant::now();
        lightning::forward(
            dev,
            cfg,
            seqs,
            Forward {
                q: q.into(),
                k: k.into(),
                v: v.into(),
                o: (&mut *o).into(),
                initial_state: None,
                final_state: None,
                workspace: (&mut ws).into(),
            },
        )?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}
