//! Keep-alive HTTP/1.1 connections to one endpoint.
//!
//! Every endpoint keeps its idle connections in its [`EndpointState`](crate::endpoint::EndpointState),
//! which outlives table swaps, so a reload keeps warm connections. A request takes an idle
//! connection (or opens one), runs its exchange on it in its own task ([`crate::h1_client`]),
//! and the response body hands it back once both directions have ended cleanly; a body
//! dropped early drops the connection, since it cannot carry another request before the rest
//! of the response is read.
//!
//! The idle list is a lock-free queue, one per worker thread ([`crate::workers`]): a
//! connection's socket is registered with the runtime of the worker that opened it, and a
//! request on another worker would have that runtime wake it for every read. An idle
//! connection has no task: the server closing it is noticed when it is next taken (tokio has
//! marked the socket readable), and a per-endpoint reaper closes connections idle for longer
//! than `idle_timeout`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::Response;
use http_body::Body as _;
use tokio::sync::Notify;

use crate::body::ProxyBody;
use crate::breaker::{BackendState, Breaker, ConnectionSlot};
use crate::clock::clock_ns;
use crate::endpoint::EndpointState;
use crate::error::ProxyError;
use crate::h1_client::{Conn, Exchange, ExchangeError, Io, RequestHead};
use crate::upstream::{connect_tcp, is_idempotent, tls_handshake};
use crate::upstream_tls::UpstreamTls;

/// Idle connections found unusable (closed by the server meanwhile) before opening a new
/// one. Each costs only a queue pop, but a queue full of dead connections after a quiet
/// period must not delay a request for long.
const MAX_STALE_POPS: usize = 16;
/// Times a request is sent again on another connection: after a connection failed before
/// any byte of the request was written, or after a connection idle for
/// [`RESEND_AFTER_IDLE`] failed before answering.
const MAX_RESENDS: usize = 2;
/// Idle time after which a reused connection may have been closed by the server's own
/// keep-alive timeout (commonly 2 to 75 seconds) while our request was on its way.
const RESEND_AFTER_IDLE: Duration = Duration::from_secs(1);
/// The reaper looks at the idle list at most this many times per `idle_timeout`, so a
/// connection closes at most an eighth of the timeout late.
const REAPS_PER_TIMEOUT: u32 = 8;

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

/// One worker's idle connections to an endpoint.
type IdleList = ArcSwapOption<ArrayQueue<Box<Conn>>>;

/// The idle HTTP/1.1 connections of one endpoint.
#[derive(Debug)]
pub struct Http1Pool {
    /// One list per worker. Each is made on its first hand-back (most endpoints of a large
    /// cluster never get a request through a given replica), and made again when `max_idle`
    /// changes.
    idle: Box<[IdleList]>,
    /// Requests waiting for a connection slot of the backend (`max_connections` reached),
    /// which a connection handed back here serves as well.
    waiting: AtomicUsize,
    /// Signalled on a hand-back while `waiting` is not zero.
    released: Notify,
    /// Whether a reaper task is watching the idle list.
    reaping: AtomicBool,
}

impl Default for Http1Pool {
    fn default() -> Self {
        Self {
            idle: (0..crate::workers::count())
                .map(|_| IdleList::default())
                .collect(),
            waiting: AtomicUsize::new(0),
            released: Notify::new(),
            reaping: AtomicBool::new(false),
        }
    }
}

/// Where a response's connection goes back to, and how it is kept there.
#[derive(Debug)]
pub(crate) struct Home {
    endpoint: Arc<EndpointState>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Home {
    /// Returns the connection to its endpoint's idle list, or closes it when the list is
    /// full or pooling is off.
    pub(crate) fn put(self, mut conn: Box<Conn>) {
        if self.max_idle == 0 {
            return;
        }
        let pool = &self.endpoint.http1;
        conn.trim();
        conn.idle_since = clock_ns();
        // A full list drops the connection, which closes it. The list of the worker that
        // opened it, also when a request on another worker borrowed it (`checkout_any`).
        let list = pool.list(conn.worker);
        let current = list.load();
        let pushed = match current.as_deref() {
            Some(q) if q.capacity() == self.max_idle => q.push(conn).is_ok(),
            // First hand-back, or `max_idle` changed: a new list (the old one's connections
            // close as it is dropped).
            _ => {
                let q = ArrayQueue::new(self.max_idle);
                let pushed = q.push(conn).is_ok();
                list.store(Some(Arc::new(q)));
                pushed
            }
        };
        if !pushed {
            return;
        }
        // SeqCst, paired with the waiter's: either it sees the push or this sees it waiting.
        if pool.waiting.load(Ordering::SeqCst) > 0 {
            pool.released.notify_waiters();
        }
        // Read first: the flag is set nearly always, and a read does not take the cache line.
        if !pool.reaping.load(Ordering::Acquire) && !pool.reaping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(reap(Arc::downgrade(&self.endpoint), self.idle_timeout))),
                // Only while the process shuts down: nothing will use the connection.
                Err(_) => pool.reaping.store(false, Ordering::Release),
            }
        }
    }
}

