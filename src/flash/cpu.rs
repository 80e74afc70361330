//! The CPU implementation: the kernel's tiled online softmax, in f32, over all cores.
//!
//! Work items are (sequence, head, tile of `BLOCK_M` query rows); each walks the key tiles its
//! rows can see (`BLOCK_N` keys; tiles outside the window and the sinks, or with no visible
//! block of a block mask, are skipped as the GPU skips them), keeping a running max `m`, sum
//! `l`, entropy sum and unnormalised output per row, exactly as the GPU kernel does.

use super::{Problem, Relu2Norm, Score, Visibility};
use crate::cpu::{DisjointSlice, dot, par_for};
use crate::dtype::Element;

/// Query rows per work item: enough to amortise converting K/V tiles to f32, few enough that a
/// causal batch splits into many items for load balance.
const BLOCK_M: usize = 32;
/// Keys per tile: a K and a V tile (64 x 256 f32 at most, 128 KiB) stay in L2.
const BLOCK_N: usize = 64;

/// The outputs of a call, on the host.
pub(super) struct Outputs<'a, T> {
    pub o: &'a mut [T],
    pub lse: &'a mut [f32],
    pub entropy: Option<&'a mut [f32]>,
}

/// A block mask on the host: (mask, block_q, block_k).
type HostMask<'a> = (&'a [u8], usize, usize);

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    threads: usize,
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    sinks: Option<&[f32]>,
    mask: Option<HostMask<'_>>,
    out: Outputs<'_, T>,
) {
    let mut items = Vec::new();
    for b in 0..p.batch {
        let (sq, _, _, _) = p.seq(b);
        for h in 0..p.heads_q {
            for t in 0..sq.div_ceil(BLOCK_M) {
                items.push((b, h, t));
            }
        }
    }
    let o = DisjointSlice::new(out.o);
    let lse = DisjointSlice::new(out.lse);
    let entropy = out.entropy.map(DisjointSlice::new);
    let mask_cols = mask.map_or(0, |(_, _, bk)| p.seq_k.div_ceil(bk));
    let blocked = |i: usize, j: usize| match mask {
        Some((m, bq, bk)) => m[(i / bq) * mask_cols + j / bk] != 0,
        None => true,
    };
    let relu2 = match p.opts.score {
        Score::Softmax => None,
        Score::Relu2(norm) => Some(norm),
    };
    let d = p.d;
    par_for(threads, items.len(), |i| {
        let (b, h, t) = items[i];
        let (sq, sk, q0, k0) = p.seq(b);
        let vis = p.visibility(b);
        let hk = h / (p.heads_q / p.heads_kv);
        let m0 = t * BLOCK_M;
        let rows = BLOCK_M.min(sq - m0);
        let m1 = m0 + rows;

        let mut qt = vec![0f32; rows * d];
        for r in 0..rows {
            let off = p.offset(&p.q, b, q0, m0 + r, h);
            for (x, y) in qt[r * d..(r + 1) * d].iter_mut().zip(&q[off..off + d]) {
                *x = y.to_f32();
            }
        }
        // Per-row constants: the scale (entropy-invariant: times log_512 of the keys the row
        // sees) and relu²'s 1/n.
        let consts: Vec<(f32, f32)> = (m0..m1)
            .map(|row| {
                let n = if p.opts.entropy_scale || relu2 == Some(Relu2Norm::Visible) {
                    vis.count(row)
                } else {
                    sk
                };
                let scale = if p.opts.entropy_scale {
                    p.scale * (n as f32).log2() / 9.0
                } else {
                    p.scale
                };
                (scale, if n > 0 { 1.0 / n as f32 } else { 0.0 })
            })
            .collect();
        let mut kt = vec![0f32; BLOCK_N * d];
        let mut vt = vec![0f32; BLOCK_N * d];
        let mut acc = vec![0f32; rows * d];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut es = vec![0f32; rows];
        let mut s = [0f32; BLOCK_N];
        for n0 in (0..sk).step_by(BLOCK_N) {
            let cols = BLOCK_N.min(sk - n0);
            if !tile_needed(&vis, m0, m1, n0, cols, &blocked) {
                continue;
            }
            for c in 0..cols {
                let ko = p.offset(&p.k, b, k0, n0 + c, hk);
                let vo = p.offset(&p.v, b, k0, n0 + c, hk);
                for j in 0..d {
                    kt[c * d + j] = k[ko + j].to_f32();
                    vt[c * d + j] = v[vo + j].to_f32();
                }
            }
            for r in 0..rows {
                let row = m0 + r;
                let qr = &qt[r * d..(r + 1) * d];
                let (scale, inv_n) = consts[r];
                let ar = &mut acc[r * d..(r + 1) * d];
                let seen = |c: usize| vis.visible(row, n0 + c) && blocked(row, n0 + c);
                if relu2.is_some() {
                    for c in (0..cols).filter(|&c| seen(c)) {
                        let y = (dot(qr, &kt[c * d..(c + 1) * d]) * scale).max(0.0);
                        let pr = y * y * inv_n;
                        for (x, w) in ar.iter_mut().zip(&vt[c * d..(c + 1) * d]) {
                            *x += pr * w;
                        }
                    }
                    continue;
                }
                let scale_log2 = scale * std::f32::consts::LOG2_E;
                let mut mx = f32::NEG_INFINITY;
                for (c, sc) in s.iter_mut().enumerate().take(cols) {
                    *sc = if seen(c) {
                        dot(qr, &kt[c * d..(c + 1) * d]) * scale_log2
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(*sc);
                }
                let m_new = m[r].max(mx);
                // A row with only masked keys so far subtracts 0, never -inf - -inf.
                let m_use = if m_new == f32::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                let alpha = (m[r] - m_use).exp2();
                if alpha != 1.0 {
                    ar.iter_mut().for_each(|x| *x *= alpha);
                }
                let (mut sum, mut ps) = (0.0, 0.0);
                for c in 0..cols {
                    let pr = (s[c] - m_use).exp2();
                    if pr > 0.0 {
                        sum += pr;
                        ps += pr * s[c];
                        for (x, y) in ar.iter_mut().zip(&vt[c * d..(c + 1) * d]) {
                            *x += pr * y;
                        }
                    }
                }
                l[r] = l[r] * alpha + sum;
                es[r] = es[r] * alpha + ps;
                m[r] = m_new;
            }
        }
        let sink = sinks.map(|s| s[h]);
        for r in 0..rows {
            let f = finish_row(relu2.is_some(), sink, m[r], l[r], es[r]);
            let off = p.offset(&p.o, b, q0, m0 + r, h);
            // SAFETY: o's strides were checked not to overlap, so (b, row, h) owns these d
            // elements; each (b, row, h) belongs to exactly one work item.
            let dst = unsafe { o.range_mut(off, d) };
            for (x, y) in dst.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *x = T::from_f32(y * f.o_factor);
            }
            let idx = p.lse_index(b, q0, m0 + r, h);
            // SAFETY: one LSE (and entropy) entry per (b, h, row), owned by this item.
            unsafe { lse.set(idx, f.lse) };
            if let Some(e) = &entropy {
                // SAFETY: as above.
                unsafe { e.set(idx, f.entropy) };
            }
        }
    });
}

