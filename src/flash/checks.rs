//! Validation of a flash call, before anything is allocated or launched: sizes against the
//! documented limits, options, extras, buffer lengths, and strides (with an exact
//! output-overlap test). Nothing here reads a tensor's elements; the CPU path alone compares
//! host copies of the varlen offsets ([`check_offset_buffers`]).

use super::{Extras, HEAD_DIMS, MAX_LEN, Problem, Relu2Norm, Score, Strides};
use crate::error::{Error, Result};

/// The most sequences and query heads a call takes: one CUDA grid dimension each.
pub(super) const MAX_GRID: usize = 65535;

/// Checks the sizes of a problem against the limits, before any product of them is formed:
/// every later product (`batch * seq * heads * head_dim`, LSE strides, mask blocks) then fits
/// a u64 with room to spare.
pub(super) fn check_sizes(sizes: &[(&'static str, usize)]) -> Result<()> {
    for &(arg, n) in sizes {
        let max = match arg {
            "batch" | "heads_q" | "heads_kv" => MAX_GRID,
            _ => MAX_LEN,
        };
        if n == 0 && arg != "total_k" {
            return Err(Error::Shape {
                arg,
                detail: "must be at least 1".into(),
            });
        }
        if n > max {
            return Err(Error::Unsupported {
                arg,
                detail: format!("{n} exceeds the limit {max}"),
            });
        }
    }
    Ok(())
}

/// `batch * seq` for sizes [`check_sizes`] let through, as the packed total it must not exceed.
pub(super) fn checked_total(arg: &'static str, batch: usize, seq: usize) -> Result<usize> {
    batch
        .checked_mul(seq)
        .filter(|&t| t <= MAX_LEN)
        .ok_or_else(|| Error::Unsupported {
            arg,
            detail: format!("batch ({batch}) x seq ({seq}) exceeds the limit {MAX_LEN} rows"),
        })
}

/// Checks offsets: from 0, non-decreasing (so within i32). Returns the longest sequence.
pub(super) fn check_offsets(arg: &'static str, cu: &[i32]) -> Result<usize> {
    match cu.first() {
        Some(0) => {}
        Some(&x) => {
            return Err(Error::Value {
                arg,
                detail: format!("must start at 0, starts at {x}"),
            });
        }
        None => {
            return Err(Error::Shape {
                arg,
                detail: "needs at least 2 offsets (one sequence)".into(),
            });
        }
    }
    let mut longest = 0usize;
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::Value {
                arg,
                detail: format!("decreases at {}: {} -> {}", i + 1, w[0], w[1]),
            });
        }
        // Both are >= 0 (the first is 0 and they never decrease): no overflow.
        longest = longest.max((w[1] - w[0]) as usize);
    }
    Ok(longest)
}

/// The CPU reads the offsets from the problem, the GPU from the buffers: on the CPU both must
/// say the same, or the two backends would compute different things.
pub(super) fn check_offset_buffers(problem: &[i32], buf: &[i32], arg: &'static str) -> Result<()> {
    if let Some(i) = (0..problem.len()).find(|&i| buf.get(i) != problem.get(i)) {
        return Err(Error::Value {
            arg,
            detail: format!(
                "the buffer holds {:?} at {i}, the problem's offsets {}",
                buf.get(i),
                problem[i]
            ),
        });
    }
    Ok(())
}

/// Checks offsets the caller declared only by their sizes ([`super::Offsets::Device`]) once
/// the CPU can read them: from 0, non-decreasing, no sequence longer than `max`, the last at
/// most `total`.
pub(super) fn check_device_offsets(
    cu: &[i32],
    arg: &'static str,
    max: usize,
    total: usize,
) -> Result<()> {
    let longest = check_offsets(arg, cu)?;
    let last = cu.last().map_or(0, |&x| x as usize);
    if longest > max || last > total {
        return Err(Error::Value {
            arg,
            detail: format!(
                "a sequence of {longest} rows or an end at {last} exceeds the declared maximum \
                 {max} or total {total}"
            ),
        });
    }
    Ok(())
}

