//! DNS backends against a real authoritative DNS server on loopback, with the real binary:
//! spread over every record, TTL-driven refresh with a floor, failures keeping the last
//! good set, IPv6, CNAME chains, NXDOMAIN, and a `tcp` listener over a headless name.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use support::dns::DnsServer;
use support::{client, eventually, get, tempdir, Binary, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ZONE: &str = "strait.test.";

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

fn ips(v: &[Ipv4Addr]) -> Vec<IpAddr> {
    v.iter().map(|ip| IpAddr::V4(*ip)).collect()
}

/// Writes a config with an HTTP listener forwarding to backend `web` (on DNS name `name`)
/// and a `tcp` listener to the same backend, resolved by `dns` alone.
fn config(
    dir: &tempdir::Dir,
    dns: &DnsServer,
    name: &str,
    port: u16,
    dns_extra: &str,
) -> std::path::PathBuf {
    let yaml = format!(
        r#"
access_log:
  enabled: false
listeners:
  - name: http
    address: 127.0.0.1:0
    routes:
      - forward:
          backend: web
  - name: raw
    address: 127.0.0.1:0
    protocol: tcp
    tcp:
      backend: web
backends:
  - name: web
    dns: {name}:{port}
dns:
  nameservers: ["{ns}"]
  timeout: 300ms
{dns_extra}
"#,
        ns = dns.addr(),
    );
    dir.write("strait.yaml", &yaml)
}

/// Sends `n` requests and counts the answers by upstream name.
async fn spread(b: &Binary, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = get(&c, &b.url("/")).await;
        assert_eq!(r.status, 200, "body: {}", r.body);
        *seen.entry(r.header("x-upstream").to_owned()).or_default() += 1;
    }
    seen
}

/// Waits for `/ready`, which turns 200 once every DNS name has had a first answer.
async fn ready(b: &Binary) {
    let url = b.admin_url("/ready");
    eventually(
        Duration::from_secs(10),
        "/ready after the first answer",
        || async { get(&client(), &url).await.status == 200 },
    )
    .await;
}

async fn admin_json(b: &Binary, path: &str) -> serde_json::Value {
    let r = get(&client(), &b.admin_url(path)).await;
    serde_json::from_str(&r.body).unwrap_or_default()
}

/// The `/config` status of the DNS name of backend `web`.
async fn dns_status(b: &Binary) -> serde_json::Value {
    let v = admin_json(b, "/config").await;
    v["endpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == "web"))
        .map(|e| e["dns"]["status"].clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_spread_evenly_over_every_a_record() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(2), v4(3), v4(4)];
    let (port, _ups) = Upstream::start_on_ips(&["a", "b", "c"], &ips(&addrs)).await;
    dns.set_a("web.strait.test.", &addrs, 30);
    let dir = tempdir::Dir::new("dns-spread");
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, "")).await;
    ready(&b).await;
    let seen = spread(&b, 300).await;
    assert_eq!(seen.len(), 3, "every record gets traffic: {seen:?}");
    for (name, n) in &seen {
        assert_eq!(
            *n, 100,
            "round robin is exact over 3 records: {name} got {n}"
        );
    }
}

#[tokio::test]
async fn records_follow_the_ttl_but_never_faster_than_the_floor() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(5), v4(6), v4(7)];
    let (port, ups) = Upstream::start_on_ips(&["a", "b", "c"], &ips(&addrs)).await;
    // TTL 1s under a 2s floor: lookups must come every 2s, not every second.
    dns.set_a("web.strait.test.", &addrs[..2], 1);
    let dir = tempdir::Dir::new("dns-floor");
    let extra = "  min_refresh: 2s\n  max_refresh: 30s\n";
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, extra)).await;
    ready(&b).await;
    eventually(Duration::from_secs(10), "two endpoints", || async {
        spread(&b, 4).await.len() == 2
    })
    .await;

    let added = Instant::now();
    dns.set_a("web.strait.test.", &addrs, 1);
    eventually(
        Duration::from_secs(10),
        "the added record gets traffic",
        || async { spread(&b, 3).await.contains_key("c") },
    )
    .await;
    assert!(
        added.elapsed() < Duration::from_secs(8),
        "seen within a refresh or two (2 s floor), with room for a loaded machine"
    );

    dns.set_a("web.strait.test.", &addrs[1..], 1);
    eventually(
        Duration::from_secs(10),
        "the removed record gets no traffic",
        || async { !spread(&b, 4).await.contains_key("a") },
    )
    .await;
    let before = ups[0].hits();
    let seen = spread(&b, 20).await;
    assert_eq!(
        ups[0].hits(),
        before,
        "removed endpoint untouched: {seen:?}"
    );

    let times = dns.query_times("web.strait.test.");
    assert!(times.len() >= 3, "several refreshes: {times:?}");
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        // A/AAAA queries of one lookup arrive together; refreshes are the floor apart.
        if gap > Duration::from_millis(500) {
            assert!(
                gap >= Duration::from_millis(1900),
                "refresh after {gap:?}, floor is 2s"
            );
        }
    }
}

