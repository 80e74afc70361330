//! Timing one call the way the benches and the tour report it: warm-up runs first, then each
//! run timed alone (CUDA events on the device's stream for a GPU, wall clock for the CPU), and
//! the median reported. Callers rotate their inputs between runs (the closure gets the run
//! index) so that the L2 cache does not serve repeated runs.

use std::time::Instant;

use crate::device::{Backend, Device};
use crate::error::Result;

/// What [`time`] measured, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// Median over the timed runs.
    pub median_ms: f64,
    /// Fastest timed run.
    pub min_ms: f64,
    /// Number of timed runs.
    pub runs: usize,
}

/// Runs `f(i)` `warmup` times untimed, then `runs` times timed, each run alone; returns the
/// median and minimum. On a GPU each run is bracketed by CUDA events on `dev`'s stream (the
/// kernels' time, not the host's); on the CPU by the wall clock.
///
/// ```
/// let dev = attnkit::Device::cpu();
/// let t = attnkit::timing::time(&dev, 1, 5, |_| Ok(())).unwrap();
/// assert_eq!(t.runs, 5);
/// assert!(t.min_ms <= t.median_ms);
/// ```
pub fn time<F: FnMut(usize) -> Result<()>>(
    dev: &Device,
    warmup: usize,
    runs: usize,
    mut f: F,
) -> Result<Timing> {
    for i in 0..warmup {
        f(i)?;
    }
    let runs = runs.max(1);
    let mut ms = Vec::with_capacity(runs);
    match &dev.backend {
        Backend::Cpu { .. } => {
            for i in 0..runs {
                let t = Instant::now();
                f(warmup + i)?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => {
            use crate::error::DriverContext;
            use cudarc::driver::sys::CUevent_flags;
            let mut events = Vec::with_capacity(runs);
            for i in 0..runs {
                let start = c
                    .stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .driver("record event")?;
                f(warmup + i)?;
                let end = c
                    .stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .driver("record event")?;
                events.push((start, end));
            }
            c.stream.synchronize().driver("stream synchronize")?;
            for (start, end) in &events {
                ms.push(start.elapsed_ms(end).driver("event elapsed time")? as f64);
            }
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(Timing {
        median_ms: ms[ms.len() / 2],
        min_ms: ms[0],
        runs,
    })
}
