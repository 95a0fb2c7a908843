//! Cluster objects -> routes and backends, in Strait's own configuration schema.
//!
//! Pure: reads a [`Cluster`], returns a [`Translation`]. Each Ingress is checked on its own,
//! and one with a problem (missing Service or port, bad path, bad annotation) is left out
//! whole and reported; everything else applies. Conflicts between Ingresses for the same
//! host and path go to the oldest (then namespace/name), and the others are reported.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressServiceBackend};
use std::time::Duration;

use strait_proxy::table::spec::{
    BackendSpec, CertificateSpec, EndpointSpec, ListenerProtocol, ListenerSpec, MatchSpec,
    OutlierSpec, Policy, RedirectSpec, RouteSpec, ServiceDefaultsSpec, TcpForwardSpec,
    UpstreamProtocol,
};

use super::annotations::{self, IngressSettings};
use super::certs::{self, CertState, SecretCerts};
use super::cluster::{Cluster, Key, Svc, SvcPort};

/// The controller name an IngressClass must have for Strait to serve its Ingresses.
pub const CONTROLLER: &str = "strait.io/ingress-controller";
/// Marks an IngressClass as the cluster default, for Ingresses without a class.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The class annotation from before `ingressClassName` existed, still widely used.
pub const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// What to translate.
#[derive(Debug, Clone)]
pub struct TranslateOptions {
    /// The IngressClass this Strait serves.
    pub ingress_class: String,
    /// The controller name that class must carry.
    pub controller: String,
    /// Routes by Service name too (see [`service_routes`]).
    pub service_routing: Option<ServiceRouting>,
    /// The address TCP services listen on (with their annotation's port).
    pub tcp_ip: String,
    /// Ports Strait's listeners take, with which listener: a TCP service asking for one of
    /// them is reported instead of failing to bind. Filled by the controller.
    pub reserved_ports: Vec<(u16, String)>,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            ingress_class: "strait".into(),
            controller: CONTROLLER.into(),
            service_routing: None,
            tcp_ip: "0.0.0.0".into(),
            reserved_ports: Vec::new(),
        }
    }
}

/// Service annotation: accept raw TCP on this port and relay it to the Service.
pub const TCP_PORT_ANNOTATION: &str = "strait.io/tcp-port";
/// Service annotation: which Service port TCP connections go to (number or name), when the
/// Service has several.
pub const TCP_SERVICE_PORT_ANNOTATION: &str = "strait.io/tcp-service-port";

/// How Service DNS names are written.
#[derive(Debug, Clone)]
pub struct ServiceRouting {
    /// The namespace a bare `svc` means (the namespace Strait runs in, as for a pod's own
    /// DNS search path).
    pub namespace: String,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// Settings of every route and backend made here.
    pub defaults: ServiceDefaultsSpec,
}

/// Why an Ingress (or part of it) is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The Ingress.
    pub ingress: Key,
    /// A short CamelCase reason, as Kubernetes Events carry.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A Service Strait cannot serve as asked by its annotations (a TCP service), reported as
/// an Event on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceProblem {
    /// The Service.
    pub service: Key,
    /// A short CamelCase reason, as Kubernetes Events carry.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Where a backend's endpoints come from, so an EndpointSlice change can recompute just
/// the backends of its Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSource {
    /// The Service.
    pub service: Key,
    /// The name of the Service port (empty for an unnamed single port).
    pub port_name: String,
}

