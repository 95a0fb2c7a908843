//! Downstream listeners: accept loop, connection limit, per-connection idle timeout and
//! graceful drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::drain::{Drain, Watcher};
use crate::service::{handle, ConnContext};
use crate::table::spec::LimitsSpec;
use crate::table::TableHandle;

/// Everything a listener needs besides the socket.
#[derive(Debug, Clone)]
pub struct ListenerContext {
    /// Listener name, as in the table.
    pub name: Arc<str>,
    /// The table in force.
    pub table: TableHandle,
    /// Downstream limits.
    pub limits: LimitsSpec,
    /// The listener's connection places (`max_connections`), shared by every worker that
    /// serves it.
    pub(crate) connections: Arc<Semaphore>,
}

impl ListenerContext {
    /// The context of listener `name`, with `limits.max_connections` places for connections
    /// whichever worker accepts them.
    pub fn new(name: Arc<str>, table: TableHandle, limits: LimitsSpec) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            name,
            table,
            limits,
        }
    }

    /// This listener's index in every table generation (listeners cannot change on reload).
    pub(crate) fn index(&self) -> Option<usize> {
        let guard = self.table.load();
        let index = guard.as_ref().and_then(|t| t.listener_index(&self.name));
        if index.is_none() {
            tracing::error!(
                listener = &*self.name,
                "listener is not in the routing table; not serving"
            );
        }
        index
    }
}

/// Accepts connections for one listener (HTTP or TCP) within its connection limit, and
/// counts them.
pub(crate) struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    name: Arc<str>,
    active: metrics::Gauge,
    accepted: metrics::Counter,
}

/// An accepted connection's place under the limit; dropping it frees the place.
pub(crate) struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    active: metrics::Gauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

impl Acceptor {
    /// Accepts on `listener` for the listener of `cx`, within its connection places.
    pub(crate) fn new(listener: TcpListener, cx: &ListenerContext) -> Self {
        let name = &cx.name;
        let labels = [("listener", name.to_string())];
        Self {
            listener,
            permits: Arc::clone(&cx.connections),
            max: cx.limits.max_connections,
            name: Arc::clone(name),
            active: metrics::gauge!(crate::metrics::DOWNSTREAM_CONNECTIONS, &labels),
            accepted: metrics::counter!(
                crate::metrics::DOWNSTREAM_CONNECTIONS_TOTAL,
                "listener" => name.to_string(),
                "worker" => crate::workers::current().to_string()
            ),
        }
    }

