//! Device-only tables ([`Decode::with_device_tables`]): the host gives the batch and a bound on
//! the lengths, the layouts no host tables, and the call's `Tables` alone hold the lengths,
//! block table and ring offsets. They must give the bits of host tables in every layout, for
//! `forward` and `append`; a stale table (a length past the declared bound, a page past
//! `num_pages`, a ring offset past the window) is a CPU error naming its buffer and, on a GPU,
//! an empty sequence (`O = 0`, `LSE = -inf`) beside bit-identical others.

use super::*;

const BATCH: usize = 3;
const SEQ_Q: usize = 2;
const HQ: usize = 4;
const HK: usize = 2;
const D: usize = 64;
/// Contiguous and paged capacity: room for a stale length past what the splits cover.
const CAP: usize = 512;
const PAGE: usize = 16;
const PER: usize = CAP / PAGE;
const N_SINK: usize = 4;
const WINDOW: usize = 124;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Contiguous,
    Paged,
    Rolling,
}

const KINDS: [Kind; 3] = [Kind::Contiguous, Kind::Paged, Kind::Rolling];

/// A batch of three sequences in one layout, with its tables.
struct Batch {
    kind: Kind,
    lens: Vec<i32>,
    table: Vec<i32>,
    offs: Vec<i32>,
}

impl Batch {
    fn new(kind: Kind, rng: &mut StdRng) -> Self {
        // Rolling: two full rings turned by different offsets and one still filling.
        let lens = match kind {
            Kind::Rolling => vec![(N_SINK + WINDOW) as i32, 50, (N_SINK + WINDOW) as i32],
            _ => vec![70, 5, 200],
        };
        let mut table: Vec<i32> = (0..(BATCH * PER) as i32).collect();
        table.shuffle(rng);
        Batch {
            kind,
            lens,
            table,
            offs: vec![37, 0, 5],
        }
    }

    /// The layout, with its host table or (`host` false) without.
    fn layout(&self, host: bool) -> Layout<'_> {
        match self.kind {
            Kind::Contiguous => Layout::Contiguous { capacity: CAP },
            Kind::Paged => Layout::Paged {
                page_size: PAGE,
                num_pages: BATCH * PER,
                block_table: host.then_some(&self.table[..]),
                pages_per_seq: PER,
            },
            Kind::Rolling => Layout::Rolling {
                n_sink: N_SINK,
                window: WINDOW,
                ring_offsets: host.then_some(&self.offs[..]),
                rope: Rope {
                    style: RopeStyle::NeoX,
                    theta: 10000.0,
                },
            },
        }
    }

    fn cache_len(&self) -> usize {
        let rows = match self.kind {
            Kind::Contiguous | Kind::Paged => BATCH * CAP,
            Kind::Rolling => BATCH * (N_SINK + WINDOW),
        };
        rows * HK * D
    }

    fn max_len(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).max().unwrap()
    }

    fn host(&self) -> Decode<'_> {
        Decode::new(&self.lens, SEQ_Q, HQ, HK, D, self.layout(true))
    }

    fn device(&self) -> Decode<'_> {
        Decode::with_device_tables(BATCH, self.max_len(), SEQ_Q, HQ, HK, D, self.layout(false))
    }

    /// The call's tables: these lengths, and this table or these offsets as the layout uses.
    fn idx<'a>(&self, lens: &'a [i32], table: &'a [i32], offs: &'a [i32]) -> Idx<'a> {
        Idx {
            lens,
            block_table: (self.kind == Kind::Paged).then_some(table),
            ring_offsets: (self.kind == Kind::Rolling).then_some(offs),
        }
    }

    fn own_idx(&self) -> Idx<'_> {
        self.idx(&self.lens, &self.table, &self.offs)
    }
}

fn bits<T: Element>(x: &[T]) -> Vec<u32> {
    x.iter().map(|y| y.to_f32().to_bits()).collect()
}

#[test]
fn device_only_tables_give_the_bits_of_host_tables() {
    let test = "device_only_tables_give_the_bits_of_host_tables";
    let mut rng = rng(test);
    for dev in devices(test) {
        for kind in KINDS {
            let bt = Batch::new(kind, &mut rng);
            let k = random::<Bf16>(&mut rng, bt.cache_len());
            let v = random::<Bf16>(&mut rng, bt.cache_len());
            for splits in [None, Some(3)] {
                let (mut host, mut device) = (bt.host(), bt.device());
                host.num_splits = splits;
                device.num_splits = splits;
                let q = random::<Bf16>(&mut rng, host.o_len());
                let what = format!("{} {kind:?} splits {splits:?}", dev.name());
                let want = run(&dev, &host, &q, &k, &v).unwrap();
                let got =
                    run_idx(&dev, &device, bt.own_idx(), Heads::default(), &q, &k, &v).unwrap();
                assert_eq!(bits(&got.0), bits(&want.0), "{what}: o");
                assert_eq!(bits(&got.1), bits(&want.1), "{what}: lse");
            }
            let host = bt.host();
            let kn = random::<Bf16>(&mut rng, host.new_kv_len());
            let vn = random::<Bf16>(&mut rng, host.new_kv_len());
            let (mut hk, mut hv) = (k.clone(), v.clone());
            let (mut dk, mut dv) = (k.clone(), v.clone());
            run_append(&dev, &host, &kn, &vn, &mut hk, &mut hv).unwrap();
            run_append_idx(&dev, &bt.device(), bt.own_idx(), &kn, &vn, &mut dk, &mut dv).unwrap();
            let what = format!("{} {kind:?} append", dev.name());
            assert_ne!(bits(&hk), bits(&k), "{what}: nothing written");
            assert_eq!(bits(&dk), bits(&hk), "{what}: k");
            assert_eq!(bits(&dv), bits(&hv), "{what}: v");
        }
    }
}

