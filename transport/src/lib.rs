//! DVM's cluster transport: page replication and messages between nodes, over RDMA verbs
//! (rdma-sys) when a device is present and io_uring TCP otherwise, behind one trait.
//!
//! Nothing is implemented yet: the single-node engine comes first. This crate exists so the
//! workspace has its final shape; it deliberately exposes no API until the cluster work lands.
pub mod sim;
