//! The C API of DVM: create a VM, give it a program (an image or `.dasm` text), map input data
//! into its shared memory, run it with a callback receiving the console output, then read the
//! committed shared memory and the run's counters. Built as `libdvm.so` and `libdvm.a`; the
//! header `include/dvm.h` is generated from this file by `build.rs` (cbindgen), so the doc
//! comments here are the header's documentation. `docs/C-API.md` is the guide.
//!
//! Rules every entry point keeps, because a C caller cannot be trusted to keep Rust's:
//! - no panic crosses the boundary: each body runs under `catch_unwind`, and a caught panic is
//!   `DVM_INTERNAL` with its message;
//! - NULL pointers, lengths above `isize::MAX` and out-of-range values are `DVM_INVALID_ARGUMENT`,
//!   never a crash;
//! - values C passes in are plain integers (`int`, `uint64_t`), never Rust enums or `bool`s, so a
//!   stray value cannot be an invalid Rust value;
//! - a handle's state sits behind a mutex that calls only `try_lock`: a second thread using the
//!   same handle gets `DVM_BUSY` instead of a data race or a deadlock (a run's callback calling
//!   back into its own handle, say).
//!
//! Errors are reported per thread (`dvm_last_error_message`), not per handle, so that a failed
//! `dvm_vm_create` or a NULL handle has a message too.
#![allow(non_camel_case_types)]
// The entry points are called from C, where Rust's `unsafe` marker means nothing: each states
// its pointer contract in its doc comment (and so in dvm.h) and checks what can be checked
// (NULL, lengths) before any dereference.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use dvm_engine::{asm, image, vm};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// What a call did. Every function that can fail returns one; DVM_OK is 0, so `if (status)`
/// tests for failure. The reason is in dvm_last_error_message().
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvm_status {
    /// Success.
    DVM_OK = 0,
    /// A NULL pointer, a length above PTRDIFF_MAX, an address range outside the shared region,
    /// an option out of range.
    DVM_INVALID_ARGUMENT = 1,
    /// A file could not be read.
    DVM_IO = 2,
    /// The assembly text has errors; the message lists them as FILE:LINE:COLUMN.
    DVM_ASSEMBLE = 3,
    /// The image is malformed (the message names the offset) or does not validate.
    DVM_IMAGE = 4,
    /// The run could not start: no page memory, the initial memory exceeds max_memory_bytes.
    DVM_RUN = 5,
    /// The run finished and at least one runner faulted. The message holds the engine's fault
    /// reports (runner id, PC and symbol, instruction, address); the other runners' commits
    /// stand, and dvm_read_memory and dvm_get_stats work as after a successful run.
    DVM_PROGRAM_FAULTED = 6,
    /// A bug in DVM (an internal error or a caught panic); the message says what.
    DVM_INTERNAL = 7,
    /// The call does not fit the handle's state: dvm_run before a program was given,
    /// dvm_read_memory or dvm_get_stats before a run finished.
    DVM_STATE = 8,
    /// Another thread is using the handle (or a run's callback called back into its own
    /// handle). Nothing was done.
    DVM_BUSY = 9,
}

/// Which console stream output belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum dvm_stream {
    /// The program's own output (console word, write system calls) of runners that committed
    /// or aborted.
    DVM_STREAM_STDOUT = 1,
    /// DVM's reports about the program: a runner's fault report or failed commit, each
    /// followed by the output that runner left pending.
    DVM_STREAM_STDERR = 2,
}

/// Receives console output during dvm_run: `len` bytes at `bytes` (valid only during the call)
/// of `stream`, and the `user_data` given to dvm_run. Called from a thread DVM owns, never
/// from two threads at once, in the order the runners ended (the order the dvm command prints);
/// every call happens before dvm_run returns. It must not call dvm_ functions on the handle
/// being run (they return DVM_BUSY), must not unwind (C++ exceptions, longjmp) out of the
/// call, and should return promptly: the run holds further output back while it waits.
pub type dvm_output_fn = Option<
    unsafe extern "C" fn(stream: dvm_stream, bytes: *const u8, len: usize, user_data: *mut c_void),
>;

