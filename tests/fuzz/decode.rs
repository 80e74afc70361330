//! Fuzz targets of `attnkit::decode` (see main.rs for the harness).
//!
//! Each case draws a problem (contiguous, paged or rolling cache; splits; windows; RoPE;
//! sink logits; softcaps; ALiBi slopes; strides), mostly small and valid, often broken in one
//! place (a length, a hostile size from `size`, a NaN from `float`, a stride, a table entry),
//! allocates buffers only when the sizes are small (else passes short ones and requires an
//! `Err`), and on `Ok` requires every element the call writes to be written (outputs poisoned
//! with NaN first).

use super::{Outcome, float, huge, run, size, written};
use crate::common::{poisoned, random};
use attnkit::decode::{self, Decode, HEAD_DIMS, Layout, RollingCache, Rope, RopeStyle, Tables};
use attnkit::flash::Strides;
use attnkit::{Bf16, Device, Element, F16};
use rand::{Rng, rngs::StdRng};

/// Most elements a case allocates for one buffer: larger problems get short buffers.
const MAX_ELEMS: usize = 1 << 18;

/// The owned parts of a drawn problem (`Decode` borrows its tables).
struct Case {
    lens: Vec<i32>,
    seq_q: usize,
    heads_q: usize,
    heads_kv: usize,
    d: usize,
    kind: Kind,
    table: Vec<i32>,
    offs: Vec<i32>,
    causal: bool,
    window_left: Option<usize>,
    scale: Option<f32>,
    splits: Option<usize>,
    sinks: Option<Vec<f32>>,
    softcap: Option<f32>,
    alibi: Option<Vec<f32>>,
    /// Which stride to break, if any: (tensor 0..4, field 0..4, value).
    stride: Option<(usize, usize, usize)>,
}

