//! dvm-jit: compiles a DISA program's hot loops to native code with Cranelift.
//!
//! Why a crate of its own: it is the only place besides the TLB, the transport, `numa` and
//! `ffi` that emits or calls native code, and the engine stays `deny(unsafe_code)` and free of
//! a code generator. The engine defines the hook (`dvm_engine::interp::Jit`): at every loop
//! header the interpreter asks it whether there is native code from that instruction on, and
//! lends it the runner's TLB and instruction count. This crate implements the hook: it counts
//! the entries of each loop header (shared by every runner and worker of the run), compiles a
//! header's region once when the count reaches the threshold (`codegen`), keeps the code for
//! the whole run (immutable, never invalidated: `emit::Arena` owns it), and calls it. With
//! `background`, a compiler thread of the run compiles while the runners keep interpreting.
//!
//! Exactness: compiled code does only what the interpreter's fast path does, through the same
//! TLB; everything else (a miss, a fault, an instruction it does not compile, the count
//! reaching a check point) returns to the interpreter at that instruction before any of its
//! effects, so outputs, outcomes, fault reports and instruction counts are the interpreter's.
//! `--jit off` and `--jit on` are compared by the differential tests in `tests/`.
//!
//! `unsafe` lives only in `emit` (the module that turns IR into machine code and calls it).

mod codegen;
mod emit;
mod loops;

use dvm_engine::interp::Jit;
use dvm_engine::interp::Program;
use dvm_engine::native::{NativeExit, NativeState};
use dvm_perf::profile::Symbols;
use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

pub use codegen::{region_end, supported, HandBack, HAND_BACK_REASONS, MAX_REGION};

#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error("cannot set up the JIT: {0}")]
    Setup(String),
    #[error("cannot compile a region: {0}")]
    Compile(String),
}

/// How the JIT runs.
#[derive(Clone, Debug)]
pub struct JitOptions {
    /// Entries of a loop header before its region is compiled (1: at the first entry).
    pub threshold: u32,
    /// Append a line per compiled region to `/tmp/perf-<pid>.map` (for `perf`).
    pub perf_map: bool,
    /// The program's local labels (`(name, address)`; an image has none, its source does), so
    /// perf map entries name loops as profiles do (`partition/.Lcoord`).
    pub local_labels: Vec<(String, u64)>,
    /// Compile on a thread of the JIT's own while the runner that found the loop hot keeps
    /// interpreting it (off the critical path: a second core compiles); else that runner
    /// compiles before going on, so the code runs from exactly the threshold's entry on (what
    /// tests that count native instructions need).
    pub background: bool,
}

impl Default for JitOptions {
    fn default() -> Self {
        JitOptions {
            threshold: DEFAULT_THRESHOLD,
            perf_map: true,
            local_labels: Vec::new(),
            background: false,
        }
    }
}

/// Loop entries before compiling, by default. A region takes 0.3-2 ms to compile; a thousand
/// entries of a loop take some 10-100 us to interpret: so a loop run a few hundred times (a
/// spawn loop, a planner's sums) is not worth its compilation, while every loop that does real
/// work is compiled within its first per mille (sort: 14 regions instead of 23, 17 ms of
/// compilation instead of 27, the same share of native instructions).
pub const DEFAULT_THRESHOLD: u32 = 1000;

/// What the JIT did during a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JitStats {
    pub regions: u64,
    /// Instructions in compiled regions.
    pub region_instructions: u64,
    pub compile_ns: u64,
    /// Instructions executed by native code (the rest were interpreted).
    pub native_instructions: u64,
    /// Regions that could not be compiled (their loops stay interpreted).
    pub failures: u64,
    /// Calls of native code, and why each handed back (`HandBack` order: left the region,
    /// count check, miss or fault, entry refused).
    pub calls: u64,
    pub hand_backs: [u64; HAND_BACK_REASONS],
}

#[derive(Default)]
struct Slot {
    entries: AtomicU32,
    code: OnceLock<Option<emit::Entry>>,
    /// Calls in a row that handed back at the entry without running anything (the header's
    /// first access misses the TLB each time, e.g. a pointer into a page the view only
    /// partly allows, which it never caches), and entries still to leave to the interpreter
    /// after `BACK_OFF_AFTER` of them. Plain loads and stores: a race only moves a heuristic.
    misses: AtomicU32,
    skip: AtomicU32,
    /// Handed to the compiler thread (`background`); its code is set when compiled.
    queued: AtomicBool,
}

