//! Forwarding behaviour through a real proxy on 127.0.0.1: headers, errors, limits,
//! HTTP/2, WebSocket and gRPC, and table swaps under load.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::net::TcpListener;

fn one_backend(addr: impl std::fmt::Display, route_extra: &str) -> String {
    format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - match: {{prefix: /api}}
        forward: {{backend: b}}
        rewrite_prefix: /v2
        request_headers: {{set: {{x-added: yes}}}}
        response_headers: {{add: {{x-resp: added}}, remove: [x-upstream]}}
        {route_extra}
      - forward: {{backend: b}}
        {route_extra}
backends:
  - name: b
    endpoints: ["{addr}"]
"#
    )
}

#[tokio::test]
async fn forwarding_headers_rewrite_and_request_id() {
    let up = Upstream::start("up").await;
    let proxy = TestProxy::start(&one_backend(up.addr, "")).await;
    let c = client();
    let req = http::Request::get(proxy.url("/api/users?q=1"))
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .body(http_body_util::Empty::new())
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-seen-host"),
        "shop.example.com",
        "Host preserved"
    );
    assert_eq!(
        r.header("x-seen-xff"),
        "203.0.113.9, 127.0.0.1",
        "X-Forwarded-For appended"
    );
    assert_eq!(r.header("x-seen-proto"), "http");
    assert_eq!(
        r.header("x-seen-path"),
        "/v2/users?q=1",
        "prefix rewritten, query kept"
    );
    assert_eq!(r.header("x-seen-added"), "yes");
    assert_eq!(r.header("x-resp"), "added");
    assert_eq!(r.header("x-upstream"), "", "response header removed");
    let id = r.header("x-request-id");
    assert_eq!(id.len(), 36, "generated request id returned: {id:?}");
    assert_eq!(r.header("x-seen-request-id"), id, "same id sent upstream");
    // A client-supplied id is kept.
    let req = http::Request::get(proxy.url("/")).header("x-request-id", "abc-123");
    let r = send(&c, req.body(http_body_util::Empty::new()).unwrap()).await;
    assert_eq!(r.header("x-request-id"), "abc-123");
    assert_eq!(r.header("x-seen-request-id"), "abc-123");
}

