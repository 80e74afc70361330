//! Conformance of the instructions our kernels rely on, against the PTX ISA's definitions:
//! mma fragments (f16, bf16), ldmatrix (x1/x2/x4, .trans), cvt rounding and specials,
//! ex2.approx.ftz specials, min/max with NaN, shfl modes and widths, integer division signs,
//! cp.async zero fill. Hand-written PTX through cudarc, so the same test runs on a real GPU
//! (verifying the emulator) and under `scripts/emulate.sh` (checking it).
#![cfg(feature = "cuda")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The device's stream, or None (printing "skipped") without one; `ATTNKIT_REQUIRE_GPU=1`
/// turns a missing device into a failure.
fn stream(test: &str) -> Option<Arc<CudaStream>> {
    let require = std::env::var("ATTNKIT_REQUIRE_GPU").is_ok_and(|v| v == "1");
    // SAFETY: only tries to dlopen the driver library.
    let present = unsafe { cudarc::driver::sys::is_culib_present() }
        && CudaContext::device_count().is_ok_and(|n| n > 0);
    if !present {
        assert!(
            !require,
            "{test}: ATTNKIT_REQUIRE_GPU=1 but there is no CUDA device"
        );
        eprintln!("{test}: skipped: no CUDA device");
        return None;
    }
    let ctx = CudaContext::new(0).expect("context");
    Some(ctx.default_stream())
}

const HEAD: &str = ".version 8.0\n.target sm_80\n.address_size 64\n";

/// Runs `k(.param .u64 in, .param .u64 out)` (the body sees `%rd1` = in, `%rd2` = out,
/// `%r1` = %laneid; `regs` declares at least `%r<2>` and `%rd<3>`) on one warp and returns `out` (poisoned with all-ones beforehand).
fn run(s: &Arc<CudaStream>, regs: &str, body: &str, input: &[u32], out_words: usize) -> Vec<u32> {
    let ptx = format!(
        "{HEAD}.visible .entry k(.param .u64 pin, .param .u64 pout)\n{{\n{regs}\nld.param.u64 %rd1, [pin];\nld.param.u64 %rd2, [pout];\ncvta.to.global.u64 %rd1, %rd1;\ncvta.to.global.u64 %rd2, %rd2;\nmov.u32 %r1, %laneid;\n{body}\nret;\n}}\n"
    );
    let module = s
        .context()
        .load_module(Ptx::from_src(ptx))
        .expect("module loads");
    let f = module.load_function("k").expect("function");
    let input = s.clone_htod(input).expect("htod");
    let mut out = s.clone_htod(&vec![u32::MAX; out_words]).expect("htod");
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(&f);
    b.arg(&input).arg(&mut out);
    // SAFETY: the kernel reads `input` and writes `out` within the sizes given.
    unsafe { b.launch(cfg) }.expect("launch");
    s.clone_dtoh(&out).expect("dtoh")
}

