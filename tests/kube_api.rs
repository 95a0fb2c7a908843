//! The Kubernetes API stand-in, driven by kube-rs through a kubeconfig file as Strait's
//! Kubernetes source will be: reflectors and watchers across resourceVersions, compaction
//! and bookmarks, label-selected watches, status patches, Events, Lease concurrency, and the
//! server's refusals with the server's wording.

mod support;

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Error};
use serde_json::{json, Value};
use support::kube_api::selector::LabelSelector;
use support::kube_api::KubeApi;
use support::{eventually, tempdir};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

async fn setup() -> (KubeApi, Client, tempdir::Dir) {
    let api = KubeApi::start().await;
    let dir = tempdir::Dir::new("kube");
    let c = api.client(dir.path()).await;
    (api, c, dir)
}

fn ingress(ns: &str, name: &str, host: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ingressClassName": "strait", "rules": [{"host": host, "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "web", "port": {"number": 80}}}}
        ]}}]}
    })
}

fn slice(name: &str, service: &str, addrs: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080}]
    })
}

/// The API error a kube-rs call failed with.
fn api_error<T: std::fmt::Debug>(r: Result<T, Error>) -> kube::core::Status {
    match r {
        Err(Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn reflector_sees_adds_changes_and_deletes_cluster_wide_and_namespaced() {
    let (api, c, _dir) = setup().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(ingress("default", "a", "a.example.com"));
    api.apply(ingress("shop", "b", "b.example.com"));

    let (all, writer) = reflector::store::<Ingress>();
    let stream = reflector::reflector(writer, watcher(Api::all(c.clone()), Default::default()));
    tokio::spawn(stream.for_each(|_| async {}));
    let (shop, writer) = reflector::store::<Ingress>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::namespaced(c.clone(), "shop"), Default::default()),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    timeout(WAIT, all.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    timeout(WAIT, shop.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all.state().len(), 2);
    assert_eq!(shop.state().len(), 1);

    // MODIFIED: the host changes and the generation counts it.
    api.apply(ingress("shop", "b", "c.example.com"));
    let key = ObjectRef::<Ingress>::new("b").within("shop");
    eventually(WAIT, "the change reaches both reflectors", || {
        let host = |s: &reflector::Store<Ingress>| {
            s.get(&key)
                .and_then(|i| i.spec.as_ref()?.rules.as_ref()?[0].host.clone())
        };
        let ok = host(&all).as_deref() == Some("c.example.com")
            && host(&shop).as_deref() == Some("c.example.com");
        async move { ok }
    })
    .await;
    assert_eq!(all.get(&key).unwrap().metadata.generation, Some(2));

    // ADDED and DELETED.
    api.apply(ingress("shop", "d", "d.example.com"));
    api.delete("ingresses", "shop", "b").unwrap();
    eventually(WAIT, "the add and the delete reach the reflectors", || {
        let names = |s: &reflector::Store<Ingress>| {
            let mut n: Vec<String> = s
                .state()
                .iter()
                .map(|i| i.metadata.name.clone().unwrap())
                .collect();
            n.sort();
            n
        };
        let ok = names(&all) == ["a", "d"] && names(&shop) == ["d"];
        async move { ok }
    })
    .await;

    // Both watches went through the paths kube-rs uses, with the token.
    let paths: Vec<String> = api.requests().into_iter().map(|(_, p, _)| p).collect();
    assert!(paths
        .iter()
        .any(|p| p.starts_with("/apis/networking.k8s.io/v1/ingresses?")));
    assert!(paths
        .iter()
        .any(|p| p.starts_with("/apis/networking.k8s.io/v1/namespaces/shop/ingresses?")));
    assert!(paths
        .iter()
        .any(|p| p.contains("watch=true") && p.contains("allowWatchBookmarks=true")));
}

#[tokio::test]
async fn watcher_relists_after_its_resource_version_is_compacted() {
    let (api, c, _dir) = setup().await;
    let svc = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
               "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}})
    };
    api.apply(svc("one"));
    let mut events = watcher(Api::<Service>::all(c), Default::default()).boxed();
    let mut next = async || {
        timeout(WAIT, events.next())
            .await
            .expect("watcher event within 10s")
            .unwrap()
    };
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(_))));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(_))));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    // Writes elsewhere move the store past the watcher's version, and compaction expires
    // it before the watcher (lazy: it watches when polled) starts its watch from it.
    api.apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "default"},
                     "stringData": {"k": "v"}}));
    api.compact();
    api.apply(svc("two"));

    // The watch gets 410 Gone; the watcher reports it and lists afresh.
    match next().await {
        Err(watcher::Error::WatchError(s)) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
            assert!(
                s.message.starts_with("too old resource version"),
                "{}",
                s.message
            );
        }
        other => panic!("expected the 410 from the expired watch, got {other:?}"),
    }
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    let mut names = Vec::new();
    loop {
        match next().await {
            Ok(watcher::Event::InitApply(s)) => names.push(s.metadata.name.unwrap()),
            Ok(watcher::Event::InitDone) => break,
            other => panic!("unexpected during the re-list: {other:?}"),
        }
    }
    // Every cluster's `kubernetes` Service is there too.
    assert_eq!(names, ["kubernetes", "one", "two"]);
    // The Service got what the server fills in.
    let one = api.get("services", "default", "one").unwrap();
    assert_eq!(one["spec"]["type"], "ClusterIP");
    assert_eq!(one["spec"]["ports"][0]["targetPort"], 80);
    assert!(one["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .starts_with("10.96."));
}

#[tokio::test]
async fn streaming_list_watcher_resumes_without_relisting_when_watches_are_cut() {
    let (api, c, _dir) = setup().await;
    api.apply(ingress("default", "a", "a.example.com"));
    // sendInitialEvents=true: the initial state comes as ADDED events and ends with the
    // annotated bookmark, on one watch.
    let cfg = watcher::Config::default().streaming_lists();
    let mut events = watcher(Api::<Ingress>::all(c), cfg).boxed();
    let mut next = async || {
        timeout(WAIT, events.next())
            .await
            .expect("watcher event within 10s")
            .unwrap()
    };
    assert!(matches!(next().await, Ok(watcher::Event::Init)));
    assert!(matches!(next().await, Ok(watcher::Event::InitApply(_))));
    assert!(matches!(next().await, Ok(watcher::Event::InitDone)));
    assert_eq!(api.open_watches(), 1);

    // The server drops the stream; the watcher resumes from the version it saw, and the
    // change made in between arrives as a plain event, not as a re-list.
    api.close_watches();
    eventually(WAIT, "the stream has ended", || {
        let n = api.open_watches();
        async move { n == 0 }
    })
    .await;
    api.apply(ingress("default", "b", "b.example.com"));
    match next().await {
        Ok(watcher::Event::Apply(i)) => assert_eq!(i.metadata.name.as_deref(), Some("b")),
        other => panic!("expected the new Ingress, got {other:?}"),
    }
    let watches: Vec<String> = api
        .requests()
        .into_iter()
        .map(|(_, p, _)| p)
        .filter(|p| p.contains("watch=true"))
        .collect();
    assert_eq!(watches.len(), 2, "{watches:?}");
    assert!(watches[0].contains("sendInitialEvents=true"), "{watches:?}");
    assert!(!watches[1].contains("sendInitialEvents"), "{watches:?}");
}

#[tokio::test]
async fn label_selected_endpoint_slice_watch_sees_only_its_service() {
    let (api, c, _dir) = setup().await;
    api.apply(slice("web-1", "web", &["10.250.1.2"]));
    api.apply(slice("db-1", "db", &["10.250.2.2"]));
    let cfg = watcher::Config::default().labels("kubernetes.io/service-name=web");
    let mut events = watcher(Api::<EndpointSlice>::namespaced(c, "default"), cfg).boxed();
    let mut seen = Vec::new();
    loop {
        match timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(s) => seen.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, ["web-1"]);

    api.apply(slice("db-2", "db", &["10.250.3.2"]));
    api.apply(slice("web-2", "web", &["10.250.4.2"]));
    // Relabelled away from the selection: the watch sees it leave as a delete.
    api.apply(slice("web-1", "other", &["10.250.1.2"]));
    let mut got = Vec::new();
    while got.len() < 2 {
        match timeout(WAIT, events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::Apply(s) => got.push(format!("apply {}", s.metadata.name.unwrap())),
            watcher::Event::Delete(s) => got.push(format!("delete {}", s.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, ["apply web-2", "delete web-1"]);
}

#[tokio::test]
async fn ingress_status_is_written_through_the_status_subresource_only() {
    let (api, c, _dir) = setup().await;
    api.apply(ingress("default", "a", "a.example.com"));
    let ingresses: Api<Ingress> = Api::namespaced(c.clone(), "default");
    let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.250.0.1"}]}}});
    let patched = ingresses
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let lb = patched
        .status
        .unwrap()
        .load_balancer
        .unwrap()
        .ingress
        .unwrap();
    assert_eq!(lb[0].ip.as_deref(), Some("10.250.0.1"));
    assert_eq!(api.patch_count("ingresses", "default", "a"), 1);
    assert_eq!(
        api.status_writes("ingresses", "default", "a")[0]["loadBalancer"]["ingress"][0]["ip"],
        "10.250.0.1"
    );

    // The main resource ignores status, and the status subresource ignores the spec.
    let sneaky = json!({"spec": {"ingressClassName": "other"}, "status": {"loadBalancer": {}}});
    ingresses
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    let now = api.get("ingresses", "default", "a").unwrap();
    assert_eq!(now["spec"]["ingressClassName"], "strait");
    let moved = json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.250.0.9"}]}}});
    ingresses
        .patch("a", &PatchParams::default(), &Patch::Merge(&moved))
        .await
        .unwrap();
    assert_eq!(
        api.get("ingresses", "default", "a").unwrap()["status"],
        json!({"loadBalancer": {"ingress": [{"ip": "10.250.0.1"}]}})
    );

    // JSON patch works too; strategic merge and apply patches are refused, not faked.
    let req = http::Request::patch("/apis/networking.k8s.io/v1/namespaces/default/ingresses/a/status")
        .header("content-type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([
                {"op": "add", "path": "/status/loadBalancer/ingress", "value": [{"hostname": "lb.example.com"}]}
            ]))
            .unwrap(),
        )
        .unwrap();
    let ing: Ingress = c.request(req).await.unwrap();
    let lb = ing.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    assert_eq!(lb[0].hostname.as_deref(), Some("lb.example.com"));
    let s = api_error(
        ingresses
            .patch_status("a", &PatchParams::default(), &Patch::Strategic(&status))
            .await,
    );
    assert_eq!(s.code, 415);

    // An invalid status is refused like any invalid write.
    let bad = json!({"status": {"loadBalancer": {"ingress": [{"ip": "not-an-ip"}]}}});
    let s = api_error(
        ingresses
            .patch_status("a", &PatchParams::default(), &Patch::Merge(&bad))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message.contains("status.loadBalancer.ingress[0].ip"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn service_load_balancer_status_is_defaulted_and_checked_like_the_real_server() {
    let (api, c, _dir) = setup().await;
    let services: Api<Service> = Api::namespaced(c, "default");
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "lb", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }));
    let status = json!({"status": {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.10"}, {"hostname": "lb.example.com"}
    ]}}});
    services
        .patch_status("lb", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    // An address's ipMode defaults to VIP; a hostname gets none.
    assert_eq!(
        api.get("services", "default", "lb").unwrap()["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "198.51.100.10", "ipMode": "VIP"}, {"hostname": "lb.example.com"}])
    );

    let refused = |status: Value| {
        let services = services.clone();
        async move {
            let s = api_error(
                services
                    .patch_status("lb", &PatchParams::default(), &Patch::Merge(&status))
                    .await,
            );
            assert_eq!(
                (s.code, s.reason.as_str()),
                (422, "Invalid"),
                "{}",
                s.message
            );
            s.message
        }
    };
    let m = refused(json!({"status": {"loadBalancer": {"ingress": [
        {"hostname": "lb.example.com", "ipMode": "VIP"}
    ]}}}))
    .await;
    assert!(
        m.contains("status.loadBalancer.ingress[0].ipMode: Forbidden: may not be specified when `ip` is not set"),
        "{m}"
    );
    let m = refused(json!({"status": {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.10", "ipMode": "Direct"}
    ]}}}))
    .await;
    assert!(
        m.contains("status.loadBalancer.ingress[0].ipMode: Unsupported value: \"Direct\""),
        "{m}"
    );
    let m =
        refused(json!({"status": {"loadBalancer": {"ingress": [{"hostname": "198.51.100.10"}]}}}))
            .await;
    assert!(
        m.contains("status.loadBalancer.ingress[0].hostname: Invalid value: \"198.51.100.10\": must be a DNS name, not an IP address"),
        "{m}"
    );

    // Only a LoadBalancer Service has load balancer addresses.
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "plain", "namespace": "default"},
        "spec": {"ports": [{"port": 80}]}
    }));
    let s = api_error(
        services
            .patch_status("plain", &PatchParams::default(), &Patch::Merge(&status))
            .await,
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains("status.loadBalancer.ingress: Forbidden: may only be used when `spec.type` is 'LoadBalancer'"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn events_from_both_apis_land_in_one_place() {
    let (api, c, _dir) = setup().await;
    let ing = api.apply(ingress("default", "a", "a.example.com"));
    let reference = ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("Ingress".into()),
        name: Some("a".into()),
        namespace: Some("default".into()),
        uid: ing["metadata"]["uid"].as_str().map(str::to_owned),
        ..Default::default()
    };
    // kube-runtime's recorder: events.k8s.io/v1 create, then a merge patch for the repeat.
    let recorder = Recorder::new(
        c.clone(),
        Reporter {
            controller: "strait.dev/ingress".into(),
            instance: Some("strait-0".into()),
        },
    );
    let ev = Event {
        type_: EventType::Warning,
        reason: "BadBackend".into(),
        note: Some("service web has no endpoints".into()),
        action: "Routing".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();

    // A core v1 Event, the older API.
    let core: Api<CoreEvent> = Api::namespaced(c.clone(), "default");
    core.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "a.legacy", "namespace": "default"},
            "involvedObject": {"kind": "Ingress", "name": "a", "namespace": "default"},
            "reason": "Sync", "message": "synced", "type": "Normal", "count": 1,
            "source": {"component": "strait"}
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    let events = api.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let new = events.iter().find(|e| e["reason"] == "BadBackend").unwrap();
    // Stored as the core API shows it, whichever API wrote it.
    assert_eq!(new["involvedObject"]["name"], "a");
    assert_eq!(new["message"], "service web has no endpoints");
    assert_eq!(new["reportingComponent"], "strait.dev/ingress");
    assert_eq!(new["series"]["count"], 2);

    // The events.k8s.io API refuses what its validation refuses.
    let strict: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c, "default");
    let s = api_error(
        strict
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "x", "namespace": "default"},
                    "regarding": {"kind": "Ingress", "name": "a", "namespace": "default"},
                    "reason": "Sync", "type": "Normal"
                }))
                .unwrap(),
            )
            .await,
    );
    assert_eq!(s.code, 422);
    assert_eq!(
        s.message,
        "Event.events.k8s.io \"x\" is invalid: eventTime: Required value"
    );
}

