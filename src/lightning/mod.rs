//! Lightning Attention-2: causal linear attention with per-head decay, by the block split.
//!
//! `o_t = scale * q_t * sum_{j<=t} lambda_h^(t-j) k_j^T v_j` with `lambda_h = exp(-s_h)`,
//! `s_h >= 0` (no softmax, no denominator). Layouts (contiguous, elements):
//! `q`, `k`: `[tokens, heads, d]`; `v`, `o`: `[tokens, heads, e]`, where `tokens` is
//! `batch * seq` ([`Seqs::Dense`]) or the packed sequences of a variable-length batch
//! ([`Seqs::Varlen`], `cu_seqlens` as in FlashAttention); states `[n_seqs, heads, d, e]`, f32.
//!
//! How it is computed (both backends, the paper's block split in the chunked form):
//! sequences are cut into blocks of `B = 64` tokens and the blocks into *splits*; the state
//! each split starts from is found by (1) every split's own state in parallel, (2) a scan over
//! the splits, then (3) every split runs the paper's loop over its blocks in parallel:
//! intra-block `[(Q_i K_i^T) (.) M] V_i`, inter-block `Lambda Q_i KV`, and
//! `KV <- lambda^B KV + (lambda^(B-1-j) k_j)^T V_i`, every decay exponent >= 0 and the state
//! in f32. The split length comes from [`workspace_len`]'s plan so that a long sequence with
//! few heads still fills the machine; the callers bring the workspace holding the split states.
//!
//! Limits and lengths (checked before anything that depends on them is computed or
//! allocated, each a typed error naming the argument): `heads` in `1..=`[`MAX_HOST_HEADS`]
//! (at most [`MAX_HEADS`] on a GPU); `d`, `e` in {64, 128}; every buffer's element count
//! (`tokens * heads * dim`, `n_seqs * heads * d * e`, the workspace) within `i64`; varlen
//! offsets and `max_seqlen` within `i32`. A buffer holds *at least* what the call reads or
//! writes (the crate's one length rule): a longer one is accepted and its tail is neither read
//! nor written. `scale` is finite; a decay `s_h` is finite and `>= 0`, `s_h = 0` meaning no
//! decay (`lambda = 1`, the same as `decay: None`); NaN or infinite values are
//! [`Error::Value`]s naming `scale` or `decay`. The inputs `q`, `k`, `v` must be finite (they
//! are not scanned): both backends compute each block's intra product as whole tiles, so an inf
//! or NaN in a token's `v` also reaches earlier tokens of its block, which give it weight 0
//! (`0 * inf` is NaN), as in [`flash`](crate::flash).
//!
//! Entry points: [`forward`] (causal with decay and initial/final state, or the non-causal
//! `Q (K^T V)`), [`decode`] (one token per sequence against a state), [`backward`]
//! (`dQ`, `dK`, `dV`, `d initial state`), [`decay_slopes`] (TransNormerLLM / MiniMax slopes).
//!
//! ```
//! use attnkit::{Device, lightning::{self, Config, Forward, Seqs}};
//! let dev = Device::cpu();
//! let (batch, seq, heads, d, e) = (1, 100, 2, 64, 64);
//! let slopes = lightning::decay_slopes(heads, 1.0)?;
//! let cfg = Config { heads, d, e, decay: Some(&slopes), scale: 1.0 / 8.0, causal: true };
//! let seqs = Seqs::Dense { batch, seq };
//! let q = vec![0.01f32; batch * seq * heads * d];
//! let (k, v) = (q.clone(), vec![0.5f32; batch * seq * heads * e]);
//! let mut o = vec![0.0f32; batch * seq * heads * e];
//! let mut state = vec![0.0f32; batch * heads * d * e];
//! let mut ws = vec![0.0f32; lightning::workspace_len(&dev, &cfg, &seqs)?];
//! lightning::forward(&dev, &cfg, &seqs, Forward {
//!     q: (&q).into(), k: (&k).into(), v: (&v).into(), o: (&mut o).into(),
//!     initial_state: None, final_state: Some((&mut state).into()),
//!     workspace: (&mut ws).into(),
//! })?;
//! assert!(o.iter().all(|x| x.is_finite()));
//! # Ok::<(), attnkit::Error>(())
//! ```

mod checks;
mod cpu;
#[cfg(attnkit_cuda)]
mod cuda;
pub mod oracle;