fn seeded(test: &str) -> StdRng {
    let seed = rand::rng().random::<u64>();
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn mma(ab: &str) {
    let test = format!("mma_{ab}");
    let Some(s) = stream(&test) else { return };
    let mut rng = seeded(&test);
    let bf = ab == "bf16";
    let round = |x: f32| {
        if bf {
            bf16::from_f32(x).to_f64()
        } else {
            f16::from_f32(x).to_f64()
        }
    };
    let bits = |x: f64| {
        if bf {
            bf16::from_f64(x).to_bits() as u32
        } else {
            f16::from_f64(x).to_bits() as u32
        }
    };
    let a: Vec<Vec<f64>> = (0..16)
        .map(|_| {
            (0..16)
                .map(|_| round(rng.random_range(-2.0..2.0)))
                .collect()
        })
        .collect();
    let b: Vec<Vec<f64>> = (0..16)
        .map(|_| (0..8).map(|_| round(rng.random_range(-2.0..2.0))).collect())
        .collect();
    let c: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..8).map(|_| rng.random_range(-4.0..4.0)).collect())
        .collect();
    // Fragments as the ISA lays them out (groupID = lane / 4, threadID_in_group = lane % 4).
    let mut input = vec![0u32; 320];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for (i, (r, col)) in [
            (g, 2 * t),
            (g + 8, 2 * t),
            (g, 2 * t + 8),
            (g + 8, 2 * t + 8),
        ]
        .into_iter()
        .enumerate()
        {
            input[lane * 4 + i] = bits(a[r][col]) | bits(a[r][col + 1]) << 16;
        }
        for (i, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
            input[128 + lane * 2 + i] = bits(b[k][g]) | bits(b[k + 1][g]) << 16;
        }
        for (i, (r, col)) in [
            (g, 2 * t),
            (g, 2 * t + 1),
            (g + 8, 2 * t),
            (g + 8, 2 * t + 1),
        ]
        .into_iter()
        .enumerate()
        {
            input[192 + lane * 4 + i] = c[r][col].to_bits();
        }
    }
    let body = format!(
        "mul.wide.u32 %rd3, %r1, 16;\nadd.s64 %rd4, %rd1, %rd3;\nld.global.v4.u32 {{%r2, %r3, %r4, %r5}}, [%rd4];\n\
         mul.wide.u32 %rd5, %r1, 8;\nadd.s64 %rd6, %rd1, %rd5;\nld.global.v2.u32 {{%r6, %r7}}, [%rd6+512];\n\
         ld.global.v4.f32 {{%f1, %f2, %f3, %f4}}, [%rd4+768];\n\
         mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{%f5, %f6, %f7, %f8}}, {{%r2, %r3, %r4, %r5}}, {{%r6, %r7}}, {{%f1, %f2, %f3, %f4}};\n\
         add.s64 %rd7, %rd2, %rd3;\nst.global.v4.f32 [%rd7], {{%f5, %f6, %f7, %f8}};"
    );
    let regs = ".reg .b32 %r<8>;\n.reg .f32 %f<9>;\n.reg .b64 %rd<8>;";
    let out = run(&s, regs, &body, &input, 128);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for (i, (r, col)) in [
            (g, 2 * t),
            (g, 2 * t + 1),
            (g + 8, 2 * t),
            (g + 8, 2 * t + 1),
        ]
        .into_iter()
        .enumerate()
        {
            let want: f64 = c[r][col] as f64 + (0..16).map(|k| a[r][k] * b[k][col]).sum::<f64>();
            let scale: f64 =
                c[r][col].abs() as f64 + (0..16).map(|k| (a[r][k] * b[k][col]).abs()).sum::<f64>();
            let got = f32::from_bits(out[lane * 4 + i]) as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale + 1e-6,
                "{test}: D[{r}][{col}] = {got}, want {want}"
            );
        }
    }
}

#[test]
fn mma_m16n8k16_f16_fragments() {
    mma("f16");
}

#[test]
fn mma_m16n8k16_bf16_fragments() {
    mma("bf16");
}

