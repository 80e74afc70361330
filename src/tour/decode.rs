//! Tour of decode: one new token per sequence against a bf16 KV cache (GQA 4:1, head dim 128,
//! unequal cache lengths), checked against the f64 oracle; rate in GB/s of K + V read.

use attnkit::decode::{self, Decode, Layout, Tables, oracle};
use attnkit::{Bf16, Device, Element, Result};

use super::Row;

pub fn run(dev: &Device) -> Result<Row> {
    // A GPU gets a serving-sized batch; the CPU (and the emulator) one that finishes in well
    // under a second (the emulator: seconds).
    let (lens, cap): (Vec<i32>, usize) = if dev.is_cuda() && !dev.is_emulated() {
        ((0..16).map(|i| 8192 + 2000 * i).collect(), 40960)
    } else {
        (vec![4000, 1500, 77, 2600], 4096)
    };
    let (hq, hk, d) = (32, 8, 128);
    let p = Decode::new(&lens, 1, hq, hk, d, Layout::Contiguous { capacity: cap });
    let n_kv = lens.len() * cap * hk * d;
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
    let (q, k, v) = (fill(p.o_len(), 1), fill(n_kv, 2), fill(n_kv, 3));
    let mut o = vec![Bf16::nan(); p.o_len()];
    let mut lse = vec![f32::NAN; p.lse_len()];
    let ws_len = p.workspace_len(dev);
    let t = super::on_device(dev, &q, &k, &v, &mut o, &mut lse, |dev, q, k, v, o, lse| {
        // The tables and workspace live where the call runs.
        #[cfg(feature = "cuda")]
        if let Some(s) = dev.stream() {
            let driver = |source| attnkit::Error::Driver {
                context: "tour copy",
                source,
            };
            let lens_d = s.clone_htod(&lens).map_err(driver)?;
            let mut ws = s.alloc_zeros::<f32>(ws_len.max(1)).map_err(driver)?;
            let tables = Tables {
                cache_seqlens: (&lens_d).into(),
                block_table: None,
                ring_offsets: None,
                sink_logits: None,
                alibi_slopes: None,
            };
            return decode::forward(dev, &p, q, k, v, tables, (&mut ws).into(), o, lse);
        }
        let mut ws = vec![0f32; ws_len];
        decode::forward(dev, &p, q, k, v, Tables::host(&p), (&mut ws).into(), o, lse)
    })?;
    let (want, _) = oracle::decode(&p, &q, &k, &v);
    let rel_err = super::rel_err(o.iter().map(|g| g.to_f32() as f64), &want);
    let keys: usize = lens.iter().map(|&l| l as usize).sum();
    let bytes = (2 * keys * hk * d * 2) as f64;
    Ok(Row {
        family: "decode",
        shape: format!(
            "b{} cache {}..{} h{hq}/{hk} d{d} bf16, {} splits",
            lens.len(),
            lens.iter().min().unwrap_or(&0),
            lens.iter().max().unwrap_or(&0),
            p.splits_for(dev)
        ),
        backend: dev.name(),
        ms: t,
        rate: super::rate(bytes / (t * 1e-3), super::Per::Byte),
        rel_err,
    })
}
