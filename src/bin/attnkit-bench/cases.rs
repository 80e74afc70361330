//! The case table: what each family is measured at. `scripts/peers.py` reads the same table
//! (`--list`), so ours and the peers always run the same shapes.

use attnkit::decode::{self, Decode, Layout, Tables};
use attnkit::flash::{self, Attention, Extras, Relu2Norm, Score};
use attnkit::lightning::{self, Config, Forward, Seqs};
use attnkit::monarch::{self, Grads, MonarchShape, Rows, Weights};
use attnkit::{Bf16, Device, Element, Result};

use super::num;

/// Throughput of one case.
#[derive(Clone, Copy, Debug)]
pub enum Rate {
    /// Compute-bound: TFLOP/s.
    Tflops(f64),
    /// Memory-bound: GB/s of the bytes that must move.
    Gbps(f64),
}

/// How many times a case runs: untimed warm-ups, then timed runs.
#[derive(Clone, Copy, Debug)]
pub struct Reps {
    pub warmup: usize,
    pub runs: usize,
}

impl Reps {
    /// The bench's: two warm-ups, the median of 20 runs.
    pub const TIMED: Reps = Reps {
        warmup: 2,
        runs: 20,
    };
    /// One run, for the emulator's counters (`--structure`).
    pub const ONCE: Reps = Reps { warmup: 0, runs: 1 };
}

/// Runs one case on a device: (median ms, rate).
pub type Runner = Box<dyn Fn(&Device, Reps) -> Result<(f64, Rate)>>;

/// One line of the table.
pub struct Case {
    pub family: &'static str,
    /// Unique name within the family.
    pub name: String,
    /// The shape and options as JSON fields (`"k":v,...`), read by the peer script.
    pub shape: String,
    /// Runs the case (warm-up, median of timed runs); returns (ms, rate).
    pub run: Runner,
}

impl Case {
    pub fn describe(&self) -> String {
        format!(
            "{{\"kind\":\"case\",\"family\":{:?},\"case\":{:?},{}}}",
            self.family, self.name, self.shape
        )
    }

    pub fn result(
        &self,
        imp: &str,
        device: &str,
        m: Option<(f64, Rate)>,
        status: &str,
        frac: Option<f64>,
    ) -> String {
        let (ms, tflops, gbps) = match m {
            Some((ms, Rate::Tflops(t))) => (Some(ms), Some(t), None),
            Some((ms, Rate::Gbps(g))) => (Some(ms), None, Some(g)),
            None => (None, None, None),
        };
        format!(
            "{{\"kind\":\"result\",\"impl\":{imp:?},\"family\":{:?},\"case\":{:?},{},\"device\":{device:?},\"median_ms\":{},\"tflops\":{},\"gbps\":{},\"frac_ceiling\":{},\"status\":{status:?}}}",
            self.family,
            self.name,
            self.shape,
            num(ms),
            num(tflops),
            num(gbps),
            num(frac)
        )
    }
}

