//! Power of two choices: compare two random endpoints, take the cheaper one.
//!
//! Used by `least_request` (cost = in-flight) and `peak_ewma` (cost = latency x load). Two
//! random choices avoid the herd behaviour of always picking the global minimum while
//! staying O(1).

/// Picks the cheaper of two distinct random endpoint indices from `live`; `None` when empty.
pub fn pick(live: &[u32], cost: impl Fn(&u32) -> f64) -> Option<usize> {
    let n = live.len();
    match n {
        0 => return None,
        1 => return Some(live[0] as usize),
        _ => {}
    }
    let a = fastrand::usize(..n);
    let mut b = fastrand::usize(..n - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (live[a], live[b]);
    Some(if cost(&b) < cost(&a) { b } else { a } as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn never_picks_the_most_loaded_of_two() {
        let loads = [10.0, 0.0];
        for _ in 0..100 {
            assert_eq!(super::pick(&[0, 1], |&i| loads[i as usize]), Some(1));
        }
    }

    #[test]
    fn draws_only_from_the_live_set() {
        for _ in 0..100 {
            assert_eq!(super::pick(&[2], |_| 0.0), Some(2));
        }
        assert_eq!(super::pick(&[], |_| 0.0), None);
    }
}
