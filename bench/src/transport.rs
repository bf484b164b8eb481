//! `dvm-bench transport`: two nodes of one process joined by each transport this host can
//! build (io_uring TCP always, RDMA verbs when a device has an active port), measured side by
//! side through the cluster's own `Transport` trait:
//! - round trip of a small request and its answer (what a commit message costs);
//! - page fetch: a request answered with one 4 KiB page (what `Msg::Read` costs), one at a time
//!   for latency, then `WINDOW` outstanding for throughput;
//! - one-way message rate of small messages;
//! - over RDMA, page fetch by one RDMA READ of the home's published slot, landing in a page of
//!   the reader's pool (what a remote page fetch costs there, with no CPU of the home), one at
//!   a time and `WINDOW` outstanding.
//!
//! Under emulation (soft-RoCE in a QEMU guest) the RDMA figures mean nothing; the verbs counts
//! printed with them (work requests, signalled completions and inline sends per operation) do
//! carry over to hardware.

use dvm_numa::{PageBox, PagePool, Topology};
use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::verbs::{self, published, SlotRead, VerbsConfig, VerbsCounters, VerbsTransport};
use dvm_transport::{Event, NodeId, Transport, PAGE_BYTES};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &[u8] = b"dvm-bench-transport";
/// Page fetches kept outstanding in the throughput measurement.
const WINDOW: usize = 64;
/// Untimed round trips before the measurements.
const WARM_UP: usize = 2_000;
/// Bytes of a small message (a commit message's order of size).
const SMALL_BYTES: usize = 64;
/// No measurement waits longer than this for one event.
const STALL: Duration = Duration::from_secs(10);

/// Operations per measurement.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub round_trips: usize,
    pub pages: usize,
    pub messages: usize,
}

enum Pair {
    Tcp(Vec<TcpTransport>),
    Verbs(Vec<VerbsTransport>),
}

impl Pair {
    fn node(&self, rank: usize) -> &dyn Transport {
        match self {
            Pair::Tcp(nodes) => &nodes[rank],
            Pair::Verbs(nodes) => &nodes[rank],
        }
    }

    fn verbs_counters(&self, rank: usize) -> Option<VerbsCounters> {
        match self {
            Pair::Tcp(_) => None,
            Pair::Verbs(nodes) => Some(nodes[rank].verbs_counters()),
        }
    }
}

