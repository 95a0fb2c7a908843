//! Route rate limits through a real proxy on 127.0.0.1: exact 429 counts, per-client-IP and
//! per-header buckets, the RateLimit headers, buckets across reloads, and the metrics.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;

/// One listener; route `limited` (any path) forwards to `up` with `rate_limit: {limit}`.
fn limited(up: &Upstream, limit: &str) -> String {
    format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: limited
        forward: {{backend: b}}
        rate_limit: {limit}
backends:
  - name: b
    endpoints: ["{}"]
"#,
        up.addr
    )
}

/// A client whose connections come from `ip` (another loopback address is another client).
fn client_from(ip: &str) -> HttpClient {
    let mut conn = HttpConnector::new();
    conn.set_local_address(Some(ip.parse().unwrap()));
    Client::builder(TokioExecutor::new()).build(conn)
}

async fn get_with(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(c, req.body(Empty::<Bytes>::new()).unwrap()).await
}

/// Statuses of `n` requests sent one after another.
async fn statuses(c: &HttpClient, url: &str, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get_with(c, url, headers).await.status.as_u16());
    }
    out
}

fn assert_429(r: &Reply, policy: &str) {
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("x-strait-error"), "rate-limited");
    assert_eq!(r.header("ratelimit-policy"), policy);
    let retry: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After seconds");
    assert!(retry > 0, "Retry-After {retry}");
    assert_eq!(
        r.header("ratelimit"),
        format!("\"default\";r=0;t={retry}"),
        "the effective window ends when Retry-After does"
    );
    assert_eq!(r.header("x-request-id").len(), 36);
    assert!(
        r.body
            .starts_with("strait: rate-limited: too many requests for route \"limited\""),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_burst_above_the_bucket_gets_exactly_the_excess_as_429() {
    let up = Upstream::start("up").await;
    let proxy = TestProxy::start(&limited(&up, "{requests: 1, per: 1m, burst: 5}")).await;
    let c = client();
    // All at once: concurrent requests race for the same bucket.
    let url = proxy.url("/x");
    let replies = futures_util::future::join_all((0..8).map(|_| get(&c, &url))).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, limited.len()), (5, 3));
    for r in &limited {
        assert_429(r, "\"default\";q=1;w=60");
        let retry: u64 = r.header("retry-after").parse().unwrap();
        assert!(retry <= 60, "one token per minute: {retry}");
    }
    assert_eq!(
        up.hits(),
        5,
        "the refused requests never reached the upstream"
    );
    let passed = replies.iter().find(|r| r.status == 200).unwrap();
    assert_eq!(passed.body, "up");
    assert_eq!(
        passed.header("ratelimit"),
        "",
        "no headers on allowed responses unless asked for"
    );
    // And one after the other, later: still refused, the bucket refills once a minute.
    assert_429(&get(&c, &url).await, "\"default\";q=1;w=60");
}

