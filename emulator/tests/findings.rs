//! Each check catches the defect it exists for, and names the kernel, the line and the thread:
//! small kernels with one planted bug each, and a correct twin that must pass. The counters
//! count what they claim on kernels whose counts are known.

use attnkit_emulator::{Check, Checks, Error, Launch, Memory, Module, Stats};

const HEAD: &str = ".version 8.0\n.target sm_90\n.address_size 64\n";

/// Runs `body` as kernel `k(.param .u64 p)` over `threads` threads with a 256-byte buffer
/// (written unless `fresh`), returning the launch's result and the buffer.
fn run_with(
    shared: &str,
    body: &str,
    threads: u32,
    fresh: bool,
    checks: Checks,
) -> (Result<Stats, Error>, Vec<u8>) {
    let ptx = format!(
        "{HEAD}{shared}\n.visible .entry k(.param .u64 p)\n{{\n.reg .pred %p<8>;\n.reg .b32 %r<32>;\n.reg .b64 %rd<32>;\n.reg .f32 %f<8>;\nld.param.u64 %rd1, [p];\nmov.u32 %r1, %tid.x;\n{body}\nret;\n}}\n"
    );
    let module = Module::parse(&ptx).expect("test PTX parses");
    let kernel = module.kernel("k").expect("kernel k");
    let mut mem = Memory::new(1 << 20);
    let buf = mem.alloc(256).expect("alloc");
    if !fresh {
        mem.write(buf, &[7u8; 256]).expect("write");
    }
    let params = buf.to_le_bytes();
    let launch = Launch {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared: 0,
        params: &params,
    };
    let r = attnkit_emulator::launch(&module, kernel, &launch, &mut mem, &checks);
    let mut out = vec![0u8; 256];
    mem.read(buf, &mut out).expect("read");
    (r, out)
}

fn run(shared: &str, body: &str, threads: u32) -> Result<(), Error> {
    run_with(shared, body, threads, false, Checks::default())
        .0
        .map(|_| ())
}

fn counted(shared: &str, body: &str, threads: u32) -> Stats {
    let checks = Checks {
        counters: true,
        ..Checks::default()
    };
    match run_with(shared, body, threads, false, checks).0 {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn counters_count_barriers_bank_conflicts_and_sectors() {
    // 64 threads store word tid * STRIDE of shared memory, wait twice, and load word tid of
    // the global buffer.
    let body = |stride: u32| {
        format!(
            "mul.lo.u32 %r2, %r1, {};
mov.u32 %r3, s;
add.s32 %r4, %r3, %r2;
st.shared.u32 [%r4], %r1;
             bar.sync 0;
bar.sync 0;
mul.wide.u32 %rd2, %r1, 4;
add.s64 %rd3, %rd1, %rd2;
ld.global.u32 %r5, [%rd3];",
            4 * stride
        )
    };
    let smem = ".shared .align 4 .b8 s[8192];";
    let s = counted(smem, &body(1), 64);
    assert_eq!((s.ctas, s.barriers), (1, 2));
    assert_eq!((s.shared_requests, s.shared_bytes), (2, 256));
    assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (2, 2));
    assert_eq!(
        (s.global_requests, s.global_bytes, s.global_sectors),
        (2, 256, 8)
    );
    assert_eq!(s.sectors_per_global_request(), 4.0);
    // A stride of 32 words puts a warp's 32 words in one bank: 32 wavefronts per access.
    let s = counted(smem, &body(32), 64);
    assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (64, 2));
    assert_eq!(s.conflicts_per_shared_request(), 31.0);
    // Counters off: none gathered.
    let (r, _) = run_with(smem, &body(1), 64, false, Checks::default());
    let s = r.expect("runs");
    assert_eq!(
        (s.barriers, s.shared_requests, s.global_requests),
        (2, 0, 0)
    );
}

fn finding<T: std::fmt::Debug>(r: Result<T, Error>) -> attnkit_emulator::Finding {
    match r {
        Err(Error::Finding(f)) => *f,
        other => panic!("expected a finding, got {other:?}"),
    }
}

#[test]
fn out_of_bounds_global_load_is_found_with_its_thread_and_line() {
    // Thread t loads word t of a 256-byte (64-word) buffer: 96 threads run past its end.
    let body = "mul.wide.u32 %rd2, %r1, 4;\nadd.s64 %rd3, %rd1, %rd2;\nld.global.u32 %r2, [%rd3];";
    assert!(run("", body, 64).is_ok());
    let f = finding(run("", body, 96));
    assert_eq!(f.check, Check::Memcheck);
    assert_eq!(f.thread, [64, 0, 0]);
    assert_eq!(f.kernel, "k");
    assert!(
        f.instruction.starts_with("ld.global.u32"),
        "{}",
        f.instruction
    );
    assert_eq!(f.ptx_line, 15);
    assert!(f.to_string().contains("out"), "{f}");
}

#[test]
fn misaligned_access_is_found() {
    let f = finding(run("", "ld.global.u32 %r2, [%rd1+2];", 1));
    assert_eq!(f.check, Check::Memcheck);
    assert!(f.detail.contains("misaligned"), "{}", f.detail);
}

const SMEM: &str = ".shared .align 4 .b8 s[512];";

