//! A parsed PTX module: its kernels, their parameters, shared memory and decoded code.

use crate::error::Result;
use crate::parse;

pub(crate) use crate::parse::Code;

/// A loaded PTX module.
pub struct Module {
    pub(crate) kernels: Vec<Kernel>,
}

impl Module {
    /// Parses and decodes PTX text (what nvcc `-ptx` writes, or what a fatbin holds).
    pub fn parse(ptx: &str) -> Result<Module> {
        parse::parse_module(ptx)
    }

    /// The kernel (`.entry`) of that (mangled) name.
    pub fn kernel(&self, name: &str) -> Option<&Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }

    /// Every kernel in the module.
    pub fn kernels(&self) -> impl Iterator<Item = &Kernel> {
        self.kernels.iter()
    }
}

/// One kernel parameter's place in the parameter buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// Byte offset in the buffer (each parameter aligned to its alignment).
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// Alignment in bytes.
    pub align: u32,
}

/// One `.entry` of a module.
pub struct Kernel {
    pub(crate) name: String,
    pub(crate) params: Vec<Param>,
    pub(crate) static_shared: u32,
    pub(crate) max_threads: Option<u32>,
    pub(crate) local_bytes: u32,
    pub(crate) num_regs: u32,
    pub(crate) code: Code,
}

impl Kernel {
    /// The (mangled) name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The parameters in order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }
    /// Bytes the parameter buffer takes.
    pub fn param_bytes(&self) -> u32 {
        self.params.last().map_or(0, |p| p.offset + p.size)
    }
    /// Static shared memory (bytes), the variables this kernel uses laid out in order.
    pub fn static_shared_bytes(&self) -> u32 {
        self.static_shared
    }
    /// `.maxntid` (product of its dimensions) if the kernel declares it.
    pub fn max_threads(&self) -> Option<u32> {
        self.max_threads
    }
    /// Local (stack) bytes per thread.
    pub fn local_bytes(&self) -> u32 {
        self.local_bytes
    }
    /// Registers per thread as the PTX declares them (virtual; an upper bound on ptxas').
    pub fn num_regs(&self) -> u32 {
        self.num_regs
    }
}

/// The device limits a launch is checked against (an H200-like sm_90 device).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Threads per block.
    pub max_threads_per_block: u32,
    /// Block dimensions.
    pub max_block: [u32; 3],
    /// Grid dimensions.
    pub max_grid: [u32; 3],
    /// Shared memory per block with the opt-in (static + dynamic).
    pub max_shared_optin: u32,
    /// Shared memory per block without the opt-in.
    pub max_shared_default: u32,
}

impl Limits {
    /// The limits of compute capability 9.0.
    pub const SM90: Limits = Limits {
        max_threads_per_block: 1024,
        max_block: [1024, 1024, 64],
        max_grid: [i32::MAX as u32, 65535, 65535],
        max_shared_optin: 232_448,
        max_shared_default: 49_152,
    };
}
