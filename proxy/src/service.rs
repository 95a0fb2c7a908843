//! The request path: find the route, then answer, redirect or forward.
//!
//! The table guard is held only for the lookup; the request keeps an `Arc` of its route, so
//! a table swap never changes a request already in flight and never waits for one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{Completion, ObservedBody, ProxyBody};
use crate::breaker::Breaker;
use crate::clock::{clock_ns, clock_ns_at};
use crate::error::{ProxyError, BREAKER_HEADER, ERROR_HEADER};
use crate::h1_client::RequestHead;
use crate::headers::{self, X_REQUEST_ID};
use crate::health::Outcome;
use crate::listener::ConnActivity;
use crate::pool;
use crate::rate_limit::RateLimitHeaders;
use crate::router::{host_port, normalize_host, normalize_path, MAX_HOST_LEN};
use crate::table::{
    Action, Backend, DirectResponse, Endpoint, HashKey, Redirect, RetryPolicy, Route, RouteTable,
    TableHandle,
};
use crate::trace::{span_sink, TraceContext, TRACEPARENT, TRACESTATE};
use crate::upstream::{is_idempotent, Upstream};

/// What every request on one downstream connection shares.
#[derive(Debug)]
pub struct ConnContext {
    /// The table in force.
    pub table: TableHandle,
    /// Index of this listener in the table.
    pub listener: usize,
    /// Listener name.
    pub listener_name: Arc<str>,
    /// The client's address.
    pub client: SocketAddr,
    /// The client's IP as a header value, for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto` and redirects that keep the scheme.
    pub scheme: &'static str,
    /// For connections on `https` listeners: the listener's TLS settings and what the
    /// handshake established.
    pub tls: Option<ConnTls>,
    /// `Strict-Transport-Security` for every response (HTTPS listeners with `hsts`).
    pub hsts: Option<HeaderValue>,
    /// The requests in progress, for the connection's request-head timer.
    pub activity: Arc<ConnActivity>,
}

/// One request (until its response body ends) or tunnel in progress on a connection; the
/// connection's request-head timer waits while any is.
#[derive(Debug)]
pub struct InRequest(Arc<ConnContext>);

impl InRequest {
    fn begin(cx: Arc<ConnContext>) -> Self {
        cx.activity.begin();
        Self(cx)
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.activity.end();
    }
}

/// What a TLS handshake established for a connection.
#[derive(Debug)]
pub struct ConnTls {
    /// The listener's TLS settings at handshake time.
    pub listener: Arc<crate::https::TlsListener>,
    /// The client-auth setting (site) the connection was made under.
    pub site: usize,
    /// The identity header of that site and the client certificate's identity.
    pub identity: Option<(http::HeaderName, Option<HeaderValue>)>,
}

/// Handles one request. Never fails: errors become responses, and a panic becomes a 500
/// for this request only.
///
/// Everything before the first wait (routing, the request's headers, picking the backend)
/// runs in this call, so the future returned holds only what the wait needs: hyper moves a
/// handler's future into place for every request, and the request path's whole state would
/// make that a copy of over a kilobyte.
pub fn handle(
    cx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ObservedBody>, Infallible>> + Send {
    let version = req.version();
    let busy = InRequest::begin(cx);
    let mut ids = None;
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| proxy(&busy.0, req, &mut ids)));
    async move {
        // The response is changed in place from here on: it is hundreds of bytes, and each
        // `map` or by-value pass would copy it.
        let (result, limit_headers) = match started {
            Ok(Started::Done(resp)) => (Ok(resp), None),
            Ok(Started::Forwarding(forwarding, limit_headers)) => (
                AssertUnwindSafe(forwarding).catch_unwind().await,
                limit_headers,
            ),
            Err(panic) => (Err(panic), None),
        };
        let cx = &busy.0;
        match result {
            Ok(mut resp) => {
                if let Some(h) = &limit_headers {
                    h.apply(resp.headers_mut());
                }
                if let Some(h) = &cx.hsts {
                    resp.headers_mut()
                        .insert(header::STRICT_TRANSPORT_SECURITY, h.clone());
                }
                resp.body_mut().in_request(busy);
                Ok(resp)
            }
            Err(_) => {
                metrics::counter!(crate::metrics::HANDLER_PANICS).increment(1);
                let (request_id, trace_id) = match &ids {
                    Some((r, t)) => (r.to_str().ok(), Some(tracing::field::display(t.trace_id()))),
                    None => (None, None),
                };
                tracing::error!(
                    listener = &*cx.listener_name,
                    request_id,
                    trace_id,
                    "request handler panicked; answered 500"
                );
                let mut resp = error_response(&ProxyError::Internal, version);
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                let mut resp = resp.map(ObservedBody::bare);
                resp.body_mut().in_request(busy);
                Ok(resp)
            }
        }
    }
}

/// Where the request path stands when it first has to wait.
enum Started<F> {
    /// Answered: a direct response, a redirect, or an error.
    Done(Response<ObservedBody>),
    /// Forwarding (boxed, so that the future holding it stays small), and the rate
    /// limiter's headers for its response.
    Forwarding(Pin<Box<F>>, Option<RateLimitHeaders>),
}

