//! `dvm`: the front door of DVM.
//!
//! Exit codes are a contract scripts rely on: 0 success, 1 a user error (bad input, missing file,
//! a program that faulted), 2 an internal error (a bug in DVM; the message asks for a report).
//! Every subcommand returns `Result<(), Failure>` and `main` alone turns that into a code.

use clap::{Parser, Subcommand, ValueEnum};
use dvm_engine::{asm, disasm, image, isa, vm};
use dvm_transport::verbs;

mod launcher;
mod profile;
mod stats;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "dvm",
    version,
    about = "DVM: a datacenter-scale virtual machine for DISA programs",
    long_about = "DVM runs DISA programs (a 64-bit memory-to-memory instruction set) as many \
                  runners over one snapshotted memory.\n\nStart with `dvm run examples/hello.dasm`; \
                  `dvm asm`/`dvm disasm` convert between text and images.",
    after_help = "Exit codes: 0 success, 1 bad input or a failed program, 2 internal error.\n\
                  Docs: docs/DISA.md (the instruction set), README.md (getting started)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Assemble a .dasm file into an image.
    #[command(
        after_help = "Errors are reported as FILE:LINE:COLUMN with the offending text; \
                            all errors in the file are listed (up to 50)."
    )]
    Asm {
        /// Assembly source (see docs/DISA.md for the syntax).
        input: PathBuf,
        /// Output image [default: the input with the extension `.disa`].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Image format: `elf` keeps sections and symbols (used in fault reports); `flat` is
        /// the original toolchain's pure-code format (no data sections, no symbols).
        #[arg(long, value_enum, default_value_t = FormatArg::Elf)]
        format: FormatArg,
    },
    /// Disassemble an image (flat or ELF) into assembly text that reassembles to the same bytes.
    Disasm {
        /// Image file.
        image: PathBuf,
        /// Write the listing here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Run a program: an image, or a .dasm file assembled on the fly.
    #[command(
        after_help = "Program output goes to stdout; fault reports, statistics and notes go \
                            to stderr.\nExit status: 0 when every runner ended by its own choice \
                            (commit, abort, or a failed commit), 1 when a runner faulted or the \
                            input is bad, 2 on an internal error.\nLogging: DVM_LOG=info (or debug) \
                            shows placement and progress notes."
    )]
    Run(Box<RunArgs>),
    /// Show the machine as DVM sees it: NUMA nodes, cores, processors, and the worker plan.
    #[command(
        after_help = "Under mpirun, mpiexec or srun (or with --hosts/--rank) it also shows how this \
                      process would join the job: its rank, the world size, rank 0's address and \
                      where the job token comes from. Nothing is contacted."
    )]
    Topology {
        /// Show the plan for this many workers per node [default: the cores divided among the
        /// nodes on this host].
        #[arg(long)]
        workers: Option<usize>,
        /// Show the plan of `dvm run --nodes N`: which cores each local node's workers take.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
        nodes: Option<u32>,
        /// As for `dvm run`: the job's nodes as host:port,... (with --rank).
        #[arg(long, value_name = "LIST", requires = "rank")]
        hosts: Option<String>,
        /// As for `dvm run`: this process's rank in --hosts.
        #[arg(long, value_name = "R", requires = "hosts")]
        rank: Option<String>,
    },
    /// Print the instruction set table (the same table the toolchain is generated from).
    Isa,
    /// Show the RDMA devices, their ports, states, MTUs and GIDs, and the transport `dvm run`
    /// would use between nodes, and why.
    #[command(
        after_help = "Like ibv_devinfo, but about DVM's use: the GID marked `<- DVM` is the one \
                      DVM addresses peers by (IPv4-mapped, RoCE v2). Nothing is contacted."
    )]
    Transport,
    /// Read a profile (`dvm run --profile`, or `perf script` output of a host `perf record`):
    /// the widest frames, and on request a flame graph or folded stacks.
    #[command(
        after_help = "The profile is `perf script` text, so other tools read it too: \
                      inferno-collapse-perf, stackcollapse-perf.pl, speedscope, the Firefox \
                      profiler. Frames in [brackets] are DVM's own work outside the program \
                      (commit, starting runners, waiting for pages, idle) or work thrown away \
                      ([aborted attempt], [failed commit])."
    )]
    Profile(profile::ProfileArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Program: a flat or ELF image, or a .dasm source file.
    program: PathBuf,
    /// Worker threads, one pinned per core by default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    workers: Option<u64>,
    /// Print run statistics to stderr: a table, or one JSON line with --stats=json.
    #[arg(long, num_args = 0..=1, default_missing_value = "table", value_name = "FORMAT", value_parser = ["table", "json"])]
    stats: Option<String>,
    /// Map a data file into shared memory before the root runner starts (repeatable). The
    /// file is checked when the run starts and read straight into the pages: it is not held
    /// in memory twice.
    #[arg(long = "load", value_name = "FILE@ADDR")]
    loads: Vec<String>,
    /// Keep the persistent range (0x400_0000_0000..0x1000_0000_0000) in DIR between runs.
    #[arg(long, value_name = "DIR")]
    persist: Option<PathBuf>,
    /// Instructions one runner may execute before it faults [default: unlimited].
    #[arg(long, value_name = "N")]
    max_instructions: Option<u64>,
    /// Page memory the whole run may use, e.g. 512M or 4G [default: half the machine's memory].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Runners that may exist at once (queued, running, or waiting for their parent).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_runners: u64,
    /// Do not pin workers to processors.
    #[arg(long)]
    no_pin: bool,
    /// Runner ids and runtime stacks per space handed out before freed ones are reused
    /// [default: the whole areas]. For tests of reuse without millions of spawns.
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    fresh_runner_slots: Option<u64>,
    /// Run on N local processes (nodes) joined over loopback, one `dvm` each; workers per node
    /// default to the cores divided among them. Under mpirun, mpiexec or srun, `dvm run` joins
    /// the job as its rank instead (see docs/CLUSTER.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    nodes: Option<u32>,
    /// The job's nodes as host:port,... (rank 0 first), with --rank: for launchers DVM does not
    /// recognise. Every rank is given the same list.
    #[arg(long, value_name = "LIST", requires = "rank")]
    hosts: Option<String>,
    /// This process's rank in --hosts.
    #[arg(long, value_name = "R", requires = "hosts")]
    rank: Option<String>,
    /// A node silent this long (or whose connection breaks) is lost. With --replicas 2 or more
    /// the run goes on without it, unless it is node 0 or node 0 would be left with fewer than
    /// half of the nodes; otherwise the run ends, naming it. Keep it above any stall a node may
    /// see (a busy or oversubscribed host).
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    peer_timeout_ms: u64,
    /// Nodes holding each page of the shared memory: its home and N-1 backups, each with every
    /// committed version. A run survives the loss of any node but node 0 as long as each page
    /// keeps a holder; after a loss the pages it held are copied to new holders, so with the
    /// default, 2, a run survives one loss at a time down to half of the nodes. The lost
    /// node's runners run again elsewhere and the output is the same. 1 keeps one copy: less
    /// memory and traffic, and a lost node ends the run.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    replicas: u32,
    /// Joining the job fails after this long, naming the nodes that did not answer.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    connect_timeout_ms: u64,
    /// Profile the program: sample every worker's runner (DISA function, local label and call
    /// stack) or what the worker does instead, and write the samples to FILE as `perf script`
    /// text (one file for the whole run, written by node 0; read it with `dvm profile`).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Samples per second per worker with --profile.
    #[arg(long, value_name = "HZ", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=i64::from(dvm_perf::meter::MAX_HZ)))]
    profile_hz: u32,
    /// With --profile: also draw the flame graph into this SVG file.
    #[arg(long, value_name = "SVG", requires = "profile")]
    profile_svg: Option<PathBuf>,
    /// The transport between nodes: `auto` uses RDMA verbs when a device with an active port is
    /// present, TCP (io_uring) otherwise, and says why (DVM_LOG=info); `rdma` fails before any
    /// work when it cannot be had (`dvm transport` says why).
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// Compile hot loops to native code (Cranelift; docs/ENGINE.md, "The JIT"): `auto` compiles
    /// a loop once it was entered --jit-threshold times, on a compiler thread while the
    /// runners keep interpreting it, and interprets everything if the JIT cannot be set up on
    /// this host; `on` compiles it there, before running it (the same code runs from the same
    /// entry every run), and fails when the JIT cannot be set up; `off` interprets. Not used
    /// with --profile.
    #[arg(long, value_enum, default_value_t = JitArg::Auto)]
    jit: JitArg,
    /// Entries of a loop header before its loop is compiled (1: every loop, at its first
    /// entry) [default: 1000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jit_threshold: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum JitArg {
    Auto,
    On,
    Off,
}

