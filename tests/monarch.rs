//! Monarch family: multiply / transpose multiply / backward against the f64 oracle (CPU and,
//! where there is one, GPU), to_dense, projection, the layer, and typed errors.

mod common;

use attnkit::monarch::{
    self, Grads, MonarchLinear, MonarchShape, ProjectOptions, Rows, Weights, oracle,
};
use attnkit::{Bf16, Device, Element, Error, F16};
use common::*;
use rand::Rng;
use rand::rngs::StdRng;

/// Shapes as (w1 dims, w2 dims): square with 1, 2, 4, sqrt(n) and n blocks, and rectangular
/// ones whose slices have rank 0, 1 and more.
const SHAPES: &[([usize; 3], [usize; 3])] = &[
    ([1, 16, 16], [1, 16, 16]), // 1 block: dense
    ([2, 8, 8], [2, 8, 8]),
    ([4, 4, 4], [4, 4, 4]),   // sqrt(16)
    ([16, 1, 1], [16, 1, 1]), // n blocks
    ([8, 8, 8], [8, 8, 8]),   // sqrt(64)
    ([4, 6, 5], [3, 7, 8]),
    ([2, 8, 3], [8, 5, 2]),
    ([3, 4, 7], [6, 9, 2]),
    ([5, 3, 2], [15, 1, 1]),
];

/// The variant and argument of an error, to assert both at once.
fn kind(e: &Error) -> (&'static str, Option<&'static str>) {
    let variant = match e {
        Error::Shape { .. } => "Shape",
        Error::Stride { .. } => "Stride",
        Error::Value { .. } => "Value",
        Error::Unsupported { .. } => "Unsupported",
        Error::Alignment { .. } => "Alignment",
        Error::Placement { .. } => "Placement",
        _ => "other",
    };
    (variant, e.arg())
}

