//! Ingress TLS in Kubernetes mode, end to end: certificates come from `kubernetes.io/tls`
//! Secrets in the API stand-in, real rustls clients connect to the HTTPS listener, and the
//! upstream is a pod in its own network namespace.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::k8s;
use support::kube_api::{meta, KubeApi};
use support::netns::Pod;
use support::tls::{connect, Ca, Issued};
use support::{client, eventually, get_host, tempdir, Binary, Upstream};

const WAIT: Duration = Duration::from_secs(15);

/// A `kubernetes.io/tls` Secret holding `cert`'s chain and `key`'s private key.
fn tls_secret(name: &str, cert: &Issued, key: &Issued) -> Value {
    let read = |p: &std::path::Path| meta::base64_encode(&std::fs::read(p).unwrap());
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": "apps", "name": name},
        "data": {"tls.crt": read(&cert.cert_file), "tls.key": read(&key.key_file)},
    })
}

/// The example Ingress of docs/kubernetes.md#tls: `shop` in `apps`, for `shop.example.com`
/// (Service `web`, port 80), its `tls` entry naming Secret `shop-tls`.
fn documented_ingress() -> Value {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/kubernetes.md"))
        .unwrap();
    let section = &doc[doc
        .find("\n## TLS\n")
        .expect("docs/kubernetes.md has a TLS section")..];
    // Kubernetes objects are `text` blocks in the docs: `yaml` ones are Strait configs.
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the TLS section has a YAML example");
    serde_yaml_ng::from_str(block).unwrap()
}

/// Strait's IngressClass, a pod behind Service `web`, and the documented Ingress with
/// `annotations`.
async fn shop(annotations: Value) -> (KubeApi, Pod, Upstream) {
    let api = KubeApi::start().await;
    api.apply(k8s::ingress_class(
        "strait",
        "strait.io/ingress-controller",
        false,
    ));
    api.apply(k8s::namespace("apps"));
    let pod = Pod::create();
    let up = pod.upstream_on("web-0", 8080);
    k8s::backed_service(&api, "web", "", &[(pod.ip(), k8s::READY)]);
    let mut ing = documented_ingress();
    ing["metadata"]["annotations"] = annotations;
    api.apply(ing);
    (api, pod, up)
}

/// The address a listener bound after startup, from its log line.
async fn bound(strait: &Binary, listener: &str) -> SocketAddr {
    let mut found = None;
    eventually(WAIT, &format!("listener {listener} is bound"), || {
        found = strait.log.lock().unwrap().iter().find_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening" && v["listener"] == listener)
                .then(|| v["address"].as_str()?.parse().ok())?
        });
        let ok = found.is_some();
        async move { ok }
    })
    .await;
    found.unwrap()
}

/// The leaf certificate a new TLS connection for `sni` is served.
async fn served_leaf(ca: &Ca, addr: SocketAddr, sni: &str) -> Option<Vec<u8>> {
    let conn = connect(ca.client_config(&[b"http/1.1"]), addr, sni)
        .await
        .ok()?;
    let leaf = conn.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(leaf)
}

