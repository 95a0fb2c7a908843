//! `strait.io/` annotations on an Ingress: the route and backend settings of the static
//! configuration, written as strings.
//!
//! [`parse`] reads one Ingress's annotations into [`IngressSettings`], which the Kubernetes
//! source applies to every route and backend it builds from that Ingress. The checks are the
//! ones `compile` makes on the same fields, done here first so that a bad annotation is
//! blamed on its Ingress (by annotation name) instead of failing the whole generated table,
//! whose field paths the Ingress's author never wrote. The user reference is
//! `docs/kubernetes-annotations.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use strait_proxy::table::spec::{
    BackendSpec, GrpcCode, HashKeySpec, HashSource, OutlierSpec, Policy, RateLimitKeySpec,
    RateLimitSource, RateLimitSpec, RetrySpec, RouteSpec, UpstreamProtocol,
};

/// The prefix of the annotations Strait reads. Annotations with any other prefix are ignored.
pub const PREFIX: &str = "strait.io/";

/// Every annotation, without [`PREFIX`], in the order of the documentation.
const NAMES: &[&str] = &[
    "timeout",
    "retries",
    "retry-on",
    "retry-non-idempotent",
    "per-try-timeout",
    "rate-limit",
    "rate-limit-burst",
    "rate-limit-key",
    "rate-limit-response-headers",
    "rewrite-prefix",
    "set-request-headers",
    "set-response-headers",
    "load-balance",
    "affinity",
    "affinity-cookie-name",
    "affinity-header",
    "backend-protocol",
    "connect-timeout",
    "max-connections",
    "max-pending-requests",
    "max-requests",
    "max-retries",
    "outlier-consecutive-5xx",
    "outlier-consecutive-gateway-errors",
    "outlier-ejection-time",
    "outlier-max-ejection-time",
    "outlier-max-ejection-percent",
    "ssl-redirect",
];

/// ingress-nginx names that people carry over with only the prefix changed, and the Strait
/// annotation closest to each.
const NGINX_NAMES: &[(&str, &str)] = &[
    ("proxy-read-timeout", "timeout"),
    ("proxy-send-timeout", "timeout"),
    ("proxy-connect-timeout", "connect-timeout"),
    ("proxy-next-upstream", "retry-on"),
    ("proxy-next-upstream-tries", "retries"),
    ("upstream-hash-by", "affinity"),
    ("session-cookie-name", "affinity-cookie-name"),
    ("limit-rps", "rate-limit"),
    ("limit-rpm", "rate-limit"),
    ("limit-burst-multiplier", "rate-limit-burst"),
    ("rewrite-target", "rewrite-prefix"),
    ("upstream-vhost", "set-request-headers"),
];

/// Most retries a route may ask for; the same bound as `compile`, which keeps it private.
const MAX_RETRIES: u32 = 10;

/// One annotation Strait cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}={value:?}: {message}")]
pub struct AnnotationError {
    /// The annotation's full name, e.g. `strait.io/timeout`.
    pub annotation: String,
    /// Its value as written.
    pub value: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// The settings one Ingress's annotations give to its routes and backends. The default is an
/// Ingress without `strait.io/` annotations: nothing changes.
///
/// Values from [`parse`] are valid together: applied to a route or backend that compiles,
/// the result compiles too. Fields set by hand get no such check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngressSettings {
    /// `timeout`: the route timeout; zero disables it.
    pub timeout: Option<Duration>,
    /// `retries`, `retry-on`, `retry-non-idempotent`, `per-try-timeout`, on top of the
    /// [`RetrySpec`] defaults.
    pub retry: Option<RetrySpec>,
    /// `rate-limit` and its `rate-limit-*` companions.
    pub rate_limit: Option<RateLimitSpec>,
    /// `rewrite-prefix`.
    pub rewrite_prefix: Option<String>,
    /// `set-request-headers`: lowercase name to value, replacing the request's values.
    pub set_request_headers: BTreeMap<String, String>,
    /// `set-response-headers`: lowercase name to value, replacing the response's values.
    pub set_response_headers: BTreeMap<String, String>,
    /// `load-balance`, or `ring_hash` when only `affinity` is given.
    pub policy: Option<Policy>,
    /// `affinity` with `affinity-cookie-name` or `affinity-header`; only with a hashing
    /// `policy`.
    pub hash: Option<HashKeySpec>,
    /// `backend-protocol`.
    pub protocol: Option<UpstreamProtocol>,
    /// `connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// `max-connections` (circuit breaker).
    pub max_connections: Option<u32>,
    /// `max-pending-requests` (circuit breaker).
    pub max_pending_requests: Option<u32>,
    /// `max-requests` (circuit breaker).
    pub max_requests: Option<u32>,
    /// `max-retries` (circuit breaker: retries in flight to the backend).
    pub max_retries: Option<u32>,
    /// The `outlier-*` annotations, on top of the [`OutlierSpec`] defaults.
    pub outlier_detection: Option<OutlierSpec>,
    /// `ssl-redirect`: whether plain-HTTP requests for the Ingress's TLS hosts are
    /// redirected to HTTPS (unset: yes, as ingress-nginx does).
    pub ssl_redirect: Option<bool>,
}

