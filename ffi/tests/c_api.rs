//! The C API from C: `dvm.h` compiles as C99 and as C++ with warnings as errors, `api_test.c`
//! (hello, k-means with its input mapped from C, a faulting program, committed memory read
//! back, bad arguments) passes against `libdvm.so` (found through `dvm.pc`) and against
//! `libdvm.a`, and passes under valgrind with no error and no leak. Valgrind and the C compilers
//! are required: `scripts/install-deps` installs them, and a missing one fails these tests
//! rather than skipping what they check.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ffi_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_dir() -> PathBuf {
    ffi_dir().parent().expect("ffi/ has a parent").to_path_buf()
}

/// `<target>/<profile>/deps`, where this test binary is and where cargo builds `libdvm.so` and
/// `libdvm.a`. `cargo build` copies them one level up, where `dvm.pc` points; `cargo test`
/// does not, so the copies there may be older than the source under test.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .expect("the test binary is in <profile>/deps")
        .to_path_buf();
    for library in ["libdvm.so", "libdvm.a"] {
        assert!(
            dir.join(library).exists(),
            "{} is missing: cargo builds it with the dvm-ffi library",
            dir.join(library).display()
        );
    }
    dir
}

/// `<target>/<profile>`, where build.rs writes `dvm.pc`.
fn profile_dir() -> PathBuf {
    let dir = library_dir()
        .parent()
        .expect("deps/ has a parent")
        .to_path_buf();
    assert!(dir.join("dvm.pc").exists(), "build.rs writes dvm.pc");
    dir
}

/// A fresh directory for one test's build products.
fn work_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("c_api-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the work directory");
    dir
}

fn run(command: &mut Command) -> Output {
    let shown = format!("{command:?}");
    command.output().unwrap_or_else(|err| {
        panic!("cannot start {shown}: {err} (scripts/install-deps installs it)")
    })
}

fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// examples/hello.dasm as an ELF image, as `dvm asm` writes it.
fn hello_image(dir: &Path) -> PathBuf {
    let source = std::fs::read_to_string(repo_dir().join("examples/hello.dasm")).expect("hello");
    let image = dvm_engine::asm::assemble("hello.dasm", &source).expect("hello assembles");
    let bytes =
        dvm_engine::image::write(&image, dvm_engine::image::Format::Elf).expect("hello writes");
    let path = dir.join("hello.disa");
    std::fs::write(&path, bytes).expect("write hello.disa");
    path
}

/// `pkg-config ARGS dvm` with the `dvm.pc` of this build, its `libdir` pointed at the
/// libraries this test run built (see `library_dir`).
fn pkg_config(args: &[&str]) -> Vec<String> {
    let output = run(Command::new("pkg-config")
        .args(args)
        .arg(format!(
            "--define-variable=libdir={}",
            library_dir().display()
        ))
        .arg("dvm")
        .env("PKG_CONFIG_PATH", profile_dir()));
    check(&output, "pkg-config");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Compiles api_test.c into `dir/name`, linking with `link`.
fn build_api_test(dir: &Path, name: &str, link: &[String]) -> PathBuf {
    let exe = dir.join(name);
    let output = run(Command::new("gcc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg(format!("-I{}", ffi_dir().join("include").display()))
        .arg(ffi_dir().join("tests/api_test.c"))
        .arg("-o")
        .arg(&exe)
        .args(link));
    check(&output, "gcc api_test.c");
    exe
}

/// A command for a program linked against libdvm: it must find the library through its rpath,
/// not through the LD_LIBRARY_PATH cargo gives tests (which names `<profile>` first, where an
/// older library may be; see `library_dir`).
fn linked_program(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_remove("LD_LIBRARY_PATH");
    command
}

fn api_test_command(exe: &Path, dir: &Path, workers: u32) -> Command {
    let mut command = linked_program(exe);
    command
        .arg(repo_dir())
        .arg(hello_image(dir))
        .arg(workers.to_string());
    command
}

fn expect_passed(output: &Output, what: &str) {
    check(output, what);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("api_test: all checks passed"),
        "{what}: no success line:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn header_compiles_as_c99_and_as_cpp() {
    let dir = work_dir("header");
    let source = dir.join("uses_header.c");
    // Every type and function named, so that an unusable declaration cannot hide.
    std::fs::write(
        &source,
        "#include \"dvm.h\"\n\
         static void sink(enum dvm_stream s, const uint8_t *b, size_t n, void *u) \
         { (void)s; (void)b; (void)n; (void)u; }\n\
         int main(void) {\n\
         dvm_options options; dvm_stats stats; dvm_vm *vm = 0; dvm_output_fn f = sink;\n\
         dvm_status s = dvm_options_init(&options);\n\
         (void)stats; (void)f; (void)s; (void)vm;\n\
         (void)dvm_vm_create; (void)dvm_vm_destroy; (void)dvm_load_image_file;\n\
         (void)dvm_load_image_bytes; (void)dvm_assemble; (void)dvm_map_input;\n\
         (void)dvm_clear_inputs; (void)dvm_set_console_input; (void)dvm_run;\n\
         (void)dvm_read_memory; (void)dvm_get_stats; (void)dvm_last_error_message;\n\
         (void)dvm_status_name; (void)dvm_version;\n\
         return DVM_OK + DVM_STREAM_STDOUT - 1;\n}\n",
    )
    .expect("write the C file");
    let include = format!("-I{}", ffi_dir().join("include").display());
    let c = run(Command::new("gcc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c"])
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(dir.join("c.o")));
    check(&c, "gcc -std=c99 -Wall -Werror dvm.h");
    let cpp = run(Command::new("g++")
        .args(["-Wall", "-Wextra", "-Werror", "-x", "c++", "-c"])
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(dir.join("cpp.o")));
    check(&cpp, "g++ -Wall -Werror dvm.h");
}

#[test]
fn api_test_passes_against_the_shared_library_found_by_pkg_config() {
    let dir = work_dir("shared");
    let cflags = pkg_config(&["--cflags"]);
    let libs = pkg_config(&["--libs"]);
    assert!(
        cflags.contains(&format!("-I{}", ffi_dir().join("include").display())),
        "dvm.pc's Cflags name ffi/include: {cflags:?}"
    );
    assert!(
        libs.iter().any(|flag| flag == "-ldvm"),
        "dvm.pc links -ldvm: {libs:?}"
    );
    let pc = std::fs::read_to_string(profile_dir().join("dvm.pc")).expect("dvm.pc");
    assert!(
        pc.contains(&format!("libdir={}\n", profile_dir().display())),
        "dvm.pc points at the profile directory, where `cargo build` puts the libraries:\n{pc}"
    );
    assert!(
        libs.contains(&format!("-Wl,-rpath,{}", library_dir().display())),
        "dvm.pc gives an rpath: {libs:?}"
    );
    let exe = build_api_test(&dir, "api_test_shared", &libs);
    // Linked dynamically: the program names libdvm.so, found through the rpath.
    let ldd = run(linked_program("ldd").arg(&exe));
    let ldd_text = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        ldd_text.contains(&library_dir().join("libdvm.so").display().to_string()),
        "api_test uses the built libdvm.so:\n{ldd_text}"
    );
    expect_passed(
        &run(&mut api_test_command(&exe, &dir, 2)),
        "api_test (libdvm.so)",
    );
}

