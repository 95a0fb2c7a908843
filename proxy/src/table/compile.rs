//! Spec -> [`RouteTable`]: validation and compilation in one pass.
//!
//! Every problem is collected (not just the first) with the path of the offending field, e.g.
//! `listeners[0].routes[2].forward.backend`; the control side maps paths to file positions.
//! A dry run (no [`Registries`]) checks a configuration without touching live state or
//! registering metrics, so a rejected reload leaves no trace.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::spec::{
    BackendSpec, DirectResponseSpec, DnsSpec, EndpointSpec, ForwardSpec, HashKeySpec,
    HeaderOpsSpec, ListenerProtocol, ListenerSpec, MatchSpec, Policy, RateLimitKeySpec,
    RateLimitSource, RateLimitSpec, RedirectSpec, RetrySpec, RouteSpec, ServiceDefaultsSpec,
    SniRouteSpec, Spec, UpstreamProtocol,
};
use super::{
    Action, Backend, DirectResponse, Endpoint, Forward, HashKey, HeaderOps, ListenerTable,
    Redirect, RetryPolicy, Route, RouteTable, Target, TcpForward,
};
use crate::balancer::{round_robin::Schedule, Balancer};
use crate::breaker::{BackendRegistry, BackendState};
use crate::endpoint::{EndpointRegistry, EndpointState};
use crate::health::OutlierConfig;
use crate::https::TlsListener;
use crate::metrics::TargetMetrics;
use crate::names::{DnsName, NameRegistry, Phase};
use crate::passthrough::SniRoutes;
use crate::pool::Http1Settings;
use crate::rate_limit::{self, KeySource, Limiter, RateLimitRegistry, RouteRateLimit};
use crate::router::{Conditions, HostMatch, PathMatch, Router};
use crate::upstream::Upstream;
use crate::upstream_tls::UpstreamTls;

/// Route timeout when none is configured (Envoy's default too).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest endpoint weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CompileError {
    /// Dotted path of the field, e.g. `backends[1].endpoints[0]`.
    pub path: String,
    /// What is wrong and what would be valid.
    pub message: String,
}

/// Live state shared across generations.
#[derive(Debug, Default)]
pub struct Registries {
    /// Endpoint state by backend and address.
    pub endpoints: EndpointRegistry,
    /// DNS names of backends and their last answers.
    pub names: NameRegistry,
    /// Circuit breaker and ejection counters by backend.
    pub backends: BackendRegistry,
    /// Rate-limit buckets by listener and route.
    pub rate_limits: RateLimitRegistry,
    /// Request metrics by listener, route and backend.
    pub metrics: crate::metrics::TargetMetricsRegistry,
}

struct Ctx<'a> {
    errors: Vec<CompileError>,
    registries: Option<&'a Registries>,
}

impl Ctx<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(CompileError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn metrics(&self, listener: &str, route: &str, backend: &str) -> Arc<TargetMetrics> {
        match self.registries {
            Some(r) => r.metrics.get(listener, route, backend),
            None => Arc::new(TargetMetrics::noop()),
        }
    }
}

/// Compiles a spec. With `registries` the table shares live state and metric handles (whose
/// series appear on first use); without, it is a dry run for validation.
pub fn compile(
    spec: Arc<Spec>,
    source: &str,
    generation: u64,
    registries: Option<&Registries>,
) -> Result<RouteTable, Vec<CompileError>> {
    let mut cx = Ctx {
        errors: Vec::new(),
        registries,
    };

    let mut backends: HashMap<&str, (usize, Arc<Backend>)> = HashMap::new();
    // Backends that are declared but invalid: routes naming them already have an error
    // reported at the backend, so they must not add a misleading "unknown backend".
    let mut invalid: HashSet<&str> = HashSet::new();
    let mut ordered = Vec::new();
    for (i, b) in spec.backends.iter().enumerate() {
        let path = format!("backends[{i}]");
        if backends.contains_key(b.name.as_str()) {
            cx.err(
                format!("{path}.name"),
                format!("duplicate backend name {:?}", b.name),
            );
            continue;
        }
        match compile_backend(&mut cx, &path, b) {
            Some(backend) => {
                let backend = Arc::new(backend);
                backends.insert(&b.name, (ordered.len(), Arc::clone(&backend)));
                ordered.push(backend);
            }
            None => {
                invalid.insert(&b.name);
            }
        }
    }

    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut listeners = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let path = format!("listeners[{i}]");
        if l.name.is_empty() {
            cx.err(format!("{path}.name"), "listener name must not be empty");
        } else if !names.insert(l.name.as_str()) {
            cx.err(
                format!("{path}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        match l.address.parse::<SocketAddr>() {
            Err(_) => cx.err(
                format!("{path}.address"),
                format!(
                    "invalid address {:?}: expected ip:port, e.g. 0.0.0.0:8080",
                    l.address
                ),
            ),
            Ok(a) if a.port() != 0 && !addresses.insert(a) => cx.err(
                format!("{path}.address"),
                format!("address {a} is used by another listener"),
            ),
            Ok(_) => {}
        }
        let known = Known {
            backends: &backends,
            invalid: &invalid,
        };
        listeners.push(compile_listener(&mut cx, &path, l, &spec.listeners, &known));
    }
    // The Kubernetes source adds its own listeners to a file that may have none.
    let from_cluster = spec.kubernetes.as_ref().is_some_and(|k| k.enabled);
    if spec.listeners.is_empty() && !from_cluster {
        cx.err(
            "listeners",
            "at least one listener is required (or kubernetes.enabled: true)",
        );
    }
    if let Some(k) = &spec.kubernetes {
        check_service_defaults(&mut cx, &k.service_defaults);
        if k.max_delay.is_zero() {
            cx.err(
                "kubernetes.max_delay",
                "must be greater than 0s (it bounds how long changes are coalesced)",
            );
        }
    }
    if spec.admin.address.parse::<SocketAddr>().is_err() {
        cx.err(
            "admin.address",
            format!(
                "invalid address {:?}: expected ip:port, e.g. 127.0.0.1:9901",
                spec.admin.address
            ),
        );
    }
    let limits = &spec.limits;
    if limits.max_connections == 0 {
        cx.err("limits.max_connections", "must be at least 1");
    }
    if limits.max_request_header_bytes < 8192 {
        cx.err("limits.max_request_header_bytes", "must be at least 8192");
    }
    for (field, d) in [
        ("header_read_timeout", limits.header_read_timeout),
        ("idle_timeout", limits.idle_timeout),
        ("drain_timeout", limits.drain_timeout),
    ] {
        if d.is_zero() {
            cx.err(format!("limits.{field}"), "must be greater than 0s");
        }
    }
    if limits.max_concurrent_streams == 0 {
        cx.err("limits.max_concurrent_streams", "must be at least 1");
    }
    check_dns(&mut cx, &spec.dns);
    check_tracing(&mut cx, &spec.tracing);

    if !cx.errors.is_empty() {
        // A listener sharing another's routes compiles them again, with the same errors.
        let mut seen = HashSet::new();
        cx.errors
            .retain(|e| seen.insert((e.path.clone(), e.message.clone())));
        return Err(cx.errors);
    }
    // Sorted by name so a listener's index is the same in every generation.
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(RouteTable {
        generation,
        source: source.to_owned(),
        loaded_at: SystemTime::now(),
        listeners: listeners.into(),
        backends: ordered,
        access_log: spec.access_log.enabled,
        spec,
    })
}

fn check_tracing(cx: &mut Ctx, t: &super::spec::TracingSpec) {
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        cx.err("tracing.sample_ratio", "must be between 0 and 1");
    }
    if let Some(e) = &t.otlp_endpoint {
        let ok = e.parse::<http::Uri>().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
        });
        if !ok {
            cx.err(
                "tracing.otlp_endpoint",
                format!("invalid endpoint {e:?}: expected http://host:port or https://host:port"),
            );
        }
    }
    if t.service_name.is_empty() {
        cx.err("tracing.service_name", "must not be empty");
    }
}

