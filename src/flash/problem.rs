//! The checked problem both backends run ([`Problem`]), and which keys a row sees
//! ([`Visibility`], with the closed-form pair count behind `flops`).

use super::{Options, Strides};

/// (query, key) pairs visible in one sequence under the causal mask, window and sinks, in
/// closed form: a row's count is piecewise affine in the row index, with its pieces meeting
/// at a few points where a clamp of [`Visibility`] switches; each piece is an arithmetic
/// series. In i128 (no size can overflow it), summed in f64.
pub(crate) fn visible_pairs(seq_q: usize, seq_k: usize, opts: &Options) -> f64 {
    let (q, k) = (seq_q as i128, seq_k as i128);
    if q == 0 || k == 0 {
        return 0.0;
    }
    let x = q - k; // minus the diagonal offset: key j = i - x is row i's diagonal
    let left = opts.window_left.map(|l| l as i128);
    let right = if opts.causal {
        Some(0)
    } else {
        opts.window_right.map(|r| r as i128)
    };
    let sinks = (opts.sinks as i128).min(k);
    let count = |i: i128| -> i128 {
        let lo = left.map_or(0, |l| (i - x - l).max(0));
        let hi = right.map_or(k - 1, |r| (i - x + r).min(k - 1));
        (hi - lo + 1).max(0) + sinks.min(lo).min(hi + 1).max(0)
    };
    // Where a clamp switches: lo leaves 0 or crosses the sinks or the end, hi reaches the
    // end or crosses -1 or the sinks.
    let (l, r) = (left.unwrap_or(0), right.unwrap_or(0));
    let mut cuts = vec![0, q];
    for c in [
        l + x,
        k - 1 - r + x,
        k + l + x,
        x - r - 1,
        sinks + l + x,
        sinks - 1 - r + x,
    ] {
        for c in [c, c + 1] {
            if 0 < c && c < q {
                cuts.push(c);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1] - 1);
            (b - a + 1) as f64 * (count(a) + count(b)) as f64 * 0.5
        })
        .sum()
}

/// Which keys a row sees (causal, window, sinks; the block mask is applied separately), in
/// closed form: the window `[lo(i), hi(i)]` and the sinks `[0, min(sinks, lo(i), hi(i) + 1))`.
/// The CUDA kernel's `Visibility` computes the same thing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Visibility {
    seq_k: i64,
    diag: i64,
    left: Option<i64>,
    right: Option<i64>,
    sinks: i64,
}

impl Visibility {
    pub fn new(opts: &Options, seq_q: usize, seq_k: usize) -> Self {
        let right = match (opts.causal, opts.window_right) {
            (true, _) => Some(0),
            (false, r) => r.map(|r| r as i64),
        };
        Visibility {
            seq_k: seq_k as i64,
            diag: seq_k as i64 - seq_q as i64,
            left: opts.window_left.map(|l| l as i64),
            right,
            sinks: (opts.sinks as i64).min(seq_k as i64),
        }
    }

    /// First key of row i's window.
    pub fn lo(&self, i: usize) -> i64 {
        self.left.map_or(0, |l| (i as i64 + self.diag - l).max(0))
    }

    /// Last key (inclusive) row i sees; negative when none.
    pub fn hi(&self, i: usize) -> i64 {
        self.right.map_or(self.seq_k - 1, |r| {
            (i as i64 + self.diag + r).min(self.seq_k - 1)
        })
    }

    /// Keys `[0, sinks)` are exempt from the left bound.
    pub fn sinks(&self) -> i64 {
        self.sinks
    }

    pub fn visible(&self, i: usize, j: usize) -> bool {
        let j = j as i64;
        j <= self.hi(i) && (j >= self.lo(i) || j < self.sinks)
    }

    /// Keys row i sees.
    pub fn count(&self, i: usize) -> usize {
        let (lo, hi) = (self.lo(i), self.hi(i));
        ((hi - lo + 1).max(0) + self.sinks.min(lo).min(hi + 1).max(0)) as usize
    }
}

/// The checked problem both backends run: sizes, strides, and where sequences start.
#[derive(Clone, Debug)]
pub(crate) struct Problem<'a> {
    pub batch: usize,
    /// Fixed: rows per sequence. Varlen: the longest sequence.
    pub seq_q: usize,
    /// Fixed: keys per sequence. Varlen: the longest.
    pub seq_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub d: usize,
    pub opts: Options,
    pub scale: f32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub o: Strides,
    /// LSE strides (batch, head); the row stride is 1.
    pub lse_batch: usize,
    pub lse_head: usize,
    /// Packed sequences (varlen), whether or not the host has their offsets.
    pub varlen: bool,
    /// Varlen offsets (host copies), or None for fixed batches and for device-only offsets
    /// on a GPU (the CPU path reads its host buffers into this before it runs).
    pub cu: Option<(&'a [i32], &'a [i32])>,
    pub total_q: usize,
    pub total_k: usize,
}

impl Problem<'_> {
    /// (rows, keys, first q row, first k row) of sequence `b`.
    pub fn seq(&self, b: usize) -> (usize, usize, usize, usize) {
        match self.cu {
            Some((cq, ck)) => {
                let (q0, q1) = (cq[b] as usize, cq[b + 1] as usize);
                let (k0, k1) = (ck[b] as usize, ck[b + 1] as usize);
                (q1 - q0, k1 - k0, q0, k0)
            }
            None => (self.seq_q, self.seq_k, 0, 0),
        }
    }

    /// Element offset of (sequence b, row r counted from the sequence start, head h).
    pub fn offset(&self, s: &Strides, b: usize, row0: usize, r: usize, h: usize) -> usize {
        let batch = if self.varlen { 0 } else { b * s.batch };
        batch + (row0 + r) * s.row + h * s.head
    }

    /// The visibility rule of sequence b.
    pub fn visibility(&self, b: usize) -> Visibility {
        let (sq, sk, _, _) = self.seq(b);
        Visibility::new(&self.opts, sq, sk)
    }

    /// Index of (sequence b, head h, row r) in the LSE output.
    pub fn lse_index(&self, b: usize, row0: usize, r: usize, h: usize) -> usize {
        let batch = if self.varlen { 0 } else { b * self.lse_batch };
        batch + h * self.lse_head + row0 + r
    }
}
