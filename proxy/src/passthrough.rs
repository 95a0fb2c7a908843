//! TLS passthrough for `tcp` listeners: read the client's ClientHello without terminating
//! TLS, take its server name (SNI) and pick the backend by it. The bytes read are kept and
//! sent to the endpoint first, so the TLS session stays between the client and the endpoint;
//! Strait never sees a key or a plaintext byte.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::router::HostMatch;
use crate::table::Backend;

/// Time a client has to send its whole ClientHello. Browsers and TLS libraries send it at
/// once, right after connecting; this only bounds clients that connect and say nothing.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes buffered while waiting for the ClientHello. Real ones are a few hundred bytes
/// to about 2 KiB (post-quantum key shares included); the bound keeps a client that keeps
/// sending from growing the buffer.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

/// Backends by server name: exact names, then one-label wildcards (`*.example.com` covers
/// `a.example.com`, not `example.com` nor `a.b.example.com`), as route hosts match.
#[derive(Debug, Default)]
pub struct SniRoutes {
    exact: HashMap<String, Arc<Backend>>,
    wildcard: HashMap<String, Arc<Backend>>,
}

impl SniRoutes {
    /// Whether a rule sends connections to the backend called `name`.
    pub fn uses(&self, name: &str) -> bool {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .any(|b| &*b.name == name)
    }

    /// Routes `host` to `backend`; false if the host is already routed (or is `*`, which
    /// the listener's default backend stands for).
    pub fn insert(&mut self, host: &HostMatch, backend: &Arc<Backend>) -> bool {
        let (map, key) = match host {
            HostMatch::Exact(h) => (&mut self.exact, h),
            HostMatch::Wildcard(suffix) => (&mut self.wildcard, suffix),
            HostMatch::Any => return false,
        };
        if map.contains_key(key) {
            return false;
        }
        map.insert(key.clone(), Arc::clone(backend));
        true
    }

    /// The backend for a connection with server name `sni` (lowercase), else `default`.
    pub fn pick<'a>(
        &'a self,
        sni: Option<&str>,
        default: Option<&'a Arc<Backend>>,
    ) -> Option<&'a Arc<Backend>> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.')) else {
            return default;
        };
        self.exact
            .get(name)
            .or_else(|| {
                let (_, suffix) = name.split_once('.')?;
                self.wildcard.get(suffix)
            })
            .or(default)
    }
}

/// A client's ClientHello: the bytes as read, and the server name it asks for.
#[derive(Debug)]
pub struct ClientHello {
    /// Everything read from the client so far, to be sent to the endpoint first.
    pub bytes: Vec<u8>,
    /// The SNI server name, lowercased; `None` when the client sent none.
    pub sni: Option<String>,
}

/// Why no ClientHello could be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The client sent no complete ClientHello in time.
    #[error("no complete TLS ClientHello within {0:?}")]
    Timeout(Duration),
    /// The bytes are not TLS, or not a ClientHello rustls can read.
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    /// The ClientHello is larger than [`MAX_HELLO_BYTES`].
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
    /// The client closed the connection first.
    #[error("the client closed the connection before its ClientHello was complete")]
    Closed,
    /// Reading from the client failed.
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Reads the ClientHello from `stream`, within [`HELLO_TIMEOUT`] and [`MAX_HELLO_BYTES`].
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<ClientHello, HelloError> {
    read_hello(stream, MAX_HELLO_BYTES, HELLO_TIMEOUT).await
}

async fn read_hello<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
    within: Duration,
) -> Result<ClientHello, HelloError> {
    tokio::time::timeout(within, read_hello_untimed(stream, max))
        .await
        .unwrap_or(Err(HelloError::Timeout(within)))
}

/// Bytes read at a time: most ClientHellos fit in one read.
const CHUNK: usize = 2048;

async fn read_hello_untimed<R: AsyncRead + Unpin>(
    stream: &mut R,
    max: usize,
) -> Result<ClientHello, HelloError> {
    // rustls parses the hello (records, fragments, extensions); we keep our own copy of the
    // raw bytes, since the Acceptor consumes what it is fed.
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = [0u8; CHUNK];
    loop {
        let room = max - bytes.len();
        if room == 0 {
            return Err(HelloError::TooLarge(max));
        }
        let n = stream.read(&mut chunk[..room.min(CHUNK)]).await?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut new = &chunk[..n];
        while !new.is_empty() {
            match acceptor.read_tls(&mut new) {
                Ok(0) => return Err(HelloError::TooLarge(max)),
                Ok(_) => {}
                Err(e) => return Err(HelloError::NotTls(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(str::to_ascii_lowercase);
                return Ok(ClientHello { bytes, sni });
            }
            Err((e, _alert)) => return Err(HelloError::NotTls(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello, as a rustls client writes it for `sni`.
    fn hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn reads_the_server_name_and_keeps_every_byte() {
        let mut raw = hello("Db.Example.com");
        raw.extend_from_slice(b"early bytes");
        // One byte at a time: a hello may arrive in pieces.
        let (mut client, mut server) = tokio::io::duplex(1);
        let sent = raw.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(&sent).await;
            std::future::pending::<()>().await;
        });
        let h = read_client_hello(&mut server).await.unwrap();
        assert_eq!(h.sni.as_deref(), Some("db.example.com"));
        assert_eq!(h.bytes, raw[..h.bytes.len()]);
        assert!(h.bytes.len() >= raw.len() - "early bytes".len());
    }

    #[tokio::test]
    async fn plain_text_and_oversized_or_slow_hellos_are_refused() {
        let mut http = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        assert!(matches!(
            read_client_hello(&mut http).await,
            Err(HelloError::NotTls(_))
        ));
        let full = hello("a.example");
        let mut cut = &full[..full.len() - 1];
        assert!(matches!(
            read_client_hello(&mut cut).await,
            Err(HelloError::Closed)
        ));
        let mut big = &full[..];
        assert!(matches!(
            read_hello(&mut big, 100, HELLO_TIMEOUT).await,
            Err(HelloError::TooLarge(100))
        ));
        let (_client, mut silent) = tokio::io::duplex(64);
        assert!(matches!(
            read_hello(&mut silent, 100, Duration::from_millis(20)).await,
            Err(HelloError::Timeout(_))
        ));
    }
}