    /// The next connection, with its place under the listener's limit. A connection accepted
    /// while every place is taken waits here for one, and meanwhile this worker accepts no
    /// other: the rest wait in the kernel's backlog. (Taking the place before accepting would
    /// let a worker with nothing to accept hold a place that a connection waiting on another
    /// worker's socket needs.) Accept errors (out of file descriptors and similar) are logged
    /// and retried after a pause instead of spinning.
    pub(crate) async fn next(&self) -> (TcpStream, SocketAddr, ConnSlot) {
        loop {
            match self.listener.accept().await {
                Ok((stream, client)) => {
                    let permit = Arc::clone(&self.permits)
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed");
                    let _ = stream.set_nodelay(true);
                    self.accepted.increment(1);
                    self.active.increment(1.0);
                    let slot = ConnSlot {
                        _permit: permit,
                        active: self.active.clone(),
                    };
                    return (stream, client, slot);
                }
                Err(e) => {
                    tracing::warn!(listener = &*self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Stops accepting (the socket closes) and resolves once every accepted connection has
    /// given its slot back.
    pub(crate) async fn close_and_wait(self) {
        let Self {
            listener,
            permits,
            max,
            name,
            ..
        } = self;
        drop(listener);
        tracing::info!(
            listener = &*name,
            open = max - permits.available_permits(),
            "draining connections"
        );
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        let _ = permits.acquire_many(all).await;
    }
}

/// Serves HTTP/1.1 and h2c on an already-bound listener until `shutdown` resolves, then stops
/// accepting, asks every open connection to finish (HTTP/1.1 closes after the response in
/// progress, HTTP/2 sends GOAWAY) and returns once they have. Callers bound the wait with
/// their drain timeout.
pub async fn serve(listener: TcpListener, cx: ListenerContext, shutdown: impl Future<Output = ()>) {
    let Some(index) = cx.index() else {
        return;
    };
    defer_accept(&listener, &cx.name);
    let limits = cx.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The I/O wrapper enforces `header_read_timeout` (`IdleTimeout::with_head_timeout`)
        // without a timer operation per request.
        .header_read_timeout(None)
        .max_buf_size(limits.max_request_header_bytes)
        .max_headers(limits.max_request_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let acceptor = Acceptor::new(listener, &cx);
    let drain = Drain::default();

    tokio::pin!(shutdown);
    loop {
        let (stream, client, slot) = tokio::select! {
            c = acceptor.next() => c,
            () = &mut shutdown => break,
        };
        let conn_cx = ConnContext {
            table: cx.table.clone(),
            listener: index,
            listener_name: Arc::clone(&cx.name),
            client,
            client_ip: crate::headers::ip_header_value(client.ip()),
            scheme: "http",
            tls: None,
            hsts: None,
            activity: Arc::default(),
        };
        // The drain waits for this watcher: a connection still in its TLS handshake counts.
        let watcher = drain.watcher();
        let builder = Arc::clone(&builder);
        let idle = limits.idle_timeout;
        // The request-head limit also bounds the TLS handshake.
        let head_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let io = IdleTimeout::with_head_timeout(
                stream,
                idle,
                head_timeout,
                Arc::clone(&conn_cx.activity),
            );
            // The TLS settings of the table in force when the connection arrived.
            let tls = {
                let guard = conn_cx.table.load();
                guard
                    .as_ref()
                    // By name: dynamic listeners (Kubernetes) shift indices between tables.
                    .and_then(|t| t.listener(index, &conn_cx.listener_name)?.tls.clone())
            };
            match tls {
                None => serve_one(&builder, watcher, io, conn_cx).await,
                Some(tls) => {
                    let name = Arc::clone(&conn_cx.listener_name);
                    let result = tokio::time::timeout(head_timeout, tls.accept(io)).await;
                    let outcome = match result {
                        Ok(Ok(accepted)) => {
                            if accepted.stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                                conn_cx.activity.mark_h2();
                            }
                            let cx = ConnContext {
                                scheme: "https",
                                tls: Some(crate::service::ConnTls {
                                    listener: Arc::clone(&tls),
                                    site: accepted.site,
                                    identity: accepted.identity,
                                }),
                                hsts: tls.hsts.clone(),
                                ..conn_cx
                            };
                            serve_one(&builder, watcher, accepted.stream, cx).await;
                            "ok"
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = &*name, %client, error = %e, "TLS handshake failed");
                            "failed"
                        }
                        Err(_) => {
                            tracing::debug!(listener = &*name, %client, "TLS handshake timed out");
                            "timeout"
                        }
                    };
                    metrics::counter!(crate::metrics::TLS_HANDSHAKES, "listener" => name.to_string(), "result" => outcome)
                        .increment(1);
                }
            }
            drop(slot);
        });
    }
    // Stop accepting; the graceful shutdown below waits for the connections themselves.
    drop(acceptor);
    tracing::info!(
        listener = &*cx.name,
        open = drain.count(),
        "draining connections"
    );
    drain.shutdown().await;
}

/// Serves HTTP/1.1 and HTTP/2 on one connection (plain or decrypted) until it ends.
async fn serve_one<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    cx: ConnContext,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (name, client) = (Arc::clone(&cx.listener_name), cx.client);
    let cx = Arc::new(cx);
    let service = service_fn(move |req| handle(Arc::clone(&cx), req));
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(listener = &*name, %client, error = %e, "connection ended with an error");
    }
}

