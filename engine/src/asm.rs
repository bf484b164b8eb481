//! The DISA assembler: text (`docs/DISA.md` §Assembly) -> `Image`.
//!
//! Two passes. Pass 1 parses every line, checks syntax, and lays out sections: an instruction's
//! size depends only on its operands' addressing modes and types, never on a label's value, so
//! addresses are final after pass 1 with no relaxation. Pass 2 evaluates expressions (labels,
//! `.equ` constants, `label+8`) and encodes through `codec`, whose validation is the ISA table's.
//!
//! Errors never stop at the first: every line is checked and up to `MAX_DIAGNOSTICS` errors are
//! reported, each with `file:line:column`, the line, a caret under the offending text and what was
//! expected. Nothing here panics on any input (property tests and a fuzz target hold it to that).

use crate::abi;
use crate::codec::{self, Instr, Operand};
use crate::image::{Image, Section, SectionKind, Symbol, SymbolUse};
use crate::isa::{
    self, AddrMode, Cond, ExitMode, ExpBase, ImmWidth, InstrDef, Op, Role, Status, Ty,
};
use std::collections::HashMap;
use std::fmt;

/// Errors reported before the assembler gives up on a file.
pub const MAX_DIAGNOSTICS: usize = 50;
/// A source line longer than this is refused (keeps diagnostics and memory bounded).
pub const MAX_LINE_BYTES: usize = 4096;
/// Nesting limit when `.equ` constants refer to each other.
const MAX_EQU_DEPTH: usize = 64;
/// Bytes one section may hold.
const MAX_SECTION_BYTES: u64 = 1 << 30;

/// One error, located in the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Characters to underline (at least 1).
    pub width: usize,
    pub source_line: String,
    pub message: String,
    pub expected: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        writeln!(f, "  --> {}:{}:{}", self.file, self.line, self.column)?;
        if self.line > 0 {
            let gutter = self.line.to_string();
            let pad = " ".repeat(gutter.len());
            writeln!(f, "{pad} |")?;
            writeln!(f, "{gutter} | {}", self.source_line)?;
            write!(
                f,
                "{pad} | {}{}",
                " ".repeat(self.column.saturating_sub(1)),
                "^".repeat(self.width.max(1))
            )?;
            if let Some(expected) = &self.expected {
                write!(f, " expected {expected}")?;
            }
            writeln!(f)?;
        } else if let Some(expected) = &self.expected {
            writeln!(f, "  = expected {expected}")?;
        }
        Ok(())
    }
}

/// All errors of one assembly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsmErrors {
    pub diagnostics: Vec<Diagnostic>,
    /// More errors were found than `MAX_DIAGNOSTICS`.
    pub truncated: bool,
}

impl fmt::Display for AsmErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for diagnostic in &self.diagnostics {
            writeln!(f, "{diagnostic}")?;
        }
        let count = self.diagnostics.len();
        if self.truncated {
            write!(f, "error: stopped after {count} errors")
        } else {
            write!(
                f,
                "error: {count} error{} found",
                if count == 1 { "" } else { "s" }
            )
        }
    }
}

impl std::error::Error for AsmErrors {}

/// Assembles `source`; `file` names it in diagnostics.
pub fn assemble(file: &str, source: &str) -> Result<Image, AsmErrors> {
    let mut assembler = Assembler::new(file, source);
    assembler.pass1();
    if !assembler.diags.is_empty() {
        return Err(assembler.into_errors());
    }
    let image = assembler.pass2();
    if !assembler.diags.is_empty() {
        return Err(assembler.into_errors());
    }
    Ok(image)
}

/// The source's local `.L` labels in code, with their addresses, in source order. The image
/// leaves them out (they name no function, and reports name functions); the profiler uses them
/// to show the loops inside functions. Empty if the source does not assemble.
pub fn local_code_labels(file: &str, source: &str) -> Vec<(String, u64)> {
    let mut assembler = Assembler::new(file, source);
    assembler.pass1();
    if !assembler.diags.is_empty() {
        return Vec::new();
    }
    let _image = assembler.pass2();
    let text = SectionKind::Text;
    let Some(base) = assembler.addrs.get(&text).copied() else {
        return Vec::new();
    };
    assembler
        .label_order
        .iter()
        .filter(|name| name.starts_with(".L"))
        .filter_map(|name| match assembler.symbols.get(name) {
            Some(SymbolDef::Label {
                section, offset, ..
            }) if *section == text => Some((name.clone(), base + offset)),
            _ => None,
        })
        .collect()
}

/// A location: line index (0-based), byte range within the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    line: usize,
    start: usize,
    end: usize,
}

#[derive(Clone, Debug)]
enum Expr {
    Int {
        value: i128,
        hex: bool,
        span: Span,
    },
    Float {
        text: String,
        span: Span,
    },
    Symbol {
        name: String,
        span: Span,
    },
    Neg(Box<Expr>, Span),
    Binary {
        add: bool,
        left: Box<Expr>,
        right: Box<Expr>,
        span: Span,
    },
}

impl Expr {
    fn span(&self) -> Span {
        match self {
            Expr::Int { span, .. }
            | Expr::Float { span, .. }
            | Expr::Symbol { span, .. }
            | Expr::Neg(_, span)
            | Expr::Binary { span, .. } => *span,
        }
    }
}

#[derive(Clone, Debug)]
enum OperandSyntax {
    Imm(Expr),
    Direct(Expr),
    Indirect(Expr),
    BaseDisp { disp: Expr, base: Expr },
}

impl OperandSyntax {
    fn mode(&self) -> AddrMode {
        match self {
            OperandSyntax::Imm(_) => AddrMode::Immediate,
            OperandSyntax::Direct(_) => AddrMode::Direct,
            OperandSyntax::Indirect(_) => AddrMode::Indirect,
            OperandSyntax::BaseDisp { .. } => AddrMode::BaseDisp,
        }
    }
}

struct PendingInstr {
    /// Operation, modifiers and placeholder operands of the right modes.
    instr: Instr,
    operands: Vec<(OperandSyntax, Span)>,
    /// `int`'s number.
    imm8: Option<Expr>,
    span: Span,
    offset: u64,
}

enum DataValues {
    Bytes(Vec<u8>),
    Ints {
        width_bytes: usize,
        exprs: Vec<Expr>,
    },
    Doubles(Vec<Expr>),
}

struct PendingData {
    section: SectionKind,
    offset: u64,
    values: DataValues,
}

#[derive(Clone, Debug)]
enum SymbolDef {
    Label {
        section: SectionKind,
        offset: u64,
        span: Span,
    },
    Equ {
        expr: Expr,
        span: Span,
    },
}

struct SectionState {
    size_bytes: u64,
    explicit_addr: Option<(u64, Span)>,
}

struct Assembler<'a> {
    file: &'a str,
    lines: Vec<&'a str>,
    diags: Vec<Diagnostic>,
    truncated: bool,
    current: SectionKind,
    sections: HashMap<SectionKind, SectionState>,
    symbols: HashMap<String, SymbolDef>,
    /// Labels in definition order (the image's symbol table).
    label_order: Vec<String>,
    /// Names operands were written as (the image's `uses`).
    uses: Vec<SymbolUse>,
    instrs: Vec<PendingInstr>,
    data: Vec<PendingData>,
    entry: Option<Expr>,
    addrs: HashMap<SectionKind, u64>,
}

type Parse<T> = Result<T, ()>;

impl<'a> Assembler<'a> {
    fn new(file: &'a str, source: &'a str) -> Self {
        Assembler {
            file,
            lines: source.lines().collect(),
            diags: Vec::new(),
            truncated: false,
            current: SectionKind::Text,
            sections: SectionKind::ALL
                .iter()
                .map(|kind| {
                    (
                        *kind,
                        SectionState {
                            size_bytes: 0,
                            explicit_addr: None,
                        },
                    )
                })
                .collect(),
            symbols: HashMap::new(),
            label_order: Vec::new(),
            uses: Vec::new(),
            instrs: Vec::new(),
            data: Vec::new(),
            entry: None,
            addrs: HashMap::new(),
        }
    }

    fn into_errors(self) -> AsmErrors {
        AsmErrors {
            diagnostics: self.diags,
            truncated: self.truncated,
        }
    }

