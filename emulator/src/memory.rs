//! Device (global) memory: live allocations with guard gaps between them, and a shadow of
//! which bytes were ever written (for initcheck).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Where the first allocation goes: far from the generic windows of shared/local/param space.
const BASE: u64 = 0x7f00_0000_0000;
/// Allocation alignment (cudaMalloc gives at least 256).
const ALIGN: u64 = 256;
/// Unmapped bytes after each allocation, so a small overrun never lands in a neighbour.
const GAP: u64 = 1 << 16;

/// One allocation: its bytes and a bit per byte saying it was written.
pub(crate) struct Alloc {
    pub(crate) data: Vec<u8>,
    init: Vec<u64>,
}

impl Alloc {
    pub(crate) fn is_init(&self, off: usize, len: usize) -> bool {
        (off..off + len).all(|i| self.init[i / 64] >> (i % 64) & 1 == 1)
    }
    pub(crate) fn mark_init(&mut self, off: usize, len: usize) {
        for i in off..off + len {
            self.init[i / 64] |= 1 << (i % 64);
        }
    }
}

/// The device's global memory.
pub struct Memory {
    allocs: BTreeMap<u64, Alloc>,
    next: u64,
    used: u64,
    capacity: u64,
}

impl Memory {
    /// Memory that reports `capacity` bytes in all (allocations beyond it fail).
    pub fn new(capacity: u64) -> Self {
        Memory {
            allocs: BTreeMap::new(),
            next: BASE,
            used: 0,
            capacity,
        }
    }

    /// Bytes the device reports in all.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes allocated now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Allocates `bytes` (uninitialised; a zero-byte request gets a distinct pointer too).
    pub fn alloc(&mut self, bytes: u64) -> Result<u64> {
        if self.used.saturating_add(bytes) > self.capacity {
            return Err(Error::Memory(format!(
                "out of memory: {bytes} bytes asked, {} of {} in use",
                self.used, self.capacity
            )));
        }
        let len = usize::try_from(bytes)
            .map_err(|_| Error::Memory(format!("{bytes} bytes do not fit this host")))?;
        let ptr = self.next;
        self.next = (ptr + bytes.max(1) + GAP).div_ceil(ALIGN) * ALIGN;
        self.allocs.insert(
            ptr,
            Alloc {
                data: vec![0; len],
                init: vec![0; len.div_ceil(64)],
            },
        );
        self.used += bytes;
        Ok(ptr)
    }

    /// Frees an allocation by its base pointer.
    pub fn free(&mut self, ptr: u64) -> Result<()> {
        match self.allocs.remove(&ptr) {
            Some(a) => {
                self.used -= a.data.len() as u64;
                Ok(())
            }
            None => Err(Error::Memory(format!(
                "free of {ptr:#x}, which is not the start of a live allocation"
            ))),
        }
    }

    /// The allocation holding `[addr, addr + len)` and the offset of `addr` in it.
    pub(crate) fn find_mut(&mut self, addr: u64, len: u64) -> Option<(&mut Alloc, usize)> {
        let (&base, alloc) = self.allocs.range_mut(..=addr).next_back()?;
        let off = addr - base;
        (off.checked_add(len)? <= alloc.data.len() as u64).then_some((alloc, off as usize))
    }

    fn range_mut(&mut self, addr: u64, len: usize, what: &str) -> Result<(&mut Alloc, usize)> {
        self.find_mut(addr, len as u64).ok_or_else(|| {
            Error::Memory(format!(
                "{what} of {len} bytes at {addr:#x} is not inside one live allocation"
            ))
        })
    }

    /// Copies host bytes to device memory (marks them written).
    pub fn write(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        let (a, off) = self.range_mut(dst, src.len(), "write")?;
        a.data[off..off + src.len()].copy_from_slice(src);
        a.mark_init(off, src.len());
        Ok(())
    }

    /// Copies device memory to the host.
    pub fn read(&mut self, src: u64, dst: &mut [u8]) -> Result<()> {
        let (a, off) = self.range_mut(src, dst.len(), "read")?;
        dst.copy_from_slice(&a.data[off..off + dst.len()]);
        Ok(())
    }

    /// Copies `len` bytes device to device (overlap allowed, like memmove).
    pub fn copy(&mut self, dst: u64, src: u64, len: usize) -> Result<()> {
        let mut tmp = vec![0; len];
        self.read(src, &mut tmp)?;
        let (a, soff) = self.range_mut(src, len, "copy source")?;
        let init: Vec<bool> = (0..len).map(|i| a.is_init(soff + i, 1)).collect();
        let (b, doff) = self.range_mut(dst, len, "copy destination")?;
        b.data[doff..doff + len].copy_from_slice(&tmp);
        for (i, done) in init.into_iter().enumerate() {
            if done {
                b.mark_init(doff + i, 1);
            }
        }
        Ok(())
    }

    /// Sets `len` bytes to `value` (marks them written).
    pub fn fill(&mut self, dst: u64, value: u8, len: usize) -> Result<()> {
        let (a, off) = self.range_mut(dst, len, "memset")?;
        a.data[off..off + len].fill(value);
        a.mark_init(off, len);
        Ok(())
    }
}