pub fn table() -> Vec<Case> {
    let mut t = Vec::new();
    // The runtime baseline: one memory-bound pass (the self-test scale), 256 Mi f32 elements.
    t.push(Case {
        family: "selftest",
        name: "scale_f32_256M".into(),
        shape: "\"dtype\":\"f32\",\"n\":268435456".into(),
        run: Box::new(selftest_case),
    });
    // FlashAttention forward: bf16, head dim 128, 16 heads, 16k tokens in all (batch x seq).
    for seq in [1024usize, 2048, 4096, 8192, 16384] {
        for causal in [false, true] {
            let (batch, heads, d) = (16384 / seq, 16, 128);
            t.push(Case {
                family: "flash",
                name: format!("bf16_d{d}_s{seq}_{}", if causal { "causal" } else { "full" }),
                shape: format!(
                    "\"dtype\":\"bf16\",\"batch\":{batch},\"seq_q\":{seq},\"seq_k\":{seq},\"heads_q\":{heads},\"heads_kv\":{heads},\"head_dim\":{d},\"causal\":{causal}"
                ),
                run: Box::new(move |dev, reps| flash_case(dev, Attention::new(batch, seq, seq, heads, heads, d).causal(causal), reps)),
            });
        }
    }
    // FlashAttention backward (issue 15): bf16, head dims 64 and 128, 16 heads, 16k tokens in
    // all; FLOPs counted as 2.5x the forward's (FlashAttention's convention: five products of
    // the forward's two). Timed: the backward alone, after one forward made o and the LSE.
    for d in [64usize, 128] {
        for seq in [1024usize, 4096, 16384] {
            for causal in [false, true] {
                let (batch, heads) = (16384 / seq, 16);
                t.push(Case {
                    family: "flash_backward",
                    name: format!("bf16_d{d}_s{seq}_{}", if causal { "causal" } else { "full" }),
                    shape: format!(
                        "\"dtype\":\"bf16\",\"batch\":{batch},\"seq_q\":{seq},\"seq_k\":{seq},\"heads_q\":{heads},\"heads_kv\":{heads},\"head_dim\":{d},\"causal\":{causal}"
                    ),
                    run: Box::new(move |dev, reps| {
                        flash_backward_case(dev, Attention::new(batch, seq, seq, heads, heads, d).causal(causal), reps)
                    }),
                });
            }
        }
    }
    // Variants (issue 5): a window of 4096 at seq 32k against a dense run of seq_k 4096 (the
    // skipping must make them cost about the same); relu² and the entropy output beside plain
    // softmax at the same shape. No peer: SDPA has none of these.
    let (heads, d) = (16, 128);
    let variant = |name: &str, a: Attention, relu2: bool, entropy: bool| Case {
        family: "flash_variants",
        name: name.to_string(),
        shape: format!(
            "\"dtype\":\"bf16\",\"batch\":{},\"seq_q\":{},\"seq_k\":{},\"heads_q\":{heads},\"heads_kv\":{heads},\"head_dim\":{d},\"causal\":{},\"window_left\":{},\"relu2\":{relu2},\"entropy\":{entropy}",
            a.batch,
            a.seq_q,
            a.seq_k,
            a.opts.causal,
            a.opts
                .window_left
                .map_or("null".to_string(), |w| w.to_string())
        ),
        run: Box::new(move |dev, reps| {
            flash_variant_case(dev, a.clone(), relu2, entropy, None, reps)
        }),
    };
    t.push(variant(
        "window4096_s32768",
        Attention::new(1, 32768, 32768, heads, heads, d)
            .causal(true)
            .window(Some(4095), None),
        false,
        false,
    ));
    t.push(variant(
        "dense_q32768_k4096",
        Attention::new(1, 32768, 4096, heads, heads, d),
        false,
        false,
    ));
    t.push(variant(
        "softmax_s4096",
        Attention::new(4, 4096, 4096, heads, heads, d),
        false,
        false,
    ));
    t.push(variant(
        "entropy_s4096",
        Attention::new(4, 4096, 4096, heads, heads, d),
        false,
        true,
    ));
    t.push(variant(
        "relu2_s4096",
        Attention::new(4, 4096, 4096, heads, heads, d).score(Score::Relu2(Relu2Norm::SeqLen)),
        true,
        false,
    ));
    // Lightning Attention-2 forward: bf16, 32 heads, d = e = 128, seq 1k..128k (batch 1); GB/s of
    // q, k, v, o. Time per token should stay flat.
    for seq in [1024usize, 4096, 16384, 65536, 131072] {
        t.push(lightning_row(seq, 32, 128, 128));
    }
    // Decode: one new token against a KV cache, bf16, 32 query heads on 8 KV heads of 128;
    // memory-bound, GB/s of K and V read (caches of at most 4 GiB).
    for (batch, cache) in [
        (1usize, 4096usize),
        (1, 32768),
        (1, 131072),
        (8, 32768),
        (64, 4096),
        (64, 16384),
    ] {
        t.push(decode_row(
            format!("bf16_d128_b{batch}_c{cache}"),
            batch,
            cache,
            32,
            8,
            128,
        ));
    }
    // Monarch multiply: bf16, 16k tokens, n = 4096, many small blocks (memory-bound) and few
    // large ones (compute-bound).
    for blocks in [64usize, 16, 4] {
        t.push(monarch_row(16384, 4096, blocks));
    }
    // Its backward (dx and the weight gradients) at the compute-bound two.
    for blocks in [16usize, 4] {
        t.push(monarch_backward_row(16384, 4096, blocks));
    }
    t
}

