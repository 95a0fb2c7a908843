//! The Kubernetes source: watches Ingresses, IngressClasses, Services, EndpointSlices and
//! TLS Secrets, translates them into routes and backends, and publishes whole tables
//! through the one [`Publisher`].
//!
//! Flow: watches ([`watch`]) -> one controller loop that owns the [`Cluster`] view ->
//! debounce -> [`translate`] -> merge with the static configuration -> publish. Nothing is
//! published until every watch has completed its first list, so a (re)started Strait never
//! serves a partial table; `/ready` stays 503 until then.

pub mod annotations;
pub mod certs;
pub mod cluster;
pub mod events;
pub mod leader;
pub mod status;
pub mod translate;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use strait_proxy::table::spec::{
    BackendSpec, ListenerProtocol, ListenerSpec, ListenerTlsSpec, Spec,
};
use strait_proxy::table::CompileError;
use tokio::sync::watch as tokio_watch;
use tokio::time::Instant;

use crate::publisher::Publisher;
use certs::SecretCerts;
use cluster::{Cluster, Key, Object};
use events::{EventSink, Report};
use status::{PublishSource, Served, ServedIngress, StatusWriter};
use translate::{translate, Problem, ServiceProblem, TranslateOptions, Translation};
use watch::{Update, WatchId};

/// Counter of failed watch requests, by kind.
pub const WATCH_ERRORS: &str = "strait_kubernetes_watch_errors_total";
/// Counter of tables built from the cluster, by result.
pub const TRANSLATIONS: &str = "strait_kubernetes_translations_total";
/// Gauge of Ingresses of our class with a problem.
pub const INGRESS_PROBLEMS: &str = "strait_kubernetes_ingress_problems";
/// Name of the listener that serves Ingress routes over plain HTTP.
pub const HTTP_LISTENER: &str = "kubernetes-http";
/// Name of the listener that routes by Service name (when enabled).
pub const SERVICE_LISTENER: &str = "kubernetes-services";
/// Name of the HTTPS listener for Ingress routes, present while some Ingress `tls` entry
/// has a usable certificate.
pub const HTTPS_LISTENER: &str = "kubernetes-https";

/// Registers the help text of the Kubernetes source's metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(WATCH_ERRORS, "Failed Kubernetes watch requests, by kind.");
    metrics::describe_counter!(
        TRANSLATIONS,
        "Tables built from the cluster, by result (published, rejected, endpoints)."
    );
    metrics::describe_gauge!(
        INGRESS_PROBLEMS,
        "Ingresses of Strait's class with a problem (skipped, conflicting or invalid TLS)."
    );
}

/// How the Kubernetes source runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which Ingresses are ours.
    pub translate: TranslateOptions,
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Address of the HTTP listener for Ingress routes.
    pub http_addr: String,
    /// Address of the HTTPS listener for Ingresses with `tls` (none: HTTP only).
    pub https_addr: Option<String>,
    /// Address of the listener that routes by Service name, if enabled.
    pub service_addr: Option<String>,
    /// Serve Ingresses (their watches, the HTTP listener, status and leader election);
    /// without, only Services and EndpointSlices are watched, as a sidecar needs.
    pub ingresses: bool,
    /// Where the address written into Ingress status comes from.
    pub publish: PublishSource,
    /// Quiet time after a change before the table is rebuilt, so a burst (a rollout, a
    /// `kubectl apply -f dir/`) becomes one table.
    pub debounce: Duration,
    /// Longest a rebuild waits while changes keep coming.
    pub max_delay: Duration,
    /// This replica's name for leader election and Events (the pod name).
    pub identity: String,
    /// Namespace of the leader-election Lease (the pod's namespace).
    pub lease_namespace: String,
}

