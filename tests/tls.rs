//! HTTPS listeners with the real binary: certificates generated here (rcgen), real clients
//! (curl, openssl s_client, a rustls client, a tonic gRPC client over TLS).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use support::*;

/// A private CA that signs leaf certificates into a directory.
struct Ca {
    dir: tempdir::Dir,
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(tag: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{tag} test CA"));
        let cert = params.self_signed(&key).unwrap();
        let dir = tempdir::Dir::new(tag);
        let pem = cert.pem();
        dir.write("ca.pem", &pem);
        Self {
            dir,
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Signs a certificate for `names` (DNS names, or `uri:...` for a URI name) and writes
    /// `<file>.pem` and `<file>-key.pem`; returns the certificate's DER.
    fn issue(&self, file: &str, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].trim_start_matches("uri:"));
        for n in names {
            params.subject_alt_names.push(match n.strip_prefix("uri:") {
                Some(u) => SanType::URI(u.try_into().unwrap()),
                None => SanType::DnsName((*n).try_into().unwrap()),
            });
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Written next to each other and renamed into place, as a rotation would be.
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        write_atomic(&key_path, &key.serialize_pem());
        write_atomic(&cert_path, &cert.pem());
        cert.der().to_vec()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A config with an `https` listener (`tls` given as YAML lines) forwarding to `up`, and a
/// plain listener whose routes it shares.
fn https_config(tls: &str, up: &Upstream) -> String {
    format!(
        "access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - forward: {{backend: app}}
  - name: secure
    address: 127.0.0.1:0
    protocol: https
    routes_from: web
    tls:
{tls}
backends:
  - name: app
    endpoints: [\"{}\"]
",
        up.addr
    )
}

/// The binary with [`https_config`] and one certificate, for `a.test`; `head` is YAML put before
/// the config (top-level settings such as `limits`).
async fn one_certificate(tag: &str, head: &str) -> (Upstream, Ca, Binary) {
    let up = Upstream::start("app").await;
    let ca = Ca::new(tag);
    ca.issue("a", &["a.test"]);
    let tls = format!(
        "      certificates: [{{cert: {}, key: {}}}]",
        ca.path("a.pem"),
        ca.path("a-key.pem")
    );
    let cfg = ca
        .dir
        .write("strait.yaml", &format!("{head}{}", https_config(&tls, &up)));
    let b = Binary::start(&cfg).await;
    (up, ca, b)
}

fn listener(b: &Binary, name: &str) -> std::net::SocketAddr {
    b.listeners.iter().find(|(n, _)| n == name).unwrap().1
}

/// `curl` against the https listener, resolving `host` to it; returns stdout and success.
fn curl(b: &Binary, ca: &Ca, host: &str, extra: &[&str]) -> (String, bool) {
    let addr = listener(b, "secure");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca.ca_path())
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", addr.port()))
        .args(extra)
        .arg(format!("https://{host}:{}/", addr.port()))
        .output()
        .expect("curl runs");
    if !out.status.success() {
        eprintln!("curl {host}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

/// The subject of the certificate served for `sni` (`None`: no SNI), as `openssl s_client`
/// sees it.
fn served_subject(addr: std::net::SocketAddr, sni: Option<&str>) -> String {
    let mut cmd = Command::new("sh");
    let name = match sni {
        Some(n) => format!("-servername {n}"),
        None => "-noservername".to_owned(),
    };
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect {addr} {name} </dev/null 2>/dev/null | openssl x509 -noout -subject"
    ));
    String::from_utf8_lossy(&cmd.output().unwrap().stdout)
        .trim()
        .to_owned()
}

// curl and openssl block this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_chosen_by_sni_with_wildcards_and_a_default() {
    let up = Upstream::start("app").await;
    let ca = Ca::new("tls-sni");
    ca.issue("a", &["a.test"]);
    ca.issue("wild", &["*.wild.test"]);
    ca.issue("fallback", &["fallback.test"]);
    let tls = format!(
        "      certificates:
        - {{cert: {}, key: {}}}
        - {{cert: {}, key: {}}}
        - {{cert: {}, key: {}, default: true}}",
        ca.path("a.pem"),
        ca.path("a-key.pem"),
        ca.path("wild.pem"),
        ca.path("wild-key.pem"),
        ca.path("fallback.pem"),
        ca.path("fallback-key.pem"),
    );
    let cfg = ca.dir.write("strait.yaml", &https_config(&tls, &up));
    let b = Binary::start(&cfg).await;
    let addr = listener(&b, "secure");
    assert_eq!(served_subject(addr, Some("a.test")), "subject=CN = a.test");
    assert_eq!(
        served_subject(addr, Some("x.wild.test")),
        "subject=CN = *.wild.test"
    );
    assert_eq!(
        served_subject(addr, Some("other.test")),
        "subject=CN = fallback.test"
    );
    assert_eq!(served_subject(addr, None), "subject=CN = fallback.test");
    // curl verifies the chain and the name, and gets the upstream's answer.
    let (body, ok) = curl(&b, &ca, "a.test", &[]);
    assert!(ok && body == "app", "{body}");
    let (body, ok) = curl(&b, &ca, "api.wild.test", &[]);
    assert!(ok && body == "app", "{body}");
}

// curl and openssl block this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_tls_below_1_2_is_refused() {
    let (_up, ca, b) = one_certificate("tls-alpn", "").await;
    let (v, ok) = curl(
        &b,
        &ca,
        "a.test",
        &["-o", "/dev/null", "-w", "%{http_version}"],
    );
    assert!(ok && v == "2", "ALPN h2 by default: {v}");
    let (v, ok) = curl(
        &b,
        &ca,
        "a.test",
        &["--http1.1", "-o", "/dev/null", "-w", "%{http_version}"],
    );
    assert!(ok && v == "1.1", "{v}");
    // X-Forwarded-Proto says https.
    let (headers, ok) = curl(&b, &ca, "a.test", &["-D", "-", "-o", "/dev/null"]);
    assert!(ok && headers.contains("x-seen-proto: https"), "{headers}");

    let addr = listener(&b, "secure");
    for (flag, works) in [("-tls1_1", false), ("-tls1_2", true), ("-tls1_3", true)] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl s_client -connect {addr} -servername a.test {flag} </dev/null 2>&1"
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let negotiated = !text.contains("Cipher is (NONE)") && text.contains("Cipher is");
        assert_eq!(negotiated, works, "{flag}: {text}");
    }
}

/// The cipher `openssl s_client` negotiates when it offers `offer` (`-ciphersuites` for TLS
/// 1.3, `-cipher` for TLS 1.2).
fn negotiated_cipher(addr: std::net::SocketAddr, version: &str, offer: &str) -> String {
    let flag = if version == "-tls1_3" {
        "-ciphersuites"
    } else {
        "-cipher"
    };
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername a.test {version} {flag} {offer} </dev/null 2>&1"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split_once("Cipher is ").map(|(_, c)| c.trim().to_owned()))
        .unwrap_or_else(|| panic!("no cipher negotiated: {text}"))
}

// openssl blocks this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_128_is_preferred_unless_the_client_puts_chacha20_first() {
    let (_up, _ca, b) = one_certificate("tls-ciphers", "").await;
    let addr = listener(&b, "secure");
    for (version, offer, expected) in [
        (
            "-tls1_3",
            "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            "-tls1_3",
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            "-tls1_3",
            "TLS_AES_256_GCM_SHA384",
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            "-tls1_2",
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        (
            "-tls1_2",
            "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ] {
        assert_eq!(
            negotiated_cipher(addr, version, offer),
            expected,
            "{version} offering {offer}"
        );
    }
}

/// One request with `openssl s_client` over TLS 1.3, saving its session to `session` and
/// resuming from it when it exists; returns (NewSessionTicket messages received, resumed).
fn ticketed_request(addr: std::net::SocketAddr, session: &Path) -> (usize, bool) {
    let resume = if session.exists() {
        format!("-sess_in {}", session.display())
    } else {
        String::new()
    };
    let next = session.with_extension("next");
    // -ign_eof: read until the server closes, so tickets sent after the handshake are seen.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'GET / HTTP/1.1\\r\\nHost: a.test\\r\\nConnection: close\\r\\n\\r\\n' | \
             timeout 10 openssl s_client -connect {addr} -servername a.test -tls1_3 -msg -ign_eof \
             {resume} -sess_out {} 2>&1",
            next.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HTTP/1.1 200"), "no response: {text}");
    std::fs::rename(&next, session).unwrap();
    let tickets = text
        .lines()
        .filter(|l| l.starts_with("<<<") && l.ends_with("NewSessionTicket"))
        .count();
    (tickets, text.contains("\nReused, TLSv1.3"))
}

// openssl blocks this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_ticket_per_handshake_and_each_resumes_the_next() {
    let (_up, ca, b) = one_certificate("tls-tickets", "").await;
    let addr = listener(&b, "secure");
    let session = ca.dir.path().join("session.pem");
    assert_eq!(
        ticketed_request(addr, &session),
        (1, false),
        "full handshake"
    );
    for i in 1..=3 {
        assert_eq!(
            ticketed_request(addr, &session),
            (1, true),
            "resumption {i}"
        );
    }
}

/// HTTP/2 (by ALPN) connections have no request-head timer: one that stays quiet before and
/// between its requests is kept.
#[tokio::test]
async fn a_quiet_h2_connection_outlasts_header_read_timeout() {
    let (_up, ca, b) =
        one_certificate("tls-h2-quiet", "limits: {header_read_timeout: 300ms}\n").await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca.ca_path()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(listener(&b, "secure"))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("a.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let req = http::Request::get("https://a.test/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let r = send.send_request(req).await.expect("still open");
        assert_eq!(r.status(), 200);
    }
    assert!(!conn.is_finished());
}

#[tokio::test]
async fn grpc_over_tls_reaches_an_h2c_backend() {
    let (grpc_addr, _reporter) =
        grpc_health_server("shop.Cart", Some(tonic_health::ServingStatus::Serving)).await;
    let ca = Ca::new("tls-grpc");
    ca.issue("a", &["localhost"]);
    let yaml = format!(
        "access_log: {{enabled: false}}
listeners:
  - name: secure
    address: 127.0.0.1:0
    protocol: https
    routes:
      - forward: {{backend: grpc}}
    tls:
      certificates: [{{cert: {}, key: {}}}]
backends:
  - name: grpc
    protocol: h2c
    endpoints: [\"{grpc_addr}\"]
",
        ca.path("a.pem"),
        ca.path("a-key.pem")
    );
    let cfg = ca.dir.write("strait.yaml", &yaml);
    let b = Binary::start(&cfg).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        listener(&b, "secure").port()
    ))
    .unwrap()
    .tls_config(tls)
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().status, 1, "SERVING");
}

