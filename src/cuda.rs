//! The CUDA runtime: embedded fatbins, the parameter mirror, per-context module cache,
//! buffer checks and launches. Compiled only when build.rs embedded kernels (`attnkit_cuda`).
//!
//! Data flow of a launch: a family's `cuda.rs` checks its buffers with [`CudaDevice::view`],
//! fills its `#[repr(C)]` params (the bindgen mirror of `kernels/<family>.h`) with the raw
//! device pointers, and calls [`CudaDevice::launch`] with the kernel name. The function is
//! looked up in a cache shared by every `Device` on the same CUDA context; its module was
//! loaded on first use from the embedded fatbin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use cudarc::nvrtc::Ptx;

use crate::buffer::{Buf, BufMut, CUDA};
use crate::error::{DriverContext, Error, Result};

/// What build.rs embedded: nvcc's version, the architectures, one fatbin per `kernels/*.cu`.
pub(crate) mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The bindgen mirror of `kernels/*.h`: one `#[repr(C)]` params struct per family.
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#[allow(clippy::all)]
pub(crate) mod params {
    include!(concat!(env!("OUT_DIR"), "/params.rs"));
}

/// Loaded modules and functions of one CUDA context, shared by every `Device` on it.
struct Modules {
    ctx: Arc<CudaContext>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

/// One cache per context, keyed by the driver's context handle, so modules load once per
/// context however many `Device`s (streams) the caller makes on it.
fn modules_for(ctx: &Arc<CudaContext>) -> Arc<Modules> {
    static REGISTRY: OnceLock<Mutex<HashMap<usize, Arc<Modules>>>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(ctx.cu_ctx() as usize)
        .or_insert_with(|| {
            Arc::new(Modules {
                ctx: ctx.clone(),
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            })
        })
        .clone()
}

/// A CUDA context, the stream calls are enqueued on, and what we know of the GPU.
#[derive(Clone)]
pub(crate) struct CudaDevice {
    pub(crate) stream: Arc<CudaStream>,
    modules: Arc<Modules>,
    pub(crate) name: String,
    pub(crate) compute_capability: (i32, i32),
    pub(crate) sm_count: u32,
    /// Shared memory one block may use with the opt-in (bytes).
    pub(crate) max_smem: u32,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .field("ordinal", &self.modules.ctx.ordinal())
            .finish()
    }
}

/// Whether the CUDA driver library opens. cudarc panics on a missing libcuda when it opens it
/// at run time (`dynamic-loading`), and has its own probe only in that mode; where the
/// application links libcuda instead (candle's `dynamic-linking`), the process could not have
/// started without it and this finds it loaded. The names are a subset of those cudarc tries,
/// so "present" here means cudarc finds it too.
pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
        ["cuda", "nvcuda"].iter().any(|name| {
            [
                format!("{DLL_PREFIX}{name}{DLL_SUFFIX}"),
                format!("{DLL_PREFIX}{name}{DLL_SUFFIX}.1"),
            ]
            .iter()
            // SAFETY: opening the driver runs its initialisers, as cudarc's own loading does;
            // the handle is closed again (cudarc keeps its own).
            .any(|file| unsafe { libloading::Library::new(file) }.is_ok())
        })
    })
}

/// Opens the driver and a context on `ordinal`, never panicking (cudarc panics on a missing
/// libcuda, so that is checked first).
pub(crate) fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = match CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => 0,
        Err(source) => {
            return Err(Error::Driver {
                context: "cuInit / device count",
                source,
            });
        }
    };
    if ordinal >= count {
        return Err(Error::NoDevice {
            ordinal: (count > 0).then_some(ordinal),
        });
    }
    CudaContext::new(ordinal).driver("create context")
}

