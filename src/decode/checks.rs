//! Validation of decode calls: every check that depends on the problem alone ([`check`]),
//! on the tables where the call runs ([`check_tables`], [`host_tables`]) and on the cache
//! buffers ([`check_cache`]), and the checked [`Problem`] both backends run.

use super::*;

pub(super) fn check_rope(rope: &Rope) -> Result<()> {
    if !(rope.theta.is_finite() && rope.theta > 1.0) {
        return Err(Error::Value {
            arg: "rope",
            detail: format!("theta {} must be finite and > 1", rope.theta),
        });
    }
    Ok(())
}

/// The checked problem both backends run.
#[derive(Clone, Debug)]
pub(crate) struct Problem<'a> {
    pub batch: usize,
    pub seq_q: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub d: usize,
    pub causal: bool,
    pub window_left: Option<usize>,
    pub scale: f32,
    /// The softcap `c` (natural units), checked finite, normal and > 0.
    pub softcap: Option<f32>,
    pub splits: usize,
    pub keys_per_split: usize,
    /// The lengths where the host has them: its copy, or on the CPU the checked buffer.
    pub lens: Option<&'a [i32]>,
    /// The declared bound of device-only lengths ([`SeqLens::Device`]).
    pub max_len: Option<usize>,
    pub layout: Layout<'a>,
    pub q: Strides,
    pub o: Strides,
    pub k: Strides,
    pub v: Strides,
    /// Rows of a cache tensor: sequences (or pages) and rows per sequence (or page).
    pub cache_dims: (usize, usize),
    /// Keys a sequence may hold.
    pub capacity: usize,
}

impl Problem<'_> {
    pub fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Element offset of logical key `j` of sequence `b`, head `hk`, in a cache with strides
    /// `s`: the one map every layout is read (and appended) through.
    pub fn key_offset(&self, s: &Strides, b: usize, j: usize, hk: usize) -> usize {
        let (page, row) = match &self.layout {
            Layout::Contiguous { .. } => (b, j),
            Layout::Paged {
                page_size,
                block_table,
                pages_per_seq,
                ..
            } => (
                block_table.unwrap_or_default()[b * pages_per_seq + j / page_size] as usize,
                j % page_size,
            ),
            Layout::Rolling {
                n_sink,
                window,
                ring_offsets,
                ..
            } => {
                let slot = if j < *n_sink {
                    j
                } else {
                    n_sink + (j - n_sink + ring_offsets.unwrap_or_default()[b] as usize) % window
                };
                (b, slot)
            }
        };
        page * s.batch + row * s.row + hk * s.head
    }

    pub fn rope(&self) -> Option<Rope> {
        match &self.layout {
            Layout::Rolling { rope, .. } => Some(*rope),
            _ => None,
        }
    }

    /// Sequence `b`'s length; only called on a resolved problem ([`host_tables`]), whose
    /// lengths are known.
    pub fn len(&self, b: usize) -> usize {
        self.lens.unwrap_or_default()[b] as usize
    }
}

/// The per-head logit tables of a CPU call, checked (see [`host_tables`]).
#[derive(Clone, Copy, Default)]
pub(super) struct HostExtras<'t> {
    /// `[heads_q]` learned sink logits.
    pub sinks: Option<&'t [f32]>,
    /// `[heads_q]` ALiBi slopes.
    pub alibi_slopes: Option<&'t [f32]>,
}

