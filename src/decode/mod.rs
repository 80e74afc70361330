//! Decode attention: `seq_q` (1 to [`MAX_SEQ_Q`]) new tokens per sequence against a KV cache,
//! the call an inference server makes once per generated token.
//!
//! The cache is one of three [`Layout`]s: contiguous `[batch, capacity, heads_kv, head_dim]`,
//! paged (fixed pages of `page_size` tokens and a per-sequence block table, as vLLM and
//! FlashAttention's `flash_attn_with_kvcache` take it), or a StreamingLLM rolling cache
//! ([`RollingCache`]: the first `n_sink` tokens plus a ring of the last `window`, keys stored
//! before RoPE and rotated on the fly with their positions inside the cache). Every layout is
//! read through one map from a *logical* key index `j` (0 = oldest kept token) to a physical
//! row, so attention, the causal mask and RoPE only ever see logical positions.
//!
//! Semantics: sequence `b` holds `cache_seqlens[b]` keys, the new tokens' among them (the last
//! `seq_q`, after [`append`]). Query `i` sees keys `j <= i + cache_seqlens[b] - seq_q`
//! (bottom-right causal, as [`crate::flash`]); a row that sees no key gets `O = 0` and
//! `LSE = -inf`. The query heads of one KV head (GQA) are processed together, so each K/V
//! element is read once per KV head.
//!
//! Data flow: [`forward`] checks every argument, picks the split count ([`num_splits`]), then
//! runs the CPU implementation (`cpu.rs`) or the CUDA kernels (`kernels/decode.cu`). Both cut
//! each sequence's keys into `splits` chunks of [`Decode::keys_per_split`] keys, compute a
//! partial output and LSE per chunk into the caller's workspace, and combine the partials
//! exactly through their LSEs. Nothing is allocated on the device, nothing synchronises.
//!
//! Tables: the host holds copies of the lengths, block table and ring offsets ([`Decode::new`])
//! for its checks and the split sizing, or only their sizes and a bound on the lengths
//! ([`Decode::with_device_tables`]: a server's step then copies nothing to the host, and the
//! kernels' re-checks turn a stale table into empty sequences, never an access out of bounds).

mod checks;
mod cpu;
#[cfg(attnkit_cuda)]
mod cuda;
mod layout;
pub mod oracle;
mod rolling;

pub use layout::{Layout, Rope, RopeStyle, SeqLens};
pub use rolling::RollingCache;

use crate::buffer::{Buf, BufMut};
use crate::device::{Backend, Device};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::flash::Strides;
pub(crate) use checks::Problem;
use checks::{check, check_append_pages, check_cache, check_tables, host_tables};

/// The most new tokens per sequence a call takes (more is a prefill: use [`crate::flash`]).
pub const MAX_SEQ_Q: usize = 16;

/// The most sequences a call takes (a CUDA grid dimension); also [`RollingCache::new`]'s
/// limit.
pub const MAX_BATCH: usize = 65535;

/// The most query heads a call takes (a CUDA grid dimension).
pub const MAX_HEADS: usize = 65535;

/// The most keys one sequence's cache may hold (and the largest page): 2^30, so that the
/// kernels' int32 key indices can run a tile (64 keys) past any key without wrapping.
pub const MAX_CAPACITY: usize = 1 << 30;

/// The most key splits per sequence.
pub const MAX_SPLITS: usize = 64;

/// Head dimensions the kernels are built for (80 is Phi-2's, for one).
pub const HEAD_DIMS: [usize; 6] = [64, 80, 112, 128, 192, 256];

/// Keys per split are a multiple of this (the GPU's key tile), so that a split never starts
/// inside a tile.
pub const SPLIT_GRANULE: usize = 64;

/// The fewest keys the heuristic gives one split: 256 keys of head dim 128 in bf16 are 128 KiB
/// of K and V, enough to amortise a block's prologue and the combine's extra traffic.
const MIN_KEYS_PER_SPLIT: usize = 256;

/// Query rows one GPU block computes (one m16 tensor-core tile); more rows (`seq_q * group`)
/// take more blocks, which read the same K/V tiles at the same time (served by L2).
pub const ROWS_PER_BLOCK: usize = 16;

