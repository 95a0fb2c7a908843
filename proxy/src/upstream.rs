//! Connections to upstream endpoints.
//!
//! HTTP/1.1 goes through hyper-util's pooled client, one per backend and settings, kept across
//! table generations so a reload does not drop warm keep-alive connections. `h2c` backends
//! get one multiplexed HTTP/2 connection per endpoint, held in the endpoint's state; we keep
//! that connection ourselves so the request's `:authority` can stay the client's host while
//! the socket goes to the endpoint's address.

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
use crate::breaker::{BackendState, LimitedConnector};
use crate::error::ProxyError;
use crate::table::spec::{PoolSpec, UpstreamProtocol};

/// The pooled HTTP/1.1 client.
pub type Http1Client = Client<LimitedConnector, ProxyBody>;

/// How a backend's requests are sent.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// Pooled HTTP/1.1 (boxed: the client is large and backends are few).
    Http1(Box<Http1Client>),
    /// HTTP/2 prior knowledge, one connection per endpoint.
    H2c {
        /// TCP connect timeout.
        connect_timeout: Duration,
    },
}

/// Settings that identify a reusable client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    backend: Arc<str>,
    protocol: UpstreamProtocol,
    pool: PoolSpec,
    connect_timeout: Duration,
}

/// Clients kept across table generations, keyed by backend and settings.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: Mutex<HashMap<ClientKey, Http1Client>>,
}

impl ClientRegistry {
    /// The upstream for a backend, reusing the previous generation's pool when the settings
    /// are unchanged.
    pub fn get(
        &self,
        backend: &Arc<str>,
        protocol: UpstreamProtocol,
        pool: &PoolSpec,
        connect_timeout: Duration,
        state: &Arc<BackendState>,
    ) -> Upstream {
        if protocol == UpstreamProtocol::H2c {
            return Upstream::H2c { connect_timeout };
        }
        let key = ClientKey {
            backend: Arc::clone(backend),
            protocol,
            pool: pool.clone(),
            connect_timeout,
        };
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let client = map.entry(key).or_insert_with(|| {
            let mut conn = HttpConnector::new();
            conn.set_nodelay(true);
            conn.set_connect_timeout(Some(connect_timeout));
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(pool.idle_timeout)
                .pool_max_idle_per_host(pool.max_idle_per_endpoint)
                .build(LimitedConnector::new(conn, Arc::clone(state)))
        });
        Upstream::Http1(Box::new(client.clone()))
    }

    /// Drops clients whose backend settings are no longer in use.
    pub fn retain_backends(&self, live: &[(Arc<str>, UpstreamProtocol, PoolSpec, Duration)]) {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| {
            live.iter().any(|(b, p, pool, t)| {
                *b == k.backend && *p == k.protocol && *pool == k.pool && *t == k.connect_timeout
            })
        });
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
            if has_timed_out(&e) {
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
    conn: ArcSwapOption<SendRequest<ProxyBody>>,
    /// Serializes reconnects so a burst after a failure opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Slot {
    async fn sender(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<SendRequest<ProxyBody>, ProxyError> {
        if let Some(s) = self.conn.load().as_deref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.conn.load().as_deref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
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
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tcp))
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
        self.conn.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// Sends a request on the endpoint's HTTP/2 connection, connecting when needed.
    pub async fn send(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender(addr, connect_timeout).await?;
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
