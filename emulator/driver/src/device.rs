//! Initialisation, the one device and its attributes, contexts, and error strings.
#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong};

use cudarc::driver::sys::{
    CUcontext, CUctxCreateParams, CUdevice, CUdevice_attribute as A, CUfunc_cache, CUlimit,
    CUresult, CUuuid,
};

use crate::codes::CODES;
use crate::state::{
    self, DEVICE_MEMORY, LIMITS, PRIMARY_CTX, current_context, from_ptr, state, to_ptr,
};
use crate::{Ret, entry, put};

/// The device's name: tools and tests look for "emulator" in it.
const NAME: &str = "attnkit PTX emulator (CPU, sm_90)";
/// The driver API version reported (cudarc is built for CUDA 13.0).
const VERSION: c_int = 13000;

/// Device attributes, H200 (SXM) values where the emulator models the feature; features it
/// lacks (textures, surfaces, managed memory, clusters, tensor maps, IPC) read 0. An attribute
/// not listed reads 0.
const ATTRIBUTES: &[(A, c_int)] = &[
    (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, 1024),
    (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X, 1024),
    (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y, 1024),
    (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z, 64),
    (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, i32::MAX),
    (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, 65535),
    (A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, 65535),
    (A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, 49152),
    (A::CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY, 65536),
    (A::CU_DEVICE_ATTRIBUTE_WARP_SIZE, 32),
    (A::CU_DEVICE_ATTRIBUTE_MAX_PITCH, i32::MAX),
    (A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK, 65536),
    (A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE, 1_980_000),
    (A::CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT, 512),
    (A::CU_DEVICE_ATTRIBUTE_GPU_OVERLAP, 1),
    (A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 132),
    (A::CU_DEVICE_ATTRIBUTE_SURFACE_ALIGNMENT, 512),
    (A::CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS, 1),
    (A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, 2_619_000),
    (A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, 6144),
    (A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, 50 << 20),
    (A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR, 2048),
    (A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT, 2),
    (A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, 1),
    (A::CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT, 32),
    (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 9),
    (A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0),
    (A::CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED, 1),
    (A::CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED, 1),
    (A::CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED, 1),
    (
        A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
        SHARED_PER_SM as c_int,
    ),
    (
        A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR,
        65536,
    ),
    (
        A::CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO,
        2,
    ),
    (A::CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED, 1),
    (A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, 1),
    (
        A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        LIMITS.max_shared_optin as c_int,
    ),
    (A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR, 32),
    (
        A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
        RESERVED_SHARED as c_int,
    ),
    // cudarc then allocates with cuMemAllocAsync, which the emulator implements.
    (A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 1),
    (A::CU_DEVICE_ATTRIBUTE_MEM_SYNC_DOMAIN_COUNT, 1),
    (A::CU_DEVICE_ATTRIBUTE_NUMA_ID, -1),
    (A::CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID, -1),
];

/// Shared memory of one SM (bytes).
pub(crate) const SHARED_PER_SM: u32 = 233_472;
/// Shared memory the system reserves per block (bytes).
pub(crate) const RESERVED_SHARED: u32 = 1024;

/// Checks a device ordinal (there is one device, 0).
fn device(dev: CUdevice) -> Ret {
    if dev == 0 {
        Ok(())
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_DEVICE)
    }
}

/// Initialises the driver (flags must be 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(Flags: c_uint) -> CUresult {
    entry("cuInit", || {
        if Flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        state().initialized = true;
        Ok(())
    })
}

/// Reports driver API version 13000.
///
/// # Safety
/// `driverVersion` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(driverVersion: *mut c_int) -> CUresult {
    // SAFETY: the caller's out-pointer, checked for null by `put`.
    entry("cuDriverGetVersion", || unsafe {
        put(driverVersion, VERSION)
    })
}

/// The device of ordinal 0.
///
/// # Safety
/// `device` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    entry("cuDeviceGet", || {
        state().ready()?;
        self::device(ordinal)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(device, 0) }
    })
}

/// One device.
///
/// # Safety
/// `count` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    entry("cuDeviceGetCount", || {
        state().ready()?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(count, 1) }
    })
}

/// The device's name, truncated to `len - 1` bytes and NUL-terminated.
///
/// # Safety
/// `name` must be null or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetName", || {
        state().ready()?;
        device(dev)?;
        if name.is_null() || len <= 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let n = NAME.len().min(len as usize - 1);
        // SAFETY: the caller vouches for `len` bytes at `name`; n + 1 <= len are written from
        // a static string that cannot overlap the caller's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(NAME.as_ptr().cast::<c_char>(), name, n);
            name.add(n).write(0);
        }
        Ok(())
    })
}

