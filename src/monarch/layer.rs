//! [`MonarchLinear`]: a linear layer `y = M x + bias` whose weight is a Monarch matrix, after
//! fly's `MonarchLinear`: `blocks` blocks, sizes padded up to a multiple of `blocks` (the input
//! with zeros, the output truncated), Kaiming-uniform init per block.

use super::{MAX_HOST_ELEMENTS, Mode, MonarchShape, Rows, Weights};
use crate::buffer::{Buf, BufMut};
use crate::device::Device;
use crate::dtype::Element;
use crate::error::{Error, Result};

/// A Monarch linear layer that owns its weights (host memory, element type `T`).
///
/// With `ib = ceil(in_features / blocks)` and `ob = ceil(out_features / blocks)`:
/// `w1: [blocks, ib, ib]`, `w2: [blocks, ob, ib]` when `ib*blocks < ob*blocks`, else
/// `w1: [blocks, ob, ib]`, `w2: [blocks, ob, ob]` (fly's choice: the larger square block
/// goes on the wider side). Every block is drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
/// with `fan_in` its own width (Kaiming-uniform with `a = sqrt(5)`, as `nn.Linear`), the bias
/// from the same law with `fan_in = in_features`.
///
/// ```
/// use attnkit::monarch::{MonarchLinear, Rows};
/// use attnkit::Device;
/// let layer = MonarchLinear::<f32>::new(10, 7, 4, true, 42)?; // padded to 12 in, 8 out
/// assert_eq!(layer.shape().w1_dims(), [4, 2, 3]);
/// let x = vec![0.5f32; 2 * 10];
/// let mut y = vec![f32::NAN; 2 * 7];
/// layer.forward(&Device::cpu(), (&x).into(), Rows::contiguous(2, 10), (&mut y).into(), 7)?;
/// assert!(y.iter().all(|v| v.is_finite()));
/// # Ok::<(), attnkit::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MonarchLinear<T> {
    in_features: usize,
    out_features: usize,
    shape: MonarchShape,
    w1: Vec<T>,
    w2: Vec<T>,
    bias: Option<Vec<T>>,
}

/// splitmix64: a small, good-enough generator for weight init (the crate takes no `rand`).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f64) -> f32 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((2.0 * unit - 1.0) * bound) as f32
    }
}

