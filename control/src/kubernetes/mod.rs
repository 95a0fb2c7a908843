//! The Kubernetes source: leader election and the Ingress status writer it uses.

pub mod leader;
pub mod status;