/// How a VM runs its programs. Fill it with dvm_options_init, then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct dvm_options {
    /// Worker threads; 0 (the default): one per core. At most 4096.
    pub workers: u32,
    /// Nonzero (the default): pin each worker to a processor.
    pub pin_workers: c_int,
    /// Instructions one runner may execute before it faults; 0 (the default): unlimited.
    pub max_instructions: u64,
    /// Page memory the whole run may use, in bytes; 0 (the default): half the machine's
    /// memory.
    pub max_memory_bytes: u64,
    /// Runners that may exist at once (queued, running, or waiting for their parent);
    /// default 1000000, at least 1.
    pub max_runners: u64,
}

/// The counters of the last finished run (the dvm command's `--stats`), and its exit code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct dvm_stats {
    /// Worker threads the run used.
    pub workers: u64,
    /// Instructions executed by all runners.
    pub instructions: u64,
    pub runners_started: u64,
    pub runners_committed: u64,
    pub runners_aborted: u64,
    /// Runners whose commit failed on a write-write conflict.
    pub runners_failed: u64,
    pub runners_faulted: u64,
    /// Write-write conflicts found at commit.
    pub conflicts: u64,
    pub watcher_activations: u64,
    /// 4 KiB pages allocated, and of those, copies of a page.
    pub pages_allocated: u64,
    pub pages_copied: u64,
    /// Old page versions freed during the run.
    pub versions_pruned: u64,
    pub peak_memory_bytes: u64,
    /// Internal errors of DVM (always 0 unless DVM has a bug).
    pub internal_errors: u64,
    /// From creating the machine to the end of the run, in milliseconds.
    pub wall_time_ms: f64,
    /// The dvm command's exit status for this run: 0 every runner ended by its own choice
    /// (commit, abort, failed commit), 1 a runner faulted, 2 an internal error.
    pub exit_code: i32,
}

/// A VM: its options, its program, the input mapped into it, and what its last run left
/// (committed memory, counters). Opaque; create with dvm_vm_create, free with dvm_vm_destroy.
pub struct dvm_vm {
    state: Mutex<State>,
}

struct State {
    options: dvm_options,
    program: Option<image::LoadedImage>,
    /// `(address, bytes, name)`, as the engine's `Config::loads`.
    inputs: Vec<(u64, vm::LoadBytes, String)>,
    console_input: Vec<u8>,
    last_run: Option<Finished>,
}

struct Finished {
    stats: dvm_stats,
    memory: vm::CommittedMemory,
}

/// A failed call: what it returns and the message it leaves.
struct Failure {
    status: dvm_status,
    message: String,
}

fn failure(status: dvm_status, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    failure(dvm_status::DVM_INVALID_ARGUMENT, message)
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Most bytes of fault reports kept for the message of DVM_PROGRAM_FAULTED; the callback gets
/// all of them.
const MAX_REPORT_BYTES: usize = 64 << 10;

/// Most workers, as the dvm command allows.
const MAX_WORKERS: u32 = 4096;

fn set_last_error(message: &str) {
    // A message quotes program output, which may hold NUL bytes; C strings cannot.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; the message is then lost, which
    // is better than a panic at the boundary.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = text);
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs an entry point's body: no panic escapes, and the thread's last error is set.
fn entry(body: impl FnOnce() -> Result<(), Failure>) -> dvm_status {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (dvm_status::DVM_OK, String::new()),
        Ok(Err(failure)) => (failure.status, failure.message),
        Err(payload) => {
            let text = format!(
                "internal error in DVM: {}; this is a bug in DVM, please report it",
                panic_text(payload.as_ref())
            );
            // Dropping a payload can itself panic; it must not unwind from here.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            (dvm_status::DVM_INTERNAL, text)
        }
    };
    set_last_error(&message);
    status
}

/// Locks the handle's state for one call.
fn with_vm<T>(
    vm: *const dvm_vm,
    body: impl FnOnce(&mut State) -> Result<T, Failure>,
) -> Result<T, Failure> {
    // SAFETY: the caller's contract (dvm.h): `vm` is NULL or a handle from dvm_vm_create not
    // yet passed to dvm_vm_destroy. NULL is refused here; shared access to a live handle is
    // sound because all its state is behind the mutex.
    let vm = unsafe { vm.as_ref() }.ok_or_else(|| invalid("vm is NULL"))?;
    let mut state: MutexGuard<'_, State> = match vm.state.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::WouldBlock) => {
            return Err(failure(
                dvm_status::DVM_BUSY,
                "the VM handle is in use by another call (another thread, or a run's callback)",
            ))
        }
        // A panic was caught mid-call; every call leaves the state consistent between its
        // steps (it replaces whole fields), so the handle stays usable.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
    };
    body(&mut state)
}

