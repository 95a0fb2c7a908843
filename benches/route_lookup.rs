//! Route lookup cost against table size.
//!
//! Builds a listener with 10, 1,000 and 100,000 routes through the public configuration
//! path (`Spec` -> dry `compile`), then times one `Router::find` per iteration, host
//! normalization included, cycling through a fixed mix of requests that land on hosts in the
//! middle and at the end of the table, plus misses. A naive linear scan over
//! `(host, path)` pairs answers the same requests as a baseline: the router should stay flat
//! while the scan grows with the table.
//!
//! Run: `cargo bench --bench route_lookup -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, Method};
use serde_json::{json, Value};
use strait_proxy::router::{normalize_host, MAX_HOST_LEN};
use strait_proxy::table::spec::Spec;
use strait_proxy::table::{compile, RouteTable};

/// Table sizes, in routes.
const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// Routes per host: (kind, path). Prefixes of different depths and exact paths, so that a
/// lookup walks several path elements before it hits.
const PER_HOST: [(&str, &str); 5] = [
    ("prefix", "/api/v1"),
    ("prefix", "/api/v2"),
    ("prefix", "/static"),
    ("exact", "/healthz"),
    ("exact", "/api/v1/status"),
];

fn host(i: usize) -> String {
    format!("svc-{i}.example.com")
}

fn route_name(h: usize, k: usize) -> String {
    format!("svc-{h}-{k}")
}

/// `n` routes over `n / PER_HOST.len()` exact hosts, all forwarding to one backend.
fn spec(n: usize) -> Spec {
    let hosts = n / PER_HOST.len();
    let mut routes = Vec::with_capacity(n);
    for h in 0..hosts {
        for (k, (kind, path)) in PER_HOST.iter().enumerate() {
            routes.push(json!({
                "name": route_name(h, k),
                "match": { "hosts": [host(h)], *kind: path },
                "forward": { "backend": "b" },
            }));
        }
    }
    let v: Value = json!({
        "access_log": { "enabled": false },
        "listeners": [{ "name": "bench", "address": "127.0.0.1:0", "routes": routes }],
        "backends": [{ "name": "b", "endpoints": ["127.0.0.1:8080"] }],
    });
    serde_json::from_value(v).expect("bench spec deserializes")
}

fn table(n: usize) -> RouteTable {
    compile(Arc::new(spec(n)), "bench", 1, None).expect("bench spec compiles")
}

/// A request as it arrives: raw `Host` header (maybe with port / capitals) and path.
struct Query {
    host: String,
    path: &'static str,
}

/// The request mix: hosts in the middle and at the end of the table, hitting deep and
/// shallow prefixes and exact paths, plus a path miss on a known host and an unknown host.
fn queries(n: usize) -> Vec<Query> {
    let hosts = n / PER_HOST.len();
    let mid = hosts / 2;
    let last = hosts - 1;
    let q = |host: String, path| Query { host, path };
    vec![
        q(host(mid), "/api/v1/users/42/orders"),
        q(format!("{}:8080", host(last)), "/api/v2/items"),
        q(host(last), "/healthz"),
        q(host(mid).to_uppercase(), "/static/css/app.css"),
        q(host(mid), "/api/v1/status"),
        q(host(last), "/nope/at/all"),
        q("unknown.example.org".to_owned(), "/api/v1"),
    ]
}

/// The naive baseline: every route as (host, path, exact, name), scanned in full for the best
/// match with the router's precedence (exact path, then longest prefix on element bounds).
struct Linear {
    routes: Vec<(String, String, bool, String)>,
}

impl Linear {
    fn new(n: usize) -> Self {
        let hosts = n / PER_HOST.len();
        let mut routes = Vec::with_capacity(n);
        for h in 0..hosts {
            for (k, (kind, path)) in PER_HOST.iter().enumerate() {
                routes.push((
                    host(h),
                    (*path).to_owned(),
                    *kind == "exact",
                    route_name(h, k),
                ));
            }
        }
        Self { routes }
    }

    fn find(&self, host: &str, path: &str) -> Option<&str> {
        let mut best: Option<(usize, &str)> = None;
        for (h, p, exact, name) in &self.routes {
            if h != host {
                continue;
            }
            let score = if *exact {
                (path == p).then_some(usize::MAX)
            } else {
                let hit = path
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
                hit.then_some(p.len())
            };
            if let Some(s) = score {
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, name));
                }
            }
        }
        best.map(|(_, name)| name)
    }
}

fn router_find<'a>(t: &'a RouteTable, q: &Query, headers: &HeaderMap) -> Option<&'a str> {
    let mut buf = [0u8; MAX_HOST_LEN];
    let host = normalize_host(&q.host, &mut buf);
    t.listeners[0]
        .router
        .find(host, None, q.path, &Method::GET, headers)
        .map(|r| &*r.name)
}

fn linear_find<'a>(l: &'a Linear, q: &Query) -> Option<&'a str> {
    let mut buf = [0u8; MAX_HOST_LEN];
    let host = normalize_host(&q.host, &mut buf);
    l.find(host, q.path)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let headers = HeaderMap::new();
    for n in SIZES {
        let t = table(n);
        let lin = Linear::new(n);
        let qs = queries(n);
        // Both answer every request of the mix the same way, and the mix has hits and misses.
        for q in &qs {
            assert_eq!(
                router_find(&t, q, &headers),
                linear_find(&lin, q),
                "{} {}",
                q.host,
                q.path
            );
        }
        assert_eq!(
            qs.iter()
                .filter(|q| router_find(&t, q, &headers).is_none())
                .count(),
            2
        );

        group.bench_with_input(BenchmarkId::new("router", n), &n, |b, _| {
            let mut i = 0usize;
            b.iter(|| {
                let q = &qs[i % qs.len()];
                i = i.wrapping_add(1);
                black_box(router_find(&t, black_box(q), &headers))
            });
        });
        group.bench_with_input(BenchmarkId::new("linear", n), &n, |b, _| {
            let mut i = 0usize;
            b.iter(|| {
                let q = &qs[i % qs.len()];
                i = i.wrapping_add(1);
                black_box(linear_find(&lin, black_box(q)))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
