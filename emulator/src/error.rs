//! Errors: a module that does not parse, a launch the driver would refuse, a check's finding.

use std::fmt;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each naming where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PTX text did not parse, or uses an instruction form the interpreter lacks.
    #[error("PTX line {line}: {msg}")]
    Parse {
        /// 1-based line in the PTX text.
        line: u32,
        /// What was wrong, naming the instruction or directive.
        msg: String,
    },
    /// A launch the driver refuses before running anything.
    #[error("invalid launch of `{kernel}`: {error}")]
    Config {
        /// The kernel's name.
        kernel: String,
        /// What the launch got wrong.
        error: ConfigError,
    },
    /// A check found a defect while the kernel ran; the launch failed.
    #[error("{0}")]
    Finding(Box<Finding>),
    /// Host-side memory API misuse (unknown pointer, out of range copy, out of memory).
    #[error("device memory: {0}")]
    Memory(String),
    /// The launch ran past its instruction budget (likely an endless loop).
    #[error(
        "`{kernel}` ran past its budget of {budget} thread-instructions (set ATTNKIT_EMU_BUDGET to raise it)"
    )]
    Budget {
        /// The kernel's name.
        kernel: String,
        /// The budget it ran past.
        budget: u64,
    },
}

/// Why a launch configuration is refused (the driver maps each to its own error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A grid or block dimension is zero.
    #[error("grid {grid:?} / block {block:?} has a zero dimension")]
    ZeroDimension {
        /// Grid dimensions.
        grid: [u32; 3],
        /// Block dimensions.
        block: [u32; 3],
    },
    /// More threads per block than the device or the kernel's `.maxntid` allows.
    #[error("{threads} threads per block, at most {limit} allowed")]
    TooManyThreads {
        /// Threads asked for.
        threads: u64,
        /// The limit.
        limit: u64,
    },
    /// Grid dimension beyond the device's limit.
    #[error("grid {grid:?} exceeds the device's limits")]
    GridTooLarge {
        /// Grid dimensions.
        grid: [u32; 3],
    },
    /// Static plus dynamic shared memory over the limit.
    #[error("{bytes} bytes of shared memory (static + dynamic), at most {limit}")]
    TooMuchShared {
        /// Bytes asked for.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The parameter buffer is shorter than the kernel's parameters.
    #[error("parameter buffer of {got} bytes, the kernel's parameters take {need}")]
    ParamSize {
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
}

/// The check that found a defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// An access outside a live allocation or shared window, or misaligned.
    Memcheck,
    /// Two threads touched the same shared byte between the same barriers, one writing.
    Racecheck,
    /// A read of memory never written (shared: this launch; global: since allocation).
    Initcheck,
    /// A barrier or collective that not every thread it names reaches, or a mask mismatch.
    Synccheck,
    /// A read of shared memory a `cp.async` is still writing (no `wait_group` yet).
    AsyncCopy,
    /// A fault the hardware would raise whatever the checks (`trap`, bad instruction use).
    Fault,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Memcheck => "memcheck",
            Check::Racecheck => "racecheck",
            Check::Initcheck => "initcheck",
            Check::Synccheck => "synccheck",
            Check::AsyncCopy => "cp.async check",
            Check::Fault => "fault",
        })
    }
}

/// One defect found while a kernel ran, with everything needed to find it in the source.
#[derive(Debug, Clone)]
pub struct Finding {
    /// Which check.
    pub check: Check,
    /// The kernel's name (mangled, as in the PTX).
    pub kernel: String,
    /// 1-based PTX line of the instruction.
    pub ptx_line: u32,
    /// The `.cu`/`.cuh` file and line from `.loc`, where nvcc emitted line info.
    pub source: Option<(String, u32)>,
    /// The instruction's text.
    pub instruction: String,
    /// The CTA (`%ctaid`).
    pub cta: [u32; 3],
    /// The thread (`%tid`).
    pub thread: [u32; 3],
    /// The address involved, if any.
    pub address: Option<u64>,
    /// What happened, e.g. "4-byte shared store out of bounds (window 0..1024)".
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in `{}`: {}", self.check, self.kernel, self.detail)?;
        if let Some(a) = self.address {
            write!(f, " at address {a:#x}")?;
        }
        write!(
            f,
            "; CTA {:?}, thread {:?}; PTX line {} `{}`",
            self.cta, self.thread, self.ptx_line, self.instruction
        )?;
        if let Some((file, line)) = &self.source {
            write!(f, "; source {file}:{line}")?;
        }
        Ok(())
    }
}
