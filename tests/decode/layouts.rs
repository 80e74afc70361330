//! Head dims 80, 112 and 192 (shared rows padded to 64 bytes on the tensor-core path), page
//! sizes 8 and 32, and the two server layouts of a paged cache, token-major
//! `[blocks, page, heads_kv, d]` (vLLM, mistral.rs) and head-major `[blocks, heads_kv, page, d]`,
//! reached through the strides; each against the f64 oracle on the CPU and the GPU.

use super::*;
use attnkit::flash::Strides;

/// The head dims without a power-of-two row (80, 112) or with a 384-byte one (192), every
/// dtype, at small sizes: contiguous caches (GQA 3, lengths 0, 1, odd and past a tile, two
/// splits; one block of 16 rows), a rolling cache with RoPE (pairs across the padded row:
/// NeoX pairs c with c + d / 2), and the softcap with ALiBi.
fn new_head_dims<T: Element>(test: &str) {
    let mut rng = rng(test);
    for dev in devices(test) {
        for (d, style) in [
            (80, RopeStyle::NeoX),
            (112, RopeStyle::Interleaved),
            (192, RopeStyle::NeoX),
        ] {
            contiguous_case::<T>(&mut rng, &dev, &[0, 1, 77, 130], 3, (6, 2), d, Some(2));
            contiguous_case::<T>(&mut rng, &dev, &[70], 8, (2, 1), d, Some(1));

            let rope = Rope {
                style,
                theta: 10000.0,
            };
            // A full ring turned by 17 slots and one still filling.
            let (lens, offs) = ([64, 30], [17, 0]);
            let layout = Layout::Rolling {
                n_sink: 4,
                window: 60,
                ring_offsets: Some(&offs),
                rope,
            };
            let p = Decode::new(&lens, 2, 6, 2, d, layout).splits(2);
            let n_kv = lens.len() * 64 * 2 * d;
            let q = random::<T>(&mut rng, p.o_len());
            let (k, v) = (random::<T>(&mut rng, n_kv), random::<T>(&mut rng, n_kv));
            let (o, lse) = run(&dev, &p, &q, &k, &v).unwrap();
            let what = format!("{} {} d={d} rolling {style:?}", dev.name(), T::DTYPE);
            check(&what, &p, &q, &contiguous_keys(&p, &k, &v), &o, &lse);

            let lens = [150, 9];
            let p = Decode::new(&lens, 3, 6, 2, d, Layout::Contiguous { capacity: 160 })
                .softcap(20.0)
                .splits(2);
            let slopes = [0.3f32, 0.1, 0.03, 0.01, 0.003, 0.0];
            let heads = Heads {
                alibi: Some(&slopes),
                sinks: None,
            };
            let n_kv = lens.len() * 160 * 2 * d;
            let q = random::<T>(&mut rng, p.o_len());
            let (k, v) = (random::<T>(&mut rng, n_kv), random::<T>(&mut rng, n_kv));
            let (o, lse) = run_with(&dev, &p, heads, &q, &k, &v).unwrap();
            let what = format!("{} {} d={d} softcap + alibi", dev.name(), T::DTYPE);
            check_with(&what, &p, heads, &q, &contiguous_keys(&p, &k, &v), &o, &lse);
        }
    }
}

#[test]
fn head_dims_80_112_192_f32() {
    new_head_dims::<f32>("head_dims_80_112_192_f32");
}

#[test]
fn head_dims_80_112_192_f16() {
    new_head_dims::<F16>("head_dims_80_112_192_f16");
}

#[test]
fn head_dims_80_112_192_bf16() {
    new_head_dims::<Bf16>("head_dims_80_112_192_bf16");
}

