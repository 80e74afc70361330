//! The CPU path: the block split of Lightning Attention-2, in the chunked form the GPU runs.
//!
//! One generic scan serves the forward pass and the three products of the backward pass:
//! `out_t = scale * a_t S_t`, `S_t = lambda S_{t-1} + b_t^T c_t`, `S_{-1} = init`, over every
//! sequence and head, optionally with time reversed. Its three phases, each parallel:
//! 1. per split (a run of whole blocks of one sequence and head), the split's own state
//!    `sum_j lambda^(n-1-j) b_j^T c_j`, block by block, into the workspace;
//! 2. per sequence and head, a scan over the splits turning each slot into the state that
//!    enters its split (`S <- lambda^len S + local`), and the final state;
//! 3. per split, the paper's loop over blocks of `B` tokens: intra-block
//!    `[(A_i B_i^T) (.) M] C_i` with `M[r][c] = lambda^(r-c)`, inter-block
//!    `Lambda A_i S` with `Lambda = diag(lambda^1..lambda^n)`, then the state update
//!    `S <- lambda^n S + (lambda^(n-1-j) b_j)^T c_j` (every exponent >= 0 on `lambda <= 1`,
//!    `n` the block's true length).
//!
//! Everything is accumulated in f32; inputs are widened from their element type.

use crate::cpu::{DisjointSlice, matmul, par_for};
use crate::dtype::Element;

/// Rows of one token operand: the row of physical token `p` and head `h` starts at
/// `p * tok + h * head` and holds `dim` elements.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a, T> {
    pub data: &'a [T],
    pub tok: usize,
    pub head: usize,
    pub dim: usize,
}

impl<T: Element> Operand<'_, T> {
    fn row_into(&self, p: usize, h: usize, out: &mut [f32]) {
        T::widen(&self.data[p * self.tok + h * self.head..][..self.dim], out);
    }
}

/// The output operand, written row by row at disjoint places.
pub(super) struct OutRows<'a, T> {
    pub data: &'a mut [T],
    pub tok: usize,
    pub head: usize,
}

/// One scan over every sequence and head (see the module docs).
pub(super) struct Scan<'a, T> {
    /// `[tokens, heads, p]`: the rows that read the state ("queries").
    pub a: Operand<'a, T>,
    /// `[tokens, heads, p]`: the left factor of each state update ("keys").
    pub b: Operand<'a, T>,
    /// `[tokens, heads, r]`: the right factor ("values").
    pub c: Operand<'a, T>,
    /// `(first physical token, length)` per sequence.
    pub seqs: &'a [(usize, usize)],
    pub heads: usize,
    /// Walk each sequence from its last token to its first.
    pub reverse: bool,
    /// False: `out_t = scale * a_t (sum over the whole sequence of b_j^T c_j)`, no decay.
    pub causal: bool,
    pub scale: f32,
    /// Per head `log2(lambda_h) <= 0` (host-computed).
    pub log2_decay: &'a [f32],
    /// `[seqs, heads, p, r]` (or `[seqs, heads, r, p]` when `init_transposed`).
    pub init: Option<&'a [f32]>,
    pub init_transposed: bool,
    /// Tokens per block (the paper's B).
    pub block: usize,
    /// Tokens per split, a multiple of `block`; `n_splits` slots per sequence and head.
    pub split: usize,
    pub n_splits: usize,
}

/// `lambda^i` for `i` in `0..=n` from `log2(lambda) <= 0`: exponents never negative, so a
/// large decay underflows to 0 instead of overflowing.
fn powers(log2_decay: f32, n: usize) -> Vec<f32> {
    (0..=n).map(|i| (i as f32 * log2_decay).exp2()).collect()
}

