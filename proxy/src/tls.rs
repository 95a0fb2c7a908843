//! TLS material: loading PEM certificates, keys and CA bundles with errors that name the
//! file, the names a certificate is valid for, and certificate selection by SNI.
//! Everything uses rustls with the `ring` provider: no OpenSSL anywhere.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider every TLS config in the process uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// The same algorithms as [`provider`], with the cipher suites in the server's order of
/// preference: AES-128-GCM, then AES-256-GCM, then ChaCha20-Poly1305. AES-128 is as safe in
/// practice and cheaper per handshake (its key schedule hashes with SHA-256, which CPUs
/// accelerate, where AES-256's suite uses SHA-384), and BoringSSL (Envoy) and Go's TLS
/// servers prefer it too. Used for every client that does not put ChaCha20 first.
pub fn aes_first_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
            ..rustls::crypto::ring::default_provider()
        })
    }))
}

/// Whether a client lists ChaCha20-Poly1305 first (GREASE values aside): a client without
/// AES instructions does so to ask for the cipher that is fast for it, and gets it.
pub fn prefers_chacha(offered: &[rustls::CipherSuite]) -> bool {
    use rustls::CipherSuite as S;
    // GREASE (RFC 8701) code points are 0x?A?A.
    let first = offered.iter().find(|s| u16::from(**s) & 0x0f0f != 0x0a0a);
    matches!(
        first,
        Some(
            S::TLS13_CHACHA20_POLY1305_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        )
    )
}

/// TLS material that cannot be used; the message names the file and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

impl TlsError {
    fn new(path: &Path, reason: impl fmt::Display) -> Self {
        Self {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A certificate chain with its key, checked to match, and the names it serves.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    /// Chain and signing key, as rustls serves them.
    pub key: Arc<CertifiedKey>,
    /// DNS names from the leaf's subject alternative names (`*.example.com` for wildcards),
    /// lowercased.
    pub names: Vec<String>,
}

/// Reads a PEM chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_cert(cert: &Path, key: &Path) -> Result<LoadedCert, TlsError> {
    let chain = load_chain(cert)?;
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::new(key, format!("no private key: {e}")))?;
    certified(cert, chain, key, private)
}

/// The same as [`load_cert`] for PEM held in memory; `cert_name` and `key_name` say where
/// it came from in errors (e.g. `Secret default/site (tls.crt)`).
pub fn load_cert_pem(
    cert_name: &Path,
    cert_pem: &[u8],
    key_name: &Path,
    key_pem: &[u8],
) -> Result<LoadedCert, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(cert_name, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::new(cert_name, "no CERTIFICATE block"));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::new(key_name, format!("no private key: {e}")))?;
    certified(cert_name, chain, key_name, private)
}

fn certified(
    cert: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: &Path,
    private: PrivateKeyDer<'static>,
) -> Result<LoadedCert, TlsError> {
    let certified = CertifiedKey::from_der(chain, private, &provider())
        .map_err(|e| TlsError::new(key, format!("does not go with {}: {e}", cert.display())))?;
    let names = leaf_names(cert, &certified.cert[0])?;
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
    })
}

/// Reads every certificate of a PEM file (a chain or a CA bundle).
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::new(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(path, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::new(path, "no CERTIFICATE block"));
    }
    Ok(chain)
}

/// A root store from a PEM CA bundle.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::new(path, format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The operating system's trusted roots (what `curl` would trust on this machine).
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "reading the system's CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, "system CA certificates");
    }
    roots
}

/// DNS names of a leaf certificate: its subject alternative names, else its common name.
fn leaf_names(path: &Path, leaf: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| TlsError::new(path, format!("unreadable certificate: {e}")))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    if !cert.validity().is_valid() {
        tracing::warn!(file = %path.display(), not_after = %cert.validity().not_after, "certificate is outside its validity period");
    }
    Ok(names)
}

/// Values by the TLS server names they serve: exact names, then `*.suffix` wildcards (one
/// label, as in RFC 6125), then a default for clients that send no SNI or an unknown name.
#[derive(Debug)]
pub struct SniMap<T> {
    exact: HashMap<String, T>,
    wildcard: HashMap<String, T>,
    default: Option<T>,
}

impl<T> Default for SniMap<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: None,
        }
    }
}

impl<T: Clone> SniMap<T> {
    /// Adds `value` for `names` (exact or `*.suffix`). The first value added is the default
    /// unless [`SniMap::set_default`] says otherwise. A name already taken keeps its first
    /// value.
    pub fn add(&mut self, names: &[String], value: &T) {
        for n in names {
            let n = n.to_ascii_lowercase();
            let slot = match n.strip_prefix("*.") {
                Some(suffix) => self.wildcard.entry(suffix.to_owned()),
                None => self.exact.entry(n),
            };
            slot.or_insert_with(|| value.clone());
        }
        if self.default.is_none() {
            self.default = Some(value.clone());
        }
    }

    /// Makes `value` the answer for clients without SNI or with an unknown name.
    pub fn set_default(&mut self, value: &T) {
        self.default = Some(value.clone());
    }

    /// The value for `sni`.
    pub fn find(&self, sni: Option<&str>) -> Option<&T> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(v) = self.exact.get(&name) {
                return Some(v);
            }
            if let Some((_, suffix)) = name.split_once('.') {
                if let Some(v) = self.wildcard.get(suffix) {
                    return Some(v);
                }
            }
        }
        self.default.as_ref()
    }
}

/// Certificates by SNI, as rustls asks for them during a handshake.
pub type SniResolver = SniMap<Arc<CertifiedKey>>;

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(hello.server_name()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let c = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let der = PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
        Arc::new(CertifiedKey::from_der(vec![c.cert.der().clone()], der, &provider()).unwrap())
    }

    #[test]
    fn aes_first_offers_the_same_suites_and_chacha_first_clients_are_seen() {
        let mut a: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut b: Vec<_> = aes_first_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(b[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b);

        use rustls::CipherSuite as S;
        let grease = S::from(0x1a1a);
        assert!(prefers_chacha(&[grease, S::TLS13_CHACHA20_POLY1305_SHA256]));
        assert!(!prefers_chacha(&[
            S::TLS13_AES_256_GCM_SHA384,
            S::TLS13_CHACHA20_POLY1305_SHA256
        ]));
        assert!(!prefers_chacha(&[]));
    }

    #[test]
    fn exact_beats_wildcard_and_unknown_names_get_the_default() {
        let (a, w, d) = (key(), key(), key());
        let mut r = SniResolver::default();
        r.add(&["*.example.com".into()], &w);
        r.add(&["a.example.com".into()], &a);
        r.set_default(&d);
        let is = |got: Option<&Arc<CertifiedKey>>, want: &Arc<CertifiedKey>| {
            Arc::ptr_eq(got.unwrap(), want)
        };
        assert!(is(r.find(Some("A.Example.com")), &a));
        assert!(is(r.find(Some("b.example.com")), &w));
        assert!(is(r.find(Some("x.b.example.com")), &d), "one label only");
        assert!(is(r.find(Some("example.com")), &d));
        assert!(is(r.find(None), &d));
    }
}
