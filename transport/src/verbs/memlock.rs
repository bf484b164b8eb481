//! Locked memory: what the verbs transport registers, against what this process may lock.
//!
//! Every memory region the transport registers is pinned, and pinned pages count against
//! `RLIMIT_MEMLOCK` unless the process holds `CAP_IPC_LOCK`. Debian's default limit is 8 MiB,
//! which a job of a dozen nodes exceeds; registration then fails deep inside the mesh set-up
//! with `ENOMEM`, on one node, after the others started. Checking before any work lets the job
//! fail at once with what to change.

use super::published::SLOT_BYTES;
use super::VerbsConfig;

/// `CAP_IPC_LOCK`'s bit in the capability sets of `/proc/self/status`.
const CAP_IPC_LOCK: u32 = 14;

/// Bytes the verbs transport registers (pins) on one node of a job of `world` nodes: each
/// peer's endpoint has its data region (READ targets and both write rings) and its send and
/// receive slots, and the published page table is registered once (every endpoint shares one
/// protection domain). A node alone registers nothing.
///
/// Not counted: the page pool chunks that READs land in, registered as READs first use them
/// (once each). That registration is best effort: a chunk the limit refuses costs a copy per
/// READ into its pages (said once in the log), not a failed job.
pub fn registered_bytes(config: &VerbsConfig, world: u32) -> u64 {
    let peers = u64::from(world.saturating_sub(1));
    if peers == 0 {
        return 0;
    }
    let e = &config.endpoint;
    let rings = u64::from(e.receive_slots) + u64::from(e.send_slots);
    let table = (config.published_slots as u64 * SLOT_BYTES as u64).next_multiple_of(4096);
    let region = config.data_region_bytes() as u64;
    let per_peer = region + rings * e.message_bytes as u64;
    per_peer.saturating_mul(peers).saturating_add(table)
}

/// What this process may lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockLimit {
    /// `CAP_IPC_LOCK` (root, usually) or an unlimited `RLIMIT_MEMLOCK`.
    Unlimited,
    Bytes(u64),
}

impl LockLimit {
    /// This process's limit. An unreadable limit is taken as unlimited: the registration
    /// itself still reports a failure, only later.
    pub fn current() -> LockLimit {
        if has_ipc_lock() {
            return LockLimit::Unlimited;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `getrlimit` writes one `rlimit` through the pointer, which points at a live,
        // properly aligned local of that type.
        let status = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
        if status != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
            LockLimit::Unlimited
        } else {
            LockLimit::Bytes(limit.rlim_cur)
        }
    }

    /// Why `needed` bytes cannot be registered under this limit, in words that say what to do,
    /// or `None` when they can.
    pub fn refuses(self, needed: u64) -> Option<String> {
        match self {
            LockLimit::Bytes(limit) if needed > limit => Some(format!(
                "RDMA needs {} of locked memory on this node but its limit (ulimit -l, \
                 RLIMIT_MEMLOCK) is {}: raise it to at least {} KiB (`ulimit -l unlimited` in \
                 the job script, `* - memlock unlimited` in /etc/security/limits.conf, and \
                 PropagateResourceLimits under Slurm), or run with --transport tcp",
                mib(needed),
                mib(limit),
                needed.div_ceil(1024)
            )),
            _ => None,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Whether the effective capabilities include `CAP_IPC_LOCK`.
fn has_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_job_registers_grows_with_its_peers() {
        let config = VerbsConfig::default();
        assert_eq!(
            registered_bytes(&config, 1),
            0,
            "a node alone registers nothing"
        );
        let two = registered_bytes(&config, 2);
        let three = registered_bytes(&config, 3);
        assert!(two > 0);
        // The table once, each peer's endpoint on top.
        let per_peer = three - two;
        assert!(per_peer > 0 && per_peer < two);
        assert_eq!(registered_bytes(&config, 17), two + 15 * per_peer);
    }

    #[test]
    fn a_limit_below_the_need_says_what_to_raise() {
        let config = VerbsConfig::default();
        let needed = registered_bytes(&config, 64);
        let why = LockLimit::Bytes(8 << 20)
            .refuses(needed)
            .expect("64 nodes need more than Debian's 8 MiB default");
        let no_table = VerbsConfig {
            published_slots: 0,
            ..VerbsConfig::default()
        };
        assert_eq!(
            needed - registered_bytes(&no_table, 64),
            registered_bytes(&config, 2) - registered_bytes(&no_table, 2),
            "the table counts once, whatever the job's size"
        );
        assert!(
            why.contains("ulimit -l") && why.contains("--transport tcp"),
            "{why}"
        );
        assert!(
            why.contains(&format!("{} KiB", needed.div_ceil(1024))),
            "{why}"
        );
        assert_eq!(LockLimit::Bytes(needed).refuses(needed), None);
        assert_eq!(LockLimit::Unlimited.refuses(u64::MAX), None);
    }
}
