//! CUDA launcher of the decode kernels (`kernels/decode.cu`): the split attention kernel, the
//! LSE combine (more than one split) and the append.

use cudarc::driver::LaunchConfig;

use super::{Layout, Problem, Tables};
use crate::buffer::{Buf, BufMut};
use crate::cuda::{CudaDevice, DevPtrs, params as c};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::flash::Strides;

/// Every kernel loads rows in 16-byte chunks (cp.async, uint4): pointers and strides align.
const ALIGN: usize = 16;

/// The attention kernel for a dtype and head dim, and its dynamic shared memory, from the
/// constants in `kernels/decode.h` (the same the kernels are built with).
fn attn_kernel(dtype: DType, d: usize) -> Result<(&'static str, u32)> {
    let (rows, bn, bn32) = (
        c::ATTNKIT_DECODE_ROWS as usize,
        c::ATTNKIT_DECODE_BLOCK_N as usize,
        c::ATTNKIT_DECODE_F32_BLOCK_N as usize,
    );
    let freqs = d / 2 * 4;
    let smem = match dtype {
        // Q [rows][d], K and V twice (double buffer) [bn][d], 2-byte elements in rows padded
        // to 64 bytes (common.cuh's head_row_bytes: d 80 and 112 take 192- and 256-byte
        // rows); RoPE frequencies.
        DType::F16 | DType::Bf16 => (rows + 4 * bn) * (d * 2).div_ceil(64) * 64 + freqs,
        // f32 rows padded by 4: Q, K, V; P [rows][bn + 1]; frequencies.
        DType::F32 => (rows + 2 * bn32) * (d + 4) * 4 + rows * (bn32 + 1) * 4 + freqs,
    };
    const NAMES: [(DType, usize, &str); 18] = [
        (DType::Bf16, 64, "decode_attn_bf16_d64"),
        (DType::Bf16, 80, "decode_attn_bf16_d80"),
        (DType::Bf16, 112, "decode_attn_bf16_d112"),
        (DType::Bf16, 128, "decode_attn_bf16_d128"),
        (DType::Bf16, 192, "decode_attn_bf16_d192"),
        (DType::Bf16, 256, "decode_attn_bf16_d256"),
        (DType::F16, 64, "decode_attn_f16_d64"),
        (DType::F16, 80, "decode_attn_f16_d80"),
        (DType::F16, 112, "decode_attn_f16_d112"),
        (DType::F16, 128, "decode_attn_f16_d128"),
        (DType::F16, 192, "decode_attn_f16_d192"),
        (DType::F16, 256, "decode_attn_f16_d256"),
        (DType::F32, 64, "decode_attn_f32_d64"),
        (DType::F32, 80, "decode_attn_f32_d80"),
        (DType::F32, 112, "decode_attn_f32_d112"),
        (DType::F32, 128, "decode_attn_f32_d128"),
        (DType::F32, 192, "decode_attn_f32_d192"),
        (DType::F32, 256, "decode_attn_f32_d256"),
    ];
    let name = NAMES
        .iter()
        .find(|(t, dd, _)| *t == dtype && *dd == d)
        .map(|(_, _, n)| *n)
        .ok_or_else(|| Error::Unsupported {
            arg: "head_dim",
            detail: format!("no decode kernel for {dtype} d{d}"),
        })?;
    Ok((name, smem as u32))
}

fn by_dtype(
    dtype: DType,
    bf16: &'static str,
    f16: &'static str,
    f32: &'static str,
) -> &'static str {
    match dtype {
        DType::Bf16 => bf16,
        DType::F16 => f16,
        DType::F32 => f32,
    }
}

/// Strides of the dimensions that have more than one element must be 16-byte multiples.
fn check_stride_align<T>(arg: &'static str, s: &Strides, dims: [usize; 3]) -> Result<()> {
    let per = ALIGN / std::mem::size_of::<T>();
    let used = [(dims[0], s.batch), (dims[1], s.row), (dims[2], s.head)];
    if used.iter().any(|&(n, st)| n > 1 && st % per != 0) {
        return Err(Error::Stride {
            arg,
            detail: format!(
                "{s:?}: batch, row and head strides must be multiples of {per} elements (16 bytes)"
            ),
        });
    }
    Ok(())
}

