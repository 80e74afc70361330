//! Monarch matrices: `M = P L P^T R`, two block-diagonal matrices with a reshape-transpose
//! permutation between them, in the general rectangular form of fly's
//! `blockdiag_butterfly_multiply` (Dao et al., *Monarch*, arXiv 2204.00595).
//!
//! Shapes ([`MonarchShape`]): `w1: [k, q, p]`, `w2: [l, s, r]` with `n_in = k*p`,
//! `l*r == k*q` (the intermediate width `n_mid`) and `n_out = l*s`. For one token `x`:
//!
//! ```text
//! h[i*q + c] = sum_pp w1[i][c][pp] * x[i*p + pp]       (block-diagonal R, k blocks)
//! y[t*l + j] = sum_rr w2[j][t][rr] * h[rr*l + j]       (permute, block-diagonal L, l blocks)
//! ```
//!
//! Data flow: [`multiply`] (and [`multiply_transpose`], [`backward`]) check every argument,
//! then dispatch on the device: the CPU path (`cpu.rs`) runs the block form over token tiles in
//! parallel; the CUDA path (`cuda.rs`, `kernels/monarch.cu`) runs both block-diagonal products
//! and the permutation in one launch with the intermediate `h` on chip (tensor cores for
//! bf16/f16 shapes on the 16 grid, CUDA cores otherwise and for the transpose; the backward
//! pass is three CUDA-core launches). `tiles.rs` plans the GPU tiling. The intermediate is
//! rounded to the element type on both paths (the GPU feeds it to tensor cores in bf16/f16).
//! Nothing on the GPU path has run on a GPU yet.
//! [`project`] finds the closest Monarch matrix to a dense one, [`to_dense`] materialises one,
//! [`MonarchLinear`] is a layer that owns its weights; [`oracle`] is the slow f64 reference.
//!
//! Limits and lengths (checked before anything that depends on them is computed or
//! allocated, each a typed error naming the argument): every dimension of [`MonarchShape`] at
//! least 1 and `n_in`, `n_mid`, `n_out`, `w1_len`, `w2_len` within `i32::MAX` (the kernels'
//! 32-bit weight and column indices); row geometries ([`Rows`]) within `i64`; what the host
//! itself allocates ([`to_dense`]'s matrix, [`project`]'s factors and Gram matrices,
//! [`MonarchLinear`]'s weights) within [`MAX_HOST_ELEMENTS`]. A buffer holds *at least* what
//! the call reads or writes (the crate's one length rule): `w1`, `w2`, `bias`, the gradients
//! and the workspace may be longer, and their tails are neither read nor written; rows are
//! [`Rows::min_len`] long at least, and what lies between and after them is left alone.

mod cpu;
#[cfg(attnkit_cuda)]
mod cuda;
mod layer;
pub mod oracle;
mod project;
// The planner serves the CUDA launcher; its unit tests run in every build.
#[cfg_attr(not(attnkit_cuda), allow(dead_code))]
mod tiles;

pub use layer::MonarchLinear;

/// Most elements one host-side allocation of the family may have: [`to_dense`]'s
/// `n_out * n_in` matrix, each of [`project`]'s factors and slice Gram matrices (`p * p`),
/// and [`MonarchLinear`]'s weights together (4 GiB of f32). A bigger request is an
/// [`Error::Shape`] naming `shape` (or the layer's sizes) before anything is allocated.
///
/// ```
/// use attnkit::monarch::{MonarchShape, to_dense};
/// let s = MonarchShape::new([1024, 1, 1024], [1024, 1024, 1])?; // dense: 2^20 x 2^20
/// let e = to_dense(s, &[0.0f32; 1 << 20], &[0.0f32; 1 << 20]).unwrap_err();
/// assert_eq!(e.arg(), Some("shape"));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub const MAX_HOST_ELEMENTS: usize = 1 << 30;
pub use project::{ProjectOptions, Projection, project, to_dense};

