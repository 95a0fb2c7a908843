//! Cost of one `Balancer::pick` per policy, for 3, 100 and 1,000 endpoints.
//!
//! Endpoints are the real `table::Endpoint` with detached live state, mixed weights (1, 2, 3)
//! and a few requests held in flight so the load-aware policies compare unequal costs. The
//! hashing policies get a different request hash every iteration.
//!
//! Run: `cargo bench --bench balancer_pick -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::uri::Authority;
use strait_proxy::balancer::Balancer;
use strait_proxy::endpoint::{EndpointState, InFlight};
use strait_proxy::table::spec::Policy;
use strait_proxy::table::Endpoint;

const SIZES: [usize; 3] = [3, 100, 1_000];

const POLICIES: [(&str, Policy); 6] = [
    ("round_robin", Policy::RoundRobin),
    ("random", Policy::Random),
    ("least_request", Policy::LeastRequest),
    ("peak_ewma", Policy::PeakEwma),
    ("ring_hash", Policy::RingHash),
    ("maglev", Policy::Maglev),
];

/// `n` endpoints 10.0.x.y:8080 with weights 1, 2, 3, ..., and `i % 4` requests in flight on
/// endpoint `i` (the guards are returned and must be kept alive).
fn endpoints(n: usize) -> (Vec<Endpoint>, Vec<InFlight>) {
    let mut eps = Vec::with_capacity(n);
    let mut held = Vec::new();
    for i in 0..n {
        let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8);
        let addr = SocketAddr::from((ip, 8080));
        let state = Arc::new(EndpointState::detached(addr));
        held.extend((0..i % 4).map(|_| state.start()));
        eps.push(Endpoint {
            addr,
            authority: Authority::try_from(addr.to_string()).expect("valid authority"),
            weight: (i % 3) as u32 + 1,
            state,
        });
    }
    (eps, held)
}

/// splitmix64: a well-spread request hash from a counter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn bench(c: &mut Criterion) {
    for (name, policy) in POLICIES {
        let mut group = c.benchmark_group(format!("balancer_pick/{name}"));
        let hashing = matches!(policy, Policy::RingHash | Policy::Maglev);
        for n in SIZES {
            let (eps, _held) = endpoints(n);
            let balancer = Balancer::new(policy, &eps);
            assert_eq!(balancer.wants_hash(), hashing);
            assert!(balancer.pick(&eps, Some(1)).is_some_and(|i| i < n));
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                let mut k = 0u64;
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let hash = hashing.then(|| mix(k));
                    black_box(balancer.pick(black_box(&eps), black_box(hash)))
                });
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
