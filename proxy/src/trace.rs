//! W3C trace context (`traceparent`, `tracestate`) for each request, and the hook through
//! which finished requests become exported spans.
//!
//! Parsing and formatting are done here by hand rather than through an OpenTelemetry
//! propagator: the request path then costs a few byte comparisons and one header value
//! whether or not spans are exported, and the data plane needs no OpenTelemetry crate.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

const SAMPLED: u8 = 0x01;
/// `00-` + 32 + `-` + 16 + `-` + 2.
const TRACEPARENT_LEN: usize = 55;

/// The trace a request belongs to and Strait's span in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id: the client's, or a new one.
    pub trace_id: u128,
    /// The client's span, when the request came with a valid `traceparent`.
    pub parent_id: Option<u64>,
    /// Strait's span for this request; the upstream sees it as its parent.
    pub span_id: u64,
    /// Trace flags sent on (only the sampled bit).
    pub flags: u8,
}

impl TraceContext {
    /// Continues the client's trace when `traceparent` is valid; otherwise starts a new one,
    /// sampled with probability `sample_ratio`.
    pub fn for_request(headers: &HeaderMap, sample_ratio: f64) -> Self {
        let mut values = headers.get_all(&TRACEPARENT).iter();
        // Two traceparent lines cannot both be followed: treat them as none.
        let parsed = match (values.next(), values.next()) {
            (Some(v), None) => parse_traceparent(v.as_bytes()),
            _ => None,
        };
        let span_id = nonzero_u64();
        match parsed {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                parent_id: Some(parent),
                span_id,
                flags: flags & SAMPLED,
            },
            None => Self {
                trace_id: nonzero_u128(),
                parent_id: None,
                span_id,
                flags: if sample_ratio >= 1.0 || fastrand::f64() < sample_ratio {
                    SAMPLED
                } else {
                    0
                },
            },
        }
    }

    /// Whether the trace is sampled (recorded by whoever exports spans).
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` the upstream gets: this trace, with Strait's span as its parent.
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.traceparent_bytes())
            .expect("hex digits and dashes are a valid header value")
    }

    /// The `traceparent` value's bytes, for writing it without a header value.
    pub(crate) fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut buf = [0u8; TRACEPARENT_LEN];
        buf[..3].copy_from_slice(b"00-");
        buf[3..19].copy_from_slice(&hex_u64((self.trace_id >> 64) as u64));
        buf[19..35].copy_from_slice(&hex_u64(self.trace_id as u64));
        buf[35] = b'-';
        buf[36..52].copy_from_slice(&hex_u64(self.span_id));
        buf[52] = b'-';
        hex(&[self.flags], &mut buf[53..55]);
        buf
    }

    /// The trace id as 32 lowercase hex digits, formatted without allocating.
    pub fn trace_id(&self) -> HexId<16> {
        HexId(self.trace_id.to_be_bytes())
    }

    /// Strait's span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> HexId<8> {
        HexId(self.span_id.to_be_bytes())
    }
}

/// An id written as lowercase hex by `Display`.
#[derive(Clone, Copy, Debug)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        let out = &mut buf[..N * 2];
        hex(&self.0, out);
        f.write_str(std::str::from_utf8(out).expect("hex digits are ASCII"))
    }
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `x` as 16 lowercase hex digits, eight at a time: each nibble is spread into a byte of a
/// `u64`, and digits above 9 are found without a branch or table lookup per digit. Written
/// into every forwarded request's `traceparent`, where the loop above cost ten instructions a
/// byte.
fn hex_u64(x: u64) -> [u8; 16] {
    fn spread(x: u32) -> u64 {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    fn ascii(nibbles: u64) -> u64 {
        // 1 in each byte whose nibble is above 9 (adding 6 carries it into bit 4).
        let letters = ((nibbles + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        nibbles + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&ascii(spread((x >> 32) as u32)).to_be_bytes());
    out[8..].copy_from_slice(&ascii(spread(x as u32)).to_be_bytes());
    out
}

/// Lowercase hex only: the W3C grammar has no uppercase digits.
fn unhex(s: &[u8]) -> Option<u128> {
    let mut v = 0u128;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

/// `(trace id, parent id, flags)` of a valid `traceparent`. Versions above 00 are read as
/// 00 for the fields 00 defines, as the W3C recommendation asks; version ff, a wrong
/// length, bad digits or an all-zero id make it invalid.
fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = unhex(&v[..2])?;
    if version == 0xff
        || (version == 0 && v.len() != TRACEPARENT_LEN)
        || (v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-')
        || v[2] != b'-'
        || v[35] != b'-'
        || v[52] != b'-'
    {
        return None;
    }
    let trace_id = unhex(&v[3..35])?;
    let parent_id = u64::try_from(unhex(&v[36..52])?).ok()?;
    let flags = u8::try_from(unhex(&v[53..55])?).ok()?;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

/// A request that has finished, as handed to the [`SpanSink`].
#[derive(Debug)]
pub struct FinishedRequest<'a> {
    /// Its trace context.
    pub trace: &'a TraceContext,
    /// The client's `tracestate`, when the trace was continued.
    pub tracestate: Option<&'a HeaderValue>,
    /// When it arrived.
    pub start: SystemTime,
    /// When the response ended.
    pub end: SystemTime,
    /// Method.
    pub method: &'a Method,
    /// Host as the client sent it.
    pub host: Option<&'a str>,
    /// Path (dot segments removed).
    pub path: &'a str,
    /// Final status.
    pub status: u16,
    /// Listener name.
    pub listener: &'a str,
    /// Route name; empty when no route took it.
    pub route: &'a str,
    /// Backend name; empty when the route answered itself.
    pub backend: &'a str,
    /// The endpoint that answered (the last one tried).
    pub upstream: Option<SocketAddr>,
    /// Retries made.
    pub retries: u32,
    /// The request id.
    pub request_id: &'a str,
}

/// Receives every sampled request when it finishes. Called on the request's task, so an
/// implementation only hands the data on (e.g. to a batch exporter's queue).
pub trait SpanSink: Send + Sync {
    /// Records one finished request.
    fn record(&self, req: &FinishedRequest<'_>);
}

static SINK: OnceLock<Box<dyn SpanSink>> = OnceLock::new();

/// Installs the process's span sink; only the first call takes effect. Without one,
/// requests carry trace context but nothing is recorded.
pub fn set_span_sink(sink: Box<dyn SpanSink>) -> bool {
    SINK.set(sink).is_ok()
}

/// The installed sink, if any: one atomic load.
pub fn span_sink() -> Option<&'static dyn SpanSink> {
    SINK.get().map(|s| &**s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_u64_writes_sixteen_lowercase_digits() {
        let mut values = vec![0, 1, 9, 10, 15, 16, 0xa0, u64::MAX, 0x0123_4567_89ab_cdef];
        values.extend((0..1000).map(|_| fastrand::u64(..)));
        for v in values {
            assert_eq!(hex_u64(v), *format!("{v:016x}").as_bytes(), "{v:#x}");
        }
        let t = TraceContext {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 0x00f0_67aa_0ba9_02b7,
            ..TraceContext::for_request(&http::HeaderMap::new(), 0.0)
        };
        assert_eq!(
            &t.traceparent_bytes()[..52],
            &GOOD.as_bytes()[..52],
            "trace and span ids in order"
        );
    }

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&TRACEPARENT, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let t = TraceContext::for_request(&headers(&[GOOD]), 0.0);
        assert_eq!(t.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        assert_ne!(t.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(t.sampled());
        let out = t.traceparent();
        let out = out.to_str().unwrap();
        assert_eq!(out.len(), 55);
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_eq!(&out[36..52], t.span_id().to_string());
    }

    #[test]
    fn keeps_the_unsampled_flag() {
        let v = GOOD.replace("-01", "-00");
        let t = TraceContext::for_request(&headers(&[&v]), 1.0);
        assert!(!t.sampled());
        assert!(t.traceparent().to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn invalid_values_start_a_new_trace() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for v in bad {
            let t = TraceContext::for_request(&headers(&[v]), 1.0);
            assert_eq!(t.parent_id, None, "{v:?} was accepted");
            assert_ne!(t.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        }
        let twice = TraceContext::for_request(&headers(&[GOOD, GOOD]), 1.0);
        assert_eq!(twice.parent_id, None);
    }

    #[test]
    fn later_versions_are_read_as_00() {
        let v = format!("{}-extra", GOOD.replacen("00", "01", 1));
        let t = TraceContext::for_request(&headers(&[&v]), 0.0);
        assert_eq!(t.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        assert!(t.traceparent().to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn new_traces_follow_the_sample_ratio() {
        let none = HeaderMap::new();
        assert!((0..100).all(|_| TraceContext::for_request(&none, 1.0).sampled()));
        assert!((0..100).all(|_| !TraceContext::for_request(&none, 0.0).sampled()));
        let t = TraceContext::for_request(&none, 1.0);
        assert_ne!(t.trace_id, 0);
        assert_ne!(t.span_id, 0);
        let v = t.traceparent();
        assert_eq!(
            parse_traceparent(v.as_bytes()),
            Some((t.trace_id, t.span_id, 1))
        );
    }
}
