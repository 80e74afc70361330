//! Fuzz targets of `attnkit::monarch` (see main.rs for the harness): the shape constructors
//! and helpers, multiply, multiply_transpose, backward, to_dense, project and MonarchLinear,
//! with random and hostile dimensions, strides and buffer lengths. Every `Ok` must have
//! written every output element it owns and left what lies between and after the rows (and
//! each buffer's tail) as poisoned as it was.

use crate::common::{poisoned, random};
use crate::{Outcome, float, huge, run, size};
use attnkit::monarch::{self, Grads, MonarchLinear, MonarchShape, ProjectOptions, Rows, Weights};
use attnkit::{Bf16, Device, Element, F16};
use rand::{Rng, rngs::StdRng};

/// Most elements one fuzz buffer may have: sizes past it get short buffers (an error is due).
const CAP: usize = 1 << 16;

/// A buffer length for `need` elements (None: overflowed): mostly exact, sometimes longer,
/// shorter or empty; short when `need` is past what a test may allocate.
fn len_for(rng: &mut StdRng, need: Option<usize>) -> usize {
    match need {
        Some(n) if !huge(n) && n <= CAP => match rng.random_range(0..100) {
            0..85 => n,
            85..94 => n + rng.random_range(1..4),
            94..98 => n.saturating_sub(1),
            _ => rng.random_range(0..=n + 1),
        },
        _ => rng.random_range(0..32),
    }
}

fn input<T: Element>(rng: &mut StdRng, need: Option<usize>) -> Vec<T> {
    let n = len_for(rng, need);
    random(rng, n)
}

fn output<T: Element>(rng: &mut StdRng, need: Option<usize>) -> Vec<T> {
    let n = len_for(rng, need);
    poisoned(n)
}

/// A dimension: mostly small, sometimes 0 or hostile.
fn dim(rng: &mut StdRng) -> usize {
    if rng.random_bool(0.93) {
        rng.random_range(1..=6)
    } else {
        size(rng, 8)
    }
}

/// Random `w1`/`w2` dims, chaining (`l*r == k*q`) most of the time.
fn dims(rng: &mut StdRng) -> ([usize; 3], [usize; 3]) {
    let (k, q, p) = (dim(rng), dim(rng), dim(rng));
    let s = dim(rng);
    let mid = k.saturating_mul(q);
    let (l, r) = if rng.random_bool(0.85) && mid > 0 && mid <= 64 {
        let divisors: Vec<usize> = (1..=mid).filter(|x| mid % x == 0).collect();
        let l = divisors[rng.random_range(0..divisors.len())];
        (l, mid / l)
    } else {
        (dim(rng), dim(rng))
    };
    ([k, q, p], [l, s, r])
}

/// A valid shape small enough to run (the fuzz of the other entry points starts from one).
fn small_shape(rng: &mut StdRng) -> MonarchShape {
    loop {
        let (w1, w2) = dims(rng);
        if let Ok(s) = MonarchShape::new(w1, w2) {
            if s.w1_len() <= 512 && s.w2_len() <= 512 && s.n_in() * s.n_out() <= 4096 {
                return s;
            }
        }
    }
}

/// Rows of `tokens` x `width` at a random stride (mostly contiguous or a little wider).
fn rows(rng: &mut StdRng, tokens: usize, width: usize) -> Rows {
    let row_stride = match rng.random_range(0..20) {
        0..12 => width,
        12..17 => width.saturating_add(rng.random_range(1..4)),
        17 => width.saturating_sub(1),
        _ => size(rng, 16),
    };
    Rows {
        tokens,
        width,
        row_stride,
    }
}

/// Every element of each row of `v` (per `r`) written, everything else still NaN.
fn rows_written<T: Element>(v: &[T], r: Rows) -> bool {
    v.iter().enumerate().all(|(i, x)| {
        let in_row = r.row_stride > 0 && i / r.row_stride < r.tokens && i % r.row_stride < r.width;
        x.to_f32().is_nan() != in_row
    })
}

/// `v[..n]` written, `v[n..]` still NaN.
fn written_exactly(v: &[f32], n: usize) -> bool {
    n <= v.len() && crate::written(&v[..n]) && v[n..].iter().all(|x| x.is_nan())
}

#[test]
fn fuzz_shape() {
    run("monarch::MonarchShape", 6000, |rng| {
        let s = if rng.random_bool(0.8) {
            let (w1, w2) = dims(rng);
            MonarchShape::new(w1, w2)?
        } else {
            MonarchShape::square(size(rng, 64), size(rng, 8))?
        };
        // Every helper of a valid shape is overflow-free and consistent.
        assert_eq!(s.n_mid(), s.w1_dims()[0] * s.w1_dims()[1]);
        assert!(s.w1_len() <= i32::MAX as usize && s.w2_len() <= i32::MAX as usize);
        let tokens = size(rng, 100);
        assert!(s.flops(tokens) >= 0.0);
        let _ = monarch::backward_workspace_len(s, tokens);
        let r = Rows::contiguous(tokens, s.n_in());
        let _ = r.min_len();
        let _ = Rows {
            row_stride: size(rng, 100),
            ..r
        }
        .min_len();
        Ok(())
    });
}

