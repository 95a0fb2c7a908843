//! Load-balancing policies. Each is a pure pick over an endpoint set, built once per table
//! generation; the pick itself touches only atomics.

pub mod maglev;
pub mod p2c;
pub mod random;
pub mod ring_hash;
pub mod round_robin;

use crate::table::spec::Policy;

/// What a policy needs to know about one endpoint.
pub trait Load {
    /// Relative weight.
    fn weight(&self) -> u32;
    /// Requests in flight.
    fn in_flight(&self) -> u32;
    /// Peak-EWMA cost (latency x load).
    fn peak_ewma_cost(&self) -> f64;
    /// Stable identity used to place the endpoint on a hash ring.
    fn hash_id(&self) -> u64;
}

/// A compiled policy over a fixed endpoint list.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round robin.
    RoundRobin(round_robin::Schedule),
    /// Weighted random.
    Random(random::WeightedRandom),
    /// Power of two choices on in-flight requests, over the endpoints with weight.
    LeastRequest(Box<[u32]>),
    /// Power of two choices on peak-EWMA cost, over the endpoints with weight.
    PeakEwma(Box<[u32]>),
    /// Ketama ring.
    RingHash(ring_hash::Ring),
    /// Maglev lookup table.
    Maglev(maglev::Maglev),
}

impl Balancer {
    /// Builds the policy's structures for these endpoints.
    pub fn new<E: Load>(policy: Policy, endpoints: &[E]) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(Load::weight).collect();
        match policy {
            Policy::RoundRobin => Self::RoundRobin(round_robin::Schedule::new(&weights)),
            Policy::Random => Self::Random(random::WeightedRandom::new(&weights)),
            Policy::LeastRequest => Self::LeastRequest(weighted(&weights)),
            Policy::PeakEwma => Self::PeakEwma(weighted(&weights)),
            Policy::RingHash => Self::RingHash(ring_hash::Ring::new(endpoints)),
            Policy::Maglev => Self::Maglev(maglev::Maglev::new(endpoints)),
        }
    }

    /// Picks an endpoint index; `None` only for an empty set. `hash` is the request's
    /// affinity key for the hashing policies; without one they pick at random.
    pub fn pick<E: Load>(&self, endpoints: &[E], hash: Option<u64>) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        match self {
            Self::RoundRobin(s) => s.pick(),
            Self::Random(w) => w.pick(),
            Self::LeastRequest(live) => p2c::pick(live, |&i| {
                let e = &endpoints[i as usize];
                f64::from(e.in_flight() + 1) / f64::from(e.weight())
            }),
            Self::PeakEwma(live) => p2c::pick(live, |&i| {
                let e = &endpoints[i as usize];
                e.peak_ewma_cost() / f64::from(e.weight())
            }),
            // Without a key, a random point: still weighted, never a weight-0 endpoint.
            Self::RingHash(r) => r.pick(hash.unwrap_or_else(|| fastrand::u64(..))),
            Self::Maglev(m) => m.pick(hash.unwrap_or_else(|| fastrand::u64(..))),
        }
    }

    /// Whether this policy uses a request hash key.
    pub fn wants_hash(&self) -> bool {
        matches!(self, Self::RingHash(_) | Self::Maglev(_))
    }
}

/// The affinity key of a client address.
pub fn ip_hash(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(ip) => xxhash_rust::xxh3::xxh3_64(&ip.octets()),
        std::net::IpAddr::V6(ip) => xxhash_rust::xxh3::xxh3_64(&ip.octets()),
    }
}

/// Indices of the endpoints that may take traffic (weight above 0).
fn weighted(weights: &[u32]) -> Box<[u32]> {
    (0..weights.len() as u32)
        .filter(|&i| weights[i as usize] > 0)
        .collect()
}

/// Greatest common divisor, for normalizing weights.
pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