#[tokio::test]
async fn refresh_waits_for_the_ttl() {
    let dns = DnsServer::start(ZONE).await;
    let (port, _ups) = Upstream::start_on_ips(&["a"], &ips(&[v4(8)])).await;
    dns.set_a("web.strait.test.", &[v4(8)], 3);
    let dir = tempdir::Dir::new("dns-ttl");
    let extra = "  min_refresh: 500ms\n  max_refresh: 30s\n";
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, extra)).await;
    ready(&b).await;
    eventually(Duration::from_secs(15), "three lookups", || async {
        lookups(&dns.query_times("web.strait.test.")).len() >= 3
    })
    .await;
    let starts = lookups(&dns.query_times("web.strait.test."));
    for w in starts.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(2800) && gap < Duration::from_secs(6),
            "TTL 3s drives the refresh, got {gap:?}"
        );
    }
    drop(b);
}

/// The first query time of each lookup (its A and AAAA queries arrive together).
fn lookups(times: &[Instant]) -> Vec<Instant> {
    let mut out: Vec<Instant> = Vec::new();
    for t in times {
        if out
            .last()
            .is_none_or(|l| *t - *l > Duration::from_millis(500))
        {
            out.push(*t);
        }
    }
    out
}

#[tokio::test]
async fn a_silent_server_keeps_the_last_good_set() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(9), v4(10), v4(11)];
    let (port, _ups) = Upstream::start_on_ips(&["a", "b", "c"], &ips(&addrs)).await;
    dns.set_a("web.strait.test.", &addrs, 1);
    let dir = tempdir::Dir::new("dns-silent");
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, "")).await;
    ready(&b).await;
    eventually(Duration::from_secs(10), "three endpoints", || async {
        spread(&b, 6).await.len() == 3
    })
    .await;
    dns.set_answering(false);
    eventually(Duration::from_secs(15), "lookups fail", || async {
        dns_status(&b).await["phase"] == "failing"
    })
    .await;
    let status = dns_status(&b).await;
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out")
            || status["last_error"]
                .as_str()
                .unwrap_or("")
                .contains("timeout"),
        "{status}"
    );
    let seen = spread(&b, 30).await;
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![10; 3],
        "{seen:?}"
    );
    let metrics = get(&client(), &b.admin_url("/metrics")).await.body;
    assert!(
        metrics.contains(r#"strait_dns_failing{name="web.strait.test."} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"strait_dns_lookups_total{name="web.strait.test.",result="failure"}"#)
    );
}

#[tokio::test]
async fn ipv6_records_become_endpoints() {
    let dns = DnsServer::start(ZONE).await;
    let all: Vec<IpAddr> = vec![IpAddr::V4(v4(12)), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    let (port, _ups) = Upstream::start_on_ips(&["v4", "v6"], &all).await;
    dns.set_a("web.strait.test.", &[v4(12)], 30);
    dns.set_aaaa("web.strait.test.", &[Ipv6Addr::LOCALHOST], 30);
    let dir = tempdir::Dir::new("dns-v6");
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, "")).await;
    ready(&b).await;
    eventually(Duration::from_secs(10), "both families", || async {
        spread(&b, 4).await.len() == 2
    })
    .await;
    let status = dns_status(&b).await;
    assert_eq!(
        status["addresses"],
        serde_json::json!(["127.0.0.12", "::1"])
    );
}

#[tokio::test]
async fn cname_chains_are_followed() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(13), v4(14)];
    let (port, _ups) = Upstream::start_on_ips(&["a", "b"], &ips(&addrs)).await;
    dns.set_a("pods.strait.test.", &addrs, 30);
    dns.set_cname("alias.strait.test.", "pods.strait.test.", 30);
    let dir = tempdir::Dir::new("dns-cname");
    let b = Binary::start(&config(&dir, &dns, "alias.strait.test.", port, "")).await;
    ready(&b).await;
    eventually(
        Duration::from_secs(10),
        "the CNAME target's records",
        || async { spread(&b, 4).await.len() == 2 },
    )
    .await;
}

