//! The StreamingLLM rolling cache's host-side bookkeeping: which stream tokens each sequence
//! keeps, and the lengths and ring offsets a call takes.

use super::{Layout, MAX_BATCH, Rope, checks::check_rope};
use crate::error::{Error, Result};

/// A StreamingLLM rolling cache's bookkeeping (host side): per sequence, how many tokens it
/// has seen. The cache keeps the first `n_sink` tokens and the last `window`; the K/V buffers
/// themselves are the caller's, `[batch, n_sink + window, heads_kv, head_dim]`.
///
/// Each step: [`RollingCache::advance`] by the step's `seq_q` new tokens, then [`append`](super::append) and
/// [`forward`](super::forward) with [`RollingCache::layout`] and the lengths from
/// [`RollingCache::cache_seqlens`]. The new tokens are written first, so they evict the
/// oldest ring tokens before attention: a step's queries see the cache as it is after it.
///
/// ```
/// use attnkit::decode::{RollingCache, Rope, RopeStyle};
/// let mut c = RollingCache::new(1, 2, 4, Rope { style: RopeStyle::NeoX, theta: 1e4 })?;
/// for _ in 0..7 { c.advance(1)?; }
/// assert_eq!(c.kept(0), vec![0, 1, 3, 4, 5, 6]);   // sinks 0, 1 and the last 4 tokens
/// assert_eq!(c.cache_seqlens(), vec![6]);
/// # Ok::<(), attnkit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RollingCache {
    n_sink: usize,
    window: usize,
    rope: Rope,
    seen: Vec<u64>,
}

impl RollingCache {
    /// A cache for `batch` sequences (1 to [`MAX_BATCH`], what a call takes) keeping
    /// `n_sink` sinks and a `window`-token ring (`n_sink + window` at most
    /// [`super::MAX_CAPACITY`]). Every argument is checked before the per-sequence counters are
    /// allocated.
    ///
    /// ```
    /// use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// let r = Rope { style: RopeStyle::Interleaved, theta: 1e4 };
    /// assert!(RollingCache::new(1, 4, 0, r).is_err());
    /// assert_eq!(RollingCache::new(2, 4, 60, r).unwrap().capacity(), 64);
    /// ```
    pub fn new(batch: usize, n_sink: usize, window: usize, rope: Rope) -> Result<Self> {
        if batch == 0 || batch > MAX_BATCH {
            return Err(Error::Shape {
                arg: "batch",
                detail: format!("{batch}: 1 to {MAX_BATCH} sequences"),
            });
        }
        if window == 0 {
            return Err(Error::Value {
                arg: "window",
                detail: "must be at least 1".into(),
            });
        }
        check_rope(&rope)?;
        let cap = n_sink
            .checked_add(window)
            .filter(|&c| c <= super::MAX_CAPACITY);
        if cap.is_none() {
            return Err(Error::Unsupported {
                arg: "window",
                detail: format!(
                    "n_sink {n_sink} + window {window} exceeds {}",
                    super::MAX_CAPACITY
                ),
            });
        }
        // At most MAX_BATCH counters (512 KiB), but say so rather than abort if even that fails.
        let mut seen = Vec::new();
        seen.try_reserve_exact(batch).map_err(|_| Error::Shape {
            arg: "batch",
            detail: format!("no memory for {batch} sequences' counters"),
        })?;
        seen.resize(batch, 0);
        Ok(RollingCache {
            n_sink,
            window,
            rope,
            seen,
        })
    }

    /// Slots per sequence, `n_sink + window`.
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// assert_eq!(RollingCache::new(1, 0, 8, r).unwrap().capacity(), 8);
    /// ```
    pub fn capacity(&self) -> usize {
        self.n_sink + self.window
    }

