//! The CPU implementation: the kernels' split-KV algorithm in f32, over all cores.
//!
//! Work items are (sequence, KV head, split): each gathers the `seq_q * group` query rows of
//! its KV head (rotated when the layout has RoPE), walks its split's keys in tiles of
//! [`KEY_TILE`] (each K/V row converted, and rotated, once for all those rows) with the online
//! softmax, and writes a normalised partial output and LSE into the workspace, or, with one
//! split, the output itself. A second pass combines the partials through their LSEs, as the
//! GPU's combine kernel does. The softcap and ALiBi reshape each tile's scores (in the exp2
//! domain) between the products and the masks.

use super::Problem;
use super::checks::HostExtras;
use crate::cpu::{DisjointSlice, dot, par_for, shape_row, softmax_step};
use crate::dtype::Element;
use multiversion::multiversion;

/// Keys per tile: a K and a V tile of 64 x 256 f32 (128 KiB) stay in L2.
const KEY_TILE: usize = 64;

/// Rotates `x` (one head vector, f32) to position `pos`; `inv_freq[c]` is pair c's frequency.
fn rotate(p: &Problem<'_>, inv_freq: &[f64], pos: usize, x: &mut [f32]) {
    let Some(rope) = p.rope() else { return };
    for (c, f) in inv_freq.iter().enumerate() {
        // The angle in f64: positions reach 2^20 and more, where f32 angles lose digits.
        let (sin, cos) = (pos as f64 * f).sin_cos();
        let (sin, cos) = (sin as f32, cos as f32);
        let (a, b) = rope.pair(c, p.d);
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos - xb * sin;
        x[b] = xb * cos + xa * sin;
    }
}