/// The result of a translation.
#[derive(Debug, Default, Clone)]
pub struct Translation {
    /// Routes of the Ingresses, as the HTTPS listener serves them, and the HTTP listener
    /// too unless [`Translation::http_routes`] is set.
    pub routes: Arc<Vec<RouteSpec>>,
    /// Routes for the HTTP listener when some of them redirect to HTTPS (hosts with a
    /// certificate, `ssl-redirect` not turned off): the same routes, those redirecting.
    pub http_routes: Option<Arc<Vec<RouteSpec>>>,
    /// Certificates of the Ingresses' `tls` sections, oldest Ingress first (so its
    /// certificate wins a name two Ingresses claim, and is the default).
    pub certificates: Vec<CertificateSpec>,
    /// The Ingress each of `certificates` came from.
    pub certificate_owners: Vec<Key>,
    /// Routes by Service name, for the Service listener (when enabled).
    pub service_routes: Arc<Vec<RouteSpec>>,
    /// `tcp` listeners of Services annotated with [`TCP_PORT_ANNOTATION`].
    pub tcp_listeners: Vec<ListenerSpec>,
    /// The listener's default route, from the oldest Ingress with a `defaultBackend`.
    pub default_route: Option<RouteSpec>,
    /// Backends the routes use, sorted by name.
    pub backends: Vec<Arc<BackendSpec>>,
    /// Where each Service backend's endpoints come from, by backend name.
    pub sources: BTreeMap<String, EndpointSource>,
    /// Ingresses of our class that apply (maybe partly, after conflicts).
    pub served: Vec<Key>,
    /// Problems, per Ingress.
    pub problems: Vec<Problem>,
    /// Problems of Services (their TCP service annotations).
    pub service_problems: Vec<ServiceProblem>,
    /// The Ingress each route came from, by route name.
    pub owners: HashMap<String, Key>,
}

/// Translates every Ingress of our class. `excluded` Ingresses are left out (with their
/// problem already known), as when the proxy's compiler rejected what they produced.
pub fn translate(
    cluster: &Cluster,
    options: &TranslateOptions,
    excluded: &HashMap<Key, Problem>,
    certs: &SecretCerts,
) -> Translation {
    let mut out = Translation::default();
    let mut routes = Vec::new();
    // Which of `routes` the HTTP listener answers with a redirect to HTTPS.
    let mut redirects: Vec<bool> = Vec::new();
    let mut ours: Vec<(&Key, &Ingress)> = cluster
        .ingresses
        .iter()
        .filter(|(_, ing)| is_ours(cluster, options, ing))
        .map(|(k, ing)| (k, &**ing))
        .collect();
    // Oldest first, then namespace/name: the order in which conflicts are won.
    ours.sort_by(|(ka, a), (kb, b)| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| ka.cmp(kb))
    });
    let mut backends: BTreeMap<String, BackendSpec> = BTreeMap::new();
    // (host, exact?, path) -> the Ingress that has it.
    let mut taken: HashMap<(String, bool, String), Key> = HashMap::new();
    let mut default_owner: Option<Key> = None;

    for (key, ing) in ours {
        if let Some(p) = excluded.get(key) {
            out.problems.push(p.clone());
            continue;
        }
        match translate_ingress(cluster, key, ing, certs) {
            Ok(t) => {
                let mut applied = 0;
                for (conflict_key, route) in t.routes {
                    if let Some(owner) = taken.get(&conflict_key) {
                        out.problems.push(Problem {
                            ingress: key.clone(),
                            reason: "Conflict",
                            message: format!(
                                "host {:?} path {:?} is already served by Ingress {owner} \
                                 (older, or first by namespace/name); this path is ignored",
                                or_any(&conflict_key.0),
                                conflict_key.2
                            ),
                        });
                        continue;
                    }
                    redirects.push(t.redirect && covers(&t.tls_hosts, &conflict_key.0));
                    taken.insert(conflict_key, key.clone());
                    out.owners
                        .insert(route.name.clone().unwrap_or_default(), key.clone());
                    routes.push(route);
                    applied += 1;
                }
                if let Some(route) = t.default_route {
                    match &default_owner {
                        Some(owner) => out.problems.push(Problem {
                            ingress: key.clone(),
                            reason: "Conflict",
                            message: format!(
                                "defaultBackend is already set by Ingress {owner}; this one \
                                 is ignored"
                            ),
                        }),
                        None => {
                            default_owner = Some(key.clone());
                            out.owners
                                .insert(route.name.clone().unwrap_or_default(), key.clone());
                            out.default_route = Some(route);
                            applied += 1;
                        }
                    }
                }
                for (b, source) in t.backends {
                    if let Some(s) = source {
                        out.sources.insert(b.name.clone(), s);
                    }
                    backends.entry(b.name.clone()).or_insert(b);
                }
                out.problems.extend(t.warnings);
                out.certificate_owners
                    .extend(t.certificates.iter().map(|_| key.clone()));
                out.certificates.extend(t.certificates);
                if applied > 0 || t.empty {
                    out.served.push(key.clone());
                }
            }
            Err(p) => out.problems.push(p),
        }
    }
    if redirects.contains(&true) {
        let http = routes
            .iter()
            .zip(&redirects)
            .map(
                |(r, redirect)| {
                    if *redirect {
                        to_https(r)
                    } else {
                        r.clone()
                    }
                },
            )
            .collect();
        out.http_routes = Some(Arc::new(http));
    }
    out.routes = Arc::new(routes);
    if let Some(sr) = &options.service_routing {
        let mut routes = Vec::new();
        for (key, svc) in &cluster.services {
            service_routes(
                cluster,
                sr,
                key,
                svc,
                &mut routes,
                &mut backends,
                &mut out.sources,
            );
        }
        out.service_routes = Arc::new(routes);
    }
    let mut ports: HashMap<u16, String> = options.reserved_ports.iter().cloned().collect();
    for (key, svc) in &cluster.services {
        match tcp_service(cluster, options, key, svc, &mut ports) {
            Ok(Some((listener, backend, source))) => {
                out.sources.insert(backend.name.clone(), source);
                backends.insert(backend.name.clone(), backend);
                out.tcp_listeners.push(listener);
            }
            Ok(None) => {}
            Err(message) => out.service_problems.push(ServiceProblem {
                service: key.clone(),
                reason: "TCPServiceNotServed",
                message,
            }),
        }
    }
    out.backends = backends.into_values().map(Arc::new).collect();
    out
}

