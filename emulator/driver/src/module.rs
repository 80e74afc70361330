//! Modules, functions, their attributes, occupancy, and kernel launches.
#![allow(non_snake_case)]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use attnkit_emulator::{Check, Checks, Error, Kernel, Launch, Module, Stats};
use cudarc::driver::sys::{
    CUfunc_cache, CUfunction, CUfunction_attribute as FA, CUjit_option, CUmodule,
    CUoccupancyB2DSize, CUresult, CUstream,
};

use crate::device::{RESERVED_SHARED, SHARED_PER_SM};
use crate::image::{self, ImageError};
use crate::state::{Function, LIMITS, LoadedModule, State, from_ptr, state, to_ptr};
use crate::{Ret, entry, put, report};

/// SMs of the emulated device (for occupancy and cooperative-launch limits).
const SMS: u32 = 132;
/// Per-SM limits used by the occupancy calculator (sm_90).
const THREADS_PER_SM: u32 = 2048;
const BLOCKS_PER_SM: u32 = 32;
const REGS_PER_SM: u32 = 65536;
/// Shared memory a block gets without the opt-in.
const DEFAULT_SHARED: u32 = 48 * 1024;
/// The PTX ISA / binary version functions report (sm_90).
const VERSION_90: c_int = 90;

/// Parses (or finds already parsed) PTX text and makes a module handle for it.
fn load(pmod: *mut CUmodule, ptx: Result<String, ImageError>) -> Ret {
    if pmod.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let mut st = state();
    st.current()?;
    let text = ptx.map_err(|(code, msg)| {
        report(&format!("module load: {msg}"));
        code
    })?;
    let module = match st.parsed.get(&text) {
        Some(m) => m.clone(),
        None => {
            let parsed = catch_unwind(|| Module::parse(&text)).map_err(|_| {
                report("module load: the PTX parser panicked");
                CUresult::CUDA_ERROR_INVALID_PTX
            })?;
            let m = Arc::new(parsed.map_err(|e| {
                report(&format!("module load: {e}"));
                CUresult::CUDA_ERROR_INVALID_PTX
            })?);
            st.parsed.insert(text, m.clone());
            m
        }
    };
    let h = st.handle();
    st.modules.insert(
        h,
        LoadedModule {
            module,
            functions: HashMap::new(),
        },
    );
    // SAFETY: the caller's out-pointer, checked for null above.
    unsafe { put(pmod, to_ptr(h)) }
}

/// Loads a module from PTX text or a fatbin in memory.
///
/// # Safety
/// `module` must be null or valid for a write; `image` must point to a fatbin, a cubin, or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuModuleLoadData", || {
        load(module, unsafe { image::ptx_from_image(image) })
    })
}

/// Loads a module; the JIT options are ignored (there is no JIT).
///
/// # Safety
/// As [`cuModuleLoadData`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    _numOptions: c_uint,
    _options: *mut CUjit_option,
    _optionValues: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuModuleLoadDataEx", || {
        load(module, unsafe { image::ptx_from_image(image) })
    })
}

/// Loads a module from a fatbin in memory.
///
/// # Safety
/// As [`cuModuleLoadData`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadFatBinary(
    module: *mut CUmodule,
    fatCubin: *const c_void,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuModuleLoadFatBinary", || {
        load(module, unsafe { image::ptx_from_image(fatCubin) })
    })
}

/// Loads a module from a PTX or fatbin file.
///
/// # Safety
/// `module` must be null or valid for a write; `fname` null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) -> CUresult {
    entry("cuModuleLoad", || {
        if fname.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: non-null, and the caller vouches it is NUL-terminated.
        let path = unsafe { CStr::from_ptr(fname) }
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&path).map_err(|e| {
            report(&format!("module load: {path}: {e}"));
            CUresult::CUDA_ERROR_FILE_NOT_FOUND
        })?;
        load(module, image::ptx_from_bytes(&bytes))
    })
}

