//! Loop nests in one compiled region: words held by an outer loop and passed through its inner
//! loops in registers, and counted inner loops (pointers that move by a constant per
//! iteration, checked once per iteration instead of once per access). Every program runs with
//! and without the JIT and must show the same output, fault reports and instruction counts,
//! at every instruction limit across the loops too.

mod common;

use dvm_jit::HandBack;
use std::fmt::Write as _;

/// Private scratch words: the nest's counters and accumulators, and a pointer word.
const OUTER: u64 = 0x2_0000_0100;
const INNER: u64 = 0x2_0000_0108;
const SUM: u64 = 0x2_0000_0110;
const FSUM: u64 = 0x2_0000_0118;
const P: u64 = 0x2_0000_0120;
const Q: u64 = 0x2_0000_0128;
/// Shared data: three pages of u64 values `1..`, starting 64 bytes before a page boundary.
const DATA: u64 = 0x60_0000_0fc0;
const DATA_WORDS: u64 = 1024;

/// `outer` times: `setup` then `inner` times `body`; then every scratch word is printed.
fn nest(setup: &str, body: &str, outer: u64, inner: u64) -> String {
    let mut out = String::from("main:\n");
    let _ = writeln!(out, "    mov $0:ue, {SUM:#x}:ue");
    let _ = writeln!(out, "    mov $0:ue, {FSUM:#x}:ue");
    let _ = writeln!(out, "    mov $0:ue, {OUTER:#x}:ue");
    // DATA[k] = k + 1, written from the end: the pages get host memory in reverse order, so
    // an access that ran past its page would read another page's values.
    let last = DATA + 8 * (DATA_WORDS - 1);
    let _ = writeln!(out, "    mov ${last:#x}:ue, {P:#x}:ue");
    let _ = writeln!(out, "    mov ${DATA_WORDS}:ue, {Q:#x}:ue");
    let _ = writeln!(out, ".Lfill:");
    let _ = writeln!(out, "    mov {Q:#x}:ue, ({P:#x}):ue");
    let _ = writeln!(out, "    sub:ue {P:#x}, $8, {P:#x}");
    let _ = writeln!(out, "    sub:ue {Q:#x}, $1, {Q:#x}");
    let _ = writeln!(out, "    br:nz,ue,a {Q:#x}, $.Lfill");
    let _ = writeln!(out, ".Louter:");
    out.push_str(setup);
    let _ = writeln!(out, "    mov ${inner}:ue, {INNER:#x}:ue");
    let _ = writeln!(out, ".Linner:\n{body}");
    let _ = writeln!(out, "    sub:ue {INNER:#x}, $1, {INNER:#x}");
    let _ = writeln!(out, "    br:nz,ue,a {INNER:#x}, $.Linner");
    let _ = writeln!(out, "    add:ue {OUTER:#x}, $1, {OUTER:#x}");
    let _ = writeln!(out, "    br:l,ue,a {OUTER:#x}, ${outer}, $.Louter");
    common::print_words_and_exit(&mut out, [OUTER, INNER, SUM, FSUM, P, Q]);
    out
}

/// The printed words, in `nest`'s order.
fn words(stdout: &str) -> Vec<u64> {
    common::printed_numbers(stdout)
}

fn misses(stats: &dvm_jit::JitStats) -> u64 {
    stats.hand_backs[HandBack::Miss as usize]
}

#[test]
fn a_counted_loop_walks_across_pages() {
    // P walks 8 bytes an iteration over three pages: the loop re-checks its pages only where
    // the walk leaves one, and every value is read once.
    let setup = format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n");
    let body = format!(
        "    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    mov ({P:#x}):se, {FSUM:#x}:fd\n    add:ue {P:#x}, $8, {P:#x}"
    );
    let source = nest(&setup, &body, 3, DATA_WORDS);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    let sum: u64 = 3 * (1..=DATA_WORDS).sum::<u64>();
    assert_eq!(words(&observed.stdout)[2], sum, "{}", observed.stdout);
    assert!(
        stats.native_instructions > 3 * DATA_WORDS * 4,
        "the walk ran natively: {stats:?}"
    );
    assert!(misses(&stats) <= 4, "{stats:?}");
}

#[test]
fn a_counted_loop_walks_backwards_and_in_big_steps() {
    for (start, step, op, count) in [
        (DATA + 8 * (DATA_WORDS - 1), 8, "sub", DATA_WORDS),
        (DATA, 4096, "add", 2),
        (DATA + 4104, 4104, "sub", 2),
        (DATA + 3, 16, "add", 200),
    ] {
        let setup = format!("    mov ${start:#x}:ue, {P:#x}:ue\n");
        let body =
            format!("    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    {op}:ue {P:#x}, ${step}, {P:#x}");
        let source = nest(&setup, &body, 2, count);
        let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
        assert_eq!(observed.faulted, 0, "{}\n{source}", observed.stderr);
        assert!(stats.native_instructions > 0, "{stats:?}");
    }
}

