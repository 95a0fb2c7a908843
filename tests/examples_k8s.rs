//! The examples under `deploy/examples/` work as written: their Namespaces, IngressClasses,
//! Services and Ingresses are read from the files themselves and applied to the Kubernetes
//! API stand-in; each Deployment or StatefulSet becomes as many test pods (network
//! namespaces) as it has replicas, serving on the port its Service targets, with an
//! EndpointSlice listing them. Then traffic goes through `strait --kubernetes` end to end.
//! Editing an example so that it no longer works breaks these tests.

mod support;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use support::k8s::{self, READY};
use support::kube_api::KubeApi;
use support::netns::Pod;
use support::{client, get_host, tempdir, Binary, Upstream};
use tonic_health::ServingStatus;

/// Every document of every `.yaml` file of an example, in file name order.
fn example(name: &str) -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(docs, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the example"))
}

/// An example running: the stand-in with its objects, its workloads' pods and servers, and
/// Strait serving it.
struct Running {
    api: KubeApi,
    _dir: tempdir::Dir,
    _pods: Vec<Pod>,
    /// HTTP upstreams by workload, answering `<workload>-<replica>`.
    ups: HashMap<String, Vec<Upstream>>,
    _grpc: Vec<tonic_health::server::HealthReporter>,
    strait: Binary,
}

/// The gRPC health status pod `i` of a gRPC workload gives for service "x", so an answer
/// says which pod served it.
const GRPC_STATUSES: [ServingStatus; 3] = [
    ServingStatus::Serving,
    ServingStatus::NotServing,
    ServingStatus::Unknown,
];

