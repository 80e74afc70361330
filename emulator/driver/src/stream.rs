//! Streams and events. All work completes at enqueue, so a stream is a handle with flags and
//! a priority, waiting is a no-op, and an event records the host clock when it is recorded.
#![allow(non_snake_case)]

use std::ffi::{c_int, c_uint, c_ulonglong, c_void};
use std::time::Instant;

use cudarc::driver::sys::{
    CUcontext, CUdevice, CUevent, CUevent_flags, CUhostFn, CUresult, CUstream, CUstreamCallback,
    CUstreamCaptureStatus,
};

use crate::device::GREATEST_PRIORITY;
use crate::state::{Event, PRIMARY_CTX, Stream, current_context, from_ptr, state, to_ptr};
use crate::{Ret, entry, put};

/// Creates a stream with a priority (clamped into the device's range, as the driver does).
fn create(phStream: *mut CUstream, flags: c_uint, priority: c_int) -> Ret {
    let mut st = state();
    let ctx = st.current()?;
    if phStream.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let h = st.handle();
    st.streams.insert(
        h,
        Stream {
            ctx,
            flags,
            priority: priority.clamp(GREATEST_PRIORITY, 0),
        },
    );
    // SAFETY: the caller's out-pointer, checked for null above.
    unsafe { put(phStream, to_ptr(h)) }
}

/// Creates a stream.
///
/// # Safety
/// `phStream` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(phStream: *mut CUstream, Flags: c_uint) -> CUresult {
    entry("cuStreamCreate", || create(phStream, Flags, 0))
}

/// Creates a stream with a priority.
///
/// # Safety
/// `phStream` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    phStream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    entry("cuStreamCreateWithPriority", || {
        create(phStream, flags, priority)
    })
}

/// Destroys a stream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(hStream: CUstream) -> CUresult {
    entry("cuStreamDestroy_v2", || {
        let mut st = state();
        st.ready()?;
        match st.streams.remove(&from_ptr(hStream)) {
            Some(_) => Ok(()),
            None => Err(CUresult::CUDA_ERROR_INVALID_HANDLE),
        }
    })
}

/// Checks a stream handle (and that a context is current, which the NULL stream needs).
fn check_stream(hStream: CUstream) -> Ret {
    let st = state();
    st.current()?;
    st.stream(from_ptr(hStream))
}

/// Waits for a stream: its work is already done.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(hStream: CUstream) -> CUresult {
    entry("cuStreamSynchronize", || check_stream(hStream))
}

/// A stream's work is always complete.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(hStream: CUstream) -> CUresult {
    entry("cuStreamQuery", || check_stream(hStream))
}

/// Makes a stream wait for an event: already satisfied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamWaitEvent(
    hStream: CUstream,
    hEvent: CUevent,
    Flags: c_uint,
) -> CUresult {
    entry("cuStreamWaitEvent", || {
        let st = state();
        st.current()?;
        st.stream(from_ptr(hStream))?;
        if Flags & !1 != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if !st.events.contains_key(&from_ptr(hEvent)) {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        Ok(())
    })
}

/// Streams are never capturing (graphs are not supported).
///
/// # Safety
/// `captureStatus` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing(
    hStream: CUstream,
    captureStatus: *mut CUstreamCaptureStatus,
) -> CUresult {
    entry("cuStreamIsCapturing", || {
        check_stream(hStream)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe {
            put(
                captureStatus,
                CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
            )
        }
    })
}

/// A stream's priority (0 for the default streams).
///
/// # Safety
/// `priority` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetPriority(hStream: CUstream, priority: *mut c_int) -> CUresult {
    entry("cuStreamGetPriority", || {
        check_stream(hStream)?;
        let p = state()
            .streams
            .get(&from_ptr(hStream))
            .map_or(0, |s| s.priority);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(priority, p) }
    })
}

/// A stream's creation flags (0 for the default streams).
///
/// # Safety
/// `flags` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetFlags(hStream: CUstream, flags: *mut c_uint) -> CUresult {
    entry("cuStreamGetFlags", || {
        check_stream(hStream)?;
        let f = state()
            .streams
            .get(&from_ptr(hStream))
            .map_or(0, |s| s.flags);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(flags, f) }
    })
}

/// A stream's context (the current one for the default streams).
///
/// # Safety
/// `pctx` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetCtx(hStream: CUstream, pctx: *mut CUcontext) -> CUresult {
    entry("cuStreamGetCtx", || {
        check_stream(hStream)?;
        let ctx = state()
            .streams
            .get(&from_ptr(hStream))
            .map(|s| s.ctx)
            .or_else(current_context)
            .unwrap_or(PRIMARY_CTX);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pctx, to_ptr(ctx)) }
    })
}

