//! `dvm run --stats`: the run's counters as a table for people and as one JSON line for tools.
//! The JSON keys are a stable interface (the conformance suite and benchmarks read them).

use dvm_cluster::runtime::{NodeRow, VerbsRow};
use dvm_engine::sched::WorkerInfo;
use dvm_engine::vm::Report;
use dvm_perf::phase::{Phase, TimeSplit};
use std::fmt::Write as _;

/// A count the kernel may not offer: JSON `null` when it does not (never 0).
fn json_opt(value: Option<u64>) -> String {
    value.map_or_else(|| "null".to_string(), |v| v.to_string())
}

/// Per-worker rows: where it ran, its time split (ms per phase) and its hardware counters.
fn workers_json(workers: &[WorkerInfo]) -> String {
    let rows: Vec<String> = workers
        .iter()
        .map(|w| {
            let time = split_json(w.time);
            let hw = w.hw.unwrap_or_default();
            format!(
                "{{\"worker\": {}, \"numa_node\": {}, \"pu\": {}, \"pinned\": {}, \"runners\": {}, \"steals\": {}, \"time_ms\": {time}, \"cycles\": {}, \"hw_instructions\": {}, \"cache_misses\": {}}}",
                w.worker,
                w.node,
                w.pu,
                w.pinned,
                w.tasks,
                w.steals,
                json_opt(hw.cycles),
                json_opt(hw.instructions),
                json_opt(hw.cache_misses)
            )
        })
        .collect();
    format!("[{}]", rows.join(", "))
}

/// The JSON key of a phase's time.
fn json_key(phase: Phase) -> &'static str {
    match phase {
        Phase::Idle => "idle",
        Phase::Steal => "stealing",
        Phase::Start => "starting",
        Phase::Interpret => "interpreting",
        Phase::Commit => "committing",
        Phase::WaitPage => "waiting_for_pages",
        Phase::Network => "network",
    }
}

/// `12.3 G` style for large counts.
fn human(count: u64) -> String {
    match count {
        c if c >= 10_000_000_000 => format!("{:.1} G", c as f64 / 1e9),
        c if c >= 10_000_000 => format!("{:.1} M", c as f64 / 1e6),
        c => c.to_string(),
    }
}

/// `interpreting 97.1%, committing 1.2%, ...` (phases with no time left out).
fn split_percent(split: &TimeSplit) -> String {
    let total = split.total_ns().max(1) as f64;
    let parts: Vec<String> = Phase::ALL
        .iter()
        .filter(|p| split.get(**p) > 0)
        .map(|p| format!("{} {:.1}%", p.name(), split.get(*p) as f64 * 100.0 / total))
        .collect();
    parts.join(", ")
}

/// `{"idle": 1.250, ...}`: milliseconds per phase, or `null` when not measured.
fn split_json(split: Option<TimeSplit>) -> String {
    split.map_or_else(
        || "null".to_string(),
        |split| {
            let phases: Vec<String> = Phase::ALL
                .iter()
                .map(|p| format!("\"{}\": {:.3}", json_key(*p), split.get(*p) as f64 / 1e6))
                .collect();
            format!("{{{}}}", phases.join(", "))
        },
    )
}

/// The time split and counters of one worker, as table lines.
fn worker_detail(out: &mut String, w: &WorkerInfo) {
    if let Some(split) = w.time {
        let _ = writeln!(out, "                time: {}", split_percent(&split));
    }
    if let Some(hw) = w.hw {
        let show = |v: Option<u64>| v.map_or_else(|| "unavailable".to_string(), human);
        let _ = writeln!(
            out,
            "                hardware: cycles {}, instructions {}, cache misses {}",
            show(hw.cycles),
            show(hw.instructions),
            show(hw.cache_misses)
        );
    }
}

/// `, "verbs": {...}` for a node whose transport is RDMA verbs; nothing over TCP, whose rows
/// stay as they were.
fn verbs_json(verbs: Option<VerbsRow>) -> String {
    verbs.map_or_else(String::new, |v| {
        format!(
            ", \"verbs\": {{\"work_requests\": {}, \"signalled_completions\": {}, \"rdma_reads\": {}, \"reads_landed\": {}, \"chunks_registered\": {}, \"rdma_writes\": {}, \"bytes_written\": {}, \"read_retries\": {}, \"read_hits\": {}, \"read_zeros\": {}, \"read_previous\": {}, \"read_fallbacks\": {}, \"page_read_messages\": {}}}",
            v.work_requests,
            v.signalled_completions,
            v.rdma_reads,
            v.reads_landed,
            v.chunks_registered,
            v.rdma_writes,
            v.bytes_written,
            v.read_retries,
            v.read_hits,
            v.read_zeros,
            v.read_previous,
            v.read_fallbacks,
            v.page_read_messages
        )
    })
}

