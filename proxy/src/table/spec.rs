//! The configuration schema: plain serde types, exactly what a user writes in YAML.
//!
//! The data plane owns these types because it consumes them; sources (the static file now,
//! Kubernetes later) produce a [`Spec`] and hand it to [`crate::table::compile`].
//! Every struct denies unknown fields so that a typo is an error with a line number rather
//! than a silently ignored setting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Admin listener settings.
    #[serde(default)]
    pub admin: AdminSpec,
    /// Server-wide limits and timeouts for downstream connections.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Access log settings.
    #[serde(default)]
    pub access_log: AccessLogSpec,
    /// W3C trace context and span export.
    #[serde(default)]
    pub tracing: TracingSpec,
    /// Listeners, each with its own routes.
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    /// Named backends that routes forward to. Each is shared (`Arc`), so a configuration
    /// with one backend changed is a cheap copy of the last one.
    #[serde(default)]
    pub backends: Vec<Arc<BackendSpec>>,
    /// How backends given as DNS names are resolved.
    #[serde(default)]
    pub dns: DnsSpec,
    /// The Kubernetes source (Ingress controller); command-line flags override these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesSpec>,
}

/// Settings of the Kubernetes source. The data plane never reads them; they live in the
/// one configuration file so that a deployment can keep every setting in a ConfigMap.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSpec {
    /// Run as an Ingress controller (same as `--kubernetes`).
    pub enabled: bool,
    /// Address of the HTTP listener for Ingress routes.
    pub http_addr: String,
    /// Address of the HTTPS listener for Ingress routes (used once Ingress TLS is served).
    pub https_addr: String,
    /// Address of the listener that routes by Service name (`svc.ns:port`); off when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_addr: Option<String>,
    /// The cluster's DNS domain, for `svc.ns.svc.<domain>` names.
    pub cluster_domain: String,
    /// The IngressClass served.
    pub ingress_class: String,
    /// Namespaces watched; empty: all.
    pub watch_namespaces: Vec<String>,
    /// `namespace/name` of the Service whose load-balancer address goes into Ingress status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_service: Option<String>,
    /// Fixed addresses (IPs or hostnames) for Ingress status, instead of `publish_service`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publish_address: Vec<String>,
    /// Quiet time after a change before the table is rebuilt.
    #[serde(with = "duration")]
    pub debounce: Duration,
    /// Longest a rebuild waits after the first change while changes keep coming.
    #[serde(with = "duration")]
    pub max_delay: Duration,
    /// Serve Ingresses: watch IngressClasses, Ingresses and TLS Secrets, bind `http_addr`,
    /// elect a leader and write Ingress status. Off for a sidecar, which only routes by
    /// Service name and needs no more than Services and EndpointSlices.
    pub ingresses: bool,
    /// Settings of every route and backend made for routing by Service name.
    #[serde(skip_serializing_if = "ServiceDefaultsSpec::is_empty")]
    pub service_defaults: ServiceDefaultsSpec,
}

/// What the routes and backends of the Service-name listener get, since no Ingress
/// annotation can say it for them. Unset fields keep the defaults of the static schema.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceDefaultsSpec {
    /// Route timeout until the response headers.
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retries of every route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Circuit breaker of every backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Outlier detection of every backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierSpec>,
}

impl ServiceDefaultsSpec {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Whether backends change, which gives Service routes backends of their own.
    pub fn has_backend_settings(&self) -> bool {
        self.circuit_breaker.is_some() || self.outlier_detection.is_some()
    }
}

impl Default for KubernetesSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            http_addr: "0.0.0.0:8080".into(),
            https_addr: "0.0.0.0:8443".into(),
            service_addr: None,
            cluster_domain: "cluster.local".into(),
            ingress_class: "strait".into(),
            watch_namespaces: Vec::new(),
            publish_service: None,
            publish_address: Vec::new(),
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ingresses: true,
            service_defaults: ServiceDefaultsSpec::default(),
        }
    }
}

