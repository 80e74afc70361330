//! The CPU implementation: the kernel's tiled online softmax, in f32, over all cores.
//!
//! Work items are (sequence, head, tile of `BLOCK_M` query rows); each walks the key tiles it
//! can see (`BLOCK_N` keys; under the causal mask, only those left of the diagonal), keeping a
//! running max `m`, sum `l` and unnormalised output per row, exactly as the GPU kernel does.

use super::Problem;
use crate::cpu::{DisjointSlice, par_for};
use crate::dtype::Element;

/// Query rows per work item: enough to amortise converting K/V tiles to f32, few enough that a
/// causal batch splits into many items for load balance.
const BLOCK_M: usize = 32;
/// Keys per tile: a K and a V tile (64 x 256 f32 at most, 128 KiB) stay in L2.
const BLOCK_N: usize = 64;

pub(super) fn forward<T: Element>(
    threads: usize,
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    lse: &mut [f32],
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
    let o = DisjointSlice::new(o);
    let lse = DisjointSlice::new(lse);
    let scale_log2 = p.scale * std::f32::consts::LOG2_E;
    let d = p.d;
    par_for(threads, items.len(), |i| {
        let (b, h, t) = items[i];
        let (sq, sk, q0, k0) = p.seq(b);
        let hk = h / (p.heads_q / p.heads_kv);
        let m0 = t * BLOCK_M;
        let rows = BLOCK_M.min(sq - m0);
        let diag = sk as i64 - sq as i64;
        // Keys visible to the last row of the tile bound the tiles to visit.
        let end = if p.causal {
            (m0 as i64 + rows as i64 + diag).clamp(0, sk as i64) as usize
        } else {
            sk
        };

        let mut qt = vec![0f32; rows * d];
        for r in 0..rows {
            let off = p.offset(&p.q, b, q0, m0 + r, h);
            for (x, y) in qt[r * d..(r + 1) * d].iter_mut().zip(&q[off..off + d]) {
                *x = y.to_f32();
            }
        }
        let mut kt = vec![0f32; BLOCK_N * d];
        let mut vt = vec![0f32; BLOCK_N * d];
        let mut acc = vec![0f32; rows * d];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut s = [0f32; BLOCK_N];
        for n0 in (0..end).step_by(BLOCK_N) {
            let cols = BLOCK_N.min(sk - n0);
            for c in 0..cols {
                let ko = p.offset(&p.k, b, k0, n0 + c, hk);
                let vo = p.offset(&p.v, b, k0, n0 + c, hk);
                for j in 0..d {
                    kt[c * d + j] = k[ko + j].to_f32();
                    vt[c * d + j] = v[vo + j].to_f32();
                }
            }
            for r in 0..rows {
                let qr = &qt[r * d..(r + 1) * d];
                // Last key this row sees (exclusive), under the causal mask.
                let visible = if p.causal {
                    (m0 as i64 + r as i64 + diag + 1).clamp(0, sk as i64) as usize
                } else {
                    sk
                };
                let mut mx = f32::NEG_INFINITY;
                for (c, sc) in s.iter_mut().enumerate().take(cols) {
                    *sc = if n0 + c < visible {
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
                let ar = &mut acc[r * d..(r + 1) * d];
                if alpha != 1.0 {
                    ar.iter_mut().for_each(|x| *x *= alpha);
                }
                let mut sum = 0.0;
                for c in 0..cols {
                    let pr = (s[c] - m_use).exp2();
                    if pr != 0.0 {
                        sum += pr;
                        for (x, y) in ar.iter_mut().zip(&vt[c * d..(c + 1) * d]) {
                            *x += pr * y;
                        }
                    }
                }
                l[r] = l[r] * alpha + sum;
                m[r] = m_new;
            }
        }
        for r in 0..rows {
            let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            let off = p.offset(&p.o, b, q0, m0 + r, h);
            // SAFETY: o's strides were checked not to overlap, so (b, row, h) owns these d
            // elements; each (b, row, h) belongs to exactly one work item.
            let out = unsafe { o.range_mut(off, d) };
            for (x, y) in out.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *x = T::from_f32(y * inv);
            }
            let value = if l[r] > 0.0 {
                (m[r] + l[r].log2()) * std::f32::consts::LN_2
            } else {
                f32::NEG_INFINITY
            };
            // SAFETY: one LSE entry per (b, h, row), owned by this item.
            let slot = unsafe { lse.range_mut(p.lse_index(b, q0, m0 + r, h), 1) };
            slot[0] = value;
        }
    });
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it (a single
/// running sum is a serial chain it must not reorder).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