use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};
#[cfg(attnkit_cuda)]
use checks::Resolved;
use checks::{
    check_config, check_heads, check_len, check_workspace, count, mul, prefix, prefix_mut, resolve,
};

/// What every call of the family shares: heads, head dims, decay, scale, causality.
#[derive(Clone, Copy, Debug)]
pub struct Config<'a> {
    /// Number of heads (q, k, v and o have the same).
    pub heads: usize,
    /// Head dim of `q` and `k`: 64 or 128.
    pub d: usize,
    /// Head dim of `v` and `o`: 64 or 128 (may differ from `d`).
    pub e: usize,
    /// Per head `s_h >= 0`, `lambda_h = exp(-s_h)` (see [`decay_slopes`]); None: no decay.
    pub decay: Option<&'a [f32]>,
    /// Multiplies every output (e.g. `1/sqrt(d)`; 1.0 for TransNormerLLM). Finite.
    pub scale: f32,
    /// True: causal with decay. False: the non-causal `o = scale * Q (K^T V)`, which takes
    /// no decay and no states.
    pub causal: bool,
}

/// How the tokens form sequences.
#[derive(Debug)]
pub enum Seqs<'a> {
    /// `batch` sequences of `seq` tokens each.
    Dense {
        /// Number of sequences (at least 1).
        batch: usize,
        /// Tokens per sequence (0 is allowed: the final state is the initial one).
        seq: usize,
    },
    /// Packed sequences: sequence `i` is tokens `cu_seqlens[i]..cu_seqlens[i + 1]`.
    ///
    /// `cu_seqlens` lives where the call runs, and is the one source of the sequences (no
    /// host copy to disagree with). On the CPU its contents are checked (starts at 0,
    /// non-decreasing, no sequence longer than `max_seqlen`) and the last offset is the token
    /// count: every token buffer holds at least that many rows, and rows past it are neither
    /// read nor written. On a GPU the host does not read them: the token count is the whole
    /// rows `q` holds (the other buffers must hold as many), the kernels stay within the
    /// buffers whatever the offsets hold, and lengths over `max_seqlen` leave outputs
    /// unwritten.
    Varlen {
        /// `n_seqs + 1` offsets, i32.
        cu_seqlens: Buf<'a, i32>,
        /// The longest sequence (sizes the workspace).
        max_seqlen: usize,
    },
}

/// Buffers of [`forward`].
#[derive(Debug)]
pub struct Forward<'a, T> {
    /// `[tokens, heads, d]`.
    pub q: Buf<'a, T>,
    /// `[tokens, heads, d]`.
    pub k: Buf<'a, T>,
    /// `[tokens, heads, e]`.
    pub v: Buf<'a, T>,
    /// `[tokens, heads, e]`, written.
    pub o: BufMut<'a, T>,
    /// `[n_seqs, heads, d, e]` f32, the state before each sequence's first token (zero when
    /// None). Causal only.
    pub initial_state: Option<Buf<'a, f32>>,
    /// `[n_seqs, heads, d, e]` f32, written with the state after each sequence's last token.
    /// Causal only.
    pub final_state: Option<BufMut<'a, f32>>,
    /// At least [`workspace_len`] f32: the split states (contents overwritten).
    pub workspace: BufMut<'a, f32>,
}

/// Buffers of [`decode`]: one token per sequence.
#[derive(Debug)]
pub struct Decode<'a, T> {
    /// `[batch, heads, d]`.
    pub q: Buf<'a, T>,
    /// `[batch, heads, d]`.
    pub k: Buf<'a, T>,
    /// `[batch, heads, e]`.
    pub v: Buf<'a, T>,
    /// `[batch, heads, e]`, written.
    pub o: BufMut<'a, T>,
    /// `[batch, heads, d, e]` f32, updated in place: `S <- lambda S + k^T v`.
    pub state: BufMut<'a, f32>,
}

