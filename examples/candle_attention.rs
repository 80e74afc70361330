//! attnkit's flash attention inside a candle model: one attention block's core on candle CPU
//! tensors, GQA and causal, checked against candle's own naive attention.
//!
//! `cargo run --release --example candle_attention --features candle`

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
    let dev = Device::Cpu;
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
    Ok(())
}
