//! FlashAttention forward: `O = softmax(scale * Q K^T + mask) V`, tile by tile, never
//! materialising the score matrix, plus the per-row log-sum-exp (f32).
//!
//! Layout `[batch, seq, heads, head_dim]` with explicit element strides (the last dimension
//! contiguous), GQA/MQA (`heads_q % heads_kv == 0`, K/V heads shared without copies),
//! `seq_q != seq_k` with the causal mask aligned bottom-right (query `i` sees keys
//! `j <= i + seq_k - seq_q`, as FlashAttention >= 2.1), and packed variable-length batches
//! ([`forward_varlen`]). A row that sees no key gets `O = 0` and `LSE = -inf`. Inputs must be
//! finite: an inf or NaN anywhere in K or V may reach rows that give it zero weight (the GPU
//! multiplies it by 0), and the backends need not agree on such rows. The scale must be
//! finite (NaN or inf is a typed error naming `scale`).
//!
//! Limits (larger is a typed error naming the argument, checked before any size arithmetic):
//! `seq_q`, `seq_k`, the packed totals (`batch * seq` for fixed batches), windows and sinks at
//! most [`MAX_LEN`] (2^30: the kernels' 32-bit visibility arithmetic stays below 2^31);
//! `batch`, `heads_q`, `heads_kv` at most [`MAX_GRID`] (65535); block-mask blocks in
//! `1..=MAX_LEN`. Buffers may be longer than the problem needs (the extra is untouched).
//! The size helpers ([`Attention::o_len`], [`Strides::contiguous`], ...) saturate at
//! `usize::MAX` instead of overflowing; forward then rejects the problem.
//!
//! The variants of the source documents are options of the same call ([`Options`],
//! [`Extras`]), not separate functions: sliding windows `(left, right)` and StreamingLLM
//! sinks, block-sparse masks ([`BlockMask`]), the entropy-invariant scale, a learned per-head
//! sink logit, relu² scores (GAU / FLASH), and per-row entropy. Combinations that make no
//! sense are typed errors.
//!
//! Data flow: [`forward`] checks every argument against the problem ([`Attention`]), then runs
//! the CPU implementation (`cpu.rs`: the same online-softmax tiling, on all cores) or the CUDA
//! kernel (`kernels/flash.cu`: tensor cores for f16/bf16, CUDA cores for the exact f32 path)
//! on the caller's stream, with no allocation or synchronisation.
//!
//! The backward ([`backward`], [`backward_varlen`]: dQ, dK, dV and d sink_logits for every
//! option above) follows FlashAttention-2's algorithm, deterministically, on the CPU
//! (`cpu_backward.rs`) and in CUDA-core kernels (`kernels/flash.cu`, `flash_bwd_*`; the
//! tensor-core version is still to come).

mod backward;
mod checks;
mod cpu;
mod cpu_backward;
#[cfg(attnkit_cuda)]
mod cuda;
mod options;
pub mod oracle;
mod problem;

use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};
pub use backward::{
    BackwardIo, GradStrides, backward, backward_varlen, backward_workspace_len,
    varlen_backward_workspace_len,
};
pub(crate) use checks::check_strides;
use checks::{check, check_extras, check_offsets, check_sizes, checked_total};
pub use options::{BlockMask, Extras, MAX_MASK_BLOCKS, Options, Relu2Norm, Score};
use problem::visible_pairs;
pub(crate) use problem::{Problem, Visibility};

/// The longest sequence, packed total (`batch * seq` for fixed batches, `cu_seqlens[batch]`
/// for varlen), window side and sink count a call takes: 2^30, so that the kernels' 32-bit
/// visibility arithmetic (`i + (seq_k - seq_q) + window_right < 2^31`) cannot wrap.
/// Larger values are a typed error naming the argument.
pub const MAX_LEN: usize = 1 << 30;

/// The most sequences (`batch`), query heads and key/value heads a call takes: 65535, one
/// CUDA grid dimension.
pub const MAX_GRID: usize = checks::MAX_GRID;