// curl and openssl block this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_and_passes_its_identity() {
    let up = Upstream::start("app").await;
    let ca = Ca::new("tls-mtls");
    ca.issue("a", &["a.test"]);
    ca.issue(
        "client",
        &["uri:spiffe://cluster.local/ns/shop/sa/cart", "cart.test"],
    );
    let tls = format!(
        "      certificates: [{{cert: {}, key: {}}}]
      client_auth: {{ca: {}}}",
        ca.path("a.pem"),
        ca.path("a-key.pem"),
        ca.ca_path().display()
    );
    let cfg = ca.dir.write("strait.yaml", &https_config(&tls, &up));
    let b = Binary::start(&cfg).await;
    let (_, ok) = curl(&b, &ca, "a.test", &[]);
    assert!(!ok, "no client certificate: refused");
    let (cert, key) = (ca.path("client.pem"), ca.path("client-key.pem"));
    let (headers, ok) = curl(
        &b,
        &ca,
        "a.test",
        &[
            "--cert",
            &cert,
            "--key",
            &key,
            "-H",
            "x-client-identity: forged",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ],
    );
    assert!(ok, "with a certificate from the CA: {headers}");
    assert!(
        headers.contains("x-seen-identity: spiffe://cluster.local/ns/shop/sa/cart"),
        "the verified identity replaces the client's header: {headers}"
    );
}

