//! Decode benches: GB/s of K + V bytes read (criterion's "bytes/s").
//!
//! - `decode_cpu`: the split-KV CPU path at issue 18's shapes (32 query heads on 8 KV heads,
//!   head dim 128, f32 cache 32k and bf16 cache 4k, batch 1) and bf16 with 8 query heads on 1
//!   KV head, cache 4k, beside the naive f64 oracle.
//! - `decode_cuda` (where a GPU exists): bf16, head dim 128, 32 query heads on 8 KV heads, one
//!   new token, batch 1..64 x cache 4k..128k (the sweep), the heuristic's split count;
//!   timed with CUDA events, caches rotated between runs so L2 cannot serve repeats.

use attnkit::decode::{self, Decode, Layout, Tables, oracle};
use attnkit::{Bf16, Device, Element};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn data<T: Element>(n: usize, seed: u32) -> Vec<T> {
    // A cheap deterministic pattern in [-1, 1): benches need values, not statistics.
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
            T::from_f32((x % 2000) as f32 / 1000.0 - 1.0)
        })
        .collect()
}

/// K + V bytes a call reads.
fn kv_bytes(p: &Decode<'_>, elem: usize) -> u64 {
    let keys: u64 = p
        .cache_seqlens
        .host()
        .unwrap_or_default()
        .iter()
        .map(|&l| l as u64)
        .sum();
    2 * keys * (p.heads_kv * p.head_dim * elem) as u64
}

/// One CPU case: `heads_q` query heads on `heads_kv` KV heads, head dim 128, batch 1, one new
/// token, a full cache of `cache` keys, the CPU's own split count.
fn cpu_case<T: Element>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    heads_q: usize,
    heads_kv: usize,
    cache: usize,
) {
    let d = 128;
    let lens = [cache as i32];
    let p = Decode::new(
        &lens,
        1,
        heads_q,
        heads_kv,
        d,
        Layout::Contiguous { capacity: cache },
    );
    g.throughput(Throughput::Bytes(kv_bytes(&p, std::mem::size_of::<T>())));
    let dev = Device::cpu();
    let n = cache * heads_kv * d;
    let (q, k, v) = (data::<T>(p.o_len(), 1), data::<T>(n, 2), data::<T>(n, 3));
    let mut ws = vec![0f32; p.workspace_len(&dev)];
    let mut o = vec![T::default(); p.o_len()];
    let mut lse = vec![0f32; p.lse_len()];
    g.bench_function(name, |b| {
        b.iter(|| {
            decode::forward(
                &dev,
                &p,
                (&q).into(),
                (&k).into(),
                (&v).into(),
                Tables::host(&p),
                (&mut ws).into(),
                (&mut o).into(),
                (&mut lse).into(),
            )
            .unwrap()
        })
    });
}

fn bench_cpu(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_cpu");
    g.sample_size(10);
    // Issue 18's shapes (scripts/peers_cpu.py times PyTorch's SDPA at the same ones).
    cpu_case::<f32>(&mut g, "f32_hq32_hkv8_d128_c32768", 32, 8, 32768);
    cpu_case::<Bf16>(&mut g, "bf16_hq32_hkv8_d128_c4096", 32, 8, 4096);
    cpu_case::<Bf16>(&mut g, "split_bf16_c4096_d128_g8", 8, 1, 4096);
    let lens = [4096];
    let p = Decode::new(&lens, 1, 8, 1, 128, Layout::Contiguous { capacity: 4096 });
    g.throughput(Throughput::Bytes(kv_bytes(&p, 2)));
    let (q, k, v) = (
        data::<Bf16>(p.o_len(), 1),
        data::<Bf16>(4096 * 128, 2),
        data::<Bf16>(4096 * 128, 3),
    );
    g.bench_function("oracle_f64_c4096_d128_g8", |b| {
        b.iter(|| oracle::decode(&p, &q, &k, &v))
    });
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("decode_cuda: skipped: {e}");
            return;
        }
    };
    #[cfg(feature = "cuda")]
    {
        use std::time::Duration;
        let stream = dev.stream().unwrap().clone();
        let mut g = c.benchmark_group("decode_cuda");
        g.sample_size(10);
        let (hq, hk, d) = (32, 8, 128);
        for batch in [1, 8, 64] {
            for cache in [4096, 32768, 131072] {
                // About 2 GiB of caches at most: batch 64 x 128k is 32 GiB, skipped.
                let bytes = batch * cache * hk * d * 2 * 2;
                if bytes > 4 << 30 {
                    continue;
                }
                let lens = vec![cache as i32; batch];
                let p = Decode::new(&lens, 1, hq, hk, d, Layout::Contiguous { capacity: cache });
                g.throughput(Throughput::Bytes(kv_bytes(&p, 2)));
                // Two copies of the caches, alternated, unless they pass L2 many times over.
                let copies: usize = if bytes < 256 << 20 { 2 } else { 1 };
                let n = batch * cache * hk * d;
                let caches: Vec<_> = (0..copies)
                    .map(|i| {
                        (
                            stream.clone_htod(&data::<Bf16>(n, 2 + i as u32)).unwrap(),
                            stream.clone_htod(&data::<Bf16>(n, 7 + i as u32)).unwrap(),
                        )
                    })
                    .collect();
                let q = stream.clone_htod(&data::<Bf16>(p.o_len(), 1)).unwrap();
                let lens_d = stream.clone_htod(&lens).unwrap();
                let mut ws = stream
                    .alloc_zeros::<f32>(p.workspace_len(&dev).max(1))
                    .unwrap();
                let mut o = stream.alloc_zeros::<Bf16>(p.o_len()).unwrap();
                let mut lse = stream.alloc_zeros::<f32>(p.lse_len()).unwrap();
                let name = format!("bf16_d{d}_b{batch}_c{cache}_s{}", p.splits_for(&dev));
                g.bench_function(name, |bch| {
                    bch.iter_custom(|iters| {
                        let t = attnkit::timing::time(&dev, 1, iters as usize, |i| {
                            let (k, v) = &caches[i % copies];
                            let tables = Tables {
                                cache_seqlens: (&lens_d).into(),
                                block_table: None,
                                ring_offsets: None,
                                sink_logits: None,
                                alibi_slopes: None,
                            };
                            decode::forward(
                                &dev,
                                &p,
                                (&q).into(),
                                k.into(),
                                v.into(),
                                tables,
                                (&mut ws).into(),
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
