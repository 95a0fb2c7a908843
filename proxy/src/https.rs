//! HTTPS listeners: the TLS server configurations compiled into each table generation,
//! chosen per connection by the name the client asks for (SNI), and the handshake that
//! turns an accepted TCP connection into a TLS stream with the client's verified identity.
//!
//! The configurations live in the table, so a reload (a changed certificate file included)
//! applies to new connections at once while open ones keep theirs.

use std::path::Path;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use rustls::server::{Acceptor, WebPkiClientVerifier};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use crate::table::spec::{ClientAuthSpec, HstsSpec, ListenerTlsSpec};
use crate::tls::{self, SniMap, SniResolver};

/// A compiled `https` listener.
#[derive(Debug)]
pub struct TlsListener {
    sites: SniMap<Arc<Site>>,
    /// More than one client-auth setting: a request's host must belong to its connection's.
    multi_site: bool,
    /// Every identity header configured on the listener: removed from every request, so a
    /// client cannot bring its own on a connection that did not verify one.
    pub identity_headers: Vec<HeaderName>,
    /// `Strict-Transport-Security` for every response, when configured.
    pub hsts: Option<HeaderValue>,
}

/// The certificates that share one client-authentication setting, and that setting.
#[derive(Debug)]
struct Site {
    id: usize,
    /// Takes the client's cipher order: for clients that put ChaCha20 first.
    client_order: Arc<ServerConfig>,
    /// Prefers AES-128-GCM (see [`tls::aes_first_provider`]); shares the session cache.
    aes_first: Arc<ServerConfig>,
    identity_header: Option<HeaderName>,
}

/// Certificates sharing a client-auth setting: the setting, their resolver, their names.
type Group<'a> = (Option<&'a ClientAuthSpec>, SniResolver, Vec<Vec<String>>);

/// A completed handshake.
pub struct Accepted<IO> {
    /// The decrypted stream.
    pub stream: TlsStream<IO>,
    /// The header for the client identity and its value, when client certificates are
    /// configured for the name the client asked for (`None` value: no certificate given).
    pub identity: Option<(HeaderName, Option<HeaderValue>)>,
    /// Which client-auth setting the connection was made under.
    pub site: usize,
}