/// One device attribute (see [`ATTRIBUTES`]); a value past the enum is
/// CUDA_ERROR_INVALID_VALUE.
///
/// # Safety
/// `pi` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_uint,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceGetAttribute", || {
        state().ready()?;
        device(dev)?;
        if attrib == 0 || attrib >= A::CU_DEVICE_ATTRIBUTE_MAX as c_uint {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let value = ATTRIBUTES
            .iter()
            .find(|(a, _)| *a as c_uint == attrib)
            .map_or(0, |&(_, v)| v);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pi, value) }
    })
}

/// Compute capability 9.0 (the deprecated query).
///
/// # Safety
/// `major` and `minor` must be null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    entry("cuDeviceComputeCapability", || {
        state().ready()?;
        device(dev)?;
        if minor.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's out-pointers, checked for null by `put`.
        unsafe {
            put(major, 9)?;
            put(minor, 0)
        }
    })
}

/// The device's memory: what the emulator lets be allocated.
///
/// # Safety
/// `bytes` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    entry("cuDeviceTotalMem_v2", || {
        state().ready()?;
        device(dev)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(bytes, DEVICE_MEMORY as usize) }
    })
}

/// A fixed UUID: the bytes of "attnkit-emulator".
///
/// # Safety
/// `uuid` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    entry("cuDeviceGetUuid_v2", || {
        state().ready()?;
        device(dev)?;
        let mut bytes = [0 as c_char; 16];
        for (b, &c) in bytes.iter_mut().zip(b"attnkit-emulator") {
            *b = c as c_char;
        }
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(uuid, CUuuid { bytes }) }
    })
}

/// The device cannot access a peer (there is none).
///
/// # Safety
/// `canAccessPeer` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(
    canAccessPeer: *mut c_int,
    dev: CUdevice,
    peerDev: CUdevice,
) -> CUresult {
    entry("cuDeviceCanAccessPeer", || {
        state().ready()?;
        device(dev)?;
        device(peerDev)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(canAccessPeer, 0) }
    })
}

/// Retains the primary context (one handle, shared by all retains).
///
/// # Safety
/// `pctx` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRetain", || {
        let mut st = state();
        st.ready()?;
        device(dev)?;
        if pctx.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        st.primary_retains += 1;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pctx, to_ptr(PRIMARY_CTX)) }
    })
}

/// Releases one retain of the primary context. Its objects stay valid after the last one
/// (a GPU would free them; nothing that still holds them could then use them anyway).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxRelease_v2", || {
        let mut st = state();
        st.ready()?;
        device(dev)?;
        if st.primary_retains == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        st.primary_retains -= 1;
        Ok(())
    })
}

/// Destroys everything made in the primary context: memory, modules, streams, events.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    entry("cuDevicePrimaryCtxReset_v2", || {
        let mut st = state();
        st.ready()?;
        device(dev)?;
        st.reset();
        Ok(())
    })
}

/// The primary context's flags and whether it is retained.
///
/// # Safety
/// `flags` and `active` must be null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    entry("cuDevicePrimaryCtxGetState", || {
        let st = state();
        st.ready()?;
        device(dev)?;
        if active.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller's out-pointers, checked for null by `put`.
        unsafe {
            put(flags, st.primary_flags)?;
            put(active, c_int::from(st.primary_retains > 0))
        }
    })
}

/// Sets the primary context's flags (scheduling flags only matter to a GPU).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    entry("cuDevicePrimaryCtxSetFlags_v2", || {
        let mut st = state();
        st.ready()?;
        device(dev)?;
        st.primary_flags = flags;
        Ok(())
    })
}

/// Creates a context (sharing the one device's memory) and makes it current. Execution
/// affinity and CiG parameters are not supported.
///
/// # Safety
/// `pctx` must be null or valid for a write; `ctxCreateParams` null or valid for a read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut CUcontext,
    ctxCreateParams: *mut CUctxCreateParams,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    entry("cuCtxCreate_v4", || {
        let mut st = state();
        st.ready()?;
        device(dev)?;
        if pctx.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if !ctxCreateParams.is_null() {
            // SAFETY: non-null, and the caller vouches it points to a CUctxCreateParams.
            let p = unsafe { &*ctxCreateParams };
            if p.numExecAffinityParams != 0 || !p.cigParams.is_null() {
                return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
            }
        }
        let ctx = st.handle();
        st.created_contexts.insert(ctx, flags);
        state::push_current(ctx);
        // SAFETY: the caller's out-pointer, checked for null above.
        unsafe { put(pctx, to_ptr(ctx)) }
    })
}

