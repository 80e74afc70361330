//! Helpers shared by the integration tests: the GPU gate, random inputs, poisoned outputs
//! and an llm.c-style comparison that names the first mismatches.
#![allow(dead_code)]

use attnkit::{Device, Element, Error};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The CUDA device, or None (printing "skipped: ...") where there is none. A GPU that is
/// present but unusable fails the test; `ATTNKIT_REQUIRE_GPU=1` makes a missing one fail too,
/// so a GPU run cannot pass by skipping.
pub fn gpu(test: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e @ (Error::NoDriver | Error::NoDevice { .. } | Error::KernelsNotBuilt(_))) => {
            if std::env::var("ATTNKIT_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: ATTNKIT_REQUIRE_GPU=1 but {e}");
            }
            eprintln!("{test}: skipped: no CUDA device ({e})");
            None
        }
        Err(e) => panic!("{test}: a CUDA device is present but unusable: {e}"),
    }
}

/// The devices a test runs on: the CPU, and the GPU where there is one. With
/// `ATTNKIT_TESTS_GPU_ONLY=1` and a GPU present, the GPU alone: CI's emulator stage sets it,
/// because the CPU half of every test already ran in the plain `cargo test` before it.
pub fn devices(test: &str) -> Vec<Device> {
    let gpu = gpu(test);
    let gpu_only = std::env::var("ATTNKIT_TESTS_GPU_ONLY").is_ok_and(|v| v == "1");
    let mut v = Vec::new();
    if !(gpu_only && gpu.is_some()) {
        v.push(Device::cpu());
    }
    v.extend(gpu);
    v
}

/// A fresh seeded RNG per test, seed printed so a failure can be replayed
/// (`ATTNKIT_SEED=n`).
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("ATTNKIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1), rounded to `T`.
pub fn random<T: Element>(rng: &mut StdRng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect()
}

/// A buffer of NaNs: an output the call must overwrite everywhere.
pub fn poisoned<T: Element>(n: usize) -> Vec<T> {
    vec![T::nan(); n]
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere (NaN fails), printing the first
/// ten mismatches with their indices.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = 0usize;
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let ok = if w.is_infinite() {
            g as f64 == w
        } else {
            err <= atol + rtol * w.abs()
        };
        if !ok {
            if bad < 10 {
                eprintln!("{what}: mismatch at {i}: got {g}, want {w}");
            }
            bad += 1;
        }
        if err.is_finite() {
            worst = worst.max(err);
        }
    }
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements out of tolerance (max err {worst:e})",
        got.len()
    );
}

/// Widens a slice to f32.
pub fn to_f32<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
