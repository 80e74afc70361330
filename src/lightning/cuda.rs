//! CUDA launcher of the Lightning family: checks placement and alignment, fills
//! `LightningParams` (the bindgen mirror of `kernels/lightning.h`) and enqueues the split-state,
//! scan and output kernels (forward) or the decode kernel, on the device's stream.

use cudarc::driver::LaunchConfig;

use super::{BLOCK, Backward, Config, Decode, E_TILE, Forward, MAX_HEADS, Plan, Resolved, Seqs};
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
/// of `Smem<T, D>` in kernels/lightning.cu (16-bit and f32 tile rows padded by 16 bytes, the
/// f32 state's by 8 floats; the kernels trap if they get less than they lay out).
fn smem_bytes(elem: usize, d: usize, output: bool) -> usize {
    let pad = 16 / elem;
    let (pk, pv) = (d + pad, E_TILE + pad);
    let split = elem * BLOCK * pk + elem * BLOCK * pv + 4 * d * (E_TILE + 8);
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

/// The sequences and the split plan, as every kernel but decode reads them.
fn set_geometry(p: &mut LightningParams, seqs: &Seqs<'_>, r: &Resolved, plan: Plan) {
    p.n_seqs = r.n_seqs as i64;
    p.seq_len = match seqs {
        Seqs::Dense { seq, .. } => *seq as i64,
        Seqs::Varlen { .. } => 0,
    };
    p.total_tokens = r.tokens as i64;
    p.split_len = plan.split as i64;
    p.n_splits = plan.n_splits as i64;
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
    set_geometry(&mut p, seqs, r, plan);

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

/// One operand of a backward sweep: its device address and head dim (rows `[tokens, heads, dim]`).
#[derive(Clone, Copy)]
struct Operand {
    addr: u64,
    dim: usize,
}

/// The params of one sweep (see `ATTNKIT_LIGHTNING_SWEEP_*` in kernels/lightning.h): `a`, `b`,
/// `c` and `out` in the q, k, v and o slots, `d` the dim of `a` and `b`, `e` that of `c`.
fn sweep_params(
    base: &LightningParams,
    heads: usize,
    sweep: u32,
    [a, b, c, out]: [Operand; 4],
) -> LightningParams {
    let rows = |x: Operand| ((heads * x.dim) as i64, x.dim as i64);
    let mut p = *base;
    p.sweep = sweep as i32;
    p.d = a.dim as i32;
    p.e = c.dim as i32;
    p.q = a.addr as *const _;
    (p.q_tok, p.q_head) = rows(a);
    p.k = b.addr as *const _;
    (p.k_tok, p.k_head) = rows(b);
    p.v = c.addr as *const _;
    (p.v_tok, p.v_head) = rows(c);
    p.o = out.addr as *mut _;
    (p.o_tok, p.o_head) = rows(out);
    p
}

/// The backward as seven launches: the DQ sweep (split states, scan, outputs), then the DKV
/// sweep (split states, scan leaving `d_initial_state`, dV outputs) and the DK outputs from
/// the same split states. The two sweeps share the workspace in stream order.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Element>(
    dev: &CudaDevice,
    cfg: &Config<'_>,
    seqs: &Seqs<'_>,
    r: &Resolved,
    plan: Plan,
    log2_decay: &[f32],
    mut io: Backward<'_, T>,
) -> Result<()> {
    use crate::cuda::params::{
        ATTNKIT_LIGHTNING_SWEEP_DK, ATTNKIT_LIGHTNING_SWEEP_DKV, ATTNKIT_LIGHTNING_SWEEP_DQ,
    };
    let mut base = base_params::<T>(cfg, log2_decay)?;
    let s = &dev.stream;
    let (qv, kv, vv, gv) = (
        dev.view("q", &io.q)?,
        dev.view("k", &io.k)?,
        dev.view("v", &io.v)?,
        dev.view("d_o", &io.d_o)?,
    );
    let init = io
        .initial_state
        .as_ref()
        .map(|b| dev.view("initial_state", b))
        .transpose()?;
    let d_fin = io
        .d_final_state
        .as_ref()
        .map(|b| dev.view("d_final_state", b))
        .transpose()?;
    let cu = match seqs {
        Seqs::Varlen { cu_seqlens, .. } => Some(dev.view("cu_seqlens", cu_seqlens)?),
        Seqs::Dense { .. } => None,
    };
    let dqv = dev.view_mut("dq", &mut io.dq)?;
    let dkv = dev.view_mut("dk", &mut io.dk)?;
    let dvv = dev.view_mut("dv", &mut io.dv)?;
    let d_init = io
        .d_initial_state
        .as_mut()
        .map(|b| dev.view_mut("d_initial_state", b))
        .transpose()?;
    let wsv = dev.view_mut("workspace", &mut io.workspace)?;
    let mut ptrs = DevPtrs::default();
    let (d, e) = (cfg.d, cfg.e);
    let op = |addr, dim| Operand { addr, dim };
    let q = op(ptrs.read("q", qv, s, TILE_ALIGN)?, d);
    let k = op(ptrs.read("k", kv, s, TILE_ALIGN)?, d);
    let v = op(ptrs.read("v", vv, s, TILE_ALIGN)?, e);
    let g = op(ptrs.read("d_o", gv, s, TILE_ALIGN)?, e);
    let dq = op(ptrs.write("dq", dqv, s, TILE_ALIGN)?, d);
    let dk = op(ptrs.write("dk", dkv, s, TILE_ALIGN)?, d);
    let dv = op(ptrs.write("dv", dvv, s, TILE_ALIGN)?, e);
    let init_addr = match init {
        Some(v) => ptrs.read("initial_state", v, s, 4)?,
        None => 0,
    };
    let d_fin_addr = match d_fin {
        Some(v) => ptrs.read("d_final_state", v, s, 4)?,
        None => 0,
    };
    let d_init_addr = match d_init {
        Some(v) => ptrs.write("d_initial_state", v, s, 4)?,
        None => 0,
    };
    if let Some(v) = cu {
        base.cu_seqlens = ptrs.read("cu_seqlens", v, s, 4)? as *const _;
    }
    base.workspace = ptrs.write("workspace", wsv, s, 4)? as *mut _;
    set_geometry(&mut base, seqs, r, plan);

    let heads = cfg.heads;
    let mut dq_sweep = sweep_params(&base, heads, ATTNKIT_LIGHTNING_SWEEP_DQ, [g, v, k, dq]);
    dq_sweep.initial_state = init_addr as *const _;
    let mut dkv_sweep = sweep_params(&base, heads, ATTNKIT_LIGHTNING_SWEEP_DKV, [k, q, g, dv]);
    dkv_sweep.initial_state = d_fin_addr as *const _;
    dkv_sweep.final_state = d_init_addr as *mut _;
    let dk_sweep = sweep_params(&base, heads, ATTNKIT_LIGHTNING_SWEEP_DK, [v, g, q, dk]);

    let z = grid_z(r.n_seqs)?;
    let x = grid_x(plan.n_splits, "seq")?;
    let elem = T::DTYPE.size();
    // A sweep's tiles: its contraction dim `p.d` picks the kernel's D, `p.e` the column tiles.
    let tiles = |p: &LightningParams, output: bool| LaunchConfig {
        grid_dim: (x, (heads * p.e as usize / E_TILE) as u32, z),
        block_dim: (ATTNKIT_LIGHTNING_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes(elem, p.d as usize, output) as u32,
    };
    let scan_threads = ATTNKIT_LIGHTNING_SCAN_THREADS;
    let scan_cfg = LaunchConfig {
        grid_dim: (
            (d * e).div_ceil(scan_threads as usize) as u32,
            heads as u32,
            z,
        ),
        block_dim: (scan_threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let steps = [
        (
            "lightning_bwd_split_state",
            &dq_sweep,
            tiles(&dq_sweep, false),
        ),
        ("lightning_bwd_scan", &dq_sweep, scan_cfg),
        ("lightning_bwd_output", &dq_sweep, tiles(&dq_sweep, true)),
        (
            "lightning_bwd_split_state",
            &dkv_sweep,
            tiles(&dkv_sweep, false),
        ),
        ("lightning_bwd_scan", &dkv_sweep, scan_cfg),
        ("lightning_bwd_output", &dkv_sweep, tiles(&dkv_sweep, true)),
        ("lightning_bwd_output", &dk_sweep, tiles(&dk_sweep, true)),
    ];
    for (kernel, p, launch) in steps {
        let mut p = *p;
        p.smem_bytes = launch.shared_mem_bytes as i32;
        // SAFETY: every address comes from a guard in `ptrs`, alive until after the launches;
        // the caller checked q, k, v, d_o, dq, dk, dv against tokens x heads x their dims, the
        // states against n_seqs x heads x d x e and the workspace against
        // n_seqs x heads x n_splits x d x e, which is all a sweep reaches whichever operands
        // fill its slots (varlen offsets are bounded by total_tokens on the device).
        unsafe { dev.launch("lightning", kernel, launch, &p) }?;
    }
    drop(ptrs);
    Ok(())
}