#[derive(Clone, Copy)]
enum Kind {
    Contiguous {
        capacity: usize,
    },
    Paged {
        page_size: usize,
        num_pages: usize,
        pages_per_seq: usize,
    },
    Rolling {
        n_sink: usize,
        window: usize,
        rope: Rope,
    },
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// One in `n`.
fn one_in(rng: &mut StdRng, n: u32) -> bool {
    rng.random_range(0..n) == 0
}

fn draw(rng: &mut StdRng) -> Case {
    // The batch is a slice the test owns: small, or just past the limit.
    let batch = if one_in(rng, 40) {
        pick(rng, &[0, decode::MAX_BATCH + 1])
    } else {
        rng.random_range(1..=3)
    };
    let seq_q = if one_in(rng, 8) {
        size(rng, 17)
    } else {
        rng.random_range(1..=4)
    };
    let heads_kv = if one_in(rng, 10) {
        size(rng, 3)
    } else {
        rng.random_range(1..=2)
    };
    let group = if one_in(rng, 10) {
        size(rng, 3)
    } else {
        rng.random_range(1..=3)
    };
    let heads_q = heads_kv.saturating_mul(group);
    let d = if one_in(rng, 10) {
        size(rng, 300)
    } else {
        pick(rng, &HEAD_DIMS[..2])
    };
    let max_len = rng.random_range(0..=150usize);
    let kind = match rng.random_range(0..3) {
        0 => Kind::Contiguous {
            capacity: if one_in(rng, 10) {
                size(rng, 200)
            } else {
                max_len + rng.random_range(0..8)
            },
        },
        1 => {
            let page_size = if one_in(rng, 8) {
                size(rng, 64)
            } else {
                pick(rng, &[8, 16, 32, 48])
            };
            let per = max_len.div_ceil(page_size.max(1)).max(1);
            Kind::Paged {
                page_size,
                num_pages: if one_in(rng, 10) {
                    size(rng, 16)
                } else {
                    batch.min(4) * per + rng.random_range(0..3)
                },
                pages_per_seq: if one_in(rng, 10) { size(rng, 8) } else { per },
            }
        }
        _ => Kind::Rolling {
            n_sink: if one_in(rng, 10) {
                size(rng, 8)
            } else {
                rng.random_range(0..=4)
            },
            window: if one_in(rng, 10) {
                size(rng, 64)
            } else {
                rng.random_range(1..=100)
            },
            rope: Rope {
                style: pick(rng, &[RopeStyle::NeoX, RopeStyle::Interleaved]),
                theta: if one_in(rng, 10) {
                    float(rng, 0.5, 2.0)
                } else {
                    float(rng, 100.0, 1e6)
                },
            },
        },
    };
    let lens_n = batch;
    let cap = match kind {
        Kind::Contiguous { capacity } => capacity,
        Kind::Paged {
            page_size,
            pages_per_seq,
            ..
        } => page_size.saturating_mul(pages_per_seq),
        Kind::Rolling { n_sink, window, .. } => n_sink.saturating_add(window),
    };
    let top = cap.min(max_len).min(i32::MAX as usize) as i32;
    let lens: Vec<i32> = (0..lens_n)
        .map(|_| match rng.random_range(0..40) {
            0 => -1,
            1 => top.saturating_add(1),
            2 => i32::MAX,
            _ => rng.random_range(0..=top),
        })
        .collect();
    let table = match kind {
        Kind::Paged {
            num_pages,
            pages_per_seq,
            ..
        } => {
            let n = if one_in(rng, 20) {
                rng.random_range(0..8)
            } else {
                lens_n.saturating_mul(pages_per_seq).min(1 << 12)
            };
            // Mostly distinct pages (a permutation), sometimes a shared or bad entry.
            let pages = num_pages.clamp(1, 1 << 12) as i32;
            let mut t: Vec<i32> = (0..n as i32).map(|i| i % pages).collect();
            for i in (1..t.len()).rev() {
                t.swap(i, rng.random_range(0..=i));
            }
            if one_in(rng, 6) && !t.is_empty() {
                let i = rng.random_range(0..t.len());
                t[i] = pick(rng, &[-1, pages, t[0], i32::MAX]);
            }
            t
        }
        _ => Vec::new(),
    };
    let offs = match kind {
        Kind::Rolling { window, .. } => {
            let n = if one_in(rng, 30) {
                lens_n.saturating_sub(1)
            } else {
                lens_n
            };
            let mut offs = Vec::with_capacity(n);
            for &l in &lens[..n] {
                offs.push(match rng.random_range(0..10) {
                    0 => pick(rng, &[-1, window.min(i32::MAX as usize) as i32, 1]),
                    _ if l as usize == cap => rng.random_range(0..window.clamp(1, 1 << 20) as i32),
                    _ => 0,
                });
            }
            offs
        }
        _ => Vec::new(),
    };
    Case {
        lens,
        seq_q,
        heads_q,
        heads_kv,
        d,
        kind,
        table,
        offs,
        causal: !one_in(rng, 4),
        window_left: if one_in(rng, 4) {
            Some(size(rng, 100))
        } else {
            None
        },
        scale: if one_in(rng, 4) {
            Some(float(rng, 0.01, 1.0))
        } else {
            None
        },
        splits: if one_in(rng, 3) {
            Some(size(rng, 65))
        } else {
            None
        },
        sinks: if one_in(rng, 5) {
            let n = if one_in(rng, 10) {
                heads_q.saturating_add(1)
            } else {
                heads_q
            };
            (!huge(n)).then(|| (0..n).map(|_| float(rng, -3.0, 3.0)).collect())
        } else {
            None
        },
        softcap: one_in(rng, 5).then(|| float(rng, 0.5, 60.0)),
        alibi: if one_in(rng, 5) {
            let n = if one_in(rng, 10) {
                heads_q.saturating_add(1)
            } else {
                heads_q
            };
            (!huge(n)).then(|| (0..n).map(|_| float(rng, 0.0, 1.0)).collect())
        } else {
            None
        },
        stride: if one_in(rng, 8) {
            Some((
                rng.random_range(0..4),
                rng.random_range(0..4),
                size(rng, 2048),
            ))
        } else {
            None
        },
    }
}

impl Case {
    fn problem(&self) -> Decode<'_> {
        let layout = match self.kind {
            Kind::Contiguous { capacity } => Layout::Contiguous { capacity },
            Kind::Paged {
                page_size,
                num_pages,
                pages_per_seq,
            } => Layout::Paged {
                page_size,
                num_pages,
                block_table: Some(&self.table),
                pages_per_seq,
            },
            Kind::Rolling {
                n_sink,
                window,
                rope,
            } => Layout::Rolling {
                n_sink,
                window,
                ring_offsets: Some(&self.offs),
                rope,
            },
        };
        let mut p = Decode::new(
            &self.lens,
            self.seq_q,
            self.heads_q,
            self.heads_kv,
            self.d,
            layout,
        )
        .causal(self.causal)
        .window(self.window_left);
        p.scale = self.scale;
        p.softcap = self.softcap;
        p.num_splits = self.splits;
        if let Some((t, f, v)) = self.stride {
            let s = match t {
                0 => &mut p.q_strides,
                1 => &mut p.o_strides,
                2 => &mut p.k_strides,
                _ => &mut p.v_strides,
            };
            match f {
                0 => s.batch = v,
                1 => s.row = v,
                2 => s.head = v,
                _ => s.dim = v,
            }
        }
        p
    }
}

