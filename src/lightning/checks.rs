//! The argument checks of the Lightning family: config, sequences and buffer lengths, each a
//! typed error naming the argument, and none allocating before the sizes it depends on are
//! validated (see the limits in the module docs of [`super`]).

use super::{Config, MAX_HOST_HEADS, Seqs};
use crate::buffer::Buf;
use crate::error::{Error, Result};

/// The product of `xs`, or a Shape error naming `arg` when it overflows `usize` or `i64` (the
/// kernels' element offsets).
pub(super) fn mul(arg: &'static str, xs: &[usize]) -> Result<usize> {
    xs.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .filter(|&n| i64::try_from(n).is_ok())
        .ok_or_else(|| Error::Shape {
            arg,
            detail: format!("size {xs:?} overflows"),
        })
}

/// Checks the config; returns the per-head `log2(lambda_h) = -s_h * log2(e)` (host-computed,
/// so kernels take `lambda^n = exp2(n * log2_decay)` with `n >= 0`). `heads` is bounded by
/// [`MAX_HOST_HEADS`] before the table is allocated.
pub(super) fn check_config(cfg: &Config<'_>) -> Result<Vec<f32>> {
    check_heads(cfg.heads)?;
    for (arg, dim) in [("d", cfg.d), ("e", cfg.e)] {
        if dim != 64 && dim != 128 {
            return Err(Error::Unsupported {
                arg,
                detail: format!("head dim {dim}; supported: 64, 128"),
            });
        }
    }
    if !cfg.scale.is_finite() {
        return Err(Error::Value {
            arg: "scale",
            detail: format!("{} is not finite", cfg.scale),
        });
    }
    let Some(decay) = cfg.decay else {
        return Ok(vec![0.0; cfg.heads]);
    };
    if !cfg.causal {
        return Err(Error::Unsupported {
            arg: "decay",
            detail: "the non-causal form takes no decay".into(),
        });
    }
    // Exact, unlike buffers: the decay is a per-head parameter table, and a different count
    // means `heads` and the table describe different models.
    if decay.len() != cfg.heads {
        return Err(Error::Shape {
            arg: "decay",
            detail: format!("{} values for {} heads", decay.len(), cfg.heads),
        });
    }
    if let Some((h, s)) = decay
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s >= 0.0))
    {
        return Err(Error::Value {
            arg: "decay",
            detail: format!("head {h}: s = {s}; must be finite and >= 0 (lambda = exp(-s) <= 1)"),
        });
    }
    // Bounded below so that `0 * log2_decay` stays 0: any s above ~104 already gives
    // lambda = 0 in f32, so the bound changes no result.
    Ok(decay
        .iter()
        .map(|&s| (-(s as f64) * std::f64::consts::LOG2_E).max(-1e30) as f32)
        .collect())
}

/// `heads` in `1..=MAX_HOST_HEADS`: the host builds per-head tables before any buffer can
/// bound the count.
pub(super) fn check_heads(heads: usize) -> Result<()> {
    if heads == 0 || heads > MAX_HOST_HEADS {
        return Err(Error::Shape {
            arg: "heads",
            detail: format!("{heads} heads; must be in 1..={MAX_HOST_HEADS}"),
        });
    }
    Ok(())
}

/// Where the `(start, len)` of each sequence comes from.
enum Spans {
    /// `n_seqs` sequences of `max_len` tokens: built on demand (after every check).
    Dense,
    /// Read from host offsets and checked.
    Host(Vec<(usize, usize)>),
    /// Device offsets, which the host never reads.
    #[cfg(feature = "cuda")]
    Device,
}

/// The sequences of a call, resolved.
pub(super) struct Resolved {
    pub(super) n_seqs: usize,
    /// Token rows the call reads and writes: `batch * seq`, the last host offset, or (device
    /// offsets) the whole rows `q` holds, up to `i32::MAX`.
    pub(super) tokens: usize,
    pub(super) max_len: usize,
    spans: Spans,
}

impl Resolved {
    /// `(start, len)` per sequence, for the CPU path. Call it only after every buffer check:
    /// the dense count is then bounded by the workspace the caller allocated.
    pub(super) fn spans(self) -> Result<Vec<(usize, usize)>> {
        match self.spans {
            Spans::Host(s) => Ok(s),
            Spans::Dense => {
                let seq = self.max_len;
                let mut out = Vec::new();
                out.try_reserve_exact(self.n_seqs)
                    .map_err(|_| Error::Shape {
                        arg: "batch",
                        detail: format!("{} sequences: no memory for their table", self.n_seqs),
                    })?;
                // b * seq <= tokens, which `resolve` checked.
                out.extend((0..self.n_seqs).map(|b| (b * seq, seq)));
                Ok(out)
            }
            #[cfg(feature = "cuda")]
            Spans::Device => Err(Error::Placement {
                arg: "cu_seqlens",
                expected: "host memory",
                found: "a CUDA device",
            }),
        }
    }
}