/// A decode problem: shapes, cache layout and per-sequence lengths (host copies, for checks
/// and launch sizing, or only their bound: [`Decode::with_device_tables`]), options.
///
/// ```
/// use attnkit::decode::{Decode, Layout};
/// let lens = [100, 7];
/// let p = Decode::new(&lens, 1, 32, 8, 128, Layout::Contiguous { capacity: 4096 });
/// assert_eq!(p.batch(), 2);
/// assert_eq!(p.o_len(), 2 * 32 * 128);
/// ```
#[derive(Clone, Debug)]
pub struct Decode<'a> {
    /// Keys in each sequence's cache, the new tokens' included: a host copy of the `[batch]`
    /// lengths, or only the batch and a bound ([`SeqLens::Device`]).
    pub cache_seqlens: SeqLens<'a>,
    /// New tokens (query rows) per sequence, 1 to [`MAX_SEQ_Q`].
    pub seq_q: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (`heads_q % heads_kv == 0`).
    pub heads_kv: usize,
    /// Head dimension, one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// The cache layout.
    pub layout: Layout<'a>,
    /// Bottom-right causal mask among the new tokens (default true).
    pub causal: bool,
    /// Sliding window (as [`crate::flash`]'s left bound): a new token at position `t` sees keys
    /// `j >= t - window_left`; `None` sees the whole cache. Tiles left of every row's window
    /// are never read. (A rolling cache is its own window: not both.)
    pub window_left: Option<usize>,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Logit soft-capping (Gemma 2): with `Some(c)` each logit is `c * tanh(scale * q·k / c)`
    /// (then the ALiBi term of [`Tables::alibi_slopes`], if any); `None` leaves
    /// `scale * q·k`. `c` must be finite, normal and > 0 (Gemma 2 uses 50).
    pub softcap: Option<f32>,
    /// Key splits per sequence, 1 to [`MAX_SPLITS`]; `None` lets [`num_splits`] choose.
    pub num_splits: Option<usize>,
    /// Strides of q `[batch, seq_q, heads_q, head_dim]` (default contiguous).
    pub q_strides: Strides,
    /// Strides of o, like q. Must not overlap itself.
    pub o_strides: Strides,
    /// Strides of the K cache (`batch`: between sequences, or pages when paged).
    pub k_strides: Strides,
    /// Strides of the V cache.
    pub v_strides: Strides,
}

impl<'a> Decode<'a> {
    /// A causal problem with contiguous tensors and the default scale; the batch is
    /// `cache_seqlens.len()`. Never fails: the strides saturate at `usize::MAX` for sizes
    /// past any buffer, and [`forward`] / [`append`] then reject the problem.
    ///
    /// ```
    /// use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[5], 2, 4, 1, 64, Layout::Contiguous { capacity: 16 });
    /// assert!(p.causal && p.k_strides.row == 64);
    /// ```
    pub fn new(
        cache_seqlens: &'a [i32],
        seq_q: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        layout: Layout<'a>,
    ) -> Self {
        let rows = match &layout {
            Layout::Contiguous { capacity } => *capacity,
            Layout::Paged { page_size, .. } => *page_size,
            Layout::Rolling { n_sink, window, .. } => n_sink.saturating_add(*window),
        };
        let kv = contiguous(rows, heads_kv, head_dim);
        Decode {
            cache_seqlens: SeqLens::Host(cache_seqlens),
            seq_q,
            heads_q,
            heads_kv,
            head_dim,
            layout,
            causal: true,
            window_left: None,
            scale: None,
            softcap: None,
            num_splits: None,
            q_strides: contiguous(seq_q, heads_q, head_dim),
            o_strides: contiguous(seq_q, heads_q, head_dim),
            k_strides: kv,
            v_strides: kv,
        }
    }

    /// A problem whose per-sequence tables stay on the device: the host gives the `batch` and
    /// `max_len`, at least the longest cache (it sizes the splits: [`Decode::keys_per_split`]),
    /// instead of the lengths, and usually a layout without its host table
    /// (`Layout::Paged { block_table: None, .. }`, [`RollingCache::device_layout`]). A
    /// server's step then copies nothing to the host. Otherwise as [`Decode::new`].
    ///
    /// What is checked: on the CPU the [`Tables`] buffers are host buffers, so the call reads
    /// them and checks them exactly as host copies are checked (a typed error naming
    /// `cache_seqlens`, `block_table` or `ring_offsets`; a length over `max_len` is one too).
    /// On a GPU the host reads nothing (no device-to-host copy, no synchronisation): the
    /// kernels re-check every length against the capacity and what the splits cover
    /// (`max_len` rounded up to the split granule), every page against `num_pages` and every
    /// ring offset against the window, and a sequence that fails reads as empty (`O = 0`,
    /// `LSE = -inf`; [`append`] writes none of its rows), never out of bounds. What the host
    /// cannot check without the tables is the caller's promise on a GPU: that an
    /// [`append`] writes no page that another slot also maps (else the two writes race,
    /// each still in bounds).
    ///
    /// ```
    /// use attnkit::decode::{Decode, Layout, SeqLens};
    /// let paged = Layout::Paged { page_size: 16, num_pages: 64, block_table: None, pages_per_seq: 8 };
    /// let p = Decode::with_device_tables(4, 100, 1, 8, 2, 128, paged);
    /// assert_eq!(p.batch(), 4);
    /// assert!(matches!(p.cache_seqlens, SeqLens::Device { max_len: 100, .. }));
    /// assert_eq!(p.keys_per_split(1), 128);
    /// ```
    pub fn with_device_tables(
        batch: usize,
        max_len: usize,
        seq_q: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        layout: Layout<'a>,
    ) -> Self {
        let mut p = Decode::new(&[], seq_q, heads_q, heads_kv, head_dim, layout);
        p.cache_seqlens = SeqLens::Device { batch, max_len };
        p
    }

