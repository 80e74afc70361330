//! The candle adapter's CUDA place (feature `candle-cuda`): attnkit's kernels on candle's
//! CUDA buffers, enqueued on candle's own stream (so they order with candle's ops and need no
//! synchronisation), with the operands' strides taken from candle's layouts. Tables given as
//! CUDA tensors are copied device to device, never through the host.

use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr};

use super::decode::AppendOp;
use super::monarch::MonarchOp;
use super::place::{Op, Place, Table, TableValue, mixed_dtypes, short, unsupported_dtype};
use super::{CandleElement, wrap};
use crate::dtype::{Bf16, F16};
use crate::monarch::Weights;
use crate::{Buf, BufMut, Device, Error};

/// candle's CUDA device and stream, and attnkit's device on that stream.
pub(super) struct Cuda {
    candle: CudaDevice,
    stream: Arc<CudaStream>,
    dev: Device,
}

impl Cuda {
    /// The place of `s`'s device: attnkit enqueues on candle's stream. attnkit's device for a
    /// stream is made once (driver queries, module lookup) and kept for the next ops.
    pub(super) fn of(s: &CudaStorage) -> candle_core::Result<Cuda> {
        /// The devices of the last streams seen (a model uses one or a few).
        static DEVICES: Mutex<Vec<Device>> = Mutex::new(Vec::new());
        const KEEP: usize = 8;
        let candle = s.device().clone();
        let stream = candle.cuda_stream();
        let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let known = devices
            .iter()
            .find(|d| d.stream().is_some_and(|x| Arc::ptr_eq(x, &stream)))
            .cloned();
        let dev = match known {
            Some(d) => d,
            None => {
                let d = Device::from_stream(stream.clone()).map_err(wrap)?;
                if devices.len() == KEEP {
                    devices.remove(0);
                }
                devices.push(d.clone());
                d
            }
        };
        Ok(Cuda {
            candle,
            stream,
            dev,
        })
    }
}

/// A driver failure while `context`.
fn driver(context: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |source| Error::Driver { context, source }
}

/// `s`'s buffer viewed as `E` (another dtype than `dtypes` is an error naming `arg`).
///
/// # Safety
/// Every bit pattern of each of `dtypes` is a valid `E` of the same size.
unsafe fn view_as<'a, E>(
    arg: &'static str,
    s: &'a CudaStorage,
    dtypes: &[DType],
) -> Result<CudaView<'a, E>, Error> {
    if !dtypes.contains(&s.dtype()) {
        return Err(Error::Unsupported {
            arg,
            detail: format!("dtype {:?}; expected one of {dtypes:?}", s.dtype()),
        });
    }
    fn cast<'a, N: CudaDType + DeviceRepr + 'a, E>(
        arg: &'static str,
        s: &'a CudaStorage,
    ) -> Result<CudaView<'a, E>, Error> {
        let slice = s.as_cuda_slice::<N>().map_err(|e| Error::Unsupported {
            arg,
            detail: e.to_string(),
        })?;
        if size_of::<N>() != size_of::<E>() {
            return Err(Error::Unsupported {
                arg,
                detail: "an element of another size".into(),
            });
        }
        // SAFETY: `E` is `N` itself, or a `#[repr(transparent)]` wrapper of it, or an integer
        // of the same size (u32 read as i32, which the kernels range-check): every bit pattern
        // of `N` is a valid `E` (view_as' contract), and the length in elements is the same.
        unsafe { slice.transmute::<E>(slice.len()) }.ok_or(Error::Shape {
            arg,
            detail: "buffer smaller than its elements".into(),
        })
    }
    match s.dtype() {
        DType::F32 => cast::<f32, E>(arg, s),
        DType::BF16 => cast::<half::bf16, E>(arg, s),
        DType::F16 => cast::<half::f16, E>(arg, s),
        DType::U8 => cast::<u8, E>(arg, s),
        DType::U32 => cast::<u32, E>(arg, s),
        DType::I32 => cast::<i32, E>(arg, s),
        other => Err(Error::Unsupported {
            arg,
            detail: format!("dtype {other:?}"),
        }),
    }
}

/// An operand's buffer from its layout's start offset.
fn operand<'a, T: CandleElement>(
    arg: &'static str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, T>, Error> {
    // SAFETY: `T` is candle's `T::CANDLE_DTYPE` type or its transparent wrapper.
    let v = unsafe { view_as::<T>(arg, s, &[T::CANDLE_DTYPE]) }?;
    let len = v.len();
    v.try_slice(l.start_offset()..)
        .ok_or_else(|| short(arg, l.start_offset(), len))
}

