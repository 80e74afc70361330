//! A CPU "libcuda": the CUDA driver API implemented over attnkit's PTX emulator, so an
//! unchanged program that opens the driver at run time (cudarc with `dynamic-loading`) runs
//! its kernels on the CPU. `scripts/emulate.sh CMD...` builds this library, puts it first on
//! the loader's path as `libcuda.so`/`libcuda.so.1`, and runs CMD.
//!
//! The device it reports is one sm_90 GPU ("attnkit PTX emulator (CPU, sm_90)") with H200-like
//! limits. Everything is synchronous: a copy, memset or launch is complete when its call
//! returns, so streams and events are only handles (an event records the host's clock, which
//! then times the work between two events). Modules load from PTX text or from an nvcc fatbin
//! (its PTX entry; cubins cannot run here). Launches run with the checks `ATTNKIT_EMU_CHECKS`
//! selects (memcheck, racecheck, initcheck, synccheck); a finding fails the launch with
//! CUDA_ERROR_ILLEGAL_ADDRESS (memcheck) or CUDA_ERROR_LAUNCH_FAILED, after printing where it
//! happened. Unlike a GPU's, these errors are not sticky: later calls work.
//!
//! Every other function of the driver API is exported too and returns
//! CUDA_ERROR_NOT_SUPPORTED, saying so once on stderr (see `stubs.rs`).
//!
//! Environment: `ATTNKIT_EMU_CHECKS` (comma list of checks, `all` or `none`),
//! `ATTNKIT_EMU_BUDGET` (thread-instructions per launch), `ATTNKIT_EMU_TRACE=1` (print each
//! launch to stderr), `ATTNKIT_EMU_COUNTERS=FILE` (append one JSON line per launch to FILE:
//! instructions, barriers, mma and ldmatrix counts, shared-memory bytes, wavefronts and bank
//! conflicts, global requests and sectors; see `attnkit_emulator::Stats`).

mod codes;
mod device;
mod image;
mod memory;
mod module;
mod state;
mod stream;
mod stubs;

use std::collections::HashSet;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::sys::CUresult;

/// What an entry point's body returns: `Err` carries the code the call fails with.
pub(crate) type Ret = Result<(), CUresult>;

/// Locks a mutex, taking it over from a thread that panicked while holding it: the state
/// stays usable (each update is a few field writes), and a poisoned lock must not wedge the
/// whole driver.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs an entry point's body. A panic is caught here (unwinding into C would abort the
/// client) and becomes CUDA_ERROR_UNKNOWN.
pub(crate) fn entry(name: &str, body: impl FnOnce() -> Ret) -> CUresult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => {
            report(&format!("internal error (panic) in {name}"));
            CUresult::CUDA_ERROR_UNKNOWN
        }
    }
}

/// Writes `value` through a caller's out-pointer; a null one is CUDA_ERROR_INVALID_VALUE.
///
/// # Safety
/// `ptr` must be null or valid for a write of `T`.
pub(crate) unsafe fn put<T>(ptr: *mut T, value: T) -> Ret {
    if ptr.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and the caller vouches that it is valid for a write of T.
    unsafe { ptr.write(value) };
    Ok(())
}

/// The last error message printed, for [`attnkit_emu_last_error`].
static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

/// Prints `attnkit-emulator: <msg>` to stderr and keeps it as the last error.
pub(crate) fn report(msg: &str) {
    eprintln!("attnkit-emulator: {msg}");
    *lock(&LAST_ERROR) = msg.to_string();
}

/// Names of the unsupported functions already reported, so each is said once.
static UNSUPPORTED_SEEN: Mutex<Option<HashSet<&'static CStr>>> = Mutex::new(None);

/// What every stub returns: CUDA_ERROR_NOT_SUPPORTED, saying once which function it was.
pub(crate) fn unsupported(name: &'static CStr) -> CUresult {
    let first = lock(&UNSUPPORTED_SEEN)
        .get_or_insert_with(HashSet::new)
        .insert(name);
    if first {
        eprintln!(
            "attnkit-emulator: {} is not supported by the emulator",
            name.to_string_lossy()
        );
    }
    CUresult::CUDA_ERROR_NOT_SUPPORTED
}

/// Copies the last error message the emulator printed (a failed launch's finding, a bad
/// copy, a module that did not parse) into `buf` as a NUL-terminated string, truncated to
/// `len` bytes, and returns the message's full length in bytes (0: none yet). `buf` may be
/// null to ask only the length.
///
/// # Safety
/// `buf` must be null or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn attnkit_emu_last_error(buf: *mut c_char, len: usize) -> usize {
    let msg = lock(&LAST_ERROR).clone();
    if !buf.is_null() && len > 0 {
        let n = msg.len().min(len - 1);
        // SAFETY: the caller vouches `buf` holds `len` bytes; n + 1 <= len bytes are written,
        // and `msg` is a separate allocation, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr().cast::<c_char>(), buf, n);
            buf.add(n).write(0);
        }
    }
    msg.len()
}