/// A rustls client that trusts `ca` and keeps one HTTP/1.1 connection open.
async fn open_connection(
    addr: std::net::SocketAddr,
    ca: &Ca,
    sni: &str,
) -> (
    Vec<u8>,
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca.ca_path()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni.to_owned().try_into().unwrap(), tcp)
        .await
        .unwrap();
    let served = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    (served, sender)
}

use rustls_pki_types::pem::PemObject;

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_while_old_ones_stay() {
    let up = Upstream::start("app").await;
    let ca = Ca::new("tls-rotate");
    let v1 = ca.issue("a", &["a.test"]);
    let tls = format!(
        "      certificates: [{{cert: {}, key: {}}}]",
        ca.path("a.pem"),
        ca.path("a-key.pem")
    );
    let cfg = ca.dir.write("strait.yaml", &https_config(&tls, &up));
    let b = Binary::start(&cfg).await;
    let addr = listener(&b, "secure");
    let (served, mut old) = open_connection(addr, &ca, "a.test").await;
    assert_eq!(served, v1);

    let v2 = ca.issue("a", &["a.test"]);
    assert_ne!(v1, v2);
    eventually(
        Duration::from_secs(10),
        "new connections get the new certificate",
        || async { open_connection(addr, &ca, "a.test").await.0 == v2 },
    )
    .await;
    // The connection opened before the rotation still works, with its certificate.
    let req = http::Request::get("/")
        .header("host", "a.test")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = old.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);

    // A key that does not match the certificate is rejected; the last good pair stays.
    let other = rcgen::KeyPair::generate().unwrap();
    write_atomic(&ca.dir.path().join("a-key.pem"), &other.serialize_pem());
    eventually(
        Duration::from_secs(10),
        "the bad key is reported",
        || async { b.logged("does not go with") },
    )
    .await;
    assert_eq!(open_connection(addr, &ca, "a.test").await.0, v2);
}

