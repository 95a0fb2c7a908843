//! TLS from Strait to upstream endpoints: the rustls client configuration of a backend's
//! `tls` settings, built once per table compile (it is immutable), and the handshake that
//! every upstream connection goes through: pooled HTTP/1.1, the per-endpoint HTTP/2
//! connection and active health checks.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::table::spec::UpstreamTlsSpec;
use crate::tls;

/// ALPN protocol id of HTTP/2.
const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol id of HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A backend's TLS client settings, ready to connect with.
pub struct UpstreamTls {
    connector: TlsConnector,
    /// The name sent in SNI and verified; `None` (only with `insecure_skip_verify`) sends no
    /// SNI: rustls is then given the endpoint's IP, which it never puts in SNI.
    name: Option<ServerName<'static>>,
    /// HTTP/2 was asked for (`protocol: h2`): the handshake must agree on ALPN `h2`.
    h2: bool,
    /// Identifies the settings and the files' contents, so a connection or pool made with
    /// other settings (a renewed client certificate, a new CA) is not reused.
    fingerprint: u64,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .field("h2", &self.h2)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// One problem in a backend's `tls` settings: the field (under `tls`, empty for `tls`
/// itself) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpecError {
    /// `sni`, `ca`, `client_cert`, `client_key`, or empty.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl TlsSpecError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// Why the TLS part of an upstream connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsConnectError {
    /// The handshake did not finish within the connect timeout.
    #[error("TLS handshake with {name} timed out")]
    Timeout {
        /// The server name (or address) the handshake was for.
        name: String,
    },
    /// The handshake failed: certificate rejected, alert from the server, closed...
    #[error("TLS handshake with {name} failed: {reason}")]
    Handshake {
        /// The server name (or address) the handshake was for.
        name: String,
        /// rustls' reason, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// `protocol: h2`, but the endpoint did not agree to HTTP/2 in ALPN.
    #[error("{name} did not agree to HTTP/2 in the TLS handshake (ALPN: {got}); use protocol: http1 for this backend")]
    NoH2 {
        /// The server name (or address).
        name: String,
        /// What the endpoint chose instead.
        got: String,
    },
}

impl UpstreamTls {
    /// Builds the client settings of `spec`, reading its files now so that every problem
    /// shows at load time. `h2` is `protocol: h2`; `dns_host` is the name of a `dns`
    /// backend, the default SNI.
    pub fn build(
        spec: &UpstreamTlsSpec,
        h2: bool,
        dns_host: Option<&str>,
    ) -> Result<Self, Vec<TlsSpecError>> {
        let mut errors = Vec::new();
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        hash.update(&[u8::from(h2), u8::from(spec.insecure_skip_verify)]);

        let name = match (&spec.sni, dns_host) {
            (Some(sni), _) => match server_name(sni) {
                Ok(n) => Some(n),
                Err(m) => {
                    errors.push(TlsSpecError::new("sni", m));
                    None
                }
            },
            (None, Some(host)) => {
                match server_name(host.trim_end_matches('.')) {
                    Ok(n) => Some(n),
                    Err(m) => {
                        errors.push(TlsSpecError::new(
                        "",
                        format!("the backend's DNS name cannot be the TLS server name ({m}); set sni"),
                    ));
                        None
                    }
                }
            }
            (None, None) if spec.insecure_skip_verify => None,
            (None, None) => {
                errors.push(TlsSpecError::new(
                    "",
                    "sni is required: endpoints are addresses, and the certificate is checked \
                     against a name (e.g. sni: api.internal.example)",
                ));
                None
            }
        };
        if let Some(n) = &name {
            hash.update(n.to_str().as_bytes());
        }
        hash.update(&[0]);

        let roots = match (&spec.ca, spec.insecure_skip_verify) {
            (Some(_), true) => {
                errors.push(TlsSpecError::new(
                    "ca",
                    "insecure_skip_verify ignores the CA; remove one of them",
                ));
                None
            }
            (Some(ca), false) => {
                let path = Path::new(ca);
                match tls::load_roots(path) {
                    Ok(r) => {
                        digest_file(&mut hash, path);
                        Some(Arc::new(r))
                    }
                    Err(e) => {
                        errors.push(TlsSpecError::new("ca", e.to_string()));
                        None
                    }
                }
            }
            (None, false) => Some(system_roots()),
            (None, true) => None,
        };

        let client = match (&spec.client_cert, &spec.client_key) {
            (None, None) => None,
            (Some(_), None) => {
                errors.push(TlsSpecError::new(
                    "",
                    "client_cert needs client_key (the private key of the certificate)",
                ));
                None
            }
            (None, Some(_)) => {
                errors.push(TlsSpecError::new(
                    "",
                    "client_key needs client_cert (the certificate of the key)",
                ));
                None
            }
            (Some(cert), Some(key)) => {
                let (cert, key) = (Path::new(cert), Path::new(key));
                match tls::load_cert(cert, key) {
                    Ok(loaded) => {
                        digest_file(&mut hash, cert);
                        digest_file(&mut hash, key);
                        Some(loaded.key)
                    }
                    Err(e) => {
                        let field = if e.path == key {
                            "client_key"
                        } else {
                            "client_cert"
                        };
                        errors.push(TlsSpecError::new(field, e.to_string()));
                        None
                    }
                }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }

        let provider = tls::provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![TlsSpecError::new("", e.to_string())])?;
        let builder = match roots {
            Some(roots) => builder.with_root_certificates(roots),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
        };
        let mut config = match client {
            Some(key) => builder
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key))),
            None => builder.with_no_client_auth(),
        };
        // Offer only the protocol we will speak: an endpoint must not pick h2 for a
        // connection we will send HTTP/1.1 on.
        config.alpn_protocols = vec![if h2 { ALPN_H2 } else { ALPN_HTTP1 }.to_vec()];
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            h2,
            // Never 0: the HTTP/2 slot uses 0 for a cleartext connection.
            fingerprint: hash.digest().max(1),
        })
    }

    /// Identifies these settings and the contents of their files.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The TLS handshake on a connected socket to `addr`, within `timeout`. For
    /// `protocol: h2`, fails unless the endpoint agreed to HTTP/2.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, TlsConnectError> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let shown = || name_text(&name, addr);
        let stream =
            match tokio::time::timeout(timeout, self.connector.connect(name.clone(), tcp)).await {
                Err(_) => return Err(TlsConnectError::Timeout { name: shown() }),
                Ok(Err(e)) => {
                    return Err(TlsConnectError::Handshake {
                        name: shown(),
                        reason: e.to_string(),
                    })
                }
                Ok(Ok(s)) => s,
            };
        if self.h2 && !negotiated_h2(&stream) {
            let got = match stream.get_ref().1.alpn_protocol() {
                Some(p) => String::from_utf8_lossy(p).into_owned(),
                None => "none".to_owned(),
            };
            return Err(TlsConnectError::NoH2 { name: shown(), got });
        }
        Ok(stream)
    }
}

