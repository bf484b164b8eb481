//! Loopback throughput, measured in one run: a plain blocking TCP socket copy, then this
//! transport's one-way messages and page pushes between two nodes. Prints a small table; no
//! assertions (timings depend on the machine).
//!
//!     cargo run --release -p dvm-transport --example throughput [-- --mib 512] [-- --machine]
//!
//! `--mib M` sets the bytes each case moves (default 512 MiB). `--machine` prints one line per
//! case instead of the table, for the benchmark harness (`dvm-bench run`, see BENCHMARKS.md):
//!
//!     throughput kind=KIND unit_bytes=U bytes=B seconds=S
//!
//! KIND is `plain_tcp` (U = bytes per `write` call), `messages` (U = bytes per message) or
//! `pages` (U = payload bytes per `push_pages` call: pages × 4096); B is the payload bytes that
//! arrived and S the seconds from the first send until the receiver had them all.

use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::{Event, PageVersion, PageVersionRef, Transport, MASK_WORDS, PAGE_BYTES};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Payload bytes that arrived, and the seconds they took.
struct Moved {
    bytes: usize,
    seconds: f64,
}

fn plain_tcp(total: usize, chunk: usize) -> std::io::Result<Moved> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![7u8; chunk];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf)?;
        sent += chunk;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    Ok(Moved {
        bytes: got,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn pair() -> Result<(TcpTransport, TcpTransport), Box<dyn std::error::Error>> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let b0 = TcpTransport::bind(TcpConfig::new(0, 2, any, b"bench"))?;
    let b1 = TcpTransport::bind(TcpConfig::new(1, 2, any, b"bench"))?;
    let addrs = vec![b0.local_addr(), b1.local_addr()];
    let a = addrs.clone();
    let h = std::thread::spawn(move || b0.establish(a));
    let t1 = b1.establish(addrs)?;
    let t0 = h.join().map_err(|_| "establish thread panicked")??;
    Ok((t0, t1))
}

/// Receive on `rx` until `want` payload bytes arrived (or 120 s passed).
fn drain(rx: &TcpTransport, want: usize, start: Instant) -> Moved {
    let mut got = 0;
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got < want && Instant::now() < deadline {
        events.clear();
        if rx.poll(&mut events, Duration::from_millis(100)).is_err() {
            break;
        }
        for e in &events {
            got += match e {
                Event::Message { payload, .. } => payload.len(),
                Event::Pages { pages, .. } => pages.len() * PAGE_BYTES,
                _ => 0,
            };
        }
    }
    Moved {
        bytes: got,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn messages(total: usize, size: usize) -> Result<Moved, Box<dyn std::error::Error>> {
    let (t0, t1) = pair()?;
    let msg = vec![3u8; size];
    let count = (total / size).max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        let h = s.spawn(|| drain(&t1, count * size, start));
        for _ in 0..count {
            t0.send(1, &msg)?;
        }
        t0.flush()?;
        h.join().map_err(|_| "receiver panicked".into())
    })
}

fn pages(total: usize, batch: usize) -> Result<Moved, Box<dyn std::error::Error>> {
    let (t0, t1) = pair()?;
    let data = Box::new([9u8; PAGE_BYTES]);
    let mask = Box::new([u64::MAX; MASK_WORDS]);
    let versions: Vec<PageVersion> = (0..batch as u64)
        .map(|p| PageVersion {
            page: p,
            ts: 1,
            data: data.clone(),
            mask: mask.clone(),
        })
        .collect();
    let refs: Vec<PageVersionRef<'_>> = versions.iter().map(|v| v.as_ref()).collect();
    let rounds = (total / (batch * PAGE_BYTES)).max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        let h = s.spawn(|| drain(&t1, rounds * batch * PAGE_BYTES, start));
        for _ in 0..rounds {
            t0.push_pages(1, &refs)?;
        }
        t0.flush()?;
        h.join().map_err(|_| "receiver panicked".into())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut mib = 512usize;
    let mut machine = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--machine" => machine = true,
            "--mib" => {
                mib = args
                    .next()
                    .ok_or("--mib needs a value")?
                    .parse()
                    .map_err(|e| format!("--mib: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?} (--mib M, --machine)").into()),
        }
    }
    let total = mib.max(1) << 20;
    let report = |kind: &str, label: String, unit: usize, moved: Moved| {
        if machine {
            println!(
                "throughput kind={kind} unit_bytes={unit} bytes={} seconds={:.6}",
                moved.bytes, moved.seconds
            );
        } else {
            let gib = moved.bytes as f64 / moved.seconds / (1u64 << 30) as f64;
            println!("{label:<44} {gib:>10.2}");
        }
    };
    if !machine {
        println!(
            "{:<44} {:>10}",
            format!("loopback, {mib} MiB each"),
            "GiB/s"
        );
    }
    for chunk in [4096, 64 << 10, 1 << 20] {
        let label = format!("plain blocking TCP, {} KiB writes", chunk >> 10);
        report("plain_tcp", label, chunk, plain_tcp(total, chunk)?);
    }
    for size in [256, 4096, 64 << 10, 1 << 20] {
        let label = format!("io_uring-tcp messages of {size} B");
        report("messages", label, size, messages(total, size)?);
    }
    for batch in [1, 16, 256] {
        let label = format!("io_uring-tcp page pushes, {batch} pages/call");
        report("pages", label, batch * PAGE_BYTES, pages(total, batch)?);
    }
    Ok(())
}