/// The request path up to its first wait. `ids` gets the request id and trace context as
/// soon as they exist, so that a panic can still be logged with them.
fn proxy(
    cx: &Arc<ConnContext>,
    mut req: Request<Incoming>,
    ids: &mut Option<(HeaderValue, TraceContext)>,
) -> Started<impl Future<Output = Response<ObservedBody>> + Send> {
    let start = cx.activity.arrival();
    #[cfg(test)]
    tests::panic_if_asked(&req, "route");
    let mut bad_path = false;
    if let Some(path) = normalize_path(req.uri().path()) {
        match with_path(req.uri(), &path) {
            Some(uri) => *req.uri_mut() = uri,
            None => bad_path = true,
        }
    }
    let host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });

    let (found, access_log, sample_ratio) = {
        let guard = cx.table.load();
        let Some(table) = guard.as_ref() else {
            let err = ProxyError::NoEndpoints("no routing table has been published yet".into());
            return Started::Done(error_response(&err, req.version()).map(ObservedBody::bare));
        };
        let Some(lt) = table.listener(cx.listener, &cx.listener_name) else {
            let err = ProxyError::NoEndpoints("this listener is being removed".into());
            return Started::Done(error_response(&err, req.version()).map(ObservedBody::bare));
        };
        let mut buf = [0u8; MAX_HOST_LEN];
        let raw_host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
        let h = normalize_host(raw_host, &mut buf);
        if let Some(tls) = &cx.tls {
            if !tls.listener.allows(tls.site, h) {
                let err = ProxyError::Misdirected(h.to_owned());
                return Started::Done(error_response(&err, req.version()).map(ObservedBody::bare));
            }
        }
        let route = if bad_path {
            None
        } else {
            lt.router.find(
                h,
                host_port(raw_host),
                req.uri().path(),
                req.method(),
                req.headers(),
            )
        };
        let found = match route {
            // The backend is taken from the same table as the route: a request never mixes
            // generations.
            Some(route) => Ok((Arc::clone(route), pick_target(table, route))),
            None => Err(Arc::clone(&lt.unmatched)),
        };
        (found, table.access_log, table.spec.tracing.sample_ratio)
    };

    // The id is made after matching, so a route's header condition sees what the client sent.
    // A made-up id is put in the request's map only where something reads it there (a rate
    // limit here, `forward` for the rest); an HTTP/1.1 upstream mostly gets it written
    // straight into the request head.
    let (request_id, mut id_pending) = match req.headers().get(&X_REQUEST_ID) {
        Some(id) => (id.clone(), false),
        None => (headers::new_request_id(), true),
    };
    let trace = TraceContext::for_request(req.headers(), sample_ratio);
    *ids = Some((request_id.clone(), trace));
    // Only an exported span needs the client's tracestate after the request is sent.
    let tracestate = match (trace.parent_id, trace.sampled() && span_sink().is_some()) {
        (Some(_), true) => req.headers().get(&TRACESTATE).cloned(),
        _ => None,
    };
    // The backend's series when a backend was picked, else the route's (or the unmatched one).
    let (found, metrics) = match found {
        Ok((route, Some((backend, metrics)))) => (Ok((route, Some(backend))), metrics),
        Ok((route, None)) => {
            let metrics = Arc::clone(&route.local_metrics);
            (Ok((route, None)), metrics)
        }
        Err(unmatched) => (Err(()), unmatched),
    };
    let mut done = Box::new(Completion {
        start,
        method: req.method().clone(),
        host,
        uri: req.uri().clone(),
        // Every normal path sets the real status; one that unwinds from a panic is a 500.
        status: StatusCode::INTERNAL_SERVER_ERROR,
        upstream: None,
        request_id,
        trace,
        tracestate,
        retries: 0,
        listener: Arc::clone(&cx.listener_name),
        metrics,
        access_log,
        in_flight: None,
        backend_slot: None,
        bytes: 0,
    });

    let (route, target) = match found {
        Ok(found) => found,
        Err(_) if bad_path => {
            let err = ProxyError::BadRequest("unusable path after removing dot segments");
            return Started::Done(finish_error(err, req.version(), done));
        }
        Err(_) => {
            let err = ProxyError::NoRoute {
                host: done
                    .host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                path: done.uri.path().to_owned(),
            };
            return Started::Done(finish_error(err, req.version(), done));
        }
    };

    let mut limit_headers = None;
    if let Some(rl) = &route.rate_limit {
        if id_pending && rl.limiter().keys_on(&X_REQUEST_ID) {
            req.headers_mut()
                .insert(X_REQUEST_ID.clone(), done.request_id.clone());
            id_pending = false;
        }
        match rl.check(cx.client.ip(), req.headers()) {
            Ok(h) => limit_headers = h,
            Err(limited) => {
                let err = ProxyError::RateLimited {
                    route: Arc::clone(&route.name),
                    retry_after: limited.retry_after,
                };
                let mut resp = finish_error(err, req.version(), done);
                limited.apply(resp.headers_mut());
                return Started::Done(resp);
            }
        }
    }

    let mut resp = match &route.action {
        Action::Direct(d) => direct(d, req.version()),
        Action::Redirect(r) => redirect(r, &req, cx.scheme),
        // Boxed in place: the forwarding future is kilobytes, and a box keeps every later
        // move of it to a pointer.
        Action::Forward(_) => {
            let cx = Arc::clone(cx);
            let forwarding = boxed_in_place(|| forward(cx, route, target, req, id_pending, done));
            return Started::Forwarding(forwarding, limit_headers);
        }
    };
    finish_response(&route, &mut resp, &done);
    if let Some(h) = &limit_headers {
        h.apply(resp.headers_mut());
    }
    done.status = resp.status();
    Started::Done(resp.map(|b| ObservedBody::new(b, done)))
}

