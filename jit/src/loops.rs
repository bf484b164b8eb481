//! The loops of a region and what they may keep in registers (pure analysis of the decoded
//! instructions; `codegen` builds the code from it).
//!
//! - `region_loops`: the region's loops, a properly nested family.
//! - `placed_words`: which private scratch words live in a register, and in which loop.
//! - `counted_sites`: whether an innermost loop is counted (one straight run whose pointers
//!   move by constants), and the accesses it checks once per iteration.

use dvm_engine::codec::Operand;
use dvm_engine::interp::{Decoded, Program};
use dvm_engine::isa::{Cond, Op, Ty};
use dvm_engine::page::PAGE_SHIFT;

/// Every constant address `d` accesses: `(address, bytes, written)`, the pointer words of
/// indirect operands included (read as 8 bytes).
fn direct_accesses(d: &Decoded) -> Vec<(u64, u32, bool, bool)> {
    let instr = &d.instr;
    let ty = instr.tys[0];
    let (tys, dest): ([Ty; 3], Option<usize>) = match instr.op {
        Op::Conv => ([ty, instr.tys[1], ty], Some(1)),
        Op::Br => ([ty; 3], None),
        Op::Nop => ([Ty::U64; 3], None),
        _ => ([ty; 3], Some(2)),
    };
    // Every operand counts, even one this translation never reads (a branch target): an
    // access too many only keeps a word in memory.
    let mut out = Vec::new();
    for (k, ty) in tys.into_iter().enumerate() {
        match instr.operand(k) {
            Operand::Direct(addr) => {
                out.push((addr, ty.size_bytes(), dest == Some(k), ty == Ty::F64));
            }
            Operand::Indirect(at) | Operand::BaseDisp { base: at, .. } => {
                out.push((at, 8, false, false));
            }
            Operand::Imm(_) => {}
        }
    }
    out
}

/// The loops of a region, a properly nested family: `(first, last)` region indices of the
/// span from a back edge's target to the back edge (`last` branches back to `first`), and the
/// index of the smallest loop around it. Outer loops come before the loops they hold. A span
/// that overlaps another without nesting is left out (with the larger of the two kept), so
/// every instruction has one innermost loop.
pub(crate) fn region_loops(code: &[Decoded], start: usize) -> Vec<((usize, usize), Option<usize>)> {
    let mut spans: Vec<(usize, usize)> = code
        .iter()
        .enumerate()
        .filter_map(|(at, d)| {
            let target = d.target()?;
            (start..=start + at)
                .contains(&target)
                .then(|| (target - start, at))
        })
        .collect();
    // Larger spans first, so that an outer loop is taken before what it holds.
    spans.sort_by_key(|&(first, last)| (std::cmp::Reverse(last - first), first));
    spans.dedup();
    let mut taken: Vec<(usize, usize)> = Vec::new();
    for (first, last) in spans {
        let crosses = taken
            .iter()
            .any(|&(f, l)| f <= last && first <= l && !(f <= first && last <= l));
        if !crosses {
            taken.push((first, last));
        }
    }
    taken
        .iter()
        .map(|&(first, last)| {
            // The smallest taken span holding this one (taken holds no equal spans).
            let parent = taken
                .iter()
                .enumerate()
                .filter(|&(_, &(f, l))| f <= first && last <= l && (f, l) != (first, last))
                .min_by_key(|&(_, &(f, l))| l - f)
                .map(|(k, _)| k);
            ((first, last), parent)
        })
        .collect()
}

/// Most words held in variables at any point of a region, integer and `f64`, and most pages
/// they may lie on: with more, the variables of the innermost loops no longer fit the host's
/// registers with their site caches and the count (x86-64: 14 integer registers to allocate,
/// 16 float ones), and spilled ones cost what memory did.
const MAX_INT_WORDS: usize = 7;
const MAX_FLOAT_WORDS: usize = 8;
const MAX_REG_PAGES: usize = 2;