/// Head dimensions the kernels are built for.
pub const HEAD_DIMS: [usize; 8] = [32, 64, 80, 96, 112, 128, 192, 256];

/// Element strides of a `[batch, seq, heads, head_dim]` tensor.
///
/// ```
/// let s = attnkit::flash::Strides::contiguous(1024, 8, 64);
/// assert_eq!((s.batch, s.row, s.head, s.dim), (1024 * 8 * 64, 8 * 64, 64, 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    /// Between batches (unused by packed variable-length inputs).
    pub batch: usize,
    /// Between sequence positions (rows).
    pub row: usize,
    /// Between heads.
    pub head: usize,
    /// Between elements of a head vector: must be 1 (the kernels read rows as vectors).
    pub dim: usize,
}

impl Strides {
    /// The strides of a contiguous `[batch, seq, heads, head_dim]` tensor. Each saturates at
    /// `usize::MAX`; forward then rejects the problem.
    ///
    /// ```
    /// let s = attnkit::flash::Strides::contiguous(4, 2, 8);
    /// assert_eq!(s.row, 16);
    /// assert_eq!(attnkit::flash::Strides::contiguous(usize::MAX, 2, 8).batch, usize::MAX);
    /// ```
    pub fn contiguous(seq: usize, heads: usize, head_dim: usize) -> Strides {
        let row = heads.saturating_mul(head_dim);
        Strides {
            batch: seq.saturating_mul(row),
            row,
            head: head_dim,
            dim: 1,
        }
    }
}

/// A fixed-length attention problem: shapes, mask, scale and strides.
///
/// ```
/// use attnkit::flash::Attention;
/// let a = Attention::new(2, 128, 128, 8, 2, 64).causal(true);
/// assert_eq!(a.softmax_scale(), 0.125);
/// assert_eq!(a.o_len(), 2 * 128 * 8 * 64);
/// ```
#[derive(Clone, Debug)]
pub struct Attention {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query rows per sequence.
    pub seq_q: usize,
    /// Keys per sequence.
    pub seq_k: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (`heads_q % heads_kv == 0`).
    pub heads_kv: usize,
    /// Head dimension, one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// Mask, scale and score options (see the builder methods).
    pub opts: Options,
    /// Strides of q (default: contiguous).
    pub q_strides: Strides,
    /// Strides of k (default: contiguous).
    pub k_strides: Strides,
    /// Strides of v (default: contiguous).
    pub v_strides: Strides,
    /// Strides of o (default: contiguous). Must not overlap itself.
    pub o_strides: Strides,
}

