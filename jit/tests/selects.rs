//! A conditional branch that only decides whether a few moves are made (`br:c a, b, $take;
//! br:j $join; take: mov ...; join:`, k-means' nearest centroid) runs as selects in native
//! code. Whatever the outcome, the values, the instruction count and the point where an
//! instruction limit stops the run must be the interpreter's.

mod common;

use std::fmt::Write as _;

/// Private scratch words: the running best and its index, the current value and index, a
/// loop counter and the data pointer; `FAR` is a private word on another page (in memory,
/// not in a register).
const BEST: u64 = 0x2_0000_0100;
const BESTI: u64 = 0x2_0000_0108;
const CUR: u64 = 0x2_0000_0110;
const I: u64 = 0x2_0000_0118;
const N: u64 = 0x2_0000_0120;
const P: u64 = 0x2_0000_0128;
const FAR: u64 = 0x2_0010_0000;
/// Shared data: `f64` values (their bits as `u64` for the integer tests).
const DATA: u64 = 0x60_0000_0000;

/// Bits of values to scan: a pseudo-random walk with NaNs, infinities, zeros of both signs and
/// repeats, so that the branch goes both ways in no fixed pattern.
fn values(count: usize) -> Vec<u64> {
    let specials = [
        f64::NAN.to_bits(),
        f64::INFINITY.to_bits(),
        f64::NEG_INFINITY.to_bits(),
        0,
        (-0.0f64).to_bits(),
        1.5f64.to_bits(),
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|k| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if k % 11 == 5 {
                specials[(state % specials.len() as u64) as usize]
            } else {
                ((state % 2001) as f64 - 1000.0).to_bits()
            }
        })
        .collect()
}

/// Scans `count` values for the best by `compare` (e.g. `br:l,fd CUR, BEST`), moving `CUR`
/// and its index (and `extra`, more moves) when it is better; prints the results.
fn scan(compare: &str, moves: &str, count: usize) -> String {
    let mut out = String::from("main:\n");
    for (k, bits) in values(count).into_iter().enumerate() {
        let _ = writeln!(out, "    mov ${bits:#x}:ue, {:#x}:ue", DATA + 8 * k as u64);
    }
    let _ = writeln!(out, "    mov $0x7ff0000000000000:ue, {BEST:#x}:ue");
    let _ = writeln!(
        out,
        "    mov $7:ue, {BESTI:#x}:ue\n    mov $9:ue, {FAR:#x}:ue"
    );
    let _ = writeln!(
        out,
        "    mov $0:ue, {I:#x}:ue\n    mov ${count}:ue, {N:#x}:ue"
    );
    let _ = writeln!(out, "    mov ${DATA:#x}:ue, {P:#x}:ue");
    let _ = writeln!(out, ".Lscan:\n    mov ({P:#x}):ue, {CUR:#x}:ue");
    let _ = writeln!(
        out,
        "    {compare}, $.Ltake\n    br:j,a $.Ljoin\n.Ltake:\n{moves}"
    );
    let _ = writeln!(out, ".Ljoin:\n    add:ue {P:#x}, $8, {P:#x}");
    let _ = writeln!(out, "    add:ue {I:#x}, $1, {I:#x}");
    let _ = writeln!(out, "    br:l,ue,a {I:#x}, {N:#x}, $.Lscan");
    common::print_words_and_exit(&mut out, [BEST, BESTI, FAR]);
    out
}

/// The best index and value by `better`, as the program computes them.
fn expected(count: usize, better: impl Fn(u64, u64) -> bool) -> (u64, u64) {
    let (mut best, mut index) = (f64::INFINITY.to_bits(), 7);
    for (k, bits) in values(count).into_iter().enumerate() {
        if better(bits, best) {
            (best, index) = (bits, k as u64);
        }
    }
    (best, index)
}

#[test]
fn the_nearest_by_a_float_compare_is_found_as_the_interpreter_finds_it() {
    let moves = format!("    mov {CUR:#x}:fd, {BEST:#x}:fd\n    mov {I:#x}:ue, {BESTI:#x}:ue");
    let source = scan(&format!("br:l,fd,a {CUR:#x}, {BEST:#x}"), &moves, 300);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(stats.native_instructions > 1_500, "ran natively: {stats:?}");
    let (best, index) = expected(300, |a, b| f64::from_bits(a) < f64::from_bits(b));
    assert_eq!(
        common::printed_numbers(&observed.stdout)[..2],
        [best, index],
        "{}",
        observed.stdout
    );
}

#[test]
fn integer_compares_constants_and_a_word_in_memory_are_selected_too() {
    // Unsigned and signed compares of the bits; the moves write a constant and a word on a
    // page whose words are not in registers.
    for (compare, better) in [
        (
            format!("br:l,ue,a {BEST:#x}, {CUR:#x}"),
            (|a, b| a > b) as fn(u64, u64) -> bool,
        ),
        (format!("br:l,se,a {CUR:#x}, {BEST:#x}"), |a, b| {
            (a as i64) < (b as i64)
        }),
    ] {
        let moves = format!(
            "    mov {CUR:#x}:ue, {BEST:#x}:ue\n    mov {I:#x}:ue, {BESTI:#x}:ue\n    mov $5:ue, {FAR:#x}:ue"
        );
        let source = scan(&compare, &moves, 200);
        let (observed, _) = common::same_with_jit(&source, u64::MAX, 1);
        assert_eq!(observed.faulted, 0, "{}", observed.stderr);
        let (best, index) = expected(200, better);
        assert_eq!(
            common::printed_numbers(&observed.stdout)[..2],
            [best, index],
            "{compare}: {}",
            observed.stdout
        );
    }
}

#[test]
fn an_instruction_limit_stops_both_ways_of_the_branch_at_the_same_instruction() {
    // The way taken is one instruction longer than the way skipped: limits on every
    // instruction of a few dozen iterations land before, inside and after the moves.
    let moves = format!("    mov {CUR:#x}:fd, {BEST:#x}:fd\n    mov {I:#x}:ue, {BESTI:#x}:ue");
    let source = scan(&format!("br:l,fd,a {CUR:#x}, {BEST:#x}"), &moves, 300);
    let setup = 300 + 6;
    common::stops_at_every_limit(&source, setup..setup + 300);
}