/// A Lightning forward case: bf16, batch 1.
fn lightning_row(seq: usize, heads: usize, d: usize, e: usize) -> Case {
    Case {
        family: "lightning",
        name: format!("bf16_h{heads}_d{d}_s{seq}"),
        shape: format!(
            "\"dtype\":\"bf16\",\"batch\":1,\"seq\":{seq},\"heads\":{heads},\"d\":{d},\"e\":{e}"
        ),
        run: Box::new(move |dev, reps| lightning_case(dev, seq, heads, d, e, reps)),
    }
}

/// A decode case: one new bf16 token a sequence against `cache` cached keys.
fn decode_row(name: String, batch: usize, cache: usize, hq: usize, hk: usize, d: usize) -> Case {
    Case {
        family: "decode",
        name,
        shape: format!(
            "\"dtype\":\"bf16\",\"batch\":{batch},\"seq_q\":1,\"cache\":{cache},\"heads_q\":{hq},\"heads_kv\":{hk},\"head_dim\":{d}"
        ),
        run: Box::new(move |dev, reps| decode_case(dev, batch, cache, hq, hk, d, reps)),
    }
}

/// A square Monarch multiply case: bf16, n = `blocks` blocks of n / blocks.
fn monarch_row(tokens: usize, n: usize, blocks: usize) -> Case {
    let b = n / blocks;
    Case {
        family: "monarch",
        name: format!("bf16_t{tokens}_n{n}_b{blocks}"),
        shape: format!(
            "\"dtype\":\"bf16\",\"tokens\":{tokens},\"k\":{blocks},\"q\":{b},\"p\":{b},\"l\":{blocks},\"s\":{b},\"r\":{b},\"bound\":\"{}\"",
            if blocks >= 16 { "memory" } else { "compute" }
        ),
        run: Box::new(move |dev, reps| monarch_case(dev, tokens, n, blocks, reps)),
    }
}

/// A square Monarch backward case: bf16, the shape of [`monarch_row`]; FLOPs counted as twice
/// the forward's (dx, and the weight gradients).
fn monarch_backward_row(tokens: usize, n: usize, blocks: usize) -> Case {
    let b = n / blocks;
    Case {
        family: "monarch_backward",
        name: format!("bf16_t{tokens}_n{n}_b{blocks}"),
        shape: format!(
            "\"dtype\":\"bf16\",\"tokens\":{tokens},\"k\":{blocks},\"q\":{b},\"p\":{b},\"l\":{blocks},\"s\":{b},\"r\":{b},\"bound\":\"compute\""
        ),
        run: Box::new(move |dev, reps| monarch_backward_case(dev, tokens, n, blocks, reps)),
    }
}