impl Place for Cuda {
    type Out<T: CandleElement> = CudaSlice<T::Native>;
    type Tab<E: TableValue> = CudaSlice<E>;

    fn device(&self) -> &Device {
        &self.dev
    }

    fn output<T: CandleElement>(&self, n: usize) -> Result<CudaSlice<T::Native>, Error> {
        self.stream
            .alloc_zeros::<T::Native>(n)
            .map_err(driver("allocating an output"))
    }

    fn out_mut<T: CandleElement>(o: &mut CudaSlice<T::Native>) -> Result<BufMut<'_, T>, Error> {
        let n = o.len();
        // SAFETY: `T` is `T::Native` or its `#[repr(transparent)]` wrapper.
        let v = unsafe { o.transmute_mut::<T>(n) }.ok_or(Error::Shape {
            arg: "o",
            detail: "buffer smaller than its elements".into(),
        })?;
        Ok(BufMut::Cuda(v))
    }

    fn table<E: TableValue>(&self, arg: &'static str, t: &Table<E>) -> Result<CudaSlice<E>, Error> {
        match t {
            // candle's own upload: it keeps the host copy alive while a graph is captured.
            Table::Host(v) => self.candle.clone_htod(v).map_err(|e| Error::Value {
                arg,
                detail: format!("copying it to the device: {e}"),
            }),
            Table::Device(t) => {
                let (st, l) = t.storage_and_layout();
                let Storage::Cuda(cs) = &*st else {
                    return Err(Error::Placement {
                        arg,
                        expected: "q's CUDA device",
                        found: "another device",
                    });
                };
                if !cs.device().same_device(&self.candle) {
                    return Err(Error::Placement {
                        arg,
                        expected: "q's CUDA device",
                        found: "another CUDA device",
                    });
                }
                // SAFETY: each of `E::DEVICE_DTYPES` has `E`'s size and every bit pattern of
                // it is an `E` (u8 as u8, f32 as f32, u32 or i32 as i32).
                let all = unsafe { view_as::<E>(arg, cs, E::DEVICE_DTYPES) }?;
                let (off, n) = (l.start_offset(), t.elem_count());
                let len = all.len();
                let v = all
                    .try_slice(off..off.saturating_add(n))
                    .ok_or_else(|| short(arg, off, len))?;
                self.stream
                    .clone_dtod(&v)
                    .map_err(driver("copying a table on the device"))
            }
        }
    }

    fn tab<E: TableValue>(t: &CudaSlice<E>) -> Result<Buf<'_, E>, Error> {
        Ok(t.into())
    }

    fn state(&self, arg: &'static str, t: &Table<f32>) -> Result<CudaSlice<f32>, Error> {
        self.table(arg, t)
    }

    fn tensor<T: CandleElement>(&self, o: CudaSlice<T::Native>, shape: Shape) -> Tensor {
        let s = <T::Native as CudaDType>::wrap_cuda_slice(o, self.candle.clone());
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }
}

/// `cuda_fwd` of a three-operand op, for every dtype attnkit computes in.
pub(super) fn cuda_fwd3<A: Op>(
    op: &A,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (dq, dk, dv) = (q.0.dtype(), k.0.dtype(), v.0.dtype());
    if dk != dq || dv != dq {
        return Err(wrap(mixed_dtypes(dq, dk, dv)));
    }
    match dq {
        DType::F32 => cuda_fwd3_as::<f32, A>(op, q, k, v),
        DType::BF16 => cuda_fwd3_as::<Bf16, A>(op, q, k, v),
        DType::F16 => cuda_fwd3_as::<F16, A>(op, q, k, v),
        other => Err(wrap(unsupported_dtype(other))),
    }
}

fn cuda_fwd3_as<T: CandleElement, A: Op>(
    op: &A,
    (s1, l1): (&CudaStorage, &Layout),
    (s2, l2): (&CudaStorage, &Layout),
    (s3, l3): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let place = Cuda::of(s1)?;
    for (arg, s) in [("k", s2), ("v", s3)] {
        if !s.device().same_device(&place.candle) {
            return Err(wrap(Error::Placement {
                arg,
                expected: "q's CUDA device",
                found: "another CUDA device",
            }));
        }
    }
    let run = || -> Result<(CudaSlice<T::Native>, Shape), Error> {
        let q = operand::<T>("q", s1, l1)?;
        let k = operand::<T>("k", s2, l2)?;
        let v = operand::<T>("v", s3, l3)?;
        op.run(
            &place,
            (Buf::Cuda(q), l1),
            (Buf::Cuda(k), l2),
            (Buf::Cuda(v), l3),
        )
    };
    let (o, shape) = run().map_err(wrap)?;
    Ok((
        <T::Native as CudaDType>::wrap_cuda_slice(o, place.candle.clone()),
        shape,
    ))
}

