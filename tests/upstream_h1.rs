//! The HTTP/1.1 exchange with upstreams that Strait runs itself: request bodies of unknown
//! length, a server that answers while it reads, an early answer, malformed and oversized
//! response heads, a body that breaks off, a connection the server closed while idle, and the
//! bytes an upstream sends right behind its 101. Upstreams and clients are raw sockets where
//! the bytes on the wire are the point.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::{body_client, client, eventually, get, send_full, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(upstream: std::net::SocketAddr) -> String {
    format!(
        "access_log: {{enabled: false}}\nlisteners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: b}}\nbackends:\n  - name: b\n    endpoints: [\"{upstream}\"]\n"
    )
}

/// Reads from `s` into `buf` until `buf` contains `needle`; returns the index after it.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> usize {
    loop {
        if let Some(i) = buf.windows(needle.len()).position(|w| w == needle) {
            return i + needle.len();
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("bytes within 10s")
            .expect("read");
        assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An upstream that runs `answer` on each accepted connection.
async fn raw_upstream<F, Fut>(answer: F) -> std::net::SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(answer(s));
        }
    });
    addr
}

#[tokio::test]
async fn a_request_body_of_unknown_length_goes_chunked() {
    // Answers with the request head it saw and the decoded body.
    let up = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        let head_end = read_until(&mut s, &mut buf, b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let end = read_until(&mut s, &mut buf, b"0\r\n\r\n").await;
        let mut wire = &buf[head_end..end];
        let mut body = Vec::new();
        loop {
            let line_end = wire.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&wire[..line_end]).unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&wire[line_end + 2..line_end + 2 + size]);
            wire = &wire[line_end + 2 + size + 2..];
        }
        let chunked = head.contains("transfer-encoding: chunked");
        let text = format!("chunked={chunked} body={}", String::from_utf8_lossy(&body));
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    // Chunked from the client, in pieces: the proxy cannot know the length.
    c.write_all(
        b"POST /up HTTP/1.1\r\nhost: a.example\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    c.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    read_until(&mut c, &mut buf, b"chunked=true body=hello world").await;
    assert!(
        buf.starts_with(b"HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test]
async fn a_server_that_answers_while_it_reads_gets_the_whole_body_through() {
    // hyper's echo: the response body is the request body, streamed back as it arrives. With
    // a body far larger than the socket buffers, a proxy that wrote the whole request before
    // reading would wait for ever.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let echo = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(hyper::Response::new(req.into_body()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), echo)
                    .await;
            });
        }
    });
    let p = TestProxy::start(&config(up)).await;
    let body: Bytes = (0..32u32 << 20)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let req = Request::post(p.url("/echo"))
        .body(Full::new(body.clone()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), async {
        let resp = body_client().request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body").to_bytes()
    })
    .await
    .expect("the echo completes within 60s");
    assert_eq!(resp.len(), body.len());
    assert!(resp == body, "the echoed body differs");
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_reaches_the_client() {
    let up = raw_upstream(|mut s| async move {
        read_until(&mut s, &mut Vec::new(), b"\r\n\r\n").await;
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
            .await
            .unwrap();
        // Close our side, then drain what comes until the proxy closes, as servers do so
        // that the answer is not lost to a reset.
        let _ = s.shutdown().await;
        let mut chunk = vec![0u8; 65536];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let body = Bytes::from(vec![b'x'; 16 << 20]);
    let req = Request::put(p.url("/upload"))
        .body(Full::new(body))
        .unwrap();
    let r = send_full(&body_client(), req).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.body, "too large");
}

#[tokio::test]
async fn malformed_and_oversized_response_heads_are_502_naming_the_fault() {
    let up = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        let head_end = read_until(&mut s, &mut buf, b"\r\n\r\n").await;
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let answer = if head.starts_with("GET /big-head") {
            let filler = format!("x-filler: {}\r\n", "a".repeat(1000));
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
                filler.repeat(70)
            )
        } else if head.starts_with("GET /two-lengths") {
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_owned()
        } else {
            "HTTP/1.1 200 OK\r\nbad header line\r\n\r\n".to_owned()
        };
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let c = client();
    for (path, reason) in [
        ("/big-head", "larger than 64 KiB"),
        ("/two-lengths", "invalid content-length"),
        ("/garbage", "malformed response head"),
    ] {
        let r = get(&c, &p.url(path)).await;
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert_eq!(r.header("x-strait-error"), "upstream-failed", "{path}");
        assert!(r.body.contains(reason), "{path}: {}", r.body);
    }
}

#[tokio::test]
async fn a_body_that_breaks_off_fails_the_client_response() {
    let up = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, b"\r\n\r\n").await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
            .await;
        // Closes with 90 bytes owed.
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = client()
            .request(Request::get(p.url("/")).body(Default::default()).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        resp.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string())
    })
    .await
    .expect("the response ends within 10s");
    // The head may already be on its way when the upstream breaks off, or still buffered
    // with the first bytes: either way the client sees a failure, never a clean short body.
    assert!(
        outcome.is_err(),
        "a body 90 bytes short ended cleanly: {outcome:?}"
    );
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_not_used_even_for_a_post() {
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (o, cl) = (Arc::clone(&opened), Arc::clone(&closed));
    // Answers one request with keep-alive, then closes without saying so.
    let up = raw_upstream(move |mut s| {
        let (o, cl) = (Arc::clone(&o), Arc::clone(&cl));
        async move {
            o.fetch_add(1, Ordering::SeqCst);
            let mut buf = Vec::new();
            read_until(&mut s, &mut buf, b"\r\n\r\n").await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            drop(s);
            cl.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let c = client();
    assert_eq!(get(&c, &p.url("/")).await.status, 200);
    eventually(Duration::from_secs(5), "the upstream closed", || {
        let n = closed.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    // Idle for well under a second: a POST on the closed connection would fail with 502 and
    // could not be sent again. The proxy sees the close and opens a new connection.
    let r = send_full(
        &body_client(),
        Request::post(p.url("/"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bytes_right_behind_a_101_reach_the_client() {
    let up = raw_upstream(|mut s| async move {
        let mut buf = Vec::new();
        read_until(&mut s, &mut buf, b"\r\n\r\n").await;
        // The switch and the first bytes of the new protocol in one write.
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nhello from upstream;",
        )
        .await
        .unwrap();
        let mut chunk = [0u8; 1024];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    let p = TestProxy::start(&config(up)).await;
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(
        b"GET /tunnel HTTP/1.1\r\nhost: a.example\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let head_end = read_until(&mut c, &mut buf, b"\r\n\r\n").await;
    assert!(
        buf.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let mut rest = buf.split_off(head_end);
    read_until(&mut c, &mut rest, b"hello from upstream;").await;
    c.write_all(b"ping").await.unwrap();
    let mut echoed = rest.split_off(rest.len());
    read_until(&mut c, &mut echoed, b"ping").await;
}