/// Wraps a stream another stack owns, after checking it against the driver: the context
/// current on this thread owns it, and that context is its device's primary context (so the
/// `CudaContext` we hold is the same context, retained, never destroyed by us).
///
/// # Safety
/// `raw` is a live stream of the current context (or null), kept alive by its owner while the
/// returned stream is in use (see `Device::from_raw_stream`).
pub(crate) unsafe fn borrow_raw_stream(raw: sys::CUstream) -> Result<Arc<CudaStream>> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let not_current = || Error::Value {
        arg: "stream",
        detail: "no CUDA context is current on this thread: make the stream's context \
                 current (cuCtxSetCurrent) before handing its stream over"
            .into(),
    };
    let current = match result::ctx::get_current() {
        Ok(Some(ctx)) => ctx,
        Ok(None) => return Err(not_current()),
        Err(e) if e.0 == CUresult::CUDA_ERROR_NOT_INITIALIZED => return Err(not_current()),
        Err(source) => {
            return Err(Error::Driver {
                context: "current context",
                source,
            });
        }
    };
    let mut owner: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `raw` is a stream handle or null (the caller's contract); `owner` is a valid
    // out-pointer.
    unsafe { sys::cuStreamGetCtx(raw, &mut owner) }
        .result()
        .map_err(|e| Error::Value {
            arg: "stream",
            detail: format!("the driver does not know this stream ({e})"),
        })?;
    if owner != current {
        return Err(Error::Value {
            arg: "stream",
            detail: format!(
                "belongs to context {owner:p}, not to the one current on this thread ({current:p})"
            ),
        });
    }
    let mut cu_device: sys::CUdevice = 0;
    // SAFETY: a valid out-pointer; a context is current (checked above).
    unsafe { sys::cuCtxGetDevice(&mut cu_device) }
        .result()
        .driver("device of the current context")?;
    let count = CudaContext::device_count().driver("device count")?.max(0);
    let ordinal = (0..count)
        .find(|&i| result::device::get(i).is_ok_and(|d| d == cu_device))
        .ok_or(Error::NoDevice { ordinal: None })? as usize;
    // Compare with the primary context without making anything current.
    // SAFETY: `cu_device` is a device handle the driver just gave; retain and release pair.
    let primary = unsafe { result::primary_ctx::retain(cu_device) }.driver("primary context")?;
    // SAFETY: releases the reference taken just above.
    unsafe { result::primary_ctx::release(cu_device) }.driver("primary context")?;
    if primary != current {
        return Err(Error::Unsupported {
            arg: "stream",
            detail: format!(
                "its context {current:p} is not device {ordinal}'s primary context \
                 ({primary:p}); attnkit shares primary contexts only"
            ),
        });
    }
    // Retains the primary context (already current, so nothing changes on this thread).
    let ctx = CudaContext::new(ordinal).driver("retain primary context")?;
    // SAFETY: `raw` belongs to `ctx` (checked above) and outlives the wrapper (the caller's
    // contract); the wrapper never destroys it.
    Ok(unsafe { ctx.wrap_borrowed_stream(raw) })
}