/// `len` bytes at `ptr`, checked.
///
/// # Safety
/// `ptr` is NULL or points to `len` readable bytes that stay valid and unmodified for `'a`.
unsafe fn input_bytes<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    if len > isize::MAX as usize {
        return Err(invalid(format!("{what}: length {len} exceeds PTRDIFF_MAX")));
    }
    // SAFETY: non-NULL and no longer than isize::MAX (checked above); readable for `len`
    // bytes by this function's contract, which the public functions pass on to C.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A NUL-terminated string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for `'a`.
unsafe fn input_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a CStr, Failure> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, NUL-terminated by the contract.
    Ok(unsafe { CStr::from_ptr(ptr) })
}

fn check_options(options: &dvm_options) -> Result<(), Failure> {
    if options.workers > MAX_WORKERS {
        return Err(invalid(format!(
            "options.workers = {} exceeds {MAX_WORKERS}",
            options.workers
        )));
    }
    if options.max_runners == 0 {
        return Err(invalid("options.max_runners must be at least 1"));
    }
    Ok(())
}

fn default_options() -> dvm_options {
    let config = vm::Config::default();
    dvm_options {
        workers: 0,
        pin_workers: 1,
        max_instructions: 0,
        max_memory_bytes: 0,
        max_runners: config.max_runners,
    }
}

/// Whether `addr .. addr + len` lies inside one space's shared region (where inputs go and
/// committed memory is read).
fn inside_shared(addr: u64, len: u64) -> bool {
    use dvm_engine::view::{region_of, Region};
    if len == 0 {
        return region_of(addr) == Region::Shared;
    }
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    let shift = dvm_engine::abi::SPACE_SHIFT;
    addr >> shift == last >> shift
        && region_of(addr) == Region::Shared
        && region_of(last) == Region::Shared
}

/// Fills `*options` with the defaults: every field 0 but pin_workers = 1 and max_runners =
/// 1000000. Always start from this, so that fields added later get their defaults.
/// Thread-safe (touches only `*options`).
///
/// Returns DVM_INVALID_ARGUMENT if `options` is NULL.
#[no_mangle]
pub extern "C" fn dvm_options_init(options: *mut dvm_options) -> dvm_status {
    entry(|| {
        // SAFETY: NULL or a writable dvm_options by the contract; NULL is refused.
        let options = unsafe { options.as_mut() }.ok_or_else(|| invalid("options is NULL"))?;
        *options = default_options();
        Ok(())
    })
}

/// Creates a VM with `options` (NULL: the defaults of dvm_options_init) and stores it in
/// `*out` (NULL on failure). The options are copied. Creating the VM reserves no memory and
/// starts no thread: a run does, and ends them before it returns. Thread-safe.
///
/// Returns DVM_INVALID_ARGUMENT if `out` is NULL or an option is out of range.
#[no_mangle]
pub extern "C" fn dvm_vm_create(options: *const dvm_options, out: *mut *mut dvm_vm) -> dvm_status {
    entry(|| {
        // SAFETY: NULL or a writable pointer slot by the contract; NULL is refused.
        let out = unsafe { out.as_mut() }.ok_or_else(|| invalid("out is NULL"))?;
        *out = std::ptr::null_mut();
        // SAFETY: NULL or a readable dvm_options by the contract; NULL means the defaults.
        let options = match unsafe { options.as_ref() } {
            Some(options) => *options,
            None => default_options(),
        };
        check_options(&options)?;
        let vm = Box::new(dvm_vm {
            state: Mutex::new(State {
                options,
                program: None,
                inputs: Vec::new(),
                console_input: Vec::new(),
                last_run: None,
            }),
        });
        *out = Box::into_raw(vm);
        Ok(())
    })
}

/// Frees a VM and everything it holds (program, inputs, the last run's memory). NULL is
/// ignored. Not thread-safe with respect to `vm`: no other call on `vm` may be in progress or
/// follow. Never fails (the thread's last error is left unchanged).
#[no_mangle]
pub extern "C" fn dvm_vm_destroy(vm: *mut dvm_vm) {
    if vm.is_null() {
        return;
    }
    // SAFETY: a handle from dvm_vm_create (Box::into_raw) not destroyed before, with no call
    // in progress on it: the contract above. Ownership returns to Rust exactly once.
    let vm = unsafe { Box::from_raw(vm) };
    // Dropping frees page memory only; should anything in it panic, it must not unwind into C.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(vm)));
}

