//! Every metric Strait exports: names and descriptions in one place, and the per-route
//! handles that the request path increments without building label sets.

use http::StatusCode;
use metrics::{Counter, Histogram};

/// Requests by listener, route, backend and status class.
pub const REQUESTS: &str = "strait_requests_total";
/// Request duration from first byte in to last byte out, by listener, route and backend.
pub const REQUEST_DURATION: &str = "strait_request_duration_seconds";
/// Failed TCP connects to upstream endpoints, by backend.
pub const UPSTREAM_CONNECT_FAILURES: &str = "strait_upstream_connect_failures_total";
/// Open downstream connections, by listener.
pub const DOWNSTREAM_CONNECTIONS: &str = "strait_downstream_connections_active";
/// Downstream connections accepted, by listener.
pub const DOWNSTREAM_CONNECTIONS_TOTAL: &str = "strait_downstream_connections_total";
/// Connections relayed by `tcp` listeners, by listener, backend and result.
pub const TCP_CONNECTIONS: &str = "strait_tcp_connections_total";
/// Lookups of backend DNS names, by name and result (`success`, `failure`).
pub const DNS_LOOKUPS: &str = "strait_dns_lookups_total";
/// 1 while a backend DNS name's lookups fail (its last good answer stays in use), else 0.
pub const DNS_FAILING: &str = "strait_dns_failing";
/// Requests turned away by a circuit breaker, by backend and threshold (`breaker`).
pub const CIRCUIT_BREAKER_OPEN: &str = "strait_circuit_breaker_open_total";
/// Retries sent, by backend.
pub const RETRIES: &str = "strait_retries_total";
/// Endpoints ejected by outlier detection, by backend (each ejection counts).
pub const OUTLIER_EJECTIONS: &str = "strait_outlier_ejections_total";
/// Endpoints currently ejected by outlier detection, by backend.
pub const OUTLIER_EJECTED: &str = "strait_outlier_ejected";
/// Active health check results, by backend and result (`pass`, `fail`).
pub const HEALTH_CHECKS: &str = "strait_health_checks_total";
/// TLS handshakes on `https` listeners, by listener and result (`ok`, `failed`, `timeout`).
pub const TLS_HANDSHAKES: &str = "strait_tls_handshakes_total";
/// Endpoints per backend in the table in force.
pub const BACKEND_ENDPOINTS: &str = "strait_backend_endpoints";
/// Generation number of the table in force.
pub const TABLE_GENERATION: &str = "strait_table_generation";
/// Configuration loads, by result (`success`, `failure`).
pub const CONFIG_RELOADS: &str = "strait_config_reloads_total";
/// Requests whose handler panicked (answered 500; the process keeps running).
pub const HANDLER_PANICS: &str = "strait_handler_panics_total";
/// Requests refused by a route's rate limit (answered 429), by listener and route.
pub const RATE_LIMITED: &str = "strait_rate_limited_total";
/// Keys tracked by a keyed rate limit (the overflow bucket not included), by listener and
/// route; refreshed every second.
pub const RATE_LIMIT_KEYS: &str = "strait_rate_limit_keys";

/// Histogram buckets for request durations, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Registers every description with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "Requests by listener, route, backend and status class."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request duration, first byte in to last byte out."
    );
    describe_counter!(
        UPSTREAM_CONNECT_FAILURES,
        "Failed TCP connects to upstream endpoints."
    );
    describe_gauge!(DOWNSTREAM_CONNECTIONS, "Open downstream connections.");
    describe_counter!(
        DOWNSTREAM_CONNECTIONS_TOTAL,
        "Downstream connections accepted."
    );
    describe_counter!(
        TCP_CONNECTIONS,
        "Connections relayed by tcp listeners, by result, counted when they end."
    );
    describe_counter!(DNS_LOOKUPS, "Lookups of backend DNS names by result.");
    describe_gauge!(
        DNS_FAILING,
        "1 while a backend DNS name's lookups fail (the last good answer stays in use)."
    );
    describe_counter!(
        CIRCUIT_BREAKER_OPEN,
        "Requests (or retries, breaker=max_retries) turned away by a circuit breaker."
    );
    describe_counter!(RETRIES, "Retries sent to a backend.");
    describe_counter!(
        OUTLIER_EJECTIONS,
        "Endpoint ejections by outlier detection."
    );
    describe_gauge!(
        OUTLIER_EJECTED,
        "Endpoints currently ejected by outlier detection."
    );
    describe_counter!(HEALTH_CHECKS, "Active health check results.");
    describe_counter!(
        TLS_HANDSHAKES,
        "TLS handshakes on https listeners by result."
    );
    describe_gauge!(
        BACKEND_ENDPOINTS,
        "Endpoints per backend in the table in force."
    );
    describe_gauge!(
        TABLE_GENERATION,
        "Generation number of the routing table in force."
    );
    describe_counter!(CONFIG_RELOADS, "Configuration loads by result.");
    describe_counter!(HANDLER_PANICS, "Requests whose handler panicked.");
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a route's rate limit (answered 429)."
    );
    describe_gauge!(
        RATE_LIMIT_KEYS,
        "Keys tracked by a keyed rate limit, at most its max_keys."
    );
}

