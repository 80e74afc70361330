//! The CPU backward pass: three runs of the block-split scan of `cpu.rs` with the operands
//! permuted, as the paper's forward sweep (dQ) and reverse sweeps (dK, dV).
//!
//! With `S_t = lambda S_{t-1} + k_t^T v_t`, `o_t = c q_t S_t` and the state gradient
//! `G_t = c q_t^T dO_t + lambda G_{t+1}` (`G_{T-1}` also gets `dS_final`):
//! - `dq_t = c dO_t S_t^T`: a forward scan of `a = dO`, `b = v`, `c = k` from `S_init^T`;
//! - `dk_t = G_t v_t^T`: a reverse scan of `a = v`, `b = dO`, `c = q`, plus
//!   `lambda^(T-1-t) dS_final v_t^T`;
//! - `dv_t = k_t G_t`: a reverse scan of `a = k`, `b = q`, `c = dO`, plus
//!   `lambda^(T-1-t) k_t dS_final`; its final state `H = sum_i lambda^i q_i^T dO_i` gives
//!   `dS_init = lambda G_0 = lambda c H + lambda^T dS_final`.
//!
//! Every decay exponent stays >= 0 (the `dS_final` terms are added per row, never divided).

use super::Plan;
use super::cpu::{Operand, OutRows, Scan};
use crate::dtype::Element;

pub(super) struct Bufs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub d_o: &'a [T],
    pub init: Option<&'a [f32]>,
    pub d_final: Option<&'a [f32]>,
}

pub(super) struct Shape<'a> {
    pub heads: usize,
    pub d: usize,
    pub e: usize,
    pub seqs: &'a [(usize, usize)],
    pub plan: Plan,
    pub causal: bool,
    pub scale: f32,
    pub log2_decay: &'a [f32],
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run<T: Element>(
    threads: usize,
    sh: &Shape<'_>,
    b: &Bufs<'_, T>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    d_init: Option<&mut [f32]>,
    ws: &mut [f32],
) {
    let (heads, d, e) = (sh.heads, sh.d, sh.e);
    let op = |data, dim| Operand {
        data,
        tok: heads * dim,
        head: dim,
        dim,
    };
    let out = |data, dim| OutRows {
        data,
        tok: heads * dim,
        head: dim,
    };
    let scan = |a, bb, c, reverse, init| Scan {
        a,
        b: bb,
        c,
        seqs: sh.seqs,
        heads,
        reverse: reverse && sh.causal,
        causal: sh.causal,
        scale: sh.scale,
        log2_decay: sh.log2_decay,
        init,
        init_transposed: true,
        block: sh.plan.block,
        split: sh.plan.split,
        n_splits: sh.plan.n_splits,
    };
    let none = |_: usize, _: usize, _: usize, _: usize, _: &mut [f32]| {};
    // lambda^t of head h (t >= 0).
    let pow = |h: usize, t: usize| (t as f32 * sh.log2_decay[h]).exp2();
    let de = d * e;

    scan(op(b.d_o, e), op(b.v, e), op(b.k, d), false, b.init).run(
        threads,
        ws,
        out(dq, d),
        None,
        none,
    );

    let dk_fix = |n: usize, h: usize, t: usize, phys: usize, row: &mut [f32]| {
        if let Some(df) = b.d_final {
            let (df, w) = (&df[(n * heads + h) * de..][..de], pow(h, t));
            let vt = &b.v[(phys * heads + h) * e..][..e];
            for (x, g) in row.iter_mut().enumerate() {
                let dot: f32 = df[x * e..][..e]
                    .iter()
                    .zip(vt)
                    .map(|(f, v)| f * v.to_f32())
                    .sum();
                *g += w * dot;
            }
        }
    };
    scan(op(b.v, e), op(b.d_o, e), op(b.q, d), true, None).run(
        threads,
        ws,
        out(dk, d),
        None,
        dk_fix,
    );

    let dv_fix = |n: usize, h: usize, t: usize, phys: usize, row: &mut [f32]| {
        if let Some(df) = b.d_final {
            let (df, w) = (&df[(n * heads + h) * de..][..de], pow(h, t));
            for (x, kx) in b.k[(phys * heads + h) * d..][..d].iter().enumerate() {
                let f = w * kx.to_f32();
                for (g, &fv) in row.iter_mut().zip(&df[x * e..][..e]) {
                    *g += f * fv;
                }
            }
        }
    };
    let mut s = scan(op(b.k, d), op(b.q, d), op(b.d_o, e), true, None);
    s.init_transposed = false;
    let mut d_init = d_init;
    s.run(threads, ws, out(dv, e), d_init.as_deref_mut(), dv_fix);

    // dS_init = lambda c H + lambda^T dS_final (H: the reverse scan's final state).
    if let Some(di) = d_init {
        for (n, &(_, len)) in sh.seqs.iter().enumerate() {
            for h in 0..heads {
                let g = &mut di[(n * heads + h) * de..][..de];
                let w = pow(h, 1) * sh.scale;
                g.iter_mut().for_each(|x| *x *= w);
                if let Some(df) = b.d_final {
                    let w = pow(h, len);
                    for (x, &f) in g.iter_mut().zip(&df[(n * heads + h) * de..][..de]) {
                        *x += w * f;
                    }
                }
            }
        }
    }
}
