//! Kubernetes objects as a user writes them, and Strait running as an Ingress controller
//! against the API stand-in through an ordinary kubeconfig file.

use std::ffi::OsStr;
use std::net::IpAddr;

use serde_json::{json, Value};

use super::kube_api::KubeApi;
use super::tempdir;
use super::Binary;

/// An IngressClass for Strait's controller, optionally the cluster default.
pub fn ingress_class(name: &str, controller: &str, default: bool) -> Value {
    let mut c = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": name},
        "spec": {"controller": controller},
    });
    if default {
        c["metadata"]["annotations"] =
            json!({"ingressclass.kubernetes.io/is-default-class": "true"});
    }
    c
}

/// One Ingress path: `(path, pathType, service, port)`; a numeric port string is a port
/// number, anything else a port name.
pub struct Path<'a>(pub &'a str, pub &'a str, pub &'a str, pub &'a str);

fn port_ref(port: &str) -> Value {
    match port.parse::<u16>() {
        Ok(n) => json!({"number": n}),
        Err(_) => json!({"name": port}),
    }
}

/// An Ingress with one rule for `host` ("" for any host) and these paths.
pub fn ingress(ns: &str, name: &str, class: Option<&str>, host: &str, paths: &[Path<'_>]) -> Value {
    let paths: Vec<Value> = paths
        .iter()
        .map(|Path(path, kind, svc, port)| {
            json!({"path": path, "pathType": kind,
                   "backend": {"service": {"name": svc, "port": port_ref(port)}}})
        })
        .collect();
    let mut rule = json!({"http": {"paths": paths}});
    if !host.is_empty() {
        rule["host"] = json!(host);
    }
    let mut ing = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"rules": [rule]},
    });
    if let Some(c) = class {
        ing["spec"]["ingressClassName"] = json!(c);
    }
    ing
}

/// A ClusterIP Service with `(name, port, targetPort)` ports; targetPort may be a name.
pub fn service(ns: &str, name: &str, ports: &[(&str, u16, &str)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, port, target)| {
            let target = match target.parse::<u16>() {
                Ok(t) => json!(t),
                Err(_) => json!(target),
            };
            let mut p = json!({"port": port, "targetPort": target, "protocol": "TCP"});
            if !n.is_empty() {
                p["name"] = json!(n);
            }
            p
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": ports},
    })
}

/// An endpoint's conditions.
#[derive(Clone, Copy)]
pub struct Cond {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Ready and serving.
pub const READY: Cond = Cond {
    ready: true,
    serving: true,
    terminating: false,
};
/// Running but failing its readiness probe.
pub const NOT_READY: Cond = Cond {
    ready: false,
    serving: false,
    terminating: false,
};
/// Shutting down but still answering (pre-stop).
pub const TERMINATING: Cond = Cond {
    ready: false,
    serving: true,
    terminating: true,
};

/// An EndpointSlice of `service` with `(port name, port)` ports and `(ip, conditions)`
/// endpoints.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(IpAddr, Cond)],
) -> Value {
    let family = match endpoints.first().map(|(ip, _)| ip) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| {
            let mut v = json!({"port": p, "protocol": "TCP"});
            if !n.is_empty() {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, c)| {
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": c.ready, "serving": c.serving, "terminating": c.terminating}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// A namespace.
pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// Strait started with `--kubernetes` against the stand-in, plus `extra` flags.
pub async fn controller(api: &KubeApi, dir: &tempdir::Dir, extra: &[&str]) -> Binary {
    let kubeconfig = api.kubeconfig(dir.path());
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--kubernetes"),
        OsStr::new("--http-addr"),
        OsStr::new("127.0.0.1:0"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    Binary::start_with(
        &args,
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("POD_NAME", OsStr::new("strait-test-0")),
            ("POD_NAMESPACE", OsStr::new("default")),
            // Never the cluster a CI runner may itself run in: only the stand-in.
            ("KUBERNETES_SERVICE_HOST", OsStr::new("")),
            ("KUBERNETES_SERVICE_PORT", OsStr::new("")),
        ],
    )
    .await
}

/// `strait sidecar` with these flags against the stand-in, in namespace `namespace` (its
/// bare Service names resolve there).
pub async fn sidecar(api: &KubeApi, dir: &tempdir::Dir, namespace: &str, flags: &[&str]) -> Binary {
    let kubeconfig = api.kubeconfig(dir.path());
    let mut args: Vec<&OsStr> = vec![OsStr::new("sidecar")];
    args.extend(flags.iter().map(OsStr::new));
    Binary::start_with(
        &args,
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("POD_NAME", OsStr::new("app-0")),
            ("POD_NAMESPACE", OsStr::new(namespace)),
            ("KUBERNETES_SERVICE_HOST", OsStr::new("")),
            ("KUBERNETES_SERVICE_PORT", OsStr::new("")),
        ],
    )
    .await
}

impl Binary {
    /// The address of listener `name`.
    pub fn listener(&self, name: &str) -> std::net::SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("listener {name}: {:?}", self.listeners))
            .1
    }
}

/// Service `name` in `apps` (port 80 named `port_name`, target 8080) with one EndpointSlice
/// of these endpoints on port 8080.
pub fn backed_service(
    api: &KubeApi,
    name: &str,
    port_name: &str,
    endpoints: &[(std::net::IpAddr, Cond)],
) {
    api.apply(service("apps", name, &[(port_name, 80, "8080")]));
    api.apply(slice(
        "apps",
        &format!("{name}-a"),
        name,
        &[(port_name, 8080)],
        endpoints,
    ));
}
