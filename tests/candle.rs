//! The candle adapter (feature `candle`) on candle CPU tensors: the f64 oracle on fresh random
//! inputs at sizes that are not tile multiples, views with other strides giving the same bits
//! as contiguous tensors, and bad input as candle errors naming the argument.
#![cfg(feature = "candle")]

mod common;

use attnkit::flash::{self, Attention, Options};
use attnkit::{Bf16, Element, F16};
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, random, rng};

/// A `[b, s, h, d]` candle tensor holding `x` (attnkit element type `T`) as candle dtype `dt`.
fn tensor<T: Element>(x: &[T], dims: (usize, usize, usize, usize)) -> Tensor {
    let f: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let dt = match T::DTYPE {
        attnkit::DType::F32 => DType::F32,
        attnkit::DType::Bf16 => DType::BF16,
        attnkit::DType::F16 => DType::F16,
    };
    Tensor::from_vec(f, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dt))
        .expect("tensor")
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("to host")
}

/// Oracle comparison for one element type: causal GQA, a window, and sinks.
fn matches_oracle<T: Element>(atol: f64, rtol: f64) {
    let mut r = rng(&format!("candle_oracle_{}", T::DTYPE));
    let (b, sq, sk, hq, hkv, d) = (2, 37, 53, 4, 2, 64);
    let q: Vec<T> = random(&mut r, b * sq * hq * d);
    let k: Vec<T> = random(&mut r, b * sk * hkv * d);
    let v: Vec<T> = random(&mut r, b * sk * hkv * d);
    let (qt, kt, vt) = (
        tensor(&q, (b, sq, hq, d)),
        tensor(&k, (b, sk, hkv, d)),
        tensor(&v, (b, sk, hkv, d)),
    );
    let scale = 0.15;
    let cases: [(&str, Options); 3] = [
        (
            "causal",
            Options {
                causal: true,
                scale: Some(scale),
                ..Options::default()
            },
        ),
        (
            "window",
            Options {
                scale: Some(scale),
                window_left: Some(9),
                window_right: Some(3),
                ..Options::default()
            },
        ),
        (
            "sinks",
            Options {
                causal: true,
                scale: Some(scale),
                window_left: Some(7),
                sinks: 2,
                ..Options::default()
            },
        ),
    ];
    for (name, opts) in cases {
        let got = match name {
            "causal" => attnkit::candle::flash_attn(&qt, &kt, &vt, scale, true),
            "window" => {
                attnkit::candle::flash_attn_windowed(&qt, &kt, &vt, scale, Some(9), Some(3))
            }
            _ => attnkit::candle::flash_attn_with(&qt, &kt, &vt, &opts),
        }
        .expect("candle op");
        assert_eq!(got.dims(), &[b, sq, hq, d]);
        assert_eq!(got.dtype(), qt.dtype());
        let mut a = Attention::new(b, sq, sk, hq, hkv, d);
        a.opts = opts;
        let (want, want_lse) = flash::oracle::attention(&a, &q, &k, &v);
        assert_close(
            &format!("{} {name}", T::DTYPE),
            &host(&got),
            &want,
            atol,
            rtol,
        );
        // The LSE form: the same output, and the LSE (f32 from the same inputs) to 1e-4.
        let (o2, lse) = attnkit::candle::flash_attn_with_lse(&qt, &kt, &vt, &opts).expect("lse");
        assert_eq!(host(&o2), host(&got), "{name}: with_lse changed o");
        assert_eq!(lse.dims(), &[b, hq, sq]);
        assert_close(
            &format!("{} {name} lse", T::DTYPE),
            &host(&lse),
            &want_lse,
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn f32_matches_the_oracle() {
    matches_oracle::<f32>(2e-5, 2e-5);
}

#[test]
fn bf16_matches_the_oracle() {
    // bf16 output rounding (2^-8 relative) dominates.
    matches_oracle::<Bf16>(1e-2, 1e-2);
}

#[test]
fn f16_matches_the_oracle() {
    matches_oracle::<F16>(2e-3, 2e-3);
}

#[test]
fn strided_views_give_the_bits_of_contiguous_tensors() {
    let mut r = rng("candle_views");
    let (b, s, h, d) = (1, 29, 2, 32);
    // [b, h, s, d] storage, seen as [b, s, h, d] through transpose(1, 2): no copy.
    let x: Vec<f32> = random(&mut r, b * h * s * d);
    let bhsd = Tensor::from_vec(x, (b, h, s, d), &Device::Cpu).expect("tensor");
    let view = bhsd.transpose(1, 2).expect("view");
    assert!(!view.is_contiguous());
    let dense = view.contiguous().expect("copy");
    let from_view = attnkit::candle::flash_attn(&view, &view, &view, 0.2, true).expect("view");
    let from_dense = attnkit::candle::flash_attn(&dense, &dense, &dense, 0.2, true).expect("dense");
    assert_eq!(host(&from_view), host(&from_dense));
    // A narrowed view starts at an offset into its storage.
    let wide = Tensor::from_vec(
        random::<f32>(&mut r, b * (s + 5) * h * d),
        (b, s + 5, h, d),
        &Device::Cpu,
    )
    .expect("tensor");
    let narrow = wide.narrow(1, 5, s).expect("narrow");
    let o_narrow = attnkit::candle::flash_attn(&narrow, &narrow, &narrow, 0.2, false).expect("op");
    let copy = narrow.contiguous().expect("copy");
    let o_copy = attnkit::candle::flash_attn(&copy, &copy, &copy, 0.2, false).expect("op");
    assert_eq!(host(&o_narrow), host(&o_copy));
    // And the result is not trivially constant (the comparison could not fail otherwise).
    let o = host(&o_copy);
    assert!(o.iter().any(|x| (x - o[0]).abs() > 1e-3));
}

#[test]
fn varlen_matches_the_oracle_per_sequence() {
    let mut r = rng("candle_varlen");
    let (hq, hkv, d) = (4, 2, 32);
    // An empty query sequence, keys longer than queries, and a long one.
    let (cu_q, cu_k) = ([0usize, 5, 5, 24, 93], [0usize, 9, 12, 31, 131]);
    let (tq, tk) = (cu_q[4], cu_k[4]);
    let q: Vec<f32> = random(&mut r, tq * hq * d);
    let k: Vec<f32> = random(&mut r, tk * hkv * d);
    let v: Vec<f32> = random(&mut r, tk * hkv * d);
    let t = |x: &[f32], n: usize, h: usize| {
        Tensor::from_vec(x.to_vec(), (n, h, d), &Device::Cpu).expect("tensor")
    };
    let (qt, kt, vt) = (t(&q, tq, hq), t(&k, tk, hkv), t(&v, tk, hkv));
    let cq = Tensor::new(&cu_q.map(|x| x as u32), &Device::Cpu).expect("cu_q");
    let ck = Tensor::new(&cu_k.map(|x| x as i64), &Device::Cpu).expect("cu_k");
    let opts = Options {
        causal: true,
        scale: Some(0.2),
        window_left: Some(11),
        sinks: 2,
        ..Options::default()
    };
    let got = attnkit::candle::flash_attn_varlen_with(&qt, &kt, &vt, (&cq, 69), (&ck, 100), &opts)
        .expect("varlen");
    assert_eq!(got.dims(), &[tq, hq, d]);
    let got = host(&got);
    for s in 0..4 {
        let (lq, lk) = (cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]);
        let mut a = Attention::new(1, lq, lk, hq, hkv, d);
        a.opts = opts;
        let (want, _) = flash::oracle::attention(
            &a,
            &q[cu_q[s] * hq * d..cu_q[s + 1] * hq * d],
            &k[cu_k[s] * hkv * d..cu_k[s + 1] * hkv * d],
            &v[cu_k[s] * hkv * d..cu_k[s + 1] * hkv * d],
        );
        let rows = &got[cu_q[s] * hq * d..cu_q[s + 1] * hq * d];
        assert_close(&format!("varlen sequence {s}"), rows, &want, 2e-5, 2e-5);
    }
    // The drop-in forms agree with the options form they stand for.
    let causal = attnkit::candle::flash_attn_varlen(&qt, &kt, &vt, &cq, &ck, 69, 100, 0.2, true)
        .expect("varlen");
    let as_window = attnkit::candle::flash_attn_varlen_windowed(
        &qt,
        &kt,
        &vt,
        &cq,
        &ck,
        69,
        100,
        0.2,
        None,
        Some(0),
    )
    .expect("varlen windowed");
    assert_eq!(host(&causal), host(&as_window));
    // Bad offsets and maxima name their argument.
    let short = attnkit::candle::flash_attn_varlen(&qt, &kt, &vt, &cq, &ck, 68, 100, 0.2, true);
    assert!(err_text(short).contains("`max_seqlen_q`"));
    let f = Tensor::new(&[0f32, 93.0], &Device::Cpu).expect("f32 offsets");
    assert!(
        err_text(attnkit::candle::flash_attn_varlen(
            &qt, &kt, &vt, &f, &ck, 99, 99, 0.2, true
        ))
        .contains("`seqlens_q`")
    );
    let wrong_total = Tensor::new(&[0u32, 90], &Device::Cpu).expect("cu");
    let r =
        attnkit::candle::flash_attn_varlen(&qt, &kt, &vt, &wrong_total, &ck, 99, 200, 0.2, true);
    assert!(!err_text(r).is_empty());
}

/// The error's text, which must name the argument.
fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_tensors_are_candle_errors_naming_the_argument() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 8, 2, 32), DType::F32, &dev).expect("q");
    let kv = Tensor::zeros((1, 8, 1, 32), DType::F32, &dev).expect("kv");
    let run = |q: &Tensor, k: &Tensor, v: &Tensor| attnkit::candle::flash_attn(q, k, v, 0.1, false);
    assert!(run(&q, &kv, &kv).is_ok());
    // Rank 3.
    let q3 = q.i(0).expect("rank 3");
    assert!(err_text(run(&q3, &kv, &kv)).contains("`q`"));
    // A non-unit last stride (head_dim not contiguous).
    let kt = Tensor::zeros((1, 8, 32, 2), DType::F32, &dev)
        .and_then(|t| t.transpose(2, 3))
        .expect("k");
    assert_eq!(kt.stride()[3], 2);
    assert!(err_text(run(&q, &kt, &kt)).contains("`k`"));
    // dtypes: mixed, and one attnkit has no kernel for.
    let kb = kv.to_dtype(DType::BF16).expect("bf16");
    assert!(err_text(run(&q, &kb, &kv)).contains("`k`"));
    let qi = q.to_dtype(DType::U32).expect("u32");
    let ki = kv.to_dtype(DType::U32).expect("u32");
    assert!(err_text(run(&qi, &ki, &ki)).contains("`q`"));
    // Shapes that do not agree: head dims, value length, batch.
    let k16 = Tensor::zeros((1, 8, 1, 16), DType::F32, &dev).expect("k");
    assert!(err_text(run(&q, &k16, &kv)).contains("`k`"));
    let v7 = Tensor::zeros((1, 7, 1, 32), DType::F32, &dev).expect("v");
    assert!(err_text(run(&q, &kv, &v7)).contains("`v`"));
    let k2 = Tensor::zeros((2, 8, 1, 32), DType::F32, &dev).expect("k");
    assert!(err_text(run(&q, &k2, &k2)).contains("`k`"));
    // Heads that do not divide, and a head dim with no kernel: attnkit's own checks.
    let kv3 = Tensor::zeros((1, 8, 3, 32), DType::F32, &dev).expect("kv");
    assert!(!err_text(run(&q, &kv3, &kv3)).is_empty());
    let q_odd = Tensor::zeros((1, 8, 2, 33), DType::F32, &dev).expect("q");
    let kv_odd = Tensor::zeros((1, 8, 1, 33), DType::F32, &dev).expect("kv");
    assert!(err_text(run(&q_odd, &kv_odd, &kv_odd)).contains("head_dim"));
    // A NaN scale.
    assert!(err_text(attnkit::candle::flash_attn(&q, &kv, &kv, f32::NAN, false)).contains("scale"));
}