impl IngressSettings {
    /// Applies the route settings. Timeout, retries and the prefix rewrite only mean
    /// something on a route that forwards, and the rewrite only on a prefix match, so routes
    /// without them are left as they are rather than made invalid.
    pub fn apply_route(&self, route: &mut RouteSpec) {
        if route.forward.is_some() {
            if let Some(t) = self.timeout {
                route.timeout = Some(t);
            }
            if let Some(r) = &self.retry {
                route.retry = Some(Box::new(r.clone()));
            }
            // A route without `exact` is compiled as a prefix match ("/" when it has no
            // path), which is what `rewrite_prefix` needs.
            if route.matches.exact.is_none() {
                if let Some(p) = &self.rewrite_prefix {
                    route.rewrite_prefix = Some(p.clone());
                }
            }
        }
        if let Some(rl) = &self.rate_limit {
            route.rate_limit = Some(Box::new(rl.clone()));
        }
        route.request_headers.set.extend(
            self.set_request_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        route.response_headers.set.extend(
            self.set_response_headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }

    /// Applies the backend settings. A backend gets TLS from no annotation, so it has none
    /// and `backend-protocol: h2c` cannot clash with it.
    pub fn apply_backend(&self, backend: &mut BackendSpec) {
        if let Some(p) = self.policy {
            backend.policy = p;
            // A hash key left over from before would make any other policy invalid.
            if !matches!(p, Policy::RingHash | Policy::Maglev) {
                backend.hash = None;
            }
        }
        if let Some(h) = &self.hash {
            backend.hash = Some(Box::new(h.clone()));
        }
        if let Some(p) = self.protocol {
            backend.protocol = p;
        }
        if let Some(t) = self.connect_timeout {
            backend.connect_timeout = t;
        }
        let cb = &mut backend.circuit_breaker;
        for (field, value) in [
            (&mut cb.max_connections, self.max_connections),
            (&mut cb.max_pending_requests, self.max_pending_requests),
            (&mut cb.max_requests, self.max_requests),
            (&mut cb.max_retries, self.max_retries),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        if let Some(o) = &self.outlier_detection {
            backend.outlier_detection = Some(Box::new(o.clone()));
        }
    }

    /// Whether any backend setting is given. Without one, the Ingress's Services can share
    /// their backends with other Ingresses.
    pub fn has_backend_settings(&self) -> bool {
        self.policy.is_some()
            || self.hash.is_some()
            || self.protocol.is_some()
            || self.connect_timeout.is_some()
            || self.max_connections.is_some()
            || self.max_pending_requests.is_some()
            || self.max_requests.is_some()
            || self.max_retries.is_some()
            || self.outlier_detection.is_some()
    }
}

/// Reads an Ingress's `strait.io/` annotations. Unknown `strait.io/` names are errors, so
/// that a typo is reported instead of silently doing nothing. Every problem is returned,
/// not only the first.
pub fn parse(
    annotations: &BTreeMap<String, String>,
) -> Result<IngressSettings, Vec<AnnotationError>> {
    let mut p = Parser {
        annotations,
        errors: Vec::new(),
        given: BTreeSet::new(),
        failed: BTreeSet::new(),
        raw: Raw::default(),
    };
    for (key, value) in annotations {
        if let Some(name) = key.strip_prefix(PREFIX) {
            p.one(key, name, value);
        }
    }
    p.finish()
}

/// Affinity sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Affinity {
    ClientIp,
    Cookie,
    Header,
}

/// What `retry-on` lists.
#[derive(Debug, Default)]
struct RetryOn {
    connect_failure: bool,
    statuses: Vec<u16>,
    grpc_statuses: Vec<GrpcCode>,
}

/// Each annotation's value, parsed on its own; [`Parser::finish`] checks them together.
#[derive(Debug, Default)]
struct Raw {
    timeout: Option<Duration>,
    retries: Option<u32>,
    retry_on: Option<RetryOn>,
    retry_non_idempotent: Option<bool>,
    per_try_timeout: Option<Duration>,
    rate_limit: Option<(u32, Duration)>,
    rate_limit_burst: Option<u32>,
    rate_limit_key: Option<RateLimitKeySpec>,
    rate_limit_response_headers: Option<bool>,
    rewrite_prefix: Option<String>,
    set_request_headers: Option<BTreeMap<String, String>>,
    set_response_headers: Option<BTreeMap<String, String>>,
    load_balance: Option<Policy>,
    affinity: Option<Affinity>,
    affinity_cookie_name: Option<String>,
    affinity_header: Option<String>,
    backend_protocol: Option<UpstreamProtocol>,
    connect_timeout: Option<Duration>,
    max_connections: Option<u32>,
    max_pending_requests: Option<u32>,
    max_requests: Option<u32>,
    max_retries: Option<u32>,
    outlier_consecutive_5xx: Option<u32>,
    outlier_consecutive_gateway_errors: Option<u32>,
    outlier_ejection_time: Option<Duration>,
    outlier_max_ejection_time: Option<Duration>,
    outlier_max_ejection_percent: Option<u32>,
    ssl_redirect: Option<bool>,
}

struct Parser<'a> {
    annotations: &'a BTreeMap<String, String>,
    errors: Vec<AnnotationError>,
    /// Known names present, valid or not.
    given: BTreeSet<&'static str>,
    /// Known names whose value is invalid: checks that combine annotations skip them, so one
    /// bad value gives one error.
    failed: BTreeSet<&'static str>,
    raw: Raw,
}

impl Parser<'_> {
    fn one(&mut self, key: &str, name: &str, value: &str) {
        let Some(&known) = NAMES.iter().find(|n| **n == name) else {
            let message = unknown_message(name);
            self.push(key, value, message);
            return;
        };
        self.given.insert(known);
        let v = value.trim();
        let r = &mut self.raw;
        let result = match known {
            "timeout" => duration(v, "0s disables the timeout").map(|d| r.timeout = Some(d)),
            "retries" => int(v, 0, MAX_RETRIES).map(|n| r.retries = Some(n)),
            "retry-on" => retry_on(v).map(|on| r.retry_on = Some(on)),
            "retry-non-idempotent" => boolean(v).map(|b| r.retry_non_idempotent = Some(b)),
            "per-try-timeout" => positive_duration(v).map(|d| r.per_try_timeout = Some(d)),
            "rate-limit" => rate(v).map(|x| r.rate_limit = Some(x)),
            "rate-limit-burst" => int(v, 1, u32::MAX).map(|n| r.rate_limit_burst = Some(n)),
            "rate-limit-key" => rate_limit_key(v).map(|k| r.rate_limit_key = Some(k)),
            "rate-limit-response-headers" => {
                boolean(v).map(|b| r.rate_limit_response_headers = Some(b))
            }
            "rewrite-prefix" => path(v).map(|p| r.rewrite_prefix = Some(p)),
            "ssl-redirect" => boolean(v).map(|b| r.ssl_redirect = Some(b)),
            "set-request-headers" => headers(v).map(|h| r.set_request_headers = Some(h)),
            "set-response-headers" => headers(v).map(|h| r.set_response_headers = Some(h)),
            "load-balance" => policy(v).map(|p| r.load_balance = Some(p)),
            "affinity" => affinity(v).map(|a| r.affinity = Some(a)),
            "affinity-cookie-name" => cookie_name(v).map(|c| r.affinity_cookie_name = Some(c)),
            "affinity-header" => header_name(v).map(|h| r.affinity_header = Some(h)),
            "backend-protocol" => protocol(v).map(|p| r.backend_protocol = Some(p)),
            "connect-timeout" => positive_duration(v).map(|d| r.connect_timeout = Some(d)),
            "max-connections" => int(v, 1, u32::MAX).map(|n| r.max_connections = Some(n)),
            "max-pending-requests" => int(v, 1, u32::MAX).map(|n| r.max_pending_requests = Some(n)),
            "max-requests" => int(v, 1, u32::MAX).map(|n| r.max_requests = Some(n)),
            "max-retries" => int(v, 0, u32::MAX).map(|n| r.max_retries = Some(n)),
            "outlier-consecutive-5xx" => {
                int(v, 0, u32::MAX).map(|n| r.outlier_consecutive_5xx = Some(n))
            }
            "outlier-consecutive-gateway-errors" => {
                int(v, 0, u32::MAX).map(|n| r.outlier_consecutive_gateway_errors = Some(n))
            }
            "outlier-ejection-time" => {
                positive_duration(v).map(|d| r.outlier_ejection_time = Some(d))
            }
            "outlier-max-ejection-time" => {
                positive_duration(v).map(|d| r.outlier_max_ejection_time = Some(d))
            }
            "outlier-max-ejection-percent" => {
                int(v, 0, 100).map(|n| r.outlier_max_ejection_percent = Some(n))
            }
            _ => unreachable!("every name in NAMES has a parser"),
        };
        if let Err(message) = result {
            self.failed.insert(known);
            self.push(key, value, message);
        }
    }

    fn push(&mut self, key: &str, value: &str, message: String) {
        self.errors.push(AnnotationError {
            annotation: key.to_owned(),
            value: value.to_owned(),
            message,
        });
    }

    /// An error about a known annotation that is present.
    fn err(&mut self, name: &str, message: impl Into<String>) {
        let key = format!("{PREFIX}{name}");
        let value = self.annotations.get(&key).cloned().unwrap_or_default();
        self.push(&key, &value, message.into());
    }

    fn valid(&self, name: &str) -> bool {
        self.given.contains(name) && !self.failed.contains(name)
    }

