//! RDMA verbs endpoints over a real device.
//!
//! Tests marked `#[ignore]` need an RDMA device with an ACTIVE port; the build machines have
//! none, so `cargo test` lists them as ignored instead of passing them without running anything.
//! `scripts/rdma-guest` runs them with `--ignored` inside a QEMU guest with soft-RoCE (rxe0 on
//! the guest's loopback). The test not ignored checks what `probe` says on the machine it runs
//! on.

// A failed step is a failed test: unwrapping says where.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;

use dvm_transport::verbs::{
    self, CompletionKind, Endpoint, EndpointConfig, NoRdma, Probe, QpState, VerbsError,
};

const NEEDS_DEVICE: &str = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE";

/// Two endpoints connected to each other over a loopback TCP bootstrap socket.
fn pair(config: EndpointConfig) -> (Endpoint, Endpoint) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_config = config.clone();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        Endpoint::connect_over(&mut stream, server_config)
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let a = Endpoint::connect_over(&mut stream, config).unwrap();
    let b = server.join().unwrap().unwrap();
    (a, b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

#[test]
fn probe_matches_what_the_kernel_offers() {
    let ib = Path::new("/sys/class/infiniband");
    let devices = std::fs::read_dir(ib).map(|d| d.count()).unwrap_or(0);
    match verbs::probe() {
        Probe::Unavailable(why) if devices == 0 => assert!(
            matches!(
                why,
                NoRdma::KernelWithoutRdma | NoRdma::NoDeviceNode | NoRdma::NoDevices
            ),
            "no device in sysfs, yet probe says {why:?}"
        ),
        Probe::Unavailable(why) => assert!(
            matches!(why, NoRdma::NoActivePort(_)),
            "{devices} device(s) in sysfs, yet probe says {why:?}"
        ),
        Probe::Available(found) => {
            assert!(devices > 0, "probe found {found:?} but sysfs lists none");
            assert!(found.iter().any(|d| d.active_port().is_some()));
        }
    }
    // Asking for an endpoint where there is no RDMA is the same typed reason, not a crash.
    if devices == 0 {
        let err = Endpoint::create(EndpointConfig::default()).unwrap_err();
        assert!(matches!(err, VerbsError::NoRdma(_)), "{err:?}");
    }
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn probe_finds_an_active_port_with_an_ipv4_mapped_gid() {
    let Probe::Available(devices) = verbs::probe() else {
        panic!("{NEEDS_DEVICE}; probe found none: {:?}", verbs::probe());
    };
    let port = devices
        .iter()
        .find_map(|d| d.active_port())
        .expect("an active port");
    assert!(port.active_mtu >= 256, "{port:?}");
    let index = port.ipv4_mapped_gid().expect("an IPv4-mapped GID");
    // The endpoint finds the same entry by scanning, not by assuming index 1.
    let endpoint = Endpoint::create(EndpointConfig::default()).unwrap();
    assert_eq!(endpoint.gid_index(), index);
    assert_eq!(endpoint.qp_state().unwrap(), QpState::Init);
    assert!(endpoint.path_mtu() <= 1024);
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn write_then_read_back_byte_for_byte() {
    let (mut a, b) = pair(EndpointConfig::default());
    assert_eq!(a.qp_state().unwrap(), QpState::ReadyToSend);
    let len = 64 * 1024;
    let data = pattern(len, 7);
    a.copy_in(0, &data).unwrap();
    // WRITE lands in b's region without b doing anything.
    a.write(0, 4096, len).unwrap();
    let mut landed = vec![0u8; len];
    b.copy_out(4096, &mut landed).unwrap();
    assert!(landed == data, "RDMA WRITE placed different bytes");
    // READ it back into another part of a's region.
    let back_at = 256 * 1024;
    a.read(back_at, 4096, len).unwrap();
    let mut back = vec![0u8; len];
    a.copy_out(back_at, &mut back).unwrap();
    assert!(back == data, "RDMA READ returned different bytes");
    // Odd sizes and offsets, across the MTU boundary.
    for (off, n) in [(1usize, 1usize), (3, 1023), (5000, 1025), (9999, 3000)] {
        let bytes = pattern(n, off as u8);
        a.copy_in(off, &bytes).unwrap();
        a.write(off, (off + 100_000) as u64, n).unwrap();
        a.read(off + 500_000, (off + 100_000) as u64, n).unwrap();
        let mut out = vec![0u8; n];
        a.copy_out(off + 500_000, &mut out).unwrap();
        assert_eq!(out, bytes, "offset {off}, {n} bytes");
    }
    // Out of bounds is refused before anything is posted.
    let region = a.region_len();
    assert!(matches!(
        a.read(region - 10, 0, 11),
        Err(VerbsError::OutOfBounds { .. })
    ));
    assert!(matches!(
        a.write(0, (region - 10) as u64, 11),
        Err(VerbsError::OutOfBounds { .. })
    ));
    assert_eq!(a.qp_state().unwrap(), QpState::ReadyToSend);
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn send_recv_several_messages_in_order() {
    let config = EndpointConfig {
        receive_slots: 8,
        message_bytes: 2048,
        ..EndpointConfig::default()
    };
    let (mut a, mut b) = pair(config);
    // As many as there are posted receives, before the peer takes any.
    let first: Vec<Vec<u8>> = (0..8).map(|i| pattern(100 + i * 200, i as u8)).collect();
    for m in &first {
        a.send(m).unwrap();
    }
    for m in &first {
        assert_eq!(&b.recv().unwrap(), m);
    }
    // Many more than the slots: each taken receive is posted again.
    for i in 0..40u32 {
        let m = format!("message {i} from a").into_bytes();
        a.send(&m).unwrap();
        assert_eq!(b.recv().unwrap(), m);
        let reply = format!("reply {i} from b").into_bytes();
        b.send(&reply).unwrap();
        assert_eq!(a.recv().unwrap(), reply);
    }
    // Empty and full-size messages.
    a.send(&[]).unwrap();
    assert_eq!(b.recv().unwrap(), Vec::<u8>::new());
    let full = pattern(2048, 99);
    a.send(&full).unwrap();
    assert_eq!(b.recv().unwrap(), full);
    assert!(matches!(
        a.send(&[0u8; 2049]),
        Err(VerbsError::MessageTooLarge {
            len: 2049,
            max: 2048
        })
    ));
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn read_with_a_wrong_rkey_is_a_typed_error_and_the_endpoint_drops_cleanly() {
    let (mut a, b) = pair(EndpointConfig::default());
    let mut wrong = a.peer_region().unwrap();
    wrong.rkey = !wrong.rkey;
    match a.read_from(wrong, 0, 0, 4096) {
        Err(VerbsError::Completion {
            op,
            status,
            status_text,
            ..
        }) => {
            assert_eq!(op, CompletionKind::Read);
            assert_ne!(status, 0);
            assert!(!status_text.is_empty());
        }
        other => panic!("expected a failed completion, got {other:?}"),
    }
    assert_eq!(a.qp_state().unwrap(), QpState::Error);
    assert!(matches!(a.read(0, 0, 8), Err(VerbsError::QpInError)));
    assert!(matches!(a.send(b"late"), Err(VerbsError::QpInError)));
    drop(a);
    drop(b);
    // The device is fine: a new pair works.
    let (mut a, b) = pair(EndpointConfig::default());
    a.copy_in(0, b"still works").unwrap();
    a.write(0, 0, 11).unwrap();
    let mut out = [0u8; 11];
    b.copy_out(0, &mut out).unwrap();
    assert_eq!(&out, b"still works");
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The verbs resources the kernel holds for each device (`rdma resource show`: pd, cq, qp, mr,
/// ctx counts), where iproute2's `rdma` is available.
fn kernel_resources() -> Option<String> {
    let out = Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The process's file descriptors and the kernel's verbs objects are as they were before.
fn assert_nothing_leaked(fds: usize, resources: Option<String>) {
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    match (resources, kernel_resources()) {
        (Some(before), Some(after)) => {
            assert_eq!(after, before, "verbs resources leaked (rdma resource show)")
        }
        // scripts/rdma-guest puts iproute2's `rdma` in the guest and says so: there the
        // kernel's own counts must be compared, not skipped.
        _ if std::env::var_os("DVM_RDMA_GUEST").is_some() => {
            panic!("`rdma resource show` failed inside the guest")
        }
        _ => eprintln!("`rdma resource show` unavailable: checked file descriptors only"),
    }
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn creating_and_dropping_100_pairs_leaks_nothing() {
    let config = EndpointConfig {
        region_bytes: 64 * 1024,
        receive_slots: 4,
        ..EndpointConfig::default()
    };
    // One pair first: the library opens what it keeps for the process (e.g. its netlink socket).
    drop(pair(config.clone()));
    let fds = open_fds();
    let resources = kernel_resources();
    for i in 0..100u32 {
        let (mut a, mut b) = pair(config.clone());
        let word = i.to_le_bytes();
        a.copy_in(0, &word).unwrap();
        a.write(0, 8, 4).unwrap();
        a.send(&word).unwrap();
        assert_eq!(b.recv().unwrap(), word);
        let mut out = [0u8; 4];
        b.copy_out(8, &mut out).unwrap();
        assert_eq!(out, word);
        if i % 10 == 9 {
            // Dropped with receives still posted and in either order.
            drop(b);
            drop(a);
        }
    }
    assert_nothing_leaked(fds, resources);
}

// ---------------------------------------------------------------------------------------------
// The cluster transport over verbs.

use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::verbs::{VerbsConfig, VerbsTransport};
use dvm_transport::{
    wire, Event, LossReason, PageVersion, PageVersionRef, Transport, TransportError, PAGE_BYTES,
};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// A small ring and small SENDs, so that flow control, fragmentation and slot reuse are
/// exercised by modest traffic.
fn tight() -> VerbsConfig {
    let mut config = VerbsConfig::default();
    config.endpoint.message_bytes = 4096;
    config.endpoint.receive_slots = 8;
    config.endpoint.send_slots = 8;
    config.signal_every = 4;
    config.published_slots = 256;
    config
}

/// `world` verbs transports on 127.0.0.1, each established on its own thread; rank `r` uses
/// `tokens[r]`.
fn verbs_mesh(
    tokens: &[&[u8]],
    config: VerbsConfig,
) -> Vec<Result<VerbsTransport, TransportError>> {
    verbs_mesh_tuned(tokens, config, |_| {})
}

/// [`verbs_mesh`] with the bootstrap configuration (queue limits, timeouts) adjusted by `tune`.
fn verbs_mesh_tuned(
    tokens: &[&[u8]],
    config: VerbsConfig,
    tune: impl Fn(&mut TcpConfig),
) -> Vec<Result<VerbsTransport, TransportError>> {
    let world = tokens.len() as u32;
    let same_token = tokens.windows(2).all(|w| w[0] == w[1]);
    let bounds: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(r, token)| {
            let mut tcp = TcpConfig::new(r as u32, world, "127.0.0.1:0".parse().unwrap(), token);
            // A refused rank never connects: its peers give up sooner.
            tcp.connect_timeout_ms = if same_token { 20_000 } else { 2_000 };
            tcp.heartbeat_ms = 200;
            tcp.peer_timeout_ms = 10_000;
            tune(&mut tcp);
            TcpTransport::bind(tcp).unwrap()
        })
        .collect();
    let addrs: Vec<_> = bounds.iter().map(|b| b.local_addr()).collect();
    let threads: Vec<_> = bounds
        .into_iter()
        .map(|bound| {
            let addrs = addrs.clone();
            let config = config.clone();
            std::thread::spawn(move || VerbsTransport::establish(bound, addrs, config))
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn connected(world: usize, config: VerbsConfig) -> Vec<VerbsTransport> {
    let tokens: Vec<&[u8]> = (0..world).map(|_| &b"job-token"[..]).collect();
    verbs_mesh(&tokens, config)
        .into_iter()
        .map(|t| t.unwrap())
        .collect()
}

/// Polls `t` until `done` holds for what arrived, or panics after `WAIT`.
fn collect_until(t: &VerbsTransport, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let start = Instant::now();
    let mut events = Vec::new();
    while !done(&events) {
        assert!(
            start.elapsed() < WAIT,
            "node {}: waited {WAIT:?}; got {} events: {:?}",
            t.local(),
            events.len(),
            events.iter().rev().take(3).collect::<Vec<_>>()
        );
        t.poll(&mut events, Duration::from_millis(100)).unwrap();
    }
    events
}

fn message(from: u32, to: u32, seq: usize) -> Vec<u8> {
    // Sizes cross the inline limit, one SEND, and several SENDs of a 4 KiB ring.
    let len = match seq % 5 {
        0 => 0,
        1 => 40,
        2 => 3000,
        3 => 9000,
        _ => 20_000 + seq,
    };
    common::tagged(from, to, seq, len)
}

#[test]
fn verbs_transport_without_rdma_fails_to_establish_with_the_reason() {
    if matches!(verbs::probe(), Probe::Available(_)) {
        return; // covered by the guest tests below
    }
    for result in verbs_mesh(&[b"t", b"t"], VerbsConfig::default()) {
        let err = result.err().expect("no RDMA, no verbs transport");
        assert!(err.to_string().contains("no RDMA"), "{err}");
    }
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn verbs_mesh_of_three_keeps_order_through_fragments_and_flow_control() {
    let sends_only = VerbsConfig {
        write_ring_bytes: 0,
        ..tight()
    };
    mesh_of_three(sends_only, false, |v| {
        // Each node sent > 2 x 4 MiB in 4 KiB SENDs: credits must have come back many times.
        assert!(v.work_requests_posted > 2 * 1024, "{v:?}");
        assert!(v.receives > 2 * 1024, "{v:?}");
        assert_eq!((v.rdma_writes, v.bytes_written), (0, 0), "{v:?}");
    });
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn verbs_mesh_of_three_keeps_order_through_writes_into_small_rings() {
    // A 64 KiB ring: pieces of at most 16 KiB, so the 4 MiB frames lap each ring 64 times,
    // with skips at the lap's end, and wait for returned ring bytes.
    let rings = VerbsConfig {
        write_ring_bytes: 64 << 10,
        ..tight()
    };
    mesh_of_three(rings, false, |v| {
        // Everything larger than a SEND went in WRITEs of up to 16 KiB: at least 256 per big
        // frame, far fewer work requests than 4 KiB SENDs would need.
        assert!(v.rdma_writes >= 2 * 256, "{v:?}");
        assert!(v.bytes_written >= 2 * (4 << 20), "{v:?}");
        assert!(v.work_requests_posted < 2 * 1024, "{v:?}");
    });
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn verbs_mesh_of_three_keeps_order_while_callers_take_turns() {
    // Idle workers and waiting readers take turns of the I/O work (`progress`): a caller's
    // events must reach the inbox before the next turn's, whoever takes it, or a peer's
    // frames arrive out of order.
    let rings = VerbsConfig {
        write_ring_bytes: 64 << 10,
        ..tight()
    };
    mesh_of_three(rings, true, |v| {
        assert!(v.caller_turns > 0, "{v:?}");
    });
}

/// Sets a flag when dropped (also by a panic), so that threads polling it end.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Three nodes send each other 150 messages of 0 to 20 KiB, a 4 MiB frame, a request and
/// pages; each must arrive in order and intact. `check` judges each node's verbs counters.
/// With `pollers`, a thread per node calls `progress` in a loop all along (the counts of
/// chains and signalled completions then depend on who took the turns: not checked).
fn mesh_of_three(config: VerbsConfig, pollers: bool, check: impl Fn(&verbs::VerbsCounters)) {
    let nodes = connected(3, config);
    assert!(nodes.iter().all(|n| n.name() == "rdma-verbs"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for t in nodes.iter().filter(|_| pollers) {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if !t.progress() {
                        std::thread::yield_now();
                    }
                }
            });
        }
        exchange(&nodes, pollers, &check);
    });
}

fn exchange(nodes: &[VerbsTransport], pollers: bool, check: &dyn Fn(&verbs::VerbsCounters)) {
    const N: usize = 150;
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i ^ (i >> 13)) as u8).collect();
    std::thread::scope(|s| {
        for t in nodes {
            let big = &big;
            s.spawn(move || {
                let me = t.local();
                for seq in 0..N {
                    for to in (0..3).filter(|&r| r != me) {
                        t.send(to, &message(me, to, seq)).unwrap();
                    }
                }
                for to in (0..3).filter(|&r| r != me) {
                    // A frame of the largest size, then a request and pages behind it.
                    t.send(to, big).unwrap();
                    t.request(to, b"ping?").unwrap();
                    let pages = [
                        common::page(u64::from(me)),
                        common::page(u64::from(me) + 10),
                    ];
                    let refs: Vec<PageVersionRef<'_>> =
                        pages.iter().map(PageVersion::as_ref).collect();
                    t.push_pages(to, &refs).unwrap();
                }
                t.flush().unwrap();
            });
        }
    });
    let mut answered = [0usize; 3];
    for t in nodes {
        let me = t.local();
        let events = collect_until(t, |ev| {
            ev.iter()
                .filter(|e| matches!(e, Event::Pages { .. }))
                .count()
                == 2
        });
        let mut next = [0usize; 3];
        let mut got_big = [false; 3];
        for e in &events {
            match e {
                Event::Message { from, payload } if payload.len() == big.len() => {
                    assert_eq!(
                        next[*from as usize], N,
                        "the big frame overtook smaller ones"
                    );
                    assert!(payload == &big, "the 4 MiB frame arrived altered");
                    got_big[*from as usize] = true;
                }
                Event::Message { from, payload } => {
                    let seq = next[*from as usize];
                    assert_eq!(payload, &message(*from, me, seq), "from {from} seq {seq}");
                    next[*from as usize] += 1;
                }
                Event::Request { from, id, payload } => {
                    assert!(
                        got_big[*from as usize],
                        "the request overtook the big frame"
                    );
                    assert_eq!(payload, b"ping?");
                    t.respond(*from, *id, b"pong").unwrap();
                }
                // An earlier node already answered this node's request.
                Event::Response { payload, .. } => {
                    assert_eq!(payload, b"pong");
                    answered[me as usize] += 1;
                }
                Event::Pages { from, pages } => {
                    assert_eq!(
                        pages,
                        &vec![
                            common::page(u64::from(*from)),
                            common::page(u64::from(*from) + 10)
                        ]
                    );
                }
                other => panic!("node {me}: unexpected {other:?}"),
            }
        }
        for r in (0..3).filter(|&r| r != me) {
            assert_eq!(next[r as usize], N, "node {me} from {r}");
            assert!(got_big[r as usize]);
        }
    }
    for t in nodes {
        let me = t.local() as usize;
        let events = collect_until(t, |ev| ev.len() + answered[me] == 2);
        for e in &events {
            assert!(
                matches!(e, Event::Response { payload, .. } if payload == b"pong"),
                "{e:?}"
            );
            answered[me] += 1;
        }
        // This node's own answers may still be queued: a peer that was not polled while the
        // test polled the others stopped taking receives (its inbox was full) and returns
        // credits only once it runs again. They leave within a bound, or the path is stuck.
        let deadline = Instant::now() + Duration::from_secs(20);
        while t.counters().iter().any(|c| c.queue_depth_bytes > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for c in t.counters() {
            assert_eq!(c.messages_received, N as u64 + 3 + 1, "{c:?}");
            assert_eq!(c.queue_depth_bytes, 0, "{c:?}");
        }
        let v = t.verbs_counters();
        check(&v);
        if !pollers {
            // Pieces go in chains, one `ibv_post_send` for several work requests.
            assert!(
                v.send_chains > 0 && v.send_chains < v.work_requests_posted,
                "{v:?}"
            );
            // Selective signalling: about one completion per `signal_every` SENDs.
            assert!(
                v.signalled_completions * 3 < v.work_requests_posted,
                "{v:?}"
            );
        }
        assert!(v.signalled_completions > 0, "{v:?}");
        assert!(v.inline_sends > 0, "{v:?}");
        assert_eq!(v.rdma_reads, 0, "{v:?}");
    }
    assert_eq!(answered, [2, 2, 2]);
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn close_is_peer_left_and_abort_is_peer_lost_once() {
    let mut nodes = connected(3, VerbsConfig::default());
    let n2 = nodes.pop().unwrap();
    let n1 = nodes.pop().unwrap();
    let n0 = nodes.pop().unwrap();
    n2.send(0, b"last words").unwrap();
    n2.close();
    let events = collect_until(&n0, |ev| {
        ev.iter().any(|e| matches!(e, Event::PeerLeft { .. }))
    });
    assert_eq!(
        events,
        vec![
            Event::Message {
                from: 2,
                payload: b"last words".to_vec()
            },
            Event::PeerLeft { peer: 2 }
        ]
    );
    let events = collect_until(&n1, |ev| !ev.is_empty());
    assert_eq!(events, vec![Event::PeerLeft { peer: 2 }]);
    assert!(matches!(
        n0.send(2, b"x"),
        Err(TransportError::PeerGone { peer: 2, .. })
    ));

    n1.abort();
    let events = collect_until(&n0, |ev| !ev.is_empty());
    assert!(
        matches!(
            &events[..],
            [Event::PeerLost {
                peer: 1,
                reason: LossReason::Closed { .. } | LossReason::Rdma(_)
            }]
        ),
        "{events:?}"
    );
    // Exactly once: nothing more arrives about it.
    let mut more = Vec::new();
    n0.poll(&mut more, Duration::from_millis(1500)).unwrap();
    assert!(more.is_empty(), "{more:?}");
    n0.close();
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_wrong_job_token_is_refused_before_any_queue_pair() {
    let results = verbs_mesh(&[b"right", b"wrong"], VerbsConfig::default());
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(errors.iter().any(|e| e.contains("refused")), "{errors:?}");
    assert!(results.iter().all(Result::is_err), "{errors:?}");
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn creating_and_dropping_verbs_transports_leaks_nothing() {
    drop(connected(2, tight()));
    let fds = open_fds();
    let resources = kernel_resources();
    for i in 0..15u32 {
        let nodes = connected(2, tight());
        nodes[0].send(1, &i.to_le_bytes()).unwrap();
        let events = collect_until(&nodes[1], |ev| !ev.is_empty());
        assert_eq!(
            events,
            vec![Event::Message {
                from: 0,
                payload: i.to_le_bytes().to_vec()
            }]
        );
        let mut nodes = nodes.into_iter();
        let (a, b) = (nodes.next().unwrap(), nodes.next().unwrap());
        if i % 2 == 0 {
            a.close();
            b.abort();
        } else {
            b.close();
            drop(a);
        }
    }
    assert_nothing_leaked(fds, resources);
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_receiver_that_stops_polling_pushes_back_to_the_sender() {
    const LEN: usize = 8000;
    const FRAME_MAX: u64 = (wire::HEADER_BYTES + wire::MAX_PAYLOAD_BYTES) as u64;
    let mut nodes: Vec<VerbsTransport> = verbs_mesh_tuned(&[b"t", b"t"], tight(), |tcp| {
        // The smallest limits allowed: one largest frame.
        tcp.max_inbound_bytes = FRAME_MAX;
        tcp.max_queue_bytes = FRAME_MAX;
        tcp.send_timeout_ms = 1500;
    })
    .into_iter()
    .map(|t| t.unwrap())
    .collect();
    let n1 = nodes.pop().unwrap();
    let n0 = nodes.pop().unwrap();
    let payload = |seq: u32| {
        let mut v = vec![(seq % 251) as u8; LEN];
        v[..4].copy_from_slice(&seq.to_le_bytes());
        v
    };
    // Node 1 does not poll: past 4 MiB of undelivered events it stops taking receives, so no
    // credits return and node 0's queue fills.
    let mut sent = 0u32;
    let err = loop {
        match n0.send(1, &payload(sent)) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000, "the sender was never held back");
    };
    assert!(
        matches!(err, TransportError::QueueFull { peer: 1, .. }),
        "{err}"
    );
    // Bounded: the inbox limit, one ring of receives, one write ring, the queue limit and one
    // frame over each.
    assert!(
        (sent as usize) * LEN < 2 * FRAME_MAX as usize + (1 << 20) + tight().write_ring_bytes,
        "{sent} messages accepted"
    );
    let events = collect_until(&n1, |ev| ev.len() == sent as usize);
    for (seq, e) in events.iter().enumerate() {
        assert_eq!(
            e,
            &Event::Message {
                from: 0,
                payload: payload(seq as u32)
            }
        );
    }
    // The path works again once drained.
    n0.send(1, b"again").unwrap();
    let events = collect_until(&n1, |ev| !ev.is_empty());
    assert_eq!(
        events,
        vec![Event::Message {
            from: 0,
            payload: b"again".to_vec()
        }]
    );
}

/// Rank 1 of a 2-node job played by hand against a real rank 0: the Hello, the queue pair
/// exchange and the confirmation exactly as the transport does them, after which the test makes
/// it misbehave. Returns the real node, the fake's bootstrap socket and its endpoint.
fn real_and_fake(peer_timeout_ms: u64) -> (VerbsTransport, TcpStream, Endpoint) {
    use dvm_transport::handshake::Policy;
    use dvm_transport::wire::{Decoder, Frame};
    let token = b"fake-peer-test";
    let mut tcp = TcpConfig::new(0, 2, "127.0.0.1:0".parse().unwrap(), token);
    tcp.heartbeat_ms = 100;
    tcp.peer_timeout_ms = peer_timeout_ms;
    let bound = TcpTransport::bind(tcp).unwrap();
    let addr = bound.local_addr();
    let real = std::thread::spawn(move || {
        VerbsTransport::establish(bound, vec![addr, addr], VerbsConfig::default())
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let policy = Policy {
        local: 1,
        world: 2,
        token,
    };
    let mut decoder = Decoder::new();
    let mut next = |stream: &mut TcpStream| loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return frame;
        }
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "rank 0 closed the bootstrap socket");
        decoder.feed(&buf[..n]);
    };
    let send = |stream: &mut TcpStream, frame: Frame| {
        stream.write_all(&frame.to_bytes().unwrap()).unwrap();
    };
    send(&mut stream, Frame::Hello(policy.hello()));
    assert!(matches!(next(&mut stream), Frame::HelloAck { rank: 0, .. }));
    let mut endpoint = Endpoint::create(EndpointConfig::default()).unwrap();
    send(
        &mut stream,
        Frame::Message(endpoint.local_info().encode().to_vec()),
    );
    // No published table and no write ring on this side: 40 zero bytes.
    send(&mut stream, Frame::Message(vec![0; 40]));
    let Frame::Message(info) = next(&mut stream) else {
        panic!("no queue pair information from rank 0");
    };
    let Frame::Message(table) = next(&mut stream) else {
        panic!("no published-table information from rank 0");
    };
    assert_eq!(table.len(), 40);
    let info = verbs::PeerInfo::decode(&info.try_into().unwrap()).unwrap();
    endpoint.connect(&info).unwrap();
    send(&mut stream, Frame::Ping);
    assert_eq!(next(&mut stream), Frame::Ping);
    (real.join().unwrap().unwrap(), stream, endpoint)
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_silent_peer_is_lost_after_the_peer_timeout() {
    let (real, _stream, _endpoint) = real_and_fake(1000);
    let start = Instant::now();
    // The fake neither pings nor sends: rank 0 must give up on it, once.
    let events = collect_until(&real, |ev| !ev.is_empty());
    assert!(
        matches!(&events[..], [Event::PeerLost { peer: 1, reason: LossReason::Timeout { silent_ms } }] if *silent_ms >= 1000),
        "{events:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(
        real.send(1, b"x"),
        Err(TransportError::PeerGone { peer: 1, .. })
    ));
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_send_without_a_credit_header_or_with_garbage_ends_only_that_peer() {
    // Two bytes: shorter than the credit header.
    let (real, _stream, mut endpoint) = real_and_fake(10_000);
    endpoint.send(&[1, 2]).unwrap();
    let events = collect_until(&real, |ev| !ev.is_empty());
    assert!(
        matches!(&events[..], [Event::PeerLost { peer: 1, reason: LossReason::Rdma(why) }] if why.contains("credit header")),
        "{events:?}"
    );
    real.close();
    // A valid header, then bytes that are not a frame.
    let (real, _stream, mut endpoint) = real_and_fake(10_000);
    let mut garbage = 0u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"not a DVM frame at all");
    endpoint.send(&garbage).unwrap();
    let events = collect_until(&real, |ev| !ev.is_empty());
    assert!(
        matches!(
            &events[..],
            [Event::PeerLost {
                peer: 1,
                reason: LossReason::Protocol(wire::WireError::BadMagic { offset: 0, .. })
            }]
        ),
        "{events:?}"
    );
    real.close();
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_write_into_the_ring_of_a_bad_size_ends_only_that_peer() {
    // The fake peer announced no ring, but rank 0 has one: a WRITE with immediate shorter than
    // the piece header, then one larger than a quarter of the ring, each ends the peer with why.
    for (len, what) in [(3usize, "of 3 bytes"), (300 << 10, "of 307200 bytes")] {
        let (real, _stream, mut endpoint) = real_and_fake(10_000);
        endpoint
            .post_write_imm(0, verbs::WRITE_RING_OFFSET as u64, len, true, 1)
            .unwrap();
        let events = collect_until(&real, |ev| !ev.is_empty());
        assert!(
            matches!(&events[..], [Event::PeerLost { peer: 1, reason: LossReason::Rdma(why) }] if why.contains(what) && why.contains("write ring")),
            "{events:?}"
        );
        real.close();
    }
}

// ---------------------------------------------------------------------------------------------
// One-sided page reads of the published table.

use dvm_numa::{PageBox, PagePool, Topology};
use dvm_transport::verbs::published::{self, judge, judge_in_place, Judgement, Verdict};
use dvm_transport::verbs::{SlotBytes, SlotRead};

fn filled(ts: u64) -> Box<[u8; PAGE_BYTES]> {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    for (i, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(ts.wrapping_mul(0x100) + i as u64).to_le_bytes());
    }
    page
}

fn read_slot(t: &VerbsTransport, home: u32, page: u64) -> SlotBytes {
    read_into(t, home, page, None).bytes
}

fn read_into(t: &VerbsTransport, home: u32, page: u64, landing: Option<PageBox>) -> SlotRead {
    t.read_published(home, page, landing)
        .unwrap()
        .expect("the home publishes a table")
        .recv_timeout(WAIT)
        .unwrap()
}

/// `n` READs of `page`'s slot at node 1 in flight at once, each landing in a page of `pool`.
fn reads_into_pool(
    t: &VerbsTransport,
    pool: &std::sync::Arc<PagePool>,
    page: u64,
    n: usize,
) -> Vec<std::sync::mpsc::Receiver<SlotRead>> {
    (0..n)
        .map(|_| {
            let landing = pool.alloc_zeroed().unwrap();
            t.read_published(1, page, Some(landing)).unwrap().unwrap()
        })
        .collect()
}

/// Pages of a pool of 64 KiB chunks (16 pages each), for READs to land in.
fn small_pool() -> std::sync::Arc<PagePool> {
    PagePool::new(&Topology::detect(), 0, 64 * 1024).unwrap()
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn a_published_version_is_read_back_and_judged_against_the_snapshot() {
    let nodes = connected(3, tight());
    let table = nodes[1].table().expect("a table");
    let page = 0x4000_0123;
    // Before anything is published the slot never validates.
    assert_eq!(
        judge(&read_slot(&nodes[0], 1, page), page, 10),
        Judgement::Empty
    );
    table.publish_with(page, || Some((7, Some(filled(7)))));
    for reader in [0, 2] {
        let bytes = read_slot(&nodes[reader], 1, page);
        assert_eq!(
            judge(&bytes, page, 7),
            Judgement::Accept {
                version_ts: 7,
                data: Some(filled(7))
            }
        );
        assert_eq!(judge(&bytes, page, 6), Judgement::Newer);
    }
    // A page sharing the slot evicts it: readers of the first see another page's slot.
    let other = (page + 1..)
        .find(|p| published::slot_of(*p, table.slots()) == published::slot_of(page, table.slots()))
        .unwrap();
    table.publish_with(other, || Some((9, Some(filled(9)))));
    let bytes = read_slot(&nodes[0], 1, page);
    assert_eq!(judge(&bytes, page, 100), Judgement::OtherPage);
    assert!(matches!(
        judge(&bytes, other, 9),
        Judgement::Accept { version_ts: 9, .. }
    ));
    // Many READs in flight at once (more than the targets of one peer) all come back right.
    let receivers: Vec<_> = (0..40)
        .map(|_| nodes[2].read_published(1, other, None).unwrap().unwrap())
        .collect();
    for r in receivers {
        let bytes = r.recv_timeout(WAIT).unwrap().bytes;
        assert_eq!(
            judge(&bytes, other, 9),
            Judgement::Accept {
                version_ts: 9,
                data: Some(filled(9))
            }
        );
    }
    // A page the home holds no version of is published as absent (zeros at timestamp 0).
    let absent = page + 0x1000;
    table.publish_with(absent, || Some((0, None)));
    assert_eq!(
        judge(&read_slot(&nodes[2], 1, absent), absent, 3),
        Judgement::Accept {
            version_ts: 0,
            data: None
        }
    );
    let counters = nodes[2].verbs_counters();
    assert!(counters.rdma_reads >= 42, "{counters:?}");
    assert_eq!(counters.reads_landed, 0, "{counters:?}");
    // READs that land in pool pages: 40 at once over three 16-page chunks, twice. Each chunk
    // is registered once, on its first landing; the pages hold the version with no copy.
    let pool = small_pool();
    for round in 0..2 {
        for r in reads_into_pool(&nodes[0], &pool, other, 40) {
            let read = r.recv_timeout(WAIT).unwrap();
            assert!(read.landed, "round {round}: the page was copied");
            let mut page = read.page.expect("the landing page comes back");
            assert_eq!(
                judge_in_place(&read.bytes, &mut page, other, 9),
                Verdict::Accept {
                    version_ts: 9,
                    zeros: false
                }
            );
            assert_eq!(&page[..], &filled(9)[..]);
        }
    }
    // A caller may take the I/O thread's turns (`progress`: what idle workers and waiting
    // readers do): READs posted and completed that way arrive the same.
    let deadline = Instant::now() + WAIT;
    for r in reads_into_pool(&nodes[0], &pool, other, 10) {
        let read = loop {
            if let Ok(read) = r.try_recv() {
                break read;
            }
            assert!(
                Instant::now() < deadline,
                "a READ polled for never completed"
            );
            nodes[0].progress();
        };
        let mut page = read.page.expect("the landing page comes back");
        assert!(matches!(
            judge_in_place(&read.bytes, &mut page, other, 9),
            Verdict::Accept { version_ts: 9, .. }
        ));
    }
    let counters = nodes[0].verbs_counters();
    eprintln!(
        "turns taken by the polling caller: {}",
        counters.caller_turns
    );
    assert_eq!(counters.reads_landed, 90, "{counters:?}");
    assert_eq!(counters.chunks_registered, 3, "{counters:?}");
    // Without registered chunks (as when the locked-memory limit refuses them) the page
    // bytes are copied into the landing page: the same contents, nothing registered.
    let mut config = tight();
    config.land_in_pool = false;
    let copying = connected(2, config);
    copying[1]
        .table()
        .expect("a table")
        .publish_with(other, || Some((9, Some(filled(9)))));
    let read = read_into(&copying[0], 1, other, Some(pool.alloc_zeroed().unwrap()));
    assert!(!read.landed);
    let mut landed = read.page.expect("the landing page comes back");
    assert_eq!(
        judge_in_place(&read.bytes, &mut landed, other, 9),
        Verdict::Accept {
            version_ts: 9,
            zeros: false
        }
    );
    assert_eq!(&landed[..], &filled(9)[..]);
    let counters = copying[0].verbs_counters();
    assert_eq!((counters.reads_landed, counters.chunks_registered), (0, 0));
    // Messages still flow on the same queue pairs.
    nodes[0].send(1, b"after reads").unwrap();
    let events = collect_until(&nodes[1], |ev| !ev.is_empty());
    assert_eq!(
        events,
        vec![Event::Message {
            from: 0,
            payload: b"after reads".to_vec()
        }]
    );
    // A home without a table: readers are told so, and ask its CPU instead.
    let mut config = tight();
    config.published_slots = 0;
    let plain = connected(2, config);
    assert!(plain[1].table().is_none());
    assert!(plain[0].read_published(1, page, None).unwrap().is_none());
}

#[test]
#[ignore = "needs an RDMA device: run by scripts/rdma-guest under soft-RoCE"]
fn reads_racing_a_home_that_rewrites_the_slot_never_accept_a_mixed_version() {
    let nodes = connected(2, tight());
    let table = nodes[1].table().expect("a table");
    let page = 0x77;
    table.publish_with(page, || Some((1, Some(filled(1)))));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let table = table.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut ts = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ts += 1;
                table.publish_with(page, || Some((ts, Some(filled(ts)))));
            }
            ts
        })
    };
    // Every other READ lands its page bytes in a pool page: the check word must catch a page
    // torn there as surely as one torn in the slot image.
    let pool = small_pool();
    let (mut accepted, mut landed, mut torn) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (accepted < 200 || landed < 100 || torn == 0) && Instant::now() < deadline {
        if accepted % 2 == 0 {
            let read = read_into(&nodes[0], 1, page, Some(pool.alloc_zeroed().unwrap()));
            assert!(read.landed);
            let mut data = read.page.expect("the landing page comes back");
            match judge_in_place(&read.bytes, &mut data, page, u64::MAX) {
                Verdict::Accept { version_ts, zeros } => {
                    assert!(!zeros);
                    assert_eq!(&data[..], &filled(version_ts)[..], "a mixed version landed");
                    accepted += 1;
                    landed += 1;
                }
                Verdict::Torn => torn += 1,
                other => panic!("{other:?}"),
            }
            continue;
        }
        let bytes = read_slot(&nodes[0], 1, page);
        match judge(&bytes, page, u64::MAX) {
            Judgement::Accept { version_ts, data } => {
                // The contents are exactly those written with that timestamp.
                assert_eq!(
                    data,
                    Some(filled(version_ts)),
                    "a mixed version was accepted"
                );
                accepted += 1;
            }
            Judgement::Torn => torn += 1,
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    eprintln!(
        "{accepted} READs accepted ({landed} into pool pages), {torn} torn, {written} versions written"
    );
    assert!(accepted >= 200, "{accepted} accepted");
    assert!(landed >= 100, "{landed} accepted into pool pages");
    assert!(written > 2);
}
