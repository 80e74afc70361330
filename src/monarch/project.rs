//! Dense <-> Monarch on the host: [`to_dense`] materialises a Monarch matrix, [`project`]
//! finds the closest Monarch matrix to a dense one in Frobenius norm.
//!
//! Why the projection is a set of small SVDs (Monarch paper, Theorem 1; Su Jianlin's post):
//! entry `M[t*l + j][i*p + pp]` only involves `w1[i][c][pp]` and `w2[j][t][(i*q + c) / l]` for
//! the `c` with `(i*q + c) % l == j`. So the `s x p` slice `M_{j,i}` (rows `t*l + j`, columns
//! `i*p + pp`) is a sum of `|C(i,j)|` outer products, one per such `c`, and no weight appears
//! in two slices. Minimising `||A - M||_F` therefore splits into one best rank-`|C(i,j)|`
//! approximation per slice: a truncated SVD (rank 1 for the paper's `b = sqrt(n)` shapes).

use super::{MAX_HOST_ELEMENTS, MonarchShape};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// `a * b` when it is at most [`MAX_HOST_ELEMENTS`], else a Shape error naming `shape`
/// (`what` says which allocation).
fn host_elements(shape: MonarchShape, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .filter(|&n| n <= MAX_HOST_ELEMENTS)
        .ok_or_else(|| Error::Shape {
            arg: "shape",
            detail: format!(
                "{what} of {a} x {b} elements for {shape:?} exceeds MAX_HOST_ELEMENTS = \
                 {MAX_HOST_ELEMENTS}"
            ),
        })
}

/// A zeroed vector of `n` elements, `n` already bounded: `try_reserve`, so a request the
/// machine cannot hold is an error naming `shape`, not an abort.
fn zeros<T: Clone + Default>(n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::Shape {
        arg: "shape",
        detail: format!("no memory for {n} elements"),
    })?;
    v.resize(n, T::default());
    Ok(v)
}

/// `M` as a dense row-major `[n_out, n_in]` f32 matrix, in the block form (each pair
/// `(i, c)` scatters one outer product `w2[j][:][rr] w1[i][c][:]^T` into its slice).
///
/// Errors: [`Error::Shape`] naming `w1` or `w2` if it holds fewer elements than `shape` needs
/// (a longer one's tail is not read), naming `shape` if `n_out * n_in` exceeds
/// [`MAX_HOST_ELEMENTS`](super::MAX_HOST_ELEMENTS) or cannot be allocated.
///
/// ```
/// use attnkit::monarch::{MonarchShape, to_dense};
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let m = to_dense(shape, &[1.0f32; 8], &[1.0f32; 8]).unwrap();
/// assert_eq!(m.iter().sum::<f32>(), 16.0);
/// ```
pub fn to_dense<T: Element>(shape: MonarchShape, w1: &[T], w2: &[T]) -> Result<Vec<f32>> {
    check_len("w1", w1.len(), shape.w1_len())?;
    check_len("w2", w2.len(), shape.w2_len())?;
    let [k, q, p] = shape.w1_dims();
    let [l, s, r] = shape.w2_dims();
    let n_in = shape.n_in();
    let mut m = zeros::<f32>(host_elements(
        shape,
        "the dense matrix",
        shape.n_out(),
        n_in,
    )?)?;
    for i in 0..k {
        for c in 0..q {
            let (rr, j) = ((i * q + c) / l, (i * q + c) % l);
            let v = &w1[(i * q + c) * p..][..p];
            for t in 0..s {
                let u = w2[(j * s + t) * r + rr].to_f32();
                let row = &mut m[(t * l + j) * n_in + i * p..][..p];
                for (d, w) in row.iter_mut().zip(v) {
                    *d += u * w.to_f32();
                }
            }
        }
    }
    Ok(m)
}

/// The crate's length rule: at least what the call reads.
fn check_len(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::Shape {
            arg,
            detail: format!("holds {got} elements, the shape needs at least {want}"),
        });
    }
    Ok(())
}