/// The private scratch words a region keeps in variables, and the loop that holds each:
/// 8-byte aligned words in the private region (not on the page of the ABI and console words,
/// which are device registers the TLB never caches), that every constant access of the
/// region reads or writes whole, as 8 bytes, on at most `MAX_REG_PAGES` pages. Returns per
/// loop `(address, written, float)`: `written`, some instruction of the loop writes it;
/// `float`, every access of the loop is an `f64` (the variable is one, so it lives in a
/// float register).
///
/// A word lives in its variable while its loop runs (the loops inside included): it is
/// loaded on every way into the loop and stored back on every way out of it (to code outside
/// it, or out of native code), before anything else can look; outside the loop it is in
/// memory. Each word goes to the smallest loop that holds all its accesses made inside loops
/// (so inner loops pass it on in a register), a float word on out to the outermost loop
/// around that with a float register left, or to a loop inside that one when the
/// innermost loops below it have no room left (`MAX_INT_WORDS`, `MAX_FLOAT_WORDS`); the
/// most used words, weighted 16 per loop level, are placed first.
///
/// Why this is exact: the runner's private pages are its own (no other runner sees them) and
/// carry no store mask, so nothing but this runner can read or write such a word while
/// native code runs. What remains is aliasing in the region, which the translation rules out
/// at run time: an access through a pointer that reaches a page of words held at that point
/// hands back before its effects (after the write-back), and entry is refused when a
/// constant page of the region shares memory with such a page. Their pages were touched by
/// the interpreted iterations before the region was entered, so entry is not refused for a
/// page only other code touches.
pub(crate) fn placed_words(
    code: &[Decoded],
    loops: &[((usize, usize), Option<usize>)],
) -> Vec<Vec<(u64, bool, bool)>> {
    const SPACE_OFFSET_MASK: u64 = (1 << dvm_engine::abi::SPACE_SHIFT) - 1;
    let abi_page = (dvm_engine::abi::PR_STACK_BASE & SPACE_OFFSET_MASK) >> PAGE_SHIFT;
    let innermost_at = |at: usize| -> Option<usize> {
        loops
            .iter()
            .enumerate()
            .filter(|(_, ((f, l), _))| (*f..=*l).contains(&at))
            .min_by_key(|(_, ((f, l), _))| l - f)
            .map(|(k, _)| k)
    };
    let depth = |mut l: Option<usize>| -> u32 {
        let mut d = 0;
        while let Some(k) = l {
            d += 1;
            l = loops[k].1;
        }
        d
    };
    // Every constant access: (instruction, address, bytes, written, f64).
    let accesses: Vec<(usize, u64, u32, bool, bool)> = code
        .iter()
        .enumerate()
        .flat_map(|(at, d)| {
            direct_accesses(d)
                .into_iter()
                .map(move |(addr, size, w, f)| (at, addr, size, w, f))
        })
        .collect();
    let mut words: Vec<(u64, u64)> = Vec::new(); // (address, weight)
    for &(_, addr, size, ..) in &accesses {
        let offset = addr & SPACE_OFFSET_MASK;
        let private =
            (dvm_engine::abi::PRIVATE_BASE..dvm_engine::abi::PRIVATE_END).contains(&offset);
        if size != 8 || addr % 8 != 0 || !private || offset >> PAGE_SHIFT == abi_page {
            continue;
        }
        if addr >> dvm_engine::abi::SPACE_SHIFT >= dvm_engine::abi::SPACE_COUNT {
            continue;
        }
        if words.iter().any(|w| w.0 == addr) {
            continue;
        }
        let overlapped = accesses.iter().any(|&(_, other, other_size, ..)| {
            let disjoint = other.saturating_add(u64::from(other_size)) <= addr || other >= addr + 8;
            !disjoint && (other, other_size) != (addr, 8)
        });
        if overlapped {
            continue;
        }
        let weight = accesses
            .iter()
            .filter(|a| a.1 == addr)
            .map(|a| 1u64 << (4 * depth(innermost_at(a.0)).min(15)))
            .sum();
        words.push((addr, weight));
    }
    words.sort_by_key(|&(addr, weight)| (std::cmp::Reverse(weight), addr));
    let innermost: Vec<usize> = (0..loops.len())
        .filter(|&k| !loops.iter().any(|(_, parent)| *parent == Some(k)))
        .collect();
    let holds = |outer: usize, mut inner: usize| loop {
        if inner == outer {
            break true;
        }
        match loops[inner].1 {
            Some(up) => inner = up,
            None => break false,
        }
    };
    let mut counts = vec![(0usize, 0usize); loops.len()]; // per innermost loop: (int, float)
    let mut pages: Vec<u64> = Vec::new();
    let mut out: Vec<Vec<(u64, bool, bool)>> = vec![Vec::new(); loops.len()];
    for (addr, _) in words {
        let sites: Vec<usize> = accesses
            .iter()
            .filter(|a| a.1 == addr)
            .filter_map(|a| innermost_at(a.0))
            .collect();
        let Some(&first_site) = sites.first() else {
            continue;
        };
        // The smallest loop holding every access made inside a loop; if none does (accesses
        // in loops side by side), the outermost loop around the deepest access.
        let mut place = Some(first_site);
        while let Some(l) = place {
            if sites.iter().all(|&s| holds(l, s)) {
                break;
            }
            place = loops[l].1;
        }
        if place.is_none() {
            let deepest = sites.iter().copied().max_by_key(|&s| depth(Some(s)));
            place = deepest.map(|mut l| {
                while let Some(up) = loops[l].1 {
                    l = up;
                }
                l
            });
        }
        let page = addr >> PAGE_SHIFT;
        if !pages.contains(&page) && pages.len() == MAX_REG_PAGES {
            continue;
        }
        // A float word goes on out to the outermost loop around that still has a float
        // register for it: then it is loaded and stored once per entry of that loop rather
        // than of each inner one (k-means' distance terms), and float registers are rarely
        // short.
        let float_in = |l: usize| {
            let (first, last) = loops[l].0;
            accesses
                .iter()
                .filter(|a| a.1 == addr && (first..=last).contains(&a.0))
                .all(|a| a.4)
        };
        let float_room = |l: usize| {
            innermost
                .iter()
                .filter(|&&i| holds(l, i))
                .all(|&i| counts[i].1 < MAX_FLOAT_WORDS)
        };
        if let Some(mut l) = place.filter(|&l| float_in(l) && float_room(l)) {
            while let Some(up) = loops[l].1.filter(|&up| float_in(up) && float_room(up)) {
                l = up;
            }
            place = Some(l);
        }
        while let Some(l) = place {
            let (first, last) = loops[l].0;
            let float = accesses
                .iter()
                .filter(|a| a.1 == addr && (first..=last).contains(&a.0))
                .all(|a| a.4);
            let room = innermost.iter().filter(|&&i| holds(l, i)).all(|&i| {
                let (ints, floats) = counts[i];
                if float {
                    floats < MAX_FLOAT_WORDS
                } else {
                    ints < MAX_INT_WORDS
                }
            });
            if room {
                let written = accesses
                    .iter()
                    .any(|a| a.1 == addr && a.3 && (first..=last).contains(&a.0));
                for &i in innermost.iter().filter(|&&i| holds(l, i)) {
                    if float {
                        counts[i].1 += 1;
                    } else {
                        counts[i].0 += 1;
                    }
                }
                out[l].push((addr, written, float));
                if !pages.contains(&page) {
                    pages.push(page);
                }
                break;
            }
            // No room: the loop inside holding the most of its accesses, if any.
            place = (0..loops.len())
                .filter(|&k| loops[k].1 == Some(l))
                .max_by_key(|&k| sites.iter().filter(|&&s| holds(k, s)).count())
                .filter(|&k| sites.iter().any(|&s| holds(k, s)));
        }
    }
    out
}

