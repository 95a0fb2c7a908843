//! Strait as an Ingress controller, end to end: the binary watches the Kubernetes API
//! stand-in through a kubeconfig file, and routes real requests to upstreams in test pods
//! (network namespaces with private addresses, as EndpointSlices must hold).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::k8s::{self, Path, NOT_READY, READY, TERMINATING};
use support::kube_api::KubeApi;
use support::netns::Pod;
use support::{client, eventually, get, get_host, tempdir, Binary, Upstream};

const WAIT: Duration = Duration::from_secs(15);
const PORT: u16 = 8080;

/// The stand-in with Strait's IngressClass and a namespace `apps`.
async fn cluster() -> (KubeApi, tempdir::Dir) {
    let api = KubeApi::start().await;
    api.apply(k8s::ingress_class(
        "strait",
        "strait.io/ingress-controller",
        false,
    ));
    api.apply(k8s::namespace("apps"));
    (api, tempdir::Dir::new("k8s"))
}

/// `n` pods, each serving `name-i` on [`PORT`].
fn pods(name: &str, n: usize) -> (Vec<Pod>, Vec<Upstream>) {
    let pods: Vec<Pod> = (0..n).map(|_| Pod::create()).collect();
    let ups = pods
        .iter()
        .enumerate()
        .map(|(i, p)| p.upstream_on(&format!("{name}-{i}"), PORT))
        .collect();
    (pods, ups)
}

/// A pod behind Service `web`, an IngressClass of another controller, and Ingresses `ours`
/// (host ours.test) and `theirs` (theirs.test, the other class) with the same route.
fn ours_and_theirs(api: &KubeApi) -> (Vec<Pod>, Vec<Upstream>, [Path<'static>; 1]) {
    let (pods, ups) = pods("web", 1);
    api.apply(k8s::ingress_class("nginx", "k8s.io/ingress-nginx", false));
    k8s::backed_service(api, "web", "", &ready(&pods));
    let route = to("web");
    api.apply(k8s::ingress(
        "apps",
        "ours",
        Some("strait"),
        "ours.test",
        &route,
    ));
    api.apply(k8s::ingress(
        "apps",
        "theirs",
        Some("nginx"),
        "theirs.test",
        &route,
    ));
    (pods, ups, route)
}

/// `n` pods behind Service `web` (port name `port_name`), an Ingress `web` for `host` ("" for
/// any) and a ready controller.
async fn web_behind(
    api: &KubeApi,
    dir: &tempdir::Dir,
    n: usize,
    port_name: &str,
    host: &str,
) -> (Binary, Vec<Pod>, Vec<Upstream>) {
    let (pods, ups) = pods("web", n);
    k8s::backed_service(api, "web", port_name, &ready(&pods));
    api.apply(k8s::ingress(
        "apps",
        "web",
        Some("strait"),
        host,
        &to("web"),
    ));
    let strait = k8s::controller(api, dir, &[]).await;
    strait.wait_ready().await;
    (strait, pods, ups)
}

/// One Prefix `/` path to port 80 of `service`.
fn to<'a>(service: &'a str) -> [Path<'a>; 1] {
    [Path("/", "Prefix", service, "80")]
}

fn ready(pods: &[Pod]) -> Vec<(std::net::IpAddr, k8s::Cond)> {
    pods.iter().map(|p| (p.ip(), READY)).collect()
}

/// Waits until requests for `host` get `status` with a body for which `body` holds.
async fn until(strait: &Binary, host: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
    let c = client();
    let url = strait.url("/");
    eventually(WAIT, what, || {
        let (c, url) = (c.clone(), url.clone());
        let r = async move { get_host(&c, &url, host).await };
        let check = &check;
        async move {
            let r = r.await;
            check(r.status.as_u16(), &r.body)
        }
    })
    .await;
}

