//! The process's monotonic clock as nanoseconds, for values kept in atomics (endpoint
//! latency, idle connections, a connection's last read) and compared across modules.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process's first clock read.
pub(crate) fn clock_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// `clock_ns()` at an instant read before, without reading the clock again.
pub(crate) fn clock_ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// The instant of a `clock_ns()` value.
pub(crate) fn instant_at(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_and_nanoseconds_convert_both_ways() {
        // After the epoch (the first clock read), which other tests may have made.
        let first = clock_ns();
        let now = Instant::now();
        let ns = clock_ns_at(now);
        assert!(first <= ns && ns <= clock_ns());
        assert_eq!(instant_at(ns), now);
    }
}
