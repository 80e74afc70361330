//! Where an op runs, written once: each op's body is generic over a [`Place`] (candle's CPU
//! storage here, candle's CUDA storage in `cuda.rs`), so the CPU tests prove the shape checks
//! and the problem set-up that the CUDA path runs too. The small tables an op reads (offsets,
//! lengths, block tables, slopes, states) are [`Table`]s: host copies, or CUDA tensors left on
//! the device (copied device to device, never through the host).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor};

use super::{CandleElement, host_i32, wrap};
use crate::dtype::{Bf16, DeviceElement, F16};
use crate::{Buf, BufMut, Device, Error};

/// A table's value type: `i32` (offsets, lengths, block tables) or `f32` (slopes, sink logits,
/// states).
pub(super) trait TableValue: Copy + Default + Send + Sync + 'static + DeviceElement {
    /// The candle dtypes a CUDA tensor of this table may have (read in place, no conversion).
    const DEVICE_DTYPES: &'static [DType];
}

impl TableValue for i32 {
    // u32 and i32 have one layout; a u32 past i32::MAX reads as negative, which the kernels'
    // re-checks treat as out of range.
    const DEVICE_DTYPES: &'static [DType] = &[DType::U32, DType::I32];
}

impl TableValue for u8 {
    const DEVICE_DTYPES: &'static [DType] = &[DType::U8];
}

impl TableValue for f32 {
    const DEVICE_DTYPES: &'static [DType] = &[DType::F32];
}

/// A small input of an op besides q, k, v.
#[derive(Clone, Debug)]
pub(super) enum Table<E> {
    /// Read to the host before the op (a CPU tensor, or a Rust slice).
    Host(Vec<E>),
    /// A CUDA tensor, flattened and contiguous, in one of [`TableValue::DEVICE_DTYPES`]: the
    /// CUDA path reads it where it is; the CPU path refuses it.
    Device(Tensor),
}

impl<E: TableValue> Table<E> {
    /// Elements held.
    pub(super) fn len(&self) -> usize {
        match self {
            Table::Host(v) => v.len(),
            Table::Device(t) => t.elem_count(),
        }
    }

    /// The host copy, if there is one.
    pub(super) fn host(&self) -> Option<&[E]> {
        match self {
            Table::Host(v) => Some(v),
            Table::Device(_) => None,
        }
    }

    /// A CUDA tensor kept where it is (checked dtype, flattened), or None for a CPU one.
    fn device(arg: &'static str, t: &Tensor) -> candle_core::Result<Option<Table<E>>> {
        if t.device().is_cpu() {
            return Ok(None);
        }
        runs_on(arg, t.device())?;
        if !E::DEVICE_DTYPES.contains(&t.dtype()) {
            return Err(wrap(Error::Unsupported {
                arg,
                detail: format!(
                    "dtype {:?} on a CUDA device; read in place it must be one of {:?}",
                    t.dtype(),
                    E::DEVICE_DTYPES
                ),
            }));
        }
        // A private contiguous copy (on the device): the CUDA path reads it as packed
        // elements, and it shares no storage (or lock) with the op's operands.
        Ok(Some(Table::Device(t.flatten_all()?.force_contiguous()?)))
    }
}

/// An index table (any rank, row-major): u32, i32 or i64 on the CPU (read to the host, each
/// value checked to fit i32), u32 or i32 on a CUDA device (kept there).
pub(super) fn index_table(arg: &'static str, t: &Tensor) -> candle_core::Result<Table<i32>> {
    match Table::device(arg, t)? {
        Some(d) => Ok(d),
        None => Ok(Table::Host(host_i32(arg, &t.flatten_all()?)?)),
    }
}

/// An f32 table (any rank, row-major), read to the host from a CPU tensor, kept on a CUDA one.
pub(super) fn f32_table(arg: &'static str, t: &Tensor) -> candle_core::Result<Table<f32>> {
    if t.dtype() != DType::F32 {
        return Err(wrap(Error::Unsupported {
            arg,
            detail: format!("dtype {:?}; expected f32", t.dtype()),
        }));
    }
    match Table::device(arg, t)? {
        Some(d) => Ok(d),
        None => Ok(Table::Host(t.flatten_all()?.to_vec1::<f32>()?)),
    }
}

/// A u8 table (a block mask, any shape, row-major; nonzero = attend).
pub(super) fn u8_table(arg: &'static str, t: &Tensor) -> candle_core::Result<Table<u8>> {
    if t.dtype() != DType::U8 {
        return Err(wrap(Error::Unsupported {
            arg,
            detail: format!("dtype {:?}; u8 (nonzero = attend)", t.dtype()),
        }));
    }
    match Table::device(arg, t)? {
        Some(d) => Ok(d),
        None => Ok(Table::Host(t.flatten_all()?.to_vec1::<u8>()?)),
    }
}

