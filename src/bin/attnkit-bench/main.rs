//! The GPU bench binary: a fixed table of shapes per kernel family, one machine-readable line
//! (JSON) per case, beside the peers timed by `scripts/peers.py` in the same call.
//!
//! ```text
//! attnkit-bench --list                       # the case table, JSON lines (no GPU needed)
//! attnkit-bench [--family F] [--peak-tflops X] [--peak-gbps Y]
//! attnkit-bench --structure [--case NAME]    # small shapes, one run each (for the emulator)
//! ```
//! It measures the memory ceiling itself (a 1 GiB device-to-device copy, bytes read plus
//! written); the dense bf16 matmul ceiling comes from `--peak-tflops` (the peer script
//! measures it with cuBLAS through PyTorch in the same call) or is reported as unknown.
//! Every case prints `status`: "ok", "skipped: why" or "failed: why"; nothing is left out.

mod cases;

use cases::{Case, Rate, Reps};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let family = flag("--family");
    let case = flag("--case");
    let structure = args.iter().any(|a| a == "--structure");
    let table: Vec<Case> = if structure {
        cases::structure()
    } else {
        cases::table()
    }
    .into_iter()
    .filter(|c| family.as_deref().is_none_or(|f| f == c.family))
    .filter(|c| {
        case.as_deref()
            .is_none_or(|n| n == format!("{}/{}", c.family, c.name))
    })
    .collect();
    if args.iter().any(|a| a == "--list") {
        for c in &table {
            println!("{}", c.describe());
        }
        return;
    }
    let peak_tflops: Option<f64> = flag("--peak-tflops").and_then(|s| s.parse().ok());
    let dev = match attnkit::Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            for c in &table {
                println!(
                    "{}",
                    c.result("attnkit", "unknown", None, &format!("skipped: {e}"), None)
                );
            }
            return;
        }
    };
    let device = dev.name();
    if structure {
        // One untimed run each: the emulator's counters are the result.
        for c in &table {
            let status = match (c.run)(&dev, Reps::ONCE) {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            println!("{}", c.result("attnkit", &device, None, &status, None));
        }
        return;
    }
    let peak_gbps: Option<f64> = flag("--peak-gbps")
        .and_then(|s| s.parse().ok())
        .or_else(|| match cases::copy_bandwidth(&dev) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("copy bandwidth: {e}");
                None
            }
        });
    println!(
        "{{\"kind\":\"ceilings\",\"impl\":\"attnkit\",\"device\":{:?},\"copy_gbps\":{},\"matmul_tflops\":{}}}",
        device,
        num(peak_gbps),
        num(peak_tflops)
    );
    for c in &table {
        let line = match (c.run)(&dev, Reps::TIMED) {
            Ok((ms, rate)) => {
                let frac = match rate {
                    Rate::Tflops(t) => peak_tflops.map(|p| t / p),
                    Rate::Gbps(g) => peak_gbps.map(|p| g / p),
                };
                c.result("attnkit", &device, Some((ms, rate)), "ok", frac)
            }
            Err(e) => c.result("attnkit", &device, None, &format!("failed: {e}"), None),
        };
        println!("{line}");
    }
}

/// A JSON number, or null.
pub fn num(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("null".into(), |v| format!("{v:.6}"))
}
