//! The perf map belongs to this process: a file left under the same pid by an earlier process
//! (pids are reused) is replaced at the first compiled region, not appended to. Alone in its
//! test binary, since the first write of a process is what truncates.

mod common;

use dvm_jit::{perf_map_path, DvmJit, JitOptions};
use std::sync::Arc;

#[test]
fn a_stale_perf_map_under_this_pid_is_replaced() {
    let path = perf_map_path();
    std::fs::write(&path, "7f0000000000 10 dvm:not_this_process\n").expect("a stale map");
    let jit = Arc::new(
        DvmJit::new(JitOptions {
            threshold: 1,
            perf_map: true,
            local_labels: Vec::new(),
            background: false,
        })
        .expect("the JIT sets up on this host"),
    );
    let source = ".equ N, 0x200000000\nmain:\n    mov $0:ue, N:ue\nagain:\n    add:ue N, $1, N\n    br:l,ue,a N, $100, $again\n    exit:c\n";
    let observed = common::run(source, u64::MAX, Some(Arc::clone(&jit)));
    let map = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    assert_eq!(observed.exit_code, 0, "{observed:?}");
    assert!(jit.stats().regions >= 1, "the loop was compiled");
    assert!(
        !map.contains("not_this_process"),
        "the stale entry stayed:\n{map}"
    );
    assert!(
        map.lines().any(|line| line.ends_with(" dvm:again")),
        "{map}"
    );
}
