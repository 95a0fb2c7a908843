//! Resolves the DNS names of `dns` backends in the background, never on the request path.
//!
//! One task per name looks the name up, records the answer in the name's shared status
//! ([`DnsName`]), asks the writer to rebuild the table when the address set changed, then
//! sleeps until the records' TTL runs out (within `min_refresh`..`max_refresh`). A failed
//! lookup keeps the last good set and is retried with exponential backoff.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Instant;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;
use strait_proxy::metrics::{DNS_FAILING, DNS_LOOKUPS};
use strait_proxy::names::DnsName;
use strait_proxy::table::spec::{DnsSpec, IpFamily};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct ResolverError(String);

/// Starts, keeps and stops the lookup tasks of every name the tables in force use.
#[derive(Debug)]
pub struct DnsManager {
    /// Settings the running tasks use; a change restarts them all.
    settings: Option<DnsSpec>,
    tasks: HashMap<(String, u16), AbortHandle>,
    changed_tx: mpsc::Sender<()>,
    changed_rx: mpsc::Receiver<()>,
}

impl Default for DnsManager {
    fn default() -> Self {
        // One slot: a full channel already means "rebuild pending", so bursts coalesce.
        let (changed_tx, changed_rx) = mpsc::channel(1);
        Self {
            settings: None,
            tasks: HashMap::new(),
            changed_tx,
            changed_rx,
        }
    }
}

impl DnsManager {
    /// Makes the running lookups match `names` (the names live tables use): starts the new
    /// ones, stops the unused ones, and restarts all when `settings` changed. Must run
    /// inside the runtime. A resolver that cannot be built marks every name failing.
    pub fn sync(&mut self, settings: &DnsSpec, names: Vec<Arc<DnsName>>) {
        if self.settings.as_ref() != Some(settings) {
            for (_, task) in self.tasks.drain() {
                task.abort();
            }
            self.settings = Some(settings.clone());
        }
        let wanted: HashMap<(String, u16), Arc<DnsName>> = names
            .into_iter()
            .map(|n| ((n.host().to_owned(), n.port()), n))
            .collect();
        self.tasks.retain(|key, task| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::info!(name = %key.0, port = key.1, "no longer resolving DNS name");
                task.abort();
            }
            keep
        });
        let new: Vec<_> = wanted
            .into_iter()
            .filter(|(key, _)| !self.tasks.contains_key(key))
            .collect();
        if new.is_empty() {
            return;
        }
        let resolver = match build_resolver(settings) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::error!("{e}");
                for (_, name) in new {
                    name.failed(e.to_string(), 0.0);
                }
                return;
            }
        };
        for (key, name) in new {
            tracing::info!(name = %key.0, port = key.1, "resolving DNS name in the background");
            let task = tokio::spawn(watch(
                Arc::clone(&resolver),
                Arc::downgrade(&name),
                settings.clone(),
                self.changed_tx.clone(),
            ));
            self.tasks.insert(key, task.abort_handle());
        }
    }

    /// Resolves when some name's address set changed since the last call.
    pub async fn changed(&mut self) {
        if self.changed_rx.recv().await.is_none() {
            // Unreachable while `self` holds a sender; never report a change that is not.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for DnsManager {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// A resolver from `/etc/resolv.conf` (search domains, `ndots`, nameservers), with the
/// nameservers replaced when the configuration lists some, and no answer cache: the tasks
/// schedule their own refreshes by TTL, and a cache would answer them with stale records.
pub fn build_resolver(settings: &DnsSpec) -> Result<TokioResolver, ResolverError> {
    let system = hickory_resolver::system_conf::read_system_conf();
    let (config, mut opts) = match (system, settings.nameservers.is_empty()) {
        (Ok(system), true) => system,
        (Err(e), true) => {
            return Err(ResolverError(format!(
                "reading /etc/resolv.conf: {e} (set dns.nameservers to skip it)"
            )))
        }
        (system, false) => {
            let (domain, search, opts) = match system {
                Ok((c, o)) => (c.domain().cloned(), c.search().to_vec(), o),
                Err(_) => (None, Vec::new(), ResolverOpts::default()),
            };
            let servers = settings
                .nameservers
                .iter()
                .map(|s| nameserver(s))
                .collect::<Result<Vec<_>, _>>()?;
            (ResolverConfig::from_parts(domain, search, servers), opts)
        }
    };
    opts.timeout = settings.timeout;
    // Retries after the first try: two tries per lookup.
    opts.attempts = 1;
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(settings.max_refresh);
    opts.negative_max_ttl = Some(settings.min_refresh);
    opts.ip_strategy = match settings.ip_family {
        IpFamily::Any => LookupIpStrategy::Ipv4AndIpv6,
        IpFamily::Ipv4 => LookupIpStrategy::Ipv4Only,
        IpFamily::Ipv6 => LookupIpStrategy::Ipv6Only,
    };
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| ResolverError(e.to_string()))
}

/// `ip` or `ip:port` (validated when the table was compiled).
fn nameserver(text: &str) -> Result<NameServerConfig, ResolverError> {
    let addr = text
        .parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| ResolverError(format!("invalid nameserver {text:?}")))?;
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    Ok(ns)
}