#[test]
fn monarch_module_equals_the_layer_on_views_and_batches() {
    use attnkit::candle::MonarchModule;
    use attnkit::monarch::{MonarchLinear, Rows};
    use candle_core::Module;
    let mut r = rng("candle_monarch");
    let layer = MonarchLinear::<f32>::new(45, 37, 4, true, 11).expect("layer");
    let m = MonarchModule::new(layer.clone());
    let (tokens, width) = (13, 45);
    // Rows 50 apart: a narrowed view of a wider tensor, read in place.
    let wide: Vec<f32> = random(&mut r, tokens * 50);
    let wt = Tensor::from_vec(wide.clone(), (tokens, 50), &Device::Cpu).expect("tensor");
    let view = wt.narrow(1, 2, width).expect("view");
    let got = host(&m.forward(&view).expect("forward"));
    let mut want = vec![f32::NAN; tokens * 37];
    let rows = Rows {
        tokens,
        width,
        row_stride: 50,
    };
    layer
        .forward(
            &attnkit::Device::cpu(),
            wide[2..].into(),
            rows,
            (&mut want).into(),
            37,
        )
        .expect("layer");
    assert_eq!(got, want);
    assert!(want.iter().any(|x| (x - want[0]).abs() > 1e-4));
    // [b, s, in] -> [b, s, out], the same rows.
    let x3 = view
        .contiguous()
        .and_then(|t| t.reshape((1, tokens, width)))
        .expect("3d");
    let y3 = m.forward(&x3).expect("forward 3d");
    assert_eq!(y3.dims(), &[1, tokens, 37]);
    assert_eq!(host(&y3), want);
    // bf16 layer on bf16 tensors.
    let lb = MonarchLinear::<Bf16>::new(45, 37, 4, false, 3).expect("bf16 layer");
    let yb = MonarchModule::new(lb).forward(&x3.to_dtype(DType::BF16).expect("bf16"));
    assert_eq!(yb.expect("bf16 forward").dtype(), DType::BF16);
    // Errors naming x: dtype, width, scalar.
    let e = m
        .forward(&x3.to_dtype(DType::F16).expect("f16"))
        .map(|t| t.dims().to_vec());
    assert!(e.expect_err("dtype").to_string().contains("`x`"));
    let narrow = Tensor::zeros((2, 44), DType::F32, &Device::Cpu).expect("x");
    assert!(
        m.forward(&narrow)
            .expect_err("width")
            .to_string()
            .contains("`x`")
    );
    let scalar = Tensor::new(1f32, &Device::Cpu).expect("scalar");
    assert!(
        m.forward(&scalar)
            .expect_err("scalar")
            .to_string()
            .contains("`x`")
    );
}

