//! The interpreter: CTAs one after another; in each, warps round-robin; in each warp, the
//! lanes at the lowest program counter issue together (independent thread scheduling with
//! eager reconvergence). Warp collectives wait until every lane of their mask is there.

// Lane loops index several per-lane arrays at once; indices read clearer than zips here.
#![allow(clippy::needless_range_loop)]

use crate::alu;
use crate::counters::{Gather, Stats, count_global, count_shared};
use crate::decode::DISCARD;
use crate::error::{Check, ConfigError, Error, Finding, Result};
use crate::ir::*;
use crate::memory::Memory;
use crate::module::{Kernel, Limits, Module};
use crate::shared::{Access, Shared};

/// Which checks run, and the instruction budget. All checks are on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// Misaligned accesses (an access outside memory is always a finding: there is nothing
    /// there to read).
    pub memcheck: bool,
    /// Unordered shared-memory accesses by different threads, one a write; reads of shared
    /// memory a `cp.async` is still writing.
    pub racecheck: bool,
    /// Reads of never-written shared or global memory.
    pub initcheck: bool,
    /// Barriers and collectives not reached by all they name, or with disagreeing masks.
    pub synccheck: bool,
    /// Thread-instructions one launch may execute before it fails (an endless-loop guard).
    pub budget: u64,
    /// Gather the memory counters of [`Stats`] (off by default: they cost interpreter time).
    pub counters: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks {
            memcheck: true,
            racecheck: true,
            initcheck: true,
            synccheck: true,
            budget: 20_000_000_000,
            counters: false,
        }
    }
}

impl Checks {
    /// The default, changed by `ATTNKIT_EMU_CHECKS` (a comma list of the checks to keep on,
    /// or `all`/`none`), `ATTNKIT_EMU_BUDGET` (thread-instructions per launch) and
    /// `ATTNKIT_EMU_COUNTERS` (set and not `0`: gather the memory counters).
    pub fn from_env() -> Checks {
        let mut c = Checks::default();
        if let Ok(list) = std::env::var("ATTNKIT_EMU_CHECKS") {
            let on = |name: &str| list == "all" || list.split(',').any(|s| s.trim() == name);
            c.memcheck = on("memcheck");
            c.racecheck = on("racecheck");
            c.initcheck = on("initcheck");
            c.synccheck = on("synccheck");
        }
        c.counters = std::env::var("ATTNKIT_EMU_COUNTERS").is_ok_and(|v| !v.is_empty() && v != "0");
        if let Some(b) = std::env::var("ATTNKIT_EMU_BUDGET")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            c.budget = b;
        }
        c
    }
}

/// One launch's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// Grid dimensions (CTAs).
    pub grid: [u32; 3],
    /// Block dimensions (threads).
    pub block: [u32; 3],
    /// Dynamic shared memory bytes.
    pub dynamic_shared: u32,
    /// The parameter buffer, laid out as [`Kernel::params`] says.
    pub params: &'a [u8],
}

/// Checks a launch configuration as the driver does, before anything runs.
pub fn check_config(kernel: &Kernel, l: &Launch) -> Result<(), ConfigError> {
    let lim = Limits::SM90;
    if l.grid.contains(&0) || l.block.contains(&0) {
        return Err(ConfigError::ZeroDimension {
            grid: l.grid,
            block: l.block,
        });
    }
    let threads = l.block.iter().map(|&d| d as u64).product::<u64>();
    let limit = kernel.max_threads.map_or(lim.max_threads_per_block, |m| {
        m.min(lim.max_threads_per_block)
    });
    if threads > limit as u64 || l.block.iter().zip(lim.max_block).any(|(&d, m)| d > m) {
        return Err(ConfigError::TooManyThreads {
            threads,
            limit: limit as u64,
        });
    }
    if l.grid.iter().zip(lim.max_grid).any(|(&d, m)| d > m) {
        return Err(ConfigError::GridTooLarge { grid: l.grid });
    }
    let bytes = kernel.code.dynamic_offset as u64 + l.dynamic_shared as u64;
    if bytes > lim.max_shared_optin as u64 {
        return Err(ConfigError::TooMuchShared {
            bytes,
            limit: lim.max_shared_optin as u64,
        });
    }
    if l.params.len() < kernel.param_bytes() as usize {
        return Err(ConfigError::ParamSize {
            got: l.params.len(),
            need: kernel.param_bytes() as usize,
        });
    }
    Ok(())
}