    /// Sets the causal mask among the new tokens.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[5], 2, 1, 1, 64, Layout::Contiguous { capacity: 8 }).causal(false);
    /// assert!(!p.causal);
    /// ```
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets a sliding window: each new token sees the `left` keys before it and itself
    /// (gpt-oss's sliding layers use 128, with learned sinks in [`Tables::sink_logits`]).
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[500], 1, 1, 1, 64, Layout::Contiguous { capacity: 512 }).window(Some(127));
    /// assert_eq!(p.window_left, Some(127));
    /// ```
    pub fn window(mut self, left: Option<usize>) -> Self {
        self.window_left = left;
        self
    }

    /// Sets the softmax scale (default `1 / sqrt(head_dim)`).
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[5], 1, 1, 1, 64, Layout::Contiguous { capacity: 8 }).scale(0.5);
    /// assert_eq!(p.softmax_scale(), 0.5);
    /// ```
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Caps the logits softly at `cap` (Gemma 2): `cap * tanh(scale * q·k / cap)`; see
    /// [`Decode::softcap`](Decode#structfield.softcap). `cap` must be finite, normal and > 0,
    /// else the call is a typed error naming `softcap`.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[5], 1, 1, 1, 64, Layout::Contiguous { capacity: 8 }).softcap(50.0);
    /// assert_eq!(p.softcap, Some(50.0));
    /// ```
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Forces the number of key splits (else [`num_splits`] chooses).
    ///
    /// ```
    /// # use attnkit::{Device, decode::{Decode, Layout}};
    /// let p = Decode::new(&[500], 1, 1, 1, 64, Layout::Contiguous { capacity: 512 }).splits(3);
    /// assert_eq!(p.splits_for(&Device::cpu()), 3);
    /// ```
    pub fn splits(mut self, n: usize) -> Self {
        self.num_splits = Some(n);
        self
    }

    /// Sequences in the batch.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// assert_eq!(Decode::new(&[1, 2, 3], 1, 1, 1, 64, Layout::Contiguous { capacity: 8 }).batch(), 3);
    /// ```
    pub fn batch(&self) -> usize {
        match self.cache_seqlens {
            SeqLens::Host(l) => l.len(),
            SeqLens::Device { batch, .. } => batch,
        }
    }

    /// The scale applied to `Q K^T`.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// assert_eq!(Decode::new(&[1], 1, 1, 1, 64, Layout::Contiguous { capacity: 8 }).softmax_scale(), 0.125);
    /// ```
    pub fn softmax_scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// Elements of a contiguous q or o, `batch * seq_q * heads_q * head_dim`; saturates at
    /// `usize::MAX` (the call then rejects the problem).
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// assert_eq!(Decode::new(&[1, 1], 3, 2, 1, 64, Layout::Contiguous { capacity: 8 }).o_len(), 2 * 3 * 2 * 64);
    /// ```
    pub fn o_len(&self) -> usize {
        product(&[self.batch(), self.seq_q, self.heads_q, self.head_dim])
    }

    /// Elements of the LSE output, `[batch, heads_q, seq_q]`; saturates at `usize::MAX`.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// assert_eq!(Decode::new(&[1, 1], 3, 2, 1, 64, Layout::Contiguous { capacity: 8 }).lse_len(), 12);
    /// ```
    pub fn lse_len(&self) -> usize {
        product(&[self.batch(), self.heads_q, self.seq_q])
    }

    /// Elements of the new tokens' K (or V) for [`append`], `[batch, seq_q, heads_kv, head_dim]`;
    /// saturates at `usize::MAX`.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// assert_eq!(Decode::new(&[4], 2, 8, 2, 64, Layout::Contiguous { capacity: 8 }).new_kv_len(), 2 * 2 * 64);
    /// ```
    pub fn new_kv_len(&self) -> usize {
        product(&[self.batch(), self.seq_q, self.heads_kv, self.head_dim])
    }

    /// Tokens one sequence's cache can hold; saturates at `usize::MAX` (over
    /// [`MAX_CAPACITY`], which the call rejects).
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let l = Layout::Paged { page_size: 16, num_pages: 9, block_table: Some(&[0, 1, 2]), pages_per_seq: 3 };
    /// assert_eq!(Decode::new(&[4], 1, 1, 1, 64, l).capacity(), 48);
    /// ```
    pub fn capacity(&self) -> usize {
        match &self.layout {
            Layout::Contiguous { capacity } => *capacity,
            Layout::Paged {
                page_size,
                pages_per_seq,
                ..
            } => page_size.saturating_mul(*pages_per_seq),
            Layout::Rolling { n_sink, window, .. } => n_sink.saturating_add(*window),
        }
    }

    /// The longest cache in the batch (host lengths), or the declared bound.
    fn max_len(&self) -> usize {
        match self.cache_seqlens {
            SeqLens::Host(l) => l.iter().map(|&l| l.max(0) as usize).max().unwrap_or(0),
            SeqLens::Device { max_len, .. } => max_len,
        }
    }

    /// Query rows per KV head: `seq_q * heads_q / heads_kv`.
    fn rows(&self) -> usize {
        self.seq_q
            .saturating_mul(self.heads_q / self.heads_kv.max(1))
    }

    /// The split count a call on `dev` uses: [`Decode::num_splits`] if set, else the heuristic
    /// ([`num_splits`]) with `dev`'s SM count (CPU: its thread count).
    ///
    /// ```
    /// # use attnkit::{Device, decode::{Decode, Layout}};
    /// let lens = [100_000];
    /// let p = Decode::new(&lens, 1, 8, 1, 128, Layout::Contiguous { capacity: 131072 });
    /// assert!(p.splits_for(&Device::cpu_with_threads(16).unwrap()) > 1);
    /// ```
    pub fn splits_for(&self, dev: &Device) -> usize {
        if let Some(n) = self.num_splits {
            return n;
        }
        let units = match &dev.backend {
            Backend::Cpu { threads } => *threads,
            #[cfg(attnkit_cuda)]
            Backend::Cuda(c) => c.sm_count as usize,
        };
        num_splits(
            self.batch(),
            self.heads_kv,
            self.rows().div_ceil(ROWS_PER_BLOCK),
            self.max_len(),
            units,
        )
    }

    /// Keys per split for `splits` splits: the longest cache (or [`SeqLens::Device`]'s
    /// `max_len`) cut in `splits`, rounded up to
    /// [`SPLIT_GRANULE`]. Split `s` of every sequence covers keys
    /// `s * keys_per_split .. (s + 1) * keys_per_split`.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout};
    /// let p = Decode::new(&[1000, 10], 1, 1, 1, 64, Layout::Contiguous { capacity: 1024 });
    /// assert_eq!(p.keys_per_split(4), 256);
    /// ```
    pub fn keys_per_split(&self, splits: usize) -> usize {
        let per = self.max_len().div_ceil(splits.max(1)).max(1);
        per.div_ceil(SPLIT_GRANULE).saturating_mul(SPLIT_GRANULE)
    }

    /// Elements (f32) of the workspace a call on `dev` needs for its partial results:
    /// `splits * batch * heads_q * seq_q * (head_dim + 1)`, or 0 with one split. Saturates at
    /// `usize::MAX` for a problem no call accepts; [`Decode::checked_workspace_len`] checks
    /// the problem first and says what is wrong instead.
    ///
    /// ```
    /// # use attnkit::{Device, decode::{Decode, Layout}};
    /// let p = Decode::new(&[300], 1, 2, 1, 64, Layout::Contiguous { capacity: 512 }).splits(2);
    /// assert_eq!(p.workspace_len(&Device::cpu()), 2 * 2 * 65);
    /// ```
    pub fn workspace_len(&self, dev: &Device) -> usize {
        workspace_len(
            self.batch(),
            self.seq_q,
            self.heads_q,
            self.head_dim,
            self.splits_for(dev),
        )
    }

    /// The workspace [`forward`] on `dev` needs (f32 elements, exactly), after every check
    /// of the problem that [`forward`] makes without its buffers: a problem it would reject
    /// is the same typed error here, before anything is allocated for it.
    ///
    /// ```
    /// # use attnkit::{Device, decode::{Decode, Layout}};
    /// let p = Decode::new(&[300], 1, 2, 1, 64, Layout::Contiguous { capacity: 512 }).splits(2);
    /// assert_eq!(p.checked_workspace_len(&Device::cpu())?, 2 * 2 * 65);
    /// let bad = Decode::new(&[300], 1, 1 << 40, 1, 64, Layout::Contiguous { capacity: 512 });
    /// assert_eq!(bad.checked_workspace_len(&Device::cpu()).unwrap_err().arg(), Some("heads_q"));
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn checked_workspace_len(&self, dev: &Device) -> Result<usize> {
        let pr = check(dev, self)?;
        Ok(workspace_len(
            pr.batch, pr.seq_q, pr.heads_q, pr.d, pr.splits,
        ))
    }
}

