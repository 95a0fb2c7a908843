//! Endpoint health: the passive verdict (outlier detection ejects an endpoint after
//! consecutive failures) and the active one (health checks). The balancer reads both with a
//! single atomic load when all is well; failures are accounted with atomics on the request's
//! own task, so nothing here ever blocks a request.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::breaker::BackendState;
use crate::table::spec::OutlierSpec;

const EJECTED: u8 = 1;
const UNHEALTHY: u8 = 2;

/// A probe that has not reported after this long is presumed lost (its client went away
/// before the response), and another request may probe.
const PROBE_STALE: Duration = Duration::from_secs(10);

/// How one attempt at an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with a status below 500.
    Success,
    /// A 5xx answer; `gateway` for 502, 503 and 504.
    ServerError {
        /// 502, 503 or 504.
        gateway: bool,
    },
    /// Connect refused or timed out, the connection failed, or no response in time.
    LocalFailure,
}

/// What an outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The endpoint was ejected (or, after a failed probe, ejected again).
    Ejected,
    /// A probe succeeded: the endpoint is back.
    Restored,
}

/// Outlier detection settings, compiled.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    base_ns: u64,
    max_ns: u64,
    max_percent: u32,
}

impl From<&OutlierSpec> for OutlierConfig {
    fn from(s: &OutlierSpec) -> Self {
        Self {
            consecutive_5xx: s.consecutive_5xx,
            consecutive_gateway: s.consecutive_gateway_errors,
            base_ns: s.base_ejection_time.as_nanos() as u64,
            max_ns: s.max_ejection_time.as_nanos() as u64,
            max_percent: s.max_ejection_percent,
        }
    }
}

/// One endpoint's health, kept across table generations with the rest of its state.
#[derive(Debug)]
pub struct Health {
    backend: Arc<BackendState>,
    /// `EJECTED` and `UNHEALTHY` bits; 0 is the fast path.
    flags: AtomicU8,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Clock (ns) at which the current ejection ends.
    ejected_until: AtomicU64,
    /// Clock (ns) at which the probe after an ejection was sent; 0 when none.
    probe_at: AtomicU64,
    /// Ejections in the current streak; the ejection time grows with it.
    ejections: AtomicU32,
    /// Clock (ns) at which the last ejection ended.
    returned_at: AtomicU64,
}

impl Health {
    /// A healthy endpoint of `backend`.
    pub fn new(backend: Arc<BackendState>) -> Self {
        Self {
            backend,
            flags: AtomicU8::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            probe_at: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
        }
    }

