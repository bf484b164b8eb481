//! The JIT per instruction: every operation at every type, every addressing mode, every
//! conversion and every branch condition, on edge values (zero, one, -1, MIN, MAX, widths'
//! boundaries, NaN, infinities, negative zero, values that saturate), compiled and
//! interpreted; then each kind of fault and hand-back from inside a compiled loop. Each
//! program runs its instructions in a loop (so they run compiled from the second iteration on)
//! and prints every data word at the end.

mod common;

use dvm_engine::isa::Ty;
use std::fmt::Write as _;

const DATA: u64 = 0x60_0000_0000;
const PTR: u64 = 0x2_0000_0000;
const COUNT: u64 = 0x2_0000_0008;
const SCRATCH: u64 = 0x2_0000_0100;

const EDGES: [u64; 16] = [
    0,
    1,
    u64::MAX,
    i64::MIN as u64,
    i64::MAX as u64,
    0x7f,
    0x80,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x4000_0000_0000_0000,         // 2.0
    0xfff0_0000_0000_0000,         // -inf
    0x7ff8_0000_0000_0001,         // NaN with a payload
    0x8000_0000_0000_0000 | 0x3ff, // a negative subnormal
    0x43e0_0000_0000_0000,         // 2^63: saturates to i64
];

const F32_EDGES: [u32; 6] = [
    0x3fc0_0000,
    0xbf80_0000,
    0x7f80_0000,
    0x7fc0_0001,
    0x8000_0000,
    0x4f00_0000,
];

/// A program that sets the data words, then runs `body` `iterations` times and prints every
/// data word (`words` of them).
fn looped(values: &[u64], body: &str, iterations: u64) -> String {
    let mut out = String::from("main:\n");
    for (k, value) in values.iter().enumerate() {
        let _ = writeln!(out, "    mov ${value:#x}:ue, {:#x}:ue", DATA + 8 * k as u64);
    }
    let _ = writeln!(out, "    mov ${DATA:#x}:ue, {PTR:#x}:ue");
    let _ = writeln!(out, "    mov ${iterations}:ue, {COUNT:#x}:ue");
    let _ = writeln!(out, ".Lloop:\n{body}");
    let _ = writeln!(out, "    sub:ue {COUNT:#x}, $1, {COUNT:#x}");
    let _ = writeln!(out, "    br:nz,ue,a {COUNT:#x}, $.Lloop");
    common::print_words_and_exit(&mut out, (0..values.len() as u64 + 8).map(|k| DATA + 8 * k));
    out
}

/// The data values: the edges, and the `f32` edges in the low half of a word.
fn values() -> Vec<u64> {
    EDGES
        .iter()
        .copied()
        .chain(F32_EDGES.iter().map(|bits| u64::from(*bits)))
        .collect()
}

/// Operand `k` of the data words in one of the four addressing modes (immediates hold the
/// word's value at `ty`'s width).
fn operand(values: &[u64], k: usize, mode: usize, ty: Ty) -> String {
    let addr = DATA + 8 * k as u64;
    let mask = u64::MAX >> (64 - 8 * ty.size_bytes());
    match mode % 4 {
        0 => format!("${:#x}", values[k] & mask),
        1 => format!("{addr:#x}"),
        2 if k == 0 => format!("({PTR:#x})"),
        _ => format!("{}({PTR:#x})", 8 * k),
    }
}

/// Destination: a scratch word past the data (direct, or through the pointer).
fn destination(slot: usize, mode: usize) -> String {
    let offset = 8 * (EDGES.len() + F32_EDGES.len() + slot % 8);
    if mode % 2 == 0 {
        format!("{:#x}", DATA + offset as u64)
    } else {
        format!("{offset}({PTR:#x})")
    }
}

/// Compares the runs; `compiled`: the loop's first instruction is one the JIT compiles.
fn check(source: &str, compiled: bool) {
    let (observed, stats) = common::same_with_jit(source, u64::MAX, 1);
    assert_eq!(
        observed.faulted, 0,
        "no fault expected:\n{}\n{source}",
        observed.stderr
    );
    if compiled {
        assert!(stats.regions > 0, "the loop was compiled:\n{source}");
        assert!(
            stats.native_instructions > 0,
            "the loop ran natively:\n{source}"
        );
    }
}

#[test]
fn arithmetic_at_every_type_and_mode() {
    let values = values();
    let n = values.len();
    for op in [
        "add", "sub", "mul", "div", "and", "or", "xor", "rem", "shl", "shr",
    ] {
        for ty in Ty::ALL {
            if ty.is_float() && !matches!(op, "add" | "sub" | "mul" | "div") {
                continue;
            }
            let mut body = String::new();
            let mut slot = 0;
            for a in 0..n {
                for b in [(a * 7 + 3) % n, (a * 5 + 1) % n, a] {
                    if matches!(op, "div" | "rem") && !ty.is_float() {
                        // Zero divisors and MIN / -1 fault: `faults_match` covers them.
                        let mask = u64::MAX >> (64 - 8 * ty.size_bytes());
                        let (x, y) = (values[a] & mask, values[b] & mask);
                        let min = 1u64 << (8 * ty.size_bytes() - 1);
                        if y == 0 || (ty.is_signed() && x == min && y == mask) {
                            continue;
                        }
                    }
                    let _ = writeln!(
                        body,
                        "    {op}:{} {}, {}, {}",
                        ty.suffix(),
                        operand(&values, a, slot, ty),
                        operand(&values, b, slot / 4 + 1, ty),
                        destination(slot, slot / 2)
                    );
                    slot += 1;
                }
            }
            check(&looped(&values, &body, 2), true);
        }
    }
}

