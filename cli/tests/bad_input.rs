//! Bad input is refused before any work: each case runs the real `dvm` on a program that would
//! print, and expects exit code 1, a message naming the place, and no program output (and,
//! for `--persist`, nothing saved). Also the reports that name places once a program runs:
//! a memory-limit fault's address and the labels of a fault's disassembly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dvm"))
        .args(args)
        .output()
        .expect("dvm runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dvm-bad-input-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Prints a line when it runs: any output shows the program ran.
const PRINTS: &str = "\
main:
    mov $114:ue, 0x100000208:ue
    mov $10:ue, 0x100000208:ue
    exit:c
";

/// Writes `PRINTS` (plus `extra` source) to `dir` and returns its path.
fn program(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{PRINTS}{extra}")).expect("write the program");
    path
}

/// Exit code 1, stderr holding every piece, nothing on stdout.
fn assert_refused(out: &Output, pieces: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        out.stdout.is_empty(),
        "the program ran: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    for piece in pieces {
        assert!(err.contains(piece), "`{piece}` missing from: {err}");
    }
}

// ---- 1. --load into runtime-reserved areas ----------------------------------------------------

fn load_into(area: &str, addr: u64, extra_args: &[&str]) {
    let dir = scratch(&format!("load-{}", area.replace(' ', "-")));
    let program = program(&dir, "prints.dasm", "");
    let data = dir.join("table.bin");
    std::fs::write(&data, [7u8; 100]).expect("write data");
    let spec = format!("{}@{addr:#x}", text(&data));
    let mut args = vec!["run", text(&program), "--load", &spec];
    args.extend_from_slice(extra_args);
    let out = dvm(&args);
    assert_refused(
        &out,
        &[
            "table.bin",
            &format!("{addr:#x}..{:#x}", addr + 100),
            area,
            "reserves",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn load_into_the_heap_area_is_refused() {
    load_into("heap area", 0x100_0000_0000, &[]);
    // In another space's heap too, and from below the area into it.
    load_into("heap area", (3 << 46) + 0x100_0000_0000, &[]);
    load_into("heap area", 0x100_0000_0000 - 50, &[]);
}

#[test]
fn load_into_the_stack_area_is_refused() {
    load_into("stack area", 0x180_0000_0000 + 0x1000, &[]);
    load_into("stack area", 0x200_0000_0000 - 50, &[]);
}

#[test]
fn load_into_the_exit_record_area_is_refused() {
    // The first (reserved) ids and the root's own exit record.
    load_into("exit-record area", 0x3d0_0000_0000, &[]);
    load_into("exit-record area", 0x3d0_0001_0000, &[]);
    load_into("exit-record area", 0x3d0_0000_0000 - 50, &[]);
}

#[test]
fn load_into_the_persistent_range_is_refused_under_persist() {
    let store = scratch("load-persist-store");
    load_into(
        "persistent range",
        0x400_0000_0000,
        &["--persist", text(&store)],
    );
    assert!(!store.join("persistent.dvm").exists(), "nothing was saved");
    // Without --persist it is ordinary memory: the load is laid and the program runs.
    let dir = scratch("load-persist-free");
    let program = program(&dir, "prints.dasm", "");
    let data = dir.join("table.bin");
    std::fs::write(&data, [7u8; 100]).expect("write data");
    let spec = format!("{}@0x40000000000", text(&data));
    let out = dvm(&["run", text(&program), "--load", &spec]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"r\n");
}

#[test]
fn a_load_that_is_missing_or_not_a_file_is_refused_before_anything_runs() {
    let dir = scratch("load-not-a-file");
    let program = program(&dir, "prints.dasm", "");
    let missing = dir.join("missing.bin");
    let spec = format!("{}@0x5000000000", text(&missing));
    let out = dvm(&["run", text(&program), "--load", &spec]);
    assert_refused(&out, &["cannot read --load file", "missing.bin"]);
    let spec = format!("{}@0x5000000000", text(&dir));
    let out = dvm(&["run", text(&program), "--load", &spec]);
    assert_refused(&out, &["is not a regular file", "load-not-a-file"]);
}

#[test]
fn a_load_next_to_the_reserved_areas_runs() {
    let dir = scratch("load-free");
    let program = program(&dir, "prints.dasm", "");
    let data = dir.join("table.bin");
    std::fs::write(&data, [7u8; 100]).expect("write data");
    for addr in [
        0x100_0000_0000u64 - 100,
        0x200_0000_0000,
        0x3d0_0000_0000 - 100,
    ] {
        let spec = format!("{}@{addr:#x}", text(&data));
        let out = dvm(&["run", text(&program), "--load", &spec]);
        assert_eq!(out.status.code(), Some(0), "{addr:#x}: {}", stderr(&out));
        assert_eq!(out.stdout, b"r\n");
    }
}

#[test]
fn a_bad_load_on_local_nodes_is_refused_once_before_they_start() {
    let dir = scratch("load-nodes");
    let program = program(&dir, "prints.dasm", "");
    let data = dir.join("table.bin");
    std::fs::write(&data, [7u8; 100]).expect("write data");
    let spec = format!("{}@0x18000000000", text(&data));
    let out = dvm(&["run", "--nodes", "2", text(&program), "--load", &spec]);
    assert_refused(&out, &["table.bin", "stack area"]);
    assert_eq!(
        stderr(&out).matches("stack area").count(),
        1,
        "{}",
        stderr(&out)
    );
}

// ---- 2. sections placed in reserved areas ----------------------------------------------------

/// Where sections may be placed freely; a distinctive value, to patch in an ELF file.
const FREE: u64 = 0x30_0000_0000;

/// `.data` (8 bytes) and `.bss` (16 bytes) at `addr`, assembled on the fly, written by
/// `dvm asm`, and in an ELF image whose section headers place them there.
fn sections_in(area: &str, addr: u64) {
    let dir = scratch(&format!("sections-{}", area.replace(' ', "-")));
    let range = |len: u64| format!("{addr:#x}..{:#x}", addr + len);
    for (section, body, len) in [(".data", "d: .quad 1", 8), (".bss", "b: .zero 16", 16)] {
        let source = program(
            &dir,
            "placed.dasm",
            &format!(".section {section}, {addr:#x}\n{body}\n"),
        );
        let out = dvm(&["run", text(&source)]);
        assert_refused(&out, &[section, &range(len), area, "reserves"]);
        let image = dir.join("placed.elf");
        let _ = std::fs::remove_file(&image);
        let out = dvm(&["asm", text(&source), "-o", text(&image)]);
        assert_refused(&out, &[section, &range(len), area]);
        assert!(!image.exists(), "no image is written");

        // An ELF image from elsewhere: assembled at a free address, then moved.
        let source = program(
            &dir,
            "free.dasm",
            &format!(".section {section}, {FREE:#x}\n{body}\n"),
        );
        let out = dvm(&["asm", text(&source), "-o", text(&image)]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let mut bytes = std::fs::read(&image).expect("image");
        let mut moved = 0;
        for at in 0..bytes.len().saturating_sub(8) {
            if bytes[at..at + 8] == FREE.to_le_bytes() {
                bytes[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                moved += 1;
            }
        }
        assert!(moved >= 2, "the section's addresses were found");
        std::fs::write(&image, &bytes).expect("write the moved image");
        let out = dvm(&["run", text(&image)]);
        assert_refused(&out, &[section, &range(len), area, "placed.elf"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sections_in_the_heap_area_are_refused() {
    sections_in("heap area", 0x100_0000_0000);
}

#[test]
fn sections_in_the_stack_area_are_refused() {
    sections_in("stack area", 0x1ff_0000_0000);
}

#[test]
fn sections_in_the_exit_record_area_are_refused() {
    sections_in("exit-record area", 0x3d0_0000_0000);
}

#[test]
fn sections_in_the_persistent_range_are_refused_under_persist() {
    let dir = scratch("sections-persist");
    let store = dir.join("store");
    let source = program(
        &dir,
        "placed.dasm",
        ".section .data, 0x40000000000\nd: .quad 1\n",
    );
    let out = dvm(&["run", text(&source), "--persist", text(&store)]);
    assert_refused(
        &out,
        &[".data", "0x40000000000..0x40000000008", "persistent range"],
    );
    assert!(!store.join("persistent.dvm").exists(), "nothing was saved");
    let out = dvm(&["run", text(&source)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// ---- 3. overlapping --load regions -----------------------------------------------------------

#[test]
fn overlapping_loads_are_refused_naming_both() {
    let dir = scratch("overlap");
    let program = program(&dir, "prints.dasm", "");
    let first = dir.join("first.bin");
    let second = dir.join("second.bin");
    let apart = dir.join("apart.bin");
    std::fs::write(&first, [1u8; 0x100]).expect("write");
    std::fs::write(&second, [2u8; 0x100]).expect("write");
    std::fs::write(&apart, [3u8; 0x10]).expect("write");
    let at = |path: &Path, addr: u64| format!("{}@{addr:#x}", text(path));
    let out = dvm(&[
        "run",
        text(&program),
        "--load",
        &at(&second, 0x40_0000_0080),
        "--load",
        &at(&apart, 0x50_0000_0000),
        "--load",
        &at(&first, 0x40_0000_0000),
    ]);
    assert_refused(
        &out,
        &[
            "first.bin (0x4000000000..0x4000000100)",
            "second.bin (0x4000000080..0x4000000180)",
            "overlap at 0x4000000080..0x4000000100",
        ],
    );
    // The same AMR bytes seen from two spaces overlap too.
    let amr = 0x208_0010_0000u64;
    let out = dvm(&[
        "run",
        text(&program),
        "--load",
        &at(&first, amr),
        "--load",
        &at(&second, (2 << 46) + amr + 0xf0),
    ]);
    assert_refused(&out, &["first.bin", "second.bin", "overlap"]);
    // Adjacent loads do not overlap.
    let out = dvm(&[
        "run",
        text(&program),
        "--load",
        &at(&first, 0x40_0000_0000),
        "--load",
        &at(&second, 0x40_0000_0100),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"r\n");
}

// ---- 4. --persist DIR checked before the program starts -------------------------------------

#[test]
fn an_unusable_persist_directory_is_refused_before_the_program_runs() {
    let dir = scratch("persist-dir");
    let program = program(&dir, "prints.dasm", "");
    // A file where a directory should be created.
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    let store = file.join("store");
    let out = dvm(&["run", text(&program), "--persist", text(&store)]);
    assert_refused(
        &out,
        &[
            "--persist",
            text(&store),
            "cannot create it",
            "Not a directory",
        ],
    );
    // A directory in which no file can be written (as root too).
    let out = dvm(&["run", text(&program), "--persist", "/proc/self"]);
    assert_refused(
        &out,
        &["/proc/self", "cannot write a file in it", "os error"],
    );
    // A usable one is created, and after the run holds the store and no probe.
    let fresh = dir.join("a").join("b");
    let out = dvm(&["run", text(&program), "--persist", text(&fresh)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"r\n");
    let names: Vec<_> = std::fs::read_dir(&fresh)
        .expect("created")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["persistent.dvm"]);
}

// ---- 5. a store with duplicate page records ---------------------------------------------------

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash: u64, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn a_store_with_a_page_stored_twice_is_refused_as_damaged() {
    let dir = scratch("persist-duplicate");
    let program = program(&dir, "prints.dasm", "");
    let store = dir.join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    let page = 0x400_0000_1000u64;
    let mut body = b"DVMPERS1".to_vec();
    body.extend_from_slice(&2u64.to_le_bytes());
    for fill in [1u8, 2] {
        body.extend_from_slice(&(page >> 12).to_le_bytes());
        body.extend_from_slice(&[fill; 4096]);
    }
    let sum = fnv1a(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    let file = store.join("persistent.dvm");
    std::fs::write(&file, &body).expect("write the store");
    let out = dvm(&["run", text(&program), "--persist", text(&store)]);
    assert_refused(
        &out,
        &[
            text(&file),
            "damaged at byte offset 4120",
            "page 0x40000001000 is stored twice",
        ],
    );
    assert_eq!(
        std::fs::read(&file).expect("store"),
        body,
        "the store is left as it was"
    );
}

// ---- 6. a memory-limit fault names the address -----------------------------------------------

/// Touches one byte at the start of each page from 0x40_0000_0000 on, until the limit.
const HOG: &str = "\
main:
    mov $0x4000000000:ue, 0x200000000:ue
touch:
    mov $1:ub, (0x200000000):ub
    add:ue 0x200000000, $4096, 0x200000000
    br:l,ue,a 0x200000000, $0x4010000000, $touch
    exit:c
";

#[test]
fn a_memory_limit_fault_names_the_address_whose_page_was_needed() {
    let dir = scratch("memory-limit");
    let source = dir.join("hog.dasm");
    std::fs::write(&source, HOG).expect("write");
    let out = dvm(&["run", text(&source), "--max-memory", "4M", "--workers", "1"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("memory limit of 4194304 bytes reached (--max-memory)"),
        "{err}"
    );
    let named = |prefix: &str| {
        let at = err
            .find(prefix)
            .unwrap_or_else(|| panic!("`{prefix}` in {err}"))
            + prefix.len();
        let hex: String = err[at..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == 'x')
            .collect();
        u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("an address")
    };
    let addr = named("for the page of ");
    assert_eq!(named("address: "), addr);
    // The store that needed a page: one of the program's, at a page start, past the ones
    // that fitted in 4 MiB.
    assert!(
        (0x40_0000_0000..0x40_1000_0000).contains(&addr),
        "{addr:#x}"
    );
    assert_eq!(addr % 4096, 0, "{addr:#x}");
    assert!(addr >= 0x40_0000_0000 + 512 * 4096, "{addr:#x}");
}

// ---- 7. the fault report names a shared address as the source did ---------------------------

/// Both stores fault (image memory is read-only); `a` and `b` name the same instruction.
fn shared_labels(first: &str, second: &str, target: &str) -> String {
    format!(
        "\
main:
    br:j,a ${target}
{first}:
{second}:
    mov $0:ud, {target}:ud
    exit:c
"
    )
}

fn fault_report(dir: &Path, name: &str, source: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, source).expect("write");
    let out = dvm(&["run", text(&path)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("read-only"), "{err}");
    err
}

#[test]
fn the_fault_report_names_shared_labels_as_the_source_used_them() {
    let dir = scratch("labels");
    // The operand says `b`, then `a`: the report's disassembly says the same, as does a
    // report from the ELF image `dvm asm` writes.
    for target in ["b", "a"] {
        let source = shared_labels("a", "b", target);
        let err = fault_report(&dir, &format!("op-{target}.dasm"), &source);
        assert!(err.contains(&format!("mov $0:ud, {target}:ud")), "{err}");
        let elf = dir.join(format!("op-{target}.elf"));
        let src = dir.join(format!("op-{target}.dasm"));
        let out = dvm(&["asm", text(&src), "-o", text(&elf)]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let out = dvm(&["run", text(&elf)]);
        assert!(
            stderr(&out).contains(&format!("mov $0:ud, {target}:ud")),
            "{}",
            stderr(&out)
        );
    }
    // The PC is named by the label written next to the instruction: the one defined last.
    let err = fault_report(&dir, "pc-ab.dasm", &shared_labels("a", "b", "a"));
    assert!(err.contains("(b): mov"), "{err}");
    let err = fault_report(&dir, "pc-ba.dasm", &shared_labels("b", "a", "b"));
    assert!(err.contains("(a): mov"), "{err}");
}