impl Attention {
    /// A non-causal problem with contiguous tensors and the default scale.
    ///
    /// ```
    /// let a = attnkit::flash::Attention::new(1, 17, 33, 4, 4, 128);
    /// assert_eq!(a.k_strides.row, 4 * 128);
    /// ```
    pub fn new(
        batch: usize,
        seq_q: usize,
        seq_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Self {
        Attention {
            batch,
            seq_q,
            seq_k,
            heads_q,
            heads_kv,
            head_dim,
            opts: Options::default(),
            q_strides: Strides::contiguous(seq_q, heads_q, head_dim),
            k_strides: Strides::contiguous(seq_k, heads_kv, head_dim),
            v_strides: Strides::contiguous(seq_k, heads_kv, head_dim),
            o_strides: Strides::contiguous(seq_q, heads_q, head_dim),
        }
    }

    /// Elements `o` must hold with contiguous strides (`batch * seq_q * heads_q * head_dim`).
    /// Saturates at `usize::MAX`; forward then rejects the problem.
    ///
    /// ```
    /// use attnkit::flash::Attention;
    /// assert_eq!(Attention::new(2, 3, 5, 4, 2, 32).o_len(), 2 * 3 * 4 * 32);
    /// assert_eq!(Attention::new(1 << 40, 1 << 40, 5, 4, 2, 32).o_len(), usize::MAX);
    /// ```
    pub fn o_len(&self) -> usize {
        saturating_product(&[self.batch, self.seq_q, self.heads_q, self.head_dim])
    }

    /// Elements of the LSE output, `[batch, heads_q, seq_q]`. Saturates at `usize::MAX`;
    /// forward then rejects the problem.
    ///
    /// ```
    /// assert_eq!(attnkit::flash::Attention::new(2, 3, 5, 4, 2, 32).lse_len(), 2 * 4 * 3);
    /// ```
    pub fn lse_len(&self) -> usize {
        saturating_product(&[self.batch, self.heads_q, self.seq_q])
    }

    /// Floating-point operations of the forward pass, `4 * b * h * seq_q * seq_k * d`, only
    /// the visible (query, key) pairs counted under the causal mask and window (a block mask
    /// is not counted).
    ///
    /// Closed form (constant time in the lengths), in f64: exact while the counts stay below
    /// 2^53, and it never panics, whatever the sizes.
    ///
    /// ```
    /// let a = attnkit::flash::Attention::new(1, 4, 4, 1, 1, 32);
    /// assert_eq!(a.flops(), 4.0 * 16.0 * 32.0);
    /// assert_eq!(a.causal(true).flops(), 4.0 * 10.0 * 32.0);
    /// ```
    pub fn flops(&self) -> f64 {
        let pairs = visible_pairs(self.seq_q, self.seq_k, &self.opts);
        4.0 * self.batch as f64 * self.heads_q as f64 * self.head_dim as f64 * pairs
    }
}

/// The product of sizes, `usize::MAX` when it overflows.
fn saturating_product(sizes: &[usize]) -> usize {
    sizes
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .unwrap_or(usize::MAX)
}

/// A packed variable-length problem: sequence `b` holds query rows
/// `cu_seqlens_q[b]..cu_seqlens_q[b+1]` and key rows `cu_seqlens_k[b]..cu_seqlens_k[b+1]` of
/// tensors laid out `[total, heads, head_dim]`. The offsets are host slices (they are checked,
/// and size the launch); a GPU call also takes device copies of them.
///
/// ```
/// use attnkit::flash::VarlenAttention;
/// let cu = [0, 5, 5, 12];
/// let a = VarlenAttention::new(&cu, &cu, 4, 1, 64).causal(true);
/// assert_eq!(a.total_q(), 12);
/// ```
#[derive(Clone, Debug)]
pub struct VarlenAttention<'a> {
    /// Where the sequences are: host offsets, or device-only offsets with their sizes.
    pub offsets: Offsets<'a>,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (`heads_q % heads_kv == 0`).
    pub heads_kv: usize,
    /// Head dimension, one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// Mask, scale and score options, applied to each sequence.
    pub opts: Options,
    /// Strides of q (`batch` unused; default contiguous `[total_q, heads_q, head_dim]`).
    pub q_strides: Strides,
    /// Strides of k.
    pub k_strides: Strides,
    /// Strides of v.
    pub v_strides: Strides,
    /// Strides of o. Must not overlap itself.
    pub o_strides: Strides,
}

/// The sequences of a varlen problem.
///
/// ```
/// use attnkit::flash::{DeviceOffsets, Offsets};
/// let cu = [0, 4, 9];
/// let host = Offsets::Host { q: &cu, k: &cu };
/// let dev = Offsets::Device(DeviceOffsets { batch: 2, total_q: 9, total_k: 9, max_seqlen_q: 5, max_seqlen_k: 5 });
/// assert_eq!((host.total_q(), dev.total_q()), (9, 9));
/// ```
#[derive(Clone, Copy, Debug)]
pub enum Offsets<'a> {
    /// Host copies of the `[batch + 1]` offsets (from 0, non-decreasing), checked before the
    /// call; the call's offset buffers hold the same (on a GPU, device copies).
    Host {
        /// Query row offsets.
        q: &'a [i32],
        /// Key row offsets.
        k: &'a [i32],
    },
    /// The offsets live only in the call's buffers (a server keeps them on the device: no
    /// device-to-host copy per step); the host supplies the sizes.
    Device(DeviceOffsets),
}

