//! Three transports in one process on 127.0.0.1: data paths, ordering, correlation, counters,
//! departures and losses.

mod common;

use common::{collect_until, mesh, page, tagged as pattern};
use dvm_transport::tcp::ZeroCopy;
use dvm_transport::{
    Event, LossReason, PageVersion, PageVersionRef, RequestId, Transport, TransportError,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn all_to_all_messages_keep_per_peer_order() {
    all_to_all(true);
}

/// The fallback paths: single-shot receives into per-peer buffers, plain SEND only.
#[test]
fn all_to_all_without_multishot_or_zero_copy() {
    all_to_all(false);
}

fn all_to_all(kernel_features: bool) {
    let nodes = mesh(3, |c| {
        c.multishot_recv = kernel_features;
        c.zero_copy = if kernel_features {
            ZeroCopy::Always
        } else {
            ZeroCopy::Off
        };
    });
    if !kernel_features {
        let f = nodes[0].features();
        assert!(
            !f.multishot_recv && !f.send_zc && f.pinned_bytes == 0,
            "{f:?}"
        );
    }
    // Sizes from empty to 1 MiB, interleaved so small frames coalesce behind big ones.
    let sizes: Vec<usize> = vec![
        0,
        1,
        7,
        100,
        4095,
        4096,
        4097,
        65_536,
        0,
        3,
        1 << 20,
        12,
        300_000,
        1,
        99_999,
        2,
    ];
    std::thread::scope(|s| {
        for (from, node) in nodes.iter().enumerate() {
            let sizes = &sizes;
            s.spawn(move || {
                for (seq, &len) in sizes.iter().enumerate() {
                    for to in 0..3u32 {
                        if to as usize != from {
                            let msg = pattern(from as u32, to, seq, len);
                            node.send(to, &msg).expect("send");
                        }
                    }
                }
                node.flush().expect("flush");
            });
        }
    });
    let expected_per_node = 2 * sizes.len();
    for (to, node) in nodes.iter().enumerate() {
        let events = collect_until(node, WAIT, |e| e.len() >= expected_per_node);
        assert_eq!(events.len(), expected_per_node, "no extra events");
        let mut next_seq: HashMap<u32, usize> = HashMap::new();
        for e in events {
            let Event::Message { from, payload } = e else {
                panic!("unexpected event {e:?}");
            };
            let seq = next_seq.entry(from).or_insert(0);
            let want = pattern(from, to as u32, *seq, sizes[*seq]);
            assert!(
                payload == want,
                "message {seq} from {from} to {to} differs or is out of order"
            );
            *seq += 1;
        }
        assert_eq!(next_seq.values().sum::<usize>(), expected_per_node);
    }
    // Counters add up: what A queued for B is what B decoded from A.
    let counters: Vec<_> = nodes.iter().map(|n| n.counters()).collect();
    for a in 0..3u32 {
        for b in 0..3u32 {
            if a == b {
                continue;
            }
            let sent = counters[a as usize]
                .iter()
                .find(|c| c.peer == b)
                .expect("counter for peer");
            let recv = counters[b as usize]
                .iter()
                .find(|c| c.peer == a)
                .expect("counter for peer");
            assert_eq!(sent.messages_sent, sizes.len() as u64);
            assert_eq!(
                sent.messages_sent, recv.messages_received,
                "{a}->{b} messages"
            );
            assert_eq!(sent.bytes_sent, recv.bytes_received, "{a}->{b} bytes");
            assert_eq!(sent.queue_depth_bytes, 0, "flushed");
            assert!(sent.queue_max_bytes > 0);
        }
    }
}

#[test]
fn request_response_correlate() {
    let nodes = mesh(3, |_| {});
    // Node 0 asks 1 and 2 several questions; they answer with the question doubled.
    let mut asked: HashMap<RequestId, (u32, Vec<u8>)> = HashMap::new();
    for i in 0..20u8 {
        for to in [1u32, 2] {
            let q = vec![i, to as u8, 0xAB];
            let id = nodes[0].request(to, &q).expect("request");
            assert!(asked.insert(id, (to, q)).is_none(), "ids are unique");
        }
    }
    for responder in [1usize, 2] {
        let reqs = collect_until(&nodes[responder], WAIT, |e| e.len() >= 20);
        // Answer in reverse order: correlation must not depend on order.
        for e in reqs.into_iter().rev() {
            let Event::Request { from, id, payload } = e else {
                panic!("unexpected {e:?}");
            };
            assert_eq!(from, 0);
            let mut answer = payload.clone();
            answer.extend_from_slice(&payload);
            nodes[responder]
                .respond(from, id, &answer)
                .expect("respond");
        }
    }
    let answers = collect_until(&nodes[0], WAIT, |e| e.len() >= 40);
    for e in answers {
        let Event::Response { from, id, payload } = e else {
            panic!("unexpected {e:?}");
        };
        let (to, q) = asked.remove(&id).expect("response to a request we made");
        assert_eq!(from, to);
        assert_eq!(payload, [q.clone(), q].concat());
    }
    assert!(asked.is_empty());
}

#[test]
fn pages_round_trip_exactly() {
    let nodes = mesh(3, |c| c.zero_copy = ZeroCopy::Always);
    // read_page: node 2 asks node 1 (the home) for two pages.
    let id_a = nodes[2].read_page(1, 0x4000_0005, 77).expect("read_page");
    let id_b = nodes[2].read_page(1, 0x4000_0009, 78).expect("read_page");
    assert_ne!(id_a, id_b);
    let reqs = collect_until(&nodes[1], WAIT, |e| e.len() >= 2);
    for e in reqs {
        let Event::ReadPage {
            from,
            id,
            page: key,
            snapshot_ts,
        } = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(from, 2);
        assert_eq!(snapshot_ts, if id == id_a { 77 } else { 78 });
        let v = page(key - 0x4000_0000);
        nodes[1]
            .respond_page(from, id, v.as_ref())
            .expect("respond_page");
    }
    let got = collect_until(&nodes[2], WAIT, |e| e.len() >= 2);
    for e in got {
        let Event::PageData { from, id, version } = e else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(from, 1);
        let seed = if id == id_a { 5 } else { 9 };
        assert_eq!(version, page(seed), "exact bytes and mask");
    }

    // push_pages: more pages than fit one frame, so the push is split and reassembled in order.
    let pages: Vec<PageVersion> = (0..1000).map(page).collect();
    let refs: Vec<PageVersionRef<'_>> = pages.iter().map(|p| p.as_ref()).collect();
    nodes[0].push_pages(2, &refs).expect("push_pages");
    nodes[0].push_pages(1, &refs[..3]).expect("push_pages");
    nodes[0].flush().expect("flush");
    let mut received: Vec<PageVersion> = Vec::new();
    let batches = collect_until(&nodes[2], WAIT, |e| {
        e.iter()
            .map(|ev| match ev {
                Event::Pages { pages, .. } => pages.len(),
                _ => 0,
            })
            .sum::<usize>()
            >= 1000
    });
    assert!(batches.len() >= 2, "1000 pages need more than one frame");
    for e in batches {
        let Event::Pages { from, pages } = e else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(from, 0);
        received.extend(pages);
    }
    assert!(received == pages, "pages arrive complete and in order");
    let small = collect_until(&nodes[1], WAIT, |e| !e.is_empty());
    assert!(
        matches!(&small[..], [Event::Pages { from: 0, pages: got }] if got[..] == pages[..3]),
        "3 pages pushed to node 1 arrive as one batch"
    );
}

#[test]
fn errors_for_bad_destinations() {
    let nodes = mesh(2, |_| {});
    assert!(matches!(
        nodes[0].send(0, b"x"),
        Err(TransportError::ToSelf(0))
    ));
    assert!(matches!(
        nodes[0].send(5, b"x"),
        Err(TransportError::UnknownPeer { peer: 5, world: 2 })
    ));
    let too_big = vec![0u8; dvm_transport::wire::MAX_MESSAGE_BYTES + 1];
    assert!(matches!(
        nodes[0].send(1, &too_big),
        Err(TransportError::Wire(_))
    ));
    assert_eq!(nodes[0].name(), "io_uring-tcp");
    assert_eq!((nodes[1].local(), nodes[1].world()), (1, 2));
}

#[test]
fn graceful_close_is_a_departure_not_a_loss() {
    let mut nodes = mesh(3, |_| {});
    let n2 = nodes.pop().expect("node 2");
    n2.send(0, b"last words").expect("send");
    n2.close();
    for n in &nodes {
        let events = collect_until(n, WAIT, |e| {
            e.iter().any(|ev| matches!(ev, Event::PeerLeft { peer: 2 }))
        });
        assert!(
            !events.iter().any(|e| matches!(e, Event::PeerLost { .. })),
            "clean departure only: {events:?}"
        );
        if n.local() == 0 {
            assert_eq!(
                events[0],
                Event::Message {
                    from: 2,
                    payload: b"last words".to_vec()
                }
            );
        }
        assert!(matches!(
            n.send(2, b"x"),
            Err(TransportError::PeerGone { peer: 2, .. })
        ));
    }
    // The survivors still talk.
    nodes[0].send(1, b"still here").expect("send");
    let e = collect_until(&nodes[1], WAIT, |e| !e.is_empty());
    assert_eq!(
        e,
        vec![Event::Message {
            from: 0,
            payload: b"still here".to_vec()
        }]
    );
}

#[test]
fn aborted_peer_is_lost_exactly_once_within_the_bound() {
    let mut nodes = mesh(3, |c| {
        c.heartbeat_ms = 50;
        c.peer_timeout_ms = 400;
    });
    let n1 = nodes.remove(1);
    let start = Instant::now();
    n1.abort();
    for n in &nodes {
        let events = collect_until(n, Duration::from_secs(5), |e| {
            e.iter().any(|ev| matches!(ev, Event::PeerLost { .. }))
        });
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "loss seen promptly"
        );
        assert!(
            matches!(
                &events[..],
                [Event::PeerLost {
                    peer: 1,
                    reason: LossReason::Closed { .. }
                }]
            ),
            "{events:?}"
        );
    }
    // Exactly once: nothing more about node 1 over several timeouts, while heartbeats flow.
    std::thread::sleep(Duration::from_millis(1000));
    for n in &nodes {
        let mut later = Vec::new();
        n.poll(&mut later, Duration::from_millis(10)).expect("poll");
        assert!(later.is_empty(), "no second report: {later:?}");
    }
    nodes[1].send(0, b"ok").expect("survivors still connected");
    let e = collect_until(&nodes[0], WAIT, |e| !e.is_empty());
    assert_eq!(
        e,
        vec![Event::Message {
            from: 2,
            payload: b"ok".to_vec()
        }]
    );
}

