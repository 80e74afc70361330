//! CUDA launcher of the Monarch family: plans the tiling ([`super::tiles::plan`]) from the
//! device's shared-memory limit, checks placement and alignment, fills `MonarchParams` and
//! launches one fused kernel.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUdevice_attribute as A;

use super::tiles::{self, Kernel, Plan};
use super::{Grads, Mode, MonarchShape, Rows, Weights};
use crate::buffer::{Buf, BufMut};
use crate::cuda::{CudaDevice, DevPtrs, params as c};
use crate::dtype::{DType, Element};
use crate::error::{DriverContext, Error, Result};

const _: () = assert!(tiles::MMA_WARPS * 32 == c::ATTNKIT_MONARCH_MMA_THREADS as usize);

/// [`tiles::plan`], remembered per argument set: planning walks every 16-column tile of the
/// intermediate once per candidate group (`n_mid / 16` checks each), which is worth doing
/// once per shape, not once per call.
fn cached_plan(
    shape: MonarchShape,
    dtype: DType,
    vec: bool,
    smem_limit: usize,
    transpose: bool,
    tokens: usize,
    sms: usize,
) -> Option<Plan> {
    // Tokens by power-of-two bucket: the plan changes with the grid's size, not its detail.
    let bucket = tokens.max(1).next_power_of_two();
    type Key = (MonarchShape, DType, bool, usize, bool, usize, usize);
    static PLANS: OnceLock<Mutex<HashMap<Key, Option<Plan>>>> = OnceLock::new();
    let key = (shape, dtype, vec, smem_limit, transpose, bucket, sms);
    let plans = PLANS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = plans.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return *p;
    }
    let plan = tiles::plan_for(
        shape,
        dtype,
        vec,
        smem_limit,
        transpose,
        Some((bucket, sms)),
    );
    plans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, plan);
    plan
}