fn read_path(path: *const c_char, what: &str) -> Result<(String, Vec<u8>), Failure> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: NULL or a NUL-terminated string by the contract of the calling function.
    let path = unsafe { input_str(path, what) }?;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path.to_bytes()));
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| {
        failure(
            dvm_status::DVM_IO,
            format!("cannot read {what} `{name}`: {err}"),
        )
    })?;
    Ok((name, bytes))
}

fn load_image(name: &str, bytes: &[u8]) -> Result<image::LoadedImage, Failure> {
    image::load(bytes).map_err(|err| failure(dvm_status::DVM_IMAGE, format!("{name}: {err}")))
}

/// Loads a program image (flat or ELF, as `dvm asm` writes) from the file at `path` (a
/// NUL-terminated path) and makes it the VM's program, replacing any previous one. The image
/// is validated and decoded here, once. Inputs mapped earlier stay. One thread at a time per
/// handle.
///
/// Returns DVM_IO if the file cannot be read, DVM_IMAGE if it is not a valid image (the
/// message names the byte offset).
#[no_mangle]
pub extern "C" fn dvm_load_image_file(vm: *mut dvm_vm, path: *const c_char) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            let (name, bytes) = read_path(path, "image")?;
            state.program = Some(load_image(&name, &bytes)?);
            Ok(())
        })
    })
}

/// Loads a program image from `len` bytes at `bytes` (copied; the buffer may be freed when
/// the call returns), as dvm_load_image_file does. One thread at a time per handle.
///
/// Returns DVM_INVALID_ARGUMENT if `bytes` is NULL, DVM_IMAGE if they are not a valid image.
#[no_mangle]
pub extern "C" fn dvm_load_image_bytes(
    vm: *mut dvm_vm,
    bytes: *const u8,
    len: usize,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            // SAFETY: the caller passes `len` readable bytes (dvm.h); they are read here only.
            let bytes = unsafe { input_bytes(bytes, len, "bytes") }?;
            state.program = Some(load_image("image bytes", bytes)?);
            Ok(())
        })
    })
}

/// Assembles `len` bytes of `.dasm` text at `source` (UTF-8, need not be NUL-terminated) and
/// makes the result the VM's program, replacing any previous one. `name` (NUL-terminated, or
/// NULL for "<source>") names the text in error messages. One thread at a time per handle.
///
/// Returns DVM_ASSEMBLE if the text has errors: the message starts with the first as
/// `NAME:LINE:COLUMN: message`, then lists every error (up to 50) with its source line, as the
/// dvm command prints them. DVM_IMAGE if the assembled program does not validate.
#[no_mangle]
pub extern "C" fn dvm_assemble(
    vm: *mut dvm_vm,
    name: *const c_char,
    source: *const c_char,
    len: usize,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            let name = if name.is_null() {
                "<source>".to_string()
            } else {
                // SAFETY: non-NULL, NUL-terminated by the contract.
                unsafe { input_str(name, "name") }?
                    .to_string_lossy()
                    .into_owned()
            };
            // SAFETY: `len` readable bytes by the contract; read here only.
            let bytes = unsafe { input_bytes(source.cast::<u8>(), len, "source") }?;
            let text = std::str::from_utf8(bytes).map_err(|err| {
                failure(
                    dvm_status::DVM_ASSEMBLE,
                    format!(
                        "{name}: not UTF-8 text (invalid byte at offset {})",
                        err.valid_up_to()
                    ),
                )
            })?;
            let image = asm::assemble(&name, text).map_err(|errors| {
                let first = errors.diagnostics.first().map_or_else(String::new, |d| {
                    format!("{}:{}:{}: {}\n", d.file, d.line, d.column, d.message)
                });
                failure(dvm_status::DVM_ASSEMBLE, format!("{first}{errors}"))
            })?;
            let loaded = image::validate(image::Format::Elf, image)
                .map_err(|err| failure(dvm_status::DVM_IMAGE, format!("{name}: {err}")))?;
            state.program = Some(loaded);
            Ok(())
        })
    })
}

