//! Keep-alive HTTP/1.1 connections to one endpoint.
//!
//! Every endpoint keeps its idle connections in its [`EndpointState`](crate::endpoint::EndpointState),
//! which outlives table swaps, so a reload keeps warm connections. A request takes an idle
//! connection (or opens one), sends on it, and the response body hands it back once it has
//! been read to the end ([`PooledConn::release`]); a body dropped early drops the connection,
//! since it cannot carry another request before the rest of the response is read.
//!
//! This replaces hyper-util's pooled client, which per request hashed a pool key under a
//! mutex, boxed the response future, and spawned a task to wait for the connection to become
//! ready again. Here the idle list is a lock-free queue, and the connection's own task does
//! the waiting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use crate::body::ProxyBody;
use crate::breaker::{BackendState, Breaker, ConnectionSlot};
use crate::endpoint::clock_ns;
use crate::error::ProxyError;
use crate::upstream::{connect_tcp, handshake_failed, is_idempotent, root_cause, tls_handshake};
use crate::upstream_tls::UpstreamTls;

/// `idle_since` of a connection that is carrying a request.
const IN_USE: u64 = u64::MAX;
/// `idle_since` of a connection its idle timer has closed.
const CLOSED: u64 = u64::MAX - 1;
/// Idle connections found unusable (closed by the server meanwhile) before opening a new
/// one. Each costs only a queue pop, but a queue full of dead connections after a quiet
/// period must not delay a request for long.
const MAX_STALE_POPS: usize = 16;
/// Times a request is sent again on another connection: after a connection closed just as
/// it was handed the request (never written), or after a connection idle for
/// [`RESEND_AFTER_IDLE`] failed before answering.
const MAX_RESENDS: usize = 2;
/// Idle time after which a reused connection may have been closed by the server's own
/// keep-alive timeout (commonly 2 to 75 seconds) while our request was on its way.
const RESEND_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How a backend's HTTP/1.1 connections are made and kept.
#[derive(Debug, Clone)]
pub struct Http1Settings {
    /// TCP connect timeout (and TLS handshake timeout).
    pub connect_timeout: Duration,
    /// Idle connections kept per endpoint; 0 closes each connection after its request.
    pub max_idle: usize,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// TLS to the endpoint, when the backend has `tls`.
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Http1Settings {
    fn tls_fingerprint(&self) -> u64 {
        self.tls.as_deref().map_or(0, UpstreamTls::fingerprint)
    }
}

/// The idle HTTP/1.1 connections of one endpoint.
#[derive(Debug, Default)]
pub struct Http1Pool {
    /// Made on the first hand-back (most endpoints of a large cluster never get a request
    /// through a given replica), and made again when `max_idle` changes.
    idle: ArcSwapOption<ArrayQueue<Idle>>,
    /// Requests waiting for a connection slot of the backend (`max_connections` reached),
    /// which a connection handed back here serves as well.
    waiting: AtomicUsize,
    /// Signalled on a hand-back while `waiting` is not zero.
    released: Notify,
}

/// An idle connection.
#[derive(Debug)]
struct Idle {
    sender: SendRequest<ProxyBody>,
    shared: Arc<Shared>,
}

/// What a connection's sender and its task share.
#[derive(Debug)]
struct Shared {
    /// `clock_ns()` when it went idle, or [`IN_USE`], or [`CLOSED`].
    idle_since: AtomicU64,
    /// [`UpstreamTls::fingerprint`] of the settings it was made with (0: cleartext), so a
    /// reload that changes them does not keep using it.
    tls: u64,
}

/// A connection carrying a request. Hand it back with [`release`](Self::release) once the
/// response has been read to the end; dropping it closes the connection.
#[derive(Debug)]
pub struct PooledConn {
    sender: SendRequest<ProxyBody>,
    shared: Arc<Shared>,
    /// Where it goes back to, and how many may wait there.
    pool: Arc<crate::endpoint::EndpointState>,
    max_idle: usize,
}

impl PooledConn {
    /// Returns the connection to its endpoint's idle list, or closes it when the list is
    /// full or pooling is off.
    pub fn release(self) {
        if self.max_idle == 0 || self.sender.is_closed() {
            return;
        }
        let pool = &self.pool.http1;
        self.shared.idle_since.store(clock_ns(), Ordering::Release);
        let idle = Idle {
            sender: self.sender,
            shared: self.shared,
        };
        // A full list drops the connection, which closes it.
        let current = pool.idle.load();
        let pushed = match current.as_deref() {
            Some(q) if q.capacity() == self.max_idle => q.push(idle).is_ok(),
            // First hand-back, or `max_idle` changed: a new list (the old one's connections
            // close as it is dropped).
            _ => {
                let q = ArrayQueue::new(self.max_idle);
                let pushed = q.push(idle).is_ok();
                pool.idle.store(Some(Arc::new(q)));
                pushed
            }
        };
        // SeqCst, paired with the waiter's: either it sees the push or this sees it waiting.
        if pushed && pool.waiting.load(Ordering::SeqCst) > 0 {
            pool.released.notify_waiters();
        }
    }
}

impl Http1Pool {
    /// An idle connection made with `tls`, ready for a request, if there is one.
    async fn checkout(&self, tls: u64) -> Option<Ready> {
        for _ in 0..MAX_STALE_POPS {
            // The guard is not held across the wait below: a guard pins its list.
            let Idle { mut sender, shared } = self.idle.load().as_deref()?.pop()?;
            let since = shared.idle_since.swap(IN_USE, Ordering::AcqRel);
            if since == CLOSED || shared.tls != tls || sender.is_closed() {
                continue;
            }
            // Handed back as soon as the response body ended, the connection's task may not
            // have taken note yet; it will at its next poll, or find the server closed it.
            if sender.is_ready() || sender.ready().await.is_ok() {
                let idle = Duration::from_nanos(clock_ns().saturating_sub(since));
                return Some((sender, shared, idle));
            }
        }
        None
    }