/// `y = M x + bias` (or `M^T x + bias`) on the GPU; shapes, lengths and strides already
/// checked by the caller.
/// `bias` is passed apart from `w` so the backward pass can run the transpose without one.
pub(super) fn product<T: Element>(
    dev: &CudaDevice,
    w: &Weights<'_, T>,
    bias: Option<&Buf<'_, T>>,
    (x, x_rows): (&Buf<'_, T>, Rows),
    (y, y_rows): (&mut BufMut<'_, T>, Rows),
    mode: Mode,
) -> Result<()> {
    let transpose = mode == Mode::Transpose;
    let shape = w.shape;
    let ([k, q, _], [l, _, r]) = (shape.w1_dims(), shape.w2_dims());
    let smem_limit = dev
        .stream
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .driver("shared memory limit")?
        .max(0) as usize;
    let elem = std::mem::align_of::<T>();
    let xv = dev.view("x", x)?;
    let w1v = dev.view("w1", &w.w1)?;
    let w2v = dev.view("w2", &w.w2)?;
    let bv = match bias {
        Some(b) => Some(dev.view("bias", b)?),
        None => None,
    };
    let yv = dev.view_mut("y", y)?;
    let mut ptrs = DevPtrs::default();
    let (xp, w1p, w2p) = (
        ptrs.read("x", xv, &dev.stream, elem)?,
        ptrs.read("w1", w1v, &dev.stream, elem)?,
        ptrs.read("w2", w2v, &dev.stream, elem)?,
    );
    // The mma kernel copies x rows and weight rows in 16-byte chunks (p, r multiples of 16
    // keep every chunk inside a row aligned when the row starts are).
    let vec = x_rows.row_stride % 8 == 0 && (xp | w1p | w2p) % 16 == 0;
    let sms = dev.sm_count as usize;
    let plan = cached_plan(
        shape,
        T::DTYPE,
        vec,
        smem_limit,
        transpose,
        x_rows.tokens,
        sms,
    )
    .ok_or_else(|| {
        let (arg, per_block) = if transpose { ("w1", q) } else { ("w2", r) };
        Error::Unsupported {
            arg,
            detail: format!(
                "one block's intermediate ({per_block} values per token) does not fit in the \
                 GPU's {smem_limit} bytes of shared memory per block"
            ),
        }
    })?;
    let blocks = if transpose { k } else { l };
    let ctas = x_rows
        .tokens
        .div_ceil(plan.block_tokens)
        .checked_mul(blocks / plan.group)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or_else(|| Error::Shape {
            arg: "x",
            detail: format!("{} tokens need more than 2^31 CTAs", x_rows.tokens),
        })?;
    let (name, threads) = match plan.kernel {
        Kernel::Mma { mt: 1 } => ("monarch_forward_mma1", c::ATTNKIT_MONARCH_MMA_THREADS),
        Kernel::Mma { mt: 2 } => ("monarch_forward_mma2", c::ATTNKIT_MONARCH_MMA_THREADS),
        Kernel::Mma { .. } => ("monarch_forward_mma4", c::ATTNKIT_MONARCH_MMA_THREADS),
        Kernel::Simt => ("monarch_product_simt", c::ATTNKIT_MONARCH_SIMT_THREADS),
    };
    let bias = match bv {
        Some(b) => ptrs.read("bias", b, &dev.stream, elem)? as *const _,
        None => std::ptr::null(),
    };
    let params = c::MonarchParams {
        x: xp as *const _,
        w1: w1p as *const _,
        w2: w2p as *const _,
        bias,
        y: ptrs.write("y", yv, &dev.stream, elem)? as *mut _,
        tokens: x_rows.tokens as i64,
        x_row_stride: x_rows.row_stride as i64,
        y_row_stride: y_rows.row_stride as i64,
        // Widths are at most n_in / n_out, within i32 (MonarchShape's invariant).
        x_cols: x_rows.width as i32,
        y_cols: y_rows.width as i32,
        group: plan.group as i32,
        block_tokens: plan.block_tokens as i32,
        h_stride: plan.h_stride as i32,
        transpose: transpose as i32,
        ..shape_params::<T>(shape)
    };
    let cfg = LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: plan.smem_bytes as u32,
    };
    // SAFETY: x holds (tokens-1)*x_row_stride + x_cols elements, y (tokens-1)*y_row_stride +
    // y_cols, w1/w2 their full shapes and bias y_cols (checked by the caller); the kernel reads
    // and writes no more, its shared memory is what the plan sized, and every pointer comes
    // from a guard alive until after the launch.
    unsafe { dev.launch("monarch", name, cfg, &params) }?;
    drop(ptrs);
    Ok(())
}

/// The dimensions and dtype of `shape` in a params struct, every other field zero (null).
fn shape_params<T: Element>(shape: MonarchShape) -> c::MonarchParams {
    let ([k, q, p], [l, s, r]) = (shape.w1_dims(), shape.w2_dims());
    // Every dimension is at most i32::MAX (MonarchShape's invariant).
    c::MonarchParams {
        k: k as i32,
        q: q as i32,
        p: p as i32,
        l: l as i32,
        s: s as i32,
        r: r as i32,
        dtype: (match T::DTYPE {
            DType::F32 => c::ATTNKIT_DTYPE_F32,
            DType::F16 => c::ATTNKIT_DTYPE_F16,
            DType::Bf16 => c::ATTNKIT_DTYPE_BF16,
        }) as i32,
        ..Default::default()
    }
}

/// A grid-stride launch over `n` items: enough CTAs to fill the GPU a few times.
fn grid_stride(dev: &CudaDevice, n: usize) -> LaunchConfig {
    let threads = c::ATTNKIT_MONARCH_SIMT_THREADS;
    let ctas = n
        .div_ceil(threads as usize)
        .min(dev.sm_count as usize * 8)
        .max(1);
    LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launches of `monarch_backward_mid_mma` and `monarch_backward_weights_mma`: one CTA
/// per 64 x 64 tile of every product, in the order kernels/monarch.h states (h, dh; one
/// thread per dbias column, then dw2, dw1, dx). A grid past 2^31 - 1 CTAs is an error, not
/// a wrapped launch.
fn mma_grids(shape: MonarchShape, tokens: usize, bias: bool) -> Result<[LaunchConfig; 2]> {
    let tile = c::ATTNKIT_MONARCH_GRAD_TILE as usize;
    let threads = c::ATTNKIT_MONARCH_GRAD_THREADS;
    let tiles = |a: usize, b: usize| a.div_ceil(tile).checked_mul(b.div_ceil(tile));
    let [k, q, p] = shape.w1_dims();
    let [l, s, r] = shape.w2_dims();
    let bias = if bias {
        shape.n_out().div_ceil(threads as usize)
    } else {
        0
    };
    let sum = |terms: &[Option<usize>]| -> Option<usize> {
        terms
            .iter()
            .try_fold(0usize, |acc, t| acc.checked_add((*t)?))
    };
    let mid = sum(&[
        tiles(tokens, q).and_then(|t| t.checked_mul(k)),
        tiles(tokens, r).and_then(|t| t.checked_mul(l)),
    ]);
    let weights = sum(&[
        tiles(s, r).and_then(|t| t.checked_mul(l)),
        tiles(q, p).and_then(|t| t.checked_mul(k)),
        tiles(tokens, p).and_then(|t| t.checked_mul(k)),
        Some(bias),
    ]);
    let grid = |ctas: Option<usize>| -> Result<LaunchConfig> {
        let ctas = ctas
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(|| Error::Shape {
                arg: "x",
                detail: format!(
                    "{tokens} tokens: the backward's {tile}x{tile} tiles exceed a grid's 2^31 - 1"
                ),
            })?;
        Ok(LaunchConfig {
            grid_dim: (ctas, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: c::ATTNKIT_MONARCH_GRAD_SMEM,
        })
    };
    Ok([grid(mid)?, grid(weights)?])
}

/// The backward pass on the GPU: h and dh into the workspace, then the weight gradients and
/// dx, all on tensor cores for bf16/f16 (two launches); f32 on CUDA cores, dx = M^T dy
/// through the transpose product. Everything already checked by the caller.
pub(super) fn backward<T: Element>(
    dev: &CudaDevice,
    w: &Weights<'_, T>,
    (x, x_rows): (&Buf<'_, T>, Rows),
    (dy, dy_rows): (&Buf<'_, T>, Rows),
    dx_rows: Rows,
    g: &mut Grads<'_, T>,
) -> Result<()> {
    let shape = w.shape;
    let tokens = x_rows.tokens;
    if tokens == 0 {
        // No token: the weight gradients are sums of nothing, and dx has no row. Only the
        // gradients' own elements are zeroed: a longer buffer's tail stays as it was.
        let zero = "zero the weight gradients";
        let zero_prefix = |arg, buf: &mut BufMut<'_, f32>, n: usize| -> Result<()> {
            let len = buf.len();
            let mut view =
                dev.view_mut(arg, buf)?
                    .try_slice_mut(..n)
                    .ok_or_else(|| Error::Shape {
                        arg,
                        detail: format!("holds {len} elements, needs at least {n}"),
                    })?;
            dev.stream.memset_zeros(&mut view).driver(zero)
        };
        zero_prefix("dw1", &mut g.dw1, shape.w1_len())?;
        zero_prefix("dw2", &mut g.dw2, shape.w2_len())?;
        if let Some(db) = &mut g.dbias {
            zero_prefix("dbias", db, shape.n_out())?;
        }
        return Ok(());
    }
    {
        let elem = std::mem::align_of::<T>();
        let (xv, dyv) = (dev.view("x", x)?, dev.view("dy", dy)?);
        let (w1v, w2v) = (dev.view("w1", &w.w1)?, dev.view("w2", &w.w2)?);
        let dw1v = dev.view_mut("dw1", &mut g.dw1)?;
        let dw2v = dev.view_mut("dw2", &mut g.dw2)?;
        let dbv = match &mut g.dbias {
            Some(b) => Some(dev.view_mut("dbias", b)?),
            None => None,
        };
        let wsv = dev.view_mut("workspace", &mut g.workspace)?;
        let mut ptrs = DevPtrs::default();
        let dbias = match dbv {
            Some(b) => ptrs.write("dbias", b, &dev.stream, 4)? as *mut _,
            None => std::ptr::null_mut(),
        };
        let params = c::MonarchParams {
            x: ptrs.read("x", xv, &dev.stream, elem)? as *const _,
            w1: ptrs.read("w1", w1v, &dev.stream, elem)? as *const _,
            w2: ptrs.read("w2", w2v, &dev.stream, elem)? as *const _,
            dy: ptrs.read("dy", dyv, &dev.stream, elem)? as *const _,
            dw1: ptrs.write("dw1", dw1v, &dev.stream, 4)? as *mut _,
            dw2: ptrs.write("dw2", dw2v, &dev.stream, 4)? as *mut _,
            dbias,
            workspace: ptrs.write("workspace", wsv, &dev.stream, 4)? as *mut _,
            tokens: tokens as i64,
            x_row_stride: x_rows.row_stride as i64,
            dy_row_stride: dy_rows.row_stride as i64,
            x_cols: x_rows.width as i32,
            ..shape_params::<T>(shape)
        };
        // SAFETY (both arms): x, dy hold their checked rows, w1/w2/dw1/dw2 their shapes,
        // dbias n_out, dx its checked rows, the workspace 2 * tokens * n_mid f32 (checked by
        // the caller); the kernels touch no more, and every pointer comes from a guard alive
        // until after the launches.
        if matches!(T::DTYPE, DType::F16 | DType::Bf16) {
            // Everything on tensor cores, dx included (from dh, the transpose's first stage).
            let [mid, weights] = mma_grids(shape, tokens, !params.dbias.is_null())?;
            let dxv = dev.view_mut("dx", &mut g.dx)?;
            let params = c::MonarchParams {
                y: ptrs.write("dx", dxv, &dev.stream, elem)? as *mut _,
                y_row_stride: dx_rows.row_stride as i64,
                y_cols: shape.n_in() as i32,
                ..params
            };
            unsafe {
                dev.launch("monarch", "monarch_backward_mid_mma", mid, &params)?;
                dev.launch("monarch", "monarch_backward_weights_mma", weights, &params)?;
            }
            return Ok(());
        }
        let n_mid_values = tokens * shape.n_mid();
        let n_grads = shape.w1_len() + shape.w2_len() + shape.n_out();
        unsafe {
            dev.launch(
                "monarch",
                "monarch_backward_mid",
                grid_stride(dev, n_mid_values),
                &params,
            )?;
            dev.launch(
                "monarch",
                "monarch_backward_weights",
                grid_stride(dev, n_grads),
                &params,
            )?;
        }
        drop(ptrs);
    }
    let dy_rows_t = Rows {
        width: shape.n_out(),
        ..dy_rows
    };
    // dx = M^T dy: the transpose product, without the forward bias.
    product(
        dev,
        w,
        None,
        (dy, dy_rows_t),
        (&mut g.dx, dx_rows),
        Mode::Transpose,
    )
}
