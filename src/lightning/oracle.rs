//! The f64 oracle of Lightning Attention: the token-by-token recurrence
//! `S_t = lambda S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`, in f64, for every sequence and
//! head. It is slow by design (one rank-1 update per token, no blocking, no parallelism): it
//! shares no code with the block split it checks, so the tests, benches and the tour compare
//! the real algorithm against the definition itself.
//!
//! Layouts are the crate's contiguous ones: tokens `[total_tokens, heads, dim]` (sequences
//! one after another, `lens` long), states `[n_seqs, heads, d, e]`.
//!
//! ```
//! use attnkit::lightning::oracle;
//! // One token, one head, d = e = 1: o = scale * q * (lambda * s0 + k * v).
//! let out = oracle::forward(&[1], 1, 1, 1, &[2.0], &[3.0], &[4.0], Some(&[0.0]), 0.5, true,
//!                           Some(&[1.0]));
//! assert_eq!(out.o, [13.0]);
//! assert_eq!(out.final_state, [13.0]);
//! ```

/// What [`forward`] computes: the outputs and the state after each sequence's last token.
#[derive(Clone, Debug)]
pub struct Out {
    /// `[total_tokens, heads, e]`.
    pub o: Vec<f64>,
    /// `[n_seqs, heads, d, e]` (all zero for the non-causal form, which keeps no state).
    pub final_state: Vec<f64>,
}

/// Linear attention on f64 inputs, one token at a time.
///
/// `lens`: the sequence lengths, laid out one after another in the token arrays. `decay`: per
/// head `s_h >= 0`, `lambda_h = exp(-s_h)` (None: no decay). `causal = false` is the
/// non-causal form `o_t = scale * q_t (K^T V)` over the whole sequence (decay and initial
/// state ignored). `initial`: `[n_seqs, heads, d, e]`, zero when None.
///
/// ```
/// use attnkit::lightning::oracle;
/// let out = oracle::forward(&[2], 1, 1, 1, &[1.0, 1.0], &[1.0, 1.0], &[1.0, 2.0], None, 1.0,
///                           false, None);
/// assert_eq!(out.o, [3.0, 3.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward(
    lens: &[usize],
    heads: usize,
    d: usize,
    e: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    decay: Option<&[f64]>,
    scale: f64,
    causal: bool,
    initial: Option<&[f64]>,
) -> Out {
    let total: usize = lens.iter().sum();
    let mut o = vec![0.0; total * heads * e];
    let mut final_state = vec![0.0; lens.len() * heads * d * e];
    let mut start = 0;
    for (n, &len) in lens.iter().enumerate() {
        for h in 0..heads {
            let lambda = decay.map_or(1.0, |s| (-s[h]).exp());
            let st = &mut final_state[(n * heads + h) * d * e..][..d * e];
            if causal {
                if let Some(init) = initial {
                    st.copy_from_slice(&init[(n * heads + h) * d * e..][..d * e]);
                }
            }
            if !causal {
                // K^T V over the whole sequence first; every token reads the same state.
                for t in start..start + len {
                    let (kt, vt) = (
                        &k[(t * heads + h) * d..][..d],
                        &v[(t * heads + h) * e..][..e],
                    );
                    for i in 0..d {
                        for j in 0..e {
                            st[i * e + j] += kt[i] * vt[j];
                        }
                    }
                }
            }
            for t in start..start + len {
                let (kt, vt) = (
                    &k[(t * heads + h) * d..][..d],
                    &v[(t * heads + h) * e..][..e],
                );
                if causal {
                    for i in 0..d {
                        for j in 0..e {
                            st[i * e + j] = lambda * st[i * e + j] + kt[i] * vt[j];
                        }
                    }
                }
                let qt = &q[(t * heads + h) * d..][..d];
                let ot = &mut o[(t * heads + h) * e..][..e];
                for (j, oj) in ot.iter_mut().enumerate() {
                    *oj = scale * (0..d).map(|i| qt[i] * st[i * e + j]).sum::<f64>();
                }
            }
            if !causal {
                st.fill(0.0);
            }
        }
        start += len;
    }
    Out { o, final_state }
}

/// The decode step on f64: `S <- lambda S + k^T v`, `o = scale * q S`, for `[batch, heads]`
/// tokens (`q`, `k`: `[batch, heads, d]`, `v`: `[batch, heads, e]`, `state`:
/// `[batch, heads, d, e]`, updated in place). Returns `o`, `[batch, heads, e]`.
///
/// ```
/// use attnkit::lightning::oracle;
/// let mut s = vec![1.0];
/// let o = oracle::decode(1, 1, 1, 1, &[2.0], &[3.0], &[4.0], None, 1.0, &mut s);
/// assert_eq!((o[0], s[0]), (26.0, 13.0));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn decode(
    batch: usize,
    heads: usize,
    d: usize,
    e: usize,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    decay: Option<&[f64]>,
    scale: f64,
    state: &mut [f64],
) -> Vec<f64> {
    let out = forward(
        &vec![1; batch],
        heads,
        d,
        e,
        q,
        k,
        v,
        decay,
        scale,
        true,
        Some(state),
    );
    state.copy_from_slice(&out.final_state);
    out.o
}
