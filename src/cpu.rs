//! CPU runtime helpers shared by every family's CPU path: a parallel loop over work items on
//! persistent worker threads (rayon pools; items never start another loop), and a slice that
//! those items write at disjoint ranges.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Runs `f(item)` for every item in `0..n` on up to `threads` threads. Items are handed out
/// one at a time from a shared counter, so uneven items (causal rows) balance themselves.
pub(crate) fn par_for<F: Fn(usize) + Sync>(threads: usize, n: usize, f: F) {
    par_for_with(threads, n, || (), |_, i| f(i));
}

/// [`par_for`] with per-thread scratch: each worker builds one `init()` and hands it to every
/// item it runs (large tile buffers are allocated, and page-faulted, once per thread, not once
/// per item).
pub(crate) fn par_for_with<S, I, F>(threads: usize, n: usize, init: I, f: F)
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize) + Sync,
{
    let workers = threads.clamp(1, n.max(1));
    if workers == 1 {
        let mut scratch = init();
        (0..n).for_each(|i| f(&mut scratch, i));
        return;
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut scratch = None;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(scratch.get_or_insert_with(&init), i);
        }
    };
    match pool(threads) {
        // Every worker of the pool pulls items; those that find none return at once.
        Some(pool) => {
            pool.broadcast(|_| work());
        }
        None => std::thread::scope(|s| {
            let spawned = (0..workers)
                .take_while(|_| std::thread::Builder::new().spawn_scoped(s, work).is_ok())
                .count();
            // Threads the OS refused: the calling thread takes part (alone if none started).
            if spawned < workers {
                work();
            }
        }),
    }
}

/// Pools kept for this many distinct thread counts, of at most `MAX_POOL_THREADS` threads
/// each; a device with yet another count, or more threads, runs each call on scoped threads
/// (as many as the call has items: correct, only slower to start), so no thread count a user
/// passes leaves more than 8 x 256 idle threads behind.
const MAX_POOLS: usize = 8;
const MAX_POOL_THREADS: usize = 256;

/// The process-wide pool of `threads` persistent workers, built on first use. Persistent
/// workers matter beyond the spawn cost: `gemm` keeps its packing buffer (the size of L2) per
/// thread, and a fresh thread allocates and page-faults it again on every call (the Monarch
/// 1024-wide case spent half its time in page faults on scoped threads). `None` when the pool
/// table is full or the OS refuses the threads.
fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    if threads > MAX_POOL_THREADS {
        return None;
    }
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    // A poisoned lock only means a panic elsewhere while it was held; the table is still valid.
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(t, _)| *t == threads) {
        return Some(p.clone());
    }
    if pools.len() >= MAX_POOLS {
        return None;
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("attnkit-cpu-{i}"))
        .build()
        .ok()
        .map(Arc::new)?;
    pools.push((threads, p.clone()));
    Some(p)
}

/// A mutable slice that the items of a [`par_for`] write at disjoint ranges.
pub(crate) struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _marker: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the only access is `range_mut`, whose callers promise disjoint ranges; T: Send
// lets the values be written from other threads.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    pub(crate) fn new(s: &'a mut [T]) -> Self {
        DisjointSlice {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _marker: std::marker::PhantomData,
        }
    }

    /// Writes `v` at `i` (bounds-checked).
    ///
    /// # Safety
    /// No other call touches index `i` during the parallel loop.
    pub(crate) unsafe fn set(&self, i: usize, v: T) {
        // SAFETY: forwarded to the caller.
        let slot = unsafe { self.range_mut(i, 1) };
        slot[0] = v;
    }

    /// The elements `start..start + len` (bounds-checked: out of range is an internal bug).
    ///
    /// # Safety
    /// While the returned slice lives, no other call may return a range overlapping it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "DisjointSlice range out of bounds"
        );
        // SAFETY: in bounds (checked); exclusive per the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it (a single
/// running sum is a serial chain it must not reorder). Every family's CPU path uses this one,
/// so their results round the same way.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `2^x` in f32 to within about 2 ulp for x in [-126, 127] (0 below, NaN stays NaN), written
/// without branches or library calls so loops over it vectorise (the softmax's exponentials
/// dominate the CPU path once its products run as GEMMs; `f32::exp2` is a scalar libm call).
/// Round-to-nearest splits x = i + f with |f| <= 1/2; 2^f is its degree-7 Taylor polynomial
/// (truncation below 6e-9) and 2^i is built in the exponent bits.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits (no FMA contraction
    // in Rust, so the add and subtract round exactly as written).
    const ROUND: f32 = 12_582_912.0;
    const C: [f32; 8] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_734,
    ];
    // clamp keeps NaN, which then flows through the arithmetic.
    let xc = x.clamp(-126.0, 127.0);
    let r = (xc + ROUND) - ROUND;
    let f = xc - r;
    let mut p = C[7];
    for c in C[..7].iter().rev() {
        p = p * f + c;
    }
    let scale = f32::from_bits((((r as i32) + 127) as u32) << 23);
    if x < -126.0 { 0.0 } else { p * scale }
}

