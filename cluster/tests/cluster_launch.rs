//! Launch detection and rendezvous under real multi-process launchers that need a cluster:
//! Slurm's `srun` on a single-host Slurm (`scripts/cluster/slurm-up`), and `srun`, `mpirun`,
//! `mpiexec` and explicit `--hosts/--rank` across three hosts made of network namespaces
//! (`scripts/cluster/netns-up`, `on`, `onrsh`, `link-down`, `slurm-up --netns`). As in
//! `launchers.rs`, this binary re-runs itself (`child_rank`) as each rank.
//!
//! These need root. When something genuinely cannot run here (not root, a tool missing,
//! namespaces not permitted) the test says so loudly (`*** SKIPPED ...`) and returns.
//! Tests that share Slurm, or the namespace hosts, take a lock; the two groups run in parallel.

mod common;

use common::cluster::{merge, spawn, wait_child, wait_listening, Hosts, Slurm};
use common::{
    check_job, run, script, skip, state_dir, Ran, DEADLINE_VAR, HOSTS_VAR, LISTEN_VAR, RANK_VAR,
    WAIT_FILE_VAR,
};
use std::process::Child;
use std::time::{Duration, Instant};

/// The rank's side, run by the tests below under a launcher.
#[test]
#[ignore = "run by the cluster launch tests, under a launcher"]
fn child_rank() {
    common::child::child_main();
}

/// The coordinator port derived for a Slurm step (see `launch`'s module doc).
fn slurm_port(job: u64, step: u64) -> u16 {
    dvm_cluster::launch::slurm_coordinator_port(job, step)
}

/// `srun -n 3`: each task is detected as a Slurm rank, and rank 0 is found at the first host of
/// `SLURM_STEP_NODELIST` (`localhost`) on the port derived from the job id. Then the same with
/// `srun --mpi=pmi2`, which adds Slurm's own `PMI_RANK`/`PMI_SIZE` (without Hydra's
/// `MPI_LOCAL*`): they agree with Slurm's, and the ranks are still Slurm's.
#[test]
fn srun_three_tasks_meet_at_the_step_nodelist() {
    let test = "srun_three_tasks_meet_at_the_step_nodelist";
    let Some(slurm) = Slurm::up(test) else { return };
    for extra in [None, Some("--mpi=pmi2")] {
        let mut args = vec!["-n", "3"];
        args.extend(extra);
        let ran = run(&mut slurm.srun(&args, 40));
        check_job(&ran, 3, "Slurm");
        let lines = ran.ranks();
        let job: u64 = lines
            .first()
            .and_then(|l| l.get("job").parse().ok())
            .unwrap_or_else(|| panic!("no job id printed:\n{}", ran.describe()));
        for (rank, line) in lines.iter().enumerate() {
            let l = &line.line;
            assert_eq!(line.get("local"), format!("{rank}/3"), "{l}");
            assert_eq!(line.get("job"), job.to_string(), "{l}");
            assert_eq!(
                line.get("pmi"),
                if extra.is_some() { "yes" } else { "no" },
                "{l}"
            );
            // A job started by srun runs its tasks as step 0.
            assert_eq!(
                line.get("coordinator"),
                format!("localhost:{}", slurm_port(job, 0)),
                "{l}"
            );
        }
        assert!(ran.elapsed < Duration::from_secs(20), "{}", ran.describe());
    }
}