/// Stopping rule of the power iterations in [`project`].
///
/// ```
/// let o = attnkit::monarch::ProjectOptions::default();
/// assert!(o.tol > 0.0 && o.max_iters > 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProjectOptions {
    /// Stop a singular value's power iteration when its estimate `sigma^2` changes by at most
    /// `tol * sigma^2` in one step (the Frobenius error is second order in the vector's error,
    /// so it is then within about `tol` of optimal, relative).
    pub tol: f64,
    /// Give up on one singular vector after this many steps (reported in [`Projection`]).
    pub max_iters: usize,
}

impl Default for ProjectOptions {
    fn default() -> Self {
        ProjectOptions {
            tol: 1e-12,
            max_iters: 2000,
        }
    }
}

/// The result of [`project`]: the Monarch factors and how the iterations went.
#[derive(Clone, Debug)]
pub struct Projection {
    /// The block structure projected onto.
    pub shape: MonarchShape,
    /// `[k, q, p]`.
    pub w1: Vec<f32>,
    /// `[l, s, r]`.
    pub w2: Vec<f32>,
    /// Most power-iteration steps any singular vector took.
    pub max_steps: usize,
    /// Every singular vector met the tolerance within `max_iters`.
    pub converged: bool,
}

/// The Monarch matrix of `shape` closest to `dense` (`[n_out, n_in]`, row-major) in Frobenius
/// norm: for each slice `(j, i)` (rows `t*l + j`, columns `i*p + pp`) a truncated SVD of rank
/// `|{c : (i*q + c) % l == j}|` by power iteration on the slice's Gram matrix with deflation,
/// in f64. Each singular value is split evenly between the two factors (`sqrt(sigma)` each).
///
/// Errors: [`Error::Shape`] naming `dense` if it holds fewer than `n_out * n_in` elements (a
/// longer one's tail is not read), naming `shape` if the dense matrix, a factor or a slice's
/// Gram matrix (`p * p`) exceeds [`MAX_HOST_ELEMENTS`](super::MAX_HOST_ELEMENTS);
/// [`Error::Value`] naming `opts` for a tolerance that is not positive and finite or zero
/// iterations.
///
/// ```
/// use attnkit::monarch::{MonarchShape, ProjectOptions, project, to_dense};
/// let shape = MonarchShape::square(9, 3).unwrap(); // b = sqrt(n): rank-1 slices
/// let w1: Vec<f32> = (0..27).map(|i| (i as f32 * 0.37).sin()).collect();
/// let w2: Vec<f32> = (0..27).map(|i| (i as f32 * 0.91).cos()).collect();
/// let m = to_dense(shape, &w1, &w2)?;
/// let proj = project(shape, &m, ProjectOptions::default())?;
/// let back = to_dense(shape, &proj.w1, &proj.w2)?;
/// assert!(m.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-4));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn project(shape: MonarchShape, dense: &[f32], opts: ProjectOptions) -> Result<Projection> {
    let (n_in, n_out) = (shape.n_in(), shape.n_out());
    check_len(
        "dense",
        dense.len(),
        host_elements(shape, "the dense matrix", n_out, n_in)?,
    )?;
    if !(opts.tol.is_finite() && opts.tol > 0.0) || opts.max_iters == 0 {
        return Err(Error::Value {
            arg: "opts",
            detail: format!(
                "tol {} must be positive and finite, max_iters {} at least 1",
                opts.tol, opts.max_iters
            ),
        });
    }
    let [k, q, p] = shape.w1_dims();
    let [l, s, r] = shape.w2_dims();
    // The factors and the Gram matrices are not bounded by `dense` (a slice of few rows can
    // have many columns, a block many intermediate values): bounded here.
    host_elements(shape, "a slice's Gram matrix", p, p)?;
    let mut w1 = zeros::<f32>(host_elements(shape, "w1", shape.w1_len(), 1)?)?;
    let mut w2 = zeros::<f32>(host_elements(shape, "w2", shape.w2_len(), 1)?)?;
    let (mut max_steps, mut converged) = (0usize, true);
    // s * p <= n_out * n_in, bounded above.
    let mut slice = zeros::<f64>(s * p)?;
    for j in 0..l {
        for i in 0..k {
            // A slice has at most min(s, p) nonzero singular values: the pairs past them keep
            // zero weights, so they need no entry (and q may be large).
            let cs: Vec<usize> = (0..q)
                .filter(|c| (i * q + c) % l == j)
                .take(s.min(p))
                .collect();
            if cs.is_empty() {
                continue;
            }
            for t in 0..s {
                for pp in 0..p {
                    slice[t * p + pp] = dense[(t * l + j) * n_in + i * p + pp] as f64;
                }
            }
            let triplets = truncated_svd(&slice, s, p, cs.len(), opts)?;
            for (&c, tri) in cs.iter().zip(&triplets) {
                max_steps = max_steps.max(tri.steps);
                converged &= tri.converged;
                let root = tri.sigma.sqrt();
                let rr = (i * q + c) / l;
                for (pp, v) in tri.v.iter().enumerate() {
                    w1[(i * q + c) * p + pp] = (root * v) as f32;
                }
                for (t, u) in tri.u.iter().enumerate() {
                    w2[(j * s + t) * r + rr] = (root * u) as f32;
                }
            }
        }
    }
    Ok(Projection {
        shape,
        w1,
        w2,
        max_steps,
        converged,
    })
}