/// `tanh(y)` in f32 to within a few ulp, branch-free so that loops over it vectorise (libm's
/// `tanhf` is a scalar call: a softcapped decode step took 20-30% longer with it, 4-7% with
/// this, f32 32k and bf16 4k keys, 32/8 heads, d 128, 2 AVX-512 cores). Below |y| = 0.3 the
/// odd Taylor series to y^11 (truncation under 2e-9 relative); above, `(1 - e) / (1 + e)` with
/// `e = 2^(-2 |y| log2 e)` in [0, 0.55], so no cancellation and no overflow; the sign is
/// restored last. NaN stays NaN, ±inf gives ±1.
#[inline(always)]
pub(crate) fn tanh(y: f32) -> f32 {
    let a = y.abs();
    let e = exp2(-2.0 * std::f32::consts::LOG2_E * a);
    let far = (1.0 - e) / (1.0 + e);
    let a2 = a * a;
    let near = a
        * (1.0
            + a2 * (-1.0 / 3.0
                + a2 * (2.0 / 15.0
                    + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0 + a2 * (-1382.0 / 155_925.0))))));
    let t = if a < 0.3 { near } else { far };
    t.copysign(y)
}

/// The softmax logits' transforms on one row of scores (exp2 domain), shared by the flash
/// and decode CPU paths as the kernels share `LogitShape`: Gemma 2's softcap
/// `cap * tanh(x / cap)` (`cap` in exp2 units, `None`: none), then ALiBi's
/// `- slope |diag - j|` for the row's `j`-th key (`slope` in exp2 units, 0: none; `diag` the
/// row's position counted from the row's first key).
#[inline(always)]
pub(crate) fn shape_row(row: &mut [f32], cap: Option<f32>, slope: f32, diag: i32) {
    if let Some(c) = cap {
        let inv = 1.0 / c;
        row.iter_mut().for_each(|x| *x = c * tanh(*x * inv));
    }
    if slope != 0.0 {
        for (j, x) in (0i32..).zip(row.iter_mut()) {
            *x -= slope * (diag - j).abs() as f32;
        }
    }
}

/// One row's online-softmax step, as the flash and decode CPU paths share it.
pub(crate) struct SoftmaxStep {
    /// The new running max (exp2 domain).
    pub m: f32,
    /// Rescales what was accumulated under the old max: `2^(m_old - m)`.
    pub alpha: f32,
    /// The tile's weights summed.
    pub sum: f32,
    /// `sum_c p_c s_c` (the entropy's term; masked keys add nothing, not `0 * -inf`).
    pub psum: f32,
}

/// The online-softmax step over one row's tile of scores `s` (exp2 domain, masked keys
/// -inf) against the running max `m`: `s` becomes the weights `2^(s - m_new)`. Reductions
/// are lane-wise (float reductions vectorise only when written per lane); `#[inline(always)]`
/// puts it inside each caller's run-time-dispatched AVX2/AVX-512 clone.
#[inline(always)]
pub(crate) fn softmax_step<const N: usize>(s: &mut [f32; N], m: f32) -> SoftmaxStep {
    const LANES: usize = 16;
    const { assert!(N % LANES == 0, "tile rows are whole vectors") };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for ch in s.chunks_exact(LANES) {
        for (l, &x) in lanes.iter_mut().zip(ch) {
            *l = if x > *l { x } else { *l };
        }
    }
    let m_new = lanes.iter().fold(m, |a, &b| a.max(b));
    // A row with only masked keys so far subtracts 0, never -inf - -inf.
    let base = if m_new == f32::NEG_INFINITY {
        0.0
    } else {
        m_new
    };
    let (mut sum, mut ps) = ([0f32; LANES], [0f32; LANES]);
    for ch in s.chunks_exact_mut(LANES) {
        for ((x, a), b) in ch.iter_mut().zip(&mut sum).zip(&mut ps) {
            let pr = exp2(*x - base);
            *a += pr;
            *b += if pr > 0.0 { pr * *x } else { 0.0 };
            *x = pr;
        }
    }
    SoftmaxStep {
        m: m_new,
        alpha: exp2(m - base),
        sum: sum.iter().sum(),
        psum: ps.iter().sum(),
    }
}

/// `dst = a · b` (or `dst += a · b` with `accumulate`) for an `m x k` times `k x n` product,
/// each matrix given by its slice and (row, column) element strides, `dst`'s columns
/// contiguous. The CPU path's tile products go through here: `gemm`'s micro-kernels,
/// dispatched at run time, on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    matmul_strided(dims, (dst, dst_rs, 1), accumulate, a, b);
}

