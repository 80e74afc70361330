//! CPU path of the Monarch family: the block form, over token tiles in parallel.
//!
//! A multiply is two [`Stage`]s, each a block-diagonal matrix whose blocks gather their
//! input at `b*src.0 + e*src.1` and scatter their output at `b*dst.0 + o*dst.1`. The forward
//! product reads `x` in contiguous blocks and writes `h` contiguously (w1), then reads `h` at
//! stride `l` and writes `y` at stride `l` (w2): the permutation is in the strides. The
//! transpose runs the mirror image with each block's weights transposed (through strides).
//! Each block's product is one GEMM over a tile of tokens; f32 weights are read in place,
//! others widened once per call; the intermediate is rounded to `T` as the GPU's tensor cores
//! see it; accumulation is f32.

use std::borrow::Cow;

use super::{Mode, MonarchShape, Rows};
use crate::cpu::{DisjointSlice, matmul_strided, par_for, par_for_with};
use crate::dtype::Element;

/// Tokens per parallel work item (the GEMMs' row count): 32, fewer when the rows are long (a
/// tile's f32 copies stay near 1 MiB). Never a function of the thread count: a token's bits
/// must not depend on how many threads ran.
fn tokens_per_item(widest: usize) -> usize {
    ((1usize << 18) / widest.max(1)).clamp(8, 32)
}

/// One block-diagonal product with its gather/scatter strides.
struct Stage<'a> {
    blocks: usize,
    out_len: usize,
    in_len: usize,
    /// `[blocks][rows][cols]` as given (f32 weights read in place, others widened once per
    /// call); element `(e, o)` of block `b`'s `in x out` right factor is at
    /// `b * out_len * in_len + e * w_strides.0 + o * w_strides.1`.
    w: Cow<'a, [f32]>,
    w_strides: (usize, usize),
    /// Input element `e` of block `b` is at `b*src.0 + e*src.1`.
    src: (usize, usize),
    /// Output element `o` of block `b` goes to `b*dst.0 + o*dst.1`.
    dst: (usize, usize),
}

impl<'a> Stage<'a> {
    /// The product by `w` (`[blocks][rows][cols]`), or by each block's transpose.
    fn new<T: Element>(
        w: &'a [T],
        dims: [usize; 3],
        transpose: bool,
        src: (usize, usize),
        dst: (usize, usize),
    ) -> Stage<'a> {
        let [blocks, rows, cols] = dims;
        let w = &w[..blocks * rows * cols];
        let w = match T::as_f32(w) {
            Some(f) => Cow::Borrowed(f),
            None => {
                let mut wide = vec![0.0f32; w.len()];
                T::widen(w, &mut wide);
                Cow::Owned(wide)
            }
        };
        // Forward: (e, o) is w[b][o][e]; transposed: w[b][e][o].
        let (out_len, in_len, w_strides) = if transpose {
            (cols, rows, (cols, 1))
        } else {
            (rows, cols, (1, cols))
        };
        Stage {
            blocks,
            out_len,
            in_len,
            w,
            w_strides,
            src,
            dst,
        }
    }

    /// `out[t] = blockdiag(w) . input[t]` for the `tokens` rows of a tile (input rows
    /// `in_stride` apart, output rows `out_stride` apart): one GEMM per block, the gather and
    /// scatter in its strides.
    fn apply(
        &self,
        tokens: usize,
        (input, in_stride): (&[f32], usize),
        out: &mut [f32],
        out_stride: usize,
    ) {
        let wlen = self.out_len * self.in_len;
        for b in 0..self.blocks {
            matmul_strided(
                (tokens, self.out_len, self.in_len),
                (&mut out[b * self.dst.0..], out_stride, self.dst.1),
                false,
                (&input[b * self.src.0..], in_stride, self.src.1),
                (
                    &self.w[b * wlen..][..wlen],
                    self.w_strides.0,
                    self.w_strides.1,
                ),
            );
        }
    }
}

/// The two stages of `mode`'s product.
fn stages<'a, T: Element>(
    shape: MonarchShape,
    w1: &'a [T],
    w2: &'a [T],
    mode: Mode,
) -> [Stage<'a>; 2] {
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
    let tile = tokens_per_item(n_x.max(n_mid).max(n_y));
    let y = DisjointSlice::new(y);
    let scratch = || {
        let buf = |n: usize| vec![0.0f32; tile * n];
        (buf(n_x), buf(n_mid), buf(n_y))
    };
    par_for_with(
        threads,
        tokens.div_ceil(tile),
        scratch,
        |(xin, mid, out), item| {
            let first = item * tile;
            let count = tile.min(tokens - first);
            for (t, row) in xin.chunks_exact_mut(n_x).take(count).enumerate() {
                load_row(x, x_rows, first + t, row);
            }
            a.apply(count, (xin, n_x), mid, n_mid);
            round::<T>(&mut mid[..count * n_mid]);
            b.apply(count, (mid, n_mid), out, n_y);
            for (t, res) in out.chunks_exact(n_y).take(count).enumerate() {
                let tok = first + t;
                // SAFETY: token `tok` belongs to this item alone; rows do not overlap
                // (row_stride >= width, checked by the caller).
                let row = unsafe { y.range_mut(tok * y_rows.row_stride, y_rows.width) };
                match &bias {
                    Some(bias) => {
                        for ((dst, &o), &bv) in row.iter_mut().zip(res).zip(bias) {
                            *dst = T::from_f32(o + bv);
                        }
                    }
                    None => {
                        for (dst, &o) in row.iter_mut().zip(res) {
                            *dst = T::from_f32(o);
                        }
                    }
                }
            }
        },
    );
}

/// Applies `stage` to every row of `src` (`[tokens, n_src]` via `rows`) into
/// `dst: [tokens, n_dst]` (contiguous f32), rounded to `T`.
fn stage_rows<T: Element>(
    threads: usize,
    stage: &Stage<'_>,
    src: &[T],
    rows: Rows,
    n_src: usize,
    dst: &mut [f32],
    n_dst: usize,
) {
    let tokens = rows.tokens;
    let tile = tokens_per_item(n_src.max(n_dst));
    let dst = DisjointSlice::new(dst);
    let scratch = || vec![0.0f32; tile * n_src];
    par_for_with(threads, tokens.div_ceil(tile), scratch, |xin, item| {
        let first = item * tile;
        let count = tile.min(tokens - first);
        for (t, row) in xin.chunks_exact_mut(n_src).take(count).enumerate() {
            load_row(src, rows, first + t, row);
        }
        // SAFETY: rows first..first+count of dst belong to this item alone.
        let out = unsafe { dst.range_mut(first * n_dst, count * n_dst) };
        stage.apply(count, (xin, n_src), out, n_dst);
        round::<T>(out);
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