/// Unloads a module; its function handles die with it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    entry("cuModuleUnload", || {
        let mut st = state();
        st.ready()?;
        let h = from_ptr(hmod);
        let m = st
            .modules
            .remove(&h)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        for f in m.functions.values() {
            st.functions.remove(f);
        }
        Ok(())
    })
}

/// The kernel of that (mangled) name; one handle per module and name.
///
/// # Safety
/// `hfunc` must be null or valid for a write; `name` null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut CUfunction,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    entry("cuModuleGetFunction", || {
        if hfunc.is_null() || name.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: non-null, and the caller vouches it is NUL-terminated.
        let cname = unsafe { CStr::from_ptr(name) };
        let name = cname.to_str().map_err(|_| CUresult::CUDA_ERROR_NOT_FOUND)?;
        let mut st = state();
        st.current()?;
        let mh = from_ptr(hmod);
        let m = st
            .modules
            .get(&mh)
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        if let Some(&f) = m.functions.get(name) {
            // SAFETY: the caller's out-pointer, checked for null above.
            return unsafe { put(hfunc, to_ptr(f)) };
        }
        let module = m.module.clone();
        let kernel = module.kernel(name).ok_or(CUresult::CUDA_ERROR_NOT_FOUND)?;
        let max_dynamic_shared = DEFAULT_SHARED.saturating_sub(kernel.static_shared_bytes());
        let h = st.handle();
        st.functions.insert(
            h,
            Function {
                module: module.clone(),
                module_handle: mh,
                name: cname.to_owned(),
                max_dynamic_shared,
                carveout: -1,
            },
        );
        if let Some(m) = st.modules.get_mut(&mh) {
            m.functions.insert(name.to_string(), h);
        }
        // SAFETY: the caller's out-pointer, checked for null above.
        unsafe { put(hfunc, to_ptr(h)) }
    })
}

/// How many kernels a module has.
///
/// # Safety
/// `count` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunctionCount(count: *mut c_uint, mod_: CUmodule) -> CUresult {
    entry("cuModuleGetFunctionCount", || {
        let st = state();
        st.ready()?;
        let m = st
            .modules
            .get(&from_ptr(mod_))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        let n = m.module.kernels().count() as c_uint;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(count, n) }
    })
}

/// A function handle's record and its kernel.
fn function(st: &State, f: CUfunction) -> Result<(&Function, &Kernel), CUresult> {
    let func = st
        .functions
        .get(&from_ptr(f))
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    let name = func
        .name
        .to_str()
        .map_err(|_| CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    let kernel = func
        .module
        .kernel(name)
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    Ok((func, kernel))
}

/// Threads per block the kernel allows (its `.maxntid`, else the device's limit).
fn max_threads(kernel: &Kernel) -> u32 {
    kernel
        .max_threads()
        .unwrap_or(LIMITS.max_threads_per_block)
        .min(LIMITS.max_threads_per_block)
}

/// Registers per thread as reported: the PTX's count, capped at the hardware's 255 (ptxas
/// would spill past that).
fn regs(kernel: &Kernel) -> u32 {
    kernel.num_regs().clamp(1, 255)
}

/// A function attribute.
///
/// # Safety
/// `pi` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: c_uint,
    hfunc: CUfunction,
) -> CUresult {
    entry("cuFuncGetAttribute", || {
        let st = state();
        st.ready()?;
        let (func, k) = function(&st, hfunc)?;
        let is = |a: FA| a as c_uint == attrib;
        let value = if is(FA::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK) {
            max_threads(k) as c_int
        } else if is(FA::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES) {
            k.static_shared_bytes() as c_int
        } else if is(FA::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES) {
            k.local_bytes() as c_int
        } else if is(FA::CU_FUNC_ATTRIBUTE_NUM_REGS) {
            regs(k) as c_int
        } else if is(FA::CU_FUNC_ATTRIBUTE_PTX_VERSION) || is(FA::CU_FUNC_ATTRIBUTE_BINARY_VERSION)
        {
            VERSION_90
        } else if is(FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
            func.max_dynamic_shared as c_int
        } else if is(FA::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT) {
            func.carveout
        } else if attrib < FA::CU_FUNC_ATTRIBUTE_MAX as c_uint {
            // Constant bytes, cache mode, cluster attributes: none of these exist here.
            0
        } else {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        };
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(pi, value) }
    })
}