/// `[seq, heads, head_dim]` contiguous strides, saturating (a problem that big is rejected by
/// the call's checks; `Decode::new` itself never fails).
fn contiguous(seq: usize, heads: usize, head_dim: usize) -> Strides {
    let row = heads.saturating_mul(head_dim);
    Strides {
        batch: seq.saturating_mul(row),
        row,
        head: head_dim,
        dim: 1,
    }
}

/// The product of sizes, saturating at `usize::MAX`.
fn product(xs: &[usize]) -> usize {
    xs.iter().fold(1usize, |a, &x| a.saturating_mul(x))
}

/// Elements (f32) of the workspace for `splits` key splits: partial outputs
/// `[splits, batch, heads_q, seq_q, head_dim]` then partial LSEs `[splits, batch, heads_q,
/// seq_q]`; 0 for one split (the kernel then writes `o` directly). Saturates on overflow (the
/// call's checks then reject the problem).
///
/// ```
/// assert_eq!(attnkit::decode::workspace_len(2, 1, 8, 128, 1), 0);
/// assert_eq!(attnkit::decode::workspace_len(2, 1, 8, 128, 4), 4 * 2 * 8 * 129);
/// ```
pub fn workspace_len(
    batch: usize,
    seq_q: usize,
    heads_q: usize,
    head_dim: usize,
    splits: usize,
) -> usize {
    if splits <= 1 {
        return 0;
    }
    [batch, seq_q, heads_q, head_dim.saturating_add(1)]
        .iter()
        .fold(splits, |acc, &x| acc.saturating_mul(x))
}

