//! Fuzzing the public surface (issue 13): for every public entry point, a few thousand random
//! argument sets per run, many of them invalid, each under `catch_unwind`. A panic, an abort
//! or a hang is a failure; an `Ok` must leave every output element written (outputs are
//! poisoned with NaN beforehand); an `Err` must be a typed `attnkit::Error`.
//!
//! Sizes are drawn small (with a few huge ones that must be refused before any allocation),
//! so the whole run stays well under two minutes. The seed is printed; replay a run with
//! `ATTNKIT_SEED=<seed>` and a single case with `ATTNKIT_FUZZ_CASE=<index>` as well.
//! `ATTNKIT_FUZZ_CASES=<n>` overrides every target's case count (longer soaks).
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;

mod decode;
mod flash;
mod lightning;
mod monarch;

use rand::{Rng, SeedableRng, rngs::StdRng};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

/// What one case did: the call returned `Ok` (and its outputs were checked) or a typed error.
pub type Outcome = attnkit::Result<()>;

/// Runs `cases` random argument sets through `case` (fewer or more with
/// `ATTNKIT_FUZZ_CASES`). Each case gets its own RNG, derived from the run's seed and the
/// case index, so one case replays alone. Fails when any case panicked, and when the target
/// never returned `Ok` or never returned `Err` (a fuzz target that cannot reach both sides
/// tests nothing).
pub fn run(target: &str, cases: usize, mut case: impl FnMut(&mut StdRng) -> Outcome) {
    let seed = std::env::var("ATTNKIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    let only: Option<usize> = std::env::var("ATTNKIT_FUZZ_CASE")
        .ok()
        .and_then(|s| s.parse().ok());
    let cases = std::env::var("ATTNKIT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    eprintln!("{target}: seed {seed}, {cases} cases (replay: ATTNKIT_SEED={seed})");
    let (mut ok, mut err, mut panicked) = (0usize, 0usize, Vec::new());
    let (mut slowest, mut slowest_case) = (0.0f64, 0usize);
    for i in 0..cases {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let mut rng = case_rng(seed, i);
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| case(&mut rng))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                // Every error names what was wrong: Display must not be empty.
                assert!(!e.to_string().is_empty(), "{target}: case {i}: empty error");
                err += 1
            }
            Err(_) => panicked.push(i),
        }
        let s = t.elapsed().as_secs_f64();
        if s > slowest {
            (slowest, slowest_case) = (s, i);
        }
    }
    eprintln!(
        "{target}: {ok} ok, {err} errors, {} panics; slowest case {slowest_case} ({slowest:.3} s)",
        panicked.len()
    );
    assert!(
        panicked.is_empty(),
        "{target}: cases {panicked:?} panicked (replay one: ATTNKIT_SEED={seed} ATTNKIT_FUZZ_CASE={})",
        panicked[0]
    );
    if only.is_none() && cases >= 100 {
        assert!(
            ok > 0,
            "{target}: no case returned Ok: the generator tests nothing"
        );
        assert!(
            err > 0,
            "{target}: no case returned Err: the generator is too tame"
        );
    }
}

/// The RNG of case `i` of the run seeded `seed` (splitmix64 of both, so neighbouring cases
/// are unrelated).
fn case_rng(seed: u64, i: usize) -> StdRng {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// A size for a fuzz case: mostly small (0..=max_small, 0 included), sometimes an edge
/// (1, a power of two, one past it) and sometimes hostile (near `usize::MAX`, `2^31`,
/// `2^40`): these must be refused before anything is allocated.
pub fn size(rng: &mut StdRng, max_small: usize) -> usize {
    match rng.random_range(0..100) {
        0..80 => rng.random_range(0..=max_small),
        80..90 => [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65][rng.random_range(0..11)],
        90..93 => usize::MAX - rng.random_range(0..4),
        93..96 => 1 << rng.random_range(30..=62),
        _ => (i32::MAX as usize).wrapping_add(rng.random_range(0..3)),
    }
}

/// True when a value is hostile (a size no CPU test could allocate).
pub fn huge(n: usize) -> bool {
    n > 1 << 24
}

/// A float for scales, decays and logits: mostly ordinary, sometimes NaN, ±inf, 0, negative,
/// subnormal or huge.
pub fn float(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    match rng.random_range(0..100) {
        0..85 => rng.random_range(lo..hi),
        85..88 => f32::NAN,
        88..91 => f32::INFINITY,
        91..94 => f32::NEG_INFINITY,
        94..96 => 0.0,
        96..98 => -rng.random_range(lo.abs()..hi.abs() + 1.0),
        98 => f32::MIN_POSITIVE / 4.0,
        _ => 1e30,
    }
}

/// True when every element of an output is written (the NaN poison is gone).
pub fn written<T: attnkit::Element>(v: &[T]) -> bool {
    v.iter().all(|x| !x.to_f32().is_nan())
}