/// The static configuration plus the listener Ingress routes are served on, so that every
/// listener is bound at startup, before any table exists.
pub fn base_spec(mut spec: Spec, options: &Options) -> Spec {
    let listener = |name: &str, address: &str| ListenerSpec {
        name: name.into(),
        address: address.into(),
        protocol: ListenerProtocol::Http,
        tcp: None,
        routes: Arc::default(),
        default_route: None,
        routes_from: None,
        tls: None,
    };
    if options.ingresses {
        spec.listeners
            .push(listener(HTTP_LISTENER, &options.http_addr));
    }
    if let Some(addr) = &options.service_addr {
        spec.listeners.push(listener(SERVICE_LISTENER, addr));
    }
    spec
}

/// Runs the source until `shutdown`: watches, translates and publishes. Returns once the
/// leader-election Lease, if held, is released. Each static configuration received on
/// `statics` (reloaded by [`crate::reload::Reloader::forwarding`]) replaces `base`'s.
pub async fn run(
    client: kube::Client,
    options: Options,
    publisher: Publisher,
    base: Spec,
    mut statics: Option<tokio_watch::Receiver<Option<Arc<Spec>>>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (ids, mut updates) = watch::start(&client, &options.namespaces, options.ingresses);
    let (stop_tx, stop_rx) = tokio_watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let (served_tx, served_rx) = tokio_watch::channel(Arc::new(Served::default()));
    // Leases, status and Events all concern Ingresses: without them, none of those API
    // calls is made (nor allowed by a sidecar's RBAC).
    // Ends (`changed()` fails) once the Lease is released at shutdown.
    let mut lease_released = None;
    let events = if options.ingresses {
        let leader = leader::LeaderElection::new(
            client.clone(),
            options.lease_namespace.clone(),
            format!("strait-{}", options.translate.ingress_class),
            options.identity.clone(),
        )
        .spawn(stopped());
        lease_released = Some(leader.clone());
        tokio::spawn(
            StatusWriter::new(client.clone(), options.publish.clone()).run(
                leader,
                served_rx,
                stopped(),
            ),
        );
        Some(EventSink::start(client, options.identity.clone()))
    } else {
        None
    };
    let mut controller = Controller::new(options, publisher, base, events, served_tx);
    let mut pending: HashSet<WatchId> = ids.into_iter().collect();
    let mut dirty: Option<(Instant, Instant)> = None;
    tokio::pin!(shutdown);
    loop {
        let deadline = dirty.filter(|_| pending.is_empty()).map(|(first, last)| {
            (last + controller.options.debounce).min(first + controller.options.max_delay)
        });
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else { break };
                if let Update::Listed { kind, namespace, .. } = &update {
                    let was_pending = pending.remove(&WatchId { kind: *kind, namespace: namespace.clone() });
                    if was_pending && pending.is_empty() {
                        tracing::info!("every watch has listed; building the first table");
                    }
                }
                controller.apply(update);
                let now = Instant::now();
                dirty = Some(dirty.map_or((now, now), |(first, _)| (first, now)));
            }
            spec = next_static(&mut statics) => {
                // Published with the next rebuild, so never before every watch has listed.
                controller.set_static(spec);
                let now = Instant::now();
                dirty = Some(dirty.map_or((now, now), |(first, _)| (first, now)));
            }
            () = sleep_until(deadline) => {
                dirty = None;
                controller.rebuild();
            }
            () = controller.publisher.dns_changed() => {
                // An ExternalName Service's DNS answer changed: same table, new endpoints.
                if let Err(errors) = controller.publisher.rebuild() {
                    let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    tracing::warn!(errors = %list.join("; "), "rebuild after a DNS change rejected");
                }
            }
            () = &mut shutdown => break,
        }
    }
    let _ = stop_tx.send(true);
    // The process exits when this returns: a Lease left held would keep the other replicas
    // waiting for it to expire. The election bounds its release by a lease duration.
    if let Some(mut rx) = lease_released {
        while rx.changed().await.is_ok() {}
    }
}