impl Spec {
    /// Files the configuration reads besides itself (certificates, keys, CA bundles): a
    /// change to any of them reloads the configuration, like a change to the file itself.
    pub fn referenced_files(&self) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for tls in self.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            for c in tls.certificates.iter().filter(|c| c.pem.is_none()) {
                files.push(c.cert.as_str());
                files.push(c.key.as_str());
                files.extend(c.client_auth.as_ref().map(|a| a.ca.as_str()));
            }
            files.extend(tls.client_auth.as_ref().map(|a| a.ca.as_str()));
        }
        for tls in self.backends.iter().filter_map(|b| b.tls.as_ref()) {
            files.extend(
                [&tls.ca, &tls.client_cert, &tls.client_key]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
        }
        let mut files: Vec<std::path::PathBuf> = files.into_iter().map(Into::into).collect();
        files.sort();
        files.dedup();
        files
    }
}

/// Resolver settings for backends given as `dns: name:port`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSpec {
    /// Nameservers (`ip` or `ip:port`, port 53 by default). Empty: the nameservers, search
    /// domains and `ndots` of `/etc/resolv.conf`, as a pod has them. When set, only the
    /// nameservers are replaced; search domains and options still come from resolv.conf.
    pub nameservers: Vec<String>,
    /// Shortest time between two lookups of a name, even when the records' TTL is shorter.
    #[serde(with = "duration")]
    pub min_refresh: Duration,
    /// Longest time between two lookups of a name, even when the records' TTL is longer.
    #[serde(with = "duration")]
    pub max_refresh: Duration,
    /// Time allowed for one query before it is retried or counted as failed.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Which records make endpoints: `any` (A and AAAA), `ipv4` (A) or `ipv6` (AAAA).
    pub ip_family: IpFamily,
}

impl Default for DnsSpec {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
            timeout: Duration::from_secs(2),
            ip_family: IpFamily::Any,
        }
    }
}

/// Address families looked up for DNS backends.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// A and AAAA records.
    #[default]
    Any,
    /// A records only.
    Ipv4,
    /// AAAA records only.
    Ipv6,
}

/// Admin listener settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Address of the admin listener (`/live`, `/ready`, `/metrics`, `/config`).
    #[serde(default = "default_admin_address")]
    pub address: String,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
        }
    }
}

fn default_admin_address() -> String {
    "127.0.0.1:9901".to_owned()
}

/// Limits for downstream connections. Every field has a safe default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSpec {
    /// Maximum concurrent downstream connections per listener; further connections wait in
    /// the kernel backlog.
    pub max_connections: usize,
    /// Maximum size of a request head (request line and headers) in bytes; larger heads get 431.
    pub max_request_header_bytes: usize,
    /// Maximum number of request headers (HTTP/1.1); more get 431.
    pub max_request_headers: usize,
    /// Time allowed to receive a complete request head. On HTTP/1.1 hyper starts this clock
    /// when the connection begins waiting for a request, so it also bounds keep-alive idling.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection with no bytes read or written for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Maximum concurrent HTTP/2 streams per downstream connection.
    pub max_concurrent_streams: u32,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before exit.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_request_header_bytes: 64 * 1024,
            max_request_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 256,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Access log settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogSpec {
    /// Write one line per request (to the log output, target `access`).
    pub enabled: bool,
}

impl Default for AccessLogSpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Trace context and span export. Every request carries W3C trace context upstream
/// whatever is set here; spans are exported only with an OTLP endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSpec {
    /// Base URL of an OTLP/HTTP collector (`http://collector:4318`, or `https://` with the
    /// system's roots or `OTEL_EXPORTER_OTLP_CERTIFICATE`; `/v1/traces` is appended). Read at startup; `--otlp-endpoint` and `OTEL_EXPORTER_OTLP_ENDPOINT` win.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
    /// Share of new traces (requests without a valid `traceparent`) marked sampled,
    /// from 0 to 1. A continued trace keeps the client's decision.
    pub sample_ratio: f64,
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "strait".into(),
            sample_ratio: 1.0,
        }
    }
}