/// Does key tile [n0, n0 + cols) hold a key some row of [m0, m1) sees? (The kernel's
/// `Visibility::tile_needed`.)
fn tile_needed(
    vis: &Visibility,
    m0: usize,
    m1: usize,
    n0: usize,
    cols: usize,
    blocked: &impl Fn(usize, usize) -> bool,
) -> bool {
    let (n0i, n1i) = (n0 as i64, (n0 + cols) as i64);
    let hi = vis.hi(m1 - 1);
    let in_window = n0i <= hi && n1i > vis.lo(m0);
    let in_sinks = n0i < vis.sinks().min(hi + 1);
    // The window test is the fast path; the exact test decides tiles it lets through.
    (in_window || in_sinks)
        && (m0..m1).any(|i| (n0..n0 + cols).any(|j| vis.visible(i, j) && blocked(i, j)))
}

/// What the end of a row writes.
pub(super) struct Finished {
    pub o_factor: f32,
    pub lse: f32,
    pub entropy: f32,
}

/// Folds in the sink logit and normalises (the kernel's `finish_row`): m and es are in the
/// exp2 domain, l and es the row's full sums.
pub(super) fn finish_row(
    relu2: bool,
    sink: Option<f32>,
    mut m: f32,
    mut l: f32,
    mut es: f32,
) -> Finished {
    use std::f32::consts::{LN_2, LOG2_E};
    if relu2 {
        return Finished {
            o_factor: 1.0,
            lse: 0.0,
            entropy: 0.0,
        };
    }
    let o_factor = match sink {
        // The host rejects a NaN logit; the kernel makes the row NaN, and so does this.
        Some(s) if s.is_nan() => {
            return Finished {
                o_factor: f32::NAN,
                lse: f32::NAN,
                entropy: f32::NAN,
            };
        }
        Some(s) if s == f32::INFINITY => {
            return Finished {
                o_factor: 0.0,
                lse: f32::INFINITY,
                entropy: 0.0,
            };
        }
        Some(s) => {
            let s2 = s * LOG2_E;
            let mf = m.max(s2);
            if mf == f32::NEG_INFINITY {
                0.0
            } else {
                let a = (m - mf).exp2();
                let ps = (s2 - mf).exp2();
                l = l * a + ps;
                es = es * a + if ps > 0.0 { ps * s2 } else { 0.0 };
                m = mf;
                a / l
            }
        }
        None if l > 0.0 => 1.0 / l,
        None => 0.0,
    };
    if l > 0.0 {
        Finished {
            o_factor,
            lse: (m + l.log2()) * LN_2,
            entropy: (m + l.log2() - es / l) * LN_2,
        }
    } else {
        Finished {
            o_factor,
            lse: f32::NEG_INFINITY,
            entropy: 0.0,
        }
    }
}