    fn error(&mut self, span: Span, message: impl Into<String>, expected: Option<&str>) {
        if self.diags.len() >= MAX_DIAGNOSTICS {
            self.truncated = true;
            return;
        }
        let line_text = self.lines.get(span.line).copied().unwrap_or("");
        let line_text = truncate_for_display(line_text);
        let start = span.start.min(line_text.len());
        let end = span.end.clamp(start, line_text.len());
        let column = line_text
            .get(..start)
            .map_or(1, |text| text.chars().count() + 1);
        let width = line_text
            .get(start..end)
            .map_or(1, |text| text.chars().count().max(1));
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line: span.line + 1,
            column,
            width,
            source_line: line_text.to_string(),
            message: message.into(),
            expected: expected.map(str::to_string),
        });
    }

    /// An error with no source position (layout of the whole file).
    fn file_error(&mut self, message: impl Into<String>) {
        if self.diags.len() >= MAX_DIAGNOSTICS {
            self.truncated = true;
            return;
        }
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line: 0,
            column: 0,
            width: 0,
            source_line: String::new(),
            message: message.into(),
            expected: None,
        });
    }

    // ---- pass 1 ---------------------------------------------------------------------------

    fn pass1(&mut self) {
        for index in 0..self.lines.len() {
            if self.truncated {
                return;
            }
            let line = self.lines[index];
            if line.len() > MAX_LINE_BYTES {
                self.error(
                    Span {
                        line: index,
                        start: 0,
                        end: 1,
                    },
                    format!(
                        "line is {} bytes long, more than {MAX_LINE_BYTES}",
                        line.len()
                    ),
                    None,
                );
                continue;
            }
            let _ = self.parse_line(index, line);
        }
        for kind in SectionKind::ALL {
            if self.sections[&kind].size_bytes > MAX_SECTION_BYTES {
                self.file_error(format!(
                    "section {} is larger than {MAX_SECTION_BYTES} bytes",
                    kind.name()
                ));
            }
        }
        self.place_sections();
    }

    fn parse_line(&mut self, line_index: usize, line: &str) -> Parse<()> {
        let code_end = comment_start(line);
        let mut cursor = 0usize;
        let bytes = line.as_bytes();
        // Labels: `name:` followed by white space or the end of the code.
        loop {
            cursor = skip_ws(line, cursor, code_end);
            let ident_end = ident_end(line, cursor, code_end);
            if ident_end > cursor
                && ident_end < code_end
                && bytes[ident_end] == b':'
                && (ident_end + 1 == code_end || bytes[ident_end + 1].is_ascii_whitespace())
            {
                let span = Span {
                    line: line_index,
                    start: cursor,
                    end: ident_end,
                };
                self.define_label(&line[cursor..ident_end], span);
                cursor = ident_end + 1;
                continue;
            }
            break;
        }
        if cursor >= code_end {
            return Ok(());
        }
        let head_end = line[cursor..code_end]
            .find(|c: char| c.is_ascii_whitespace())
            .map_or(code_end, |pos| cursor + pos);
        let head = &line[cursor..head_end];
        let head_span = Span {
            line: line_index,
            start: cursor,
            end: head_end,
        };
        let args_start = skip_ws(line, head_end, code_end);
        let args_span = Span {
            line: line_index,
            start: args_start,
            end: code_end,
        };
        if head.starts_with('.') {
            self.directive(head, head_span, line, args_span)
        } else {
            self.instruction(head, head_span, line, args_span)
        }
    }

    fn define_label(&mut self, name: &str, span: Span) {
        if let Some(previous) = self.symbols.get(name) {
            let line = match previous {
                SymbolDef::Label { span, .. } | SymbolDef::Equ { span, .. } => span.line + 1,
            };
            self.error(
                span,
                format!("`{name}` is already defined on line {line}"),
                Some("a new name"),
            );
            return;
        }
        let offset = self.sections[&self.current].size_bytes;
        self.symbols.insert(
            name.to_string(),
            SymbolDef::Label {
                section: self.current,
                offset,
                span,
            },
        );
        self.label_order.push(name.to_string());
    }

    fn grow(&mut self, bytes: u64) {
        if let Some(state) = self.sections.get_mut(&self.current) {
            state.size_bytes = state.size_bytes.saturating_add(bytes);
        }
    }

    fn directive(&mut self, head: &str, head_span: Span, line: &str, args: Span) -> Parse<()> {
        let args_text = &line[args.start..args.end];
        let need_args = |this: &mut Self| -> Parse<Vec<Expr>> {
            if args_text.trim().is_empty() {
                this.error(
                    head_span,
                    format!("`{head}` needs at least one value"),
                    Some("a value"),
                );
                return Err(());
            }
            let mut exprs = Vec::new();
            let mut failed = false;
            for piece in split_top_level(line, args) {
                match this.parse_expr(line, piece) {
                    Ok(expr) => exprs.push(expr),
                    Err(()) => failed = true,
                }
            }
            if failed {
                Err(())
            } else {
                Ok(exprs)
            }
        };
        match head {
            ".text" | ".data" | ".rodata" | ".bss" => {
                self.no_args(head, args)?;
                self.current = SectionKind::from_name(head).unwrap_or(SectionKind::Text);
                Ok(())
            }
            ".section" => self.section_directive(line, args),
            ".byte" | ".short" | ".int" | ".long" | ".quad" => {
                self.data_allowed(head_span, head)?;
                let width_bytes = match head {
                    ".byte" => 1,
                    ".short" => 2,
                    ".int" | ".long" => 4,
                    _ => 8,
                };
                let exprs = need_args(self)?;
                let offset = self.sections[&self.current].size_bytes;
                self.grow((width_bytes * exprs.len()) as u64);
                self.data.push(PendingData {
                    section: self.current,
                    offset,
                    values: DataValues::Ints { width_bytes, exprs },
                });
                Ok(())
            }
            ".double" => {
                self.data_allowed(head_span, head)?;
                let exprs = need_args(self)?;
                let offset = self.sections[&self.current].size_bytes;
                self.grow(8 * exprs.len() as u64);
                self.data.push(PendingData {
                    section: self.current,
                    offset,
                    values: DataValues::Doubles(exprs),
                });
                Ok(())
            }
            ".ascii" => {
                self.data_allowed(head_span, head)?;
                let bytes = self.parse_string(line, args)?;
                let offset = self.sections[&self.current].size_bytes;
                self.grow(bytes.len() as u64);
                self.data.push(PendingData {
                    section: self.current,
                    offset,
                    values: DataValues::Bytes(bytes),
                });
                Ok(())
            }
            ".zero" | ".align" => {
                if self.current == SectionKind::Text {
                    self.error(
                        head_span,
                        format!("`{head}` is not allowed in .text: code holds only instructions"),
                        Some("an instruction (switch to .data, .rodata or .bss for data)"),
                    );
                    return Err(());
                }
                let exprs = need_args(self)?;
                if exprs.len() != 1 {
                    self.error(
                        args,
                        format!("`{head}` takes one value"),
                        Some("one constant"),
                    );
                    return Err(());
                }
                let value = self.eval_constant(&exprs[0])?;
                let size = self.sections[&self.current].size_bytes;
                let pad = if head == ".zero" {
                    if !(0..=i128::from(MAX_SECTION_BYTES)).contains(&value) {
                        self.error(exprs[0].span(), "size out of range", Some("0 to 2^30"));
                        return Err(());
                    }
                    value as u64
                } else {
                    if value <= 0 || value > 1 << 20 || (value & (value - 1)) != 0 {
                        self.error(
                            exprs[0].span(),
                            format!("alignment {value} is not a power of two up to 2^20"),
                            Some("1, 2, 4, 8, ..."),
                        );
                        return Err(());
                    }
                    let align = value as u64;
                    size.div_ceil(align) * align - size
                };
                let offset = size;
                self.grow(pad);
                if self.current != SectionKind::Bss && pad > 0 {
                    self.data.push(PendingData {
                        section: self.current,
                        offset,
                        values: DataValues::Bytes(vec![0; pad as usize]),
                    });
                }
                Ok(())
            }
            ".equ" => {
                let pieces = split_top_level(line, args);
                if pieces.len() != 2 {
                    self.error(
                        args,
                        "`.equ` takes a name and a value",
                        Some("`.equ NAME, value`"),
                    );
                    return Err(());
                }
                let name_span = trim_span(line, pieces[0]);
                let name = &line[name_span.start..name_span.end];
                if name.is_empty()
                    || ident_end(line, name_span.start, name_span.end) != name_span.end
                {
                    self.error(
                        name_span,
                        format!("`{name}` is not a valid name"),
                        Some("a name like `N` or `buf_len`"),
                    );
                    return Err(());
                }
                let expr = self.parse_expr(line, pieces[1])?;
                if self.symbols.contains_key(name) {
                    self.error(
                        name_span,
                        format!("`{name}` is already defined"),
                        Some("a new name"),
                    );
                    return Err(());
                }
                self.symbols.insert(
                    name.to_string(),
                    SymbolDef::Equ {
                        expr,
                        span: name_span,
                    },
                );
                Ok(())
            }
            ".entry" => {
                let exprs = need_args(self)?;
                if exprs.len() != 1 || self.entry.is_some() {
                    self.error(
                        args,
                        "`.entry` takes one address and appears once",
                        Some("`.entry label`"),
                    );
                    return Err(());
                }
                self.entry = exprs.into_iter().next();
                Ok(())
            }
            _ => {
                self.error(
                    head_span,
                    format!("unknown directive `{head}`"),
                    Some(".text .data .rodata .bss .section .byte .short .int .long .quad .double .ascii .zero .align .equ .entry"),
                );
                Err(())
            }
        }
    }

    fn no_args(&mut self, head: &str, args: Span) -> Parse<()> {
        if args.start < args.end {
            self.error(
                args,
                format!("`{head}` takes no arguments"),
                Some("the end of the line"),
            );
            return Err(());
        }
        Ok(())
    }

    fn data_allowed(&mut self, span: Span, head: &str) -> Parse<()> {
        match self.current {
            SectionKind::Text => {
                self.error(
                    span,
                    format!("`{head}` is not allowed in .text: code holds only instructions"),
                    Some("an instruction (switch to .data or .rodata for data)"),
                );
                Err(())
            }
            SectionKind::Bss => {
                self.error(
                    span,
                    format!("`{head}` is not allowed in .bss, which is zero-filled"),
                    Some("`.zero N` or `.align N`"),
                );
                Err(())
            }
            _ => Ok(()),
        }
    }

    fn section_directive(&mut self, line: &str, args: Span) -> Parse<()> {
        let pieces = split_top_level(line, args);
        let Some(first) = pieces.first() else {
            self.error(
                args,
                "`.section` needs a name",
                Some(".text .rodata .data or .bss"),
            );
            return Err(());
        };
        let name_span = trim_span(line, *first);
        let name = &line[name_span.start..name_span.end];
        let Some(kind) = SectionKind::from_name(name) else {
            self.error(
                name_span,
                format!("unknown section `{name}`"),
                Some(".text .rodata .data or .bss"),
            );
            return Err(());
        };
        self.current = kind;
        match pieces.get(1) {
            None => Ok(()),
            Some(addr_span) if pieces.len() == 2 => {
                let expr = self.parse_expr(line, *addr_span)?;
                let value = self.eval_constant(&expr)?;
                if kind == SectionKind::Text {
                    if value != i128::from(abi::CODE_BASE) {
                        self.error(
                            expr.span(),
                            format!(".text is always at {:#x}", abi::CODE_BASE),
                            None,
                        );
                        return Err(());
                    }
                    return Ok(());
                }
                let Ok(addr) = u64::try_from(value) else {
                    self.error(
                        expr.span(),
                        "address out of range",
                        Some("a 64-bit address"),
                    );
                    return Err(());
                };
                let span = expr.span();
                let state = self.sections.get_mut(&kind).ok_or(())?;
                match state.explicit_addr {
                    Some((previous, _)) if previous != addr => {
                        self.error(
                            span,
                            format!("{name} was already placed at {previous:#x}"),
                            None,
                        );
                        Err(())
                    }
                    _ => {
                        state.explicit_addr = Some((addr, span));
                        Ok(())
                    }
                }
            }
            Some(_) => {
                self.error(
                    args,
                    "`.section` takes a name and an optional address",
                    Some("`.section .data[, ADDR]`"),
                );
                Err(())
            }
        }
    }

    fn parse_string(&mut self, line: &str, args: Span) -> Parse<Vec<u8>> {
        let span = trim_span(line, args);
        let text = &line[span.start..span.end];
        if text.len() < 2 || !text.starts_with('"') || !text.ends_with('"') {
            self.error(span, "expected a string in double quotes", Some("\"text\""));
            return Err(());
        }
        match unescape(&text[1..text.len() - 1]) {
            Ok(bytes) => Ok(bytes),
            Err((offset, message)) => {
                let at = span.start + 1 + offset;
                self.error(
                    Span {
                        line: span.line,
                        start: at,
                        end: at + 1,
                    },
                    message,
                    Some("\\n \\t \\r \\0 \\\\ \\\" \\' or \\xHH"),
                );
                Err(())
            }
        }
    }

    fn instruction(&mut self, head: &str, head_span: Span, line: &str, args: Span) -> Parse<()> {
        let (name, mods_text) = match head.find(':') {
            Some(pos) => (&head[..pos], Some(&head[pos + 1..])),
            None => (head, None),
        };
        let name_span = Span {
            end: head_span.start + name.len(),
            ..head_span
        };
        let mods_span = Span {
            start: head_span.start + name.len() + 1,
            ..head_span
        };
        let Some(def) = isa::by_mnemonic(name) else {
            self.error(
                name_span,
                format!("unknown instruction `{name}`"),
                Some("an instruction (nop mov add sub mul div and or xor rem shl shr br newr spawnx exit int exp) or a directive"),
            );
            return Err(());
        };
        if def.status == Status::Unsupported {
            self.error(
                name_span,
                format!("`{name}` is undocumented in DISA and has no semantics, so it cannot be assembled"),
                None,
            );
            return Err(());
        }
        if self.current != SectionKind::Text {
            self.error(
                name_span,
                format!(
                    "instruction in {}: code must be in .text",
                    self.current.name()
                ),
                Some("`.text` before code"),
            );
            return Err(());
        }
        let mods: Vec<&str> = match mods_text {
            Some(text) => text.split([',', ':']).collect(),
            None => Vec::new(),
        };
        let mut instr = Instr::new(def.op);
        self.apply_modifiers(def, &mut instr, &mods, mods_span, name_span)?;

        let pieces = if args.start < args.end {
            split_top_level(line, args)
        } else {
            Vec::new()
        };
        let mut operands = Vec::new();
        let mut imm8 = None;
        let mut failed = false;
        if def.op == Op::Int {
            if pieces.len() != 1 {
                self.error(
                    if pieces.is_empty() { head_span } else { args },
                    "`int` takes one number",
                    Some("`int 0x80`"),
                );
                return Err(());
            }
            let span = trim_span(line, pieces[0]);
            let text = &line[span.start..span.end];
            let inner = Span {
                start: span.start + usize::from(text.starts_with('$')),
                ..span
            };
            imm8 = Some(self.parse_expr(line, inner)?);
        } else {
            let layout = instr.layout();
            if pieces.len() != layout.operands.len() {
                let found = pieces.len();
                let expected = layout.operands.len();
                self.error(
                    if pieces.is_empty() { head_span } else { args },
                    format!(
                        "`{}` takes {expected} operand{}, found {found}",
                        def.mnemonic,
                        if expected == 1 { "" } else { "s" }
                    ),
                    Some(def.syntax),
                );
                return Err(());
            }
            for (index, (piece, role)) in pieces.iter().zip(layout.operands).enumerate() {
                match self.parse_operand(line, *piece, def, index, *role, &mut instr) {
                    Ok(operand) => operands.push((operand, trim_span(line, *piece))),
                    Err(()) => failed = true,
                }
            }
        }
        if failed {
            return Err(());
        }
        for (operand, _) in &operands {
            let placeholder = match operand.mode() {
                AddrMode::Immediate => Operand::Imm(0),
                AddrMode::Direct => Operand::Direct(0),
                AddrMode::Indirect => Operand::Indirect(0),
                AddrMode::BaseDisp => Operand::BaseDisp { disp: 0, base: 0 },
            };
            instr.push_operand(placeholder);
        }
        // Checks that do not depend on values (types allowed, immediates in written operands).
        if let Err(err) = codec::validate(&instr) {
            let span = match err {
                codec::EncodeError::ImmediateDestination { operand } => {
                    operands.get(operand).map_or(head_span, |(_, span)| *span)
                }
                _ => head_span,
            };
            self.error(span, err.to_string(), None);
            return Err(());
        }
        let offset = self.sections[&SectionKind::Text].size_bytes;
        self.grow(instr.len_bytes() as u64);
        self.instrs.push(PendingInstr {
            instr,
            operands,
            imm8,
            span: Span {
                end: args.end.max(head_span.end),
                ..head_span
            },
            offset,
        });
        Ok(())
    }

    fn apply_modifiers(
        &mut self,
        def: &'static InstrDef,
        instr: &mut Instr,
        mods: &[&str],
        mods_span: Span,
        name_span: Span,
    ) -> Parse<()> {
        let bad = |this: &mut Self, message: String, expected: &str| {
            let span = if mods.is_empty() {
                name_span
            } else {
                mods_span
            };
            this.error(span, message, Some(expected));
            Err(())
        };
        let parse_ty = |text: &str| Ty::from_spelling(text);
        match def.op {
            Op::Br => {
                let Some(cond_text) = mods.first() else {
                    return bad(
                        self,
                        "`br` needs a condition".into(),
                        "`br:j,a`, `br:ji`, `br:l,se,a`, `br:z,se,a`, ...",
                    );
                };
                if let Some((_, name)) = isa::UNSUPPORTED_BRANCH_MODES
                    .iter()
                    .find(|(_, name)| name == cond_text)
                {
                    return bad(
                        self,
                        format!(
                            "branch condition `{name}` is undocumented in DISA and not supported"
                        ),
                        "j ji l le e ne z nz",
                    );
                }
                let Some(cond) = Cond::from_spelling(cond_text) else {
                    return bad(
                        self,
                        format!("unknown branch condition `{cond_text}`"),
                        "j ji l le e ne z nz",
                    );
                };
                instr.cond = cond.cond;
                let rest = &mods[1..];
                let (ty_text, rel_text) = match cond.cond {
                    Cond::Ji => {
                        if !rest.is_empty() {
                            return bad(
                                self,
                                "`br:ji` takes no other modifiers".into(),
                                "`br:ji operand`",
                            );
                        }
                        (None, None)
                    }
                    Cond::J => match rest {
                        [] => (None, None),
                        [rel] => (None, Some(*rel)),
                        _ => {
                            return bad(
                                self,
                                "too many modifiers for `br:j`".into(),
                                "`br:j,a` or `br:j,r`",
                            )
                        }
                    },
                    _ => match rest {
                        [ty] => (Some(*ty), None),
                        [ty, rel] => (Some(*ty), Some(*rel)),
                        _ => {
                            return bad(
                                self,
                                format!("`br:{cond_text}` needs a type"),
                                "like `br:l,se,a`",
                            )
                        }
                    },
                };
                if let Some(ty_text) = ty_text {
                    let Some(ty) = parse_ty(ty_text) else {
                        return bad(
                            self,
                            format!("unknown type `{ty_text}`"),
                            "sb ub sd ud se ue fs fd",
                        );
                    };
                    instr.tys[0] = ty;
                }
                match rel_text {
                    None | Some("a") => instr.rel = false,
                    Some("r") => instr.rel = true,
                    Some(other) => {
                        return bad(
                            self,
                            format!("unknown target kind `{other}`"),
                            "`a` (absolute) or `r` (relative)",
                        )
                    }
                }
                Ok(())
            }
            Op::Exit => match mods {
                [mode] => match ExitMode::from_spelling(mode) {
                    Some(mode) => {
                        instr.exit = mode;
                        Ok(())
                    }
                    None => bad(self, format!("unknown exit mode `{mode}`"), "c a cd ad"),
                },
                _ => bad(
                    self,
                    "`exit` needs one mode".into(),
                    "`exit:c`, `exit:a`, `exit:cd` or `exit:ad`",
                ),
            },
            Op::Exp => match mods {
                [base, ty] => {
                    let Some(base) = ExpBase::from_spelling(base) else {
                        return bad(self, format!("unknown exp base `{base}`"), "e 2 10");
                    };
                    let Some(ty) = parse_ty(ty) else {
                        return bad(self, format!("unknown type `{ty}`"), "fs fd");
                    };
                    instr.base = base;
                    instr.tys[0] = ty;
                    Ok(())
                }
                _ => bad(self, "`exp` needs a base and a type".into(), "`exp:e,fd`"),
            },
            _ => {
                let takes_type = def
                    .layout
                    .is_some_and(|layout| layout.fields.contains(&isa::Field::Attr(0)))
                    && def.op != Op::Conv;
                match (takes_type, mods) {
                    (false, []) => Ok(()),
                    (false, _) if def.op == Op::Conv => bad(
                        self,
                        "`mov` takes its types on the operands".into(),
                        "`mov a:se, b:fd`",
                    ),
                    (false, _) => bad(
                        self,
                        format!("`{}` takes no modifiers", def.mnemonic),
                        def.syntax,
                    ),
                    (true, [ty]) => match parse_ty(ty) {
                        Some(ty) => {
                            instr.tys[0] = ty;
                            Ok(())
                        }
                        None => bad(self, format!("unknown type `{ty}`"), def.attrs.describe()),
                    },
                    (true, _) => bad(
                        self,
                        format!("`{}` needs one type", def.mnemonic),
                        def.syntax,
                    ),
                }
            }
        }
    }

    fn parse_operand(
        &mut self,
        line: &str,
        span: Span,
        def: &InstrDef,
        index: usize,
        role: Role,
        instr: &mut Instr,
    ) -> Parse<OperandSyntax> {
        let mut span = trim_span(line, span);
        if span.start >= span.end {
            self.error(
                span,
                "missing operand",
                Some("an operand: $imm, addr, (addr) or disp(addr)"),
            );
            return Err(());
        }
        // `mov` carries a type on each operand: `0x10:se`.
        if def.op == Op::Conv {
            let text = &line[span.start..span.end];
            let Some(colon) = text.rfind(':') else {
                self.error(
                    span,
                    "`mov` needs a type on each operand",
                    Some("like `mov a:se, b:fd`"),
                );
                return Err(());
            };
            let ty_span = Span {
                start: span.start + colon + 1,
                ..span
            };
            let ty_text = &text[colon + 1..];
            let Some(ty) = Ty::from_spelling(ty_text) else {
                self.error(
                    ty_span,
                    format!("unknown type `{ty_text}`"),
                    Some("sb ub sd ud se ue fs fd"),
                );
                return Err(());
            };
            instr.tys[index & 1] = ty;
            span.end = span.start + colon;
            span = trim_span(line, span);
        }
        let text = &line[span.start..span.end];
        if text.is_empty() {
            self.error(span, "missing operand", Some("an operand before the type"));
            return Err(());
        }
        if role == Role::Target && !text.starts_with('$') {
            self.error(
                span,
                "a branch target is an immediate",
                Some("`$label` or `$address`"),
            );
            return Err(());
        }
        if let Some(rest) = text.strip_prefix('$') {
            let inner = Span {
                start: span.start + 1,
                ..span
            };
            if rest.trim().is_empty() {
                self.error(
                    span,
                    "`$` must be followed by a value",
                    Some("a number or a label"),
                );
                return Err(());
            }
            return Ok(OperandSyntax::Imm(self.parse_expr(line, inner)?));
        }
        if text.ends_with(')') {
            let Some(open) = text.find('(') else {
                self.error(span, "unbalanced `)`", Some("`(addr)` or `disp(addr)`"));
                return Err(());
            };
            let inner = Span {
                start: span.start + open + 1,
                end: span.end - 1,
                ..span
            };
            let base = self.parse_expr(line, inner)?;
            if open == 0 {
                return Ok(OperandSyntax::Indirect(base));
            }
            let disp_span = Span {
                end: span.start + open,
                ..span
            };
            let disp = self.parse_expr(line, disp_span)?;
            return Ok(OperandSyntax::BaseDisp { disp, base });
        }
        if text.contains('(') || text.contains(')') {
            self.error(
                span,
                "unbalanced parentheses",
                Some("`(addr)` or `disp(addr)`"),
            );
            return Err(());
        }
        Ok(OperandSyntax::Direct(self.parse_expr(line, span)?))
    }

    /// Parses `[-] term ((+|-) term)*`.
    fn parse_expr(&mut self, line: &str, span: Span) -> Parse<Expr> {
        let span = trim_span(line, span);
        let bytes = line.as_bytes();
        let mut cursor = span.start;
        let mut result: Option<Expr> = None;
        let mut pending_op: Option<bool> = None; // Some(true) = add
        loop {
            cursor = skip_ws(line, cursor, span.end);
            if cursor >= span.end {
                break;
            }
            if result.is_some() && pending_op.is_none() {
                match bytes[cursor] {
                    b'+' => pending_op = Some(true),
                    b'-' => pending_op = Some(false),
                    _ => {
                        self.error(
                            Span {
                                line: span.line,
                                start: cursor,
                                end: span.end,
                            },
                            "unexpected text in expression",
                            Some("`+`, `-` or the end of the operand"),
                        );
                        return Err(());
                    }
                }
                cursor += 1;
                continue;
            }
            let (term, next) = self.parse_term(
                line,
                Span {
                    start: cursor,
                    ..span
                },
            )?;
            cursor = next;
            result = Some(match (result, pending_op.take()) {
                (None, _) => term,
                (Some(left), Some(add)) => {
                    if matches!(left, Expr::Float { .. }) || matches!(term, Expr::Float { .. }) {
                        self.error(
                            Span {
                                line: span.line,
                                start: span.start,
                                end: cursor,
                            },
                            "floats cannot be used in arithmetic",
                            Some("a single float literal"),
                        );
                        return Err(());
                    }
                    Expr::Binary {
                        add,
                        left: Box::new(left),
                        right: Box::new(term),
                        span: Span {
                            line: span.line,
                            start: span.start,
                            end: cursor,
                        },
                    }
                }
                (Some(_), None) => return Err(()),
            });
        }
        match (result, pending_op) {
            (Some(expr), None) => Ok(expr),
            (Some(_), Some(_)) => {
                self.error(
                    Span {
                        line: span.line,
                        start: span.end.saturating_sub(1),
                        end: span.end,
                    },
                    "expression ends with an operator",
                    Some("a value after `+` or `-`"),
                );
                Err(())
            }
            (None, _) => {
                self.error(
                    span,
                    "expected a value",
                    Some("a number, a character like 'A', or a name"),
                );
                Err(())
            }
        }
    }

    /// One term; returns it and the byte index after it.
    fn parse_term(&mut self, line: &str, span: Span) -> Parse<(Expr, usize)> {
        let bytes = line.as_bytes();
        let start = span.start;
        let Some(&first) = bytes.get(start).filter(|_| start < span.end) else {
            let at = span.end.saturating_sub(1);
            self.error(
                Span {
                    line: span.line,
                    start: at,
                    end: span.end,
                },
                "expected a value after `-`",
                Some("a number or a name"),
            );
            return Err(());
        };
        if first == b'-' {
            let (inner, end) = self.parse_term(
                line,
                Span {
                    start: skip_ws(line, start + 1, span.end),
                    ..span
                },
            )?;
            let term_span = Span {
                line: span.line,
                start,
                end,
            };
            if let Expr::Float { text, .. } = inner {
                return Ok((
                    Expr::Float {
                        text: format!("-{text}"),
                        span: term_span,
                    },
                    end,
                ));
            }
            return Ok((Expr::Neg(Box::new(inner), term_span), end));
        }
        if first == b'\'' {
            // Character literal.
            let rest = &line[start + 1..span.end];
            let close = find_char_literal_end(rest);
            let Some(close) = close else {
                self.error(
                    Span {
                        line: span.line,
                        start,
                        end: span.end,
                    },
                    "unterminated character literal",
                    Some("'c'"),
                );
                return Err(());
            };
            let end = start + 1 + close + 1;
            let term_span = Span {
                line: span.line,
                start,
                end,
            };
            return match unescape(&rest[..close]) {
                Ok(value) if value.len() == 1 => Ok((
                    Expr::Int {
                        value: i128::from(value[0]),
                        hex: false,
                        span: term_span,
                    },
                    end,
                )),
                Ok(_) => {
                    self.error(
                        term_span,
                        "a character literal holds exactly one byte",
                        Some("'c'"),
                    );
                    Err(())
                }
                Err((_, message)) => {
                    self.error(
                        term_span,
                        message,
                        Some("\\n \\t \\r \\0 \\\\ \\' or \\xHH"),
                    );
                    Err(())
                }
            };
        }
        if first.is_ascii_digit() {
            let end = number_end(line, start, span.end);
            let text = &line[start..end];
            let term_span = Span {
                line: span.line,
                start,
                end,
            };
            return match parse_number(text) {
                Some(Number::Int { value, hex }) => Ok((
                    Expr::Int {
                        value,
                        hex,
                        span: term_span,
                    },
                    end,
                )),
                Some(Number::Float) => Ok((
                    Expr::Float {
                        text: text.to_string(),
                        span: term_span,
                    },
                    end,
                )),
                None => {
                    self.error(
                        term_span,
                        format!("`{text}` is not a valid number"),
                        Some("a decimal, 0x hex or 0b binary number, or a float like 1.5"),
                    );
                    Err(())
                }
            };
        }
        let end = ident_end(line, start, span.end);
        if end > start {
            let name = &line[start..end];
            return Ok((
                Expr::Symbol {
                    name: name.to_string(),
                    span: Span {
                        line: span.line,
                        start,
                        end,
                    },
                },
                end,
            ));
        }
        let end = line[start..span.end]
            .chars()
            .next()
            .map_or(start + 1, |c| start + c.len_utf8());
        self.error(
            Span {
                line: span.line,
                start,
                end,
            },
            format!("unexpected `{}`", &line[start..end]),
            Some("a number, a character like 'A', or a name"),
        );
        Err(())
    }

    /// Evaluates an expression that must be known during pass 1 (no labels).
    fn eval_constant(&mut self, expr: &Expr) -> Parse<i128> {
        self.eval(expr, 0, false)
    }

    fn eval(&mut self, expr: &Expr, depth: usize, labels_known: bool) -> Parse<i128> {
        match expr {
            Expr::Int { value, .. } => Ok(*value),
            Expr::Float { span, .. } => {
                self.error(*span, "a float is not allowed here", Some("an integer"));
                Err(())
            }
            Expr::Neg(inner, span) => {
                let value = self.eval(inner, depth, labels_known)?;
                self.checked(value.checked_neg(), *span)
            }
            Expr::Binary {
                add,
                left,
                right,
                span,
            } => {
                let left = self.eval(left, depth, labels_known)?;
                let right = self.eval(right, depth, labels_known)?;
                let value = if *add {
                    left.checked_add(right)
                } else {
                    left.checked_sub(right)
                };
                self.checked(value, *span)
            }
            Expr::Symbol { name, span } => {
                if depth > MAX_EQU_DEPTH {
                    self.error(
                        *span,
                        format!("`{name}`: constants refer to each other too deeply (a cycle?)"),
                        None,
                    );
                    return Err(());
                }
                match self.symbols.get(name).cloned() {
                    Some(SymbolDef::Equ { expr, .. }) => self.eval(&expr, depth + 1, labels_known),
                    Some(SymbolDef::Label {
                        section, offset, ..
                    }) => {
                        if !labels_known {
                            self.error(
                                *span,
                                format!("`{name}` is a label; its address is not known yet here"),
                                Some("a constant (a number or an earlier `.equ`)"),
                            );
                            return Err(());
                        }
                        let base = self.addrs.get(&section).copied().unwrap_or(0);
                        Ok(i128::from(base) + i128::from(offset))
                    }
                    None => {
                        let hint = self.closest_symbol(name);
                        self.error(
                            *span,
                            format!("undefined name `{name}`"),
                            Some(
                                hint.as_deref()
                                    .unwrap_or("a label or `.equ` constant defined in this file"),
                            ),
                        );
                        Err(())
                    }
                }
            }
        }
    }

    fn checked(&mut self, value: Option<i128>, span: Span) -> Parse<i128> {
        match value {
            Some(value) if (-(1i128 << 64)..(1i128 << 65)).contains(&value) => Ok(value),
            _ => {
                self.error(span, "value out of range", Some("a 64-bit value"));
                Err(())
            }
        }
    }

    fn closest_symbol(&self, name: &str) -> Option<String> {
        self.symbols
            .keys()
            .map(|candidate| (edit_distance(name, candidate), candidate))
            .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 3))
            .min()
            .map(|(_, candidate)| format!("`{candidate}` (a defined name)"))
    }

    fn place_sections(&mut self) {
        let mut next = abi::CODE_BASE;
        for kind in SectionKind::ALL {
            let state = &self.sections[&kind];
            let addr = match (kind, state.explicit_addr) {
                (SectionKind::Text, _) => abi::CODE_BASE,
                (_, Some((addr, _))) => addr,
                _ => next.div_ceil(abi::PAGE_BYTES) * abi::PAGE_BYTES,
            };
            let end = addr.saturating_add(state.size_bytes);
            if state.explicit_addr.is_none() || kind == SectionKind::Text {
                next = end;
            } else {
                next = next.max(end);
            }
            self.addrs.insert(kind, addr);
        }
    }

    // ---- pass 2 ---------------------------------------------------------------------------

    fn pass2(&mut self) -> Image {
        let mut contents: HashMap<SectionKind, Vec<u8>> = SectionKind::ALL
            .iter()
            .filter(|kind| **kind != SectionKind::Bss)
            .map(|kind| (*kind, vec![0u8; self.sections[kind].size_bytes as usize]))
            .collect();
        let text_base = self.addrs[&SectionKind::Text];
        let instrs = std::mem::take(&mut self.instrs);
        for pending in &instrs {
            if self.truncated {
                break;
            }
            let Ok(instr) = self.resolve_instr(pending, text_base + pending.offset) else {
                continue;
            };
            let mut bytes = Vec::with_capacity(codec::MAX_INSTR_LEN_BYTES);
            match codec::encode(&instr, &mut bytes) {
                Ok(()) => {
                    let start = pending.offset as usize;
                    if let Some(text) = contents.get_mut(&SectionKind::Text) {
                        if let Some(slot) = text.get_mut(start..start + bytes.len()) {
                            slot.copy_from_slice(&bytes);
                        }
                    }
                }
                Err(err) => self.error(pending.span, err.to_string(), None),
            }
        }
        let data = std::mem::take(&mut self.data);
        for pending in &data {
            if let Ok(bytes) = self.resolve_data(pending) {
                if let Some(section) = contents.get_mut(&pending.section) {
                    let start = pending.offset as usize;
                    if let Some(slot) = section.get_mut(start..start + bytes.len()) {
                        slot.copy_from_slice(&bytes);
                    }
                }
            }
        }
        let entry = match self.entry.clone() {
            None => abi::CODE_BASE,
            Some(expr) => self
                .eval(&expr, 0, true)
                .ok()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(abi::CODE_BASE),
        };
        let mut sections = Vec::new();
        for kind in SectionKind::ALL {
            let len_bytes = self.sections[&kind].size_bytes;
            if len_bytes == 0 && kind != SectionKind::Text {
                continue;
            }
            sections.push(Section {
                kind,
                addr: self.addrs[&kind],
                bytes: contents.remove(&kind).unwrap_or_default(),
                len_bytes,
            });
        }
        let mut symbols: Vec<Symbol> = self
            .label_order
            .iter()
            .filter(|name| !name.starts_with(".L"))
            .filter_map(|name| match self.symbols.get(name) {
                // A label in a data section that ends up empty names no byte of the image.
                Some(SymbolDef::Label { section, .. })
                    if *section != SectionKind::Text && self.sections[section].size_bytes == 0 =>
                {
                    None
                }
                Some(SymbolDef::Label {
                    section, offset, ..
                }) => Some(Symbol {
                    name: name.clone(),
                    addr: self.addrs[section] + offset,
                }),
                _ => None,
            })
            .collect();
        // Stable: labels at one address stay in the order the source defined them, which the
        // reports' choice of a name relies on (`LoadedImage::symbolize`).
        symbols.sort_by_key(|symbol| symbol.addr);
        // Kept only where a name is ambiguous: its label shares the address with another one
        // the image keeps (not `.L` labels, nor those of empty sections).
        let mut at_addr: HashMap<u64, usize> = HashMap::new();
        for symbol in &symbols {
            *at_addr.entry(symbol.addr).or_default() += 1;
        }
        let shared: std::collections::HashSet<&str> = symbols
            .iter()
            .filter(|symbol| at_addr.get(&symbol.addr).is_some_and(|count| *count > 1))
            .map(|symbol| symbol.name.as_str())
            .collect();
        let uses = std::mem::take(&mut self.uses)
            .into_iter()
            .filter(|used| shared.contains(used.name.as_str()))
            .collect();
        Image {
            sections,
            symbols,
            entry,
            uses,
        }
    }

    fn resolve_instr(&mut self, pending: &PendingInstr, at: u64) -> Parse<Instr> {
        let mut instr = pending.instr;
        if let Some(expr) = &pending.imm8 {
            let value = self.eval(expr, 0, true)?;
            match u8::try_from(value) {
                Ok(value) => instr.imm8 = value,
                Err(_) => {
                    self.error(
                        expr.span(),
                        format!("interrupt number {value} does not fit in a byte"),
                        Some("0 to 255"),
                    );
                    return Err(());
                }
            }
        }
        let layout = instr.layout();
        let mut failed = false;
        for (index, ((syntax, _span), role)) in
            pending.operands.iter().zip(layout.operands).enumerate()
        {
            let ty = match role {
                Role::Read(slot) | Role::Write(slot) => Some(instr.tys[usize::from(*slot & 1)]),
                Role::Word | Role::Target => None,
            };
            let resolved = match syntax {
                OperandSyntax::Imm(expr) => {
                    let width = codec::imm_len_bytes(layout, *role, instr.tys);
                    let value = if *role == Role::Target {
                        self.target_value(expr, at, instr.rel)
                    } else {
                        self.immediate(expr, ty, width, layout.imm_width)
                    };
                    value.map(Operand::Imm)
                }
                OperandSyntax::Direct(expr) => self.address(expr).map(Operand::Direct),
                OperandSyntax::Indirect(expr) => self.address(expr).map(Operand::Indirect),
                OperandSyntax::BaseDisp { disp, base } => {
                    let base = self.address(base);
                    let disp = self.displacement(disp);
                    match (base, disp) {
                        (Ok(base), Ok(disp)) => Ok(Operand::BaseDisp { disp, base }),
                        _ => Err(()),
                    }
                }
            };
            match resolved {
                Ok(operand) => instr.operands_mut()[index] = operand,
                Err(()) => failed = true,
            }
            // A bare name is kept, so that reports name what the source wrote here when
            // several labels share the address.
            let named = match syntax {
                OperandSyntax::Imm(expr)
                | OperandSyntax::Direct(expr)
                | OperandSyntax::Indirect(expr)
                | OperandSyntax::BaseDisp { base: expr, .. } => expr,
            };
            if let Expr::Symbol { name, .. } = named {
                if matches!(self.symbols.get(name), Some(SymbolDef::Label { .. })) {
                    self.uses.push(SymbolUse {
                        at,
                        name: name.clone(),
                    });
                }
            }
        }
        if failed {
            Err(())
        } else {
            Ok(instr)
        }
    }

    fn address(&mut self, expr: &Expr) -> Parse<u64> {
        let value = self.eval(expr, 0, true)?;
        u64::try_from(value).map_err(|_| {
            self.error(
                expr.span(),
                format!("address {value} is out of range"),
                Some("an address from 0 to 2^64-1"),
            );
        })
    }

    fn displacement(&mut self, expr: &Expr) -> Parse<i32> {
        let value = self.eval(expr, 0, true)?;
        i32::try_from(value).map_err(|_| {
            self.error(
                expr.span(),
                format!("displacement {value} does not fit in 32 bits"),
                Some("a signed 32-bit displacement"),
            );
        })
    }

    fn target_value(&mut self, expr: &Expr, at: u64, rel: bool) -> Parse<u64> {
        let value = self.eval(expr, 0, true)?;
        let value = if rel { value - i128::from(at) } else { value };
        self.fit_bits(value, 8, expr.span(), "a 64-bit target")
    }

    /// An immediate of type `ty` (None: an untyped 64-bit word) stored in `width_bytes`.
    fn immediate(
        &mut self,
        expr: &Expr,
        ty: Option<Ty>,
        width_bytes: usize,
        imm_width: ImmWidth,
    ) -> Parse<u64> {
        if let Some(float_ty) = ty.filter(|ty| ty.is_float()) {
            return self.float_immediate(expr, float_ty, width_bytes);
        }
        let value = self.eval(expr, 0, true)?;
        match (ty, imm_width) {
            (Some(ty), ImmWidth::TypeSize) => {
                let expected = format!("a `{ty}` value ({} bytes)", ty.size_bytes());
                self.fit_bits(value, ty.size_bytes() as usize, expr.span(), &expected)
            }
            _ => self.fit_bits(value, width_bytes, expr.span(), "a 64-bit value"),
        }
    }

    /// Floats: a float or decimal literal is a value; a hex literal is the IEEE bit pattern.
    fn float_immediate(&mut self, expr: &Expr, ty: Ty, width_bytes: usize) -> Parse<u64> {
        let bits = match expr {
            Expr::Int {
                value,
                hex: true,
                span,
            } => {
                return self.fit_bits(
                    *value,
                    width_bytes,
                    *span,
                    "a bit pattern of the stored width",
                );
            }
            Expr::Float { text, span } => parse_float_bits(text, ty).ok_or_else(|| {
                self.error(
                    *span,
                    format!("`{text}` is not a valid float"),
                    Some("a float like 1.5 or -2e10"),
                );
            })?,
            _ => {
                let value = self.eval(expr, 0, true)?;
                match ty {
                    Ty::F32 => u64::from((value as f32).to_bits()),
                    _ => (value as f64).to_bits(),
                }
            }
        };
        Ok(bits)
    }

    fn fit_bits(
        &mut self,
        value: i128,
        width_bytes: usize,
        span: Span,
        expected: &str,
    ) -> Parse<u64> {
        let bits = (width_bytes * 8) as u32;
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << bits) - 1;
        if value < min || value > max {
            self.error(
                span,
                format!(
                    "{value} does not fit in {width_bytes} byte{}",
                    if width_bytes == 1 { "" } else { "s" }
                ),
                Some(expected),
            );
            return Err(());
        }
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        Ok((value as u64) & mask)
    }

    fn resolve_data(&mut self, pending: &PendingData) -> Parse<Vec<u8>> {
        match &pending.values {
            DataValues::Bytes(bytes) => Ok(bytes.clone()),
            DataValues::Ints { width_bytes, exprs } => {
                let mut out = Vec::with_capacity(width_bytes * exprs.len());
                let mut failed = false;
                for expr in exprs {
                    let fitted = self.eval(expr, 0, true).and_then(|value| {
                        self.fit_bits(
                            value,
                            *width_bytes,
                            expr.span(),
                            "a value of the directive's width",
                        )
                    });
                    match fitted {
                        Ok(bits) => out.extend_from_slice(&bits.to_le_bytes()[..*width_bytes]),
                        Err(()) => failed = true,
                    }
                }
                if failed {
                    Err(())
                } else {
                    Ok(out)
                }
            }
            DataValues::Doubles(exprs) => {
                let mut out = Vec::with_capacity(8 * exprs.len());
                let mut failed = false;
                for expr in exprs {
                    match self.float_immediate(expr, Ty::F64, 8) {
                        Ok(bits) => out.extend_from_slice(&bits.to_le_bytes()),
                        Err(()) => failed = true,
                    }
                }
                if failed {
                    Err(())
                } else {
                    Ok(out)
                }
            }
        }
    }
}