/// Closes the endpoint's connections that have been idle for `idle_timeout`, until none is
/// left idle (or the endpoint is gone).
async fn reap(endpoint: Weak<EndpointState>, idle_timeout: Duration) {
    let timeout_ns = idle_timeout.as_nanos() as u64;
    let least = idle_timeout / REAPS_PER_TIMEOUT;
    loop {
        let next = {
            let Some(ep) = endpoint.upgrade() else { return };
            let pool = &ep.http1;
            let now = clock_ns();
            let mut soonest = None;
            // Every connection is looked at once; a request may miss one meanwhile and open
            // another, which is harmless and rare (a few times per timeout).
            for q in pool.idle.iter().filter_map(ArcSwapOption::load_full) {
                for _ in 0..q.len() {
                    let Some(conn) = q.pop() else { break };
                    let due = conn.idle_since.saturating_add(timeout_ns);
                    if due <= now {
                        continue;
                    }
                    soonest = Some(soonest.map_or(due, |s: u64| s.min(due)));
                    // Full again (hand-backs meanwhile): this one closes, as any surplus would.
                    let _ = q.push(conn);
                }
            }
            match soonest {
                Some(due) => Duration::from_nanos(due - now).max(least),
                None => {
                    pool.reaping.store(false, Ordering::Release);
                    // A hand-back between the last look and the flag's reset found the flag
                    // set and started no reaper: look again.
                    let empty = pool
                        .idle
                        .iter()
                        .all(|l| l.load().as_deref().is_none_or(ArrayQueue::is_empty));
                    if empty || pool.reaping.swap(true, Ordering::AcqRel) {
                        return;
                    }
                    least
                }
            }
        };
        tokio::time::sleep(next).await;
    }
}

impl Http1Pool {
    /// Worker `worker`'s idle list (the first, for a pool made before the workers started).
    fn list(&self, worker: usize) -> &IdleList {
        self.idle.get(worker).unwrap_or(&self.idle[0])
    }

    /// An idle connection of this worker made with `tls`, still open, and how long it was
    /// idle at `now` (`clock_ns()`).
    fn checkout(
        &self,
        tls: u64,
        idle_timeout: Duration,
        now: u64,
    ) -> Option<(Box<Conn>, Duration)> {
        Self::checkout_from(self.list(crate::workers::current()), tls, idle_timeout, now)
    }

    /// As [`Http1Pool::checkout`], from any worker's list, this worker's first: for a request
    /// that would otherwise wait for a connection slot of its backend.
    fn checkout_any(
        &self,
        tls: u64,
        idle_timeout: Duration,
        now: u64,
    ) -> Option<(Box<Conn>, Duration)> {
        self.checkout(tls, idle_timeout, now).or_else(|| {
            self.idle
                .iter()
                .find_map(|l| Self::checkout_from(l, tls, idle_timeout, now))
        })
    }

    fn checkout_from(
        list: &IdleList,
        tls: u64,
        idle_timeout: Duration,
        now: u64,
    ) -> Option<(Box<Conn>, Duration)> {
        let q = list.load();
        let q = q.as_deref()?;
        for _ in 0..MAX_STALE_POPS {
            let mut conn = q.pop()?;
            let idle = Duration::from_nanos(now.saturating_sub(conn.idle_since));
            if conn.tls == tls && idle < idle_timeout && conn.still_open() {
                return Some((conn, idle));
            }
        }
        None
    }

    /// Waits, up to `timeout`, for a connection slot of the backend or a connection handed
    /// back to this endpoint, whichever comes first.
    async fn slot_or_idle(
        &self,
        backend: &Arc<BackendState>,
        settings: &Http1Settings,
    ) -> Result<Acquired, ProxyError> {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let tls = settings.tls_fingerprint();
        let deadline = tokio::time::Instant::now() + settings.connect_timeout;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            // Registered before looking, so a hand-back between the look and the wait is seen.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(idle) = self.checkout_any(tls, settings.idle_timeout, clock_ns()) {
                return Ok(Acquired::Idle(idle));
            }
            tokio::select! {
                slot = backend.connection_slot() => return Ok(Acquired::Slot(slot)),
                () = &mut released => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProxyError::CircuitOpen(Breaker::MaxConnections));
                }
            }
        }
    }
}

/// A connection handed back by another request, or the right to open one.
enum Acquired {
    Idle((Box<Conn>, Duration)),
    Slot(ConnectionSlot),
}

