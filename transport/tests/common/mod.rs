//! Shared helpers: build a mesh of transports on 127.0.0.1 ephemeral ports and wait for events
//! with a deadline (no test can hang).
#![allow(dead_code)]

use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::{Event, Transport};
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