/// Sets a function attribute: the dynamic shared memory cap (at most the opt-in limit less
/// the static shared memory) or the carveout preference. Cluster attributes are not
/// supported; the others are read-only (CUDA_ERROR_INVALID_VALUE).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetAttribute(
    hfunc: CUfunction,
    attrib: c_uint,
    value: c_int,
) -> CUresult {
    entry("cuFuncSetAttribute", || {
        let mut st = state();
        st.ready()?;
        let (_, k) = function(&st, hfunc)?;
        let static_shared = k.static_shared_bytes();
        let is = |a: FA| a as c_uint == attrib;
        let func = st
            .functions
            .get_mut(&from_ptr(hfunc))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        if is(FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
            let limit = LIMITS.max_shared_optin.saturating_sub(static_shared);
            match u32::try_from(value) {
                Ok(v) if v <= limit => func.max_dynamic_shared = v,
                _ => {
                    report(&format!(
                        "cuFuncSetAttribute: {value} bytes of dynamic shared memory for `{}`, \
                         at most {limit} ({} opt-in less {static_shared} static)",
                        func.name.to_string_lossy(),
                        LIMITS.max_shared_optin
                    ));
                    return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
                }
            }
        } else if is(FA::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT) {
            if !(-1..=100).contains(&value) {
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            func.carveout = value;
        } else if is(FA::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH)
            || is(FA::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT)
            || is(FA::CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH)
            || is(FA::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED)
            || is(FA::CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE)
        {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        } else {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        Ok(())
    })
}

/// A function's cache preference: accepted and ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncSetCacheConfig(hfunc: CUfunction, config: c_uint) -> CUresult {
    entry("cuFuncSetCacheConfig", || {
        let st = state();
        st.ready()?;
        function(&st, hfunc)?;
        if config > CUfunc_cache::CU_FUNC_CACHE_PREFER_EQUAL as c_uint {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        Ok(())
    })
}

/// A function's (mangled) name; the string lives as long as the function handle.
///
/// # Safety
/// `name` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetName(name: *mut *const c_char, hfunc: CUfunction) -> CUresult {
    entry("cuFuncGetName", || {
        let st = state();
        st.ready()?;
        let (func, _) = function(&st, hfunc)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(name, func.name.as_ptr()) }
    })
}

/// A function's module.
///
/// # Safety
/// `hmod` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetModule(hmod: *mut CUmodule, hfunc: CUfunction) -> CUresult {
    entry("cuFuncGetModule", || {
        let st = state();
        st.ready()?;
        let (func, _) = function(&st, hfunc)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(hmod, to_ptr(func.module_handle)) }
    })
}

/// Offset and size of a kernel parameter in the parameter buffer.
///
/// # Safety
/// `paramOffset` and `paramSize` must be null or valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    func: CUfunction,
    paramIndex: usize,
    paramOffset: *mut usize,
    paramSize: *mut usize,
) -> CUresult {
    entry("cuFuncGetParamInfo", || {
        let st = state();
        st.ready()?;
        let (_, k) = function(&st, func)?;
        let p = k
            .params()
            .get(paramIndex)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        // Either pointer may be null: that value is not wanted.
        // SAFETY: each is written only when non-null; the caller vouches for those.
        unsafe {
            if !paramOffset.is_null() {
                paramOffset.write(p.offset as usize);
            }
            if !paramSize.is_null() {
                paramSize.write(p.size as usize);
            }
        }
        Ok(())
    })
}