/// Sends a request (`head`, `body`) to the endpoint on an idle connection or a new one, and
/// returns the response once its head has arrived. Its body reads from the connection, which
/// goes back to the endpoint's idle list when the body has been read to the end. `now`
/// (`clock_ns()`, the attempt's start) tells how long a pooled connection has been idle.
pub(crate) async fn send(
    endpoint: &Arc<EndpointState>,
    backend: &Arc<BackendState>,
    settings: &Http1Settings,
    head: RequestHead<'_>,
    body: ProxyBody,
    deadline: Option<Deadline>,
    now: u64,
) -> Result<Response<ProxyBody>, ProxyError> {
    let parts = head.parts;
    let addr = endpoint.addr();
    let tls = settings.tls_fingerprint();
    // A request without a body is never polled for one, so it stays whole for a resend.
    let mut body = Some(body).filter(|b| !b.is_end_stream());
    let resendable = body.is_none() && is_idempotent(&parts.method);
    let mut resends = 0;
    let mut fresh = false;
    loop {
        let pooled = if fresh {
            None
        } else {
            endpoint.http1.checkout(tls, settings.idle_timeout, now)
        };
        let (conn, idle) = match pooled {
            Some(c) => c,
            // Boxed: connecting (TCP, TLS) is a large future, rarely needed; left inline it
            // would make every request's future as large, and hyper moves that. (Bound first:
            // a temporary in the awaited expression would keep its unboxed size in this
            // future's state, since it lives until the statement ends.)
            None => {
                let connecting = Box::pin(connect(endpoint, backend, settings));
                match &deadline {
                    // Waiting for a connection slot counts too.
                    Some(d) => tokio::time::timeout_at(d.at, connecting)
                        .await
                        .map_err(|_| d.error(addr))??,
                    None => connecting.await?,
                }
            }
        };
        let mut ex = Exchange::new(conn, head, body.take(), deadline.as_ref().map(|d| d.at));
        let failure = match (ex.response_head(&parts.method).await, &deadline) {
            (Ok(head), _) => {
                let home = Home {
                    endpoint: Arc::clone(endpoint),
                    max_idle: settings.max_idle,
                    idle_timeout: settings.idle_timeout,
                };
                return Ok(ex.into_response(head, home));
            }
            (Err(ExchangeError::TimedOut), Some(d)) => return Err(d.error(addr)),
            (Err(e), _) => e,
        };
        let io_failure = matches!(failure, ExchangeError::Io(_));
        if io_failure && !ex.wrote_any && resends < MAX_RESENDS {
            // Nothing of the request was written: any connection can take it.
            body = ex.take_unsent_body();
            resends += 1;
            continue;
        }
        // A server may close a connection that has been idle for a while at any moment,
        // also while our request is on its way: the request then fails without an answer.
        // A request that can safely be sent twice goes again on a new connection (as nginx
        // retries a cached connection).
        if io_failure
            && !ex.read_any
            && resendable
            && idle >= RESEND_AFTER_IDLE
            && resends < MAX_RESENDS
        {
            tracing::debug!(%addr, error = %failure, ?idle,
                "reused connection failed before answering; sending again on a new one");
            resends += 1;
            fresh = true;
            continue;
        }
        return Err(match failure {
            ExchangeError::RequestBody(_) => {
                ProxyError::BadRequest("the request body could not be read")
            }
            e => ProxyError::Upstream {
                addr,
                reason: e.to_string(),
            },
        });
    }
}

/// When an attempt's response head is due: the route timeout or the retry policy's per-try
/// timeout, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The moment.
    pub at: tokio::time::Instant,
    /// The timeout it came from, for the error.
    pub timeout: Duration,
    /// Whether that is the per-try timeout.
    pub per_try: bool,
}

impl Deadline {
    /// The error of a request that ran out of time.
    pub fn error(&self, addr: std::net::SocketAddr) -> ProxyError {
        ProxyError::Timeout {
            addr,
            timeout: self.timeout,
            per_try: self.per_try,
        }
    }
}

/// Opens a connection: a connection slot of the backend (`max_connections`), TCP, TLS when
/// configured.
async fn connect(
    endpoint: &EndpointState,
    backend: &Arc<BackendState>,
    settings: &Http1Settings,
) -> Result<(Box<Conn>, Duration), ProxyError> {
    let addr = endpoint.addr();
    let timeout = settings.connect_timeout;
    let slot = match backend.try_connection_slot() {
        Some(slot) => slot,
        None => match endpoint.http1.slot_or_idle(backend, settings).await? {
            Acquired::Slot(slot) => slot,
            Acquired::Idle(ready) => return Ok(ready),
        },
    };
    let tcp = connect_tcp(addr, timeout).await?;
    let io = match &settings.tls {
        None => Io::Plain(tcp),
        Some(tls) => Io::Tls(Box::new(tls_handshake(tls, tcp, addr, timeout).await?)),
    };
    Ok((
        Conn::new(io, settings.tls_fingerprint(), slot),
        Duration::ZERO,
    ))
}
