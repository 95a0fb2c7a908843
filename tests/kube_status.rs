//! Leader election on a Lease and the Ingress status writer, against the Kubernetes API
//! stand-in through a kubeconfig, as Strait runs them: which replica leads and when another
//! takes over, and which status writes happen (the stand-in counts them).

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use strait_control::kubernetes::leader::LeaderElection;
use strait_control::kubernetes::status::{PublishSource, Served, ServedIngress, StatusWriter};
use support::kube_api::KubeApi;
use support::{eventually, tempdir};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);
const LEASE: &str = "strait-leader";
const ADDRESS: &str = "203.0.113.7";

async fn setup() -> (KubeApi, Client, tempdir::Dir) {
    let api = KubeApi::start().await;
    let dir = tempdir::Dir::new("kube-status");
    let c = api.client(dir.path()).await;
    (api, c, dir)
}

fn elector(c: &Client, identity: &str, lease: Duration, renew: Duration) -> LeaderElection {
    LeaderElection::new(c.clone(), "default", LEASE, identity)
        .lease_duration(lease)
        .renew_every(renew)
}

/// A shutdown signal that any number of tasks can wait on.
fn shutdown() -> (watch::Sender<bool>, impl Fn() -> ShutdownFuture) {
    let (tx, rx) = watch::channel(false);
    (tx, move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }) as ShutdownFuture
    })
}

type ShutdownFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

fn lease(api: &KubeApi) -> Lease {
    serde_json::from_value(
        api.get("leases", "default", LEASE)
            .expect("the Lease exists"),
    )
    .unwrap()
}

fn holder(l: &Lease) -> Option<String> {
    l.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

fn renewed(l: &Lease) -> Timestamp {
    l.spec.as_ref().unwrap().renew_time.as_ref().unwrap().0
}

fn acquired(l: &Lease) -> Timestamp {
    l.spec.as_ref().unwrap().acquire_time.as_ref().unwrap().0
}

fn transitions(l: &Lease) -> i32 {
    l.spec.as_ref().unwrap().lease_transitions.unwrap()
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(SignedDuration::try_from(d).unwrap()).unwrap()
}

async fn wait_for(rx: &watch::Receiver<bool>, value: bool, what: &str) {
    eventually(WAIT, what, || {
        let now = *rx.borrow();
        async move { now == value }
    })
    .await;
}

fn ingress(name: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ingressClassName": "strait", "rules": [{"host": format!("{name}.example.com"), "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]}
    })
}

/// The served set as the Kubernetes source would build it from its watch, once the watch
/// has caught up with the store.
fn served_now(api: &KubeApi, names: &[&str]) -> Arc<Served> {
    Arc::new(Served {
        ingresses: names
            .iter()
            .map(|n| {
                let ing: Ingress =
                    serde_json::from_value(api.get("ingresses", "default", n).unwrap()).unwrap();
                ServedIngress::from_ingress(&ing)
            })
            .collect(),
    })
}

/// The served set as a watch that has not seen any status yet shows it.
fn served_unwritten(names: &[&str]) -> Arc<Served> {
    Arc::new(Served {
        ingresses: names
            .iter()
            .map(|n| ServedIngress {
                namespace: "default".into(),
                name: (*n).into(),
                current: Vec::new(),
            })
            .collect(),
    })
}

/// An Ingress's `status.loadBalancer.ingress` as (ip, hostname) pairs, in a fixed order.
fn addresses(api: &KubeApi, name: &str) -> Vec<(Option<String>, Option<String>)> {
    let ing = api.get("ingresses", "default", name).unwrap();
    let mut v: Vec<_> = ing["status"]["loadBalancer"]["ingress"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|lb| {
            (
                lb["ip"].as_str().map(str::to_owned),
                lb["hostname"].as_str().map(str::to_owned),
            )
        })
        .collect();
    v.sort();
    v
}

fn ip(a: &str) -> (Option<String>, Option<String>) {
    (Some(a.to_owned()), None)
}

fn hostname(h: &str) -> (Option<String>, Option<String>) {
    (None, Some(h.to_owned()))
}

