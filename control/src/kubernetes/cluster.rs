//! The controller's view of the cluster: the watched objects, indexed the way translation
//! reads them. One task owns it and applies watch events to it; translation only reads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::ResourceExt;

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of a namespaced object (namespace empty for cluster-scoped ones).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// The key of `obj`.
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        Self {
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name: obj.meta().name.clone().unwrap_or_default(),
        }
    }

    /// A key from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which kind of object a change touched, so the caller can tell endpoint-only changes
/// (cheap) from the rest (a full translation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `networking.k8s.io/v1` IngressClass.
    IngressClass,
    /// `networking.k8s.io/v1` Ingress.
    Ingress,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Secret (TLS).
    Secret,
}

/// Every watched object.
#[derive(Debug, Default, Clone)]
pub struct Cluster {
    /// IngressClasses by name.
    pub classes: BTreeMap<String, Arc<IngressClass>>,
    /// Ingresses.
    pub ingresses: BTreeMap<Key, Arc<Ingress>>,
    /// Services, as the few fields translation reads.
    pub services: BTreeMap<Key, Svc>,
    /// EndpointSlices by their own key, as the few fields translation reads (the full
    /// objects were most of the memory the controller held).
    pub slices: HashMap<Key, Slice>,
    /// Slice names by the key of the Service they belong to.
    pub slices_by_service: HashMap<Key, BTreeSet<String>>,
    /// TLS Secrets.
    pub secrets: BTreeMap<Key, Arc<Secret>>,
}

/// An object of one of the watched kinds.
#[derive(Debug, Clone)]
pub enum Object {
    /// An IngressClass.
    IngressClass(Arc<IngressClass>),
    /// An Ingress.
    Ingress(Arc<Ingress>),
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A Secret.
    Secret(Arc<Secret>),
}

impl Object {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::IngressClass(_) => Kind::IngressClass,
            Self::Ingress(_) => Kind::Ingress,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Secret(_) => Kind::Secret,
        }
    }
}

impl Cluster {
    /// Adds or replaces an object.
    pub fn apply(&mut self, obj: Object) {
        match obj {
            Object::IngressClass(c) => {
                self.classes.insert(c.name_any(), c);
            }
            Object::Ingress(i) => {
                self.ingresses.insert(Key::of(&*i), i);
            }
            Object::Service(s) => {
                self.services.insert(Key::of(&*s), Svc::from_object(&s));
            }
            Object::EndpointSlice(s) => {
                let key = Key::of(&*s);
                if let Some(old) = self.slices.get(&key) {
                    // A slice's service label is immutable in practice, but nothing forbids
                    // relabelling: unlink it from its old Service first.
                    if let Some(svc) = old.service.clone() {
                        self.unlink_slice(&svc, &key.name);
                    }
                }
                if let Some(svc) = service_of(&s) {
                    self.slices_by_service
                        .entry(svc)
                        .or_default()
                        .insert(key.name.clone());
                }
                self.slices.insert(key, Slice::from_object(&s));
            }
            Object::Secret(s) => {
                self.secrets.insert(Key::of(&*s), s);
            }
        }
    }

    /// Removes an object.
    pub fn delete(&mut self, obj: &Object) {
        match obj {
            Object::IngressClass(c) => {
                self.classes.remove(&c.name_any());
            }
            Object::Ingress(i) => {
                self.ingresses.remove(&Key::of(&**i));
            }
            Object::Service(s) => {
                self.services.remove(&Key::of(&**s));
            }
            Object::EndpointSlice(s) => {
                let key = Key::of(&**s);
                if let Some(old) = self.slices.remove(&key) {
                    if let Some(svc) = &old.service {
                        self.unlink_slice(svc, &key.name);
                    }
                }
            }
            Object::Secret(s) => {
                self.secrets.remove(&Key::of(&**s));
            }
        }
    }

    /// Replaces every object of `kind` in `namespace` (all namespaces when `None`) with
    /// `objects`: the result of a (re-)list, after which objects not listed are gone.
    pub fn replace(&mut self, kind: Kind, namespace: Option<&str>, objects: Vec<Object>) {
        let in_scope = |ns: &str| namespace.is_none_or(|n| n == ns);
        match kind {
            Kind::IngressClass => self.classes.clear(),
            Kind::Ingress => self.ingresses.retain(|k, _| !in_scope(&k.namespace)),
            Kind::Service => self.services.retain(|k, _| !in_scope(&k.namespace)),
            Kind::EndpointSlice => {
                self.slices.retain(|k, _| !in_scope(&k.namespace));
                self.slices_by_service
                    .retain(|k, _| !in_scope(&k.namespace));
            }
            Kind::Secret => self.secrets.retain(|k, _| !in_scope(&k.namespace)),
        }
        for o in objects {
            self.apply(o);
        }
    }