/// What of a kernel bounds its occupancy (copied out, so the state lock can be released
/// before calling back into the client).
struct Footprint {
    static_shared: u32,
    regs: u32,
    max_threads: u32,
}

impl Footprint {
    fn of(k: &Kernel) -> Footprint {
        Footprint {
            static_shared: k.static_shared_bytes(),
            regs: regs(k),
            max_threads: max_threads(k),
        }
    }
}

/// Blocks of `block_size` threads with `dynamic_shared` bytes that fit on one SM at once.
fn blocks_per_sm(k: &Footprint, block_size: c_int, dynamic_shared: usize) -> c_int {
    let Ok(threads) = u32::try_from(block_size) else {
        return 0;
    };
    if threads == 0 || threads > k.max_threads {
        return 0;
    }
    let shared = u64::from(k.static_shared) + dynamic_shared as u64;
    if shared > u64::from(LIMITS.max_shared_optin) {
        return 0;
    }
    let warps = threads.div_ceil(32);
    let by_threads = THREADS_PER_SM / (warps * 32);
    // Registers are allocated per warp in units of 256.
    let regs_per_warp = (k.regs * 32).div_ceil(256) * 256;
    let by_regs = REGS_PER_SM / (regs_per_warp * warps);
    let by_shared = u64::from(SHARED_PER_SM) / (shared + u64::from(RESERVED_SHARED));
    by_threads
        .min(by_regs)
        .min(BLOCKS_PER_SM)
        .min(u32::try_from(by_shared).unwrap_or(u32::MAX)) as c_int
}

/// Occupancy: blocks per SM (a model of sm_90's limits: threads, blocks, registers as the
/// PTX declares them, shared memory).
///
/// # Safety
/// `numBlocks` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
) -> CUresult {
    entry("cuOccupancyMaxActiveBlocksPerMultiprocessor", || {
        let st = state();
        st.ready()?;
        let (_, k) = function(&st, func)?;
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe {
            put(
                numBlocks,
                blocks_per_sm(&Footprint::of(k), blockSize, dynamicSMemSize),
            )
        }
    })
}

/// As [`cuOccupancyMaxActiveBlocksPerMultiprocessor`] (the flags only concern caching).
///
/// # Safety
/// `numBlocks` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        cuOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, func, blockSize, dynamicSMemSize)
    }
}

/// The block size with the highest occupancy (the largest among equals), and the grid that
/// fills the device with it.
fn potential_block_size(
    minGridSize: *mut c_int,
    blockSize: *mut c_int,
    func: CUfunction,
    to_smem: CUoccupancyB2DSize,
    dynamicSMemSize: usize,
    blockSizeLimit: c_int,
) -> Ret {
    if minGridSize.is_null() || blockSize.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    let k = {
        let st = state();
        st.ready()?;
        Footprint::of(function(&st, func)?.1)
    };
    let mut limit = k.max_threads as c_int;
    if blockSizeLimit > 0 {
        limit = limit.min(blockSizeLimit);
    }
    let (mut best, mut best_blocks, mut best_threads) = (0, 0, 0);
    let mut size = 32.min(limit);
    while size <= limit {
        let smem = match to_smem {
            // SAFETY: the caller vouches the callback may be called with a block size.
            Some(f) => unsafe { f(size) },
            None => dynamicSMemSize,
        };
        let blocks = blocks_per_sm(&k, size, smem);
        if blocks * size >= best_threads && blocks > 0 {
            (best, best_blocks, best_threads) = (size, blocks, blocks * size);
        }
        size += 32;
    }
    // SAFETY: both out-pointers were checked for null above; the caller vouches for them.
    unsafe {
        minGridSize.write(best_blocks * SMS as c_int);
        blockSize.write(best);
    }
    Ok(())
}

