//! Per-thread arithmetic: integer, float, compare and convert, on register bits.

use half::{bf16, f16};

use crate::ir::{BoolOp, Cmp, FOp, IntOp, Rnd, Ty, mask_of};

pub(crate) fn sx(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        ((v << (64 - bits)) as i64) >> (64 - bits)
    }
}

pub(crate) fn zx(v: u64, bits: u32) -> u64 {
    v & mask_of(bits)
}

/// An integer (or predicate / bit) operation. `s` holds up to 4 sources.
pub(crate) fn int(op: IntOp, ty: Ty, s: [u64; 4]) -> u64 {
    let bits = ty.bits();
    let signed = ty.signed();
    let (a, b, c) = (s[0], s[1], s[2]);
    let (ia, ib) = (sx(a, bits), sx(b, bits));
    let (ua, ub) = (zx(a, bits), zx(b, bits));
    let m = mask_of(bits);
    match op {
        IntOp::Add => a.wrapping_add(b),
        IntOp::Sub => a.wrapping_sub(b),
        IntOp::MulLo => a.wrapping_mul(b),
        IntOp::MulHi | IntOp::MadHi => {
            let p = if signed {
                ((ia as i128 * ib as i128) >> bits) as u64
            } else {
                ((ua as u128 * ub as u128) >> bits) as u64
            };
            if op == IntOp::MadHi {
                p.wrapping_add(c)
            } else {
                p
            }
        }
        IntOp::MulWide | IntOp::MadWide => {
            let p = if signed {
                (ia as i128 * ib as i128) as u64
            } else {
                (ua as u128 * ub as u128) as u64
            };
            if op == IntOp::MadWide {
                p.wrapping_add(c)
            } else {
                p
            }
        }
        IntOp::MadLo => a.wrapping_mul(b).wrapping_add(c),
        // Division by zero is undefined in PTX; the hardware gives all ones for the quotient.
        IntOp::Div if signed => {
            if ib == 0 {
                m
            } else {
                ia.wrapping_div(ib) as u64
            }
        }
        IntOp::Div => ua.checked_div(ub).unwrap_or(m),
        IntOp::Rem if signed => {
            if ib == 0 {
                a
            } else {
                ia.wrapping_rem(ib) as u64
            }
        }
        IntOp::Rem => {
            if ub == 0 {
                a
            } else {
                ua % ub
            }
        }
        IntOp::Min if signed => ia.min(ib) as u64,
        IntOp::Min => ua.min(ub),
        IntOp::Max if signed => ia.max(ib) as u64,
        IntOp::Max => ua.max(ub),
        IntOp::Abs => ia.wrapping_abs() as u64,
        IntOp::Neg => ia.wrapping_neg() as u64,
        IntOp::And => a & b,
        IntOp::Or => a | b,
        IntOp::Xor => a ^ b,
        IntOp::Not => !a,
        IntOp::Cnot => u64::from(ua == 0),
        IntOp::Shl => {
            let n = zx(b, 32);
            if n >= bits as u64 { 0 } else { a << n }
        }
        IntOp::Shr => {
            let n = zx(b, 32).min(bits as u64);
            if signed {
                (ia >> n.min(63)) as u64
            } else if n >= bits as u64 {
                0
            } else {
                ua >> n
            }
        }
        IntOp::Bfi => {
            // bfi d, f, b, pos, len: b with bits [pos, pos+len) from f.
            let (f, base, pos, len) = (a, b, zx(c, 8) as u32, zx(s[3], 8) as u32);
            let mut d = base;
            for i in 0..len {
                let p = pos + i;
                if p >= bits {
                    break;
                }
                d = (d & !(1 << p)) | (((f >> i) & 1) << p);
            }
            d
        }
        IntOp::Bfe => {
            let (pos, len) = (zx(b, 8) as u32, zx(c, 8) as u32);
            let mut d = 0u64;
            let sbit = if signed && len > 0 {
                (ua >> (pos + len - 1).min(bits - 1)) & 1
            } else {
                0
            };
            for i in 0..bits {
                let bit = if i < len && pos + i < bits {
                    (ua >> (pos + i)) & 1
                } else {
                    sbit
                };
                d |= bit << i;
            }
            d
        }
        IntOp::Popc => ua.count_ones() as u64,
        IntOp::Clz => (ua.leading_zeros() - (64 - bits)) as u64,
        IntOp::Brev => ua.reverse_bits() >> (64 - bits),
        IntOp::Prmt => {
            let bytes = ((zx(b, 32) << 32) | zx(a, 32)).to_le_bytes();
            let sel = zx(c, 32);
            let mut d = 0u64;
            for i in 0..4 {
                let n = (sel >> (4 * i)) & 0xf;
                let byte = bytes[(n & 7) as usize];
                let byte = if n & 8 != 0 {
                    if byte & 0x80 != 0 { 0xff } else { 0 }
                } else {
                    byte
                };
                d |= (byte as u64) << (8 * i);
            }
            d
        }
        IntOp::Lop3 => {
            let lut = s[3];
            let mut d = 0u64;
            for k in 0..8u64 {
                if (lut >> k) & 1 == 1 {
                    let fa = if k & 4 != 0 { a } else { !a };
                    let fb = if k & 2 != 0 { b } else { !b };
                    let fc = if k & 1 != 0 { c } else { !c };
                    d |= fa & fb & fc;
                }
            }
            d
        }
        IntOp::ShfL { clamp } | IntOp::ShfR { clamp } => {
            let n = zx(c, 32);
            let n = if clamp { n.min(32) } else { n & 31 };
            let wide = (zx(b, 32) << 32) | zx(a, 32);
            if matches!(op, IntOp::ShfL { .. }) {
                (wide << n) >> 32
            } else {
                wide >> n
            }
        }
    }
}

fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// f32 neighbours, for directed rounding.
fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}
fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// Rounds an (exact or nearly exact) f64 to f32 in the given direction.
pub(crate) fn round_f32(x: f64, rnd: Rnd) -> f32 {
    let n = x as f32;
    if n.is_nan() || !n.is_finite() && x.is_infinite() {
        return n;
    }
    let nd = n as f64;
    match rnd {
        Rnd::Rz if nd.abs() > x.abs() => {
            if x > 0.0 {
                next_down(n)
            } else {
                next_up(n)
            }
        }
        Rnd::Rm if nd > x => next_down(n),
        Rnd::Rp if nd < x => next_up(n),
        _ => n,
    }
}

fn round_int(x: f64, rnd: Rnd) -> f64 {
    match rnd {
        Rnd::Rzi => x.trunc(),
        Rnd::Rmi => x.floor(),
        Rnd::Rpi => x.ceil(),
        _ => x.round_ties_even(),
    }
}

/// A float operation on f32 or f64 bits.
pub(crate) fn float(op: FOp, ty: Ty, rnd: Rnd, ftz: bool, sat: bool, s: [u64; 4]) -> u64 {
    if ty == Ty::F64 {
        let [a, b, c, _] = s.map(f64::from_bits);
        let r = match op {
            FOp::Add => a + b,
            FOp::Sub => a - b,
            FOp::Mul => a * b,
            FOp::Fma => a.mul_add(b, c),
            FOp::Div => a / b,
            FOp::Min => a.min(b),
            FOp::Max => a.max(b),
            FOp::Abs => a.abs(),
            FOp::Neg => -a,
            FOp::Rcp => 1.0 / a,
            FOp::Sqrt => a.sqrt(),
            FOp::Rsqrt => 1.0 / a.sqrt(),
            FOp::Ex2 => a.exp2(),
            FOp::Lg2 => a.log2(),
            FOp::Sin => a.sin(),
            FOp::Cos => a.cos(),
            FOp::Tanh => a.tanh(),
            FOp::Copysign => b.copysign(a),
        };
        return r.to_bits();
    }
    let f = |v: u64| {
        let x = f32::from_bits(v as u32);
        if ftz { ftz32(x) } else { x }
    };
    let (a, b, c) = (f(s[0]), f(s[1]), f(s[2]));
    let directed = matches!(rnd, Rnd::Rz | Rnd::Rm | Rnd::Rp);
    let r = match op {
        FOp::Add if directed => round_f32(a as f64 + b as f64, rnd),
        FOp::Sub if directed => round_f32(a as f64 - b as f64, rnd),
        FOp::Mul if directed => round_f32(a as f64 * b as f64, rnd),
        FOp::Fma if directed => round_f32((a as f64).mul_add(b as f64, c as f64), rnd),
        FOp::Add => a + b,
        FOp::Sub => a - b,
        FOp::Mul => a * b,
        FOp::Fma => a.mul_add(b, c),
        FOp::Div => a / b,
        FOp::Min => a.min(b),
        FOp::Max => a.max(b),
        FOp::Abs => a.abs(),
        FOp::Neg => -a,
        FOp::Rcp => 1.0 / a,
        FOp::Sqrt => a.sqrt(),
        FOp::Rsqrt => 1.0 / a.sqrt(),
        FOp::Ex2 => a.exp2(),
        FOp::Lg2 => a.log2(),
        FOp::Sin => a.sin(),
        FOp::Cos => a.cos(),
        FOp::Tanh => a.tanh(),
        FOp::Copysign => b.copysign(a),
    };
    let r = if sat {
        if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) }
    } else {
        r
    };
    let r = if ftz { ftz32(r) } else { r };
    r.to_bits() as u64
}