    /// Records `seq_q` new tokens in every sequence (at most `window`, else the new tokens
    /// would evict each other). A stream past `u64::MAX` tokens is an error (nothing recorded).
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let mut c = RollingCache::new(1, 1, 3, r).unwrap();
    /// assert!(c.advance(4).is_err());
    /// c.advance(3).unwrap();
    /// assert_eq!(c.seen(0), 3);
    /// ```
    pub fn advance(&mut self, seq_q: usize) -> Result<()> {
        if seq_q == 0 || seq_q > self.window {
            return Err(Error::Value {
                arg: "seq_q",
                detail: format!(
                    "{seq_q} new tokens; a step takes 1 to window ({})",
                    self.window
                ),
            });
        }
        let n = seq_q as u64;
        if self.seen.iter().any(|s| s.checked_add(n).is_none()) {
            return Err(Error::Value {
                arg: "seq_q",
                detail: "the stream would pass u64::MAX tokens".into(),
            });
        }
        for s in &mut self.seen {
            *s += n;
        }
        Ok(())
    }

    /// Tokens sequence `b` has seen since the start of the stream.
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// assert_eq!(RollingCache::new(1, 1, 3, r).unwrap().seen(0), 0);
    /// ```
    pub fn seen(&self, b: usize) -> u64 {
        self.seen.get(b).copied().unwrap_or(0)
    }

    /// Keys kept per sequence (the `cache_seqlens` of the next call).
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let mut c = RollingCache::new(2, 1, 3, r).unwrap();
    /// c.advance(2).unwrap();
    /// assert_eq!(c.cache_seqlens(), vec![2, 2]);
    /// ```
    pub fn cache_seqlens(&self) -> Vec<i32> {
        self.seen
            .iter()
            .map(|&s| s.min(self.capacity() as u64) as i32)
            .collect()
    }

    /// Per sequence, the ring index of the oldest token in the ring (0 until it wraps).
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let mut c = RollingCache::new(1, 1, 3, r).unwrap();
    /// c.advance(3).unwrap();
    /// c.advance(2).unwrap(); // tokens 0 (sink), 2, 3, 4 kept: 2 sits at ring index 1
    /// assert_eq!(c.ring_offsets(), vec![1]);
    /// ```
    pub fn ring_offsets(&self) -> Vec<i32> {
        self.seen
            .iter()
            .map(|&s| {
                if s <= self.capacity() as u64 {
                    0
                } else {
                    let oldest = s - self.window as u64;
                    ((oldest - self.n_sink as u64) % self.window as u64) as i32
                }
            })
            .collect()
    }

    /// The layout to pass in [`Decode`](super::Decode), with `ring_offsets` from [`RollingCache::ring_offsets`].
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle, Layout};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let c = RollingCache::new(1, 4, 12, r).unwrap();
    /// let off = c.ring_offsets();
    /// assert!(matches!(c.layout(&off), Layout::Rolling { window: 12, .. }));
    /// ```
    pub fn layout<'a>(&self, ring_offsets: &'a [i32]) -> Layout<'a> {
        Layout::Rolling {
            n_sink: self.n_sink,
            window: self.window,
            ring_offsets: Some(ring_offsets),
            rope: self.rope,
        }
    }

    /// The layout without a host copy of the ring offsets: they live only in
    /// [`Tables::ring_offsets`](super::Tables::ring_offsets) (see
    /// [`Decode::with_device_tables`](super::Decode::with_device_tables)).
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle, Layout};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let c = RollingCache::new(1, 4, 12, r).unwrap();
    /// assert!(matches!(c.device_layout(), Layout::Rolling { ring_offsets: None, .. }));
    /// ```
    pub fn device_layout(&self) -> Layout<'static> {
        Layout::Rolling {
            n_sink: self.n_sink,
            window: self.window,
            ring_offsets: None,
            rope: self.rope,
        }
    }

    /// The stream indices of the tokens sequence `b` keeps, in logical (cache position) order:
    /// what the oracle attends to.
    ///
    /// ```
    /// # use attnkit::decode::{RollingCache, Rope, RopeStyle};
    /// # let r = Rope { style: RopeStyle::NeoX, theta: 1e4 };
    /// let mut c = RollingCache::new(1, 1, 2, r).unwrap();
    /// c.advance(2).unwrap();
    /// c.advance(2).unwrap();
    /// assert_eq!(c.kept(0), vec![0, 2, 3]);
    /// ```
    pub fn kept(&self, b: usize) -> Vec<u64> {
        let s = self.seen(b);
        let cap = self.capacity() as u64;
        if s <= cap {
            return (0..s).collect();
        }
        (0..self.n_sink as u64)
            .chain(s - self.window as u64..s)
            .collect()
    }
}
