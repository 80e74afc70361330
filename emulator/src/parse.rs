//! PTX text to decoded kernels: module directives, `.entry` signatures, declarations and
//! statements. Instruction semantics are decoded in `decode.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::decode::decode;
use crate::error::{Error, Result};
use crate::ir::{Addr, Instr, Opd, Slot, Sreg};
use crate::lex::{self, Tok, Token};
use crate::module::{Kernel, Module, Param};

/// The module's text and line info, shared by its kernels (for findings).
pub(crate) struct Source {
    text: String,
    line_starts: Vec<usize>,
    files: HashMap<u32, String>,
    /// `.loc` table: (file, line); index 0 is "none".
    locs: Vec<(u32, u32)>,
}

impl Source {
    /// The text of a 1-based line, trimmed.
    pub(crate) fn line(&self, line: u32) -> &str {
        let i = line.saturating_sub(1) as usize;
        let (Some(&s), e) = (self.line_starts.get(i), self.line_starts.get(i + 1)) else {
            return "";
        };
        self.text[s..e.copied().unwrap_or(self.text.len())].trim()
    }
    /// The `.cu` file and line of a `.loc` index.
    pub(crate) fn loc(&self, loc: u32) -> Option<(String, u32)> {
        let &(file, line) = self.locs.get(loc as usize).filter(|_| loc != 0)?;
        Some((
            self.files
                .get(&file)
                .cloned()
                .unwrap_or_else(|| format!("file {file}")),
            line,
        ))
    }
}

/// A kernel's decoded instructions and its register file layout.
pub(crate) struct Code {
    pub(crate) instrs: Vec<Instr>,
    /// Value mask of each register slot (its declared width).
    pub(crate) reg_masks: Vec<u64>,
    /// Offset of dynamic shared memory (after the statics this kernel uses).
    pub(crate) dynamic_offset: u32,
    pub(crate) source: Arc<Source>,
}

/// A raw operand, before the opcode says how to read it.
#[derive(Debug, Clone)]
pub(crate) enum Raw {
    Reg(Slot),
    NotReg(Slot),
    Int(u64),
    /// A float literal: bits, and whether they are f32 bits (else f64).
    Float(u64, bool),
    Sreg(Sreg),
    /// A label (branch target), resolved after the body is read.
    Label(String),
    /// A symbol's address in its state space.
    Sym(u64),
    Vector(Vec<Raw>),
    /// `_`: a destination that is discarded.
    Sink,
    Mem(Addr),
    /// `a|b`: a second destination (setp, shfl).
    Pair(Box<Raw>, Box<Raw>),
}

impl Raw {
    pub(crate) fn opd(&self) -> Option<Opd> {
        Some(match *self {
            Raw::Reg(s) => Opd::Reg(s),
            Raw::NotReg(s) => Opd::NotReg(s),
            Raw::Int(v) | Raw::Sym(v) => Opd::Imm(v),
            Raw::Float(v, _) => Opd::Imm(v),
            Raw::Sreg(s) => Opd::Sreg(s),
            _ => return None,
        })
    }
}

struct Var {
    align: u32,
    size: u32,
    external: bool,
}

struct Parser<'a> {
    toks: Vec<Token<'a>>,
    i: usize,
    files: HashMap<u32, String>,
    locs: Vec<(u32, u32)>,
    loc_index: HashMap<(u32, u32), u32>,
    shared: Vec<(&'a str, Var)>,
}

fn err<T>(line: u32, msg: impl Into<String>) -> Result<T> {
    Err(Error::Parse {
        line,
        msg: msg.into(),
    })
}