use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// The block structure of a Monarch matrix: `w1: [k, q, p]`, `w2: [l, s, r]`, checked to chain
/// (`l*r == k*q`), with no zero dimension and every size within `i32` (the kernels index rows
/// and weights with 32-bit integers).
///
/// ```
/// use attnkit::monarch::MonarchShape;
/// let s = MonarchShape::new([4, 8, 6], [2, 5, 16]).unwrap();
/// assert_eq!((s.n_in(), s.n_mid(), s.n_out()), (24, 32, 10));
/// assert!(MonarchShape::new([4, 8, 6], [3, 5, 16]).is_err()); // 3*16 != 4*8
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MonarchShape {
    k: usize,
    q: usize,
    p: usize,
    l: usize,
    s: usize,
    r: usize,
}

impl MonarchShape {
    /// A shape from the dimensions of `w1` (`[k, q, p]`) and `w2` (`[l, s, r]`).
    ///
    /// Errors: [`Error::Shape`] naming `w1` or `w2` for a zero dimension (zero blocks), for
    /// blocks that do not chain (`l*r != k*q`), or for sizes past `i32::MAX` elements.
    ///
    /// ```
    /// use attnkit::monarch::MonarchShape;
    /// let e = MonarchShape::new([0, 4, 4], [4, 4, 4]).unwrap_err();
    /// assert_eq!(e.arg(), Some("w1"));
    /// ```
    pub fn new(w1: [usize; 3], w2: [usize; 3]) -> Result<Self> {
        for (arg, dims) in [("w1", w1), ("w2", w2)] {
            if dims.contains(&0) {
                return Err(Error::Shape {
                    arg,
                    detail: format!("dimensions {dims:?} include a zero (zero blocks or width)"),
                });
            }
        }
        let [k, q, p] = w1;
        let [l, s, r] = w2;
        let size = |arg: &'static str, what: &str, a: usize, b: usize| -> Result<usize> {
            a.checked_mul(b)
                .filter(|&v| v <= i32::MAX as usize)
                .ok_or_else(|| Error::Shape {
                    arg,
                    detail: format!("{what} = {a}*{b} exceeds i32::MAX"),
                })
        };
        let mid1 = size("w1", "k*q", k, q)?;
        let mid2 = size("w2", "l*r", l, r)?;
        if mid1 != mid2 {
            return Err(Error::Shape {
                arg: "w2",
                detail: format!(
                    "blocks do not chain: w1 {w1:?} gives k*q = {mid1} intermediate values, \
                     w2 {w2:?} reads l*r = {mid2}"
                ),
            });
        }
        size("w1", "k*p", k, p)?;
        let n_out = size("w2", "l*s", l, s)?;
        size("w1", "k*q*p", mid1, p)?;
        size("w2", "l*s*r", n_out, r)?;
        Ok(MonarchShape { k, q, p, l, s, r })
    }

    /// The square Monarch matrix of fly's `MonarchLinear` for `n = blocks * b`:
    /// `w1: [blocks, b, b]`, `w2: [blocks, b, b]`. With `blocks = sqrt(n)` it is the paper's
    /// `M = P L P^T R`.
    ///
    /// Errors: [`Error::Shape`] naming `blocks` if it is zero or does not divide `n`.
    ///
    /// ```
    /// use attnkit::monarch::MonarchShape;
    /// let s = MonarchShape::square(16, 4).unwrap();
    /// assert_eq!((s.w1_dims(), s.w2_dims()), ([4, 4, 4], [4, 4, 4]));
    /// assert!(MonarchShape::square(10, 4).is_err());
    /// ```
    pub fn square(n: usize, blocks: usize) -> Result<Self> {
        if blocks == 0 || n % blocks != 0 || n == 0 {
            return Err(Error::Shape {
                arg: "blocks",
                detail: format!("{blocks} blocks must be at least 1 and divide n = {n}"),
            });
        }
        let b = n / blocks;
        Self::new([blocks, b, b], [blocks, b, b])
    }

    /// `[k, q, p]`: the dimensions of `w1`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::square(6, 2).unwrap().w1_dims(), [2, 3, 3]);
    /// ```
    pub fn w1_dims(&self) -> [usize; 3] {
        [self.k, self.q, self.p]
    }

    /// `[l, s, r]`: the dimensions of `w2`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::square(6, 2).unwrap().w2_dims(), [2, 3, 3]);
    /// ```
    pub fn w2_dims(&self) -> [usize; 3] {
        [self.l, self.s, self.r]
    }

    /// Input width `k*p`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::new([2, 3, 5], [3, 7, 2]).unwrap().n_in(), 10);
    /// ```
    pub fn n_in(&self) -> usize {
        self.k * self.p
    }

    /// Intermediate width `k*q == l*r`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::new([2, 3, 5], [3, 7, 2]).unwrap().n_mid(), 6);
    /// ```
    pub fn n_mid(&self) -> usize {
        self.k * self.q
    }

    /// Output width `l*s`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::new([2, 3, 5], [3, 7, 2]).unwrap().n_out(), 21);
    /// ```
    pub fn n_out(&self) -> usize {
        self.l * self.s
    }

    /// Elements of `w1`: `k*q*p`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::square(8, 2).unwrap().w1_len(), 32);
    /// ```
    pub fn w1_len(&self) -> usize {
        self.k * self.q * self.p
    }

    /// Elements of `w2`: `l*s*r`.
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::square(8, 4).unwrap().w2_len(), 16);
    /// ```
    pub fn w2_len(&self) -> usize {
        self.l * self.s * self.r
    }

    /// Floating-point operations of one multiply over `tokens` tokens (a multiply-add is 2).
    ///
    /// ```
    /// # use attnkit::monarch::MonarchShape;
    /// assert_eq!(MonarchShape::square(4, 2).unwrap().flops(1), 2.0 * (8.0 + 8.0));
    /// ```
    pub fn flops(&self, tokens: usize) -> f64 {
        2.0 * tokens as f64 * (self.w1_len() + self.w2_len()) as f64
    }
}

