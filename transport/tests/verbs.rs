//! RDMA verbs endpoints over a real device.
//!
//! Tests marked `#[ignore]` need an RDMA device with an ACTIVE port; the build machines have
//! none, so `cargo test` lists them as ignored instead of passing them without running anything.
//! `scripts/rdma-guest` runs them with `--ignored` inside a QEMU guest with soft-RoCE (rxe0 on
//! the guest's loopback). The test not ignored checks what `probe` says on the machine it runs
//! on.

// A failed step is a failed test: unwrapping says where.
#![allow(clippy::unwrap_used)]

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