/// Buffers of [`backward`].
#[derive(Debug)]
pub struct Backward<'a, T> {
    /// `[tokens, heads, d]`, as given to [`forward`].
    pub q: Buf<'a, T>,
    /// `[tokens, heads, d]`.
    pub k: Buf<'a, T>,
    /// `[tokens, heads, e]`.
    pub v: Buf<'a, T>,
    /// `[tokens, heads, e]`: the gradient of the loss with respect to `o`.
    pub d_o: Buf<'a, T>,
    /// The forward pass's initial state, `[n_seqs, heads, d, e]` f32 (zero when None).
    pub initial_state: Option<Buf<'a, f32>>,
    /// The gradient with respect to the final state, `[n_seqs, heads, d, e]` f32 (zero when
    /// None).
    pub d_final_state: Option<Buf<'a, f32>>,
    /// `[tokens, heads, d]`, written.
    pub dq: BufMut<'a, T>,
    /// `[tokens, heads, d]`, written.
    pub dk: BufMut<'a, T>,
    /// `[tokens, heads, e]`, written.
    pub dv: BufMut<'a, T>,
    /// `[n_seqs, heads, d, e]` f32, written with the gradient of the initial state.
    pub d_initial_state: Option<BufMut<'a, f32>>,
    /// At least [`workspace_len`] f32 (contents overwritten).
    pub workspace: BufMut<'a, f32>,
}

/// Tokens per block (the paper's B). 64: four warps of 16 rows each own one `mma` row tile,
/// and the 64 x 64 score tile plus the f32 state slice fit shared memory for f32 inputs on
/// sm_80 (164 KiB); on the CPU it keeps a block's rows in L1.
const BLOCK: usize = 64;
/// Columns of the state (of `e`) one GPU thread block owns: 64 keeps the f32 state slice
/// and its 16-bit copy at 48 KiB, and `e = 128` becomes two independent tiles (more
/// parallelism for short sequences) at the price of computing `Q K^T` twice.
#[cfg_attr(not(attnkit_cuda), allow(dead_code))]
const E_TILE: usize = 64;
/// Parallel units the plan wants per SM (GPU) or thread (CPU): two resident thread blocks
/// per SM at ~100 KiB of shared memory each, and on the CPU enough items to balance.
const ITEMS_PER_UNIT: usize = 2;
/// Largest head count of the GPU path: the per-head decay travels in the kernel parameters.
pub const MAX_HEADS: usize = 256;
/// Largest head count of any call and of [`decay_slopes`]: the host builds per-head tables
/// (the decay's logarithms) before a buffer can bound the count, so the count is bounded
/// here (no model comes near it).
///
/// ```
/// let cfg = attnkit::lightning::Config {
///     heads: attnkit::lightning::MAX_HOST_HEADS + 1, d: 64, e: 64,
///     decay: None, scale: 1.0, causal: true,
/// };
/// let seqs = attnkit::lightning::Seqs::Dense { batch: 1, seq: 1 };
/// let e = attnkit::lightning::workspace_len(&attnkit::Device::cpu(), &cfg, &seqs).unwrap_err();
/// assert_eq!(e.arg(), Some("heads"));
/// ```
pub const MAX_HOST_HEADS: usize = 1 << 16;

/// How a call is cut: block, split length and splits per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    block: usize,
    split: usize,
    n_splits: usize,
}

/// The one tile-size function: `rows` independent (sequence, head[, e tile]) rows of work,
/// `max_len` tokens at most each, `units` SMs or threads. Splits as long as possible while
/// `rows * splits` still fills `ITEMS_PER_UNIT * units`: fewer splits mean less workspace
/// traffic and fewer scan steps, and the time per token stays flat in the sequence length.
fn plan(max_len: usize, rows: usize, units: usize) -> Plan {
    let blocks = max_len.div_ceil(BLOCK).max(1);
    let want = (ITEMS_PER_UNIT * units).div_ceil(rows.max(1)).max(1);
    let per = blocks.div_ceil(want);
    Plan {
        block: BLOCK,
        split: per * BLOCK,
        n_splits: blocks.div_ceil(per),
    }
}

/// The work units of a device and the rows of work per (sequence, head) it runs.
#[cfg_attr(not(attnkit_cuda), allow(unused_variables))]
fn units(dev: &Device, e: usize) -> (usize, usize) {
    match &dev.backend {
        Backend::Cpu { threads } => (*threads, 1),
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => (c.sm_count as usize, e.div_ceil(E_TILE)),
    }
}