/// Compiles backends on their own, sharing live state through `registries`: the part of
/// [`compile`] an endpoint-only change needs (see [`super::RouteTable::with_backends`]).
pub fn compile_backends(
    specs: &[Arc<BackendSpec>],
    registries: &Registries,
) -> Result<Vec<Arc<Backend>>, Vec<CompileError>> {
    let mut cx = Ctx {
        errors: Vec::new(),
        registries: Some(registries),
    };
    let mut out = Vec::with_capacity(specs.len());
    for (i, b) in specs.iter().enumerate() {
        if let Some(backend) = compile_backend(&mut cx, &format!("backends[{i}]"), b) {
            out.push(Arc::new(backend));
        }
    }
    if cx.errors.is_empty() {
        Ok(out)
    } else {
        Err(cx.errors)
    }
}

fn compile_backend(cx: &mut Ctx<'_>, path: &str, b: &BackendSpec) -> Option<Backend> {
    let errors_before = cx.errors.len();
    if b.name.is_empty() {
        cx.err(format!("{path}.name"), "backend name must not be empty");
    }
    let name: Arc<str> = b.name.as_str().into();
    let backend_state = match cx.registries {
        Some(r) => r.backends.get(&name),
        None => Arc::new(BackendState::default()),
    };
    check_resilience(cx, path, b);
    let dns = match (&b.dns, b.endpoints.is_empty()) {
        (None, _) => None,
        (Some(_), false) => {
            cx.err(
                format!("{path}.dns"),
                "give either endpoints or dns, not both",
            );
            None
        }
        (Some(target), true) => match parse_dns_target(target) {
            Ok((host, port)) => Some(match cx.registries {
                Some(r) => r.names.get(&host, port),
                None => Arc::new(DnsName::new(&host, port)),
            }),
            Err(message) => {
                cx.err(format!("{path}.dns"), message);
                None
            }
        },
    };
    let mut seen = HashSet::new();
    let mut endpoints = Vec::with_capacity(b.endpoints.len());
    // A DNS backend's endpoints are the last good answer, weight 1 each. One snapshot, so
    // the endpoints and `dns_answered` agree even if a lookup finishes meanwhile.
    let answer = dns.as_ref().map(|n| (n.status(), n.port()));
    let resolved: Vec<EndpointSpec> = answer
        .iter()
        .flat_map(|(status, port)| {
            status
                .addresses
                .iter()
                .map(|ip| EndpointSpec::Address(SocketAddr::new(*ip, *port).to_string()))
        })
        .collect();
    for (j, e) in b.endpoints.iter().chain(&resolved).enumerate() {
        // Built only for an error: a cluster's backends have tens of thousands of endpoints.
        let epath = || format!("{path}.endpoints[{j}]");
        let addr = match e.address().parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            _ => {
                cx.err(
                    epath(),
                    format!(
                        "invalid endpoint {:?}: expected ip:port, e.g. 10.0.0.5:8080 or [fd00::5]:8080",
                        e.address()
                    ),
                );
                continue;
            }
        };
        if !seen.insert(addr) {
            cx.err(epath(), format!("duplicate endpoint {addr}"));
            continue;
        }
        if e.weight() > MAX_WEIGHT {
            cx.err(
                format!("{}.weight", epath()),
                format!("weight must be 0 to {MAX_WEIGHT}"),
            );
            continue;
        }
        let state = match cx.registries {
            Some(r) => r.endpoints.get(&name, addr, &backend_state),
            None => Arc::new(EndpointState::detached(addr)),
        };
        let authority =
            Authority::try_from(addr.to_string()).expect("a socket address is a valid authority");
        endpoints.push(Endpoint {
            addr,
            authority,
            weight: e.weight(),
            state,
        });
    }
    let hashing = matches!(b.policy, Policy::RingHash | Policy::Maglev);
    let hash_key = match (b.hash.as_deref(), hashing) {
        (Some(_), false) => {
            cx.err(
                format!("{path}.hash"),
                "hash is only used by the ring_hash and maglev policies",
            );
            None
        }
        (None, true) => Some(HashKey::ClientIp),
        (None, false) => None,
        (Some(HashKeySpec::Source(_)), true) => Some(HashKey::ClientIp),
        (Some(HashKeySpec::Header { header: h }), true) => match HeaderName::try_from(h.as_str()) {
            Ok(h) => Some(HashKey::Header(h)),
            Err(_) => {
                cx.err(
                    format!("{path}.hash.header"),
                    format!("invalid header name {h:?}"),
                );
                None
            }
        },
        (Some(HashKeySpec::Cookie { cookie: c }), true) => {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                cx.err(
                    format!("{path}.hash.cookie"),
                    format!("invalid cookie name {c:?}"),
                );
            }
            Some(HashKey::Cookie(c.clone()))
        }
    };
    if b.connect_timeout.is_zero() {
        cx.err(format!("{path}.connect_timeout"), "must be greater than 0s");
    }
    if b.pool.idle_timeout.is_zero() {
        cx.err(
            format!("{path}.pool.idle_timeout"),
            "must be greater than 0s (to keep no idle connections, set max_idle_per_endpoint: 0)",
        );
    }
    let tls = compile_upstream_tls(cx, path, b, dns.as_deref());
    if cx.errors.len() > errors_before {
        return None;
    }
    if cx.registries.is_some() {
        backend_state.set_limits(&b.circuit_breaker);
        if b.outlier_detection.is_none() {
            for e in &endpoints {
                e.state.health.clear_ejection();
            }
        }
    }
    let upstream = match b.protocol {
        UpstreamProtocol::Http1 => Upstream::Http1(Http1Settings {
            connect_timeout: b.connect_timeout,
            max_idle: b.pool.max_idle_per_endpoint,
            idle_timeout: b.pool.idle_timeout,
            tls: tls.clone(),
        }),
        _ => Upstream::H2 {
            connect_timeout: b.connect_timeout,
            tls: tls.clone(),
        },
    };
    let connect_failures = if cx.registries.is_some() {
        metrics::counter!(crate::metrics::UPSTREAM_CONNECT_FAILURES, "backend" => b.name.clone())
    } else {
        metrics::Counter::noop()
    };
    Some(Backend {
        balancer: Balancer::new(b.policy, &endpoints),
        name,
        endpoints,
        hash_key,
        upstream,
        tls,
        connect_failures,
        connect_timeout: b.connect_timeout,
        state: backend_state,
        breaker: b.circuit_breaker.clone(),
        outlier: b.outlier_detection.as_deref().map(OutlierConfig::from),
        guarded: b.outlier_detection.is_some() || b.health_check.is_some(),
        panic_threshold: b.panic_threshold,
        health_check: b.health_check.as_deref().cloned(),
        dns_answered: answer.is_none_or(|(status, _)| status.phase != Phase::Pending),
        dns,
    })
}