#[tokio::test]
async fn dead_upstream_is_502_and_slow_upstream_is_504() {
    // A port that was just free: nothing listens there.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = TestProxy::start(&one_backend(dead, "")).await;
    let r = get(&client(), &proxy.url("/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-strait-error"), "connect-failed");
    assert!(
        r.body.contains(&dead.to_string()),
        "body says why: {}",
        r.body
    );

    let slow = Upstream::start_with_delay("slow", Duration::from_secs(5)).await;
    let proxy = TestProxy::start(&one_backend(slow.addr, "timeout: 200ms")).await;
    let started = std::time::Instant::now();
    let r = get(&client(), &proxy.url("/")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-strait-error"), "upstream-timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The route timeout holds on a kept-alive upstream connection whose timer was armed for an
/// earlier request: for a shorter timeout than that request's, and after the timer fired while
/// the connection was idle.
#[tokio::test]
async fn route_timeouts_hold_on_a_reused_upstream_connection() {
    let up = Upstream::start("up").await;
    let yaml = format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - match: {{prefix: /long}}
        forward: {{backend: b}}
        timeout: 5s
      - forward: {{backend: b}}
        timeout: 300ms
backends:
  - name: b
    endpoints: ["{}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&yaml).await;
    let c = client();
    let timed = |path: &str, delay_ms: u64| {
        let req = http::Request::get(proxy.url(path))
            .header("x-delay-ms", delay_ms.to_string())
            .body(http_body_util::Empty::new())
            .unwrap();
        let c = c.clone();
        async move {
            let started = std::time::Instant::now();
            let r = send(&c, req).await;
            (r.status.as_u16(), started.elapsed())
        }
    };
    assert_eq!(timed("/long", 0).await.0, 200);
    // The connection's timer is armed for /long's 5 s; /short's 300 ms must still hold.
    let (status, took) = timed("/short", 3000).await;
    assert_eq!(status, 504);
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(timed("/short", 0).await.0, 200);
    // Idle past the last deadline: the timer fires with no request waiting. A request that
    // comes in time is not cut short by it, and a late one is cut at its own deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(timed("/short", 100).await.0, 200);
    let (status, took) = timed("/short", 3000).await;
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn oversized_request_headers_are_rejected() {
    let up = Upstream::start("up").await;
    let proxy = TestProxy::start(&one_backend(up.addr, "")).await;
    let big = "x".repeat(80 * 1024); // over the 64 KiB default
    let req = http::Request::get(proxy.url("/")).header("x-big", big);
    let r = send(&client(), req.body(http_body_util::Empty::new()).unwrap()).await;
    assert_eq!(r.status, 431);
    assert_eq!(up.hits(), 0, "never reached the upstream");
}

#[tokio::test]
async fn h2c_downstream_reaches_an_http1_upstream() {
    let up = Upstream::start("up").await;
    let proxy = TestProxy::start(&one_backend(up.addr, "")).await;
    let req = http::Request::get(proxy.url("/x"))
        .version(http::Version::HTTP_2)
        .body(http_body_util::Empty::new())
        .unwrap();
    let r = send(&h2_client(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "up");
    assert_eq!(
        r.header("x-seen-host"),
        proxy.addr.to_string(),
        ":authority becomes Host"
    );
}

#[tokio::test]
async fn unmatched_request_without_default_route_is_404() {
    let proxy = TestProxy::start(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - match: {exact: /only}\n        direct_response: {status: 204}\n",
    )
    .await;
    let r = get(&client(), &proxy.url("/other")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-strait-error"), "no-route");
    assert!(r.body.contains("/other"));
}

/// Alternates between two configs that both route to the same upstreams.
fn swap_config(n: usize, a: &Upstream, b: &Upstream) -> String {
    let policy = if n.is_multiple_of(2) {
        "round_robin"
    } else {
        "least_request"
    };
    forward_all(policy, "", &quoted(&[a, b]))
}

#[tokio::test]
async fn reload_under_load_fails_no_request() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut proxy = TestProxy::start(&swap_config(0, &a, &b)).await;
    let c = client();
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), proxy.url("/"));
        load.spawn(async move {
            let mut ok = 0;
            for _ in 0..750 {
                let r = get(&c, &url).await;
                assert_eq!(r.status, 200, "{}", r.body);
                ok += 1;
            }
            ok
        });
    }
    for n in 1..=40 {
        let generation = proxy.reload(&swap_config(n, &a, &b)).unwrap();
        assert_eq!(generation, n as u64 + 1);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut total = 0;
    while let Some(r) = load.join_next().await {
        total += r.unwrap();
    }
    assert_eq!(total, 3000);
    assert_eq!(a.hits() + b.hits(), 3000);
}

#[tokio::test]
async fn bad_reload_keeps_the_running_table() {
    let up = Upstream::start("up").await;
    let mut proxy = TestProxy::start(&one_backend(up.addr, "")).await;
    let err = proxy
        .reload(&one_backend("not-an-address", ""))
        .unwrap_err();
    assert!(
        err.contains("test.yaml:") && err.contains("expected ip:port"),
        "{err}"
    );
    let err = proxy.reload("listeners: [").unwrap_err();
    assert!(err.contains("test.yaml:"), "{err}");
    assert_eq!(proxy.handle.current().unwrap().generation, 1);
    assert_eq!(get(&client(), &proxy.url("/")).await.body, "up");
}

/// A WebSocket echo server.
async fn ws_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_echo_survives_a_table_swap() {
    let echo = ws_echo().await;
    let mut proxy = TestProxy::start(&one_backend(echo, "")).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .expect("upgrade through the proxy");
    assert_eq!(resp.status(), 101);
    ws.send("before".into()).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "before"
    );
    // Swap to a table whose backend has no endpoints: the open tunnel is unaffected.
    proxy
        .reload("listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - direct_response: {status: 503}\n")
        .unwrap();
    assert_eq!(
        get(&client(), &proxy.url("/")).await.status,
        503,
        "new table in force"
    );
    ws.send("after".into()).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_text().unwrap(),
        "after"
    );
}

#[tokio::test]
async fn grpc_stream_survives_a_table_swap() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

    let (grpc_addr, reporter) =
        grpc_health_server("svc", Some(tonic_health::ServingStatus::Serving)).await;
    let yaml = |policy: &str| forward_all(policy, "protocol: h2c", &[format!("\"{grpc_addr}\"")]);
    let mut proxy = TestProxy::start(&yaml("round_robin")).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    // Unary call: trailers (grpc-status) made it through.
    let r = client
        .check(HealthCheckRequest {
            service: "svc".into(),
        })
        .await
        .expect("unary call through the proxy");
    assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
    // Server stream opened before the swap keeps delivering after it.
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "svc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    proxy.reload(&yaml("least_request")).unwrap();
    reporter
        .set_service_status("svc", tonic_health::ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("update within 5s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
}

#[tokio::test]
async fn drain_finishes_an_in_flight_request() {
    let slow = Upstream::start_with_delay("slow", Duration::from_millis(500)).await;
    let proxy = TestProxy::start(&one_backend(slow.addr, "")).await;
    let c = client();
    let url = proxy.url("/");
    let inflight = tokio::spawn(async move { get(&c, &url).await });
    slow.wait_for_hits(1).await;
    let addr = proxy.addr;
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .expect("drains once the request finishes");
    let r = inflight.await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "slow"));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn dot_segments_cannot_escape_a_prefix() {
    let up = Upstream::start("up").await;
    let yaml = format!(
        r#"
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - match: {{prefix: /public}}
        forward: {{backend: b}}
      - match: {{prefix: /admin}}
        direct_response: {{status: 403, body: admin-blocked}}
backends:
  - name: b
    endpoints: ["{}"]
"#,
        up.addr
    );
    let proxy = TestProxy::start(&yaml).await;
    let c = client();
    let r = get(&c, &proxy.url("/public/../admin/x")).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (403, "admin-blocked"));
    let r = get(&c, &proxy.url("/public/%2e%2E/admin")).await;
    assert_eq!(r.status, 403);
    // Encoded unreserved characters are decoded before matching.
    let r = get(&c, &proxy.url("/%61dmin")).await;
    assert_eq!(r.status, 403);
    let r = get(&c, &proxy.url("/public/./a/../b?q=1")).await;
    assert_eq!(
        r.header("x-seen-path"),
        "/public/b?q=1",
        "normalized path forwarded"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn connection_limit_holds_extra_connections_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = TestProxy::start(&answering_ok("{max_connections: 1}")).await;
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 256];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The second connection is accepted by the kernel but not served while the first is open.
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "second connection served while the limit was reached"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("served once the first closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = TestProxy::start(&answering_ok("{header_read_timeout: 300ms}")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap(); // never finishes the head
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection closed by the server");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_keep_alive_wait_is_bounded_by_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = TestProxy::start(&answering_ok("{header_read_timeout: 300ms}")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "kept alive between requests"
        );
    }
    // No next request: the connection is closed once the head timeout has passed since the
    // last response, long before the 5 minutes of idle_timeout.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5s")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed, not answered");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