#[test]
fn unreachable_peer_fails_establish_naming_it() {
    common::init_logs();
    // A port nobody listens on: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut cfg = common::config(1, 3);
    cfg.connect_timeout_ms = 500;
    let bound = dvm_transport::tcp::TcpTransport::bind(cfg).expect("bind");
    let me = bound.local_addr();
    let start = Instant::now();
    let err = match bound.establish(vec![dead, me, dead]) {
        Err(e) => e,
        Ok(_) => panic!("establish must fail"),
    };
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let TransportError::Unreachable { peers, timeout_ms } = &err else {
        panic!("wrong error {err}");
    };
    assert_eq!(*timeout_ms, 500);
    let ranks: Vec<u32> = peers.iter().map(|p| p.rank).collect();
    assert_eq!(ranks, vec![0, 2]);
    assert!(peers.iter().all(|p| p.addr == dead));
    let text = err.to_string();
    assert!(text.contains(&format!("rank 0 at {dead}")), "{text}");
    assert!(text.contains(&format!("rank 2 at {dead}")), "{text}");
}

#[test]
fn concurrent_senders_to_one_peer_keep_each_threads_order() {
    let nodes = mesh(2, |_| {});
    const THREADS: u8 = 4;
    const PER_THREAD: u32 = 500;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let n0 = &nodes[0];
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let mut m = vec![t];
                    m.extend_from_slice(&i.to_le_bytes());
                    m.resize(5 + (i as usize % 300), t);
                    n0.send(1, &m).expect("send");
                }
            });
        }
    });
    let total = usize::from(THREADS) * PER_THREAD as usize;
    let events = collect_until(&nodes[1], WAIT, |e| e.len() >= total);
    let mut next = [0u32; THREADS as usize];
    for e in &events {
        let Event::Message { from: 0, payload } = e else {
            panic!("unexpected {e:?}");
        };
        let t = usize::from(payload[0]);
        let i = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
        assert_eq!(i, next[t], "thread {t}'s messages out of order");
        assert_eq!(payload.len(), 5 + (i as usize % 300));
        next[t] += 1;
    }
    assert!(next.iter().all(|&n| n == PER_THREAD));
    let c = nodes[0].counters();
    assert_eq!(c[0].messages_sent, total as u64);
}