/// f32 elements of the workspace that [`forward`] and [`backward`] need on `dev` for this
/// config and these sequences: `n_seqs * heads * n_splits * d * e`, `n_splits` from the
/// device's tile plan. Zero-cost; call it once per shape.
///
/// ```
/// use attnkit::{Device, lightning::{self, Config, Seqs}};
/// let cfg = Config { heads: 4, d: 64, e: 128, decay: None, scale: 1.0, causal: true };
/// let n = lightning::workspace_len(&Device::cpu(), &cfg, &Seqs::Dense { batch: 2, seq: 1000 })?;
/// assert_eq!(n % (2 * 4 * 64 * 128), 0);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn workspace_len(dev: &Device, cfg: &Config<'_>, seqs: &Seqs<'_>) -> Result<usize> {
    check_config(cfg)?;
    let (n_seqs, max_len) = count(seqs, cfg.heads, cfg.d.max(cfg.e))?;
    let p = plan_for(dev, cfg, n_seqs, max_len)?;
    mul("workspace", &[n_seqs, cfg.heads, p.n_splits, cfg.d, cfg.e])
}

fn plan_for(dev: &Device, cfg: &Config<'_>, n_seqs: usize, max_len: usize) -> Result<Plan> {
    let (units, tiles) = units(dev, cfg.e);
    let rows = mul("heads", &[n_seqs, cfg.heads, tiles])?;
    Ok(plan(max_len, rows, units))
}