/// The JIT a run asks for, or `None` to interpret.
fn make_jit(args: &RunArgs) -> Result<Option<Arc<dvm_jit::DvmJit>>, Failure> {
    if args.jit == JitArg::Off {
        return Ok(None);
    }
    let options = dvm_jit::JitOptions {
        threshold: args.jit_threshold.unwrap_or(dvm_jit::DEFAULT_THRESHOLD),
        perf_map: true,
        local_labels: profile::local_labels(&args.program),
        background: args.jit == JitArg::Auto,
    };
    match dvm_jit::DvmJit::new(options) {
        Ok(jit) => Ok(Some(Arc::new(jit))),
        Err(err) if args.jit == JitArg::Auto => {
            tracing::info!("{err}; interpreting");
            Ok(None)
        }
        Err(err) => Err(user(format!("--jit on: {err}"))),
    }
}

/// `--stats` rows (table) or fields (JSON) of what the JIT did.
fn jit_stats(jit: &dvm_jit::DvmJit, instructions: u64) -> (String, String) {
    let s = jit.stats();
    let share = if instructions > 0 {
        100.0 * s.native_instructions as f64 / instructions as f64
    } else {
        0.0
    };
    let compile_ms = s.compile_ns as f64 / 1e6;
    let mut table = format!(
        "  jit regions compiled    {} ({} instructions, {compile_ms:.3} ms)\n  \
         jit native instructions {} ({share:.1}% of all)\n",
        s.regions, s.region_instructions, s.native_instructions
    );
    let [left, check, miss, refused] = s.hand_backs;
    table.push_str(&format!(
        "  jit calls               {} (handed back: {left} left the region, {check} at a count \
         check, {miss} at a miss or fault, {refused} refused at entry)\n",
        s.calls
    ));
    if let Some(error) = jit.last_error() {
        table.push_str(&format!(
            "  jit failures            {} (last: {error})\n",
            s.failures
        ));
    }
    let json = format!(
        "\"jit\": {{\"regions\": {}, \"region_instructions\": {}, \"compile_ms\": {compile_ms:.3}, \
         \"native_instructions\": {}, \"native_share\": {:.4}, \"failures\": {}, \
         \"calls\": {}, \"hand_backs\": {{\"left\": {left}, \"check\": {check}, \
         \"miss\": {miss}, \"refused\": {refused}}}}}",
        s.regions,
        s.region_instructions,
        s.native_instructions,
        share / 100.0,
        s.failures,
        s.calls
    );
    (table, json)
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Auto,
    Rdma,
    Tcp,
}

