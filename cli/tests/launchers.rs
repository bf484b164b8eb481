//! `dvm run` launched the way HPC users launch jobs, for real: `mpirun -n 3` and `srun -n 3` on
//! this host, and three hosts made of network namespaces (one `dvm` per host, joined over their
//! own addresses) — each must print exactly what one node prints. Cutting a host's link in the
//! middle of a run must end the run on every host within a bound, with a report naming it.
//!
//! The fixtures (Slurm, the namespace hosts, bounded launches) are the cluster crate's test
//! harness (`cluster/tests/common`, driving `scripts/cluster`). A launcher that cannot run here
//! (not root, not installed) is reported as `*** SKIPPED ... ***` on stderr.

#[path = "../../cluster/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::cluster::{merge, spawn, wait_child, Hosts, Slurm};
use common::{available, launch_command, repo, run, script, skip, Ran};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn dvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dvm"))
}

/// The conformance suite's reduced k-means: several partitions, remote pages and commits.
fn kmeans_args() -> Vec<String> {
    let dir = repo().join("tests/conformance");
    vec![
        "run".into(),
        dir.join("workload_kmeans.dasm").display().to_string(),
        "--workers".into(),
        "1".into(),
        "--load".into(),
        format!(
            "{}@0x4000000000",
            dir.join("data/kmeans_params.bin").display()
        ),
        "--load".into(),
        format!(
            "{}@0x5000000000",
            dir.join("data/kmeans_data.bin").display()
        ),
    ]
}

fn one_node_output() -> String {
    let output = Command::new(dvm())
        .args(kmeans_args())
        .output()
        .expect("a one-node run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains("checksum"), "{stdout}");
    stdout
}

fn args_ref(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Every rank succeeded and the job printed exactly `expected` (only node 0 prints).
fn check_same_output(ran: &Ran, expected: &str) {
    assert!(ran.status.success(), "the job failed:\n{}", ran.describe());
    assert_eq!(ran.stdout, expected, "{}", ran.describe());
}

#[test]
fn mpirun_three_ranks_print_what_one_node_prints() {
    let test = "mpirun_three_ranks_print_what_one_node_prints";
    if !available("mpirun.openmpi") {
        skip(
            test,
            "mpirun.openmpi is not installed (scripts/install-deps installs it)",
        );
        return;
    }
    let expected = one_node_output();
    let args = kmeans_args();
    let mut cmd = launch_command(
        &["mpirun.openmpi", "--oversubscribe", "-n", "3"],
        &dvm(),
        &args_ref(&args),
        120,
    );
    check_same_output(&run(&mut cmd), &expected);
}

#[test]
fn srun_three_tasks_print_what_one_node_prints() {
    let test = "srun_three_tasks_print_what_one_node_prints";
    let expected = one_node_output();
    let Some(slurm) = Slurm::up(test) else { return };
    let args = kmeans_args();
    let mut cmd = slurm.srun_program(&["-n", "3"], &dvm(), &args_ref(&args), 120);
    check_same_output(&run(&mut cmd), &expected);
}

#[test]
fn mpirun_across_three_namespace_hosts_prints_what_one_node_prints() {
    let test = "mpirun_across_three_namespace_hosts_prints_what_one_node_prints";
    if !available("mpirun.openmpi") {
        skip(
            test,
            "mpirun.openmpi is not installed (scripts/install-deps installs it)",
        );
        return;
    }
    let expected = one_node_output();
    let Some(hosts) = Hosts::up(test) else { return };
    let agent = script("onrsh");
    let agent = agent.to_str().expect("UTF-8 path");
    let args = kmeans_args();
    let mut cmd = hosts.on_program(
        "h1",
        &[
            "mpirun.openmpi",
            "--mca",
            "plm_rsh_agent",
            agent,
            "--host",
            "h1,h2,h3",
            "-n",
            "3",
            "-x",
            "DVM_COORD=h1:7761",
        ],
        &dvm(),
        &args_ref(&args),
        120,
    );
    check_same_output(&run(&mut cmd), &expected);
}

/// A program whose six runners each count to 3*10^11 (minutes even compiled by the JIT): long
/// enough to cut a link under it.
fn spin_program() -> PathBuf {
    let path = repo().join("target/cluster-spin.dasm");
    std::fs::create_dir_all(repo().join("target")).expect("target/");
    std::fs::write(
        &path,
        ".equ K, 0x200000000\nmain:\n    mov $0:ue, K:ue\nagain:\n    newr $auto_stack, $no_use, $no_watch, $s_entry\n    add:ue K, $1, K\n    br:l,ue,a K, $6, $again\n    exit:c\nspin:\n    mov $0:ue, K:ue\nloop:\n    add:ue K, $1, K\n    br:l,ue,a K, $300000000000, $loop\n    exit:c\n.rodata\nauto_stack: .quad 0, 0\nno_watch: .quad 0\nno_use: .quad 0\ns_entry: .quad spin\n",
    )
    .expect("the program");
    path
}

#[test]
fn a_host_whose_link_goes_down_mid_run_is_named_within_the_bound() {
    let test = "a_host_whose_link_goes_down_mid_run_is_named_within_the_bound";
    let Some(hosts) = Hosts::up(test) else { return };
    let program = spin_program();
    let program = program.display().to_string();
    let list = "h1:7771,h2:7771,h3:7771";
    let children: Vec<_> = (0..3)
        .map(|rank| {
            let rank = rank.to_string();
            let host = format!("h{}", rank.parse::<u32>().unwrap_or(0) + 1);
            let mut cmd = hosts.on_program(
                &host,
                &[],
                &dvm(),
                &[
                    "run",
                    &program,
                    "--workers",
                    "1",
                    "--no-pin",
                    "--hosts",
                    list,
                    "--rank",
                    &rank,
                    "--peer-timeout-ms",
                    "2000",
                ],
                60,
            );
            cmd.env("DVM_JOB_TOKEN", "link-down-test");
            spawn(&mut cmd, &format!("node {rank} on {host}"))
        })
        .collect();
    // Let the nodes join and start their runners, then cut h3 off (silent loss).
    std::thread::sleep(Duration::from_secs(3));
    hosts.link("down", "h3");
    let cut = Instant::now();
    let rans: Vec<Ran> = children
        .into_iter()
        .map(|child| wait_child(child, Duration::from_secs(50), "a node"))
        .collect();
    let elapsed = cut.elapsed();
    hosts.link("up", "h3");
    let all = merge(&rans).describe();
    assert!(
        rans.iter().all(|ran| !ran.status.success()),
        "every node stops:\n{all}"
    );
    assert!(
        rans[0].stderr.contains("node 2 (") && rans[0].stderr.contains("was lost"),
        "node 0 names the node cut off:\n{all}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "ended {elapsed:?} after the cut:\n{all}"
    );
}
