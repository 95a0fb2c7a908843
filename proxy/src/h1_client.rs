//! An HTTP/1.1 exchange with an upstream, driven by the request's own task.
//!
//! hyper's client gives each connection a task of its own, fed by a channel: per request, the
//! request crosses to that task and the response crosses back, two wake-ups and a hop through
//! the scheduler on top of the socket work. Here the task that serves the downstream
//! connection writes the request and reads the response itself, and the response body reads
//! straight from the upstream socket when the downstream side asks for more. An upstream
//! connection is a plain value ([`Conn`]) that lives in its endpoint's idle list between
//! requests ([`crate::pool`]).
//!
//! A request body is sent while the response is awaited and, once it has begun, while the
//! response body is read, so a server that answers as it reads (or answers early) is served
//! as it would be by hyper. A connection goes back to its pool only when both directions have
//! ended cleanly.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::client::TlsStream;

use crate::body::{BodyError, ProxyBody};
use crate::breaker::ConnectionSlot;
use crate::h1_codec::{self, BodyFraming, Chunked, ChunkedItem, H1Error, ReqFraming};
use crate::headers::DirectHeaders;
use crate::pool::Home;

/// Bytes asked of the socket per read: a typical response head and small body in one read.
const READ_CHUNK: usize = 8 * 1024;
/// Buffers larger than this (a large head, a large request body frame) are not kept while the
/// connection is idle.
const KEEP_BUF: usize = 64 * 1024;

/// The socket of an upstream connection.
#[derive(Debug)]
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, b),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a request's head is written from: its parts, then the headers Strait writes
/// straight into it (see [`DirectHeaders`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestHead<'a> {
    pub(crate) parts: &'a http::request::Parts,
    pub(crate) direct: Option<&'a DirectHeaders>,
}

/// An open upstream connection between requests. Dropping it closes the socket and frees its
/// slot of the backend's `max_connections`.
#[derive(Debug)]
pub(crate) struct Conn {
    io: Io,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// Bytes to write: the request head, then request body data as it comes.
    wbuf: Vec<u8>,
    /// The names of the last response head read on it.
    names: h1_codec::NameCache,
    /// [`crate::upstream_tls::UpstreamTls::fingerprint`] of the settings it was made with (0:
    /// cleartext), so a reload that changes them does not keep using it.
    pub(crate) tls: u64,
    /// `clock_ns()` when it was last handed back.
    pub(crate) idle_since: u64,
    /// The worker that opened it ([`crate::workers::current`]), whose runtime drives its
    /// socket and timer: it goes back to that worker's idle list.
    pub(crate) worker: usize,
    /// Wakes an exchange waiting past its deadline; see [`Conn::poll_deadline`].
    timer: Option<Pin<Box<Sleep>>>,
    _slot: ConnectionSlot,
}

