//! CUDA launcher of the Lightning family: checks placement and alignment, fills
//! `LightningParams` (the bindgen mirror of `kernels/lightning.h`) and enqueues the split-state,
//! scan and output kernels (forward) or the decode kernel, on the device's stream.

use cudarc::driver::LaunchConfig;

use super::{BLOCK, Config, Decode, E_TILE, Forward, MAX_HEADS, Plan, Resolved, Seqs};
use crate::cuda::params::{
    ATTNKIT_LIGHTNING_BLOCK, ATTNKIT_LIGHTNING_E_TILE, ATTNKIT_LIGHTNING_MAX_HEADS,
    ATTNKIT_LIGHTNING_SCAN_THREADS, ATTNKIT_LIGHTNING_THREADS, LightningParams,
};
use crate::cuda::{CudaDevice, DevPtrs};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// The `ATTNKIT_DTYPE_*` code of an element type (selftest keeps its own private copy).
fn dtype_of<T: Element>() -> i32 {
    use crate::cuda::params as c;
    (match T::DTYPE {
        DType::F32 => c::ATTNKIT_DTYPE_F32,
        DType::F16 => c::ATTNKIT_DTYPE_F16,
        DType::Bf16 => c::ATTNKIT_DTYPE_BF16,
    }) as i32
}

/// The tiles are read 16 bytes at a time, and outputs stored in pairs (8 bytes for f32).
const TILE_ALIGN: usize = 16;

/// Shared memory of the split-state (`output == false`) and output kernels: the host mirror
/// of `Smem<T, D>` in kernels/lightning.cu (rows padded by 16 bytes; the kernels trap if
/// they get less than they lay out).
fn smem_bytes(elem: usize, d: usize, output: bool) -> usize {
    let pad = 16 / elem;
    let (pk, pv) = (d + pad, E_TILE + pad);
    let split = elem * BLOCK * pk + elem * BLOCK * pv + 4 * d * E_TILE;
    if !output {
        return split;
    }
    let copy = if elem == 2 { elem * d * pv } else { 0 };
    split + elem * BLOCK * pk + elem * BLOCK * pv + copy
}

fn base_params<T: Element>(cfg: &Config<'_>, log2_decay: &[f32]) -> Result<LightningParams> {
    // The constants the kernels were compiled with are the ones the plan uses.
    const _: () = assert!(ATTNKIT_LIGHTNING_BLOCK as usize == BLOCK);
    const _: () = assert!(ATTNKIT_LIGHTNING_E_TILE as usize == E_TILE);
    const _: () = assert!(ATTNKIT_LIGHTNING_MAX_HEADS as usize == MAX_HEADS);
    if cfg.heads > MAX_HEADS {
        return Err(Error::Unsupported {
            arg: "heads",
            detail: format!(
                "{} heads; the GPU path takes at most {MAX_HEADS}",
                cfg.heads
            ),
        });
    }
    let mut p = LightningParams {
        heads: cfg.heads as i32,
        d: cfg.d as i32,
        e: cfg.e as i32,
        dtype: dtype_of::<T>(),
        causal: cfg.causal as i32,
        scale: cfg.scale,
        q_tok: (cfg.heads * cfg.d) as i64,
        q_head: cfg.d as i64,
        k_tok: (cfg.heads * cfg.d) as i64,
        k_head: cfg.d as i64,
        v_tok: (cfg.heads * cfg.e) as i64,
        v_head: cfg.e as i64,
        o_tok: (cfg.heads * cfg.e) as i64,
        o_head: cfg.e as i64,
        ..Default::default()
    };
    p.log2_decay[..cfg.heads].copy_from_slice(log2_decay);
    Ok(p)
}

fn grid_z(n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&z| z <= 65535)
        .ok_or_else(|| Error::Unsupported {
            arg: "batch",
            detail: format!("{n} sequences; the GPU grid takes at most 65535"),
        })
}

fn grid_x(n: usize, arg: &'static str) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&x| x < i32::MAX as u32)
        .ok_or_else(|| Error::Unsupported {
            arg,
            detail: format!("{n} thread blocks exceed the grid"),
        })
}