/// Protocol a listener speaks.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port.
    #[default]
    Http,
    /// Raw TCP: every connection is relayed to one endpoint of the listener's backend.
    Tcp,
    /// HTTP/1.1 and HTTP/2 over TLS (ALPN), with certificates chosen by SNI.
    Https,
}

/// A listener: a bound address and the routes that serve it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Bind address, `ip:port`.
    pub address: String,
    /// Protocol: `http` (routes) or `tcp` (one backend, see `tcp`).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Where a `tcp` listener sends its connections; only for `protocol: tcp`.
    #[serde(default)]
    pub tcp: Option<TcpForwardSpec>,
    /// Routes, matched by host then path (see `docs/config.md` for precedence). Shared
    /// (`Arc`) so that a configuration with only backends changed does not copy them.
    #[serde(default)]
    pub routes: Arc<Vec<RouteSpec>>,
    /// Route used when no route matches (its `match` must be empty). Without it unmatched
    /// requests get 404.
    #[serde(default)]
    pub default_route: Option<RouteSpec>,
    /// Serve the routes (and default route) of this other listener, e.g. an `https`
    /// listener sharing the routes of the `http` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_from: Option<String>,
    /// Certificates and TLS settings of an `https` listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
}

/// TLS settings of an `https` listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSpec {
    /// Certificates, chosen by the name the client asks for (SNI).
    pub certificates: Vec<CertificateSpec>,
    /// Oldest TLS version accepted: `"1.2"` or `"1.3"`.
    #[serde(default = "default_min_tls")]
    pub min_version: String,
    /// Protocols offered by ALPN, in order of preference (`h2`, `http/1.1`).
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Client certificates (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthSpec>,
    /// `Strict-Transport-Security` on every response of the listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<HstsSpec>,
}

impl ListenerTlsSpec {
    /// These certificates with the default settings (TLS 1.2 and 1.3, ALPN h2 then
    /// http/1.1, no client certificates, no HSTS).
    pub fn new(certificates: Vec<CertificateSpec>) -> Self {
        Self {
            certificates,
            min_version: default_min_tls(),
            alpn: default_alpn(),
            client_auth: None,
            hsts: None,
        }
    }
}

fn default_min_tls() -> String {
    "1.2".to_owned()
}

fn default_alpn() -> Vec<String> {
    vec!["h2".to_owned(), "http/1.1".to_owned()]
}

/// One certificate of an `https` listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// PEM chain, leaf first.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// Names it serves (`a.example.com`, `*.example.com`); default: its DNS names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Served to clients without SNI or asking for an unknown name (default: the first).
    #[serde(default)]
    pub default: bool,
    /// Client certificate settings for the names of this certificate, instead of the
    /// listener's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthSpec>,
    /// The PEM itself, when a source holds it in memory (a Kubernetes Secret) rather than in
    /// files; `cert` and `key` then only say where it came from. Never read from a config
    /// file and never written out (`/config`), so a private key does not leave the process.
    #[serde(skip)]
    pub pem: Option<Arc<PemPair>>,
}

/// A certificate chain and its private key, in PEM, held in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    /// PEM chain, leaf first.
    pub cert: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PemPair {
    // A table is logged with `{:?}` in places; the key must not end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_bytes", &self.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Client certificate verification.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthSpec {
    /// PEM bundle of the CAs that sign accepted client certificates.
    pub ca: String,
    /// Refuse clients without a certificate (else they are let through without identity).
    #[serde(default = "yes")]
    pub required: bool,
    /// Request header carrying the verified identity upstream (the certificate's first
    /// URI or DNS name, else its subject). A client-sent header of that name is removed.
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
}

fn yes() -> bool {
    true
}

fn default_identity_header() -> String {
    "x-client-identity".to_owned()
}

