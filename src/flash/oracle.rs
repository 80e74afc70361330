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
    let t = row_terms(attn, q, k, extras, b, h, i);
    let (d, hk) = (attn.head_dim, t.hk);
    // Keys outer, channels inner: V is read row by row (a column walk of a long V missed the
    // cache on every element); each channel still sums its keys in order.
    let weighted = |w: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; d];
        for (&j, wj) in t.keys.iter().zip(w) {
            for (cc, acc) in out.iter_mut().enumerate() {
                *acc += wj * at(&attn.v_strides, v, b, j, hk, cc);
            }
        }
        out
    };
    match t.weights() {
        Weights::Relu2(w) => RowRef {
            o: if t.keys.is_empty() {
                vec![0.0; d]
            } else {
                weighted(&w)
            },
            lse: 0.0,
            entropy: 0.0,
        },
        Weights::Softmax { p, lse, sink } => {
            if !lse.is_finite() {
                return RowRef {
                    o: vec![0.0; d],
                    lse,
                    entropy: 0.0,
                };
            }
            // H = -sum p log p over the keys and the sink, p = exp(s - lse).
            let mut entropy: f64 = t.s.iter().zip(&p).map(|(x, pj)| pj * (lse - x)).sum();
            if let Some(sk) = sink.filter(|x| x.is_finite()) {
                entropy += (sk - lse).exp() * (lse - sk);
            }
            RowRef {
                o: weighted(&p),
                lse,
                entropy,
            }
        }
    }
}

/// Element `(b, row, head, c)` of `x` through strides `s`, widened to f64.
fn at<T: Element>(s: &Strides, x: &[T], b: usize, row: usize, head: usize, c: usize) -> f64 {
    x[b * s.batch + row * s.row + head * s.head + c * s.dim].to_f32() as f64
}

/// One query row's terms from their definitions: the keys it sees, its scale, the scaled dot
/// products `x_j = scale q . k_j` and the logits `s_j` (soft-capped, ALiBi-biased).
struct RowTerms {
    keys: Vec<usize>,
    hk: usize,
    scale: f64,
    x: Vec<f64>,
    s: Vec<f64>,
    cap: Option<f64>,
    relu2_denom: Option<f64>,
    sink: Option<f64>,
}

/// A row's weights: relu²'s `relu(x)^2 / n`, or softmax's probabilities, LSE and sink logit.
enum Weights {
    Relu2(Vec<f64>),
    Softmax {
        p: Vec<f64>,
        lse: f64,
        sink: Option<f64>,
    },
}

impl RowTerms {
    fn weights(&self) -> Weights {
        if let Some(denom) = self.relu2_denom {
            return Weights::Relu2(self.x.iter().map(|x| x.max(0.0).powi(2) / denom).collect());
        }
        let sink = self.sink;
        let empty = |lse: f64| Weights::Softmax {
            p: vec![0.0; self.s.len()],
            lse,
            sink,
        };
        if sink == Some(f64::INFINITY) {
            return empty(f64::INFINITY);
        }
        let mx = self
            .s
            .iter()
            .cloned()
            .chain(sink)
            .fold(f64::NEG_INFINITY, f64::max);
        if mx == f64::NEG_INFINITY {
            return empty(f64::NEG_INFINITY);
        }
        let l: f64 = self
            .s
            .iter()
            .chain(sink.iter())
            .map(|x| (x - mx).exp())
            .sum();
        let lse = mx + l.ln();
        Weights::Softmax {
            p: self.s.iter().map(|x| (x - lse).exp()).collect(),
            lse,
            sink,
        }
    }
}

fn row_terms<T: Element>(
    attn: &Attention,
    q: &[T],
    k: &[T],
    extras: &HostExtras<'_>,
    b: usize,
    h: usize,
    i: usize,
) -> RowTerms {
    let d = attn.head_dim;
    let o = &attn.opts;
    let hk = h / (attn.heads_q / attn.heads_kv);
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
    let x: Vec<f64> = keys
        .iter()
        .map(|&j| {
            scale
                * (0..d)
                    .map(|cc| {
                        at(&attn.q_strides, q, b, i, h, cc) * at(&attn.k_strides, k, b, j, hk, cc)
                    })
                    .sum::<f64>()
        })
        .collect();
    let relu2_denom = match o.score {
        Score::Relu2(Relu2Norm::SeqLen) => Some(attn.seq_k as f64),
        Score::Relu2(Relu2Norm::Visible) => Some(n as f64),
        Score::Softmax => None,
    };
    // The logits from their definitions: cap * tanh(x / cap), then the ALiBi bias.
    let cap = o.softcap.map(f64::from);
    let slope = extras.alibi_slopes.map_or(0.0, |a| a[h] as f64);
    let s = keys
        .iter()
        .zip(&x)
        .map(|(&j, &x)| {
            let x = cap.map_or(x, |cap| cap * (x / cap).tanh());
            x - slope * (c - j as i64).abs() as f64
        })
        .collect();
    RowTerms {
        keys,
        hk,
        scale,
        x,
        s,
        cap,
        relu2_denom,
        sink: extras.sink_logits.map(|l| l[h] as f64),
    }
}