/// Looks `name` up until no table uses it any more (or the task is aborted).
async fn watch(
    resolver: Arc<TokioResolver>,
    name: Weak<DnsName>,
    settings: DnsSpec,
    changed: mpsc::Sender<()>,
) {
    let Some(host) = name.upgrade().map(|n| n.host().to_owned()) else {
        return;
    };
    let labels = [("name", host.clone())];
    let failing = metrics::gauge!(DNS_FAILING, &labels);
    let mut backoff = settings.min_refresh;
    loop {
        let result = resolver.lookup_ip(host.as_str()).await;
        let Some(n) = name.upgrade() else {
            return;
        };
        let answer = result.map_err(describe).and_then(|lookup| {
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let addrs: Vec<IpAddr> = lookup.iter().collect();
            if addrs.is_empty() {
                Err("empty answer".to_owned())
            } else {
                Ok((addrs, ttl))
            }
        });
        let wait = match answer {
            Ok((addrs, ttl)) => {
                metrics::counter!(DNS_LOOKUPS, "name" => host.clone(), "result" => "success")
                    .increment(1);
                failing.set(0.0);
                backoff = settings.min_refresh;
                let wait = ttl.clamp(settings.min_refresh, settings.max_refresh);
                let count = addrs.len();
                if n.resolved(addrs, wait.as_secs_f64()) {
                    tracing::info!(name = %host, addresses = count, "DNS answer changed; rebuilding the table");
                    // A full channel already means a rebuild is pending.
                    let _ = changed.try_send(());
                }
                wait
            }
            Err(error) => {
                metrics::counter!(DNS_LOOKUPS, "name" => host.clone(), "result" => "failure")
                    .increment(1);
                failing.set(1.0);
                // Jitter keeps many proxies from retrying a struggling server in step.
                let wait = backoff.mul_f64(0.9 + fastrand::f64() * 0.2);
                backoff = (backoff * 2).min(settings.max_refresh);
                let kept = n.endpoints().len();
                tracing::warn!(name = %host, %error, kept_addresses = kept, retry_in = ?wait, "DNS lookup failed; keeping the last good answer");
                if n.failed(error, wait.as_secs_f64()) {
                    // The first answer, even a failure, is news to the table: it tells
                    // `/ready` that this name is settled.
                    let _ = changed.try_send(());
                }
                wait.max(settings.min_refresh)
            }
        };
        drop(n);
        tokio::time::sleep(wait).await;
    }
}

/// A short reason: NXDOMAIN and empty answers by name, everything else as hickory says it.
fn describe(e: NetError) -> String {
    if e.is_nx_domain() {
        "NXDOMAIN (no such name)".to_owned()
    } else if e.is_no_records_found() {
        "no A/AAAA records".to_owned()
    } else {
        e.to_string()
    }
}