/// Small shapes for `--structure`: each case runs once under the PTX emulator, which counts
/// what the kernels do (barriers, shared-memory traffic and bank conflicts, global sectors;
/// `scripts/perf-structure.sh`). Sizes keep the emulator quick; the per-tile counts do not
/// depend on them. Not timings.
pub fn structure() -> Vec<Case> {
    let mut t = Vec::new();
    let attn = |name: String, a: Attention| Case {
        family: "flash",
        shape: format!(
            "\"dtype\":\"bf16\",\"batch\":{},\"seq_q\":{},\"seq_k\":{},\"heads_q\":{},\"heads_kv\":{},\"head_dim\":{},\"causal\":{}",
            a.batch, a.seq_q, a.seq_k, a.heads_q, a.heads_kv, a.head_dim, a.opts.causal
        ),
        name,
        run: Box::new(move |dev, reps| flash_case(dev, a.clone(), reps)),
    };
    // One block of query rows (128 at d <= 192, 64 at 256) against 256 keys.
    for (d, rows) in [(64usize, 128usize), (128, 128), (256, 64)] {
        t.push(attn(
            format!("bf16_d{d}_q{rows}_k256_full"),
            Attention::new(1, rows, 256, 1, 1, d),
        ));
    }
    t.push(attn(
        "bf16_d128_s256_causal".into(),
        Attention::new(1, 256, 256, 1, 1, 128).causal(true),
    ));
    // A block mask of 1 x 1 blocks, a local band 16 keys wide: the worst case of the tile
    // scan (8192 entries under every tile it rules out) and of per-key masking.
    let a = Attention::new(1, 128, 256, 1, 1, 128);
    // Row i sees keys i + 113 ..= i + 128 (bottom-right aligned: seq_k - seq_q = 128).
    let (rows, cols) = (a.seq_q, a.seq_k);
    let band: Vec<u8> = (0..rows * cols)
        .map(|e| u8::from(e % cols <= e / cols + 128 && e % cols + 16 > e / cols + 128))
        .collect();
    t.push(Case {
        family: "flash",
        name: "bf16_d128_q128_k256_mask1x1".into(),
        shape: "\"dtype\":\"bf16\",\"batch\":1,\"seq_q\":128,\"seq_k\":256,\"heads_q\":1,\"heads_kv\":1,\"head_dim\":128,\"causal\":false,\"block_mask\":\"local 1x1, width 16\"".into(),
        run: Box::new(move |dev, reps| {
            flash_variant_case(dev, a.clone(), false, false, Some(band.clone()), reps)
        }),
    });
    // Decode: GQA groups of 4 and 8 query heads per KV head, 1024 cached keys.
    for group in [4usize, 8] {
        t.push(decode_row(
            format!("bf16_d128_g{group}_c1024"),
            1,
            1024,
            group,
            1,
            128,
        ));
    }
    t.push(lightning_row(512, 1, 128, 128));
    for blocks in [16usize, 4] {
        t.push(monarch_row(128, 1024, blocks));
    }
    t.push(monarch_backward_row(128, 1024, 16));
    t
}

/// Deterministic values in [-1, 1) (benches need values, not statistics).
fn fill<T: Element>(n: usize, seed: u32) -> Vec<T> {
    (0..n)
        .map(|i| {
            T::from_f32(
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0
                    - 1.0,
            )
        })
        .collect()
}

/// The device's stream (every case runs on a GPU).
fn stream(dev: &Device) -> Result<std::sync::Arc<attnkit::cudarc::driver::CudaStream>> {
    dev.stream()
        .cloned()
        .ok_or(attnkit::Error::NoDevice { ordinal: None })
}

fn driver(source: attnkit::cudarc::driver::DriverError) -> attnkit::Error {
    attnkit::Error::Driver {
        context: "bench alloc",
        source,
    }
}

type DevBuf<T> = attnkit::cudarc::driver::CudaSlice<T>;

/// q, k, v of `a` on the device, deterministic bf16 values.
fn qkv(
    s: &std::sync::Arc<attnkit::cudarc::driver::CudaStream>,
    a: &Attention,
) -> Result<[DevBuf<Bf16>; 3]> {
    let n_kv = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    Ok([
        s.clone_htod(&fill::<Bf16>(a.o_len(), 1)).map_err(driver)?,
        s.clone_htod(&fill::<Bf16>(n_kv, 2)).map_err(driver)?,
        s.clone_htod(&fill::<Bf16>(n_kv, 3)).map_err(driver)?,
    ])
}

