//! CPU path of the Monarch family: the block form, over token tiles in parallel.
//!
//! A multiply is two [`Stage`]s, each a block-diagonal matrix whose blocks gather their
//! input at `b*src.0 + e*src.1` and scatter their output at `b*dst.0 + o*dst.1`. The forward
//! product reads `x` in contiguous blocks and writes `h` contiguously (w1), then reads `h` at
//! stride `l` and writes `y` at stride `l` (w2): the permutation is in the strides. The
//! transpose runs the mirror image with each block's weights transposed. Weights are widened
//! to f32 once per call (packed `[block][out][in]`), the intermediate is rounded to `T` as the
//! GPU's tensor cores see it, accumulation is f32.

use super::{Mode, MonarchShape, Rows};
use crate::cpu::{DisjointSlice, dot, par_for};
use crate::dtype::Element;

/// Tokens per parallel work item: enough to amortise the item's scratch, small enough to
/// balance 2..64 threads on a few hundred tokens.
const TOKENS_PER_ITEM: usize = 8;

/// One block-diagonal product with its gather/scatter strides.
struct Stage {
    blocks: usize,
    out_len: usize,
    in_len: usize,
    /// `[blocks][out_len][in_len]`, f32.
    w: Vec<f32>,
    /// Input element `e` of block `b` is at `b*src.0 + e*src.1`.
    src: (usize, usize),
    /// Output element `o` of block `b` goes to `b*dst.0 + o*dst.1`.
    dst: (usize, usize),
}

impl Stage {
    /// Widens `w` (`[blocks][rows][cols]`) to f32, transposing each block if asked.
    fn new<T: Element>(
        w: &[T],
        dims: [usize; 3],
        transpose: bool,
        src: (usize, usize),
        dst: (usize, usize),
    ) -> Stage {
        let [blocks, rows, cols] = dims;
        let (out_len, in_len) = if transpose {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let mut packed = vec![0.0f32; blocks * rows * cols];
        for b in 0..blocks {
            for o in 0..out_len {
                for e in 0..in_len {
                    let (row, col) = if transpose { (e, o) } else { (o, e) };
                    packed[(b * out_len + o) * in_len + e] =
                        w[(b * rows + row) * cols + col].to_f32();
                }
            }
        }
        Stage {
            blocks,
            out_len,
            in_len,
            w: packed,
            src,
            dst,
        }
    }

    /// `out = blockdiag(w) . input`, with `gather` as scratch of `in_len`.
    fn apply(&self, input: &[f32], out: &mut [f32], gather: &mut [f32]) {
        for b in 0..self.blocks {
            for (e, g) in gather.iter_mut().enumerate() {
                *g = input[b * self.src.0 + e * self.src.1];
            }
            let wb = &self.w[b * self.out_len * self.in_len..][..self.out_len * self.in_len];
            for (o, row) in wb.chunks_exact(self.in_len).enumerate() {
                out[b * self.dst.0 + o * self.dst.1] = dot(row, gather);
            }
        }
    }
}

/// The two stages of `mode`'s product.
fn stages<T: Element>(shape: MonarchShape, w1: &[T], w2: &[T], mode: Mode) -> [Stage; 2] {
    let [_, q, p] = shape.w1_dims();
    let l = shape.w2_dims()[0];
    match mode {
        // h[i*q + c] = w1[i] x[i*p..]; y[t*l + j] = w2[j] h[j::l].
        Mode::Forward => [
            Stage::new(w1, shape.w1_dims(), false, (p, 1), (q, 1)),
            Stage::new(w2, shape.w2_dims(), false, (1, l), (1, l)),
        ],
        // g[rr*l + j] = w2[j]^T x[j::l]; y[i*p + pp] = w1[i]^T g[i*q..].
        Mode::Transpose => [
            Stage::new(w2, shape.w2_dims(), true, (1, l), (1, l)),
            Stage::new(w1, shape.w1_dims(), true, (q, 1), (p, 1)),
        ],
    }
}

/// Rounds to `T` and back: what the intermediate is on the GPU.
fn round<T: Element>(v: &mut [f32]) {
    for x in v {
        *x = T::from_f32(*x).to_f32();
    }
}

/// Reads row `tok` of `x` into `dst` (columns past `rows.width` are zero: the layer's padding).
fn load_row<T: Element>(x: &[T], rows: Rows, tok: usize, dst: &mut [f32]) {
    let src = &x[tok * rows.row_stride..][..rows.width];
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
    dst[rows.width..].fill(0.0);
}

/// `y = M x + bias` (or `M^T x + bias`) on `threads` threads; arguments already checked.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<T: Element>(
    threads: usize,
    shape: MonarchShape,
    w1: &[T],
    w2: &[T],
    bias: Option<&[T]>,
    x: &[T],
    x_rows: Rows,
    y: &mut [T],
    y_rows: Rows,
    mode: Mode,
) {
    let [a, b] = stages(shape, w1, w2, mode);
    let (n_x, n_mid, n_y) = match mode {
        Mode::Forward => (shape.n_in(), shape.n_mid(), shape.n_out()),
        Mode::Transpose => (shape.n_out(), shape.n_mid(), shape.n_in()),
    };
    let bias: Option<Vec<f32>> = bias.map(|b| b.iter().map(|v| v.to_f32()).collect());
    let tokens = x_rows.tokens;
    let y = DisjointSlice::new(y);
    par_for(threads, tokens.div_ceil(TOKENS_PER_ITEM), |item| {
        let mut xin = vec![0.0f32; n_x];
        let mut mid = vec![0.0f32; n_mid];
        let mut out = vec![0.0f32; n_y];
        let mut gather = vec![0.0f32; a.in_len.max(b.in_len)];
        let first = item * TOKENS_PER_ITEM;
        for tok in first..tokens.min(first + TOKENS_PER_ITEM) {
            load_row(x, x_rows, tok, &mut xin);
            a.apply(&xin, &mut mid, &mut gather[..a.in_len]);
            round::<T>(&mut mid);
            b.apply(&mid, &mut out, &mut gather[..b.in_len]);
            // SAFETY: token `tok` belongs to this item alone; rows do not overlap
            // (row_stride >= width, checked by the caller).
            let row = unsafe { y.range_mut(tok * y_rows.row_stride, y_rows.width) };
            for (o, dst) in row.iter_mut().enumerate() {
                *dst = T::from_f32(out[o] + bias.as_ref().map_or(0.0, |b| b[o]));
            }
        }
    });
}