pub(crate) fn parse_module(ptx: &str) -> Result<Module> {
    let toks = lex::lex(ptx)?;
    let mut p = Parser {
        toks,
        i: 0,
        files: HashMap::new(),
        locs: vec![(0, 0)],
        loc_index: HashMap::new(),
        shared: Vec::new(),
    };
    let mut pending = Vec::new();
    while p.i < p.toks.len() {
        let Token { t, line } = p.toks[p.i];
        match t {
            Tok::Id(".version" | ".target" | ".address_size") => p.skip_line(),
            Tok::Id(".file") => p.file()?,
            Tok::Id(".loc") => {
                p.loc();
            }
            Tok::Id(".section") => p.skip_section(),
            Tok::Id(".visible" | ".weak" | ".extern" | ".common")
                if p.peek_id(1) == Some(".shared") =>
            {
                p.i += 1;
                let v = p.shared_var(true)?;
                p.shared.push(v);
            }
            Tok::Id(".visible" | ".weak" | ".extern" | ".common") => p.i += 1,
            Tok::Id(".shared") => {
                let v = p.shared_var(false)?;
                p.shared.push(v);
            }
            Tok::Id(".entry") => pending.push(p.entry()?),
            Tok::Id(".func") => p.skip_func()?,
            Tok::Id(".global" | ".const") => {
                return err(
                    line,
                    "module-scope .global/.const variables are not supported by the emulator",
                );
            }
            Tok::P(b';') => p.i += 1,
            _ => return err(line, format!("unexpected {t:?} at module scope")),
        }
    }
    let source = Arc::new(Source {
        line_starts: std::iter::once(0)
            .chain(ptx.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        text: ptx.to_string(),
        files: p.files,
        locs: p.locs,
    });
    let kernels = pending
        .into_iter()
        .map(|mut k: Kernel| {
            k.code.source = source.clone();
            k
        })
        .collect();
    Ok(Module { kernels })
}

/// One register declaration scope (PTX `{ }` blocks nest them).
#[derive(Default)]
struct Scope<'a> {
    ranges: HashMap<&'a str, (Slot, u32)>,
    singles: HashMap<&'a str, Slot>,
}

struct Body<'a> {
    scopes: Vec<Scope<'a>>,
    masks: Vec<u64>,
    params: HashMap<&'a str, u64>,
    shared: HashMap<&'a str, u64>,
    local: HashMap<&'a str, u64>,
    local_bytes: u32,
}

impl<'a> Body<'a> {
    fn reg(&self, name: &str) -> Option<Slot> {
        for s in self.scopes.iter().rev() {
            if let Some(&slot) = s.singles.get(name) {
                return Some(slot);
            }
            let digits = name.trim_end_matches(|c: char| c.is_ascii_digit());
            if digits.len() < name.len() {
                if let Some(&(base, n)) = s.ranges.get(digits) {
                    let k: u32 = name[digits.len()..].parse().ok()?;
                    if k < n {
                        return Some(base + k);
                    }
                }
            }
        }
        None
    }
}

fn sreg(name: &str) -> Option<Sreg> {
    let dim = |s: &str| match s {
        "x" => Some(0),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Sreg::Tid(d),
            "%ntid" => Sreg::Ntid(d),
            "%ctaid" => Sreg::Ctaid(d),
            "%nctaid" => Sreg::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Sreg::Laneid,
        "%warpid" => Sreg::Warpid,
        "%nwarpid" => Sreg::Nwarpid,
        "%smid" => Sreg::Smid,
        "%nsmid" => Sreg::Nsmid,
        "%gridid" => Sreg::Gridid,
        "%clock" => Sreg::Clock,
        "%clock64" => Sreg::Clock64,
        "%globaltimer" => Sreg::GlobalTimer,
        "%lanemask_eq" => Sreg::LanemaskEq,
        "%lanemask_lt" => Sreg::LanemaskLt,
        "%lanemask_le" => Sreg::LanemaskLe,
        "%lanemask_gt" => Sreg::LanemaskGt,
        "%lanemask_ge" => Sreg::LanemaskGe,
        "%dynamic_smem_size" => Sreg::DynamicSmemSize,
        "%total_smem_size" => Sreg::TotalSmemSize,
        _ => return None,
    })
}