/// The frequencies of the layout's RoPE (empty without one).
fn frequencies(p: &Problem<'_>) -> Vec<f64> {
    p.rope()
        .map(|r| (0..p.d / 2).map(|c| r.inv_freq(c, p.d)).collect())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    threads: usize,
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    extras: HostExtras<'_>,
    ws: &mut [f32],
    o: &mut [T],
    lse: &mut [f32],
) {
    let (d, group, rows) = (p.d, p.group(), p.seq_q * p.group());
    let n_items = p.batch * p.heads_kv * p.splits;
    let partial_rows = p.batch * p.heads_q * p.seq_q;
    let (ws_o, ws_lse) = ws.split_at_mut((p.splits * partial_rows * d).min(ws.len()));
    let (ws_o, ws_lse) = (DisjointSlice::new(ws_o), DisjointSlice::new(ws_lse));
    let (o_out, lse_out) = (DisjointSlice::new(o), DisjointSlice::new(lse));
    let scale_log2 = p.scale * std::f32::consts::LOG2_E;
    let inv_freq = frequencies(p);
    let sinks = extras.sinks;
    // The softcap in exp2 units: C tanh(x / C) with C = c log2(e), of an exp2-domain score x,
    // is log2(e) c tanh(scale q.k / c).
    let cap_log2 = p.softcap.map(|c| c * std::f32::consts::LOG2_E);
    par_for(threads, n_items, |item| {
        let (b, rest) = (
            item / (p.heads_kv * p.splits),
            item % (p.heads_kv * p.splits),
        );
        let (hk, split) = (rest / p.splits, rest % p.splits);
        let len = p.len(b);
        let lo = (split * p.keys_per_split).min(len);
        let hi = (lo + p.keys_per_split).min(len);
        // The new tokens are the last seq_q logical keys: query i sits at position first + i.
        let first = len as i64 - p.seq_q as i64;
        // Keys row r sees, [start, end), under the causal mask and the window.
        let seen = |r: usize| {
            let pos = first + (r / group) as i64;
            let end = if p.causal {
                (pos + 1).clamp(0, len as i64) as usize
            } else {
                len
            };
            let start = p
                .window_left
                .map_or(0, |w| (pos - w as i64).max(0) as usize);
            (start, end)
        };

        // The group's query rows, rotated, then scaled into the exp2 domain once.
        let mut qt = vec![0f32; rows * d];
        for r in 0..rows {
            let (i, h) = (r / group, hk * group + r % group);
            let off = p.q.batch * b + p.q.row * i + p.q.head * h;
            let row = &mut qt[r * d..(r + 1) * d];
            T::widen(&q[off..off + d], row);
            rotate(p, &inv_freq, (first + i as i64).max(0) as usize, row);
            row.iter_mut().for_each(|x| *x *= scale_log2);
        }
        let mut kt = vec![0f32; KEY_TILE * d];
        let mut vt = vec![0f32; KEY_TILE * d];
        let mut acc = vec![0f32; rows * d];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut s = vec![0f32; rows * KEY_TILE];
        let mut offs = [(0usize, 0usize); KEY_TILE];
        // ALiBi per row: its query head's slope in exp2 units and its token's position.
        // Positions and keys are below MAX_CAPACITY + MAX_SEQ_Q (checked), so i32 holds
        // their differences.
        let alibi: Option<(Vec<f32>, Vec<i32>)> = extras.alibi_slopes.map(|sl| {
            (0..rows)
                .map(|r| {
                    let h = hk * group + r % group;
                    (
                        sl[h] * std::f32::consts::LOG2_E,
                        (first + (r / group) as i64) as i32,
                    )
                })
                .unzip()
        });
        for n0 in (lo..hi).step_by(KEY_TILE) {
            let cols = KEY_TILE.min(hi - n0);
            // Each K/V row converted (and rotated) once for every query row of the group.
            for (c, slot) in offs[..cols].iter_mut().enumerate() {
                *slot = (
                    p.key_offset(&p.k, b, n0 + c, hk),
                    p.key_offset(&p.v, b, n0 + c, hk),
                );
            }
            gather(k, v, &offs[..cols], d, &mut kt, &mut vt);
            if p.rope().is_some() {
                for c in 0..cols {
                    rotate(p, &inv_freq, n0 + c, &mut kt[c * d..(c + 1) * d]);
                }
            }
            scores(&qt, &kt[..cols * d], d, &mut s);
            if cap_log2.is_some() || alibi.is_some() {
                let alibi = alibi.as_ref().map(|(sl, pos)| (&sl[..], &pos[..]));
                shape_scores(&mut s, n0 as i32, cap_log2, alibi);
            }
            for r in 0..rows {
                // Keys outside the row's range, and the tile's tail: -inf (weight 0).
                let (start, end) = seen(r);
                let sr = &mut s[r * KEY_TILE..(r + 1) * KEY_TILE];
                for (c, x) in sr.iter_mut().enumerate() {
                    if c >= cols || n0 + c < start || n0 + c >= end {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            softmax_pv(&mut s, &vt[..cols * d], d, &mut m, &mut l, &mut acc);
        }
        for r in 0..rows {
            let (i, h) = (r / group, hk * group + r % group);
            let mut inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 };
            let mut lse_r = if l[r] > 0.0 {
                (m[r] + l[r].log2()) * std::f32::consts::LN_2
            } else {
                f32::NEG_INFINITY
            };
            if p.splits == 1 {
                // This row is final here: fold the sink logit in now (else: in the combine).
                inv *= fold_sink(sinks.map(|s| s[h]), &mut lse_r);
            }
            let row = (b * p.heads_q + h) * p.seq_q + i;
            let ar = &acc[r * d..(r + 1) * d];
            if p.splits == 1 {
                let off = p.o.batch * b + p.o.row * i + p.o.head * h;
                // SAFETY: o's strides were checked not to overlap, so (b, i, h) owns these d
                // elements, and (b, i, h) belongs to exactly this item.
                let out = unsafe { o_out.range_mut(off, d) };
                out.iter_mut()
                    .zip(ar)
                    .for_each(|(x, y)| *x = T::from_f32(y * inv));
                // SAFETY: one LSE entry per (b, h, i), owned by this item.
                let slot = unsafe { lse_out.range_mut(row, 1) };
                slot[0] = lse_r;
            } else {
                let slot = split * partial_rows + row;
                // SAFETY: one partial row per (split, b, h, i), owned by this item.
                let out = unsafe { ws_o.range_mut(slot * d, d) };
                out.iter_mut().zip(ar).for_each(|(x, y)| *x = y * inv);
                // SAFETY: as above.
                let l_slot = unsafe { ws_lse.range_mut(slot, 1) };
                l_slot[0] = lse_r;
            }
        }
    });
    if p.splits > 1 {
        let (ws_o, ws_lse) = ws.split_at(p.splits * partial_rows * d);
        par_for(threads, p.batch * p.seq_q, |item| {
            let (b, i) = (item / p.seq_q, item % p.seq_q);
            for h in 0..p.heads_q {
                let row = (b * p.heads_q + h) * p.seq_q + i;
                let parts = (0..p.splits).map(|s| {
                    let slot = s * partial_rows + row;
                    (ws_lse[slot], &ws_o[slot * d..(slot + 1) * d])
                });
                let off = p.o.batch * b + p.o.row * i + p.o.head * h;
                // SAFETY: (b, i, h) owns its d elements of o (checked strides) and its LSE
                // entry; each (b, i) belongs to exactly one item.
                let out = unsafe { o_out.range_mut(off, d) };
                let total = combine(parts, sinks.map(|s| s[h]), out);
                // SAFETY: as above.
                let slot = unsafe { lse_out.range_mut(row, 1) };
                slot[0] = total;
            }
        });
    }
}

/// Folds a learned sink logit into a finished row (the kernel's `fold_sink`): LSE becomes
/// `logaddexp(LSE, sink)`; returns the factor the normalised O shrinks by.
fn fold_sink(sink: Option<f32>, lse: &mut f32) -> f32 {
    let Some(s) = sink else { return 1.0 };
    if s == f32::INFINITY {
        *lse = f32::INFINITY;
        return 0.0;
    }
    if *lse == f32::NEG_INFINITY || s == f32::NEG_INFINITY {
        let f = if *lse == f32::NEG_INFINITY { 0.0 } else { 1.0 };
        *lse = lse.max(s);
        return f;
    }
    let mx = lse.max(s);
    let folded = mx + ((*lse - mx).exp() + (s - mx).exp()).ln();
    let f = (*lse - folded).exp();
    *lse = folded;
    f
}

/// Exact combination of normalised partials `(lse_s, o_s)`: weights `exp(lse_s - max)`, and
/// the row's sink logit folded in. Writes `o` and returns the total LSE (`-inf`, with `o = 0`,
/// when no split saw a key and there is no sink).
fn combine<'a, T: Element>(
    parts: impl Iterator<Item = (f32, &'a [f32])> + Clone,
    sink: Option<f32>,
    o: &mut [T],
) -> f32 {
    let mx = parts.clone().fold(f32::NEG_INFINITY, |a, (l, _)| a.max(l));
    if mx == f32::NEG_INFINITY {
        o.iter_mut().for_each(|x| *x = T::from_f32(0.0));
        let mut lse = f32::NEG_INFINITY;
        fold_sink(sink, &mut lse);
        return lse;
    }
    let mut acc = vec![0f32; o.len()];
    let mut sum = 0f32;
    for (l, part) in parts {
        let w = (l - mx).exp();
        sum += w;
        if w > 0.0 {
            acc.iter_mut().zip(part).for_each(|(a, x)| *a += w * x);
        }
    }
    let mut lse = mx + sum.ln();
    let f = fold_sink(sink, &mut lse);
    o.iter_mut()
        .zip(&acc)
        .for_each(|(x, a)| *x = T::from_f32(a / sum * f));
    lse
}

/// The options' reshaping of one tile's scores (exp2 domain, rows of [`KEY_TILE`] keys
/// starting at key `n0`), before the masks: [`shape_row`] with each row's slope and position
/// (`alibi = (slopes, positions)`, the slopes in exp2 units). The tile's tail past its keys is
/// reshaped too and masked after.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn shape_scores(s: &mut [f32], n0: i32, cap: Option<f32>, alibi: Option<(&[f32], &[i32])>) {
    for (r, sr) in s.chunks_exact_mut(KEY_TILE).enumerate() {
        let (slope, diag) = alibi.map_or((0.0, 0), |(sl, pos)| (sl[r], pos[r] - n0));
        shape_row(sr, cap, slope, diag);
    }
}

/// Converts the tile's K and V rows (element offsets `offs`, `d` each) into `kt` and `vt`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn gather<T: Element>(
    k: &[T],
    v: &[T],
    offs: &[(usize, usize)],
    d: usize,
    kt: &mut [f32],
    vt: &mut [f32],
) {
    for (c, &(ko, vo)) in offs.iter().enumerate() {
        T::widen(&k[ko..ko + d], &mut kt[c * d..(c + 1) * d]);
        T::widen(&v[vo..vo + d], &mut vt[c * d..(c + 1) * d]);
    }
}

