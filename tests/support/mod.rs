//! Shared test harness: real upstream servers on 127.0.0.1:0, an in-process proxy, the
//! built binary, pods in network namespaces (`netns`), and an `eventually` helper that polls
//! with a deadline instead of sleeping.
#![allow(dead_code)]

pub mod dns;
pub mod k8s;
pub mod kube_api;
pub mod netns;
pub mod tempdir;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_control::publisher::Publisher;
use strait_control::source::file;
use strait_proxy::listener::{serve, ListenerContext};
use strait_proxy::table::TableHandle;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A real HTTP/1.1 upstream that answers with its name. It echoes what it saw in headers
/// (`x-seen-host`, `x-seen-path`, `x-seen-xff`, `x-seen-request-id`) and waits
/// `x-delay-ms` before answering when the request asks for it.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    /// How it answers; tests change it while it serves.
    pub behaviour: Arc<Behaviour>,
    _stop: watch::Sender<()>,
}

impl Upstream {
    pub async fn start(name: &str) -> Self {
        Self::start_with_delay(name, Duration::ZERO).await
    }

    /// An upstream that always waits `delay` before answering.
    pub async fn start_with_delay(name: &str, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener, delay)
    }

    /// Upstreams on the same port of several loopback addresses (127.0.0.2, ...), as the
    /// pods behind one headless Service name: a DNS answer carries addresses, not ports.
    pub async fn start_on_ips(names: &[&str], ips: &[std::net::IpAddr]) -> (u16, Vec<Self>) {
        'retry: for _ in 0..20 {
            let first = TcpListener::bind((ips[0], 0)).await.unwrap();
            let port = first.local_addr().unwrap().port();
            let mut listeners = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)).await {
                    Ok(l) => listeners.push(l),
                    // Taken on that address by something else: try another port.
                    Err(_) => continue 'retry,
                }
            }
            let ups = names
                .iter()
                .zip(listeners)
                .map(|(n, l)| Self::serve(n, l, Duration::ZERO))
                .collect();
            return (port, ups);
        }
        panic!("no port free on all of {ips:?}");
    }

    /// An upstream on a listener the caller bound, e.g. inside a [`netns::Pod`].
    pub fn serve_listener(name: &str, listener: TcpListener) -> Self {
        Self::serve(name, listener, Duration::ZERO)
    }

    fn serve(name: &str, listener: TcpListener, delay: Duration) -> Self {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Behaviour::default());
        let b = Arc::clone(&behaviour);
        let (stop, mut stopped) = watch::channel(());
        let n: Arc<str> = name.into();
        let h = Arc::clone(&hits);
        tokio::spawn(async move {
            loop {
                let (s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stopped.changed() => return,
                };
                let (n, h, b) = (Arc::clone(&n), Arc::clone(&h), Arc::clone(&b));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (n, h, b) = (Arc::clone(&n), Arc::clone(&h), Arc::clone(&b));
                        async move { Ok::<_, Infallible>(answer(&n, &h, &b, delay, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            name: name.to_owned(),
            hits,
            behaviour,
            _stop: stop,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Waits until this upstream has received `n` requests.
    pub async fn wait_for_hits(&self, n: usize) {
        let hits = Arc::clone(&self.hits);
        eventually(
            Duration::from_secs(5),
            "requests reach the upstream",
            move || {
                let now = hits.load(Ordering::SeqCst);
                async move { now >= n }
            },
        )
        .await;
    }
}

/// How an [`Upstream`] answers, changed by tests while it serves.
#[derive(Default)]
pub struct Behaviour {
    /// Answer with this status instead of 200 (0: 200).
    pub status: std::sync::atomic::AtomicU16,
    /// Answer every other request (the 1st, 3rd, ...) with 503.
    pub flaky: std::sync::atomic::AtomicBool,
    flaky_count: AtomicUsize,
    in_flight: AtomicUsize,
    /// Most requests it had in progress at once.
    pub peak: AtomicUsize,
}

impl Behaviour {
    pub fn fail_with(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn recover(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.flaky.store(false, Ordering::SeqCst);
    }
}

async fn answer(
    name: &str,
    hits: &AtomicUsize,
    b: &Behaviour,
    delay: Duration,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let now = b.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    b.peak.fetch_max(now, Ordering::SeqCst);
    let resp = answer_inner(name, b, delay, req).await;
    b.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

async fn answer_inner(
    name: &str,
    b: &Behaviour,
    delay: Duration,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let extra = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    let sleep = delay + extra;
    if !sleep.is_zero() {
        tokio::time::sleep(sleep).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(name.to_owned())));
    let status = match b.status.load(Ordering::SeqCst) {
        0 if b.flaky.load(Ordering::SeqCst)
            && b.flaky_count
                .fetch_add(1, Ordering::SeqCst)
                .is_multiple_of(2) =>
        {
            503
        }
        0 => 200,
        s => s,
    };
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    let h = resp.headers_mut();
    h.insert("x-upstream", name.parse().unwrap());
    for (seen, header) in [
        ("x-seen-host", "host"),
        ("x-seen-xff", "x-forwarded-for"),
        ("x-seen-proto", "x-forwarded-proto"),
        ("x-seen-request-id", "x-request-id"),
        ("x-seen-added", "x-added"),
        ("x-seen-connection", "connection"),
        ("x-seen-identity", "x-client-identity"),
    ] {
        if let Some(v) = req.headers().get(header) {
            h.insert(seen, v.clone());
        }
    }
    h.insert(
        "x-seen-path",
        req.uri()
            .path_and_query()
            .unwrap()
            .as_str()
            .parse()
            .unwrap(),
    );
    resp
}

/// A config whose one listener sends every request to backend `b`. `extra` is one more line
/// of backend settings (e.g. `protocol: h2c`, `hash: {header: x-user}`); `endpoints` are
/// YAML flow items (`"127.0.0.1:80"` or `{address: "...", weight: 0}`).
pub fn forward_all(policy: &str, extra: &str, endpoints: &[String]) -> String {
    format!(
        "access_log: {{enabled: false}}\nlisteners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: b}}\nbackends:\n  - name: b\n    policy: {policy}\n    {extra}\n    endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// Upstream addresses as quoted YAML items, for [`forward_all`].
pub fn quoted(ups: &[&Upstream]) -> Vec<String> {
    ups.iter().map(|u| format!("\"{}\"", u.addr)).collect()
}

/// A config with one listener whose only route answers 200 `ok`, plus the given `limits`
/// (YAML flow mapping such as `{idle_timeout: 300ms}`).
pub fn answering_ok(limits: &str) -> String {
    format!(
        "limits: {limits}\nlisteners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - direct_response: {{status: 200, body: ok}}\n"
    )
}

/// A proxy running in this process on 127.0.0.1:0, fed from YAML text.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub publisher: Publisher,
    pub handle: TableHandle,
    stop: watch::Sender<bool>,
    pub served: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// Starts the first listener of `yaml` on a free port.
    pub async fn start(yaml: &str) -> Self {
        let spec = file::parse(Path::new("test.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
        let handle = TableHandle::default();
        let mut publisher = Publisher::new(handle.clone());
        publisher
            .publish(spec.clone(), "test")
            .expect("config compiles");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let cx = ListenerContext::new(
            spec.listeners[0].name.as_str().into(),
            handle.clone(),
            spec.limits.clone(),
        );
        let served = tokio::spawn(serve(listener, cx, async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            addr,
            publisher,
            handle,
            stop,
            served,
        }
    }

    /// Publishes new YAML (listeners must stay the same).
    pub fn reload(&mut self, yaml: &str) -> Result<u64, String> {
        let spec = file::parse(Path::new("test.yaml"), yaml).map_err(|e| e.to_string())?;
        self.publisher
            .publish(spec, "test")
            .map_err(|e| format!("{e:?}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops accepting and drains; resolves when every connection has finished.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.served.await;
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response with its body read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// A client for requests with a body.
pub fn body_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request with a body on a [`body_client`].
pub async fn send_full(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response within 10s")
        .expect("request succeeds");
    reply(resp).await
}

/// Reads a whole response.
async fn reply(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn send(client: &HttpClient, req: Request<Empty<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response within 10s")
        .expect("request succeeds");
    reply(resp).await
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, Request::get(url).body(Empty::new()).unwrap()).await
}

/// GET with a Host header.
pub async fn get_host(client: &HttpClient, url: &str, host: &str) -> Reply {
    send(
        client,
        Request::get(url)
            .header("host", host)
            .body(Empty::new())
            .unwrap(),
    )
    .await
}

/// Polls `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The built `strait` binary, running with JSON logs; its listener and admin addresses are
/// read from its log lines, so configs can use port 0.
pub struct Binary {
    pub child: tokio::process::Child,
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Binary {
    pub async fn start(config: &Path) -> Self {
        let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
        Self::start_with(&args, &[]).await
    }

    /// Starts the binary with these arguments (before the test's logging and admin flags)
    /// and extra environment variables; an empty value removes the variable.
    pub async fn start_with(args: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"));
        for (k, _) in env.iter().filter(|(_, v)| v.is_empty()) {
            command.env_remove(k);
        }
        let mut child = command
            .args(args)
            .envs(
                env.iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (*k, *v)),
            )
            .args([
                "--log-format",
                "json",
                "--admin-addr",
                "127.0.0.1:0",
                "--worker-threads",
                "2",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("strait binary starts");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut listeners = Vec::new();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let admin = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.lock().unwrap().push(line.clone());
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let addr = || {
                    v["address"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap()
                };
                match v["message"].as_str() {
                    Some("listening") => {
                        listeners.push((v["listener"].as_str().unwrap().to_owned(), addr()))
                    }
                    Some("admin listening") => return addr(),
                    _ => {}
                }
            }
            panic!("strait exited before listening: {:?}", log.lock().unwrap());
        })
        .await
        .expect("strait listens within 20s");
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            listeners,
            admin,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listeners[0].1, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} {pid}");
    }

    /// Waits (15 s at most) until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let c = client();
        let url = self.admin_url("/ready");
        eventually(Duration::from_secs(15), "strait is ready", || {
            let (c, url) = (c.clone(), url.clone());
            async move { get(&c, &url).await.status == 200 }
        })
        .await;
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

/// A tonic gRPC server with the standard health service on 127.0.0.1; `service` has
/// `status` (`None`: unknown to it, so `Check` answers NOT_FOUND). The reporter changes it.
pub async fn grpc_health_server(
    service_name: &str,
    status: Option<tonic_health::ServingStatus>,
) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    grpc_health_server_on(listener, service_name, status).await
}

/// [`grpc_health_server`] on a listener the caller bound, e.g. inside a [`netns::Pod`].
pub async fn grpc_health_server_on(
    listener: tokio::net::TcpListener,
    service_name: &str,
    status: Option<tonic_health::ServingStatus>,
) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    if let Some(s) = status {
        reporter.set_service_status(service_name, s).await;
    }
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, reporter)
}

/// A gRPC health client over h2c to `url` (e.g. a [`TestProxy`]'s `url("")`).
pub async fn grpc_health_client(
    url: String,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("a valid URL")
        .connect()
        .await
        .expect("the proxy accepts h2c");
    tonic_health::pb::health_client::HealthClient::new(channel)
}

/// `Check` of `service`, through `client`: the serving status, or the gRPC error.
pub async fn grpc_check(
    client: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<i32, tonic::Status> {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

/// Sends `n` health checks (service "x") over one HTTP/2 connection to `url`, with
/// `authority` as the `:authority` a client would send, and counts the answers by status.
pub async fn grpc_checks_over_one_connection(
    url: String,
    authority: &str,
    n: usize,
) -> std::collections::HashMap<i32, usize> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .expect("Strait accepts h2c");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut seen = std::collections::HashMap::new();
    for _ in 0..n {
        let s = grpc_check(&mut client, "x").await.expect("a check answer");
        *seen.entry(s).or_insert(0) += 1;
    }
    seen
}

/// Sends one GET per new connection to `127.0.0.1:port` (an HTTP server behind a TCP relay),
/// once the relay answers at all, and counts the `n` answers by body.
pub async fn bodies_over_fresh_connections(
    port: u16,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let url = format!("http://127.0.0.1:{port}/");
    let fresh = |url: String| async move {
        // A client per request: one TCP connection each.
        let answer =
            tokio::time::timeout(Duration::from_secs(2), client().get(url.parse().unwrap()));
        match answer.await {
            Ok(Ok(resp)) => {
                use http_body_util::BodyExt;
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                Some(String::from_utf8_lossy(&body).into_owned())
            }
            _ => None,
        }
    };
    eventually(Duration::from_secs(15), "the TCP port relays", || {
        let f = fresh(url.clone());
        async move { f.await.is_some() }
    })
    .await;
    let mut seen = std::collections::HashMap::new();
    for _ in 0..n {
        let body = fresh(url.clone()).await.expect("relayed");
        *seen.entry(body).or_insert(0) += 1;
    }
    seen
}