/// How many splits to cut each sequence's keys into, the heuristic:
///
/// - `blocks = batch * heads_kv * row_blocks` thread blocks run without splitting. If they
///   already fill the machine twice (`2 * sms`; a 4-warp block cannot saturate an SM's memory
///   pipe alone, two can), splitting only adds combine traffic: 1.
/// - Otherwise split until about `2 * sms` blocks run, but give no split fewer than 256 keys
///   (below that the prologue and the partials' round trip cost more than they win), and at
///   most [`MAX_SPLITS`].
///
/// ```
/// use attnkit::decode::num_splits;
/// assert_eq!(num_splits(64, 8, 1, 4096, 132), 1);      // 512 blocks: enough
/// assert_eq!(num_splits(1, 8, 1, 131072, 132), 33);    // 8 blocks: split the 128k keys
/// assert_eq!(num_splits(1, 8, 1, 300, 132), 2);        // but not below 256 keys a split
/// ```
pub fn num_splits(
    batch: usize,
    heads_kv: usize,
    row_blocks: usize,
    max_cache_len: usize,
    sms: usize,
) -> usize {
    let blocks = batch
        .saturating_mul(heads_kv)
        .saturating_mul(row_blocks)
        .max(1);
    let target = sms.max(1).saturating_mul(2);
    if blocks >= target {
        return 1;
    }
    let by_fill = target.div_ceil(blocks);
    let by_keys = max_cache_len.div_ceil(MIN_KEYS_PER_SPLIT).max(1);
    by_fill.min(by_keys).clamp(1, MAX_SPLITS)
}