/// Boxes a large future made by `make`. Allocating first and writing the future straight
/// into the box lets the compiler build it there; `Box::pin(make())` builds it on the stack
/// and copies all of it (kilobytes for the forwarding future) into the box.
fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// A forward route's backend for this request (weighted split) and its metrics.
type Picked = (Arc<Backend>, Arc<crate::metrics::TargetMetrics>);

fn pick_target(table: &RouteTable, route: &Route) -> Option<Picked> {
    let Action::Forward(f) = &route.action else {
        return None;
    };
    let target = f.pick()?;
    Some((
        Arc::clone(table.backend(target)),
        Arc::clone(&target.metrics),
    ))
}

async fn forward(
    cx: Arc<ConnContext>,
    route: Arc<Route>,
    backend: Option<Arc<Backend>>,
    mut req: Request<Incoming>,
    id_pending: bool,
    mut done: Box<Completion>,
) -> Response<ObservedBody> {
    let version = req.version();
    #[cfg(test)]
    tests::panic_if_asked(&req, "forward");
    let Some(backend) = backend else {
        let reason = format!("route {:?} has no backend", route.name);
        return finish_error(ProxyError::NoEndpoints(reason), version, done);
    };
    let backend = &*backend;
    let http1 = matches!(backend.upstream, Upstream::Http1(_));
    match backend.state.try_request(&backend.breaker, http1) {
        Ok(slot) => done.backend_slot = Some(slot),
        Err(b) => return fail(breaker_open(backend, b), version, backend, done),
    }
    let names = headers::Names::of(req.headers());
    let identity_names = cx
        .tls
        .as_ref()
        .map_or(&[][..], |t| &t.listener.identity_headers[..]);
    // The forwarding and trace headers go straight into an HTTP/1.1 head when nothing else
    // would set or remove them (see `DirectHeaders`).
    let direct = http1
        && !names.has_added()
        && route.request_headers.is_empty()
        && !identity_names.iter().any(headers::is_added_name);
    let hash_reads_id = backend
        .hash_key
        .as_ref()
        .is_some_and(|k| k.is_header(&X_REQUEST_ID));
    let id_direct = id_pending && direct && !hash_reads_id;
    if id_pending && !id_direct {
        req.headers_mut()
            .insert(X_REQUEST_ID.clone(), done.request_id.clone());
    }
    let hash = backend
        .hash_key
        .as_ref()
        .and_then(|k| request_hash(k, &req, cx.client));

    let upgrade =
        version == Version::HTTP_11 && names.may_upgrade() && headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::remove_hop_by_hop_named(&mut parts.headers, names, upgrade);
    if !direct {
        headers::set_forwarded(
            &mut parts.headers,
            &cx.client_ip,
            cx.scheme,
            done.host.as_ref(),
        );
    }
    if let Some(tls) = &cx.tls {
        for name in identity_names {
            parts.headers.remove(name);
        }
        if let Some((name, Some(v))) = &tls.identity {
            parts.headers.insert(name.clone(), v.clone());
        }
    }
    let direct = if direct {
        Some(headers::DirectHeaders {
            request_id: id_direct.then(|| done.request_id.clone()),
            client_ip: cx.client_ip.clone(),
            proto: cx.scheme,
            host: done.host.clone(),
            trace: done.trace,
        })
    } else {
        parts
            .headers
            .insert(TRACEPARENT.clone(), done.trace.traceparent());
        None
    };
    if done.trace.parent_id.is_none() && names.has_tracestate() {
        // A tracestate whose traceparent was missing or invalid belongs to no trace we
        // continue.
        parts.headers.remove(&TRACESTATE);
    }
    if !route.request_headers.is_empty() {
        route.request_headers.apply(&mut parts.headers);
    }
    let mut pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some((from, to)) = &route.rewrite {
        if let Some(new) = rewrite_prefix(&pq, from, to) {
            pq = new;
        }
    }
    // HTTP/2 carries the host in :authority; a Host header that differs from it makes the
    // request malformed (RFC 9113 section 8.3.1). A route's Host rewrite has been applied to
    // the headers by now, so it wins over the client's host.
    // HTTP/2 sends the scheme as :scheme: https when the upstream connection is TLS;
    // HTTP/1.1 sends neither scheme nor authority in the request line.
    let scheme = match &backend.upstream {
        Upstream::H2 { tls: Some(_), .. } => Scheme::HTTPS,
        _ => Scheme::HTTP,
    };
    let h2_authority = match &backend.upstream {
        Upstream::Http1(_) => {
            if !parts.headers.contains_key(header::HOST) {
                if let Some(h) = &done.host {
                    parts.headers.insert(header::HOST, h.clone());
                }
            }
            parts.version = Version::HTTP_11;
            None
        }
        Upstream::H2 { .. } => {
            let host = parts
                .headers
                .remove(header::HOST)
                .or_else(|| done.host.clone());
            parts.version = Version::HTTP_2;
            host.and_then(|h| Authority::try_from(h.as_bytes()).ok())
        }
    };
    parts.uri = Uri::from(pq);

    let policy = route.retry.as_ref().filter(|_| !upgrade);
    let mut sendable = match policy {
        // Boxed, as the other awaits only some requests make: each would otherwise make
        // every request's future larger, and that future is moved. (Each box is bound
        // before its await: a temporary in the awaited expression lives until the statement
        // ends, so the unboxed future would still take its size in this future's state.)
        Some(p) => {
            let replayable = Box::pin(Sendable::replayable(parts, body, p.buffer_bytes));
            match replayable.await {
                Ok(s) => s,
                Err(e) => return finish_error(e, version, done),
            }
        }
        None => Sendable::once(parts, ProxyBody::Upstream(body)),
    };
    sendable.direct = direct;
    let may_retry_status = policy.is_some_and(|p| p.non_idempotent || is_idempotent(&done.method));
    // The route timeout bounds every attempt together.
    // Counted from the request's arrival (one clock read fewer than reading it again here).
    let deadline = route
        .timeout
        .map(|t| (tokio::time::Instant::from_std(done.start) + t, t));
    let mut retries = 0u32;
    let mut retry_slot = None;
    let mut last = None;
    let (ep, in_flight, mut resp) = loop {
        let Some(i) = pick_endpoint(backend, hash, last) else {
            let err = ProxyError::NoEndpoints(backend.unavailable_reason());
            return fail(err, version, backend, done);
        };
        last = Some(i);
        let ep = &backend.endpoints[i];
        done.upstream = Some(ep.addr);
        // The first attempt starts when the request arrived, as far as the endpoint's
        // latency and the pool's idle times can tell (a clock read fewer), unless its body was
        // read first to be kept for retries; a retry reads the clock.
        let now = if retries == 0 && !sendable.replays() {
            clock_ns_at(done.start)
        } else {
            clock_ns()
        };
        let in_flight = ep.state.start_at(now);
        let Some(attempting) = attempt(
            backend,
            ep,
            &mut sendable,
            h2_authority.as_ref(),
            scheme.clone(),
            attempt_limit(deadline, policy),
            now,
        ) else {
            return finish_error(ProxyError::Internal, version, done);
        };
        let mut result = attempting.await;
        note_failure(backend, &result);
        if let (Ok(r), Some(p)) = (&mut result, policy) {
            // Worth reading ahead only when a gRPC failure could still be retried.
            let could_retry = retries < p.retries && sendable.replays() && may_retry_status;
            if could_retry && !p.grpc_statuses.is_empty() {
                let read_ahead = Box::pin(read_grpc_status(r, ep, p.per_try_timeout));
                if let Err(e) = read_ahead.await {
                    result = Err(e);
                }
            }
        }
        record_outcome(backend, ep, &result);
        drop(retry_slot.take());
        let retry = match (&result, policy) {
            (_, None) => false,
            (_, Some(p)) if retries >= p.retries || !sendable.replays() => false,
            (Err(e), Some(p)) => {
                (e.is_connect_failure() && p.on_connect_failure)
                    || (may_retry_status && e.is_retryable_failure(p))
            }
            (Ok(r), Some(p)) => may_retry_status && is_retryable_response(r, p),
        };
        if retry {
            if let Some(s) = backend.state.try_retry(&backend.breaker) {
                retry_slot = Some(s);
                retries += 1;
                done.retries = retries;
                warn_retry(&done, backend, ep, &result);
                metrics::counter!(crate::metrics::RETRIES, "backend" => backend.name.to_string())
                    .increment(1);
                let p = policy.expect("retries need a policy");
                let wait = Box::pin(backoff(p, retries, deadline));
                if wait.await {
                    continue;
                }
            } else {
                breaker_open(backend, Breaker::MaxRetries);
            }
        }
        match result {
            Ok(r) => break (ep, in_flight, r),
            Err(e) => return fail(e, version, backend, done),
        }
    };
    in_flight.record_latency();
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::remove_hop_by_hop(resp.headers_mut(), switching);
    if switching {
        let Some(down) = downstream_upgrade else {
            // Only an HTTP/1.1 client that asked to upgrade can receive a 101.
            let err = ProxyError::Upstream {
                addr: ep.addr,
                reason: "switched protocols without an upgrade request".into(),
            };
            return fail(err, version, backend, done);
        };
        let up = match std::mem::replace(resp.body_mut(), ProxyBody::empty()) {
            ProxyBody::H1(b) => b.into_upgraded(),
            _ => None,
        };
        let Some(up) = up else {
            let err = ProxyError::Upstream {
                addr: ep.addr,
                reason: "switched protocols on a connection that cannot be tunnelled".into(),
            };
            return fail(err, version, backend, done);
        };
        // The tunnel holds the endpoint's in-flight slot for as long as it lasts; the
        // connection is the tunnel's now, never pooled again.
        let busy = InRequest::begin(Arc::clone(&cx));
        tokio::spawn(tunnel(down, up, ep.addr, (in_flight, busy)));
    } else {
        done.in_flight = Some(in_flight);
    }
    *resp.version_mut() = version;
    finish_response(&route, &mut resp, &done);
    done.status = resp.status();
    resp.map(|b| ObservedBody::new(b, done))
}

