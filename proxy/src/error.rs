//! The proxy's error type: classified once into a status code and an error code header.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

use crate::breaker::Breaker;

/// Response header naming why Strait itself answered with an error.
pub const ERROR_HEADER: &str = "x-strait-error";
/// Response header naming the circuit breaker threshold that turned a request away.
pub const BREAKER_HEADER: &str = "x-strait-circuit-breaker";

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request cannot be routed as sent.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// No route matched and the listener has no default route.
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute {
        /// Request host.
        host: String,
        /// Request path.
        path: String,
    },
    /// The backend has no endpoint to send to; the text says why.
    #[error("{0}")]
    NoEndpoints(String),
    /// The TCP connection to the endpoint failed.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// Endpoint.
        addr: SocketAddr,
        /// Root cause.
        reason: String,
    },
    /// The TCP connection to the endpoint did not complete in time.
    #[error("connect to {addr} timed out")]
    ConnectTimeout {
        /// Endpoint.
        addr: SocketAddr,
    },
    /// The upstream's response headers did not arrive within the route timeout (or the
    /// retry policy's per-try timeout).
    #[error("upstream {addr} sent no response within {timeout:?}{}", if *.per_try { " (per-try timeout)" } else { "" })]
    Timeout {
        /// Endpoint.
        addr: SocketAddr,
        /// The timeout that fired.
        timeout: Duration,
        /// Whether it was the per-try timeout (another attempt may still fit).
        per_try: bool,
    },
    /// The upstream failed after the connection was made (reset, protocol error).
    #[error("upstream {addr} failed: {reason}")]
    Upstream {
        /// Endpoint.
        addr: SocketAddr,
        /// Root cause.
        reason: String,
    },
    /// A circuit breaker threshold of the backend was reached.
    #[error("circuit breaker {} of the backend is open", .0.name())]
    CircuitOpen(Breaker),
    /// The route's rate limit refused the request.
    #[error("too many requests for route {route:?}: retry after {retry_after}s")]
    RateLimited {
        /// Route name.
        route: std::sync::Arc<str>,
        /// Seconds until the request's bucket has a token again.
        retry_after: u64,
    },
    /// The request's host is served under other TLS client-certificate settings than the
    /// connection was made with (a connection reused across names).
    #[error("host {0:?} needs its own TLS connection")]
    Misdirected(String),
    /// A bug: the request handler panicked.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    /// The status code sent downstream.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::NoEndpoints(_) | Self::CircuitOpen(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout { .. } | Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The value of the `x-strait-error` header: a stable code for dashboards and clients.
    pub fn code(&self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::BadRequest(_) => "bad-request",
            Self::NoRoute { .. } => "no-route",
            Self::NoEndpoints(_) => "no-endpoints",
            Self::CircuitOpen(_) => "circuit-open",
            Self::Connect { .. } => "connect-failed",
            Self::ConnectTimeout { .. } => "connect-timeout",
            Self::Timeout { .. } => "upstream-timeout",
            Self::Upstream { .. } => "upstream-failed",
            Self::RateLimited { .. } => "rate-limited",
            Self::Misdirected(_) => "misdirected",
            Self::Internal => "internal",
        })
    }

    /// Whether a retry policy retries this failure beyond connect failures: a per-try
    /// timeout, or a broken connection when 502 is among its statuses.
    pub fn is_retryable_failure(&self, p: &crate::table::RetryPolicy) -> bool {
        match self {
            Self::Timeout { per_try, .. } => *per_try,
            Self::Upstream { .. } => p.statuses.contains(&502),
            _ => false,
        }
    }

    /// Whether the endpoint never got the request (so trying another one would be safe).
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::ConnectTimeout { .. })
    }
}