async fn wait_for_addresses(
    api: &KubeApi,
    name: &str,
    want: Vec<(Option<String>, Option<String>)>,
) {
    eventually(WAIT, &format!("{name} shows {want:?}"), || {
        let now = addresses(api, name);
        let want = want.clone();
        async move { now == want }
    })
    .await;
}

fn writes(api: &KubeApi, name: &str) -> usize {
    api.patch_count("ingresses", "default", name)
}

#[tokio::test]
async fn a_follower_waits_while_the_leader_renews_and_takes_over_when_it_releases() {
    let (api, c, _dir) = setup().await;
    let lease_for = Duration::from_secs(2);
    let (stop_a, on_stop_a) = shutdown();
    let mut a = elector(&c, "replica-a", lease_for, Duration::from_millis(100)).spawn(on_stop_a());
    wait_for(&a, true, "replica-a leads").await;
    let l = lease(&api);
    assert_eq!(holder(&l).as_deref(), Some("replica-a"));
    let spec = l.spec.clone().unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(2));
    assert_eq!(spec.lease_transitions, Some(0));
    assert!(spec.acquire_time.is_some());

    let (_stop_b, on_stop_b) = shutdown();
    let b = elector(&c, "replica-b", lease_for, Duration::from_millis(100)).spawn(on_stop_b());
    let mut b_seen = b.clone();
    let b_ever_led = tokio::spawn(async move { b_seen.wait_for(|v| *v).await.is_ok() });

    // Keep going until the leader has renewed past where its first term would have ended:
    // only the renewals can have kept replica-b a follower.
    let first = renewed(&l);
    eventually(WAIT, "replica-a renews past one lease duration", || {
        let l = lease(&api);
        async move { renewed(&l) > plus(first, lease_for + Duration::from_millis(300)) }
    })
    .await;
    assert!(*a.borrow());
    assert!(!*b.borrow());
    assert!(!b_ever_led.is_finished(), "replica-b never led");
    assert_eq!(holder(&lease(&api)).as_deref(), Some("replica-a"));

    // The last renewal replica-a can have made is at least this one.
    let before_stop = renewed(&lease(&api));
    stop_a.send_replace(true);
    wait_for(&b, true, "replica-b leads").await;
    assert!(!*a.borrow());
    let l = lease(&api);
    assert_eq!(holder(&l).as_deref(), Some("replica-b"));
    assert_eq!(transitions(&l), 1);
    // It took over on the release, before replica-a's last term could have run out.
    assert!(
        acquired(&l) < plus(before_stop, lease_for),
        "took over at {} though the lease was renewed at {before_stop}",
        acquired(&l)
    );
    // The stopped elector's task has ended: its sender is gone.
    tokio::time::timeout(WAIT, async { while a.changed().await.is_ok() {} })
        .await
        .expect("replica-a's task ends after releasing");
}

#[tokio::test]
async fn two_electors_started_together_elect_exactly_one() {
    let (api, c, _dir) = setup().await;
    let lease_for = Duration::from_secs(1);
    let renew = Duration::from_millis(100);
    let (_stop, on_stop) = shutdown();
    let a = elector(&c, "replica-a", lease_for, renew).spawn(on_stop());
    let b = elector(&c, "replica-b", lease_for, renew).spawn(on_stop());
    eventually(WAIT, "one of them leads", || {
        let any = *a.borrow() || *b.borrow();
        async move { any }
    })
    .await;

    // For more than a lease duration of renewals: one leader, and it is the Lease's holder.
    let start = renewed(&lease(&api));
    eventually(WAIT, "the leader renews past one lease duration", || {
        let (la, lb) = (*a.borrow(), *b.borrow());
        assert!(la != lb, "exactly one leads: a={la} b={lb}");
        let l = lease(&api);
        let want = if la { "replica-a" } else { "replica-b" };
        assert_eq!(holder(&l).as_deref(), Some(want));
        assert_eq!(transitions(&l), 0, "nobody took over from anybody");
        async move { renewed(&l) > plus(start, lease_for + Duration::from_millis(300)) }
    })
    .await;
}

