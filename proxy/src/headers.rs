//! Header rules for proxying: hop-by-hop removal (RFC 9110 section 7.6.1), forwarding
//! headers and request ids.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::trace::TraceContext;

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `keep-alive` (hop-by-hop, RFC 9112 appendix C.2.2).
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether this is an HTTP/1.1 upgrade request (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers. `Trailer` is end-to-end (RFC 9110 section 6.6.2) and stays:
/// hyper's HTTP/1.1 encoder sends only the trailers it names. With `upgrade`, `Connection: upgrade` and `Upgrade` pass
/// through, since the upstream must see them to switch protocols. `TE: trailers` passes
/// through: gRPC requires it and it is the one TE value every hop may forward.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    remove_hop_by_hop_named(headers, Names::of(headers), upgrade);
}

/// Which of the names that matter to forwarding a header map has, from one pass over its
/// few names (usually none in requests, `Connection` in responses): each one looked up
/// instead would be a hashed probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Names(u16);

impl Names {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        Self(headers.keys().fold(0, |bits, name| bits | name_bit(name)))
    }

    /// Whether the map has any header Strait sets itself on a forwarded request
    /// (`X-Forwarded-For`, `-Proto`, `-Host`, `traceparent`).
    pub(crate) fn has_added(self) -> bool {
        self.0 & ADDED_BITS != 0
    }

    /// Whether the map has both `Connection` and `Upgrade`, which an upgrade request needs
    /// (see [`is_upgrade`]).
    pub(crate) fn may_upgrade(self) -> bool {
        self.0 & (CONNECTION_BIT | UPGRADE_BIT) == CONNECTION_BIT | UPGRADE_BIT
    }

    /// Whether the map has `tracestate`.
    pub(crate) fn has_tracestate(self) -> bool {
        self.0 & TRACESTATE_BIT != 0
    }
}