impl CudaDevice {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = stream.context().clone();
        let compute_capability = ctx.compute_capability().driver("compute capability")?;
        let sm_count = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .driver("SM count")?;
        let name = ctx.name().driver("device name")?;
        let max_smem = ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .driver("shared memory limit")?;
        let dev = CudaDevice {
            stream,
            modules: modules_for(&ctx),
            name,
            compute_capability,
            sm_count: sm_count.max(1) as u32,
            max_smem: max_smem.max(0) as u32,
        };
        // Prove the embedded code runs here before anyone relies on it.
        dev.function("selftest", "selftest_scale")?;
        Ok(dev)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self
            .modules
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let image = embedded::FATBINS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bytes)| *bytes)
            .ok_or(Error::KernelsNotBuilt(
                "a kernel module is missing from the build",
            ))?;
        let (major, minor) = self.compute_capability;
        let module = self
            .modules
            .ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .map_err(|e| match e.0 {
                CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | CUresult::CUDA_ERROR_INVALID_PTX => {
                    Error::ArchNotEmbedded {
                        major,
                        minor,
                        embedded: embedded::ARCHS,
                    }
                }
                _ => Error::Driver {
                    context: "load module",
                    source: e,
                },
            })?;
        modules.insert(name, module.clone());
        Ok(module)
    }

    /// The kernel `kernel` of `kernels/<module>.cu`, loaded once per context.
    pub(crate) fn function(
        &self,
        module: &'static str,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        let key = (module, kernel);
        if let Some(f) = self
            .modules
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(module)?
            .load_function(kernel)
            .driver("look up kernel")?;
        // Raise the function's dynamic shared memory cap to all the device allows, once, when
        // it is loaded: set per launch, two threads launching different sizes could race.
        use cudarc::driver::sys::CUfunction_attribute as FA;
        let static_smem = f.shared_size_bytes().driver("static shared memory")?.max(0) as u32;
        f.set_attribute(
            FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.max_smem.saturating_sub(static_smem) as i32,
        )
        .driver("set dynamic shared memory size")?;
        self.modules
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    /// Checks that `buf` is device memory of this context; returns its view.
    pub(crate) fn view<'b, 'a, T>(
        &self,
        arg: &'static str,
        buf: &'b Buf<'a, T>,
    ) -> Result<&'b CudaView<'a, T>> {
        match buf {
            Buf::Cuda(v) if self.same_context(cudarc::driver::DeviceSlice::stream(v)) => Ok(v),
            Buf::Cuda(_) => Err(Error::Placement {
                arg,
                expected: CUDA,
                found: "another CUDA context",
            }),
            other => Err(Error::Placement {
                arg,
                expected: CUDA,
                found: other.location(),
            }),
        }
    }

    /// Checks that `buf` is device memory of this context; returns its view.
    pub(crate) fn view_mut<'b, 'a, T>(
        &self,
        arg: &'static str,
        buf: &'b mut BufMut<'a, T>,
    ) -> Result<&'b mut CudaViewMut<'a, T>> {
        let found = buf.location();
        match buf {
            BufMut::Cuda(v) if self.same_context(cudarc::driver::DeviceSlice::stream(v)) => Ok(v),
            BufMut::Cuda(_) => Err(Error::Placement {
                arg,
                expected: CUDA,
                found: "another CUDA context",
            }),
            _ => Err(Error::Placement {
                arg,
                expected: CUDA,
                found,
            }),
        }
    }

    fn same_context(&self, stream: &Arc<CudaStream>) -> bool {
        stream.context().cu_ctx() == self.modules.ctx.cu_ctx()
    }

    /// Launches `kernel` of `module` with one `__grid_constant__` params struct.
    ///
    /// # Safety
    /// `params` must describe memory the kernel may access: every pointer in it must come from
    /// [`DevPtrs`] guards that are still alive, with sizes checked against the kernel's reach.
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let f = self.function(module, kernel)?;
        let static_smem = f.shared_size_bytes().driver("static shared memory")?.max(0) as u32;
        if cfg.shared_mem_bytes.saturating_add(static_smem) > self.max_smem {
            return Err(Error::Unsupported {
                arg: kernel,
                detail: format!(
                    "needs {} bytes of shared memory per block, this GPU allows {}",
                    cfg.shared_mem_bytes + static_smem,
                    self.max_smem
                ),
            });
        }
        let mut builder = self.stream.launch_builder(&f);
        builder.arg(params);
        // SAFETY: forwarded to the caller (see above); the kernel signature takes exactly one
        // params struct by value.
        unsafe { builder.launch(cfg) }.driver(kernel)?;
        Ok(())
    }
}

