//! The tour: `cargo run --release`. Picks the best device, says why, and runs one realistic
//! shape of every kernel family against its oracle, printing a table.

mod tour;

use attnkit::{Device, selftest};

fn main() {
    let (dev, why) = Device::best_with_reason();
    println!("attnkit tour");
    println!("  device : {}", dev.name());
    println!("  why    : {why}");
    // Which vector code the CPU path runs here (also the GPU tests' CPU halves).
    println!("  cpu    : {} (runtime-dispatched)", Device::cpu_simd());
    match attnkit::build_info() {
        Some((nvcc, archs)) => println!("  kernels: {nvcc}; {archs}"),
        None => println!("  kernels: none embedded (CPU-only build)"),
    }
    // On the GPU machine the tour must not pass by quietly falling back to the CPU.
    let mut failed = std::env::var("ATTNKIT_REQUIRE_GPU").is_ok_and(|v| v == "1") && !dev.is_cuda();
    if failed {
        println!("  ATTNKIT_REQUIRE_GPU=1 but the device is not a GPU");
    }
    let mut rows = Vec::new();
    for (name, run) in tour::FAMILIES {
        match run(&dev) {
            Ok(r) => rows.push(r),
            Err(e) => {
                failed = true;
                println!("  {name}: FAILED: {e}");
            }
        }
    }
    if dev.is_cuda() {
        match selftest::check_params_layout(&dev) {
            Ok(checks) => {
                for c in checks {
                    println!(
                        "  params layout {:<10} {:>4} bytes  {}",
                        c.family,
                        c.size,
                        if c.ok { "ok" } else { "MISMATCH" }
                    );
                    failed |= !c.ok;
                }
            }
            Err(e) => {
                failed = true;
                println!("  params layout: FAILED: {e}");
            }
        }
    }
    if dev.is_emulated() {
        // The interpreter's speed says nothing about a GPU's: no rate is printed for it.
        for r in &mut rows {
            r.rate = format!("{:<w$}", "(emulated)", w = tour::RATE_WIDTH);
        }
        println!("  note   : the PTX emulator: results are checked, times are not a GPU's");
    }
    println!();
    // Columns as wide as their longest entry, so every row lines up whatever the device.
    let width = |f: fn(&tour::Row) -> &str, head: &str| {
        rows.iter().map(|r| f(r).len()).fold(head.len(), usize::max)
    };
    let sw = width(|r| &r.shape, "shape");
    let bw = width(|r| &r.backend, "backend");
    println!(
        "{:<10} {:<sw$} {:<bw$} {:>10} {:<rw$} {:>10}",
        "family",
        "shape",
        "backend",
        "time ms",
        "rate",
        "rel err",
        rw = tour::RATE_WIDTH
    );
    for r in &rows {
        // A few bf16 roundings (4e-3 each) is expected; more than 2e-2 means a wrong result.
        let ok = r.rel_err <= 2e-2;
        failed |= !ok;
        println!(
            "{:<10} {:<sw$} {:<bw$} {:>10.3} {} {:>10.2e}{}",
            r.family,
            r.shape,
            r.backend,
            r.ms,
            r.rate,
            r.rel_err,
            if ok { "" } else { "  WRONG" }
        );
    }
    if failed {
        std::process::exit(1);
    }
}
