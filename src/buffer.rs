//! Borrowed buffers: a host slice or a CUDA view, so one call shape serves both backends.
//!
//! attnkit never allocates on the hot path: callers own their buffers (host `Vec`s, cudarc
//! `CudaSlice`s) and lend them as [`Buf`] (read) or [`BufMut`] (written). A call checks that
//! every buffer lives where the [`Device`](crate::Device) runs, and says which one does not.

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
