//! The CPU implementation: the kernel's tiled online softmax, in f32, over all cores.
//!
//! Work items are (sequence, head, tile of `BLOCK_M` query rows); each walks the key tiles its
//! rows can see (`BLOCK_N` keys; tiles outside the window and the sinks, or with no visible
//! block of a block mask, are skipped as the GPU skips them), keeping a running max `m`, sum
//! `l`, entropy sum and unnormalised output per row, exactly as the GPU kernel does. Each tile
//! is two GEMMs (`S = Q K^T`, `acc += P V`, through [`matmul`]) around a vectorised softmax
//! update (compiled for AVX2/AVX-512 as well and picked at run time); per-element masking runs
//! only on tiles that a window, the sinks or a block mask cut.

use multiversion::multiversion;

use super::{Problem, Relu2Norm, Score, Visibility};
use crate::cpu::{DisjointSlice, matmul, par_for, shape_row, softmax_step};
use crate::dtype::Element;

/// Query rows per work item: each K/V tile (and gemm's packing of it) serves this many rows;
/// 128 measured 20% faster than 64 without a window, even with causal masks; small enough that
/// a causal batch still splits into many items for load balance.
const BLOCK_M: usize = 128;
/// Keys per tile: 256 measured 1.1-1.2x faster than 64 (fewer, larger GEMMs per tile): the
/// S tile (128 x 256 f32, 128 KiB) and the K and V tiles (256 x d f32, up to 256 KiB each at
/// d = 256) stay in a 1 MiB L2; 512 was slower.
const BLOCK_N: usize = 256;

/// The outputs of a call, on the host.
pub(super) struct Outputs<'a, T> {
    pub o: &'a mut [T],
    pub lse: &'a mut [f32],
    pub entropy: Option<&'a mut [f32]>,
}

/// A block mask on the host: (mask, block_q, block_k).
type HostMask<'a> = (&'a [u8], usize, usize);

/// The optional inputs on the host (checked): sink logits and ALiBi slopes `[heads_q]`, and a
/// block mask.
#[derive(Clone, Copy, Default)]
pub(super) struct HostInputs<'a> {
    pub sinks: Option<&'a [f32]>,
    pub alibi: Option<&'a [f32]>,
    pub mask: Option<HostMask<'a>>,
}

/// Which keys rows see: the window and sinks, and the block mask if any.
#[derive(Clone, Copy)]
pub(super) struct Seen<'a> {
    pub vis: &'a Visibility,
    mask: Option<HostMask<'a>>,
    mask_cols: usize,
}

impl<'a> Seen<'a> {
    pub(super) fn new(vis: &'a Visibility, mask: Option<HostMask<'a>>, mask_cols: usize) -> Self {
        Seen {
            vis,
            mask,
            mask_cols,
        }
    }

    fn blocked(&self, i: usize, j: usize) -> bool {
        match self.mask {
            Some((m, bq, bk)) => m[(i / bq) * self.mask_cols + j / bk] != 0,
            None => true,
        }
    }

    pub(super) fn seen(&self, i: usize, j: usize) -> bool {
        self.vis.visible(i, j) && self.blocked(i, j)
    }