/// Maps `len` bytes at `bytes` (copied) into shared memory at `addr` for the runs that follow,
/// as the dvm command's `--load FILE@ADDR`: the root runner's snapshot and every later one
/// sees them as committed before the run. Call it several times for several inputs; they stay
/// mapped for every later run until dvm_clear_inputs. One thread at a time per handle.
///
/// Returns DVM_INVALID_ARGUMENT if `bytes` is NULL or the range does not lie inside one
/// space's shared region (0x800000000 .. 0x100000000000). An input that overlaps the program
/// image, or inputs that exceed max_memory_bytes, make dvm_run fail with
/// DVM_INVALID_ARGUMENT or DVM_RUN.
#[no_mangle]
pub extern "C" fn dvm_map_input(
    vm: *mut dvm_vm,
    addr: u64,
    bytes: *const u8,
    len: usize,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            // SAFETY: `len` readable bytes by the contract; copied here.
            let bytes = unsafe { input_bytes(bytes, len, "bytes") }?;
            if !inside_shared(addr, len as u64) {
                return Err(invalid(format!(
                    "input of {len} bytes at {addr:#x} does not lie inside the shared region \
                     (0x800000000..0x100000000000 of a space)"
                )));
            }
            let name = format!(
                "input {} ({len} bytes at {addr:#x})",
                state.inputs.len() + 1
            );
            state.inputs.push((addr, bytes.to_vec().into(), name));
            Ok(())
        })
    })
}

/// Forgets every input mapped with dvm_map_input. One thread at a time per handle.
#[no_mangle]
pub extern "C" fn dvm_clear_inputs(vm: *mut dvm_vm) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            state.inputs = Vec::new();
            Ok(())
        })
    })
}

/// Sets what the program reads from the console (a u64 load of the console word) in the runs
/// that follow: `len` bytes at `bytes`, copied, then end of input. By default the console
/// input is empty: a VM never reads the process's stdin. One thread at a time per handle.
///
/// Returns DVM_INVALID_ARGUMENT if `bytes` is NULL.
#[no_mangle]
pub extern "C" fn dvm_set_console_input(
    vm: *mut dvm_vm,
    bytes: *const u8,
    len: usize,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            // SAFETY: `len` readable bytes by the contract; copied here.
            let bytes = unsafe { input_bytes(bytes, len, "bytes") }?;
            state.console_input = bytes.to_vec();
            Ok(())
        })
    })
}

