//! FlashAttention forward benches.
//!
//! - `flash_cpu`: the tiled CPU path against the naive f64 oracle at seq 2k, head dim 64
//!   (the CPU target: the tiled path at least 5x faster on 2 cores).
//! - `flash_cuda` (where a GPU exists): bf16, head dim 128, 16 heads, 16k tokens in all
//!   (batch x seq), seq 1k..16k, causal and not; throughput in FLOP/s (criterion's
//!   "elements/s"), timed with CUDA events on the device's stream.

use attnkit::flash::{self, Attention, oracle};
use attnkit::{Bf16, Device, Element};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn data<T: Element>(n: usize, seed: u32) -> Vec<T> {
    // A cheap deterministic pattern in [-1, 1): benches need values, not statistics.
    (0..n)
        .map(|i| {
            T::from_f32(
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32
                    / 1000.0
                    - 1.0,
            )
        })
        .collect()
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("flash_cpu");
    g.sample_size(10);
    let a = Attention::new(1, 2048, 2048, 1, 1, 64);
    g.throughput(Throughput::Elements(a.flops() as u64));
    let (q, k, v) = (
        data::<Bf16>(a.o_len(), 1),
        data::<Bf16>(a.o_len(), 2),
        data::<Bf16>(a.o_len(), 3),
    );
    let mut o = vec![Bf16::default(); a.o_len()];
    let mut lse = vec![0f32; a.lse_len()];
    let dev = Device::cpu();
    g.bench_function("tiled_bf16_s2048_d64", |b| {
        b.iter(|| {
            flash::forward(
                &dev,
                &a,
                (&q).into(),
                (&k).into(),
                (&v).into(),
                (&mut o).into(),
                (&mut lse).into(),
            )
            .unwrap()
        })
    });
    g.bench_function("oracle_f64_s2048_d64", |b| {
        b.iter(|| oracle::attention(&a, &q, &k, &v))
    });
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("flash_cuda: skipped: {e}");
            return;
        }
    };
    #[cfg(feature = "cuda")]
    {
        use std::time::Duration;
        let stream = dev.stream().unwrap().clone();
        let mut g = c.benchmark_group("flash_cuda");
        g.sample_size(10);
        let (tokens, heads, d) = (16384, 16, 128);
        for seq in [1024, 2048, 4096, 8192, 16384] {
            for causal in [false, true] {
                let a = Attention::new(tokens / seq, seq, seq, heads, heads, d).causal(causal);
                g.throughput(Throughput::Elements(a.flops() as u64));
                let q = stream.clone_htod(&data::<Bf16>(a.o_len(), 1)).unwrap();
                let k = stream.clone_htod(&data::<Bf16>(a.o_len(), 2)).unwrap();
                let v = stream.clone_htod(&data::<Bf16>(a.o_len(), 3)).unwrap();
                let mut o = stream.alloc_zeros::<Bf16>(a.o_len()).unwrap();
                let mut lse = stream.alloc_zeros::<f32>(a.lse_len()).unwrap();
                let name = format!(
                    "bf16_d{d}_s{seq}_{}",
                    if causal { "causal" } else { "full" }
                );
                g.bench_function(name, |b| {
                    b.iter_custom(|iters| {
                        let t = attnkit::timing::time(&dev, 1, iters as usize, |_| {
                            flash::forward(
                                &dev,
                                &a,
                                (&q).into(),
                                (&k).into(),
                                (&v).into(),
                                (&mut o).into(),
                                (&mut lse).into(),
                            )
                        })
                        .unwrap();
                        Duration::from_secs_f64(t.median_ms * 1e-3 * iters as f64)
                    })
                });
            }
        }
        g.finish();
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (dev, c);
}

criterion_group!(benches, bench_cpu, bench_cuda);
criterion_main!(benches);