// ---- lexical helpers (all return byte indexes within the line) ----------------------------

fn truncate_for_display(line: &str) -> &str {
    if line.len() <= 200 {
        return line;
    }
    let mut end = 200;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// Where a `#` comment starts (outside string and character literals), or the line's length.
fn comment_start(line: &str) -> usize {
    let bytes = line.as_bytes();
    let mut quote: Option<u8> = None;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(q) => {
                if byte == b'\\' {
                    index += 1;
                } else if byte == q {
                    quote = None;
                }
            }
            None => match byte {
                b'#' => return index,
                b'"' | b'\'' => quote = Some(byte),
                _ => {}
            },
        }
        index += 1;
    }
    bytes.len()
}

fn skip_ws(line: &str, mut index: usize, end: usize) -> usize {
    let bytes = line.as_bytes();
    while index < end && bytes[index].is_ascii_whitespace() {
        index += 1;
    }
    index
}

/// End of an identifier `[A-Za-z_.][A-Za-z0-9_.]*` starting at `start` (== start if none).
fn ident_end(line: &str, start: usize, end: usize) -> usize {
    let bytes = line.as_bytes();
    if start >= end
        || !(bytes[start].is_ascii_alphabetic() || bytes[start] == b'_' || bytes[start] == b'.')
    {
        return start;
    }
    let mut index = start + 1;
    while index < end
        && (bytes[index].is_ascii_alphanumeric() || bytes[index] == b'_' || bytes[index] == b'.')
    {
        index += 1;
    }
    index
}

