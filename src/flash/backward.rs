//! The backward pass: dQ, dK, dV (and d sink_logits) of flash attention, for every option of
//! the forward, from the forward's output and LSE (FlashAttention-2's algorithm).

use super::checks::{check, check_extras, check_strides};
use super::{
    Attention, Extras, Problem, Strides, VarlenAttention, cpu_backward, fixed_problem, host_inputs,
    host_offsets, varlen_problem,
};
use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// The tensors a backward call reads and the gradients it writes.
///
/// `q`, `k`, `v`, `o` and `lse` are the forward's (its inputs, output and log-sum-exp, in the
/// problem's strides); `d_o` is the gradient of the loss with respect to `o`, in `o`'s
/// strides. `dq`, `dk`, `dv` are written in `q`'s, `k`'s and `v`'s strides, or in
/// `grad_strides` when given (`dk`, `dv` summed over the query heads that share a KV head);
/// every element of them is written, zero where a row or key saw nothing (gaps between rows
/// or heads are left alone). `d_sink_logits` (`[heads_q]`, with learned sink
/// logits) gets their gradient. `workspace` holds [`backward_workspace_len`] f32.
#[derive(Debug)]
pub struct BackwardIo<'a, T> {
    /// The forward's q.
    pub q: Buf<'a, T>,
    /// The forward's k.
    pub k: Buf<'a, T>,
    /// The forward's v.
    pub v: Buf<'a, T>,
    /// The forward's output.
    pub o: Buf<'a, T>,
    /// dL/do, in o's strides.
    pub d_o: Buf<'a, T>,
    /// The forward's LSE.
    pub lse: Buf<'a, f32>,
    /// dL/dq, written in q's strides (or `grad_strides.dq`).
    pub dq: BufMut<'a, T>,
    /// dL/dk, written in k's strides (or `grad_strides.dk`).
    pub dk: BufMut<'a, T>,
    /// dL/dv, written in v's strides (or `grad_strides.dv`).
    pub dv: BufMut<'a, T>,
    /// The gradients' own strides; `None`: the inputs'.
    pub grad_strides: Option<GradStrides>,
    /// dL/d sink_logits, `[heads_q]` (only with `Extras::sink_logits`).
    pub d_sink_logits: Option<BufMut<'a, f32>>,
    /// Scratch of [`backward_workspace_len`] f32.
    pub workspace: BufMut<'a, f32>,
}

/// Strides of the gradients when they differ from the inputs' (for instance contiguous
/// gradients of strided input views, or gradients with padded rows). The same rules as the
/// inputs' strides: `dim` = 1, no overlap within a gradient; dq, dk and dv are three distinct
/// buffers. On a GPU, f16/bf16 rows on 16 bytes.
///
/// ```
/// use attnkit::flash::{GradStrides, Strides};
/// // Contiguous [batch, 100, heads, 64] gradients, dq's rows padded to 8 x 64 + 8.
/// let dq = Strides { batch: 100 * 520, row: 520, head: 64, dim: 1 };
/// let kv = Strides::contiguous(100, 2, 64);
/// let g = GradStrides { dq, dk: kv, dv: kv };
/// assert_eq!(g.dk.row, 128);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradStrides {
    /// dq's strides.
    pub dq: Strides,
    /// dk's strides.
    pub dk: Strides,
    /// dv's strides.
    pub dv: Strides,
}

/// f32 elements of the workspace a backward of `attn` on `dev` needs: two per LSE entry
/// (each row's `D = rowsum(dO * O)` and its sink-logit term).
///
/// ```
/// use attnkit::flash::{self, Attention};
/// let a = Attention::new(2, 100, 100, 8, 2, 64);
/// assert_eq!(flash::backward_workspace_len(&attnkit::Device::cpu(), &a), 2 * a.lse_len());
/// ```
pub fn backward_workspace_len(_dev: &Device, attn: &Attention) -> usize {
    attn.lse_len().saturating_mul(2)
}

/// [`backward_workspace_len`] for a varlen problem.
///
/// ```
/// use attnkit::flash::{self, VarlenAttention};
/// let cu = [0, 3, 10];
/// let a = VarlenAttention::new(&cu, &cu, 4, 4, 64);
/// assert_eq!(flash::varlen_backward_workspace_len(&attnkit::Device::cpu(), &a), 2 * 4 * 10);
/// ```
pub fn varlen_backward_workspace_len(_dev: &Device, attn: &VarlenAttention<'_>) -> usize {
    attn.lse_len().saturating_mul(2)
}