/// Lightning Attention forward: `o = scale * [causal, decayed] Q K^T V`, block-split.
///
/// Causal: `o_t = scale * q_t S_t`, `S_t = lambda_h S_{t-1} + k_t^T v_t`, starting from
/// `initial_state` (or zero) and leaving the last `S_t` of each sequence in `final_state`.
/// Chunked prefill is `forward` on the first part with `final_state`, then on the next part
/// with that as `initial_state` (or [`decode`] token by token). Non-causal (`cfg.causal ==
/// false`): `o = scale * Q (K^T V)` per sequence, without decay or states.
///
/// Errors name the argument: shapes and lengths ([`Error::Shape`]), decay or scale
/// ([`Error::Value`]), head dims, states with the non-causal form or too many heads on a GPU
/// ([`Error::Unsupported`]), buffers on the wrong device ([`Error::Placement`]).
///
/// ```
/// use attnkit::{Device, lightning::{self, Config, Forward, Seqs}};
/// let dev = Device::cpu();
/// let cfg = Config { heads: 1, d: 64, e: 64, decay: None, scale: 1.0, causal: false };
/// let seqs = Seqs::Dense { batch: 1, seq: 3 };
/// let x = vec![0.125f32; 3 * 64];
/// let mut o = vec![f32::NAN; 3 * 64];
/// let mut ws = vec![0.0; lightning::workspace_len(&dev, &cfg, &seqs)?];
/// lightning::forward(&dev, &cfg, &seqs, Forward {
///     q: (&x).into(), k: (&x).into(), v: (&x).into(), o: (&mut o).into(),
///     initial_state: None, final_state: None, workspace: (&mut ws).into(),
/// })?;
/// // Each output: 64 * 0.125^2 * (3 * 0.125) = 0.375.
/// assert!(o.iter().all(|&x| (x - 0.375).abs() < 1e-6));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn forward<T: Element>(
    dev: &Device,
    cfg: &Config<'_>,
    seqs: &Seqs<'_>,
    mut io: Forward<'_, T>,
) -> Result<()> {
    let log2_decay = check_config(cfg)?;
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let r = resolve(seqs, heads, d, d.max(e), io.q.len())?;
    let qk = mul("q", &[r.tokens, heads, d])?;
    let vo = mul("v", &[r.tokens, heads, e])?;
    check_len("q", io.q.len(), qk)?;
    check_len("k", io.k.len(), qk)?;
    check_len("v", io.v.len(), vo)?;
    check_len("o", io.o.len(), vo)?;
    let state_len = mul("initial_state", &[r.n_seqs, heads, d, e])?;
    if !cfg.causal && (io.initial_state.is_some() || io.final_state.is_some()) {
        let arg = if io.initial_state.is_some() {
            "initial_state"
        } else {
            "final_state"
        };
        return Err(Error::Unsupported {
            arg,
            detail: "the non-causal form keeps no state".into(),
        });
    }
    if let Some(s) = &io.initial_state {
        check_len("initial_state", s.len(), state_len)?;
    }
    if let Some(s) = &io.final_state {
        check_len("final_state", s.len(), state_len)?;
    }
    let plan = plan_for(dev, cfg, r.n_seqs, r.max_len)?;
    let need = mul("workspace", &[r.n_seqs, heads, plan.n_splits, d, e])?;
    check_workspace(io.workspace.len(), need)?;
    match &dev.backend {
        Backend::Cpu { threads } => {
            // Only the prefixes the call touches reach the CPU code: a longer buffer's tail
            // stays as it was.
            let q = prefix("q", io.q.host("q")?, qk)?;
            let k = prefix("k", io.k.host("k")?, qk)?;
            let v = prefix("v", io.v.host("v")?, vo)?;
            let init = match &io.initial_state {
                Some(s) => Some(prefix(
                    "initial_state",
                    s.host("initial_state")?,
                    state_len,
                )?),
                None => None,
            };
            let o = prefix_mut("o", io.o.host_mut("o")?, vo)?;
            let fin = match &mut io.final_state {
                Some(s) => Some(prefix_mut(
                    "final_state",
                    s.host_mut("final_state")?,
                    state_len,
                )?),
                None => None,
            };
            let ws = prefix_mut("workspace", io.workspace.host_mut("workspace")?, need)?;
            let seqs = r.spans()?;
            let op = |data, dim| cpu::Operand {
                data,
                tok: heads * dim,
                head: dim,
                dim,
            };
            let scan = cpu::Scan {
                a: op(q, d),
                b: op(k, d),
                c: op(v, e),
                seqs: &seqs,
                heads,
                reverse: false,
                causal: cfg.causal,
                scale: cfg.scale,
                log2_decay: &log2_decay,
                init,
                init_transposed: false,
                block: plan.block,
                split: plan.split,
                n_splits: plan.n_splits,
            };
            let out = cpu::OutRows {
                data: o,
                tok: heads * e,
                head: e,
            };
            scan.run(*threads, ws, out, fin, |_, _, _, _, _| {});
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::forward(c, cfg, seqs, &r, plan, &log2_decay, io),
    }
}

/// One decode step per sequence: `S <- lambda_h S + k^T v`, `o = scale * q S`, with the
/// state updated in place (after a [`forward`] prefill that left it in `final_state`).
///
/// ```
/// use attnkit::{Device, lightning::{self, Config, Decode}};
/// let cfg = Config { heads: 1, d: 64, e: 64, decay: Some(&[0.5]), scale: 1.0, causal: true };
/// let (q, k, v) = (vec![1.0f32; 64], vec![0.0f32; 64], vec![0.0f32; 64]);
/// let mut o = vec![f32::NAN; 64];
/// let mut s = vec![1.0f32; 64 * 64];
/// lightning::decode(&Device::cpu(), &cfg, 1, Decode {
///     q: (&q).into(), k: (&k).into(), v: (&v).into(), o: (&mut o).into(),
///     state: (&mut s).into(),
/// })?;
/// let lambda = (-0.5f32).exp();
/// assert!((s[0] - lambda).abs() < 1e-6 && (o[0] - 64.0 * lambda).abs() < 1e-4);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn decode<T: Element>(
    dev: &Device,
    cfg: &Config<'_>,
    batch: usize,
    mut io: Decode<'_, T>,
) -> Result<()> {
    let log2_decay = check_config(cfg)?;
    if !cfg.causal {
        return Err(Error::Unsupported {
            arg: "causal",
            detail: "decode is causal by definition".into(),
        });
    }
    if batch == 0 {
        return Err(Error::Shape {
            arg: "batch",
            detail: "must be at least 1".into(),
        });
    }
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let qk = mul("q", &[batch, heads, d])?;
    let vo = mul("v", &[batch, heads, e])?;
    let state_len = mul("state", &[batch, heads, d, e])?;
    check_len("q", io.q.len(), qk)?;
    check_len("k", io.k.len(), qk)?;
    check_len("v", io.v.len(), vo)?;
    check_len("o", io.o.len(), vo)?;
    check_len("state", io.state.len(), state_len)?;
    match &dev.backend {
        Backend::Cpu { threads } => {
            let q = prefix("q", io.q.host("q")?, qk)?;
            let k = prefix("k", io.k.host("k")?, qk)?;
            let v = prefix("v", io.v.host("v")?, vo)?;
            let o = prefix_mut("o", io.o.host_mut("o")?, vo)?;
            let s = prefix_mut("state", io.state.host_mut("state")?, state_len)?;
            cpu::decode(*threads, heads, d, e, q, k, v, &log2_decay, cfg.scale, s, o);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::decode(c, cfg, batch, &log2_decay, io),
    }
}

/// Gradients of [`forward`]: `dq`, `dk`, `dv` and, if asked, the initial state's, given the
/// gradient `d_o` of the outputs (and `d_final_state`, when the final state fed a later
/// chunk). The block split runs in both directions, as in the paper: a forward sweep for
/// `dQ` (`dq_t = scale * dO_t S_t^T`) and reverse sweeps for `dK` and `dV` over
/// `G_t = sum_{i>=t} lambda^(i-t) scale q_i^T dO_i + lambda^(T-1-t) dS_final`.
///
/// On a GPU the 16-bit paths round their tensor-core operands (decayed rows, scores, the state
/// copy) to the input type, which scales with `d_o`: f16 gradients need loss scaling, as with
/// any f16 backward (bf16 does not). The sweeps need shared memory for both `d` and `e`
/// tiles; a GPU with less than that per block (e.g. sm_86/89 at d or e = 128) returns a typed
/// error naming the kernel.
///
/// Both backends run the same three sweeps over the block split (the CPU as three scans, the
/// GPU as seven launches: split states, a scan and outputs per sweep, the dK outputs reusing
/// the dV sweep's split states), with the same workspace as [`forward`].
///
/// ```
/// use attnkit::{Device, lightning::{self, Backward, Config, Seqs}};
/// let dev = Device::cpu();
/// let cfg = Config { heads: 1, d: 64, e: 64, decay: Some(&[0.1]), scale: 1.0, causal: true };
/// let seqs = Seqs::Dense { batch: 1, seq: 5 };
/// let x = vec![0.5f32; 5 * 64];
/// let (mut dq, mut dk, mut dv) = (x.clone(), x.clone(), x.clone());
/// let mut ws = vec![0.0; lightning::workspace_len(&dev, &cfg, &seqs)?];
/// lightning::backward(&dev, &cfg, &seqs, Backward {
///     q: (&x).into(), k: (&x).into(), v: (&x).into(), d_o: (&x).into(),
///     initial_state: None, d_final_state: None,
///     dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dv).into(),
///     d_initial_state: None, workspace: (&mut ws).into(),
/// })?;
/// assert!(dq.iter().chain(&dk).chain(&dv).all(|g| g.is_finite()));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn backward<T: Element>(
    dev: &Device,
    cfg: &Config<'_>,
    seqs: &Seqs<'_>,
    mut io: Backward<'_, T>,
) -> Result<()> {
    let log2_decay = check_config(cfg)?;
    let (heads, d, e) = (cfg.heads, cfg.d, cfg.e);
    let r = resolve(seqs, heads, d, d.max(e), io.q.len())?;
    let qk = mul("q", &[r.tokens, heads, d])?;
    let vo = mul("v", &[r.tokens, heads, e])?;
    for (arg, len, want) in [
        ("q", io.q.len(), qk),
        ("k", io.k.len(), qk),
        ("v", io.v.len(), vo),
        ("d_o", io.d_o.len(), vo),
        ("dq", io.dq.len(), qk),
        ("dk", io.dk.len(), qk),
        ("dv", io.dv.len(), vo),
    ] {
        check_len(arg, len, want)?;
    }
    let state_len = mul("initial_state", &[r.n_seqs, heads, d, e])?;
    let states = [
        ("initial_state", io.initial_state.as_ref().map(|s| s.len())),
        ("d_final_state", io.d_final_state.as_ref().map(|s| s.len())),
        (
            "d_initial_state",
            io.d_initial_state.as_ref().map(|s| s.len()),
        ),
    ];
    for (arg, len) in states {
        if let Some(len) = len {
            if !cfg.causal {
                return Err(Error::Unsupported {
                    arg,
                    detail: "the non-causal form keeps no state".into(),
                });
            }
            check_len(arg, len, state_len)?;
        }
    }
    let plan = plan_for(dev, cfg, r.n_seqs, r.max_len)?;
    let need = mul("workspace", &[r.n_seqs, heads, plan.n_splits, d, e])?;
    check_workspace(io.workspace.len(), need)?;
    match &dev.backend {
        Backend::Cpu { threads } => {
            // Only the prefixes the call touches reach the CPU code (tails untouched).
            let bufs = cpu_backward::Bufs {
                q: prefix("q", io.q.host("q")?, qk)?,
                k: prefix("k", io.k.host("k")?, qk)?,
                v: prefix("v", io.v.host("v")?, vo)?,
                d_o: prefix("d_o", io.d_o.host("d_o")?, vo)?,
                init: state_prefix("initial_state", &io.initial_state, state_len)?,
                d_final: state_prefix("d_final_state", &io.d_final_state, state_len)?,
            };
            let dq = prefix_mut("dq", io.dq.host_mut("dq")?, qk)?;
            let dk = prefix_mut("dk", io.dk.host_mut("dk")?, qk)?;
            let dv = prefix_mut("dv", io.dv.host_mut("dv")?, vo)?;
            let d_init = match &mut io.d_initial_state {
                Some(s) => Some(prefix_mut(
                    "d_initial_state",
                    s.host_mut("d_initial_state")?,
                    state_len,
                )?),
                None => None,
            };
            let ws = prefix_mut("workspace", io.workspace.host_mut("workspace")?, need)?;
            let seqs = r.spans()?;
            let shape = cpu_backward::Shape {
                heads,
                d,
                e,
                seqs: &seqs,
                plan,
                causal: cfg.causal,
                scale: cfg.scale,
                log2_decay: &log2_decay,
            };
            cpu_backward::run(*threads, &shape, &bufs, dq, dk, dv, d_init, ws);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::backward(c, cfg, seqs, &r, plan, &log2_decay, io),
    }
}

mod cpu_backward;

/// The first `n` elements of an optional host state (see [`checks::prefix`]).
fn state_prefix<'a>(
    arg: &'static str,
    s: &'a Option<Buf<'_, f32>>,
    n: usize,
) -> Result<Option<&'a [f32]>> {
    match s {
        Some(s) => prefix(arg, s.host(arg)?, n).map(Some),
        None => Ok(None),
    }
}