/// Waits until several requests in a row for `host` are all answered by `body`.
async fn only(strait: &Binary, host: &str, body: &str, what: &str) {
    let c = client();
    let url = strait.url("/");
    eventually(WAIT, what, || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            for _ in 0..6 {
                if get_host(&c, &url, host).await.body != body {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

/// Sends `n` requests for `host` and counts answers by body (non-200s as `status NNN`).
async fn spread(strait: &Binary, host: &str, path: &str, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = get_host(&c, &strait.url(path), host).await;
        let key = if r.status == 200 {
            r.body
        } else {
            format!("status {}", r.status.as_u16())
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_routes_to_ready_pods_of_the_service() {
    let (api, dir) = cluster().await;
    let (strait, _pods, _ups) = web_behind(&api, &dir, 3, "http", "web.example.com").await;

    let seen = spread(&strait, "web.example.com", "/", 30).await;
    assert_eq!(seen.len(), 3, "every pod answers: {seen:?}");
    assert!(seen.values().all(|&n| n == 10), "round robin: {seen:?}");
    // Another host has no route.
    let r = get_host(&client(), &strait.url("/"), "other.example.com").await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_target_ports_resolve_per_slice_and_exact_beats_prefix() {
    let (api, dir) = cluster().await;
    // Two pods listen on different ports for the same named Service port, as during a
    // rollout that changes the container port: each slice says which.
    let a = Pod::create();
    let b = Pod::create();
    let _ua = a.upstream_on("api-old", 8080);
    let _ub = b.upstream_on("api-new", 9090);
    let _exact_pod = Pod::create();
    let _ue = _exact_pod.upstream_on("exact", 7000);
    api.apply(k8s::service("apps", "api", &[("web", 80, "http-port")]));
    api.apply(k8s::slice(
        "apps",
        "api-1",
        "api",
        &[("web", 8080)],
        &[(a.ip(), READY)],
    ));
    api.apply(k8s::slice(
        "apps",
        "api-2",
        "api",
        &[("web", 9090)],
        &[(b.ip(), READY)],
    ));
    api.apply(k8s::service("apps", "exact", &[("", 7000, "7000")]));
    api.apply(k8s::slice(
        "apps",
        "exact-1",
        "exact",
        &[("", 7000)],
        &[(_exact_pod.ip(), READY)],
    ));
    api.apply(k8s::ingress(
        "apps",
        "api",
        Some("strait"),
        "api.example.com",
        &[
            Path("/v1", "Prefix", "api", "web"),
            Path("/v1/health", "Exact", "exact", "7000"),
        ],
    ));
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;

    let seen = spread(&strait, "api.example.com", "/v1/items", 20).await;
    assert_eq!(seen.get("api-old"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("api-new"), Some(&10), "{seen:?}");
    let seen = spread(&strait, "api.example.com", "/v1/health", 3).await;
    assert_eq!(seen.get("exact"), Some(&3), "{seen:?}");
    // Prefix matches whole path elements only.
    let seen = spread(&strait, "api.example.com", "/v1x", 1).await;
    assert_eq!(seen.get("status 404"), Some(&1), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_pods_get_no_new_traffic_and_terminating_ones_are_the_last_resort() {
    let (api, dir) = cluster().await;
    let (strait, pods, _ups) = web_behind(&api, &dir, 2, "http", "").await;
    assert_eq!(spread(&strait, "x", "/", 10).await.len(), 2);

    // web-1 fails its readiness probe: no new requests reach it.
    k8s::backed_service(
        &api,
        "web",
        "http",
        &[(pods[0].ip(), READY), (pods[1].ip(), NOT_READY)],
    );
    only(&strait, "x", "web-0", "only web-0 answers").await;
    let seen = spread(&strait, "x", "/", 20).await;
    assert_eq!(seen.get("web-0"), Some(&20), "{seen:?}");

    // Both terminating but still serving, none ready: they keep answering (kube-proxy's
    // fallback) instead of the route failing.
    k8s::backed_service(
        &api,
        "web",
        "http",
        &[(pods[0].ip(), TERMINATING), (pods[1].ip(), TERMINATING)],
    );
    let (c, url) = (client(), strait.url("/"));
    eventually(WAIT, "both terminating pods answer", || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let mut bodies = std::collections::HashSet::new();
            for _ in 0..6 {
                bodies.insert(get_host(&c, &url, "x").await.body);
            }
            bodies.len() == 2
        }
    })
    .await;
    // A ready pod appears: terminating ones stop getting new requests.
    let newcomer = Pod::create();
    let _un = newcomer.upstream_on("web-new", PORT);
    k8s::backed_service(
        &api,
        "web",
        "http",
        &[
            (pods[0].ip(), TERMINATING),
            (pods[1].ip(), TERMINATING),
            (newcomer.ip(), READY),
        ],
    );
    until(&strait, "x", "the ready pod takes over", |s, b| {
        s == 200 && b == "web-new"
    })
    .await;
    let seen = spread(&strait, "x", "/", 10).await;
    assert_eq!(seen.get("web-new"), Some(&10), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_endpoint_finishes_its_in_flight_request() {
    let (api, dir) = cluster().await;
    let (strait, pods, ups) = web_behind(&api, &dir, 2, "http", "").await;

    // Two slow requests, one per pod (round robin).
    let c = client();
    let slow = |c: support::HttpClient, url: String| async move {
        support::send(
            &c,
            http::Request::get(url)
                .header("host", "x")
                .header("x-delay-ms", "1500")
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
    };
    let first = tokio::spawn(slow(c.clone(), strait.url("/")));
    let second = tokio::spawn(slow(c.clone(), strait.url("/")));
    ups[0].wait_for_hits(1).await;
    ups[1].wait_for_hits(1).await;
    // web-1 starts terminating while its request is in flight.
    k8s::backed_service(
        &api,
        "web",
        "http",
        &[(pods[0].ip(), READY), (pods[1].ip(), TERMINATING)],
    );
    only(&strait, "x", "web-0", "new requests avoid web-1").await;
    let seen = spread(&strait, "x", "/", 10).await;
    let (a, b) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    let mut bodies = [a.body, b.body];
    bodies.sort();
    assert_eq!(
        bodies,
        ["web-0", "web-1"],
        "both in-flight requests finished"
    );
    assert!(seen.get("web-0").is_some_and(|&n| n >= 9), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_ingresses_of_our_class_are_served_and_the_default_class_takes_classless_ones() {
    let (api, dir) = cluster().await;
    let (_pods, _ups, route) = ours_and_theirs(&api);
    api.apply(k8s::ingress("apps", "classless", None, "none.test", &route));
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;
    let c = client();
    let status = |host: &'static str| {
        let (c, url) = (c.clone(), strait.url("/"));
        async move { get_host(&c, &url, host).await.status.as_u16() }
    };
    assert_eq!(status("ours.test").await, 200);
    assert_eq!(status("theirs.test").await, 404);
    assert_eq!(status("none.test").await, 404);

    // Our class becomes the default: the classless Ingress is ours now.
    api.apply(k8s::ingress_class(
        "strait",
        "strait.io/ingress-controller",
        true,
    ));
    until(
        &strait,
        "none.test",
        "the classless Ingress is served",
        |s, _| s == 200,
    )
    .await;
    assert_eq!(status("theirs.test").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_backend_takes_unmatched_requests() {
    let (api, dir) = cluster().await;
    let (pods, _ups) = pods("fallback", 1);
    let (web_pods, _web_ups) = pods_named("web", 1);
    k8s::backed_service(&api, "fallback", "", &ready(&pods));
    k8s::backed_service(&api, "web", "", &ready(&web_pods));
    let mut ing = k8s::ingress(
        "apps",
        "site",
        Some("strait"),
        "site.test",
        &[Path("/app", "Prefix", "web", "80")],
    );
    ing["spec"]["defaultBackend"] =
        json!({"service": {"name": "fallback", "port": {"number": 80}}});
    api.apply(ing);
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;
    let c = client();
    assert_eq!(
        get_host(&c, &strait.url("/app/x"), "site.test").await.body,
        "web-0"
    );
    assert_eq!(
        get_host(&c, &strait.url("/other"), "site.test").await.body,
        "fallback-0"
    );
    assert_eq!(
        get_host(&c, &strait.url("/"), "unknown.test").await.body,
        "fallback-0"
    );
}

fn pods_named(name: &str, n: usize) -> (Vec<Pod>, Vec<Upstream>) {
    pods(name, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_ingresses_go_to_the_oldest_and_a_broken_one_gets_an_event() {
    let (api, dir) = cluster().await;
    let (a_pods, _a) = pods("first", 1);
    let (b_pods, _b) = pods("second", 1);
    k8s::backed_service(&api, "first", "", &ready(&a_pods));
    k8s::backed_service(&api, "second", "", &ready(&b_pods));
    // Created first: it keeps the host and path.
    api.apply(k8s::ingress(
        "apps",
        "zz-older",
        Some("strait"),
        "shop.test",
        &to("first"),
    ));
    // creationTimestamp has one-second resolution: wait for the server's clock to move on,
    // so the second Ingress is strictly newer (its name sorts first, so a tie would go to it).
    let created = api.get("ingresses", "apps", "zz-older").unwrap()["metadata"]
        ["creationTimestamp"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(WAIT, "the API server's clock passes a second", || {
        let moved = support::kube_api::meta::now_rfc3339() != created;
        async move { moved }
    })
    .await;
    api.apply(k8s::ingress(
        "apps",
        "aa-newer",
        Some("strait"),
        "shop.test",
        &[
            Path("/", "Prefix", "second", "80"),
            Path("/extra", "Prefix", "second", "80"),
        ],
    ));
    // Refers to a Service that does not exist: skipped whole, with an Event.
    api.apply(k8s::ingress(
        "apps",
        "broken",
        Some("strait"),
        "broken.test",
        &to("missing"),
    ));
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;
    let c = client();
    assert_eq!(
        get_host(&c, &strait.url("/"), "shop.test").await.body,
        "first-0"
    );
    // The newer Ingress's other path still applies.
    assert_eq!(
        get_host(&c, &strait.url("/extra"), "shop.test").await.body,
        "second-0"
    );
    assert_eq!(
        get_host(&c, &strait.url("/"), "broken.test").await.status,
        404
    );

    let events_for = |name: &str, reason: &str| {
        api.events().into_iter().any(|e| {
            // Core v1 form: `regarding` is `involvedObject`, `note` is `message`.
            e["involvedObject"]["name"] == name
                && e["involvedObject"]["kind"] == "Ingress"
                && e["reason"] == reason
                && e["type"] == "Warning"
                && e["reportingComponent"] == "strait.io/ingress-controller"
        })
    };
    eventually(WAIT, "events name the problems", || {
        let ok = events_for("broken", "BackendNotFound") && events_for("aa-newer", "Conflict");
        async move { ok }
    })
    .await;
    let broken = api
        .events()
        .into_iter()
        .find(|e| e["involvedObject"]["name"] == "broken")
        .unwrap();
    assert!(
        broken["message"]
            .as_str()
            .unwrap()
            .contains("Service apps/missing does not exist"),
        "{broken}"
    );

    // The Service appears: the broken Ingress starts working, the others keep working.
    let (m_pods, _m) = pods("missing", 1);
    k8s::backed_service(&api, "missing", "", &ready(&m_pods));
    until(
        &strait,
        "broken.test",
        "the fixed Ingress is served",
        |s, b| s == 200 && b == "missing-0",
    )
    .await;
    assert_eq!(
        get_host(&c, &strait.url("/"), "shop.test").await.body,
        "first-0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_moves_traffic_with_zero_failed_requests_under_load() {
    let (api, dir) = cluster().await;
    let (pods, ups) = pods("web", 4);
    k8s::backed_service(&api, "web", "http", &ready(&pods[..1]));
    api.apply(k8s::ingress("apps", "web", Some("strait"), "", &to("web")));
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;

    // Load: 4 clients, bounded by count and time, counting every non-200.
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (f, s, stop, url) = (
            Arc::clone(&failures),
            Arc::clone(&sent),
            Arc::clone(&stop),
            strait.url("/"),
        );
        load.push(tokio::spawn(async move {
            let c = client();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) || tokio::time::Instant::now() > deadline {
                    break;
                }
                let r = get_host(&c, &url, "x").await;
                s.fetch_add(1, Ordering::SeqCst);
                if r.status != 200 {
                    f.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // Scale up 1 -> 4, then down 4 -> 2 (the removed pods drain: they stay up, as pods do
    // during their grace period).
    for n in [2, 3, 4] {
        k8s::backed_service(&api, "web", "http", &ready(&pods[..n]));
        ups[n - 1].wait_for_hits(5).await;
    }
    let hits_before: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    k8s::backed_service(&api, "web", "http", &ready(&pods[..2]));
    // Once the new table is in force, the removed pods' counts stop moving.
    let c = client();
    let url = strait.url("/");
    eventually(WAIT, "scaled-down pods stop getting requests", || {
        let (c, url) = (c.clone(), url.clone());
        let (h2, h3) = (ups[2].hits(), ups[3].hits());
        let (u2, u3) = (Arc::clone(&ups[2].hits), Arc::clone(&ups[3].hits));
        async move {
            for _ in 0..20 {
                get_host(&c, &url, "x").await;
            }
            u2.load(Ordering::SeqCst) == h2 && u3.load(Ordering::SeqCst) == h3
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let total = sent.load(Ordering::SeqCst);
    assert!(total > 100, "load ran: {total} requests");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "of {total} requests");
    assert!(ups[3].hits() > hits_before[3].saturating_sub(1) && hits_before[3] > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_before_every_watch_has_listed_and_watches_relist_after_410() {
    let (api, dir) = cluster().await;
    let (strait, _pods, _ups) = web_behind(&api, &dir, 1, "", "web.test").await;
    // The log line is written before the table serves, but read from the pipe afterwards.
    published_logged(&strait).await;
    // The very first table already has the route: no partial table was ever in force.
    let first_table = strait
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("published table from the cluster"))
        .cloned()
        .expect("a table was published");
    let v: serde_json::Value = serde_json::from_str(&first_table).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["routes"], 1, "{first_table}");
    assert_eq!(v["ingresses"], 1, "{first_table}");

    // The API goes away; meanwhile the Ingress is deleted and history is compacted, so the
    // watches come back with an expired resourceVersion: 410 Gone, then a fresh list.
    api.set_unavailable(true);
    // Only once the Ingress watch has been refused can no watch from before slip in.
    eventually(WAIT, "the Ingress watch is refused", || {
        let refused = api.open_watches() == 0
            && api
                .requests()
                .iter()
                .any(|(_, p, code)| p.contains("/ingresses") && *code == 503);
        async move { refused }
    })
    .await;
    api.delete("ingresses", "apps", "web").unwrap();
    api.compact();
    api.set_unavailable(false);
    until(
        &strait,
        "web.test",
        "the deleted Ingress is gone",
        |s, _| s == 404,
    )
    .await;
    let relists = api
        .requests()
        .into_iter()
        .filter(|(m, p, _)| m == "GET" && p.contains("/ingresses") && !p.contains("watch=true"))
        .count();
    assert!(relists >= 2, "ingresses listed again after 410: {relists}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_waits_for_the_api_and_then_serves_the_whole_table() {
    let (api, dir) = cluster().await;
    let (pods, _ups) = pods("web", 1);
    k8s::backed_service(&api, "web", "", &ready(&pods));
    for i in 0..20 {
        api.apply(k8s::ingress(
            "apps",
            &format!("web-{i}"),
            Some("strait"),
            &format!("h{i}.test"),
            &[Path("/", "Prefix", "web", "80")],
        ));
    }
    let first = k8s::controller(&api, &dir, &[]).await;
    first.wait_ready().await;
    drop(first); // killed, as a crashed pod

    // The replacement starts while the API refuses every request; it must not serve.
    api.set_unavailable(true);
    let second = k8s::controller(&api, &dir, &[]).await;
    let c = client();
    let r = support::get(&c, &second.admin_url("/ready")).await;
    assert_eq!(r.status, 503, "not ready without the API: {}", r.body);
    api.set_unavailable(false);
    second.wait_ready().await;
    published_logged(&second).await;
    let published: Vec<serde_json::Value> = second
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("published table from the cluster"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        published[0]["ingresses"], 20,
        "the first table is whole: {published:?}"
    );
    for i in 0..20 {
        let r = get_host(&c, &second.url("/"), &format!("h{i}.test")).await;
        assert_eq!(r.body, "web-0", "h{i}.test");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_ingresses_get_the_published_address_in_their_status() {
    let (api, dir) = cluster().await;
    let (_pods, _ups, _) = ours_and_theirs(&api);
    let strait = k8s::controller(&api, &dir, &["--publish-address", "203.0.113.9"]).await;
    strait.wait_ready().await;
    let ip = |name: &str| {
        api.get("ingresses", "apps", name).unwrap()["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    eventually(WAIT, "the served Ingress has the address", || {
        let ok = ip("ours") == "203.0.113.9";
        async move { ok }
    })
    .await;
    assert_eq!(
        ip("theirs"),
        "",
        "another controller's Ingress is left alone"
    );
    // The write went through the status subresource, once.
    assert_eq!(api.status_writes("ingresses", "apps", "ours").len(), 1);
    // The Lease names this replica (it is the only one, so it leads).
    let lease = api
        .get("leases", "default", "strait-strait")
        .expect("a Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "strait-test-0");

    // SIGTERM: the process releases the Lease before it exits, so another replica takes over
    // at once rather than after the lease duration.
    let mut strait = strait;
    strait.signal("TERM");
    let status = tokio::time::timeout(WAIT, strait.child.wait())
        .await
        .expect("strait exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let lease = api.get("leases", "default", "strait-strait").unwrap();
    assert!(
        lease["spec"]["holderIdentity"].is_null(),
        "released before exit: {lease}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_names_route_grpc_per_request_over_every_ready_pod() {
    let (api, dir) = cluster().await;
    // Three pods answer the health check of service "x" differently, so each answer says
    // which pod served it.
    let statuses = [
        tonic_health::ServingStatus::Serving,
        tonic_health::ServingStatus::NotServing,
        tonic_health::ServingStatus::Unknown,
    ];
    let pods: Vec<Pod> = (0..3).map(|_| Pod::create()).collect();
    let mut servers = Vec::new();
    for (i, (pod, status)) in pods.iter().zip(statuses).enumerate() {
        let (addr, reporter) = pod.grpc_health_server("x", Some(status)).await;
        // Each pod listens on its own port; its slice says which, as during a port change.
        api.apply(k8s::slice(
            "apps",
            &format!("grpc-{i}"),
            "grpc",
            &[("grpc", addr.port())],
            &[(pod.ip(), READY)],
        ));
        servers.push(reporter);
    }
    let mut svc = k8s::service("apps", "grpc", &[("grpc", 6000, "6000")]);
    svc["spec"]["ports"][0]["appProtocol"] = json!("kubernetes.io/h2c");
    api.apply(svc);
    let strait = k8s::controller(&api, &dir, &["--service-addr", "127.0.0.1:0"]).await;
    strait.wait_ready().await;
    let addr = strait
        .listeners
        .iter()
        .find(|(n, _)| n == "kubernetes-services")
        .expect("the service listener")
        .1;

    for authority in ["grpc.apps:6000", "grpc.apps.svc.cluster.local:6000"] {
        // One HTTP/2 connection, as a gRPC client keeps; Strait balances each call.
        let seen =
            support::grpc_checks_over_one_connection(format!("http://{addr}"), authority, 30).await;
        assert_eq!(seen.len(), 3, "{authority}: every pod answered: {seen:?}");
        assert!(seen.values().all(|&n| n == 10), "{authority}: {seen:?}");
    }
    // An unknown Service name has no route.
    let r = get_host(&client(), &format!("http://{addr}/"), "nope.apps:6000").await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_annotation_opens_a_port_that_relays_to_ready_pods() {
    let (api, dir) = cluster().await;
    let pods: Vec<Pod> = (0..2).map(|_| Pod::create()).collect();
    let mut ups: Vec<Upstream> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| p.upstream_on(&format!("db-{i}"), 3306))
        .collect();
    // A port free on loopback now, for the Service to claim.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut svc = k8s::service("apps", "db", &[("", 3306, "3306")]);
    svc["metadata"]["annotations"] = json!({"strait.io/tcp-port": port.to_string()});
    api.apply(svc.clone());
    api.apply(k8s::slice(
        "apps",
        "db-a",
        "db",
        &[("", 3306)],
        &ready(&pods),
    ));
    // Three Services whose annotations cannot be followed: each gets an Event, none stops
    // the others (sorted after apps/db, so db takes its port first).
    for (name, value) in [
        ("zz-copy", port.to_string()),
        ("zz-https", "8443".into()),
        ("zz-word", "mysql".into()),
    ] {
        let mut bad = k8s::service("apps", name, &[("", 3306, "3306")]);
        bad["metadata"]["annotations"] = json!({"strait.io/tcp-port": value});
        api.apply(bad);
    }
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;

    // Each new connection is relayed byte for byte to one pod (HTTP here, any protocol there).
    let seen = support::bodies_over_fresh_connections(port, 10).await;
    assert_eq!(seen.get("db-0"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("db-1"), Some(&5), "{seen:?}");

    let event = |name: &str| {
        api.events().into_iter().find(|e| {
            e["involvedObject"]["name"] == name
                && e["involvedObject"]["kind"] == "Service"
                && e["reason"] == "TCPServiceNotServed"
                && e["type"] == "Warning"
        })
    };
    eventually(WAIT, "an Event on each Service not served", || {
        let ok = ["zz-copy", "zz-https", "zz-word"]
            .iter()
            .all(|n| event(n).is_some());
        async move { ok }
    })
    .await;
    for (name, says) in [
        (
            "zz-copy",
            format!("port {port} is already taken by Service apps/db"),
        ),
        (
            "zz-https",
            "port 8443 is already taken by Strait's listener kubernetes-https".into(),
        ),
        ("zz-word", "\"mysql\" is not a port".into()),
    ] {
        let e = event(name).unwrap();
        assert!(e["message"].as_str().unwrap().contains(&says), "{e}");
        assert!(
            e["involvedObject"]["uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "the Service's uid, for kubectl describe: {e}"
        );
    }

    // One pod stops listening: connections still succeed (the next endpoint is tried), and
    // after 5 refused connects in a row outlier detection ejects it.
    drop(ups.pop());
    let dead = std::net::SocketAddr::new(pods[1].ip(), 3306);
    eventually(WAIT, "db-1 refuses connections", || async move {
        tokio::net::TcpStream::connect(dead).await.is_err()
    })
    .await;
    let after = support::bodies_over_fresh_connections(port, 20).await;
    assert_eq!(after.get("db-0"), Some(&20), "{after:?}");
    let metrics = support::get(&client(), &strait.admin_url("/metrics"))
        .await
        .body;
    assert!(
        metrics.contains("strait_outlier_ejections_total{backend=\"apps/db:3306@tcp\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("outlier"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Without the annotation apps/db lets the port go, and apps/zz-copy, which asked for it
    // too, gets it: its listener answers (it has no pods, so each connection is closed at
    // once and counted as `no_endpoints`). Its bind may come while apps/db's listener is still
    // closing; it is tried again a second later.
    svc["metadata"]["annotations"] = json!({});
    api.apply(svc);
    eventually(WAIT, "apps/zz-copy serves the port", || {
        let (c, url, addr) = (
            client(),
            strait.admin_url("/metrics"),
            format!("127.0.0.1:{port}"),
        );
        async move {
            let _ = tokio::net::TcpStream::connect(addr).await;
            support::get(&c, &url).await.body.lines().any(|l| {
                l.starts_with("strait_tcp_connections_total{")
                    && l.contains("listener=\"tcp-apps-zz-copy\"")
                    && l.contains("result=\"no_endpoints\"")
            })
        }
    })
    .await;
    // Once apps/zz-copy gives up its claim too, the port closes.
    api.apply(k8s::service("apps", "zz-copy", &[("", 3306, "3306")]));
    eventually(WAIT, "the TCP port is closed", || {
        let addr = format!("127.0.0.1:{port}");
        async move { tokio::net::TcpStream::connect(addr).await.is_err() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_file_adds_its_listeners_and_backends_beside_the_cluster() {
    let (api, dir) = cluster().await;
    let _web = web_service_with_an_ingress(&api);
    let config = dir.write(
        "static.yaml",
        "kubernetes:\n  enabled: true\n  debounce: 10ms\nlisteners:\n  - name: health\n    address: 127.0.0.1:0\n    routes:\n      - direct_response: {status: 200, body: \"static ok\"}\n",
    );
    let strait = k8s::controller(&api, &dir, &["--config", config.to_str().unwrap()]).await;
    strait.wait_ready().await;
    let addr = |name: &str| {
        strait
            .listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("listener {name}: {:?}", strait.listeners))
            .1
    };
    let c = client();
    let r = get_host(&c, &format!("http://{}/", addr("health")), "any").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "static ok"));
    let r = get_host(
        &c,
        &format!("http://{}/", addr("kubernetes-http")),
        "web.test",
    )
    .await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "web-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_file_reloads_beside_the_cluster_and_a_bad_one_changes_nothing() {
    let (api, dir) = cluster().await;
    let _web = web_service_with_an_ingress(&api);
    let version = |body: &str, address: &str| {
        format!(
            "kubernetes:\n  enabled: true\n  debounce: 10ms\nlisteners:\n  - name: health\n    address: {address}\n    routes:\n      - direct_response: {{status: 200, body: \"{body}\"}}\n"
        )
    };
    let config = dir.write("static.yaml", &version("one", "127.0.0.1:0"));
    // Replaced whole (as a ConfigMap volume does), so no reload reads a half-written file.
    let replace = |text: &str| {
        let tmp = config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
    };
    let strait = k8s::controller(&api, &dir, &["--config", config.to_str().unwrap()]).await;
    strait.wait_ready().await;
    let addr = |name: &str| {
        let a = strait.listeners.iter().find(|(n, _)| n == name);
        format!("http://{}/", a.unwrap_or_else(|| panic!("{name}")).1)
    };
    let (health, cluster_url) = (addr("health"), addr("kubernetes-http"));
    let c = client();
    let body = |url: String, host: &'static str| {
        let c = c.clone();
        async move { get_host(&c, &url, host).await.body }
    };
    assert_eq!(body(health.clone(), "any").await, "one");

    // Written in place: the file watch reloads it, and the cluster's routes stay.
    replace(&version("two", "127.0.0.1:0"));
    eventually(WAIT, "the changed file served", || {
        let b = body(health.clone(), "any");
        async move { b.await == "two" }
    })
    .await;
    assert_eq!(body(cluster_url.clone(), "web.test").await, "web-0");

    // Broken YAML, then a moved listener: both rejected with the reason, the table stays.
    replace("kubernetes:\n  enabled: true\nlisteners: 7\n");
    eventually(WAIT, "the broken file rejected with its line", || async {
        strait.logged("static.yaml:3:")
    })
    .await;
    replace(&version("three", "127.0.0.1:1"));
    eventually(WAIT, "the moved listener rejected", || async {
        strait.logged("listeners changed; restart Strait")
    })
    .await;
    let metrics = get(&c, &strait.admin_url("/metrics")).await.body;
    assert!(
        metrics.contains("strait_config_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    assert_eq!(body(health.clone(), "any").await, "two");
    assert_eq!(body(cluster_url.clone(), "web.test").await, "web-0");

    // SIGHUP reloads a fixed file too.
    replace(&version("four", "127.0.0.1:0"));
    strait.signal("HUP");
    eventually(WAIT, "the fixed file served", || {
        let b = body(health.clone(), "any");
        async move { b.await == "four" }
    })
    .await;
    assert_eq!(body(cluster_url, "web.test").await, "web-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_static_file_is_logged_and_ends_nothing() {
    let (api, dir) = cluster().await;
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;
    strait.signal("HUP");
    eventually(WAIT, "the SIGHUP logged", || async {
        strait.logged("SIGHUP: no --config file to reload")
    })
    .await;
    let c = client();
    assert_eq!(get(&c, &strait.admin_url("/ready")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_delay_bounds_a_long_debounce() {
    let (api, dir) = cluster().await;
    let (pods, _ups) = pods("web", 1);
    k8s::backed_service(&api, "web", "", &ready(&pods));
    // A minute of debounce: without max_delay nothing would be published within WAIT.
    let config = dir.write(
        "slow.yaml",
        "kubernetes:\n  enabled: true\n  debounce: 60s\n  max_delay: 300ms\n",
    );
    let strait = k8s::controller(&api, &dir, &["--config", config.to_str().unwrap()]).await;
    strait.wait_ready().await;
    web_ingress(&api);
    let c = client();
    eventually(WAIT, "the Ingress routed after max_delay", || {
        let (c, url) = (c.clone(), strait.url("/"));
        async move { get_host(&c, &url, "web.test").await.body == "web-0" }
    })
    .await;
}

/// One pod behind Service `apps/web`, routed by an Ingress for `web.test`; keep what it
/// returns for as long as the pod must serve.
fn web_service_with_an_ingress(api: &KubeApi) -> (Vec<Pod>, Vec<Upstream>) {
    let (pods, ups) = pods("web", 1);
    k8s::backed_service(api, "web", "", &ready(&pods));
    web_ingress(api);
    (pods, ups)
}

/// An Ingress for `web.test` to Service `apps/web`.
fn web_ingress(api: &KubeApi) {
    api.apply(k8s::ingress(
        "apps",
        "web",
        Some("strait"),
        "web.test",
        &to("web"),
    ));
}

/// Waits until the log read from Strait holds a "published table" line.
async fn published_logged(strait: &Binary) {
    eventually(WAIT, "the published table's log line", || async {
        strait.logged("published table from the cluster")
    })
    .await;
}
