//! The decoded form the interpreter runs: registers resolved to slots, symbols to
//! state-space offsets, labels to instruction indices, modifiers to enums.

/// A register's index in a warp's register file.
pub(crate) type Slot = u32;

/// Base of the generic-address window onto shared memory (`cvta.shared` adds it).
pub(crate) const SHARED_WINDOW: u64 = 0x7e00_0000_0000;
/// Base of the generic-address window onto the executing thread's local memory.
pub(crate) const LOCAL_WINDOW: u64 = 0x7d00_0000_0000;
/// Base of the generic-address window onto the kernel's parameter buffer.
pub(crate) const PARAM_WINDOW: u64 = 0x7c00_0000_0000;
/// Size of each window.
pub(crate) const WINDOW: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    B8,
    B16,
    B32,
    B64,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    Bf16,
    Bf16x2,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub(crate) fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B8,
            "b16" => Ty::B16,
            "b32" => Ty::B32,
            "b64" => Ty::B64,
            "u8" => Ty::U8,
            "u16" => Ty::U16,
            "u32" => Ty::U32,
            "u64" => Ty::U64,
            "s8" => Ty::S8,
            "s16" => Ty::S16,
            "s32" => Ty::S32,
            "s64" => Ty::S64,
            "f16" => Ty::F16,
            "f16x2" => Ty::F16x2,
            "bf16" => Ty::Bf16,
            "bf16x2" => Ty::Bf16x2,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::Pred => 1,
            Ty::B8 | Ty::U8 | Ty::S8 => 8,
            Ty::B16 | Ty::U16 | Ty::S16 | Ty::F16 | Ty::Bf16 => 16,
            Ty::B32 | Ty::U32 | Ty::S32 | Ty::F32 | Ty::F16x2 | Ty::Bf16x2 => 32,
            Ty::B64 | Ty::U64 | Ty::S64 | Ty::F64 => 64,
        }
    }
    pub(crate) fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }
    pub(crate) fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub(crate) fn float(self) -> bool {
        matches!(self, Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64)
    }
}

pub(crate) fn mask_of(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Special registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
    Warpid,
    Nwarpid,
    Smid,
    Nsmid,
    Gridid,
    Clock,
    Clock64,
    GlobalTimer,
    LanemaskEq,
    LanemaskLt,
    LanemaskLe,
    LanemaskGt,
    LanemaskGe,
    DynamicSmemSize,
    TotalSmemSize,
}

/// A source operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opd {
    Reg(Slot),
    /// `!%p`: the complement of a predicate.
    NotReg(Slot),
    Imm(u64),
    Sreg(Sreg),
}

/// `[base + offset]`; a symbol is already folded into `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Addr {
    pub(crate) base: Option<Slot>,
    pub(crate) offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Local,
    Param,
    Const,
    Generic,
}

impl Space {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Space::Global => "global",
            Space::Shared => "shared",
            Space::Local => "local",
            Space::Param => "param",
            Space::Const => "const",
            Space::Generic => "generic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    MulWide,
    MadLo,
    MadHi,
    MadWide,
    Div,
    Rem,
    Min,
    Max,
    Abs,
    Neg,
    And,
    Or,
    Xor,
    Not,
    Cnot,
    Shl,
    Shr,
    Bfi,
    Bfe,
    Popc,
    Clz,
    Brev,
    Prmt,
    Lop3,
    ShfL { clamp: bool },
    ShfR { clamp: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FOp {
    Add,
    Sub,
    Mul,
    Fma,
    Div,
    Min,
    Max,
    Abs,
    Neg,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
    Copysign,
}

/// IEEE rounding of a float result (or a float-to-integer conversion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rnd {
    /// No rounding modifier (exact, or the instruction's default).
    None,
    Rn,
    Rz,
    Rm,
    Rp,
    /// Round to an integer value: nearest even, zero, down, up.
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Lo,
    Ls,
    Hi,
    Hs,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    And,
    Or,
    Xor,
    Exch,
    Cas,
    Inc,
    Dec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// d = s0.
    Mov,
    /// d = concatenation of the sources, the first in the low bits.
    Pack {
        bits: u8,
    },
    /// Each destination gets its piece of s0, the first the low bits.
    Unpack {
        bits: u8,
    },
    Int {
        op: IntOp,
        ty: Ty,
    },
    Float {
        op: FOp,
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
    },
    /// d0 = cmp(s0, s1) [bool s2]; d1 (if present) = its complement.
    Setp {
        cmp: Cmp,
        ty: Ty,
        combine: Option<BoolOp>,
    },
    Selp {
        ty: Ty,
    },
    Cvt {
        dty: Ty,
        sty: Ty,
        rnd: Rnd,
        sat: bool,
        ftz: bool,
    },
    /// `cvt.rn.{f16x2,bf16x2}.f32 d, a, b`: a to the high half, b to the low half.
    CvtPack {
        dty: Ty,
        relu: bool,
    },
    /// Generic <-> state-space address.
    Cvta {
        to: bool,
        space: Space,
    },
    Ld {
        space: Space,
        ty: Ty,
    },
    St {
        space: Space,
        ty: Ty,
    },
    Bra {
        target: u32,
    },
    Ret,
    Exit,
    Trap,
    /// `bar.sync` / `barrier.sync` (s0 = barrier id, optional s1 = thread count).
    Bar,
    /// `bar.warp.sync mask`.
    BarWarp,
    /// d0 (, d1 = in-range predicate) = shfl(s0 value, s1 lane/offset, s2 clamp, s3 mask).
    Shfl {
        mode: ShflMode,
    },
    Vote {
        mode: VoteMode,
    },
    Activemask,
    Ldmatrix {
        num: u8,
        trans: bool,
    },
    /// m16n8k16, A row-major, B column-major, f32 accumulators; `ab` is f16 or bf16.
    Mma {
        ab: Ty,
    },
    /// s0 = src-size (bytes actually read; the rest zero-filled), `bytes` the copy size.
    CpAsync {
        bytes: u8,
    },
    CpCommit,
    CpWait {
        n: u32,
    },
    CpWaitAll,
    Atom {
        op: AtomOp,
        space: Space,
        ty: Ty,
        ret: bool,
    },
    /// Fences, `membar`, `prefetch`: ordering only; every access is already in order here.
    Nop,
}

/// One decoded instruction.
#[derive(Debug, Clone)]
pub(crate) struct Instr {
    pub(crate) op: Op,
    /// `@%p` / `@!%p`.
    pub(crate) guard: Option<(Slot, bool)>,
    pub(crate) dst: Vec<Slot>,
    pub(crate) src: Vec<Opd>,
    /// The memory operand(s): loads/stores one, `cp.async` and `ldmatrix` theirs.
    pub(crate) addr: [Addr; 2],
    /// 1-based PTX line.
    pub(crate) line: u32,
    /// Index into the module's `.loc` table (0 = none).
    pub(crate) loc: u32,
}

impl Instr {
    pub(crate) fn is_collective(&self) -> bool {
        matches!(
            self.op,
            Op::BarWarp | Op::Shfl { .. } | Op::Vote { .. } | Op::Ldmatrix { .. } | Op::Mma { .. }
        )
    }
}
