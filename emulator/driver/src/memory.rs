//! Device memory (the interpreter's [`attnkit_emulator::Memory`]), copies, memsets, and
//! page-locked host memory (ordinary host memory here).
#![allow(non_snake_case)]

use std::alloc::Layout;
use std::ffi::{c_uint, c_ushort, c_void};

use attnkit_emulator::Error;
use cudarc::driver::sys::{CUdeviceptr, CUresult, CUstream};

use crate::state::{State, from_ptr, state};
use crate::{Ret, entry, put, report};

/// Reports a memory API misuse (a copy outside an allocation, a bad free) and fails with
/// `code`: on a GPU it would be a silent error code, here it names the addresses.
fn mem_error(e: Error, code: CUresult) -> CUresult {
    report(&e.to_string());
    code
}

/// The state, with a current context and (for the async forms) a valid stream.
fn with_stream(
    stream: Option<CUstream>,
) -> Result<std::sync::MutexGuard<'static, State>, CUresult> {
    let st = state();
    st.current()?;
    if let Some(s) = stream {
        st.stream(from_ptr(s))?;
    }
    Ok(st)
}

/// Allocates `bytes` of device memory.
fn alloc(dptr: *mut CUdeviceptr, bytes: usize, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if dptr.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let ptr = st
        .mem
        .alloc(bytes as u64)
        .map_err(|e| mem_error(e, CUresult::CUDA_ERROR_OUT_OF_MEMORY))?;
    // SAFETY: the caller's out-pointer, checked for null above.
    unsafe { put(dptr, ptr) }
}

/// Allocates device memory; 0 bytes is CUDA_ERROR_INVALID_VALUE, as documented.
///
/// # Safety
/// `dptr` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    entry("cuMemAlloc_v2", || {
        if bytesize == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        alloc(dptr, bytesize, None)
    })
}

/// Allocates device memory "in stream order" (at once). 0 bytes gets a distinct pointer
/// (cudarc's empty slices allocate 0 bytes this way).
///
/// # Safety
/// `dptr` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemAllocAsync", || alloc(dptr, bytesize, Some(hStream)))
}

/// Frees device memory (0 is a no-op).
fn free(dptr: CUdeviceptr, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if dptr == 0 {
        return Ok(());
    }
    st.mem
        .free(dptr)
        .map_err(|e| mem_error(e, CUresult::CUDA_ERROR_INVALID_VALUE))
}

/// Frees device memory.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    entry("cuMemFree_v2", || free(dptr, None))
}

/// Frees device memory "in stream order" (at once).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, hStream: CUstream) -> CUresult {
    entry("cuMemFreeAsync", || free(dptr, Some(hStream)))
}

/// Free and total device memory.
///
/// # Safety
/// `free` and `total` must be null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    entry("cuMemGetInfo_v2", || {
        let st = with_stream(None)?;
        let cap = st.mem.capacity();
        // SAFETY: the caller's out-pointers, checked for null by `put`.
        unsafe {
            put(free, cap.saturating_sub(st.mem.used()) as usize)?;
            put(total, cap as usize)
        }
    })
}

/// Copies host memory to the device.
///
/// # Safety
/// `src` must be valid for reads of `n` bytes.
unsafe fn htod(dst: CUdeviceptr, src: *const c_void, n: usize, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and the caller vouches for `n` readable bytes at `src`.
    let bytes = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), n) };
    st.mem
        .write(dst, bytes)
        .map_err(|e| mem_error(e, CUresult::CUDA_ERROR_INVALID_VALUE))
}

/// Copies device memory to the host.
///
/// # Safety
/// `dst` must be valid for writes of `n` bytes.
unsafe fn dtoh(dst: *mut c_void, src: CUdeviceptr, n: usize, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and the caller vouches for `n` writable bytes at `dst`, which is
    // host memory and so cannot alias the interpreter's device memory.
    let bytes = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), n) };
    st.mem
        .read(src, bytes)
        .map_err(|e| mem_error(e, CUresult::CUDA_ERROR_INVALID_VALUE))
}

/// Copies device memory to device memory.
fn dtod(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if n == 0 {
        return Ok(());
    }
    st.mem
        .copy(dst, src, n)
        .map_err(|e| mem_error(e, CUresult::CUDA_ERROR_INVALID_VALUE))
}

/// Copies host to device.
///
/// # Safety
/// `srcHost` must be valid for reads of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuMemcpyHtoD_v2", || unsafe {
        htod(dstDevice, srcHost, ByteCount, None)
    })
}

/// Copies host to device (complete on return).
///
/// # Safety
/// `srcHost` must be valid for reads of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuMemcpyHtoDAsync_v2", || unsafe {
        htod(dstDevice, srcHost, ByteCount, Some(hStream))
    })
}