/// One singular triplet: `A v = sigma u`, unit `u` and `v`.
struct Triplet {
    sigma: f64,
    u: Vec<f64>,
    v: Vec<f64>,
    steps: usize,
    converged: bool,
}

/// The top `rank` singular triplets of `a` (`[rows, cols]`), by power iteration on
/// `G = A^T A` with deflation `G -= sigma^2 v v^T` after each one.
fn truncated_svd(
    a: &[f64],
    rows: usize,
    cols: usize,
    rank: usize,
    opts: ProjectOptions,
) -> Result<Vec<Triplet>> {
    // cols * cols was bounded by `project`.
    let mut g = zeros::<f64>(cols * cols)?;
    for x in 0..cols {
        for y in x..cols {
            let v: f64 = (0..rows).map(|t| a[t * cols + x] * a[t * cols + y]).sum();
            g[x * cols + y] = v;
            g[y * cols + x] = v;
        }
    }
    let scale: f64 = (0..cols).map(|x| g[x * cols + x]).sum();
    let mut out = Vec::with_capacity(rank.min(cols).min(rows));
    for n in 0..rank.min(cols).min(rows) {
        // A start vector that no structured matrix is orthogonal to in practice (a fixed
        // pseudo-random sequence), so results are reproducible.
        let mut v: Vec<f64> = (0..cols)
            .map(|x| ((x as f64 + 1.0) * 12.9898 + n as f64 * 78.233).sin() + 0.1)
            .collect();
        normalise(&mut v);
        let (mut lambda, mut steps, mut converged) = (0.0f64, 0usize, false);
        let mut gv = vec![0.0f64; cols];
        while steps < opts.max_iters {
            steps += 1;
            for (x, o) in gv.iter_mut().enumerate() {
                *o = (0..cols).map(|y| g[x * cols + y] * v[y]).sum();
            }
            let next: f64 = v.iter().zip(&gv).map(|(a, b)| a * b).sum();
            let norm = normalise(&mut gv);
            std::mem::swap(&mut v, &mut gv);
            // A zero (deflated) Gram matrix: the remaining singular values are 0.
            if norm <= 1e-300 || next <= scale * 1e-30 {
                lambda = 0.0;
                converged = true;
                break;
            }
            let done = (next - lambda).abs() <= opts.tol * next;
            lambda = next;
            if done {
                converged = true;
                break;
            }
        }
        let sigma = lambda.max(0.0).sqrt();
        let mut u: Vec<f64> = (0..rows)
            .map(|t| (0..cols).map(|x| a[t * cols + x] * v[x]).sum())
            .collect();
        if sigma > 0.0 {
            u.iter_mut().for_each(|x| *x /= sigma);
        }
        for x in 0..cols {
            for y in 0..cols {
                g[x * cols + y] -= lambda * v[x] * v[y];
            }
        }
        out.push(Triplet {
            sigma,
            u,
            v,
            steps,
            converged,
        });
    }
    Ok(out)
}

/// Scales `v` to unit length; returns its former norm.
fn normalise(v: &mut [f64]) -> f64 {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    norm
}
