//! The transport's frame decoder on arbitrary bytes, fed in two pieces split at a point the data
//! chooses: never panics, and every frame it accepts re-encodes to exactly the bytes it consumed.
#![no_main]

use dvm_transport::wire::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some((&split, rest)) = bytes.split_first() else {
        return;
    };
    let at = usize::from(split) * rest.len() / 255;
    let mut d = Decoder::new();
    let mut consumed = 0u64;
    for piece in [&rest[..at], &rest[at..]] {
        d.feed(piece);
        loop {
            let start = d.offset();
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let again = frame.to_bytes().expect("a decoded frame encodes");
                    let len = (d.offset() - start) as usize;
                    let from = start as usize;
                    assert!(
                        again[..] == rest[from..from + len],
                        "decode/encode is not exact for a {} frame",
                        frame.kind()
                    );
                    consumed = d.offset();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert!(consumed as usize <= rest.len());
});