#[test]
fn kvcache_decode_matches_the_oracle_per_sequence() {
    let mut r = rng("candle_kvcache");
    let (b, sq, hq, hkv, d, cap) = (3, 2, 8, 2, 64, 90);
    let lens = [2usize, 37, 90];
    let q: Vec<f32> = random(&mut r, b * sq * hq * d);
    let k: Vec<f32> = random(&mut r, b * cap * hkv * d);
    let v: Vec<f32> = random(&mut r, b * cap * hkv * d);
    let t = |x: &[f32], s: usize, h: usize| {
        Tensor::from_vec(x.to_vec(), (b, s, h, d), &Device::Cpu).expect("tensor")
    };
    let (qt, kt, vt) = (t(&q, sq, hq), t(&k, cap, hkv), t(&v, cap, hkv));
    let lt = Tensor::new(&lens.map(|x| x as i32), &Device::Cpu).expect("lens");
    let got =
        attnkit::candle::flash_attn_with_kvcache(&qt, &kt, &vt, &lt, 0.15, true).expect("decode");
    assert_eq!(got.dims(), &[b, sq, hq, d]);
    let got = host(&got);
    for (s, &len) in lens.iter().enumerate() {
        let kv = |x: &[f32]| x[s * cap * hkv * d..][..len * hkv * d].to_vec();
        let qs = &q[s * sq * hq * d..][..sq * hq * d];
        let (want, _) = attnkit::decode::oracle::sequence(
            sq,
            hq,
            hkv,
            d,
            0.15,
            true,
            None,
            qs,
            &kv(&k),
            &kv(&v),
        );
        let rows = &got[s * sq * hq * d..][..sq * hq * d];
        assert_close(&format!("kvcache sequence {s}"), rows, &want, 2e-5, 2e-5);
    }
    // Lengths past the capacity, and a batch that disagrees, name their argument.
    let long = Tensor::new(&[2i32, 37, 91], &Device::Cpu).expect("lens");
    assert!(
        !err_text(attnkit::candle::flash_attn_with_kvcache(
            &qt, &kt, &vt, &long, 0.15, true
        ))
        .is_empty()
    );
    let two = Tensor::new(&[2u32, 37], &Device::Cpu).expect("lens");
    assert!(
        err_text(attnkit::candle::flash_attn_with_kvcache(
            &qt, &kt, &vt, &two, 0.15, true
        ))
        .contains("`cache_seqlens`")
    );
}

#[test]
fn lightning_matches_the_oracle_on_views_too() {
    let mut r = rng("candle_lightning");
    let (b, s, h, d, e) = (2, 77, 3, 64, 128);
    let q: Vec<f32> = random(&mut r, b * s * h * d);
    let k: Vec<f32> = random(&mut r, b * s * h * d);
    let v: Vec<f32> = random(&mut r, b * s * h * e);
    let t = |x: &[f32], dim: usize| {
        Tensor::from_vec(x.to_vec(), (b, s, h, dim), &Device::Cpu).expect("tensor")
    };
    let (qt, kt, vt) = (t(&q, d), t(&k, d), t(&v, e));
    let slopes = attnkit::lightning::decay_slopes(h, 1.0).expect("slopes");
    let wide = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
    let slopes64 = wide(&slopes);
    for causal in [true, false] {
        let decay = causal.then_some(&slopes[..]);
        let got = attnkit::candle::lightning_attn(&qt, &kt, &vt, decay, 0.3, causal).expect("op");
        assert_eq!(got.dims(), &[b, s, h, e]);
        let want = attnkit::lightning::oracle::forward(
            &[s, s],
            h,
            d,
            e,
            &wide(&q),
            &wide(&k),
            &wide(&v),
            causal.then_some(&slopes64[..]),
            0.3,
            causal,
            None,
        );
        assert_close(
            &format!("lightning causal {causal}"),
            &host(&got),
            &want.o,
            1e-4,
            1e-4,
        );
    }
    // A transposed view ([b, h, s, d] storage) gives the same bits as its contiguous copy.
    let qv = qt
        .transpose(1, 2)
        .and_then(|x| x.contiguous())
        .and_then(|x| x.transpose(1, 2));
    let qv = qv.expect("view");
    assert!(!qv.is_contiguous());
    let a = attnkit::candle::lightning_attn(&qv, &kt, &vt, Some(&slopes), 0.3, true).expect("view");
    let c = attnkit::candle::lightning_attn(&qt, &kt, &vt, Some(&slopes), 0.3, true).expect("copy");
    assert_eq!(host(&a), host(&c));
    // Head dims and shapes that do not agree.
    let v32 = Tensor::zeros((b, s, h, 32), DType::F32, &Device::Cpu).expect("v");
    assert!(
        !err_text(attnkit::candle::lightning_attn(
            &qt, &kt, &v32, None, 1.0, true
        ))
        .is_empty()
    );
    let k_short = Tensor::zeros((b, s - 1, h, d), DType::F32, &Device::Cpu).expect("k");
    assert!(
        err_text(attnkit::candle::lightning_attn(
            &qt, &k_short, &vt, None, 1.0, true
        ))
        .contains("`k`")
    );
}