/// Elements a `[n0, n1, n2, d]` tensor with strides `s` reaches (None: past any buffer here).
fn reach(s: &Strides, dims: [usize; 4]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    let last = [
        (dims[0], s.batch),
        (dims[1], s.row),
        (dims[2], s.head),
        (dims[3], s.dim),
    ]
    .iter()
    .try_fold(0usize, |a, &(n, st)| {
        a.checked_add((n - 1).checked_mul(st)?)
    })?;
    last.checked_add(1).filter(|&r| r <= MAX_ELEMS)
}

/// Rows per cache tensor `[outer, rows, heads_kv, d]`.
fn cache_dims(p: &Decode<'_>) -> [usize; 4] {
    let (outer, rows) = match &p.layout {
        Layout::Contiguous { capacity } => (p.batch(), *capacity),
        Layout::Paged {
            page_size,
            num_pages,
            ..
        } => (*num_pages, *page_size),
        Layout::Rolling { .. } => (p.batch(), p.capacity()),
    };
    [outer, rows, p.heads_kv, p.head_dim]
}

/// A buffer of `n` elements if `n` is small, else a short one (the call must then fail), and
/// sometimes one element short.
fn sized<T: Element>(
    rng: &mut StdRng,
    n: Option<usize>,
    fill: impl Fn(&mut StdRng, usize) -> Vec<T>,
) -> (Vec<T>, bool) {
    match n {
        Some(n) if one_in(rng, 25) => (fill(rng, n.saturating_sub(1)), n > 0),
        Some(n) => (fill(rng, n), false),
        None => (fill(rng, 64), true),
    }
}

fn forward_case<T: Element>(rng: &mut StdRng, c: &Case) -> Outcome {
    let dev = Device::cpu();
    let p = c.problem();
    let qo = [p.batch(), p.seq_q, p.heads_q, p.head_dim];
    let (q, q_short) = sized(rng, reach(&p.q_strides, qo), random::<T>);
    let (mut o, o_short) = sized(rng, reach(&p.o_strides, qo), |_, n| poisoned::<T>(n));
    let kd = cache_dims(&p);
    let (k, k_short) = sized(rng, reach(&p.k_strides, kd), random::<T>);
    let (v, v_short) = sized(rng, reach(&p.v_strides, kd), random::<T>);
    let lse_n = Some(p.lse_len()).filter(|&n| n <= MAX_ELEMS);
    let (mut lse, lse_short) = sized(rng, lse_n, |_, n| poisoned::<f32>(n));
    let ws_n = Some(p.workspace_len(&dev)).filter(|&n| n <= MAX_ELEMS);
    let (mut ws, ws_short) = sized(rng, ws_n, |_, n| poisoned::<f32>(n));
    let mut tables = Tables::host(&p);
    tables.sink_logits = c.sinks.as_deref().map(|s| s.into());
    tables.alibi_slopes = c.alibi.as_deref().map(|s| s.into());
    let r = decode::forward(
        &dev,
        &p,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        tables,
        (&mut ws).into(),
        (&mut o).into(),
        (&mut lse).into(),
    );
    if r.is_ok() {
        // (A workspace one short may still do: forward drops splits past the longest cache.)
        let _ = ws_short;
        let short = q_short || o_short || k_short || v_short || lse_short;
        assert!(!short, "Ok with a short buffer");
        // Every element of o the strides address, and every LSE.
        let s = p.o_strides;
        for b in 0..p.batch() {
            for i in 0..p.seq_q {
                for h in 0..p.heads_q {
                    let off = b * s.batch + i * s.row + h * s.head;
                    assert!(
                        written(&o[off..off + p.head_dim]),
                        "o row ({b}, {i}, {h}) not written"
                    );
                }
            }
        }
        assert!(written(&lse[..p.lse_len()]), "lse not written");
    }
    r
}

