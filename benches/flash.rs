//! FlashAttention forward benches.
//!
//! - `flash_cpu`: the tiled CPU path at the shapes issue 18 compares with PyTorch's CPU SDPA
//!   (8 heads, f32 and bf16, causal and not), and beside the naive f64 oracle at seq 2k.
//! - `flash_backward_cpu`: the tiled CPU backward (dQ, dK, dV) at 8 heads, seq 1k, f32 and
//!   bf16, causal and not, beside the f64 oracle's gradients at seq 512; FLOP/s counts
//!   2.5 times the forward's FLOPs, FlashAttention's convention.
//! - `flash_cuda` (where a GPU exists): bf16, head dim 128, 16 heads, 16k tokens in all
//!   (batch x seq), seq 1k..16k, causal and not; throughput in FLOP/s (criterion's
//!   "elements/s"), timed with CUDA events on the device's stream.

use attnkit::flash::{self, Attention, BackwardIo, Extras, oracle};
use attnkit::{Bf16, Device, Element};
use criterion::measurement::WallTime;
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

/// One CPU forward of `a` at precision `T`, timed as FLOP/s.
fn cpu_case<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, WallTime>,
    name: &str,
    a: &Attention,
) {
    g.throughput(Throughput::Elements(a.flops() as u64));
    let (q, k, v) = (
        data::<T>(a.o_len(), 1),
        data::<T>(a.o_len(), 2),
        data::<T>(a.o_len(), 3),
    );
    let mut o = vec![T::default(); a.o_len()];
    let mut lse = vec![0f32; a.lse_len()];
    let dev = Device::cpu();
    g.bench_function(name, |b| {
        b.iter(|| {
            flash::forward(
                &dev,
                a,
                (&q).into(),
                (&k).into(),
                (&v).into(),
                (&mut o).into(),
                (&mut lse).into(),
            )
            .unwrap()
        })
    });
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("flash_cpu");
    g.sample_size(10);
    // The shapes issue 18 measures beside PyTorch's CPU SDPA (scripts/peers_cpu.py).
    let a = |s, d, causal| Attention::new(1, s, s, 8, 8, d).causal(causal);
    cpu_case::<f32>(&mut g, "f32_h8_s1024_d64_causal", &a(1024, 64, true));
    cpu_case::<f32>(&mut g, "f32_h8_s1024_d128", &a(1024, 128, false));
    cpu_case::<Bf16>(&mut g, "bf16_h8_s1024_d128", &a(1024, 128, false));
    cpu_case::<Bf16>(&mut g, "bf16_h8_s4096_d64_causal", &a(4096, 64, true));
    // The tiled path beside the naive f64 oracle it is tested against.
    let a = Attention::new(1, 2048, 2048, 1, 1, 64);
    cpu_case::<Bf16>(&mut g, "tiled_bf16_s2048_d64", &a);
    let (q, k, v) = (
        data::<Bf16>(a.o_len(), 1),
        data::<Bf16>(a.o_len(), 2),
        data::<Bf16>(a.o_len(), 3),
    );
    g.bench_function("oracle_f64_s2048_d64", |b| {
        b.iter(|| oracle::attention(&a, &q, &k, &v))
    });
    g.finish();
}

/// One CPU backward of `a` at precision `T` (the forward's o and LSE made once), timed as
/// FLOP/s of 2.5 forwards.
fn cpu_backward_case<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, WallTime>,
    name: &str,
    a: &Attention,
) {
    g.throughput(Throughput::Elements((2.5 * a.flops()) as u64));
    let n_kv = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    let (q, k, v, d_o) = (
        data::<T>(a.o_len(), 1),
        data::<T>(n_kv, 2),
        data::<T>(n_kv, 3),
        data::<T>(a.o_len(), 4),
    );
    let dev = Device::cpu();
    let mut o = vec![T::default(); a.o_len()];
    let mut lse = vec![0f32; a.lse_len()];
    flash::forward(
        &dev,
        a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (
        vec![T::default(); q.len()],
        vec![T::default(); n_kv],
        vec![T::default(); n_kv],
    );
    let mut ws = vec![0f32; flash::backward_workspace_len(&dev, a)];
    g.bench_function(name, |b| {
        b.iter(|| {
            flash::backward(
                &dev,
                a,
                BackwardIo {
                    q: (&q).into(),
                    k: (&k).into(),
                    v: (&v).into(),
                    o: (&o).into(),
                    d_o: (&d_o).into(),
                    lse: (&lse).into(),
                    dq: (&mut dq).into(),
                    dk: (&mut dk).into(),
                    dv: (&mut dv).into(),
                    grad_strides: None,
                    d_sink_logits: None,
                    workspace: (&mut ws).into(),
                },
                Extras::default(),
            )
            .unwrap()
        })
    });
}

fn bench_cpu_backward(c: &mut Criterion) {
    let mut g = c.benchmark_group("flash_backward_cpu");
    g.sample_size(10);
    let a = |s, d, causal| Attention::new(1, s, s, 8, 8, d).causal(causal);
    cpu_backward_case::<f32>(&mut g, "f32_h8_s1024_d64_causal", &a(1024, 64, true));
    cpu_backward_case::<Bf16>(&mut g, "bf16_h8_s1024_d64", &a(1024, 64, false));
    cpu_backward_case::<Bf16>(&mut g, "bf16_h8_s1024_d128_causal", &a(1024, 128, true));
    // The tiled backward beside the f64 oracle's gradients it is tested against.
    let a = Attention::new(1, 512, 512, 1, 1, 64);
    cpu_backward_case::<Bf16>(&mut g, "tiled_bf16_s512_d64", &a);
    let x = data::<Bf16>(a.o_len(), 1);
    g.bench_function("oracle_f64_s512_d64", |b| {
        b.iter(|| oracle::backward(&a, &x, &x, &x, &x, &Default::default()))
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

criterion_group!(benches, bench_cpu, bench_cpu_backward, bench_cuda);
criterion_main!(benches);