/// The C callback and its user data, carried to the console thread.
#[derive(Clone, Copy)]
struct Callback {
    function: unsafe extern "C" fn(dvm_stream, *const u8, usize, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: dvm_output_fn's documented contract: the callback is called from a thread DVM owns,
// one call at a time, all before dvm_run returns, and the caller accepts that for `user_data`
// (it is only passed back, never dereferenced by DVM).
unsafe impl Send for Callback {}
// SAFETY: as for Send: calls never overlap (the console has one writer thread).
unsafe impl Sync for Callback {}

/// Keeps the start of the stderr stream for the fault message, up to MAX_REPORT_BYTES.
#[derive(Default)]
struct ReportTail {
    bytes: Vec<u8>,
    truncated: bool,
}

fn output_sink(callback: Option<Callback>, reports: Arc<Mutex<ReportTail>>) -> vm::OutputSink {
    vm::OutputSink(Arc::new(move |stream: vm::Stream, bytes: &[u8]| {
        if stream == vm::Stream::Stderr {
            let mut tail = reports
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let room = MAX_REPORT_BYTES.saturating_sub(tail.bytes.len());
            tail.truncated |= bytes.len() > room;
            tail.bytes
                .extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
        match callback {
            Some(Callback {
                function,
                user_data,
            }) => {
                let stream = match stream {
                    vm::Stream::Stdout => dvm_stream::DVM_STREAM_STDOUT,
                    vm::Stream::Stderr => dvm_stream::DVM_STREAM_STDERR,
                };
                // SAFETY: a function pointer the caller gave dvm_run with this contract
                // (dvm_output_fn): it takes `len` bytes valid for the call, and its user data.
                unsafe { function(stream, bytes.as_ptr(), bytes.len(), user_data) }
            }
            None => {
                use std::io::Write;
                // As the dvm command does; a closed stream loses the output, nothing more.
                let _ = match stream {
                    vm::Stream::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(bytes).and_then(|()| out.flush())
                    }
                    vm::Stream::Stderr => std::io::stderr().lock().write_all(bytes),
                };
            }
        }
    }))
}

fn stats_of(report: &vm::Report) -> dvm_stats {
    let s = &report.stats;
    dvm_stats {
        workers: s.workers,
        instructions: s.instructions,
        runners_started: s.runners_started,
        runners_committed: s.runners_committed,
        runners_aborted: s.runners_aborted,
        runners_failed: s.runners_failed,
        runners_faulted: s.runners_faulted,
        conflicts: s.conflicts,
        watcher_activations: s.watcher_activations,
        pages_allocated: s.pages_allocated,
        pages_copied: s.pages_copied,
        versions_pruned: s.versions_pruned,
        peak_memory_bytes: s.peak_memory_bytes,
        internal_errors: report.internal_errors,
        wall_time_ms: s.wall_time_ms,
        exit_code: i32::from(report.exit_code()),
    }
}

/// The engine's run errors, worded for the C API (the engine names the `dvm run` options).
fn run_error(err: vm::RunError) -> Failure {
    match err {
        vm::RunError::LoadOutsideShared { name, .. } => invalid(format!(
            "{name} does not fit inside the shared region (0x800000000..0x100000000000 of a space)"
        )),
        vm::RunError::LoadOverlapsImage { name, .. } => {
            invalid(format!("{name} overlaps the program image"))
        }
        vm::RunError::InitialMemoryLimit { limit_bytes } => failure(
            dvm_status::DVM_RUN,
            format!(
                "the program image and the mapped inputs do not fit in max_memory_bytes \
                 ({limit_bytes} bytes)"
            ),
        ),
        other => failure(dvm_status::DVM_RUN, other.to_string()),
    }
}

/// Runs the program to completion: the root runner, every runner it starts, until none is
/// left. Console output goes to `callback` with `user_data` as it is produced (see
/// dvm_output_fn); with a NULL callback it goes to the process's stdout and stderr, as the dvm
/// command prints it. Every thread the run starts has ended when dvm_run returns. The run
/// starts from the program and the mapped inputs each time; the previous run's memory and
/// counters are dropped when it starts. One thread at a time per handle: for the whole run,
/// other calls on `vm` return DVM_BUSY. Distinct handles may run at the same time.
///
/// Returns DVM_OK when every runner ended by its own choice (commit, abort, or a commit that
/// failed on a conflict). DVM_PROGRAM_FAULTED when a runner faulted: the message holds the
/// engine's fault reports (also given to the callback on DVM_STREAM_STDERR); the memory and
/// counters are readable as after DVM_OK. DVM_STATE if no program was given; DVM_RUN or
/// DVM_INVALID_ARGUMENT if the run could not start (nothing is then readable); DVM_INTERNAL on
/// a bug in DVM.
#[no_mangle]
pub extern "C" fn dvm_run(
    vm: *mut dvm_vm,
    callback: dvm_output_fn,
    user_data: *mut c_void,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            let program = state.program.clone().ok_or_else(|| {
                failure(
                    dvm_status::DVM_STATE,
                    "no program: call dvm_load_image_file, dvm_load_image_bytes or dvm_assemble first",
                )
            })?;
            // The last run's pages go before this run allocates its own.
            state.last_run = None;
            let options = state.options;
            let reports = Arc::new(Mutex::new(ReportTail::default()));
            let callback = callback.map(|function| Callback {
                function,
                user_data,
            });
            let mut config = vm::Config {
                workers: (options.workers > 0).then_some(options.workers as usize),
                pin_workers: options.pin_workers != 0,
                max_instructions: match options.max_instructions {
                    0 => u64::MAX,
                    limit => limit,
                },
                max_runners: options.max_runners,
                loads: state.inputs.clone(),
                output: vm::OutputMode::Callback(output_sink(callback, Arc::clone(&reports))),
                input: vm::InputMode::Bytes(state.console_input.clone()),
                ..vm::Config::default()
            };
            if options.max_memory_bytes > 0 {
                config.max_memory_bytes = options.max_memory_bytes;
            }
            let (report, memory) = vm::run_keeping(program, config).map_err(run_error)?;
            let stats = stats_of(&report);
            state.last_run = Some(Finished { stats, memory });
            match report.exit_code() {
                0 => Ok(()),
                code => {
                    let tail = reports
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    let s = &report.stats;
                    let mut message = format!(
                        "{} runner(s) faulted ({} started: {} committed, {} aborted, {} failed to commit)",
                        s.runners_faulted,
                        s.runners_started,
                        s.runners_committed,
                        s.runners_aborted,
                        s.runners_failed
                    );
                    if !tail.bytes.is_empty() {
                        message.push('\n');
                        message.push_str(&String::from_utf8_lossy(&tail.bytes));
                        if tail.truncated {
                            message.push_str("\n(further reports were given to the callback only)");
                        }
                    }
                    let message = message.trim_end().to_string();
                    if code == 1 {
                        Err(failure(dvm_status::DVM_PROGRAM_FAULTED, message))
                    } else {
                        Err(failure(
                            dvm_status::DVM_INTERNAL,
                            format!(
                                "DVM hit {} internal error(s), a bug in DVM; please report it. {message}",
                                report.internal_errors
                            ),
                        ))
                    }
                }
            }
        })
    })
}

