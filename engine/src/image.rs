//! DISA images: the in-memory model (`Image`), the two file formats (flat i0 and ELF64), and the
//! loader that turns untrusted bytes into a validated, pre-decoded program.
//!
//! Invariants of a `LoadedImage` (the loader checks them; the engine relies on them):
//! - `.text` starts at `CODE_BASE`, is non-empty, and decodes completely by linear sweep;
//! - the entry point is the address of a decoded instruction;
//! - every section lies inside the shared region and no two sections overlap;
//! - sizes are within `MAX_FLAT_IMAGE_BYTES` / `MAX_ELF_FILE_BYTES` / `MAX_MAPPED_BYTES`.

use crate::abi;
use crate::codec::{self, DecodeError, Instr};
use std::fmt;

/// Where code is loaded (ABI §7).
pub const CODE_BASE: u64 = abi::CODE_BASE;
/// The original toolchain's limit for a flat image.
pub const MAX_FLAT_IMAGE_BYTES: usize = 0x80000;
/// An ELF file larger than this is refused before parsing.
pub const MAX_ELF_FILE_BYTES: usize = 256 << 20;
/// Total bytes an image may map, `.bss` included.
pub const MAX_MAPPED_BYTES: u64 = 1 << 30;
/// ELF machine number of the DISA toolchain.
pub const EM_DISA: u16 = 231;
const PAGE_BYTES: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SectionKind {
    Text,
    Rodata,
    Data,
    Bss,
}

impl SectionKind {
    pub const ALL: [SectionKind; 4] = [
        SectionKind::Text,
        SectionKind::Rodata,
        SectionKind::Data,
        SectionKind::Bss,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            SectionKind::Text => ".text",
            SectionKind::Rodata => ".rodata",
            SectionKind::Data => ".data",
            SectionKind::Bss => ".bss",
        }
    }

    pub fn from_name(name: &str) -> Option<SectionKind> {
        SectionKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
    }

    /// Runners may not write `.text` and `.rodata`.
    pub const fn writable(self) -> bool {
        matches!(self, SectionKind::Data | SectionKind::Bss)
    }
}

/// One section. For `.bss`, `bytes` is empty and `len_bytes` is its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub len_bytes: u64,
}

impl Section {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len_bytes)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub addr: u64,
}

/// The instruction at `at` has an operand the source wrote as the label `name`. Kept where
/// the label shares its address with another one, so that reports and listings show the
/// name the source used there rather than one of its aliases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolUse {
    pub at: u64,
    pub name: String,
}

/// A program: sections, symbols, entry point. Produced by the assembler or by `load`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    pub sections: Vec<Section>,
    /// In address order; labels sharing an address in the order the source defined them.
    pub symbols: Vec<Symbol>,
    pub entry: u64,
    /// In ELF files, the non-allocated section `.dvm.uses`: (u64 address, u32 index into
    /// `.symtab`) records, little-endian. Loaders that do not know it skip it.
    pub uses: Vec<SymbolUse>,
}

impl Image {
    pub fn section(&self, kind: SectionKind) -> Option<&Section> {
        self.sections.iter().find(|section| section.kind == kind)
    }

    pub fn text(&self) -> &[u8] {
        self.section(SectionKind::Text)
            .map_or(&[], |section| section.bytes.as_slice())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Pure code loaded at `CODE_BASE`, entry at its first byte (the original toolchain's format).
    Flat,
    Elf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Flat => "flat",
            Format::Elf => "elf",
        }
    }
}