/// The sizes of a varlen problem whose offsets the host does not read ([`Offsets::Device`]).
///
/// The offsets buffers hold `batch + 1` entries. On the CPU their contents are checked against
/// these sizes (a typed error naming the buffer when a sequence is longer than its maximum or
/// ends past its total). On a GPU the host does not read them: the kernel re-checks each
/// sequence and skips (leaves unwritten) one whose offsets decrease, end past `total_q` /
/// `total_k`, or are longer than `max_seqlen_q` / `max_seqlen_k`; nothing outside the
/// buffers is ever read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceOffsets {
    /// Sequences.
    pub batch: usize,
    /// Rows of the packed q and o (and the LSE's row count).
    pub total_q: usize,
    /// Rows of the packed k and v.
    pub total_k: usize,
    /// At least the longest query sequence (sizes the grid).
    pub max_seqlen_q: usize,
    /// At least the longest key sequence (sizes the block mask's columns).
    pub max_seqlen_k: usize,
}

impl Offsets<'_> {
    /// Packed query rows: the last host offset (0 if there is none or it is negative), or
    /// [`DeviceOffsets::total_q`].
    pub fn total_q(&self) -> usize {
        match self {
            Offsets::Host { q, .. } => q.last().map_or(0, |&x| x.max(0) as usize),
            Offsets::Device(d) => d.total_q,
        }
    }
}

impl VarlenAttention<'static> {
    /// A varlen problem whose offsets stay on the device ([`Offsets::Device`]).
    ///
    /// ```
    /// use attnkit::flash::{DeviceOffsets, VarlenAttention};
    /// let dims = DeviceOffsets { batch: 3, total_q: 12, total_k: 40, max_seqlen_q: 7, max_seqlen_k: 20 };
    /// let a = VarlenAttention::with_device_offsets(dims, 8, 2, 128).causal(true);
    /// assert_eq!(a.o_len(), 12 * 8 * 128);
    /// ```
    pub fn with_device_offsets(
        dims: DeviceOffsets,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Self {
        let mut a = VarlenAttention::new(&[], &[], heads_q, heads_kv, head_dim);
        a.offsets = Offsets::Device(dims);
        a
    }
}

impl<'a> VarlenAttention<'a> {
    /// A non-causal varlen problem with contiguous packed tensors and the default scale.
    ///
    /// ```
    /// let (q, k) = ([0, 3, 7], [0, 10, 20]);
    /// let a = attnkit::flash::VarlenAttention::new(&q, &k, 8, 8, 128);
    /// assert_eq!(a.o_len(), 7 * 8 * 128);
    /// ```
    pub fn new(
        cu_seqlens_q: &'a [i32],
        cu_seqlens_k: &'a [i32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Self {
        VarlenAttention {
            offsets: Offsets::Host {
                q: cu_seqlens_q,
                k: cu_seqlens_k,
            },
            heads_q,
            heads_kv,
            head_dim,
            opts: Options::default(),
            q_strides: Strides::contiguous(0, heads_q, head_dim),
            k_strides: Strides::contiguous(0, heads_kv, head_dim),
            v_strides: Strides::contiguous(0, heads_kv, head_dim),
            o_strides: Strides::contiguous(0, heads_q, head_dim),
        }
    }

    /// Packed query rows (`cu_seqlens_q[batch]`, 0 if the slice is empty or the offset
    /// negative; [`DeviceOffsets::total_q`] for device-only offsets).
    ///
    /// ```
    /// let cu = [0, 2, 9];
    /// assert_eq!(attnkit::flash::VarlenAttention::new(&cu, &cu, 1, 1, 32).total_q(), 9);
    /// ```
    pub fn total_q(&self) -> usize {
        self.offsets.total_q()
    }