/// One try: sends on the backend's connection type, by `limit` (see [`attempt_limit`]) and
/// with `now` as its start (`clock_ns()`); `None` when the request's streamed body has been sent
/// already. A plain function returning the connection type's own future, so the caller
/// awaits that future directly: an `async fn` here would wrap it in a second future as
/// large, and each layer copies what it awaits into itself. The HTTP/2 send is boxed: it is
/// larger than the HTTP/1.1 exchange, and would make every request's future its size.
fn attempt<'a>(
    backend: &'a Backend,
    ep: &'a Endpoint,
    sendable: &'a mut Sendable,
    h2_authority: Option<&Authority>,
    scheme: Scheme,
    limit: Option<pool::Deadline>,
    now: u64,
) -> Option<impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a> {
    Some(match &backend.upstream {
        // An HTTP/1.1 exchange watches its deadline itself, with a timer kept per connection.
        Upstream::Http1(settings) => {
            let (head, body) = sendable.next_h1(ep)?;
            Either::Left(pool::send(
                &ep.state,
                &backend.state,
                settings,
                head,
                body,
                limit,
                now,
            ))
        }
        Upstream::H2 {
            connect_timeout,
            tls,
        } => {
            let req = sendable.next_h2(ep, h2_authority, scheme)?;
            Either::Right(Box::pin(async move {
                let send = ep
                    .state
                    .h2
                    .send(ep.addr, *connect_timeout, tls.as_deref(), req);
                match limit {
                    // Racing a pinned sleep, rather than wrapping `send` in `timeout`, keeps
                    // the large request future in place instead of copying it.
                    Some(d) => {
                        tokio::pin!(send);
                        tokio::select! {
                            biased;
                            r = &mut send => r,
                            () = tokio::time::sleep_until(d.at) => Err(d.error(ep.addr)),
                        }
                    }
                    None => send.await,
                }
                .map(|r| r.map(ProxyBody::Upstream))
            }))
        }
    })
}

