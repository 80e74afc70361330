//! Where a call runs: the CPU (a thread count) or a CUDA context with its stream.
//!
//! [`Device::best`] picks the GPU when the driver library is present, a device exists and the
//! kernels were embedded at build time; otherwise the CPU, with the reason. Every call in the
//! crate takes a `&Device` and buffers that live where it runs.

#[cfg(feature = "cuda")]
use std::sync::Arc;

#[cfg(feature = "cuda")]
use cudarc::driver::CudaStream;

use crate::error::{Error, Result};

/// A backend handle: cheap to clone, `Send + Sync`.
///
/// ```
/// let dev = attnkit::Device::cpu();
/// assert!(!dev.is_cuda());
/// assert!(dev.name().starts_with("CPU"));
/// ```
#[derive(Clone, Debug)]
pub struct Device {
    pub(crate) backend: Backend,
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Cpu {
        threads: usize,
    },
    #[cfg(attnkit_cuda)]
    Cuda(crate::cuda::CudaDevice),
}

/// Why the build has no GPU path, for messages.
#[cfg(all(feature = "cuda", not(attnkit_cuda)))]
const NOT_BUILT: &str = "nvcc was not found when attnkit was built";
#[cfg(not(feature = "cuda"))]
const NOT_BUILT: &str = "the `cuda` feature is off";

impl Device {
    /// The CPU backend, using every core the OS gives this process.
    ///
    /// ```
    /// assert!(attnkit::Device::cpu().threads() >= 1);
    /// ```
    pub fn cpu() -> Device {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Device {
            backend: Backend::Cpu { threads },
        }
    }

    /// The CPU backend with exactly `threads` worker threads.
    ///
    /// ```
    /// let dev = attnkit::Device::cpu_with_threads(2).unwrap();
    /// assert_eq!(dev.threads(), 2);
    /// assert!(attnkit::Device::cpu_with_threads(0).is_err());
    /// ```
    pub fn cpu_with_threads(threads: usize) -> Result<Device> {
        if threads == 0 {
            return Err(Error::Value {
                arg: "threads",
                detail: "must be at least 1".into(),
            });
        }
        Ok(Device {
            backend: Backend::Cpu { threads },
        })
    }

    /// The best device present: the first CUDA GPU if the driver, a device and embedded
    /// kernels that run on it are all there, else the CPU. Never fails.
    ///
    /// ```
    /// let dev = attnkit::Device::best();
    /// println!("running on {}", dev.name());
    /// ```
    pub fn best() -> Device {
        Self::best_with_reason().0
    }

    /// Like [`Device::best`], with a sentence saying why that device was chosen.
    ///
    /// ```
    /// let (dev, why) = attnkit::Device::best_with_reason();
    /// assert!(!why.is_empty());
    /// # let _ = dev;
    /// ```
    pub fn best_with_reason() -> (Device, String) {
        match Device::cuda(0) {
            Ok(dev) => (
                dev,
                "CUDA device 0 found and the embedded kernels load on it".to_string(),
            ),
            Err(e) => (Device::cpu(), format!("CPU, because {e}")),
        }
    }

