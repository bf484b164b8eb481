//! The C API of DVM (create a VM, load an image, run, read and write memory, read counters),
//! built as a cdylib with a generated header.
//!
//! Nothing is implemented yet; this crate deliberately exposes no API until the engine it wraps
//! is complete.
