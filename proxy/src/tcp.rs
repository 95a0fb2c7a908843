//! `tcp` listeners: every accepted connection is relayed, byte for byte, to one endpoint of
//! the listener's backend, picked by the backend's policy when the connection arrives. With
//! `sni` rules the backend is chosen by the TLS server name first (see [`passthrough`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::health;
use crate::listener::{Acceptor, IdleTimeout, ListenerContext};
use crate::passthrough::{self, HelloError, SniRoutes};
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
    let acceptor = Acceptor::new(listener, &cx);
    tokio::pin!(shutdown);
    loop {
        let (stream, client, slot) = tokio::select! {
            c = acceptor.next() => c,
            () = &mut shutdown => break,
        };
        let cx = cx.clone();
        tokio::spawn(async move {
            relay(&cx, index, stream, client).await;
            drop(slot);
        });
    }
    acceptor.close_and_wait().await;
}

/// Outcome of one relayed connection, for the log line and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Closed,
    NoEndpoints,
    ConnectFailed,
    Error,
    /// TLS passthrough: no rule for the server name, and no default backend.
    NoRoute,
    /// TLS passthrough: the client's first bytes were not a TLS ClientHello.
    NotTls,
    /// TLS passthrough: no complete ClientHello in time.
    HelloTimeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::NoEndpoints => "no_endpoints",
            Self::ConnectFailed => "connect_failed",
            Self::Error => "error",
            Self::NoRoute => "no_route",
            Self::NotTls => "not_tls",
            Self::HelloTimeout => "hello_timeout",
        }
    }
}

/// What happened to one connection, for the metric and the access log.
struct Relayed {
    outcome: Outcome,
    backend: Option<Arc<Backend>>,
    sni: Option<String>,
    upstream: Option<SocketAddr>,
    sent: u64,
    received: u64,
}

async fn relay(cx: &ListenerContext, index: usize, downstream: TcpStream, client: SocketAddr) {
    let start = Instant::now();
    // Only the backends are kept for the connection's life, not the whole table: a
    // connection can last hours and must not pin an old generation's routes in memory.
    let (backend, sni, idle, access_log) = {
        let guard = cx.table.load();
        let Some(table) = guard.as_ref() else {
            return;
        };
        let Some(tcp) = table.listener(index, &cx.name).and_then(|l| l.tcp.as_ref()) else {
            return;
        };
        (
            tcp.backend.clone(),
            tcp.sni.clone(),
            tcp.idle_timeout,
            table.access_log,
        )
    };
    let r = forward(&cx.name, backend, sni, idle, downstream, client).await;
    let backend = r.backend.as_ref().map(|b| &*b.name).unwrap_or("");
    metrics::counter!(
        crate::metrics::TCP_CONNECTIONS,
        "listener" => cx.name.to_string(),
        "backend" => backend.to_owned(),
        "result" => r.outcome.label(),
    )
    .increment(1);
    if access_log {
        tracing::info!(
            target: "strait::access",
            listener = &*cx.name,
            client = %client,
            sni = r.sni.as_deref(),
            backend,
            upstream = r.upstream.map(tracing::field::display),
            result = r.outcome.label(),
            duration_ms = start.elapsed().as_secs_f64() * 1e3,
            bytes_sent = r.sent,
            bytes_received = r.received,
        );
    }
}

/// Picks the backend (by SNI for TLS passthrough), connects, and relays until either side
/// closes.
async fn forward(
    listener: &str,
    default: Option<Arc<Backend>>,
    sni: Option<Arc<SniRoutes>>,
    idle: Duration,
    mut downstream: TcpStream,
    client: SocketAddr,
) -> Relayed {
    let mut r = Relayed {
        outcome: Outcome::Closed,
        backend: None,
        sni: None,
        upstream: None,
        sent: 0,
        received: 0,
    };
    let mut hello = Vec::new();
    let backend = match sni {
        None => default,
        Some(routes) => match passthrough::read_client_hello(&mut downstream).await {
            Ok(h) => {
                let picked = routes.pick(h.sni.as_deref(), default.as_ref()).cloned();
                r.sni = h.sni;
                hello = h.bytes;
                picked
            }
            Err(e) => {
                tracing::debug!(listener, %client, error = %e, "tls passthrough: connection closed");
                r.outcome = match e {
                    HelloError::Timeout(_) => Outcome::HelloTimeout,
                    HelloError::NotTls(_) | HelloError::TooLarge(_) => Outcome::NotTls,
                    HelloError::Closed => Outcome::Closed,
                    HelloError::Io(_) => Outcome::Error,
                };
                return r;
            }
        },
    };
    let Some(backend) = backend else {
        tracing::debug!(listener, %client, sni = r.sni.as_deref(), "tls passthrough: no backend for the server name; connection closed");
        r.outcome = Outcome::NoRoute;
        return r;
    };
    r.backend = Some(Arc::clone(&backend));
    let (ep, mut up) = match connect(&backend, client).await {
        Ok(c) => c,
        Err(outcome) => {
            r.outcome = outcome;
            return r;
        }
    };
    r.upstream = Some(ep.addr);
    let _in_flight = ep.state.start();
    // What was read to find the server name goes first, byte for byte.
    if !hello.is_empty() {
        if let Err(e) = up.write_all(&hello).await {
            tracing::debug!(listener, %client, error = %e, "tcp relay ended with an error");
            r.outcome = Outcome::Error;
            return r;
        }
        r.sent = hello.len() as u64;
        drop(hello);
    }
    let mut down = IdleTimeout::new(downstream, idle);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_up, to_down)) => {
            r.sent += to_up;
            r.received = to_down;
        }
        Err(e) => {
            tracing::debug!(listener, %client, error = %e, "tcp relay ended with an error");
            r.outcome = Outcome::Error;
        }
    }
    r
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