    /// Elements `o` must hold with contiguous strides (`total_q * heads_q * head_dim`).
    /// Saturates at `usize::MAX`; forward then rejects the problem.
    ///
    /// ```
    /// let cu = [0, 2, 9];
    /// assert_eq!(attnkit::flash::VarlenAttention::new(&cu, &cu, 2, 1, 32).o_len(), 9 * 2 * 32);
    /// ```
    pub fn o_len(&self) -> usize {
        saturating_product(&[self.total_q(), self.heads_q, self.head_dim])
    }

    /// Elements of the LSE output, `[heads_q, total_q]`. Saturates at `usize::MAX`; forward
    /// then rejects the problem.
    ///
    /// ```
    /// let cu = [0, 2, 9];
    /// assert_eq!(attnkit::flash::VarlenAttention::new(&cu, &cu, 2, 1, 32).lse_len(), 18);
    /// ```
    pub fn lse_len(&self) -> usize {
        saturating_product(&[self.heads_q, self.total_q()])
    }
}

/// Runs attention on a fixed-length batch: `o = softmax(scale * q k^T + mask) v`, and `lse`,
/// on `dev`'s backend. `q`, `k`, `v`, `o` are `[batch, seq, heads, head_dim]` with the strides in
/// `attn`; `lse` is contiguous `[batch, heads_q, seq_q]`. Every argument is checked first;
/// nothing is written on error.
///
/// ```
/// use attnkit::{flash::{self, Attention}, Bf16, Device, Element};
/// let a = Attention::new(1, 17, 17, 2, 1, 64).causal(true);
/// let q: Vec<Bf16> = (0..a.o_len()).map(|i| Bf16::from_f32((i % 7) as f32 * 0.1)).collect();
/// let kv: Vec<Bf16> = (0..17 * 64).map(|i| Bf16::from_f32((i % 5) as f32 * 0.1)).collect();
/// let mut o = vec![Bf16::nan(); a.o_len()];
/// let mut lse = vec![f32::NAN; a.lse_len()];
/// flash::forward(&Device::cpu(), &a, (&q).into(), (&kv).into(), (&kv).into(), (&mut o).into(), (&mut lse).into())?;
/// assert!(o.iter().all(|x| x.to_f32().is_finite()) && lse.iter().all(|x| x.is_finite()));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn forward<T: Element>(
    dev: &Device,
    attn: &Attention,
    q: Buf<'_, T>,
    k: Buf<'_, T>,
    v: Buf<'_, T>,
    o: BufMut<'_, T>,
    lse: BufMut<'_, f32>,
) -> Result<()> {
    forward_with(dev, attn, q, k, v, o, lse, Extras::default())
}

/// [`forward`] with optional inputs and outputs: learned sink logits, the entropy output, a
/// block-sparse mask ([`Extras`]). Each must live where `dev` runs.
///
/// ```
/// use attnkit::{flash::{self, Attention, Extras}, Device};
/// let a = Attention::new(1, 9, 9, 2, 2, 32).causal(true).window(Some(3), None).sinks(1);
/// let x = vec![0.25f32; a.o_len()];
/// let (mut o, mut lse, mut ent) = (vec![f32::NAN; a.o_len()], vec![f32::NAN; 18], vec![f32::NAN; 18]);
/// let sinks = [0.0f32, f32::NEG_INFINITY];
/// let extras = Extras { sink_logits: Some(sinks[..].into()), entropy: Some((&mut ent).into()), ..Default::default() };
/// flash::forward_with(&Device::cpu(), &a, (&x).into(), (&x).into(), (&x).into(), (&mut o).into(), (&mut lse).into(), extras)?;
/// // Head 1 (no sink), row 8 sees keys 0 and 5..=8: five equal scores, entropy ln 5.
/// assert!((ent[9 + 8] - 5f32.ln()).abs() < 1e-5);
/// # Ok::<(), attnkit::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_with<T: Element>(
    dev: &Device,
    attn: &Attention,
    q: Buf<'_, T>,
    k: Buf<'_, T>,
    v: Buf<'_, T>,
    o: BufMut<'_, T>,
    lse: BufMut<'_, f32>,
    extras: Extras<'_>,
) -> Result<()> {
    let p = fixed_problem(attn)?;
    run(dev, &p, q, k, v, None, o, lse, extras)
}