    fn finish(mut self) -> Result<IngressSettings, Vec<AnnotationError>> {
        let r = std::mem::take(&mut self.raw);
        let outlier_detection = self.outlier(&r);
        let mut s = IngressSettings {
            timeout: r.timeout,
            rewrite_prefix: r.rewrite_prefix,
            set_request_headers: r.set_request_headers.unwrap_or_default(),
            set_response_headers: r.set_response_headers.unwrap_or_default(),
            protocol: r.backend_protocol,
            connect_timeout: r.connect_timeout,
            max_connections: r.max_connections,
            max_pending_requests: r.max_pending_requests,
            max_requests: r.max_requests,
            max_retries: r.max_retries,
            outlier_detection,
            ssl_redirect: r.ssl_redirect,
            ..IngressSettings::default()
        };

        if [
            "retries",
            "retry-on",
            "retry-non-idempotent",
            "per-try-timeout",
        ]
        .iter()
        .any(|n| self.given.contains(n))
        {
            let mut retry = RetrySpec::default();
            if let Some(n) = r.retries {
                retry.retries = n;
            }
            if let Some(on) = r.retry_on {
                retry.on_connect_failure = on.connect_failure;
                retry.statuses = on.statuses;
                retry.grpc_statuses = on.grpc_statuses;
            }
            if let Some(b) = r.retry_non_idempotent {
                retry.non_idempotent = b;
            }
            retry.per_try_timeout = r.per_try_timeout;
            s.retry = Some(retry);
        }

        for name in [
            "rate-limit-burst",
            "rate-limit-key",
            "rate-limit-response-headers",
        ] {
            if self.given.contains(name) && !self.given.contains("rate-limit") {
                self.err(
                    name,
                    "needs strait.io/rate-limit, the rate it belongs to (e.g. \"100/s\")",
                );
            }
        }
        if let Some((requests, per)) = r.rate_limit {
            s.rate_limit = Some(RateLimitSpec {
                requests,
                per,
                burst: r.rate_limit_burst,
                key: r.rate_limit_key.unwrap_or_default(),
                response_headers: r.rate_limit_response_headers.unwrap_or(false),
                max_keys: None,
            });
        }

        self.check_affinity(&r.affinity, &r.affinity_cookie_name, &r.affinity_header);
        let hashing = |p: Policy| matches!(p, Policy::RingHash | Policy::Maglev);
        match (r.affinity, r.load_balance) {
            (Some(_), Some(p)) if !hashing(p) => self.err(
                "load-balance",
                "cannot keep strait.io/affinity: affinity needs ring_hash or maglev \
                 (or no strait.io/load-balance, which means ring_hash)",
            ),
            (Some(a), p) => {
                s.policy = Some(p.unwrap_or(Policy::RingHash));
                s.hash = match a {
                    Affinity::ClientIp => Some(HashKeySpec::Source(HashSource::ClientIp)),
                    Affinity::Cookie => r
                        .affinity_cookie_name
                        .map(|cookie| HashKeySpec::Cookie { cookie }),
                    Affinity::Header => r
                        .affinity_header
                        .map(|header| HashKeySpec::Header { header }),
                };
            }
            (None, p) => s.policy = p,
        }

        if self.errors.is_empty() {
            Ok(s)
        } else {
            Err(self.errors)
        }
    }

    /// `affinity` and the annotation naming its cookie or header come together.
    fn check_affinity(
        &mut self,
        affinity: &Option<Affinity>,
        cookie: &Option<String>,
        header: &Option<String>,
    ) {
        // An invalid `affinity` has its own error; what it would have needed is unknown.
        if self.failed.contains("affinity") {
            return;
        }
        for (name, wanted) in [
            ("affinity-cookie-name", Affinity::Cookie),
            ("affinity-header", Affinity::Header),
        ] {
            if self.given.contains(name) && *affinity != Some(wanted) {
                let value = if wanted == Affinity::Cookie {
                    "cookie"
                } else {
                    "header"
                };
                self.err(
                    name,
                    format!("only used with strait.io/affinity: {value}; add it or remove this"),
                );
            }
        }
        match affinity {
            Some(Affinity::Cookie)
                if cookie.is_none() && !self.given.contains("affinity-cookie-name") =>
            {
                self.err(
                    "affinity",
                    "cookie affinity needs strait.io/affinity-cookie-name, the cookie whose \
                     value picks the endpoint (the application sets it; Strait does not)",
                );
            }
            Some(Affinity::Header)
                if header.is_none() && !self.given.contains("affinity-header") =>
            {
                self.err(
                    "affinity",
                    "header affinity needs strait.io/affinity-header, the request header whose \
                     value picks the endpoint",
                );
            }
            _ => {}
        }
    }

    /// The outlier detection the `outlier-*` annotations ask for, checked as a whole.
    fn outlier(&mut self, r: &Raw) -> Option<OutlierSpec> {
        const OUTLIER: [&str; 5] = [
            "outlier-consecutive-5xx",
            "outlier-consecutive-gateway-errors",
            "outlier-ejection-time",
            "outlier-max-ejection-time",
            "outlier-max-ejection-percent",
        ];
        if !OUTLIER.iter().any(|n| self.given.contains(n)) {
            return None;
        }
        let mut o = OutlierSpec::default();
        if let Some(n) = r.outlier_consecutive_5xx {
            o.consecutive_5xx = n;
        }
        if let Some(n) = r.outlier_consecutive_gateway_errors {
            o.consecutive_gateway_errors = n;
        }
        if let Some(d) = r.outlier_ejection_time {
            o.base_ejection_time = d;
        }
        if let Some(d) = r.outlier_max_ejection_time {
            o.max_ejection_time = d;
        }
        if let Some(n) = r.outlier_max_ejection_percent {
            o.max_ejection_percent = n;
        }
        if OUTLIER.iter().any(|n| self.failed.contains(n)) {
            return None;
        }
        if o.consecutive_5xx == 0 && o.consecutive_gateway_errors == 0 {
            let name = if self.valid("outlier-consecutive-5xx") {
                "outlier-consecutive-5xx"
            } else {
                "outlier-consecutive-gateway-errors"
            };
            self.err(
                name,
                "turns off the last trigger: set strait.io/outlier-consecutive-5xx or \
                 strait.io/outlier-consecutive-gateway-errors above 0, or remove the \
                 outlier-* annotations",
            );
        }
        if o.max_ejection_time < o.base_ejection_time {
            let fmt = |d| humantime::format_duration(d).to_string();
            let (name, message) = if self.valid("outlier-max-ejection-time") {
                (
                    "outlier-max-ejection-time",
                    format!(
                        "must be at least the first ejection's time, {} (strait.io/outlier-ejection-time{})",
                        fmt(o.base_ejection_time),
                        if self.valid("outlier-ejection-time") { "" } else { ", default" },
                    ),
                )
            } else {
                (
                    "outlier-ejection-time",
                    format!(
                        "is longer than the longest ejection, {} by default: raise \
                         strait.io/outlier-max-ejection-time too",
                        fmt(o.max_ejection_time)
                    ),
                )
            };
            self.err(name, message);
        }
        Some(o)
    }
}

/// The message for an unknown `strait.io/` name: the annotation meant, when it can be guessed.
fn unknown_message(name: &str) -> String {
    if let Some((_, ours)) = NGINX_NAMES.iter().find(|(nginx, _)| *nginx == name) {
        return format!(
            "unknown annotation: {name} is an ingress-nginx name; the nearest Strait \
             annotation is {PREFIX}{ours} (see docs/kubernetes-annotations.md)"
        );
    }
    let closest = NAMES
        .iter()
        .map(|n| (edit_distance(name, n), *n))
        .min()
        .filter(|(d, _)| *d <= 2);
    match closest {
        Some((_, n)) => format!("unknown annotation; did you mean {PREFIX}{n}?"),
        None => format!(
            "unknown annotation; Strait reads {PREFIX} followed by one of: {}",
            NAMES.join(", ")
        ),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

fn duration(v: &str, zero: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|_| {
        let hint = if v.parse::<u64>().is_ok() {
            format!(" (a number needs a unit: {v}s, {v}ms)")
        } else {
            String::new()
        };
        format!("expected a duration such as 30s, 500ms, 2m or 1m 30s{hint}; {zero}")
    })
}

fn positive_duration(v: &str) -> Result<Duration, String> {
    match duration(v, "it must be longer than 0s")? {
        d if d.is_zero() => Err("must be longer than 0s (e.g. 500ms or 5s)".to_owned()),
        d => Ok(d),
    }
}

fn int(v: &str, min: u32, max: u32) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ if max == u32::MAX => Err(format!("expected a whole number, at least {min}")),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

fn boolean(v: &str) -> Result<bool, String> {
    if v.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if v.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err("expected \"true\" or \"false\"".to_owned())
    }
}

