//! `dvm run` on several nodes, as real separate processes on loopback: the explicit
//! `--hosts/--rank` launch, a node killed mid-run (the run goes on and prints what one node
//! prints; with one holder per page it ends, naming the node), and a node that never comes.
//! (`conformance.rs` runs the whole suite on 2 and 4 nodes with `--nodes`.)

#[path = "../../cluster/tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

fn dvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dvm"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Waits for `child` at most `limit`; kills it past that.
fn wait_bounded(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let output = child.wait_with_output().expect("the child's output");
    (output, elapsed)
}

/// A port for a `--hosts` list, which separate processes must bind after this returns. It is
/// taken below Linux's ephemeral range (32768 and up), which the kernel hands out for
/// `bind(:0)` and outgoing connections: another test's socket cannot be given it meanwhile.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread by process, so concurrent test binaries rarely try the same ports.
    let start = (std::process::id() % 1000) as u16 * 10;
    for _ in 0..10_000 {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 10_000;
        let port = 20_000 + (start + offset) % 10_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..30000 on 127.0.0.1");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn explicit_hosts_and_ranks_print_what_one_node_prints() {
    // The conformance suite's reduced k-means: 2 partitions' data, remote pages and commits.
    let program = repo("tests/conformance/workload_kmeans.dasm");
    let params = format!(
        "{}@0x4000000000",
        repo("tests/conformance/data/kmeans_params.bin").display()
    );
    let data = format!(
        "{}@0x5000000000",
        repo("tests/conformance/data/kmeans_data.bin").display()
    );
    let single = dvm()
        .args(["run", "--workers", "1"])
        .arg(&program)
        .args(["--load", &params, "--load", &data])
        .output()
        .expect("a one-node run");
    assert!(single.status.success(), "{}", text(&single.stderr));
    assert!(
        text(&single.stdout).contains("checksum"),
        "{}",
        text(&single.stdout)
    );

    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let spawn = |rank: &str| {
        dvm()
            .args(["run", "--workers", "1", "--hosts", &hosts, "--rank", rank])
            .arg(&program)
            .args(["--load", &params, "--load", &data])
            .env("DVM_JOB_TOKEN", "explicit-hosts-test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("a node")
    };
    let (zero, one) = (spawn("0"), spawn("1"));
    let (zero, _) = wait_bounded(zero, Duration::from_secs(120));
    let (one, _) = wait_bounded(one, Duration::from_secs(30));
    assert!(zero.status.success(), "rank 0: {}", text(&zero.stderr));
    assert!(one.status.success(), "rank 1: {}", text(&one.stderr));
    assert_eq!(
        text(&zero.stdout),
        text(&single.stdout),
        "rank 0 prints the program's output"
    );
    assert_eq!(text(&one.stdout), "", "only rank 0 prints");
}

/// The children of `pid` (Linux `/proc`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut text = String::new();
    let path = format!("/proc/{pid}/task/{pid}/children");
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_node_killed_mid_run_ends_the_run_with_a_report_naming_it() {
    // Six runners that count to 3*10^11 each (minutes even compiled by the JIT): long enough
    // to be killed in the middle; the run ends on the lost node, not on the count. One holder
    // per page (`--replicas 1`): the run cannot go on without the node.
    let dir = std::env::temp_dir().join(format!("dvm-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let program = dir.join("spin.dasm");
    std::fs::write(
        &program,
        ".equ K, 0x200000000\nmain:\n    mov $0:ue, K:ue\nagain:\n    newr $auto_stack, $no_use, $no_watch, $s_entry\n    add:ue K, $1, K\n    br:l,ue,a K, $6, $again\n    exit:c\nspin:\n    mov $0:ue, K:ue\nloop:\n    add:ue K, $1, K\n    br:l,ue,a K, $300000000000, $loop\n    exit:c\n.rodata\nauto_stack: .quad 0, 0\nno_watch: .quad 0\nno_use: .quad 0\ns_entry: .quad spin\n",
    )
    .expect("the program");
    let child = dvm()
        .args([
            "run",
            "--nodes",
            "3",
            "--workers",
            "1",
            "--peer-timeout-ms",
            "3000",
            "--replicas",
            "1",
        ])
        .arg(&program)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a 3-node run");
    // Wait until the nodes are up and running runners, then kill node 1 or 2 with SIGKILL.
    let started = Instant::now();
    let victims = loop {
        let victims = children_of(child.id());
        if victims.len() == 2 || started.elapsed() > Duration::from_secs(20) {
            break victims;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(victims.len(), 2, "rank 0 started two nodes");
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Command::new("kill")
        .args(["-9", &victims[0].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let (output, elapsed) = wait_bounded(child, Duration::from_secs(30));
    let stderr = text(&output.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        elapsed < Duration::from_secs(10),
        "ended {elapsed:?} after the kill:\n{stderr}"
    );
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("was lost") && (stderr.contains("node 1 (") || stderr.contains("node 2 (")),
        "the report names the lost node:\n{stderr}"
    );
}

/// `kill -9` of node 1 or 2 in the middle of a 3-node k-means, three times in a row: each run
/// prints exactly the one-node output, and the report names the lost node and the runners
/// that ran again.
/// k-means over generated points (in `dir`): the arguments of a run with `extra` options, and
/// what one node prints for it.
fn kmeans_run(dir: &Path) -> (impl Fn(&[&str]) -> Vec<String>, String) {
    // 300 iterations: several seconds on three nodes, so the kills (1-3 s in) land mid-run
    // however fast the engine gets (100 iterations ended before the second kill).
    let loads = common::kmeans_loads(dir, 20_000, 8, 16, 300, 12);
    let args = move |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["run", "--workers", "1"].map(String::from).to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(repo("examples/kmeans.dasm").display().to_string());
        for load in &loads {
            args.extend(["--load".to_string(), load.clone()]);
        }
        args
    };
    let one = dvm().args(args(&[])).output().expect("a one-node run");
    assert!(one.status.success(), "{}", text(&one.stderr));
    let expected = text(&one.stdout);
    assert!(expected.contains("checksum"), "{expected}");
    (args, expected)
}

/// Runs `dvm` with `args` on `nodes` local nodes and `kill -9`s the children of ranks
/// `victims`, the first after `first_ms` and each next one `gap_ms` later; its output and
/// stderr.
fn run_killing(
    args: Vec<String>,
    nodes: usize,
    victims: &[usize],
    first_ms: u64,
) -> (Output, String) {
    const GAP_MS: u64 = 1000;
    let child = dvm()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a run on several nodes");
    let started = Instant::now();
    let children = loop {
        let children = children_of(child.id());
        if children.len() == nodes - 1 || started.elapsed() > Duration::from_secs(20) {
            break children;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(children.len(), nodes - 1, "rank 0 started the other nodes");
    std::thread::sleep(Duration::from_millis(first_ms));
    for (index, rank) in victims.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_millis(GAP_MS));
        }
        let killed = Command::new("kill")
            .args(["-9", &children[rank - 1].to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
    }
    let (output, _) = wait_bounded(child, Duration::from_secs(180));
    let stderr = text(&output.stderr);
    eprintln!("{stderr}");
    (output, stderr)
}

#[test]
fn a_node_killed_mid_kmeans_changes_nothing_three_times_in_a_row() {
    let dir = std::env::temp_dir().join(format!("dvm-kill-km-{}", std::process::id()));
    let (args, expected) = kmeans_run(&dir);
    for round in 0..3 {
        let rank = round % 2 + 1;
        // In the middle of the iterations (one node takes several seconds for them).
        let options = ["--nodes", "3", "--peer-timeout-ms", "3000"];
        let (output, stderr) = run_killing(args(&options), 3, &[rank], 1200 + 300 * round as u64);
        assert_eq!(output.status.code(), Some(0), "round {round}:\n{stderr}");
        assert_eq!(text(&output.stdout), expected, "round {round}:\n{stderr}");
        assert!(
            stderr.contains(&format!("dvm: node {rank} (")) && stderr.contains("ran again"),
            "round {round}: the report names node {rank} and the runners that ran again:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two of four nodes killed one after the other: after the first loss each page it held gets
/// a new holder (`docs/CLUSTER.md`, "New holders"), so the second loss finds a copy of every
/// page, where rings of two holders alone would have lost some.
#[test]
fn two_nodes_killed_in_turn_change_nothing_once_their_pages_have_new_holders() {
    let dir = std::env::temp_dir().join(format!("dvm-kill2-km-{}", std::process::id()));
    let (args, expected) = kmeans_run(&dir);
    let options = ["--nodes", "4", "--peer-timeout-ms", "3000"];
    let (output, stderr) = run_killing(args(&options), 4, &[1, 2], 1000);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&output.stdout), expected, "{stderr}");
    for rank in [1, 2] {
        assert!(
            stderr.contains(&format!("dvm: node {rank} (")),
            "the report names node {rank}:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("copied to new holders within"),
        "the report says the pages were copied:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two of three nodes killed: node 0 is left with fewer than half of the nodes, and it cannot
/// tell that from being cut off itself, so it stops committing and ends the run, saying so.
#[test]
fn node_0_left_without_a_majority_ends_the_run_saying_so() {
    let dir = std::env::temp_dir().join(format!("dvm-kill-majority-{}", std::process::id()));
    let (args, _) = kmeans_run(&dir);
    let options = [
        "--nodes",
        "3",
        "--replicas",
        "3",
        "--peer-timeout-ms",
        "3000",
    ];
    let (output, stderr) = run_killing(args(&options), 3, &[1, 2], 1000);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("node 0 is cut off from a majority of the nodes")
            && stderr.contains("reaches only nodes [0] of 3"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Four spawners, each spawning four children, printing their ids, then sleeping 3 s before
/// it commits: a node killed meanwhile holds a spawner that has its children's ids.
const SPAWN_AND_SLEEP: &str = "\
.equ K, 0x200000000
.equ CHILD_ID, 0x100000410
.equ CONSOLE_OUT, 0x100000208
.equ SYS_ID, 0x100000420
.equ SYS_A0, 0x100001000
main:
    mov $0:ue, K:ue
again:
    newr $auto_stack, $no_use, $no_watch, $s_entry
    add:ue K, $1, K
    br:l,ue,a K, $4, $again
    exit:c
spawner:
    mov $0:ue, K:ue
child_loop:
    newr $auto_stack, $no_use, $no_watch, $c_entry
    mov $102:ue, SYS_ID:ue
    mov CHILD_ID:ue, SYS_A0:ue
    int 0x80
    mov $10:ue, CONSOLE_OUT:ue
    add:ue K, $1, K
    br:l,ue,a K, $4, $child_loop
    mov $2:ue, SYS_ID:ue
    mov $3000000:ue, SYS_A0:ue
    int 0x80
    exit:c
child:
    exit:c
.rodata
auto_stack: .quad 0, 0
no_watch: .quad 0
no_use: .quad 0
s_entry: .quad spawner
c_entry: .quad child
";

/// A spawner run again after its node's loss gives its children the ids its lost attempt was
/// handed (`cluster/src/handouts.rs`): the ids stay dense, as on one node, so a join over a
/// range of ids (`micro_commit`'s) still ends. Fresh ids would leave a gap of four ids that
/// never end.
#[test]
fn a_spawner_run_again_after_its_node_is_lost_gives_its_children_the_same_ids() {
    let dir = std::env::temp_dir().join(format!("dvm-kill-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let program = dir.join("spawn-and-sleep.dasm");
    std::fs::write(&program, SPAWN_AND_SLEEP).expect("the program");
    let mut args: Vec<String> = ["run", "--workers", "1", "--nodes", "3"]
        .map(String::from)
        .to_vec();
    args.extend(["--peer-timeout-ms", "3000"].map(String::from));
    args.push(program.display().to_string());
    // Placement spreads the four spawners over the three nodes (least loaded first): node 1
    // holds one, asleep with its children's ids when it is killed.
    let (output, stderr) = run_killing(args, 3, &[1], 1000);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("dvm: node 1 (") && stderr.contains("ran again"),
        "the report names node 1 and the runner that ran again:\n{stderr}"
    );
    let mut ids: Vec<u64> = text(&output.stdout)
        .lines()
        .map(|line| line.trim().parse().expect("a child id per line"))
        .collect();
    ids.sort_unstable();
    // The root has the first id after the 16 reserved, the spawners the next four, then the
    // sixteen children, with no gap.
    let first_child = 0x3d0_0000_0000u64 + (16 + 1 + 4) * 0x1000;
    let expected: Vec<u64> = (0..16).map(|k| first_child + k * 0x1000).collect();
    assert_eq!(ids, expected, "{stderr}");
}

#[test]
fn a_node_that_never_comes_is_named_within_the_connect_timeout() {
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let child = dvm()
        .args([
            "run",
            "--hosts",
            &hosts,
            "--rank",
            "0",
            "--connect-timeout-ms",
            "2000",
        ])
        .arg(repo("examples/hello.dasm"))
        .env("DVM_JOB_TOKEN", "never-comes-test")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rank 0");
    let (output, elapsed) = wait_bounded(child, Duration::from_secs(30));
    let stderr = text(&output.stderr);
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}: {stderr}"
    );
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rank 1") || stderr.contains("missing"),
        "names the missing rank:\n{stderr}"
    );
    assert_eq!(text(&output.stdout), "");
}

/// The examples that need no input print the same on 1, 2 and 4 nodes. (The workload examples
/// — k-means, primes, sort, the micro-benchmarks — run on 2 and 4 nodes in the conformance
/// suite as byte-identical copies with reduced inputs: `tests/conformance/workload_*.dasm`.)
#[test]
fn examples_without_input_print_the_same_on_1_2_and_4_nodes() {
    for example in ["hello", "loop", "spawn"] {
        let path = repo(&format!("examples/{example}.dasm"));
        let runs: Vec<(u32, Output)> = [1u32, 2, 4]
            .into_iter()
            .map(|nodes| {
                let child = dvm()
                    .args(["run", "--workers", "1", "--nodes", &nodes.to_string()])
                    .arg(&path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("a run");
                (nodes, wait_bounded(child, Duration::from_secs(60)).0)
            })
            .collect();
        let (_, one) = &runs[0];
        assert!(one.status.success(), "{example}: {}", text(&one.stderr));
        assert!(!one.stdout.is_empty(), "{example} prints something");
        for (nodes, run) in &runs[1..] {
            assert!(
                run.status.success(),
                "{example} on {nodes} nodes: {}",
                text(&run.stderr)
            );
            assert_eq!(
                text(&run.stdout),
                text(&one.stdout),
                "{example} on {nodes} nodes"
            );
        }
    }
}
