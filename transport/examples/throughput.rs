//! Loopback throughput, measured in one run: a plain blocking TCP socket copy, then this
//! transport's one-way messages and page pushes between two nodes. Prints a small table; no
//! assertions (timings depend on the machine).
//!
//!     cargo run --release -p dvm-transport --example throughput

use dvm_transport::tcp::{TcpConfig, TcpTransport};
use dvm_transport::{Event, PageVersion, PageVersionRef, Transport, MASK_WORDS, PAGE_BYTES};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const TOTAL_BYTES: usize = 512 << 20;

fn plain_tcp(chunk: usize) -> std::io::Result<f64> {
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
    while sent < TOTAL_BYTES {
        s.write_all(&buf)?;
        sent += chunk;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))??;
    Ok(got as f64 / start.elapsed().as_secs_f64())
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

/// Receive on `rx` until `want` payload bytes arrived; returns bytes/s from `start`.
fn drain(rx: &TcpTransport, want: usize, start: Instant) -> f64 {
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
    got as f64 / start.elapsed().as_secs_f64()
}

fn messages(size: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let (t0, t1) = pair()?;
    let msg = vec![3u8; size];
    let count = TOTAL_BYTES / size;
    let start = Instant::now();
    let rate = std::thread::scope(|s| {
        let h = s.spawn(|| drain(&t1, count * size, start));
        for _ in 0..count {
            t0.send(1, &msg)?;
        }
        t0.flush()?;
        h.join().map_err(|_| "receiver panicked".into())
    });
    rate
}

fn pages(batch: usize) -> Result<f64, Box<dyn std::error::Error>> {
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
    let rounds = TOTAL_BYTES / (batch * PAGE_BYTES);
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
    let gib = |r: f64| r / (1u64 << 30) as f64;
    println!("{:<44} {:>10}", "loopback, 512 MiB each", "GiB/s");
    for chunk in [4096, 64 << 10, 1 << 20] {
        println!(
            "{:<44} {:>10.2}",
            format!("plain blocking TCP, {} KiB writes", chunk >> 10),
            gib(plain_tcp(chunk)?)
        );
    }
    for size in [256, 4096, 64 << 10, 1 << 20] {
        println!(
            "{:<44} {:>10.2}",
            format!("io_uring-tcp messages of {size} B"),
            gib(messages(size)?)
        );
    }
    for batch in [1, 16, 256] {
        println!(
            "{:<44} {:>10.2}",
            format!("io_uring-tcp page pushes, {batch} pages/call"),
            gib(pages(batch)?)
        );
    }
    Ok(())
}
