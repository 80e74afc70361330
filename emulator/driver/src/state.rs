//! The driver's state: one device, its memory, and the objects behind every handle.
//!
//! Handles are plain numbers from one counter (so a stream passed as an event is caught),
//! turned into the pointer types the API uses; they are never dereferenced.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use attnkit_emulator::{Limits, Memory, Module};
use cudarc::driver::sys::CUresult;

/// Device memory the emulated GPU reports (host memory is committed only as it is written).
pub(crate) const DEVICE_MEMORY: u64 = 16 << 30;
/// The primary context's handle (created contexts get counter values).
pub(crate) const PRIMARY_CTX: usize = 0x1000;
/// The device limits, shared with the interpreter's own launch checks.
pub(crate) const LIMITS: Limits = Limits::SM90;

/// A stream made by cuStreamCreate*.
pub(crate) struct Stream {
    pub(crate) ctx: usize,
    pub(crate) flags: u32,
    pub(crate) priority: i32,
}

/// An event: its creation flags and when it was last recorded.
pub(crate) struct Event {
    pub(crate) flags: u32,
    pub(crate) recorded: Option<Instant>,
}

/// A loaded module and the function handles looked up in it.
pub(crate) struct LoadedModule {
    pub(crate) module: Arc<Module>,
    pub(crate) functions: HashMap<String, usize>,
}

/// A function handle: its kernel and the attributes set on it.
pub(crate) struct Function {
    pub(crate) module: Arc<Module>,
    pub(crate) module_handle: usize,
    pub(crate) name: CString,
    /// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES.
    pub(crate) max_dynamic_shared: u32,
    /// CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (-1: no preference).
    pub(crate) carveout: i32,
}

/// Everything the driver knows.
pub(crate) struct State {
    pub(crate) initialized: bool,
    pub(crate) mem: Memory,
    next_handle: usize,
    /// Retains of the primary context not yet released.
    pub(crate) primary_retains: u32,
    pub(crate) primary_flags: u32,
    /// Contexts made by cuCtxCreate (the primary context is always valid).
    pub(crate) created_contexts: HashMap<usize, u32>,
    pub(crate) streams: HashMap<usize, Stream>,
    pub(crate) events: HashMap<usize, Event>,
    pub(crate) modules: HashMap<usize, LoadedModule>,
    pub(crate) functions: HashMap<usize, Function>,
    /// Parsed modules by PTX text, so a module loaded again (another context, another test)
    /// is not parsed again.
    pub(crate) parsed: HashMap<String, Arc<Module>>,
    /// Page-locked host allocations: pointer and layout.
    pub(crate) host_allocs: HashMap<usize, std::alloc::Layout>,
    /// cuCtxSetLimit values by CUlimit.
    pub(crate) limits: HashMap<u32, usize>,
    pub(crate) cache_config: u32,
}

impl State {
    fn new() -> State {
        State {
            initialized: false,
            mem: Memory::new(DEVICE_MEMORY),
            next_handle: 0x2000,
            primary_retains: 0,
            primary_flags: 0,
            created_contexts: HashMap::new(),
            streams: HashMap::new(),
            events: HashMap::new(),
            modules: HashMap::new(),
            functions: HashMap::new(),
            parsed: HashMap::new(),
            host_allocs: HashMap::new(),
            limits: HashMap::new(),
            cache_config: 0,
        }
    }

    /// A new handle value, distinct from every other.
    pub(crate) fn handle(&mut self) -> usize {
        self.next_handle += 0x10;
        self.next_handle
    }

    /// Fails with CUDA_ERROR_NOT_INITIALIZED before cuInit, like the real driver.
    pub(crate) fn ready(&self) -> Result<(), CUresult> {
        if self.initialized {
            Ok(())
        } else {
            Err(CUresult::CUDA_ERROR_NOT_INITIALIZED)
        }
    }

    /// Whether `ctx` names a live context.
    pub(crate) fn is_context(&self, ctx: usize) -> bool {
        ctx == PRIMARY_CTX || self.created_contexts.contains_key(&ctx)
    }

    /// The calling thread's current context; calls that need one fail without it (as on a
    /// GPU: a thread that never bound a context gets CUDA_ERROR_INVALID_CONTEXT).
    pub(crate) fn current(&self) -> Result<usize, CUresult> {
        self.ready()?;
        match current_context() {
            Some(c) if self.is_context(c) => Ok(c),
            _ => Err(CUresult::CUDA_ERROR_INVALID_CONTEXT),
        }
    }

    /// Checks a stream handle: the legacy and per-thread default streams, or a live stream.
    pub(crate) fn stream(&self, stream: usize) -> Result<(), CUresult> {
        // 0: the NULL stream; 1: CU_STREAM_LEGACY; 2: CU_STREAM_PER_THREAD.
        if stream <= 2 || self.streams.contains_key(&stream) {
            Ok(())
        } else {
            Err(CUresult::CUDA_ERROR_INVALID_HANDLE)
        }
    }

    /// Forgets everything made in the primary context (cuDevicePrimaryCtxReset).
    pub(crate) fn reset(&mut self) {
        self.mem = Memory::new(DEVICE_MEMORY);
        self.streams.clear();
        self.events.clear();
        self.modules.clear();
        self.functions.clear();
        self.limits.clear();
        self.primary_retains = 0;
        self.primary_flags = 0;
    }
}

/// The one state, behind one lock (work is synchronous, so a launch holds it throughout).
static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| Mutex::new(State::new()));

/// Locks the state.
pub(crate) fn state() -> MutexGuard<'static, State> {
    crate::lock(&STATE)
}

thread_local! {
    /// This thread's context stack; the top is the current context.
    static CONTEXTS: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context, if any.
pub(crate) fn current_context() -> Option<usize> {
    CONTEXTS.with(|s| s.borrow().last().copied())
}

/// Makes `ctx` current (replacing the top of the stack); 0 unbinds it.
pub(crate) fn set_current(ctx: usize) {
    CONTEXTS.with(|s| {
        let mut s = s.borrow_mut();
        s.pop();
        if ctx != 0 {
            s.push(ctx);
        }
    });
}

/// Pushes `ctx` on the calling thread's stack.
pub(crate) fn push_current(ctx: usize) {
    CONTEXTS.with(|s| s.borrow_mut().push(ctx));
}

/// Pops the calling thread's current context.
pub(crate) fn pop_current() -> Option<usize> {
    CONTEXTS.with(|s| s.borrow_mut().pop())
}

/// Removes a destroyed context from the calling thread's stack.
pub(crate) fn forget_context(ctx: usize) {
    CONTEXTS.with(|s| s.borrow_mut().retain(|&c| c != ctx));
}

/// A handle value as the API's pointer type.
pub(crate) fn to_ptr<T>(handle: usize) -> *mut T {
    std::ptr::without_provenance_mut(handle)
}

/// An API pointer as a handle value.
pub(crate) fn from_ptr<T>(ptr: *mut T) -> usize {
    ptr.addr()
}
