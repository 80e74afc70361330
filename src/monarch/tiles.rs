//! The one pure function that picks the GPU kernel's tiling: which kernel, how many output
//! blocks per CTA (the group G, which tiles the intermediate) and how many tokens per CTA.
//!
//! Nothing here has been measured on a GPU yet (no session has had one); the choices follow
//! a traffic estimate, stated beside each.

use super::MonarchShape;
use crate::dtype::DType;

/// Tokens per CTA of the simt kernel (`ATTNKIT_MONARCH_SIMT_TOKENS` in kernels/monarch.h).
pub(crate) const SIMT_TOKENS: usize = 8;

/// Warps of the mma kernel (`ATTNKIT_MONARCH_MMA_THREADS / 32`; src/monarch/cuda.rs asserts it).
pub(crate) const MMA_WARPS: usize = 8;

/// Shared bytes of one warp's operand staging in the mma kernel at `16 * mt` tokens
/// (`ATTNKIT_MONARCH_STAGE_BYTES` in kernels/monarch.h): two buffers of the A rows and two of
/// 16 B rows, 32 two-byte elements a row.
pub(crate) fn stage_bytes(mt: usize) -> usize {
    2 * (16 * mt + 16) * 64
}

/// Which kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `monarch_forward_mma{mt}`: tensor cores, `16 * mt` tokens per CTA.
    Mma { mt: usize },
    /// `monarch_product_simt`: f32 FMA, any shape and dtype, forward or transpose.
    Simt,
}

/// A launch plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub kernel: Kernel,
    /// Output blocks per CTA (divides `l`).
    pub group: usize,
    /// Tokens per CTA.
    pub block_tokens: usize,
    /// Elements between token rows of the on-chip intermediate.
    pub h_stride: usize,
    /// Dynamic shared memory, bytes.
    pub smem_bytes: usize,
}

/// Whether every 16-column tile of every group's intermediate reads a single input block
/// (the mma kernel's stage 1 takes one x block per tile). Column z of the group starting at
/// j0 is `m = (z / G) * l + j0 + z % G`, increasing in z, so checking each tile's two ends
/// suffices: `n_mid / 16` checks.
fn tiles_stay_in_one_block(shape: MonarchShape, group: usize) -> bool {
    let ([_, q, _], [l, _, r]) = (shape.w1_dims(), shape.w2_dims());
    let mid = |z: usize, j0: usize| (z / group) * l + j0 + z % group;
    (0..l).step_by(group).all(|j0| {
        (0..group * r)
            .step_by(16)
            .all(|z0| mid(z0, j0) / q == mid(z0 + 15, j0) / q)
    })
}

/// Estimated elements moved per token (from L2 or HBM): the group's weights once per token
/// tile, plus `x` once per group. Forward: `G*r*(p + s) / tokens + n_in * l / G`; the
/// transpose mirrors it over w1's blocks: `G*q*(s + p) / tokens + n_out * k / G`. Smaller is
/// better; ties go to the larger group (fewer CTAs re-reading x).
fn traffic(shape: MonarchShape, transpose: bool, group: usize, tokens: usize) -> f64 {
    let ([k, q, p], [l, s, r]) = (shape.w1_dims(), shape.w2_dims());
    let (per_block, blocks, n_x) = if transpose {
        (q, k, shape.n_out())
    } else {
        (r, l, shape.n_in())
    };
    (group * per_block * (p + s)) as f64 / tokens as f64 + (n_x * (blocks / group)) as f64
}

/// The tiling for `shape` and `dtype` with `smem_limit` bytes of shared memory per CTA, x rows
/// and weights that take 16-byte copies (`x_vec`: x's row stride a multiple of 8 elements, x,
/// w1 and w2 16-byte aligned), for the forward product or its transpose; None when even one
/// output block's intermediate for one token does not fit.
///
/// - Forward, bf16/f16 with `p`, `r`, `s` multiples of 16 (the mma tile's K and N), `x_vec`
///   (16-byte cp.async copies) and a group whose column tiles stay in one input block: the
///   mma kernel, `16 * mt` tokens for mt in {1, 2, 4}, its shared memory h plus the warps'
///   staging ([`stage_bytes`]).
/// - Everything else (f32, other shapes, the transpose): the simt kernel, up to 8 tokens (its
///   per-thread accumulators), groups over `l` (forward) or `k` (transpose).
///
/// Among the candidates that fit, the least [`traffic`]: many small blocks (n = 4096, 64
/// blocks) come out at G = 32 with 32 tokens (x read twice, weights 8K elements per token),
/// few large ones (n = 4096, 4 blocks of 1024) at G = 1 with 64 tokens on an H100 (r = 1024
/// values of h per token: 129 KB, plus 80 KB of staging) and 32 on an A100's 163 KB.
#[cfg(test)]
pub(crate) fn plan(
    shape: MonarchShape,
    dtype: DType,
    x_vec: bool,
    smem_limit: usize,
    transpose: bool,
) -> Option<Plan> {
    plan_for(shape, dtype, x_vec, smem_limit, transpose, None)
}

