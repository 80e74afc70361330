//! A PTX interpreter with sanitizer checks, for running attnkit's kernels (and any nvcc
//! PTX of the same subset) without a GPU.
//!
//! It executes the PTX nvcc emitted, under CUDA's execution model: a grid of CTAs, threads
//! with their own program counters, `bar.sync` across the CTA, and warp collectives that
//! complete only when every lane of their mask has reached them. Every launch is checked
//! (memcheck, racecheck, initcheck, synccheck; each can be turned off): a finding fails the
//! launch and names the kernel, the PTX line, the `.cu` line, the CTA, the thread and the
//! address. `driver/` wraps it as a CPU "libcuda" so unchanged CUDA programs run on it.
//!
//! What it does not model: timing, the error of `.approx` functions (they are computed
//! exactly), and the weak memory model (every access is sequentially consistent).
//!
//! ```
//! use attnkit_emulator::{Checks, Launch, Memory, Module};
//! let ptx = r#"
//! .version 8.0
//! .target sm_90
//! .address_size 64
//! .visible .entry twice(.param .u64 p, .param .u32 n)
//! {
//!     .reg .pred %p<2>; .reg .b32 %r<6>; .reg .b64 %rd<5>;
//!     ld.param.u64 %rd1, [p];
//!     ld.param.u32 %r1, [n];
//!     mov.u32 %r2, %tid.x;
//!     setp.ge.u32 %p1, %r2, %r1;
//!     @%p1 bra DONE;
//!     cvta.to.global.u64 %rd2, %rd1;
//!     mul.wide.u32 %rd3, %r2, 4;
//!     add.s64 %rd4, %rd2, %rd3;
//!     ld.global.u32 %r3, [%rd4];
//!     shl.b32 %r4, %r3, 1;
//!     st.global.u32 [%rd4], %r4;
//! DONE:
//!     ret;
//! }
//! "#;
//! let module = Module::parse(ptx)?;
//! let kernel = module.kernel("twice").expect("kernel");
//! let mut mem = Memory::new(1 << 20);
//! let buf = mem.alloc(12)?;
//! mem.write(buf, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0])?;
//! let mut params = Vec::new();
//! params.extend_from_slice(&buf.to_le_bytes());
//! params.extend_from_slice(&3u32.to_le_bytes());
//! let launch = Launch { grid: [1, 1, 1], block: [32, 1, 1], dynamic_shared: 0, params: &params };
//! attnkit_emulator::launch(&module, kernel, &launch, &mut mem, &Checks::default())?;
//! let mut out = [0u8; 12];
//! mem.read(buf, &mut out)?;
//! assert_eq!(out, [2, 0, 0, 0, 4, 0, 0, 0, 6, 0, 0, 0]);
//! # Ok::<(), attnkit_emulator::Error>(())
//! ```

mod alu;
mod counters;
mod decode;
mod error;
mod exec;
mod ir;
mod lex;
mod memory;
mod module;
mod parse;
mod shared;

pub use counters::Stats;
pub use error::{Check, ConfigError, Error, Finding, Result};
pub use exec::{Checks, Launch, check_config, launch};
pub use memory::Memory;
pub use module::{Kernel, Limits, Module, Param};