    /// The EndpointSlices of a Service.
    pub fn slices_of<'a>(&'a self, service: &'a Key) -> impl Iterator<Item = &'a Slice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.slices.get(&Key::new(&service.namespace, name)))
    }

    fn unlink_slice(&mut self, svc: &Key, slice: &str) {
        if let Some(set) = self.slices_by_service.get_mut(svc) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(svc);
            }
        }
    }
}

/// What translation reads of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Svc {
    /// `metadata.uid`, for Events about the Service.
    pub uid: Option<String>,
    /// `spec.type`.
    pub type_: Option<String>,
    /// `spec.externalName`.
    pub external_name: Option<String>,
    /// `spec.sessionAffinity`.
    pub session_affinity: Option<String>,
    /// `spec.ports`.
    pub ports: Vec<SvcPort>,
    /// `strait.io/tcp-port`.
    pub tcp_port: Option<String>,
    /// `strait.io/tcp-service-port`.
    pub tcp_service_port: Option<String>,
}

/// A port of a [`Svc`], as the Service spec has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvcPort {
    /// Its name.
    pub name: Option<String>,
    /// Its number.
    pub port: i32,
    /// Its protocol (TCP when unset).
    pub protocol: Option<String>,
    /// Its application protocol.
    pub app_protocol: Option<String>,
}

impl Svc {
    /// The fields of `svc` translation reads.
    pub fn from_object(svc: &Service) -> Self {
        let spec = svc.spec.as_ref();
        let annotation = |name: &str| {
            svc.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(name))
                .cloned()
        };
        Self {
            uid: svc.metadata.uid.clone(),
            type_: spec.and_then(|s| s.type_.clone()),
            external_name: spec.and_then(|s| s.external_name.clone()),
            session_affinity: spec.and_then(|s| s.session_affinity.clone()),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| SvcPort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            tcp_port: annotation(super::translate::TCP_PORT_ANNOTATION),
            tcp_service_port: annotation(super::translate::TCP_SERVICE_PORT_ANNOTATION),
        }
    }
}

/// What translation reads of an EndpointSlice: its Service, its ports and the endpoints
/// that can take traffic, addresses parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// The Service it belongs to, by [`SERVICE_NAME_LABEL`].
    pub service: Option<Key>,
    /// Ports: name (empty when unnamed), TCP or not, number.
    pub ports: Vec<SlicePort>,
    /// Endpoints that are ready, or serving while terminating, by their first address;
    /// empty unless the address type is IPv4 or IPv6.
    pub endpoints: Vec<SliceEndpoint>,
}

/// A port of a [`Slice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name, empty when unnamed.
    pub name: String,
    /// Its protocol is TCP (the default).
    pub tcp: bool,
    /// The target port number, when given.
    pub port: Option<i32>,
}

/// An endpoint of a [`Slice`] that can take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its first address (consumers use the first; the others belong to the same pod).
    pub ip: IpAddr,
    /// Ready; else serving while terminating (kube-proxy's fallback).
    pub ready: bool,
}

impl Slice {
    /// The fields of `slice` translation reads.
    pub fn from_object(slice: &EndpointSlice) -> Self {
        let ip_family = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let endpoints = slice
            .endpoints
            .iter()
            .filter(|_| ip_family)
            .filter_map(|ep| {
                let ip = ep.addresses.first()?.parse::<IpAddr>().ok()?;
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                (ready || (serving && terminating)).then_some(SliceEndpoint { ip, ready })
            })
            .collect();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.clone().unwrap_or_default(),
                tcp: p.protocol.as_deref().unwrap_or("TCP") == "TCP",
                port: p.port,
            })
            .collect();
        Self {
            service: service_of(slice),
            ports,
            endpoints,
        }
    }
}

/// The Service an EndpointSlice belongs to, by its label.
pub fn service_of(slice: &EndpointSlice) -> Option<Key> {
    let name = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(Key::new(
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        name,
    ))
}