/// Calls that make no progress in a row before a header is left to the interpreter for
/// `BACK_OFF` entries: each such call costs the entry of native code and its counting for
/// nothing (k-means: 5 million calls per run, 9% of its time, at the edge pages of the
/// partitions' slices).
const BACK_OFF_AFTER: u32 = 8;
const BACK_OFF: u32 = 64;

/// The JIT of one run: create one per program run and hand it to `vm::Config::jit`.
pub struct DvmJit {
    shared: Arc<Shared>,
    /// The compiler thread's queue of loop headers (`background`), started at the first
    /// header that gets hot; the thread ends when this is dropped. `None` inside: the thread
    /// could not be started, so headers compile where they get hot.
    queue: OnceLock<Option<mpsc::Sender<usize>>>,
}

/// What the runners and the compiler thread share.
struct Shared {
    options: JitOptions,
    /// One slot per instruction, made at the first call (when the program is known).
    slots: OnceLock<Vec<Slot>>,
    /// Owns all compiled code; `None` if the JIT could not be set up (everything interprets).
    arena: Mutex<Option<emit::Arena>>,
    regions: AtomicU64,
    region_instructions: AtomicU64,
    compile_ns: AtomicU64,
    native_instructions: AtomicU64,
    failures: AtomicU64,
    hand_backs: [AtomicU64; HAND_BACK_REASONS],
    /// The last compilation error, for `--stats`.
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for DvmJit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DvmJit")
            .field("options", &self.shared.options)
            .field("stats", &self.stats())
            .finish()
    }
}

impl DvmJit {
    pub fn new(options: JitOptions) -> Result<DvmJit, JitError> {
        let shared = Shared {
            options,
            slots: OnceLock::new(),
            arena: Mutex::new(Some(emit::Arena::new()?)),
            regions: AtomicU64::new(0),
            region_instructions: AtomicU64::new(0),
            compile_ns: AtomicU64::new(0),
            native_instructions: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            hand_backs: Default::default(),
            last_error: Mutex::new(None),
        };
        Ok(DvmJit {
            shared: Arc::new(shared),
            queue: OnceLock::new(),
        })
    }

    pub fn stats(&self) -> JitStats {
        self.shared.stats()
    }

    /// Why the last region that failed to compile failed.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error()
    }

    /// Asks the compiler thread for header `index`'s code, starting the thread first if this
    /// is the run's first; false if there is no thread (the caller compiles).
    fn enqueue(&self, program: &Program, index: usize) -> bool {
        let queue = self.queue.get_or_init(|| {
            let (send, receive) = mpsc::channel::<usize>();
            let shared = Arc::clone(&self.shared);
            // The thread decodes its own copy of the image: `Program` is the engine's and
            // lives only as long as the run, while the thread may still finish a compilation.
            let image = program.image.clone();
            std::thread::Builder::new()
                .name("dvm-jit".to_string())
                .spawn(move || {
                    let program = Program::new(image);
                    for index in receive {
                        let Some(slot) = shared.slots.get().and_then(|slots| slots.get(index))
                        else {
                            continue;
                        };
                        slot.code.get_or_init(|| shared.compile(&program, index));
                    }
                })
                .ok()
                .map(|_| send)
        });
        // No thread, or one that is gone: the caller compiles.
        queue.as_ref().is_some_and(|send| send.send(index).is_ok())
    }
}

impl Shared {
    fn stats(&self) -> JitStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        JitStats {
            regions: get(&self.regions),
            region_instructions: get(&self.region_instructions),
            compile_ns: get(&self.compile_ns),
            native_instructions: get(&self.native_instructions),
            failures: get(&self.failures),
            calls: self.hand_backs.iter().map(get).sum(),
            hand_backs: std::array::from_fn(|reason| get(&self.hand_backs[reason])),
        }
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|error| error.clone())
    }

    fn compile(&self, program: &Program, start: usize) -> Option<emit::Entry> {
        let end = codegen::region_end(program, start);
        if end == start {
            return None;
        }
        let began = Instant::now();
        let name = format!(
            "dvm:{}",
            region_name(program, &self.options.local_labels, start)
        );
        let compiled = {
            let mut arena = self.arena.lock().ok()?;
            arena.as_mut()?.compile(program, start, end, &name)
        };
        let took = began.elapsed();
        self.compile_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        match compiled {
            Ok((entry, name)) => {
                tracing::debug!(
                    region = %name,
                    instructions = end - start,
                    bytes = entry.size,
                    compile_us = took.as_micros() as u64,
                    "compiled"
                );
                self.regions.fetch_add(1, Ordering::Relaxed);
                self.region_instructions
                    .fetch_add((end - start) as u64, Ordering::Relaxed);
                if self.options.perf_map {
                    write_perf_map(&entry, &name);
                }
                Some(entry)
            }
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(err.to_string());
                }
                None
            }
        }
    }
}