/// Runs `kernel` to completion on `mem`, checking as `checks` says.
pub fn launch(
    _module: &Module,
    kernel: &Kernel,
    l: &Launch,
    mem: &mut Memory,
    checks: &Checks,
) -> Result<Stats> {
    check_config(kernel, l).map_err(|error| Error::Config {
        kernel: kernel.name.clone(),
        error,
    })?;
    let nthreads = l.block.iter().product::<u32>() as usize;
    let nwarps = nthreads.div_ceil(32);
    let nregs = kernel.code.reg_masks.len();
    let mut cta = Cta {
        k: kernel,
        l,
        checks,
        mem,
        ctaid: [0; 3],
        warps: (0..nwarps)
            .map(|w| Warp {
                regs: vec![0; nregs * 32],
                pc: [0; 32],
                st: [St::Absent; 32],
                base: (w * 32) as u32,
                wsync: 0,
            })
            .collect(),
        shared: Shared::new(
            (kernel.code.dynamic_offset + l.dynamic_shared) as usize,
            checks.racecheck,
        ),
        local: vec![0; kernel.local_bytes as usize * nthreads],
        asyncs: (0..nthreads).map(|_| Async::default()).collect(),
        stats: Stats::default(),
        nthreads,
    };
    for z in 0..l.grid[2] {
        for y in 0..l.grid[1] {
            for x in 0..l.grid[0] {
                cta.run([x, y, z])?;
            }
        }
    }
    Ok(cta.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Ready,
    /// Waiting at `bar.sync` (at its pc).
    Bar,
    Exited,
    /// Past the end of the block.
    Absent,
}

struct Warp {
    /// Register-major: `regs[slot * 32 + lane]`.
    regs: Vec<u64>,
    pc: [u32; 32],
    st: [St; 32],
    /// Linear id of lane 0.
    base: u32,
    /// Count of completed `bar.warp.sync`s: orders the warp's lanes for racecheck.
    wsync: u16,
}

/// A thread's `cp.async` groups: the open one and the committed ones, oldest first.
#[derive(Default)]
struct Async {
    open: Vec<Pending>,
    committed: std::collections::VecDeque<Vec<Pending>>,
}

struct Pending {
    dst: u32,
    data: [u8; 16],
    len: u8,
}

struct Cta<'a> {
    k: &'a Kernel,
    l: &'a Launch<'a>,
    checks: &'a Checks,
    mem: &'a mut Memory,
    ctaid: [u32; 3],
    warps: Vec<Warp>,
    shared: Shared,
    local: Vec<u8>,
    asyncs: Vec<Async>,
    stats: Stats,
    nthreads: usize,
}

/// Where a resolved access lands.
#[derive(Clone, Copy)]
enum Place {
    Global(u64),
    Shared(u32),
    Local(usize),
    Param(usize),
}

const SLICE: u32 = 1 << 14;

impl<'a> Cta<'a> {
    fn tid(&self, t: u32) -> [u32; 3] {
        let [bx, by, _] = self.l.block;
        [t % bx, (t / bx) % by, t / (bx * by)]
    }

    fn finding(
        &self,
        check: Check,
        w: usize,
        lane: usize,
        pc: u32,
        address: Option<u64>,
        detail: String,
    ) -> Error {
        let ins = &self.k.code.instrs[pc as usize];
        let src = &self.k.code.source;
        Error::Finding(Box::new(Finding {
            check,
            kernel: self.k.name.clone(),
            ptx_line: ins.line,
            source: src.loc(ins.loc),
            instruction: src
                .line(ins.line)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            cta: self.ctaid,
            thread: self.tid(self.warps[w].base + lane as u32),
            address,
            detail,
        }))
    }

    fn run(&mut self, ctaid: [u32; 3]) -> Result<()> {
        self.ctaid = ctaid;
        for (w, warp) in self.warps.iter_mut().enumerate() {
            for lane in 0..32 {
                let t = w * 32 + lane;
                warp.st[lane] = if t < self.nthreads {
                    St::Ready
                } else {
                    St::Absent
                };
                warp.pc[lane] = 0;
            }
            warp.wsync = 0;
        }
        self.shared.reset();
        self.local.fill(0);
        for a in &mut self.asyncs {
            a.open.clear();
            a.committed.clear();
        }
        self.stats.ctas += 1;
        loop {
            let mut progressed = false;
            for w in 0..self.warps.len() {
                progressed |= self.run_warp(w)?;
            }
            if progressed {
                continue;
            }
            // Nothing can issue: the CTA is done, at a barrier, or deadlocked.
            let mut at_bar = None;
            let mut live = false;
            let mut stuck = None;
            for (w, warp) in self.warps.iter().enumerate() {
                for lane in 0..32 {
                    match warp.st[lane] {
                        St::Bar => {
                            live = true;
                            let pc = warp.pc[lane];
                            match at_bar {
                                None => at_bar = Some((w, lane, pc)),
                                Some((_, _, p)) if p != pc && self.checks.synccheck => {
                                    return Err(self.finding(
                                        Check::Synccheck,
                                        w,
                                        lane,
                                        pc,
                                        None,
                                        format!(
                                            "threads wait at different bar.sync instructions (PTX lines {} and {})",
                                            self.k.code.instrs[p as usize].line,
                                            self.k.code.instrs[pc as usize].line
                                        ),
                                    ));
                                }
                                _ => {}
                            }
                        }
                        St::Ready => {
                            live = true;
                            stuck.get_or_insert((w, lane));
                        }
                        _ => {}
                    }
                }
            }
            if !live {
                return Ok(());
            }
            if let Some((w, lane)) = stuck {
                let pc = self.warps[w].pc[lane];
                let why = match at_bar {
                    Some((bw, bl, bpc)) => format!(
                        "deadlock: this warp collective waits for lanes that never arrive, while thread {:?} waits at bar.sync (PTX line {})",
                        self.tid(self.warps[bw].base + bl as u32),
                        self.k.code.instrs[bpc as usize].line
                    ),
                    None => "deadlock: this warp collective waits for lanes that never arrive"
                        .to_string(),
                };
                return Err(self.finding(Check::Synccheck, w, lane, pc, None, why));
            }
            // Every live thread is at the barrier: release it.
            self.stats.barriers += 1;
            for warp in &mut self.warps {
                for lane in 0..32 {
                    if warp.st[lane] == St::Bar {
                        warp.st[lane] = St::Ready;
                        warp.pc[lane] += 1;
                    }
                }
            }
            self.shared.barrier();
        }
    }

