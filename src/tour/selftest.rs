//! Tour of the self-test family.

use std::time::Instant;

use attnkit::{Buf, BufMut, Device, Element, Result, selftest};

use super::Row;

/// The self-test family: y = alpha * x + beta over 16M f32, bytes read plus written.
pub fn run(dev: &Device) -> Result<Row> {
    let n = 1 << 24;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let (alpha, beta) = (1.5f32, 0.25f64);
    let mut y = vec![f32::NAN; n];
    let ms = run_scale(dev, &x, &mut y, alpha, beta)?;
    let want: Vec<f64> = x
        .iter()
        .map(|&xi| alpha as f64 * xi as f64 + beta)
        .collect();
    let rel_err = super::rel_err(y.iter().map(|&g| g as f64), &want);
    let bytes = 2.0 * n as f64 * 4.0;
    Ok(Row {
        family: "selftest",
        shape: format!("scale n={n} f32"),
        backend: dev.name(),
        ms,
        rate: super::rate(bytes / (ms * 1e-3), super::Per::Byte),
        rel_err,
    })
}

/// Runs scale on `dev` (copying to and from the GPU if it is one); returns the best of three
/// timings of the call alone, in ms.
fn run_scale<T: Element>(dev: &Device, x: &[T], y: &mut [T], alpha: f32, beta: f64) -> Result<f64> {
    let mut best = f64::INFINITY;
    #[cfg(feature = "cuda")]
    if let Some(stream) = dev.stream() {
        let driver = |source| attnkit::Error::Driver {
            context: "tour copy",
            source,
        };
        let xd = stream.clone_htod(x).map_err(driver)?;
        let mut yd = stream.clone_htod(y).map_err(driver)?;
        for _ in 0..3 {
            dev.synchronize()?;
            let t = Instant::now();
            selftest::scale(dev, (&xd).into(), 1, alpha, beta, (&mut yd).into())?;
            dev.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        stream.memcpy_dtoh(&yd, y).map_err(driver)?;
        return Ok(best);
    }
    for _ in 0..3 {
        let t = Instant::now();
        selftest::scale(dev, Buf::Host(x), 1, alpha, beta, BufMut::Host(y))?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}
