//! Worker threads (`--worker-threads N`, here 2 as every test binary runs): each worker
//! serves every listener on a socket of its own, the kernel spreads new connections over
//! them, each worker keeps its own idle upstream connections (and borrows another's rather
//! than wait for a connection slot), and a second process cannot share a listener's address.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::{client, get, tempdir, Binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 upstream answering 200 on keep-alive connections, counting the connections
/// it accepts.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&opened);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, opened)
}

/// One request on a new connection that asks to be closed afterwards; the whole answer.
async fn one_request(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// `strait_downstream_connections_total` of listener `web`, per worker.
fn accepted_per_worker(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("strait_downstream_connections_total{"))
        .filter(|l| l.contains("listener=\"web\""))
        .map(|l| {
            let worker = l
                .split("worker=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .expect("a worker label")
                .to_owned();
            let n = l.rsplit(' ').next().unwrap().parse().unwrap();
            (worker, n)
        })
        .collect()
}

/// The binary, ready, with listener `web` forwarding everything to backend `app` at
/// `upstream`; `extra` ends the file (lines of the backend, or top-level keys). Returns it and
/// the listener's address.
async fn forwarding_to(
    dir: &tempdir::Dir,
    upstream: SocketAddr,
    extra: &str,
) -> (Binary, SocketAddr) {
    let cfg = dir.path().join("strait.yaml");
    let yaml = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: app}}\n\
         backends:\n  - name: app\n    endpoints: [\"{upstream}\"]\n{extra}"
    );
    std::fs::write(&cfg, yaml).unwrap();
    let strait = Binary::start(&cfg).await;
    strait.wait_ready().await;
    let addr = strait.listeners[0].1;
    (strait, addr)
}

/// `n` requests one after another, each on a new client connection, each answered 200 "ok"
/// within 5 s; the workers must have accepted `n` connections in all, spread over both (by a
/// hash of the client's port: all on one has a chance of 2 in 2^n).
async fn requests_on_new_connections(strait: &Binary, addr: SocketAddr, n: u64) {
    for i in 0..n {
        let answer = one_request(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
        assert!(answer.ends_with("ok"), "request {i}: {answer}");
    }
    let metrics = get(&client(), &strait.admin_url("/metrics")).await.body;
    let per_worker = accepted_per_worker(&metrics);
    let total: u64 = per_worker.iter().map(|(_, n)| n).sum();
    assert_eq!(total, n, "{per_worker:?}");
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert!(per_worker.iter().all(|(_, n)| *n > 0), "{per_worker:?}");
}

#[tokio::test]
async fn connections_spread_over_the_workers_and_each_keeps_its_own_upstream_connection() {
    let (upstream, opened) = counting_upstream().await;
    let dir = tempdir::Dir::new("workers");
    let (strait, addr) = forwarding_to(&dir, upstream, "").await;

    // One after another: a worker never needs a second upstream connection, and never takes
    // another worker's.
    requests_on_new_connections(&strait, addr, 40).await;
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "one upstream connection per worker, reused for all its requests"
    );
}

#[tokio::test]
async fn with_one_connection_allowed_every_worker_borrows_the_one_idle_connection() {
    // `max_connections: 1`: a worker with no idle connection of its own cannot open one, so it
    // must take the other worker's instead of waiting out `connect_timeout` (then 503).
    let (upstream, opened) = counting_upstream().await;
    let dir = tempdir::Dir::new("workers-borrow");
    let backend = "    connect_timeout: 3s\n    circuit_breaker: {max_connections: 1}\n";
    let (strait, addr) = forwarding_to(&dir, upstream, backend).await;
    // Each answered 200, not the 503 of a request that waited for a connection slot that
    // never came free.
    requests_on_new_connections(&strait, addr, 40).await;
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_listener_limit_of_one_serves_new_connections_on_every_worker() {
    // One place for the whole listener: an idle worker must not hold it while a connection
    // waits on the other worker's socket.
    let (upstream, _) = counting_upstream().await;
    let dir = tempdir::Dir::new("workers-limit");
    let (strait, addr) = forwarding_to(&dir, upstream, "limits: {max_connections: 1}\n").await;
    // About half of them would wait for ever otherwise (here: past 5 s).
    requests_on_new_connections(&strait, addr, 20).await;
}

#[tokio::test]
async fn a_second_process_cannot_share_a_listeners_address() {
    // The first Strait's workers listen with SO_REUSEPORT; a second one must not join them.
    let dir = tempdir::Dir::new("workers-bind");
    let config = |addr: &str| {
        format!("listeners:\n  - name: web\n    address: {addr}\n    routes:\n      - direct_response: {{status: 200}}\n")
    };
    let cfg = dir.path().join("strait.yaml");
    std::fs::write(&cfg, config("127.0.0.1:0")).unwrap();
    let first = Binary::start(&cfg).await;
    let addr = first.listeners[0].1;

    let second = dir.path().join("second.yaml");
    std::fs::write(&second, config(&addr.to_string())).unwrap();
    // A second Strait that did bind would run until killed: bounded, and killed on drop.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("--config")
        .arg(&second)
        .args(["--admin-addr", "127.0.0.1:0", "--worker-threads", "2"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the second Strait exits at once instead of serving the address")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    // The first one still answers.
    let status = get(&client(), &format!("http://{addr}/")).await.status;
    assert_eq!(status, 200);
}
