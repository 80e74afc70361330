//! [`MonarchModule`]: attnkit's [`MonarchLinear`] as a candle [`Module`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Tensor};

use super::place::{Cpu, Place, runs_on, tail};
use super::{CandleElement, wrap};
use crate::monarch::{MonarchLinear, Rows, Weights};
use crate::{Buf, Device, Error};

/// A Monarch linear layer (`y = M x + bias`, weights on the host) as a candle [`Module`]:
/// `forward` takes `[..., in_features]` in the layer's element type and returns
/// `[..., out_features]`. A 2-D input is read in place with any row stride (the last stride
/// must be 1), a contiguous one of any rank too; other layouts go through candle's copy.
/// On a CUDA tensor (feature `candle-cuda`) the weights are copied to that device on the
/// first call and kept there for the next ones.
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
    /// The weights on the last CUDA device used.
    #[cfg(feature = "candle-cuda")]
    on_device: super::cuda::DeviceWeights<T>,
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
        MonarchModule {
            layer,
            #[cfg(feature = "candle-cuda")]
            on_device: Default::default(),
        }
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
        runs_on("x", xs.device())?;
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
        let y = rows.apply_op1_no_bwd(&MonarchOp { module: self })?;
        let mut out = lead.to_vec();
        out.push(self.layer.features().1);
        y.reshape(out)
    }
}

/// The candle op: the layer on `[tokens, in_features]` rows.
pub(super) struct MonarchOp<'a, T> {
    pub(super) module: &'a MonarchModule<T>,
}

impl<T: CandleElement> MonarchOp<'_, T> {
    /// The layer on `x` (from its layout's start offset) with weights `w` where `place` runs.
    pub(super) fn run<P: Place>(
        &self,
        place: &P,
        w: &Weights<'_, T>,
        x: Buf<'_, T>,
        l: &Layout,
    ) -> Result<(P::Out<T>, Shape), Error> {
        let layer = &self.module.layer;
        let &[tokens, width] = l.dims() else {
            return Err(Error::Shape {
                arg: "x",
                detail: format!("dims {:?}; expected [tokens, in_features]", l.dims()),
            });
        };
        let stride = l.stride();
        if stride[1] != 1 && width > 1 {
            return Err(Error::Stride {
                arg: "x",
                detail: format!("strides {stride:?}; the feature dimension must be contiguous"),
            });
        }
        let out_features = layer.features().1;
        let x_rows = Rows {
            tokens,
            width,
            row_stride: if tokens > 1 { stride[0] } else { width },
        };
        let mut y = place.output::<T>(tokens.saturating_mul(out_features))?;
        layer.forward_with(
            place.device(),
            w,
            x,
            x_rows,
            P::out_mut(&mut y)?,
            out_features,
        )?;
        Ok((y, Shape::from((tokens, out_features))))
    }
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
        let layer = &self.module.layer;
        let w = Weights {
            shape: layer.shape(),
            w1: layer.w1().into(),
            w2: layer.w2().into(),
            bias: layer.bias().map(Buf::Host),
        };
        let x = tail("x", x, l.start_offset())?;
        let (y, shape) = self
            .run(&Cpu(Device::cpu()), &w, x.into(), l)
            .map_err(wrap)?;
        Ok((T::storage(y), shape))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::monarch_fwd(self, &self.module.on_device, s, l)
    }
}
