//! HTTP/1.1 on the upstream side, as bytes: the request head Strait writes, the response head
//! and chunked body it reads (RFC 9112). No I/O here; [`crate::h1_client`] drives it.
//!
//! Parsing is httparse's, as in hyper. Header values of a response are slices of the one
//! buffer its head was read into, so a response head costs no copy per header.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderName};
use http::{Method, StatusCode, Version};

use crate::headers::{DirectHeaders, KEEP_ALIVE};

/// Header fields a response head (or a trailer section) may have, as hyper allows.
const MAX_HEADERS: usize = 100;
/// Longest response head (status line and fields) read before giving up, as Envoy's
/// default `max_response_headers_kb` (60 KiB).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) or trailer section.
const MAX_CHUNK_META_BYTES: usize = 16 * 1024;

/// Why the bytes an upstream sent are not an HTTP/1.1 response Strait can pass on.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The response head does not parse.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    /// The response head is larger than [`MAX_HEAD_BYTES`].
    #[error("response head larger than {} KiB", MAX_HEAD_BYTES / 1024)]
    HeadTooLarge,
    /// `Content-Length` is not a number, or several differ.
    #[error("invalid content-length")]
    ContentLength,
    /// `Transfer-Encoding` in an HTTP/1.0 response, which cannot use it.
    #[error("transfer-encoding in an HTTP/1.0 response")]
    TransferEncoding10,
    /// A chunk-size line, chunk end or trailer section does not parse.
    #[error("malformed chunked body")]
    Chunked,
    /// The connection ended before the response did.
    #[error("connection closed before the response ended")]
    Truncated,
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReqFraming {
    /// `Content-Length`, with the bytes still to send.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes `method target HTTP/1.1`, the fields (those of `headers`, then the `direct` ones)
/// and the framing of the body into `dst`. `body_len` is `None` for a request without a
/// body, `Some(None)` for one of unknown length (sent chunked), `Some(Some(n))` for `n` bytes.
/// A `Content-Length` the request already has is kept and wins, as hyper does;
/// `Transfer-Encoding` is Strait's to set (it is hop-by-hop and was removed from what the
/// client sent).
pub(crate) fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    direct: Option<&DirectHeaders>,
    body_len: Option<Option<u64>>,
    dst: &mut Vec<u8>,
) -> Option<ReqFraming> {
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    let declared = body_len.and_then(|_| content_length(headers).ok().flatten());
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if let Some(d) = direct {
        d.write(dst);
    }
    let framing = match (body_len, declared) {
        (None, _) => None,
        (Some(_), Some(n)) => Some(ReqFraming::Length(n)),
        (Some(Some(n)), None) => {
            dst.extend_from_slice(b"content-length: ");
            dst.extend_from_slice(itoa_u64(n, &mut [0; 20]));
            dst.extend_from_slice(b"\r\n");
            Some(ReqFraming::Length(n))
        }
        (Some(None), None) => {
            dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Some(ReqFraming::Chunked)
        }
    };
    dst.extend_from_slice(b"\r\n");
    framing
}

/// Appends the chunk-size line of a chunk of `len` bytes.
pub(crate) fn encode_chunk_start(len: usize, dst: &mut Vec<u8>) {
    use std::io::Write as _;
    let _ = write!(dst, "{len:x}\r\n");
}

/// Appends the last chunk and the trailer section.
pub(crate) fn encode_chunked_end(trailers: Option<&HeaderMap>, dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

/// How the body of a response is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body: a response to HEAD, 204, 304, or a 101.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the server closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// Whether the connection can carry another request after this response.
    pub keep_alive: bool,
}

/// The header names of the last response on a connection, by position, with their bytes as
/// the server wrote them. A server sends the same names in the same order response after
/// response; a field whose bytes are those remembered at its position gets that name again,
/// without `HeaderName::from_bytes`'s lowercasing and lookup (and, for a name outside the
/// standard ones, its allocation) on every response. Exact bytes, not a case-blind compare:
/// that compare, a byte at a time, cost more than `from_bytes`.
#[derive(Debug, Default)]
pub(crate) struct NameCache(Vec<(Box<[u8]>, HeaderName)>);

/// Positions remembered: enough for the heads of ordinary servers.
const CACHED_NAMES: usize = 32;