fn number_end(line: &str, start: usize, end: usize) -> usize {
    let bytes = line.as_bytes();
    let mut index = start;
    let hex = bytes
        .get(start + 1)
        .is_some_and(|b| *b == b'x' || *b == b'X')
        && bytes[start] == b'0';
    while index < end {
        let byte = bytes[index];
        let exponent_sign = !hex
            && (byte == b'+' || byte == b'-')
            && index > start
            && matches!(bytes[index - 1], b'e' | b'E');
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'.' || exponent_sign {
            index += 1;
        } else {
            break;
        }
    }
    index
}

enum Number {
    Int { value: i128, hex: bool },
    Float,
}

fn parse_number(text: &str) -> Option<Number> {
    let clean: String = text.chars().filter(|c| *c != '_').collect();
    let lower = clean.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(|value| Number::Int {
            value: i128::from(value),
            hex: true,
        });
    }
    if let Some(binary) = lower.strip_prefix("0b") {
        return u64::from_str_radix(binary, 2)
            .ok()
            .map(|value| Number::Int {
                value: i128::from(value),
                hex: true,
            });
    }
    if lower.contains(['.', 'e']) {
        return lower.parse::<f64>().ok().map(|_| Number::Float);
    }
    lower.parse::<u64>().ok().map(|value| Number::Int {
        value: i128::from(value),
        hex: false,
    })
}