/// A backend's `tls` and how it fits its `protocol`. The client configuration is built (and
/// its files read) in dry runs too, so `strait validate` catches a bad certificate.
fn compile_upstream_tls(
    cx: &mut Ctx<'_>,
    path: &str,
    b: &BackendSpec,
    dns: Option<&DnsName>,
) -> Option<Arc<UpstreamTls>> {
    let spec = match (&b.tls, b.protocol) {
        (None, UpstreamProtocol::H2) => {
            cx.err(
                format!("{path}.protocol"),
                "h2 is HTTP/2 over TLS and needs tls; for cleartext HTTP/2 use h2c",
            );
            return None;
        }
        (None, _) => return None,
        (Some(_), UpstreamProtocol::H2c) => {
            cx.err(
                format!("{path}.tls"),
                "h2c is cleartext HTTP/2; for HTTP/2 over TLS use protocol: h2",
            );
            return None;
        }
        (Some(spec), _) => spec,
    };
    let h2 = b.protocol == UpstreamProtocol::H2;
    match UpstreamTls::build(spec, h2, dns.map(DnsName::host)) {
        Ok(tls) => {
            if spec.insecure_skip_verify && cx.registries.is_some() {
                tracing::warn!(
                    backend = b.name,
                    "tls.insecure_skip_verify is set: the backend's certificates are NOT \
                     verified, so anyone on the network path can impersonate it"
                );
            }
            Some(Arc::new(tls))
        }
        Err(errors) => {
            for e in errors {
                let at = if e.field.is_empty() {
                    format!("{path}.tls")
                } else {
                    format!("{path}.tls.{}", e.field)
                };
                cx.err(at, e.message);
            }
            None
        }
    }
}

/// Circuit breaker, outlier detection and health check settings of a backend.
/// The Kubernetes source copies these onto routes and backends it builds at run time: they
/// are checked here, so a mistake is a file error rather than every table being rejected.
fn check_service_defaults(cx: &mut Ctx<'_>, d: &ServiceDefaultsSpec) {
    let path = "kubernetes.service_defaults";
    if let Some(r) = &d.retry {
        compile_retry(cx, &format!("{path}.retry"), r);
    }
    let mut b = BackendSpec::new("", Vec::new());
    b.circuit_breaker = d.circuit_breaker.clone().unwrap_or_default();
    b.outlier_detection = d.outlier_detection.clone().map(Box::new);
    check_resilience(cx, path, &b);
}