impl<T: Element> Scan<'_, T> {
    fn p(&self) -> usize {
        self.a.dim
    }

    fn r(&self) -> usize {
        self.c.dim
    }

    /// Physical token of logical token `t` of a sequence.
    fn phys(&self, (start, len): (usize, usize), t: usize) -> usize {
        if self.reverse {
            start + len - 1 - t
        } else {
            start + t
        }
    }

    /// Logical token range of split `s` of a sequence of length `len`.
    fn split_range(&self, len: usize, s: usize) -> std::ops::Range<usize> {
        let lo = (s * self.split).min(len);
        lo..((s + 1) * self.split).min(len)
    }

    /// Runs the three phases. `workspace` holds `seqs * heads * n_splits * p * r` f32;
    /// `fixup(seq, head, logical t, physical token, row)` may amend each output row (in f32)
    /// before it is rounded and stored.
    pub(super) fn run<F>(
        &self,
        threads: usize,
        workspace: &mut [f32],
        out: OutRows<'_, T>,
        final_state: Option<&mut [f32]>,
        fixup: F,
    ) where
        F: Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
    {
        let (p, r, heads, ns) = (self.p(), self.r(), self.heads, self.n_splits);
        let pr = p * r;
        let items = self.seqs.len() * heads * ns;
        let no_decay = vec![0.0f32; heads];
        let l2 = if self.causal {
            self.log2_decay
        } else {
            &no_decay[..]
        };

        // Phase 1: each split's own state.
        {
            let ws = DisjointSlice::new(&mut workspace[..items * pr]);
            par_for(threads, items, |item| {
                let (sh, s) = (item / ns, item % ns);
                let (n, h) = (sh / heads, sh % heads);
                // SAFETY: slot `item` belongs to this item alone.
                let st = unsafe { ws.range_mut(item * pr, pr) };
                st.fill(0.0);
                let range = self.split_range(self.seqs[n].1, s);
                let pw = powers(l2[h], self.block);
                let mut bb = vec![0.0; self.block * p];
                let mut cc = vec![0.0; self.block * r];
                let mut t0 = range.start;
                while t0 < range.end {
                    let len = self.block.min(range.end - t0);
                    self.load(&self.b, n, h, t0, len, &mut bb);
                    self.load(&self.c, n, h, t0, len, &mut cc);
                    update_state(st, &mut bb, &cc, len, p, r, &pw);
                    t0 += len;
                }
            });
        }

        // Phase 2: scan over splits; each slot becomes the state entering its split.
        {
            let ws = DisjointSlice::new(&mut workspace[..items * pr]);
            let fin = final_state.map(DisjointSlice::new);
            par_for(threads, self.seqs.len() * heads, |sh| {
                let (n, h) = (sh / heads, sh % heads);
                let len = self.seqs[n].1;
                let mut run = vec![0.0f32; pr];
                if let (true, Some(init)) = (self.causal, self.init) {
                    let src = &init[sh * pr..][..pr];
                    if self.init_transposed {
                        for x in 0..p {
                            for y in 0..r {
                                run[x * r + y] = src[y * p + x];
                            }
                        }
                    } else {
                        run.copy_from_slice(src);
                    }
                }
                let used = len.div_ceil(self.split);
                for s in 0..used {
                    // SAFETY: the slots of (n, h) belong to this item alone.
                    let slot = unsafe { ws.range_mut((sh * ns + s) * pr, pr) };
                    let decay = (self.split_range(len, s).len() as f32 * l2[h]).exp2();
                    for (x, y) in run.iter_mut().zip(slot.iter_mut()) {
                        let local = *y;
                        *y = *x;
                        *x = decay * *x + local;
                    }
                }
                if !self.causal {
                    // Every split of the sequence reads the total.
                    for s in 0..used {
                        // SAFETY: as above.
                        unsafe { ws.range_mut((sh * ns + s) * pr, pr) }.copy_from_slice(&run);
                    }
                }
                if let Some(fin) = &fin {
                    // SAFETY: state (n, h) belongs to this item alone.
                    unsafe { fin.range_mut(sh * pr, pr) }.copy_from_slice(&run);
                }
            });
        }

        // Phase 3: outputs, split by split, block by block.
        let ws = &workspace[..items * pr];
        let dst = DisjointSlice::new(out.data);
        par_for(threads, items, |item| {
            let (sh, s) = (item / ns, item % ns);
            let (n, h) = (sh / heads, sh % heads);
            let range = self.split_range(self.seqs[n].1, s);
            if range.is_empty() {
                return;
            }
            let mut st = ws[item * pr..][..pr].to_vec();
            let pw = powers(l2[h], self.block);
            let bl = self.block;
            let (mut aa, mut bb) = (vec![0.0; bl * p], vec![0.0; bl * p]);
            let (mut cc, mut oo) = (vec![0.0; bl * r], vec![0.0; bl * r]);
            let mut sc = vec![0.0f32; bl * bl];
            let mut t0 = range.start;
            while t0 < range.end {
                let len = bl.min(range.end - t0);
                self.load(&self.a, n, h, t0, len, &mut aa);
                // Inter-block: O = A S (then row i times lambda^(i+1) when causal).
                matmul((len, r, p), &mut oo, r, false, (&aa, p, 1), (&st, r, 1));
                if self.causal {
                    self.load(&self.b, n, h, t0, len, &mut bb);
                    self.load(&self.c, n, h, t0, len, &mut cc);
                    for (i, o) in oo.chunks_exact_mut(r).take(len).enumerate() {
                        let inter = pw[i + 1];
                        o.iter_mut().for_each(|x| *x *= inter);
                    }
                    // Intra-block: O += [(A B^T) (.) M] C, M[i][j] = lambda^(i-j) below the
                    // diagonal and 0 above it.
                    matmul((len, len, p), &mut sc, bl, false, (&aa, p, 1), (&bb, 1, p));
                    for (i, s) in sc.chunks_exact_mut(bl).take(len).enumerate() {
                        for (j, x) in s[..=i].iter_mut().enumerate() {
                            *x *= pw[i - j];
                        }
                        s[i + 1..len].fill(0.0);
                    }
                    matmul((len, r, len), &mut oo, r, true, (&sc, bl, 1), (&cc, r, 1));
                }
                for (i, row) in oo.chunks_exact_mut(r).take(len).enumerate() {
                    row.iter_mut().for_each(|o| *o *= self.scale);
                    let t = t0 + i;
                    let phys = self.phys(self.seqs[n], t);
                    fixup(n, h, t, phys, row);
                    // SAFETY: each (token, head) row is written by exactly one item.
                    let o = unsafe { dst.range_mut(phys * out.tok + h * out.head, r) };
                    for (o, &x) in o.iter_mut().zip(row.iter()) {
                        *o = T::from_f32(x);
                    }
                }
                if self.causal && t0 + len < range.end {
                    update_state(&mut st, &mut bb, &cc, len, p, r, &pw);
                }
                t0 += len;
            }
        });
    }

    /// Widens the rows of logical tokens `t0..t0+len` of sequence `n`, head `h`.
    fn load(
        &self,
        op: &Operand<'_, T>,
        n: usize,
        h: usize,
        t0: usize,
        len: usize,
        out: &mut [f32],
    ) {
        let dim = op.dim;
        for i in 0..len {
            op.row_into(
                self.phys(self.seqs[n], t0 + i),
                h,
                &mut out[i * dim..][..dim],
            );
        }
    }
}