/// A kept-alive HTTP/1.1 connection over TLS to `addr`.
async fn open(ca: &Ca, addr: SocketAddr, sni: &str) -> (SendRequest<Empty<Bytes>>, Vec<u8>) {
    let conn = connect(ca.client_config(&[b"http/1.1"]), addr, sni)
        .await
        .unwrap();
    let leaf = conn.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .unwrap();
    tokio::spawn(driver);
    (sender, leaf)
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>, host: &str) -> (u16, String) {
    sender.ready().await.unwrap();
    let req = http::Request::get("/")
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn has_event(api: &KubeApi, ingress: &str, reason: &str, text: &str) -> bool {
    api.events().into_iter().any(|e| {
        e["involvedObject"]["name"] == ingress
            && e["reason"] == reason
            && e["message"].as_str().is_some_and(|m| m.contains(text))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_tls_comes_from_its_secret_and_a_rotation_reaches_new_connections_only() {
    let (api, _pod, _up) = shop(json!({})).await;
    let ca = Ca::new("kube-tls");
    let first = ca.issue("shop-1", &["shop.example.com"]);
    api.apply(tls_secret("shop-tls", &first, &first));
    let dir = tempdir::Dir::new("kube-tls");
    let strait = k8s::controller(&api, &dir, &["--https-addr", "127.0.0.1:0"]).await;
    let https = bound(&strait, "kubernetes-https").await;

    // HTTPS with the Secret's certificate, on a connection kept open across the rotation.
    let (mut kept, leaf) = open(&ca, https, "shop.example.com").await;
    assert_eq!(leaf, first.der.to_vec());
    assert_eq!(
        get(&mut kept, "shop.example.com").await,
        (200, "web-0".into())
    );

    // Plain HTTP for a TLS host is redirected, keeping the path and query.
    let r = get_host(&client(), &strait.url("/cart?item=1"), "shop.example.com").await;
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), "https://shop.example.com/cart?item=1");

    // The Secret is rotated: new connections get the new certificate...
    let second = ca.issue("shop-2", &["shop.example.com"]);
    api.apply(tls_secret("shop-tls", &second, &second));
    let want = second.der.to_vec();
    eventually(
        WAIT,
        "a new connection gets the rotated certificate",
        || {
            let (ca, want) = (&ca, want.clone());
            async move { served_leaf(ca, https, "shop.example.com").await == Some(want) }
        },
    )
    .await;
    // ...while the open one keeps serving.
    assert_eq!(
        get(&mut kept, "shop.example.com").await,
        (200, "web-0".into())
    );

    // A broken rotation (the key of another certificate) is reported on the Ingress and the
    // last good certificate stays in force.
    let third = ca.issue("shop-3", &["shop.example.com"]);
    api.apply(tls_secret("shop-tls", &third, &first));
    eventually(WAIT, "the broken Secret is reported on the Ingress", || {
        let ok = has_event(
            &api,
            "shop",
            "InvalidTLS",
            "previous certificate stays in force",
        );
        async move { ok }
    })
    .await;
    assert_eq!(
        served_leaf(&ca, https, "shop.example.com").await,
        Some(want)
    );
    let (mut fresh, _) = open(&ca, https, "shop.example.com").await;
    assert_eq!(
        get(&mut fresh, "shop.example.com").await,
        (200, "web-0".into())
    );

    // The key never leaves the process: /config names the Secret, not its content.
    let config = support::get(&client(), &strait.admin_url("/config"))
        .await
        .body;
    assert!(
        config.contains("Secret apps/shop-tls (tls.key)"),
        "{config}"
    );
    assert!(!config.contains("PRIVATE KEY"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_redirect_can_be_turned_off_and_a_missing_secret_serves_plain_http_only() {
    let (api, _pod, _up) = shop(json!({"strait.io/ssl-redirect": "false"})).await;
    // No Secret yet: no certificate, so no HTTPS listener, and the Ingress says why.
    let dir = tempdir::Dir::new("kube-tls");
    let strait = k8s::controller(&api, &dir, &["--https-addr", "127.0.0.1:0"]).await;
    let c = client();
    eventually(WAIT, "plain HTTP is served", || {
        let (c, url) = (c.clone(), strait.url("/"));
        async move { get_host(&c, &url, "shop.example.com").await.status == 200 }
    })
    .await;
    eventually(WAIT, "the missing Secret is reported", || {
        let ok = has_event(
            &api,
            "shop",
            "InvalidTLS",
            "Secret apps/shop-tls does not exist",
        );
        async move { ok }
    })
    .await;
    assert!(!strait.logged("\"listener\":\"kubernetes-https\""));

    // The Secret appears: HTTPS is served, and plain HTTP keeps answering (no redirect).
    let ca = Ca::new("kube-tls-2");
    let cert = ca.issue("shop", &["shop.example.com"]);
    api.apply(tls_secret("shop-tls", &cert, &cert));
    let https = bound(&strait, "kubernetes-https").await;
    let want = cert.der.to_vec();
    eventually(WAIT, "HTTPS serves the Secret's certificate", || {
        let (ca, want) = (&ca, want.clone());
        async move { served_leaf(ca, https, "shop.example.com").await == Some(want) }
    })
    .await;
    let (mut conn, _) = open(&ca, https, "shop.example.com").await;
    assert_eq!(
        get(&mut conn, "shop.example.com").await,
        (200, "web-0".into())
    );
    let r = get_host(&c, &strait.url("/"), "shop.example.com").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "web-0"));
}