fn check_resilience(cx: &mut Ctx<'_>, path: &str, b: &BackendSpec) {
    let cb = &b.circuit_breaker;
    for (field, v) in [
        ("max_connections", cb.max_connections),
        ("max_pending_requests", cb.max_pending_requests),
        ("max_requests", cb.max_requests),
    ] {
        if v == 0 {
            cx.err(
                format!("{path}.circuit_breaker.{field}"),
                "must be at least 1",
            );
        }
    }
    if let Some(budget) = &cb.retry_budget {
        if budget.percent > 100 {
            cx.err(
                format!("{path}.circuit_breaker.retry_budget.percent"),
                "must be 0 to 100",
            );
        }
    }
    if b.panic_threshold > 100 {
        cx.err(format!("{path}.panic_threshold"), "must be 0 to 100");
    }
    if let Some(o) = &b.outlier_detection {
        let opath = format!("{path}.outlier_detection");
        if o.consecutive_5xx == 0 && o.consecutive_gateway_errors == 0 {
            cx.err(
                &opath,
                "set consecutive_5xx or consecutive_gateway_errors above 0 (or remove outlier_detection)",
            );
        }
        if o.base_ejection_time.is_zero() {
            cx.err(
                format!("{opath}.base_ejection_time"),
                "must be greater than 0s",
            );
        }
        if o.max_ejection_time < o.base_ejection_time {
            cx.err(
                format!("{opath}.max_ejection_time"),
                "must be at least base_ejection_time",
            );
        }
        if o.max_ejection_percent > 100 {
            cx.err(format!("{opath}.max_ejection_percent"), "must be 0 to 100");
        }
    }
    if let Some(hc) = &b.health_check {
        let hpath = format!("{path}.health_check");
        let kinds = [hc.http.is_some(), hc.tcp.is_some(), hc.grpc.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            cx.err(&hpath, "give exactly one of http, tcp or grpc");
        }
        if let Some(h) = &hc.http {
            if !h.path.starts_with('/') {
                cx.err(format!("{hpath}.http.path"), "must start with '/'");
            }
            if Method::from_bytes(h.method.as_bytes()).is_err() {
                cx.err(
                    format!("{hpath}.http.method"),
                    format!("invalid method {:?}", h.method),
                );
            }
            if let Some(host) = &h.host {
                if HeaderValue::from_str(host).is_err() {
                    cx.err(
                        format!("{hpath}.http.host"),
                        format!("invalid host {host:?}"),
                    );
                }
            }
            let [lo, hi] = h.expected_statuses;
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                cx.err(
                    format!("{hpath}.http.expected_statuses"),
                    "expected [low, high] with 100 <= low <= high <= 599",
                );
            }
        }
        if hc.grpc.is_some() && b.protocol == UpstreamProtocol::Http1 {
            cx.err(
                format!("{hpath}.grpc"),
                "gRPC health checks need protocol: h2c or h2",
            );
        }
        for (field, d) in [("interval", hc.interval), ("timeout", hc.timeout)] {
            if d.is_zero() {
                cx.err(format!("{hpath}.{field}"), "must be greater than 0s");
            }
        }
        for (field, v) in [
            ("healthy_threshold", hc.healthy_threshold),
            ("unhealthy_threshold", hc.unhealthy_threshold),
        ] {
            if v == 0 {
                cx.err(format!("{hpath}.{field}"), "must be at least 1");
            }
        }
    }
}

/// Splits `name:port` and checks the name is a DNS name, not an address.
fn parse_dns_target(target: &str) -> Result<(String, u16), String> {
    let expected = "expected name:port, e.g. mysql.default.svc.cluster.local:3306";
    let Some((host, port)) = target.rsplit_once(':') else {
        return Err(format!("invalid DNS target {target:?}: {expected}"));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("invalid port in DNS target {target:?}: {expected}")),
    };
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return Err(format!(
            "{target:?} is an address, not a DNS name: list it under endpoints"
        ));
    }
    let bare = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!(
            "invalid DNS name {host:?}: labels of letters, digits, '-' or '_', 1 to 63 \
             characters each, separated by dots"
        ));
    }
    Ok((host.to_ascii_lowercase(), port))
}

fn check_dns(cx: &mut Ctx<'_>, dns: &DnsSpec) {
    for (i, ns) in dns.nameservers.iter().enumerate() {
        let ok = ns.parse::<std::net::IpAddr>().is_ok()
            || ns.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0);
        if !ok {
            cx.err(
                format!("dns.nameservers[{i}]"),
                format!("invalid nameserver {ns:?}: expected ip or ip:port, e.g. 10.96.0.10 or 127.0.0.1:5353"),
            );
        }
    }
    for (field, d) in [
        ("min_refresh", dns.min_refresh),
        ("max_refresh", dns.max_refresh),
        ("timeout", dns.timeout),
    ] {
        if d.is_zero() {
            cx.err(format!("dns.{field}"), "must be greater than 0s");
        }
    }
    if dns.max_refresh < dns.min_refresh {
        cx.err(
            "dns.max_refresh",
            format!(
                "must be at least min_refresh ({})",
                humantime::format_duration(dns.min_refresh)
            ),
        );
    }
}

/// Backends routes may name.
struct Known<'a> {
    backends: &'a HashMap<&'a str, (usize, Arc<Backend>)>,
    invalid: &'a HashSet<&'a str>,
}

impl Known<'_> {
    /// The backend called `name`. An unknown name is an error at `path`; a backend that is
    /// declared but invalid already has its own errors, so it adds none.
    fn get(&self, cx: &mut Ctx<'_>, path: &str, name: &str) -> Option<Arc<Backend>> {
        self.index(cx, path, name).map(|(_, b)| b)
    }

    /// [`Known::get`], with the backend's index in the table.
    fn index(&self, cx: &mut Ctx<'_>, path: &str, name: &str) -> Option<(usize, Arc<Backend>)> {
        if let Some((i, b)) = self.backends.get(name) {
            return Some((*i, Arc::clone(b)));
        }
        if !self.invalid.contains(name) {
            let mut defined: Vec<&str> = self
                .backends
                .keys()
                .chain(self.invalid.iter())
                .copied()
                .collect();
            defined.sort_unstable();
            cx.err(
                path,
                format!("unknown backend {name:?} (defined: {})", defined.join(", ")),
            );
        }
        None
    }
}