/// The weights of one Monarch matrix, borrowed where the call runs: `w1: [k, q, p]` and
/// `w2: [l, s, r]` contiguous, and an optional bias added to the output.
///
/// ```
/// use attnkit::monarch::{MonarchShape, Weights};
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let (w1, w2) = (vec![0.0f32; 8], vec![0.0f32; 8]);
/// let w = Weights { shape, w1: (&w1).into(), w2: (&w2).into(), bias: None };
/// assert_eq!(w.shape.n_out(), 4);
/// ```
#[derive(Debug)]
pub struct Weights<'a, T> {
    /// The block structure.
    pub shape: MonarchShape,
    /// `[k, q, p]`, contiguous: block `i` maps input `x[i*p..][..p]` to `h[i*q..][..q]`.
    pub w1: Buf<'a, T>,
    /// `[l, s, r]`, contiguous: block `j` maps `h[rr*l + j]` (rr < r) to `y[t*l + j]` (t < s).
    pub w2: Buf<'a, T>,
    /// Added to every output row: `[n_out]` for [`multiply`], `[n_in]` for
    /// [`multiply_transpose`].
    pub bias: Option<Buf<'a, T>>,
}

/// A row-major `[tokens, width]` matrix whose rows start `row_stride` elements apart.
///
/// ```
/// let x = attnkit::monarch::Rows { tokens: 3, width: 8, row_stride: 10 };
/// assert_eq!(x.min_len(), Some(28));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// Number of rows (tokens).
    pub tokens: usize,
    /// Elements per row that the call reads or writes.
    pub width: usize,
    /// Distance between row starts, in elements (`>= width`).
    pub row_stride: usize,
}

impl Rows {
    /// Contiguous rows: `row_stride == width`.
    ///
    /// ```
    /// let x = attnkit::monarch::Rows::contiguous(2, 5);
    /// assert_eq!(x.row_stride, 5);
    /// ```
    pub fn contiguous(tokens: usize, width: usize) -> Rows {
        Rows {
            tokens,
            width,
            row_stride: width,
        }
    }