/// The per-sequence index arrays where the call runs: host slices on the CPU (the same as the
/// problem's host copies, where it has them), device copies on a GPU. The kernels re-check
/// the device copies' bounds, so a stale copy cannot read or write out of bounds.
///
/// ```
/// use attnkit::decode::{Decode, Layout, Tables};
/// let lens = [3];
/// let p = Decode::new(&lens, 1, 1, 1, 64, Layout::Contiguous { capacity: 8 });
/// let t = Tables::host(&p);
/// assert!(t.block_table.is_none());
/// ```
#[derive(Debug)]
pub struct Tables<'a> {
    /// `cache_seqlens`, `[batch]`.
    pub cache_seqlens: Buf<'a, i32>,
    /// The paged layout's block table, `[batch, pages_per_seq]`.
    pub block_table: Option<Buf<'a, i32>>,
    /// The rolling layout's ring offsets, `[batch]`.
    pub ring_offsets: Option<Buf<'a, i32>>,
    /// Learned per-head sink logits, `[heads_q]` f32 (gpt-oss): each row's softmax gains
    /// `exp(sink - m)` in its denominator, with no value vector, and the LSE includes it.
    /// Read by [`forward`]; [`append`] ignores it.
    pub sink_logits: Option<Buf<'a, f32>>,
    /// ALiBi slopes, `[heads_q]` f32 (natural units): query token `i` of sequence `b`, at
    /// position `pos_i = cache_seqlens[b] - seq_q + i` (as for the causal mask; negative when
    /// the cache holds fewer keys than new tokens), and key `j` (logical position `j`, 0 =
    /// oldest kept) get `logit -= alibi_slopes[h] * |pos_i - j|` for query head `h`, after the
    /// softcap. On the CPU a NaN or infinite slope, or one whose bias could overflow f32
    /// within the capacity, is a typed error naming `alibi_slopes`; on a GPU the host does not
    /// read device buffers (no synchronisation), and such a slope makes its rows NaN or
    /// empty. Read by [`forward`]; [`append`] ignores it.
    ///
    /// ```
    /// use attnkit::decode::{Decode, Layout, Tables};
    /// let p = Decode::new(&[3], 1, 2, 1, 64, Layout::Contiguous { capacity: 8 });
    /// let slopes = [0.5f32, 0.25];
    /// let t = Tables { alibi_slopes: Some(slopes[..].into()), ..Tables::host(&p) };
    /// assert_eq!(t.alibi_slopes.map(|s| s.len()), Some(2));
    /// ```
    pub alibi_slopes: Option<Buf<'a, f32>>,
}

impl<'a> Tables<'a> {
    /// The problem's own host slices, for a CPU call. A table the problem has no host copy of
    /// ([`Decode::with_device_tables`]) comes out empty, which the call rejects: pass the
    /// buffers themselves then.
    ///
    /// ```
    /// # use attnkit::decode::{Decode, Layout, Tables};
    /// let p = Decode::new(&[3, 4], 1, 1, 1, 64, Layout::Contiguous { capacity: 8 });
    /// assert_eq!(Tables::host(&p).cache_seqlens.len(), 2);
    /// ```
    pub fn host(p: &Decode<'a>) -> Tables<'a> {
        let (block_table, ring_offsets) = match &p.layout {
            Layout::Contiguous { .. } => (None, None),
            Layout::Paged { block_table, .. } => {
                (Some(Buf::Host(block_table.unwrap_or(&[]))), None)
            }
            Layout::Rolling { ring_offsets, .. } => {
                (None, Some(Buf::Host(ring_offsets.unwrap_or(&[]))))
            }
        };
        let lens = match p.cache_seqlens {
            SeqLens::Host(l) => l,
            SeqLens::Device { .. } => &[],
        };
        Tables {
            cache_seqlens: Buf::Host(lens),
            block_table,
            ring_offsets,
            sink_logits: None,
            alibi_slopes: None,
        }
    }
}

/// Runs decode attention: `o = softmax(logits + mask) v` and `lse` (log-sum-exp of the
/// logits) for `seq_q` new tokens per sequence against the cache described by `p`, on `dev`'s
/// backend. The logits are `scale * q k^T`, soft-capped with [`Decode::softcap`] and biased
/// with [`Tables::alibi_slopes`] when those are set; [`Tables::sink_logits`] add one logit per
/// row without a value.
///
/// `q`, `o`: `[batch, seq_q, heads_q, head_dim]` (strides in `p`); `k_cache`, `v_cache`: per
/// `p.layout`; `tables`: the index arrays where the call runs ([`Tables::host`] on the CPU);
/// `workspace`: at least [`Decode::workspace_len`] f32s where the call runs (its contents are
/// scratch; [`Decode::checked_workspace_len`] checks the problem first); `lse`: contiguous
/// `[batch, heads_q, seq_q]`. Every argument is checked first; nothing is written on error.
/// Buffers may be longer than they need to be.
///
/// The tables: on the CPU, [`Tables`]' host buffers must hold what the problem's host copies
/// say (`cache_seqlens`, `block_table`, `ring_offsets`; a difference is a typed error naming
/// the buffer), so both backends read one truth; a table without a host copy
/// ([`Decode::with_device_tables`]) is read from its buffer and checked as a host copy is. On
/// a GPU the device copies are not read back (no synchronisation): the kernels re-check every
/// length (against the capacity and what the splits cover), ring offset and page against the
/// checked capacity, window and page count, so a stale copy gives wrong numbers for its
/// sequence (a sequence that fails the re-check reads as empty: `O = 0`, `LSE = -inf`) but
/// never an access out of bounds. A NaN sink logit (or a NaN or infinite ALiBi slope) is
/// an error on the CPU; on a GPU it makes its rows NaN.
///
/// ```
/// use attnkit::{decode::{self, Decode, Layout, Tables}, Bf16, Device, Element};
/// let lens = [37, 5];
/// let p = Decode::new(&lens, 2, 8, 2, 64, Layout::Contiguous { capacity: 64 }).splits(2);
/// let dev = Device::cpu();
/// let q = vec![Bf16::from_f32(0.1); p.o_len()];
/// let kv = vec![Bf16::from_f32(0.2); 2 * 64 * 2 * 64];
/// let mut ws = vec![0f32; p.workspace_len(&dev)];
/// let mut o = vec![Bf16::nan(); p.o_len()];
/// let mut lse = vec![f32::NAN; p.lse_len()];
/// decode::forward(&dev, &p, (&q).into(), (&kv).into(), (&kv).into(), Tables::host(&p),
///     (&mut ws).into(), (&mut o).into(), (&mut lse).into())?;
/// assert!(o.iter().all(|x| (x.to_f32() - 0.2).abs() < 1e-2));
/// # Ok::<(), attnkit::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    q: Buf<'_, T>,
    k_cache: Buf<'_, T>,
    v_cache: Buf<'_, T>,
    tables: Tables<'_>,
    mut workspace: BufMut<'_, f32>,
    mut o: BufMut<'_, T>,
    mut lse: BufMut<'_, f32>,
) -> Result<()> {
    let pr = check(dev, p)?;
    check_tables(&pr, &tables)?;
    crate::flash::check_strides(
        "q",
        &pr.q,
        [pr.batch, pr.seq_q, pr.heads_q, pr.d],
        q.len(),
        false,
    )?;
    crate::flash::check_strides(
        "o",
        &pr.o,
        [pr.batch, pr.seq_q, pr.heads_q, pr.d],
        o.len(),
        true,
    )?;
    check_cache(&pr, k_cache.len(), v_cache.len(), false)?;
    // Each factor was bounded by `check`: no overflow.
    let lse_need = pr.batch * pr.heads_q * pr.seq_q;
    if lse.len() < lse_need {
        return Err(Error::Shape {
            arg: "lse",
            detail: format!("holds {} elements, needs {lse_need}", lse.len()),
        });
    }
    let ws_need = workspace_len(pr.batch, pr.seq_q, pr.heads_q, pr.d, pr.splits);
    if workspace.len() < ws_need {
        return Err(Error::Shape {
            arg: "workspace",
            detail: format!(
                "holds {} f32s, {} splits need {ws_need} (Decode::workspace_len)",
                workspace.len(),
                pr.splits
            ),
        });
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            let (pr, extras) = host_tables(&pr, &tables)?;
            let (q, k, v) = (
                q.host("q")?,
                k_cache.host("k_cache")?,
                v_cache.host("v_cache")?,
            );
            let ws = workspace.host_mut("workspace")?;
            let lse = lse.host_mut("lse")?;
            cpu::forward(*threads, &pr, q, k, v, extras, ws, o.host_mut("o")?, lse);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::forward(
            c,
            &pr,
            &q,
            &k_cache,
            &v_cache,
            &tables,
            &mut workspace,
            &mut o,
            &mut lse,
        ),
    }
}

