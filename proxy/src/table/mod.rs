//! The routing table: compiled once per configuration, published whole, read lock-free.

pub mod compile;
pub mod spec;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

use crate::balancer::{round_robin::Schedule, Balancer, Load};
use crate::breaker::BackendState;
use crate::endpoint::{EndpointSnapshot, EndpointState};
use crate::health::{Change, Outcome, OutlierConfig};
use crate::metrics::TargetMetrics;
use crate::names::{DnsName, NameStatus};
use crate::rate_limit::RouteRateLimit;
use crate::router::Router;
use crate::table::spec::{CircuitBreakerSpec, HealthCheckSpec};
use crate::upstream::Upstream;
use crate::upstream_tls::UpstreamTls;

pub use compile::{compile, CompileError, Registries};

/// An immutable routing table. Requests `load()` it from a [`TableHandle`]; nothing in it
/// changes after publication except atomics inside endpoint state.
#[derive(Debug)]
pub struct RouteTable {
    /// Increases by one with every published table.
    pub generation: u64,
    /// Where the configuration came from (e.g. the file path).
    pub source: String,
    /// When it was compiled.
    pub loaded_at: SystemTime,
    /// Listeners, sorted by name; shared with tables that changed only backends.
    pub listeners: Arc<[ListenerTable]>,
    /// Backends by name, for `/config`.
    pub backends: Vec<Arc<Backend>>,
    /// Whether to write access log lines.
    pub access_log: bool,
    /// The configuration this table was compiled from.
    pub spec: Arc<spec::Spec>,
}

impl RouteTable {
    /// This table with some backends replaced (matched by name) and everything else
    /// shared: how an endpoint-only change is published without compiling every route.
    /// `None` if a backend is unknown here or a `tcp` listener holds it directly; compile
    /// the whole configuration then.
    pub fn with_backends(
        &self,
        generation: u64,
        spec: Arc<spec::Spec>,
        replacements: Vec<Arc<Backend>>,
    ) -> Option<RouteTable> {
        let mut backends = self.backends.clone();
        for new in replacements {
            if self.listeners.iter().any(|l| l.tcp.is_some()) && self.tcp_uses(&new.name) {
                return None;
            }
            let i = backends.iter().position(|b| b.name == new.name)?;
            backends[i] = new;
        }
        Some(RouteTable {
            generation,
            source: self.source.clone(),
            loaded_at: SystemTime::now(),
            listeners: Arc::clone(&self.listeners),
            backends,
            access_log: self.access_log,
            spec,
        })
    }

    fn tcp_uses(&self, name: &str) -> bool {
        self.listeners
            .iter()
            .filter_map(|l| l.tcp.as_ref())
            .any(|t| {
                t.backend.as_ref().is_some_and(|b| &*b.name == name)
                    || t.sni.as_ref().is_some_and(|s| s.uses(name))
            })
    }

    /// The backend of a route's target.
    pub fn backend(&self, target: &Target) -> &Arc<Backend> {
        &self.backends[target.backend]
    }

    /// The listener called `name`, looked up at `hint` first (its index when the serve
    /// loop started): listeners come and go in Kubernetes mode, so an index alone could
    /// point at another listener in a later table.
    pub fn listener(&self, hint: usize, name: &str) -> Option<&ListenerTable> {
        match self.listeners.get(hint) {
            Some(l) if &*l.name == name => Some(l),
            _ => self.listeners.iter().find(|l| &*l.name == name),
        }
    }

    /// Index of the listener with this name.
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.listeners.iter().position(|l| &*l.name == name)
    }

    /// The JSON view served at `/config`.
    pub fn view(&self) -> TableView<'_> {
        TableView {
            generation: self.generation,
            source: &self.source,
            loaded_at: humantime::format_rfc3339_seconds(self.loaded_at).to_string(),
            endpoints: self
                .backends
                .iter()
                .map(|b| BackendView {
                    name: &b.name,
                    requests: b.state.requests(),
                    connections: b.state.connections(),
                    ejected: b.state.ejected(),
                    endpoints: b.endpoints.iter().map(|e| e.state.snapshot()).collect(),
                    dns: b.dns.as_ref().map(|n| DnsView {
                        name: n.host(),
                        port: n.port(),
                        status: NameStatus::clone(&n.status()),
                    }),
                })
                .collect(),
            config: &self.spec,
        }
    }
}

