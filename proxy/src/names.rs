//! DNS names that backends are given as (`dns: name:port`), and what each currently resolves
//! to. The control plane resolves them off the request path and records the outcome here;
//! the table compiler turns the last good answer into endpoints, and `/config`, `/ready` and
//! error bodies read the status. Nothing here is touched per request except on the cold
//! path of a backend with no endpoints.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;

/// Where a name stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not answered yet.
    Pending,
    /// The last lookup succeeded.
    Resolved,
    /// The last lookup failed; `addresses` still holds the last good answer, if any.
    Failing,
}

/// The outcome of the lookups of one name so far, as `/config` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NameStatus {
    /// Where the name stands.
    pub phase: Phase,
    /// The last good answer, sorted; kept through failures.
    pub addresses: Vec<IpAddr>,
    /// When the last lookup succeeded (RFC 3339).
    pub last_success: Option<String>,
    /// Why the last lookup failed, while it is failing.
    pub last_error: Option<String>,
    /// Lookups failed in a row.
    pub consecutive_failures: u32,
    /// Seconds until the next lookup, as scheduled after the last one.
    pub next_refresh_secs: Option<f64>,
}

impl NameStatus {
    fn pending() -> Self {
        Self {
            phase: Phase::Pending,
            addresses: Vec::new(),
            last_success: None,
            last_error: None,
            consecutive_failures: 0,
            next_refresh_secs: None,
        }
    }
}

/// One DNS name and port, shared by every backend (and every generation) that uses it.
#[derive(Debug)]
pub struct DnsName {
    host: String,
    port: u16,
    status: ArcSwap<NameStatus>,
}

impl DnsName {
    /// A name that has not been looked up.
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_owned(),
            port,
            status: ArcSwap::from_pointee(NameStatus::pending()),
        }
    }

    /// The host name as configured.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port every resolved address gets.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The current status.
    pub fn status(&self) -> Arc<NameStatus> {
        self.status.load_full()
    }

    /// The endpoints of the last good answer.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let port = self.port;
        self.status
            .load()
            .addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect()
    }

    /// Records a successful answer. Returns whether the address set changed, which is when
    /// the table must be rebuilt.
    pub fn resolved(&self, mut addresses: Vec<IpAddr>, next_refresh_secs: f64) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        let old = self.status.load();
        let changed = old.addresses != addresses;
        self.status.store(Arc::new(NameStatus {
            phase: Phase::Resolved,
            addresses,
            last_success: Some(now_rfc3339()),
            last_error: None,
            consecutive_failures: 0,
            next_refresh_secs: Some(next_refresh_secs),
        }));
        changed
    }

    /// Records a failed lookup; the last good addresses stay. Returns whether this is the
    /// first answer of any kind (a pending name becomes failing, which the table shows).
    pub fn failed(&self, error: String, next_refresh_secs: f64) -> bool {
        let old = self.status.load_full();
        self.status.store(Arc::new(NameStatus {
            phase: Phase::Failing,
            addresses: old.addresses.clone(),
            last_success: old.last_success.clone(),
            last_error: Some(error),
            consecutive_failures: old.consecutive_failures.saturating_add(1),
            next_refresh_secs: Some(next_refresh_secs),
        }));
        old.phase == Phase::Pending
    }

    /// Why a backend on this name has no endpoints.
    pub fn unavailable_reason(&self) -> String {
        let status = self.status.load();
        let name = format!("{}:{}", self.host, self.port);
        match (&status.phase, &status.last_error) {
            (Phase::Pending, _) => format!("DNS name {name} has not been resolved yet"),
            (_, Some(e)) if status.last_success.is_none() => {
                format!("DNS name {name} does not resolve: {e}")
            }
            (_, Some(e)) => format!("DNS name {name} resolved to no address (last error: {e})"),
            _ => format!("DNS name {name} resolved to no address"),
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Names by `host:port`, shared across generations as long as a table uses them.
#[derive(Debug, Default)]
pub struct NameRegistry {
    map: Mutex<HashMap<(String, u16), Weak<DnsName>>>,
}

impl NameRegistry {
    /// The entry for this name: the existing one while any table holds it.
    pub fn get(&self, host: &str, port: u16) -> Arc<DnsName> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_owned(), port);
        if let Some(n) = map.get(&key).and_then(Weak::upgrade) {
            return n;
        }
        let n = Arc::new(DnsName::new(host, port));
        map.insert(key, Arc::downgrade(&n));
        n
    }

    /// Forgets names no table holds any more and returns the live ones.
    pub fn prune(&self) -> Vec<Arc<DnsName>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        map.values().filter_map(Weak::upgrade).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_keeps_the_last_good_set() {
        let n = DnsName::new("db.example", 3306);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(
            n.resolved(vec![ip, ip], 5.0),
            "first answer changes the set"
        );
        assert!(!n.resolved(vec![ip], 5.0), "same set: no rebuild");
        assert!(!n.failed("timed out".into(), 1.0));
        assert_eq!(n.endpoints(), vec!["10.0.0.1:3306".parse().unwrap()]);
        assert_eq!(n.status().phase, Phase::Failing);
        assert_eq!(n.status().consecutive_failures, 1);
    }

    #[test]
    fn reason_names_the_name() {
        let n = DnsName::new("nope.example", 80);
        assert!(n.unavailable_reason().contains("not been resolved yet"));
        assert!(n.failed("NXDOMAIN".into(), 1.0));
        assert_eq!(
            n.unavailable_reason(),
            "DNS name nope.example:80 does not resolve: NXDOMAIN"
        );
    }
}
