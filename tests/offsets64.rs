//! 64-bit element offsets (issue 13, item 8): one kernel per family reads and writes elements
//! beyond 2^31 (byte offsets beyond 2^32), where an `int` index would wrap. A large stride
//! (or a high page number) over a small footprint is enough: the buffers are allocated
//! uninitialised and only the elements the call touches are uploaded, so the emulator (whose
//! memory is lazily zeroed host pages) and a real GPU both hold them cheaply.
//!
//! Each result is compared with the CPU path on the same values in a compact layout; a
//! poisoned canary where a 32-bit wrap of the offset would land must stay untouched. GPU-only
//! (the CPU path indexes with usize): skipped without a device, failing with
//! `ATTNKIT_REQUIRE_GPU=1`, as every GPU test.
#![cfg(feature = "cuda")]

mod common;

use std::sync::{Arc, Mutex};

use attnkit::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use attnkit::flash::{self, Attention, Strides};
use attnkit::monarch::{self, MonarchShape, Rows, Weights};
use attnkit::{Device, Element, F16};
use common::{assert_close, gpu, poisoned, random, rng, to_f32};

/// Past 2^31 elements: the second batch (or row, or page) starts here.
const BIG: usize = (1 << 31) + 4096;

/// The tests share one device whose memory (16 GiB on the emulator) holds one test's
/// buffers at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A large device buffer, uninitialised except for what `put` uploads.
struct Sparse<T> {
    s: Arc<CudaStream>,
    buf: CudaSlice<T>,
}

impl<T: DeviceRepr + Clone> Sparse<T> {
    fn new(s: &Arc<CudaStream>, len: usize) -> Self {
        // SAFETY: nothing reads an element that `put` did not write first (the kernels read
        // only the elements the problem reaches, and the tests upload exactly those).
        let buf = unsafe { s.alloc::<T>(len) }.expect("allocating a sparse buffer");
        Sparse { s: s.clone(), buf }
    }

    fn put(&mut self, off: usize, data: &[T]) {
        let mut dst = self.buf.slice_mut(off..off + data.len());
        self.s.memcpy_htod(data, &mut dst).expect("upload");
    }

    fn get(&self, off: usize, n: usize) -> Vec<T> {
        let mut host = vec![zeroed::<T>(); n];
        self.s
            .memcpy_dtoh(&self.buf.slice(off..off + n), &mut host)
            .expect("download");
        host
    }
}

/// A value of `T` to size host vectors with before a download overwrites them.
fn zeroed<T: DeviceRepr>() -> T {
    // SAFETY: every `T` used here (f16, f32, i32) is valid as all-zero bits.
    unsafe { std::mem::zeroed() }
}

#[test]
fn flash_reads_and_writes_past_2_31_elements() {
    let Some(dev) = gpu("flash_reads_and_writes_past_2_31_elements") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = dev.stream().unwrap().clone();
    let mut r = rng("flash_reads_and_writes_past_2_31_elements");
    let (batch, seq, hq, hkv, d) = (2, 37, 2, 1, 64);
    // q, k and v interleaved in one buffer's rows: [q heads | k | v], batch b at b * BIG.
    let width = (hq + 2 * hkv) * d;
    let slab = seq * width;
    let (q, k, v) = (
        random::<F16>(&mut r, batch * seq * hq * d),
        random::<F16>(&mut r, batch * seq * hkv * d),
        random::<F16>(&mut r, batch * seq * hkv * d),
    );
    let mut qkv = Sparse::<F16>::new(&s, BIG + slab);
    for b in 0..batch {
        let mut rows = Vec::with_capacity(slab);
        for i in 0..seq {
            let t = b * seq + i;
            rows.extend_from_slice(&q[t * hq * d..(t + 1) * hq * d]);
            rows.extend_from_slice(&k[t * hkv * d..(t + 1) * hkv * d]);
            rows.extend_from_slice(&v[t * hkv * d..(t + 1) * hkv * d]);
        }
        qkv.put(b * BIG, &rows);
    }
    let o_slab = seq * hq * d;
    let mut o = Sparse::<F16>::new(&s, BIG + o_slab);
    // Batch 1's rows at BIG. A 32-bit wrap of their byte offsets would land at element 4096,
    // inside batch 0's rows (compared below); nothing may be written between the batches.
    o.put(0, &poisoned::<F16>(4096 + o_slab));
    o.put(BIG, &poisoned::<F16>(o_slab));
    let mut lse = s.clone_htod(&vec![f32::NAN; batch * hq * seq]).unwrap();

    let mut a = Attention::new(batch, seq, seq, hq, hkv, d).causal(true);
    let kv_strides = Strides {
        batch: BIG,
        row: width,
        head: d,
        dim: 1,
    };
    a.q_strides = kv_strides;
    a.k_strides = kv_strides;
    a.v_strides = kv_strides;
    a.o_strides = Strides {
        batch: BIG,
        row: hq * d,
        head: d,
        dim: 1,
    };
    flash::forward(
        &dev,
        &a,
        qkv.buf.slice(..).into(),
        qkv.buf.slice(hq * d..).into(),
        qkv.buf.slice((hq + hkv) * d..).into(),
        o.buf.slice_mut(..).into(),
        (&mut lse).into(),
    )
    .expect("flash forward with offsets past 2^31");
    dev.synchronize().unwrap();

    let compact = Attention::new(batch, seq, seq, hq, hkv, d).causal(true);
    let (mut want_o, mut want_lse) = (
        poisoned::<F16>(compact.o_len()),
        vec![0.0; compact.lse_len()],
    );
    flash::forward(
        &Device::cpu(),
        &compact,
        (&q).into(),
        (&k).into(),
        (&v).into(),
        (&mut want_o).into(),
        (&mut want_lse).into(),
    )
    .unwrap();
    let mut got = o.get(0, o_slab);
    got.extend(o.get(BIG, o_slab));
    let want: Vec<f64> = to_f32(&want_o).iter().map(|&x| x as f64).collect();
    // Two f16 roundings of the same f32 computation (the kernel's P is f16 too).
    assert_close("o", &to_f32(&got), &want, 4e-3, 1e-2);
    let want_lse: Vec<f64> = want_lse.iter().map(|&x| x as f64).collect();
    assert_close("lse", &s.clone_dtoh(&lse).unwrap(), &want_lse, 1e-3, 1e-3);
    let canary = o.get(o_slab, 4096);
    assert!(
        canary.iter().all(|x| x.to_f32().is_nan()),
        "o: elements between the batches were written"
    );
}