fn compile_listener(
    cx: &mut Ctx<'_>,
    path: &str,
    l: &ListenerSpec,
    all: &[ListenerSpec],
    known: &Known<'_>,
) -> ListenerTable {
    let mut router = Router::default();
    let tcp = compile_tcp(cx, path, l, known);
    let tls = compile_tls(cx, path, l);
    // The listener whose routes this one serves: itself, or the one named by `routes_from`.
    let (source_path, source) = match routes_source(cx, path, l, all) {
        Some((j, src)) => (format!("listeners[{j}]"), src),
        None => (path.to_owned(), l),
    };
    let mut names = HashSet::new();
    for (i, r) in source.routes.iter().enumerate() {
        let rpath = format!("{source_path}.routes[{i}]");
        let name = r
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/{i}", source.name));
        if !names.insert(name.clone()) {
            cx.err(
                format!("{rpath}.name"),
                format!("duplicate route name {name:?} in this listener"),
            );
        }
        let (hosts, pm, cond) = compile_match(cx, &format!("{rpath}.match"), &r.matches);
        if let Some(route) = compile_route(cx, &rpath, &l.name, name, r, &pm, known) {
            router.insert(&hosts, &pm, &cond, Arc::new(route));
        }
    }
    if let Some(d) = &source.default_route {
        let dpath = format!("{source_path}.default_route");
        if d.matches != MatchSpec::default() {
            cx.err(
                format!("{dpath}.match"),
                "the default route takes every unmatched request; remove its match",
            );
        }
        let name = d
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/default", source.name));
        let pm = PathMatch::Prefix("/".into());
        if let Some(route) = compile_route(cx, &dpath, &l.name, name, d, &pm, known) {
            router.set_default(Arc::new(route));
        }
    }
    ListenerTable {
        name: l.name.as_str().into(),
        address: l.address.clone(),
        router,
        tcp,
        tls,
        unmatched: cx.metrics(&l.name, "", ""),
    }
}

/// The listener named by `routes_from`, checked: it exists, serves HTTP, and has routes of
/// its own (one level only, so a listener's routes are always where they are written).
fn routes_source<'s>(
    cx: &mut Ctx<'_>,
    path: &str,
    l: &ListenerSpec,
    all: &'s [ListenerSpec],
) -> Option<(usize, &'s ListenerSpec)> {
    let name = l.routes_from.as_ref()?;
    let field = format!("{path}.routes_from");
    if !l.routes.is_empty() || l.default_route.is_some() {
        cx.err(
            &field,
            "a listener with routes_from has no routes or default_route of its own",
        );
    }
    let Some(j) = all.iter().position(|o| &o.name == name) else {
        let names: Vec<&str> = all.iter().map(|o| o.name.as_str()).collect();
        cx.err(
            &field,
            format!("unknown listener {name:?} (defined: {})", names.join(", ")),
        );
        return None;
    };
    let src = &all[j];
    if src.name == l.name || src.routes_from.is_some() || src.protocol == ListenerProtocol::Tcp {
        cx.err(
            &field,
            format!("{name:?} must be another http or https listener with routes of its own"),
        );
        return None;
    }
    Some((j, src))
}

/// An `https` listener's certificates and TLS settings.
fn compile_tls(cx: &mut Ctx<'_>, path: &str, l: &ListenerSpec) -> Option<Arc<TlsListener>> {
    match (l.protocol, &l.tls) {
        (ListenerProtocol::Https, Some(t)) => match TlsListener::build(t) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(errors) => {
                for e in errors {
                    cx.err(format!("{path}.tls.{}", e.field), e.message);
                }
                None
            }
        },
        (ListenerProtocol::Https, None) => {
            cx.err(
                format!("{path}.tls"),
                "an https listener needs tls: {certificates: [{cert: FILE, key: FILE}]}",
            );
            None
        }
        (_, Some(_)) => {
            cx.err(
                format!("{path}.tls"),
                "tls is only for listeners with protocol: https",
            );
            None
        }
        (_, None) => None,
    }
}

/// A `tcp` listener's backend; checks that each protocol has only its own settings.
fn compile_tcp(
    cx: &mut Ctx<'_>,
    path: &str,
    l: &ListenerSpec,
    known: &Known<'_>,
) -> Option<TcpForward> {
    if l.protocol == ListenerProtocol::Tcp && (!l.routes.is_empty() || l.default_route.is_some()) {
        cx.err(
            format!("{path}.routes"),
            "a tcp listener has no HTTP routes; remove routes and default_route",
        );
    }
    match (l.protocol, &l.tcp) {
        (ListenerProtocol::Http | ListenerProtocol::Https, None) => None,
        (ListenerProtocol::Http | ListenerProtocol::Https, Some(_)) => {
            cx.err(
                format!("{path}.tcp"),
                "tcp is only for listeners with protocol: tcp",
            );
            None
        }
        (ListenerProtocol::Tcp, None) => {
            cx.err(
                format!("{path}.tcp"),
                "a tcp listener needs tcp: {backend: NAME}",
            );
            None
        }
        (ListenerProtocol::Tcp, Some(t)) => {
            let before = cx.errors.len();
            if t.idle_timeout.is_zero() {
                cx.err(
                    format!("{path}.tcp.idle_timeout"),
                    "must be greater than 0s",
                );
            }
            if t.backend.is_none() && t.sni.is_none() {
                cx.err(
                    format!("{path}.tcp"),
                    "a tcp listener needs backend, sni (TLS passthrough) or both",
                );
            }
            let backend = t
                .backend
                .as_ref()
                .and_then(|b| known.get(cx, &format!("{path}.tcp.backend"), b));
            let sni = t
                .sni
                .as_ref()
                .map(|rules| Arc::new(compile_sni(cx, &format!("{path}.tcp.sni"), rules, known)));
            (cx.errors.len() == before).then_some(TcpForward {
                backend,
                sni,
                idle_timeout: t.idle_timeout,
            })
        }
    }
}

