//! Per-launch counters: what a launch executed and how its memory accesses map onto the
//! hardware's units (shared-memory wavefronts, global sectors). They are a structural proxy
//! for speed on a machine without a GPU, not a timing model: no latencies, no overlap.
//!
//! The shared-memory model is the one the CUDA profiler documents for sm_80/sm_90: 32 banks of
//! 4 bytes; a warp access is split into phases of 128 bytes' worth of lanes (32 lanes for
//! accesses of up to 4 bytes, 16 for 8, 8 for 16; each `ldmatrix` matrix is one phase of 8
//! rows); a phase takes as many wavefronts as the most distinct 4-byte words any one bank
//! holds (lanes reading the same word share it). Global accesses are counted in the 32-byte
//! sectors a warp request touches.

/// What a launch executed. The memory counters beyond `thread_instructions`,
/// `warp_instructions`, `ctas`, `barriers` and `mma` are gathered only with
/// [`Checks::counters`](crate::Checks::counters) on (they cost interpreter time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Instructions executed, counted once per thread.
    pub thread_instructions: u64,
    /// Instructions issued, counted once per group of lanes issuing together.
    pub warp_instructions: u64,
    /// CTAs run.
    pub ctas: u64,
    /// CTA-wide barriers (`bar.sync`) completed, summed over CTAs.
    pub barriers: u64,
    /// Warp-level `mma.sync.m16n8k16` instructions (4096 floating-point operations each).
    pub mma: u64,
    /// Warp-level `ldmatrix` instructions.
    pub ldmatrix: u64,
    /// Warp-level shared-memory accesses: loads, stores, atomics, `ldmatrix`, and the shared
    /// side of `cp.async`.
    pub shared_requests: u64,
    /// Bytes those accesses moved.
    pub shared_bytes: u64,
    /// Wavefronts they took under the bank model above.
    pub shared_wavefronts: u64,
    /// Wavefronts they would take without bank conflicts (one per phase with a live lane).
    pub shared_ideal_wavefronts: u64,
    /// Warp-level global-memory requests: loads, stores, atomics and the source of `cp.async`.
    pub global_requests: u64,
    /// Bytes those requests moved.
    pub global_bytes: u64,
    /// 32-byte sectors they touched (distinct per request).
    pub global_sectors: u64,
}

impl Stats {
    /// Floating-point operations the tensor-core instructions performed.
    pub fn mma_flops(&self) -> u64 {
        self.mma * 2 * 16 * 8 * 16
    }

    /// Extra wavefronts bank conflicts cost, per warp-level shared access.
    pub fn conflicts_per_shared_request(&self) -> f64 {
        ratio(
            self.shared_wavefronts - self.shared_ideal_wavefronts,
            self.shared_requests,
        )
    }

    /// 32-byte sectors per warp-level global request (4 for a coalesced 4-byte access per
    /// lane, 16 for 16 bytes per lane).
    pub fn sectors_per_global_request(&self) -> f64 {
        ratio(self.global_sectors, self.global_requests)
    }

