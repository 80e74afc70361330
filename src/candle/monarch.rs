//! [`MonarchModule`]: attnkit's [`MonarchLinear`] as a candle [`Module`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};

use super::{CandleElement, tail, wrap};
use crate::Device;
use crate::Error;
use crate::monarch::{MonarchLinear, Rows};

/// A Monarch linear layer (`y = M x + bias`, weights on the host) as a candle [`Module`]:
/// `forward` takes `[..., in_features]` in the layer's element type and returns
/// `[..., out_features]`. A 2-D input is read in place with any row stride (the last stride
/// must be 1), a contiguous one of any rank too; other layouts go through candle's copy.
///
/// ```
/// use attnkit::candle::MonarchModule;
/// use attnkit::monarch::MonarchLinear;
/// use candle_core::{Device, Module, Tensor};
/// let layer = MonarchModule::new(MonarchLinear::<f32>::new(96, 80, 4, true, 7)?);
/// let x = Tensor::randn(0f32, 1.0, (2, 5, 96), &Device::Cpu)?;
/// let y = layer.forward(&x)?;
/// assert_eq!(y.dims(), &[2, 5, 80]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct MonarchModule<T> {
    layer: MonarchLinear<T>,
}

impl<T: CandleElement> MonarchModule<T> {
    /// Wraps `layer`.
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(8, 8, 2, false, 1)?;
    /// assert_eq!(attnkit::candle::MonarchModule::new(l).layer().features(), (8, 8));
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn new(layer: MonarchLinear<T>) -> Self {
        MonarchModule { layer }
    }

    /// The wrapped layer (its weights, shape and features).
    ///
    /// ```
    /// let l = attnkit::monarch::MonarchLinear::<f32>::new(8, 6, 2, true, 1)?;
    /// let m = attnkit::candle::MonarchModule::new(l);
    /// assert!(m.layer().bias().is_some());
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn layer(&self) -> &MonarchLinear<T> {
        &self.layer
    }
}

impl<T: CandleElement> Module for MonarchModule<T> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !xs.device().is_cpu() {
            return Err(wrap(Error::Unsupported {
                arg: "x",
                detail: format!(
                    "a tensor on {:?}: attnkit::candle runs candle CPU tensors so far",
                    xs.device()
                ),
            }));
        }
        if xs.dtype() != T::CANDLE_DTYPE {
            return Err(wrap(Error::Unsupported {
                arg: "x",
                detail: format!("dtype {:?}; the layer is {:?}", xs.dtype(), T::CANDLE_DTYPE),
            }));
        }
        let dims = xs.dims();
        let Some((&width, lead)) = dims.split_last() else {
            return Err(wrap(Error::Shape {
                arg: "x",
                detail: "a scalar; expected [..., in_features]".into(),
            }));
        };
        // [..., in] as [tokens, in]: a 2-D input as it is (any row stride), others through
        // reshape (a view when contiguous, else candle's copy).
        let tokens: usize = lead.iter().product();
        let rows = if lead.len() == 1 {
            xs.clone()
        } else {
            xs.reshape((tokens, width))?
        };
        let y = rows.apply_op1_no_bwd(&MonarchOp { layer: &self.layer })?;
        let mut out = lead.to_vec();
        out.push(self.layer.features().1);
        y.reshape(out)
    }
}

/// The candle op: the layer on `[tokens, in_features]` rows.
struct MonarchOp<'a, T> {
    layer: &'a MonarchLinear<T>,
}

impl<T: CandleElement> CustomOp1 for MonarchOp<'_, T> {
    fn name(&self) -> &'static str {
        "attnkit-monarch-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = T::slice(s).ok_or_else(|| {
            wrap(Error::Unsupported {
                arg: "x",
                detail: format!("dtype {:?}; the layer is {:?}", s.dtype(), T::CANDLE_DTYPE),
            })
        })?;
        let (tokens, width) = l.shape().dims2()?;
        let stride = l.stride();
        if stride[1] != 1 && width > 1 {
            return Err(wrap(Error::Stride {
                arg: "x",
                detail: format!("strides {stride:?}; the feature dimension must be contiguous"),
            }));
        }
        let out_features = self.layer.features().1;
        let x_rows = Rows {
            tokens,
            width,
            row_stride: if tokens > 1 { stride[0] } else { width },
        };
        let mut y = vec![T::default(); tokens * out_features];
        let x = tail("x", x, l.start_offset()).map_err(wrap)?;
        self.layer
            .forward(
                &Device::cpu(),
                x.into(),
                x_rows,
                (&mut y).into(),
                out_features,
            )
            .map_err(wrap)?;
        Ok((T::storage(y), Shape::from((tokens, out_features))))
    }
}