#[tokio::test]
async fn a_leader_that_stops_renewing_is_replaced_once_its_lease_runs_out() {
    let (api, c, _dir) = setup().await;
    let lease_for = Duration::from_secs(1);
    let renew = Duration::from_millis(300);
    let (tx_a, a) = watch::channel(false);
    let crashed =
        tokio::spawn(elector(&c, "replica-a", lease_for, renew).run(tx_a, std::future::pending()));
    wait_for(&a, true, "replica-a leads").await;
    let (_stop_b, on_stop_b) = shutdown();
    let b = elector(&c, "replica-b", lease_for, renew).spawn(on_stop_b());

    // Gone without a word, as a crashed or partitioned replica: no release.
    crashed.abort();
    let _ = crashed.await;
    let last = lease(&api);
    assert_eq!(holder(&last).as_deref(), Some("replica-a"));

    wait_for(&b, true, "replica-b leads").await;
    let l = lease(&api);
    assert_eq!(holder(&l).as_deref(), Some("replica-b"));
    assert_eq!(transitions(&l), 1);
    assert!(
        acquired(&l) >= plus(renewed(&last), lease_for),
        "took over at {} though replica-a renewed at {}",
        acquired(&l),
        renewed(&last)
    );
}

#[tokio::test]
async fn fixed_addresses_are_written_once_and_cleared_when_an_ingress_stops_being_served() {
    let (api, c, _dir) = setup().await;
    for n in ["a", "b", "c", "d", "e", "f"] {
        api.apply(ingress(n));
    }
    let (_leader_tx, leader) = watch::channel(true);
    let (served_tx, served) = watch::channel(served_unwritten(&["a", "b"]));
    let (_stop, on_stop) = shutdown();
    let writer = StatusWriter::new(c.clone(), PublishSource::Addresses(vec![ADDRESS.into()]));
    tokio::spawn(writer.run(leader, served, on_stop()));

    wait_for_addresses(&api, "a", vec![ip(ADDRESS)]).await;
    wait_for_addresses(&api, "b", vec![ip(ADDRESS)]).await;
    assert_eq!((writes(&api, "a"), writes(&api, "b")), (1, 1));
    assert_eq!(
        api.status_writes("ingresses", "default", "a")[0],
        json!({"loadBalancer": {"ingress": [{"ip": ADDRESS}]}})
    );

    // The same Ingresses again, as a watch that has not caught up with the writes shows
    // them: no reason to write. `c` joins in the same update; once it is written, the
    // update has been handled.
    served_tx.send_replace(served_unwritten(&["a", "b", "c"]));
    wait_for_addresses(&api, "c", vec![ip(ADDRESS)]).await;
    // And as a watch that has caught up shows them: nothing to write either.
    served_tx.send_replace(served_now(&api, &["a", "b", "c", "d"]));
    wait_for_addresses(&api, "d", vec![ip(ADDRESS)]).await;
    assert_eq!(
        ["a", "b", "c", "d"].map(|n| writes(&api, n)),
        [1, 1, 1, 1],
        "each Ingress written once"
    );

    // `b` is no longer served: its status is cleared.
    served_tx.send_replace(served_now(&api, &["a", "c", "d"]));
    wait_for_addresses(&api, "b", vec![]).await;
    assert_eq!(writes(&api, "b"), 2);

    // Another controller takes `c` over and writes its own address as Strait stops
    // serving it: that status is not Strait's to clear.
    let ingresses: Api<Ingress> = Api::namespaced(c, "default");
    let theirs = json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.20"}]}}});
    ingresses
        .patch_status("c", &PatchParams::default(), &Patch::Merge(&theirs))
        .await
        .unwrap();
    served_tx.send_replace(served_now(&api, &["a", "d", "e"]));
    wait_for_addresses(&api, "e", vec![ip(ADDRESS)]).await;
    // Updates are handled one after another: once `f` is written, `c` has been handled.
    served_tx.send_replace(served_now(&api, &["a", "d", "e", "f"]));
    wait_for_addresses(&api, "f", vec![ip(ADDRESS)]).await;
    assert_eq!(addresses(&api, "c"), vec![ip("198.51.100.20")]);
    assert_eq!(
        writes(&api, "c"),
        2,
        "Strait's write and the other controller's"
    );
    assert_eq!(
        ["a", "b", "d", "e", "f"].map(|n| writes(&api, n)),
        [1, 2, 1, 1, 1]
    );
}