#[test]
fn api_test_passes_against_the_static_library() {
    let dir = work_dir("static");
    let mut link = vec![library_dir().join("libdvm.a").display().to_string()];
    // What the static library needs from the system, as dvm.pc lists it.
    link.extend(
        pkg_config(&["--static", "--libs-only-l"])
            .into_iter()
            .filter(|flag| flag != "-ldvm"),
    );
    let exe = build_api_test(&dir, "api_test_static", &link);
    let ldd = run(linked_program("ldd").arg(&exe));
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("libdvm.so"),
        "the static build must not use libdvm.so"
    );
    expect_passed(
        &run(&mut api_test_command(&exe, &dir, 2)),
        "api_test (libdvm.a)",
    );
}

#[test]
fn api_test_passes_under_valgrind_without_errors_or_leaks() {
    let dir = work_dir("valgrind");
    let exe = build_api_test(&dir, "api_test_valgrind", &pkg_config(&["--libs"]));
    let mut command = linked_program("valgrind");
    command.args([
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,indirect",
        "--error-exitcode=99",
        "--quiet",
    ]);
    command
        .arg(&exe)
        .arg(repo_dir())
        .arg(hello_image(&dir))
        .arg("1");
    let output = run(&mut command);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(
        output.status.code(),
        Some(99),
        "valgrind found errors or leaks:\n{stderr}"
    );
    expect_passed(&output, "api_test under valgrind");
    // --quiet: valgrind prints only what it found, and it must have found nothing.
    assert!(
        !stderr.contains("definitely lost") && !stderr.contains("Invalid "),
        "valgrind reported:\n{stderr}"
    );
}

/// The header is generated by build.rs into ffi/include/dvm.h; a change to the API must be
/// committed with it, so that C users of a checkout get the header of its library.
#[test]
fn committed_header_is_current() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/dvm.h"));
    let on_disk = std::fs::read_to_string(ffi_dir().join("include/dvm.h")).expect("dvm.h");
    assert_eq!(generated, on_disk, "build.rs writes ffi/include/dvm.h");
    let committed = Command::new("git")
        .args(["show", "HEAD:ffi/include/dvm.h"])
        .current_dir(repo_dir())
        .output();
    match committed {
        Ok(output) if output.status.success() => assert!(
            String::from_utf8_lossy(&output.stdout) == generated,
            "ffi/include/dvm.h differs from the committed one: the C API changed; commit the \
             regenerated header"
        ),
        // Not a git checkout (a source archive): the file on disk is all there is.
        _ => {}
    }
}
