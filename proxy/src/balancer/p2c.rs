//! Power of two choices: compare two random endpoints, take the cheaper one.
//!
//! Used by `least_request` (cost = in-flight) and `peak_ewma` (cost = latency x load). Two
//! random choices avoid the herd behaviour of always picking the global minimum while
//! staying O(1).

/// Picks the cheaper of two distinct random endpoints. `endpoints` must not be empty.
pub fn pick<E>(endpoints: &[E], cost: impl Fn(&E) -> f64) -> usize {
    let n = endpoints.len();
    if n == 1 {
        return 0;
    }
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    if cost(&endpoints[b]) < cost(&endpoints[a]) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_picks_the_most_loaded_of_two() {
        let loads = [10.0, 0.0];
        for _ in 0..100 {
            assert_eq!(super::pick(&loads, |l| *l), 1);
        }
    }
}
