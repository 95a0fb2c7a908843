//! Circuit breaking: per-backend counters of requests, retries and connections, checked
//! before a request is sent so that an overloaded backend gets a fast 503 instead of an
//! unbounded queue (Envoy's thresholds). The counters live outside the routing table, in a
//! registry keyed by backend name, so a reload does not reset them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::table::spec::CircuitBreakerSpec;

/// Which threshold turned a request away; the value of the `x-strait-circuit-breaker`
/// response header and of the `breaker` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// `max_requests`.
    MaxRequests,
    /// `max_pending_requests`.
    MaxPendingRequests,
    /// `max_retries` or the retry budget (the retry is skipped, not the request).
    MaxRetries,
    /// `max_connections`: no connection slot freed up within the connect timeout.
    MaxConnections,
}

impl Breaker {
    /// The threshold's name as configured.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxPendingRequests => "max_pending_requests",
            Self::MaxRetries => "max_retries",
            Self::MaxConnections => "max_connections",
        }
    }
}

/// Live counters of one backend, shared by every table generation that has it.
#[derive(Debug, Default)]
pub struct BackendState {
    requests: AtomicU32,
    retries: AtomicU32,
    connections: AtomicU32,
    /// `max_connections` for the connector, which outlives tables: set at each compile.
    max_connections: AtomicU32,
    connection_closed: Notify,
    /// Endpoints ejected by outlier detection.
    pub(crate) ejected: AtomicU32,
    /// Endpoints ejected or failing active health checks.
    pub(crate) unavailable: AtomicU32,
}

impl BackendState {
    /// Takes a request slot, or names the threshold in the way: `max_requests`, or for
    /// HTTP/1.1 (`pooled`, one request per connection) `max_pending_requests`, the requests
    /// beyond `max_connections` being the ones that wait for a connection.
    pub fn try_request(
        self: &Arc<Self>,
        cb: &CircuitBreakerSpec,
        pooled: bool,
    ) -> Result<Slot, Breaker> {
        let limit = if pooled {
            cb.max_requests
                .min(cb.max_connections.saturating_add(cb.max_pending_requests))
        } else {
            cb.max_requests
        };
        if take(&self.requests, limit) {
            return Ok(Slot {
                state: Arc::clone(self),
                retry: false,
            });
        }
        if self.requests() >= cb.max_requests {
            Err(Breaker::MaxRequests)
        } else {
            Err(Breaker::MaxPendingRequests)
        }
    }

    /// Takes a retry slot within `cb`'s retry limit (or budget), or `None`.
    pub fn try_retry(self: &Arc<Self>, cb: &CircuitBreakerSpec) -> Option<Slot> {
        let limit = match &cb.retry_budget {
            Some(b) => {
                let share = u64::from(self.requests()) * u64::from(b.percent) / 100;
                u32::try_from(share)
                    .unwrap_or(u32::MAX)
                    .max(b.min_concurrency)
            }
            None => cb.max_retries,
        };
        take(&self.retries, limit).then(|| Slot {
            state: Arc::clone(self),
            retry: true,
        })
    }

    /// Requests in flight.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Open upstream connections.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Endpoints currently ejected by outlier detection.
    pub fn ejected(&self) -> u32 {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Endpoints currently ejected or failing active health checks.
    pub fn unavailable(&self) -> u32 {
        self.unavailable.load(Ordering::Relaxed)
    }

    /// Applies a table's thresholds to the connection limiter.
    pub fn set_limits(&self, cb: &CircuitBreakerSpec) {
        self.max_connections
            .store(cb.max_connections, Ordering::Relaxed);
        // A raised limit may let waiting connects go.
        self.connection_closed.notify_waiters();
    }

    /// Waits for a connection slot. The wait is bounded in number, not time: requests past
    /// `max_connections + max_pending_requests` are refused before they get here, and the
    /// caller stops waiting when a pooled connection is handed back meanwhile or its
    /// connect timeout passes.
    pub(crate) async fn connection_slot(self: &Arc<Self>) -> ConnectionSlot {
        // The common case first, without registering a waiter.
        if let Some(slot) = self.try_connection_slot() {
            return slot;
        }
        loop {
            // Register before checking, so a close between the check and the wait is seen.
            let closed = self.connection_closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if take(
                &self.connections,
                self.max_connections.load(Ordering::Relaxed),
            ) {
                return ConnectionSlot(Arc::clone(self));
            }
            closed.await;
        }
    }
}

impl BackendState {
    /// A connection slot if one is free now.
    pub(crate) fn try_connection_slot(self: &Arc<Self>) -> Option<ConnectionSlot> {
        take(
            &self.connections,
            self.max_connections.load(Ordering::Relaxed),
        )
        .then(|| ConnectionSlot(Arc::clone(self)))
    }
}

/// Increments `counter` unless it has reached `max`. One `fetch_add` (undone on overflow)
/// rather than a compare-and-swap loop, which would retry under contention on every request.
fn take(counter: &AtomicU32, max: u32) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) < max {
        return true;
    }
    counter.fetch_sub(1, Ordering::Relaxed);
    false
}

