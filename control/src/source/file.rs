//! The static configuration file: read, parse, validate, and report problems with file,
//! line and column.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strait_proxy::table::spec::Spec;
use strait_proxy::table::{compile, CompileError};

use crate::locate::Locator;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a configuration file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{}", render(diagnostics))]
    Invalid {
        /// Every problem found.
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(d: &[Diagnostic]) -> String {
    let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// A configuration that parsed and passed validation.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub spec: Spec,
    /// The text it came from, for locating errors found later (e.g. at publish time).
    pub text: String,
    /// The file.
    pub path: PathBuf,
}

impl Loaded {
    /// Places compile errors in this file.
    pub fn diagnose(&self, errors: &[CompileError]) -> ConfigError {
        diagnose(&self.path, &self.text, errors)
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let spec = parse(path, &text)?;
    Ok(Loaded {
        spec,
        text,
        path: path.to_owned(),
    })
}

/// Parses and validates configuration text; `path` is used in messages only.
pub fn parse(path: &Path, text: &str) -> Result<Spec, ConfigError> {
    let spec: Spec = serde_yaml_ng::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // The location is given separately; keep the message itself short.
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        ConfigError::Invalid {
            diagnostics: vec![Diagnostic {
                file: path.to_owned(),
                line,
                column,
                message,
            }],
        }
    })?;
    let spec = Arc::new(spec);
    match compile(Arc::clone(&spec), &path.display().to_string(), 0, None) {
        Ok(_) => Ok(Arc::unwrap_or_clone(spec)),
        Err(errors) => Err(diagnose(path, text, &errors)),
    }
}

