//! Per-route local rate limiting: a token bucket (governor's GCRA) per route, or one per client
//! IP or per value of a request header.
//!
//! The buckets ([`Limiter`]) live outside the routing table, in [`RateLimitRegistry`], keyed by
//! listener and route name, so a reload that leaves a route's limit alone keeps its buckets and
//! a changed limit resets only that route. A keyed limiter tracks at most `max_keys` keys: a new
//! key beyond that is counted against one shared overflow bucket instead of growing the table,
//! and a background sweep drops keys whose bucket has refilled, since such a key behaves exactly
//! like one never seen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Keys a keyed limit tracks when `max_keys` is not given.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-11, section 3).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11, section 4).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// The policy name in both headers: a route has exactly one policy.
const POLICY_NAME: &str = "default";

/// How often the sweeper wakes: it publishes key counts and sweeps the limiters that are due.
const SWEEP_TICK: Duration = Duration::from_secs(1);
/// A limiter's idle keys are swept this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A limiter that sent a new key to the overflow bucket since its last sweep is swept again
/// after only this long, so that idle keys make room for new ones soon.
const SWEEP_FULL_EVERY: Duration = Duration::from_secs(1);
/// Spare capacity (in entries) a key table may keep after a sweep before it is shrunk.
const SHRINK_SLACK: usize = 1024;

/// A route's limit as compiled. A reload keeps a route's buckets only if these are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Tokens added per `per`.
    pub requests: NonZeroU32,
    /// The period `requests` refers to; at least `requests` nanoseconds.
    pub per: Duration,
    /// Bucket size.
    pub burst: NonZeroU32,
    /// What a bucket belongs to.
    pub key: KeySource,
    /// Most keys tracked (keyed limits only).
    pub max_keys: usize,
}

/// What one bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// One bucket for the whole route.
    Global,
    /// One bucket per client IP (the TCP peer).
    ClientIp,
    /// One bucket per value of this request header; requests without it share one.
    Header(HeaderName),
}

impl Settings {
    fn quota(&self) -> Quota {
        let interval = self.per / self.requests.get();
        Quota::with_period(interval)
            .expect("validated: per is at least one nanosecond per request")
            .allow_burst(self.burst)
    }

    /// `"default";q=Q;w=W`. The draft's window is whole seconds, so a period that is not is
    /// rounded up and the quota scaled to it: 5 per 500ms is `q=10;w=1`.
    fn policy_value(&self) -> HeaderValue {
        let per_ns = self.per.as_nanos();
        let w = per_ns.div_ceil(1_000_000_000).max(1);
        let q = (u128::from(self.requests.get()) * w * 1_000_000_000 + per_ns / 2) / per_ns;
        HeaderValue::try_from(format!("\"{POLICY_NAME}\";q={q};w={w}"))
            .expect("digits and quotes are a valid header value")
    }
}

/// What a keyed bucket is found by. Header values are hashed (seeded xxh3), so the table
/// holds no strings; two values share a bucket only on a 64-bit hash collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Header(u64),
    NoHeader,
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
type Keyed<C> = RateLimiter<Key, BoundedStore, C, StateInformationMiddleware>;

/// A keyed limiter and the store it checks, shared so the sweeper can read its counts.
#[derive(Debug)]
struct KeyedBuckets<C: Clock> {
    limiter: Keyed<C>,
    store: Arc<Store>,
}

#[derive(Debug)]
enum Buckets<C: Clock> {
    Global(Direct<C>),
    ClientIp(KeyedBuckets<C>),
    Header {
        name: HeaderName,
        seed: u64,
        buckets: KeyedBuckets<C>,
    },
}

/// The live buckets of one route's limit, shared by every table that has the route with the
/// same settings.
#[derive(Debug)]
pub struct Limiter<C: Clock = DefaultClock> {
    settings: Settings,
    buckets: Buckets<C>,
    policy: HeaderValue,
    /// Seconds one token takes to come back, rounded up: `t` on allowed responses.
    token_secs: u64,
    keys: metrics::Gauge,
    last_sweep: Mutex<Instant>,
}

impl Limiter {
    /// Buckets on the default clock, reporting their key count to `keys`.
    pub fn new(settings: Settings, keys: metrics::Gauge) -> Self {
        Self::with_clock(settings, DefaultClock::default(), keys)
    }

    /// Buckets no registry knows (dry-run compiles and benches).
    pub fn detached(settings: Settings) -> Self {
        Self::new(settings, metrics::Gauge::noop())
    }
}

