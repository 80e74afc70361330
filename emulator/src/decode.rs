//! Opcode + raw operands to an [`Instr`]: the instruction forms the interpreter knows.
//! Anything else is an error naming the instruction and its line.

use crate::error::{Error, Result};
use crate::ir::*;
use crate::parse::Raw;

/// A destination that is written nowhere (`_`).
pub(crate) const DISCARD: Slot = Slot::MAX;

fn err<T>(line: u32, msg: impl Into<String>) -> Result<T> {
    Err(Error::Parse {
        line,
        msg: msg.into(),
    })
}

/// Modifiers that only hint at caching, scope or ordering: every access here is already
/// coherent and in program order, so they change nothing.
fn is_hint(m: &str) -> bool {
    matches!(
        m,
        "nc" | "ca"
            | "cg"
            | "cs"
            | "lu"
            | "cv"
            | "wb"
            | "wt"
            | "volatile"
            | "relaxed"
            | "acquire"
            | "release"
            | "acq_rel"
            | "weak"
            | "cta"
            | "gpu"
            | "sys"
            | "cluster"
            | "aligned"
    ) || m.starts_with("L1::")
        || m.starts_with("L2::")
}

struct Mods<'a> {
    base: &'a str,
    rest: Vec<&'a str>,
    types: Vec<Ty>,
}