/// Destroys a context made by cuCtxCreate (not the primary one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxDestroy_v2", || {
        let mut st = state();
        st.ready()?;
        let ctx = from_ptr(ctx);
        if st.created_contexts.remove(&ctx).is_none() {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        state::forget_context(ctx);
        Ok(())
    })
}

/// Binds `ctx` to the calling thread (null unbinds).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    entry("cuCtxSetCurrent", || {
        let st = state();
        st.ready()?;
        let ctx = from_ptr(ctx);
        if ctx != 0 && !st.is_context(ctx) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        state::set_current(ctx);
        Ok(())
    })
}

/// The calling thread's context, or null.
///
/// # Safety
/// `pctx` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxGetCurrent", || {
        state().ready()?;
        let ctx = current_context().unwrap_or(0);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pctx, to_ptr(ctx)) }
    })
}

/// Pushes `ctx` on the calling thread's context stack.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxPushCurrent_v2", || {
        let st = state();
        st.ready()?;
        let ctx = from_ptr(ctx);
        if !st.is_context(ctx) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        state::push_current(ctx);
        Ok(())
    })
}

/// Pops the calling thread's current context.
///
/// # Safety
/// `pctx` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    entry("cuCtxPopCurrent_v2", || {
        state().ready()?;
        let ctx = state::pop_current().ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        if !pctx.is_null() {
            // SAFETY: non-null, and the caller vouches it is valid for a write.
            unsafe { pctx.write(to_ptr(ctx)) };
        }
        Ok(())
    })
}

/// The current context's device (0).
///
/// # Safety
/// `device` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    entry("cuCtxGetDevice", || {
        state().current()?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(device, 0) }
    })
}

/// The context's device (0); a null context means the current one.
///
/// # Safety
/// `device` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice_v2(device: *mut CUdevice, ctx: CUcontext) -> CUresult {
    entry("cuCtxGetDevice_v2", || {
        let st = state();
        context_or_current(&st, ctx)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(device, 0) }
    })
}

/// `ctx`, or the current context where it is null; fails if neither is live.
fn context_or_current(st: &state::State, ctx: CUcontext) -> Result<usize, CUresult> {
    let ctx = from_ptr(ctx);
    if ctx == 0 {
        return st.current();
    }
    st.ready()?;
    if st.is_context(ctx) {
        Ok(ctx)
    } else {
        Err(CUresult::CUDA_ERROR_INVALID_CONTEXT)
    }
}

/// Waits for the current context's work: there is none pending, all work is synchronous.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    entry("cuCtxSynchronize", || state().current().map(drop))
}

/// Waits for `ctx`'s work (none is ever pending).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSynchronize_v2(ctx: CUcontext) -> CUresult {
    entry("cuCtxSynchronize_v2", || {
        context_or_current(&state(), ctx).map(drop)
    })
}

/// The current context's flags.
///
/// # Safety
/// `flags` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    entry("cuCtxGetFlags", || {
        let st = state();
        let ctx = st.current()?;
        let value = st
            .created_contexts
            .get(&ctx)
            .copied()
            .unwrap_or(st.primary_flags);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(flags, value) }
    })
}

/// Sets the current context's flags (they only steer a GPU's scheduling).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    entry("cuCtxSetFlags", || {
        let mut st = state();
        let ctx = st.current()?;
        match st.created_contexts.get_mut(&ctx) {
            Some(f) => *f = flags,
            None => st.primary_flags = flags,
        }
        Ok(())
    })
}

/// A context's API version (the driver's).
///
/// # Safety
/// `version` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    entry("cuCtxGetApiVersion", || {
        context_or_current(&state(), ctx)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(version, VERSION as c_uint) }
    })
}

/// A context's unique id (its handle).
///
/// # Safety
/// `ctxId` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetId(ctx: CUcontext, ctxId: *mut c_ulonglong) -> CUresult {
    entry("cuCtxGetId", || {
        let id = context_or_current(&state(), ctx)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(ctxId, id as c_ulonglong) }
    })
}

/// Default of a context limit: (stack size, printf FIFO, malloc heap, ...) as on a GPU.
fn default_limit(limit: c_uint) -> Option<usize> {
    const LIMITS: &[(CUlimit, usize)] = &[
        (CUlimit::CU_LIMIT_STACK_SIZE, 1024),
        (CUlimit::CU_LIMIT_PRINTF_FIFO_SIZE, 1 << 20),
        (CUlimit::CU_LIMIT_MALLOC_HEAP_SIZE, 8 << 20),
        (CUlimit::CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT, 2048),
        (CUlimit::CU_LIMIT_MAX_L2_FETCH_GRANULARITY, 128),
        (CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, 0),
    ];
    LIMITS
        .iter()
        .find(|(l, _)| *l as c_uint == limit)
        .map(|&(_, v)| v)
}