#[test]
fn extras_alibi_softcap_sinks_masks_and_entropy_match_the_oracle() {
    use attnkit::candle::FlashExtras;
    use attnkit::flash::oracle::{HostExtras, attention_row_with};
    let mut r = rng("candle_extras");
    let (b, sq, sk, hq, hkv, d) = (1, 33, 47, 4, 2, 64);
    let q: Vec<f32> = random(&mut r, b * sq * hq * d);
    let k: Vec<f32> = random(&mut r, b * sk * hkv * d);
    let v: Vec<f32> = random(&mut r, b * sk * hkv * d);
    let (qt, kt, vt) = (
        tensor(&q, (b, sq, hq, d)),
        tensor(&k, (b, sk, hkv, d)),
        tensor(&v, (b, sk, hkv, d)),
    );
    let slopes = vec![0.5f32, 0.25, 0.0, 0.0625];
    let sinks = vec![1.0f32, f32::NEG_INFINITY, 0.0, -2.0];
    let (bq, bk) = (8usize, 16usize);
    let cols = sk.div_ceil(bk);
    let mask: Vec<u8> = (0..sq.div_ceil(bq) * cols)
        .map(|i| (i % 3 != 1) as u8)
        .collect();
    let (st, lt) = (
        Tensor::new(slopes.as_slice(), &Device::Cpu).expect("slopes"),
        Tensor::new(sinks.as_slice(), &Device::Cpu).expect("sinks"),
    );
    let mt = Tensor::from_vec(mask.clone(), (sq.div_ceil(bq), cols), &Device::Cpu).expect("mask");
    // The candle-flash-attn form: ALiBi alone, causal and windowed.
    for (causal, window) in [(true, None), (false, Some((5, 2)))] {
        let got = match window {
            None => attnkit::candle::flash_attn_alibi(&qt, &kt, &vt, &st, 1.0, causal),
            Some((l, rr)) => attnkit::candle::flash_attn_alibi_windowed(
                &qt,
                &kt,
                &vt,
                &st,
                1.0,
                Some(l),
                Some(rr),
            ),
        }
        .expect("alibi op");
        let mut a = Attention::new(b, sq, sk, hq, hkv, d)
            .scale(1.0)
            .causal(causal);
        a.opts.window_left = window.map(|w| w.0);
        a.opts.window_right = window.map(|w| w.1);
        let x = HostExtras {
            alibi_slopes: Some(&slopes),
            ..Default::default()
        };
        let want: Vec<f64> = (0..sq)
            .flat_map(|i| (0..hq).map(move |h| (i, h)))
            .flat_map(|(i, h)| attention_row_with(&a, &q, &k, &v, &x, 0, h, i).o)
            .collect();
        assert_close("alibi", &host(&got), &want, 2e-5, 2e-5);
    }
    // Everything at once through FlashExtras, with the LSE and entropy back.
    let opts = Options {
        causal: true,
        scale: Some(1.0),
        softcap: Some(2.0),
        ..Options::default()
    };
    let fx = FlashExtras {
        alibi_slopes: Some(&st),
        sink_logits: Some(&lt),
        block_mask: Some((&mt, bq, bk)),
        entropy: true,
    };
    let out = attnkit::candle::flash_attn_with_extras(&qt, &kt, &vt, &opts, &fx).expect("extras");
    let mut a = Attention::new(b, sq, sk, hq, hkv, d);
    a.opts = opts;
    let x = HostExtras {
        alibi_slopes: Some(&slopes),
        sink_logits: Some(&sinks),
        block_mask: Some((&mask, bq, bk)),
    };
    let (mut want_o, mut want_lse, mut want_ent) = (vec![], vec![0.0; hq * sq], vec![0.0; hq * sq]);
    for i in 0..sq {
        for h in 0..hq {
            let row = attention_row_with(&a, &q, &k, &v, &x, 0, h, i);
            want_o.extend(row.o);
            want_lse[h * sq + i] = row.lse;
            want_ent[h * sq + i] = row.entropy;
        }
    }
    assert_close("extras o", &host(&out.o), &want_o, 2e-5, 2e-5);
    assert_close("extras lse", &host(&out.lse), &want_lse, 1e-4, 1e-4);
    let ent = out.entropy.expect("entropy asked for");
    assert_close("extras entropy", &host(&ent), &want_ent, 1e-4, 1e-4);
    // Varlen: two sequences, each against its own fixed-length call.
    let cu = [0u32, 13, 33];
    let cut = Tensor::new(&cu, &Device::Cpu).expect("cu");
    let (qp, kp) = (qt.i(0).expect("q"), qt.i(0).expect("k"));
    let packed =
        attnkit::candle::flash_attn_varlen_alibi(&qp, &kp, &kp, &st, &cut, &cut, 20, 20, 0.3, true)
            .expect("varlen alibi");
    for w in cu.windows(2) {
        let (s0, s1) = (w[0] as usize, w[1] as usize);
        let one = qt.narrow(1, s0, s1 - s0).expect("narrow");
        let fixed =
            attnkit::candle::flash_attn_alibi(&one, &one, &one, &st, 0.3, true).expect("fixed");
        let part = packed.narrow(0, s0, s1 - s0).expect("part");
        assert_eq!(host(&part), host(&fixed), "varlen sequence {s0}..{s1}");
    }
    // Bad extras are errors naming them.
    let f64_slopes = st.to_dtype(DType::F64).expect("f64");
    let short = Tensor::new(&[0.5f32; 3], &Device::Cpu).expect("short");
    let f32_mask = mt.to_dtype(DType::F32).expect("f32 mask");
    for (arg, x) in [
        (
            "alibi_slopes",
            FlashExtras {
                alibi_slopes: Some(&f64_slopes),
                ..Default::default()
            },
        ),
        (
            "alibi_slopes",
            FlashExtras {
                alibi_slopes: Some(&short),
                ..Default::default()
            },
        ),
        (
            "sink_logits",
            FlashExtras {
                sink_logits: Some(&short),
                ..Default::default()
            },
        ),
        (
            "block_mask",
            FlashExtras {
                block_mask: Some((&f32_mask, bq, bk)),
                ..Default::default()
            },
        ),
    ] {
        let e = attnkit::candle::flash_attn_with_extras(&qt, &kt, &vt, &opts, &x).map(|o| o.o);
        assert!(err_text(e).contains(arg), "expected an error naming {arg}");
    }
}

