//! Writes `status.loadBalancer.ingress` on the Ingresses Strait serves, so that tools that
//! read it (external-dns, Argo CD health checks, `kubectl get ingress`) learn where they
//! are reachable.
//!
//! Only the elected leader writes, so replicas do not fight over the field. The addresses
//! come from a [`PublishSource`]; the Ingresses from the Kubernetes source, as [`Served`].
//! A write happens only where an Ingress's status differs from the addresses, and when an
//! Ingress stops being served its status is cleared, but only if it still holds what
//! Strait wrote there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{Ingress, IngressLoadBalancerIngress};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the addresses written to Ingress statuses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishSource {
    /// Copy `status.loadBalancer.ingress` of this Service (the one in front of Strait).
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
    },
    /// Fixed addresses: each one that parses as an IP address is published as `ip`, any
    /// other as `hostname`.
    Addresses(Vec<String>),
    /// Strait does not write Ingress statuses.
    None,
}

/// The Ingresses Strait serves right now, as the Kubernetes source's watch sees them.
///
/// Plain data, built from the Ingress store on every change and sent whole: the writer
/// compares it with what it wrote, so sending an unchanged set costs no API calls. Order
/// does not matter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Served {
    /// One entry per served Ingress.
    pub ingresses: Vec<ServedIngress>,
}

/// One served Ingress and its status as last seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServedIngress {
    /// The Ingress's namespace.
    pub namespace: String,
    /// The Ingress's name.
    pub name: String,
    /// Its `status.loadBalancer.ingress` as the watch last saw it (empty when unset). It
    /// may lag behind the writer's own writes; the writer allows for that.
    pub current: Vec<IngressLoadBalancerIngress>,
}

impl ServedIngress {
    /// The entry for an Ingress from the watch.
    pub fn from_ingress(ingress: &Ingress) -> Self {
        Self {
            namespace: ingress.metadata.namespace.clone().unwrap_or_default(),
            name: ingress.metadata.name.clone().unwrap_or_default(),
            current: ingress
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default(),
        }
    }
}

/// Keeps Ingress statuses in line with the published addresses; see [`StatusWriter::run`].
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    source: PublishSource,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

type Key = (String, String);
type Addresses = Vec<IngressLoadBalancerIngress>;

/// Status writes in flight at once; enough to bring a few thousand Ingresses in line
/// quickly after a takeover without a burst the API server's priority and fairness
/// would have to throttle.
const CONCURRENT_WRITES: usize = 8;
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// An Ingress whose status we know to hold the published addresses.
#[derive(Debug)]
struct Claim {
    /// The addresses it holds (written by us or by an earlier leader).
    holds: Addresses,
    /// The `current` our write replaced, while the watch may still show it: seeing it
    /// again is lag, not someone undoing the write. `None` when we found it already right.
    replaced: Option<Addresses>,
}

enum Job {
    /// Write the addresses over `current`.
    Set { key: Key, current: Addresses },
    /// No longer served: clear the status if it still holds these addresses.
    Clear { key: Key, holds: Addresses },
}

enum Outcome {
    /// Written, or found already right.
    Done,
    /// The Ingress is gone, or its status is no longer ours to clear.
    Forget,
    /// Refused as invalid: retrying the same write cannot help.
    Refused,
    /// Worth retrying.
    Failed,
    /// Not leader any more when its turn came.
    Skipped,
}

impl StatusWriter {
    /// A writer publishing the addresses `source` gives.
    pub fn new(client: Client, source: PublishSource) -> Self {
        Self { client, source }
    }

