//! Kubernetes translation at scale: 5,000 Services with 3 ready endpoints each and 2,000
//! Ingresses (3 paths each) through the controller as the watches would feed it, then:
//! - a full rebuild (an Ingress changed): translate, compile, swap;
//! - an endpoint-only change (one EndpointSlice changed): new endpoints for one backend;
//! - the process's RSS with that table in force.
//!
//! Times are from the moment the controller acts on the last update (after the debounce,
//! reported separately) until the new table is in force.
//!
//! Run: `cargo bench --bench kube_translate` (env `SERVICES`, `INGRESSES`, `REPS`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde_json::json;
use strait_control::kubernetes::cluster::{Kind, Object};
use strait_control::kubernetes::status::{PublishSource, Served};
use strait_control::kubernetes::translate::TranslateOptions;
use strait_control::kubernetes::watch::Update;
use strait_control::kubernetes::{base_spec, Controller, Options};
use strait_control::publisher::Publisher;
use strait_proxy::table::spec::Spec;
use strait_proxy::table::TableHandle;

/// The binary's allocator, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: strait_proxy::allocator::Allocator = strait_proxy::allocator::Allocator;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 50),
                     "resourceVersion": "1"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                 "selector": {"app": format!("svc-{i}")}},
    }))
    .unwrap()
}

fn slice(i: usize, generation: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..3)
        .map(|k| {
            let n = i * 3 + k + generation;
            json!({"addresses": [format!("10.{}.{}.{}", 1 + n / 65536 % 200, n / 256 % 256, n % 256)],
                   "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": format!("ns-{}", i % 50),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

/// Ingress `i` in the namespace of the Services it uses, with 3 paths.
fn ingress(i: usize, services: usize, version: usize) -> Ingress {
    let ns = i % 50;
    let paths: Vec<_> = (0..3)
        .map(|p| {
            // Services of this namespace: ns, ns + 50, ns + 100, ...
            let k = ns + 50 * ((i / 50 * 3 + p) % (services / 50));
            json!({"path": format!("/p{p}/v{version}"), "pathType": "Prefix",
                   "backend": {"service": {"name": format!("svc-{k}"), "port": {"number": 80}}}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("ing-{i}"), "namespace": format!("ns-{ns}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"ingressClassName": "strait",
                 "rules": [{"host": format!("h{i}.example.com"), "http": {"paths": paths}}]},
    }))
    .unwrap()
}

fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) runs a
    // small smoke version.
    let full = std::env::args().any(|a| a == "--bench");
    let services = env("SERVICES", if full { 5000 } else { 100 });
    let ingresses = env("INGRESSES", if full { 2000 } else { 40 });
    let reps = env("REPS", if full { 7 } else { 2 });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let _prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("recorder");
        let handle = TableHandle::default();
        let options = Options {
            translate: TranslateOptions::default(),
            namespaces: Vec::new(),
            http_addr: "127.0.0.1:0".into(),
            https_addr: None,
            service_addr: None,
            ingresses: true,
            publish: PublishSource::None,
            debounce: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
            identity: "bench".into(),
            lease_namespace: "default".into(),
        };
        let debounce = options.debounce;
        let base = base_spec(Spec::default(), &options);
        let (served, _rx) = tokio::sync::watch::channel(Arc::new(Served::default()));
        let mut c = Controller::new(options, Publisher::new(handle.clone()), base, None, served);
        let (rss0, _) = rss_kib();

        let class: IngressClass = serde_json::from_value(json!({
            "metadata": {"name": "strait"}, "spec": {"controller": "strait.io/ingress-controller"}
        }))
        .unwrap();
        let listed = |kind, objects| Update::Listed {
            kind,
            namespace: None,
            objects,
        };
        c.apply(listed(Kind::IngressClass, vec![Object::IngressClass(Arc::new(class))]));
        c.apply(listed(
            Kind::Service,
            (0..services).map(|i| Object::Service(Arc::new(service(i)))).collect(),
        ));
        c.apply(listed(
            Kind::EndpointSlice,
            (0..services)
                .map(|i| Object::EndpointSlice(Arc::new(slice(i, 0))))
                .collect(),
        ));
        c.apply(listed(
            Kind::Ingress,
            (0..ingresses)
                .map(|i| Object::Ingress(Arc::new(ingress(i, services, 0))))
                .collect(),
        ));
        c.apply(listed(Kind::Secret, Vec::new()));
        let (rss_objects, _) = rss_kib();
        let t = Instant::now();
        c.rebuild();
        let first = t.elapsed();
        let table = handle.current().expect("a table was published");
        let routes: usize = table.spec.listeners.iter().map(|l| l.routes.len()).sum();
        let backends = table.backends.len();
        let endpoints: usize = table.backends.iter().map(|b| b.endpoints.len()).sum();
        drop(table);

        let mut full_times = Vec::new();
        for r in 1..=env("FULL_REPS", reps) {
            c.apply(Update::Apply(Object::Ingress(Arc::new(ingress(
                r % ingresses,
                services,
                r,
            )))));
            let t = Instant::now();
            c.rebuild();
            full_times.push(t.elapsed());
        }
        let mut endpoint_times = Vec::new();
        for r in 1..=env("ENDPOINT_REPS", reps * 3) {
            let before = handle.current().map(|t| t.generation);
            c.apply(Update::Apply(Object::EndpointSlice(Arc::new(slice(
                (r * 7919) % services,
                r,
            )))));
            let t = Instant::now();
            c.rebuild();
            endpoint_times.push(t.elapsed());
            assert_ne!(before, handle.current().map(|t| t.generation), "a table was published");
        }
        let (rss, hwm) = rss_kib();
        println!(
            "kube_translate: {services} Services x 3 endpoints, {ingresses} Ingresses -> \
             {routes} routes, {backends} backends, {endpoints} endpoints"
        );
        println!("first table:            {first:?}");
        println!(
            "full rebuild:           median {:?} (min {:?}, max {:?}, {} runs) + debounce {debounce:?}",
            median(full_times.clone()),
            full_times.iter().min().copied().unwrap_or_default(),
            full_times.iter().max().copied().unwrap_or_default(),
            full_times.len()
        );
        println!(
            "endpoint-only change:   median {:?} (min {:?}, max {:?}, {} runs) + debounce {debounce:?}",
            median(endpoint_times.clone()),
            endpoint_times.iter().min().unwrap(),
            endpoint_times.iter().max().unwrap(),
            endpoint_times.len()
        );
        println!(
            "RSS: {} MiB with the table in force (peak {} MiB; {} MiB at start, {} MiB with \
             the cluster's objects loaded)",
            rss / 1024,
            hwm / 1024,
            rss0 / 1024,
            rss_objects / 1024
        );
    });
}