/// HTTP Strict Transport Security.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HstsSpec {
    /// How long browsers remember to use HTTPS only.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// Also for every subdomain.
    #[serde(default)]
    pub include_subdomains: bool,
    /// Ask to be on browsers' preload lists.
    #[serde(default)]
    pub preload: bool,
}

/// The backend of a `tcp` listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpForwardSpec {
    /// Backend name; each connection goes to one of its endpoints. With `sni`, the backend
    /// for connections whose server name no entry lists (optional then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// TLS passthrough: pick the backend by the server name (SNI) of the client's TLS
    /// ClientHello, without terminating TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<Vec<SniRouteSpec>>,
    /// A connection on which no byte moves in either direction for this long is closed.
    /// Database and message-queue clients keep idle connections for long, so the default is
    /// long too (Envoy's TCP proxy also uses one hour).
    #[serde(default = "default_tcp_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
}

/// One TLS passthrough rule: connections whose SNI is one of `hosts` go to `backend`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniRouteSpec {
    /// Server names: exact (`db.example.com`) or a one-label wildcard (`*.example.com`).
    pub hosts: Vec<String>,
    /// Backend name.
    pub backend: String,
}

fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// A route: a match and an action. The sections few routes set are boxed (the YAML and JSON
/// forms are the same): a cluster's controller holds tens of thousands of routes, and
/// inline they made every route about 700 bytes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Name used in metrics and logs; defaults to `<listener>/<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// What requests this route takes.
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    /// Forward to a backend, or split across several.
    #[serde(default)]
    pub forward: Option<ForwardSpec>,
    /// Answer with a redirect.
    #[serde(default)]
    pub redirect: Option<Box<RedirectSpec>>,
    /// Answer with a fixed response.
    #[serde(default)]
    pub direct_response: Option<Box<DirectResponseSpec>>,
    /// Time allowed until the upstream's response headers arrive (`0s` disables; default 15s).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Retries of failed attempts (forward routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Box<RetrySpec>>,
    /// Header changes applied to the request sent upstream.
    #[serde(default)]
    pub request_headers: HeaderOpsSpec,
    /// Header changes applied to the response sent downstream.
    #[serde(default)]
    pub response_headers: HeaderOpsSpec,
    /// Replace the matched path prefix with this one before forwarding.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Local token-bucket limit on this route's requests; over it they get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Box<RateLimitSpec>>,
}

impl RouteSpec {
    /// A route forwarding `matches` to one backend, every other setting at its default.
    pub fn forward(
        name: impl Into<String>,
        matches: MatchSpec,
        backend: impl Into<String>,
    ) -> Self {
        Self {
            name: Some(name.into()),
            matches,
            forward: Some(ForwardSpec {
                backend: Some(backend.into()),
                backends: Vec::new(),
            }),
            redirect: None,
            direct_response: None,
            timeout: None,
            retry: None,
            request_headers: HeaderOpsSpec::default(),
            response_headers: HeaderOpsSpec::default(),
            rewrite_prefix: None,
            rate_limit: None,
        }
    }
}

/// A route's rate limit: a token bucket of `burst` tokens, refilled with `requests` tokens
/// per `per`, for the whole route or per key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Tokens added per `per`.
    pub requests: u32,
    /// The period of `requests`.
    #[serde(with = "duration")]
    pub per: Duration,
    /// Bucket size: requests allowed at once after a quiet period. Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// What gets its own bucket: `none` (the route), `client_ip` or `{header: NAME}`.
    #[serde(default)]
    pub key: RateLimitKeySpec,
    /// Also send `RateLimit-Policy` and `RateLimit` on allowed responses (429s always have
    /// them).
    #[serde(default)]
    pub response_headers: bool,
    /// Most keys tracked at once (keyed limits only); default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
}

/// What a rate limit keys its buckets by: `none`, `client_ip` or `{header: NAME}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "none, client_ip or {header: NAME}"
)]
pub enum RateLimitKeySpec {
    /// A named source without argument.
    Source(RateLimitSource),
    /// The value of this request header.
    Header {
        /// Header name.
        header: String,
    },
}