    /// Writes statuses while `leader` is `true`, until `shutdown` completes. Rewrites on
    /// every change of `served`, of the published addresses and of leadership; failed
    /// writes are retried with backoff, and an Ingress deleted meanwhile is skipped.
    ///
    /// A closed `leader` channel counts as not leading; a closed `served` channel keeps
    /// its last value.
    pub async fn run(
        self,
        mut leader: watch::Receiver<bool>,
        mut served: watch::Receiver<Arc<Served>>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let (mut addresses, mut services) = match &self.source {
            PublishSource::None => return shutdown.await,
            PublishSource::Addresses(list) => (Some(fixed_addresses(list)), None),
            PublishSource::Service { namespace, name } => {
                (None, Some(self.watch_service(namespace, name)))
            }
        };
        let (mut leader_open, mut served_open) = (true, true);
        let mut claims: HashMap<Key, Claim> = HashMap::new();
        // The Service as a relist finds it, applied once the relist is complete.
        let mut relisting: Option<Option<Addresses>> = None;
        let mut retry_at: Option<Instant> = None;
        let mut failures: u32 = 0;
        let mut dirty = true;
        loop {
            let leading = leader_open && *leader.borrow_and_update();
            if dirty && leading {
                if let Some(desired) = &addresses {
                    let snapshot = Arc::clone(&served.borrow_and_update());
                    let pass = self.reconcile(&mut claims, &snapshot, desired, || {
                        leader_open && *leader.borrow()
                    });
                    let Some(ok) = run_until(pass, &mut shutdown).await else {
                        return;
                    };
                    if ok {
                        failures = 0;
                        retry_at = None;
                    } else {
                        failures += 1;
                        let delay = RETRY_FIRST
                            .saturating_mul(1u32 << failures.clamp(1, 16).saturating_sub(1))
                            .min(RETRY_MAX);
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            dirty = false;
            tokio::select! {
                () = &mut shutdown => return,
                r = leader.changed(), if leader_open => {
                    leader_open = r.is_ok();
                    dirty = true;
                }
                r = served.changed(), if served_open => {
                    served_open = r.is_ok();
                    dirty = served_open;
                }
                event = next_event(&mut services) => {
                    let update = match event {
                        Ok(watcher::Event::Init) => {
                            relisting = Some(None);
                            None
                        }
                        Ok(watcher::Event::InitApply(svc)) => {
                            relisting = Some(Some(service_addresses(&svc)));
                            None
                        }
                        Ok(watcher::Event::InitDone) => relisting.take().map(|found| (found, true)),
                        Ok(watcher::Event::Apply(svc)) => Some((Some(service_addresses(&svc)), false)),
                        Ok(watcher::Event::Delete(_)) => Some((None, false)),
                        Err(e) => {
                            tracing::warn!(source = ?self.source, error = %e, "watching the publish Service failed; retrying");
                            None
                        }
                    };
                    if let Some((found, relisted)) = update {
                        if found.is_none() && (addresses.is_some() || relisted) {
                            // Keep what the Ingresses show rather than clear them over what
                            // may be a Service being recreated or a wrong name.
                            tracing::warn!(source = ?self.source, "the publish Service does not exist; Ingress statuses are left as they are");
                        }
                        if found != addresses {
                            addresses = found;
                            dirty = true;
                        }
                    }
                }
                () = sleep_until_opt(retry_at) => {
                    retry_at = None;
                    dirty = true;
                }
            }
        }
    }

    /// Why a watch rather than a poll: the Service's load balancer address usually
    /// arrives some time after Strait starts (the cloud provisions it), and a watch passes
    /// it on within a round trip, where a poll would add its period and steady requests
    /// from every replica. The watch is on that one object (field selector on the name),
    /// so it costs one idle connection; kube-runtime's watcher resumes it across
    /// disconnects and expired resourceVersions, with backoff on errors. Every replica
    /// watches, not only the leader, so a new leader has the addresses at once.
    fn watch_service(
        &self,
        namespace: &str,
        name: &str,
    ) -> BoxStream<'static, Result<watcher::Event<Service>, watcher::Error>> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        watcher(api, config).default_backoff().boxed()
    }

    /// Brings every served Ingress in line with `desired` and clears the ones that left.
    /// Returns false if some write should be retried.
    async fn reconcile(
        &self,
        claims: &mut HashMap<Key, Claim>,
        served: &Served,
        desired: &Addresses,
        leading: impl Fn() -> bool,
    ) -> bool {
        let mut jobs = Vec::new();
        let mut seen: HashSet<Key> = HashSet::with_capacity(served.ingresses.len());
        for ing in &served.ingresses {
            let key = (ing.namespace.clone(), ing.name.clone());
            if !seen.insert(key.clone()) {
                continue;
            }
            let current = sorted(ing.current.clone());
            if current == *desired {
                // Ours, whether we wrote it or an earlier leader did: ours to clear later.
                claims.insert(
                    key,
                    Claim {
                        holds: desired.clone(),
                        replaced: None,
                    },
                );
                continue;
            }
            let lagging = claims
                .get(&key)
                .is_some_and(|c| c.holds == *desired && c.replaced.as_ref() == Some(&current));
            if !lagging {
                jobs.push(Job::Set { key, current });
            }
        }
        for (key, claim) in claims.iter() {
            if !seen.contains(key) && !claim.holds.is_empty() {
                jobs.push(Job::Clear {
                    key: key.clone(),
                    holds: claim.holds.clone(),
                });
            }
        }
        // Claims on unserved Ingresses with nothing to clear are done with.
        claims.retain(|k, c| seen.contains(k) || !c.holds.is_empty());

        let leading = &leading;
        let results: Vec<(Job, Outcome)> = stream::iter(jobs)
            .map(|job| async move {
                if !leading() {
                    return (job, Outcome::Skipped);
                }
                let outcome = match &job {
                    Job::Set { key, .. } => self.set(key, desired).await,
                    Job::Clear { key, holds } => self.clear(key, holds).await,
                };
                (job, outcome)
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;

        let mut ok = true;
        for (job, outcome) in results {
            match (job, outcome) {
                (Job::Set { key, current }, Outcome::Done) => {
                    claims.insert(
                        key,
                        Claim {
                            holds: desired.clone(),
                            replaced: Some(current),
                        },
                    );
                }
                (Job::Set { key, .. } | Job::Clear { key, .. }, Outcome::Forget) => {
                    claims.remove(&key);
                }
                (Job::Clear { key, .. }, Outcome::Done) => {
                    claims.remove(&key);
                }
                (_, Outcome::Failed) => ok = false,
                (_, Outcome::Refused | Outcome::Skipped) => {}
            }
        }
        ok
    }

    async fn set(&self, (namespace, name): &Key, desired: &Addresses) -> Outcome {
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), namespace);
        let patch = json!({"status": {"loadBalancer": {"ingress": desired}}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(%namespace, %name, ?desired, "wrote Ingress status");
                Outcome::Done
            }
            Err(e) => classify(e, namespace, name),
        }
    }

    /// Clears the status only if it still holds `holds`: another controller may have
    /// taken the Ingress over and written its own. The read's resourceVersion makes the
    /// patch conditional, so a write between the two is not lost.
    async fn clear(&self, (namespace, name): &Key, holds: &Addresses) -> Outcome {
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), namespace);
        let ingress = match api.get(name).await {
            Ok(i) => i,
            Err(e) => return classify(e, namespace, name),
        };
        if sorted(ServedIngress::from_ingress(&ingress).current) != *holds {
            return Outcome::Forget;
        }
        let patch = json!({
            "metadata": {"resourceVersion": ingress.metadata.resource_version},
            "status": {"loadBalancer": {"ingress": []}},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(%namespace, %name, "cleared the status of an Ingress no longer served");
                Outcome::Done
            }
            Err(e) => classify(e, namespace, name),
        }
    }
}