impl NameCache {
    fn name(&mut self, i: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        if let Some((known, name)) = self.0.get(i) {
            if **known == *raw {
                return Ok(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        let entry = (Box::from(raw), name.clone());
        if i < self.0.len() {
            self.0[i] = entry;
        } else if i == self.0.len() && i < CACHED_NAMES {
            self.0.push(entry);
        }
        Ok(name)
    }
}

/// Parses a complete response head off the front of `buf`, or returns `None` if more bytes
/// are needed. Informational responses other than 101 are consumed and skipped (Strait does
/// not forward 100 Continue or 103 Early Hints, as hyper's client does not).
pub(crate) fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
    names: &mut NameCache,
) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        // Uninitialised: a head has a handful of fields, and zeroing room for a hundred
        // (3.2 KB) on every response showed in profiles.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(H1Error::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(H1Error::Head(e)),
        };
        if len > MAX_HEAD_BYTES {
            return Err(H1Error::HeadTooLarge);
        }
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Head(httparse::Error::Status))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // The head's bytes are frozen once; each value is a slice of them.
        let count = resp.headers.len();
        // Positions in the head, as the fields borrow `buf`: each is below `len`, at most
        // MAX_HEAD_BYTES (64 KiB, checked above), so it fits in a u16 (the array: 800 bytes).
        let mut offsets = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
        let base = buf.as_ptr() as usize;
        let at = |p: *const u8| (p as usize - base) as u16;
        for (o, h) in offsets.iter_mut().zip(resp.headers.iter()) {
            *o = (
                at(h.name.as_ptr()),
                h.name.len() as u16,
                at(h.value.as_ptr()),
                h.value.len() as u16,
            );
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        // What framing and reuse depend on is read here, as each field goes by, rather than
        // looked up in the map afterwards. The hop-by-hop fields this codec consumes (its
        // framing, `Connection` with only `close`/`keep-alive`/`upgrade`, `Keep-Alive`) are
        // not put in the map: the proxy would remove them before the client sees the response.
        let mut facts = HeadFacts::default();
        for (i, &(n, nl, v, vl)) in offsets[..count].iter().enumerate() {
            let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
            let name = names
                .name(i, &head[n..n + nl])
                .map_err(|_| H1Error::Head(httparse::Error::HeaderName))?;
            let raw = &head[v..v + vl];
            if name == header::CONNECTION {
                if !facts.connection(raw) {
                    continue;
                }
            } else if name == header::TRANSFER_ENCODING {
                facts.te_last = Some((v, vl));
                continue;
            } else if name == header::CONTENT_LENGTH {
                facts.length.add(raw);
            } else if name == KEEP_ALIVE {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
                .map_err(|_| H1Error::Head(httparse::Error::HeaderValue))?;
            headers.append(name, value);
        }
        let te = facts.te_last.map(|(v, vl)| &head[v..v + vl]);
        let framing = body_framing(status, version, te, facts.length, method)?;
        let mut keep_alive = facts.keeps_alive(version) && framing != BodyFraming::UntilClose;
        // Both framings at once: chunked wins (RFC 9112 section 6.3), the length must not reach
        // the client, and a server that sends both is not trusted with another request.
        if te.is_some() && facts.length != Length::Absent {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        // After a 2xx to CONNECT the connection is a tunnel, never a pooled connection.
        if method == Method::CONNECT && status.is_success() {
            keep_alive = false;
        }
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        }));
    }
}

/// What a response head says about its framing and its connection.
#[derive(Debug, Default)]
struct HeadFacts {
    /// Position of the last `Transfer-Encoding` value in the head.
    te_last: Option<(usize, usize)>,
    length: Length,
    /// `Connection: close` seen.
    close: bool,
    /// `Connection: keep-alive` seen.
    keep_alive: bool,
}

impl HeadFacts {
    /// Takes in one `Connection` value; returns whether it names anything beyond `close`,
    /// `keep-alive` and `upgrade` (then the field is kept, for the proxy to remove the
    /// fields it names).
    fn connection(&mut self, raw: &[u8]) -> bool {
        let mut names_fields = false;
        for token in raw.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                names_fields = true;
            }
        }
        names_fields
    }

    /// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`.
    fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        }
    }
}

/// The `Content-Length` of a message: several equal values (or a list of them) count as
/// one, anything else is invalid (RFC 9110 section 8.6).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Length {
    #[default]
    Absent,
    Valid(u64),
    Invalid,
}

impl Length {
    /// Takes in one `Content-Length` value.
    fn add(&mut self, raw: &[u8]) {
        for part in raw.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                *self = Self::Invalid;
                return;
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            *self = match *self {
                Self::Absent => Self::Valid(n),
                Self::Valid(f) if f == n => Self::Valid(n),
                _ => Self::Invalid,
            };
        }
    }
}

fn body_framing(
    status: StatusCode,
    version: Version,
    te_last: Option<&[u8]>,
    length: Length,
    method: &Method,
) -> Result<BodyFraming, H1Error> {
    if matches!(status.as_u16(), 101 | 204 | 304) || method == Method::HEAD {
        return Ok(BodyFraming::Empty);
    }
    if method == Method::CONNECT && status.is_success() {
        return Ok(BodyFraming::Empty);
    }
    if let Some(te) = te_last {
        if version == Version::HTTP_10 {
            return Err(H1Error::TransferEncoding10);
        }
        let last = te.rsplit(|&b| b == b',').next().unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        });
    }
    match length {
        Length::Absent => Ok(BodyFraming::UntilClose),
        Length::Valid(0) => Ok(BodyFraming::Empty),
        Length::Valid(n) => Ok(BodyFraming::Length(n)),
        Length::Invalid => Err(H1Error::ContentLength),
    }
}