#[test]
fn stale_device_tables_are_cpu_errors_and_empty_gpu_rows() {
    let test = "stale_device_tables_are_cpu_errors_and_empty_gpu_rows";
    let mut rng = rng(test);
    // (layout, the stale entry of sequence 1, the buffer named): 300 keys are past what two
    // splits of max_len 200 cover (2 x 128) yet within the capacity, so only the new re-check
    // stands between them and a partial read.
    type Stale = fn(&mut [i32], &mut [i32], &mut [i32]);
    let cases: [(Kind, Stale, &str); 4] = [
        (Kind::Contiguous, |l, _, _| l[1] = 300, "cache_seqlens"),
        (Kind::Paged, |l, _, _| l[1] = 300, "cache_seqlens"),
        (
            Kind::Paged,
            |_, t, _| t[PER] = (BATCH * PER) as i32,
            "block_table",
        ),
        (
            Kind::Rolling,
            |_, _, o| o[1] = WINDOW as i32,
            "ring_offsets",
        ),
    ];
    for dev in devices(test) {
        for (kind, stale, arg) in cases {
            let bt = Batch::new(kind, &mut rng);
            let k = random::<Bf16>(&mut rng, bt.cache_len());
            let v = random::<Bf16>(&mut rng, bt.cache_len());
            let p = bt.device().splits(2);
            let q = random::<Bf16>(&mut rng, p.o_len());
            let good = run_idx(&dev, &p, bt.own_idx(), Heads::default(), &q, &k, &v).unwrap();
            let (mut lens, mut table, mut offs) =
                (bt.lens.clone(), bt.table.clone(), bt.offs.clone());
            stale(&mut lens, &mut table, &mut offs);
            let what = format!("{} {kind:?} stale {arg}", dev.name());
            let r = run_idx(
                &dev,
                &p,
                bt.idx(&lens, &table, &offs),
                Heads::default(),
                &q,
                &k,
                &v,
            );
            if !dev.is_cuda() {
                match r {
                    Err(e) => assert_eq!(e.arg(), Some(arg), "{what}: {e}"),
                    Ok(_) => panic!("{what}: accepted on the CPU"),
                }
                continue;
            }
            let (o, lse) = r.unwrap();
            let (o_seq, lse_seq) = (SEQ_Q * HQ * D, HQ * SEQ_Q);
            for b in 0..BATCH {
                let (os, ls) = (b * o_seq..(b + 1) * o_seq, b * lse_seq..(b + 1) * lse_seq);
                if b == 1 {
                    assert!(o[os].iter().all(|x| x.to_f32() == 0.0), "{what}: O not 0");
                    assert!(
                        lse[ls].iter().all(|&x| x == f32::NEG_INFINITY),
                        "{what}: LSE not -inf"
                    );
                } else {
                    assert_eq!(bits(&o[os.clone()]), bits(&good.0[os]), "{what}: seq {b} o");
                    assert_eq!(
                        bits(&lse[ls.clone()]),
                        bits(&good.1[ls]),
                        "{what}: seq {b} lse"
                    );
                }
            }
        }
    }
}

/// An append with a stale length: a CPU error; on a GPU the stale sequence's slot is left as
/// it was and the others get exactly the rows a good append writes.
#[test]
fn stale_device_lengths_append_nothing() {
    let test = "stale_device_lengths_append_nothing";
    let mut rng = rng(test);
    for dev in devices(test) {
        let bt = Batch::new(Kind::Contiguous, &mut rng);
        let k = random::<Bf16>(&mut rng, bt.cache_len());
        let v = random::<Bf16>(&mut rng, bt.cache_len());
        let p = bt.device().splits(2);
        let kn = random::<Bf16>(&mut rng, p.new_kv_len());
        let vn = random::<Bf16>(&mut rng, p.new_kv_len());
        let (mut gk, mut gv) = (k.clone(), v.clone());
        run_append_idx(&dev, &p, bt.own_idx(), &kn, &vn, &mut gk, &mut gv).unwrap();
        let mut lens = bt.lens.clone();
        lens[1] = 300;
        let (mut sk, mut sv) = (k.clone(), v.clone());
        let r = run_append_idx(
            &dev,
            &p,
            bt.idx(&lens, &[], &[]),
            &kn,
            &vn,
            &mut sk,
            &mut sv,
        );
        let what = format!("{} stale append", dev.name());
        if !dev.is_cuda() {
            match r {
                Err(e) => assert_eq!(e.arg(), Some("cache_seqlens"), "{what}: {e}"),
                Ok(_) => panic!("{what}: accepted on the CPU"),
            }
            assert_eq!(bits(&sk), bits(&k), "{what}: written on error");
            continue;
        }
        r.unwrap();
        let slot = CAP * HK * D;
        for (name, got, good, orig) in [("k", &sk, &gk, &k), ("v", &sv, &gv, &v)] {
            for b in 0..BATCH {
                let want = if b == 1 { orig } else { good };
                let s = b * slot..(b + 1) * slot;
                assert_eq!(
                    bits(&got[s.clone()]),
                    bits(&want[s]),
                    "{what}: {name} seq {b}"
                );
            }
        }
    }
}
