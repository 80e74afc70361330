//! CUDA launcher of the FlashAttention forward kernels (`kernels/flash.cu`).

use cudarc::driver::{CudaView, LaunchConfig};

use super::{Extras, Problem, Score, Strides};
use crate::buffer::{Buf, BufMut};
use crate::cuda::{CudaDevice, DevPtrs, params as c};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// The launch shape for a dtype and head dim, from the constants in `kernels/flash.h` (the
/// same ones the kernels are instantiated with): (kernel, rows per block, threads, shared bytes).
fn tile(dtype: DType, d: usize) -> (String, usize, u32, u32) {
    let name = format!("flash_fwd_{dtype}_d{d}");
    match dtype {
        DType::F32 => {
            let (bm, bn) = (
                c::ATTNKIT_FLASH_F32_BLOCK_M as usize,
                c::ATTNKIT_FLASH_F32_BLOCK_N as usize,
            );
            // sQ [bm][d + 1], sK [bn][d + 1], sV [bn][d], sP [bm][bn + 1], all f32 (padded rows).
            let smem = (bm * (d + 1) + bn * (d + 1) + bn * d + bm * (bn + 1)) * 4;
            (name, bm, c::ATTNKIT_FLASH_F32_THREADS, smem as u32)
        }
        DType::F16 | DType::Bf16 => {
            let (warps, row_tiles, bn) = match d {
                256 => (
                    c::ATTNKIT_FLASH_WARPS_D256,
                    1,
                    c::ATTNKIT_FLASH_BLOCK_N_D256,
                ),
                192 => (
                    c::ATTNKIT_FLASH_WARPS_D192,
                    1,
                    c::ATTNKIT_FLASH_BLOCK_N_D192,
                ),
                _ => (
                    c::ATTNKIT_FLASH_WARPS_SMALL_D,
                    c::ATTNKIT_FLASH_ROW_TILES_SMALL_D,
                    if d > 64 {
                        c::ATTNKIT_FLASH_BLOCK_N_MID_D
                    } else {
                        c::ATTNKIT_FLASH_BLOCK_N_SMALL_D
                    },
                ),
            };
            let (warps, bn) = (warps as usize, bn as usize);
            let bm = 16 * row_tiles as usize * warps;
            // sQ [bm], then K and V double-buffered, [2][bn] each: rows of d 2-byte elements,
            // each padded up to 64 bytes (common.cuh's head_row_bytes); then 3 f32 constants
            // per query row.
            let row = (d * 2).div_ceil(64) * 64;
            (
                name,
                bm,
                32 * warps as u32,
                ((bm + 4 * bn) * row + bm * 12) as u32,
            )
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: Element>(
    dev: &CudaDevice,
    p: &Problem<'_>,
    q: &Buf<'_, T>,
    k: &Buf<'_, T>,
    v: &Buf<'_, T>,
    cu: Option<&(Buf<'_, i32>, Buf<'_, i32>)>,
    o: &mut BufMut<'_, T>,
    lse: &mut BufMut<'_, f32>,
    extras: &mut Extras<'_>,
) -> Result<()> {
    let (qv, kv, vv) = (dev.view("q", q)?, dev.view("k", k)?, dev.view("v", v)?);
    let cu_views = match cu {
        Some((cq, ck)) => Some((dev.view("cu_seqlens_q", cq)?, dev.view("cu_seqlens_k", ck)?)),
        None => None,
    };
    let ov = dev.view_mut("o", o)?;
    let lv = dev.view_mut("lse", lse)?;
    let sink_view = extras
        .sink_logits
        .as_ref()
        .map(|b| dev.view("sink_logits", b))
        .transpose()?;
    let alibi_view = extras
        .alibi_slopes
        .as_ref()
        .map(|b| dev.view("alibi_slopes", b))
        .transpose()?;
    let mask_view = match &extras.block_mask {
        Some(m) => Some((dev.view("block_mask", &m.mask)?, m.block_q, m.block_k)),
        None => None,
    };
    let ent_view = extras
        .entropy
        .as_mut()
        .map(|b| dev.view_mut("entropy", b))
        .transpose()?;
    let align = check_align::<T>(p)?;
    let mut ptrs = DevPtrs::default();
    let stream = &dev.stream;
    let (cu, sink_logits, alibi_slopes, mask) = input_ptrs(
        &mut ptrs, stream, cu_views, sink_view, alibi_view, mask_view,
    )?;
    let entropy = match ent_view {
        Some(v) => ptrs.write("entropy", v, stream, 4)? as *mut f32,
        None => std::ptr::null_mut(),
    };
    let params = problem_params(
        p,
        Pointers {
            q: ptrs.read("q", qv, stream, align)? as *const _,
            k: ptrs.read("k", kv, stream, align)? as *const _,
            v: ptrs.read("v", vv, stream, align)? as *const _,
            o: ptrs.write("o", ov, stream, align)? as *mut _,
            lse: ptrs.write("lse", lv, stream, 4)? as *mut f32,
            cu,
            sink_logits,
            alibi_slopes,
            entropy,
            mask,
        },
    );
    let (name, bm, threads, smem) = tile(T::DTYPE, p.d);
    let tiles = p.seq_q.div_ceil(bm);
    if tiles == 0 {
        return Ok(()); // varlen with only empty query sequences is rejected earlier; nothing to do
    }
    let tiles = u32::try_from(tiles).map_err(|_| Error::Unsupported {
        arg: "seq_q",
        detail: "too many query tiles".into(),
    })?;
    let cfg = LaunchConfig {
        grid_dim: (tiles, p.heads_q as u32, p.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    let name: &'static str = kernel_name(&name)?;
    // SAFETY: every buffer was checked by `check` to hold the elements its strides reach for the
    // given shape; o's strides do not overlap; the pointers come from live guards; the kernel
    // reads cu_seqlens[0..=batch] from buffers checked to hold batch + 1 offsets.
    unsafe { dev.launch("flash", name, cfg, &params) }?;
    drop(ptrs);
    Ok(())
}

/// The tensor-core kernels move rows in 16-byte pieces: pointers and strides must allow it.
/// Returns the pointers' alignment (4 for f32, 16 otherwise).
fn check_align<T: Element>(p: &Problem<'_>) -> Result<usize> {
    let align = if T::DTYPE == DType::F32 { 4 } else { 16 };
    if align == 16 {
        check_row_strides::<T, _>(
            p,
            [
                ("q", &p.q, true),
                ("k", &p.k, false),
                ("v", &p.v, false),
                ("o", &p.o, true),
            ],
        )?;
    }
    Ok(align)
}

/// The backward's gradients meet the same rule (written with 4-byte stores from 16-byte
/// aligned rows).
fn check_grad_align<T: Element>(p: &Problem<'_>, g: &super::GradStrides) -> Result<()> {
    if T::DTYPE == DType::F32 {
        return Ok(());
    }
    check_row_strides::<T, _>(
        p,
        [
            ("dq", &g.dq, true),
            ("dk", &g.dk, false),
            ("dv", &g.dv, false),
        ],
    )
}

/// Each (name, strides, is a query-side tensor): strides in whole 16-byte pieces.
fn check_row_strides<T: Element, const N: usize>(
    p: &Problem<'_>,
    tensors: [(&'static str, &Strides, bool); N],
) -> Result<()> {
    let per = 16 / std::mem::size_of::<T>();
    let batches = if p.varlen { 1 } else { p.batch };
    let (rows_q, rows_k) = if p.varlen {
        (p.total_q, p.total_k)
    } else {
        (p.seq_q, p.seq_k)
    };
    for (arg, s, query) in tensors {
        let (rows, heads) = if query {
            (rows_q, p.heads_q)
        } else {
            (rows_k, p.heads_kv)
        };
        // A stride of a dimension of length 1 is never used: only the others must align.
        let used = [(batches, s.batch), (rows, s.row), (heads, s.head)];
        if used.iter().any(|&(n, st)| n > 1 && st % per != 0) {
            return Err(Error::Stride {
                arg,
                detail: format!(
                    "{s:?}: batch, row and head strides must be multiples of {per} elements (16 bytes)"
                ),
            });
        }
    }
    Ok(())
}

/// The pointers of the optional inputs (offsets, sink logits, ALiBi slopes, block mask and
/// its blocks), null where absent, their guards held by `ptrs`.
#[allow(clippy::type_complexity)]
fn input_ptrs<'b>(
    ptrs: &mut DevPtrs<'b>,
    stream: &'b cudarc::driver::CudaStream,
    cu: Option<(&'b CudaView<'_, i32>, &'b CudaView<'_, i32>)>,
    sinks: Option<&'b CudaView<'_, f32>>,
    alibi: Option<&'b CudaView<'_, f32>>,
    mask: Option<(&'b CudaView<'_, u8>, usize, usize)>,
) -> Result<(
    (*const i32, *const i32),
    *const f32,
    *const f32,
    (*const u8, usize, usize),
)> {
    let cu = match cu {
        Some((a, b)) => (
            ptrs.read("cu_seqlens_q", a, stream, 4)? as *const i32,
            ptrs.read("cu_seqlens_k", b, stream, 4)? as *const i32,
        ),
        None => (std::ptr::null(), std::ptr::null()),
    };
    let sink_logits = match sinks {
        Some(v) => ptrs.read("sink_logits", v, stream, 4)? as *const f32,
        None => std::ptr::null(),
    };
    let alibi_slopes = match alibi {
        Some(v) => ptrs.read("alibi_slopes", v, stream, 4)? as *const f32,
        None => std::ptr::null(),
    };
    let mask = match mask {
        Some((v, bq, bk)) => (ptrs.read("block_mask", v, stream, 1)? as *const u8, bq, bk),
        None => (std::ptr::null(), 1, 1),
    };
    Ok((cu, sink_logits, alibi_slopes, mask))
}

/// The device pointers of a call (null for what it lacks).
struct Pointers {
    q: *const std::ffi::c_void,
    k: *const std::ffi::c_void,
    v: *const std::ffi::c_void,
    o: *mut std::ffi::c_void,
    lse: *mut f32,
    cu: (*const i32, *const i32),
    sink_logits: *const f32,
    alibi_slopes: *const f32,
    entropy: *mut f32,
    /// The block mask and its (block_q, block_k).
    mask: (*const u8, usize, usize),
}

/// The kernels' parameters of problem `p` with the buffers `x`.
fn problem_params(p: &Problem<'_>, x: Pointers) -> c::FlashParams {
    let opts = &p.opts;
    // -1 is the kernel's "unbounded"; sizes were checked to be at most MAX_LEN (< i32::MAX).
    let bound = |w: Option<usize>| w.map_or(-1, |w| w as i32);
    let window_right = if opts.causal {
        0
    } else {
        bound(opts.window_right)
    };
    let st = |s: &Strides| (s.batch as i64, s.row as i64, s.head as i64);
    let (qb, qr, qh) = st(&p.q);
    let (kb, kr, kh) = st(&p.k);
    let (vb, vr, vh) = st(&p.v);
    let (ob, or, oh) = st(&p.o);
    let Pointers {
        q,
        k,
        v,
        o,
        lse,
        cu: (cq, ck),
        sink_logits,
        alibi_slopes,
        entropy,
        mask: (block_mask, block_q, block_k),
    } = x;
    c::FlashParams {
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens_q: cq,
        cu_seqlens_k: ck,
        q_batch_stride: qb,
        q_row_stride: qr,
        q_head_stride: qh,
        k_batch_stride: kb,
        k_row_stride: kr,
        k_head_stride: kh,
        v_batch_stride: vb,
        v_row_stride: vr,
        v_head_stride: vh,
        o_batch_stride: ob,
        o_row_stride: or,
        o_head_stride: oh,
        lse_batch_stride: p.lse_batch as i64,
        lse_head_stride: p.lse_head as i64,
        // All below were checked to fit i32 by `check`.
        batch: p.batch as i32,
        seq_q: p.seq_q as i32,
        seq_k: p.seq_k as i32,
        total_q: p.total_q as i32,
        total_k: p.total_k as i32,
        heads_q: p.heads_q as i32,
        heads_kv: p.heads_kv as i32,
        head_dim: p.d as i32,
        window_left: bound(opts.window_left),
        window_right,
        n_sink: opts.sinks as i32,
        block_q: block_q as i32,
        block_k: block_k as i32,
        mask_cols: p.seq_k.div_ceil(block_k) as i32,
        block_mask,
        sink_logits,
        alibi_slopes,
        entropy,
        score: match opts.score {
            Score::Softmax => c::ATTNKIT_FLASH_SCORE_SOFTMAX as i32,
            Score::Relu2(_) => c::ATTNKIT_FLASH_SCORE_RELU2 as i32,
        },
        entropy_scale: opts.entropy_scale as i32,
        relu2_by_visible: matches!(opts.score, Score::Relu2(super::Relu2Norm::Visible)) as i32,
        scale: p.scale,
        scale_log2: p.scale * std::f32::consts::LOG2_E,
        softcap: opts.softcap.unwrap_or(0.0),
    }
}

/// The kernel names as `'static` strings (the function cache is keyed by them).
fn kernel_name(name: &str) -> Result<&'static str> {
    const NAMES: [&str; 24] = [
        "flash_fwd_f32_d32",
        "flash_fwd_f32_d64",
        "flash_fwd_f32_d80",
        "flash_fwd_f32_d96",
        "flash_fwd_f32_d112",
        "flash_fwd_f32_d128",
        "flash_fwd_f32_d192",
        "flash_fwd_f32_d256",
        "flash_fwd_f16_d32",
        "flash_fwd_f16_d64",
        "flash_fwd_f16_d80",
        "flash_fwd_f16_d96",
        "flash_fwd_f16_d112",
        "flash_fwd_f16_d128",
        "flash_fwd_f16_d192",
        "flash_fwd_f16_d256",
        "flash_fwd_bf16_d32",
        "flash_fwd_bf16_d64",
        "flash_fwd_bf16_d80",
        "flash_fwd_bf16_d96",
        "flash_fwd_bf16_d112",
        "flash_fwd_bf16_d128",
        "flash_fwd_bf16_d192",
        "flash_fwd_bf16_d256",
    ];
    NAMES
        .iter()
        .find(|n| **n == name)
        .copied()
        .ok_or_else(|| Error::Unsupported {
            arg: "head_dim",
            detail: format!("no kernel {name}"),
        })
}

/// The backward's buffers on the device (the forward's tensors read; gradients written).
pub(super) struct BackwardBufs<'b, 'a, T> {
    pub q: &'b Buf<'a, T>,
    pub k: &'b Buf<'a, T>,
    pub v: &'b Buf<'a, T>,
    pub o: &'b Buf<'a, T>,
    pub d_o: &'b Buf<'a, T>,
    pub lse: &'b Buf<'a, f32>,
    pub dq: &'b mut BufMut<'a, T>,
    pub dk: &'b mut BufMut<'a, T>,
    pub dv: &'b mut BufMut<'a, T>,
    pub d_sink: Option<&'b mut BufMut<'a, f32>>,
    pub ws: &'b mut BufMut<'a, f32>,
    /// dq's, dk's and dv's strides (checked against their buffers).
    pub strides: super::GradStrides,
}

/// The backward kernels' launch shapes, from the constants in `kernels/flash.h` and the rule
/// in `flash.cu`'s `bwd_dkdv_entry` / `bwd_dq_entry`: ((keys per dK/dV block, its shared
/// bytes), (rows per dQ block, its shared bytes)).
fn bwd_tiles(dtype: DType, d: usize, score: Score) -> ((usize, u32), (usize, u32)) {
    let cuda_cores = (
        c::ATTNKIT_FLASH_BWD_BLOCK_N as usize,
        // sQ, sG: [ROWS][d] f32.
        (2 * c::ATTNKIT_FLASH_BWD_ROWS as usize * d * 4) as u32,
    );
    // f16 relu² weights would overflow f16 on the tensor cores (flash.cu's bwd_on_cuda_cores).
    let f16_relu2 = dtype == DType::F16 && matches!(score, Score::Relu2(_));
    if dtype == DType::F32 || f16_relu2 {
        let bn = c::ATTNKIT_FLASH_BWD_BLOCK_N as usize;
        // sK, sV: [BLOCK_N][d] f32.
        return (
            cuda_cores,
            (
                c::ATTNKIT_FLASH_BWD_BLOCK_M as usize,
                (2 * bn * d * 4) as u32,
            ),
        );
    }
    // Rows of d 2-byte elements, each padded up to 64 bytes (common.cuh's head_row_bytes).
    let row = (d * 2).div_ceil(64) * 64;
    let warp_rows = 16 * c::ATTNKIT_FLASH_BWD_TC_WARPS as usize;
    // dK/dV: 16 keys a warp, or a pair of warps above UNSPLIT_MAX_D (each half the head dim).
    let split = d > c::ATTNKIT_FLASH_BWD_TC_UNSPLIT_MAX_D as usize;
    let keys = if split { warp_rows / 2 } else { warp_rows };
    let bm = match d {
        ..=64 => c::ATTNKIT_FLASH_BWD_TC_ROWS_SMALL_D,
        _ if split => c::ATTNKIT_FLASH_BWD_TC_ROWS_LARGE_D,
        _ => c::ATTNKIT_FLASH_BWD_TC_ROWS,
    } as usize;
    // sK, sV [keys]; two stages of sQ, sG [bm] and their rows' constants.
    let consts = c::ATTNKIT_FLASH_BWD_TC_ROW_CONST_BYTES as usize;
    let dkdv = (
        keys,
        (2 * keys * row + 2 * (2 * bm * row + bm * consts)) as u32,
    );
    let bn = match d {
        ..=64 => c::ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_SMALL_D,
        65..=128 => c::ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N,
        _ => c::ATTNKIT_FLASH_BWD_TC_DQ_BLOCK_N_LARGE_D,
    } as usize;
    // sQ, sG [rows]; two stages of sK, sV [bn].
    (
        dkdv,
        (warp_rows, (2 * warp_rows * row + 2 * 2 * bn * row) as u32),
    )
}

/// The backward kernels (`kernels/flash.cu`): D, then dK/dV per key tile, dQ per query tile
/// (with each row's sink term), then the sink logits' sums. Deterministic. f16/bf16 run on
/// tensor cores (f16 relu² on CUDA cores), f32 on CUDA cores.
pub(super) fn backward<T: Element>(
    dev: &CudaDevice,
    p: &Problem<'_>,
    cu: Option<&(Buf<'_, i32>, Buf<'_, i32>)>,
    x: BackwardBufs<'_, '_, T>,
    extras: &Extras<'_>,
) -> Result<()> {
    let (qv, kv, vv) = (
        dev.view("q", x.q)?,
        dev.view("k", x.k)?,
        dev.view("v", x.v)?,
    );
    let (ov, gv) = (dev.view("o", x.o)?, dev.view("d_o", x.d_o)?);
    let lv = dev.view("lse", x.lse)?;
    let cu_views = match cu {
        Some((cq, ck)) => Some((dev.view("cu_seqlens_q", cq)?, dev.view("cu_seqlens_k", ck)?)),
        None => None,
    };
    let sink_view = extras
        .sink_logits
        .as_ref()
        .map(|b| dev.view("sink_logits", b))
        .transpose()?;
    let alibi_view = extras
        .alibi_slopes
        .as_ref()
        .map(|b| dev.view("alibi_slopes", b))
        .transpose()?;
    let mask_view = match &extras.block_mask {
        Some(m) => Some((dev.view("block_mask", &m.mask)?, m.block_q, m.block_k)),
        None => None,
    };
    let (dqv, dkv) = (dev.view_mut("dq", x.dq)?, dev.view_mut("dk", x.dk)?);
    let dvv = dev.view_mut("dv", x.dv)?;
    let dsv = x
        .d_sink
        .map(|b| dev.view_mut("d_sink_logits", b))
        .transpose()?;
    let wsv = dev.view_mut("workspace", x.ws)?;
    let lse_len = p.heads_q * p.total_q;
    // The forward's rule: 16-byte rows for the tensor-core kernels' cp.async; the gradients'
    // own strides are held to it next.
    let align = check_align::<T>(p)?;
    let g = x.strides;
    check_grad_align::<T>(p, &g)?;
    let mut ptrs = DevPtrs::default();
    let stream = &dev.stream;
    let (cu, sink_logits, alibi_slopes, mask) = input_ptrs(
        &mut ptrs, stream, cu_views, sink_view, alibi_view, mask_view,
    )?;
    let fwd = problem_params(
        p,
        Pointers {
            q: ptrs.read("q", qv, stream, align)? as *const _,
            k: ptrs.read("k", kv, stream, align)? as *const _,
            v: ptrs.read("v", vv, stream, align)? as *const _,
            // Read only: the backward kernels never write o or the LSE.
            o: ptrs.read("o", ov, stream, align)? as *mut _,
            lse: ptrs.read("lse", lv, stream, 4)? as *mut f32,
            cu,
            sink_logits,
            alibi_slopes,
            entropy: std::ptr::null_mut(),
            mask,
        },
    );
    let ws = ptrs.write("workspace", wsv, stream, 4)? as *mut f32;
    let params = c::FlashBwdParams {
        fwd,
        d_o: ptrs.read("d_o", gv, stream, align)? as *const _,
        dq: ptrs.write("dq", dqv, stream, align)? as *mut _,
        dk: ptrs.write("dk", dkv, stream, align)? as *mut _,
        dv: ptrs.write("dv", dvv, stream, align)? as *mut _,
        dq_batch_stride: g.dq.batch as i64,
        dq_row_stride: g.dq.row as i64,
        dq_head_stride: g.dq.head as i64,
        dk_batch_stride: g.dk.batch as i64,
        dk_row_stride: g.dk.row as i64,
        dk_head_stride: g.dk.head as i64,
        dv_batch_stride: g.dv.batch as i64,
        dv_row_stride: g.dv.row as i64,
        dv_head_stride: g.dv.head as i64,
        delta: ws,
        // SAFETY (of the offset): the workspace was checked to hold 2 * lse_len f32.
        sink_terms: ws.wrapping_add(lse_len),
        d_sink_logits: match dsv {
            Some(v) => ptrs.write("d_sink_logits", v, stream, 4)? as *mut f32,
            None => std::ptr::null_mut(),
        },
    };
    let dt = T::DTYPE;
    let grid = |arg, n: usize, y: usize| -> Result<(u32, u32, u32)> {
        let n = u32::try_from(n.max(1)).map_err(|_| Error::Unsupported {
            arg,
            detail: "too many tiles".into(),
        })?;
        Ok((n, y as u32, p.batch as u32))
    };
    let threads = c::ATTNKIT_FLASH_BWD_THREADS;
    let ((bn, dkdv_smem), (bm, dq_smem)) = bwd_tiles(T::DTYPE, p.d, p.opts.score);
    // A grid-stride loop: a few blocks per SM cover every gradient element.
    let zero_blocks = dev.sm_count.saturating_mul(4).max(1);
    let launches = [
        (
            bwd_name(&format!("flash_bwd_zero_{dt}"))?,
            (zero_blocks, 1, 1),
            256,
            0,
        ),
        (
            bwd_name(&format!("flash_bwd_delta_{dt}"))?,
            grid("seq_q", p.seq_q.div_ceil(128), p.heads_q)?,
            128,
            0,
        ),
        (
            bwd_name(&format!("flash_bwd_dkdv_{dt}_d{}", p.d))?,
            grid("seq_k", p.seq_k.div_ceil(bn), p.heads_kv)?,
            threads,
            dkdv_smem,
        ),
        (
            bwd_name(&format!("flash_bwd_dq_{dt}_d{}", p.d))?,
            grid("seq_q", p.seq_q.div_ceil(bm), p.heads_q)?,
            threads,
            dq_smem,
        ),
    ];
    // Every kernel is looked up before the first launch: a missing one fails the call before
    // anything is written.
    for (name, ..) in &launches {
        dev.function("flash", name)?;
    }
    if !params.d_sink_logits.is_null() {
        dev.function("flash", "flash_bwd_dsink")?;
    }
    for (name, grid_dim, block, smem) in launches {
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: every buffer was checked (run_backward) to hold what its strides reach for
        // the problem; the gradients do not overlap themselves; the workspace holds
        // 2 * lse_len f32; the kernels re-check varlen offsets as the forward does.
        unsafe { dev.launch("flash", name, cfg, &params) }?;
    }
    if !params.d_sink_logits.is_null() {
        let cfg = LaunchConfig {
            grid_dim: (p.heads_q as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; d_sink_logits holds heads_q f32.
        unsafe { dev.launch("flash", "flash_bwd_dsink", cfg, &params) }?;
    }
    drop(ptrs);
    Ok(())
}

/// The backward kernels' names as `'static` strings.
fn bwd_name(name: &str) -> Result<&'static str> {
    macro_rules! dims {
        ($kind:literal, $dt:literal) => {
            [
                concat!("flash_bwd_", $kind, "_", $dt, "_d32"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d64"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d80"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d96"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d112"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d128"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d192"),
                concat!("flash_bwd_", $kind, "_", $dt, "_d256"),
            ]
        };
    }
    const DELTA: [&str; 6] = [
        "flash_bwd_delta_f32",
        "flash_bwd_delta_f16",
        "flash_bwd_delta_bf16",
        "flash_bwd_zero_f32",
        "flash_bwd_zero_f16",
        "flash_bwd_zero_bf16",
    ];
    const KINDS: [[&str; 8]; 6] = [
        dims!("dkdv", "f32"),
        dims!("dkdv", "f16"),
        dims!("dkdv", "bf16"),
        dims!("dq", "f32"),
        dims!("dq", "f16"),
        dims!("dq", "bf16"),
    ];
    DELTA
        .iter()
        .chain(KINDS.iter().flatten())
        .find(|n| **n == name)
        .copied()
        .ok_or_else(|| Error::Unsupported {
            arg: "head_dim",
            detail: format!("no kernel {name}"),
        })
}