/// Where an op's buffers live.
pub(super) trait Place {
    /// An output buffer (handed back to candle).
    type Out<T: CandleElement>;
    /// A table's buffer for the call.
    type Tab<E: TableValue>;
    /// attnkit's device for the call.
    fn device(&self) -> &Device;
    /// An output of `n` elements (zeroed: rows a kernel skips read as zero).
    fn output<T: CandleElement>(&self, n: usize) -> Result<Self::Out<T>, Error>;
    /// An output lent to a call.
    fn out_mut<T: CandleElement>(o: &mut Self::Out<T>) -> Result<BufMut<'_, T>, Error>;
    /// A table, where the call reads it.
    fn table<E: TableValue>(&self, arg: &'static str, t: &Table<E>) -> Result<Self::Tab<E>, Error>;
    /// A table lent to a call.
    fn tab<E: TableValue>(t: &Self::Tab<E>) -> Result<Buf<'_, E>, Error>;
    /// An f32 table copied into an output (a state updated in place and returned).
    fn state(&self, arg: &'static str, t: &Table<f32>) -> Result<Self::Out<f32>, Error>;
    /// An output as a candle tensor of `shape` (contiguous).
    fn tensor<T: CandleElement>(&self, o: Self::Out<T>, shape: Shape) -> Tensor;
}

/// An optional table, where the call reads it.
pub(super) fn opt_table<P: Place, E: TableValue>(
    place: &P,
    arg: &'static str,
    t: Option<&Table<E>>,
) -> Result<Option<P::Tab<E>>, Error> {
    t.map(|t| place.table(arg, t)).transpose()
}

/// An optional table's buffer, lent to a call.
pub(super) fn opt_tab<P: Place, E: TableValue>(
    t: &Option<P::Tab<E>>,
) -> Result<Option<Buf<'_, E>>, Error> {
    t.as_ref().map(|t| P::tab(t)).transpose()
}

/// An operand: its buffer from the layout's start offset, and the layout.
pub(super) type Operand<'a, T> = (Buf<'a, T>, &'a Layout);

/// An op with three tensor operands (q, k, v), written once for every place.
pub(super) trait Op {
    fn run<T: CandleElement, P: Place>(
        &self,
        place: &P,
        q: Operand<'_, T>,
        k: Operand<'_, T>,
        v: Operand<'_, T>,
    ) -> Result<(P::Out<T>, Shape), Error>;
}

/// candle's CPU storage, run by attnkit's CPU path.
pub(super) struct Cpu(pub(super) Device);

impl Place for Cpu {
    type Out<T: CandleElement> = Vec<T>;
    type Tab<E: TableValue> = Vec<E>;

    fn device(&self) -> &Device {
        &self.0
    }

    fn output<T: CandleElement>(&self, n: usize) -> Result<Vec<T>, Error> {
        Ok(vec![T::default(); n])
    }

    fn out_mut<T: CandleElement>(o: &mut Vec<T>) -> Result<BufMut<'_, T>, Error> {
        Ok(o.into())
    }

    fn table<E: TableValue>(&self, arg: &'static str, t: &Table<E>) -> Result<Vec<E>, Error> {
        match t {
            Table::Host(v) => Ok(v.clone()),
            Table::Device(_) => Err(Error::Placement {
                arg,
                expected: "the CPU (where q is)",
                found: "a CUDA device",
            }),
        }
    }

    fn tab<E: TableValue>(t: &Vec<E>) -> Result<Buf<'_, E>, Error> {
        Ok(t.into())
    }

    fn state(&self, arg: &'static str, t: &Table<f32>) -> Result<Vec<f32>, Error> {
        self.table(arg, t)
    }

    fn tensor<T: CandleElement>(&self, o: Vec<T>, shape: Shape) -> Tensor {
        Tensor::from_storage(
            Storage::Cpu(T::storage(o)),
            shape,
            BackpropOp::none(),
            false,
        )
    }
}

/// `cpu_fwd` of a three-operand op, for every dtype attnkit computes in (others: an error
/// naming `q`; k or v of another dtype than q's: an error naming them).
pub(super) fn cpu_fwd3<A: Op>(
    op: &A,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    match q.0.dtype() {
        DType::F32 => cpu_fwd3_as::<f32, A>(op, q, k, v),
        DType::BF16 => cpu_fwd3_as::<Bf16, A>(op, q, k, v),
        DType::F16 => cpu_fwd3_as::<F16, A>(op, q, k, v),
        other => Err(wrap(unsupported_dtype(other))),
    }
}

