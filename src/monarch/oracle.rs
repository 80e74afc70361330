//! The f64 oracle of the Monarch family: slow by design.
//!
//! It builds the dense `n_out x n_in` matrix entry by entry from the definition (fly's
//! `blockdiag_butterfly_multiply`: `h[i*q + c] = sum_p w1[i][c][p] x[i*p + p]`,
//! `y[t*l + j] = sum_r w2[j][t][r] h[r*l + j]`) and multiplies with it, materialising
//! everything. Tests, benches and the tour compare the real implementations against it. It is
//! a reference, not a checked API: slice lengths are asserted (a mismatch panics).

use super::MonarchShape;

/// The dense matrix `M` (`[n_out, n_in]`, row-major) of a Monarch matrix, entry by entry:
/// `M[t*l + j][i*p + pp] = sum over c < q with (i*q + c) % l == j of
/// w2[j][t][(i*q + c) / l] * w1[i][c][pp]`.
///
/// ```
/// use attnkit::monarch::{MonarchShape, oracle};
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let w1 = vec![1.0; shape.w1_len()];
/// let w2 = vec![1.0; shape.w2_len()];
/// assert_eq!(oracle::dense(shape, &w1, &w2).len(), 16);
/// ```
pub fn dense(shape: MonarchShape, w1: &[f64], w2: &[f64]) -> Vec<f64> {
    let [k, q, p] = shape.w1_dims();
    let [l, s, r] = shape.w2_dims();
    let (n_in, n_out) = (shape.n_in(), shape.n_out());
    assert_eq!(w1.len(), k * q * p, "oracle::dense: w1 length");
    assert_eq!(w2.len(), l * s * r, "oracle::dense: w2 length");
    let mut m = vec![0.0f64; n_out * n_in];
    for row in 0..n_out {
        let (t, j) = (row / l, row % l);
        for col in 0..n_in {
            let (i, pp) = (col / p, col % p);
            let mut acc = 0.0;
            for c in 0..q {
                let mid = i * q + c;
                if mid % l == j {
                    acc += w2[(j * s + t) * r + mid / l] * w1[(i * q + c) * p + pp];
                }
            }
            m[row * n_in + col] = acc;
        }
    }
    m
}

/// `y = M x + bias` for `x: [tokens, n_in]` (contiguous rows), through the dense matrix.
///
/// ```
/// use attnkit::monarch::{MonarchShape, oracle};
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let (w1, w2) = (vec![0.5; shape.w1_len()], vec![2.0; shape.w2_len()]);
/// let y = oracle::multiply(shape, &w1, &w2, None, &[1.0; 4], 1);
/// assert_eq!(y, [4.0; 4]);
/// ```
pub fn multiply(
    shape: MonarchShape,
    w1: &[f64],
    w2: &[f64],
    bias: Option<&[f64]>,
    x: &[f64],
    tokens: usize,
) -> Vec<f64> {
    matvec(
        &dense(shape, w1, w2),
        shape.n_out(),
        shape.n_in(),
        bias,
        x,
        tokens,
        false,
    )
}

/// `y = M^T x + bias` for `x: [tokens, n_out]` (contiguous rows), through the dense matrix.
///
/// ```
/// use attnkit::monarch::{MonarchShape, oracle};
/// let shape = MonarchShape::square(4, 2).unwrap();
/// let (w1, w2) = (vec![0.5; shape.w1_len()], vec![2.0; shape.w2_len()]);
/// assert_eq!(oracle::multiply_transpose(shape, &w1, &w2, None, &[1.0; 4], 1), [4.0; 4]);
/// ```
pub fn multiply_transpose(
    shape: MonarchShape,
    w1: &[f64],
    w2: &[f64],
    bias: Option<&[f64]>,
    x: &[f64],
    tokens: usize,
) -> Vec<f64> {
    matvec(
        &dense(shape, w1, w2),
        shape.n_out(),
        shape.n_in(),
        bias,
        x,
        tokens,
        true,
    )
}

/// Rows of `x` times `m` (`[rows, cols]`) or its transpose, plus bias.
fn matvec(
    m: &[f64],
    rows: usize,
    cols: usize,
    bias: Option<&[f64]>,
    x: &[f64],
    tokens: usize,
    transpose: bool,
) -> Vec<f64> {
    let (n_x, n_y) = if transpose {
        (rows, cols)
    } else {
        (cols, rows)
    };
    assert_eq!(x.len(), tokens * n_x, "oracle: x length");
    let mut y = vec![0.0f64; tokens * n_y];
    for tok in 0..tokens {
        for o in 0..n_y {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for e in 0..n_x {
                let a = if transpose {
                    m[e * cols + o]
                } else {
                    m[o * cols + e]
                };
                acc += a * x[tok * n_x + e];
            }
            y[tok * n_y + o] = acc;
        }
    }
    y
}
