//! Watches of the Kubernetes API: one kube-runtime watcher per kind and namespace, each
//! feeding one channel that the controller loop reads. The watcher lists, then watches from
//! the list's resourceVersion, re-lists after `410 Gone` and backs off on errors; this
//! module turns each (re-)list into one [`Update::Listed`] so the controller can replace
//! what it knew at once.

use std::fmt::Debug;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::cluster::{Kind, Object};

/// What a watch reports to the controller.
#[derive(Debug)]
pub enum Update {
    /// An object was added or changed.
    Apply(Object),
    /// An object was deleted.
    Delete(Object),
    /// A complete (re-)list: these are all the objects of `kind` in `namespace`.
    Listed {
        /// The kind listed.
        kind: Kind,
        /// The namespace listed; `None` for all namespaces or cluster-scoped kinds.
        namespace: Option<String>,
        /// Every object.
        objects: Vec<Object>,
    },
}

/// One watch: a kind in a namespace (or everywhere).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchId {
    /// The kind.
    pub kind: Kind,
    /// The namespace, or `None` for all namespaces.
    pub namespace: Option<String>,
}

/// Starts every watch and returns their ids (each reports one [`Update::Listed`] when its
/// first list completes) and the channel they all send to. Without `ingresses`, only
/// Services and EndpointSlices are watched.
pub fn start(
    client: &Client,
    namespaces: &[String],
    ingresses: bool,
) -> (Vec<WatchId>, mpsc::Receiver<Update>) {
    let (tx, rx) = mpsc::channel(1024);
    let mut ids = Vec::new();
    if ingresses {
        spawn::<IngressClass>(
            Api::all(client.clone()),
            watcher::Config::default(),
            Kind::IngressClass,
            None,
            |o| Object::IngressClass(Arc::new(o)),
            &tx,
            &mut ids,
        );
    }
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    for ns in scopes {
        let namespace = ns.map(str::to_owned);
        let c = client;
        if ingresses {
            spawn::<Ingress>(
                scoped(c, ns),
                watcher::Config::default(),
                Kind::Ingress,
                namespace.clone(),
                |o| Object::Ingress(Arc::new(o)),
                &tx,
                &mut ids,
            );
        }
        spawn::<Service>(
            scoped(c, ns),
            watcher::Config::default(),
            Kind::Service,
            namespace.clone(),
            |o| Object::Service(Arc::new(o)),
            &tx,
            &mut ids,
        );
        spawn::<EndpointSlice>(
            scoped(c, ns),
            // Only slices managed for a Service carry the label that joins them to it.
            watcher::Config::default().labels(super::cluster::SERVICE_NAME_LABEL),
            Kind::EndpointSlice,
            namespace.clone(),
            |o| Object::EndpointSlice(Arc::new(o)),
            &tx,
            &mut ids,
        );
        if ingresses {
            spawn::<Secret>(
                scoped(c, ns),
                // TLS Secrets only: Strait has no business reading any other Secret.
                watcher::Config::default().fields("type=kubernetes.io/tls"),
                Kind::Secret,
                namespace,
                |o| Object::Secret(Arc::new(o)),
                &tx,
                &mut ids,
            );
        }
    }
    (ids, rx)
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    namespace: Option<String>,
    wrap: fn(K) -> Object,
    tx: &mpsc::Sender<Update>,
    ids: &mut Vec<WatchId>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    ids.push(WatchId {
        kind,
        namespace: namespace.clone(),
    });
    let tx = tx.clone();
    tokio::spawn(async move {
        let scope = namespace.as_deref().unwrap_or("*").to_owned();
        // managedFields can be most of an object's size and Strait never reads them.
        let mut stream = watcher(api, config)
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .boxed();
        let mut listing: Vec<Object> = Vec::new();
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(Event::Apply(o)) => Update::Apply(wrap(o)),
                Ok(Event::Delete(o)) => Update::Delete(wrap(o)),
                Ok(Event::Init) => {
                    listing.clear();
                    continue;
                }
                Ok(Event::InitApply(o)) => {
                    listing.push(wrap(o));
                    continue;
                }
                Ok(Event::InitDone) => {
                    tracing::debug!(?kind, namespace = %scope, objects = listing.len(), "listed");
                    Update::Listed {
                        kind,
                        namespace: namespace.clone(),
                        objects: std::mem::take(&mut listing),
                    }
                }
                Err(e) => {
                    metrics::counter!(crate::kubernetes::WATCH_ERRORS, "kind" => format!("{kind:?}"))
                        .increment(1);
                    tracing::warn!(?kind, namespace = %scope, error = %e, "watch failed; retrying with backoff");
                    continue;
                }
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    });
}