/// Checks the options and the extras against the problem: sizes, NaN, and the combinations
/// a score function does not support.
pub(super) fn check_extras(p: &Problem<'_>, x: &Extras<'_>) -> Result<()> {
    let o = &p.opts;
    for (arg, n) in [
        ("window_left", o.window_left),
        ("window_right", o.window_right),
        ("sinks", Some(o.sinks)),
    ] {
        if let Some(n) = n.filter(|&n| n > MAX_LEN) {
            return Err(Error::Value {
                arg,
                detail: format!("{n} exceeds {MAX_LEN}"),
            });
        }
    }
    if let Score::Relu2(norm) = o.score {
        let unsupported = |arg: &'static str, what: &str| Error::Unsupported {
            arg,
            detail: format!("relu² attention has no {what}"),
        };
        if x.sink_logits.is_some() {
            return Err(unsupported(
                "sink_logits",
                "softmax denominator for a sink logit",
            ));
        }
        if x.alibi_slopes.is_some() {
            return Err(unsupported("alibi_slopes", "softmax logits to bias"));
        }
        if o.softcap.is_some() {
            return Err(unsupported("softcap", "softmax logits to cap"));
        }
        if x.entropy.is_some() {
            return Err(unsupported(
                "entropy",
                "probability distribution to take the entropy of",
            ));
        }
        if o.entropy_scale {
            return Err(unsupported(
                "entropy_scale",
                "softmax entropy to keep invariant",
            ));
        }
        if norm == Relu2Norm::Visible && x.block_mask.is_some() {
            return Err(Error::Unsupported {
                arg: "block_mask",
                detail: "relu² normalised by visible keys needs a mask without blocks".into(),
            });
        }
    }
    if o.entropy_scale && x.block_mask.is_some() {
        return Err(Error::Unsupported {
            arg: "block_mask",
            detail: "the entropy-invariant scale counts visible keys in closed form, which a \
                     block mask breaks"
                .into(),
        });
    }
    if let Some(c) = o.softcap {
        // Normal: a subnormal cap's 1 / cap overflows, and a zero score would become NaN.
        if !(c > 0.0 && c.is_normal() && (c * std::f32::consts::LOG2_E).is_finite()) {
            return Err(Error::Value {
                arg: "softcap",
                detail: format!("{c} is not a finite, normal cap above 0"),
            });
        }
    }
    if let Some(s) = &x.alibi_slopes {
        if s.len() != p.heads_q {
            return Err(Error::Shape {
                arg: "alibi_slopes",
                detail: format!("holds {} slopes, heads_q is {}", s.len(), p.heads_q),
            });
        }
    }
    if let Some(s) = &x.sink_logits {
        if s.len() != p.heads_q {
            return Err(Error::Shape {
                arg: "sink_logits",
                detail: format!("holds {} logits, heads_q is {}", s.len(), p.heads_q),
            });
        }
    }
    if let Some(e) = &x.entropy {
        // heads_q <= MAX_GRID and total_q <= MAX_LEN: no overflow.
        let need = p.heads_q * p.total_q;
        if e.len() < need {
            return Err(Error::Shape {
                arg: "entropy",
                detail: format!(
                    "holds {} elements, needs {need} (the LSE's layout)",
                    e.len()
                ),
            });
        }
    }
    if let Some(m) = &x.block_mask {
        // The kernel divides row and key indices by these in i32.
        if !(1..=MAX_LEN).contains(&m.block_q) || !(1..=MAX_LEN).contains(&m.block_k) {
            return Err(Error::Value {
                arg: "block_mask",
                detail: format!(
                    "block_q ({}) and block_k ({}) must be in 1..={MAX_LEN}",
                    m.block_q, m.block_k
                ),
            });
        }
        // Each factor is at most MAX_LEN: no overflow.
        let (rows, cols) = (p.seq_q.div_ceil(m.block_q), p.seq_k.div_ceil(m.block_k));
        let need = rows * cols;
        if m.mask.len() < need {
            return Err(Error::Shape {
                arg: "block_mask",
                detail: format!(
                    "holds {} blocks, [{rows}, {cols}] needs {need}",
                    m.mask.len()
                ),
            });
        }
    }
    Ok(())
}

/// Checks the scale a call uses: finite, and finite once folded into the exp2 domain.
pub(super) fn check_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() || !(scale * std::f32::consts::LOG2_E).is_finite() {
        return Err(Error::Value {
            arg: "scale",
            detail: format!("{scale} is not finite (or overflows times log2 e)"),
        });
    }
    Ok(())
}

/// Checks the host sink logits: NaN has no meaning (-inf is "no sink", +inf "all weight on
/// the sink").
pub(super) fn check_sink_values(sinks: &[f32]) -> Result<()> {
    if let Some(h) = sinks.iter().position(|s| s.is_nan()) {
        return Err(Error::Value {
            arg: "sink_logits",
            detail: format!("head {h}'s logit is NaN"),
        });
    }
    Ok(())
}

/// Checks the host ALiBi slopes: each finite (an infinite slope times a zero distance is NaN).
pub(super) fn check_alibi_values(slopes: &[f32]) -> Result<()> {
    if let Some(h) = slopes.iter().position(|s| !s.is_finite()) {
        return Err(Error::Value {
            arg: "alibi_slopes",
            detail: format!("head {h}'s slope {} is not finite", slopes[h]),
        });
    }
    Ok(())
}