/// ldmatrix: 32 rows of 8 b16 in shared; lane l names row (5l + 3) mod 32.
fn ldmatrix(num: usize, trans: bool) {
    let test = format!("ldmatrix_x{num}{}", if trans { "_trans" } else { "" });
    let Some(s) = stream(&test) else { return };
    let input: Vec<u32> = (0..128u32).map(|i| (2 * i) | (2 * i + 1) << 16).collect();
    let dst: Vec<String> = (0..num).map(|j| format!("%r{}", 10 + j)).collect();
    let body = format!(
        "mul.wide.u32 %rd3, %r1, 16;\nadd.s64 %rd4, %rd1, %rd3;\nld.global.v4.u32 {{%r2, %r3, %r4, %r5}}, [%rd4];\n\
         mov.u32 %r6, sm;\nshl.b32 %r7, %r1, 4;\nadd.s32 %r8, %r6, %r7;\nst.shared.v4.u32 [%r8], {{%r2, %r3, %r4, %r5}};\nbar.sync 0;\n\
         mad.lo.s32 %r9, %r1, 5, 3;\nand.b32 %r9, %r9, 31;\nshl.b32 %r9, %r9, 4;\nadd.s32 %r9, %r6, %r9;\n\
         ldmatrix.sync.aligned.m8n8.x{num}{}.shared.b16 {{{}}}, [%r9];\n\
         mul.wide.u32 %rd5, %r1, 16;\nadd.s64 %rd6, %rd2, %rd5;\n{}",
        if trans { ".trans" } else { "" },
        dst.join(", "),
        (0..num)
            .map(|j| format!("st.global.u32 [%rd6+{}], %r{};\n", 4 * j, 10 + j))
            .collect::<String>()
    );
    let regs = ".shared .align 16 .b8 sm[512];\n.reg .b32 %r<16>;\n.reg .b64 %rd<8>;";
    // .shared inside the body is a function-scope variable, as nvcc writes "demoted" ones.
    let out = run(&s, regs, &body, &input, 128);
    let elem = |row: usize, col: usize| (row * 8 + col) as u32; // element value = its index
    for lane in 0..32 {
        for j in 0..num {
            let (g, t) = (lane / 4, lane % 4);
            // Matrix j's row r comes from the address lane 8j + r gave.
            let row_of = |r: usize| ((8 * j + r) * 5 + 3) % 32;
            let (lo, hi) = if trans {
                (elem(row_of(2 * t), g), elem(row_of(2 * t + 1), g))
            } else {
                (elem(row_of(g), 2 * t), elem(row_of(g), 2 * t + 1))
            };
            assert_eq!(
                out[lane * 4 + j],
                lo | hi << 16,
                "{test}: lane {lane} register {j}"
            );
        }
    }
}

#[test]
fn ldmatrix_x1() {
    ldmatrix(1, false);
}
#[test]
fn ldmatrix_x2() {
    ldmatrix(2, false);
}
#[test]
fn ldmatrix_x4() {
    ldmatrix(4, false);
}
#[test]
fn ldmatrix_x4_trans() {
    ldmatrix(4, true);
}
#[test]
fn ldmatrix_x2_trans() {
    ldmatrix(2, true);
}

/// Inputs for the conversion tests: ties, specials, subnormals, overflow.
fn specials() -> Vec<f32> {
    vec![
        1.0 + 2f32.powi(-11),       // f16 tie: to even (1.0)
        1.0 + 3.0 * 2f32.powi(-11), // f16 tie: to even (up)
        1.0 + 2f32.powi(-8),        // bf16 tie: to even (1.0)
        1.0 + 3.0 * 2f32.powi(-8),  // bf16 tie: up
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,   // f32 subnormal
        6e-8,    // f16 subnormal
        65520.0, // rounds to f16 infinity
        2.5,
        -2.5,
        3.5,
        -0.0,
        1e10, // saturates s32
        -1e10,
        0.5,
        -1.5,
        f32::MAX,
        -1e-40,
    ]
}

