//! Tour of the Monarch family: a square Monarch layer with sqrt(n) blocks in bf16.

use std::time::Instant;

use attnkit::monarch::{self, MonarchShape, Rows, Weights, oracle};
use attnkit::{Bf16, Buf, BufMut, Device, Element, Result};

use super::Row;

/// `y = M x + bias`, n = 1024 with 32 blocks of 32 (the paper's b = sqrt(n)), 4096 tokens,
/// bf16; the first 32 tokens checked against the f64 oracle.
pub fn run(dev: &Device) -> Result<Row> {
    let (n, blocks, tokens) = (1024, 32, 4096);
    let shape = MonarchShape::square(n, blocks)?;
    let fill = |len: usize, salt: usize| -> Vec<Bf16> {
        (0..len)
            .map(|i| Bf16::from_f32(((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0))
            .collect()
    };
    let (w1, w2, bias, x) = (
        fill(shape.w1_len(), 1),
        fill(shape.w2_len(), 2),
        fill(n, 3),
        fill(tokens * n, 4),
    );
    let mut y = vec![Bf16::nan(); tokens * n];
    let rows = Rows::contiguous(tokens, n);
    let mut best = f64::INFINITY;
    #[cfg(feature = "cuda")]
    if let Some(stream) = dev.stream() {
        let driver = |source| attnkit::Error::Driver {
            context: "tour copy",
            source,
        };
        let w1d = stream.clone_htod(&w1).map_err(driver)?;
        let w2d = stream.clone_htod(&w2).map_err(driver)?;
        let bd = stream.clone_htod(&bias).map_err(driver)?;
        let xd = stream.clone_htod(&x).map_err(driver)?;
        let mut yd = stream.clone_htod(&y).map_err(driver)?;
        let w = Weights {
            shape,
            w1: (&w1d).into(),
            w2: (&w2d).into(),
            bias: Some((&bd).into()),
        };
        for _ in 0..3 {
            dev.synchronize()?;
            let t = Instant::now();
            monarch::multiply(dev, &w, (&xd).into(), rows, (&mut yd).into(), n)?;
            dev.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        stream.memcpy_dtoh(&yd, &mut y).map_err(driver)?;
    }
    if !dev.is_cuda() {
        let w = Weights {
            shape,
            w1: Buf::Host(&w1),
            w2: Buf::Host(&w2),
            bias: Some(Buf::Host(&bias)),
        };
        for _ in 0..3 {
            let t = Instant::now();
            monarch::multiply(dev, &w, Buf::Host(&x), rows, BufMut::Host(&mut y), n)?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let f64s = |v: &[Bf16]| -> Vec<f64> { v.iter().map(|e| e.to_f32() as f64).collect() };
    let checked = 32;
    let want = oracle::multiply(
        shape,
        &f64s(&w1),
        &f64s(&w2),
        Some(&f64s(&bias)),
        &f64s(&x[..checked * n]),
        checked,
    );
    let rel_err = super::rel_err(y.iter().map(|g| g.to_f32() as f64), &want);
    Ok(Row {
        family: "monarch",
        shape: format!("n={n} b={blocks} t={tokens} bf16"),
        backend: dev.name(),
        ms: best,
        rate: super::rate(shape.flops(tokens) / (best * 1e-3), super::Per::Flop),
        rel_err,
    })
}