impl<'a> Parser<'a> {
    fn line(&self) -> u32 {
        self.toks
            .get(self.i)
            .or(self.toks.last())
            .map_or(0, |t| t.line)
    }
    fn peek(&self, k: usize) -> Option<Tok<'a>> {
        self.toks.get(self.i + k).map(|t| t.t)
    }
    fn peek_id(&self, k: usize) -> Option<&'a str> {
        match self.peek(k) {
            Some(Tok::Id(s)) => Some(s),
            _ => None,
        }
    }
    fn next(&mut self) -> Result<Tok<'a>> {
        let t = self.toks.get(self.i).map(|t| t.t);
        self.i += 1;
        t.map_or_else(|| err(self.line(), "unexpected end of PTX"), Ok)
    }
    fn expect(&mut self, c: u8) -> Result<()> {
        let line = self.line();
        match self.next()? {
            Tok::P(x) if x == c => Ok(()),
            t => err(line, format!("expected `{}`, found {t:?}", c as char)),
        }
    }
    fn id(&mut self) -> Result<&'a str> {
        let line = self.line();
        match self.next()? {
            Tok::Id(s) => Ok(s),
            t => err(line, format!("expected a name, found {t:?}")),
        }
    }
    fn num(&mut self) -> Result<u64> {
        let line = self.line();
        match self.next()? {
            Tok::Num(s) => lex::int(s).map_or_else(|| err(line, format!("bad integer `{s}`")), Ok),
            t => err(line, format!("expected a number, found {t:?}")),
        }
    }
    fn skip_line(&mut self) {
        let line = self.line();
        while self.i < self.toks.len() && self.toks[self.i].line == line {
            self.i += 1;
        }
    }
    fn skip_section(&mut self) {
        while self.i < self.toks.len() && self.toks[self.i].t != Tok::P(b'{') {
            self.i += 1;
        }
        self.skip_braces();
    }
    fn skip_braces(&mut self) {
        let mut depth = 0;
        while self.i < self.toks.len() {
            match self.toks[self.i].t {
                Tok::P(b'{') => depth += 1,
                Tok::P(b'}') => {
                    depth -= 1;
                    if depth == 0 {
                        self.i += 1;
                        return;
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
    }
    fn skip_func(&mut self) -> Result<()> {
        // A device function nvcc did not inline: calls to it are rejected where they appear.
        while self.i < self.toks.len() && !matches!(self.toks[self.i].t, Tok::P(b'{' | b';')) {
            self.i += 1;
        }
        if self.peek(0) == Some(Tok::P(b'{')) {
            self.skip_braces();
        } else {
            self.i += 1;
        }
        Ok(())
    }
    fn file(&mut self) -> Result<()> {
        let line = self.line();
        self.i += 1;
        let n = self.num()? as u32;
        if let Some(Tok::Str(s)) = self.peek(0) {
            self.files.insert(n, s.to_string());
        }
        let _ = line;
        self.skip_line();
        Ok(())
    }
    /// `.loc file line col[, function_name ..., inlined_at ...]`: returns the table index.
    fn loc(&mut self) -> u32 {
        let line = self.line();
        let (f, l) = match (self.peek(1), self.peek(2)) {
            (Some(Tok::Num(f)), Some(Tok::Num(l))) => (
                lex::int(f).unwrap_or(0) as u32,
                lex::int(l).unwrap_or(0) as u32,
            ),
            _ => (0, 0),
        };
        self.skip_line();
        let _ = line;
        if l == 0 {
            return 0;
        }
        let next = self.locs.len() as u32;
        let idx = *self.loc_index.entry((f, l)).or_insert(next);
        if idx == next {
            self.locs.push((f, l));
        }
        idx
    }
    /// `.shared .align A .b8 name[N];` (or `[]` for `.extern`).
    fn shared_var(&mut self, external: bool) -> Result<(&'a str, Var)> {
        let line = self.line();
        self.i += 1; // .shared
        let mut align = 1;
        let mut elem = 1;
        let name = loop {
            match self.next()? {
                Tok::Id(".align") => align = self.num()? as u32,
                Tok::Id(t) if t.starts_with('.') => {
                    elem = crate::ir::Ty::parse(&t[1..]).map_or(1, |ty| ty.bytes())
                }
                Tok::Id(n) => break n,
                t => return err(line, format!("bad .shared declaration at {t:?}")),
            }
        };
        let mut size = elem;
        if self.peek(0) == Some(Tok::P(b'[')) {
            self.i += 1;
            if self.peek(0) == Some(Tok::P(b']')) {
                size = 0;
            } else {
                size = elem * self.num()? as u32;
            }
            self.expect(b']')?;
        }
        if self.peek(0) == Some(Tok::P(b'=')) {
            return err(line, "initialised .shared variables are not supported");
        }
        self.expect(b';')?;
        Ok((
            name,
            Var {
                align: align.max(elem),
                size,
                external,
            },
        ))
    }

    fn entry(&mut self) -> Result<Kernel> {
        let line = self.line();
        self.i += 1;
        let name = self.id()?;
        // Parameters.
        let mut params = Vec::new();
        let mut param_names = HashMap::new();
        let mut offset = 0u32;
        if self.peek(0) == Some(Tok::P(b'(')) {
            self.i += 1;
            while self.peek(0) != Some(Tok::P(b')')) {
                let pl = self.line();
                if self.id()? != ".param" {
                    return err(pl, "expected .param");
                }
                let (mut align, mut elem) = (0u32, 0u32);
                let pname = loop {
                    match self.next()? {
                        Tok::Id(".align") => align = self.num()? as u32,
                        Tok::Id(".ptr" | ".global" | ".shared" | ".const" | ".local") => {}
                        Tok::Id(t) if t.starts_with('.') => {
                            elem = crate::ir::Ty::parse(&t[1..]).map_or_else(
                                || err(pl, format!("bad param type {t}")),
                                |ty| Ok(ty.bytes()),
                            )?
                        }
                        Tok::Id(n) => break n,
                        t => return err(pl, format!("bad parameter at {t:?}")),
                    }
                };
                let mut size = elem;
                if self.peek(0) == Some(Tok::P(b'[')) {
                    self.i += 1;
                    size = elem * self.num()? as u32;
                    self.expect(b']')?;
                }
                let align = if align == 0 { elem.max(1) } else { align };
                offset = offset.div_ceil(align) * align;
                param_names.insert(pname, offset as u64);
                params.push(Param {
                    offset,
                    size,
                    align,
                });
                offset += size;
                if self.peek(0) == Some(Tok::P(b',')) {
                    self.i += 1;
                }
            }
            self.i += 1;
        }
        // Performance directives.
        let mut max_threads = None;
        while let Some(Tok::Id(d)) = self.peek(0) {
            self.i += 1;
            let mut dims = vec![self.num()? as u32];
            while self.peek(0) == Some(Tok::P(b',')) {
                self.i += 1;
                dims.push(self.num()? as u32);
            }
            if d == ".maxntid" || d == ".reqntid" {
                max_threads = Some(dims.iter().product());
            }
        }
        if self.peek(0) != Some(Tok::P(b'{')) {
            return err(line, format!("expected the body of `{name}`"));
        }
        // Which module .shared variables the body names: only those take space.
        let start = self.i;
        self.skip_braces();
        let used: HashSet<&str> = self.toks[start..self.i]
            .iter()
            .filter_map(|t| match t.t {
                Tok::Id(s) => Some(s),
                _ => None,
            })
            .collect();
        // Function-scope ("demoted") .shared variables are statics of this kernel alone.
        let mut demoted = Vec::new();
        for k in start..self.i {
            if self.toks[k].t == Tok::Id(".shared") {
                let end = self.i;
                self.i = k;
                demoted.push(self.shared_var(false)?);
                self.i = end;
            }
        }
        let mut shared = HashMap::new();
        let mut off = 0u32;
        let mut ext_align = 16u32;
        for (vname, v) in self.shared.iter().chain(demoted.iter()) {
            if !used.contains(vname) {
                continue;
            }
            if v.external {
                ext_align = ext_align.max(v.align);
            } else {
                off = off.div_ceil(v.align) * v.align;
                shared.insert(*vname, off as u64);
                off += v.size;
            }
        }
        let static_shared = off;
        let dynamic_offset = off.div_ceil(ext_align) * ext_align;
        for (vname, v) in &self.shared {
            if used.contains(vname) && v.external {
                shared.insert(*vname, dynamic_offset as u64);
            }
        }
        self.i = start;
        let mut body = Body {
            scopes: Vec::new(),
            masks: Vec::new(),
            params: param_names,
            shared,
            local: HashMap::new(),
            local_bytes: 0,
        };
        let instrs = self.body(&mut body)?;
        Ok(Kernel {
            name: name.to_string(),
            params,
            static_shared,
            max_threads,
            local_bytes: body.local_bytes,
            num_regs: body.masks.len() as u32,
            code: Code {
                instrs,
                reg_masks: body.masks,
                dynamic_offset,
                source: Arc::new(Source {
                    text: String::new(),
                    line_starts: Vec::new(),
                    files: HashMap::new(),
                    locs: Vec::new(),
                }),
            },
        })
    }

    fn body(&mut self, b: &mut Body<'a>) -> Result<Vec<Instr>> {
        let mut instrs: Vec<Instr> = Vec::new();
        let mut labels: HashMap<&'a str, u32> = HashMap::new();
        let mut fixups: Vec<(usize, String, u32)> = Vec::new();
        let mut loc = 0u32;
        let mut depth = 0usize;
        loop {
            let line = self.line();
            match self.next()? {
                Tok::P(b'{') => {
                    depth += 1;
                    b.scopes.push(Scope::default());
                }
                Tok::P(b'}') => {
                    depth -= 1;
                    b.scopes.pop();
                    if depth == 0 {
                        break;
                    }
                }
                Tok::P(b';') => {}
                Tok::Id(".loc") => {
                    self.i -= 1;
                    loc = self.loc();
                }
                Tok::Id(".pragma") => self.skip_stmt(),
                Tok::Id(".reg") => self.reg_decl(b)?,
                Tok::Id(".local") => self.local_decl(b)?,
                Tok::Id(".shared") => self.skip_stmt(),
                Tok::Id(l) if self.peek(0) == Some(Tok::P(b':')) => {
                    self.i += 1;
                    labels.insert(l, instrs.len() as u32);
                }
                Tok::P(b'@') | Tok::Id(_) => {
                    self.i -= 1;
                    let (instr, label) = self.instr(b, line, loc)?;
                    if let Some(l) = label {
                        fixups.push((instrs.len(), l, line));
                    }
                    instrs.push(instr);
                }
                t => return err(line, format!("unexpected {t:?} in a function body")),
            }
        }
        for (at, label, line) in fixups {
            let Some(&target) = labels.get(label.as_str()) else {
                return err(line, format!("branch to unknown label `{label}`"));
            };
            if let crate::ir::Op::Bra { target: t } = &mut instrs[at].op {
                *t = target;
            }
        }
        // Falling off the end exits, like `ret`.
        instrs.push(Instr {
            op: crate::ir::Op::Exit,
            guard: None,
            dst: Vec::new(),
            src: Vec::new(),
            addr: [Addr {
                base: None,
                offset: 0,
            }; 2],
            line: self
                .toks
                .get(self.i.saturating_sub(1))
                .map_or(0, |t| t.line),
            loc: 0,
        });
        Ok(instrs)
    }

    fn skip_stmt(&mut self) {
        while self.i < self.toks.len() && self.toks[self.i].t != Tok::P(b';') {
            self.i += 1;
        }
        self.i += 1;
    }

    fn reg_decl(&mut self, b: &mut Body<'a>) -> Result<()> {
        let line = self.line();
        let mut bits = 64;
        loop {
            match self.next()? {
                Tok::Id(t) if t.starts_with('.') => {
                    if t == ".v2" || t == ".v4" {
                        return err(line, "vector registers are not supported");
                    }
                    bits = crate::ir::Ty::parse(&t[1..]).map_or_else(
                        || err(line, format!("bad register type {t}")),
                        |ty| Ok(ty.bits()),
                    )?;
                }
                Tok::Id(name) => {
                    let scope = b.scopes.last_mut().ok_or(Error::Parse {
                        line,
                        msg: ".reg outside a body".into(),
                    })?;
                    let base = b.masks.len() as Slot;
                    if self.peek(0) == Some(Tok::P(b'<')) {
                        self.i += 1;
                        let n = self.num()? as u32;
                        self.expect(b'>')?;
                        scope.ranges.insert(name, (base, n));
                        b.masks
                            .extend(std::iter::repeat_n(crate::ir::mask_of(bits), n as usize));
                    } else {
                        scope.singles.insert(name, base);
                        b.masks.push(crate::ir::mask_of(bits));
                    }
                }
                Tok::P(b',') => {}
                Tok::P(b';') => return Ok(()),
                t => return err(line, format!("bad .reg declaration at {t:?}")),
            }
        }
    }

    fn local_decl(&mut self, b: &mut Body<'a>) -> Result<()> {
        let line = self.line();
        let (mut align, mut elem) = (1u32, 1u32);
        let name = loop {
            match self.next()? {
                Tok::Id(".align") => align = self.num()? as u32,
                Tok::Id(t) if t.starts_with('.') => {
                    elem = crate::ir::Ty::parse(&t[1..]).map_or(1, |ty| ty.bytes())
                }
                Tok::Id(n) => break n,
                t => return err(line, format!("bad .local declaration at {t:?}")),
            }
        };
        let mut size = elem;
        if self.peek(0) == Some(Tok::P(b'[')) {
            self.i += 1;
            size = elem * self.num()? as u32;
            self.expect(b']')?;
        }
        self.expect(b';')?;
        let off = b.local_bytes.div_ceil(align.max(1)) * align.max(1);
        b.local.insert(name, off as u64);
        b.local_bytes = off + size;
        Ok(())
    }

    fn instr(&mut self, b: &Body<'a>, line: u32, loc: u32) -> Result<(Instr, Option<String>)> {
        let mut guard = None;
        if self.peek(0) == Some(Tok::P(b'@')) {
            self.i += 1;
            let neg = self.peek(0) == Some(Tok::P(b'!'));
            if neg {
                self.i += 1;
            }
            let p = self.id()?;
            let slot = b.reg(p).ok_or(Error::Parse {
                line,
                msg: format!("unknown predicate `{p}`"),
            })?;
            guard = Some((slot, neg));
        }
        let opcode = self.id()?;
        let mut ops = Vec::new();
        while self.peek(0) != Some(Tok::P(b';')) {
            ops.push(self.operand(b, line)?);
            match self.peek(0) {
                Some(Tok::P(b',')) => self.i += 1,
                Some(Tok::P(b';')) => {}
                t => {
                    return err(
                        line,
                        format!("expected `,` or `;` after an operand of `{opcode}`, found {t:?}"),
                    );
                }
            }
        }
        self.i += 1;
        let label = ops.iter().find_map(|o| match o {
            Raw::Label(l) => Some(l.clone()),
            _ => None,
        });
        let mut instr = decode(opcode, &ops, line, b.masks.as_slice())?;
        instr.guard = guard;
        instr.line = line;
        instr.loc = loc;
        Ok((instr, label))
    }

    fn operand(&mut self, b: &Body<'a>, line: u32) -> Result<Raw> {
        let first = self.operand1(b, line)?;
        if self.peek(0) == Some(Tok::P(b'|')) {
            self.i += 1;
            let second = self.operand1(b, line)?;
            return Ok(Raw::Pair(Box::new(first), Box::new(second)));
        }
        Ok(first)
    }

    fn operand1(&mut self, b: &Body<'a>, line: u32) -> Result<Raw> {
        match self.next()? {
            Tok::P(b'{') => {
                let mut v = Vec::new();
                while self.peek(0) != Some(Tok::P(b'}')) {
                    v.push(self.operand1(b, line)?);
                    if self.peek(0) == Some(Tok::P(b',')) {
                        self.i += 1;
                    }
                }
                self.i += 1;
                Ok(Raw::Vector(v))
            }
            Tok::P(b'[') => {
                let mut addr = Addr {
                    base: None,
                    offset: 0,
                };
                let mut sign = 1i64;
                loop {
                    match self.next()? {
                        Tok::P(b']') => break,
                        Tok::P(b'+') => sign = 1,
                        Tok::P(b'-') => sign = -sign,
                        Tok::Num(n) => {
                            let v = lex::int(n).ok_or(Error::Parse {
                                line,
                                msg: format!("bad offset `{n}`"),
                            })?;
                            addr.offset = addr.offset.wrapping_add(sign.wrapping_mul(v as i64));
                            sign = 1;
                        }
                        Tok::Id(name) => match self.resolve(b, name, line)? {
                            Raw::Reg(s) if addr.base.is_none() => addr.base = Some(s),
                            Raw::Sym(v) => addr.offset = addr.offset.wrapping_add(v as i64),
                            _ => return err(line, format!("bad address term `{name}`")),
                        },
                        t => return err(line, format!("bad address at {t:?}")),
                    }
                }
                Ok(Raw::Mem(addr))
            }
            Tok::P(b'!') => match self.operand1(b, line)? {
                Raw::Reg(s) => Ok(Raw::NotReg(s)),
                _ => err(line, "`!` applies to a predicate register"),
            },
            Tok::P(b'-') => match self.operand1(b, line)? {
                Raw::Int(v) => Ok(Raw::Int(v.wrapping_neg())),
                Raw::Float(v, true) => Ok(Raw::Float(v ^ 0x8000_0000, true)),
                Raw::Float(v, false) => Ok(Raw::Float(v ^ (1 << 63), false)),
                _ => err(line, "`-` applies to a literal"),
            },
            Tok::Num(n) => {
                if let Some((bits, f32)) = lex::float(n) {
                    Ok(Raw::Float(bits, f32))
                } else {
                    lex::int(n).map(Raw::Int).ok_or(Error::Parse {
                        line,
                        msg: format!("bad literal `{n}`"),
                    })
                }
            }
            Tok::Id("_") => Ok(Raw::Sink),
            Tok::Id(name) => {
                let r = self.resolve(b, name, line)?;
                // `sym+4` as a value.
                if let (Raw::Sym(v), Some(Tok::P(b'+'))) = (&r, self.peek(0)) {
                    let v = *v;
                    self.i += 1;
                    let k = self.num()?;
                    return Ok(Raw::Sym(v.wrapping_add(k)));
                }
                Ok(r)
            }
            t => err(line, format!("unexpected operand {t:?}")),
        }
    }

    fn resolve(&self, b: &Body<'a>, name: &str, line: u32) -> Result<Raw> {
        if let Some(s) = b.reg(name) {
            return Ok(Raw::Reg(s));
        }
        if name.starts_with('%') {
            return sreg(name)
                .map(Raw::Sreg)
                .map_or_else(|| err(line, format!("unknown register `{name}`")), Ok);
        }
        if let Some(&o) = b.params.get(name) {
            return Ok(Raw::Sym(o));
        }
        if let Some(&o) = b.shared.get(name) {
            return Ok(Raw::Sym(o));
        }
        if let Some(&o) = b.local.get(name) {
            return Ok(Raw::Sym(o));
        }
        Ok(Raw::Label(name.to_string()))
    }
}