/// [`TargetMetrics`] by (listener, route, backend), shared across table generations, so a
/// route's series are looked up in the recorder once per process rather than again on the
/// first request after every rebuild (when they were registered at compile time, doing it
/// per rebuild cost more than the rest of compiling a cluster-sized table).
#[derive(Debug, Default)]
pub struct TargetMetricsRegistry {
    map: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<TargetMetrics>>>,
}

impl TargetMetricsRegistry {
    /// The handles for this triple: those a table already holds, else new ones.
    pub fn get(&self, listener: &str, route: &str, backend: &str) -> std::sync::Arc<TargetMetrics> {
        let key = format!("{listener}\0{route}\0{backend}");
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return m;
        }
        let m = std::sync::Arc::new(TargetMetrics::new(listener, route, backend));
        map.insert(key, std::sync::Arc::downgrade(&m));
        m
    }

    /// Forgets handles no table holds.
    pub fn prune(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }
}

/// Handles for one (listener, route, backend) triple. The table holds one per route and
/// backend from compile time, but the series behind it are registered with the recorder on
/// the triple's first request: a cluster-sized table has tens of thousands of series, most
/// of them for routes that see little or no traffic, and the recorder's registry was a third
/// of a compiled table's memory.
#[derive(Debug)]
pub struct TargetMetrics {
    // Once set, a request's only extra cost is the acquire load that sees it is set.
    series: std::sync::OnceLock<Series>,
    listener: Box<str>,
    // Also kept for exported spans, which name the route and backend without the request
    // path cloning either name.
    route: Box<str>,
    backend: Box<str>,
}

#[derive(Debug)]
struct Series {
    by_class: [Counter; 5],
    duration: Histogram,
}

impl Series {
    fn register(listener: &str, route: &str, backend: &str) -> Self {
        let labels = [
            ("listener", listener.to_owned()),
            ("route", route.to_owned()),
            ("backend", backend.to_owned()),
        ];
        let class = |c: &'static str| {
            let mut l: Vec<(&'static str, String)> = labels.to_vec();
            l.push(("class", c.to_owned()));
            metrics::counter!(REQUESTS, &l)
        };
        Self {
            // All five classes at once, so a route that has had traffic shows a 0 for
            // the classes it has not answered with rather than no series.
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!(REQUEST_DURATION, &labels),
        }
    }
}

impl TargetMetrics {
    /// Handles for this triple; nothing is registered until [`TargetMetrics::record`].
    /// `backend` is empty for routes that answer themselves (redirects, direct responses,
    /// 404s).
    pub fn new(listener: &str, route: &str, backend: &str) -> Self {
        Self {
            series: std::sync::OnceLock::new(),
            listener: listener.into(),
            route: route.into(),
            backend: backend.into(),
        }
    }

    /// The route's name; empty for requests no route took.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The backend's name; empty for routes that answer themselves.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Handles that record nothing (dry-run compiles).
    pub fn noop() -> Self {
        Self {
            series: std::sync::OnceLock::from(Series {
                by_class: std::array::from_fn(|_| Counter::noop()),
                duration: Histogram::noop(),
            }),
            listener: Box::default(),
            route: Box::default(),
            backend: Box::default(),
        }
    }

    /// Counts one finished request, registering the triple's series on its first.
    pub fn record(&self, status: StatusCode, seconds: f64) {
        let series = self
            .series
            .get_or_init(|| Series::register(&self.listener, &self.route, &self.backend));
        let i = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        series.by_class[i].increment(1);
        series.duration.record(seconds);
    }
}