#[test]
fn cvt_rounding_ties_nan_inf_subnormals() {
    let Some(s) = stream("cvt") else { return };
    let x = specials();
    let mut input = vec![0u32; 32];
    for (i, v) in x.iter().enumerate() {
        input[i] = v.to_bits();
    }
    let forms = [
        "cvt.rn.f16.f32 %rs1, %f1;\ncvt.u32.u16 %r3, %rs1;",
        "cvt.rn.bf16.f32 %rs1, %f1;\ncvt.u32.u16 %r3, %rs1;",
        "cvt.rni.s32.f32 %r3, %f1;",
        "cvt.rzi.s32.f32 %r3, %f1;",
        "cvt.rmi.s32.f32 %r3, %f1;",
        "neg.f32 %f2, %f1;\ncvt.rn.f16x2.f32 %r3, %f1, %f2;",
        "cvt.rn.bf16x2.f32 %r3, %f1, %f2;",
        "cvt.rni.f32.f32 %f3, %f1;\nmov.b32 %r3, %f3;",
    ];
    let mut body = String::from(
        "mul.wide.u32 %rd3, %r1, 4;\nadd.s64 %rd4, %rd1, %rd3;\nld.global.f32 %f1, [%rd4];\nmul.wide.u32 %rd5, %r1, 32;\nadd.s64 %rd6, %rd2, %rd5;\n",
    );
    for (k, f) in forms.iter().enumerate() {
        body += &format!("{f}\nst.global.u32 [%rd6+{}], %r3;\n", 4 * k);
    }
    let regs = ".reg .b16 %rs<2>;\n.reg .b32 %r<4>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<8>;";
    let out = run(&s, regs, &body, &input, 256);
    let same_half = |got: u32, want: u16, is_bf: bool| {
        let nan = if is_bf {
            bf16::from_bits(want).is_nan()
        } else {
            f16::from_bits(want).is_nan()
        };
        let got_nan = if is_bf {
            bf16::from_bits(got as u16).is_nan()
        } else {
            f16::from_bits(got as u16).is_nan()
        };
        if nan {
            got_nan && got >> 16 == 0
        } else {
            got == want as u32
        }
    };
    let to_int = |v: f32, r: fn(f32) -> f32| {
        if v.is_nan() {
            0
        } else {
            r(v).clamp(i32::MIN as f32, i32::MAX as f32) as i32
        }
    };
    for (i, &v) in x.iter().enumerate() {
        let o = &out[i * 8..i * 8 + 8];
        assert!(
            same_half(o[0], f16::from_f32(v).to_bits(), false),
            "cvt.rn.f16.f32({v:e}) = {:#06x}",
            o[0]
        );
        assert!(
            same_half(o[1], bf16::from_f32(v).to_bits(), true),
            "cvt.rn.bf16.f32({v:e}) = {:#06x}",
            o[1]
        );
        assert_eq!(
            o[2] as i32,
            to_int(v, f32::round_ties_even),
            "cvt.rni.s32.f32({v:e})"
        );
        assert_eq!(o[3] as i32, to_int(v, f32::trunc), "cvt.rzi.s32.f32({v:e})");
        assert_eq!(o[4] as i32, to_int(v, f32::floor), "cvt.rmi.s32.f32({v:e})");
        // a (v) goes to the upper half, b (-v) to the lower.
        let (hi, lo) = (f16::from_f32(v).to_bits(), f16::from_f32(-v).to_bits());
        assert!(
            same_half(o[5] >> 16, hi, false) && same_half(o[5] & 0xffff, lo, false),
            "cvt.rn.f16x2.f32({v:e}, {:e}) = {:#010x}",
            -v,
            o[5]
        );
        let (hi, lo) = (bf16::from_f32(v).to_bits(), bf16::from_f32(-v).to_bits());
        assert!(
            same_half(o[6] >> 16, hi, true) && same_half(o[6] & 0xffff, lo, true),
            "cvt.rn.bf16x2.f32({v:e}) = {:#010x}",
            o[6]
        );
        let r = f32::from_bits(o[7]);
        assert!(
            r.to_bits() == v.round_ties_even().to_bits() || (r.is_nan() && v.is_nan()),
            "cvt.rni.f32.f32({v:e}) = {r:e}"
        );
    }
}

