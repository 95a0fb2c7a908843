//! Ketama-style consistent hashing ring.
//!
//! Each endpoint owns points on a 64-bit ring in proportion to its weight; a request goes to
//! the first point at or after its hash. Removing an endpoint moves only the keys it owned.

use super::Load;

/// Points per unit of weight. An endpoint's points depend only on its own address and
/// weight, so removing one endpoint moves exactly the keys it owned.
const POINTS_PER_WEIGHT: u64 = 256;
/// Ring size cap; past it every endpoint's share is scaled down (and remapping on change is
/// no longer minimal), which only very large weighted sets reach.
const MAX_RING: u64 = 1 << 20;

/// The sorted ring.
#[derive(Debug)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Ring {
    /// Builds the ring.
    pub fn new<E: Load>(endpoints: &[E]) -> Self {
        let total_w: u64 = endpoints.iter().map(|e| u64::from(e.weight())).sum();
        if total_w == 0 {
            return Self {
                points: Box::new([]),
            };
        }
        let total_points = total_w * POINTS_PER_WEIGHT;
        let mut points = Vec::with_capacity(total_points.min(MAX_RING) as usize);
        for (i, e) in endpoints.iter().enumerate() {
            let mut n = u64::from(e.weight()) * POINTS_PER_WEIGHT;
            if total_points > MAX_RING {
                n = (n * MAX_RING / total_points).max(u64::from(e.weight() > 0));
            }
            let id = e.hash_id();
            for k in 0..n {
                let h = xxhash_rust::xxh3::xxh3_64_with_seed(&k.to_le_bytes(), id);
                points.push((h, i as u32));
            }
        }
        points.sort_unstable();
        Self {
            points: points.into_boxed_slice(),
        }
    }

    /// The endpoint owning `hash`.
    pub fn pick(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let at = self.points.partition_point(|&(p, _)| p < hash);
        let (_, i) = self.points[at % self.points.len()];
        Some(i as usize)
    }
}