#[test]
fn a_counted_loop_stops_exactly_at_the_instruction_limit() {
    // The branch back skips the count check while iterations are known safe: the limit must
    // still land on the same instruction as the interpreter's.
    let setup = format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n");
    let body = format!("    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    add:ue {P:#x}, $8, {P:#x}");
    let source = nest(&setup, &body, 2, 600);
    common::stops_at_every_limit(&source, (5_000..5_040).chain([6_001, 6_977, 7_500]));
}

#[test]
fn a_loop_counted_down_from_zero_runs_until_the_limit_like_the_interpreter() {
    // `sub $1` then `br:nz` from 0 wraps: 2^64 iterations, so the charge up front is bounded
    // by the pages and the count, not by the trip word, and the limit ends the run.
    let setup = format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n");
    for body in [
        format!("    add:ue {SUM:#x}, $3, {SUM:#x}"),
        format!("    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}"),
        format!("    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    add:ue {P:#x}, $8, {P:#x}"),
    ] {
        let source = nest(&setup, &body, 1, 0);
        common::stops_at_every_limit(&source, (5_000..5_012).chain([6_001, 20_003]));
    }
}

#[test]
fn a_loop_counted_down_stops_at_every_limit_across_its_batches() {
    // P starts 8 words before a page end: the first batch of charged iterations ends there,
    // then one per page. The fill loop takes 4101 instructions, and each inner loop 2800 more
    // (700 iterations of 4): the limits land in the first batch, on its end (4135), inside
    // the next, and around the first inner loop's exit (6903).
    let setup = format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n");
    let body = format!("    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    add:ue {P:#x}, $8, {P:#x}");
    let source = nest(&setup, &body, 2, 700);
    let (observed, _) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    common::stops_at_every_limit(
        &source,
        (4_100..4_140).chain(5_600..5_610).chain(6_895..6_912),
    );
}

#[test]
fn a_counted_loop_that_walks_into_its_own_words_hands_back() {
    // Q starts below the scratch words and walks up through them (they live in registers):
    // reaching their page hands back, and the values read are the current ones.
    let setup = format!("    mov $0x200000000:ue, {Q:#x}:ue\n");
    let body = format!(
        "    add:ue {SUM:#x}, ({Q:#x}), {SUM:#x}\n    add:ue {FSUM:#x}, $1, {FSUM:#x}\n    add:ue {Q:#x}, $8, {Q:#x}"
    );
    let source = nest(&setup, &body, 2, 60);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    assert!(
        misses(&stats) > 0,
        "the page of held words handed back: {stats:?}"
    );
}

#[test]
fn a_counted_loop_that_walks_off_the_map_faults_like_the_interpreter() {
    // The second step goes from the data down into the code (read-only, or past its end):
    // the store faults there, natively found or not.
    let setup = format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n");
    let body =
        format!("    add:ue ({P:#x}), $1, ({P:#x})\n    sub:ue {P:#x}, $0x5800000000, {P:#x}");
    let source = nest(&setup, &body, 1, 40);
    let (observed, _) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 1, "{}", observed.stderr);
}

#[test]
fn outer_words_pass_through_the_inner_loop() {
    // SUM and OUTER belong to the outer loop, INNER and P to the inner one; an f64 sum too.
    let setup =
        format!("    mov ${DATA:#x}:ue, {P:#x}:ue\n    add:ue {SUM:#x}, {OUTER:#x}, {SUM:#x}\n");
    let body = format!(
        "    add:ue {SUM:#x}, ({P:#x}), {SUM:#x}\n    add:fd {FSUM:#x}, $1.5, {FSUM:#x}\n    add:ue {P:#x}, $8, {P:#x}"
    );
    let source = nest(&setup, &body, 40, 7);
    let (observed, stats) = common::same_with_jit(&source, u64::MAX, 1);
    assert_eq!(observed.faulted, 0, "{}", observed.stderr);
    let sum: u64 = (0..40).sum::<u64>() + 40 * (1..=7).sum::<u64>();
    assert_eq!(words(&observed.stdout)[2], sum, "{}", observed.stdout);
    assert_eq!(
        f64::from_bits(words(&observed.stdout)[3]),
        40.0 * 7.0 * 1.5,
        "{}",
        observed.stdout
    );
    assert!(stats.native_instructions > 40 * 7 * 5, "{stats:?}");
    // A fault at every instruction limit through the nest sees every word written back.
    common::stops_at_every_limit(&source, (4_150..4_400).step_by(7));
}

/// The compiler thread's code takes over a loop that is still running: the runner interprets
/// until the code is ready, then the rest runs natively, with the interpreter's results.
#[test]
fn code_compiled_in_the_background_takes_over_a_running_loop() {
    // 5 million iterations: far longer interpreted than compiling the loop takes.
    let source = nest("", "    add:ue {SUM}, $3, {SUM}\n", 1, 5_000_000)
        .replace("{SUM}", &format!("{SUM:#x}"));
    let jit = common::jit_with(1, true);
    let (observed, stats) = common::same_with(&source, u64::MAX, jit);
    assert_eq!(
        words(&observed.stdout)[2],
        15_000_000,
        "{}",
        observed.stdout
    );
    assert!(stats.regions >= 1, "{stats:?}");
    assert!(stats.native_instructions > 0, "{stats:?}");
}