/// Runs attention on a packed variable-length batch (continuous batching): `q`, `o` are
/// `[total_q, heads_q, head_dim]`, `k`, `v` are `[total_k, heads_kv, head_dim]` (strides in
/// `attn`), `lse` is contiguous `[heads_q, total_q]`. Empty sequences are allowed.
///
/// `cu_seqlens_q`/`cu_seqlens_k` hold the offsets where the call runs. With host offsets
/// ([`Offsets::Host`]) they hold the same ones: on the CPU pass the host slices again (or
/// copies: their contents must equal the problem's, a typed error naming the buffer
/// otherwise, so the CPU never computes from offsets a GPU would not use); on a GPU, device
/// copies, which the host does not read (no device-to-host copy). With device-only offsets
/// ([`Offsets::Device`], [`VarlenAttention::with_device_offsets`]) the host has only the
/// sizes ([`DeviceOffsets`]): a server's step needs no host copy of its tables at all. The
/// kernel re-checks each sequence's device offsets against the problem's totals and maxima
/// and skips a sequence that breaks them, so a stale table gives wrong (or unwritten) rows,
/// never a read or write out of bounds.
///
/// ```
/// use attnkit::{flash::{self, VarlenAttention}, Device};
/// let cu_q = [0, 3, 3, 8];
/// let cu_k = [0, 4, 6, 14];
/// let a = VarlenAttention::new(&cu_q, &cu_k, 1, 1, 32);
/// let q = vec![0.1f32; a.o_len()];
/// let kv = vec![0.2f32; 14 * 32];
/// let mut o = vec![f32::NAN; a.o_len()];
/// let mut lse = vec![f32::NAN; a.lse_len()];
/// flash::forward_varlen(&Device::cpu(), &a, (&q).into(), (&kv).into(), (&kv).into(),
///     cu_q[..].into(), cu_k[..].into(), (&mut o).into(), (&mut lse).into())?;
/// assert!((o[0] - 0.2).abs() < 1e-6);
/// # Ok::<(), attnkit::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen<T: Element>(
    dev: &Device,
    attn: &VarlenAttention<'_>,
    q: Buf<'_, T>,
    k: Buf<'_, T>,
    v: Buf<'_, T>,
    cu_seqlens_q: Buf<'_, i32>,
    cu_seqlens_k: Buf<'_, i32>,
    o: BufMut<'_, T>,
    lse: BufMut<'_, f32>,
) -> Result<()> {
    forward_varlen_with(
        dev,
        attn,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        o,
        lse,
        Extras::default(),
    )
}

/// [`forward_varlen`] with [`Extras`] (the entropy output in the LSE's `[heads_q, total_q]`
/// layout; a block mask indexed from each sequence's first row and key).
///
/// ```
/// use attnkit::{flash::{self, VarlenAttention, Extras}, Device};
/// let cu = [0, 4, 10];
/// let a = VarlenAttention::new(&cu, &cu, 1, 1, 32).causal(true);
/// let x = vec![0.5f32; a.o_len()];
/// let (mut o, mut lse, mut ent) = (vec![f32::NAN; a.o_len()], vec![f32::NAN; 10], vec![f32::NAN; 10]);
/// let extras = Extras { entropy: Some((&mut ent).into()), ..Default::default() };
/// flash::forward_varlen_with(&Device::cpu(), &a, (&x).into(), (&x).into(), (&x).into(),
///     cu[..].into(), cu[..].into(), (&mut o).into(), (&mut lse).into(), extras)?;
/// assert!((ent[4 + 5] - 6f32.ln()).abs() < 1e-5); // second sequence, row 5: six equal keys
/// # Ok::<(), attnkit::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen_with<T: Element>(
    dev: &Device,
    attn: &VarlenAttention<'_>,
    q: Buf<'_, T>,
    k: Buf<'_, T>,
    v: Buf<'_, T>,
    cu_seqlens_q: Buf<'_, i32>,
    cu_seqlens_k: Buf<'_, i32>,
    o: BufMut<'_, T>,
    lse: BufMut<'_, f32>,
    extras: Extras<'_>,
) -> Result<()> {
    let p = varlen_problem(attn, cu_seqlens_q.len(), cu_seqlens_k.len())?;
    run(
        dev,
        &p,
        q,
        k,
        v,
        Some((cu_seqlens_q, cu_seqlens_k)),
        o,
        lse,
        extras,
    )
}