/// On the CPU the tables are host slices, and they must hold exactly what the problem's host
/// copies say: the CPU reads the problem's copies, a GPU the buffers, so a difference would
/// make the two backends compute different things without a word. A table the problem has no
/// host copy of (device-only) is taken from its buffer and checked as a host copy is. Returns
/// the problem with every table known, the sink logits, checked for NaN (a NaN logit has no
/// meaning; ±inf do, see [`Tables::sink_logits`]), and the ALiBi slopes, checked finite and
/// small enough that no bias within the cache overflows.
pub(super) fn host_tables<'t>(
    p: &Problem<'t>,
    t: &'t Tables<'_>,
) -> Result<(Problem<'t>, HostExtras<'t>)> {
    let same = |arg: &'static str, buf: &Buf<'_, i32>, host: &[i32]| -> Result<()> {
        let got = buf.host(arg)?;
        if let Some(i) = got.iter().zip(host).position(|(a, b)| a != b) {
            return Err(Error::Value {
                arg,
                detail: format!(
                    "the Tables buffer holds {} at entry {i}, the problem's host copy {}: \
                     they must agree (the CPU reads the problem's, a GPU the buffer)",
                    got[i], host[i]
                ),
            });
        }
        Ok(())
    };
    // Each table: its host copy, checked equal to the buffer, or the buffer itself.
    let mut filled = false;
    let mut pick = |arg: &'static str, buf: &'t Buf<'_, i32>, host: Option<&[i32]>| {
        match host {
            Some(h) => same(arg, buf, h)?,
            None => filled = true,
        }
        buf.host(arg)
    };
    let mut r = p.clone();
    r.lens = Some(pick("cache_seqlens", &t.cache_seqlens, p.lens)?);
    match (&mut r.layout, &t.block_table, &t.ring_offsets) {
        (Layout::Paged { block_table, .. }, Some(b), _) => {
            *block_table = Some(pick("block_table", b, *block_table)?)
        }
        (Layout::Rolling { ring_offsets, .. }, _, Some(o)) => {
            *ring_offsets = Some(pick("ring_offsets", o, *ring_offsets)?)
        }
        // check_tables already matched the buffers to the layout.
        _ => {}
    }
    if filled {
        check_values(&r)?;
    }
    let sinks = match &t.sink_logits {
        Some(s) => {
            let s = s.host("sink_logits")?;
            if let Some(h) = s.iter().position(|x| x.is_nan()) {
                return Err(Error::Value {
                    arg: "sink_logits",
                    detail: format!(
                        "head {h}: NaN (a logit is finite, or -inf: no sink, +inf: all sink)"
                    ),
                });
            }
            Some(s)
        }
        None => None,
    };
    let alibi_slopes = match &t.alibi_slopes {
        Some(s) => {
            let s = s.host("alibi_slopes")?;
            // The farthest a query can be from a key: the capacity plus the new tokens
            // (a query's position is negative when the cache holds fewer keys than it has new
            // tokens). In exp2 units, the bias at that distance must be finite, else a key's
            // logit is inf - inf or a row's max is +inf.
            let reach = (p.capacity + p.seq_q) as f32 * std::f32::consts::LOG2_E;
            if let Some(h) = s.iter().position(|x| !(x * reach).is_finite()) {
                return Err(Error::Value {
                    arg: "alibi_slopes",
                    detail: format!(
                        "head {h}: slope {} (must be finite, and slope * log2(e) * {} keys \
                         finite in f32)",
                        s[h],
                        p.capacity + p.seq_q
                    ),
                });
            }
            Some(s)
        }
        None => None,
    };
    Ok((
        r,
        HostExtras {
            sinks,
            alibi_slopes,
        },
    ))
}