/// [`matmul`] with `dst` given by (row, column) strides too (a scatter, as Monarch's second
/// factor writes its output at stride `l`).
pub(crate) fn matmul_strided(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (&mut [f32], usize, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst[r * dst_rs + c * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    // The last element each matrix touches must be in its slice: gemm reads raw pointers.
    let fits = |len: usize, rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows - 1)
            .checked_mul(rs)
            .and_then(|x| x.checked_add((cols - 1).checked_mul(cs)?))
            .is_some_and(|last| last < len)
    };
    assert!(
        fits(dst.len(), m, n, dst_rs, dst_cs) && fits(a.len(), m, k, a_rs, a_cs),
        "matmul: dst or a out of bounds"
    );
    assert!(fits(b.len(), k, n, b_rs, b_cs), "matmul: b out of bounds");
    // SAFETY: every element the product reads or writes is in bounds (checked above), dst does
    // not alias a or b (a &mut borrow), and strides below 2^63 fit isize (slices are smaller).
    // Distinct (row, column) pairs of dst must be distinct elements for the result to be
    // defined; the callers' strides are injective (a row of a tile, or one block's scatter).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_for_runs_every_item_once_on_pools_and_scoped_threads() {
        use std::sync::atomic::AtomicU32;
        // 3: a pool; MAX_POOL_THREADS + 1: scoped threads; 1: the calling thread.
        for threads in [1, 3, MAX_POOL_THREADS + 1] {
            for n in [0, 1, 7, 1000] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                let inits = AtomicU32::new(0);
                let init = || {
                    inits.fetch_add(1, Ordering::Relaxed);
                    vec![0u8; 16]
                };
                par_for_with(threads, n, init, |scratch, i| {
                    scratch[0] = scratch[0].wrapping_add(1);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "{threads} {n}"
                );
                // Scratch is built once per worker that ran an item, never per item.
                let workers = threads.min(n.max(1)) as u32;
                assert!(
                    inits.load(Ordering::Relaxed) <= workers.max(1),
                    "{threads} {n}"
                );
            }
        }
    }

    #[test]
    fn exp2_matches_std_to_two_ulp() {
        let mut worst = 0f64;
        let mut x = -126.0f32;
        while x <= 127.0 {
            let (got, want) = (exp2(x) as f64, (x as f64).exp2());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp2(0.0), 1.0);
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-200.0), 0.0);
        assert!(exp2(f32::NAN).is_nan());
    }

    /// The vectorisable tanh is within 4 ulp of the exact one everywhere (relative, since
    /// tanh(y) ~ y near 0: the (1 - e) / (1 + e) form alone loses digits there), exact at 0,
    /// ±1 at ±inf, NaN at NaN.
    #[test]
    fn tanh_is_within_4_ulp() {
        let mut worst = 0f64;
        for i in -4000..=4000 {
            // y from ±1e-7 to ±20, log-spaced, and the branch point 0.3 on both sides.
            let y = (i as f32).signum() * 10f32.powf(-7.0 + 8.3 * (i as f32).abs() / 4000.0);
            for y in [y, 0.3, 0.3f32.next_down(), -0.3] {
                let want = (y as f64).tanh();
                let got = super::tanh(y) as f64;
                worst = worst.max((got - want).abs() / want.abs().max(f64::MIN_POSITIVE));
            }
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(super::tanh(0.0), 0.0);
        assert_eq!(super::tanh(f32::INFINITY), 1.0);
        assert_eq!(super::tanh(f32::NEG_INFINITY), -1.0);
        assert!(super::tanh(f32::NAN).is_nan());
    }

    #[test]
    fn matmul_matches_loops_with_strides() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k * 2).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        // a is read transposed through its strides (column stride m*2... a[r][c] = a[c*m + r]),
        // b row-major, dst with a row gap.
        let mut dst = vec![f32::NAN; m * 9];
        for acc in [false, true] {
            if acc {
                dst.iter_mut().for_each(|x| *x = 1.0);
            }
            matmul((m, n, k), &mut dst, 9, acc, (&a, 1, m), (&b, n, 1));
            for r in 0..m {
                for c in 0..n {
                    let want: f32 = (0..k).map(|i| a[i * m + r] * b[i * n + c]).sum::<f32>()
                        + if acc { 1.0 } else { 0.0 };
                    assert_eq!(dst[r * 9 + c], want, "({r}, {c}) acc {acc}");
                }
                assert!(dst[r * 9 + n..r * 9 + 9].iter().all(|x| x.is_nan() != acc));
            }
        }
    }
}