/// Params with every field the problem decides; pointers left null for the caller.
fn base_params(p: &Problem<'_>) -> c::DecodeParams {
    let (page_size, pages_per_seq, num_pages, n_sink, window, rope_style, log2_theta) =
        match &p.layout {
            Layout::Contiguous { .. } => (0, 0, 0, 0, 0, c::ATTNKIT_ROPE_NONE, 0.0),
            Layout::Paged {
                page_size,
                num_pages,
                pages_per_seq,
                ..
            } => (
                *page_size,
                *pages_per_seq,
                *num_pages,
                0,
                0,
                c::ATTNKIT_ROPE_NONE,
                0.0,
            ),
            Layout::Rolling {
                n_sink,
                window,
                rope,
                ..
            } => {
                let style = match rope.style {
                    super::RopeStyle::NeoX => c::ATTNKIT_ROPE_NEOX,
                    super::RopeStyle::Interleaved => c::ATTNKIT_ROPE_INTERLEAVED,
                };
                (0, 0, 0, *n_sink, *window, style, rope.theta.log2())
            }
        };
    let rows = p.seq_q * p.group();
    // Sizes below were checked to fit i32 (capacity, pages, heads, batch; splits <= 64).
    c::DecodeParams {
        q_batch_stride: p.q.batch as i64,
        q_row_stride: p.q.row as i64,
        q_head_stride: p.q.head as i64,
        o_batch_stride: p.o.batch as i64,
        o_row_stride: p.o.row as i64,
        o_head_stride: p.o.head as i64,
        k_batch_stride: p.k.batch as i64,
        k_row_stride: p.k.row as i64,
        k_head_stride: p.k.head as i64,
        v_batch_stride: p.v.batch as i64,
        v_row_stride: p.v.row as i64,
        v_head_stride: p.v.head as i64,
        batch: p.batch as i32,
        seq_q: p.seq_q as i32,
        heads_q: p.heads_q as i32,
        heads_kv: p.heads_kv as i32,
        head_dim: p.d as i32,
        causal: p.causal as i32,
        window_left: p.window_left.map_or(-1, |w| w as i32),
        num_splits: p.splits as i32,
        keys_per_split: p.keys_per_split.min(i32::MAX as usize) as i32,
        row_blocks: rows.div_ceil(c::ATTNKIT_DECODE_ROWS as usize) as i32,
        capacity: p.capacity as i32,
        page_size: page_size as i32,
        pages_per_seq: pages_per_seq as i32,
        num_pages: num_pages as i32,
        n_sink: n_sink as i32,
        window: window as i32,
        rope_style: rope_style as i32,
        rope_log2_theta: log2_theta,
        scale_log2: p.scale * std::f32::consts::LOG2_E,
        softcap: p.softcap.unwrap_or(0.0),
        ..Default::default()
    }
}

/// The device tables' pointers (checked for 4-byte alignment).
fn table_ptrs<'a>(
    dev: &'a CudaDevice,
    t: &'a Tables<'_>,
    ptrs: &mut DevPtrs<'a>,
) -> Result<(*const i32, *const i32, *const i32)> {
    let lens = ptrs.read(
        "cache_seqlens",
        dev.view("cache_seqlens", &t.cache_seqlens)?,
        &dev.stream,
        4,
    )?;
    let bt = match &t.block_table {
        Some(b) => {
            ptrs.read("block_table", dev.view("block_table", b)?, &dev.stream, 4)? as *const i32
        }
        None => std::ptr::null(),
    };
    let ro = match &t.ring_offsets {
        Some(r) => {
            ptrs.read("ring_offsets", dev.view("ring_offsets", r)?, &dev.stream, 4)? as *const i32
        }
        None => std::ptr::null(),
    };
    Ok((lens as *const i32, bt, ro))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    dev: &CudaDevice,
    p: &Problem<'_>,
    q: &Buf<'_, T>,
    k: &Buf<'_, T>,
    v: &Buf<'_, T>,
    tables: &Tables<'_>,
    ws: &mut BufMut<'_, f32>,
    o: &mut BufMut<'_, T>,
    lse: &mut BufMut<'_, f32>,
) -> Result<()> {
    let (qv, kv, vv) = (
        dev.view("q", q)?,
        dev.view("k_cache", k)?,
        dev.view("v_cache", v)?,
    );
    let (ov, lv, wv) = (
        dev.view_mut("o", o)?,
        dev.view_mut("lse", lse)?,
        dev.view_mut("workspace", ws)?,
    );
    check_stride_align::<T>("q", &p.q, [p.batch, p.seq_q, p.heads_q])?;
    let cache = [p.cache_dims.0, p.cache_dims.1, p.heads_kv];
    check_stride_align::<T>("k_cache", &p.k, cache)?;
    check_stride_align::<T>("v_cache", &p.v, cache)?;
    let (name, smem) = attn_kernel(T::DTYPE, p.d)?;
    let mut ptrs = DevPtrs::default();
    let stream = &dev.stream;
    let (lens, bt, ro) = table_ptrs(dev, tables, &mut ptrs)?;
    let sink_logits = match &tables.sink_logits {
        Some(b) => ptrs.read("sink_logits", dev.view("sink_logits", b)?, stream, 4)? as *const f32,
        None => std::ptr::null(),
    };
    let alibi_slopes = match &tables.alibi_slopes {
        Some(b) => {
            ptrs.read("alibi_slopes", dev.view("alibi_slopes", b)?, stream, 4)? as *const f32
        }
        None => std::ptr::null(),
    };
    let ws_ptr = ptrs.write("workspace", wv, stream, 4)? as *mut f32;
    let rows_out = p.batch * p.heads_q * p.seq_q;
    let params = c::DecodeParams {
        q: ptrs.read("q", qv, stream, ALIGN)? as *const _,
        k: ptrs.read("k_cache", kv, stream, ALIGN)? as *mut _,
        v: ptrs.read("v_cache", vv, stream, ALIGN)? as *mut _,
        o: ptrs.write("o", ov, stream, std::mem::align_of::<T>())? as *mut _,
        lse: ptrs.write("lse", lv, stream, 4)? as *mut f32,
        ws_o: ws_ptr,
        // The partial LSEs follow the partial outputs (see `workspace_len`).
        ws_lse: if p.splits > 1 {
            ws_ptr.wrapping_add(p.splits * rows_out * p.d)
        } else {
            std::ptr::null_mut()
        },
        cache_seqlens: lens,
        block_table: bt,
        ring_offsets: ro,
        sink_logits,
        alibi_slopes,
        ..base_params(p)
    };
    let blocks = (params.row_blocks as usize) * p.splits;
    let blocks = u32::try_from(blocks).map_err(|_| Error::Unsupported {
        arg: "heads_q",
        detail: "too many query rows per KV head".into(),
    })?;
    let cfg = LaunchConfig {
        grid_dim: (blocks, p.heads_kv as u32, p.batch as u32),
        block_dim: (32 * c::ATTNKIT_DECODE_WARPS, 1, 1),
        shared_mem_bytes: smem,
    };
    // SAFETY: `check` proved every buffer holds what its strides reach (caches for their
    // capacity, o without overlap), the workspace holds `splits` partial rows, the tables hold
    // batch (x pages_per_seq) entries; the kernel re-checks the device tables' values against
    // capacity, num_pages and window, so a stale table cannot send it out of bounds. Pointers
    // come from live guards.
    unsafe { dev.launch("decode", name, cfg, &params) }?;
    if p.splits > 1 {
        let warps = c::ATTNKIT_DECODE_COMBINE_WARPS as usize;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(rows_out.div_ceil(warps)).map_err(|_| Error::Unsupported {
                    arg: "batch",
                    detail: "too many output rows for one combine grid".into(),
                })?,
                1,
                1,
            ),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = by_dtype(
            T::DTYPE,
            "decode_combine_bf16",
            "decode_combine_f16",
            "decode_combine_f32",
        );
        // SAFETY: the combine reads the splits' partials the launch above wrote (same stream)
        // and writes o and lse rows, all checked as above.
        unsafe { dev.launch("decode", kernel, cfg, &params) }?;
    }
    drop(ptrs);
    Ok(())
}

