//! PTX tokens, each with its 1-based line.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tok<'a> {
    /// Identifiers, opcodes with their modifiers (`ld.global.v4.u32`), registers, directives.
    Id(&'a str),
    /// A number as written (`16`, `0x1f`, `0f3F800000`, `0d...`, `1.5`).
    Num(&'a str),
    Str(&'a str),
    P(u8),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Token<'a> {
    pub(crate) t: Tok<'a>,
    pub(crate) line: u32,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || matches!(c, b'_' | b'$' | b'%' | b'.')
}
fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

pub(crate) fn lex(text: &str) -> Result<Vec<Token<'_>>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4);
    let (mut i, mut line) = (0usize, 1u32);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                let s = i + 1;
                i = s;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                out.push(Token {
                    t: Tok::Str(&text[s..i.min(b.len())]),
                    line,
                });
                i += 1;
            }
            c if c.is_ascii_digit() => {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
                out.push(Token {
                    t: Tok::Num(&text[s..i]),
                    line,
                });
            }
            c if ident_start(c) => {
                let s = i;
                loop {
                    if i < b.len() && ident_char(b[i]) {
                        i += 1;
                    } else if b[i..].starts_with(b"::") {
                        i += 2;
                    } else {
                        break;
                    }
                }
                out.push(Token {
                    t: Tok::Id(&text[s..i]),
                    line,
                });
            }
            b',' | b';' | b'{' | b'}' | b'[' | b']' | b'(' | b')' | b'+' | b'-' | b'<' | b'>'
            | b'|' | b'!' | b'@' | b'=' | b':' | b'*' => {
                out.push(Token { t: Tok::P(c), line });
                i += 1;
            }
            _ => {
                return Err(Error::Parse {
                    line,
                    msg: format!("unexpected character {:?}", c as char),
                });
            }
        }
    }
    Ok(out)
}

/// Parses a PTX integer literal (decimal, `0x` hex, octal with a leading 0, `0b` binary;
/// an optional `U` suffix).
pub(crate) fn int(s: &str) -> Option<u64> {
    let s = s.trim_end_matches('U');
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if let Some(bin) = s.strip_prefix("0b") {
        u64::from_str_radix(bin, 2).ok()
    } else if s.len() > 1 && s.starts_with('0') && s.bytes().all(|c| c.is_ascii_digit()) {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// A float literal's bits: `0f` + 8 hex digits (f32) or `0d` + 16 (f64), or a decimal
/// (returned as f64 bits). The flag says f32.
pub(crate) fn float(s: &str) -> Option<(u64, bool)> {
    if let Some(h) = s.strip_prefix("0f").or_else(|| s.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(|v| (v as u64, true));
    }
    if let Some(h) = s.strip_prefix("0d").or_else(|| s.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok().map(|v| (v, false));
    }
    if s.contains(['.', 'e', 'E']) && !s.starts_with("0x") {
        return s.parse::<f64>().ok().map(|v| (v.to_bits(), false));
    }
    None
}
