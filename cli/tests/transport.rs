//! `dvm transport` and `dvm run --transport auto|rdma|tcp` on the machine the tests run on.
//! The build machines have no RDMA device; where one is present the tests check the other
//! branch (RDMA found, but the RDMA cluster transport is not in this build yet: refused plainly).
//! Over a real device these run in the soft-RoCE guest (`scripts/rdma-guest`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dvm(args: &[&str], log: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dvm"));
    command.args(args).env_remove("DVM_LOG");
    if let Some(level) = log {
        command.env("DVM_LOG", level);
    }
    command.output().expect("dvm runs")
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether the kernel lists any RDMA device.
fn rdma_device_present() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

/// The reasons `verbs::NoRdma` gives for a host with no device.
const NO_DEVICE_REASONS: [&str; 3] = [
    "the kernel has no RDMA support (ibv_get_device_list: ENOSYS)",
    "no RDMA device node (ibv_get_device_list: ENODEV)",
    "no RDMA devices (the device list is empty)",
];

#[test]
fn dvm_transport_says_what_dvm_run_would_use_and_why() {
    let out = dvm(&["transport"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    if rdma_device_present() {
        assert!(stdout.contains("RDMA device "), "{stdout}");
        assert!(stdout.contains("port 1: "), "{stdout}");
        assert!(
            stdout.contains("dvm run uses TCP (io_uring): RDMA device"),
            "{stdout}"
        );
    } else {
        let first = stdout.lines().next().unwrap_or_default();
        assert!(
            NO_DEVICE_REASONS
                .iter()
                .any(|why| first == format!("no RDMA: {why}; dvm run uses TCP (io_uring)")),
            "{stdout}"
        );
        assert!(
            stdout.contains("dvm run --transport rdma would fail: --transport rdma: no RDMA: "),
            "{stdout}"
        );
    }
}

#[test]
fn forcing_rdma_fails_before_any_work_with_the_reason() {
    // The program does not exist: an error about RDMA, not about the file, shows that the
    // transport is checked before anything is read or started.
    let out = dvm(
        &[
            "run",
            "--nodes",
            "2",
            "--transport",
            "rdma",
            "/nonexistent/program.dasm",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one clear error: {stderr}");
    if rdma_device_present() {
        // RDMA can be had: the error is the missing program's.
        assert!(stderr.contains("/nonexistent/program.dasm"), "{stderr}");
    } else {
        assert!(
            stderr.starts_with("error: --transport rdma: no RDMA: "),
            "{stderr}"
        );
        assert!(
            NO_DEVICE_REASONS.iter().any(|why| stderr.contains(why)),
            "{stderr}"
        );
    }
    assert!(stdout_is_empty(&out));
}

fn stdout_is_empty(out: &Output) -> bool {
    out.stdout.is_empty()
}

#[test]
fn auto_on_two_nodes_says_its_choice_and_why_once() {
    let hello = example("hello.dasm");
    let out = dvm(
        &["run", "--nodes", "2", hello.to_str().expect("utf-8 path")],
        Some("info"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello from DVM!\n");
    let stderr = text(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("transport: "))
        .collect();
    assert_eq!(said.len(), 1, "said once per job: {stderr}");
    if rdma_device_present() {
        assert!(
            said[0].contains("transport: RDMA verbs: device"),
            "{stderr}"
        );
    } else {
        assert!(
            said[0].contains("transport: TCP (io_uring): no RDMA: "),
            "{stderr}"
        );
    }
    // Without DVM_LOG, a normal run says nothing about it.
    let quiet = dvm(
        &["run", "--nodes", "2", hello.to_str().expect("utf-8 path")],
        None,
    );
    assert_eq!(quiet.status.code(), Some(0));
    assert!(
        !text(&quiet.stderr).contains("transport"),
        "{}",
        text(&quiet.stderr)
    );
}

#[test]
fn tcp_when_asked_for_without_probing() {
    let hello = example("hello.dasm");
    let out = dvm(
        &[
            "run",
            "--nodes",
            "2",
            "--transport",
            "tcp",
            hello.to_str().expect("utf-8 path"),
        ],
        Some("info"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello from DVM!\n");
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr
            .matches("transport: TCP (io_uring): asked for with --transport tcp")
            .count(),
        1,
        "{stderr}"
    );
    // One node needs no transport: `tcp` and `auto` both run it.
    let one = dvm(
        &[
            "run",
            "--transport",
            "tcp",
            hello.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert_eq!(one.status.code(), Some(0));
    let bad = dvm(
        &[
            "run",
            "--transport",
            "infiniband",
            hello.to_str().expect("utf-8 path"),
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("possible values: auto, rdma, tcp"));
}