/// Whether Strait serves this Ingress: its class names our IngressClass (which must carry
/// our controller), or it has no class and ours is the cluster default.
pub fn is_ours(cluster: &Cluster, options: &TranslateOptions, ing: &Ingress) -> bool {
    let class = cluster.classes.get(&options.ingress_class).filter(|c| {
        c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(&options.controller)
    });
    let Some(class) = class else {
        return false;
    };
    let named = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref());
    let legacy = ing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION))
        .map(String::as_str);
    match named.or(legacy) {
        Some(name) => name == options.ingress_class,
        None => class
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|v| v == "true"),
    }
}

/// One Ingress, translated: its routes keyed for conflict detection, its backends.
struct IngressRoutes {
    routes: Vec<((String, bool, String), RouteSpec)>,
    default_route: Option<RouteSpec>,
    backends: Vec<(BackendSpec, Option<EndpointSource>)>,
    /// Problems that do not keep the Ingress out (a `tls` entry without a usable
    /// certificate).
    warnings: Vec<Problem>,
    /// Certificates of its `tls` section that can be served.
    certificates: Vec<CertificateSpec>,
    /// Hosts those certificates are for (empty: every host of the Ingress).
    tls_hosts: Vec<String>,
    /// Plain-HTTP requests for `tls_hosts` are redirected to HTTPS.
    redirect: bool,
    /// It has neither rules with paths nor a default backend.
    empty: bool,
}