impl Default for RateLimitKeySpec {
    fn default() -> Self {
        Self::Source(RateLimitSource::Route)
    }
}

/// Rate-limit keys that take no argument.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitSource {
    /// One bucket for the whole route (written `none`).
    #[serde(rename = "none")]
    Route,
    /// One bucket per client IP.
    ClientIp,
}

/// Request matching. All given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Hosts: exact (`api.example.com`) or a single-label wildcard (`*.example.com`).
    /// Empty means any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefix, matched element by element (`/foo` matches `/foo/bar`, not `/foobar`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Exact path.
    #[serde(default)]
    pub exact: Option<String>,
    /// Allowed methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
    /// The port the request's host must name (`Host: api.internal:8080`, or the
    /// `:authority` of HTTP/2); a host without a port does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A header condition: the header is present, and equals `value` when given.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value; absent means "header present with any value".
    #[serde(default)]
    pub value: Option<String>,
}

/// Where a route forwards.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// A single backend.
    #[serde(default)]
    pub backend: Option<String>,
    /// Weighted backends (traffic split).
    #[serde(default)]
    pub backends: Vec<WeightedBackendSpec>,
}

/// One side of a traffic split.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedBackendSpec {
    /// Backend name.
    pub name: String,
    /// Relative weight (0 takes no traffic).
    pub weight: u32,
}

/// A redirect answer. Unset parts keep the request's values.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host to redirect to.
    #[serde(default)]
    pub host: Option<String>,
    /// Port to redirect to.
    #[serde(default)]
    pub port: Option<u16>,
    /// Path to redirect to (the query string is kept).
    #[serde(default)]
    pub path: Option<String>,
    /// 301, 302, 303, 307 or 308; default 301.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    301
}

/// A fixed response.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    /// Status code.
    pub status: u16,
    /// Body.
    #[serde(default)]
    pub body: String,
    /// Response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Header changes: `remove` first, then `set` (replace), then `add` (append).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    /// Appended values.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Replaced values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Removed headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A named set of endpoints and how to reach them. Rarely set sections are boxed, as in
/// [`RouteSpec`], for a cluster's thousands of Service backends.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Unique name.
    pub name: String,
    /// Endpoints, `ip:port` or `{address, weight}`.
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    /// Instead of `endpoints`: a DNS name and port (`name:port`). Every A/AAAA record of the
    /// answer becomes an endpoint, refreshed in the background as the records' TTL expires.
    #[serde(default)]
    pub dns: Option<String>,
    /// Load-balancing policy.
    #[serde(default)]
    pub policy: Policy,
    /// Hash key for `ring_hash` and `maglev`.
    #[serde(default)]
    pub hash: Option<Box<HashKeySpec>>,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// TCP connect timeout; it bounds the TLS handshake too (separately).
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// TLS to the endpoints (`http1` and `h2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<UpstreamTlsSpec>>,
    /// Keep-alive pool limits.
    #[serde(default)]
    pub pool: PoolSpec,
    /// Limits past which requests fail fast with 503 instead of queueing.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// Passive health: eject endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Box<OutlierSpec>>,
    /// Active health checks of every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<HealthCheckSpec>>,
    /// When fewer than this percentage of endpoints are available (not ejected, passing
    /// health checks), health is ignored and requests go to every endpoint: better some
    /// errors than refusing everything (Envoy's healthy panic threshold).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
}

impl BackendSpec {
    /// A backend with these endpoints and every other setting at its default, for sources
    /// that build configurations in code (Kubernetes).
    pub fn new(name: impl Into<String>, endpoints: Vec<EndpointSpec>) -> Self {
        Self {
            name: name.into(),
            endpoints,
            dns: None,
            policy: Policy::default(),
            hash: None,
            protocol: UpstreamProtocol::default(),
            connect_timeout: default_connect_timeout(),
            tls: None,
            pool: PoolSpec::default(),
            circuit_breaker: CircuitBreakerSpec::default(),
            outlier_detection: None,
            health_check: None,
            panic_threshold: default_panic_threshold(),
        }
    }
}