/// A request (or retry) counted against its backend's thresholds until dropped.
#[derive(Debug)]
pub struct Slot {
    state: Arc<BackendState>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if self.retry {
            &self.state.retries
        } else {
            &self.state.requests
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open upstream connection, released when the connection is dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot(Arc<BackendState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.connection_closed.notify_one();
    }
}

/// Backend states by name, kept while a table uses them.
#[derive(Debug, Default)]
pub struct BackendRegistry {
    map: Mutex<HashMap<Arc<str>, Weak<BackendState>>>,
}

impl BackendRegistry {
    /// The state of backend `name`: the existing one while any table holds it.
    pub fn get(&self, name: &Arc<str>) -> Arc<BackendState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(BackendState::default());
        map.insert(Arc::clone(name), Arc::downgrade(&s));
        s
    }

    /// Forgets backends no table holds any more.
    pub fn prune(&self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_connections_are_pending_and_bounded() {
        let s = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            max_connections: 2,
            max_pending_requests: 1,
            max_requests: 10,
            ..CircuitBreakerSpec::default()
        };
        let a = s.try_request(&cb, true).unwrap();
        let _b = s.try_request(&cb, true).unwrap();
        let _c = s.try_request(&cb, true).unwrap();
        assert_eq!(
            s.try_request(&cb, true).unwrap_err(),
            Breaker::MaxPendingRequests
        );
        drop(a);
        assert!(s.try_request(&cb, true).is_ok());
        // HTTP/2 multiplexes: only max_requests applies.
        let h2 = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            max_requests: 4,
            ..cb
        };
        let _held: Vec<_> = (0..4)
            .map(|_| h2.try_request(&cb, false).unwrap())
            .collect();
        assert_eq!(
            h2.try_request(&cb, false).unwrap_err(),
            Breaker::MaxRequests
        );
    }

    #[test]
    fn retry_budget_scales_with_requests() {
        let s = Arc::new(BackendState::default());
        let cb = CircuitBreakerSpec {
            retry_budget: Some(crate::table::spec::RetryBudgetSpec {
                percent: 20,
                min_concurrency: 1,
            }),
            ..CircuitBreakerSpec::default()
        };
        let _reqs: Vec<_> = (0..10)
            .map(|_| s.try_request(&cb, false).unwrap())
            .collect();
        let r1 = s.try_retry(&cb).unwrap();
        let _r2 = s.try_retry(&cb).unwrap();
        assert!(s.try_retry(&cb).is_none(), "20% of 10 is 2");
        drop(r1);
        assert!(s.try_retry(&cb).is_some());
    }

    #[tokio::test]
    async fn connects_wait_for_a_closed_connection() {
        let s = Arc::new(BackendState::default());
        s.set_limits(&CircuitBreakerSpec {
            max_connections: 1,
            ..CircuitBreakerSpec::default()
        });
        let first = s.connection_slot().await;
        let waiting = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.connection_slot().await }
        });
        // This test runs on one thread: yielding lets the waiter run and find no slot.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!(s.connections(), 1);
        drop(second);
        assert_eq!(s.connections(), 0);
    }
}