fn translate_ingress(
    cluster: &Cluster,
    key: &Key,
    ing: &Ingress,
    certs: &SecretCerts,
) -> Result<IngressRoutes, Problem> {
    let problem = |reason, message: String| Problem {
        ingress: key.clone(),
        reason,
        message,
    };
    let settings = match ing.metadata.annotations.as_ref() {
        Some(a) => annotations::parse(a).map_err(|errors| {
            let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
            problem("InvalidAnnotation", list.join("; "))
        })?,
        None => IngressSettings::default(),
    };
    let mut out = IngressRoutes {
        routes: Vec::new(),
        default_route: None,
        backends: Vec::new(),
        warnings: Vec::new(),
        certificates: Vec::new(),
        tls_hosts: Vec::new(),
        redirect: false,
        empty: false,
    };
    let Some(spec) = &ing.spec else {
        out.empty = true;
        return Ok(out);
    };
    let mut backend_for = |b: &IngressBackend, path: &str| -> Result<String, Problem> {
        let svc = match (&b.service, &b.resource) {
            (Some(s), _) => s,
            (None, Some(r)) => {
                return Err(problem(
                    "UnsupportedBackend",
                    format!(
                        "{path}: resource backends ({} {}) are not supported; use a Service",
                        r.kind, r.name
                    ),
                ))
            }
            (None, None) => {
                return Err(problem(
                    "InvalidBackend",
                    format!("{path}: backend names no Service"),
                ))
            }
        };
        let (mut backend, source) = service_backend(cluster, &key.namespace, svc)
            .map_err(|m| problem("BackendNotFound", format!("{path}: {m}")))?;
        if settings.has_backend_settings() {
            // The Ingress's own settings for a Service another Ingress may use plainly.
            backend.name = format!("{}@{}", backend.name, key);
            settings.apply_backend(&mut backend);
        }
        let name = backend.name.clone();
        if !out.backends.iter().any(|(b, _)| b.name == name) {
            out.backends.push((backend, source));
        }
        Ok(name)
    };

    if let Some(b) = &spec.default_backend {
        let backend = backend_for(b, "defaultBackend")?;
        let mut route = RouteSpec::forward(format!("{key}/default"), MatchSpec::default(), backend);
        settings.apply_route(&mut route);
        out.default_route = Some(route);
    }
    let mut any_path = false;
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let host = rule.host.clone().unwrap_or_default();
        let Some(http) = &rule.http else {
            continue;
        };
        for (j, p) in http.paths.iter().enumerate() {
            any_path = true;
            let at = format!("rules[{i}].http.paths[{j}]");
            let raw = p.path.as_deref().unwrap_or("/");
            if !raw.starts_with('/') {
                return Err(problem(
                    "InvalidPath",
                    format!("{at}: path {raw:?} must start with '/'"),
                ));
            }
            let exact = match p.path_type.as_str() {
                "Exact" => true,
                // ImplementationSpecific: Strait's own choice is element-wise prefix
                // matching, the same as Prefix (docs/kubernetes.md).
                "Prefix" | "ImplementationSpecific" => false,
                other => {
                    return Err(problem(
                        "InvalidPath",
                        format!(
                            "{at}: pathType {other:?} is not one of Exact, Prefix, \
                             ImplementationSpecific"
                        ),
                    ))
                }
            };
            let path = if exact {
                raw.to_owned()
            } else {
                // `/foo/` and `/foo` are the same prefix under element-wise matching.
                let trimmed = raw.trim_end_matches('/');
                if trimmed.is_empty() { "/" } else { trimmed }.to_owned()
            };
            let backend = backend_for(&p.backend, &at)?;
            let matches = MatchSpec {
                hosts: if host.is_empty() {
                    Vec::new()
                } else {
                    vec![host.clone()]
                },
                prefix: (!exact).then(|| path.clone()),
                exact: exact.then(|| path.clone()),
                methods: Vec::new(),
                headers: Vec::new(),
                port: None,
            };
            let mut route = RouteSpec::forward(format!("{key}/{i}/{j}"), matches, backend);
            settings.apply_route(&mut route);
            out.routes.push(((host.clone(), exact, path), route));
        }
    }
    out.empty = !any_path && out.default_route.is_none();
    for (i, tls) in spec.tls.iter().flatten().enumerate() {
        // Without a Secret the hosts get the listener's default certificate.
        let Some(secret) = tls.secret_name.as_deref() else {
            continue;
        };
        let pem = match certs.get(&key.namespace, secret) {
            CertState::Valid(pem) => pem,
            CertState::Stale(pem, why) => {
                out.warnings.push(problem(
                    "InvalidTLS",
                    format!("tls[{i}]: {why}; the Secret's previous certificate stays in force"),
                ));
                pem
            }
            CertState::Unusable(why) => {
                out.warnings.push(problem(
                    "InvalidTLS",
                    format!("tls[{i}]: {why}; these hosts are not served over HTTPS"),
                ));
                continue;
            }
        };
        let hosts: Vec<String> = tls
            .hosts
            .iter()
            .flatten()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        if hosts.is_empty() {
            // Every host of the Ingress: an empty entry covers all.
            out.tls_hosts.clear();
            out.tls_hosts.push(String::new());
        } else if out.tls_hosts != [""] {
            out.tls_hosts.extend(hosts.iter().cloned());
        }
        let secret_key = Key::new(&key.namespace, secret);
        out.certificates.push(CertificateSpec {
            cert: certs::label(&secret_key, "tls.crt"),
            key: certs::label(&secret_key, "tls.key"),
            hosts,
            default: false,
            client_auth: None,
            pem: Some(pem),
        });
    }
    out.redirect = !out.certificates.is_empty() && settings.ssl_redirect != Some(false);
    Ok(out)
}

