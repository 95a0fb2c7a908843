//! Connections to upstream endpoints.
//!
//! HTTP/1.1 goes through hyper-util's pooled client, one per backend and settings, kept across
//! table generations so a reload does not drop warm keep-alive connections. `h2c` backends
//! get one multiplexed HTTP/2 connection per endpoint, held in the endpoint's state; we keep
//! that connection ourselves so the request's `:authority` can stay the client's host while
//! the socket goes to the endpoint's address. Both go over TLS when the backend has `tls`
//! (`h2` is `h2c`'s connection over TLS).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::breaker::{BackendState, Breaker, ConnectionLimit, LimitedConnector};
use crate::error::ProxyError;
use crate::table::spec::{PoolSpec, UpstreamProtocol};
use crate::upstream_tls::{TlsConnectError, UpstreamTls};

/// The pooled HTTP/1.1 client.
pub type Http1Client = Client<LimitedConnector, ProxyBody>;

/// How a backend's requests are sent.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// Pooled HTTP/1.1, over TLS or not (boxed: the client is large and backends are few).
    Http1(Box<Http1Client>),
    /// HTTP/2, one connection per endpoint: `h2c` (prior knowledge) or `h2` (TLS with ALPN).
    H2 {
        /// TCP connect timeout (and TLS handshake timeout).
        connect_timeout: Duration,
        /// TLS settings for `h2`; `None` for `h2c`.
        tls: Option<Arc<UpstreamTls>>,
    },
}

/// Settings that identify a reusable HTTP/1.1 client. TLS is part of it, so a pool never
/// mixes plain and TLS connections, and changed TLS settings or files get a new pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    backend: Arc<str>,
    protocol: UpstreamProtocol,
    pool: PoolSpec,
    connect_timeout: Duration,
    /// [`UpstreamTls::fingerprint`].
    tls: Option<u64>,
}

impl ClientKey {
    /// The key of a backend's HTTP/1.1 client.
    pub fn new(
        backend: &Arc<str>,
        protocol: UpstreamProtocol,
        pool: &PoolSpec,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
    ) -> Self {
        Self {
            backend: Arc::clone(backend),
            protocol,
            pool: pool.clone(),
            connect_timeout,
            tls: tls.map(UpstreamTls::fingerprint),
        }
    }
}

/// Clients kept across table generations, keyed by backend and settings.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: Mutex<HashMap<ClientKey, Http1Client>>,
}

impl ClientRegistry {
    /// The upstream for a backend, reusing the previous generation's pool when the settings
    /// are unchanged.
    /// `key` is the backend's [`ClientKey`], made from the same settings.
    pub fn get(
        &self,
        key: &ClientKey,
        tls: Option<&Arc<UpstreamTls>>,
        state: &Arc<BackendState>,
    ) -> Upstream {
        if key.protocol != UpstreamProtocol::Http1 {
            return Upstream::H2 {
                connect_timeout: key.connect_timeout,
                tls: tls.cloned(),
            };
        }
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let client = map.entry(key.clone()).or_insert_with(|| {
            let mut conn = HttpConnector::new();
            conn.set_nodelay(true);
            conn.set_connect_timeout(Some(key.connect_timeout));
            let mut connector = LimitedConnector::new(conn, Arc::clone(state), key.connect_timeout);
            if let Some(tls) = tls {
                connector = connector.with_tls(Arc::clone(tls), key.connect_timeout);
            }
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(key.pool.idle_timeout)
                .pool_max_idle_per_host(key.pool.max_idle_per_endpoint)
                .build(connector)
        });
        Upstream::Http1(Box::new(client.clone()))
    }

    /// Drops clients whose backend settings are no longer in use.
    pub fn retain_backends(&self, live: &[ClientKey]) {
        // A set: thousands of backends (a cluster's Services) made a list scan quadratic.
        let live: std::collections::HashSet<&ClientKey> = live.iter().collect();
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| live.contains(k));
    }
}

/// Sends a request over the pooled HTTP/1.1 client.
pub async fn send_http1(
    client: &Http1Client,
    addr: SocketAddr,
    req: Request<ProxyBody>,
) -> Result<Response<Incoming>, ProxyError> {
    client.request(req).await.map_err(|e| {
        if e.is_connect() {
            if caused_by::<ConnectionLimit>(&e) {
                ProxyError::CircuitOpen(Breaker::MaxConnections)
            } else if has_timed_out(&e) {
                ProxyError::ConnectTimeout { addr }
            } else {
                ProxyError::Connect {
                    addr,
                    reason: root_cause(&e),
                }
            }
        } else {
            ProxyError::Upstream {
                addr,
                reason: root_cause(&e),
            }
        }
    })
}

/// The multiplexed HTTP/2 connection of one endpoint.
#[derive(Debug, Default)]
pub struct H2Slot {
    conn: ArcSwapOption<H2Conn>,
    /// Serializes reconnects so a burst after a failure opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

/// An open HTTP/2 connection and the TLS settings it was made with.
#[derive(Debug)]
struct H2Conn {
    sender: SendRequest<ProxyBody>,
    /// [`UpstreamTls::fingerprint`], 0 for cleartext: a reload that changes the backend's
    /// TLS settings (or `h2c` to `h2`) must not keep sending on the old connection.
    tls: u64,
}

impl H2Conn {
    fn usable(&self, tls: u64) -> Option<SendRequest<ProxyBody>> {
        (self.tls == tls && !self.sender.is_closed()).then(|| self.sender.clone())
    }
}

impl H2Slot {
    async fn sender(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
    ) -> Result<SendRequest<ProxyBody>, ProxyError> {
        let want = tls.map_or(0, UpstreamTls::fingerprint);
        if let Some(s) = self.conn.load().as_deref().and_then(|c| c.usable(want)) {
            return Ok(s);
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.conn.load().as_deref().and_then(|c| c.usable(want)) {
            return Ok(s);
        }
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(ProxyError::ConnectTimeout { addr }),
            Ok(Err(e)) => {
                return Err(ProxyError::Connect {
                    addr,
                    reason: e.to_string(),
                })
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let sender = match tls {
            None => h2_handshake(tcp, addr).await?,
            Some(tls) => {
                let stream =
                    tls.connect(tcp, addr, connect_timeout)
                        .await
                        .map_err(|e| match e {
                            TlsConnectError::Timeout { .. } => ProxyError::ConnectTimeout { addr },
                            e => ProxyError::Connect {
                                addr,
                                reason: e.to_string(),
                            },
                        })?;
                h2_handshake(stream, addr).await?
            }
        };
        self.conn.store(Some(Arc::new(H2Conn {
            sender: sender.clone(),
            tls: want,
        })));
        Ok(sender)
    }

    /// Sends a request on the endpoint's HTTP/2 connection, connecting when needed (with
    /// TLS when `tls` is given).
    pub async fn send(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender(addr, connect_timeout, tls).await?;
        sender.ready().await.map_err(|e| ProxyError::Upstream {
            addr,
            reason: root_cause(&e),
        })?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ProxyError::Upstream {
                addr,
                reason: root_cause(&e),
            })
    }
}

/// The HTTP/2 handshake on a connected (and, for `h2`, TLS) stream; the connection runs in
/// its own task.
async fn h2_handshake<T>(io: T, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, ProxyError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::Connect {
            addr,
            reason: root_cause(&e),
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream h2 connection closed");
        }
    });
    Ok(sender)
}

/// Whether an error of type `T` is in `e`'s source chain.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn has_timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The innermost error's message: what a user needs ("Connection refused"), not the wrappers.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