fn classify(e: kube::Error, namespace: &str, name: &str) -> Outcome {
    match &e {
        kube::Error::Api(s) if s.code == 404 => Outcome::Forget,
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => {
            tracing::warn!(%namespace, %name, error = %e, "Ingress status write refused");
            Outcome::Refused
        }
        _ => {
            tracing::warn!(%namespace, %name, error = %e, "Ingress status write failed; retrying");
            Outcome::Failed
        }
    }
}

/// One order for comparing address lists, whatever order the API or a Service gave.
fn sorted(mut v: Addresses) -> Addresses {
    v.sort_by(|a, b| (&a.ip, &a.hostname).cmp(&(&b.ip, &b.hostname)));
    v.dedup();
    v
}

fn fixed_addresses(list: &[String]) -> Addresses {
    sorted(
        list.iter()
            .map(|a| {
                let a = a.trim();
                if a.parse::<IpAddr>().is_ok() {
                    IngressLoadBalancerIngress {
                        ip: Some(a.to_owned()),
                        ..Default::default()
                    }
                } else {
                    IngressLoadBalancerIngress {
                        hostname: Some(a.to_owned()),
                        ..Default::default()
                    }
                }
            })
            .collect(),
    )
}

/// The Service's load balancer addresses; ports and ipMode describe the Service's own
/// load balancer, not what an Ingress status means, so only ip and hostname are copied.
fn service_addresses(svc: &Service) -> Addresses {
    let lbs = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    sorted(
        lbs.iter()
            .filter(|lb| lb.ip.is_some() || lb.hostname.is_some())
            .map(|lb| IngressLoadBalancerIngress {
                ip: lb.ip.clone(),
                hostname: lb.hostname.clone(),
                ports: None,
            })
            .collect(),
    )
}

async fn next_event(
    services: &mut Option<BoxStream<'static, Result<watcher::Event<Service>, watcher::Error>>>,
) -> Result<watcher::Event<Service>, watcher::Error> {
    match services {
        Some(s) => match s.next().await {
            Some(ev) => ev,
            // A watcher stream never ends; if it did, stop polling it.
            None => {
                *services = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `fut`'s output, or `None` if `shutdown` completes first.
async fn run_until<T>(
    fut: impl Future<Output = T>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<T> {
    tokio::select! {
        v = fut => Some(v),
        () = shutdown.as_mut() => None,
    }
}