impl<C: Clock> Limiter<C> {
    /// Buckets on `clock` (tests use governor's fake clock).
    pub fn with_clock(settings: Settings, clock: C, keys: metrics::Gauge) -> Self {
        let quota = settings.quota();
        let keyed = |clock: C| {
            let store = Arc::new(Store::new(settings.max_keys));
            KeyedBuckets {
                limiter: Keyed::new(quota, BoundedStore(Arc::clone(&store)), clock),
                store,
            }
        };
        let buckets = match &settings.key {
            KeySource::Global => {
                Buckets::Global(RateLimiter::direct_with_clock(quota, clock).with_middleware())
            }
            KeySource::ClientIp => Buckets::ClientIp(keyed(clock)),
            KeySource::Header(name) => Buckets::Header {
                name: name.clone(),
                seed: fastrand::u64(..),
                buckets: keyed(clock),
            },
        };
        keys.set(0.0);
        Self {
            policy: settings.policy_value(),
            token_secs: ceil_secs(quota.replenish_interval()),
            settings,
            buckets,
            keys,
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// The settings these buckets were made for.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Takes a token from the request's bucket: `Ok` with the tokens left, or `Err` with the
    /// time until one is available.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<u32, Duration> {
        let (keyed, key) = match &self.buckets {
            Buckets::Global(limiter) => {
                return limiter
                    .check()
                    .map(|s| s.remaining_burst_capacity())
                    .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()));
            }
            // A v4-mapped address (a dual-stack listener) is the same client as its v4 form.
            Buckets::ClientIp(keyed) => (keyed, Key::Ip(client.to_canonical())),
            Buckets::Header {
                name,
                seed,
                buckets,
            } => {
                let key = headers.get(name).map_or(Key::NoHeader, |v| {
                    Key::Header(xxhash_rust::xxh3::xxh3_64_with_seed(v.as_bytes(), *seed))
                });
                (buckets, key)
            }
        };
        keyed
            .limiter
            .check_key(&key)
            .map(|s| s.remaining_burst_capacity())
            .map_err(|not_until| not_until.wait_time_from(keyed.limiter.clock().now()))
    }

    /// Whether requests are told apart by the value of header `name`.
    pub fn keys_on(&self, name: &HeaderName) -> bool {
        matches!(&self.buckets, Buckets::Header { name: n, .. } if n == name)
    }

    fn keyed(&self) -> Option<&KeyedBuckets<C>> {
        match &self.buckets {
            Buckets::Global(_) => None,
            Buckets::ClientIp(k) | Buckets::Header { buckets: k, .. } => Some(k),
        }
    }

    /// Whether the buckets are per key (and so need sweeping).
    pub fn is_keyed(&self) -> bool {
        self.keyed().is_some()
    }

    /// Keys tracked now, the overflow bucket not included.
    pub fn keys(&self) -> usize {
        self.keyed().map_or(0, |k| k.store.len())
    }

    /// Drops the keys whose bucket has refilled and returns how many are left. Walks the
    /// whole key table, locking one shard at a time; call it off the request path.
    pub fn sweep(&self) -> usize {
        let Some(k) = self.keyed() else { return 0 };
        k.store.overflowed.store(false, Ordering::Relaxed);
        k.limiter.retain_recent();
        let left = k.store.len();
        // Shrinking reallocates, and a table that will fill again soon would grow right back;
        // only give memory back when most of it is unused.
        if k.store.map.capacity() > 2 * left + SHRINK_SLACK {
            k.limiter.shrink_to_fit();
        }
        self.keys.set(left as f64);
        left
    }

    /// Whether a sweep is due at `now`, and if so records it as done.
    fn sweep_due(&self, now: Instant) -> bool {
        let Some(k) = self.keyed() else { return false };
        let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
        let since = now.saturating_duration_since(*last);
        let due = since >= SWEEP_EVERY
            || (since >= SWEEP_FULL_EVERY && k.store.overflowed.load(Ordering::Relaxed));
        if due {
            *last = now;
        }
        due
    }

    /// The `RateLimit-Policy` and `RateLimit` values for `remaining` tokens, with `t` seconds.
    fn headers(&self, remaining: u32, t: u64) -> RateLimitHeaders {
        let current = HeaderValue::try_from(format!("\"{POLICY_NAME}\";r={remaining};t={t}"))
            .expect("digits and quotes are a valid header value");
        RateLimitHeaders {
            policy: self.policy.clone(),
            current,
        }
    }
}

