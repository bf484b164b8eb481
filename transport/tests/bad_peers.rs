//! Misbehaving peers as raw sockets: each is refused with its specific reason (on the wire and in
//! the refusal record), nothing panics, and the good peers keep working.

mod common;

use common::{collect_until, mesh, TOKEN};
use dvm_transport::handshake::{HandshakeError, Refusal, PROTOCOL_VERSION};
use dvm_transport::tcp::{TcpTransport, UringFeatures};
use dvm_transport::wire::{self, Decoder, Frame, Hello, WireError};
use dvm_transport::{Event, LossReason, RefuseReason, Transport};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

fn hello(rank: u32, world: u32) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: "test".into(),
        token: TOKEN.to_vec(),
        rank,
        world,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    s
}

/// Everything the server sends until it closes (bounded by the read timeout), decoded.
fn read_reply(mut s: TcpStream) -> Vec<Frame> {
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let mut d = Decoder::new();
    d.feed(&bytes);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = d.next_frame() {
        frames.push(f);
    }
    frames
}

/// Wait for the refusal of the connection from `from`.
fn refusal_of(t: &TcpTransport, from: SocketAddr) -> Refusal {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = t.refusals().into_iter().find(|r| r.addr == from) {
            return r;
        }
        assert!(Instant::now() < deadline, "no refusal recorded for {from}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn refused_with(t: &TcpTransport, bytes: &[u8]) -> (Vec<Frame>, Refusal) {
    let mut s = connect(t.local_addr());
    let me = s.local_addr().expect("local addr");
    s.write_all(bytes).expect("write");
    let reply = read_reply(s);
    (reply, refusal_of(t, me))
}

#[test]
fn bad_peers_after_establish_are_refused_and_good_peers_keep_working() {
    let nodes = mesh(3, |c| c.handshake_timeout_ms = 300);
    let n0 = &nodes[0];

    // Garbage.
    let (reply, r) = refused_with(n0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(reply, vec![Frame::Refuse(RefuseReason::Malformed)]);
    assert_eq!(
        r.error,
        HandshakeError::Wire(WireError::BadMagic {
            offset: 0,
            found: *b"GET "
        })
    );

    // An oversized length, refused from the header alone.
    let mut big = Frame::Hello(hello(1, 3)).to_bytes().expect("encode");
    big.truncate(wire::HEADER_BYTES);
    big[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let (reply, r) = refused_with(n0, &big);
    assert_eq!(reply, vec![Frame::Refuse(RefuseReason::Malformed)]);
    assert!(
        matches!(
            r.error,
            HandshakeError::Wire(WireError::TooLarge { offset: 0, len_bytes, .. }) if len_bytes == u64::from(u32::MAX)
        ),
        "{:?}",
        r.error
    );

    // Handshake mismatches, each with its reason on the wire.
    let cases = [
        (
            Hello {
                token: b"wrong-token".to_vec(),
                ..hello(1, 3)
            },
            RefuseReason::BadToken,
        ),
        (
            Hello {
                protocol_version: 99,
                ..hello(1, 3)
            },
            RefuseReason::ProtocolVersion {
                ours: PROTOCOL_VERSION,
                theirs: 99,
            },
        ),
        (hello(1, 4), RefuseReason::WorldSize { ours: 3, theirs: 4 }),
        (
            hello(7, 3),
            RefuseReason::RankOutOfRange { rank: 7, world: 3 },
        ),
        (hello(2, 3), RefuseReason::AlreadyConnected { rank: 2 }),
    ];
    for (h, reason) in cases {
        let claimed = h.rank;
        let bytes = Frame::Hello(h).to_bytes().expect("encode");
        let (reply, r) = refused_with(n0, &bytes);
        assert_eq!(reply, vec![Frame::Refuse(reason)]);
        assert_eq!(r.error, HandshakeError::Refused(reason));
        assert_eq!(r.claimed_rank, Some(claimed));
    }

    // A truncated frame, then close: nothing to answer, but recorded.
    let full = Frame::Hello(hello(1, 3)).to_bytes().expect("encode");
    let mut s = connect(n0.local_addr());
    let me = s.local_addr().expect("addr");
    s.write_all(&full[..30]).expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert!(read_reply(s).is_empty());
    assert_eq!(
        refusal_of(n0, me).error,
        HandshakeError::Closed { after_bytes: 30 }
    );

    // Connect and say nothing: dropped after the handshake timeout.
    let s = connect(n0.local_addr());
    let me = s.local_addr().expect("addr");
    let start = Instant::now();
    assert!(read_reply(s).is_empty());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(
        refusal_of(n0, me).error,
        HandshakeError::Timeout { waited_ms: 300 }
    );

    // The good peers never noticed.
    for (i, n) in nodes.iter().enumerate() {
        for to in 0..3u32 {
            if to as usize != i {
                n.send(to, &[i as u8, to as u8]).expect("send");
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let events = collect_until(n, WAIT, |e| e.len() >= 2);
        assert_eq!(events.len(), 2);
        for e in events {
            let Event::Message { from, payload } = e else {
                panic!("good peers only exchange messages: {e:?}");
            };
            assert_eq!(payload, vec![from as u8, i as u8]);
        }
    }
}

#[test]
fn bad_peers_during_establish_do_not_stop_the_mesh() {
    common::init_logs();
    let b0 = TcpTransport::bind(common::config(0, 2)).expect("bind");
    let b1 = TcpTransport::bind(common::config(1, 2)).expect("bind");
    let addrs = vec![b0.local_addr(), b1.local_addr()];
    // Bad peers knock on node 0 before node 1 starts establishing.
    let mut garbage = connect(addrs[0]);
    garbage.write_all(&[0xFF; 64]).expect("write");
    let mut bad_token = connect(addrs[0]);
    let wrong = Hello {
        token: b"nope".to_vec(),
        ..hello(1, 2)
    };
    bad_token
        .write_all(&Frame::Hello(wrong).to_bytes().expect("encode"))
        .expect("write");
    let a0 = addrs.clone();
    let t0 = std::thread::spawn(move || b0.establish(a0));
    assert_eq!(
        read_reply(garbage),
        vec![Frame::Refuse(RefuseReason::Malformed)]
    );
    assert_eq!(
        read_reply(bad_token),
        vec![Frame::Refuse(RefuseReason::BadToken)]
    );
    let n1 = b1.establish(addrs).expect("node 1 establishes");
    let n0 = t0.join().expect("thread").expect("node 0 establishes");
    let errors: Vec<HandshakeError> = n0.refusals().into_iter().map(|r| r.error).collect();
    assert!(
        errors.contains(&HandshakeError::Refused(RefuseReason::BadToken)),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| matches!(
            e,
            HandshakeError::Wire(WireError::BadMagic { offset: 0, .. })
        )),
        "{errors:?}"
    );
    n1.send(0, b"hi").expect("send");
    let e = collect_until(&n0, WAIT, |e| !e.is_empty());
    assert_eq!(
        e,
        vec![Event::Message {
            from: 1,
            payload: b"hi".to_vec()
        }]
    );
}

/// Node 0 of a world of 2 whose rank 1 is a raw socket that completed the handshake.
fn with_fake_peer(peer_timeout_ms: u64) -> (TcpTransport, TcpStream, Decoder) {
    common::init_logs();
    let mut cfg = common::config(0, 2);
    cfg.heartbeat_ms = 50;
    cfg.peer_timeout_ms = peer_timeout_ms;
    let b0 = TcpTransport::bind(cfg).expect("bind");
    let addr = b0.local_addr();
    let fake_addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let t0 = std::thread::spawn(move || b0.establish(vec![addr, fake_addr]));
    let mut s = connect(addr);
    s.write_all(&Frame::Hello(hello(1, 2)).to_bytes().expect("encode"))
        .expect("write");
    let mut d = Decoder::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + WAIT;
    let ack = loop {
        assert!(Instant::now() < deadline, "no hello-ack");
        if let Some(f) = d.next_frame().expect("valid frames") {
            break f;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed before the ack");
        d.feed(&buf[..n]);
    };
    assert_eq!(
        ack,
        Frame::HelloAck {
            protocol_version: PROTOCOL_VERSION,
            rank: 0,
            world: 2
        }
    );
    let n0 = t0.join().expect("thread").expect("establish");
    (n0, s, d)
}

#[test]
fn silent_peer_is_lost_after_the_timeout_and_receives_heartbeats() {
    let (n0, mut s, mut d) = with_fake_peer(400);
    let start = Instant::now();
    let events = collect_until(&n0, WAIT, |e| !e.is_empty());
    let took = start.elapsed();
    assert!(
        matches!(&events[..], [Event::PeerLost { peer: 1, reason: LossReason::Timeout { silent_ms } }] if *silent_ms >= 400),
        "{events:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // While it was silent, node 0 kept pinging it.
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    d.feed(&bytes);
    let mut pings = 0;
    while let Ok(Some(f)) = d.next_frame() {
        assert_eq!(f, Frame::Ping);
        pings += 1;
    }
    assert!(pings >= 2, "heartbeats every 50 ms, got {pings}");
    let f: UringFeatures = n0.features();
    eprintln!("io_uring features: {f:?}");
}

#[test]
fn garbage_after_the_handshake_is_a_protocol_loss_naming_the_offset() {
    let (n0, mut s, _) = with_fake_peer(5_000);
    let hello_len = Frame::Hello(hello(1, 2)).to_bytes().expect("encode").len() as u64;
    s.write_all(&Frame::Message(b"fine".to_vec()).to_bytes().expect("encode"))
        .expect("write");
    s.write_all(b"\x00\x01garbage").expect("write");
    let events = collect_until(&n0, WAIT, |e| e.len() >= 2);
    assert_eq!(
        events[0],
        Event::Message {
            from: 1,
            payload: b"fine".to_vec()
        }
    );
    let msg_len = (wire::HEADER_BYTES + 4) as u64;
    assert!(
        matches!(
            &events[1],
            Event::PeerLost { peer: 1, reason: LossReason::Protocol(WireError::BadMagic { offset, .. }) }
                if *offset == hello_len + msg_len
        ),
        "{events:?}"
    );
}

#[test]
fn shut_down_socket_is_a_loss() {
    let (n0, s, _) = with_fake_peer(5_000);
    s.shutdown(std::net::Shutdown::Both).expect("shutdown");
    let events = collect_until(&n0, WAIT, |e| !e.is_empty());
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
    assert!(n0.send(1, b"x").is_err(), "sending to a lost peer fails");
}

#[test]
fn misconfigured_node_is_refused_at_establish_and_says_why() {
    common::init_logs();
    let mut c0 = common::config(0, 2);
    c0.connect_timeout_ms = 500;
    let mut c1 = common::config(1, 2);
    c1.token = b"another job".to_vec();
    let b0 = TcpTransport::bind(c0).expect("bind");
    let b1 = TcpTransport::bind(c1).expect("bind");
    let addrs = vec![b0.local_addr(), b1.local_addr()];
    let a0 = addrs.clone();
    let t0 = std::thread::spawn(move || b0.establish(a0));
    match b1.establish(addrs.clone()) {
        Err(dvm_transport::TransportError::RefusedBy {
            peer: 0,
            addr,
            reason: RefuseReason::BadToken,
        }) => assert_eq!(addr, addrs[0]),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a node with the wrong token joined"),
    }
    match t0.join().expect("thread") {
        Err(dvm_transport::TransportError::Unreachable { peers, .. }) => {
            assert_eq!(peers.len(), 1);
            assert_eq!((peers[0].rank, peers[0].addr), (1, addrs[1]));
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("node 0 cannot complete without node 1"),
    }
}