/// The `Content-Length` of a message (see [`Length`]).
pub(crate) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, H1Error> {
    let mut length = Length::Absent;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        length.add(v.as_bytes());
    }
    match length {
        Length::Absent => Ok(None),
        Length::Valid(n) => Ok(Some(n)),
        Length::Invalid => Err(H1Error::ContentLength),
    }
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk, with the bytes left in it.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, before the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

/// What the next bytes of a chunked body gave.
#[derive(Debug)]
pub(crate) enum ChunkedItem {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended without trailers.
    End,
    /// More bytes are needed.
    NeedMore,
}

impl Chunked {
    /// Decodes from the front of `buf` until a frame, the end, or the end of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<ChunkedItem, H1Error> {
        loop {
            match *self {
                Self::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            Self::Trailers
                        } else {
                            Self::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META_BYTES => {
                        return Ok(ChunkedItem::NeedMore)
                    }
                    _ => return Err(H1Error::Chunked),
                },
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(ChunkedItem::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Self::DataEnd
                    } else {
                        Self::Data(left)
                    };
                    return Ok(ChunkedItem::Data(data));
                }
                Self::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(ChunkedItem::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunked);
                    }
                    buf.advance(2);
                    *self = Self::Size;
                }
                Self::Trailers => {
                    if buf.len() < 2 {
                        return Ok(ChunkedItem::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        *self = Self::Done;
                        return Ok(ChunkedItem::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| H1Error::Chunked)?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| H1Error::Chunked)?;
                                trailers.append(name, value);
                            }
                            buf.advance(used);
                            *self = Self::Done;
                            return Ok(ChunkedItem::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_META_BYTES => {
                            return Ok(ChunkedItem::NeedMore)
                        }
                        _ => return Err(H1Error::Chunked),
                    }
                }
                Self::Done => return Ok(ChunkedItem::End),
            }
        }
    }
}

