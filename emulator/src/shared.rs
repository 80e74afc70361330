//! One CTA's shared memory with its shadows: which bytes were written (initcheck), which a
//! `cp.async` is still writing, and the last accesses between barriers (racecheck).

use crate::error::Check;
use crate::exec::Checks;

/// Who accesses: the linear thread id and its warp's `bar.warp.sync` count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    pub(crate) tid: u16,
    pub(crate) wsync: u16,
}

/// The last write and the last read(s) of one byte.
#[derive(Clone, Copy, Default)]
struct Cell {
    w_epoch: u32,
    w: (u16, u16),
    r_epoch: u32,
    r: (u16, u16),
    /// More than one thread read it this epoch.
    r_many: bool,
}

pub(crate) struct Shared {
    data: Vec<u8>,
    init: Vec<bool>,
    /// Thread id + 1 of the `cp.async` still writing the byte; 0 when none.
    inflight: Vec<u16>,
    cells: Vec<Cell>,
    epoch: u32,
}

type Found = Option<(Check, String)>;

/// Two accesses are ordered if by the same thread, or by lanes of one warp with a
/// `bar.warp.sync` between them. (Barriers are handled by the epoch.)
fn unordered(prior: (u16, u16), now: Access) -> bool {
    prior.0 != now.tid && !(prior.0 / 32 == now.tid / 32 && prior.1 != now.wsync)
}

impl Shared {
    pub(crate) fn new(bytes: usize, racecheck: bool) -> Shared {
        Shared {
            data: vec![0; bytes],
            init: vec![false; bytes],
            inflight: vec![0; bytes],
            cells: if racecheck {
                vec![Cell::default(); bytes]
            } else {
                Vec::new()
            },
            epoch: 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.data.len()
    }

    /// A new CTA: nothing written, nothing in flight.
    pub(crate) fn reset(&mut self) {
        self.init.fill(false);
        self.inflight.fill(0);
        self.cells.fill(Cell::default());
        self.epoch = 1;
    }

    /// A CTA-wide barrier completed: everything before it is ordered before everything after.
    pub(crate) fn barrier(&mut self) {
        self.epoch += 1;
    }

    fn inflight(&self, off: usize, len: usize, what: &str) -> Found {
        let t = self.inflight[off..off + len]
            .iter()
            .copied()
            .find(|&t| t != 0)?;
        Some((
            Check::AsyncCopy,
            format!(
                "{what} shared memory that a cp.async of thread {} is still writing (no cp.async.wait_group since)",
                t - 1
            ),
        ))
    }

    fn race_write(&mut self, off: usize, len: usize, who: Access, what: &str) -> Found {
        if self.cells.is_empty() {
            return None;
        }
        let e = self.epoch;
        for c in &mut self.cells[off..off + len] {
            if c.w_epoch == e && unordered(c.w, who) {
                return Some((
                    Check::Racecheck,
                    format!(
                        "{what} by thread {} races with a write by thread {} (no barrier between)",
                        who.tid, c.w.0
                    ),
                ));
            }
            if c.r_epoch == e && (c.r_many || unordered(c.r, who)) {
                return Some((
                    Check::Racecheck,
                    format!(
                        "{what} by thread {} races with a read by thread {} (no barrier between)",
                        who.tid, c.r.0
                    ),
                ));
            }
            c.w_epoch = e;
            c.w = (who.tid, who.wsync);
        }
        None
    }

    pub(crate) fn read(&mut self, off: u32, buf: &mut [u8], who: Access, checks: &Checks) -> Found {
        let (off, len) = (off as usize, buf.len());
        if checks.racecheck {
            if let Some(f) = self.inflight(off, len, "read of") {
                return Some(f);
            }
        }
        if checks.initcheck && self.init[off..off + len].iter().any(|&i| !i) {
            return Some((
                Check::Initcheck,
                format!("{len}-byte shared load of memory not written in this CTA"),
            ));
        }
        if !self.cells.is_empty() {
            let e = self.epoch;
            for c in &mut self.cells[off..off + len] {
                if c.w_epoch == e && unordered(c.w, who) {
                    return Some((
                        Check::Racecheck,
                        format!(
                            "read by thread {} races with a write by thread {} (no barrier between)",
                            who.tid, c.w.0
                        ),
                    ));
                }
                if c.r_epoch == e {
                    if c.r.0 != who.tid {
                        c.r_many = true;
                    }
                } else {
                    c.r_epoch = e;
                    c.r_many = false;
                }
                c.r = (who.tid, who.wsync);
            }
        }
        buf.copy_from_slice(&self.data[off..off + len]);
        None
    }

    pub(crate) fn write(&mut self, off: u32, bytes: &[u8], who: Access, checks: &Checks) -> Found {
        let (off, len) = (off as usize, bytes.len());
        if checks.racecheck {
            if let Some(f) = self.inflight(off, len, "store to") {
                return Some(f);
            }
            if let Some(f) = self.race_write(off, len, who, "store") {
                return Some(f);
            }
        }
        self.data[off..off + len].copy_from_slice(bytes);
        self.init[off..off + len].fill(true);
        None
    }

    /// A `cp.async` was issued: its destination is in flight until its group is waited on.
    pub(crate) fn start_async(
        &mut self,
        off: u32,
        len: u32,
        who: Access,
        checks: &Checks,
    ) -> Found {
        let (off, len) = (off as usize, len as usize);
        if checks.racecheck {
            if let Some(f) = self.inflight(off, len, "cp.async into") {
                return Some(f);
            }
        }
        self.inflight[off..off + len].fill(who.tid + 1);
        None
    }

    /// `cp.async.wait_group` made a copy land: it writes now, as its issuing thread.
    pub(crate) fn land_async(
        &mut self,
        off: u32,
        data: &[u8],
        who: Access,
        checks: &Checks,
    ) -> Found {
        let (off, len) = (off as usize, data.len());
        self.inflight[off..off + len].fill(0);
        if checks.racecheck {
            if let Some(f) = self.race_write(off, len, who, "cp.async landing") {
                return Some(f);
            }
        }
        self.data[off..off + len].copy_from_slice(data);
        self.init[off..off + len].fill(true);
        None
    }
}