    /// Elements a buffer must hold: `(tokens - 1) * row_stride + width` (0 for no token),
    /// or None on overflow.
    ///
    /// ```
    /// assert_eq!(attnkit::monarch::Rows::contiguous(0, 5).min_len(), Some(0));
    /// ```
    pub fn min_len(&self) -> Option<usize> {
        if self.tokens == 0 {
            return Some(0);
        }
        (self.tokens - 1)
            .checked_mul(self.row_stride)?
            .checked_add(self.width)
    }

    /// Checks the geometry against a buffer of `len` elements, naming `arg` (the buffer) and
    /// `stride_arg` (its stride) in errors.
    fn check(&self, arg: &'static str, stride_arg: &'static str, len: usize) -> Result<()> {
        if self.row_stride < self.width {
            return Err(Error::Stride {
                arg: stride_arg,
                detail: format!(
                    "row stride {} is less than the row width {} (rows would overlap)",
                    self.row_stride, self.width
                ),
            });
        }
        let need = self
            .min_len()
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| Error::Stride {
                arg: stride_arg,
                detail: format!(
                    "{} rows at stride {} overflow i64",
                    self.tokens, self.row_stride
                ),
            })?;
        if len < need {
            return Err(Error::Shape {
                arg,
                detail: format!(
                    "holds {len} elements; {} rows of {} at stride {} need {need}",
                    self.tokens, self.width, self.row_stride
                ),
            });
        }
        Ok(())
    }
}

/// Which product a call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `y = M x`: x has `n_in` columns, y has `n_out`.
    Forward,
    /// `y = M^T x`: x has `n_out` columns, y has `n_in`.
    Transpose,
}

/// `y = M x + bias` for every row of `x: [tokens, n_in]`, written to `y: [tokens, n_out]`
/// (row stride `y_row_stride`), f32 accumulation, the intermediate rounded to `T`.
///
/// Errors name the argument: `w1`/`w2`/`bias` of the wrong length, `x` whose width is not
/// `k*p` or that is too short for its rows, strides below the width, buffers that do not live
/// where `dev` runs, device pointers not aligned to their element. The tensor-core path is
/// taken for bf16/f16 with `p`, `r`, `s` multiples of 16, x's row stride a multiple of 8 and
/// `x`, `w1`, `w2` 16-byte aligned (it copies rows in 16-byte chunks); anything else runs on
/// CUDA cores, with the same result up to rounding.
///
/// ```
/// use attnkit::monarch::{self, MonarchShape, Rows, Weights};
/// use attnkit::Device;
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let (w1, w2) = (vec![1.0f32; 8], vec![1.0f32; 8]);
/// let w = Weights { shape, w1: (&w1).into(), w2: (&w2).into(), bias: None };
/// let x = vec![1.0f32, 2.0, 3.0, 4.0];
/// let mut y = vec![f32::NAN; 4];
/// monarch::multiply(&Device::cpu(), &w, (&x).into(), Rows::contiguous(1, 4), (&mut y).into(), 4)?;
/// assert_eq!(y, [10.0; 4]);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn multiply<T: Element>(
    dev: &Device,
    w: &Weights<'_, T>,
    x: Buf<'_, T>,
    x_rows: Rows,
    mut y: BufMut<'_, T>,
    y_row_stride: usize,
) -> Result<()> {
    product(dev, w, &x, x_rows, &mut y, y_row_stride, Mode::Forward)
}

/// `y = M^T x + bias` for every row of `x: [tokens, n_out]`, written to `y: [tokens, n_in]`:
/// the transpose multiply (`dx` of the backward pass). On a GPU it runs on CUDA cores (the
/// simt kernel), not tensor cores.
///
/// ```
/// use attnkit::monarch::{self, MonarchShape, Rows, Weights};
/// use attnkit::Device;
/// let shape = MonarchShape::new([2, 1, 3], [1, 2, 2]).unwrap(); // 2 x 6
/// let (w1, w2) = (vec![1.0f32; 6], vec![1.0f32; 4]);
/// let w = Weights { shape, w1: (&w1).into(), w2: (&w2).into(), bias: None };
/// let mut y = vec![f32::NAN; 6];
/// monarch::multiply_transpose(&Device::cpu(), &w, (&[1.0f32, 1.0][..]).into(),
///     Rows::contiguous(1, 2), (&mut y).into(), 6)?;
/// assert_eq!(y, [2.0; 6]);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn multiply_transpose<T: Element>(
    dev: &Device,
    w: &Weights<'_, T>,
    x: Buf<'_, T>,
    x_rows: Rows,
    mut y: BufMut<'_, T>,
    y_row_stride: usize,
) -> Result<()> {
    product(dev, w, &x, x_rows, &mut y, y_row_stride, Mode::Transpose)
}

