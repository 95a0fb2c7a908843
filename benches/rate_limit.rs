//! Cost of one rate-limit check (`Limiter::check`, the call the request path makes).
//!
//! Cases: one bucket for the route; a bucket per client IP, cycling over 10,000 addresses
//! already in the table; a bucket per header value, cycling over 10,000 values. The quota is
//! high enough that every check is allowed, so each iteration also writes its bucket. The
//! global case is also timed on governor's std `Instant` clock, against the default (quanta).
//!
//! Run: `cargo bench --bench rate_limit -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use governor::clock::MonotonicClock;
use http::{HeaderMap, HeaderName, HeaderValue};
use strait_proxy::rate_limit::{KeySource, Limiter, Settings, DEFAULT_MAX_KEYS};

const KEYS: usize = 10_000;

fn settings(key: KeySource) -> Settings {
    Settings {
        // A token every nanosecond and a bucket of a million: never refused.
        requests: NonZeroU32::new(1_000_000_000).unwrap(),
        per: Duration::from_secs(1),
        burst: NonZeroU32::new(1_000_000).unwrap(),
        key,
        max_keys: DEFAULT_MAX_KEYS,
    }
}

fn ips() -> Vec<IpAddr> {
    (0..KEYS as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit_check");
    let client = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let none = HeaderMap::new();

    let global = Limiter::detached(settings(KeySource::Global));
    group.bench_function("global", |b| {
        b.iter(|| black_box(global.check(black_box(client), black_box(&none))))
    });

    let std_clock = Limiter::with_clock(
        settings(KeySource::Global),
        MonotonicClock,
        metrics::Gauge::noop(),
    );
    group.bench_function("global_std_instant_clock", |b| {
        b.iter(|| black_box(std_clock.check(black_box(client), black_box(&none))))
    });

    let by_ip = Limiter::detached(settings(KeySource::ClientIp));
    let ips = ips();
    for ip in &ips {
        assert!(by_ip.check(*ip, &none).is_ok());
    }
    assert_eq!(by_ip.keys(), KEYS);
    group.bench_function("client_ip_10k", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(by_ip.check(black_box(ips[i]), black_box(&none)))
        })
    });

    let name = HeaderName::from_static("x-user");
    let by_header = Limiter::detached(settings(KeySource::Header(name.clone())));
    let maps: Vec<HeaderMap> = (0..KEYS)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert(
                name.clone(),
                HeaderValue::try_from(format!("user-{i}")).unwrap(),
            );
            h
        })
        .collect();
    for h in &maps {
        assert!(by_header.check(client, h).is_ok());
    }
    assert_eq!(by_header.keys(), KEYS);
    group.bench_function("header_10k", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(by_header.check(black_box(client), black_box(&maps[i])))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