/// Copies `len` bytes of the last run's committed shared memory, from `addr` on, into `buf`:
/// the newest committed value of every byte (what a runner starting after the run would see;
/// zeros where nothing was ever written). Private memory ends with its runner and cannot be
/// read. One thread at a time per handle.
///
/// Returns DVM_INVALID_ARGUMENT if `buf` is NULL or the range is not inside one space's
/// shared region (0x800000000 .. 0x100000000000 of a space); DVM_STATE if no run has finished
/// (after DVM_OK or DVM_PROGRAM_FAULTED) since the VM was created.
#[no_mangle]
pub extern "C" fn dvm_read_memory(
    vm: *mut dvm_vm,
    addr: u64,
    buf: *mut u8,
    len: usize,
) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            let finished = state.last_run.as_ref().ok_or_else(|| {
                failure(
                    dvm_status::DVM_STATE,
                    "no run has finished: call dvm_run first",
                )
            })?;
            if buf.is_null() {
                return Err(invalid("buf is NULL"));
            }
            if len > isize::MAX as usize {
                return Err(invalid(format!("length {len} exceeds PTRDIFF_MAX")));
            }
            // SAFETY: non-NULL, at most isize::MAX, and `len` writable bytes by the contract
            // (dvm.h); written here only, while the call lasts.
            let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
            finished
                .memory
                .read(addr, out)
                .map_err(|err| invalid(err.to_string()))
        })
    })
}

/// Stores the last finished run's counters and exit code in `*out`. One thread at a time per
/// handle.
///
/// Returns DVM_INVALID_ARGUMENT if `out` is NULL, DVM_STATE if no run has finished.
#[no_mangle]
pub extern "C" fn dvm_get_stats(vm: *mut dvm_vm, out: *mut dvm_stats) -> dvm_status {
    entry(|| {
        with_vm(vm, |state| {
            let finished = state.last_run.as_ref().ok_or_else(|| {
                failure(
                    dvm_status::DVM_STATE,
                    "no run has finished: call dvm_run first",
                )
            })?;
            // SAFETY: NULL or a writable dvm_stats by the contract; NULL is refused.
            let out = unsafe { out.as_mut() }.ok_or_else(|| invalid("out is NULL"))?;
            *out = finished.stats;
            Ok(())
        })
    })
}

/// The message of the last call on this thread that returned a dvm_status: the empty string
/// after DVM_OK, the reason otherwise (possibly several lines; UTF-8). Never NULL. The string
/// belongs to DVM and stays valid until the next dvm_ call on the same thread; copy it to keep
/// it. Thread-safe: each thread has its own.
#[no_mangle]
pub extern "C" fn dvm_last_error_message() -> *const c_char {
    static EMPTY: &CStr = c"";
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(EMPTY.as_ptr())
    })
    .unwrap_or(EMPTY.as_ptr())
}

/// The name of a status code ("DVM_OK", "DVM_PROGRAM_FAULTED", ...), or "DVM_UNKNOWN_STATUS"
/// for a value that is none of them. A static string; never NULL. Thread-safe.
#[no_mangle]
pub extern "C" fn dvm_status_name(status: c_int) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"DVM_OK",
        1 => c"DVM_INVALID_ARGUMENT",
        2 => c"DVM_IO",
        3 => c"DVM_ASSEMBLE",
        4 => c"DVM_IMAGE",
        5 => c"DVM_RUN",
        6 => c"DVM_PROGRAM_FAULTED",
        7 => c"DVM_INTERNAL",
        8 => c"DVM_STATE",
        9 => c"DVM_BUSY",
        _ => c"DVM_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

