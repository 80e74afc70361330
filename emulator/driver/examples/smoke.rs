//! Drives the emulated libcuda through cudarc, as attnkit does: device discovery, context,
//! memory, events, streams, a PTX module, a launch, and the error paths.
//!
//! Run: `scripts/emulate.sh cargo run -q -p attnkit-emulator-driver --example smoke`
//! (without the script cudarc would open the real driver, if any). Exits non-zero if a check
//! fails.

use std::error::Error;

use cudarc::driver::sys::{
    CUdevice_attribute as A, CUevent_flags, CUfunction_attribute as FA, CUresult,
};
use cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

/// Doubles `n` u32s in place.
const PTX: &str = r#"
//
// a tiny kernel for the smoke test
//
.version 8.0
.target sm_90
.address_size 64

.visible .entry twice(.param .u64 p, .param .u32 n)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [p];
    ld.param.u32 %r1, [n];
    mov.u32 %r5, %ctaid.x;
    mov.u32 %r6, %ntid.x;
    mov.u32 %r7, %tid.x;
    mad.lo.s32 %r2, %r5, %r6, %r7;
    setp.ge.u32 %p1, %r2, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r2, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.u32 %r3, [%rd4];
    shl.b32 %r4, %r3, 1;
    st.global.u32 [%rd4], %r4;
DONE:
    ret;
}
"#;

fn check(ok: bool, what: &str) -> Result<(), Box<dyn Error>> {
    if ok {
        println!("ok   {what}");
        Ok(())
    } else {
        Err(format!("FAIL {what}").into())
    }
}

/// The emulator's last error message, through its extra export `attnkit_emu_last_error`.
fn last_error() -> String {
    type LastError = unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> usize;
    let mut buf = vec![0u8; 4096];
    // SAFETY: the library is the emulator's libcuda (cudarc opened it by name), whose
    // `attnkit_emu_last_error` has this signature and writes at most `buf.len()` bytes.
    let len = unsafe {
        match cudarc::driver::sys::culib().get::<LastError>(b"attnkit_emu_last_error") {
            Ok(f) => f(buf.as_mut_ptr().cast(), buf.len()),
            Err(_) => return String::from("(no attnkit_emu_last_error: not the emulator?)"),
        }
    };
    buf.truncate(len.min(buf.len() - 1));
    String::from_utf8_lossy(&buf).into_owned()
}