/// Writes the new tokens' keys and values into the cache in place: token `i` of sequence `b`
/// becomes logical key `cache_seqlens[b] - seq_q + i` (so `cache_seqlens` are the lengths
/// *after* the append, as [`forward`] takes them). `k_new`, `v_new`: contiguous
/// `[batch, seq_q, heads_kv, head_dim]`. Rolling caches store keys as given (before RoPE).
///
/// Errors: a length below `seq_q` or over the capacity, a block table entry out of range, a
/// page written here that another sequence (or another column) also uses (two writers of one
/// page would race on a GPU; reading shared pages, prefix sharing, is fine): typed errors
/// before anything is written. The tables follow [`forward`]'s rule (checked against the
/// problem on the CPU, re-checked by the kernel on a GPU). With device-only tables on a GPU
/// ([`Decode::with_device_tables`]) the host checks none of these: the kernel writes no row
/// of a sequence that fails its re-check, nor a token whose position is negative, and
/// unshared written pages are the caller's promise.
///
/// ```
/// use attnkit::{decode::{self, Decode, Layout, Tables}, Device};
/// let lens = [3];
/// let p = Decode::new(&lens, 1, 1, 1, 64, Layout::Contiguous { capacity: 4 });
/// let new = vec![1.0f32; 64];
/// let mut k = vec![0f32; 4 * 64];
/// let mut v = vec![0f32; 4 * 64];
/// decode::append(&Device::cpu(), &p, (&new).into(), (&new).into(), Tables::host(&p),
///     (&mut k).into(), (&mut v).into())?;
/// assert_eq!((k[2 * 64], k[3 * 64]), (1.0, 0.0));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn append<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    k_new: Buf<'_, T>,
    v_new: Buf<'_, T>,
    tables: Tables<'_>,
    k_cache: BufMut<'_, T>,
    v_cache: BufMut<'_, T>,
) -> Result<()> {
    append_rows(
        dev,
        p,
        Some((k_new, k_cache)),
        Some((v_new, v_cache)),
        tables,
    )
}

