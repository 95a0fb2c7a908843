//! Circuit breaking: per-backend counters of requests, retries and connections, checked
//! before a request is sent so that an overloaded backend gets a fast 503 instead of an
//! unbounded queue (Envoy's thresholds). The counters live outside the routing table, in a
//! registry keyed by backend name, so a reload does not reset them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::client::TlsStream;

use crate::table::spec::CircuitBreakerSpec;
use crate::upstream_tls::{TlsConnectError, UpstreamTls};

/// Which threshold turned a request away; the value of the `x-strait-circuit-breaker`
/// response header and of the `breaker` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// `max_requests`.
    MaxRequests,
    /// `max_pending_requests`.
    MaxPendingRequests,
    /// `max_retries` or the retry budget (the retry is skipped, not the request).
    MaxRetries,
    /// `max_connections`: no connection slot freed up within the connect timeout.
    MaxConnections,
}

/// A connect that found every connection slot taken for its whole connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker max_connections: no connection slot within the connect timeout")]
pub struct ConnectionLimit;

impl Breaker {
    /// The threshold's name as configured.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxPendingRequests => "max_pending_requests",
            Self::MaxRetries => "max_retries",
            Self::MaxConnections => "max_connections",
        }
    }
}

/// Live counters of one backend, shared by every table generation that has it.
#[derive(Debug, Default)]
pub struct BackendState {
    requests: AtomicU32,
    retries: AtomicU32,
    connections: AtomicU32,
    /// `max_connections` for the connector, which outlives tables: set at each compile.
    max_connections: AtomicU32,
    connection_closed: Notify,
    /// Endpoints ejected by outlier detection.
    pub(crate) ejected: AtomicU32,
    /// Endpoints ejected or failing active health checks.
    pub(crate) unavailable: AtomicU32,
}

impl BackendState {
    /// Takes a request slot, or names the threshold in the way: `max_requests`, or for
    /// HTTP/1.1 (`pooled`, one request per connection) `max_pending_requests`, the requests
    /// beyond `max_connections` being the ones that wait for a connection.
    pub fn try_request(
        self: &Arc<Self>,
        cb: &CircuitBreakerSpec,
        pooled: bool,
    ) -> Result<Slot, Breaker> {
        let limit = if pooled {
            cb.max_requests
                .min(cb.max_connections.saturating_add(cb.max_pending_requests))
        } else {
            cb.max_requests
        };
        if take(&self.requests, limit) {
            return Ok(Slot {
                state: Arc::clone(self),
                retry: false,
            });
        }
        if self.requests() >= cb.max_requests {
            Err(Breaker::MaxRequests)
        } else {
            Err(Breaker::MaxPendingRequests)
        }
    }

    /// Takes a retry slot within `cb`'s retry limit (or budget), or `None`.
    pub fn try_retry(self: &Arc<Self>, cb: &CircuitBreakerSpec) -> Option<Slot> {
        let limit = match &cb.retry_budget {
            Some(b) => {
                let share = u64::from(self.requests()) * u64::from(b.percent) / 100;
                u32::try_from(share)
                    .unwrap_or(u32::MAX)
                    .max(b.min_concurrency)
            }
            None => cb.max_retries,
        };
        take(&self.retries, limit).then(|| Slot {
            state: Arc::clone(self),
            retry: true,
        })
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Open upstream connections.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Endpoints currently ejected by outlier detection.
    pub fn ejected(&self) -> u32 {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Endpoints currently ejected or failing active health checks.
    pub fn unavailable(&self) -> u32 {
        self.unavailable.load(Ordering::Relaxed)
    }

    /// Applies a table's thresholds to the connection limiter.
    pub fn set_limits(&self, cb: &CircuitBreakerSpec) {
        self.max_connections
            .store(cb.max_connections, Ordering::Relaxed);
        // A raised limit may let waiting connects go.
        self.connection_closed.notify_waiters();
    }

    /// Waits for a connection slot. The wait is bounded in number, not time: requests past
    /// `max_connections + max_pending_requests` are refused before they get here, and a
    /// request that gets a pooled connection meanwhile stops waiting (the route timeout
    /// bounds the rest).
    async fn connection_slot(self: &Arc<Self>) -> ConnectionSlot {
        loop {
            // Register before checking, so a close between the check and the wait is seen.
            let closed = self.connection_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if take(
                &self.connections,
                self.max_connections.load(Ordering::Relaxed),
            ) {
                return ConnectionSlot(Arc::clone(self));
            }
            closed.await;
        }
    }
}

/// Increments `counter` unless it has reached `max`. One `fetch_add` (undone on overflow)
/// rather than a compare-and-swap loop, which would retry under contention on every request.
fn take(counter: &AtomicU32, max: u32) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) < max {
        return true;
    }
    counter.fetch_sub(1, Ordering::Relaxed);
    false
}

/// A request (or retry) counted against its backend's thresholds until dropped.
#[derive(Debug)]
pub struct Slot {
    state: Arc<BackendState>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if self.retry {
            &self.state.retries
        } else {
            &self.state.requests
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open upstream connection, released when the connection is dropped.
#[derive(Debug)]
struct ConnectionSlot(Arc<BackendState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.connection_closed.notify_one();
    }
}

/// Backend states by name, kept while a table uses them.
#[derive(Debug, Default)]
pub struct BackendRegistry {
    map: Mutex<HashMap<Arc<str>, Weak<BackendState>>>,
}

impl BackendRegistry {
    /// The state of backend `name`: the existing one while any table holds it.
    pub fn get(&self, name: &Arc<str>) -> Arc<BackendState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(BackendState::default());
        map.insert(Arc::clone(name), Arc::downgrade(&s));
        s
    }