fn product_case<T: Element>(rng: &mut StdRng, transpose: bool) -> Outcome {
    let dev = Device::cpu();
    let s = small_shape(rng);
    let (n_x, n_y) = if transpose {
        (s.n_out(), s.n_in())
    } else {
        (s.n_in(), s.n_out())
    };
    let tokens = size(rng, 6);
    let width = if rng.random_bool(0.9) { n_x } else { dim(rng) };
    let xr = rows(rng, tokens, width);
    let yr = rows(rng, tokens, n_y);
    let w1 = input::<T>(rng, Some(s.w1_len()));
    let w2 = input::<T>(rng, Some(s.w2_len()));
    let bias = rng.random_bool(0.4).then(|| input::<T>(rng, Some(n_y)));
    let x = input::<T>(rng, xr.min_len());
    let mut y = output::<T>(rng, yr.min_len());
    let w = Weights {
        shape: s,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: bias.as_ref().map(|b| b.into()),
    };
    if transpose {
        monarch::multiply_transpose(&dev, &w, (&x).into(), xr, (&mut y).into(), yr.row_stride)?;
    } else {
        monarch::multiply(&dev, &w, (&x).into(), xr, (&mut y).into(), yr.row_stride)?;
    }
    assert!(rows_written(&y, yr), "y: {s:?} {xr:?} {yr:?}");
    Ok(())
}

fn by_dtype(rng: &mut StdRng, f: [fn(&mut StdRng) -> Outcome; 3]) -> Outcome {
    match rng.random_range(0..10) {
        0 => f[1](rng),
        1 => f[2](rng),
        _ => f[0](rng),
    }
}

#[test]
fn fuzz_multiply() {
    run("monarch::multiply", 3000, |rng| {
        by_dtype(
            rng,
            [
                |r| product_case::<f32>(r, false),
                |r| product_case::<F16>(r, false),
                |r| product_case::<Bf16>(r, false),
            ],
        )
    });
}

#[test]
fn fuzz_multiply_transpose() {
    run("monarch::multiply_transpose", 2500, |rng| {
        by_dtype(
            rng,
            [
                |r| product_case::<f32>(r, true),
                |r| product_case::<F16>(r, true),
                |r| product_case::<Bf16>(r, true),
            ],
        )
    });
}

fn backward_case<T: Element>(rng: &mut StdRng) -> Outcome {
    let dev = Device::cpu();
    let s = small_shape(rng);
    let tokens = size(rng, 6);
    let xr = rows(rng, tokens, s.n_in());
    let dyr = rows(rng, tokens, s.n_out());
    let dxr = rows(rng, tokens, s.n_in());
    let w1 = input::<T>(rng, Some(s.w1_len()));
    let w2 = input::<T>(rng, Some(s.w2_len()));
    let x = input::<T>(rng, xr.min_len());
    let dy = input::<T>(rng, dyr.min_len());
    let mut dx = output::<T>(rng, dxr.min_len());
    let mut dw1 = output::<f32>(rng, Some(s.w1_len()));
    let mut dw2 = output::<f32>(rng, Some(s.w2_len()));
    let mut db = rng
        .random_bool(0.4)
        .then(|| output::<f32>(rng, Some(s.n_out())));
    let ws_need = monarch::backward_workspace_len(s, tokens);
    let mut ws = output::<f32>(rng, ws_need);
    let w = Weights {
        shape: s,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: None,
    };
    let g = Grads {
        dx: (&mut dx).into(),
        dx_row_stride: dxr.row_stride,
        dw1: (&mut dw1).into(),
        dw2: (&mut dw2).into(),
        dbias: db.as_mut().map(|b| b.into()),
        workspace: (&mut ws).into(),
    };
    monarch::backward(&dev, &w, (&x).into(), xr, (&dy).into(), dyr.row_stride, g)?;
    assert!(rows_written(&dx, dxr), "dx: {s:?} {dxr:?}");
    assert!(written_exactly(&dw1, s.w1_len()), "dw1: {s:?}");
    assert!(written_exactly(&dw2, s.w2_len()), "dw2: {s:?}");
    if let Some(db) = &db {
        assert!(written_exactly(db, s.n_out()), "dbias: {s:?}");
    }
    if let Some(n) = ws_need {
        assert!(ws[n..].iter().all(|x| x.is_nan()), "workspace tail written");
    }
    Ok(())
}