impl<'a> Mods<'a> {
    fn new(opcode: &'a str) -> Mods<'a> {
        let mut parts = opcode.split('.');
        let base = parts.next().unwrap_or("");
        let mut rest = Vec::new();
        let mut types = Vec::new();
        for p in parts {
            match Ty::parse(p) {
                Some(t) => types.push(t),
                None => rest.push(p),
            }
        }
        Mods { base, rest, types }
    }
    fn has(&self, m: &str) -> bool {
        self.rest.contains(&m)
    }
    fn rnd(&self) -> Rnd {
        for m in &self.rest {
            let r = match *m {
                "rn" => Rnd::Rn,
                "rz" => Rnd::Rz,
                "rm" => Rnd::Rm,
                "rp" => Rnd::Rp,
                "rni" => Rnd::Rni,
                "rzi" => Rnd::Rzi,
                "rmi" => Rnd::Rmi,
                "rpi" => Rnd::Rpi,
                _ => continue,
            };
            return r;
        }
        Rnd::None
    }
    fn space(&self) -> Space {
        for m in &self.rest {
            let s = match m.split("::").next().unwrap_or("") {
                "global" => Space::Global,
                "shared" => Space::Shared,
                "local" => Space::Local,
                "param" => Space::Param,
                "const" => Space::Const,
                _ => continue,
            };
            return s;
        }
        Space::Generic
    }
    fn vec(&self) -> u8 {
        if self.has("v2") {
            2
        } else if self.has("v4") {
            4
        } else {
            1
        }
    }
    /// Fails on any modifier not in `known` and not a hint.
    fn only(&self, known: &[&str], opcode: &str, line: u32) -> Result<()> {
        for m in &self.rest {
            if !known.contains(m) && !is_hint(m) {
                return err(
                    line,
                    format!("`{opcode}`: modifier .{m} is not supported by the emulator"),
                );
            }
        }
        Ok(())
    }
    fn ty(&self, i: usize, opcode: &str, line: u32) -> Result<Ty> {
        self.types
            .get(i)
            .copied()
            .map_or_else(|| err(line, format!("`{opcode}`: missing type")), Ok)
    }
}

fn reg(r: &Raw, opcode: &str, line: u32) -> Result<Slot> {
    match r {
        Raw::Reg(s) => Ok(*s),
        Raw::Sink => Ok(DISCARD),
        _ => err(
            line,
            format!("`{opcode}`: expected a register, found {r:?}"),
        ),
    }
}

fn regs(r: &Raw, opcode: &str, line: u32) -> Result<Vec<Slot>> {
    match r {
        Raw::Vector(v) => v.iter().map(|x| reg(x, opcode, line)).collect(),
        _ => Ok(vec![reg(r, opcode, line)?]),
    }
}

fn opd(r: &Raw, opcode: &str, line: u32) -> Result<Opd> {
    r.opd().map_or_else(
        || err(line, format!("`{opcode}`: bad source operand {r:?}")),
        Ok,
    )
}

/// A source for a float instruction: an f64 literal given to an f32 one is narrowed.
fn fopd(r: &Raw, ty: Ty, opcode: &str, line: u32) -> Result<Opd> {
    match (r, ty) {
        (Raw::Float(bits, false), Ty::F32) => {
            Ok(Opd::Imm((f64::from_bits(*bits) as f32).to_bits() as u64))
        }
        (Raw::Float(bits, true), Ty::F64) => {
            Ok(Opd::Imm((f32::from_bits(*bits as u32) as f64).to_bits()))
        }
        _ => opd(r, opcode, line),
    }
}

fn mem(r: &Raw, opcode: &str, line: u32) -> Result<Addr> {
    match r {
        Raw::Mem(a) => Ok(*a),
        _ => err(
            line,
            format!("`{opcode}`: expected a [memory] operand, found {r:?}"),
        ),
    }
}

fn count(ops: &[Raw], n: std::ops::RangeInclusive<usize>, opcode: &str, line: u32) -> Result<()> {
    if n.contains(&ops.len()) {
        Ok(())
    } else {
        err(
            line,
            format!("`{opcode}`: {} operands, expected {n:?}", ops.len()),
        )
    }
}

pub(crate) fn decode(opcode: &str, ops: &[Raw], line: u32, _masks: &[u64]) -> Result<Instr> {
    let m = Mods::new(opcode);
    let mut ins = Instr {
        op: Op::Nop,
        guard: None,
        dst: Vec::new(),
        src: Vec::new(),
        addr: [Addr {
            base: None,
            offset: 0,
        }; 2],
        line,
        loc: 0,
    };
    let unsupported = || {
        err(
            line,
            format!("instruction `{opcode}` is not supported by the emulator"),
        )
    };
    // The common shape: d, a, b, ...
    let simple =
        |ins: &mut Instr, n: std::ops::RangeInclusive<usize>, float: Option<Ty>| -> Result<()> {
            count(ops, n, opcode, line)?;
            ins.dst = vec![reg(&ops[0], opcode, line)?];
            ins.src = ops[1..]
                .iter()
                .map(|o| match float {
                    Some(t) => fopd(o, t, opcode, line),
                    None => opd(o, opcode, line),
                })
                .collect::<Result<_>>()?;
            Ok(())
        };
    match m.base {
        "mov" => {
            m.only(&[], opcode, line)?;
            let ty = m.ty(0, opcode, line)?;
            count(ops, 2..=2, opcode, line)?;
            match (&ops[0], &ops[1]) {
                (d, Raw::Vector(parts)) => {
                    ins.op = Op::Pack {
                        bits: (ty.bits() / parts.len() as u32) as u8,
                    };
                    ins.dst = vec![reg(d, opcode, line)?];
                    ins.src = parts
                        .iter()
                        .map(|p| opd(p, opcode, line))
                        .collect::<Result<_>>()?;
                }
                (Raw::Vector(parts), s) => {
                    ins.op = Op::Unpack {
                        bits: (ty.bits() / parts.len() as u32) as u8,
                    };
                    ins.dst = parts
                        .iter()
                        .map(|p| reg(p, opcode, line))
                        .collect::<Result<_>>()?;
                    ins.src = vec![opd(s, opcode, line)?];
                }
                _ => {
                    ins.op = Op::Mov;
                    simple(&mut ins, 2..=2, ty.float().then_some(ty))?;
                }
            }
        }
        "add" | "sub" | "mul" | "mad" | "fma" | "div" | "rem" | "min" | "max" | "abs" | "neg" => {
            let ty = m.ty(0, opcode, line)?;
            if ty.float() {
                if ty != Ty::F32 && ty != Ty::F64 {
                    return unsupported();
                }
                m.only(
                    &[
                        "rn", "rz", "rm", "rp", "ftz", "sat", "approx", "full", "NaN",
                    ],
                    opcode,
                    line,
                )?;
                let op = match m.base {
                    "add" => FOp::Add,
                    "sub" => FOp::Sub,
                    "mul" => FOp::Mul,
                    "mad" | "fma" => FOp::Fma,
                    "div" => FOp::Div,
                    "min" => FOp::Min,
                    "max" => FOp::Max,
                    "abs" => FOp::Abs,
                    "neg" => FOp::Neg,
                    _ => return unsupported(),
                };
                let n = match op {
                    FOp::Fma => 4..=4,
                    FOp::Abs | FOp::Neg => 2..=2,
                    _ => 3..=3,
                };
                ins.op = Op::Float {
                    op,
                    ty,
                    rnd: m.rnd(),
                    ftz: m.has("ftz"),
                    sat: m.has("sat"),
                };
                simple(&mut ins, n, Some(ty))?;
            } else {
                m.only(&["lo", "hi", "wide"], opcode, line)?;
                let (op, n) = match (m.base, m.has("hi"), m.has("wide")) {
                    ("add", ..) => (IntOp::Add, 3),
                    ("sub", ..) => (IntOp::Sub, 3),
                    ("mul", true, _) => (IntOp::MulHi, 3),
                    ("mul", _, true) => (IntOp::MulWide, 3),
                    ("mul", ..) => (IntOp::MulLo, 3),
                    ("mad", true, _) => (IntOp::MadHi, 4),
                    ("mad", _, true) => (IntOp::MadWide, 4),
                    ("mad", ..) => (IntOp::MadLo, 4),
                    ("div", ..) => (IntOp::Div, 3),
                    ("rem", ..) => (IntOp::Rem, 3),
                    ("min", ..) => (IntOp::Min, 3),
                    ("max", ..) => (IntOp::Max, 3),
                    ("abs", ..) => (IntOp::Abs, 2),
                    ("neg", ..) => (IntOp::Neg, 2),
                    _ => return unsupported(),
                };
                ins.op = Op::Int { op, ty };
                simple(&mut ins, n..=n, None)?;
            }
        }
        "and" | "or" | "xor" | "not" | "cnot" | "shl" | "shr" | "bfi" | "bfe" | "popc" | "clz"
        | "brev" | "prmt" | "lop3" | "shf" => {
            let ty = m.ty(0, opcode, line)?;
            let (op, n) = match m.base {
                "and" => (IntOp::And, 3),
                "or" => (IntOp::Or, 3),
                "xor" => (IntOp::Xor, 3),
                "not" => (IntOp::Not, 2),
                "cnot" => (IntOp::Cnot, 2),
                "shl" => (IntOp::Shl, 3),
                "shr" => (IntOp::Shr, 3),
                "bfi" => (IntOp::Bfi, 5),
                "bfe" => (IntOp::Bfe, 4),
                "popc" => (IntOp::Popc, 2),
                "clz" => (IntOp::Clz, 2),
                "brev" => (IntOp::Brev, 2),
                "prmt" if m.rest.is_empty() => (IntOp::Prmt, 4),
                "lop3" => (IntOp::Lop3, 5),
                "shf" if m.has("l") => (
                    IntOp::ShfL {
                        clamp: m.has("clamp"),
                    },
                    4,
                ),
                "shf" if m.has("r") => (
                    IntOp::ShfR {
                        clamp: m.has("clamp"),
                    },
                    4,
                ),
                _ => return unsupported(),
            };
            m.only(&["l", "r", "clamp", "wrap"], opcode, line)?;
            ins.op = Op::Int { op, ty };
            simple(&mut ins, n..=n, None)?;
        }
        "ex2" | "lg2" | "sin" | "cos" | "tanh" | "rcp" | "sqrt" | "rsqrt" | "copysign" => {
            let ty = m.ty(0, opcode, line)?;
            if ty != Ty::F32 && ty != Ty::F64 {
                return unsupported();
            }
            m.only(
                &["approx", "ftz", "rn", "rz", "rm", "rp", "full"],
                opcode,
                line,
            )?;
            let op = match m.base {
                "ex2" => FOp::Ex2,
                "lg2" => FOp::Lg2,
                "sin" => FOp::Sin,
                "cos" => FOp::Cos,
                "tanh" => FOp::Tanh,
                "rcp" => FOp::Rcp,
                "sqrt" => FOp::Sqrt,
                "rsqrt" => FOp::Rsqrt,
                _ => FOp::Copysign,
            };
            ins.op = Op::Float {
                op,
                ty,
                rnd: m.rnd(),
                ftz: m.has("ftz"),
                sat: false,
            };
            let n = if op == FOp::Copysign { 3 } else { 2 };
            simple(&mut ins, n..=n, Some(ty))?;
        }
        "setp" => {
            let ty = m.ty(0, opcode, line)?;
            let mut cmp = None;
            let mut combine = None;
            for r in &m.rest {
                match *r {
                    "and" => combine = Some(BoolOp::And),
                    "or" => combine = Some(BoolOp::Or),
                    "xor" => combine = Some(BoolOp::Xor),
                    "ftz" => {}
                    c => {
                        cmp = Some(match c {
                            "eq" => Cmp::Eq,
                            "ne" => Cmp::Ne,
                            "lt" => Cmp::Lt,
                            "le" => Cmp::Le,
                            "gt" => Cmp::Gt,
                            "ge" => Cmp::Ge,
                            "lo" => Cmp::Lo,
                            "ls" => Cmp::Ls,
                            "hi" => Cmp::Hi,
                            "hs" => Cmp::Hs,
                            "equ" => Cmp::Equ,
                            "neu" => Cmp::Neu,
                            "ltu" => Cmp::Ltu,
                            "leu" => Cmp::Leu,
                            "gtu" => Cmp::Gtu,
                            "geu" => Cmp::Geu,
                            "num" => Cmp::Num,
                            "nan" => Cmp::Nan,
                            _ => return unsupported(),
                        })
                    }
                }
            }
            let Some(cmp) = cmp else { return unsupported() };
            ins.op = Op::Setp { cmp, ty, combine };
            let n = if combine.is_some() { 4 } else { 3 };
            count(ops, n..=n, opcode, line)?;
            ins.dst = match &ops[0] {
                Raw::Pair(a, b) => vec![reg(a, opcode, line)?, reg(b, opcode, line)?],
                d => vec![reg(d, opcode, line)?],
            };
            ins.src = ops[1..]
                .iter()
                .map(|o| {
                    if ty.float() {
                        fopd(o, ty, opcode, line)
                    } else {
                        opd(o, opcode, line)
                    }
                })
                .collect::<Result<_>>()?;
        }
        "selp" => {
            let ty = m.ty(0, opcode, line)?;
            m.only(&[], opcode, line)?;
            ins.op = Op::Selp { ty };
            simple(&mut ins, 4..=4, ty.float().then_some(ty))?;
        }
        "cvt" => {
            m.only(
                &[
                    "rn", "rz", "rm", "rp", "rni", "rzi", "rmi", "rpi", "ftz", "sat", "relu",
                ],
                opcode,
                line,
            )?;
            let dty = m.ty(0, opcode, line)?;
            let sty = m.ty(1, opcode, line)?;
            if matches!(dty, Ty::F16x2 | Ty::Bf16x2) {
                if sty != Ty::F32 || m.rnd() != Rnd::Rn {
                    return unsupported();
                }
                ins.op = Op::CvtPack {
                    dty,
                    relu: m.has("relu"),
                };
                simple(&mut ins, 3..=3, Some(Ty::F32))?;
            } else {
                ins.op = Op::Cvt {
                    dty,
                    sty,
                    rnd: m.rnd(),
                    sat: m.has("sat"),
                    ftz: m.has("ftz"),
                };
                simple(&mut ins, 2..=2, sty.float().then_some(sty))?;
            }
        }
        "cvta" => {
            m.only(
                &["to", "global", "shared", "local", "param", "const"],
                opcode,
                line,
            )?;
            ins.op = Op::Cvta {
                to: m.has("to"),
                space: m.space(),
            };
            simple(&mut ins, 2..=2, None)?;
        }
        "ld" | "st" => {
            m.only(
                &[
                    "global",
                    "shared",
                    "local",
                    "param",
                    "const",
                    "v2",
                    "v4",
                    "shared::cta",
                    "param::entry",
                ],
                opcode,
                line,
            )?;
            let ty = m.ty(0, opcode, line)?;
            let space = m.space();
            count(ops, 2..=2, opcode, line)?;
            if m.base == "ld" {
                ins.op = Op::Ld { space, ty };
                ins.dst = regs(&ops[0], opcode, line)?;
                ins.addr[0] = mem(&ops[1], opcode, line)?;
                if ins.dst.len() != m.vec() as usize {
                    return err(
                        line,
                        format!("`{opcode}`: vector size does not match its operand"),
                    );
                }
            } else {
                ins.op = Op::St { space, ty };
                ins.addr[0] = mem(&ops[0], opcode, line)?;
                ins.src = match &ops[1] {
                    Raw::Vector(v) => v
                        .iter()
                        .map(|o| fopd(o, ty, opcode, line))
                        .collect::<Result<_>>()?,
                    o => vec![fopd(o, ty, opcode, line)?],
                };
                if ins.src.len() != m.vec() as usize {
                    return err(
                        line,
                        format!("`{opcode}`: vector size does not match its operand"),
                    );
                }
            }
        }
        "bra" => {
            m.only(&["uni"], opcode, line)?;
            count(ops, 1..=1, opcode, line)?;
            if !matches!(ops[0], Raw::Label(_)) {
                return err(line, "`bra` to a register is not supported");
            }
            ins.op = Op::Bra { target: u32::MAX };
        }
        "ret" => ins.op = Op::Ret,
        "exit" => ins.op = Op::Exit,
        "trap" => ins.op = Op::Trap,
        "bar" | "barrier" if m.has("warp") => {
            count(ops, 1..=1, opcode, line)?;
            ins.op = Op::BarWarp;
            ins.src = vec![opd(&ops[0], opcode, line)?];
        }
        "bar" | "barrier" => {
            m.only(&["sync"], opcode, line)?;
            if !m.has("sync") && m.base == "bar" && !m.rest.is_empty() {
                return unsupported();
            }
            count(ops, 1..=2, opcode, line)?;
            ins.op = Op::Bar;
            ins.src = ops
                .iter()
                .map(|o| opd(o, opcode, line))
                .collect::<Result<_>>()?;
        }
        "shfl" => {
            m.only(&["sync", "up", "down", "bfly", "idx"], opcode, line)?;
            let mode = if m.has("up") {
                ShflMode::Up
            } else if m.has("down") {
                ShflMode::Down
            } else if m.has("bfly") {
                ShflMode::Bfly
            } else if m.has("idx") {
                ShflMode::Idx
            } else {
                return unsupported();
            };
            if !m.has("sync") {
                return err(
                    line,
                    "`shfl` without .sync is not supported (removed in sm_70)",
                );
            }
            count(ops, 5..=5, opcode, line)?;
            ins.op = Op::Shfl { mode };
            ins.dst = match &ops[0] {
                Raw::Pair(a, b) => vec![reg(a, opcode, line)?, reg(b, opcode, line)?],
                d => vec![reg(d, opcode, line)?],
            };
            ins.src = ops[1..]
                .iter()
                .map(|o| opd(o, opcode, line))
                .collect::<Result<_>>()?;
        }
        "vote" => {
            m.only(&["sync", "all", "any", "uni", "ballot"], opcode, line)?;
            let mode = if m.has("all") {
                VoteMode::All
            } else if m.has("any") {
                VoteMode::Any
            } else if m.has("uni") {
                VoteMode::Uni
            } else if m.has("ballot") {
                VoteMode::Ballot
            } else {
                return unsupported();
            };
            if !m.has("sync") {
                return err(line, "`vote` without .sync is not supported");
            }
            ins.op = Op::Vote { mode };
            simple(&mut ins, 3..=3, None)?;
        }
        "activemask" => {
            ins.op = Op::Activemask;
            simple(&mut ins, 1..=1, None)?;
        }
        "ldmatrix" => {
            m.only(
                &[
                    "sync",
                    "m8n8",
                    "x1",
                    "x2",
                    "x4",
                    "trans",
                    "shared",
                    "shared::cta",
                ],
                opcode,
                line,
            )?;
            if !m.has("m8n8") || m.types != [Ty::B16] {
                return unsupported();
            }
            let num = if m.has("x4") {
                4
            } else if m.has("x2") {
                2
            } else {
                1
            };
            count(ops, 2..=2, opcode, line)?;
            ins.op = Op::Ldmatrix {
                num,
                trans: m.has("trans"),
            };
            ins.dst = regs(&ops[0], opcode, line)?;
            if ins.dst.len() != num as usize {
                return err(
                    line,
                    format!("`{opcode}`: {} destinations, expected {num}", ins.dst.len()),
                );
            }
            ins.addr[0] = mem(&ops[1], opcode, line)?;
        }
        "mma" => {
            m.only(&["sync", "m16n8k16", "row", "col"], opcode, line)?;
            let ab = match m.types.as_slice() {
                [Ty::F32, Ty::F16, Ty::F16, Ty::F32] => Ty::F16,
                [Ty::F32, Ty::Bf16, Ty::Bf16, Ty::F32] => Ty::Bf16,
                _ => return unsupported(),
            };
            if !(m.has("m16n8k16")
                && m.rest.iter().position(|r| *r == "row")
                    < m.rest.iter().position(|r| *r == "col"))
            {
                return unsupported();
            }
            count(ops, 4..=4, opcode, line)?;
            ins.op = Op::Mma { ab };
            ins.dst = regs(&ops[0], opcode, line)?;
            let srcs: Vec<Slot> = [&ops[1], &ops[2], &ops[3]]
                .iter()
                .map(|o| regs(o, opcode, line))
                .collect::<Result<Vec<_>>>()?
                .concat();
            if ins.dst.len() != 4 || srcs.len() != 10 {
                return err(
                    line,
                    format!("`{opcode}`: fragments must be 4, 4, 2 and 4 registers"),
                );
            }
            ins.src = srcs.into_iter().map(Opd::Reg).collect();
        }
        "cp" if m.has("async") => {
            if m.has("commit_group") {
                ins.op = Op::CpCommit;
            } else if m.has("wait_group") {
                count(ops, 1..=1, opcode, line)?;
                let Raw::Int(n) = ops[0] else {
                    return err(line, "wait_group takes a literal");
                };
                ins.op = Op::CpWait { n: n as u32 };
            } else if m.has("wait_all") {
                ins.op = Op::CpWaitAll;
            } else {
                m.only(
                    &["async", "ca", "cg", "shared", "global", "shared::cta"],
                    opcode,
                    line,
                )?;
                count(ops, 3..=4, opcode, line)?;
                let Raw::Int(bytes) = ops[2] else {
                    return err(line, "cp.async size must be a literal");
                };
                if !matches!(bytes, 4 | 8 | 16) || (m.has("cg") && bytes != 16) {
                    return err(
                        line,
                        format!("cp.async of {bytes} bytes is not a legal size"),
                    );
                }
                ins.op = Op::CpAsync { bytes: bytes as u8 };
                ins.addr = [mem(&ops[0], opcode, line)?, mem(&ops[1], opcode, line)?];
                ins.src = vec![match ops.get(3) {
                    Some(o) => opd(o, opcode, line)?,
                    None => Opd::Imm(bytes),
                }];
            }
        }
        "atom" | "red" => {
            let ty = m.ty(0, opcode, line)?;
            let mut op = None;
            for r in &m.rest {
                op = op.or(match *r {
                    "add" => Some(AtomOp::Add),
                    "min" => Some(AtomOp::Min),
                    "max" => Some(AtomOp::Max),
                    "and" => Some(AtomOp::And),
                    "or" => Some(AtomOp::Or),
                    "xor" => Some(AtomOp::Xor),
                    "exch" => Some(AtomOp::Exch),
                    "cas" => Some(AtomOp::Cas),
                    "inc" => Some(AtomOp::Inc),
                    "dec" => Some(AtomOp::Dec),
                    _ => None,
                });
            }
            let Some(op) = op else { return unsupported() };
            m.only(
                &[
                    "global", "shared", "add", "min", "max", "and", "or", "xor", "exch", "cas",
                    "inc", "dec",
                ],
                opcode,
                line,
            )?;
            let ret = m.base == "atom";
            ins.op = Op::Atom {
                op,
                space: m.space(),
                ty,
                ret,
            };
            let first = usize::from(ret);
            if ret {
                ins.dst = vec![reg(&ops[0], opcode, line)?];
            }
            let n = if op == AtomOp::Cas { 3 } else { 2 } + first;
            count(ops, n..=n, opcode, line)?;
            ins.addr[0] = mem(&ops[first], opcode, line)?;
            ins.src = ops[first + 1..]
                .iter()
                .map(|o| fopd(o, ty, opcode, line))
                .collect::<Result<_>>()?;
        }
        "membar" | "fence" | "prefetch" | "prefetchu" | "nanosleep" => ins.op = Op::Nop,
        "call" => {
            return err(
                line,
                format!("`{opcode}`: calls to device functions are not supported by the emulator"),
            );
        }
        _ => return unsupported(),
    }
    Ok(ins)
}