/// A context limit (what was set, else the default).
///
/// # Safety
/// `pvalue` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetLimit(pvalue: *mut usize, limit: c_uint) -> CUresult {
    entry("cuCtxGetLimit", || {
        let st = state();
        st.current()?;
        let value = match st.limits.get(&limit) {
            Some(&v) => v,
            None => default_limit(limit).ok_or(CUresult::CUDA_ERROR_UNSUPPORTED_LIMIT)?,
        };
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pvalue, value) }
    })
}

/// Sets a context limit (remembered; the interpreter does not enforce it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetLimit(limit: c_uint, value: usize) -> CUresult {
    entry("cuCtxSetLimit", || {
        let mut st = state();
        st.current()?;
        default_limit(limit).ok_or(CUresult::CUDA_ERROR_UNSUPPORTED_LIMIT)?;
        st.limits.insert(limit, value);
        Ok(())
    })
}

/// The cache preference last set.
///
/// # Safety
/// `pconfig` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCacheConfig(pconfig: *mut CUfunc_cache) -> CUresult {
    entry("cuCtxGetCacheConfig", || {
        let st = state();
        st.current()?;
        let config = [
            CUfunc_cache::CU_FUNC_CACHE_PREFER_NONE,
            CUfunc_cache::CU_FUNC_CACHE_PREFER_SHARED,
            CUfunc_cache::CU_FUNC_CACHE_PREFER_L1,
            CUfunc_cache::CU_FUNC_CACHE_PREFER_EQUAL,
        ]
        .into_iter()
        .find(|c| *c as u32 == st.cache_config)
        .unwrap_or(CUfunc_cache::CU_FUNC_CACHE_PREFER_NONE);
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pconfig, config) }
    })
}

/// Sets the cache preference (no effect on the emulator).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCacheConfig(config: c_uint) -> CUresult {
    entry("cuCtxSetCacheConfig", || {
        let mut st = state();
        st.current()?;
        if config > CUfunc_cache::CU_FUNC_CACHE_PREFER_EQUAL as c_uint {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        st.cache_config = config;
        Ok(())
    })
}

/// Stream priorities: 0 (least) to -5 (greatest), as on Hopper.
///
/// # Safety
/// Each pointer must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    leastPriority: *mut c_int,
    greatestPriority: *mut c_int,
) -> CUresult {
    entry("cuCtxGetStreamPriorityRange", || {
        state().current()?;
        // Either pointer may be null: that value is not wanted.
        // SAFETY: each is written only when non-null; the caller vouches for those.
        unsafe {
            if !leastPriority.is_null() {
                leastPriority.write(0);
            }
            if !greatestPriority.is_null() {
                greatestPriority.write(GREATEST_PRIORITY);
            }
        }
        Ok(())
    })
}

/// The greatest (numerically least) stream priority.
pub(crate) const GREATEST_PRIORITY: c_int = -5;

/// Looks up a CUresult's (name, description).
fn code(error: c_uint) -> Option<(&'static std::ffi::CStr, &'static std::ffi::CStr)> {
    CODES
        .iter()
        .find(|(c, _, _)| *c == error)
        .map(|&(_, name, desc)| (name, desc))
}

/// The description of an error code (static string); an unknown code is
/// CUDA_ERROR_INVALID_VALUE with `*pStr` null.
///
/// # Safety
/// `pStr` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: c_uint, pStr: *mut *const c_char) -> CUresult {
    entry("cuGetErrorString", || {
        let s = code(error).map_or(std::ptr::null(), |(_, d)| d.as_ptr());
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pStr, s)? };
        if s.is_null() {
            Err(CUresult::CUDA_ERROR_INVALID_VALUE)
        } else {
            Ok(())
        }
    })
}

/// The name of an error code, e.g. "CUDA_ERROR_INVALID_VALUE" (static string).
///
/// # Safety
/// `pStr` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: c_uint, pStr: *mut *const c_char) -> CUresult {
    entry("cuGetErrorName", || {
        let s = code(error).map_or(std::ptr::null(), |(n, _)| n.as_ptr());
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pStr, s)? };
        if s.is_null() {
            Err(CUresult::CUDA_ERROR_INVALID_VALUE)
        } else {
            Ok(())
        }
    })
}
