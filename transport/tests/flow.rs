//! Bounded queues: a peer that stops reading makes `send` fail with QueueFull within the send
//! timeout; a node that stops polling pauses its receives and loses nothing.

mod common;

use common::{collect_until, mesh, TOKEN};
use dvm_transport::handshake::PROTOCOL_VERSION;
use dvm_transport::tcp::TcpTransport;
use dvm_transport::wire::{Decoder, Frame, Hello, HEADER_BYTES, MAX_PAYLOAD_BYTES};
use dvm_transport::{Event, Transport, TransportError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[test]
fn full_queue_to_a_stuck_peer_fails_within_the_timeout() {
    common::init_logs();
    let mut cfg = common::config(0, 2);
    cfg.send_timeout_ms = 300;
    cfg.max_queue_bytes = (HEADER_BYTES + MAX_PAYLOAD_BYTES) as u64;
    cfg.peer_timeout_ms = 30_000;
    let b0 = TcpTransport::bind(cfg).expect("bind");
    let addr = b0.local_addr();
    let fake: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let t0 = std::thread::spawn(move || b0.establish(vec![addr, fake]));
    // A peer that completes the handshake and then never reads.
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: "stuck".into(),
        token: TOKEN.to_vec(),
        rank: 1,
        world: 2,
    };
    s.write_all(&Frame::Hello(hello).to_bytes().expect("encode"))
        .expect("write");
    let mut d = Decoder::new();
    let mut buf = [0u8; 64];
    while d.next_frame().expect("ack").is_none() {
        let n = s.read(&mut buf).expect("read ack");
        assert!(n > 0);
        d.feed(&buf[..n]);
    }
    let n0 = t0.join().expect("thread").expect("establish");

    let msg = vec![0x5Au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0;
    let err = loop {
        assert!(sent < 200, "queue never filled");
        match n0.send(1, &msg) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(start.elapsed() < Duration::from_secs(10));
    match err {
        TransportError::QueueFull {
            peer: 1,
            queued_bytes,
            limit_bytes,
            waited_ms: 300,
            ..
        } => assert!(queued_bytes >= limit_bytes),
        other => panic!("expected QueueFull, got {other}"),
    }
    let c = n0.counters();
    assert_eq!(c[0].messages_sent, sent);
    assert!(c[0].queue_max_bytes >= c[0].queue_depth_bytes && c[0].queue_depth_bytes > 0);
    assert!(matches!(
        n0.flush(),
        Err(TransportError::FlushTimeout { peer: 1, .. })
    ));
    drop(s);
}

#[test]
fn a_node_that_stops_polling_pauses_receiving_and_loses_nothing() {
    pause_and_resume(true);
}

#[test]
fn pause_and_resume_with_single_shot_receives() {
    pause_and_resume(false);
}

fn pause_and_resume(multishot: bool) {
    let limit = (HEADER_BYTES + MAX_PAYLOAD_BYTES) as u64;
    let nodes = mesh(2, |c| {
        c.max_inbound_bytes = limit;
        c.multishot_recv = multishot;
    });
    const COUNT: usize = 40;
    let sender = std::thread::scope(|s| {
        let h = s.spawn(|| {
            for i in 0..COUNT {
                let mut m = vec![i as u8; 512 * 1024];
                m[0] = i as u8;
                nodes[1].send(0, &m).expect("send");
            }
            nodes[1].flush()
        });
        // Node 0 does not poll for a while: receiving must pause near the limit.
        std::thread::sleep(Duration::from_millis(500));
        let received = nodes[0].counters()[0].messages_received;
        assert!(
            received < COUNT as u64,
            "node 0 kept receiving ({received}) past its inbound limit"
        );
        let events = collect_until(&nodes[0], Duration::from_secs(20), |e| e.len() >= COUNT);
        for (i, e) in events.iter().enumerate() {
            let Event::Message { from: 1, payload } = e else {
                panic!("unexpected {e:?}");
            };
            assert!(payload.len() == 512 * 1024 && payload.iter().all(|&b| b == i as u8));
        }
        h.join().expect("sender")
    });
    sender.expect("flush after the receiver drained");
}
