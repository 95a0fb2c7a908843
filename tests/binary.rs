//! The built `strait` binary end to end: real process, real signals, curl as the client.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;

fn strait() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strait"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A private copy of a config with every listener moved to port 0.
fn temp_config(dir: &tempdir::Dir, text: &str) -> PathBuf {
    let p = dir.path().join("strait.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_example_and_docs_block_validates() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let out = strait().arg("validate").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "examples/ has configs");
    let dir = tempdir::Dir::new("docs");
    for entry in std::fs::read_dir(repo("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let yaml = block.split("```").next().unwrap();
            let file = dir.path().join(format!(
                "{}-{i}.yaml",
                path.file_stem().unwrap().to_string_lossy()
            ));
            std::fs::write(&file, yaml).unwrap();
            let out = strait().arg("validate").arg(&file).output().unwrap();
            assert!(
                out.status.success(),
                "{} yaml block {i}: {}\n{yaml}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

#[test]
fn validate_reports_every_error_with_position_and_exit_code() {
    let dir = tempdir::Dir::new("validate");
    let bad = temp_config(
        &dir,
        "listeners:\n  - name: web\n    address: 127.0.0.1:x\n    routes:\n      - forward: {backend: missing}\n",
    );
    let out = strait().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strait.yaml:3:5: listeners[0].address"),
        "{err}"
    );
    assert!(
        err.contains("strait.yaml:5:19: listeners[0].routes[0].forward.backend: unknown backend"),
        "{err}"
    );
    // The same file at startup: distinct exit code, nothing bound.
    let out = strait().arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn bind_failure_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempdir::Dir::new("bind");
    let cfg = temp_config(
        &dir,
        &format!("listeners:\n  - name: web\n    address: {addr}\n    routes:\n      - direct_response: {{status: 200}}\n"),
    );
    let out = strait()
        .arg("--config")
        .arg(&cfg)
        .args(["--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr.to_string()));
}

#[tokio::test]
async fn standalone_example_answers_curl_and_drains_on_sigterm() {
    let text = std::fs::read_to_string(repo("examples/standalone.yaml")).unwrap();
    let dir = tempdir::Dir::new("smoke");
    let cfg = temp_config(&dir, &text.replace("127.0.0.1:8080", "127.0.0.1:0"));
    let mut bin = Binary::start(&cfg).await;
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "5", &bin.url("/")])
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-request-id:"),
        "{text}"
    );
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            &bin.url("/"),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    let c = client();
    assert_eq!(get(&c, &bin.admin_url("/ready")).await.status, 200);
    assert_eq!(get(&c, &bin.admin_url("/live")).await.status, 200);
    let metrics = get(&c, &bin.admin_url("/metrics")).await.body;
    assert!(
        metrics.contains("strait_requests_total{listener=\"web\""),
        "{metrics}"
    );
    assert!(metrics.contains("strait_table_generation 1"), "{metrics}");
    let config: serde_json::Value =
        serde_json::from_str(&get(&c, &bin.admin_url("/config")).await.body).unwrap();
    assert_eq!(config["generation"], 1);
    bin.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), bin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_waits_for_a_slow_request() {
    let slow = Upstream::start_with_delay("slow", Duration::from_secs(2)).await;
    let dir = tempdir::Dir::new("drain");
    let cfg = temp_config(
        &dir,
        &format!(
            "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {{backend: b}}\nbackends:\n  - name: b\n    endpoints: [\"{}\"]\n",
            slow.addr
        ),
    );
    let mut bin = Binary::start(&cfg).await;
    let (c, url) = (client(), bin.url("/"));
    let inflight = tokio::spawn(async move { get(&c, &url).await });
    slow.wait_for_hits(1).await;
    bin.signal("TERM");
    // While draining, /ready says so (the admin listener stays up until exit).
    let admin = bin.admin_url("/ready");
    eventually(
        Duration::from_secs(2),
        "/ready turns 503 while draining",
        || {
            let (c, url) = (client(), admin.clone());
            async move { get(&c, &url).await.status == 503 }
        },
    )
    .await;
    let r = inflight.await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "slow"));
    let status = tokio::time::timeout(Duration::from_secs(10), bin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(bin.logged("draining"));
}

#[tokio::test]
async fn file_change_reloads_and_a_bad_file_keeps_the_table() {
    let dir = tempdir::Dir::new("reload");
    let v = |body: &str| {
        format!("listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - direct_response: {{status: 200, body: {body}}}\n")
    };
    let cfg = temp_config(&dir, &v("one"));
    let bin = Binary::start(&cfg).await;
    let c = client();
    assert_eq!(get(&c, &bin.url("/")).await.body, "one");
    // Write to a temp file and rename, as editors and ConfigMap updates do.
    let tmp = dir.path().join("next.tmp");
    std::fs::write(&tmp, v("two")).unwrap();
    std::fs::rename(&tmp, &cfg).unwrap();
    eventually(Duration::from_secs(10), "file change reloaded", || {
        let (c, url) = (c.clone(), bin.url("/"));
        async move { get(&c, &url).await.body == "two" }
    })
    .await;
    std::fs::write(&cfg, "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - forward: {backend: nope}\n").unwrap();
    eventually(Duration::from_secs(10), "bad reload counted", || {
        let (c, url) = (c.clone(), bin.admin_url("/metrics"));
        async move {
            get(&c, &url)
                .await
                .body
                .contains("strait_config_reloads_total{result=\"failure\"} 1")
        }
    })
    .await;
    // The log line travels through a pipe and a reader task: it can land after the metric.
    eventually(
        Duration::from_secs(5),
        "error logged with file:line",
        || {
            let logged = bin.logged("strait.yaml:5:");
            async move { logged }
        },
    )
    .await;
    assert_eq!(
        get(&c, &bin.url("/")).await.body,
        "two",
        "old table still in force"
    );
    // SIGHUP after fixing it.
    std::fs::write(&cfg, v("three")).unwrap();
    bin.signal("HUP");
    eventually(Duration::from_secs(10), "SIGHUP reloaded", || {
        let (c, url) = (c.clone(), bin.url("/"));
        async move { get(&c, &url).await.body == "three" }
    })
    .await;
}

#[tokio::test]
async fn route_series_appear_on_the_first_request() {
    let dir = tempdir::Dir::new("lazy-series");
    let cfg = temp_config(
        &dir,
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    routes:\n      - name: hit\n        match: {exact: /hit}\n        direct_response: {status: 200}\n      - name: idle\n        match: {exact: /idle}\n        direct_response: {status: 200}\n",
    );
    let bin = Binary::start(&cfg).await;
    let c = client();
    let metrics = get(&c, &bin.admin_url("/metrics")).await.body;
    assert!(!metrics.contains("route=\"hit\""), "{metrics}");
    assert_eq!(get(&c, &bin.url("/hit")).await.status, 200);
    let metrics = get(&c, &bin.admin_url("/metrics")).await.body;
    // Every class of the route at once, so the ones not answered yet read 0.
    for line in [
        "strait_requests_total{listener=\"web\",route=\"hit\",backend=\"\",class=\"2xx\"} 1",
        "strait_requests_total{listener=\"web\",route=\"hit\",backend=\"\",class=\"5xx\"} 0",
        "strait_request_duration_seconds_count{listener=\"web\",route=\"hit\",backend=\"\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains("route=\"idle\""), "{metrics}");
}