/// Raw device pointers for a launch, with cudarc's stream-ordering guards kept alive until
/// the launch is enqueued (drop it after [`CudaDevice::launch`]).
#[derive(Default)]
pub(crate) struct DevPtrs<'a> {
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> DevPtrs<'a> {
    /// The address of a read buffer, checked for `align` bytes.
    pub(crate) fn read<T>(
        &mut self,
        arg: &'static str,
        view: &'a CudaView<'_, T>,
        stream: &'a CudaStream,
        align: usize,
    ) -> Result<u64> {
        let (ptr, guard) = view.device_ptr(stream);
        self.guards.push(guard);
        check_align(arg, ptr, align)
    }

    /// The address of a written buffer, checked for `align` bytes.
    pub(crate) fn write<T>(
        &mut self,
        arg: &'static str,
        view: &'a mut CudaViewMut<'_, T>,
        stream: &'a CudaStream,
        align: usize,
    ) -> Result<u64> {
        let (ptr, guard) = view.device_ptr_mut(stream);
        self.guards.push(guard);
        check_align(arg, ptr, align)
    }
}

fn check_align(arg: &'static str, addr: u64, required: usize) -> Result<u64> {
    if addr % required as u64 != 0 {
        return Err(Error::Alignment {
            arg,
            addr,
            required,
        });
    }
    Ok(addr)
}

/// Fills every 4-byte word of `P` with a different value (an odd multiplier is a bijection
/// mod 2^32), so each field, and each half of a wide field, holds a value no other has.
pub(crate) fn distinct_fill<P: Copy>() -> P {
    let mut bytes = vec![0u8; std::mem::size_of::<P>()];
    for (i, b) in bytes.iter_mut().enumerate() {
        let word = (i / 4) as u32;
        let v = word.wrapping_mul(0x9E37_79B1).wrapping_add(0x7F4A_7C15);
        *b = v.to_le_bytes()[i % 4];
    }
    // SAFETY: `bytes` holds size_of::<P>() bytes; P is a bindgen mirror of a C struct of
    // integers, floats and pointers, for which every bit pattern is valid (headers have no bool).
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<P>()) }
}

/// Sends `p` through the family's echo kernel and returns whether every byte came back.
pub(crate) fn echo_params<P: DeviceRepr + Copy>(
    dev: &CudaDevice,
    module: &'static str,
    kernel: &'static str,
    p: &P,
) -> Result<bool> {
    let n = std::mem::size_of::<P>();
    let mut out = dev
        .stream
        .alloc_zeros::<u8>(n)
        .driver("alloc echo buffer")?;
    let f = dev.function(module, kernel)?;
    let mut builder = dev.stream.launch_builder(&f);
    builder.arg(p).arg(&mut out);
    // SAFETY: the echo kernel writes exactly size_of::<P>() bytes to `out`, which holds n.
    unsafe {
        builder.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .driver(kernel)?;
    let back = dev.stream.clone_dtoh(&out).driver("copy echo back")?;
    // SAFETY: P is plain old data (see distinct_fill); we only read its bytes.
    let sent = unsafe { std::slice::from_raw_parts((p as *const P).cast::<u8>(), n) };
    Ok(back == sent)
}

/// Every family's params struct, checked by [`crate::selftest::check_params_layout`]:
/// (family, size in bytes, echo through the family's own module).
pub(crate) type LayoutCheckFn = fn(&CudaDevice) -> Result<bool>;

/// Registers each family's params struct (the bindgen mirror of `kernels/<family>.h`): makes it
/// a kernel argument and lists it in `PARAMS_LAYOUTS`, echoed by `echo_<Struct>` in the
/// family's own module. One line per family.
macro_rules! families {
    ($(($family:literal, $t:ident)),* $(,)?) => {
        $(
            // SAFETY: a bindgen mirror of a C struct of integers, floats and pointers: plain
            // old data, passed by value as the kernel's one parameter.
            unsafe impl DeviceRepr for params::$t {}
        )*
        pub(crate) const PARAMS_LAYOUTS: &[(&str, usize, LayoutCheckFn)] = &[$((
            $family,
            std::mem::size_of::<params::$t>(),
            |d| echo_params(d, $family, concat!("echo_", stringify!($t)), &distinct_fill::<params::$t>()),
        )),*];
    };
}

families!(
    ("selftest", SelftestParams),
    ("flash", FlashParams),
    ("flash", FlashBwdParams),
    ("lightning", LightningParams),
    ("monarch", MonarchParams),
    ("decode", DecodeParams)
);