/// The cache `[batch, cap, hk, d]` (contiguous `k`, `v`) scattered into pages under a random
/// block table, head-major: `[pages, hk, page_size, d]`. Returns (k, v, table, pages per seq).
fn paginate_head_major<T: Element>(
    rng: &mut StdRng,
    k: &[T],
    v: &[T],
    (batch, cap, hk, d): (usize, usize, usize, usize),
    page_size: usize,
) -> (Vec<T>, Vec<T>, Vec<i32>, usize) {
    let per = cap.div_ceil(page_size);
    let n_pages = batch * per + 3; // spare pages nobody uses (as paginate)
    let mut ids: Vec<i32> = (0..n_pages as i32).collect();
    ids.shuffle(rng);
    let table = ids[..batch * per].to_vec();
    let mut pk = poisoned::<T>(n_pages * page_size * hk * d);
    let mut pv = poisoned::<T>(n_pages * page_size * hk * d);
    for b in 0..batch {
        for j in 0..cap {
            let page = table[b * per + j / page_size] as usize;
            for h in 0..hk {
                let dst = ((page * hk + h) * page_size + j % page_size) * d;
                let src = ((b * cap + j) * hk + h) * d;
                pk[dst..dst + d].copy_from_slice(&k[src..src + d]);
                pv[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
    }
    (pk, pv, table, per)
}

/// A block table and its columns (pages per sequence).
type Table<'a> = (&'a [i32], usize);

/// The problems of one paged cache in the two layouts: token-major (the default strides) and
/// head-major (`row = d`, `head = page_size * d`), each with its block table and columns.
fn two_layouts<'a>(
    lens: &'a [i32],
    seq_q: usize,
    (hq, hk, d): (usize, usize, usize),
    page_size: usize,
    num_pages: usize,
    ((table, per), (h_table, h_per)): (Table<'a>, Table<'a>),
) -> (Decode<'a>, Decode<'a>) {
    let layout = |block_table, pages_per_seq| Layout::Paged {
        page_size,
        num_pages,
        block_table: Some(block_table),
        pages_per_seq,
    };
    let tok = Decode::new(lens, seq_q, hq, hk, d, layout(table, per));
    let mut head = Decode::new(lens, seq_q, hq, hk, d, layout(h_table, h_per));
    head.k_strides = Strides {
        batch: hk * page_size * d,
        row: d,
        head: page_size * d,
        dim: 1,
    };
    head.v_strides = head.k_strides;
    (tok.splits(2), head.splits(2))
}

/// Both server layouts of one paged cache: the token-major one under the default strides,
/// the head-major one under `row = d, head = page_size * d`, each checked against the oracle
/// (which reads the cache through the strides on its own), the two bit-identical; then the
/// same new tokens appended into both land where each layout puts them, and attention over
/// the grown caches agrees with the oracle again.
fn server_layouts<T: Element>(test: &str, page_size: usize, d: usize) {
    let mut rng = rng(test);
    for dev in devices(test) {
        let (batch, cap, hq, hk, sq) = (4, 160, 8, 2, 2);
        let lens = [1i32, 150, 0, 77];
        let n_kv = batch * cap * hk * d;
        let (k, v) = (random::<T>(&mut rng, n_kv), random::<T>(&mut rng, n_kv));
        let (tk, tv, table, per) = paginate(&mut rng, &k, &v, batch, cap, hk * d, page_size);
        let (hk_k, hk_v, h_table, h_per) =
            paginate_head_major(&mut rng, &k, &v, (batch, cap, hk, d), page_size);
        let pages = tk.len() / (page_size * hk * d);
        let tables = ((&table[..], per), (&h_table[..], h_per));
        let problems =
            |lens, seq_q| two_layouts(lens, seq_q, (hq, hk, d), page_size, pages, tables);
        let (tok, head) = problems(&lens, sq);
        // The default strides are the token-major layout.
        assert_eq!(
            (tok.k_strides.batch, tok.k_strides.row, tok.k_strides.head),
            (page_size * hk * d, hk * d, d)
        );
        let q = random::<T>(&mut rng, tok.o_len());
        let (ot, lt) = run(&dev, &tok, &q, &tk, &tv).unwrap();
        let (oh, lh) = run(&dev, &head, &q, &hk_k, &hk_v).unwrap();
        let what = format!("{} {} page_size={page_size} d={d}", dev.name(), T::DTYPE);
        check(
            &format!("{what} token-major"),
            &tok,
            &q,
            &contiguous_keys(&tok, &tk, &tv),
            &ot,
            &lt,
        );
        check(
            &format!("{what} head-major"),
            &head,
            &q,
            &contiguous_keys(&head, &hk_k, &hk_v),
            &oh,
            &lh,
        );
        assert!(
            ot.iter()
                .zip(&oh)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits())
                && lt.iter().zip(&lh).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: the two layouts' results differ"
        );

        // Append 3 tokens to every sequence, through each layout's strides.
        let grown: Vec<i32> = lens.iter().map(|l| l + 3).collect();
        let (tok, head) = problems(&grown, 3);
        let kn = random::<T>(&mut rng, tok.new_kv_len());
        let vn = random::<T>(&mut rng, tok.new_kv_len());
        let (mut tk, mut tv, mut hk_k, mut hk_v) = (tk, tv, hk_k, hk_v);
        let (mut k_one, mut v_one) = (hk_k.clone(), hk_v.clone());
        run_append(&dev, &tok, &kn, &vn, &mut tk, &mut tv).unwrap();
        run_append(&dev, &head, &kn, &vn, &mut hk_k, &mut hk_v).unwrap();
        // One cache at a time (as candle's in-place ops lend them; the kernel skips the
        // other, null, cache) writes the same bits.
        run_append_one(&dev, &head, decode::Cache::Keys, &kn, &mut k_one).unwrap();
        let bits = |x: &[T]| x.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&k_one), bits(&hk_k), "{what}: append_one keys");
        run_append_one(&dev, &head, decode::Cache::Values, &vn, &mut v_one).unwrap();
        assert_eq!(bits(&v_one), bits(&hk_v), "{what}: append_one values");
        for b in 0..batch {
            for i in 0..3 {
                let j = grown[b] as usize - 3 + i;
                for h in 0..hk {
                    let src = ((b * 3 + i) * hk + h) * d;
                    let (page, row) = (j / page_size, j % page_size);
                    let tp = table[b * per + page] as usize;
                    let hp = h_table[b * h_per + page] as usize;
                    let t_off = ((tp * page_size + row) * hk + h) * d;
                    let h_off = ((hp * hk + h) * page_size + row) * d;
                    let same = |a: &[T], b: &[T]| {
                        a.iter()
                            .zip(b)
                            .all(|(x, y)| x.to_f32().to_bits() == y.to_f32().to_bits())
                    };
                    assert!(
                        same(&tk[t_off..t_off + d], &kn[src..src + d])
                            && same(&hk_v[h_off..h_off + d], &vn[src..src + d])
                            && same(&hk_k[h_off..h_off + d], &kn[src..src + d]),
                        "{what}: appended row (b {b}, token {i}, head {h}) is not where its layout puts it"
                    );
                }
            }
        }
        let q = random::<T>(&mut rng, tok.o_len());
        for (name, p, k, v) in [
            ("token-major", &tok, &tk, &tv),
            ("head-major", &head, &hk_k, &hk_v),
        ] {
            let (o, lse) = run(&dev, p, &q, k, v).unwrap();
            check(
                &format!("{what} {name} after append"),
                p,
                &q,
                &contiguous_keys(p, k, v),
                &o,
                &lse,
            );
        }
    }
}