fn main() -> Result<(), Box<dyn Error>> {
    // SAFETY: only dlopens the driver library by name.
    check(
        unsafe { cudarc::driver::sys::is_culib_present() },
        "libcuda opens",
    )?;
    check(CudaContext::device_count()? == 1, "one device")?;
    let ctx = CudaContext::new(0)?;
    let name = ctx.name()?;
    check(name.contains("emulator"), &format!("device name {name:?}"))?;
    check(
        ctx.compute_capability()? == (9, 0),
        "compute capability 9.0",
    )?;
    let sms = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let optin = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    let warp = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?;
    check(
        sms == 132 && optin == 232_448 && warp == 32,
        &format!("attributes: {sms} SMs, {optin} B opt-in shared, warp {warp}"),
    )?;
    check(
        ctx.has_async_alloc(),
        "memory pools supported (cuMemAllocAsync path)",
    )?;
    let total = ctx.total_mem()?;
    let (free, total2) = ctx.mem_get_info()?;
    check(
        total == total2 && free <= total,
        &format!("memory: {free} free of {total}"),
    )?;
    let uuid = ctx.uuid()?;
    check(
        uuid.bytes.iter().map(|&b| b as u8).eq(*b"attnkit-emulator"),
        "uuid",
    )?;

    let stream = ctx.default_stream();
    let data: Vec<u32> = (0..1000).collect();
    let mut dev = stream.clone_htod(&data)?;
    check(stream.clone_dtoh(&dev)? == data, "htod / dtoh round trip")?;
    let mut copy = stream.alloc_zeros::<u32>(1000)?;
    check(
        stream.clone_dtoh(&copy)?.iter().all(|&x| x == 0),
        "alloc_zeros (memset)",
    )?;
    stream.memcpy_dtod(&dev, &mut copy)?;
    check(stream.clone_dtoh(&copy)? == data, "dtod copy")?;
    stream.memset_zeros(&mut copy)?;
    check(
        stream.clone_dtoh(&copy)?.iter().all(|&x| x == 0),
        "memset_zeros",
    )?;
    let empty = stream.alloc_zeros::<u8>(0)?;
    check(
        stream.clone_dtoh(&empty)?.is_empty(),
        "zero-length allocation",
    )?;

    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    std::thread::sleep(std::time::Duration::from_millis(20));
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let ms = start.elapsed_ms(&end)?;
    check(
        (15.0..2000.0).contains(&ms),
        &format!("event elapsed {ms:.1} ms"),
    )?;
    let untimed = stream.record_event(None)?;
    check(
        start.elapsed_ms(&untimed).is_err(),
        "untimed event refuses elapsed time",
    )?;

    // A second stream switches cudarc to multi-stream mode (event tracking, waits).
    let other = ctx.new_stream()?;
    let on_other = other.clone_htod(&data)?;
    check(stream.clone_dtoh(&on_other)? == data, "second stream")?;
    other.synchronize()?;

    let module = ctx.load_module(Ptx::from_src(PTX))?;
    let f = module.load_function("twice")?;
    check(f.max_threads_per_block()? == 1024, "function max threads")?;
    check(f.shared_size_bytes()? == 0, "function static shared")?;
    let dynamic = f.get_attribute(FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?;
    check(
        dynamic == 49_152,
        &format!("default dynamic shared cap {dynamic}"),
    )?;
    f.set_attribute(FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin)?;
    let too_much = f.set_attribute(
        FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        optin + 1,
    );
    check(
        too_much.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_INVALID_VALUE),
        "dynamic shared over the opt-in refused",
    )?;
    let occ = f.occupancy_max_active_blocks_per_multiprocessor(256, 0, None)?;
    check(occ > 0, &format!("occupancy: {occ} blocks of 256 per SM"))?;
    let missing = module.load_function("nope");
    check(
        missing.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_NOT_FOUND),
        "unknown kernel is NOT_FOUND",
    )?;
    let bad = ctx.load_module(Ptx::from_src("this is not ptx"));
    check(bad.is_err(), "non-PTX module refused")?;

    // The launch: works once the interpreter does; until then it must fail cleanly.
    let n = data.len() as u32;
    let cfg = LaunchConfig {
        grid_dim: (4, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dev).arg(&n);
    let mut interpreter_runs = false;
    // SAFETY: the kernel takes (u32*, u32) and touches only the first n elements.
    match unsafe { b.launch(cfg) } {
        Ok(_) => {
            let got = stream.clone_dtoh(&dev)?;
            let want: Vec<u32> = data.iter().map(|x| x * 2).collect();
            check(got == want, "launch doubled every element")?;
            interpreter_runs = true;
        }
        Err(e) => println!("note launch failed (is the interpreter written yet?): {e}"),
    }
    let zero = LaunchConfig {
        grid_dim: (0, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dev).arg(&n);
    // SAFETY: refused before anything runs.
    let refused = unsafe { b.launch(zero) };
    check(
        refused.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_INVALID_VALUE),
        "zero grid refused",
    )?;
    let huge = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (2048, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dev).arg(&n);
    // SAFETY: refused before anything runs.
    let refused = unsafe { b.launch(huge) };
    check(
        refused.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_INVALID_VALUE),
        "2048 threads refused",
    )?;

    if interpreter_runs {
        // A kernel that writes past its buffer: memcheck fails the launch.
        let past = 2 * n;
        let wide = LaunchConfig {
            grid_dim: (8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&f);
        b.arg(&mut dev).arg(&past);
        // SAFETY: out of bounds on purpose; the emulator checks every access.
        let oob = unsafe { b.launch(wide) };
        check(
            oob.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            "out-of-bounds access is ILLEGAL_ADDRESS",
        )?;
        let last = last_error();
        check(
            last.contains("memcheck") && last.contains("twice"),
            &format!("attnkit_emu_last_error: {last}"),
        )?;
        // An instruction budget too small: the launch fails instead of running on.
        // SAFETY: no other thread reads the environment now.
        unsafe { std::env::set_var("ATTNKIT_EMU_BUDGET", "10") };
        let mut b = stream.launch_builder(&f);
        b.arg(&mut dev).arg(&n);
        // SAFETY: as the first launch.
        let over = unsafe { b.launch(cfg) };
        // SAFETY: as above.
        unsafe { std::env::remove_var("ATTNKIT_EMU_BUDGET") };
        check(
            over.is_err_and(|e| e.0 == CUresult::CUDA_ERROR_LAUNCH_FAILED),
            "budget exceeded is LAUNCH_FAILED",
        )?;
    }

    // Errors are not sticky: the context keeps working.
    check(
        stream.clone_dtoh(&on_other)? == data,
        "still usable after errors",
    )?;
    // An unsupported call is an error, not a panic (and is named on stderr once, however
    // often it is made).
    for _ in 0..2 {
        // SAFETY: asks for managed memory, which the emulator does not have.
        let managed = unsafe {
            cudarc::driver::result::malloc_managed(
                64,
                cudarc::driver::sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL,
            )
        };
        check(
            managed.is_err_and(|e: DriverError| e.0 == CUresult::CUDA_ERROR_NOT_SUPPORTED),
            "unsupported call is NOT_SUPPORTED",
        )?;
    }
    let msg = DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS).to_string();
    check(
        msg.contains("illegal address"),
        &format!("error strings: {msg}"),
    )?;
    ctx.synchronize()?;
    println!("smoke: all checks passed");
    Ok(())
}
