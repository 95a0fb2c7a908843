//! Cost of the endpoint-state reads that outlier detection and health checks add to a pick:
//! `Backend::pick` on a round-robin backend of 100 endpoints without health (the plain
//! balancer pick), with outlier detection on and every endpoint in, and with a tenth of the
//! endpoints ejected (picks that land on one step to another); plus the accounting of one
//! successful answer (`Backend::record`).
//!
//! Run: `cargo bench --bench endpoint_state -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use strait_proxy::health::Outcome;
use strait_proxy::table::spec::Spec;
use strait_proxy::table::{compile, Backend, Registries};

/// Backend `b` of 100 endpoints, compiled without live registries; `extra` is YAML added to it.
fn backend(extra: &str) -> Arc<Backend> {
    let endpoints: Vec<String> = (0..100)
        .map(|i| format!("\"10.0.{}.{}:8080\"", i / 250, i % 250 + 1))
        .collect();
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: b}}\nbackends:\n  - name: b\n    endpoints: [{}]\n{extra}",
        endpoints.join(", ")
    );
    let spec: Spec = serde_yaml_ng::from_str(&yaml).expect("bench config parses");
    // Live registries, so endpoints count their ejections against their backend.
    let registries = Registries::default();
    let table =
        compile(Arc::new(spec), "bench", 1, Some(&registries)).expect("bench config compiles");
    Arc::clone(&table.backends[0])
}

const OUTLIER: &str = "    outlier_detection: {consecutive_5xx: 1, base_ejection_time: 1h, max_ejection_time: 1h, max_ejection_percent: 10}\n";

fn bench(c: &mut Criterion) {
    let plain = backend("");
    c.bench_function("pick/no_health", |b| b.iter(|| black_box(plain.pick(None))));

    let guarded = backend(OUTLIER);
    c.bench_function("pick/outlier_all_in", |b| {
        b.iter(|| black_box(guarded.pick(None)))
    });
    c.bench_function("record/success", |b| {
        let ep = &guarded.endpoints[0];
        b.iter(|| guarded.record(black_box(ep), Outcome::Success))
    });

    let ejected = backend(OUTLIER);
    for ep in ejected.endpoints.iter().step_by(10) {
        ejected.record(ep, Outcome::LocalFailure);
    }
    assert_eq!(ejected.state.ejected(), 10);
    c.bench_function("pick/outlier_10pct_ejected", |b| {
        b.iter(|| black_box(ejected.pick(None)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
