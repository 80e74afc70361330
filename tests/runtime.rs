//! The runtime: device selection, typed errors, and the self-test family on both backends.

mod common;

use attnkit::{Bf16, Device, Element, Error, F16, selftest};
use common::*;

#[test]
fn best_device_is_usable_and_explains_itself() {
    let (dev, why) = Device::best_with_reason();
    eprintln!("best device: {} ({why})", dev.name());
    assert!(!why.is_empty());
    dev.synchronize().unwrap();
    // On a machine without a GPU the choice must be the CPU, not an error.
    if attnkit::build_info().is_none() {
        assert!(!dev.is_cuda());
    }
}

#[test]
fn zero_cpu_threads_is_a_typed_error() {
    let e = Device::cpu_with_threads(0).unwrap_err();
    assert_eq!(e.arg(), Some("threads"), "{e}");
}

#[test]
fn cuda_without_a_gpu_is_a_typed_error_not_a_panic() {
    match Device::cuda(0) {
        Ok(dev) => assert!(dev.is_cuda()),
        Err(e) => {
            eprintln!("Device::cuda(0): {e}");
            assert!(matches!(
                e,
                Error::NoDriver
                    | Error::NoDevice { .. }
                    | Error::KernelsNotBuilt(_)
                    | Error::ArchNotEmbedded { .. }
            ));
        }
    }
    // An ordinal past the last device is NoDevice (or no driver at all), never a panic.
    assert!(Device::cuda(1 << 20).is_err());
}

/// f64 oracle of `scale`.
fn scale_oracle<T: Element>(x: &[T], stride: usize, n: usize, alpha: f32, beta: f64) -> Vec<f64> {
    (0..n)
        .map(|i| alpha as f64 * x[i * stride].to_f32() as f64 + beta)
        .collect()
}

/// Rounding of one f32 multiply-add into T: half an ulp of T at the result, plus f32's.
fn scale_tol<T: Element>() -> f64 {
    match T::DTYPE {
        attnkit::DType::F32 => 1e-6,
        attnkit::DType::F16 => 1e-3,
        attnkit::DType::Bf16 => 8e-3,
    }
}

fn check_scale<T: Element>(dev: &Device, upload: impl Fn(&[T], usize, usize, f32, f64) -> Vec<T>) {
    let mut rng = rng("scale");
    for (n, stride) in [(1, 1), (17, 3), (1000, 1), (4097, 2)] {
        let x: Vec<T> = random(&mut rng, (n - 1) * stride + 1);
        let (alpha, beta) = (1.75f32, -0.25f64);
        let y = upload(&x, stride, n, alpha, beta);
        let want = scale_oracle(&x, stride, n, alpha, beta);
        let what = format!("scale {} n={n} stride={stride} on {}", T::DTYPE, dev.name());
        assert_close(&what, &to_f32(&y), &want, 0.0, scale_tol::<T>());
    }
}

fn cpu_scale<T: Element>(x: &[T], stride: usize, n: usize, alpha: f32, beta: f64) -> Vec<T> {
    let mut y = poisoned::<T>(n);
    selftest::scale(
        &Device::cpu(),
        x.into(),
        stride,
        alpha,
        beta,
        (&mut y).into(),
    )
    .unwrap();
    y
}

#[test]
fn scale_cpu_matches_oracle_all_dtypes() {
    let dev = Device::cpu();
    check_scale::<f32>(&dev, cpu_scale);
    check_scale::<F16>(&dev, cpu_scale);
    check_scale::<Bf16>(&dev, cpu_scale);
}

#[test]
fn scale_rejects_bad_input_naming_the_argument() {
    let dev = Device::cpu();
    let x = vec![1.0f32; 4];
    let mut y = vec![0.0f32; 3];
    let e = selftest::scale(&dev, (&x).into(), 0, 1.0, 0.0, (&mut y).into()).unwrap_err();
    assert_eq!(e.arg(), Some("x_stride"), "{e}");
    let e = selftest::scale(&dev, (&x).into(), 2, 1.0, 0.0, (&mut y).into()).unwrap_err();
    assert_eq!(e.arg(), Some("x"), "{e}");
    assert!(matches!(e, Error::Shape { .. }));
    let e = selftest::scale(&dev, (&x).into(), usize::MAX, 1.0, 0.0, (&mut y).into()).unwrap_err();
    assert_eq!(e.arg(), Some("x_stride"), "{e}");
    // Nothing was written on error.
    assert_eq!(y, [0.0; 3]);
}