/// Whole seconds, rounded up, at least 1: a client told 0 would retry at once.
fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// A route's rate limit in one table: the shared buckets, and this table's choices about the
/// answer.
#[derive(Debug)]
pub struct RouteRateLimit {
    limiter: Arc<Limiter>,
    limited: metrics::Counter,
    response_headers: bool,
}

impl RouteRateLimit {
    /// `limited` counts refused requests; `response_headers` adds the headers to allowed
    /// responses too.
    pub fn new(limiter: Arc<Limiter>, limited: metrics::Counter, response_headers: bool) -> Self {
        Self {
            limiter,
            limited,
            response_headers,
        }
    }

    /// The shared buckets.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Takes a token for this request. `Ok` carries the headers for the response when the
    /// route sends them on allowed responses; `Err` is the answer to a refused request.
    pub fn check(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
    ) -> Result<Option<RateLimitHeaders>, Limited> {
        match self.limiter.check(client, headers) {
            Ok(remaining) => Ok(self
                .response_headers
                .then(|| self.limiter.headers(remaining, self.limiter.token_secs))),
            Err(wait) => {
                self.limited.increment(1);
                let retry_after = ceil_secs(wait);
                Err(Limited {
                    retry_after,
                    headers: self.limiter.headers(0, retry_after),
                })
            }
        }
    }
}

/// `RateLimit-Policy` and `RateLimit` for one response.
#[derive(Debug)]
pub struct RateLimitHeaders {
    policy: HeaderValue,
    current: HeaderValue,
}

impl RateLimitHeaders {
    /// Sets both headers, replacing any the upstream sent: Strait's limit is the one that
    /// applies to this client here.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        headers.insert(RATELIMIT, self.current.clone());
    }
}

/// A refused request: when to retry, and the headers of the 429.
#[derive(Debug)]
pub struct Limited {
    /// Seconds until a token is available, rounded up (at least 1).
    pub retry_after: u64,
    headers: RateLimitHeaders,
}

impl Limited {
    /// Sets `Retry-After`, `RateLimit-Policy` and `RateLimit`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RETRY_AFTER, HeaderValue::from(self.retry_after));
        self.headers.apply(headers);
    }
}

/// Key table with a bound: a new key past `max` goes to the one overflow bucket.
///
/// governor's own DashMap store inserts inside `check_key`, where no bound can be applied,
/// so this store does the insertion itself and counts its keys in an atomic: the request
/// path never takes a table-wide lock or walks the table to know its size.
struct Store {
    map: DashMap<Key, InMemoryState>,
    /// Keys in `map`, plus slots reserved by insertions in progress.
    len: AtomicUsize,
    max: usize,
    overflow: InMemoryState,
    /// Set when a new key went to `overflow` since the last sweep.
    overflowed: AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("len", &self.len())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Store {
    fn new(max: usize) -> Self {
        Self {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max,
            overflow: InMemoryState::default(),
            overflowed: AtomicBool::new(false),
        }
    }

    /// Reserves a slot for a new key, so that concurrent new keys cannot take the table past
    /// `max`. The plain load first keeps a flood of new keys from bouncing the counter's
    /// cache line between cores once the table is full.
    fn reserve(&self) -> bool {
        if self.len.load(Ordering::Relaxed) >= self.max {
            return false;
        }
        if self.len.fetch_add(1, Ordering::AcqRel) < self.max {
            return true;
        }
        self.len.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Keys in the table; reservations in progress can make the counter pass `max` briefly.
    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed).min(self.max)
    }
}

/// The store as governor sees it.
#[derive(Debug)]
struct BoundedStore(Arc<Store>);

impl StateStore for BoundedStore {
    type Key = Key;

    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let s = &*self.0;
        if let Some(state) = s.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if !s.reserve() {
            if !s.overflowed.load(Ordering::Relaxed) {
                s.overflowed.store(true, Ordering::Relaxed);
            }
            return s.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        match s.map.entry(*key) {
            Entry::Occupied(e) => {
                // Another request inserted it meanwhile; give the slot back.
                s.len.fetch_sub(1, Ordering::AcqRel);
                e.get().measure_and_replace(&NotKeyed::NonKey, f)
            }
            Entry::Vacant(v) => v
                .insert(InMemoryState::default())
                .measure_and_replace(&NotKeyed::NonKey, f),
        }
    }
}

