//! Runner ids and runtime stacks are reused once the fresh areas are exhausted: programs that
//! keep about a thousand runners alive spawn many times more runners than the areas hold, and
//! every one of them commits and finds its exit record "not ended" when it starts.

use dvm_engine::image::{self, Format, LoadedImage};
use dvm_engine::vm::{self, Config, FreshSlots, OutputMode, Report};

fn program(source: &str) -> LoadedImage {
    let image = dvm_engine::asm::assemble("slots.dasm", source).expect("the program assembles");
    image::validate(Format::Elf, image).expect("the program validates")
}

fn run(source: &str, fresh: u64, workers: usize) -> Report {
    let config = Config {
        output: OutputMode::Capture,
        workers: Some(workers),
        pin_workers: false,
        fresh_slots: FreshSlots::at_most(fresh),
        ..Config::default()
    };
    vm::run(program(source), config).expect("the program runs")
}

/// CHAINS chains of LENGTH runners each, all started by the root: each link checks that its
/// own exit record reads 0 (a stale status means a reused id was not reset: it aborts), then
/// spawns the next link (its remaining length in the child's stack) and commits.
fn forest(chains: u64, length: u64) -> String {
    format!(
        r#"
.equ STACK_BASE, 0x100000100
.equ RUNNER_ID, 0x100000120
.equ CHILD_STACK, 0x100000400
.equ N, 0x200000000
.equ T, 0x200000008
.equ STACK_DESC, 0x200001000
.equ NONE_DESC, 0x200001100
.equ LINK_WORD, 0x200001408

main:
    mov $link:ue, LINK_WORD:ue
    mov ${chains}:ue, N:ue
.Lroot:
    newr $STACK_DESC, $NONE_DESC, $NONE_DESC, $LINK_WORD
    mov ${length}:ue, 0(CHILD_STACK):ue
    sub:ue N, $1, N
    br:nz,ue,a N, $.Lroot
    exit:c

link:
    mov RUNNER_ID:ue, T:ue
    add:ue T, $0xff8, T
    mov (T):ue, T:ue
    br:nz,ue,a T, $.Lstale
    mov 0(STACK_BASE):ue, N:ue
    sub:ue N, $1, N
    br:z,ue,a N, $.Ldone
    mov $link:ue, LINK_WORD:ue
    newr $STACK_DESC, $NONE_DESC, $NONE_DESC, $LINK_WORD
    mov N:ue, 0(CHILD_STACK):ue
.Ldone:
    exit:c
.Lstale:
    exit:a
"#
    )
}

#[test]
fn a_thousand_live_runners_spawn_far_more_than_the_fresh_areas_hold() {
    let (chains, length, fresh) = (1000, 24, 6000);
    for workers in [1, 2] {
        let report = run(&forest(chains, length), fresh, workers);
        let stats = &report.stats;
        let stderr = String::from_utf8_lossy(&report.stderr);
        assert_eq!(report.exit_code(), 0, "{workers} workers: {stderr}");
        assert!(
            chains * length > 3 * fresh,
            "the areas are reused several times"
        );
        assert_eq!(
            stats.runners_committed,
            1 + chains * length,
            "{workers} workers: every link commits; none saw a stale exit record ({} aborted)",
            stats.runners_aborted
        );
        assert_eq!(stats.runners_aborted + stats.runners_faulted, 0);
    }
}

#[test]
fn without_reuse_the_same_program_runs_out_of_ids() {
    // The same forest, but the areas hold fewer runners than exist at once: a spawn faults.
    let report = run(&forest(1000, 2), 600, 1);
    assert_eq!(report.exit_code(), 1);
    let stderr = String::from_utf8_lossy(&report.stderr);
    assert!(
        stderr.contains("exhausted"),
        "the fault says what ran out: {stderr}"
    );
}

/// Parents that abort: their children never exist, and their ids and stacks are free at once.
#[test]
fn ids_and_stacks_of_children_that_never_existed_are_reused() {
    let source = r#"
.equ CHILD_STACK, 0x100000400
.equ N, 0x200000000
.equ M, 0x200000008
.equ STACK_DESC, 0x200001000
.equ NONE_DESC, 0x200001100
.equ WORD, 0x200001408

main:
    mov $batch:ue, WORD:ue
    mov $50:ue, N:ue
.Lspawn:
    newr $STACK_DESC, $NONE_DESC, $NONE_DESC, $WORD
    sub:ue N, $1, N
    br:nz,ue,a N, $.Lspawn
    exit:c

# Each batch spawns 100 children and aborts: they never exist.
batch:
    mov $child:ue, WORD:ue
    mov $100:ue, M:ue
.Lchild:
    newr $STACK_DESC, $NONE_DESC, $NONE_DESC, $WORD
    sub:ue M, $1, M
    br:nz,ue,a M, $.Lchild
    exit:a

child:
    exit:c
"#;
    // 5,000 children through 256 slots. One worker, so one batch (100 children) and the 51
    // others are live at once. (With more workers the bound is not fixed: an ending whose
    // timestamp waits behind a preempted worker's keeps its children's slots until it takes
    // effect, so any number of finished batches may hold theirs; the forest test above covers
    // two workers.)
    let report = run(source, 256, 1);
    let stderr = String::from_utf8_lossy(&report.stderr);
    assert_eq!(report.exit_code(), 0, "{stderr}");
    assert_eq!(report.stats.runners_committed, 1, "the root");
    assert_eq!(
        report.stats.runners_aborted, 50,
        "every batch, none faulted"
    );
    assert_eq!(report.stats.runners_started, 1 + 50, "no child ever ran");
}
