//! The case table: what each family is measured at. `scripts/peers.py` reads the same table
//! (`--list`), so ours and the peers always run the same shapes.

use attnkit::flash::{self, Attention};
use attnkit::{Bf16, Device, Element, Result};

use super::num;

/// Throughput of one case.
#[derive(Clone, Copy, Debug)]
pub enum Rate {
    /// Compute-bound: TFLOP/s.
    Tflops(f64),
    /// Memory-bound: GB/s of the bytes that must move.
    Gbps(f64),
}

/// Runs one case on a device: (median ms, rate).
pub type Runner = Box<dyn Fn(&Device) -> Result<(f64, Rate)>>;

/// One line of the table.
pub struct Case {
    pub family: &'static str,
    /// Unique name within the family.
    pub name: String,
    /// The shape and options as JSON fields (`"k":v,...`), read by the peer script.
    pub shape: String,
    /// Runs the case (warm-up, median of timed runs); returns (ms, rate).
    pub run: Runner,
}

impl Case {
    pub fn describe(&self) -> String {
        format!(
            "{{\"kind\":\"case\",\"family\":{:?},\"case\":{:?},{}}}",
            self.family, self.name, self.shape
        )
    }

    pub fn result(
        &self,
        imp: &str,
        device: &str,
        m: Option<(f64, Rate)>,
        status: &str,
        frac: Option<f64>,
    ) -> String {
        let (ms, tflops, gbps) = match m {
            Some((ms, Rate::Tflops(t))) => (Some(ms), Some(t), None),
            Some((ms, Rate::Gbps(g))) => (Some(ms), None, Some(g)),
            None => (None, None, None),
        };
        format!(
            "{{\"kind\":\"result\",\"impl\":{imp:?},\"family\":{:?},\"case\":{:?},{},\"device\":{device:?},\"median_ms\":{},\"tflops\":{},\"gbps\":{},\"frac_ceiling\":{},\"status\":{status:?}}}",
            self.family,
            self.name,
            self.shape,
            num(ms),
            num(tflops),
            num(gbps),
            num(frac)
        )
    }
}

/// Timed runs per case after one warm-up.
const RUNS: usize = 20;

pub fn table() -> Vec<Case> {
    let mut t = Vec::new();
    // The runtime baseline: one memory-bound pass (the self-test scale), 256 Mi f32 elements.
    t.push(Case {
        family: "selftest",
        name: "scale_f32_256M".into(),
        shape: "\"dtype\":\"f32\",\"n\":268435456".into(),
        run: Box::new(selftest_case),
    });
    // FlashAttention forward: bf16, head dim 128, 16 heads, 16k tokens in all (batch x seq).
    for seq in [1024usize, 2048, 4096, 8192, 16384] {
        for causal in [false, true] {
            let (batch, heads, d) = (16384 / seq, 16, 128);
            t.push(Case {
                family: "flash",
                name: format!("bf16_d{d}_s{seq}_{}", if causal { "causal" } else { "full" }),
                shape: format!(
                    "\"dtype\":\"bf16\",\"batch\":{batch},\"seq_q\":{seq},\"seq_k\":{seq},\"heads_q\":{heads},\"heads_kv\":{heads},\"head_dim\":{d},\"causal\":{causal}"
                ),
                run: Box::new(move |dev| flash_case(dev, Attention::new(batch, seq, seq, heads, heads, d).causal(causal))),
            });
        }
    }
    t
}

fn flash_case(dev: &Device, a: Attention) -> Result<(f64, Rate)> {
    let s = dev
        .stream()
        .ok_or(attnkit::Error::NoDevice { ordinal: None })?
        .clone();
    let driver = |source| attnkit::Error::Driver {
        context: "bench alloc",
        source,
    };
    let fill = |n: usize, seed: u32| -> Vec<Bf16> {
        (0..n)
            .map(|i| {
                Bf16::from_f32(
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0
                        - 1.0,
                )
            })
            .collect()
    };
    let n_kv = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    let q = s.clone_htod(&fill(a.o_len(), 1)).map_err(driver)?;
    let k = s.clone_htod(&fill(n_kv, 2)).map_err(driver)?;
    let v = s.clone_htod(&fill(n_kv, 3)).map_err(driver)?;
    let mut o = s.alloc_zeros::<Bf16>(a.o_len()).map_err(driver)?;
    let mut lse = s.alloc_zeros::<f32>(a.lse_len()).map_err(driver)?;
    // q, k, v are 64 MiB each at these shapes: larger than the L2, no rotation needed.
    let t = attnkit::timing::time(dev, 2, RUNS, |_| {
        flash::forward(
            dev,
            &a,
            (&q).into(),
            (&k).into(),
            (&v).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )
    })?;
    Ok((t.median_ms, Rate::Tflops(a.flops() / t.median_ms / 1e9)))
}

fn selftest_case(dev: &Device) -> Result<(f64, Rate)> {
    let s = dev
        .stream()
        .ok_or(attnkit::Error::NoDevice { ordinal: None })?
        .clone();
    let driver = |source| attnkit::Error::Driver {
        context: "bench alloc",
        source,
    };
    let n = 1usize << 28;
    let x = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let mut y = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let t = attnkit::timing::time(dev, 2, RUNS, |_| {
        attnkit::selftest::scale(dev, (&x).into(), 1, 2.0, 1.0, (&mut y).into())
    })?;
    Ok((
        t.median_ms,
        Rate::Gbps(2.0 * (n * 4) as f64 / t.median_ms / 1e6),
    ))
}

/// Device-to-device copy bandwidth, GB/s counting bytes read plus written (1 GiB, median of 10).
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let s = dev
        .stream()
        .ok_or(attnkit::Error::NoDevice { ordinal: None })?
        .clone();
    let driver = |source| attnkit::Error::Driver {
        context: "copy bandwidth",
        source,
    };
    let n = 1usize << 28; // f32 elements: 1 GiB
    let src = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let mut dst = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let t = attnkit::timing::time(dev, 2, 10, |_| {
        s.memcpy_dtod(&src, &mut dst).map_err(driver)
    })?;
    Ok(2.0 * (n * 4) as f64 / t.median_ms / 1e6)
}
