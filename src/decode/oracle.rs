//! The naive reference for decode: f64 throughout, every score of a row materialised, RoPE
//! applied in f64, no tiles and no splits. Slow by design; tests, benches and the tour compare
//! the real implementations against it. The logit options (window, softcap, ALiBi, sink
//! logits) are applied as [`Logits`] defines them, straight from their definitions.

use super::{Decode, Layout, Rope, SeqLens};
use crate::dtype::Element;

/// Rotates `v` (one head vector, f64) to position `pos` with `rope`, in f64.
///
/// ```
/// use attnkit::decode::{oracle, Rope, RopeStyle};
/// let mut v = vec![1.0, 0.0];
/// oracle::rotate(&mut v, Rope { style: RopeStyle::Interleaved, theta: 1e4 }, 1);
/// assert!((v[0] - 1f64.cos()).abs() < 1e-15 && (v[1] - 1f64.sin()).abs() < 1e-15);
/// ```
pub fn rotate(v: &mut [f64], rope: Rope, pos: usize) {
    let d = v.len();
    for c in 0..d / 2 {
        let (a, b) = rope.pair(c, d);
        let (sin, cos) = (pos as f64 * rope.inv_freq(c, d)).sin_cos();
        let (xa, xb) = (v[a], v[b]);
        v[a] = xa * cos - xb * sin;
        v[b] = xb * cos + xa * sin;
    }
}

/// How a row's logits are formed beyond `scale * q·k` and the causal mask, for
/// [`sequence_with`] and [`decode_with`]: the sliding window, Gemma 2's softcap, ALiBi and
/// learned sink logits, with [`super::Decode`]'s and [`super::Tables`]' meanings.
///
/// ```
/// use attnkit::decode::oracle::Logits;
/// let slopes = [0.5f32];
/// let x = Logits { softcap: Some(30.0), alibi_slopes: Some(&slopes), ..Default::default() };
/// assert!(x.window_left.is_none() && x.sink_logits.is_none());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Logits<'a> {
    /// A new token at position `t` sees keys `j >= t - window_left` only.
    pub window_left: Option<usize>,
    /// `logit = c * tanh(scale * q·k / c)`.
    pub softcap: Option<f32>,
    /// `[heads_q]`: `logit -= slope_h * |pos_i - j|`, `pos_i = len - seq_q + i` (after the
    /// softcap).
    pub alibi_slopes: Option<&'a [f32]>,
    /// `[heads_q]`: one more logit per row with no value vector.
    pub sink_logits: Option<&'a [f32]>,
}

/// A head vector in f64, rotated to `pos` when there is a RoPE.
fn vector<T: Element>(x: &[T], rope: Option<Rope>, pos: usize) -> Vec<f64> {
    let mut v: Vec<f64> = x.iter().map(|e| e.to_f32() as f64).collect();
    if let Some(r) = rope {
        rotate(&mut v, r, pos);
    }
    v
}

/// One sequence's reference. `q`: contiguous `[seq_q, heads_q, d]`; `k`, `v`: contiguous
/// `[len, heads_kv, d]`, the cache's keys in logical order (key `j` at position `j`, query `i`
/// at `len - seq_q + i`, the causal mask bottom-right). Returns `o` `[seq_q, heads_q, d]` and
/// `lse` `[heads_q, seq_q]`; a row that sees no key gives zeros and `-inf`.
///
/// ```
/// use attnkit::decode::oracle;
/// let q = vec![1.0f32; 64];
/// let kv: Vec<f32> = (0..128).map(|i| (i / 64) as f32).collect(); // keys 0s and 1s
/// let (o, lse) = oracle::sequence(1, 1, 1, 64, 0.0, true, None, &q, &kv, &kv);
/// assert!((o[0] - 0.5).abs() < 1e-12 && (lse[0] - 2f64.ln()).abs() < 1e-12);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sequence<T: Element>(
    seq_q: usize,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    scale: f32,
    causal: bool,
    rope: Option<Rope>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> (Vec<f64>, Vec<f64>) {
    sequence_windowed(
        seq_q, heads_q, heads_kv, d, scale, causal, None, rope, q, k, v,
    )
}

