//! The two engine hooks the C API stands on, tested through the engine's own API:
//! `OutputMode::Callback` (console output handed to a function) and `run_keeping` (committed
//! memory readable after the run).

use dvm_engine::vm::{self, MemoryReadError, OutputMode, OutputSink, Stream};
use dvm_engine::{asm, image};
use std::sync::{Arc, Mutex};

fn program(source: &str) -> image::LoadedImage {
    let image = asm::assemble("test.dasm", source).expect("assembles");
    image::validate(image::Format::Elf, image).expect("validates")
}

fn config(output: OutputMode) -> vm::Config {
    vm::Config {
        workers: Some(1),
        pin_workers: false,
        max_memory_bytes: 256 << 20,
        output,
        input: vm::InputMode::Bytes(Vec::new()),
        ..vm::Config::default()
    }
}

type Received = Vec<(Stream, Vec<u8>)>;

/// One run prints, a second faults: one sink sees the output on stdout, then the fault report
/// on stderr.
#[test]
fn a_callback_receives_both_streams() {
    let received: Arc<Mutex<Received>> = Arc::default();
    let sink = {
        let received = Arc::clone(&received);
        OutputSink(Arc::new(move |stream, bytes: &[u8]| {
            received
                .lock()
                .expect("not poisoned")
                .push((stream, bytes.to_vec()))
        }))
    };
    let source =
        "main:\n    mov $72:ue, 0x100000208:ue\n    mov $10:ue, 0x100000208:ue\n    exit:c\n";
    let (report, _) =
        vm::run_keeping(program(source), config(OutputMode::Callback(sink.clone()))).expect("run");
    assert_eq!(report.exit_code(), 0);
    assert!(report.stdout.is_empty(), "a callback run captures nothing");
    let faulting = "main:\n    div:se 0x4000000000, $0, 0x4000000008\n    exit:c\n";
    let (report, _) =
        vm::run_keeping(program(faulting), config(OutputMode::Callback(sink))).expect("run");
    assert_eq!(report.exit_code(), 1);
    let received = received.lock().expect("not poisoned");
    assert_eq!(received[0], (Stream::Stdout, b"H\n".to_vec()));
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[1].0, Stream::Stderr);
    let report = String::from_utf8_lossy(&received[1].1);
    assert!(report.contains("faulted: division by zero"), "{report}");
    assert!(report.contains("(main"), "{report}");
}

/// A receiver that panics loses its output; the run neither hangs nor fails.
#[test]
fn a_panicking_callback_does_not_stop_the_run() {
    let sink = OutputSink(Arc::new(|_, _: &[u8]| panic!("receiver gives up")));
    let source =
        "main:\n    mov $72:ue, 0x100000208:ue\n    mov $5:ue, 0x4000000000:ue\n    exit:c\n";
    let (report, memory) =
        vm::run_keeping(program(source), config(OutputMode::Callback(sink))).expect("run");
    assert_eq!(report.exit_code(), 0);
    let mut word = [0u8; 8];
    memory.read(0x40_0000_0000, &mut word).expect("shared");
    assert_eq!(u64::from_le_bytes(word), 5);
}

#[test]
fn committed_memory_reads_newest_bytes_across_pages_and_refuses_non_shared_ranges() {
    // One word stored across a page boundary; the image's data is readable too.
    let source = "main:\n    mov $0x1122334455667788:ue, 0x4000000ffc:ue\n    exit:c\n\
                  .data\nd: .quad 0xabcdef\n";
    let loaded = program(source);
    let data = loaded
        .image
        .symbols
        .iter()
        .find(|symbol| symbol.name == "d")
        .expect("symbol d")
        .addr;
    let (report, memory) = vm::run_keeping(loaded, config(OutputMode::Capture)).expect("run");
    assert_eq!(
        report.exit_code(),
        0,
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let mut word = [0u8; 8];
    memory
        .read(data, &mut word)
        .expect("the image is shared memory");
    assert_eq!(u64::from_le_bytes(word), 0xabcdef);
    let mut bytes = [0xeeu8; 16];
    memory.read(0x40_0000_0ff8, &mut bytes).expect("shared");
    assert_eq!(bytes[..4], [0, 0, 0, 0]);
    assert_eq!(
        u64::from_le_bytes(bytes[4..12].try_into().expect("8")),
        0x1122334455667788
    );
    assert_eq!(bytes[12..], [0, 0, 0, 0]);
    memory.read(0x40_0000_0000, &mut []).expect("an empty read");

    let refused = |addr: u64, len: usize| {
        let mut buf = vec![0u8; len];
        memory.read(addr, &mut buf)
    };
    assert_eq!(
        refused(0x1_0000_0000, 8),
        Err(MemoryReadError::NotShared {
            addr: 0x1_0000_0000,
            len_bytes: 8
        })
    );
    assert!(
        refused(0x7_ffff_fffc, 8).is_err(),
        "starts in private memory"
    );
    assert!(
        refused(0xfff_ffff_fffc, 8).is_err(),
        "runs past the shared region"
    );
    assert!(refused(u64::MAX - 3, 8).is_err(), "wraps around");
}
