//! attnkit's flash attention inside a candle model: one attention block's core, GQA and
//! causal, checked against candle's own naive attention; then a decode step against a KV cache
//! that attnkit appends to in place. On candle CPU tensors, or on a GPU with the
//! `candle-cuda` feature where candle finds one.
//!
//! `cargo run --release --example candle_attention --features candle` (or `candle-cuda`)

use candle_core::{D, DType, Device, Result, Tensor};

/// What a candle model computes without a fused kernel (for the check only).
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // [b, s, h, d] -> [b, h, s, d], KV heads repeated to the query heads.
    let (b, s, hq, d) = q.dims4()?;
    let hkv = k.dim(2)?;
    let rep = |x: &Tensor| -> Result<Tensor> {
        x.transpose(1, 2)?
            .unsqueeze(2)?
            .expand((b, hkv, hq / hkv, s, d))?
            .reshape((b, hq, s, d))
    };
    let qh = q.transpose(1, 2)?.contiguous()?;
    let scores = (qh.matmul(&rep(k)?.t()?)? * scale)?;
    let mask: Vec<f32> = (0..s * s)
        .map(|i| {
            if i % s > i / s {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let scores = scores.broadcast_add(&Tensor::from_vec(mask, (s, s), q.device())?)?;
    let m = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&m)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&rep(v)?)?.transpose(1, 2)
}

fn main() -> Result<()> {
    // The CPU unless candle was built with CUDA (attnkit's `candle-cuda`) and finds a GPU.
    let dev = Device::cuda_if_available(0)?;
    let (b, s, hq, hkv, d) = (1, 300, 8, 2, 64);
    let q = Tensor::randn(0f32, 1.0, (b, s, hq, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (b, s, hkv, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (b, s, hkv, d), &dev)?;
    let scale = (d as f64).powf(-0.5);

    // The drop-in call, as with candle-flash-attn (bf16 here, as a model would run it).
    let (qb, kb, vb) = (
        q.to_dtype(DType::BF16)?,
        k.to_dtype(DType::BF16)?,
        v.to_dtype(DType::BF16)?,
    );
    let o = attnkit::candle::flash_attn(&qb, &kb, &vb, scale as f32, true)?;

    let want = naive(&q, &k, &v, scale)?;
    let err = (o.to_dtype(DType::F32)? - &want)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "attnkit flash_attn on candle {:?} tensors {:?}: max |o - naive f32| = {err:.2e}",
        o.dtype(),
        o.dims()
    );
    assert!(
        err < 3e-2,
        "bf16 result too far from the f32 naive attention"
    );

    // A decode step: the cache holds the s tokens above (a prefill writes them with candle's
    // slice_set), then kv_cache_append writes one new token, which attends to all s + 1.
    let cap = s + 16;
    let k_cache = Tensor::zeros((b, cap, hkv, d), DType::BF16, &dev)?;
    let v_cache = Tensor::zeros((b, cap, hkv, d), DType::BF16, &dev)?;
    k_cache.slice_set(&kb, 1, 0)?;
    v_cache.slice_set(&vb, 1, 0)?;
    let opts = attnkit::candle::KvCacheOptions::default();
    let q1 = Tensor::randn(0f32, 1.0, (b, 1, hq, d), &dev)?.to_dtype(DType::BF16)?;
    let k1 = Tensor::randn(0f32, 1.0, (b, 1, hkv, d), &dev)?.to_dtype(DType::BF16)?;
    let v1 = Tensor::randn(0f32, 1.0, (b, 1, hkv, d), &dev)?.to_dtype(DType::BF16)?;
    let lens = Tensor::new(&[s as u32 + 1], &dev)?;
    attnkit::candle::kv_cache_append(&k_cache, &v_cache, &k1, &v1, &lens, &opts)?;
    let step = attnkit::candle::flash_attn_with_kvcache(
        &q1,
        &k_cache,
        &v_cache,
        &lens,
        scale as f32,
        true,
    )?;
    // The same row from flash attention over the whole s + 1 keys.
    let (k_all, v_all) = (Tensor::cat(&[&kb, &k1], 1)?, Tensor::cat(&[&vb, &v1], 1)?);
    let full = attnkit::candle::flash_attn(&q1, &k_all, &v_all, scale as f32, true)?;
    let err = (step.to_dtype(DType::F32)? - full.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!(
        "decode step after kv_cache_append ({} keys, on {:?}): max |o - flash over all keys| = {err:.2e}",
        s + 1,
        dev.location()
    );
    assert!(err < 3e-2, "decode step too far from flash attention");
    Ok(())
}
