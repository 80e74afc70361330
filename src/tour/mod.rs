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
    /// The rate, formatted by [`rate`] (a fixed width, in the unit that fits it).
    pub rate: String,
    /// Max abs error against the oracle, over the largest |reference| value (so bf16 outputs
    /// of any magnitude read alike: about 4e-3 is one bf16 rounding).
    pub rel_err: f64,
}

/// What a rate counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Per {
    /// Floating-point operations: MFLOP/s, GFLOP/s or TFLOP/s.
    Flop,
    /// Bytes moved: MB/s or GB/s (GB/s up to 9999.99: an H200's 4.8 TB/s reads as 4800 GB/s,
    /// the figure its data sheet compares with).
    Byte,
}

/// Width of every [`rate`]: a 7-wide number with two decimals, a space, a 7-wide unit, so the
/// tour's rate column lines up on the decimal point whatever the device.
pub const RATE_WIDTH: usize = 15;

/// `per_second` (operations or bytes a second) in the largest unit that shows it as at least
/// 1.00, e.g. `"  28.31 GFLOP/s"` for a CPU and `" 412.50 TFLOP/s"` for a GPU; always
/// [`RATE_WIDTH`] characters. Not finite or negative: `"-"` in the number's place.
pub fn rate(per_second: f64, per: Per) -> String {
    let units: &[(f64, &str)] = match per {
        Per::Flop => &[(1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")],
        Per::Byte => &[(1e9, "GB/s"), (1e6, "MB/s")],
    };
    let smallest = units[units.len() - 1];
    if !per_second.is_finite() || per_second < 0.0 {
        return format!("{:>7} {:<7}", "-", smallest.1);
    }
    let (scale, unit) = units
        .iter()
        .copied()
        // The first unit in which the value rounds to 1.00 or more (so 999.996e9 FLOP/s is
        // "1.00 TFLOP/s", not "1000.00 GFLOP/s"); the smallest unit otherwise.
        .find(|&(scale, _)| (per_second / scale * 100.0).round() >= 100.0)
        .unwrap_or(smallest);
    format!("{:>7.2} {unit:<7}", per_second / scale)
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
    ("flash bwd", flash::run_backward),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_pick_the_unit_that_fits_and_line_up() {
        let cases = [
            (28.31e9, Per::Flop, "  28.31 GFLOP/s"),
            (412.5e12, Per::Flop, " 412.50 TFLOP/s"),
            (7.0e12, Per::Flop, "   7.00 TFLOP/s"),
            (999.996e9, Per::Flop, "   1.00 TFLOP/s"),
            (12.5e6, Per::Flop, "  12.50 MFLOP/s"),
            (1.0e3, Per::Flop, "   0.00 MFLOP/s"),
            (1.95e9, Per::Byte, "   1.95 GB/s   "),
            (4321.0e9, Per::Byte, "4321.00 GB/s   "),
            (250.0e6, Per::Byte, " 250.00 MB/s   "),
            (f64::NAN, Per::Byte, "      - MB/s   "),
            (f64::INFINITY, Per::Flop, "      - MFLOP/s"),
        ];
        for (value, per, want) in cases {
            let got = rate(value, per);
            assert_eq!(got, want, "{value} {per:?}");
            assert_eq!(got.len(), RATE_WIDTH, "{got:?}");
        }
        // The decimal point sits in the same column for every unit.
        let points: Vec<_> = cases
            .iter()
            .filter(|c| c.0.is_finite())
            .map(|c| rate(c.0, c.1).find('.'))
            .collect();
        assert!(points.iter().all(|&p| p == Some(4)), "{points:?}");
    }
}
