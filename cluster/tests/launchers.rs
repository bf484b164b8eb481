//! Launch detection and rendezvous under the real launchers: this test binary re-runs itself
//! under `mpirun` (Open MPI) and `mpiexec.mpich` (Hydra) as 3 ranks on this host, each rank
//! detecting its place from the environment the launcher really set, then meeting the others
//! on 127.0.0.1. A launcher that is not installed is reported and skipped (see
//! `shared/design/launchers-ci.md` for installing them).

use dvm_cluster::launch::{self, Explicit, HostFacts, LaunchSource};
use dvm_cluster::rendezvous::rendezvous;
use std::net::TcpListener;
use std::process::Command;

/// Set in the children's environment: the child test below only runs when it is set.
const CHILD_VAR: &str = "DVM_CLUSTER_TEST_CHILD";
const WORLD: u32 = 3;

/// The rank's side: detect, listen, rendezvous, print one line for the parent. Ignored in
/// normal runs; the launches below run it with `--ignored`.
#[test]
#[ignore = "run by the launcher tests, under a launcher"]
fn child_rank() {
    assert!(
        std::env::var_os(CHILD_VAR).is_some(),
        "only meaningful under a launcher started by the tests below"
    );
    let env = launch::process_env();
    let l = launch::detect(&env, &Explicit::default(), &HostFacts::probe())
        .expect("the launcher's environment is understood")
        .expect("a launcher is detected");
    let data = TcpListener::bind("127.0.0.1:0").expect("data listener on loopback");
    let my_addr = data.local_addr().expect("listener address");
    let table = rendezvous(&l, my_addr, 20_000).expect("rendezvous completes");
    let table: Vec<String> = table.iter().map(ToString::to_string).collect();
    println!(
        "DVM-RANK rank={} world={} local={}/{} source={:?} coordinator={} me={} table={}",
        l.rank,
        l.world,
        l.local_rank,
        l.local_size,
        l.source,
        l.coordinator,
        my_addr,
        table.join(",")
    );
}

fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs this binary's `child_rank` under `launcher_args`, checks what the ranks printed.
fn run_under(launcher_args: &[&str], want_source: LaunchSource) {
    let Some(program) = launcher_args.first() else {
        panic!("no launcher given");
    };
    if !available(program) {
        eprintln!("{program} is not installed: skipping its launch test");
        return;
    }
    let me = std::env::current_exe().expect("test binary path");
    let output = Command::new("timeout")
        .arg("60")
        .args(launcher_args)
        .arg(&me)
        .args(["--ignored", "--exact", "child_rank", "--nocapture"])
        .env(CHILD_VAR, "1")
        // Needed as root, harmless otherwise.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("DVM_COORD")
        .env_remove("DVM_JOB_TOKEN")
        .env_remove("DVM_JOB_TOKEN_FILE")
        .output()
        .expect("the launcher starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{launcher_args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let mut lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("DVM-RANK ").map(|(_, rest)| rest))
        .collect();
    lines.sort();
    assert_eq!(lines.len(), WORLD as usize, "one line per rank:\n{stdout}");
    let field = |line: &str, key: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_default()
            .to_string()
    };
    let first_table = field(lines.first().copied().unwrap_or_default(), "table");
    for (rank, line) in lines.iter().enumerate() {
        assert_eq!(field(line, "rank"), rank.to_string(), "{line}");
        assert_eq!(field(line, "world"), WORLD.to_string(), "{line}");
        assert_eq!(field(line, "local"), format!("{rank}/{WORLD}"), "{line}");
        assert_eq!(field(line, "source"), format!("{want_source:?}"), "{line}");
        assert!(
            field(line, "coordinator").starts_with("127.0.0.1:"),
            "{line}"
        );
        // Every rank got the same table, and its own entry is its own listener.
        assert_eq!(field(line, "table"), first_table, "{line}");
        let table = field(line, "table");
        let entry = table.split(',').nth(rank).unwrap_or_default();
        assert_eq!(entry, field(line, "me"), "{line}");
    }
}

#[test]
fn under_open_mpi_mpirun() {
    let n = WORLD.to_string();
    run_under(
        &["mpirun.openmpi", "--oversubscribe", "-n", &n],
        LaunchSource::OpenMpi,
    );
}

#[test]
fn under_mpich_hydra_mpiexec() {
    let n = WORLD.to_string();
    run_under(&["mpiexec.mpich", "-n", &n], LaunchSource::Hydra);
}