#[test]
fn params_layout_check_needs_a_gpu() {
    let e = selftest::check_params_layout(&Device::cpu()).unwrap_err();
    assert_eq!(e.arg(), Some("dev"));
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use attnkit::{Buf, BufMut, RawBuf};

    fn gpu_scale<T: Element>(dev: &Device) -> impl Fn(&[T], usize, usize, f32, f64) -> Vec<T> + '_ {
        move |x, stride, n, alpha, beta| {
            let stream = dev.stream().unwrap();
            let xd = stream.clone_htod(x).unwrap();
            let mut yd = stream.clone_htod(&poisoned::<T>(n)).unwrap();
            selftest::scale(dev, (&xd).into(), stride, alpha, beta, (&mut yd).into()).unwrap();
            stream.clone_dtoh(&yd).unwrap()
        }
    }

    #[test]
    fn scale_gpu_matches_oracle_all_dtypes() {
        let Some(dev) = gpu("scale_gpu_matches_oracle_all_dtypes") else {
            return;
        };
        check_scale::<f32>(&dev, gpu_scale(&dev));
        check_scale::<F16>(&dev, gpu_scale(&dev));
        check_scale::<Bf16>(&dev, gpu_scale(&dev));
    }

    #[test]
    fn params_round_trip_through_every_family() {
        let Some(dev) = gpu("params_round_trip_through_every_family") else {
            return;
        };
        let checks = selftest::check_params_layout(&dev).unwrap();
        assert!(!checks.is_empty());
        for c in &checks {
            eprintln!("params layout {}: {} bytes, ok={}", c.family, c.size, c.ok);
        }
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    }

    #[test]
    fn host_buffer_on_gpu_call_is_a_placement_error() {
        let Some(dev) = gpu("host_buffer_on_gpu_call_is_a_placement_error") else {
            return;
        };
        let x = vec![1.0f32; 4];
        let mut y = vec![0.0f32; 4];
        let e =
            selftest::scale(&dev, Buf::Host(&x), 1, 1.0, 0.0, BufMut::Host(&mut y)).unwrap_err();
        assert_eq!(e.arg(), Some("x"), "{e}");
        let stream = dev.stream().unwrap();
        let xd = stream.clone_htod(&x).unwrap();
        let e = selftest::scale(&dev, (&xd).into(), 1, 1.0, 0.0, BufMut::Host(&mut y)).unwrap_err();
        assert_eq!(e.arg(), Some("y"), "{e}");
        // And a device buffer on a CPU call.
        let e = selftest::scale(
            &Device::cpu(),
            (&xd).into(),
            1,
            1.0,
            0.0,
            BufMut::Host(&mut y),
        )
        .unwrap_err();
        assert_eq!(e.arg(), Some("x"), "{e}");
    }

    /// A stream and buffers handed over as raw driver handles, as a stack on another cudarc
    /// version (or none) would: the kernel runs on them and nothing is freed twice.
    #[test]
    fn raw_stream_and_raw_buffers_run_the_kernel() {
        let Some(dev) = gpu("raw_stream_and_raw_buffers_run_the_kernel") else {
            return;
        };
        // "Their" stream and memory: made through cudarc here, handed over by address only.
        let ctx = dev.stream().unwrap().context().clone();
        let theirs = ctx.new_stream().unwrap();
        let x: Vec<f32> = (0..37).map(|i| i as f32 - 5.0).collect();
        let xd = theirs.clone_htod(&x).unwrap();
        let mut yd = theirs.clone_htod(&poisoned::<f32>(x.len())).unwrap();
        let (x_ptr, y_ptr) = {
            use attnkit::cudarc::driver::DevicePtr;
            (xd.device_ptr(&theirs).0, yd.device_ptr(&theirs).0)
        };
        {
            // SAFETY: `theirs` is a live stream of the current (primary) context; it and both
            // buffers outlive `raw_dev` and the RawBufs, and nothing else touches the buffers.
            let raw_dev = unsafe { Device::from_raw_stream(theirs.cu_stream()) }.unwrap();
            assert!(raw_dev.is_cuda());
            assert_eq!(raw_dev.name(), dev.name());
            assert_eq!(raw_dev.stream().unwrap().cu_stream(), theirs.cu_stream());
            // SAFETY: as above, 37 f32 each.
            let xr = unsafe { RawBuf::<f32>::from_raw(&raw_dev, x_ptr, x.len()) }.unwrap();
            let mut yr = unsafe { RawBuf::<f32>::from_raw(&raw_dev, y_ptr, x.len()) }.unwrap();
            assert_eq!((xr.len(), xr.ptr()), (x.len(), x_ptr));
            selftest::scale(&raw_dev, (&xr).into(), 1, 3.0, 0.5, (&mut yr).into()).unwrap();
            raw_dev.synchronize().unwrap();
        } // The RawBufs forget their pointers: xd and yd still own (and free) the memory.
        let y = theirs.clone_dtoh(&yd).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| 3.0 * v as f64 + 0.5).collect();
        assert_close("raw y", &y, &want, 1e-6, 1e-6);
        // The owner's stream still works after attnkit let go of it.
        theirs.memset_zeros(&mut yd).unwrap();
        theirs.synchronize().unwrap();
    }

    #[test]
    fn raw_handles_reject_bad_input_naming_the_argument() {
        let Some(dev) = gpu("raw_handles_reject_bad_input_naming_the_argument") else {
            return;
        };
        let stream = dev.stream().unwrap();
        let xd = stream.alloc_zeros::<f32>(16).unwrap();
        let ptr = {
            use attnkit::cudarc::driver::DevicePtr;
            xd.device_ptr(stream).0
        };
        // SAFETY (every call below): each is refused before the pointer is used.
        let e = unsafe { RawBuf::<f32>::from_raw(&Device::cpu(), ptr, 16) }.unwrap_err();
        assert_eq!(e.arg(), Some("dev"), "{e}");
        let e = unsafe { RawBuf::<f32>::from_raw(&dev, 0, 16) }.unwrap_err();
        assert_eq!(e.arg(), Some("ptr"), "{e}");
        let e = unsafe { RawBuf::<f32>::from_raw(&dev, ptr, usize::MAX / 2) }.unwrap_err();
        assert_eq!(e.arg(), Some("len"), "{e}");
        // Empty is fine, even at null.
        let empty = unsafe { RawBuf::<f32>::from_raw(&dev, 0, 0) }.unwrap();
        assert!(empty.is_empty());
        // A raw buffer is checked like any other: too short for the call.
        let short = unsafe { RawBuf::<f32>::from_raw(&dev, ptr, 4) }.unwrap();
        let mut yd = stream.alloc_zeros::<f32>(8).unwrap();
        let e = selftest::scale(&dev, (&short).into(), 1, 1.0, 0.0, (&mut yd).into()).unwrap_err();
        assert_eq!(e.arg(), Some("x"), "{e}");
        // A stream of this context, but no context current on this thread: refused by name.
        let other = std::thread::spawn({
            let raw = stream.cu_stream() as usize;
            move || unsafe {
                Device::from_raw_stream(raw as attnkit::cudarc::driver::sys::CUstream)
            }
        });
        let e = other.join().unwrap().unwrap_err();
        assert_eq!(e.arg(), Some("stream"), "{e}");
    }

    #[test]
    fn misaligned_device_pointer_is_a_typed_error() {
        let Some(dev) = gpu("misaligned_device_pointer_is_a_typed_error") else {
            return;
        };
        let stream = dev.stream().unwrap();
        let xd = stream.clone_htod(&[0u8; 64]).unwrap();
        // A view one byte in, reinterpreted as f32: misaligned for the kernel's loads.
        let bytes = xd.slice(1..);
        // SAFETY: 60 f32 fit in the 63 bytes left; the call must refuse before reading.
        let xv = unsafe { bytes.transmute::<f32>(15) }.unwrap();
        let mut yd = stream.alloc_zeros::<f32>(15).unwrap();
        let e = selftest::scale(&dev, xv.into(), 1, 1.0, 0.0, (&mut yd).into()).unwrap_err();
        assert!(matches!(e, Error::Alignment { arg: "x", .. }), "{e}");
    }
}