    /// The lanes to issue next in warp `w`: the lowest pc whose instruction can complete.
    fn pick(&self, w: usize) -> Result<Option<(u32, u32)>> {
        let warp = &self.warps[w];
        let mut floor = 0u32;
        loop {
            // One pass: the lowest pc at or above `floor` and the lanes at it.
            let (mut pc, mut mask) = (u32::MAX, 0u32);
            for lane in 0..32 {
                let p = warp.pc[lane];
                if warp.st[lane] == St::Ready && p >= floor {
                    if p < pc {
                        (pc, mask) = (p, 1 << lane);
                    } else if p == pc {
                        mask |= 1 << lane;
                    }
                }
            }
            if pc == u32::MAX {
                return Ok(None);
            }
            let ins = &self.k.code.instrs[pc as usize];
            if !ins.is_collective() {
                return Ok(Some((pc, mask)));
            }
            let exists: u32 = (0..32)
                .filter(|&l| warp.st[l] != St::Absent)
                .fold(0, |m, l| m | 1 << l);
            let first = mask.trailing_zeros() as usize;
            let required = match ins.op {
                Op::Ldmatrix { .. } | Op::Mma { .. } => exists,
                _ => self.read(w, first, ins.src[ins.src.len() - 1]) as u32 & exists,
            };
            // Lanes with a different mask operand form their own collective.
            let group = match ins.op {
                Op::Ldmatrix { .. } | Op::Mma { .. } => mask,
                _ => {
                    let mut g = 0;
                    for lane in 0..32 {
                        if mask >> lane & 1 == 1 {
                            let m = self.read(w, lane, ins.src[ins.src.len() - 1]) as u32 & exists;
                            if m == required {
                                g |= 1 << lane;
                            }
                        }
                    }
                    g
                }
            };
            if self.checks.synccheck && group & !required != 0 {
                let lane = (group & !required).trailing_zeros() as usize;
                return Err(self.finding(Check::Synccheck, w, lane, pc, None, format!(
                    "the lane executes a collective whose mask {required:#010x} does not include it"
                )));
            }
            if required & !group == 0 {
                return Ok(Some((pc, group)));
            }
            // A lane the collective names has exited or can never arrive.
            let missing = required & !group;
            for lane in 0..32 {
                if missing >> lane & 1 == 1 && matches!(warp.st[lane], St::Exited | St::Absent) {
                    return Err(self.finding(
                        Check::Synccheck,
                        w,
                        first,
                        pc,
                        None,
                        format!(
                            "collective's mask {required:#010x} names lane {lane}, which has exited"
                        ),
                    ));
                }
            }
            floor = pc + 1;
        }
    }

    fn run_warp(&mut self, w: usize) -> Result<bool> {
        let mut issued = 0u32;
        while issued < SLICE {
            let Some((pc, mask)) = self.pick(w)? else {
                break;
            };
            self.step(w, pc, mask)?;
            issued += 1;
        }
        Ok(issued > 0)
    }

    fn sreg(&self, w: usize, lane: usize, s: Sreg) -> u64 {
        let t = self.warps[w].base + lane as u32;
        let tid = self.tid(t);
        let lanebit = 1u64 << lane;
        match s {
            Sreg::Tid(d) => tid[d as usize] as u64,
            Sreg::Ntid(d) => self.l.block[d as usize] as u64,
            Sreg::Ctaid(d) => self.ctaid[d as usize] as u64,
            Sreg::Nctaid(d) => self.l.grid[d as usize] as u64,
            Sreg::Laneid => lane as u64,
            Sreg::Warpid => w as u64,
            Sreg::Nwarpid => self.warps.len() as u64,
            Sreg::Smid | Sreg::Gridid => 0,
            Sreg::Nsmid => 132,
            Sreg::Clock | Sreg::Clock64 | Sreg::GlobalTimer => self.stats.thread_instructions,
            Sreg::LanemaskEq => lanebit,
            Sreg::LanemaskLt => lanebit - 1,
            Sreg::LanemaskLe => (lanebit << 1).wrapping_sub(1) & 0xffff_ffff,
            Sreg::LanemaskGt => !((lanebit << 1).wrapping_sub(1)) & 0xffff_ffff,
            Sreg::LanemaskGe => !(lanebit - 1) & 0xffff_ffff,
            Sreg::DynamicSmemSize => self.l.dynamic_shared as u64,
            Sreg::TotalSmemSize => (self.k.code.dynamic_offset + self.l.dynamic_shared) as u64,
        }
    }

    #[inline]
    fn read(&self, w: usize, lane: usize, o: Opd) -> u64 {
        match o {
            Opd::Reg(s) => self.warps[w].regs[s as usize * 32 + lane],
            Opd::NotReg(s) => self.warps[w].regs[s as usize * 32 + lane] ^ 1,
            Opd::Imm(v) => v,
            Opd::Sreg(s) => self.sreg(w, lane, s),
        }
    }

