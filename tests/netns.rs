//! The test pods of `support::netns`: private addresses reachable from the host, servers in
//! this process listening inside them, and nothing left behind after a drop, even a drop
//! during a panic.

mod support;

use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::sync::Mutex;

use support::netns::{self, Pod};
use support::{client, get, grpc_check, grpc_health_client};
use tonic_health::pb::health_check_response::ServingStatus as Status;
use tonic_health::ServingStatus;

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("`ip` runs");
    assert!(out.status.success(), "`ip {}` fails", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_listed(name: &str) -> bool {
    ip_output(&["netns", "list"])
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Whether any interface of the host has `addr` (`ip -o addr` lines read `... inet A/N ...`).
fn host_has_address(addr: IpAddr) -> bool {
    let addr = addr.to_string();
    ip_output(&["-o", "addr"])
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(&addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_upstream_answers_the_host_on_the_pods_private_address() {
    let pod = Pod::create();
    let IpAddr::V4(ip) = pod.ip() else {
        panic!("an IPv4 pod address, got {}", pod.ip())
    };
    assert_eq!(ip.octets()[..2], [10, 250], "{ip} in 10.250.0.0/16");
    assert!(!ip.is_loopback() && !ip.is_link_local(), "{ip}");
    // The address belongs to the pod's own stack, not to the host's.
    let on_host = std::net::TcpListener::bind((ip, 0))
        .map(|_| ())
        .unwrap_err();
    assert_eq!(
        on_host.kind(),
        std::io::ErrorKind::AddrNotAvailable,
        "{on_host}"
    );

    let up = pod.upstream("pod-a");
    assert_eq!(up.addr.ip(), pod.ip());
    let r = get(&client(), &format!("http://{}/", up.addr)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "pod-a");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_into_a_pod_arrives_from_the_host_end_of_its_veth() {
    let pod = Pod::create();
    let listener = tokio::net::TcpListener::from_std(pod.bind(0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, connected) =
        tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
    let (_, peer) = accepted.unwrap();
    let ours = connected.unwrap().local_addr().unwrap();
    assert_eq!(peer, ours);
    assert_eq!(peer.ip(), pod.host_ip());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_serving_the_same_port_each_answer_with_their_own_upstream() {
    let (a, b) = (Pod::create(), Pod::create());
    assert_ne!(a.ip(), b.ip());
    // A fixed port, like a Service's targetPort: each pod's stack has it free.
    let ups = [a.upstream_on("pod-a", 8080), b.upstream_on("pod-b", 8080)];
    let c = client();
    for (up, pod) in ups.iter().zip([&a, &b]) {
        assert_eq!(up.addr, (pod.ip(), 8080).into());
        let r = get(&c, &format!("http://{}/", up.addr)).await;
        assert_eq!(
            (r.status.as_u16(), r.body.as_str()),
            (200, up.name.as_str())
        );
        assert_eq!(up.hits(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_pod_removes_its_namespace_and_host_address() {
    let pod = Pod::create();
    let (name, host_ip) = (pod.name().to_owned(), pod.host_ip());
    // Still serving after the drop: its socket keeps the namespace alive in the kernel, which
    // must not keep the veth and the host address around.
    let _up = pod.upstream("pod");
    assert!(netns_listed(&name), "{name} listed while the pod exists");
    assert!(
        host_has_address(host_ip),
        "{host_ip} on the host while the pod exists"
    );

    drop(pod);
    assert!(!netns_listed(&name), "{name} still listed");
    assert!(!host_has_address(host_ip), "{host_ip} still on the host");
}

#[test]
fn a_panic_with_a_live_pod_still_removes_it() {
    let made = Mutex::new(None);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let pod = Pod::create();
        *made.lock().unwrap() = Some((pod.name().to_owned(), pod.host_ip()));
        // Unwinds like a failed assertion, minus the panic hook: no message or backtrace in
        // the output of a passing test.
        std::panic::resume_unwind(Box::new("a failing test whose pod exists"));
    }));
    assert!(outcome.is_err());
    let (name, host_ip) = made.into_inner().unwrap().expect("the pod was created");
    assert!(!netns_listed(&name), "{name} still listed");
    assert!(!host_has_address(host_ip), "{host_ip} still on the host");
}

#[test]
fn namespaces_of_dead_test_processes_are_removed_and_live_ones_kept() {
    // No process has pid_max or above; pid 1 always runs.
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap();
    let dead = format!("strait-t{}-0", pid_max.trim());
    let live = format!("strait-t1-{}", std::process::id());
    for name in [&dead, &live] {
        ip_output(&["netns", "add", name]);
    }
    netns::remove_stale();
    let live_kept = netns_listed(&live);
    ip_output(&["netns", "del", &live]);
    assert!(!netns_listed(&dead), "{dead} still listed");
    assert!(live_kept, "{live} removed");
}

// The default flavour, as most tests use it: nothing here needs a second thread, since creating
// the pod blocks only briefly and the server is on this runtime.
#[tokio::test]
async fn a_grpc_health_server_in_a_pod_answers_checks() {
    let pod = Pod::create();
    let (addr, reporter) = pod
        .grpc_health_server("svc", Some(ServingStatus::Serving))
        .await;
    assert_eq!(addr.ip(), pod.ip());
    let mut c = grpc_health_client(format!("http://{addr}")).await;
    assert_eq!(
        grpc_check(&mut c, "svc").await.unwrap(),
        Status::Serving as i32
    );
    reporter
        .set_service_status("svc", ServingStatus::NotServing)
        .await;
    assert_eq!(
        grpc_check(&mut c, "svc").await.unwrap(),
        Status::NotServing as i32
    );
}
