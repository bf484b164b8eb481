//! Property tests of the frame format: every kind round-trips through any split of the byte
//! stream, and no byte string makes the decoder panic or allocate past its limit.

use dvm_transport::handshake::RefuseReason;
use dvm_transport::wire::{Decoder, Frame, Hello, HEADER_BYTES};
use dvm_transport::{PageVersion, MASK_WORDS, PAGE_BYTES};
use proptest::prelude::*;

fn page_strategy() -> impl Strategy<Value = PageVersion> {
    (any::<u64>(), any::<u64>(), any::<u8>(), any::<u64>()).prop_map(|(page, ts, seed, mseed)| {
        let mut data = Box::new([0u8; PAGE_BYTES]);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(seed | 1).wrapping_add(seed);
        }
        let mut mask = Box::new([0u64; MASK_WORDS]);
        for (i, w) in mask.iter_mut().enumerate() {
            *w = mseed.rotate_left(i as u32) ^ i as u64;
        }
        PageVersion {
            page,
            ts,
            data,
            mask,
        }
    })
}

fn reason_strategy() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        Just(RefuseReason::BadToken),
        (any::<u16>(), any::<u16>())
            .prop_map(|(ours, theirs)| RefuseReason::ProtocolVersion { ours, theirs }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(ours, theirs)| RefuseReason::WorldSize { ours, theirs }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(rank, world)| RefuseReason::RankOutOfRange { rank, world }),
        any::<u32>().prop_map(|rank| RefuseReason::AlreadyConnected { rank }),
        any::<u32>().prop_map(|rank| RefuseReason::Unexpected { rank }),
        Just(RefuseReason::Malformed),
        Just(RefuseReason::Busy),
        (9u8..).prop_map(|code| RefuseReason::Other { code }),
    ]
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let id = 1u64..;
    let bytes = proptest::collection::vec(any::<u8>(), 0..2000);
    prop_oneof![
        (
            any::<u16>(),
            "[a-z0-9 .-]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..=256),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(protocol_version, software_version, token, rank, world)| {
                Frame::Hello(Hello {
                    protocol_version,
                    software_version,
                    token,
                    rank,
                    world,
                })
            }),
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(protocol_version, rank, world)| {
            Frame::HelloAck {
                protocol_version,
                rank,
                world,
            }
        }),
        reason_strategy().prop_map(Frame::Refuse),
        bytes.clone().prop_map(Frame::Message),
        (id.clone(), bytes.clone()).prop_map(|(id, payload)| Frame::Request { id, payload }),
        (id.clone(), bytes).prop_map(|(id, payload)| Frame::Response { id, payload }),
        (id.clone(), any::<u64>(), any::<u64>()).prop_map(|(id, page, snapshot_ts)| {
            Frame::ReadPage {
                id,
                page,
                snapshot_ts,
            }
        }),
        (id, page_strategy()).prop_map(|(id, version)| Frame::PageData { id, version }),
        proptest::collection::vec(page_strategy(), 0..4).prop_map(Frame::PushPages),
        Just(Frame::Ping),
        Just(Frame::Goodbye),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn frames_round_trip_across_any_split(
        frames in proptest::collection::vec(frame_strategy(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            f.encode(&mut stream).expect("encodable");
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for w in points.windows(2) {
            d.feed(&stream[w[0]..w[1]]);
            while let Some(f) = d.next_frame().expect("valid stream") {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(d.buffered_bytes(), 0);
        prop_assert_eq!(d.offset(), stream.len() as u64);
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        split in any::<prop::sample::Index>(),
    ) {
        let at = split.index(bytes.len() + 1);
        let mut d = Decoder::new();
        d.feed(&bytes[..at]);
        let mut failed = false;
        loop {
            match d.next_frame() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => { failed = true; break; }
            }
        }
        if !failed {
            d.feed(&bytes[at..]);
            while let Ok(Some(_)) = d.next_frame() {}
        }
        // Whatever happened, the decoder holds no more than it was given.
        prop_assert!(d.buffered_bytes() <= bytes.len());
    }

    #[test]
    fn corrupting_one_byte_is_detected(
        frame in frame_strategy(),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let mut bytes = frame.to_bytes().expect("encodable");
        let i = pos.index(bytes.len());
        bytes[i] ^= flip;
        let mut d = Decoder::new();
        d.feed(&bytes);
        // A corrupted length may make the frame look incomplete; anything else is an error.
        match d.next_frame() {
            Ok(None) => prop_assert!((16..20).contains(&i)),
            Ok(Some(f)) => prop_assert!(false, "corruption at byte {} of {} accepted: {:?}", i, bytes.len(), f.kind()),
            Err(_) => {}
        }
        prop_assert!(bytes.len() >= HEADER_BYTES);
    }
}
