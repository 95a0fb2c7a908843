//! Live per-endpoint state: in-flight requests and peak-EWMA latency.
//!
//! The state lives outside the routing table, in a registry keyed by backend name and
//! address, so a table swap keeps it for every endpoint that stays. The request path only
//! touches atomics; the registry's lock is taken by the control side while compiling.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;

use crate::breaker::BackendState;
use crate::clock::clock_ns;
use crate::health::{Health, HealthSnapshot};
use crate::pool::Http1Pool;
use crate::upstream::H2Slot;

/// Latency assumed for an endpoint that has not answered yet (linkerd uses the same idea),
/// so a new endpoint is neither starved nor flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the EWMA decay.
const DECAY: Duration = Duration::from_secs(10);

/// State of one endpoint of one backend.
#[derive(Debug)]
pub struct EndpointState {
    addr: SocketAddr,
    in_flight: AtomicU32,
    /// Peak-EWMA latency in nanoseconds, as `f64` bits.
    ewma_ns: AtomicU64,
    /// `clock_ns()` of the last EWMA update.
    stamp_ns: AtomicU64,
    /// The multiplexed HTTP/2 connection, for `h2c` backends.
    pub(crate) h2: H2Slot,
    /// Idle keep-alive connections, for `http1` backends.
    pub(crate) http1: Http1Pool,
    /// Outlier-detection and health-check verdicts.
    pub health: Health,
}

impl EndpointState {
    /// State not shared with any registry (dry-run compiles and benches).
    pub fn detached(addr: SocketAddr) -> Self {
        Self::new(addr, Arc::new(BackendState::default()))
    }

    fn new(addr: SocketAddr, backend: Arc<BackendState>) -> Self {
        Self {
            addr,
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(clock_ns()),
            h2: H2Slot::default(),
            http1: Http1Pool::default(),
            health: Health::new(backend),
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests currently in flight to this endpoint.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Current peak-EWMA latency, decayed to now.
    pub fn ewma_ns(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = clock_ns().saturating_sub(self.stamp_ns.load(Ordering::Relaxed));
        let w = (-(age as f64) / DECAY.as_nanos() as f64).exp();
        // Decay towards the default so a once-slow endpoint gets probed again.
        ewma * w + DEFAULT_RTT.as_nanos() as f64 * (1.0 - w)
    }

    /// Peak-EWMA cost: latency times (load + 1).
    pub fn peak_ewma_cost(&self) -> f64 {
        self.ewma_ns() * f64::from(self.in_flight() + 1)
    }

    /// Marks a request as started; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.start_at(clock_ns())
    }

    /// Marks a request as started at `now` (`clock_ns()`); the guard ends it.
    pub fn start_at(self: &Arc<Self>, now: u64) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state: Arc::clone(self),
            started_ns: now,
        }
    }

    /// Blends in a latency sample taken at `now` (`clock_ns()`).
    fn observe(&self, rtt_ns: f64, now: u64) {
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let age = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed));
        // Peak: a slower sample replaces the average at once; faster ones blend in.
        // Concurrent updates may lose a sample; the estimate stays sound.
        let next = if rtt_ns > prev {
            rtt_ns
        } else {
            let w = (-(age as f64) / DECAY.as_nanos() as f64).exp();
            prev * w + rtt_ns * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.stamp_ns.store(now, Ordering::Relaxed);
    }

    /// A snapshot for `/config`.
    pub fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            address: self.addr,
            in_flight: self.in_flight(),
            ewma_ms: self.ewma_ns() / 1e6,
            health: self.health.snapshot(clock_ns()),
        }
    }
}

/// What `/config` shows of an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    /// Address.
    pub address: SocketAddr,
    /// Requests in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency in milliseconds.
    pub ewma_ms: f64,
    /// Health-check and outlier-detection state.
    pub health: HealthSnapshot,
}

/// One in-flight request; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    started_ns: u64,
}

impl InFlight {
    /// Records the time to response headers in the endpoint's latency estimate.
    pub fn record_latency(&self) {
        let now = clock_ns();
        self.state
            .observe(now.saturating_sub(self.started_ns) as f64, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Backend name and endpoint address.
type EndpointKey = (Arc<str>, SocketAddr);

/// Endpoint states keyed by backend and address, shared across table generations.
#[derive(Debug, Default)]
pub struct EndpointRegistry {
    map: Mutex<HashMap<EndpointKey, Weak<EndpointState>>>,
}

impl EndpointRegistry {
    /// The state for this endpoint: the existing one if any table still holds it.
    /// `state` is the backend's, which the endpoint's health counts against.
    pub fn get(
        &self,
        backend: &Arc<str>,
        addr: SocketAddr,
        state: &Arc<BackendState>,
    ) -> Arc<EndpointState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (Arc::clone(backend), addr);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(EndpointState::new(addr, Arc::clone(state)));
        map.insert(key, Arc::downgrade(&s));
        s
    }

    /// Forgets endpoints no table holds any more.
    pub fn prune(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }

    /// Number of endpoint states alive.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no endpoint state is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_while_held_and_is_pruned_after() {
        let reg = EndpointRegistry::default();
        let b: Arc<str> = "b".into();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let bs = Arc::new(BackendState::default());
        let s1 = reg.get(&b, addr, &bs);
        let _g = s1.start();
        let s2 = reg.get(&b, addr, &bs);
        assert_eq!(s2.in_flight(), 1, "same state handed out again");
        drop((s1, s2, _g));
        reg.prune();
        assert!(reg.is_empty());
    }

    #[test]
    fn peak_ewma_jumps_up_at_once() {
        let s = EndpointState::detached("10.0.0.1:80".parse().unwrap());
        s.observe(500e6, clock_ns());
        assert!(s.ewma_ns() > 400e6);
    }
}