    /// Waits, up to `timeout`, for a connection slot of the backend or a connection handed
    /// back to this endpoint, whichever comes first.
    async fn slot_or_idle(
        &self,
        backend: &Arc<BackendState>,
        tls: u64,
        timeout: Duration,
    ) -> Result<Conn, ProxyError> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            // Registered before looking, so a hand-back between the look and the wait is seen.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(idle) = self.checkout(tls).await {
                return Ok(Conn::Idle(idle));
            }
            tokio::select! {
                slot = backend.connection_slot() => return Ok(Conn::Slot(slot)),
                () = &mut released => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProxyError::CircuitOpen(Breaker::MaxConnections));
                }
            }
        }
    }
}

/// A connection ready for a request, and how long it had been idle (zero when new).
type Ready = (SendRequest<ProxyBody>, Arc<Shared>, Duration);

/// A connection handed back by another request, or the right to open one.
enum Conn {
    Idle(Ready),
    Slot(ConnectionSlot),
}

/// Sends `req` to the endpoint on an idle connection or a new one. The connection comes back
/// with the response, to be [released](PooledConn::release) when the body has been read.
pub async fn send(
    endpoint: &Arc<crate::endpoint::EndpointState>,
    backend: &Arc<BackendState>,
    settings: &Http1Settings,
    mut req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, PooledConn), ProxyError> {
    let addr = endpoint.addr();
    let tls = settings.tls_fingerprint();
    let mut resends = 0;
    let mut fresh = false;
    loop {
        let pooled = if fresh {
            None
        } else {
            endpoint.http1.checkout(tls).await
        };
        let (mut sender, shared, idle) = match pooled {
            Some(c) => c,
            // Boxed: connecting (TCP, TLS, handshake) is a large future, rarely needed; left
            // inline it would make every request's future as large, and hyper moves that.
            // (Bound first: a temporary in the awaited expression would keep its unboxed
            // size in this future's state, since it lives until the statement ends.)
            None => {
                let connecting = Box::pin(connect(endpoint, backend, settings));
                connecting.await?
            }
        };
        // A server may close a connection that has been idle for a while at any moment,
        // also while our request is on its way: the request then fails without an answer.
        // For a request that can safely be sent twice, keep a copy to send on a new
        // connection (as nginx retries a cached connection). Busy connections are never
        // idle that long, so this copy is off the loaded path.
        let copy = (idle >= RESEND_AFTER_IDLE && resends < MAX_RESENDS)
            .then(|| resendable_copy(&req))
            .flatten();
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let conn = PooledConn {
                    sender,
                    shared,
                    pool: Arc::clone(endpoint),
                    max_idle: settings.max_idle,
                };
                return Ok((resp, conn));
            }
            Err(mut e) => match (e.take_message(), copy) {
                // Never written: the connection closed as it was handed the request.
                (Some(unsent), _) if resends < MAX_RESENDS => {
                    resends += 1;
                    req = unsent;
                }
                (None, Some(copy)) => {
                    tracing::debug!(%addr, error = %e.error(), ?idle,
                        "reused connection failed before answering; sending again on a new one");
                    resends += 1;
                    req = copy;
                    fresh = true;
                }
                _ => {
                    return Err(ProxyError::Upstream {
                        addr,
                        reason: root_cause(e.error()),
                    })
                }
            },
        }
    }
}