#[test]
fn lightning_states_and_decode_steps_continue_one_long_call() {
    let mut r = rng("candle_lightning_states");
    let (b, s, h, d, e) = (2, 70, 2, 64, 64);
    let q: Vec<f32> = random(&mut r, b * s * h * d);
    let k: Vec<f32> = random(&mut r, b * s * h * d);
    let v: Vec<f32> = random(&mut r, b * s * h * e);
    let t = |x: &[f32], dim: usize| {
        Tensor::from_vec(x.to_vec(), (b, s, h, dim), &Device::Cpu).expect("tensor")
    };
    let (qt, kt, vt) = (t(&q, d), t(&k, d), t(&v, e));
    let decay = [0.05f32, 0.3];
    let whole =
        attnkit::candle::lightning_attn(&qt, &kt, &vt, Some(&decay), 0.2, true).expect("op");
    // Prefill 0..40 then 40..66 through states, then four decode steps.
    let part = |x: &Tensor, a: usize, n: usize| x.narrow(1, a, n).expect("narrow");
    let (o1, s1) = attnkit::candle::lightning_attn_with_state(
        &part(&qt, 0, 40),
        &part(&kt, 0, 40),
        &part(&vt, 0, 40),
        Some(&decay),
        0.2,
        None,
    )
    .expect("chunk 1");
    let (o2, mut st) = attnkit::candle::lightning_attn_with_state(
        &part(&qt, 40, 26),
        &part(&kt, 40, 26),
        &part(&vt, 40, 26),
        Some(&decay),
        0.2,
        Some(&s1),
    )
    .expect("chunk 2");
    assert_eq!(st.dims(), &[b, h, d, e]);
    let mut outs = vec![o1, o2];
    for i in 66..70 {
        let (o, next) = attnkit::candle::lightning_decode_step(
            &part(&qt, i, 1),
            &part(&kt, i, 1),
            &part(&vt, i, 1),
            Some(&decay),
            0.2,
            &st,
        )
        .expect("step");
        assert_eq!(o.dims(), &[b, 1, h, e]);
        outs.push(o);
        st = next;
    }
    let pieces = Tensor::cat(&outs, 1).expect("cat");
    let want: Vec<f64> = host(&whole).iter().map(|&x| x as f64).collect();
    assert_close("chunks + steps", &host(&pieces), &want, 1e-5, 1e-4);
    // Bad states and steps are errors naming them.
    let bad_dims = Tensor::zeros((b, h, d, 32), DType::F32, &Device::Cpu).expect("s");
    let bad_dtype = s1.to_dtype(DType::F16).expect("f16");
    for (state, arg) in [(&bad_dims, "initial_state"), (&bad_dtype, "initial_state")] {
        let e = attnkit::candle::lightning_attn_with_state(
            &qt,
            &kt,
            &vt,
            Some(&decay),
            0.2,
            Some(state),
        )
        .map(|x| x.0);
        assert!(err_text(e).contains(arg), "expected an error naming {arg}");
    }
    let two = part(&qt, 0, 2);
    let e = attnkit::candle::lightning_decode_step(&two, &two, &two, Some(&decay), 0.2, &s1)
        .map(|x| x.0);
    assert!(err_text(e).contains("one token"));
    let e = attnkit::candle::lightning_decode_step(
        &part(&qt, 0, 1),
        &part(&kt, 0, 1),
        &part(&vt, 0, 1),
        Some(&decay),
        0.2,
        &bad_dims,
    )
    .map(|x| x.0);
    assert!(err_text(e).contains("state"));
}

#[test]
fn kvcache_with_options_reads_paged_caches_like_contiguous_ones() {
    use attnkit::candle::KvCacheOptions;
    use attnkit::decode::oracle::{Logits, sequence_with};
    let mut r = rng("candle_kvcache_with");
    let (b, sq, hq, hkv, d, page) = (2, 2, 4, 2, 64, 8);
    let lens = [21usize, 9];
    let pps = 3; // pages per sequence
    let cap = pps * page;
    let q: Vec<f32> = random(&mut r, b * sq * hq * d);
    let k: Vec<f32> = random(&mut r, b * cap * hkv * d);
    let v: Vec<f32> = random(&mut r, b * cap * hkv * d);
    let t = |x: &[f32], n: usize, s: usize, h: usize| {
        Tensor::from_vec(x.to_vec(), (n, s, h, d), &Device::Cpu).expect("tensor")
    };
    // The contiguous cache's slots, scattered into 7 pages: sequence s's page c at table[s][c].
    let table = [[5i32, 0, 3], [6, 2, 1]];
    let mut kp = vec![0f32; 7 * page * hkv * d];
    let mut vp = kp.clone();
    let row = page * hkv * d;
    for (s, cols) in table.iter().enumerate() {
        for (c, &pg) in cols.iter().enumerate() {
            let src = (s * pps + c) * row;
            kp[pg as usize * row..][..row].copy_from_slice(&k[src..src + row]);
            vp[pg as usize * row..][..row].copy_from_slice(&v[src..src + row]);
        }
    }
    let slopes = [0.25f32, 0.0, 0.125, 0.5];
    let sinks = [0.5f32, f32::NEG_INFINITY, 1.0, -1.0];
    let (st, lt) = (
        Tensor::new(&slopes, &Device::Cpu).expect("slopes"),
        Tensor::new(&sinks, &Device::Cpu).expect("sinks"),
    );
    let tt = Tensor::new(&table, &Device::Cpu).expect("table");
    let lens_t = Tensor::new(&lens.map(|x| x as u32), &Device::Cpu).expect("lens");
    let qt = t(&q, b, sq, hq);
    let opts = KvCacheOptions {
        softmax_scale: Some(0.3),
        causal: true,
        window_left: Some(12),
        softcap: Some(1.5),
        alibi_slopes: Some(&st),
        sink_logits: Some(&lt),
        block_table: None,
        rolling: None,
    };
    let contiguous = attnkit::candle::flash_attn_with_kvcache_with(
        &qt,
        &t(&k, b, cap, hkv),
        &t(&v, b, cap, hkv),
        &lens_t,
        &opts,
    )
    .expect("contiguous");
    let paged = attnkit::candle::flash_attn_with_kvcache_with(
        &qt,
        &t(&kp, 7, page, hkv),
        &t(&vp, 7, page, hkv),
        &lens_t,
        &KvCacheOptions {
            block_table: Some(&tt),
            ..opts
        },
    )
    .expect("paged");
    assert_eq!(host(&paged), host(&contiguous), "paged vs contiguous bits");
    let got = host(&contiguous);
    let x = Logits {
        window_left: Some(12),
        softcap: Some(1.5),
        alibi_slopes: Some(&slopes),
        sink_logits: Some(&sinks),
    };
    for (s, &len) in lens.iter().enumerate() {
        let kv = |x: &[f32]| x[s * cap * hkv * d..][..len * hkv * d].to_vec();
        let qs = &q[s * sq * hq * d..][..sq * hq * d];
        let (want, _) = sequence_with(sq, hq, hkv, d, 0.3, true, None, &x, qs, &kv(&k), &kv(&v));
        let rows = &got[s * sq * hq * d..][..sq * hq * d];
        assert_close(
            &format!("kvcache_with sequence {s}"),
            rows,
            &want,
            2e-5,
            2e-5,
        );
    }
    // A block table of the wrong rank names itself.
    let flat = tt.flatten_all().expect("flat");
    let bad = KvCacheOptions {
        block_table: Some(&flat),
        ..opts
    };
    assert!(
        err_text(attnkit::candle::flash_attn_with_kvcache_with(
            &qt,
            &t(&kp, 7, page, hkv),
            &t(&vp, 7, page, hkv),
            &lens_t,
            &bad
        ))
        .contains("block_table")
    );
}