/// Sums a vector's lanes by halving (a tree, which vectorises; a left fold is a serial chain).
#[inline(always)]
fn hsum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

/// f32 lanes per vector step: one AVX-512 register (two AVX2 ones).
const LANES: usize = 16;
/// Keys whose dot products with one query row run side by side (independent chains).
const KEYS: usize = 4;

/// The tile's scores: `s[r * KEY_TILE + c] = q_r · k_c` for every query row `r` (rows of `q`,
/// already in the exp2 domain) and key `c` (rows of `kt`). [`KEYS`] keys at a time share each
/// load of the query row and keep independent accumulators: one dot at a time is a chain of
/// dependent adds.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn scores(q: &[f32], kt: &[f32], d: usize, s: &mut [f32]) {
    let cols = kt.len() / d;
    let body = d - d % LANES;
    for (qr, sr) in q.chunks_exact(d).zip(s.chunks_exact_mut(KEY_TILE)) {
        let mut c = 0;
        while c + KEYS <= cols {
            let mut acc = [[0f32; LANES]; KEYS];
            for j in (0..body).step_by(LANES) {
                let Ok(qv) = <&[f32; LANES]>::try_from(&qr[j..j + LANES]) else {
                    unreachable!("LANES elements")
                };
                for (kk, a) in acc.iter_mut().enumerate() {
                    let o = (c + kk) * d + j;
                    let Ok(kv) = <&[f32; LANES]>::try_from(&kt[o..o + LANES]) else {
                        unreachable!("LANES elements")
                    };
                    for l in 0..LANES {
                        a[l] += qv[l] * kv[l];
                    }
                }
            }
            for (kk, a) in acc.into_iter().enumerate() {
                let kc = &kt[(c + kk) * d..(c + kk + 1) * d];
                let tail: f32 = qr[body..].iter().zip(&kc[body..]).map(|(x, y)| x * y).sum();
                sr[c + kk] = hsum(a) + tail;
            }
            c += KEYS;
        }
        for (cc, kc) in kt.chunks_exact(d).enumerate().skip(c) {
            sr[cc] = dot(qr, kc);
        }
    }
}