fn flash_variant_case(
    dev: &Device,
    a: Attention,
    relu2: bool,
    entropy: bool,
    mask_1x1: Option<Vec<u8>>,
    reps: Reps,
) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let [q, k, v] = qkv(&s, &a)?;
    let mut o = s.alloc_zeros::<Bf16>(a.o_len()).map_err(driver)?;
    let mut lse = s.alloc_zeros::<f32>(a.lse_len()).map_err(driver)?;
    let mut ent = s
        .alloc_zeros::<f32>(if entropy { a.lse_len() } else { 1 })
        .map_err(driver)?;
    let mask = match &mask_1x1 {
        Some(m) => Some(s.clone_htod(m).map_err(driver)?),
        None => None,
    };
    let _ = relu2; // carried in `a`'s score; named for the table
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let extras = Extras {
            entropy: entropy.then(|| (&mut ent).into()),
            block_mask: mask.as_ref().map(|m| flash::BlockMask {
                mask: m.into(),
                block_q: 1,
                block_k: 1,
            }),
            ..Default::default()
        };
        flash::forward_with(
            dev,
            &a,
            (&q).into(),
            (&k).into(),
            (&v).into(),
            (&mut o).into(),
            (&mut lse).into(),
            extras,
        )
    })?;
    Ok((t.median_ms, Rate::Tflops(a.flops() / t.median_ms / 1e9)))
}

fn lightning_case(
    dev: &Device,
    seq: usize,
    heads: usize,
    d: usize,
    e: usize,
    reps: Reps,
) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let slopes = lightning::decay_slopes(heads, 1.0)?;
    let cfg = Config {
        heads,
        d,
        e,
        decay: Some(&slopes),
        scale: 1.0,
        causal: true,
    };
    let seqs = Seqs::Dense { batch: 1, seq };
    let (nq, nv) = (seq * heads * d, seq * heads * e);
    let q = s.clone_htod(&fill::<Bf16>(nq, 1)).map_err(driver)?;
    let k = s.clone_htod(&fill::<Bf16>(nq, 2)).map_err(driver)?;
    let v = s.clone_htod(&fill::<Bf16>(nv, 3)).map_err(driver)?;
    let mut o = s.alloc_zeros::<Bf16>(nv).map_err(driver)?;
    let mut ws = s
        .alloc_zeros::<f32>(lightning::workspace_len(dev, &cfg, &seqs)?.max(1))
        .map_err(driver)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let f = Forward {
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            o: (&mut o).into(),
            initial_state: None,
            final_state: None,
            workspace: (&mut ws).into(),
        };
        lightning::forward(dev, &cfg, &seqs, f)
    })?;
    let bytes = (2 * nq + 2 * nv) * 2;
    Ok((t.median_ms, Rate::Gbps(bytes as f64 / t.median_ms / 1e6)))
}