fn cpu_fwd3_as<T: CandleElement, A: Op>(
    op: &A,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (Some(q), Some(k), Some(v)) = (T::slice(s1), T::slice(s2), T::slice(s3)) else {
        return Err(wrap(mixed_dtypes(s1.dtype(), s2.dtype(), s3.dtype())));
    };
    let place = Cpu(Device::cpu());
    let (o, shape) = op
        .run(
            &place,
            (tail("q", q, l1.start_offset())?.into(), l1),
            (tail("k", k, l2.start_offset())?.into(), l2),
            (tail("v", v, l3.start_offset())?.into(), l3),
        )
        .map_err(wrap)?;
    Ok((T::storage(o), shape))
}

/// q's dtype is not one attnkit computes in.
pub(super) fn unsupported_dtype(d: DType) -> Error {
    Error::Unsupported {
        arg: "q",
        detail: format!("{d:?}; f32, f16 or bf16"),
    }
}

/// k or v in another dtype than q's.
pub(super) fn mixed_dtypes(q: DType, k: DType, v: DType) -> Error {
    Error::Unsupported {
        arg: if k != q { "k" } else { "v" },
        detail: format!("k {k:?} and v {v:?} next to q's {q:?}: all three the same"),
    }
}

/// `CustomOp3` for an [`Op`]: `cpu_fwd` on candle's CPU storage and, with the `candle-cuda`
/// feature, `cuda_fwd` on candle's CUDA storage and stream.
macro_rules! custom_op3 {
    ($op:ty, $name:literal) => {
        impl candle_core::CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &candle_core::CpuStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CpuStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CpuStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                super::place::cpu_fwd3(self, (s1, l1), (s2, l2), (s3, l3))
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                s1: &candle_core::CudaStorage,
                l1: &candle_core::Layout,
                s2: &candle_core::CudaStorage,
                l2: &candle_core::Layout,
                s3: &candle_core::CudaStorage,
                l3: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                super::cuda::cuda_fwd3(self, (s1, l1), (s2, l2), (s3, l3))
            }
        }
    };
}
pub(super) use custom_op3;

/// Where an op leaves the tensors it returns besides its output (a candle op has one): the
/// LSE and entropy, a final state.
#[derive(Debug, Default)]
pub(super) struct Side(Mutex<Option<Vec<Tensor>>>);

impl Side {
    /// Leaves `v` for [`Side::take`].
    pub(super) fn put(&self, v: Vec<Tensor>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }

    /// What the op left: exactly `n` tensors.
    pub(super) fn take(&self, n: usize) -> candle_core::Result<Vec<Tensor>> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(v) if v.len() == n => Ok(v),
            _ => Err(candle_core::Error::Msg(
                "attnkit: the op left no side outputs".into(),
            )),
        }
    }
}

/// q, k, v on one device (the CPU, or a CUDA device with the `candle-cuda` feature), all
/// three in one dtype: errors naming the argument otherwise.
pub(super) fn same_place(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
    runs_on("q", q.device())?;
    for (arg, t) in [("k", k), ("v", v)] {
        if !t.device().same_device(q.device()) {
            return Err(wrap(Error::Placement {
                arg,
                expected: if q.device().is_cpu() {
                    "the CPU (where q is)"
                } else {
                    "q's CUDA device"
                },
                found: if t.device().is_cuda() {
                    "a CUDA device"
                } else if t.device().is_cpu() {
                    "the CPU"
                } else {
                    "another device"
                },
            }));
        }
        if t.dtype() != q.dtype() {
            return Err(wrap(Error::Unsupported {
                arg,
                detail: format!(
                    "dtype {:?} next to q's {:?}: all three the same",
                    t.dtype(),
                    q.dtype()
                ),
            }));
        }
    }
    Ok(())
}

/// Tensors on `dev` can run here: the CPU, or CUDA with the `candle-cuda` feature.
pub(super) fn runs_on(arg: &'static str, dev: &candle_core::Device) -> candle_core::Result<()> {
    let ok = dev.is_cpu() || (cfg!(feature = "candle-cuda") && dev.is_cuda());
    if ok {
        return Ok(());
    }
    Err(wrap(Error::Unsupported {
        arg,
        detail: format!(
            "a tensor on {dev:?}: attnkit::candle runs candle CPU tensors{}",
            if dev.is_cuda() {
                ", and CUDA ones with attnkit's `candle-cuda` feature"
            } else {
                " and CUDA ones"
            }
        ),
    }))
}

/// The storage from a layout's start offset (one past the end is the checks' to report as a
/// short buffer; further is an error here, never a panic).
pub(super) fn tail<'a, T>(
    arg: &'static str,
    s: &'a [T],
    off: usize,
) -> candle_core::Result<&'a [T]> {
    s.get(off..).ok_or_else(|| wrap(short(arg, off, s.len())))
}

/// A layout that starts past its storage.
pub(super) fn short(arg: &'static str, off: usize, len: usize) -> Error {
    Error::Shape {
        arg,
        detail: format!("layout starts at {off}, storage holds {len}"),
    }
}