/// DVM's version, as "MAJOR.MINOR.PATCH". A static string; never NULL. Thread-safe.
#[no_mangle]
pub extern "C" fn dvm_version() -> *const c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn last_error() -> String {
        // SAFETY: dvm_last_error_message never returns NULL and its string lives until the
        // next call on this thread.
        unsafe { CStr::from_ptr(dvm_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    }

    fn vm_with(source: &str) -> *mut dvm_vm {
        let mut options = default_options();
        options.workers = 1;
        options.pin_workers = 0;
        options.max_memory_bytes = 256 << 20;
        let mut vm = std::ptr::null_mut();
        assert_eq!(dvm_vm_create(&options, &mut vm), dvm_status::DVM_OK);
        let status = dvm_assemble(vm, std::ptr::null(), source.as_ptr().cast(), source.len());
        assert_eq!(status, dvm_status::DVM_OK, "{}", last_error());
        vm
    }

    #[test]
    fn a_panic_in_an_entry_point_is_dvm_internal_with_its_message() {
        let status = entry(|| panic!("a test panic"));
        assert_eq!(status, dvm_status::DVM_INTERNAL);
        assert!(last_error().contains("a test panic"), "{}", last_error());
        assert_eq!(entry(|| Ok(())), dvm_status::DVM_OK);
        assert_eq!(last_error(), "", "DVM_OK clears the message");
    }

    #[test]
    fn messages_are_per_thread() {
        assert_eq!(
            dvm_options_init(std::ptr::null_mut()),
            dvm_status::DVM_INVALID_ARGUMENT
        );
        let other = std::thread::spawn(|| {
            assert_eq!(entry(|| Ok(())), dvm_status::DVM_OK);
            last_error()
        })
        .join()
        .expect("the other thread");
        assert_eq!(other, "");
        assert!(last_error().contains("options is NULL"), "{}", last_error());
    }

    #[test]
    fn distinct_handles_run_at_the_same_time() {
        let results: Vec<u64> = std::thread::scope(|scope| {
            let runs: Vec<_> = (1..=3u64)
                .map(|value| {
                    scope.spawn(move || {
                        let source =
                            format!("main:\n    mov ${value}:ue, 0x4000000000:ue\n    exit:c\n");
                        let vm = vm_with(&source);
                        let status = dvm_run(vm, None, std::ptr::null_mut());
                        assert_eq!(status, dvm_status::DVM_OK, "{}", last_error());
                        let mut word = [0u8; 8];
                        let status = dvm_read_memory(vm, 0x40_0000_0000, word.as_mut_ptr(), 8);
                        assert_eq!(status, dvm_status::DVM_OK, "{}", last_error());
                        dvm_vm_destroy(vm);
                        u64::from_le_bytes(word)
                    })
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a run thread"))
                .collect()
        });
        assert_eq!(results, vec![1, 2, 3]);
    }

    struct Gate {
        entered: Barrier,
        release: Barrier,
    }

    unsafe extern "C" fn wait_at_gate(
        _stream: dvm_stream,
        _bytes: *const u8,
        _len: usize,
        user_data: *mut c_void,
    ) {
        // SAFETY: the test passes a `Gate` that outlives the run.
        let gate = unsafe { &*user_data.cast::<Gate>() };
        gate.entered.wait();
        gate.release.wait();
    }

    /// A handle in a run on one thread is refused to another, which does not wait.
    #[test]
    fn a_handle_in_use_is_busy_for_other_threads() {
        let vm = vm_with("main:\n    mov $65:ue, 0x100000208:ue\n    exit:c\n");
        let gate = Gate {
            entered: Barrier::new(2),
            release: Barrier::new(2),
        };
        let vm_addr = vm as usize;
        std::thread::scope(|scope| {
            let gate = &gate;
            let run = scope.spawn(move || {
                let user_data = gate as *const Gate as *mut c_void;
                dvm_run(vm_addr as *mut dvm_vm, Some(wait_at_gate), user_data)
            });
            gate.entered.wait();
            let mut stats = dvm_stats::default();
            assert_eq!(dvm_get_stats(vm, &mut stats), dvm_status::DVM_BUSY);
            assert!(last_error().contains("in use"), "{}", last_error());
            gate.release.wait();
            assert_eq!(run.join().expect("the run"), dvm_status::DVM_OK);
        });
        let mut stats = dvm_stats::default();
        assert_eq!(dvm_get_stats(vm, &mut stats), dvm_status::DVM_OK);
        assert_eq!(stats.runners_committed, 1);
        dvm_vm_destroy(vm);
    }
}