fn decode_case(
    dev: &Device,
    batch: usize,
    cache: usize,
    hq: usize,
    hk: usize,
    d: usize,
    reps: Reps,
) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let lens = vec![cache as i32; batch];
    let p = Decode::new(&lens, 1, hq, hk, d, Layout::Contiguous { capacity: cache });
    let n = batch * cache * hk * d;
    // Random caches without a multi-GiB host copy: one random 64 Mi-element block, tiled on
    // the device.
    let block = s
        .clone_htod(&fill::<Bf16>(n.min(1 << 26), 9))
        .map_err(driver)?;
    let mut k = s.alloc_zeros::<Bf16>(n).map_err(driver)?;
    let mut v = s.alloc_zeros::<Bf16>(n).map_err(driver)?;
    for start in (0..n).step_by(block.len()) {
        let len = block.len().min(n - start);
        s.memcpy_dtod(&block.slice(..len), &mut k.slice_mut(start..start + len))
            .map_err(driver)?;
        s.memcpy_dtod(&block.slice(..len), &mut v.slice_mut(start..start + len))
            .map_err(driver)?;
    }
    let q = s.clone_htod(&fill::<Bf16>(p.o_len(), 1)).map_err(driver)?;
    let lens_d = s.clone_htod(&lens).map_err(driver)?;
    let mut ws = s
        .alloc_zeros::<f32>(p.workspace_len(dev).max(1))
        .map_err(driver)?;
    let mut o = s.alloc_zeros::<Bf16>(p.o_len()).map_err(driver)?;
    let mut lse = s.alloc_zeros::<f32>(p.lse_len()).map_err(driver)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let tables = Tables {
            cache_seqlens: (&lens_d).into(),
            block_table: None,
            ring_offsets: None,
            sink_logits: None,
            alibi_slopes: None,
        };
        decode::forward(
            dev,
            &p,
            (&q).into(),
            (&k).into(),
            (&v).into(),
            tables,
            (&mut ws).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )
    })?;
    Ok((
        t.median_ms,
        Rate::Gbps((2 * n * 2) as f64 / t.median_ms / 1e6),
    ))
}

fn monarch_case(
    dev: &Device,
    tokens: usize,
    n: usize,
    blocks: usize,
    reps: Reps,
) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let shape = MonarchShape::square(n, blocks)?;
    let w1 = s
        .clone_htod(&fill::<Bf16>(shape.w1_len(), 1))
        .map_err(driver)?;
    let w2 = s
        .clone_htod(&fill::<Bf16>(shape.w2_len(), 2))
        .map_err(driver)?;
    let x = s
        .clone_htod(&fill::<Bf16>(tokens * shape.n_in(), 3))
        .map_err(driver)?;
    let mut y = s
        .alloc_zeros::<Bf16>(tokens * shape.n_out())
        .map_err(driver)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let w = Weights {
            shape,
            w1: (&w1).into(),
            w2: (&w2).into(),
            bias: None,
        };
        monarch::multiply(
            dev,
            &w,
            (&x).into(),
            Rows::contiguous(tokens, shape.n_in()),
            (&mut y).into(),
            shape.n_out(),
        )
    })?;
    // Report TFLOP/s; with small blocks the bytes (x, y, both weights) bound it instead.
    Ok((
        t.median_ms,
        Rate::Tflops(shape.flops(tokens) / t.median_ms / 1e9),
    ))
}

fn monarch_backward_case(
    dev: &Device,
    tokens: usize,
    n: usize,
    blocks: usize,
    reps: Reps,
) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let shape = MonarchShape::square(n, blocks)?;
    let up = |len: usize, seed: u32| s.clone_htod(&fill::<Bf16>(len, seed)).map_err(driver);
    let (w1, w2, bias) = (
        up(shape.w1_len(), 1)?,
        up(shape.w2_len(), 2)?,
        up(shape.n_out(), 3)?,
    );
    let (x, dy) = (
        up(tokens * shape.n_in(), 4)?,
        up(tokens * shape.n_out(), 5)?,
    );
    let mut dx = s
        .alloc_zeros::<Bf16>(tokens * shape.n_in())
        .map_err(driver)?;
    let f32s = |len: usize| s.alloc_zeros::<f32>(len).map_err(driver);
    let (mut dw1, mut dw2, mut db) = (
        f32s(shape.w1_len())?,
        f32s(shape.w2_len())?,
        f32s(shape.n_out())?,
    );
    let ws_len =
        monarch::backward_workspace_len(shape, tokens).ok_or_else(|| attnkit::Error::Shape {
            arg: "tokens",
            detail: "the backward's workspace overflows usize".into(),
        })?;
    let mut ws = f32s(ws_len)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let w = Weights {
            shape,
            w1: (&w1).into(),
            w2: (&w2).into(),
            bias: Some((&bias).into()),
        };
        let g = Grads {
            dx: (&mut dx).into(),
            dx_row_stride: shape.n_in(),
            dw1: (&mut dw1).into(),
            dw2: (&mut dw2).into(),
            dbias: Some((&mut db).into()),
            workspace: (&mut ws).into(),
        };
        let rows = Rows::contiguous(tokens, shape.n_in());
        monarch::backward(dev, &w, (&x).into(), rows, (&dy).into(), shape.n_out(), g)
    })?;
    Ok((
        t.median_ms,
        Rate::Tflops(2.0 * shape.flops(tokens) / t.median_ms / 1e9),
    ))
}

