//! Runtime baseline: the self-test kernel (a strided scale) on the CPU and, where there is
//! one, the GPU. A memory-bound op whose GB/s says what one launch and one pass cost.

#[cfg(feature = "cuda")]
use std::time::Instant;

use attnkit::{Buf, BufMut, Device, selftest};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench_scale(c: &mut Criterion) {
    let n = 1 << 22;
    let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
    let mut y = vec![0.0f32; n];
    let mut g = c.benchmark_group("selftest_scale");
    g.throughput(Throughput::Bytes((2 * n * 4) as u64));
    let cpu = Device::cpu();
    g.bench_function("cpu_f32_4M", |b| {
        b.iter(|| selftest::scale(&cpu, Buf::Host(&x), 1, 2.0, 1.0, BufMut::Host(&mut y)).unwrap())
    });
    #[cfg(feature = "cuda")]
    match Device::cuda(0) {
        Ok(dev) => {
            let stream = dev.stream().unwrap().clone();
            let xd = stream.clone_htod(&x).unwrap();
            let mut yd = stream.alloc_zeros::<f32>(n).unwrap();
            g.bench_function("cuda_f32_4M", |b| {
                b.iter_custom(|iters| {
                    dev.synchronize().unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        selftest::scale(&dev, (&xd).into(), 1, 2.0, 1.0, (&mut yd).into()).unwrap();
                    }
                    dev.synchronize().unwrap();
                    t.elapsed()
                })
            });
        }
        Err(e) => eprintln!("selftest_scale/cuda: skipped: {e}"),
    }
    g.finish();
}

criterion_group!(benches, bench_scale);
criterion_main!(benches);