fn as_f64(v: u64, ty: Ty) -> f64 {
    match ty {
        Ty::F16 => f16::from_bits(v as u16).to_f64(),
        Ty::Bf16 => bf16::from_bits(v as u16).to_f64(),
        Ty::F32 => f32::from_bits(v as u32) as f64,
        _ => f64::from_bits(v),
    }
}

/// `setp`: the comparison (before the boolean combine).
pub(crate) fn compare(cmp: Cmp, ty: Ty, a: u64, b: u64) -> bool {
    if ty.float() {
        let (x, y) = (as_f64(a, ty), as_f64(b, ty));
        let unordered = x.is_nan() || y.is_nan();
        return match cmp {
            Cmp::Eq => !unordered && x == y,
            Cmp::Ne => !unordered && x != y,
            Cmp::Lt => !unordered && x < y,
            Cmp::Le => !unordered && x <= y,
            Cmp::Gt => !unordered && x > y,
            Cmp::Ge => !unordered && x >= y,
            Cmp::Equ => unordered || x == y,
            Cmp::Neu => unordered || x != y,
            Cmp::Ltu => unordered || x < y,
            Cmp::Leu => unordered || x <= y,
            Cmp::Gtu => unordered || x > y,
            Cmp::Geu => unordered || x >= y,
            Cmp::Num => !unordered,
            Cmp::Nan => unordered,
            Cmp::Lo | Cmp::Ls | Cmp::Hi | Cmp::Hs => false,
        };
    }
    let bits = ty.bits();
    let (ia, ib, ua, ub) = (sx(a, bits), sx(b, bits), zx(a, bits), zx(b, bits));
    let signed = ty.signed();
    match cmp {
        Cmp::Eq => ua == ub,
        Cmp::Ne => ua != ub,
        Cmp::Lt if signed => ia < ib,
        Cmp::Le if signed => ia <= ib,
        Cmp::Gt if signed => ia > ib,
        Cmp::Ge if signed => ia >= ib,
        Cmp::Lt | Cmp::Lo => ua < ub,
        Cmp::Le | Cmp::Ls => ua <= ub,
        Cmp::Gt | Cmp::Hi => ua > ub,
        Cmp::Ge | Cmp::Hs => ua >= ub,
        _ => false,
    }
}