/// A pointer access of a counted loop (`counted_sites`): instruction `index` reaches
/// `operand` (a store if `store`, `size` bytes) at the pointer word `word` plus `offset`,
/// counted from the value the word has when an iteration starts; the word grows by `stride`
/// per iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CountedSite {
    pub index: usize,
    pub operand: Operand,
    pub store: bool,
    pub size: u32,
    pub word: u64,
    pub offset: i64,
    pub stride: i64,
}

/// The pointer accesses of a counted loop, if loop `first..=last` (absolute indices) is one:
/// its body is one straight run (no branch but the last instruction, which branches back to
/// `first`), and every pointer it goes through is a word `held` in a variable whose only
/// writes in the loop add or subtract constants (`add:ue P, $8, P`). The address of each
/// access then moves by a constant per iteration, so at the start of an iteration the
/// number of iterations in which every access stays on its page is a division away: one
/// check per iteration instead of one per access.
pub(crate) fn counted_sites(
    code: &[Decoded],
    first: usize,
    last: usize,
    held: impl Fn(u64) -> bool,
) -> Option<Vec<CountedSite>> {
    let body = &code[first..=last];
    let (last_d, straight) = body.split_last()?;
    if last_d.instr.op != Op::Br || last_d.target() != Some(first) {
        return None;
    }
    if straight.iter().any(|d| d.instr.op == Op::Br) {
        return None;
    }
    // The constant each instruction adds to a word, if that is all it does to it.
    let step = |d: &Decoded, word: u64| -> Option<i64> {
        let instr = &d.instr;
        let int8 = matches!(instr.tys[0], Ty::U64 | Ty::S64);
        match (
            instr.op,
            instr.operand(0),
            instr.operand(1),
            instr.operand(2),
        ) {
            (Op::Add, Operand::Direct(a), Operand::Imm(c), Operand::Direct(b))
                if int8 && a == word && b == word =>
            {
                Some(c as i64)
            }
            (Op::Sub, Operand::Direct(a), Operand::Imm(c), Operand::Direct(b))
                if int8 && a == word && b == word =>
            {
                Some((c as i64).wrapping_neg())
            }
            _ => None,
        }
    };
    let writes = |d: &Decoded, word: u64| {
        direct_accesses(d)
            .into_iter()
            .any(|(addr, _, written, _)| written && addr == word)
    };
    // The stride of `word` over the body, and what it has added before instruction `at`.
    let moves = |word: u64, upto: usize| -> Option<(i64, i64)> {
        let mut total = 0i64;
        let mut before = 0i64;
        for (k, d) in body.iter().enumerate() {
            if !writes(d, word) {
                continue;
            }
            let c = step(d, word)?;
            total = total.wrapping_add(c);
            if k < upto {
                before = before.wrapping_add(c);
            }
        }
        Some((total, before))
    };
    let mut sites = Vec::new();
    for (k, d) in body.iter().enumerate() {
        let instr = &d.instr;
        let ty = instr.tys[0];
        let operands: Vec<(usize, bool, Ty)> = match instr.op {
            Op::Nop => Vec::new(),
            Op::Conv => vec![(0, false, ty), (1, true, instr.tys[1])],
            Op::Br => match instr.cond {
                Cond::J => Vec::new(),
                Cond::Z | Cond::Nz => vec![(0, false, ty)],
                _ => vec![(0, false, ty), (1, false, ty)],
            },
            _ => vec![(0, false, ty), (1, false, ty), (2, true, ty)],
        };
        for (n, store, ty) in operands {
            let operand = instr.operand(n);
            let (word, disp) = match operand {
                Operand::Indirect(word) => (word, 0),
                Operand::BaseDisp { base, disp } => (base, i64::from(disp)),
                _ => continue,
            };
            if !held(word) {
                return None;
            }
            let (stride, before) = moves(word, k)?;
            let site = CountedSite {
                index: first + k,
                operand,
                store,
                size: ty.size_bytes(),
                word,
                offset: before.wrapping_add(disp),
                stride,
            };
            if !sites.contains(&site) {
                sites.push(site);
            }
        }
    }
    Some(sites)
}