fn dtype_case(rng: &mut StdRng, f: [fn(&mut StdRng, &Case) -> Outcome; 3]) -> Outcome {
    let c = draw(rng);
    let which = rng.random_range(0..3);
    f[which](rng, &c)
}

#[test]
fn fuzz_forward() {
    run("decode::forward", 2500, |rng| {
        dtype_case(
            rng,
            [
                forward_case::<f32>,
                forward_case::<Bf16>,
                forward_case::<F16>,
            ],
        )
    });
}

/// Logical key `j` of sequence `b`: (outer index, row) in the cache, as the docs define it.
fn key_at(p: &Decode<'_>, b: usize, j: usize) -> (usize, usize) {
    match &p.layout {
        Layout::Contiguous { .. } => (b, j),
        Layout::Paged {
            page_size,
            block_table: Some(block_table),
            pages_per_seq,
            ..
        } => (
            block_table[b * pages_per_seq + j / page_size] as usize,
            j % page_size,
        ),
        Layout::Rolling {
            n_sink,
            window,
            ring_offsets: Some(ring_offsets),
            ..
        } => {
            let slot = if j < *n_sink {
                j
            } else {
                n_sink + (j - n_sink + ring_offsets[b] as usize) % window
            };
            (b, slot)
        }
        _ => panic!("the fuzzer's problems carry host tables"),
    }
}

fn append_case<T: Element>(rng: &mut StdRng, c: &Case) -> Outcome {
    let dev = Device::cpu();
    let p = c.problem();
    let new_n = Some(p.new_kv_len()).filter(|&n| n <= MAX_ELEMS);
    let (kn, kn_short) = sized(rng, new_n, random::<T>);
    let (vn, vn_short) = sized(rng, new_n, random::<T>);
    let kd = cache_dims(&p);
    let (mut k, k_short) = sized(rng, reach(&p.k_strides, kd), |_, n| poisoned::<T>(n));
    let (mut v, v_short) = sized(rng, reach(&p.v_strides, kd), |_, n| poisoned::<T>(n));
    let r = decode::append(
        &dev,
        &p,
        (&kn).into(),
        (&vn).into(),
        Tables::host(&p),
        (&mut k).into(),
        (&mut v).into(),
    );
    if r.is_ok() {
        assert!(
            !(kn_short || vn_short || k_short || v_short),
            "Ok with a short buffer"
        );
        // Every new row landed where the layout puts logical key len - seq_q + i.
        for (b, &l) in p.cache_seqlens.host().unwrap().iter().enumerate() {
            for i in 0..p.seq_q {
                let (outer, row) = key_at(&p, b, l as usize - p.seq_q + i);
                for hk in 0..p.heads_kv {
                    let ko =
                        outer * p.k_strides.batch + row * p.k_strides.row + hk * p.k_strides.head;
                    let vo =
                        outer * p.v_strides.batch + row * p.v_strides.row + hk * p.v_strides.head;
                    assert!(
                        written(&k[ko..ko + p.head_dim]) && written(&v[vo..vo + p.head_dim]),
                        "row not written"
                    );
                }
            }
        }
    }
    r
}

#[test]
fn fuzz_append() {
    run("decode::append", 2500, |rng| {
        dtype_case(
            rng,
            [append_case::<f32>, append_case::<Bf16>, append_case::<F16>],
        )
    });
}