pub(crate) fn combine(op: Option<BoolOp>, p: bool, c: bool) -> bool {
    match op {
        None => p,
        Some(BoolOp::And) => p && c,
        Some(BoolOp::Or) => p || c,
        Some(BoolOp::Xor) => p ^ c,
    }
}

fn to_half(x: f32, dty: Ty) -> u64 {
    if dty == Ty::Bf16 {
        bf16::from_f32(x).to_bits() as u64
    } else {
        f16::from_f32(x).to_bits() as u64
    }
}

/// `cvt.rn.{f16x2,bf16x2}.f32 d, a, b`.
pub(crate) fn cvt_pack(dty: Ty, relu: bool, a: u64, b: u64) -> u64 {
    let half = if dty == Ty::Bf16x2 { Ty::Bf16 } else { Ty::F16 };
    let one = |v: u64| {
        let x = f32::from_bits(v as u32);
        let x = if relu && !x.is_nan() { x.max(0.0) } else { x };
        to_half(x, half)
    };
    (one(a) << 16) | one(b)
}

/// `cvt.dty.sty`: every int/float combination, with PTX's rounding and saturation.
pub(crate) fn cvt(dty: Ty, sty: Ty, rnd: Rnd, sat: bool, ftz: bool, v: u64) -> u64 {
    let sbits = sty.bits();
    if !sty.float() && !dty.float() {
        let dbits = dty.bits();
        let x: i128 = if sty.signed() {
            sx(v, sbits) as i128
        } else {
            zx(v, sbits) as i128
        };
        if sat {
            let (lo, hi) = if dty.signed() {
                (-(1i128 << (dbits - 1)), (1i128 << (dbits - 1)) - 1)
            } else {
                (0, (1i128 << dbits) - 1)
            };
            return x.clamp(lo, hi) as u64;
        }
        return x as u64;
    }
    if sty.float() && !dty.float() {
        let x = as_f64(v, sty);
        let x = if ftz && sty == Ty::F32 && (x as f32).is_subnormal() {
            0.0
        } else {
            x
        };
        if x.is_nan() {
            return 0;
        }
        let r = round_int(x, rnd);
        let dbits = dty.bits();
        return if dty.signed() {
            let (lo, hi) = (
                -(2f64.powi(dbits as i32 - 1)),
                2f64.powi(dbits as i32 - 1) - 1.0,
            );
            (r.clamp(lo, hi) as i64) as u64
        } else {
            r.clamp(0.0, 2f64.powi(dbits as i32) - 1.0) as u64
        };
    }
    // To a float.
    let x: f64 = if sty.float() {
        as_f64(v, sty)
    } else if sty.signed() {
        sx(v, sbits) as f64
    } else {
        zx(v, sbits) as f64
    };
    // Exact wide integers: f64 cannot hold every i64; convert those directly.
    let wide_int =
        !sty.float() && sbits == 64 && dty == Ty::F32 && matches!(rnd, Rnd::Rn | Rnd::None);
    let x = if ftz && sty == Ty::F32 && (x as f32).is_subnormal() {
        0.0f64.copysign(x)
    } else {
        x
    };
    let x = if matches!(rnd, Rnd::Rni | Rnd::Rzi | Rnd::Rmi | Rnd::Rpi) {
        round_int(x, rnd)
    } else {
        x
    };
    let x = if sat {
        if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) }
    } else {
        x
    };
    match dty {
        Ty::F64 => x.to_bits(),
        Ty::F32 => {
            let r = if wide_int {
                if sty.signed() {
                    v as i64 as f32
                } else {
                    v as f32
                }
            } else if sty == Ty::F64 {
                round_f32(x, rnd)
            } else {
                x as f32
            };
            let r = if ftz { ftz32(r) } else { r };
            r.to_bits() as u64
        }
        Ty::F16 | Ty::Bf16 => {
            // f32 sources round once, from the f32 value itself.
            let xf = if sty == Ty::F32 {
                f32::from_bits(v as u32)
            } else {
                x as f32
            };
            let xf = if sat {
                if xf.is_nan() { 0.0 } else { xf.clamp(0.0, 1.0) }
            } else {
                xf
            };
            if sty == Ty::F32 && !sat {
                to_half(xf, dty)
            } else if dty == Ty::Bf16 {
                bf16::from_f64(x).to_bits() as u64
            } else {
                f16::from_f64(x).to_bits() as u64
            }
        }
        _ => x.to_bits(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_edges() {
        assert_eq!(
            int(IntOp::Div, Ty::S32, [(-7i64) as u64, 2, 0, 0]) as i64,
            -3
        );
        assert_eq!(
            sx(int(IntOp::Rem, Ty::S32, [(-7i64) as u64, 2, 0, 0]), 32),
            -1
        );
        assert_eq!(
            int(IntOp::Shr, Ty::S32, [0x8000_0000, 31, 0, 0]) & 0xffff_ffff,
            0xffff_ffff
        );
        assert_eq!(int(IntOp::Shr, Ty::B32, [0x8000_0000, 31, 0, 0]), 1);
        assert_eq!(int(IntOp::Shl, Ty::B32, [1, 32, 0, 0]), 0);
        assert_eq!(
            int(IntOp::MulHi, Ty::S32, [(-2i64) as u64, 0x4000_0000, 0, 0]) & 0xffff_ffff,
            0xffff_ffff
        );
        assert_eq!(
            int(IntOp::MulWide, Ty::U32, [0xffff_ffff, 2, 0, 0]),
            0x1_ffff_fffe
        );
        assert_eq!(
            int(IntOp::Bfi, Ty::B32, [0b101, 0xffff_0000, 4, 3]),
            0xffff_0050
        );
        assert_eq!(
            int(IntOp::Bfe, Ty::S32, [0xf0, 4, 4, 0]) & 0xffff_ffff,
            0xffff_ffff
        );
        assert_eq!(
            int(IntOp::Prmt, Ty::B32, [0x4433_2211, 0x8877_6655, 0x5410, 0]),
            0x6655_2211
        );
        assert_eq!(
            int(IntOp::Lop3, Ty::B32, [0b1100, 0b1010, 0b0110, 0x96]),
            0b1100 ^ 0b1010 ^ 0b0110
        );
    }

    #[test]
    fn conversions_round_and_saturate() {
        let f = |x: f32| x.to_bits() as u64;
        assert_eq!(cvt(Ty::S32, Ty::F32, Rnd::Rni, false, false, f(2.5)), 2);
        assert_eq!(cvt(Ty::S32, Ty::F32, Rnd::Rni, false, false, f(3.5)), 4);
        assert_eq!(
            cvt(Ty::S32, Ty::F32, Rnd::Rzi, false, false, f(f32::NAN)),
            0
        );
        assert_eq!(
            cvt(Ty::S32, Ty::F32, Rnd::Rzi, false, false, f(1e20)) as i64 as i32,
            i32::MAX
        );
        assert_eq!(
            cvt(Ty::U8, Ty::S32, Rnd::None, true, false, (-5i64) as u64),
            0
        );
        assert_eq!(
            cvt(Ty::F32, Ty::F32, Rnd::None, true, false, f(1.5)),
            f(1.0)
        );
        // 1 + 2^-11 is a tie between f16 1.0 and its successor: to even (1.0).
        assert_eq!(
            cvt(
                Ty::F16,
                Ty::F32,
                Rnd::Rn,
                false,
                false,
                f(1.0 + 2f32.powi(-11))
            ),
            0x3c00
        );
        assert_eq!(cvt_pack(Ty::F16x2, false, f(1.0), f(2.0)), 0x3c00_4000);
        assert_eq!(round_f32(1.0 + 1e-12, Rnd::Rp), next_up(1.0));
        assert_eq!(round_f32(1.0 + 1e-12, Rnd::Rz), 1.0);
    }
}
