//! Module images: PTX text, or an nvcc fatbin whose PTX entry is taken (cubins cannot run on
//! the emulator).
//!
//! Fatbin layout (little-endian), as nvcc 12/13 write it:
//! - container header, 16 bytes: magic `0xBA55ED50` u32, version u16 (1), header size u16
//!   (16), size of the entries that follow u64;
//! - entries back to back, each a header then its payload. Header fields used: kind u16 @0
//!   (1 PTX, 2 cubin), header size u32 @4, payload size u64 @8 (padded to 8), compressed size
//!   u32 @16 (0: not compressed), sm arch u32 @28 (e.g. 90), flags u64 @40 (0x8000: zstd,
//!   0x2000: LZ4 as older nvcc wrote), uncompressed size u64 @56.
//!
//! A host program's embedded fatbin may instead be reached through the wrapper nvcc puts in
//! `.nvFatBinSegment` (magic `0x466243B1`, then a version u32 and a pointer to the fatbin),
//! which is followed too.

use std::ffi::{CStr, c_char, c_void};
use std::io::Read;

use cudarc::driver::sys::CUresult;

/// The arch of the emulated device: PTX for a later one cannot be JIT-compiled for it.
const DEVICE_ARCH: u32 = 90;
const FATBIN_MAGIC: [u8; 4] = 0xBA55_ED50u32.to_le_bytes();
const WRAPPER_MAGIC: [u8; 4] = 0x4662_43B1u32.to_le_bytes();
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const FLAG_ZSTD: u64 = 0x8000;
const FLAG_LZ4: u64 = 0x2000;
const KIND_PTX: u16 = 1;

/// Why an image did not yield PTX: the code to fail with and a message for stderr.
pub(crate) type ImageError = (CUresult, String);

fn no_binary(msg: String) -> ImageError {
    (CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU, msg)
}

fn invalid(msg: impl Into<String>) -> ImageError {
    (CUresult::CUDA_ERROR_INVALID_IMAGE, msg.into())
}

/// Whether the bytes at `p` start with `magic`, reading no byte past a mismatch: a NUL ends
/// a text image and matches no magic byte, so a short string is never read past its end.
///
/// # Safety
/// `p` must point to a NUL-terminated string or to at least 4 readable bytes.
unsafe fn starts_with(p: *const u8, magic: &[u8; 4]) -> bool {
    for (i, &m) in magic.iter().enumerate() {
        // SAFETY: bytes 0..i matched non-zero magic bytes, so the image continues past them.
        if unsafe { p.add(i).read() } != m {
            return false;
        }
    }
    true
}

/// The PTX text of the image cuModuleLoadData was given.
///
/// # Safety
/// `image` must point to a fatbin (or its wrapper), a cubin, or a NUL-terminated string.
pub(crate) unsafe fn ptx_from_image(image: *const c_void) -> Result<String, ImageError> {
    if image.is_null() {
        return Err((
            CUresult::CUDA_ERROR_INVALID_VALUE,
            "null module image".into(),
        ));
    }
    let p = image.cast::<u8>();
    // SAFETY (all reads below): the caller vouches for the image kind; each read stays
    // inside what that kind's header says it holds.
    unsafe {
        if starts_with(p, &WRAPPER_MAGIC) {
            let data = p.add(8).cast::<*const c_void>().read_unaligned();
            if data.is_null() || !starts_with(data.cast(), &FATBIN_MAGIC) {
                return Err(invalid("fatbin wrapper does not point to a fatbin"));
            }
            return ptx_from_image(data);
        }
        if starts_with(p, &FATBIN_MAGIC) {
            let size = p.add(8).cast::<u64>().read_unaligned();
            let header = u64::from(p.add(6).cast::<u16>().read_unaligned());
            let total = usize::try_from(header + size)
                .map_err(|_| invalid("fatbin larger than the address space"))?;
            return ptx_from_fatbin(std::slice::from_raw_parts(p, total));
        }
        if starts_with(p, &ELF_MAGIC) {
            return Err(no_binary(
                "the image is a cubin (ELF); the emulator runs PTX only".into(),
            ));
        }
        ptx_from_text(CStr::from_ptr(image.cast::<c_char>()).to_bytes())
    }
}