#[test]
fn ex2_approx_ftz_specials_and_minmax_nan() {
    let Some(s) = stream("ex2_minmax") else {
        return;
    };
    let x = specials();
    let mut input = vec![0u32; 32];
    for (i, v) in x.iter().enumerate() {
        input[i] = v.to_bits();
    }
    let body = "mul.wide.u32 %rd3, %r1, 4;\nadd.s64 %rd4, %rd1, %rd3;\nld.global.f32 %f1, [%rd4];\nmul.wide.u32 %rd5, %r1, 16;\nadd.s64 %rd6, %rd2, %rd5;\n\
        ex2.approx.ftz.f32 %f2, %f1;\nst.global.f32 [%rd6], %f2;\n\
        min.f32 %f3, %f1, 0f3F800000;\nst.global.f32 [%rd6+4], %f3;\n\
        max.f32 %f3, 0f3F800000, %f1;\nst.global.f32 [%rd6+8], %f3;\n\
        ex2.approx.f32 %f2, %f1;\nst.global.f32 [%rd6+12], %f2;";
    let regs = ".reg .b32 %r<4>;\n.reg .f32 %f<4>;\n.reg .b64 %rd<8>;";
    let out = run(&s, regs, body, &input, 128);
    for (i, &v) in x.iter().enumerate() {
        let e = f32::from_bits(out[i * 4]);
        let flushed = if v.is_subnormal() { 0.0 } else { v };
        let want = flushed.exp2();
        let ok = if want.is_nan() {
            e.is_nan()
        } else if want.is_infinite() || want == 0.0 {
            e == want || (want == 0.0 && e == 0.0)
        } else {
            ((e - want) / want).abs() < 2e-6 || (want.is_subnormal() && e == 0.0)
        };
        assert!(ok, "ex2.approx.ftz.f32({v:e}) = {e:e}, want {want:e}");
        // min/max return the non-NaN operand.
        assert_eq!(
            f32::from_bits(out[i * 4 + 1]),
            if v.is_nan() { 1.0 } else { v.min(1.0) },
            "min.f32({v:e}, 1)"
        );
        assert_eq!(
            f32::from_bits(out[i * 4 + 2]),
            if v.is_nan() { 1.0 } else { v.max(1.0) },
            "max.f32(1, {v:e})"
        );
        let e2 = f32::from_bits(out[i * 4 + 3]);
        if v == f32::NEG_INFINITY {
            assert_eq!(e2, 0.0, "ex2.approx.f32(-inf)");
        }
    }
}

#[test]
fn shfl_modes_clamps_and_widths() {
    let Some(s) = stream("shfl") else { return };
    // (mode, b, c) as CUDA's __shfl_*_sync(width) emit them.
    let cases: [(&str, u32, u32); 8] = [
        ("up", 3, 0),
        ("down", 5, 0x1f),
        ("bfly", 6, 0x1f),
        ("idx", 7, 0x1f),
        ("down", 2, ((32 - 8) << 8) | 0x1f),
        ("up", 1, (32 - 8) << 8),
        ("idx", 3, ((32 - 8) << 8) | 0x1f),
        ("bfly", 4, ((32 - 16) << 8) | 0x1f),
    ];
    let mut body = String::from(
        "mad.lo.s32 %r2, %r1, 10, 1;\nmul.wide.u32 %rd3, %r1, 64;\nadd.s64 %rd4, %rd2, %rd3;\n",
    );
    for (k, (mode, b, c)) in cases.iter().enumerate() {
        body += &format!(
            "shfl.sync.{mode}.b32 %r3|%p1, %r2, {b}, {c}, -1;\nselp.u32 %r4, 1, 0, %p1;\nst.global.u32 [%rd4+{}], %r3;\nst.global.u32 [%rd4+{}], %r4;\n",
            8 * k,
            8 * k + 4
        );
    }
    let regs = ".reg .pred %p<2>;\n.reg .b32 %r<5>;\n.reg .b64 %rd<5>;";
    let out = run(&s, regs, &body, &[0], 512);
    for lane in 0..32u32 {
        for (k, &(mode, b, c)) in cases.iter().enumerate() {
            // The ISA's pseudocode.
            let seg = (c >> 8) & 31;
            let cval = c & 31;
            let max_lane = (lane & seg) | (cval & !seg);
            let min_lane = lane & seg;
            let (j, ok) = match mode {
                "up" => (
                    lane as i32 - b as i32,
                    lane as i32 - b as i32 >= max_lane as i32,
                ),
                "down" => ((lane + b) as i32, lane + b <= max_lane),
                "bfly" => ((lane ^ b) as i32, lane ^ b <= max_lane),
                _ => (
                    (min_lane | (b & !seg)) as i32,
                    (min_lane | (b & !seg)) <= max_lane,
                ),
            };
            let src = if ok { j as u32 } else { lane };
            let o = (lane * 16 + 2 * k as u32) as usize;
            assert_eq!(
                out[o],
                src * 10 + 1,
                "shfl.{mode} b={b} c={c:#x} lane {lane}"
            );
            assert_eq!(
                out[o + 1],
                ok as u32,
                "shfl.{mode} b={b} c={c:#x} lane {lane} predicate"
            );
        }
    }
}

