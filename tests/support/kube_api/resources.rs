//! The resources the stand-in serves, and what the real server does to each on a write:
//! decoding into the typed API object (so wrong types are a 400 and unknown fields are
//! dropped, as the server prunes them), defaulting, and validation with the server's field
//! paths and wording.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::meta::{
    base64_encode, dns1035_label, dns1123_label, dns1123_subdomain, label_value, qualified_name,
    FieldError, Named,
};

/// One served resource. Several may share one `storage` (Events are one set of objects seen
/// through `v1` and `events.k8s.io/v1`).
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub storage: &'static str,
    /// Has a `/status` subresource: the main resource ignores `status`, and `/status`
    /// ignores everything else.
    pub status: bool,
    /// `metadata.generation` starts at 1 and counts changes outside metadata and status.
    pub generation: bool,
    /// PUT to a missing name creates it (Leases, Events); otherwise 404.
    pub create_on_update: bool,
    /// PUT without `metadata.resourceVersion` is allowed (last write wins); otherwise 422.
    pub unconditional_update: bool,
    /// Field selector labels beyond `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
    decode: fn(Value) -> Result<Value, String>,
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn named(&self) -> Named<'static> {
        Named {
            group: self.group,
            plural: self.plural,
            kind: self.kind,
        }
    }

    /// Decodes `obj` as the typed object and encodes it back: a field of the wrong type is
    /// the server's 400, and fields the type does not have are dropped.
    pub fn decode(&self, obj: Value) -> Result<Value, String> {
        (self.decode)(obj).map_err(|e| {
            format!(
                "{} in version \"{}\" cannot be handled as a {}: {e}",
                self.kind, self.version, self.kind
            )
        })
    }

    /// The object as this resource's version shows it, from its stored form.
    pub fn present(&self, stored: &Value) -> Value {
        let mut v = if self.group == "events.k8s.io" {
            event_to_events_v1(stored)
        } else {
            stored.clone()
        };
        v["apiVersion"] = self.api_version().into();
        v["kind"] = self.kind.into();
        v
    }

    /// The stored form of an object written through this resource.
    pub fn to_storage(&self, obj: Value) -> Value {
        if self.group == "events.k8s.io" {
            event_from_events_v1(obj)
        } else {
            obj
        }
    }

    /// Value of a supported field selector label on a stored object.
    pub fn field(&self, obj: &Value, label: &str) -> String {
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        match label {
            "metadata.name" => s(&obj["metadata"]["name"]),
            "metadata.namespace" => s(&obj["metadata"]["namespace"]),
            "type" => s(&obj["type"]),
            "reason" => s(&obj["reason"]),
            "source" => s(&obj["source"]["component"]),
            l => match l.strip_prefix("involvedObject.") {
                Some(f) => s(&obj["involvedObject"][f]),
                None => String::new(),
            },
        }
    }
}

fn typed<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_value(t).map_err(|e| e.to_string())
}

use k8s_openapi::api::coordination::v1 as coordination;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::events::v1 as events;
use k8s_openapi::api::networking::v1 as networking;

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "source",
    "type",
];

const fn res(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    decode: fn(Value) -> Result<Value, String>,
) -> Resource {
    Resource {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        storage: plural,
        status: false,
        generation: false,
        create_on_update: false,
        unconditional_update: true,
        fields: &[],
        decode,
    }
}

/// Everything the stand-in serves. Anything else is a 404 as for a resource the server does
/// not have.
pub static RESOURCES: &[Resource] = &[
    Resource {
        generation: true,
        storage: "ingressclasses.networking.k8s.io",
        ..res(
            "networking.k8s.io",
            "ingressclasses",
            "IngressClass",
            false,
            typed::<networking::IngressClass>,
        )
    },
    Resource {
        generation: true,
        status: true,
        storage: "ingresses.networking.k8s.io",
        ..res(
            "networking.k8s.io",
            "ingresses",
            "Ingress",
            true,
            typed::<networking::Ingress>,
        )
    },
    Resource {
        status: true,
        ..res("", "services", "Service", true, typed::<core::Service>)
    },
    Resource {
        generation: true,
        storage: "endpointslices.discovery.k8s.io",
        ..res(
            "discovery.k8s.io",
            "endpointslices",
            "EndpointSlice",
            true,
            typed::<discovery::EndpointSlice>,
        )
    },
    Resource {
        fields: &["type"],
        ..res("", "secrets", "Secret", true, typed::<core::Secret>)
    },
    Resource {
        create_on_update: true,
        fields: EVENT_FIELDS,
        ..res("", "events", "Event", true, typed::<core::Event>)
    },
    Resource {
        create_on_update: true,
        storage: "events",
        ..res(
            "events.k8s.io",
            "events",
            "Event",
            true,
            typed::<events::Event>,
        )
    },
    Resource {
        create_on_update: true,
        unconditional_update: false,
        storage: "leases.coordination.k8s.io",
        ..res(
            "coordination.k8s.io",
            "leases",
            "Lease",
            true,
            typed::<coordination::Lease>,
        )
    },
    Resource {
        status: true,
        ..res(
            "",
            "namespaces",
            "Namespace",
            false,
            typed::<core::Namespace>,
        )
    },
];

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource a test names by its plural (`"ingresses"`) or `plural.group`
/// (`"events.events.k8s.io"`); the core group wins for a bare `events`.
pub fn by_name(name: &str) -> &'static Resource {
    RESOURCES
        .iter()
        .find(|r| r.plural == name || format!("{}.{}", r.plural, r.group) == name)
        .unwrap_or_else(|| panic!("the stand-in does not serve {name:?}"))
}

