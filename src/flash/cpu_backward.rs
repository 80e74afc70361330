//! The CPU backward: FlashAttention-2's algorithm in f32 over all cores, deterministic.
//!
//! `D_i = rowsum(dO_i * O_i)` first; then P is recomputed from the forward's LSE tile by tile
//! (`P = exp(s - lse)`, `dP = dO V^T`, `dS = P (dP - D)`, times the softcap's derivative and
//! the row's scale), never materialised whole. Two passes, so no two threads ever add into the
//! same gradient (no atomics, bits identical run to run whatever the thread count): work items
//! (sequence, KV head, key tile) sweep the query tiles of every query head of their group that
//! can see the tile and accumulate `dV += P^T dO`, `dK += dS^T Q`; items (sequence, head,
//! query tile) sweep their visible key tiles for `dQ += dS K`. Tiles that the mask skips are
//! skipped as in the forward (the same bounds test); every gradient row is written, zero where
//! nothing is seen.

use super::cpu::{HostInputs, Seen, tile_rows};
use super::{Problem, Relu2Norm, Score};
use crate::cpu::{DisjointSlice, dot, matmul, par_for, tanh};
use crate::dtype::Element;

/// Query rows per tile.
const BM: usize = 64;
/// Keys per tile.
const BN: usize = 64;

/// The forward's tensors, the upstream gradient and the LSE, on the host.
pub(super) struct Saved<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub o: &'a [T],
    pub d_o: &'a [T],
    pub lse: &'a [f32],
}

/// The gradients, on the host: dq, dk and dv in `strides`, d_sink_logits `[heads_q]`; `ws`
/// holds `2 * lse_len` f32 (D, then each row's sink-logit term).
pub(super) struct GradsOut<'a, T> {
    pub dq: &'a mut [T],
    pub dk: &'a mut [T],
    pub dv: &'a mut [T],
    pub d_sink: Option<&'a mut [f32]>,
    pub ws: &'a mut [f32],
    pub strides: super::GradStrides,
}

/// One row's constants: its scale, relu²'s `1 / n`, its LSE and D.
#[derive(Clone, Copy, Default)]
struct RowConst {
    scale: f32,
    inv_n: f32,
    lse: f32,
    big_d: f32,
}

/// What the tiles of one (sequence, query head) share.
struct Ctx<'a, 'p> {
    p: &'a Problem<'p>,
    seen: Seen<'a>,
    relu2: bool,
    cap: Option<f32>,
    slope: f32,
    /// The diagonal's offset: row i's diagonal key is `i + diag`.
    diag: i64,
}

/// Scratch for one tile pair.
struct Tiles {
    qt: Vec<f32>,
    dot_t: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    /// P (softmax) or the relu² weights, `[BM, BN]`.
    pw: Vec<f32>,
    /// dL/d(q . k) for the tile, the row's scale folded in, `[BM, BN]`.
    ds: Vec<f32>,
    /// dP = dO V^T, `[BM, BN]`.
    dp: Vec<f32>,
}

impl Tiles {
    fn new(d: usize) -> Self {
        Tiles {
            qt: vec![0.0; BM * d],
            dot_t: vec![0.0; BM * d],
            kt: vec![0.0; BN * d],
            vt: vec![0.0; BN * d],
            pw: vec![0.0; BM * BN],
            ds: vec![0.0; BM * BN],
            dp: vec![0.0; BM * BN],
        }
    }
}