/// Copies device to host.
///
/// # Safety
/// `dstHost` must be valid for writes of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuMemcpyDtoH_v2", || unsafe {
        dtoh(dstHost, srcDevice, ByteCount, None)
    })
}

/// Copies device to host (complete on return).
///
/// # Safety
/// `dstHost` must be valid for writes of `ByteCount` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuMemcpyDtoHAsync_v2", || unsafe {
        dtoh(dstHost, srcDevice, ByteCount, Some(hStream))
    })
}

/// Copies device to device (overlap allowed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    entry("cuMemcpyDtoD_v2", || {
        dtod(dstDevice, srcDevice, ByteCount, None)
    })
}

/// Copies device to device (complete on return).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemcpyDtoDAsync_v2", || {
        dtod(dstDevice, srcDevice, ByteCount, Some(hStream))
    })
}

/// Sets `n` elements of `pattern`'s width at `dst` to it.
fn memset(dst: CUdeviceptr, pattern: &[u8], n: usize, stream: Option<CUstream>) -> Ret {
    let mut st = with_stream(stream)?;
    if n == 0 {
        return Ok(());
    }
    let width = pattern.len();
    if dst % width as u64 != 0 {
        // The driver requires D16/D32 destinations aligned to their width.
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let len = n
        .checked_mul(width)
        .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
    let result = if pattern.iter().all(|&b| b == pattern[0]) {
        st.mem.fill(dst, pattern[0], len)
    } else {
        st.mem.write(dst, &pattern.repeat(n))
    };
    result.map_err(|e| mem_error(e, CUresult::CUDA_ERROR_INVALID_VALUE))
}

/// Sets bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8_v2(dstDevice: CUdeviceptr, uc: u8, N: usize) -> CUresult {
    entry("cuMemsetD8_v2", || memset(dstDevice, &[uc], N, None))
}

/// Sets bytes (complete on return).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD8Async(
    dstDevice: CUdeviceptr,
    uc: u8,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD8Async", || {
        memset(dstDevice, &[uc], N, Some(hStream))
    })
}

/// Sets 16-bit values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16_v2(
    dstDevice: CUdeviceptr,
    us: c_ushort,
    N: usize,
) -> CUresult {
    entry("cuMemsetD16_v2", || {
        memset(dstDevice, &us.to_le_bytes(), N, None)
    })
}

/// Sets 16-bit values (complete on return).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD16Async(
    dstDevice: CUdeviceptr,
    us: c_ushort,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD16Async", || {
        memset(dstDevice, &us.to_le_bytes(), N, Some(hStream))
    })
}

/// Sets 32-bit values.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32_v2(dstDevice: CUdeviceptr, ui: c_uint, N: usize) -> CUresult {
    entry("cuMemsetD32_v2", || {
        memset(dstDevice, &ui.to_le_bytes(), N, None)
    })
}

/// Sets 32-bit values (complete on return).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemsetD32Async(
    dstDevice: CUdeviceptr,
    ui: c_uint,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    entry("cuMemsetD32Async", || {
        memset(dstDevice, &ui.to_le_bytes(), N, Some(hStream))
    })
}

/// Allocates host memory ("page-locked" means nothing here), page aligned.
fn host_alloc(pp: *mut *mut c_void, bytes: usize) -> Ret {
    let mut st = with_stream(None)?;
    if pp.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let layout = Layout::from_size_align(bytes.max(1), 4096)
        .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
    // SAFETY: the layout's size is non-zero.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    }
    st.host_allocs.insert(p.addr(), layout);
    // SAFETY: the caller's out-pointer, checked for null above.
    unsafe { put(pp, p.cast::<c_void>()) }
}

/// Allocates page-locked host memory.
///
/// # Safety
/// `pp` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    Flags: c_uint,
) -> CUresult {
    entry("cuMemHostAlloc", || {
        if Flags & !0xf != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        host_alloc(pp, bytesize)
    })
}

/// Allocates page-locked host memory.
///
/// # Safety
/// `pp` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    entry("cuMemAllocHost_v2", || host_alloc(pp, bytesize))
}

/// Frees memory from cuMemHostAlloc / cuMemAllocHost.
///
/// # Safety
/// `p` must not be used after this returns success.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    entry("cuMemFreeHost", || {
        let mut st = with_stream(None)?;
        let layout = st
            .host_allocs
            .remove(&p.addr())
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: `p` came from std::alloc::alloc with this layout (the map says so), and is
        // removed from the map, so it is freed once.
        unsafe { std::alloc::dealloc(p.cast::<u8>(), layout) };
        Ok(())
    })
}
