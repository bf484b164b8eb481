//! Console output behind a reader that stops reading: the output waiting for it is counted
//! against `--max-memory` and holds the run back, instead of growing with the output; once the
//! reader resumes, every byte arrives, in order.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK_BYTES: usize = 64 << 10;
const LINKS: usize = 1200;

fn block() -> Vec<u8> {
    (0..BLOCK_BYTES).map(|i| (i * 7 % 251 + 1) as u8).collect()
}

/// A chain of LINKS runners; link n prints `n`, a newline and the 64 KiB block, then spawns
/// link n + 1 and commits. Output appears in ending order, so in the order of n.
fn program() -> String {
    format!(
        r#"
.equ DATA, 0x5000000000
.equ STACK_BASE, 0x100000100
.equ CHILD_STACK, 0x100000400
.equ CONSOLE_OUT, 0x100000208
.equ SYS_ID, 0x100000420
.equ SYS_A0, 0x100001000
.equ SYS_A1, 0x100001008
.equ N, 0x200000000
.equ STACK_DESC, 0x200001000
.equ USING_DESC, 0x200001100
.equ NONE_DESC, 0x200001200
.equ LINK_WORD, 0x200001408

main:
    mov $1:ue, N:ue
    br:j,a $spawn
link:
    mov 0(STACK_BASE):ue, N:ue
    mov $102:ue, SYS_ID:ue
    mov N:ue, SYS_A0:ue
    int 0x80
    mov $'\n':ue, CONSOLE_OUT:ue
    mov $100:ue, SYS_ID:ue
    mov $DATA:ue, SYS_A0:ue
    mov ${block}:ue, SYS_A1:ue
    int 0x80
    br:le,ue,a ${links}, N, $done
    add:ue N, $1, N
spawn:
    mov $1:ue, USING_DESC:ue
    mov $DATA:ue, USING_DESC+8:ue
    mov ${block}:ue, USING_DESC+16:ue
    mov $link:ue, LINK_WORD:ue
    newr $STACK_DESC, $USING_DESC, $NONE_DESC, $LINK_WORD
    mov N:ue, 0(CHILD_STACK):ue
done:
    exit:c
"#,
        block = BLOCK_BYTES,
        links = LINKS
    )
}

fn vm_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[test]
fn a_stalled_stdout_holds_the_run_back_within_max_memory_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("dvm-console-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let source = dir.join("stall.dasm");
    std::fs::write(&source, program()).expect("program written");
    let data: PathBuf = dir.join("block.bin");
    std::fs::write(&data, block()).expect("data written");

    let mut child = Command::new(env!("CARGO_BIN_EXE_dvm"))
        .arg("run")
        .arg(&source)
        .arg("--load")
        .arg(format!("{}@0x5000000000", data.display()))
        .args(["--max-memory", "32M", "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dvm starts");
    let pid = child.id();
    // Nobody reads for a while: the run makes what progress it can, then waits.
    let mut peak_rss = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        if let Some(rss) = vm_rss_bytes(pid) {
            peak_rss = peak_rss.max(rss);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        child.try_wait().expect("the child's status").is_none(),
        "the run cannot have finished: {} bytes of output were never read",
        LINKS * BLOCK_BYTES
    );

    let mut out = Vec::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_end(&mut out)
        .expect("stdout read");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut err)
        .expect("stderr read");
    let status = child.wait().expect("dvm ends");
    assert_eq!(status.code(), Some(0), "{err}");

    // --max-memory (pages and waiting output together) plus what the process needs anyway (a
    // debug build, its threads, the pipe): below the 77 MiB of output held back (the engine
    // before back-pressure reached 95 MiB here).
    let bound = (32 << 20) + (16 << 20);
    assert!(
        peak_rss < bound,
        "peak RSS while stdout was stalled: {peak_rss} bytes (bound {bound})"
    );

    let block = block();
    let mut rest = &out[..];
    for n in 1..=LINKS {
        let header = format!("{n}\n");
        assert!(
            rest.starts_with(header.as_bytes()),
            "link {n}'s output is next ({} bytes left)",
            rest.len()
        );
        rest = &rest[header.len()..];
        assert!(
            rest.len() >= BLOCK_BYTES && rest[..BLOCK_BYTES] == block[..],
            "link {n}'s block is intact"
        );
        rest = &rest[BLOCK_BYTES..];
    }
    assert!(rest.is_empty(), "nothing after the last link");
    let _ = std::fs::remove_dir_all(&dir);
}