impl Ctx<'_, '_> {
    /// Fills `t.pw` and `t.ds` for rows `m0..m0 + rows` (constants `rc`, their q in `q`, dO
    /// in `d_o`, both f32 rows of d) against keys `n0..n0 + cols` (f32 rows `k`, `v`).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        t: &mut Tiles,
        rc: &[RowConst],
        (m0, rows): (usize, usize),
        (n0, cols): (usize, usize),
        (q, d_o): (&[f32], &[f32]),
        (k, k_rs): (&[f32], usize),
        (v, v_rs): (&[f32], usize),
        full: bool,
    ) {
        let d = self.p.d;
        // S = Q K^T and dP = dO V^T.
        matmul(
            (rows, cols, d),
            &mut t.pw,
            BN,
            false,
            (q, d, 1),
            (k, 1, k_rs),
        );
        matmul(
            (rows, cols, d),
            &mut t.dp,
            BN,
            false,
            (d_o, d, 1),
            (v, 1, v_rs),
        );
        for (r, &c) in rc.iter().enumerate().take(rows) {
            let i = m0 + r;
            let pw = &mut t.pw[r * BN..r * BN + cols];
            let ds = &mut t.ds[r * BN..r * BN + cols];
            let dp = &t.dp[r * BN..r * BN + cols];
            // No key seen (-inf) or an infinite sink (+inf): P = 0; a NaN stays NaN.
            let dead = !self.relu2 && c.lse.is_infinite();
            for (col, ((w, g), &dpv)) in pw.iter_mut().zip(ds.iter_mut()).zip(dp).enumerate() {
                let j = n0 + col;
                if dead || (!full && !self.seen.seen(i, j)) {
                    (*w, *g) = (0.0, 0.0);
                    continue;
                }
                let x = c.scale * *w;
                if self.relu2 {
                    let y = x.max(0.0);
                    *w = y * y * c.inv_n;
                    *g = 2.0 * y * c.inv_n * dpv * c.scale;
                    continue;
                }
                let (s, dcap) = match self.cap {
                    Some(cap) => {
                        let th = tanh(x / cap);
                        (cap * th, (1.0 - th) * (1.0 + th))
                    }
                    None => (x, 1.0),
                };
                let dist = (i as i64 + self.diag - j as i64).abs() as f32;
                let p = (s - self.slope * dist - c.lse).exp();
                *w = p;
                *g = p * (dpv - c.big_d) * dcap * c.scale;
            }
        }
    }
}

/// The tile context of (sequence b, query head h).
fn ctx<'a, 'p>(
    p: &'a Problem<'p>,
    inputs: HostInputs<'a>,
    mask_cols: usize,
    b: usize,
    h: usize,
    vis: &'a super::Visibility,
) -> Ctx<'a, 'p> {
    let (sq, sk, _, _) = p.seq(b);
    Ctx {
        p,
        seen: Seen::new(vis, inputs.mask, mask_cols),
        relu2: p.opts.score != Score::Softmax,
        cap: p.opts.softcap,
        slope: inputs.alibi.map_or(0.0, |a| a[h]),
        diag: sk as i64 - sq as i64,
    }
}

/// `rows` f32 rows of `x` (strides `s`) for (sequence b, rows m0.., head h) into `dst`.
#[allow(clippy::too_many_arguments)]
fn rows_f32<T: Element>(
    p: &Problem<'_>,
    x: &[T],
    s: &super::Strides,
    (b, row0, h): (usize, usize, usize),
    m0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    let d = p.d;
    for r in 0..rows {
        let off = p.offset(s, b, row0, m0 + r, h);
        T::widen(&x[off..off + d], &mut dst[r * d..(r + 1) * d]);
    }
}

/// The row constants of (sequence b, head h), rows `m0..m0 + rows`.
fn row_consts(
    p: &Problem<'_>,
    ctx: &Ctx<'_, '_>,
    (b, q0, h): (usize, usize, usize),
    m0: usize,
    rows: usize,
    lse: &[f32],
    big_d: &[f32],
) -> Vec<RowConst> {
    let (_, sk, _, _) = p.seq(b);
    let visible = p.opts.entropy_scale || p.opts.score == Score::Relu2(Relu2Norm::Visible);
    (0..rows)
        .map(|r| {
            let row = m0 + r;
            let n = if visible { ctx.seen.vis.count(row) } else { sk };
            let scale = if p.opts.entropy_scale {
                p.scale * (n as f32).log2() / 9.0
            } else {
                p.scale
            };
            let idx = p.lse_index(b, q0, row, h);
            RowConst {
                scale,
                inv_n: if n > 0 { 1.0 / n as f32 } else { 0.0 },
                lse: lse[idx],
                big_d: big_d[idx],
            }
        })
        .collect()
}

