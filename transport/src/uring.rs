//! The few unsafe pieces the io_uring transport needs, each behind a safe interface: the
//! provided-buffer ring used by multishot receive, SQE submission, the eventfd used to wake the
//! I/O thread, and the locked-memory limit.
//!
//! Invariants: buffer-ring memory is allocated before registration and freed only after the ring
//! that uses it is gone (the owner drops the `IoUring` first); a buffer id is handed back to the
//! kernel only after its bytes were consumed; the eventfd is closed exactly once, on drop.

use io_uring::{squeue, types::BufRingEntry, IoUring};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

/// Buffer group id of the receive buffer ring.
pub const RECV_BGID: u16 = 7;

/// A ring of receive buffers the kernel picks from (IORING_REGISTER_PBUF_RING).
pub struct BufRing {
    entries: *mut BufRingEntry,
    entries_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    count: u16,
    buf_bytes: u32,
    /// Our copy of the tail; the kernel reads the shared one.
    tail: u16,
}

// SAFETY: the raw pointers are exclusively owned allocations; the kernel accesses them only
// through the ring this BufRing is registered with, which moves to the same thread with it.
unsafe impl Send for BufRing {}

impl BufRing {
    /// Allocate `count` (a power of two, at most 32768) buffers of `buf_bytes` and register them
    /// with `ring` as group [`RECV_BGID`].
    pub fn register(ring: &IoUring, count: u16, buf_bytes: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || buf_bytes == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let entries_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bufs_layout = Layout::from_size_align(usize::from(count) * buf_bytes as usize, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size (count >= 1, buf_bytes >= 1).
        let entries = unsafe { alloc_zeroed(entries_layout) }.cast::<BufRingEntry>();
        // SAFETY: as above.
        let bufs = unsafe { alloc_zeroed(bufs_layout) };
        if entries.is_null() || bufs.is_null() {
            // SAFETY: each pointer is freed only if it was allocated, with its own layout.
            unsafe {
                if !entries.is_null() {
                    dealloc(entries.cast(), entries_layout);
                }
                if !bufs.is_null() {
                    dealloc(bufs, bufs_layout);
                }
            }
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut br = BufRing {
            entries,
            entries_layout,
            bufs,
            bufs_layout,
            count,
            buf_bytes,
            tail: 0,
        };
        // SAFETY: `entries` is page-aligned, holds `count` entries and stays allocated until
        // `self` is dropped, which the owner does only after dropping the ring.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, RECV_BGID, 0)?;
        }
        for bid in 0..count {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        // SAFETY: idx < count, so the entry lies inside the allocation; the kernel only reads
        // entries between its head and the published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.entries.add(idx) };
        // SAFETY: bid < count, so the buffer lies inside the allocation.
        let addr = unsafe { self.bufs.add(usize::from(bid) * self.buf_bytes as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(self.buf_bytes);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: `entries` points at the first entry of the registered ring; the tail field is
        // a u16 the kernel reads atomically, so it is written through an AtomicU16 with Release
        // to make the entries written before it visible first.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast_mut();
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }

    /// The bytes the kernel wrote into buffer `bid`.
    pub fn filled(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || len > self.buf_bytes as usize {
            return None;
        }
        // SAFETY: in bounds (checked above); the kernel finished writing this buffer when it
        // posted the completion naming it, and does not touch it again until `recycle`.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.bufs.add(usize::from(bid) * self.buf_bytes as usize),
                len,
            )
        })
    }

    /// Give buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        if bid < self.count {
            self.push(bid);
            self.publish();
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `register` with these layouts; the ring using them is gone.
        unsafe {
            dealloc(self.entries.cast(), self.entries_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

/// Queue one SQE, submitting first if the submission queue is full.
///
/// # Safety
/// Every buffer, file descriptor and struct the entry points at must stay valid until its final
/// completion (a CQE without the MORE flag) has been reaped.
pub unsafe fn push_sqe(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: forwarded to the caller.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// An eventfd: writers bump the counter, the I/O thread reads it through the ring.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall with constant flags; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor this struct owns. A failure
        // (counter saturated) still leaves the eventfd readable, which is all a wake needs.
        let _ = unsafe {
            libc::write(
                self.0.as_raw_fd(),
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// shutdown(2): completes receives and sends pending on the socket so its buffers can be freed.
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: plain syscall on a descriptor the caller owns; errors (already shut down,
    // not connected) leave nothing to clean up.
    let _ = unsafe { libc::shutdown(fd, how) };
}

/// The soft RLIMIT_MEMLOCK in bytes, `None` when unlimited or unreadable.
pub fn memlock_limit_bytes() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(lim.rlim_cur)
}