/// Per-node rows of a multi-node run, as a JSON array (empty on one node).
fn nodes_json(nodes: &[NodeRow]) -> String {
    let rows: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "{{\"rank\": {}, \"workers\": {}, \"instructions\": {}, \"runners_started\": {}, \"remote_reads\": {}, \"cache_hits\": {}, \"messages_sent\": {}, \"messages_received\": {}, \"bytes_sent\": {}, \"bytes_received\": {}, \"peak_memory_bytes\": {}, \"remote_read_p50_us\": {}, \"remote_read_p99_us\": {}, \"prepare_local_count\": {}, \"prepare_local_p50_us\": {}, \"prepare_local_p99_us\": {}, \"prepare_remote_count\": {}, \"prepare_remote_p50_us\": {}, \"prepare_remote_p99_us\": {}, \"time_ms\": {}{}}}",
                n.rank,
                n.stats.workers,
                n.stats.instructions,
                n.stats.runners_started,
                n.remote_reads,
                n.cache_hits,
                n.messages_sent,
                n.messages_received,
                n.bytes_sent,
                n.bytes_received,
                n.stats.peak_memory_bytes,
                n.remote_read.p50_us,
                n.remote_read.p99_us,
                n.prepare_local.count,
                n.prepare_local.p50_us,
                n.prepare_local.p99_us,
                n.prepare_remote.count,
                n.prepare_remote.p50_us,
                n.prepare_remote.p99_us,
                split_json(n.time),
                verbs_json(n.verbs)
            )
        })
        .collect();
    format!("[{}]", rows.join(", "))
}

pub fn json(report: &Report, nodes: &[NodeRow]) -> String {
    let s = &report.stats;
    // On several nodes, node 0 knows its own workers; the others report theirs.
    let pinned = match nodes {
        [] => report.workers.iter().filter(|w| w.pinned).count() as u64,
        nodes => nodes.iter().map(|n| n.workers_pinned).sum(),
    };
    format!(
        "{{\"dvm_stats\": {{\"workers\": {}, \"workers_pinned\": {}, \"instructions\": {}, \"runners_started\": {}, \
         \"runners_committed\": {}, \"runners_aborted\": {}, \"runners_failed\": {}, \"runners_faulted\": {}, \
         \"conflicts\": {}, \"watcher_activations\": {}, \"pages_allocated\": {}, \"pages_copied\": {}, \
         \"versions_pruned\": {}, \"peak_memory_bytes\": {}, \"wall_time_ms\": {:.3}, \"nodes\": {}, \"worker_detail\": {}}}}}",
        s.workers,
        pinned,
        s.instructions,
        s.runners_started,
        s.runners_committed,
        s.runners_aborted,
        s.runners_failed,
        s.runners_faulted,
        s.conflicts,
        s.watcher_activations,
        s.pages_allocated,
        s.pages_copied,
        s.versions_pruned,
        s.peak_memory_bytes,
        s.wall_time_ms,
        nodes_json(nodes),
        workers_json(&report.workers)
    )
}

