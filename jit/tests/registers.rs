//! Private scratch words held in registers inside a compiled region: pointers that reach them
//! inside the loop (loads and stores) must see and set the words' current values, every exit
//! writes them back (faults, the instruction limit, leaving the region), and the results
//! match the interpreter's exactly.

mod common;

use dvm_jit::HandBack;
use std::fmt::Write as _;

/// Scratch words of the loop (private, 8 bytes, the kind held in registers).
const S: u64 = 0x2_0000_0100;
const T: u64 = 0x2_0000_0108;
const F: u64 = 0x2_0000_0110;
const COUNT: u64 = 0x2_0000_0118;
/// A pointer word to `S` (same page), and a pointer into another private page.
const P: u64 = 0x2_0000_0000;
const Q: u64 = 0x2_0000_0008;
const OTHER: u64 = 0x3_0000_0000;

/// A branch that never jumps: a loop body with it is not one straight run, so its pointer
/// accesses are checked one by one (as here), not once per iteration (`tests/loops.rs`).
const NOT_COUNTED: &str = "    br:e,ue,a $0, $1, $.Lstraight\n.Lstraight:\n";

/// `body` looped `iterations` times after `setup`, then every scratch word printed.
fn program(setup: &str, body: &str, iterations: u64) -> String {
    let mut out = String::from("main:\n");
    let _ = writeln!(out, "    mov ${S:#x}:ue, {P:#x}:ue");
    let _ = writeln!(out, "    mov ${OTHER:#x}:ue, {Q:#x}:ue");
    let _ = writeln!(out, "    mov $1:ue, {S:#x}:ue");
    let _ = writeln!(out, "    mov $0:ue, {T:#x}:ue");
    let _ = writeln!(out, "    mov $0x3ff8000000000000:ue, {F:#x}:ue");
    let _ = writeln!(out, "    mov ${iterations}:ue, {COUNT:#x}:ue");
    out.push_str(setup);
    let _ = writeln!(out, ".Lloop:\n{body}");
    let _ = writeln!(out, "    sub:ue {COUNT:#x}, $1, {COUNT:#x}");
    let _ = writeln!(out, "    br:nz,ue,a {COUNT:#x}, $.Lloop");
    common::print_words_and_exit(&mut out, [S, T, F, COUNT, OTHER]);
    out
}

fn hand_backs(stats: &dvm_jit::JitStats, reason: HandBack) -> u64 {
    stats.hand_backs[reason as usize]
}

#[test]
fn a_pointer_load_of_a_register_word_sees_its_current_value() {
    // `S` changes every iteration in a register; `(P)` reads it through memory.
    let body =
        format!("    add:ue {S:#x}, $3, {S:#x}\n{NOT_COUNTED}    add:ue {T:#x}, ({P:#x}), {T:#x}");
    let source = program("", &body, 50);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(stats.native_instructions > 0, "ran natively: {stats:?}");
    assert!(
        hand_backs(&stats, HandBack::Miss) > 0,
        "the aliasing load handed back: {stats:?}"
    );
    // T = sum over i of (1 + 3i), i = 1..=50
    let t: u64 = (1..=50u64).map(|i| 1 + 3 * i).sum();
    assert!(
        observed.stdout.contains(&format!(" {t} ")),
        "{}",
        observed.stdout
    );
}

#[test]
fn a_pointer_store_into_a_register_word_is_seen_by_the_next_read() {
    let body = format!(
        "    add:ue {S:#x}, $1, {S:#x}\n{NOT_COUNTED}    mul:ue ({P:#x}), $2, ({P:#x})\n    add:ue {T:#x}, {S:#x}, {T:#x}"
    );
    let source = program("", &body, 20);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(stats.native_instructions > 0, "ran natively: {stats:?}");
    assert!(hand_backs(&stats, HandBack::Miss) > 0, "{stats:?}");
}

#[test]
fn pointers_elsewhere_do_not_hand_back() {
    // Q points into another private page: its loads and stores stay native, and the float
    // word F lives in a float register.
    let body = format!(
        "    add:ue ({Q:#x}), {S:#x}, ({Q:#x})\n    add:ue {S:#x}, $1, {S:#x}\n    mul:fd {F:#x}, $0x3ff0000000000001, {F:#x}"
    );
    let source = program(&format!("    mov $5:ue, {OTHER:#x}:ue\n"), &body, 1000);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(
        stats.native_instructions > 3500,
        "the loop ran natively: {stats:?}"
    );
    assert!(
        hand_backs(&stats, HandBack::Miss) <= 2,
        "only the first store missed: {stats:?}"
    );
}

#[test]
fn a_fault_inside_the_region_sees_the_written_back_words() {
    // The divisor lives in a register and reaches 0 on the fifth iteration: the interpreter
    // only faults as the JIT-less run does if the write-back happened before the hand-back.
    let setup = format!("    mov $5:ue, {S:#x}:ue\n");
    let body = format!(
        "    sub:ue {S:#x}, $1, {S:#x}\n    add:ue {T:#x}, {S:#x}, {T:#x}\n    div:ue $100, {S:#x}, {F:#x}"
    );
    let source = program(&setup, &body, 10);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 1, "{}", observed.stderr);
    assert!(stats.native_instructions > 0, "ran natively: {stats:?}");
    // And at every instruction limit across the loop: every exit writes back.
    common::stops_at_every_limit(&source, 9..29);
}

#[test]
fn a_constant_alias_of_a_register_page_refuses_entry() {
    // The private region is the same memory in every space: space 1's address of `S` is a
    // different constant page on the same frame, so holding `S` in a register would hide its
    // stores from that address. Entry is refused and the loop runs interpreted, exactly.
    let alias = (1u64 << 46) | S;
    let body = format!(
        "    add:ue {S:#x}, $3, {S:#x}\n    add:ue {T:#x}, {alias:#x}, {T:#x}\n    add:ue {alias:#x}, $1, {alias:#x}"
    );
    let source = program("", &body, 30);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(stats.regions > 0, "compiled: {stats:?}");
    assert!(
        hand_backs(&stats, HandBack::Refused) > 0,
        "entry refused: {stats:?}"
    );
}