/// The block size that maximises occupancy.
///
/// # Safety
/// The out-pointers must be null or valid for writes; the callback, if any, callable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    minGridSize: *mut c_int,
    blockSize: *mut c_int,
    func: CUfunction,
    blockSizeToDynamicSMemSize: CUoccupancyB2DSize,
    dynamicSMemSize: usize,
    blockSizeLimit: c_int,
) -> CUresult {
    entry("cuOccupancyMaxPotentialBlockSize", || {
        potential_block_size(
            minGridSize,
            blockSize,
            func,
            blockSizeToDynamicSMemSize,
            dynamicSMemSize,
            blockSizeLimit,
        )
    })
}

/// As [`cuOccupancyMaxPotentialBlockSize`] (the flags only concern caching).
///
/// # Safety
/// As [`cuOccupancyMaxPotentialBlockSize`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    minGridSize: *mut c_int,
    blockSize: *mut c_int,
    func: CUfunction,
    blockSizeToDynamicSMemSize: CUoccupancyB2DSize,
    dynamicSMemSize: usize,
    blockSizeLimit: c_int,
    _flags: c_uint,
) -> CUresult {
    entry("cuOccupancyMaxPotentialBlockSizeWithFlags", || {
        potential_block_size(
            minGridSize,
            blockSize,
            func,
            blockSizeToDynamicSMemSize,
            dynamicSMemSize,
            blockSizeLimit,
        )
    })
}

/// Dynamic shared memory each of `numBlocks` blocks can have with all of them on one SM.
///
/// # Safety
/// `dynamicSmemSize` must be null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamicSmemSize: *mut usize,
    func: CUfunction,
    numBlocks: c_int,
    blockSize: c_int,
) -> CUresult {
    entry("cuOccupancyAvailableDynamicSMemPerBlock", || {
        let st = state();
        st.ready()?;
        let (_, k) = function(&st, func)?;
        let (Ok(blocks), Ok(threads)) = (u32::try_from(numBlocks), u32::try_from(blockSize)) else {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        };
        let fits = blocks > 0
            && threads > 0
            && blocks <= BLOCKS_PER_SM
            && blocks_per_sm(&Footprint::of(k), blockSize, 0) >= numBlocks;
        let bytes = if fits {
            (SHARED_PER_SM / blocks)
                .saturating_sub(RESERVED_SHARED + k.static_shared_bytes())
                .min(
                    LIMITS
                        .max_shared_optin
                        .saturating_sub(k.static_shared_bytes()),
                )
        } else {
            0
        };
        // SAFETY: the caller's out-pointer, checked for null by `put`.
        unsafe { put(dynamicSmemSize, bytes as usize) }
    })
}

/// Builds the parameter buffer from `kernelParams` (a pointer to each parameter's value) or
/// from `extra` (CU_LAUNCH_PARAM_BUFFER_POINTER / _SIZE, ended by CU_LAUNCH_PARAM_END).
///
/// # Safety
/// As cuLaunchKernel's contract for these two arguments.
unsafe fn pack(
    k: &Kernel,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> Result<Vec<u8>, CUresult> {
    let need = k.param_bytes() as usize;
    let mut buf = vec![0u8; need];
    if !extra.is_null() {
        if !params.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let (mut ptr, mut size) = (std::ptr::null::<u8>(), None);
        let mut i = 0;
        loop {
            // SAFETY: the caller vouches `extra` is a key/value list ended by END (0).
            let key = unsafe { extra.add(i).read() }.addr();
            match key {
                0 => break,
                // SAFETY: keys 1 and 2 are each followed by their value.
                1 => ptr = unsafe { extra.add(i + 1).read() }.cast::<u8>(),
                2 => {
                    // SAFETY: as above; the value points to a size_t.
                    let p = unsafe { extra.add(i + 1).read() }.cast::<usize>();
                    if p.is_null() {
                        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
                    }
                    // SAFETY: non-null; the caller vouches it points to a size_t.
                    size = Some(unsafe { p.read() });
                }
                _ => return Err(CUresult::CUDA_ERROR_INVALID_VALUE),
            }
            i += 2;
        }
        match size {
            Some(s) if !ptr.is_null() && s >= need => {
                // SAFETY: the caller vouches for `s >= need` bytes at `ptr`.
                buf.copy_from_slice(unsafe { std::slice::from_raw_parts(ptr, need) });
            }
            _ if need == 0 => {}
            _ => return Err(CUresult::CUDA_ERROR_INVALID_VALUE),
        }
        return Ok(buf);
    }
    if k.params().is_empty() {
        return Ok(buf);
    }
    if params.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    for (i, p) in k.params().iter().enumerate() {
        // SAFETY: the caller vouches for one pointer per kernel parameter.
        let src = unsafe { params.add(i).read() }.cast::<u8>();
        let (off, size) = (p.offset as usize, p.size as usize);
        let dst = buf
            .get_mut(off..off + size)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if src.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: the caller vouches each pointer points to a value of the parameter's size.
        dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src, size) });
    }
    Ok(buf)
}

