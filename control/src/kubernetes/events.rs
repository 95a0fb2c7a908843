//! Kubernetes Events on Ingresses Strait cannot serve (whole or in part), and on Services
//! whose TCP service annotations it cannot follow, so `kubectl describe` says why.
//!
//! Events are only ever created (RBAC: `create` on `events.k8s.io` events), never patched:
//! the controller reports a problem once per Ingress generation and message, which keeps
//! the count of API calls bounded however often tables are rebuilt. kube-runtime's
//! `Recorder` would patch repeats into a series, which needs `patch` as well.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::translate::CONTROLLER;

/// The Event API's limit on `note`.
const MAX_NOTE: usize = 1024;

/// One Event to create.
#[derive(Debug)]
pub struct Report {
    /// The object it is about.
    pub regarding: ObjectReference,
    /// Normal or Warning.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable text.
    pub note: String,
}

/// Creates Events from a queue, off the controller loop: a slow API server delays Events,
/// never tables.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Report>,
}

impl EventSink {
    /// Starts the task that creates the Events, reporting as `instance` (the pod name).
    pub fn start(client: Client, instance: String) -> Self {
        // Bounded: when the API server is far behind, dropping Events beats growing memory.
        let (tx, mut rx) = mpsc::channel::<Report>(256);
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                create(&client, &instance, r).await;
            }
        });
        Self { tx }
    }

    /// Queues an Event; dropped (with a log line) if the queue is full.
    pub fn report(&self, report: Report) {
        if let Err(e) = self.tx.try_send(report) {
            tracing::warn!(error = %e, "event queue full; event dropped");
        }
    }
}

impl Report {
    /// A reference to `ingress` for [`Report::regarding`].
    pub fn ingress(ingress: &Ingress) -> ObjectReference {
        let meta = &ingress.metadata;
        ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("Ingress".into()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            field_path: None,
        }
    }

    /// A reference to the Service `namespace/name` for [`Report::regarding`]; with its uid,
    /// `kubectl describe service` lists the Event.
    pub fn service(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid,
            resource_version: None,
            field_path: None,
        }
    }
}

async fn create(client: &Client, instance: &str, r: Report) {
    let namespace = r.regarding.namespace.clone().unwrap_or_default();
    let name = r.regarding.name.clone().unwrap_or_default();
    let kind = r.regarding.kind.clone().unwrap_or_default().to_lowercase();
    let now = Timestamp::now();
    let reason = r.reason;
    let mut note = r.note;
    if note.len() > MAX_NOTE {
        let mut end = MAX_NOTE - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let event = Event {
        metadata: ObjectMeta {
            // Unique per object and instant, as kubectl and client-go name theirs.
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some("Translate".into()),
        reason: Some(reason.clone()),
        note: Some(note),
        type_: Some(if r.warning { "Warning" } else { "Normal" }.into()),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(instance.to_owned()),
        regarding: Some(r.regarding),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => {
            tracing::debug!(object = %format!("{kind} {namespace}/{name}"), reason = %reason, "event created")
        }
        Err(e) => tracing::warn!(
            object = %format!("{kind} {namespace}/{name}"),
            reason = %reason,
            error = %e,
            "cannot create event"
        ),
    }
}
