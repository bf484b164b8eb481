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

/// The `dvm` process a launch command started (it runs under `timeout` and `on`, which exec
/// into it): the child of `launcher_pid` once its program is `dvm`.
fn dvm_pid_under(launcher_pid: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{launcher_pid}/task/{launcher_pid}/children"))
            .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "dvm")
        })
}

/// `kill -9` of a non-root node in the middle of k-means on the three namespace hosts, three
/// times in a row: every run prints exactly the one-node output, the surviving nodes succeed,
/// and node 0's report names the lost node and the runners that ran again.
#[test]
fn a_node_killed_mid_kmeans_on_namespace_hosts_changes_nothing_three_times() {
    let test = "a_node_killed_mid_kmeans_on_namespace_hosts_changes_nothing_three_times";
    let (dir, args, expected) = long_kmeans("kill-kmeans");
    let Some(hosts) = Hosts::up(test) else { return };
    for round in 0..3u32 {
        let list = format!("h1:{p},h2:{p},h3:{p}", p = 7781 + round);
        let mut children: Vec<_> = (0..3u32)
            .map(|rank| {
                let rank_text = rank.to_string();
                let mut node_args = args_ref(&args);
                node_args.extend([
                    "--hosts",
                    &list,
                    "--rank",
                    &rank_text,
                    "--peer-timeout-ms",
                    "3000",
                ]);
                let host = format!("h{}", rank + 1);
                let mut cmd = hosts.on_program(&host, &[], &dvm(), &node_args, 120);
                cmd.env("DVM_JOB_TOKEN", format!("kill-kmeans-{round}"));
                Some(spawn(&mut cmd, &format!("node {rank} on {host}")))
            })
            .collect();
        let victim = 1 + (round as usize) % 2;
        let launcher_pid = children[victim].as_ref().map_or(0, |child| child.id());
        std::thread::sleep(Duration::from_millis(2000 + 300 * u64::from(round)));
        let pid = dvm_pid_under(launcher_pid).expect("the victim's dvm process");
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let rans: Vec<Option<Ran>> = children
            .iter_mut()
            .map(|child| {
                child
                    .take()
                    .map(|child| wait_child(child, Duration::from_secs(120), "a node"))
            })
            .collect();
        let all = rans
            .iter()
            .flatten()
            .map(Ran::describe)
            .collect::<Vec<_>>()
            .join("\n");
        for (rank, ran) in rans.iter().enumerate() {
            let Some(ran) = ran else { continue };
            if rank == victim {
                assert!(
                    !ran.status.success(),
                    "round {round}: node {rank} was killed:\n{all}"
                );
            } else {
                assert!(
                    ran.status.success(),
                    "round {round}: node {rank} goes on:\n{all}"
                );
            }
        }
        let zero = rans[0].as_ref().expect("node 0 ran");
        assert_eq!(zero.stdout, expected, "round {round}:\n{all}");
        assert!(
            zero.stderr.contains(&format!("dvm: node {victim} ("))
                && zero.stderr.contains("ran again"),
            "round {round}: node 0 names node {victim} and the runners that ran again:\n{all}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `dvm` process whose environment says it is `var=value` (a launcher's rank variable).
fn dvm_pid_with(var: &str, value: &str) -> Option<u32> {
    let wanted = format!("{var}={value}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            comm.trim() == "dvm" && environ.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes())
        })
}

/// Under `mpirun --enable-recovery` (Open MPI 4.1), a rank killed mid-k-means does not end the
/// job: node 0 prints exactly the one-node output and mpirun exits 0. (Without the option
/// mpirun aborts the job and kills every rank: docs/CLUSTER.md.)
#[test]
fn mpirun_enable_recovery_survives_a_killed_rank() {
    let test = "mpirun_enable_recovery_survives_a_killed_rank";
    if !available("mpirun.openmpi") {
        skip(
            test,
            "mpirun.openmpi is not installed (scripts/install-deps installs it)",
        );
        return;
    }
    let (dir, args, expected) = long_kmeans("mpirun-kmeans");
    let mut cmd = launch_command(
        &[
            "mpirun.openmpi",
            "--oversubscribe",
            "--enable-recovery",
            "-n",
            "3",
        ],
        &dvm(),
        &args_ref(&args),
        120,
    );
    let child = spawn(&mut cmd, "mpirun");
    std::thread::sleep(Duration::from_millis(2500));
    let pid = dvm_pid_with("OMPI_COMM_WORLD_RANK", "2").expect("rank 2's dvm");
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let ran = wait_child(child, Duration::from_secs(120), "mpirun");
    let all = ran.describe();
    assert!(ran.status.success(), "{all}");
    assert_eq!(ran.stdout, expected, "{all}");
    assert!(ran.stderr.contains("dvm: node 2 ("), "{all}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The k-means runs the fault tests lose a node in: long enough (seconds) to strike in the
/// middle. The `dvm run` arguments and the one-node output.
fn long_kmeans(name: &str) -> (PathBuf, Vec<String>, String) {
    let dir = repo().join(format!("target/tmp/{name}-{}", std::process::id()));
    // 300 iterations: about 3 s on one node of a 2-vCPU host and 5 s on three, so a node
    // killed 2-3 s in is killed mid-run even when the host is idle (100 iterations ended
    // before the kill there).
    let loads = common::kmeans_loads(&dir, 20_000, 8, 16, 300, 12);
    let mut args: Vec<String> = vec![
        "run".into(),
        repo().join("examples/kmeans.dasm").display().to_string(),
        "--workers".into(),
        "1".into(),
        "--no-pin".into(),
    ];
    for load in &loads {
        args.extend(["--load".to_string(), load.clone()]);
    }
    let one = Command::new(dvm())
        .args(&args)
        .output()
        .expect("a one-node run");
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    (dir, args, String::from_utf8_lossy(&one.stdout).into_owned())
}

/// Starts `args` as ranks 0..3 on h1..h3 with `--hosts` at `port`.
fn start_on_hosts(
    hosts: &Hosts,
    args: &[String],
    port: u32,
    token: &str,
) -> Vec<std::process::Child> {
    let list = format!("h1:{port},h2:{port},h3:{port}");
    (0..3u32)
        .map(|rank| {
            let rank_text = rank.to_string();
            let mut node_args = args_ref(args);
            node_args.extend([
                "--hosts",
                &list,
                "--rank",
                &rank_text,
                "--peer-timeout-ms",
                "2000",
            ]);
            let host = format!("h{}", rank + 1);
            let mut cmd = hosts.on_program(&host, &[], &dvm(), &node_args, 120);
            cmd.env("DVM_JOB_TOKEN", token);
            spawn(&mut cmd, &format!("node {rank} on {host}"))
        })
        .collect()
}

/// 20% of the packets h3 receives are dropped for 5 s in the middle of k-means: TCP
/// retransmits, so the run is slower; node 0 prints exactly the one-node output, and a node
/// that went silent past the peer timeout meanwhile is named lost by node 0 (the run goes on
/// without it): never a hang, never a wrong answer.
#[test]
fn packet_loss_on_one_host_mid_kmeans_gives_the_right_output() {
    let test = "packet_loss_on_one_host_mid_kmeans_gives_the_right_output";
    let (dir, args, expected) = long_kmeans("loss-kmeans");
    let Some(hosts) = Hosts::up(test) else { return };
    let children = start_on_hosts(&hosts, &args, 7795, "loss-kmeans");
    std::thread::sleep(Duration::from_millis(1500));
    hosts.loss("h3", 20);
    std::thread::sleep(Duration::from_secs(5));
    hosts.loss("h3", 0);
    let rans: Vec<Ran> = children
        .into_iter()
        .map(|child| wait_child(child, Duration::from_secs(120), "a node"))
        .collect();
    let all = merge(&rans).describe();
    assert!(rans[0].status.success(), "{all}");
    assert_eq!(rans[0].stdout, expected, "{all}");
    for (rank, ran) in rans.iter().enumerate().skip(1) {
        // A node is either in the run to its end or named lost by node 0.
        let named = rans[0].stderr.contains(&format!("dvm: node {rank} ("));
        assert!(ran.status.success() || named, "node {rank}:\n{all}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// h3's link goes down (silent loss at the switch) in the middle of k-means: nodes 0 and 1
/// finish with exactly the one-node output; node 2, cut off from node 0, ends with a report
/// naming it; nobody hangs.
#[test]
fn a_link_down_mid_kmeans_leaves_the_right_output_or_a_clear_report() {
    let test = "a_link_down_mid_kmeans_leaves_the_right_output_or_a_clear_report";
    let (dir, args, expected) = long_kmeans("link-kmeans");
    let Some(hosts) = Hosts::up(test) else { return };
    let list = "h1:7791,h2:7791,h3:7791";
    let children: Vec<_> = (0..3u32)
        .map(|rank| {
            let rank_text = rank.to_string();
            let mut node_args = args_ref(&args);
            node_args.extend([
                "--hosts",
                list,
                "--rank",
                &rank_text,
                "--peer-timeout-ms",
                "2000",
            ]);
            let host = format!("h{}", rank + 1);
            let mut cmd = hosts.on_program(&host, &[], &dvm(), &node_args, 120);
            cmd.env("DVM_JOB_TOKEN", "link-kmeans");
            spawn(&mut cmd, &format!("node {rank} on {host}"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2000));
    hosts.link("down", "h3");
    let rans: Vec<Ran> = children
        .into_iter()
        .map(|child| wait_child(child, Duration::from_secs(120), "a node"))
        .collect();
    hosts.link("up", "h3");
    let all = merge(&rans).describe();
    assert!(
        rans[0].status.success() && rans[1].status.success(),
        "{all}"
    );
    assert_eq!(rans[0].stdout, expected, "{all}");
    assert!(
        rans[0].stderr.contains("dvm: node 2 (") && rans[0].stderr.contains("was lost"),
        "node 0 names node 2:\n{all}"
    );
    assert!(!rans[2].status.success(), "node 2 cannot go on:\n{all}");
    assert!(
        rans[2].stderr.contains("node 0 (") && rans[2].stderr.contains("was lost"),
        "node 2 says it lost node 0:\n{all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
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
                    // One holder per page: the run cannot go on without a node.
                    "--replicas",
                    "1",
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
