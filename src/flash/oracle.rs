//! The naive reference: f64 throughout, the whole score row materialised, the softmax taken
//! the textbook way. Slow by design (O(seq_q * seq_k) memory per row is fine, nothing is
//! tiled); tests, benches and the tour compare the real implementations against it.

use super::{Attention, Strides};
use crate::dtype::Element;

/// One query row's reference output: `(o, lse)` for (batch `b`, head `h`, row `i`) of a
/// fixed-length problem, reading `q`, `k`, `v` through `attn`'s strides. A row that sees no
/// key gives zeros and `-inf`.
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
    let d = attn.head_dim;
    let hk = h / (attn.heads_q / attn.heads_kv);
    let at = |s: &Strides, x: &[T], row: usize, head: usize, j: usize| {
        x[b * s.batch + row * s.row + head * s.head + j * s.dim].to_f32() as f64
    };
    let scale = attn.softmax_scale() as f64;
    let diag = attn.seq_k as i64 - attn.seq_q as i64;
    let scores: Vec<f64> = (0..attn.seq_k)
        .map(|j| {
            if attn.causal && j as i64 > i as i64 + diag {
                return f64::NEG_INFINITY;
            }
            (0..d)
                .map(|c| at(&attn.q_strides, q, i, h, c) * at(&attn.k_strides, k, j, hk, c))
                .sum::<f64>()
                * scale
        })
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let l: f64 = p.iter().sum();
    let o = (0..d)
        .map(|c| {
            p.iter()
                .enumerate()
                .map(|(j, pj)| pj * at(&attn.v_strides, v, j, hk, c))
                .sum::<f64>()
                / l
        })
        .collect();
    (o, mx + l.ln())
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
/// assert!((lse[0] - 0.5 * 0.5 * 32.0 / 32f64.sqrt()).abs() < 1e-9); // row 0 sees one key
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
