//! The naive reference: f64 throughout, the whole score row materialised, every mask rule
//! checked per key from its definition, the softmax taken the textbook way. Slow by design;
//! tests, benches and the tour compare the real implementations against it.

use super::{Attention, Relu2Norm, Score, Strides};
use crate::dtype::Element;

/// Host copies of the optional inputs ([`super::Extras`]): sink logits and ALiBi slopes
/// `[heads_q]`, and a block mask `(mask, block_q, block_k)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostExtras<'a> {
    /// Learned per-head sink logits.
    pub sink_logits: Option<&'a [f32]>,
    /// ALiBi slopes.
    pub alibi_slopes: Option<&'a [f32]>,
    /// `(mask, block_q, block_k)`, `mask` row-major with `ceil(seq_k / block_k)` columns.
    pub block_mask: Option<(&'a [u8], usize, usize)>,
}

/// One row's reference outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct RowRef {
    /// The output row.
    pub o: Vec<f64>,
    /// Log-sum-exp (natural log; `-inf` for a row that sees nothing; 0 for relu²).
    pub lse: f64,
    /// Entropy of the attention distribution (0 for relu² and for empty rows).
    pub entropy: f64,
}

/// One query row's reference output: `(o, lse)` for (batch `b`, head `h`, row `i`) of a
/// fixed-length problem, reading `q`, `k`, `v` through `attn`'s strides.
///
/// ```
/// use attnkit::flash::{Attention, oracle};
/// let a = Attention::new(1, 1, 2, 1, 1, 32).scale(0.0);
/// let q = vec![1.0f32; 32];
/// let kv: Vec<f32> = (0..64).map(|i| (i / 32) as f32).collect(); // key 0 = 0s, key 1 = 1s
/// let (o, lse) = oracle::attention_row(&a, &q, &kv, &kv, 0, 0, 0);
/// assert!((o[0] - 0.5).abs() < 1e-12 && (lse - 2f64.ln()).abs() < 1e-12);
/// ```
pub fn attention_row<T: Element>(
    attn: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    h: usize,
    i: usize,
) -> (Vec<f64>, f64) {
    let r = attention_row_with(attn, q, k, v, &HostExtras::default(), b, h, i);
    (r.o, r.lse)
}