/// Applies `stage` to every row of `src` (`[tokens, n_src]` via `rows`) into
/// `dst: [tokens, n_dst]` (contiguous f32), rounded to `T`.
fn stage_rows<T: Element>(
    threads: usize,
    stage: &Stage,
    src: &[T],
    rows: Rows,
    n_src: usize,
    dst: &mut [f32],
    n_dst: usize,
) {
    let tokens = rows.tokens;
    let dst = DisjointSlice::new(dst);
    par_for(threads, tokens.div_ceil(TOKENS_PER_ITEM), |item| {
        let mut xin = vec![0.0f32; n_src];
        let mut gather = vec![0.0f32; stage.in_len];
        let first = item * TOKENS_PER_ITEM;
        for tok in first..tokens.min(first + TOKENS_PER_ITEM) {
            load_row(src, rows, tok, &mut xin);
            // SAFETY: row `tok` of dst belongs to this item alone.
            let out = unsafe { dst.range_mut(tok * n_dst, n_dst) };
            stage.apply(&xin, out, &mut gather);
            round::<T>(out);
        }
    });
}

/// Backward of `y = M x + bias`; arguments already checked. `h` and its gradient `dh` are
/// materialised for all tokens in `workspace` (`2 * tokens * n_mid` f32), then each weight
/// block sums its outer products over tokens on its own thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Element>(
    threads: usize,
    shape: MonarchShape,
    w1: &[T],
    w2: &[T],
    (x, x_rows): (&[T], Rows),
    (dy, dy_rows): (&[T], Rows),
    (dx, dx_rows): (&mut [T], Rows),
    dw1: &mut [f32],
    dw2: &mut [f32],
    dbias: Option<&mut [f32]>,
    workspace: &mut [f32],
) {
    let [k, q, p] = shape.w1_dims();
    let [l, s, r] = shape.w2_dims();
    let (n_in, n_mid, n_out) = (shape.n_in(), shape.n_mid(), shape.n_out());
    let tokens = x_rows.tokens;
    // dx = M^T dy.
    run(
        threads,
        shape,
        w1,
        w2,
        None,
        dy,
        dy_rows,
        dx,
        dx_rows,
        Mode::Transpose,
    );
    // h = R x (as the forward pass rounds it) and dh = L^T-side of dy: dh[rr*l + j] =
    // sum_t w2[j][t][rr] dy[t*l + j], the first stage of the transpose.
    let [fwd_a, _] = stages(shape, w1, w2, Mode::Forward);
    let [tr_a, _] = stages(shape, w1, w2, Mode::Transpose);
    let (h, dh) = workspace.split_at_mut(tokens * n_mid);
    stage_rows::<T>(threads, &fwd_a, x, x_rows, n_in, h, n_mid);
    stage_rows::<T>(threads, &tr_a, dy, dy_rows, n_out, dh, n_mid);
    let (h, dh) = (&*h, &*dh);
    let dy_at = |tok: usize, o: usize| dy[tok * dy_rows.row_stride + o].to_f32();
    let x_at = |tok: usize, e: usize| x[tok * x_rows.row_stride + e].to_f32();
    // Blocks 0..l of dw2, then blocks 0..k of dw1, one work item each.
    let (dw1s, dw2s) = (DisjointSlice::new(dw1), DisjointSlice::new(dw2));
    par_for(threads, l + k, |item| {
        if item < l {
            let j = item;
            // SAFETY: block j of dw2 belongs to this item alone.
            let blk = unsafe { dw2s.range_mut(j * s * r, s * r) };
            blk.fill(0.0);
            for tok in 0..tokens {
                let hrow = &h[tok * n_mid..][..n_mid];
                for t in 0..s {
                    let g = dy_at(tok, t * l + j);
                    for (rr, d) in blk[t * r..][..r].iter_mut().enumerate() {
                        *d += g * hrow[rr * l + j];
                    }
                }
            }
        } else {
            let i = item - l;
            // SAFETY: block i of dw1 belongs to this item alone.
            let blk = unsafe { dw1s.range_mut(i * q * p, q * p) };
            blk.fill(0.0);
            for tok in 0..tokens {
                let dhrow = &dh[tok * n_mid..][..n_mid];
                for c in 0..q {
                    let g = dhrow[i * q + c];
                    for (pp, d) in blk[c * p..][..p].iter_mut().enumerate() {
                        *d += g * x_at(tok, i * p + pp);
                    }
                }
            }
        }
    });
    if let Some(db) = dbias {
        for (o, d) in db.iter_mut().enumerate() {
            *d = (0..tokens).map(|tok| dy_at(tok, o)).sum();
        }
    }
}
