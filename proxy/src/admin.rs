//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::table::TableHandle;

/// What the admin endpoints report on.
#[derive(Debug)]
pub struct Admin {
    /// The table in force.
    pub table: TableHandle,
    /// Renders `/metrics`; `None` when no recorder is installed (some tests).
    pub prometheus: Option<PrometheusHandle>,
    /// Set on SIGTERM: `/ready` turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
}

impl Admin {
    /// Admin state over a table handle.
    pub fn new(table: TableHandle, prometheus: Option<PrometheusHandle>) -> Self {
        Self {
            table,
            prometheus,
            draining: AtomicBool::new(false),
        }
    }

    /// Marks the process as draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Ready once a table is in force and every DNS name in it has had a first answer
    /// (good or bad), so a new replica does not take traffic it would answer with 503.
    fn ready(&self) -> Response<Full<Bytes>> {
        if self.draining.load(Ordering::SeqCst) {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        }
        let Some(table) = self.table.current() else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "no routing table yet\n");
        };
        let pending: Vec<String> = table
            .backends
            .iter()
            .filter(|b| !b.dns_answered)
            .filter_map(|b| b.dns.as_ref())
            .map(|n| format!("{}:{}", n.host(), n.port()))
            .collect();
        if pending.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            let body = format!("waiting for DNS: {}\n", pending.join(", "));
            text(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => self.ready(),
            "/metrics" => match &self.prometheus {
                Some(p) => {
                    let mut r = Response::new(Full::new(Bytes::from(p.render())));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                None => text(StatusCode::NOT_FOUND, "metrics recorder not installed\n"),
            },
            "/config" => match self.table.current() {
                Some(t) => match serde_json::to_vec_pretty(&t.view()) {
                    Ok(json) => {
                        let mut r = Response::new(Full::new(Bytes::from(json)));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
                },
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no routing table yet\n"),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "admin endpoints: /live /ready /metrics /config\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves the admin endpoints over HTTP/1.1 until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = admin.answer(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