/// Two steps of one allocation running at the same time are two jobs: each meets its own rank 0
/// (they derive different coordinator ports), neither is refused.
#[test]
fn concurrent_srun_steps_of_one_allocation_do_not_collide() {
    let test = "concurrent_srun_steps_of_one_allocation_do_not_collide";
    let Some(slurm) = Slurm::up(test) else { return };
    let alloc = slurm.allocate(6);
    let go = state_dir("slurm").join(format!("go-{}", alloc.job));
    let _ = std::fs::remove_file(&go);
    // Step 0's peers wait until step 1 is done, so both rank 0s listen at the same time.
    let mut first = alloc.step(3, 40);
    first.env(WAIT_FILE_VAR, &go).env(DEADLINE_VAR, "15000");
    let first = spawn(&mut first, "the first step");
    wait_listening(
        slurm_port(alloc.job, 0),
        Duration::from_secs(15),
        "rank 0 of the first step",
    );
    let second = run(alloc.step(3, 40).env(DEADLINE_VAR, "15000"));
    std::fs::write(&go, b"go").expect("write the go file");
    let first = wait_child(first, Duration::from_secs(50), "the first step");
    check_job(&first, 3, "Slurm");
    check_job(&second, 3, "Slurm");
    let coord = |ran: &Ran| {
        ran.ranks()
            .first()
            .map(|l| l.get("coordinator").to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        coord(&first),
        format!("localhost:{}", slurm_port(alloc.job, 0))
    );
    assert_eq!(
        coord(&second),
        format!("localhost:{}", slurm_port(alloc.job, 1))
    );
}

/// One job split by mistake into two `srun` steps of different sizes (3 + 2 tasks) that share
/// the job's token and coordinator: the world sizes disagree, and every process fails, with a
/// message naming what went wrong, in bounded time instead of waiting for ranks that never come.
///
/// Ordering: the 3-task step's rank 0 listens first, its peers held back (wait file) until the
/// 2-task step is over. The 2-task step's rank 1 can then only reach that rank 0, which names
/// the mismatch and stops at once; the 2-task step's rank 0 either finds the port taken or, if
/// it starts after that, takes it and times out waiting for its rank 1. Then the 3-task step's
/// peers find no coordinator by their deadline.
#[test]
fn srun_steps_disagreeing_on_the_world_fail_loudly() {
    let test = "srun_steps_disagreeing_on_the_world_fail_loudly";
    let Some(slurm) = Slurm::up(test) else { return };
    let started = Instant::now();
    let alloc = slurm.allocate(5);
    let go = state_dir("slurm").join(format!("go-{}", alloc.job));
    let _ = std::fs::remove_file(&go);
    let port = 24_000 + (alloc.job % 1000) as u16;
    let coord = format!("localhost:{port}");
    let token = format!("shared-secret-of-job-{}", alloc.job);
    let mut three = alloc.step(3, 40);
    three
        .env("DVM_COORD", &coord)
        .env("DVM_JOB_TOKEN", &token)
        .env(WAIT_FILE_VAR, &go)
        .env(DEADLINE_VAR, "6000");
    let three = spawn(&mut three, "the 3-task step");
    wait_listening(port, Duration::from_secs(15), "rank 0 of the 3-task step");
    let two = run(alloc
        .step(2, 40)
        .env("DVM_COORD", &coord)
        .env("DVM_JOB_TOKEN", &token)
        .env(DEADLINE_VAR, "2500"));
    std::fs::write(&go, b"go").expect("write the go file");
    let three = wait_child(three, Duration::from_secs(50), "the 3-task step");
    let elapsed = started.elapsed();
    let all = format!("{}\n{}", three.describe(), two.describe());
    assert!(!three.status.success() && !two.status.success(), "{all}");
    assert!(three.ranks().is_empty() && two.ranks().is_empty(), "{all}");
    let fails = |ran: &Ran| -> Vec<(String, String)> {
        ran.failures()
            .iter()
            .map(|l| (l.get("rank").to_string(), l.get("error").to_string()))
            .collect()
    };
    let (f3, f2) = (fails(&three), fails(&two));
    assert_eq!(f3.len(), 3, "every rank of the 3-task step says why: {all}");
    assert_eq!(f2.len(), 2, "every rank of the 2-task step says why: {all}");
    let error = |f: &[(String, String)], rank: &str| -> String {
        f.iter()
            .find(|(r, _)| r == rank)
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    };
    // Rank 0 of the 3-task step names the mismatch.
    let e = error(&f3, "0");
    assert!(
        e.contains("rank 0 expects a world of 3 but a peer at 127.0.0.1:") && e.ends_with("says 2"),
        "{e}\n{all}"
    );
    // The 2-task step's rank 1 is told why.
    let e = error(&f2, "1");
    assert!(
        e.contains(&format!(
            "the coordinator {coord} refused rank 1: rank 0 expects a world of 3"
        )),
        "{e}\n{all}"
    );
    let e = error(&f2, "0");
    // The wait it reports is measured: at least its deadline of 2500 ms, often a little more.
    let waited_ms = e
        .split_once("rank 0 waited ")
        .and_then(|(_, rest)| rest.split_once(" ms but rank 1 never joined"))
        .and_then(|(ms, _)| ms.parse::<u64>().ok());
    assert!(
        e.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            || waited_ms.is_some_and(|ms| ms >= 2500),
        "{e}\n{all}"
    );
    // The 3-task step's other ranks find no coordinator, by their deadline.
    for rank in ["1", "2"] {
        let e = error(&f3, rank);
        assert!(
            e.contains(&format!("could not reach the coordinator {coord}")),
            "{e}\n{all}"
        );
    }
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}: {all}");
}