/// When an attempt's response head is due: the per-try timeout or what is left of the route
/// timeout (`deadline`), whichever comes first.
fn attempt_limit(
    deadline: Option<(tokio::time::Instant, Duration)>,
    policy: Option<&RetryPolicy>,
) -> Option<pool::Deadline> {
    let per_try = policy
        .and_then(|p| p.per_try_timeout)
        .map(|t| (tokio::time::Instant::now() + t, t, true));
    let limit = match (per_try, deadline) {
        (Some(p), Some((d, t))) => Some(if p.0 < d { p } else { (d, t, false) }),
        (Some(p), None) => Some(p),
        (None, Some((d, t))) => Some((d, t, false)),
        (None, None) => None,
    };
    limit.map(|(at, timeout, per_try)| pool::Deadline {
        at,
        timeout,
        per_try,
    })
}

/// Counts what an attempt's failure says about the backend.
fn note_failure(backend: &Backend, result: &Result<Response<ProxyBody>, ProxyError>) {
    match result {
        Err(e) if e.is_connect_failure() => backend.connect_failures.increment(1),
        // `max_connections` is found out by the connector, during the attempt.
        Err(ProxyError::CircuitOpen(b)) => {
            breaker_open(backend, *b);
        }
        _ => {}
    }
}

/// Answers a forwarded request that failed, and logs why with the ids that tie the line to
/// the request's access log line and span.
fn fail(
    err: ProxyError,
    version: Version,
    backend: &Backend,
    done: Box<Completion>,
) -> Response<ObservedBody> {
    tracing::warn!(
        backend = &*backend.name,
        upstream = done.upstream.map(tracing::field::display),
        error = %err,
        request_id = done.request_id.to_str().unwrap_or("-"),
        trace_id = %done.trace.trace_id(),
        "upstream request failed",
    );
    finish_error(err, version, done)
}

/// Logs an attempt that is about to be retried.
fn warn_retry<B>(
    done: &Completion,
    backend: &Backend,
    ep: &Endpoint,
    result: &Result<Response<B>, ProxyError>,
) {
    let request_id = done.request_id.to_str().unwrap_or("-");
    let trace_id = tracing::field::display(done.trace.trace_id());
    let (backend, endpoint) = (&*backend.name, tracing::field::display(ep.addr));
    match result {
        Err(e) => tracing::warn!(
            backend, endpoint, retry = done.retries, error = %e, request_id, trace_id,
            "upstream attempt failed; retrying",
        ),
        Ok(r) => tracing::warn!(
            backend,
            endpoint,
            retry = done.retries,
            status = r.status().as_u16(),
            request_id,
            trace_id,
            "upstream attempt answered a retryable status; retrying",
        ),
    }
}