/// The trip word of a counted loop `first..=last` (absolute indices), if the loop counts one
/// down: its branch back is `br:nz,ue W`, `W` is a word `held` in a variable, and the body's
/// only write to it is one `sub:ue W, $1, W` (a 64-bit type), at the returned index. An
/// iteration that starts with `W = n >= 1` is then followed by exactly `n - 1` more, so the
/// translation can charge a loop's remaining iterations up front and let the branch back
/// compare `W` with a limit instead of counting safe iterations down beside it.
pub(crate) fn trip_word(
    code: &[Decoded],
    first: usize,
    last: usize,
    held: impl Fn(u64) -> bool,
) -> Option<(u64, usize)> {
    let branch = &code.get(last)?.instr;
    if branch.op != Op::Br || branch.cond != Cond::Nz || branch.tys[0] != Ty::U64 {
        return None;
    }
    let Operand::Direct(word) = branch.operand(0) else {
        return None;
    };
    if !held(word) {
        return None;
    }
    let mut decrement = None;
    for (k, d) in code[first..last].iter().enumerate() {
        let writes = direct_accesses(d)
            .into_iter()
            .any(|(addr, _, written, _)| written && addr == word);
        if !writes {
            continue;
        }
        let instr = &d.instr;
        let is_decrement = instr.op == Op::Sub
            && matches!(instr.tys[0], Ty::U64 | Ty::S64)
            && instr.operand(0) == Operand::Direct(word)
            && instr.operand(1) == Operand::Imm(1)
            && instr.operand(2) == Operand::Direct(word);
        if !is_decrement || decrement.is_some() {
            return None;
        }
        decrement = Some(first + k);
    }
    decrement.map(|at| (word, at))
}

