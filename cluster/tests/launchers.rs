//! Launch detection and rendezvous under the real launchers on this host: this test binary
//! re-runs itself under `mpirun` (Open MPI) and `mpiexec.mpich` (Hydra) as 3 ranks, each rank
//! detecting its place from the environment the launcher really set, then meeting the others
//! on 127.0.0.1. A launcher that is not installed is reported and skipped (`scripts/install-deps`
//! installs them). Slurm and multi-host launches are in `cluster_launch.rs`.

mod common;

use common::{check_job, child_command, run, skip};

const WORLD: u32 = 3;

/// The rank's side, run by the tests below under a launcher.
#[test]
#[ignore = "run by the launcher tests, under a launcher"]
fn child_rank() {
    common::child::child_main();
}

/// Runs this binary's `child_rank` under `launcher`, checks what the ranks printed.
fn run_under(test: &str, launcher: &[&str], want_source: &str) {
    let program = launcher.first().copied().unwrap_or_default();
    if !common::available(program) {
        skip(test, &format!("{program} is not installed"));
        return;
    }
    let ran = run(&mut child_command(launcher, 60));
    check_job(&ran, WORLD, want_source);
    for (rank, line) in ran.ranks().iter().enumerate() {
        let l = &line.line;
        assert_eq!(line.get("local"), format!("{rank}/{WORLD}"), "{l}");
        assert!(line.get("coordinator").starts_with("127.0.0.1:"), "{l}");
    }
}

#[test]
fn under_open_mpi_mpirun() {
    let n = WORLD.to_string();
    run_under(
        "under_open_mpi_mpirun",
        &["mpirun.openmpi", "--oversubscribe", "-n", &n],
        "OpenMpi",
    );
}

#[test]
fn under_mpich_hydra_mpiexec() {
    let n = WORLD.to_string();
    run_under(
        "under_mpich_hydra_mpiexec",
        &["mpiexec.mpich", "-n", &n],
        "Hydra",
    );
}