#[tokio::test]
async fn leases_are_updated_with_optimistic_concurrency() {
    let (api, c, _dir) = setup().await;
    let leases: Api<Lease> = Api::namespaced(c, "default");
    let lease = |holder: &str| -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "strait-leader", "namespace": "default"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
        }))
        .unwrap()
    };
    // PUT creates a missing Lease.
    let created = leases
        .replace("strait-leader", &PostParams::default(), &lease("a"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();

    let mut mine = lease("b");
    mine.metadata.resource_version = Some(rv.clone());
    let taken = leases
        .replace("strait-leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(
        taken.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );

    // A second writer with the old version loses.
    let mut stale = lease("c");
    stale.metadata.resource_version = Some(rv);
    let s = api_error(
        leases
            .replace("strait-leader", &PostParams::default(), &stale)
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        s.message,
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"strait-leader\": the object has been modified; please apply your changes to the latest version and try again"
    );
    // Leases never take an unconditional update.
    let s = api_error(
        leases
            .replace("strait-leader", &PostParams::default(), &lease("d"))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message.contains("must be specified for an update"),
        "{}",
        s.message
    );
    // Create of an existing name is AlreadyExists.
    let s = api_error(leases.create(&PostParams::default(), &lease("e")).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(
        api.get("leases", "default", "strait-leader").unwrap()["spec"]["holderIdentity"],
        "b"
    );
}

#[tokio::test]
async fn loopback_and_link_local_endpoint_addresses_are_refused_like_the_real_server() {
    let (api, c, _dir) = setup().await;
    let slices: Api<EndpointSlice> = Api::namespaced(c, "default");
    for (family, addr, words) in [
        (
            "IPv4",
            "127.0.0.1",
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        ),
        (
            "IPv6",
            "::1",
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        ),
        (
            "IPv4",
            "169.254.10.1",
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ),
        (
            "IPv6",
            "fe80::1",
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ),
        ("IPv4", "fe80::1", "must be a valid IPv4 address"),
    ] {
        let mut s = slice("web-1", "web", &[addr]);
        s["addressType"] = family.into();
        let s: EndpointSlice = serde_json::from_value(s).unwrap();
        let e = api_error(slices.create(&PostParams::default(), &s).await);
        assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
        assert_eq!(
            e.message,
            format!("EndpointSlice.discovery.k8s.io \"web-1\" is invalid: endpoints[0].addresses[0]: Invalid value: \"{addr}\": {words}")
        );
    }
    // The test-facing writes go through the same checks.
    let e = api
        .try_apply(slice("web-1", "web", &["127.0.0.2"]))
        .unwrap_err();
    assert!(
        e.message.contains("may not be in the loopback range"),
        "{e}"
    );
    let mut bad = slice("web-1", "web", &["10.250.1.2"]);
    bad["addressType"] = "IP".into();
    let e = api.try_apply(bad).unwrap_err();
    assert!(
        e.message.contains("addressType: Unsupported value: \"IP\""),
        "{e}"
    );
    // A private address is fine.
    api.apply(slice("web-1", "web", &["10.250.1.2"]));
}

#[tokio::test]
async fn refusals_have_the_real_servers_codes_and_messages() {
    let (api, c, dir) = setup().await;
    let ingresses: Api<Ingress> = Api::namespaced(c.clone(), "default");

    let s = api_error(ingresses.get("nope").await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, "ingresses.networking.k8s.io \"nope\" not found");

    let mut no_path_type = ingress("default", "a", "a.example.com");
    no_path_type["spec"]["rules"][0]["http"]["paths"][0]
        .as_object_mut()
        .unwrap()
        .remove("pathType");
    let e = api.try_apply(no_path_type).unwrap_err();
    assert_eq!(e.code, 422);
    assert!(
        e.message.ends_with(
            "spec.rules[0].http.paths[0].pathType: Required value: pathType must be specified"
        ),
        "{e}"
    );

    let e = api
        .try_apply(ingress("default", "Bad_Name", "a.example.com"))
        .unwrap_err();
    assert!(
        e.message
            .contains("metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"),
        "{e}"
    );

    let e = api
        .try_apply(ingress("missing", "a", "a.example.com"))
        .unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "namespaces \"missing\" not found")
    );

    let created: Ingress =
        serde_json::from_value(ingress("default", "a", "a.example.com")).unwrap();
    ingresses
        .create(&PostParams::default(), &created)
        .await
        .unwrap();
    let s = api_error(ingresses.create(&PostParams::default(), &created).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));

    // Cluster-scoped IngressClasses have no namespaced path.
    let classes: Api<IngressClass> = Api::all(c.clone());
    let class: IngressClass = serde_json::from_value(json!({
        "metadata": {"name": "strait"}, "spec": {"controller": "strait.dev/ingress-controller"}
    }))
    .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let wrong =
        http::Request::get("/apis/networking.k8s.io/v1/namespaces/default/ingressclasses/strait")
            .body(Vec::new())
            .unwrap();
    assert_eq!(api_error(c.request_text(wrong).await).code, 404);

    // Wrong token: 401, as from a real server.
    let path = api.kubeconfig(dir.path());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(api.token(), "wrong");
    std::fs::write(&path, text).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let outsider: Api<Ingress> = Api::namespaced(Client::try_from(cfg).unwrap(), "default");
    assert_eq!(
        api_error(outsider.list(&ListParams::default()).await).code,
        401
    );
}