/// The cache [`append_one`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// The key cache (`p.k_strides`; errors name `k_new`, `k_cache`).
    Keys,
    /// The value cache (`p.v_strides`; errors name `v_new`, `v_cache`).
    Values,
}

/// [`append`] for one of the two caches: `new`'s rows into `cache`, with the same checks
/// (for that cache) and the same kernel. For stacks that lend one mutable buffer per call
/// (candle's in-place ops): a call for [`Cache::Keys`] and one for [`Cache::Values`] write
/// what one [`append`] writes.
///
/// ```
/// use attnkit::decode::{self, Cache, Decode, Layout, Tables};
/// let lens = [3];
/// let p = Decode::new(&lens, 1, 1, 1, 64, Layout::Contiguous { capacity: 4 });
/// let new = vec![2.0f32; 64];
/// let mut v = vec![0f32; 4 * 64];
/// decode::append_one(&attnkit::Device::cpu(), &p, Cache::Values, (&new).into(),
///     Tables::host(&p), (&mut v).into())?;
/// assert_eq!((v[2 * 64], v[3 * 64]), (2.0, 0.0));
/// # Ok::<(), attnkit::Error>(())
/// ```
pub fn append_one<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    which: Cache,
    new: Buf<'_, T>,
    tables: Tables<'_>,
    cache: BufMut<'_, T>,
) -> Result<()> {
    match which {
        Cache::Keys => append_rows(dev, p, Some((new, cache)), None, tables),
        Cache::Values => append_rows(dev, p, None, Some((new, cache)), tables),
    }
}

/// A cache's new rows and the cache they go to.
type Rows<'a, 'b, T> = Option<(Buf<'a, T>, BufMut<'b, T>)>;

/// [`Rows`] as host slices (errors naming the buffer that is not one).
fn host_rows<'s, T>(
    r: &'s mut Rows<'_, '_, T>,
    new_arg: &'static str,
    cache_arg: &'static str,
) -> Result<Option<(&'s [T], &'s mut [T])>> {
    match r {
        Some((new, cache)) => Ok(Some((new.host(new_arg)?, cache.host_mut(cache_arg)?))),
        None => Ok(None),
    }
}

fn append_rows<T: Element>(
    dev: &Device,
    p: &Decode<'_>,
    mut k: Rows<'_, '_, T>,
    mut v: Rows<'_, '_, T>,
    tables: Tables<'_>,
) -> Result<()> {
    let pr = check(dev, p)?;
    check_tables(&pr, &tables)?;
    // On the CPU the buffers are host slices: check every table the host copies lack too.
    let pr = match &dev.backend {
        Backend::Cpu { .. } => host_tables(&pr, &tables)?.0,
        #[cfg(attnkit_cuda)]
        Backend::Cuda(_) => pr,
    };
    for (b, &l) in pr.lens.unwrap_or_default().iter().enumerate() {
        if (l as usize) < pr.seq_q {
            return Err(Error::Value {
                arg: "cache_seqlens",
                detail: format!(
                    "sequence {b} has {l} keys after appending {} new tokens",
                    pr.seq_q
                ),
            });
        }
    }
    check_append_pages(&pr)?;
    let need = p.new_kv_len();
    let dims = [pr.cache_dims.0, pr.cache_dims.1, pr.heads_kv, pr.d];
    for (new_arg, cache_arg, strides, rows) in [
        ("k_new", "k_cache", &pr.k, &k),
        ("v_new", "v_cache", &pr.v, &v),
    ] {
        let Some((new, cache)) = rows else { continue };
        if new.len() < need {
            return Err(Error::Shape {
                arg: new_arg,
                detail: format!(
                    "holds {} elements, [batch, seq_q, heads_kv, head_dim] needs {need}",
                    new.len()
                ),
            });
        }
        crate::flash::check_strides(cache_arg, strides, dims, cache.len(), true)?;
    }
    match &dev.backend {
        Backend::Cpu { threads } => {
            let kh = host_rows(&mut k, "k_new", "k_cache")?;
            let vh = host_rows(&mut v, "v_new", "v_cache")?;
            cpu::append(*threads, &pr, kh, vh);
            Ok(())
        }
        #[cfg(attnkit_cuda)]
        Backend::Cuda(c) => cuda::append(c, &pr, &mut k, &mut v, &tables),
    }
}
