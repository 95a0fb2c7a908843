//! Weighted random pick over cumulative weights.

/// Cumulative weights for a binary-search pick.
#[derive(Debug)]
pub struct WeightedRandom {
    cumulative: Box<[u64]>,
}

impl WeightedRandom {
    /// Builds the cumulative table.
    pub fn new(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w);
                sum
            })
            .collect();
        Self { cumulative }
    }

    /// A random index with probability proportional to its weight.
    pub fn pick(&self) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let r = fastrand::u64(..total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_picks_zero_weight() {
        let w = WeightedRandom::new(&[0, 1, 0]);
        for _ in 0..100 {
            assert_eq!(w.pick(), Some(1));
        }
    }
}
