//! Tour of FlashAttention forward: causal bf16 attention, checked on sampled rows against the
//! f64 oracle.

use attnkit::flash::{self, Attention, oracle};
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
    let fill = |n: usize, seed: u64| -> Vec<Bf16> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                Bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    };
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