// ---- events.k8s.io/v1 <-> core/v1 -------------------------------------------------------

/// Field renames between the two Event versions (events.k8s.io name, core name), as the
/// server's conversion functions map them.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

fn rename(mut v: Value, from_events: bool) -> Value {
    if let Some(m) = v.as_object_mut() {
        for (ev, core) in EVENT_RENAMES {
            let (from, to) = if from_events { (ev, core) } else { (core, ev) };
            if let Some(x) = m.remove(*from) {
                m.insert((*to).to_owned(), x);
            }
        }
    }
    v
}

fn event_to_events_v1(stored: &Value) -> Value {
    rename(stored.clone(), false)
}

fn event_from_events_v1(obj: Value) -> Value {
    let mut v = rename(obj, true);
    v["apiVersion"] = "v1".into();
    v["kind"] = "Event".into();
    v
}

// ---- defaulting ---------------------------------------------------------------------------

/// Cluster addresses the stand-in hands out, as the server's allocators do.
#[derive(Default)]
pub struct Allocator {
    next_ip: u32,
    next_node_port: u16,
}

impl Allocator {
    fn cluster_ip(&mut self) -> String {
        // 10.96.0.0/12 is kubeadm's default service range; .0.1 is the `kubernetes` Service.
        self.next_ip += 1;
        let n = self.next_ip + 1;
        format!("10.96.{}.{}", n / 256, n % 256)
    }

    fn node_port(&mut self) -> u16 {
        self.next_node_port += 1;
        30000 + self.next_node_port
    }
}

/// What the server fills in on create and update (its defaulting functions and allocators).
/// `old` is the stored object on update.
pub fn default(r: &Resource, obj: &mut Value, old: Option<&Value>, alloc: &mut Allocator) {
    match (r.group, r.plural) {
        ("", "services") => default_service(obj, old, alloc),
        ("discovery.k8s.io", "endpointslices") => {
            for p in obj["ports"].as_array_mut().into_iter().flatten() {
                if p.get("protocol").is_none() {
                    p["protocol"] = "TCP".into();
                }
                if p.get("name").is_none() {
                    p["name"] = "".into();
                }
            }
        }
        ("", "secrets") => {
            if obj.get("type").is_none() {
                obj["type"] = "Opaque".into();
            }
            // `stringData` is write-only: the server merges it into `data` and drops it.
            if let Some(Value::Object(sd)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                if !obj["data"].is_object() {
                    obj["data"] = json!({});
                }
                for (k, v) in sd {
                    obj["data"][k] =
                        base64_encode(v.as_str().unwrap_or_default().as_bytes()).into();
                }
            }
        }
        ("", "namespaces") => {
            if obj["spec"]["finalizers"].is_null() {
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
            }
            if obj["status"]["phase"].is_null() {
                obj["status"]["phase"] = "Active".into();
            }
        }
        _ => {}
    }
}