impl From<TransportArg> for verbs::Preference {
    fn from(arg: TransportArg) -> Self {
        match arg {
            TransportArg::Auto => verbs::Preference::Auto,
            TransportArg::Rdma => verbs::Preference::Rdma,
            TransportArg::Tcp => verbs::Preference::Tcp,
        }
    }
}

/// `4096`, `64K`, `512M`, `4G`, `1T` (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                other => return Err(format!("unknown unit `{other}` (use K, M, G or T)")),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (like 4096, 512M, 4G)"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// A `--load FILE@ADDR`: the file is opened and measured now (so a missing or unreadable one is
/// refused before anything starts) and read straight into the pages when the run lays them out.
fn parse_load(spec: &str) -> Result<(u64, vm::LoadBytes, String), Failure> {
    let (path, addr) = spec.rsplit_once('@').ok_or_else(|| {
        user(format!(
            "--load `{spec}`: expected FILE@ADDR, like data.bin@0x4000000000"
        ))
    })?;
    let addr = parse_address(addr)
        .ok_or_else(|| user(format!("--load `{spec}`: `{addr}` is not an address")))?;
    let cannot = |err: std::io::Error| user(format!("cannot read --load file `{path}`: {err}"));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(user(format!("--load `{path}` is not a regular file")));
    }
    let bytes = vm::LoadBytes::File {
        path: Path::new(path).to_path_buf(),
        len_bytes: meta.len(),
    };
    Ok((addr, bytes, path.to_string()))
}