/// `[n, s, h, d]` f32 CPU tensor.
fn t4(x: &[f32], dims: (usize, usize, usize, usize)) -> Tensor {
    Tensor::from_vec(x.to_vec(), dims, &Device::Cpu).expect("tensor")
}

#[test]
fn kv_cache_append_writes_what_the_library_append_writes() {
    use attnkit::candle::{KvCacheOptions, kv_cache_append};
    use attnkit::decode::{self, Decode, Layout, Tables};
    let mut r = rng("candle_append");
    let (b, sq, hkv, d, page, pages) = (2, 3, 2, 64, 8, 6);
    let lens = [11i32, 5];
    let table = [[4i32, 1], [0, 5]];
    let k0: Vec<f32> = random(&mut r, pages * page * hkv * d);
    let v0: Vec<f32> = random(&mut r, pages * page * hkv * d);
    let kn: Vec<f32> = random(&mut r, b * sq * hkv * d);
    let vn: Vec<f32> = random(&mut r, b * sq * hkv * d);
    // The library on host slices.
    let flat: Vec<i32> = table.concat();
    let layout = Layout::Paged {
        page_size: page,
        num_pages: pages,
        block_table: Some(&flat),
        pages_per_seq: 2,
    };
    let p = Decode::new(&lens, sq, hkv, hkv, d, layout);
    let (mut kw, mut vw) = (k0.clone(), v0.clone());
    decode::append(
        &attnkit::Device::cpu(),
        &p,
        (&kn).into(),
        (&vn).into(),
        Tables::host(&p),
        (&mut kw).into(),
        (&mut vw).into(),
    )
    .expect("library append");
    // candle, in place.
    let (kc, vc) = (
        t4(&k0, (pages, page, hkv, d)),
        t4(&v0, (pages, page, hkv, d)),
    );
    let (kn_t, vn_t) = (t4(&kn, (b, sq, hkv, d)), t4(&vn, (b, sq, hkv, d)));
    let tt = Tensor::new(&table, &Device::Cpu).expect("table");
    let lt = Tensor::new(&lens, &Device::Cpu).expect("lens");
    let opts = KvCacheOptions {
        block_table: Some(&tt),
        ..Default::default()
    };
    kv_cache_append(&kc, &vc, &kn_t, &vn_t, &lt, &opts).expect("candle append");
    assert_eq!(host(&kc), kw, "k cache bits");
    assert_eq!(host(&vc), vw, "v cache bits");
    // Bad input names the argument, never a panic.
    let short = Tensor::new(&[11i32], &Device::Cpu).expect("lens");
    let e = kv_cache_append(&kc, &vc, &kn_t, &vn_t, &short, &opts).expect_err("batch");
    assert!(e.to_string().contains("cache_seqlens"), "{e}");
    let half = kn_t.to_dtype(DType::BF16).expect("bf16");
    let e = kv_cache_append(&kc, &vc, &half, &vn_t, &lt, &opts).expect_err("dtype");
    assert!(e.to_string().contains("k_new"), "{e}");
    let tiny = Tensor::new(&[1i32, 5], &Device::Cpu).expect("lens");
    let e = kv_cache_append(&kc, &vc, &kn_t, &vn_t, &tiny, &opts).expect_err("len < seq_q");
    assert!(e.to_string().contains("cache_seqlens"), "{e}");
    // A contiguous cache narrowed to fewer sequences than the step has is refused (its
    // storage runs on, so the buffer checks alone would let the append write past the view).
    let big = Tensor::zeros((4, 16, hkv, d), DType::F32, &Device::Cpu).expect("cache");
    let view = big.narrow(0, 0, 1).expect("view");
    let e = kv_cache_append(&view, &view, &kn_t, &vn_t, &lt, &KvCacheOptions::default())
        .expect_err("narrowed");
    assert!(e.to_string().contains("k_cache"), "{e}");
}

