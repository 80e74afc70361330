//! The cache layouts a decode call reads ([`Layout`]), the lengths as the host knows them
//! ([`SeqLens`]) and the rotary embedding a rolling cache applies on the fly ([`Rope`]).

/// Rotary embedding style: which element pairs rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// GPT-NeoX / Llama (HF): element `c` pairs with `c + head_dim / 2`.
    NeoX,
    /// GPT-J / Meta's original: element `2c` pairs with `2c + 1`.
    Interleaved,
}

/// Rotary position embedding: pair `c` of a vector at position `pos` turns by
/// `pos * theta^(-2c / head_dim)`.
///
/// ```
/// use attnkit::decode::{Rope, RopeStyle};
/// let r = Rope { style: RopeStyle::NeoX, theta: 10000.0 };
/// assert_eq!(r.inv_freq(0, 128), 1.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// Pairing of elements.
    pub style: RopeStyle,
    /// The base (10000 in most models), finite and > 1.
    pub theta: f32,
}

impl Rope {
    /// The angular frequency of pair `c` for head dim `d`, `theta^(-2c/d)`, in f64.
    ///
    /// ```
    /// use attnkit::decode::{Rope, RopeStyle};
    /// let r = Rope { style: RopeStyle::Interleaved, theta: 100.0 };
    /// assert!((r.inv_freq(32, 64) - 0.01).abs() < 1e-12);
    /// ```
    pub fn inv_freq(&self, c: usize, d: usize) -> f64 {
        (self.theta as f64).powf(-2.0 * c as f64 / d as f64)
    }

    /// The two element indices pair `c` rotates (saturating at `usize::MAX` for a `c` past
    /// any head).
    ///
    /// ```
    /// use attnkit::decode::{Rope, RopeStyle};
    /// assert_eq!(Rope { style: RopeStyle::NeoX, theta: 1e4 }.pair(3, 64), (3, 35));
    /// assert_eq!(Rope { style: RopeStyle::Interleaved, theta: 1e4 }.pair(3, 64), (6, 7));
    /// ```
    pub fn pair(&self, c: usize, d: usize) -> (usize, usize) {
        match self.style {
            RopeStyle::NeoX => (c, c.saturating_add(d / 2)),
            RopeStyle::Interleaved => {
                let a = c.saturating_mul(2);
                (a, a.saturating_add(1))
            }
        }
    }
}

/// Where the K/V cache rows live.
#[derive(Clone, Debug)]
pub enum Layout<'a> {
    /// `[batch, capacity, heads_kv, head_dim]`; `k_strides.batch` is between sequences.
    Contiguous {
        /// Tokens each sequence's slot holds.
        capacity: usize,
    },
    /// `[num_pages, page_size, heads_kv, head_dim]` by default (vLLM's and mistral.rs'
    /// layout); `k_strides.batch` is between pages, `row` between a page's tokens, `head`
    /// between heads, so a `[num_pages, heads_kv, page_size, head_dim]` cache is the same
    /// layout with `row = head_dim`, `head = page_size * head_dim`.
    /// Logical key `j` of sequence `b` is row `j % page_size` of page
    /// `block_table[b * pages_per_seq + j / page_size]`.
    ///
    /// ```
    /// use attnkit::decode::{Decode, Layout};
    /// let table = [0, 1];
    /// let paged = Layout::Paged { page_size: 8, num_pages: 2, block_table: Some(&table), pages_per_seq: 2 };
    /// let mut p = Decode::new(&[12], 1, 4, 2, 64, paged);
    /// // [num_pages, heads_kv, page_size, head_dim]: head-major pages.
    /// p.k_strides.row = 64;
    /// p.k_strides.head = 8 * 64;
    /// p.v_strides = p.k_strides;
    /// assert_eq!(p.k_strides.batch, 2 * 8 * 64);
    /// ```
    Paged {
        /// Tokens per page, a positive multiple of 8 (vLLM's block sizes 8, 16, 32, ...).
        page_size: usize,
        /// Pages in the K (and V) buffer.
        num_pages: usize,
        /// Host copy of the block table, `[batch, pages_per_seq]`; entries past a sequence's
        /// length are not read (and may be anything, e.g. -1). `None`: the table lives only
        /// in [`Tables::block_table`](super::Tables::block_table) (no host copy per step; see
        /// [`Decode::with_device_tables`](super::Decode::with_device_tables) for what is
        /// checked then).
        block_table: Option<&'a [i32]>,
        /// Columns of the block table: a sequence holds at most `pages_per_seq * page_size`.
        pages_per_seq: usize,
    },
    /// StreamingLLM: `[batch, n_sink + window, heads_kv, head_dim]`, slots `0..n_sink` hold the
    /// sinks, the rest a ring; keys are stored before RoPE, which is applied to q and k with
    /// logical positions. Logical key `j >= n_sink` lives at slot
    /// `n_sink + (j - n_sink + ring_offsets[b]) % window`. Made by
    /// [`RollingCache::layout`](super::RollingCache::layout).
    Rolling {
        /// Sink tokens kept at the start.
        n_sink: usize,
        /// Most recent tokens kept in the ring.
        window: usize,
        /// Host copy: per sequence, the ring index of the oldest ring token (0 until the
        /// ring is full). `None`: the offsets live only in
        /// [`Tables::ring_offsets`](super::Tables::ring_offsets), as `block_table`'s `None`.
        ring_offsets: Option<&'a [i32]>,
        /// The rotary embedding applied with cache positions.
        rope: Rope,
    },
}

/// Each sequence's key count, as the host knows it.
///
/// ```
/// use attnkit::decode::{Decode, Layout, SeqLens};
/// let lens = [9, 30];
/// let host = Decode::new(&lens, 1, 1, 1, 64, Layout::Contiguous { capacity: 64 });
/// let dev = Decode::with_device_tables(2, 30, 1, 1, 1, 64, Layout::Contiguous { capacity: 64 });
/// assert!(matches!(host.cache_seqlens, SeqLens::Host(l) if l == lens));
/// assert_eq!((host.batch(), host.keys_per_split(1)), (dev.batch(), dev.keys_per_split(1)));
/// ```
#[derive(Clone, Copy, Debug)]
pub enum SeqLens<'a> {
    /// A host copy of the `[batch]` lengths, checked before the call; the call's
    /// [`Tables::cache_seqlens`](super::Tables::cache_seqlens) holds the same (on a GPU, a
    /// device copy).
    Host(&'a [i32]),
    /// The lengths live only in [`Tables::cache_seqlens`](super::Tables::cache_seqlens) (see
    /// [`Decode::with_device_tables`](super::Decode::with_device_tables)); the host gives
    /// their count and bound.
    Device {
        /// Sequences.
        batch: usize,
        /// At least the longest cache: the splits cover this many keys, and a longer
        /// sequence is an error on the CPU and reads as empty on a GPU.
        max_len: usize,
    },
}

impl<'a> SeqLens<'a> {
    /// The host copy of the lengths, if the host has one.
    ///
    /// ```
    /// use attnkit::decode::SeqLens;
    /// assert_eq!(SeqLens::Host(&[3, 4]).host(), Some(&[3, 4][..]));
    /// assert_eq!(SeqLens::Device { batch: 2, max_len: 9 }.host(), None);
    /// ```
    pub fn host(&self) -> Option<&'a [i32]> {
        match self {
            SeqLens::Host(l) => Some(l),
            SeqLens::Device { .. } => None,
        }
    }
}