/// Per-head decay rates `s_h = 2^(-8 (h + 1) / heads) * layer_factor` of TransNormerLLM and
/// MiniMax-01 (ALiBi's slopes), for `lambda_h = exp(-s_h)`: head 0 decays fastest, the
/// last head at `2^-8 * layer_factor`. Those models scale the slopes per layer by
/// [`layer_factor`]. (ALiBi interleaves extra slopes when `heads` is not a power of two;
/// this is the plain formula for every `heads`.)
///
/// ```
/// let s = attnkit::lightning::decay_slopes(8, 1.0)?;
/// assert_eq!(s[0], 0.5);
/// assert_eq!(s[7], 1.0 / 256.0);
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn decay_slopes(heads: usize, layer_factor: f32) -> Result<Vec<f32>> {
    check_heads(heads)?;
    if !(layer_factor.is_finite() && layer_factor >= 0.0) {
        return Err(Error::Value {
            arg: "layer_factor",
            detail: format!("{layer_factor}; must be finite and >= 0"),
        });
    }
    Ok((0..heads)
        .map(|h| ((-8.0 * (h + 1) as f64 / heads as f64).exp2() * layer_factor as f64) as f32)
        .collect())
}

/// The per-layer factor TransNormerLLM and MiniMax-01 apply to [`decay_slopes`]:
/// `1 - layer / (num_layers - 1) + 1e-5` (layer 0 decays most, the last layer barely; 1 for
/// a single layer).
///
/// ```
/// let f = attnkit::lightning::layer_factor(0, 4)?;
/// assert!((f - 1.00001).abs() < 1e-7);
/// assert!(attnkit::lightning::layer_factor(4, 4).is_err());
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn layer_factor(layer: usize, num_layers: usize) -> Result<f32> {
    if layer >= num_layers {
        return Err(Error::Value {
            arg: "layer",
            detail: format!("{layer} >= num_layers {num_layers}"),
        });
    }
    if num_layers == 1 {
        return Ok(1.0);
    }
    Ok((1.0 - layer as f64 / (num_layers - 1) as f64 + 1e-5) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_fills_the_machine_and_keeps_splits_whole_blocks() {
        // 128k tokens, 32 rows, 132 SMs: 9 splits of 15k tokens, not one 128k loop.
        let p = plan(131072, 32, 132);
        assert_eq!(p.split % BLOCK, 0);
        assert!(
            p.n_splits * 32 >= 2 * 132 && p.n_splits * p.split >= 131072,
            "{p:?}"
        );
        // Short sequences: one block per split at most.
        assert_eq!(
            plan(63, 1, 132),
            Plan {
                block: 64,
                split: 64,
                n_splits: 1
            }
        );
        assert_eq!(plan(0, 1, 2).n_splits, 1);
        // Many rows: no splitting.
        assert_eq!(plan(4096, 10_000, 132).n_splits, 1);
    }
}