/// A copy of a request without a body and with an idempotent method (RFC 9110 section
/// 9.2.2), the only kind sent again after it may have reached the server.
fn resendable_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    if !is_idempotent(req.method()) || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(ProxyBody::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Opens a connection: a connection slot of the backend (`max_connections`), TCP, TLS when
/// configured, the HTTP/1.1 handshake; the connection then runs in its own task, which also
/// closes it after `idle_timeout` unused.
async fn connect(
    endpoint: &crate::endpoint::EndpointState,
    backend: &Arc<BackendState>,
    settings: &Http1Settings,
) -> Result<Ready, ProxyError> {
    let addr = endpoint.addr();
    let timeout = settings.connect_timeout;
    let slot = match backend.try_connection_slot() {
        Some(slot) => slot,
        None => {
            let tls = settings.tls_fingerprint();
            match endpoint.http1.slot_or_idle(backend, tls, timeout).await? {
                Conn::Slot(slot) => slot,
                Conn::Idle(ready) => return Ok(ready),
            }
        }
    };
    let tcp = connect_tcp(addr, timeout).await?;
    let shared = Arc::new(Shared {
        idle_since: AtomicU64::new(IN_USE),
        tls: settings.tls_fingerprint(),
    });
    let sender = match &settings.tls {
        None => handshake(tcp, addr, settings.idle_timeout, &shared, slot).await?,
        Some(tls) => {
            let stream = tls_handshake(tls, tcp, addr, timeout).await?;
            handshake(stream, addr, settings.idle_timeout, &shared, slot).await?
        }
    };
    Ok((sender, shared, Duration::ZERO))
}

async fn handshake<T>(
    io: T,
    addr: SocketAddr,
    idle_timeout: Duration,
    shared: &Arc<Shared>,
    slot: ConnectionSlot,
) -> Result<SendRequest<ProxyBody>, ProxyError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| handshake_failed(addr, &e))?;
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        // Counted against `max_connections` until the connection ends.
        let _slot = slot;
        // Upgrades (WebSocket): after a 101 the socket goes to the tunnel.
        let conn = conn.with_upgrades();
        tokio::pin!(conn);
        let idle_timer = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle_timer);
        loop {
            tokio::select! {
                biased;
                r = &mut conn => {
                    if let Err(e) = r {
                        tracing::debug!(%addr, error = %e, "upstream connection closed");
                    }
                    return;
                }
                () = &mut idle_timer => {
                    let since = shared.idle_since.load(Ordering::Acquire);
                    let now = clock_ns();
                    let due = since.saturating_add(idle_timeout.as_nanos() as u64);
                    if since < CLOSED && due <= now {
                        // Unless a request took it meanwhile, it closes here; the idle list
                        // discards it when it next comes up.
                        if shared
                            .idle_since
                            .compare_exchange(since, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            return;
                        }
                    }
                    // In use, or idle for less than the timeout: look again when it could be due.
                    let wait = if since < CLOSED {
                        Duration::from_nanos(due.saturating_sub(now))
                    } else {
                        idle_timeout
                    };
                    idle_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + wait.max(Duration::from_millis(1)));
                }
            }
        }
    });
    Ok(sender)
}