fn default_service(obj: &mut Value, old: Option<&Value>, alloc: &mut Allocator) {
    let spec = &mut obj["spec"];
    if spec.get("type").is_none() {
        spec["type"] = "ClusterIP".into();
    }
    let ty = spec["type"].as_str().unwrap_or_default().to_owned();
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = "None".into();
    }
    for p in spec["ports"].as_array_mut().into_iter().flatten() {
        if p.get("protocol").is_none() {
            p["protocol"] = "TCP".into();
        }
        if p.get("targetPort").is_none() {
            p["targetPort"] = p["port"].clone();
        }
    }
    if ty == "ExternalName" {
        return;
    }
    // On update an omitted clusterIP keeps the allocated one, as the server's
    // `patchAllocatedValues` does.
    if let Some(old) = old {
        for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if spec.get(f).is_none() && !old["spec"][f].is_null() {
                spec[f] = old["spec"][f].clone();
            }
        }
    }
    if spec.get("clusterIP").is_none() {
        spec["clusterIP"] = alloc.cluster_ip().into();
    }
    if spec.get("clusterIPs").is_none() {
        spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    }
    if spec.get("ipFamilies").is_none() {
        spec["ipFamilies"] = json!(["IPv4"]);
    }
    if spec.get("ipFamilyPolicy").is_none() {
        spec["ipFamilyPolicy"] = "SingleStack".into();
    }
    if spec.get("internalTrafficPolicy").is_none() {
        spec["internalTrafficPolicy"] = "Cluster".into();
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        if spec.get("externalTrafficPolicy").is_none() {
            spec["externalTrafficPolicy"] = "Cluster".into();
        }
        for (i, p) in spec["ports"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if p.get("nodePort").is_none() {
                let kept = old.map(|o| o["spec"]["ports"][i]["nodePort"].clone());
                p["nodePort"] = match kept {
                    Some(v) if !v.is_null() => v,
                    _ => alloc.node_port().into(),
                };
            }
        }
    }
    if ty == "LoadBalancer" && spec.get("allocateLoadBalancerNodePorts").is_none() {
        spec["allocateLoadBalancerNodePorts"] = true.into();
    }
    if obj.get("status").is_none() {
        obj["status"] = json!({"loadBalancer": {}});
    }
    // SetDefaults_Service: a load balancer address without an ipMode is a VIP.
    if ty == "LoadBalancer" {
        let lbs = obj["status"]["loadBalancer"]["ingress"].as_array_mut();
        for lb in lbs.into_iter().flatten() {
            if !s(&lb["ip"]).is_empty() && lb.get("ipMode").is_none() {
                lb["ipMode"] = "VIP".into();
            }
        }
    }
}

// ---- validation ---------------------------------------------------------------------------

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn push_each(errs: &mut Vec<FieldError>, field: &str, value: &str, msgs: Vec<String>) {
    for m in msgs {
        errs.push(FieldError::invalid(field, value, &m));
    }
}

/// The checks of `ValidateObjectMeta` that matter for these resources.
fn validate_meta(r: &Resource, obj: &Value, errs: &mut Vec<FieldError>) {
    let meta = &obj["metadata"];
    let name = s(&meta["name"]);
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        let msgs = match (r.group, r.plural) {
            ("", "services") => dns1035_label(name),
            ("", "namespaces") => dns1123_label(name),
            // Core v1 Events only get the legacy checks, which do not look at the name.
            ("", "events") => Vec::new(),
            _ => dns1123_subdomain(name),
        };
        push_each(errs, "metadata.name", name, msgs);
    }
    if r.namespaced {
        let ns = s(&meta["namespace"]);
        if ns.is_empty() {
            errs.push(FieldError::required("metadata.namespace", ""));
        } else {
            push_each(errs, "metadata.namespace", ns, dns1123_label(ns));
        }
    }
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        push_each(errs, "metadata.labels", k, qualified_name(k));
        let v = s(v);
        push_each(errs, "metadata.labels", v, label_value(v));
    }
    let mut total = 0;
    for (k, v) in meta["annotations"].as_object().into_iter().flatten() {
        push_each(
            errs,
            "metadata.annotations",
            k,
            qualified_name(&k.to_lowercase()),
        );
        total += k.len() + s(v).len();
    }
    if total > 256 * 1024 {
        errs.push(FieldError::too_long("metadata.annotations", 256 * 1024));
    }
}

/// All field errors for a create (`old` is `None`) or an update.
pub fn validate(r: &Resource, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errs = Vec::new();
    validate_meta(r, obj, &mut errs);
    match (r.group, r.plural) {
        ("networking.k8s.io", "ingresses") => validate_ingress(obj, &mut errs),
        ("networking.k8s.io", "ingressclasses") => validate_ingress_class(obj, old, &mut errs),
        ("", "services") => validate_service(obj, old, &mut errs),
        ("discovery.k8s.io", "endpointslices") => validate_endpoint_slice(obj, old, &mut errs),
        ("", "secrets") => validate_secret(obj, old, &mut errs),
        ("coordination.k8s.io", "leases") => validate_lease(obj, &mut errs),
        ("", "events") => validate_event(obj, old, false, &mut errs),
        ("events.k8s.io", "events") => validate_event(obj, old, true, &mut errs),
        _ => {}
    }
    errs
}

fn port_number(errs: &mut Vec<FieldError>, field: &str, v: &Value) {
    let n = v.as_i64().unwrap_or(0);
    if !(1..=65535).contains(&n) {
        errs.push(FieldError::invalid(
            field,
            n,
            "must be between 1 and 65535, inclusive",
        ));
    }
}

