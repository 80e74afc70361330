//! CPU runtime helpers shared by every family's CPU path: a parallel loop over work items on
//! scoped std threads, and a slice that those items write at disjoint ranges.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `f(item)` for every item in `0..n` on up to `threads` threads. Items are handed out
/// one at a time from a shared counter, so uneven items (causal rows) balance themselves.
pub(crate) fn par_for<F: Fn(usize) + Sync>(threads: usize, n: usize, f: F) {
    let workers = threads.clamp(1, n.max(1));
    if workers == 1 {
        (0..n).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    f(i);
                }
            });
        }
    });
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