fn parse_address(text: &str) -> Option<u64> {
    let clean: String = text.trim().chars().filter(|c| *c != '_').collect();
    match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => clean.parse().ok(),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Flat,
    Elf,
}

impl From<FormatArg> for image::Format {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Flat => image::Format::Flat,
            FormatArg::Elf => image::Format::Elf,
        }
    }
}

/// Why a command failed. Internal errors (exit 2) are panics, caught in `main`.
enum Failure {
    /// Bad input or a failed program: the message explains; exit 1.
    User(String),
    /// A multi-node run could not start or lost a node: the message names it; exit 2.
    Cluster(String),
}

fn user(message: impl Into<String>) -> Failure {
    Failure::User(message.into())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path)
        .map_err(|err| user(format!("cannot read {what} `{}`: {err}", path.display())))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes)
        .map_err(|err| user(format!("cannot write `{}`: {err}", path.display())))
}

fn cmd_asm(input: &Path, output: Option<PathBuf>, format: FormatArg) -> Result<(), Failure> {
    let bytes = read_file(input, "assembly source")?;
    let source = String::from_utf8(bytes).map_err(|err| {
        user(format!(
            "`{}` is not UTF-8 text (invalid byte at offset {})",
            input.display(),
            err.utf8_error().valid_up_to()
        ))
    })?;
    let name = input.display().to_string();
    let image = asm::assemble(&name, &source).map_err(|errors| user(errors.to_string()))?;
    let format = image::Format::from(format);
    // Validate exactly as a later load will, so a written image always loads.
    let loaded = image::validate(format, image).map_err(|err| user(format!("{name}: {err}")))?;
    let bytes =
        image::write(&loaded.image, format).map_err(|err| user(format!("{name}: {err}")))?;
    let output = output.unwrap_or_else(|| input.with_extension("disa"));
    write_file(&output, &bytes)?;
    eprintln!(
        "assembled {name}: {} instructions, {} bytes of code, {} image `{}` ({} bytes)",
        loaded.code.len(),
        loaded.code_len_bytes(),
        format.name(),
        output.display(),
        bytes.len()
    );
    Ok(())
}