/// IANA service names: what named ports must be.
fn port_name(errs: &mut Vec<FieldError>, field: &str, name: &str) {
    let b = name.as_bytes();
    let ok_chars = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    let mut msgs = Vec::new();
    if b.len() > 15 {
        msgs.push("must be no more than 15 characters");
    }
    if !ok_chars {
        msgs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        msgs.push("must not contain consecutive hyphens");
    }
    if !b.iter().any(|c| c.is_ascii_lowercase()) {
        msgs.push("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        msgs.push("must not begin or end with a hyphen");
    }
    for m in msgs {
        errs.push(FieldError::invalid(field, name, m));
    }
}

/// A host of a rule or TLS entry: a DNS subdomain, optionally with one leading `*.`.
fn ingress_host(errs: &mut Vec<FieldError>, field: &str, host: &str) {
    if host.parse::<IpAddr>().is_ok() {
        errs.push(FieldError::invalid(
            field,
            host,
            "must be a DNS name, not an IP address",
        ));
    } else if let Some(rest) = host.strip_prefix("*.") {
        if !dns1123_subdomain(rest).is_empty() {
            errs.push(FieldError::invalid(field, host, "a wildcard DNS-1123 subdomain must start with '*.', followed by a valid DNS subdomain, which must consist of lower case alphanumeric characters, '-' or '.' and end with an alphanumeric character (e.g. '*.example.com', regex used for validation is '\\*\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"));
        }
    } else {
        push_each(errs, field, host, dns1123_subdomain(host));
    }
}

fn ingress_backend(errs: &mut Vec<FieldError>, field: &str, b: &Value) {
    let has_service = !b["service"].is_null();
    let has_resource = !b["resource"].is_null();
    if has_service && has_resource {
        errs.push(FieldError::invalid_raw(
            field,
            "\"\"",
            "cannot set both resource and service backends",
        ));
        return;
    }
    if !has_service && !has_resource {
        errs.push(FieldError::invalid_raw(
            field,
            "\"\"",
            "resource or service backend is required",
        ));
        return;
    }
    if has_resource {
        return;
    }
    let svc = &b["service"];
    let name = s(&svc["name"]);
    let name_field = format!("{field}.service.name");
    if name.is_empty() {
        errs.push(FieldError::required(&name_field, ""));
    } else {
        push_each(errs, &name_field, name, dns1035_label(name));
    }
    let port = &svc["port"];
    let port_field = format!("{field}.service.port");
    let (has_name, has_number) = (
        !s(&port["name"]).is_empty(),
        port["number"].as_i64().unwrap_or(0) != 0,
    );
    match (has_name, has_number) {
        (true, true) => errs.push(FieldError::invalid(
            &port_field,
            port.to_string(),
            "cannot set both port name & port number",
        )),
        (false, false) => errs.push(FieldError::invalid(
            &port_field,
            port.to_string(),
            "port name or number is required",
        )),
        (true, false) => port_name(errs, &format!("{port_field}.name"), s(&port["name"])),
        (false, true) => port_number(errs, &format!("{port_field}.number"), &port["number"]),
    }
}

fn validate_ingress(obj: &Value, errs: &mut Vec<FieldError>) {
    let spec = &obj["spec"];
    let rules = arr(&spec["rules"]);
    if rules.is_empty() && spec["defaultBackend"].is_null() {
        errs.push(FieldError::invalid_raw(
            "spec",
            "[]networking.IngressRule(nil)",
            "either `defaultBackend` or `rules` must be specified",
        ));
    }
    if !spec["defaultBackend"].is_null() {
        ingress_backend(errs, "spec.defaultBackend", &spec["defaultBackend"]);
    }
    for (i, rule) in rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        let host = s(&rule["host"]);
        if !host.is_empty() {
            ingress_host(errs, &format!("{f}.host"), host);
        }
        if rule["http"].is_null() {
            continue;
        }
        let paths = arr(&rule["http"]["paths"]);
        if paths.is_empty() {
            errs.push(FieldError::required(&format!("{f}.http.paths"), ""));
        }
        for (j, p) in paths.iter().enumerate() {
            let pf = format!("{f}.http.paths[{j}]");
            let path = s(&p["path"]);
            // The typed decode turns a missing pathType into "", so both mean unset.
            match p["pathType"].as_str().filter(|t| !t.is_empty()) {
                None => errs.push(FieldError::required(
                    &format!("{pf}.pathType"),
                    "pathType must be specified",
                )),
                Some("Exact") | Some("Prefix") => {
                    if !path.starts_with('/') {
                        errs.push(FieldError::invalid(
                            &format!("{pf}.path"),
                            path,
                            "must be an absolute path",
                        ));
                    }
                    for bad in ["//", "/./", "/../", "%2f", "%2F"] {
                        if path.contains(bad) {
                            errs.push(FieldError::invalid(
                                &format!("{pf}.path"),
                                path,
                                &format!("must not contain '{bad}'"),
                            ));
                        }
                    }
                    for bad in ["/..", "/."] {
                        if path.ends_with(bad) {
                            errs.push(FieldError::invalid(
                                &format!("{pf}.path"),
                                path,
                                &format!("cannot end with '{bad}'"),
                            ));
                        }
                    }
                }
                Some("ImplementationSpecific") => {
                    if !path.is_empty() && !path.starts_with('/') {
                        errs.push(FieldError::invalid(
                            &format!("{pf}.path"),
                            path,
                            "must be an absolute path",
                        ));
                    }
                }
                Some(other) => errs.push(FieldError::not_supported(
                    &format!("{pf}.pathType"),
                    other,
                    &["Exact", "ImplementationSpecific", "Prefix"],
                )),
            }
            ingress_backend(errs, &format!("{pf}.backend"), &p["backend"]);
        }
    }
    for (i, tls) in arr(&spec["tls"]).iter().enumerate() {
        for (j, h) in arr(&tls["hosts"]).iter().enumerate() {
            ingress_host(errs, &format!("spec.tls[{i}].hosts[{j}]"), s(h));
        }
        let secret = s(&tls["secretName"]);
        if !secret.is_empty() {
            push_each(
                errs,
                &format!("spec.tls[{i}].secretName"),
                secret,
                dns1123_subdomain(secret),
            );
        }
    }
    if let Some(class) = spec["ingressClassName"].as_str() {
        push_each(
            errs,
            "spec.ingressClassName",
            class,
            dns1123_subdomain(class),
        );
    }
    for (i, lb) in arr(&obj["status"]["loadBalancer"]["ingress"])
        .iter()
        .enumerate()
    {
        let f = format!("status.loadBalancer.ingress[{i}]");
        if let Some(ip) = lb["ip"].as_str() {
            if ip.parse::<IpAddr>().is_err() {
                errs.push(FieldError::invalid(
                    &format!("{f}.ip"),
                    ip,
                    "must be a valid IP address",
                ));
            }
        }
        if let Some(h) = lb["hostname"].as_str() {
            if h.parse::<IpAddr>().is_ok() {
                errs.push(FieldError::invalid(
                    &format!("{f}.hostname"),
                    h,
                    "must be a DNS name, not an IP address",
                ));
            } else {
                push_each(errs, &format!("{f}.hostname"), h, dns1123_subdomain(h));
            }
        }
    }
}