fn flash_case(dev: &Device, a: Attention, reps: Reps) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let [q, k, v] = qkv(&s, &a)?;
    let mut o = s.alloc_zeros::<Bf16>(a.o_len()).map_err(driver)?;
    let mut lse = s.alloc_zeros::<f32>(a.lse_len()).map_err(driver)?;
    // q, k, v are 64 MiB each at these shapes: larger than the L2, no rotation needed.
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        flash::forward(
            dev,
            &a,
            (&q).into(),
            (&k).into(),
            (&v).into(),
            (&mut o).into(),
            (&mut lse).into(),
        )
    })?;
    Ok((t.median_ms, Rate::Tflops(a.flops() / t.median_ms / 1e9)))
}

fn flash_backward_case(dev: &Device, a: Attention, reps: Reps) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let n_kv = a.batch * a.seq_k * a.heads_kv * a.head_dim;
    let [q, k, v] = qkv(&s, &a)?;
    let d_o = s.clone_htod(&fill::<Bf16>(a.o_len(), 4)).map_err(driver)?;
    let mut o = s.alloc_zeros::<Bf16>(a.o_len()).map_err(driver)?;
    let mut lse = s.alloc_zeros::<f32>(a.lse_len()).map_err(driver)?;
    flash::forward(
        dev,
        &a,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        (&mut o).into(),
        (&mut lse).into(),
    )?;
    let mut dq = s.alloc_zeros::<Bf16>(a.o_len()).map_err(driver)?;
    let mut dk = s.alloc_zeros::<Bf16>(n_kv).map_err(driver)?;
    let mut dv = s.alloc_zeros::<Bf16>(n_kv).map_err(driver)?;
    let mut ws = s
        .alloc_zeros::<f32>(flash::backward_workspace_len(dev, &a))
        .map_err(driver)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        let io = flash::BackwardIo {
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
        };
        flash::backward(dev, &a, io, Extras::default())
    })?;
    Ok((
        t.median_ms,
        Rate::Tflops(2.5 * a.flops() / t.median_ms / 1e9),
    ))
}

fn selftest_case(dev: &Device, reps: Reps) -> Result<(f64, Rate)> {
    let s = stream(dev)?;
    let driver = |source| attnkit::Error::Driver {
        context: "bench alloc",
        source,
    };
    let n = 1usize << 28;
    let x = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let mut y = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let t = attnkit::timing::time(dev, reps.warmup, reps.runs, |_| {
        attnkit::selftest::scale(dev, (&x).into(), 1, 2.0, 1.0, (&mut y).into())
    })?;
    Ok((
        t.median_ms,
        Rate::Gbps(2.0 * (n * 4) as f64 / t.median_ms / 1e6),
    ))
}

/// Device-to-device copy bandwidth, GB/s counting bytes read plus written (1 GiB, median of 10).
pub fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let s = stream(dev)?;
    let driver = |source| attnkit::Error::Driver {
        context: "copy bandwidth",
        source,
    };
    let n = 1usize << 28; // f32 elements: 1 GiB
    let src = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let mut dst = s.alloc_zeros::<f32>(n).map_err(driver)?;
    let t = attnkit::timing::time(dev, 2, 10, |_| {
        s.memcpy_dtod(&src, &mut dst).map_err(driver)
    })?;
    Ok(2.0 * (n * 4) as f64 / t.median_ms / 1e6)
}
