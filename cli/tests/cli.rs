//! The `dvm` command as a user meets it: exit codes, files written, and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dvm"))
        .args(args)
        .output()
        .expect("dvm runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dvm-cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_and_version_exit_zero() {
    let help = dvm(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("asm") && text.contains("disasm") && text.contains("Exit codes"));
    let version = dvm(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("dvm "));
}

#[test]
fn usage_errors_exit_one() {
    assert_eq!(dvm(&["no-such-command"]).status.code(), Some(1));
    assert_eq!(dvm(&["asm"]).status.code(), Some(1));
    assert_eq!(
        dvm(&["asm", "x.dasm", "--format", "coff"]).status.code(),
        Some(1)
    );
}

#[test]
fn asm_then_disasm_then_asm_is_identical_in_both_formats() {
    let dir = scratch("roundtrip");
    for format in ["elf", "flat"] {
        let first = dir.join(format!("loop.{format}"));
        let out = dvm(&[
            "asm",
            example("loop.dasm").to_str().expect("utf-8"),
            "-o",
            first.to_str().expect("utf-8"),
            "--format",
            format,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("instructions"),
            "asm reports what it wrote"
        );
        let listing = dir.join(format!("loop-{format}.dasm"));
        let out = dvm(&[
            "disasm",
            first.to_str().expect("utf-8"),
            "-o",
            listing.to_str().expect("utf-8"),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let second = dir.join(format!("loop2.{format}"));
        let out = dvm(&[
            "asm",
            listing.to_str().expect("utf-8"),
            "-o",
            second.to_str().expect("utf-8"),
            "--format",
            format,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(
            std::fs::read(&first).expect("first"),
            std::fs::read(&second).expect("second")
        );
    }
}

#[test]
fn default_output_name_and_stdout_listing() {
    let dir = scratch("default");
    let source = dir.join("tiny.dasm");
    std::fs::write(&source, "main: exit:c\n").expect("write");
    let out = dvm(&["asm", source.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let image = dir.join("tiny.disa");
    assert!(image.exists(), "default output is the input with .disa");
    let out = dvm(&["disasm", image.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("main:") && listing.contains("exit:c"),
        "{listing}"
    );
}

#[test]
fn malformed_source_reports_every_error_with_file_line_column() {
    let dir = scratch("malformed");
    let source = dir.join("bad.dasm");
    std::fs::write(
        &source,
        "main:\n    add:se 1, 2\n    mul:qq 1, 2, 3\n    .quad 5\n    br:j,a $nowhere\n",
    )
    .expect("write");
    let out = dvm(&["asm", source.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    let path = source.display().to_string();
    assert!(text.contains(&format!("{path}:2:12")), "{text}");
    assert!(text.contains("takes 3 operands, found 2"), "{text}");
    assert!(text.contains(&format!("{path}:3:9")), "{text}");
    assert!(text.contains("unknown type `qq`"), "{text}");
    assert!(text.contains(&format!("{path}:4:5")), "{text}");
    assert!(text.contains("not allowed in .text"), "{text}");
    assert!(text.contains("3 errors found"), "{text}");
    assert!(
        !dir.join("bad.disa").exists(),
        "no image is written on error"
    );
}

#[test]
fn flat_format_refuses_data_with_advice() {
    let dir = scratch("flatdata");
    let out = dvm(&[
        "asm",
        example("hello.dasm").to_str().expect("utf-8"),
        "-o",
        dir.join("h.img").to_str().expect("utf-8"),
        "--format",
        "flat",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("use the ELF format"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corrupt_images_are_refused_with_offsets() {
    let dir = scratch("corrupt");
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.disa", b"", "image is empty"),
        (
            "truncated.disa",
            &[0x10, 0xc0, 0x00, 0x62, 0x49, 0x00],
            "at byte offset 0x2: truncated instruction",
        ),
        (
            "reserved.disa",
            &[0x04, 0xe0, 0x00],
            "reserved and was never defined",
        ),
        (
            "badelf.disa",
            b"\x7fELF\x02\x01\x01garbage",
            "malformed ELF image",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        let out = dvm(&["disasm", path.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(stderr(&out).contains(expected), "{name}: {}", stderr(&out));
    }
    let out = dvm(&["disasm", dir.join("missing.disa").to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read image"));
}

#[test]
fn isa_prints_the_table() {
    let out = dvm(&["isa"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for mnemonic in [
        "`mov`", "`add`", "`br`", "`newr`", "`spawnx`", "`exit`", "`int`", "`exp`",
    ] {
        assert!(text.contains(mnemonic), "{mnemonic}");
    }
}

const PERSIST_WRITER: &str = "\
# Stores 41 in the persistent range, then commits.
main:
    mov $41:se, 0x40000000010:se
    exit:c
";

const PERSIST_READER: &str = "\
# Prints (value + 1) from the persistent range as one byte: '*' (42) if the writer's commit persisted.
main:
    add:se 0x40000000010, $1, 0x200000000
    mov 0x200000000:se, 0x100000208:se
    mov $10:se, 0x100000208:se
    exit:c
";

#[test]
fn persistent_range_survives_between_runs() {
    let dir = scratch("persist");
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let writer = dir.join("writer.dasm");
    let reader = dir.join("reader.dasm");
    std::fs::write(&writer, PERSIST_WRITER).expect("write");
    std::fs::write(&reader, PERSIST_READER).expect("write");
    let store_arg = store.to_str().expect("utf-8");
    // Without --persist the reader sees zeros: prints 1 (a control byte), not '*'.
    let out = dvm(&["run", reader.to_str().expect("utf-8")]);
    assert_eq!(out.stdout, b"\x01\n");
    let out = dvm(&[
        "run",
        writer.to_str().expect("utf-8"),
        "--persist",
        store_arg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = dvm(&[
        "run",
        reader.to_str().expect("utf-8"),
        "--persist",
        store_arg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        out.stdout, b"*\n",
        "the reader sees what the writer committed"
    );
    // A damaged store is refused with the file and the offset, and exit code 1.
    let file = store.join("persistent.dvm");
    let mut bytes = std::fs::read(&file).expect("store file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).expect("damage");
    let out = dvm(&[
        "run",
        reader.to_str().expect("utf-8"),
        "--persist",
        store_arg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("persistent.dvm is damaged at byte offset"),
        "{}",
        stderr(&out)
    );
}

/// A `--load` is laid into memory a page at a time: a partial first page, whole pages and a
/// partial last page. The program reads words at each edge (and across the page boundaries)
/// and prints them; they must be the file's bytes, and the word after its end zero.
#[test]
fn load_over_partial_and_whole_pages_lands_byte_exact() {
    const AT: u64 = 0x50_0000_0ff8;
    let dir = scratch("load-pages");
    // 8 bytes on the first page, a whole page, 16 bytes on the last one.
    let bytes: Vec<u8> = (0..8 + 4096 + 16u64)
        .map(|index| (index * 37 % 251 + 1) as u8)
        .collect();
    let data = dir.join("data.bin");
    std::fs::write(&data, &bytes).expect("write the data");
    let offsets = [
        0u64,
        4,
        8,
        8 + 4088,
        8 + 4092,
        8 + 4096,
        8 + 4096 + 8,
        8 + 4096 + 16,
    ];
    let mut source = String::from("main:\n");
    for offset in offsets {
        source.push_str(&format!(
            "    mov {:#x}:ue, 0x100001000:ue\n    mov $102:ue, 0x100000420:ue\n    int 0x80\n    mov $' ':ub, 0x100000208:ub\n",
            AT + offset
        ));
    }
    source.push_str("    exit:c\n");
    let program = dir.join("edges.dasm");
    std::fs::write(&program, source).expect("write the program");
    let spec = format!("{}@{AT:#x}", data.display());
    let out = dvm(&["run", program.to_str().expect("utf-8"), "--load", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let word = |offset: u64| {
        let mut le = [0u8; 8];
        for (index, byte) in le.iter_mut().enumerate() {
            *byte = bytes.get(offset as usize + index).copied().unwrap_or(0);
        }
        u64::from_le_bytes(le)
    };
    let expected: String = offsets
        .iter()
        .map(|offset| format!("{} ", word(*offset)))
        .collect();
    assert!(expected.ends_with(" 0 "), "the word past the end is zero");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn load_maps_a_file_and_rejects_bad_specs() {
    let dir = scratch("load");
    let data = dir.join("data.bin");
    std::fs::write(&data, 7u64.to_le_bytes()).expect("write");
    let program = dir.join("load.dasm");
    std::fs::write(
        &program,
        "main:\n    add:se 0x5000000000, $'0', 0x200000000\n    mov 0x200000000:se, 0x100000208:se\n    exit:c\n",
    )
    .expect("write");
    let spec = format!("{}@0x5000000000", data.display());
    let out = dvm(&["run", program.to_str().expect("utf-8"), "--load", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"7");
    let out = dvm(&["run", program.to_str().expect("utf-8"), "--load", "nofile"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("expected FILE@ADDR"),
        "{}",
        stderr(&out)
    );
    let bad_addr = format!("{}@0x10", data.display());
    let out = dvm(&["run", program.to_str().expect("utf-8"), "--load", &bad_addr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not fit inside the shared region"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_reports_faults_and_exits_one_and_topology_shows_cores() {
    let dir = scratch("fault");
    let program = dir.join("div.dasm");
    std::fs::write(
        &program,
        "main:\n    div:se $1, $0, 0x200000000\n    exit:c\n",
    )
    .expect("write");
    let out = dvm(&["run", program.to_str().expect("utf-8"), "--stats"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stderr(&out);
    assert!(text.contains("faulted: division by zero"), "{text}");
    assert!(
        text.contains("at 0x800000000 (main): div:se $1, $0, 0x200000000"),
        "{text}"
    );
    assert!(
        text.contains("pinned") || text.contains("unpinned"),
        "stats show pinning: {text}"
    );
    let out = dvm(&["topology"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NUMA nodes:") && text.contains("core 0") && text.contains("worker plan"),
        "{text}"
    );
    // The plan of `--nodes 2`: each local node's workers on their own cores, and how an
    // explicitly launched process would join.
    let out = dvm(&[
        "topology",
        "--nodes",
        "2",
        "--workers",
        "1",
        "--hosts",
        "a:1,b:2",
        "--rank",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("node 1 (local):") && text.contains("rank 1 of 2") && text.contains("a:1"),
        "{text}"
    );
}

/// `examples/micro_pinned.dasm` (the benchmark of page versions kept next to a long-running
/// runner) computes what it says: with one worker the spinner runs first, then the chain.
#[test]
fn micro_pinned_counts_its_chain() {
    let dir = scratch("micro-pinned");
    let params = dir.join("params.bin");
    let words: Vec<u8> = [50u64, 1000].iter().flat_map(|w| w.to_le_bytes()).collect();
    std::fs::write(&params, words).expect("write the parameters");
    let spec = format!("{}@0x4000000000", params.display());
    let program = example("micro_pinned.dasm");
    let out = dvm(&[
        "run",
        program.to_str().expect("utf-8"),
        "--workers",
        "1",
        "--load",
        &spec,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "spinner 1000\nchain 50\n"
    );
}