fn parse_float_bits(text: &str, ty: Ty) -> Option<u64> {
    let clean: String = text.chars().filter(|c| *c != '_').collect();
    match ty {
        Ty::F32 => clean
            .parse::<f32>()
            .ok()
            .map(|value| u64::from(value.to_bits())),
        _ => clean.parse::<f64>().ok().map(f64::to_bits),
    }
}

fn find_char_literal_end(rest: &str) -> Option<usize> {
    let bytes = rest.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'\\' => index += 2,
            b'\'' => return Some(index),
            _ => index += 1,
        }
    }
    None
}

/// Decodes escapes; on error returns the byte offset within `text` and a message.
fn unescape(text: &str) -> Result<Vec<u8>, (usize, String)> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte != b'\\' {
            if byte == b'"' {
                return Err((index, "unescaped `\"` inside a string".into()));
            }
            out.push(byte);
            index += 1;
            continue;
        }
        let Some(escape) = bytes.get(index + 1) else {
            return Err((index, "`\\` at the end of a string".into()));
        };
        let value = match escape {
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'0' => 0,
            b'\\' => b'\\',
            b'"' => b'"',
            b'\'' => b'\'',
            b'x' => {
                let hex = text
                    .get(index + 2..index + 4)
                    .ok_or((index, "`\\x` needs two hex digits".to_string()))?;
                let value = u8::from_str_radix(hex, 16)
                    .map_err(|_| (index, format!("`\\x{hex}` is not a hex byte")))?;
                out.push(value);
                index += 4;
                continue;
            }
            other => return Err((index, format!("unknown escape `\\{}`", char::from(*other)))),
        };
        out.push(value);
        index += 2;
    }
    Ok(out)
}