/// Why an image was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    Empty,
    TooLarge {
        format: Format,
        len_bytes: u64,
        limit_bytes: u64,
    },
    Elf(String),
    WrongMachine(u16),
    MissingText,
    UnsupportedSection {
        name: String,
    },
    DuplicateSection(SectionKind),
    SectionOutsideSharedRegion {
        kind: SectionKind,
        addr: u64,
        len_bytes: u64,
    },
    /// A section (part of it) lies where the runtime hands out or writes memory itself.
    SectionInReservedArea {
        kind: SectionKind,
        addr: u64,
        len_bytes: u64,
        area: &'static str,
        area_range: std::ops::Range<u64>,
    },
    TextNotAtCodeBase {
        addr: u64,
    },
    Overlap {
        first: SectionKind,
        second: SectionKind,
    },
    BadEntry {
        entry: u64,
    },
    Code(DecodeError),
    DataInFlat {
        kind: SectionKind,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Empty => f.write_str("image is empty"),
            LoadError::TooLarge { format, len_bytes, limit_bytes } => write!(
                f,
                "{} image is {len_bytes} bytes, more than the limit of {limit_bytes}",
                format.name()
            ),
            LoadError::Elf(msg) => write!(f, "malformed ELF image: {msg}"),
            LoadError::WrongMachine(machine) => write!(
                f,
                "ELF e_machine is {machine}, not {EM_DISA} (DISA): not a DISA image"
            ),
            LoadError::MissingText => f.write_str("image has no .text section (no code)"),
            LoadError::UnsupportedSection { name } => write!(
                f,
                "allocated section `{name}` is not one of .text .rodata .data .bss"
            ),
            LoadError::DuplicateSection(kind) => {
                write!(f, "section {} appears twice", kind.name())
            }
            LoadError::SectionOutsideSharedRegion { kind, addr, len_bytes } => write!(
                f,
                "section {} at {addr:#x} (+{len_bytes:#x}) is outside the shared region {:#x}..{:#x}",
                kind.name(),
                abi::SHARED_BASE,
                abi::SHARED_END
            ),
            LoadError::SectionInReservedArea {
                kind,
                addr,
                len_bytes,
                area,
                area_range,
            } => write!(
                f,
                "section {} at {addr:#x}..{:#x} lies in the {area} {:#x}..{:#x}, which the runtime \
                 reserves (docs/MEMORY-MODEL.md §1)",
                kind.name(),
                addr.saturating_add(*len_bytes),
                area_range.start,
                area_range.end
            ),
            LoadError::TextNotAtCodeBase { addr } => write!(
                f,
                ".text is at {addr:#x}; DISA code must be loaded at {CODE_BASE:#x}"
            ),
            LoadError::Overlap { first, second } => {
                write!(f, "sections {} and {} overlap", first.name(), second.name())
            }
            LoadError::BadEntry { entry } => write!(
                f,
                "entry point {entry:#x} is not the address of an instruction in .text"
            ),
            LoadError::Code(err) => write!(f, "bad code in .text {err}"),
            LoadError::DataInFlat { kind } => write!(
                f,
                "a flat image holds only code, but this program has a non-empty {} section \
                 (use the ELF format)",
                kind.name()
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// A validated program with its code decoded once.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    pub format: Format,
    pub image: Image,
    /// `(offset from CODE_BASE, instruction)`, in address order.
    pub code: Vec<(u32, Instr)>,
}

impl LoadedImage {
    pub fn code_len_bytes(&self) -> u64 {
        self.image.text().len() as u64
    }

    /// The instruction at an address, if one starts exactly there.
    pub fn instr_at(&self, addr: u64) -> Option<&Instr> {
        let offset = u32::try_from(addr.checked_sub(CODE_BASE)?).ok()?;
        let index = self
            .code
            .binary_search_by_key(&offset, |(at, _)| *at)
            .ok()?;
        Some(&self.code[index].1)
    }

    /// The label to show for `addr` in the instruction at `at` (`None`: not in an operand),
    /// for reports and listings. Labels may share an address (`a:` and `b:` on one
    /// instruction); the rule that picks one:
    /// 1. the label the source wrote in that instruction's operand, when it is one at `addr`
    ///    (the assembler keeps these, `Image::uses`, and ELF images carry them); `nth` counts
    ///    the instruction's operands that name `addr` before this one, so that `newr $a, $b`
    ///    with `a:` and `b:` on one word names each operand as written;
    /// 2. otherwise the one defined last, i.e. the label written next to the instruction or
    ///    data it names (`a:`, `b:`, then the instruction: `b`). The image keeps labels at one
    ///    address in the order the source defined them, which is what tells.
    pub fn label_for(&self, at: Option<u64>, addr: u64, nth: usize) -> Option<&str> {
        let symbols = &self.image.symbols;
        let defined_here = |name: &str| {
            symbols
                .iter()
                .any(|symbol| symbol.addr == addr && symbol.name == name)
        };
        at.and_then(|at| {
            let mut here = self
                .image
                .uses
                .iter()
                .filter(|used| used.at == at && defined_here(&used.name));
            let first = here.clone().next();
            here.nth(nth).or(first)
        })
        .map(|used| used.name.as_str())
        .or_else(|| {
            symbols
                .iter()
                .rev()
                .find(|symbol| symbol.addr == addr)
                .map(|symbol| symbol.name.as_str())
        })
    }

    /// The nearest symbol at or before `addr`, for reports ("main+0x10"); of labels sharing
    /// that address, the one defined last (rule 2 of `label_for`).
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let symbol = self
            .image
            .symbols
            .iter()
            .filter(|symbol| symbol.addr <= addr)
            // `max_by_key` returns the last of equal keys: the label defined last.
            .max_by_key(|symbol| symbol.addr)?;
        let delta = addr - symbol.addr;
        Some(if delta == 0 {
            symbol.name.clone()
        } else {
            format!("{}+{delta:#x}", symbol.name)
        })
    }
}