pub fn table(report: &Report, nodes: &[NodeRow]) -> String {
    let s = &report.stats;
    let mut out = String::new();
    let seconds = s.wall_time_ms / 1000.0;
    let rate = if seconds > 0.0 {
        s.instructions as f64 / seconds / 1e6
    } else {
        0.0
    };
    let rows: Vec<(&str, String)> = vec![
        ("wall time", format!("{:.3} ms", s.wall_time_ms)),
        (
            "instructions",
            format!("{} ({rate:.1} M/s)", s.instructions),
        ),
        ("runners started", s.runners_started.to_string()),
        ("  committed", s.runners_committed.to_string()),
        ("  aborted", s.runners_aborted.to_string()),
        ("  failed to commit", s.runners_failed.to_string()),
        ("  faulted", s.runners_faulted.to_string()),
        ("conflicts", s.conflicts.to_string()),
        ("watcher activations", s.watcher_activations.to_string()),
        ("pages allocated", s.pages_allocated.to_string()),
        ("pages copied", s.pages_copied.to_string()),
        ("versions reclaimed", s.versions_pruned.to_string()),
        (
            "peak page memory",
            format!("{:.1} MiB", s.peak_memory_bytes as f64 / (1 << 20) as f64),
        ),
    ];
    let _ = writeln!(out, "dvm run statistics");
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<22} {value}");
    }
    let _ = writeln!(out, "  workers ({}):", report.workers.len());
    for worker in &report.workers {
        let _ = writeln!(
            out,
            "    worker {:>3}: node {}, processor {:>3}, {}, {} runners, {} steals",
            worker.worker,
            worker.node,
            worker.pu,
            if worker.pinned { "pinned" } else { "unpinned" },
            worker.tasks,
            worker.steals
        );
        worker_detail(&mut out, worker);
    }
    if !nodes.is_empty() {
        let _ = writeln!(out, "  nodes ({}):", nodes.len());
        for n in nodes {
            let _ = writeln!(
                out,
                "    node {:>3}: {} workers, {} runners, {} instructions, {} remote page reads (p50 {} us, p99 {} us; {} from cache), {} messages / {:.1} KiB sent, {:.1} KiB received; prepare p50/p99 {}/{} us local ({}), {}/{} us remote ({})",
                n.rank,
                n.stats.workers,
                n.stats.runners_started,
                n.stats.instructions,
                n.remote_reads,
                n.remote_read.p50_us,
                n.remote_read.p99_us,
                n.cache_hits,
                n.messages_sent,
                n.bytes_sent as f64 / 1024.0,
                n.bytes_received as f64 / 1024.0,
                n.prepare_local.p50_us,
                n.prepare_local.p99_us,
                n.prepare_local.count,
                n.prepare_remote.p50_us,
                n.prepare_remote.p99_us,
                n.prepare_remote.count
            );
            if let Some(split) = n.time {
                let _ = writeln!(
                    out,
                    "              workers' time: {}",
                    split_percent(&split)
                );
            }
            if let Some(v) = n.verbs {
                let _ = writeln!(
                    out,
                    "              rdma verbs: {} work requests, {} signalled completions, {} RDMA READs ({} into pool pages over {} registered chunks, {} retries after a torn read), {} RDMA WRITEs ({} bytes); page fetches: {} by READ ({} of never-written pages, {} of a previous version), {} READs not usable, {} by message to the home",
                    v.work_requests,
                    v.signalled_completions,
                    v.rdma_reads,
                    v.reads_landed,
                    v.chunks_registered,
                    v.read_retries,
                    v.rdma_writes,
                    v.bytes_written,
                    v.read_hits,
                    v.read_zeros,
                    v.read_previous,
                    v.read_fallbacks,
                    v.page_read_messages
                );
            }
        }
    }
    for note in &report.placement_notes {
        let _ = writeln!(out, "  note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dvm_engine::vm::Stats;

    fn report() -> Report {
        Report {
            stats: Stats::default(),
            workers: Vec::new(),
            placement_notes: Vec::new(),
            internal_errors: 0,
            stdout: Vec::new(),
            stderr: Vec::new(),
            profile: Vec::new(),
            profile_dropped: 0,
        }
    }

    fn node(rank: u32, verbs: Option<VerbsRow>) -> NodeRow {
        NodeRow {
            rank,
            verbs,
            ..NodeRow::default()
        }
    }

    #[test]
    fn tcp_rows_show_no_verbs_counters() {
        let nodes = [node(0, None), node(1, None)];
        let json = json(&report(), &nodes);
        assert!(!json.contains("verbs"), "{json}");
        assert!(json.contains("\"time_ms\": null}"), "{json}");
        let table = table(&report(), &nodes);
        assert!(!table.contains("rdma verbs"), "{table}");
    }

    #[test]
    fn verbs_rows_show_their_counters_per_node() {
        let verbs = |base: u64| VerbsRow {
            work_requests: base + 1,
            signalled_completions: base + 2,
            rdma_reads: base + 3,
            read_retries: base + 4,
            read_hits: base + 5,
            read_fallbacks: base + 6,
            page_read_messages: base + 7,
            read_zeros: base + 8,
            rdma_writes: base + 9,
            bytes_written: base + 10,
            read_previous: base + 11,
            reads_landed: base + 12,
            chunks_registered: base + 13,
        };
        let nodes = [node(0, Some(verbs(10))), node(1, Some(verbs(20)))];
        let json = json(&report(), &nodes);
        assert!(
            json.contains("\"rank\": 1,") && json.contains(
                "\"verbs\": {\"work_requests\": 21, \"signalled_completions\": 22, \"rdma_reads\": 23, \"reads_landed\": 32, \"chunks_registered\": 33, \"rdma_writes\": 29, \"bytes_written\": 30, \"read_retries\": 24, \"read_hits\": 25, \"read_zeros\": 28, \"read_previous\": 31, \"read_fallbacks\": 26, \"page_read_messages\": 27}"
            ),
            "{json}"
        );
        assert!(json.contains("\"work_requests\": 11,"), "{json}");
        let table = table(&report(), &nodes);
        assert!(
            table.contains(
                "rdma verbs: 11 work requests, 12 signalled completions, 13 RDMA READs (22 into pool pages over 23 registered chunks, 14 retries after a torn read), 19 RDMA WRITEs (20 bytes); page fetches: 15 by READ (18 of never-written pages, 21 of a previous version), 16 READs not usable, 17 by message to the home"
            ),
            "{table}"
        );
        assert_eq!(table.matches("rdma verbs:").count(), 2, "{table}");
    }
}
