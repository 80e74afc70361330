//! Element types: `f32`, and [`Bf16`]/[`F16`], thin wrappers of `half`'s types.
//!
//! The wrappers exist because cudarc's `DeviceRepr` cannot be implemented for `half`'s types
//! outside cudarc (and cudarc's own `f16` feature pulls in `rand_distr`). They are
//! `#[repr(transparent)]`, so a `&[half::bf16]` is a `&[Bf16]`: see [`cast_slice`].

use std::fmt;

/// The element type of a buffer, at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Size of one element in bytes.
    ///
    /// ```
    /// assert_eq!(attnkit::DType::Bf16.size(), 2);
    /// ```
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        })
    }
}

/// bfloat16, as stored on host and device (a transparent wrapper of [`half::bf16`]).
#[derive(Clone, Copy, Default, PartialEq, PartialOrd)]
#[repr(transparent)]
pub struct Bf16(pub half::bf16);

/// IEEE half, as stored on host and device (a transparent wrapper of [`half::f16`]).
#[derive(Clone, Copy, Default, PartialEq, PartialOrd)]
#[repr(transparent)]
pub struct F16(pub half::f16);

impl fmt::Debug for Bf16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Debug for F16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What the device-side bounds need: a plain-old-data type cudarc can copy.
#[cfg(feature = "cuda")]
pub trait DeviceElement: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> DeviceElement for T {}
/// What the device-side bounds need (nothing, in a build without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub trait DeviceElement {}
#[cfg(not(feature = "cuda"))]
impl<T> DeviceElement for T {}

#[cfg(feature = "cuda")]
// SAFETY: both are two plain bytes; every bit pattern is a valid value, zero is +0.0.
unsafe impl cudarc::driver::DeviceRepr for Bf16 {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::ValidAsZeroBits for Bf16 {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for F16 {}
#[cfg(feature = "cuda")]
// SAFETY: as above.
unsafe impl cudarc::driver::ValidAsZeroBits for F16 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::Bf16 {}
    impl Sealed for super::F16 {}
}

/// An element type attnkit's kernels take: `f32`, [`Bf16`] or [`F16`].
///
/// ```
/// use attnkit::{Bf16, Element};
/// let x = Bf16::from_f32(1.5);
/// assert_eq!(x.to_f32(), 1.5);
/// assert_eq!(Bf16::DTYPE, attnkit::DType::Bf16);
/// ```
pub trait Element:
    sealed::Sealed + DeviceElement + Copy + Default + Send + Sync + fmt::Debug + 'static
{
    /// The run-time tag of this type.
    const DTYPE: DType;
    /// Rounds an `f32` to this type (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Widens to `f32` (exact).
    fn to_f32(self) -> f32;
    /// A quiet NaN, used to poison outputs in tests.
    fn nan() -> Self {
        Self::from_f32(f32::NAN)
    }
    /// The slice itself when this type is `f32` (the CPU path then reads it in place
    /// instead of widening a copy), else None.
    #[doc(hidden)]
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    /// Widens `src` into `dst` (equal lengths), in vector-friendly form where the type has
    /// one: the CPU path widens every tile it reads.
    #[doc(hidden)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

// #[inline]: without it a caller in another crate (tests, users' code) pays a call per
// element (it was 10% of the flash tests' time).
impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for Bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline]
    fn from_f32(x: f32) -> Self {
        Bf16(half::bf16::from_f32(x))
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self.0.to_f32()
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: the shift is exact for every value, NaNs included,
        // and vectorises (half's per-value conversion has a NaN branch).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.0.to_bits()) << 16);
        }
    }
}

impl Element for F16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn from_f32(x: f32) -> Self {
        F16(half::f16::from_f32(x))
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self.0.to_f32()
    }
    #[inline]
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let n = src.len().min(dst.len());
        // SAFETY: F16 is #[repr(transparent)] over half::f16.
        let src: &[half::f16] =
            unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<half::f16>(), n) };
        // half converts slices with F16C where the CPU has it (detected at run time).
        src.convert_to_f32_slice(&mut dst[..n]);
    }
}

/// Types with the same layout as an attnkit element, for zero-copy casts of slices.
///
/// # Safety
/// `Self` must have exactly the size, alignment and valid bit patterns of `Target`.
pub unsafe trait SameLayout<Target: Element> {}
// SAFETY: Bf16 and F16 are #[repr(transparent)] over these.
unsafe impl SameLayout<Bf16> for half::bf16 {}
// SAFETY: as above.
unsafe impl SameLayout<F16> for half::f16 {}

/// Views a slice of `half` values as attnkit elements, without copying.
///
/// ```
/// let v = vec![half::bf16::from_f32(2.0); 4];
/// let s: &[attnkit::Bf16] = attnkit::dtype::cast_slice(&v);
/// assert_eq!(s[3].0.to_f32(), 2.0);
/// ```
pub fn cast_slice<S: SameLayout<T>, T: Element>(s: &[S]) -> &[T] {
    // SAFETY: SameLayout guarantees identical size, alignment and validity.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<T>(), s.len()) }
}

/// Mutable form of [`cast_slice`].
///
/// ```
/// let mut v = vec![half::f16::ZERO; 2];
/// attnkit::dtype::cast_slice_mut::<_, attnkit::F16>(&mut v)[1] = attnkit::F16(half::f16::ONE);
/// assert_eq!(v[1].to_f32(), 1.0);
/// ```
pub fn cast_slice_mut<S: SameLayout<T>, T: Element>(s: &mut [S]) -> &mut [T] {
    // SAFETY: SameLayout guarantees identical size, alignment and validity.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<T>(), s.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice widening the CPU path uses equals the per-value `to_f32` for every bit
    /// pattern (NaNs stay NaN).
    fn widen_matches_to_f32<T: Element>(from_bits: fn(u16) -> T) {
        let src: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
        let mut dst = vec![0f32; src.len()];
        T::widen(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            let want = s.to_f32();
            assert!(
                want.to_bits() == d.to_bits() || (want.is_nan() && d.is_nan()),
                "{s:?}: {d} != {want}"
            );
        }
    }

    #[test]
    fn widen_is_exact_for_every_half_value() {
        widen_matches_to_f32(|b| Bf16(half::bf16::from_bits(b)));
        widen_matches_to_f32(|b| F16(half::f16::from_bits(b)));
    }
}