#[test]
fn integer_division_signs() {
    let Some(s) = stream("div_rem") else { return };
    let pairs: [(i32, i32); 8] = [
        (-7, 2),
        (7, -2),
        (-7, -2),
        (7, 2),
        (i32::MIN, 3),
        (5, 7),
        (-5, 7),
        (0, -3),
    ];
    let mut input = vec![0u32; 64];
    for (i, (a, b)) in pairs.iter().enumerate() {
        input[2 * i] = *a as u32;
        input[2 * i + 1] = *b as u32;
    }
    let body = "setp.ge.u32 %p1, %r1, 8;\n@%p1 bra END;\nmul.wide.u32 %rd3, %r1, 8;\nadd.s64 %rd4, %rd1, %rd3;\nld.global.v2.u32 {%r2, %r3}, [%rd4];\n\
        mul.wide.u32 %rd5, %r1, 16;\nadd.s64 %rd6, %rd2, %rd5;\n\
        div.s32 %r4, %r2, %r3;\nrem.s32 %r5, %r2, %r3;\ndiv.u32 %r6, %r2, %r3;\nrem.u32 %r7, %r2, %r3;\n\
        st.global.v4.u32 [%rd6], {%r4, %r5, %r6, %r7};\nEND:";
    let regs = ".reg .pred %p<2>;\n.reg .b32 %r<8>;\n.reg .b64 %rd<8>;";
    let out = run(&s, regs, body, &input, 128);
    for (i, &(a, b)) in pairs.iter().enumerate() {
        let o = &out[i * 4..i * 4 + 4];
        assert_eq!(o[0] as i32, a.wrapping_div(b), "div.s32 {a} / {b}");
        assert_eq!(o[1] as i32, a.wrapping_rem(b), "rem.s32 {a} % {b}");
        assert_eq!(o[2], a as u32 / b as u32, "div.u32 {a} / {b}");
        assert_eq!(o[3], a as u32 % b as u32, "rem.u32 {a} % {b}");
    }
}

#[test]
fn cp_async_zero_fills_past_src_size() {
    let Some(s) = stream("cp_async") else { return };
    // Lane l copies 16 bytes with src-size min(l, 16) into shared, then stores them back.
    let input: Vec<u32> = (0..128)
        .map(|i| 0x0101_0101u32.wrapping_mul(i + 1))
        .collect();
    let body = "mov.u32 %r2, sm;\nshl.b32 %r3, %r1, 4;\nadd.s32 %r4, %r2, %r3;\nmul.wide.u32 %rd3, %r1, 16;\nadd.s64 %rd4, %rd1, %rd3;\n\
        min.u32 %r5, %r1, 16;\ncp.async.cg.shared.global [%r4], [%rd4], 16, %r5;\ncp.async.commit_group;\ncp.async.wait_group 0;\n\
        ld.shared.v4.u32 {%r6, %r7, %r8, %r9}, [%r4];\nadd.s64 %rd5, %rd2, %rd3;\nst.global.v4.u32 [%rd5], {%r6, %r7, %r8, %r9};";
    let regs = ".shared .align 16 .b8 sm[512];\n.reg .b32 %r<10>;\n.reg .b64 %rd<6>;";
    let out = run(&s, regs, body, &input, 128);
    let bytes_in: Vec<u8> = input.iter().flat_map(|w| w.to_le_bytes()).collect();
    let bytes_out: Vec<u8> = out.iter().flat_map(|w| w.to_le_bytes()).collect();
    for lane in 0..32 {
        let n = lane.min(16);
        for k in 0..16 {
            let want = if k < n { bytes_in[lane * 16 + k] } else { 0 };
            assert_eq!(
                bytes_out[lane * 16 + k],
                want,
                "lane {lane} byte {k} (src-size {n})"
            );
        }
    }
}