/// gRPC status names, as the static configuration spells them.
const GRPC_CODES: [(&str, GrpcCode); 16] = [
    ("cancelled", GrpcCode::Cancelled),
    ("unknown", GrpcCode::Unknown),
    ("invalid_argument", GrpcCode::InvalidArgument),
    ("deadline_exceeded", GrpcCode::DeadlineExceeded),
    ("not_found", GrpcCode::NotFound),
    ("already_exists", GrpcCode::AlreadyExists),
    ("permission_denied", GrpcCode::PermissionDenied),
    ("resource_exhausted", GrpcCode::ResourceExhausted),
    ("failed_precondition", GrpcCode::FailedPrecondition),
    ("aborted", GrpcCode::Aborted),
    ("out_of_range", GrpcCode::OutOfRange),
    ("unimplemented", GrpcCode::Unimplemented),
    ("internal", GrpcCode::Internal),
    ("unavailable", GrpcCode::Unavailable),
    ("data_loss", GrpcCode::DataLoss),
    ("unauthenticated", GrpcCode::Unauthenticated),
];

fn retry_on(v: &str) -> Result<RetryOn, String> {
    let mut on = RetryOn::default();
    let items: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect();
    if items.is_empty() {
        return Err(
            "list at least one of connect-failure, an HTTP status (e.g. 503) or a gRPC status \
             name (e.g. unavailable), separated by commas"
                .to_owned(),
        );
    }
    for item in items {
        let word = item.to_ascii_lowercase().replace('-', "_");
        if word == "connect_failure" {
            on.connect_failure = true;
        } else if let Ok(status) = item.parse::<u16>() {
            if !(100..=599).contains(&status) {
                return Err(format!("{item} is not an HTTP status: use 100 to 599"));
            }
            if !on.statuses.contains(&status) {
                on.statuses.push(status);
            }
        } else if let Some((_, code)) = GRPC_CODES.iter().find(|(n, _)| *n == word) {
            if !on.grpc_statuses.contains(code) {
                on.grpc_statuses.push(*code);
            }
        } else {
            let hint = match word.as_str() {
                "reset" | "error" => {
                    " (a connection broken after the request was sent is retried when 502 is \
                     in the list)"
                }
                "timeout" => " (a slow attempt is retried with strait.io/per-try-timeout)",
                _ => "",
            };
            let names: Vec<&str> = GRPC_CODES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown retry condition {item:?}{hint}: use connect-failure, HTTP statuses \
                 (100 to 599) or gRPC status names ({})",
                names.join(", ")
            ));
        }
    }
    Ok(on)
}

/// `N/s`, `N/m`, `N/h`, or `N/DURATION` such as `10/30s`.
fn rate(v: &str) -> Result<(u32, Duration), String> {
    let expected = "expected REQUESTS/PERIOD: 100/s, 600/m, 1000/h or 10/30s";
    let Some((n, unit)) = v.split_once('/') else {
        return Err(expected.to_owned());
    };
    let requests = match n.trim().parse::<u32>() {
        Ok(n) if n > 0 => n,
        _ => return Err(format!("{expected}, with REQUESTS at least 1")),
    };
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hr" | "hour" => Duration::from_secs(3600),
        other => humantime::parse_duration(other).map_err(|_| expected.to_owned())?,
    };
    if per.is_zero() {
        return Err(format!("{expected}, with a PERIOD longer than 0s"));
    }
    if per.as_nanos() < u128::from(requests) {
        return Err("more than one request per nanosecond: use a longer PERIOD".to_owned());
    }
    Ok((requests, per))
}

fn rate_limit_key(v: &str) -> Result<RateLimitKeySpec, String> {
    let expected = "expected none, client-ip or header:NAME (e.g. header:x-user)";
    if let Some((kind, name)) = v.split_once(':') {
        if kind.trim().eq_ignore_ascii_case("header") {
            return header_name(name.trim()).map(|header| RateLimitKeySpec::Header { header });
        }
        return Err(expected.to_owned());
    }
    match v.to_ascii_lowercase().replace('_', "-").as_str() {
        "none" => Ok(RateLimitKeySpec::Source(RateLimitSource::Route)),
        "client-ip" => Ok(RateLimitKeySpec::Source(RateLimitSource::ClientIp)),
        _ => Err(expected.to_owned()),
    }
}

/// A path, as `compile` wants it for `rewrite_prefix`, and printable ASCII besides: the
/// rewritten path must still be a valid request target.
fn path(v: &str) -> Result<String, String> {
    let printable = v.bytes().all(|b| b.is_ascii_graphic());
    if !v.starts_with('/') || !printable || v.contains(['?', '#']) {
        return Err(
            "expected a path starting with '/', of printable ASCII without spaces, '?' or '#' \
             (e.g. / or /v2/)"
                .to_owned(),
        );
    }
    Ok(v.to_owned())
}

/// One `NAME: VALUE` per line.
fn headers(v: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for line in v.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!(
                "line {line:?} is not NAME: VALUE; write one header per line, e.g. x-env: prod"
            ));
        };
        let name = header_name(name.trim())?;
        let value = value.trim();
        if HeaderValue::from_str(value).is_err() {
            return Err(format!(
                "invalid value {value:?} for header {name}: use visible ASCII, spaces and tabs"
            ));
        }
        if out.insert(name.clone(), value.to_owned()).is_some() {
            return Err(format!(
                "header {name} is given twice; give each header once"
            ));
        }
    }
    if out.is_empty() {
        return Err("no headers: write one NAME: VALUE per line, e.g. x-env: prod".to_owned());
    }
    Ok(out)
}

/// A header name, lowercased (HTTP names are case-insensitive; the proxy stores them so).
fn header_name(v: &str) -> Result<String, String> {
    HeaderName::try_from(v)
        .map(|h| h.as_str().to_owned())
        .map_err(|_| {
            format!("invalid header name {v:?}: expected letters, digits and -, e.g. x-user-id")
        })
}

/// A cookie name is an HTTP token (RFC 6265), which also keeps out what `compile` refuses.
fn cookie_name(v: &str) -> Result<String, String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if v.is_empty() || !v.bytes().all(token) {
        return Err(format!(
            "invalid cookie name {v:?}: expected letters, digits and -_. (e.g. session)"
        ));
    }
    Ok(v.to_owned())
}

fn policy(v: &str) -> Result<Policy, String> {
    match v.to_ascii_lowercase().replace('-', "_").as_str() {
        "round_robin" => Ok(Policy::RoundRobin),
        "least_request" => Ok(Policy::LeastRequest),
        "peak_ewma" => Ok(Policy::PeakEwma),
        "random" => Ok(Policy::Random),
        "ring_hash" => Ok(Policy::RingHash),
        "maglev" => Ok(Policy::Maglev),
        _ => Err(
            "expected round_robin, least_request, peak_ewma, random, ring_hash or maglev"
                .to_owned(),
        ),
    }
}

fn affinity(v: &str) -> Result<Affinity, String> {
    match v.to_ascii_lowercase().replace('_', "-").as_str() {
        "client-ip" => Ok(Affinity::ClientIp),
        "cookie" => Ok(Affinity::Cookie),
        "header" => Ok(Affinity::Header),
        _ => Err("expected client-ip, cookie or header".to_owned()),
    }
}