#[tokio::test]
async fn each_client_ip_has_its_own_bucket() {
    let up = Upstream::start("up").await;
    let limit = "{requests: 1, per: 1m, burst: 2, key: client_ip}";
    let proxy = TestProxy::start(&limited(&up, limit)).await;
    let (one, two) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    let url = proxy.url("/");
    assert_eq!(statuses(&one, &url, &[], 3).await, [200, 200, 429]);
    assert_eq!(statuses(&two, &url, &[], 3).await, [200, 200, 429]);
    assert_eq!(statuses(&one, &url, &[], 1).await, [429]);
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn each_header_value_has_its_own_bucket_and_requests_without_it_share_one() {
    let up = Upstream::start("up").await;
    let limit = "{requests: 1, per: 1m, burst: 2, key: {header: X-User}}";
    let proxy = TestProxy::start(&limited(&up, limit)).await;
    let (one, two) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    let url = proxy.url("/");
    let alice = [("x-user", "alice")];
    let bob = [("x-user", "bob")];
    assert_eq!(statuses(&one, &url, &alice, 3).await, [200, 200, 429]);
    assert_eq!(
        statuses(&two, &url, &alice, 1).await,
        [429],
        "the key is the header, not the client"
    );
    assert_eq!(statuses(&one, &url, &bob, 3).await, [200, 200, 429]);
    assert_eq!(statuses(&one, &url, &[], 1).await, [200]);
    assert_eq!(
        statuses(&two, &url, &[], 2).await,
        [200, 429],
        "requests without the header share one bucket"
    );
    assert_eq!(up.hits(), 6);
}

#[tokio::test]
async fn a_limit_keyed_on_the_request_id_sees_the_id_strait_makes_up() {
    // Strait makes up an id for a request that has none before the limit is checked, so
    // each such request is a key of its own; a client that repeats its id shares a bucket.
    let up = Upstream::start("up").await;
    let limit = "{requests: 1, per: 1m, burst: 1, key: {header: x-request-id}}";
    let proxy = TestProxy::start(&limited(&up, limit)).await;
    let c = client();
    let url = proxy.url("/");
    assert_eq!(statuses(&c, &url, &[], 4).await, [200, 200, 200, 200]);
    let same = [("x-request-id", "repeated")];
    assert_eq!(statuses(&c, &url, &same, 2).await, [200, 429]);
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn response_headers_count_down_on_allowed_responses() {
    let up = Upstream::start("up").await;
    let yaml = format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: limited
        match: {{prefix: /forward}}
        forward: {{backend: b}}
        rate_limit: {{requests: 3, per: 1m, response_headers: true}}
      - name: local
        match: {{prefix: /local}}
        direct_response: {{status: 200, body: ok}}
        rate_limit: {{requests: 10, per: 50s, burst: 2, response_headers: true}}
backends:
  - name: b
    endpoints: ["{}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&yaml).await;
    let c = client();
    // Three tokens per minute: one comes back every 20 s.
    for left in [2, 1, 0] {
        let r = get(&c, &proxy.url("/forward")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit-policy"), "\"default\";q=3;w=60");
        assert_eq!(r.header("ratelimit"), format!("\"default\";r={left};t=20"));
    }
    assert_429(
        &get(&c, &proxy.url("/forward")).await,
        "\"default\";q=3;w=60",
    );
    // A route that answers by itself has them too.
    for left in [1, 0] {
        let r = get(&c, &proxy.url("/local")).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
        assert_eq!(r.header("ratelimit-policy"), "\"default\";q=10;w=50");
        assert_eq!(r.header("ratelimit"), format!("\"default\";r={left};t=5"));
    }
}

/// Routes `a` and `b`, each limited; `a_limit` and `b_limit` are their `rate_limit`s, and
/// `extra` one more line of settings on `b`.
fn two_routes(up: &Upstream, a_limit: &str, b_limit: &str, extra: &str) -> String {
    format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: a
        match: {{prefix: /a}}
        forward: {{backend: b}}
        rate_limit: {a_limit}
      - name: b
        match: {{prefix: /b}}
        forward: {{backend: b}}
        rate_limit: {b_limit}
        {extra}
backends:
  - name: b
    endpoints: ["{}"]
"#,
        up.addr
    )
}

#[tokio::test]
async fn a_reload_keeps_a_routes_buckets_unless_its_own_limit_changes() {
    let up = Upstream::start("up").await;
    let a = "{requests: 1, per: 1m, burst: 2, key: client_ip}";
    let b = "{requests: 1, per: 1m, burst: 2}";
    let mut proxy = TestProxy::start(&two_routes(&up, a, b, "")).await;
    let c = client();
    let url = proxy.url("/a");
    assert_eq!(statuses(&c, &url, &[], 3).await, [200, 200, 429]);

    let unrelated = "response_headers: {add: {x-b: yes}}";
    proxy.reload(&two_routes(&up, a, b, unrelated)).unwrap();
    assert_eq!(statuses(&c, &url, &[], 1).await, [429], "unrelated change");

    let b_changed = "{requests: 1, per: 1m, burst: 5}";
    proxy.reload(&two_routes(&up, a, b_changed, "")).unwrap();
    assert_eq!(
        statuses(&c, &url, &[], 1).await,
        [429],
        "another route's limit"
    );

    // Whether the headers are sent is not part of the bucket.
    let a_headers = "{requests: 1, per: 1m, burst: 2, key: client_ip, response_headers: true}";
    proxy
        .reload(&two_routes(&up, a_headers, b_changed, ""))
        .unwrap();
    let r = get(&c, &url).await;
    assert_eq!(r.status, 429, "response_headers only");

    let a_changed = "{requests: 1, per: 1m, burst: 3, key: client_ip}";
    let generation = proxy
        .reload(&two_routes(&up, a_changed, b_changed, ""))
        .unwrap();
    assert_eq!(generation, 5);
    assert_eq!(
        statuses(&c, &url, &[], 4).await,
        [200, 200, 200, 429],
        "its own limit changed: a new bucket of 3"
    );
    assert_eq!(
        statuses(&c, &proxy.url("/b"), &[], 6).await,
        [200, 200, 200, 200, 200, 429]
    );
}

#[tokio::test]
async fn refused_requests_are_counted_and_keys_are_observable() {
    let dir = tempdir::Dir::new("rate-limit");
    let config = dir.write(
        "strait.yaml",
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: limited
        match: {prefix: /limited}
        direct_response: {status: 200}
        rate_limit: {requests: 1, per: 1h, burst: 1}
      - name: keyed
        direct_response: {status: 200}
        rate_limit: {requests: 1, per: 1h, key: client_ip, max_keys: 10}
"#,
    );
    let bin = Binary::start(&config).await;
    let (one, two) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    assert_eq!(
        statuses(&one, &bin.url("/limited"), &[], 3).await,
        [200, 429, 429]
    );
    assert_eq!(statuses(&one, &bin.url("/"), &[], 1).await, [200]);
    assert_eq!(statuses(&two, &bin.url("/"), &[], 2).await, [200, 429]);
    let c = client();
    let metrics = get(&c, &bin.admin_url("/metrics")).await.body;
    for line in [
        "strait_rate_limited_total{listener=\"web\",route=\"limited\"} 2",
        "strait_rate_limited_total{listener=\"web\",route=\"keyed\"} 1",
        "strait_requests_total{listener=\"web\",route=\"limited\",backend=\"\",class=\"4xx\"} 2",
        "strait_requests_total{listener=\"web\",route=\"limited\",backend=\"\",class=\"2xx\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    // The key count is published every second.
    let url = bin.admin_url("/metrics");
    eventually(Duration::from_secs(5), "two keys in the gauge", || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            get(&c, &url)
                .await
                .body
                .contains("strait_rate_limit_keys{listener=\"web\",route=\"keyed\"} 2")
        }
    })
    .await;
}