/// The problem of a fixed-length call, every size bounded before any product is formed.
fn fixed_problem(attn: &Attention) -> Result<Problem<'static>> {
    // Every size is bounded before any product of them is formed.
    check_sizes(&[
        ("batch", attn.batch),
        ("seq_q", attn.seq_q),
        ("seq_k", attn.seq_k),
        ("heads_q", attn.heads_q),
        ("heads_kv", attn.heads_kv),
    ])?;
    let total_q = checked_total("total_q", attn.batch, attn.seq_q)?;
    let total_k = checked_total("total_k", attn.batch, attn.seq_k)?;
    Ok(Problem {
        batch: attn.batch,
        seq_q: attn.seq_q,
        seq_k: attn.seq_k,
        heads_q: attn.heads_q,
        heads_kv: attn.heads_kv,
        d: attn.head_dim,
        opts: attn.opts,
        scale: attn.softmax_scale(),
        q: attn.q_strides,
        k: attn.k_strides,
        v: attn.v_strides,
        o: attn.o_strides,
        lse_batch: attn.heads_q * attn.seq_q,
        lse_head: attn.seq_q,
        varlen: false,
        cu: None,
        total_q,
        total_k,
    })
}

/// The problem of a varlen call (its offsets' buffers hold `cu_q_len` and `cu_k_len`
/// entries), every size bounded before any product is formed.
fn varlen_problem<'a>(
    attn: &VarlenAttention<'a>,
    cu_q_len: usize,
    cu_k_len: usize,
) -> Result<Problem<'a>> {
    let (batch, seq_q, seq_k, total_q, total_k, host) = match attn.offsets {
        Offsets::Host { q: cq, k: ck } => {
            if cq.len() < 2 {
                return Err(Error::Shape {
                    arg: "cu_seqlens_q",
                    detail: "needs at least 2 offsets (one sequence)".into(),
                });
            }
            check_sizes(&[("batch", cq.len() - 1)])?;
            if ck.len() != cq.len() {
                return Err(Error::Shape {
                    arg: "cu_seqlens_k",
                    detail: format!("has {} offsets, cu_seqlens_q has {}", ck.len(), cq.len()),
                });
            }
            let seq_q = check_offsets("cu_seqlens_q", cq)?;
            let seq_k = check_offsets("cu_seqlens_k", ck)?;
            let total_k = ck.last().map_or(0, |&x| x as usize);
            (
                cq.len() - 1,
                seq_q,
                seq_k,
                attn.total_q(),
                total_k,
                Some((cq, ck)),
            )
        }
        Offsets::Device(d) => {
            check_sizes(&[
                ("batch", d.batch),
                ("max_seqlen_q", d.max_seqlen_q),
                ("max_seqlen_k", d.max_seqlen_k.max(1)),
            ])?;
            (
                d.batch,
                d.max_seqlen_q,
                d.max_seqlen_k,
                d.total_q,
                d.total_k,
                None,
            )
        }
    };
    for (arg, len) in [("cu_seqlens_q", cu_q_len), ("cu_seqlens_k", cu_k_len)] {
        if len != batch + 1 {
            return Err(Error::Shape {
                arg,
                detail: format!("holds {len} offsets, the problem has {}", batch + 1),
            });
        }
    }
    if total_q == 0 {
        return Err(Error::Shape {
            arg: "cu_seqlens_q",
            detail: "every sequence is empty".into(),
        });
    }
    check_sizes(&[
        ("total_q", total_q),
        ("total_k", total_k),
        ("heads_q", attn.heads_q),
        ("heads_kv", attn.heads_kv),
    ])?;
    Ok(Problem {
        batch,
        seq_q,
        seq_k,
        heads_q: attn.heads_q,
        heads_kv: attn.heads_kv,
        d: attn.head_dim,
        opts: attn.opts,
        scale: attn.softmax_scale(),
        q: attn.q_strides,
        k: attn.k_strides,
        v: attn.v_strides,
        o: attn.o_strides,
        lse_batch: 0,
        lse_head: total_q,
        varlen: true,
        cu: host,
        total_q,
        total_k,
    })
}