/// TLS passthrough rules: each host once, DNS names or one-label wildcards only (a
/// ClientHello carries no IP address, and `*` is what the default backend is for).
fn compile_sni(
    cx: &mut Ctx<'_>,
    path: &str,
    rules: &[SniRouteSpec],
    known: &Known<'_>,
) -> SniRoutes {
    let mut routes = SniRoutes::default();
    if rules.is_empty() {
        cx.err(
            path,
            "give at least one {hosts, backend} rule, or remove sni",
        );
    }
    // By the host as normalized (lowercase), so `A.example` and `a.example` collide.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let rpath = format!("{path}[{i}]");
        let backend = known.get(cx, &format!("{rpath}.backend"), &rule.backend);
        if rule.hosts.is_empty() {
            cx.err(format!("{rpath}.hosts"), "list at least one server name");
        }
        for (j, h) in rule.hosts.iter().enumerate() {
            let hpath = format!("{rpath}.hosts[{j}]");
            let host = match parse_host(h) {
                Err(e) => {
                    cx.err(hpath, e);
                    continue;
                }
                Ok(HostMatch::Any) => {
                    cx.err(
                        hpath,
                        "* matches any name: use tcp.backend for connections no rule takes",
                    );
                    continue;
                }
                Ok(_) if h.parse::<std::net::IpAddr>().is_ok() => {
                    cx.err(
                        hpath,
                        format!("{h:?} is an IP address; TLS clients send only DNS names in SNI"),
                    );
                    continue;
                }
                Ok(host) => host,
            };
            let key = match &host {
                HostMatch::Wildcard(suffix) => format!("*.{suffix}"),
                HostMatch::Exact(name) => name.clone(),
                HostMatch::Any => continue,
            };
            if let Some(first) = seen.get(&key) {
                cx.err(hpath, format!("{h:?} is already routed by {path}[{first}]"));
                continue;
            }
            seen.insert(key, i);
            if let Some(b) = &backend {
                routes.insert(&host, b);
            }
        }
    }
    routes
}

fn compile_match(
    cx: &mut Ctx<'_>,
    path: &str,
    m: &MatchSpec,
) -> (Vec<HostMatch>, PathMatch, Conditions) {
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().enumerate() {
        match parse_host(h) {
            Ok(h) => hosts.push(h),
            Err(e) => cx.err(format!("{path}.hosts[{i}]"), e),
        }
    }
    if hosts.is_empty() {
        hosts.push(HostMatch::Any);
    }
    let pm = match (&m.prefix, &m.exact) {
        (Some(_), Some(_)) => {
            cx.err(path, "give either prefix or exact, not both");
            PathMatch::Prefix("/".into())
        }
        (Some(p), None) => {
            check_path(cx, &format!("{path}.prefix"), p);
            PathMatch::Prefix(p.clone())
        }
        (None, Some(p)) => {
            check_path(cx, &format!("{path}.exact"), p);
            PathMatch::Exact(p.clone())
        }
        (None, None) => PathMatch::Prefix("/".into()),
    };
    let mut cond = Conditions {
        port: m.port,
        ..Conditions::default()
    };
    if m.port == Some(0) {
        cx.err(format!("{path}.port"), "port must be 1 to 65535");
    }
    for (i, meth) in m.methods.iter().enumerate() {
        match Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
            Ok(mm) => cond.methods.push(mm),
            Err(_) => cx.err(
                format!("{path}.methods[{i}]"),
                format!("invalid method {meth:?}"),
            ),
        }
    }
    for (i, h) in m.headers.iter().enumerate() {
        let hpath = format!("{path}.headers[{i}]");
        let name = HeaderName::try_from(h.name.as_str());
        let value = h.value.as_deref().map(HeaderValue::try_from).transpose();
        match (name, value) {
            (Ok(n), Ok(v)) => cond.headers.push((n, v)),
            (Err(_), _) => cx.err(
                format!("{hpath}.name"),
                format!("invalid header name {:?}", h.name),
            ),
            (_, Err(_)) => cx.err(format!("{hpath}.value"), "invalid header value"),
        }
    }
    (hosts, pm, cond)
}

fn check_path(cx: &mut Ctx<'_>, path: &str, p: &str) {
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
        cx.err(
            path,
            format!("invalid path {p:?}: must start with '/' and contain no '?', '#' or spaces"),
        );
    }
}

/// Parses a route host: exact, `*.suffix`, or `*` (any).
pub fn parse_host(h: &str) -> Result<HostMatch, String> {
    let lower = h.to_ascii_lowercase();
    if lower == "*" || lower.is_empty() {
        return Ok(HostMatch::Any);
    }
    let (wild, rest) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !rest.is_empty()
        && rest.len() <= crate::router::MAX_HOST_LEN
        && rest
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        return Err(format!(
            "invalid host {h:?}: expected a DNS name (api.example.com) or a wildcard (*.example.com), without port"
        ));
    }
    Ok(if wild {
        HostMatch::Wildcard(rest.to_owned())
    } else {
        HostMatch::Exact(rest.to_owned())
    })
}

