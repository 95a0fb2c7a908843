//! Certificates from `kubernetes.io/tls` Secrets: each Secret's PEM checked once per
//! resourceVersion (chain readable, key matching), and the last good certificate of a Secret
//! kept in force when an update makes it invalid, so a bad rotation breaks nothing.
//!
//! The PEM stays in memory ([`PemPair`]): it is never written to disk nor shown in `/config`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use strait_proxy::table::spec::PemPair;

use super::cluster::{Cluster, Key};

/// The TLS Secrets of the cluster as certificates, by Secret.
#[derive(Debug, Default)]
pub struct SecretCerts {
    by_secret: HashMap<Key, Checked>,
}

#[derive(Debug)]
struct Checked {
    /// The resourceVersion checked, so an unchanged Secret is not parsed again.
    version: Option<String>,
    /// The newest PEM that was valid (maybe of an older version).
    good: Option<Arc<PemPair>>,
    /// Why the current version cannot be used.
    error: Option<String>,
}

/// What a `tls` entry's Secret gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    /// Valid; serve it.
    Valid(Arc<PemPair>),
    /// The current version is invalid; an older, valid one is still served.
    Stale(Arc<PemPair>, String),
    /// Nothing can be served: the reason.
    Unusable(String),
}

impl SecretCerts {
    /// Checks the Secrets that changed since the last call and forgets deleted ones.
    pub fn refresh(&mut self, cluster: &Cluster) {
        self.by_secret
            .retain(|k, _| cluster.secrets.contains_key(k));
        for (key, secret) in &cluster.secrets {
            let version = secret.metadata.resource_version.clone();
            let entry = self.by_secret.entry(key.clone()).or_insert(Checked {
                version: None,
                good: None,
                error: None,
            });
            // Objects without a version (only in tests built by hand) are always checked.
            if entry.version.is_some() && entry.version == version {
                continue;
            }
            entry.version = version;
            match check(key, secret) {
                Ok(pem) => {
                    entry.good = Some(Arc::new(pem));
                    entry.error = None;
                }
                Err(e) => entry.error = Some(e),
            }
        }
    }

    /// What the Secret `name` in `namespace` gives.
    pub fn get(&self, namespace: &str, name: &str) -> CertState {
        let key = Key::new(namespace, name);
        match self.by_secret.get(&key) {
            None => CertState::Unusable(format!(
                "Secret {key} does not exist (or is not of type kubernetes.io/tls)"
            )),
            Some(c) => match (&c.good, &c.error) {
                (Some(pem), None) => CertState::Valid(Arc::clone(pem)),
                (Some(pem), Some(e)) => CertState::Stale(Arc::clone(pem), e.clone()),
                (None, Some(e)) => CertState::Unusable(e.clone()),
                (None, None) => CertState::Unusable(format!("Secret {key} was not checked")),
            },
        }
    }
}

/// Where a Secret's field is, as certificate errors name it.
pub fn label(key: &Key, field: &str) -> String {
    format!("Secret {key} ({field})")
}

fn check(key: &Key, secret: &Secret) -> Result<PemPair, String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|v| v.0.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("Secret {key} has no {name}"))
    };
    let pem = PemPair {
        cert: field("tls.crt")?,
        key: field("tls.key")?,
    };
    let (cert_label, key_label) = (label(key, "tls.crt"), label(key, "tls.key"));
    strait_proxy::tls::load_cert_pem(
        Path::new(&cert_label),
        &pem.cert,
        Path::new(&key_label),
        &pem.key,
    )
    .map_err(|e| e.to_string())?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(version: &str, cert: &[u8], key: &[u8]) -> Arc<Secret> {
        let mut s = Secret::default();
        s.metadata.namespace = Some("web".into());
        s.metadata.name = Some("site".into());
        s.metadata.resource_version = Some(version.into());
        s.type_ = Some("kubernetes.io/tls".into());
        s.data = Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert.to_vec())),
            ("tls.key".to_owned(), ByteString(key.to_vec())),
        ]));
        Arc::new(s)
    }

    fn pem(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn cluster_with(s: Arc<Secret>) -> Cluster {
        let mut c = Cluster::default();
        c.secrets.insert(Key::of(&*s), s);
        c
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_certificate_and_a_fix_replaces_it() {
        let (c1, k1) = pem("a.example");
        let (c2, k2) = pem("b.example");
        let mut certs = SecretCerts::default();
        certs.refresh(&cluster_with(secret("1", c1.as_bytes(), k1.as_bytes())));
        let CertState::Valid(first) = certs.get("web", "site") else {
            panic!("valid at first")
        };
        assert_eq!(first.cert, c1.as_bytes());

        // The key of another certificate: rejected, the first one stays.
        certs.refresh(&cluster_with(secret("2", c1.as_bytes(), k2.as_bytes())));
        match certs.get("web", "site") {
            CertState::Stale(pem, why) => {
                assert_eq!(pem, first);
                assert!(why.contains("Secret web/site (tls.key)"), "{why}");
            }
            other => panic!("expected the stale certificate, got {other:?}"),
        }

        certs.refresh(&cluster_with(secret("3", c2.as_bytes(), k2.as_bytes())));
        let CertState::Valid(second) = certs.get("web", "site") else {
            panic!("valid after the fix")
        };
        assert_eq!(second.cert, c2.as_bytes());

        certs.refresh(&Cluster::default());
        assert!(
            matches!(certs.get("web", "site"), CertState::Unusable(m) if m.contains("does not exist"))
        );
    }

    #[test]
    fn a_secret_never_valid_is_unusable_with_the_reason() {
        let mut certs = SecretCerts::default();
        certs.refresh(&cluster_with(secret("1", b"not pem", b"")));
        match certs.get("web", "site") {
            CertState::Unusable(m) => assert!(m.contains("has no tls.key"), "{m}"),
            other => panic!("{other:?}"),
        }
        let (c, _) = pem("a.example");
        certs.refresh(&cluster_with(secret("2", c.as_bytes(), b"junk")));
        match certs.get("web", "site") {
            CertState::Unusable(m) => assert!(m.contains("no private key"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