/// The PTX text of an image read from a file (cuModuleLoad).
pub(crate) fn ptx_from_bytes(bytes: &[u8]) -> Result<String, ImageError> {
    if bytes.starts_with(&FATBIN_MAGIC) {
        ptx_from_fatbin(bytes)
    } else if bytes.starts_with(&ELF_MAGIC) {
        Err(no_binary(
            "the file is a cubin (ELF); the emulator runs PTX only".into(),
        ))
    } else {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        ptx_from_text(&bytes[..end])
    }
}

/// Accepts text that looks like PTX (starts with a comment or a directive).
fn ptx_from_text(text: &[u8]) -> Result<String, ImageError> {
    let text =
        std::str::from_utf8(text).map_err(|_| invalid("image is not PTX text (not UTF-8)"))?;
    let start = text.trim_start();
    if start.starts_with("//") || start.starts_with('.') {
        Ok(text.to_string())
    } else {
        Err(invalid(
            "image is neither a fatbin, a cubin, nor PTX text (which starts with `//` or `.version`)",
        ))
    }
}

/// Little-endian field readers that fail instead of panicking on a short buffer.
fn le<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], ImageError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| invalid("truncated fatbin"))
}
fn u16_at(b: &[u8], at: usize) -> Result<u16, ImageError> {
    le(b, at).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, ImageError> {
    le(b, at).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, ImageError> {
    le(b, at).map(u64::from_le_bytes)
}

/// One entry of a fatbin.
struct Entry<'a> {
    kind: u16,
    arch: u32,
    flags: u64,
    uncompressed: u64,
    /// The stored payload (compressed or not), without padding.
    data: &'a [u8],
}

/// The entries of the (first) container in `b`.
fn entries(b: &[u8]) -> Result<Vec<Entry<'_>>, ImageError> {
    if !b.starts_with(&FATBIN_MAGIC) {
        return Err(invalid("not a fatbin"));
    }
    let header = usize::from(u16_at(b, 6)?);
    let size = usize::try_from(u64_at(b, 8)?).map_err(|_| invalid("fatbin too large"))?;
    let end = header
        .checked_add(size)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| invalid("truncated fatbin"))?;
    let mut out = Vec::new();
    let mut at = header;
    while at + 64 <= end {
        let hsize = u32_at(b, at + 4)? as usize;
        let padded = usize::try_from(u64_at(b, at + 8)?).map_err(|_| invalid("bad entry"))?;
        if hsize < 64 {
            return Err(invalid(format!("fatbin entry header of {hsize} bytes")));
        }
        let start = at + hsize;
        let stop = start
            .checked_add(padded)
            .filter(|&s| s <= end)
            .ok_or_else(|| invalid("fatbin entry past the container's end"))?;
        let compressed = u32_at(b, at + 16)? as usize;
        let len = if compressed > 0 && compressed <= padded {
            compressed
        } else {
            padded
        };
        out.push(Entry {
            kind: u16_at(b, at)?,
            arch: u32_at(b, at + 28)?,
            flags: u64_at(b, at + 40)?,
            uncompressed: u64_at(b, at + 56)?,
            data: &b[start..start + len],
        });
        at = stop;
    }
    Ok(out)
}