/// One key tile's online-softmax step for every row: `s` holds each row's [`KEY_TILE`]
/// scores (exp2 domain, masked keys and the tile's tail -inf); the running max `m` and sum
/// `l` move on, `acc` is rescaled to the new max and gains `sum_c 2^(s_c - m) v_c`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_pv(s: &mut [f32], vt: &[f32], d: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32]) {
    let rows = m.len();
    for r in 0..rows {
        let Ok(sr) = <&mut [f32; KEY_TILE]>::try_from(&mut s[r * KEY_TILE..(r + 1) * KEY_TILE])
        else {
            unreachable!("the slice has KEY_TILE elements")
        };
        let step = softmax_step(sr, m[r]);
        if step.alpha != 1.0 {
            acc[r * d..(r + 1) * d]
                .iter_mut()
                .for_each(|x| *x *= step.alpha);
        }
        l[r] = l[r] * step.alpha + step.sum;
        m[r] = step.m;
    }
    // acc_r += sum_c p_rc v_c, a block of BLOCK columns of one row at a time: the block's
    // accumulator stays in registers across the tile's keys (an AXPY per key would load and
    // store the accumulator for every key).
    const BLOCK: usize = 4 * LANES;
    let cols = vt.len() / d;
    let body = d - d % BLOCK;
    for (r, ar) in acc.chunks_exact_mut(d).enumerate() {
        let w = &s[r * KEY_TILE..r * KEY_TILE + cols];
        for j in (0..body).step_by(BLOCK) {
            let Ok(dst) = <&mut [f32; BLOCK]>::try_from(&mut ar[j..j + BLOCK]) else {
                unreachable!("BLOCK elements")
            };
            let mut a = *dst;
            for (c, &wc) in w.iter().enumerate() {
                // A masked key (weight 0) is skipped, not multiplied: 0 * inf V would be NaN.
                if wc == 0.0 {
                    continue;
                }
                let Ok(vc) = <&[f32; BLOCK]>::try_from(&vt[c * d + j..c * d + j + BLOCK]) else {
                    unreachable!("BLOCK elements")
                };
                for l in 0..BLOCK {
                    a[l] += wc * vc[l];
                }
            }
            *dst = a;
        }
        for (c, &wc) in w.iter().enumerate().filter(|(_, w)| **w != 0.0) {
            let vc = &vt[c * d + body..(c + 1) * d];
            ar[body..]
                .iter_mut()
                .zip(vc)
                .for_each(|(x, y)| *x += wc * y);
        }
    }
}

/// Writes the new tokens' K/V rows into the cache. One thread: it is `batch * seq_q` rows, and
/// a block table that maps two sequences to one page must not become a data race.
pub(super) fn append<'a, T: Element>(
    _threads: usize,
    p: &Problem<'_>,
    k: Option<(&'a [T], &'a mut [T])>,
    v: Option<(&'a [T], &'a mut [T])>,
) {
    let d = p.d;
    for (rows, strides) in [(k, &p.k), (v, &p.v)] {
        let Some((new, cache)) = rows else { continue };
        for b in 0..p.batch {
            let first = p.len(b) - p.seq_q;
            for i in 0..p.seq_q {
                for hk in 0..p.heads_kv {
                    let src = ((b * p.seq_q + i) * p.heads_kv + hk) * d;
                    let o = p.key_offset(strides, b, first + i, hk);
                    cache[o..o + d].copy_from_slice(&new[src..src + d]);
                }
            }
        }
    }
}