/// Splits `span` of `line` at commas outside parentheses and quotes.
fn split_top_level(line: &str, span: Span) -> Vec<Span> {
    let bytes = line.as_bytes();
    let mut pieces = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut start = span.start;
    let mut index = span.start;
    while index < span.end {
        let byte = bytes[index];
        match quote {
            Some(q) => {
                if byte == b'\\' {
                    index += 1;
                } else if byte == q {
                    quote = None;
                }
            }
            None => match byte {
                b'"' | b'\'' => quote = Some(byte),
                b'(' => depth += 1,
                b')' => depth -= 1,
                b',' if depth == 0 => {
                    pieces.push(Span {
                        line: span.line,
                        start,
                        end: index,
                    });
                    start = index + 1;
                }
                _ => {}
            },
        }
        index += 1;
    }
    pieces.push(Span {
        line: span.line,
        start,
        end: span.end.max(start),
    });
    pieces
}

fn trim_span(line: &str, span: Span) -> Span {
    let bytes = line.as_bytes();
    let mut start = span.start.min(span.end);
    let mut end = span.end.min(bytes.len());
    while start < end && bytes[start].is_ascii_whitespace() {
        start += 1;
    }
    while end > start && bytes[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    Span {
        line: span.line,
        start,
        end,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asm(source: &str) -> Image {
        match assemble("test.dasm", source) {
            Ok(image) => image,
            Err(errors) => panic!("assembly failed:\n{errors}"),
        }
    }

    fn errors(source: &str) -> Vec<Diagnostic> {
        match assemble("bad.dasm", source) {
            Ok(_) => panic!("expected errors for:\n{source}"),
            Err(errors) => errors.diagnostics,
        }
    }

    #[test]
    fn assembles_the_worked_example() {
        let image = asm("add:se 0x100000100, 0x100000108, 0x200000008\n");
        assert_eq!(
            image.text(),
            &[
                0x00, 0x62, 0x49, 0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x01, 0x00,
                0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00
            ]
        );
    }

    #[test]
    fn labels_equ_and_arithmetic() {
        let image = asm(
            ".equ OUT, 0x100000208\nstart: mov $'H':ub, OUT:ue\nloop:\n  br:j,a $loop+0\n  br:j,r $start\n  exit:c\n",
        );
        let loaded = crate::image::validate(crate::image::Format::Flat, image).expect("valid");
        let (_, jump) = loaded.code[1];
        assert_eq!(
            jump.branch_target(abi::CODE_BASE + 13),
            Some(abi::CODE_BASE + 13)
        );
        let (offset, rel) = loaded.code[2];
        assert_eq!(
            rel.branch_target(abi::CODE_BASE + u64::from(offset)),
            Some(abi::CODE_BASE)
        );
        assert_eq!(loaded.image.symbols.len(), 2);
    }

    #[test]
    fn old_disa_branch_spelling_is_an_alias() {
        let canonical = asm("l: br:l,se,a 0x10, $5, $l\n");
        let old = asm("l: br:l:sq:a 0x10, $5, $l\n");
        assert_eq!(canonical.text(), old.text());
    }

    #[test]
    fn narrow_and_float_immediates() {
        let image = asm("add:sb $-1, $127, 0x10\nadd:fd $1.5, $0x3ff0000000000000, 0x10\nadd:fs $2, $0.5, 0x10\n");
        let loaded = crate::image::validate(crate::image::Format::Flat, image).expect("valid");
        assert_eq!(loaded.code[0].1.operands()[0], Operand::Imm(0xff));
        assert_eq!(
            loaded.code[1].1.operands()[0],
            Operand::Imm(1.5f64.to_bits())
        );
        assert_eq!(
            loaded.code[1].1.operands()[1],
            Operand::Imm(1.0f64.to_bits())
        );
        assert_eq!(
            loaded.code[2].1.operands()[0],
            Operand::Imm(u64::from(2.0f32.to_bits()))
        );
    }

    #[test]
    fn data_sections_and_directives() {
        let image = asm(
            "exit:c\n.data\ntable: .quad 1, table\n.align 16\nmsg: .ascii \"hi\\n\"\n.rodata\nk: .double 2.5\n.bss\nbuf: .zero 64\n",
        );
        let data = image.section(SectionKind::Data).expect("data");
        assert_eq!(
            data.addr,
            abi::CODE_BASE + 0x2000,
            "after .rodata, page aligned"
        );
        assert_eq!(&data.bytes[..8], &1u64.to_le_bytes());
        assert_eq!(&data.bytes[8..16], &data.addr.to_le_bytes());
        assert_eq!(&data.bytes[16..19], b"hi\n");
        let bss = image.section(SectionKind::Bss).expect("bss");
        assert_eq!(bss.len_bytes, 64);
    }

    #[test]
    fn errors_have_positions_and_all_are_reported() {
        let diags = errors("nop\n  ad:se 1, 2, 3\nadd:se 1, 2\nadd:zz 1, 2, 3\nadd:se $1, 2, $3\nbr:j,a $nowhere\n");
        let positions: Vec<(usize, usize)> = diags.iter().map(|d| (d.line, d.column)).collect();
        assert_eq!(positions[0], (2, 3), "{diags:?}");
        assert!(diags[0].message.contains("unknown instruction `ad`"));
        assert_eq!(diags[1].line, 3);
        assert!(diags[1].message.contains("takes 3 operands, found 2"));
        assert_eq!(diags[2].line, 4);
        assert!(diags[2].message.contains("unknown type `zz`"));
        assert_eq!(diags[3].line, 5);
        assert_eq!(diags[3].column, 15, "points at the immediate destination");
        // Pass 2 errors appear only when pass 1 is clean; the five above stop before it.
        assert_eq!(diags.len(), 4);
        let diags = errors("br:j,a $nowhre\nnowhere: exit:c\n");
        assert!(diags[0].message.contains("undefined name `nowhre`"));
        assert!(diags[0]
            .expected
            .as_deref()
            .unwrap_or("")
            .contains("nowhere"));
    }

    #[test]
    fn range_errors() {
        let diags = errors("add:sb $300, $1, 0x10\n");
        assert!(
            diags[0].message.contains("300 does not fit in 1 byte"),
            "{diags:?}"
        );
        let diags = errors("int 256\n");
        assert!(diags[0].message.contains("does not fit in a byte"));
        let diags = errors(".data\nnop\n");
        assert!(diags[0].message.contains("code must be in .text"));
        let diags = errors(".quad 1\n");
        assert!(diags[0].message.contains("not allowed in .text"));
        let diags = errors("strcmp 1, 2, 3, 4, 5\n");
        assert!(diags[0].message.contains("cannot be assembled"));
        let diags = errors("br:sl,se,a 1, 2, $3\n");
        assert!(diags[0].message.contains("not supported"));
    }

    #[test]
    fn dangling_minus_is_an_error_not_a_panic() {
        // Found by the assembler fuzz target: a unary minus with nothing after it.
        let diags = errors("add:se $-, 0x10, 0x18\n");
        assert!(
            diags[0].message.contains("expected a value after `-`"),
            "{diags:?}"
        );
        let diags = errors("br:j,a $n -\n");
        assert!(
            diags[0]
                .message
                .contains("expression ends with an operator"),
            "{diags:?}"
        );
    }

    #[test]
    fn error_display_is_readable() {
        let err = assemble("prog.dasm", "nop\nmul:se 0x10, 0x18\n").expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("--> prog.dasm:2:8"), "{text}");
        assert!(text.contains("2 | mul:se 0x10, 0x18"), "{text}");
        assert!(text.contains("1 error found"), "{text}");
    }

    #[test]
    fn error_limit_is_respected() {
        let source = "bogus\n".repeat(MAX_DIAGNOSTICS + 20);
        let err = assemble("many.dasm", &source).expect_err("fails");
        assert_eq!(err.diagnostics.len(), MAX_DIAGNOSTICS);
        assert!(err.truncated);
    }
}