/// The PTX of the highest arch not above the device's, decompressed.
fn ptx_from_fatbin(b: &[u8]) -> Result<String, ImageError> {
    let all = entries(b)?;
    let best = all
        .iter()
        .filter(|e| e.kind == KIND_PTX && e.arch <= DEVICE_ARCH)
        .max_by_key(|e| e.arch);
    let Some(e) = best else {
        let list: Vec<String> = all
            .iter()
            .map(|e| {
                let kind = if e.kind == KIND_PTX { "PTX" } else { "cubin" };
                format!("{kind} sm_{}", e.arch)
            })
            .collect();
        return Err(no_binary(format!(
            "the fatbin has no PTX for sm_{DEVICE_ARCH} or earlier (it holds: {}); the emulator \
             runs PTX only, so embed it (nvcc -gencode arch=compute_90,code=compute_90)",
            if list.is_empty() {
                "nothing".to_string()
            } else {
                list.join(", ")
            }
        )));
    };
    let text = if e.flags & FLAG_ZSTD != 0 || e.data.starts_with(&ZSTD_MAGIC) {
        let mut out = Vec::with_capacity(e.uncompressed as usize);
        ruzstd::decoding::StreamingDecoder::new(e.data)
            .map_err(|err| invalid(format!("fatbin PTX (zstd): {err}")))?
            .read_to_end(&mut out)
            .map_err(|err| invalid(format!("fatbin PTX (zstd): {err}")))?;
        out
    } else if e.flags & FLAG_LZ4 != 0 {
        lz4_block(e.data, e.uncompressed as usize)
            .ok_or_else(|| invalid("fatbin PTX (LZ4) does not decompress"))?
    } else {
        e.data.to_vec()
    };
    // The payload may end in NUL padding.
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    ptx_from_text(&text[..end])
}

