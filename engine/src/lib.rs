//! The DVM engine: the DISA instruction set and its toolchain (this crate's `isa`, `codec`,
//! `asm`, `disasm`, `image`), and the single-node virtual machine built on them.
//!
//! Safe Rust only, but for `tlb` (the software TLB's pointer-carrying entries and the page frames
//! they point into; its top comment states the invariants): the engine executes untrusted
//! programs and must fail with an error, never with undefined behaviour. `deny`, not `forbid`,
//! so that one module can `allow` it; no other module may.
#![deny(unsafe_code)]

pub mod abi;
pub mod asm;
pub mod backend;
mod chains;
pub mod clock;
pub mod codec;
pub mod disasm;
pub mod image;
pub mod interp;
pub mod isa;
pub mod native;
pub mod order;
pub mod page;
pub mod persist;
pub mod report;
pub mod runner;
pub mod sched;
pub mod slots;
pub mod store;
pub mod tlb;
pub mod view;
pub mod vm;