pub(super) fn forward<T: Element>(
    dev: &CudaDevice,
    cfg: &Config<'_>,
    seqs: &Seqs<'_>,
    r: &Resolved,
    plan: Plan,
    log2_decay: &[f32],
    mut io: Forward<'_, T>,
) -> Result<()> {
    let mut p = base_params::<T>(cfg, log2_decay)?;
    let s = &dev.stream;
    let qv = dev.view("q", &io.q)?;
    let kv = dev.view("k", &io.k)?;
    let vv = dev.view("v", &io.v)?;
    let init = io
        .initial_state
        .as_ref()
        .map(|b| dev.view("initial_state", b))
        .transpose()?;
    let cu = match seqs {
        Seqs::Varlen { cu_seqlens, .. } => Some(dev.view("cu_seqlens", cu_seqlens)?),
        Seqs::Dense { .. } => None,
    };
    let ov = dev.view_mut("o", &mut io.o)?;
    let fin = io
        .final_state
        .as_mut()
        .map(|b| dev.view_mut("final_state", b))
        .transpose()?;
    let wsv = dev.view_mut("workspace", &mut io.workspace)?;
    let mut ptrs = DevPtrs::default();
    p.q = ptrs.read("q", qv, s, TILE_ALIGN)? as *const _;
    p.k = ptrs.read("k", kv, s, TILE_ALIGN)? as *const _;
    p.v = ptrs.read("v", vv, s, TILE_ALIGN)? as *const _;
    p.o = ptrs.write("o", ov, s, TILE_ALIGN)? as *mut _;
    if let Some(v) = init {
        p.initial_state = ptrs.read("initial_state", v, s, 4)? as *const _;
    }
    if let Some(v) = fin {
        p.final_state = ptrs.write("final_state", v, s, 4)? as *mut _;
    }
    if let Some(v) = cu {
        p.cu_seqlens = ptrs.read("cu_seqlens", v, s, 4)? as *const _;
    }
    p.workspace = ptrs.write("workspace", wsv, s, 4)? as *mut _;
    p.n_seqs = r.n_seqs as i64;
    p.seq_len = match seqs {
        Seqs::Dense { seq, .. } => *seq as i64,
        Seqs::Varlen { .. } => 0,
    };
    p.total_tokens = r.tokens as i64;
    p.split_len = plan.split as i64;
    p.n_splits = plan.n_splits as i64;

    let z = grid_z(r.n_seqs)?;
    let y = (cfg.heads * cfg.e.div_ceil(E_TILE)) as u32;
    let x = grid_x(plan.n_splits, "seq")?;
    let elem = T::DTYPE.size();
    let threads = ATTNKIT_LIGHTNING_THREADS;
    let split_cfg = LaunchConfig {
        grid_dim: (x, y, z),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem_bytes(elem, cfg.d, false) as u32,
    };
    let out_cfg = LaunchConfig {
        shared_mem_bytes: smem_bytes(elem, cfg.d, true) as u32,
        ..split_cfg
    };
    let scan_threads = ATTNKIT_LIGHTNING_SCAN_THREADS;
    let scan_cfg = LaunchConfig {
        grid_dim: (
            (cfg.d * cfg.e).div_ceil(scan_threads as usize) as u32,
            cfg.heads as u32,
            z,
        ),
        block_dim: (scan_threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every pointer comes from a guard in `ptrs`, alive until after the launches; the
    // caller checked q, k, v, o against tokens x heads x dims, the states against
    // n_seqs x heads x d x e and the workspace against n_seqs x heads x n_splits x d x e, which
    // is all the kernels reach (varlen offsets are bounded by total_tokens on the device).
    unsafe {
        p.smem_bytes = split_cfg.shared_mem_bytes as i32;
        dev.launch("lightning", "lightning_split_state", split_cfg, &p)?;
        dev.launch("lightning", "lightning_scan", scan_cfg, &p)?;
        p.smem_bytes = out_cfg.shared_mem_bytes as i32;
        dev.launch("lightning", "lightning_output", out_cfg, &p)?;
    }
    drop(ptrs);
    Ok(())
}

pub(super) fn decode<T: Element>(
    dev: &CudaDevice,
    cfg: &Config<'_>,
    batch: usize,
    log2_decay: &[f32],
    mut io: Decode<'_, T>,
) -> Result<()> {
    let mut p = base_params::<T>(cfg, log2_decay)?;
    // One token per (batch, head): rows of [batch, heads, dim].
    let s = &dev.stream;
    let (qv, kv, vv) = (
        dev.view("q", &io.q)?,
        dev.view("k", &io.k)?,
        dev.view("v", &io.v)?,
    );
    let ov = dev.view_mut("o", &mut io.o)?;
    let sv = dev.view_mut("state", &mut io.state)?;
    let mut ptrs = DevPtrs::default();
    let align = std::mem::align_of::<T>();
    p.q = ptrs.read("q", qv, s, align)? as *const _;
    p.k = ptrs.read("k", kv, s, align)? as *const _;
    p.v = ptrs.read("v", vv, s, align)? as *const _;
    p.o = ptrs.write("o", ov, s, align)? as *mut _;
    p.final_state = ptrs.write("state", sv, s, 4)? as *mut _;
    p.n_seqs = batch as i64;
    p.seq_len = 1;
    p.total_tokens = batch as i64;
    let cfg_l = LaunchConfig {
        grid_dim: (cfg.heads as u32, grid_z(batch)?, 1),
        block_dim: (cfg.e as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: pointers from live guards; q, k, v, o and the state were checked against
    // batch x heads x dims by the caller, which is all the kernel reads and writes.
    unsafe { dev.launch("lightning", "lightning_decode", cfg_l, &p) }?;
    drop(ptrs);
    Ok(())
}
