//! `tcp` listeners: every accepted connection is relayed, byte for byte, to one endpoint of
//! the listener's backend, picked by the backend's policy when the connection arrives.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::health;
use crate::listener::{accept, IdleTimeout, ListenerContext};
use crate::table::{Backend, Endpoint};

/// Endpoints tried for one connection before giving up; a refused or timed-out connect is
/// retried on another pick, since the client has sent nothing the endpoint could have seen.
const CONNECT_ATTEMPTS: usize = 3;

/// Serves a `tcp` listener until `shutdown` resolves, then stops accepting and waits for the
/// open connections to end: a byte stream has no point at which it can be cut safely, so
/// callers bound the wait with their drain timeout.
pub async fn serve_tcp(
    listener: TcpListener,
    cx: ListenerContext,
    shutdown: impl Future<Output = ()>,
) {
    let Some(index) = cx.index() else {
        return;
    };
    let max = cx.limits.max_connections;
    let permits = Arc::new(Semaphore::new(max));
    let labels = [("listener", cx.name.to_string())];
    let active = metrics::gauge!(crate::metrics::DOWNSTREAM_CONNECTIONS, &labels);
    let accepted = metrics::counter!(crate::metrics::DOWNSTREAM_CONNECTIONS_TOTAL, &labels);
    tokio::pin!(shutdown);
    loop {
        let (stream, client, permit) = tokio::select! {
            c = accept(&listener, &permits, &cx.name) => c,
            () = &mut shutdown => break,
        };
        accepted.increment(1);
        let cx = cx.clone();
        let active = active.clone();
        tokio::spawn(async move {
            active.increment(1.0);
            relay(&cx, index, stream, client).await;
            active.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    let open = max - permits.available_permits();
    tracing::info!(listener = &*cx.name, open, "draining tcp connections");
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Outcome of one relayed connection, for the log line and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Closed,
    NoEndpoints,
    ConnectFailed,
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::NoEndpoints => "no_endpoints",
            Self::ConnectFailed => "connect_failed",
            Self::Error => "error",
        }
    }
}

async fn relay(cx: &ListenerContext, index: usize, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    // Only the backend is kept for the connection's life, not the whole table: a connection
    // can last hours and must not pin an old generation's routes in memory.
    let (backend, idle, access_log) = {
        let guard = cx.table.load();
        let Some(table) = guard.as_ref() else {
            return;
        };
        let Some(tcp) = table.listeners.get(index).and_then(|l| l.tcp.as_ref()) else {
            return;
        };
        (Arc::clone(&tcp.backend), tcp.idle_timeout, table.access_log)
    };
    let (outcome, upstream, sent, received) = match connect(&backend, client).await {
        Err(outcome) => (outcome, None, 0, 0),
        Ok((ep, upstream)) => {
            let _in_flight = ep.state.start();
            let mut down = IdleTimeout::new(downstream, idle);
            let mut up = upstream;
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((to_up, to_down)) => (Outcome::Closed, Some(ep.addr), to_up, to_down),
                Err(e) => {
                    tracing::debug!(listener = &*cx.name, %client, error = %e, "tcp relay ended with an error");
                    (Outcome::Error, Some(ep.addr), 0, 0)
                }
            }
        }
    };
    metrics::counter!(
        crate::metrics::TCP_CONNECTIONS,
        "listener" => cx.name.to_string(),
        "backend" => backend.name.to_string(),
        "result" => outcome.label(),
    )
    .increment(1);
    if access_log {
        tracing::info!(
            target: "strait::access",
            listener = &*cx.name,
            client = %client,
            upstream = upstream.map(tracing::field::display),
            result = outcome.label(),
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            bytes_sent = sent,
            bytes_received = received,
        );
    }
}

/// Connects to an endpoint of `backend`, trying another pick when a connect fails.
async fn connect(backend: &Backend, client: SocketAddr) -> Result<(&Endpoint, TcpStream), Outcome> {
    let mut hash = backend
        .hash_key
        .is_some()
        .then(|| crate::balancer::ip_hash(client.ip()));
    for _ in 0..CONNECT_ATTEMPTS.min(backend.endpoints.len()) {
        let Some(i) = backend.pick(hash) else {
            break;
        };
        let ep = &backend.endpoints[i];
        match tokio::time::timeout(backend.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                backend.record(ep, health::Outcome::Success);
                return Ok((ep, stream));
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = &*backend.name, endpoint = %ep.addr, error = %e, "tcp connect failed");
            }
            Err(_) => {
                tracing::warn!(backend = &*backend.name, endpoint = %ep.addr, timeout = ?backend.connect_timeout, "tcp connect timed out");
            }
        }
        backend.connect_failures.increment(1);
        // For a relayed connection, whether the endpoint accepted it is all Strait can tell.
        backend.record(ep, health::Outcome::LocalFailure);
        // The affinity endpoint is down: any other endpoint is better than none.
        hash = None;
    }
    if backend.endpoints.is_empty() {
        tracing::warn!(
            backend = &*backend.name,
            reason = %backend.unavailable_reason(),
            "tcp connection closed: backend has no endpoints"
        );
        Err(Outcome::NoEndpoints)
    } else {
        Err(Outcome::ConnectFailed)
    }
}
