//! W3C trace context, OTLP span export and correlated logs, on the built binary with real
//! upstreams and a real OTLP/HTTP collector on 127.0.0.1.

mod support;

use std::convert::Infallible;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message as _;
use support::*;
use tokio::net::TcpListener;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{TRACE_ID}-{CLIENT_SPAN}-01")
}

/// Accepts connections on a fresh listener (over TLS with `tls`) and hands each request
/// to `f`.
async fn serve<F, Fut>(f: F, tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (f, tls) = (f.clone(), tls.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => http.serve_connection(TokioIo::new(s), svc).await,
                    Some(tls) => match tls.accept(s).await {
                        Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                        Err(_) => return,
                    },
                };
            });
        }
    });
    addr
}

/// An upstream that keeps the headers of every request it gets.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Recorder {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let addr = serve(
            move |req: Request<Incoming>| {
                let s = Arc::clone(&s);
                async move {
                    s.lock().unwrap().push(req.headers().clone());
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                }
            },
            None,
        )
        .await;
        Self { addr, seen }
    }

    fn last(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

/// An OTLP/HTTP collector: decodes every `ExportTraceServiceRequest` posted to
/// `/v1/traces` and keeps its spans with their resource's `service.name`.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Collector {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A collector over HTTPS with this server configuration.
    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&spans);
        let addr = serve(
            move |req: Request<Incoming>| {
                let s = Arc::clone(&s);
                async move {
                    assert_eq!(req.uri().path(), "/v1/traces");
                    assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let export = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    for rs in export.resource_spans {
                        let service = rs
                            .resource
                            .as_ref()
                            .and_then(|r| string_attr(&r.attributes, "service.name"))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                s.lock().unwrap().push((service.clone(), span));
                            }
                        }
                    }
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    resp.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/x-protobuf"),
                    );
                    resp
                }
            },
            tls.clone(),
        )
        .await;
        let scheme = if tls.is_some() { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{addr}"),
            spans,
        }
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    /// Waits for the span of trace `trace_id` and returns it with its service name.
    async fn span_of(&self, trace_id: &str) -> (String, Span) {
        let find = || {
            self.spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| hex(&s.trace_id) == trace_id)
                .cloned()
        };
        eventually(Duration::from_secs(15), "the span is exported", || {
            let found = find().is_some();
            async move { found }
        })
        .await;
        find().unwrap()
    }
}