    /// Forgets backends no table holds any more.
    pub fn prune(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }
}

/// The HTTP/1.1 client's connector: a TCP connect that first takes a connection slot of
/// the backend, so `max_connections` and `max_pending_requests` hold whatever the pool does;
/// for a backend with `tls`, the TLS handshake follows on the same slot.
#[derive(Debug, Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    state: Arc<BackendState>,
    /// TLS settings and the handshake timeout.
    tls: Option<(Arc<UpstreamTls>, Duration)>,
    /// Longest wait for a connection slot.
    wait: Duration,
}

impl LimitedConnector {
    /// Wraps `inner`, counting its connections against `state`.
    /// Waiting for a connection slot is bounded by `wait` (the backend's connect timeout):
    /// idle pooled connections hold slots too, and a wait must not outlive its request.
    pub fn new(inner: HttpConnector, state: Arc<BackendState>, wait: Duration) -> Self {
        Self {
            inner,
            state,
            tls: None,
            wait,
        }
    }

    /// Makes every connection TLS, each handshake allowed `timeout`.
    pub fn with_tls(mut self, tls: Arc<UpstreamTls>, timeout: Duration) -> Self {
        self.tls = Some((tls, timeout));
        self
    }
}

impl tower_service::Service<Uri> for LimitedConnector {
    type Response = LimitedConnection;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let state = Arc::clone(&self.state);
        let tls = self.tls.clone();
        let wait = self.wait;
        Box::pin(async move {
            let slot = tokio::time::timeout(wait, state.connection_slot())
                .await
                .map_err(|_| ConnectionLimit)?;
            let io = inner.call(uri).await?;
            let io = match tls {
                None => Io::Plain(io),
                Some((tls, timeout)) => {
                    let tcp = io.into_inner();
                    let addr = tcp.peer_addr()?;
                    let stream = tls.connect(tcp, addr, timeout).await.map_err(|e| {
                        // A timeout must read as one, so the request gets 504 like a
                        // TCP connect timeout.
                        let boxed: Self::Error = match e {
                            TlsConnectError::Timeout { .. } => {
                                Box::new(io::Error::new(io::ErrorKind::TimedOut, e))
                            }
                            e => Box::new(e),
                        };
                        boxed
                    })?;
                    Io::Tls(Box::new(TokioIo::new(stream)))
                }
            };
            Ok(LimitedConnection { io, _slot: slot })
        })
    }
}

/// A plain or TLS upstream connection. The TLS state is boxed: it is large, and plain
/// connections should not carry its size.
#[derive(Debug)]
enum Io {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

/// A connection that holds its backend's connection slot.
#[derive(Debug)]
pub struct LimitedConnection {
    io: Io,
    _slot: ConnectionSlot,
}

impl Connection for LimitedConnection {
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(io) => io.connected(),
            // ALPN http/1.1 only (see `UpstreamTls`): never HTTP/2 here.
            Io::Tls(io) => io.inner().get_ref().0.connected(),
        }
    }
}

/// Forwards an I/O call to whichever stream the connection has.
macro_rules! io_call {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $e
            }
        }
    };
}

impl Read for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_read(cx, buf))
    }
}

impl Write for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_connections_are_pending_and_bounded() {
        let s = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            max_connections: 2,
            max_pending_requests: 1,
            max_requests: 10,
            ..CircuitBreakerSpec::default()
        };
        let a = s.try_request(&cb, true).unwrap();
        let _b = s.try_request(&cb, true).unwrap();
        let _c = s.try_request(&cb, true).unwrap();
        assert_eq!(
            s.try_request(&cb, true).unwrap_err(),
            Breaker::MaxPendingRequests
        );
        drop(a);
        assert!(s.try_request(&cb, true).is_ok());
        // HTTP/2 multiplexes: only max_requests applies.
        let h2 = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            max_requests: 4,
            ..cb
        };
        let _held: Vec<_> = (0..4)
            .map(|_| h2.try_request(&cb, false).unwrap())
            .collect();
        assert_eq!(
            h2.try_request(&cb, false).unwrap_err(),
            Breaker::MaxRequests
        );
    }

    #[test]
    fn retry_budget_scales_with_requests() {
        let s = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            retry_budget: Some(crate::table::spec::RetryBudgetSpec {
                percent: 20,
                min_concurrency: 1,
            }),
            ..CircuitBreakerSpec::default()
        };
        let _reqs: Vec<_> = (0..10)
            .map(|_| s.try_request(&cb, false).unwrap())
            .collect();
        let r1 = s.try_retry(&cb).unwrap();
        let _r2 = s.try_retry(&cb).unwrap();
        assert!(s.try_retry(&cb).is_none(), "20% of 10 is 2");
        drop(r1);
        assert!(s.try_retry(&cb).is_some());
    }

    #[tokio::test]
    async fn connects_wait_for_a_closed_connection() {
        let s = Arc::new(BackendState::default());
        s.set_limits(&CircuitBreakerSpec {
            max_connections: 1,
            ..CircuitBreakerSpec::default()
        });
        let first = s.connection_slot().await;
        let waiting = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.connection_slot().await }
        });
        // This test runs on one thread: yielding lets the waiter run and find no slot.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!(s.connections(), 1);
        drop(second);
        assert_eq!(s.connections(), 0);
    }
}
