//! RDMA verbs (InfiniBand, RoCE, soft-RoCE) through `rdma-sys`: device discovery, the choice of
//! the cluster transport, the endpoint layer, and the cluster transport over it.
//!
//! [`probe`] lists devices and ports or says, typed, why this host has no usable RDMA; [`choose`]
//! turns that and the user's `--transport` into the transport a run uses; [`Endpoint`] is one
//! reliable-connected queue pair with its protection domain, completion queue (optionally with a
//! completion channel) and memory regions, doing RDMA WRITE, RDMA READ and SEND/RECV;
//! [`VerbsTransport`] is the cluster's [`crate::Transport`] over one endpoint per peer, and
//! [`published`] the table of page versions peers fetch with one RDMA READ. A run that
//! asks for RDMA on a host without it is refused, never silently served by TCP.
//!
//! Every `unsafe` block of DVM's verbs code lives in this module tree (`sys`-facing code in
//! `device.rs` and `endpoint.rs`, epoll in `transport.rs`, the published table's buffer in
//! `published.rs`), each with a `// SAFETY:` comment.

mod device;
mod endpoint;
pub mod memlock;
pub mod published;
mod transport;

pub use device::{probe, Device, Gid, Port, PortState, Probe};
pub use endpoint::{
    ChunkRegistration, Completion, CompletionKind, Domain, Endpoint, EndpointConfig, Incoming,
    PeerInfo, QpState, ReadPiece, RemoteRegion, TableRegistration, MAX_SCATTER,
};
pub use transport::{
    SlotBytes, SlotRead, VerbsConfig, VerbsCounters, VerbsTransport, MAX_WRITE_RING_BYTES,
    WRITE_RING_OFFSET,
};

use std::fmt;
use std::time::Duration;

/// Why this host cannot use RDMA verbs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRdma {
    /// `ibv_get_device_list` failed with ENOSYS: the kernel has no RDMA (uverbs) support.
    #[error("the kernel has no RDMA support (ibv_get_device_list: ENOSYS)")]
    KernelWithoutRdma,
    /// `ibv_get_device_list` failed with ENODEV or found no uverbs device node.
    #[error("no RDMA device node (ibv_get_device_list: ENODEV)")]
    NoDeviceNode,
    /// `ibv_get_device_list` failed another way.
    #[error("ibv_get_device_list failed: {0}")]
    ListFailed(String),
    /// The device list is empty.
    #[error("no RDMA devices (the device list is empty)")]
    NoDevices,
    /// Devices exist but none has a port in the ACTIVE state.
    #[error("no ACTIVE port on the RDMA devices ({0})")]
    NoActivePort(String),
}

/// The transport `dvm run --transport` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Preference {
    /// RDMA when a device with an active port is present, TCP otherwise.
    #[default]
    Auto,
    /// RDMA or nothing.
    Rdma,
    /// TCP (io_uring), without probing RDMA.
    Tcp,
}

/// The transport a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Tcp,
    Rdma,
}

/// The outcome of [`choose`]: the transport, and why, in words for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub transport: Chosen,
    pub reason: String,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.transport {
            Chosen::Tcp => write!(f, "TCP (io_uring): {}", self.reason),
            Chosen::Rdma => write!(f, "RDMA verbs: {}", self.reason),
        }
    }
}

/// Why a run cannot have the transport it asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChoiceError {
    #[error("--transport rdma: no RDMA: {0}")]
    NoRdma(NoRdma),
}

/// Chooses the cluster transport from the user's preference and what [`probe`] found: RDMA
/// whenever a device with an active port is present, unless TCP is asked for.
pub fn choose(preference: Preference, probe: &Probe) -> Result<Choice, ChoiceError> {
    match (preference, probe) {
        (Preference::Tcp, _) => Ok(Choice {
            transport: Chosen::Tcp,
            reason: "asked for with --transport tcp".into(),
        }),
        (Preference::Auto, Probe::Unavailable(why)) => Ok(Choice {
            transport: Chosen::Tcp,
            reason: format!("no RDMA: {why}"),
        }),
        (Preference::Auto, Probe::Available(devices)) => Ok(Choice {
            transport: Chosen::Rdma,
            reason: format!("device {} has an active port", usable_device_name(devices)),
        }),
        (Preference::Rdma, Probe::Unavailable(why)) => Err(ChoiceError::NoRdma(why.clone())),
        (Preference::Rdma, Probe::Available(devices)) => Ok(Choice {
            transport: Chosen::Rdma,
            reason: format!(
                "asked for with --transport rdma; device {} has an active port",
                usable_device_name(devices)
            ),
        }),
    }
}

/// [`choose`] for this host: probes only when the preference needs it (`Tcp` does not).
pub fn choose_here(preference: Preference) -> Result<Choice, ChoiceError> {
    match preference {
        Preference::Tcp => choose(preference, &Probe::Available(Vec::new())),
        _ => choose(preference, &probe()),
    }
}

fn usable_device_name(devices: &[Device]) -> String {
    devices
        .iter()
        .find(|d| d.active_port().is_some())
        .or(devices.first())
        .map_or_else(|| "?".into(), |d| d.name.clone())
}