#[test]
fn rolling_cache_steps_equal_the_library_rolling_path() {
    use attnkit::candle::{KvCacheOptions, flash_attn_with_kvcache_with, kv_cache_append};
    use attnkit::decode::{self, Decode, RollingCache, Rope, RopeStyle, Tables};
    let mut r = rng("candle_rolling");
    let (b, hq, hkv, d, n_sink, window) = (2, 4, 2, 64, 2, 9);
    let rope = Rope {
        style: RopeStyle::NeoX,
        theta: 1e4,
    };
    let mut c = RollingCache::new(b, n_sink, window, rope).expect("cache");
    let cap = c.capacity();
    let (mut kw, mut vw) = (vec![0f32; b * cap * hkv * d], vec![0f32; b * cap * hkv * d]);
    let (kc, vc) = (t4(&kw, (b, cap, hkv, d)), t4(&vw, (b, cap, hkv, d)));
    let dev = attnkit::Device::cpu();
    // Steps of 3, 1, 4, 2, 5 tokens: the ring fills, wraps and evicts.
    for (step, sq) in [3usize, 1, 4, 2, 5].into_iter().enumerate() {
        c.advance(sq).expect("advance");
        let (lens, ring) = (c.cache_seqlens(), c.ring_offsets());
        let q: Vec<f32> = random(&mut r, b * sq * hq * d);
        let kn: Vec<f32> = random(&mut r, b * sq * hkv * d);
        let vn: Vec<f32> = random(&mut r, b * sq * hkv * d);
        // The library.
        let mut p = Decode::new(&lens, sq, hq, hkv, d, c.layout(&ring));
        p.causal = true;
        let pa = Decode::new(&lens, sq, hkv, hkv, d, c.layout(&ring));
        decode::append(
            &dev,
            &pa,
            (&kn).into(),
            (&vn).into(),
            Tables::host(&pa),
            (&mut kw).into(),
            (&mut vw).into(),
        )
        .expect("library append");
        let mut ws = vec![0f32; p.checked_workspace_len(&dev).expect("ws")];
        let (mut o, mut lse) = (vec![f32::NAN; p.o_len()], vec![f32::NAN; p.lse_len()]);
        decode::forward(
            &dev,
            &p,
            (&q).into(),
            (&kw).into(),
            (&vw).into(),
            Tables::host(&p),
            (&mut ws).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )
        .expect("library decode");
        // candle.
        let lt = Tensor::new(lens.as_slice(), &Device::Cpu).expect("lens");
        let rt = Tensor::new(ring.as_slice(), &Device::Cpu).expect("ring");
        let opts = KvCacheOptions {
            causal: true,
            rolling: Some((&c, &rt)),
            ..Default::default()
        };
        let (kn_t, vn_t) = (t4(&kn, (b, sq, hkv, d)), t4(&vn, (b, sq, hkv, d)));
        kv_cache_append(&kc, &vc, &kn_t, &vn_t, &lt, &opts).expect("candle append");
        let got = flash_attn_with_kvcache_with(&t4(&q, (b, sq, hq, d)), &kc, &vc, &lt, &opts)
            .expect("candle decode");
        assert_eq!(host(&kc), kw, "step {step}: k cache bits");
        assert_eq!(host(&got), o, "step {step}: output bits");
    }
    // A rolling cache with a block table is refused, naming the option.
    let lt = Tensor::new(c.cache_seqlens().as_slice(), &Device::Cpu).expect("lens");
    let rt = Tensor::new(c.ring_offsets().as_slice(), &Device::Cpu).expect("ring");
    let both = KvCacheOptions {
        rolling: Some((&c, &rt)),
        block_table: Some(&rt),
        ..Default::default()
    };
    let e = kv_cache_append(&kc, &vc, &kc, &vc, &lt, &both).expect_err("both");
    assert!(e.to_string().contains("rolling"), "{e}");
}

/// The CUDA path (feature `candle-cuda`): the same calls on candle CUDA tensors give the CPU
/// path's results (which the tests above hold to the oracle), with tables on the device too.
/// They run wherever candle finds a CUDA device, and skip (or fail, under
/// `ATTNKIT_REQUIRE_GPU=1`) elsewhere.
#[cfg(feature = "candle-cuda")]
mod on_cuda {
    use super::*;
    use attnkit::candle::{FlashExtras, KvCacheOptions};