/// The backward of [`forward_with`](super::forward_with): the gradients of a loss `L` with
/// respect to q, k, v (and the sink logits) given `dL/do`, for the same problem and the same
/// `extras` inputs (sink logits, ALiBi slopes, block mask; no entropy output). Every option
/// of the forward is differentiated: causal, windows, StreamingLLM sinks, block masks, the
/// entropy-invariant scale (a constant of the row), soft-capping, ALiBi, learned sink logits,
/// relu² scores, GQA/MQA. Rows that see no key contribute nothing.
///
/// Both backends compute it with FlashAttention-2's algorithm (`D = rowsum(dO * O)`, `P`
/// recomputed from the LSE tile by tile, `dS = P (dP - D)`), deterministically: no atomics,
/// the same bits on every run (and, on the CPU, every thread count). On a GPU, f16 and bf16
/// run on tensor cores (mma.sync, f32 accumulators, P and dS rounded to the dtype as
/// FlashAttention does): dK/dV per key tile and dQ per query tile, so every gradient element
/// has one writer (S and dP are computed in both, seven products where an atomic dQ needs
/// five). f16 relu² (whose weights can pass f16's range) and all of f32 run on CUDA cores in f32.
/// Gradients are written in the inputs' strides (dq in q's, dk in k's, dv in v's); on a GPU,
/// f16/bf16 follow the forward's 16-byte stride rule. No kernel has run on a real GPU yet
/// (only in the PTX emulator).
///
/// On a GPU with device-only varlen offsets, a stale table can make two sequences overlap
/// (each still in bounds): their rows then race, and those gradients are neither right nor
/// deterministic; rows of a sequence the kernels' re-check skips are zero.
///
/// Errors (before anything is written): the forward's checks for the problem, q, k, v, o and
/// lse; `d_o`, `dq`, `dk`, `dv` too short for their strides (or the gradients overlapping
/// themselves); `d_sink_logits` without sink logits or not `[heads_q]`; a short
/// `workspace`; `extras.entropy` given.
///
/// ```
/// use attnkit::{flash::{self, Attention, BackwardIo, Extras}, Device};
/// let a = Attention::new(1, 5, 7, 2, 1, 32).causal(true);
/// let dev = Device::cpu();
/// let q = vec![0.1f32; a.o_len()];
/// let kv = vec![0.2f32; 7 * 32];
/// let (mut o, mut lse) = (vec![0f32; a.o_len()], vec![0f32; a.lse_len()]);
/// flash::forward(&dev, &a, (&q).into(), (&kv).into(), (&kv).into(), (&mut o).into(), (&mut lse).into())?;
/// let d_o = vec![1.0f32; a.o_len()];
/// let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; kv.len()], vec![f32::NAN; kv.len()]);
/// let mut ws = vec![0f32; flash::backward_workspace_len(&dev, &a)];
/// flash::backward(&dev, &a, BackwardIo {
///     q: (&q).into(), k: (&kv).into(), v: (&kv).into(), o: (&o).into(), d_o: (&d_o).into(),
///     lse: (&lse).into(), dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dv).into(),
///     grad_strides: None, d_sink_logits: None, workspace: (&mut ws).into(),
/// }, Extras::default())?;
/// // Equal keys and values: the output is v whatever the weights, so dq is zero; dv sums dO.
/// assert!(dq.iter().all(|x| x.abs() < 1e-6));
/// assert!((dv.iter().sum::<f32>() - 10.0 * 32.0).abs() < 1e-3);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn backward<T: Element>(
    dev: &Device,
    attn: &Attention,
    io: BackwardIo<'_, T>,
    extras: Extras<'_>,
) -> Result<()> {
    let p = fixed_problem(attn)?;
    run_backward(dev, &p, None, io, extras)
}

/// [`backward`] of [`forward_varlen_with`](super::forward_varlen_with): packed tensors and
/// offsets as the forward takes them (empty sequences allowed).
///
/// ```
/// use attnkit::{flash::{self, VarlenAttention, BackwardIo, Extras}, Device};
/// let cu = [0, 2, 2, 5];
/// let a = VarlenAttention::new(&cu, &cu, 1, 1, 32).causal(true);
/// let dev = Device::cpu();
/// let x = vec![0.3f32; a.o_len()];
/// let (mut o, mut lse) = (vec![0f32; a.o_len()], vec![0f32; a.lse_len()]);
/// flash::forward_varlen(&dev, &a, (&x).into(), (&x).into(), (&x).into(), cu[..].into(),
///     cu[..].into(), (&mut o).into(), (&mut lse).into())?;
/// let (mut dq, mut dk, mut dv) = (vec![f32::NAN; x.len()], vec![f32::NAN; x.len()], vec![f32::NAN; x.len()]);
/// let mut ws = vec![0f32; flash::varlen_backward_workspace_len(&dev, &a)];
/// flash::backward_varlen(&dev, &a, cu[..].into(), cu[..].into(), BackwardIo {
///     q: (&x).into(), k: (&x).into(), v: (&x).into(), o: (&o).into(), d_o: (&x).into(),
///     lse: (&lse).into(), dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dv).into(),
///     grad_strides: None, d_sink_logits: None, workspace: (&mut ws).into(),
/// }, Extras::default())?;
/// assert!(dv.iter().all(|v| v.is_finite()));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn backward_varlen<T: Element>(
    dev: &Device,
    attn: &VarlenAttention<'_>,
    cu_seqlens_q: Buf<'_, i32>,
    cu_seqlens_k: Buf<'_, i32>,
    io: BackwardIo<'_, T>,
    extras: Extras<'_>,
) -> Result<()> {
    let p = varlen_problem(attn, cu_seqlens_q.len(), cu_seqlens_k.len())?;
    run_backward(dev, &p, Some((cu_seqlens_q, cu_seqlens_k)), io, extras)
}