// ---- three hosts from network namespaces ----

/// Checks a job with one rank per host: rank R ran on h(R+1) and advertised 10.77.0.(R+1).
fn check_spread(ran: &Ran, source: &str, coordinator: &str) {
    let table = check_job(ran, 3, source);
    for (rank, line) in ran.ranks().iter().enumerate() {
        let l = &line.line;
        assert_eq!(line.get("host"), format!("h{}", rank + 1), "{l}");
        assert_eq!(line.get("local"), "0/1", "{l}");
        assert_eq!(line.get("coordinator"), coordinator, "{l}");
        let port = line.get("me").trim_start_matches("0.0.0.0:");
        assert_eq!(
            table.get(rank).map(String::as_str),
            Some(format!("10.77.0.{}:{port}", rank + 1).as_str()),
            "{l}"
        );
    }
}

/// `mpirun` on h1 starts one rank on each of h1, h2, h3 through the `onrsh` agent; the ranks
/// meet at `DVM_COORD=h1:PORT` and each advertises its own host's address. Without
/// `DVM_COORD`, every rank fails at once saying how to name rank 0's host.
#[test]
fn mpirun_across_three_namespace_hosts() {
    let test = "mpirun_across_three_namespace_hosts";
    if !common::available("mpirun.openmpi") {
        skip(test, "mpirun.openmpi is not installed");
        return;
    }
    let Some(hosts) = Hosts::up(test) else { return };
    let agent = script("onrsh");
    let agent = agent.to_str().expect("UTF-8 path");
    let mut cmd = hosts.on(
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
            "DVM_COORD=h1:7731",
            "-x",
            common::CHILD_VAR,
            "-x",
            LISTEN_VAR,
        ],
        40,
    );
    let ran = run(&mut cmd);
    check_spread(&ran, "OpenMpi", "h1:7731");

    // Without DVM_COORD nothing names rank 0's host: every rank says so, and how to fix it.
    let mut cmd = hosts.on(
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
            common::CHILD_VAR,
            "-x",
            LISTEN_VAR,
        ],
        40,
    );
    let ran = run(&mut cmd);
    assert!(!ran.status.success(), "{}", ran.describe());
    let fails = ran.failures();
    assert!(!fails.is_empty(), "{}", ran.describe());
    for line in &fails {
        assert!(
            line.get("error").contains(
                "Open MPI mpirun started 3 ranks over several hosts (1 on this one) and nothing \
                 names rank 0's host: put rank 0's host first and pass `mpirun -x DVM_COORD"
            ),
            "{}",
            line.line
        );
    }
}

/// The same with MPICH's Hydra: `mpiexec -launcher rsh -launcher-exec onrsh`.
#[test]
fn mpiexec_across_three_namespace_hosts() {
    let test = "mpiexec_across_three_namespace_hosts";
    if !common::available("mpiexec.mpich") {
        skip(test, "mpiexec.mpich is not installed");
        return;
    }
    let Some(hosts) = Hosts::up(test) else { return };
    let agent = script("onrsh");
    let agent = agent.to_str().expect("UTF-8 path");
    let mut cmd = hosts.on(
        "h1",
        &[
            "mpiexec.mpich",
            "-launcher",
            "rsh",
            "-launcher-exec",
            agent,
            "-hosts",
            "h1,h2,h3",
            "-n",
            "3",
            "-genv",
            "DVM_COORD",
            "h1:7732",
        ],
        40,
    );
    let ran = run(&mut cmd);
    check_spread(&ran, "Hydra", "h1:7732");
}