/// [`sequence`] with a sliding window: token `i` (at position `len - seq_q + i`) sees keys
/// `j >= position - window_left` only.
///
/// ```
/// use attnkit::decode::oracle;
/// let kv: Vec<f32> = (0..3 * 64).map(|i| (i / 64) as f32).collect(); // keys 0, 1, 2
/// let q = vec![0.0f32; 64];
/// let (o, _) = oracle::sequence_windowed(1, 1, 1, 64, 1.0, true, Some(1), None, &q, &kv, &kv);
/// assert!((o[0] - 1.5).abs() < 1e-12); // keys 1 and 2, equal weights
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sequence_windowed<T: Element>(
    seq_q: usize,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    scale: f32,
    causal: bool,
    window_left: Option<usize>,
    rope: Option<Rope>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> (Vec<f64>, Vec<f64>) {
    let x = Logits {
        window_left,
        ..Default::default()
    };
    sequence_with(
        seq_q, heads_q, heads_kv, d, scale, causal, rope, &x, q, k, v,
    )
}

/// [`sequence`] with every logit option of [`Logits`]: a row's logits are
/// `scale * q·k`, soft-capped, minus the ALiBi bias, over the keys the causal mask and the
/// window leave, plus the sink logit; `lse` is their log-sum-exp (`+inf` for a `+inf` sink,
/// whose row then has `O = 0`).
///
/// ```
/// use attnkit::decode::oracle::{self, Logits};
/// let kv: Vec<f32> = (0..2 * 64).map(|i| (i / 64) as f32).collect(); // keys 0, 1
/// let q = vec![0.0f32; 64];
/// let slopes = [2f32.ln()]; // key 0 is one step away: half the weight of key 1
/// let x = Logits { alibi_slopes: Some(&slopes), ..Default::default() };
/// let (o, _) = oracle::sequence_with(1, 1, 1, 64, 1.0, true, None, &x, &q, &kv, &kv);
/// assert!((o[0] - 2.0 / 3.0).abs() < 1e-7); // (ln 2 rounded to f32)
/// ```
#[allow(clippy::too_many_arguments)]
pub fn sequence_with<T: Element>(
    seq_q: usize,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    scale: f32,
    causal: bool,
    rope: Option<Rope>,
    x: &Logits<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> (Vec<f64>, Vec<f64>) {
    let window_left = x.window_left;
    let len = k.len() / (heads_kv * d);
    let group = heads_q / heads_kv;
    let mut o = vec![0.0; seq_q * heads_q * d];
    let mut lse = vec![f64::NEG_INFINITY; heads_q * seq_q];
    for i in 0..seq_q {
        let pos = (len + i).saturating_sub(seq_q);
        for h in 0..heads_q {
            let hk = h / group;
            let qv = vector(&q[(i * heads_q + h) * d..][..d], rope, pos);
            let seen = if causal {
                (len + i + 1).saturating_sub(seq_q).min(len)
            } else {
                len
            };
            let start = window_left.map_or(0, |w| pos.saturating_sub(w)).min(seen);
            // ALiBi's position: the literal len - seq_q + i (negative when the cache holds
            // fewer keys than new tokens).
            let alibi_pos = len as f64 - seq_q as f64 + i as f64;
            let scores: Vec<f64> = (start..seen)
                .map(|j| {
                    let kv = vector(&k[(j * heads_kv + hk) * d..][..d], rope, j);
                    let mut s = qv.iter().zip(&kv).map(|(a, b)| a * b).sum::<f64>() * scale as f64;
                    if let Some(c) = x.softcap {
                        s = c as f64 * (s / c as f64).tanh();
                    }
                    if let Some(sl) = x.alibi_slopes {
                        s -= sl[h] as f64 * (alibi_pos - j as f64).abs();
                    }
                    s
                })
                .collect();
            let sink = x.sink_logits.map(|s| s[h] as f64);
            if sink == Some(f64::INFINITY) {
                // All weight on the sink, which has no value: O = 0.
                lse[h * seq_q + i] = f64::INFINITY;
                continue;
            }
            let mx = scores
                .iter()
                .copied()
                .fold(sink.unwrap_or(f64::NEG_INFINITY), f64::max);
            if mx == f64::NEG_INFINITY {
                continue;
            }
            let weights: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let total: f64 = weights.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - mx).exp());
            let out = &mut o[(i * heads_q + h) * d..][..d];
            for (j, w) in (start..).zip(&weights) {
                let vr = &v[(j * heads_kv + hk) * d..][..d];
                for (x, y) in out.iter_mut().zip(vr) {
                    *x += w * y.to_f32() as f64 / total;
                }
            }
            lse[h * seq_q + i] = mx + total.ln();
        }
    }
    (o, lse)
}