/// A stream's device (0).
///
/// # Safety
/// `device` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetDevice(hStream: CUstream, device: *mut CUdevice) -> CUresult {
    entry("cuStreamGetDevice", || {
        check_stream(hStream)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(device, 0) }
    })
}

/// A stream's unique id (its handle).
///
/// # Safety
/// `streamId` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamGetId(hStream: CUstream, streamId: *mut c_ulonglong) -> CUresult {
    entry("cuStreamGetId", || {
        check_stream(hStream)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(streamId, from_ptr(hStream) as c_ulonglong) }
    })
}

/// Runs a host function "after the stream's work": at once, since that work is done. The
/// state lock is not held while it runs.
///
/// # Safety
/// `fn_` must be a valid function to call with `userData`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchHostFunc(
    hStream: CUstream,
    fn_: CUhostFn,
    userData: *mut c_void,
) -> CUresult {
    entry("cuLaunchHostFunc", || {
        check_stream(hStream)?;
        let f = fn_.ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: the caller vouches `f` may be called with `userData`.
        unsafe { f(userData) };
        Ok(())
    })
}

/// Runs a stream callback at once (see [`cuLaunchHostFunc`]).
///
/// # Safety
/// `callback` must be a valid function to call with these arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamAddCallback(
    hStream: CUstream,
    callback: CUstreamCallback,
    userData: *mut c_void,
    flags: c_uint,
) -> CUresult {
    entry("cuStreamAddCallback", || {
        check_stream(hStream)?;
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let f = callback.ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // SAFETY: the caller vouches `f` may be called with these arguments.
        unsafe { f(hStream, CUresult::CUDA_SUCCESS, userData) };
        Ok(())
    })
}

/// Creates an event.
///
/// # Safety
/// `phEvent` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(phEvent: *mut CUevent, Flags: c_uint) -> CUresult {
    entry("cuEventCreate", || {
        let mut st = state();
        st.current()?;
        if phEvent.is_null() || Flags & !0xf != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let h = st.handle();
        st.events.insert(
            h,
            Event {
                flags: Flags,
                recorded: None,
            },
        );
        // SAFETY: the caller's out-pointer, checked for null above.
        unsafe { put(phEvent, to_ptr(h)) }
    })
}

/// Records the host clock in an event (the stream's earlier work is already done).
fn record(hEvent: CUevent, hStream: CUstream) -> Ret {
    let mut st = state();
    st.current()?;
    st.stream(from_ptr(hStream))?;
    let ev = st
        .events
        .get_mut(&from_ptr(hEvent))
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    ev.recorded = Some(Instant::now());
    Ok(())
}

/// Records an event.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(hEvent: CUevent, hStream: CUstream) -> CUresult {
    entry("cuEventRecord", || record(hEvent, hStream))
}

/// Records an event (the flags only matter inside graph capture).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    hEvent: CUevent,
    hStream: CUstream,
    flags: c_uint,
) -> CUresult {
    entry("cuEventRecordWithFlags", || {
        if flags & !1 != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        record(hEvent, hStream)
    })
}

/// Checks an event handle.
fn check_event(hEvent: CUevent) -> Ret {
    let st = state();
    st.ready()?;
    if st.events.contains_key(&from_ptr(hEvent)) {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_HANDLE)
    }
}

/// Waits for an event: its work is done.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(hEvent: CUevent) -> CUresult {
    entry("cuEventSynchronize", || check_event(hEvent))
}

/// An event's work is always complete.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(hEvent: CUevent) -> CUresult {
    entry("cuEventQuery", || check_event(hEvent))
}

/// Milliseconds of host time between two recorded events. As on a GPU, an event made with
/// CU_EVENT_DISABLE_TIMING, or one never recorded, is CUDA_ERROR_INVALID_HANDLE.
///
/// # Safety
/// `pMilliseconds` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    pMilliseconds: *mut f32,
    hStart: CUevent,
    hEnd: CUevent,
) -> CUresult {
    entry("cuEventElapsedTime_v2", || {
        let st = state();
        st.ready()?;
        let time = |h: CUevent| -> Result<Instant, CUresult> {
            let ev = st
                .events
                .get(&from_ptr(h))
                .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
            if ev.flags & CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint != 0 {
                return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
            }
            ev.recorded.ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
        };
        let (start, end) = (time(hStart)?, time(hEnd)?);
        let ms = if end >= start {
            end.duration_since(start).as_secs_f64() * 1e3
        } else {
            -(start.duration_since(end).as_secs_f64() * 1e3)
        };
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pMilliseconds, ms as f32) }
    })
}

/// Destroys an event.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(hEvent: CUevent) -> CUresult {
    entry("cuEventDestroy_v2", || {
        let mut st = state();
        st.ready()?;
        match st.events.remove(&from_ptr(hEvent)) {
            Some(_) => Ok(()),
            None => Err(CUresult::CUDA_ERROR_INVALID_HANDLE),
        }
    })
}
