//! Head dims 80, 112 and 192 (shared rows padded to 64 bytes on the tensor-core path)
//! against the f64 oracle on the CPU and the GPU.

use super::*;

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
                ring_offsets: &offs,
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