/// A width check: `Error::Shape` naming `arg` unless `got == want`; `what` says what
/// `want` is.
pub(crate) fn expect_width(arg: &'static str, got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(Error::Shape {
            arg,
            detail: format!("width {got} is not {what} = {want}"),
        });
    }
    Ok(())
}

/// [`multiply`] or [`multiply_transpose`]: x exactly as wide as the product's input, y
/// written over its whole output width.
fn product<T: Element>(
    dev: &Device,
    w: &Weights<'_, T>,
    x: &Buf<'_, T>,
    x_rows: Rows,
    y: &mut BufMut<'_, T>,
    y_row_stride: usize,
    mode: Mode,
) -> Result<()> {
    let s = w.shape;
    let (n_x, n_y, what) = match mode {
        Mode::Forward => (s.n_in(), s.n_out(), format!("k*p of w1 {:?}", s.w1_dims())),
        Mode::Transpose => (s.n_out(), s.n_in(), format!("l*s of w2 {:?}", s.w2_dims())),
    };
    expect_width("x", x_rows.width, n_x, &what)?;
    let y_rows = Rows {
        tokens: x_rows.tokens,
        width: n_y,
        row_stride: y_row_stride,
    };
    run(dev, w, x, x_rows, y, y_rows, mode)
}

/// Checks the weights of `w` for `mode` (lengths at least the shape's; a bias at least the
/// output width).
fn check_weights<T>(w: &Weights<'_, T>, out_width: usize) -> Result<()> {
    let s = &w.shape;
    for (arg, got, want, dims) in [
        ("w1", w.w1.len(), s.w1_len(), s.w1_dims()),
        ("w2", w.w2.len(), s.w2_len(), s.w2_dims()),
    ] {
        if got < want {
            return Err(Error::Shape {
                arg,
                detail: format!("holds {got} elements, {dims:?} needs at least {want}"),
            });
        }
    }
    if let Some(b) = &w.bias {
        if b.len() < out_width {
            return Err(Error::Shape {
                arg: "bias",
                detail: format!(
                    "holds {} elements, less than the output width {out_width}",
                    b.len()
                ),
            });
        }
    }
    Ok(())
}

/// The first `n` elements of a checked host buffer: the part a call touches, so a longer
/// buffer's tail stays as it was.
pub(crate) fn prefix<'a, T>(arg: &'static str, buf: &'a [T], n: usize) -> Result<&'a [T]> {
    let len = buf.len();
    buf.get(..n).ok_or_else(|| Error::Shape {
        arg,
        detail: format!("holds {len} elements, needs at least {n}"),
    })
}

/// [`prefix`], mutable.
pub(crate) fn prefix_mut<'a, T>(
    arg: &'static str,
    buf: &'a mut [T],
    n: usize,
) -> Result<&'a mut [T]> {
    let len = buf.len();
    buf.get_mut(..n).ok_or_else(|| Error::Shape {
        arg,
        detail: format!("holds {len} elements, needs at least {n}"),
    })
}