#[test]
fn monarch_reads_and_writes_past_2_31_elements() {
    let Some(dev) = gpu("monarch_reads_and_writes_past_2_31_elements") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = dev.stream().unwrap().clone();
    let mut r = rng("monarch_reads_and_writes_past_2_31_elements");
    // The tensor-core path (f16, p, r, s multiples of 16): 4 blocks of 16.
    let shape = MonarchShape::square(64, 4).unwrap();
    let (n_in, n_out, tokens) = (shape.n_in(), shape.n_out(), 3);
    let (w1, w2) = (
        random::<F16>(&mut r, shape.w1_len()),
        random::<F16>(&mut r, shape.w2_len()),
    );
    let x = random::<F16>(&mut r, tokens * n_in);
    // Token t's row at t * stride: token 2 starts at BIG, past 2^31 elements; a 32-bit wrap
    // of its byte offset would land at element 4096, in the poisoned gap after token 0.
    let stride = BIG / 2;
    let mut xd = Sparse::<F16>::new(&s, (tokens - 1) * stride + n_in);
    let mut yd = Sparse::<F16>::new(&s, (tokens - 1) * stride + n_out);
    for t in 0..tokens {
        xd.put(t * stride, &x[t * n_in..(t + 1) * n_in]);
        yd.put(t * stride, &poisoned::<F16>(n_out));
    }
    yd.put(n_out, &poisoned::<F16>(8192 + n_out));
    let (w1d, w2d) = (s.clone_htod(&w1).unwrap(), s.clone_htod(&w2).unwrap());
    let w = Weights {
        shape,
        w1: (&w1d).into(),
        w2: (&w2d).into(),
        bias: None,
    };
    let rows = Rows {
        tokens,
        width: n_in,
        row_stride: stride,
    };
    monarch::multiply(
        &dev,
        &w,
        xd.buf.slice(..).into(),
        rows,
        yd.buf.slice_mut(..).into(),
        stride,
    )
    .expect("monarch multiply with row offsets past 2^31");
    dev.synchronize().unwrap();

    let mut want = poisoned::<F16>(tokens * n_out);
    let wh = Weights {
        shape,
        w1: (&w1).into(),
        w2: (&w2).into(),
        bias: None,
    };
    monarch::multiply(
        &Device::cpu(),
        &wh,
        (&x).into(),
        Rows::contiguous(tokens, n_in),
        (&mut want).into(),
        n_out,
    )
    .unwrap();
    let got: Vec<F16> = (0..tokens)
        .flat_map(|t| yd.get(t * stride, n_out))
        .collect();
    let want: Vec<f64> = to_f32(&want).iter().map(|&x| x as f64).collect();
    assert_close("y", &to_f32(&got), &want, 2e-2, 1e-2);
    assert!(
        yd.get(n_out, 8192 + n_out)
            .iter()
            .all(|x| x.to_f32().is_nan()),
        "y: elements between the rows (where a 32-bit offset would wrap) were written"
    );
}