/// One launch, checked as the driver would, then run to completion by the interpreter.
///
/// # Safety
/// As cuLaunchKernel's contract.
#[allow(clippy::too_many_arguments)] // The driver API's own shape.
unsafe fn launch(
    f: CUfunction,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    cooperative: bool,
) -> Ret {
    let mut st = state();
    st.current()?;
    st.stream(from_ptr(stream))?;
    let (func, _) = function(&st, f)?;
    let (module, max_dynamic) = (func.module.clone(), func.max_dynamic_shared);
    let name = func.name.to_string_lossy().into_owned();
    let k = module
        .kernel(&name)
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    let refuse = |why: String| {
        report(&format!("launch of `{name}` refused: {why}"));
        CUresult::CUDA_ERROR_INVALID_VALUE
    };
    if grid.contains(&0) || block.contains(&0) {
        return Err(refuse(format!(
            "grid {grid:?} / block {block:?} has a zero dimension"
        )));
    }
    let threads: u64 = block.iter().map(|&b| u64::from(b)).product();
    if threads > u64::from(max_threads(k))
        || block.iter().zip(LIMITS.max_block).any(|(b, m)| *b > m)
    {
        return Err(refuse(format!(
            "block {block:?} ({threads} threads), at most {} threads and {:?}",
            max_threads(k),
            LIMITS.max_block
        )));
    }
    if grid.iter().zip(LIMITS.max_grid).any(|(g, m)| *g > m) {
        return Err(refuse(format!(
            "grid {grid:?} exceeds {:?}",
            LIMITS.max_grid
        )));
    }
    if shared > max_dynamic {
        return Err(refuse(format!(
            "{shared} bytes of dynamic shared memory, the function allows {max_dynamic} \
             (raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)"
        )));
    }
    if cooperative {
        let per_sm =
            blocks_per_sm(&Footprint::of(k), threads as c_int, shared as usize).max(0) as u64;
        let ctas: u64 = grid.iter().map(|&g| u64::from(g)).product();
        if ctas > per_sm * u64::from(SMS) {
            report(&format!(
                "cooperative launch of `{name}`: {ctas} CTAs cannot all be resident ({per_sm} per SM)"
            ));
            return Err(CUresult::CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE);
        }
    }
    // SAFETY: forwarded from the caller's contract.
    let buf = unsafe { pack(k, params, extra) }?;
    let config = Launch {
        grid,
        block,
        dynamic_shared: shared,
        params: &buf,
    };
    let checks = Checks::from_env();
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        attnkit_emulator::launch(&module, k, &config, &mut st.mem, &checks)
    }));
    drop(st);
    let secs = start.elapsed().as_secs_f64();
    let trace = std::env::var("ATTNKIT_EMU_TRACE").is_ok_and(|v| !v.is_empty() && v != "0");
    let (code, executed) = match result {
        Ok(Ok(stats)) => {
            if checks.counters {
                record_counters(&name, grid, block, shared + k.static_shared_bytes(), &stats);
            }
            (CUresult::CUDA_SUCCESS, stats.thread_instructions)
        }
        Ok(Err(e)) => {
            report(&e.to_string());
            (code_of(&e), 0)
        }
        Err(_) => {
            report(&format!("the interpreter panicked running `{name}`"));
            (CUresult::CUDA_ERROR_LAUNCH_FAILED, 0)
        }
    };
    if trace {
        eprintln!(
            "attnkit-emulator: launch {name} grid {grid:?} block {block:?} smem {shared}+{} \
             static: {executed} thread-instructions, {secs:.3} s{}",
            k.static_shared_bytes(),
            if code == CUresult::CUDA_SUCCESS {
                ""
            } else {
                " (failed)"
            }
        );
    }
    match code {
        CUresult::CUDA_SUCCESS => Ok(()),
        c => Err(c),
    }
}