/// Every check that does not depend on the backend. The sizes were bounded by
/// [`check_sizes`], so the products below do not overflow.
pub(super) fn check(
    p: &Problem<'_>,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    o_len: usize,
    lse_len: usize,
) -> Result<()> {
    if !HEAD_DIMS.contains(&p.d) {
        return Err(Error::Unsupported {
            arg: "head_dim",
            detail: format!("{} (supported: {HEAD_DIMS:?})", p.d),
        });
    }
    if p.heads_q % p.heads_kv != 0 {
        return Err(Error::Shape {
            arg: "heads_kv",
            detail: format!(
                "heads_q ({}) is not a multiple of heads_kv ({})",
                p.heads_q, p.heads_kv
            ),
        });
    }
    check_scale(p.scale)?;
    let fixed = !p.varlen;
    let (rows_q, rows_k) = if fixed {
        (p.seq_q, p.seq_k)
    } else {
        (p.total_q, p.total_k)
    };
    let batches = if fixed { p.batch } else { 1 };
    for (arg, s, rows, heads, len) in [
        ("q", &p.q, rows_q, p.heads_q, q_len),
        ("k", &p.k, rows_k, p.heads_kv, k_len),
        ("v", &p.v, rows_k, p.heads_kv, v_len),
        ("o", &p.o, rows_q, p.heads_q, o_len),
    ] {
        check_strides(arg, s, [batches, rows, heads, p.d], len, arg == "o")?;
    }
    let lse_need = p.heads_q * p.total_q;
    if lse_len < lse_need {
        return Err(Error::Shape {
            arg: "lse",
            detail: format!(
                "holds {lse_len} elements, needs {lse_need} ({} x heads x rows)",
                if fixed { "batch" } else { "1" }
            ),
        });
    }
    Ok(())
}