pub(super) fn append<T: Element>(
    dev: &CudaDevice,
    p: &Problem<'_>,
    k: &mut Option<(Buf<'_, T>, BufMut<'_, T>)>,
    v: &mut Option<(Buf<'_, T>, BufMut<'_, T>)>,
    tables: &Tables<'_>,
) -> Result<()> {
    let cache = [p.cache_dims.0, p.cache_dims.1, p.heads_kv];
    let mut ptrs = DevPtrs::default();
    let stream = &dev.stream;
    // A cache not written this call has null pointers: the kernel skips it.
    let (mut k_new, mut k_out) = (std::ptr::null(), std::ptr::null_mut());
    if let Some((new, out)) = k {
        check_stride_align::<T>("k_cache", &p.k, cache)?;
        k_new = ptrs.read("k_new", dev.view("k_new", new)?, stream, ALIGN)? as *const _;
        k_out = ptrs.write("k_cache", dev.view_mut("k_cache", out)?, stream, ALIGN)? as *mut _;
    }
    let (mut v_new, mut v_out) = (std::ptr::null(), std::ptr::null_mut());
    if let Some((new, out)) = v {
        check_stride_align::<T>("v_cache", &p.v, cache)?;
        v_new = ptrs.read("v_new", dev.view("v_new", new)?, stream, ALIGN)? as *const _;
        v_out = ptrs.write("v_cache", dev.view_mut("v_cache", out)?, stream, ALIGN)? as *mut _;
    }
    let (lens, bt, ro) = table_ptrs(dev, tables, &mut ptrs)?;
    let params = c::DecodeParams {
        k_new,
        v_new,
        k: k_out,
        v: v_out,
        cache_seqlens: lens,
        block_table: bt,
        ring_offsets: ro,
        ..base_params(p)
    };
    let chunks = p.batch * p.seq_q * p.heads_kv * p.d * std::mem::size_of::<T>() / ALIGN;
    let threads = c::ATTNKIT_DECODE_APPEND_THREADS;
    // A grid-stride loop: a few blocks per SM cover any count.
    let blocks = u32::try_from(chunks.div_ceil(threads as usize))
        .unwrap_or(u32::MAX)
        .clamp(1, dev.sm_count.saturating_mul(4).max(1));
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let kernel = by_dtype(
        T::DTYPE,
        "decode_append_bf16",
        "decode_append_f16",
        "decode_append_f32",
    );
    // SAFETY: k_new/v_new hold batch * seq_q * heads_kv * head_dim elements (checked); the
    // kernel writes only rows of logical keys below cache_seqlens[b] <= capacity, through the
    // re-checked map, into caches checked to hold every such row.
    unsafe { dev.launch("decode", kernel, cfg, &params) }?;
    drop(ptrs);
    Ok(())
}