fn protocol(v: &str) -> Result<UpstreamProtocol, String> {
    match v.to_ascii_lowercase().as_str() {
        "http" | "http1" => Ok(UpstreamProtocol::Http1),
        "h2c" | "grpc" => Ok(UpstreamProtocol::H2c),
        "https" | "h2" | "grpcs" => Err(
            "TLS to the backend is not available through annotations: verifying the pods' \
             certificates needs a server name and a CA that an Ingress cannot give, and \
             skipping verification is not a safe default. Use http1, h2c or grpc"
                .to_owned(),
        ),
        _ => Err("expected http1 (or http), h2c, or grpc (the same as h2c)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strait_proxy::table::spec::Spec;

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| {
                let key = if k.contains('/') {
                    (*k).to_owned()
                } else {
                    format!("{PREFIX}{k}")
                };
                (key, (*v).to_owned())
            })
            .collect()
    }

    #[track_caller]
    fn ok(pairs: &[(&str, &str)]) -> IngressSettings {
        parse(&map(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e:#?}"))
    }

    /// The single error of `pairs`, which must name the annotation and keep its value.
    #[track_caller]
    fn bad(pairs: &[(&str, &str)]) -> AnnotationError {
        let errors = parse(&map(pairs)).expect_err("must be rejected");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = errors.into_iter().next().unwrap();
        let given = map(pairs);
        assert_eq!(given.get(&e.annotation), Some(&e.value), "{e}");
        e
    }

    #[track_caller]
    fn bad_says(pairs: &[(&str, &str)], annotation: &str, words: &str) {
        let e = bad(pairs);
        assert_eq!(e.annotation, format!("{PREFIX}{annotation}"), "{e}");
        assert!(e.message.contains(words), "{e}");
    }

    /// One listener with a forwarding prefix route to backend `b`: the smallest spec the
    /// settings can be applied to.
    fn spec() -> Spec {
        serde_yaml_ng::from_str(
            "
             listeners:
               - name: web
                 address: 127.0.0.1:0
                 routes:
                   - match: {prefix: /api}
                     forward: {backend: b}
             backends:
               - name: b
                 endpoints: [127.0.0.1:9]",
        )
        .unwrap()
    }

    fn applied(s: &IngressSettings) -> Spec {
        let mut spec = spec();
        s.apply_route(&mut Arc::make_mut(&mut spec.listeners[0].routes)[0]);
        s.apply_backend(Arc::make_mut(&mut spec.backends[0]));
        spec
    }

    #[track_caller]
    fn compiles(spec: Spec) {
        if let Err(e) = strait_proxy::table::compile(Arc::new(spec), "t", 1, None) {
            panic!("{e:#?}");
        }
    }

    fn all_annotations() -> BTreeMap<String, String> {
        map(&[
            ("timeout", "30s"),
            ("retries", "3"),
            (
                "retry-on",
                "connect-failure, 502,503 , unavailable,DEADLINE-EXCEEDED",
            ),
            ("retry-non-idempotent", "true"),
            ("per-try-timeout", "2s"),
            ("rate-limit", "600/m"),
            ("rate-limit-burst", "50"),
            ("rate-limit-key", "header:X-User"),
            ("rate-limit-response-headers", "true"),
            ("rewrite-prefix", "/v2/"),
            ("set-request-headers", "X-Env: prod\nx-team: payments\n"),
            ("set-response-headers", "cache-control: no-store"),
            ("load-balance", "maglev"),
            ("affinity", "cookie"),
            ("affinity-cookie-name", "session"),
            ("backend-protocol", "grpc"),
            ("connect-timeout", "500ms"),
            ("max-connections", "100"),
            ("max-pending-requests", "10"),
            ("max-requests", "200"),
            ("max-retries", "5"),
            ("outlier-consecutive-5xx", "7"),
            ("outlier-consecutive-gateway-errors", "3"),
            ("outlier-ejection-time", "10s"),
            ("outlier-max-ejection-time", "1m"),
            ("outlier-max-ejection-percent", "50"),
            ("kubernetes.io/ingress.class", "strait"),
        ])
    }

    #[test]
    fn no_annotations_change_nothing() {
        let s = ok(&[
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", "60"),
            ("example.com/strait.io/timeout", "nonsense"),
        ]);
        assert_eq!(s, IngressSettings::default());
        assert!(!s.has_backend_settings());
        assert_eq!(applied(&s), spec());
    }

    #[test]
    fn every_annotation_together_compiles() {
        let s = parse(&all_annotations()).unwrap();
        assert!(s.has_backend_settings());
        let spec = applied(&s);
        let route = &spec.listeners[0].routes[0];
        assert_eq!(route.timeout, Some(Duration::from_secs(30)));
        let retry = route.retry.as_ref().unwrap();
        assert_eq!(retry.retries, 3);
        assert!(retry.on_connect_failure && retry.non_idempotent);
        assert_eq!(retry.statuses, [502, 503]);
        assert_eq!(
            retry.grpc_statuses,
            [GrpcCode::Unavailable, GrpcCode::DeadlineExceeded]
        );
        assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(retry.backoff_base, RetrySpec::default().backoff_base);
        let rl = route.rate_limit.as_ref().unwrap();
        assert_eq!((rl.requests, rl.per), (600, Duration::from_secs(60)));
        assert_eq!(rl.burst, Some(50));
        assert_eq!(
            rl.key,
            RateLimitKeySpec::Header {
                header: "x-user".into()
            }
        );
        assert!(rl.response_headers);
        assert_eq!(route.rewrite_prefix.as_deref(), Some("/v2/"));
        assert_eq!(route.request_headers.set["x-env"], "prod");
        assert_eq!(route.request_headers.set["x-team"], "payments");
        assert_eq!(route.response_headers.set["cache-control"], "no-store");
        let b = &spec.backends[0];
        assert_eq!(b.policy, Policy::Maglev);
        assert_eq!(
            b.hash.as_deref(),
            Some(&HashKeySpec::Cookie {
                cookie: "session".into()
            })
        );
        assert_eq!(b.protocol, UpstreamProtocol::H2c);
        assert_eq!(b.connect_timeout, Duration::from_millis(500));
        let cb = &b.circuit_breaker;
        assert_eq!(
            (
                cb.max_connections,
                cb.max_pending_requests,
                cb.max_requests,
                cb.max_retries
            ),
            (100, 10, 200, 5)
        );
        let o = b.outlier_detection.as_ref().unwrap();
        assert_eq!((o.consecutive_5xx, o.consecutive_gateway_errors), (7, 3));
        assert_eq!(o.base_ejection_time, Duration::from_secs(10));
        assert_eq!(o.max_ejection_time, Duration::from_secs(60));
        assert_eq!(o.max_ejection_percent, 50);
        compiles(spec);
    }

    /// Each annotation alone, at the edges of what it accepts, must give a spec that
    /// compiles: the bounds here and in `compile` are the same.
    #[test]
    fn every_accepted_edge_compiles() {
        let cases: &[(&str, &str)] = &[
            ("timeout", "0s"),
            ("timeout", "0"),
            ("retries", "0"),
            ("retries", "10"),
            ("retry-on", "100,599"),
            ("retry-on", "connect-failure"),
            ("retry-non-idempotent", "false"),
            ("per-try-timeout", "1ns"),
            ("rate-limit", "1/1ns"),
            ("rate-limit", "4294967295/5s"),
            ("rewrite-prefix", "/"),
            ("set-request-headers", "host: example.com"),
            ("load-balance", "ring_hash"),
            ("load-balance", "round-robin"),
            ("affinity", "client-ip"),
            ("backend-protocol", "HTTP"),
            ("connect-timeout", "1ns"),
            ("max-connections", "1"),
            ("max-pending-requests", "1"),
            ("max-requests", "4294967295"),
            ("max-retries", "0"),
            ("outlier-consecutive-5xx", "1"),
            ("outlier-max-ejection-percent", "0"),
            ("outlier-max-ejection-percent", "100"),
            ("outlier-ejection-time", "5m"),
        ];
        for (k, v) in cases {
            compiles(applied(&ok(&[(k, v)])));
        }
        let pairs: &[&[(&str, &str)]] = &[
            &[("rate-limit", "1/s"), ("rate-limit-burst", "1")],
            &[("rate-limit", "1/s"), ("rate-limit-key", "none")],
            &[("rate-limit", "1/s"), ("rate-limit-key", "client_ip")],
            &[("affinity", "header"), ("affinity-header", "x-user")],
            &[("affinity", "cookie"), ("affinity-cookie-name", "a.b-c_d")],
            &[
                ("outlier-consecutive-5xx", "0"),
                ("outlier-consecutive-gateway-errors", "1"),
            ],
            &[
                ("outlier-ejection-time", "1h"),
                ("outlier-max-ejection-time", "1h"),
            ],
        ];
        for p in pairs {
            compiles(applied(&ok(p)));
        }
    }

    /// The bounds copied from `compile` still are its bounds.
    #[test]
    fn compile_rejects_what_parse_rejects() {
        let mut s = spec();
        Arc::make_mut(&mut s.listeners[0].routes)[0].retry = Some(Box::new(RetrySpec {
            retries: MAX_RETRIES + 1,
            ..RetrySpec::default()
        }));
        assert!(strait_proxy::table::compile(Arc::new(s), "t", 1, None).is_err());
        bad_says(&[("retries", "11")], "retries", "0 to 10");
    }

    #[test]
    fn timeout() {
        assert_eq!(
            ok(&[("timeout", "1m 30s")]).timeout,
            Some(Duration::from_secs(90))
        );
        assert_eq!(ok(&[("timeout", " 0s ")]).timeout, Some(Duration::ZERO));
        bad_says(&[("timeout", "30")], "timeout", "needs a unit: 30s");
        bad_says(&[("timeout", "-1s")], "timeout", "0s disables");
        bad_says(&[("timeout", "soon")], "timeout", "30s, 500ms");
    }

    #[test]
    fn retries_alone_take_the_retry_defaults() {
        let r = ok(&[("retries", "4")]).retry.unwrap();
        assert_eq!(
            r,
            RetrySpec {
                retries: 4,
                ..RetrySpec::default()
            }
        );
        bad_says(&[("retries", "-1")], "retries", "0 to 10");
        bad_says(&[("retries", "two")], "retries", "whole number");
    }

    #[test]
    fn retry_on() {
        let r = ok(&[("retry-on", "503,503,internal")]).retry.unwrap();
        assert_eq!(r.retries, RetrySpec::default().retries);
        assert!(!r.on_connect_failure, "not listed, so not retried");
        assert_eq!(r.statuses, [503]);
        assert_eq!(r.grpc_statuses, [GrpcCode::Internal]);
        let r = ok(&[("retry-on", "Connect-Failure,resource_exhausted")])
            .retry
            .unwrap();
        assert!(r.on_connect_failure);
        assert_eq!(r.grpc_statuses, [GrpcCode::ResourceExhausted]);
        bad_says(&[("retry-on", "reset")], "retry-on", "502 is in the list");
        bad_says(&[("retry-on", "timeout")], "retry-on", "per-try-timeout");
        bad_says(&[("retry-on", "600")], "retry-on", "100 to 599");
        bad_says(&[("retry-on", "5xx")], "retry-on", "connect-failure, HTTP");
        bad_says(&[("retry-on", " , ")], "retry-on", "at least one");
    }

    #[test]
    fn retry_non_idempotent_and_per_try_timeout() {
        let r = ok(&[("retry-non-idempotent", "TRUE")]).retry.unwrap();
        assert!(r.non_idempotent);
        assert_eq!(r.retries, RetrySpec::default().retries);
        bad_says(
            &[("retry-non-idempotent", "yes")],
            "retry-non-idempotent",
            "\"true\"",
        );
        let r = ok(&[("per-try-timeout", "250ms")]).retry.unwrap();
        assert_eq!(r.per_try_timeout, Some(Duration::from_millis(250)));
        bad_says(
            &[("per-try-timeout", "0s")],
            "per-try-timeout",
            "longer than 0s",
        );
    }

    #[test]
    fn rate_limit() {
        let rl = ok(&[("rate-limit", "100/s")]).rate_limit.unwrap();
        assert_eq!(
            rl,
            RateLimitSpec {
                requests: 100,
                per: Duration::from_secs(1),
                burst: None,
                key: RateLimitKeySpec::Source(RateLimitSource::Route),
                response_headers: false,
                max_keys: None,
            }
        );
        for (v, per) in [("5/m", 60), ("5 / hour", 3600), ("5/30s", 30), ("5/1m", 60)] {
            let rl = ok(&[("rate-limit", v)]).rate_limit.unwrap();
            assert_eq!(rl.per, Duration::from_secs(per), "{v}");
        }
        bad_says(&[("rate-limit", "100")], "rate-limit", "REQUESTS/PERIOD");
        bad_says(&[("rate-limit", "0/s")], "rate-limit", "at least 1");
        bad_says(&[("rate-limit", "1/0s")], "rate-limit", "longer than 0s");
        bad_says(&[("rate-limit", "100/day")], "rate-limit", "100/s, 600/m");
        bad_says(&[("rate-limit", "2/1ns")], "rate-limit", "nanosecond");
        // the same rule in compile
        let mut s = spec();
        Arc::make_mut(&mut s.listeners[0].routes)[0].rate_limit = Some(Box::new(RateLimitSpec {
            requests: 2,
            per: Duration::from_nanos(1),
            ..ok(&[("rate-limit", "1/s")]).rate_limit.unwrap()
        }));
        assert!(strait_proxy::table::compile(Arc::new(s), "t", 1, None).is_err());
    }

    #[test]
    fn rate_limit_companions() {
        let rl = ok(&[
            ("rate-limit", "10/s"),
            ("rate-limit-burst", "30"),
            ("rate-limit-key", "Client-IP"),
            ("rate-limit-response-headers", "false"),
        ])
        .rate_limit
        .unwrap();
        assert_eq!(rl.burst, Some(30));
        assert_eq!(rl.key, RateLimitKeySpec::Source(RateLimitSource::ClientIp));
        let rl = ok(&[
            ("rate-limit", "10/s"),
            ("rate-limit-key", "header: x-user "),
        ])
        .rate_limit
        .unwrap();
        assert_eq!(
            rl.key,
            RateLimitKeySpec::Header {
                header: "x-user".into()
            }
        );
        for name in [
            "rate-limit-burst",
            "rate-limit-key",
            "rate-limit-response-headers",
        ] {
            let value = if name == "rate-limit-burst" {
                "5"
            } else if name == "rate-limit-key" {
                "client-ip"
            } else {
                "true"
            };
            bad_says(&[(name, value)], name, "needs strait.io/rate-limit");
        }
        let with_rate = |k, v| [("rate-limit", "1/s"), (k, v)];
        bad_says(
            &with_rate("rate-limit-burst", "0"),
            "rate-limit-burst",
            "at least 1",
        );
        bad_says(
            &with_rate("rate-limit-key", "ip"),
            "rate-limit-key",
            "client-ip",
        );
        bad_says(
            &with_rate("rate-limit-key", "cookie:a"),
            "rate-limit-key",
            "header:NAME",
        );
        bad_says(
            &with_rate("rate-limit-key", "header:x y"),
            "rate-limit-key",
            "header name",
        );
        bad_says(
            &with_rate("rate-limit-response-headers", "1"),
            "rate-limit-response-headers",
            "\"false\"",
        );
        // An invalid rate is one error, not one more per companion.
        bad_says(
            &[("rate-limit", "fast"), ("rate-limit-burst", "5")],
            "rate-limit",
            "REQUESTS/PERIOD",
        );
    }

    #[test]
    fn rewrite_prefix() {
        assert_eq!(
            ok(&[("rewrite-prefix", "/v2")]).rewrite_prefix.as_deref(),
            Some("/v2")
        );
        for v in ["v2", "/a b", "/a?b", "/a#b", "/\u{e9}", ""] {
            bad_says(
                &[("rewrite-prefix", v)],
                "rewrite-prefix",
                "starting with '/'",
            );
        }
    }

    #[test]
    fn set_headers() {
        let s = ok(&[
            ("set-request-headers", "X-A: 1\r\n\n  x-b:  two words \n"),
            ("set-response-headers", "x-c:"),
        ]);
        let want: BTreeMap<String, String> = [("x-a", "1"), ("x-b", "two words")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert_eq!(s.set_request_headers, want);
        assert_eq!(s.set_response_headers["x-c"], "");
        let name = "set-request-headers";
        bad_says(&[(name, "x-a 1")], name, "NAME: VALUE");
        bad_says(&[(name, "x a: 1")], name, "invalid header name");
        bad_says(&[(name, "x-a: \u{1}")], name, "visible ASCII");
        bad_says(&[(name, "x-a: 1\nX-A: 2")], name, "twice");
        bad_says(&[(name, "\n")], name, "no headers");
        // Applied headers replace a route's own values of the same name and keep the rest.
        let mut spec = spec();
        let route = &mut Arc::make_mut(&mut spec.listeners[0].routes)[0];
        route.request_headers.set.insert("x-a".into(), "old".into());
        route
            .request_headers
            .set
            .insert("x-z".into(), "kept".into());
        s.apply_route(route);
        assert_eq!(route.request_headers.set["x-a"], "1");
        assert_eq!(route.request_headers.set["x-z"], "kept");
        compiles(spec);
    }

    #[test]
    fn load_balance() {
        for (v, p) in [
            ("round_robin", Policy::RoundRobin),
            ("least-request", Policy::LeastRequest),
            ("PEAK_EWMA", Policy::PeakEwma),
            ("random", Policy::Random),
            ("ring_hash", Policy::RingHash),
            ("maglev", Policy::Maglev),
        ] {
            let s = ok(&[("load-balance", v)]);
            assert_eq!((s.policy, &s.hash), (Some(p), &None));
            compiles(applied(&s));
        }
        bad_says(&[("load-balance", "ewma")], "load-balance", "peak_ewma");
        // A policy without hashing drops a hash key the backend had.
        let mut b = Arc::unwrap_or_clone(spec().backends.remove(0));
        b.policy = Policy::RingHash;
        b.hash = Some(Box::new(HashKeySpec::Source(HashSource::ClientIp)));
        ok(&[("load-balance", "random")]).apply_backend(&mut b);
        assert_eq!((b.policy, b.hash), (Policy::Random, None));
    }

    #[test]
    fn affinity() {
        let s = ok(&[("affinity", "client-ip")]);
        assert_eq!(s.policy, Some(Policy::RingHash));
        assert_eq!(s.hash, Some(HashKeySpec::Source(HashSource::ClientIp)));
        let s = ok(&[("affinity", "header"), ("affinity-header", "X-User-Id")]);
        assert_eq!(
            s.hash,
            Some(HashKeySpec::Header {
                header: "x-user-id".into()
            })
        );
        let s = ok(&[
            ("affinity", "cookie"),
            ("affinity-cookie-name", "JSESSIONID"),
            ("load-balance", "maglev"),
        ]);
        assert_eq!(s.policy, Some(Policy::Maglev));
        assert_eq!(
            s.hash,
            Some(HashKeySpec::Cookie {
                cookie: "JSESSIONID".into()
            })
        );
        bad_says(
            &[("affinity", "ip")],
            "affinity",
            "client-ip, cookie or header",
        );
        bad_says(
            &[("affinity", "cookie")],
            "affinity",
            "affinity-cookie-name",
        );
        bad_says(&[("affinity", "header")], "affinity", "affinity-header");
        bad_says(
            &[("affinity-cookie-name", "s")],
            "affinity-cookie-name",
            "affinity: cookie",
        );
        bad_says(
            &[("affinity", "client-ip"), ("affinity-header", "x-a")],
            "affinity-header",
            "affinity: header",
        );
        bad_says(
            &[("affinity", "client-ip"), ("load-balance", "least_request")],
            "load-balance",
            "ring_hash or maglev",
        );
        for v in ["a=b", "a;b", "a b", ""] {
            bad_says(
                &[("affinity", "cookie"), ("affinity-cookie-name", v)],
                "affinity-cookie-name",
                "invalid cookie name",
            );
        }
        bad_says(
            &[("affinity", "header"), ("affinity-header", "x:y")],
            "affinity-header",
            "invalid header name",
        );
        // A bad affinity is one error, not one more for its cookie name.
        bad_says(
            &[("affinity", "sticky"), ("affinity-cookie-name", "s")],
            "affinity",
            "client-ip",
        );
    }

    #[test]
    fn backend_protocol() {
        for (v, p) in [
            ("http1", UpstreamProtocol::Http1),
            ("http", UpstreamProtocol::Http1),
            ("h2c", UpstreamProtocol::H2c),
            ("GRPC", UpstreamProtocol::H2c),
        ] {
            assert_eq!(ok(&[("backend-protocol", v)]).protocol, Some(p), "{v}");
        }
        for v in ["https", "h2", "GRPCS"] {
            bad_says(&[("backend-protocol", v)], "backend-protocol", "TLS");
        }
        bad_says(&[("backend-protocol", "fcgi")], "backend-protocol", "http1");
    }

    #[test]
    fn connect_timeout() {
        assert_eq!(
            ok(&[("connect-timeout", "3s")]).connect_timeout,
            Some(Duration::from_secs(3))
        );
        bad_says(
            &[("connect-timeout", "0s")],
            "connect-timeout",
            "longer than 0s",
        );
        bad_says(&[("connect-timeout", "5")], "connect-timeout", "5s");
    }

    #[test]
    fn circuit_breaker() {
        let s = ok(&[("max-requests", "7")]);
        assert_eq!(s.max_requests, Some(7));
        let mut b = Arc::unwrap_or_clone(spec().backends.remove(0));
        b.circuit_breaker.retry_budget = Some(Default::default());
        s.apply_backend(&mut b);
        assert_eq!(b.circuit_breaker.max_requests, 7);
        assert_eq!(b.circuit_breaker.max_connections, 1024, "others kept");
        assert!(b.circuit_breaker.retry_budget.is_some(), "others kept");
        for name in ["max-connections", "max-pending-requests", "max-requests"] {
            bad_says(&[(name, "0")], name, "at least 1");
        }
        bad_says(&[("max-retries", "-1")], "max-retries", "at least 0");
        bad_says(
            &[("max-retries", "4294967296")],
            "max-retries",
            "whole number",
        );
    }

    #[test]
    fn outlier_detection() {
        let o = ok(&[("outlier-consecutive-gateway-errors", "3")])
            .outlier_detection
            .unwrap();
        assert_eq!(
            o,
            OutlierSpec {
                consecutive_gateway_errors: 3,
                ..OutlierSpec::default()
            }
        );
        let o = ok(&[("outlier-ejection-time", "1m")])
            .outlier_detection
            .unwrap();
        assert_eq!(o.base_ejection_time, Duration::from_secs(60));
        assert_eq!(o.consecutive_5xx, OutlierSpec::default().consecutive_5xx);
        bad_says(
            &[("outlier-consecutive-5xx", "0")],
            "outlier-consecutive-5xx",
            "last trigger",
        );
        bad_says(
            &[
                ("outlier-consecutive-5xx", "0"),
                ("outlier-consecutive-gateway-errors", "0"),
            ],
            "outlier-consecutive-5xx",
            "above 0",
        );
        bad_says(
            &[("outlier-ejection-time", "10m")],
            "outlier-ejection-time",
            "raise strait.io/outlier-max-ejection-time",
        );
        bad_says(
            &[("outlier-max-ejection-time", "10s")],
            "outlier-max-ejection-time",
            "30s (strait.io/outlier-ejection-time, default)",
        );
        bad_says(
            &[
                ("outlier-ejection-time", "2m"),
                ("outlier-max-ejection-time", "1m"),
            ],
            "outlier-max-ejection-time",
            "2m (strait.io/outlier-ejection-time)",
        );
        bad_says(
            &[("outlier-ejection-time", "0s")],
            "outlier-ejection-time",
            "longer than 0s",
        );
        bad_says(
            &[("outlier-max-ejection-percent", "101")],
            "outlier-max-ejection-percent",
            "0 to 100",
        );
        // A bad value is one error, even when it would also break a combined check.
        bad_says(
            &[
                ("outlier-consecutive-5xx", "x"),
                ("outlier-max-ejection-time", "10s"),
            ],
            "outlier-consecutive-5xx",
            "whole number",
        );
    }

    #[test]
    fn unknown_names() {
        let e = bad(&[("timout", "5s")]);
        assert_eq!(e.annotation, "strait.io/timout");
        assert!(e.message.contains("did you mean strait.io/timeout?"), "{e}");
        let e = bad(&[("max-request", "5")]);
        assert!(e.message.contains("strait.io/max-requests?"), "{e}");
        let e = bad(&[("proxy-read-timeout", "60")]);
        assert!(e.message.contains("ingress-nginx name"), "{e}");
        assert!(e.message.contains("strait.io/timeout"), "{e}");
        let e = bad(&[("something-else", "1")]);
        assert!(e.message.contains("timeout, retries, retry-on"), "{e}");
        assert!(e.message.contains("outlier-max-ejection-percent"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let errors = parse(&map(&[
            ("timeout", "30"),
            ("timout", "30s"),
            ("max-requests", "0"),
            ("rate-limit-burst", "5"),
        ]))
        .unwrap_err();
        let names: Vec<&str> = errors.iter().map(|e| e.annotation.as_str()).collect();
        assert_eq!(
            names,
            [
                "strait.io/max-requests",
                "strait.io/timeout",
                "strait.io/timout",
                "strait.io/rate-limit-burst",
            ]
        );
        assert_eq!(
            errors[1].to_string(),
            "strait.io/timeout=\"30\": expected a duration such as 30s, 500ms, 2m or 1m 30s \
             (a number needs a unit: 30s, 30ms); 0s disables the timeout"
        );
    }

    #[test]
    fn routes_get_only_what_applies_to_them() {
        let s = parse(&all_annotations()).unwrap();
        let mut spec: Spec = serde_yaml_ng::from_str(
            "
             listeners:
               - name: web
                 address: 127.0.0.1:0
                 routes:
                   - match: {exact: /login}
                     forward: {backend: b}
                   - match: {prefix: /old}
                     redirect: {path: /new}
                 default_route:
                   direct_response: {status: 404}
             backends:
               - name: b
                 endpoints: [127.0.0.1:9]",
        )
        .unwrap();
        let l = &mut spec.listeners[0];
        for r in Arc::make_mut(&mut l.routes)
            .iter_mut()
            .chain(l.default_route.as_mut())
        {
            s.apply_route(r);
        }
        let exact = &l.routes[0];
        assert!(exact.timeout.is_some() && exact.retry.is_some());
        assert_eq!(exact.rewrite_prefix, None, "exact paths are not rewritten");
        for r in [&l.routes[1], l.default_route.as_ref().unwrap()] {
            assert_eq!(
                (r.timeout, &r.retry, &r.rewrite_prefix),
                (None, &None, &None)
            );
            assert!(r.rate_limit.is_some());
            assert_eq!(r.response_headers.set["cache-control"], "no-store");
        }
        // A default route that forwards is a prefix match on "/": it is rewritten.
        let mut d: RouteSpec = serde_yaml_ng::from_str("forward: {backend: b}").unwrap();
        s.apply_route(&mut d);
        assert_eq!(d.rewrite_prefix.as_deref(), Some("/v2/"));
        spec.listeners[0].default_route = Some(d);
        compiles(spec);
    }

    #[test]
    fn backend_settings() {
        for (k, v) in [
            ("load-balance", "random"),
            ("affinity", "client-ip"),
            ("backend-protocol", "http1"),
            ("connect-timeout", "1s"),
            ("max-connections", "5"),
            ("max-pending-requests", "5"),
            ("max-requests", "5"),
            ("max-retries", "5"),
            ("outlier-max-ejection-percent", "20"),
        ] {
            assert!(ok(&[(k, v)]).has_backend_settings(), "{k}");
        }
        let route_only = ok(&[
            ("timeout", "1s"),
            ("retries", "1"),
            ("rate-limit", "1/s"),
            ("rewrite-prefix", "/"),
            ("set-request-headers", "a: b"),
            ("set-response-headers", "a: b"),
        ]);
        assert!(!route_only.has_backend_settings());
        let mut b = Arc::unwrap_or_clone(spec().backends.remove(0));
        let before = b.clone();
        route_only.apply_backend(&mut b);
        assert_eq!(b, before);
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("retries", "retries"), 0);
        assert_eq!(edit_distance("retires", "retries"), 2);
    }

    // The documentation's examples, tested.

    fn repo_file(path: &str) -> String {
        let path = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const DOC: &str = "docs/kubernetes-annotations.md";
    const EXAMPLE: &str = "deploy/examples/annotations/ingress.yaml";

    fn example_settings() -> IngressSettings {
        let ingress: k8s_openapi::api::networking::v1::Ingress =
            serde_yaml_ng::from_str(&repo_file(EXAMPLE)).unwrap();
        let annotations = ingress.metadata.annotations.unwrap_or_default();
        assert!(annotations.keys().filter(|k| k.starts_with(PREFIX)).count() >= 5);
        parse(&annotations).unwrap_or_else(|e| panic!("{EXAMPLE}: {e:#?}"))
    }

    #[test]
    fn example_ingress_parses() {
        let s = example_settings();
        assert!(s.has_backend_settings());
        compiles(applied(&s));
    }

    /// Fenced blocks of `lang` in the documentation.
    fn doc_blocks(lang: &str) -> Vec<String> {
        let doc = repo_file(DOC);
        let fence = format!("```{lang}\n");
        doc.split(&fence)
            .skip(1)
            .map(|b| b.split("```").next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn doc_shows_the_example_file() {
        let example = repo_file(EXAMPLE);
        assert!(
            doc_blocks("text").contains(&example),
            "{DOC} shows {EXAMPLE} as it is"
        );
    }

    /// The doc's static configuration for the example has exactly the settings that the
    /// example's annotations give.
    #[test]
    fn doc_static_equivalent_matches_the_example() {
        let block = doc_blocks("yaml")
            .into_iter()
            .find(|b| b.contains(EXAMPLE))
            .expect("a yaml block naming the example file");
        let expected: Spec = serde_yaml_ng::from_str(&block).unwrap();
        let s = example_settings();
        for listener in &expected.listeners {
            for want in listener.routes.iter() {
                let mut route = want.clone();
                route.timeout = None;
                route.retry = None;
                route.rate_limit = None;
                route.rewrite_prefix = None;
                route.request_headers = Default::default();
                route.response_headers = Default::default();
                s.apply_route(&mut route);
                assert_eq!(&route, want);
            }
        }
        for want in &expected.backends {
            let mut backend: BackendSpec =
                serde_yaml_ng::from_str(&format!("name: {}", want.name)).unwrap();
            backend.endpoints = want.endpoints.clone();
            s.apply_backend(&mut backend);
            assert_eq!(&backend, &**want);
        }
        assert!(!expected.backends.is_empty());
        compiles(expected);
    }

    /// Every `text` block of annotations in the doc parses, and each annotation has its
    /// section.
    #[test]
    fn doc_annotation_examples_parse() {
        let mut shown = BTreeSet::new();
        for block in doc_blocks("text") {
            // Annotation blocks start with `strait.io/NAME:`; quoted errors with `NAME="`.
            let key = block.split(':').next().unwrap_or_default();
            let name_chars =
                |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "./-".contains(c);
            if !key.starts_with(PREFIX) || !key.chars().all(name_chars) {
                continue;
            }
            let annotations: BTreeMap<String, String> =
                serde_yaml_ng::from_str(&block).unwrap_or_else(|e| panic!("{e}:\n{block}"));
            if let Err(e) = parse(&annotations) {
                panic!("{block}\n{e:#?}");
            }
            shown.extend(annotations.into_keys());
        }
        let doc = repo_file(DOC);
        for name in NAMES {
            let key = format!("{PREFIX}{name}");
            assert!(
                doc.contains(&format!("\n### `{key}`\n")),
                "{DOC} has a section for {key}"
            );
            assert!(shown.contains(&key), "{DOC} has an example of {key}");
        }
        let sections = doc.matches("\n### `strait.io/").count();
        assert_eq!(
            sections,
            NAMES.len(),
            "a section for each annotation, no more"
        );
    }

    /// The doc quotes one error as it is printed.
    #[test]
    fn doc_error_example_is_current() {
        let errors = parse(&map(&[("timeout", "30"), ("timout", "5s")])).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let text = text.join("\n") + "\n";
        assert!(
            doc_blocks("text").contains(&text),
            "{DOC} quotes these errors:\n{text}"
        );
    }
}