/// A Monarch layer's weights on the CUDA context they were last used on, uploaded on the first
/// call there (shared by clones of the module, which hold the same layer).
#[derive(Clone, Default)]
pub(super) struct DeviceWeights<T>(Arc<Mutex<Option<Uploaded<T>>>>);

impl<T> std::fmt::Debug for DeviceWeights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceWeights")
    }
}

struct Uploaded<T> {
    /// The stream they were copied on (and are read on: no other ordering is needed).
    stream: Arc<CudaStream>,
    w1: CudaSlice<T>,
    w2: CudaSlice<T>,
    bias: Option<CudaSlice<T>>,
}

/// `cuda_fwd` of [`MonarchModule`](super::MonarchModule)'s op.
pub(super) fn monarch_fwd<T: CandleElement>(
    op: &MonarchOp<'_, T>,
    cache: &DeviceWeights<T>,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let place = Cuda::of(s)?;
    let run = || -> Result<(CudaSlice<T::Native>, Shape), Error> {
        // SAFETY: as in `operand`.
        let x = unsafe { view_as::<T>("x", s, &[T::CANDLE_DTYPE]) }?;
        let len = x.len();
        let x = x
            .try_slice(l.start_offset()..)
            .ok_or_else(|| short("x", l.start_offset(), len))?;
        let layer = op.module.layer();
        let mut held = cache.0.lock().unwrap_or_else(|e| e.into_inner());
        if held
            .as_ref()
            .is_none_or(|w| !Arc::ptr_eq(&w.stream, &place.stream))
        {
            let up = |v: &[T]| {
                place
                    .stream
                    .clone_htod(v)
                    .map_err(driver("copying Monarch weights to the device"))
            };
            *held = Some(Uploaded {
                stream: place.stream.clone(),
                w1: up(layer.w1())?,
                w2: up(layer.w2())?,
                bias: layer.bias().map(up).transpose()?,
            });
        }
        let Some(w) = held.as_ref() else {
            return Err(Error::Value {
                arg: "w",
                detail: "weights not on the device".into(),
            });
        };
        let weights = Weights {
            shape: layer.shape(),
            w1: (&w.w1).into(),
            w2: (&w.w2).into(),
            bias: w.bias.as_ref().map(Buf::from),
        };
        op.run(&place, &weights, Buf::Cuda(x), l)
    };
    let (y, shape) = run().map_err(wrap)?;
    Ok((
        <T::Native as CudaDType>::wrap_cuda_slice(y, place.candle.clone()),
        shape,
    ))
}

/// `cuda_fwd` of the in-place KV cache append: `s1` the cache written, `s2` the new rows.
pub(super) fn append_fwd(
    op: &AppendOp<'_>,
    s1: &mut CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> candle_core::Result<()> {
    fn go<T: CandleElement>(
        op: &AppendOp<'_>,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (cache_arg, new_arg) = op.args();
        let place = Cuda::of(s2)?;
        if !s1.device().same_device(&place.candle) {
            return Err(wrap(Error::Placement {
                arg: new_arg,
                expected: "the cache's CUDA device",
                found: "another CUDA device",
            }));
        }
        let mut run = || -> Result<(), Error> {
            let new = operand::<T>(new_arg, s2, l2)?;
            let all = s1
                .as_cuda_slice_mut::<T::Native>()
                .map_err(|e| Error::Unsupported {
                    arg: cache_arg,
                    detail: e.to_string(),
                })?;
            let n = all.len();
            // SAFETY: `T` is `T::Native` or its `#[repr(transparent)]` wrapper.
            let mut cache = unsafe { all.transmute_mut::<T>(n) }.ok_or(Error::Shape {
                arg: cache_arg,
                detail: "buffer smaller than its elements".into(),
            })?;
            let off = l1.start_offset();
            let cache = cache
                .try_slice_mut(off..)
                .ok_or_else(|| short(cache_arg, off, n))?;
            op.run(&place, (BufMut::Cuda(cache), l1), (Buf::Cuda(new), l2))
        };
        run().map_err(wrap)
    }
    match s1.dtype() {
        DType::F32 => go::<f32>(op, s1, l1, s2, l2),
        DType::BF16 => go::<Bf16>(op, s1, l1, s2, l2),
        DType::F16 => go::<F16>(op, s1, l1, s2, l2),
        other => Err(wrap(Error::Unsupported {
            arg: op.args().0,
            detail: format!("{other:?}; f32, f16 or bf16"),
        })),
    }
}