/// [`attention_row`] with every option and extra: windows, sinks, block mask, entropy scale,
/// sink logits, soft-capping, ALiBi, relu² scores; also returns the row's entropy.
///
/// ```
/// use attnkit::flash::{Attention, oracle::{self, HostExtras}};
/// let a = Attention::new(1, 1, 4, 1, 1, 32).scale(0.0);
/// let x = vec![1.0f32; 4 * 32];
/// let sinks = [0.0f32];
/// let r = oracle::attention_row_with(&a, &x, &x, &x, &HostExtras { sink_logits: Some(&sinks), ..Default::default() }, 0, 0, 0);
/// assert!((r.lse - 5f64.ln()).abs() < 1e-12 && (r.o[0] - 0.8).abs() < 1e-12);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn attention_row_with<T: Element>(
    attn: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    extras: &HostExtras<'_>,
    b: usize,
    h: usize,
    i: usize,
) -> RowRef {
    let d = attn.head_dim;
    let o = &attn.opts;
    let hk = h / (attn.heads_q / attn.heads_kv);
    let at = |s: &Strides, x: &[T], row: usize, head: usize, c: usize| {
        x[b * s.batch + row * s.row + head * s.head + c * s.dim].to_f32() as f64
    };
    let (sq, sk) = (attn.seq_q as i64, attn.seq_k as i64);
    let c = i as i64 + sk - sq; // the diagonal key of row i
    let visible = |j: usize| {
        let j = j as i64;
        let causal_ok = !o.causal || j <= c;
        let right_ok = o.window_right.is_none_or(|r| j <= c + r as i64);
        let left_ok = o.window_left.is_none_or(|l| j >= c - l as i64) || j < o.sinks as i64;
        let block_ok = extras
            .block_mask
            .is_none_or(|(m, bq, bk)| m[(i / bq) * attn.seq_k.div_ceil(bk) + j as usize / bk] != 0);
        causal_ok && right_ok && left_ok && block_ok
    };
    let keys: Vec<usize> = (0..attn.seq_k).filter(|&j| visible(j)).collect();
    let n = keys.len();
    let mut scale = attn.softmax_scale() as f64;
    if o.entropy_scale {
        scale *= (n as f64).ln() / 512f64.ln();
    }
    let dot = |j: usize| {
        (0..d)
            .map(|cc| at(&attn.q_strides, q, i, h, cc) * at(&attn.k_strides, k, j, hk, cc))
            .sum::<f64>()
    };
    // Keys outer, channels inner: V is read row by row (a column walk of a long V missed the
    // cache on every element); each channel still sums its keys in order.
    let weighted = |w: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; d];
        for (&j, wj) in keys.iter().zip(w) {
            for (cc, acc) in out.iter_mut().enumerate() {
                *acc += wj * at(&attn.v_strides, v, j, hk, cc);
            }
        }
        out
    };
    if let Score::Relu2(norm) = o.score {
        let denom = match norm {
            Relu2Norm::SeqLen => attn.seq_k,
            Relu2Norm::Visible => n,
        } as f64;
        let w: Vec<f64> = keys
            .iter()
            .map(|&j| (scale * dot(j)).max(0.0).powi(2) / denom)
            .collect();
        return RowRef {
            o: if n == 0 { vec![0.0; d] } else { weighted(&w) },
            lse: 0.0,
            entropy: 0.0,
        };
    }
    // The logits from their definitions: cap * tanh(x / cap), then the ALiBi bias.
    let slope = extras.alibi_slopes.map_or(0.0, |a| a[h] as f64);
    let s: Vec<f64> = keys
        .iter()
        .map(|&j| {
            let x = scale * dot(j);
            let x = o.softcap.map_or(x, |cap| {
                let cap = cap as f64;
                cap * (x / cap).tanh()
            });
            x - slope * (c - j as i64).abs() as f64
        })
        .collect();
    let sink = extras.sink_logits.map(|l| l[h] as f64);
    if sink == Some(f64::INFINITY) {
        return RowRef {
            o: vec![0.0; d],
            lse: f64::INFINITY,
            entropy: 0.0,
        };
    }
    let mx = s
        .iter()
        .cloned()
        .chain(sink)
        .fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return RowRef {
            o: vec![0.0; d],
            lse: f64::NEG_INFINITY,
            entropy: 0.0,
        };
    }
    let l: f64 = s.iter().chain(sink.iter()).map(|x| (x - mx).exp()).sum();
    let lse = mx + l.ln();
    let p: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
    // H = -sum p log p over the keys and the sink, p = exp(s - lse).
    let mut entropy: f64 = s.iter().zip(&p).map(|(x, pj)| pj * (lse - x)).sum();
    if let Some(sk) = sink.filter(|x| x.is_finite()) {
        entropy += (sk - lse).exp() * (lse - sk);
    }
    RowRef {
        o: weighted(&p),
        lse,
        entropy,
    }
}

/// The whole reference: `o` contiguous `[batch, seq_q, heads_q, head_dim]`, `lse`
/// `[batch, heads_q, seq_q]`.
///
/// ```
/// use attnkit::flash::{Attention, oracle};
/// let a = Attention::new(1, 3, 3, 1, 1, 32).causal(true);
/// let x = vec![0.5f32; 3 * 32];
/// let (o, lse) = oracle::attention(&a, &x, &x, &x);
/// assert_eq!((o.len(), lse.len()), (3 * 32, 3));
/// assert!((lse[0] - 0.5 * 0.5 * 32.0 / 32f64.sqrt()).abs() < 1e-6); // row 0 sees one key (f32 scale)
/// ```
pub fn attention<T: Element>(attn: &Attention, q: &[T], k: &[T], v: &[T]) -> (Vec<f64>, Vec<f64>) {
    let d = attn.head_dim;
    let mut o = vec![0.0; attn.o_len()];
    let mut lse = vec![0.0; attn.lse_len()];
    for b in 0..attn.batch {
        for h in 0..attn.heads_q {
            for i in 0..attn.seq_q {
                let (row, l) = attention_row(attn, q, k, v, b, h, i);
                let off = ((b * attn.seq_q + i) * attn.heads_q + h) * d;
                o[off..off + d].copy_from_slice(&row);
                lse[(b * attn.heads_q + h) * attn.seq_q + i] = l;
            }
        }
    }
    (o, lse)
}
