//! The connection handshake: what a Hello must satisfy, why one is refused, and the record kept
//! of refused connections.
//!
//! The first frame of every connection is a Hello from the connecting side; the accepting side
//! answers HelloAck, or Refuse then closes. Invariants: the token is compared in constant time
//! (its length aside), so timing reveals nothing about how much of a guess was right; every
//! refusal is logged at warn with the peer's address and kept (bounded) in a [`Refusals`] list;
//! checks never panic on peer-controlled values.

pub use crate::wire::RefuseReason;
use crate::wire::{Hello, WireError};
use crate::NodeId;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Version of the transport protocol (frame kinds and their meaning).
pub const PROTOCOL_VERSION: u16 = 1;
/// The software version sent in every Hello, for logs on the other side.
pub const SOFTWARE_VERSION: &str = concat!("dvm-transport ", env!("CARGO_PKG_VERSION"));
/// Refusals kept for [`Refusals::recent`].
const MAX_REFUSALS_KEPT: usize = 64;

/// Why an incoming connection did not become a peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("refused: {0}")]
    Refused(RefuseReason),
    #[error("bad bytes before the hello completed: {0}")]
    Wire(WireError),
    #[error("expected a hello, got a {kind} frame")]
    NotHello { kind: &'static str },
    #[error("closed after {after_bytes} bytes, before a complete hello")]
    Closed { after_bytes: u64 },
    #[error("no complete hello within {waited_ms} ms")]
    Timeout { waited_ms: u64 },
    #[error("the mesh completed before this connection's hello did ({after_bytes} bytes seen)")]
    Abandoned { after_bytes: u64 },
    #[error("socket error during the handshake: {0}")]
    Io(String),
}

impl HandshakeError {
    /// What to tell the peer, if anything can still be told.
    pub(crate) fn refuse_reason(&self) -> Option<RefuseReason> {
        match self {
            HandshakeError::Refused(r) => Some(*r),
            HandshakeError::Wire(_) | HandshakeError::NotHello { .. } => {
                Some(RefuseReason::Malformed)
            }
            _ => None,
        }
    }
}

/// One refused connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub addr: SocketAddr,
    /// The rank the peer claimed, when it got as far as a Hello.
    pub claimed_rank: Option<NodeId>,
    pub error: HandshakeError,
}

/// The most recent refusals, bounded, shared between the establish phase and the I/O thread.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<VecDeque<Refusal>>);

impl Refusals {
    pub(crate) fn record(&self, local: NodeId, refusal: Refusal) {
        tracing::warn!(
            node = local,
            peer_addr = %refusal.addr,
            claimed_rank = ?refusal.claimed_rank,
            "refusing connection: {}",
            refusal.error
        );
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() == MAX_REFUSALS_KEPT {
            list.pop_front();
        }
        list.push_back(refusal);
    }

    pub fn recent(&self) -> Vec<Refusal> {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().cloned().collect()
    }
}

/// Compare two byte strings in time that depends only on their lengths.
pub fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// What this node requires of a Hello.
#[derive(Clone, Debug)]
pub struct Policy<'a> {
    pub local: NodeId,
    pub world: u32,
    pub token: &'a [u8],
}

impl Policy<'_> {
    /// Checks that do not depend on which peers are connected, in the order a misconfigured peer
    /// most needs to hear about: protocol, world, token, rank.
    pub fn check(&self, hello: &Hello) -> Result<NodeId, RefuseReason> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(RefuseReason::ProtocolVersion {
                ours: PROTOCOL_VERSION,
                theirs: hello.protocol_version,
            });
        }
        if hello.world != self.world {
            return Err(RefuseReason::WorldSize {
                ours: self.world,
                theirs: hello.world,
            });
        }
        if !tokens_equal(&hello.token, self.token) {
            return Err(RefuseReason::BadToken);
        }
        if hello.rank >= self.world {
            return Err(RefuseReason::RankOutOfRange {
                rank: hello.rank,
                world: self.world,
            });
        }
        // The mesh rule: the lower rank accepts, so only higher ranks connect to us.
        if hello.rank <= self.local {
            return Err(RefuseReason::Unexpected { rank: hello.rank });
        }
        Ok(hello.rank)
    }

    pub fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_owned(),
            token: self.token.to_vec(),
            rank: self.local,
            world: self.world,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_equal(b"secret", b"secret"));
        assert!(!tokens_equal(b"secret", b"secreT"));
        assert!(!tokens_equal(b"secret", b"secret!"));
        assert!(!tokens_equal(b"", b"x"));
        assert!(tokens_equal(b"", b""));
    }

    #[test]
    fn policy_refuses_each_mismatch() {
        let p = Policy {
            local: 1,
            world: 4,
            token: b"tok",
        };
        let good = Hello {
            rank: 2,
            ..p.hello()
        };
        assert_eq!(p.check(&good), Ok(2));
        let cases = [
            (
                Hello {
                    protocol_version: 9,
                    ..good.clone()
                },
                RefuseReason::ProtocolVersion { ours: 1, theirs: 9 },
            ),
            (
                Hello {
                    world: 5,
                    ..good.clone()
                },
                RefuseReason::WorldSize { ours: 4, theirs: 5 },
            ),
            (
                Hello {
                    token: b"tak".to_vec(),
                    ..good.clone()
                },
                RefuseReason::BadToken,
            ),
            (
                Hello {
                    rank: 4,
                    ..good.clone()
                },
                RefuseReason::RankOutOfRange { rank: 4, world: 4 },
            ),
            (
                Hello {
                    rank: 0,
                    ..good.clone()
                },
                RefuseReason::Unexpected { rank: 0 },
            ),
        ];
        for (hello, want) in cases {
            assert_eq!(p.check(&hello), Err(want));
        }
    }

    #[test]
    fn reasons_round_trip_on_the_wire() {
        for r in [
            RefuseReason::BadToken,
            RefuseReason::ProtocolVersion { ours: 1, theirs: 2 },
            RefuseReason::WorldSize { ours: 3, theirs: 4 },
            RefuseReason::RankOutOfRange { rank: 5, world: 6 },
            RefuseReason::AlreadyConnected { rank: 7 },
            RefuseReason::Unexpected { rank: 8 },
            RefuseReason::Malformed,
            RefuseReason::Busy,
            RefuseReason::Other { code: 99 },
        ] {
            let (c, a, b) = r.to_wire();
            assert_eq!(RefuseReason::from_wire(c, a, b), r);
        }
    }
}