/// Whether a route for `host` is under one of `tls_hosts` (`""` there: every host; a
/// `*.suffix` entry covers one label below the suffix, as certificates do).
fn covers(tls_hosts: &[String], host: &str) -> bool {
    tls_hosts.iter().any(|t| {
        t.is_empty()
            || t == host
            || t.strip_prefix("*.").is_some_and(|suffix| {
                host.split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix)
            })
    })
}

/// The plain-HTTP form of a route whose host has a certificate: a permanent redirect to the
/// same URL over HTTPS (308, so methods and bodies are kept; the default port, as the
/// cluster's entry point maps 443 to the HTTPS listener).
fn to_https(route: &RouteSpec) -> RouteSpec {
    let mut r = RouteSpec::forward(
        route.name.clone().unwrap_or_default(),
        route.matches.clone(),
        String::new(),
    );
    r.forward = None;
    r.redirect = Some(Box::new(RedirectSpec {
        scheme: Some("https".into()),
        host: None,
        port: None,
        path: None,
        status: 308,
    }));
    r
}

/// The backend for a Service port, named `namespace/service:port`, with its endpoints.
pub fn service_backend(
    cluster: &Cluster,
    namespace: &str,
    b: &IngressServiceBackend,
) -> Result<(BackendSpec, Option<EndpointSource>), String> {
    let key = Key::new(namespace, &b.name);
    let Some(svc) = cluster.services.get(&key) else {
        return Err(format!("Service {key} does not exist"));
    };
    let wanted = b.port.as_ref();
    let number = wanted.and_then(|p| p.number);
    let port_name = wanted.and_then(|p| p.name.as_deref());
    if svc.type_.as_deref() == Some("ExternalName") {
        let target = svc.external_name.as_deref().unwrap_or("");
        let port = number
            .or_else(|| {
                let p = find_port(svc, None, port_name)?;
                Some(p.port)
            })
            .ok_or_else(|| {
                format!("ExternalName Service {key} needs a port number in the Ingress backend")
            })?;
        let mut backend = BackendSpec::new(format!("{key}:{port}"), Vec::new());
        backend.dns = Some(format!("{target}:{port}"));
        return Ok((backend, None));
    }
    let Some(port) = find_port(svc, number, port_name) else {
        let what = number.map_or_else(
            || format!("{:?}", port_name.unwrap_or("")),
            |n| n.to_string(),
        );
        return Err(format!("Service {key} has no port {what}"));
    };
    let source = EndpointSource {
        service: key.clone(),
        port_name: port.name.clone().unwrap_or_default(),
    };
    let mut backend = BackendSpec::new(
        format!("{key}:{}", port.port),
        endpoints(cluster, &source.service, &source.port_name),
    );
    if matches!(
        port.app_protocol.as_deref(),
        Some("kubernetes.io/h2c" | "h2c" | "grpc")
    ) {
        backend.protocol = UpstreamProtocol::H2c;
    }
    if svc.session_affinity.as_deref() == Some("ClientIP") {
        // Consistent hashing on the client address: the same client keeps its pod while
        // the endpoint set is stable, as kube-proxy's ClientIP affinity promises.
        backend.policy = Policy::RingHash;
    }
    Ok((backend, Some(source)))
}

