//! Shared helpers: build a mesh of transports on 127.0.0.1 ephemeral ports and wait for events
//! with a deadline (no test can hang).
#![allow(dead_code)]

use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::{Event, PageVersion, Transport, MASK_WORDS, PAGE_BYTES};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const TOKEN: &[u8] = b"job-token-for-tests";

pub fn config(rank: u32, world: u32) -> TcpConfig {
    let mut c = TcpConfig::new(rank, world, SocketAddr::from(([127, 0, 0, 1], 0)), TOKEN);
    c.connect_timeout_ms = 5_000;
    c.handshake_timeout_ms = 2_000;
    c.send_timeout_ms = 5_000;
    c
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// `world` transports, fully meshed; `tweak` adjusts each configuration.
pub fn mesh(world: u32, tweak: impl Fn(&mut TcpConfig)) -> Vec<TcpTransport> {
    init_logs();
    let bound: Vec<_> = (0..world)
        .map(|r| {
            let mut c = config(r, world);
            tweak(&mut c);
            TcpTransport::bind(c).expect("bind on 127.0.0.1")
        })
        .collect();
    let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.local_addr()).collect();
    let handles: Vec<_> = bound
        .into_iter()
        .map(|b| {
            let addrs = addrs.clone();
            std::thread::spawn(move || b.establish(addrs))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .expect("establish thread")
                .expect("mesh established")
        })
        .collect()
}

/// Poll until `done` says enough arrived, or panic at the deadline with what did arrive.
pub fn collect_until(
    t: &dyn Transport,
    timeout: Duration,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    while !done(&events) {
        let now = Instant::now();
        assert!(
            now < deadline,
            "node {}: timed out after {:?} with {} events: {:?}",
            t.local(),
            timeout,
            events.len(),
            events.iter().take(5).collect::<Vec<_>>()
        );
        t.poll(&mut events, (deadline - now).min(Duration::from_millis(50)))
            .expect("poll");
    }
    events
}

/// A payload that says where it belongs: `seq`, `from` and `to` (little-endian u32 each), then
/// `len` bytes derived from them, so a misrouted, reordered or corrupted message shows.
pub fn tagged(from: u32, to: u32, seq: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 12);
    v.extend_from_slice(&(seq as u32).to_le_bytes());
    v.extend_from_slice(&from.to_le_bytes());
    v.extend_from_slice(&to.to_le_bytes());
    v.extend((0..len).map(|i| {
        (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(seq as u32 + from * 7 + to) as u8
    }));
    v
}

/// A page version whose bytes and mask are derived from `seed`.
pub fn page(seed: u64) -> PageVersion {
    let mut data = Box::new([0u8; PAGE_BYTES]);
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(seed | 1).wrapping_add(seed >> 3) as u8;
    }
    let mut mask = Box::new([0u64; MASK_WORDS]);
    for (i, w) in mask.iter_mut().enumerate() {
        *w = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
    }
    PageVersion {
        page: 0x4000_0000 + seed,
        ts: 1000 + seed,
        data,
        mask,
    }
}