#[test]
fn server_cache_layouts_through_strides_page_8_f32() {
    server_layouts::<f32>("server_cache_layouts_through_strides_page_8_f32", 8, 64);
}

#[test]
fn server_cache_layouts_through_strides_page_32_bf16() {
    server_layouts::<Bf16>("server_cache_layouts_through_strides_page_32_bf16", 32, 128);
}

/// Page sizes: any positive multiple of 8 (8, 24, 40: also ones no tile or split is a
/// multiple of); 0, 4, 12, 20 are typed errors naming page_size.
#[test]
fn page_sizes_are_positive_multiples_of_8() {
    let mut rng = rng("page_sizes_are_positive_multiples_of_8");
    for dev in devices("page_sizes_are_positive_multiples_of_8") {
        let lens = [70, 5];
        for page_size in [0usize, 4, 12, 20, 8, 24, 40] {
            let per = 80usize.div_ceil(page_size.max(1));
            let table: Vec<i32> = (0..2 * per as i32).rev().collect();
            let layout = Layout::Paged {
                page_size,
                num_pages: 2 * per,
                block_table: Some(&table),
                pages_per_seq: per,
            };
            let p = Decode::new(&lens, 2, 4, 2, 64, layout).splits(2);
            let q = random::<f32>(&mut rng, p.o_len());
            let kv = random::<f32>(&mut rng, (2 * per * page_size).max(1) * 2 * 64);
            let r = run(&dev, &p, &q, &kv, &kv);
            if page_size % 8 == 0 && page_size > 0 {
                let (o, lse) = r.unwrap();
                let what = format!("{} page_size={page_size}", dev.name());
                check(&what, &p, &q, &contiguous_keys(&p, &kv, &kv), &o, &lse);
            } else {
                expect_err(r, "page_size");
            }
        }
    }
}