/// Routes that pick a Service by the name a client inside the cluster uses for it: `svc`
/// (in Strait's own namespace), `svc.ns`, `svc.ns.svc` and `svc.ns.svc.<cluster domain>`,
/// each with the Service port (`svc.ns:8080`); a host without a port means port 80, or the
/// Service's only port. Every request is balanced over the ready endpoints, so an HTTP/2
/// (gRPC) client's one connection still spreads its requests over every pod.
pub fn service_routes(
    cluster: &Cluster,
    options: &ServiceRouting,
    key: &Key,
    svc: &Svc,
    routes: &mut Vec<RouteSpec>,
    backends: &mut BTreeMap<String, BackendSpec>,
    sources: &mut BTreeMap<String, EndpointSource>,
) {
    let tcp: Vec<&SvcPort> = svc
        .ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let mut hosts = vec![
        format!("{}.{}", key.name, key.namespace),
        format!("{}.{}.svc", key.name, key.namespace),
        format!(
            "{}.{}.svc.{}",
            key.name, key.namespace, options.cluster_domain
        ),
    ];
    if key.namespace == options.namespace {
        hosts.push(key.name.clone());
    }
    let default_port = tcp
        .iter()
        .find(|p| p.port == 80)
        .or(if tcp.len() == 1 { tcp.first() } else { None })
        .map(|p| p.port);
    for p in &tcp {
        let wanted = IngressServiceBackend {
            name: key.name.clone(),
            port: Some(k8s_openapi::api::networking::v1::ServiceBackendPort {
                name: None,
                number: Some(p.port),
            }),
        };
        let Ok((mut backend, source)) = service_backend(cluster, &key.namespace, &wanted) else {
            continue;
        };
        let defaults = &options.defaults;
        if defaults.has_backend_settings() {
            // Apart from the Ingress backend of the same Service, which keeps its own.
            backend.name = format!("{}@services", backend.name);
            if let Some(cb) = &defaults.circuit_breaker {
                backend.circuit_breaker = cb.clone();
            }
            if let Some(o) = &defaults.outlier_detection {
                backend.outlier_detection = Some(Box::new(o.clone()));
            }
        }
        let name = backend.name.clone();
        if let Some(s) = source {
            sources.insert(name.clone(), s);
        }
        backends.entry(name.clone()).or_insert(backend);
        let matches = |port| MatchSpec {
            hosts: hosts.clone(),
            port,
            ..MatchSpec::default()
        };
        let route = |route_name: String, port| {
            let mut r = RouteSpec::forward(route_name, matches(port), &name);
            r.timeout = defaults.timeout;
            r.retry = defaults.retry.clone().map(Box::new);
            r
        };
        routes.push(route(
            format!("service/{key}:{}", p.port),
            u16::try_from(p.port).ok(),
        ));
        if default_port == Some(p.port) {
            routes.push(route(format!("service/{key}"), None));
        }
    }
}

/// The `tcp` listener of a Service annotated with [`TCP_PORT_ANNOTATION`]: every
/// connection goes to one ready endpoint, balanced, with outlier detection ejecting
/// endpoints whose connects keep failing. `ports` holds the ports already taken, with
/// what took each.
fn tcp_service(
    cluster: &Cluster,
    options: &TranslateOptions,
    key: &Key,
    svc: &Svc,
    ports: &mut HashMap<u16, String>,
) -> Result<Option<(ListenerSpec, BackendSpec, EndpointSource)>, String> {
    let Some(raw) = svc.tcp_port.as_ref() else {
        return Ok(None);
    };
    let port: u16 = raw
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{TCP_PORT_ANNOTATION}: {raw:?} is not a port (1-65535)"))?;
    if let Some(other) = ports.get(&port) {
        return Err(format!(
            "{TCP_PORT_ANNOTATION}: port {port} is already taken by {other}"
        ));
    }
    let wanted = svc.tcp_service_port.as_ref();
    let (number, name) = match wanted.map(|w| w.parse::<i32>()) {
        Some(Ok(n)) => (Some(n), None),
        Some(Err(_)) => (None, wanted.map(String::as_str)),
        None => (None, None),
    };
    let Some(sp) = find_port(svc, number, name).or_else(|| {
        (number.is_none() && name.is_none())
            .then(|| svc.ports.first())
            .flatten()
    }) else {
        return Err(format!(
            "no Service port {}; set {TCP_SERVICE_PORT_ANNOTATION}",
            wanted.map_or("(none given)", String::as_str)
        ));
    };
    let source = EndpointSource {
        service: key.clone(),
        port_name: sp.name.clone().unwrap_or_default(),
    };
    let backend_name = format!("{key}:{}@tcp", sp.port);
    let mut backend = BackendSpec::new(
        &backend_name,
        endpoints(cluster, &source.service, &source.port_name),
    );
    // A pod that refuses connections is skipped after a few: half the pods may be out at
    // once, so a small Service (a database's few replicas) can still lose one.
    backend.outlier_detection = Some(Box::new(OutlierSpec {
        max_ejection_percent: 50,
        ..OutlierSpec::default()
    }));
    let address = if options.tcp_ip.contains(':') {
        format!("[{}]:{port}", options.tcp_ip)
    } else {
        format!("{}:{port}", options.tcp_ip)
    };
    ports.insert(port, format!("Service {key}"));
    let listener = ListenerSpec {
        name: format!("tcp-{}-{}", key.namespace, key.name),
        address,
        protocol: ListenerProtocol::Tcp,
        tcp: Some(TcpForwardSpec {
            backend: Some(backend_name),
            sni: None,
            idle_timeout: Duration::from_secs(3600),
        }),
        routes: Arc::default(),
        default_route: None,
        routes_from: None,
        tls: None,
    };
    Ok(Some((listener, backend, source)))
}