/// Seconds a new connection may wait in the kernel for its first bytes before it is handed
/// over anyway (then the request-head timeout applies).
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Has the kernel hand over a new connection only once its first bytes (a request line or a
/// TLS ClientHello) have arrived, as nginx's `listen ... deferred` and HAProxy's `defer-accept`
/// do. HTTP and TLS clients speak first, so the worker wakes once per new connection instead
/// of twice (the accept, then the first read), and a client no longer pays for waking an idle
/// proxy twice (docs/performance.md, TLS). Only for listeners whose clients speak first: the
/// `tcp` listener relays protocols where the server does. Failing to set it only loses that.
#[cfg(target_os = "linux")]
fn defer_accept(listener: &TcpListener, name: &str) {
    use std::os::fd::AsRawFd;
    let secs = DEFER_ACCEPT_SECS;
    let len = libc::socklen_t::try_from(std::mem::size_of_val(&secs)).unwrap_or(0);
    // SAFETY: the descriptor belongs to `listener`, borrowed for the whole call; the value
    // points to a c_int that outlives the call, and `len` is its size, as TCP_DEFER_ACCEPT
    // expects.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            len,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        tracing::warn!(listener = name, %error, "could not defer accepting to the first bytes");
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &TcpListener, _: &str) {}

/// Binds a listener address, with an error that names it.
pub async fn bind(addr: &str) -> Result<TcpListener, BindError> {
    let parsed: SocketAddr = addr.parse().map_err(|_| BindError {
        address: addr.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not an ip:port address"),
    })?;
    TcpListener::bind(parsed).await.map_err(|source| BindError {
        address: addr.to_owned(),
        source,
    })
}

/// Backlog of each worker's listening socket: the standard library's (and so tokio's `bind`).
const WORKER_BACKLOG: u32 = 128;

/// One worker's listening socket on `addr`, registered with the runtime of the calling
/// context. Each worker binds its own with `SO_REUSEPORT`, and the kernel spreads new
/// connections over them by a hash of the client's address and port, as Envoy and HAProxy give
/// each worker thread its own socket. (With one socket shared by all workers, the worker woken
/// first takes most connections: 24% against 76% of the work in one run on two workers.)
/// Bind `addr` once without `SO_REUSEPORT` first ([`bind`]) and close it: that fails if
/// anything else, another Strait included, holds the address.
pub fn bind_for_worker(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(WORKER_BACKLOG)
}

/// A listener address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct BindError {
    /// The address.
    pub address: String,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The requests in progress on one downstream connection, as its I/O wrapper needs to know
/// them: a request head is due only while none is.
#[derive(Debug, Default)]
pub struct ConnActivity {
    /// Requests from the handler's call to the end of their response body, and tunnels
    /// (upgraded connections) while they last.
    in_flight: AtomicU32,
    /// HTTP/2: requests are streams, and no head timer applies to the connection.
    h2: AtomicBool,
    /// `clock_ns()` when bytes last arrived (0: never): the arrival of the requests in them.
    read_ns: AtomicU64,
}

impl ConnActivity {
    /// A request or tunnel begins; [`ConnActivity::end`] must follow.
    pub fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's response (or a tunnel) has ended.
    pub fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The connection speaks HTTP/2.
    pub(crate) fn mark_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// When the request just read arrived: when the connection last received bytes, as its
    /// I/O wrapper read the clock then (nginx also times a request from its event's cached
    /// time); now if nothing was recorded.
    pub(crate) fn arrival(&self) -> std::time::Instant {
        match self.read_ns.load(Ordering::Relaxed) {
            0 => std::time::Instant::now(),
            ns => crate::clock::instant_at(ns),
        }
    }

    fn awaits_head(&self) -> bool {
        !self.h2.load(Ordering::Relaxed) && self.in_flight.load(Ordering::Relaxed) == 0
    }
}

/// The request-head deadline of an HTTP/1.1 connection.
struct HeadTimeout {
    timeout: Duration,
    activity: Arc<ConnActivity>,
    /// When the connection last had no head to wait for: its start, a write (a response
    /// ends with one), or a check that found a request in progress.
    since: Instant,
    /// Whether the first bytes have been read (and looked at for the HTTP/2 preface).
    started: bool,
}

/// Closes a connection on which no byte moved for `idle`, and (HTTP/1.1 connections made with
/// [`IdleTimeout::with_head_timeout`]) one that has not delivered a complete request head
/// within the head timeout of its start or of its last response: slow request heads
/// (slowloris) and idle keep-alive connections. The timer is armed for the earliest moment
/// either could pass, checked only when a read would block, and re-armed lazily: both
/// deadlines only move later, so busy connections pay one clock read per I/O and no timer
/// operation per request (hyper's own header timer arms and cancels one per request).
pub(crate) struct IdleTimeout<T = TcpStream> {
    io: T,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    /// The waker the pending timer will wake. A read that blocks with the same waker while
    /// the timer has not fired leaves the timer alone: polling it again would only register
    /// the same waker once more (twice per keep-alive request).
    timer_waker: Option<Waker>,
    head: Option<HeadTimeout>,
}

impl<T> IdleTimeout<T> {
    pub(crate) fn new(io: T, idle: Duration) -> Self {
        Self {
            io,
            idle,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
            timer_waker: None,
            head: None,
        }
    }

    /// Also enforces a request-head deadline, while `activity` shows no request in progress.
    pub(crate) fn with_head_timeout(
        io: T,
        idle: Duration,
        timeout: Duration,
        activity: Arc<ConnActivity>,
    ) -> Self {
        let now = Instant::now();
        Self {
            io,
            idle,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle.min(timeout))),
            timer_waker: None,
            head: Some(HeadTimeout {
                timeout,
                activity,
                since: now,
                started: false,
            }),
        }
    }

    fn wrote(&mut self) {
        self.last = Instant::now();
        if let Some(h) = &mut self.head {
            h.since = self.last;
        }
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                if !self
                    .timer_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    self.timer_waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            let now = Instant::now();
            let mut next = self.last + self.idle;
            if next <= now {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle timeout",
                ));
            }
            if let Some(h) = &mut self.head {
                if !h.activity.awaits_head() {
                    // A head can fall due only after the request (or tunnel) ends.
                    h.since = now;
                } else if h.since + h.timeout <= now {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head timeout",
                    ));
                }
                next = next.min(h.since + h.timeout);
            }
            self.timer.as_mut().reset(next);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.last = Instant::now();
                if let Some(h) = &mut this.head {
                    h.activity.read_ns.store(
                        crate::clock::clock_ns_at(this.last.into_std()),
                        Ordering::Relaxed,
                    );
                    if !h.started && buf.filled().len() > before {
                        h.started = true;
                        // The HTTP/2 connection preface (prior knowledge) begins so; no
                        // HTTP/1.1 method is called PRI.
                        if buf.filled()[before..].starts_with(b"PRI ") {
                            h.activity.mark_h2();
                        }
                    }
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let armed = this
                    .timer_waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()));
                if armed && !this.timer.is_elapsed() {
                    return Poll::Pending;
                }
                this.poll_idle(cx).map(Err)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.io).poll_write(cx, buf));
        this.wrote();
        Poll::Ready(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs));
        this.wrote();
        Poll::Ready(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