/// A region's name in profiles: its DISA function and local label, as `dvm profile` names
/// frames (`partition/.Lcoord`), else the function and offset.
pub fn region_name(program: &Program, local_labels: &[(String, u64)], start: usize) -> String {
    let addr = program.code().get(start).map_or(0, |d| d.addr);
    let symbols = Symbols::new(
        "",
        program
            .image
            .image
            .symbols
            .iter()
            .map(|symbol| (symbol.name.clone(), symbol.addr))
            .chain(local_labels.iter().cloned()),
    );
    match (symbols.function(addr), symbols.label(addr)) {
        (Some((function, _)), Some((label, 0))) => format!("{function}/{label}"),
        (Some((function, _)), Some((label, off))) => format!("{function}/{label}+{off:#x}"),
        (Some((function, 0)), None) => function.to_string(),
        (Some((function, off)), None) => format!("{function}+{off:#x}"),
        (None, _) => format!("{addr:#x}"),
    }
}

/// The perf map of this process (`perf` reads it to name JIT code).
pub fn perf_map_path() -> String {
    format!("/tmp/perf-{}.map", std::process::id())
}

/// Whether this process has written its perf map yet; held while writing, so lines of regions
/// compiled on different threads neither interleave nor fall before the truncation.
static PERF_MAP_STARTED: Mutex<bool> = Mutex::new(false);

/// Best effort: a profile without names is still a profile, so a failure to write is ignored.
/// The first write of the process truncates the file: a map left by an earlier process with
/// the same pid would otherwise name this one's code.
fn write_perf_map(entry: &emit::Entry, name: &str) {
    let line = format!("{:x} {:x} {name}\n", entry.start, entry.size.max(1));
    let mut started = PERF_MAP_STARTED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    if *started {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    if let Ok(mut file) = options.open(perf_map_path()) {
        *started = true;
        let _ = file.write_all(line.as_bytes());
    }
}

impl Jit for DvmJit {
    fn run(
        &self,
        program: &Program,
        index: usize,
        state: &mut NativeState<'_>,
    ) -> Option<NativeExit> {
        let code = program.code();
        let jit = &*self.shared;
        let slots = jit
            .slots
            .get_or_init(|| (0..code.len()).map(|_| Slot::default()).collect());
        let slot = slots.get(index)?;
        let entry = match slot.code.get() {
            Some(entry) => (*entry)?,
            None => {
                let seen = slot
                    .entries
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                if seen < jit.options.threshold {
                    return None;
                }
                if jit.options.background {
                    // Once: the thread sets the code; until then this header interprets. (A
                    // load first: every entry until then would otherwise write the line.)
                    let queued = slot.queued.load(Ordering::Relaxed)
                        || slot.queued.swap(true, Ordering::Relaxed);
                    if queued || self.enqueue(program, index) {
                        return None;
                    }
                }
                (*slot.code.get_or_init(|| jit.compile(program, index)))?
            }
        };
        let skip = slot.skip.load(Ordering::Relaxed);
        if skip > 0 {
            slot.skip.store(skip - 1, Ordering::Relaxed);
            return None;
        }
        let before = state.instructions;
        let (next, counted, reason) = entry.call(state);
        if let Some(counter) = jit.hand_backs.get(reason as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let misses = slot.misses.load(Ordering::Relaxed);
        if next == index && counted && state.instructions == before {
            if misses + 1 >= BACK_OFF_AFTER {
                slot.skip.store(BACK_OFF, Ordering::Relaxed);
                slot.misses.store(0, Ordering::Relaxed);
            } else {
                slot.misses.store(misses + 1, Ordering::Relaxed);
            }
            // Nothing ran natively.
        } else {
            if misses > 0 {
                slot.misses.store(0, Ordering::Relaxed);
            }
            // Instructions run natively: the entered run (counted by the interpreter) and
            // every run native code counted, less what it counted but handed back.
            let run_len = |at: usize| code.get(at).map_or(0, |d| u64::from(d.run_len()));
            let handed_back = if counted { run_len(next) } else { 0 };
            let native =
                (run_len(index) + (state.instructions - before)).saturating_sub(handed_back);
            jit.native_instructions.fetch_add(native, Ordering::Relaxed);
        }
        Some(NativeExit {
            index: next.min(code.len()),
            counted,
        })
    }
}
