//! `strait sidecar`, end to end: the binary next to an application on 127.0.0.1 (inbound),
//! and routing the application's requests by Service name to pods in network namespaces
//! (outbound), against the Kubernetes API stand-in.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::k8s::{self, READY};
use support::kube_api::KubeApi;
use support::netns::Pod;
use support::{client, eventually, get_host, tempdir, Binary, Upstream};

const WAIT: Duration = Duration::from_secs(15);

async fn metrics(strait: &Binary) -> String {
    support::get(&client(), &strait.admin_url("/metrics"))
        .await
        .body
}

/// The stand-in with a namespace `apps`; no IngressClass, which a sidecar never reads.
async fn cluster() -> (KubeApi, tempdir::Dir) {
    let api = KubeApi::start().await;
    api.apply(k8s::namespace("apps"));
    (api, tempdir::Dir::new("sidecar"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app_on_loopback_with_metrics_access_log_and_rate_limit() {
    let (api, dir) = cluster().await;
    let app = Upstream::start("the-app").await;
    let port = app.addr.port().to_string();
    let strait = k8s::sidecar(
        &api,
        &dir,
        "apps",
        &[
            "--app-port",
            &port,
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
            "--rate-limit",
            "5",
        ],
    )
    .await;
    strait.wait_ready().await;
    let inbound = format!("http://{}/hello", strait.listener("sidecar-inbound"));

    // Any host, any path: the app gets them all.
    let c = client();
    let r = get_host(&c, &inbound, "whatever.example").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "the-app"));
    assert_eq!(r.header("x-seen-path"), "/hello");
    assert_eq!(app.hits(), 1);

    // The rate limit: 5 a second, 5 at once; a burst of 20 is cut.
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for _ in 0..20 {
        let r = get_host(&c, &inbound, "a").await;
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    let limited = statuses.get(&429).copied().unwrap_or(0);
    assert!(limited >= 10, "most of the burst is refused: {statuses:?}");
    assert!(
        app.hits() <= 1 + 20 - limited,
        "refused requests never reach the app"
    );

    let m = metrics(&strait).await;
    assert!(
        m.lines().any(|l| l.starts_with("strait_requests_total{")
            && l.contains("listener=\"sidecar-inbound\"")
            && l.contains("backend=\"app\"")),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("strait_rate_limited_total{") && l.contains("sidecar-inbound")),
        "{m}"
    );
    let upstream = app.addr.to_string();
    eventually(WAIT, "an access log line for the inbound request", || {
        let logged = strait.log.lock().unwrap().iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["target"] == "strait::access"
                && v["listener"] == "sidecar-inbound"
                && v["path"] == "/hello"
                && v["upstream"] == upstream.as_str()
        });
        async move { logged }
    })
    .await;

    // A sidecar reads Services and EndpointSlices only: no Ingresses, Secrets, Leases or
    // Events, which its RBAC does not allow.
    for (method, path, _) in api.requests() {
        assert!(
            path.contains("/services") || path.contains("/endpointslices"),
            "unexpected API request {method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_routes_by_service_name_per_request_with_retries() {
    let (api, dir) = cluster().await;
    let pods: Vec<Pod> = (0..3).map(|_| Pod::create()).collect();
    let ups: Vec<Upstream> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| p.upstream_on(&format!("web-{i}"), 8080))
        .collect();
    api.apply(k8s::service("apps", "web", &[("http", 80, "8080")]));
    let endpoints: Vec<_> = pods.iter().map(|p| (p.ip(), READY)).collect();
    api.apply(k8s::slice(
        "apps",
        "web-a",
        "web",
        &[("http", 8080)],
        &endpoints,
    ));
    let strait = k8s::sidecar(
        &api,
        &dir,
        "apps",
        &[
            "--app-port",
            "1",
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    strait.wait_ready().await;
    let outbound = format!("http://{}/", strait.listener("kubernetes-services"));

    // One keep-alive connection, as an application's HTTP client keeps; each request is
    // balanced on its own.
    let c = client();
    for host in [
        "web",
        "web.apps",
        "web.apps.svc.cluster.local",
        "web.apps:80",
    ] {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            let r = get_host(&c, &outbound, host).await;
            assert_eq!(r.status, 200, "{host}: {}", r.body);
            *seen.entry(r.body).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{host}: every pod answers: {seen:?}");
        assert!(seen.values().all(|&n| n == 10), "{host}: {seen:?}");
    }
    assert_eq!(
        get_host(&c, &outbound, "nope.apps").await.status,
        404,
        "an unknown Service has no route"
    );

    // A pod answering 503 (shutting down, say): its requests are retried on another pod,
    // so the application never sees the failure.
    ups[1].behaviour.fail_with(503);
    for _ in 0..12 {
        let r = get_host(&c, &outbound, "web").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_ne!(r.body, "web-1");
    }
    ups[1].behaviour.recover();

    // A Service annotated with strait.io/tcp-port is reachable on the outbound IP.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = free.local_addr().unwrap().port();
    drop(free);
    let mut db = k8s::service("apps", "web", &[("http", 80, "8080")]);
    db["metadata"]["annotations"] = serde_json::json!({"strait.io/tcp-port": tcp_port.to_string()});
    api.apply(db);
    let relayed = format!("http://127.0.0.1:{tcp_port}/");
    eventually(WAIT, "the TCP port on the loopback relays to a pod", || {
        let (c, url) = (client(), relayed.clone());
        async move {
            match tokio::time::timeout(Duration::from_secs(2), c.get(url.parse().unwrap())).await {
                Ok(Ok(r)) => r.status() == 200,
                _ => false,
            }
        }
    })
    .await;
    assert!(
        strait.logged(&format!("\"address\":\"127.0.0.1:{tcp_port}\"")),
        "bound on the loopback, beside the outbound listener"
    );

    let m = metrics(&strait).await;
    let retries = m
        .lines()
        .find(|l| l.starts_with("strait_retries_total{backend=\"apps/web:80@services\"}"))
        .unwrap_or_else(|| panic!("retries counted: {m}"));
    let n: f64 = retries.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{retries}");
}

#[tokio::test]
async fn print_config_writes_a_file_that_validates() {
    let dir = tempdir::Dir::new("sidecar-print");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args([
            "sidecar",
            "--app-port",
            "8080",
            "--rate-limit",
            "100",
            "--watch-namespace",
            "shop",
            "--print-config",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let spec: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(spec["listeners"][0]["address"], "0.0.0.0:15006");
    assert_eq!(spec["backends"][0]["endpoints"][0], "127.0.0.1:8080");
    assert_eq!(
        spec["listeners"][0]["default_route"]["rate_limit"]["requests"],
        100
    );
    assert_eq!(spec["kubernetes"]["service_addr"], "127.0.0.1:15001");
    assert_eq!(spec["kubernetes"]["ingresses"], false);
    assert_eq!(spec["kubernetes"]["watch_namespaces"][0], "shop");
    assert_eq!(spec["admin"]["address"], "127.0.0.1:9901");

    let file = dir.write("sidecar.yaml", &text);
    let validated = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("validate")
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(validated.status.success(), "{validated:?}");
    assert!(
        String::from_utf8_lossy(&validated.stdout).contains("ok (1 listeners, 1 backends)"),
        "{validated:?}"
    );

    // docs/sidecar.md shows the same configuration with its defaults left out.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args([
            "sidecar",
            "--app-port",
            "8080",
            "--rate-limit",
            "100",
            "--print-config",
        ])
        .output()
        .await
        .unwrap();
    let printed =
        strait_control::source::file::parse(&file, &String::from_utf8_lossy(&out.stdout)).unwrap();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/sidecar.md"),
    )
    .unwrap();
    let block = doc
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let documented = strait_control::source::file::parse(&file, block).unwrap();
    assert_eq!(
        documented, printed,
        "docs/sidecar.md matches --print-config"
    );

    // The sidecar refuses a configuration file: the preset is the whole configuration.
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["sidecar", "--app-port", "8080", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
}

#[tokio::test]
async fn the_sidecar_example_runs_the_preset_it_documents() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples/sidecar/frontend.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    let pod = &kind("Deployment")["spec"]["template"]["spec"];
    let strait = &pod["initContainers"][0];
    assert_eq!(strait["restartPolicy"], "Always", "a native sidecar");
    let args: Vec<&str> = strait["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(&args)
        .arg("--print-config")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let spec: serde_json::Value =
        serde_yaml_ng::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let inbound = spec["listeners"][0]["address"].as_str().unwrap();
    let outbound = spec["kubernetes"]["service_addr"].as_str().unwrap();
    let app = spec["backends"][0]["endpoints"][0].as_str().unwrap();

    // The Service targets the inbound port, by the name of the sidecar's container port.
    let target = kind("Service")["spec"]["ports"][0]["targetPort"]
        .as_str()
        .unwrap();
    let port = strait["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == target)
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(inbound, format!("0.0.0.0:{port}"));
    // The application listens where the sidecar forwards, and calls out through it.
    let conf = kind("ConfigMap")["data"]["default.conf"].as_str().unwrap();
    assert!(conf.contains(&format!("listen {app};")), "{conf}");
    assert!(
        conf.contains(&format!("proxy_pass http://{outbound}/;")),
        "{conf}"
    );
    assert!(conf.contains("proxy_set_header Host backend;"), "{conf}");
    assert_eq!(spec["kubernetes"]["watch_namespaces"][0], "sidecar-demo");
}
