//! The response body type, and the accounting done when a response finishes.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::endpoint::InFlight;
use crate::h1_client::H1Body;
use crate::metrics::TargetMetrics;
use crate::service::InRequest;
use std::net::SocketAddr;
use std::sync::Arc;

/// The error a body's stream ends with: hyper's, or an HTTP/1.1 upstream's.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A body: streamed from the other side without buffering, or complete. Responses from
/// upstreams and request bodies sent once are streamed; Strait's own answers and request
/// bodies kept for retries are complete.
#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed without buffering: a request body from the client, or a response from an
    /// HTTP/2 upstream.
    Upstream(Incoming),
    /// A response streamed from an HTTP/1.1 upstream connection.
    H1(H1Body),
    /// A complete body (direct responses, errors).
    Full(Option<Bytes>),
    /// A request body kept for retries: its data, then its trailers if it had any.
    Kept(Option<Bytes>, Option<http::HeaderMap>),
    /// A stream whose first frame was read ahead (a request body too large to keep for
    /// retries, a gRPC response whose trailers were looked at), then the rest.
    Resumed(Option<Frame<Bytes>>, Incoming),
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::Full(None)
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        Self::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let from_hyper = |p: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>| {
            p.map(|f| f.map(|r| r.map_err(BodyError::from)))
        };
        match self.get_mut() {
            Self::Upstream(b) => from_hyper(Pin::new(b).poll_frame(cx)),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Kept(data, trailers) => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            Self::Resumed(first, rest) => match first.take() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None => from_hyper(Pin::new(rest).poll_frame(cx)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(b) => b.is_end_stream(),
            Self::H1(b) => b.is_end_stream(),
            Self::Full(b) => b.is_none(),
            Self::Kept(d, t) => d.is_none() && t.is_none(),
            Self::Resumed(first, rest) => first.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
            Self::Full(b) | Self::Kept(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Resumed(first, rest) => {
                let n = first
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + n);
                }
                hint.set_lower(rest.lower() + n);
                hint
            }
        }
    }
}

/// What is recorded when a request finishes: metrics, the access log line, and the end of
/// the endpoint's in-flight count. Runs on drop, so a client that goes away mid-body is
/// still counted.
#[derive(Debug)]
pub struct Completion {
    /// When the request arrived.
    pub start: Instant,
    /// Method.
    pub method: Method,
    /// Host as sent by the client.
    pub host: Option<HeaderValue>,
    /// Original URI.
    pub uri: Uri,
    /// Final status.
    pub status: StatusCode,
    /// Endpoint that served it.
    pub upstream: Option<SocketAddr>,
    /// Request id.
    pub request_id: HeaderValue,
    /// The request's trace and Strait's span in it.
    pub trace: crate::trace::TraceContext,
    /// The client's `tracestate`, kept only when a span will be exported.
    pub tracestate: Option<HeaderValue>,
    /// Retries made (attempts after the first).
    pub retries: u32,
    /// Listener name.
    pub listener: Arc<str>,
    /// Metrics handles of the route and backend.
    pub metrics: Arc<TargetMetrics>,
    /// Whether to write an access log line.
    pub access_log: bool,
    /// The endpoint's in-flight slot, released at the end.
    pub in_flight: Option<InFlight>,
    /// The backend's circuit-breaker request slot, released at the end.
    pub backend_slot: Option<crate::breaker::Slot>,
    /// Response body bytes sent.
    pub bytes: u64,
}

impl Drop for Completion {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.metrics.record(self.status, elapsed.as_secs_f64());
        if self.access_log {
            let host = self
                .host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-");
            let upstream = self.upstream.map(tracing::field::display);
            tracing::info!(
                target: "strait::access",
                listener = &*self.listener,
                method = %self.method,
                host,
                path = self.uri.path(),
                status = self.status.as_u16(),
                duration_ms = elapsed.as_secs_f64() * 1e3,
                upstream,
                bytes = self.bytes,
                request_id = self.request_id.to_str().unwrap_or("-"),
                trace_id = %self.trace.trace_id(),
            );
        }
        if self.trace.sampled() {
            if let Some(sink) = crate::trace::span_sink() {
                self.export(sink, elapsed);
            }
        }
    }
}

impl Completion {
    fn export(&self, sink: &dyn crate::trace::SpanSink, elapsed: std::time::Duration) {
        let end = std::time::SystemTime::now();
        sink.record(&crate::trace::FinishedRequest {
            trace: &self.trace,
            tracestate: self.tracestate.as_ref(),
            start: end.checked_sub(elapsed).unwrap_or(end),
            end,
            method: &self.method,
            host: self.host.as_ref().and_then(|h| h.to_str().ok()),
            path: self.uri.path(),
            status: self.status.as_u16(),
            listener: &self.listener,
            route: self.metrics.route(),
            backend: self.metrics.backend(),
            upstream: self.upstream,
            retries: self.retries,
            request_id: self.request_id.to_str().unwrap_or(""),
        });
    }
}

/// A response body that counts bytes and finishes a [`Completion`] when done or dropped.
#[derive(Debug)]
pub struct ObservedBody {
    inner: ProxyBody,
    /// Boxed: a response is moved through every layer of the request path on its way
    /// to hyper, and a boxed completion keeps it 264 bytes instead of 656.
    done: Option<Box<Completion>>,
    request: Option<InRequest>,
}

impl ObservedBody {
    /// A body with nothing to record (responses outside any route, e.g. after a panic).
    pub fn bare(inner: ProxyBody) -> Self {
        Self {
            inner,
            done: None,
            request: None,
        }
    }

    /// Wraps a body.
    pub fn new(inner: ProxyBody, done: Box<Completion>) -> Self {
        Self {
            inner,
            done: Some(done),
            request: None,
        }
    }

    /// Keeps the request counted as in progress on its connection until the body ends.
    pub(crate) fn in_request(&mut self, request: InRequest) {
        self.request = Some(request);
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(data)) = (this.done.as_mut(), f.data_ref()) {
                    d.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.done.take();
                this.request.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