/// `S <- lambda^n S + sum_j lambda^(n-1-j) b_j^T c_j` for one block of `n` rows (`pw[i]` is
/// `lambda^i`; the paper's `lambda^B Lambda^-1` folded so no exponent is negative), as one
/// GEMM `S += (W B)^T C`; the rows of `bb` are scaled by their weights in place.
fn update_state(
    st: &mut [f32],
    bb: &mut [f32],
    cc: &[f32],
    n: usize,
    p: usize,
    r: usize,
    pw: &[f32],
) {
    let whole = pw[n];
    st.iter_mut().for_each(|x| *x *= whole);
    for (j, b) in bb.chunks_exact_mut(p).take(n).enumerate() {
        let w = pw[n - 1 - j];
        b.iter_mut().for_each(|x| *x *= w);
    }
    // B^T read through its strides: element (x, j) of the p x n left factor is bb[j * p + x].
    matmul((p, r, n), st, r, true, (bb, 1, p), (cc, r, 1));
}

/// The decode step on the CPU: `S <- lambda S + k^T v`, `o = scale * q S`, one token per
/// (batch, head); `state` updated in place.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode<T: Element>(
    threads: usize,
    heads: usize,
    d: usize,
    e: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    log2_decay: &[f32],
    scale: f32,
    state: &mut [f32],
    o: &mut [T],
) {
    let rows = o.len() / e;
    let st = DisjointSlice::new(state);
    let out = DisjointSlice::new(o);
    par_for(threads, rows, |bh| {
        let h = bh % heads;
        let lambda = log2_decay[h].exp2();
        // SAFETY: state and output row `bh` belong to this item alone.
        let (s, o) = unsafe { (st.range_mut(bh * d * e, d * e), out.range_mut(bh * e, e)) };
        let (qr, kr, vr) = (&q[bh * d..][..d], &k[bh * d..][..d], &v[bh * e..][..e]);
        let mut acc = vec![0.0f32; e];
        for x in 0..d {
            let (kx, qx) = (kr[x].to_f32(), qr[x].to_f32());
            for ((sv, &vv), a) in s[x * e..][..e].iter_mut().zip(vr).zip(acc.iter_mut()) {
                *sv = lambda * *sv + kx * vv.to_f32();
                *a += qx * *sv;
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o = T::from_f32(scale * a);
        }
    });
}
