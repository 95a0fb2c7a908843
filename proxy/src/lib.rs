//! Strait's data plane: the routing table and its compiler, balancers, the HTTP proxy,
//! listeners, admin endpoints and metrics. It has no Kubernetes dependency: sources in
//! `strait-control` produce a [`table::spec::Spec`] and publish compiled tables here.

pub mod admin;
pub mod allocator;
pub mod balancer;
pub mod body;
pub mod breaker;
pub(crate) mod clock;
pub(crate) mod drain;
pub mod endpoint;
pub mod error;
pub mod h1_client;
pub mod h1_codec;
pub mod headers;
pub mod health;
pub mod health_check;
pub mod https;
pub mod listener;
pub mod metrics;
pub mod names;
pub mod passthrough;
pub mod pool;
pub mod rate_limit;
pub mod router;
pub mod service;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod upstream_tls;
pub mod workers;