#[test]
fn every_conversion() {
    let values = values();
    for from in Ty::ALL {
        for to in Ty::ALL {
            let mut body = String::new();
            for (k, _) in values.iter().enumerate() {
                let _ = writeln!(
                    body,
                    "    mov {}:{}, {}:{}",
                    operand(&values, k, k, from),
                    from.suffix(),
                    destination(k, k / 3),
                    to.suffix()
                );
                // Keep each result: the next conversion overwrites the scratch words.
                let _ = writeln!(
                    body,
                    "    mov {}:ue, {:#x}:ue",
                    destination(k, k / 3),
                    SCRATCH + 8 * k as u64
                );
            }
            let mut source = looped(&values, &body, 2);
            // Dump the kept results too.
            let mut dump = String::new();
            for k in 0..values.len() as u64 {
                let _ = writeln!(dump, "    mov {:#x}:ue, 0x100001000:ue", SCRATCH + 8 * k);
                let _ = writeln!(dump, "    mov $102:ue, 0x100000420:ue\n    int 0x80");
            }
            source = source.replace("    exit:c\n", &format!("{dump}    exit:c\n"));
            // Conversions the JIT leaves to the interpreter (u64 to float, float to unsigned
            // or 8-bit integers) end the region where they stand: still compared.
            let compiled = match (from.is_float(), to.is_float()) {
                (false, true) => from != Ty::U64,
                (true, false) => matches!(to, Ty::S64 | Ty::S32),
                _ => true,
            };
            check(&source, compiled);
        }
    }
}

#[test]
fn every_branch_condition() {
    let values = values();
    let n = values.len();
    for ty in Ty::ALL {
        let mut body = String::new();
        let mut label = 0;
        for a in 0..n {
            for b in [(a * 7 + 3) % n, a] {
                for cond in ["l", "le", "e", "ne", "z", "nz"] {
                    label += 1;
                    let (x, y) = (
                        operand(&values, a, label, Ty::U64),
                        operand(&values, b, label / 4 + 1, Ty::U64),
                    );
                    let branch = if matches!(cond, "z" | "nz") {
                        format!("    br:{cond},{},a {x}, $.Lt{label}", ty.suffix())
                    } else {
                        format!("    br:{cond},{},a {x}, {y}, $.Lt{label}", ty.suffix())
                    };
                    // Taken or not shows in a counter word, so the output tells.
                    let _ = writeln!(
                        body,
                        "{branch}\n    add:ue {SCRATCH:#x}, $1, {SCRATCH:#x}\n.Lt{label}:"
                    );
                }
            }
        }
        let mut source = looped(&values, &body, 3);
        source = source.replace(
            "    exit:c\n",
            &format!(
                "    mov {SCRATCH:#x}:ue, 0x100001000:ue\n    mov $102:ue, 0x100000420:ue\n    int 0x80\n    exit:c\n"
            ),
        );
        check(&source, true);
    }
}

/// Faults and hand-backs inside a compiled loop: the same report (PC, reason) and count.
#[test]
fn faults_match() {
    let values = values();
    let mut cases: Vec<(String, u64)> = Vec::new();
    for ty in Ty::INTEGERS {
        let t = ty.suffix();
        // Division by zero and MIN / -1 on the third iteration.
        let min = 1u64 << (8 * ty.size_bytes() - 1);
        let minus_one = u64::MAX >> (64 - 8 * ty.size_bytes());
        for op in ["div", "rem"] {
            cases.push((
                format!(
                    "    sub:ue {:#x}, $1, {:#x}\n    {op}:{t} $7, {:#x}, {SCRATCH:#x}",
                    DATA + 8,
                    DATA + 8,
                    DATA + 8
                ),
                u64::MAX,
            ));
            if ty.is_signed() {
                cases.push((
                    format!("    {op}:{t} ${min:#x}, ${minus_one:#x}, {SCRATCH:#x}"),
                    u64::MAX,
                ));
            }
        }
    }
    // Unmapped and read-only addresses, through a pointer that changes inside the loop.
    for bad in [0x10u64, 0x8_0000_0000] {
        cases.push((
            format!(
                "    add:ue {PTR:#x}, $8, {PTR:#x}\n    mov {COUNT:#x}:ue, 0({PTR:#x}):ue\n    br:ne,ue,a {COUNT:#x}, $1, $.Lok\n    mov ${bad:#x}:ue, {PTR:#x}:ue\n.Lok:\n    mov 0({PTR:#x}):ue, 8({PTR:#x}):ue"
            ),
            u64::MAX,
        ));
    }
    // Console output and a page-crossing access inside the loop (interpreter slow paths).
    cases.push((
        format!(
            "    mov $0x41:ue, 0x100000208:ue\n    mov {:#x}:ue, {:#x}:ue",
            DATA + 0xffc,
            DATA + 8
        ),
        u64::MAX,
    ));
    // The instruction limit falling inside a compiled loop, at every offset of one iteration.
    for limit in 60..75 {
        cases.push((
            format!("    add:ue {:#x}, $3, {:#x}\n    nop", DATA + 8, DATA + 8),
            limit,
        ));
    }
    for (body, limit) in cases {
        let source = looped(&values, &body, 5);
        let (observed, stats) = common::same_with_jit(&source, limit, 1);
        assert!(stats.regions > 0, "compiled:\n{source}");
        if limit != u64::MAX {
            assert!(
                observed.stderr.contains("instruction limit"),
                "{}",
                observed.stderr
            );
        }
    }
}

