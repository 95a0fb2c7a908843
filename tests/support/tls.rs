//! TLS for tests: a private CA (rcgen) that issues server and client certificates as PEM
//! files, TLS upstreams that answer like [`super::Upstream`] (HTTP/1.1 or HTTP/2 by ALPN,
//! or a gRPC service), and a rustls client that trusts the CA.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::tempdir;
use super::Behaviour;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A private certificate authority whose files live in a scratch directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    /// `ca.pem`, the CA certificate.
    pub file: PathBuf,
    pub dir: tempdir::Dir,
}

/// A certificate issued by a [`Ca`], with its key, in files and in memory.
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    pub fn new(tag: &str) -> Self {
        let dir = tempdir::Dir::new(tag);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Strait test CA {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = dir.write("ca.pem", &cert.pem());
        Self {
            issuer: Issuer::new(params, key),
            der: cert.der().clone(),
            file,
            dir,
        }
    }

    /// A certificate for `names` (DNS names), with common name `cn`, in `<cn>.pem` and
    /// `<cn>-key.pem`. It serves as a server or a client certificate.
    pub fn issue(&self, cn: &str, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_file: self.dir.write(&format!("{cn}.pem"), &cert.pem()),
            key_file: self
                .dir
                .write(&format!("{cn}-key.pem"), &key.serialize_pem()),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    /// A rustls client config trusting this CA only.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

impl Issued {
    /// A server config presenting this certificate, offering `alpn`, and requiring a client
    /// certificate from `client_ca` when given.
    pub fn server_config(&self, alpn: &[&[u8]], client_ca: Option<&Ca>) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(ca.roots()),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        let mut c = builder
            .with_single_cert(vec![self.der.clone()], key)
            .unwrap();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// What a TLS upstream learnt about a connection.
#[derive(Clone, Default)]
struct ConnInfo {
    sni: Option<String>,
}

/// A TLS upstream: HTTP/1.1 or HTTP/2 (whichever the client speaks after ALPN) with the
/// echo answers of [`super::Upstream`], plus `x-seen-version`, `x-seen-authority` (the
/// request URI's authority, i.e. HTTP/2's `:authority`) and `x-seen-sni`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// The leaf certificate of every client that presented one.
    pub client_certs: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    _stop: watch::Sender<()>,
}

impl TlsUpstream {
    pub async fn start(name: &str, config: Arc<ServerConfig>) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Behaviour::default());
        let n: Arc<str> = name.into();
        let h = Arc::clone(&hits);
        Self::serve(
            config,
            hits,
            move |info: ConnInfo, req: Request<Incoming>| {
                let (n, h, b) = (Arc::clone(&n), Arc::clone(&h), Arc::clone(&behaviour));
                async move {
                    let version = format!("{:?}", req.version());
                    let authority = req.uri().authority().map(|a| a.to_string());
                    let mut resp = super::answer(&n, &h, &b, Duration::ZERO, req).await;
                    let hd = resp.headers_mut();
                    hd.insert("x-seen-version", version.parse().unwrap());
                    if let Some(a) = authority {
                        hd.insert("x-seen-authority", a.parse().unwrap());
                    }
                    if let Some(s) = info.sni {
                        hd.insert("x-seen-sni", s.parse().unwrap());
                    }
                    resp
                }
            },
        )
        .await
    }

    /// A gRPC server (HTTP/2 over TLS) with the standard health service; `svc` is `SERVING`.
    pub async fn start_grpc(
        config: Arc<ServerConfig>,
        svc: &str,
    ) -> (Self, tonic_health::server::HealthReporter) {
        use tonic::codegen::Service as _;
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(svc, tonic_health::ServingStatus::Serving)
            .await;
        let up = Self::serve(
            config,
            Arc::new(AtomicUsize::new(0)),
            move |_: ConnInfo, req: Request<Incoming>| {
                let mut health = health.clone();
                async move { health.call(req).await.unwrap() }
            },
        )
        .await;
        (up, reporter)
    }

    async fn serve<F, Fut, B>(config: Arc<ServerConfig>, hits: Arc<AtomicUsize>, handle: F) -> Self
    where
        F: Fn(ConnInfo, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let certs = Arc::clone(&client_certs);
        let (stop, mut stopped) = watch::channel(());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stopped.changed() => return,
                };
                let (acceptor, certs, handle) =
                    (acceptor.clone(), Arc::clone(&certs), handle.clone());
                tokio::spawn(async move {
                    // A failed handshake (an untrusted client, say) just ends the connection.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = tls.get_ref().1;
                    if let Some(c) = conn.peer_certificates().and_then(|c| c.first()) {
                        certs.lock().unwrap().push(c.clone().into_owned());
                    }
                    let info = ConnInfo {
                        sni: conn.server_name().map(str::to_owned),
                    };
                    let svc = service_fn(move |req| {
                        let fut = handle(info.clone(), req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hits,
            client_certs,
            _stop: stop,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A TLS connection to `addr` with server name `sni`, trusting `config`'s roots.
pub async fn connect(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// GET `/` with `Host: host` over an established stream; returns status and body.
pub async fn get_over<T>(io: T, host: &str) -> (u16, String)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", host)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