/// `/config` JSON.
#[derive(Debug, Serialize)]
pub struct TableView<'a> {
    generation: u64,
    source: &'a str,
    loaded_at: String,
    endpoints: Vec<BackendView<'a>>,
    config: &'a spec::Spec,
}

/// One backend in `/config`.
#[derive(Debug, Serialize)]
struct BackendView<'a> {
    name: &'a str,
    /// Requests in flight (the circuit breaker's count).
    requests: u32,
    /// Open HTTP/1.1 connections.
    connections: u32,
    /// Endpoints ejected by outlier detection.
    ejected: u32,
    endpoints: Vec<EndpointSnapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<DnsView<'a>>,
}

/// A DNS backend's name and lookup status in `/config`.
#[derive(Debug, Serialize)]
struct DnsView<'a> {
    name: &'a str,
    port: u16,
    status: NameStatus,
}

/// One listener's routes.
#[derive(Debug)]
pub struct ListenerTable {
    /// Listener name.
    pub name: Arc<str>,
    /// Bind address text, as configured.
    pub address: String,
    /// Host/path index (empty for `tcp` listeners).
    pub router: Router<Arc<Route>>,
    /// The backend of a `tcp` listener.
    pub tcp: Option<TcpForward>,
    /// Certificates and TLS settings of an `https` listener.
    pub tls: Option<Arc<crate::https::TlsListener>>,
    /// Metrics for requests no route took.
    pub unmatched: Arc<TargetMetrics>,
}

/// A route's retry policy, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most retries after the first attempt.
    pub retries: u32,
    /// Retry connect failures (any method).
    pub on_connect_failure: bool,
    /// Statuses retried (idempotent methods unless `non_idempotent`).
    pub statuses: Vec<u16>,
    /// `grpc-status` codes retried.
    pub grpc_statuses: Vec<u8>,
    /// Retry statuses for any method.
    pub non_idempotent: bool,
    /// Per-attempt timeout.
    pub per_try_timeout: Option<Duration>,
    /// First backoff.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Largest request body kept for replay.
    pub buffer_bytes: usize,
}

/// Where a `tcp` listener relays connections.
#[derive(Debug)]
pub struct TcpForward {
    /// The backend; with `sni`, the one for names no rule lists.
    pub backend: Option<Arc<Backend>>,
    /// TLS passthrough rules by server name (an `Arc`: a connection holds them while it
    /// reads the ClientHello, not the whole table).
    pub sni: Option<Arc<crate::passthrough::SniRoutes>>,
    /// Close connections idle this long.
    pub idle_timeout: Duration,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Route name.
    pub name: Arc<str>,
    /// What it does.
    pub action: Action,
    /// Time allowed for the response headers, all attempts together; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Retries, for forward routes that have them.
    pub retry: Option<RetryPolicy>,
    /// Request header changes.
    pub request_headers: HeaderOps,
    /// Response header changes.
    pub response_headers: HeaderOps,
    /// Prefix rewrite: (matched prefix, replacement).
    pub rewrite: Option<(String, String)>,
    /// Metrics for routes that answer themselves.
    pub local_metrics: Arc<TargetMetrics>,
    /// The route's rate limit, checked before its action.
    pub rate_limit: Option<RouteRateLimit>,
}

/// What a route does.
#[derive(Debug)]
pub enum Action {
    /// Forward upstream.
    Forward(Forward),
    /// Redirect.
    Redirect(Redirect),
    /// Fixed response.
    Direct(DirectResponse),
}

/// Forwarding to one or more weighted backends.
#[derive(Debug)]
pub struct Forward {
    /// Backends with their metrics.
    pub targets: Vec<Target>,
    /// Weighted cycle over `targets` (a single target always gets index 0).
    pub split: Schedule,
}

impl Forward {
    /// The backend for the next request.
    pub fn pick(&self) -> Option<&Target> {
        if self.targets.len() == 1 {
            return self.targets.first();
        }
        self.split.pick().map(|i| &self.targets[i])
    }
}

/// One backend of a route.
#[derive(Debug)]
pub struct Target {
    /// Index of the backend in [`RouteTable::backends`]. An index, not the backend itself,
    /// so a table with new endpoints for one backend can share every route of the last one
    /// ([`RouteTable::with_backends`]).
    pub backend: usize,
    /// Per (route, backend) metrics.
    pub metrics: Arc<TargetMetrics>,
}