/// Appends one JSON line of a launch's counters to the file `ATTNKIT_EMU_COUNTERS` names.
fn record_counters(name: &str, grid: [u32; 3], block: [u32; 3], shared: u32, s: &Stats) {
    use std::io::Write;
    let Ok(path) = std::env::var("ATTNKIT_EMU_COUNTERS") else {
        return;
    };
    let line = format!(
        "{{\"kernel\":{name:?},\"grid\":{grid:?},\"block\":{block:?},\"shared\":{shared},\
         \"ctas\":{},\"thread_instructions\":{},\"warp_instructions\":{},\"barriers\":{},\
         \"mma\":{},\"ldmatrix\":{},\"shared_requests\":{},\"shared_bytes\":{},\
         \"shared_wavefronts\":{},\"shared_ideal_wavefronts\":{},\"global_requests\":{},\
         \"global_bytes\":{},\"global_sectors\":{}}}\n",
        s.ctas,
        s.thread_instructions,
        s.warp_instructions,
        s.barriers,
        s.mma,
        s.ldmatrix,
        s.shared_requests,
        s.shared_bytes,
        s.shared_wavefronts,
        s.shared_ideal_wavefronts,
        s.global_requests,
        s.global_bytes,
        s.global_sectors
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        report(&format!("could not append counters to {path}: {e}"));
    }
}

/// The error code a failed launch returns.
fn code_of(e: &Error) -> CUresult {
    match e {
        Error::Finding(f) if f.check == Check::Memcheck => CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        Error::Config { .. } => CUresult::CUDA_ERROR_INVALID_VALUE,
        _ => CUresult::CUDA_ERROR_LAUNCH_FAILED,
    }
}

/// Launches a kernel; it has run to completion (or failed) when this returns.
///
/// # Safety
/// `kernelParams` must hold a pointer to each of the kernel's parameters (or `extra` a valid
/// parameter-buffer list).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)] // The driver API's own shape.
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuLaunchKernel", || unsafe {
        launch(
            f,
            [gridDimX, gridDimY, gridDimZ],
            [blockDimX, blockDimY, blockDimZ],
            sharedMemBytes,
            hStream,
            kernelParams,
            extra,
            false,
        )
    })
}

/// Launches a cooperative kernel (the whole grid must fit on the device at once).
///
/// # Safety
/// As [`cuLaunchKernel`].
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)] // The driver API's own shape.
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded from the caller's contract.
    entry("cuLaunchCooperativeKernel", || unsafe {
        launch(
            f,
            [gridDimX, gridDimY, gridDimZ],
            [blockDimX, blockDimY, blockDimZ],
            sharedMemBytes,
            hStream,
            kernelParams,
            std::ptr::null_mut(),
            true,
        )
    })
}
