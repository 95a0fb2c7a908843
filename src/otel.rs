//! Span export over OTLP/HTTP (protobuf), switched on by an endpoint.
//!
//! Each sampled request becomes one `SpanData` built from what the request path already
//! recorded, handed to the SDK's batch processor (a bounded queue and its own thread): no
//! tracer, no span object while the request runs, and nothing at all when no endpoint is
//! set. The exporter posts through a hyper client on the main runtime, so no second HTTP
//! stack (and no OpenSSL) comes with it.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use strait_proxy::trace::{FinishedRequest, SpanSink};

/// How long one export may take, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Collectors answer with a small protobuf; anything bigger is not read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How long shutdown waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The running exporter; [`Exporter::shutdown`] sends what is still queued.
pub struct Exporter {
    processor: Arc<BatchSpanProcessor>,
    endpoint: String,
}

/// Where spans go, as the OpenTelemetry specification names the two ways to say it.
pub enum Endpoint<'a> {
    /// A collector's base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`): `/v1/traces` is appended.
    Base(&'a str),
    /// The full traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as it is.
    Traces(&'a str),
}

/// The variable that gives the full traces URL.
pub const TRACES_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// The variable that gives the collector's base URL.
pub const ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Starts exporting spans of sampled requests to the OTLP/HTTP collector at `endpoint`,
/// and installs the span sink of the data plane. Must be called from inside the runtime
/// that will carry the exports.
pub fn start(endpoint: Endpoint<'_>, service_name: &str) -> anyhow::Result<Exporter> {
    let url = match endpoint {
        Endpoint::Base(base) => traces_url(base)?,
        Endpoint::Traces(url) => {
            check_url(url)?;
            url.to_owned()
        }
    };
    let client = HyperClient {
        client: Client::builder(TokioExecutor::new()).build(connector()?),
        runtime: tokio::runtime::Handle::current(),
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .context("cannot build the OTLP exporter")?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, read by the default detectors, win
    // over the configured name, as in every other OpenTelemetry SDK.
    let mut resource = Resource::builder_empty().with_service_name(service_name.to_owned());
    if let Ok(attrs) = std::env::var("OTEL_RESOURCE_ATTRIBUTES") {
        resource = resource.with_attributes(parse_resource_attributes(&attrs));
    }
    if let Ok(name) = std::env::var("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(name);
    }
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource.build());
    // The batch settings come from the standard OTEL_BSP_* variables.
    let processor = Arc::new(BatchSpanProcessor::builder(exporter).build());
    let sink = Sink {
        processor: Arc::clone(&processor),
        scope: InstrumentationScope::builder("strait")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    if !strait_proxy::trace::set_span_sink(Box::new(sink)) {
        anyhow::bail!("a span sink is already installed");
    }
    Ok(Exporter {
        processor,
        endpoint: url,
    })
}

impl Exporter {
    /// The URL spans are posted to.
    pub fn url(&self) -> &str {
        &self.endpoint
    }

    /// Sends the spans still queued, waiting at most a few seconds. The wait runs on the
    /// blocking pool, so the runtime stays free to carry the last export.
    pub async fn shutdown(self) {
        let processor = self.processor;
        let done =
            tokio::task::spawn_blocking(move || processor.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
                .await;
        match done {
            Ok(Ok(())) => tracing::info!("spans flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "spans not flushed at shutdown"),
            Err(e) => tracing::warn!(error = %e, "spans not flushed at shutdown"),
        }
    }
}

/// `endpoint` with the OTLP/HTTP traces path, as the specification builds it from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    check_url(endpoint)?;
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

fn check_url(endpoint: &str) -> anyhow::Result<()> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("invalid OTLP endpoint {endpoint:?}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        anyhow::bail!(
            "invalid OTLP endpoint {endpoint:?}: expected http://host:port or https://host:port"
        );
    }
    Ok(())
}

/// `OTEL_EXPORTER_OTLP_CERTIFICATE`: the CA bundle that signs an `https` collector's
/// certificate, instead of the system's roots.
const CA_VARIABLE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";

/// Plain HTTP or HTTPS (rustls, TLS 1.2 and 1.3), whichever the endpoint says. The CA comes
/// from [`CA_VARIABLE`] when set, else the system's roots.
fn connector() -> anyhow::Result<Connector> {
    let roots = match std::env::var_os(CA_VARIABLE) {
        Some(path) => {
            strait_proxy::tls::load_roots(std::path::Path::new(&path)).context(CA_VARIABLE)?
        }
        None => strait_proxy::tls::system_roots(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(strait_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions for the OTLP exporter")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// `key=value,key=value`, as OTEL_RESOURCE_ATTRIBUTES is written.
fn parse_resource_attributes(s: &str) -> Vec<KeyValue> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| KeyValue::new(k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

struct Sink {
    processor: Arc<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

impl SpanSink for Sink {
    fn record(&self, r: &FinishedRequest<'_>) {
        let t = r.trace;
        let trace_state = r
            .tracestate
            .and_then(|v| v.to_str().ok())
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let span_context = SpanContext::new(
            TraceId::from(t.trace_id),
            SpanId::from(t.span_id),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        );
        let mut attributes = Vec::with_capacity(12);
        attributes.push(KeyValue::new(
            "http.request.method",
            r.method.as_str().to_owned(),
        ));
        attributes.push(KeyValue::new("url.path", r.path.to_owned()));
        if let Some(host) = r.host {
            attributes.push(KeyValue::new("server.address", host_only(host).to_owned()));
        }
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(r.status),
        ));
        attributes.push(KeyValue::new("strait.listener", r.listener.to_owned()));
        if !r.route.is_empty() {
            attributes.push(KeyValue::new("strait.route", r.route.to_owned()));
        }
        if !r.backend.is_empty() {
            attributes.push(KeyValue::new("strait.backend", r.backend.to_owned()));
        }
        if let Some(addr) = r.upstream {
            attributes.push(KeyValue::new("strait.upstream.address", addr.to_string()));
        }
        attributes.push(KeyValue::new("strait.retries", i64::from(r.retries)));
        attributes.push(KeyValue::new("strait.request_id", r.request_id.to_owned()));
        let status = if r.status >= 500 {
            Status::error(format!("status {}", r.status))
        } else {
            Status::Unset
        };
        self.processor.on_end(SpanData {
            span_context,
            parent_span_id: t.parent_id.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: t.parent_id.is_some(),
            span_kind: SpanKind::Server,
            name: span_name(r.method),
            start_time: r.start,
            end_time: r.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

fn span_name(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    let name = match *method {
        Method::GET => "HTTP GET",
        Method::POST => "HTTP POST",
        Method::PUT => "HTTP PUT",
        Method::DELETE => "HTTP DELETE",
        Method::HEAD => "HTTP HEAD",
        Method::PATCH => "HTTP PATCH",
        Method::OPTIONS => "HTTP OPTIONS",
        _ => return Cow::Owned(format!("HTTP {method}")),
    };
    Cow::Borrowed(name)
}

/// The host without its port, an IPv6 literal keeping its brackets.
fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Posts exports on the main runtime: the batch processor calls the exporter from its own
/// thread, which has no reactor for hyper's sockets.
#[derive(Debug)]
struct HyperClient {
    client: Client<Connector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for HyperClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let send = async {
                let resp = client.request(request.map(Full::new)).await?;
                let (parts, body) = resp.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?;
                Ok::<_, HttpError>(http::Response::from_parts(parts, body.to_bytes()))
            };
            match tokio::time::timeout(EXPORT_TIMEOUT, send).await {
                Ok(r) => r,
                Err(_) => Err("OTLP export timed out".into()),
            }
        });
        task.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_path_is_appended_once() {
        assert_eq!(
            traces_url("http://c:4318").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c:4318").unwrap(),
            "https://c:4318/v1/traces"
        );
        assert!(traces_url("c:4318").is_err());
        assert!(traces_url("ftp://c:4318").is_err());
    }

    #[test]
    fn host_without_port() {
        assert_eq!(host_only("a.example:8080"), "a.example");
        assert_eq!(host_only("a.example"), "a.example");
        assert_eq!(host_only("[::1]:80"), "[::1]");
    }
}
