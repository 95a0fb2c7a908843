//! Smooth weighted round robin (the nginx algorithm), precomputed into a schedule.
//!
//! nginx keeps a mutable "current weight" per peer, which needs a lock. Computing the whole
//! cycle once per table generation and walking it with one atomic counter gives the same
//! interleaved order (weights 5:1:1 give a a b a c a a, not a a a a a b c) with no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::gcd;

/// Longest cycle kept; larger weight sums are scaled down proportionally.
const MAX_CYCLE: u64 = 1 << 16;

/// A precomputed smooth weighted round-robin cycle.
#[derive(Debug)]
pub struct Schedule {
    order: Box<[u32]>,
    next: AtomicUsize,
}

impl Schedule {
    /// Builds the cycle for these weights (index = endpoint). Zero weights get no turns.
    pub fn new(weights: &[u32]) -> Self {
        let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let g = w.iter().copied().filter(|&x| x > 0).fold(0, gcd).max(1);
        w.iter_mut().for_each(|x| *x /= g);
        let total: u64 = w.iter().sum();
        if total > MAX_CYCLE {
            w.iter_mut()
                .filter(|x| **x > 0)
                .for_each(|x| *x = (*x * MAX_CYCLE / total).max(1));
        }
        let total: i64 = w.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; w.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best as u32);
        }
        Self {
            order: order.into_boxed_slice(),
            // A random start spreads the first requests after a reload across endpoints.
            next: AtomicUsize::new(fastrand::usize(..=usize::MAX / 2)),
        }
    }

    /// The next index, or `None` when every weight is zero.
    pub fn pick(&self) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.order[n % self.order.len()] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_smoothly() {
        let s = Schedule::new(&[5, 1, 1]);
        assert_eq!(&*s.order, &[0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn exact_counts_over_whole_cycles() {
        let s = Schedule::new(&[3, 2, 0, 1]);
        let mut counts = [0; 4];
        for _ in 0..600 {
            counts[s.pick().unwrap()] += 1;
        }
        assert_eq!(counts, [300, 200, 0, 100]);
    }

    #[test]
    fn all_zero_picks_nothing() {
        assert_eq!(Schedule::new(&[0, 0]).pick(), None);
    }
}
