//! Connections to upstream endpoints.
//!
//! HTTP/1.1 goes over keep-alive connections pooled per endpoint ([`crate::pool`]), kept in
//! the endpoint's state across table generations so a reload does not drop warm connections.
//! `h2c` backends get one multiplexed HTTP/2 connection per endpoint, held in the endpoint's
//! state; we keep that connection ourselves so the request's `:authority` can stay the
//! client's host while the socket goes to the endpoint's address. Both go over TLS when the
//! backend has `tls` (`h2` is `h2c`'s connection over TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::pool::Http1Settings;
use crate::upstream_tls::{TlsConnectError, UpstreamTls};

/// How a backend's requests are sent.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// HTTP/1.1 over keep-alive connections pooled per endpoint, over TLS or not.
    Http1(Http1Settings),
    /// HTTP/2, one connection per endpoint: `h2c` (prior knowledge) or `h2` (TLS with ALPN).
    H2 {
        /// TCP connect timeout (and TLS handshake timeout).
        connect_timeout: Duration,
        /// TLS settings for `h2`; `None` for `h2c`.
        tls: Option<Arc<UpstreamTls>>,
    },
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
        // Boxed: the connect is a large future, needed once per connection. Bound first, so
        // the unboxed temporary does not live across the await (and in this future's state).
        let reconnecting = Box::pin(self.reconnect(addr, connect_timeout, tls, want));
        reconnecting.await
    }

    async fn reconnect(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&UpstreamTls>,
        want: u64,
    ) -> Result<SendRequest<ProxyBody>, ProxyError> {
        let _one = self.connecting.lock().await;
        if let Some(s) = self.conn.load().as_deref().and_then(|c| c.usable(want)) {
            return Ok(s);
        }
        let tcp = connect_tcp(addr, connect_timeout).await?;
        let sender = match tls {
            None => h2_handshake(tcp, addr).await?,
            Some(tls) => {
                h2_handshake(tls_handshake(tls, tcp, addr, connect_timeout).await?, addr).await?
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
        .map_err(|e| handshake_failed(addr, &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream h2 connection closed");
        }
    });
    Ok(sender)
}

/// A TCP connection to an endpoint within `timeout`, with Nagle off (requests are written
/// whole).
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
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
    Ok(tcp)
}

/// The TLS handshake on a new upstream connection; a timeout reads as a connect timeout
/// (504), any other failure as a connect failure (502).
pub(crate) async fn tls_handshake(
    tls: &UpstreamTls,
    tcp: TcpStream,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ProxyError> {
    tls.connect(tcp, addr, timeout).await.map_err(|e| match e {
        TlsConnectError::Timeout { .. } => ProxyError::ConnectTimeout { addr },
        e => ProxyError::Connect {
            addr,
            reason: e.to_string(),
        },
    })
}

/// An HTTP handshake that failed on a new connection: a connect failure (502), since no
/// request has been sent on it.
pub(crate) fn handshake_failed(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    ProxyError::Connect {
        addr,
        reason: root_cause(e),
    }
}

/// Whether a method is idempotent (RFC 9110 section 9.2.2): a request that may have reached
/// the server can be sent again only then.
pub(crate) fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

/// The innermost error's message: what a user needs ("Connection refused"), not the wrappers.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