/// The ports of `base`'s listeners and of the HTTPS listener, with what holds each, so that
/// a TCP service asking for one is reported, not left to fail to bind. (Not the admin
/// listener: `--admin-addr` may move it, and a clash there fails to bind with a log line.)
fn reserved_ports(base: &Spec, options: &Options) -> Vec<(u16, String)> {
    let port = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
    };
    let listeners = base
        .listeners
        .iter()
        .map(|l| (l.address.as_str(), format!("Strait's listener {}", l.name)));
    let https = options
        .https_addr
        .iter()
        .map(|a| (a.as_str(), format!("Strait's listener {HTTPS_LISTENER}")));
    listeners
        .chain(https)
        .filter_map(|(address, what)| Some((port(address)?, what)))
        .collect()
}

/// The next static configuration handed over, once it changes (never without a file, or
/// once its reloader has stopped).
async fn next_static(statics: &mut Option<tokio_watch::Receiver<Option<Arc<Spec>>>>) -> Spec {
    if let Some(rx) = statics {
        if rx.changed().await.is_ok() {
            if let Some(spec) = rx.borrow_and_update().as_deref() {
                return spec.clone();
            }
        }
    }
    std::future::pending().await
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What changed since the last table.
#[derive(Debug, Default)]
struct Dirty {
    /// Anything but EndpointSlices changed: translate everything.
    full: bool,
    /// Services whose EndpointSlices changed.
    services: HashSet<Key>,
    /// Only the status of Ingresses changed.
    status: bool,
}

/// What endpoint-only and status-only changes need from the translation in force. The rest
/// of it is dropped once its table is published: route owners and problems serve only the
/// rebuild that made them, and the routes live on in the published table.
#[derive(Debug)]
struct Kept {
    /// The backends published, sorted by name (see `translate`).
    backends: Vec<Arc<BackendSpec>>,
    /// For each Service whose EndpointSlices feed backends: the index of each such backend
    /// in `backends`, with the name of the Service port it takes.
    by_service: HashMap<Key, Vec<(usize, Box<str>)>>,
    /// Ingresses served, for the status writer.
    served: Vec<Key>,
}

impl Kept {
    fn new(t: Translation) -> Self {
        let mut by_service: HashMap<Key, Vec<(usize, Box<str>)>> = HashMap::new();
        for (name, source) in t.sources {
            if let Ok(i) = t.backends.binary_search_by(|b| b.name.as_str().cmp(&name)) {
                by_service
                    .entry(source.service)
                    .or_default()
                    .push((i, source.port_name.into()));
            }
        }
        Self {
            backends: t.backends,
            by_service,
            served: t.served,
        }
    }
}

/// The single writer: applies watch updates to the cluster view and publishes tables.
/// [`run`] drives it from the watches; benchmarks drive it directly.
pub struct Controller {
    /// What endpoint-only updates need of the translation in force.
    last: Option<Kept>,
    dirty: Dirty,
    options: Options,
    publisher: Publisher,
    base: Spec,
    cluster: Cluster,
    events: Option<EventSink>,
    /// Certificates of the TLS Secrets, each checked once per version.
    certs: SecretCerts,
    /// Problems already reported, per Ingress: each is reported once while it lasts.
    reported: HashMap<Key, HashSet<(&'static str, String)>>,
    /// Problems of Services already reported; each is reported once while it lasts.
    reported_services: HashSet<ServiceProblem>,
    served: tokio_watch::Sender<Arc<Served>>,
}

/// Attempts at publishing one rebuild: each failed attempt leaves out the Ingresses the
/// compiler's errors point at.
const PUBLISH_ATTEMPTS: usize = 4;

impl Controller {
    /// A controller publishing through `publisher`; `base` is the static configuration
    /// (with the Kubernetes listener, see [`base_spec`]). Without `events`, problems are
    /// only logged.
    pub fn new(
        mut options: Options,
        publisher: Publisher,
        base: Spec,
        events: Option<EventSink>,
        served: tokio_watch::Sender<Arc<Served>>,
    ) -> Self {
        options.translate.reserved_ports = reserved_ports(&base, &options);
        Self {
            last: None,
            dirty: Dirty::default(),
            options,
            publisher,
            base,
            cluster: Cluster::default(),
            certs: SecretCerts::default(),
            events,
            reported: HashMap::new(),
            reported_services: HashSet::new(),
            served,
        }
    }

    /// Replaces the static configuration (a reloaded file); the next [`Controller::rebuild`]
    /// translates everything again on top of it.
    pub fn set_static(&mut self, spec: Spec) {
        if spec.kubernetes != self.base.kubernetes {
            tracing::warn!(
                "the kubernetes section changed; it applies at the next restart (the rest of \
                 the file applies now)"
            );
        }
        self.base = base_spec(spec, &self.options);
        self.options.translate.reserved_ports = reserved_ports(&self.base, &self.options);
        self.dirty.full = true;
    }

    /// Applies one update from a watch to the cluster view (nothing is published).
    pub fn apply(&mut self, update: Update) {
        match &update {
            Update::Apply(Object::EndpointSlice(s)) | Update::Delete(Object::EndpointSlice(s)) => {
                // The Service it belonged to before (relabelled slices) and after.
                let old = self
                    .cluster
                    .slices
                    .get(&Key::of(&**s))
                    .and_then(|o| o.service.clone());
                self.dirty.services.extend(old);
                self.dirty.services.extend(cluster::service_of(s));
            }
            Update::Apply(Object::Ingress(new)) => {
                let old = self.cluster.ingresses.get(&Key::of(&**new));
                let same = old.is_some_and(|o| {
                    o.spec == new.spec && o.metadata.annotations == new.metadata.annotations
                });
                // Our own status writes come back as updates: they change no route.
                if same {
                    self.dirty.status = true;
                } else {
                    self.dirty.full = true;
                }
            }
            _ => self.dirty.full = true,
        }
        match update {
            Update::Apply(o) => self.cluster.apply(o),
            Update::Delete(o) => self.cluster.delete(&o),
            Update::Listed {
                kind,
                namespace,
                objects,
            } => self.cluster.replace(kind, namespace.as_deref(), objects),
        }
    }

    /// Publishes what changed since the last call: new endpoints only, when only
    /// EndpointSlices changed; else a full translation. Ingresses whose routes the proxy's
    /// compiler rejects are left out and reported; the rest is published.
    pub fn rebuild(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        if !dirty.full {
            if let Some(last) = self.last.take() {
                if dirty.status {
                    self.send_served(&last.served);
                }
                self.last = Some(last);
                self.update_endpoints(&dirty.services);
                return;
            }
        }
        let started = std::time::Instant::now();
        self.certs.refresh(&self.cluster);
        let mut excluded: HashMap<Key, Problem> = HashMap::new();
        for _ in 0..PUBLISH_ATTEMPTS {
            let t = translate(
                &self.cluster,
                &self.options.translate,
                &excluded,
                &self.certs,
            );
            match self
                .publisher
                .publish_generated(self.merge(&t), "kubernetes")
            {
                Ok(generation) => {
                    metrics::counter!(TRANSLATIONS, "result" => "published").increment(1);
                    tracing::info!(
                        generation,
                        routes = t.routes.len(),
                        backends = t.backends.len(),
                        ingresses = t.served.len(),
                        problems = t.problems.len(),
                        took = ?started.elapsed(),
                        "published table from the cluster"
                    );
                    self.report(&t);
                    self.last = Some(Kept::new(t));
                    return;
                }
                Err(errors) => {
                    // Merged again rather than kept: a copy per rebuild costs more than this
                    // rare path.
                    let blamed = blame(&self.merge(&t), &t, &errors);
                    if blamed.is_empty() {
                        metrics::counter!(TRANSLATIONS, "result" => "rejected").increment(1);
                        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        tracing::error!(
                            errors = %list.join("; "),
                            "table from the cluster rejected; the table in force stays"
                        );
                        return;
                    }
                    for (key, message) in blamed {
                        excluded.entry(key.clone()).or_insert(Problem {
                            ingress: key,
                            reason: "Rejected",
                            message,
                        });
                    }
                }
            }
        }
        metrics::counter!(TRANSLATIONS, "result" => "rejected").increment(1);
        tracing::error!("table from the cluster still rejected after leaving out the Ingresses at fault; the table in force stays");
    }

    /// Publishes new endpoints for the backends of `services` without translating or
    /// compiling anything else.
    fn update_endpoints(&mut self, services: &HashSet<Key>) {
        let started = std::time::Instant::now();
        let Some(last) = self.last.as_mut() else {
            return;
        };
        let mut changed = Vec::new();
        let fed = services
            .iter()
            .filter_map(|s| Some((s, last.by_service.get(s)?)))
            .flat_map(|(s, v)| v.iter().map(move |(i, port)| (s, *i, port)));
        for (service, i, port) in fed {
            let endpoints = translate::endpoints(&self.cluster, service, port);
            let backend = &mut last.backends[i];
            if backend.endpoints != endpoints {
                Arc::make_mut(backend).endpoints = endpoints;
                changed.push(Arc::clone(backend));
            }
        }
        if changed.is_empty() {
            return;
        }
        let count = changed.len();
        match self.publisher.update_backends(changed) {
            Ok(generation) => {
                metrics::counter!(TRANSLATIONS, "result" => "endpoints").increment(1);
                tracing::info!(
                    generation,
                    backends = count,
                    took = ?started.elapsed(),
                    "published new endpoints"
                );
            }
            Err(errors) => {
                // Endpoints come from validated slices, so this is a bug; a full rebuild
                // sorts it out with Ingress-level blame.
                let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                tracing::error!(errors = %list.join("; "), "endpoint update rejected; rebuilding");
                self.dirty.full = true;
                self.last = None;
                self.rebuild();
            }
        }
    }

    /// The static configuration with the translated listeners, routes and backends added.
    fn merge(&self, t: &Translation) -> Spec {
        let mut spec = self.base.clone();
        let https = self
            .options
            .https_addr
            .as_ref()
            .filter(|_| !t.certificates.is_empty());
        for l in &mut spec.listeners {
            if l.name == HTTP_LISTENER {
                // Redirects to HTTPS only while there is an HTTPS listener to go to.
                l.routes = match (&t.http_routes, https) {
                    (Some(http), Some(_)) => Arc::clone(http),
                    _ => Arc::clone(&t.routes),
                };
                l.default_route = t.default_route.clone();
            } else if l.name == SERVICE_LISTENER {
                l.routes = Arc::clone(&t.service_routes);
            }
        }
        if let Some(address) = https {
            spec.listeners.push(ListenerSpec {
                name: HTTPS_LISTENER.into(),
                address: address.clone(),
                protocol: ListenerProtocol::Https,
                tcp: None,
                routes: Arc::clone(&t.routes),
                default_route: t.default_route.clone(),
                routes_from: None,
                tls: Some(ListenerTlsSpec::new(t.certificates.clone())),
            });
        }
        spec.backends.extend(t.backends.iter().cloned());
        spec.listeners.extend(t.tcp_listeners.iter().cloned());
        spec
    }

    /// Logs and reports (as Events) problems not reported before, and hands the served
    /// Ingresses to the status writer.
    fn report(&mut self, t: &Translation) {
        let mut now: HashMap<Key, HashSet<(&'static str, String)>> = HashMap::new();
        for p in &t.problems {
            now.entry(p.ingress.clone())
                .or_default()
                .insert((p.reason, p.message.clone()));
            let new = !self
                .reported
                .get(&p.ingress)
                .is_some_and(|s| s.contains(&(p.reason, p.message.clone())));
            if !new {
                continue;
            }
            tracing::warn!(ingress = %p.ingress, reason = p.reason, "{}", p.message);
            if let (Some(ing), Some(events)) =
                (self.cluster.ingresses.get(&p.ingress), &self.events)
            {
                events.report(Report {
                    regarding: Report::ingress(ing),
                    warning: true,
                    reason: p.reason.to_owned(),
                    note: p.message.clone(),
                });
            }
        }
        metrics::gauge!(INGRESS_PROBLEMS).set(now.len() as f64);
        self.reported = now;
        let services: HashSet<ServiceProblem> = t.service_problems.iter().cloned().collect();
        for p in services.difference(&self.reported_services) {
            tracing::warn!(service = %p.service, reason = p.reason, "{}", p.message);
            let (Some(events), Some(svc)) = (&self.events, self.cluster.services.get(&p.service))
            else {
                continue;
            };
            events.report(Report {
                regarding: Report::service(&p.service.namespace, &p.service.name, svc.uid.clone()),
                warning: true,
                reason: p.reason.to_owned(),
                note: p.message.clone(),
            });
        }
        self.reported_services = services;
        self.send_served(&t.served);
    }

    /// Tells the status writer which Ingresses are served, with their status as last seen.
    fn send_served(&self, served: &[Key]) {
        let ingresses = served
            .iter()
            .filter_map(|k| self.cluster.ingresses.get(k))
            .map(|ing| ServedIngress::from_ingress(ing))
            .collect();
        let _ = self.served.send(Arc::new(Served { ingresses }));
    }
}

/// The Ingresses the compiler's errors point at, with the error text for their Event.
fn blame(spec: &Spec, t: &Translation, errors: &[CompileError]) -> Vec<(Key, String)> {
    let owners = &t.owners;
    let mut out = Vec::new();
    for e in errors {
        let mut routes: Vec<&str> = Vec::new();
        if let Some(rest) = e.path.strip_prefix("listeners[") {
            let li: Option<usize> = rest.split(']').next().and_then(|n| n.parse().ok());
            let listener = li.and_then(|i| spec.listeners.get(i));
            let after = rest.split_once("].").map_or("", |(_, a)| a);
            if let Some(l) = listener {
                if let Some(r) = after.strip_prefix("routes[") {
                    let ri: Option<usize> = r.split(']').next().and_then(|n| n.parse().ok());
                    routes.extend(
                        ri.and_then(|i| l.routes.get(i))
                            .and_then(|r| r.name.as_deref()),
                    );
                } else if after.starts_with("default_route") {
                    routes.extend(l.default_route.as_ref().and_then(|r| r.name.as_deref()));
                } else if let Some(c) = after.strip_prefix("tls.certificates[") {
                    let ci: Option<usize> = c.split(']').next().and_then(|n| n.parse().ok());
                    if let Some(k) = ci.and_then(|i| t.certificate_owners.get(i)) {
                        out.push((k.clone(), e.to_string()));
                    }
                }
            }
        } else if let Some(rest) = e.path.strip_prefix("backends[") {
            let bi: Option<usize> = rest.split(']').next().and_then(|n| n.parse().ok());
            if let Some(b) = bi.and_then(|i| spec.backends.get(i)) {
                let uses = |r: &strait_proxy::table::spec::RouteSpec| {
                    r.forward
                        .as_ref()
                        .is_some_and(|f| f.backend.as_deref() == Some(&b.name))
                };
                for r in t.routes.iter().chain(&t.default_route).filter(|r| uses(r)) {
                    routes.extend(r.name.as_deref());
                }
            }
        }
        for r in routes {
            if let Some(k) = owners.get(r) {
                out.push((k.clone(), e.to_string()));
            }
        }
    }
    out
}
