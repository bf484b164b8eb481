//! The rank's side: what a test binary runs as each rank under a launcher (its ignored
//! `child_rank` test calls `child_main`). Steered by the environment variables described in
//! `common`'s module doc.

use super::{CHILD_VAR, DEADLINE_VAR, HOSTS_VAR, LISTEN_VAR, RANK_VAR, WAIT_FILE_VAR};
use dvm_cluster::launch::{self, Explicit, HostFacts};
use dvm_cluster::rendezvous::rendezvous;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Prints the failure line and fails the child.
fn child_fail(rank: &str, what: &str, error: &dyn std::fmt::Display) -> ! {
    println!(
        "DVM-FAIL rank={rank} host={} pid={} error={what}: {error}",
        hostname(),
        std::process::id()
    );
    panic!("{what}: {error}");
}

/// The rank's side: detect, listen, rendezvous, print one line for the parent.
pub fn child_main() {
    assert!(
        std::env::var_os(CHILD_VAR).is_some(),
        "only meaningful under a launcher started by the tests of this binary"
    );
    let var = |name: &str| std::env::var(name).ok();
    let deadline_ms: u64 = var(DEADLINE_VAR).map_or(20_000, |v| {
        v.parse().expect("DVM_CLUSTER_TEST_DEADLINE_MS is a number")
    });
    let started = Instant::now();
    let (hosts, rank) = (var(HOSTS_VAR), var(RANK_VAR));
    let explicit = Explicit {
        hosts: hosts.as_deref(),
        rank: rank.as_deref(),
    };
    let env = launch::process_env();
    let l = match launch::detect(&env, &explicit, &HostFacts::probe()) {
        Ok(Some(l)) => l,
        Ok(None) => child_fail("?", "detect", &"no launcher detected"),
        Err(e) => child_fail("?", "detect", &e),
    };
    let rank = l.rank.to_string();
    if let Some(file) = var(WAIT_FILE_VAR).filter(|_| l.rank > 0) {
        while !Path::new(&file).exists() {
            if started.elapsed() > Duration::from_millis(deadline_ms) {
                child_fail(&rank, "wait", &format!("{file} never appeared"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let ip: IpAddr = var(LISTEN_VAR).map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |v| {
        v.parse().expect("DVM_CLUSTER_TEST_LISTEN is an IP")
    });
    let data = TcpListener::bind((ip, 0)).unwrap_or_else(|e| child_fail(&rank, "listen", &e));
    let my_addr = data
        .local_addr()
        .unwrap_or_else(|e| child_fail(&rank, "listen", &e));
    let left = deadline_ms.saturating_sub(started.elapsed().as_millis() as u64);
    let table =
        rendezvous(&l, my_addr, left).unwrap_or_else(|e| child_fail(&rank, "rendezvous", &e));
    let table: Vec<String> = table.iter().map(ToString::to_string).collect();
    println!(
        "DVM-RANK rank={} world={} local={}/{} source={:?} coordinator={} host={} job={} pmi={} me={} table={}",
        l.rank,
        l.world,
        l.local_rank,
        l.local_size,
        l.source,
        l.coordinator,
        hostname(),
        var("SLURM_JOB_ID").unwrap_or_else(|| "-".to_string()),
        if var("PMI_RANK").is_some() { "yes" } else { "no" },
        my_addr,
        table.join(",")
    );
}
