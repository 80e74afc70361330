//! Borrowed buffers: a host slice or a CUDA view, so one call shape serves both backends.
//!
//! attnkit never allocates on the hot path: callers own their buffers (host `Vec`s, cudarc
//! `CudaSlice`s) and lend them as [`Buf`] (read) or [`BufMut`] (written). A call checks that
//! every buffer lives where the [`Device`](crate::Device) runs, and says which one does not.

#[cfg(feature = "cuda")]
use std::mem::ManuallyDrop;

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;

/// A buffer read by a call: a host slice or a CUDA device view.
///
/// ```
/// let v = vec![1.0f32, 2.0];
/// let b: attnkit::Buf<f32> = (&v).into();
/// assert_eq!(b.len(), 2);
/// ```
#[derive(Debug)]
pub enum Buf<'a, T> {
    /// Host memory, for the CPU backend.
    Host(&'a [T]),
    /// Device memory, for the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(CudaView<'a, T>),
}

/// A buffer written by a call: a host slice or a CUDA device view.
///
/// ```
/// let mut v = vec![0.0f32; 3];
/// let b: attnkit::BufMut<f32> = (&mut v).into();
/// assert_eq!(b.len(), 3);
/// ```
#[derive(Debug)]
pub enum BufMut<'a, T> {
    /// Host memory, for the CPU backend.
    Host(&'a mut [T]),
    /// Device memory, for the CUDA backend.
    #[cfg(feature = "cuda")]
    Cuda(CudaViewMut<'a, T>),
}

impl<T> Buf<'_, T> {
    /// Number of elements.
    ///
    /// ```
    /// assert_eq!(attnkit::Buf::Host(&[0u8; 5][..]).len(), 5);
    /// ```
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(s) => s.len(),
            #[cfg(feature = "cuda")]
            Buf::Cuda(v) => v.len(),
        }
    }

    /// True when the buffer holds no element.
    ///
    /// ```
    /// assert!(attnkit::Buf::<f32>::Host(&[]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the buffer lives: `"host memory"` or `"a CUDA device"`.
    ///
    /// ```
    /// assert_eq!(attnkit::Buf::Host(&[1.0f32][..]).location(), "host memory");
    /// ```
    pub fn location(&self) -> &'static str {
        match self {
            Buf::Host(_) => HOST,
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => CUDA,
        }
    }
}

impl<T> BufMut<'_, T> {
    /// Number of elements.
    ///
    /// ```
    /// let mut v = [0f32; 4];
    /// assert_eq!(attnkit::BufMut::Host(&mut v[..]).len(), 4);
    /// ```
    pub fn len(&self) -> usize {
        match self {
            BufMut::Host(s) => s.len(),
            #[cfg(feature = "cuda")]
            BufMut::Cuda(v) => v.len(),
        }
    }

    /// True when the buffer holds no element.
    ///
    /// ```
    /// assert!(attnkit::BufMut::<f32>::Host(&mut []).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the buffer lives: `"host memory"` or `"a CUDA device"`.
    ///
    /// ```
    /// let mut v = [0f32; 1];
    /// assert_eq!(attnkit::BufMut::Host(&mut v[..]).location(), "host memory");
    /// ```
    pub fn location(&self) -> &'static str {
        match self {
            BufMut::Host(_) => HOST,
            #[cfg(feature = "cuda")]
            BufMut::Cuda(_) => CUDA,
        }
    }
}

pub(crate) const HOST: &str = "host memory";
#[cfg(feature = "cuda")]
pub(crate) const CUDA: &str = "a CUDA device";

impl<T> Buf<'_, T> {
    /// The host slice, for a CPU call; a placement error naming `arg` otherwise.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host(&self, arg: &'static str) -> Result<&[T]> {
        match self {
            Buf::Host(s) => Ok(s),
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => Err(Error::Placement {
                arg,
                expected: HOST,
                found: CUDA,
            }),
        }
    }
}