/// Detects the format and loads.
pub fn load(bytes: &[u8]) -> Result<LoadedImage, LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::Empty);
    }
    if bytes.starts_with(b"\x7fELF") {
        let image = read_elf(bytes)?;
        validate(Format::Elf, image)
    } else {
        validate(Format::Flat, read_flat(bytes)?)
    }
}

/// Validates an in-memory image (the assembler's output goes through here too).
pub fn validate(format: Format, image: Image) -> Result<LoadedImage, LoadError> {
    let mut seen = Vec::new();
    let mut mapped_bytes: u64 = 0;
    for section in &image.sections {
        if seen.contains(&section.kind) {
            return Err(LoadError::DuplicateSection(section.kind));
        }
        seen.push(section.kind);
        let inside = section.addr >= abi::SHARED_BASE
            && section
                .addr
                .checked_add(section.len_bytes)
                .is_some_and(|end| end <= abi::SHARED_END);
        if !inside {
            return Err(LoadError::SectionOutsideSharedRegion {
                kind: section.kind,
                addr: section.addr,
                len_bytes: section.len_bytes,
            });
        }
        if let Some((area, _)) =
            abi::first_reserved_overlap(&abi::RESERVED_AREAS, section.addr, section.end())
        {
            // Sections live in space 0, so the area's offsets are its addresses.
            return Err(LoadError::SectionInReservedArea {
                kind: section.kind,
                addr: section.addr,
                len_bytes: section.len_bytes,
                area: area.name,
                area_range: area.offsets.clone(),
            });
        }
        mapped_bytes = mapped_bytes.saturating_add(section.len_bytes);
    }
    if mapped_bytes > MAX_MAPPED_BYTES {
        return Err(LoadError::TooLarge {
            format,
            len_bytes: mapped_bytes,
            limit_bytes: MAX_MAPPED_BYTES,
        });
    }
    for (index, first) in image.sections.iter().enumerate() {
        for second in &image.sections[index + 1..] {
            let disjoint = first.len_bytes == 0
                || second.len_bytes == 0
                || first.end() <= second.addr
                || second.end() <= first.addr;
            if !disjoint {
                return Err(LoadError::Overlap {
                    first: first.kind,
                    second: second.kind,
                });
            }
        }
    }
    let text = image
        .section(SectionKind::Text)
        .filter(|text| !text.bytes.is_empty())
        .ok_or(LoadError::MissingText)?;
    if text.addr != CODE_BASE {
        return Err(LoadError::TextNotAtCodeBase { addr: text.addr });
    }
    if format == Format::Flat {
        if let Some(section) = image
            .sections
            .iter()
            .find(|section| section.kind != SectionKind::Text && section.len_bytes > 0)
        {
            return Err(LoadError::DataInFlat { kind: section.kind });
        }
        if text.bytes.len() > MAX_FLAT_IMAGE_BYTES {
            return Err(LoadError::TooLarge {
                format,
                len_bytes: text.bytes.len() as u64,
                limit_bytes: MAX_FLAT_IMAGE_BYTES as u64,
            });
        }
    }
    let code = codec::decode_all(&text.bytes).map_err(LoadError::Code)?;
    let loaded = LoadedImage {
        format,
        image,
        code,
    };
    if loaded.instr_at(loaded.image.entry).is_none() {
        return Err(LoadError::BadEntry {
            entry: loaded.image.entry,
        });
    }
    Ok(loaded)
}

fn read_flat(bytes: &[u8]) -> Result<Image, LoadError> {
    if bytes.len() > MAX_FLAT_IMAGE_BYTES {
        return Err(LoadError::TooLarge {
            format: Format::Flat,
            len_bytes: bytes.len() as u64,
            limit_bytes: MAX_FLAT_IMAGE_BYTES as u64,
        });
    }
    Ok(Image {
        sections: vec![Section {
            kind: SectionKind::Text,
            addr: CODE_BASE,
            bytes: bytes.to_vec(),
            len_bytes: bytes.len() as u64,
        }],
        symbols: Vec::new(),
        entry: CODE_BASE,
        uses: Vec::new(),
    })
}

/// Writes an image in the given format. Flat images may hold only `.text`.
pub fn write(image: &Image, format: Format) -> Result<Vec<u8>, LoadError> {
    match format {
        Format::Flat => {
            if let Some(section) = image
                .sections
                .iter()
                .find(|section| section.kind != SectionKind::Text && section.len_bytes > 0)
            {
                return Err(LoadError::DataInFlat { kind: section.kind });
            }
            if image.entry != CODE_BASE {
                return Err(LoadError::BadEntry { entry: image.entry });
            }
            Ok(image.text().to_vec())
        }
        Format::Elf => Ok(write_elf(image)),
    }
}

