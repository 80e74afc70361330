//! candle's naive attention on the CPU, the way a candle model computes it without a fused
//! kernel: `softmax(Q K^T * scale + mask) V`, in the element type, then the same for one decode
//! step over a grouped KV cache (each KV head's query heads as the rows of one product, so the
//! cache is read in place, never repeated). Medians of repeated runs; FLOPs and bytes counted as attnkit's benches
//! count them. Thread count: `RAYON_NUM_THREADS` (candle's pool and its gemm use it).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};

fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[reps / 2])
}

/// softmax over the last dimension, in the tensor's own type (max-subtracted, as candle-nn's).
fn softmax(s: &Tensor) -> Result<Tensor> {
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // K^T as a strided view: candle's CPU matmul reads transposed operands in place.
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        s = s.broadcast_add(m)?;
    }
    softmax(&s)?.matmul(v)
}

/// `[seq, seq]` additive causal mask: 0 on and below the diagonal, -inf above.
fn causal_mask(seq: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..seq * seq)
        .map(|i| {
            if i % seq > i / seq {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (seq, seq), dev)?.to_dtype(dtype)
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let reps = 9;
    println!(
        "# candle-core 0.11 naive attention, RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    // (name as in benches/flash.rs, dtype, heads, seq, head dim, causal); batch 1.
    let flash = [
        ("f32_h8_s1024_d64_causal", DType::F32, 8, 1024, 64, true),
        ("f32_h8_s1024_d128", DType::F32, 8, 1024, 128, false),
        ("bf16_h8_s1024_d128", DType::BF16, 8, 1024, 128, false),
        ("bf16_h8_s4096_d64_causal", DType::BF16, 8, 4096, 64, true),
    ];
    for (name, dtype, heads, seq, d, causal) in flash {
        let r = |_| Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?.to_dtype(dtype);
        let (q, k, v) = (r(0)?, r(1)?, r(2)?);
        let mask = if causal {
            Some(causal_mask(seq, dtype, &dev)?)
        } else {
            None
        };
        let t = median_secs(reps, || attention(&q, &k, &v, mask.as_ref()).map(|_| ()))?;
        let pairs = if causal {
            seq * (seq + 1) / 2
        } else {
            seq * seq
        };
        let gflops = 4.0 * (heads * d * pairs) as f64 / t / 1e9;
        println!(
            "flash_cpu/{name:28} candle naive {:8.2} ms {gflops:7.1} GFLOP/s",
            t * 1e3
        );
    }
    // (name as in benches/decode.rs, dtype, query heads, KV heads, cache); d 128, one token.
    let decode = [
        ("f32_hq32_hkv8_d128_c32768", DType::F32, 32, 8, 32768),
        ("bf16_hq32_hkv8_d128_c4096", DType::BF16, 32, 8, 4096),
    ];
    for (name, dtype, hq, hkv, cache) in decode {
        let d = 128;
        let q = Tensor::randn(0f32, 1.0, (1, hq, 1, d), &dev)?.to_dtype(dtype)?;
        let r = || Tensor::randn(0f32, 1.0, (1, hkv, cache, d), &dev)?.to_dtype(dtype);
        let (k, v) = (r()?, r()?);
        // The query heads of a group as rows of one product per KV head ([1, hkv, group, d]
        // against [1, hkv, cache, d]): no copy of the cache, candle's best naive form.
        let qg = q.reshape((1, hkv, hq / hkv, d))?;
        let t = median_secs(reps, || attention(&qg, &k, &v, None).map(|_| ()))?;
        let bytes = 2 * cache * hkv * d * dtype.size_in_bytes();
        let gib = bytes as f64 / t / (1u64 << 30) as f64;
        println!(
            "decode_cpu/{name:27} candle naive {:8.2} ms {gib:7.2} GiB/s",
            t * 1e3
        );
    }
    Ok(())
}
