//! The options of a flash call: the score function, the mask and scale options shared by
//! both problem types ([`Options`] and its builders), block-sparse masks, and the optional
//! inputs and outputs ([`Extras`]).

use super::{Attention, VarlenAttention};
use crate::buffer::{Buf, BufMut};
use crate::error::{Error, Result};

/// The most blocks [`BlockMask::local_layout`] and [`BlockMask::strided_layout`] build
/// (`rows * cols`): 2^32 (4 GiB).
pub const MAX_MASK_BLOCKS: usize = 1 << 32;

/// The score function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Score {
    /// `softmax(scale * q k^T)`, with LSE.
    #[default]
    Softmax,
    /// GAU / FLASH: `relu(scale * q k^T)^2 / n`, no softmax (LSE is written as 0).
    Relu2(Relu2Norm),
}

/// The `n` relu² attention divides by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relu2Norm {
    /// The sequence's key count, as the FLASH paper does.
    SeqLen,
    /// The keys the row actually sees under its mask (the fix the seed discusses for length
    /// generalisation).
    Visible,
}

/// Mask, scale and score options, shared by [`Attention`] and [`VarlenAttention`].
///
/// Key `j` is visible to row `i` (with `diag = seq_k - seq_q`: bottom-right alignment) when
/// `j <= i + diag` if causal, `j <= i + diag + right` and `j >= i + diag - left` for a window
/// `(left, right)` (FlashAttention's definition; `None` is unbounded), except that the first
/// `sinks` keys are exempt from the left bound (StreamingLLM: `[0, n_sink) U (t - window, t]`
/// is `sinks(n_sink)` with `window(Some(window - 1), Some(0))`).
///
/// ```
/// use attnkit::flash::{Attention, Score, Relu2Norm};
/// let a = Attention::new(1, 4096, 4096, 8, 8, 64).causal(true).window(Some(1023), None).sinks(4);
/// assert_eq!(a.opts.window_left, Some(1023));
/// let g = Attention::new(1, 512, 512, 1, 1, 128).score(Score::Relu2(Relu2Norm::Visible));
/// assert_eq!(g.opts.score, Score::Relu2(Relu2Norm::Visible));
/// let gemma = Attention::new(1, 512, 512, 8, 4, 256).causal(true).softcap(50.0);
/// assert_eq!(gemma.opts.softcap, Some(50.0));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options {
    /// Bottom-right aligned causal mask.
    pub causal: bool,
    /// Scale of `q k^T`; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Keys visible to the left of the diagonal (`None`: all).
    pub window_left: Option<usize>,
    /// Keys visible to the right of the diagonal (`None`: all; causal makes it 0).
    pub window_right: Option<usize>,
    /// The first `sinks` keys are always visible (but never from the future under causal).
    pub sinks: usize,
    /// Softmax or relu².
    pub score: Score,
    /// Entropy-invariant scale: a row's scale is `log_512(n) * scale`, `n` the keys it sees.
    pub entropy_scale: bool,
    /// Logit soft-capping (Gemma 2): softmax logits are `cap * tanh(scale * q k^T / cap)`
    /// (before any ALiBi bias; a learned sink logit is not capped). `None`: no capping;
    /// `Some(cap)` needs a finite, normal `cap > 0`. Softmax only.
    pub softcap: Option<f32>,
}

/// Builder methods for the [`Options`] of a problem type (one definition for both types).
macro_rules! option_builders {
    ($t:ty) => {
        impl $t {
            /// Sets the causal mask (bottom-right aligned).
            pub fn causal(mut self, causal: bool) -> Self {
                self.opts.causal = causal;
                self
            }

            /// Sets the scale of `q k^T` (default `1 / sqrt(head_dim)`).
            pub fn scale(mut self, scale: f32) -> Self {
                self.opts.scale = Some(scale);
                self
            }

            /// Sets a sliding window `(left, right)` around the diagonal (`None`: unbounded).
            pub fn window(mut self, left: Option<usize>, right: Option<usize>) -> Self {
                self.opts.window_left = left;
                self.opts.window_right = right;
                self
            }

            /// Keeps the first `n` keys visible whatever the left window bound (attention sinks).
            pub fn sinks(mut self, n: usize) -> Self {
                self.opts.sinks = n;
                self
            }

            /// Sets the score function.
            pub fn score(mut self, score: Score) -> Self {
                self.opts.score = score;
                self
            }

            /// Uses the entropy-invariant scale `log_512(n) * scale` (`n`: keys the row sees).
            pub fn entropy_invariant_scale(mut self, on: bool) -> Self {
                self.opts.entropy_scale = on;
                self
            }

            /// Caps the softmax logits at `±cap` through `cap * tanh(logit / cap)` (Gemma 2's
            /// `attn_logit_softcapping`, e.g. 50).
            pub fn softcap(mut self, cap: f32) -> Self {
                self.opts.softcap = Some(cap);
                self
            }

            /// The base scale applied to `q k^T` (before any entropy-invariant factor).
            pub fn softmax_scale(&self) -> f32 {
                self.opts
                    .scale
                    .unwrap_or(1.0 / (self.head_dim as f32).sqrt())
            }
        }
    };
}