    /// Whether a request may go here now. After an ejection has run out, exactly one
    /// caller gets `true` (the probe whose outcome decides); the others keep away.
    pub fn available(&self, now: u64) -> bool {
        let flags = self.flags.load(Ordering::Acquire);
        if flags == 0 {
            return true;
        }
        if flags & UNHEALTHY != 0 || now < self.ejected_until.load(Ordering::Acquire) {
            return false;
        }
        let probe = self.probe_at.load(Ordering::Acquire);
        if probe != 0 && now.saturating_sub(probe) < PROBE_STALE.as_nanos() as u64 {
            return false;
        }
        self.probe_at
            .compare_exchange(probe, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Whether nothing keeps the endpoint out: the common case, one load and no clock read.
    pub fn is_clear(&self) -> bool {
        self.flags.load(Ordering::Acquire) == 0
    }

    /// Whether outlier detection has the endpoint out now.
    pub fn is_ejected(&self) -> bool {
        self.flags.load(Ordering::Acquire) & EJECTED != 0
    }

    /// Accounts an attempt's outcome: counts consecutive failures, ejects past a threshold,
    /// and lets a probe bring an ejected endpoint back (or send it out for longer).
    /// `endpoints` is the backend's size, for `max_ejection_percent`.
    pub fn record(
        &self,
        outcome: Outcome,
        cfg: &OutlierConfig,
        endpoints: usize,
        clock: fn() -> u64,
    ) -> Option<Change> {
        if outcome == Outcome::Success {
            // Most calls: nothing to reset, so read before writing (no cache-line traffic).
            if self.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            if self.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                self.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            if self.is_ejected()
                && self.probe_at.load(Ordering::Acquire) != 0
                && self.restore(clock())
            {
                return Some(Change::Restored);
            }
            return None;
        }
        let gateway = matches!(
            outcome,
            Outcome::LocalFailure | Outcome::ServerError { gateway: true }
        );
        let n5xx = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        let ngw = if gateway {
            self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        if self.is_ejected() {
            // A failed probe: out again, for longer.
            if self.probe_at.load(Ordering::Acquire) != 0
                && clock() >= self.ejected_until.load(Ordering::Acquire)
            {
                self.extend(cfg, clock());
                return Some(Change::Ejected);
            }
            return None;
        }
        let tripped = (cfg.consecutive_5xx > 0 && n5xx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && ngw >= cfg.consecutive_gateway);
        (tripped && self.eject(cfg, endpoints, clock())).then_some(Change::Ejected)
    }

    fn eject(&self, cfg: &OutlierConfig, endpoints: usize, now: u64) -> bool {
        let allowed = (endpoints as u64 * u64::from(cfg.max_percent) / 100).max(1);
        let allowed = u32::try_from(allowed).unwrap_or(u32::MAX);
        let took = self
            .backend
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < allowed).then_some(n + 1)
            })
            .is_ok();
        if !took {
            return false;
        }
        // A long healthy spell since the last ejection starts a new streak.
        let returned = self.returned_at.load(Ordering::Relaxed);
        if returned != 0 && now.saturating_sub(returned) > cfg.max_ns {
            self.ejections.store(0, Ordering::Relaxed);
        }
        // The end time is written before the flag, so no request sees the flag with a stale
        // (already passed) end time and probes at once.
        self.extend(cfg, now);
        let prev = self.flags.fetch_or(EJECTED, Ordering::AcqRel);
        if prev & EJECTED != 0 {
            // Another request ejected it first.
            self.backend.ejected.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if prev == 0 {
            self.backend.unavailable.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// Ends an ejection whatever its state: outlier detection was turned off, and nothing
    /// else would ever bring the endpoint back.
    pub fn clear_ejection(&self) {
        if self.is_ejected() {
            self.restore(crate::clock::clock_ns());
        }
    }

    /// Starts (or restarts, after a failed probe) an ejection of the streak's length.
    fn extend(&self, cfg: &OutlierConfig, now: u64) {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let span = cfg.base_ns.saturating_mul(u64::from(n)).min(cfg.max_ns);
        self.ejected_until.store(now + span, Ordering::Release);
        self.probe_at.store(0, Ordering::Release);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }

    fn restore(&self, now: u64) -> bool {
        let prev = self.flags.fetch_and(!EJECTED, Ordering::AcqRel);
        if prev & EJECTED == 0 {
            return false;
        }
        self.backend.ejected.fetch_sub(1, Ordering::AcqRel);
        if prev == EJECTED {
            self.backend.unavailable.fetch_sub(1, Ordering::AcqRel);
        }
        self.probe_at.store(0, Ordering::Release);
        self.returned_at.store(now.max(1), Ordering::Relaxed);
        true
    }

    /// Records the active health checks' verdict. Returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let prev = if healthy {
            self.flags.fetch_and(!UNHEALTHY, Ordering::AcqRel)
        } else {
            self.flags.fetch_or(UNHEALTHY, Ordering::AcqRel)
        };
        let was_healthy = prev & UNHEALTHY == 0;
        if was_healthy == healthy {
            return false;
        }
        // Count the endpoint as unavailable once, whichever verdict keeps it out.
        let now_flags = if healthy {
            prev & !UNHEALTHY
        } else {
            prev | UNHEALTHY
        };
        match (prev == 0, now_flags == 0) {
            (true, false) => {
                self.backend.unavailable.fetch_add(1, Ordering::AcqRel);
            }
            (false, true) => {
                self.backend.unavailable.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
        true
    }

    /// For `/config`.
    pub fn snapshot(&self, now: u64) -> HealthSnapshot {
        let flags = self.flags.load(Ordering::Acquire);
        let until = self.ejected_until.load(Ordering::Acquire);
        HealthSnapshot {
            healthy: flags & UNHEALTHY == 0,
            ejected: flags & EJECTED != 0,
            ejected_for_secs: (flags & EJECTED != 0)
                .then(|| until.saturating_sub(now) as f64 / 1e9),
            ejections: self.ejections.load(Ordering::Relaxed),
            consecutive_5xx: self.consecutive_5xx.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        // An endpoint that leaves the backend must not stay counted against it.
        let flags = *self.flags.get_mut();
        if flags & EJECTED != 0 {
            self.backend.ejected.fetch_sub(1, Ordering::AcqRel);
        }
        if flags != 0 {
            self.backend.unavailable.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// An endpoint's health in `/config`.
#[derive(Debug, Serialize)]
pub struct HealthSnapshot {
    /// Passing active health checks (always true without them).
    pub healthy: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// Seconds left in the ejection (0 once a probe may go).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_secs: Option<f64>,
    /// Ejections in the current streak.
    pub ejections: u32,
    /// Consecutive 5xx answers and local failures.
    pub consecutive_5xx: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg() -> OutlierConfig {
        OutlierConfig::from(&OutlierSpec {
            consecutive_5xx: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
            ..OutlierSpec::default()
        })
    }

    #[test]
    fn ejects_after_consecutive_failures_and_a_probe_brings_it_back() {
        let backend = Arc::new(BackendState::default());
        let h = Health::new(Arc::clone(&backend));
        let c = cfg();
        let err = Outcome::ServerError { gateway: false };
        assert_eq!(h.record(err, &c, 4, || S), None);
        assert_eq!(
            h.record(Outcome::Success, &c, 4, || S),
            None,
            "a success resets the count"
        );
        assert_eq!(h.record(err, &c, 4, || S), None);
        assert_eq!(h.record(err, &c, 4, || S), None);
        assert_eq!(
            h.record(err, &c, 4, || S),
            Some(Change::Ejected),
            "third in a row ejects"
        );
        assert!(!h.available(2 * S));
        assert_eq!((backend.ejected(), backend.unavailable()), (1, 1));
        // 10 s later one probe may go, and only one.
        assert!(h.available(11 * S));
        assert!(!h.available(11 * S));
        assert_eq!(
            h.record(Outcome::Success, &c, 4, || 11 * S),
            Some(Change::Restored)
        );
        assert!(h.available(12 * S));
        assert_eq!((backend.ejected(), backend.unavailable()), (0, 0));
    }

    #[test]
    fn a_failed_probe_ejects_for_longer_up_to_the_cap() {
        let backend = Arc::new(BackendState::default());
        let h = Health::new(backend);
        let c = cfg();
        for _ in 0..3 {
            h.record(Outcome::LocalFailure, &c, 4, || 0);
        }
        assert!(h.available(10 * S), "probe after 10 s");
        h.record(Outcome::LocalFailure, &c, 4, || 10 * S);
        assert!(!h.available(29 * S), "second ejection: 20 s");
        assert!(h.available(30 * S));
        h.record(Outcome::LocalFailure, &c, 4, || 30 * S);
        assert!(!h.available(54 * S), "third: 30 s, capped at 25 s");
        assert!(h.available(55 * S));
    }

    #[test]
    fn max_ejection_percent_leaves_endpoints_in() {
        let backend = Arc::new(BackendState::default());
        let hs: Vec<Health> = (0..4).map(|_| Health::new(Arc::clone(&backend))).collect();
        let c = cfg();
        let ejected = hs
            .iter()
            .filter(|h| (0..3).any(|_| h.record(Outcome::LocalFailure, &c, 4, || S).is_some()))
            .count();
        assert_eq!(ejected, 2, "50% of 4");
        drop(hs);
        assert_eq!((backend.ejected(), backend.unavailable()), (0, 0));
    }

    #[test]
    fn active_and_passive_verdicts_count_once() {
        let backend = Arc::new(BackendState::default());
        let h = Health::new(Arc::clone(&backend));
        assert!(h.set_healthy(false));
        assert!(!h.set_healthy(false));
        for _ in 0..3 {
            h.record(Outcome::LocalFailure, &cfg(), 4, || S);
        }
        assert_eq!(backend.unavailable(), 1);
        assert!(h.set_healthy(true));
        assert_eq!(backend.unavailable(), 1, "still ejected");
        assert!(!h.available(2 * S));
    }
}