/// The checked core of [`multiply`], [`multiply_transpose`] and [`MonarchLinear`]: `x_rows`
/// may be narrower than the product's input (missing columns read as zero: the layer's
/// padding) and `y_rows` narrower than its output (extra columns dropped).
pub(crate) fn run<T: Element>(
    dev: &Device,
    w: &Weights<'_, T>,
    x: &Buf<'_, T>,
    x_rows: Rows,
    y: &mut BufMut<'_, T>,
    y_rows: Rows,
    mode: Mode,
) -> Result<()> {
    let (n_x, n_y) = match mode {
        Mode::Forward => (w.shape.n_in(), w.shape.n_out()),
        Mode::Transpose => (w.shape.n_out(), w.shape.n_in()),
    };
    // The bias covers the columns written (the layer's unpadded outputs).
    check_weights(w, y_rows.width)?;
    if x_rows.width > n_x || y_rows.width > n_y {
        return Err(Error::Shape {
            arg: if x_rows.width > n_x { "x" } else { "y" },
            detail: format!(
                "widths x {} / y {} exceed the product's {n_x} / {n_y}",
                x_rows.width, y_rows.width
            ),
        });
    }
    x_rows.check("x", "x_row_stride", x.len())?;
    y_rows.check("y", "y_row_stride", y.len())?;
    if x_rows.tokens == 0 {
        return Ok(());
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            let bias = match &w.bias {
                Some(b) => Some(prefix("bias", b.host("bias")?, y_rows.width)?),
                None => None,
            };
            cpu::run(
                *threads,
                w.shape,
                prefix("w1", w.w1.host("w1")?, w.shape.w1_len())?,
                prefix("w2", w.w2.host("w2")?, w.shape.w2_len())?,
                bias,
                x.host("x")?,
                x_rows,
                y.host_mut("y")?,
                y_rows,
                mode,
            );
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::product(c, w, w.bias.as_ref(), (x, x_rows), (y, y_rows), mode),
    }
}

/// Gradient buffers of [`backward`]: `dx` in the element type, the weight gradients in f32
/// (overwritten, not accumulated).
#[derive(Debug)]
pub struct Grads<'a, T> {
    /// `[tokens, n_in]`, row stride `dx_row_stride`: `dy M` (the transpose multiply).
    pub dx: BufMut<'a, T>,
    /// Row stride of `dx` (elements).
    pub dx_row_stride: usize,
    /// `[k, q, p]`: `sum over tokens of dh[i*q + c] * x[i*p + pp]`.
    pub dw1: BufMut<'a, f32>,
    /// `[l, s, r]`: `sum over tokens of dy[t*l + j] * h[rr*l + j]`.
    pub dw2: BufMut<'a, f32>,
    /// `[n_out]`: `sum over tokens of dy`, when the layer has a bias.
    pub dbias: Option<BufMut<'a, f32>>,
    /// Scratch of at least [`backward_workspace_len`] f32: the recomputed intermediate `h` and
    /// its gradient `dh`, `[tokens, n_mid]` each (the caller owns it: no allocation inside).
    pub workspace: BufMut<'a, f32>,
}

/// Elements of f32 scratch [`backward`] needs for `tokens` tokens: `2 * tokens * n_mid`
/// (None on overflow).
///
/// ```
/// let s = attnkit::monarch::MonarchShape::square(16, 4).unwrap();
/// assert_eq!(attnkit::monarch::backward_workspace_len(s, 3), Some(96));
/// ```
pub fn backward_workspace_len(shape: MonarchShape, tokens: usize) -> Option<usize> {
    tokens.checked_mul(shape.n_mid())?.checked_mul(2)
}