impl Conn {
    pub(crate) fn new(io: Io, tls: u64, slot: ConnectionSlot) -> Box<Self> {
        Box::new(Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            names: h1_codec::NameCache::default(),
            tls,
            idle_since: 0,
            worker: crate::workers::current(),
            timer: None,
            _slot: slot,
        })
    }

    /// Whether `at` has passed; if not, the task is woken when it does. The connection keeps
    /// one timer, armed no later than the deadline of the request on it, and re-arms it only
    /// when it fires early: a request's deadline is usually later than the one before it on
    /// the same connection (the same route timeout, counted from a later start), so most
    /// requests cost no timer operation (a timer per request is an allocation, a
    /// registration in the runtime's timer wheel and a cancellation).
    fn poll_deadline(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() > at {
            timer.as_mut().reset(at);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            if Instant::now() >= at {
                return Poll::Ready(());
            }
            timer.as_mut().reset(at);
        }
    }

    /// Whether an idle connection can carry a request: nothing arrived while it was idle,
    /// neither the server's close nor stray bytes. When nothing arrived, tokio knows it
    /// without a syscall (the socket has not been reported readable).
    pub(crate) fn still_open(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [std::mem::MaybeUninit::uninit()];
        let mut buf = ReadBuf::uninit(&mut byte);
        // Over TLS a read also takes in what needs no answer (session tickets).
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// Readies an idle connection's buffers: large ones are let go.
    pub(crate) fn trim(&mut self) {
        if self.rbuf.capacity() > KEEP_BUF {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.capacity() > KEEP_BUF {
            self.wbuf = Vec::new();
        }
        self.wbuf.clear();
    }

    /// The socket and any bytes read past the 101 response, for a tunnel.
    pub(crate) fn into_upgraded(self) -> (Io, Bytes) {
        (self.io, self.rbuf.freeze())
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The response is not valid HTTP/1.1.
    #[error("{0}")]
    Protocol(#[from] H1Error),
    /// The request body could not be read from the client.
    #[error("the request body could not be read: {0}")]
    RequestBody(BodyError),
    /// The request body did not match its `Content-Length`.
    #[error("the request body does not match its content-length")]
    RequestBodyLength,
    /// The response head did not arrive by the exchange's deadline.
    #[error("no response by the deadline")]
    TimedOut,
}

/// A request body still being sent.
#[derive(Debug)]
struct Outgoing {
    body: ProxyBody,
    framing: ReqFraming,
}

/// One request on one connection.
#[derive(Debug)]
pub(crate) struct Exchange {
    conn: Box<Conn>,
    /// Boxed: most requests have no body, and the body type contains this one.
    out: Option<Box<Outgoing>>,
    /// Bytes of `conn.wbuf` written.
    wpos: usize,
    /// Written bytes not yet flushed (a TLS record may be held back).
    unflushed: bool,
    /// Whether any byte of the request reached the socket.
    pub(crate) wrote_any: bool,
    /// Whether any byte of the response arrived.
    pub(crate) read_any: bool,
    /// The request could not be sent to its end: the connection cannot be reused.
    broken: bool,
    /// When the response head is due (route or per-try timeout).
    deadline: Option<Instant>,
}

impl Exchange {
    /// Writes the request head into the connection's buffer; the body, if any, follows as
    /// the exchange is polled.
    pub(crate) fn new(
        mut conn: Box<Conn>,
        head: RequestHead<'_>,
        body: Option<ProxyBody>,
        deadline: Option<Instant>,
    ) -> Self {
        let RequestHead { parts, direct } = head;
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let len = body.as_ref().map(|b| b.size_hint().exact());
        conn.wbuf.clear();
        let framing = h1_codec::encode_request_head(
            &parts.method,
            target,
            &parts.headers,
            direct,
            len,
            &mut conn.wbuf,
        );
        let out = match (body, framing) {
            (Some(body), Some(framing)) => Some(Box::new(Outgoing { body, framing })),
            _ => None,
        };
        Self {
            conn,
            out,
            wpos: 0,
            unflushed: false,
            wrote_any: false,
            read_any: false,
            broken: false,
            deadline,
        }
    }

    /// The request body, if none of the request was written (to send it elsewhere).
    pub(crate) fn take_unsent_body(&mut self) -> Option<ProxyBody> {
        if self.wrote_any {
            return None;
        }
        self.out.take().map(|o| o.body)
    }

    /// Whether the whole request has been written and flushed.
    fn sent(&self) -> bool {
        self.out.is_none() && self.wpos >= self.conn.wbuf.len() && !self.unflushed
    }

    /// Whether the connection can carry another request, the response having been read to its
    /// end: the whole request went out and nothing arrived past the response.
    fn ended_cleanly(&self) -> bool {
        self.sent() && !self.broken && self.conn.rbuf.is_empty()
    }

    /// Writes the request, taking body frames as the socket accepts them.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        loop {
            while self.wpos < self.conn.wbuf.len() {
                let conn = &mut *self.conn;
                let n = ready!(Pin::new(&mut conn.io).poll_write(cx, &conn.wbuf[self.wpos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.wpos += n;
                self.wrote_any = true;
                self.unflushed = true;
            }
            if self.unflushed {
                ready!(Pin::new(&mut self.conn.io).poll_flush(cx))?;
                self.unflushed = false;
            }
            self.conn.wbuf.clear();
            self.wpos = 0;
            let Some(out) = self.out.as_deref_mut() else {
                return Poll::Ready(Ok(()));
            };
            let frame = ready!(Pin::new(&mut out.body).poll_frame(cx));
            let wbuf = &mut self.conn.wbuf;
            match (frame, &mut out.framing) {
                (None, ReqFraming::Length(0)) => self.out = None,
                (None, ReqFraming::Length(_)) => {
                    return Poll::Ready(Err(ExchangeError::RequestBodyLength))
                }
                (None, ReqFraming::Chunked) => {
                    h1_codec::encode_chunked_end(None, wbuf);
                    self.out = None;
                }
                (Some(Err(e)), _) => return Poll::Ready(Err(ExchangeError::RequestBody(e))),
                (Some(Ok(frame)), framing) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => match framing {
                        ReqFraming::Length(left) => {
                            let Some(rest) = left.checked_sub(data.len() as u64) else {
                                return Poll::Ready(Err(ExchangeError::RequestBodyLength));
                            };
                            *left = rest;
                            wbuf.extend_from_slice(&data);
                        }
                        ReqFraming::Chunked => {
                            h1_codec::encode_chunk_start(data.len(), wbuf);
                            wbuf.extend_from_slice(&data);
                            wbuf.extend_from_slice(b"\r\n");
                        }
                    },
                    // Trailers end a chunked body; with a length there is no place for them.
                    Err(frame) => {
                        if *framing == ReqFraming::Chunked {
                            h1_codec::encode_chunked_end(frame.trailers_ref(), wbuf);
                            self.out = None;
                        }
                    }
                },
            }
        }
    }

    /// Goes on sending the request body, if it has not ended, while the response is read.
    /// A failure only means the connection cannot be reused.
    fn poll_send_alongside(&mut self, cx: &mut Context<'_>) {
        if self.broken || self.sent() {
            return;
        }
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            tracing::debug!(error = %e, "request body not sent to its end");
            self.broken = true;
            self.out = None;
        }
    }

    /// Reads more of the response into the buffer; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let conn = &mut *self.conn;
        if conn.rbuf.capacity() - conn.rbuf.len() < READ_CHUNK / 4 {
            conn.rbuf.reserve(READ_CHUNK);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.io),
            cx,
            &mut conn.rbuf
        ))?;
        self.read_any |= n > 0;
        Poll::Ready(Ok(n))
    }

    /// Sends the request and reads the response head.
    pub(crate) async fn response_head(
        &mut self,
        method: &Method,
    ) -> Result<h1_codec::ResponseHead, ExchangeError> {
        std::future::poll_fn(|cx| self.poll_response_head(cx, method)).await
    }

    fn poll_response_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
    ) -> Poll<Result<h1_codec::ResponseHead, ExchangeError>> {
        let mut send_failed = None;
        if !self.broken && !self.sent() {
            match self.poll_send(cx) {
                Poll::Ready(Err(e @ ExchangeError::Io(_))) => send_failed = Some(e),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
        }
        loop {
            if !self.conn.rbuf.is_empty() {
                if let Some(head) = h1_codec::parse_response_head(
                    &mut self.conn.rbuf,
                    method,
                    &mut self.conn.names,
                )? {
                    if send_failed.is_some() {
                        self.broken = true;
                        self.out = None;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            // A server that stopped reading may still have answered (413 and close): look
            // for that answer, and report the write's failure only if there is none.
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(send_failed.unwrap_or(if self.read_any {
                        H1Error::Truncated.into()
                    } else {
                        ExchangeError::Io(io::ErrorKind::UnexpectedEof.into())
                    })))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(send_failed.unwrap_or(e.into()))),
                Poll::Pending => {
                    if let Some(e) = send_failed {
                        return Poll::Ready(Err(e));
                    }
                    if let Some(at) = self.deadline {
                        if self.conn.poll_deadline(cx, at).is_ready() {
                            return Poll::Ready(Err(ExchangeError::TimedOut));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The response, its body read from this connection as it is polled; the connection goes
    /// `home` when the body ends cleanly.
    pub(crate) fn into_response(
        mut self,
        head: h1_codec::ResponseHead,
        home: Home,
    ) -> Response<ProxyBody> {
        let h1_codec::ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        } = head;
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        let decoding = match framing {
            BodyFraming::Empty if status == http::StatusCode::SWITCHING_PROTOCOLS => {
                *resp.body_mut() = ProxyBody::H1(H1Body {
                    ex: Some(self),
                    decoding: Decoding::Upgrade,
                    keep_alive: false,
                    home: None,
                });
                return resp;
            }
            BodyFraming::Empty => Decoding::Length(0),
            BodyFraming::Length(n) => Decoding::Length(n),
            BodyFraming::Chunked => Decoding::Chunked(Chunked::Size),
            BodyFraming::UntilClose => Decoding::UntilClose,
        };
        // The common case: the whole body came with the head. The connection is free now.
        if let Decoding::Length(n) = decoding {
            if n <= self.conn.rbuf.len() as u64 {
                let data = self.conn.rbuf.split_to(n as usize).freeze();
                self.poll_send_alongside(&mut Context::from_waker(Waker::noop()));
                if keep_alive && self.ended_cleanly() {
                    home.put(self.conn);
                }
                *resp.body_mut() = ProxyBody::from(data);
                return resp;
            }
        }
        *resp.body_mut() = ProxyBody::H1(H1Body {
            ex: Some(self),
            decoding,
            keep_alive,
            home: Some(home),
        });
        resp
    }
}

/// How the rest of a response body is delimited.
#[derive(Debug)]
enum Decoding {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    /// A 101: no body; the connection is the tunnel's.
    Upgrade,
}

/// A response body read from the upstream connection as it is polled.
#[derive(Debug)]
pub struct H1Body {
    /// `None` once the body has ended (the connection handed back or closed).
    ex: Option<Exchange>,
    decoding: Decoding,
    keep_alive: bool,
    home: Option<Home>,
}

impl H1Body {
    /// The connection of a 101 response, for the tunnel.
    pub(crate) fn into_upgraded(mut self) -> Option<(Io, Bytes)> {
        match self.decoding {
            Decoding::Upgrade => self.ex.take().map(|ex| (*ex.conn).into_upgraded()),
            _ => None,
        }
    }

    /// The body ended cleanly: the connection goes back to its pool if it can carry another
    /// request.
    fn finish(&mut self) {
        let Some(mut ex) = self.ex.take() else {
            return;
        };
        ex.poll_send_alongside(&mut Context::from_waker(Waker::noop()));
        if self.keep_alive && ex.ended_cleanly() {
            if let Some(home) = self.home.take() {
                home.put(ex.conn);
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(ex) = this.ex.as_mut() else {
            return Poll::Ready(None);
        };
        ex.poll_send_alongside(cx);
        loop {
            let rbuf = &mut ex.conn.rbuf;
            let frame = match &mut this.decoding {
                Decoding::Upgrade | Decoding::Length(0) => None,
                Decoding::Length(left) if !rbuf.is_empty() => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(rbuf.len());
                    *left -= n as u64;
                    Some(Frame::data(rbuf.split_to(n).freeze()))
                }
                Decoding::UntilClose if !rbuf.is_empty() => {
                    Some(Frame::data(rbuf.split().freeze()))
                }
                Decoding::Chunked(state) => match state.decode(rbuf) {
                    Ok(ChunkedItem::Data(d)) => Some(Frame::data(d)),
                    Ok(ChunkedItem::Trailers(t)) => Some(Frame::trailers(t)),
                    Ok(ChunkedItem::End) => None,
                    Ok(ChunkedItem::NeedMore) => match ready!(ex.poll_fill(cx)) {
                        Ok(0) => return Poll::Ready(Some(Err(H1Error::Truncated.into()))),
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    },
                    Err(e) => {
                        this.ex = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                Decoding::Length(_) | Decoding::UntilClose => match ready!(ex.poll_fill(cx)) {
                    Ok(0) if matches!(this.decoding, Decoding::UntilClose) => None,
                    Ok(0) => {
                        this.ex = None;
                        return Poll::Ready(Some(Err(H1Error::Truncated.into())));
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        this.ex = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
            };
            // The last bytes go out with the connection already handed back, so that the
            // client's next request can have it.
            let ended = match (&frame, &this.decoding) {
                (None, _) => true,
                (Some(f), Decoding::Chunked(_)) => f.is_trailers(),
                (Some(_), Decoding::Length(left)) => *left == 0,
                (Some(_), _) => false,
            };
            if ended {
                if matches!(this.decoding, Decoding::UntilClose) {
                    this.ex = None;
                } else {
                    this.finish();
                }
            }
            return Poll::Ready(frame.map(Ok));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ex.is_none() || matches!(self.decoding, Decoding::Length(0) | Decoding::Upgrade)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoding {
            Decoding::Length(n) => SizeHint::with_exact(n),
            Decoding::Upgrade => SizeHint::with_exact(0),
            _ if self.ex.is_none() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