/// A redirect.
#[derive(Debug)]
pub struct Redirect {
    /// Scheme to use, or keep the request's.
    pub scheme: Option<String>,
    /// Host to use, or keep the request's.
    pub host: Option<String>,
    /// Port to use.
    pub port: Option<u16>,
    /// Path to use, or keep the request's.
    pub path: Option<String>,
    /// Status code.
    pub status: StatusCode,
}

/// A fixed response.
#[derive(Debug)]
pub struct DirectResponse {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
    /// Headers.
    pub headers: HeaderMap,
}

/// Header changes, validated at compile time.
#[derive(Debug, Default)]
pub struct HeaderOps {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then replaced.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Then appended.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// Applies the changes.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// A compiled backend.
#[derive(Debug)]
pub struct Backend {
    /// Name.
    pub name: Arc<str>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Policy.
    pub balancer: Balancer,
    /// Affinity key for the hashing policies.
    pub hash_key: Option<HashKey>,
    /// How requests are sent.
    pub upstream: Upstream,
    /// TLS to the endpoints, when the backend has `tls`.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Connect failures counter.
    pub connect_failures: metrics::Counter,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// The DNS name the endpoints come from, for `dns` backends.
    pub dns: Option<Arc<DnsName>>,
    /// Live counters (circuit breaker, ejections), shared across generations.
    pub state: Arc<BackendState>,
    /// Circuit breaker thresholds.
    pub breaker: CircuitBreakerSpec,
    /// Outlier detection, when enabled.
    pub outlier: Option<OutlierConfig>,
    /// Whether endpoint health can keep endpoints out (outlier detection or health checks):
    /// without either, picks skip the health read entirely.
    pub guarded: bool,
    /// Below this percentage of available endpoints, health is ignored.
    pub panic_threshold: u32,
    /// Active health checks, run by [`crate::health_check::HealthChecker`].
    pub health_check: Option<HealthCheckSpec>,
    /// For `dns` backends: whether the name had had an answer (good or bad) when this table
    /// was built. `/ready` waits for it in the table in force, not in the live status, so a
    /// replica is not reported ready before the table with the endpoints is published.
    pub dns_answered: bool,
}

/// Picks tried when the first pick is not available, before scanning for one.
const REPICKS: u64 = 3;

impl Backend {
    /// Picks an endpoint with the backend's policy, stepping around endpoints that
    /// outlier detection or health checks keep out, unless too few are left (panic mode).
    /// `None` only for an empty backend.
    pub fn pick(&self, hash: Option<u64>) -> Option<usize> {
        let first = self.balancer.pick(&self.endpoints, hash)?;
        if !self.guarded || self.endpoints[first].state.health.is_clear() {
            return Some(first);
        }
        Some(self.pick_available(first, hash))
    }

