//! Tour of FlashAttention: the causal bf16 forward, checked on sampled rows against the f64
//! oracle, and the backward, checked against the oracle's gradients.

use attnkit::flash::{self, Attention, BackwardIo, Extras, oracle};
use attnkit::{Bf16, Device, Element, Result};

use super::Row;

pub fn run(dev: &Device) -> Result<Row> {
    // A GPU gets a serving-sized prefill; the CPU (and the emulator) a size that finishes in
    // about a second (the emulator: seconds).
    let a = if dev.is_cuda() && !dev.is_emulated() {
        Attention::new(4, 4096, 4096, 16, 4, 128).causal(true)
    } else {
        Attention::new(1, 1024, 1024, 4, 1, 64).causal(true)
    };
    let n_kv = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    let (q, k, v) = (fill(a.o_len(), 1), fill(n_kv, 2), fill(n_kv, 3));
    let mut o = vec![Bf16::nan(); a.o_len()];
    let mut lse = vec![f32::NAN; a.lse_len()];
    let t = super::on_device(dev, &q, &k, &v, &mut o, &mut lse, |dev, q, k, v, o, lse| {
        flash::forward(dev, &a, q, k, v, o, lse)
    })?;
    // Sampled rows against the oracle (it is O(seq_k) f64 work per row).
    let (mut got, mut wanted) = (Vec::new(), Vec::new());
    for (b, h, i) in [
        (0, 0, 0),
        (0, 1, 17),
        (a.batch - 1, a.heads_q - 1, a.seq_q - 1),
        (0, 2, a.seq_q / 2),
    ] {
        let (want, _) = oracle::attention_row(&a, &q, &k, &v, b, h, i);
        let off = ((b * a.seq_q + i) * a.heads_q + h) * a.head_dim;
        got.extend(o[off..off + a.head_dim].iter().map(|x| x.to_f32() as f64));
        wanted.extend(want);
    }
    let rel_err = super::rel_err(got.into_iter(), &wanted);
    Ok(Row {
        family: "flash",
        shape: format!(
            "b{} s{} h{}/{} d{} causal bf16",
            a.batch, a.seq_q, a.heads_q, a.heads_kv, a.head_dim
        ),
        backend: dev.name(),
        ms: t,
        rate: super::rate(a.flops() / (t * 1e-3), super::Per::Flop),
        rel_err,
    })
}

/// `n` deterministic values in [-1, 1) (an LCG), as bf16.
fn fill(n: usize, seed: u64) -> Vec<Bf16> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// The backward of a causal GQA bf16 problem, every gradient against the oracle's. On the CPU
/// (also where the tour's device is a GPU: the CUDA backward is a first CUDA-core version,
/// tested, but no speed to show yet).
pub fn run_backward(dev: &Device) -> Result<Row> {
    let cpu = Device::cpu();
    let dev = if dev.is_cuda() { &cpu } else { dev };
    let a = Attention::new(1, 512, 512, 4, 1, 64).causal(true);
    let n_kv = a.seq_k * a.heads_kv * a.head_dim;
    let (q, k, v, d_o) = (
        fill(a.o_len(), 4),
        fill(n_kv, 5),
        fill(n_kv, 6),
        fill(a.o_len(), 7),
    );
    let (mut o, mut lse) = (vec![Bf16::nan(); a.o_len()], vec![f32::NAN; a.lse_len()]);
    flash::forward(
        dev,
        &a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )?;
    let mut dq = vec![Bf16::nan(); q.len()];
    let (mut dk, mut dv) = (vec![Bf16::nan(); n_kv], vec![Bf16::nan(); n_kv]);
    let mut ws = vec![f32::NAN; flash::backward_workspace_len(dev, &a)];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        flash::backward(
            dev,
            &a,
            BackwardIo {
                q: (&q).into(),
                k: (&k).into(),
                v: (&v).into(),
                o: (&o).into(),
                d_o: (&d_o).into(),
                lse: (&lse).into(),
                dq: (&mut dq).into(),
                dk: (&mut dk).into(),
                dv: (&mut dv).into(),
                grad_strides: None,
                d_sink_logits: None,
                workspace: (&mut ws).into(),
            },
            Extras::default(),
        )?;
        best = best.min(t0.elapsed().as_secs_f64() * 1e3);
    }
    let want = oracle::backward(&a, &q, &k, &v, &d_o, &Default::default());
    let wide = |x: &[Bf16]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<_>>();
    let (got, wanted): (Vec<f64>, Vec<f64>) = [
        (wide(&dq), &want.dq),
        (wide(&dk), &want.dk),
        (wide(&dv), &want.dv),
    ]
    .into_iter()
    .flat_map(|(g, w)| g.into_iter().zip(w.iter().copied()).collect::<Vec<_>>())
    .unzip();
    Ok(Row {
        family: "flash bwd",
        shape: format!(
            "b{} s{} h{}/{} d{} causal bf16",
            a.batch, a.seq_q, a.heads_q, a.heads_kv, a.head_dim
        ),
        backend: dev.name(),
        ms: best,
        rate: super::rate(2.5 * a.flops() / (best * 1e-3), super::Per::Flop),
        rel_err: super::rel_err(got.into_iter(), &wanted),
    })
}