fn default_panic_threshold() -> u32 {
    50
}

/// Per-backend limits, checked before a request is sent (Envoy's circuit breaker
/// thresholds, with Envoy's defaults).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerSpec {
    /// Open upstream connections (`http1` backends).
    pub max_connections: u32,
    /// Requests waiting for a connection while `max_connections` are open (`http1`).
    pub max_pending_requests: u32,
    /// Requests in flight to the backend.
    pub max_requests: u32,
    /// Retries in flight to the backend; replaced by `retry_budget` when that is set.
    pub max_retries: u32,
    /// Retries in flight at most this share of the requests in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// A retry budget: concurrent retries at most `percent` of the requests in flight, and
/// always at least `min_concurrency`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetSpec {
    /// Share of the requests in flight, 0 to 100.
    pub percent: u32,
    /// Retries always allowed, whatever the load.
    pub min_concurrency: u32,
}

impl Default for RetryBudgetSpec {
    fn default() -> Self {
        Self {
            percent: 20,
            min_concurrency: 3,
        }
    }
}

/// Outlier detection: consecutive failures eject an endpoint for a while.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierSpec {
    /// Consecutive 5xx answers or connect failures that eject an endpoint (0: off).
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors (502, 503, 504, connect failures and timeouts) that eject
    /// an endpoint (0: off).
    pub consecutive_gateway_errors: u32,
    /// The first ejection lasts this long; each further one lasts this times its number.
    #[serde(with = "duration")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(with = "duration")]
    pub max_ejection_time: Duration,
    /// Most endpoints ejected at once, in percent of the backend (at least one).
    pub max_ejection_percent: u32,
}

impl Default for OutlierSpec {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Active health checks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// An HTTP/1.1 request; passes on an expected status. Exactly one of `http`, `tcp`,
    /// `grpc` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheckSpec>,
    /// A TCP connect; passes when it is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheckSpec>,
    /// grpc.health.v1 `Check` over h2c; passes on `SERVING`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheckSpec>,
    /// Time between two checks of an endpoint.
    #[serde(default = "default_hc_interval", with = "duration")]
    pub interval: Duration,
    /// Time allowed for one check.
    #[serde(default = "default_hc_timeout", with = "duration")]
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy endpoint healthy.
    #[serde(default = "default_hc_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    #[serde(default = "default_hc_threshold")]
    pub unhealthy_threshold: u32,
    /// Each interval is stretched by a random share up to this, so checks spread out.
    #[serde(default = "default_hc_jitter", with = "duration")]
    pub jitter: Duration,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_hc_threshold() -> u32 {
    2
}

fn default_hc_jitter() -> Duration {
    Duration::from_millis(500)
}

/// An HTTP health check.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheckSpec {
    /// Request path.
    pub path: String,
    /// Request method.
    #[serde(default = "default_hc_method")]
    pub method: String,
    /// `Host` header; the endpoint's address when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Statuses that pass, as `[low, high]` inclusive.
    #[serde(default = "default_hc_statuses")]
    pub expected_statuses: [u16; 2],
}

fn default_hc_method() -> String {
    "GET".to_owned()
}

fn default_hc_statuses() -> [u16; 2] {
    [200, 399]
}

/// A TCP connect health check.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheckSpec {}

/// A gRPC health check (grpc.health.v1).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheckSpec {
    /// The service name asked about; empty asks about the server as a whole.
    #[serde(default)]
    pub service: String,
}