fn find_port<'a>(svc: &'a Svc, number: Option<i32>, name: Option<&str>) -> Option<&'a SvcPort> {
    let ports = &svc.ports;
    ports.iter().find(|p| match (number, name) {
        (Some(n), _) => p.port == n,
        (None, Some(name)) => p.name.as_deref() == Some(name),
        (None, None) => ports.len() == 1,
    })
}

/// The endpoints of a Service port from its EndpointSlices: ready ones; if none is ready,
/// the ones still serving while terminating (kube-proxy's fallback), so a rollout's last
/// pods keep answering rather than the route failing outright.
pub fn endpoints(cluster: &Cluster, service: &Key, port_name: &str) -> Vec<EndpointSpec> {
    let mut ready: Vec<(IpAddr, u16)> = Vec::new();
    let mut terminating: Vec<(IpAddr, u16)> = Vec::new();
    for slice in cluster.slices_of(service) {
        // Slice ports carry the Service port's name and this slice's target port number.
        let port = slice.ports.iter().find(|p| p.name == port_name && p.tcp);
        let Some(port) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.ready {
                ready.push((ep.ip, port));
            } else {
                terminating.push((ep.ip, port));
            }
        }
    }
    let mut chosen = if ready.is_empty() { terminating } else { ready };
    // A pod can sit in two slices for a moment while the slice controller moves it.
    chosen.sort_unstable();
    chosen.dedup();
    chosen
        .into_iter()
        .map(|(ip, port)| EndpointSpec::Address(std::net::SocketAddr::new(ip, port).to_string()))
        .collect()
}

fn or_any(host: &str) -> &str {
    if host.is_empty() {
        "*"
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_hosts_cover_their_names_and_one_label_below_a_wildcard() {
        let hosts = vec![
            "shop.example.com".to_owned(),
            "*.apps.example.com".to_owned(),
        ];
        assert!(covers(&hosts, "shop.example.com"));
        assert!(covers(&hosts, "a.apps.example.com"));
        assert!(covers(&hosts, "*.apps.example.com"));
        assert!(!covers(&hosts, "a.b.apps.example.com"), "one label only");
        assert!(!covers(&hosts, "apps.example.com"));
        assert!(
            !covers(&hosts, ""),
            "a route for any host is not one TLS host"
        );
        assert!(covers(&[String::new()], "anything.example"));
    }

    #[test]
    fn the_https_form_of_a_route_keeps_its_match_and_redirects_permanently() {
        let matches = MatchSpec {
            hosts: vec!["shop.example.com".into()],
            prefix: Some("/cart".into()),
            ..MatchSpec::default()
        };
        let r = to_https(&RouteSpec::forward("apps/shop/0/0", matches.clone(), "b"));
        assert_eq!(r.name.as_deref(), Some("apps/shop/0/0"));
        assert_eq!(r.matches, matches);
        assert!(r.forward.is_none());
        let redirect = r.redirect.unwrap();
        assert_eq!(redirect.scheme.as_deref(), Some("https"));
        assert_eq!((redirect.port, redirect.status), (None, 308));
    }
}