/// `n` in decimal, without allocating.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
        parse_response_head(
            &mut BytesMut::from(bytes),
            method,
            &mut NameCache::default(),
        )
    }

    #[test]
    fn request_heads_frame_their_bodies() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        let mut out = Vec::new();
        assert_eq!(
            encode_request_head(&Method::GET, "/x?y", &h, None, None, &mut out),
            None
        );
        assert_eq!(out, b"GET /x?y HTTP/1.1\r\nhost: a.example\r\n\r\n");

        out.clear();
        let f = encode_request_head(&Method::POST, "/", &h, None, Some(Some(12)), &mut out);
        assert_eq!(f, Some(ReqFraming::Length(12)));
        assert!(out.ends_with(b"content-length: 12\r\n\r\n"));

        out.clear();
        let f = encode_request_head(&Method::POST, "/", &h, None, Some(None), &mut out);
        assert_eq!(f, Some(ReqFraming::Chunked));
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));

        // A declared length wins and is not written twice.
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        out.clear();
        let f = encode_request_head(&Method::PUT, "/", &h, None, Some(None), &mut out);
        assert_eq!(f, Some(ReqFraming::Length(3)));
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
    }

    #[test]
    fn chunk_encoding() {
        let mut out = Vec::new();
        encode_chunk_start(300, &mut out);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        encode_chunked_end(Some(&t), &mut out);
        assert_eq!(out, b"12c\r\n0\r\ngrpc-status: 0\r\n\r\n");
    }

    #[test]
    fn response_bodies_are_delimited_as_rfc_9112_says() {
        let get = Method::GET;
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &get,
                BodyFraming::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
                &get,
                BodyFraming::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                &get,
                BodyFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
                &get,
                BodyFraming::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                &get,
                BodyFraming::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                &Method::CONNECT,
                BodyFraming::Empty,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                &get,
                BodyFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                &get,
                BodyFraming::UntilClose,
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                &get,
                BodyFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
                &get,
                BodyFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
                &Method::HEAD,
                BodyFraming::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
                &get,
                BodyFraming::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                &get,
                BodyFraming::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\n",
                &get,
                BodyFraming::Length(5),
                true,
            ),
        ];
        for (text, method, framing, keep_alive) in cases {
            let h = head(text, method).unwrap().unwrap();
            assert_eq!((h.framing, h.keep_alive), (framing, keep_alive), "{text}");
            if h.framing == BodyFraming::Chunked {
                assert!(!h.headers.contains_key(header::CONTENT_LENGTH), "{text}");
            }
        }
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(head(bad, &get).is_err(), "{bad}");
        }
    }

    #[test]
    fn consumed_hop_by_hop_fields_stay_out_of_the_map() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nx-a: 1\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        let names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-a"]);
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Chunked, true));
        // A Connection field that names other fields stays, for the proxy to remove them.
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nx-secret: 1\r\n\
             content-length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.headers[header::CONNECTION], "close, x-secret");
        assert_eq!((h.framing, h.keep_alive), (BodyFraming::Empty, false));
        // A 101's Connection: upgrade is the proxy's to set again; Upgrade stays.
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        let names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["upgrade"]);
        // An invalid length counts only where the length delimits the body.
        let h = head(
            "HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(h.unwrap().unwrap().framing, BodyFraming::Empty);
    }

    #[test]
    fn a_connection_remembers_names_by_position_and_never_mixes_them_up() {
        // The same connection's responses, one after another: names repeated in other case,
        // changed, added and dropped at the remembered positions.
        let heads = [
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nX-Backend: 1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nSERVER: nginx\r\nx-backend: 2\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nserver: nginx\r\nX-Other: 3\r\nContent-Length: 0\r\nVia: a\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nX-Backend: 5\r\nContent-Length: 0\r\n\r\n",
        ];
        let mut names = NameCache::default();
        for text in heads {
            let parse = |cache: &mut NameCache| {
                let mut buf = BytesMut::from(text.as_bytes());
                parse_response_head(&mut buf, &Method::GET, cache)
                    .unwrap()
                    .unwrap()
                    .headers
            };
            let fresh = parse(&mut NameCache::default());
            let cached = parse(&mut names);
            assert_eq!(cached, fresh, "{text:?}");
        }
        assert_eq!(
            names.0.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
            ["server", "x-backend", "content-length", "via"]
        );
    }

    #[test]
    fn heads_parse_in_pieces_and_skip_informational_responses() {
        let full =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\nx-a: 2\r\n\r\nbody";
        let mut buf = BytesMut::new();
        for (i, b) in full.bytes().enumerate() {
            buf.extend_from_slice(&[b]);
            let parsed =
                parse_response_head(&mut buf, &Method::POST, &mut NameCache::default()).unwrap();
            if i + 1 < full.len() - 4 {
                assert!(parsed.is_none(), "complete at byte {i}");
                continue;
            }
            let h = parsed.unwrap();
            assert_eq!(h.status, 201);
            let values: Vec<_> = h.headers.get_all("x-a").iter().collect();
            assert_eq!(values, ["1", "2"]);
            assert_eq!(&buf[..], b"");
            break;
        }
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\nframe"[..],
        );
        let h = parse_response_head(&mut buf, &Method::GET, &mut NameCache::default())
            .unwrap()
            .unwrap();
        assert_eq!((h.status.as_u16(), h.framing), (101, BodyFraming::Empty));
        assert_eq!(
            &buf[..],
            b"frame",
            "bytes after the head stay in the buffer"
        );
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        let filler = format!("x-filler: {}\r\n", "0".repeat(1000));
        while text.len() < MAX_HEAD_BYTES {
            text.push_str(&filler);
        }
        assert!(matches!(
            head(&text, &Method::GET),
            Err(H1Error::HeadTooLarge)
        ));
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\nNEXT";
        // Fed one byte at a time and whole, the result is the same.
        for step in [1, wire.len()] {
            let mut state = Chunked::Size;
            let mut buf = BytesMut::new();
            let mut data = Vec::new();
            let mut trailers = None;
            let mut fed = 0;
            loop {
                match state.decode(&mut buf).unwrap() {
                    ChunkedItem::Data(d) => data.extend_from_slice(&d),
                    ChunkedItem::Trailers(t) => trailers = Some(t),
                    ChunkedItem::End => break,
                    ChunkedItem::NeedMore => {
                        let end = (fed + step).min(wire.len());
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
                if state == Chunked::Done {
                    break;
                }
            }
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
            let rest = [&buf[..], &wire[fed..]].concat();
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        let mut state = Chunked::Size;
        let mut buf = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert!(matches!(state.decode(&mut buf).unwrap(), ChunkedItem::End));
        for bad in [&b"zz\r\n"[..], b"2\r\nabXY", b"0\r\n: x\r\n\r\n"] {
            let mut state = Chunked::Size;
            let mut buf = BytesMut::from(bad);
            let mut out = Ok(ChunkedItem::NeedMore);
            for _ in 0..4 {
                out = state.decode(&mut buf);
                if !matches!(out, Ok(ChunkedItem::Data(_))) {
                    break;
                }
            }
            assert!(out.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn decimal() {
        for n in [0, 7, 10, 64, 12345, u64::MAX] {
            assert_eq!(itoa_u64(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
