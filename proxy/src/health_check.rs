//! Active health checks: one task per endpoint of each backend that has `health_check`,
//! probing it on a jittered interval (HTTP request, TCP connect, or grpc.health.v1 `Check`)
//! and recording the verdict in the endpoint's [`crate::health::Health`] once the healthy or
//! unhealthy threshold is crossed. The request path only reads that verdict.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

use crate::endpoint::EndpointState;
use crate::table::spec::{HealthCheckSpec, HttpCheckSpec};
use crate::table::RouteTable;
use crate::upstream_tls::{negotiated_h2, UpstreamTls};

/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const GRPC_SERVING: u64 = 1;

/// Runs the checks of every endpoint the table in force wants checked.
#[derive(Debug, Default)]
pub struct HealthChecker {
    tasks: HashMap<(Arc<str>, SocketAddr), Running>,
}

#[derive(Debug)]
struct Running {
    spec: HealthCheckSpec,
    /// The backend's [`UpstreamTls::fingerprint`]: changed TLS settings restart the checks.
    tls: Option<u64>,
    state: Weak<EndpointState>,
    task: AbortHandle,
}

impl HealthChecker {
    /// Makes the running checks match `table`: starts checks for new endpoints, restarts
    /// those whose settings changed, and stops the rest (their endpoints count as healthy
    /// again, since nothing checks them any more). Must run inside the runtime.
    pub fn sync(&mut self, table: &RouteTable) {
        let mut wanted = HashMap::new();
        for (backend, spec) in table
            .backends
            .iter()
            .filter_map(|b| b.health_check.as_ref().map(|hc| (b, hc)))
        {
            for ep in &backend.endpoints {
                wanted.insert(
                    (Arc::clone(&backend.name), ep.addr),
                    (spec, &ep.state, &backend.tls),
                );
            }
        }
        self.tasks.retain(|key, running| {
            let keep = wanted.get(key).is_some_and(|(spec, _, tls)| {
                **spec == running.spec
                    && tls.as_deref().map(UpstreamTls::fingerprint) == running.tls
            });
            if !keep {
                running.task.abort();
                if let Some(state) = running.state.upgrade() {
                    state.health.set_healthy(true);
                }
            }
            keep
        });
        for (key, (spec, state, tls)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(run(
                Arc::clone(&key.0),
                key.1,
                spec.clone(),
                tls.clone(),
                Arc::downgrade(state),
            ));
            self.tasks.insert(
                key,
                Running {
                    spec: spec.clone(),
                    tls: tls.as_deref().map(UpstreamTls::fingerprint),
                    state: Arc::downgrade(state),
                    task: task.abort_handle(),
                },
            );
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for running in self.tasks.values() {
            running.task.abort();
        }
    }
}

/// Checks one endpoint until its state is gone (or the task is aborted).
async fn run(
    backend: Arc<str>,
    addr: SocketAddr,
    spec: HealthCheckSpec,
    tls: Option<Arc<UpstreamTls>>,
    state: Weak<EndpointState>,
) {
    let labels = |result: &'static str| {
        [
            ("backend", backend.to_string()),
            ("result", result.to_owned()),
        ]
    };
    let (pass, fail) = (
        metrics::counter!(crate::metrics::HEALTH_CHECKS, &labels("pass")),
        metrics::counter!(crate::metrics::HEALTH_CHECKS, &labels("fail")),
    );
    let (mut passes, mut failures) = (0u32, 0u32);
    loop {
        let outcome =
            match tokio::time::timeout(spec.timeout, check(addr, &spec, tls.as_deref())).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
            };
        let Some(state) = state.upgrade() else {
            return;
        };
        match outcome {
            Ok(()) => {
                pass.increment(1);
                passes += 1;
                failures = 0;
                if passes >= spec.healthy_threshold && state.health.set_healthy(true) {
                    tracing::info!(backend = &*backend, endpoint = %addr, "endpoint passes its health checks again; sending traffic");
                }
            }
            Err(reason) => {
                fail.increment(1);
                failures += 1;
                passes = 0;
                if failures >= spec.unhealthy_threshold && state.health.set_healthy(false) {
                    tracing::warn!(backend = &*backend, endpoint = %addr, %reason, "endpoint failed its health checks; no traffic until it passes");
                }
            }
        }
        drop(state);
        let jitter = spec.jitter.mul_f64(fastrand::f64());
        tokio::time::sleep(spec.interval + jitter).await;
    }
}