/// [`remove_hop_by_hop`] with the map's [`Names`] already known.
pub(crate) fn remove_hop_by_hop_named(headers: &mut HeaderMap, names: Names, upgrade: bool) {
    let present = names.0 & HOP_BY_HOP_BITS;
    if present == 0 {
        return;
    }
    // Headers named in Connection are hop-by-hop too. Collecting only when Connection
    // lists something other than the usual tokens keeps the common path allocation-free.
    if present & CONNECTION_BIT != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("upgrade")
            })
            .filter_map(|t| HeaderName::try_from(t).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    let te_trailers = present & TE_BIT != 0
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for (bit, name) in [
        (KEEP_ALIVE_BIT, &KEEP_ALIVE),
        (PROXY_CONNECTION_BIT, &PROXY_CONNECTION),
        (TE_BIT, &header::TE),
        (TRANSFER_ENCODING_BIT, &header::TRANSFER_ENCODING),
        (PROXY_AUTHENTICATE_BIT, &header::PROXY_AUTHENTICATE),
        (PROXY_AUTHORIZATION_BIT, &header::PROXY_AUTHORIZATION),
    ] {
        if present & bit != 0 {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & CONNECTION_BIT != 0 {
            headers.remove(header::CONNECTION);
        }
        if present & UPGRADE_BIT != 0 {
            headers.remove(header::UPGRADE);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

const CONNECTION_BIT: u16 = 1;
const TE_BIT: u16 = 1 << 1;
const TRANSFER_ENCODING_BIT: u16 = 1 << 2;
const UPGRADE_BIT: u16 = 1 << 3;
const PROXY_AUTHENTICATE_BIT: u16 = 1 << 4;
const PROXY_AUTHORIZATION_BIT: u16 = 1 << 5;
const KEEP_ALIVE_BIT: u16 = 1 << 6;
const PROXY_CONNECTION_BIT: u16 = 1 << 7;
const HOP_BY_HOP_BITS: u16 = 0xff;
const X_FORWARDED_FOR_BIT: u16 = 1 << 8;
const X_FORWARDED_PROTO_BIT: u16 = 1 << 9;
const X_FORWARDED_HOST_BIT: u16 = 1 << 10;
const TRACEPARENT_BIT: u16 = 1 << 11;
const ADDED_BITS: u16 =
    X_FORWARDED_FOR_BIT | X_FORWARDED_PROTO_BIT | X_FORWARDED_HOST_BIT | TRACEPARENT_BIT;
const TRACESTATE_BIT: u16 = 1 << 12;

/// The bit of a name, 0 for the rest. One match on the name's text (names are lowercase):
/// most names are none of these. Comparing against each constant `HeaderName` in turn made
/// `Names::of` about 380 instructions for a request with only a Host header (callgrind).
fn name_bit(name: &HeaderName) -> u16 {
    match name.as_str() {
        "connection" => CONNECTION_BIT,
        "te" => TE_BIT,
        "transfer-encoding" => TRANSFER_ENCODING_BIT,
        "upgrade" => UPGRADE_BIT,
        "proxy-authenticate" => PROXY_AUTHENTICATE_BIT,
        "proxy-authorization" => PROXY_AUTHORIZATION_BIT,
        "keep-alive" => KEEP_ALIVE_BIT,
        "proxy-connection" => PROXY_CONNECTION_BIT,
        "x-forwarded-for" => X_FORWARDED_FOR_BIT,
        "x-forwarded-proto" => X_FORWARDED_PROTO_BIT,
        "x-forwarded-host" => X_FORWARDED_HOST_BIT,
        "traceparent" => TRACEPARENT_BIT,
        "tracestate" => TRACESTATE_BIT,
        _ => 0,
    }
}

/// Whether `name` is one Strait sets itself on a forwarded request: those of
/// [`Names::has_added`], and the request id.
pub(crate) fn is_added_name(name: &HeaderName) -> bool {
    name_bit(name) & ADDED_BITS != 0 || name == X_REQUEST_ID
}

/// The headers [`set_forwarded`], the request id and the trace context would add to a
/// request for an HTTP/1.1 upstream, written straight into its head after the client's
/// headers instead: inserting a name the map does not know yet is a hashed probe, and the
/// trace header an allocation, on every request. Used only when the client sent none of these
/// names and no rule of the route or listener sets or removes them, so the upstream gets the
/// same headers either way.
#[derive(Debug)]
pub(crate) struct DirectHeaders {
    /// `X-Request-Id`, when Strait made one up and nothing had to find it in the map (a
    /// rate limit or hash keyed on it).
    pub(crate) request_id: Option<HeaderValue>,
    /// `X-Forwarded-For`: the client's IP.
    pub(crate) client_ip: HeaderValue,
    /// `X-Forwarded-Proto`.
    pub(crate) proto: &'static str,
    /// `X-Forwarded-Host`: the host the client asked for.
    pub(crate) host: Option<HeaderValue>,
    /// `traceparent`.
    pub(crate) trace: TraceContext,
}

impl DirectHeaders {
    /// Appends the header lines. Each name with its `: ` is one literal: a line is three
    /// copies, not four.
    pub(crate) fn write(&self, dst: &mut Vec<u8>) {
        if let Some(id) = &self.request_id {
            line(dst, b"x-request-id: ", id.as_bytes());
        }
        line(dst, b"x-forwarded-for: ", self.client_ip.as_bytes());
        line(dst, b"x-forwarded-proto: ", self.proto.as_bytes());
        if let Some(h) = &self.host {
            line(dst, b"x-forwarded-host: ", h.as_bytes());
        }
        line(dst, b"traceparent: ", &self.trace.traceparent_bytes());
    }
}

fn line(dst: &mut Vec<u8>, name_colon: &[u8], value: &[u8]) {
    dst.extend_from_slice(name_colon);
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// The client's IP as a header value, built once per connection.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value")
}

/// Appends the client to `X-Forwarded-For`, and sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (the latter only when the client did not send one).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    // One hashed lookup per header, whether the client sent it or not.
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(client_ip.clone());
        }
        // Every X-Forwarded-For line counts: a client may send several. They become one.
        header::Entry::Occupied(mut e) => {
            let mut v = Vec::new();
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip.as_bytes());
            e.insert(HeaderValue::from_bytes(&v).unwrap_or_else(|_| client_ip.clone()));
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(h) = host {
        if let header::Entry::Vacant(e) = headers.entry(&X_FORWARDED_HOST) {
            e.insert(h.clone());
        }
    }
}

/// A random UUID v4 request id.
pub fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut buf);
    // Owned by a shared allocation from the start: the value is cloned into the upstream
    // request, the response and the log, and a copied value would be reallocated as shared
    // at its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .expect("a UUID is a valid header value")
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TRACEPARENT, TRACESTATE};

    #[test]
    fn each_name_has_its_own_bit_and_other_names_none() {
        let named = [
            (&header::CONNECTION, CONNECTION_BIT),
            (&header::TE, TE_BIT),
            (&header::TRANSFER_ENCODING, TRANSFER_ENCODING_BIT),
            (&header::UPGRADE, UPGRADE_BIT),
            (&header::PROXY_AUTHENTICATE, PROXY_AUTHENTICATE_BIT),
            (&header::PROXY_AUTHORIZATION, PROXY_AUTHORIZATION_BIT),
            (&KEEP_ALIVE, KEEP_ALIVE_BIT),
            (&PROXY_CONNECTION, PROXY_CONNECTION_BIT),
            (&X_FORWARDED_FOR, X_FORWARDED_FOR_BIT),
            (&X_FORWARDED_PROTO, X_FORWARDED_PROTO_BIT),
            (&X_FORWARDED_HOST, X_FORWARDED_HOST_BIT),
            (&TRACEPARENT, TRACEPARENT_BIT),
            (&TRACESTATE, TRACESTATE_BIT),
        ];
        let mut all = 0;
        for (name, bit) in named {
            assert_eq!(name_bit(name), bit, "{name}");
            assert_eq!(all & bit, 0, "{name} shares a bit");
            all |= bit;
        }
        for other in [&header::HOST, &header::CONTENT_LENGTH, &X_REQUEST_ID] {
            assert_eq!(name_bit(other), 0, "{other}");
        }
        // Parsed names are lowercase, whatever the client wrote.
        assert_eq!(
            name_bit(&HeaderName::from_bytes(b"X-Forwarded-For").unwrap()),
            X_FORWARDED_FOR_BIT
        );
        assert!(is_added_name(&X_REQUEST_ID) && is_added_name(&TRACEPARENT));
        assert!(!is_added_name(&TRACESTATE) && !is_added_name(&header::HOST));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

    #[test]
    fn removes_each_hop_by_hop_name_and_keeps_an_upgrade() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ] {
            h.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        remove_hop_by_hop(&mut h, true);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["connection", "upgrade", "x-kept"]);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        remove_hop_by_hop(&mut plain, false);
        let names: Vec<&str> = plain.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        set_forwarded(&mut h, &HeaderValue::from_static("10.0.0.1"), "http", None);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "1.2.3.4, 10.0.0.1");
    }

    #[test]
    fn joins_every_forwarded_for_line() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        set_forwarded(&mut h, &HeaderValue::from_static("10.0.0.1"), "http", None);
        assert_eq!(
            h.get(&X_FORWARDED_FOR).unwrap(),
            "1.1.1.1, 2.2.2.2, 10.0.0.1"
        );
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn keeps_trailer_names() {
        let mut h = HeaderMap::new();
        h.insert(header::TRAILER, HeaderValue::from_static("grpc-status"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.get(header::TRAILER).unwrap(), "grpc-status");
    }

    #[test]
    fn finds_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; session=xyz"));
        assert_eq!(cookie(&h, "session"), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