/// A TLS setting that cannot be used, with the config field (relative to `tls`) it is in.
#[derive(Debug)]
pub struct TlsConfigError {
    /// Field path below `tls`, e.g. `certificates[1].key`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl TlsListener {
    /// Loads every certificate and CA file and builds the server configurations.
    pub fn build(spec: &ListenerTlsSpec) -> Result<Self, Vec<TlsConfigError>> {
        let mut errors = Vec::new();
        let mut err =
            |field: String, message: String| errors.push(TlsConfigError { field, message });
        let versions: &[&rustls::SupportedProtocolVersion] = match spec.min_version.as_str() {
            "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
            "1.3" => &[&rustls::version::TLS13],
            v => {
                err(
                    "min_version".into(),
                    format!("unsupported TLS version {v:?}: expected \"1.2\" or \"1.3\""),
                );
                &[&rustls::version::TLS13]
            }
        };
        for (i, p) in spec.alpn.iter().enumerate() {
            if p != "h2" && p != "http/1.1" {
                err(
                    format!("alpn[{i}]"),
                    format!("unknown protocol {p:?}: expected h2 or http/1.1"),
                );
            }
        }
        if spec.certificates.is_empty() {
            err(
                "certificates".into(),
                "at least one certificate is required".into(),
            );
        }
        if spec.certificates.iter().filter(|c| c.default).count() > 1 {
            err(
                "certificates".into(),
                "only one certificate can be the default".into(),
            );
        }
        let hsts = spec.hsts.as_ref().map(hsts_value);

        // Certificates grouped by their client-auth setting: one server config per group.
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut default_group = None;
        for (i, c) in spec.certificates.iter().enumerate() {
            let loaded = match &c.pem {
                Some(pem) => {
                    tls::load_cert_pem(Path::new(&c.cert), &pem.cert, Path::new(&c.key), &pem.key)
                }
                None => tls::load_cert(Path::new(&c.cert), Path::new(&c.key)),
            };
            let loaded = match loaded {
                Ok(l) => l,
                Err(e) => {
                    let field = if e.path == Path::new(&c.key) {
                        "key"
                    } else {
                        "cert"
                    };
                    err(format!("certificates[{i}].{field}"), e.to_string());
                    continue;
                }
            };
            let names = if c.hosts.is_empty() {
                loaded.names.clone()
            } else {
                c.hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
            };
            if names.is_empty() {
                err(
                    format!("certificates[{i}].hosts"),
                    format!("{} names no host: list its hosts", c.cert),
                );
            }
            let auth = c.client_auth.as_ref().or(spec.client_auth.as_ref());
            let g = match groups.iter().position(|(a, _, _)| *a == auth) {
                Some(g) => g,
                None => {
                    groups.push((auth, SniResolver::default(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.add(&names, &loaded.key);
            groups[g].2.push(names);
            if c.default {
                groups[g].1.set_default(&loaded.key);
                default_group = Some(g);
            }
        }
        let alpn: Vec<Vec<u8>> = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let mut sites = SniMap::default();
        let mut built = Vec::new();
        for (g, (auth, resolver, names)) in groups.into_iter().enumerate() {
            let site = match site(g, versions, auth, resolver, &alpn) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    err(e.field, e.message);
                    continue;
                }
            };
            for n in &names {
                sites.add(n, &site);
            }
            built.push((g, site));
        }
        if let Some(d) = default_group {
            if let Some((_, site)) = built.iter().find(|(g, _)| *g == d) {
                sites.set_default(site);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut identity_headers: Vec<HeaderName> = built
            .iter()
            .filter_map(|(_, s)| s.identity_header.clone())
            .collect();
        identity_headers.dedup();
        Ok(Self {
            sites,
            multi_site: built.len() > 1,
            identity_headers,
            hsts,
        })
    }

    /// Whether a request for `host` may be served on a connection made under `site`: with
    /// several client-auth settings, a connection verified (or not) for one name must not
    /// serve another name that is configured differently. Such requests get 421.
    pub fn allows(&self, site: usize, host: &str) -> bool {
        !self.multi_site || self.sites.find(Some(host)).is_none_or(|s| s.id == site)
    }

    /// Runs the handshake on `io`, with the configuration for the name in the ClientHello.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let hello = start.client_hello();
        let site = self
            .sites
            .find(hello.server_name())
            .map(Arc::clone)
            .ok_or_else(|| std::io::Error::other("no certificate for this name"))?;
        let config = if tls::prefers_chacha(hello.cipher_suites()) {
            &site.client_order
        } else {
            &site.aes_first
        };
        let stream = start.into_stream(Arc::clone(config)).await?;
        let identity = site.identity_header.as_ref().map(|h| {
            let value = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[CertificateDer<'_>]>::first)
                .and_then(identity);
            (h.clone(), value)
        });
        Ok(Accepted {
            stream,
            identity,
            site: site.id,
        })
    }
}

/// TLS 1.3 session tickets sent after each handshake. A ticket resumes one connection, and
/// that connection's handshake brings the next one, so a client reconnecting one connection
/// at a time always holds one (as with Go's servers, and as OpenSSL does after a resumption).
/// rustls' default of two costs both sides a ticket per connection that such a client never
/// uses: a key derivation and a cache entry here, parsing and storing a session in the client.
const TLS13_TICKETS: usize = 1;

/// More tickets for a client that asks for them (RFC 9149 `ticket_request`), e.g. to resume
/// several parallel connections.
const MAX_TLS13_TICKETS: usize = 4;

fn site(
    id: usize,
    versions: &[&'static rustls::SupportedProtocolVersion],
    auth: Option<&ClientAuthSpec>,
    resolver: SniResolver,
    alpn: &[Vec<u8>],
) -> Result<Site, TlsConfigError> {
    let (verifier, identity_header) = match auth {
        None => (None, None),
        Some(a) => {
            let bad = |message: String| TlsConfigError {
                field: "client_auth".into(),
                message,
            };
            let roots = tls::load_roots(Path::new(&a.ca)).map_err(|e| bad(e.to_string()))?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider());
            let verifier = if a.required {
                verifier.build()
            } else {
                verifier.allow_unauthenticated().build()
            }
            .map_err(|e| bad(format!("{}: {e}", a.ca)))?;
            let header = HeaderName::try_from(a.identity_header.as_str())
                .map_err(|_| bad(format!("invalid identity_header {:?}", a.identity_header)))?;
            (Some(verifier), Some(header))
        }
    };
    let resolver = Arc::new(resolver);
    let config = |provider| -> Result<ServerConfig, TlsConfigError> {
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| TlsConfigError {
                field: "min_version".into(),
                message: e.to_string(),
            })?;
        let builder = match &verifier {
            None => builder.with_no_client_auth(),
            Some(v) => builder.with_client_cert_verifier(Arc::clone(v)),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&resolver) as _);
        config.alpn_protocols = alpn.to_vec();
        config.send_tls13_tickets = TLS13_TICKETS;
        config.max_tls13_tickets = MAX_TLS13_TICKETS;
        Ok(config)
    };
    let client_order = config(tls::provider())?;
    let mut aes_first = config(tls::aes_first_provider())?;
    aes_first.ignore_client_order = true;
    // A session made under either configuration resumes under the other.
    aes_first.session_storage = Arc::clone(&client_order.session_storage);
    Ok(Site {
        id,
        client_order: Arc::new(client_order),
        aes_first: Arc::new(aes_first),
        identity_header,
    })
}

fn hsts_value(h: &HstsSpec) -> HeaderValue {
    let mut v = format!("max-age={}", h.max_age.as_secs());
    if h.include_subdomains {
        v.push_str("; includeSubDomains");
    }
    if h.preload {
        v.push_str("; preload");
    }
    HeaderValue::try_from(v).expect("digits and ASCII words make a header value")
}

/// A verified client certificate's identity: its first URI name (a SPIFFE ID, say), else its
/// first DNS name, else its subject.
fn identity(cert: &CertificateDer<'_>) -> Option<HeaderValue> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
    };
    let text = uri
        .or_else(dns)
        .unwrap_or_else(|| cert.subject().to_string());
    HeaderValue::try_from(text).ok()
}