fn diagnose(path: &Path, text: &str, errors: &[CompileError]) -> ConfigError {
    let locator = Locator::new(text);
    let mut diagnostics: Vec<Diagnostic> = errors
        .iter()
        .map(|e| {
            let pos = locator.find(&e.path);
            Diagnostic {
                file: path.to_owned(),
                line: pos.line,
                column: pos.column,
                message: format!("{}: {}", e.path, e.message),
            }
        })
        .collect();
    diagnostics.sort_by_key(|d| (d.line, d.column));
    ConfigError::Invalid { diagnostics }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<Diagnostic> {
        match parse(Path::new("t.yaml"), text) {
            Err(ConfigError::Invalid { diagnostics }) => diagnostics,
            other => panic!("expected diagnostics, got {other:?}"),
        }
    }

    #[test]
    fn rejects_typos_in_weighted_endpoints_and_hash_keys() {
        let text = "listeners:\n  - name: web\n    address: 127.0.0.1:1\nbackends:\n  - name: b\n    endpoints: [{address: \"10.0.0.1:80\", wieght: 3}]\n";
        let d = errors(text);
        assert!(d[0].message.contains("an endpoint"), "{d:?}");
        let text = "listeners:\n  - name: web\n    address: 127.0.0.1:1\nbackends:\n  - name: b\n    policy: maglev\n    hash: {header: a, cookie: b}\n";
        let d = errors(text);
        assert!(d[0].message.contains("client_ip, {header: NAME}"), "{d:?}");
    }

    #[test]
    fn rejects_self_redirects_and_timeouts_on_local_routes() {
        let text = "\
listeners:
  - name: web
    address: 127.0.0.1:1
    routes:
      - redirect: {}
      - direct_response: {status: 200}
        timeout: 1s
";
        let d = errors(text);
        assert_eq!(d.len(), 2, "{d:#?}");
        assert!(d[0].message.contains("points at itself"), "{d:?}");
        assert!(
            d[1].message
                .contains("timeout applies to forward routes only"),
            "{d:?}"
        );
        assert_eq!(d[1].line, 7);
    }

    #[test]
    fn an_invalid_backend_is_not_also_reported_unknown() {
        let text = "listeners:\n  - name: web\n    address: 127.0.0.1:1\n    routes:\n      - forward: {backend: b}\nbackends:\n  - name: b\n    endpoints: [\"nope\"]\n";
        let d = errors(text);
        assert_eq!(d.len(), 1, "{d:#?}");
        assert!(d[0].message.contains("expected ip:port"));
    }

    #[test]
    fn checks_dns_backends_and_tcp_listeners() {
        let text = "\
listeners:
  - name: raw
    address: 127.0.0.1:1
    protocol: tcp
    routes:
      - direct_response: {status: 200}
  - name: web
    address: 127.0.0.1:2
    tcp: {backend: a}
backends:
  - name: a
    dns: 10.0.0.1:80
  - name: b
    dns: db.example
  - name: c
    dns: db.example:80
    endpoints: [\"10.0.0.1:80\"]
dns:
  nameservers: [nope]
  min_refresh: 10s
  max_refresh: 5s
";
        let d = errors(text);
        let got: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
        let want = [
            (2, "a tcp listener needs tcp: {backend: NAME}"),
            (5, "a tcp listener has no HTTP routes"),
            (9, "tcp is only for listeners with protocol: tcp"),
            (12, "is an address, not a DNS name: list it under endpoints"),
            (14, "expected name:port"),
            (16, "give either endpoints or dns, not both"),
            (19, "invalid nameserver \"nope\""),
            (21, "must be at least min_refresh (10s)"),
        ];
        assert_eq!(got.len(), want.len(), "{d:#?}");
        for ((line, msg), (wline, wmsg)) in got.iter().zip(want) {
            assert!(msg.contains(wmsg) && *line == wline, "{d:#?}");
        }
    }

    #[test]
    fn unknown_field_has_a_position() {
        let d = errors("listeners:\n  - name: web\n    adress: 127.0.0.1:1\n");
        assert_eq!((d[0].line, d[0].column), (3, 5), "{d:?}");
        assert!(d[0].message.contains("unknown field `adress`"), "{d:?}");
    }

    #[test]
    fn reports_every_semantic_error_in_place() {
        let text = "\
listeners:
  - name: web
    address: 127.0.0.1:8080
    routes:
      - forward:
          backend: nope
      - match:
          prefix: bad
        direct_response:
          status: 200
backends:
  - name: api
    endpoints: [\"localhost:80\"]
";
        let d = errors(text);
        let lines: Vec<usize> = d.iter().map(|d| d.line).collect();
        assert_eq!(lines, vec![6, 8, 13], "{d:#?}");
        assert!(d[0].message.contains("unknown backend \"nope\""));
        assert!(d[1].message.contains("must start with '/'"));
        assert!(d[2].message.contains("expected ip:port"));
    }

    #[test]
    fn a_pool_idle_timeout_of_zero_is_refused_in_place() {
        let d = errors("listeners:\n  - name: web\n    address: 127.0.0.1:1\n    routes:\n      - forward: {backend: api}\nbackends:\n  - name: api\n    pool:\n      idle_timeout: 0s\n    endpoints: [\"127.0.0.1:80\"]\n");
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!((d[0].line, d[0].column), (9, 7), "{d:#?}");
        assert!(d[0].message.contains("max_idle_per_endpoint: 0"), "{d:#?}");
    }

    #[test]
    fn a_kubernetes_max_delay_of_zero_is_refused_in_place() {
        let d = errors("kubernetes:\n  enabled: true\n  debounce: 2s\n  max_delay: 0s\n");
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!((d[0].line, d[0].column), (4, 3), "{d:#?}");
        assert!(d[0].message.contains("must be greater than 0s"), "{d:#?}");
    }

    #[test]
    fn checks_rate_limits() {
        let text = "\
listeners:
  - name: web
    address: 127.0.0.1:1
    routes:
      - direct_response: {status: 200}
        rate_limit:
          requests: 0
          per: 0s
          burst: 0
          key: {header: \"bad name\"}
          max_keys: 0
    default_route:
      direct_response: {status: 404}
      rate_limit: {requests: 5, per: 1s, max_keys: 10}
";
        let d = errors(text);
        let got: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
        let want = [
            (7, "must be at least 1"),
            (8, "must be greater than 0s"),
            (9, "must be at least 1"),
            (10, "invalid header name \"bad name\""),
            (11, "must be at least 1"),
            (14, "max_keys applies to keyed limits only"),
        ];
        assert_eq!(got.len(), want.len(), "{d:#?}");
        for ((line, msg), (wline, wmsg)) in got.iter().zip(want) {
            assert!(msg.contains(wmsg) && *line == wline, "{d:#?}");
        }
        let d = errors("listeners:\n  - name: web\n    address: 127.0.0.1:1\n    routes:\n      - direct_response: {status: 200}\n        rate_limit: {requests: 1, per: 1s, key: ip}\n");
        assert!(
            d[0].message.contains("none, client_ip or {header: NAME}"),
            "{d:?}"
        );
    }
}