#[tokio::test]
async fn paged_lists_hold_their_version_and_expire_with_compaction() {
    let (api, c, _dir) = setup().await;
    for i in 0..5 {
        api.apply(ingress("default", &format!("i{i}"), "a.example.com"));
    }
    let ingresses: Api<Ingress> = Api::namespaced(c, "default");
    let first = ingresses
        .list(&ListParams::default().limit(2))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().unwrap();

    // A write after the first page does not show in the later pages: they read the same
    // version, as etcd serves them.
    api.apply(ingress("default", "i5", "a.example.com"));
    let second = ingresses
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let third = ingresses
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(third.items.len(), 1);
    assert_eq!(third.metadata.continue_, None);
    assert_eq!(
        third.metadata.resource_version,
        first.metadata.resource_version
    );

    api.compact();
    let s = api_error(
        ingresses
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
    let s = api_error(
        ingresses
            .list(
                &ListParams::default()
                    .at(first.metadata.resource_version.as_deref().unwrap())
                    .matching(kube::api::VersionMatch::Exact),
            )
            .await,
    );
    assert_eq!(s.code, 410);
    assert!(
        s.message.starts_with("too old resource version"),
        "{}",
        s.message
    );
}

#[tokio::test]
async fn watches_send_bookmarks_and_end_at_their_timeout() {
    let (api, c, _dir) = setup().await;
    api.set_bookmark_interval(Duration::from_millis(100));
    let ingresses: Api<Ingress> = Api::namespaced(c, "default");
    let list = ingresses.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let stream = ingresses
        .watch(&WatchParams::default().timeout(3), &rv)
        .await
        .unwrap();
    api.apply(ingress("default", "a", "a.example.com"));
    let events: Vec<_> = timeout(WAIT, stream.try_collect::<Vec<_>>())
        .await
        .expect("the server ends the watch after timeoutSeconds")
        .unwrap();
    assert!(
        matches!(events.first(), Some(WatchEvent::Added(_))),
        "{events:?}"
    );
    let bookmarks: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.parse().unwrap()),
            _ => None,
        })
        .collect();
    assert!(bookmarks.len() >= 2, "{events:?}");
    assert_eq!(*bookmarks.last().unwrap(), api.resource_version());
}

#[test]
fn label_selectors_follow_the_kubernetes_grammar() {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let s = LabelSelector::parse("a=b, c in (x,y),!d,e!=f,g").unwrap();
    assert!(s.matches(&labels(&[("a", "b"), ("c", "y"), ("g", "")])));
    assert!(!s.matches(&labels(&[("a", "b"), ("c", "z"), ("g", "")])));
    assert!(!s.matches(&labels(&[("a", "b"), ("c", "x"), ("d", "1"), ("g", "")])));
    assert!(!s.matches(&labels(&[("a", "b"), ("c", "x")])));
    assert!(LabelSelector::parse("a=b,,c").is_err());
    assert!(LabelSelector::parse("a in x").is_err());
    assert!(LabelSelector::parse("kubernetes.io/service-name==web").is_ok());
}