/// The head timeout runs only while no request is in progress: a slow upstream, a response
/// body with long pauses and a quiet WebSocket all outlast it.
#[tokio::test]
async fn requests_and_tunnels_in_progress_outlast_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = "limits: {header_read_timeout: 200ms}\n";

    let slow = Upstream::start_with_delay("slow", Duration::from_millis(700)).await;
    let proxy = TestProxy::start(&format!("{limits}{}", one_backend(slow.addr, ""))).await;
    let r = get(&client(), &proxy.url("/")).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "slow"));

    // An upstream that pauses in the middle of its body.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paused = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    assert!(n > 0, "request head");
                    head.extend_from_slice(&b[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(700)).await;
                s.write_all(b"cd").await.unwrap();
            });
        }
    });
    let proxy = TestProxy::start(&format!("{limits}{}", one_backend(paused, ""))).await;
    let r = get(&client(), &proxy.url("/")).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "abcd"));

    let echo = ws_echo().await;
    let proxy = TestProxy::start(&format!("{limits}{}", one_backend(echo, ""))).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .expect("upgrade through the proxy");
    for text in ["first", "after a quiet spell"] {
        ws.send(text.into()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().into_text().unwrap(), text);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}

/// HTTP/2 connections have no head timer: one that stays quiet between requests (before
/// the first one too) is kept for idle_timeout.
#[tokio::test]
async fn a_quiet_h2c_connection_outlasts_header_read_timeout() {
    let up = Upstream::start("up").await;
    let yaml = format!(
        "limits: {{header_read_timeout: 200ms}}\n{}",
        one_backend(up.addr, "")
    );
    let proxy = TestProxy::start(&yaml).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let req = http::Request::get(proxy.url("/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = send
            .send_request(req)
            .await
            .expect("same connection still open");
        assert_eq!(r.status(), 200);
    }
    assert!(!conn.is_finished());
}

/// A connection that has sent nothing stays in the kernel (TCP_DEFER_ACCEPT), so it holds no
/// connection slot: with `max_connections: 1`, a silent connection opened first does not keep
/// out a speaking one. Without the option the silent one is accepted first and holds the only
/// slot until the head timeout (30 s here). The kernel hands a silent connection over after
/// about a second anyway, so an attempt whose request left later than that proves nothing
/// and is repeated.
#[tokio::test]
async fn a_silent_connection_holds_no_connection_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = TestProxy::start(&answering_ok(
        "{max_connections: 1, header_read_timeout: 30s}",
    ))
    .await;
    // Serving (the listener's options set) before the silent connection arrives; the
    // connection closes, so its slot frees.
    let mut ready = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    ready
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    ready.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    drop(ready);
    for attempt in 1..=3 {
        let silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let opened = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let sent = opened.elapsed();
        if sent >= Duration::from_millis(700) {
            eprintln!("attempt {attempt}: the request left {sent:?} after the silent connection");
            continue;
        }
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered while the silent connection stays open")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        drop(silent);
        return;
    }
    panic!("no attempt sent its request within 700 ms of the silent connection");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = TestProxy::start(&answering_ok("{idle_timeout: 300ms}")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Now idle: the server closes the keep-alive connection once the idle time has passed.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within 5s")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed, not answered");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// An HTTP/1.1 upstream that answers every request with `200 ok` and sends each request head
/// it read, as text, to the channel.
async fn head_recorder() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A request's path, the headers the client adds, and the values the upstream must see of
/// X-Forwarded-For, -Proto and -Host.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], [&'a [&'a str]; 3]);

/// The values of the head's lines named `name`, in order.
fn head_values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[tokio::test]
async fn strait_headers_reach_an_http1_upstream_once_whichever_way_they_are_written() {
    // The forwarding headers, the trace context and a made-up request id: Strait writes them
    // straight into the upstream head unless the client sent one of them, a route rule changes
    // them or a hash reads the id; then they go through the header map. Either way the upstream
    // must see each once, with the right value, and the request id the client gets back.
    let (addr, mut heads) = head_recorder().await;
    let proxy = TestProxy::start(&format!(
        r#"
access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - match: {{prefix: /rules}}
        forward: {{backend: b}}
        request_headers: {{set: {{x-forwarded-proto: https}}, remove: [x-forwarded-host]}}
      - match: {{prefix: /hashed}}
        forward: {{backend: hashed}}
      - forward: {{backend: b}}
backends:
  - name: b
    endpoints: ["{addr}"]
  # The hash must find the request id in the header map.
  - name: hashed
    policy: ring_hash
    hash: {{header: x-request-id}}
    endpoints: ["{addr}"]
"#
    ))
    .await;
    let c = client();
    let mut next = async |path: &str, extra: &[(&str, &str)]| {
        let mut req = http::Request::get(proxy.url(path)).header("host", "shop.example.com");
        for (n, v) in extra {
            req = req.header(*n, *v);
        }
        let r = send(&c, req.body(http_body_util::Empty::new()).unwrap()).await;
        assert_eq!(r.status, 200, "{path}");
        let head = tokio::time::timeout(Duration::from_secs(10), heads.recv())
            .await
            .expect("the upstream got the request")
            .unwrap();
        let returned = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(
            head_values(&head, "x-request-id"),
            [returned.as_str()],
            "{head}"
        );
        (head, returned)
    };

    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let cases: [Case; 5] = [
        // Nothing from the client: Strait's own.
        ("/", &[], [&["127.0.0.1"], &["http"], &["shop.example.com"]]),
        // The client's request id only.
        (
            "/",
            &[("x-request-id", "client-id-1")],
            [&["127.0.0.1"], &["http"], &["shop.example.com"]],
        ),
        // The client's own: X-Forwarded-Host and the trace kept, the rest Strait's.
        (
            "/",
            &[
                ("x-forwarded-host", "edge.example.com"),
                ("x-forwarded-proto", "https"),
                ("traceparent", parent),
            ],
            [&["127.0.0.1"], &["http"], &["edge.example.com"]],
        ),
        // A route's rules win over Strait's headers.
        ("/rules", &[], [&["127.0.0.1"], &["https"], &[]]),
        (
            "/hashed",
            &[],
            [&["127.0.0.1"], &["http"], &["shop.example.com"]],
        ),
    ];
    let mut traces = Vec::new();
    let mut ids = Vec::new();
    for (path, sent, expected) in cases {
        let (head, id) = next(path, sent).await;
        ids.push(id);
        for (name, values) in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"]
            .into_iter()
            .zip(expected)
        {
            assert_eq!(head_values(&head, name), values, "{name} in {head}");
        }
        assert!(head.ends_with("\r\n\r\n") && !head.contains("\r\n\r\n\r\n"));
        let tp = head_values(&head, "traceparent");
        assert_eq!(tp.len(), 1, "one traceparent in {head}");
        assert!(
            tp[0].len() == 55 && tp[0].starts_with("00-") && tp[0].ends_with("-01"),
            "{head}"
        );
        traces.push(tp[0].to_owned());
    }
    assert!(
        traces[2].starts_with("00-0af7651916cd43dd8448eb211c80319c-") && traces[2] != parent,
        "the client's trace continues with Strait's span: {traces:?}"
    );
    assert!(!traces[0].starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    assert_eq!(ids[1], "client-id-1");
    // Made-up ids are UUIDs (8-4-4-4-12 hex digits), a new one per request.
    for i in [0, 2, 3, 4] {
        let groups: Vec<usize> = ids[i].split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{ids:?}");
        assert!(
            ids[i].bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()),
            "{ids:?}"
        );
    }
    let made_up = [&ids[0], &ids[2], &ids[3], &ids[4]];
    for (i, a) in made_up.iter().enumerate() {
        assert!(!made_up[i + 1..].contains(a), "{ids:?}");
    }
}