option_builders!(Attention);
option_builders!(VarlenAttention<'_>);

/// A block-sparse layout (Sparse Transformer): `mask[qb * cols + kb] != 0` lets query block
/// `qb` (rows `qb * block_q ..`) see key block `kb` (keys `kb * block_k ..`), with
/// `cols = ceil(seq_k / block_k)` and `ceil(seq_q / block_q)` rows (for varlen: of the longest
/// sequence; each sequence indexes it from its own first row and key). It combines with the
/// other masks; tiles with no visible block are never loaded.
///
/// ```
/// use attnkit::flash::BlockMask;
/// let m = BlockMask::local_layout(4, 4, 2)?;
/// assert_eq!(m, [1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]);
/// let mask = BlockMask { mask: (&m).into(), block_q: 64, block_k: 64 };
/// # let _ = mask;
/// # Ok::<(), attnkit::Error>(())
/// ```
#[derive(Debug)]
pub struct BlockMask<'a> {
    /// `[rows, cols]` row-major, nonzero = attend.
    pub mask: Buf<'a, u8>,
    /// Query rows per mask row.
    pub block_q: usize,
    /// Keys per mask column.
    pub block_k: usize,
}

impl BlockMask<'_> {
    /// Sparse Transformer's local pattern: query block `qb` sees key blocks `qb - width + 1 ..= qb`.
    /// `rows * cols` above [`MAX_MASK_BLOCKS`] (or memory that cannot be reserved) is an error.
    ///
    /// ```
    /// use attnkit::flash::BlockMask;
    /// assert_eq!(BlockMask::local_layout(2, 2, 1)?, [1, 0, 0, 1]);
    /// assert!(BlockMask::local_layout(1 << 40, 1 << 40, 1).is_err());
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn local_layout(rows: usize, cols: usize, width: usize) -> Result<Vec<u8>> {
        Self::layout(rows, cols, |qb, kb| kb <= qb && qb - kb < width)
    }

    /// Sparse Transformer's strided (atrous) pattern: query block `qb` sees key blocks
    /// `kb <= qb` with `(qb - kb) % stride == 0`. A zero `stride` is an error, and so is
    /// `rows * cols` above [`MAX_MASK_BLOCKS`].
    ///
    /// ```
    /// use attnkit::flash::BlockMask;
    /// assert_eq!(BlockMask::strided_layout(3, 3, 2)?, [1, 0, 0, 0, 1, 0, 1, 0, 1]);
    /// assert!(BlockMask::strided_layout(3, 3, 0).is_err());
    /// # Ok::<(), attnkit::Error>(())
    /// ```
    pub fn strided_layout(rows: usize, cols: usize, stride: usize) -> Result<Vec<u8>> {
        if stride == 0 {
            return Err(Error::Value {
                arg: "stride",
                detail: "must be at least 1".into(),
            });
        }
        Self::layout(rows, cols, |qb, kb| kb <= qb && (qb - kb) % stride == 0)
    }

    fn layout(rows: usize, cols: usize, keep: impl Fn(usize, usize) -> bool) -> Result<Vec<u8>> {
        let n = rows
            .checked_mul(cols)
            .filter(|&n| n <= MAX_MASK_BLOCKS)
            .ok_or_else(|| Error::Shape {
                arg: "rows",
                detail: format!("{rows} x {cols} blocks exceed the limit {MAX_MASK_BLOCKS}"),
            })?;
        let mut mask = Vec::new();
        // Within the limit, but still possibly more than the machine has.
        mask.try_reserve_exact(n).map_err(|e| Error::Shape {
            arg: "rows",
            detail: format!("{rows} x {cols} blocks: {e}"),
        })?;
        mask.extend((0..n).map(|i| keep(i / cols, i % cols) as u8));
        Ok(mask)
    }
}

/// Optional inputs and outputs of a call: the learned sink logits, ALiBi slopes, the entropy
/// output, and a block-sparse mask. `Extras::default()` is none of them.
///
/// ```
/// use attnkit::flash::Extras;
/// let mut entropy = vec![0f32; 16];
/// let x = Extras { entropy: Some((&mut entropy).into()), ..Default::default() };
/// assert!(x.sink_logits.is_none());
/// ```
#[derive(Debug, Default)]
pub struct Extras<'a> {
    /// `[heads_q]` f32: a learned per-head logit added to the softmax denominator as
    /// `exp(sink - m)` (gpt-oss), with no value vector; included in the LSE. `-inf` is no
    /// sink; `+inf` puts all the weight on the sink (`O = 0`, `LSE = +inf`, entropy 0); NaN
    /// is a typed error on the CPU (the host does not read device buffers: on a GPU a NaN
    /// logit makes that head's O, LSE and entropy NaN).
    pub sink_logits: Option<Buf<'a, f32>>,
    /// `[heads_q]` f32 ALiBi slopes (natural units): head `h`'s logit for row `i`, key `j`
    /// gains `-slope[h] * |i + seq_k - seq_q - j|` (the distance to the row's diagonal key,
    /// as FlashAttention defines it, also for non-causal rows), after any soft-capping.
    /// Softmax only. On the CPU a NaN or infinite slope is a typed error; on a GPU the host
    /// does not read device buffers (a non-finite slope gives that head's rows no meaning).
    pub alibi_slopes: Option<Buf<'a, f32>>,
    /// Per-row entropy of the attention distribution, `H = LSE - sum_j p_j s_j` (natural log,
    /// the sink included), in the LSE's layout; accumulated in the kernel, never materialised.
    pub entropy: Option<BufMut<'a, f32>>,
    /// A block-sparse mask.
    pub block_mask: Option<BlockMask<'a>>,
}