// curl blocks this thread; the upstream runs on the other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_without_mtls_cannot_reach_an_mtls_host() {
    let up = Upstream::start("app").await;
    let ca = Ca::new("tls-misdirected");
    ca.issue("open", &["open.test"]);
    ca.issue("secure", &["secure.test"]);
    let tls = format!(
        "      certificates:
        - {{cert: {}, key: {}}}
        - {{cert: {}, key: {}, client_auth: {{ca: {}}}}}",
        ca.path("open.pem"),
        ca.path("open-key.pem"),
        ca.path("secure.pem"),
        ca.path("secure-key.pem"),
        ca.ca_path().display()
    );
    let cfg = ca.dir.write("strait.yaml", &https_config(&tls, &up));
    let b = Binary::start(&cfg).await;
    // SNI open.test (no client certificate asked), then Host: secure.test.
    let (headers, ok) = curl(
        &b,
        &ca,
        "open.test",
        &["-H", "host: secure.test", "-D", "-", "-o", "/dev/null"],
    );
    assert!(ok, "{headers}");
    assert!(headers.starts_with("HTTP/2 421"), "{headers}");
    assert!(headers.contains("x-strait-error: misdirected"), "{headers}");
    // On the open name, a client-sent identity header never reaches the upstream.
    let (headers, ok) = curl(
        &b,
        &ca,
        "open.test",
        &[
            "-H",
            "x-client-identity: forged",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ],
    );
    assert!(ok && headers.starts_with("HTTP/2 200"), "{headers}");
    assert!(!headers.contains("x-seen-identity"), "{headers}");
}