/// Decodes one LZ4 block (the format older nvcc used with `-compress`): sequences of a token,
/// literals, and a back-reference; `None` if it is malformed or longer than `limit`.
fn lz4_block(src: &[u8], limit: usize) -> Option<Vec<u8>> {
    // A length nibble of 15 continues in bytes of 255 until one that is less.
    fn length(src: &[u8], i: &mut usize, mut n: usize) -> Option<usize> {
        if n == 15 {
            loop {
                let b = *src.get(*i)?;
                *i += 1;
                n += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        Some(n)
    }
    let mut out: Vec<u8> = Vec::with_capacity(limit);
    let mut i = 0;
    while i < src.len() {
        let token = src[i];
        i += 1;
        let lit = length(src, &mut i, usize::from(token >> 4))?;
        out.extend_from_slice(src.get(i..i.checked_add(lit)?)?);
        i += lit;
        if i == src.len() {
            break; // The last sequence is literals only.
        }
        let offset = usize::from(u16::from_le_bytes([*src.get(i)?, *src.get(i + 1)?]));
        i += 2;
        let len = length(src, &mut i, usize::from(token & 15))? + 4;
        if offset == 0 || offset > out.len() || out.len() + len > limit {
            return None;
        }
        // Byte by byte: a match may overlap the bytes it is producing.
        let from = out.len() - offset;
        for k in from..from + len {
            let b = *out.get(k)?;
            out.push(b);
        }
    }
    (out.len() <= limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fatbin of the given (kind, arch, flags, uncompressed size, payload) entries.
    fn fatbin(entries: &[(u16, u32, u64, u64, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, flags, usize_, payload) in entries {
            let padded = payload.len().div_ceil(8) * 8;
            let mut h = vec![0u8; 64];
            h[0..2].copy_from_slice(&kind.to_le_bytes());
            h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
            let compressed = if flags != 0 { payload.len() as u32 } else { 0 };
            h[16..20].copy_from_slice(&compressed.to_le_bytes());
            h[28..32].copy_from_slice(&arch.to_le_bytes());
            h[40..48].copy_from_slice(&flags.to_le_bytes());
            h[56..64].copy_from_slice(&usize_.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend_from_slice(payload);
            body.resize(body.len() + padded - payload.len(), 0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&FATBIN_MAGIC);
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    const PTX: &str = "//\n.version 8.0\n.target sm_90\n.address_size 64\n";

    #[test]
    fn picks_the_highest_ptx_not_above_sm90() {
        let b = fatbin(&[
            (2, 90, 0, 0, b"\x7fELF...."),
            (1, 80, 0, 0, b"// sm_80\n"),
            (1, 90, 0, 0, PTX.as_bytes()),
            (1, 100, 0, 0, b"// sm_100\n"),
        ]);
        assert_eq!(ptx_from_bytes(&b).map_err(|e| e.1), Ok(PTX.to_string()));
        // Through the pointer path too.
        // SAFETY: `b` is a complete fatbin.
        let p = unsafe { ptx_from_image(b.as_ptr().cast()) };
        assert_eq!(p.map_err(|e| e.1), Ok(PTX.to_string()));
    }

    #[test]
    fn cubin_only_fatbin_is_no_binary_for_gpu() {
        let b = fatbin(&[(2, 80, 0, 0, b"\x7fELF"), (2, 90, 0, 0, b"\x7fELF")]);
        let (code, msg) = ptx_from_bytes(&b).unwrap_err();
        assert_eq!(code, CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
        assert!(msg.contains("cubin sm_80, cubin sm_90"), "{msg}");
        let b = fatbin(&[(1, 100, 0, 0, b"// sm_100\n")]);
        assert_eq!(
            ptx_from_bytes(&b).unwrap_err().0,
            CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
        );
    }

    #[test]
    fn text_images() {
        let src = format!("  \n{PTX}\0");
        // SAFETY: NUL-terminated.
        let p = unsafe { ptx_from_image(src.as_ptr().cast()) };
        assert_eq!(p.map_err(|e| e.1), Ok(format!("  \n{PTX}")));
        for bad in ["\0", "P\0", "hello\0"] {
            // SAFETY: NUL-terminated.
            let e = unsafe { ptx_from_image(bad.as_ptr().cast()) }.unwrap_err();
            assert_eq!(e.0, CUresult::CUDA_ERROR_INVALID_IMAGE, "{bad:?}");
        }
        // SAFETY: a 4-byte ELF magic and more.
        let e = unsafe { ptx_from_image(c"\x7fELF\x02\x01".as_ptr().cast()) }.unwrap_err();
        assert_eq!(e.0, CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU);
    }

    #[test]
    fn wrapper_is_followed() {
        let b = fatbin(&[(1, 90, 0, 0, PTX.as_bytes())]);
        let mut w = Vec::new();
        w.extend_from_slice(&WRAPPER_MAGIC);
        w.extend_from_slice(&1u32.to_le_bytes());
        w.extend_from_slice(&(b.as_ptr() as usize as u64).to_le_bytes());
        w.extend_from_slice(&0u64.to_le_bytes());
        // SAFETY: a wrapper pointing at a live fatbin.
        let p = unsafe { ptx_from_image(w.as_ptr().cast()) };
        assert_eq!(p.map_err(|e| e.1), Ok(PTX.to_string()));
    }

    #[test]
    fn lz4_blocks_decode() {
        // Literals only.
        assert_eq!(lz4_block(b"\x50hello", 5).as_deref(), Some(&b"hello"[..]));
        // "abc", then 6 bytes from 3 back (overlapping), then the final literal "!".
        let block = b"\x32abc\x03\x00\x10!";
        assert_eq!(lz4_block(block, 10).as_deref(), Some(&b"abcabcabc!"[..]));
        // Over the limit, or a reference before the start: refused.
        assert_eq!(lz4_block(block, 9), None);
        assert_eq!(lz4_block(b"\x12a\x05\x00", 99), None);
        let b = fatbin(&[(1, 90, FLAG_LZ4, 10, &block[..])]);
        assert_eq!(
            ptx_from_fatbin(&b).map_err(|e| e.0),
            Err(CUresult::CUDA_ERROR_INVALID_IMAGE) // decodes, but is not PTX text
        );
    }

    /// The kernels build.rs compiled (when nvcc was there): their zstd-compressed PTX comes out.
    #[test]
    fn real_fatbins_yield_ptx() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/attnkit-kernels");
        let Ok(files) = std::fs::read_dir(&dir) else {
            eprintln!(
                "no {} (kernels not built with nvcc): skipped",
                dir.display()
            );
            return;
        };
        let mut seen = 0;
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "fatbin") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let ptx =
                ptx_from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {}", path.display(), e.1));
            // nvcc strips the comments from the PTX it embeds: it starts at `.version`.
            let start = ptx.trim_start();
            assert!(
                start.starts_with(".version") || start.starts_with("//"),
                "{}",
                path.display()
            );
            assert!(
                ptx.contains(".target sm_90") && ptx.contains(".entry"),
                "{}",
                path.display()
            );
            seen += 1;
        }
        eprintln!("{seen} fatbins decoded");
    }
}
