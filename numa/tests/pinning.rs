//! Pinning threads to OS processors, checked against the kernel's own view.

// Tests fail loudly on purpose: an unwrap here is an assertion.
#![allow(clippy::unwrap_used)]

use dvm_numa::{pin_current_thread, PinError, Topology};

/// The kernel's view of the calling thread: (allowed CPUs as listed in
/// /proc/thread-self/status, CPU it last ran on from /proc/thread-self/stat).
fn kernel_view() -> (String, u32) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the parenthesised command name start at field 3; "processor" is field 39.
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let processor = after_comm
        .split_whitespace()
        .nth(39 - 3)
        .unwrap()
        .parse()
        .unwrap();
    (allowed, processor)
}

#[test]
fn pinned_thread_may_run_only_on_its_pu() {
    let topology = Topology::detect();
    for slot in topology.plan_workers(topology.cores().len()) {
        let pu = slot.pu;
        std::thread::spawn(move || {
            pin_current_thread(pu).unwrap();
            assert_eq!(dvm_numa::current_thread_pus().unwrap(), vec![pu]);
            std::thread::yield_now();
            let (allowed, processor) = kernel_view();
            assert_eq!(
                allowed,
                pu.to_string(),
                "kernel affinity list after pinning to {pu}"
            );
            assert_eq!(processor, pu, "a pinned thread runs on its PU");
        })
        .join()
        .unwrap();
    }
}

#[test]
fn absurd_pu_ids_are_errors_and_leave_affinity_alone() {
    std::thread::spawn(|| {
        let before = dvm_numa::current_thread_pus().unwrap();
        for pu in [100_000, u32::MAX] {
            let error = pin_current_thread(pu).unwrap_err();
            assert!(
                matches!(error, PinError::OutOfRange { pu: p, .. } if p == pu),
                "{error:?}"
            );
            assert!(error.to_string().contains(&pu.to_string()), "{error}");
        }
        // Inside the mask's range but (on any machine this runs on) not a real processor:
        // the kernel refuses it.
        let error = pin_current_thread(1023).unwrap_err();
        assert!(
            matches!(error, PinError::Unavailable { pu: 1023, .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("1023"), "{error}");
        assert_eq!(dvm_numa::current_thread_pus().unwrap(), before);
    })
    .join()
    .unwrap();
}