impl ShrinkableKeyedStateStore<Key> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut removed = 0;
        self.0.map.retain(|_, state| {
            let keep = arrival_time(state).is_some_and(|tat| tat > drop_below);
            removed += usize::from(!keep);
            keep
        });
        self.0.len.fetch_sub(removed, Ordering::AcqRel);
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
}

/// The bucket's theoretical arrival time (`None` for a fresh one). governor exposes it only to
/// a measurement; one that always refuses reads it without changing it.
fn arrival_time(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .err()
        .flatten()
}

/// Listener and route name.
type RouteKey = (Arc<str>, Arc<str>);
type Limiters = Mutex<HashMap<RouteKey, Weak<Limiter>>>;

/// Limiters by listener and route, shared across table generations, and the sweeper that
/// keeps their key tables small.
#[derive(Debug, Default)]
pub struct RateLimitRegistry {
    limiters: Arc<Limiters>,
    sweeping: AtomicBool,
}

impl RateLimitRegistry {
    /// The limiter for this route: the one a table already holds when its settings are
    /// unchanged, else a new one (and only this route starts with full buckets).
    pub fn get(&self, listener: &str, route: &str, settings: &Settings) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let key: RouteKey = (listener.into(), route.into());
        if let Some(l) = map.get(&key).and_then(Weak::upgrade) {
            if l.settings == *settings {
                return l;
            }
        }
        let keys = metrics::gauge!(
            crate::metrics::RATE_LIMIT_KEYS,
            "listener" => listener.to_owned(),
            "route" => route.to_owned()
        );
        let limiter = Arc::new(Limiter::new(settings.clone(), keys));
        map.insert(key, Arc::downgrade(&limiter));
        drop(map);
        if limiter.is_keyed() {
            self.start_sweeper();
        }
        limiter
    }

    /// Forgets limiters no table holds any more.
    pub fn prune(&self) {
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
    }

    /// Number of limiters alive.
    pub fn len(&self) -> usize {
        self.limiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no limiter is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts the sweeper on the current tokio runtime, once. Outside a runtime there is
    /// none: the bound on keys holds anyway, idle keys just stay until the table is full.
    fn start_sweeper(&self) {
        if self.sweeping.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            runtime.spawn(sweep_loop(Arc::downgrade(&self.limiters)));
        }
    }
}