fn compile_route(
    cx: &mut Ctx<'_>,
    path: &str,
    listener: &str,
    name: String,
    r: &RouteSpec,
    pm: &PathMatch,
    known: &Known<'_>,
) -> Option<Route> {
    let before = cx.errors.len();
    let actions = [
        r.forward.is_some(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    let action = match actions.iter().filter(|a| **a).count() {
        1 => {
            if let Some(f) = &r.forward {
                compile_forward(cx, &format!("{path}.forward"), listener, &name, f, known)
                    .map(Action::Forward)
            } else if let Some(rd) = &r.redirect {
                compile_redirect(cx, &format!("{path}.redirect"), rd).map(Action::Redirect)
            } else {
                let d = r.direct_response.as_ref()?;
                compile_direct(cx, &format!("{path}.direct_response"), d).map(Action::Direct)
            }
        }
        n => {
            cx.err(
                path,
                format!(
                    "a route needs exactly one of forward, redirect, direct_response (found {n})"
                ),
            );
            None
        }
    };
    let request_headers =
        compile_header_ops(cx, &format!("{path}.request_headers"), &r.request_headers);
    let response_headers =
        compile_header_ops(cx, &format!("{path}.response_headers"), &r.response_headers);
    let rewrite = match (&r.rewrite_prefix, pm) {
        (None, _) => None,
        (Some(to), PathMatch::Prefix(from)) if r.forward.is_some() => {
            check_path(cx, &format!("{path}.rewrite_prefix"), to);
            let from = from.trim_end_matches('/').to_owned();
            Some((from, to.clone()))
        }
        (Some(_), _) => {
            cx.err(
                format!("{path}.rewrite_prefix"),
                "rewrite_prefix needs a prefix match and a forward action",
            );
            None
        }
    };
    if r.timeout.is_some() && r.forward.is_none() {
        cx.err(
            format!("{path}.timeout"),
            "timeout applies to forward routes only",
        );
    }
    let retry = r.retry.as_ref().and_then(|spec| {
        if r.forward.is_none() {
            cx.err(
                format!("{path}.retry"),
                "retry applies to forward routes only",
            );
            return None;
        }
        compile_retry(cx, &format!("{path}.retry"), spec)
    });
    let rate_limit = r
        .rate_limit
        .as_ref()
        .and_then(|rl| compile_rate_limit(cx, &format!("{path}.rate_limit"), listener, &name, rl));
    if cx.errors.len() > before {
        return None;
    }
    let action = action?;
    // A forwarding route's own metrics are its first backend's, so it exports no series
    // with an empty backend label.
    let local_metrics = match &action {
        Action::Forward(f) => match f.targets.first() {
            Some(t) => Arc::clone(&t.metrics),
            None => cx.metrics(listener, &name, ""),
        },
        _ => cx.metrics(listener, &name, ""),
    };
    let timeout = match r.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
    };
    Some(Route {
        local_metrics,
        name: name.into(),
        action,
        timeout,
        retry,
        request_headers,
        response_headers,
        rewrite,
        rate_limit,
    })
}

/// Most retries a route may ask for: more only multiplies load on a failing backend.
const MAX_RETRIES: u32 = 10;

fn compile_retry(cx: &mut Ctx<'_>, path: &str, r: &RetrySpec) -> Option<RetryPolicy> {
    let before = cx.errors.len();
    if r.retries > MAX_RETRIES {
        cx.err(
            format!("{path}.retries"),
            format!("must be 0 to {MAX_RETRIES}"),
        );
    }
    for (i, s) in r.statuses.iter().enumerate() {
        if !(100..=599).contains(s) {
            cx.err(
                format!("{path}.statuses[{i}]"),
                format!("invalid status {s}: expected 100 to 599"),
            );
        }
    }
    if r.per_try_timeout.is_some_and(|t| t.is_zero()) {
        cx.err(format!("{path}.per_try_timeout"), "must be greater than 0s");
    }
    if r.backoff_base.is_zero() {
        cx.err(format!("{path}.backoff_base"), "must be greater than 0s");
    }
    if r.backoff_max < r.backoff_base {
        cx.err(
            format!("{path}.backoff_max"),
            "must be at least backoff_base",
        );
    }
    if cx.errors.len() > before {
        return None;
    }
    Some(RetryPolicy {
        retries: r.retries,
        on_connect_failure: r.on_connect_failure,
        statuses: r.statuses.clone(),
        grpc_statuses: r.grpc_statuses.iter().map(|c| *c as u8).collect(),
        non_idempotent: r.non_idempotent,
        per_try_timeout: r.per_try_timeout,
        backoff_base: r.backoff_base,
        backoff_max: r.backoff_max,
        buffer_bytes: r.buffer_bytes,
    })
}

fn compile_rate_limit(
    cx: &mut Ctx<'_>,
    path: &str,
    listener: &str,
    route: &str,
    r: &RateLimitSpec,
) -> Option<RouteRateLimit> {
    let before = cx.errors.len();
    let requests = NonZeroU32::new(r.requests);
    if requests.is_none() {
        cx.err(format!("{path}.requests"), "must be at least 1");
    }
    if r.per.is_zero() {
        cx.err(format!("{path}.per"), "must be greater than 0s");
    } else if r.per.as_nanos() < u128::from(r.requests) {
        cx.err(
            format!("{path}.requests"),
            format!(
                "{} requests per {} is more than one per nanosecond",
                r.requests,
                humantime::format_duration(r.per)
            ),
        );
    }
    let burst = match r.burst {
        None => requests,
        Some(b) => {
            if b == 0 {
                cx.err(format!("{path}.burst"), "must be at least 1");
            }
            NonZeroU32::new(b)
        }
    };
    let key = match &r.key {
        RateLimitKeySpec::Source(RateLimitSource::Route) => KeySource::Global,
        RateLimitKeySpec::Source(RateLimitSource::ClientIp) => KeySource::ClientIp,
        RateLimitKeySpec::Header { header } => match HeaderName::try_from(header.as_str()) {
            Ok(h) => KeySource::Header(h),
            Err(_) => {
                cx.err(
                    format!("{path}.key.header"),
                    format!("invalid header name {header:?}"),
                );
                KeySource::Global
            }
        },
    };
    let max_keys = match (r.max_keys, &r.key) {
        (Some(_), RateLimitKeySpec::Source(RateLimitSource::Route)) => {
            cx.err(
                format!("{path}.max_keys"),
                "max_keys applies to keyed limits only (key: client_ip or {header: NAME})",
            );
            0
        }
        (Some(0), _) => {
            cx.err(format!("{path}.max_keys"), "must be at least 1");
            0
        }
        (Some(n), _) => n,
        (None, RateLimitKeySpec::Source(RateLimitSource::Route)) => 0,
        (None, _) => rate_limit::DEFAULT_MAX_KEYS,
    };
    if cx.errors.len() > before {
        return None;
    }
    let settings = rate_limit::Settings {
        requests: requests?,
        per: r.per,
        burst: burst?,
        key,
        max_keys,
    };
    let (limiter, limited) = match cx.registries {
        Some(reg) => (
            reg.rate_limits.get(listener, route, &settings),
            metrics::counter!(
                crate::metrics::RATE_LIMITED,
                "listener" => listener.to_owned(),
                "route" => route.to_owned()
            ),
        ),
        None => (
            Arc::new(Limiter::detached(settings)),
            metrics::Counter::noop(),
        ),
    };
    Some(RouteRateLimit::new(limiter, limited, r.response_headers))
}

fn compile_forward(
    cx: &mut Ctx<'_>,
    path: &str,
    listener: &str,
    route: &str,
    f: &ForwardSpec,
    known: &Known<'_>,
) -> Option<Forward> {
    let wanted: Vec<(String, &str, u32)> = match (&f.backend, f.backends.is_empty()) {
        (Some(b), true) => vec![(format!("{path}.backend"), b.as_str(), 1)],
        (None, false) => f
            .backends
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    format!("{path}.backends[{i}].name"),
                    w.name.as_str(),
                    w.weight,
                )
            })
            .collect(),
        _ => {
            cx.err(
                path,
                "forward needs either backend or backends (weighted), not both or neither",
            );
            return None;
        }
    };
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for (p, name, weight) in wanted {
        if let Some((i, _)) = known.index(cx, &p, name) {
            targets.push(Target {
                backend: i,
                metrics: cx.metrics(listener, route, name),
            });
            weights.push(weight);
        }
    }
    if !f.backends.is_empty() && weights.iter().all(|w| *w == 0) {
        cx.err(
            format!("{path}.backends"),
            "at least one backend needs a weight above 0",
        );
    }
    Some(Forward {
        split: Schedule::new(&weights),
        targets,
    })
}

