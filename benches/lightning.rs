//! Lightning Attention-2 forward: CPU block split (always) and the GPU kernels (where a GPU
//! exists), bf16, decay slopes per head. Throughput is the bytes of q, k, v and o, the
//! traffic the kernel cannot avoid: GB/s against HBM bandwidth says how close it is to the
//! memory bound. GPU inputs alternate between two copies so L2 does not serve repeats.

#[cfg(feature = "cuda")]
use std::time::Instant;

use attnkit::lightning::{self, Config, Forward, Seqs};
use attnkit::{Bf16, Device, Element};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn data<T: Element>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32((((i * 7919 + salt) % 1000) as f32 / 500.0 - 1.0) * 0.1))
        .collect()
}

fn bench_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("lightning_forward");
    g.sample_size(10);
    // CPU: a small model's layer (8 heads of 64): bf16 by bytes moved, f32 by FLOPs counted as
    // scripts/peers_cpu.py counts the chunked torch form (the side-by-side case).
    let cpu = Device::cpu();
    for seq in [1024usize, 4096] {
        cpu_case::<Bf16>(&mut g, &cpu, seq, false);
    }
    cpu_case::<f32>(&mut g, &cpu, 4096, true);
    #[cfg(feature = "cuda")]
    match Device::cuda(0) {
        Ok(dev) => gpu_cases(&mut g, &dev),
        Err(e) => eprintln!("lightning_forward/cuda: skipped: {e}"),
    }
    g.finish();
}

/// FLOPs of the chunked form per call: per token and head, the intra-block products
/// `2 B d + 2 B e` (whole blocks, as a GEMM computes them), the inter-block read `2 d e` and the
/// state update `2 d e`.
fn chunked_flops(tokens: usize, heads: usize, d: usize, e: usize) -> u64 {
    let b = 64;
    (tokens * heads * (2 * b * d + 2 * b * e + 4 * d * e)) as u64
}

/// One CPU forward case: 8 heads of 64, causal, decay slopes; throughput in FLOPs (`flops`)
/// or in bytes of q, k, v and o.
fn cpu_case<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    cpu: &Device,
    seq: usize,
    flops: bool,
) {
    let (heads, d, e) = (8, 64, 64);
    let slopes = lightning::decay_slopes(heads, 1.0).unwrap();
    let cfg = Config {
        heads,
        d,
        e,
        decay: Some(&slopes),
        scale: 1.0,
        causal: true,
    };
    let seqs = Seqs::Dense { batch: 1, seq };
    let n = seq * heads * d;
    let (q, k, v) = (data::<T>(n, 1), data::<T>(n, 2), data::<T>(n, 3));
    let mut o = vec![T::default(); n];
    let mut ws = vec![0.0f32; lightning::workspace_len(cpu, &cfg, &seqs).unwrap()];
    g.throughput(if flops {
        Throughput::Elements(chunked_flops(seq, heads, d, e))
    } else {
        Throughput::Bytes((4 * n * std::mem::size_of::<T>()) as u64)
    });
    g.bench_function(format!("cpu_{}_h{heads}_d{d}_seq{seq}", T::DTYPE), |b| {
        b.iter(|| {
            lightning::forward(
                cpu,
                &cfg,
                &seqs,
                Forward {
                    q: (&q).into(),
                    k: (&k).into(),
                    v: (&v).into(),
                    o: (&mut o).into(),
                    initial_state: None,
                    final_state: None,
                    workspace: (&mut ws).into(),
                },
            )
            .unwrap()
        })
    });
}

/// The shape: bf16, 32 heads of 128, seq 1k to 128k; time per token should be flat.
#[cfg(feature = "cuda")]
fn gpu_cases(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dev: &Device,
) {
    let stream = dev.stream().unwrap().clone();
    let (heads, d, e) = (32, 128, 128);
    let slopes = lightning::decay_slopes(heads, 1.0).unwrap();
    let cfg = Config {
        heads,
        d,
        e,
        decay: Some(&slopes),
        scale: 1.0,
        causal: true,
    };
    for seq in [1024usize, 4096, 16384, 65536, 131072] {
        let seqs = Seqs::Dense { batch: 1, seq };
        let n = seq * heads * d;
        let sets: Vec<_> = (0..2)
            .map(|s| {
                (
                    stream.clone_htod(&data::<Bf16>(n, 1 + 3 * s)).unwrap(),
                    stream.clone_htod(&data::<Bf16>(n, 2 + 3 * s)).unwrap(),
                    stream.clone_htod(&data::<Bf16>(n, 3 + 3 * s)).unwrap(),
                )
            })
            .collect();
        let mut o = stream.alloc_zeros::<Bf16>(n).unwrap();
        let wl = lightning::workspace_len(dev, &cfg, &seqs).unwrap();
        let mut ws = stream.alloc_zeros::<f32>(wl.max(1)).unwrap();
        g.throughput(Throughput::Bytes((4 * n * 2) as u64));
        g.bench_function(format!("cuda_bf16_h{heads}_d{d}_seq{seq}"), |b| {
            b.iter_custom(|iters| {
                dev.synchronize().unwrap();
                let t = Instant::now();
                for i in 0..iters {
                    let (q, k, v) = &sets[i as usize % 2];
                    lightning::forward(
                        dev,
                        &cfg,
                        &seqs,
                        Forward {
                            q: q.into(),
                            k: k.into(),
                            v: v.into(),
                            o: (&mut o).into(),
                            initial_state: None,
                            final_state: None,
                            workspace: (&mut ws).into(),
                        },
                    )
                    .unwrap();
                }
                dev.synchronize().unwrap();
                t.elapsed()
            })
        });
    }
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
