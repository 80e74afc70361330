//! The tour's families: each module runs one realistic shape on the chosen device, checks it
//! against the family's oracle and returns one row of the table.

use attnkit::{Device, Result};

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
    /// Max abs error against the oracle.
    pub max_err: f64,
}

/// A family's tour: one realistic shape on `dev`, checked against its oracle.
pub type Tour = fn(&Device) -> Result<Row>;

/// Every family of the tour, in the order printed.
pub const FAMILIES: &[(&str, Tour)] = &[("selftest", selftest::run), ("monarch", monarch::run)];