fn shape(w1: [usize; 3], w2: [usize; 3]) -> MonarchShape {
    MonarchShape::new(w1, w2).unwrap()
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

/// Packs contiguous rows into a buffer of stride `stride`, the gaps poisoned.
fn strided<T: Element>(rows: &[T], width: usize, stride: usize) -> Vec<T> {
    let tokens = rows.len() / width;
    let mut out = poisoned::<T>(tokens.saturating_sub(1) * stride + width);
    for t in 0..tokens {
        out[t * stride..][..width].copy_from_slice(&rows[t * width..][..width]);
    }
    out
}

/// The written columns of a strided output as contiguous f32; asserts the gaps stayed NaN.
fn unstride<T: Element>(what: &str, y: &[T], width: usize, stride: usize) -> Vec<f32> {
    let tokens = (y.len() + stride - width) / stride;
    for (i, v) in y.iter().enumerate() {
        if i % stride >= width {
            assert!(v.to_f32().is_nan(), "{what}: wrote into the row gap at {i}");
        }
    }
    (0..tokens)
        .flat_map(|t| y[t * stride..][..width].iter().map(|v| v.to_f32()))
        .collect()
}

/// A naive product in the element type's precision (f32 sums, the intermediate and the
/// output rounded to T): the yardstick of the low-precision tolerance.
fn naive_lp<T: Element>(
    s: MonarchShape,
    w1: &[T],
    w2: &[T],
    bias: Option<&[T]>,
    x: &[T],
    tokens: usize,
) -> Vec<f64> {
    let [k, q, p] = s.w1_dims();
    let [l, sz, r] = s.w2_dims();
    let mut out = Vec::new();
    for tok in 0..tokens {
        let xr = &x[tok * s.n_in()..][..s.n_in()];
        let mut h = vec![0.0f32; s.n_mid()];
        for i in 0..k {
            for c in 0..q {
                let mut acc = 0.0f32;
                for pp in 0..p {
                    acc += w1[(i * q + c) * p + pp].to_f32() * xr[i * p + pp].to_f32();
                }
                h[i * q + c] = T::from_f32(acc).to_f32();
            }
        }
        for t in 0..sz {
            for j in 0..l {
                let mut acc = bias.map_or(0.0, |b| b[t * l + j].to_f32());
                for rr in 0..r {
                    acc += w2[(j * sz + t) * r + rr].to_f32() * h[rr * l + j];
                }
                out.push(T::from_f32(acc).to_f32() as f64);
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A multiply on some device: (shape, w1, w2, bias, x contiguous, tokens, x stride, y stride)
/// -> y as stored (strided).
type MulFn<'a, T> =
    dyn Fn(MonarchShape, &[T], &[T], Option<&[T]>, &[T], usize, usize, usize) -> Vec<T> + 'a;

/// Compares `mul` against the oracle on every shape, odd token counts, strided rows, with
/// and without bias: `max|out - ref| <= 2 * max|naive_lp - ref| + 1e-5 * max|ref|`.
fn check_multiply<T: Element>(name: &str, mul: &MulFn<'_, T>, shapes: &[([usize; 3], [usize; 3])]) {
    let mut rng = rng(name);
    for (n, &(d1, d2)) in shapes.iter().enumerate() {
        let s = shape(d1, d2);
        let tokens = [1, 13, 37][n % 3];
        // x strides padded by 8 or 0 (the mma kernel where the shape allows) and by 1 (simt).
        let (xs, ys) = (s.n_in() + [8, 1, 0][n % 3], s.n_out() + 2 * (n % 2));
        let w1: Vec<T> = random(&mut rng, s.w1_len());
        let w2: Vec<T> = random(&mut rng, s.w2_len());
        let bias: Option<Vec<T>> = (n % 2 == 0).then(|| random(&mut rng, s.n_out()));
        let x: Vec<T> = random(&mut rng, tokens * s.n_in());
        let y = mul(s, &w1, &w2, bias.as_deref(), &x, tokens, xs, ys);
        let what = format!("{name} {} {d1:?} {d2:?} tokens={tokens}", T::DTYPE);
        let got = unstride(&what, &y, s.n_out(), ys);
        let want = oracle::multiply(
            s,
            &f64s(&w1),
            &f64s(&w2),
            bias.as_deref().map(f64s).as_deref(),
            &f64s(&x),
            tokens,
        );
        let lp = naive_lp(s, &w1, &w2, bias.as_deref(), &x, tokens);
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let tol = 2.0 * max_abs_diff(&lp, &want) + 1e-5 * scale.max(1.0);
        assert_close(&what, &got, &want, tol, 0.0);
    }
}

#[allow(clippy::too_many_arguments)]
fn cpu_mul<T: Element>(
    s: MonarchShape,
    w1: &[T],
    w2: &[T],
    bias: Option<&[T]>,
    x: &[T],
    tokens: usize,
    xs: usize,
    ys: usize,
) -> Vec<T> {
    let w = Weights {
        shape: s,
        w1: w1.into(),
        w2: w2.into(),
        bias: bias.map(Into::into),
    };
    let xb = strided(x, s.n_in(), xs);
    let mut y = poisoned::<T>(tokens.saturating_sub(1) * ys + s.n_out());
    let rows = Rows {
        tokens,
        width: s.n_in(),
        row_stride: xs,
    };
    monarch::multiply(&Device::cpu(), &w, (&xb).into(), rows, (&mut y).into(), ys).unwrap();
    y
}

#[test]
fn multiply_cpu_matches_oracle_all_dtypes() {
    check_multiply::<f32>("multiply_cpu", &cpu_mul::<f32>, SHAPES);
    check_multiply::<Bf16>("multiply_cpu", &cpu_mul::<Bf16>, SHAPES);
    check_multiply::<F16>("multiply_cpu", &cpu_mul::<F16>, SHAPES);
}

#[test]
fn multiply_cpu_with_two_threads_matches_one() {
    // Token tiles on several threads must give the same bits as one thread.
    let mut rng = rng("threads");
    let s = shape([4, 6, 5], [3, 7, 8]);
    let tokens = 45;
    let w1: Vec<f32> = random(&mut rng, s.w1_len());
    let w2: Vec<f32> = random(&mut rng, s.w2_len());
    let x: Vec<f32> = random(&mut rng, tokens * s.n_in());
    let w = Weights {
        shape: s,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: None,
    };
    let mut outs = Vec::new();
    for threads in [1, 3] {
        let dev = Device::cpu_with_threads(threads).unwrap();
        let mut y = poisoned::<f32>(tokens * s.n_out());
        let rows = Rows::contiguous(tokens, s.n_in());
        monarch::multiply(&dev, &w, (&x).into(), rows, (&mut y).into(), s.n_out()).unwrap();
        outs.push(y);
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn transpose_cpu_matches_oracle() {
    let mut rng = rng("transpose_cpu");
    for (n, &(d1, d2)) in SHAPES.iter().enumerate() {
        let s = shape(d1, d2);
        // 70: more than one 32-token tile of the CPU path.
        let tokens = [2, 9, 17, 70][n % 4];
        let w1: Vec<f32> = random(&mut rng, s.w1_len());
        let w2: Vec<f32> = random(&mut rng, s.w2_len());
        let bias: Option<Vec<f32>> = (n % 2 == 1).then(|| random(&mut rng, s.n_in()));
        let x: Vec<f32> = random(&mut rng, tokens * s.n_out());
        let ys = s.n_in() + 1;
        let mut y = poisoned::<f32>((tokens - 1) * ys + s.n_in());
        let w = Weights {
            shape: s,
            w1: (&w1).into(),
            w2: (&w2).into(),
            bias: bias.as_ref().map(Into::into),
        };
        let rows = Rows::contiguous(tokens, s.n_out());
        monarch::multiply_transpose(&Device::cpu(), &w, (&x).into(), rows, (&mut y).into(), ys)
            .unwrap();
        let what = format!("transpose {d1:?} {d2:?}");
        let got = unstride(&what, &y, s.n_in(), ys);
        let want = oracle::multiply_transpose(
            s,
            &f64s(&w1),
            &f64s(&w2),
            bias.as_deref().map(f64s).as_deref(),
            &f64s(&x),
            tokens,
        );
        assert_close(&what, &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn to_dense_agrees_with_oracle_and_multiply() {
    let mut rng = rng("to_dense");
    for &(d1, d2) in SHAPES {
        let s = shape(d1, d2);
        let w1: Vec<f32> = random(&mut rng, s.w1_len());
        let w2: Vec<f32> = random(&mut rng, s.w2_len());
        let dense = monarch::to_dense(s, &w1, &w2).unwrap();
        let what = format!("to_dense {d1:?} {d2:?}");
        assert_close(
            &what,
            &dense,
            &oracle::dense(s, &f64s(&w1), &f64s(&w2)),
            1e-6,
            1e-6,
        );
        // Multiplying the identity gives the columns of M: y[col][row] = M[row][col].
        let n_in = s.n_in();
        let mut eye = vec![0.0f32; n_in * n_in];
        (0..n_in).for_each(|i| eye[i * n_in + i] = 1.0);
        let y = cpu_mul(s, &w1, &w2, None, &eye, n_in, n_in, s.n_out());
        let cols: Vec<f64> = (0..s.n_out() * n_in)
            .map(|e| y[(e % n_in) * s.n_out() + e / n_in] as f64)
            .collect();
        assert_close(&format!("{what} vs multiply"), &dense, &cols, 1e-6, 1e-6);
    }
}

/// `||a - b||_F^2` of f32 matrices, in f64.
fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum()
}

#[test]
fn projecting_a_monarch_matrix_gives_it_back() {
    let mut rng = rng("project_back");
    for &(d1, d2) in SHAPES {
        let s = shape(d1, d2);
        let w1: Vec<f32> = random(&mut rng, s.w1_len());
        let w2: Vec<f32> = random(&mut rng, s.w2_len());
        let m = monarch::to_dense(s, &w1, &w2).unwrap();
        let proj = monarch::project(s, &m, ProjectOptions::default()).unwrap();
        assert!(proj.converged, "{d1:?} {d2:?}: {} steps", proj.max_steps);
        let back = monarch::to_dense(s, &proj.w1, &proj.w2).unwrap();
        let rel = (dist2(&m, &back) / dist2(&m, &vec![0.0; m.len()])).sqrt();
        assert!(rel < 1e-5, "{d1:?} {d2:?}: relative error {rel:e}");
    }
}

#[test]
fn projection_of_a_dense_matrix_beats_perturbations() {
    let mut rng = rng("project_dense");
    for &(d1, d2) in SHAPES {
        let s = shape(d1, d2);
        let a: Vec<f32> = random(&mut rng, s.n_out() * s.n_in());
        let proj = monarch::project(s, &a, ProjectOptions::default()).unwrap();
        let best = dist2(&a, &monarch::to_dense(s, &proj.w1, &proj.w2).unwrap());
        // The projection is no farther than zero, nor than random Monarch matrices nearby.
        assert!(best <= dist2(&a, &vec![0.0; a.len()]) * (1.0 + 1e-9));
        for eps in [1e-1f32, 1e-2, 1e-3] {
            for _ in 0..3 {
                let nudge = |w: &[f32], rng: &mut StdRng| -> Vec<f32> {
                    w.iter()
                        .map(|v| v + eps * rng.random_range(-1.0f32..1.0))
                        .collect()
                };
                let (p1, p2) = (nudge(&proj.w1, &mut rng), nudge(&proj.w2, &mut rng));
                let other = dist2(&a, &monarch::to_dense(s, &p1, &p2).unwrap());
                assert!(
                    best <= other * (1.0 + 1e-6),
                    "{d1:?} {d2:?}: projection error {best} > perturbed {other} (eps {eps})"
                );
            }
        }
    }
}

#[test]
fn layer_pads_inputs_and_truncates_outputs() {
    let mut rng = rng("layer");
    for (inf, outf, blocks) in [(10, 7, 4), (7, 10, 4), (16, 16, 4), (5, 9, 3)] {
        let layer = MonarchLinear::<f32>::new(inf, outf, blocks, true, rng.random()).unwrap();
        let s = layer.shape();
        assert_eq!(s.w1_dims()[0], blocks);
        assert!(s.n_in() >= inf && s.n_in() - inf < blocks);
        assert!(s.n_out() >= outf && s.n_out() - outf < blocks);
        // Kaiming-uniform per block: |w| <= 1/sqrt(block width), and the range is used.
        for (w, fan) in [(layer.w1(), s.w1_dims()[2]), (layer.w2(), s.w2_dims()[2])] {
            let bound = 1.0 / (fan as f32).sqrt();
            let max = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(
                max <= bound && max > 0.5 * bound,
                "max {max}, bound {bound}"
            );
        }
        let tokens = 11;
        let x: Vec<f32> = random(&mut rng, tokens * inf);
        let mut y = poisoned::<f32>(tokens * outf);
        let rows = Rows::contiguous(tokens, inf);
        layer
            .forward(&Device::cpu(), (&x).into(), rows, (&mut y).into(), outf)
            .unwrap();
        // Oracle: pad x with zeros, multiply, keep the first out_features, add the bias.
        let mut xp = vec![0.0f64; tokens * s.n_in()];
        for t in 0..tokens {
            for e in 0..inf {
                xp[t * s.n_in() + e] = x[t * inf + e] as f64;
            }
        }
        let full = oracle::multiply(s, &f64s(layer.w1()), &f64s(layer.w2()), None, &xp, tokens);
        let b = layer.bias().unwrap();
        let want: Vec<f64> = (0..tokens * outf)
            .map(|e| full[(e / outf) * s.n_out() + e % outf] + b[e % outf] as f64)
            .collect();
        assert_close(
            &format!("layer {inf}->{outf}/{blocks}"),
            &y,
            &want,
            1e-5,
            1e-5,
        );
    }
}

/// `M^T x + bias` on `dev` (copied to and from a GPU), contiguous rows, output poisoned first
/// (the GPU tests compare it with the CPU path).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn transpose_on<T: Element>(
    dev: &Device,
    s: MonarchShape,
    w1: &[T],
    w2: &[T],
    bias: &[T],
    x: &[T],
    tokens: usize,
) -> Vec<f32> {
    let rows = Rows::contiguous(tokens, s.n_out());
    let mut y = poisoned::<T>(tokens * s.n_in());
    #[cfg(feature = "cuda")]
    if let Some(stream) = dev.stream() {
        let up = |v: &[T]| stream.clone_htod(v).unwrap();
        let (w1d, w2d, bd, xd, mut yd) = (up(w1), up(w2), up(bias), up(x), up(&y));
        let w = Weights {
            shape: s,
            w1: (&w1d).into(),
            w2: (&w2d).into(),
            bias: Some((&bd).into()),
        };
        monarch::multiply_transpose(dev, &w, (&xd).into(), rows, (&mut yd).into(), s.n_in())
            .unwrap();
        return to_f32(&stream.clone_dtoh(&yd).unwrap());
    }
    let w = Weights {
        shape: s,
        w1: w1.into(),
        w2: w2.into(),
        bias: Some(bias.into()),
    };
    monarch::multiply_transpose(dev, &w, x.into(), rows, (&mut y).into(), s.n_in()).unwrap();
    to_f32(&y)
}

/// `[dw1, dw2, dbias, dx]` of `backward` on `dev` (copied to and from a GPU), outputs
/// poisoned first; dx as f32; without a bias, dbias is not asked for (and stays NaN).
#[allow(clippy::too_many_arguments)]
fn grads_on<T: Element>(
    dev: &Device,
    s: MonarchShape,
    w1: &[T],
    w2: &[T],
    bias: Option<&[T]>,
    x: &[T],
    dy: &[T],
    tokens: usize,
) -> [Vec<f32>; 4] {
    let rows = Rows::contiguous(tokens, s.n_in());
    let ws_len = monarch::backward_workspace_len(s, tokens).unwrap();
    let mut dws = [
        poisoned::<f32>(s.w1_len()),
        poisoned::<f32>(s.w2_len()),
        poisoned::<f32>(s.n_out()),
    ];
    let mut dx = poisoned::<T>(tokens * s.n_in());
    #[cfg(feature = "cuda")]
    if let Some(stream) = dev.stream() {
        let (w1d, w2d, bd, xd, dyd) = (
            stream.clone_htod(w1).unwrap(),
            stream.clone_htod(w2).unwrap(),
            bias.map(|b| stream.clone_htod(b).unwrap()),
            stream.clone_htod(x).unwrap(),
            stream.clone_htod(dy).unwrap(),
        );
        let mut o: Vec<_> = dws.iter().map(|v| stream.clone_htod(v).unwrap()).collect();
        let mut dxd = stream.clone_htod(&dx).unwrap();
        let mut ws = stream.clone_htod(&poisoned::<f32>(ws_len)).unwrap();
        let w = Weights {
            shape: s,
            w1: (&w1d).into(),
            w2: (&w2d).into(),
            bias: bd.as_ref().map(Into::into),
        };
        let [dw1, dw2, db] = &mut o[..] else {
            unreachable!()
        };
        let g = Grads {
            dx: (&mut dxd).into(),
            dx_row_stride: s.n_in(),
            dw1: dw1.into(),
            dw2: dw2.into(),
            dbias: bias.is_some().then(|| db.into()),
            workspace: (&mut ws).into(),
        };
        monarch::backward(dev, &w, (&xd).into(), rows, (&dyd).into(), s.n_out(), g).unwrap();
        let [a, b, c] = dws;
        let dx: Vec<f32> = stream
            .clone_dtoh(&dxd)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let [oa, ob, oc] = &o[..] else { unreachable!() };
        let down = |d, mut h: Vec<f32>| {
            h.copy_from_slice(&stream.clone_dtoh(d).unwrap());
            h
        };
        return [down(oa, a), down(ob, b), down(oc, c), dx];
    }
    let mut ws = poisoned::<f32>(ws_len);
    let w = Weights {
        shape: s,
        w1: w1.into(),
        w2: w2.into(),
        bias: bias.map(Into::into),
    };
    let [dw1, dw2, db] = &mut dws;
    let g = Grads {
        dx: (&mut dx[..]).into(),
        dx_row_stride: s.n_in(),
        dw1: dw1.into(),
        dw2: dw2.into(),
        dbias: bias.is_some().then(|| db.into()),
        workspace: (&mut ws).into(),
    };
    monarch::backward(dev, &w, x.into(), rows, dy.into(), s.n_out(), g).unwrap();
    let [a, b, c] = dws;
    [a, b, c, dx.iter().map(|v| v.to_f32()).collect()]
}

/// The exact gradients of `L = sum(dy * (M x + bias))` in f64, `[dw1, dw2, dbias, dx]`
/// (h = R x and dh unrounded), and per gradient the largest sum of |terms| of one entry: the
/// scale of the error that rounding h and dh to a 16-bit type may make.
fn grads_oracle(
    s: MonarchShape,
    w1: &[f64],
    w2: &[f64],
    x: &[f64],
    dy: &[f64],
    tokens: usize,
) -> ([Vec<f64>; 4], [f64; 4]) {
    let [k, q, p] = s.w1_dims();
    let [l, ss, r] = s.w2_dims();
    let (n_in, n_mid, n_out) = (s.n_in(), s.n_mid(), s.n_out());
    let mut h = vec![0.0; tokens * n_mid];
    let mut dh = vec![0.0; tokens * n_mid];
    for tok in 0..tokens {
        for m in 0..n_mid {
            h[tok * n_mid + m] = (0..p)
                .map(|pp| w1[m * p + pp] * x[tok * n_in + m / q * p + pp])
                .sum();
            let (j, rr) = (m % l, m / l);
            dh[tok * n_mid + m] = (0..ss)
                .map(|t| w2[(j * ss + t) * r + rr] * dy[tok * n_out + t * l + j])
                .sum();
        }
    }
    // (sum, sum of |terms|) over tokens of a(tok) * b(tok).
    let dot = |a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64| {
        (0..tokens).fold((0.0, 0.0), |(v, m), t| {
            (v + a(t) * b(t), m + (a(t) * b(t)).abs())
        })
    };
    let mut dw1 = vec![0.0; s.w1_len()];
    let mut dw2 = vec![0.0; s.w2_len()];
    let mut mags = [0.0f64; 4];
    for i in 0..k {
        for c in 0..q {
            for pp in 0..p {
                let (v, m) = dot(&|t| dh[t * n_mid + i * q + c], &|t| {
                    x[t * n_in + i * p + pp]
                });
                dw1[(i * q + c) * p + pp] = v;
                mags[0] = mags[0].max(m);
            }
        }
    }
    for j in 0..l {
        for t in 0..ss {
            for rr in 0..r {
                let (v, m) = dot(&|tok| dy[tok * n_out + t * l + j], &|tok| {
                    h[tok * n_mid + rr * l + j]
                });
                dw2[(j * ss + t) * r + rr] = v;
                mags[1] = mags[1].max(m);
            }
        }
    }
    let dbias: Vec<f64> = (0..n_out)
        .map(|o| (0..tokens).map(|t| dy[t * n_out + o]).sum())
        .collect();
    let dx = oracle::multiply_transpose(s, w1, w2, None, dy, tokens);
    let scale = |v: &[f64]| v.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    mags[2] = scale(&dbias);
    mags[3] = scale(&dx);
    ([dw1, dw2, dbias, dx], mags)
}

/// Shapes of the low-precision backward test: blocks of odd sizes, of 16, and a few 64 x 64
/// tiles with partial ones (130 x 128 blocks of dw2, 80 x 48 of dw1); the third runs 150
/// tokens (five 32-token steps, three 64-token tiles of h and dx) and has no bias.
const GRAD_SHAPES: &[([usize; 3], [usize; 3])] = &[
    ([3, 4, 2], [4, 5, 3]),
    ([2, 16, 16], [2, 16, 16]),
    ([2, 80, 48], [4, 40, 40]),
    ([4, 64, 72], [2, 130, 128]),
];

/// The backward pass in a 16-bit type on `dev` against the exact f64 gradients of the rounded
/// inputs. `lp` gives the tolerance: on the CPU (the naive loops) the rounding of h and dh
/// to T bounds it (u_T * sum |terms|, doubled, plus f32's sums); elsewhere twice the CPU
/// path's error plus f32-sum slack, the error of a naive computation in the same precision.
fn check_backward_lp<T: Element>(dev: &Device, name: &str, u: f64) {
    let mut rng = rng(name);
    for (n, &(d1, d2)) in GRAD_SHAPES.iter().enumerate() {
        let s = shape(d1, d2);
        let tokens = [5, 37, 150, 33][n];
        let with_bias = n != 2;
        let w1: Vec<T> = random(&mut rng, s.w1_len());
        let w2: Vec<T> = random(&mut rng, s.w2_len());
        let bias: Vec<T> = random(&mut rng, s.n_out());
        let x: Vec<T> = random(&mut rng, tokens * s.n_in());
        let dy: Vec<T> = random(&mut rng, tokens * s.n_out());
        let (want, mags) = grads_oracle(s, &f64s(&w1), &f64s(&w2), &f64s(&x), &f64s(&dy), tokens);
        let bias = with_bias.then_some(&bias[..]);
        let got = grads_on(dev, s, &w1, &w2, bias, &x, &dy, tokens);
        let cpu = dev
            .is_cuda()
            .then(|| grads_on(&Device::cpu(), s, &w1, &w2, bias, &x, &dy, tokens));
        for which in 0..4 {
            if which == 2 && !with_bias {
                assert!(
                    got[2].iter().all(|v| v.is_nan()),
                    "dbias written without a bias"
                );
                continue;
            }
            // dx is rounded to T at the end, besides its rounded intermediate.
            let bound = 2.0 * u * mags[which] * if which == 3 { 2.0 } else { 1.0 };
            let slack = 1e-5 * mags[which].max(1.0);
            let tol = match &cpu {
                None => bound + slack,
                Some(c) => {
                    let c: Vec<f64> = c[which].iter().map(|&v| v as f64).collect();
                    2.0 * max_abs_diff(&c, &want[which]) + slack
                }
            };
            let what = ["dw1", "dw2", "dbias", "dx"][which];
            assert_close(
                &format!("{name} {what} {d1:?} {d2:?} tokens={tokens}"),
                &got[which],
                &want[which],
                tol,
                0.0,
            );
        }
    }
}

#[test]
fn backward_low_precision_matches_oracle() {
    check_backward_lp::<Bf16>(&Device::cpu(), "backward_cpu_bf16", 1.0 / 256.0);
    check_backward_lp::<F16>(&Device::cpu(), "backward_cpu_f16", 1.0 / 2048.0);
}

/// Central finite differences of `L = sum(dy * (M x + bias))` through the f64 oracle (exact up
/// to rounding: L is linear in each parameter) against `backward` on `dev`.
fn check_backward(dev: &Device, name: &str) {
    let mut rng = rng(name);
    for &(d1, d2) in &[
        ([3, 4, 2], [4, 5, 3]),
        ([2, 2, 2], [2, 2, 2]),
        ([2, 8, 3], [8, 5, 2]),
        ([2, 16, 16], [2, 16, 16]),
    ] {
        let s = shape(d1, d2);
        let tokens = 5;
        let w1: Vec<f32> = random(&mut rng, s.w1_len());
        let w2: Vec<f32> = random(&mut rng, s.w2_len());
        let bias: Vec<f32> = random(&mut rng, s.n_out());
        let x: Vec<f32> = random(&mut rng, tokens * s.n_in());
        let dy: Vec<f32> = random(&mut rng, tokens * s.n_out());
        let got = grads_on(dev, s, &w1, &w2, Some(&bias), &x, &dy, tokens);
        let params = [f64s(&w1), f64s(&w2), f64s(&bias), f64s(&x)];
        let loss = |p: &[Vec<f64>; 4]| -> f64 {
            let y = oracle::multiply(s, &p[0], &p[1], Some(&p[2]), &p[3], tokens);
            y.iter().zip(&dy).map(|(a, b)| a * *b as f64).sum()
        };
        for (which, got) in got.iter().enumerate() {
            let fd: Vec<f64> = (0..params[which].len())
                .map(|e| {
                    let h = 1e-4;
                    let mut plus = params.clone();
                    plus[which][e] += h;
                    let mut minus = params.clone();
                    minus[which][e] -= h;
                    (loss(&plus) - loss(&minus)) / (2.0 * h)
                })
                .collect();
            let what = ["dw1", "dw2", "dbias", "dx"][which];
            assert_close(
                &format!("{name} {what} {d1:?} {d2:?}"),
                got,
                &fd,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    check_backward(&Device::cpu(), "backward_cpu");
}

/// Issue 13: what the host allocates is bounded before it is allocated. `to_dense` of a
/// 1024x1x1024 / 1024x1024x1 shape used to ask for 4 TiB and abort the process; `project`
/// of a 1-element dense matrix whose blocks hold 2^30 weights allocated 8 GiB, and one with
/// 2^16 columns per slice a 32 GiB Gram matrix; `MonarchLinear` of 2^30 one-element blocks
/// allocated and filled 8 GiB of weights.
#[test]
fn host_allocations_are_bounded_before_they_happen() {
    let big = shape([1024, 1, 1024], [1024, 1024, 1]);
    let w = vec![0.0f32; 1 << 20];
    let e = monarch::to_dense(big, &w, &w).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("shape")), "{e}");
    let e = monarch::project(big, &w, ProjectOptions::default()).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("shape")), "{e}");
    // 1 x 1 dense, 2^31 - 1 intermediate values: the factors are the problem, not `dense`.
    let tall = shape([1, i32::MAX as usize, 1], [1, 1, i32::MAX as usize]);
    let e = monarch::project(tall, &[1.0], ProjectOptions::default()).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("shape")), "{e}");
    // 1 x 2^16 dense: a 2^32-element Gram matrix for its one slice.
    let wide = shape([1, 1, 1 << 16], [1, 1, 1]);
    let e = monarch::project(wide, &vec![1.0; 1 << 16], ProjectOptions::default()).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("shape")), "{e}");
    let e = MonarchLinear::<f32>::new(1 << 30, 1 << 30, 1 << 30, true, 0).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("blocks")), "{e}");
    for n in [usize::MAX, 1 << 40, i32::MAX as usize + 1] {
        assert!(MonarchLinear::<f32>::new(n, 8, 1, false, 0).is_err());
        assert!(MonarchLinear::<f32>::new(8, n, 2, false, 0).is_err());
    }
    // Within the bound: still fine.
    let s = shape([4, 4, 4], [4, 4, 4]);
    assert_eq!(
        monarch::to_dense(s, &[1.0f32; 64], &[1.0f32; 64])
            .unwrap()
            .len(),
        256
    );
}

/// Issue 13 item 5, the crate's one length rule: weights, bias, gradients, workspace and the
/// dense inputs may be longer than the call reads or writes (the tail untouched: NaN before,
/// NaN after, results those of exact buffers), one element short is a Shape error naming
/// the argument. Monarch used to refuse longer weights, bias and gradients.
#[test]
fn longer_buffers_are_accepted_tails_untouched_shorter_are_errors() {
    let s = shape([2, 4, 3], [4, 5, 2]);
    let mut rng = rng("monarch length rule");
    let tokens = 3;
    let with_tail = |mut v: Vec<f32>, extra: usize| {
        v.extend(std::iter::repeat_n(f32::NAN, extra));
        v
    };
    let w1 = with_tail(random(&mut rng, s.w1_len()), 1);
    let w2 = with_tail(random(&mut rng, s.w2_len()), 1);
    let bias = with_tail(random(&mut rng, s.n_out()), 1);
    let x: Vec<f32> = random(&mut rng, tokens * s.n_in());
    let dy: Vec<f32> = random(&mut rng, tokens * s.n_out());
    let tail_nan = |v: &[f32], n: usize| v[n..].iter().all(|x| x.is_nan());
    for dev in devices("monarch length rule") {
        if dev.is_cuda() {
            // The GPU half: backward with no token (the zeroing path) on longer gradients.
            #[cfg(feature = "cuda")]
            {
                let st = dev.stream().unwrap();
                let up = |v: &[f32]| st.clone_htod(v).unwrap();
                let (w1d, w2d) = (up(&w1), up(&w2));
                let mut dw1 = up(&poisoned::<f32>(s.w1_len() + 1));
                let mut dw2 = up(&poisoned::<f32>(s.w2_len() + 1));
                let mut db = up(&poisoned::<f32>(s.n_out() + 1));
                let mut dx = up(&poisoned::<f32>(1));
                let mut ws = up(&poisoned::<f32>(1));
                let w = Weights {
                    shape: s,
                    w1: (&w1d).into(),
                    w2: (&w2d).into(),
                    bias: None,
                };
                let g = Grads {
                    dx: (&mut dx).into(),
                    dx_row_stride: s.n_in(),
                    dw1: (&mut dw1).into(),
                    dw2: (&mut dw2).into(),
                    dbias: Some((&mut db).into()),
                    workspace: (&mut ws).into(),
                };
                let none = up(&[]);
                monarch::backward(
                    &dev,
                    &w,
                    (&none).into(),
                    Rows::contiguous(0, s.n_in()),
                    (&none).into(),
                    s.n_out(),
                    g,
                )
                .unwrap();
                for (v, n) in [(&dw1, s.w1_len()), (&dw2, s.w2_len()), (&db, s.n_out())] {
                    let h = st.clone_dtoh(v).unwrap();
                    assert!(h[..n].iter().all(|&x| x == 0.0), "no token: zero gradients");
                    assert!(tail_nan(&h, n), "the tail stays as it was");
                }
            }
            continue;
        }
        let mul = |extra: usize, short: Option<&str>| -> attnkit::Result<Vec<f32>> {
            let n = |arg: &str, len: usize| {
                if short == Some(arg) {
                    len - 1
                } else {
                    len + extra
                }
            };
            let w = Weights {
                shape: s,
                w1: (&w1[..n("w1", s.w1_len())]).into(),
                w2: (&w2[..n("w2", s.w2_len())]).into(),
                bias: Some((&bias[..n("bias", s.n_out())]).into()),
            };
            let mut y = poisoned::<f32>(n("y", tokens * s.n_out()));
            let rows = Rows::contiguous(tokens, s.n_in());
            monarch::multiply(&dev, &w, (&x).into(), rows, (&mut y).into(), s.n_out())?;
            assert!(tail_nan(&y, tokens * s.n_out()));
            Ok(y)
        };
        let y0 = mul(0, None).unwrap();
        assert!(y0.iter().all(|v| !v.is_nan()));
        assert_eq!(y0, mul(1, None).unwrap()[..y0.len()]);
        for arg in ["w1", "w2", "bias", "y"] {
            let e = mul(0, Some(arg)).unwrap_err();
            assert_eq!(kind(&e), ("Shape", Some(arg)), "{e}");
        }
        type G = [Vec<f32>; 4];
        let bwd = |tokens: usize, extra: usize, short: Option<&str>| -> attnkit::Result<G> {
            let n = |arg: &str, len: usize| {
                if short == Some(arg) {
                    len - 1
                } else {
                    len + extra
                }
            };
            let w = Weights {
                shape: s,
                w1: (&w1[..n("w1", s.w1_len())]).into(),
                w2: (&w2[..n("w2", s.w2_len())]).into(),
                bias: None,
            };
            let ws_len = monarch::backward_workspace_len(s, tokens).unwrap();
            let (lw1, lw2, lb, ldx) = (s.w1_len(), s.w2_len(), s.n_out(), tokens * s.n_in());
            let mut out = [
                poisoned::<f32>(n("dw1", lw1)),
                poisoned::<f32>(n("dw2", lw2)),
                poisoned::<f32>(n("dbias", lb)),
                poisoned::<f32>(n("dx", ldx)),
            ];
            let mut ws = poisoned::<f32>(n("workspace", ws_len));
            let [dw1, dw2, db, dx] = &mut out;
            let g = Grads {
                dx: dx.into(),
                dx_row_stride: s.n_in(),
                dw1: dw1.into(),
                dw2: dw2.into(),
                dbias: Some(db.into()),
                workspace: (&mut ws).into(),
            };
            let rows = Rows::contiguous(tokens, s.n_in());
            let (xb, dyb) = (&x[..tokens * s.n_in()], &dy[..tokens * s.n_out()]);
            monarch::backward(&dev, &w, xb.into(), rows, dyb.into(), s.n_out(), g)?;
            for (v, len) in out.iter().zip([lw1, lw2, lb, ldx]) {
                assert!(tail_nan(v, len), "a gradient's tail was written");
            }
            assert!(tail_nan(&ws, ws_len), "the workspace's tail was written");
            Ok(out)
        };
        for t in [0, tokens] {
            let g0 = bwd(t, 0, None).unwrap();
            let g1 = bwd(t, 1, None).unwrap();
            for (a, b) in g0.iter().zip(&g1) {
                assert!(a.iter().all(|v| !v.is_nan()));
                assert_eq!(a[..], b[..a.len()]);
            }
        }
        for arg in ["w1", "w2", "dw1", "dw2", "dbias", "dx", "workspace"] {
            let e = bwd(tokens, 0, Some(arg)).unwrap_err();
            assert_eq!(kind(&e), ("Shape", Some(arg)), "{e}");
        }
        // Dense <-> Monarch: longer inputs accepted (tails not read), shorter refused.
        let m = monarch::to_dense(s, &w1, &w2).unwrap();
        assert!(m.iter().all(|v| !v.is_nan()));
        assert_eq!(
            m,
            monarch::to_dense(s, &w1[..s.w1_len()], &w2[..s.w2_len()]).unwrap()
        );
        let e = monarch::to_dense(s, &w1[..s.w1_len() - 1], &w2).unwrap_err();
        assert_eq!(kind(&e), ("Shape", Some("w1")), "{e}");
        let mut longer = m.clone();
        longer.push(f32::NAN);
        let p = monarch::project(s, &longer, ProjectOptions::default()).unwrap();
        assert!(p.w1.iter().chain(&p.w2).all(|v| !v.is_nan()));
        let e = monarch::project(s, &m[1..], ProjectOptions::default()).unwrap_err();
        assert_eq!(kind(&e), ("Shape", Some("dense")), "{e}");
    }
}

#[test]
fn bad_input_is_a_typed_error_naming_the_argument() {
    // Blocks that do not chain, zero blocks, zero widths.
    let e = MonarchShape::new([4, 4, 4], [3, 4, 4]).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("w2")), "{e}");
    let e = MonarchShape::new([0, 4, 4], [4, 4, 0]).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("w1")), "{e}");
    let e = MonarchShape::new([4, 4, 4], [4, 0, 4]).unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("w2")), "{e}");
    assert_eq!(
        MonarchShape::square(16, 0).unwrap_err().arg(),
        Some("blocks")
    );
    assert_eq!(
        MonarchShape::square(16, 3).unwrap_err().arg(),
        Some("blocks")
    );
    let e = MonarchShape::new([1 << 20, 1 << 12, 1], [1 << 20, 1, 1 << 12]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");

    let s = shape([2, 4, 3], [4, 5, 2]);
    let (w1, w2) = (vec![0.5f32; s.w1_len()], vec![0.5f32; s.w2_len()]);
    let x = vec![1.0f32; 3 * s.n_in()];
    let dev = Device::cpu();
    let call = |w: &Weights<'_, f32>, rows: Rows, xb: &[f32], ylen: usize, ys: usize| {
        let mut y = vec![9.0f32; ylen];
        let r = monarch::multiply(&dev, w, xb.into(), rows, (&mut y).into(), ys);
        assert!(y.iter().all(|&v| v == 9.0), "wrote output before failing");
        r.unwrap_err()
    };
    let good = Weights {
        shape: s,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: None,
    };
    let rows = Rows::contiguous(3, s.n_in());
    let ylen = 3 * s.n_out();
    // Input width not k*p.
    let e = call(&good, Rows { width: 5, ..rows }, &x, ylen, s.n_out());
    assert_eq!(kind(&e), ("Shape", Some("x")), "{e}");
    // x too short, stride below the width, y too short, y stride below its width.
    assert_eq!(call(&good, rows, &x[1..], ylen, s.n_out()).arg(), Some("x"));
    let e = call(
        &good,
        Rows {
            row_stride: 5,
            ..rows
        },
        &x,
        ylen,
        s.n_out(),
    );
    assert_eq!(kind(&e), ("Stride", Some("x_row_stride")), "{e}");
    assert_eq!(call(&good, rows, &x, ylen - 1, s.n_out()).arg(), Some("y"));
    let e = call(&good, rows, &x, ylen, s.n_out() - 1);
    assert_eq!(kind(&e), ("Stride", Some("y_row_stride")), "{e}");
    let e = call(
        &good,
        Rows {
            row_stride: usize::MAX,
            ..rows
        },
        &x,
        ylen,
        s.n_out(),
    );
    assert_eq!(kind(&e), ("Stride", Some("x_row_stride")), "{e}");
    // Weights of the wrong length, bias of the wrong length.
    for (bad, arg) in [
        (
            Weights {
                shape: s,
                w1: (&w1[1..]).into(),
                w2: (&w2).into(),
                bias: None,
            },
            "w1",
        ),
        (
            Weights {
                shape: s,
                w1: (&w1).into(),
                w2: (&w2[..4]).into(),
                bias: None,
            },
            "w2",
        ),
        (
            Weights {
                shape: s,
                w1: (&w1).into(),
                w2: (&w2).into(),
                bias: Some((&w1[..3]).into()),
            },
            "bias",
        ),
    ] {
        assert_eq!(call(&bad, rows, &x, ylen, s.n_out()).arg(), Some(arg));
    }
    // Transpose: x must be n_out wide.
    let mut y = vec![0.0f32; 3 * s.n_in()];
    let e = monarch::multiply_transpose(&dev, &good, (&x).into(), rows, (&mut y).into(), 6)
        .unwrap_err();
    assert_eq!(kind(&e), ("Shape", Some("x")), "{e}");
    // Projection: wrong dense size, bad options.
    let e = monarch::project(s, &[0.0; 3], ProjectOptions::default()).unwrap_err();
    assert_eq!(e.arg(), Some("dense"));
    let dense = vec![0.0f32; s.n_in() * s.n_out()];
    let bad_opts = ProjectOptions {
        tol: f64::NAN,
        ..Default::default()
    };
    assert_eq!(
        monarch::project(s, &dense, bad_opts).unwrap_err().arg(),
        Some("opts")
    );
    // Layer: zero blocks, wrong input width.
    let e = MonarchLinear::<f32>::new(8, 8, 0, false, 0).unwrap_err();
    assert_eq!(e.arg(), Some("blocks"));
    let layer = MonarchLinear::<f32>::new(8, 8, 2, false, 0).unwrap();
    let e = layer
        .forward(
            &dev,
            (&x).into(),
            Rows::contiguous(1, 7),
            (&mut y).into(),
            8,
        )
        .unwrap_err();
    assert_eq!(e.arg(), Some("x"));
    // Backward: a workspace too small, weight gradients of the wrong length.
    let dyv = vec![1.0f32; 3 * s.n_out()];
    for (ws_len, dw1_len, arg) in [
        (2 * 3 * s.n_mid() - 1, s.w1_len(), "workspace"),
        (2 * 3 * s.n_mid(), 5, "dw1"),
    ] {
        let (mut dx, mut dw1, mut dw2) = (
            vec![0.0f32; 3 * s.n_in()],
            vec![0.0f32; dw1_len],
            vec![0.0f32; s.w2_len()],
        );
        let mut ws = vec![0.0f32; ws_len];
        let g = Grads {
            dx: (&mut dx).into(),
            dx_row_stride: s.n_in(),
            dw1: (&mut dw1).into(),
            dw2: (&mut dw2).into(),
            dbias: None,
            workspace: (&mut ws).into(),
        };
        let e = monarch::backward(&dev, &good, (&x).into(), rows, (&dyv).into(), s.n_out(), g)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: a, .. } if a == arg), "{e}");
    }
    // Zero tokens is fine and writes nothing.
    let mut none: Vec<f32> = Vec::new();
    monarch::multiply(
        &dev,
        &good,
        (&x).into(),
        Rows { tokens: 0, ..rows },
        (&mut none).into(),
        20,
    )
    .unwrap();
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use attnkit::{Buf, BufMut};

    /// Shapes the tensor-core kernel takes (p, r, s multiples of 16): square with 2, 4, 8,
    /// sqrt(n) = 16 blocks, few large blocks (256 wide: group 1), and rectangular ones.
    const MMA_SHAPES: &[([usize; 3], [usize; 3])] = &[
        ([4, 32, 32], [4, 32, 32]),
        ([8, 16, 16], [8, 16, 16]),
        ([16, 16, 16], [16, 16, 16]),
        ([2, 256, 256], [2, 256, 256]),
        ([4, 128, 128], [4, 128, 128]),
        ([4, 64, 32], [16, 32, 16]),
        ([8, 32, 16], [4, 48, 64]),
        ([64, 16, 16], [16, 32, 64]),
        // K ending half way through a 32-wide step in both stages (p = 48, r = 80).
        ([5, 32, 48], [2, 64, 80]),
    ];

    #[allow(clippy::too_many_arguments)]
    fn gpu_mul<T: Element>(
        dev: &Device,
        s: MonarchShape,
        w1: &[T],
        w2: &[T],
        bias: Option<&[T]>,
        x: &[T],
        tokens: usize,
        xs: usize,
        ys: usize,
    ) -> Vec<T> {
        let stream = dev.stream().unwrap();
        let w1d = stream.clone_htod(w1).unwrap();
        let w2d = stream.clone_htod(w2).unwrap();
        let bd = bias.map(|b| stream.clone_htod(b).unwrap());
        let xd = stream.clone_htod(&strided(x, s.n_in(), xs)).unwrap();
        let mut yd = stream
            .clone_htod(&poisoned::<T>((tokens - 1) * ys + s.n_out()))
            .unwrap();
        let w = Weights {
            shape: s,
            w1: (&w1d).into(),
            w2: (&w2d).into(),
            bias: bd.as_ref().map(Into::into),
        };
        let rows = Rows {
            tokens,
            width: s.n_in(),
            row_stride: xs,
        };
        monarch::multiply(dev, &w, (&xd).into(), rows, (&mut yd).into(), ys).unwrap();
        stream.clone_dtoh(&yd).unwrap()
    }

    #[test]
    fn multiply_gpu_matches_oracle_all_dtypes() {
        let Some(dev) = gpu("multiply_gpu_matches_oracle_all_dtypes") else {
            return;
        };
        let mul =
            |s: MonarchShape, w1: &[f32], w2: &[f32], b: Option<&[f32]>, x: &[f32], t, xs, ys| {
                gpu_mul(&dev, s, w1, w2, b, x, t, xs, ys)
            };
        check_multiply::<f32>("multiply_gpu", &mul, SHAPES);
        check_multiply::<f32>("multiply_gpu", &mul, MMA_SHAPES);
        for shapes in [SHAPES, MMA_SHAPES] {
            check_multiply::<Bf16>(
                "multiply_gpu",
                &|s, w1, w2, b, x, t, xs, ys| gpu_mul(&dev, s, w1, w2, b, x, t, xs, ys),
                shapes,
            );
            check_multiply::<F16>(
                "multiply_gpu",
                &|s, w1, w2, b, x, t, xs, ys| gpu_mul(&dev, s, w1, w2, b, x, t, xs, ys),
                shapes,
            );
        }
    }

    #[test]
    fn multiply_gpu_many_tokens_and_padded_strides() {
        // Token counts around the 16/32/64-token tiles, padded strides.
        let Some(dev) = gpu("multiply_gpu_many_tokens_and_padded_strides") else {
            return;
        };
        let mut rng = rng("gpu_tokens");
        // The last: 600 tokens of 4 blocks of 64, which the planner gives 32-token CTAs
        // (monarch_forward_mma2; the others take 16 or 64).
        let cases = MMA_SHAPES[..5]
            .iter()
            .flat_map(|&d| [15, 16, 33, 64, 129].map(|t| (d, t)))
            .chain([(([4, 64, 64], [4, 64, 64]), 600)]);
        for ((d1, d2), tokens) in cases {
            let s = shape(d1, d2);
            {
                let w1: Vec<Bf16> = random(&mut rng, s.w1_len());
                let w2: Vec<Bf16> = random(&mut rng, s.w2_len());
                let x: Vec<Bf16> = random(&mut rng, tokens * s.n_in());
                // x strides a multiple of 8 take the mma kernel (16-byte row copies); 2 past
                // one, the simt kernel (compared to the same oracle).
                let xs = s.n_in() + if tokens == 15 { 2 } else { 8 };
                let ys = s.n_out() + 4;
                let y = gpu_mul(&dev, s, &w1, &w2, None, &x, tokens, xs, ys);
                let what = format!("gpu bf16 {d1:?} {d2:?} tokens={tokens}");
                let got = unstride(&what, &y, s.n_out(), ys);
                let want = oracle::multiply(s, &f64s(&w1), &f64s(&w2), None, &f64s(&x), tokens);
                let lp = naive_lp(s, &w1, &w2, None, &x, tokens);
                let tol = 2.0 * max_abs_diff(&lp, &want) + 1e-3;
                assert_close(&what, &got, &want, tol, 0.0);
            }
        }
    }

    #[test]
    fn layer_forward_on_gpu_pads_and_truncates() {
        let Some(dev) = gpu("layer_forward_on_gpu_pads_and_truncates") else {
            return;
        };
        let stream = dev.stream().unwrap();
        let mut rng = rng("gpu_layer");
        // 250 -> 250 with 8 blocks: padded to 256 (blocks of 32), x rows 256 apart: the mma
        // kernel, its last chunk of a row partial (250 of 256 columns present); rows 250 apart
        // (not 16-byte aligned) and 10 -> 7 by 4: the simt kernel.
        for (inf, outf, blocks, xs) in [(250, 250, 8, 256), (250, 250, 8, 250), (10, 7, 4, 10)] {
            let layer = MonarchLinear::<Bf16>::new(inf, outf, blocks, true, rng.random()).unwrap();
            let w1d = stream.clone_htod(layer.w1()).unwrap();
            let w2d = stream.clone_htod(layer.w2()).unwrap();
            let bd = stream.clone_htod(layer.bias().unwrap()).unwrap();
            let w = Weights {
                shape: layer.shape(),
                w1: (&w1d).into(),
                w2: (&w2d).into(),
                bias: Some((&bd).into()),
            };
            let tokens = 37;
            let x: Vec<Bf16> = random(&mut rng, tokens * inf);
            let xd = stream.clone_htod(&strided(&x, inf, xs)).unwrap();
            let mut yd = stream.clone_htod(&poisoned::<Bf16>(tokens * outf)).unwrap();
            let rows = Rows::contiguous(tokens, inf);
            let x_rows = Rows {
                row_stride: xs,
                ..rows
            };
            layer
                .forward_with(&dev, &w, (&xd).into(), x_rows, (&mut yd).into(), outf)
                .unwrap();
            let y = stream.clone_dtoh(&yd).unwrap();
            let mut yc = poisoned::<Bf16>(tokens * outf);
            layer
                .forward(&Device::cpu(), (&x).into(), rows, (&mut yc).into(), outf)
                .unwrap();
            // Same function on both backends: agreement to a bf16 rounding of the output.
            let want: Vec<f64> = yc.iter().map(|v| v.to_f32() as f64).collect();
            assert_close(
                &format!("gpu layer {inf}->{outf} x stride {xs}"),
                &to_f32(&y),
                &want,
                2e-2,
                1e-2,
            );
        }
    }

    #[test]
    fn gpu_bad_input_is_a_typed_error() {
        let Some(dev) = gpu("gpu_bad_input_is_a_typed_error") else {
            return;
        };
        let stream = dev.stream().unwrap();
        let s = shape([4, 32, 32], [4, 32, 32]);
        let w1 = vec![Bf16::from_f32(0.5); s.w1_len()];
        let w2 = vec![Bf16::from_f32(0.5); s.w2_len()];
        let x = vec![Bf16::from_f32(1.0); 2 * s.n_in()];
        let mut y = vec![Bf16::from_f32(0.0); 2 * s.n_out()];
        let rows = Rows::contiguous(2, s.n_in());
        // Host weights on a GPU call.
        let w = Weights {
            shape: s,
            w1: Buf::Host(&w1),
            w2: Buf::Host(&w2),
            bias: None,
        };
        let xd = stream.clone_htod(&x).unwrap();
        let mut yd = stream.clone_htod(&y).unwrap();
        let e = monarch::multiply(&dev, &w, (&xd).into(), rows, (&mut yd).into(), s.n_out())
            .unwrap_err();
        assert!(matches!(e, Error::Placement { .. }), "{e}");
        let (w1d, w2d) = (
            stream.clone_htod(&w1).unwrap(),
            stream.clone_htod(&w2).unwrap(),
        );
        let wd = Weights {
            shape: s,
            w1: (&w1d).into(),
            w2: (&w2d).into(),
            bias: None,
        };
        let e = monarch::multiply(
            &dev,
            &wd,
            (&xd).into(),
            rows,
            BufMut::Host(&mut y),
            s.n_out(),
        )
        .unwrap_err();
        assert_eq!(e.arg(), Some("y"), "{e}");
        // x one element in: not 16-byte aligned for the mma kernel's copies, so the simt kernel
        // takes it (no error): every output is 0.5 * 32 * 0.5 * 32 = 256, exactly.
        let xv = xd.slice(1..);
        let mut yp = stream.clone_htod(&poisoned::<Bf16>(s.n_out())).unwrap();
        monarch::multiply(
            &dev,
            &wd,
            xv.into(),
            Rows::contiguous(1, s.n_in()),
            (&mut yp).into(),
            s.n_out(),
        )
        .unwrap();
        let got = stream.clone_dtoh(&yp).unwrap();
        assert!(got.iter().all(|v| v.to_f32() == 256.0), "{got:?}");
        // A workspace too small for the backward pass.
        let (mut gd, mut d1, mut d2, mut ws) = (
            stream.clone_htod(&x).unwrap(),
            stream.alloc_zeros::<f32>(s.w1_len()).unwrap(),
            stream.alloc_zeros::<f32>(s.w2_len()).unwrap(),
            stream.alloc_zeros::<f32>(2 * s.n_mid()).unwrap(),
        );
        let g = Grads {
            dx: (&mut gd).into(),
            dx_row_stride: s.n_in(),
            dw1: (&mut d1).into(),
            dw2: (&mut d2).into(),
            dbias: None,
            workspace: (&mut ws).into(),
        };
        let e = monarch::backward(&dev, &wd, (&xd).into(), rows, (&yd).into(), s.n_out(), g)
            .unwrap_err();
        assert_eq!(kind(&e), ("Shape", Some("workspace")), "{e}");
    }

    #[test]
    fn backward_gpu_matches_finite_differences() {
        let Some(dev) = gpu("backward_gpu_matches_finite_differences") else {
            return;
        };
        check_backward(&dev, "backward_gpu");
    }

    /// bf16 and f16 take the tensor-core weight-gradient kernel: against the exact gradients,
    /// within twice the CPU path's error.
    #[test]
    fn backward_gpu_low_precision_matches_oracle() {
        let Some(dev) = gpu("backward_gpu_low_precision_matches_oracle") else {
            return;
        };
        check_backward_lp::<Bf16>(&dev, "backward_gpu_bf16", 1.0 / 256.0);
        check_backward_lp::<F16>(&dev, "backward_gpu_f16", 1.0 / 2048.0);
    }

    /// `M^T x` on the GPU (the simt kernel) against the oracle: f32 to 1e-5, bf16 within twice
    /// the CPU path's error (same rounding points) plus two bf16 ulps of the largest output.
    #[test]
    fn transpose_gpu_matches_oracle() {
        let Some(dev) = gpu("transpose_gpu_matches_oracle") else {
            return;
        };
        let mut rng = rng("transpose_gpu");
        for (n, &(d1, d2)) in SHAPES.iter().chain(MMA_SHAPES).enumerate() {
            let s = shape(d1, d2);
            let tokens = [3, 17, 40][n % 3];
            let x: Vec<f32> = random(&mut rng, tokens * s.n_out());
            let w1: Vec<f32> = random(&mut rng, s.w1_len());
            let w2: Vec<f32> = random(&mut rng, s.w2_len());
            let bias: Vec<f32> = random(&mut rng, s.n_in());
            let want = oracle::multiply_transpose(
                s,
                &f64s(&w1),
                &f64s(&w2),
                Some(&f64s(&bias)),
                &f64s(&x),
                tokens,
            );
            let what = format!("transpose gpu {d1:?} {d2:?} tokens={tokens}");
            let got = transpose_on(&dev, s, &w1, &w2, &bias, &x, tokens);
            // f32 sums of p + r products round at the scale of the largest outputs, not of
            // each output (cancellation): the bound scales with max|want|, as in
            // check_multiply. (A per-element 1e-5 failed on [2, 256, 256] when the kernel first
            // ran, in the emulator: errors of 1e-4 at outputs near 1, which sum 512 products.)
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            assert_close(&format!("{what} f32"), &got, &want, 1e-5 * scale, 0.0);
            // bf16 rounds the inputs: compare with the oracle of the rounded inputs.
            let r = |v: &[f32]| -> Vec<f64> {
                v.iter()
                    .map(|&e| Bf16::from_f32(e).to_f32() as f64)
                    .collect()
            };
            let want_b =
                oracle::multiply_transpose(s, &r(&w1), &r(&w2), Some(&r(&bias)), &r(&x), tokens);
            let cast = |v: &[f32]| -> Vec<Bf16> { v.iter().map(|&e| Bf16::from_f32(e)).collect() };
            let (xb, w1b, w2b, bb) = (cast(&x), cast(&w1), cast(&w2), cast(&bias));
            let cpu: Vec<f64> = transpose_on(&Device::cpu(), s, &w1b, &w2b, &bb, &xb, tokens)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let scale = want_b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let tol = 2.0 * max_abs_diff(&cpu, &want_b) + scale / 128.0;
            let got = transpose_on(&dev, s, &w1b, &w2b, &bb, &xb, tokens);
            assert_close(&format!("{what} bf16"), &got, &want_b, tol, 0.0);
        }
    }
}