/// The constructors, builders and size helpers: never a panic, whatever the sizes.
#[test]
fn fuzz_decode_helpers() {
    run("decode helpers", 4000, |rng| {
        let mut c = draw(rng);
        // Hostile sizes everywhere, not only where the generator usually puts them.
        if one_in(rng, 2) {
            c.seq_q = size(rng, 17);
            c.heads_q = size(rng, 8);
            c.heads_kv = size(rng, 4);
            c.d = size(rng, 300);
            c.kind = match c.kind {
                Kind::Contiguous { .. } => Kind::Contiguous {
                    capacity: size(rng, 200),
                },
                Kind::Paged { .. } => Kind::Paged {
                    page_size: size(rng, 64),
                    num_pages: size(rng, 16),
                    pages_per_seq: size(rng, 8),
                },
                Kind::Rolling { rope, .. } => Kind::Rolling {
                    n_sink: size(rng, 8),
                    window: size(rng, 64),
                    rope,
                },
            };
        }
        let dev = Device::cpu_with_threads(size(rng, 64).clamp(1, 256))?;
        let p = c
            .problem()
            .scale(float(rng, 0.01, 2.0))
            .splits(size(rng, 65));
        let _ = (
            p.batch(),
            p.softmax_scale(),
            p.o_len(),
            p.lse_len(),
            p.new_kv_len(),
            p.capacity(),
        );
        let _ = (
            p.splits_for(&dev),
            p.keys_per_split(size(rng, 65)),
            p.workspace_len(&dev),
        );
        let (a, b, cc, d, e) = (
            size(rng, 8),
            size(rng, 16),
            size(rng, 64),
            size(rng, 300),
            size(rng, 65),
        );
        let _ = decode::workspace_len(a, b, cc, d, e);
        let s = decode::num_splits(a, b, cc, d, size(rng, 200));
        assert!((1..=decode::MAX_SPLITS).contains(&s));
        let r = Rope {
            style: pick(rng, &[RopeStyle::NeoX, RopeStyle::Interleaved]),
            theta: float(rng, 1.5, 1e5),
        };
        let _ = (
            r.inv_freq(size(rng, 128), size(rng, 256)),
            r.pair(size(rng, 128), size(rng, 256)),
        );
        // The checked size is what forward would take, or forward's own error.
        let n = p.checked_workspace_len(&dev)?;
        assert!(n <= p.workspace_len(&dev));
        Ok(())
    });
}

/// RollingCache: construction, steps, the tables it hands out and the layout.
#[test]
fn fuzz_rolling_cache() {
    run("decode::RollingCache", 3000, |rng| {
        let batch = if one_in(rng, 10) {
            size(rng, 4)
        } else {
            rng.random_range(1..=3)
        };
        let n_sink = if one_in(rng, 10) {
            size(rng, 8)
        } else {
            rng.random_range(0..=4)
        };
        let window = if one_in(rng, 10) {
            size(rng, 64)
        } else {
            rng.random_range(0..=40)
        };
        let rope = Rope {
            style: pick(rng, &[RopeStyle::NeoX, RopeStyle::Interleaved]),
            theta: float(rng, 0.5, 1e5),
        };
        let mut c = RollingCache::new(batch, n_sink, window, rope)?;
        let mut seen = 0u64;
        let mut last = Ok(());
        for _ in 0..rng.random_range(0..30) {
            let step = if one_in(rng, 8) {
                size(rng, 64)
            } else {
                rng.random_range(1..=window.min(8))
            };
            last = c.advance(step);
            if last.is_ok() {
                seen += step as u64;
            }
        }
        assert_eq!(c.seen(0), seen);
        assert_eq!(c.seen(batch), 0);
        let (lens, offs) = (c.cache_seqlens(), c.ring_offsets());
        assert_eq!((lens.len(), offs.len()), (batch, batch));
        let cap = c.capacity();
        for b in 0..batch {
            assert!(lens[b] as usize <= cap && (offs[b] as usize) < window);
            // kept lists every kept token: only where that is small.
            if lens[b] <= 1 << 12 {
                assert_eq!(c.kept(b).len(), lens[b] as usize);
            }
        }
        // The layout is one forward accepts (given the buffers), with every table consistent.
        let p = Decode::new(&lens, 1, 1, 1, 64, c.layout(&offs));
        let dev = Device::cpu();
        let n = p.checked_workspace_len(&dev)?;
        assert_eq!(n, p.workspace_len(&dev).min(n));
        last
    });
}