    /// Shared-memory bytes moved per tensor-core floating-point operation.
    pub fn shared_bytes_per_mma_flop(&self) -> f64 {
        ratio(self.shared_bytes, self.mma_flops())
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One warp instruction's accesses, gathered lane by lane: (lane, address or shared offset,
/// bytes).
pub(crate) struct Gather {
    n: usize,
    lane: [u8; 32],
    addr: [u64; 32],
    len: [u8; 32],
}

impl Gather {
    pub(crate) fn new() -> Gather {
        Gather {
            n: 0,
            lane: [0; 32],
            addr: [0; 32],
            len: [0; 32],
        }
    }

    pub(crate) fn push(&mut self, lane: usize, addr: u64, len: u32) {
        if self.n < 32 {
            self.lane[self.n] = lane as u8;
            self.addr[self.n] = addr;
            self.len[self.n] = len.min(255) as u8;
            self.n += 1;
        }
    }

    fn entries(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        (0..self.n).map(|i| (self.lane[i] as usize, self.addr[i], self.len[i] as u64))
    }
}

/// Adds one warp-level shared access. `rows_per_phase`: `Some(8)` for `ldmatrix` (each
/// matrix's 8 row addresses are one phase); `None` to split by access width.
pub(crate) fn count_shared(s: &mut Stats, g: &Gather, rows_per_phase: Option<usize>) {
    if g.n == 0 {
        return;
    }
    s.shared_requests += 1;
    let width = g.entries().map(|e| e.2).max().unwrap_or(4).max(4);
    let per = rows_per_phase.unwrap_or((128 / width).max(1) as usize);
    let phases = 32usize.div_ceil(per);
    for p in 0..phases {
        // Distinct words per bank within the phase.
        let mut words: [u64; 128] = [0; 128];
        let mut nw = 0;
        for (lane, addr, len) in g.entries() {
            if lane / per != p {
                continue;
            }
            s.shared_bytes += len;
            for word in addr / 4..(addr + len).div_ceil(4) {
                if nw < words.len() && !words[..nw].contains(&word) {
                    words[nw] = word;
                    nw += 1;
                }
            }
        }
        if nw == 0 {
            continue;
        }
        let mut per_bank = [0u32; 32];
        for &word in &words[..nw] {
            per_bank[(word % 32) as usize] += 1;
        }
        s.shared_wavefronts += per_bank.iter().copied().max().unwrap_or(1) as u64;
        s.shared_ideal_wavefronts += 1;
    }
}

/// Adds one warp-level global request.
pub(crate) fn count_global(s: &mut Stats, g: &Gather) {
    if g.n == 0 {
        return;
    }
    s.global_requests += 1;
    let mut sectors = [0u64; 64];
    let mut ns = 0;
    for (_, addr, len) in g.entries() {
        s.global_bytes += len;
        for sector in addr / 32..(addr + len).div_ceil(32) {
            if ns < sectors.len() && !sectors[..ns].contains(&sector) {
                sectors[ns] = sector;
                ns += 1;
            }
        }
    }
    s.global_sectors += ns as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gather(f: impl Fn(usize) -> Option<(u64, u32)>) -> Gather {
        let mut g = Gather::new();
        for lane in 0..32 {
            if let Some((a, n)) = f(lane) {
                g.push(lane, a, n);
            }
        }
        g
    }

    fn shared(g: &Gather, rows: Option<usize>) -> Stats {
        let mut s = Stats::default();
        count_shared(&mut s, g, rows);
        s
    }

    #[test]
    fn consecutive_words_take_one_wavefront_and_a_stride_of_32_words_takes_32() {
        let s = shared(&gather(|l| Some((4 * l as u64, 4))), None);
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (1, 1));
        assert_eq!(s.shared_bytes, 128);
        let s = shared(&gather(|l| Some((128 * l as u64, 4))), None);
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (32, 1));
        assert_eq!(s.conflicts_per_shared_request(), 31.0);
        // A stride of two words: two-way conflicts.
        let s = shared(&gather(|l| Some((8 * l as u64, 4))), None);
        assert_eq!(s.shared_wavefronts, 2);
    }

    #[test]
    fn one_word_read_by_every_lane_is_a_broadcast() {
        let s = shared(&gather(|_| Some((64, 4))), None);
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (1, 1));
        // Two bytes per lane, two lanes per word.
        let s = shared(&gather(|l| Some((2 * l as u64, 2))), None);
        assert_eq!(s.shared_wavefronts, 1);
    }

    #[test]
    fn sixteen_byte_accesses_go_by_quarter_warps() {
        // Contiguous 16-byte vectors: 4 phases, no conflicts.
        let s = shared(&gather(|l| Some((16 * l as u64, 16))), None);
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (4, 4));
        // Rows of 128 bytes read at the same column (an unswizzled ldmatrix): 8-way.
        let s = shared(&gather(|l| Some((128 * l as u64, 16))), Some(8));
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (32, 4));
        // The same rows with the 16-byte chunk XOR-swizzled by the row: conflict-free.
        let s = shared(
            &gather(|l| Some((128 * l as u64 + 16 * (l as u64 % 8), 16))),
            Some(8),
        );
        assert_eq!(s.shared_wavefronts, 4);
        // ldmatrix .x1: only lanes 0-7 give addresses.
        let s = shared(&gather(|l| (l < 8).then_some((16 * l as u64, 16))), Some(8));
        assert_eq!((s.shared_wavefronts, s.shared_ideal_wavefronts), (1, 1));
    }

    #[test]
    fn global_requests_count_distinct_sectors() {
        let mut s = Stats::default();
        count_global(&mut s, &gather(|l| Some((4096 + 4 * l as u64, 4))));
        assert_eq!(
            (s.global_requests, s.global_sectors, s.global_bytes),
            (1, 4, 128)
        );
        count_global(&mut s, &gather(|l| Some((4096 + 256 * l as u64, 4))));
        assert_eq!((s.global_requests, s.global_sectors), (2, 36));
        assert_eq!(s.sectors_per_global_request(), 18.0);
        // Every lane the same word: one sector.
        let mut s = Stats::default();
        count_global(&mut s, &gather(|_| Some((96, 4))));
        assert_eq!(s.global_sectors, 1);
    }

    #[test]
    fn no_live_lane_counts_nothing() {
        let g = gather(|_| None);
        let mut s = Stats::default();
        count_shared(&mut s, &g, None);
        count_global(&mut s, &g);
        assert_eq!(s, Stats::default());
    }
}