fn cmd_disasm(path: &Path, output: Option<PathBuf>) -> Result<(), Failure> {
    let bytes = read_file(path, "image")?;
    let loaded = image::load(&bytes).map_err(|err| user(format!("{}: {err}", path.display())))?;
    let text = disasm::disassemble(&loaded);
    match output {
        Some(output) => write_file(&output, text.as_bytes()),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn load_program(path: &Path) -> Result<image::LoadedImage, Failure> {
    let bytes = read_file(path, "program")?;
    let name = path.display().to_string();
    if path.extension().is_some_and(|ext| ext == "dasm") {
        let source =
            String::from_utf8(bytes).map_err(|_| user(format!("`{name}` is not UTF-8 text")))?;
        let image = asm::assemble(&name, &source).map_err(|errors| user(errors.to_string()))?;
        image::validate(image::Format::Elf, image).map_err(|err| user(format!("{name}: {err}")))
    } else {
        image::load(&bytes).map_err(|err| user(format!("{name}: {err}")))
    }
}

/// The environment variables DVM's local launcher gives its children (`launch` reads them).
const CHILD_RANK_VAR: &str = "DVM_RANK";

fn cmd_run(args: RunArgs) -> Result<u8, Failure> {
    // A transport that cannot be had is refused before anything is read or started.
    if args.transport == TransportArg::Rdma {
        verbs::choose_here(verbs::Preference::Rdma).map_err(|err| user(err.to_string()))?;
    }
    // The input is read and checked before any local node starts, so that bad input is
    // refused once, by this process, as the user's error (a node refusing it would end the
    // job as a cluster failure).
    let program = load_program(&args.program)?;
    let loads = args
        .loads
        .iter()
        .map(|spec| parse_load(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let placement = vm::Config {
        loads,
        persist_dir: args.persist.clone(),
        ..vm::Config::default()
    };
    vm::check_initial_memory(&program, &placement).map_err(|err| user(err.to_string()))?;
    let mut env = dvm_cluster::launch::process_env();
    let mut local = None;
    if let Some(nodes) = args.nodes.filter(|n| *n > 1) {
        if !env.contains_key(CHILD_RANK_VAR) {
            local = Some(launcher::start_local_nodes(nodes, &mut env)?);
        }
    }
    let (children, coordinator_socket) = match local {
        Some(local) => (local.children, Some(local.coordinator_socket)),
        None => (Vec::new(), None),
    };
    let explicit = dvm_cluster::launch::Explicit {
        hosts: args.hosts.as_deref(),
        rank: args.rank.as_deref(),
    };
    let launch =
        dvm_cluster::launch::detect(&env, &explicit, &dvm_cluster::launch::HostFacts::probe())
            .map_err(|err| {
                user(format!(
                    "cannot tell this process's place in the job: {err}"
                ))
            })?
            .filter(|launch| launch.world > 1);
    let mut lost = Vec::new();
    let result = cmd_run_on(
        args,
        launch.as_ref(),
        coordinator_socket,
        program,
        placement.loads,
        &mut lost,
    );
    launcher::wait_for(children, result.is_ok(), &lost)?;
    result
}

fn cmd_run_on(
    args: RunArgs,
    launch: Option<&dvm_cluster::launch::Launch>,
    coordinator_socket: Option<std::sync::Arc<std::net::TcpListener>>,
    program: image::LoadedImage,
    loads: Vec<(u64, vm::LoadBytes, String)>,
    lost_out: &mut Vec<u32>,
) -> Result<u8, Failure> {
    // Before any work: a profile that cannot be written is an error now, not after the run.
    let profile_out = match (&args.profile, launch.is_none_or(|l| l.rank == 0)) {
        (Some(path), true) => Some(profile::Output::create(
            path,
            args.profile_svg.as_deref(),
            &program,
            &args.program,
        )?),
        _ => None,
    };
    if launch.is_some() && args.persist.is_some() {
        return Err(user(
            "--persist works on one node only for now: the persistent range is spread over the nodes' homes",
        ));
    }
    // Nodes sharing this host share its cores.
    let default_workers = launch.map(|launch| {
        let cores = dvm_numa::Topology::detect().cores().len().max(1);
        (cores / launch.local_size.max(1) as usize).max(1)
    });
    let workers = args.workers.map(|n| n as usize).or(default_workers);
    let jit = make_jit(&args)?;
    let mut config = vm::Config {
        workers,
        first_worker_slot: launch.map_or(0, |launch| {
            launch.local_rank as usize * workers.unwrap_or(1)
        }),
        pin_workers: !args.no_pin,
        max_instructions: args.max_instructions.unwrap_or(u64::MAX),
        max_runners: args.max_runners,
        loads,
        persist_dir: args.persist,
        profile_hz: args.profile.is_some().then_some(args.profile_hz),
        measure_workers: args.stats.is_some(),
        jit: jit
            .clone()
            .map(|jit| jit as Arc<dyn dvm_engine::interp::Jit>),
        ..vm::Config::default()
    };
    if let Some(bytes) = args.max_memory {
        config.max_memory_bytes = bytes;
    }
    if let Some(slots) = args.fresh_runner_slots {
        config.fresh_slots = vm::FreshSlots::at_most(slots);
    }
    tracing::info!(program = %args.program.display(), instructions = program.code.len(), "loaded");
    let (report, nodes) = match launch {
        None => (
            vm::run(program, config).map_err(|err| user(err.to_string()))?,
            Vec::new(),
        ),
        Some(launch) => {
            let preference: verbs::Preference = args.transport.into();
            let probe = match preference {
                verbs::Preference::Tcp => verbs::Probe::Available(Vec::new()),
                _ => verbs::probe(),
            };
            let choice = verbs::choose(preference, &probe).map_err(|err| user(err.to_string()))?;
            // Said once per job: the nodes a launcher starts on one host would all repeat it. Each
            // node then logs the transport it built (DVM_LOG=info).
            if launch.rank == 0 {
                tracing::info!("transport: {choice}");
            } else {
                tracing::debug!("transport: {choice}");
            }
            let options = dvm_cluster::runtime::ClusterOptions {
                peer_timeout_ms: args.peer_timeout_ms,
                connect_timeout_ms: args.connect_timeout_ms,
                coordinator_socket,
                transport: choice.transport,
                transport_reason: choice.reason.clone(),
                replicas: args.replicas as usize,
            };
            let run =
                dvm_cluster::runtime::run(program, config, launch, &options).map_err(|err| {
                    Failure::Cluster(format!("node {} of {}: {err}", launch.rank, launch.world))
                })?;
            if run.rank != 0 {
                // Node 0 prints the program's output, its statistics and its exit status.
                return Ok(0);
            }
            for lost in &run.lost {
                lost_out.push(lost.rank as u32);
                if lost.after_end {
                    eprintln!(
                        "dvm: node {} ({}) was lost as the run ended ({}); the output is \
                         complete, its statistics are missing",
                        lost.rank, lost.addr, lost.reason
                    );
                    continue;
                }
                eprintln!(
                    "dvm: node {} ({}) was lost during the run ({}); the run went on without \
                     it: its pages were served by their backups{} and {} runner(s) it was \
                     running or had queued ran again on the other nodes{}",
                    lost.rank,
                    lost.addr,
                    lost.reason,
                    match lost.recopied_ms {
                        Some(ms) => format!(", copied to new holders within {ms} ms"),
                        None => String::new(),
                    },
                    lost.rerun.len(),
                    match lost.rerun.is_empty() {
                        true => String::new(),
                        false => format!(" (ids {:?})", lost.rerun),
                    }
                );
            }
            (run.report, run.nodes)
        }
    };
    for note in &report.placement_notes {
        if note.starts_with("topology:") {
            tracing::info!("{note}");
        } else {
            tracing::warn!("{note}");
        }
    }
    if let Some(out) = profile_out {
        out.write(&report, args.profile_hz, nodes.len().max(1) as u32)?;
    }
    let jit_rows = jit
        .as_deref()
        .map(|jit| jit_stats(jit, report.stats.instructions));
    match args.stats.as_deref() {
        Some("json") => {
            let mut line = stats::json(&report, &nodes);
            if let Some((_, fields)) = &jit_rows {
                // The line ends with the two braces closing `dvm_stats` and the object.
                line.truncate(line.len().saturating_sub(2));
                line.push_str(&format!(", {fields}}}}}"));
            }
            eprintln!("{line}");
        }
        Some(_) => {
            eprint!("{}", stats::table(&report, &nodes));
            if let Some((rows, _)) = &jit_rows {
                eprint!("{rows}");
            }
        }
        None => {}
    }
    let code = report.exit_code();
    if code != 0 {
        let s = &report.stats;
        eprintln!(
            "dvm: {} runner(s) faulted ({} started: {} committed, {} aborted, {} failed to commit){}",
            s.runners_faulted,
            s.runners_started,
            s.runners_committed,
            s.runners_aborted,
            s.runners_failed,
            if report.internal_errors > 0 {
                "; DVM hit an internal error, please report it"
            } else {
                ""
            }
        );
    }
    Ok(code)
}

fn cmd_topology(
    workers: Option<usize>,
    nodes: Option<u32>,
    hosts: Option<&str>,
    rank: Option<&str>,
) -> Result<(), Failure> {
    let topology = dvm_numa::Topology::detect();
    print!("{}", topology.render());
    let env = dvm_cluster::launch::process_env();
    let explicit = dvm_cluster::launch::Explicit { hosts, rank };
    let launch =
        dvm_cluster::launch::detect(&env, &explicit, &dvm_cluster::launch::HostFacts::probe())
            .map_err(|err| {
                user(format!(
                    "cannot tell this process's place in the job: {err}"
                ))
            })?;
    if let Some(launch) = &launch {
        println!(
            "job: launched by {}; this process is rank {} of {} (local rank {} of {} on this host); rank 0 waits at {}; job token from {:?}",
            launch.source,
            launch.rank,
            launch.world,
            launch.local_rank,
            launch.local_size,
            launch.coordinator,
            launch.token_source
        );
    }
    let local_nodes = nodes
        .map(|n| n as usize)
        .or(launch.as_ref().map(|l| l.local_size as usize))
        .unwrap_or(1)
        .max(1);
    let per_node = workers
        .unwrap_or_else(|| (topology.cores().len() / local_nodes).max(1))
        .max(1);
    let slots = topology.plan_workers(per_node * local_nodes);
    for (node, node_slots) in slots.chunks(per_node).enumerate() {
        if local_nodes > 1 {
            println!("node {node} (local):");
        }
        println!(
            "worker plan ({per_node} worker{}):",
            if per_node == 1 { "" } else { "s" }
        );
        for (worker, slot) in node_slots.iter().enumerate() {
            println!(
                "  worker {:>3} -> core {:>3}, NUMA node {}, processor {}",
                worker, slot.core, slot.node, slot.pu
            );
        }
    }
    Ok(())
}

/// `dvm transport`: what `verbs::probe` found, and the choice `dvm run` would make.
fn cmd_transport() {
    let probe = verbs::probe();
    match &probe {
        verbs::Probe::Unavailable(why) => println!("no RDMA: {why}; dvm run uses TCP (io_uring)"),
        verbs::Probe::Available(devices) => {
            for device in devices {
                print!("RDMA device {}", device.name);
                if !device.firmware.is_empty() {
                    print!(" (firmware {})", device.firmware);
                }
                println!();
                if let Some(err) = &device.error {
                    println!("  unusable: {err}");
                }
                for port in &device.ports {
                    println!(
                        "  port {}: {}, link layer {}, MTU {} (max {}), LID {}, GID table {} entries",
                        port.number,
                        port.state,
                        port.link_layer,
                        port.active_mtu,
                        port.max_mtu,
                        port.lid,
                        port.gid_table_len
                    );
                    let dvm_gid = port.ipv4_mapped_gid();
                    for (index, gid) in &port.gids {
                        let mark = if Some(*index) == dvm_gid {
                            "  <- DVM (IPv4-mapped, RoCE v2)"
                        } else {
                            ""
                        };
                        println!("    GID[{index}] {gid}{mark}");
                    }
                    if dvm_gid.is_none() {
                        println!(
                            "    no IPv4-mapped GID: DVM cannot address peers through this port"
                        );
                    }
                }
            }
            if let Ok(choice) = verbs::choose(verbs::Preference::Auto, &probe) {
                println!("dvm run uses {choice}");
            }
        }
    }
    if let Err(err) = verbs::choose(verbs::Preference::Rdma, &probe) {
        println!("dvm run --transport rdma would fail: {err}");
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Asm {
            input,
            output,
            format,
        } => cmd_asm(&input, output, format).map(|()| 0),
        Command::Disasm { image, output } => cmd_disasm(&image, output).map(|()| 0),
        Command::Run(args) => cmd_run(*args),
        Command::Topology {
            workers,
            nodes,
            hosts,
            rank,
        } => {
            cmd_topology(workers, nodes, hosts.as_deref(), rank.as_deref())?;
            Ok(0)
        }
        Command::Transport => {
            cmd_transport();
            Ok(0)
        }
        Command::Isa => {
            print!("{}", isa::markdown_tables());
            Ok(0)
        }
        Command::Profile(args) => profile::cmd_profile(&args).map(|()| 0),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    std::panic::set_hook(Box::new(|info| {
        eprintln!(
            "dvm: internal error: {info}\nThis is a bug in DVM, not in your program; please report it with the command line."
        );
    }));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours for a terminal only: a job's log file (srun, mpirun) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(Failure::User(message))) => {
            let message = message.trim_end();
            // Assembler diagnostics carry their own `error:` headers.
            if message.starts_with("error:") {
                eprintln!("{message}");
            } else {
                eprintln!("error: {message}");
            }
            ExitCode::from(1)
        }
        Ok(Err(Failure::Cluster(message))) => {
            eprintln!("error: {}", message.trim_end());
            ExitCode::from(2)
        }
        Err(_) => ExitCode::from(2),
    }
}