impl<T: Element> MonarchLinear<T> {
    /// A layer `in_features -> out_features` with `blocks` blocks, weights drawn from `seed`.
    ///
    /// Errors: [`Error::Value`] naming `in_features`/`out_features`/`blocks` if zero;
    /// [`Error::Shape`] if the padded sizes overflow (naming `w1` or `w2`), or if the weights
    /// together exceed [`MAX_HOST_ELEMENTS`](super::MAX_HOST_ELEMENTS) or cannot be
    /// allocated (naming `blocks`), before anything is allocated.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(64, 64, 8, false, 1).unwrap();
    /// assert_eq!(l.w1().len(), 8 * 8 * 8);
    /// assert!(attnkit::monarch::MonarchLinear::<f32>::new(64, 64, 0, false, 1).is_err());
    /// ```
    pub fn new(
        in_features: usize,
        out_features: usize,
        blocks: usize,
        bias: bool,
        seed: u64,
    ) -> Result<Self> {
        for (arg, v) in [
            ("in_features", in_features),
            ("out_features", out_features),
            ("blocks", blocks),
        ] {
            if v == 0 {
                return Err(Error::Value {
                    arg,
                    detail: "must be at least 1".into(),
                });
            }
        }
        let (ib, ob) = (in_features.div_ceil(blocks), out_features.div_ceil(blocks));
        let shape = if ib < ob {
            MonarchShape::new([blocks, ib, ib], [blocks, ob, ib])?
        } else {
            MonarchShape::new([blocks, ob, ib], [blocks, ob, ob])?
        };
        // Each term is below i32::MAX (the shape's bounds), so the sum cannot overflow.
        let total = shape.w1_len() + shape.w2_len() + if bias { out_features } else { 0 };
        if total > MAX_HOST_ELEMENTS {
            return Err(Error::Shape {
                arg: "blocks",
                detail: format!(
                    "{total} weights for {in_features} -> {out_features} in {blocks} blocks \
                     exceed MAX_HOST_ELEMENTS = {MAX_HOST_ELEMENTS}"
                ),
            });
        }
        let mut rng = SplitMix(seed);
        let mut init = |len: usize, fan_in: usize| -> Result<Vec<T>> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| Error::Shape {
                arg: "blocks",
                detail: format!("no memory for {len} weights"),
            })?;
            v.extend((0..len).map(|_| T::from_f32(rng.uniform(bound))));
            Ok(v)
        };
        let w1 = init(shape.w1_len(), shape.w1_dims()[2])?;
        let w2 = init(shape.w2_len(), shape.w2_dims()[2])?;
        let bias = if bias {
            Some(init(out_features, in_features)?)
        } else {
            None
        };
        Ok(MonarchLinear {
            in_features,
            out_features,
            shape,
            w1,
            w2,
            bias,
        })
    }

    /// The (padded) Monarch shape.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(6, 6, 2, false, 0).unwrap();
    /// assert_eq!(l.shape().n_in(), 6);
    /// ```
    pub fn shape(&self) -> MonarchShape {
        self.shape
    }

    /// `(in_features, out_features)`, unpadded.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(5, 3, 2, false, 0).unwrap();
    /// assert_eq!(l.features(), (5, 3));
    /// ```
    pub fn features(&self) -> (usize, usize) {
        (self.in_features, self.out_features)
    }

    /// `w1: [k, q, p]`.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(4, 4, 2, false, 0).unwrap();
    /// assert!(l.w1().iter().all(|w| w.abs() <= 1.0 / 2f32.sqrt()));
    /// ```
    pub fn w1(&self) -> &[T] {
        &self.w1
    }

    /// `w2: [l, s, r]`.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(4, 4, 2, false, 0).unwrap();
    /// assert_eq!(l.w2().len(), 8);
    /// ```
    pub fn w2(&self) -> &[T] {
        &self.w2
    }

    /// The bias (`[out_features]`), if the layer has one.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(4, 3, 2, true, 0).unwrap();
    /// assert_eq!(l.bias().map(|b| b.len()), Some(3));
    /// ```
    pub fn bias(&self) -> Option<&[T]> {
        self.bias.as_deref()
    }

    /// Mutable `(w1, w2, bias)`, to train or load the layer.
    ///
    /// ```
    /// let mut l = attnkit::monarch::MonarchLinear::<f32>::new(4, 4, 2, false, 0).unwrap();
    /// l.params_mut().0.fill(0.0);
    /// assert!(l.w1().iter().all(|&w| w == 0.0));
    /// ```
    pub fn params_mut(&mut self) -> (&mut [T], &mut [T], Option<&mut [T]>) {
        (&mut self.w1, &mut self.w2, self.bias.as_deref_mut())
    }

    /// `y = layer(x)` with the layer's own (host) weights: a CPU call. For a GPU, copy
    /// [`w1`](Self::w1), [`w2`](Self::w2) and [`bias`](Self::bias) to the device once and
    /// call [`forward_with`](Self::forward_with).
    ///
    /// `x: [tokens, in_features]` (rows `x_rows.row_stride` apart), `y: [tokens,
    /// out_features]` (row stride `y_row_stride`).
    ///
    /// ```
    /// use attnkit::monarch::{MonarchLinear, Rows};
    /// let l = MonarchLinear::<f32>::new(3, 3, 3, false, 7)?;
    /// let mut y = vec![0.0f32; 3];
    /// l.forward(&attnkit::Device::cpu(), (&[0.0f32; 3][..]).into(), Rows::contiguous(1, 3),
    ///     (&mut y).into(), 3)?;
    /// assert_eq!(y, [0.0; 3]);
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn forward(
        &self,
        dev: &Device,
        x: Buf<'_, T>,
        x_rows: Rows,
        y: BufMut<'_, T>,
        y_row_stride: usize,
    ) -> Result<()> {
        let w = Weights {
            shape: self.shape,
            w1: Buf::Host(&self.w1),
            w2: Buf::Host(&self.w2),
            bias: self.bias.as_deref().map(Buf::Host),
        };
        self.forward_with(dev, &w, x, x_rows, y, y_row_stride)
    }

    /// `y = layer(x)` with weights `w` that live where `dev` runs (copies of this layer's, or
    /// any of the same shape). The input is padded with zeros to `n_in`, the output truncated
    /// to `out_features`, without copies.
    ///
    /// Errors: [`Error::Shape`] naming `w` if `w.shape` is not this layer's shape or `bias`
    /// is not `[out_features]`, naming `x` if its width is not `in_features`; the errors of
    /// [`multiply`](super::multiply) otherwise.
    ///
    /// ```
    /// use attnkit::monarch::{MonarchLinear, Rows, Weights};
    /// let l = MonarchLinear::<f32>::new(3, 2, 2, false, 7)?;
    /// let w = Weights { shape: l.shape(), w1: l.w1().into(), w2: l.w2().into(), bias: None };
    /// let mut y = vec![f32::NAN; 2];
    /// l.forward_with(&attnkit::Device::cpu(), &w, (&[1.0f32; 3][..]).into(),
    ///     Rows::contiguous(1, 3), (&mut y).into(), 2)?;
    /// assert!(y.iter().all(|v| v.is_finite()));
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn forward_with(
        &self,
        dev: &Device,
        w: &Weights<'_, T>,
        x: Buf<'_, T>,
        x_rows: Rows,
        mut y: BufMut<'_, T>,
        y_row_stride: usize,
    ) -> Result<()> {
        if w.shape != self.shape {
            return Err(Error::Shape {
                arg: "w",
                detail: format!("shape {:?} is not the layer's {:?}", w.shape, self.shape),
            });
        }
        super::expect_width("x", x_rows.width, self.in_features, "in_features")?;
        let y_rows = Rows {
            tokens: x_rows.tokens,
            width: self.out_features,
            row_stride: y_row_stride,
        };
        super::run(dev, w, &x, x_rows, &mut y, y_rows, Mode::Forward)
    }
}