    /// Whether key tile [n0, n0 + cols) holds a key some row of [m0, m1) sees, and whether
    /// every row sees every key of it (no per-element mask needed). The kernel's
    /// `Visibility::warp_tile_needed`.
    pub(super) fn tile(&self, m0: usize, m1: usize, n0: usize, cols: usize) -> (bool, bool) {
        let (n0i, n1i) = (n0 as i64, (n0 + cols) as i64);
        let hi = self.vis.hi(m1 - 1);
        let in_window = n0i <= hi && n1i > self.vis.lo(m0);
        let in_sinks = n0i < self.vis.sinks().min(hi + 1);
        if !in_window && !in_sinks {
            return (false, false);
        }
        // lo and hi never decrease with the row: the last row's lo and the first row's hi
        // bound every row's window.
        let window_full = self.vis.lo(m1 - 1) <= n0i && self.vis.hi(m0) >= n1i - 1;
        let mask_full = match self.mask {
            None => true,
            Some((m, bq, bk)) => (m0 / bq..=(m1 - 1) / bq).all(|bi| {
                let row = &m[bi * self.mask_cols..(bi + 1) * self.mask_cols];
                row[n0 / bk..=(n0 + cols - 1) / bk].iter().all(|&x| x != 0)
            }),
        };
        if window_full && mask_full {
            return (true, true);
        }
        // The exact test decides the tiles the bounds let through.
        let needed = (m0..m1).any(|i| (n0..n0 + cols).any(|j| self.seen(i, j)));
        (needed, false)
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    threads: usize,
    p: &Problem<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    inputs: HostInputs<'_>,
    out: Outputs<'_, T>,
) {
    let HostInputs { sinks, alibi, mask } = inputs;
    let cap = p.opts.softcap;
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
    let relu2 = match p.opts.score {
        Score::Softmax => None,
        Score::Relu2(norm) => Some(norm),
    };
    let d = p.d;
    par_for(threads, items.len(), |i| {
        let (b, h, t) = items[i];
        let (sq, sk, q0, k0) = p.seq(b);
        let vis = p.visibility(b);
        let seen = Seen {
            vis: &vis,
            mask,
            mask_cols,
        };
        let hk = h / (p.heads_q / p.heads_kv);
        let m0 = t * BLOCK_M;
        let rows = BLOCK_M.min(sq - m0);
        let m1 = m0 + rows;

        // Per-row constants: the scale (entropy-invariant: times log_512 of the keys the row
        // sees; softmax's in the exp2 domain) folded into the row of Q, and relu²'s 1/n.
        let mut inv_n = vec![0f32; rows];
        let mut qt = vec![0f32; rows * d];
        for r in 0..rows {
            let row = m0 + r;
            let n = if p.opts.entropy_scale || relu2 == Some(Relu2Norm::Visible) {
                vis.count(row)
            } else {
                sk
            };
            let mut scale = if p.opts.entropy_scale {
                p.scale * (n as f32).log2() / 9.0
            } else {
                p.scale
            };
            if relu2.is_none() {
                scale *= std::f32::consts::LOG2_E;
            }
            inv_n[r] = if n > 0 { 1.0 / n as f32 } else { 0.0 };
            let off = p.offset(&p.q, b, q0, row, h);
            convert_scaled(&q[off..off + d], scale, &mut qt[r * d..(r + 1) * d]);
        }
        let mut kt = vec![0f32; BLOCK_N * d];
        let mut vt = vec![0f32; BLOCK_N * d];
        let mut s = vec![0f32; rows * BLOCK_N];
        let mut acc = vec![0f32; rows * d];
        let transform = Transform {
            cap_log2: cap.map(|c| c * std::f32::consts::LOG2_E),
            slope_log2: alibi.map_or(0.0, |a| a[h] * std::f32::consts::LOG2_E),
        };
        let diag = sk as i64 - sq as i64;
        let mut st = RowState {
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0f32; rows],
            es: vec![0f32; rows],
        };
        for n0 in (0..sk).step_by(BLOCK_N) {
            // Keys past the last row's last visible key are seen by no row of the tile (`hi`
            // grows with the row), so the tile stops there: a causal diagonal tile computes
            // only the columns some row sees (256-key tiles otherwise waste a quarter of a
            // causal s1024 call).
            let Ok(visible) = usize::try_from(seen.vis.hi(m1 - 1) + 1 - n0 as i64) else {
                continue;
            };
            let cols = BLOCK_N.min(sk - n0).min(visible);
            if cols == 0 {
                continue;
            }
            let (needed, full) = seen.tile(m0, m1, n0, cols);
            if !needed {
                continue;
            }
            // The tiles as f32 rows: f32 inputs read in place, others widened into kt/vt.
            let (ko, vo) = (p.offset(&p.k, b, k0, n0, hk), p.offset(&p.v, b, k0, n0, hk));
            let (ktile, k_rs) = tile_rows(k, ko, p.k.row, cols, d, &mut kt);
            let (vtile, v_rs) = tile_rows(v, vo, p.v.row, cols, d, &mut vt);
            // S = Q K^T (K read transposed through its strides).
            matmul(
                (rows, cols, d),
                &mut s,
                BLOCK_N,
                false,
                (&qt, d, 1),
                (ktile, 1, k_rs),
            );
            if relu2.is_none() && transform.any() {
                // Row 0's diagonal key, counted from the tile's first key (|.| < 2^31: the
                // sizes are at most MAX_LEN = 2^30).
                transform.apply(&mut s, cols, (m0 as i64 + diag - n0 as i64) as i32);
            }
            for (r, sr) in s.chunks_exact_mut(BLOCK_N).enumerate() {
                if !full {
                    for (c, x) in sr[..cols].iter_mut().enumerate() {
                        if !seen.seen(m0 + r, n0 + c) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                // The last tile's missing keys weigh nothing (the P V product stops at cols).
                sr[cols..].fill(f32::NEG_INFINITY);
            }
            match relu2 {
                Some(_) => relu2_weights(&mut s, cols, &inv_n),
                None => softmax_update(&mut s, &mut acc, d, &mut st),
            }
            // acc += P V.
            matmul(
                (rows, d, cols),
                &mut acc,
                d,
                true,
                (&s, BLOCK_N, 1),
                (vtile, v_rs, 1),
            );
        }
        let sink = sinks.map(|s| s[h]);
        for r in 0..rows {
            let f = finish_row(relu2.is_some(), sink, st.m[r], st.l[r], st.es[r]);
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

/// The softmax logits' transforms, in the exp2 domain: the softcap (in exp2 units) and the
/// ALiBi slope (0: none), applied by [`shape_row`].
#[derive(Clone, Copy)]
struct Transform {
    cap_log2: Option<f32>,
    slope_log2: f32,
}

impl Transform {
    fn any(&self) -> bool {
        self.cap_log2.is_some() || self.slope_log2 != 0.0
    }

    /// Applies both to the first `cols` scores of every row of `s`; `diag0` is row 0's
    /// diagonal key counted from the tile's first key (row r's is `diag0 + r`).
    fn apply(&self, s: &mut [f32], cols: usize, diag0: i32) {
        transform_rows(s, cols, self.cap_log2, self.slope_log2, diag0)
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn transform_rows(s: &mut [f32], cols: usize, cap_log2: Option<f32>, slope_log2: f32, diag0: i32) {
    for (r, sr) in (0i32..).zip(s.chunks_exact_mut(BLOCK_N)) {
        shape_row(&mut sr[..cols], cap_log2, slope_log2, diag0 + r);
    }
}

/// The online softmax's running values per row: max `m` and entropy sum `es` in the exp2
/// domain, sum `l`.
struct RowState {
    m: Vec<f32>,
    l: Vec<f32>,
    es: Vec<f32>,
}

/// `cols` rows of `d` elements of `src`, the first at `off`, the rest every `stride`, as f32
/// rows: `src` itself when it is f32 (returned with its row stride), else widened into
/// `buf` (row stride d).
pub(super) fn tile_rows<'a, T: Element>(
    src: &'a [T],
    off: usize,
    stride: usize,
    cols: usize,
    d: usize,
    buf: &'a mut [f32],
) -> (&'a [f32], usize) {
    if let Some(x) = T::as_f32(src) {
        return (&x[off..], stride);
    }
    for (c, dst) in buf.chunks_exact_mut(d).take(cols).enumerate() {
        let o = off + c * stride;
        convert_scaled(&src[o..o + d], 1.0, dst);
    }
    (buf, d)
}

/// `dst = src * scale` in f32 (the conversion from the input's precision).
fn convert_scaled<T: Element>(src: &[T], scale: f32, dst: &mut [f32]) {
    T::widen(src, dst);
    if scale != 1.0 {
        dst.iter_mut().for_each(|x| *x *= scale);
    }
}

/// One key tile's online-softmax step for every row: `s` holds the rows' scores (exp2
/// domain, masked keys and the columns past the tile's end -inf) and becomes their weights
/// `2^(s - m)`; `acc` is rescaled to the new max, and `m`, `l`, `es` move on. Rows are whole
/// `BLOCK_N` arrays so the loops unroll into full vectors with their partial sums in registers.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn softmax_update(s: &mut [f32], acc: &mut [f32], d: usize, st: &mut RowState) {
    for (r, (sr, ar)) in s
        .chunks_exact_mut(BLOCK_N)
        .zip(acc.chunks_exact_mut(d))
        .enumerate()
    {
        let Ok(sr) = <&mut [f32; BLOCK_N]>::try_from(sr) else {
            unreachable!("chunks_exact_mut yields BLOCK_N elements")
        };
        let step = softmax_step(sr, st.m[r]);
        if step.alpha != 1.0 {
            ar.iter_mut().for_each(|x| *x *= step.alpha);
        }
        st.l[r] = st.l[r] * step.alpha + step.sum;
        st.es[r] = st.es[r] * step.alpha + step.psum;
        st.m[r] = step.m;
    }
}

/// relu²'s weights `max(s, 0)^2 / n` for every row of the tile (masked keys are -inf: 0).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu2_weights(s: &mut [f32], cols: usize, inv_n: &[f32]) {
    for (sr, &w) in s.chunks_exact_mut(BLOCK_N).zip(inv_n) {
        for x in &mut sr[..cols] {
            let y = x.max(0.0);
            *x = y * y * w;
        }
    }
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
