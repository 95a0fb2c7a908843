//! Circuit breaking, outlier detection and retries, against real upstreams on loopback.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tonic_health::ServingStatus;

/// A config forwarding everything to backend `b` over `ups`, with `backend` and `route`
/// extra YAML lines (already indented for their place).
fn config(ups: &[&Upstream], backend: &str, route: &str) -> String {
    format!(
        "access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - forward: {{backend: b}}
{route}
backends:
  - name: b
    endpoints: [{}]
{backend}
",
        quoted(ups).join(", ")
    )
}

/// Whether endpoint `addr` of backend `b` is ejected in the table in force.
fn ejected(p: &TestProxy, addr: std::net::SocketAddr) -> bool {
    let t = p.handle.current().unwrap();
    let b = t.backends.iter().find(|b| &*b.name == "b").unwrap();
    b.endpoints
        .iter()
        .find(|e| e.addr == addr)
        .unwrap()
        .state
        .health
        .is_ejected()
}

async fn get_n(p: &TestProxy, n: usize) -> Vec<Reply> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get(&c, &p.url("/")).await);
    }
    out
}

const OUTLIER: &str = "    outlier_detection:
      consecutive_5xx: 3
      base_ejection_time: 1500ms
      max_ejection_percent: 50";

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_comes_back_after_a_probe() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let p = TestProxy::start(&config(&[&a, &b, &c], OUTLIER, "")).await;
    b.behaviour.fail_with(500);
    // Round robin: b sees every third request; three 500s in a row eject it.
    eventually(Duration::from_secs(5), "b ejected", || async {
        get_n(&p, 3).await;
        ejected(&p, b.addr)
    })
    .await;
    let before = b.hits();
    let replies = get_n(&p, 30).await;
    assert_eq!(b.hits(), before, "no traffic to the ejected endpoint");
    assert!(replies.iter().all(|r| r.status == 200));

    // Once healthy again, the probe after the ejection time brings it back.
    b.behaviour.recover();
    eventually(Duration::from_secs(5), "b back in rotation", || async {
        get_n(&p, 3).await;
        !ejected(&p, b.addr)
    })
    .await;
    let before = b.hits();
    get_n(&p, 30).await;
    assert_eq!(b.hits() - before, 10, "b takes its third again");
}

#[tokio::test]
async fn ejections_stop_at_the_max_percent_and_panic_mode_serves_anyway() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    for u in [&a, &b, &c] {
        u.behaviour.fail_with(503);
    }
    let outlier = "    outlier_detection:
      consecutive_5xx: 2
      base_ejection_time: 30s
      max_ejection_percent: 34";
    let p = TestProxy::start(&config(&[&a, &b, &c], outlier, "")).await;
    let replies = get_n(&p, 30).await;
    let t = p.handle.current().unwrap();
    assert_eq!(t.backends[0].state.ejected(), 1, "34% of 3 endpoints");
    // Every request still reached an upstream (its 503), none got Strait's no-endpoints.
    assert!(replies
        .iter()
        .all(|r| r.status == 503 && r.header("x-strait-error").is_empty()));

    // Everything ejected: fewer than panic_threshold available, so all endpoints serve.
    let all = format!("{outlier}\n    panic_threshold: 50").replace("34", "100");
    let mut p = p;
    p.reload(&config(&[&a, &b, &c], &all, "")).unwrap();
    get_n(&p, 30).await;
    let t = p.handle.current().unwrap();
    assert_eq!(t.backends[0].state.ejected(), 3);
    let hits: Vec<usize> = [&a, &b, &c].iter().map(|u| u.hits()).collect();
    let replies = get_n(&p, 30).await;
    assert!(replies
        .iter()
        .all(|r| r.status == 503 && !r.header("x-upstream").is_empty()));
    let spread: Vec<usize> = [&a, &b, &c]
        .iter()
        .zip(hits)
        .map(|(u, h)| u.hits() - h)
        .collect();
    assert_eq!(spread, vec![10, 10, 10], "panic mode balances over all");
}

#[tokio::test]
async fn a_table_swap_keeps_ejections() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut p = TestProxy::start(&config(&[&a, &b], OUTLIER, "")).await;
    b.behaviour.fail_with(500);
    eventually(Duration::from_secs(5), "b ejected", || async {
        get_n(&p, 2).await;
        ejected(&p, b.addr)
    })
    .await;
    // An unrelated change: a new route.
    let changed = config(
        &[&a, &b],
        OUTLIER,
        "      - match: {prefix: /other}\n        direct_response: {status: 204}",
    );
    p.reload(&changed).unwrap();
    assert!(ejected(&p, b.addr), "ejection survives the swap");
    let before = b.hits();
    get_n(&p, 10).await;
    assert_eq!(b.hits(), before);
}

