//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! A fixed-size lookup table filled by each endpoint's own permutation; lookup is one index.
//! Removing an endpoint moves few keys besides its own, and the table balances load more
//! evenly than a ring of the same memory.

use super::{gcd, Load};

/// Table size: prime, and over 100 slots per endpoint for sets up to ~650 endpoints.
const SMALL: u64 = 65_537;
/// Table size for larger sets.
const LARGE: u64 = 655_373;
/// Largest per-endpoint share of turns per round after normalizing weights.
const MAX_TURNS: u64 = 100;

/// The lookup table.
#[derive(Debug)]
pub struct Maglev {
    table: Box<[u32]>,
}

impl Maglev {
    /// Fills the table.
    pub fn new<E: Load>(endpoints: &[E]) -> Self {
        let live: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].weight() > 0)
            .collect();
        if live.is_empty() {
            return Self {
                table: Box::new([]),
            };
        }
        let m = if live.len() as u64 * 100 < SMALL {
            SMALL
        } else {
            LARGE
        };
        let g = live
            .iter()
            .map(|&i| u64::from(endpoints[i].weight()))
            .fold(0, gcd);
        let max_w = live
            .iter()
            .map(|&i| u64::from(endpoints[i].weight()) / g)
            .max()
            .unwrap_or(1);
        let turns: Vec<u64> = live
            .iter()
            .map(|&i| {
                let w = u64::from(endpoints[i].weight()) / g;
                if max_w <= MAX_TURNS {
                    w
                } else {
                    (w * MAX_TURNS / max_w).max(1)
                }
            })
            .collect();
        let perms: Vec<(u64, u64)> = live
            .iter()
            .map(|&i| {
                let id = endpoints[i].hash_id();
                let offset = xxhash_rust::xxh3::xxh3_64_with_seed(b"offset", id) % m;
                let skip = xxhash_rust::xxh3::xxh3_64_with_seed(b"skip", id) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; live.len()];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for (k, &i) in live.iter().enumerate() {
                for _ in 0..turns[k] {
                    let (offset, skip) = perms[k];
                    let mut c = (offset + next[k] * skip) % m;
                    while table[c as usize] != u32::MAX {
                        next[k] += 1;
                        c = (offset + next[k] * skip) % m;
                    }
                    table[c as usize] = i as u32;
                    next[k] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Self {
            table: table.into_boxed_slice(),
        }
    }

    /// The endpoint for `hash`.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(hash % self.table.len() as u64) as usize] as usize)
    }
}