/// An append must not write a page that another slot in use also maps: two sequences
/// appending into one page race on a GPU (and a prefix another sequence reads would change
/// under it). Shared pages that nobody writes (prefix sharing) stay legal. Checked on the
/// host tables, before any write; without them (device-only on a GPU) it is the caller's
/// promise (see [`Decode::with_device_tables`]).
pub(super) fn check_append_pages(p: &Problem<'_>) -> Result<()> {
    let (
        Layout::Paged {
            page_size,
            block_table: Some(block_table),
            pages_per_seq,
            ..
        },
        Some(lens),
    ) = (&p.layout, p.lens)
    else {
        return Ok(());
    };
    // Every (sequence, column) in use, by page; `check` proved these entries are real pages.
    let mut used: Vec<(i32, usize, usize)> = Vec::new();
    let total: usize = lens
        .iter()
        .map(|&l| (l as usize).div_ceil(*page_size))
        .sum();
    used.try_reserve_exact(total).map_err(|_| Error::Shape {
        arg: "block_table",
        detail: format!("{total} pages in use: no memory to check them"),
    })?;
    for (b, &l) in lens.iter().enumerate() {
        let row = &block_table[b * pages_per_seq..(b + 1) * pages_per_seq];
        for (col, &pg) in row
            .iter()
            .take((l as usize).div_ceil(*page_size))
            .enumerate()
        {
            used.push((pg, b, col));
        }
    }
    used.sort_unstable();
    for (b, &l) in lens.iter().enumerate() {
        let l = l as usize;
        // The columns this append writes: those of keys l - seq_q .. l.
        let cols = (l - p.seq_q) / page_size..l.div_ceil(*page_size);
        for col in cols {
            let pg = block_table[b * pages_per_seq + col];
            let from = used.partition_point(|u| u.0 < pg);
            let to = used.partition_point(|u| u.0 <= pg);
            if let Some(&(_, b2, c2)) = used[from..to].iter().find(|u| (u.1, u.2) != (b, col)) {
                return Err(Error::Value {
                    arg: "block_table",
                    detail: format!(
                        "sequence {b} appends into page {pg} (column {col}), which sequence {b2} \
                         also uses (column {c2}): a page written must belong to one slot"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The device tables must match the layout and hold as many entries as the host copies.
pub(super) fn check_tables(p: &Problem<'_>, t: &Tables<'_>) -> Result<()> {
    if t.cache_seqlens.len() != p.batch {
        return Err(Error::Shape {
            arg: "cache_seqlens",
            detail: format!(
                "the buffer holds {}, the batch is {}",
                t.cache_seqlens.len(),
                p.batch
            ),
        });
    }
    let (bt, ro) = match &p.layout {
        Layout::Contiguous { .. } => (None, None),
        // Without a host copy the buffer must still hold the full table.
        Layout::Paged { pages_per_seq, .. } => (Some(p.batch.saturating_mul(*pages_per_seq)), None),
        Layout::Rolling { .. } => (None, Some(p.batch)),
    };
    for (arg, buf) in [
        ("sink_logits", &t.sink_logits),
        ("alibi_slopes", &t.alibi_slopes),
    ] {
        if let Some(b) = buf {
            if b.len() != p.heads_q {
                return Err(Error::Shape {
                    arg,
                    detail: format!("holds {} values, heads_q is {}", b.len(), p.heads_q),
                });
            }
        }
    }
    for (arg, want, got) in [
        ("block_table", bt, t.block_table.as_ref().map(|b| b.len())),
        ("ring_offsets", ro, t.ring_offsets.as_ref().map(|b| b.len())),
    ] {
        if want != got {
            return Err(Error::Shape {
                arg,
                detail: match (want, got) {
                    (None, _) => "given, but the layout does not use it".into(),
                    (Some(_), None) => "the layout needs it, none given".into(),
                    (Some(w), Some(g)) => format!("the buffer holds {g}, the layout's {w}"),
                },
            });
        }
    }
    Ok(())
}

/// Every check that depends on the problem alone; returns the problem the backends run.
/// Each size is bounded before it enters a product, so nothing here can overflow.
pub(super) fn check<'a>(dev: &Device, p: &Decode<'a>) -> Result<Problem<'a>> {
    let batch = p.batch();
    let shape = |arg, detail: String| Err(Error::Shape { arg, detail });
    if batch == 0 {
        return shape("cache_seqlens", "empty: the batch needs a sequence".into());
    }
    if p.seq_q == 0 || p.seq_q > MAX_SEQ_Q {
        return shape("seq_q", format!("{} (1 to {MAX_SEQ_Q})", p.seq_q));
    }
    if !HEAD_DIMS.contains(&p.head_dim) {
        return Err(Error::Unsupported {
            arg: "head_dim",
            detail: format!("{} (supported: {HEAD_DIMS:?})", p.head_dim),
        });
    }
    if p.heads_q == 0 {
        return shape("heads_q", "must be at least 1".into());
    }
    if p.heads_kv == 0 || p.heads_q % p.heads_kv != 0 {
        return shape(
            "heads_kv",
            format!(
                "{} must be >= 1 and divide heads_q ({})",
                p.heads_kv, p.heads_q
            ),
        );
    }
    for (arg, n, max) in [
        ("cache_seqlens", batch, MAX_BATCH),
        ("heads_q", p.heads_q, MAX_HEADS),
    ] {
        if n > max {
            return Err(Error::Unsupported {
                arg,
                detail: format!("{n}: at most {max} (a CUDA grid dimension)"),
            });
        }
    }
    let scale = p.softmax_scale();
    // The kernels scale by scale * log2(e): that product must be finite too.
    if !(scale * std::f32::consts::LOG2_E).is_finite() {
        return Err(Error::Value {
            arg: "scale",
            detail: format!("{scale}: the scale (times log2 e) must be finite"),
        });
    }
    if let Some(c) = p.softcap {
        // The kernels cap in exp2 units, C = c log2(e), and divide by C: C must be finite and
        // its inverse too (a subnormal c would make 0 * inf = NaN of a zero score).
        let c2 = c * std::f32::consts::LOG2_E;
        if !(c > 0.0 && c.is_normal() && c2.is_finite() && (1.0 / c2).is_finite()) {
            return Err(Error::Value {
                arg: "softcap",
                detail: format!("{c}: a softcap must be finite, normal and > 0"),
            });
        }
    }
    let cap = p.capacity();
    if cap > MAX_CAPACITY {
        return Err(Error::Unsupported {
            arg: "capacity",
            detail: format!("{cap} tokens a sequence: at most {MAX_CAPACITY}"),
        });
    }
    let cache_dims = match &p.layout {
        Layout::Contiguous { capacity } => (batch, *capacity),
        Layout::Paged {
            page_size,
            num_pages,
            block_table,
            pages_per_seq,
        } => {
            // The key map takes any page size (every row is mapped on its own, so a tile or
            // a split may start anywhere in a page); the check keeps to what servers use and
            // the tests cover: multiples of 8 (vLLM's block sizes 8, 16, 32, ...).
            if *page_size == 0 || page_size % 8 != 0 || *page_size > MAX_CAPACITY {
                return Err(Error::Value {
                    arg: "page_size",
                    detail: format!(
                        "{page_size} is not a positive multiple of 8 up to {MAX_CAPACITY}"
                    ),
                });
            }
            if *num_pages > i32::MAX as usize {
                return Err(Error::Unsupported {
                    arg: "num_pages",
                    detail: format!("{num_pages} exceeds i32"),
                });
            }
            // Saturated: no real table holds usize::MAX entries, so it cannot match.
            let need = batch.saturating_mul(*pages_per_seq);
            if let Some(t) = block_table.filter(|t| t.len() != need) {
                return shape(
                    "block_table",
                    format!(
                        "holds {} entries, [batch {batch}, pages_per_seq {pages_per_seq}] is {need}",
                        t.len()
                    ),
                );
            }
            (*num_pages, *page_size)
        }
        Layout::Rolling {
            window,
            ring_offsets,
            rope,
            ..
        } => {
            check_rope(rope)?;
            if *window == 0 {
                return Err(Error::Value {
                    arg: "window",
                    detail: "must be at least 1".into(),
                });
            }
            if let Some(r) = ring_offsets.filter(|r| r.len() != batch) {
                return shape(
                    "ring_offsets",
                    format!("holds {}, the batch is {batch}", r.len()),
                );
            }
            (batch, cap)
        }
    };
    let (lens, max_len) = match p.cache_seqlens {
        SeqLens::Host(l) => (Some(l), None),
        SeqLens::Device { max_len, .. } => {
            // The splits cover max_len keys: past the capacity it would only overflow the
            // kernels' int32 split bounds.
            if max_len > cap {
                return Err(Error::Value {
                    arg: "max_len",
                    detail: format!("{max_len} keys, the capacity is {cap}"),
                });
            }
            (None, Some(max_len))
        }
    };
    check_host_values(lens, max_len, &p.layout, cap)?;
    let splits = p.splits_for(dev);
    if splits == 0 || splits > MAX_SPLITS {
        return Err(Error::Value {
            arg: "num_splits",
            detail: format!("{splits} (1 to {MAX_SPLITS})"),
        });
    }
    if let Some(w) = p.window_left {
        if matches!(p.layout, Layout::Rolling { .. }) {
            return Err(Error::Unsupported {
                arg: "window_left",
                detail: "a rolling cache is its own window (n_sink + window slots)".into(),
            });
        }
        if w > i32::MAX as usize / 2 {
            return Err(Error::Value {
                arg: "window_left",
                detail: format!("{w} is past any cache"),
            });
        }
    }
    let keys_per_split = p.keys_per_split(splits);
    // Splits past the longest cache would only write empty partials: drop them.
    let splits = p.max_len().div_ceil(keys_per_split).clamp(1, splits);
    Ok(Problem {
        batch,
        seq_q: p.seq_q,
        heads_q: p.heads_q,
        heads_kv: p.heads_kv,
        d: p.head_dim,
        causal: p.causal,
        window_left: p.window_left,
        scale,
        softcap: p.softcap,
        splits,
        keys_per_split,
        lens,
        max_len,
        layout: p.layout.clone(),
        q: p.q_strides,
        o: p.o_strides,
        k: p.k_strides,
        v: p.v_strides,
        cache_dims,
        capacity: cap,
    })
}

/// [`check_host_values`] on a problem's tables (after [`host_tables`] filled them in).
fn check_values(p: &Problem<'_>) -> Result<()> {
    check_host_values(p.lens, p.max_len, &p.layout, p.capacity)
}

/// The checks of the tables' values, on what the host has: lengths within the capacity (and
/// the declared `max_len`), the pages a sequence uses real pages, ring offsets inside the
/// window (and 0 until the ring is full). Shapes were checked before.
fn check_host_values(
    lens: Option<&[i32]>,
    max_len: Option<usize>,
    layout: &Layout<'_>,
    cap: usize,
) -> Result<()> {
    if let Some(lens) = lens {
        for (b, &l) in lens.iter().enumerate() {
            if l < 0 || l as usize > cap {
                return Err(Error::Value {
                    arg: "cache_seqlens",
                    detail: format!("sequence {b}: {l} keys, the capacity is {cap}"),
                });
            }
            if let Some(m) = max_len.filter(|&m| l as usize > m) {
                return Err(Error::Value {
                    arg: "cache_seqlens",
                    detail: format!("sequence {b}: {l} keys, over the declared max_len {m}"),
                });
            }
        }
    }
    match layout {
        Layout::Paged {
            page_size,
            num_pages,
            block_table: Some(block_table),
            pages_per_seq,
        } => {
            // Only the pages a sequence uses are read; each must name a real page (without
            // the lengths the host cannot tell which those are).
            for (b, &l) in lens.unwrap_or_default().iter().enumerate() {
                let row = &block_table[b * pages_per_seq..(b + 1) * pages_per_seq];
                for (i, &pg) in row
                    .iter()
                    .take((l as usize).div_ceil(*page_size))
                    .enumerate()
                {
                    if pg < 0 || pg as usize >= *num_pages {
                        return Err(Error::Value {
                            arg: "block_table",
                            detail: format!(
                                "sequence {b}, page {i}: entry {pg} is outside 0..{num_pages}"
                            ),
                        });
                    }
                }
            }
        }
        Layout::Rolling {
            window,
            ring_offsets: Some(ring_offsets),
            ..
        } => {
            for (b, &r) in ring_offsets.iter().enumerate() {
                // The ring turns only once full (checkable only with the length).
                let full = lens.is_none_or(|l| r == 0 || l[b] as usize == cap);
                if !(r >= 0 && (r as usize) < *window && full) {
                    let l = lens.map_or("unknown".to_string(), |l| l[b].to_string());
                    return Err(Error::Value {
                        arg: "ring_offsets",
                        detail: format!(
                            "sequence {b}: offset {r} with {l} of {cap} slots used (window {window})"
                        ),
                    });
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Checks both cache tensors `[pages or batch, rows, heads_kv, head_dim]` against their buffers
/// (as outputs, for an append: no element may alias another).
pub(super) fn check_cache(p: &Problem<'_>, k_len: usize, v_len: usize, output: bool) -> Result<()> {
    let dims = [p.cache_dims.0, p.cache_dims.1, p.heads_kv, p.d];
    crate::flash::check_strides("k_cache", &p.k, dims, k_len, output)?;
    crate::flash::check_strides("v_cache", &p.v, dims, v_len, output)
}