/// Copies sequence `b`'s keys (or values) out of a cache into logical order, contiguous
/// `[len, heads_kv, d]`, reading any layout the plain way (no shared code with the kernels'
/// map, so a wrong map cannot agree with itself).
///
/// ```
/// use attnkit::decode::{oracle, Decode, Layout};
/// let table = [1, 0];
/// let p = Decode::new(&[20], 1, 1, 1, 64, Layout::Paged { page_size: 16, num_pages: 2, block_table: Some(&table), pages_per_seq: 2 });
/// let cache: Vec<f32> = (0..32 * 64).map(|i| (i / 64) as f32).collect(); // row r holds r
/// let k = oracle::gather(&p, &p.k_strides, &cache, 0);
/// assert_eq!((k[0], k[16 * 64]), (16.0, 0.0)); // logical key 0 is page 1's row 0
/// ```
pub fn gather<T: Element>(
    p: &Decode<'_>,
    s: &crate::flash::Strides,
    cache: &[T],
    b: usize,
) -> Vec<T> {
    // Without host tables (device-only) the oracle has nothing to read: an empty sequence.
    let host = match &p.layout {
        Layout::Paged { block_table, .. } => block_table.is_some(),
        Layout::Rolling { ring_offsets, .. } => ring_offsets.is_some(),
        Layout::Contiguous { .. } => true,
    };
    let len = match p.cache_seqlens {
        SeqLens::Host(l) if host => l[b].max(0) as usize,
        _ => 0,
    };
    let (hk_n, d) = (p.heads_kv, p.head_dim);
    let mut out = Vec::with_capacity(len * hk_n * d);
    for j in 0..len {
        let (outer, row) = match &p.layout {
            Layout::Contiguous { .. } => (b, j),
            Layout::Paged {
                page_size,
                block_table,
                pages_per_seq,
                ..
            } => {
                let pages = &block_table.unwrap_or_default()[b * pages_per_seq..][..*pages_per_seq];
                (pages[j / page_size] as usize, j % page_size)
            }
            Layout::Rolling {
                n_sink,
                window,
                ring_offsets,
                ..
            } => {
                // Walk the ring from its oldest slot.
                let ring = (ring_offsets.unwrap_or_default()[b] as usize
                    + j.saturating_sub(*n_sink))
                    % window;
                (b, if j < *n_sink { j } else { n_sink + ring })
            }
        };
        for hk in 0..hk_n {
            let off = outer * s.batch + row * s.row + hk * s.head;
            out.extend_from_slice(&cache[off..off + d]);
        }
    }
    out
}

/// The whole reference for a problem: `o` contiguous `[batch, seq_q, heads_q, head_dim]`,
/// `lse` `[batch, heads_q, seq_q]`; `q` read through `p.q_strides`, the window and softcap
/// from `p` (no ALiBi, no sinks: see [`decode_with`]).
///
/// ```
/// use attnkit::decode::{oracle, Decode, Layout};
/// let p = Decode::new(&[3], 1, 2, 1, 64, Layout::Contiguous { capacity: 4 });
/// let q = vec![0.5f32; p.o_len()];
/// let kv = vec![0.25f32; 4 * 64];
/// let (o, lse) = oracle::decode(&p, &q, &kv, &kv);
/// assert!((o[0] - 0.25).abs() < 1e-12 && (lse[1] - (1.0 + 3f64.ln())).abs() < 1e-12);
/// ```
pub fn decode<T: Element>(
    p: &Decode<'_>,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
) -> (Vec<f64>, Vec<f64>) {
    decode_with(p, None, None, q, k_cache, v_cache)
}

/// [`decode`] with ALiBi slopes and sink logits (`[heads_q]` host slices, as
/// [`super::Tables`] takes them).
///
/// ```
/// use attnkit::decode::{oracle, Decode, Layout};
/// let p = Decode::new(&[3], 1, 1, 1, 64, Layout::Contiguous { capacity: 4 });
/// let q = vec![0.0f32; 64];
/// let kv = vec![0.25f32; 4 * 64];
/// let (_, lse) = oracle::decode_with(&p, None, Some(&[0.0]), &q, &kv, &kv);
/// assert!((lse[0] - 4f64.ln()).abs() < 1e-12); // three keys and the sink, all logit 0
/// ```
pub fn decode_with<T: Element>(
    p: &Decode<'_>,
    alibi_slopes: Option<&[f32]>,
    sink_logits: Option<&[f32]>,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
) -> (Vec<f64>, Vec<f64>) {
    let x = Logits {
        window_left: p.window_left,
        softcap: p.softcap,
        alibi_slopes,
        sink_logits,
    };
    let (sq, hq, d) = (p.seq_q, p.heads_q, p.head_dim);
    let rope = match &p.layout {
        Layout::Rolling { rope, .. } => Some(*rope),
        _ => None,
    };
    let mut o = Vec::with_capacity(p.o_len());
    let mut lse = Vec::with_capacity(p.lse_len());
    for b in 0..p.batch() {
        let s = &p.q_strides;
        let qb: Vec<T> = (0..sq * hq)
            .flat_map(|r| {
                let off = b * s.batch + (r / hq) * s.row + (r % hq) * s.head;
                q[off..off + d].to_vec()
            })
            .collect();
        let k = gather(p, &p.k_strides, k_cache, b);
        let v = gather(p, &p.v_strides, v_cache, b);
        let (ob, lb) = sequence_with(
            sq,
            hq,
            p.heads_kv,
            d,
            p.softmax_scale(),
            p.causal,
            rope,
            &x,
            &qb,
            &k,
            &v,
        );
        o.extend(ob);
        lse.extend(lb);
    }
    (o, lse)
}
