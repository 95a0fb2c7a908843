//! Strait's control plane: sources that produce configuration, and the publisher that
//! compiles it and swaps the data plane's routing table.
//!
//! Data flows one way: source -> spec -> dry-run compile (validation) -> compile ->
//! publish. Nothing in the data plane calls back here.

#![forbid(unsafe_code)]

pub mod dns;
pub mod kubernetes;
pub mod locate;
pub mod publisher;
pub mod reload;
pub mod sidecar;
pub mod source;