pub(super) fn backward<T: Element>(
    threads: usize,
    p: &Problem<'_>,
    inputs: HostInputs<'_>,
    x: Saved<'_, T>,
    out: GradsOut<'_, T>,
) {
    let d = p.d;
    let group = p.heads_q / p.heads_kv;
    let lse_len = p.heads_q * p.total_q;
    let (big_d, sink_terms) = out.ws.split_at_mut(lse_len);
    // D_i = dO_i . O_i, per (sequence, head).
    {
        let dd = DisjointSlice::new(big_d);
        par_for(threads, p.batch * p.heads_q, |item| {
            let (b, h) = (item / p.heads_q, item % p.heads_q);
            let (sq, _, q0, _) = p.seq(b);
            let (mut a, mut c) = (vec![0f32; d], vec![0f32; d]);
            for r in 0..sq {
                let off = p.offset(&p.o, b, q0, r, h);
                T::widen(&x.o[off..off + d], &mut a);
                T::widen(&x.d_o[off..off + d], &mut c);
                // SAFETY: one entry per (b, h, row), owned by this item.
                unsafe { dd.set(p.lse_index(b, q0, r, h), dot(&a, &c)) };
            }
        });
    }
    let big_d: &[f32] = big_d;
    let mask_cols = inputs.mask.map_or(0, |(_, _, bk)| p.seq_k.div_ceil(bk));
    // Rows past the last sequence (a varlen call whose totals exceed its offsets) belong to
    // no work item: they read as zero.
    if let Some((cq, ck)) = p.cu {
        let tail = |cu: &[i32], total: usize, s: &super::Strides, heads: usize, g: &mut [T]| {
            let last = cu.last().map_or(0, |&x| x.max(0) as usize);
            for r in last..total {
                for h in 0..heads {
                    let off = r * s.row + h * s.head;
                    g[off..off + d].fill(T::from_f32(0.0));
                }
            }
        };
        let g = &out.strides;
        tail(cq, p.total_q, &g.dq, p.heads_q, out.dq);
        tail(ck, p.total_k, &g.dk, p.heads_kv, out.dk);
        tail(ck, p.total_k, &g.dv, p.heads_kv, out.dv);
    }
    let gs = out.strides;
    // Pass 1: dK, dV per (sequence, KV head, key tile).
    let mut items = Vec::new();
    for b in 0..p.batch {
        let (_, sk, _, _) = p.seq(b);
        for hk in 0..p.heads_kv {
            for t in 0..sk.div_ceil(BN) {
                items.push((b, hk, t));
            }
        }
    }
    let dk = DisjointSlice::new(out.dk);
    let dv = DisjointSlice::new(out.dv);
    par_for(threads, items.len(), |it| {
        let (b, hk, t) = items[it];
        let (sq, sk, q0, k0) = p.seq(b);
        let vis = p.visibility(b);
        let n0 = t * BN;
        let cols = BN.min(sk - n0);
        let mut tl = Tiles::new(d);
        let (mut dk_acc, mut dv_acc) = (vec![0f32; cols * d], vec![0f32; cols * d]);
        let (ko, vo) = (p.offset(&p.k, b, k0, n0, hk), p.offset(&p.v, b, k0, n0, hk));
        let mut kbuf = std::mem::take(&mut tl.kt);
        let mut vbuf = std::mem::take(&mut tl.vt);
        let (ktile, k_rs) = tile_rows(x.k, ko, p.k.row, cols, d, &mut kbuf);
        let (vtile, v_rs) = tile_rows(x.v, vo, p.v.row, cols, d, &mut vbuf);
        for h in hk * group..(hk + 1) * group {
            let ctx = ctx(p, inputs, mask_cols, b, h, &vis);
            for m0 in (0..sq).step_by(BM) {
                let rows = BM.min(sq - m0);
                let (needed, full) = ctx.seen.tile(m0, m0 + rows, n0, cols);
                if !needed {
                    continue;
                }
                let rc = row_consts(p, &ctx, (b, q0, h), m0, rows, x.lse, big_d);
                rows_f32(p, x.q, &p.q, (b, q0, h), m0, rows, &mut tl.qt);
                rows_f32(p, x.d_o, &p.o, (b, q0, h), m0, rows, &mut tl.dot_t);
                let (qt, dot_t) = (std::mem::take(&mut tl.qt), std::mem::take(&mut tl.dot_t));
                ctx.tile(
                    &mut tl,
                    &rc,
                    (m0, rows),
                    (n0, cols),
                    (&qt, &dot_t),
                    (ktile, k_rs),
                    (vtile, v_rs),
                    full,
                );
                // dV += P^T dO, dK += dS^T Q (P and dS read transposed through strides).
                matmul(
                    (cols, d, rows),
                    &mut dv_acc,
                    d,
                    true,
                    (&tl.pw, 1, BN),
                    (&dot_t, d, 1),
                );
                matmul(
                    (cols, d, rows),
                    &mut dk_acc,
                    d,
                    true,
                    (&tl.ds, 1, BN),
                    (&qt, d, 1),
                );
                (tl.qt, tl.dot_t) = (qt, dot_t);
            }
        }
        for c in 0..cols {
            for (acc, dst, s) in [(&dk_acc, &dk, &gs.dk), (&dv_acc, &dv, &gs.dv)] {
                let off = p.offset(s, b, k0, n0 + c, hk);
                // SAFETY: the gradients' strides were checked not to overlap, so (b, key,
                // hk) owns these d elements, and each belongs to exactly one item.
                let row = unsafe { dst.range_mut(off, d) };
                for (y, &a) in row.iter_mut().zip(&acc[c * d..(c + 1) * d]) {
                    *y = T::from_f32(a);
                }
            }
        }
    });

    // Pass 2: dQ (and each row's sink-logit term) per (sequence, head, query tile).
    let mut items = Vec::new();
    for b in 0..p.batch {
        let (sq, _, _, _) = p.seq(b);
        for h in 0..p.heads_q {
            for t in 0..sq.div_ceil(BM) {
                items.push((b, h, t));
            }
        }
    }
    let dq = DisjointSlice::new(out.dq);
    let terms = DisjointSlice::new(sink_terms);
    par_for(threads, items.len(), |it| {
        let (b, h, t) = items[it];
        let (sq, sk, q0, k0) = p.seq(b);
        let vis = p.visibility(b);
        let ctx = ctx(p, inputs, mask_cols, b, h, &vis);
        let hk = h / group;
        let m0 = t * BM;
        let rows = BM.min(sq - m0);
        let mut tl = Tiles::new(d);
        let rc = row_consts(p, &ctx, (b, q0, h), m0, rows, x.lse, big_d);
        let (mut qt, mut dot_t) = (std::mem::take(&mut tl.qt), std::mem::take(&mut tl.dot_t));
        rows_f32(p, x.q, &p.q, (b, q0, h), m0, rows, &mut qt);
        rows_f32(p, x.d_o, &p.o, (b, q0, h), m0, rows, &mut dot_t);
        let mut dq_acc = vec![0f32; rows * d];
        let (mut kbuf, mut vbuf) = (std::mem::take(&mut tl.kt), std::mem::take(&mut tl.vt));
        for n0 in (0..sk).step_by(BN) {
            let cols = BN.min(sk - n0);
            let (needed, full) = ctx.seen.tile(m0, m0 + rows, n0, cols);
            if !needed {
                continue;
            }
            let (ko, vo) = (p.offset(&p.k, b, k0, n0, hk), p.offset(&p.v, b, k0, n0, hk));
            let (ktile, k_rs) = tile_rows(x.k, ko, p.k.row, cols, d, &mut kbuf);
            let (vtile, v_rs) = tile_rows(x.v, vo, p.v.row, cols, d, &mut vbuf);
            ctx.tile(
                &mut tl,
                &rc,
                (m0, rows),
                (n0, cols),
                (&qt, &dot_t),
                (ktile, k_rs),
                (vtile, v_rs),
                full,
            );
            // dQ += dS K.
            matmul(
                (rows, d, cols),
                &mut dq_acc,
                d,
                true,
                (&tl.ds, BN, 1),
                (ktile, k_rs, 1),
            );
        }
        let sink = inputs.sinks.map(|s| s[h]);
        for (r, c) in rc.iter().enumerate() {
            let off = p.offset(&gs.dq, b, q0, m0 + r, h);
            // SAFETY: as in pass 1, for dq's rows.
            let row = unsafe { dq.range_mut(off, d) };
            for (y, &a) in row.iter_mut().zip(&dq_acc[r * d..(r + 1) * d]) {
                *y = T::from_f32(a);
            }
            // d sink = -p_sink D; no term where the row's LSE is not finite.
            let term = match sink {
                Some(s) if c.lse.is_finite() => -(s - c.lse).exp() * c.big_d,
                _ => 0.0,
            };
            // SAFETY: one entry per (b, h, row), owned by this item.
            unsafe { terms.set(p.lse_index(b, q0, m0 + r, h), term) };
        }
    });
    // The sink logits' gradients: each head's row terms summed in one fixed order.
    if let Some(ds) = out.d_sink {
        let terms: &[f32] = sink_terms;
        for (h, g) in ds.iter_mut().enumerate() {
            let mut acc = 0f64;
            for b in 0..p.batch {
                let (sq, _, q0, _) = p.seq(b);
                for r in 0..sq {
                    acc += f64::from(terms[p.lse_index(b, q0, r, h)]);
                }
            }
            *g = acc as f32;
        }
    }
}