fn immutable(errs: &mut Vec<FieldError>, field: &str, new: &Value, old: &Value) {
    if new != old {
        let printed = match new {
            Value::String(x) => format!("{x:?}"),
            other => other.to_string(),
        };
        errs.push(FieldError::invalid_raw(
            field,
            &printed,
            "field is immutable",
        ));
    }
}

fn validate_ingress_class(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let c = s(&obj["spec"]["controller"]);
    if c.is_empty() {
        errs.push(FieldError::required("spec.controller", ""));
    } else if c.len() > 250 {
        errs.push(FieldError::too_long("spec.controller", 250));
    } else {
        let ok = c
            .split_once('/')
            .is_some_and(|(domain, path)| dns1123_subdomain(domain).is_empty() && !path.is_empty());
        if !ok {
            errs.push(FieldError::invalid(
                "spec.controller",
                c,
                "must be a domain-prefixed path (such as \"acme.io/foo\")",
            ));
        }
    }
    if let Some(old) = old {
        immutable(
            errs,
            "spec.controller",
            &obj["spec"]["controller"],
            &old["spec"]["controller"],
        );
    }
}

fn validate_service(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let spec = &obj["spec"];
    let ty = s(&spec["type"]);
    if !["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"].contains(&ty) {
        errs.push(FieldError::not_supported(
            "spec.type",
            ty,
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let ports = arr(&spec["ports"]);
    let headless = s(&spec["clusterIP"]) == "None";
    if ty == "ExternalName" {
        let ext = s(&spec["externalName"]);
        if ext.is_empty() {
            errs.push(FieldError::required("spec.externalName", ""));
        } else {
            push_each(errs, "spec.externalName", ext, dns1123_subdomain(ext));
        }
    } else if ports.is_empty() && !headless {
        errs.push(FieldError::required("spec.ports", ""));
    }
    let mut names = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let name = s(&p["name"]);
        if name.is_empty() {
            if ports.len() > 1 {
                errs.push(FieldError::required(&format!("{f}.name"), ""));
            }
        } else {
            push_each(errs, &format!("{f}.name"), name, dns1123_label(name));
            if names.contains(&name) {
                errs.push(FieldError::duplicate(&format!("{f}.name"), name));
            }
            names.push(name);
        }
        port_number(errs, &format!("{f}.port"), &p["port"]);
        let proto = s(&p["protocol"]);
        if !["SCTP", "TCP", "UDP"].contains(&proto) {
            errs.push(FieldError::not_supported(
                &format!("{f}.protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        match &p["targetPort"] {
            Value::String(n) => port_name(errs, &format!("{f}.targetPort"), n),
            other => port_number(errs, &format!("{f}.targetPort"), other),
        }
    }
    for (k, v) in spec["selector"].as_object().into_iter().flatten() {
        push_each(errs, "spec.selector", k, qualified_name(k));
        push_each(errs, "spec.selector", s(v), label_value(s(v)));
    }
    let ip = s(&spec["clusterIP"]);
    if !ip.is_empty() && ip != "None" && ip.parse::<IpAddr>().is_err() {
        errs.push(FieldError::invalid(
            "spec.clusterIPs[0]",
            ip,
            "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
        ));
    }
    if let Some(old) = old {
        if s(&old["spec"]["type"]) != "ExternalName" && ty != "ExternalName" {
            immutable(
                errs,
                "spec.clusterIPs[0]",
                &spec["clusterIP"],
                &old["spec"]["clusterIP"],
            );
        }
    }
    // Only a write that changes the status is checked: an update of the main resource
    // keeps the stored status, which the server does not check again.
    if old.is_none_or(|o| o["status"] != obj["status"]) {
        validate_service_lb_status(obj, ty, errs);
    }
}

/// `ValidateLoadBalancerStatus`, with the LoadBalancerIPMode gate on (GA) and
/// AllowServiceLBStatusOnNonLB off (its default).
fn validate_service_lb_status(obj: &Value, ty: &str, errs: &mut Vec<FieldError>) {
    let lbs = arr(&obj["status"]["loadBalancer"]["ingress"]);
    if ty != "LoadBalancer" && !lbs.is_empty() {
        errs.push(FieldError::forbidden(
            "status.loadBalancer.ingress",
            "may only be used when `spec.type` is 'LoadBalancer'",
        ));
        return;
    }
    for (i, lb) in lbs.iter().enumerate() {
        let f = format!("status.loadBalancer.ingress[{i}]");
        let ip = s(&lb["ip"]);
        if !ip.is_empty() && ip.parse::<IpAddr>().is_err() {
            errs.push(FieldError::invalid(
                &format!("{f}.ip"),
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
        match lb["ipMode"].as_str() {
            None if !ip.is_empty() => errs.push(FieldError::required(
                &format!("{f}.ipMode"),
                "must be specified when `ip` is set",
            )),
            None => {}
            Some(_) if ip.is_empty() => errs.push(FieldError::forbidden(
                &format!("{f}.ipMode"),
                "may not be specified when `ip` is not set",
            )),
            Some(m) if m != "Proxy" && m != "VIP" => errs.push(FieldError::not_supported(
                &format!("{f}.ipMode"),
                m,
                &["Proxy", "VIP"],
            )),
            Some(_) => {}
        }
        let h = s(&lb["hostname"]);
        if !h.is_empty() {
            push_each(errs, &format!("{f}.hostname"), h, dns1123_subdomain(h));
            if h.parse::<IpAddr>().is_ok() {
                errs.push(FieldError::invalid(
                    &format!("{f}.hostname"),
                    h,
                    "must be a DNS name, not an IP address",
                ));
            }
        }
    }
}

/// `ValidateNonSpecialIP`: what the server refuses as an endpoint address.
fn non_special_ip(errs: &mut Vec<FieldError>, field: &str, addr: &str, family: &str) {
    let ip: IpAddr = match addr.parse() {
        Ok(ip) => ip,
        Err(_) => {
            let msg = if family == "IPv4" {
                "must be a valid IPv4 address"
            } else {
                "must be a valid IPv6 address"
            };
            errs.push(FieldError::invalid(field, addr, msg));
            return;
        }
    };
    match (family, ip) {
        ("IPv4", IpAddr::V6(_)) => {
            errs.push(FieldError::invalid(
                field,
                addr,
                "must be a valid IPv4 address",
            ));
            return;
        }
        ("IPv6", IpAddr::V4(_)) => {
            errs.push(FieldError::invalid(
                field,
                addr,
                "must be a valid IPv6 address",
            ));
            return;
        }
        _ => {}
    }
    let (unspecified, loopback, link_local, ll_multicast) = match ip {
        IpAddr::V4(v4) => (
            v4.is_unspecified(),
            v4.is_loopback(),
            v4.is_link_local(),
            v4.octets()[..3] == [224, 0, 0],
        ),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            (
                v6.is_unspecified(),
                v6.is_loopback(),
                seg[0] & 0xffc0 == 0xfe80,
                seg[0] & 0xff0f == 0xff02,
            )
        }
    };
    if unspecified {
        errs.push(FieldError::invalid(
            field,
            addr,
            &format!("may not be unspecified ({addr})"),
        ));
    }
    if loopback {
        errs.push(FieldError::invalid(
            field,
            addr,
            "may not be in the loopback range (127.0.0.0/8, ::1/128)",
        ));
    }
    if link_local {
        errs.push(FieldError::invalid(
            field,
            addr,
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ));
    }
    if ll_multicast {
        errs.push(FieldError::invalid(
            field,
            addr,
            "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)",
        ));
    }
}

fn validate_endpoint_slice(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let family = s(&obj["addressType"]);
    let families = ["FQDN", "IPv4", "IPv6"];
    if family.is_empty() {
        errs.push(FieldError::required("addressType", ""));
    } else if !families.contains(&family) {
        errs.push(FieldError::not_supported("addressType", family, &families));
    }
    let endpoints = arr(&obj["endpoints"]);
    if endpoints.len() > 1000 {
        errs.push(FieldError::too_many("endpoints", endpoints.len(), 1000));
    }
    for (i, ep) in endpoints.iter().enumerate().take(1000) {
        let f = format!("endpoints[{i}].addresses");
        let addrs = arr(&ep["addresses"]);
        if addrs.is_empty() {
            errs.push(FieldError::required(&f, "must contain at least 1 address"));
        } else if addrs.len() > 100 {
            errs.push(FieldError::too_many(&f, addrs.len(), 100));
        }
        for (j, a) in addrs.iter().enumerate() {
            let af = format!("{f}[{j}]");
            let a = s(a);
            match family {
                "IPv4" | "IPv6" => non_special_ip(errs, &af, a, family),
                "FQDN" => {
                    let msgs = dns1123_subdomain(a);
                    if !msgs.is_empty() || !a.contains('.') {
                        errs.push(FieldError::invalid(
                            &af,
                            a,
                            "should be a domain with at least two segments separated by dots",
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some(h) = ep["hostname"].as_str() {
            push_each(
                errs,
                &format!("endpoints[{i}].hostname"),
                h,
                dns1123_label(h),
            );
        }
    }
    let mut names = Vec::new();
    for (i, p) in arr(&obj["ports"]).iter().enumerate() {
        let f = format!("ports[{i}]");
        let name = s(&p["name"]);
        if !name.is_empty() {
            push_each(errs, &format!("{f}.name"), name, dns1123_label(name));
        }
        if names.contains(&name) {
            errs.push(FieldError::duplicate(&format!("{f}.name"), name));
        } else {
            names.push(name);
        }
        let proto = s(&p["protocol"]);
        if !["SCTP", "TCP", "UDP"].contains(&proto) {
            errs.push(FieldError::not_supported(
                &format!("{f}.protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            ));
        }
        if let Some(ap) = p["appProtocol"].as_str() {
            push_each(errs, &format!("{f}.appProtocol"), ap, qualified_name(ap));
        }
    }
    if let Some(old) = old {
        immutable(
            errs,
            "addressType",
            &obj["addressType"],
            &old["addressType"],
        );
    }
}

fn validate_secret(obj: &Value, old: Option<&Value>, errs: &mut Vec<FieldError>) {
    let data = obj["data"].as_object().cloned().unwrap_or_default();
    let mut total = 0;
    for (k, v) in &data {
        let ok = !k.is_empty()
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && k != "."
            && k != ".."
            && !k.starts_with("..");
        if !ok {
            errs.push(FieldError::invalid(&format!("data[{k}]"), k.as_str(), "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
        }
        total += s(v).len() * 3 / 4;
    }
    if total > 1024 * 1024 {
        errs.push(FieldError::too_long("data", 1024 * 1024));
    }
    if s(&obj["type"]) == "kubernetes.io/tls" {
        for key in ["tls.crt", "tls.key"] {
            if !data.contains_key(key) {
                errs.push(FieldError::required(&format!("data[{key}]"), ""));
            }
        }
    }
    if let Some(old) = old {
        immutable(errs, "type", &obj["type"], &old["type"]);
        if old["immutable"] == Value::Bool(true) {
            if obj["immutable"] != Value::Bool(true) {
                errs.push(FieldError::forbidden(
                    "immutable",
                    "field is immutable when `immutable` is set",
                ));
            }
            if obj["data"] != old["data"] {
                errs.push(FieldError::forbidden(
                    "data",
                    "field is immutable when `immutable` is set",
                ));
            }
        }
    }
}

fn validate_lease(obj: &Value, errs: &mut Vec<FieldError>) {
    let spec = &obj["spec"];
    if let Some(d) = spec["leaseDurationSeconds"].as_i64() {
        if d <= 0 {
            errs.push(FieldError::invalid(
                "spec.leaseDurationSeconds",
                d,
                "must be greater than 0",
            ));
        }
    }
    if let Some(t) = spec["leaseTransitions"].as_i64() {
        if t < 0 {
            errs.push(FieldError::invalid(
                "spec.leaseTransitions",
                t,
                "must be greater than or equal to 0",
            ));
        }
    }
}

/// `ValidateEventCreate`/`ValidateEventUpdate`, on the stored (core) form. `strict` is a write
/// through events.k8s.io/v1, which adds the newer rules.
fn validate_event(obj: &Value, old: Option<&Value>, strict: bool, errs: &mut Vec<FieldError>) {
    let ns = s(&obj["metadata"]["namespace"]);
    let involved_ns = s(&obj["involvedObject"]["namespace"]);
    let has_time = !s(&obj["eventTime"]).is_empty();
    let mismatch = || {
        FieldError::invalid(
            "involvedObject.namespace",
            involved_ns,
            "does not match event.namespace",
        )
    };
    if !has_time {
        if involved_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                errs.push(mismatch());
            }
        } else if ns != involved_ns {
            errs.push(mismatch());
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            errs.push(mismatch());
        }
        let rc = s(&obj["reportingComponent"]);
        if rc.is_empty() {
            errs.push(FieldError::required("reportingController", ""));
        }
        push_each(errs, "reportingController", rc, qualified_name(rc));
        for (field, key, limit) in [
            ("reportingInstance", "reportingInstance", 128),
            ("action", "action", 128),
            ("reason", "reason", 128),
        ] {
            let v = s(&obj[key]);
            if v.is_empty() {
                errs.push(FieldError::required(field, ""));
            }
            if v.len() > limit {
                errs.push(FieldError::invalid(
                    field,
                    "",
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if s(&obj["message"]).len() > 1024 {
            errs.push(FieldError::invalid(
                "message",
                "",
                "can have at most 1024 characters",
            ));
        }
    }
    if !strict {
        return;
    }
    let series_changed = old.is_none_or(|o| o["series"] != obj["series"]);
    if series_changed && !obj["series"].is_null() {
        if obj["series"]["count"].as_i64().unwrap_or(0) < 2 {
            errs.push(FieldError::invalid(
                "series.count",
                "",
                "should be at least 2",
            ));
        }
        if s(&obj["series"]["lastObservedTime"]).is_empty() {
            errs.push(FieldError::required("series.lastObservedTime", ""));
        }
    }
    if let Some(old) = old {
        for f in [
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ] {
            immutable(errs, f, &obj[f], &old[f]);
        }
        return;
    }
    if !has_time {
        errs.push(FieldError::required("eventTime", ""));
    }
    let ty = s(&obj["type"]);
    if ty != "Normal" && ty != "Warning" {
        errs.push(FieldError::invalid(
            "type",
            "",
            &format!("has invalid value: {ty}"),
        ));
    }
    for f in ["firstTimestamp", "lastTimestamp"] {
        if !s(&obj[f]).is_empty() {
            errs.push(FieldError::invalid(f, "", "needs to be unset"));
        }
    }
    if obj["count"].as_i64().unwrap_or(0) != 0 {
        errs.push(FieldError::invalid("count", "", "needs to be unset"));
    }
    if !s(&obj["source"]["component"]).is_empty() || !s(&obj["source"]["host"]).is_empty() {
        errs.push(FieldError::invalid("source", "", "needs to be unset"));
    }
}

/// Whether an update changes what `metadata.generation` counts: everything outside metadata
/// and status (plus labels for EndpointSlices, whose strategy counts them too).
pub fn spec_changed(r: &Resource, new: &Value, old: &Value) -> bool {
    let strip = |v: &Value| -> Map<String, Value> {
        let mut m = v.as_object().cloned().unwrap_or_default();
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(k);
        }
        m
    };
    let labels_count =
        r.plural == "endpointslices" && new["metadata"]["labels"] != old["metadata"]["labels"];
    strip(new) != strip(old) || labels_count
}

/// Labels of a stored object, for label selectors.
pub fn labels(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), s(v).to_owned()))
        .collect()
}