/// The reference gradients of `L = sum(o * d_o)` (all contiguous `[batch, seq, heads,
/// head_dim]` but `d_sink_logits`, `[heads_q]`), from the analytic derivative of the forward
/// above, every term in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct GradsRef {
    /// dL/dq.
    pub dq: Vec<f64>,
    /// dL/dk (summed over the query heads of each KV head).
    pub dk: Vec<f64>,
    /// dL/dv (as dk).
    pub dv: Vec<f64>,
    /// dL/d sink_logits (zeros without sink logits).
    pub d_sink_logits: Vec<f64>,
}

/// The reference backward: gradients of `sum(o * d_o)` with respect to q, k, v and the sink
/// logits, `d_o` contiguous `[batch, seq_q, heads_q, head_dim]`. Softmax rows:
/// `dv_j += p_j do`, `dp_j = do . v_j`, `D = sum_j p_j dp_j`, `ds_j = p_j (dp_j - D)`, times
/// `1 - tanh^2(x_j / cap)` under a softcap, times the row's scale into `dq` and `dk`; a sink
/// logit gets `-p_sink D`. relu² rows: `dv_j += w_j do`, `dx_j = 2 relu(x_j) / n (do . v_j)`.
///
/// ```
/// use attnkit::flash::{Attention, oracle::{self, HostExtras}};
/// // One key: o = v whatever q and k are, so only dv is nonzero (= d_o).
/// let a = Attention::new(1, 1, 1, 1, 1, 32);
/// let x = vec![0.25f32; 32];
/// let d_o = vec![1.0f32; 32];
/// let g = oracle::backward(&a, &x, &x, &x, &d_o, &HostExtras::default());
/// assert!(g.dq.iter().all(|v| v.abs() < 1e-12) && g.dv.iter().all(|v| (v - 1.0).abs() < 1e-12));
/// ```
pub fn backward<T: Element>(
    attn: &Attention,
    q: &[T],
    k: &[T],
    v: &[T],
    d_o: &[T],
    extras: &HostExtras<'_>,
) -> GradsRef {
    let d = attn.head_dim;
    let idx =
        |b: usize, s: usize, row: usize, h: usize, heads: usize| ((b * s + row) * heads + h) * d;
    let mut g = GradsRef {
        dq: vec![0.0; attn.o_len()],
        dk: vec![0.0; attn.batch * attn.seq_k * attn.heads_kv * d],
        dv: vec![0.0; attn.batch * attn.seq_k * attn.heads_kv * d],
        d_sink_logits: vec![0.0; attn.heads_q],
    };
    for b in 0..attn.batch {
        for h in 0..attn.heads_q {
            for i in 0..attn.seq_q {
                let t = row_terms(attn, q, k, extras, b, h, i);
                let hk = t.hk;
                let go = idx(b, attn.seq_q, i, h, attn.heads_q);
                let dov: Vec<f64> = d_o[go..go + d].iter().map(|x| x.to_f32() as f64).collect();
                let vk = |j: usize, cc: usize| at(&attn.v_strides, v, b, j, hk, cc);
                let dp: Vec<f64> = t
                    .keys
                    .iter()
                    .map(|&j| (0..d).map(|cc| dov[cc] * vk(j, cc)).sum())
                    .collect();
                // w: the weights of v; dx: dL/dx_j.
                let (w, dx): (Vec<f64>, Vec<f64>) = match t.weights() {
                    Weights::Relu2(w) => {
                        let n = t.relu2_denom.unwrap_or(1.0);
                        let dx =
                            t.x.iter()
                                .zip(&dp)
                                .map(|(x, dp)| 2.0 * x.max(0.0) / n * dp)
                                .collect();
                        (w, dx)
                    }
                    Weights::Softmax { p, lse, sink } => {
                        if !lse.is_finite() {
                            continue;
                        }
                        let big_d: f64 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                        if let Some(sk) = sink {
                            g.d_sink_logits[h] -= (sk - lse).exp() * big_d;
                        }
                        let dx = p
                            .iter()
                            .zip(&dp)
                            .zip(&t.x)
                            .map(|((p, dp), x)| {
                                let ds = p * (dp - big_d);
                                ds * t.cap.map_or(1.0, |cap| 1.0 - (x / cap).tanh().powi(2))
                            })
                            .collect();
                        (p, dx)
                    }
                };
                for ((&j, wj), dxj) in t.keys.iter().zip(&w).zip(&dx) {
                    let gk = idx(b, attn.seq_k, j, hk, attn.heads_kv);
                    for (cc, &doc) in dov.iter().enumerate() {
                        g.dv[gk + cc] += wj * doc;
                        g.dq[go + cc] += dxj * t.scale * at(&attn.k_strides, k, b, j, hk, cc);
                        g.dk[gk + cc] += dxj * t.scale * at(&attn.q_strides, q, b, i, h, cc);
                    }
                }
            }
        }
    }
    g
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