#[test]
fn shared_race_is_found_and_a_barrier_cures_it() {
    // Each thread writes its word, then reads its neighbour's.
    let write = "shl.b32 %r2, %r1, 2;\nmov.u32 %r3, s;\nadd.s32 %r4, %r3, %r2;\nst.shared.u32 [%r4], %r1;\n";
    let read = "add.s32 %r5, %r4, 4;\nld.shared.u32 %r6, [%r5];\n";
    let guard = "setp.lt.u32 %p1, %r1, 63;\n@!%p1 bra END;\n";
    let racy = format!("{write}{guard}{read}END:");
    let f = finding(run(SMEM, &racy, 64));
    assert_eq!(f.check, Check::Racecheck);
    assert!(f.detail.contains("races"), "{}", f.detail);
    let ordered = format!("{write}bar.sync 0;\n{guard}{read}END:");
    assert!(run(SMEM, &ordered, 64).is_ok());
}

#[test]
fn read_of_shared_never_written_is_found() {
    let f = finding(run(
        SMEM,
        "mov.u32 %r3, s;\nld.shared.u32 %r2, [%r3+8];",
        32,
    ));
    assert_eq!(f.check, Check::Initcheck);
}

#[test]
fn read_of_global_never_written_is_found() {
    let (r, _) = run_with("", "ld.global.u32 %r2, [%rd1];", 1, true, Checks::default());
    assert_eq!(finding(r).check, Check::Initcheck);
    let off = Checks {
        initcheck: false,
        ..Checks::default()
    };
    assert!(
        run_with("", "ld.global.u32 %r2, [%rd1];", 1, true, off)
            .0
            .is_ok()
    );
}

#[test]
fn missing_wait_group_is_found() {
    let copy = "shl.b32 %r2, %r1, 4;\nmov.u32 %r3, s;\nadd.s32 %r4, %r3, %r2;\ncvt.u64.u32 %rd2, %r2;\nadd.s64 %rd3, %rd1, %rd2;\ncp.async.cg.shared.global [%r4], [%rd3], 16;\ncp.async.commit_group;\n";
    let read = "ld.shared.u32 %r5, [%r4];\n";
    let f = finding(run(SMEM, &format!("{copy}{read}"), 16));
    assert_eq!(f.check, Check::AsyncCopy);
    assert!(run(SMEM, &format!("{copy}cp.async.wait_group 0;\n{read}"), 16).is_ok());
}

#[test]
fn cp_async_zero_fills_past_src_size() {
    // 5 bytes copied, 11 zero-filled, then stored back over the (7-filled) buffer.
    let body = "mov.u32 %r3, s;\nmov.u32 %r9, 5;\ncp.async.cg.shared.global [%r3], [%rd1], 16, %r9;\ncp.async.commit_group;\ncp.async.wait_group 0;\nld.shared.v4.u32 {%r4, %r5, %r6, %r7}, [%r3];\nst.global.v4.u32 [%rd1+16], {%r4, %r5, %r6, %r7};";
    let (r, out) = run_with(SMEM, body, 1, false, Checks::default());
    r.expect("runs");
    assert_eq!(&out[16..21], &[7; 5]);
    assert_eq!(&out[21..32], &[0; 11]);
}

#[test]
fn divergent_barrier_is_found() {
    // Odd threads wait at one bar.sync, even ones at another.
    let body = "and.b32 %r2, %r1, 1;\nsetp.eq.s32 %p1, %r2, 0;\n@%p1 bra EVEN;\nbar.sync 0;\nbra.uni END;\nEVEN:\nbar.sync 0;\nEND:";
    let f = finding(run("", body, 64));
    assert_eq!(f.check, Check::Synccheck);
    assert!(f.detail.contains("different bar.sync"), "{}", f.detail);
}

#[test]
fn collective_naming_an_exited_lane_is_found() {
    let body =
        "setp.ge.u32 %p1, %r1, 16;\n@%p1 bra END;\nshfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;\nEND:";
    let f = finding(run("", body, 32));
    assert_eq!(f.check, Check::Synccheck);
    let ok = "setp.ge.u32 %p1, %r1, 16;\n@%p1 bra END;\nshfl.sync.bfly.b32 %r2, %r1, 1, 31, 65535;\nEND:";
    assert!(run("", ok, 32).is_ok());
}

#[test]
fn endless_loop_hits_the_budget() {
    let checks = Checks {
        budget: 10_000,
        ..Checks::default()
    };
    let (r, _) = run_with("", "LOOP:\nbra.uni LOOP;", 32, false, checks);
    assert!(matches!(r, Err(Error::Budget { .. })), "{r:?}");
}

#[test]
fn unknown_instruction_is_an_error_naming_it_and_its_line() {
    let ptx = format!(
        "{HEAD}.visible .entry k()\n{{\n.reg .b32 %r<4>;\nfrobnicate.b32 %r1, %r2;\nret;\n}}\n"
    );
    match Module::parse(&ptx) {
        Err(Error::Parse { line, msg }) => {
            assert_eq!(line, 7);
            assert!(msg.contains("frobnicate"), "{msg}");
        }
        other => panic!("expected a parse error, got {:?}", other.err()),
    }
}