#[test]
fn fuzz_backward() {
    run("monarch::backward", 2500, |rng| {
        by_dtype(
            rng,
            [
                backward_case::<f32>,
                backward_case::<F16>,
                backward_case::<Bf16>,
            ],
        )
    });
}

/// A shape for the dense conversions: small mostly, sometimes valid but far too big to
/// materialise (which must be refused, never allocated), sometimes from hostile dims.
fn dense_shape(rng: &mut StdRng) -> attnkit::Result<MonarchShape> {
    match rng.random_range(0..10) {
        0 => {
            let big = [1 << 10, 1 << 12, 1 << 15][rng.random_range(0..3)];
            MonarchShape::new([big, 1, big], [big, big, 1])
        }
        1 => {
            let (w1, w2) = dims(rng);
            MonarchShape::new(w1, w2)
        }
        _ => Ok(small_shape(rng)),
    }
}

/// Whether materialising `s` stays within what a fuzz case may allocate (`n_out * n_in`,
/// the factors and a slice's Gram matrix); otherwise it must be refused by the limit.
fn materialisable(s: MonarchShape) -> bool {
    let p = s.w1_dims()[2];
    s.n_in().saturating_mul(s.n_out()) <= CAP
        && s.w1_len() <= CAP
        && s.w2_len() <= CAP
        && p * p <= CAP
}

fn refused_or_small(s: MonarchShape) -> bool {
    materialisable(s)
        || s.n_in().saturating_mul(s.n_out()) > monarch::MAX_HOST_ELEMENTS
        || s.w1_len() > monarch::MAX_HOST_ELEMENTS
        || s.w2_len() > monarch::MAX_HOST_ELEMENTS
        || s.w1_dims()[2].saturating_mul(s.w1_dims()[2]) > monarch::MAX_HOST_ELEMENTS
}

#[test]
fn fuzz_to_dense() {
    run("monarch::to_dense", 3000, |rng| {
        let s = dense_shape(rng)?;
        if !refused_or_small(s) {
            return Ok(());
        }
        let w1 = input::<f32>(rng, Some(s.w1_len()));
        let w2 = input::<f32>(rng, Some(s.w2_len()));
        let m = monarch::to_dense(s, &w1, &w2)?;
        assert_eq!(m.len(), s.n_out() * s.n_in());
        assert!(crate::written(&m));
        Ok(())
    });
}

#[test]
fn fuzz_project() {
    run("monarch::project", 1500, |rng| {
        let s = dense_shape(rng)?;
        if !refused_or_small(s) {
            return Ok(());
        }
        let need = s.n_in().checked_mul(s.n_out());
        let dense = input::<f32>(rng, need);
        let opts = ProjectOptions {
            tol: match rng.random_range(0..10) {
                0 => float(rng, 1e-9, 1e-3) as f64,
                1 => f64::NAN,
                _ => 1e-6,
            },
            max_iters: if rng.random_bool(0.05) {
                0
            } else {
                rng.random_range(1..50)
            },
        };
        let p = monarch::project(s, &dense, opts)?;
        assert!(p.w1.len() == s.w1_len() && p.w2.len() == s.w2_len());
        assert!(p.w1.iter().chain(&p.w2).all(|x| x.is_finite()), "{s:?}");
        Ok(())
    });
}

#[test]
fn fuzz_layer() {
    let dev = Device::cpu();
    run("monarch::MonarchLinear", 2500, |rng| {
        let (fin, fout) = (size(rng, 12), size(rng, 12));
        let blocks = size(rng, 4);
        // Valid sizes whose weights a fuzz case must not build: the padded shape's weights
        // are about blocks * ceil(f / blocks)^2 each; skip those between the fuzz cap and
        // the documented limit (too big to allocate here, too small to be refused).
        if let (Some(ib), Some(ob)) = (fin.checked_div(blocks), fout.checked_div(blocks)) {
            let (ib, ob) = (ib.saturating_add(1), ob.saturating_add(1));
            let w = ib.max(ob).saturating_mul(ib.max(ob)).saturating_mul(blocks);
            let total = w.saturating_mul(2).saturating_add(fout);
            if total > CAP && total / 4 <= monarch::MAX_HOST_ELEMENTS {
                return Ok(());
            }
        }
        let layer =
            MonarchLinear::<f32>::new(fin, fout, blocks, rng.random_bool(0.5), rng.random())?;
        assert_eq!(layer.features(), (fin, fout));
        let tokens = size(rng, 4);
        let width = if rng.random_bool(0.9) { fin } else { dim(rng) };
        let xr = rows(rng, tokens, width);
        let yr = rows(rng, tokens, fout);
        let x = input::<f32>(rng, xr.min_len());
        let mut y = output::<f32>(rng, yr.min_len());
        layer.forward(&dev, (&x).into(), xr, (&mut y).into(), yr.row_stride)?;
        assert!(rows_written(&y, yr), "y: {xr:?} {yr:?}");
        Ok(())
    });
}