/// Picks an endpoint, trying not to send a retry where the last attempt went.
fn pick_endpoint(backend: &Backend, hash: Option<u64>, avoid: Option<usize>) -> Option<usize> {
    let i = backend.pick(hash)?;
    if avoid != Some(i) || backend.endpoints.len() < 2 {
        return Some(i);
    }
    for k in 1..=2u64 {
        let h = hash.map(|h| h ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if let Some(j) = backend.pick(h).filter(|&j| j != i) {
            return Some(j);
        }
    }
    Some(i)
}

/// Feeds outlier detection. A breaker refusal says nothing about the endpoint.
fn record_outcome<B>(backend: &Backend, ep: &Endpoint, result: &Result<Response<B>, ProxyError>) {
    if backend.outlier.is_none() {
        return;
    }
    let outcome = match result {
        Ok(r) if r.status().is_server_error() => Outcome::ServerError {
            gateway: matches!(r.status().as_u16(), 502..=504),
        },
        Ok(_) => Outcome::Success,
        Err(ProxyError::CircuitOpen(_)) => return,
        Err(_) => Outcome::LocalFailure,
    };
    backend.record(ep, outcome);
}

/// Counts a breaker refusal and makes the error for it.
fn breaker_open(backend: &Backend, breaker: Breaker) -> ProxyError {
    metrics::counter!(
        crate::metrics::CIRCUIT_BREAKER_OPEN,
        "backend" => backend.name.to_string(),
        "breaker" => breaker.name(),
    )
    .increment(1);
    ProxyError::CircuitOpen(breaker)
}

/// Waits before retry number `n` (full jitter on an exponential backoff). Returns false
/// when the route timeout would pass first, so the last result stands instead.
async fn backoff(
    p: &RetryPolicy,
    n: u32,
    deadline: Option<(tokio::time::Instant, Duration)>,
) -> bool {
    let cap = p
        .backoff_base
        .saturating_mul(1u32 << (n - 1).min(16))
        .min(p.backoff_max);
    let wait = cap.mul_f64(fastrand::f64());
    let until = tokio::time::Instant::now() + wait;
    if deadline.is_some_and(|(d, _)| until >= d) {
        return false;
    }
    tokio::time::sleep_until(until).await;
    true
}

fn is_retryable_response(r: &Response<ProxyBody>, p: &RetryPolicy) -> bool {
    if p.statuses.contains(&r.status().as_u16()) {
        return true;
    }
    if p.grpc_statuses.is_empty() {
        return false;
    }
    // grpc-status is in the headers of a trailers-only response, else in the trailers that
    // `read_grpc_status` read ahead when no message came before them.
    let trailers = match r.body() {
        ProxyBody::Resumed(Some(f), _) => f.trailers_ref(),
        _ => None,
    };
    r.headers()
        .get("grpc-status")
        .or_else(|| trailers.and_then(|t| t.get("grpc-status")))
        .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
        .is_some_and(|code| p.grpc_statuses.contains(&code))
}

/// For a gRPC response without `grpc-status` in its headers, reads the first frame: either a
/// message (the call went through: nothing to retry) or the trailers with the status. A
/// call that fails before any message is retried like a trailers-only response. The frame
/// is passed on as it was. A stream whose first message is slow is not an error: after
/// `wait` (the per-try timeout, if any) the response goes on unread, as it came.
async fn read_grpc_status(
    resp: &mut Response<ProxyBody>,
    ep: &Endpoint,
    wait: Option<Duration>,
) -> Result<(), ProxyError> {
    use http_body_util::BodyExt as _;
    let grpc = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc || resp.headers().contains_key("grpc-status") {
        return Ok(());
    }
    let body = std::mem::replace(resp.body_mut(), ProxyBody::empty());
    let ProxyBody::Upstream(mut body) = body else {
        *resp.body_mut() = body;
        return Ok(());
    };
    let first = match wait {
        // Reading a frame is cancel-safe: on timeout nothing has been taken from the body.
        Some(t) => match tokio::time::timeout(t, body.frame()).await {
            Ok(f) => f,
            Err(_) => {
                *resp.body_mut() = ProxyBody::Upstream(body);
                return Ok(());
            }
        },
        None => body.frame().await,
    };
    let first = first.transpose().map_err(|e| ProxyError::Upstream {
        addr: ep.addr,
        reason: e.to_string(),
    })?;
    *resp.body_mut() = ProxyBody::Resumed(first, body);
    Ok(())
}

/// The request to send, as many times as its attempts need: its head, and its body.
struct Sendable {
    /// HTTP/1.1 attempts encode it from here; an HTTP/2 attempt takes it (streamed body) or
    /// copies it (kept body).
    head: Option<http::request::Parts>,
    body: SendBody,
    /// The head's Host names the endpoint of the last attempt (the client sent none).
    endpoint_host: bool,
    /// Headers every HTTP/1.1 attempt writes after the head's own.
    direct: Option<headers::DirectHeaders>,
}

enum SendBody {
    /// Streamed: sent at most once.
    Once(Option<ProxyBody>),
    /// Kept whole, with its trailers if it had any: sent again for each attempt.
    Kept(Option<bytes::Bytes>, Option<http::HeaderMap>),
}

impl Sendable {
    /// A request whose body is streamed, so sent at most once.
    fn once(head: http::request::Parts, body: ProxyBody) -> Self {
        Self {
            head: Some(head),
            body: SendBody::Once(Some(body)),
            endpoint_host: false,
            direct: None,
        }
    }

    /// Reads the body into memory, up to `limit` bytes, so it can be sent again. A larger
    /// body is streamed (what was read first, then the rest) and the request is sent once.
    async fn replayable(
        parts: http::request::Parts,
        mut body: Incoming,
        limit: usize,
    ) -> Result<Self, ProxyError> {
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        if body.size_hint().lower() > limit as u64 {
            return Ok(Self::once(parts, ProxyBody::Upstream(body)));
        }
        let mut kept = bytes::BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ProxyError::BadRequest("the request body could not be read"))?;
            match frame.into_data() {
                Ok(data) => {
                    kept.extend_from_slice(&data);
                    if kept.len() > limit {
                        let first = Some(http_body::Frame::data(kept.freeze()));
                        return Ok(Self::once(parts, ProxyBody::Resumed(first, body)));
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok(Self {
            head: Some(parts),
            body: SendBody::Kept((!kept.is_empty()).then(|| kept.freeze()), trailers),
            endpoint_host: false,
            direct: None,
        })
    }

    fn replays(&self) -> bool {
        matches!(self.body, SendBody::Kept(..))
    }

    /// The body for the next attempt; `None` once a streamed body has been sent.
    fn next_body(&mut self) -> Option<ProxyBody> {
        match &mut self.body {
            SendBody::Once(b) => b.take(),
            SendBody::Kept(data, trailers) => Some(ProxyBody::Kept(data.clone(), trailers.clone())),
        }
    }

    /// The next HTTP/1.1 attempt's head and body. Origin-form on the wire, as a client sends
    /// to a server; a request that came without any host names the endpoint, as hyper's
    /// pooled client did.
    fn next_h1(&mut self, ep: &Endpoint) -> Option<(RequestHead<'_>, ProxyBody)> {
        let body = self.next_body()?;
        let head = self.head.as_mut()?;
        if self.endpoint_host || !head.headers.contains_key(header::HOST) {
            let host = HeaderValue::from_str(ep.authority.as_str()).ok()?;
            head.headers.insert(header::HOST, host);
            self.endpoint_host = true;
        }
        let head = RequestHead {
            parts: head,
            direct: self.direct.as_ref(),
        };
        Some((head, body))
    }

    /// The next HTTP/2 attempt's request, in absolute form (`:scheme`, `:authority`).
    fn next_h2(
        &mut self,
        ep: &Endpoint,
        h2_authority: Option<&Authority>,
        scheme: Scheme,
    ) -> Option<Request<ProxyBody>> {
        let body = self.next_body()?;
        let mut req = if self.replays() {
            let head = self.head.as_ref()?;
            let mut r = Request::new(body);
            *r.method_mut() = head.method.clone();
            *r.uri_mut() = head.uri.clone();
            *r.version_mut() = head.version;
            *r.headers_mut() = head.headers.clone();
            r
        } else {
            Request::from_parts(self.head.take()?, body)
        };
        let authority = h2_authority.unwrap_or(&ep.authority).clone();
        let mut uri = std::mem::take(req.uri_mut()).into_parts();
        uri.scheme = Some(scheme);
        uri.authority = Some(authority);
        *req.uri_mut() = Uri::from_parts(uri).ok()?;
        Some(req)
    }
}

/// Copies bytes both ways after a successful protocol switch: first what the upstream sent
/// right behind its 101, then whatever either side sends.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    (mut up, early): (crate::h1_client::Io, bytes::Bytes),
    addr: SocketAddr,
    _held: (crate::endpoint::InFlight, InRequest),
) {
    use tokio::io::AsyncWriteExt as _;
    let mut d = match down.await {
        Ok(d) => TokioIo::new(d),
        Err(e) => return tracing::debug!(%addr, error = %e, "protocol upgrade failed"),
    };
    if !early.is_empty() {
        if let Err(e) = d.write_all(&early).await {
            return tracing::debug!(%addr, error = %e, "upgraded connection ended with an error");
        }
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut up).await {
        tracing::debug!(%addr, error = %e, "upgraded connection ended with an error");
    }
}

fn finish_response<B>(route: &Route, resp: &mut Response<B>, done: &Completion) {
    if !route.response_headers.is_empty() {
        route.response_headers.apply(resp.headers_mut());
    }
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), done.request_id.clone());
}

