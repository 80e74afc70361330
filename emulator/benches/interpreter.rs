//! Interpreter speed in thread-instructions per second (criterion's "elements"): an ALU loop
//! and a shared-memory exchange with barriers, 4 warps per CTA, checks on.

use attnkit_emulator::{Checks, Launch, Memory, Module};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64
.visible .entry alu(.param .u64 p)
{
    .reg .pred %p<2>; .reg .b32 %r<8>; .reg .f32 %f<4>; .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, %tid.x;
    cvt.rn.f32.u32 %f1, %r1;
    mov.f32 %f2, 0f3F800000;
    mov.u32 %r2, 0;
LOOP:
    fma.rn.f32 %f2, %f2, 0f3F7FF000, %f1;
    add.s32 %r2, %r2, 1;
    setp.lt.s32 %p1, %r2, 256;
    @%p1 bra LOOP;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.f32 [%rd3], %f2;
    ret;
}
.visible .entry exchange(.param .u64 p)
{
    .reg .pred %p<2>; .reg .b32 %r<10>; .reg .b64 %rd<4>;
    .shared .align 4 .b8 s[512];
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, %tid.x;
    shl.b32 %r3, %r1, 2;
    mov.u32 %r4, s;
    add.s32 %r5, %r4, %r3;
    xor.b32 %r6, %r3, 4;
    add.s32 %r7, %r4, %r6;
    mov.u32 %r2, 0;
    mov.u32 %r8, %r1;
LOOP:
    st.shared.u32 [%r5], %r8;
    bar.sync 0;
    ld.shared.u32 %r9, [%r7];
    bar.sync 0;
    add.s32 %r8, %r8, %r9;
    add.s32 %r2, %r2, 1;
    setp.lt.s32 %p1, %r2, 64;
    @%p1 bra LOOP;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r8;
    ret;
}
"#;

fn bench(c: &mut Criterion) {
    let module = match Module::parse(PTX) {
        Ok(m) => m,
        Err(e) => panic!("bench PTX: {e}"),
    };
    let mut mem = Memory::new(1 << 20);
    let buf = mem.alloc(512).unwrap_or_default();
    let params = buf.to_le_bytes();
    let mut g = c.benchmark_group("emulator");
    for name in ["alu", "exchange"] {
        let Some(k) = module.kernel(name) else {
            continue;
        };
        let launch = Launch {
            grid: [4, 1, 1],
            block: [128, 1, 1],
            dynamic_shared: 0,
            params: &params,
        };
        let stats = attnkit_emulator::launch(&module, k, &launch, &mut mem, &Checks::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        g.throughput(Throughput::Elements(stats.thread_instructions));
        g.bench_function(name, |b| {
            b.iter(|| attnkit_emulator::launch(&module, k, &launch, &mut mem, &Checks::default()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