    #[inline]
    fn write(&mut self, w: usize, lane: usize, slot: Slot, v: u64) {
        if slot != DISCARD {
            let m = self.k.code.reg_masks[slot as usize];
            self.warps[w].regs[slot as usize * 32 + lane] = v & m;
        }
    }

    fn srcs(&self, w: usize, lane: usize, ins: &Instr) -> [u64; 4] {
        let mut s = [0u64; 4];
        for (i, o) in ins.src.iter().take(4).enumerate() {
            s[i] = self.read(w, lane, *o);
        }
        s
    }

    fn address(&self, w: usize, lane: usize, a: Addr) -> u64 {
        let base = a
            .base
            .map_or(0, |b| self.warps[w].regs[b as usize * 32 + lane]);
        base.wrapping_add(a.offset as u64)
    }

    /// Resolves an access of `len` bytes, checking bounds and alignment.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        w: usize,
        lane: usize,
        pc: u32,
        space: Space,
        addr: u64,
        len: u32,
        what: &str,
    ) -> Result<Place> {
        let space = match space {
            Space::Generic => match addr {
                a if (SHARED_WINDOW..SHARED_WINDOW + WINDOW).contains(&a) => Space::Shared,
                a if (LOCAL_WINDOW..LOCAL_WINDOW + WINDOW).contains(&a) => Space::Local,
                a if (PARAM_WINDOW..PARAM_WINDOW + WINDOW).contains(&a) => Space::Param,
                _ => Space::Global,
            },
            s => s,
        };
        let off = match space {
            Space::Shared if addr >= SHARED_WINDOW => addr - SHARED_WINDOW,
            Space::Local if addr >= LOCAL_WINDOW => addr - LOCAL_WINDOW,
            Space::Param if addr >= PARAM_WINDOW => addr - PARAM_WINDOW,
            _ => addr,
        };
        if self.checks.memcheck && off % len as u64 != 0 {
            return Err(self.finding(
                Check::Memcheck,
                w,
                lane,
                pc,
                Some(addr),
                format!("misaligned {len}-byte {} {what}", space.name()),
            ));
        }
        let oob = |size: usize| {
            self.finding(
                Check::Memcheck,
                w,
                lane,
                pc,
                Some(addr),
                format!(
                    "{len}-byte {} {what} out of bounds (the window is {size} bytes)",
                    space.name()
                ),
            )
        };
        Ok(match space {
            Space::Shared => {
                if off + len as u64 > self.shared.len() as u64 {
                    return Err(oob(self.shared.len()));
                }
                Place::Shared(off as u32)
            }
            Space::Local => {
                let per = self.k.local_bytes as u64;
                if off + len as u64 > per {
                    return Err(oob(per as usize));
                }
                Place::Local(((self.warps[w].base as u64 + lane as u64) * per + off) as usize)
            }
            Space::Param => {
                if off + len as u64 > self.l.params.len() as u64 {
                    return Err(oob(self.l.params.len()));
                }
                Place::Param(off as usize)
            }
            Space::Const => {
                return Err(self.finding(
                    Check::Memcheck,
                    w,
                    lane,
                    pc,
                    Some(addr),
                    "const space is not modelled".into(),
                ));
            }
            _ => Place::Global(addr),
        })
    }

    /// Notes lane `l`'s access for the counters, when they are on.
    fn gather(&self, sh: &mut Gather, gl: &mut Gather, l: usize, place: Place, len: u32) {
        if self.checks.counters {
            match place {
                Place::Shared(o) => sh.push(l, o as u64, len),
                Place::Global(a) => gl.push(l, a, len),
                _ => {}
            }
        }
    }

    /// Adds one instruction's gathered accesses to the counters.
    fn count(&mut self, sh: &Gather, gl: &Gather) {
        if self.checks.counters {
            count_shared(&mut self.stats, sh, None);
            count_global(&mut self.stats, gl);
        }
    }

    fn who(&self, w: usize, lane: usize) -> Access {
        Access {
            tid: (self.warps[w].base + lane as u32) as u16,
            wsync: self.warps[w].wsync,
        }
    }

    /// Loads `buf.len()` bytes.
    fn load(
        &mut self,
        w: usize,
        lane: usize,
        pc: u32,
        place: Place,
        addr: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let n = buf.len();
        match place {
            Place::Global(a) => {
                let Some((alloc, off)) = self.mem.find_mut(a, n as u64) else {
                    return Err(self.finding(
                        Check::Memcheck,
                        w,
                        lane,
                        pc,
                        Some(addr),
                        format!("{n}-byte global load outside every live allocation"),
                    ));
                };
                if self.checks.initcheck && !alloc.is_init(off, n) {
                    return Err(self.finding(
                        Check::Initcheck,
                        w,
                        lane,
                        pc,
                        Some(addr),
                        format!(
                            "{n}-byte global load of memory never written since it was allocated"
                        ),
                    ));
                }
                buf.copy_from_slice(&alloc.data[off..off + n]);
            }
            Place::Shared(off) => {
                let who = self.who(w, lane);
                if let Some((check, detail)) = self.shared.read(off, buf, who, self.checks) {
                    return Err(self.finding(check, w, lane, pc, Some(addr), detail));
                }
            }
            Place::Local(o) => buf.copy_from_slice(&self.local[o..o + n]),
            Place::Param(o) => buf.copy_from_slice(&self.l.params[o..o + n]),
        }
        Ok(())
    }

    fn store(
        &mut self,
        w: usize,
        lane: usize,
        pc: u32,
        place: Place,
        addr: u64,
        bytes: &[u8],
    ) -> Result<()> {
        let n = bytes.len();
        match place {
            Place::Global(a) => {
                let Some((alloc, off)) = self.mem.find_mut(a, n as u64) else {
                    return Err(self.finding(
                        Check::Memcheck,
                        w,
                        lane,
                        pc,
                        Some(addr),
                        format!("{n}-byte global store outside every live allocation"),
                    ));
                };
                alloc.data[off..off + n].copy_from_slice(bytes);
                alloc.mark_init(off, n);
            }
            Place::Shared(off) => {
                let who = self.who(w, lane);
                if let Some((check, detail)) = self.shared.write(off, bytes, who, self.checks) {
                    return Err(self.finding(check, w, lane, pc, Some(addr), detail));
                }
            }
            Place::Local(o) => self.local[o..o + n].copy_from_slice(bytes),
            Place::Param(_) => {
                return Err(self.finding(
                    Check::Memcheck,
                    w,
                    lane,
                    pc,
                    Some(addr),
                    "store to kernel parameters".into(),
                ));
            }
        }
        Ok(())
    }

    fn step(&mut self, w: usize, pc: u32, group: u32) -> Result<()> {
        let code = &self.k.code;
        let ins = &code.instrs[pc as usize];
        // Guarded-off lanes skip the instruction (a branch falls through).
        let mut exec = group;
        if let Some((p, neg)) = ins.guard {
            for lane in Bits(group) {
                let v = self.warps[w].regs[p as usize * 32 + lane] & 1 == 1;
                if v == neg {
                    exec &= !(1 << lane);
                }
            }
        }
        let n = exec.count_ones() as u64;
        self.stats.thread_instructions += n;
        self.stats.warp_instructions += 1;
        if self.stats.thread_instructions > self.checks.budget {
            return Err(Error::Budget {
                kernel: self.k.name.clone(),
                budget: self.checks.budget,
            });
        }
        if ins.is_collective() && exec != group && self.checks.synccheck {
            let lane = (group & !exec).trailing_zeros() as usize;
            return Err(self.finding(
                Check::Synccheck,
                w,
                lane,
                pc,
                None,
                "a predicated-off lane skips a warp collective its mask names".into(),
            ));
        }
        let lanes = move || Bits(exec);
        let mut next_pc = [pc + 1; 32];
        match ins.op {
            Op::Mov => {
                for l in lanes() {
                    let v = self.read(w, l, ins.src[0]);
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::Pack { bits } => {
                for l in lanes() {
                    let mut v = 0u64;
                    for (i, o) in ins.src.iter().enumerate() {
                        v |= (self.read(w, l, *o) & mask_of(bits as u32))
                            << (i as u32 * bits as u32);
                    }
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::Unpack { bits } => {
                for l in lanes() {
                    let v = self.read(w, l, ins.src[0]);
                    for (i, d) in ins.dst.iter().enumerate() {
                        self.write(w, l, *d, v >> (i as u32 * bits as u32));
                    }
                }
            }
            Op::Int { op, ty } => {
                for l in lanes() {
                    let v = alu::int(op, ty, self.srcs(w, l, ins));
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::Float {
                op,
                ty,
                rnd,
                ftz,
                sat,
            } => {
                for l in lanes() {
                    let v = alu::float(op, ty, rnd, ftz, sat, self.srcs(w, l, ins));
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::Setp { cmp, ty, combine } => {
                for l in lanes() {
                    let s = self.srcs(w, l, ins);
                    let p = alu::compare(cmp, ty, s[0], s[1]);
                    let c = s[2] & 1 == 1;
                    self.write(w, l, ins.dst[0], alu::combine(combine, p, c) as u64);
                    if let Some(&q) = ins.dst.get(1) {
                        self.write(w, l, q, alu::combine(combine, !p, c) as u64);
                    }
                }
            }
            Op::Selp { .. } => {
                for l in lanes() {
                    let s = self.srcs(w, l, ins);
                    self.write(w, l, ins.dst[0], if s[2] & 1 == 1 { s[0] } else { s[1] });
                }
            }
            Op::Cvt {
                dty,
                sty,
                rnd,
                sat,
                ftz,
            } => {
                for l in lanes() {
                    let v = alu::cvt(dty, sty, rnd, sat, ftz, self.read(w, l, ins.src[0]));
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::CvtPack { dty, relu } => {
                for l in lanes() {
                    let s = self.srcs(w, l, ins);
                    self.write(w, l, ins.dst[0], alu::cvt_pack(dty, relu, s[0], s[1]));
                }
            }
            Op::Cvta { to, space } => {
                let win = match space {
                    Space::Shared => SHARED_WINDOW,
                    Space::Local => LOCAL_WINDOW,
                    Space::Param => PARAM_WINDOW,
                    _ => 0,
                };
                for l in lanes() {
                    let v = self.read(w, l, ins.src[0]);
                    self.write(
                        w,
                        l,
                        ins.dst[0],
                        if to {
                            v.wrapping_sub(win)
                        } else {
                            v.wrapping_add(win)
                        },
                    );
                }
            }
            Op::Ld { space, ty } => {
                let eb = ty.bytes() as usize;
                let total = eb * ins.dst.len();
                let (mut sh, mut gl) = (Gather::new(), Gather::new());
                for l in lanes() {
                    let addr = self.address(w, l, ins.addr[0]);
                    let place = self.place(w, l, pc, space, addr, total as u32, "load")?;
                    self.gather(&mut sh, &mut gl, l, place, total as u32);
                    let mut buf = [0u8; 32];
                    self.load(w, l, pc, place, addr, &mut buf[..total])?;
                    for (i, d) in ins.dst.iter().enumerate() {
                        let mut e = [0u8; 8];
                        e[..eb].copy_from_slice(&buf[i * eb..(i + 1) * eb]);
                        let raw = u64::from_le_bytes(e);
                        let v = if ty.signed() {
                            alu::sx(raw, ty.bits()) as u64
                        } else {
                            raw
                        };
                        self.write(w, l, *d, v);
                    }
                }
                self.count(&sh, &gl);
            }
            Op::St { space, ty } => {
                let eb = ty.bytes() as usize;
                let total = eb * ins.src.len();
                let (mut sh, mut gl) = (Gather::new(), Gather::new());
                for l in lanes() {
                    let addr = self.address(w, l, ins.addr[0]);
                    let place = self.place(w, l, pc, space, addr, total as u32, "store")?;
                    self.gather(&mut sh, &mut gl, l, place, total as u32);
                    let mut buf = [0u8; 32];
                    for (i, o) in ins.src.iter().enumerate() {
                        let v = self.read(w, l, *o);
                        buf[i * eb..(i + 1) * eb].copy_from_slice(&v.to_le_bytes()[..eb]);
                    }
                    self.store(w, l, pc, place, addr, &buf[..total])?;
                }
                self.count(&sh, &gl);
            }
            Op::Atom { op, space, ty, ret } => {
                let n = ty.bytes();
                let (mut sh, mut gl) = (Gather::new(), Gather::new());
                for l in lanes() {
                    let addr = self.address(w, l, ins.addr[0]);
                    let place = self.place(w, l, pc, space, addr, n, "atomic")?;
                    self.gather(&mut sh, &mut gl, l, place, n);
                    let mut buf = [0u8; 8];
                    self.load(w, l, pc, place, addr, &mut buf[..n as usize])?;
                    let old = u64::from_le_bytes(buf);
                    let s = self.srcs(w, l, ins);
                    let new = atomic(op, ty, old, s[0], s[1]);
                    self.store(w, l, pc, place, addr, &new.to_le_bytes()[..n as usize])?;
                    if ret {
                        self.write(w, l, ins.dst[0], old);
                    }
                }
                self.count(&sh, &gl);
            }
            Op::Bra { target } => {
                for l in lanes() {
                    next_pc[l] = target;
                }
            }
            Op::Ret | Op::Exit => {
                for l in lanes() {
                    self.warps[w].st[l] = St::Exited;
                }
            }
            Op::Trap => {
                if exec != 0 {
                    let lane = exec.trailing_zeros() as usize;
                    return Err(self.finding(
                        Check::Fault,
                        w,
                        lane,
                        pc,
                        None,
                        "trap executed".into(),
                    ));
                }
            }
            Op::Bar => {
                for l in lanes() {
                    if let Some(&c) = ins.src.get(1) {
                        let count = self.read(w, l, c);
                        if count as usize != self.nthreads.div_ceil(32) * 32 {
                            return Err(self.finding(Check::Fault, w, l, pc, None, format!(
                                "bar.sync with a thread count ({count}) other than the whole CTA is not supported by the emulator"
                            )));
                        }
                    }
                    self.warps[w].st[l] = St::Bar;
                    next_pc[l] = pc;
                }
            }
            Op::BarWarp => {
                self.warps[w].wsync = self.warps[w].wsync.wrapping_add(1);
            }
            Op::Activemask => {
                for l in lanes() {
                    self.write(w, l, ins.dst[0], group as u64);
                }
            }
            Op::Vote { mode } => {
                let mut ballot = 0u32;
                for l in lanes() {
                    if self.read(w, l, ins.src[0]) & 1 == 1 {
                        ballot |= 1 << l;
                    }
                }
                for l in lanes() {
                    let v = match mode {
                        VoteMode::Ballot => ballot as u64,
                        VoteMode::All => (ballot == exec) as u64,
                        VoteMode::Any => (ballot != 0) as u64,
                        VoteMode::Uni => (ballot == exec || ballot == 0) as u64,
                    };
                    self.write(w, l, ins.dst[0], v);
                }
            }
            Op::Shfl { mode } => self.shfl(w, pc, exec, ins, mode)?,
            Op::Ldmatrix { num, trans } => self.ldmatrix(w, pc, exec, ins, num, trans)?,
            Op::Mma { ab } => {
                self.stats.mma += 1;
                self.mma(w, exec, ins, ab)
            }
            Op::CpAsync { bytes } => {
                let (mut sh, mut gl) = (Gather::new(), Gather::new());
                for l in lanes() {
                    let dst = self.address(w, l, ins.addr[0]);
                    let src = self.address(w, l, ins.addr[1]);
                    let src_size = (self.read(w, l, ins.src[0]) as u32).min(bytes as u32);
                    let Place::Shared(doff) = self.place(
                        w,
                        l,
                        pc,
                        Space::Shared,
                        dst,
                        bytes as u32,
                        "cp.async destination",
                    )?
                    else {
                        unreachable_place()?
                    };
                    self.gather(&mut sh, &mut gl, l, Place::Shared(doff), bytes as u32);
                    let mut data = [0u8; 16];
                    if src_size > 0 {
                        self.gather(&mut sh, &mut gl, l, Place::Global(src), src_size);
                        if self.checks.memcheck && src % bytes as u64 != 0 {
                            return Err(self.finding(
                                Check::Memcheck,
                                w,
                                l,
                                pc,
                                Some(src),
                                format!("misaligned {bytes}-byte cp.async source"),
                            ));
                        }
                        self.load(
                            w,
                            l,
                            pc,
                            Place::Global(src),
                            src,
                            &mut data[..src_size as usize],
                        )?;
                    }
                    let who = self.who(w, l);
                    if let Some((check, detail)) =
                        self.shared
                            .start_async(doff, bytes as u32, who, self.checks)
                    {
                        return Err(self.finding(check, w, l, pc, Some(dst), detail));
                    }
                    let t = (self.warps[w].base + l as u32) as usize;
                    self.asyncs[t].open.push(Pending {
                        dst: doff,
                        data,
                        len: bytes,
                    });
                }
                self.count(&sh, &gl);
            }
            Op::CpCommit => {
                for l in lanes() {
                    let t = (self.warps[w].base + l as u32) as usize;
                    let group = std::mem::take(&mut self.asyncs[t].open);
                    self.asyncs[t].committed.push_back(group);
                }
            }
            Op::CpWait { .. } | Op::CpWaitAll => {
                for l in lanes() {
                    let t = (self.warps[w].base + l as u32) as usize;
                    let keep = match ins.op {
                        Op::CpWait { n } => n as usize,
                        _ => {
                            let open = std::mem::take(&mut self.asyncs[t].open);
                            self.asyncs[t].committed.push_back(open);
                            0
                        }
                    };
                    let who = self.who(w, l);
                    while self.asyncs[t].committed.len() > keep {
                        let Some(g) = self.asyncs[t].committed.pop_front() else {
                            break;
                        };
                        for p in g {
                            if let Some((check, detail)) = self.shared.land_async(
                                p.dst,
                                &p.data[..p.len as usize],
                                who,
                                self.checks,
                            ) {
                                return Err(self.finding(
                                    check,
                                    w,
                                    l,
                                    pc,
                                    Some(p.dst as u64),
                                    detail,
                                ));
                            }
                        }
                    }
                }
            }
            Op::Nop => {}
        }
        let warp = &mut self.warps[w];
        for l in Bits(group) {
            match warp.st[l] {
                St::Ready => warp.pc[l] = next_pc[l],
                St::Bar => warp.pc[l] = pc,
                _ => {}
            }
        }
        Ok(())
    }

    fn shfl(&mut self, w: usize, pc: u32, exec: u32, ins: &Instr, mode: ShflMode) -> Result<()> {
        let mut vals = [0u64; 32];
        for l in 0..32 {
            if exec >> l & 1 == 1 {
                vals[l] = self.read(w, l, ins.src[0]);
            }
        }
        for l in 0..32usize {
            if exec >> l & 1 == 0 {
                continue;
            }
            let b = self.read(w, l, ins.src[1]) as u32 & 31;
            let c = self.read(w, l, ins.src[2]) as u32;
            let seg = (c >> 8) & 31;
            let cval = c & 31;
            let lane = l as u32;
            let max_lane = (lane & seg) | (cval & !seg);
            let min_lane = lane & seg;
            let (j, ok) = match mode {
                ShflMode::Up => (
                    lane.wrapping_sub(b),
                    lane.wrapping_sub(b) as i32 >= max_lane as i32,
                ),
                ShflMode::Down => (lane + b, lane + b <= max_lane),
                ShflMode::Bfly => (lane ^ b, (lane ^ b) <= max_lane),
                ShflMode::Idx => (min_lane | (b & !seg), (min_lane | (b & !seg)) <= max_lane),
            };
            let j = if ok { j as usize } else { l };
            if exec >> j & 1 == 0 && self.checks.synccheck {
                return Err(self.finding(
                    Check::Synccheck,
                    w,
                    l,
                    pc,
                    None,
                    format!("shfl.sync reads lane {j}, which is not in the mask"),
                ));
            }
            self.write(w, l, ins.dst[0], vals[j]);
            if let Some(&p) = ins.dst.get(1) {
                self.write(w, l, p, ok as u64);
            }
        }
        Ok(())
    }

    fn ldmatrix(
        &mut self,
        w: usize,
        pc: u32,
        exec: u32,
        ins: &Instr,
        num: u8,
        trans: bool,
    ) -> Result<()> {
        // rows[m][r] = the 8 b16 elements of row r of matrix m, from lane m*8 + r's address.
        let mut rows = [[[0u8; 16]; 8]; 4];
        self.stats.ldmatrix += 1;
        let mut sh = Gather::new();
        for m in 0..num as usize {
            for r in 0..8 {
                let l = m * 8 + r;
                if exec >> l & 1 == 0 {
                    continue;
                }
                let addr = self.address(w, l, ins.addr[0]);
                let place = self.place(w, l, pc, Space::Shared, addr, 16, "ldmatrix row load")?;
                if let (true, Place::Shared(o)) = (self.checks.counters, place) {
                    sh.push(l, o as u64, 16);
                }
                self.load(w, l, pc, place, addr, &mut rows[m][r])?;
            }
        }
        if self.checks.counters {
            count_shared(&mut self.stats, &sh, Some(8));
        }
        for l in 0..32usize {
            if exec >> l & 1 == 0 {
                continue;
            }
            for m in 0..num as usize {
                let (g, t) = (l / 4, l % 4);
                let elem = |r: usize, c: usize| {
                    u16::from_le_bytes([rows[m][r][2 * c], rows[m][r][2 * c + 1]]) as u64
                };
                let v = if trans {
                    elem(2 * t, g) | elem(2 * t + 1, g) << 16
                } else {
                    elem(g, 2 * t) | elem(g, 2 * t + 1) << 16
                };
                self.write(w, l, ins.dst[m], v);
            }
        }
        Ok(())
    }

    fn mma(&mut self, w: usize, exec: u32, ins: &Instr, ab: Ty) {
        let half = |v: u64| -> f64 {
            if ab == Ty::Bf16 {
                half::bf16::from_bits(v as u16).to_f64()
            } else {
                half::f16::from_bits(v as u16).to_f64()
            }
        };
        let mut a = [[0f64; 16]; 16];
        let mut b = [[0f64; 8]; 16];
        let mut c = [[0f64; 8]; 16];
        for l in 0..32usize {
            if exec >> l & 1 == 0 {
                continue;
            }
            let (g, t) = (l / 4, l % 4);
            let r = |i: usize| self.read(w, l, ins.src[i]);
            for (i, (row, col)) in [
                (g, 2 * t),
                (g + 8, 2 * t),
                (g, 2 * t + 8),
                (g + 8, 2 * t + 8),
            ]
            .into_iter()
            .enumerate()
            {
                let v = r(i);
                a[row][col] = half(v);
                a[row][col + 1] = half(v >> 16);
            }
            for (i, k) in [2 * t, 2 * t + 8].into_iter().enumerate() {
                let v = r(4 + i);
                b[k][g] = half(v);
                b[k + 1][g] = half(v >> 16);
            }
            for (i, (row, col)) in [
                (g, 2 * t),
                (g, 2 * t + 1),
                (g + 8, 2 * t),
                (g + 8, 2 * t + 1),
            ]
            .into_iter()
            .enumerate()
            {
                c[row][col] = f32::from_bits(r(6 + i) as u32) as f64;
            }
        }
        for l in 0..32usize {
            if exec >> l & 1 == 0 {
                continue;
            }
            let (g, t) = (l / 4, l % 4);
            for (i, (row, col)) in [
                (g, 2 * t),
                (g, 2 * t + 1),
                (g + 8, 2 * t),
                (g + 8, 2 * t + 1),
            ]
            .into_iter()
            .enumerate()
            {
                let mut acc = c[row][col];
                for k in 0..16 {
                    acc += a[row][k] * b[k][col];
                }
                self.write(w, l, ins.dst[i], (acc as f32).to_bits() as u64);
            }
        }
    }
}

/// The set bits of a lane mask, lowest first.
#[derive(Clone, Copy)]
struct Bits(u32);

impl Iterator for Bits {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let l = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(l)
    }
}

fn unreachable_place<T>() -> Result<T> {
    Err(Error::Memory(
        "internal: shared access resolved elsewhere".into(),
    ))
}

fn atomic(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    let bits = ty.bits();
    match (op, ty) {
        (AtomOp::Add, Ty::F32) => {
            (f32::from_bits(old as u32) + f32::from_bits(b as u32)).to_bits() as u64
        }
        (AtomOp::Add, Ty::F64) => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
        (AtomOp::Add, _) => old.wrapping_add(b),
        (AtomOp::Min, _) if ty.signed() => alu::sx(old, bits).min(alu::sx(b, bits)) as u64,
        (AtomOp::Min, _) => old.min(alu::zx(b, bits)),
        (AtomOp::Max, _) if ty.signed() => alu::sx(old, bits).max(alu::sx(b, bits)) as u64,
        (AtomOp::Max, _) => old.max(alu::zx(b, bits)),
        (AtomOp::And, _) => old & b,
        (AtomOp::Or, _) => old | b,
        (AtomOp::Xor, _) => old ^ b,
        (AtomOp::Exch, _) => b,
        (AtomOp::Cas, _) => {
            if alu::zx(old, bits) == alu::zx(b, bits) {
                c
            } else {
                old
            }
        }
        (AtomOp::Inc, _) => {
            if old >= alu::zx(b, bits) {
                0
            } else {
                old + 1
            }
        }
        (AtomOp::Dec, _) => {
            if old == 0 || old > alu::zx(b, bits) {
                b
            } else {
                old - 1
            }
        }
    }
}