    /// A CUDA device by ordinal, on its primary context and default stream.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] without that GPU,
    /// [`Error::KernelsNotBuilt`] if nvcc was missing at build time,
    /// [`Error::ArchNotEmbedded`] if the embedded code cannot run on this GPU.
    ///
    /// ```
    /// match attnkit::Device::cuda(0) {
    ///     Ok(dev) => assert!(dev.is_cuda()),
    ///     Err(e) => println!("no GPU: {e}"),
    /// }
    /// ```
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(attnkit_cuda)]
        {
            let ctx = crate::cuda::context(ordinal)?;
            Self::from_stream(ctx.default_stream())
        }
        #[cfg(not(attnkit_cuda))]
        {
            let _ = ordinal;
            Err(Error::KernelsNotBuilt(NOT_BUILT))
        }
    }

    /// A CUDA device that enqueues every call on the caller's `stream` (and its context).
    /// Modules are shared with every other `Device` on the same context.
    ///
    /// ```no_run
    /// let ctx = cudarc::driver::CudaContext::new(0)?;
    /// let dev = attnkit::Device::from_stream(ctx.new_stream()?)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "cuda")]
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Device> {
        #[cfg(attnkit_cuda)]
        {
            Ok(Device {
                backend: Backend::Cuda(crate::cuda::CudaDevice::new(stream)?),
            })
        }
        #[cfg(not(attnkit_cuda))]
        {
            let _ = stream;
            Err(Error::KernelsNotBuilt(NOT_BUILT))
        }
    }

    /// A CUDA device that enqueues every call on a stream owned by another stack (burn/cubecl,
    /// tch, a candle on another cudarc version, plain C), given as the driver's raw handle.
    ///
    /// Checked before it is used: the driver must be present, some context current on this
    /// thread, `stream` a stream the driver knows on that context (a [`Error::Value`] naming
    /// `stream` otherwise), and that context its device's primary context, the one the CUDA
    /// runtime, PyTorch, candle and cubecl share ([`Error::Unsupported`] naming `stream` for
    /// another). attnkit keeps its own reference on the primary context and never destroys the
    /// stream.
    ///
    /// # Safety
    ///
    /// - `stream` is a live `CUstream` of the context current on the calling thread (or null,
    ///   that context's legacy default stream), and its owner keeps it alive as long as the
    ///   returned `Device`, a clone of it, or a buffer made with it may be used.
    /// - The handle comes from the same driver library this process loaded (one libcuda).
    /// - The caller orders work: attnkit enqueues only on `stream`, so work on other streams
    ///   that reads what attnkit writes (or writes what it reads) must wait on `stream`
    ///   (an event), as it would for any other library on that stream.
    ///
    /// ```no_run
    /// // A stream another library created, seen only as its raw handle.
    /// let ctx = cudarc::driver::CudaContext::new(0)?;
    /// let theirs = ctx.new_stream()?;
    /// // SAFETY: `theirs` is a live stream of the current (primary) context and outlives `dev`.
    /// let dev = unsafe { attnkit::Device::from_raw_stream(theirs.cu_stream()) }?;
    /// assert!(dev.is_cuda());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "cuda")]
    pub unsafe fn from_raw_stream(stream: cudarc::driver::sys::CUstream) -> Result<Device> {
        #[cfg(attnkit_cuda)]
        {
            // SAFETY: forwarded to the caller (see above).
            let stream = unsafe { crate::cuda::borrow_raw_stream(stream) }?;
            Self::from_stream(stream)
        }
        #[cfg(not(attnkit_cuda))]
        {
            let _ = stream;
            Err(Error::KernelsNotBuilt(NOT_BUILT))
        }
    }

    /// The CUDA stream calls are enqueued on (None on the CPU).
    ///
    /// ```
    /// assert!(attnkit::Device::cpu().stream().is_none());
    /// ```
    #[cfg(feature = "cuda")]
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.backend {
            Backend::Cpu { .. } => None,
            #[cfg(attnkit_cuda)]
            Backend::Cuda(c) => Some(&c.stream),
        }
    }

    /// True on a CUDA backend.
    ///
    /// ```
    /// assert!(!attnkit::Device::cpu().is_cuda());
    /// ```
    pub fn is_cuda(&self) -> bool {
        !matches!(self.backend, Backend::Cpu { .. })
    }

    /// True on attnkit's PTX emulator (`scripts/emulate.sh`): a CUDA device whose kernels
    /// run in an interpreter on the CPU. Its results are real, its timings are not, and it is
    /// thousands of times slower than a GPU: pick small shapes on it.
    ///
    /// ```
    /// assert!(!attnkit::Device::cpu().is_emulated());
    /// ```
    pub fn is_emulated(&self) -> bool {
        match &self.backend {
            Backend::Cpu { .. } => false,
            #[cfg(attnkit_cuda)]
            Backend::Cuda(c) => c.name.contains("PTX emulator"),
        }
    }

    /// Worker threads of the CPU backend (1 on a GPU: the host side is one thread).
    ///
    /// ```
    /// assert!(attnkit::Device::cpu().threads() >= 1);
    /// ```
    pub fn threads(&self) -> usize {
        match self.backend {
            Backend::Cpu { threads } => threads,
            #[cfg(attnkit_cuda)]
            Backend::Cuda(_) => 1,
        }
    }

    /// The vector path the CPU backend's hot loops and tile products dispatch to on this
    /// machine, detected at run time (a default build targets baseline x86_64 and still runs
    /// the AVX2 or AVX-512 code where the CPU has it): `"AVX-512"`, `"AVX2+FMA"`,
    /// `"AVX-512 loops, AVX2+FMA products"` (the `x86-v4` feature off), `"SSE2 (baseline)"`,
    /// `"NEON"` or `"portable"`.
    ///
    /// ```
    /// let isa = attnkit::Device::cpu_simd();
    /// assert!(!isa.is_empty());
    /// ```
    pub fn cpu_simd() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 =
                avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl");
            match (avx512, avx2, cfg!(feature = "x86-v4")) {
                (true, _, true) => "AVX-512",
                (true, _, false) => "AVX-512 loops, AVX2+FMA products",
                (false, true, _) => "AVX2+FMA",
                _ => "SSE2 (baseline)",
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            "NEON"
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            "portable"
        }
    }

    /// A human-readable name: `"CPU (8 threads)"` or the GPU's name and compute capability.
    ///
    /// ```
    /// assert_eq!(attnkit::Device::cpu_with_threads(3).unwrap().name(), "CPU (3 threads)");
    /// ```
    pub fn name(&self) -> String {
        match &self.backend {
            Backend::Cpu { threads } => format!("CPU ({threads} threads)"),
            #[cfg(attnkit_cuda)]
            Backend::Cuda(c) => {
                let (major, minor) = c.compute_capability;
                format!("{} (sm_{major}{minor}, {} SMs)", c.name, c.sm_count)
            }
        }
    }

    /// Waits for all work enqueued by this device (a no-op on the CPU, whose calls return
    /// when done).
    ///
    /// ```
    /// attnkit::Device::cpu().synchronize().unwrap();
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        match &self.backend {
            Backend::Cpu { .. } => Ok(()),
            #[cfg(attnkit_cuda)]
            Backend::Cuda(c) => {
                use crate::error::DriverContext;
                c.stream.synchronize().driver("stream synchronize")
            }
        }
    }
}

/// What the build embedded: `(nvcc version, architectures)`, or None in a CPU-only build.
///
/// ```
/// match attnkit::build_info() {
///     Some((nvcc, archs)) => println!("kernels from {nvcc} for {archs}"),
///     None => println!("CPU-only build"),
/// }
/// ```
pub fn build_info() -> Option<(&'static str, &'static str)> {
    #[cfg(attnkit_cuda)]
    {
        Some((
            crate::cuda::embedded::NVCC_VERSION,
            crate::cuda::embedded::ARCHS,
        ))
    }
    #[cfg(not(attnkit_cuda))]
    {
        None
    }
}