fn compile_redirect(cx: &mut Ctx<'_>, path: &str, r: &RedirectSpec) -> Option<Redirect> {
    if r.scheme.is_none() && r.host.is_none() && r.port.is_none() && r.path.is_none() {
        cx.err(
            path,
            "a redirect needs at least one of scheme, host, port, path (else it points at itself)",
        );
        return None;
    }
    let status = match r.status {
        301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(r.status).ok()?,
        s => {
            cx.err(
                format!("{path}.status"),
                format!("invalid redirect status {s}: use 301, 302, 303, 307 or 308"),
            );
            return None;
        }
    };
    if let Some(s) = &r.scheme {
        if s != "http" && s != "https" {
            cx.err(
                format!("{path}.scheme"),
                format!("invalid scheme {s:?}: use http or https"),
            );
        }
    }
    if let Some(h) = &r.host {
        if !matches!(parse_host(h), Ok(HostMatch::Exact(_))) {
            cx.err(format!("{path}.host"), format!("invalid host {h:?}"));
        }
    }
    if let Some(p) = &r.path {
        check_path(cx, &format!("{path}.path"), p);
    }
    Some(Redirect {
        scheme: r.scheme.clone(),
        host: r.host.clone(),
        port: r.port,
        path: r.path.clone(),
        status,
    })
}

fn compile_direct(cx: &mut Ctx<'_>, path: &str, d: &DirectResponseSpec) -> Option<DirectResponse> {
    let status = match StatusCode::from_u16(d.status) {
        Ok(s) if (200..600).contains(&d.status) => s,
        _ => {
            cx.err(
                format!("{path}.status"),
                format!("invalid status {}: use 200 to 599", d.status),
            );
            return None;
        }
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &d.headers {
        match (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            (Ok(k), Ok(v)) => {
                headers.append(k, v);
            }
            _ => cx.err(
                format!("{path}.headers.{k}"),
                format!("invalid header {k:?}: {v:?}"),
            ),
        }
    }
    Some(DirectResponse {
        status,
        body: Bytes::from(d.body.clone()),
        headers,
    })
}

fn compile_header_ops(cx: &mut Ctx<'_>, path: &str, h: &HeaderOpsSpec) -> HeaderOps {
    let mut ops = HeaderOps::default();
    let pairs = |cx: &mut Ctx<'_>, kind: &str, src: &std::collections::BTreeMap<String, String>| {
        let mut out = Vec::new();
        for (k, v) in src {
            match (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                (Ok(k), Ok(v)) => out.push((k, v)),
                _ => cx.err(
                    format!("{path}.{kind}.{k}"),
                    format!("invalid header {k:?}: {v:?}"),
                ),
            }
        }
        out
    };
    ops.set = pairs(cx, "set", &h.set);
    ops.add = pairs(cx, "add", &h.add);
    for (i, k) in h.remove.iter().enumerate() {
        match HeaderName::try_from(k.as_str()) {
            Ok(k) => ops.remove.push(k),
            Err(_) => cx.err(
                format!("{path}.remove[{i}]"),
                format!("invalid header name {k:?}"),
            ),
        }
    }
    ops
}