/// Every tick: publish each keyed limiter's key count, and sweep those that are due. Ends
/// when the registry is dropped.
async fn sweep_loop(limiters: Weak<Limiters>) {
    let mut tick = tokio::time::interval(SWEEP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(limiters) = limiters.upgrade() else {
            return;
        };
        let live: Vec<Arc<Limiter>> = limiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .filter(|l| l.is_keyed())
            .collect();
        drop(limiters);
        let now = Instant::now();
        let due: Vec<Arc<Limiter>> = live
            .into_iter()
            .filter(|l| {
                l.keys.set(l.keys() as f64);
                l.sweep_due(now)
            })
            .collect();
        if !due.is_empty() {
            // A sweep walks a whole key table; keep it off the threads that serve requests.
            let _ = tokio::task::spawn_blocking(move || {
                for l in due {
                    l.sweep();
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn settings(requests: u32, per: Duration, burst: u32, key: KeySource) -> Settings {
        Settings {
            requests: NonZeroU32::new(requests).unwrap(),
            per,
            burst: NonZeroU32::new(burst).unwrap(),
            key,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn a_burst_then_one_token_per_interval() {
        let clock = FakeRelativeClock::default();
        let s = settings(1, Duration::from_secs(60), 3, KeySource::Global);
        let l = Limiter::with_clock(s, clock.clone(), metrics::Gauge::noop());
        let none = HeaderMap::new();
        let got: Vec<_> = (0..4).map(|_| l.check(ip(1), &none)).collect();
        assert_eq!(got[..3], [Ok(2), Ok(1), Ok(0)]);
        assert_eq!(got[3], Err(Duration::from_secs(60)));
        clock.advance(Duration::from_secs(59));
        assert_eq!(l.check(ip(1), &none), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.check(ip(1), &none), Ok(0));
    }

    #[test]
    fn headers_follow_the_draft_syntax() {
        let s = settings(100, Duration::from_secs(1), 20, KeySource::Global);
        assert_eq!(s.policy_value(), "\"default\";q=100;w=1");
        let s = settings(5, Duration::from_millis(500), 5, KeySource::Global);
        assert_eq!(s.policy_value(), "\"default\";q=10;w=1");
        let s = settings(1, Duration::from_secs(90), 5, KeySource::Global);
        assert_eq!(s.policy_value(), "\"default\";q=1;w=90");
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(59_001)), 60);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }

    #[test]
    fn idle_keys_are_swept_and_busy_ones_stay() {
        let clock = FakeRelativeClock::default();
        // One token per second, bucket of 2: a key used once is full again after 1 s.
        let s = settings(1, Duration::from_secs(1), 2, KeySource::ClientIp);
        let l = Limiter::with_clock(s, clock.clone(), metrics::Gauge::noop());
        let none = HeaderMap::new();
        for i in 0..100 {
            assert!(l.check(ip(i), &none).is_ok());
        }
        assert_eq!(l.keys(), 100);
        assert_eq!(l.sweep(), 100, "nothing is idle yet");
        clock.advance(Duration::from_secs(1));
        // Key 0 is used again; the others are not.
        assert!(l.check(ip(0), &none).is_ok());
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.sweep(), 1, "only the busy key is left");
        assert_eq!(l.keys(), 1);
        // The swept keys start again with a full bucket, as they would have anyway.
        assert_eq!(l.check(ip(5), &none), Ok(1));
        assert_eq!(l.keys(), 2);
    }

    #[test]
    fn the_key_table_never_grows_past_max_keys() {
        let clock = FakeRelativeClock::default();
        let mut s = settings(1, Duration::from_secs(1), 1000, KeySource::ClientIp);
        s.max_keys = 100;
        let l = Limiter::with_clock(s, clock.clone(), metrics::Gauge::noop());
        let none = HeaderMap::new();
        for i in 0..1100 {
            let _ = l.check(ip(i), &none);
        }
        let Buckets::ClientIp(k) = &l.buckets else {
            unreachable!()
        };
        assert_eq!(k.store.map.len(), 100, "the first 100 keys, no more");
        assert_eq!(l.keys(), 100);
        assert!(k.store.overflowed.load(Ordering::Relaxed));
        // The 1000 keys past the bound shared one bucket of 1000 tokens: it is empty now.
        assert!(l.check(ip(5000), &none).is_err());
        // A known key still has its own bucket.
        assert_eq!(l.check(ip(7), &none), Ok(998));
        // Once the keys are idle a sweep makes room for new ones.
        clock.advance(Duration::from_secs(2000));
        assert_eq!(l.sweep(), 0);
        assert!(!k.store.overflowed.load(Ordering::Relaxed));
        assert_eq!(l.check(ip(5000), &none), Ok(999));
        assert_eq!(k.store.map.len(), 1);
    }

    #[test]
    fn a_tracked_key_is_small() {
        // docs/config.md promises 40 to 80 bytes a key: this entry, a control byte, and the
        // hash table's spare room.
        assert!(std::mem::size_of::<(Key, InMemoryState)>() <= 32);
    }

    #[test]
    fn header_values_have_their_own_buckets_and_absence_shares_one() {
        let s = settings(
            1,
            Duration::from_secs(60),
            1,
            KeySource::Header(HeaderName::from_static("x-user")),
        );
        let l = Limiter::detached(s);
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_static(v));
            h
        };
        let none = HeaderMap::new();
        assert!(l.check(ip(1), &with("alice")).is_ok());
        assert!(
            l.check(ip(2), &with("alice")).is_err(),
            "same value, any IP"
        );
        assert!(l.check(ip(1), &with("bob")).is_ok());
        assert!(l.check(ip(1), &none).is_ok());
        assert!(
            l.check(ip(2), &none).is_err(),
            "no header: one shared bucket"
        );
        assert_eq!(l.keys(), 3);
    }

    #[test]
    fn registry_keeps_buckets_while_settings_are_unchanged() {
        let reg = RateLimitRegistry::default();
        let a = settings(1, Duration::from_secs(60), 1, KeySource::Global);
        let b = settings(2, Duration::from_secs(60), 1, KeySource::Global);
        let first = reg.get("web", "a", &a);
        let other = reg.get("web", "b", &a);
        assert!(!Arc::ptr_eq(&first, &other), "one limiter per route");
        assert!(Arc::ptr_eq(&first, &reg.get("web", "a", &a)));
        let changed = reg.get("web", "a", &b);
        assert!(!Arc::ptr_eq(&first, &changed));
        assert!(Arc::ptr_eq(&other, &reg.get("web", "b", &a)));
        drop((first, other));
        reg.prune();
        assert_eq!(reg.len(), 1, "only the changed route's limiter is held");
        drop(changed);
        reg.prune();
        assert!(reg.is_empty());
    }
}