/// What the translation of instructions `start..end` keeps in registers, for
/// `DVM_JIT_DUMP`: each loop (region indices) with the words placed in it, and whether it is
/// counted.
pub fn describe(program: &Program, start: usize, end: usize) -> String {
    let code = &program.code()[start..end];
    let loops = region_loops(code, start);
    let placed = placed_words(code, &loops);
    let mut out = String::new();
    for (k, (((first, last), parent), words)) in loops.iter().zip(&placed).enumerate() {
        let mut held: Vec<u64> = Vec::new();
        let mut l = Some(k);
        while let Some(at) = l {
            held.extend(placed[at].iter().map(|w| w.0));
            l = loops[at].1;
        }
        let counted = counted_sites(program.code(), start + first, start + last, |w| {
            held.contains(&w)
        })
        .map_or(0, |sites| sites.len());
        let words: Vec<String> = words
            .iter()
            .map(|(addr, written, float)| {
                format!(
                    "{addr:#x}{}{}",
                    if *written { "w" } else { "" },
                    if *float { "f" } else { "" }
                )
            })
            .collect();
        out.push_str(&format!(
            "  loop {k}: {first}..={last} in {parent:?}, counted sites {counted}, words {}\n",
            words.join(" ")
        ));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `source` assembled and decoded (for the JIT's unit tests).
    pub(crate) fn program(source: &str) -> Program {
        let image = dvm_engine::asm::assemble("t.dasm", source).expect("assembles");
        let image =
            dvm_engine::image::validate(dvm_engine::image::Format::Elf, image).expect("valid");
        Program::new(image)
    }

    /// Two loops side by side inside an outer one, and a branch that crosses into a loop.
    const NEST: &str = "main:
    mov $0:ue, 0x200000100:ue
.Louter:
    mov $0x5000000000:ue, 0x200000108:ue
    mov $4:ue, 0x200000110:ue
.La:
    add:ue 0x200000118, (0x200000108), 0x200000118
    add:ue 0x200000108, $8, 0x200000108
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.La
    mov $4:ue, 0x200000110:ue
.Lb:
    br:z,ue,a 0x200000118, $.Lskip
    add:ue 0x200000120, $1, 0x200000120
.Lskip:
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.Lb
    add:ue 0x200000100, $1, 0x200000100
    br:l,ue,a 0x200000100, $3, $.Louter
    exit:c
";

    #[test]
    fn loops_nest_and_each_instruction_has_one_innermost() {
        let program = program(NEST);
        // The region: from `.Louter` (instruction 1) up to `exit`.
        let code = &program.code()[1..14];
        let loops = region_loops(code, 1);
        // The outer loop first, then the two inner ones inside it.
        assert_eq!(loops.len(), 3, "{loops:?}");
        assert_eq!(loops[0], ((0, 12), None));
        assert!(loops[1..].iter().all(|&(_, parent)| parent == Some(0)));
        let mut inner: Vec<(usize, usize)> = loops[1..].iter().map(|&(span, _)| span).collect();
        inner.sort_unstable();
        assert_eq!(inner, vec![(2, 5), (7, 10)]);
    }

    #[test]
    fn a_straight_loop_with_moving_pointers_is_counted_and_a_branching_one_is_not() {
        let program = program(NEST);
        let code = program.code();
        let held = |word: u64| word == 0x2_0000_0108;
        let sites = counted_sites(code, 3, 6, held).expect("loop a is counted");
        assert_eq!(sites.len(), 1);
        assert_eq!(
            (sites[0].word, sites[0].offset, sites[0].stride),
            (0x2_0000_0108, 0, 8)
        );
        // Loop b has a branch inside; loop a is not counted if its pointer is not held.
        assert!(counted_sites(code, 8, 11, held).is_none());
        assert!(counted_sites(code, 3, 6, |_| false).is_none());
    }

    #[test]
    fn float_words_of_an_inner_loop_are_held_by_the_outermost_loop_around_it() {
        // 0x140 and 0x148 are used only as f64, inside the inner loop: the outer loop holds
        // them, so they are loaded and stored once per entry of the outer loop.
        let source = "main:
    mov $0:ue, 0x200000100:ue
.Louter:
    mov $4:ue, 0x200000110:ue
.La:
    sub:fd 0x200000130, 0x200000138, 0x200000140
    add:fd 0x200000148, 0x200000140, 0x200000148
    sub:ue 0x200000110, $1, 0x200000110
    br:nz,ue,a 0x200000110, $.La
    add:ue 0x200000100, $1, 0x200000100
    br:l,ue,a 0x200000100, $3, $.Louter
    exit:c
";
        let program = program(source);
        let code = &program.code()[1..9];
        let loops = region_loops(code, 1);
        assert_eq!(loops.len(), 2, "{loops:?}");
        let placed = placed_words(code, &loops);
        for word in [0x2_0000_0140, 0x2_0000_0148] {
            assert!(placed[0].contains(&(word, true, true)), "{placed:x?}");
        }
        assert!(placed[1].iter().all(|w| !w.2), "{placed:x?}");
    }

    #[test]
    fn a_loop_counted_down_by_one_to_zero_has_a_trip_word() {
        let program = program(NEST);
        let code = program.code();
        let held = |word: u64| word == 0x2_0000_0108 || word == 0x2_0000_0110;
        // Loop a (3..=6): `sub:ue W, $1, W` at 5, then `br:nz,ue W`.
        assert_eq!(trip_word(code, 3, 6, held), Some((0x2_0000_0110, 5)));
        // Not when the word is in memory, and not for the outer loop's `br:l`.
        assert_eq!(trip_word(code, 3, 6, |w| w == 0x2_0000_0108), None);
        assert_eq!(trip_word(code, 1, 13, |_| true), None);
        // Not when the word is written any other way (a second decrement, a step of 2).
        for body in [
            "sub:ue 0x200000110, $1, 0x200000110\n    sub:ue 0x200000110, $1, 0x200000110",
            "sub:ue 0x200000110, $2, 0x200000110",
            "add:ue 0x200000110, $1, 0x200000110",
        ] {
            let source = format!(
                "main:\n    mov $9:ue, 0x200000110:ue\n.L:\n    {body}\n    br:nz,ue,a 0x200000110, $.L\n    exit:c\n"
            );
            let program = self::program(&source);
            let code = program.code();
            let last = code.len() - 2;
            assert_eq!(trip_word(code, 1, last, |_| true), None, "{body}");
        }
    }

    #[test]
    fn the_inner_loops_words_are_placed_and_outer_counters_pass_through() {
        let program = program(NEST);
        let code = &program.code()[1..14];
        let loops = region_loops(code, 1);
        let placed = placed_words(code, &loops);
        let outer: Vec<u64> = placed[0].iter().map(|w| w.0).collect();
        // The counter of the inner loops (used in both) and the pointer's accumulator go to
        // the outer loop, as does its own counter; the pointer is set there too.
        for word in [0x2_0000_0100, 0x2_0000_0108, 0x2_0000_0110, 0x2_0000_0118] {
            assert!(outer.contains(&word), "{word:#x} in {outer:x?}");
        }
        assert!(
            placed.iter().flatten().all(|w| w.1),
            "every word is written"
        );
    }
}