    fn gpu() -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) if std::env::var_os("ATTNKIT_REQUIRE_GPU").is_some() => {
                panic!("ATTNKIT_REQUIRE_GPU is set, but candle has no CUDA device: {e}")
            }
            Err(e) => {
                eprintln!("skipped: candle has no CUDA device ({e})");
                None
            }
        }
    }

    fn on(t: &Tensor, g: &Device) -> Tensor {
        t.to_device(g).expect("to device")
    }

    /// Max |a - b| <= atol + rtol |b| elementwise, with NaN anywhere a failure.
    fn near(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
        let (a, b) = (host(a), host(b));
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= atol + rtol * y.abs(),
                "{what}[{i}]: cuda {x}, cpu {y}"
            );
        }
    }

    #[test]
    fn flash_with_extras_on_cuda_equals_the_cpu_path() {
        let Some(g) = gpu() else { return };
        let mut r = rng("candle_cuda_flash");
        let (b, sq, sk, hq, hkv, d) = (2, 37, 53, 4, 2, 64);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let mut x = |n: usize, dims| {
                let v: Vec<f32> = random(&mut r, n);
                t4(&v, dims).to_dtype(dt).expect("dtype")
            };
            let q = x(b * sq * hq * d, (b, sq, hq, d));
            // K as a transposed view: the strides go to the kernel as they are.
            let k = x(b * sk * hkv * d, (b, hkv, sk, d))
                .transpose(1, 2)
                .expect("view");
            let v = x(b * sk * hkv * d, (b, sk, hkv, d));
            let slopes = Tensor::new(&[0.25f32, 0.0, 0.125, 0.5], &Device::Cpu).expect("s");
            let opts = Options {
                causal: true,
                window_left: Some(20),
                sinks: 2,
                ..Options::default()
            };
            let run = |q: &Tensor, k: &Tensor, v: &Tensor, s: &Tensor| {
                let x = FlashExtras {
                    alibi_slopes: Some(s),
                    entropy: true,
                    ..Default::default()
                };
                attnkit::candle::flash_attn_with_extras(q, k, v, &opts, &x).expect("flash")
            };
            let cpu = run(&q, &k, &v, &slopes);
            let cuda = run(&on(&q, &g), &on(&k, &g), &on(&v, &g), &on(&slopes, &g));
            assert!(cuda.o.device().is_cuda() && cuda.lse.device().is_cuda());
            let tol = if dt == DType::F32 { 2e-4 } else { 2e-2 };
            near(&format!("{dt:?} o"), &cuda.o, &cpu.o, tol, tol);
            near(&format!("{dt:?} lse"), &cuda.lse, &cpu.lse, 1e-3, 1e-3);
            let (ec, eg) = (cpu.entropy.expect("cpu"), cuda.entropy.expect("cuda"));
            near(&format!("{dt:?} entropy"), &eg, &ec, 2e-2, 2e-2);
        }
    }

    #[test]
    fn varlen_with_device_offsets_equals_host_offsets() {
        let Some(g) = gpu() else { return };
        let mut r = rng("candle_cuda_varlen");
        let (hq, hkv, d) = (4, 1, 128);
        let (cq, ck) = ([0u32, 7, 7, 40], [0u32, 19, 30, 81]);
        let x = |n: usize, h: usize, r: &mut _| {
            let v: Vec<f32> = random(r, n * h * d);
            Tensor::from_vec(v, (n, h, d), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::BF16))
                .expect("t")
        };
        let (q, k, v) = (x(40, hq, &mut r), x(81, hkv, &mut r), x(81, hkv, &mut r));
        let (tq, tk) = (
            Tensor::new(&cq, &Device::Cpu).expect("cq"),
            Tensor::new(&ck, &Device::Cpu).expect("ck"),
        );
        let run = |q: &Tensor, k: &Tensor, v: &Tensor, tq: &Tensor, tk: &Tensor| {
            attnkit::candle::flash_attn_varlen(q, k, v, tq, tk, 33, 51, 0.1, true).expect("varlen")
        };
        let cpu = run(&q, &k, &v, &tq, &tk);
        let (qg, kg, vg) = (on(&q, &g), on(&k, &g), on(&v, &g));
        let host_tables = run(&qg, &kg, &vg, &tq, &tk);
        let device_tables = run(&qg, &kg, &vg, &on(&tq, &g), &on(&tk, &g));
        near("host offsets", &host_tables, &cpu, 2e-2, 2e-2);
        assert_eq!(
            host(&device_tables),
            host(&host_tables),
            "device vs host offsets bits"
        );
    }

    #[test]
    fn paged_append_and_decode_with_device_tables_equal_the_cpu_path() {
        let Some(g) = gpu() else { return };
        let mut r = rng("candle_cuda_decode");
        let (b, sq, hq, hkv, d, page, pages) = (2, 2, 8, 2, 128, 16, 5);
        let lens = [29i32, 7];
        let table = [[3i32, 0], [4, 1]];
        let x = |n: usize, dims, r: &mut _| {
            let v: Vec<f32> = random(r, n);
            t4(&v, dims).to_dtype(DType::BF16).expect("bf16")
        };
        let q = x(b * sq * hq * d, (b, sq, hq, d), &mut r);
        let kc = x(pages * page * hkv * d, (pages, page, hkv, d), &mut r);
        let vc = x(pages * page * hkv * d, (pages, page, hkv, d), &mut r);
        let kn = x(b * sq * hkv * d, (b, sq, hkv, d), &mut r);
        let vn = x(b * sq * hkv * d, (b, sq, hkv, d), &mut r);
        let (tt, lt) = (
            Tensor::new(&table, &Device::Cpu).expect("table"),
            Tensor::new(&lens, &Device::Cpu).expect("lens"),
        );
        let step = |q: &Tensor, kc: &Tensor, vc: &Tensor, kn, vn, tt: &Tensor, lt: &Tensor| {
            let kc = kc.copy().expect("own cache");
            let vc = vc.copy().expect("own cache");
            let opts = KvCacheOptions {
                causal: true,
                softcap: Some(20.0),
                block_table: Some(tt),
                ..Default::default()
            };
            attnkit::candle::kv_cache_append(&kc, &vc, kn, vn, lt, &opts).expect("append");
            let o = attnkit::candle::flash_attn_with_kvcache_with(q, &kc, &vc, lt, &opts)
                .expect("decode");
            (kc, o)
        };
        let (kcpu, ocpu) = step(&q, &kc, &vc, &kn, &vn, &tt, &lt);
        let (qg, kg, vg) = (on(&q, &g), on(&kc, &g), on(&vc, &g));
        let (kng, vng) = (on(&kn, &g), on(&vn, &g));
        let (kh, oh) = step(&qg, &kg, &vg, &kng, &vng, &tt, &lt);
        let (kd, od) = step(&qg, &kg, &vg, &kng, &vng, &on(&tt, &g), &on(&lt, &g));
        assert_eq!(host(&kh), host(&kcpu), "appended cache bits");
        assert_eq!(host(&kd), host(&kcpu), "appended cache bits, device tables");
        near("decode", &oh, &ocpu, 2e-2, 2e-2);
        assert_eq!(host(&od), host(&oh), "device vs host tables bits");
    }

    #[test]
    fn lightning_states_and_monarch_on_cuda_equal_the_cpu_path() {
        let Some(g) = gpu() else { return };
        let mut r = rng("candle_cuda_lightning");
        let (b, n, h, d) = (1, 70, 2, 64);
        let v: Vec<f32> = random(&mut r, b * n * h * d);
        let x = t4(&v, (b, n, h, d)).affine(0.1, 0.0).expect("scale");
        let decay = [0.1f32, 0.3];
        let run = |x: &Tensor| {
            let (o, s) =
                attnkit::candle::lightning_attn_with_state(x, x, x, Some(&decay), 0.1, None)
                    .expect("forward");
            let one = x.narrow(1, 0, 1).expect("token");
            let (o1, s1) =
                attnkit::candle::lightning_decode_step(&one, &one, &one, Some(&decay), 0.1, &s)
                    .expect("step");
            (o, s, o1, s1)
        };
        let cpu = run(&x);
        let cuda = run(&on(&x, &g));
        near("lightning o", &cuda.0, &cpu.0, 1e-3, 1e-3);
        near("lightning state", &cuda.1, &cpu.1, 1e-3, 1e-3);
        near("lightning step o", &cuda.2, &cpu.2, 1e-3, 1e-3);
        near("lightning step state", &cuda.3, &cpu.3, 1e-3, 1e-3);
        use candle_core::Module;
        let layer = attnkit::monarch::MonarchLinear::<f32>::new(96, 80, 4, true, 7).expect("l");
        let m = attnkit::candle::MonarchModule::new(layer);
        let xs = Tensor::randn(0f32, 1.0, (3, 5, 96), &Device::Cpu).expect("x");
        let cpu = m.forward(&xs).expect("cpu");
        let cuda = m.forward(&on(&xs, &g)).expect("cuda");
        let again = m.forward(&on(&xs, &g)).expect("cached weights");
        near("monarch", &cuda, &cpu, 1e-4, 1e-4);
        assert_eq!(host(&again), host(&cuda), "second call, cached weights");
    }

    #[test]
    fn cpu_and_cuda_tensors_mixed_are_errors_naming_the_argument() {
        let Some(g) = gpu() else { return };
        let q = Tensor::zeros((1, 4, 2, 64), DType::F32, &Device::Cpu).expect("q");
        let qg = on(&q, &g);
        let e = attnkit::candle::flash_attn(&qg, &q, &qg, 0.1, false).expect_err("mixed");
        assert!(e.to_string().contains("`k`"), "{e}");
        let lens = Tensor::new(&[4u32], &Device::Cpu).expect("lens");
        let i64s = Tensor::new(&[4i64], &Device::Cpu)
            .and_then(|t| t.to_device(&g))
            .expect("lens");
        let e = attnkit::candle::flash_attn_with_kvcache(&q, &q, &q, &on(&lens, &g), 0.1, true)
            .expect_err("cpu q, cuda lens");
        assert!(e.to_string().contains("cache_seqlens"), "{e}");
        let e = attnkit::candle::flash_attn_with_kvcache(&qg, &qg, &qg, &i64s, 0.1, true)
            .expect_err("i64 on the device");
        assert!(e.to_string().contains("cache_seqlens"), "{e}");
    }
}