fn finish_error(
    err: ProxyError,
    version: Version,
    mut done: Box<Completion>,
) -> Response<ObservedBody> {
    let mut resp = error_response(&err, version);
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), done.request_id.clone());
    done.status = resp.status();
    resp.map(|b| ObservedBody::new(b, done))
}

/// The response Strait sends for an error: status, `x-strait-error` code, and a one-line
/// body saying why.
pub fn error_response(err: &ProxyError, version: Version) -> Response<ProxyBody> {
    let body = format!("strait: {}: {err}\n", err.code().to_str().unwrap_or(""));
    let mut resp = Response::new(ProxyBody::from(bytes::Bytes::from(body)));
    *resp.status_mut() = err.status();
    *resp.version_mut() = version;
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, err.code());
    if let ProxyError::CircuitOpen(b) = err {
        h.insert(BREAKER_HEADER, HeaderValue::from_static(b.name()));
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn direct(d: &DirectResponse, version: Version) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::from(d.body.clone()));
    *resp.status_mut() = d.status;
    *resp.version_mut() = version;
    *resp.headers_mut() = d.headers.clone();
    resp
}

fn redirect(r: &Redirect, req: &Request<Incoming>, scheme: &str) -> Response<ProxyBody> {
    let req_host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(Authority::as_str))
        .unwrap_or("");
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let (host_only, req_port) = split_host_port(req_host);
    let host = r.host.as_deref().unwrap_or(host_only);
    let mut location = format!("{scheme}://{host}");
    match (r.port, r.host.is_some() || r.scheme.is_some(), req_port) {
        (Some(p), _, _) => location.push_str(&format!(":{p}")),
        (None, false, Some(p)) => location.push_str(&format!(":{p}")),
        _ => {}
    }
    location.push_str(r.path.as_deref().unwrap_or(req.uri().path()));
    if let Some(q) = req.uri().query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = r.status;
    *resp.version_mut() = req.version();
    if let Ok(v) = HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Splits `host[:port]`, keeping an IPv6 literal's brackets (`[::1]:8080`).
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find("]:") {
            Some(i) => (&host[..=i], Some(&host[i + 2..])),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (host, None),
    }
}