#[tokio::test]
async fn the_published_services_load_balancer_addresses_are_copied_and_followed() {
    let (api, c, _dir) = setup().await;
    let service = |status: Value| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "strait", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "strait"}, "ports": [{"port": 80}]},
            "status": status
        })
    };
    api.apply(service(json!({"loadBalancer": {}})));
    api.apply(ingress("a"));
    let (_leader_tx, leader) = watch::channel(true);
    let (served_tx, served) = watch::channel(served_now(&api, &["a"]));
    let (_stop, on_stop) = shutdown();
    let source = PublishSource::Service {
        namespace: "default".into(),
        name: "strait".into(),
    };
    tokio::spawn(StatusWriter::new(c, source).run(leader, served, on_stop()));

    // The cloud provisions the load balancer.
    api.apply(service(json!({"loadBalancer": {"ingress": [
        {"ip": "198.51.100.10", "ports": [{"port": 80, "protocol": "TCP"}]},
        {"hostname": "lb.example.com"}
    ]}})));
    wait_for_addresses(
        &api,
        "a",
        vec![hostname("lb.example.com"), ip("198.51.100.10")],
    )
    .await;
    assert_eq!(writes(&api, "a"), 1);
    // Only addresses are copied: the Service's ports and ipMode are its own.
    let written = &api.status_writes("ingresses", "default", "a")[0]["loadBalancer"]["ingress"];
    assert!(
        written
            .as_array()
            .unwrap()
            .iter()
            .all(|lb| lb.get("ports").is_none()),
        "{written}"
    );

    // The address changes; the watch of the Ingress has caught up meanwhile.
    served_tx.send_replace(served_now(&api, &["a"]));
    api.apply(service(
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.11"}]}}),
    ));
    wait_for_addresses(&api, "a", vec![ip("198.51.100.11")]).await;
    assert_eq!(writes(&api, "a"), 2);
}

/// One Strait replica: an elector and a status writer that follows it, with one shutdown.
fn replica(
    c: &Client,
    identity: &str,
    served: watch::Receiver<Arc<Served>>,
) -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (stop, on_stop) = shutdown();
    let leading = elector(
        c,
        identity,
        Duration::from_secs(2),
        Duration::from_millis(100),
    )
    .spawn(on_stop());
    let writer = StatusWriter::new(c.clone(), PublishSource::Addresses(vec![ADDRESS.into()]));
    tokio::spawn(writer.run(leading.clone(), served, on_stop()));
    (stop, leading)
}

#[tokio::test]
async fn only_the_leading_replica_writes_status() {
    let (api, c, _dir) = setup().await;
    for n in ["x", "y", "z"] {
        api.apply(ingress(n));
    }
    let (served_tx, served) = watch::channel(Arc::new(Served::default()));
    let (stop_a, a) = replica(&c, "replica-a", served.clone());
    wait_for(&a, true, "replica-a leads").await;
    let (_stop_b, b) = replica(&c, "replica-b", served);

    // Both replicas see every update; the follower writes nothing, so each Ingress is
    // written exactly once.
    served_tx.send_replace(served_now(&api, &["x"]));
    wait_for_addresses(&api, "x", vec![ip(ADDRESS)]).await;
    served_tx.send_replace(served_now(&api, &["x", "y"]));
    wait_for_addresses(&api, "y", vec![ip(ADDRESS)]).await;
    served_tx.send_replace(served_now(&api, &["x", "y"]));
    assert!(!*b.borrow());
    assert_eq!((writes(&api, "x"), writes(&api, "y")), (1, 1));

    // The leader goes away; the follower takes over, finds the statuses right, and writes
    // what changes from then on.
    stop_a.send_replace(true);
    wait_for(&b, true, "replica-b leads").await;
    served_tx.send_replace(served_now(&api, &["x", "y", "z"]));
    wait_for_addresses(&api, "z", vec![ip(ADDRESS)]).await;
    assert_eq!(
        ["x", "y", "z"].map(|n| writes(&api, n)),
        [1, 1, 1],
        "each Ingress written once, by one replica or the other"
    );
}