#[tokio::test]
async fn max_requests_fails_fast_with_the_breaker_named() {
    let slow = Upstream::start_with_delay("slow", Duration::from_secs(2)).await;
    let cb = "    circuit_breaker: {max_requests: 2}";
    let p = TestProxy::start(&config(&[&slow], cb, "")).await;
    let c = client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, url) = (c.clone(), p.url("/"));
            tokio::spawn(async move {
                let r = get(&c, &url).await;
                (r, Instant::now())
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let (r, at) = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(r.header("x-strait-error"), "circuit-open");
                assert_eq!(r.header("x-strait-circuit-breaker"), "max_requests");
                assert!(
                    at - started < Duration::from_millis(1500),
                    "rejected at once, not after queueing behind the 2 s answers"
                );
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(slow.behaviour.peak.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn pending_requests_past_max_connections_are_bounded() {
    // Long answers, so all 8 requests arrive while the first holds the only connection; a
    // long connect timeout, so the two waiting requests do not give up on the slot.
    let slow = Upstream::start_with_delay("slow", Duration::from_millis(800)).await;
    let cb = "    connect_timeout: 10s\n    circuit_breaker: {max_connections: 1, max_pending_requests: 2}";
    let p = TestProxy::start(&config(&[&slow], cb, "")).await;
    let c = client();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (c, url) = (c.clone(), p.url("/"));
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.header("x-strait-circuit-breaker"), "max_pending_requests");
        }
        statuses.push(r.status.as_u16());
    }
    statuses.sort_unstable();
    // One on the connection, two waiting for it; the rest turned away.
    assert_eq!(statuses, vec![200, 200, 200, 503, 503, 503, 503, 503]);
    assert_eq!(
        slow.behaviour.peak.load(Ordering::SeqCst),
        1,
        "one connection"
    );
    let t = p.handle.current().unwrap();
    assert!(t.backends[0].state.connections() <= 1);
}

const RETRY: &str = "        retry:
          retries: 2
          statuses: [503]
          backoff_base: 1ms
          backoff_max: 5ms";

#[tokio::test]
async fn retries_hide_a_flaky_upstream() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    a.behaviour.flaky.store(true, Ordering::SeqCst);
    b.behaviour.flaky.store(true, Ordering::SeqCst);
    let p = TestProxy::start(&config(&[&a, &b], "", RETRY)).await;
    let replies = get_n(&p, 50).await;
    let errors = replies.iter().filter(|r| r.status != 200).count();
    assert_eq!(errors, 0, "every failure was retried");
    assert!(a.hits() + b.hits() > 50, "some requests took a retry");
}

#[tokio::test]
async fn post_is_not_retried_on_status_but_is_on_connect_failure() {
    let a = Upstream::start("a").await;
    a.behaviour.fail_with(503);
    let p = TestProxy::start(&config(&[&a], "", RETRY)).await;
    let c = body_client();
    let post = |url: String| {
        Request::post(url)
            .body(Full::new(Bytes::from_static(b"order=1")))
            .unwrap()
    };
    let r = send_full(&c, post(p.url("/"))).await;
    assert_eq!(r.status, 503);
    assert_eq!(a.hits(), 1, "a POST is sent once");

    // A dead endpoint beside a live one: the connect failure is retried, POST or not.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    a.behaviour.recover();
    let yaml = config(&[&a], "", RETRY).replace(
        &format!("endpoints: [\"{}\"]", a.addr),
        &format!("endpoints: [\"{dead_addr}\", \"{}\"]", a.addr),
    );
    let mut p = p;
    p.reload(&yaml).unwrap();
    for _ in 0..10 {
        let r = send_full(&c, post(p.url("/"))).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-upstream"), "a");
    }
}

#[tokio::test]
async fn the_retry_budget_caps_retries_when_everything_fails() {
    let slow = Upstream::start_with_delay("slow", Duration::from_millis(150)).await;
    slow.behaviour.fail_with(503);
    let cb = "    circuit_breaker:
      retry_budget: {percent: 10, min_concurrency: 1}";
    let route = RETRY.replace("retries: 2", "retries: 3");
    let p = TestProxy::start(&config(&[&slow], cb, &route)).await;
    let c = client();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (c, url) = (c.clone(), p.url("/"));
            tokio::spawn(async move { get(&c, &url).await.status.as_u16() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 503);
    }
    let retries = slow.hits() - 40;
    // Without a budget every request would retry 3 times: 120 retries. With 10% of at most
    // 40 requests in flight, at most 4 retries run at once.
    assert!(retries < 40, "retries {retries}");
    assert!(slow.behaviour.peak.load(Ordering::SeqCst) <= 44);
}

