//! Monarch multiply `y = M x`: CPU cases always, GPU cases where `Device::cuda(0)` works.
//!
//! Throughput is reported as bytes of x read plus y written (the memory-bound regime's
//! measure); the FLOP count is `shape.flops(tokens)`, printed per case. GPU inputs rotate
//! through several buffers so L2 does not serve repeats, and a device-to-device copy of the
//! same bytes is timed beside them as the bandwidth yardstick (the peer this crate can run
//! without PyTorch or cuBLAS).
//!
//! Quick run: `cargo bench --bench monarch -- --warm-up-time 0.1 --measurement-time 0.3`.

use attnkit::monarch::{self, MonarchShape, Rows, Weights};
use attnkit::{Bf16, Device, Element};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn values<T: Element>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32((((i * 7919 + salt * 104729) % 2001) as f32 / 1000.0 - 1.0) * 0.1))
        .collect()
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("monarch_cpu");
    let dev = Device::cpu();
    // By bytes of x and y: the small cases.
    for (n, blocks, tokens) in [(1024, 32, 256), (1024, 4, 64)] {
        cpu_case::<f32>(&mut g, &dev, (n, blocks, tokens), false);
    }
    // By FLOPs (`shape.flops`, as scripts/peers_cpu.py counts its two bmm): the issue's
    // side-by-side cases.
    cpu_case::<f32>(&mut g, &dev, (4096, 64, 1024), true);
    cpu_case::<Bf16>(&mut g, &dev, (1024, 32, 4096), true);
    g.finish();
}

fn cpu_case<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
    (n, blocks, tokens): (usize, usize, usize),
    by_flops: bool,
) {
    let shape = MonarchShape::square(n, blocks).unwrap();
    let w1: Vec<T> = values(shape.w1_len(), 1);
    let w2: Vec<T> = values(shape.w2_len(), 2);
    let x: Vec<T> = values(tokens * n, 3);
    let mut y = vec![T::default(); tokens * n];
    let w = Weights {
        shape,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: None,
    };
    eprintln!(
        "monarch_cpu n={n} blocks={blocks} tokens={tokens}: {:.3} GFLOP per call",
        shape.flops(tokens) / 1e9
    );
    g.throughput(if by_flops {
        Throughput::Elements(shape.flops(tokens) as u64)
    } else {
        Throughput::Bytes((2 * tokens * n * std::mem::size_of::<T>()) as u64)
    });
    let name = format!("{}_n{n}_b{blocks}_t{tokens}", T::DTYPE);
    g.bench_function(name, |b| {
        b.iter(|| {
            monarch::multiply(
                dev,
                &w,
                (&x).into(),
                Rows::contiguous(tokens, n),
                (&mut y).into(),
                n,
            )
            .unwrap()
        })
    });
}

#[cfg(feature = "cuda")]
fn bench_gpu(c: &mut Criterion) {
    use std::time::Instant;
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("monarch_gpu: skipped: {e}");
            return;
        }
    };
    let stream = dev.stream().unwrap().clone();
    let mut g = c.benchmark_group("monarch_gpu");
    let tokens = 16 * 1024;
    // The two regimes: many small blocks (memory-bound) and few large (compute-bound).
    for (n, blocks) in [(4096, 64), (4096, 4)] {
        let shape = MonarchShape::square(n, blocks).unwrap();
        let w1 = stream
            .clone_htod(&values::<Bf16>(shape.w1_len(), 1))
            .unwrap();
        let w2 = stream
            .clone_htod(&values::<Bf16>(shape.w2_len(), 2))
            .unwrap();
        // Two x buffers of 128 MB each: more than L2, rotated anyway.
        let xs: Vec<_> = (0..2)
            .map(|s| {
                stream
                    .clone_htod(&values::<Bf16>(tokens * n, 3 + s))
                    .unwrap()
            })
            .collect();
        let mut y = stream.alloc_zeros::<Bf16>(tokens * n).unwrap();
        let w = Weights {
            shape,
            w1: (&w1).into(),
            w2: (&w2).into(),
            bias: None,
        };
        let bytes = 2 * tokens * n * 2;
        eprintln!(
            "monarch_gpu n={n} blocks={blocks} tokens={tokens}: {:.1} GFLOP, {:.0} MB per call",
            shape.flops(tokens) / 1e9,
            bytes as f64 / 1e6
        );
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("bf16_n{n}_b{blocks}_t{tokens}"), |b| {
            b.iter_custom(|iters| {
                dev.synchronize().unwrap();
                let t = Instant::now();
                for it in 0..iters as usize {
                    let x = &xs[it % xs.len()];
                    monarch::multiply(
                        &dev,
                        &w,
                        x.into(),
                        Rows::contiguous(tokens, n),
                        (&mut y).into(),
                        n,
                    )
                    .unwrap();
                }
                dev.synchronize().unwrap();
                t.elapsed()
            })
        });
        g.bench_function(format!("copy_peer_n{n}_t{tokens}"), |b| {
            b.iter_custom(|iters| {
                dev.synchronize().unwrap();
                let t = Instant::now();
                for it in 0..iters as usize {
                    stream.memcpy_dtod(&xs[it % xs.len()], &mut y).unwrap();
                }
                dev.synchronize().unwrap();
                t.elapsed()
            })
        });
    }
    g.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_gpu(_: &mut Criterion) {}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