fn run_backward<T: Element>(
    dev: &Device,
    p: &Problem<'_>,
    cu: Option<(Buf<'_, i32>, Buf<'_, i32>)>,
    io: BackwardIo<'_, T>,
    extras: Extras<'_>,
) -> Result<()> {
    check(
        p,
        io.q.len(),
        io.k.len(),
        io.v.len(),
        io.o.len(),
        io.lse.len(),
    )?;
    check_extras(p, &extras)?;
    if extras.entropy.is_some() {
        return Err(Error::Unsupported {
            arg: "entropy",
            detail: "the backward has no entropy output".into(),
        });
    }
    let fixed = !p.varlen;
    let (rows_q, rows_k) = if fixed {
        (p.seq_q, p.seq_k)
    } else {
        (p.total_q, p.total_k)
    };
    let batches = if fixed { p.batch } else { 1 };
    let g = io.grad_strides.unwrap_or(GradStrides {
        dq: p.q,
        dk: p.k,
        dv: p.v,
    });
    for (arg, s, rows, heads, len, out) in [
        ("d_o", &p.o, rows_q, p.heads_q, io.d_o.len(), false),
        ("dq", &g.dq, rows_q, p.heads_q, io.dq.len(), true),
        ("dk", &g.dk, rows_k, p.heads_kv, io.dk.len(), true),
        ("dv", &g.dv, rows_k, p.heads_kv, io.dv.len(), true),
    ] {
        check_strides(arg, s, [batches, rows, heads, p.d], len, out)?;
    }
    match (&io.d_sink_logits, &extras.sink_logits) {
        (Some(_), None) => {
            return Err(Error::Unsupported {
                arg: "d_sink_logits",
                detail: "given without sink_logits to differentiate".into(),
            });
        }
        (Some(g), Some(_)) if g.len() != p.heads_q => {
            return Err(Error::Shape {
                arg: "d_sink_logits",
                detail: format!("holds {}, heads_q is {}", g.len(), p.heads_q),
            });
        }
        _ => {}
    }
    let need = p.heads_q.saturating_mul(p.total_q).saturating_mul(2);
    if io.workspace.len() < need {
        return Err(Error::Shape {
            arg: "workspace",
            detail: format!(
                "holds {} f32, the backward needs {need}",
                io.workspace.len()
            ),
        });
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            let p = &host_offsets(p, cu.as_ref())?;
            let inputs = host_inputs(&extras)?;
            let mut io = io;
            let saved = cpu_backward::Saved {
                q: io.q.host("q")?,
                k: io.k.host("k")?,
                v: io.v.host("v")?,
                o: io.o.host("o")?,
                d_o: io.d_o.host("d_o")?,
                lse: io.lse.host("lse")?,
            };
            let out = cpu_backward::GradsOut {
                dq: io.dq.host_mut("dq")?,
                dk: io.dk.host_mut("dk")?,
                dv: io.dv.host_mut("dv")?,
                d_sink: io
                    .d_sink_logits
                    .as_mut()
                    .map(|b| b.host_mut("d_sink_logits"))
                    .transpose()?,
                ws: io.workspace.host_mut("workspace")?,
                strides: g,
            };
            cpu_backward::backward(*threads, p, inputs, saved, out);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => {
            let mut io = io;
            let bufs = super::cuda::BackwardBufs {
                q: &io.q,
                k: &io.k,
                v: &io.v,
                o: &io.o,
                d_o: &io.d_o,
                lse: &io.lse,
                dq: &mut io.dq,
                dk: &mut io.dk,
                dv: &mut io.dv,
                d_sink: io.d_sink_logits.as_mut(),
                ws: &mut io.workspace,
                strides: g,
            };
            super::cuda::backward(c, p, cu.as_ref(), bufs, &extras)
        }
    }
}