/// `srun -N 3 -n 3` from h1 on a Slurm whose nodes are h1, h2, h3: `SLURM_STEP_NODELIST` is
/// the compressed `h[1-3]`, whose first host is rank 0's; each rank advertises its own host's
/// address. Then `-n 4`, two ranks on h1: the local ranks come from the tasks per node.
#[test]
fn srun_across_three_namespace_hosts() {
    let test = "srun_across_three_namespace_hosts";
    let Some(hosts) = Hosts::up(test) else { return };
    let Some(slurm) = Slurm::up_across(test, &hosts) else {
        return;
    };
    let mut cmd = hosts.on("h1", &["srun", "-N", "3", "-n", "3"], 40);
    cmd.env("SLURM_CONF", slurm.conf());
    let ran = run(&mut cmd);
    let job: u64 = ran
        .ranks()
        .first()
        .and_then(|l| l.get("job").parse().ok())
        .unwrap_or_else(|| panic!("no job id printed:\n{}", ran.describe()));
    check_spread(&ran, "Slurm", &format!("h1:{}", slurm_port(job, 0)));

    // 4 tasks on 3 nodes: SLURM_STEP_TASKS_PER_NODE is `2,1(x2)`, so ranks 0 and 1 share h1.
    let mut cmd = hosts.on("h1", &["srun", "-N", "3", "-n", "4"], 40);
    cmd.env("SLURM_CONF", slurm.conf());
    let ran = run(&mut cmd);
    let table = check_job(&ran, 4, "Slurm");
    let want = [("h1", "0/2"), ("h1", "1/2"), ("h2", "0/1"), ("h3", "0/1")];
    for (rank, line) in ran.ranks().iter().enumerate() {
        let l = &line.line;
        let (host, local) = want.get(rank).copied().unwrap_or_default();
        assert_eq!((line.get("host"), line.get("local")), (host, local), "{l}");
        let port = line.get("me").trim_start_matches("0.0.0.0:");
        let ip = format!("10.77.0.{}", host.trim_start_matches('h'));
        assert_eq!(table.get(rank), Some(&format!("{ip}:{port}")), "{l}");
    }
    drop(slurm);
}

/// Starts rank R of an explicit `--hosts` job on h(R+1) through `on`.
fn spawn_explicit(hosts: &Hosts, rank: u32, list: &str, deadline_ms: u32) -> Child {
    let host = format!("h{}", rank + 1);
    let mut cmd = hosts.on(&host, &[], 40);
    cmd.env(HOSTS_VAR, list)
        .env(RANK_VAR, rank.to_string())
        .env(DEADLINE_VAR, deadline_ms.to_string());
    spawn(&mut cmd, &format!("rank {rank} on {host}"))
}

/// The explicit path, one process per host via `on`: `--hosts h1:P,h2:P,h3:P --rank R`.
#[test]
fn explicit_hosts_one_process_per_namespace_host() {
    let test = "explicit_hosts_one_process_per_namespace_host";
    let Some(hosts) = Hosts::up(test) else { return };
    let list = "h1:7741,h2:7741,h3:7741";
    // Rank 0 last: the others must wait for it.
    let children: Vec<Child> = [2, 1, 0]
        .iter()
        .map(|r| spawn_explicit(&hosts, *r, list, 20_000))
        .collect();
    let rans: Vec<Ran> = children
        .into_iter()
        .map(|c| wait_child(c, Duration::from_secs(50), "a rank"))
        .collect();
    check_spread(&merge(&rans), "Explicit", "h1:7741");
}

/// h3 is cut off at the switch (silent loss): rank 0 gives up at its deadline naming rank 2,
/// rank 1 is told so, rank 2 reports the coordinator unreachable; nobody hangs.
#[test]
fn a_host_cut_off_is_named_within_the_deadline() {
    let test = "a_host_cut_off_is_named_within_the_deadline";
    let Some(hosts) = Hosts::up(test) else { return };
    hosts.link("down", "h3");
    let started = Instant::now();
    let list = "h1:7751,h2:7751,h3:7751";
    // Rank 1 waits longer than rank 0, so that what it reports is rank 0's verdict rather than
    // its own deadline (the processes start a few milliseconds apart).
    let children: Vec<Child> = [(0, 3_000), (1, 8_000), (2, 3_000)]
        .iter()
        .map(|(r, deadline)| spawn_explicit(&hosts, *r, list, *deadline))
        .collect();
    let rans: Vec<Ran> = children
        .into_iter()
        .map(|c| wait_child(c, Duration::from_secs(50), "a rank"))
        .collect();
    let elapsed = started.elapsed();
    hosts.link("up", "h3");
    let ran = merge(&rans);
    let all = ran.describe();
    assert!(rans.iter().all(|r| !r.status.success()), "{all}");
    let fails = ran.failures();
    assert_eq!(fails.len(), 3, "{all}");
    let error = |rank: usize| fails.get(rank).map_or("", |l| l.get("error"));
    assert!(error(0).contains("but rank 2 never joined"), "{all}");
    assert!(
        error(1).contains("rank 0 gave up waiting for rank 2"),
        "{all}"
    );
    assert!(
        error(2).contains("rank 2 could not reach the coordinator h1:7751"),
        "{all}"
    );
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}: {all}");
}