/// On the CPU: the optional inputs' host slices, the sink logits' and slopes' values checked.
fn host_inputs<'e>(extras: &'e Extras<'_>) -> Result<cpu::HostInputs<'e>> {
    let sinks = extras
        .sink_logits
        .as_ref()
        .map(|b| b.host("sink_logits"))
        .transpose()?;
    if let Some(s) = sinks {
        checks::check_sink_values(s)?;
    }
    let alibi = extras
        .alibi_slopes
        .as_ref()
        .map(|b| b.host("alibi_slopes"))
        .transpose()?;
    if let Some(a) = alibi {
        checks::check_alibi_values(a)?;
    }
    let mask = match &extras.block_mask {
        Some(m) => Some((m.mask.host("block_mask")?, m.block_q, m.block_k)),
        None => None,
    };
    Ok(cpu::HostInputs { sinks, alibi, mask })
}

/// On the CPU: `p` with the offsets' host buffers checked against its host copies, or (device-only
/// offsets, here host buffers) against the sizes the caller gave and then used as them.
fn host_offsets<'a>(
    p: &Problem<'a>,
    cu: Option<&'a (Buf<'a, i32>, Buf<'a, i32>)>,
) -> Result<Problem<'a>> {
    let mut p = p.clone();
    if let Some((cq, ck)) = cu {
        let (cq, ck) = (cq.host("cu_seqlens_q")?, ck.host("cu_seqlens_k")?);
        match p.cu {
            Some((pq, pk)) => {
                checks::check_offset_buffers(pq, cq, "cu_seqlens_q")?;
                checks::check_offset_buffers(pk, ck, "cu_seqlens_k")?;
            }
            None => {
                checks::check_device_offsets(cq, "cu_seqlens_q", p.seq_q, p.total_q)?;
                checks::check_device_offsets(ck, "cu_seqlens_k", p.seq_k, p.total_k)?;
                p.cu = Some((cq, ck));
            }
        }
    }
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn run<T: Element>(
    dev: &Device,
    p: &Problem<'_>,
    q: Buf<'_, T>,
    k: Buf<'_, T>,
    v: Buf<'_, T>,
    cu: Option<(Buf<'_, i32>, Buf<'_, i32>)>,
    mut o: BufMut<'_, T>,
    mut lse: BufMut<'_, f32>,
    mut extras: Extras<'_>,
) -> Result<()> {
    check(p, q.len(), k.len(), v.len(), o.len(), lse.len())?;
    check_extras(p, &extras)?;
    match &dev.backend {
        Backend::Cpu { threads } => {
            let p = &host_offsets(p, cu.as_ref())?;
            let (q, k, v) = (q.host("q")?, k.host("k")?, v.host("v")?);
            // The output taken out first: the inputs borrow the rest of `extras`.
            let mut entropy = extras.entropy.take();
            let inputs = host_inputs(&extras)?;
            let entropy = entropy
                .as_mut()
                .map(|b| b.host_mut("entropy"))
                .transpose()?;
            let lse = lse.host_mut("lse")?;
            let out = cpu::Outputs {
                o: o.host_mut("o")?,
                lse,
                entropy,
            };
            cpu::forward(*threads, p, q, k, v, inputs, out);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => {
            cuda::forward(c, p, &q, &k, &v, cu.as_ref(), &mut o, &mut lse, &mut extras)
        }
    }
}