fn bound_pair() -> Result<(Vec<dvm_transport::tcp::Bound>, Vec<SocketAddr>), String> {
    let bound = (0..2)
        .map(|rank| {
            let config = TcpConfig::new(rank, 2, SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN);
            TcpTransport::bind(config).map_err(|e| format!("binding node {rank}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = bound.iter().map(|b| b.local_addr()).collect();
    Ok((bound, addrs))
}

/// Establishes both nodes at once (each waits for the other).
fn establish<T: Send + 'static>(
    build: impl Fn(dvm_transport::tcp::Bound, Vec<SocketAddr>) -> Result<T, String>
        + Send
        + Sync
        + 'static,
) -> Result<Vec<T>, String> {
    let (bound, addrs) = bound_pair()?;
    let build = Arc::new(build);
    let handles: Vec<_> = bound
        .into_iter()
        .map(|b| {
            let (addrs, build) = (addrs.clone(), Arc::clone(&build));
            std::thread::spawn(move || build(b, addrs))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| "an establishing thread panicked".to_string())?
        })
        .collect()
}

fn tcp_pair() -> Result<Pair, String> {
    establish(|b, addrs| b.establish(addrs).map_err(|e| e.to_string())).map(Pair::Tcp)
}

fn verbs_pair() -> Result<Pair, String> {
    establish(|b, addrs| {
        VerbsTransport::establish(b, addrs, VerbsConfig::default()).map_err(|e| e.to_string())
    })
    .map(Pair::Verbs)
}

/// Node 1 answers every request: with a page when the request says so, else with its bytes.
fn serve(node: &dyn Transport, stop: &AtomicBool) -> Result<(), String> {
    let page = vec![0x5au8; PAGE_BYTES];
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        node.poll(&mut events, Duration::from_millis(5))
            .map_err(|e| e.to_string())?;
        for event in events.drain(..) {
            if let Event::Request { from, id, payload } = event {
                let answer = if payload.first() == Some(&b'P') {
                    &page[..]
                } else {
                    &payload[..]
                };
                node.respond(from, id, answer).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// Waits for `count` events that `counts` accepts; returns how many arrived.
fn await_events(
    node: &dyn Transport,
    count: usize,
    counts: impl Fn(&Event) -> bool,
) -> Result<(), String> {
    let mut seen = 0;
    let mut events = Vec::new();
    while seen < count {
        let before = Instant::now();
        node.poll(&mut events, STALL).map_err(|e| e.to_string())?;
        if events.is_empty() && before.elapsed() >= STALL {
            return Err(format!("stalled after {seen} of {count} events"));
        }
        seen += events.drain(..).filter(|e| counts(e)).count();
    }
    Ok(())
}

/// Microseconds of each of `n` request/response round trips of `request` bytes.
fn round_trips(
    node: &dyn Transport,
    to: NodeId,
    request: &[u8],
    n: usize,
) -> Result<Vec<f64>, String> {
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        node.request(to, request).map_err(|e| e.to_string())?;
        await_events(node, 1, |e| matches!(e, Event::Response { .. }))?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(micros)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or(f64::NAN)
}

/// One transport's figures, as table cells.
struct Column {
    name: String,
    cells: Vec<String>,
}

fn measure(pair: &Pair, sizes: Sizes) -> Result<Vec<String>, String> {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| {
        let server = {
            let stop = Arc::clone(&stop);
            let node = pair.node(1);
            scope.spawn(move || serve(node, &stop))
        };
        let result = measure_from_node_0(pair, sizes);
        stop.store(true, Ordering::Relaxed);
        let served = server
            .join()
            .map_err(|_| "the serving thread panicked".to_string())?;
        served?;
        result
    })
}

fn measure_from_node_0(pair: &Pair, sizes: Sizes) -> Result<Vec<String>, String> {
    let node = pair.node(0);
    let before = pair.verbs_counters(0);
    let small = vec![b'S'; SMALL_BYTES];
    // Warm-up: threads started, buffers and rings touched, before anything is timed.
    round_trips(node, 1, b"P", WARM_UP)?;
    let mut rtt = round_trips(node, 1, &small, sizes.round_trips)?;
    rtt.sort_by(f64::total_cmp);
    let mut fetch = round_trips(node, 1, b"P", sizes.pages)?;
    fetch.sort_by(f64::total_cmp);
    // Throughput: WINDOW page fetches outstanding.
    let started = Instant::now();
    let mut sent = 0;
    let mut done = 0;
    let mut events = Vec::new();
    while done < sizes.pages {
        while sent < sizes.pages && sent - done < WINDOW {
            node.request(1, b"P").map_err(|e| e.to_string())?;
            sent += 1;
        }
        node.poll(&mut events, STALL).map_err(|e| e.to_string())?;
        let arrived = events
            .drain(..)
            .filter(|e| matches!(e, Event::Response { .. }))
            .count();
        if arrived == 0 && started.elapsed() > STALL {
            return Err(format!("page fetches stalled at {done} of {}", sizes.pages));
        }
        done += arrived;
    }
    let pages_per_s = sizes.pages as f64 / started.elapsed().as_secs_f64();
    // One-way messages, timed to the answer of a request sent after them: per-peer FIFO
    // delivers it last.
    let started = Instant::now();
    for _ in 0..sizes.messages {
        node.send(1, &small).map_err(|e| e.to_string())?;
    }
    round_trips(node, 1, &small, 1)?;
    let messages_per_s = sizes.messages as f64 / started.elapsed().as_secs_f64();
    let mut cells = vec![
        format!("{:.1}", percentile(&rtt, 0.5)),
        format!("{:.1}", percentile(&rtt, 0.99)),
        format!("{:.1}", percentile(&fetch, 0.5)),
        format!("{:.1}", percentile(&fetch, 0.99)),
        format!("{pages_per_s:.0}"),
        format!("{:.1}", pages_per_s * PAGE_BYTES as f64 / (1024.0 * 1024.0)),
        format!("{messages_per_s:.0}"),
    ];
    let ops = (WARM_UP + sizes.round_trips + 2 * sizes.pages + sizes.messages + 1) as f64;
    match (before, pair.verbs_counters(0)) {
        (Some(b), Some(a)) => {
            let per = |x: u64, y: u64| format!("{:.2}", (x - y) as f64 / ops);
            cells.push(per(a.work_requests_posted, b.work_requests_posted));
            cells.push(per(a.signalled_completions, b.signalled_completions));
            cells.push(per(a.inline_sends, b.inline_sends));
            cells.push(per(a.rdma_writes, b.rdma_writes));
        }
        _ => cells.extend(["-", "-", "-", "-"].map(String::from)),
    }
    match pair {
        Pair::Verbs(nodes) => cells.extend(read_fetches(nodes, sizes.pages)?),
        Pair::Tcp(_) => cells.extend(["-", "-", "-", "-"].map(String::from)),
    }
    Ok(cells)
}

/// Page fetches by RDMA READ: node 1 publishes one page, node 0 READs its slot `n` times one
/// at a time, then `n` times with `WINDOW` outstanding, each landing in a page of a pool.
/// Cells: median and p99 µs, pages per second, work requests per fetch.
fn read_fetches(nodes: &[VerbsTransport], n: usize) -> Result<Vec<String>, String> {
    const PAGE: u64 = 0x4_0000;
    let table = nodes[1].table().ok_or("node 1 publishes no page table")?;
    table.publish_with(PAGE, || Some((1, Some(Box::new([0x5a; PAGE_BYTES])))));
    let pool = PagePool::new(&Topology::detect(), 0, 2 << 20).map_err(|e| e.to_string())?;
    let before = nodes[0].verbs_counters();
    let start = |landing: PageBox| {
        nodes[0]
            .read_published(1, PAGE, Some(landing))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "node 1 publishes no page table".to_string())
    };
    let finish = |receiver: std::sync::mpsc::Receiver<SlotRead>| -> Result<(), String> {
        let read = receiver
            .recv_timeout(STALL)
            .map_err(|_| "an RDMA READ did not complete".to_string())?;
        let mut page = read.page.ok_or("the landing page did not come back")?;
        match published::judge_in_place(&read.bytes, &mut page, PAGE, u64::MAX) {
            published::Verdict::Accept { .. } => Ok(()),
            other => Err(format!("the published slot read as {other:?}")),
        }
    };
    let alloc = || pool.alloc_zeroed().map_err(|e| e.to_string());
    let mut micros = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        finish(start(alloc()?)?)?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::with_capacity(WINDOW);
    for _ in 0..n {
        if in_flight.len() == WINDOW {
            if let Some(oldest) = in_flight.pop_front() {
                finish(oldest)?;
            }
        }
        in_flight.push_back(start(alloc()?)?);
    }
    for receiver in in_flight {
        finish(receiver)?;
    }
    let pages_per_s = n as f64 / started.elapsed().as_secs_f64();
    let after = nodes[0].verbs_counters();
    let fetches = (2 * n) as f64;
    Ok(vec![
        format!("{:.1}", percentile(&micros, 0.5)),
        format!("{:.1}", percentile(&micros, 0.99)),
        format!("{pages_per_s:.0}"),
        format!(
            "{:.2} ({:.2} landed in the pool page)",
            (after.rdma_reads - before.rdma_reads) as f64 / fetches,
            (after.reads_landed - before.reads_landed) as f64 / fetches
        ),
    ])
}

const ROWS: [&str; 15] = [
    "small request round trip, median µs",
    "small request round trip, p99 µs",
    "page fetch (request + 4 KiB answer), median µs",
    "page fetch, p99 µs",
    "page fetches per second, 64 outstanding",
    "page fetch bandwidth, MiB/s",
    "one-way 64 B messages per second",
    "work requests posted per operation, node 0",
    "signalled completions per operation, node 0",
    "inline SENDs per operation, node 0",
    "RDMA WRITEs (stream pieces larger than a SEND) per operation, node 0",
    "page fetch by one RDMA READ into a pool page, median µs",
    "page fetch by RDMA READ, p99 µs",
    "page fetches by RDMA READ per second, 64 outstanding",
    "RDMA READs per page fetch",
];

/// Runs every transport this host can build and prints the table.
pub fn run(sizes: Sizes) -> Result<(), String> {
    let mut columns = vec![Column {
        name: "io_uring TCP".to_string(),
        cells: measure(&tcp_pair()?, sizes)?,
    }];
    let rdma = match verbs::probe() {
        verbs::Probe::Available(_) => Column {
            name: "RDMA verbs".to_string(),
            cells: measure(&verbs_pair()?, sizes)?,
        },
        verbs::Probe::Unavailable(why) => {
            eprintln!("dvm-bench transport: no RDMA column: {why}");
            Column {
                name: "RDMA verbs".to_string(),
                cells: vec!["n/a".to_string(); ROWS.len()],
            }
        }
    };
    columns.push(rdma);
    println!(
        "two nodes in one process over 127.0.0.1: {} round trips, {} page fetches (each way), {} messages",
        sizes.round_trips, sizes.pages, sizes.messages
    );
    println!();
    println!(
        "| measure | {} |",
        columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(columns.len()));
    for (row, name) in ROWS.iter().enumerate() {
        let cells: Vec<&str> = columns
            .iter()
            .map(|c| c.cells.get(row).map_or("-", String::as_str))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}
