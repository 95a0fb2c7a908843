//! TLS passthrough on `tcp` listeners with the real binary: the backend is picked by the
//! ClientHello's server name and the TLS session is the upstream's (its certificate, its
//! answer), with a rustls client and curl; unknown names and plain bytes are closed and
//! counted.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::tls::{connect, get_over, Ca, TlsUpstream};
use support::{client, eventually, get, tempdir, Binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    strait: Binary,
    ca: Ca,
    a_der: rustls::pki_types::CertificateDer<'static>,
    b_der: rustls::pki_types::CertificateDer<'static>,
    _ups: (TlsUpstream, TlsUpstream),
    _dir: tempdir::Dir,
}

impl Setup {
    /// Two TLS upstreams, `a` (a.test) and `b` (b.test, *.w.test); listener `sni` routes by
    /// name with no default, listener `fallback` sends unknown names to `a`.
    async fn start() -> Self {
        let ca = Ca::new("passthrough");
        // `other.test` is in a's certificate, so the fallback to `a` can be verified.
        let a_cert = ca.issue("a", &["a.test", "other.test"]);
        let b_cert = ca.issue("b", &["b.test", "*.w.test"]);
        let a = TlsUpstream::start("a", a_cert.server_config(&[b"http/1.1"], None)).await;
        let b = TlsUpstream::start("b", b_cert.server_config(&[b"http/1.1"], None)).await;
        let yaml = format!(
            r#"
listeners:
  - name: sni
    address: 127.0.0.1:0
    protocol: tcp
    tcp:
      sni:
        - hosts: [a.test]
          backend: a
        - hosts: [B.test, "*.w.test"]
          backend: b
  - name: fallback
    address: 127.0.0.1:0
    protocol: tcp
    tcp:
      backend: a
      sni:
        - hosts: [b.test]
          backend: b
backends:
  - name: a
    endpoints: ["{}"]
  - name: b
    endpoints: ["{}"]
"#,
            a.addr, b.addr
        );
        let dir = tempdir::Dir::new("passthrough");
        let strait = Binary::start(&dir.write("strait.yaml", &yaml)).await;
        Self {
            strait,
            ca,
            a_der: a_cert.der,
            b_der: b_cert.der,
            _ups: (a, b),
            _dir: dir,
        }
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.strait
            .listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
    }

    /// Connects through `listener` with server name `sni`; the upstream's certificate and
    /// its answer to `GET /`.
    async fn through(&self, listener: &str, sni: &str) -> (Vec<u8>, String) {
        let tls = connect(
            self.ca.client_config(&[b"http/1.1"]),
            self.listener(listener),
            sni,
        )
        .await
        .unwrap_or_else(|e| panic!("{sni} via {listener}: {e}"));
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (status, body) = get_over(tls, sni).await;
        assert_eq!(status, 200);
        (cert, body)
    }
}

#[tokio::test]
async fn the_server_name_picks_the_backend_and_tls_ends_at_the_upstream() {
    let s = Setup::start().await;
    for (listener, sni, name) in [
        ("sni", "a.test", "a"),
        ("sni", "b.test", "b"),
        ("sni", "x.w.test", "b"),
        ("fallback", "b.test", "b"),
        ("fallback", "other.test", "a"),
    ] {
        let (cert, body) = s.through(listener, sni).await;
        let want = if name == "a" { &s.a_der } else { &s.b_der };
        assert_eq!(
            &cert[..],
            &want[..],
            "{sni} via {listener}: {name}'s certificate"
        );
        assert_eq!(body, name, "{sni} via {listener}");
    }
    eventually(
        Duration::from_secs(5),
        "access log with the SNI",
        || async { s.strait.logged(r#""sni":"x.w.test""#) && s.strait.logged(r#""backend":"b""#) },
    )
    .await;
}

#[tokio::test]
async fn curl_reaches_each_backend_by_name() {
    let s = Setup::start().await;
    let port = s.listener("sni").port();
    for (host, want) in [("a.test", "a"), ("b.test", "b"), ("deep.w.test", "b")] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve"])
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&s.ca.file)
            .arg(format!("https://{host}:{port}/"))
            .output()
            .await
            .expect("curl runs");
        assert!(
            out.status.success(),
            "{host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{host}");
    }
}

#[tokio::test]
async fn unknown_names_and_plain_bytes_are_closed_and_counted() {
    let s = Setup::start().await;
    let addr = s.listener("sni");
    let err = connect(s.ca.client_config(&[]), addr, "c.test")
        .await
        .expect_err("no rule and no default backend for c.test");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );

    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing comes back, the connection is closed");

    let metrics = s.strait.admin_url("/metrics");
    for want in [
        r#"strait_tcp_connections_total{listener="sni",backend="",result="no_route"} 1"#,
        r#"strait_tcp_connections_total{listener="sni",backend="",result="not_tls"} 1"#,
    ] {
        eventually(Duration::from_secs(5), want, || async {
            get(&client(), &metrics).await.body.contains(want)
        })
        .await;
    }
}

#[test]
fn sni_rules_are_validated_with_their_paths() {
    let tcp = |body: &str| {
        format!(
            "listeners:\n  - name: t\n    address: 127.0.0.1:0\n    protocol: tcp\n    tcp:\n{body}backends:\n  - name: a\n    endpoints: [\"127.0.0.1:1\"]\n"
        )
    };
    for (body, want) in [
        ("      idle_timeout: 1h\n", "listeners[0].tcp: a tcp listener needs backend, sni"),
        ("      sni: []\n", "listeners[0].tcp.sni: give at least one"),
        (
            "      sni: [{hosts: [], backend: a}]\n",
            "listeners[0].tcp.sni[0].hosts: list at least one server name",
        ),
        (
            "      sni: [{hosts: [\"*\"], backend: a}]\n",
            "listeners[0].tcp.sni[0].hosts[0]: * matches any name",
        ),
        (
            "      sni: [{hosts: [10.0.0.1], backend: a}]\n",
            "listeners[0].tcp.sni[0].hosts[0]: \"10.0.0.1\" is an IP address",
        ),
        (
            "      sni: [{hosts: [a.test], backend: a}, {hosts: [A.test], backend: a}]\n",
            "listeners[0].tcp.sni[1].hosts[0]: \"A.test\" is already routed by listeners[0].tcp.sni[0]",
        ),
        (
            "      sni: [{hosts: [a.test], backend: nope}]\n",
            "listeners[0].tcp.sni[0].backend: unknown backend \"nope\"",
        ),
        (
            "      sni: [{hosts: [\"bad host\"], backend: a}]\n",
            "listeners[0].tcp.sni[0].hosts[0]: invalid host",
        ),
    ] {
        let err = strait_control::source::file::parse(std::path::Path::new("t.yaml"), &tcp(body))
            .expect_err(body)
            .to_string();
        assert!(err.contains(want), "{body}: want {want:?}, got {err}");
    }
}
