//! Leader election on a `coordination.k8s.io/v1` Lease, so that one replica at a time does
//! the cluster-wide writes (Ingress status) while every replica serves traffic.
//!
//! Safety rests on the API server's optimistic concurrency: every change to the Lease is a
//! PUT carrying the resourceVersion we read, so of two replicas racing for it one gets 409
//! Conflict and stays a follower. A leader counts its term from the moment before each
//! successful renewal and steps down when that term runs out without another success,
//! which is no later than when the others may take the Lease over.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

/// Contends for one Lease; see [`LeaderElection::spawn`].
#[derive(Clone)]
pub struct LeaderElection {
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_every: Duration,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .field("renew_every", &self.renew_every)
            .finish_non_exhaustive()
    }
}

/// What one acquire-or-renew round found.
#[derive(Debug, PartialEq)]
enum Round {
    /// We hold the Lease until at least one lease duration after the round started.
    Held,
    /// Someone else holds a live Lease.
    Taken { holder: String },
    /// Someone wrote the Lease between our read and our write (409): the next read tells.
    Raced,
}

/// Why a round could not tell whether we hold the Lease.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl LeaderElection {
    /// Contends for the Lease `namespace/name` as `identity`, which must be unique among the
    /// replicas (see [`default_identity`]). The Lease lasts 15s and is renewed every 5s.
    pub fn new(
        client: Client,
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    /// How long a Lease lasts without renewal before another replica may take it over.
    /// Written to the Lease in whole seconds, rounded up (at least 1s).
    pub fn lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }

    /// How often the leader renews, and how often followers look for an expired Lease.
    /// Should be well under the lease duration, so that a failed renewal can be retried
    /// before the term runs out.
    pub fn renew_every(mut self, d: Duration) -> Self {
        self.renew_every = d;
        self
    }

    /// The identity this replica writes as the Lease's holder.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Runs [`LeaderElection::run`] in a task. The value is `true` while this replica holds
    /// the Lease. After `shutdown` completes, a leader first turns the value `false`, then
    /// releases the Lease so another replica takes over at once; the task then ends and
    /// `changed()` on the receiver returns an error, which tells a caller waiting for the
    /// release that it is done.
    pub fn spawn(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(self.run(tx, shutdown));
        rx
    }

    /// The election loop [`LeaderElection::spawn`] runs, for callers that keep their own
    /// tasks. `leading` is set `true` while this replica holds the Lease. Never panics on
    /// API errors: they are logged and retried with backoff.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: impl Future<Output = ()>) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut shutdown = std::pin::pin!(shutdown);
        // While leading: when our term runs out unless a renewal succeeds first.
        let mut term_ends: Option<Instant> = None;
        let mut failures: u32 = 0;
        // Shut down while a round was under way, which may have made us the holder.
        let mut mid_round = false;
        'contend: loop {
            let started = Instant::now();
            let round = tokio::time::timeout(self.lease_duration, self.round(&api));
            let mut round = std::pin::pin!(round);
            // A slow round must not let us lead past our term: others may already have
            // taken the Lease, so step down on time and let the round finish on its own.
            let outcome = loop {
                tokio::select! {
                    r = &mut round => break r,
                    () = sleep_until_opt(term_ends) => {
                        self.step_down(&leading, &mut term_ends, "the term ran out during a renewal");
                    }
                    () = &mut shutdown => {
                        mid_round = true;
                        break 'contend;
                    }
                }
            };
            let outcome = match outcome {
                Ok(r) => r,
                Err(_) => Err(RoundError::Timeout(self.lease_duration)),
            };
            let wait = match outcome {
                // Too slow to be of use: the term it bought is already over.
                Ok(Round::Held) if started + self.lease_duration <= Instant::now() => {
                    self.step_down(
                        &leading,
                        &mut term_ends,
                        "the renewal took a whole lease duration",
                    );
                    Duration::ZERO
                }
                Ok(Round::Held) => {
                    failures = 0;
                    if term_ends.is_none() {
                        tracing::info!(lease = %self.lease_name(), identity = %self.identity, "became leader");
                    }
                    term_ends = Some(started + self.lease_duration);
                    set(&leading, true);
                    self.renew_every
                }
                Ok(Round::Taken { holder }) => {
                    failures = 0;
                    if term_ends.is_some() {
                        tracing::warn!(lease = %self.lease_name(), %holder, "another replica holds the lease");
                        self.step_down(&leading, &mut term_ends, "another replica holds the lease");
                    }
                    self.renew_every
                }
                Ok(Round::Raced) => {
                    failures = 0;
                    // A leader looks again soon (its term still guards it); a follower
                    // that lost a race has a new holder to wait out.
                    if term_ends.is_some() {
                        self.backoff(1, true)
                    } else {
                        self.renew_every
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(lease = %self.lease_name(), error = %e, failures, "leader election round failed");
                    self.backoff(failures, term_ends.is_some())
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = sleep_until_opt(term_ends) => {
                    // Try again now rather than after the rest of the backoff.
                    self.step_down(&leading, &mut term_ends, "renewals failed for a whole lease duration");
                }
                () = &mut shutdown => break 'contend,
            }
        }

        // False before the release: our writers must stop before a successor starts.
        set(&leading, false);
        // The release itself checks that we are the holder.
        if term_ends.is_some() || mid_round {
            match tokio::time::timeout(self.lease_duration, self.release(&api)).await {
                Ok(Ok(())) => {
                    tracing::info!(lease = %self.lease_name(), "released the lease");
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.lease_name(), error = %e, "could not release the lease; it expires on its own")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.lease_name(), "releasing the lease timed out; it expires on its own")
                }
            }
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn step_down(&self, leading: &watch::Sender<bool>, term_ends: &mut Option<Instant>, why: &str) {
        if term_ends.take().is_some() {
            tracing::warn!(lease = %self.lease_name(), reason = why, "stepped down as leader");
        }
        set(leading, false);
    }

    fn duration_seconds(&self) -> i32 {
        let secs =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
    }

    /// Delay after `failures` failed rounds in a row. A leader keeps retrying at least once
    /// per renewal period to save its term; a follower backs off up to a lease duration.
    fn backoff(&self, failures: u32, leading: bool) -> Duration {
        let base = (self.renew_every / 4).max(Duration::from_millis(50));
        let cap = if leading {
            self.renew_every
        } else {
            self.lease_duration.max(self.renew_every)
        };
        let exp = base.saturating_mul(1u32 << failures.clamp(1, 16).saturating_sub(1));
        // Jitter so that replicas that failed together do not retry in step.
        exp.min(cap).mul_f64(1.0 + fastrand::f64() * 0.2)
    }

    /// One attempt to acquire or renew: get; create if missing; write ourselves in if we
    /// already hold it or it has expired.
    async fn round(&self, api: &Api<Lease>) -> Result<Round, RoundError> {
        let now = Timestamp::now();
        let Some(mut lease) = api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Held),
                // Another replica created it first: it is theirs for now.
                Err(e) if is_conflict(&e) => Ok(Round::Raced),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = holder.filter(|_| !ours && !self.expired(spec, now)) {
            return Ok(Round::Taken { holder });
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.renew_time = Some(MicroTime(now));
        // The resourceVersion we read rides along: if anyone wrote the Lease since, this
        // is a 409 and they keep it.
        match api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Held),
            Err(e) if is_conflict(&e) => Ok(Round::Raced),
            // Deleted since our read: the next round creates it.
            Err(e) if is_not_found(&e) => Ok(Round::Raced),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the holder's term is over by our clock. This trusts the holder's clock to
    /// agree with ours to well within a lease duration, as Kubernetes nodes' clocks do.
    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(MicroTime(renewed)) = spec.renew_time else {
            return true;
        };
        let secs = spec
            .lease_duration_seconds
            .unwrap_or_else(|| self.duration_seconds());
        renewed
            .checked_add(SignedDuration::from_secs(i64::from(secs)))
            .is_ok_and(|end| end < now)
    }

    /// Clears the holder if it is still us, so that a follower's next round takes over
    /// without waiting for the term to run out.
    async fn release(&self, api: &Api<Lease>) -> Result<(), kube::Error> {
        loop {
            let Some(mut lease) = api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            match api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(()),
                // Written between our get and put (an annotation, a manual edit): look again.
                Err(e) if is_conflict(&e) => continue,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// This replica's identity for [`LeaderElection::new`]: the pod name (`POD_NAME`, from the
/// downward API), else the host name (a pod's host name is its name too), else a random
/// one, since two replicas sharing an identity would both lead.
pub fn default_identity() -> String {
    let from_env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("strait-{:016x}", fastrand::u64(..)))
}

fn set(tx: &watch::Sender<bool>, value: bool) {
    tx.send_if_modified(|v| std::mem::replace(v, value) != value);
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
