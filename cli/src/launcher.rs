//! `dvm run --nodes N`: DVM's own launcher for development and tests. This process becomes
//! rank 0 and starts ranks 1..N as child processes of the same `dvm` with the same arguments,
//! on this host, joined over loopback. The children learn their place from `DVM_RANK`,
//! `DVM_WORLD`, `DVM_COORD` and `DVM_JOB_TOKEN` (`dvm_cluster::launch`); the token is random
//! per run, so only this run's processes can join it.

use crate::Failure;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long rank 0 waits for its children to exit after the run.
const CHILD_EXIT_WAIT: Duration = Duration::from_secs(15);

fn cluster(message: String) -> Failure {
    Failure::Cluster(message)
}

/// A fresh random token (hex), from the kernel.
fn random_token() -> Result<String, Failure> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut bytes))
        .map_err(|err| {
            cluster(format!(
                "--nodes: cannot read /dev/urandom for a job token: {err}"
            ))
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The local ranks started by [`start_local_nodes`], and rank 0's coordinator socket.
pub struct LocalNodes {
    pub children: Vec<(u32, Child)>,
    /// Bound before the children start and kept until rank 0's rendezvous accepts on it:
    /// a port chosen, released and bound again could be taken in between by another job.
    pub coordinator_socket: Arc<TcpListener>,
}

/// Starts ranks 1..nodes; fills `env` with what makes this process rank 0.
pub fn start_local_nodes(
    nodes: u32,
    env: &mut BTreeMap<String, String>,
) -> Result<LocalNodes, Failure> {
    // The kernel picks the port; the socket stays open (close-on-exec, so the children do not
    // hold it) and the children's hellos wait in its backlog until rank 0 accepts.
    let no_port = |err| cluster(format!("--nodes: no free port on 127.0.0.1: {err}"));
    let socket = TcpListener::bind("127.0.0.1:0").map_err(no_port)?;
    let port = socket.local_addr().map_err(no_port)?.port();
    let token = random_token()?;
    let exe = std::env::current_exe()
        .map_err(|err| cluster(format!("--nodes: cannot find the dvm executable: {err}")))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let coordinator = format!("127.0.0.1:{port}");
    let mut children = Vec::new();
    for rank in 1..nodes {
        let child = Command::new(&exe)
            .args(&args)
            .env("DVM_RANK", rank.to_string())
            .env("DVM_WORLD", nodes.to_string())
            .env("DVM_COORD", &coordinator)
            .env("DVM_JOB_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|err| cluster(format!("--nodes: cannot start node {rank}: {err}")))?;
        children.push((rank, child));
    }
    env.insert("DVM_RANK".into(), "0".into());
    env.insert("DVM_WORLD".into(), nodes.to_string());
    env.insert("DVM_COORD".into(), coordinator);
    env.insert("DVM_JOB_TOKEN".into(), token);
    Ok(LocalNodes {
        children,
        coordinator_socket: Arc::new(socket),
    })
}

/// Waits for the children (bounded); a child that failed while the run succeeded is an error,
/// unless the run went on without it (`lost`: node 0 reported it).
pub fn wait_for(children: Vec<(u32, Child)>, run_ok: bool, lost: &[u32]) -> Result<(), Failure> {
    let deadline = Instant::now() + CHILD_EXIT_WAIT;
    let mut failed = Vec::new();
    for (rank, mut child) in children {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if status.success() || lost.contains(&rank) {
                    } else if run_ok && status.signal().is_some() {
                        // Killed after node 0 had every ending applied (else node 0 would
                        // have lost it, and gone on or failed): the output is complete.
                        eprintln!(
                            "dvm: node {rank} was killed ({status}) as the run ended; the \
                             output is complete"
                        );
                    } else {
                        failed.push(format!("node {rank} exited with {status}"));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(format!("node {rank} did not exit and was killed"));
                    break;
                }
            }
        }
    }
    if run_ok && !failed.is_empty() {
        return Err(cluster(failed.join("; ")));
    }
    Ok(())
}
