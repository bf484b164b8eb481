//! The runtime ABI as constants: the memory map, the fixed words of the private region, and the
//! system-call numbers (`docs/DISA.md` §Runtime ABI). Every other module names these instead of
//! repeating numbers, so the map is written down exactly once.

/// Private region: per runner, sparse, zero-filled, never committed.
pub const PRIVATE_BASE: u64 = 0x1_0000_0000;
pub const PRIVATE_END: u64 = 0x8_0000_0000;
/// Shared region: snapshotted and committed.
pub const SHARED_BASE: u64 = 0x8_0000_0000;
pub const SHARED_END: u64 = 0x1000_0000_0000;
/// Flat images and `.text` load here.
pub const CODE_BASE: u64 = 0x8_0000_0000;
/// Aliased memory region: the same memory in every space.
pub const AMR_BASE: u64 = 0x208_0000_0000;
pub const AMR_END: u64 = 0xA08_0000_0000;
/// Persistent range (inside the shared region): survives a run with `--persist`.
pub const PERSIST_BASE: u64 = 0x400_0000_0000;
pub const PERSIST_END: u64 = 0x1000_0000_0000;
/// `space = address >> SPACE_SHIFT`; 64 spaces.
pub const SPACE_SHIFT: u32 = 46;
pub const SPACE_COUNT: u64 = 64;

/// Runner ids are addresses of 4 KiB exit-record pages, allocated upward from here.
pub const EXIT_RECORD_BASE: u64 = 0x3d0_0000_0000;
/// The first ids are reserved.
pub const EXIT_RECORD_RESERVED: u64 = 16;
/// Offset of the runtime's status word in an exit-record page.
pub const EXIT_STATUS_OFFSET: u64 = 0xFF8;

/// Words of the private region the runtime fills in.
pub const PR_STACK_BASE: u64 = 0x1_0000_0100;
pub const PR_STACK_SIZE: u64 = 0x1_0000_0108;
pub const PR_RUNNER_ID: u64 = 0x1_0000_0120;
/// Console: a u64 load consumes one byte of stdin (-1 at end); a u64 store outputs `value & 0xff`.
pub const PR_CONSOLE_IN: u64 = 0x1_0000_0200;
pub const PR_CONSOLE_OUT: u64 = 0x1_0000_0208;
/// After a spawn: the child's stack base, stack size and id.
pub const PR_SPAWN_STACK_BASE: u64 = 0x1_0000_0400;
pub const PR_SPAWN_STACK_SIZE: u64 = 0x1_0000_0408;
pub const PR_SPAWN_ID: u64 = 0x1_0000_0410;
/// `int 0x80`: call number here, arguments and results in 8-byte slots at `PR_SYSCALL_ARGS`.
pub const PR_SYSCALL_ID: u64 = 0x1_0000_0420;
pub const PR_SYSCALL_ARGS: u64 = 0x1_0000_1000;

pub const PAGE_BYTES: u64 = 4096;