#[test]
fn a_header_that_always_misses_is_left_to_the_interpreter() {
    // Console words are never in the TLB: native code hands back at the loop's first
    // instruction on every entry, so after a few such calls the header backs off.
    let values = values();
    let source = looped(&values, "    mov $0x41:ue, 0x100000208:ue\n    nop", 1000);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(stats.regions > 0, "compiled: {stats:?}");
    assert!(
        stats.calls > 0 && stats.calls < 200,
        "most of the 1000 entries were left to the interpreter: {stats:?}"
    );
    assert_eq!(observed.stdout.matches('A').count(), 1000);
}

/// Two NaN operands: the first one comes out, quieted (`docs/DISA.md`, "NaN results"), however
/// the operands are reached: through the pointer (the first operand a float load, which the
/// code generator must not swap into the second place), directly, or as immediates.
#[test]
fn two_nans_give_the_first_quieted() {
    let values: Vec<u64> = vec![
        0x7ff0_0000_0000_0001, // signalling f64 NaN
        0x7ff8_0000_0000_0002, // quiet f64 NaN
        0x7f80_0001,           // signalling f32 NaN
        0x7fc0_0002,           // quiet f32 NaN
    ];
    let dest = |slot: usize| DATA + 8 * (values.len() + slot) as u64;
    let mut body = String::new();
    let mut expected = Vec::new();
    let mut slot = 0;
    for op in ["add", "sub", "mul", "div"] {
        for (ty, first, second) in [
            ("fd", 0usize, 1usize),
            ("fd", 1, 0),
            ("fs", 2, 3),
            ("fs", 3, 2),
        ] {
            let quiet = if ty == "fd" { 1u64 << 51 } else { 1 << 22 };
            let modes = [
                (
                    format!("{}({PTR:#x})", 8 * first),
                    format!("{}({PTR:#x})", 8 * second),
                ),
                (
                    format!("{:#x}", DATA + 8 * first as u64),
                    format!("{}({PTR:#x})", 8 * second),
                ),
                (
                    format!("${:#x}", values[first]),
                    format!("${:#x}", values[second]),
                ),
                (
                    format!("{}({PTR:#x})", 8 * first),
                    format!("${:#x}", values[second]),
                ),
            ];
            for (a, b) in modes {
                let _ = writeln!(body, "    {op}:{ty} {a}, {b}, {:#x}", dest(slot % 8));
                let _ = writeln!(
                    body,
                    "    mov {:#x}:ue, {:#x}:ue",
                    dest(slot % 8),
                    SCRATCH + 8 * slot as u64
                );
                // An `f32` result writes the word's low half only.
                let low = if ty == "fd" { u64::MAX } else { 0xffff_ffff };
                expected.push((values[first] | quiet, low));
                slot += 1;
            }
        }
    }
    let mut source = looped(&values, &body, 3);
    // Print the kept results too.
    let tail = "    exit:c\n";
    let mut prints = String::new();
    for k in 0..slot as u64 {
        let _ = writeln!(prints, "    mov {:#x}:ue, 0x100001000:ue", SCRATCH + 8 * k);
        let _ = writeln!(prints, "    mov $102:ue, 0x100000420:ue\n    int 0x80");
        let _ = writeln!(prints, "    mov $0x20:ue, 0x100000208:ue");
    }
    source = source.replace(tail, &format!("{prints}{tail}"));
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert!(stats.native_instructions > 0, "the loop ran natively");
    let words: Vec<u64> = observed
        .stdout
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let results: Vec<u64> = words[words.len() - slot..]
        .iter()
        .zip(&expected)
        .map(|(word, (_, low))| word & low)
        .collect();
    let expected: Vec<u64> = expected.iter().map(|(bits, _)| *bits).collect();
    assert_eq!(results, expected, "{source}");
}