#[test]
fn decode_reads_a_page_past_2_31_elements() {
    use attnkit::decode::{self, Decode, Layout, Tables};
    let Some(dev) = gpu("decode_reads_a_page_past_2_31_elements") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = dev.stream().unwrap().clone();
    let mut r = rng("decode_reads_a_page_past_2_31_elements");
    let (hq, hkv, d, page, pps) = (4, 1, 64, 16, 4);
    let page_len = page * hkv * d;
    // Pages 2^21 and 2^21 + 1 start at 2^31 and 2^31 + 1024 elements.
    let high = 1usize << 21;
    let num_pages = high + 2;
    let lens = [40i32, 23];
    let block_table = [
        (high + 1) as i32,
        3,
        high as i32,
        -1,
        7,
        (high + 1) as i32 - 2,
        -1,
        -1,
    ];
    let (kc, vc) = (
        random::<F16>(&mut r, 8 * page_len),
        random::<F16>(&mut r, 8 * page_len),
    );
    let (mut kd, mut vd) = (
        Sparse::<F16>::new(&s, num_pages * page_len),
        Sparse::<F16>::new(&s, num_pages * page_len),
    );
    // Logical page i of the test's compact cache is the table's i-th used page.
    let used: Vec<usize> = block_table
        .iter()
        .filter(|&&p| p >= 0)
        .map(|&p| p as usize)
        .collect();
    for (i, &p) in used.iter().enumerate() {
        kd.put(p * page_len, &kc[i * page_len..(i + 1) * page_len]);
        vd.put(p * page_len, &vc[i * page_len..(i + 1) * page_len]);
    }
    let q = random::<F16>(&mut r, lens.len() * hq * d);
    let layout = Layout::Paged {
        page_size: page,
        num_pages,
        block_table: Some(&block_table),
        pages_per_seq: pps,
    };
    let p = Decode::new(&lens, 1, hq, hkv, d, layout).splits(2);
    let (qd, lens_d, bt_d) = (
        s.clone_htod(&q).unwrap(),
        s.clone_htod(&lens).unwrap(),
        s.clone_htod(&block_table).unwrap(),
    );
    let mut od = s.clone_htod(&poisoned::<F16>(p.o_len())).unwrap();
    let mut ld = s.clone_htod(&vec![f32::NAN; p.lse_len()]).unwrap();
    let mut wd = s
        .clone_htod(&vec![f32::NAN; p.workspace_len(&dev).max(1)])
        .unwrap();
    let tables = Tables {
        cache_seqlens: (&lens_d).into(),
        block_table: Some((&bt_d).into()),
        ring_offsets: None,
        sink_logits: None,
        alibi_slopes: None,
    };
    decode::forward(
        &dev,
        &p,
        (&qd).into(),
        kd.buf.slice(..).into(),
        vd.buf.slice(..).into(),
        tables,
        (&mut wd).into(),
        (&mut od).into(),
        (&mut ld).into(),
    )
    .expect("decode with pages past 2^31 elements");
    dev.synchronize().unwrap();

    // The same keys in a compact paged cache: the used pages renumbered 0, 1, 2, ...
    let mut next = 0i32;
    let compact_table: Vec<i32> = block_table
        .iter()
        .map(|&p| {
            if p < 0 {
                return -1;
            }
            next += 1;
            next - 1
        })
        .collect();
    let compact = Decode::new(
        &lens,
        1,
        hq,
        hkv,
        d,
        Layout::Paged {
            page_size: page,
            num_pages: used.len(),
            block_table: Some(&compact_table),
            pages_per_seq: pps,
        },
    )
    .splits(2);
    let cpu = Device::cpu();
    let mut want_o = poisoned::<F16>(compact.o_len());
    let mut want_lse = vec![f32::NAN; compact.lse_len()];
    let mut ws = vec![f32::NAN; compact.workspace_len(&cpu)];
    decode::forward(
        &cpu,
        &compact,
        (&q).into(),
        (&kc[..used.len() * page_len]).into(),
        (&vc[..used.len() * page_len]).into(),
        Tables::host(&compact),
        (&mut ws).into(),
        (&mut want_o).into(),
        (&mut want_lse).into(),
    )
    .unwrap();
    let want: Vec<f64> = to_f32(&want_o).iter().map(|&x| x as f64).collect();
    assert_close("o", &to_f32(&s.clone_dtoh(&od).unwrap()), &want, 4e-3, 1e-2);
    let want_lse: Vec<f64> = want_lse.iter().map(|&x| x as f64).collect();
    assert_close("lse", &s.clone_dtoh(&ld).unwrap(), &want_lse, 2e-3, 1e-3);
}