#[tokio::test]
async fn a_name_that_never_resolved_gets_503_naming_it() {
    let dns = DnsServer::start(ZONE).await;
    let dir = tempdir::Dir::new("dns-nx");
    let b = Binary::start(&config(&dir, &dns, "missing.strait.test.", 8080, "")).await;
    ready(&b).await;
    let c = client();
    eventually(Duration::from_secs(10), "NXDOMAIN recorded", || async {
        dns_status(&b).await["phase"] == "failing"
    })
    .await;
    let r = get(&c, &b.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-strait-error"), "no-endpoints");
    assert!(
        r.body.contains("missing.strait.test.:8080") && r.body.contains("NXDOMAIN"),
        "{}",
        r.body
    );
    // Failing is an answer: the replica is ready, and says why this backend is empty.
    assert_eq!(get(&c, &b.admin_url("/ready")).await.status, 200);
}

#[tokio::test]
async fn tcp_listener_spreads_connections_over_a_headless_name() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(15), v4(16), v4(17)];
    let (port, ups) = Upstream::start_on_ips(&["a", "b", "c"], &ips(&addrs)).await;
    dns.set_a("db.strait.test.", &addrs, 30);
    let dir = tempdir::Dir::new("dns-tcp");
    let b = Binary::start(&config(&dir, &dns, "db.strait.test.", port, "")).await;
    let raw = b.listeners.iter().find(|(n, _)| n == "raw").unwrap().1;
    ready(&b).await;
    // One request per connection: each connection is balanced on its own.
    for i in 0..30 {
        let mut s = tokio::net::TcpStream::connect(raw).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: db\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(r.is_ok(), "connection {i}: no EOF within 5s after {out:?}");
        assert!(out.starts_with("HTTP/1.1 200"), "connection {i}: {out}");
    }
    let hits: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    assert_eq!(
        hits,
        vec![10, 10, 10],
        "connections round-robin over the records"
    );
    // Counted when the relay ends, which can be a moment after the client saw EOF.
    let c = client();
    let url = b.admin_url("/metrics");
    eventually(Duration::from_secs(5), "all 30 relays counted", || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            get(&c, &url).await.body.contains(
                r#"strait_tcp_connections_total{listener="raw",backend="web",result="closed"} 30"#,
            )
        }
    })
    .await;
}

#[tokio::test]
async fn endpoint_state_survives_a_refresh() {
    let dns = DnsServer::start(ZONE).await;
    let addrs = [v4(18), v4(19), v4(20)];
    let (port, _ups) = Upstream::start_on_ips(&["a", "b", "c"], &ips(&addrs)).await;
    dns.set_a("web.strait.test.", &addrs[..1], 1);
    let dir = tempdir::Dir::new("dns-state");
    let b = Binary::start(&config(&dir, &dns, "web.strait.test.", port, "")).await;
    ready(&b).await;
    // A slow request holds an in-flight slot on the one endpoint while the answer grows.
    let url = b.url("/");
    let slow = tokio::spawn(async move {
        let req = http::Request::get(url)
            .header("x-delay-ms", "3000")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        support::send(&client(), req).await.status
    });
    let in_flight = |v: serde_json::Value, addr: &str| {
        v["endpoints"][0]["endpoints"]
            .as_array()
            .and_then(|eps| eps.iter().find(|e| e["address"] == addr).cloned())
            .map(|e| e["in_flight"].as_u64().unwrap_or(0))
    };
    let first = format!("127.0.0.18:{port}");
    eventually(
        Duration::from_secs(5),
        "the slow request is in flight",
        || async { in_flight(admin_json(&b, "/config").await, &first) == Some(1) },
    )
    .await;
    dns.set_a("web.strait.test.", &addrs, 1);
    eventually(
        Duration::from_secs(5),
        "the table has three endpoints",
        || async {
            admin_json(&b, "/config").await["endpoints"][0]["endpoints"]
                .as_array()
                .is_some_and(|a| a.len() == 3)
        },
    )
    .await;
    assert_eq!(
        in_flight(admin_json(&b, "/config").await, &first),
        Some(1),
        "the staying endpoint kept its in-flight count"
    );
    assert_eq!(slow.await.unwrap(), 200);
}