/// One check; `Err` says why it failed. HTTP and gRPC checks of a backend with `tls` go
/// over TLS with its settings, and an HTTP check speaks HTTP/2 when ALPN agreed on it.
async fn check(
    addr: SocketAddr,
    spec: &HealthCheckSpec,
    tls: Option<&UpstreamTls>,
) -> Result<(), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if spec.http.is_none() && spec.grpc.is_none() {
        // `tcp`: the connect was the check.
        return Ok(());
    }
    match tls {
        None => check_on(tcp, addr, spec, "http", false).await,
        Some(tls) => {
            let stream = tls
                .connect(tcp, addr, spec.timeout)
                .await
                .map_err(|e| e.to_string())?;
            let h2 = negotiated_h2(&stream);
            check_on(stream, addr, spec, "https", h2).await
        }
    }
}

/// The HTTP or gRPC check on a connected stream.
async fn check_on<T>(
    io: T,
    addr: SocketAddr,
    spec: &HealthCheckSpec,
    scheme: &str,
    h2: bool,
) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(http) = &spec.http {
        return check_http(io, addr, http, scheme, h2).await;
    }
    match &spec.grpc {
        Some(grpc) => check_grpc(io, addr, &grpc.service, scheme).await,
        None => Ok(()),
    }
}

async fn check_http<T>(
    io: T,
    addr: SocketAddr,
    spec: &HttpCheckSpec,
    scheme: &str,
    h2: bool,
) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let host = spec.host.clone().unwrap_or_else(|| addr.to_string());
    let method = Method::from_bytes(spec.method.as_bytes()).map_err(|e| e.to_string())?;
    let builder = Request::builder()
        .method(method)
        .header(header::USER_AGENT, "strait-health-check");
    let resp = if h2 {
        // HTTP/2 carries the host in :authority, from the URI.
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let req = builder
            .uri(format!("{scheme}://{host}{}", spec.path))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = builder
            .uri(spec.path.as_str())
            .header(header::HOST, host)
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?
    };
    let status = resp.status().as_u16();
    let [lo, hi] = spec.expected_statuses;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {lo}-{hi}"))
    }
}

async fn check_grpc<T>(io: T, addr: SocketAddr, service: &str, scheme: &str) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{scheme}://{addr}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "strait-health-check")
        .body(Full::new(grpc_frame(&check_request(service))))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    let headers_status = resp.headers().get("grpc-status").cloned();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response: {e}"))?;
    let grpc_status = headers_status
        .or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned())
        })
        .unwrap_or(HeaderValue::from_static("?"));
    if grpc_status != "0" {
        return Err(format!(
            "grpc-status {}",
            grpc_status.to_str().unwrap_or("?")
        ));
    }
    match serving_status(collected.to_bytes()) {
        Some(GRPC_SERVING) => Ok(()),
        Some(s) => Err(format!("serving status {s}, expected SERVING (1)")),
        None => Err("malformed HealthCheckResponse".to_owned()),
    }
}

/// `HealthCheckRequest { service }` in protobuf: field 1, length-delimited.
fn check_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    msg
}

/// A gRPC length-prefixed message: no compression flag, big-endian length, the message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(msg.len() + 5);
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

/// The `status` (field 1, varint) of a framed `HealthCheckResponse`; an absent field is
/// the default, `UNKNOWN` (0).
fn serving_status(mut body: Bytes) -> Option<u64> {
    if body.len() < 5 {
        return None;
    }
    if body.get_u8() != 0 {
        // Compressed: we never ask for it, so a server should not send it.
        return None;
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return None;
    }
    let mut msg = body.split_to(len);
    let mut status = 0;
    while msg.has_remaining() {
        let key = get_varint(&mut msg)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = get_varint(&mut msg)?,
            (_, 0) => {
                get_varint(&mut msg)?;
            }
            (_, 2) => {
                let n = get_varint(&mut msg)? as usize;
                if msg.len() < n {
                    return None;
                }
                msg.advance(n);
            }
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_request_and_reads_the_status() {
        assert_eq!(check_request("a.B"), vec![0x0a, 3, b'a', b'.', b'B']);
        assert_eq!(
            grpc_frame(&[0x08, 0x01]).as_ref(),
            &[0, 0, 0, 0, 2, 0x08, 0x01]
        );
        assert_eq!(serving_status(grpc_frame(&[0x08, 0x01])), Some(1));
        assert_eq!(serving_status(grpc_frame(&[0x08, 0x02])), Some(2));
        assert_eq!(
            serving_status(grpc_frame(&[])),
            Some(0),
            "absent field: UNKNOWN"
        );
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 9])), None);
    }
}