fn string_attr(
    attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(trace id, parent id, flags)` of a traceparent the upstream got, checked for form.
fn parts(traceparent: &str) -> (String, String, String) {
    let f: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(f.len(), 4, "{traceparent}");
    assert_eq!(f[0], "00");
    assert!(
        f[1].len() == 32 && f[2].len() == 16 && f[3].len() == 2,
        "{traceparent}"
    );
    let lower_hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    assert!(f[1..].iter().all(|s| lower_hex(s)), "{traceparent}");
    assert_ne!(f[1], "0".repeat(32));
    assert_ne!(f[2], "0".repeat(16));
    (f[1].to_owned(), f[2].to_owned(), f[3].to_owned())
}

fn config(
    dir: &tempdir::Dir,
    backend: SocketAddr,
    tracing: &str,
    route_extra: &str,
) -> std::path::PathBuf {
    dir.write(
        "strait.yaml",
        &format!(
            "{tracing}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: traced
        forward: {{backend: api}}
{route_extra}
backends:
  - name: api
    endpoints: [\"{backend}\"]
"
        ),
    )
}

/// Starts the binary on `cfg` with no OTLP endpoint from the environment unless `env`
/// sets one.
async fn start(cfg: &std::path::Path, env: &[(&str, &OsStr)]) -> Binary {
    let mut all: Vec<(&str, &OsStr)> = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new("")),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new("")),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", OsStr::new("")),
        ("OTEL_SERVICE_NAME", OsStr::new("")),
        ("OTEL_RESOURCE_ATTRIBUTES", OsStr::new("")),
    ];
    all.retain(|(k, _)| !env.iter().any(|(e, _)| e == k));
    all.extend_from_slice(env);
    Binary::start_with(&[OsStr::new("--config"), cfg.as_os_str()], &all).await
}

async fn get_with(bin: &Binary, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(bin.url("/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    send(&client(), req).await
}

#[tokio::test]
async fn client_trace_is_continued_with_strait_as_the_parent() {
    let up = Recorder::start().await;
    let dir = tempdir::Dir::new("trace-continue");
    let bin = start(&config(&dir, up.addr, "", ""), &[]).await;

    let tp = client_traceparent();
    let r = get_with(
        &bin,
        &[("traceparent", &tp), ("tracestate", "vendor=a1,other=b2")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    let (trace, parent, flags) = parts(seen["traceparent"].to_str().unwrap());
    assert_eq!(trace, TRACE_ID, "the trace id is kept");
    assert_ne!(
        parent, CLIENT_SPAN,
        "the upstream's parent is Strait's span"
    );
    assert_eq!(flags, "01");
    assert_eq!(seen["tracestate"], "vendor=a1,other=b2");
    assert_eq!(seen.get_all("traceparent").iter().count(), 1);

    // An unsampled trace stays unsampled, whatever the sample ratio.
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    get_with(&bin, &[("traceparent", &tp)]).await;
    let (trace, _, flags) = parts(up.last()["traceparent"].to_str().unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (TRACE_ID, "00"));
}

#[tokio::test]
async fn a_request_without_trace_context_starts_a_trace_sampled_per_config() {
    let up = Recorder::start().await;
    for (ratio, want_flags) in [("1.0", "01"), ("0", "00")] {
        let dir = tempdir::Dir::new("trace-new");
        let tracing = format!("tracing: {{sample_ratio: {ratio}}}");
        let bin = start(&config(&dir, up.addr, &tracing, ""), &[]).await;
        let mut traces = Vec::new();
        for _ in 0..5 {
            // A tracestate alone belongs to no trace: it is not sent on.
            let r = get_with(&bin, &[("tracestate", "vendor=orphan")]).await;
            assert_eq!(r.status, 200);
            let seen = up.last();
            assert!(seen.get("tracestate").is_none());
            let (trace, _, flags) = parts(seen["traceparent"].to_str().unwrap());
            assert_eq!(flags, want_flags, "sample_ratio {ratio}");
            traces.push(trace);
        }
        traces.sort();
        traces.dedup();
        assert_eq!(traces.len(), 5, "every request starts its own trace");
    }
}

#[tokio::test]
async fn an_invalid_traceparent_is_replaced_by_a_new_trace() {
    let up = Recorder::start().await;
    let dir = tempdir::Dir::new("trace-invalid");
    let bin = start(&config(&dir, up.addr, "", ""), &[]).await;
    let invalid = [
        format!("ff-{TRACE_ID}-{CLIENT_SPAN}-01"),
        format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32)),
        format!("00-{TRACE_ID}-{}-01", "0".repeat(16)),
        format!("00-{}-{CLIENT_SPAN}-01", TRACE_ID.to_uppercase()),
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-1"),
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01-extra"),
        "not a traceparent".to_owned(),
    ];
    for tp in &invalid {
        let r = get_with(&bin, &[("traceparent", tp), ("tracestate", "vendor=a1")]).await;
        assert_eq!(r.status, 200);
        let seen = up.last();
        let sent = seen["traceparent"].to_str().unwrap();
        assert_ne!(sent, tp);
        let (trace, _, _) = parts(sent);
        assert_ne!(trace, TRACE_ID, "{tp:?} was not replaced");
        assert!(seen.get("tracestate").is_none(), "{tp:?}: tracestate kept");
    }
}

fn attrs(span: &Span) -> std::collections::HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            Some((
                kv.key.clone(),
                string_attr(std::slice::from_ref(kv), &kv.key)?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn each_request_is_exported_as_a_server_span() {
    let up = Recorder::start().await;
    let collector = Collector::start().await;
    let dir = tempdir::Dir::new("trace-export");
    let tracing = "tracing: {service_name: edge-proxy}";
    let url = collector.url();
    let bin = start(
        &config(&dir, up.addr, tracing, ""),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new(&url)),
            ("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("50")),
        ],
    )
    .await;

    let tp = client_traceparent();
    let r = get_with(
        &bin,
        &[
            ("traceparent", &tp),
            ("x-request-id", "req-export-1"),
            ("host", "shop.example:8080"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let (_, upstream_parent, _) = parts(up.last()["traceparent"].to_str().unwrap());

    let (service, span) = collector.span_of(TRACE_ID).await;
    assert_eq!(service, "edge-proxy");
    assert_eq!(
        hex(&span.span_id),
        upstream_parent,
        "the upstream's parent is this span"
    );
    assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN);
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "HTTP GET");
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    let a = attrs(&span);
    assert_eq!(a["strait.route"], "traced");
    assert_eq!(a["strait.backend"], "api");
    assert_eq!(a["strait.listener"], "web");
    assert_eq!(a["strait.upstream.address"], up.addr.to_string());
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/");
    assert_eq!(a["server.address"], "shop.example");
    assert_eq!(a["strait.retries"], "0");
    assert_eq!(a["strait.request_id"], "req-export-1");
    assert_ne!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );

    // A new trace is exported too, and a 5xx marks the span as an error.
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = down.local_addr().unwrap();
    drop(down);
    // This time the endpoint comes from the flag, over a wrong one in the environment.
    let dir = tempdir::Dir::new("trace-export-502");
    let cfg = config(&dir, refused, "", "");
    let bin = Binary::start_with(
        &[
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("--otlp-endpoint"),
            OsStr::new(&url),
        ],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                OsStr::new("http://127.0.0.1:9"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("50")),
        ],
    )
    .await;
    let r = get_with(&bin, &[]).await;
    assert_eq!(r.status, 502);
    let request_id = r.header("x-request-id").to_owned();
    assert!(!request_id.is_empty());
    let id_of = |reply_id: &str| {
        collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| attrs(s).get("strait.request_id").map(String::as_str) == Some(reply_id))
            .map(|(_, s)| s.clone())
    };
    eventually(Duration::from_secs(15), "the 502 span is exported", || {
        let found = id_of(&request_id).is_some();
        async move { found }
    })
    .await;
    let span = id_of(&request_id).unwrap();
    assert!(span.parent_span_id.is_empty(), "a new trace has no parent");
    assert_eq!(attrs(&span)["http.response.status_code"], "502");
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
}

#[tokio::test]
async fn spans_still_queued_are_sent_when_strait_drains() {
    let up = Recorder::start().await;
    let collector = Collector::start().await;
    let dir = tempdir::Dir::new("trace-flush");
    let tracing = format!("tracing: {{otlp_endpoint: \"{}\"}}", collector.url());
    // A batch delay far longer than the test: only the flush at shutdown can send the span.
    let mut bin = start(
        &config(&dir, up.addr, &tracing, ""),
        &[("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("600000"))],
    )
    .await;
    let tp = client_traceparent();
    assert_eq!(get_with(&bin, &[("traceparent", &tp)]).await.status, 200);
    assert!(collector.spans.lock().unwrap().is_empty());
    bin.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), bin.child.wait())
        .await
        .expect("strait exits after SIGTERM")
        .unwrap();
    assert!(status.success());
    let (service, _) = collector.span_of(TRACE_ID).await;
    assert_eq!(service, "strait");
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_request_and_trace_ids() {
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = down.local_addr().unwrap();
    drop(down);
    let dir = tempdir::Dir::new("trace-logs");
    let retry = "        retry: {retries: 2, on_connect_failure: true, backoff_base: 1ms, backoff_max: 5ms}";
    let bin = start(&config(&dir, refused, "", retry), &[]).await;

    let tp = client_traceparent();
    let r = get_with(
        &bin,
        &[("traceparent", &tp), ("x-request-id", "req-logs-1")],
    )
    .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-strait-error"), "connect-failed");

    let access = |l: &serde_json::Value| l["target"] == "strait::access";
    let lines = || -> Vec<serde_json::Value> {
        bin.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l.contains("req-logs-1") || l.contains(TRACE_ID) || l.contains(&refused.to_string())
            })
            .map(|l| serde_json::from_str(l).expect("a JSON log line"))
            .collect()
    };
    eventually(Duration::from_secs(10), "the access log line", || {
        let done = lines().iter().any(access);
        async move { done }
    })
    .await;
    let lines = lines();
    let retries = lines
        .iter()
        .filter(|l| l["message"] == "upstream attempt failed; retrying")
        .count();
    assert_eq!(retries, 2, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "upstream request failed" && l["level"] == "WARN"),
        "{lines:#?}"
    );
    assert!(lines.len() >= 4, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["request_id"], "req-logs-1", "{l}");
        assert_eq!(l["trace_id"], TRACE_ID, "{l}");
    }
}

#[test]
fn an_invalid_otlp_endpoint_stops_strait_with_a_usage_error() {
    let dir = tempdir::Dir::new("trace-bad-endpoint");
    let cfg = config(&dir, "127.0.0.1:9".parse().unwrap(), "", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("--config")
        .arg(&cfg)
        .args([
            "--otlp-endpoint",
            "collector:4318",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid OTLP endpoint"));
}

#[tokio::test]
async fn spans_reach_an_https_collector_whose_ca_is_given_at_its_traces_url() {
    let up = Recorder::start().await;
    let ca = support::tls::Ca::new("otlp");
    let cert = ca.issue("collector", &["127.0.0.1"]);
    let collector = Collector::start_with(Some(cert.server_config(&[b"http/1.1"], None))).await;
    let dir = tempdir::Dir::new("trace-export-tls");
    let url = collector.url();
    assert!(url.starts_with("https://"), "{url}");
    // The traces URL, used as given, wins over a base URL that leads nowhere.
    let traces = format!("{url}/v1/traces");
    let bin = start(
        &config(&dir, up.addr, "", ""),
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OsStr::new(&traces)),
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                OsStr::new("http://127.0.0.1:9"),
            ),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.file.as_os_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("50")),
        ],
    )
    .await;
    let tp = client_traceparent();
    let r = get_with(&bin, &[("traceparent", &tp)]).await;
    assert_eq!(r.status, 200);
    let (_, span) = collector.span_of(TRACE_ID).await;
    assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN);
    assert!(
        bin.logged(&format!("\"url\":\"{traces}\"")),
        "exports to {traces}"
    );

    // A CA bundle that cannot be read stops Strait at startup, naming the variable.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("--config")
        .arg(config(&dir, up.addr, "", ""))
        .args(["--otlp-endpoint", &url, "--admin-addr", "127.0.0.1:0"])
        .env(
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            dir.path().join("missing.pem"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "{stderr}"
    );
}