#[tokio::test]
async fn grpc_status_is_retried() {
    // Two gRPC servers; only the second knows the service, so the first answers NOT_FOUND
    // (tonic sends it in trailers after empty headers, which Strait reads before deciding).
    let (unknown, _r1) = grpc_health_server("shop.Cart", None).await;
    let (known, _r2) = grpc_health_server("shop.Cart", Some(ServingStatus::Serving)).await;
    let yaml = format!(
        "access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - forward: {{backend: grpc}}
        retry:
          retries: 1
          grpc_statuses: [not_found]
          non_idempotent: true
backends:
  - name: grpc
    protocol: h2c
    endpoints: [\"{unknown}\", \"{known}\"]
"
    );
    let p = TestProxy::start(&yaml).await;
    let mut health = grpc_health_client(p.url("")).await;
    for _ in 0..6 {
        let status = grpc_check(&mut health, "shop.Cart")
            .await
            .expect("NOT_FOUND from the first server is retried on the second");
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

/// Whether endpoint `addr` of the first backend passes its active health checks.
fn healthy(p: &TestProxy, addr: std::net::SocketAddr) -> bool {
    let t = p.handle.current().unwrap();
    let e = t.backends[0]
        .endpoints
        .iter()
        .find(|e| e.addr == addr)
        .unwrap();
    e.state.snapshot().health.healthy
}

const HTTP_CHECK: &str = "    health_check:
      http: {path: /healthz}
      interval: 100ms
      timeout: 500ms
      jitter: 20ms
      healthy_threshold: 1
      unhealthy_threshold: 2";

#[tokio::test]
async fn http_health_checks_remove_and_restore_an_endpoint() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let p = TestProxy::start(&config(&[&a, &b], HTTP_CHECK, "")).await;
    b.behaviour.fail_with(500);
    eventually(Duration::from_secs(5), "b fails its checks", || async {
        !healthy(&p, b.addr)
    })
    .await;
    let replies = get_n(&p, 20).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.header("x-upstream") == "a"),
        "no traffic to the unhealthy endpoint"
    );
    b.behaviour.recover();
    eventually(Duration::from_secs(5), "b passes again", || async {
        healthy(&p, b.addr)
    })
    .await;
    let replies = get_n(&p, 20).await;
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.header("x-upstream") == "b")
            .count(),
        10
    );
    let metrics = p.handle.current().unwrap();
    assert!(metrics.backends[0].health_check.is_some());
}

#[tokio::test]
async fn tcp_health_checks_keep_traffic_off_a_dead_endpoint() {
    let a = Upstream::start("a").await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let check = "    health_check:
      tcp: {}
      interval: 100ms
      timeout: 500ms
      unhealthy_threshold: 1";
    let yaml = config(&[&a], check, "").replace(
        &format!("endpoints: [\"{}\"]", a.addr),
        &format!("endpoints: [\"{dead_addr}\", \"{}\"]", a.addr),
    );
    let p = TestProxy::start(&yaml).await;
    eventually(
        Duration::from_secs(5),
        "the dead endpoint is unhealthy",
        || async { !healthy(&p, dead_addr) },
    )
    .await;
    let replies = get_n(&p, 20).await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "no 502 from the dead endpoint"
    );
}

#[tokio::test]
async fn grpc_health_checks_follow_the_serving_status() {
    let (addr, reporter) = grpc_health_server("shop.Cart", Some(ServingStatus::NotServing)).await;
    let other = Upstream::start("other").await;
    let yaml = format!(
        "access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - forward: {{backend: grpc}}
backends:
  - name: grpc
    protocol: h2c
    endpoints: [\"{addr}\", \"{}\"]
    health_check:
      grpc: {{service: shop.Cart}}
      interval: 100ms
      healthy_threshold: 1
      unhealthy_threshold: 1
",
        other.addr
    );
    let p = TestProxy::start(&yaml).await;
    eventually(
        Duration::from_secs(5),
        "NOT_SERVING is unhealthy",
        || async { !healthy(&p, addr) },
    )
    .await;
    reporter
        .set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    eventually(Duration::from_secs(5), "SERVING is healthy", || async {
        healthy(&p, addr)
    })
    .await;
    // The HTTP/1.1-only upstream cannot answer a gRPC check: it never becomes healthy.
    assert!(!healthy(&p, other.addr));
}

#[tokio::test]
async fn a_connect_waits_for_a_slot_at_most_the_connect_timeout() {
    let a = Upstream::start_with_delay("a", Duration::from_secs(2)).await;
    let b = Upstream::start_with_delay("b", Duration::from_secs(2)).await;
    let cb = "    connect_timeout: 300ms\n    circuit_breaker: {max_connections: 1}";
    let p = TestProxy::start(&config(&[&a, &b], cb, "")).await;
    let c = client();
    // The first request holds the only connection for 2 s...
    let first = tokio::spawn({
        let (c, url) = (c.clone(), p.url("/"));
        async move { get(&c, &url).await }
    });
    eventually(
        Duration::from_secs(5),
        "the first request is upstream",
        || async { a.hits() + b.hits() == 1 },
    )
    .await;
    // ...so the second, for the other endpoint, finds no connection slot within its
    // connect timeout.
    let started = std::time::Instant::now();
    let r = get(&c, &p.url("/")).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("x-strait-circuit-breaker"), "max_connections");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(a.hits() + b.hits(), 1);
    assert_eq!(first.await.unwrap().status, 200);
}
