//! The tour's families: each module runs one realistic shape on the chosen device, checks it
//! against the family's oracle and returns one row of the table.

use attnkit::{Buf, BufMut, Device, Element, Result};

mod decode;
mod flash;
mod lightning;
mod monarch;
mod selftest;

/// One row of the tour's table.
pub struct Row {
    /// Kernel family.
    pub family: &'static str,
    /// Shape and dtype, in words.
    pub shape: String,
    /// Device name.
    pub backend: String,
    /// Time of one call, ms (best of a few).
    pub ms: f64,
    /// TFLOP/s or GB/s, with its unit.
    pub rate: String,
    /// Max abs error against the oracle, over the largest |reference| value (so bf16 outputs
    /// of any magnitude read alike: about 4e-3 is one bf16 rounding).
    pub rel_err: f64,
}

/// Max |got - want| over max |want| (NaN counts as infinitely wrong).
pub fn rel_err(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let scale = want
        .iter()
        .fold(0.0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    got.zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(
            0.0f64,
            |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
        )
        / scale
}

/// A family's tour: one realistic shape on `dev`, checked against its oracle.
pub type Tour = fn(&Device) -> Result<Row>;

/// Every family of the tour, in the order printed.
pub const FAMILIES: &[(&str, Tour)] = &[
    ("selftest", selftest::run),
    ("flash", flash::run),
    ("lightning", lightning::run),
    ("monarch", monarch::run),
    ("decode", decode::run),
];

/// Runs `f` on `dev` over three inputs and two outputs held on the host (copied to the GPU and
/// back when `dev` is one): one warm-up, then the median of five timed runs. Returns ms; the
/// outputs hold the last run's results.
#[allow(clippy::type_complexity)]
pub fn on_device<T: Element, U: Element>(
    dev: &Device,
    a: &[T],
    b: &[T],
    c: &[T],
    out: &mut [T],
    out2: &mut [U],
    mut f: impl FnMut(
        &Device,
        Buf<'_, T>,
        Buf<'_, T>,
        Buf<'_, T>,
        BufMut<'_, T>,
        BufMut<'_, U>,
    ) -> Result<()>,
) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if let Some(s) = dev.stream() {
        let driver = |source| attnkit::Error::Driver {
            context: "tour copy",
            source,
        };
        let (ad, bd, cd) = (
            s.clone_htod(a).map_err(driver)?,
            s.clone_htod(b).map_err(driver)?,
            s.clone_htod(c).map_err(driver)?,
        );
        let (mut od, mut o2d) = (
            s.clone_htod(out).map_err(driver)?,
            s.clone_htod(out2).map_err(driver)?,
        );
        let t = attnkit::timing::time(dev, 1, 5, |_| {
            f(
                dev,
                (&ad).into(),
                (&bd).into(),
                (&cd).into(),
                (&mut od).into(),
                (&mut o2d).into(),
            )
        })?;
        s.memcpy_dtoh(&od, out).map_err(driver)?;
        s.memcpy_dtoh(&o2d, out2).map_err(driver)?;
        return Ok(t.median_ms);
    }
    let t = attnkit::timing::time(dev, 1, 5, |_| {
        f(
            dev,
            Buf::Host(a),
            Buf::Host(b),
            Buf::Host(c),
            BufMut::Host(out),
            BufMut::Host(out2),
        )
    })?;
    Ok(t.median_ms)
}