/// `(n_seqs, max_len)` of `seqs`, checked without reading device offsets and without
/// allocating: what [`super::workspace_len`] needs.
pub(super) fn count(seqs: &Seqs<'_>, heads: usize, dim: usize) -> Result<(usize, usize)> {
    match seqs {
        Seqs::Dense { batch, seq } => {
            if *batch == 0 {
                return Err(Error::Shape {
                    arg: "batch",
                    detail: "must be at least 1".into(),
                });
            }
            mul("batch", &[*batch, *seq, heads, dim])?;
            Ok((*batch, *seq))
        }
        Seqs::Varlen {
            cu_seqlens,
            max_seqlen,
        } => {
            check_max_seqlen(*max_seqlen)?;
            if cu_seqlens.len() < 2 {
                return Err(Error::Shape {
                    arg: "cu_seqlens",
                    detail: format!("{} offsets; needs n_seqs + 1 >= 2", cu_seqlens.len()),
                });
            }
            Ok((cu_seqlens.len() - 1, *max_seqlen))
        }
    }
}

/// Resolves `seqs`; `dim` is `max(d, e)` (every token buffer's row fits `heads * dim`) and
/// `q_len` the elements of `q`, which give the token count for device offsets.
pub(super) fn resolve(
    seqs: &Seqs<'_>,
    heads: usize,
    d: usize,
    dim: usize,
    q_len: usize,
) -> Result<Resolved> {
    let (n_seqs, max_len) = count(seqs, heads, dim)?;
    let (tokens, spans) = match seqs {
        // `count` checked batch * seq * heads * dim.
        Seqs::Dense { batch, seq } => (batch * seq, Spans::Dense),
        Seqs::Varlen { cu_seqlens, .. } => match cu_seqlens {
            Buf::Host(cu) => {
                let (spans, last) = check_cu_seqlens(cu, max_len)?;
                (last, Spans::Host(spans))
            }
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => {
                // The host cannot read the offsets: the kernels take the rows q holds as the
                // bound (offsets past it make empty sequences), and the other buffers must
                // hold as many.
                let row = mul("q", &[heads, d])?;
                ((q_len / row).min(i32::MAX as usize), Spans::Device)
            }
        },
    };
    #[cfg(not(feature = "cuda"))]
    let _ = (d, q_len);
    mul("cu_seqlens", &[tokens, heads, dim])?;
    Ok(Resolved {
        n_seqs,
        tokens,
        max_len,
        spans,
    })
}

/// `max_seqlen` sizes the split plan; past i32 (the offsets' type) it cannot be a real length,
/// and the plan's arithmetic would overflow.
pub(super) fn check_max_seqlen(max_seqlen: usize) -> Result<usize> {
    if max_seqlen > i32::MAX as usize {
        return Err(Error::Value {
            arg: "max_seqlen",
            detail: format!("{max_seqlen} exceeds i32 offsets"),
        });
    }
    Ok(max_seqlen)
}

/// Host offsets: start at 0, non-decreasing, no sequence past `max_seqlen`. Returns the
/// spans (one per offset pair: bounded by the caller's buffer) and the last offset.
fn check_cu_seqlens(cu: &[i32], max_seqlen: usize) -> Result<(Vec<(usize, usize)>, usize)> {
    let bad = |detail: String| Error::Value {
        arg: "cu_seqlens",
        detail,
    };
    match cu.first() {
        Some(0) => {}
        first => return Err(bad(format!("starts at {first:?}, not 0"))),
    }
    let mut out = Vec::with_capacity(cu.len().saturating_sub(1));
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(bad(format!("decreases at {i}: {} then {}", w[0], w[1])));
        }
        // Non-negative: starts at 0 and never decreases.
        let len = (w[1] - w[0]) as usize;
        if len > max_seqlen {
            return Err(bad(format!(
                "sequence {i} has {len} tokens > max_seqlen {max_seqlen}"
            )));
        }
        out.push((w[0] as usize, len));
    }
    let last = cu.last().map_or(0, |&x| x as usize);
    Ok((out, last))
}

/// The buffer-length rule of the crate: a buffer holds at least what the call reads or
/// writes; a longer one is accepted and its tail neither read nor written.
pub(super) fn check_len(arg: &'static str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Shape {
            arg,
            detail: format!("holds {len} elements, needs at least {want}"),
        });
    }
    Ok(())
}

/// The first `n` elements (the part a call touches), after [`check_len`].
pub(super) fn prefix<'a, T>(arg: &'static str, buf: &'a [T], n: usize) -> Result<&'a [T]> {
    let len = buf.len();
    buf.get(..n).ok_or_else(|| short(arg, len, n))
}

/// The first `n` elements, mutable.
pub(super) fn prefix_mut<'a, T>(
    arg: &'static str,
    buf: &'a mut [T],
    n: usize,
) -> Result<&'a mut [T]> {
    let len = buf.len();
    buf.get_mut(..n).ok_or_else(|| short(arg, len, n))
}

fn short(arg: &'static str, len: usize, want: usize) -> Error {
    Error::Shape {
        arg,
        detail: format!("holds {len} elements, needs at least {want}"),
    }
}

pub(super) fn check_workspace(len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(Error::Shape {
            arg: "workspace",
            detail: format!("holds {len} f32, workspace_len says {need}"),
        });
    }
    Ok(())
}