impl<T> BufMut<'_, T> {
    /// The host slice, for a CPU call; a placement error naming `arg` otherwise.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn host_mut(&mut self, arg: &'static str) -> Result<&mut [T]> {
        match self {
            BufMut::Host(s) => Ok(s),
            #[cfg(feature = "cuda")]
            BufMut::Cuda(_) => Err(Error::Placement {
                arg,
                expected: HOST,
                found: CUDA,
            }),
        }
    }
}

impl<'a, T> From<&'a [T]> for Buf<'a, T> {
    fn from(s: &'a [T]) -> Self {
        Buf::Host(s)
    }
}

impl<'a, T> From<&'a Vec<T>> for Buf<'a, T> {
    fn from(s: &'a Vec<T>) -> Self {
        Buf::Host(s)
    }
}

impl<'a, T> From<&'a mut [T]> for BufMut<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        BufMut::Host(s)
    }
}

impl<'a, T> From<&'a mut Vec<T>> for BufMut<'a, T> {
    fn from(s: &'a mut Vec<T>) -> Self {
        BufMut::Host(s)
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<&'a CudaSlice<T>> for Buf<'a, T> {
    fn from(s: &'a CudaSlice<T>) -> Self {
        Buf::Cuda(s.as_view())
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<CudaView<'a, T>> for Buf<'a, T> {
    fn from(v: CudaView<'a, T>) -> Self {
        Buf::Cuda(v)
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<&'a mut CudaSlice<T>> for BufMut<'a, T> {
    fn from(s: &'a mut CudaSlice<T>) -> Self {
        BufMut::Cuda(s.as_view_mut())
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<CudaViewMut<'a, T>> for BufMut<'a, T> {
    fn from(v: CudaViewMut<'a, T>) -> Self {
        BufMut::Cuda(v)
    }
}

/// Device memory another stack owns (burn/cubecl, tch, a candle on another cudarc version,
/// plain C), given as a raw device pointer and a length in elements, lent to calls as a
/// [`Buf`] (`(&raw).into()`) or a [`BufMut`] (`(&mut raw).into()`). attnkit never frees it:
/// dropping a `RawBuf` forgets the pointer.
///
/// Made on a CUDA [`Device`](crate::Device) (often one from
/// [`Device::from_raw_stream`](crate::Device::from_raw_stream)), whose context the memory must
/// belong to; calls then check, as for any buffer, that it is on the context they run on, and
/// its length and alignment.
///
/// ```no_run
/// use attnkit::{selftest, Device, RawBuf};
/// let dev = Device::cuda(0)?;
/// let stream = dev.stream().unwrap();
/// // Memory another library allocated, seen only as addresses.
/// let (x, y) = (stream.clone_htod(&[1.0f32, 2.0, 3.0])?, stream.alloc_zeros::<f32>(3)?);
/// use cudarc::driver::DevicePtr;
/// let (x_ptr, y_ptr) = (x.device_ptr(stream).0, y.device_ptr(stream).0);
/// // SAFETY: both point at 3 live f32 of this device's context, which outlive the RawBufs;
/// // nothing else touches them meanwhile.
/// let xr = unsafe { RawBuf::<f32>::from_raw(&dev, x_ptr, 3) }?;
/// let mut yr = unsafe { RawBuf::<f32>::from_raw(&dev, y_ptr, 3) }?;
/// selftest::scale(&dev, (&xr).into(), 1, 2.0, 0.0, (&mut yr).into())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct RawBuf<T> {
    /// A cudarc slice over the foreign pointer; leaked (never freed) on drop.
    slice: ManuallyDrop<CudaSlice<T>>,
    ptr: u64,
}

#[cfg(feature = "cuda")]
impl<T> RawBuf<T> {
    /// Wraps `len` elements of `T` at device address `ptr`, on `dev`'s context.
    ///
    /// Checked: `dev` is a CUDA device ([`Error::Value`] naming `dev`), `ptr` is not null when
    /// `len > 0` (`ptr`), `len * size_of::<T>()` does not overflow (`len`), and, where the
    /// driver can say (`cuMemGetAddressRange`; the PTX emulator cannot, and checks every
    /// access at launch instead), `ptr` is device memory of `dev`'s context (`ptr`) with room
    /// for `len` elements before its allocation ends (`len`).
    ///
    /// # Safety
    ///
    /// - `ptr..ptr + len * size_of::<T>()` is device memory of `dev`'s context (or peer memory
    ///   it may access), allocated and not freed for as long as the `RawBuf` or a
    ///   [`Buf`]/[`BufMut`] made from it may be used, by calls or by work they enqueued.
    /// - Its bytes are valid values of `T` wherever a call reads them.
    /// - Lent as a [`BufMut`], nothing else reads or writes it until the work attnkit
    ///   enqueued on `dev`'s stream is done; lent as a [`Buf`], nothing else writes it. Work
    ///   the owning stack runs on other streams must be ordered with `dev`'s stream (events).
    ///
    /// ```
    /// // A CPU device has no device memory: a typed error, nothing dereferenced.
    /// let e = unsafe { attnkit::RawBuf::<f32>::from_raw(&attnkit::Device::cpu(), 0x1000, 4) };
    /// assert_eq!(e.unwrap_err().arg(), Some("dev"));
    /// ```
    pub unsafe fn from_raw(dev: &crate::Device, ptr: u64, len: usize) -> Result<RawBuf<T>> {
        let Some(stream) = dev.stream() else {
            return Err(Error::Value {
                arg: "dev",
                detail: format!(
                    "{} has no device memory: raw device pointers need a CUDA Device",
                    dev.name()
                ),
            });
        };
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| u64::try_from(b).ok())
            .filter(|&b| ptr.checked_add(b).is_some())
            .ok_or_else(|| Error::Value {
                arg: "len",
                detail: format!(
                    "{len} elements of {} bytes from {ptr:#x} overflow the address space",
                    std::mem::size_of::<T>()
                ),
            })?;
        if ptr == 0 && len > 0 {
            return Err(Error::Value {
                arg: "ptr",
                detail: format!("is null, with {len} elements"),
            });
        }
        if bytes > 0 {
            check_range(stream, ptr, bytes)?;
        }
        // SAFETY: the caller vouches for the memory (see above); the slice is never freed by
        // us (leaked in Drop).
        let slice = unsafe { stream.upgrade_device_ptr::<T>(ptr, len) };
        Ok(RawBuf {
            slice: ManuallyDrop::new(slice),
            ptr,
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// True when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// The device address it was made from.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// Asks the driver where the allocation holding `ptr` ends; `CUDA_ERROR_NOT_SUPPORTED` (the
/// PTX emulator) skips the check.
#[cfg(feature = "cuda")]
fn check_range(stream: &cudarc::driver::CudaStream, ptr: u64, bytes: u64) -> Result<()> {
    use cudarc::driver::sys;
    stream
        .context()
        .bind_to_thread()
        .map_err(|source| Error::Driver {
            context: "bind context",
            source,
        })?;
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: valid out-pointers; `ptr` is only looked up, never dereferenced.
    match unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }.result() {
        Ok(()) => {
            let end = base.saturating_add(size as u64);
            if ptr.saturating_add(bytes) > end {
                return Err(Error::Value {
                    arg: "len",
                    detail: format!(
                        "{bytes} bytes from {ptr:#x} overrun its allocation ({size} bytes from \
                         {base:#x})"
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => Ok(()),
        Err(e) => Err(Error::Value {
            arg: "ptr",
            detail: format!("{ptr:#x} is not device memory of this device's context ({e})"),
        }),
    }
}

#[cfg(feature = "cuda")]
impl<T> Drop for RawBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is taken once, here, and never used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        // The memory belongs to its owner: forget the pointer instead of freeing it.
        let _ = slice.leak();
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<&'a RawBuf<T>> for Buf<'a, T> {
    fn from(r: &'a RawBuf<T>) -> Self {
        Buf::Cuda(r.slice.as_view())
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<&'a mut RawBuf<T>> for BufMut<'a, T> {
    fn from(r: &'a mut RawBuf<T>) -> Self {
        BufMut::Cuda(r.slice.as_view_mut())
    }
}