fn request_hash(key: &HashKey, req: &Request<Incoming>, client: SocketAddr) -> Option<u64> {
    use xxhash_rust::xxh3::xxh3_64;
    match key {
        HashKey::ClientIp => Some(crate::balancer::ip_hash(client.ip())),
        HashKey::Header(name) => req.headers().get(name).map(|v| xxh3_64(v.as_bytes())),
        HashKey::Cookie(name) => {
            headers::cookie(req.headers(), name).map(|v| xxh3_64(v.as_bytes()))
        }
    }
}

/// `uri` with its path replaced, query kept.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")).ok()?,
        None => PathAndQuery::try_from(path).ok()?,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    Uri::from_parts(parts).ok()
}

/// Replaces the matched prefix `from` (without trailing slash; empty for `/`) with `to`.
pub fn rewrite_prefix(pq: &PathAndQuery, from: &str, to: &str) -> Option<PathAndQuery> {
    let rest = pq.path().strip_prefix(from)?;
    let mut s =
        String::with_capacity(to.len() + rest.len() + pq.query().map_or(0, |q| q.len() + 1));
    s.push_str(to.trim_end_matches('/'));
    s.push_str(rest);
    if !s.starts_with('/') {
        s.insert(0, '/');
    }
    if let Some(q) = pq.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Panics where a request asks it to (`x-test-panic: route` in the part of the request path
    /// that runs in the handler call, `forward` in the forwarding future), so the tests can
    /// check that a panic costs only its request.
    pub(super) fn panic_if_asked<B>(req: &Request<B>, stage: &str) {
        if req
            .headers()
            .get("x-test-panic")
            .is_some_and(|v| v == stage)
        {
            panic!("a test asked for a panic in {stage}");
        }
    }

    /// Sends one HTTP/1.1 request on a new connection; returns the response as text (read until
    /// the server closes, or at most 5 s).
    async fn exchange(addr: SocketAddr, path: &str, extra: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("GET {path} HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server answers and closes")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_panic_in_either_part_of_the_request_path_costs_only_its_request() {
        // A forwarding route (the panics come before any connection is made, so its endpoint
        // is never reached) and a direct response to show the listener still serves.
        let spec: crate::table::spec::Spec = serde_json::from_str(
            r#"{"listeners": [{"name": "web", "address": "127.0.0.1:0", "routes": [
                  {"match": {"exact": "/ok"}, "direct_response": {"status": 200, "body": "ok"}},
                  {"forward": {"backend": "b"}}]}],
                "backends": [{"name": "b", "endpoints": ["127.0.0.1:9"]}]}"#,
        )
        .unwrap();
        // Live registries, as the running proxy has (a dry-run table is not for serving).
        let registries = crate::table::compile::Registries::default();
        let table =
            crate::table::compile::compile(Arc::new(spec), "test", 1, Some(&registries)).unwrap();
        let handle = TableHandle::default();
        handle.publish(table);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cx = crate::listener::ListenerContext::new(
            "web".into(),
            handle,
            crate::table::spec::LimitsSpec::default(),
        );
        tokio::spawn(crate::listener::serve(listener, cx, std::future::pending()));

        for stage in ["route", "forward"] {
            let resp = exchange(addr, "/", &format!("x-test-panic: {stage}\r\n")).await;
            assert!(resp.starts_with("HTTP/1.1 500"), "{stage}: {resp}");
            assert!(resp.contains("x-strait-error: internal"), "{stage}: {resp}");
        }
        // The process and the listener go on.
        let resp = exchange(addr, "/ok", "").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(
            split_host_port("a.example:8080"),
            ("a.example", Some("8080"))
        );
        assert_eq!(split_host_port("a.example"), ("a.example", None));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("[::1]:8443"), ("[::1]", Some("8443")));
    }

    #[test]
    fn prefix_rewrite_keeps_the_rest_and_query() {
        let pq = PathAndQuery::from_static("/api/users?x=1");
        assert_eq!(rewrite_prefix(&pq, "/api", "/").unwrap(), "/users?x=1");
        assert_eq!(rewrite_prefix(&pq, "/api", "/v2").unwrap(), "/v2/users?x=1");
        let pq = PathAndQuery::from_static("/api");
        assert_eq!(rewrite_prefix(&pq, "/api", "/").unwrap(), "/");
        let pq = PathAndQuery::from_static("/x");
        assert_eq!(rewrite_prefix(&pq, "", "/app").unwrap(), "/app/x");
    }
}