/// Whether the handshake agreed on HTTP/2.
pub fn negotiated_h2(stream: &TlsStream<TcpStream>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(ALPN_H2)
}

fn name_text(name: &ServerName<'_>, addr: SocketAddr) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => addr.to_string(),
    }
}

/// A DNS name to send in SNI and verify. IP addresses are refused: rustls would check the
/// certificate for the address, and a backend's endpoints have different addresses.
fn server_name(text: &str) -> Result<ServerName<'static>, String> {
    if text.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{text:?} is an IP address; sni must be a DNS name the certificate is issued for"
        ));
    }
    match ServerName::try_from(text.to_ascii_lowercase()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        _ => Err(format!("invalid server name {text:?}: expected a DNS name")),
    }
}

/// Adds a file's bytes to the fingerprint. It was just read successfully; should it vanish
/// in between, the fingerprint merely differs, which costs one new connection.
fn digest_file(hash: &mut xxhash_rust::xxh3::Xxh3, path: &Path) {
    if let Ok(bytes) = std::fs::read(path) {
        hash.update(&bytes);
    }
    hash.update(&[0]);
}

/// The system's trusted roots, read once: reading and parsing them per backend and per
/// reload would cost more than the whole rest of a compile.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let roots = tls::system_roots();
        if roots.is_empty() {
            tracing::warn!(
                "no system CA certificates found: TLS backends without tls.ca will reject \
                 every certificate"
            );
        }
        Arc::new(roots)
    }))
}

/// `insecure_skip_verify`: accepts any certificate chain for any name. The handshake
/// signatures are still checked, which keeps rustls' state machine honest but proves
/// nothing about who the endpoint is.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UpstreamTlsSpec {
        UpstreamTlsSpec::default()
    }

    #[test]
    fn a_name_is_required_unless_verification_is_off() {
        let errs = UpstreamTls::build(&spec(), false, None).unwrap_err();
        assert!(errs[0].message.contains("sni is required"), "{errs:?}");
        let dns = UpstreamTls::build(&spec(), false, Some("api.internal.")).unwrap();
        assert_eq!(
            dns.name.as_ref().map(|n| n.to_str().into_owned()),
            Some("api.internal".to_owned())
        );
        let insecure = UpstreamTlsSpec {
            insecure_skip_verify: true,
            ..spec()
        };
        assert!(UpstreamTls::build(&insecure, false, None)
            .unwrap()
            .name
            .is_none());
        let ip = UpstreamTlsSpec {
            sni: Some("10.0.0.1".into()),
            ..spec()
        };
        let errs = UpstreamTls::build(&ip, false, None).unwrap_err();
        assert_eq!(errs[0].field, "sni");
    }

    #[test]
    fn files_are_named_and_pairs_are_checked() {
        let missing = UpstreamTlsSpec {
            sni: Some("a.example".into()),
            ca: Some("/nonexistent/ca.pem".into()),
            client_cert: Some("/nonexistent/cert.pem".into()),
            ..spec()
        };
        let errs = UpstreamTls::build(&missing, false, None).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["ca", ""], "{errs:?}");
        assert!(errs[0].message.starts_with("/nonexistent/ca.pem: "));
        assert!(errs[1].message.contains("client_cert needs client_key"));
    }

    #[test]
    fn the_fingerprint_follows_the_settings() {
        let a = UpstreamTlsSpec {
            sni: Some("a.example".into()),
            ..spec()
        };
        let b = UpstreamTlsSpec {
            sni: Some("b.example".into()),
            ..spec()
        };
        let fa = UpstreamTls::build(&a, false, None).unwrap().fingerprint();
        assert_eq!(
            fa,
            UpstreamTls::build(&a, false, None).unwrap().fingerprint()
        );
        assert_ne!(
            fa,
            UpstreamTls::build(&b, false, None).unwrap().fingerprint()
        );
        assert_ne!(
            fa,
            UpstreamTls::build(&a, true, None).unwrap().fingerprint()
        );
    }
}
