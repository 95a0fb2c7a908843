//! TLS to upstreams, against real TLS servers on loopback with certificates from a private
//! CA: verification by CA file or system roots, skipping it, client certificates, HTTP/2
//! by ALPN (gRPC included), new connections when the TLS settings change, health checks,
//! and validation.

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::{Ca, TlsUpstream};
use support::*;

/// A config forwarding everything to backend `b` at `up`, with `backend` extra YAML lines
/// (indented for their place, e.g. the `tls:` block).
fn config(up: &TlsUpstream, backend: &str) -> String {
    format!(
        "access_log: {{enabled: false}}
listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - forward: {{backend: b}}
backends:
  - name: b
    endpoints: [\"{}\"]
{backend}
",
        up.addr
    )
}

fn tls_block(lines: &[String]) -> String {
    let mut s = String::from("    tls:\n");
    for l in lines {
        s.push_str("      ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

fn ca_line(ca: &Ca) -> String {
    format!("ca: \"{}\"", ca.file.display())
}

const SNI: &str = "sni: upstream.test";

#[tokio::test]
async fn http1_over_tls_verifies_the_upstream_with_the_ca_file() {
    let ca = Ca::new("h1");
    let cert = ca.issue("upstream", &["upstream.test"]);
    let up = TlsUpstream::start("tls-up", cert.server_config(&[b"http/1.1"], None)).await;
    let p = TestProxy::start(&config(&up, &tls_block(&[ca_line(&ca), SNI.into()]))).await;
    let c = client();
    for _ in 0..3 {
        let r = get_host(&c, &p.url("/x?y=1"), "app.example").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body, "tls-up");
        assert_eq!(r.header("x-seen-version"), "HTTP/1.1");
        assert_eq!(r.header("x-seen-sni"), "upstream.test");
        assert_eq!(
            r.header("x-seen-host"),
            "app.example",
            "Host is the client's"
        );
        assert_eq!(r.header("x-seen-path"), "/x?y=1");
    }
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_private_ca_is_not_in_the_system_roots_and_the_502_says_why() {
    let ca = Ca::new("sysroots");
    let cert = ca.issue("upstream", &["upstream.test"]);
    let up = TlsUpstream::start("tls-up", cert.server_config(&[b"http/1.1"], None)).await;
    let p = TestProxy::start(&config(&up, &tls_block(&[SNI.into()]))).await;
    let r = get(&client(), &p.url("/")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-strait-error"), "connect-failed");
    assert!(
        r.body
            .contains("TLS handshake with upstream.test failed: invalid peer certificate")
            && r.body.contains("UnknownIssuer"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("name");
    let cert = ca.issue("other", &["other.test"]);
    let up = TlsUpstream::start("tls-up", cert.server_config(&[], None)).await;
    let p = TestProxy::start(&config(&up, &tls_block(&[ca_line(&ca), SNI.into()]))).await;
    let r = get(&client(), &p.url("/")).await;
    assert_eq!(r.status, 502);
    assert!(
        r.body
            .contains("certificate not valid for name \"upstream.test\"; certificate is only valid for DnsName(\"other.test\")"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate_and_sends_no_sni_by_default() {
    let ca = Ca::new("insecure");
    let cert = ca.issue("upstream", &["upstream.test"]);
    let up = TlsUpstream::start("tls-up", cert.server_config(&[b"http/1.1"], None)).await;
    let p = TestProxy::start(&config(
        &up,
        &tls_block(&["insecure_skip_verify: true".into()]),
    ))
    .await;
    let r = get(&client(), &p.url("/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-seen-sni"),
        "",
        "an address is never sent as SNI"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let ca = Ca::new("mtls");
    let server = ca.issue("upstream", &["upstream.test"]);
    let strait = ca.issue("strait-client", &["strait.client.test"]);
    let up = TlsUpstream::start("mtls-up", server.server_config(&[b"http/1.1"], Some(&ca))).await;

    let mut p = TestProxy::start(&config(&up, &tls_block(&[ca_line(&ca), SNI.into()]))).await;
    let r = get(&client(), &p.url("/")).await;
    assert_eq!(r.status, 502, "no client certificate: {}", r.body);
    // TLS 1.3: the client's side of the handshake is over before the server checks the
    // (missing) certificate, so the refusal arrives as the answer to the request.
    assert_eq!(r.header("x-strait-error"), "upstream-failed");
    assert!(
        r.body
            .contains("failed: received fatal alert: CertificateRequired"),
        "{}",
        r.body
    );
    assert_eq!(up.hits(), 0);

    let with_cert = tls_block(&[
        ca_line(&ca),
        SNI.into(),
        format!("client_cert: \"{}\"", strait.cert_file.display()),
        format!("client_key: \"{}\"", strait.key_file.display()),
    ]);
    p.reload(&config(&up, &with_cert)).unwrap();
    let r = get(&client(), &p.url("/")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        up.client_certs.lock().unwrap().as_slice(),
        std::slice::from_ref(&strait.der),
        "the upstream saw Strait's client certificate"
    );
}

#[tokio::test]
async fn h2_over_tls_negotiates_http2_with_alpn_and_keeps_the_authority() {
    let ca = Ca::new("h2");
    let cert = ca.issue("upstream", &["upstream.test"]);
    let up = TlsUpstream::start("h2-up", cert.server_config(&[b"h2", b"http/1.1"], None)).await;
    let backend = format!(
        "    protocol: h2\n{}",
        tls_block(&[ca_line(&ca), SNI.into()])
    );
    let p = TestProxy::start(&config(&up, &backend)).await;
    // Both an HTTP/1.1 and an HTTP/2 client get HTTP/2 upstream, with their host as
    // :authority.
    for c in [client(), h2_client()] {
        let r = get_host(&c, &p.url("/h2"), "grpc.example:8443").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-seen-version"), "HTTP/2.0");
        assert_eq!(r.header("x-seen-authority"), "grpc.example:8443");
        assert_eq!(r.header("x-seen-sni"), "upstream.test");
    }
}

#[tokio::test]
async fn h2_fails_clearly_when_the_upstream_does_not_agree_to_http2() {
    let ca = Ca::new("noh2");
    let cert = ca.issue("upstream", &["upstream.test"]);
    // A server without ALPN completes the handshake without choosing; one with only
    // http/1.1 refuses our h2-only offer with an alert.
    for (alpn, want) in [
        (
            &[][..],
            "upstream.test did not agree to HTTP/2 in the TLS handshake (ALPN: none)",
        ),
        (
            &[&b"http/1.1"[..]][..],
            "TLS handshake with upstream.test failed: received fatal alert: NoApplicationProtocol",
        ),
    ] {
        let up = TlsUpstream::start("h1-only", cert.server_config(alpn, None)).await;
        let backend = format!(
            "    protocol: h2\n{}",
            tls_block(&[ca_line(&ca), SNI.into()])
        );
        let p = TestProxy::start(&config(&up, &backend)).await;
        let r = get(&client(), &p.url("/")).await;
        assert_eq!(r.status, 502);
        assert_eq!(r.header("x-strait-error"), "connect-failed");
        assert!(r.body.contains(want), "{}", r.body);
        assert_eq!(up.hits(), 0);
    }
}

#[tokio::test]
async fn grpc_from_an_h2c_client_to_a_tls_h2_backend() {
    use tonic_health::pb::health_check_response::ServingStatus;

    let ca = Ca::new("grpc");
    let cert = ca.issue("upstream", &["upstream.test"]);
    let (up, _reporter) =
        TlsUpstream::start_grpc(cert.server_config(&[b"h2"], None), "shop.Cart").await;
    let backend = format!(
        "    protocol: h2\n{}",
        tls_block(&[ca_line(&ca), SNI.into()])
    );
    let p = TestProxy::start(&config(&up, &backend)).await;
    let mut grpc = grpc_health_client(p.url("")).await;
    for _ in 0..3 {
        let status = grpc_check(&mut grpc, "shop.Cart")
            .await
            .expect("grpc-status 0 came back through Strait");
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    let missing = grpc_check(&mut grpc, "nope").await.unwrap_err();
    assert_eq!(
        missing.code(),
        tonic::Code::NotFound,
        "trailers came through"
    );
}

#[tokio::test]
async fn changed_tls_settings_never_reuse_a_connection_made_with_the_old_ones() {
    let ca = Ca::new("change");
    let other = Ca::new("change-other");
    let cert = ca.issue("upstream", &["upstream.test"]);
    for protocol in ["http1", "h2"] {
        let up = TlsUpstream::start("up", cert.server_config(&[b"h2", b"http/1.1"], None)).await;
        let backend = |tls: &[String]| format!("    protocol: {protocol}\n{}", tls_block(tls));
        let mut p = TestProxy::start(&config(
            &up,
            &backend(&["insecure_skip_verify: true".into(), SNI.into()]),
        ))
        .await;
        let c = client();
        assert_eq!(get(&c, &p.url("/")).await.status, 200, "{protocol}");
        // Now trust only another CA: the warm connection (pooled for http1, the endpoint's
        // HTTP/2 connection for h2) was verified by nobody and must not be used again.
        p.reload(&config(&up, &backend(&[ca_line(&other), SNI.into()])))
            .unwrap();
        let r = get(&c, &p.url("/")).await;
        assert_eq!(r.status, 502, "{protocol}: {}", r.body);
        assert!(r.body.contains("UnknownIssuer"), "{}", r.body);
        // And back to the right CA, now a file whose content changes under the same path.
        std::fs::copy(&ca.file, other.dir.path().join("ca.pem")).unwrap();
        p.reload(&config(&up, &backend(&[ca_line(&other), SNI.into()])))
            .unwrap();
        let r = get(&c, &p.url("/")).await;
        assert_eq!(r.status, 200, "{protocol}: {}", r.body);
        // Restore the other CA for the next protocol.
        drop(p);
        let fresh = Ca::new("change-again");
        std::fs::copy(&fresh.file, other.dir.path().join("ca.pem")).unwrap();
    }
}

#[tokio::test]
async fn http_health_checks_go_over_the_backends_tls() {
    let ca = Ca::new("hc");
    let cert = ca.issue("upstream", &["upstream.test"]);
    for (protocol, alpn) in [
        ("http1", &[&b"http/1.1"[..]][..]),
        ("h2", &[&b"h2"[..]][..]),
    ] {
        let up = TlsUpstream::start("up", cert.server_config(alpn, None)).await;
        let backend = format!(
            "    protocol: {protocol}\n{}    health_check:\n      http: {{path: /healthz}}\n      interval: 50ms\n      jitter: 0s\n",
            tls_block(&[ca_line(&ca), SNI.into()])
        );
        let p = TestProxy::start(&config(&up, &backend)).await;
        // The upstream only speaks TLS: a check that reaches its handler went over TLS.
        eventually(
            Duration::from_secs(5),
            "TLS health checks arrive",
            || async { up.hits() >= 3 },
        )
        .await;
        let t = p.handle.current().unwrap();
        assert!(t.backends[0].endpoints[0].state.snapshot().health.healthy);
        assert_eq!(get(&client(), &p.url("/")).await.status, 200, "{protocol}");
    }
}

/// The validation errors of `yaml`, as `file:line:column: path: message` lines.
fn errors(yaml: &str) -> Vec<String> {
    match strait_control::source::file::parse(Path::new("t.yaml"), yaml) {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().lines().map(str::to_owned).collect(),
    }
}

#[test]
fn validation_names_the_field_and_the_file() {
    let ca = Ca::new("validate");
    let cert = ca.issue("c", &["c.test"]);
    let backend = |lines: &str| {
        format!(
            "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: b}}\nbackends:\n  - name: b\n    endpoints: [\"127.0.0.1:1\"]\n{lines}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (
            "    protocol: h2\n".into(),
            "backends[0].protocol: h2 is HTTP/2 over TLS and needs tls",
        ),
        (
            "    protocol: h2c\n    tls: {sni: a.test}\n".into(),
            "backends[0].tls: h2c is cleartext HTTP/2",
        ),
        ("    tls: {}\n".into(), "backends[0].tls: sni is required"),
        (
            "    tls: {sni: 10.0.0.1}\n".into(),
            "backends[0].tls.sni: \"10.0.0.1\" is an IP address",
        ),
        (
            "    tls: {sni: a.test, ca: /nonexistent/ca.pem}\n".into(),
            "backends[0].tls.ca: /nonexistent/ca.pem: ",
        ),
        (
            format!(
                "    tls: {{sni: a.test, ca: \"{}\"}}\n",
                cert.key_file.display()
            ),
            "no CERTIFICATE block",
        ),
        (
            format!(
                "    tls: {{sni: a.test, client_cert: \"{}\"}}\n",
                cert.cert_file.display()
            ),
            "backends[0].tls: client_cert needs client_key",
        ),
        (
            format!(
                "    tls: {{sni: a.test, client_cert: \"{}\", client_key: \"{}\"}}\n",
                cert.cert_file.display(),
                ca.file.display()
            ),
            "backends[0].tls.client_key: ",
        ),
        (
            format!(
                "    tls: {{insecure_skip_verify: true, ca: \"{}\"}}\n",
                ca.file.display()
            ),
            "backends[0].tls.ca: insecure_skip_verify ignores the CA",
        ),
        (
            "    tls: {sni: a.test}\n    health_check: {grpc: {}}\n".into(),
            "gRPC health checks need protocol: h2c or h2",
        ),
    ];
    for (lines, want) in cases {
        let got = errors(&backend(&lines));
        assert!(
            got.iter().any(|e| e.contains(want)),
            "{lines}: want {want:?}, got {got:?}"
        );
    }
    // A DNS backend's name is the default SNI; complete settings compile.
    let ok = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: d}}\nbackends:\n  - name: d\n    dns: api.internal.example:443\n    protocol: h2\n    tls: {{ca: \"{}\", client_cert: \"{}\", client_key: \"{}\"}}\n",
        ca.file.display(),
        cert.cert_file.display(),
        cert.key_file.display()
    );
    assert_eq!(errors(&ok), Vec::<String>::new());
}

/// Writes the test-only certificates that the examples in `docs/` and `examples/` point at:
/// `cargo test --test upstream_tls -- --ignored regenerate_example_certificates`
#[test]
#[ignore = "writes examples/tls; run by hand to regenerate the fixtures"]
fn regenerate_example_certificates() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tls");
    std::fs::create_dir_all(&out).unwrap();
    let ca = Ca::new("examples");
    let client = ca.issue("client", &["strait.client.example"]);
    let note = "# TEST FIXTURE, NOT FOR PRODUCTION: the private key of this CA was thrown away, and\n\
                # this file exists only so the examples in docs/ and examples/ validate.\n\
                # Regenerate: cargo test --test upstream_tls -- --ignored regenerate_example_certificates\n";
    for (from, to) in [
        (&ca.file, "ca.pem"),
        (&client.cert_file, "client.pem"),
        (&client.key_file, "client-key.pem"),
    ] {
        let pem = std::fs::read_to_string(from).unwrap();
        let note = if to == "client-key.pem" {
            note.replace(
                "the private key of this CA was thrown away",
                "this key is public",
            )
        } else {
            note.to_owned()
        };
        std::fs::write(out.join(to), format!("{note}{pem}")).unwrap();
    }
}