/// Checks a strided `[a, b, c, d]` tensor against its buffer: last dimension contiguous, every
/// element inside the buffer, offsets within i64, and (outputs) no two elements at one place
/// (exactly: see [`overlaps`]). Shared by every family that takes `[batch, seq, heads, dim]`
/// tensors.
pub(crate) fn check_strides(
    arg: &'static str,
    s: &Strides,
    dims: [usize; 4],
    len: usize,
    output: bool,
) -> Result<()> {
    if s.dim != 1 {
        return Err(Error::Stride {
            arg,
            detail: format!("the head_dim stride must be 1, is {}", s.dim),
        });
    }
    let strides = [s.batch, s.row, s.head, 1];
    let reach = dims
        .iter()
        .zip(&strides)
        .try_fold(1usize, |acc, (&n, &st)| {
            n.checked_sub(1)
                .map_or(Some(acc), |m| m.checked_mul(st)?.checked_add(acc))
        })
        .filter(|&r| r <= i64::MAX as usize)
        .ok_or_else(|| Error::Stride {
            arg,
            detail: format!("shape {dims:?} with strides {strides:?} overflows"),
        })?;
    if dims.contains(&0) {
        return Ok(());
    }
    if reach > len {
        return Err(Error::Shape {
            arg,
            detail: format!(
                "holds {len} elements, shape {dims:?} with strides {strides:?} reaches {reach}"
            ),
        });
    }
    if output {
        let outer = [(dims[0], s.batch), (dims[1], s.row), (dims[2], s.head)];
        match overlaps(outer, dims[3], reach) {
            Some(false) => {}
            Some(true) => {
                return Err(Error::Stride {
                    arg,
                    detail: format!(
                        "shape {dims:?} with strides {strides:?} puts two elements at one place"
                    ),
                });
            }
            None => {
                return Err(Error::Unsupported {
                    arg,
                    detail: format!(
                        "shape {dims:?} with strides {strides:?} is too irregular to prove \
                         free of overlaps (use nested strides)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The most (δ, δ) pairs [`overlaps`] enumerates: never reached by a buffer below 2^41
/// elements (the pigeonhole test decides larger counts first), and a bound on the time a
/// hostile layout can take.
const MAX_ENUMERATION: u128 = 1 << 26;

/// Do two elements of `[n0, n1, n2, d]` (strides `s0, s1, s2, 1`) share a place? Elements
/// sit at `Σ k_i s_i + c`, `c < d`; two coincide exactly when some nonzero `δ` with
/// `|δ_i| < n_i` has `|Σ δ_i s_i| < d`. `reach` is one past the largest offset. `None`: the
/// layout would take more than [`MAX_ENUMERATION`] steps to decide.
pub(crate) fn overlaps(dims: [(usize, usize); 3], d: usize, reach: usize) -> Option<bool> {
    // A dimension of extent 1 places nothing apart; a zero stride over two or more does.
    let mut live: Vec<(u128, u128)> = dims
        .iter()
        .filter(|&&(n, _)| n > 1)
        .map(|&(n, s)| (n as u128, s as u128))
        .collect();
    if live.iter().any(|&(_, s)| s == 0) {
        return Some(true);
    }
    let d = d as u128;
    // Nested (every stride at least the extent of the smaller ones): disjoint.
    live.sort_unstable_by_key(|&(_, s)| s);
    let mut span = d;
    if live.iter().all(|&(n, s)| {
        let ok = s >= span;
        span += (n - 1) * s;
        ok
    }) {
        return Some(false);
    }
    // More elements than places: some two coincide.
    let count = live.iter().fold(d, |acc, &(n, _)| acc * n);
    if count > reach as u128 {
        return Some(true);
    }
    // Enumerate δ of every dimension but the widest, solve the widest as an interval.
    live.sort_unstable_by_key(|&(n, _)| n);
    let steps: u128 = live.iter().rev().skip(1).map(|&(n, _)| 2 * n).product();
    if steps > MAX_ENUMERATION {
        return None;
    }
    Some(search(&live, 0, d, true))
}

/// Is there a δ for dims `rest` (the last solved in closed form) with `|t + Σ δ_i s_i| < d`,
/// δ nonzero when `zero` (all earlier δ were 0)? δ's first nonzero entry is taken positive
/// (δ and -δ are the same pair of elements).
fn search(rest: &[(u128, u128)], t: i128, d: u128, zero: bool) -> bool {
    let d = d as i128;
    match rest {
        [] => !zero && t.abs() < d,
        [(n, s)] => {
            let (n, s) = (*n as i128, *s as i128);
            // -d < t + δ s < d, |δ| < n, δ >= 1 when every earlier δ is 0.
            let lo = (-d - t).div_euclid(s) + 1;
            let hi = (d - t - 1).div_euclid(s);
            let lo = lo.max(if zero { 1 } else { 1 - n });
            lo <= hi.min(n - 1)
        }
        [(n, s), tail @ ..] => {
            let (n, s) = (*n as i128, *s as i128);
            let from = if zero { 0 } else { 1 - n };
            (from..n).any(|k| search(tail, t + k * s, d as u128, zero && k == 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Marks every element: the definition the fast test must agree with.
    fn brute(dims: [(usize, usize); 3], d: usize, reach: usize) -> bool {
        let mut seen = vec![false; reach];
        for a in 0..dims[0].0 {
            for b in 0..dims[1].0 {
                for c in 0..dims[2].0 {
                    let base = a * dims[0].1 + b * dims[1].1 + c * dims[2].1;
                    for e in &mut seen[base..base + d] {
                        if std::mem::replace(e, true) {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }

    fn reach(dims: [(usize, usize); 3], d: usize) -> usize {
        dims.iter().map(|&(n, s)| (n - 1) * s).sum::<usize>() + d
    }

    #[test]
    fn overlap_test_agrees_with_brute_force() {
        let mut rng = StdRng::seed_from_u64(13);
        let (mut legal, mut bad, mut non_nested_legal) = (0, 0, 0);
        for _ in 0..20000 {
            let d = rng.random_range(1..=6);
            let dims: [(usize, usize); 3] =
                std::array::from_fn(|_| (rng.random_range(1..=5), rng.random_range(0..=40)));
            let r = reach(dims, d);
            let want = brute(dims, d, r);
            assert_eq!(overlaps(dims, d, r), Some(want), "{dims:?} d={d}");
            if want {
                bad += 1;
            } else {
                legal += 1;
                let mut v: Vec<_> = dims.iter().filter(|x| x.0 > 1).collect();
                v.sort_by_key(|x| x.1);
                let mut span = d;
                if v.iter().any(|&&(n, s)| {
                    let b = s < span;
                    span += (n - 1) * s;
                    b
                }) {
                    non_nested_legal += 1;
                }
            }
        }
        // Both sides, and legal layouts the nested rule alone would refuse, were exercised.
        assert!(legal > 1000 && bad > 1000 && non_nested_legal > 100);
    }

    #[test]
    fn interleaved_rows_are_legal() {
        // The example: rows 96 apart, 2 heads of 32 at 64 apart.
        let dims = [(1, 0), (4, 96), (2, 64)];
        assert_eq!(overlaps(dims, 32, reach(dims, 32)), Some(false));
        let dims = [(1, 0), (4, 96), (2, 16)];
        assert_eq!(overlaps(dims, 32, reach(dims, 32)), Some(true));
    }
}