    #[cold]
    fn pick_available(&self, first: usize, hash: Option<u64>) -> usize {
        let now = crate::clock::clock_ns();
        let ok = |i: usize| self.endpoints[i].state.health.available(now);
        if ok(first) {
            return first;
        }
        let n = self.endpoints.len();
        let out = (self.state.unavailable() as usize).min(n);
        if (n - out) * 100 < n * self.panic_threshold as usize {
            // Too few left to carry the load: spread over all rather than overload them.
            return first;
        }
        for k in 1..=REPICKS {
            // A hashing policy needs another key to land elsewhere; the others move anyway.
            let h = hash.map(|h| h ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            if let Some(i) = self.balancer.pick(&self.endpoints, h) {
                if ok(i) {
                    return i;
                }
            }
        }
        (1..n)
            .map(|k| (first + k) % n)
            .find(|&i| self.endpoints[i].weight > 0 && ok(i))
            .unwrap_or(first)
    }

    /// Feeds an attempt's outcome at `ep` to outlier detection, if enabled.
    pub fn record(&self, ep: &Endpoint, outcome: Outcome) {
        let Some(cfg) = &self.outlier else {
            return;
        };
        let Some(change) =
            ep.state
                .health
                .record(outcome, cfg, self.endpoints.len(), crate::clock::clock_ns)
        else {
            return;
        };
        let labels = [("backend", self.name.to_string())];
        metrics::gauge!(crate::metrics::OUTLIER_EJECTED, &labels)
            .set(f64::from(self.state.ejected()));
        match change {
            Change::Ejected => {
                metrics::counter!(crate::metrics::OUTLIER_EJECTIONS, &labels).increment(1);
                tracing::warn!(
                    backend = &*self.name,
                    endpoint = %ep.addr,
                    ejected = self.state.ejected(),
                    "outlier detection ejected an endpoint"
                );
            }
            Change::Restored => tracing::info!(
                backend = &*self.name,
                endpoint = %ep.addr,
                "probe succeeded; endpoint back from ejection"
            ),
        }
    }

    /// Why the backend has no endpoints, for error bodies and logs.
    pub fn unavailable_reason(&self) -> String {
        match &self.dns {
            Some(n) => format!("backend {:?}: {}", self.name, n.unavailable_reason()),
            None => format!("backend {:?} has no endpoints", self.name),
        }
    }
}

/// A compiled endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Address.
    pub addr: SocketAddr,
    /// `ip:port` as a URI authority, built once.
    pub authority: Authority,
    /// Weight.
    pub weight: u32,
    /// Live state, shared across generations.
    pub state: Arc<EndpointState>,
}

impl Load for Endpoint {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn in_flight(&self) -> u32 {
        self.state.in_flight()
    }
    fn peak_ewma_cost(&self) -> f64 {
        self.state.peak_ewma_cost()
    }
    fn hash_id(&self) -> u64 {
        endpoint_hash_id(self.addr)
    }
}

/// Stable ring identity of an address, the same in every process and generation.
pub fn endpoint_hash_id(addr: SocketAddr) -> u64 {
    let mut buf = [0u8; 18];
    let bytes: &[u8] = match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            buf[..4].copy_from_slice(&ip.octets());
            buf[4..6].copy_from_slice(&addr.port().to_be_bytes());
            &buf[..6]
        }
        std::net::IpAddr::V6(ip) => {
            buf[..16].copy_from_slice(&ip.octets());
            buf[16..].copy_from_slice(&addr.port().to_be_bytes());
            &buf[..]
        }
    };
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// What the hashing policies hash.
#[derive(Debug)]
pub enum HashKey {
    /// Client IP.
    ClientIp,
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
}

impl HashKey {
    /// Whether this key is the value of header `name`.
    pub fn is_header(&self, name: &HeaderName) -> bool {
        matches!(self, HashKey::Header(n) if n == name)
    }
}

/// Holds the table in force; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct TableHandle {
    inner: Arc<ArcSwapOption<RouteTable>>,
    /// The generation in force, for whoever waits for a table (never read per request).
    published: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for TableHandle {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            published: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl TableHandle {
    /// The table in force, if one was published. Hold the guard briefly.
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<RouteTable>>> {
        self.inner.load()
    }

    /// The table in force as an owned reference, for slow paths (admin).
    pub fn current(&self) -> Option<Arc<RouteTable>> {
        self.inner.load_full()
    }

    /// Publishes a new table; requests that already hold routes keep them.
    pub fn publish(&self, table: RouteTable) {
        metrics::gauge!(crate::metrics::TABLE_GENERATION).set(table.generation as f64);
        let old = self.inner.load_full();
        let unchanged = |i: usize, b: &Arc<Backend>| {
            old.as_ref()
                .and_then(|o| o.backends.get(i))
                .is_some_and(|o| Arc::ptr_eq(o, b))
        };
        // A table that replaced a few backends (an endpoint update) sets a few gauges, not
        // one per backend of the cluster.
        for (i, b) in table.backends.iter().enumerate() {
            if unchanged(i, b) {
                continue;
            }
            metrics::gauge!(crate::metrics::BACKEND_ENDPOINTS, "backend" => b.name.to_string())
                .set(b.endpoints.len() as f64);
        }
        let generation = table.generation;
        self.inner.store(Some(Arc::new(table)));
        self.published.send_replace(generation);
    }

    /// Watches the generation in force (0 before the first table).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Resolves once a table is in force (at once if one already is).
    pub async fn first_published(&self) {
        let mut rx = self.published.subscribe();
        let _ = rx.wait_for(|g| *g > 0).await;
    }
}