/// Retries of a forward route.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySpec {
    /// Most retries after the first attempt.
    pub retries: u32,
    /// Retry when the connection to the endpoint failed or timed out (any method: the
    /// endpoint never saw the request).
    pub on_connect_failure: bool,
    /// Retry on these response statuses (idempotent methods only, unless `non_idempotent`).
    pub statuses: Vec<u16>,
    /// Retry on these gRPC statuses, read from `grpc-status` in the response headers.
    pub grpc_statuses: Vec<GrpcCode>,
    /// Also retry POST and PATCH on statuses (never safe in general; only for endpoints
    /// known to be idempotent).
    pub non_idempotent: bool,
    /// Time allowed for each attempt's response headers; the route `timeout` bounds them all.
    #[serde(with = "opt_duration", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// First backoff before a retry; doubled each retry, with full jitter.
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    /// Longest backoff.
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// Request bodies up to this size are kept to be sent again; larger ones are not retried.
    pub buffer_bytes: usize,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            retries: 2,
            on_connect_failure: true,
            statuses: Vec::new(),
            grpc_statuses: Vec::new(),
            non_idempotent: false,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            buffer_bytes: 64 * 1024,
        }
    }
}

/// gRPC status codes by name, as in the gRPC spec (`grpc-status` values 1 to 16).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum GrpcCode {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

/// An endpoint: `ip:port`, or a map with a weight.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "an endpoint: \"ip:port\" or {address: \"ip:port\", weight: N}"
)]
pub enum EndpointSpec {
    /// `ip:port`, weight 1.
    Address(String),
    /// `{address: ip:port, weight: N}`.
    Weighted {
        /// `ip:port`.
        address: String,
        /// Relative weight, 1 to 10000.
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

impl EndpointSpec {
    /// The `ip:port` text.
    pub fn address(&self) -> &str {
        match self {
            Self::Address(a) | Self::Weighted { address: a, .. } => a,
        }
    }

    /// The weight (1 when not given).
    pub fn weight(&self) -> u32 {
        match self {
            Self::Address(_) => 1,
            Self::Weighted { weight, .. } => *weight,
        }
    }
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Power of two choices on peak-EWMA latency times load.
    PeakEwma,
    /// Weighted random.
    Random,
    /// Consistent hashing on a ring (Ketama).
    RingHash,
    /// Maglev consistent hashing.
    Maglev,
}

/// What a consistent-hash policy hashes: `client_ip`, `{header: NAME}` or `{cookie: NAME}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "client_ip, {header: NAME} or {cookie: NAME}"
)]
pub enum HashKeySpec {
    /// A named source without argument.
    Source(HashSource),
    /// The value of this request header.
    Header {
        /// Header name.
        header: String,
    },
    /// The value of this cookie.
    Cookie {
        /// Cookie name.
        cookie: String,
    },
}

/// Hash sources that take no argument.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HashSource {
    /// The client's IP address.
    ClientIp,
}

/// Upstream protocol.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive pooling (over TLS when the backend has `tls`).
    #[default]
    Http1,
    /// HTTP/2 cleartext with prior knowledge; one multiplexed connection per endpoint.
    H2c,
    /// HTTP/2 over TLS, agreed with ALPN; one multiplexed connection per endpoint. Needs `tls`.
    H2,
}

/// TLS from Strait to a backend's endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// The server name sent in SNI and checked against the certificate. Default: the host
    /// name of a `dns` backend; required for `endpoints` (addresses carry no name) unless
    /// `insecure_skip_verify` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM file of the CA certificates that may sign the endpoints' certificates. Absent:
    /// the operating system's trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// PEM certificate chain Strait presents to the endpoints (mutual TLS); with `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// Accept any certificate from the endpoints: no chain and no name check. Anyone on
    /// the path can then read and change the traffic. Logged as a warning at every load.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Keep-alive pool limits per endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSpec {
    /// Idle keep-alive connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Idle connections are closed after this long.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for PoolSpec {
    fn default() -> Self {
        Self {
            max_idle_per_endpoint: 128,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Durations as human strings (`250ms`, `15s`, `2m`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize as a human string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Parse a human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (expected e.g. 250ms, 15s, 2m)"
            ))
        })
    }
}

/// Optional durations as human strings.
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Serialize as a human string.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Parse a human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}