/// Errors of the verbs endpoint layer.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA: {0}")]
    NoRdma(#[from] NoRdma),
    #[error("no RDMA device named {0}")]
    NoSuchDevice(String),
    /// A verbs call failed; `errno` as the library reported it.
    #[error("{call} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Call { call: &'static str, errno: i32 },
    /// Port `port` has no IPv4-mapped (`::ffff:a.b.c.d`, RoCE v2) GID to address peers with.
    #[error("port {port} of {device} has no IPv4-mapped GID")]
    NoUsableGid { device: String, port: u8 },
    /// A work request completed with an error status; the queue pair is now in the error state.
    #[error("{op:?} completed with {status_text} (status {status}, vendor error {vendor_err:#x}); the queue pair is in the error state")]
    Completion {
        op: CompletionKind,
        status: u32,
        status_text: String,
        vendor_err: u32,
    },
    /// An earlier error put the queue pair in the error state: nothing more can be posted.
    #[error("the queue pair is in the error state after an earlier failure")]
    QpInError,
    #[error("{op:?} did not complete within {after:?}")]
    Timeout { op: CompletionKind, after: Duration },
    #[error("{what}: offset {offset} + {len} bytes is outside the {size}-byte region")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A work request with more scatter entries than the queue pair accepts.
    #[error("a work request of {pieces} scatter entries (the queue pair takes 1 to {max})")]
    TooManyPieces { pieces: usize, max: usize },
    #[error("message of {len} bytes is larger than a message slot ({max} bytes)")]
    MessageTooLarge { len: usize, max: usize },
    /// A blocking receive found an RDMA WRITE with immediate, which only the transport's
    /// protocol knows where to look for.
    #[error("an RDMA WRITE of {bytes} bytes arrived where a SEND was expected")]
    UnexpectedWrite { bytes: u32 },
    /// The TCP exchange of connection information failed.
    #[error("exchanging queue pair information with the peer: {0}")]
    Exchange(#[from] std::io::Error),
    /// The peer sent connection information DVM cannot use.
    #[error("the peer's queue pair information is unusable: {0}")]
    BadPeerInfo(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(active: bool) -> Device {
        Device {
            name: "rxe0".into(),
            firmware: String::new(),
            ports: vec![Port {
                number: 1,
                state: if active {
                    PortState::Active
                } else {
                    PortState::Down
                },
                active_mtu: 1024,
                max_mtu: 4096,
                link_layer: "Ethernet",
                lid: 0,
                gids: vec![(
                    1,
                    Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]),
                )],
                gid_table_len: 1024,
            }],
            error: None,
        }
    }

    #[test]
    fn auto_without_rdma_chooses_tcp_and_says_why() {
        let choice = choose(
            Preference::Auto,
            &Probe::Unavailable(NoRdma::KernelWithoutRdma),
        )
        .expect("chosen");
        assert_eq!(choice.transport, Chosen::Tcp);
        assert!(choice.to_string().contains("ENOSYS"), "{choice}");
    }

    #[test]
    fn rdma_is_refused_without_a_device_and_chosen_with_one() {
        let err =
            choose(Preference::Rdma, &Probe::Unavailable(NoRdma::NoDevices)).expect_err("refused");
        assert_eq!(err, ChoiceError::NoRdma(NoRdma::NoDevices));
        assert!(err.to_string().contains("no RDMA devices"), "{err}");
        let choice =
            choose(Preference::Rdma, &Probe::Available(vec![device(true)])).expect("chosen");
        assert_eq!(choice.transport, Chosen::Rdma);
        assert!(choice.reason.contains("rxe0"), "{}", choice.reason);
        let choice =
            choose(Preference::Auto, &Probe::Available(vec![device(true)])).expect("chosen");
        assert_eq!(choice.transport, Chosen::Rdma);
        assert!(choice.to_string().starts_with("RDMA verbs"), "{choice}");
    }

    #[test]
    fn tcp_is_taken_as_asked() {
        let choice =
            choose(Preference::Tcp, &Probe::Available(vec![device(true)])).expect("chosen");
        assert_eq!(choice.transport, Chosen::Tcp);
        assert!(choice.reason.contains("--transport tcp"));
    }

    #[test]
    fn gids_print_like_sysfs_and_ipv4_mapped_ones_are_found() {
        let port = &device(false).ports[0];
        assert_eq!(
            port.gids[0].1.to_string(),
            "0000:0000:0000:0000:0000:ffff:7f00:0001"
        );
        assert_eq!(port.ipv4_mapped_gid(), Some(1));
        assert!(device(false).active_port().is_none());
        let link_local = Gid([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(!link_local.is_ipv4_mapped());
    }

    #[test]
    fn peer_info_round_trips_and_bad_input_is_refused() {
        let info = PeerInfo {
            qpn: 0x11,
            psn: 0xabcdef,
            lid: 0,
            gid: Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]),
            region: RemoteRegion {
                addr: 0x7f00_0000_1000,
                rkey: 0x1234,
                len: 1 << 20,
            },
        };
        let bytes = info.encode();
        assert_eq!(PeerInfo::decode(&bytes).expect("decodes"), info);
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(matches!(
            PeerInfo::decode(&bad),
            Err(VerbsError::BadPeerInfo(_))
        ));
        let mut bad = bytes;
        bad[7] = 1; // qpn above 24 bits
        assert!(matches!(
            PeerInfo::decode(&bad),
            Err(VerbsError::BadPeerInfo(_))
        ));
        let mut bad = bytes;
        bad[16..32].fill(0);
        assert!(matches!(
            PeerInfo::decode(&bad),
            Err(VerbsError::BadPeerInfo(_))
        ));
        let mut bad = bytes;
        bad[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            PeerInfo::decode(&bad),
            Err(VerbsError::BadPeerInfo(_))
        ));
    }
}