/// `tcp_ports` maps a `strait.io/tcp-port` annotation value to the port to use instead, for
/// a port already taken on this host.
async fn run(name: &str, tcp_ports: &HashMap<String, String>) -> Running {
    let docs = example(name);
    let api = KubeApi::start().await;
    // The IngressClass is Strait's own manifest, which the examples rely on.
    let class = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/ingressclass.yaml"),
    )
    .unwrap();
    api.apply(serde_yaml_ng::from_str(&class).unwrap());
    for kind in ["Namespace", "IngressClass", "Service", "Ingress"] {
        for d in of_kind(&docs, kind) {
            let mut d = d.clone();
            let port = d
                .pointer_mut("/metadata/annotations/strait.io~1tcp-port")
                .filter(|p| p.as_str().is_some_and(|p| tcp_ports.contains_key(p)));
            if let Some(port) = port {
                let instead = &tcp_ports[port.as_str().unwrap()];
                *port = Value::from(instead.as_str());
            }
            api.apply(d);
        }
    }
    let workloads: Vec<&Value> = of_kind(&docs, "Deployment")
        .into_iter()
        .chain(of_kind(&docs, "StatefulSet"))
        .collect();
    let mut pods_of: HashMap<String, Vec<Pod>> = HashMap::new();
    for w in &workloads {
        let replicas = w["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
        let wname = w["metadata"]["name"].as_str().unwrap().to_owned();
        pods_of.insert(wname, (0..replicas).map(|_| Pod::create()).collect());
    }
    let mut ups: HashMap<String, Vec<Upstream>> = HashMap::new();
    let mut grpc = Vec::new();
    for svc in of_kind(&docs, "Service") {
        let ns = svc["metadata"]["namespace"].as_str().unwrap();
        let sname = svc["metadata"]["name"].as_str().unwrap();
        let selector = svc["spec"]["selector"].as_object().expect("a selector");
        let w = workloads
            .iter()
            .find(|w| {
                w["metadata"]["namespace"] == ns
                    && selector
                        .iter()
                        .all(|(k, v)| &w["spec"]["template"]["metadata"]["labels"][k] == v)
            })
            .unwrap_or_else(|| panic!("no workload for Service {sname}"));
        let wname = w["metadata"]["name"].as_str().unwrap().to_owned();
        let containers = w["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        let pods = &pods_of[&wname];
        let mut slice_ports = Vec::new();
        for p in svc["spec"]["ports"].as_array().unwrap() {
            let port_name = p["name"].as_str().unwrap_or("").to_owned();
            // targetPort: a number, or the name of a container port of the pod template.
            let target = match &p["targetPort"] {
                Value::Number(n) => n.as_u64().unwrap() as u16,
                Value::String(s) => containers
                    .iter()
                    .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                    .find(|cp| cp["name"] == s.as_str())
                    .and_then(|cp| cp["containerPort"].as_u64())
                    .unwrap_or_else(|| panic!("{sname}: no container port {s}"))
                    as u16,
                _ => p["port"].as_u64().unwrap() as u16,
            };
            let h2c = matches!(
                p["appProtocol"].as_str(),
                Some("kubernetes.io/h2c" | "h2c" | "grpc")
            );
            for (i, pod) in pods.iter().enumerate() {
                if h2c {
                    let listener = tokio::net::TcpListener::from_std(pod.bind(target)).unwrap();
                    let (_, reporter) = support::grpc_health_server_on(
                        listener,
                        "x",
                        Some(GRPC_STATUSES[i % GRPC_STATUSES.len()]),
                    )
                    .await;
                    grpc.push(reporter);
                } else {
                    ups.entry(wname.clone())
                        .or_default()
                        .push(pod.upstream_on(&format!("{wname}-{i}"), target));
                }
            }
            slice_ports.push((port_name, target));
        }
        let ports: Vec<(&str, u16)> = slice_ports.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let endpoints: Vec<_> = pods.iter().map(|p| (p.ip(), READY)).collect();
        api.apply(k8s::slice(
            ns,
            &format!("{sname}-abcde"),
            sname,
            &ports,
            &endpoints,
        ));
    }
    let dir = tempdir::Dir::new("examples");
    let strait = k8s::controller(&api, &dir, &[]).await;
    strait.wait_ready().await;
    Running {
        api,
        _dir: dir,
        _pods: pods_of.into_values().flatten().collect(),
        ups,
        _grpc: grpc,
        strait,
    }
}

impl Running {
    fn http(&self) -> String {
        format!("http://{}/", self.strait.listener("kubernetes-http"))
    }

    /// Answers to `n` requests for `host`, counted by body (others as `status NNN`).
    async fn spread(&self, host: &str, n: usize) -> HashMap<String, usize> {
        let c = client();
        let mut seen = HashMap::new();
        for _ in 0..n {
            let r = get_host(&c, &self.http(), host).await;
            let key = if r.status == 200 {
                r.body
            } else {
                format!("status {}", r.status.as_u16())
            };
            *seen.entry(key).or_insert(0) += 1;
        }
        seen
    }

    async fn metrics(&self) -> String {
        support::get(&client(), &self.strait.admin_url("/metrics"))
            .await
            .body
    }
}

fn evenly(seen: &HashMap<String, usize>, names: &[&str], each: usize) {
    for n in names {
        assert_eq!(seen.get(*n), Some(&each), "{n}: {seen:?}");
    }
    assert_eq!(seen.len(), names.len(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_example_exposes_only_the_gateway_through_one_ingress() {
    let docs = example("gateway");
    let ex = run("gateway", &HashMap::new()).await;

    let seen = ex.spread("gateway.example", 10).await;
    evenly(&seen, &["gateway-0", "gateway-1"], 5);
    // The services the gateway calls are not exposed.
    for host in ["service-1", "service-1.gateway-demo", "other.example"] {
        let r = get_host(&client(), &ex.http(), host).await;
        assert_eq!(r.status, 404, "{host}");
    }
    // The gateway calls them by the names of Services that the example defines.
    let conf = named(&docs, "ConfigMap", "gateway")["data"]["default.conf"]
        .as_str()
        .unwrap();
    let called: Vec<&str> = conf
        .split("proxy_pass http://")
        .skip(1)
        .map(|rest| rest.split(['/', ';', ':']).next().unwrap())
        .collect();
    assert_eq!(called, ["service-1", "service-2"]);
    for svc in called {
        named(&docs, "Service", svc);
        assert!(ex.api.get("services", "gateway-demo", svc).is_some());
    }
    assert_eq!(ex.ups["service-1"].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webapp_grpc_example_balances_retries_and_rate_limits_as_annotated() {
    let ex = run("webapp-grpc", &HashMap::new()).await;

    let seen = ex.spread("webapp.example", 9).await;
    evenly(&seen, &["webapp-0", "webapp-1", "webapp-2"], 3);

    // retries + retry-on 503: a pod answering 503 is never seen by clients.
    ex.ups["webapp"][0].behaviour.fail_with(503);
    let seen = ex.spread("webapp.example", 6).await;
    assert!(
        !seen.contains_key("webapp-0") && !seen.keys().any(|k| k.starts_with("status")),
        "{seen:?}"
    );
    let m = ex.metrics().await;
    let retried = m
        .lines()
        .filter(|l| l.starts_with("strait_retries_total{") && l.contains("webapp-grpc/webapp:80"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(retried >= 1.0, "retries counted: {m}");
    ex.ups["webapp"][0].behaviour.recover();

    // rate-limit 20/s with a burst of 40: a fast loop soon gets 429 with the limit's headers.
    let c = client();
    let mut limited = None;
    for i in 0..300 {
        let r = get_host(&c, &ex.http(), "webapp.example").await;
        if r.status == 429 {
            limited = Some((i, r));
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            !r.header("ratelimit").is_empty(),
            "rate-limit-response-headers"
        );
    }
    let (i, r) = limited.expect("429 within 300 requests");
    assert!(i >= 20, "not before the burst is spent: {i}");
    assert!(!r.header("ratelimit-policy").is_empty());

    // gRPC: one HTTP/2 connection, each call balanced over the three pods.
    let seen = support::grpc_checks_over_one_connection(ex.http(), "grpc.example", 30).await;
    assert_eq!(seen.len(), 3, "every pod answered: {seen:?}");
    assert!(seen.values().all(|&n| n == 10), "round robin: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_tcp_example_relays_connections_round_robin_to_the_headless_service() {
    let docs = example("mysql-tcp");
    let svc = named(&docs, "Service", "mysql-service");
    assert_eq!(svc["spec"]["clusterIP"], "None", "headless");
    let wanted = svc["metadata"]["annotations"]["strait.io/tcp-port"]
        .as_str()
        .expect("a TCP port annotation")
        .to_owned();
    // The example's port if it is free here, else any free one: the annotation is what is
    // tested, not this host's port 3306.
    let port = match std::net::TcpListener::bind(format!("127.0.0.1:{wanted}")) {
        Ok(_) => wanted.clone(),
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string(),
    };
    let ex = run("mysql-tcp", &HashMap::from([(wanted, port.clone())])).await;

    // One connection each; Strait relays bytes, whatever the protocol (HTTP here).
    let seen = support::bodies_over_fresh_connections(port.parse().unwrap(), 10).await;
    evenly(&seen, &["mysql-0", "mysql-1"], 5);

    let seen = ex.spread("webserver.example", 4).await;
    evenly(&seen, &["webserver-0", "webserver-1"], 2);
}

/// `strait-dns.yaml` of the MySQL example, as written but for its bind address and the
/// nameserver: the headless Service's name, answered by a real DNS server with the pods'
/// addresses, round-robined connection by connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_tcp_example_without_the_api_round_robins_the_dns_records() {
    let docs = example("mysql-tcp");
    let replicas = named(&docs, "StatefulSet", "mysql")["spec"]["replicas"]
        .as_u64()
        .unwrap() as usize;
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/mysql-tcp/strait-dns.yaml");
    let mut cfg: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let dns_name = cfg["backends"][0]["dns"].as_str().unwrap().to_owned();
    let (host, port) = dns_name.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();

    let pods: Vec<Pod> = (0..replicas).map(|_| Pod::create()).collect();
    let _ups: Vec<Upstream> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| p.upstream_on(&format!("mysql-{i}"), port))
        .collect();
    let dns = support::dns::DnsServer::start("cluster.local.").await;
    let ips: Vec<std::net::Ipv4Addr> = pods
        .iter()
        .map(|p| match p.ip() {
            std::net::IpAddr::V4(ip) => ip,
            other => panic!("test pods are IPv4: {other}"),
        })
        .collect();
    dns.set_a(&format!("{host}."), &ips, 30);

    cfg["listeners"][0]["address"] = "127.0.0.1:0".into();
    cfg["dns"] = serde_yaml_ng::from_str(&format!("nameservers: [\"{}\"]", dns.addr())).unwrap();
    let dir = tempdir::Dir::new("mysql-dns");
    let file = dir.write("strait.yaml", &serde_yaml_ng::to_string(&cfg).unwrap());
    let strait = Binary::start(&file).await;
    let relay = strait.listener("mysql");
    let seen = support::bodies_over_fresh_connections(relay.port(), 10).await;
    let want: HashMap<String, usize> = (0..replicas)
        .map(|i| (format!("mysql-{i}"), 10 / replicas))
        .collect();
    assert_eq!(seen, want, "connections round-robin over the A records");
}
