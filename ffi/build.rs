//! Generates the C header (`include/dvm.h`) from the crate's source with cbindgen, and the
//! pkg-config file (`dvm.pc`) next to the libraries in the target profile directory.
//!
//! The header lives in the source tree, at a path C users and the repository can name; it is
//! written only when its text changes, so an unchanged API never dirties the tree or rebuilds
//! whatever depends on it. A copy also goes to `OUT_DIR`, which the stale-header test compares
//! against the committed file.

use std::path::{Path, PathBuf};

fn main() {
    let crate_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|err| panic!("ffi/cbindgen.toml: {err}"));
    // `with_src`, not `with_crate`: the API is this one file, and parsing it alone spares the
    // build a `cargo metadata` run.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"))
        .generate()
        .unwrap_or_else(|err| panic!("cbindgen could not generate dvm.h: {err}"));
    bindings.write_to_file(out_dir.join("dvm.h"));
    let include = crate_dir.join("include");
    // `write_to_file` leaves the file alone when its contents are already these.
    bindings.write_to_file(include.join("dvm.h"));

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: the libraries are three levels up.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        write_if_changed(
            &profile_dir.join("dvm.pc"),
            &pkg_config(profile_dir, &include),
        );
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo did not set {name}"))
}

/// A pkg-config file for the libraries as built here (not installed): `pkg-config --cflags
/// --libs dvm` with `PKG_CONFIG_PATH=<target>/<profile>` links `-ldvm` with an rpath to them;
/// `--static` adds what the static library needs from the system.
fn pkg_config(libdir: &Path, includedir: &Path) -> String {
    format!(
        "libdir={}\n\
         includedir={}\n\
         \n\
         Name: dvm\n\
         Description: The C API of DVM, a datacenter-scale virtual machine for DISA programs\n\
         Version: {}\n\
         Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -ldvm\n\
         Libs.private: {}\n\
         Cflags: -I${{includedir}}\n",
        libdir.display(),
        includedir.display(),
        env("CARGO_PKG_VERSION"),
        STATIC_LIBS
    )
}

/// What `libdvm.a` needs from the system: hwloc (topology, through dvm-numa) and what Rust's
/// standard library needs (`cargo rustc -p dvm-ffi --crate-type staticlib -- --print
/// native-static-libs` lists them).
const STATIC_LIBS: &str = "-lhwloc -ludev -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc";

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return;
    }
    if let Err(err) = std::fs::write(path, text) {
        // The libraries are usable without it; say why it is missing.
        println!("cargo:warning=cannot write {}: {err}", path.display());
    }
}