/// [`plan`] for a known launch: `occupancy = (tokens, SMs)`. The traffic estimate is divided
/// by the fraction of the GPU the grid fills (`min(1, CTAs / SMs)`), so with few tokens a
/// smaller token tile or group that puts a CTA on every SM wins over the least traffic on a
/// handful of SMs (64 blocks of 64 at 32 tokens: 2 CTAs on 132 SMs otherwise). With many
/// tokens every candidate fills the GPU and the choice is [`plan`]'s.
pub(crate) fn plan_for(
    shape: MonarchShape,
    dtype: DType,
    x_vec: bool,
    smem_limit: usize,
    transpose: bool,
    occupancy: Option<(usize, usize)>,
) -> Option<Plan> {
    let ([k, q, p], [l, s, r]) = (shape.w1_dims(), shape.w2_dims());
    let mma_ok =
        !transpose && dtype != DType::F32 && p % 16 == 0 && r % 16 == 0 && s % 16 == 0 && x_vec;
    let (blocks, per_block) = if transpose { (k, q) } else { (l, r) };
    let mut best: Option<(f64, Plan)> = None;
    // Largest groups first, so a tie keeps the larger group.
    for group in (1..=blocks).rev().filter(|g| blocks % g == 0) {
        let width = group * per_block;
        let candidate = if mma_ok && tiles_stay_in_one_block(shape, group) {
            // +8 elements per row: rows land 4 banks apart, so the 8 rows of an A fragment
            // load hit 32 distinct banks.
            let h_stride = width + 8;
            [4, 2, 1]
                .into_iter()
                .filter_map(|mt| {
                    let smem = 16 * mt * h_stride * dtype.size() + MMA_WARPS * stage_bytes(mt);
                    (smem <= smem_limit).then_some(Plan {
                        kernel: Kernel::Mma { mt },
                        group,
                        block_tokens: 16 * mt,
                        h_stride,
                        smem_bytes: smem,
                    })
                })
                .collect::<Vec<_>>()
        } else if mma_ok {
            Vec::new()
        } else {
            // f32 rows; +1 so the token rows do not share banks.
            let h_stride = width + 1;
            [SIMT_TOKENS, 4, 2, 1]
                .into_iter()
                .filter_map(|tokens| {
                    let smem = tokens * h_stride * 4;
                    (smem <= smem_limit).then_some(Plan {
                        kernel: Kernel::Simt,
                        group,
                        block_tokens: tokens,
                        h_stride,
                        smem_bytes: smem,
                    })
                })
                .collect::<Vec<_>>()
        };
        // Without occupancy only the largest token tile that fits competes (as before);
        // with it, every tile that fits.
        let take = if occupancy.is_some() {
            candidate.len()
        } else {
            1
        };
        for plan in candidate.into_iter().take(take) {
            let mut cost = traffic(shape, transpose, group, plan.block_tokens);
            if let Some((tokens, sms)) = occupancy {
                let ctas = tokens.max(1).div_ceil(plan.block_tokens) * (blocks / group);
                cost /= (ctas as f64 / sms.max(1) as f64).min(1.0);
            }
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, plan));
            }
        }
    }
    if best.is_none() && mma_ok {
        // No group's column tiles stay in one input block: the simt kernel takes it.
        return plan_for(shape, DType::F32, false, smem_limit, false, occupancy);
    }
    best.map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: usize = 227 * 1024;

    #[test]
    fn few_tokens_spread_over_the_gpu_many_tokens_keep_the_least_traffic() {
        let small = MonarchShape::square(4096, 64).unwrap();
        let ctas = |p: &Plan, tokens: usize| tokens.div_ceil(p.block_tokens) * (64 / p.group);
        // 32 tokens on 132 SMs: the plain plan puts 2 CTAs on the GPU; the occupancy plan more.
        let plain = plan(small, DType::Bf16, true, H100, false).unwrap();
        let spread = plan_for(small, DType::Bf16, true, H100, false, Some((32, 132))).unwrap();
        assert!(
            ctas(&spread, 32) > ctas(&plain, 32),
            "{plain:?} vs {spread:?}"
        );
        // 16k tokens fill the GPU with any candidate: the least-traffic choice stands.
        let many = plan_for(small, DType::Bf16, true, H100, false, Some((16384, 132))).unwrap();
        assert_eq!(
            (many.group, many.block_tokens),
            (plain.group, plain.block_tokens)
        );
    }
    const A100: usize = 163 * 1024;

    #[test]
    fn plans_of_the_two_regimes() {
        let small = MonarchShape::square(4096, 64).unwrap();
        let p = plan(small, DType::Bf16, true, H100, false).unwrap();
        assert_eq!(
            (p.kernel, p.group, p.block_tokens),
            (Kernel::Mma { mt: 2 }, 32, 32)
        );
        let large = MonarchShape::square(4096, 4).unwrap();
        // 64 tokens need 129 KB of h and 80 KB of staging: an H100 has room, an A100 not.
        for (limit, mt) in [(H100, 4), (A100, 2)] {
            let p = plan(large, DType::F16, true, limit, false).unwrap();
            assert_eq!(
                (p.kernel, p.group, p.block_tokens),
                (Kernel::Mma { mt }, 1, 16 * mt)
            );
            assert!(p.smem_bytes <= limit);
        }
        // f32, odd strides and shapes off the 16 grid take the simt kernel.
        assert_eq!(
            plan(large, DType::F32, true, H100, false).unwrap().kernel,
            Kernel::Simt
        );
        assert_eq!(
            plan(large, DType::Bf16, false, H100, false).unwrap().kernel,
            Kernel::Simt
        );
        let odd = MonarchShape::new([4, 6, 5], [3, 7, 8]).unwrap();
        assert_eq!(
            plan(odd, DType::Bf16, true, H100, false).unwrap().kernel,
            Kernel::Simt
        );
    }

    #[test]
    fn every_plan_fits_and_its_tiles_stay_in_one_block() {
        for (d1, d2) in [
            ([16, 64, 64], [16, 64, 64]),
            ([4, 256, 256], [4, 256, 256]),
            ([2, 1024, 1024], [2, 1024, 1024]),
            ([4, 64, 32], [16, 32, 16]),
            ([8, 32, 16], [4, 48, 64]),
            ([64, 16, 16], [16, 32, 64]),
        ] {
            let shape = MonarchShape::new(d1, d2).unwrap();
            for limit in [48 * 1024, A100, H100] {
                let p = plan(shape, DType::Bf16, true, limit, false).unwrap();
                assert!(p.smem_bytes <= limit, "{d1:?} {d2:?}: {p:?}");
                assert_eq!(d2[0] % p.group, 0);
                if let Kernel::Mma { mt } = p.kernel {
                    assert!(
                        tiles_stay_in_one_block(shape, p.group),
                        "{d1:?} {d2:?} {p:?}"
                    );
                    assert_eq!(p.block_tokens, 16 * mt);
                }
                // The transpose: simt, groups over w1's blocks, g of group*q values per token.
                let t = plan(shape, DType::Bf16, true, limit, true).unwrap();
                assert_eq!((t.kernel, d1[0] % t.group), (Kernel::Simt, 0));
                assert!(t.h_stride > t.group * d1[1] && t.smem_bytes <= limit);
            }
        }
        // A block so wide that one token's r values do not fit: no plan.
        let huge = MonarchShape::new([1, 1 << 16, 16], [1, 16, 1 << 16]).unwrap();
        assert!(plan(huge, DType::F32, true, 48 * 1024, false).is_none());
    }

    /// The kernels' index maps (kernels/monarch.cuh `mid_index`, `onchip_column`), restated:
    /// over the groups of a plan, the columns z of each group hit every intermediate value
    /// exactly once (nothing recomputed, nothing missed), on-chip columns are a bijection onto
    /// `[0, G*r)`, and output block `j0 + jl` finds `h[rr*l + j]` at on-chip column `jl*r + rr`.
    #[test]
    fn groups_partition_the_intermediate() {
        for (d1, d2) in [
            ([16, 64, 64], [16, 64, 64]),
            ([4, 64, 32], [16, 32, 16]),
            ([8, 32, 16], [4, 48, 64]),
            ([4, 6, 5], [3, 7, 8]),
        ] {
            let shape = MonarchShape::new(d1, d2).unwrap();
            let [l, _, r] = d2;
            for group in (1..=l).filter(|g| l % g == 0) {
                let mut seen = vec![0u8; shape.n_mid()];
                for j0 in (0..l).step_by(group) {
                    let mut onchip = vec![false; group * r];
                    for z in 0..group * r {
                        let m = (z / group) * l + j0 + z % group;
                        let col = (z % group) * r + z / group;
                        seen[m] += 1;
                        assert!(!onchip[col]);
                        onchip[col] = true;
                        let (rr, jl) = (m / l, m % l - j0);
                        assert_eq!(col, jl * r + rr);
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{d1:?} {d2:?} G={group}");
            }
        }
    }
}
