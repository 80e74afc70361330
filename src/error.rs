//! The one error type of the crate.
//!
//! Every validation error names the argument it is about ([`Error::arg`]), so a caller can
//! tell `q` from `k` without parsing a message. Driver errors are wrapped, never dropped.

/// Everything that can go wrong in attnkit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape (a dimension, a length) is wrong or inconsistent with another's.
    #[error("`{arg}`: bad shape: {detail}")]
    Shape {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// Strides overlap, overrun the buffer, or the last dimension is not contiguous.
    #[error("`{arg}`: bad stride: {detail}")]
    Stride {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// A device pointer is not aligned as the kernel's vector loads need.
    #[error("`{arg}`: device pointer {addr:#x} is not {required}-byte aligned")]
    Alignment {
        /// The argument at fault.
        arg: &'static str,
        /// The address found.
        addr: u64,
        /// The alignment required, in bytes.
        required: usize,
    },
    /// A value (a scale, a window, an index) is out of its allowed range.
    #[error("`{arg}`: bad value: {detail}")]
    Value {
        /// The argument at fault.
        arg: &'static str,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// A combination the implementation does not support (a head dim, a dtype, an option).
    #[error("`{arg}`: unsupported: {detail}")]
    Unsupported {
        /// The argument at fault.
        arg: &'static str,
        /// What is not supported, and what is.
        detail: String,
    },
    /// A buffer lives on a different backend than the device the call runs on (a host slice
    /// passed to a CUDA call, or a device buffer to a CPU call, or another GPU's buffer).
    #[error("`{arg}`: buffer is on {found} but the call runs on {expected}")]
    Placement {
        /// The argument at fault.
        arg: &'static str,
        /// Where the call runs.
        expected: &'static str,
        /// Where the buffer is.
        found: &'static str,
    },
    /// The CUDA driver library (libcuda) could not be opened.
    #[error("no CUDA driver library (libcuda.so) on this machine")]
    NoDriver,
    /// The driver is present but there is no CUDA device (or not the ordinal asked for).
    #[error("no CUDA device{}", .ordinal.map(|o| format!(" with ordinal {o}")).unwrap_or_default())]
    NoDevice {
        /// The ordinal asked for, if one was.
        ordinal: Option<usize>,
    },
    /// The crate was built without its CUDA kernels (no nvcc at build time, or the `cuda`
    /// feature off).
    #[error("attnkit was built without CUDA kernels ({0})")]
    KernelsNotBuilt(&'static str),
    /// The embedded fatbin has no code this GPU can run.
    #[error("the embedded kernels ({embedded}) have no code for this GPU (sm_{major}{minor})")]
    ArchNotEmbedded {
        /// The device's compute capability, major part.
        major: i32,
        /// The device's compute capability, minor part.
        minor: i32,
        /// What the build embedded.
        embedded: &'static str,
    },
    /// A CUDA driver call or a kernel launch failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA driver error in {context}: {source}")]
    Driver {
        /// What was being done.
        context: &'static str,
        /// The driver's own error.
        source: cudarc::driver::DriverError,
    },
}

impl Error {
    /// The argument a validation error is about, if it is one.
    ///
    /// ```
    /// let e = attnkit::Error::Shape { arg: "q", detail: "empty".into() };
    /// assert_eq!(e.arg(), Some("q"));
    /// ```
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::Shape { arg, .. }
            | Error::Stride { arg, .. }
            | Error::Alignment { arg, .. }
            | Error::Value { arg, .. }
            | Error::Unsupported { arg, .. }
            | Error::Placement { arg, .. } => Some(arg),
            _ => None,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a context to a driver error: `ctx.load_module(..).driver("load module")?`.
#[cfg(attnkit_cuda)]
pub(crate) trait DriverContext<T> {
    fn driver(self, context: &'static str) -> Result<T>;
}

#[cfg(attnkit_cuda)]
impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn driver(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { context, source })
    }
}