// ---- ELF64 ------------------------------------------------------------------------------------
//
// Written by hand (the format is small and this keeps every byte deliberate); read with the
// `object` crate, which is hardened against malformed input. Layout of a written file:
// ELF header, program headers (one PT_LOAD per non-empty section), section contents at file
// offsets congruent to their addresses modulo the page size, then .symtab, .strtab, .shstrtab
// and the section header table.

const ELF_HEADER_BYTES: u64 = 64;
const PROGRAM_HEADER_BYTES: u64 = 56;
const SECTION_HEADER_BYTES: u64 = 64;
const SYMBOL_BYTES: u64 = 24;
/// `.dvm.uses` (see `Image::uses`).
const USES_SECTION: &str = ".dvm.uses";
const USE_BYTES: u64 = 12;

const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const SHT_NOBITS: u32 = 8;
const SHF_WRITE: u64 = 1;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
const STB_GLOBAL: u8 = 1;
const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;
const STT_OBJECT: u8 = 1;

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }
    fn u16(&mut self, value: u16) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn pad_to(&mut self, offset: u64) {
        let offset = offset as usize;
        if self.0.len() < offset {
            self.0.resize(offset, 0);
        }
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

fn write_elf(image: &Image) -> Vec<u8> {
    let sections: Vec<&Section> = SectionKind::ALL
        .iter()
        .filter_map(|kind| image.section(*kind))
        .filter(|section| section.len_bytes > 0)
        .collect();
    let program_headers = sections.len() as u64;

    // String tables.
    let mut shstrtab = vec![0u8];
    let name_offset = |table: &mut Vec<u8>, name: &str| -> u32 {
        let offset = table.len() as u32;
        table.extend_from_slice(name.as_bytes());
        table.push(0);
        offset
    };
    let section_names: Vec<u32> = sections
        .iter()
        .map(|section| name_offset(&mut shstrtab, section.kind.name()))
        .collect();
    let symtab_name = name_offset(&mut shstrtab, ".symtab");
    let strtab_name = name_offset(&mut shstrtab, ".strtab");
    // Uses name their label by its `.symtab` index (the first symbol of that name).
    let mut uses = Vec::with_capacity(image.uses.len() * USE_BYTES as usize);
    for used in &image.uses {
        if let Some(index) = image.symbols.iter().position(|s| s.name == used.name) {
            uses.extend_from_slice(&used.at.to_le_bytes());
            uses.extend_from_slice(&(index as u32 + 1).to_le_bytes());
        }
    }
    let uses_name = (!uses.is_empty()).then(|| name_offset(&mut shstrtab, USES_SECTION));
    let shstrtab_name = name_offset(&mut shstrtab, ".shstrtab");
    let mut strtab = vec![0u8];
    let symbol_names: Vec<u32> = image
        .symbols
        .iter()
        .map(|symbol| name_offset(&mut strtab, &symbol.name))
        .collect();

    // File layout.
    let mut offset = ELF_HEADER_BYTES + program_headers * PROGRAM_HEADER_BYTES;
    let mut section_offsets = Vec::new();
    for section in &sections {
        if section.kind == SectionKind::Bss {
            section_offsets.push(offset);
            continue;
        }
        let target = align_up(offset, PAGE_BYTES) + section.addr % PAGE_BYTES;
        let target = if target < offset {
            target + PAGE_BYTES
        } else {
            target
        };
        section_offsets.push(target);
        offset = target + section.bytes.len() as u64;
    }
    let symtab_offset = align_up(offset, 8);
    let symbol_count = 1 + image.symbols.len() as u64;
    let strtab_offset = symtab_offset + symbol_count * SYMBOL_BYTES;
    let uses_offset = strtab_offset + strtab.len() as u64;
    let shstrtab_offset = uses_offset + uses.len() as u64;
    let section_headers_offset = align_up(shstrtab_offset + shstrtab.len() as u64, 8);
    // Section header indexes: 0 null, then the sections, then symtab, strtab, .dvm.uses if
    // any, shstrtab.
    let symtab_index = 1 + sections.len() as u16;
    let section_count = symtab_index + 3 + u16::from(uses_name.is_some());

    let mut out = Out(Vec::new());
    // ELF header.
    out.0.extend_from_slice(b"\x7fELF");
    out.u8(2); // 64-bit
    out.u8(1); // little-endian
    out.u8(1); // version
    out.u8(0); // System V ABI
    out.0.extend_from_slice(&[0; 8]);
    out.u16(2); // ET_EXEC
    out.u16(EM_DISA);
    out.u32(1);
    out.u64(image.entry);
    out.u64(if program_headers > 0 {
        ELF_HEADER_BYTES
    } else {
        0
    });
    out.u64(section_headers_offset);
    out.u32(0); // flags
    out.u16(ELF_HEADER_BYTES as u16);
    out.u16(PROGRAM_HEADER_BYTES as u16);
    out.u16(program_headers as u16);
    out.u16(SECTION_HEADER_BYTES as u16);
    out.u16(section_count);
    out.u16(section_count - 1); // .shstrtab is last

    for (section, file_offset) in sections.iter().zip(&section_offsets) {
        let flags = match section.kind {
            SectionKind::Text => PF_R | PF_X,
            SectionKind::Rodata => PF_R,
            SectionKind::Data | SectionKind::Bss => PF_R | PF_W,
        };
        out.u32(PT_LOAD);
        out.u32(flags);
        out.u64(*file_offset);
        out.u64(section.addr);
        out.u64(section.addr);
        out.u64(section.bytes.len() as u64);
        out.u64(section.len_bytes);
        out.u64(PAGE_BYTES);
    }
    for (section, file_offset) in sections.iter().zip(&section_offsets) {
        if section.kind != SectionKind::Bss {
            out.pad_to(*file_offset);
            out.0.extend_from_slice(&section.bytes);
        }
    }
    out.pad_to(symtab_offset);
    out.0.extend_from_slice(&[0; SYMBOL_BYTES as usize]);
    for (symbol, name) in image.symbols.iter().zip(&symbol_names) {
        let section_index = sections
            .iter()
            .position(|section| {
                section.addr <= symbol.addr && symbol.addr < section.end().max(section.addr + 1)
            })
            .map_or(0xfff1 /* SHN_ABS */, |index| index as u16 + 1);
        let kind = match sections.get(usize::from(section_index).wrapping_sub(1)) {
            Some(section) if section.kind == SectionKind::Text => STT_FUNC,
            Some(_) => STT_OBJECT,
            None => STT_NOTYPE,
        };
        out.u32(*name);
        out.u8((STB_GLOBAL << 4) | kind);
        out.u8(0);
        out.u16(section_index);
        out.u64(symbol.addr);
        out.u64(0);
    }
    out.0.extend_from_slice(&strtab);
    out.0.extend_from_slice(&uses);
    out.0.extend_from_slice(&shstrtab);
    out.pad_to(section_headers_offset);

    let section_header =
        |out: &mut Out, fields: (u32, u32, u64, u64, u64, u64, u32, u32, u64, u64)| {
            let (name, kind, flags, addr, file_offset, size, link, info, align, entsize) = fields;
            out.u32(name);
            out.u32(kind);
            out.u64(flags);
            out.u64(addr);
            out.u64(file_offset);
            out.u64(size);
            out.u32(link);
            out.u32(info);
            out.u64(align);
            out.u64(entsize);
        };
    section_header(&mut out, (0, 0, 0, 0, 0, 0, 0, 0, 0, 0));
    for ((section, file_offset), name) in sections.iter().zip(&section_offsets).zip(&section_names)
    {
        let (kind, flags) = match section.kind {
            SectionKind::Text => (SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR),
            SectionKind::Rodata => (SHT_PROGBITS, SHF_ALLOC),
            SectionKind::Data => (SHT_PROGBITS, SHF_ALLOC | SHF_WRITE),
            SectionKind::Bss => (SHT_NOBITS, SHF_ALLOC | SHF_WRITE),
        };
        section_header(
            &mut out,
            (
                *name,
                kind,
                flags,
                section.addr,
                *file_offset,
                section.len_bytes,
                0,
                0,
                1,
                0,
            ),
        );
    }
    section_header(
        &mut out,
        (
            symtab_name,
            SHT_SYMTAB,
            0,
            0,
            symtab_offset,
            symbol_count * SYMBOL_BYTES,
            u32::from(symtab_index) + 1,
            1, // index of the first global symbol
            8,
            SYMBOL_BYTES,
        ),
    );
    section_header(
        &mut out,
        (
            strtab_name,
            SHT_STRTAB,
            0,
            0,
            strtab_offset,
            strtab.len() as u64,
            0,
            0,
            1,
            0,
        ),
    );
    if let Some(uses_name) = uses_name {
        section_header(
            &mut out,
            (
                uses_name,
                SHT_PROGBITS,
                0,
                0,
                uses_offset,
                uses.len() as u64,
                0,
                0,
                1,
                USE_BYTES,
            ),
        );
    }
    section_header(
        &mut out,
        (
            shstrtab_name,
            SHT_STRTAB,
            0,
            0,
            shstrtab_offset,
            shstrtab.len() as u64,
            0,
            0,
            1,
            0,
        ),
    );
    debug_assert_eq!(
        out.len(),
        section_headers_offset + u64::from(section_count) * SECTION_HEADER_BYTES
    );
    out.0
}

fn read_elf(bytes: &[u8]) -> Result<Image, LoadError> {
    use object::read::elf::{ElfFile64, FileHeader};
    use object::{Object, ObjectSection, ObjectSymbol};

    if bytes.len() > MAX_ELF_FILE_BYTES {
        return Err(LoadError::TooLarge {
            format: Format::Elf,
            len_bytes: bytes.len() as u64,
            limit_bytes: MAX_ELF_FILE_BYTES as u64,
        });
    }
    let file = ElfFile64::<object::Endianness>::parse(bytes)
        .map_err(|err| LoadError::Elf(err.to_string()))?;
    let machine = file.elf_header().e_machine(file.endian());
    if machine != EM_DISA {
        return Err(LoadError::WrongMachine(machine));
    }
    let mut image = Image {
        entry: file.entry(),
        ..Image::default()
    };
    let mut uses = None;
    for section in file.sections() {
        let name = section
            .name()
            .map_err(|err| LoadError::Elf(err.to_string()))?;
        let allocated = match section.flags() {
            object::SectionFlags::Elf { sh_flags } => sh_flags & SHF_ALLOC != 0,
            _ => false,
        };
        if name == USES_SECTION && !allocated {
            uses = Some(
                section
                    .data()
                    .map_err(|err| LoadError::Elf(format!("{name}: {err}")))?,
            );
            continue;
        }
        let Some(kind) = SectionKind::from_name(name) else {
            if allocated {
                return Err(LoadError::UnsupportedSection {
                    name: name.to_string(),
                });
            }
            continue;
        };
        let len_bytes = section.size();
        let bytes = if kind == SectionKind::Bss {
            Vec::new()
        } else {
            let data = section
                .data()
                .map_err(|err| LoadError::Elf(format!("{name}: {err}")))?;
            if data.len() as u64 != len_bytes {
                return Err(LoadError::Elf(format!(
                    "{name}: header says {len_bytes} bytes, file holds {}",
                    data.len()
                )));
            }
            data.to_vec()
        };
        image.sections.push(Section {
            kind,
            addr: section.address(),
            bytes,
            len_bytes,
        });
    }
    let mut names = std::collections::HashMap::new();
    for symbol in file.symbols() {
        let Ok(name) = symbol.name() else { continue };
        if name.is_empty() || symbol.kind() == object::SymbolKind::Section {
            continue;
        }
        names.insert(symbol.index().0, name);
        image.symbols.push(Symbol {
            name: name.to_string(),
            addr: symbol.address(),
        });
    }
    if let Some(data) = uses {
        let records = data.chunks(USE_BYTES as usize);
        for (index, record) in records.enumerate() {
            let bad = |what: &str| {
                LoadError::Elf(format!(
                    "{USES_SECTION}: record {index} (byte {}) {what}",
                    index as u64 * USE_BYTES
                ))
            };
            let (Some(at), Some(symbol)) = (record.get(..8), record.get(8..12)) else {
                return Err(bad("is truncated"));
            };
            let mut word = [0u8; 8];
            word.copy_from_slice(at);
            let mut symbol_index = [0u8; 4];
            symbol_index.copy_from_slice(symbol);
            let symbol_index = u32::from_le_bytes(symbol_index) as usize;
            let name = names.get(&symbol_index).ok_or_else(|| {
                bad(&format!(
                    "names symbol {symbol_index}, which is not in .symtab"
                ))
            })?;
            image.uses.push(SymbolUse {
                at: u64::from_le_bytes(word),
                name: name.to_string(),
            });
        }
    }
    image.sections.sort_by_key(|section| section.kind);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_image() -> Image {
        Image {
            sections: vec![
                Section {
                    kind: SectionKind::Text,
                    addr: CODE_BASE,
                    bytes: vec![0x00, 0x00, 0x10, 0xc0],
                    len_bytes: 4,
                },
                Section {
                    kind: SectionKind::Data,
                    addr: CODE_BASE + 0x1000,
                    bytes: vec![1, 2, 3],
                    len_bytes: 3,
                },
                Section {
                    kind: SectionKind::Bss,
                    addr: CODE_BASE + 0x2000,
                    bytes: vec![],
                    len_bytes: 0x100,
                },
            ],
            symbols: vec![
                Symbol {
                    name: "start".into(),
                    addr: CODE_BASE,
                },
                Symbol {
                    name: "table".into(),
                    addr: CODE_BASE + 0x1000,
                },
            ],
            entry: CODE_BASE + 2,
            uses: Vec::new(),
        }
    }

    #[test]
    fn elf_round_trips() {
        let image = tiny_image();
        let bytes = write(&image, Format::Elf).expect("writes");
        let loaded = load(&bytes).expect("loads");
        assert_eq!(loaded.format, Format::Elf);
        assert_eq!(loaded.image, image);
        assert_eq!(loaded.code.len(), 2);
    }

    #[test]
    fn flat_refuses_data_and_loads_code() {
        let image = tiny_image();
        assert_eq!(
            write(&image, Format::Flat),
            Err(LoadError::DataInFlat {
                kind: SectionKind::Data
            })
        );
        let loaded = load(&[0x10, 0xc0]).expect("exit:c loads");
        assert_eq!(loaded.image.entry, CODE_BASE);
    }

    #[test]
    fn loader_rejects_bad_images() {
        assert_eq!(load(&[]).err(), Some(LoadError::Empty));
        // exit:c followed by a truncated add.
        assert!(
            matches!(load(&[0x10, 0xc0, 0x00, 0x62]), Err(LoadError::Code(err)) if err.offset == 2)
        );
        let mut overlapping = tiny_image();
        overlapping.sections[1].addr = CODE_BASE + 2;
        assert!(matches!(
            validate(Format::Elf, overlapping),
            Err(LoadError::Overlap { .. })
        ));
        let mut outside = tiny_image();
        outside.sections[2].addr = 0x1000;
        assert!(matches!(
            validate(Format::Elf, outside),
            Err(LoadError::SectionOutsideSharedRegion { .. })
        ));
        let mut bad_entry = tiny_image();
        bad_entry.entry = CODE_BASE + 1;
        assert!(matches!(
            validate(Format::Elf, bad_entry),
            Err(LoadError::BadEntry { .. })
        ));
        let big = vec![0u8; MAX_FLAT_IMAGE_BYTES + 2];
        assert!(matches!(load(&big), Err(LoadError::TooLarge { .. })));
    }

    #[test]
    fn sections_in_reserved_areas_are_refused_by_name_and_range() {
        for area in &abi::RESERVED_AREAS {
            // .data at the area's start; .bss from just inside its end to past it.
            let mut data = tiny_image();
            data.sections[1].addr = area.offsets.start;
            let err = validate(Format::Elf, data.clone()).expect_err("data in a reserved area");
            assert_eq!(
                err,
                LoadError::SectionInReservedArea {
                    kind: SectionKind::Data,
                    addr: area.offsets.start,
                    len_bytes: 3,
                    area: area.name,
                    area_range: area.offsets.clone(),
                }
            );
            let text = err.to_string();
            assert!(
                text.contains(".data")
                    && text.contains(area.name)
                    && text.contains(&format!(
                        "{:#x}..{:#x}",
                        area.offsets.start,
                        area.offsets.start + 3
                    )),
                "{text}"
            );
            let mut bss = tiny_image();
            bss.sections[2].addr = area.offsets.end - 0x80;
            assert!(matches!(
                validate(Format::Elf, bss),
                Err(LoadError::SectionInReservedArea { kind: SectionKind::Bss, area: name, .. })
                    if name == area.name
            ));
            // An ELF file placing a section there is refused when it is loaded.
            let bytes = write(&data, Format::Elf).expect("writes");
            assert!(matches!(
                load(&bytes),
                Err(LoadError::SectionInReservedArea {
                    kind: SectionKind::Data,
                    ..
                })
            ));
        }
        // Right next to the areas (heap and stacks are adjacent) is free.
        for free in [
            abi::HEAP_AREA.start - 3,
            abi::STACK_AREA.end,
            abi::EXIT_RECORD_BASE - 3,
            abi::EXIT_RECORD_END,
        ] {
            let mut image = tiny_image();
            image.sections[1].addr = free;
            assert!(validate(Format::Elf, image).is_ok(), "{free:#x}");
        }
    }

    #[test]
    fn shared_labels_are_shown_as_the_source_used_them() {
        let source = "main:\n    br:j,a $b\n    mov $q:ue, 0x200000000:ue\n    exit:c\n\
                      a:\nb:\n    exit:a\n    br:j,a $a\n\
                      .data\np:\nq:\n    .quad 1\n";
        let image = crate::asm::assemble("labels.dasm", source).expect("assembles");
        let loaded = validate(Format::Elf, image).expect("valid");
        let addr = |name: &str| {
            loaded
                .image
                .symbols
                .iter()
                .find(|symbol| symbol.name == name)
                .map(|symbol| symbol.addr)
                .expect("defined")
        };
        let instr = |index: usize| CODE_BASE + u64::from(loaded.code[index].0);
        let (jump_to_b, load_q, jump_to_a) = (instr(0), instr(1), instr(4));
        assert_eq!(addr("a"), addr("b"));
        // Only ambiguous names are kept: `main` is alone at its address.
        assert_eq!(
            loaded.image.uses,
            vec![
                SymbolUse {
                    at: jump_to_b,
                    name: "b".into()
                },
                SymbolUse {
                    at: load_q,
                    name: "q".into()
                },
                SymbolUse {
                    at: jump_to_a,
                    name: "a".into()
                },
            ]
        );
        for loaded in [
            loaded.clone(),
            load(&write(&loaded.image, Format::Elf).expect("writes")).expect("loads"),
        ] {
            // Rule 1: what the operand said.
            assert_eq!(loaded.label_for(Some(jump_to_b), addr("b"), 0), Some("b"));
            assert_eq!(loaded.label_for(Some(jump_to_a), addr("a"), 0), Some("a"));
            assert_eq!(loaded.label_for(Some(load_q), addr("q"), 0), Some("q"));
            // Rule 2: elsewhere, the label defined last (next to what it labels).
            assert_eq!(loaded.label_for(None, addr("a"), 0), Some("b"));
            assert_eq!(loaded.label_for(Some(load_q), addr("a"), 0), Some("b"));
            assert_eq!(loaded.label_for(None, addr("p"), 0), Some("q"));
            assert_eq!(loaded.symbolize(addr("a")).as_deref(), Some("b"));
            let listing = crate::disasm::disassemble(&loaded);
            assert!(
                listing.contains("br:j,a $b") && listing.contains("br:j,a $a"),
                "{listing}"
            );
            assert!(listing.contains("mov $q:ue"), "{listing}");
            // The listing reassembles to the same image, the names used included.
            let again = crate::asm::assemble("listing.dasm", &listing).expect("reassembles");
            assert_eq!(again.uses, loaded.image.uses);
            assert_eq!(
                write(&again, Format::Elf).expect("writes"),
                write(&loaded.image, Format::Elf).expect("writes")
            );
        }
        // Defined the other way round, the fallback follows the source order.
        let swapped = source.replace("a:\nb:", "b:\na:");
        let loaded = validate(
            Format::Elf,
            crate::asm::assemble("swapped.dasm", &swapped).expect("assembles"),
        )
        .expect("valid");
        assert_eq!(loaded.label_for(None, addr("a"), 0), Some("a"));
        assert_eq!(loaded.label_for(Some(jump_to_b), addr("a"), 0), Some("b"));
    }

    /// Found by fuzzing: two operands of one instruction naming one word through two labels.
    #[test]
    fn each_operand_keeps_its_label_through_a_listing() {
        let source = "main:\n    newr $s, $u, $w, $f\n    exit:c\n.data\ns: .quad 0, 0\nu: .quad 0\nw:\nf: .quad main\n";
        let loaded = validate(
            Format::Elf,
            crate::asm::assemble("two-names.dasm", source).expect("assembles"),
        )
        .expect("valid");
        let listing = crate::disasm::disassemble(&loaded);
        assert!(listing.contains("newr $s, $u, $w, $f"), "{listing}");
        let again = crate::asm::assemble("listing.dasm", &listing).expect("reassembles");
        assert_eq!(
            write(&again, Format::Elf).expect("writes"),
            write(&loaded.image, Format::Elf).expect("writes")
        );
        let pc = CODE_BASE;
        let f = loaded
            .image
            .symbols
            .iter()
            .find(|symbol| symbol.name == "f")
            .map(|symbol| symbol.addr)
            .expect("f");
        assert_eq!(loaded.label_for(Some(pc), f, 0), Some("w"));
        assert_eq!(loaded.label_for(Some(pc), f, 1), Some("f"));
    }

    #[test]
    fn malformed_symbol_uses_are_refused() {
        let mut image = tiny_image();
        image.symbols.push(Symbol {
            name: "also_start".into(),
            addr: CODE_BASE,
        });
        image.uses.push(SymbolUse {
            at: CODE_BASE + 2,
            name: "also_start".into(),
        });
        let bytes = write(&image, Format::Elf).expect("writes");
        assert_eq!(load(&bytes).expect("loads").image, image);
        // Point the one record at symbol 99.
        let record = bytes
            .windows(12)
            .position(|window| {
                window[..8] == (CODE_BASE + 2).to_le_bytes() && window[8..] == 3u32.to_le_bytes()
            })
            .expect("the record is in the file");
        let mut bad = bytes.clone();
        bad[record + 8..record + 12].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(load(&bad), Err(LoadError::Elf(text)) if text.contains(".dvm.uses")));
        for len in 0..bytes.len() {
            let _ = load(&bytes[..len]);
        }
    }

    #[test]
    fn elf_with_wrong_machine_is_refused() {
        let mut bytes = write(&tiny_image(), Format::Elf).expect("writes");
        bytes[18] = 62; // x86-64
        assert_eq!(load(&bytes).err(), Some(LoadError::WrongMachine(62)));
    }

    #[test]
    fn truncated_elf_never_panics() {
        let bytes = write(&tiny_image(), Format::Elf).expect("writes");
        for len in 0..bytes.len() {
            let _ = load(&bytes[..len]);
        }
    }
}