/// The backward pass of `y = M x + bias`: given `x` and `dy = dL/dy` (`[tokens, n_out]`, row
/// stride `dy_row_stride`), writes `dx`, `dw1`, `dw2` (and `dbias`). The intermediate `h` is
/// recomputed into the caller's workspace with its gradient `dh` (both rounded to `T`, as the
/// forward pass rounds `h`); each weight gradient entry then sums its outer-product terms over
/// the tokens in f32; `dx = M^T dy` is the transpose product. On a GPU, bf16/f16: two
/// launches, every product on tensor cores in 64 x 64 tiles (h and dh, then `dw1`, `dw2` as
/// sums over tokens 32 a step, and `dx` from `dh`); f32: three launches on CUDA cores, each
/// gradient entry summing the tokens in order, as the CPU path does.
///
/// ```
/// use attnkit::monarch::{self, Grads, MonarchShape, Rows, Weights};
/// use attnkit::Device;
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let (w1, w2) = (vec![1.0f32; 8], vec![1.0f32; 8]);
/// let w = Weights { shape, w1: (&w1).into(), w2: (&w2).into(), bias: None };
/// let (x, dy) = (vec![1.0f32; 4], vec![1.0f32; 4]);
/// let (mut dx, mut dw1, mut dw2) = (vec![0.0f32; 4], vec![0.0f32; 8], vec![0.0f32; 8]);
/// let mut ws = vec![0.0f32; monarch::backward_workspace_len(shape, 1).unwrap()];
/// let g = Grads { dx: (&mut dx).into(), dx_row_stride: 4, dw1: (&mut dw1).into(),
///     dw2: (&mut dw2).into(), dbias: None, workspace: (&mut ws).into() };
/// monarch::backward(&Device::cpu(), &w, (&x).into(), Rows::contiguous(1, 4), (&dy).into(), 4, g)?;
/// assert_eq!(dx, [4.0; 4]);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn backward<T: Element>(
    dev: &Device,
    w: &Weights<'_, T>,
    x: Buf<'_, T>,
    x_rows: Rows,
    dy: Buf<'_, T>,
    dy_row_stride: usize,
    mut g: Grads<'_, T>,
) -> Result<()> {
    let shape = w.shape;
    check_weights(w, shape.n_out())?;
    expect_width("x", x_rows.width, shape.n_in(), "k*p")?;
    let tokens = x_rows.tokens;
    x_rows.check("x", "x_row_stride", x.len())?;
    let dy_rows = Rows {
        tokens,
        width: shape.n_out(),
        row_stride: dy_row_stride,
    };
    dy_rows.check("dy", "dy_row_stride", dy.len())?;
    let dx_rows = Rows {
        tokens,
        width: shape.n_in(),
        row_stride: g.dx_row_stride,
    };
    dx_rows.check("dx", "dx_row_stride", g.dx.len())?;
    for (arg, got, want) in [
        ("dw1", g.dw1.len(), shape.w1_len()),
        ("dw2", g.dw2.len(), shape.w2_len()),
    ] {
        if got < want {
            return Err(Error::Shape {
                arg,
                detail: format!("holds {got} elements, needs at least {want}"),
            });
        }
    }
    let need = backward_workspace_len(shape, tokens)
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| Error::Shape {
            arg: "workspace",
            detail: format!("2 * {tokens} tokens * {} overflows", shape.n_mid()),
        })?;
    if g.workspace.len() < need {
        return Err(Error::Shape {
            arg: "workspace",
            detail: format!(
                "holds {}, 2 * tokens * n_mid = {need} needed",
                g.workspace.len()
            ),
        });
    }
    if let Some(db) = &g.dbias {
        if db.len() < shape.n_out() {
            return Err(Error::Shape {
                arg: "dbias",
                detail: format!(
                    "holds {} elements, needs at least n_out = {}",
                    db.len(),
                    shape.n_out()
                ),
            });
        }
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            // Only the prefixes the call touches reach the CPU code (tails untouched).
            let dbias = match &mut g.dbias {
                Some(b) => Some(prefix_mut("dbias", b.host_mut("dbias")?, shape.n_out())?),
                None => None,
            };
            cpu::backward(
                *threads,
                shape,
                prefix("w1", w.w1.host("w1")?, shape.w1_len())?,
                prefix("w2", w.w2.host("w2")?, shape.w2_len())?,
                (x.host("x")?, x_rows),
                (dy.host("dy")?, dy_rows),
                (g.dx.host_mut("dx")?, dx_rows),
                prefix_mut("dw1", g.dw1.host_mut("dw1")?, shape.w1_len())?,
                prefix_mut("dw2", g.dw2.host_mut("dw2")?, shape.w2_len())?,
                dbias,
                prefix_mut("workspace", g.workspace.host_mut("workspace")?, need)?,
            );
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::backward(c, w, (&x, x_rows), (&dy, dy_rows), dx_rows, &mut g),
    }
}
